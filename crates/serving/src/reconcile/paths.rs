//! Paths and ALUA (SPC-4 §5.15): which nodes serve a target, the port groups and
//! their states, task management and reservation news passed to the other paths, and
//! explicit ALUA requests (SET TARGET PORT GROUPS) acted on as planned moves.

use super::*;

/// The storage nodes that serve target `t`: those that hold a replica of every one of
/// its volumes, primary first.
pub fn target_nodes(st: &ClusterState, t: &Target) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = Vec::new();
    for (i, vol) in t.volumes().iter().enumerate() {
        let Some(v) = st.volumes.get(vol) else {
            return Vec::new();
        };
        if i == 0 {
            nodes = v.replicas.clone();
        } else {
            nodes.retain(|n| v.replicas.contains(n));
        }
    }
    if let Some(p) = st.target_primary(t) {
        nodes.sort_by_key(|n| *n != p);
    }
    nodes
}

/// The target port group of a node: its node id (also its portal group tag and
/// relative target port identifier).
pub fn port_group_of(node: NodeId) -> u16 {
    u16::try_from(node).unwrap_or(u16::MAX)
}

/// The ALUA table of target `t` (SPC-4 §5.15), the same on every node: one group per
/// serving node; the primary's active/optimized, other nodes in sync for every volume
/// active/non-optimized (their commands are forwarded) or, as the target says, standby;
/// the rest unavailable.
pub fn port_groups(st: &ClusterState, t: &Target) -> Vec<scsi::alua::TargetPortGroup> {
    port_groups_with(st, t, &|_| false)
}

/// Whether `node` is in the in-sync set of every volume of `t`.
pub(super) fn in_sync_for(st: &ClusterState, t: &Target, node: NodeId) -> bool {
    t.volumes().iter().all(|vol| {
        st.volumes
            .get(vol)
            .is_some_and(|v| v.in_sync.contains(&node))
    })
}

/// [`port_groups`], counting the nodes `recently_in_sync` says left the in-sync set only
/// a moment ago as still in sync: a replica that flaps out and back within the grace
/// changes no state, so initiators get no unit attention storm.
pub(super) fn port_groups_with(
    st: &ClusterState,
    t: &Target,
    recently_in_sync: &dyn Fn(NodeId) -> bool,
) -> Vec<scsi::alua::TargetPortGroup> {
    use scsi::alua::AsymmetricAccessState as S;
    let primary = st.target_primary(t);
    target_nodes(st, t)
        .into_iter()
        .map(|n| {
            let in_sync = in_sync_for(st, t, n) || recently_in_sync(n);
            let state = if Some(n) == primary {
                S::ActiveOptimized
            } else if in_sync && t.standby_paths {
                S::Standby
            } else if in_sync {
                S::ActiveNonOptimized
            } else {
                S::Unavailable
            };
            scsi::alua::TargetPortGroup {
                id: port_group_of(n),
                state,
                preferred: Some(n) == primary,
                ports: vec![port_group_of(n)],
            }
        })
        .collect()
}

/// The other nodes serving a target whose primary is here: a cold reset and the
/// aborts of PREEMPT AND ABORT reach their sessions over the replication links.
pub(super) struct ClusterPaths {
    pub(super) net: Arc<ReplicationNet>,
    pub(super) node: ClusterNode,
    pub(super) iqn: String,
    pub(super) me: NodeId,
}

impl std::fmt::Debug for ClusterPaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPaths")
            .field("iqn", &self.iqn)
            .finish()
    }
}

