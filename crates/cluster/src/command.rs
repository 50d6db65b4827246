//! The commands that change the cluster state, as committed to the Raft log, and what
//! a committed one did. Part of the state machine ([`ClusterState::apply`]).

use super::*;

impl Command {
    /// Checks the iSCSI names a command from an administrator carries against the
    /// rules logins are held to (RFC 3720 §3.2.6, [`iscsi_proto::check_iscsi_name`]),
    /// before it is proposed. Not in [`ClusterState::apply`]: entries an older version
    /// committed must replay as they applied then.
    pub fn check_names(&self) -> Result<(), Refused> {
        let names: &[&String] = match self {
            Command::CreateTarget { iqn, .. } => &[iqn],
            Command::AddAcl { iqn, initiator } => &[iqn, initiator],
            _ => &[],
        };
        for n in names {
            iscsi_proto::check_iscsi_name(n)
                .map_err(|e| Refused::BadName(format!("not a valid iSCSI name: {n:?}: {e}")))?;
        }
        Ok(())
    }

    /// Commands only nodes issue, as part of running the cluster: accepted over the
    /// control port only from a node certificate.
    pub fn node_only(&self) -> bool {
        matches!(
            self,
            Command::AddNode { .. }
                | Command::NodeStarted { .. }
                | Command::NodeLostPower { .. }
                | Command::IsrChange { .. }
                | Command::Promote { .. }
                | Command::FailoverFinished { .. }
                | Command::FinishVerify { .. }
                | Command::SetReservations { .. }
                | Command::UseToken { .. }
                | Command::SnapshotTaken { .. }
                | Command::RollbackDone { .. }
        )
    }
}

