//! Keeps what this node serves equal to what the cluster state says.
//!
//! For every volume with a replica here: a [`ReplicaVolume`] applying the primary's
//! stream, or — where this node is the primary — a [`PrimaryVolume`] that seals the
//! in-sync set, renews its lease with the Raft leader and is the block device of the
//! target's LUN. For every target whose volumes are primary here: an iSCSI target.
//! Changes apply to live targets: a new LUN raises REPORTED LUNS DATA HAS CHANGED, a
//! grown volume CAPACITY DATA HAS CHANGED, ACL changes end sessions they no longer
//! allow, CHAP changes apply at the next login. A target whose primary moves away is
//! removed here at once, ending its sessions, so initiators reconnect to the new one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::state::{ClusterState, Command, NodeId, NodeRole, Target, Volume};
use cluster::status::EventKind;
use cluster::ClusterNode;
use iscsi_proto::login::ChapAccount;
use replication::net::ReplicationNet;
use replication::{ControlPlane, PrimaryConfig, PrimaryVolume, ReplicaState, ReplicaVolume};
use scsi::BlockDevice;
use tracing::{error, info, warn};

use crate::ServingError;

type Result<T> = std::result::Result<T, ServingError>;

/// Maps an I/O error to [`ServingError::Io`] saying what was being done.
fn io_error(what: String) -> impl FnOnce(std::io::Error) -> ServingError {
    move |source| ServingError::Io { what, source }
}

/// Resync and activity-log granularity.
pub const REGION_SIZE: u64 = 1 << 20;
/// How often a primary renews its lease (well inside [`cluster::node::LEASE`]).
const RENEW_EVERY: Duration = Duration::from_millis(200);
/// Margin for clock rate differences between this node and the Raft leader.
const LEASE_MARGIN: Duration = Duration::from_millis(150);
/// How long a replica whose disk failed stays stopped before it is tried again.
const REPLICA_RETRY: Duration = Duration::from_secs(10);
/// A node that leaves the in-sync set keeps its path state this long: a replica that
/// flaps out and back (a stall under load) changes nothing the initiators see. The
/// reconcile that runs every second publishes the change once it lasts.
const PATH_FLAP_GRACE: Duration = Duration::from_secs(3);
/// How often the virtual IPs are checked against the leases.
const VIP_CHECK_EVERY: Duration = Duration::from_millis(100);

/// One target served here.
struct Served {
    device: Arc<scsi::TargetDevice>,
    /// LUN → (volume name, epoch of the primary serving it), for the logical units
    /// executed here; empty while forwarding.
    luns: BTreeMap<u64, (String, u64)>,
    /// The primary this node forwards the target's commands to (its ports are
    /// active/non-optimized or worse); `None`: this node is the primary.
    forwarding_to: Option<NodeId>,
    /// The configuration last given to the iSCSI server.
    config: Target,
    chap: Vec<ChapAccount>,
    /// The portals (this node's, then the other nodes') last given to the server.
    portals: (Vec<iscsi_target::Portal>, Vec<iscsi_target::Portal>),
}

/// The storage nodes that serve target `t`: those that hold a replica of every one of
/// its volumes, primary first.
pub fn target_nodes(st: &ClusterState, t: &Target) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = Vec::new();
    for (i, vol) in t.luns.values().enumerate() {
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
fn in_sync_for(st: &ClusterState, t: &Target, node: NodeId) -> bool {
    t.luns.values().all(|vol| {
        st.volumes
            .get(vol)
            .is_some_and(|v| v.in_sync.contains(&node))
    })
}

/// [`port_groups`], counting the nodes `recently_in_sync` says left the in-sync set only
/// a moment ago as still in sync: a replica that flaps out and back within the grace
/// changes no state, so initiators get no unit attention storm.
fn port_groups_with(
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
struct ClusterPaths {
    net: Arc<ReplicationNet>,
    node: ClusterNode,
    iqn: String,
    me: NodeId,
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
            self.net
                .forward(n, &self.iqn, body.clone(), Box::new(|_| {}));
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

/// Persistent reservations of a volume kept in the cluster state: a change completes
/// once the Raft log has it, and a new primary starts from the last one.
struct ClusterReservations {
    node: ClusterNode,
    volume: String,
    epoch: u64,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for ClusterReservations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterReservations")
            .field("volume", &self.volume)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl scsi::ReservationStore for ClusterReservations {
    fn load(&self) -> Option<String> {
        self.node
            .state()
            .borrow()
            .volumes
            .get(&self.volume)
            .and_then(|v| v.reservations.clone())
    }

    fn save(&self, state: &str) -> std::io::Result<()> {
        let cmd = Command::SetReservations {
            volume: self.volume.clone(),
            epoch: self.epoch,
            state: state.to_string(),
        };
        let node = self.node.clone();
        // Called on an I/O thread, never on the runtime.
        let r = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), node.write(cmd)).await
        });
        match r {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(refused))) => Err(std::io::Error::other(refused.to_string())),
            Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Err(_) => Err(std::io::Error::other("not committed within 5 s")),
        }
    }
}

