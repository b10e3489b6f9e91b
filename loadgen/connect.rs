//! How a simulated peer opens its TCP connection: from an address of its
//! own when the server is on IPv4 loopback, as a real fleet's hypervisors
//! each have theirs.
//!
//! Why: all of a run's connections from one source address to one server
//! address share one 4-tuple space, and the kernel picks each ephemeral port
//! by walking the ports already taken for that pair (`__inet_hash_connect`,
//! `__inet_check_established`). At 19,500 peers that walk took two thirds of
//! loadgen's CPU and set the connect time of the run (perf, 2026-12-07).
//! Loopback answers for all of 127.0.0.0/8, so peer p connects from an
//! address of its own in 127.1.0.0/16 upwards and its port is found at once.
//!
//! Owns: the socket's creation, source binding and the wait for the
//! handshake. Must never: block the shard's thread (the connect is
//! non-blocking and its completion awaited on the executor's timer), or
//! choose a source outside 127.0.0.0/8.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use glommio::timer::sleep;
use socket2::{Domain, Protocol, Socket, Type};

use crate::plan::PeerId;

/// Where a peer's connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceAddrs {
    /// The kernel's choice: one address for every peer (any server).
    Kernel,
    /// Each peer its own 127.x.y.z (`source_for`); only for a server on
    /// IPv4 loopback.
    PerPeer,
}

impl SourceAddrs {
    /// Per-peer sources where they can reach the server (IPv4 loopback),
    /// unless `single` asks for the kernel's one address.
    pub fn for_server(server: SocketAddr, single: bool) -> SourceAddrs {
        match server.ip() {
            IpAddr::V4(v4) if v4.is_loopback() && !single => SourceAddrs::PerPeer,
            _ => SourceAddrs::Kernel,
        }
    }

    /// `self`, if this host lets a socket bind a per-peer source (a
    /// sandbox may refuse the option or the address); else `Kernel`, said
    /// once. Checked before the run, so that a host's refusal is not
    /// retried per peer until the deadline and counted as the server's.
    pub fn usable(self) -> SourceAddrs {
        if self == SourceAddrs::Kernel {
            return self;
        }
        match bound_socket(source_for(PeerId(0))) {
            Ok(_) => self,
            Err(e) => {
                tracing::warn!(
                    "cannot bind a per-peer source address ({e}); every peer connects from the kernel's one"
                );
                SourceAddrs::Kernel
            }
        }
    }
}

/// Peer `p`'s own loopback address: 127.1.0.1 for peer 0, 250 peers per
/// third octet (the last octet stays 1–250) and 254 second octets, so
/// 254 · 256 · 250 = 16,256,000 addresses before they repeat, far above
/// any run's peers. Never 127.0.0.x, where the server and tests live.
pub fn source_for(p: PeerId) -> Ipv4Addr {
    let n = p.0;
    let low = (n % 250) as u8 + 1;
    let rest = n / 250;
    let third = (rest % 256) as u8;
    let second = 1 + ((rest / 256) % 254) as u8;
    Ipv4Addr::new(127, second, third, low)
}

/// Opens peer `p`'s connection to `server` within `timeout`.
pub async fn connect(
    server: SocketAddr,
    p: PeerId,
    sources: SourceAddrs,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match sources {
        SourceAddrs::Kernel => Ok(TcpStream::connect_timeout(server, timeout).await?),
        SourceAddrs::PerPeer => connect_from(server, source_for(p), timeout).await,
    }
}

/// A non-blocking connect from `source` (port picked by the kernel at
/// connect time), awaited by repeating `connect(2)`: on loopback the
/// handshake has almost always finished when the first call returns, so the
/// timer rarely runs; a SYN the server's full backlog dropped is resent by
/// the kernel and seen here within its retransmission time (the waits
/// double from 1 to 50 ms).
async fn connect_from(
    server: SocketAddr,
    source: Ipv4Addr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = bound_socket(source)?;
    socket.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    // The first look comes at once: the SYN-ACK of a loopback server is
    // taken in when the first call returns, so the second call usually
    // finds the connection made, and only a dropped SYN waits on the timer.
    let mut wait = Duration::ZERO;
    loop {
        match socket.connect(&server.into()) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EISCONN) => break,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINPROGRESS | libc::EALREADY | libc::EAGAIN)
                ) => {}
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection timed out",
            ));
        }
        if !wait.is_zero() {
            sleep(wait).await;
        }
        wait = (wait * 2).clamp(Duration::from_millis(1), Duration::from_millis(50));
    }
    // glommio drives its sockets through io_uring and expects them
    // blocking, as its own connect makes them.
    socket.set_nonblocking(false)?;
    // SAFETY: the descriptor is a connected TCP socket this function owns;
    // `into_raw_fd` hands that ownership to the stream.
    Ok(unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) })
}

/// A TCP socket bound to `source`, its port left to the connect.
fn bound_socket(source: Ipv4Addr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    bind_address_no_port(&socket)?;
    socket.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())?;
    Ok(socket)
}

/// `IP_BIND_ADDRESS_NO_PORT`: the bind fixes the address only, and the
/// port is chosen at connect time for the whole 4-tuple (otherwise bind
/// reserves a port of its own for every peer, as a listener would).
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    // SAFETY: `socket` owns the descriptor and outlives the call
    // (socket2 0.4's `Socket` has no `AsFd`).
    let fd = unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) };
    set_int_option(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// `setsockopt(2)` of an integer option (socket2 0.4 has neither this
/// one nor `TCP_QUICKACK`, which the floor sets).
pub fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a descriptor open for the borrow, and an option value of the
    // size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_peer_of_a_large_run_has_its_own_loopback_source() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..200_000 {
            let a = source_for(PeerId(n));
            assert!(a.is_loopback(), "{a}");
            assert_ne!(a.octets()[1], 0, "{a} is in 127.0.0.0/16");
            assert!((1..=250).contains(&a.octets()[3]), "{a}");
            assert!(seen.insert(a), "{a} twice");
        }
    }

    #[test]
    fn only_an_ipv4_loopback_server_gets_per_peer_sources() {
        let v4 = "127.0.0.1:4711".parse().unwrap();
        assert_eq!(SourceAddrs::for_server(v4, false), SourceAddrs::PerPeer);
        assert_eq!(SourceAddrs::for_server(v4, true), SourceAddrs::Kernel);
        let v6 = "[::1]:4711".parse().unwrap();
        assert_eq!(SourceAddrs::for_server(v6, false), SourceAddrs::Kernel);
        let remote = "10.0.0.1:4711".parse().unwrap();
        assert_eq!(SourceAddrs::for_server(remote, false), SourceAddrs::Kernel);
    }

    #[test]
    fn a_peer_connects_from_its_own_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let ex = glommio::LocalExecutorBuilder::default().make().unwrap();
        let local = ex.run(async move {
            let s = connect(
                server,
                PeerId(251),
                SourceAddrs::PerPeer,
                Duration::from_secs(3),
            )
            .await
            .unwrap();
            s.local_addr().unwrap()
        });
        let (_, from) = listener.accept().unwrap();
        assert_eq!(local.ip(), IpAddr::V4(Ipv4Addr::new(127, 1, 1, 2)));
        assert_eq!(from, local);
    }

    #[test]
    fn a_refused_connect_is_an_error_not_a_hang() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let ex = glommio::LocalExecutorBuilder::default().make().unwrap();
        let err = ex.run(async move {
            connect(
                free,
                PeerId(0),
                SourceAddrs::PerPeer,
                Duration::from_secs(3),
            )
            .await
            .err()
        });
        let err = err.expect("nothing listens there");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
