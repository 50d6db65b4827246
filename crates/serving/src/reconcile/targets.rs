//! Targets and LUNs: a target executed here (its logical units over the primaries
//! running here) or forwarded to its primary, and the virtual IPs of the targets
//! served here.

use super::*;

/// SCSI identity of the logical unit of LUN name `name` (volume `v`, or a snapshot of
/// it read-only, [`lun_backing`]): derived from the name so that it stays the same on
/// every node and across restarts (multipath relies on it). A snapshot's persistent
/// reservations are not kept with APTPL: it has no file of its own for them.
pub(super) fn lu_config(name: &str, v: &Volume, path: &Path) -> scsi::LuConfig {
    let h1 = crate::lu_identity::fnv1a(&[b"volume", name.as_bytes()]);
    let h2 = crate::lu_identity::fnv1a(&[&h1.to_be_bytes(), name.as_bytes()]);
    let snapshot = lun_backing(name).1.is_some();
    scsi::LuConfig {
        block_size: v.block_size,
        read_only: snapshot,
        physical_block_size: v
            .physical_block_size
            .unwrap_or(scsi::LuConfig::default().physical_block_size),
        serial: format!("{h1:016x}"),
        naa: crate::lu_identity::naa_identifier(h1, h2),
        pr_file: (!snapshot).then(|| path.with_extension("pr")),
        ..Default::default()
    }
}

impl Serving {
    /// From now on `t`'s commands arriving here go to `primary`. Sessions on this
    /// node's own portals stay: their path turns active/non-optimized and forwards, and
    /// the first command each sends to the new primary there carries a unit attention
    /// (ASYMMETRIC ACCESS STATE CHANGED for a known I_T nexus) that makes a multipath
    /// initiator look at the access states again, with no pause and no path lost.
    /// Sessions that came in through one of the target's virtual IPs are asked to log
    /// in again: the address moved to the new primary.
    pub(super) fn forward_target(&self, t: &Target, s: &mut Served, primary: NodeId) {
        let luns: BTreeMap<u64, u32> = t
            .luns
            .iter()
            .filter_map(|(lun, name)| {
                self.node
                    .state()
                    .borrow()
                    .volumes
                    .get(lun_backing(name).0)
                    .map(|v| (*lun, v.block_size))
            })
            .collect();
        let was_primary = s.forwarding_to.is_none() && !s.luns.is_empty();
        if let Ok(mut devices) = self.executed_here.write() {
            devices.remove(&t.iqn);
        }
        s.device.forward_to(
            Arc::new(crate::forward::NetForwarder::new(
                self.net.clone(),
                replication::NodeId(primary),
                t.iqn.clone(),
            )),
            luns,
        );
        s.luns.clear();
        s.unexported.clear();
        s.forwarding_to = Some(primary);
        if was_primary {
            let vips: Vec<std::net::IpAddr> = t.vips.keys().copied().collect();
            self.server
                .ask_to_log_out(&t.iqn, &vips, Duration::from_secs(2));
            self.events.push(
                EventKind::Config,
                format!(
                    "{} forwards {} to node {primary} (active/non-optimized)",
                    self.node_name, t.iqn
                ),
            );
        }
    }

