//! Encode once, send to many: the buffers an owner shard hands to the shards
//! holding subscribers.
//!
//! Owns: `FanoutBuilder` (appends UPDATE frames for one VNI into one buffer,
//! remembering which peer each run of frames came from) and `FanoutBatch`
//! (the frozen, reference-counted result). A subscriber gets the batch minus
//! the runs it originated itself (PROTOCOL.md: never echo to the origin), as
//! slices of the same shared buffer: no per-subscriber copy or encode.
//!
//! Must never: decide who subscribes, or touch sockets.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::PeerId;
use metalbond_wire::codec::{encode_frame, FrameDecoder, Message, HEADER_LEN};
use metalbond_wire::types::{Action, Route};

/// A run of consecutive frames in a batch that share an origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginRun {
    /// The peer whose UPDATE caused these frames (`None`: a sync chunk or a
    /// change with no origin to skip).
    pub origin: Option<PeerId>,
    /// Offset just past the run's last byte.
    pub end: u32,
    /// Frames in the run.
    pub frames: u32,
}

/// Encoded UPDATE frames shared by every subscriber that must get them.
#[derive(Clone, Debug)]
pub struct FanoutBatch {
    /// Concatenated frames.
    pub frames: Bytes,
    /// Who originated which part, in order, covering `frames` exactly.
    pub runs: Arc<[OriginRun]>,
    /// When the owner took the batch's first change: the start of the
    /// fan-out latency the writers record (`metalbond_fanout_latency_seconds`).
    pub born: Instant,
}

impl FanoutBatch {
    /// Total frames in the batch.
    pub fn frame_count(&self) -> usize {
        self.runs.iter().map(|r| r.frames as usize).sum()
    }

    /// The parts `peer` must receive (everything not originated by it), as
    /// slices of the shared buffer, and how many frames they hold.
    pub fn parts_for(&self, peer: PeerId) -> (Vec<Bytes>, usize) {
        let mut parts = Vec::new();
        let mut frames = 0usize;
        let mut start = 0usize;
        let mut keep_from: Option<usize> = None;
        for run in self.runs.iter() {
            let end = run.end as usize;
            if run.origin == Some(peer) {
                if let Some(k) = keep_from.take() {
                    parts.push(self.frames.slice(k..start));
                }
            } else {
                frames += run.frames as usize;
                keep_from.get_or_insert(start);
            }
            start = end;
        }
        if let Some(k) = keep_from {
            parts.push(self.frames.slice(k..start));
        }
        (parts, frames)
    }

    /// Decodes the changes `peer` must receive (tests check what each
    /// subscriber sees with it).
    pub fn changes_for(&self, peer: PeerId) -> Vec<(Action, Route)> {
        let (parts, _) = self.parts_for(peer);
        let mut out = Vec::new();
        for part in parts {
            let mut dec = FrameDecoder::new();
            dec.extend(&part);
            // Our own encoder produced these bytes: they always decode.
            while let Ok(Some(msg)) = dec.next_message() {
                if let Message::Update { action, route } = msg {
                    out.push((action, route));
                }
            }
        }
        out
    }
}

/// Accumulates frames for one batch.
#[derive(Debug, Default)]
pub struct FanoutBuilder {
    /// Frames encoded so far.
    buf: BytesMut,
    /// Runs so far (the last one may still grow).
    runs: Vec<OriginRun>,
    /// When the first frame of the current batch was pushed.
    first_push: Option<Instant>,
}

impl FanoutBuilder {
    /// Bytes encoded so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Nothing encoded yet?
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends one UPDATE frame caused by `origin`.
    pub fn push(&mut self, origin: Option<PeerId>, action: Action, route: Route) {
        if self.first_push.is_none() {
            self.first_push = Some(Instant::now());
        }
        encode_frame(&Message::Update { action, route }, &mut self.buf);
        let end = self.buf.len() as u32;
        match self.runs.last_mut() {
            Some(run) if run.origin == origin => {
                run.end = end;
                run.frames += 1;
            }
            _ => self.runs.push(OriginRun {
                origin,
                end,
                frames: 1,
            }),
        }
    }

    /// A sync chunk: `routes`, all as additions, with no origin to skip,
    /// encoded into a buffer of exactly their size. A buffer that grows by
    /// doubling holds up to twice what it carries, and a sync chunk lives
    /// until its subscriber's socket took it: with two thousand peers
    /// subscribing at once that slack was tens of MiB (BENCHMARKS "Sync
    /// chunks in flight").
    pub fn additions(routes: &[Route]) -> FanoutBatch {
        Self::exact(routes.iter().map(|&route| (Action::Add, route)))
    }

    /// A catch-up chunk: `changes`, with no origin to skip, in a buffer of
    /// exactly their size (as `additions`).
    pub fn changes(changes: &[(Action, Route)]) -> FanoutBatch {
        Self::exact(changes.iter().copied())
    }

    fn exact(changes: impl Iterator<Item = (Action, Route)> + Clone) -> FanoutBatch {
        let bytes = changes
            .clone()
            .map(|(action, route)| HEADER_LEN + Message::Update { action, route }.payload_len())
            .sum();
        let mut builder = FanoutBuilder {
            buf: BytesMut::with_capacity(bytes),
            ..FanoutBuilder::default()
        };
        for (action, route) in changes {
            builder.push(None, action, route);
        }
        debug_assert_eq!(builder.buf.len(), bytes);
        builder.finish()
    }

    /// Freezes what was built into a shareable batch and empties the builder.
    pub fn finish(&mut self) -> FanoutBatch {
        let frames = self.buf.split().freeze();
        let runs: Arc<[OriginRun]> = Arc::from(std::mem::take(&mut self.runs));
        let born = self.first_push.take().unwrap_or_else(Instant::now);
        FanoutBatch { frames, runs, born }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::types::{NextHop, Vni};

    fn route(i: u8) -> Route {
        Route::new(
            Vni::new(1).unwrap(),
            format!("10.0.{i}.0/24").parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    #[test]
    fn origin_runs_are_cut_out_for_their_origin_only() {
        let a = PeerId::new(0, 1);
        let b = PeerId::new(1, 2);
        let mut fb = FanoutBuilder::default();
        fb.push(Some(a), Action::Add, route(1));
        fb.push(Some(a), Action::Add, route(2));
        fb.push(Some(b), Action::Add, route(3));
        fb.push(Some(a), Action::Remove, route(1));
        let batch = fb.finish();
        assert!(fb.is_empty());
        assert_eq!(batch.frame_count(), 4);
        assert_eq!(batch.runs.len(), 3);

        let (parts, frames) = batch.parts_for(a);
        assert_eq!(frames, 1);
        assert_eq!(parts.len(), 1);
        assert_eq!(batch.changes_for(a), vec![(Action::Add, route(3))]);

        let (parts, frames) = batch.parts_for(b);
        assert_eq!((parts.len(), frames), (2, 3));
        assert_eq!(
            batch.changes_for(b),
            vec![
                (Action::Add, route(1)),
                (Action::Add, route(2)),
                (Action::Remove, route(1))
            ]
        );

        let other = PeerId::new(0, 3);
        let (parts, frames) = batch.parts_for(other);
        assert_eq!((parts.len(), frames), (1, 4));
        assert_eq!(parts[0], batch.frames, "whole buffer, shared");
    }
}