enum Role {
    Primary {
        epoch: u64,
        volume: Arc<PrimaryVolume>,
        store: Arc<blockstore::FileStore>,
        lease: tokio::task::JoinHandle<()>,
        /// The online verify started here.
        verify: Option<u64>,
    },
    Replica {
        volume: Arc<ReplicaVolume>,
        store: Arc<blockstore::FileStore>,
        started: Instant,
    },
}

/// The serving side of a cluster node.
pub struct Serving {
    me: NodeId,
    node_name: String,
    node: ClusterNode,
    volumes_dir: PathBuf,
    server: iscsi_target::Server,
    portals: Vec<iscsi_target::Portal>,
    net: Arc<ReplicationNet>,
    rt: tokio::runtime::Handle,
    served: Mutex<HashMap<String, Served>>,
    roles: Mutex<HashMap<String, Role>>,
    /// Epochs of the volumes primary here when this process started: those must be
    /// re-promoted at a new epoch before serving (this process has no stream state).
    start_epochs: Mutex<Option<HashMap<String, u64>>>,
    repromotion_asked: Mutex<HashSet<(String, u64)>>,
    /// Why this node may have lost power since it last ran (its page cache, and with
    /// it writes it acknowledged but no flush covered, may be gone): then it does not
    /// re-promote itself, and the leader promotes an in-sync member, another node
    /// first (the cold-start rule, docs/design-notes.md).
    lost_power: Option<String>,
    /// Planned moves under way here, by (first volume of the group, epoch).
    handovers: Mutex<HashSet<(String, u64)>>,
    /// Virtual IPs of the targets served here.
    vips: crate::vip::Vips,
    /// When each node was last in sync for each target's volumes (path states).
    in_sync_seen: Mutex<HashMap<(String, NodeId), Instant>>,
    /// The target devices executed here, for commands forwarded from other nodes: read
    /// on the replication link's task, so never behind `served`, which a reconcile
    /// holds throughout.
    executed_here: std::sync::RwLock<HashMap<String, Arc<scsi::TargetDevice>>>,
    /// Primaries this node took over, by kind, for metrics.
    pub failovers: FailoverCounts,

    events: Arc<cluster::status::EventLog>,
}

/// Takeovers by this node since it started.
#[derive(Debug, Default)]
pub struct FailoverCounts {
    /// After a planned move.
    pub planned: std::sync::atomic::AtomicU64,
    /// After the old primary's lease lapsed.
    pub unplanned: std::sync::atomic::AtomicU64,
}

