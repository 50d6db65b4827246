//! Snapshots (issue 21): cluster state, so every node knows which copies of which
//! volume it must keep. Part of the state machine ([`ClusterState::apply`]).
//!
//! [`Command::CreateSnapshot`] records a snapshot as being taken at the primary's
//! current epoch; the primary takes it at one point of each volume's stream on every
//! in-sync member and reports [`Command::SnapshotTaken`] with the members that hold
//! it. A snapshot still being taken when the primary changes is abandoned (its new
//! primary cannot know which members took their copy) and deleted, so every member
//! has a snapshot or none does. Each node deletes the copies the state no longer
//! names.

use super::*;

/// Most snapshots one volume keeps: each holds space once blocks change, and each is a
/// file on every member.
pub const MAX_SNAPSHOTS_PER_VOLUME: usize = 256;

/// A snapshot of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was asked for (ms since the Unix epoch).
    pub created_ms: u64,
    /// The primary epoch it is taken in: a snapshot not taken by the end of that
    /// epoch is abandoned.
    pub epoch: u64,
    /// The volume's size then.
    pub size_bytes: u64,
    /// Taken: `members` hold it. Until then it cannot be used.
    pub ready: bool,
    /// The nodes holding a copy of it (the primary and the in-sync replicas that took
    /// theirs), once taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<NodeId>,
    /// How long writes were held back on the primary to take it, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
}

/// A rollback asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRollback {
    /// To this snapshot.
    pub snapshot: String,
    /// At this primary epoch: a failover abandons it.
    pub epoch: u64,
    /// End the initiators' sessions first.
    pub force: bool,
}

/// Where a clone came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The volume the snapshot is of.
    pub volume: String,
    /// The snapshot.
    pub snapshot: String,
    /// The nodes that make their copy of the clone from their copy of the snapshot
    /// (its members when the clone was made). A node added later is rebuilt.
    pub members: Vec<NodeId>,
}

impl ClusterState {
    /// Refuses to delete snapshot `name` of `volume` while a clone made from it exists:
    /// a member that has not made its copy of the clone yet (it was down) makes it from
    /// the snapshot's.
    pub(super) fn refuse_if_cloned(&self, volume: &str, name: &str) -> Result<(), Refused> {
        let clones: Vec<String> = self
            .volumes
            .values()
            .filter(|v| {
                v.origin
                    .as_ref()
                    .is_some_and(|o| o.volume == volume && o.snapshot == name)
            })
            .map(|v| v.name.clone())
            .collect();
        if clones.is_empty() {
            Ok(())
        } else {
            Err(Refused::SnapshotHasClones {
                volume: volume.to_string(),
                name: name.to_string(),
                clones,
            })
        }
    }

    /// Snapshot `name` of `vol` can be exported read-only as a LUN now: it is taken,
    /// and the volume's primary, which serves the LUN from its own copy, holds one.
    pub(super) fn check_snapshot_exportable(
        &self,
        vol: &Volume,
        name: &str,
    ) -> Result<(), Refused> {
        let s = vol
            .snapshots
            .get(name)
            .ok_or_else(|| Refused::NoSuchSnapshot {
                volume: vol.name.clone(),
                name: name.to_string(),
            })?;
        let not = |why: String| Refused::SnapshotNotExportable {
            volume: vol.name.clone(),
            name: name.to_string(),
            why,
        };
        if !s.ready {
            return Err(not("it is still being taken; try again in a moment".into()));
        }
        if !s.members.contains(&vol.primary) {
            let members: Vec<String> = s.members.iter().map(|n| self.node_name(*n)).collect();
            return Err(not(format!(
                "the volume's primary, {}, holds no copy of it (it was not in sync when the snapshot was taken); move the volume to a node that does ({}) first",
                self.node_name(vol.primary),
                members.join(", ")
            )));
        }
        Ok(())
    }

