//! The async face of the sink: present-set changes as a `Stream`.
//!
//! Owns: `ChangeStream` (the receiving end, a `futures_core::Stream` of
//! `PresentChange` that also has blocking receives for sync code) and
//! `ChannelSink` (the `RouteSink` the delivery thread feeds it through).
//!
//! Must never: tie the client to one async runtime. The channel is
//! `async-channel`, which works under tokio, smol, async-std or a plain
//! `block_on`; the sending side runs on the client's delivery thread, so a
//! full channel makes the delivery thread (and, past the client's
//! high-water mark, the server threads) wait, never a caller.

use std::pin::Pin;
use std::task::{Context, Poll};

use super::present::PresentChange;
use super::RouteSink;
use metalbond_wire::types::{IpNet, NextHop, Route, Vni};

/// Default capacity of `Client::with_stream`'s channel (changes).
pub const DEFAULT_STREAM_CAPACITY: usize = 4096;

/// Present-set changes, in the order the client made them, as a `Stream`
/// (for async code: `while let Some(change) = stream.next().await`) or by
/// blocking receives (`recv_blocking`). Made by `Client::with_stream`.
///
/// The stream ends (`None`) after the client has shut down and every change
/// queued before has been received. Dropping it makes the client discard
/// later changes (the session state and `Client::routes` keep going).
#[derive(Debug)]
pub struct ChangeStream {
    /// The receiving end of the channel the delivery thread sends into
    /// (boxed: it is not `Unpin`, the stream should be).
    receiver: Pin<Box<async_channel::Receiver<PresentChange>>>,
}

impl ChangeStream {
    /// The next change, waiting for it; `None` once the client has shut
    /// down and everything was received. Blocks the calling thread: for
    /// async code use the `Stream` implementation (or `recv`) instead.
    pub fn recv_blocking(&self) -> Option<PresentChange> {
        self.receiver.recv_blocking().ok()
    }

    /// The next change, awaited (runtime-agnostic); `None` once the client
    /// has shut down and everything was received.
    pub async fn recv(&self) -> Option<PresentChange> {
        self.receiver.recv().await.ok()
    }

    /// The next change if one is waiting, without waiting.
    pub fn try_recv(&self) -> Option<PresentChange> {
        self.receiver.try_recv().ok()
    }

    /// Changes waiting to be received.
    pub fn len(&self) -> usize {
        self.receiver.len()
    }

    /// No change is waiting.
    pub fn is_empty(&self) -> bool {
        self.receiver.is_empty()
    }
}

impl futures_core::Stream for ChangeStream {
    type Item = PresentChange;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PresentChange>> {
        self.receiver.as_mut().poll_next(cx)
    }
}

/// The sink behind a `ChangeStream`: sends each change into the channel,
/// waiting while it is full (on the delivery thread, never a caller's).
pub(super) struct ChannelSink {
    /// The sending end; closed when the stream is dropped.
    sender: async_channel::Sender<PresentChange>,
    /// The stream was dropped: discard quietly from now on.
    gone: bool,
}

impl ChannelSink {
    /// A bounded channel of `capacity` changes (at least 1).
    pub(super) fn channel(capacity: usize) -> (ChannelSink, ChangeStream) {
        let (sender, receiver) = async_channel::bounded(capacity.max(1));
        (
            ChannelSink {
                sender,
                gone: false,
            },
            ChangeStream {
                receiver: Box::pin(receiver),
            },
        )
    }

    fn send(&mut self, change: PresentChange) {
        if !self.gone && self.sender.send_blocking(change).is_err() {
            tracing::info!("the change stream was dropped; later changes are discarded");
            self.gone = true;
        }
    }
}

impl RouteSink for ChannelSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.send(PresentChange::Add(Route::new(vni, destination, next_hop)));
    }

    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.send(PresentChange::Remove(Route::new(
            vni,
            destination,
            next_hop,
        )));
    }
}
