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
                let first = volumes
                    .first()
                    .ok_or_else(|| Refused::BadName("no volume named".into()))?;
                let primary = self
                    .volumes
                    .get(first)
                    .ok_or_else(|| Refused::NoSuchVolume(first.clone()))?
                    .primary;
                for v_name in volumes {
                    let v = self
                        .volumes
                        .get(v_name)
                        .ok_or_else(|| Refused::NoSuchVolume(v_name.clone()))?;
                    let not_now = |why: String| {
                        Err(Refused::SnapshotNotNow {
                            volume: v_name.clone(),
                            why,
                        })
                    };
                    if v.snapshots.contains_key(name) {
                        return Err(Refused::SnapshotExists {
                            volume: v_name.clone(),
                            name: name.clone(),
                        });
                    }
                    if v.primary != primary {
                        return not_now(format!(
                            "its primary is not the primary of {first:?}; a snapshot of several volumes takes volumes of one target"
                        ));
                    }
                    if let Some(to) = v.moving_to {
                        return not_now(format!(
                            "it is moving to {}; take the snapshot once the move is done",
                            self.node_name(to)
                        ));
                    }
                    if let Some(r) = &v.rollback {
                        return not_now(format!(
                            "it is being rolled back to {:?}; take the snapshot after",
                            r.snapshot
                        ));
                    }
                    if let Some((other, _)) = v.snapshots.iter().find(|(_, s)| !s.ready) {
                        return not_now(format!(
                            "snapshot {other:?} is being taken; wait for it (`bulwark snapshot list`)"
                        ));
                    }
                    if v.snapshots.len() >= MAX_SNAPSHOTS_PER_VOLUME {
                        return not_now(format!(
                            "it has {MAX_SNAPSHOTS_PER_VOLUME} snapshots, the most a volume keeps; delete some"
                        ));
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
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| Refused::NoSuchVolume(volume.clone()))?;
                if *epoch != v.epoch {
                    return Err(Refused::StaleEpoch {
                        volume: volume.clone(),
                        epoch: *epoch,
                        current: v.epoch,
                    });
                }
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
                let clone = Volume {
                    rollback: None,
                    name: name.clone(),
                    size_bytes: s.size_bytes,
                    block_size: source.block_size,
                    physical_block_size: source.physical_block_size,
                    replicas: members.clone(),
                    primary: members[0],
                    epoch: 1,
                    in_sync: members.clone(),
                    moving_to: None,
                    verify: None,
                    reservations: None,
                    last_failover: None,
                    primary_reason: format!("placed at creation from {volume}@{snapshot}"),
                    lost_power: Vec::new(),
                    joining: Vec::new(),
                    wanted_replicas: members.len() as u8,
                    snapshots: BTreeMap::new(),
                    origin: Some(Origin {
                        volume: volume.clone(),
                        snapshot: snapshot.clone(),
                        members: members.clone(),
                    }),
                };
                self.volumes.insert(name.clone(), clone);
                Ok(Applied::VolumeCreated(members))
            }
            Command::RollbackSnapshot {
                volumes,
                name,
                force,
            } => {
                let first = volumes
                    .first()
                    .ok_or_else(|| Refused::BadName("no volume named".into()))?;
                let primary = self
                    .volumes
                    .get(first)
                    .ok_or_else(|| Refused::NoSuchVolume(first.clone()))?
                    .primary;
                for v_name in volumes {
                    let v = self
                        .volumes
                        .get(v_name)
                        .ok_or_else(|| Refused::NoSuchVolume(v_name.clone()))?;
                    let not_now = |why: String| {
                        Err(Refused::SnapshotNotNow {
                            volume: v_name.clone(),
                            why,
                        })
                    };
                    let s = v
                        .snapshots
                        .get(name)
                        .ok_or_else(|| Refused::NoSuchSnapshot {
                            volume: v_name.clone(),
                            name: name.clone(),
                        })?;
                    if !s.ready {
                        return not_now(format!("snapshot {name:?} is still being taken"));
                    }
                    if v.primary != primary {
                        return not_now(format!(
                            "its primary is not the primary of {first:?}; roll back the volumes of one target together"
                        ));
                    }
                    if !s.members.contains(&v.primary) {
                        return not_now(format!(
                            "its primary {} holds no copy of snapshot {name:?}; move the volume to one of its holders ({}) first",
                            self.node_name(v.primary),
                            s.members.iter().map(|m| self.node_name(*m)).collect::<Vec<_>>().join(", ")
                        ));
                    }
                    if let Some(to) = v.moving_to {
                        return not_now(format!(
                            "it is moving to {}; roll back once the move is done",
                            self.node_name(to)
                        ));
                    }
                    if v.rollback.is_some() || v.snapshots.values().any(|s| !s.ready) {
                        return not_now(
                            "a snapshot or a rollback of it is under way; wait for it".into(),
                        );
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