    /// The logical units of `t`, primary here, on this node's volumes: new LUNs are
    /// added, removed ones dropped, and a volume re-promoted at a new epoch gets a new
    /// logical unit (its device changed). Reservations come from the cluster state.
    pub(super) fn execute_target_here(
        &self,
        st: &ClusterState,
        t: &Target,
        s: &mut Served,
        roles: &HashMap<String, Role>,
    ) -> Result<()> {
        // A LUN whose volume is still there at a new epoch is replaced below in one
        // step, not removed first: a command in between would fail (issue 19).
        let gone: Vec<u64> = s
            .luns
            .iter()
            .filter(|(lun, (vol, _))| t.luns.get(lun) != Some(vol))
            .map(|(lun, _)| *lun)
            .collect();
        for lun in gone {
            let _ = s.device.remove_lun(lun);
            s.luns.remove(&lun);
        }
        s.unexported.retain(|lun, _| t.luns.contains_key(lun));
        for (lun, lun_name) in &t.luns {
            let (vol_name, snapshot) = lun_backing(lun_name);
            let (Some(v), Some(Role::Primary { volume, store, .. })) =
                (st.volumes.get(vol_name), roles.get(vol_name))
            else {
                continue;
            };
            let current = s.luns.get(lun).is_some_and(|(_, epoch)| *epoch == v.epoch);
            if let Some(snapshot) = snapshot {
                if !current && s.unexported.get(lun) != Some(&v.epoch) {
                    self.export_snapshot(t, s, *lun, v, snapshot)?;
                }
                continue;
            }
            if current {
                if volume.size_bytes() < v.size_bytes {
                    // Resize: grow the primary's copy, then tell the initiators.
                    // Replicas grow on the same state change, or on demand when a
                    // write past their end arrives first.
                    match store.grow(v.size_bytes) {
                        Ok(()) => s.device.capacity_changed(*lun),
                        Err(e) => error!(volume = %v.name, "cannot grow the volume: {e}"),
                    }
                }
                continue;
            }
            let device: Arc<dyn BlockDevice> = volume.clone();
            let reservations: Arc<dyn scsi::ReservationStore> = Arc::new(ClusterReservations {
                node: self.node.clone(),
                volume: v.name.clone(),
                epoch: v.epoch,
                rt: self.rt.clone(),
            });
            s.device
                .replace_shared_lun(
                    *lun,
                    lu_config(lun_name, v, &self.volume_path(&v.name)),
                    device,
                    Some(reservations),
                )
                .map_err(|e| ServingError::Lun {
                    target: t.iqn.clone(),
                    lun: *lun,
                    reason: e.to_string(),
                })?;
            s.luns.insert(*lun, (lun_name.clone(), v.epoch));
        }
        Ok(())
    }

