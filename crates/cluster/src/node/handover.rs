//! A graceful stop is a planned move: before a node stops serving, the targets it is
//! primary of move to another in-sync node, so their initiators see the ~40 ms pause
//! of a move instead of a failover (issue 19).

use super::*;

/// What a stopping node handed over.
#[derive(Debug, Default)]
pub struct HandOver {
    /// Volumes (one per target) moved, and the node each went to.
    pub moved: Vec<(String, String)>,
    /// Volumes that stay here until the node stops (no other in-sync member online, a
    /// move refused, or not done in time): they fail over when its lease lapses.
    pub left: Vec<(String, String)>,
}

impl ClusterNode {
    /// The volumes whose in-sync set this node is in as a replica (not as primary).
    pub fn in_sync_sets_joined(&self) -> Vec<String> {
        let me = self.id();
        self.inner
            .state
            .borrow()
            .volumes
            .values()
            .filter(|v| v.primary != me && v.in_sync.contains(&me))
            .map(|v| v.name.clone())
            .collect()
    }

    /// Moves every target this node is primary of to another in-sync node, and waits
    /// (at most `limit`) until they are served there.
    pub async fn hand_over_primaries(&self, limit: Duration) -> HandOver {
        let me = self.id();
        let deadline = Instant::now() + limit;
        let st = self.inner.state.borrow().clone();
        let offline = |id: NodeId| !self.peer_liveness(id).is_some_and(|l| l.online);
        let (moves, stuck) = st.hand_over_from(me, offline);
        let name = |id: NodeId| {
            st.nodes
                .get(&id)
                .map_or_else(|| format!("id {id}"), |n| n.name.clone())
        };
        let mut out = HandOver::default();
        for v in stuck {
            out.left
                .push((v, "no other in-sync member is online".to_string()));
        }
        // All moves at once: committed one after another, the last of 64 targets
        // waited for 63 commits before its move began (issue 19).
        let mut commits = tokio::task::JoinSet::new();
        for (volume, to) in moves {
            let cmd = Command::MoveVolume {
                volume: volume.clone(),
                node: name(to),
            };
            let node = self.clone();
            let to = name(to);
            commits.spawn(async move {
                let done = tokio::time::timeout_at(deadline.into(), node.write(cmd)).await;
                (volume, to, done)
            });
        }
        let mut pending = Vec::new();
        while let Some(joined) = commits.join_next().await {
            let Ok((volume, to, done)) = joined else {
                continue;
            };
            match done {
                Ok(Ok(Ok(_))) => pending.push((volume, to)),
                Ok(Ok(Err(refused))) => out.left.push((volume, refused.to_string())),
                Ok(Err(e)) => out.left.push((volume, e.to_string())),
                Err(_) => out
                    .left
                    .push((volume, "the move was not committed in time".into())),
            }
        }
        let mut changes = self.inner.state.clone();
        while !pending.is_empty() {
            let now = self.inner.state.borrow().clone();
            let (done, waiting): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(v, _)| {
                now.volumes
                    .get(v)
                    .is_none_or(|x| x.primary != me && x.moving_to.is_none())
            });
            out.moved.extend(done);
            pending = waiting;
            if pending.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, changes.changed()).await.is_err() {
                out.left.extend(
                    pending
                        .drain(..)
                        .map(|(v, _)| (v, "the move did not finish in time".to_string())),
                );
            }
        }
        for (v, to) in &out.moved {
            self.inner.events.push(
                EventKind::Drain,
                format!(
                    "{} stops: {v} (and the rest of its target) moved to {to}",
                    self.inner.identity.name
                ),
            );
        }
        for (v, why) in &out.left {
            self.inner.events.push(
                EventKind::Drain,
                format!(
                    "{} stops: {v} stays until its lease lapses, then fails over: {why}",
                    self.inner.identity.name
                ),
            );
        }
        out
    }
}
