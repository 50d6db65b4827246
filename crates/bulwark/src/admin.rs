//! The administration commands: each talks to one node's admin API over TLS with the
//! cluster token, prints a table for people or JSON with `--json`.

mod alert;
pub(crate) mod maintenance;
pub(crate) mod snapshot;
mod status;
mod target;
mod volume;

pub use alert::{alert, AlertCmd};
pub use status::status;
use status::{render_nodes, render_targets, render_volumes};
pub use target::{acl, chap, lun, target, AclCmd, ChapCmd, LunCmd, TargetCmd};
use volume::live_verify;
#[cfg(test)]
use volume::volume_command;
pub use volume::{volume, VolumeCmd};

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
