//! The cluster's replicated state: every object an administrator configures, and the
//! commands that change it.
//!
//! [`ClusterState::apply`] is the Raft state machine's whole business logic. It is pure
//! and deterministic — same commands in the same order, same state on every node — and it
//! is where every change is validated: a refused command is committed to the log like any
//! other but changes nothing, so two conflicting changes racing through different nodes
//! are decided in log order, never by whichever node checked first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A node's Raft id; assigned by the cluster when the node joins, never reused.
pub type NodeId = u64;

/// Smallest and largest logical unit number a LUN map accepts (flat space, SAM-5 §4.7.7).
pub const LUN_MAX: u64 = 16383;

/// Shortest CHAP secret accepted: RFC 7143 §12.1.3 asks for at least 96 bits.
pub const CHAP_SECRET_MIN: usize = 12;

/// What a node is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Holds volume replicas and serves targets.
    Storage,
    /// Votes in Raft and stores no volume data: the tie-breaker of a 2-node cluster.
    Witness,
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeRole::Storage => "storage",
            NodeRole::Witness => "witness",
        })
    }
}

/// Where a node can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddresses {
    /// Control plane (Raft, admin API) over TLS; heartbeats use the same port over UDP.
    pub control: SocketAddr,
    /// Replication traffic between storage nodes.
    pub replication: SocketAddr,
    /// Front-end iSCSI portals, one per network.
    pub portals: Vec<SocketAddr>,
}

impl NodeAddresses {
    /// The distinct IP addresses of this node: one heartbeat ring per entry, in this
    /// order (control first), like Corosync's redundant rings.
    pub fn networks(&self) -> Vec<std::net::IpAddr> {
        let mut out = vec![self.control.ip()];
        for ip in self
            .portals
            .iter()
            .map(|p| p.ip())
            .chain([self.replication.ip()])
        {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        out
    }
}

/// A member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Raft id.
    pub id: NodeId,
    /// Unique name, chosen by the administrator.
    pub name: String,
    /// Storage or witness.
    pub role: NodeRole,
    /// Addresses.
    pub addresses: NodeAddresses,
    /// Bytes of volume data this node may hold (its data folder's file system, or a
    /// configured limit).
    pub capacity_bytes: u64,
    /// The public key its certificate must carry (hex of the P-256 point it sent at
    /// join): peers accept that node's links only with it. `None` only for nodes
    /// that joined before nodes had their own keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Drained for maintenance (`bulwark node drain`): it hands its primaries over by
    /// planned moves, gets no new primary and no new replica, and being offline does
    /// not make the cluster replace its replicas.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
    /// Drained with `--evacuate`: its replicas are also rebuilt on other nodes, then
    /// removed from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evacuate: bool,
    /// Failure domain (rack, room): replicas of a volume go to different zones where
    /// the nodes allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Whether its data folder's file system shares blocks between files (reflinks),
    /// as snapshots, clones and rollbacks need; checked by the node when it starts.
    /// `None`: not known (a witness, or a node of an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares_blocks: Option<bool>,
}

impl Node {
    /// Whether new primaries and replicas may be placed here.
    pub fn schedulable(&self) -> bool {
        self.role == NodeRole::Storage && !self.drained
    }
}

/// A replicated block volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Unique name.
    pub name: String,
    /// Size in bytes, a multiple of `block_size`.
    pub size_bytes: u64,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Physical block size reported to initiators (READ CAPACITY (16)'s LOGICAL BLOCKS
    /// PER PHYSICAL BLOCK EXPONENT, the unmap granularity): a power of two from
    /// `block_size` to 32768. None: 4096, so initiators align to the page size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_block_size: Option<u32>,
    /// Storage nodes holding a replica, primary first.
    pub replicas: Vec<NodeId>,
    /// The node that serves the volume now.
    pub primary: NodeId,
    /// Primary term: raised every time the primary changes.
    pub epoch: u64,
    /// Replicas known to hold every acknowledged write (the primary included). Only
    /// they may be promoted; the primary changes it only through the log.
    #[serde(default)]
    pub in_sync: Vec<NodeId>,
    /// A planned move in progress: the primary drains, releases its lease and hands
    /// the volume over to this node.
    #[serde(default)]
    pub moving_to: Option<NodeId>,
    /// The last online verify asked for (`bulwark volume verify`), and its result once
    /// the primary has run it.
    #[serde(default)]
    pub verify: Option<VolumeVerify>,
    /// Persistent reservation state of the volume's logical unit (registrations, the
    /// reservation, the generation; the `scsi` crate's text form), as the primary
    /// last committed it: every path sees it and a new primary starts from it.
    #[serde(default)]
    pub reservations: Option<String>,
    /// The last change of primary, planned or not.
    #[serde(default)]
    pub last_failover: Option<FailoverRecord>,
    /// Why the primary is the primary, as the node that promoted it said (shown by
    /// `bulwark status`; see the cold-start rule in docs/design-notes.md).
    #[serde(default)]
    pub primary_reason: String,
    /// Replicas back from a power loss that have not been in sync since: they may lack
    /// writes they acknowledged, so they are promoted only when no other in-sync
    /// member is online.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_power: Vec<NodeId>,
    /// Replicas added since creation that have not been in sync yet: each receives a
    /// full copy while the volume serves, and joins the in-sync set when caught up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joining: Vec<Joining>,
    /// How many replicas the volume should have (0 in states from before it was kept:
    /// as many as it has). Re-replication restores this count.
    #[serde(default)]
    pub wanted_replicas: u8,
    /// Its snapshots, by name (issue 21).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshots: BTreeMap<String, Snapshot>,
    /// The snapshot it was made from, for a clone (`volume create --from-snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// A rollback to one of its snapshots, asked for and not done yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<PendingRollback>,
}