    /// LUN `lun` of `t` exports snapshot `snapshot` of `v` read-only, from this node's
    /// copy (this node is `v`'s primary, so the LUN goes wherever the volume goes). A
    /// node that holds no copy (it was not in sync when the snapshot was taken, and
    /// became primary in a failover) leaves the LUN out and says so once per epoch;
    /// moving the volume to a member brings it back.
    fn export_snapshot(
        &self,
        t: &Target,
        s: &mut Served,
        lun: u64,
        v: &Volume,
        snapshot: &str,
    ) -> Result<()> {
        let name = format!("{}@{snapshot}", v.name);
        let path = crate::snapshots::snapshot_path(&self.volume_path(&v.name), snapshot);
        let held = v
            .snapshots
            .get(snapshot)
            .is_some_and(|x| x.ready && x.members.contains(&self.me));
        let opened = if held {
            blockstore::FileStore::open(
                &path,
                &blockstore::OpenOptions {
                    block_size: v.block_size,
                    read_only: true,
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())
        } else {
            Err(
                "this node holds no copy of it (it was not in sync when the snapshot was taken)"
                    .into(),
            )
        };
        let store = match opened {
            Ok(store) => store,
            Err(why) => {
                let _ = s.device.remove_lun(lun);
                s.luns.remove(&lun);
                s.unexported.insert(lun, v.epoch);
                self.events.push(
                    EventKind::Snapshot,
                    format!(
                        "{} cannot export snapshot {name} as LUN {lun} of {}: {why}; move {} to a node holding the snapshot (`bulwark snapshot list`), or remove the LUN",
                        self.node_name, t.iqn, v.name
                    ),
                );
                return Ok(());
            }
        };
        s.device
            .replace_shared_lun(lun, lu_config(&name, v, &path), Arc::new(store), None)
            .map_err(|e| ServingError::Lun {
                target: t.iqn.clone(),
                lun,
                reason: e.to_string(),
            })?;
        s.unexported.remove(&lun);
        s.luns.insert(lun, (name, v.epoch));
        Ok(())
    }

    /// Holds the virtual IPs of the targets served here whose volumes all claim
    /// service (a lease not lapsed, or a fresh promotion still getting its first), and
    /// no others: the address moves as soon as the new primary is named, and leaves a
    /// primary cut off from the cluster when its lease lapses.
    pub(super) fn reconcile_vips(&self, st: &ClusterState) {
        let want: BTreeMap<std::net::IpAddr, cluster::state::VirtualIp> = {
            let (Ok(served), Ok(roles)) = (self.served.lock(), self.roles.lock()) else {
                return;
            };
            served
                .iter()
                .filter(|(_, s)| s.forwarding_to.is_none())
                .filter_map(|(iqn, _)| st.targets.get(iqn))
                .filter(|t| {
                    t.volumes().iter().all(|vol| {
                        matches!(roles.get(vol), Some(Role::Primary { volume, .. }) if volume.claims_service(cluster::node::LEASE))
                    })
                })
                .flat_map(|t| t.vips.clone())
                .collect()
        };
        self.vips
            .reconcile(&want, &self.server, &self.rt, &self.events);
    }

    /// The node stops: every replica here tells its primary that it leaves the
    /// in-sync set, so writes stop waiting for it at once instead of after the
    /// replica timeout. Returns how many replicas left.
    pub fn leave_in_sync_sets(&self) -> usize {
        let Ok(roles) = self.roles.lock() else {
            return 0;
        };
        roles
            .values()
            .filter_map(|r| match r {
                Role::Replica { volume, .. } => Some(volume),
                Role::Primary { .. } => None,
            })
            .map(|v| v.leave())
            .count()
    }

    /// Gives up every virtual IP held here (the node stops).
    pub fn release_vips(&self) {
        self.vips.release_all();
    }
}

impl Serving {
    /// Ends the targets no longer served here and forwards those whose primary moved
    /// away. Their ports become active/non-optimized, and their initiators are asked
    /// to log in again, as a single-path initiator then finds the new primary through
    /// a virtual IP.
    pub(super) fn stop_targets_gone(
        &self,
        st: &ClusterState,
        served: &mut HashMap<String, Served>,
    ) {
        let gone: Vec<String> = served
            .keys()
            .filter(|iqn| {
                st.targets
                    .get(*iqn)
                    .is_none_or(|t| !target_nodes(st, t).contains(&self.me))
            })
            .cloned()
            .collect();
        for iqn in gone {
            if st.targets.contains_key(&iqn) {
                self.server.hand_over_target(&iqn, Duration::from_secs(2));
            } else {
                self.server.remove_target(&iqn);
            }
            served.remove(&iqn);
            self.events.push(
                EventKind::Config,
                format!("{} stopped serving {iqn}", self.node_name),
            );
        }
        for (iqn, s) in served.iter_mut() {
            let Some(t) = st.targets.get(iqn) else {
                continue;
            };
            match st.target_primary(t) {
                Some(p) if p != self.me && s.forwarding_to != Some(p) => {
                    self.forward_target(t, s, p);
                }
                _ => {}
            }
        }
    }

