//! The Raft leader's failover rules: when a primary's lease is surely over, and which
//! member of the in-sync set takes its place.
//!
//! Pure and clock-agnostic (`T` is [`std::time::Instant`] in the node and virtual time
//! in tests), so the node (`watch_primaries` in `node/failover.rs`, `grant_leases` in
//! `node/requests.rs`) and the replication simulation (`replication/src/sim.rs`) run
//! this same code: a bug planted here (feature `planted-bugs`) is caught by the
//! simulation.
//!
//! "Never two writers" rests on [`LeaseBook::lease_over`]: a primary serves only while
//! its lease lasts, and it counts the lease from before it asked, so once the leader
//! sees the lease over (plus a margin for clock rates and message delay), the old
//! primary has stopped. See docs/design-notes.md, "Leases and failover".

use std::collections::HashMap;
use std::ops::Add;
use std::time::Duration;

use crate::state::NodeId;

/// How long leases last and what the leader adds before it believes one is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailoverTiming {
    /// How long a lease lasts from the moment the leader confirmed its leadership.
    pub lease: Duration,
    /// Added before a lease counts as over: message delay and clock-rate differences.
    pub margin: Duration,
}

/// What the Raft leader knows about primaries' leases: the grants it made, since when
/// it leads (a predecessor's grants are unknown to it), and when it first saw each
/// epoch (the first lease of a new primary may be granted by any leader).
#[derive(Debug)]
pub struct LeaseBook<T> {
    timing: FailoverTiming,
    leading_since: Option<T>,
    /// By volume: (epoch, expiry) of the last grant.
    granted: HashMap<String, (u64, T)>,
    /// By (volume, epoch): when this leader first saw it.
    first_seen: HashMap<(String, u64), T>,
}

impl<T: Copy + Ord + Add<Duration, Output = T>> LeaseBook<T> {
    /// An empty book: not leading.
    pub fn new(timing: FailoverTiming) -> Self {
        LeaseBook {
            timing,
            leading_since: None,
            granted: HashMap::new(),
            first_seen: HashMap::new(),
        }
    }

    /// The timing this book applies.
    pub fn timing(&self) -> FailoverTiming {
        self.timing
    }

    /// Leadership changed: `Some(now)` when this node became leader, `None` when it
    /// lost leadership. The grants recorded so far are forgotten either way (another
    /// leader may have granted leases since).
    pub fn leader_changed(&mut self, leading_since: Option<T>) {
        self.leading_since = leading_since;
        self.granted.clear();
    }

    /// Whether this node leads (failover decisions are the leader's alone).
    pub fn leading(&self) -> bool {
        self.leading_since.is_some()
    }

    /// Records a lease granted to `volume`'s primary at `epoch`, counted from
    /// `confirmed_at`: the moment before the leader confirmed its leadership.
    pub fn grant(&mut self, volume: &str, epoch: u64, confirmed_at: T) {
        self.granted.insert(
            volume.to_string(),
            (epoch, confirmed_at + self.timing.lease),
        );
    }

    /// Notes that `volume` is at `epoch` now, leading or not: a new epoch's primary is
    /// given a lease from its first sighting to get its first grant (see
    /// [`Self::lease_over`]), and an epoch seen long before this node led needs none.
    pub fn observe(&mut self, now: T, volume: &str, epoch: u64) {
        self.first_seen
            .entry((volume.to_string(), epoch))
            .or_insert(now);
    }

    /// Forgets first sightings of epochs that are over; `current` gives a volume's
    /// epoch (`None`: the volume is gone).
    pub fn retain_current(&mut self, current: impl Fn(&str) -> Option<u64>) {
        self.first_seen
            .retain(|(v, e), _| current(v).is_some_and(|c| c == *e));
    }

    /// Whether the primary of `volume` at `epoch` surely holds no lease any more, so a
    /// successor may be promoted without two writers. Not leading: never. Records the
    /// first sighting of the epoch.
    ///
    /// `primary_online` says whether the primary still answers heartbeats. A primary
    /// that does is given a whole lease from this leader's start (or from the epoch's
    /// first sighting) to renew with it, so a change of leader never deposes a healthy
    /// primary. One that does not is deposed as soon as no lease of this leader's own
    /// covers it, and its epoch is older than a lease ([`Self::observe`]): every lease
    /// a predecessor granted ran out before this leader was elected, because voters
    /// wait [`election_silence`] before they vote. (A node just restarted looks silent
    /// until its first heartbeat arrives; a fresh epoch's primary keeps its grace.)
    pub fn lease_over(&mut self, now: T, volume: &str, epoch: u64, primary_online: bool) -> bool {
        let Some(since) = self.leading_since else {
            return false;
        };
        let seen = *self
            .first_seen
            .entry((volume.to_string(), epoch))
            .or_insert(now);
        let live = self
            .granted
            .get(volume)
            .is_some_and(|&(e, expiry)| e == epoch && expiry > now);
        #[cfg(feature = "planted-bugs")]
        let live = live && !planted::is(PlantedBug::IgnoreGrantedLease);
        if live {
            return false;
        }
        if !primary_online {
            return now > seen + self.timing.lease + self.timing.margin;
        }
        // A lease granted by a predecessor, or the first lease of this epoch, may run
        // until a whole lease after this leader started or first saw the epoch.
        now > since.max(seen) + self.timing.lease + self.timing.margin
    }
}

