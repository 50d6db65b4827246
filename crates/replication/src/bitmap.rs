//! Sets of regions: the dirty bitmap of a replica out of the in-sync set, and a
//! replica's activity log.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Replica → the regions it may lack (see [`crate::Message::DirtyMap`]).
pub type DirtyMap = std::collections::BTreeMap<crate::NodeId, RegionSet>;

/// A set of region numbers (region = `offset / region_size`). Sparse: a volume mostly
/// has few dirty regions, and the set travels in [`crate::Message::SealAck`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSet(BTreeSet<u64>);

impl RegionSet {
    /// An empty set.
    pub fn new() -> Self {
        RegionSet::default()
    }

    /// Adds every region that `[offset, offset + len)` touches; true if one was new.
    pub fn mark(&mut self, offset: u64, len: u64, region_size: u64) -> bool {
        debug_assert!(region_size > 0);
        if len == 0 {
            return false;
        }
        let first = offset / region_size;
        let last = (offset + len - 1) / region_size;
        let mut grew = false;
        for r in first..=last {
            grew |= self.0.insert(r);
        }
        grew
    }

    /// Adds one region.
    pub fn insert(&mut self, region: u64) -> bool {
        self.0.insert(region)
    }

    /// Removes one region.
    pub fn remove(&mut self, region: u64) -> bool {
        self.0.remove(&region)
    }

    /// Adds every region of `other`.
    pub fn union_with(&mut self, other: &RegionSet) {
        self.0.extend(other.0.iter().copied());
    }

    /// True when `region` is in the set.
    pub fn contains(&self, region: u64) -> bool {
        self.0.contains(&region)
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The regions in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().copied()
    }

    /// Keeps only the regions that are also in `other`.
    pub fn intersect_with(&mut self, other: &RegionSet) {
        self.0.retain(|r| other.0.contains(r));
    }

    /// Removes every region from `end` on.
    pub fn truncate(&mut self, end: u64) {
        let _ = self.0.split_off(&end);
    }

    /// Removes every region.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Adds every region of `other`; the ones that were new.
    pub fn add_all(&mut self, other: &RegionSet) -> RegionSet {
        RegionSet(
            other
                .0
                .iter()
                .copied()
                .filter(|r| self.0.insert(*r))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_touched_region() {
        let mut s = RegionSet::new();
        assert!(s.mark(4095, 2, 4096));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 1]);
        assert!(!s.mark(0, 4096, 4096), "already there");
        assert!(!s.mark(10, 0, 4096), "empty range");
        let mut t = RegionSet::new();
        t.insert(7);
        s.union_with(&t);
        assert_eq!(s.len(), 3);
    }
}
