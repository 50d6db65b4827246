//! Roles and leases: this node as primary (lease renewals, takeover reports, planned
//! handovers, re-promotion after a restart or a power loss) or replica of each volume,
//! and the in-sync-set requests the replication driver makes through Raft.

use super::*;

/// How long after a takeover its pause is committed to the cluster state; the
/// `failover_finished` event goes out at once.
const RECORD_PAUSE_AFTER: Duration = Duration::from_secs(1);

pub(super) enum Role {
    Primary {
        epoch: u64,
        volume: Arc<PrimaryVolume>,
        store: Arc<blockstore::FileStore>,
        lease: super::leases::LeaseHandle,
        /// The online verify started here.
        verify: Option<u64>,
        /// The other replicas and the ones among them being rebuilt, as the primary
        /// was last told ([`PrimaryVolume::set_replicas`]).
        replicas: (BTreeSet<NodeId>, BTreeSet<NodeId>),
    },
    Replica {
        volume: Arc<ReplicaVolume>,
        store: Arc<blockstore::FileStore>,
        started: Instant,
    },
}

/// Sends in-sync-set changes through Raft.
pub(super) struct IsrRequests {
    pub(super) node: ClusterNode,
    pub(super) volume: String,
    pub(super) epoch: u64,
    pub(super) rt: tokio::runtime::Handle,
}

impl IsrRequests {
    fn request(&self, epoch: u64, add: Vec<NodeId>, remove: Vec<NodeId>) {
        let (node, volume) = (self.node.clone(), self.volume.clone());
        self.rt.spawn(async move {
            let cmd = Command::IsrChange {
                volume: volume.clone(),
                epoch,
                add: add.clone(),
                remove: remove.clone(),
            };
            match node.write(cmd).await {
                Ok(Ok(_)) => {
                    let names: Vec<String> = {
                        let st = node.state().borrow().clone();
                        add.iter()
                            .chain(&remove)
                            .map(|id| st.node_name(*id))
                            .collect()
                    };
                    let (kind, what) = if add.is_empty() {
                        (EventKind::ReplicaLeft, "left")
                    } else {
                        (EventKind::ReplicaRejoined, "rejoined")
                    };
                    let mut details = serde_json::Map::new();
                    details.insert("volume".into(), volume.clone().into());
                    details.insert("nodes".into(), names.clone().into());
                    node.events().push_with(
                        kind,
                        format!("{} {what} the in-sync set of {volume}", names.join(", ")),
                        details,
                    );
                }
                Ok(Err(r)) => warn!(%volume, refused = %r, "in-sync set change refused"),
                Err(e) => warn!(%volume, error = %e, "in-sync set change not committed"),
            }
        });
    }
}

impl ControlPlane for IsrRequests {
    fn request_isr_add(&self, epoch: replication::Epoch, node: replication::NodeId) {
        self.request(epoch.0, vec![node.0], Vec::new());
    }
    fn request_isr_remove(&self, epoch: replication::Epoch, node: replication::NodeId) {
        self.request(epoch.0, Vec::new(), vec![node.0]);
    }
    fn notice(&self, notice: replication::Notice) {
        let volume = &self.volume;
        let name = |id: NodeId| self.node.state().borrow().node_name(id);
        let mut details = serde_json::Map::new();
        details.insert("volume".into(), volume.clone().into());
        match &notice {
            replication::Notice::ResyncStarted { peer, regions }
            | replication::Notice::ResyncFinished { peer, regions, .. } => {
                details.insert("peer".into(), name(peer.0).into());
                details.insert("bytes".into(), (regions * REGION_SIZE).into());
            }
            replication::Notice::DiskFailed { .. } => {
                details.insert("node".into(), self.node.identity().name.clone().into());
            }
        }
        let (kind, what) = match notice {
            replication::Notice::ResyncStarted { peer, regions } => (
                EventKind::ResyncStarted,
                format!(
                    "resync of {volume} to {} started: {} to send",
                    name(peer.0),
                    cluster::state::human(regions * REGION_SIZE)
                ),
            ),
            replication::Notice::DiskFailed { error } => (
                EventKind::Disk,
                format!(
                    "{}'s copy of {volume} failed ({error}): it gives the primary role up; an in-sync replica takes over",
                    self.node.identity().name
                ),
            ),
            replication::Notice::ResyncFinished {
                peer,
                regions,
                took,
            } => (
                EventKind::ResyncFinished,
                format!(
                    "resync of {volume} to {} finished: {} in {:.1} s",
                    name(peer.0),
                    cluster::state::human(regions * REGION_SIZE),
                    took.as_secs_f64()
                ),
            ),
        };
        self.node.events().push_with(kind, what, details);
    }

