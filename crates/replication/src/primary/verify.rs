//! Online verify: every region's CRC32C on the primary against each in-sync replica's,
//! with writes to a region held while it is compared.

use super::*;

/// Regions compared at once by an online verify.
const VERIFY_WINDOW: usize = 8;

/// What an online verify found: every region's CRC32C on this node against each
/// in-sync replica's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// The control plane's name for this verify.
    pub id: u64,
    /// Differing regions are resynced from this node.
    pub repair: bool,
    /// Regions in the volume.
    pub regions: u64,
    /// Regions compared so far.
    pub compared: u64,
    /// Regions that differ, by replica.
    pub differing: BTreeMap<NodeId, RegionSet>,
    /// Regions a replica could not be compared for (it was down or left the in-sync
    /// set), by replica.
    pub not_compared: BTreeMap<NodeId, u64>,
    /// All regions are done.
    pub finished: bool,
}

/// One region being verified.
#[derive(Debug, Default)]
pub(super) struct VerifyRegion {
    /// Checksums requested; until then it waits for the writes in flight to finish.
    pub(super) comparing: bool,
    pub(super) since: u64,
    pub(super) local: Option<u32>,
    /// The in-sync members asked, and their answers.
    pub(super) remote: BTreeMap<NodeId, Option<u32>>,
}

/// A running online verify.
#[derive(Debug)]
pub(super) struct Verify {
    pub(super) report: VerifyReport,
    /// Next region to take up.
    pub(super) next: u64,
    /// Regions under comparison: writes to them wait (see [`Primary::held`]).
    pub(super) active: BTreeMap<u64, VerifyRegion>,
    pub(super) tokens: i64,
    pub(super) tokens_at: u64,
}

impl Primary {
    /// Starts an online verify (replacing one that runs): every region's CRC32C here
    /// against each in-sync replica's. Writes to a region wait while it is compared,
    /// so a comparison never races a write; with `repair` a differing region is
    /// resynced from this node. [`Action::VerifyDone`] carries the report.
    pub fn start_verify(&mut self, now: u64, id: u64, repair: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(old) = self.verify.take() {
            if !old.report.finished {
                let mut report = old.report;
                report.finished = true;
                out.push(Action::VerifyDone(report));
            }
            self.release_held(now, &mut out);
        }
        let total = self.cfg.size_bytes.div_ceil(self.cfg.region_size);
        self.verify = Some(Verify {
            report: VerifyReport {
                id,
                repair,
                regions: total,
                ..Default::default()
            },
            next: 0,
            active: BTreeMap::new(),
            tokens: 0,
            tokens_at: now,
        });
        self.pump_verify(now, &mut out);
        out
    }

    /// Where the online verify stands (the last one, once finished).
    pub fn verify_report(&self) -> Option<VerifyReport> {
        self.verify.as_ref().map(|v| v.report.clone())
    }

