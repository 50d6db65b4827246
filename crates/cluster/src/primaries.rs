//! Who is primary, as cluster state: what a primary reports at its epoch, promotions,
//! planned moves, and online verify. Part of the state machine ([`ClusterState::apply`]).

use super::*;

impl ClusterState {
    /// What a volume's primary commits at its epoch, refused once a newer primary took
    /// over: [`Command::IsrChange`] and [`Command::SetReservations`].
    pub(super) fn apply_primary_report(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::IsrChange {
                volume,
                epoch,
                add,
                remove,
            } => {
                let v = self.volume_at(volume, *epoch)?;
                for n in add {
                    if !v.replicas.contains(n) {
                        return Err(Refused::NotAReplica {
                            volume: volume.clone(),
                            node: *n,
                        });
                    }
                }
                if remove.contains(&v.primary) {
                    return Err(Refused::RemovePrimary(volume.clone()));
                }
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| Refused::NoSuchVolume(volume.clone()))?;
                v.in_sync.retain(|n| !remove.contains(n));
                v.lost_power.retain(|n| !add.contains(n));
                // A move to a replica that fell out of sync is off.
                if v.moving_to.is_some_and(|m| remove.contains(&m)) {
                    v.moving_to = None;
                }
                for n in add {
                    if !v.in_sync.contains(n) {
                        v.in_sync.push(*n);
                    }
                }
                v.in_sync.sort_unstable();
                self.settle_joining(volume);
                Ok(Applied::Done)
            }
            Command::SetReservations {
                volume,
                epoch,
                state,
            } => {
                let v = self.volume_at_mut(volume, *epoch)?;
                v.reservations = Some(state.clone());
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only primary report commands here"),
        }
    }

    /// Changes of primary, planned or not: [`Command::Promote`],
    /// [`Command::FailoverFinished`] and [`Command::MoveVolume`].
    pub(super) fn apply_failover(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::Promote {
                volumes,
                node,
                cause,
            } => {
                // A target moves as one unit: all its volumes or none.
                for (name, _) in volumes {
                    if let Some(missing) = self
                        .group_of(name)
                        .into_iter()
                        .find(|v| !volumes.iter().any(|(n, _)| n == v))
                    {
                        let iqn = self
                            .mapping_of(&missing)
                            .map(|(t, _)| t.iqn.clone())
                            .unwrap_or_default();
                        return Err(Refused::TargetSplit {
                            iqn,
                            volume: missing,
                        });
                    }
                }
                for (name, epoch) in volumes {
                    let v = self.volume_at(name, *epoch)?;
                    if !v.in_sync.contains(node) {
                        return Err(Refused::NotInSync {
                            volume: name.clone(),
                            node: *node,
                        });
                    }
                }
                for (name, _) in volumes {
                    if let Some(v) = self.volumes.get_mut(name) {
                        let old = v.primary;
                        // The old primary may hold writes nobody acknowledged: it comes
                        // back through resync, not as an in-sync member.
                        if old != *node {
                            v.in_sync.retain(|n| *n != old);
                        }
                        v.primary = *node;
                        v.epoch += 1;
                        v.moving_to = None;
                        // A snapshot not taken in the old epoch is abandoned: the new
                        // primary cannot know which members took their copy, and each
                        // node deletes the copies the state no longer names.
                        v.snapshots.retain(|_, s| s.ready);
                        // The same for a rollback: the new primary's copy is rolled
                        // back or not, and the activity logs (a rollback logs every
                        // region) resync the others to it.
                        v.rollback = None;
                        v.lost_power.retain(|n| n != node);
                        v.primary_reason = cause
                            .as_ref()
                            .map(|c| c.reason.clone())
                            .filter(|r| !r.is_empty())
                            .unwrap_or_else(|| "promoted".into());
                        if let Some(c) = cause.as_ref().filter(|_| old != *node) {
                            v.last_failover = Some(FailoverRecord {
                                planned: c.planned,
                                from: old,
                                to: *node,
                                epoch: v.epoch,
                                io_stopped_unix_ms: c.io_stopped_unix_ms,
                                pause_ms: None,
                            });
                        }
                    }
                }
                for (name, _) in volumes {
                    self.settle_joining(name);
                }
                Ok(Applied::Done)
            }
            Command::FailoverFinished {
                volumes,
                epoch,
                pause_ms,
            } => {
                for name in volumes {
                    if let Some(f) = self
                        .volumes
                        .get_mut(name)
                        .and_then(|v| v.last_failover.as_mut())
                        .filter(|f| f.epoch == *epoch)
                    {
                        f.pause_ms = Some(*pause_ms);
                    }
                }
                Ok(Applied::Done)
            }
            Command::MoveVolume { volume, node } => {
                let v = self
                    .volumes
                    .get(volume)
                    .ok_or_else(|| Refused::NoSuchVolume(volume.clone()))?;
                let n = self
                    .node_by_name(node)
                    .ok_or_else(|| Refused::NoSuchNode(node.clone()))?
                    .id;
                if v.primary == n {
                    return Err(Refused::AlreadyThere {
                        volume: volume.clone(),
                        node: node.clone(),
                    });
                }
                let group = self.group_of(volume);
                for g in &group {
                    let gv = self
                        .volumes
                        .get(g)
                        .ok_or_else(|| Refused::NoSuchVolume(g.clone()))?;
                    if !gv.in_sync.contains(&n) {
                        return Err(Refused::MoveNotInSync {
                            volume: g.clone(),
                            node: node.clone(),
                        });
                    }
                }
                self.check_exports_held(&group, n)?;
                for g in &group {
                    if let Some(gv) = self.volumes.get_mut(g) {
                        gv.moving_to = Some(n);
                    }
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only failover commands here"),
        }
    }

    /// Online verify: [`Command::StartVerify`] and [`Command::FinishVerify`].
    pub(super) fn apply_verify(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::StartVerify { volume, repair } => {
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| Refused::NoSuchVolume(volume.clone()))?;
                let id = v.verify.as_ref().map_or(1, |x| x.id + 1);
                v.verify = Some(VolumeVerify {
                    id,
                    repair: *repair,
                    result: None,
                });
                Ok(Applied::Done)
            }
            Command::FinishVerify { volume, id, result } => {
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| Refused::NoSuchVolume(volume.clone()))?;
                if let Some(x) = v.verify.as_mut().filter(|x| x.id == *id) {
                    x.result = Some(result.clone());
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only verify commands here"),
        }
    }
}