/// A replica being rebuilt (see [`Volume::joining`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joining {
    /// The new replica.
    pub node: NodeId,
    /// The replica it replaces: removed from the volume once the new one is in sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<NodeId>,
}

impl Volume {
    /// A new volume on `placement` (primary first), in sync there from birth: every
    /// copy starts the same (zeroes, or the same snapshot).
    pub(crate) fn placed(
        name: &str,
        size_bytes: u64,
        block_size: u32,
        physical_block_size: Option<u32>,
        placement: &[NodeId],
        primary_reason: String,
    ) -> Volume {
        Volume {
            name: name.to_string(),
            size_bytes,
            block_size,
            physical_block_size,
            primary: placement[0],
            replicas: placement.to_vec(),
            in_sync: placement.to_vec(),
            moving_to: None,
            epoch: 1,
            verify: None,
            reservations: None,
            last_failover: None,
            primary_reason,
            lost_power: Vec::new(),
            joining: Vec::new(),
            wanted_replicas: placement.len() as u8,
            snapshots: BTreeMap::new(),
            origin: None,
            rollback: None,
        }
    }

    /// The replica count the volume should have.
    pub fn wanted(&self) -> usize {
        if self.wanted_replicas == 0 {
            self.replicas.len()
        } else {
            usize::from(self.wanted_replicas)
        }
    }

    /// Replicas that stay once the replacements under way are done.
    pub fn lasting_replicas(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas
            .iter()
            .copied()
            .filter(|n| !self.joining.iter().any(|j| j.replaces == Some(*n)))
    }
}

/// Why a primary changes, as the node that commits [`Command::Promote`] knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverCause {
    /// A planned move (the old primary drained and handed over), or a failover after
    /// the old primary's lease lapsed.
    pub planned: bool,
    /// When I/O stopped: the drain's start, or when the old primary was last heard
    /// from (ms since the Unix epoch, by the committing node's clock).
    pub io_stopped_unix_ms: u64,
    /// Why this node, in words for the administrator.
    #[serde(default)]
    pub reason: String,
}

/// A change of primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// Planned move or failover.
    pub planned: bool,
    /// The old primary.
    pub from: NodeId,
    /// The new one.
    pub to: NodeId,
    /// The epoch it serves at.
    pub epoch: u64,
    /// When I/O stopped (see [`FailoverCause`]).
    pub io_stopped_unix_ms: u64,
    /// How long I/O paused: from `io_stopped_unix_ms` until the new primary served,
    /// once it has said so.
    pub pause_ms: Option<u64>,
}

/// An online verify of a volume: every region's checksum on the primary against each
/// in-sync replica's. The primary runs it (a new primary after a failover runs it
/// again) and commits the result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeVerify {
    /// Raised at every request.
    pub id: u64,
    /// Differing regions are resynced from the primary.
    pub repair: bool,
    /// `None` while it runs.
    pub result: Option<VerifyResult>,
}

/// What an online verify found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyResult {
    /// The primary that ran it.
    pub primary: NodeId,
    /// Its epoch.
    pub epoch: u64,
    /// Regions (1 MiB) in the volume.
    pub regions: u64,
    /// Regions compared.
    pub compared: u64,
    /// Each replica that differed or could not be compared everywhere. (A list, not a
    /// map: commands are an internally tagged enum, whose maps must have string keys.)
    pub replicas: Vec<ReplicaVerify>,
    /// When it finished, milliseconds since the Unix epoch.
    pub finished_unix_ms: u64,
}

impl VerifyResult {
    /// "identical on n2, n3 (1024 regions)", "3 regions DIFFER on n3 (repaired): 4, 9, 10".
    pub fn summary(&self, st: &ClusterState, repair: bool) -> String {
        let mut parts = Vec::new();
        for x in self.replicas.iter().filter(|x| x.differing > 0) {
            let sample: Vec<String> = x.sample.iter().map(|r| r.to_string()).collect();
            parts.push(format!(
                "{} region(s) DIFFER on {}{} (regions {}{})",
                x.differing,
                st.node_name(x.node),
                if repair {
                    ", repaired from the primary"
                } else {
                    ""
                },
                sample.join(", "),
                if x.differing as usize > sample.len() {
                    ", ..."
                } else {
                    ""
                }
            ));
        }
        for x in self.replicas.iter().filter(|x| x.not_compared > 0) {
            parts.push(format!(
                "{} region(s) not compared on {} (it was down or out of sync)",
                x.not_compared,
                st.node_name(x.node)
            ));
        }
        if !self.differs() {
            parts.insert(
                0,
                format!(
                    "{} of {} regions identical on the primary {} and the in-sync replicas",
                    self.compared,
                    self.regions,
                    st.node_name(self.primary),
                ),
            );
        }
        parts.join("; ")
    }

