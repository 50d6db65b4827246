//! The activity log as it must be on disk, shared by the primary and the replica:
//! which regions it names, and when it is rewritten smaller.
//!
//! Any superset of the live regions (writes in flight, or not yet durable everywhere)
//! is a correct log: a region named for nothing costs only its resync after a crash.
//! So what stays beyond the live regions is a choice of cost. Each region that enters
//! the log is an fsync on the write path; each region kept is a region resynced after
//! a crash, and, on a replica whose rebuild is interrupted, a region rebuilt again.
//! As DRBD's al-extents do, the log keeps the regions small random writes come back to
//! (least recently used leave first). Regions only ever written whole (a rebuild, a
//! resync, a sequential run over new ground) leave early: such writes seldom come back.
//! Writing a region whole neither warms nor cools it, so a sequential pass over regions
//! random writes keep returning to does not push them out (and make the next random
//! pass write the log again for each).

use std::collections::HashMap;

use crate::RegionSet;

/// At most this many regions written whole stay in the log beyond the live ones (or
/// the slack, if smaller). A rebuild or resync writes every region whole once, so
/// keeping them would only make an interrupted rebuild copy them again.
pub(crate) const WHOLE_REGION_SLACK: usize = 64;

/// True when `[offset, offset + len)` covers all of `region`.
pub(crate) fn covers_region(offset: u64, len: u64, region: u64, region_size: u64) -> bool {
    let start = region * region_size;
    offset <= start && offset + len >= start + region_size
}

/// The persisted activity log's contents (see the module doc).
#[derive(Debug)]
pub(crate) struct PersistedLog {
    /// The regions named, as on disk once the last [`PersistedLog::log`] that returned
    /// true has been persisted. A rewrite smaller reaches the disk with the next growth:
    /// until then the disk holds a superset, which is still correct.
    regions: RegionSet,
    /// The regions of `regions` a write covering only part of them touched → when the
    /// last such write was logged (a counter). The others were only written whole,
    /// logged ahead of a run, or came from the disk at start.
    partial: HashMap<u64, u64>,
    clock: u64,
    /// How many regions the log may carry beyond the live ones.
    slack: usize,
}

impl PersistedLog {
    /// The log as read from disk at start.
    pub(crate) fn new(on_disk: RegionSet, slack: usize) -> PersistedLog {
        PersistedLog {
            regions: on_disk,
            partial: HashMap::new(),
            clock: 0,
            slack,
        }
    }

    pub(crate) fn set_slack(&mut self, slack: usize) {
        self.slack = slack;
    }

    /// The regions to persist.
    pub(crate) fn regions(&self) -> &RegionSet {
        &self.regions
    }

    /// A write to `region` (all of it when `whole`) is about to be made: true when the
    /// region is new to the log, which must then be persisted before the write.
    pub(crate) fn log(&mut self, region: u64, whole: bool) -> bool {
        if !whole {
            self.clock += 1;
            self.partial.insert(region, self.clock);
        }
        self.regions.insert(region)
    }

    /// Names `region` ahead of a run of whole-region writes, so the log is written once
    /// per run rather than once a region; it counts as written whole (if at all).
    pub(crate) fn log_ahead(&mut self, region: u64) {
        self.regions.insert(region);
    }

    /// True when the log carries more than allowed beyond `live` regions (the number
    /// of live regions): then [`PersistedLog::rewrite`] it.
    pub(crate) fn over(&self, live: usize) -> bool {
        let whole = self.regions.len() - self.partial.len();
        self.regions.len() > live + self.slack || whole > live + self.slack.min(WHOLE_REGION_SLACK)
    }

