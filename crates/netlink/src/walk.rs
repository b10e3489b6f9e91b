//! The one way this crate walks netlink bytes it received: messages in a
//! datagram and attributes (TLVs) in a payload, both through
//! netlink-packet-core's checked buffers (`NetlinkBuffer`, `NlasIterator` /
//! `NlaBuffer`), so every length field is checked before a byte is read.
//!
//! Owns: where one message or attribute ends and the next begins, and what
//! counts as malformed (a length field shorter than its header or longer than
//! the bytes left).
//!
//! Must never: interpret a message or an attribute (callers match on types),
//! panic on kernel input, or read past a length field.

use netlink_packet_core::{DecodeError, NetlinkBuffer, NlaBuffer, NlasIterator, NLA_HEADER_SIZE};

/// Netlink messages and attributes start on 4-byte boundaries
/// (`NLMSG_ALIGNTO`, `NLA_ALIGNTO`).
const ALIGN_TO: usize = 4;

/// `len` rounded up to the next 4-byte boundary.
const fn align4(len: usize) -> usize {
    (len + ALIGN_TO - 1) & !(ALIGN_TO - 1)
}

/// The attributes in `bytes`, in order. A tail shorter than an attribute
/// header ends the walk quietly (trailing padding, or a partial header the
/// kernel never sends); any other malformed attribute is yielded once as
/// `Err` and ends the walk, so callers choose between "refuse the message"
/// and "stop here".
pub(super) fn attributes(
    bytes: &[u8],
) -> impl Iterator<Item = Result<NlaBuffer<&[u8]>, DecodeError>> + '_ {
    // Bytes the iterator has stepped over, to tell a short tail from a bad
    // length field (netlink-packet-core reports both as a `DecodeError`).
    let mut walked = 0usize;
    NlasIterator::new(bytes).map_while(move |attribute| match attribute {
        Ok(attribute) => {
            walked += align4(usize::from(attribute.length()));
            Some(Ok(attribute))
        }
        Err(_) if bytes.len().saturating_sub(walked) < NLA_HEADER_SIZE => None,
        Err(e) => Some(Err(e)),
    })
}

/// One netlink message inside a received datagram.
pub(super) struct RawMessage<'a> {
    /// nlmsg_type (NLMSG_ERROR, RTM_NEWROUTE, ...).
    pub message_type: u16,
    /// nlmsg_flags (multipart, capped, ack TLVs).
    pub flags: u16,
    /// nlmsg_seq, matched against our requests.
    pub seq: u32,
    /// Bytes after the header.
    pub payload: &'a [u8],
}

/// Walks the messages of one datagram, stopping at the first malformed one
/// (a truncated header, or a length field shorter than the header or longer
/// than the bytes left).
pub(super) struct Messages<'a> {
    /// Bytes not yet walked.
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    /// Walks `datagram` from its first byte.
    pub(super) fn new(datagram: &'a [u8]) -> Self {
        Messages { rest: datagram }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = RawMessage<'a>;

    fn next(&mut self) -> Option<RawMessage<'a>> {
        let Ok(message) = NetlinkBuffer::new_checked(self.rest) else {
            self.rest = &[];
            return None;
        };
        let raw = RawMessage {
            message_type: message.message_type(),
            flags: message.flags(),
            seq: message.sequence_number(),
            payload: message.payload(),
        };
        let next = align4(message.length() as usize).min(self.rest.len());
        self.rest = &self.rest[next..];
        Some(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One attribute: header (`len` as written, possibly a lie) + data + pad.
    fn attribute(len: u16, kind: u16, data: &[u8]) -> Vec<u8> {
        let mut v = len.to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn attributes_are_walked_with_padding_skipped() {
        let mut bytes = attribute(5, 1, &[7]);
        bytes.extend(attribute(8, 2 | 0x8000, &[1, 2, 3, 4]));
        let walked: Vec<_> = attributes(&bytes)
            .map(|a| {
                let a = a.unwrap();
                (a.kind(), a.value().to_vec())
            })
            .collect();
        assert_eq!(walked, vec![(1, vec![7]), (2, vec![1, 2, 3, 4])]);
    }

    #[test]
    fn a_short_tail_ends_the_walk_quietly() {
        let mut bytes = attribute(8, 1, &[1, 2, 3, 4]);
        bytes.extend_from_slice(&[8, 0]);
        let walked: Vec<_> = attributes(&bytes).collect();
        assert_eq!(walked.len(), 1);
        assert!(walked[0].is_ok());
        assert_eq!(attributes(&[]).count(), 0);
        assert_eq!(attributes(&[1, 2, 3]).count(), 0);
    }

    #[test]
    fn a_bad_length_is_one_error_then_the_end() {
        for bad_len in [3u16, 200] {
            let mut bytes = attribute(8, 1, &[1, 2, 3, 4]);
            bytes.extend(attribute(bad_len, 2, &[1, 2, 3, 4]));
            bytes.extend(attribute(8, 3, &[1, 2, 3, 4]));
            let walked: Vec<_> = attributes(&bytes).collect();
            assert_eq!(walked.len(), 2, "length {bad_len}");
            assert!(walked[0].is_ok());
            assert!(walked[1].is_err());
        }
    }
}
