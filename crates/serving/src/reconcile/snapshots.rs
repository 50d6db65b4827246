//! Taking the snapshots the cluster asks of the volumes primary here (issue 21): one
//! per group of volumes (a target's, which share this primary) at once, in a thread
//! of its own, reported to the cluster as taken (with its members and the write pause)
//! or deleted (it could not be taken; every node then removes its copy).

use super::*;

/// The volumes of one snapshot, primary here: (name, volume).
type Group = Vec<(String, Arc<PrimaryVolume>)>;

impl Serving {
    /// Starts taking the snapshots the state asks of volumes primary here, each once.
    pub(super) fn take_snapshots(&self, st: &ClusterState, roles: &HashMap<String, Role>) {
        let mut groups: BTreeMap<(String, u64), Group> = BTreeMap::new();
        for v in st.volumes.values().filter(|v| v.primary == self.me) {
            let Some(Role::Primary { epoch, volume, .. }) = roles.get(&v.name) else {
                continue;
            };
            if *epoch != v.epoch {
                continue;
            }
            for (name, s) in &v.snapshots {
                if !s.ready && s.epoch == v.epoch {
                    groups
                        .entry((name.clone(), v.epoch))
                        .or_default()
                        .push((v.name.clone(), volume.clone()));
                }
            }
        }
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
        let mut groups: BTreeMap<(String, u64), Group> = BTreeMap::new();
        for v in st.volumes.values() {
            let Some(r) = v.rollback.as_ref().filter(|r| r.epoch == v.epoch) else {
                continue;
            };
            let primary_here = match roles.get(&v.name) {
                Some(Role::Primary { epoch, volume, .. }) if *epoch == v.epoch => Some(volume),
                _ => None,
            };
            if v.primary == self.me && primary_here.is_none() {
                // Primary here, its role not started yet: act once it has.
                continue;
            }
            let first = self
                .rollbacks_seen
                .lock()
                .is_ok_and(|mut seen| seen.insert((r.snapshot.clone(), v.name.clone(), r.epoch)));
            if !first {
                continue;
            }
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
            if let Some(volume) = primary_here.filter(|_| v.primary == self.me) {
                groups
                    .entry((r.snapshot.clone(), r.epoch))
                    .or_default()
                    .push((v.name.clone(), volume.clone()));
            }
        }
        for ((name, epoch), group) in groups {
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
