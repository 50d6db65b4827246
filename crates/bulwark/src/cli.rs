//! The command line: what `bulwark` and each of its subcommands take (clap), and the
//! tests that every documented invocation parses.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::parse_portal;
use crate::{admin, tokens};

#[derive(Parser)]
#[command(
    name = "bulwark",
    version,
    about = "Highly available iSCSI block storage in one binary"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Runs this node. With a cluster identity in --data-dir (from `bulwark cluster
    /// init` or `join`) it runs as a cluster member; otherwise it serves a single-node
    /// target: --config FILE, or one 1 GiB thin LUN under ./bulwark-data as
    /// iqn.2026-11.io.bulwark:default on 127.0.0.1:3260.
    Serve {
        /// TOML configuration file (see examples/bulwark.toml); single-node mode.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data folder: the cluster identity, Raft store and volume data.
        #[arg(long, env = "BULWARK_DATA_DIR", default_value = "bulwark-data")]
        data_dir: PathBuf,
        /// Portal for the default single-node target.
        #[arg(long, default_value = "127.0.0.1:3260")]
        listen: String,
        /// Run as a witness: vote in Raft, store no volume data, serve no targets.
        #[arg(long)]
        witness: bool,
        /// Volume space this node offers (default: the size of the data folder's file
        /// system).
        #[arg(long)]
        capacity: Option<String>,
        /// Take a Raft snapshot and compact the log every this many entries.
        #[arg(long, default_value_t = 1000)]
        snapshot_every: u64,
        /// Cluster member: how long a session may stay silent after a NOP-In ping
        /// before it is dropped (single-node mode: `nop_timeout_ms` in --config).
        #[arg(long, env = "BULWARK_NOP_TIMEOUT_MS", default_value_t = 15000)]
        nop_timeout_ms: u64,
        /// Cluster member: how many regions (1 MiB each) a volume's activity log may
        /// keep beyond those being written. Every region that enters the log costs a
        /// disk sync on the write path, so a log that covers the regions random writes
        /// keep coming back to saves those syncs; but after a crash up to this many
        /// more regions are resynced. Regions only ever written whole (rebuilds, resyncs)
        /// keep at most 64 of it.
        #[arg(long, env = "BULWARK_ACTIVITY_LOG_SLACK", default_value_t = replication::ACTIVITY_LOG_SLACK)]
        activity_log_slack: usize,
        /// Cluster member: where the web console and /metrics listen (HTTPS with the
        /// cluster certificate; default: the control address's IP, port 3263); "off"
        /// for no listener.
        #[arg(long, env = "BULWARK_HTTP")]
        http: Option<String>,
        /// Serve /metrics without the cluster token, for a Prometheus on a trusted
        /// network (the console and its API always need it).
        #[arg(long, env = "BULWARK_METRICS_OPEN")]
        metrics_open: bool,
        /// Cluster member: "off" sends replication and forwarded commands in the clear
        /// after the nodes have authenticated each other with their certificates, on
        /// links to nodes that set it too. Only for a dedicated back-end network;
        /// `bulwark status` shows it.
        #[arg(long, env = "BULWARK_REPLICATION_TLS", default_value = "on", value_parser = ["on", "off"])]
        replication_tls: String,
        /// Cluster member: the directory alert programs and the fence command must be
        /// in; it and they must be owned by root and writable by nobody else.
        #[arg(long, env = "BULWARK_HOOKS_DIR", default_value = cluster::hooks::DEFAULT_HOOKS_DIR)]
        hooks_dir: PathBuf,
        /// Log filter (tracing EnvFilter syntax), e.g. "info" or "target=debug". Raft's
        /// own tracing is off by default (it logs every failed heartbeat to a down peer;
        /// the event log reports liveness and leadership): add "openraft=info" to see it.
        #[arg(long, env = "BULWARK_LOG", default_value = "info,openraft=off")]
        log: String,
        /// Log lines as text, or as one JSON object per line (for journald and log
        /// shippers: `journalctl -o cat -u bulwark | jq`).
        #[arg(long, env = "BULWARK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Creates, joins or leaves a cluster.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Cluster members.
    Node {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::NodeCmd,
    },
    /// Replicated volumes.
    Volume {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::VolumeCmd,
    },
    /// Snapshots of volumes and targets: create, list, delete.
    Snapshot {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::snapshot::SnapshotCmd,
    },
    /// iSCSI targets.
    Target {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::TargetCmd,
    },
    /// LUN maps: which volume is which LUN of a target.
    Lun {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::LunCmd,
    },
    /// Initiator access lists of targets.
    Acl {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::AclCmd,
    },
    /// Alerts: a program or URL that gets every cluster event (node down, failover,
    /// resync, disk error, ...).
    Alert {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::AlertCmd,
    },
    /// CHAP accounts, shared by any number of targets.
    Chap {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::ChapCmd,
    },
    /// Prints initiator settings tuned to this cluster's failover time: open-iscsi's
    /// iscsid.conf values and a multipath.conf device section, each with its reason.
    InitiatorConfig {
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// The cluster on one screen: nodes, leader, volumes, targets, sessions, events.
    Status {
        #[command(flatten)]
        conn: admin::Conn,
        /// Refresh until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Refresh interval for --watch, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Starts a local 3-node cluster on 127.0.0.1, 127.0.0.2 and 127.0.0.3 with a demo
    /// volume and target, shows its status, and stops it all on Ctrl-C.
    Demo {
        /// Folder for the nodes' data (default: a new temporary folder, removed at exit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print the status once instead of refreshing it.
        #[arg(long)]
        no_watch: bool,
    },
    /// Prints the shell completion script for SHELL (bash, zsh, fish, elvish,
    /// powershell), e.g. `bulwark completions bash > /etc/bash_completion.d/bulwark`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Writes the manual pages (bulwark.1 and one per subcommand) into DIR.
    Man {
        /// Where the pages go (created if missing).
        dir: PathBuf,
    },
}

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
pub(crate) enum ClusterCmd {
    /// Creates a new cluster with this node as its first member; prints the token
    /// other nodes join with and administrators use.
    Init {
        #[command(flatten)]
        node: NodeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Joins this node to the cluster that SEED belongs to.
    Join {
        /// Control address of any member (port 3261 when omitted).
        seed: String,
        /// The cluster token.
        #[arg(long, env = "BULWARK_TOKEN", hide_env_values = true)]
        token: String,
        #[command(flatten)]
        node: NodeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows or changes cluster-wide settings (failure detection timing, resync rate).
    Settings {
        #[command(flatten)]
        conn: admin::Conn,
        /// Interval between heartbeats on each network, in milliseconds (20..5000).
        #[arg(long)]
        heartbeat_interval_ms: Option<u64>,
        /// A node unheard of on every network for this long is offline, in
        /// milliseconds (at least two heartbeat intervals).
        #[arg(long)]
        failure_timeout_ms: Option<u64>,
        /// Resync bandwidth per replica, e.g. 200MiB (per second); 0 is unlimited.
        /// Application I/O goes first whatever the rate.
        #[arg(long)]
        resync_rate: Option<String>,
        /// Rebuild bandwidth per new replica (a full copy), e.g. 500MiB (per second);
        /// 0 is unlimited (the default). Application I/O goes first whatever the rate.
        #[arg(long)]
        rebuild_rate: Option<String>,
        /// Rebuild the replicas of a storage node offline this long on other nodes,
        /// e.g. 10m, 1h, or "off" (default 10m; drained nodes are never replaced).
        #[arg(long)]
        replace_after: Option<String>,
        /// Program the leader runs to fence a primary that lost its lease before it
        /// promotes another node (a STONITH agent; absolute path, must exist on every
        /// node; "" removes it). It gets BULWARK_FENCE_NODE, BULWARK_FENCE_NODE_ID,
        /// BULWARK_FENCE_ADDRESS, BULWARK_FENCE_VOLUMES and BULWARK_FENCE_EPOCH; exit
        /// status 0 means fenced, anything else holds the failover back (retried).
        #[arg(long)]
        fence_command: Option<String>,
        /// How long the fence program may run, in milliseconds.
        #[arg(long)]
        fence_timeout_ms: Option<u64>,
    },
    /// Without a subcommand, prints the token `cluster init` printed, from the data
    /// folder of a node (--data-dir). With one, creates, lists or revokes API tokens:
    /// admin, viewer (read-only), metrics (/metrics only) and join (single use).
    Token {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: Option<tokens::TokenCmd>,
    },
    /// The node at --node leaves the cluster (it must hold no volumes) and stops.
    Leave {
        #[command(flatten)]
        conn: admin::Conn,
    },
}

/// Who a new node is and where it listens.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct NodeArgs {
    /// Unique node name.
    #[arg(long)]
    pub(crate) name: String,
    /// This node's address on the cluster network: control plane on port 3261, and the
    /// default for the portal (port 3260) and replication (port 3262).
    #[arg(long)]
    pub(crate) address: std::net::IpAddr,
    /// iSCSI portal, one per front-end network (repeat); default ADDRESS:3260.
    #[arg(long = "portal")]
    pub(crate) portals: Vec<String>,
    /// Replication address; default ADDRESS:3262.
    #[arg(long)]
    pub(crate) replication: Option<String>,
    /// Control-plane port.
    #[arg(long, default_value_t = admin::CONTROL_PORT)]
    pub(crate) control_port: u16,
    /// Data folder of this node.
    #[arg(long, env = "BULWARK_DATA_DIR", default_value = "bulwark-data")]
    pub(crate) data_dir: PathBuf,
}

impl NodeArgs {
    pub(crate) fn addresses(&self) -> Result<cluster::state::NodeAddresses> {
        let portals = if self.portals.is_empty() {
            vec![std::net::SocketAddr::new(self.address, 3260)]
        } else {
            self.portals
                .iter()
                .map(|p| parse_portal(p))
                .collect::<Result<Vec<_>>>()?
        };
        let replication = match &self.replication {
            Some(r) => r.parse().with_context(|| {
                format!("--replication {r:?} is not an address like 10.0.0.5:3262")
            })?,
            None => std::net::SocketAddr::new(self.address, 3262),
        };
        Ok(cluster::state::NodeAddresses {
            control: std::net::SocketAddr::new(self.address, self.control_port),
            replication,
            portals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::status::EventKind;

    fn parse(args: &[&str]) -> std::result::Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("bulwark").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn node_and_replica_commands_parse_with_the_global_node_address() {
        for args in [
            &["volume", "replicas", "v", "add", "n3", "--wait"][..],
            &["volume", "replicas", "v", "remove", "n3", "--force"],
            &["volume", "replicas", "v", "replace", "n2", "n3"],
            &["node", "drain", "n1", "--evacuate", "--no-wait"],
            &["node", "undrain", "n1"],
            &["node", "zone", "n1", "rack1"],
            &["node", "remove", "n1", "--dead", "--yes"],
            &[
                "cluster",
                "settings",
                "--rebuild-rate",
                "1GiB",
                "--replace-after",
                "off",
            ],
        ] {
            let with_node: Vec<&str> = args
                .iter()
                .copied()
                .chain(["--node", "127.0.0.1:3261"])
                .collect();
            parse(&with_node).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(admin::parse_duration_ms("10m").unwrap() == 600_000);
        assert!(admin::parse_duration_ms("off").unwrap() == 0);
        let e = admin::parse_duration_ms("10").unwrap_err().to_string();
        assert!(e.contains("no unit"), "{e}");
        let e = admin::parse_duration_ms("5 weeks").unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
    }

    #[test]
    fn alert_commands_parse_and_the_help_lists_every_event_kind() {
        for args in [
            &["alert", "add", "mail", "--program", "/usr/local/bin/a"][..],
            &[
                "alert",
                "add",
                "hook",
                "--url",
                "https://h/x",
                "--events",
                "failover_started,disk",
                "--timeout-ms",
                "2000",
                "--retries",
                "0",
            ],
            &["alert", "list", "--json"],
            &["alert", "remove", "mail"],
            &["alert", "test", "mail"],
        ] {
            parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        // A program or a URL, not both and not neither.
        assert!(parse(&["alert", "add", "x"]).is_err());
        assert!(parse(&["alert", "add", "x", "--program", "/a", "--url", "http://h/"]).is_err());
        let help = match parse(&["alert", "add", "--help"]) {
            Err(h) => h.replace(['\n', ' '], ""),
            Ok(_) => panic!("--help parsed"),
        };
        for kind in EventKind::ALL.into_iter().filter(|k| k.subscribable()) {
            assert!(
                help.contains(kind.as_str()),
                "`bulwark alert add --help` lacks {kind}"
            );
        }
    }

    /// The README's list of events is the one `EventKind` gives.
    #[test]
    fn the_readme_lists_every_event_kind_with_its_meaning() {
        let readme = include_str!("../../../README.md");
        for kind in EventKind::ALL.into_iter().filter(|k| k.subscribable()) {
            let row = format!("| `{}` | {} |", kind.as_str(), kind.meaning());
            assert!(readme.contains(&row), "README lacks the row {row}");
        }
    }

    #[test]
    fn every_admin_command_parses_with_json_and_node() {
        for args in [
            &["node", "list", "--json"][..],
            &["node", "remove", "n2", "--node", "10.0.0.1"],
            &[
                "volume",
                "create",
                "v",
                "1GiB",
                "--replicas",
                "3",
                "--on",
                "a",
                "--json",
            ],
            &["volume", "list"],
            &["volume", "resize", "v", "2GiB"],
            &["volume", "delete", "v"],
            &["volume", "move", "v", "n2", "--node", "10.0.0.1"],
            &["target", "create", "iqn.2026-11.x:t", "--alias", "t"],
            &["target", "list", "--json"],
            &["target", "delete", "iqn.2026-11.x:t"],
            &[
                "target",
                "add-vip",
                "iqn.2026-11.x:t",
                "198.18.0.100/24",
                "--interface",
                "eth0",
            ],
            &["target", "remove-vip", "iqn.2026-11.x:t", "198.18.0.100"],
            &["lun", "add", "iqn.2026-11.x:t", "v", "--lun", "3"],
            &["lun", "remove", "iqn.2026-11.x:t", "3"],
            &["acl", "add", "iqn.2026-11.x:t", "iqn.1994-05.com.redhat:h"],
            &[
                "acl",
                "remove",
                "iqn.2026-11.x:t",
                "iqn.1994-05.com.redhat:h",
            ],
            &[
                "chap",
                "add",
                "alice",
                "--secret",
                "twelve-chars",
                "--mutual-user",
                "t",
                "--mutual-secret",
                "other-secret",
            ],
            &["chap", "list"],
            &["chap", "remove", "alice"],
            &["chap", "bind", "alice", "iqn.2026-11.x:t"],
            &["chap", "unbind", "alice", "iqn.2026-11.x:t"],
            &["status", "--watch", "--interval-ms", "500", "--json"],
            &[
                "cluster",
                "settings",
                "--failure-timeout-ms",
                "1500",
                "--json",
            ],
            &["cluster", "leave", "--node", "10.0.0.2"],
            &["cluster", "token", "--data-dir", "/var/lib/bulwark"],
            &["cluster", "init", "--name", "a", "--address", "10.0.0.1"],
            &[
                "cluster",
                "join",
                "10.0.0.1",
                "--token",
                "t",
                "--name",
                "b",
                "--address",
                "10.0.0.2",
                "--witness-not-a-flag",
            ],
        ] {
            let r = parse(args);
            if args.contains(&"--witness-not-a-flag") {
                assert!(r.is_err(), "{args:?}");
            } else {
                assert!(r.is_ok(), "{args:?}: {}", r.err().unwrap_or_default());
            }
        }
    }

    #[test]
    fn bad_invocations_say_what_is_missing() {
        let e = parse(&[
            "chap",
            "add",
            "alice",
            "--mutual-user",
            "t",
            "--secret",
            "twelve-chars",
        ])
        .err()
        .unwrap();
        assert!(e.contains("--mutual-secret"), "{e}");
        let e = parse(&["lun", "remove", "iqn.2026-11.x:t", "three"])
            .err()
            .unwrap();
        assert!(e.contains("invalid value 'three'"), "{e}");
        let e = parse(&["cluster", "init", "--name", "a", "--address", "not-an-ip"])
            .err()
            .unwrap();
        assert!(e.contains("--address"), "{e}");
        let e = parse(&["volume", "create", "v"]).err().unwrap();
        assert!(e.contains("<SIZE>"), "{e}");
        let e = parse(&[
            "cluster",
            "join",
            "10.0.0.1",
            "--name",
            "b",
            "--address",
            "10.0.0.2",
        ])
        .err();
        // The token may come from BULWARK_TOKEN; without it the error names --token.
        if std::env::var_os("BULWARK_TOKEN").is_none() {
            assert!(e.unwrap().contains("--token"));
        }
    }

    #[test]
    fn node_addresses_default_from_the_address() {
        let Command::Cluster {
            cmd: ClusterCmd::Init { node, .. },
        } = parse(&["cluster", "init", "--name", "a", "--address", "10.0.0.1"])
            .unwrap()
            .command
        else {
            panic!()
        };
        let a = node.addresses().unwrap();
        assert_eq!(a.control.to_string(), "10.0.0.1:3261");
        assert_eq!(a.replication.to_string(), "10.0.0.1:3262");
        assert_eq!(a.portals[0].to_string(), "10.0.0.1:3260");
        let Command::Cluster {
            cmd: ClusterCmd::Init { node, .. },
        } = parse(&[
            "cluster",
            "init",
            "--name",
            "a",
            "--address",
            "10.0.0.1",
            "--portal",
            "198.18.0.1",
            "--portal",
            "198.19.0.1:3270",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        let a = node.addresses().unwrap();
        assert_eq!(a.portals.len(), 2);
        assert_eq!(
            a.networks().len(),
            3,
            "control network plus two front-end networks"
        );
    }
}
