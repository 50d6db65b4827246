//! The administration commands: each talks to one node's admin API over TLS with the
//! cluster token, prints a table for people or JSON with `--json`.

pub(crate) mod maintenance;
pub(crate) mod snapshot;
mod status;

pub use status::status;
use status::{render_nodes, render_targets, render_volumes};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use cluster::state::{ChapAccount, ClusterState, Command, NodeId, NodeRole};
use cluster::status::{EventKind, NodeStatus};
use cluster::{AdminClient, Applied, Token};
use serde::Serialize;

use crate::config::parse_size;

/// Default control-plane port (TLS; heartbeats use the same number over UDP).
pub const CONTROL_PORT: u16 = 3261;

/// How to reach the cluster; shared by every admin command.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// Control address of any node (port 3261 when omitted).
    #[arg(
        long,
        env = "BULWARK_NODE",
        default_value = "127.0.0.1:3261",
        global = true
    )]
    pub node: String,
    /// Cluster token, as `bulwark cluster init` or `bulwark cluster token create`
    /// printed it. Without it, the command runs with the certificate of the local node
    /// whose data folder is --data-dir (root on a node; works after every token was
    /// revoked).
    #[arg(long, env = "BULWARK_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Data folder of a local node: its certificate admits the command when no token
    /// is given (`cluster token` prints the init token from it).
    #[arg(
        long = "data-dir",
        env = "BULWARK_DATA_DIR",
        default_value = "bulwark-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Parses a control address; the port defaults to 3261.
pub fn parse_control(s: &str) -> Result<SocketAddr> {
    crate::config::parse_addr(s, CONTROL_PORT, "node address")
}

impl Conn {
    pub fn token(&self) -> Result<Token> {
        if let Some(t) = &self.token {
            return t.parse().context("--token / BULWARK_TOKEN");
        }
        match cluster::Identity::load(&self.data_dir) {
            Ok(id) => Ok(id.token()?),
            Err(_) => bail!(
                "no cluster token: pass --token or set BULWARK_TOKEN to the token `bulwark cluster init` printed (or run on a node with --data-dir pointing at its data folder)"
            ),
        }
    }

    pub fn client(&self) -> Result<AdminClient> {
        let addr = parse_control(&self.node)?;
        if self.token.is_none() {
            if let Ok(id) = cluster::Identity::load(&self.data_dir) {
                return Ok(AdminClient::for_node(addr, &id)?);
            }
        }
        Ok(AdminClient::new(addr, &self.token()?)?)
    }

