//! `PeerId`: a connection's identity across shards.
//!
//! Owns: the id's layout (shard index in the high bits, a per-shard sequence
//! number below), so an owner can address a subscriber's shard without a
//! lookup.
//!
//! Must never: depend on any other server module; everything else in the
//! server names peers by this type.

/// A connection's identity across shards: the shard holding it and a
/// per-shard sequence number, so an owner can address a subscriber's shard
/// without a lookup.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PeerId(u64);

impl PeerId {
    /// Bits of the sequence number.
    const SEQ_BITS: u32 = 48;

    /// The `seq`-th peer of shard `shard`.
    pub fn new(shard: usize, seq: u64) -> PeerId {
        PeerId(((shard as u64) << Self::SEQ_BITS) | (seq & ((1 << Self::SEQ_BITS) - 1)))
    }

    /// The shard holding the connection.
    pub fn shard(self) -> usize {
        (self.0 >> Self::SEQ_BITS) as usize
    }

    /// The id as one number, for tables that store it packed.
    pub(crate) fn to_bits(self) -> u64 {
        self.0
    }

    /// The id `to_bits` gave.
    pub(crate) fn from_bits(bits: u64) -> PeerId {
        PeerId(bits)
    }

    /// The per-shard sequence number (for log fields).
    pub fn seq(self) -> u64 {
        self.0 & ((1 << Self::SEQ_BITS) - 1)
    }
}

impl std::fmt::Display for PeerId {
    /// `shard.seq`, e.g. `1.42`: short for log fields.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.shard(), self.seq())
    }
}
