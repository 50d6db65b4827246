//! Where replicas live, and how that changes while volumes serve: placement over nodes
//! and zones, adding, removing and replacing replicas, draining nodes and removing dead
//! ones. Part of the state machine ([`ClusterState::apply`]).
//!
//! A new replica joins outside the in-sync set ([`Volume::joining`]): the primary
//! rebuilds it with a full copy and asks for it to join the set once caught up
//! ([`Command::IsrChange`]); a replica it replaces leaves only then. A target's
//! volumes share their nodes (a target moves as one unit), so every change here acts on
//! all of them, and a replacement completes only when the new node is in sync for
//! every one of them: until then the old node remains a possible successor for all.

use super::*;

impl ClusterState {
    /// Node service and replica placement: [`Command::DrainNode`],
    /// [`Command::SetNodeZone`] and [`Command::ChangeReplicas`].
    pub(super) fn apply_replicas(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::DrainNode {
                name,
                drained,
                evacuate,
            } => {
                let node = self
                    .node_by_name(name)
                    .ok_or_else(|| Refused::NoSuchNode(name.clone()))?;
                if node.role == NodeRole::Witness {
                    return Err(Refused::WitnessCannotHold(name.clone()));
                }
                let id = node.id;
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.drained = *drained;
                    n.evacuate = *drained && *evacuate;
                }
                Ok(Applied::Done)
            }
            Command::SetNodeZone { name, zone } => {
                if let Some(z) = zone {
                    check_name("zone", z)?;
                }
                let id = self
                    .node_by_name(name)
                    .ok_or_else(|| Refused::NoSuchNode(name.clone()))?
                    .id;
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.zone = zone.clone();
                }
                Ok(Applied::Done)
            }
            Command::ChangeReplicas {
                volume,
                add,
                remove,
                force,
            } => self.change_replicas(volume, add.as_deref(), remove.as_deref(), *force),
            _ => unreachable!("apply routes only replica placement commands here"),
        }
    }

    /// The volumes that move and change together with `volume`: its target's, or itself.
    /// A target exporting a snapshot of a volume ties that volume to the target's
    /// other volumes too, so the group is every volume reached through the targets.
    pub fn group_of(&self, volume: &str) -> Vec<String> {
        let mut group = match self.mapping_of(volume) {
            Some((t, _)) => t.volumes(),
            None => return vec![volume.to_string()],
        };
        let mut i = 0;
        while i < group.len() {
            for t in self.targets.values() {
                if t.luns.values().any(|n| lun_backing(n).0 == group[i]) {
                    for v in t.volumes() {
                        if !group.contains(&v) {
                            group.push(v);
                        }
                    }
                }
            }
            i += 1;
        }
        group
    }

    fn change_replicas(
        &mut self,
        volume: &str,
        add: Option<&str>,
        remove: Option<&str>,
        force: bool,
    ) -> Result<Applied, Refused> {
        if !self.volumes.contains_key(volume) {
            return Err(Refused::NoSuchVolume(volume.to_string()));
        }
        let resolve = |name: &str| {
            self.node_by_name(name)
                .map(|n| n.id)
                .ok_or_else(|| Refused::NoSuchNode(name.to_string()))
        };
        let add_id = add.map(resolve).transpose()?;
        let rm_id = remove.map(resolve).transpose()?;
        if add_id.is_none() && rm_id.is_none() {
            return Err(Refused::BadName(
                "nothing to change: name a node to add, to remove, or both (replace)".into(),
            ));
        }
        if let (Some(a), Some(name)) = (add_id, add) {
            let n = &self.nodes[&a];
            if n.role == NodeRole::Witness {
                return Err(Refused::WitnessCannotHold(name.to_string()));
            }
            if n.drained {
                return Err(Refused::NodeDrained(name.to_string()));
            }
        }
        let group = self.group_of(volume);
        let mut total = 0u64;
        for g in &group {
            let v = self
                .volumes
                .get(g)
                .ok_or_else(|| Refused::NoSuchVolume(g.clone()))?;
            total += v.size_bytes;
            if let (Some(a), Some(name)) = (add_id, add) {
                if v.joining.iter().any(|j| j.node == a) {
                    return Err(Refused::AlreadyJoining {
                        volume: g.clone(),
                        node: name.to_string(),
                    });
                }
                if v.replicas.contains(&a) {
                    return Err(Refused::AlreadyReplica {
                        volume: g.clone(),
                        node: name.to_string(),
                    });
                }
                let lasting = v.lasting_replicas().filter(|n| Some(*n) != rm_id).count();
                if lasting >= 3 {
                    return Err(Refused::TooManyReplicas {
                        volume: g.clone(),
                        have: lasting,
                    });
                }
            }
            if let (Some(r), Some(name)) = (rm_id, remove) {
                if !v.replicas.contains(&r) {
                    return Err(Refused::NotHeldBy {
                        volume: g.clone(),
                        node: name.to_string(),
                    });
                }
                if v.primary == r {
                    return Err(Refused::ReplicaIsPrimary {
                        volume: g.clone(),
                        node: name.to_string(),
                    });
                }
                if add_id.is_none() {
                    if v.replicas.len() == 1 {
                        return Err(Refused::LastReplica {
                            volume: g.clone(),
                            node: name.to_string(),
                        });
                    }
                    let left = v.in_sync.len().saturating_sub(1);
                    if v.in_sync.contains(&r) && left < 2 && !force {
                        return Err(Refused::WouldLeaveFewCopies {
                            volume: g.clone(),
                            node: name.to_string(),
                            left,
                        });
                    }
                }
            }
        }
        if let (Some(a), Some(name)) = (add_id, add) {
            let free = self.free_bytes(a);
            if free < total {
                return Err(Refused::NoSpace {
                    node: name.to_string(),
                    free,
                    needed: total,
                });
            }
        }
        // One decision for the whole target, so its volumes keep sharing their nodes.
        // A replaced replica still being rebuilt somewhere, or out of sync everywhere
        // (down, dead), holds nothing the target needs: it leaves at once, and the new
        // one takes over what it was to replace. Otherwise it stays until the new one is
        // in sync for every volume.
        let vols = || group.iter().filter_map(|g| self.volumes.get(g));
        let rm_joining = rm_id.and_then(|r| {
            vols()
                .flat_map(|v| v.joining.iter())
                .find(|j| j.node == r)
                .copied()
        });
        let rm_in_sync = rm_id.is_some_and(|r| vols().any(|v| v.in_sync.contains(&r)));
        let keep_old = add_id.is_some() && rm_joining.is_none() && rm_in_sync;
        let replaces = match rm_joining {
            Some(j) => j.replaces,
            None => rm_id.filter(|_| keep_old),
        };
        for g in &group {
            let Some(v) = self.volumes.get_mut(g) else {
                continue;
            };
            if let Some(a) = add_id {
                v.replicas.push(a);
                v.joining.push(Joining { node: a, replaces });
            }
            if let Some(r) = rm_id.filter(|_| !keep_old) {
                remove_replica(v, r);
            }
            v.wanted_replicas = v.lasting_replicas().count() as u8;
        }
        Ok(Applied::ReplicasChanged(group))
    }

    /// Removes node `id`, gone for good, from every volume: each volume (with its
    /// target's) gets a new replica on a node with room, where there is one.
    pub(super) fn remove_dead_node(&mut self, id: NodeId) -> Result<Applied, Refused> {
        let name = self.node_name(id);
        let held = self.volumes_on(id);
        let primary_of: Vec<String> = held
            .iter()
            .filter(|v| self.volumes[*v].primary == id)
            .cloned()
            .collect();
        if !primary_of.is_empty() {
            return Err(Refused::StillPrimary {
                node: name,
                volumes: primary_of,
            });
        }
        if let Some(v) = held.iter().find(|v| self.volumes[*v].in_sync == [id]) {
            return Err(Refused::OnlyCopy {
                volume: v.clone(),
                node: name,
            });
        }
        let groups: BTreeSet<Vec<String>> = held.iter().map(|v| self.group_of(v)).collect();
        for v in self.volumes.values_mut() {
            // States from before the wanted count was kept: the count before the loss.
            if v.wanted_replicas == 0 {
                v.wanted_replicas = v.replicas.len() as u8;
            }
        }
        let mut out = Vec::new();
        for group in groups {
            let mut exclude = vec![id];
            let mut total = 0;
            let mut short = false;
            for g in &group {
                if let Some(v) = self.volumes.get_mut(g) {
                    remove_replica(v, id);
                    exclude.extend(v.replicas.iter().copied());
                    total += v.size_bytes;
                    short |= v.lasting_replicas().count() < v.wanted();
                }
            }
            let new = if short {
                self.pick_nodes(total, 1, &[], &exclude).first().copied()
            } else {
                None
            };
            for g in &group {
                if let (Some(v), Some(n)) = (self.volumes.get_mut(g), new) {
                    v.replicas.push(n);
                    v.joining.push(Joining {
                        node: n,
                        replaces: None,
                    });
                }
                if held.contains(g) {
                    out.push((g.clone(), new));
                }
            }
        }
        self.nodes.remove(&id);
        Ok(Applied::DeadNodeRemoved(out))
    }

    /// After `volume`'s in-sync set grew: replicas that joined are no longer joining,
    /// and a replica they replace leaves once the new one is in sync for every volume
    /// of the target (until then it remains a possible successor for all of them).
    pub(super) fn settle_joining(&mut self, volume: &str) {
        let group = self.group_of(volume);
        let Some(v) = self.volumes.get(volume) else {
            return;
        };
        let primary = v.primary;
        let synced: Vec<Joining> = v
            .joining
            .iter()
            .filter(|j| v.in_sync.contains(&j.node))
            .copied()
            .collect();
        for j in synced {
            let everywhere = group.iter().all(|g| {
                self.volumes
                    .get(g)
                    .is_none_or(|gv| gv.in_sync.contains(&j.node) || !gv.replicas.contains(&j.node))
            });
            if !everywhere {
                continue;
            }
            if j.replaces.is_some_and(|old| old == primary) {
                // The replaced node is the primary now (a failover picked it): it
                // leaves after a planned move to the new replica ([`Self::upkeep`]).
                continue;
            }
            for g in &group {
                let Some(gv) = self.volumes.get_mut(g) else {
                    continue;
                };
                gv.joining.retain(|x| x.node != j.node);
                if let Some(old) = j.replaces {
                    remove_replica(gv, old);
                }
            }
        }
    }

    /// Up to `need` storage nodes for `size` more bytes, not in `chosen` or `exclude`:
    /// schedulable ones with room, the most free space first (ties: lowest id), each
    /// pick in a zone none of the nodes already chosen is in where one is left.
    pub fn pick_nodes(
        &self,
        size: u64,
        need: usize,
        chosen: &[NodeId],
        exclude: &[NodeId],
    ) -> Vec<NodeId> {
        let mut candidates: Vec<(u64, NodeId)> = self
            .nodes
            .values()
            .filter(|n| n.schedulable() && !n.evacuate)
            .filter(|n| !chosen.contains(&n.id) && !exclude.contains(&n.id))
            .map(|n| (self.free_bytes(n.id), n.id))
            .filter(|(free, _)| *free >= size)
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let zone = |id: &NodeId| self.nodes.get(id).and_then(|n| n.zone.as_ref());
        let mut picked: Vec<NodeId> = Vec::new();
        while picked.len() < need && !candidates.is_empty() {
            let used: Vec<&String> = chosen
                .iter()
                .chain(exclude)
                .chain(&picked)
                .filter_map(zone)
                .collect();
            let i = candidates
                .iter()
                .position(|(_, id)| zone(id).is_none_or(|z| !used.contains(&z)))
                .unwrap_or(0);
            picked.push(candidates.remove(i).1);
        }
        picked
    }
}