/// One change to the cluster, as committed to the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// A node joins (sent by the node that takes the join request).
    AddNode {
        /// Name.
        name: String,
        /// Addresses.
        addresses: NodeAddresses,
        /// Capacity.
        capacity_bytes: u64,
        /// The public key of the key the node made (hex), for its certificate.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public_key: Option<String>,
    },
    /// A node (re)started: its role, addresses and capacity as it sees them now.
    NodeStarted {
        /// Id.
        id: NodeId,
        /// Role.
        role: NodeRole,
        /// Addresses.
        addresses: NodeAddresses,
        /// Capacity.
        capacity_bytes: u64,
        /// Whether its data folder can share blocks between files (reflinks).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shares_blocks: Option<bool>,
    },
    /// A node came back from a power loss (its kernel's boot id changed since it last
    /// ran): what it had not flushed is gone, writes it acknowledged among them. It
    /// leaves the in-sync set of every volume it does not serve while another member
    /// remains, and returns through resync (see docs/design-notes.md, "Power loss").
    NodeLostPower {
        /// Id.
        id: NodeId,
    },
    /// A node leaves or is removed. A node holding replicas can be removed only as
    /// `dead`: one that will never return. Its replicas leave the volumes (each
    /// replaced on a node with room, where there is one), and its id is never reused.
    RemoveNode {
        /// Name.
        name: String,
        /// The node is gone for good.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dead: bool,
    },
    /// Drains a node for maintenance, or ends that (see [`Node::drained`]).
    DrainNode {
        /// Name.
        name: String,
        /// Drained or back in service.
        drained: bool,
        /// Also rebuild its replicas elsewhere and remove them from it.
        evacuate: bool,
    },
    /// Sets a node's failure domain (`None`: no zone).
    SetNodeZone {
        /// Name.
        name: String,
        /// The zone.
        zone: Option<String>,
    },
    /// Adds a replica to a volume, removes one, or replaces one by another (added
    /// first, removed once the new one is in sync). Acts on every volume of the
    /// volume's target together, since a target's volumes share their nodes.
    ChangeReplicas {
        /// A volume (of the target, for a mapped volume).
        volume: String,
        /// Node to add a replica on.
        add: Option<String>,
        /// Node to remove the replica from.
        remove: Option<String>,
        /// Remove even if that leaves fewer than two in-sync copies.
        #[serde(default)]
        force: bool,
    },
    /// Creates a volume.
    CreateVolume {
        /// Name.
        name: String,
        /// Size.
        size_bytes: u64,
        /// Replica count.
        replicas: u8,
        /// Logical block size.
        block_size: u32,
        /// Physical block size reported to initiators; none: 4096 (see
        /// [`Volume::physical_block_size`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        physical_block_size: Option<u32>,
        /// Nodes to place it on (names), preferred primary first; empty lets the cluster
        /// choose the nodes with the most free space.
        nodes: Vec<String>,
    },
    /// Grows a volume.
    ResizeVolume {
        /// Name.
        name: String,
        /// New size.
        size_bytes: u64,
    },
    /// Deletes a volume that no target maps.
    DeleteVolume {
        /// Name.
        name: String,
        /// Its snapshots go too (otherwise a volume with snapshots is kept).
        #[serde(default)]
        with_snapshots: bool,
    },
    /// Creates a target.
    CreateTarget {
        /// IQN.
        iqn: String,
        /// Alias.
        alias: Option<String>,
    },
    /// Deletes a target (its LUNs are unmapped; the volumes stay).
    DeleteTarget {
        /// IQN.
        iqn: String,
    },
    /// Maps a volume as a LUN of a target.
    AddLun {
        /// Target.
        iqn: String,
        /// LUN; `None` picks the lowest free one.
        lun: Option<u64>,
        /// Volume name.
        volume: String,
    },
    /// Unmaps a LUN.
    RemoveLun {
        /// Target.
        iqn: String,
        /// LUN.
        lun: u64,
    },
    /// Allows an initiator to log in to a target.
    AddAcl {
        /// Target.
        iqn: String,
        /// Initiator name.
        initiator: String,
    },
    /// Removes an initiator from a target's ACL.
    RemoveAcl {
        /// Target.
        iqn: String,
        /// Initiator name.
        initiator: String,
    },
    /// Gives a target a virtual IP.
    AddVip {
        /// Target.
        iqn: String,
        /// The address, its prefix and interface.
        vip: VirtualIp,
    },
    /// How a target's ports on in-sync nodes other than the primary serve I/O.
    SetTargetPaths {
        /// Target.
        iqn: String,
        /// Standby (no I/O) rather than active/non-optimized (I/O forwarded).
        standby: bool,
    },
    /// Changes who may log in to a target without an ACL entry, and whether target
    /// resets are allowed; `None` leaves a setting as it is.
    SetTargetAccess {
        /// Target.
        iqn: String,
        /// Admit any initiator when neither ACL nor CHAP says who.
        allow_any: Option<bool>,
        /// Let initiators reset the whole target.
        allow_target_reset: Option<bool>,
    },
    /// Takes a virtual IP from a target.
    RemoveVip {
        /// Target.
        iqn: String,
        /// The address.
        address: std::net::IpAddr,
    },
    /// Defines a CHAP account.
    AddChap {
        /// The account.
        account: ChapAccount,
    },
    /// Deletes a CHAP account that no target uses.
    RemoveChap {
        /// User name.
        user: String,
    },
    /// Requires a CHAP account on a target.
    BindChap {
        /// User name.
        user: String,
        /// Target.
        iqn: String,
    },
    /// Unbinds a CHAP account from a target.
    UnbindChap {
        /// User name.
        user: String,
        /// Target.
        iqn: String,
    },
    /// The primary of `volume` at `epoch` changes its in-sync set.
    IsrChange {
        /// Volume.
        volume: String,
        /// The primary's epoch: refused if the volume has moved on.
        epoch: u64,
        /// Replicas that caught up.
        add: Vec<NodeId>,
        /// Replicas that stopped answering.
        remove: Vec<NodeId>,
    },
    /// Makes `node` the primary of `volumes` (a target's volumes move together), each at
    /// the epoch given, which must still be current.
    Promote {
        /// (volume, expected current epoch).
        volumes: Vec<(String, u64)>,
        /// New primary.
        node: NodeId,
        /// Why, when the primary changes (recorded in [`Volume::last_failover`]).
        #[serde(default)]
        cause: Option<FailoverCause>,
    },
    /// The new primary of `volumes` at `epoch` serves: I/O paused `pause_ms`.
    FailoverFinished {
        /// The volumes that moved together.
        volumes: Vec<String>,
        /// The epoch the new primary serves at.
        epoch: u64,
        /// Length of the pause.
        pause_ms: u64,
    },
    /// Planned move of a volume (with the rest of its target) to `node`: the primary
    /// drains and hands over (`bulwark volume move`).
    MoveVolume {
        /// Volume.
        volume: String,
        /// Destination: an in-sync replica.
        node: String,
    },
    /// Takes snapshot `name` of `volumes` (one volume, or every volume of a target) at
    /// one point of their streams, on the primary and every in-sync replica
    /// (`bulwark snapshot create`). The primary takes it and reports
    /// [`Command::SnapshotTaken`].
    CreateSnapshot {
        /// The volumes, which share their primary.
        volumes: Vec<String>,
        /// Snapshot name.
        name: String,
        /// When it was asked for (ms since the Unix epoch, the asker's clock).
        at_ms: u64,
    },
    /// The primary took snapshot `name` of `volume` at `epoch`; `members` hold it.
    SnapshotTaken {
        /// Volume.
        volume: String,
        /// Snapshot name.
        name: String,
        /// The primary's epoch.
        epoch: u64,
        /// The primary and the in-sync replicas that took their copy.
        members: Vec<NodeId>,
        /// How long writes were held back on the primary, in microseconds.
        pause_us: u64,
    },
    /// Makes volume `name` from snapshot `snapshot` of `volume`: each member of the
    /// snapshot makes its copy of the new volume from its copy of the snapshot (a
    /// reflink), so the clone is in sync from birth on those nodes
    /// (`bulwark volume create NAME --from-snapshot VOLUME@SNAPSHOT`).
    CloneSnapshot {
        /// The new volume.
        name: String,
        /// The volume the snapshot is of.
        volume: String,
        /// The snapshot.
        snapshot: String,
    },
    /// Rolls `volumes` back to their snapshot `name` (`bulwark snapshot rollback`): the
    /// primary does it at one point of each stream, on every member of the snapshot
    /// in sync, and reports [`Command::RollbackDone`]. With `force`, the nodes first
    /// end the sessions of the targets the volumes are LUNs of.
    RollbackSnapshot {
        /// The volumes, which share their primary.
        volumes: Vec<String>,
        /// Snapshot name.
        name: String,
        /// End the initiators' sessions first.
        force: bool,
    },
    /// The primary rolled `volume` back to snapshot `name` at `epoch`, or could not
    /// (`error`).
    RollbackDone {
        /// Volume.
        volume: String,
        /// Snapshot name.
        name: String,
        /// The primary's epoch.
        epoch: u64,
        /// Why it could not, if it could not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Deletes snapshot `name` of `volumes`, taken or being taken: every node removes
    /// its copy (`bulwark snapshot delete`, or a primary that could not take it).
    DeleteSnapshot {
        /// The volumes.
        volumes: Vec<String>,
        /// Snapshot name.
        name: String,
    },
    /// Asks the primary of `volume` for an online verify (replacing one that runs).
    StartVerify {
        /// Volume.
        volume: String,
        /// Resync differing regions from the primary.
        repair: bool,
    },
    /// The primary's result of verify `id` (ignored if another verify was asked for
    /// since).
    FinishVerify {
        /// Volume.
        volume: String,
        /// The verify it ran.
        id: u64,
        /// What it found.
        result: VerifyResult,
    },
    /// The primary changed the persistent reservations of a volume (PERSISTENT
    /// RESERVE OUT completes once this is committed).
    SetReservations {
        /// Volume.
        volume: String,
        /// The primary's epoch: a deposed primary's change is refused.
        epoch: u64,
        /// The new state.
        state: String,
    },
    /// Records an API token (its secret's digest only).
    CreateToken {
        /// The token.
        token: crate::auth::ApiToken,
    },
    /// Revokes an API token: it stops working at once, on every node.
    RevokeToken {
        /// Its id.
        id: String,
    },
    /// Spends a single-use token (a join), before what it allows is done.
    UseToken {
        /// Its id.
        id: String,
        /// The time of use, to check expiry against (Unix milliseconds).
        now_unix_ms: u64,
    },
    /// Changes the settings.
    SetSettings {
        /// New settings.
        settings: Settings,
    },
    /// Adds an alert, or replaces the one of that name.
    SetAlert {
        /// The alert.
        alert: Alert,
    },
    /// Removes an alert.
    RemoveAlert {
        /// Its name.
        name: String,
    },
    /// Asks the leader to send the alert a test event.
    TestAlert {
        /// Its name.
        name: String,
    },
}

/// What a committed command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// Done.
    Done,
    /// A node was added with this id.
    NodeAdded(NodeId),
    /// A volume was created on these nodes, primary first.
    VolumeCreated(Vec<NodeId>),
    /// A LUN was mapped with this number.
    LunAdded(u64),
    /// The replicas of these volumes changed (a target's volumes change together).
    ReplicasChanged(Vec<String>),
    /// A dead node was removed: each volume that held a replica there, with the node
    /// that rebuilds it (`None`: no node had room; the volume has a replica less).
    DeadNodeRemoved(Vec<(String, Option<NodeId>)>),
}