/// How long a Raft voter must have heard nothing from any leader before it votes for
/// a new one (openraft's leader lease on followers: `election_timeout_max`), and how
/// long a node that just started withholds its vote and its candidacy (it may have
/// acknowledged a leader just before it stopped).
///
/// At least one primary lease: a lease is granted only after a quorum acknowledged the
/// leader (`ensure_linearizable`), any quorum that elects a successor shares a voter
/// with it, and that voter acknowledged the grant no earlier than the grant was
/// counted from. So by the time a successor is elected every lease its predecessors
/// granted has expired, and the successor need not wait one out for a primary that
/// stopped answering ([`LeaseBook::lease_over`]). The node configures openraft with
/// this (`node.rs`), and the simulation elects with it.
pub fn election_silence(timing: FailoverTiming) -> Duration {
    #[cfg(feature = "planted-bugs")]
    if planted::is(PlantedBug::ElectWithinLease) {
        return timing.lease / 4;
    }
    timing.lease
}

/// A member of a group's in-sync set, as the leader sees it when choosing a successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Node.
    pub id: NodeId,
    /// Reachable now (heartbeats).
    pub online: bool,
    /// Back from a power loss and not resynced since: it may lack writes it
    /// acknowledged that no flush covered.
    pub lost_power: bool,
}

/// Who takes over a group whose primary's lease is over, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Successor {
    /// Another online member that kept its cache: it has every acknowledged write.
    Other(NodeId),
    /// The old primary itself: the only member online.
    Same(NodeId),
    /// A member back from a power loss: the only kind online. Every flushed write is
    /// there; writes no flush covered may be gone.
    LostPower(NodeId),
}

impl Successor {
    /// The node to promote.
    pub fn node(self) -> NodeId {
        match self {
            Successor::Other(n) | Successor::Same(n) | Successor::LostPower(n) => n,
        }
    }

    /// Why this node, in words for `bulwark status` and events; `name` names a node.
    pub fn reason(self, old_primary: NodeId, name: impl Fn(NodeId) -> String) -> String {
        match self {
            Successor::LostPower(n) => format!(
                "{} held no lease; {} is the only member of the in-sync set online, though it came back from a power loss (writes no flush covered may be gone; every flushed write is there)",
                name(old_primary),
                name(n)
            ),
            Successor::Same(n) => format!(
                "{} held no lease and is the only member of the in-sync set that is online",
                name(n)
            ),
            Successor::Other(n) => format!(
                "{} held no lease; {} is in the in-sync set (it has every write a flush covered) and online, and another node goes before the old primary (which may have lost power and with it writes no flush covered)",
                name(old_primary),
                name(n)
            ),
        }
    }
}

/// Chooses who takes over from `primary` among the in-sync `members` (of every volume
/// of the group): online members only; those that kept their cache first; then another
/// node before the old primary (it may have lost power without anyone knowing yet);
/// then the lowest id, so every leader chooses alike. `None`: nobody in sync is online,
/// and the group stays offline rather than serve stale data.
pub fn successor(primary: NodeId, members: &[Member]) -> Option<Successor> {
    let m = members
        .iter()
        .filter(|m| m.online)
        .min_by_key(|m| (m.lost_power, m.id == primary, m.id))?;
    Some(if m.lost_power {
        Successor::LostPower(m.id)
    } else if m.id == primary {
        Successor::Same(m.id)
    } else {
        Successor::Other(m.id)
    })
}

/// Deliberate bugs in these rules, for the simulation to catch.
#[cfg(feature = "planted-bugs")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// [`LeaseBook::lease_over`] ignores the leases this leader granted.
    IgnoreGrantedLease,
    /// [`election_silence`] is shorter than a lease: a voter may elect a successor
    /// while a lease the deposed leader granted still runs.
    ElectWithinLease,
}

