//! TCP-MD5 keys on the listening sockets: what the policy's `auth` rules
//! ask for, installed per peer prefix so that an unsigned or wrongly
//! signed SYN from those prefixes never becomes a connection.
//!
//! Owns: a duplicate descriptor of every listening socket (the shards own
//! the sockets themselves; a key set through either descriptor is the
//! socket's), the keys installed now, and moving them to what a policy
//! wants: keys of prefixes no longer keyed are removed, new and changed
//! ones installed. Accepted connections carry the keys they were accepted
//! with; the sessions whose rule's key changed are closed by the session
//! itself (`peer::reapply_policy`).
//!
//! Must never: show a key (only prefixes and listen addresses appear in
//! errors and logs), or touch an accepted connection.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Mutex;

use metalbond_utils::tcp_md5::{install_key, Md5Key};
use metalbond_utils::LockOrRecover;
use metalbond_wire::types::IpNet;

use super::ServerError;

/// The listening sockets' keys.
pub(crate) struct ListenerKeys {
    /// Each listening socket (a duplicate descriptor) and its address.
    sockets: Vec<(std::net::TcpListener, SocketAddr)>,
    /// Keyed prefixes installed now.
    installed: Mutex<Vec<(IpNet, Md5Key)>>,
}

impl ListenerKeys {
    /// Keeps duplicates of `listeners` (bound to `addrs`) and installs
    /// `keys`.
    pub(crate) fn install(
        listeners: &[std::net::TcpListener],
        addrs: &[SocketAddr],
        keys: Vec<(IpNet, Md5Key)>,
    ) -> Result<ListenerKeys, ServerError> {
        let mut sockets = Vec::with_capacity(listeners.len());
        for (l, addr) in listeners.iter().zip(addrs) {
            let dup = l.try_clone().map_err(|source| ServerError::Listen {
                addr: *addr,
                source,
            })?;
            sockets.push((dup, *addr));
        }
        let this = ListenerKeys {
            sockets,
            installed: Mutex::new(Vec::new()),
        };
        this.apply(keys).map_err(|(prefix, addr, e)| {
            ServerError::Config(format!(
                "cannot install the TCP-MD5 key for peers {prefix} on {addr}: {e}"
            ))
        })?;
        Ok(this)
    }

    /// Moves the sockets to `wanted`: removes keys of prefixes no longer
    /// keyed, installs new and changed ones. On an error (the prefix, the
    /// listen address and the cause) the keys applied so far stay.
    pub(crate) fn apply(
        &self,
        wanted: Vec<(IpNet, Md5Key)>,
    ) -> Result<(), (IpNet, SocketAddr, std::io::Error)> {
        let mut installed = self.installed.lock_or_recover();
        let gone: Vec<IpNet> = installed
            .iter()
            .filter(|(p, _)| !wanted.iter().any(|(q, _)| q == p))
            .map(|(p, _)| *p)
            .collect();
        for prefix in gone {
            for (socket, addr) in &self.sockets {
                install_key(socket.as_fd(), addr.is_ipv6(), prefix, None)
                    .map_err(|e| (prefix, *addr, e))?;
            }
            installed.retain(|(p, _)| *p != prefix);
            tracing::info!(peers = %prefix, "TCP-MD5 key removed");
        }
        for (prefix, key) in wanted {
            if installed.iter().any(|(p, k)| *p == prefix && *k == key) {
                continue;
            }
            for (socket, addr) in &self.sockets {
                install_key(socket.as_fd(), addr.is_ipv6(), prefix, Some(&key))
                    .map_err(|e| (prefix, *addr, e))?;
            }
            let changed = installed.iter().any(|(p, _)| *p == prefix);
            installed.retain(|(p, _)| *p != prefix);
            installed.push((prefix, key));
            tracing::info!(
                peers = %prefix,
                "TCP-MD5 key {}",
                if changed { "changed" } else { "installed" }
            );
        }
        Ok(())
    }
}
