//! The replica side: apply the primary's stream in order, persist the highest epoch,
//! keep an activity log of regions that may hold writes the other members lack.

use std::collections::BTreeMap;

use crate::activity_log::{covers_region, PersistedLog};
use crate::bitmap::RegionSet;
use crate::message::{Epoch, Message, NodeId, Payload, Seq};

/// What the driver must do for a replica, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaAction {
    /// Send a message to the primary.
    Send {
        /// Destination.
        to: NodeId,
        /// The message.
        msg: Message,
    },
    /// Persist the epoch (fsync) before anything that follows.
    PersistEpoch(Epoch),
    /// Persist the activity log (fsync) before the write that follows: after a crash
    /// these regions are resynced.
    PersistActivityLog(RegionSet),
    /// Write (or deallocate) locally, or for a flush barrier flush the store, then
    /// call [`Replica::applied`] with `seq`. Writes are applied in order: a flush
    /// covers every write applied before it.
    Apply {
        /// Stream position.
        seq: Seq,
        /// Byte offset.
        offset: u64,
        /// What to do there.
        payload: Payload,
    },
    /// Persist the map of what the replicas outside the in-sync set lack (fsync) before
    /// anything that follows.
    PersistDirtyMap(crate::bitmap::DirtyMap),
    /// Read `region` (after every write before it) and send its CRC32C to `to` as
    /// [`Message::VerifyResult`].
    Checksum {
        /// The primary.
        to: NodeId,
        /// The epoch to answer in.
        epoch: Epoch,
        /// Region number.
        region: u64,
    },
}

/// A replica of one volume.
#[derive(Debug)]
pub struct Replica {
    region_size: u64,
    /// Highest epoch seen; persisted.
    epoch: Epoch,
    /// The primary that sealed this replica in `epoch`; `None` after a restart.
    primary: Option<NodeId>,
    /// Next seq to apply.
    next_seq: Seq,
    /// Writes that arrived ahead of `next_seq`.
    early: BTreeMap<Seq, (u64, Payload)>,
    /// Region → (epoch, highest seq) of the last write applied there that is not yet
    /// known to be on every in-sync member.
    activity: BTreeMap<u64, (Epoch, Seq)>,
    /// The activity log as persisted (a superset of `activity`'s keys).
    persisted_log: PersistedLog,
    /// What the replicas outside the in-sync set lack, as the primary told; persisted.
    dirty_map: crate::bitmap::DirtyMap,
    /// The newest map generation of this epoch applied (see [`Message::DirtyMap`]).
    map_generation: u64,
    /// The highest seq of the current epoch's stream known to be on every in-sync
    /// member (the primary's `committed`).
    committed: (Epoch, Seq),
    /// The highest seq of the current epoch applied locally, and the highest one a
    /// completed local flush covers: a region leaves the activity log only once its
    /// last write is both committed and durable here, so a power cut never takes away
    /// data that no activity log names (DRBD flushes before it evicts an AL extent).
    applied: (Epoch, Seq),
    durable: (Epoch, Seq),
    /// Flush barriers handed to the driver and not yet reported applied.
    barriers: std::collections::BTreeSet<Seq>,
    /// Seals taken so far (see [`FlushTicket`]).
    seals: u64,
    /// Test only: forget regions once committed, durable or not. The simulation with
    /// power cuts must catch this.
    #[cfg(test)]
    bug_forget_before_flush: bool,
}

/// What a background flush covers: every write applied up to `seq` in the stream as
/// it was when the flush was asked for (a seal in between restarts the stream, and the
/// flush then proves nothing about the new one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushTicket {
    seals: u64,
    seq: Seq,
}

/// Default of [`Replica::with_log_slack`] and `PrimaryConfig::activity_log_slack`
/// (`bulwark serve --activity-log-slack`): how many regions the persisted activity
/// log may carry beyond the live ones before it is rewritten smaller.
///
/// Each region that enters the log costs an fsync on the write path. With 64, random
/// writes over 1 GiB rewrote the log 100 to 700 times a second, each stalling the
/// replica's stream for about a millisecond; 1024 made replicated 4 KiB writes 20-50 %
/// faster (issue 20). The price is resync after a crash: up to this many regions more
/// (1 GiB at 1 MiB regions; DRBD's default al-extents cover about 4.8 GiB). Regions
/// only ever written whole (a rebuild, a resync) keep at most
/// [`crate::activity_log::WHOLE_REGION_SLACK`] of it, so an interrupted rebuild does not
/// copy again what it had copied.
pub const ACTIVITY_LOG_SLACK: usize = 1024;

