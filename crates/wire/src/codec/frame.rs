//! Framing: `[version=1][length u16 BE][type][payload]`.
//!
//! Owns: the header layout and the streaming `FrameDecoder`, which accepts
//! bytes split anywhere (half a header, many frames in one read) and yields
//! validated messages; and `encode_frame`, which appends one frame to a
//! caller's buffer without allocating.
//!
//! Must never: read or write sockets; the caller decides where bytes come
//! from and go to.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::DecodeError;
use super::message::{Message, MessageType};

/// The only protocol version there is.
pub const VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;
/// Largest payload: the whole message fits one IPv6 minimum-MTU segment.
pub const MAX_PAYLOAD: usize = 1188;
/// Largest frame, header included.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;

/// Appends `msg` as one frame to `buf` and returns the frame's length.
///
/// Cannot fail: the largest message this crate can express (an IPv6 NAT
/// UPDATE) is under 100 bytes, far below `MAX_PAYLOAD`; a test pins that.
pub fn encode_frame(msg: &Message, buf: &mut impl BufMut) -> usize {
    let len = msg.payload_len();
    debug_assert!(len <= MAX_PAYLOAD);
    buf.put_u8(VERSION);
    buf.put_u16(len as u16);
    buf.put_u8(msg.message_type() as u8);
    msg.encode_payload(buf);
    HEADER_LEN + len
}

/// Length of the frame `bytes` starts with, header included (what its
/// header says; `bytes.len()` if not even a header is there).
pub fn first_frame_len(bytes: &[u8]) -> usize {
    match bytes {
        [_, hi, lo, _, ..] => HEADER_LEN + usize::from(u16::from_be_bytes([*hi, *lo])),
        _ => bytes.len(),
    }
}

/// A run of whole frames at the start of a buffer (see `whole_frames_prefix`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameSpan {
    /// Bytes of the run.
    pub bytes: usize,
    /// Frames in it.
    pub frames: usize,
    /// Of which UPDATEs.
    pub updates: usize,
}

/// The longest run of whole frames at the start of `bytes` that is at most
/// `limit` bytes long. `bytes` must start at a frame boundary and hold
/// frames this crate encoded (the writer's own output); a header that
/// claims more than the rest stops the walk there.
///
/// Why: a deployed Go peer parses every read as whole frames (PROTOCOL.md,
/// "What a deployed Go peer can take"), so a writer pacing its output to
/// such a peer cuts writes at frame boundaries, never inside a frame.
pub fn whole_frames_prefix(bytes: &[u8], limit: usize) -> FrameSpan {
    let mut span = FrameSpan::default();
    while bytes.len() - span.bytes >= HEADER_LEN {
        let at = span.bytes;
        let len = HEADER_LEN + usize::from(u16::from_be_bytes([bytes[at + 1], bytes[at + 2]]));
        if at + len > limit || at + len > bytes.len() {
            break;
        }
        span.bytes += len;
        span.frames += 1;
        if bytes[at + 3] == MessageType::Update as u8 {
            span.updates += 1;
        }
    }
    span
}

/// Outgoing frames gathered for one write, with the counts a status page
/// wants (frames, UPDATEs) kept as they are appended, so that nobody has to
/// walk the bytes again to learn what was sent.
#[derive(Default, Debug)]
pub struct FrameBuffer {
    /// The encoded frames, back to back.
    bytes: Vec<u8>,
    /// Frames in `bytes`.
    frames: u64,
    /// UPDATE frames among them.
    updates: u64,
}

impl FrameBuffer {
    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> FrameBuffer {
        FrameBuffer {
            bytes: Vec::with_capacity(capacity),
            frames: 0,
            updates: 0,
        }
    }

    /// Appends `msg` as one frame.
    pub fn push(&mut self, msg: &Message) {
        encode_frame(msg, &mut self.bytes);
        self.frames += 1;
        if msg.message_type() == MessageType::Update {
            self.updates += 1;
        }
    }

    /// The encoded frames.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Frames appended since the last `clear`.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// UPDATE frames appended since the last `clear`.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Nothing to write?
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Forgets the frames (after they were written), keeping the allocation.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.frames = 0;
        self.updates = 0;
    }
}

