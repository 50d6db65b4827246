//! Elections as soon as they are safe, and never sooner.
//!
//! openraft's followers refuse to vote while they heard from a leader within
//! `election_timeout_max` (its leader lease), which we set to
//! [`failover::election_silence`]: so a successor is elected only after every lease
//! its predecessor granted has run out, and may promote over a silent primary at once
//! ([`LeaseBook::lease_over`]). Two holes are closed here:
//! - A node that restarts forgets when it last heard a leader, so for one election
//!   silence after it starts it neither votes nor stands.
//! - openraft starts an election only after the leader lease *plus* a random election
//!   timeout (0.8 + 0.4..0.8 s). When the leader is silent on every network, the
//!   voters stand in the order of their ids, one election silence after they last
//!   heard it, a moment apart so that they do not split the vote.
//!
//! [`failover::election_silence`]: crate::failover::election_silence
//! [`LeaseBook::lease_over`]: crate::failover::LeaseBook::lease_over

use super::*;

/// How long after a voter last heard the leader the first voter stands: the election
/// silence plus the time other voters may have heard the leader after this one.
const SLACK: Duration = Duration::from_millis(40);

/// Between one voter standing and the next (in id order): long enough for a vote
/// request and its answer, short against the whole failover.
const STAGGER: Duration = Duration::from_millis(150);

/// How often a follower looks.
const EVERY: Duration = Duration::from_millis(10);

/// What a node knows about its contact with the Raft leader.
#[derive(Debug)]
pub(super) struct LeaderContact {
    /// When the process started.
    started: Instant,
    /// When an AppendEntries or InstallSnapshot from a leader was last accepted.
    last: Mutex<Instant>,
}

impl LeaderContact {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        LeaderContact {
            started: now,
            last: Mutex::new(now),
        }
    }

    /// A leader's message was accepted.
    pub(super) fn heard(&self) {
        if let Ok(mut t) = self.last.lock() {
            *t = Instant::now();
        }
    }

    fn since_heard(&self) -> Duration {
        self.last.lock().map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Whether this node may vote yet: not within one election silence of its start.
    pub(super) fn may_vote(&self) -> bool {
        self.started.elapsed() >= silence()
    }
}

/// The election silence the node runs with.
pub(super) fn silence() -> Duration {
    crate::failover::election_silence(FAILOVER_TIMING)
}

impl ClusterNode {
    /// Follower duty: stand for election as soon as the leader is gone and the vote
    /// can be won (see the module comment). Also lifts the candidacy ban a start puts
    /// on the node once the election silence has passed.
    pub(super) async fn hasten_elections(self) {
        tokio::time::sleep(silence()).await;
        self.inner.raft.runtime_config().elect(true);
        let me = self.id();
        let mut stood_for: Option<(u64, Instant)> = None;
        loop {
            tokio::time::sleep(EVERY).await;
            let m = self.inner.raft.metrics().borrow().clone();
            let Some(leader) = m.current_leader.filter(|l| *l != me) else {
                continue;
            };
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            if !voters.contains(&me) {
                continue;
            }
            let rank = voters.iter().filter(|v| **v != leader && **v < me).count() as u32;
            let silent = self.inner.contact.since_heard();
            if silent < silence() + SLACK + STAGGER * rank {
                continue;
            }
            // Raft silence alone may be a slow leader; the heartbeats on every network
            // must agree that it is gone.
            if self.peer_liveness(leader).is_none_or(|l| l.online) {
                continue;
            }
            // Once per term: a lost election falls back to openraft's own timer.
            if stood_for
                .is_some_and(|(term, at)| term == m.current_term && at.elapsed() < silence())
            {
                continue;
            }
            stood_for = Some((m.current_term, Instant::now()));
            info!(
                "the leader (node {leader}) is silent for {} ms on every network; standing for election",
                silent.as_millis()
            );
            if let Err(e) = self.inner.raft.trigger().elect().await {
                warn!("standing for election failed: {e}");
            }
        }
    }
}