/// Regions logged ahead of a whole-region write (see [`Replica::on_message`]). Below
/// [`crate::activity_log::WHOLE_REGION_SLACK`], so the log is not rewritten smaller at
/// every run.
const LOG_AHEAD: u64 = 32;

impl Replica {
    /// A replica that has persisted `epoch` and `activity_log` (empty for a new one).
    pub fn new(region_size: u64, epoch: Epoch, activity_log: RegionSet) -> Replica {
        // Regions from before a restart count as divergent from an older epoch: they
        // are reported at the next seal, whatever epoch it is.
        let activity = activity_log
            .iter()
            .map(|r| (r, (Epoch(0), Seq(0))))
            .collect();
        Replica {
            region_size,
            epoch,
            primary: None,
            next_seq: Seq(1),
            early: BTreeMap::new(),
            activity,
            persisted_log: PersistedLog::new(activity_log, ACTIVITY_LOG_SLACK),
            dirty_map: Default::default(),
            map_generation: 0,
            committed: (Epoch(0), Seq(0)),
            applied: (Epoch(0), Seq(0)),
            durable: (Epoch(0), Seq(0)),
            barriers: Default::default(),
            seals: 0,
            #[cfg(test)]
            bug_forget_before_flush: false,
        }
    }

    /// How many regions the persisted activity log may carry beyond the live ones.
    pub fn with_log_slack(mut self, slack: usize) -> Replica {
        self.persisted_log.set_slack(slack);
        self
    }

    /// Test only: the planted ordering bug (forget before flush).
    #[cfg(test)]
    pub fn with_bug_forget_before_flush(mut self, bug: bool) -> Replica {
        self.bug_forget_before_flush = bug;
        self
    }

    /// Starts from the map persisted before a restart.
    pub fn with_dirty_map(mut self, map: crate::bitmap::DirtyMap) -> Replica {
        self.dirty_map = map;
        self
    }

    /// The highest epoch seen.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Regions that may differ from the other members (the activity log).
    pub fn activity_log(&self) -> RegionSet {
        let mut s = RegionSet::new();
        for r in self.activity.keys() {
            s.insert(*r);
        }
        s
    }

    /// This node stops: tells the primary of the stream it follows, which takes it out
    /// of the in-sync set without waiting for the replica timeout.
    pub fn leave(&self) -> Vec<ReplicaAction> {
        self.primary
            .map(|to| ReplicaAction::Send {
                to,
                msg: Message::Leaving { epoch: self.epoch },
            })
            .into_iter()
            .collect()
    }

