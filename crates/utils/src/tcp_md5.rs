//! TCP-MD5 signatures (RFC 2385) on a socket: the key, read from a file
//! with its permissions checked, and installing it for a peer prefix.
//!
//! Owns: `Md5Key` (1–80 bytes, never shown: its `Debug` says
//! `Md5Key(<redacted>)`), `Md5Key::read` (a file readable by every user is
//! refused, one trailing newline is not part of the key), and
//! `install_key` (`TCP_MD5SIG_EXT` with a prefix length, so one key covers
//! a rule's peer prefix; on an IPv6 socket an IPv4 prefix is given as
//! v4-mapped with its IPv4 length, as the kernel expects for the IPv4
//! connections a dual-stack socket accepts).
//!
//! Must never: log, format or return a key's bytes in an error; decide
//! which peer gets which key (the policy and the client's options do).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

/// Longest key the kernel takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_KEY_LEN: usize = 80;

/// `TCP_MD5SIG_FLAG_PREFIX` (linux/tcp.h): `prefixlen` is meaningful.
const FLAG_PREFIX: u8 = 1;

/// A TCP-MD5 key. Compared by value (a reload closes the sessions whose
/// key changed); never displayed.
#[derive(Clone, PartialEq, Eq)]
pub struct Md5Key(Box<[u8]>);

impl fmt::Debug for Md5Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Md5Key(<redacted>)")
    }
}

/// Why a key file was not accepted: the file and the cause, never the key.
#[derive(Debug, thiserror::Error)]
pub enum Md5KeyError {
    /// The file could not be read.
    #[error("TCP-MD5 key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Other users may read it.
    #[error("TCP-MD5 key file {path} is readable by every user (mode {mode:04o}); restrict it (chmod 600)")]
    WorldReadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No key in it.
    #[error("TCP-MD5 key file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Longer than the kernel takes.
    #[error("TCP-MD5 key file {path}: the key is {len} bytes, at most {MAX_KEY_LEN} are allowed")]
    TooLong {
        /// The file.
        path: PathBuf,
        /// The key's length.
        len: usize,
    },
}

impl Md5Key {
    /// Reads the key in `path`: the file's bytes without one trailing
    /// newline (`\n` or `\r\n`). Refused when every user may read the file,
    /// when it is empty, or longer than `MAX_KEY_LEN`.
    pub fn read(path: &Path) -> Result<Md5Key, Md5KeyError> {
        let read_error = |source| Md5KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path)
            .map_err(read_error)?
            .permissions()
            .mode();
        if mode & 0o004 != 0 {
            return Err(Md5KeyError::WorldReadable {
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        let mut bytes = std::fs::read(path).map_err(read_error)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(Md5KeyError::Empty {
                path: path.to_path_buf(),
            });
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(Md5KeyError::TooLong {
                path: path.to_path_buf(),
                len: bytes.len(),
            });
        }
        Ok(Md5Key(bytes.into_boxed_slice()))
    }
}

/// `struct tcp_md5sig` (linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MAX_KEY_LEN],
}

