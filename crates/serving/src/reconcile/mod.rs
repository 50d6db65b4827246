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

use cluster::state::{lun_backing, ClusterState, Command, NodeId, NodeRole, Target, Volume};
use cluster::status::EventKind;
use cluster::ClusterNode;
use iscsi_proto::login::ChapAccount;
use replication::net::ReplicationNet;
use replication::{ControlPlane, PrimaryConfig, PrimaryVolume, ReplicaState, ReplicaVolume};
use scsi::BlockDevice;
use tracing::{error, info, warn};

use crate::ServingError;

mod leases;
mod paths;
mod reservations;
mod roles;
mod snapshots;
mod targets;

use paths::{in_sync_for, port_groups_with, ClusterPaths};
pub use paths::{port_group_of, port_groups, target_nodes};
use reservations::ClusterReservations;
use roles::{lost_power_since_last_run, Role};

type Result<T> = std::result::Result<T, ServingError>;

/// Maps an I/O error to [`ServingError::Io`] saying what was being done.
fn io_error(what: String) -> impl FnOnce(std::io::Error) -> ServingError {
    move |source| ServingError::Io { what, source }
}

/// Resync and activity-log granularity.
pub const REGION_SIZE: u64 = 1 << 20;

/// How often a node renews the leases of its primaries (well inside
/// [`cluster::node::LEASE`]; one request for all of them). A fresh lease bridges most
/// of an election: when the Raft leader stops, its successor is elected about 0.85 s
/// after it was last heard, a primary's lease lasts 0.65 s from its last renewal, so
/// the primary pauses about 0.2 s plus the age of that renewal (a graceful stop of the
/// leader: 0.2-0.25 s with renewals every 100 ms, 0.23-0.4 s every 200 ms).
const RENEW_EVERY: Duration = Duration::from_millis(100);

/// How soon a primary tries again after a renewal failed (while a new Raft leader is
/// elected, its lease is running out).
const RENEW_RETRY: Duration = Duration::from_millis(25);

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
    /// LUN → epoch, for the snapshot LUNs this node could not export at that epoch
    /// (said once; tried again at the next).
    unexported: BTreeMap<u64, u64>,
    /// The primary this node forwards the target's commands to (its ports are
    /// active/non-optimized or worse); `None`: this node is the primary.
    forwarding_to: Option<NodeId>,
    /// The configuration last given to the iSCSI server.
    config: Target,
    chap: Vec<ChapAccount>,
    /// The portals (this node's, then the other nodes') last given to the server.
    portals: (Vec<iscsi_target::Portal>, Vec<iscsi_target::Portal>),
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
    /// Regions each volume's persisted activity log may keep beyond those in flight
    /// (`bulwark serve --activity-log-slack`, [`replication::ACTIVITY_LOG_SLACK`]).
    activity_log_slack: usize,
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
    /// Snapshots started here, by (snapshot, first volume of the group, epoch): each
    /// is taken once (an epoch's snapshots end with it).
    snapshots_started: Mutex<HashSet<(String, String, u64)>>,
    /// Rollbacks acted on here (sessions ended, or started as primary), by (snapshot,
    /// volume, epoch).
    rollbacks_seen: Mutex<HashSet<(String, String, u64)>>,
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
    /// Lease renewals of the primaries here.
    leases: Arc<leases::Leases>,
}

/// Takeovers by this node since it started.
#[derive(Debug, Default)]
pub struct FailoverCounts {
    /// After a planned move.
    pub planned: std::sync::atomic::AtomicU64,
    /// After the old primary's lease lapsed.
    pub unplanned: std::sync::atomic::AtomicU64,
}