    /// Targets served here: executed where they are primary, once every volume's
    /// primary runs at its epoch; forwarded from the other nodes that hold their
    /// volumes. Sets each target's portals, CHAP accounts and ALUA port groups.
    pub(super) fn reconcile_targets(
        &self,
        st: &ClusterState,
        served: &mut HashMap<String, Served>,
        roles: &HashMap<String, Role>,
    ) -> Result<()> {
        for t in st.targets.values() {
            let nodes = target_nodes(st, t);
            if !nodes.contains(&self.me) {
                continue;
            }
            let Some(primary) = st.target_primary(t) else {
                continue;
            };
            let here = primary == self.me;
            let ready = t.volumes().iter().all(|n| {
                st.volumes.get(n).is_some_and(|v| {
                    matches!(roles.get(n), Some(Role::Primary { epoch, .. }) if *epoch == v.epoch)
                })
            });
            if here && !ready && !served.contains_key(&t.iqn) {
                continue;
            }
            let is_new = !served.contains_key(&t.iqn);
            let s = served.entry(t.iqn.clone()).or_insert_with(|| Served {
                device: Arc::new(scsi::TargetDevice::new()),
                luns: BTreeMap::new(),
                unexported: BTreeMap::new(),
                forwarding_to: None,
                config: Target::default(),
                chap: Vec::new(),
                portals: (Vec::new(), Vec::new()),
            });
            if !here {
                if is_new || s.forwarding_to != Some(primary) {
                    self.forward_target(t, s, primary);
                }
            } else if ready {
                if s.forwarding_to.take().is_some() {
                    s.device.take_over();
                }
                if is_new || s.luns.is_empty() {
                    s.device.set_remote_paths(Arc::new(ClusterPaths {
                        net: self.net.clone(),
                        node: self.node.clone(),
                        iqn: t.iqn.clone(),
                        me: self.me,
                    }));
                }
                self.execute_target_here(st, t, s, roles)?;
            }
            let chap: Vec<ChapAccount> = t
                .chap
                .iter()
                .filter_map(|u| st.chap.get(u))
                .map(|a| ChapAccount {
                    user: a.user.clone(),
                    secret: a.secret.clone(),
                    mutual: a.mutual.clone(),
                })
                .collect();
            let mut portals = self.portals.clone();
            if here {
                // Virtual IPs are portals of the primary.
                let group_tag = port_group_of(self.me);
                portals.extend(t.vips.keys().map(|a| iscsi_target::Portal {
                    addr: SocketAddr::new(*a, crate::vip::VIP_PORT),
                    group_tag,
                }));
            }
            let remote: Vec<iscsi_target::Portal> = nodes
                .iter()
                .filter(|n| **n != self.me)
                .filter_map(|n| st.nodes.get(n))
                .flat_map(|n| {
                    n.addresses.portals.iter().map(|a| iscsi_target::Portal {
                        addr: *a,
                        group_tag: port_group_of(n.id),
                    })
                })
                .collect();
            let portals = (portals, remote);
            if is_new || s.config != *t || s.chap != chap || s.portals != portals {
                self.server.set_target(iscsi_target::TargetConfig {
                    name: t.iqn.clone(),
                    alias: t.alias.clone(),
                    device: s.device.clone(),
                    portals: portals.0.clone(),
                    remote_portals: portals.1.clone(),
                    allowed_initiators: t.admitted_initiators(),
                    chap: chap.clone(),
                    allow_target_reset: t.allow_target_reset,
                });
                if is_new {
                    self.events.push(
                        EventKind::Config,
                        format!("{} serves {}", self.node_name, t.iqn),
                    );
                }
                s.config = t.clone();
                s.chap = chap;
                s.portals = portals;
            }
            let groups = {
                let now = Instant::now();
                let mut seen = self
                    .in_sync_seen
                    .lock()
                    .map_err(|_| ServingError::Poisoned("in-sync sightings"))?;
                for n in nodes.iter().filter(|n| in_sync_for(st, t, **n)) {
                    seen.insert((t.iqn.clone(), *n), now);
                }
                port_groups_with(st, t, &|n| {
                    seen.get(&(t.iqn.clone(), n))
                        .is_some_and(|at| now.duration_since(*at) < PATH_FLAP_GRACE)
                })
            };
            s.device.set_port_groups(groups);
            if s.forwarding_to.is_none() {
                self.act_on_alua_requests(st, t, &s.device, &nodes);
            }
        }
        Ok(())
    }
}