/// Takes `node` out of `v` altogether.
fn remove_replica(v: &mut Volume, node: NodeId) {
    v.replicas.retain(|n| *n != node);
    v.in_sync.retain(|n| *n != node);
    v.lost_power.retain(|n| *n != node);
    v.joining.retain(|j| j.node != node);
    for j in &mut v.joining {
        if j.replaces == Some(node) {
            j.replaces = None;
        }
    }
    if v.moving_to == Some(node) {
        v.moving_to = None;
    }
}

/// One step the leader takes to keep a group's redundancy (see
/// [`ClusterState::upkeep`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upkeep {
    /// The primary is on a drained node: a planned move to `to`.
    Move {
        /// A volume of the group.
        volume: String,
        /// The drained node.
        from: NodeId,
        /// An in-sync member of every volume of the group, online and not drained.
        to: NodeId,
    },
    /// Rebuild `old`'s replicas on `new`, then remove them from `old`.
    Replace {
        /// A volume of the group.
        volume: String,
        /// The node being evacuated, or offline too long.
        old: NodeId,
        /// The node with room chosen for the new replicas.
        new: NodeId,
        /// Why, in words for the event.
        why: String,
    },
    /// The group has fewer replicas than it should: a new one on `new`.
    Add {
        /// A volume of the group.
        volume: String,
        /// The node with room chosen.
        new: NodeId,
    },
}