    fn verify_finished(&self, report: replication::VerifyReport) {
        let result = cluster::state::VerifyResult {
            primary: self.node.id(),
            epoch: self.epoch,
            regions: report.regions,
            compared: report.compared,
            replicas: report
                .differing
                .keys()
                .chain(report.not_compared.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|n| cluster::state::ReplicaVerify {
                    node: n.0,
                    differing: report.differing.get(n).map_or(0, |r| r.len() as u64),
                    sample: report.differing.get(n).map_or_else(Vec::new, |r| {
                        r.iter().take(cluster::state::VERIFY_SAMPLE).collect()
                    }),
                    not_compared: report.not_compared.get(n).copied().unwrap_or(0),
                })
                .collect(),
            finished_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        if report.compared < report.regions && report.not_compared.is_empty() {
            // Replaced by a newer request before it finished: nothing to record.
            return;
        }
        let what = {
            let st = self.node.state().borrow().clone();
            format!(
                "verify of {} finished: {}",
                self.volume,
                result.summary(&st, report.repair)
            )
        };
        self.node.events().push(EventKind::Verify, what);
        let (node, volume, id) = (self.node.clone(), self.volume.clone(), report.id);
        self.rt.spawn(async move {
            let cmd = Command::FinishVerify {
                volume: volume.clone(),
                id,
                result,
            };
            match node.write(cmd).await {
                Ok(Ok(_)) => {}
                Ok(Err(r)) => warn!(%volume, refused = %r, "verify result refused"),
                Err(e) => warn!(%volume, error = %e, "verify result not committed"),
            }
        });
    }
}

/// Test only: `BULWARK_TEST_VOLATILE_CACHE=1` holds the writes of replicated volumes in
/// memory until flushed, so the power-cut tests can take unflushed writes back (see
/// `blockstore::volatile`). Never set it for data anyone wants to keep.
pub(super) fn test_volatile_cache() -> bool {
    std::env::var_os("BULWARK_TEST_VOLATILE_CACHE").is_some_and(|v| v == "1")
}

/// Whether this node may have lost power since the last run of `bulwark serve` on
/// `data_dir`, and why: the kernel's boot id changed (a reboot, a power cut), or the
/// test-only power cut of `blockstore::volatile` left its mark. The boot id is kept in
/// `<data_dir>/boot-id` for the next start.
pub(super) fn lost_power_since_last_run(data_dir: &Path) -> Option<String> {
    let marker = data_dir
        .join("volumes")
        .join(blockstore::volatile::POWER_WAS_CUT_FILE);
    let cut = marker.exists();
    if cut {
        let _ = std::fs::remove_file(&marker);
    }
    let saved_path = data_dir.join("boot-id");
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let saved = std::fs::read_to_string(&saved_path)
        .map(|s| s.trim().to_string())
        .ok();
    if !boot.is_empty() && saved.as_deref() != Some(boot.as_str()) {
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let tmp = saved_path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(boot.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &saved_path)?;
            std::fs::File::open(data_dir)?.sync_all()
        };
        if let Err(e) = write() {
            warn!(error = %e, "cannot record the boot id; a later restart cannot tell a power loss");
        }
    }
    if cut {
        Some("its power was cut (test)".into())
    } else {
        match saved {
            Some(s) if !boot.is_empty() && s != boot => {
                Some("its machine rebooted since it last ran (the boot id changed), so it may have lost power".into())
            }
            _ => None,
        }
    }
}

