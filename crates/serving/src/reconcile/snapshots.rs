//! Taking the snapshots the cluster asks of the volumes primary here (issue 21): one
//! per group of volumes (a target's, which share this primary) at once, in a thread
//! of its own, reported to the cluster as taken (with its members and the write pause)
//! or deleted (it could not be taken; every node then removes its copy).

use super::*;

/// The volumes of one snapshot or rollback, primary here: (name, volume); `T` is the
/// volume's running primary role (a stand-in in tests).
type Group<T = Arc<PrimaryVolume>> = Vec<(String, T)>;

impl Serving {
    /// Starts taking the snapshots the state asks of volumes primary here, each once.
    pub(super) fn take_snapshots(&self, st: &ClusterState, roles: &HashMap<String, Role>) {
        let groups = primary_groups(st, self.me, &running_here(roles), |v| {
            v.snapshots
                .iter()
                .filter(|(_, s)| !s.ready && s.epoch == v.epoch)
                .map(|(name, _)| name.clone())
                .collect()
        });
        for ((name, epoch), group) in groups {
            let key = (name.clone(), group[0].0.clone(), epoch);
            let first = self
                .snapshots_started
                .lock()
                .is_ok_and(|mut running| running.insert(key.clone()));
            if !first {
                continue;
            }
            // The key stays once the thread ran: until this node's state shows the
            // outcome, a reconcile must not take the same snapshot again.
            let (node, rt, me) = (self.node.clone(), self.rt.clone(), self.me);
            let spawned = std::thread::Builder::new()
                .name("bulwark-snapshot".into())
                .spawn(move || take_snapshot(&node, &rt, me, &name, epoch, &group));
            if let Err(e) = spawned {
                error!(snapshot = %key.0, error = %e, "cannot start taking a snapshot");
                if let Ok(mut r) = self.snapshots_started.lock() {
                    r.remove(&key);
                }
            }
        }
    }
}

/// The groups of volumes primary here that `asked` (the snapshot or rollback names a
/// volume has pending) names, by (name, epoch): those whose every volume has its
/// primary role running at that epoch. A group with a volume whose role has not
/// started yet (just promoted) waits for it, so its volumes share one point of their
/// streams instead of being taken one by one.
fn primary_groups<T: Clone>(
    st: &ClusterState,
    me: NodeId,
    running: &dyn Fn(&Volume) -> Option<T>,
    asked: impl Fn(&Volume) -> Vec<String>,
) -> BTreeMap<(String, u64), Group<T>> {
    // `None`: a volume of the group has no running role yet.
    let mut groups: BTreeMap<(String, u64), Option<Group<T>>> = BTreeMap::new();
    for v in st.volumes.values().filter(|v| v.primary == me) {
        let running = running(v);
        for name in asked(v) {
            let g = groups
                .entry((name, v.epoch))
                .or_insert_with(|| Some(Vec::new()));
            match (g.as_mut(), &running) {
                (Some(g), Some(volume)) => g.push((v.name.clone(), volume.clone())),
                _ => *g = None,
            }
        }
    }
    groups
        .into_iter()
        .filter_map(|(k, g)| g.map(|g| (k, g)))
        .collect()
}

/// The primary role of a volume running here at its epoch, from `roles`.
fn running_here(
    roles: &HashMap<String, Role>,
) -> impl Fn(&Volume) -> Option<Arc<PrimaryVolume>> + '_ {
    move |v| match roles.get(&v.name) {
        Some(Role::Primary { epoch, volume, .. }) if *epoch == v.epoch => Some(volume.clone()),
        _ => None,
    }
}

