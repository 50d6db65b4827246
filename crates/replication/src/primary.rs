//! The primary side: sealing the in-sync set at a new epoch, streaming writes to every
//! replica, acknowledging a write only when the whole in-sync set has it, and bringing
//! returning replicas back through dirty-region resync.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::activity_log::{covers_region, PersistedLog};
use crate::bitmap::{DirtyMap, RegionSet};
use crate::message::{Epoch, Message, NodeId, Payload, Seq};

mod verify;
use verify::Verify;
pub use verify::VerifyReport;

/// The driver's name for an initiator write (or flush), returned in
/// [`Action::Complete`]; the engine never interprets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteTag(pub u64);

/// How a primary runs.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// This node.
    pub me: NodeId,
    /// The epoch the control plane committed for this term.
    pub epoch: Epoch,
    /// Bytes per region (resync and activity-log granularity).
    pub region_size: u64,
    /// Volume size in bytes (a full sync covers it all).
    pub size_bytes: u64,
    /// The other replicas of the volume.
    pub replicas: BTreeSet<NodeId>,
    /// The committed in-sync set, without this node.
    pub in_sync: BTreeSet<NodeId>,
    /// Replicas added to the volume that have never been in sync since: they are
    /// rebuilt from scratch, at `rebuild_rate` rather than `resync_rate`.
    pub rebuilding: BTreeSet<NodeId>,
    /// This node's own activity log at promotion (regions it may hold writes the others
    /// lack).
    pub own_activity_log: RegionSet,
    /// What the replicas outside the in-sync set lacked when this node last had a map
    /// (as a member, from the previous primary). A replica it does not list gets a
    /// full sync.
    pub dirty_hint: Option<DirtyMap>,
    /// A replica silent this long (milliseconds) while writes wait for it is proposed for
    /// removal from the in-sync set.
    pub replica_timeout_ms: u64,
    /// Resync regions in flight per replica (read, sent, not yet acknowledged): bounds
    /// the memory a resync takes and lets application writes interleave.
    pub resync_window: usize,
    /// Resync bandwidth per replica, in bytes per second; 0 is unlimited. Sealing (the
    /// divergent regions of a failover, which hold I/O back) is never throttled.
    pub resync_rate: u64,
    /// Rebuild bandwidth per new replica (a full copy), in bytes per second; 0 is
    /// unlimited (application writes still go first).
    pub rebuild_rate: u64,
    /// How many regions the persisted activity log may carry beyond the live ones
    /// before it is rewritten smaller ([`crate::replica::ACTIVITY_LOG_SLACK`]).
    pub activity_log_slack: usize,
    /// Test only: acknowledge writes before the replicas have them. The simulation must
    /// catch this.
    #[cfg(test)]
    pub bug_ack_before_replicas: bool,
    /// Test only: drop regions from the activity log once written everywhere, before
    /// they are durable. The simulation with power cuts must catch this.
    #[cfg(test)]
    pub bug_forget_before_flush: bool,
}

impl PrimaryConfig {
    /// The planted bug of the power-cut simulation; never in the product.
    fn forgets_before_flush(&self) -> bool {
        #[cfg(test)]
        return self.bug_forget_before_flush;
        #[cfg(not(test))]
        false
    }
}

/// What the driver must do for the primary, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send to a replica.
    Send {
        /// Destination.
        to: NodeId,
        /// The message.
        msg: Message,
    },
    /// Write (or deallocate) locally, or for a flush barrier make the local store
    /// durable, then call [`Primary::local_done`] with `id`.
    LocalWrite {
        /// Internal write id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// What to do there.
        payload: Payload,
    },
    /// Persist this node's activity log before the local write that follows.
    PersistActivityLog(RegionSet),
    /// Flush the local store (in the background: no initiator waits for it), then
    /// call [`Primary::flushed`] with `mark`. Regions whose writes it covers may then
    /// leave the activity log.
    Flush {
        /// What the flush covers, for [`Primary::flushed`].
        mark: u64,
    },
    /// Persist the map of what the replicas outside the in-sync set lack before the
    /// local write that follows.
    PersistDirtyMap(DirtyMap),
    /// Read `region` locally and call [`Primary::region_read`] with `peer` and `seq`.
    /// Issued only when no earlier local write to the region is still running.
    ReadRegion {
        /// Replica being resynced.
        peer: NodeId,
        /// Its stream position for the region's content.
        seq: Seq,
        /// Region number.
        region: u64,
    },
    /// Find which regions of the local copy hold data (the rest reads as zeroes), and
    /// call [`Primary::allocation_scanned`] with `peer` and them: a replica added to
    /// the volume gets only those. Its rebuild waits for the answer.
    ScanAllocation {
        /// The new replica.
        peer: NodeId,
    },
    /// The initiator's write is on every in-sync member: send it its status.
    Complete(WriteTag),
    /// Ask the control plane to add `node` to the in-sync set at `epoch`.
    RequestIsrAdd {
        /// This primary's epoch.
        epoch: Epoch,
        /// The caught-up replica.
        node: NodeId,
    },
    /// Ask the control plane to drop `node` from the in-sync set at `epoch`.
    RequestIsrRemove {
        /// This primary's epoch.
        epoch: Epoch,
        /// The silent replica.
        node: NodeId,
    },
    /// A replica has seen a newer epoch: this primary is deposed and must stop.
    Deposed {
        /// The newer epoch.
        epoch: Epoch,
    },
    /// Sealing finished: every in-sync member holds the same data.
    Sealed,
    /// Read `region` locally and call [`Primary::verify_local`] with its CRC32C. Issued
    /// when no write to the region is in flight (new ones wait until it is compared).
    ChecksumRegion {
        /// Region number.
        region: u64,
    },
    /// The online verify finished (or was replaced); the report is final.
    VerifyDone(VerifyReport),
}

/// A write that waits for the verify of a region it touches.
#[derive(Debug)]
struct Held {
    tag: WriteTag,
    offset: u64,
    payload: Payload,
}

impl Held {
    /// Whether it touches a region that `[offset, offset + len)` touches.
    fn shares_region(&self, offset: u64, len: u64, region_size: u64) -> bool {
        let (a, b) = (
            regions(self.offset, self.payload.len(), region_size),
            regions(offset, len, region_size),
        );
        !a.is_empty() && !b.is_empty() && a.start() <= b.end() && b.start() <= a.end()
    }
}

/// Where the resync of one replica stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncProgress {
    /// The replica.
    pub peer: NodeId,
    /// Regions it has received in this resync.
    pub done_regions: u64,
    /// Regions still to send (or sent and not yet acknowledged).
    pub pending_regions: u64,
    /// Whether it is connected (a resync waits for a replica that is down).
    pub connected: bool,
}

/// Why a write cannot be taken now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotServing {
    /// Sealing the in-sync set is still under way.
    #[error("the new primary is still sealing the in-sync set")]
    Sealing,
    /// The lease is missing or expired.
    #[error("the primary's lease has expired")]
    NoLease,
    /// A newer epoch exists.
    #[error("this primary has been deposed")]
    Deposed,
    /// Too many writes in flight.
    #[error("too many writes in flight")]
    Busy,
    /// A planned move is draining this primary.
    #[error("the volume is moving to another node")]
    Moving,
}

#[derive(Debug)]
struct Write {
    tag: WriteTag,
    offset: u64,
    len: u64,
    local_done: bool,
    /// For a flush barrier: the local writes it covers (see [`Primary::done_count`]).
    flush_mark: Option<u64>,
    /// In-sync (or joining) members that have not acknowledged it.
    waiting: BTreeSet<NodeId>,
}

#[derive(Clone, Debug)]
struct Entry {
    seq: Seq,
    offset: u64,
    /// `None` until a resync read fills it.
    payload: Option<Payload>,
    /// The application write this entry carries, if not a resync copy.
    write: Option<u64>,
    /// A resync copy: the application writes to its region that were in flight when it
    /// was read. It may carry their data, so it is not committed (the replica keeps the
    /// region in its activity log) until they are on every member.
    waits_for: Vec<u64>,
}