/// A target this node is about to hand over ([`Serving::hand_over`]).
struct Handover {
    /// Its volumes and their epochs.
    group: Vec<(String, u64)>,
    volumes: Vec<Arc<PrimaryVolume>>,
    to: NodeId,
    to_name: String,
    io_stopped_unix_ms: u64,
}

impl Serving {
    pub(super) fn open_volume(&self, v: &Volume) -> Result<Arc<blockstore::FileStore>> {
        self.make_clone_copy(v)?;
        let store = blockstore::FileStore::open(
            &self.volume_path(&v.name),
            &blockstore::OpenOptions {
                create_size_bytes: Some(v.size_bytes),
                block_size: v.block_size,
                direct: false,
                // A rebuild or resync streams whole regions: around the page cache.
                bulk_direct: true,
                read_only: false,
                volatile_cache: test_volatile_cache(),
            },
        )
        .map_err(|source| ServingError::Store {
            volume: v.name.clone(),
            source,
        })?;
        store
            .grow(v.size_bytes)
            .map_err(|source| ServingError::Store {
                volume: format!("{} (growing it)", v.name),
                source,
            })?;
        Ok(Arc::new(store))
    }

    /// Prepares the hand-over of the target of `v` (all its volumes) to `v.moving_to`:
    /// stops renewing their leases. `None` if it is under way already, or this node
    /// does not run that primary. [`Self::hand_over`] does the rest.
    fn prepare_handover(
        &self,
        st: &ClusterState,
        v: &Volume,
        roles: &mut HashMap<String, Role>,
    ) -> Option<Handover> {
        let to = v.moving_to?;
        let group = Self::group_of(st, v);
        let key = (group[0].0.clone(), group[0].1);
        let fresh = self
            .handovers
            .lock()
            .map(|mut h| h.insert(key))
            .unwrap_or(false);
        if !fresh {
            return None;
        }
        let mut volumes = Vec::new();
        for (name, epoch) in &group {
            match roles.get(name) {
                Some(Role::Primary {
                    epoch: e,
                    volume,
                    lease,
                    ..
                }) if e == epoch => {
                    // No renewal may race the release below.
                    lease.abort();
                    volumes.push(volume.clone());
                }
                _ => {
                    warn!(volume = %name, "planned move: this node does not run that primary; leaving it to failover");
                    return None;
                }
            }
        }
        let names: Vec<String> = group.iter().map(|(n, _)| n.clone()).collect();
        let to_name = st
            .nodes
            .get(&to)
            .map(|n| n.name.clone())
            .unwrap_or_default();
        let mut details = serde_json::Map::new();
        details.insert("volumes".into(), names.clone().into());
        details.insert("from".into(), self.node_name.clone().into());
        details.insert("to".into(), to_name.clone().into());
        details.insert("epoch".into(), (group[0].1 + 1).into());
        details.insert("planned".into(), true.into());
        self.events.push_with(
            EventKind::FailoverStarted,
            format!(
                "planned move of {} from {} to {to_name}: draining",
                names.join(", "),
                self.node_name
            ),
            details,
        );
        Some(Handover {
            group,
            volumes,
            to,
            to_name,
            io_stopped_unix_ms: cluster::status::unix_ms(),
        })
    }