    /// Node `n` holds a copy of every snapshot exported by the targets of `group`, so
    /// it can serve them as their volume's primary: a planned move needs it.
    pub(super) fn check_exports_held(&self, group: &[String], n: NodeId) -> Result<(), Refused> {
        let linked = self.targets.values().filter(|t| {
            t.luns
                .values()
                .any(|name| group.iter().any(|g| g == lun_backing(name).0))
        });
        for t in linked {
            for (lun, name) in &t.luns {
                let (source, Some(snapshot)) = lun_backing(name) else {
                    continue;
                };
                let held = self
                    .volumes
                    .get(source)
                    .and_then(|x| x.snapshots.get(snapshot))
                    .is_some_and(|x| x.members.contains(&n));
                if !held {
                    return Err(Refused::SnapshotNotExportable {
                        volume: source.to_string(),
                        name: snapshot.to_string(),
                        why: format!(
                            "it is LUN {lun} of {iqn} and {node} holds no copy of it; remove the LUN (`bulwark lun remove {iqn} {lun}`) or move to a node that holds one",
                            iqn = t.iqn,
                            node = self.node_name(n)
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Refuses to delete snapshot `name` of `volume` while a LUN exports it.
    fn refuse_if_exported(&self, volume: &str, name: &str) -> Result<(), Refused> {
        let lun_name = format!("{volume}@{name}");
        match self.targets.values().find_map(|t| {
            t.luns
                .iter()
                .find(|(_, n)| **n == lun_name)
                .map(|(l, _)| (t.iqn.clone(), *l))
        }) {
            Some((iqn, lun)) => Err(Refused::SnapshotExported {
                volume: volume.to_string(),
                name: name.to_string(),
                iqn,
                lun,
            }),
            None => Ok(()),
        }
    }

    /// The volumes a snapshot or a rollback (`what`) acts on: each exists, they share
    /// one primary (a target's volumes), none is moving, and no snapshot or rollback
    /// of any of them is under way.
    fn quiet_group(&self, volumes: &[String], what: &str) -> Result<Vec<&Volume>, Refused> {
        let first = volumes
            .first()
            .ok_or_else(|| Refused::BadName(format!("no volume named for the {what}")))?;
        let mut group: Vec<&Volume> = Vec::new();
        for name in volumes {
            let v = self
                .volumes
                .get(name)
                .ok_or_else(|| Refused::NoSuchVolume(name.clone()))?;
            let not_now = |why: String| Refused::SnapshotNotNow {
                volume: name.clone(),
                why,
            };
            if group.first().is_some_and(|g| g.primary != v.primary) {
                return Err(not_now(format!(
                    "its primary is not the primary of {first:?}; a {what} of several volumes takes the volumes of one target"
                )));
            }
            if let Some(to) = v.moving_to {
                return Err(not_now(format!(
                    "it is moving to {}; ask for the {what} once the move is done",
                    self.node_name(to)
                )));
            }
            // Every member takes its part by a reflink: one that cannot would leave the
            // in-sync set (or, the primary, fail the whole). Known from its start-up.
            if let Some(n) = std::iter::once(&v.primary).chain(&v.in_sync).find(|n| {
                self.nodes
                    .get(n)
                    .is_some_and(|x| x.shares_blocks == Some(false))
            }) {
                return Err(not_now(format!(
                    "the data folder of {}, a member, is on a file system that does not share blocks between files (reflink), which a {what} needs on every in-sync member; put it on XFS or btrfs and restart the node, or move the volume's replica off it",
                    self.node_name(*n)
                )));
            }
            if let Some(r) = &v.rollback {
                return Err(not_now(format!(
                    "it is being rolled back to {:?}; wait for it",
                    r.snapshot
                )));
            }
            if let Some((other, _)) = v.snapshots.iter().find(|(_, s)| !s.ready) {
                return Err(not_now(format!(
                    "snapshot {other:?} is being taken; wait for it (`bulwark snapshot list`)"
                )));
            }
            group.push(v);
        }
        Ok(group)
    }

    /// Snapshots: [`Command::CreateSnapshot`], [`Command::SnapshotTaken`],
    /// [`Command::CloneSnapshot`] and [`Command::DeleteSnapshot`].
    pub(super) fn apply_snapshot(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::CreateSnapshot {
                volumes,
                name,
                at_ms,
            } => {
                check_name("snapshot", name)?;
                // A name in use first: it says more than "one is under way".
                let clash = volumes.iter().find(|v| {
                    self.volumes
                        .get(*v)
                        .is_some_and(|v| v.snapshots.contains_key(name))
                });
                if let Some(v) = clash {
                    return Err(Refused::SnapshotExists {
                        volume: v.clone(),
                        name: name.clone(),
                    });
                }
                for v in self.quiet_group(volumes, "snapshot")? {
                    if v.snapshots.len() >= MAX_SNAPSHOTS_PER_VOLUME {
                        return Err(Refused::SnapshotNotNow {
                            volume: v.name.clone(),
                            why: format!(
                                "it has {MAX_SNAPSHOTS_PER_VOLUME} snapshots, the most a volume keeps; delete some"
                            ),
                        });
                    }
                }
                for v_name in volumes {
                    if let Some(v) = self.volumes.get_mut(v_name) {
                        v.snapshots.insert(
                            name.clone(),
                            Snapshot {
                                created_ms: *at_ms,
                                epoch: v.epoch,
                                size_bytes: v.size_bytes,
                                ready: false,
                                members: Vec::new(),
                                pause_us: None,
                            },
                        );
                    }
                }
                Ok(Applied::Done)
            }
            Command::SnapshotTaken {
                volume,
                name,
                epoch,
                members,
                pause_us,
            } => {
                let v = self.volume_at_mut(volume, *epoch)?;
                let replicas = v.replicas.clone();
                let s = v
                    .snapshots
                    .get_mut(name)
                    .ok_or_else(|| Refused::NoSuchSnapshot {
                        volume: volume.clone(),
                        name: name.clone(),
                    })?;
                if s.ready || s.epoch != *epoch {
                    return Err(Refused::StaleEpoch {
                        volume: volume.clone(),
                        epoch: s.epoch,
                        current: *epoch,
                    });
                }
                if members.is_empty() || members.iter().any(|m| !replicas.contains(m)) {
                    return Err(Refused::SnapshotNotNow {
                        volume: volume.clone(),
                        why: format!("members {members:?} are not replicas of it"),
                    });
                }
                s.ready = true;
                s.members = members.clone();
                s.pause_us = Some(*pause_us);
                Ok(Applied::Done)
            }
            Command::CloneSnapshot {
                name,
                volume,
                snapshot,
            } => {
                check_name("volume", name)?;
                if self.volumes.contains_key(name) {
                    return Err(Refused::VolumeExists(name.clone()));
                }
                let source = self
                    .volumes
                    .get(volume)
                    .ok_or_else(|| Refused::NoSuchVolume(volume.clone()))?;
                let s = source
                    .snapshots
                    .get(snapshot)
                    .ok_or_else(|| Refused::NoSuchSnapshot {
                        volume: volume.clone(),
                        name: snapshot.clone(),
                    })?;
                if !s.ready {
                    return Err(Refused::SnapshotNotNow {
                        volume: volume.clone(),
                        why: format!(
                            "snapshot {snapshot:?} is still being taken; clone it once taken"
                        ),
                    });
                }
                // The snapshot's members hold its data: the clone lives there, the
                // source's primary first when it is one.
                let mut members: Vec<NodeId> = s
                    .members
                    .iter()
                    .copied()
                    .filter(|m| self.nodes.contains_key(m))
                    .collect();
                members.sort_by_key(|m| *m != source.primary);
                if members.is_empty() {
                    return Err(Refused::SnapshotNotNow {
                        volume: volume.clone(),
                        why: format!("no node of the cluster holds snapshot {snapshot:?} any more"),
                    });
                }
                let mut clone = Volume::placed(
                    name,
                    s.size_bytes,
                    source.block_size,
                    source.physical_block_size,
                    &members,
                    format!("placed at creation from {volume}@{snapshot}"),
                );
                clone.origin = Some(Origin {
                    volume: volume.clone(),
                    snapshot: snapshot.clone(),
                    members: members.clone(),
                });
                self.volumes.insert(name.clone(), clone);
                Ok(Applied::VolumeCreated(members))
            }
            Command::RollbackSnapshot {
                volumes,
                name,
                force,
            } => {
                for v in self.quiet_group(volumes, "rollback")? {
                    let not_now = |why: String| {
                        Err(Refused::SnapshotNotNow {
                            volume: v.name.clone(),
                            why,
                        })
                    };
                    let s = v
                        .snapshots
                        .get(name)
                        .ok_or_else(|| Refused::NoSuchSnapshot {
                            volume: v.name.clone(),
                            name: name.clone(),
                        })?;
                    if !s.ready {
                        return not_now(format!("snapshot {name:?} is still being taken"));
                    }
                    if !s.members.contains(&v.primary) {
                        return not_now(format!(
                            "its primary {} holds no copy of snapshot {name:?}; move the volume to one of its holders ({}) first",
                            self.node_name(v.primary),
                            s.members.iter().map(|m| self.node_name(*m)).collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
                for v_name in volumes {
                    if let Some(v) = self.volumes.get_mut(v_name) {
                        v.rollback = Some(PendingRollback {
                            snapshot: name.clone(),
                            epoch: v.epoch,
                            force: *force,
                        });
                    }
                }
                Ok(Applied::Done)
            }
            Command::RollbackDone {
                volume,
                name,
                epoch,
                ..
            } => {
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| Refused::NoSuchVolume(volume.clone()))?;
                match &v.rollback {
                    Some(r) if r.snapshot == *name && r.epoch == *epoch && v.epoch == *epoch => {
                        v.rollback = None;
                        Ok(Applied::Done)
                    }
                    _ => Err(Refused::StaleEpoch {
                        volume: volume.clone(),
                        epoch: *epoch,
                        current: v.epoch,
                    }),
                }
            }
            Command::DeleteSnapshot { volumes, name } => {
                for v_name in volumes {
                    let v = self
                        .volumes
                        .get(v_name)
                        .ok_or_else(|| Refused::NoSuchVolume(v_name.clone()))?;
                    if !v.snapshots.contains_key(name) {
                        return Err(Refused::NoSuchSnapshot {
                            volume: v_name.clone(),
                            name: name.clone(),
                        });
                    }
                    self.refuse_if_cloned(v_name, name)?;
                    self.refuse_if_exported(v_name, name)?;
                    if v.rollback.as_ref().is_some_and(|r| r.snapshot == *name) {
                        return Err(Refused::SnapshotNotNow {
                            volume: v_name.clone(),
                            why: format!(
                                "it is being rolled back to {name:?}; delete the snapshot after"
                            ),
                        });
                    }
                }
                for v_name in volumes {
                    if let Some(v) = self.volumes.get_mut(v_name) {
                        v.snapshots.remove(name);
                    }
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only snapshot commands here"),
        }
    }
}