/// Takes snapshot `name` of `group` (volumes primary here at `epoch`) and commits the
/// outcome.
fn take_snapshot(
    node: &ClusterNode,
    rt: &tokio::runtime::Handle,
    me: NodeId,
    name: &str,
    epoch: u64,
    group: &[(String, Arc<PrimaryVolume>)],
) {
    let volumes: Vec<&PrimaryVolume> = group.iter().map(|(_, v)| v.as_ref()).collect();
    let names: Vec<String> = group.iter().map(|(n, _)| n.clone()).collect();
    let commit = |cmd: Command| match rt.block_on(node.write(cmd)) {
        Ok(Ok(_)) => true,
        Ok(Err(r)) => {
            warn!(snapshot = name, refused = %r, "snapshot report refused");
            false
        }
        Err(e) => {
            warn!(snapshot = name, error = %e, "snapshot report not committed");
            false
        }
    };
    let mut details = serde_json::Map::new();
    details.insert("snapshot".into(), name.into());
    details.insert("volumes".into(), names.clone().into());
    match PrimaryVolume::snapshot_group(&volumes, name) {
        Ok((pause, members)) => {
            let mut holders = BTreeSet::new();
            for (v, replicas) in names.iter().zip(members) {
                let mut members: Vec<NodeId> = replicas.iter().map(|n| n.0).collect();
                members.insert(0, me);
                holders.extend(members.iter().copied());
                commit(Command::SnapshotTaken {
                    volume: v.clone(),
                    name: name.to_string(),
                    epoch,
                    members,
                    pause_us: pause.as_micros() as u64,
                });
            }
            let st = node.state().borrow().clone();
            let holders: Vec<String> = holders.iter().map(|n| st.node_name(*n)).collect();
            details.insert("members".into(), holders.clone().into());
            details.insert("pause_us".into(), (pause.as_micros() as u64).into());
            node.events().push_with(
                EventKind::Snapshot,
                format!(
                    "snapshot {name} of {} taken on {} (writes held {:.1} ms)",
                    names.join(", "),
                    holders.join(", "),
                    pause.as_secs_f64() * 1000.0
                ),
                details,
            );
        }
        Err(e) => {
            error!(snapshot = name, volumes = ?names, error = %e, "the snapshot could not be taken");
            commit(Command::DeleteSnapshot {
                volumes: names.clone(),
                name: name.to_string(),
            });
            details.insert("error".into(), e.to_string().into());
            node.events().push_with(
                EventKind::Snapshot,
                format!(
                    "snapshot {name} of {} could not be taken: {e}; nothing of it is kept",
                    names.join(", ")
                ),
                details,
            );
        }
    }
}

impl Serving {
    /// A clone's copy here, when this node is one of the snapshot members it was made
    /// on and has no copy yet: a reflink of its copy of the snapshot. Without the
    /// snapshot's copy this node cannot start the clone (an empty copy would pass for
    /// one in sync).
    pub(super) fn make_clone_copy(&self, v: &Volume) -> Result<()> {
        let Some(o) = v.origin.as_ref().filter(|o| o.members.contains(&self.me)) else {
            return Ok(());
        };
        let path = self.volume_path(&v.name);
        if path.exists() {
            return Ok(());
        }
        let snapshot = crate::snapshots::snapshot_path(&self.volume_path(&o.volume), &o.snapshot);
        let err = |source| ServingError::Store {
            volume: format!("{} (made from {}@{})", v.name, o.volume, o.snapshot),
            source,
        };
        let src = blockstore::FileStore::open(
            &snapshot,
            &blockstore::OpenOptions {
                block_size: v.block_size,
                read_only: true,
                ..Default::default()
            },
        )
        .map_err(err)?;
        src.reflink_to(&path).map_err(err)?;
        info!(volume = %v.name, from = %snapshot.display(), "made this node's copy of a clone");
        Ok(())
    }
}