impl Serving {
    /// Serving for `node` through `server` on `portals`; volume files live in
    /// `<data_dir>/volumes`; replication through `net`, each volume's activity log
    /// keeping up to `activity_log_slack` regions beyond those in flight.
    pub fn new(
        node: &ClusterNode,
        server: iscsi_target::Server,
        data_dir: &Path,
        portals: Vec<iscsi_target::Portal>,
        net: Arc<ReplicationNet>,
        activity_log_slack: usize,
    ) -> Arc<Serving> {
        let serving = Arc::new(Serving {
            me: node.id(),
            node_name: node.identity().name.clone(),
            node: node.clone(),
            volumes_dir: data_dir.join("volumes"),
            server,
            portals,
            net,
            activity_log_slack,
            rt: tokio::runtime::Handle::current(),
            served: Mutex::new(HashMap::new()),
            roles: Mutex::new(HashMap::new()),
            start_epochs: Mutex::new(None),
            repromotion_asked: Mutex::new(HashSet::new()),
            lost_power: lost_power_since_last_run(data_dir),
            handovers: Mutex::new(HashSet::new()),
            snapshots_started: Mutex::default(),
            rollbacks_seen: Mutex::default(),
            vips: crate::vip::Vips::new(),
            in_sync_seen: Mutex::new(HashMap::new()),
            executed_here: std::sync::RwLock::new(HashMap::new()),
            failovers: FailoverCounts::default(),
            leases: leases::Leases::new(node.clone()),

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
        let _space_watch = AbortOnDrop(tokio::spawn(self.clone().watch_space()));
        let _leases = AbortOnDrop(tokio::spawn(self.leases.clone().run()));
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

    /// This node's space runs low: every thin logical unit executed here (this node
    /// is its volume's primary) reports THIN PROVISIONING SOFT THRESHOLD REACHED to
    /// its initiators. Returns how many did.
    pub fn thin_threshold_reached(&self) -> usize {
        let Ok(served) = self.served.lock() else {
            return 0;
        };
        served
            .values()
            .filter(|s| s.forwarding_to.is_none())
            .flat_map(|s| s.luns.keys().map(|lun| (s.device.clone(), *lun)))
            .filter(|(device, lun)| device.thin_threshold_reached(*lun))
            .count()
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
                        allocated_bytes: crate::space::allocated_bytes(&self.volume_path(name)),
                        resyncs: s
                            .resyncs
                            .iter()
                            .map(|r| cluster::status::ResyncView {
                                node: r.peer.0,
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
                                node: l.peer.0,
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
                        snapshots: crate::snapshots::copies_here(&self.volumes_dir, name),
                    }
                }
                Role::Replica { volume, .. } => cluster::status::VolumeView {
                    name: name.clone(),
                    role: "replica".into(),
                    error: volume.failure(),
                    allocated_bytes: crate::space::allocated_bytes(&self.volume_path(name)),
                    snapshots: crate::snapshots::copies_here(&self.volumes_dir, name),
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

    /// Where the volumes' files are.
    pub(crate) fn volumes_dir(&self) -> &std::path::Path {
        &self.volumes_dir
    }

    /// This node's event log.
    pub(crate) fn events(&self) -> &cluster::status::EventLog {
        &self.events
    }

    /// This node's name.
    pub(crate) fn node_name(&self) -> &str {
        &self.node_name
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.volumes_dir.join(format!("{name}.img"))
    }

    /// The volumes that move with `v` (its target's), with their epochs.
    fn group_of(st: &ClusterState, v: &Volume) -> Vec<(String, u64)> {
        st.group_of(&v.name)
            .iter()
            .filter_map(|n| st.volumes.get(n).map(|x| (x.name.clone(), x.epoch)))
            .collect()
    }

    fn reconcile(&self, st: &ClusterState) -> Result<()> {
        std::fs::create_dir_all(&self.volumes_dir)
            .map_err(io_error(format!("creating {}", self.volumes_dir.display())))?;
        for n in st.nodes.values().filter(|n| n.role == NodeRole::Storage) {
            self.net
                .set_peer(replication::NodeId(n.id), n.addresses.replication);
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

        // 1. Targets no longer served here go first: their sessions end before the
        //    volumes under them stop.
        self.stop_targets_gone(st, &mut served);
        // 2. Volume roles, then planned moves.
        self.reconcile_roles(st, &start_epochs, &mut roles);
        // 3. Data of volumes this node no longer holds, and snapshots: those asked
        //    of volumes primary here are taken, those the state no longer names go.
        self.remove_data_not_held(st);
        self.take_snapshots(st, &roles);
        self.run_rollbacks(st, &roles);
        // 4. Targets served here: executed or forwarded, with their paths.
        self.reconcile_targets(st, &mut served, &roles)?;

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
}