/// Installs `key` on `socket` for peers in `peers` (`None`: removes the
/// key of that prefix). `socket_v6`: the socket is IPv6 (an IPv4 prefix
/// is then installed v4-mapped, for the IPv4 connections a dual-stack
/// socket accepts). On an IPv4 socket an IPv6 prefix concerns no peer and
/// nothing is done. Removing a key that is not installed is not an error.
pub fn install_key(
    socket: BorrowedFd<'_>,
    socket_v6: bool,
    peers: IpNet,
    key: Option<&Md5Key>,
) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let (addr, prefixlen) = match (peers.addr(), socket_v6) {
        (IpAddr::V4(_), false) | (IpAddr::V6(_), true) => (peers.addr(), peers.prefix_len()),
        // The kernel takes a v4-mapped address with the IPv4 prefix length.
        (IpAddr::V4(v4), true) => (IpAddr::V6(v4.to_ipv6_mapped()), peers.prefix_len()),
        (IpAddr::V6(_), false) => return Ok(()),
    };
    match addr {
        IpAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut sig.addr as *mut _ as *mut libc::sockaddr_in, sin) };
        }
        IpAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut sig.addr as *mut _ as *mut libc::sockaddr_in6, sin6) };
        }
    }
    sig.flags = FLAG_PREFIX;
    sig.prefixlen = prefixlen;
    if let Some(key) = key {
        sig.keylen = key.0.len() as u16;
        sig.key[..key.0.len()].copy_from_slice(&key.0);
    }
    // SAFETY: setsockopt with a pointer to a live, correctly sized struct.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG_EXT,
            &sig as *const TcpMd5Sig as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // Deleting a key that is not there.
    if key.is_none() && e.raw_os_error() == Some(libc::ENOENT) {
        return Ok(());
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn key_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_key_file_is_read_checked_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("mb-md5-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = key_file(&dir, "good", b"s3cret-key\n", 0o600);
        let key = Md5Key::read(&good).unwrap();
        assert_eq!(&*key.0, b"s3cret-key");
        assert_eq!(format!("{key:?}"), "Md5Key(<redacted>)");
        let open = key_file(&dir, "open", b"s3cret-key\n", 0o644);
        let e = Md5Key::read(&open).unwrap_err().to_string();
        assert!(
            e.contains("readable by every user") && e.contains("0644"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        let empty = key_file(&dir, "empty", b"\n", 0o600);
        assert!(matches!(
            Md5Key::read(&empty),
            Err(Md5KeyError::Empty { .. })
        ));
        let long = key_file(&dir, "long", &[b'k'; 81], 0o600);
        assert!(matches!(
            Md5Key::read(&long),
            Err(Md5KeyError::TooLong { len: 81, .. })
        ));
        let missing = Md5Key::read(&dir.join("missing")).unwrap_err().to_string();
        assert!(missing.contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_install_and_remove_on_both_families() {
        let key = Md5Key(b"k".to_vec().into_boxed_slice());
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&v6);
        for prefix in ["2001:db8::/32", "127.0.0.0/8", "10.1.2.3/32"] {
            let p: IpNet = prefix.parse().unwrap();
            install_key(fd, true, p, Some(&key)).unwrap();
            install_key(fd, true, p, None).unwrap();
            install_key(fd, true, p, None).unwrap();
        }
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&v4);
        install_key(fd, false, "127.0.0.0/8".parse().unwrap(), Some(&key)).unwrap();
        install_key(fd, false, "2001:db8::/32".parse().unwrap(), Some(&key)).unwrap();
    }
}

/// The kernel enforces what `install_key` installs: on loopback, a
/// listener keyed for 127.0.0.1/32 answers a signed SYN and never an
/// unsigned one or one signed with another key.
#[cfg(test)]
mod kernel_tests {
    use super::*;
    use socket2::{Domain, SockAddr, Socket, Type};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn key(k: &[u8]) -> Md5Key {
        Md5Key(k.to_vec().into_boxed_slice())
    }

    /// Connects to `to`, signing with `key` if given.
    fn connect(to: std::net::SocketAddr, key: Option<&Md5Key>) -> io::Result<()> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        if let Some(k) = key {
            // SAFETY: `s` outlives the borrow (socket2 0.4 has no `AsFd`).
            let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
            install_key(fd, false, "127.0.0.1/32".parse().unwrap(), Some(k))?;
        }
        s.connect_timeout(&SockAddr::from(to), Duration::from_millis(700))
    }

    #[test]
    fn only_a_correctly_signed_connection_is_accepted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let right = key(b"the right key");
        install_key(
            listener.as_fd(),
            false,
            "127.0.0.0/8".parse().unwrap(),
            Some(&right),
        )
        .unwrap();
        assert!(connect(addr, Some(&right)).is_ok(), "signed with the key");
        let unsigned = connect(addr, None).unwrap_err();
        assert_eq!(unsigned.kind(), io::ErrorKind::TimedOut, "{unsigned}");
        let wrong = connect(addr, Some(&key(b"another key"))).unwrap_err();
        assert_eq!(wrong.kind(), io::ErrorKind::TimedOut, "{wrong}");
        install_key(
            listener.as_fd(),
            false,
            "127.0.0.0/8".parse().unwrap(),
            None,
        )
        .unwrap();
        assert!(
            connect(addr, None).is_ok(),
            "the key removed: unsigned works"
        );
    }
}
