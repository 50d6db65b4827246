//! Leader duty: keep every volume's redundancy over the life of the cluster. Drained
//! nodes hand their primaries over by planned moves; the replicas of nodes being
//! evacuated, or offline longer than the replace-after setting, are rebuilt elsewhere;
//! volumes short of replicas (after a dead node was removed with no room left) get new
//! ones once a node has room. What to do is decided by [`ClusterState::upkeep`]; this
//! loop only watches liveness and proposes.

use super::*;
use crate::state::Upkeep;

/// How often the leader looks.
const EVERY: Duration = Duration::from_secs(1);

/// The same change is not proposed again sooner: a planned move takes a moment to
/// show in the state. (A different one, the next step of a rolling restart, goes at
/// once.)
const RETRY: Duration = Duration::from_secs(5);

impl ClusterNode {
    pub(super) async fn watch_redundancy(self) {
        let me = self.id();
        let mut offline_since: HashMap<NodeId, Instant> = HashMap::new();
        let mut proposed: HashMap<String, Instant> = HashMap::new();
        let mut changes = self.inner.state.clone();
        loop {
            // At every change (a drain asked for, a rebuild done), else now and then
            // (liveness changes are not state changes).
            if let Ok(Err(_)) = tokio::time::timeout(EVERY, changes.changed()).await {
                // The state is gone: the node is shutting down.
                return;
            }
            if self.inner.raft.metrics().borrow().current_leader != Some(me) {
                // A new leader starts counting offline time afresh: it cannot know
                // how long a node was gone before (it errs towards waiting longer).
                offline_since.clear();
                continue;
            }
            let st = self.inner.state.borrow().clone();
            let now = Instant::now();
            let mut offline_for = HashMap::new();
            for n in st.nodes.values().filter(|n| n.id != me) {
                let l = self.peer_liveness(n.id);
                if l.as_ref().is_some_and(|l| l.online) {
                    offline_since.remove(&n.id);
                    continue;
                }
                let since = *offline_since.entry(n.id).or_insert(now);
                let heard = l
                    .and_then(|l| l.last_heard_ms)
                    .map(Duration::from_millis)
                    .unwrap_or_default();
                offline_for.insert(n.id, now.duration_since(since).max(heard));
            }
            offline_since.retain(|id, _| st.nodes.contains_key(id));
            proposed.retain(|_, at| now.duration_since(*at) < RETRY);
            for group in st.groups() {
                let Some(step) = st.upkeep(&group, &offline_for) else {
                    continue;
                };
                let (cmd, kind, text) = describe(&st, &group, step);
                let key = serde_json::to_string(&cmd).unwrap_or_default();
                if proposed.contains_key(&key) {
                    continue;
                }
                proposed.insert(key, now);
                match self.write(cmd).await {
                    Ok(Ok(_)) => self.inner.events.push(kind, text),
                    Ok(Err(r)) => debug!(refused = %r, "{text}: refused"),
                    Err(e) => debug!(error = %e, "{text}: not committed"),
                }
            }
        }
    }
}

/// The command that carries `step` out, and the event that says so.
fn describe(st: &ClusterState, group: &[String], step: Upkeep) -> (Command, EventKind, String) {
    let name = |id: NodeId| st.node_name(id);
    match step {
        Upkeep::Move { volume, from, to } => (
            Command::MoveVolume {
                volume,
                node: name(to),
            },
            EventKind::Drain,
            format!(
                "moving {} from {} to {} (planned move): {}",
                group.join(", "),
                name(from),
                name(to),
                if st.nodes.get(&from).is_some_and(|n| n.drained) {
                    "the node is drained"
                } else {
                    "the node is being replaced"
                }
            ),
        ),
        Upkeep::Replace {
            volume,
            old,
            new,
            why,
        } => (
            Command::ChangeReplicas {
                volume,
                add: Some(name(new)),
                remove: Some(name(old)),
                force: false,
            },
            EventKind::Rebuild,
            format!(
                "{why}: replacing its replicas of {} by new ones on {}",
                group.join(", "),
                name(new)
            ),
        ),
        Upkeep::Add { volume, new } => (
            Command::ChangeReplicas {
                volume,
                add: Some(name(new)),
                remove: None,
                force: false,
            },
            EventKind::Rebuild,
            format!(
                "{} had fewer replicas than wanted: adding one on {}",
                group.join(", "),
                name(new)
            ),
        ),
    }
}