impl Entry {
    /// Acknowledged by its replica, and what it carries is on every member.
    fn done(&self, acked: Seq, writes: &BTreeMap<u64, Write>) -> bool {
        self.seq <= acked
            && self.write.is_none_or(|w| !writes.contains_key(&w))
            && self.waits_for.iter().all(|w| !writes.contains_key(w))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Down {
        since: u64,
    },
    /// Seal sent, waiting for SealAck.
    Sealing,
    Streaming,
}

#[derive(Debug)]
struct Peer {
    link: Link,
    /// Next seq to assign in this stream.
    next_seq: Seq,
    /// Highest seq acknowledged.
    acked: Seq,
    /// Sent or to send, not yet both acknowledged and committed.
    stream: VecDeque<Entry>,
    /// Regions this replica lacks (written while it was not streaming).
    dirty: RegionSet,
    /// Resync entries not yet acknowledged.
    resync_outstanding: BTreeSet<Seq>,
    /// Resync regions it has acknowledged in this term, and that count when its current
    /// resync began.
    resync_done: u64,
    resync_base: u64,
    /// Resync budget in bytes (a token bucket filled at `resync_rate`), and when it was
    /// last filled.
    resync_tokens: i64,
    tokens_at: u64,
    /// Last time the replica made progress (or had nothing outstanding).
    last_progress: u64,
    /// Asked the control plane to add / remove it and waiting for the answer.
    add_requested: bool,
    remove_requested: bool,
    /// Its node said it stops ([`Message::Leaving`]): out of the in-sync set at once,
    /// and nothing more is sent to it until its link comes up again.
    leaving: bool,
    /// When the pending request was last sent (it is repeated until answered: the
    /// control plane may be unreachable for a while).
    requested_at: u64,
    /// The last resync copy put in its stream, and the last flush barrier it
    /// acknowledged: a resynced replica joins the in-sync set only once a flush covers
    /// its copies, so every member holds every flushed write durably.
    last_resync_seq: Seq,
    flushed_through: Seq,
    /// Added to the volume and never in sync since: a full copy, at the rebuild rate.
    rebuilding: bool,
    /// Added while this primary serves, until the driver has said which regions hold
    /// data ([`Action::ScanAllocation`]): the regions written meanwhile, which it gets
    /// whatever the scan says. Nothing is copied to it before.
    awaiting_scan: Option<RegionSet>,
    /// A flush barrier in its stream that, once acknowledged, lets the persisted map
    /// forget the regions copied before it (see [`Checkpoint`]).
    checkpoint: Option<Checkpoint>,
    /// `resync_done` when the last checkpoint was placed, and when.
    checkpoint_done: u64,
    checkpoint_at: u64,
}

impl Peer {
    fn new(now: u64, dirty: RegionSet, rebuilding: bool) -> Peer {
        Peer {
            link: Link::Down { since: now },
            next_seq: Seq(1),
            acked: Seq(0),
            stream: VecDeque::new(),
            dirty,
            resync_outstanding: BTreeSet::new(),
            resync_done: 0,
            resync_base: 0,
            resync_tokens: 0,
            tokens_at: now,
            last_progress: now,
            add_requested: false,
            remove_requested: false,
            leaving: false,
            requested_at: 0,
            last_resync_seq: Seq(0),
            flushed_through: Seq(0),
            rebuilding,
            awaiting_scan: None,
            checkpoint: None,
            checkpoint_done: 0,
            checkpoint_at: now,
        }
    }
}

impl Peer {
    /// Puts a flush barrier at the end of the stream (to send at once: the caller
    /// checked the link streams): the replica acknowledges it once everything before it
    /// is durable there.
    fn push_barrier(&mut self, epoch: Epoch) -> (Seq, Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stream.push_back(Entry {
            seq,
            offset: 0,
            payload: Some(Payload::Flush),
            write: None,
            waits_for: Vec::new(),
        });
        let msg = Message::Write {
            epoch,
            seq,
            offset: 0,
            payload: Payload::Flush,
            committed: Seq(0),
        };
        (seq, msg)
    }
}

/// A snapshot whose local copy is not made yet.
#[derive(Debug)]
struct SnapshotHere {
    /// The write id of its position.
    id: u64,
    /// Its local action, while it waits for the local writes placed before it.
    waiting: Option<Payload>,
}

/// Progress of a resync kept across restarts: a flush barrier placed after some
/// copies. Once the replica acknowledges it, those copies are durable there, and the
/// map of what it lacks (persisted on every member) shrinks to `lacking`: a new primary,
/// or this one after a restart, goes on from there instead of starting over.
#[derive(Debug)]
struct Checkpoint {
    /// The barrier's position in the stream.
    seq: Seq,
    /// What the replica still lacked when the barrier was placed, and every region
    /// written since (the barrier does not cover those).
    lacking: RegionSet,
}

/// A checkpoint is placed once this many regions were copied since the last one and
/// [`CHECKPOINT_EVERY_MS`] passed: each costs the replica a flush (which holds its
/// stream), and a restart re-copies at most what was copied since.
const CHECKPOINT_REGIONS: u64 = 64;
const CHECKPOINT_EVERY_MS: u64 = 1000;

/// How far one replica is behind its primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaLag {
    /// The replica.
    pub peer: NodeId,
    /// Application writes it has not acknowledged.
    pub writes: u64,
    /// Bytes of data (writes and resync copies) it has not acknowledged.
    pub bytes: u64,
    /// Its link streams (not down, not sealing).
    pub streaming: bool,
}

/// Where a primary is in its life, for its one epoch. It starts sealing and ends
/// released (a planned move) or deposed (a newer epoch exists); neither end serves
/// again. See docs/design-notes.md, "The primary's life".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Sealing the in-sync set: members still to answer Seal, then (`resync_started`)
    /// the divergent regions being rewritten. Nothing is served or committed.
    /// `then_drain`: a planned move asked to drain meanwhile.
    Sealing {
        resync_started: bool,
        then_drain: bool,
    },
    /// Serving reads and writes while its lease lasts.
    Serving,
    /// A planned move: reads are served and writes in flight finish; new writes are
    /// refused (the initiator retries on the next primary).
    Draining,
    /// The lease was given up for a handover: never serves again.
    Released,
    /// A newer epoch exists: never serves again.
    Deposed,
}

impl Stage {
    /// Whether the seal of the in-sync set is still under way.
    fn sealing(self) -> bool {
        matches!(self, Stage::Sealing { .. })
    }
}

/// The primary of one volume for one epoch.
#[derive(Debug)]
pub struct Primary {
    cfg: PrimaryConfig,
    in_sync: BTreeSet<NodeId>,
    peers: BTreeMap<NodeId, Peer>,
    writes: BTreeMap<u64, Write>,
    next_id: u64,
    /// Where it is in its life: sealing, serving, draining, released or deposed.
    stage: Stage,
    /// While sealing: the divergent regions, and members still to answer Seal / to
    /// acknowledge the rewrite of the divergent regions.
    seal_divergent: RegionSet,
    seal_pending_acks: BTreeSet<NodeId>,
    lease_until: Option<u64>,
    /// Where the streams of replicas removed in this term stopped: one added again
    /// goes on from there, never back (see [`Primary::set_replicas`]).
    retired_seq: BTreeMap<NodeId, Seq>,
    /// This node's activity log: region → writes in flight there.
    activity: BTreeMap<u64, u32>,
    /// Regions written here that no completed local flush covers yet → the
    /// `done_count` of their last write. They stay in the activity log: a power cut
    /// may take them back to older data that only a resync repairs.
    unflushed: BTreeMap<u64, u64>,
    /// Local writes finished so far; a flush placed when it was `n` covers the first
    /// `n` (a write counts once its `local_done` has run, before the flush begins).
    done_count: u64,
    /// A background flush is running; when the last one was placed.
    flush_running: bool,
    last_flush_at: u64,
    persisted_log: PersistedLog,
    /// Resync reads waiting for local writes to the region to finish.
    deferred_reads: Vec<(NodeId, Seq, u64)>,
    verify: Option<Verify>,
    /// Writes to regions under verify, and every write while a snapshot is taken
    /// here, in arrival order; placed when the region is compared or the local copy
    /// of the snapshot is made (a few milliseconds).
    held: VecDeque<Held>,
    /// A snapshot placed in the streams whose local copy is not made yet.
    snapshot_here: Option<SnapshotHere>,
    /// Writes are held (a snapshot of several volumes is being placed in each of
    /// their streams: none may take a write in between).
    frozen: bool,
    /// Every replica outside the in-sync set → the regions it may lack (everything
    /// written since it left, and what it lacked then); this node → none. Persisted
    /// here and on every member ([`Message::DirtyMap`]).
    dirty_map: DirtyMap,
    /// Maps published in this term ([`Message::DirtyMap`]'s `generation`).
    map_generation: u64,
}

/// How often a background flush runs while regions wait for one (milliseconds), and
/// how many waiting regions start one at once: together they bound the activity log,
/// and so the resync after a power cut.
const FLUSH_EVERY_MS: u64 = 1000;
const FLUSH_AT_REGIONS: usize = 256;

/// Writes in flight before new ones are refused with `Busy`.
const MAX_IN_FLIGHT: usize = 4096;

/// Application writes a replica may be behind on before resync stops adding regions to
/// its stream (they would queue in front of the writes that follow).
const APP_BACKLOG_BEFORE_RESYNC_WAITS: usize = 64;

