//! Carrying out the engines' actions: one loop per engine (primary, replica) that the
//! threaded driver (`volume.rs`) and the simulation (`sim.rs`) share.
//!
//! The engine ([`Primary`], [`Replica`]) says what to do; a [`PrimaryEffects`] or
//! [`ReplicaEffects`] does it — a store,
//! files, a transport and a control plane in the product; a disk model and an event
//! queue in the simulation (with its power-loss model). What comes back from the disk
//! (a local write done, a flush done, a region read, a checksum) goes back into the
//! engine here, in the order the engine relies on: the follow-up actions run before any
//! action queued after them.

use bytes::Bytes;

use crate::bitmap::{DirtyMap, RegionSet};
use crate::message::{Epoch, Message, NodeId, Payload};
use crate::primary::{Action, Primary, VerifyReport, WriteTag};
use crate::replica::{Replica, ReplicaAction};

/// What a primary's actions do, where they run. Disk methods report their own
/// failures (a failed disk, a log line) and return `None` then; the loop goes on with
/// the next action.
pub(crate) trait PrimaryEffects {
    /// Runs `f` on the engine at the current time (the driver locks it; the simulation
    /// owns it). `None`: the engine is gone (this node is no longer primary).
    fn engine<R>(&mut self, f: impl FnOnce(&mut Primary, u64) -> R) -> Option<R>;

    /// Whether actions that touch the disk may run here. When not (the driver on a
    /// network task), they are handed to [`PrimaryEffects::defer`] in order.
    fn may_touch_disk(&self) -> bool {
        true
    }

    /// Takes a disk action to be carried out elsewhere (see `may_touch_disk`).
    fn defer(&mut self, _action: Action) {}

    /// Queues `msg` to replica `to`.
    fn send(&mut self, to: NodeId, msg: Message);

    /// Writes `data` at `offset` to the local store (not yet durable).
    fn write(&mut self, offset: u64, data: &Bytes) -> Option<()>;

    /// Deallocates `len` bytes at `offset` in the local store (they read as zeroes).
    fn deallocate(&mut self, offset: u64, len: u64) -> Option<()>;

    /// Makes every local write so far durable.
    fn flush(&mut self) -> Option<()>;

    /// Takes the local copy of snapshot `name` (every earlier local write is done, no
    /// later one has started). A failure is reported by the implementation (the
    /// snapshot fails; the volume goes on): it is not a failed disk.
    fn snapshot(&mut self, name: &str);

    /// Replaces the local copy with its copy of snapshot `name` (every earlier local
    /// write is done, no later one has started). A failure is a failed disk: what the
    /// copy holds is not known any more.
    fn rollback(&mut self, name: &str) -> Option<()>;

    /// Saves the activity log (at least `log`; the driver saves the newest).
    fn persist_activity_log(&mut self, log: RegionSet) -> Option<()>;

    /// Saves the map of what out-of-sync replicas lack.
    fn persist_dirty_map(&mut self, map: DirtyMap) -> Option<()>;

    /// Reads one region for a resync: its bytes, or a deallocation when the local copy
    /// holds none of it (the replica's copy stays thin).
    fn read_region(&mut self, region: u64) -> Option<Payload>;

    /// Takes a resync read to carry out elsewhere, several at once (the driver's
    /// readers), which then hand the data to [`Primary::region_read`]; false to read
    /// it here, in order.
    fn read_region_elsewhere(&mut self, _peer: NodeId, _seq: crate::Seq, _region: u64) -> bool {
        false
    }

    /// The regions of the local copy that hold data (the rest reads as zeroes); `None`
    /// when the store cannot tell (a new replica then gets every region).
    fn allocated_regions(&mut self) -> Option<RegionSet> {
        None
    }

    /// Checksums one local region for a verify.
    fn checksum_region(&mut self, region: u64) -> Option<u32>;

    /// An initiator write (or flush) is on every in-sync member: it may be acknowledged.
    fn complete(&mut self, tag: WriteTag);

    /// Asks the control plane to add `node` to the in-sync set at `epoch`.
    fn request_isr_add(&mut self, epoch: Epoch, node: NodeId);

    /// Asks the control plane to drop `node` from the in-sync set at `epoch`.
    fn request_isr_remove(&mut self, epoch: Epoch, node: NodeId);

    /// An online verify finished.
    fn verify_done(&mut self, report: VerifyReport);

    /// A newer primary exists.
    fn deposed(&mut self, epoch: Epoch);

    /// The in-sync set is sealed: this primary serves.
    fn sealed(&mut self) {}

    /// Whether to stop carrying out the rest (the simulation stops at a broken
    /// invariant, or when a deposed primary stepped down).
    fn stopped(&self) -> bool {
        false
    }
}

