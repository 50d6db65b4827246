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

impl ClusterState {
    /// Snapshots: [`Command::CreateSnapshot`], [`Command::SnapshotTaken`] and
    /// [`Command::DeleteSnapshot`].
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