    /// Whether some replica differs from the primary.
    pub fn differs(&self) -> bool {
        self.replicas.iter().any(|r| r.differing > 0)
    }
}

/// What a verify found on one replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaVerify {
    /// The replica.
    pub node: NodeId,
    /// Regions that differ from the primary.
    pub differing: u64,
    /// The first of them (at most [`VERIFY_SAMPLE`]).
    pub sample: Vec<u64>,
    /// Regions it could not be compared for (it was down or out of sync).
    pub not_compared: u64,
}

/// Differing regions listed per replica in a [`VerifyResult`].
pub const VERIFY_SAMPLE: usize = 16;

/// An iSCSI target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// iSCSI qualified name.
    pub iqn: String,
    /// TargetAlias.
    pub alias: Option<String>,
    /// LUN → volume name, or `VOLUME@SNAPSHOT` for a snapshot exported read-only
    /// ([`lun_backing`]).
    pub luns: BTreeMap<u64, String>,
    /// Initiator names allowed to log in. Empty admits an initiator only through a
    /// CHAP binding or `allow_any_initiator`.
    pub acl: BTreeSet<String>,
    /// Names of the CHAP accounts bound to the target; empty means no authentication.
    pub chap: BTreeSet<String>,
    /// Virtual IPs that follow the target's primary (IPaddr2's job), for initiators
    /// without multipath.
    #[serde(default)]
    pub vips: BTreeMap<std::net::IpAddr, VirtualIp>,
    /// Ports of in-sync nodes other than the primary are standby (management commands
    /// only) rather than active/non-optimized (I/O forwarded to the primary).
    #[serde(default)]
    pub standby_paths: bool,
    /// Admit any initiator when no ACL entry and no CHAP binding says who (`bulwark
    /// target allow-any`). Off by default: a new target admits nobody until told.
    #[serde(default)]
    pub allow_any_initiator: bool,
    /// Initiators may reset the whole target (TARGET WARM/COLD RESET ends every session
    /// of it, on every node). Off by default, as in LIO.
    #[serde(default)]
    pub allow_target_reset: bool,
}

/// What a LUN's name stands for: a volume, and the snapshot of it when the LUN exports
/// one read-only (`VOLUME@SNAPSHOT`, issue 21). Volume and snapshot names hold no '@'
/// ([`check_name`]), so the split is unambiguous.
pub fn lun_backing(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((volume, snapshot)) => (volume, Some(snapshot)),
        None => (name, None),
    }
}

impl Target {
    /// The volumes whose data the target exports, each once, in LUN order: a snapshot's
    /// LUN stands for its volume. They are the target's group: they share a primary,
    /// move together and fail over together.
    pub fn volumes(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::with_capacity(self.luns.len());
        for name in self.luns.values() {
            let (volume, _) = lun_backing(name);
            if !v.iter().any(|x| x == volume) {
                v.push(volume.to_string());
            }
        }
        v
    }

    /// The initiators the target admits: `None` for any (CHAP bound, or allowed
    /// explicitly), else the ACL (empty: nobody).
    pub fn admitted_initiators(&self) -> Option<Vec<String>> {
        if self.acl.is_empty() && (self.allow_any_initiator || !self.chap.is_empty()) {
            None
        } else {
            Some(self.acl.iter().cloned().collect())
        }
    }
}

/// An address the node serving a target adds to one of its interfaces, with an iSCSI
/// portal on it; the next primary takes it over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualIp {
    /// The address.
    pub address: std::net::IpAddr,
    /// Prefix length of its subnet on the interface.
    pub prefix: u8,
    /// The interface it goes on, on whichever node serves the target (same name on
    /// every storage node).
    pub interface: String,
}

/// A CHAP account, defined once and bound to any number of targets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapAccount {
    /// The name the initiator logs in with (CHAP_N).
    pub user: String,
    /// The initiator's secret.
    pub secret: String,
    /// For mutual CHAP: the name and secret the target answers with.
    pub mutual: Option<(String, String)>,
}

/// Cluster-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Interval between heartbeats on each network.
    pub heartbeat_interval_ms: u64,
    /// A node unheard of for this long on every network is offline.
    pub failure_timeout_ms: u64,
    /// Resync bandwidth per replica in bytes per second (0: unlimited). Application I/O
    /// goes first whatever the rate.
    #[serde(default = "default_resync_rate")]
    pub resync_rate_bytes_per_s: u64,
    /// A program the Raft leader runs to fence a primary that stopped renewing its lease
    /// (power it off, cut its network: a STONITH agent) before it promotes another
    /// node. Exit status 0 means fenced; anything else, or running past
    /// `fence_timeout_ms`, holds the promotion back, and it is tried again. It gets the
    /// node and volumes in its environment (BULWARK_FENCE_NODE, BULWARK_FENCE_NODE_ID,
    /// BULWARK_FENCE_ADDRESS, BULWARK_FENCE_VOLUMES, BULWARK_FENCE_EPOCH) and must exist
    /// at that path on every node, since any may lead. `None`: the lease alone decides.
    #[serde(default)]
    pub fence_command: Option<String>,
    /// How long the fence program may run.
    #[serde(default = "default_fence_timeout")]
    pub fence_timeout_ms: u64,
    /// Rebuild bandwidth per new replica in bytes per second (0: unlimited). Application
    /// I/O goes first whatever the rate.
    #[serde(default)]
    pub rebuild_rate_bytes_per_s: u64,
    /// A storage node offline this long (and not drained) has its replicas rebuilt on
    /// other nodes; 0: never (`bulwark node remove --dead` or `volume replicas` only).
    #[serde(default = "default_replace_after")]
    pub replace_after_ms: u64,
}