/// Carries out `actions` and everything they lead to.
pub(crate) fn run_primary_actions(fx: &mut impl PrimaryEffects, actions: Vec<Action>) {
    let mut queue: std::collections::VecDeque<Action> = actions.into();
    while let Some(a) = queue.pop_front() {
        if fx.stopped() {
            return;
        }
        if let Action::ReadRegion { peer, seq, region } = a {
            if fx.read_region_elsewhere(peer, seq, region) {
                continue;
            }
        }
        let touches_disk = matches!(
            a,
            Action::LocalWrite { .. }
                | Action::PersistActivityLog(_)
                | Action::PersistDirtyMap(_)
                | Action::Flush { .. }
                | Action::ReadRegion { .. }
                | Action::ChecksumRegion { .. }
                | Action::ScanAllocation { .. }
        );
        if touches_disk && !fx.may_touch_disk() {
            fx.defer(a);
            continue;
        }
        match a {
            Action::Send { to, msg } => fx.send(to, msg),
            Action::LocalWrite {
                id,
                offset,
                payload,
            } => {
                let done = match payload {
                    Payload::Data(data) => fx.write(offset, &data),
                    Payload::Deallocate(len) => fx.deallocate(offset, len),
                    Payload::Flush => fx.flush(),
                    Payload::Snapshot(name) => {
                        fx.snapshot(&name);
                        Some(())
                    }
                    Payload::Rollback { snapshot, .. } => fx.rollback(&snapshot),
                };
                if done.is_some() {
                    queue.extend(
                        fx.engine(|p, now| p.local_done(now, id))
                            .unwrap_or_default(),
                    );
                }
            }
            Action::PersistActivityLog(log) => {
                let _ = fx.persist_activity_log(log);
            }
            Action::PersistDirtyMap(map) => {
                let _ = fx.persist_dirty_map(map);
            }
            Action::Flush { mark } => {
                if fx.flush().is_some() {
                    fx.engine(|p, _| p.flushed(mark));
                }
            }
            Action::ReadRegion { peer, seq, region } => {
                if let Some(payload) = fx.read_region(region) {
                    queue.extend(
                        fx.engine(|p, _| p.region_read(peer, seq, payload))
                            .unwrap_or_default(),
                    );
                }
            }
            Action::ChecksumRegion { region } => {
                if let Some(crc) = fx.checksum_region(region) {
                    queue.extend(
                        fx.engine(|p, now| p.verify_local(now, region, crc))
                            .unwrap_or_default(),
                    );
                }
            }
            Action::ScanAllocation { peer } => {
                let allocated = fx.allocated_regions();
                queue.extend(
                    fx.engine(|p, now| p.allocation_scanned(now, peer, allocated.as_ref()))
                        .unwrap_or_default(),
                );
            }
            Action::Complete(tag) => fx.complete(tag),
            Action::RequestIsrAdd { epoch, node } => fx.request_isr_add(epoch, node),
            Action::RequestIsrRemove { epoch, node } => fx.request_isr_remove(epoch, node),
            Action::VerifyDone(report) => fx.verify_done(report),
            Action::Deposed { epoch } => fx.deposed(epoch),
            Action::Sealed => fx.sealed(),
        }
    }
}

/// What a replica's actions do, where they run (see [`PrimaryEffects`]). A failure
/// that must stop the replica (no ack may follow it) makes [`ReplicaEffects::stopped`]
/// true; the loop then carries out nothing more.
pub(crate) trait ReplicaEffects {
    /// Runs `f` on the replica engine (`None`: this node is no longer a replica).
    fn engine<R>(&mut self, f: impl FnOnce(&mut Replica) -> R) -> Option<R>;

    /// Queues `msg` to the primary `to`.
    fn send(&mut self, to: NodeId, msg: Message);

    /// Saves the epoch (before anything that follows is acknowledged).
    fn persist_epoch(&mut self, epoch: Epoch) -> Option<()>;

    /// Saves the activity log (before the write that follows).
    fn persist_activity_log(&mut self, log: RegionSet) -> Option<()>;

    /// Saves the map of what out-of-sync replicas lack.
    fn persist_dirty_map(&mut self, map: DirtyMap) -> Option<()>;

    /// Applies one position of the stream locally (a write, a deallocation, or for a
    /// flush barrier a flush).
    fn apply(&mut self, offset: u64, payload: &Payload) -> Option<()>;

    /// Checksums one local region for a verify (`None`: not answered; the primary
    /// reports the region as not compared).
    fn checksum_region(&mut self, region: u64) -> Option<u32>;

    /// Whether to carry out nothing more.
    fn stopped(&self) -> bool;
}

/// Carries out a replica's `actions` and everything they lead to.
pub(crate) fn run_replica_actions(fx: &mut impl ReplicaEffects, actions: Vec<ReplicaAction>) {
    let mut queue: std::collections::VecDeque<ReplicaAction> = actions.into();
    while let Some(a) = queue.pop_front() {
        if fx.stopped() {
            return;
        }
        match a {
            ReplicaAction::Send { to, msg } => fx.send(to, msg),
            ReplicaAction::PersistEpoch(e) => {
                let _ = fx.persist_epoch(e);
            }
            ReplicaAction::PersistActivityLog(log) => {
                let _ = fx.persist_activity_log(log);
            }
            ReplicaAction::PersistDirtyMap(map) => {
                let _ = fx.persist_dirty_map(map);
            }
            ReplicaAction::Apply {
                seq,
                offset,
                payload,
            } => {
                if fx.apply(offset, &payload).is_some() {
                    queue.extend(fx.engine(|r| r.applied(seq)).unwrap_or_default());
                }
            }
            ReplicaAction::Checksum { to, epoch, region } => {
                if let Some(crc) = fx.checksum_region(region) {
                    fx.send(to, Message::VerifyResult { epoch, region, crc });
                }
            }
        }
    }
}