    /// Hands the targets over: refuse new writes, let those in flight finish, give the
    /// leases up for good, then commit the promotions. The next primary serves as soon
    /// as it has sealed: no lease to wait out, since this one released its own.
    ///
    /// The targets going to one node move in one command, so that node starts them in
    /// one pass: a node stopping with 64 targets handed them over one commit at a
    /// time, and the last ones paused for 600 ms (issue 19). If that command is
    /// refused (a target changed meanwhile), each target is promoted on its own.
    fn hand_over(&self, moves: Vec<Handover>) {
        if moves.is_empty() {
            return;
        }
        let (node, events) = (self.node.clone(), self.events.clone());
        let from_name = self.node_name.clone();
        self.rt.spawn(async move {
            let started = Instant::now();
            let mut drains = tokio::task::JoinSet::new();
            for (i, m) in moves.iter().enumerate() {
                let volumes = m.volumes.clone();
                drains.spawn_blocking(move || {
                    let ok = volumes.iter().all(|pv| pv.drain(Duration::from_secs(2)));
                    for pv in &volumes {
                        pv.release();
                    }
                    (i, ok)
                });
            }
            let mut drained = vec![false; moves.len()];
            // Every drain is waited for, even after one of them panicked: a target
            // is handed over only once all the writes it took are done or timed out.
            while let Some(joined) = drains.join_next().await {
                if let Ok((i, ok)) = joined {
                    drained[i] = ok;
                }
            }
            let promote = |ms: &[&Handover]| Command::Promote {
                volumes: ms.iter().flat_map(|m| m.group.iter().cloned()).collect(),
                node: ms[0].to,
                cause: Some(cluster::state::FailoverCause {
                    planned: true,
                    io_stopped_unix_ms: ms
                        .iter()
                        .map(|m| m.io_stopped_unix_ms)
                        .min()
                        .unwrap_or_default(),
                    reason: format!("planned move from {from_name}"),
                }),
            };
            let mut by_node: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
            for (i, m) in moves.iter().enumerate() {
                by_node.entry(m.to).or_default().push(i);
            }
            for batch in by_node.into_values() {
                let ms: Vec<&Handover> = batch.iter().map(|i| &moves[*i]).collect();
                let together = match node.write(promote(&ms)).await {
                    Ok(Ok(_)) => Some(Ok(())),
                    Ok(Err(r)) if ms.len() > 1 => {
                        info!(refused = %r, "planned moves refused together; handing the targets over one by one");
                        None
                    }
                    Ok(Err(r)) => Some(Err(r.to_string())),
                    Err(e) => Some(Err(e.to_string())),
                };
                for i in batch {
                    let m = &moves[i];
                    let outcome = match &together {
                        Some(o) => o.clone(),
                        None => match node.write(promote(&[m])).await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(r)) => Err(r.to_string()),
                            Err(e) => Err(e.to_string()),
                        },
                    };
                    let names = m.group.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
                    match outcome {
                        Ok(()) => events.push(
                            EventKind::Handover,
                            format!(
                                "planned move of {names} from {from_name} to {}: drained{} and handed over in {} ms",
                                m.to_name,
                                if drained[i] { "" } else { " (some writes timed out)" },
                                started.elapsed().as_millis()
                            ),
                        ),
                        Err(why) => events.push(
                            EventKind::Handover,
                            format!("planned move of {names} not done ({why}); the leader promotes an in-sync replica when the lease lapses"),
                        ),
                    }
                }
            }
        });
    }

    /// Tells the cluster that this node lost power (`Command::NodeLostPower`), until it
    /// is committed: it leaves the in-sync sets it may no longer deserve.
    pub(super) fn report_lost_power(&self, why: String) {
        let (node, me, name, events) = (
            self.node.clone(),
            self.me,
            self.node_name.clone(),
            self.events.clone(),
        );
        self.rt.spawn(async move {
            loop {
                match node.write(Command::NodeLostPower { id: me }).await {
                    Ok(Ok(_)) => {
                        events.push(
                            EventKind::Power,
                            format!("{name} came back from a power loss ({why}): it leaves the in-sync set of the volumes it does not serve while another member remains, and returns through resync"),
                        );
                        return;
                    }
                    Ok(Err(r)) => {
                        warn!(refused = %r, "the power loss was not recorded");
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "power loss not recorded yet; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    /// Says once per volume and epoch why this node, primary before a power loss,
    /// leaves the choice of the next primary to the leader.
    pub(super) fn defer_to_failover(&self, v: &Volume, why: &str) {
        let fresh = self
            .repromotion_asked
            .lock()
            .map(|mut s| s.insert((v.name.clone(), v.epoch)))
            .unwrap_or(false);
        if fresh {
            self.events.push(
                EventKind::Primary,
                format!(
                    "{} was primary of {} but {why}: it does not re-promote itself; once its lease has lapsed the leader promotes an in-sync member, another node first",
                    self.node_name, v.name
                ),
            );
        }
    }

    pub(super) fn ask_repromotion(&self, st: &ClusterState, v: &Volume) {
        let key = (v.name.clone(), v.epoch);
        let fresh = self
            .repromotion_asked
            .lock()
            .map(|mut s| s.insert(key))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        let cmd = Command::Promote {
            volumes: Self::group_of(st, v),
            node: self.me,
            cause: Some(cluster::state::FailoverCause {
                planned: false,
                io_stopped_unix_ms: cluster::status::unix_ms(),
                reason: format!(
                    "{} was primary before its process restarted and did not lose power (same boot), so its page cache holds every write it acknowledged: re-promoted at once",
                    self.node_name
                ),
            }),
        };
        let node = self.node.clone();
        let name = v.name.clone();
        self.rt.spawn(async move {
            match node.write(cmd).await {
                Ok(Ok(_)) => info!(volume = %name, "re-promoted after a restart"),
                Ok(Err(r)) => info!(volume = %name, refused = %r, "re-promotion refused (someone else took over)"),
                Err(e) => warn!(volume = %name, error = %e, "re-promotion not committed"),
            }
        });
    }

    pub(super) fn start_primary(
        &self,
        v: &Volume,
        settings: &cluster::state::Settings,
    ) -> Result<Role> {
        let store = self.open_volume(v)?;
        let store_kept = store.clone();
        let state = ReplicaState::new(&self.volumes_dir, &v.name);
        let replicas = self.other_replicas(v);
        let cfg = PrimaryConfig {
            me: replication::NodeId(self.me),
            epoch: replication::Epoch(v.epoch),
            region_size: REGION_SIZE,
            size_bytes: v.size_bytes,
            replicas: replicas.0.iter().copied().map(replication::NodeId).collect(),
            rebuilding: replicas.1.iter().copied().map(replication::NodeId).collect(),
            in_sync: v
                .in_sync
                .iter()
                .copied()
                .filter(|n| *n != self.me)
                .map(replication::NodeId)
                .collect(),
            own_activity_log: state
                .activity_log()
                .map_err(io_error(format!("volume {}: reading its activity log", v.name)))?,
            dirty_hint: state.dirty_map().unwrap_or_else(|e| {
                warn!(volume = %v.name, error = %e, "ignoring the map of out-of-sync regions; out-of-sync replicas get a full sync");
                None
            }),
            replica_timeout_ms: 1000,
            // 128 regions in flight (up to 128 MiB of memory per replica being
            // resynced): with fewer, the disks idled between round trips (a 4 GiB
            // rebuild on the reference machine: 16 in flight 230 MiB/s, 64 about 590,
            // 128 about 650, 256 about 700; scripts/bench-rebuild).
            resync_window: 128,
            resync_rate: settings.resync_rate_bytes_per_s,
            rebuild_rate: settings.rebuild_rate_bytes_per_s,
            activity_log_slack: self.activity_log_slack,
        };
        let control = Arc::new(IsrRequests {
            node: self.node.clone(),
            volume: v.name.clone(),
            epoch: v.epoch,
            rt: self.rt.clone(),
        });
        let volume = Arc::new(
            PrimaryVolume::start(
                cfg,
                store.clone(),
                Arc::new(crate::snapshots::VolumeCopy::new(store.clone())),
                state,
                self.net.transport(&v.name),
                control,
            )
            .map_err(io_error(format!("volume {}: starting as primary", v.name)))?,
        );
        self.net.add_primary(&v.name, volume.clone());
        let lease = self.leases.hold(&v.name, v.epoch, volume.clone());
        self.events.push(
            EventKind::Primary,
            format!(
                "{} is primary of {} (epoch {})",
                self.node_name, v.name, v.epoch
            ),
        );
        if let Some(f) = v
            .last_failover
            .clone()
            .filter(|f| f.to == self.me && f.epoch == v.epoch && f.pause_ms.is_none())
        {
            self.report_takeover(v.name.clone(), f, volume.clone());
        }
        Ok(Role::Primary {
            epoch: v.epoch,
            volume,
            store: store_kept,
            lease,
            verify: None,
            replicas,
        })
    }

    /// The volume's replicas other than this node, and those among them being rebuilt
    /// (joining, not yet in sync).
    fn other_replicas(&self, v: &Volume) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let others = v
            .replicas
            .iter()
            .copied()
            .filter(|n| *n != self.me)
            .collect();
        let rebuilding = v
            .joining
            .iter()
            .map(|j| j.node)
            .filter(|n| !v.in_sync.contains(n))
            .collect();
        (others, rebuilding)
    }

    /// Once the new primary `volume` serves, tells the cluster how long I/O paused
    /// (`failover_finished`, and [`Command::FailoverFinished`] for the status).
    pub(super) fn report_takeover(
        &self,
        name: String,
        f: cluster::state::FailoverRecord,
        volume: Arc<PrimaryVolume>,
    ) {
        let (node, events) = (self.node.clone(), self.events.clone());
        let counter = if f.planned {
            &self.failovers.planned
        } else {
            &self.failovers.unplanned
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let from = self.node.state().borrow().node_name(f.from);
        let me = self.node_name.clone();
        self.rt.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !volume.serving() {
                if Instant::now() > deadline || volume.failure().is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let pause_ms = cluster::status::unix_ms().saturating_sub(f.io_stopped_unix_ms);
            let mut details = serde_json::Map::new();
            details.insert("volume".into(), name.clone().into());
            details.insert("from".into(), from.clone().into());
            details.insert("to".into(), me.clone().into());
            details.insert("epoch".into(), f.epoch.into());
            details.insert("planned".into(), f.planned.into());
            details.insert("pause_ms".into(), pause_ms.into());
            events.push_with(
                EventKind::FailoverFinished,
                format!(
                    "{} of {name} from {from} to {me} finished: I/O paused {pause_ms} ms",
                    if f.planned {
                        "planned move"
                    } else {
                        "failover"
                    }
                ),
                details,
            );
            // The record is for the status and metrics, and waits a moment: committed at
            // once, the records of the first volumes of a failover of 256 competed
            // with the lease renewals of those still starting (issue 19).
            tokio::time::sleep(RECORD_PAUSE_AFTER).await;
            let cmd = Command::FailoverFinished {
                volumes: vec![name.clone()],
                epoch: f.epoch,
                pause_ms,
            };
            if let Err(e) = node.write(cmd).await {
                tracing::debug!(volume = %name, error = %e, "failover pause not recorded");
            }
        });
    }

    pub(super) fn start_replica(&self, v: &Volume) -> Result<Role> {
        let state = ReplicaState::new(&self.volumes_dir, &v.name);
        if state.epoch().is_ok_and(|e| e.0 == 0) {
            // Never sealed by a primary, so it never took a write: whatever a file of
            // that name holds (a replica of an earlier volume of the same name) goes.
            // A rebuild copies only the regions that hold data, and relies on the
            // others reading as zeroes here.
            let path = self.volume_path(&v.name);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
                info!(volume = %v.name, "starting from an empty copy (this node never held the volume's data)");
                std::fs::remove_file(&path).map_err(io_error(format!(
                    "volume {}: removing a stale copy",
                    v.name
                )))?;
            }
        }
        let store = self.open_volume(v)?;
        let r = Arc::new(
            ReplicaVolume::start(
                REGION_SIZE,
                store.clone(),
                Arc::new(crate::snapshots::VolumeCopy::new(store.clone())),
                state,
                self.net.transport(&v.name),
                self.activity_log_slack,
            )
            .map_err(io_error(format!("volume {}: starting as replica", v.name)))?,
        );
        self.net.add_replica(&v.name, r.clone());
        Ok(Role::Replica {
            volume: r,
            store,
            started: Instant::now(),
        })
    }

    pub(super) fn stop_role(&self, name: &str, role: Option<Role>) {
        match role {
            Some(Role::Primary { lease, epoch, .. }) => {
                lease.abort();
                self.net.remove_primary(name);
                self.events.push(
                    EventKind::Primary,
                    format!(
                        "{} is no longer primary of {name} (was epoch {epoch})",
                        self.node_name
                    ),
                );
            }
            Some(Role::Replica { .. }) => {
                self.net.remove_replica(name);
            }
            None => {}
        }
    }
}

impl Serving {
    /// Starts, keeps or stops this node's role (primary or replica) for every volume
    /// placed here, then carries out the planned moves of volumes primary here.
    pub(super) fn reconcile_roles(
        &self,
        st: &ClusterState,
        start_epochs: &HashMap<String, u64>,
        roles: &mut HashMap<String, Role>,
    ) {
        let here: BTreeSet<&String> = st
            .volumes
            .values()
            .filter(|v| v.replicas.contains(&self.me))
            .map(|v| &v.name)
            .collect();
        let stale: Vec<String> = roles
            .keys()
            .filter(|n| !here.contains(n))
            .cloned()
            .collect();
        for name in stale {
            self.stop_role(&name, roles.remove(&name));
        }
        // Primaries to start, all at once below (a failover of a node with many
        // volumes starts them all: one after another they took seconds).
        let mut to_start: Vec<(&Volume, Option<Role>)> = Vec::new();
        for v in st
            .volumes
            .values()
            .filter(|v| v.replicas.contains(&self.me))
        {
            if v.primary == self.me {
                match roles.get_mut(&v.name) {
                    Some(Role::Primary {
                        epoch,
                        volume,
                        verify,
                        replicas,
                        ..
                    }) if *epoch == v.epoch => {
                        volume.set_size(v.size_bytes);
                        let now = self.other_replicas(v);
                        if *replicas != now {
                            let to_set = |s: &BTreeSet<NodeId>| -> BTreeSet<replication::NodeId> {
                                s.iter().copied().map(replication::NodeId).collect()
                            };
                            volume.set_replicas(
                                to_set(&now.0),
                                to_set(&now.1),
                                &self.net.up_nodes(),
                            );
                            for n in now.0.difference(&replicas.0) {
                                self.events.push(
                                    EventKind::Rebuild,
                                    format!(
                                        "rebuild of {} on {} started from {}",
                                        v.name,
                                        st.node_name(*n),
                                        self.node_name
                                    ),
                                );
                            }
                            *replicas = now;
                        }
                        let isr: BTreeSet<replication::NodeId> = v
                            .in_sync
                            .iter()
                            .copied()
                            .filter(|n| *n != self.me)
                            .map(replication::NodeId)
                            .collect();
                        volume.isr_committed(replication::Epoch(v.epoch), isr);
                        volume.set_rates(
                            st.settings.resync_rate_bytes_per_s,
                            st.settings.rebuild_rate_bytes_per_s,
                        );
                        if let Some(asked) = v.verify.as_ref().filter(|x| x.result.is_none()) {
                            if *verify != Some(asked.id) {
                                *verify = Some(asked.id);
                                volume.start_verify(asked.id, asked.repair);
                                self.events.push(
                                    EventKind::Verify,
                                    format!(
                                        "verify of {} started on {}{}",
                                        v.name,
                                        self.node_name,
                                        if asked.repair { " (repairing)" } else { "" }
                                    ),
                                );
                            }
                        }
                        continue;
                    }
                    _ => {}
                }
                if start_epochs.get(&v.name) == Some(&v.epoch) {
                    // Primary before this process started: its stream state is gone, so
                    // it comes back at a new epoch (the seal then resyncs what the
                    // replicas may hold that it lacks) -- unless it lost power: then
                    // the leader promotes another in-sync member, which may still hold
                    // writes this node lost, or this one if it is the last.
                    match &self.lost_power {
                        Some(why) => self.defer_to_failover(v, why),
                        None => self.ask_repromotion(st, v),
                    }
                    continue;
                }
                to_start.push((v, roles.remove(&v.name)));
            } else {
                let retry = match roles.get(&v.name) {
                    Some(Role::Replica {
                        volume, started, ..
                    }) => volume
                        .failure()
                        .filter(|_| started.elapsed() >= REPLICA_RETRY),
                    _ => None,
                };
                if let Some(why) = &retry {
                    // Its disk failed: try again now and then (space may have been
                    // freed); the primary resyncs what it missed.
                    self.events.push(
                        EventKind::Disk,
                        format!(
                            "restarting the replica of {} on {} (it stopped: {why})",
                            v.name, self.node_name
                        ),
                    );
                } else if let Some(Role::Replica { store, .. }) = roles.get(&v.name) {
                    // A resize: replicas grow first (writes past the old end may arrive
                    // before this, and grow the file on demand).
                    if let Err(e) = store.grow(v.size_bytes) {
                        error!(volume = %v.name, "cannot grow the replica: {e}");
                    }
                    continue;
                }
                let old = roles.remove(&v.name);
                self.stop_role(&v.name, old);
                match self.start_replica(v) {
                    Ok(r) => {
                        roles.insert(v.name.clone(), r);
                    }
                    Err(e) => error!(volume = %v.name, "cannot start the replica: {e:#}"),
                }
            }
        }

        self.leases.ask_early(
            &self.rt,
            to_start
                .iter()
                .map(|(v, _)| (v.name.clone(), v.epoch))
                .collect(),
        );
        for (name, role) in self.start_primaries(to_start, &st.settings) {
            roles.insert(name, role);
        }

        // Planned moves: drain, release the lease, hand over.
        let mut moves = Vec::new();
        for v in st.volumes.values() {
            if v.primary == self.me && v.moving_to.is_some() {
                moves.extend(self.prepare_handover(st, v, roles));
            }
        }
        self.hand_over(moves);
    }

    /// Stops the old roles of `volumes` and starts them as primaries, a few at a time.
    /// A start waits on no disk flush (the primary persists its epoch on its own
    /// thread), so more threads than cores only queue for the cores and the locks the
    /// starts share. The replicas are all told to stop first, so their threads wind
    /// down together rather than one join after another (issue 19).
    fn start_primaries(
        &self,
        volumes: Vec<(&Volume, Option<Role>)>,
        settings: &cluster::state::Settings,
    ) -> Vec<(String, Role)> {
        const PARALLEL: usize = 4;
        for (_, old) in &volumes {
            if let Some(Role::Replica { volume, .. }) = old {
                volume.stop_soon();
            }
        }
        let per_thread = volumes.len().div_ceil(PARALLEL).max(1);
        let mut chunks: Vec<Vec<(&Volume, Option<Role>)>> = Vec::new();
        let mut rest = volumes.into_iter().peekable();
        while rest.peek().is_some() {
            chunks.push(rest.by_ref().take(per_thread).collect());
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    scope.spawn(move || {
                        // What a start spawns runs on this node's runtime.
                        let _rt = self.rt.enter();
                        let mut started = Vec::new();
                        for (v, old) in chunk {
                            self.stop_role(&v.name, old);
                            match self.start_primary(v, settings) {
                                Ok(role) => started.push((v.name.clone(), role)),
                                Err(e) => {
                                    error!(volume = %v.name, "cannot start the primary: {e:#}")
                                }
                            }
                        }
                        started
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        })
    }

    /// Removes the files of volumes this node no longer holds.
    pub(super) fn remove_data_not_held(&self, st: &ClusterState) {
        if let Ok(dir) = std::fs::read_dir(&self.volumes_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let Some(vol) = name.strip_suffix(".img") else {
                    continue;
                };
                if let Some((vol, snapshot)) = vol.split_once('@') {
                    if !crate::snapshots::keep_copy(st, self.me, vol, snapshot) {
                        info!(
                            volume = vol,
                            snapshot, "removing a snapshot copy the cluster no longer keeps here"
                        );
                        let _ = std::fs::remove_file(entry.path());
                    }
                    continue;
                }
                let placed_here = st
                    .volumes
                    .get(vol)
                    .is_some_and(|v| v.replicas.contains(&self.me));
                if !placed_here {
                    info!(
                        volume = vol,
                        "removing the data of a volume this node no longer holds"
                    );
                    for ext in ["img", "pr", "epoch", "al", "dirty"] {
                        let _ = std::fs::remove_file(entry.path().with_extension(ext));
                    }
                }
            }
        }
    }
}