    /// Handles a message from `from`.
    pub fn on_message(&mut self, from: NodeId, msg: Message) -> Vec<ReplicaAction> {
        let mut out = Vec::new();
        if msg.epoch() < self.epoch {
            // A deposed primary: fence it.
            out.push(ReplicaAction::Send {
                to: from,
                msg: Message::Fenced { epoch: self.epoch },
            });
            return out;
        }
        match msg {
            Message::Seal { epoch, next_seq } => {
                if epoch > self.epoch {
                    self.epoch = epoch;
                    self.map_generation = 0;
                    out.push(ReplicaAction::PersistEpoch(epoch));
                }
                self.primary = Some(from);
                self.next_seq = next_seq;
                self.early.clear();
                self.barriers.clear();
                self.seals += 1;
                // The stream restarts at `next_seq`: later positions will carry other
                // writes, which no earlier flush or commit covers.
                for mark in [&mut self.applied, &mut self.durable, &mut self.committed] {
                    if mark.0 == epoch {
                        mark.1 = mark.1.min(next_seq - 1);
                    }
                }
                // Only regions from older epochs are divergent: this epoch's stream is
                // retransmitted from `next_seq` by the primary itself.
                let mut divergent = RegionSet::new();
                for (r, (e, _)) in &self.activity {
                    if *e < epoch {
                        divergent.insert(*r);
                    }
                }
                out.push(ReplicaAction::Send {
                    to: from,
                    msg: Message::SealAck { epoch, divergent },
                });
            }
            Message::Write {
                epoch,
                seq,
                offset,
                payload,
                committed,
            } => {
                if epoch != self.epoch || self.primary != Some(from) {
                    // Not sealed into this stream (yet): the primary seals on reconnect.
                    return out;
                }
                if seq < self.next_seq {
                    // A retransmission of something applied: acknowledge again.
                    out.push(ReplicaAction::Send {
                        to: from,
                        msg: Message::Ack {
                            epoch,
                            seq: self.next_seq - 1,
                        },
                    });
                    return out;
                }
                self.early.insert(seq, (offset, payload));
                while let Some((offset, payload)) = self.early.remove(&self.next_seq) {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let len = payload.len();
                    if len > 0 {
                        let first = offset / self.region_size;
                        let last = (offset + len - 1) / self.region_size;
                        let mut grew = false;
                        for r in first..=last {
                            self.activity.insert(r, (epoch, seq));
                            let whole = covers_region(offset, len, r, self.region_size);
                            grew |= self.persisted_log.log(r, whole);
                        }
                        if grew && len == self.region_size && offset % self.region_size == 0 {
                            // Whole regions in a row are a resync or a rebuild (or a
                            // large sequential write): log the regions that come next
                            // too, so the log is written once per run rather than once
                            // a region. A region logged ahead costs at most a region
                            // resynced for nothing after a crash; past the volume's
                            // end, nothing.
                            for r in last + 1..=last + LOG_AHEAD {
                                self.persisted_log.log_ahead(r);
                            }
                        }
                        if grew {
                            // What goes to disk is the set that decides `grew`: writing
                            // only the live regions would leave a region off the disk
                            // that a later write here does not add back (the online
                            // verify in the simulation found this).
                            out.push(ReplicaAction::PersistActivityLog(
                                self.persisted_log.regions().clone(),
                            ));
                        }
                    }
                    if payload.is_flush() {
                        self.barriers.insert(seq);
                    }
                    out.push(ReplicaAction::Apply {
                        seq,
                        offset,
                        payload,
                    });
                }
                if committed > Seq(0) && (epoch, committed) > self.committed {
                    self.committed = (epoch, committed);
                }
                self.forget_committed();
            }
            Message::DirtyMap {
                epoch,
                full,
                generation,
                peers,
            } => {
                if epoch != self.epoch || self.primary != Some(from) {
                    // Not sealed into this stream: the next seal brings a full map.
                    return out;
                }
                if full && generation >= self.map_generation {
                    self.dirty_map = peers;
                    self.map_generation = generation;
                } else {
                    // An addition, or a full map older than one already merged in (sent
                    // by another thread of the primary): what it says is lacking is
                    // lacking at least, never less.
                    self.map_generation = self.map_generation.max(generation);
                    for (node, regions) in &peers {
                        self.dirty_map.entry(*node).or_default().union_with(regions);
                    }
                }
                out.push(ReplicaAction::PersistDirtyMap(self.dirty_map.clone()));
            }
            Message::VerifyRequest { epoch, region } => {
                // After the writes before it: the driver runs actions in order.
                if epoch == self.epoch && self.primary == Some(from) {
                    out.push(ReplicaAction::Checksum {
                        to: from,
                        epoch,
                        region,
                    });
                }
            }
            Message::SealAck { .. }
            | Message::Ack { .. }
            | Message::VerifyResult { .. }
            | Message::Fenced { .. }
            | Message::Leaving { .. } => {}
        }
        out
    }

    /// The local write of `seq` is done: acknowledge it (cumulatively). For a flush
    /// barrier, everything applied before it is now durable.
    pub fn applied(&mut self, seq: Seq) -> Vec<ReplicaAction> {
        self.applied = (self.epoch, seq);
        if self.barriers.remove(&seq) {
            self.durable_through(seq);
        }
        match self.primary {
            Some(p) => vec![ReplicaAction::Send {
                to: p,
                msg: Message::Ack {
                    epoch: self.epoch,
                    seq,
                },
            }],
            None => Vec::new(),
        }
    }