impl ClusterState {
    /// The groups of volumes that move together: the volumes of targets linked by a
    /// volume they share (through a snapshot's LUN), and each unmapped volume alone.
    pub fn groups(&self) -> Vec<Vec<String>> {
        // One pass over the LUNs (union-find), not a search of every target per volume:
        // the leader asks every 20 ms, and 256 volumes over 64 targets made that 65 000
        // name comparisons each time.
        let mut parent: std::collections::HashMap<&str, &str> = self
            .volumes
            .keys()
            .map(|v| (v.as_str(), v.as_str()))
            .collect();
        fn root<'a>(
            parent: &std::collections::HashMap<&'a str, &'a str>,
            mut v: &'a str,
        ) -> &'a str {
            while let Some(p) = parent.get(v).filter(|p| **p != v) {
                v = p;
            }
            v
        }
        for t in self.targets.values() {
            let sources: Vec<&str> = t
                .luns
                .values()
                .map(|n| lun_backing(n).0)
                .filter(|v| parent.contains_key(v))
                .collect();
            let Some(first) = sources.first() else {
                continue;
            };
            let r = root(&parent, first);
            for s in &sources[1..] {
                let rs = root(&parent, s);
                if rs != r {
                    parent.insert(rs, r);
                }
            }
        }
        let mut by_root: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        // Volumes in their target's LUN order, then the unmapped ones.
        let mut seen: std::collections::HashSet<&str> = Default::default();
        let ordered = self
            .targets
            .values()
            .flat_map(|t| t.luns.values().map(|n| lun_backing(n).0))
            .chain(self.volumes.keys().map(|v| v.as_str()));
        for v in ordered {
            if parent.contains_key(v) && seen.insert(v) {
                by_root
                    .entry(root(&parent, v))
                    .or_default()
                    .push(v.to_string());
            }
        }
        by_root.into_values().collect()
    }

    /// Where a planned move of the group `vols` (one target's volumes) would go: a
    /// schedulable node other than the primary, in sync for every volume and not
    /// `offline`.
    fn move_destination(
        &self,
        vols: &[&Volume],
        offline: impl Fn(NodeId) -> bool,
    ) -> Option<NodeId> {
        let primary = vols.first()?.primary;
        let group: Vec<String> = vols.iter().map(|v| v.name.clone()).collect();
        // A node holding the snapshots the group exports can take them along; only
        // such a node is a move's destination (MoveVolume refuses the others).
        self.nodes
            .values()
            .filter(|n| n.schedulable() && !offline(n.id))
            .find(|n| {
                n.id != primary
                    && vols.iter().all(|v| v.in_sync.contains(&n.id))
                    && self.check_exports_held(&group, n.id).is_ok()
            })
            .map(|n| n.id)
    }

    /// The planned moves that take every group whose primary is `node` elsewhere (the
    /// node stops): a volume of the group and where it goes. Groups already moving, or
    /// with nowhere to go (no other in-sync member online), are left out; they are
    /// returned second, as volume names.
    pub fn hand_over_from(
        &self,
        node: NodeId,
        offline: impl Fn(NodeId) -> bool,
    ) -> (Vec<(String, NodeId)>, Vec<String>) {
        let (mut moves, mut stuck) = (Vec::new(), Vec::new());
        for group in self.groups() {
            let vols: Vec<&Volume> = group.iter().filter_map(|n| self.volumes.get(n)).collect();
            let Some(first) = vols.first() else { continue };
            if first.primary != node || vols.iter().any(|v| v.moving_to.is_some()) {
                continue;
            }
            match self.move_destination(&vols, &offline) {
                Some(to) => moves.push((first.name.clone(), to)),
                None => stuck.push(first.name.clone()),
            }
        }
        (moves, stuck)
    }

    /// What the leader does next for `group`, if anything: move its primary off a
    /// drained node; else, one change at a time, replace the replicas of a node being
    /// evacuated or offline for longer than the replace-after setting (`offline_for`:
    /// nodes not heard from, and for how long), or add a replica to a group that has
    /// fewer than it should. `None` also when no node can take the change (it is
    /// looked at again later).
    pub fn upkeep(
        &self,
        group: &[String],
        offline_for: &std::collections::HashMap<NodeId, std::time::Duration>,
    ) -> Option<Upkeep> {
        let vols: Vec<&Volume> = group.iter().filter_map(|n| self.volumes.get(n)).collect();
        let first = vols.first()?;
        let primary = first.primary;
        if vols.iter().any(|v| v.moving_to.is_some()) {
            return None;
        }
        // A replacement in sync everywhere whose old node is the primary (a failover
        // picked it meanwhile): hand over to the new replica, which then completes it.
        let handover = first.joining.iter().find(|j| {
            j.replaces == Some(primary)
                && !offline_for.contains_key(&j.node)
                && vols.iter().all(|v| v.in_sync.contains(&j.node))
        });
        if let Some(j) = handover {
            return Some(Upkeep::Move {
                volume: first.name.clone(),
                from: primary,
                to: j.node,
            });
        }
        let drained = |id: NodeId| self.nodes.get(&id).is_none_or(|n| n.drained);
        if drained(primary) {
            let to = self.move_destination(&vols, |id| offline_for.contains_key(&id))?;
            return Some(Upkeep::Move {
                volume: first.name.clone(),
                from: primary,
                to,
            });
        }
        let mut exclude: Vec<NodeId> = vols.iter().flat_map(|v| v.replicas.clone()).collect();
        exclude.extend(offline_for.keys().copied());
        let total: u64 = vols.iter().map(|v| v.size_bytes).sum();
        let after = std::time::Duration::from_millis(self.settings.replace_after_ms);
        let gone_for = |id: &NodeId| {
            offline_for
                .get(id)
                .filter(|d| !after.is_zero() && **d >= after)
        };
        // A new replica that went away while being rebuilt: rebuild on another node.
        if let Some((j, d)) = first
            .joining
            .iter()
            .find_map(|j| gone_for(&j.node).map(|d| (j, d)))
        {
            let new = *self.pick_nodes(total, 1, &[], &exclude).first()?;
            return Some(Upkeep::Replace {
                volume: first.name.clone(),
                old: j.node,
                new,
                why: format!(
                    "{}, being rebuilt, has been offline for {} s",
                    self.node_name(j.node),
                    d.as_secs()
                ),
            });
        }
        // One change at a time: the next waits for the rebuild under way.
        if vols.iter().any(|v| !v.joining.is_empty()) {
            return None;
        }
        for old in first.replicas.iter().copied().filter(|n| *n != primary) {
            let Some(node) = self.nodes.get(&old) else {
                continue;
            };
            let why = if node.evacuate {
                // Rebuild first, then remove: an evacuated node still online keeps its
                // replica until the new one is in sync, which needs it in sync itself
                // (it is not, for a moment, after its primary moved away).
                let online = !offline_for.contains_key(&old);
                if online && !vols.iter().all(|v| v.in_sync.contains(&old)) {
                    continue;
                }
                format!("{} is being evacuated", node.name)
            } else {
                match offline_for.get(&old) {
                    Some(d) if !after.is_zero() && *d >= after && !node.drained => format!(
                        "{} has been offline for {} s (replace-after {} s)",
                        node.name,
                        d.as_secs(),
                        after.as_secs()
                    ),
                    _ => continue,
                }
            };
            let new = *self.pick_nodes(total, 1, &[], &exclude).first()?;
            return Some(Upkeep::Replace {
                volume: first.name.clone(),
                old,
                new,
                why,
            });
        }
        if vols.iter().any(|v| v.replicas.len() < v.wanted()) {
            let new = *self.pick_nodes(total, 1, &[], &exclude).first()?;
            return Some(Upkeep::Add {
                volume: first.name.clone(),
                new,
            });
        }
        None
    }
}
