//! What primary and replicas say to each other.

use bytes::Bytes;

use crate::bitmap::RegionSet;

/// A node of the replication protocol: the cluster's node id (`cluster::state::NodeId`),
/// converted at the serving layer, so a node id is never mistaken for an epoch, a
/// sequence number or an offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for NodeId {
    fn from(id: u64) -> NodeId {
        NodeId(id)
    }
}
/// A primary term; raised by the control plane at every promotion. A message from an
/// older epoch is refused (docs/design-notes.md, "Epochs").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// Position in one primary→replica stream (per epoch, per replica; starts at 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

impl Epoch {
    /// The epoch a promotion raises this one to.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `n` positions further along the stream.
impl std::ops::Add<u64> for Seq {
    type Output = Seq;
    fn add(self, n: u64) -> Seq {
        Seq(self.0 + n)
    }
}

impl std::ops::AddAssign<u64> for Seq {
    fn add_assign(&mut self, n: u64) {
        self.0 += n;
    }
}

/// `n` positions back (saturating at 0, "nothing yet").
impl std::ops::Sub<u64> for Seq {
    type Output = Seq;
    fn sub(self, n: u64) -> Seq {
        Seq(self.0.saturating_sub(n))
    }
}

/// What one position of a write stream carries: it is ordered, logged, acknowledged
/// and retransmitted the same way whatever it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Bytes to write at the offset.
    Data(Bytes),
    /// Deallocate this many bytes at the offset (UNMAP, WRITE SAME with UNMAP, SANITIZE
    /// BLOCK ERASE): every member's store punches the range, which then reads as zeroes
    /// (SBC-3 5.5.1, LBPRZ). It takes the place of a write of zeroes in the stream, so it
    /// is ordered against the writes around it exactly as they are.
    Deallocate(u64),
    /// A flush barrier (no data): make everything applied so far durable before
    /// acknowledging this position (SYNCHRONIZE CACHE, FUA).
    Flush,
    /// Take the snapshot of this name here: a copy of the volume holding every write
    /// before this position and none after it, on every member at the same point of
    /// the stream (a crash-consistent snapshot; issue 21).
    Snapshot(String),
    /// Make the volume what snapshot `snapshot` holds: every member replaces its copy
    /// with its copy of the snapshot here. It changes every one of the `len` bytes of
    /// the volume as far as logs and resyncs go (a member without the snapshot is
    /// resynced in full).
    Rollback {
        /// The snapshot.
        snapshot: String,
        /// The volume's size.
        len: u64,
    },
}

impl Payload {
    /// How many bytes of the volume it changes (none for a barrier).
    pub fn len(&self) -> u64 {
        match self {
            Payload::Data(d) => d.len() as u64,
            Payload::Deallocate(n) | Payload::Rollback { len: n, .. } => *n,
            Payload::Flush | Payload::Snapshot(_) => 0,
        }
    }

    /// Whether it changes no byte of the volume.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is a flush barrier.
    pub fn is_flush(&self) -> bool {
        matches!(self, Payload::Flush)
    }
}

/// A replication message. Every message carries the sender's epoch; a replica refuses
/// anything older than the highest epoch it has persisted. (The wire encoding is the
/// transport's business: a binary frame, the data without a copy.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Primary → replica: join my stream at `next_seq` in `epoch`; report the regions
    /// you may hold unacknowledged writes in.
    Seal {
        /// The primary's epoch.
        epoch: Epoch,
        /// The seq of the first write that will follow.
        next_seq: Seq,
    },
    /// Replica → primary: sealed at `epoch`; these regions may differ from yours.
    SealAck {
        /// The epoch sealed.
        epoch: Epoch,
        /// The replica's activity log: regions of writes it applied that it does not
        /// know to be on every in-sync member.
        divergent: RegionSet,
    },
    /// Primary → replica: apply `payload` at `offset`, after every lower seq.
    Write {
        /// The primary's epoch.
        epoch: Epoch,
        /// Position in this replica's stream.
        seq: Seq,
        /// Byte offset.
        offset: u64,
        /// What to apply there.
        payload: Payload,
        /// Every write of this stream up to this seq is on every in-sync member: the
        /// replica may forget those regions from its activity log.
        committed: Seq,
    },
    /// Replica → primary: every write up to `seq` of the `epoch` stream is applied.
    Ack {
        /// The epoch.
        epoch: Epoch,
        /// Cumulative position.
        seq: Seq,
    },
    /// Primary → in-sync replica: the regions each replica outside the in-sync set may
    /// lack (DRBD's per-peer bitmap). Kept on disk by every member, so the one promoted
    /// next resyncs those replicas by region instead of in full. With `full` it
    /// replaces what the replica holds (sent at every seal and when the set shrinks);
    /// otherwise it adds to it, and comes before the write that made a region lacking.
    DirtyMap {
        /// The primary's epoch.
        epoch: Epoch,
        /// Replaces rather than adds.
        full: bool,
        /// Which of this term's maps it is (counted by the primary). Maps are built
        /// under the primary's lock but sent from several threads, so a full map can
        /// arrive after a later addition: a replica replaces its map only with a full
        /// map at least as new as what it holds, and otherwise merges it in.
        generation: u64,
        /// Replica → regions it may lack. The primary itself is listed with none.
        peers: crate::bitmap::DirtyMap,
    },
    /// Primary → replica: send the checksum of `region` once every write before this
    /// message is applied (online verify). Only for a replica sealed into the stream.
    VerifyRequest {
        /// The primary's epoch.
        epoch: Epoch,
        /// Region number.
        region: u64,
    },
    /// Replica → primary: the CRC32C of `region` as this replica holds it.
    VerifyResult {
        /// The epoch.
        epoch: Epoch,
        /// Region number.
        region: u64,
        /// CRC32C of the region's bytes (clipped at the end of the volume).
        crc: u32,
    },
    /// Replica → primary: refused; I have seen `epoch`, newer than yours.
    Fenced {
        /// The replica's epoch.
        epoch: Epoch,
    },
    /// Replica → primary: this node is stopping; take me out of the in-sync set now
    /// rather than after the replica timeout (a graceful stop, issue 19). Exactly what
    /// a link down for that long does, sooner.
    Leaving {
        /// The epoch of the stream it leaves.
        epoch: Epoch,
    },
}

impl Message {
    /// Whether the primary sends it (to a replica), as opposed to a replica's answer.
    pub fn to_replica(&self) -> bool {
        matches!(
            self,
            Message::Seal { .. }
                | Message::Write { .. }
                | Message::VerifyRequest { .. }
                | Message::DirtyMap { .. }
        )
    }

    /// The epoch the message was sent in.
    pub fn epoch(&self) -> Epoch {
        match self {
            Message::Seal { epoch, .. }
            | Message::SealAck { epoch, .. }
            | Message::Write { epoch, .. }
            | Message::Ack { epoch, .. }
            | Message::VerifyRequest { epoch, .. }
            | Message::VerifyResult { epoch, .. }
            | Message::DirtyMap { epoch, .. }
            | Message::Fenced { epoch }
            | Message::Leaving { epoch } => *epoch,
        }
    }
}