    /// When some region of the activity log waits only for a local flush: what a
    /// flush begun now covers. The driver flushes the store (in the background, at its
    /// own pace) and then calls [`Replica::flushed`] with it.
    pub fn flush_due(&self) -> Option<FlushTicket> {
        let (epoch, applied) = self.applied;
        if epoch != self.epoch || applied <= self.durable.1 && self.durable.0 == epoch {
            return None;
        }
        self.activity
            .values()
            .any(|(e, s)| *e == epoch && *s <= applied)
            .then_some(FlushTicket {
                seals: self.seals,
                seq: applied,
            })
    }

    /// A local flush asked for with `ticket` has completed.
    pub fn flushed(&mut self, ticket: FlushTicket) {
        if ticket.seals == self.seals {
            self.durable_through(ticket.seq);
        }
    }

    fn durable_through(&mut self, seq: Seq) {
        if (self.epoch, seq) > self.durable {
            self.durable = (self.epoch, seq);
        }
        self.forget_committed();
    }

    /// Regions whose last write is on every in-sync member and durable here leave the
    /// activity log.
    fn forget_committed(&mut self) {
        let (epoch, committed) = self.committed;
        if epoch == Epoch(0) || epoch != self.epoch {
            // Nothing of this epoch's stream is known committed yet; regions from
            // before a restart are kept until a seal rewrites them.
            return;
        }
        #[cfg(test)]
        let durable = if self.bug_forget_before_flush {
            Seq(u64::MAX)
        } else {
            self.durable_in(epoch)
        };
        #[cfg(not(test))]
        let durable = self.durable_in(epoch);
        self.activity
            .retain(|_, (e, s)| !(*e == epoch && *s <= committed && *s <= durable));
        // The persisted log shrinks lazily: it is rewritten when it next grows, and a
        // stale superset only costs a little resync after a crash.
        // `activity` holds one entry per live region: the set is built only when the
        // log is rewritten (this runs for every message of the stream).
        if self.persisted_log.over(self.activity.len()) {
            let live = self.activity_log();
            self.persisted_log.rewrite(live);
        }
    }

    fn durable_in(&self, epoch: Epoch) -> Seq {
        if self.durable.0 == epoch {
            self.durable.1
        } else {
            Seq(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persisted_map(actions: &[ReplicaAction]) -> Option<crate::bitmap::DirtyMap> {
        actions.iter().rev().find_map(|a| match a {
            ReplicaAction::PersistDirtyMap(m) => Some(m.clone()),
            _ => None,
        })
    }

    #[test]
    fn an_older_full_map_never_takes_back_a_newer_addition() {
        let mut r = Replica::new(1 << 20, Epoch(0), RegionSet::new());
        let _ = r.on_message(
            NodeId(1),
            Message::Seal {
                epoch: Epoch(2),
                next_seq: Seq(1),
            },
        );
        let set = |regions: &[u64]| {
            let mut s = RegionSet::new();
            for r in regions {
                s.insert(*r);
            }
            s
        };
        let map =
            |regions: &[u64]| -> crate::bitmap::DirtyMap { [(NodeId(3), set(regions))].into() };
        // Generation 5 adds region 9 for replica 3; the full map of generation 4 (built
        // before, sent by another thread) arrives after it.
        let _ = r.on_message(
            NodeId(1),
            Message::DirtyMap {
                epoch: Epoch(2),
                full: false,
                generation: 5,
                peers: map(&[9]),
            },
        );
        let out = r.on_message(
            NodeId(1),
            Message::DirtyMap {
                epoch: Epoch(2),
                full: true,
                generation: 4,
                peers: map(&[1, 2]),
            },
        );
        assert_eq!(persisted_map(&out), Some(map(&[1, 2, 9])), "merged");
        // A newer full map replaces it (the primary may have shrunk it).
        let out = r.on_message(
            NodeId(1),
            Message::DirtyMap {
                epoch: Epoch(2),
                full: true,
                generation: 6,
                peers: map(&[2]),
            },
        );
        assert_eq!(persisted_map(&out), Some(map(&[2])));
    }
}
