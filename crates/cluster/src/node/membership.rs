//! Membership: this node announces itself, watches leadership, and (as leader) keeps the
//! Raft membership equal to the cluster state's nodes.

use super::*;

impl ClusterNode {
    /// Tells the cluster this node's current role, addresses and capacity, once a
    /// leader is there; retried until it commits.
    pub(super) async fn announce(self) {
        let me = self.id();
        let cmd = Command::NodeStarted {
            id: me,
            role: self.inner.options.role,
            addresses: self.inner.identity.addresses.clone(),
            capacity_bytes: self.inner.options.capacity_bytes,
            shares_blocks: self.inner.options.shares_blocks,
        };
        // Always committed, even when the local state already shows these values: the
        // answer also tells a node that was removed while it was down.
        loop {
            match self.write(cmd.clone()).await {
                Ok(Ok(_)) => return,
                Ok(Err(Refused::NoSuchNodeId(_))) => {
                    self.inner.events.push(
                        EventKind::Membership,
                        format!(
                            "node {} is no longer a member of the cluster (removed while it was down)",
                            self.inner.identity.name
                        ),
                    );
                    self.inner.removed.send_replace(true);
                    return;
                }
                Ok(Err(refused)) => {
                    warn!(%refused, "the cluster refused this node's start-up announcement");
                    self.inner.events.push(
                        EventKind::Config,
                        format!(
                            "node {} could not register its role and addresses: {refused}",
                            self.inner.identity.name
                        ),
                    );
                    return;
                }
                Err(e) => debug!(error = %e, "announcement not committed yet; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub(super) async fn watch_leadership(self) {
        let mut metrics = self.inner.raft.metrics();
        let mut last: Option<NodeId> = None;
        let mut last_state = ServerState::Learner;
        // Without a leader for QUORUM_GRACE, this node cannot reach a majority.
        let mut leaderless_since: Option<Instant> = None;
        let mut quorum_lost = false;
        loop {
            let (leader, term, state) = {
                let m = metrics.borrow_and_update();
                (m.current_leader, m.current_term, m.state)
            };
            match leader {
                None => {
                    let since = *leaderless_since.get_or_insert_with(Instant::now);
                    if !quorum_lost && since.elapsed() >= QUORUM_GRACE {
                        quorum_lost = true;
                        self.inner.events.push(
                            EventKind::QuorumLost,
                            format!(
                                "node {} has had no leader for {} s: it cannot reach a majority of the voters; volumes it is primary of stop when their lease lapses",
                                self.inner.identity.name,
                                since.elapsed().as_secs()
                            ),
                        );
                    }
                }
                Some(_) => {
                    leaderless_since = None;
                    if quorum_lost {
                        quorum_lost = false;
                        self.inner.events.push(
                            EventKind::QuorumRegained,
                            format!("node {} reaches a majority again", self.inner.identity.name),
                        );
                    }
                }
            }
            if leader != last {
                if let Ok(mut l) = self.inner.leases.lock() {
                    l.leader_changed((leader == Some(self.id())).then(Instant::now));
                }
                let name = |id: NodeId| {
                    self.inner
                        .state
                        .borrow()
                        .nodes
                        .get(&id)
                        .map(|n| n.name.clone())
                        .unwrap_or_else(|| format!("id {id}"))
                };
                match leader {
                    Some(l) => {
                        let mut details = serde_json::Map::new();
                        details.insert("leader".into(), name(l).into());
                        details.insert("term".into(), term.into());
                        self.inner.events.push_with(
                            EventKind::Leader,
                            format!("leader is node {} (term {term})", name(l)),
                            details,
                        )
                    }
                    None => self.inner.events.push(
                        EventKind::Leader,
                        format!("no leader (term {term}): election under way"),
                    ),
                }
                last = leader;
            }
            if state != last_state {
                debug!(?state, "raft state");
                last_state = state;
            }
            let grace_left = leaderless_since
                .filter(|_| !quorum_lost)
                .map(|t| QUORUM_GRACE.saturating_sub(t.elapsed()));
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() {
                    return;
                },
                _ = tokio::time::sleep(grace_left.unwrap_or(Duration::from_secs(3600))), if grace_left.is_some() => {}
            }
        }
    }

    pub(super) async fn reconcile_membership(self) {
        let me = self.id();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let m = self.inner.raft.metrics().borrow().clone();
            if m.state != ServerState::Leader || m.current_leader != Some(me) {
                continue;
            }
            let membership = m.membership_config.membership().clone();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let members: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
            let st = self.inner.state.borrow().clone();
            let raft = &self.inner.raft;
            let step = Duration::from_secs(5);

            // Removed from the state (ids that were handed out): out of the membership.
            let gone: BTreeSet<NodeId> = members
                .iter()
                .copied()
                .filter(|id| *id < st.next_node_id && !st.nodes.contains_key(id))
                .collect();
            if !gone.is_empty() {
                let remaining: BTreeSet<NodeId> = voters.difference(&gone).copied().collect();
                let change = if remaining != voters && !remaining.is_empty() {
                    ChangeMembers::ReplaceAllVoters(remaining)
                } else {
                    ChangeMembers::RemoveNodes(gone.clone())
                };
                match tokio::time::timeout(step, raft.change_membership(change, false)).await {
                    Ok(Ok(_)) => self.inner.events.push(
                        EventKind::Membership,
                        format!("node ids {gone:?} left the Raft membership"),
                    ),
                    Ok(Err(e)) => debug!(error = %e, "membership removal not done yet"),
                    Err(_) => debug!("membership removal timed out"),
                }
                continue;
            }

            // New members: learners first.
            for n in st.nodes.values().filter(|n| !members.contains(&n.id)) {
                let node = BasicNode::new(n.addresses.control.to_string());
                if let Ok(Ok(_)) =
                    tokio::time::timeout(step, raft.add_learner(n.id, node, false)).await
                {
                    info!(node = %n.name, "added as a Raft learner");
                }
            }

            // Promote caught-up, online learners until 3 (or 5) voters.
            let desired = match st.nodes.len() {
                n if n >= 5 => 5,
                n if n >= 3 => 3,
                n => n,
            };
            if voters.len() >= desired {
                continue;
            }
            let last = m.last_log_index.unwrap_or(0);
            let caught_up = |id: NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .is_some_and(|l| l.index + 10 >= last)
            };
            let mut candidates: Vec<(bool, NodeId)> = st
                .nodes
                .values()
                .filter(|n| members.contains(&n.id) && !voters.contains(&n.id))
                .filter(|n| caught_up(n.id))
                .filter(|n| self.peer_liveness(n.id).is_some_and(|l| l.online))
                .map(|n| (n.role != NodeRole::Witness, n.id))
                .collect();
            candidates.sort();
            let add: BTreeSet<NodeId> = candidates
                .into_iter()
                .take(desired - voters.len())
                .map(|(_, id)| id)
                .collect();
            if add.is_empty() {
                continue;
            }
            match tokio::time::timeout(
                step,
                raft.change_membership(ChangeMembers::AddVoterIds(add.clone()), false),
            )
            .await
            {
                Ok(Ok(_)) => {
                    let names: Vec<String> = add
                        .iter()
                        .filter_map(|id| st.nodes.get(id).map(|n| n.name.clone()))
                        .collect();
                    self.inner.events.push(
                        EventKind::Membership,
                        format!(
                            "{} now vote{} in Raft",
                            names.join(", "),
                            if names.len() == 1 { "s" } else { "" }
                        ),
                    );
                }
                Ok(Err(e)) => debug!(error = %e, "promotion not done yet"),
                Err(_) => debug!("promotion timed out"),
            }
        }
    }
}