/// Plants `bug` in this thread's failover rules (`None`: the rules as written). The
/// simulation runs one seed per thread, so tests in parallel do not see each other's.
#[cfg(feature = "planted-bugs")]
pub fn plant(bug: Option<PlantedBug>) {
    planted::BUG.with(|b| b.set(bug));
}

#[cfg(feature = "planted-bugs")]
mod planted {
    use super::PlantedBug;
    use std::cell::Cell;

    thread_local! {
        pub(super) static BUG: Cell<Option<PlantedBug>> = const { Cell::new(None) };
    }

    pub(super) fn is(bug: PlantedBug) -> bool {
        BUG.with(|b| b.get() == Some(bug))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: FailoverTiming = FailoverTiming {
        lease: Duration::from_millis(800),
        margin: Duration::from_millis(200),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lease_is_over_only_after_lease_and_margin_from_leadership_sighting_and_grant() {
        let mut book = LeaseBook::new(TIMING);
        assert!(
            !book.lease_over(ms(5_000), "v", 1, true),
            "not leading: never"
        );
        book.leader_changed(Some(ms(1_000)));
        // First seen at 1 100: a predecessor's grant may last until 1 100 + 800.
        assert!(!book.lease_over(ms(1_100), "v", 1, true));
        assert!(!book.lease_over(ms(2_100), "v", 1, true));
        assert!(book.lease_over(ms(2_101), "v", 1, true));
        // A grant of its own keeps it live until the grant expires.
        book.grant("v", 1, ms(2_000));
        assert!(!book.lease_over(ms(2_799), "v", 1, true));
        assert!(book.lease_over(ms(2_801), "v", 1, true));
        // A grant at another epoch does not count for this one.
        book.grant("v", 0, ms(3_000));
        assert!(book.lease_over(ms(3_001), "v", 1, true));
        // A new leader forgets grants and counts from its own start.
        book.leader_changed(Some(ms(4_000)));
        assert!(!book.lease_over(ms(4_500), "v", 1, true));
        assert!(book.lease_over(ms(5_001), "v", 1, true));
    }

    #[test]
    fn a_silent_primary_is_deposed_once_no_grant_of_this_leader_covers_it() {
        let mut book = LeaseBook::new(TIMING);
        // Epoch 1 seen as a follower, long before this node leads.
        book.observe(ms(0), "v", 1);
        assert!(
            !book.lease_over(ms(5_000), "v", 1, false),
            "not leading: never"
        );
        // A new leader: its predecessors' leases ended before its election.
        book.leader_changed(Some(ms(5_000)));
        assert!(book.lease_over(ms(5_000), "v", 1, false));
        assert!(
            !book.lease_over(ms(5_000), "v", 1, true),
            "an online primary may renew"
        );
        // Its own grant holds until it expires, online or not.
        book.grant("v", 1, ms(5_100));
        assert!(!book.lease_over(ms(5_899), "v", 1, false));
        assert!(book.lease_over(ms(5_901), "v", 1, false));
        // A fresh epoch's primary gets a lease (and margin) from its first sighting to
        // get its first grant, even while it looks silent (just restarted).
        book.observe(ms(6_000), "v", 2);
        assert!(!book.lease_over(ms(6_999), "v", 2, false));
        assert!(book.lease_over(ms(7_001), "v", 2, false));
    }

    #[test]
    fn voters_wait_at_least_a_lease_before_they_elect() {
        assert!(election_silence(TIMING) >= TIMING.lease);
    }

    #[test]
    fn a_new_epoch_gets_a_whole_lease_from_its_first_sighting() {
        let mut book = LeaseBook::new(TIMING);
        book.leader_changed(Some(ms(0)));
        assert!(!book.lease_over(ms(3_000), "v", 2, true));
        assert!(book.lease_over(ms(4_001), "v", 2, true));
        book.retain_current(|_| Some(3));
        assert!(!book.lease_over(ms(4_500), "v", 3, true));
    }

    #[test]
    fn successor_prefers_cache_then_another_node_then_lowest_id() {
        let m = |id, online, lost_power| Member {
            id,
            online,
            lost_power,
        };
        assert_eq!(
            successor(
                1,
                &[m(1, true, false), m(2, true, false), m(3, true, false)]
            ),
            Some(Successor::Other(2))
        );
        assert_eq!(
            successor(
                1,
                &[m(1, true, false), m(2, true, true), m(3, false, false)]
            ),
            Some(Successor::Same(1))
        );
        assert_eq!(
            successor(1, &[m(1, false, false), m(2, true, true)]),
            Some(Successor::LostPower(2))
        );
        assert_eq!(
            successor(1, &[m(1, false, false), m(2, false, false)]),
            None
        );
    }
}