/// Ten minutes, as Ceph marks a down OSD out: long enough for a reboot or a short
/// outage (the node then resyncs only what changed), short enough that a dead disk does
/// not leave volumes with one copy for a night.
pub const DEFAULT_REPLACE_AFTER_MS: u64 = 10 * 60 * 1000;

fn default_replace_after() -> u64 {
    DEFAULT_REPLACE_AFTER_MS
}

fn default_fence_timeout() -> u64 {
    30_000
}

/// 100 MiB/s: a returning replica catches up on a 1 GiB outage in about ten seconds
/// without taking a 10 Gb/s link from the initiators.
pub const DEFAULT_RESYNC_RATE: u64 = 100 << 20;

fn default_resync_rate() -> u64 {
    DEFAULT_RESYNC_RATE
}

/// The shortest replace-after accepted: a node is not replaced for an outage a
/// failover rides through.
pub const MIN_REPLACE_AFTER_MS: u64 = 10_000;

/// The slowest resync rate accepted (other than 0, unlimited).
pub const MIN_RESYNC_RATE: u64 = 1 << 20;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_interval_ms: 150,
            failure_timeout_ms: 800,
            resync_rate_bytes_per_s: DEFAULT_RESYNC_RATE,
            fence_command: None,
            fence_timeout_ms: default_fence_timeout(),
            rebuild_rate_bytes_per_s: 0,
            replace_after_ms: DEFAULT_REPLACE_AFTER_MS,
        }
    }
}

/// Everything the cluster agrees on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Members by id.
    pub nodes: BTreeMap<NodeId, Node>,
    /// Next id to hand out at join.
    pub next_node_id: NodeId,
    /// Volumes by name.
    pub volumes: BTreeMap<String, Volume>,
    /// Targets by IQN.
    pub targets: BTreeMap<String, Target>,
    /// CHAP accounts by user name.
    pub chap: BTreeMap<String, ChapAccount>,
    /// Settings.
    pub settings: Settings,
    /// Alerts by name.
    #[serde(default)]
    pub alerts: BTreeMap<String, Alert>,
    /// API tokens by id ([`crate::auth`]).
    #[serde(default)]
    pub tokens: BTreeMap<String, crate::auth::ApiToken>,
}

/// Where the cluster sends its events (the job of Pacemaker's alert agents): a
/// program that reads the event as JSON on stdin, or an HTTP(S) URL that gets it
/// POSTed. Each event reaches each alert from one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Unique name.
    pub name: String,
    /// Absolute path of a program (no arguments), present on every node.
    pub program: Option<String>,
    /// http:// or https:// URL.
    pub url: Option<String>,
    /// Event kinds to send ([`crate::status::EventKind`] names, kept as strings so a
    /// state written by a newer version still reads); empty: all of them.
    pub events: Vec<String>,
    /// Raised by [`Command::TestAlert`]: the leader then sends this alert a test event.
    #[serde(default)]
    pub tests: u64,
    /// How long one delivery may take before it is killed / abandoned.
    pub timeout_ms: u64,
    /// Further attempts after a failed one.
    pub retries: u32,
}

impl Alert {
    /// Why the alert cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "alert name {:?}: use 1 to 64 letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        match (&self.program, &self.url) {
            (Some(p), None) => {
                if !p.starts_with('/') || p.contains(char::is_whitespace) {
                    return Err(format!(
                        "program {p:?} must be an absolute path without arguments (the event comes on stdin)"
                    ));
                }
            }
            (None, Some(u)) => {
                let rest = u
                    .strip_prefix("https://")
                    .or_else(|| u.strip_prefix("http://"));
                if rest.is_none_or(|r| r.is_empty() || r.starts_with('/'))
                    || u.contains(char::is_whitespace)
                {
                    return Err(format!(
                        "URL {u:?} must be http://HOST[:PORT]/PATH or https://..."
                    ));
                }
            }
            _ => return Err("give either a program or a URL (one of them)".into()),
        }
        for kind in &self.events {
            kind.parse::<crate::status::EventKind>()?;
        }
        if !(100..=600_000).contains(&self.timeout_ms) {
            return Err("the timeout must be 0.1 to 600 s".into());
        }
        if self.retries > 10 {
            return Err("at most 10 retries".into());
        }
        Ok(())
    }

    /// Whether events of `kind` go to this alert.
    pub fn wants(&self, kind: crate::status::EventKind) -> bool {
        kind.subscribable()
            && (self.events.is_empty() || self.events.iter().any(|e| e == kind.as_str()))
    }
}

/// Refuses a report made at primary epoch `epoch` once `v` is at another.
fn check_epoch(v: &Volume, epoch: u64) -> Result<(), Refused> {
    if v.epoch == epoch {
        Ok(())
    } else {
        Err(Refused::StaleEpoch {
            volume: v.name.clone(),
            epoch,
            current: v.epoch,
        })
    }
}

