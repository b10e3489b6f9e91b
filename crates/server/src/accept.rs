//! The accept loops: new connections in, handed round-robin to the shards,
//! under `--max-peers`.
//!
//! Owns: accepting on a listening socket, the `--max-peers` decision for
//! each new connection (a place, a place in place of an evicted handshake,
//! or a refusal), the rate-limited warnings about refusals and failed
//! accepts, and taking the socket out of LISTEN at shutdown.
//!
//! Must never: run a peer's session (the receiving shard does), stop before
//! shutdown, or import `shard` (local hand-overs go through a callback).

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;

use glommio::net::{AcceptedTcpStream, TcpStream};

use super::admission::{Admit, PeerSlot};
use super::connection::Listener;
use super::context::ShardContext;
use super::mesh::ShardMsg;
use super::PeerId;

/// A connection just accepted, on its way to the shard that will run it.
pub(crate) enum Accepted {
    /// Accepted by glommio (io_uring), not yet bound to an executor.
    Uring(AcceptedTcpStream),
    /// Taken from the backlog right after (`Listener::accept_ready`).
    Drained(OwnedFd),
}

impl Accepted {
    /// The connection as a stream of the calling shard's executor.
    pub(crate) fn bind(self) -> TcpStream {
        match self {
            Accepted::Uring(stream) => stream.bind_to_executor(),
            // SAFETY: the descriptor is a connected TCP socket we own; the
            // stream owns it from now on.
            Accepted::Drained(fd) => unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) },
        }
    }

    /// The remote address, for a refusal's warning.
    fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Accepted::Uring(stream) => stream.peer_addr().ok(),
            Accepted::Drained(fd) => socket2::SockRef::from(fd)
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket()),
        }
    }
}

/// What an accept loop hands to its own shard (other shards get the same
/// as a `ShardMsg`).
pub(crate) enum Handover {
    /// A new connection for this shard, with its place under `--max-peers`.
    Connection(Accepted, PeerSlot),
    /// Evict this peer of this shard if it is still in its handshake.
    Evict(PeerId),
}

/// How often a shard logs that it refuses connections (`--max-peers`) or
/// that accepting fails (out of file descriptors).
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);
/// How long an accept loop waits after a failed accept before trying again
/// (out of descriptors: a retry at once would fail at once).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Connections taken from the backlog without io_uring after each io_uring
/// accept, at most (`Listener::accept_ready`). One reactor turn per
/// accepted connection let a region reconnecting at once overflow the
/// 4,096 backlog (19,500 peers: ~90 SYNs dropped, each retransmitted a
/// second later, issue #28).
const DRAIN_BACKLOG: usize = 128;

/// A warning that would repeat many times a second (refused or failed
/// accepts): logged at most once per `ACCEPT_LOG_EVERY`, with the number of
/// occurrences since the last line.
#[derive(Default)]
struct RepeatedWarning {
    /// When the last line was written.
    last: Option<std::time::Instant>,
    /// Occurrences not yet reported.
    unlogged: u64,
}

impl RepeatedWarning {
    /// Counts one occurrence; returns how many to report if a line is due.
    fn occurred(&mut self) -> Option<u64> {
        self.unlogged += 1;
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now - t < ACCEPT_LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Accepts connections and hands them round-robin to the shards. Above
/// `--max-peers` the oldest connection still in its handshake is closed to
/// make room; when every connection is established, the new one is closed
/// at once, counted, and logged at most once per `ACCEPT_LOG_EVERY`. A
/// failed accept (out of file descriptors) backs off and is logged the same
/// way; the loop never stops before shutdown. Connections and evictions for
/// this very shard go to `local` (the shard handles them at once); others
/// travel through the shard's outbox.
pub(crate) async fn accept_loop(
    shard: Rc<ShardContext>,
    listener: Listener,
    start: usize,
    local: impl Fn(Handover),
) {
    let mut next = start;
    let mut refusals = RepeatedWarning::default();
    let mut failures = RepeatedWarning::default();
    // Gives a new connection its place under `--max-peers` and its shard.
    let mut place = |stream: Accepted| {
        let slot = match shard.admission().admit() {
            Admit::Slot(slot) => slot,
            Admit::InPlaceOf { slot, evict } => {
                if evict.shard() == shard.index() {
                    local(Handover::Evict(evict));
                } else {
                    shard.send(evict.shard(), ShardMsg::Evict(evict));
                }
                slot
            }
            Admit::Refused => {
                shard.counters().connection_refused();
                if let Some(refused) = refusals.occurred() {
                    let peer = stream.peer_addr();
                    tracing::warn!(
                        ?peer,
                        refused,
                        max_peers = shard.admission().max(),
                        "connection refused: --max-peers reached"
                    );
                }
                // An `AcceptedTcpStream` does not close its fd when
                // dropped; a bound `TcpStream` does.
                drop(stream.bind());
                return;
            }
        };
        let dest = next % shard.shards();
        next = next.wrapping_add(1);
        if dest == shard.index() {
            local(Handover::Connection(stream, slot));
        } else {
            shard.send(dest, ShardMsg::Connection(stream, slot));
        }
    };
    loop {
        if shard.is_shutting_down() {
            break;
        }
        let accepted = future::or(
            async { Some(listener.accept.shared_accept().await) },
            async {
                shard.shutdown_event().wait().await;
                None
            },
        )
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                // E.g. out of file descriptors: log, back off, keep serving.
                if let Some(failed) = failures.occurred() {
                    tracing::warn!(error = %e, failed, "accept failed; retrying");
                }
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        place(Accepted::Uring(stream));
        // The rest of the backlog, without a reactor turn each.
        for _ in 0..DRAIN_BACKLOG {
            match listener.accept_ready() {
                Ok(Some(fd)) => place(Accepted::Drained(fd)),
                Ok(None) => break,
                Err(e) => {
                    if let Some(failed) = failures.occurred() {
                        tracing::warn!(error = %e, failed, "accept failed; retrying");
                    }
                    break;
                }
            }
        }
        glommio::yield_if_needed().await;
    }
    // Dropping the listener closes the socket, but an accept queued in
    // io_uring would keep it listening (see `stop_listening`).
    listener.close();
}