    /// The fingerprint of the cluster CA, from the token or the local node.
    pub(crate) fn ca_fingerprint(&self) -> Result<String> {
        Ok(self.token()?.fingerprint)
    }
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Lists the members with their role, addresses, liveness and Raft role.
    List,
    /// Removes a node from the cluster. A node that holds replicas must be evacuated
    /// first (`node drain NAME --evacuate`), or be gone for good: then --dead removes
    /// its replicas from the volumes and rebuilds each on a node with room.
    Remove {
        /// Node name.
        name: String,
        /// The node will never return (its disk or machine is lost): its replicas are
        /// given up. Refused while it is online, or offline for less than the failure
        /// timeout plus a lease.
        #[arg(long)]
        dead: bool,
        /// Confirms --dead.
        #[arg(long)]
        yes: bool,
    },
    /// Drains a node for maintenance: its primaries move to other in-sync replicas by
    /// planned moves (no failed I/O), it gets no new primary or replica, and being
    /// offline does not make the cluster replace its replicas. Waits for the moves.
    Drain {
        /// Node name.
        name: String,
        /// Also rebuild its replicas on other nodes, then remove them from it (before
        /// replacing its hardware, or removing it). Waits for the rebuilds too.
        #[arg(long)]
        evacuate: bool,
        /// Return at once; `bulwark status` shows the progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// Puts a drained node back in service (its primaries stay where they are).
    Undrain {
        /// Node name.
        name: String,
    },
    /// Sets the node's failure domain (rack, room): replicas of a volume are placed in
    /// different zones where the nodes allow. "" removes it.
    Zone {
        /// Node name.
        name: String,
        /// Zone name.
        zone: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Creates a volume, thin, on the nodes with the most free space (or --node); or,
    /// with --from-snapshot, a clone of a snapshot on the nodes that hold it.
    Create {
        /// Volume name.
        name: String,
        /// Size, like 10GiB (a clone has the size its source had).
        #[arg(required_unless_present = "from_snapshot")]
        size: Option<String>,
        /// Make it a writable copy of snapshot VOLUME@SNAPSHOT, in seconds whatever
        /// its size, on the snapshot's nodes; independent of its source afterwards
        /// (the snapshot cannot be deleted while the clone exists).
        #[arg(long, value_name = "VOLUME@SNAPSHOT", conflicts_with_all = ["size", "replicas", "block_size", "physical_block_size", "on"])]
        from_snapshot: Option<String>,
        /// Number of replicas (1 to 3), each on a different storage node.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// Logical block size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Physical block size initiators see (a power of two from the block size to
        /// 32768; default 4096): 512 for software that assumes one logical block per
        /// physical block.
        #[arg(long)]
        physical_block_size: Option<u32>,
        /// Place it on this node (repeat for each replica; the first is the primary).
        #[arg(long = "on")]
        on: Vec<String>,
    },
    /// Lists volumes.
    List,
    /// Grows a volume; initiators see CAPACITY DATA HAS CHANGED.
    Resize {
        /// Volume name.
        name: String,
        /// New size (larger).
        size: String,
    },
    /// Moves a volume (with the rest of its target) to another in-sync replica: the
    /// primary drains, releases its lease and hands over; initiators reconnect.
    Move {
        /// Volume name.
        name: String,
        /// Destination node (an in-sync replica).
        #[arg(value_name = "NODE")]
        to: String,
    },
    /// Deletes a volume that no target maps, with its data.
    Delete {
        /// Volume name.
        name: String,
        /// Delete its snapshots too (a volume with snapshots is refused otherwise).
        #[arg(long)]
        with_snapshots: bool,
    },
    /// Adds, removes or replaces a replica of the volume (and of every other volume of
    /// its target: a target's volumes share their nodes).
    Replicas {
        /// Volume name.
        name: String,
        #[command(subcommand)]
        change: maintenance::ReplicaChange,
    },
    /// Compares the volume's replicas online, region by region (CRC32C of each 1 MiB
    /// region on the primary and on every in-sync replica; writes to a region wait the
    /// few milliseconds it is compared). Waits for the result; exits with status 1 when
    /// replicas differ and --repair was not given.
    Verify {
        /// Volume name.
        name: String,
        /// Resync the differing regions from the primary.
        #[arg(long)]
        repair: bool,
        /// Start it and return; `bulwark status` shows its progress and result.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TargetCmd {
    /// Creates an iSCSI target.
    Create {
        /// IQN, like iqn.2026-11.com.example:storage.
        iqn: String,
        /// TargetAlias.
        #[arg(long)]
        alias: Option<String>,
    },
    /// Lists targets.
    List,
    /// Deletes a target (its volumes stay).
    Delete {
        /// IQN.
        iqn: String,
    },
    /// Gives a target a virtual IP that follows its primary (added to INTERFACE of the
    /// serving node, announced by gratuitous ARP, with a portal on port 3260), for
    /// initiators without multipath.
    AddVip {
        /// IQN.
        iqn: String,
        /// ADDRESS/PREFIX, like 198.18.0.100/24.
        address: String,
        /// The interface it goes on (same name on every storage node).
        #[arg(long)]
        interface: String,
    },
    /// Takes a virtual IP from a target; the serving node removes it.
    RemoveVip {
        /// IQN.
        iqn: String,
        /// The address.
        address: std::net::IpAddr,
    },
    /// Lets any initiator log in to the target while no ACL entry and no CHAP binding
    /// says who may (a new target admits nobody). Same as `settings IQN --allow-any on`.
    AllowAny {
        /// IQN.
        iqn: String,
    },
    /// Who may log in without an ACL entry, and whether initiators may reset the whole
    /// target.
    Settings {
        /// IQN.
        iqn: String,
        /// on: admit any initiator while neither ACL nor CHAP says who; off: admit
        /// only those (the default).
        #[arg(long, value_parser = ["on", "off"])]
        allow_any: Option<String>,
        /// on: TARGET WARM/COLD RESET from an initiator is carried out (it ends every
        /// session of the target on every node); off: refused (the default, as LIO).
        #[arg(long, value_parser = ["on", "off"])]
        allow_target_reset: Option<String>,
    },
    /// How the target's ports on in-sync nodes other than the primary serve I/O:
    /// `non-optimized` (the default: active/non-optimized, every command forwarded to
    /// the primary) or `standby` (only management commands; multipath uses them once
    /// they become the primary).
    Paths {
        /// IQN.
        iqn: String,
        /// non-optimized or standby.
        #[arg(value_parser = ["non-optimized", "standby"])]
        mode: String,
    },
}

/// Parses ADDRESS/PREFIX.
fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8)> {
    let (a, p) = s.split_once('/').with_context(|| {
        format!("{s:?}: write the address with its prefix, like 198.18.0.100/24")
    })?;
    let address = a
        .parse()
        .with_context(|| format!("{a:?} is not an IP address"))?;
    let prefix = p
        .parse()
        .with_context(|| format!("{p:?} is not a prefix length"))?;
    Ok((address, prefix))
}

#[derive(Subcommand, Debug)]
pub enum LunCmd {
    /// Maps a volume, or a snapshot read-only (VOLUME@SNAPSHOT --read-only), as a LUN
    /// of a target; live sessions see REPORTED LUNS DATA HAS CHANGED.
    Add {
        /// Target IQN.
        iqn: String,
        /// Volume name, or VOLUME@SNAPSHOT for a snapshot (with --read-only).
        volume: String,
        /// LUN number (default: the lowest free).
        #[arg(long)]
        lun: Option<u64>,
        /// Export read-only: writes fail with DATA PROTECT. Snapshots only (a
        /// snapshot never changes); a volume is always exported writable.
        #[arg(long)]
        read_only: bool,
    },
    /// Unmaps a LUN.
    Remove {
        /// Target IQN.
        iqn: String,
        /// LUN number.
        lun: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum AclCmd {
    /// Allows an initiator on a target (a target with no entries allows every initiator).
    Add {
        /// Target IQN.
        iqn: String,
        /// Initiator IQN.
        initiator: String,
    },
    /// Removes an initiator from a target's ACL.
    Remove {
        /// Target IQN.
        iqn: String,
        /// Initiator IQN.
        initiator: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ChapCmd {
    /// Defines a CHAP account (then bind it to targets).
    Add {
        /// User name the initiator logs in with.
        user: String,
        /// Initiator secret, 12 to 255 characters (or BULWARK_CHAP_SECRET).
        #[arg(long, env = "BULWARK_CHAP_SECRET", hide_env_values = true)]
        secret: String,
        /// For mutual CHAP: the name the target answers with.
        #[arg(long, requires = "mutual_secret")]
        mutual_user: Option<String>,
        /// For mutual CHAP: the target's secret.
        #[arg(long, requires = "mutual_user")]
        mutual_secret: Option<String>,
    },
    /// Lists accounts (without secrets) and the targets they are bound to.
    List {
        /// Show the secrets too (admin token or node certificate).
        #[arg(long)]
        show_secrets: bool,
    },
    /// Deletes an account that no target uses.
    Remove {
        /// User name.
        user: String,
    },
    /// Requires the account on a target.
    Bind {
        /// User name.
        user: String,
        /// Target IQN.
        iqn: String,
    },
    /// Unbinds the account from a target.
    Unbind {
        /// User name.
        user: String,
        /// Target IQN.
        iqn: String,
    },
}

/// Turns a CLI command into the cluster command it commits. Pure, so every command's
/// validation can be tested without a cluster.
pub fn volume_command(cmd: &VolumeCmd) -> Result<Option<Command>> {
    Ok(match cmd {
        VolumeCmd::Create {
            from_snapshot: Some(from),
            name,
            ..
        } => {
            let (volume, snapshot) = from
                .split_once('@')
                .ok_or_else(|| anyhow!("--from-snapshot takes VOLUME@SNAPSHOT, not {from:?}"))?;
            Some(Command::CloneSnapshot {
                name: name.clone(),
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            })
        }
        VolumeCmd::Create {
            name,
            size,
            replicas,
            block_size,
            physical_block_size,
            on,
            ..
        } => {
            let size = size
                .as_deref()
                .ok_or_else(|| anyhow!("give the volume's size, like 10GiB"))?;
            if !on.is_empty() && on.len() > usize::from(*replicas) {
                bail!(
                    "--on names {} nodes but --replicas is {replicas}; name at most one node per replica",
                    on.len()
                );
            }
            Some(Command::CreateVolume {
                name: name.clone(),
                size_bytes: parse_size(size)?,
                replicas: *replicas,
                block_size: *block_size,
                physical_block_size: *physical_block_size,
                nodes: on.clone(),
            })
        }
        VolumeCmd::Resize { name, size } => Some(Command::ResizeVolume {
            name: name.clone(),
            size_bytes: parse_size(size)?,
        }),
        VolumeCmd::Delete {
            name,
            with_snapshots,
        } => Some(Command::DeleteVolume {
            name: name.clone(),
            with_snapshots: *with_snapshots,
        }),
        VolumeCmd::Move { name, to } => Some(Command::MoveVolume {
            volume: name.clone(),
            node: to.clone(),
        }),
        VolumeCmd::Verify { name, repair, .. } => Some(Command::StartVerify {
            volume: name.clone(),
            repair: *repair,
        }),
        VolumeCmd::List | VolumeCmd::Replicas { .. } => None,
    })
}

pub(crate) async fn commit(conn: &Conn, cmd: Command) -> Result<Applied> {
    let client = conn.client()?;
    match client.write(cmd).await? {
        Ok(a) => Ok(a),
        Err(refused) => Err(anyhow!("refused: {refused}")),
    }
}

/// "10m", "90s", "1h", "500ms", or "off" (0).
pub fn parse_duration_ms(s: &str) -> Result<u64> {
    let t = s.trim();
    if t == "off" || t == "0" {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| anyhow!("{t:?} has no unit: write it like 90s, 10m or 1h, or off"))?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow!("{t:?} must start with a number, like 10m"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("unknown unit {unit:?} in {t:?}: use ms, s, m, h or d"),
    };
    n.checked_mul(ms)
        .ok_or_else(|| anyhow!("{t:?} is too long"))
}

fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{} h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{} min", ms / 60_000),
        ms => format!("{} s", ms / 1000),
    }
}

pub(crate) fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn done(conn: &Conn, applied: &Applied, text: String) -> Result<()> {
    if conn.json {
        print_json(applied)
    } else {
        println!("{text}");
        Ok(())
    }
}

pub use cluster::state::human;

pub(crate) fn names(st: &ClusterState, ids: &[NodeId]) -> String {
    ids.iter()
        .map(|id| {
            st.nodes
                .get(id)
                .map(|n| n.name.clone())
                .unwrap_or_else(|| format!("#{id}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn node(conn: &Conn, cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::List => {
            let (st, statuses) = conn.client()?.cluster_status().await?;
            if conn.json {
                return print_json(&serde_json::json!({ "nodes": st.nodes, "status": statuses }));
            }
            let mut out = String::new();
            render_nodes(&mut out, &st, &statuses);
            print!("{out}");
            Ok(())
        }
        NodeCmd::Remove { name, dead, yes } => {
            if dead {
                return maintenance::remove_dead(conn, &name, yes).await;
            }
            let a = commit(
                conn,
                Command::RemoveNode {
                    name: name.clone(),
                    dead: false,
                },
            )
            .await?;
            done(
                conn,
                &a,
                format!("node {name} removed; it leaves the Raft membership and stops serving"),
            )
        }
        NodeCmd::Drain {
            name,
            evacuate,
            no_wait,
        } => maintenance::drain(conn, &name, evacuate, no_wait).await,
        NodeCmd::Undrain { name } => maintenance::undrain(conn, &name).await,
        NodeCmd::Zone { name, zone } => {
            let a = commit(
                conn,
                Command::SetNodeZone {
                    name: name.clone(),
                    zone: (!zone.is_empty()).then(|| zone.clone()),
                },
            )
            .await?;
            let text = if zone.is_empty() {
                format!("node {name} is in no zone")
            } else {
                format!("node {name} is in zone {zone}; new replicas of a volume go to different zones where the nodes allow")
            };
            done(conn, &a, text)
        }
    }
}

pub async fn volume(conn: &Conn, cmd: VolumeCmd) -> Result<()> {
    if let VolumeCmd::Replicas { name, change } = cmd {
        return maintenance::replicas(conn, &name, change).await;
    }
    let Some(c) = volume_command(&cmd)? else {
        let (st, statuses) = conn.client()?.cluster_status().await?;
        if conn.json {
            return print_json(&st.volumes);
        }
        let mut out = String::new();
        render_volumes(&mut out, &st, &statuses);
        print!("{out}");
        return Ok(());
    };
    let started = std::time::Instant::now();
    let a = commit(conn, c).await?;
    if let VolumeCmd::Verify {
        name,
        repair,
        no_wait,
    } = &cmd
    {
        return verify_wait(conn, name, *repair, *no_wait).await;
    }
    if let VolumeCmd::Move { name, to: node } = &cmd {
        // Wait for the handover so the command reports its outcome.
        let client = conn.client()?;
        loop {
            let (st, statuses) = client.cluster_status().await?;
            let v = st
                .volumes
                .get(name)
                .ok_or_else(|| anyhow!("volume {name} disappeared"))?;
            // Done when the new primary says it serves (sealed and leased), not merely
            // when the cluster has named it.
            let serving = statuses.get(&v.primary).is_some_and(|s| {
                s.as_ref().is_ok_and(|s| {
                    s.volumes
                        .iter()
                        .any(|x| &x.name == name && x.role == "primary" && x.serving)
                })
            });
            if serving && st.nodes.get(&v.primary).is_some_and(|n| &n.name == node) {
                return done(
                    conn,
                    &a,
                    format!(
                        "volume {name} is primary on {node} (epoch {}), handed over in {} ms",
                        v.epoch,
                        started.elapsed().as_millis()
                    ),
                );
            }
            let named = st.nodes.get(&v.primary).is_some_and(|n| &n.name == node);
            if v.moving_to.is_none() && !named {
                bail!("the move of {name} did not happen (the destination fell out of sync, or a failover intervened): see `bulwark status`");
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!("volume {name} has not moved within 15 s; see `bulwark status`");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let text = match (&cmd, &a) {
        (VolumeCmd::Create { name, .. }, Applied::VolumeCreated(placement)) => {
            let st = conn.client()?.state().await?;
            let from = st
                .volumes
                .get(name)
                .and_then(|v| v.origin.as_ref())
                .map_or(String::new(), |o| {
                    format!(" from {}@{}", o.volume, o.snapshot)
                });
            format!(
                "volume {name} ({}){from} created on {}; primary {}",
                st.volumes
                    .get(name)
                    .map_or("?".into(), |v| human(v.size_bytes)),
                names(&st, placement),
                names(&st, &placement[..1])
            )
        }
        (VolumeCmd::Resize { name, size }, _) => format!("volume {name} is now {size}"),
        (VolumeCmd::Delete { name, .. }, _) => format!("volume {name} deleted"),
        _ => "done".into(),
    };
    done(conn, &a, text)
}

pub async fn target(conn: &Conn, cmd: TargetCmd) -> Result<()> {
    let (c, text) = match cmd {
        TargetCmd::List => {
            let (st, statuses) = conn.client()?.cluster_status().await?;
            if conn.json {
                return print_json(&st.targets);
            }
            let mut out = String::new();
            render_targets(&mut out, &st, &statuses);
            print!("{out}");
            return Ok(());
        }
        TargetCmd::Create { iqn, alias } => (
            Command::CreateTarget {
                iqn: iqn.clone(),
                alias,
            },
            format!("target {iqn} created; it admits no initiator until you run `bulwark acl add {iqn} INITIATOR`, `bulwark chap bind USER {iqn}` or `bulwark target allow-any {iqn}`; map volumes with `bulwark lun add {iqn} VOLUME`"),
        ),
        TargetCmd::Delete { iqn } => (
            Command::DeleteTarget { iqn: iqn.clone() },
            format!("target {iqn} deleted"),
        ),
        TargetCmd::AddVip {
            iqn,
            address,
            interface,
        } => {
            let (address, prefix) = parse_cidr(&address)?;
            (
                Command::AddVip {
                    iqn: iqn.clone(),
                    vip: cluster::state::VirtualIp {
                        address,
                        prefix,
                        interface: interface.clone(),
                    },
                },
                format!("{address}/{prefix} on {interface} follows the primary of {iqn}; portal {address}:3260"),
            )
        }
        TargetCmd::RemoveVip { iqn, address } => (
            Command::RemoveVip {
                iqn: iqn.clone(),
                address,
            },
            format!("{address} removed from {iqn}"),
        ),
        TargetCmd::AllowAny { iqn } => (
            Command::SetTargetAccess {
                iqn: iqn.clone(),
                allow_any: Some(true),
                allow_target_reset: None,
            },
            format!(
                "{iqn} admits any initiator while it has no ACL entry and no CHAP binding (`bulwark target settings {iqn} --allow-any off` undoes it)"
            ),
        ),
        TargetCmd::Settings {
            iqn,
            allow_any,
            allow_target_reset,
        } => {
            if allow_any.is_none() && allow_target_reset.is_none() {
                bail!("nothing to change: give --allow-any and/or --allow-target-reset");
            }
            let on = |v: &Option<String>| v.as_deref().map(|v| v == "on");
            (
                Command::SetTargetAccess {
                    iqn: iqn.clone(),
                    allow_any: on(&allow_any),
                    allow_target_reset: on(&allow_target_reset),
                },
                format!("settings of {iqn} changed"),
            )
        }
        TargetCmd::Paths { iqn, mode } => (
            Command::SetTargetPaths {
                iqn: iqn.clone(),
                standby: mode == "standby",
            },
            format!(
                "ports of {iqn} on the other in-sync nodes are now {}",
                if mode == "standby" {
                    "standby"
                } else {
                    "active/non-optimized"
                }
            ),
        ),
    };
    let a = commit(conn, c).await?;
    done(conn, &a, text)
}

pub async fn lun(conn: &Conn, cmd: LunCmd) -> Result<()> {
    let (c, text) = match cmd {
        LunCmd::Add {
            iqn,
            volume,
            lun,
            read_only,
        } => {
            let text = match (cluster::state::lun_backing(&volume), read_only) {
                ((v, Some(s)), true) => format!("snapshot {s} of {v} mapped read-only to {iqn}"),
                ((_, Some(_)), false) => bail!(
                    "{volume} is a snapshot, which is exported read-only: add --read-only"
                ),
                ((_, None), true) => bail!(
                    "a volume is exported writable; to export it read-only, take a snapshot (`bulwark snapshot create {volume} NAME`) and add {volume}@NAME --read-only"
                ),
                ((_, None), false) => format!("volume {volume} mapped to {iqn}"),
            };
            (
                Command::AddLun {
                    iqn: iqn.clone(),
                    lun,
                    volume: volume.clone(),
                },
                text,
            )
        }
        LunCmd::Remove { iqn, lun } => (
            Command::RemoveLun {
                iqn: iqn.clone(),
                lun,
            },
            format!("LUN {lun} removed from {iqn}"),
        ),
    };
    let a = commit(conn, c).await?;
    let text = match a {
        Applied::LunAdded(l) => format!("{text} as LUN {l}"),
        _ => text,
    };
    done(conn, &a, text)
}

pub async fn acl(conn: &Conn, cmd: AclCmd) -> Result<()> {
    let (c, text) = match cmd {
        AclCmd::Add { iqn, initiator } => (
            Command::AddAcl {
                iqn: iqn.clone(),
                initiator: initiator.clone(),
            },
            format!("{initiator} may log in to {iqn}"),
        ),
        AclCmd::Remove { iqn, initiator } => (
            Command::RemoveAcl {
                iqn: iqn.clone(),
                initiator: initiator.clone(),
            },
            format!("{initiator} removed from the ACL of {iqn}"),
        ),
    };
    let a = commit(conn, c).await?;
    done(conn, &a, text)
}

pub async fn chap(conn: &Conn, cmd: ChapCmd) -> Result<()> {
    let (c, text) = match cmd {
        ChapCmd::List { show_secrets } => {
            let client = conn.client()?;
            let st = if show_secrets {
                client.state_with_secrets().await?
            } else {
                client.state().await?
            };
            let rows: Vec<serde_json::Value> = st
                .chap
                .values()
                .map(|a| {
                    let bound: Vec<&String> = st
                        .targets
                        .values()
                        .filter(|t| t.chap.contains(&a.user))
                        .map(|t| &t.iqn)
                        .collect();
                    let mut row = serde_json::json!({
                        "user": a.user,
                        "mutual_user": a.mutual.as_ref().map(|m| &m.0),
                        "targets": bound,
                    });
                    if show_secrets {
                        row["secret"] = a.secret.clone().into();
                        row["mutual_secret"] = a.mutual.as_ref().map(|m| m.1.clone()).into();
                    }
                    row
                })
                .collect();
            if conn.json {
                return print_json(&rows);
            }
            if rows.is_empty() {
                println!("no CHAP accounts");
            }
            for r in rows {
                println!(
                    "{}  mutual: {}  targets: {}{}",
                    r["user"].as_str().unwrap_or(""),
                    r["mutual_user"].as_str().unwrap_or("no"),
                    r["targets"],
                    match (r["secret"].as_str(), r["mutual_secret"].as_str()) {
                        (Some(s), Some(m)) => format!("  secret: {s}  mutual secret: {m}"),
                        (Some(s), None) => format!("  secret: {s}"),
                        _ => String::new(),
                    }
                );
            }
            return Ok(());
        }
        ChapCmd::Add {
            user,
            secret,
            mutual_user,
            mutual_secret,
        } => (
            Command::AddChap {
                account: ChapAccount {
                    user: user.clone(),
                    secret,
                    mutual: mutual_user.zip(mutual_secret),
                },
            },
            format!("CHAP account {user} defined; bind it with `bulwark chap bind {user} IQN`"),
        ),
        ChapCmd::Remove { user } => (
            Command::RemoveChap { user: user.clone() },
            format!("CHAP account {user} removed"),
        ),
        ChapCmd::Bind { user, iqn } => (
            Command::BindChap {
                user: user.clone(),
                iqn: iqn.clone(),
            },
            format!("{iqn} now requires CHAP; {user} may log in"),
        ),
        ChapCmd::Unbind { user, iqn } => (
            Command::UnbindChap {
                user: user.clone(),
                iqn: iqn.clone(),
            },
            format!("{user} unbound from {iqn}"),
        ),
    };
    let a = commit(conn, c).await?;
    done(conn, &a, text)
}

/// `bulwark cluster settings`: shows the settings, or changes the ones given.
/// Changes to the cluster-wide settings (`None`: unchanged).
pub struct SettingsChange {
    pub heartbeat_interval_ms: Option<u64>,
    pub failure_timeout_ms: Option<u64>,
    pub resync_rate: Option<u64>,
    pub rebuild_rate: Option<u64>,
    /// 0 turns automatic replacement off.
    pub replace_after_ms: Option<u64>,
    /// "" removes the fence command.
    pub fence_command: Option<String>,
    pub fence_timeout_ms: Option<u64>,
}

pub async fn settings(conn: &Conn, change: SettingsChange) -> Result<()> {
    let client = conn.client()?;
    let mut settings = client.state().await?.settings;
    let before = settings.clone();
    if let Some(v) = change.heartbeat_interval_ms {
        settings.heartbeat_interval_ms = v;
    }
    if let Some(v) = change.failure_timeout_ms {
        settings.failure_timeout_ms = v;
    }
    if let Some(v) = change.resync_rate {
        settings.resync_rate_bytes_per_s = v;
    }
    if let Some(v) = change.rebuild_rate {
        settings.rebuild_rate_bytes_per_s = v;
    }
    if let Some(v) = change.replace_after_ms {
        settings.replace_after_ms = v;
    }
    if let Some(v) = change.fence_command {
        settings.fence_command = (!v.is_empty()).then_some(v);
    }
    if let Some(v) = change.fence_timeout_ms {
        settings.fence_timeout_ms = v;
    }
    if settings != before {
        let cmd = Command::SetSettings {
            settings: settings.clone(),
        };
        if let Err(refused) = client.write(cmd).await? {
            bail!("refused: {refused}");
        }
    }
    if conn.json {
        return print_json(&settings);
    }
    println!("heartbeat interval: {} ms", settings.heartbeat_interval_ms);
    println!("failure timeout:    {} ms", settings.failure_timeout_ms);
    match settings.resync_rate_bytes_per_s {
        0 => println!("resync rate:        unlimited (per replica)"),
        r => println!("resync rate:        {}/s per replica", human(r)),
    }
    match settings.rebuild_rate_bytes_per_s {
        0 => println!("rebuild rate:       unlimited (per new replica; application I/O first)"),
        r => println!("rebuild rate:       {}/s per new replica", human(r)),
    }
    match settings.replace_after_ms {
        0 => println!("replace after:      off (replicas of an offline node are never rebuilt elsewhere on their own)"),
        ms => println!(
            "replace after:      {} (replicas of a node offline that long are rebuilt on other nodes)",
            human_ms(ms)
        ),
    }
    match &settings.fence_command {
        Some(c) => println!(
            "fence command:      {c} (timeout {} s)",
            settings.fence_timeout_ms / 1000
        ),
        None => println!("fence command:      none (the lease alone decides)"),
    }
    Ok(())
}

/// Initiator settings for a cluster with `settings`: iscsid.conf and multipath.conf,
/// each value with the reason for it. Pure, so it is tested without a cluster; the
/// kernel-initiator harness (`scripts/e2e/kernel-initiator.sh`) loads it into a real
/// open-iscsi and multipathd and fails on any line they reject.
pub fn initiator_config(settings: &cluster::state::Settings) -> String {
    // The longest an unplanned failover keeps I/O waiting: the primary is declared
    // failed, its lease runs out, the successor seals. Planned moves take ~40 ms.
    let failover_ms = settings.failure_timeout_ms + cluster::node::LEASE.as_millis() as u64 + 1000;
    let failover_s = failover_ms.div_ceil(1000);
    // Without multipath (one session, or a virtual IP), iSCSI recovery must outlast a
    // failover several times over, so a failover never fails I/O.
    let replacement = (4 * failover_s).max(15);
    // multipathd checks every path this often (seconds).
    const POLLING: u64 = 1;
    // With multipath, a path whose session is down fails over to another path group
    // after this long; the new primary's group is ready by then.
    const FAST_IO_FAIL: u64 = 1;
    let no_path_retry = (2 * replacement).div_ceil(POLLING).max(6);
    format!(
        r#"# Initiator settings for this Bulwark cluster (bulwark initiator-config).
# An unplanned failover keeps I/O waiting up to about {failover_s} s (failure timeout
# {ft} ms, lease {lease} ms, then the new primary seals); a planned move ~40 ms.

# --- open-iscsi: /etc/iscsi/iscsid.conf (new sessions), or for existing ones:
#     iscsiadm -m node -T IQN -o update -n NAME -v VALUE
# Session recovery waits this long for the target to come back before failing I/O up
# to the SCSI layer: {replacement} s outlasts a failover several times, for initiators
# without multipath (with multipath, multipathd's fast_io_fail_tmo below replaces it).
node.session.timeo.replacement_timeout = {replacement}
# A NOP-Out every second, answered within 2 s, finds a connection to a node that hung
# or vanished without closing it (a node that stops or steps down closes its sessions
# itself, and a killed node's kernel resets them).
node.conn[0].timeo.noop_out_interval = 1
node.conn[0].timeo.noop_out_timeout = 2
# Logins to a node that is just taking over are answered within a second; 5 s leaves
# room for a busy network without stalling reconnects.
node.conn[0].timeo.login_timeout = 5
node.session.initial_login_retry_max = 8
# Log in again at boot.
node.startup = automatic

# --- Linux's ALUA handler: /etc/modprobe.d/bulwark-alua.conf (and, before logging in,
#     echo 1 > /sys/module/scsi_dh_alua/parameters/optimize_stpg)
# Without it, switching to an active/non-optimized path group sends SET TARGET PORT
# GROUPS, which Bulwark takes as a request to move the target there: a dead node's
# path fails over into a move request while the failover is under way, and a returning
# path moves the target back and forth. A non-optimized path forwards to the primary,
# and the primary's group turns active/optimized by itself.
options scsi_dh_alua optimize_stpg=1

# --- dm-multipath: /etc/multipath.conf
defaults {{
    # Check every path each second (the default is 5), and keep checking them that
    # often when nothing changes (multipathd otherwise stretches a quiet path's checks
    # to 4 intervals): a path back, or an access state changed by a move, is taken
    # into use within a second. The checks are a TEST UNIT READY and a REPORT TARGET
    # PORT GROUPS per path.
    polling_interval {POLLING}
    max_polling_interval {POLLING}
}}
devices {{
    device {{
        # As Bulwark reports itself in INQUIRY.
        vendor "BULWARK"
        product "VOLUME"
        # Implicit ALUA: the target says which path is active/optimized.
        hardware_handler "1 alua"
        prio alua
        # One path group per ALUA state; I/O goes to the best group.
        path_grouping_policy group_by_prio
        # Back to the optimized path as soon as it returns.
        failback immediate
        # TEST UNIT READY tells a standby or transitioning path from a dead one.
        path_checker tur
        # multipathd sets this as the iSCSI session's recovery timeout (its default, 5,
        # would hold I/O on a dead node's path for 5 s): after {FAST_IO_FAIL} s the I/O goes to
        # the other path group, whose node is primary by then, or queues below.
        fast_io_fail_tmo {FAST_IO_FAIL}
        # With no path up, queue for {no_path_retry} checks ({queue_s} s, twice the
        # replacement timeout) before failing I/O: a failover never fails a write, and a
        # cluster that is really gone does not hang applications forever.
        no_path_retry {no_path_retry}
    }}
}}
# dev_loss_tmo is left alone: it applies to FC and SAS remote ports, not to iSCSI
# sessions. Volumes are told apart by the NAA identifier of VPD page 0x83 (the same on
# every node and after every failover), so the default uid settings need no change.
"#,
        ft = settings.failure_timeout_ms,
        lease = cluster::node::LEASE.as_millis(),
        queue_s = no_path_retry * POLLING,
    )
}

/// Verify `id` of volume `v` as its primary reports it while running.
fn live_verify(
    statuses: &Statuses,
    v: &cluster::state::Volume,
    id: u64,
) -> Option<cluster::status::VerifyView> {
    statuses
        .get(&v.primary)
        .and_then(|s| s.as_ref().ok())
        .and_then(|s| s.volumes.iter().find(|x| x.name == v.name))
        .and_then(|x| x.verify.clone())
        .filter(|x| x.id == id)
}

/// Waits for the verify just asked for and reports it.
async fn verify_wait(conn: &Conn, name: &str, repair: bool, no_wait: bool) -> Result<()> {
    let client = conn.client()?;
    let id = client
        .state()
        .await?
        .volumes
        .get(name)
        .and_then(|v| v.verify.as_ref())
        .map(|x| x.id)
        .ok_or_else(|| anyhow!("volume {name} has no verify request; see `bulwark status`"))?;
    if no_wait {
        if conn.json {
            return print_json(&serde_json::json!({ "volume": name, "verify": id }));
        }
        println!("verify {id} of {name} started; `bulwark status` shows its progress and result");
        return Ok(());
    }
    let mut last_print = std::time::Instant::now();
    loop {
        let (st, statuses) = client.cluster_status().await?;
        let v = st
            .volumes
            .get(name)
            .ok_or_else(|| anyhow!("volume {name} disappeared"))?;
        let Some(asked) = v.verify.as_ref().filter(|x| x.id >= id) else {
            bail!("the verify of {name} was cleared; see `bulwark status`");
        };
        if asked.id != id {
            bail!(
                "another verify of {name} was asked for (number {}); it replaces this one",
                asked.id
            );
        }
        if let Some(r) = &asked.result {
            if conn.json {
                print_json(r)?;
            } else {
                println!("verify of {name}: {}", r.summary(&st, repair));
            }
            if r.differs() && !repair {
                bail!("replicas of {name} differ; `bulwark volume verify {name} --repair` resyncs those regions from the primary");
            }
            return Ok(());
        }
        if last_print.elapsed() >= Duration::from_secs(2) && !conn.json {
            last_print = std::time::Instant::now();
            let live = live_verify(&statuses, v, id);
            match live {
                Some(x) => eprintln!(
                    "verify of {name}: {} of {} regions compared, {} differing so far",
                    x.compared, x.regions, x.differing
                ),
                None => eprintln!("verify of {name}: waiting for the primary to start it"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) type Statuses = BTreeMap<NodeId, Result<NodeStatus, String>>;

/// `HH:MM:SS.mmm` UTC.
pub(crate) fn format_time(unix_ms: u64) -> String {
    let s = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        unix_ms % 1000
    )
}

/// Bytes the file system holding `dir` offers (its total size).
pub fn filesystem_capacity(dir: &Path) -> Result<u64> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let s = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(s.f_blocks.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_addresses() {
        assert_eq!(
            parse_control("10.0.0.5").unwrap().to_string(),
            "10.0.0.5:3261"
        );
        assert_eq!(parse_control("10.0.0.5:7000").unwrap().port(), 7000);
        assert_eq!(parse_control("[::1]").unwrap().port(), 3261);
        assert!(parse_control("node-a").is_err());
    }

    #[test]
    fn volume_commands_validate_their_arguments() {
        let create = |size: &str, replicas: u8, on: &[&str]| {
            volume_command(&VolumeCmd::Create {
                name: "v".into(),
                size: Some(size.into()),
                from_snapshot: None,
                replicas,
                block_size: 512,
                physical_block_size: None,
                on: on.iter().map(|s| s.to_string()).collect(),
            })
        };
        assert!(matches!(
            create("1GiB", 2, &[]).unwrap(),
            Some(Command::CreateVolume { size_bytes, .. }) if size_bytes == 1 << 30
        ));
        let e = create("ten gigs", 2, &[]).unwrap_err().to_string();
        assert!(e.contains("must start with a number"), "{e}");
        let e = create("1GiB", 1, &["a", "b"]).unwrap_err().to_string();
        assert!(e.contains("--on names 2 nodes but --replicas is 1"), "{e}");
        let e = volume_command(&VolumeCmd::Resize {
            name: "v".into(),
            size: "5XB".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown unit"), "{e}");
        assert!(volume_command(&VolumeCmd::List).unwrap().is_none());
        let clone = |from: &str| {
            volume_command(&VolumeCmd::Create {
                name: "c".into(),
                size: None,
                from_snapshot: Some(from.into()),
                replicas: 2,
                block_size: 512,
                physical_block_size: None,
                on: vec![],
            })
        };
        assert!(matches!(
            clone("v@s").unwrap(),
            Some(Command::CloneSnapshot { volume, snapshot, .. }) if volume == "v" && snapshot == "s"
        ));
        let e = clone("v").unwrap_err().to_string();
        assert!(e.contains("VOLUME@SNAPSHOT"), "{e}");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1 << 30), "1.0 GiB");
        assert_eq!(format_time(3_723_004), "01:02:03.004Z");
    }
}

#[cfg(test)]
mod initiator_config_tests {
    use super::*;

    fn value(text: &str, key: &str) -> u64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("{key} missing"));
        line.rsplit([' ', '=']).next().unwrap().parse().unwrap()
    }

    #[test]
    fn initiator_settings_follow_the_failover_time_and_the_inquiry_data() {
        let default = cluster::state::Settings::default();
        let text = initiator_config(&default);
        // 800 ms detection + 800 ms lease + seal: about 3 s; recovery outlasts it.
        assert_eq!(value(&text, "node.session.timeo.replacement_timeout"), 15);
        assert_eq!(value(&text, "no_path_retry"), 30);
        assert_eq!(value(&text, "fast_io_fail_tmo"), 1);
        assert!(text.contains("\noptions scsi_dh_alua optimize_stpg=1\n"));
        // multipathd accepts polling_interval only in the defaults section.
        let defaults = text.split("devices {").next().unwrap();
        assert!(defaults.contains("defaults {") && defaults.contains("\n    polling_interval 1\n"));
        assert!(defaults.contains("\n    max_polling_interval 1\n"));
        assert!(!text
            .split("devices {")
            .nth(1)
            .unwrap()
            .contains("polling_interval"));
        for want in [
            "hardware_handler \"1 alua\"",
            "prio alua",
            "group_by_prio",
            "failback immediate",
        ] {
            assert!(text.contains(want), "{want}");
        }
        // multipath matches devices by what INQUIRY reports.
        let lu = scsi::LuConfig::default();
        assert!(text.contains(&format!("vendor \"{}\"", lu.vendor)));
        assert!(text.contains(&format!("product \"{}\"", lu.product)));

        // A cluster tuned for slow networks gets longer timeouts.
        let slow = cluster::state::Settings {
            failure_timeout_ms: 10_000,
            ..default
        };
        let text = initiator_config(&slow);
        assert_eq!(value(&text, "node.session.timeo.replacement_timeout"), 48);
        assert_eq!(value(&text, "no_path_retry"), 96);
        // Every setting has its reason on the lines above it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim();
            let setting = !t.is_empty() && !t.starts_with('#') && !t.ends_with('{') && t != "}";
            if setting {
                let reason = lines[..i]
                    .iter()
                    .rev()
                    .map(|l| l.trim())
                    .find(|l| l.starts_with('#') || l.ends_with('{') || l.is_empty());
                assert!(
                    reason.is_some_and(|r| r.starts_with('#')),
                    "no comment above {t:?}"
                );
            }
        }
    }
}

/// `bulwark alert ...`.
#[derive(Subcommand)]
pub enum AlertCmd {
    /// Adds an alert (or replaces the one of that name): a program that gets each event
    /// as JSON on stdin, or a URL the event is POSTed to. Each event reaches each alert
    /// from one node (see examples/alerts/sendmail-alert).
    Add {
        /// Alert name.
        name: String,
        /// Absolute path of the program; it must exist on every node (alerts are
        /// delivered by whichever node saw the event, or the leader).
        #[arg(long, conflicts_with = "url", required_unless_present = "url")]
        program: Option<String>,
        /// http:// or https:// URL.
        #[arg(long)]
        url: Option<String>,
        /// Only these event kinds (comma-separated; default: all; --help lists them).
        #[arg(long, value_delimiter = ',', value_parser = parse_event_kind, long_help = event_kinds_help())]
        events: Vec<EventKind>,
        /// A delivery that takes longer is killed (program) or abandoned (URL).
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Further attempts after a failed delivery (1, 2, 4 ... s apart).
        #[arg(long, default_value_t = 3)]
        retries: u32,
    },
    /// Lists alerts.
    List,
    /// Removes an alert.
    Remove {
        /// Alert name.
        name: String,
    },
    /// Sends the alert a test event (kind alert_test) and reports the delivery.
    Test {
        /// Alert name.
        name: String,
    },
}

pub async fn alert(conn: &Conn, cmd: AlertCmd) -> Result<()> {
    let (c, text) = match cmd {
        AlertCmd::List => {
            let st = conn.client()?.state().await?;
            if conn.json {
                return print_json(&st.alerts.values().collect::<Vec<_>>());
            }
            if st.alerts.is_empty() {
                println!("no alerts; `bulwark alert add NAME --program PATH` adds one");
            }
            for a in st.alerts.values() {
                let to = match (&a.program, &a.url) {
                    (Some(p), _) => format!("program {p}"),
                    (_, Some(u)) => format!("POST {u}"),
                    _ => String::new(),
                };
                let events = if a.events.is_empty() {
                    "all events".to_string()
                } else {
                    a.events.join(",")
                };
                println!(
                    "{}  {to}  {events}  timeout {} ms, {} retries",
                    a.name, a.timeout_ms, a.retries
                );
            }
            return Ok(());
        }
        AlertCmd::Add {
            name,
            program,
            url,
            events,
            timeout_ms,
            retries,
        } => {
            let alert = cluster::state::Alert {
                name: name.clone(),
                program,
                url,
                events: events.iter().map(|k| k.as_str().to_string()).collect(),
                tests: 0,
                timeout_ms,
                retries,
            };
            // Refused here with the same words the cluster would use, without a round trip.
            alert.check().map_err(|e| anyhow!("bad alert: {e}"))?;
            (
                Command::SetAlert { alert },
                format!("alert {name} added; `bulwark alert test {name}` sends it a test event"),
            )
        }
        AlertCmd::Remove { name } => (
            Command::RemoveAlert { name: name.clone() },
            format!("alert {name} removed"),
        ),
        AlertCmd::Test { name } => return alert_test(conn, &name).await,
    };
    let a = commit(conn, c).await?;
    done(conn, &a, text)
}

/// Asks for a test delivery and waits (up to the alert's timeout and retries) for the
/// delivering node's report in the event log.
async fn alert_test(conn: &Conn, name: &str) -> Result<()> {
    let client = conn.client()?;
    let st = client.state().await?;
    let a = st
        .alerts
        .get(name)
        .ok_or_else(|| anyhow!("no alert named {name:?}; `bulwark alert list` shows them"))?;
    let test = a.tests + 1;
    let limit = Duration::from_millis(a.timeout_ms * u64::from(a.retries + 1))
        + Duration::from_secs(2u64.pow(a.retries.min(5)) + 10);
    commit(
        conn,
        Command::TestAlert {
            name: name.to_string(),
        },
    )
    .await?;
    println!("test event {test} sent to alert {name}; waiting for its delivery...");
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (_, statuses) = client.cluster_status().await?;
        let report = statuses
            .values()
            .filter_map(|s| s.as_ref().ok())
            .flat_map(|s| s.events.iter())
            .find(|e| {
                e.is(EventKind::Alert)
                    && e.details.get("alert").and_then(|a| a.as_str()) == Some(name)
                    && e.details.get("test").and_then(|t| t.as_u64()) == Some(test)
            })
            .cloned();
        if let Some(e) = report {
            println!("{}: {}", e.observer, e.message);
            return if e.details.get("delivered").and_then(|d| d.as_bool()) == Some(true) {
                Ok(())
            } else {
                Err(anyhow!("the test event was not delivered"))
            };
        }
        if std::time::Instant::now() > deadline {
            bail!("no delivery report within {limit:?}; see the leader's log");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `--events` of `alert add`: a kind an alert may ask for ([`EventKind`]).
fn parse_event_kind(s: &str) -> Result<EventKind, String> {
    s.parse()
}

/// The long help of `alert add --events`: every kind an alert may ask for, with its
/// meaning, from [`EventKind`] itself.
fn event_kinds_help() -> String {
    let mut help =
        String::from("Only these event kinds (comma-separated; default: all of them). Kinds:\n");
    for kind in EventKind::ALL.into_iter().filter(|k| k.subscribable()) {
        help.push_str(&format!("  {:<22} {}\n", kind.as_str(), kind.meaning()));
    }
    help
}