impl Serving {
    /// Acts on the rollbacks the state asks for, each once: with `force`, the
    /// sessions of the targets whose LUNs they are end on every node serving them; the
    /// primary then rolls its volumes back (a target's together, in a thread of its
    /// own) and reports it done.
    pub(super) fn run_rollbacks(&self, st: &ClusterState, roles: &HashMap<String, Role>) {
        let pending = |v: &Volume| v.rollback.as_ref().filter(|r| r.epoch == v.epoch).cloned();
        let groups = primary_groups(st, self.me, &running_here(roles), |v| {
            pending(v).map(|r| r.snapshot).into_iter().collect()
        });
        let mut fresh: HashSet<String> = HashSet::new();
        for v in st.volumes.values() {
            let Some(r) = pending(v) else {
                continue;
            };
            if v.primary == self.me && !groups.contains_key(&(r.snapshot.clone(), r.epoch)) {
                // Primary here, a role of its group not started yet: act once all have.
                continue;
            }
            let first = self
                .rollbacks_seen
                .lock()
                .is_ok_and(|mut seen| seen.insert((r.snapshot.clone(), v.name.clone(), r.epoch)));
            if !first {
                continue;
            }
            fresh.insert(v.name.clone());
            if r.force {
                for t in st
                    .targets
                    .values()
                    .filter(|t| t.luns.values().any(|l| *l == v.name))
                {
                    info!(target = %t.iqn, volume = %v.name, "ending the target's sessions for a rollback");
                    self.server.kill_target_sessions(&t.iqn);
                }
            }
        }
        // A group's volumes are seen together (none while one waits): it starts once.
        for ((name, epoch), group) in groups {
            if !fresh.contains(&group[0].0) {
                continue;
            }
            let (node, rt) = (self.node.clone(), self.rt.clone());
            let spawned = std::thread::Builder::new()
                .name("bulwark-rollback".into())
                .spawn(move || roll_back(&node, &rt, &name, epoch, &group));
            if let Err(e) = spawned {
                error!(error = %e, "cannot start a rollback");
            }
        }
    }
}

/// Rolls `group` (volumes primary here at `epoch`) back to snapshot `name` and
/// commits the outcome.
fn roll_back(
    node: &ClusterNode,
    rt: &tokio::runtime::Handle,
    name: &str,
    epoch: u64,
    group: &[(String, Arc<PrimaryVolume>)],
) {
    let volumes: Vec<&PrimaryVolume> = group.iter().map(|(_, v)| v.as_ref()).collect();
    let names: Vec<String> = group.iter().map(|(n, _)| n.clone()).collect();
    let outcome = PrimaryVolume::rollback_group(&volumes, name);
    let error = outcome.as_ref().err().map(|e| e.to_string());
    for v in &names {
        let cmd = Command::RollbackDone {
            volume: v.clone(),
            name: name.to_string(),
            epoch,
            error: error.clone(),
        };
        match rt.block_on(node.write(cmd)) {
            Ok(Ok(_)) => {}
            Ok(Err(r)) => warn!(volume = %v, refused = %r, "rollback report refused"),
            Err(e) => warn!(volume = %v, error = %e, "rollback report not committed"),
        }
    }
    let mut details = serde_json::Map::new();
    details.insert("snapshot".into(), name.into());
    details.insert("volumes".into(), names.clone().into());
    let text = match &outcome {
        Ok((pause, _)) => {
            details.insert("pause_us".into(), (pause.as_micros() as u64).into());
            format!(
                "{} rolled back to snapshot {name} (writes held {:.1} ms)",
                names.join(", "),
                pause.as_secs_f64() * 1000.0
            )
        }
        Err(e) => {
            details.insert("error".into(), e.to_string().into());
            format!(
                "{} could not be rolled back to snapshot {name}: {e}",
                names.join(", ")
            )
        }
    };
    node.events().push_with(EventKind::Snapshot, text, details);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target's two volumes asked for one snapshot just after a promotion: no group
    /// while one of their roles is not running, then both together.
    #[test]
    fn a_group_waits_for_every_role() {
        let mut st = crate::test_support::state_with_nodes(2);
        for (name, first) in [("a", "n1"), ("b", "n1"), ("c", "n2")] {
            st.apply(&Command::CreateVolume {
                name: name.into(),
                size_bytes: 1 << 30,
                replicas: 1,
                block_size: 512,
                physical_block_size: None,
                nodes: vec![first.into()],
            })
            .unwrap();
        }
        for volumes in [
            vec!["a".to_string(), "b".to_string()],
            vec!["c".to_string()],
        ] {
            st.apply(&Command::CreateSnapshot {
                volumes,
                name: "s".into(),
                at_ms: 0,
            })
            .unwrap();
        }
        let asked = |v: &Volume| v.snapshots.keys().cloned().collect::<Vec<_>>();
        let only_a = |v: &Volume| (v.name == "a").then_some(());
        assert!(primary_groups(&st, 1, &only_a, asked).is_empty());
        let all = |_: &Volume| Some(());
        let groups = primary_groups(&st, 1, &all, asked);
        let names: Vec<&str> = groups[&("s".to_string(), 1)]
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["a", "b"], "c is primary elsewhere");
    }
}
