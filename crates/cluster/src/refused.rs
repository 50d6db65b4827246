//! Why the state machine refused a command ([`ClusterState::apply`]): each message says
//! what is wrong and what to do.

use super::*;

/// Why a command was refused. Each message says what is wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refused {
    #[error("bad token: {0}")]
    BadToken(String),
    #[error("a token with id {0:?} exists; pick another id")]
    TokenExists(String),
    #[error("no token with id {0:?}; `bulwark cluster token list` shows them")]
    NoSuchToken(String),
    #[error("{0}")]
    TokenUnusable(String),
    #[error("bad alert: {0}")]
    BadAlert(String),
    #[error("no alert named {0:?}; `bulwark alert list` shows them")]
    NoSuchAlert(String),
    #[error("a node named {0:?} is already a member; pick another name")]
    NodeExists(String),
    #[error("no node named {0:?}; `bulwark node list` shows the members")]
    NoSuchNode(String),
    #[error("node {node:?} holds replicas of {volumes:?}: drain and evacuate it first (`bulwark node drain {node} --evacuate`), or, if it is gone for good, `bulwark node remove {node} --dead`")]
    NodeHasVolumes { node: String, volumes: Vec<String> },
    #[error("node {0:?} is the last member; a cluster cannot remove its only node")]
    LastNode(String),
    #[error("node id {0} is not a member")]
    NoSuchNodeId(NodeId),
    #[error("{0}")]
    BadName(String),
    #[error("a volume named {0:?} already exists; pick another name or delete it first")]
    VolumeExists(String),
    #[error("no volume named {0:?}; `bulwark volume list` shows the volumes")]
    NoSuchVolume(String),
    #[error("volume size must be a positive multiple of the {block_size}-byte block size, not {size} bytes")]
    BadVolumeSize { size: u64, block_size: u32 },
    #[error("block size must be 512 or 4096, not {0}")]
    BadBlockSize(u32),
    #[error("volume {volume:?} has a snapshot named {name:?}; pick another name or delete it (`bulwark snapshot delete`)")]
    SnapshotExists { volume: String, name: String },
    #[error(
        "volume {volume:?} has no snapshot named {name:?}; `bulwark snapshot list` shows them"
    )]
    NoSuchSnapshot { volume: String, name: String },
    #[error("cannot take a snapshot of {volume:?} now: {why}")]
    SnapshotNotNow { volume: String, why: String },
    #[error("volume {volume:?} has {count} snapshot(s); delete them first, or delete the volume with --with-snapshots")]
    VolumeHasSnapshots { volume: String, count: usize },
    #[error("snapshot {name:?} of {volume:?} has clones ({}); delete them first", clones.join(", "))]
    SnapshotHasClones {
        volume: String,
        name: String,
        clones: Vec<String>,
    },
    #[error("snapshot {name:?} of {volume:?} cannot be exported: {why}")]
    SnapshotNotExportable {
        volume: String,
        name: String,
        why: String,
    },
    #[error("snapshot {name:?} of {volume:?} is exported as LUN {lun} of {iqn}; remove the LUN first (`bulwark lun remove {iqn} {lun}`)")]
    SnapshotExported {
        volume: String,
        name: String,
        iqn: String,
        lun: u64,
    },
    #[error("physical block size {physical} must be a power of two from the block size ({block_size}) to 32768")]
    BadPhysicalBlockSize { physical: u32, block_size: u32 },
    #[error("a volume needs 1 to 3 replicas, not {0}")]
    BadReplicaCount(u8),
    #[error("{replicas} replica(s) need {replicas} storage node(s) with room; the cluster has {usable} ({detail}). Add storage nodes, lower --replicas or the size")]
    NotEnoughNodes {
        replicas: u8,
        usable: usize,
        detail: String,
    },
    #[error("node {node:?} has {} free, the volume needs {}; pick a smaller size or other nodes", human(*free), human(*needed))]
    NoSpace {
        node: String,
        free: u64,
        needed: u64,
    },
    #[error("node {0:?} is a witness and stores no volume data; pick storage nodes")]
    WitnessCannotHold(String),
    #[error("node {0:?} is named twice in the placement")]
    DuplicatePlacement(String),
    #[error("volume {name:?} is {}; shrinking would destroy data, so only growing is allowed", human(*size))]
    Shrink { name: String, size: u64 },
    #[error("volume {volume:?} is mapped as LUN {lun} of {iqn}; remove the LUN first (`bulwark lun remove {iqn} {lun}`)")]
    VolumeMapped {
        volume: String,
        iqn: String,
        lun: u64,
    },
    #[error("{0:?} is not an iSCSI name: use iqn.YYYY-MM.reversed.domain[:id], eui.<16 hex> or naa.<16 or 32 hex> (RFC 7143 §4.2.7)")]
    BadIqn(String),
    #[error("a target named {0} already exists")]
    TargetExists(String),
    #[error("no target named {0}; `bulwark target list` shows the targets")]
    NoSuchTarget(String),
    #[error(
        "LUN {lun} of {iqn} is already mapped (to {volume:?}); pick another LUN or remove it first"
    )]
    LunTaken {
        iqn: String,
        lun: u64,
        volume: String,
    },
    #[error("LUN {0} is out of range: LUNs go from 0 to 16383")]
    LunOutOfRange(u64),
    #[error("{iqn} has no LUN {lun}")]
    NoSuchLun { iqn: String, lun: u64 },
    #[error(
        "volume {volume:?} is already mapped as LUN {lun} of {iqn}; a volume belongs to one target"
    )]
    VolumeAlreadyMapped {
        volume: String,
        iqn: String,
        lun: u64,
    },
    #[error("the LUNs of {iqn} are served by node {target_primary:?} but volume {volume:?} is primary on {volume_primary:?}; a target moves as one unit, so all its volumes need the same primary (create the volume with --node {target_primary})")]
    PrimaryMismatch {
        iqn: String,
        volume: String,
        target_primary: String,
        volume_primary: String,
    },
    #[error("{initiator} is already allowed on {iqn}")]
    AclExists { iqn: String, initiator: String },
    #[error("{initiator} is not in the ACL of {iqn}")]
    NoSuchAcl { iqn: String, initiator: String },
    #[error("{address} is already a virtual IP of {iqn}; remove it first to change it")]
    VipInUse {
        iqn: String,
        address: std::net::IpAddr,
    },
    #[error("{address} is not a virtual IP of {iqn}; `bulwark target list` shows them")]
    NoSuchVip {
        iqn: String,
        address: std::net::IpAddr,
    },
    #[error("bad virtual IP: {0}")]
    BadVip(String),
    #[error("a CHAP account named {0:?} already exists; remove it first to change it")]
    ChapExists(String),
    #[error("no CHAP account named {0:?}; `bulwark chap list` shows them")]
    NoSuchChap(String),
    #[error("CHAP secrets must be {min} to 255 characters (RFC 7143 §12.1.3 asks for at least 96 bits); this one has {len}")]
    ChapSecretLength { len: usize, min: usize },
    #[error("the mutual CHAP secret must differ from the initiator's secret (RFC 7143 §12.1.3)")]
    ChapSameSecret,
    #[error("CHAP account {user:?} is bound to {targets:?}; unbind it first")]
    ChapBound { user: String, targets: Vec<String> },
    #[error("CHAP account {user:?} is already bound to {iqn}")]
    ChapAlreadyBound { user: String, iqn: String },
    #[error("CHAP account {user:?} is not bound to {iqn}")]
    ChapNotBound { user: String, iqn: String },
    #[error("{0}")]
    BadSettings(String),
    #[error("node {node:?} hosts volumes {volumes:?}; a storage node with volumes cannot become a witness")]
    WitnessWithVolumes { node: String, volumes: Vec<String> },
    #[error("volume {volume:?} is at epoch {current}, not {epoch}: a newer primary took over")]
    StaleEpoch {
        volume: String,
        epoch: u64,
        current: u64,
    },
    #[error("node {node} is not an in-sync replica of volume {volume:?}, so it may lack acknowledged writes")]
    NotInSync { volume: String, node: NodeId },
    #[error("node {node} holds no replica of volume {volume:?}")]
    NotAReplica { volume: String, node: NodeId },
    #[error("the primary of volume {0:?} cannot leave its own in-sync set")]
    RemovePrimary(String),
    #[error("volume {volume:?} of {iqn} must move with the others: a target moves as one unit")]
    TargetSplit { iqn: String, volume: String },
    #[error("node {node:?} is not an in-sync replica of {volume:?}; wait until its resync finishes (`bulwark status`) or pick another")]
    MoveNotInSync { volume: String, node: String },
    #[error("volume {volume:?} is already primary on {node:?}")]
    AlreadyThere { volume: String, node: String },
    #[error("address {addr} is already used by node {node:?}")]
    AddressInUse { addr: SocketAddr, node: String },
    #[error("node {node:?} already holds a replica of {volume:?}; pick another node")]
    AlreadyReplica { volume: String, node: String },
    #[error("node {node:?} holds no replica of {volume:?}; `bulwark volume list` shows where its replicas are")]
    NotHeldBy { volume: String, node: String },
    #[error("node {0:?} is drained for maintenance; `bulwark node undrain {0}` first, or pick another node")]
    NodeDrained(String),
    #[error("{volume:?} already has {have} replicas, the most a volume can have; use `replace` to move one")]
    TooManyReplicas { volume: String, have: usize },
    #[error("{node:?} holds the last replica of {volume:?}; delete the volume instead")]
    LastReplica { volume: String, node: String },
    #[error("{node:?} is the primary of {volume:?}; move the volume first (`bulwark volume move {volume} NODE`), or drain the node, which moves it")]
    ReplicaIsPrimary { volume: String, node: String },
    #[error("removing {node:?} would leave {volume:?} with {left} in-sync cop{}; wait until another replica is in sync (`bulwark status`), or add --force", if *left == 1 { "y" } else { "ies" })]
    WouldLeaveFewCopies {
        volume: String,
        node: String,
        left: usize,
    },
    #[error("{node:?} holds the only in-sync copy of {volume:?}; removing it would lose the volume's data. Bring the node back, or delete the volume first")]
    OnlyCopy { volume: String, node: String },
    #[error("{node:?} is still the primary of {volumes:?}: a failover moves them once its lease lapsed (about a second); if none happens, no other in-sync replica exists")]
    StillPrimary { node: String, volumes: Vec<String> },
    #[error("{volume:?} is already being rebuilt on {node:?}; wait until it is in sync (`bulwark status`)")]
    AlreadyJoining { volume: String, node: String },
}