/// Sends in-sync-set changes through Raft.
struct IsrRequests {
    node: ClusterNode,
    volume: String,
    epoch: u64,
    rt: tokio::runtime::Handle,
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
    fn request_isr_add(&self, epoch: u64, node: NodeId) {
        self.request(epoch, vec![node], Vec::new());
    }
    fn request_isr_remove(&self, epoch: u64, node: NodeId) {
        self.request(epoch, Vec::new(), vec![node]);
    }
    fn notice(&self, notice: replication::Notice) {
        let volume = &self.volume;
        let name = |id: NodeId| self.node.state().borrow().node_name(id);
        let mut details = serde_json::Map::new();
        details.insert("volume".into(), volume.clone().into());
        match &notice {
            replication::Notice::ResyncStarted { peer, regions }
            | replication::Notice::ResyncFinished { peer, regions, .. } => {
                details.insert("peer".into(), name(*peer).into());
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
                    name(peer),
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
                    name(peer),
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
                    node: *n,
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

impl Serving {
    /// Serving for `node` through `server` on `portals`; volume files live in
    /// `<data_dir>/volumes`; replication through `net`.
    pub fn new(
        node: &ClusterNode,
        server: iscsi_target::Server,
        data_dir: &Path,
        portals: Vec<iscsi_target::Portal>,
        net: Arc<ReplicationNet>,
    ) -> Arc<Serving> {
        let serving = Arc::new(Serving {
            me: node.id(),
            node_name: node.identity().name.clone(),
            node: node.clone(),
            volumes_dir: data_dir.join("volumes"),
            server,
            portals,
            net,
            rt: tokio::runtime::Handle::current(),
            served: Mutex::new(HashMap::new()),
            roles: Mutex::new(HashMap::new()),
            start_epochs: Mutex::new(None),
            repromotion_asked: Mutex::new(HashSet::new()),
            lost_power: lost_power_since_last_run(data_dir),
            handovers: Mutex::new(HashSet::new()),
            vips: crate::vip::Vips::new(),
            in_sync_seen: Mutex::new(HashMap::new()),
            executed_here: std::sync::RwLock::new(HashMap::new()),
            failovers: FailoverCounts::default(),

            events: node.events(),
        });
        if let Some(why) = serving.lost_power.clone() {
            serving.report_lost_power(why);
        }
        let weak = Arc::downgrade(&serving);
        serving
            .net
            .set_forward_handler(Arc::new(crate::forward::ForwardServer {
                lookup: Box::new(move |target| {
                    let s = weak.upgrade()?;
                    let devices = s.executed_here.read().ok()?;
                    devices.get(target).cloned()
                }),
                server: serving.server.clone(),
            }));
        serving
    }

    /// Reconciles on every state change until the state channel closes; also every
    /// second, so a re-promotion request that was lost is asked again.
    pub async fn run(self: Arc<Self>, mut state: tokio::sync::watch::Receiver<Arc<ClusterState>>) {
        // Virtual IPs follow the lease, not only the state: a primary cut off from the
        // cluster loses its lease while its state still names it, and must give the
        // address up before its successor takes it.
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _vip_watch = AbortOnDrop({
            let (me, st) = (self.clone(), state.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(VIP_CHECK_EVERY).await;
                    let (me, st) = (me.clone(), st.borrow().clone());
                    let _ = tokio::task::spawn_blocking(move || me.reconcile_vips(&st)).await;
                }
            })
        });
        loop {
            let st = state.borrow_and_update().clone();
            let me = self.clone();
            // File creation and fsync are blocking I/O: keep them off the runtime threads.
            match tokio::task::spawn_blocking(move || me.reconcile(&st)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("applying the cluster configuration: {e:#}"),
                Err(e) => error!("applying the cluster configuration panicked: {e}"),
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Targets served here now.
    pub fn served_targets(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .served
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|(_, x)| x.forwarding_to.is_none())
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The volume replicas here, for status.
    pub fn volume_views(&self) -> Vec<cluster::status::VolumeView> {
        let roles = match self.roles.lock() {
            Ok(r) => r,
            Err(_) => return Vec::new(),
        };
        let mut v: Vec<_> = roles
            .iter()
            .map(|(name, role)| match role {
                Role::Primary { epoch, volume, .. } => {
                    let s = volume.stats();
                    cluster::status::VolumeView {
                        name: name.clone(),
                        role: "primary".into(),
                        epoch: *epoch,
                        serving: volume.serving(),
                        resync_regions_sent: s.resync_regions_sent,
                        writes_completed: s.writes_completed,
                        resync_pending_regions: s.resync_pending,
                        resyncs: s
                            .resyncs
                            .iter()
                            .map(|r| cluster::status::ResyncView {
                                node: r.peer,
                                done_regions: r.done_regions,
                                pending_regions: r.pending_regions,
                                rate_bytes_per_s: r.rate_bytes_per_s,
                                connected: r.connected,
                            })
                            .collect(),
                        error: volume.failure(),
                        lag: s
                            .lag
                            .iter()
                            .map(|l| cluster::status::LagView {
                                node: l.peer,
                                writes: l.writes,
                                bytes: l.bytes,
                            })
                            .collect(),
                        verify: volume.verify_report().map(|r| cluster::status::VerifyView {
                            id: r.id,
                            regions: r.regions,
                            compared: r.compared,
                            differing: r.differing.values().map(|d| d.len() as u64).sum(),
                            finished: r.finished,
                        }),
                    }
                }
                Role::Replica { volume, .. } => cluster::status::VolumeView {
                    name: name.clone(),
                    role: "replica".into(),
                    error: volume.failure(),
                    ..Default::default()
                },
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// This node's portal addresses.
    /// Replication and forwarding frames from authenticated nodes that the committed
    /// state refused.
    pub fn refused_replication_frames(&self) -> u64 {
        self.net.refused_frames()
    }

    pub fn portal_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.portals.iter().map(|p| p.addr).collect()
    }

    /// The target devices that execute commands here (the primary's), by IQN.
    pub fn executing_devices(&self) -> HashMap<String, Arc<scsi::TargetDevice>> {
        self.executed_here
            .read()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.volumes_dir.join(format!("{name}.img"))
    }

    fn open_volume(&self, v: &Volume) -> Result<Arc<blockstore::FileStore>> {
        let store = blockstore::FileStore::open(
            &self.volume_path(&v.name),
            &blockstore::OpenOptions {
                create_size_bytes: Some(v.size_bytes),
                block_size: v.block_size,
                direct: false,
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

    /// The volumes that move with `v` (its target's), with their epochs.
    fn group_of(st: &ClusterState, v: &Volume) -> Vec<(String, u64)> {
        match st.mapping_of(&v.name) {
            Some((t, _)) => t
                .luns
                .values()
                .filter_map(|n| st.volumes.get(n).map(|x| (x.name.clone(), x.epoch)))
                .collect(),
            None => vec![(v.name.clone(), v.epoch)],
        }
    }

    fn reconcile(&self, st: &ClusterState) -> Result<()> {
        std::fs::create_dir_all(&self.volumes_dir)
            .map_err(io_error(format!("creating {}", self.volumes_dir.display())))?;
        for n in st.nodes.values().filter(|n| n.role == NodeRole::Storage) {
            self.net.set_peer(n.id, n.addresses.replication);
        }
        let start_epochs = {
            let mut s = self
                .start_epochs
                .lock()
                .map_err(|_| ServingError::Poisoned("start epochs"))?;
            s.get_or_insert_with(|| {
                st.volumes
                    .values()
                    .filter(|v| v.primary == self.me)
                    .map(|v| (v.name.clone(), v.epoch))
                    .collect()
            })
            .clone()
        };
        let mut served = self
            .served
            .lock()
            .map_err(|_| ServingError::Poisoned("served targets"))?;
        let mut roles = self
            .roles
            .lock()
            .map_err(|_| ServingError::Poisoned("roles"))?;

        // 1. Targets that are no longer served here go first: their sessions end
        //    before the volumes under them stop. Targets whose primary moved away
        //    forward from now on (their ports become active/non-optimized), and their
        //    initiators are asked to log in again, as a single-path initiator then
        //    finds the new primary through a virtual IP.
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

        // 2. Volume roles.
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
                        ..
                    }) if *epoch == v.epoch => {
                        let isr: BTreeSet<NodeId> = v
                            .in_sync
                            .iter()
                            .copied()
                            .filter(|n| *n != self.me)
                            .collect();
                        volume.isr_committed(v.epoch, isr);
                        volume.set_resync_rate(st.settings.resync_rate_bytes_per_s);
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
                let old = roles.remove(&v.name);
                self.stop_role(&v.name, old);
                match self.start_primary(v, st.settings.resync_rate_bytes_per_s) {
                    Ok(role) => {
                        roles.insert(v.name.clone(), role);
                    }
                    Err(e) => error!(volume = %v.name, "cannot start the primary: {e:#}"),
                }
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

        // Planned moves: drain, release the lease, hand over.
        for v in st.volumes.values() {
            if v.primary == self.me && v.moving_to.is_some() {
                self.start_handover(st, v, &mut roles);
            }
        }

        // 3. Data of volumes this node no longer holds.
        if let Ok(dir) = std::fs::read_dir(&self.volumes_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let Some(vol) = name.strip_suffix(".img") else {
                    continue;
                };
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

        // 4. Targets served here: executed where they are primary, once every
        //    volume's primary runs at its epoch; forwarded from the other nodes that
        //    hold their volumes.
        for t in st.targets.values() {
            let nodes = target_nodes(st, t);
            if !nodes.contains(&self.me) {
                continue;
            }
            let Some(primary) = st.target_primary(t) else {
                continue;
            };
            let here = primary == self.me;
            let ready = t.luns.values().all(|n| {
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
                self.execute_target_here(st, t, s, &roles)?;
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

        if let Ok(mut devices) = self.executed_here.write() {
            *devices = served
                .iter()
                .filter(|(_, x)| x.forwarding_to.is_none() && !x.luns.is_empty())
                .map(|(iqn, x)| (iqn.clone(), x.device.clone()))
                .collect();
        }

        // 5. The virtual IPs of the targets served here, and only those.
        drop(roles);
        drop(served);
        self.reconcile_vips(st);
        Ok(())
    }

    /// SET TARGET PORT GROUPS received for `t` (explicit ALUA, SPC-4 §6.36): asking for
    /// another node's group to become active/optimized is a planned move of the
    /// target's volumes there. Other requests are logged and left: the states follow
    /// from which node is primary and which are in sync.
    fn act_on_alua_requests(
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
                (to, req.state, t.luns.values().next())
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

    /// From now on `t`'s commands arriving here go to `primary`. Sessions that were
    /// served here as primary are asked to log in again.
    fn forward_target(&self, t: &Target, s: &mut Served, primary: NodeId) {
        let luns: BTreeMap<u64, u32> = t
            .luns
            .iter()
            .filter_map(|(lun, vol)| {
                self.node
                    .state()
                    .borrow()
                    .volumes
                    .get(vol)
                    .map(|v| (*lun, v.block_size))
            })
            .collect();
        let was_primary = s.forwarding_to.is_none() && !s.luns.is_empty();
        if let Ok(mut devices) = self.executed_here.write() {
            devices.remove(&t.iqn);
        }
        s.device.forward_to(
            Arc::new(crate::forward::NetForwarder {
                net: self.net.clone(),
                primary,
                target: t.iqn.clone(),
            }),
            luns,
        );
        s.luns.clear();
        s.forwarding_to = Some(primary);
        if was_primary {
            self.server.ask_to_log_out(&t.iqn, Duration::from_secs(2));
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
    fn execute_target_here(
        &self,
        st: &ClusterState,
        t: &Target,
        s: &mut Served,
        roles: &HashMap<String, Role>,
    ) -> Result<()> {
        let stale: Vec<u64> = s
            .luns
            .iter()
            .filter(|(lun, (vol, epoch))| {
                t.luns.get(lun) != Some(vol)
                    || st.volumes.get(vol).is_none_or(|v| v.epoch != *epoch)
            })
            .map(|(lun, _)| *lun)
            .collect();
        for lun in stale {
            let _ = s.device.remove_lun(lun);
            s.luns.remove(&lun);
        }
        for (lun, vol_name) in &t.luns {
            let (Some(v), Some(Role::Primary { volume, store, .. })) =
                (st.volumes.get(vol_name), roles.get(vol_name))
            else {
                continue;
            };
            if s.luns.contains_key(lun) {
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
                .add_shared_lun(
                    *lun,
                    lu_config(v, &self.volume_path(&v.name)),
                    device,
                    Some(reservations),
                )
                .map_err(|e| ServingError::Lun {
                    target: t.iqn.clone(),
                    lun: *lun,
                    reason: e.to_string(),
                })?;
            s.luns.insert(*lun, (vol_name.clone(), v.epoch));
        }
        Ok(())
    }

    /// Holds the virtual IPs of the targets served here whose volumes all claim
    /// service (a lease not lapsed, or a fresh promotion still getting its first), and
    /// no others: the address moves as soon as the new primary is named, and leaves a
    /// primary cut off from the cluster when its lease lapses.
    fn reconcile_vips(&self, st: &ClusterState) {
        let want: BTreeMap<std::net::IpAddr, cluster::state::VirtualIp> = {
            let (Ok(served), Ok(roles)) = (self.served.lock(), self.roles.lock()) else {
                return;
            };
            served
                .iter()
                .filter(|(_, s)| s.forwarding_to.is_none())
                .filter_map(|(iqn, _)| st.targets.get(iqn))
                .filter(|t| {
                    t.luns.values().all(|vol| {
                        matches!(roles.get(vol), Some(Role::Primary { volume, .. }) if volume.claims_service(cluster::node::LEASE))
                    })
                })
                .flat_map(|t| t.vips.clone())
                .collect()
        };
        self.vips
            .reconcile(&want, &self.server, &self.rt, &self.events);
    }

    /// Gives up every virtual IP held here (the node stops).
    pub fn release_vips(&self) {
        self.vips.release_all();
    }

    /// Hands the target of `v` (all its volumes) over to `v.moving_to`: refuse new
    /// writes, let those in flight finish, give the lease up for good, then commit the
    /// promotion. The next primary serves as soon as it has sealed: no lease to wait
    /// out, since this one released its own.
    fn start_handover(&self, st: &ClusterState, v: &Volume, roles: &mut HashMap<String, Role>) {
        let Some(to) = v.moving_to else { return };
        let group = Self::group_of(st, v);
        let key = (group[0].0.clone(), group[0].1);
        let fresh = self
            .handovers
            .lock()
            .map(|mut h| h.insert(key))
            .unwrap_or(false);
        if !fresh {
            return;
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
                    return;
                }
            }
        }
        let node = self.node.clone();
        let events = self.events.clone();
        let names: Vec<String> = group.iter().map(|(n, _)| n.clone()).collect();
        let to_name = st
            .nodes
            .get(&to)
            .map(|n| n.name.clone())
            .unwrap_or_default();
        let from_name = self.node_name.clone();
        let io_stopped_unix_ms = cluster::status::unix_ms();
        let mut details = serde_json::Map::new();
        details.insert("volumes".into(), names.clone().into());
        details.insert("from".into(), from_name.clone().into());
        details.insert("to".into(), to_name.clone().into());
        details.insert("epoch".into(), (group[0].1 + 1).into());
        details.insert("planned".into(), true.into());
        self.events.push_with(
            EventKind::FailoverStarted,
            format!(
                "planned move of {} from {from_name} to {to_name}: draining",
                names.join(", ")
            ),
            details,
        );
        self.rt.spawn(async move {
            let started = Instant::now();
            let drained = tokio::task::spawn_blocking(move || {
                let ok = volumes.iter().all(|pv| pv.drain(Duration::from_secs(2)));
                for pv in &volumes {
                    pv.release();
                }
                ok
            })
            .await
            .unwrap_or(false);
            let cmd = Command::Promote {
                volumes: group,
                node: to,
                cause: Some(cluster::state::FailoverCause {
                    planned: true,
                    io_stopped_unix_ms,
                    reason: format!("planned move from {from_name}"),
                }),
            };
            match node.write(cmd).await {
                Ok(Ok(_)) => events.push(
                    EventKind::Handover,
                    format!(
                        "planned move of {} from {from_name} to {to_name}: drained{} and handed over in {} ms",
                        names.join(", "),
                        if drained { "" } else { " (some writes timed out)" },
                        started.elapsed().as_millis()
                    ),
                ),
                Ok(Err(r)) => events.push(
                    EventKind::Handover,
                    format!("planned move of {} refused: {r}; the leader promotes an in-sync replica when the lease lapses", names.join(", ")),
                ),
                Err(e) => warn!(error = %e, "planned move not committed; failover takes over"),
            }
        });
    }

    /// Tells the cluster that this node lost power (`Command::NodeLostPower`), until it
    /// is committed: it leaves the in-sync sets it may no longer deserve.
    fn report_lost_power(&self, why: String) {
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
    fn defer_to_failover(&self, v: &Volume, why: &str) {
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

    fn ask_repromotion(&self, st: &ClusterState, v: &Volume) {
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

    fn start_primary(&self, v: &Volume, resync_rate: u64) -> Result<Role> {
        let store = self.open_volume(v)?;
        let store_kept = store.clone();
        let state = ReplicaState::new(&self.volumes_dir, &v.name);
        let cfg = PrimaryConfig {
            me: self.me,
            epoch: v.epoch,
            region_size: REGION_SIZE,
            size_bytes: v.size_bytes,
            replicas: v
                .replicas
                .iter()
                .copied()
                .filter(|n| *n != self.me)
                .collect(),
            in_sync: v
                .in_sync
                .iter()
                .copied()
                .filter(|n| *n != self.me)
                .collect(),
            own_activity_log: state
                .activity_log()
                .map_err(io_error(format!("volume {}: reading its activity log", v.name)))?,
            dirty_hint: state.dirty_map().unwrap_or_else(|e| {
                warn!(volume = %v.name, error = %e, "ignoring the map of out-of-sync regions; out-of-sync replicas get a full sync");
                None
            }),
            replica_timeout_ms: 1000,
            resync_window: 16,
            resync_rate,
            activity_log_slack: replication::ACTIVITY_LOG_SLACK,
        };
        let control = Arc::new(IsrRequests {
            node: self.node.clone(),
            volume: v.name.clone(),
            epoch: v.epoch,
            rt: self.rt.clone(),
        });
        let volume = Arc::new(
            PrimaryVolume::start(cfg, store, state, self.net.transport(&v.name), control)
                .map_err(io_error(format!("volume {}: starting as primary", v.name)))?,
        );
        self.net.add_primary(&v.name, volume.clone());
        let lease = {
            let (node, pv, name, epoch) =
                (self.node.clone(), volume.clone(), v.name.clone(), v.epoch);
            self.rt.spawn(async move {
                loop {
                    if pv.failure().is_some() {
                        // A failed copy never serves again: let the lease lapse so the
                        // leader promotes an in-sync replica.
                        return;
                    }
                    let sent = Instant::now();
                    match node.renew_lease(&name, epoch).await {
                        Ok(()) => pv.lease(sent + cluster::node::LEASE - LEASE_MARGIN),
                        Err(e) => tracing::debug!(volume = %name, error = %e, "lease not renewed"),
                    }
                    tokio::time::sleep(RENEW_EVERY).await;
                }
            })
        };
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
        })
    }

    /// Once the new primary `volume` serves, tells the cluster how long I/O paused
    /// (`failover_finished`, and [`Command::FailoverFinished`] for the status).
    fn report_takeover(
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

    fn start_replica(&self, v: &Volume) -> Result<Role> {
        let store = self.open_volume(v)?;
        let state = ReplicaState::new(&self.volumes_dir, &v.name);
        let grow_store = store.clone();
        let grow = Box::new(move |n: u64| grow_store.grow(n).map_err(std::io::Error::other));
        let r = Arc::new(
            ReplicaVolume::start(
                REGION_SIZE,
                store.clone(),
                grow,
                state,
                self.net.transport(&v.name),
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

    fn stop_role(&self, name: &str, role: Option<Role>) {
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

/// SCSI identity of a volume's logical unit: derived from the volume name so that it
/// stays the same on every node and across restarts (multipath relies on it).
fn lu_config(v: &Volume, path: &Path) -> scsi::LuConfig {
    let h1 = crate::lu_identity::fnv1a(&[b"volume", v.name.as_bytes()]);
    let h2 = crate::lu_identity::fnv1a(&[&h1.to_be_bytes(), v.name.as_bytes()]);
    scsi::LuConfig {
        block_size: v.block_size,
        serial: format!("{h1:016x}"),
        naa: crate::lu_identity::naa_identifier(h1, h2),
        pr_file: Some(path.with_extension("pr")),
        ..Default::default()
    }
}

/// Test only: `BULWARK_TEST_VOLATILE_CACHE=1` holds the writes of replicated volumes in
/// memory until flushed, so the power-cut tests can take unflushed writes back (see
/// `blockstore::volatile`). Never set it for data anyone wants to keep.
fn test_volatile_cache() -> bool {
    std::env::var_os("BULWARK_TEST_VOLATILE_CACHE").is_some_and(|v| v == "1")
}

/// Whether this node may have lost power since the last run of `bulwark serve` on
/// `data_dir`, and why: the kernel's boot id changed (a reboot, a power cut), or the
/// test-only power cut of `blockstore::volatile` left its mark. The boot id is kept in
/// `<data_dir>/boot-id` for the next start.
fn lost_power_since_last_run(data_dir: &Path) -> Option<String> {
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