/// A size for people: `512 B`, `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Checks an object name (node, volume, CHAP user): 1–64 characters of letters, digits,
/// `.`, `-`, `_`, starting with a letter or digit.
pub fn check_name(kind: &str, name: &str) -> Result<(), Refused> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Refused::BadName(format!(
            "{kind} name {name:?} is not valid: use 1 to 64 letters, digits, '.', '-' or '_', starting with a letter or digit"
        )))
    }
}

/// Checks an iSCSI name (RFC 7143 §4.2.7): the `iqn.`, `eui.` and `naa.` formats.
pub fn check_iscsi_name(name: &str) -> Result<(), Refused> {
    let bad = || Refused::BadIqn(name.to_string());
    if name.len() > 223 || name.chars().any(|c| c.is_ascii_uppercase() || c == ' ') {
        return Err(bad());
    }
    let hex = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
    };
    if let Some(rest) = name.strip_prefix("iqn.") {
        // iqn.YYYY-MM.reversed-domain[:anything]
        let b = rest.as_bytes();
        let date_ok = b.len() > 8
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[5..7].iter().all(u8::is_ascii_digit)
            && b[7] == b'.';
        let domain = rest.get(8..).unwrap_or("").split(':').next().unwrap_or("");
        if date_ok && !domain.is_empty() && !domain.starts_with('.') {
            return Ok(());
        }
        return Err(bad());
    }
    if let Some(rest) = name.strip_prefix("eui.") {
        return if hex(rest, &[16]) { Ok(()) } else { Err(bad()) };
    }
    if let Some(rest) = name.strip_prefix("naa.") {
        return if hex(rest, &[16, 32]) {
            Ok(())
        } else {
            Err(bad())
        };
    }
    Err(bad())
}

impl ClusterState {
    /// A fresh cluster's state.
    pub fn new() -> Self {
        ClusterState {
            next_node_id: 1,
            ..Default::default()
        }
    }