impl Primary {
    /// A primary for a freshly committed epoch. It seals the in-sync set before it
    /// serves: call [`Primary::link_up`] for every replica it can reach.
    pub fn new(cfg: PrimaryConfig, now: u64) -> Primary {
        debug_assert!(cfg.in_sync.is_subset(&cfg.replicas));
        debug_assert!(!cfg.replicas.contains(&cfg.me));
        // What a replica outside the in-sync set lacks: what the map says plus what
        // this node may have written without it; with no map, everything.
        let lacking = |r: &NodeId| -> RegionSet {
            if cfg.in_sync.contains(r) {
                return RegionSet::new();
            }
            match cfg.dirty_hint.as_ref().and_then(|h| h.get(r)) {
                Some(d) => {
                    let mut d = d.clone();
                    d.union_with(&cfg.own_activity_log);
                    d
                }
                None => all_regions(cfg.size_bytes, cfg.region_size),
            }
        };
        let mut dirty_map: DirtyMap = cfg
            .replicas
            .iter()
            .filter(|r| !cfg.in_sync.contains(r))
            .map(|r| (*r, lacking(r)))
            .collect();
        dirty_map.insert(cfg.me, RegionSet::new());
        let peers = cfg
            .replicas
            .iter()
            .map(|r| (*r, Peer::new(now, lacking(r), cfg.rebuilding.contains(r))))
            .collect();
        let persisted_log = PersistedLog::new(cfg.own_activity_log.clone(), cfg.activity_log_slack);
        // What this node may hold that others lack is not known to be durable either:
        // the seal copies it everywhere, and a power cut here before the next flush
        // would take it back.
        let unflushed = cfg
            .own_activity_log
            .iter()
            .filter(|_| !cfg.forgets_before_flush())
            .map(|r| (r, 0))
            .collect();
        Primary {
            in_sync: cfg.in_sync.clone(),
            seal_divergent: cfg.own_activity_log.clone(),
            seal_pending_acks: cfg.in_sync.clone(),
            peers,
            writes: BTreeMap::new(),
            next_id: 1,
            stage: Stage::Sealing {
                resync_started: false,
                then_drain: false,
            },
            lease_until: None,
            activity: BTreeMap::new(),
            unflushed,
            done_count: 0,
            flush_running: false,
            last_flush_at: now,
            persisted_log,
            deferred_reads: Vec::new(),
            retired_seq: BTreeMap::new(),
            verify: None,
            held: VecDeque::new(),
            snapshot_here: None,
            frozen: false,
            dirty_map,
            map_generation: 0,
            cfg,
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> Epoch {
        self.cfg.epoch
    }

    /// The in-sync set as this primary knows it committed (without itself).
    pub fn in_sync(&self) -> &BTreeSet<NodeId> {
        &self.in_sync
    }

    /// Replicas this primary waits for: the committed in-sync set plus those it asked
    /// to add (they count from the moment of asking, so a write acknowledged after the
    /// control plane adds them is on them).
    fn members(&self) -> BTreeSet<NodeId> {
        let mut m = self.in_sync.clone();
        m.extend(
            self.peers
                .iter()
                .filter(|(_, p)| p.add_requested)
                .map(|(id, _)| *id),
        );
        m
    }

    /// Whether reads and writes may be served at `now`.
    pub fn serving(&self, now: u64) -> Result<(), NotServing> {
        match self.stage {
            Stage::Deposed => return Err(NotServing::Deposed),
            Stage::Released => return Err(NotServing::Moving),
            Stage::Sealing { .. } => return Err(NotServing::Sealing),
            Stage::Serving | Stage::Draining => {}
        }
        match self.lease_until {
            Some(t) if now < t => Ok(()),
            _ => Err(NotServing::NoLease),
        }
    }

    /// Whether this primary may still become or remain the one that serves: not
    /// deposed, released or failed, and its lease, once it had one, not lapsed. Before
    /// the first lease it claims service for `grace` ms from its start (a promotion
    /// that never got a lease is not a claim). A virtual IP follows this, so it moves to
    /// a new primary before that one has sealed, and leaves one cut off from the
    /// cluster when its lease lapses.
    pub fn claims_service(&self, now: u64, grace: u64) -> bool {
        !matches!(self.stage, Stage::Deposed | Stage::Released)
            && match self.lease_until {
                Some(t) => now < t,
                None => now < grace,
            }
    }

    /// The control plane renewed the lease: valid until `until` on this node's clock
    /// (the driver measures from before it asked).
    /// Writes that became complete while the lease had lapsed complete now.
    pub fn set_lease(&mut self, now: u64, until: u64) -> Vec<Action> {
        // Deposed: nothing completes any more (`serving` refuses), so the lease is moot.
        if matches!(self.stage, Stage::Released | Stage::Deposed) {
            return Vec::new();
        }
        self.lease_until = Some(self.lease_until.map_or(until, |t| t.max(until)));
        let mut out = Vec::new();
        for id in self.writes.keys().copied().collect::<Vec<_>>() {
            self.try_complete(now, id, &mut out);
        }
        out
    }

    /// Takes an initiator write of `data` at `offset`.
    pub fn submit_write(
        &mut self,
        now: u64,
        tag: WriteTag,
        offset: u64,
        data: Bytes,
    ) -> Result<Vec<Action>, NotServing> {
        self.submit(now, tag, offset, Payload::Data(data))
    }

    /// Takes an initiator's deallocation of `len` bytes at `offset` (UNMAP, WRITE SAME
    /// with UNMAP): ordered, logged and acknowledged exactly like a write.
    pub fn submit_deallocate(
        &mut self,
        now: u64,
        tag: WriteTag,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Action>, NotServing> {
        self.submit(now, tag, offset, Payload::Deallocate(len))
    }

    /// Takes snapshot `name`: a position in every member's stream, where each member
    /// copies its volume (every write before it, none after). Here the copy is made
    /// once every earlier local write is done, and writes that arrive meanwhile wait
    /// (the write pause a snapshot costs). It completes when every in-sync member has
    /// acknowledged its copy. One at a time.
    pub fn submit_snapshot(
        &mut self,
        now: u64,
        tag: WriteTag,
        name: String,
    ) -> Result<Vec<Action>, NotServing> {
        if self.snapshot_here.is_some() {
            return Err(NotServing::Busy);
        }
        self.submit(now, tag, 0, Payload::Snapshot(name))
    }

    /// Rolls the volume back to snapshot `name`: a position in every member's stream
    /// where each replaces its copy with its copy of the snapshot, taken here the way
    /// a snapshot is (after the earlier local writes, later writes held until it is
    /// done). Logged as a change of every byte, so a member that cannot roll back is
    /// resynced in full. One at a time.
    pub fn submit_rollback(
        &mut self,
        now: u64,
        tag: WriteTag,
        name: String,
    ) -> Result<Vec<Action>, NotServing> {
        if self.snapshot_here.is_some() {
            return Err(NotServing::Busy);
        }
        let len = self.cfg.size_bytes;
        self.submit(
            now,
            tag,
            0,
            Payload::Rollback {
                snapshot: name,
                len,
            },
        )
    }

    /// Holds every write from now on until [`Self::thaw`]: a snapshot of several
    /// volumes freezes them all, places its position in each, and thaws them once
    /// every local copy is made, so no write to one lands between the positions of
    /// the others (crash-consistent across the volumes of a target).
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Ends [`Self::freeze`]: the held writes go on, in order (once no snapshot is
    /// being taken here).
    pub fn thaw(&mut self, now: u64) -> Vec<Action> {
        self.frozen = false;
        let mut out = Vec::new();
        self.release_held(now, &mut out);
        out
    }

    /// Takes a flush barrier (SYNCHRONIZE CACHE, FUA): it completes when every write
    /// before it is durable here and on every in-sync replica.
    pub fn submit_flush(&mut self, now: u64, tag: WriteTag) -> Result<Vec<Action>, NotServing> {
        self.submit(now, tag, 0, Payload::Flush)
    }

    fn submit(
        &mut self,
        now: u64,
        tag: WriteTag,
        offset: u64,
        payload: Payload,
    ) -> Result<Vec<Action>, NotServing> {
        self.serving(now)?;
        if self.stage == Stage::Draining {
            return Err(NotServing::Moving);
        }
        if self.writes.len() + self.held.len() >= MAX_IN_FLIGHT {
            return Err(NotServing::Busy);
        }
        let mut out = Vec::new();
        // A rollback is a barrier like a snapshot: it goes in as asked, also while
        // frozen for it.
        let barrier = matches!(payload, Payload::Rollback { .. });
        if !payload.is_empty() && !barrier && self.must_hold(offset, payload.len()) {
            self.held.push_back(Held {
                tag,
                offset,
                payload,
            });
            return Ok(out);
        }
        self.place(now, tag, offset, payload, &mut out);
        Ok(out)
    }

    /// Whether a write to `[offset, offset + len)` must wait: a region it touches is
    /// being verified, or an earlier write to one of them waits already (order).
    fn must_hold(&self, offset: u64, len: u64) -> bool {
        if self.frozen || self.snapshot_here.is_some() {
            return true;
        }
        let rs = self.cfg.region_size;
        let Some(v) = &self.verify else {
            return false;
        };
        regions(offset, len, rs).any(|r| v.active.contains_key(&r))
            || self.held.iter().any(|h| h.shares_region(offset, len, rs))
    }

    /// Puts a write into every stream and writes it locally.
    fn place(
        &mut self,
        now: u64,
        tag: WriteTag,
        offset: u64,
        payload: Payload,
        out: &mut Vec<Action>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let len = payload.len();
        if len > 0 {
            // Replicas outside the in-sync set may lack these regions from now on; the
            // members hear it before the write itself.
            let outside: Vec<NodeId> = self
                .peers
                .keys()
                .filter(|p| !self.in_sync.contains(p))
                .copied()
                .collect();
            if !outside.is_empty() {
                let mut touched = RegionSet::new();
                touched.mark(offset, len, self.cfg.region_size);
                for peer in outside {
                    self.mark_lacking(peer, &touched, out);
                }
            }
        }
        let members = self.members();
        // Activity log first: after a crash these regions are resynced.
        if len > 0 {
            let mut grew = false;
            for r in regions(offset, len, self.cfg.region_size) {
                *self.activity.entry(r).or_insert(0) += 1;
                let whole = covers_region(offset, len, r, self.cfg.region_size);
                grew |= self.persisted_log.log(r, whole);
            }
            if grew {
                out.push(Action::PersistActivityLog(
                    self.persisted_log.regions().clone(),
                ));
            }
        }
        for (pid, peer) in self.peers.iter_mut() {
            if len > 0 {
                for seen in peer
                    .awaiting_scan
                    .iter_mut()
                    .chain(peer.checkpoint.as_mut().map(|c| &mut c.lacking))
                {
                    seen.mark(offset, len, self.cfg.region_size);
                }
            }
            // Members get every write in their stream, sent now or retransmitted after
            // the next seal; others get it only while streaming, and otherwise as a
            // dirty region when they return.
            let streaming = peer.link == Link::Streaming;
            if !(streaming || members.contains(pid)) {
                peer.dirty.mark(offset, len, self.cfg.region_size);
                continue;
            }
            let seq = peer.next_seq;
            peer.next_seq += 1;
            if peer.acked + 1 == seq {
                peer.last_progress = now;
            }
            peer.stream.push_back(Entry {
                seq,
                offset,
                payload: Some(payload.clone()),
                write: Some(id),
                waits_for: Vec::new(),
            });
            if streaming {
                out.push(Action::Send {
                    to: *pid,
                    msg: Message::Write {
                        epoch: self.cfg.epoch,
                        seq,
                        offset,
                        payload: payload.clone(),
                        committed: committed_of(peer, &self.writes, self.stage.sealing()),
                    },
                });
            }
        }
        self.writes.insert(
            id,
            Write {
                tag,
                offset,
                len,
                local_done: false,
                flush_mark: payload.is_flush().then_some(self.done_count),
                waiting: members,
            },
        );
        if let Payload::Snapshot(_) | Payload::Rollback { .. } = &payload {
            // The local copy waits for the local writes placed before it.
            let earlier = self
                .writes
                .iter()
                .any(|(w_id, w)| *w_id != id && !w.local_done && w.len > 0);
            self.snapshot_here = Some(SnapshotHere {
                id,
                waiting: earlier.then(|| payload.clone()),
            });
            if earlier {
                return;
            }
        }
        out.push(Action::LocalWrite {
            id,
            offset,
            payload,
        });
    }

    /// The local write `id` is done.
    pub fn local_done(&mut self, now: u64, id: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(snap) = &mut self.snapshot_here {
            if snap.id == id {
                // The local copy is made: the writes held meanwhile go on.
                self.snapshot_here = None;
                self.release_held(now, &mut out);
            } else if snap.waiting.is_some() {
                let earlier = self
                    .writes
                    .iter()
                    .any(|(w_id, w)| *w_id != id && *w_id < snap.id && !w.local_done && w.len > 0);
                if let (false, Some(payload)) = (earlier, snap.waiting.take()) {
                    out.push(Action::LocalWrite {
                        id: snap.id,
                        offset: 0,
                        payload,
                    });
                }
            }
        }
        let mut covered = None;
        if let Some(w) = self.writes.get_mut(&id) {
            w.local_done = true;
            if w.len > 0 && !self.cfg.forgets_before_flush() {
                self.done_count += 1;
                for r in regions(w.offset, w.len, self.cfg.region_size) {
                    self.unflushed.insert(r, self.done_count);
                }
            }
            covered = w.flush_mark;
        }
        if let Some(mark) = covered {
            self.forget_flushed(mark);
        }
        self.try_complete(now, id, &mut out);
        // Resync reads that waited for this write.
        let deferred = std::mem::take(&mut self.deferred_reads);
        for (peer, seq, region) in deferred {
            self.read_or_defer(peer, seq, region, &mut out);
        }
        out
    }

    /// Completes write `id` if it is everywhere it must be. Never after the lease ended:
    /// a deposed primary stays silent rather than answer after its successor served.
    fn try_complete(&mut self, now: u64, id: u64, out: &mut Vec<Action>) {
        if self.serving(now).is_err() {
            return;
        }
        let Some(w) = self.writes.get(&id) else {
            return;
        };
        #[cfg(test)]
        let waiting_ok = w.waiting.is_empty() || self.cfg.bug_ack_before_replicas;
        #[cfg(not(test))]
        let waiting_ok = w.waiting.is_empty();
        if !(w.local_done && waiting_ok) {
            return;
        }
        let w = self.writes.remove(&id).expect("checked above");
        for r in regions(w.offset, w.len, self.cfg.region_size) {
            if let Some(n) = self.activity.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    self.activity.remove(&r);
                }
            }
        }
        self.shrink_persisted_log();
        out.push(Action::Complete(w.tag));
        let rs = self.cfg.region_size;
        let waited = self
            .verify
            .as_ref()
            .is_some_and(|v| regions(w.offset, w.len, rs).any(|r| v.active.contains_key(&r)));
        if waited {
            self.pump_verify(now, out);
        }
    }

    /// A message from replica `from`.
    pub fn on_message(&mut self, now: u64, from: NodeId, msg: Message) -> Vec<Action> {
        let mut out = Vec::new();
        if let Message::Fenced { epoch } = msg {
            if epoch > self.cfg.epoch && self.stage != Stage::Deposed {
                self.stage = Stage::Deposed;
                out.push(Action::Deposed { epoch });
            }
            return out;
        }
        if msg.epoch() != self.cfg.epoch || !self.peers.contains_key(&from) {
            return out;
        }
        match msg {
            Message::SealAck { divergent, .. } => self.on_seal_ack(now, from, divergent, &mut out),
            Message::Ack { seq, .. } => self.on_ack(now, from, seq, &mut out),
            Message::Leaving { .. } => {
                // As if its link had been down for the replica timeout: the removal
                // is requested now, and writes wait only for that commit.
                if let Some(p) = self.peers.get_mut(&from) {
                    p.leaving = true;
                    if !matches!(p.link, Link::Down { .. }) {
                        p.link = Link::Down { since: now };
                    }
                }
                if self.forget_verify_answers(from) {
                    self.pump_verify(now, &mut out);
                }
                out.extend(self.tick(now));
            }
            Message::VerifyResult { region, crc, .. } => {
                let answered = self
                    .verify
                    .as_mut()
                    .and_then(|v| v.active.get_mut(&region))
                    .and_then(|vr| vr.remote.get_mut(&from))
                    .map(|slot| *slot = Some(crc))
                    .is_some();
                if answered {
                    self.pump_verify(now, &mut out);
                }
            }
            _ => {}
        }
        out
    }

    fn on_seal_ack(&mut self, now: u64, from: NodeId, divergent: RegionSet, out: &mut Vec<Action>) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        if peer.link != Link::Sealing {
            return;
        }
        peer.link = Link::Streaming;
        peer.last_progress = now;
        // Every replica keeps the map, from before anything that follows (see
        // `publish_dirty_map`).
        out.push(Action::Send {
            to: from,
            msg: Message::DirtyMap {
                epoch: self.cfg.epoch,
                full: true,
                generation: self.map_generation,
                peers: self.dirty_map.clone(),
            },
        });
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        // Retransmit what this stream has not acknowledged (a reconnect in the same
        // epoch), in order.
        for e in peer.stream.iter().filter(|e| e.seq > peer.acked) {
            if let Some(payload) = &e.payload {
                out.push(Action::Send {
                    to: from,
                    msg: Message::Write {
                        epoch: self.cfg.epoch,
                        seq: e.seq,
                        offset: e.offset,
                        payload: payload.clone(),
                        committed: Seq(0),
                    },
                });
            }
        }
        if self.stage.sealing() && self.seal_pending_acks.remove(&from) {
            self.seal_divergent.union_with(&divergent);
            self.maybe_start_seal_resync(now, out);
        } else {
            if self.in_sync.contains(&from) && !divergent.is_empty() {
                // A member that comes back with regions from an older epoch restarted,
                // and what it acknowledged before may be gone: a power cut takes what
                // it had not flushed. It leaves the in-sync set and returns through
                // resync like any other replica, and the writes not yet complete wait
                // for that (they may count on an acknowledgement it no longer backs).
                // The simulation found an acknowledged write lost through a replica
                // that had lost it and stayed in the set, then was promoted.
                for w in self.writes.values_mut() {
                    w.waiting.insert(from);
                }
                if let Some(p) = self.peers.get_mut(&from) {
                    if !p.remove_requested {
                        p.remove_requested = true;
                        p.add_requested = false;
                        p.requested_at = now;
                        out.push(Action::RequestIsrRemove {
                            epoch: self.cfg.epoch,
                            node: from,
                        });
                    }
                }
            }
            // A returning replica: what it missed, and what it may hold that we lack.
            if let Some(peer) = self.peers.get_mut(&from) {
                peer.dirty.union_with(&divergent);
            }
            self.mark_lacking(from, &divergent, out);
            self.resync_dirty(now, from, out);
        }
    }

    fn maybe_start_seal_resync(&mut self, now: u64, out: &mut Vec<Action>) {
        let Stage::Sealing {
            resync_started: resync_started @ false,
            ..
        } = &mut self.stage
        else {
            return;
        };
        if !self.seal_pending_acks.is_empty() {
            return;
        }
        *resync_started = true;
        // Rewrite the union of every member's divergent regions on every member, from
        // this node's copy; the members are identical once they have acknowledged.
        // Replicas outside the in-sync set get them too: a member dropped before this
        // point would otherwise come back with only its own divergent regions and keep
        // old data where this node's activity log says it may differ (the online
        // verify in the simulation found this).
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for m in &peers {
            if let Some(p) = self.peers.get_mut(m) {
                p.dirty.union_with(&self.seal_divergent);
            }
            if !self.in_sync.contains(m) {
                self.dirty_map
                    .entry(*m)
                    .or_default()
                    .union_with(&self.seal_divergent);
            }
        }
        // This term's map, on disk here and on every member before the first write.
        self.broadcast_dirty_map(out);
        for m in peers {
            self.resync_dirty(now, m, out);
        }
        self.check_sealed(out);
    }

    fn check_sealed(&mut self, out: &mut Vec<Action>) {
        let Stage::Sealing {
            resync_started: true,
            then_drain,
        } = self.stage
        else {
            return;
        };
        let done = self.in_sync.iter().all(|m| {
            self.peers.get(m).is_some_and(|p| {
                p.link == Link::Streaming && p.resync_outstanding.is_empty() && p.dirty.is_empty()
            })
        });
        if done {
            self.stage = if then_drain {
                Stage::Draining
            } else {
                Stage::Serving
            };
            // Our own divergent regions are now the same everywhere (those not yet
            // durable here stay until a flush covers them).
            let live = self.live_log();
            self.persisted_log.rewrite(live);
            out.push(Action::PersistActivityLog(
                self.persisted_log.regions().clone(),
            ));
            out.push(Action::Sealed);
        }
    }

    /// Queues the dirty regions of `peer` as resync entries of its stream.
    fn resync_dirty(&mut self, now: u64, pid: NodeId, out: &mut Vec<Action>) {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        if peer.link != Link::Streaming || peer.awaiting_scan.is_some() {
            return;
        }
        // A bounded window of regions in flight: memory stays at most `resync_window`
        // regions per replica, and application writes interleave.
        let mut room = self
            .cfg
            .resync_window
            .max(1)
            .saturating_sub(peer.resync_outstanding.len());
        // Application writes first: while the replica is behind on them, no resync
        // region joins the queue in front of the next ones.
        let app_backlog = peer
            .stream
            .iter()
            .filter(|e| e.write.is_some() && e.seq > peer.acked)
            .count();
        if app_backlog > APP_BACKLOG_BEFORE_RESYNC_WAITS {
            room = 0;
        }
        // The seal's rewrite of divergent regions holds I/O back: never throttled.
        let rate = if peer.rebuilding {
            self.cfg.rebuild_rate
        } else {
            self.cfg.resync_rate
        };
        let throttled = rate > 0 && !(self.stage.sealing() && self.in_sync.contains(&pid));
        if throttled && room > 0 {
            // Token bucket: bursts of at most a tenth of a second's worth.
            let rs = self.cfg.region_size as i64;
            let burst = ((rate / 10) as i64).clamp(rs, rs * self.cfg.resync_window.max(1) as i64);
            let elapsed = now.saturating_sub(peer.tokens_at);
            peer.tokens_at = now;
            let earned = (rate as u128 * elapsed as u128 / 1000) as i64;
            peer.resync_tokens = peer.resync_tokens.saturating_add(earned).min(burst);
            let affordable = if peer.resync_tokens > 0 {
                ((peer.resync_tokens + rs - 1) / rs) as usize
            } else {
                0
            };
            room = room.min(affordable);
        }
        // Regions past the end hold nothing (a replica logs regions ahead of its
        // writes): nothing to copy, and a copy there would be refused as a write past
        // the volume's end.
        peer.dirty
            .truncate(self.cfg.size_bytes.div_ceil(self.cfg.region_size));
        let regions: Vec<u64> = peer.dirty.iter().take(room).collect();
        if throttled {
            peer.resync_tokens -= regions.len() as i64 * self.cfg.region_size as i64;
        }
        for r in &regions {
            peer.dirty.remove(*r);
        }
        let mut reads = Vec::new();
        for region in regions {
            let seq = peer.next_seq;
            peer.next_seq += 1;
            peer.stream.push_back(Entry {
                seq,
                offset: region * self.cfg.region_size,
                payload: None,
                write: None,
                waits_for: Vec::new(),
            });
            peer.resync_outstanding.insert(seq);
            peer.last_resync_seq = seq;
            reads.push((seq, region));
        }
        for (seq, region) in reads {
            self.read_or_defer(pid, seq, region, out);
        }
        self.maybe_request_add(pid, out);
    }

    fn read_or_defer(&mut self, peer: NodeId, seq: Seq, region: u64, out: &mut Vec<Action>) {
        let rs = self.cfg.region_size;
        let busy = self
            .writes
            .values()
            .any(|w| !w.local_done && regions(w.offset, w.len, rs).any(|r| r == region));
        if busy {
            self.deferred_reads.push((peer, seq, region));
        } else {
            out.push(Action::ReadRegion { peer, seq, region });
        }
    }

    /// The content of a region read for a resync entry: its bytes, or a deallocation
    /// of the whole region when this copy holds none of it.
    pub fn region_read(&mut self, peer: NodeId, seq: Seq, payload: Payload) -> Vec<Action> {
        let mut out = Vec::new();
        let epoch = self.cfg.epoch;
        let writes = &self.writes;
        let Some(p) = self.peers.get_mut(&peer) else {
            return out;
        };
        let committed = committed_of(p, writes, self.stage.sealing());
        let streaming = p.link == Link::Streaming;
        if let Some(e) = p
            .stream
            .iter_mut()
            .find(|e| e.seq == seq && e.write.is_none())
        {
            let rs = self.cfg.region_size;
            let region = e.offset / rs;
            e.waits_for = writes
                .iter()
                .filter(|(_, w)| regions(w.offset, w.len, rs).any(|r| r == region))
                .map(|(id, _)| *id)
                .collect();
            e.payload = Some(payload.clone());
            if streaming {
                out.push(Action::Send {
                    to: peer,
                    msg: Message::Write {
                        epoch,
                        seq,
                        offset: e.offset,
                        payload,
                        committed,
                    },
                });
            }
        }
        out
    }

    fn on_ack(&mut self, now: u64, from: NodeId, seq: Seq, out: &mut Vec<Action>) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        if seq <= peer.acked || seq >= peer.next_seq {
            return;
        }
        peer.acked = seq;
        peer.last_progress = now;
        let mut done_writes = Vec::new();
        for e in peer.stream.iter().filter(|e| e.seq <= seq) {
            if e.payload.as_ref().is_some_and(Payload::is_flush) {
                peer.flushed_through = peer.flushed_through.max(e.seq);
            }
            if let Some(w) = e.write {
                done_writes.push(w);
            } else if peer.resync_outstanding.remove(&e.seq) {
                peer.resync_done += 1;
            }
        }
        for w in done_writes {
            if let Some(wr) = self.writes.get_mut(&w) {
                wr.waiting.remove(&from);
            }
            self.try_complete(now, w, out);
        }
        self.checkpoint_resync(now, from, out);
        if let Some(p) = self.peers.get_mut(&from) {
            if p.dirty.is_empty() && p.resync_outstanding.is_empty() {
                p.resync_base = p.resync_done;
            }
        }
        self.trim_stream(from);
        // Refill the resync window.
        if self.peers.get(&from).is_some_and(|p| !p.dirty.is_empty()) {
            self.resync_dirty(now, from, out);
        }
        self.maybe_request_add(from, out);
        self.check_sealed(out);
    }