    /// The local CRC32C of `region`, as asked by [`Action::ChecksumRegion`].
    pub fn verify_local(&mut self, now: u64, region: u64, crc: u32) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(vr) = self.verify.as_mut().and_then(|v| v.active.get_mut(&region)) {
            vr.local = Some(crc);
            self.pump_verify(now, &mut out);
        }
        out
    }

    /// Drops `peer` from the comparisons under way; true if it was in one.
    pub(super) fn forget_verify_answers(&mut self, peer: NodeId) -> bool {
        let Some(v) = self.verify.as_mut() else {
            return false;
        };
        let mut any = false;
        for vr in v.active.values_mut() {
            if vr.comparing && vr.remote.get(&peer) == Some(&None) {
                vr.remote.remove(&peer);
                *v.report.not_compared.entry(peer).or_insert(0) += 1;
                any = true;
            }
        }
        any
    }

    /// Moves the verify on: compares regions whose answers are in, asks for the
    /// checksums of regions whose writes have drained, takes up new regions.
    pub(super) fn pump_verify(&mut self, now: u64, out: &mut Vec<Action>) {
        if !matches!(self.stage, Stage::Serving | Stage::Draining) {
            return;
        }
        let epoch = self.cfg.epoch;
        let rs = self.cfg.region_size;
        let timeout = self.cfg.replica_timeout_ms.saturating_mul(10);
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if v.report.finished {
            return;
        }
        // 1. Answers that will not come.
        for vr in v.active.values_mut().filter(|vr| vr.comparing) {
            if now.saturating_sub(vr.since) >= timeout {
                let silent: Vec<NodeId> = vr
                    .remote
                    .iter()
                    .filter(|(_, c)| c.is_none())
                    .map(|(n, _)| *n)
                    .collect();
                for n in silent {
                    vr.remote.remove(&n);
                    *v.report.not_compared.entry(n).or_insert(0) += 1;
                }
            }
        }
        // 2. Compare the regions that have every answer.
        let done: Vec<u64> = v
            .active
            .iter()
            .filter(|(_, vr)| vr.local.is_some() && vr.remote.values().all(Option::is_some))
            .map(|(r, _)| *r)
            .collect();
        let mut repairs = Vec::new();
        for r in &done {
            let Some(vr) = v.active.remove(r) else {
                continue;
            };
            v.report.compared += 1;
            for (n, crc) in vr.remote {
                if crc != vr.local {
                    v.report.differing.entry(n).or_default().insert(*r);
                    if v.report.repair {
                        repairs.push((n, *r));
                    }
                }
            }
        }
        // 3. New regions, within the window and the resync rate (a verify reads every
        // region here and on each replica).
        let rate = self.cfg.resync_rate;
        if rate > 0 {
            let burst = ((rate / 10) as i64).clamp(rs as i64, (rs * VERIFY_WINDOW as u64) as i64);
            let earned = (rate as u128 * now.saturating_sub(v.tokens_at) as u128 / 1000) as i64;
            v.tokens = v.tokens.saturating_add(earned).min(burst);
            v.tokens_at = now;
        }
        while v.active.len() < VERIFY_WINDOW
            && v.next < v.report.regions
            && (rate == 0 || v.tokens > 0)
        {
            v.active.insert(v.next, VerifyRegion::default());
            v.next += 1;
            if rate > 0 {
                v.tokens -= rs as i64;
            }
        }
        // 4. Ask for checksums where no write is in flight any more (new ones wait).
        for (r, vr) in v.active.iter_mut().filter(|(_, vr)| !vr.comparing) {
            // Only repairs to members count: a replica outside the in-sync set (down,
            // or still being rebuilt) is not compared, and waiting for its copies would
            // hold the verify until it returns (a verify of a volume whose old primary
            // was dead hung this way).
            let repairing = self
                .in_sync
                .iter()
                .filter_map(|m| self.peers.get(m))
                .any(|p| {
                    p.dirty.contains(*r)
                        || p.stream
                            .iter()
                            .any(|e| e.write.is_none() && e.offset / rs == *r && e.seq > p.acked)
                });
            if self.activity.contains_key(r) || repairing {
                continue;
            }
            vr.comparing = true;
            vr.since = now;
            for m in &self.in_sync {
                let streaming = self.peers.get(m).is_some_and(|p| p.link == Link::Streaming);
                if streaming {
                    vr.remote.insert(*m, None);
                    out.push(Action::Send {
                        to: *m,
                        msg: Message::VerifyRequest { epoch, region: *r },
                    });
                } else {
                    *v.report.not_compared.entry(*m).or_insert(0) += 1;
                }
            }
            out.push(Action::ChecksumRegion { region: *r });
        }
        let finished = v.next >= v.report.regions && v.active.is_empty();
        if finished {
            v.report.finished = true;
            out.push(Action::VerifyDone(v.report.clone()));
        }
        let took_up_new = !done.is_empty() || finished;
        for (n, r) in repairs {
            if let Some(p) = self.peers.get_mut(&n) {
                p.dirty.insert(r);
            }
            self.resync_dirty(now, n, out);
        }
        if took_up_new {
            self.release_held(now, out);
        }
    }
}