impl ClusterPaths {
    /// Sends `tmf` to every other node serving the target but the one whose port group
    /// is `except` (the node a forwarded cold reset came through ends its own sessions
    /// once it has answered the task management request).
    fn tell_others(&self, tmf: &scsi::ForwardedTaskManagement, except: Option<u16>) {
        let others: Vec<NodeId> = {
            let st = self.node.state().borrow().clone();
            st.targets
                .get(&self.iqn)
                .map(|t| target_nodes(&st, t))
                .unwrap_or_default()
                .into_iter()
                .filter(|n| *n != self.me && Some(port_group_of(*n)) != except)
                .collect()
        };
        let body = crate::forward::encode_task_management(tmf);
        for n in others {
            self.net.forward(
                replication::NodeId(n),
                &self.iqn,
                body.clone(),
                Box::new(|_| {}),
            );
        }
    }
}

impl scsi::RemotePaths for ClusterPaths {
    fn cold_reset(&self, by: &scsi::ItNexus) {
        self.tell_others(
            &scsi::ForwardedTaskManagement::Reset {
                kind: scsi::ResetKind::TargetCold,
                lun: None,
                by: by.clone(),
            },
            Some(by.target_port.group),
        );
    }

    fn preempted(&self, lun: u64, nexus: &scsi::ItNexus) {
        self.tell_others(
            &scsi::ForwardedTaskManagement::AbortTasks {
                lun,
                nexus: Some(nexus.clone()),
            },
            None,
        );
    }

    fn reservation_preempted(&self, lun: u64, by: &scsi::ItNexus, removed: &[scsi::ItNexus]) {
        let volume = self
            .node
            .state()
            .borrow()
            .targets
            .get(&self.iqn)
            .and_then(|t| t.luns.get(&lun).cloned())
            .unwrap_or_default();
        let losers: Vec<String> = removed.iter().map(|n| n.initiator_port_name()).collect();
        let mut details = serde_json::Map::new();
        details.insert("target".into(), self.iqn.clone().into());
        details.insert("lun".into(), lun.into());
        details.insert("volume".into(), volume.clone().into());
        details.insert("by".into(), by.initiator_port_name().into());
        details.insert("preempted".into(), losers.clone().into());
        self.node.events().push_with(
            EventKind::ReservationPreempted,
            format!(
                "{} preempted the persistent reservation registration(s) of {} on {volume} (LUN {lun} of {})",
                by.initiator_port_name(),
                losers.join(", "),
                self.iqn
            ),
            details,
        );
    }
}

impl Serving {
    /// SET TARGET PORT GROUPS received for `t` (explicit ALUA, SPC-4 §6.36): asking for
    /// another node's group to become active/optimized is a planned move of the
    /// target's volumes there. Other requests are logged and left: the states follow
    /// from which node is primary and which are in sync.
    pub(super) fn act_on_alua_requests(
        &self,
        st: &ClusterState,
        t: &Target,
        device: &scsi::TargetDevice,
        nodes: &[NodeId],
    ) {
        use scsi::alua::AsymmetricAccessState as S;
        for req in device.take_alua_requests() {
            let to = nodes
                .iter()
                .find(|n| port_group_of(**n) == req.group)
                .and_then(|n| st.nodes.get(n));
            let (Some(to), S::ActiveOptimized, Some(volume)) =
                (to, req.state, t.volumes().first().cloned())
            else {
                info!(target = %t.iqn, group = req.group, state = ?req.state, "SET TARGET PORT GROUPS request left alone");
                continue;
            };
            if to.id == self.me {
                continue;
            }
            self.events.push(
                EventKind::Alua,
                format!(
                    "{} asked for {} to be active/optimized for {}: moving it there",
                    req.by.initiator_port_name(),
                    to.name,
                    t.iqn
                ),
            );
            let (node, cmd) = (
                self.node.clone(),
                Command::MoveVolume {
                    volume: volume.clone(),
                    node: to.name.clone(),
                },
            );
            let events = self.events.clone();
            self.rt.spawn(async move {
                match node.write(cmd).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(r)) => {
                        events.push(EventKind::Alua, format!("the move was refused: {r}"))
                    }
                    Err(e) => {
                        warn!(error = %e, "move asked by SET TARGET PORT GROUPS not committed")
                    }
                }
            });
        }
    }
}