    /// Keeps the progress of `pid`'s resync across restarts: when its checkpoint
    /// barrier is acknowledged, the persisted map forgets what the copies before it
    /// covered; after enough further copies, places the next barrier.
    fn checkpoint_resync(&mut self, now: u64, pid: NodeId, out: &mut Vec<Action>) {
        if self.in_sync.contains(&pid) || self.stage.sealing() {
            return;
        }
        let Some(p) = self.peers.get_mut(&pid) else {
            return;
        };
        if p.checkpoint.as_ref().is_some_and(|c| c.seq <= p.acked) {
            let Some(mut c) = p.checkpoint.take() else {
                return;
            };
            // Still lacking: what it lacked at the barrier, what was written since, and
            // whatever has been marked since (a seal's divergent regions).
            c.lacking.union_with(&p.dirty);
            for e in p
                .stream
                .iter()
                .filter(|e| e.seq > c.seq && e.write.is_none())
            {
                c.lacking.insert(e.offset / self.cfg.region_size);
            }
            if let Some(m) = self.dirty_map.get_mut(&pid) {
                let before = m.len();
                m.intersect_with(&c.lacking);
                if m.len() != before {
                    self.broadcast_dirty_map(out);
                }
            }
            return;
        }
        let copied = p.resync_done - p.checkpoint_done;
        let due = now.saturating_sub(p.checkpoint_at) >= CHECKPOINT_EVERY_MS;
        if p.checkpoint.is_none()
            && copied >= CHECKPOINT_REGIONS
            && due
            && p.link == Link::Streaming
        {
            p.checkpoint_done = p.resync_done;
            p.checkpoint_at = now;
            let (seq, msg) = p.push_barrier(self.cfg.epoch);
            p.checkpoint = Some(Checkpoint {
                seq,
                lacking: p.dirty.clone(),
            });
            out.push(Action::Send { to: pid, msg });
        }
    }