    /// The node with this name.
    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.values().find(|n| n.name == name)
    }

    /// Bytes of volume data placed on `node`.
    pub fn allocated_bytes(&self, node: NodeId) -> u64 {
        self.volumes
            .values()
            .filter(|v| v.replicas.contains(&node))
            .map(|v| v.size_bytes)
            .sum()
    }

    /// Bytes still free for new volumes on `node`.
    pub fn free_bytes(&self, node: NodeId) -> u64 {
        self.nodes
            .get(&node)
            .map(|n| n.capacity_bytes.saturating_sub(self.allocated_bytes(node)))
            .unwrap_or(0)
    }

    /// The target that maps `volume`, with the LUN.
    pub fn mapping_of(&self, volume: &str) -> Option<(&Target, u64)> {
        self.targets.values().find_map(|t| {
            t.luns
                .iter()
                .find(|(_, v)| lun_backing(v).0 == volume)
                .map(|(l, _)| (t, *l))
        })
    }

    /// The node serving a target: the primary of its volumes (all the same, see
    /// [`Refused::PrimaryMismatch`]); `None` for a target without LUNs.
    pub fn target_primary(&self, target: &Target) -> Option<NodeId> {
        target
            .luns
            .values()
            .find_map(|v| self.volumes.get(lun_backing(v).0).map(|v| v.primary))
    }

    /// Volume `volume`, if its primary epoch is still `epoch`: what a primary commits
    /// at its epoch is refused once a newer primary took over.
    fn volume_at(&self, volume: &str, epoch: u64) -> Result<&Volume, Refused> {
        let v = self
            .volumes
            .get(volume)
            .ok_or_else(|| Refused::NoSuchVolume(volume.to_string()))?;
        check_epoch(v, epoch)?;
        Ok(v)
    }

    /// [`Self::volume_at`], to change it.
    fn volume_at_mut(&mut self, volume: &str, epoch: u64) -> Result<&mut Volume, Refused> {
        let v = self
            .volumes
            .get_mut(volume)
            .ok_or_else(|| Refused::NoSuchVolume(volume.to_string()))?;
        check_epoch(v, epoch)?;
        Ok(v)
    }

    /// The name of node `id`, or `#id` for one that is not (or no longer) a member.
    pub fn node_name(&self, id: NodeId) -> String {
        self.nodes
            .get(&id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| format!("#{id}"))
    }

    fn target_mut(&mut self, iqn: &str) -> Result<&mut Target, Refused> {
        self.targets
            .get_mut(iqn)
            .ok_or_else(|| Refused::NoSuchTarget(iqn.to_string()))
    }

    fn check_addresses(&self, me: Option<NodeId>, a: &NodeAddresses) -> Result<(), Refused> {
        for n in self.nodes.values().filter(|n| Some(n.id) != me) {
            if n.addresses.control == a.control {
                return Err(Refused::AddressInUse {
                    addr: a.control,
                    node: n.name.clone(),
                });
            }
            if let Some(p) = a.portals.iter().find(|p| n.addresses.portals.contains(p)) {
                return Err(Refused::AddressInUse {
                    addr: *p,
                    node: n.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Applies one command: the state machine. Deterministic; a refused command leaves
    /// the state unchanged.
    ///
    /// Routes each command to the method of its family. This match is exhaustive, so a
    /// new variant must be routed here; each family method matches only the variants
    /// routed to it, and its `unreachable!` arm holds by this routing.
    pub fn apply(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::AddNode { .. }
            | Command::NodeStarted { .. }
            | Command::NodeLostPower { .. }
            | Command::RemoveNode { .. } => self.apply_node(cmd),
            Command::DrainNode { .. }
            | Command::SetNodeZone { .. }
            | Command::ChangeReplicas { .. } => self.apply_replicas(cmd),
            Command::CreateVolume { .. }
            | Command::ResizeVolume { .. }
            | Command::DeleteVolume { .. } => self.apply_volume(cmd),
            Command::CreateTarget { .. }
            | Command::DeleteTarget { .. }
            | Command::SetTargetPaths { .. }
            | Command::SetTargetAccess { .. } => self.apply_target(cmd),
            Command::AddLun { .. } | Command::RemoveLun { .. } => self.apply_lun(cmd),
            Command::AddAcl { .. } | Command::RemoveAcl { .. } => self.apply_acl(cmd),
            Command::AddVip { .. } | Command::RemoveVip { .. } => self.apply_vip(cmd),
            Command::AddChap { .. }
            | Command::RemoveChap { .. }
            | Command::BindChap { .. }
            | Command::UnbindChap { .. } => self.apply_chap(cmd),
            Command::IsrChange { .. } | Command::SetReservations { .. } => {
                self.apply_primary_report(cmd)
            }
            Command::Promote { .. }
            | Command::FailoverFinished { .. }
            | Command::MoveVolume { .. } => self.apply_failover(cmd),
            Command::StartVerify { .. } | Command::FinishVerify { .. } => self.apply_verify(cmd),
            Command::CreateSnapshot { .. }
            | Command::SnapshotTaken { .. }
            | Command::CloneSnapshot { .. }
            | Command::RollbackSnapshot { .. }
            | Command::RollbackDone { .. }
            | Command::DeleteSnapshot { .. } => self.apply_snapshot(cmd),
            Command::CreateToken { .. }
            | Command::RevokeToken { .. }
            | Command::UseToken { .. } => self.apply_token(cmd),
            Command::SetAlert { .. } | Command::RemoveAlert { .. } | Command::TestAlert { .. } => {
                self.apply_alert(cmd)
            }
            Command::SetSettings { settings } => self.apply_settings(settings),
        }
    }

    /// Membership and the state of nodes: [`Command::AddNode`], [`Command::NodeStarted`],
    /// [`Command::NodeLostPower`] and [`Command::RemoveNode`].
    fn apply_node(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::AddNode {
                name,
                addresses,
                capacity_bytes,
                public_key,
            } => {
                check_name("node", name)?;
                if self.node_by_name(name).is_some() {
                    return Err(Refused::NodeExists(name.clone()));
                }
                self.check_addresses(None, addresses)?;
                let id = self.next_node_id.max(1);
                self.next_node_id = id + 1;
                self.nodes.insert(
                    id,
                    Node {
                        id,
                        name: name.clone(),
                        role: NodeRole::Storage,
                        addresses: addresses.clone(),
                        capacity_bytes: *capacity_bytes,
                        public_key: public_key.clone(),
                        drained: false,
                        evacuate: false,
                        zone: None,
                        shares_blocks: None,
                    },
                );
                Ok(Applied::NodeAdded(id))
            }
            Command::NodeStarted {
                id,
                role,
                addresses,
                capacity_bytes,
                shares_blocks,
            } => {
                let name = self
                    .nodes
                    .get(id)
                    .ok_or(Refused::NoSuchNodeId(*id))?
                    .name
                    .clone();
                self.check_addresses(Some(*id), addresses)?;
                if *role == NodeRole::Witness {
                    let volumes = self.volumes_on(*id);
                    if !volumes.is_empty() {
                        return Err(Refused::WitnessWithVolumes {
                            node: name,
                            volumes,
                        });
                    }
                }
                let node = self.nodes.get_mut(id).ok_or(Refused::NoSuchNodeId(*id))?;
                node.role = *role;
                node.addresses = addresses.clone();
                node.capacity_bytes = *capacity_bytes;
                node.shares_blocks = *shares_blocks;
                Ok(Applied::Done)
            }
            Command::NodeLostPower { id } => {
                if !self.nodes.contains_key(id) {
                    return Err(Refused::NoSuchNodeId(*id));
                }
                for v in self.volumes.values_mut() {
                    if !v.replicas.contains(id) {
                        continue;
                    }
                    if !v.lost_power.contains(id) {
                        v.lost_power.push(*id);
                    }
                    if v.primary != *id && v.in_sync.contains(id) && v.in_sync.len() > 1 {
                        v.in_sync.retain(|n| n != id);
                        if v.moving_to == Some(*id) {
                            v.moving_to = None;
                        }
                    }
                }
                Ok(Applied::Done)
            }
            Command::RemoveNode { name, dead } => {
                let node = self
                    .node_by_name(name)
                    .ok_or_else(|| Refused::NoSuchNode(name.clone()))?;
                let id = node.id;
                let volumes = self.volumes_on(id);
                if self.nodes.len() == 1 {
                    return Err(Refused::LastNode(name.clone()));
                }
                if volumes.is_empty() {
                    self.nodes.remove(&id);
                    return Ok(Applied::Done);
                }
                if !*dead {
                    return Err(Refused::NodeHasVolumes {
                        node: name.clone(),
                        volumes,
                    });
                }
                self.remove_dead_node(id)
            }
            _ => unreachable!("apply routes only node commands here"),
        }
    }

    /// Volumes and their placement: [`Command::CreateVolume`], [`Command::ResizeVolume`]
    /// and [`Command::DeleteVolume`].
    fn apply_volume(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::CreateVolume {
                name,
                size_bytes,
                replicas,
                block_size,
                physical_block_size,
                nodes,
            } => {
                check_name("volume", name)?;
                if self.volumes.contains_key(name) {
                    return Err(Refused::VolumeExists(name.clone()));
                }
                if *block_size != 512 && *block_size != 4096 {
                    return Err(Refused::BadBlockSize(*block_size));
                }
                if let Some(p) = *physical_block_size {
                    if !p.is_power_of_two() || p < *block_size || p > 32768 {
                        return Err(Refused::BadPhysicalBlockSize {
                            physical: p,
                            block_size: *block_size,
                        });
                    }
                }
                if *size_bytes == 0 || size_bytes % u64::from(*block_size) != 0 {
                    return Err(Refused::BadVolumeSize {
                        size: *size_bytes,
                        block_size: *block_size,
                    });
                }
                if !(1..=3).contains(replicas) {
                    return Err(Refused::BadReplicaCount(*replicas));
                }
                let placement = self.place(*size_bytes, *replicas, nodes)?;
                let mut v = Volume::placed(
                    name,
                    *size_bytes,
                    *block_size,
                    *physical_block_size,
                    &placement,
                    "placed at creation".into(),
                );
                v.wanted_replicas = *replicas;
                self.volumes.insert(name.clone(), v);
                Ok(Applied::VolumeCreated(placement))
            }
            Command::ResizeVolume { name, size_bytes } => {
                let v = self
                    .volumes
                    .get(name)
                    .ok_or_else(|| Refused::NoSuchVolume(name.clone()))?;
                if *size_bytes < v.size_bytes {
                    return Err(Refused::Shrink {
                        name: name.clone(),
                        size: v.size_bytes,
                    });
                }
                if *size_bytes % u64::from(v.block_size) != 0 {
                    return Err(Refused::BadVolumeSize {
                        size: *size_bytes,
                        block_size: v.block_size,
                    });
                }
                let growth = size_bytes - v.size_bytes;
                for id in &v.replicas {
                    let free = self.free_bytes(*id);
                    if free < growth {
                        return Err(Refused::NoSpace {
                            node: self.node_name(*id),
                            free,
                            needed: growth,
                        });
                    }
                }
                if let Some(v) = self.volumes.get_mut(name) {
                    v.size_bytes = *size_bytes;
                }
                Ok(Applied::Done)
            }
            Command::DeleteVolume {
                name,
                with_snapshots,
            } => {
                let v = self
                    .volumes
                    .get(name)
                    .ok_or_else(|| Refused::NoSuchVolume(name.clone()))?;
                if !v.snapshots.is_empty() && !with_snapshots {
                    return Err(Refused::VolumeHasSnapshots {
                        volume: name.clone(),
                        count: v.snapshots.len(),
                    });
                }
                for snapshot in v.snapshots.keys() {
                    self.refuse_if_cloned(name, snapshot)?;
                }
                if let Some((t, lun)) = self.mapping_of(name) {
                    return Err(Refused::VolumeMapped {
                        volume: name.clone(),
                        iqn: t.iqn.clone(),
                        lun,
                    });
                }
                self.volumes.remove(name);
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only volume commands here"),
        }
    }

    /// API tokens: [`Command::CreateToken`], [`Command::RevokeToken`] and
    /// [`Command::UseToken`].
    fn apply_token(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::CreateToken { token } => {
                token.check().map_err(Refused::BadToken)?;
                if self.tokens.contains_key(&token.id) {
                    return Err(Refused::TokenExists(token.id.clone()));
                }
                if self
                    .tokens
                    .values()
                    .any(|t| t.secret_sha256 == token.secret_sha256)
                {
                    return Err(Refused::BadToken("that secret is already in use".into()));
                }
                self.tokens.insert(token.id.clone(), token.clone());
                Ok(Applied::Done)
            }
            Command::RevokeToken { id } => match self.tokens.get_mut(id) {
                Some(t) if !t.revoked => {
                    t.revoked = true;
                    Ok(Applied::Done)
                }
                Some(_) => Err(Refused::TokenUnusable(format!(
                    "token {id} is already revoked"
                ))),
                None => Err(Refused::NoSuchToken(id.clone())),
            },
            Command::UseToken { id, now_unix_ms } => {
                let t = self
                    .tokens
                    .get_mut(id)
                    .ok_or_else(|| Refused::NoSuchToken(id.clone()))?;
                if let Some(why) = t.unusable(*now_unix_ms) {
                    return Err(Refused::TokenUnusable(why));
                }
                if t.single_use {
                    t.used = true;
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only token commands here"),
        }
    }

    /// Alerts: [`Command::SetAlert`], [`Command::RemoveAlert`] and [`Command::TestAlert`].
    fn apply_alert(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::SetAlert { alert } => {
                alert.check().map_err(Refused::BadAlert)?;
                let tests = self.alerts.get(&alert.name).map_or(0, |a| a.tests);
                self.alerts.insert(
                    alert.name.clone(),
                    Alert {
                        tests,
                        ..alert.clone()
                    },
                );
                Ok(Applied::Done)
            }
            Command::RemoveAlert { name } => match self.alerts.remove(name) {
                Some(_) => Ok(Applied::Done),
                None => Err(Refused::NoSuchAlert(name.clone())),
            },
            Command::TestAlert { name } => match self.alerts.get_mut(name) {
                Some(a) => {
                    a.tests += 1;
                    Ok(Applied::Done)
                }
                None => Err(Refused::NoSuchAlert(name.clone())),
            },
            _ => unreachable!("apply routes only alert commands here"),
        }
    }

    /// The settings: [`Command::SetSettings`].
    fn apply_settings(&mut self, settings: &Settings) -> Result<Applied, Refused> {
        if !(20..=5000).contains(&settings.heartbeat_interval_ms) {
            return Err(Refused::BadSettings(
                "heartbeat interval must be 20 to 5000 ms".into(),
            ));
        }
        if settings.failure_timeout_ms < 2 * settings.heartbeat_interval_ms
            || settings.failure_timeout_ms > 60_000
        {
            return Err(Refused::BadSettings(
                "failure timeout must be at least two heartbeat intervals and at most 60 s".into(),
            ));
        }
        if let Some(cmd) = &settings.fence_command {
            if !cmd.starts_with('/') || cmd.contains(char::is_whitespace) {
                return Err(Refused::BadSettings(format!(
                    "the fence command {cmd:?} must be the absolute path of a program (no arguments; it gets the node to fence in its environment)"
                )));
            }
        }
        if !(1000..=600_000).contains(&settings.fence_timeout_ms) {
            return Err(Refused::BadSettings(
                "the fence timeout must be 1 to 600 s".into(),
            ));
        }
        let rate = settings.resync_rate_bytes_per_s;
        if rate != 0 && rate < MIN_RESYNC_RATE {
            return Err(Refused::BadSettings(
                "resync rate must be at least 1 MiB/s, or 0 for unlimited".into(),
            ));
        }
        let rate = settings.rebuild_rate_bytes_per_s;
        if rate != 0 && rate < MIN_RESYNC_RATE {
            return Err(Refused::BadSettings(
                "rebuild rate must be at least 1 MiB/s, or 0 for unlimited".into(),
            ));
        }
        let after = settings.replace_after_ms;
        if after != 0 && !(MIN_REPLACE_AFTER_MS..=7 * 24 * 3600 * 1000).contains(&after) {
            return Err(Refused::BadSettings(
                "replace-after must be 10 s to 7 days, or off".into(),
            ));
        }
        self.settings = settings.clone();
        Ok(Applied::Done)
    }

    fn volumes_on(&self, id: NodeId) -> Vec<String> {
        self.volumes
            .values()
            .filter(|v| v.replicas.contains(&id))
            .map(|v| v.name.clone())
            .collect()
    }

    /// Chooses `replicas` storage nodes for a new volume: the named ones, else the ones
    /// with the most free space (ties: lowest id).
    fn place(&self, size: u64, replicas: u8, wanted: &[String]) -> Result<Vec<NodeId>, Refused> {
        let mut chosen: Vec<NodeId> = Vec::new();
        for name in wanted {
            let n = self
                .node_by_name(name)
                .ok_or_else(|| Refused::NoSuchNode(name.clone()))?;
            if n.role == NodeRole::Witness {
                return Err(Refused::WitnessCannotHold(name.clone()));
            }
            if n.drained {
                return Err(Refused::NodeDrained(name.clone()));
            }
            if chosen.contains(&n.id) {
                return Err(Refused::DuplicatePlacement(name.clone()));
            }
            let free = self.free_bytes(n.id);
            if free < size {
                return Err(Refused::NoSpace {
                    node: name.clone(),
                    free,
                    needed: size,
                });
            }
            chosen.push(n.id);
        }
        let need = usize::from(replicas).saturating_sub(chosen.len());
        let candidates = self.pick_nodes(size, need, &chosen, &[]);
        if candidates.len() < need {
            let detail = self
                .nodes
                .values()
                .map(|n| match n.role {
                    NodeRole::Witness => format!("{}: witness", n.name),
                    NodeRole::Storage => {
                        format!("{}: {} free", n.name, human(self.free_bytes(n.id)))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Refused::NotEnoughNodes {
                replicas,
                usable: chosen.len() + candidates.len(),
                detail,
            });
        }
        chosen.extend(candidates);
        chosen.truncate(usize::from(replicas));
        Ok(chosen)
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

#[path = "replicas.rs"]
mod replicas;

#[path = "snapshots.rs"]
mod snapshots;

#[path = "targets.rs"]
mod targets;

#[path = "primaries.rs"]
mod primaries;

#[path = "command.rs"]
mod command;
pub use command::{Applied, Command};

#[path = "refused.rs"]
mod refused;
pub use refused::Refused;
pub use snapshots::{Origin, PendingRollback, Snapshot};

#[cfg(test)]
#[path = "replicas_tests.rs"]
mod replicas_tests;
#[cfg(test)]
#[path = "snapshots_tests.rs"]
mod snapshots_tests;
pub use replicas::Upkeep;