/// Turns a byte stream into messages.
///
/// Feed it with `extend` as bytes arrive, then call `next_message` until it
/// returns `Ok(None)` (needs more bytes). After an `Err` the stream is out of
/// sync for good: the caller must close the connection and drop the decoder.
#[derive(Default, Debug)]
pub struct FrameDecoder {
    /// Received bytes not yet decoded; at most one partial frame plus
    /// whatever the last `extend` added.
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes as they came off the wire.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed (a partial frame, or frames not
    /// yet pulled out).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    ///
    /// A bad header is reported as soon as its 4 bytes are in, without
    /// waiting for a payload that may never come.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        match self.next_frame()? {
            Some((msg_type, payload)) => Message::decode(msg_type, payload).map(Some),
            None => Ok(None),
        }
    }

    /// The next complete frame with its header checked but its payload not
    /// decoded, `Ok(None)` when more bytes are needed. For a receiver that
    /// recognises payloads it expects by their bytes (the load generator)
    /// and decodes the rest with `Message::decode`.
    pub fn next_frame(&mut self) -> Result<Option<(MessageType, Bytes)>, DecodeError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
        if header[0] != VERSION {
            return Err(DecodeError::Version(header[0]));
        }
        let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
        let msg_type =
            MessageType::from_byte(header[3]).ok_or(DecodeError::UnknownType(header[3]))?;
        if len > MAX_PAYLOAD {
            return Err(DecodeError::PayloadTooLong(len));
        }
        if self.buf.len() < HEADER_LEN + len {
            // Make room for the rest of this frame in one go.
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        Ok(Some((msg_type, self.buf.split_to(len).freeze())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_frames_prefix_stops_at_the_last_frame_that_fits() {
        let vni = crate::types::Vni::new(7).unwrap();
        let mut wire = Vec::new();
        let a = encode_frame(&Message::Keepalive, &mut wire);
        let b = encode_frame(&Message::Subscribe(vni), &mut wire);
        let c = encode_frame(&Message::Keepalive, &mut wire);
        let route = crate::types::Route::new(
            vni,
            "10.0.0.0/24".parse().unwrap(),
            crate::types::NextHop::standard("2001:db8::1".parse().unwrap()),
        );
        let d = encode_frame(
            &Message::Update {
                action: crate::types::Action::Add,
                route,
            },
            &mut wire,
        );
        assert_eq!(first_frame_len(&wire), a);
        assert_eq!(first_frame_len(&wire[a..]), b);
        let span = |bytes, frames, updates| FrameSpan {
            bytes,
            frames,
            updates,
        };
        assert_eq!(whole_frames_prefix(&wire, 0), span(0, 0, 0));
        assert_eq!(whole_frames_prefix(&wire, a), span(a, 1, 0));
        assert_eq!(
            whole_frames_prefix(&wire, a + b - 1),
            span(a, 1, 0),
            "never half a frame"
        );
        assert_eq!(whole_frames_prefix(&wire, a + b), span(a + b, 2, 0));
        assert_eq!(
            whole_frames_prefix(&wire, usize::MAX),
            span(a + b + c + d, 4, 1)
        );
        assert_eq!(
            whole_frames_prefix(&wire[..a + b - 1], usize::MAX),
            span(a, 1, 0),
            "a truncated frame is not counted"
        );
    }

    #[test]
    fn next_frame_hands_out_raw_payloads_split_anywhere() {
        let mut wire = Vec::new();
        encode_frame(&Message::Keepalive, &mut wire);
        let sub = Message::Subscribe(crate::types::Vni::new(23).unwrap());
        encode_frame(&sub, &mut wire);
        let mut d = FrameDecoder::new();
        d.extend(&wire[..5]);
        let (t, p) = d.next_frame().unwrap().unwrap();
        assert_eq!((t, p.len()), (MessageType::Keepalive, 0));
        assert_eq!(d.next_frame().unwrap(), None);
        d.extend(&wire[5..]);
        let (t, p) = d.next_frame().unwrap().unwrap();
        assert_eq!(t, MessageType::Subscribe);
        assert_eq!(Message::decode(t, p).unwrap(), sub);
        assert_eq!(d.next_frame().unwrap(), None);
        d.extend(&[2, 0, 0, 2]);
        assert!(matches!(d.next_frame(), Err(DecodeError::Version(2))));
    }

    #[test]
    fn frame_buffer_counts_frames_and_updates_and_matches_encode_frame() {
        let vni = crate::types::Vni::new(7).unwrap();
        let route = crate::types::Route::new(
            vni,
            "10.0.0.0/24".parse().unwrap(),
            crate::types::NextHop::standard("2001:db8::1".parse().unwrap()),
        );
        let msgs = [
            Message::Keepalive,
            Message::Subscribe(vni),
            Message::Update {
                action: crate::types::Action::Add,
                route,
            },
        ];
        let mut buf = FrameBuffer::with_capacity(64);
        let mut wire = Vec::new();
        for m in &msgs {
            buf.push(m);
            encode_frame(m, &mut wire);
        }
        assert_eq!((buf.frames(), buf.updates()), (3, 1));
        assert_eq!(buf.as_bytes(), &wire[..]);
        buf.clear();
        assert!(buf.is_empty());
        assert_eq!((buf.frames(), buf.updates()), (0, 0));
    }
}