    /// The control plane changed the volume's replicas while this primary serves. A new
    /// one is rebuilt with a full copy of the regions that hold data (the driver finds
    /// them, [`Action::ScanAllocation`]; no copy starts before); a removed one is no
    /// longer sent anything nor waited for. The caller reports links to new replicas
    /// that are up ([`Primary::link_up`]).
    #[must_use = "the actions must be run"]
    /// `size_bytes` is the volume's size now (a resize grows it under a running primary).
    /// A replica that newly appears in `rebuilding` while outside the in-sync set was
    /// removed and added again (its node may have started over from an empty copy): it
    /// is rebuilt from scratch too.
    pub fn set_replicas(
        &mut self,
        now: u64,
        replicas: BTreeSet<NodeId>,
        rebuilding: &BTreeSet<NodeId>,
        size_bytes: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(self.stage, Stage::Released | Stage::Deposed) {
            return out;
        }
        self.set_size(size_bytes);
        let replicas: BTreeSet<NodeId> =
            replicas.into_iter().filter(|n| *n != self.cfg.me).collect();
        let rejoined = |pid: &NodeId, p: &Peer| {
            rebuilding.contains(pid) && !p.rebuilding && !self.in_sync.contains(pid)
        };
        let gone: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(pid, p)| !replicas.contains(pid) || rejoined(pid, p))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in &gone {
            // Its stream positions are never used again: a region read still under way
            // for an old position must not land in a new entry that reuses it.
            if let Some(p) = self.peers.get(pid) {
                self.retired_seq.insert(*pid, p.next_seq);
            }
        }
        let added: Vec<NodeId> = replicas
            .iter()
            .filter(|r| !self.peers.contains_key(r) || gone.contains(r))
            .copied()
            .collect();
        for pid in &gone {
            self.peers.remove(pid);
            self.in_sync.remove(pid);
            self.dirty_map.remove(pid);
            self.seal_pending_acks.remove(pid);
            self.deferred_reads.retain(|(peer, _, _)| peer != pid);
            self.forget_verify_answers(*pid);
            for w in self.writes.values_mut() {
                w.waiting.remove(pid);
            }
        }
        let everything = all_regions(self.cfg.size_bytes, self.cfg.region_size);
        for pid in &added {
            let mut peer = Peer::new(now, everything.clone(), true);
            if let Some(seq) = self.retired_seq.get(pid) {
                peer.next_seq = *seq;
                peer.acked = *seq - 1;
                peer.flushed_through = *seq - 1;
                peer.last_resync_seq = *seq - 1;
            }
            // Writes in flight may not show in the scan yet: they are copied whatever
            // it says.
            peer.awaiting_scan = Some(self.activity.keys().copied().fold(
                RegionSet::new(),
                |mut s, r| {
                    s.insert(r);
                    s
                },
            ));
            self.peers.insert(*pid, peer);
            self.dirty_map.insert(*pid, everything.clone());
            out.push(Action::ScanAllocation { peer: *pid });
        }
        for (pid, p) in self.peers.iter_mut() {
            p.rebuilding = rebuilding.contains(pid) && !self.in_sync.contains(pid);
        }
        self.cfg.replicas = replicas;
        if gone.is_empty() && added.is_empty() {
            return out;
        }
        // The new map, on disk here and on every member before anything that follows
        // (a seal that has not sent its map yet sends this one).
        if !self.seal_map_pending() {
            self.broadcast_dirty_map(&mut out);
        }
        for id in self.writes.keys().copied().collect::<Vec<_>>() {
            self.try_complete(now, id, &mut out);
        }
        self.maybe_start_seal_resync(now, &mut out);
        self.check_sealed(&mut out);
        self.pump_verify(now, &mut out);
        out
    }

    /// The regions of the local copy that hold data, for the new replica `peer` (see
    /// [`Primary::set_replicas`]): it is rebuilt with those and the ones written since
    /// it was added; the others read as zeroes on its fresh copy too.
    #[must_use = "the actions must be run"]
    /// `None`: the store cannot tell, so every region is copied.
    pub fn allocation_scanned(
        &mut self,
        now: u64,
        peer: NodeId,
        allocated: Option<&RegionSet>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(allocated) = allocated else {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.awaiting_scan = None;
            }
            self.resync_dirty(now, peer, &mut out);
            return out;
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return out;
        };
        let Some(mut keep) = p.awaiting_scan.take() else {
            return out;
        };
        keep.union_with(allocated);
        p.dirty.intersect_with(&keep);
        if let Some(m) = self.dirty_map.get_mut(&peer) {
            m.intersect_with(&keep);
            if !self.seal_map_pending() {
                self.broadcast_dirty_map(&mut out);
            }
        }
        self.resync_dirty(now, peer, &mut out);
        self.maybe_request_add(peer, &mut out);
        out
    }

    /// Drops stream entries that are acknowledged and whose write has completed.
    fn trim_stream(&mut self, pid: NodeId) {
        let writes = &self.writes;
        if let Some(p) = self.peers.get_mut(&pid) {
            while let Some(e) = p.stream.front() {
                if !e.done(p.acked, writes) {
                    break;
                }
                p.stream.pop_front();
            }
        }
    }

    /// A replica that has everything (no dirty regions, nothing unacknowledged) and is
    /// not in the in-sync set is proposed for it.
    fn maybe_request_add(&mut self, pid: NodeId, out: &mut Vec<Action>) {
        if self.stage.sealing() || self.in_sync.contains(&pid) {
            return;
        }
        let Some(p) = self.peers.get_mut(&pid) else {
            return;
        };
        let caught_up = p.link == Link::Streaming
            && p.dirty.is_empty()
            && p.resync_outstanding.is_empty()
            && p.acked + 1 == p.next_seq;
        if caught_up && p.flushed_through < p.last_resync_seq {
            // Its copies are applied, perhaps not durable: a flush barrier first, so a
            // power cut of every member cannot take a flushed write back.
            let msg = p.push_barrier(self.cfg.epoch).1;
            out.push(Action::Send { to: pid, msg });
            return;
        }
        if caught_up && !p.add_requested && !p.remove_requested {
            p.add_requested = true;
            p.requested_at = p.last_progress;
            out.push(Action::RequestIsrAdd {
                epoch: self.cfg.epoch,
                node: pid,
            });
        }
    }

    /// The connection to `peer` is up: seal it into the stream.
    pub fn link_up(&mut self, now: u64, peer: NodeId) -> Vec<Action> {
        let mut out = Vec::new();
        let epoch = self.cfg.epoch;
        let Some(p) = self.peers.get_mut(&peer) else {
            return out;
        };
        if !matches!(p.link, Link::Down { .. }) {
            return out;
        }
        p.leaving = false;
        p.link = Link::Sealing;
        p.last_progress = now;
        out.push(Action::Send {
            to: peer,
            msg: Message::Seal {
                epoch,
                next_seq: p.acked + 1,
            },
        });
        out
    }

    /// The connection to `peer` broke: what it has not acknowledged is retransmitted
    /// after the next seal; writes keep waiting for it while it is in the in-sync set.
    #[must_use = "the actions must be run"]
    pub fn link_down(&mut self, now: u64, peer: NodeId) -> Vec<Action> {
        if let Some(p) = self.peers.get_mut(&peer) {
            if !matches!(p.link, Link::Down { .. }) {
                p.link = Link::Down { since: now };
            }
        }
        // Its verify answers will not come.
        let mut out = Vec::new();
        if self.forget_verify_answers(peer) {
            self.pump_verify(now, &mut out);
        }
        out
    }

    /// Time passes: replicas silent too long while writes wait are proposed for
    /// removal from the in-sync set.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.maybe_flush(now, &mut out);
        // A primary whose in-sync set is only itself seals at once.
        self.maybe_start_seal_resync(now, &mut out);
        self.check_sealed(&mut out);
        self.pump_verify(now, &mut out);
        for pid in self.peers.keys().copied().collect::<Vec<_>>() {
            // A throttled resync continues as its budget refills.
            if self.peers.get(&pid).is_some_and(|p| !p.dirty.is_empty()) {
                self.resync_dirty(now, pid, &mut out);
            }
            self.maybe_request_add(pid, &mut out);
        }
        let members = self.members();
        let timeout = self.cfg.replica_timeout_ms;
        for (pid, p) in self.peers.iter_mut() {
            if !members.contains(pid) || p.remove_requested {
                continue;
            }
            let stalled = p.leaving
                || match p.link {
                    Link::Down { since } => now.saturating_sub(since) >= timeout,
                    Link::Sealing | Link::Streaming => {
                        let outstanding = p.acked + 1 < p.next_seq || p.link == Link::Sealing;
                        outstanding && now.saturating_sub(p.last_progress) >= timeout
                    }
                };
            if stalled {
                p.remove_requested = true;
                p.requested_at = now;
                out.push(Action::RequestIsrRemove {
                    epoch: self.cfg.epoch,
                    node: *pid,
                });
            }
        }
        // A replica outside the in-sync set that stopped answering while data is out
        // to it is sealed again, as after a reconnect. It happens when its volume
        // restarted on its node (after a disk failure) on a link that stayed up: the
        // fresh replica ignores a stream it was not sealed into, and nothing else would
        // resume its resync.
        let stuck: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(pid, p)| {
                !members.contains(pid)
                    && p.link == Link::Streaming
                    && (p.acked + 1 < p.next_seq || !p.resync_outstanding.is_empty())
                    && now.saturating_sub(p.last_progress) >= timeout
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stuck {
            out.extend(self.link_down(now, pid));
            out.extend(self.link_up(now, pid));
        }
        // A seal that got no answer (lost on a link that never reported down) is sent
        // again; sealing is idempotent.
        for (pid, p) in self.peers.iter_mut() {
            if p.link == Link::Sealing && now.saturating_sub(p.last_progress) >= timeout {
                p.last_progress = now;
                out.push(Action::Send {
                    to: *pid,
                    msg: Message::Seal {
                        epoch: self.cfg.epoch,
                        next_seq: p.acked + 1,
                    },
                });
            }
        }
        // Repeat unanswered requests.
        for (pid, p) in self.peers.iter_mut() {
            if (p.add_requested || p.remove_requested)
                && now.saturating_sub(p.requested_at) >= timeout
            {
                p.requested_at = now;
                let (epoch, node) = (self.cfg.epoch, *pid);
                out.push(if p.remove_requested {
                    Action::RequestIsrRemove { epoch, node }
                } else {
                    Action::RequestIsrAdd { epoch, node }
                });
            }
        }
        out
    }

    /// The control plane committed the in-sync set `isr` (without this node) at
    /// `epoch`: writes stop waiting for removed members; added ones count from now.
    pub fn isr_committed(&mut self, now: u64, epoch: Epoch, isr: BTreeSet<NodeId>) -> Vec<Action> {
        let mut out = Vec::new();
        if epoch != self.cfg.epoch {
            return out;
        }
        let isr: BTreeSet<NodeId> = isr.into_iter().filter(|n| *n != self.cfg.me).collect();
        let removed: Vec<NodeId> = self.in_sync.difference(&isr).copied().collect();
        let rs = self.cfg.region_size;
        for pid in self.peers.keys().copied().collect::<Vec<_>>() {
            let Some(p) = self.peers.get_mut(&pid) else {
                continue;
            };
            if isr.contains(&pid) {
                p.add_requested = false;
            }
            let dropped = removed.contains(&pid) || (p.remove_requested && !isr.contains(&pid));
            if !dropped {
                continue;
            }
            p.remove_requested = false;
            p.add_requested = false;
            if let Some(v) = self.verify.as_mut() {
                for vr in v.active.values_mut() {
                    if vr.remote.remove(&pid).is_some() {
                        *v.report.not_compared.entry(pid).or_insert(0) += 1;
                    }
                }
            }
            // It lacks everything it has not acknowledged: resync those regions when it
            // comes back, instead of holding the writes.
            for e in p.stream.iter().filter(|e| e.seq > p.acked) {
                let len = e.payload.as_ref().map_or(rs, Payload::len);
                p.dirty.mark(e.offset, len, rs);
            }
            p.stream.clear();
            p.resync_outstanding.clear();
            // The stream goes on from where it was, never back: a region read still
            // under way for an abandoned position must not land in a new entry that
            // reuses it (a stale copy of one region written over another; the power-cut
            // test found replicas differing this way). The abandoned positions count as
            // acknowledged: what they carried is marked lacking above.
            p.acked = p.next_seq - 1;
            self.deferred_reads.retain(|(peer, _, _)| *peer != pid);
            if !matches!(p.link, Link::Down { .. }) {
                // Still connected (slow or hung): restart its stream with a fresh seal;
                // it comes back through resync like any returning replica.
                p.link = Link::Sealing;
                p.last_progress = now;
                out.push(Action::Send {
                    to: pid,
                    msg: Message::Seal {
                        epoch: self.cfg.epoch,
                        next_seq: p.next_seq,
                    },
                });
            }
            self.seal_pending_acks.remove(&pid);
        }
        let changed = isr != self.in_sync;
        for pid in self.peers.keys().copied().collect::<Vec<_>>() {
            if isr.contains(&pid) {
                self.dirty_map.remove(&pid);
            } else if self.in_sync.contains(&pid) {
                // Dropped: it lacks what it had not acknowledged (now in its dirty set).
                let lacks = self
                    .peers
                    .get(&pid)
                    .map(|p| p.dirty.clone())
                    .unwrap_or_default();
                self.dirty_map.entry(pid).or_default().union_with(&lacks);
            }
        }
        self.in_sync = isr;
        if changed && !self.stage.sealing() {
            self.broadcast_dirty_map(&mut out);
        }
        let ids: Vec<u64> = self.writes.keys().copied().collect();
        let members = self.members();
        for id in ids {
            if let Some(w) = self.writes.get_mut(&id) {
                w.waiting.retain(|m| members.contains(m));
            }
            self.try_complete(now, id, &mut out);
        }
        for pid in self.peers.keys().copied().collect::<Vec<_>>() {
            self.trim_stream(pid);
        }
        self.maybe_start_seal_resync(now, &mut out);
        self.check_sealed(&mut out);
        self.pump_verify(now, &mut out);
        out
    }

    /// Records that `peer`, outside the in-sync set, may lack `regions`. What is news
    /// is persisted and sent to the streaming members ahead of anything that follows.
    fn mark_lacking(&mut self, peer: NodeId, regions: &RegionSet, out: &mut Vec<Action>) {
        if self.in_sync.contains(&peer) || peer == self.cfg.me || regions.is_empty() {
            return;
        }
        let new = self.dirty_map.entry(peer).or_default().add_all(regions);
        if new.is_empty() {
            return;
        }
        self.publish_dirty_map(false, [(peer, new)].into(), out);
    }

    /// Persists the whole map and sends it to every streaming member.
    fn broadcast_dirty_map(&mut self, out: &mut Vec<Action>) {
        self.publish_dirty_map(true, self.dirty_map.clone(), out);
    }

    /// Persists the map, and sends `peers` (all of it when `full`, else what was
    /// added) to every streaming member.
    fn publish_dirty_map(&mut self, full: bool, peers: DirtyMap, out: &mut Vec<Action>) {
        self.map_generation += 1;
        out.push(Action::PersistDirtyMap(self.dirty_map.clone()));
        // Every streaming replica, members or not: one that joins the in-sync set must
        // hold the current map from the moment it is added, or a promotion of it
        // before this primary sends the next full map would resync the others from a
        // stale one (the simulation found this).
        for (m, p) in &self.peers {
            if p.link == Link::Streaming {
                out.push(Action::Send {
                    to: *m,
                    msg: Message::DirtyMap {
                        epoch: self.cfg.epoch,
                        full,
                        generation: self.map_generation,
                        peers: peers.clone(),
                    },
                });
            }
        }
    }

    /// Places the held writes that no longer touch a region under verify, in order
    /// (none while a snapshot is being taken here).
    fn release_held(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.frozen || self.snapshot_here.is_some() {
            return;
        }
        let rs = self.cfg.region_size;
        let mut still = VecDeque::new();
        while let Some(h) = self.held.pop_front() {
            let len = h.payload.len();
            let blocked = self
                .verify
                .as_ref()
                .is_some_and(|v| regions(h.offset, len, rs).any(|r| v.active.contains_key(&r)))
                || still
                    .iter()
                    .any(|e: &Held| e.shares_region(h.offset, len, rs));
            if blocked {
                still.push_back(h);
            } else {
                self.place(now, h.tag, h.offset, h.payload, out);
            }
        }
        self.held = still;
    }

    /// What the replicas outside the in-sync set lack, as it must be on disk now.
    pub fn dirty_map(&self) -> &DirtyMap {
        &self.dirty_map
    }

    /// The activity log as it must be on disk now (a superset of every region with a
    /// write in flight or not yet durable here).
    pub fn persisted_log(&self) -> &RegionSet {
        self.persisted_log.regions()
    }

    /// Starts a planned handover: new writes are refused (the initiator retries on the
    /// next primary); those in flight finish. See [`Primary::in_flight`].
    pub fn drain(&mut self) {
        match &mut self.stage {
            Stage::Sealing { then_drain, .. } => *then_drain = true,
            Stage::Serving => self.stage = Stage::Draining,
            Stage::Draining | Stage::Released | Stage::Deposed => {}
        }
    }

    /// Regions that must stay in the persisted activity log: writes in flight, and
    /// writes no completed flush covers.
    fn live_log(&self) -> RegionSet {
        let mut s = RegionSet::new();
        for r in self.activity.keys().chain(self.unflushed.keys()) {
            s.insert(*r);
        }
        s
    }

    /// The persisted log shrinks lazily, as a replica's does: rewritten when it next
    /// grows; until then the superset on disk only costs a little resync.
    fn shrink_persisted_log(&mut self) {
        // An overestimate when a region is both in flight and unflushed: the log is
        // then rewritten a little later, never too early.
        let live = self.activity.len() + self.unflushed.len();
        if self.persisted_log.over(live) {
            let live = self.live_log();
            self.persisted_log.rewrite(live);
        }
    }

    /// A local flush placed at `mark` completed.
    fn forget_flushed(&mut self, mark: u64) {
        self.unflushed.retain(|_, done| *done > mark);
        self.shrink_persisted_log();
    }

    /// Starts a background flush when regions have waited for one long enough, or
    /// when many wait.
    fn maybe_flush(&mut self, now: u64, out: &mut Vec<Action>) {
        let due = now.saturating_sub(self.last_flush_at) >= FLUSH_EVERY_MS
            || self.unflushed.len() >= FLUSH_AT_REGIONS;
        if self.flush_running || self.unflushed.is_empty() || !due {
            return;
        }
        self.flush_running = true;
        self.last_flush_at = now;
        out.push(Action::Flush {
            mark: self.done_count,
        });
    }

    /// The background flush placed at `mark` completed (see [`Action::Flush`]).
    pub fn flushed(&mut self, mark: u64) {
        self.flush_running = false;
        self.forget_flushed(mark);
    }

    /// Regions still to resync, over all replicas (waiting or in flight).
    pub fn resync_pending(&self) -> u64 {
        self.peers
            .values()
            .map(|p| (p.dirty.len() + p.resync_outstanding.len()) as u64)
            .sum()
    }

    /// Resync progress of every replica that is being resynced or waits for one.
    pub fn resync_progress(&self) -> Vec<ResyncProgress> {
        self.peers
            .iter()
            .filter_map(|(id, p)| {
                let pending = (p.dirty.len() + p.resync_outstanding.len()) as u64;
                (pending > 0).then_some(ResyncProgress {
                    peer: *id,
                    done_regions: p.resync_done - p.resync_base,
                    pending_regions: pending,
                    connected: p.link == Link::Streaming,
                })
            })
            .collect()
    }

    /// How far each replica is behind: entries sent or queued that it has not
    /// acknowledged.
    pub fn replica_lag(&self) -> Vec<ReplicaLag> {
        self.peers
            .iter()
            .map(|(id, p)| {
                let behind = p.stream.iter().filter(|e| e.seq > p.acked);
                let (writes, bytes) = behind.fold((0, 0), |(w, b), e| {
                    (
                        w + u64::from(e.write.is_some()),
                        // Bytes still to send: a deallocation sends none.
                        b + match &e.payload {
                            Some(Payload::Data(d)) => d.len() as u64,
                            _ => 0,
                        },
                    )
                });
                ReplicaLag {
                    peer: *id,
                    writes,
                    bytes,
                    streaming: p.link == Link::Streaming,
                }
            })
            .collect()
    }

    /// Resync regions `peer` has acknowledged in this term, over all its resyncs.
    pub fn resync_done_total(&self, peer: NodeId) -> u64 {
        self.peers.get(&peer).map_or(0, |p| p.resync_done)
    }

    /// Changes the resync bandwidth per replica (bytes per second, 0 = unlimited).
    pub fn set_resync_rate(&mut self, rate: u64) {
        self.cfg.resync_rate = rate;
    }

    /// The volume grew to `size_bytes` (a resize under this primary): a full copy and a
    /// verify cover the new regions too.
    pub fn set_size(&mut self, size_bytes: u64) {
        self.cfg.size_bytes = self.cfg.size_bytes.max(size_bytes);
    }

    /// Sealing has not yet sent this term's map (it sends the map as it is then).
    fn seal_map_pending(&self) -> bool {
        matches!(
            self.stage,
            Stage::Sealing {
                resync_started: false,
                ..
            }
        )
    }

    /// Changes the rebuild bandwidth per new replica (bytes per second, 0 = unlimited).
    pub fn set_rebuild_rate(&mut self, rate: u64) {
        self.cfg.rebuild_rate = rate;
    }

    /// Writes taken and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.writes.len() + self.held.len()
    }

    /// Gives the lease up for good, before the control plane promotes the next primary:
    /// from now on this primary serves nothing, whatever renewal still arrives.
    pub fn release(&mut self) {
        if self.stage != Stage::Deposed {
            self.stage = Stage::Released;
        }
        self.lease_until = None;
    }

    /// The control plane refused a request (the epoch moved on): this primary is done.
    pub fn deposed(&mut self) -> bool {
        self.stage == Stage::Deposed
    }
}