    /// Rewrites the log to the `live` regions and the regions small writes came back to
    /// most recently, up to half the slack (so the log is not rewritten again at once).
    pub(crate) fn rewrite(&mut self, live: RegionSet) {
        let keep = self.slack / 2;
        let mut recent: Vec<(u64, u64)> = self
            .partial
            .iter()
            .filter(|(r, _)| !live.contains(**r))
            .map(|(r, at)| (*at, *r))
            .collect();
        if recent.len() > keep {
            recent.select_nth_unstable_by(keep, |a, b| b.cmp(a));
            recent.truncate(keep);
        }
        let mut regions = live;
        for (_, r) in recent {
            regions.insert(r);
        }
        self.partial.retain(|r, _| regions.contains(*r));
        self.regions = regions;
        debug_assert!(self.partial.keys().all(|r| self.regions.contains(*r)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(regions: impl IntoIterator<Item = u64>) -> RegionSet {
        let mut s = RegionSet::new();
        for r in regions {
            s.insert(r);
        }
        s
    }

    #[test]
    fn a_region_is_covered_only_by_a_write_over_all_of_it() {
        assert!(covers_region(0, 4096, 0, 4096));
        assert!(covers_region(4000, 8192 + 96, 1, 4096));
        assert!(!covers_region(4096, 4095, 1, 4096));
        assert!(!covers_region(4097, 8192, 1, 4096));
        assert!(!covers_region(0, 4096, 1, 4096));
    }

    #[test]
    fn regions_written_whole_leave_first_and_hot_ones_stay() {
        let mut log = PersistedLog::new(RegionSet::new(), 1024);
        // Small random writes over 100 regions, then a rebuild writing 65 whole ones.
        for r in 0..100 {
            assert!(log.log(r, false));
        }
        assert!(!log.over(0), "100 partly written regions fit the slack");
        for r in 1000..1065 {
            assert!(log.log(r, true));
        }
        assert!(log.over(0), "65 whole regions are over what they may keep");
        log.rewrite(RegionSet::new());
        assert_eq!(log.regions(), &set(0..100));
        // A sequential pass over the hot regions pushes none of them out.
        for r in 0..100 {
            assert!(!log.log(r, true));
        }
        for r in 2000..2065 {
            log.log(r, true);
        }
        assert!(log.over(0));
        log.rewrite(set([7]));
        assert_eq!(log.regions(), &set(0..100));
    }

    #[test]
    fn a_rewrite_keeps_the_most_recent_half_of_the_slack() {
        let mut log = PersistedLog::new(set([500, 501]), 8);
        for r in 0..10 {
            log.log(r, false);
        }
        assert!(log.over(3));
        log.rewrite(set([0, 3]));
        // Live 0 and 3, then the four most recent others: 9, 8, 7, 6.
        assert_eq!(log.regions(), &set([0, 3, 6, 7, 8, 9]));
        assert!(!log.over(2));
        // Region 2 came back: it is now the most recent.
        assert!(log.log(2, false));
        log.rewrite(RegionSet::new());
        assert_eq!(log.regions(), &set([2, 7, 8, 9]));
    }

    proptest! {
        /// Whatever the writes, a rewrite keeps every live region, never keeps more
        /// than the slack allows, and `over` is false right after it.
        #[test]
        fn a_rewrite_keeps_the_live_regions_and_fits(
            slack in 0usize..20,
            writes in proptest::collection::vec((0u64..40, any::<bool>()), 0..200),
            live in proptest::collection::btree_set(0u64..40, 0..10),
        ) {
            let mut log = PersistedLog::new(set([41, 42]), slack);
            for (r, whole) in writes {
                let grew = !log.regions().contains(r);
                prop_assert_eq!(log.log(r, whole), grew);
                prop_assert!(log.regions().contains(r));
                if log.over(0) {
                    // What a rewrite drops: nothing live; what it keeps fits.
                    log.rewrite(set([r]));
                    prop_assert!(log.regions().contains(r));
                    prop_assert!(!log.over(1));
                }
            }
            let live = set(live);
            log.rewrite(live.clone());
            for r in live.iter() {
                prop_assert!(log.regions().contains(r));
            }
            prop_assert!(log.regions().len() <= live.len() + slack / 2);
            prop_assert!(!log.over(live.len()));
        }
    }
}
