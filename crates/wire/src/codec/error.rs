//! Why a received frame was refused.
//!
//! Owns: `DecodeError`, one variant per rule in PROTOCOL.md "Validation we
//! apply on receive", each naming the field and the offending value so the
//! log line that closes a connection says exactly what the peer did wrong.
//!
//! Must never: decide what happens next (closing the connection is the
//! session's call).

use super::message::MessageType;

/// A frame or payload that breaks the protocol. Any of these closes the one
/// connection it arrived on.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Header byte 0 is not 1.
    #[error("unsupported protocol version {0} (expected 1)")]
    Version(u8),
    /// Header byte 3 names no known message.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Header length field above the 1188-byte limit.
    #[error("payload length {0} exceeds the maximum of {max}", max = super::MAX_PAYLOAD)]
    PayloadTooLong(usize),
    /// The protobuf payload does not parse.
    #[error("{} payload is not valid protobuf: {source}", msg_type.name())]
    Protobuf {
        /// The message type the header announced.
        msg_type: MessageType,
        /// What prost found wrong.
        source: prost::DecodeError,
    },
    /// KEEPALIVE must be empty.
    #[error("KEEPALIVE carries a {0}-byte payload (must be empty)")]
    KeepalivePayload(usize),
    /// An enum field holds a number the schema does not define.
    #[error("{field} has unknown value {value}")]
    UnknownEnum {
        /// The schema field, e.g. `Update.action`.
        field: &'static str,
        /// The number received.
        value: i32,
    },
    /// A VNI field above 2^24 - 1.
    #[error("{field} {value} is out of range (VNIs are 24-bit)")]
    VniOutOfRange {
        /// The schema field, e.g. `Subscription.vni`.
        field: &'static str,
        /// The number received.
        value: u32,
    },
    /// UPDATE without its Destination.
    #[error("UPDATE has no destination")]
    MissingDestination,
    /// UPDATE without its NextHop.
    #[error("UPDATE has no next hop")]
    MissingNextHop,
    /// Prefix byte count does not match ipVersion (4 bytes for IPv4, 16 for IPv6).
    #[error("Destination.prefix has {len} bytes but ipVersion is IPv{ip_version}")]
    PrefixBytes {
        /// The address family the message claims (4 or 6).
        ip_version: u8,
        /// The prefix bytes received.
        len: usize,
    },
    /// Prefix length beyond the family's address size.
    #[error("Destination.prefixLength {len} is too long for IPv{family}")]
    PrefixLength {
        /// The address family (4 or 6).
        family: u8,
        /// The prefix length received.
        len: u32,
    },
    /// Next-hop address neither 4 nor 16 bytes.
    #[error("NextHop.targetAddress has {0} bytes (expected 4 or 16)")]
    NextHopBytes(usize),
    /// NAT range with from > to or a bound above 65535.
    #[error("NAT port range {from}-{to} is invalid (need from <= to <= 65535)")]
    NatPortRange {
        /// First port received.
        from: u32,
        /// Last port received.
        to: u32,
    },
}