/// Regions `[offset, offset+len)` touches.
fn regions(offset: u64, len: u64, region_size: u64) -> std::ops::RangeInclusive<u64> {
    let (first, last) = if len == 0 {
        (1, 0)
    } else {
        (offset / region_size, (offset + len - 1) / region_size)
    };
    first..=last
}

fn all_regions(size: u64, region_size: u64) -> RegionSet {
    let mut s = RegionSet::new();
    for r in regions(0, size, region_size) {
        s.insert(r);
    }
    s
}

/// The highest seq of `peer`'s stream up to which every entry is on every member: the
/// replica may drop those regions from its activity log.
///
/// While sealing, nothing is committed, not even a rewrite of a divergent region this
/// replica has acknowledged: until every member has it the region differs between
/// members, and if this primary dies before the seal completes, the next one finds it
/// only through an activity log that still names it (the simulation found a divergence
/// this way once regions stayed in the logs until flushed).
fn committed_of(peer: &Peer, writes: &BTreeMap<u64, Write>, sealing: bool) -> Seq {
    if sealing {
        // Only rewrites of divergent regions travel before the seal completes.
        return Seq(0);
    }
    let mut committed = peer.stream.front().map_or(peer.next_seq - 1, |e| e.seq - 1);
    for e in &peer.stream {
        if !e.done(peer.acked, writes) {
            break;
        }
        committed = e.seq;
    }
    committed
}

#[cfg(test)]
mod tests;
