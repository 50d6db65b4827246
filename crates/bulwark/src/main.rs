//! `bulwark`: highly available iSCSI block storage in one binary.

mod admin;
mod alerts;
mod config;
mod datadir;
mod demo;
mod http;
mod metrics;
mod service;
mod signals;
mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use iscsi_proto::login::ChapAccount;

use cluster::status::EventKind;
use config::{parse_portal, parse_size, Config, LunSection, TargetSection};

/// Default target served by `bulwark serve` without a configuration file.
const DEFAULT_IQN: &str = "iqn.2026-11.io.bulwark:default";

#[derive(Parser)]
#[command(
    name = "bulwark",
    version,
    about = "Highly available iSCSI block storage in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum ClusterCmd {
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
struct NodeArgs {
    /// Unique node name.
    #[arg(long)]
    name: String,
    /// This node's address on the cluster network: control plane on port 3261, and the
    /// default for the portal (port 3260) and replication (port 3262).
    #[arg(long)]
    address: std::net::IpAddr,
    /// iSCSI portal, one per front-end network (repeat); default ADDRESS:3260.
    #[arg(long = "portal")]
    portals: Vec<String>,
    /// Replication address; default ADDRESS:3262.
    #[arg(long)]
    replication: Option<String>,
    /// Control-plane port.
    #[arg(long, default_value_t = admin::CONTROL_PORT)]
    control_port: u16,
    /// Data folder of this node.
    #[arg(long, env = "BULWARK_DATA_DIR", default_value = "bulwark-data")]
    data_dir: PathBuf,
}

impl NodeArgs {
    fn addresses(&self) -> Result<cluster::state::NodeAddresses> {
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

fn main() {
    keep_freed_buffers();
    if let Err(e) = run() {
        // `{:#}` prints the whole cause chain on one line, without a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Keeps freed memory in the process for the next buffer. glibc hands blocks of 128 KiB
/// and more back to the kernel when they are freed (`mmap` and heap trimming), so each
/// 1 MiB write buffer and replication frame came back as fresh pages: a page fault and
/// a zeroed page for every 4 KiB, a third of the CPU of a replicated 1 MiB write
/// (`perf`, issue 20). Buffers are bounded by the targets' buffer budget, so what is
/// kept is too. Must run before any thread starts (`mallopt` is not thread-safe).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_buffers() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread
    // exists. A refused value leaves glibc's default, which is correct, only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_buffers() {}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bulwark")
        .build()
        .context("cannot start the async runtime")
}

fn init_logging(filter: &str, format: LogFormat) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("bad --log filter")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    Ok(())
}

/// Writes `bulwark.1` and a page per subcommand (`bulwark-volume-create.1`, ...).
fn write_man_pages(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fn walk(cmd: &clap::Command, name: &str, dir: &Path) -> Result<()> {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone().display_name(name.to_string()))
            .title(name.to_uppercase())
            .render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    walk(&Cli::command(), "bulwark", dir)
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Serve { .. } | Command::Cluster { .. } | Command::Demo { .. }
    ) {
        datadir::private_files();
    }
    match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            witness,
            capacity,
            snapshot_every,
            nop_timeout_ms,
            http,
            metrics_open,
            replication_tls,
            hooks_dir,
            log,
            log_format,
        } => {
            init_logging(&log, log_format)?;
            datadir::secure_data_dir(&data_dir)?;
            if cluster::Identity::exists(&data_dir) {
                if config.is_some() {
                    bail!("{} belongs to a cluster, whose configuration lives in the cluster (bulwark volume/target/lun ...); drop --config", data_dir.display());
                }
                let capacity = capacity.as_deref().map(parse_size).transpose()?;
                return runtime()?.block_on(serve_cluster(ClusterServe {
                    data_dir,
                    witness,
                    capacity,
                    snapshot_every,
                    nop_timeout_ms,
                    http,
                    metrics_open,
                    replication_plaintext: replication_tls == "off",
                    hooks_dir,
                }));
            }
            if witness {
                bail!("--witness needs a cluster: run `bulwark cluster join SEED --token TOKEN --name NAME --address IP --data-dir {}` first", data_dir.display());
            }
            let cfg = match &config {
                Some(p) => Config::load(p)?,
                None => default_config(&data_dir, &listen),
            };
            runtime()?.block_on(serve(cfg))
        }
        Command::Cluster { cmd } => runtime()?.block_on(cluster_cmd(cmd)),
        Command::Node { conn, cmd } => runtime()?.block_on(admin::node(&conn, cmd)),
        Command::Volume { conn, cmd } => runtime()?.block_on(admin::volume(&conn, cmd)),
        Command::Snapshot { conn, cmd } => runtime()?.block_on(admin::snapshot::run(&conn, cmd)),
        Command::Target { conn, cmd } => runtime()?.block_on(admin::target(&conn, cmd)),
        Command::Lun { conn, cmd } => runtime()?.block_on(admin::lun(&conn, cmd)),
        Command::Acl { conn, cmd } => runtime()?.block_on(admin::acl(&conn, cmd)),
        Command::Chap { conn, cmd } => runtime()?.block_on(admin::chap(&conn, cmd)),
        Command::Alert { conn, cmd } => runtime()?.block_on(admin::alert(&conn, cmd)),
        Command::InitiatorConfig { conn } => runtime()?.block_on(async {
            let st = conn.client()?.state().await?;
            print!("{}", admin::initiator_config(&st.settings));
            Ok(())
        }),
        Command::Status {
            conn,
            watch,
            interval_ms,
        } => runtime()?.block_on(admin::status(
            &conn,
            watch,
            Duration::from_millis(interval_ms),
        )),
        Command::Demo { dir, no_watch } => runtime()?.block_on(demo::run(dir, !no_watch)),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "bulwark", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(e).context("writing the completions")
                }
                _ => Ok(()),
            }
        }
        Command::Man { dir } => write_man_pages(&dir),
    }
}

async fn cluster_cmd(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Init { node, json } => {
            let addresses = node.addresses()?;
            let id = cluster::node::init(&node.data_dir, &node.name, addresses.clone())?;
            let token = id.token()?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "cluster_id": id.cluster_id, "node": id.name, "token": token.to_string(), "control": addresses.control })
                );
            } else {
                println!(
                    "Cluster {} created; {} is its first node.",
                    id.cluster_id, id.name
                );
                println!(
                    "Start it:        bulwark serve --data-dir {}",
                    node.data_dir.display()
                );
                println!("Join other nodes: bulwark cluster join {} --token {token} --name NAME --address IP", addresses.control);
                println!(
                    "Administer:      export BULWARK_NODE={} BULWARK_TOKEN={token}",
                    addresses.control
                );
                println!("\ntoken: {token}");
                println!("Keep the token secret: it admits nodes and administrators.");
            }
            Ok(())
        }
        ClusterCmd::Join {
            seed,
            token,
            node,
            json,
        } => {
            let token: cluster::Token = token.parse().context("--token")?;
            let seed = admin::parse_control(&seed)?;
            let capacity = admin::filesystem_capacity(&node.data_dir)?;
            let id = cluster::node::join(
                &node.data_dir,
                seed,
                &token,
                &node.name,
                node.addresses()?,
                capacity,
            )
            .await
            .with_context(|| format!("joining the cluster through {seed}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "cluster_id": id.cluster_id, "node": id.name, "node_id": id.node_id })
                );
            } else {
                println!(
                    "{} joined cluster {} as node id {}.",
                    id.name, id.cluster_id, id.node_id
                );
                println!(
                    "Start it: bulwark serve --data-dir {}",
                    node.data_dir.display()
                );
            }
            Ok(())
        }
        ClusterCmd::Settings {
            conn,
            heartbeat_interval_ms,
            failure_timeout_ms,
            resync_rate,
            rebuild_rate,
            replace_after,
            fence_command,
            fence_timeout_ms,
        } => {
            let resync_rate = resync_rate
                .as_deref()
                .map(parse_size)
                .transpose()
                .context("--resync-rate")?;
            let rebuild_rate = rebuild_rate
                .as_deref()
                .map(parse_size)
                .transpose()
                .context("--rebuild-rate")?;
            let replace_after_ms = replace_after
                .as_deref()
                .map(admin::parse_duration_ms)
                .transpose()
                .context("--replace-after")?;
            admin::settings(
                &conn,
                admin::SettingsChange {
                    heartbeat_interval_ms,
                    failure_timeout_ms,
                    resync_rate,
                    rebuild_rate,
                    replace_after_ms,
                    fence_command,
                    fence_timeout_ms,
                },
            )
            .await
        }
        ClusterCmd::Token { conn, cmd: None } => {
            println!("{}", cluster::Identity::load(&conn.data_dir)?.token()?);
            Ok(())
        }
        ClusterCmd::Token {
            conn,
            cmd: Some(cmd),
        } => tokens::token(&conn, cmd).await,
        ClusterCmd::Leave { conn } => {
            let client = conn.client()?;
            let me = client.status().await?;
            match client
                .write(cluster::Command::RemoveNode {
                    name: me.name.clone(),
                    dead: false,
                })
                .await?
            {
                Ok(_) => {
                    if conn.json {
                        println!("{}", serde_json::json!({ "left": me.name }));
                    } else {
                        println!("{} left the cluster; its daemon stops by itself.", me.name);
                    }
                    Ok(())
                }
                Err(refused) => bail!("refused: {refused}"),
            }
        }
    }
}

/// Runs this node as a cluster member until Ctrl-C / SIGTERM, or until the cluster
/// removes it.
/// `bulwark serve` of a cluster member.
struct ClusterServe {
    data_dir: PathBuf,
    witness: bool,
    capacity: Option<u64>,
    snapshot_every: u64,
    nop_timeout_ms: u64,
    http: Option<String>,
    metrics_open: bool,
    replication_plaintext: bool,
    hooks_dir: PathBuf,
}

async fn serve_cluster(o: ClusterServe) -> Result<()> {
    let ClusterServe {
        data_dir,
        witness,
        capacity,
        snapshot_every,
        nop_timeout_ms,
        http,
        metrics_open,
        replication_plaintext,
        hooks_dir,
    } = o;
    let mut options = cluster::NodeOptions::new(data_dir.clone());
    options.role = if witness {
        cluster::NodeRole::Witness
    } else {
        cluster::NodeRole::Storage
    };
    options.capacity_bytes = if witness {
        0
    } else {
        match capacity {
            Some(c) => c,
            None => admin::filesystem_capacity(&data_dir)?,
        }
    };
    options.shares_blocks = if witness {
        None
    } else {
        serving::snapshots::shares_blocks(&data_dir)
    };
    options.snapshot_every = snapshot_every.max(10);
    options.hooks_dir = hooks_dir;
    let node = cluster::ClusterNode::start(options).await?;
    let identity = node.identity().clone();
    // Replicated writes hand their completion to the replication driver and free their
    // I/O thread at once, but FUA writes, flushes and reads still wait on it (a flush
    // waits for every in-sync replica's disk): the pool is sized for the queue depths
    // initiators use rather than for the CPUs.
    let server = iscsi_target::Server::new(iscsi_target::ServerSettings {
        io_threads: 64,
        nop_timeout: Duration::from_millis(nop_timeout_ms),
        ..Default::default()
    });
    let mut listeners = Vec::new();
    let serving = if witness {
        None
    } else {
        let group_tag = serving::port_group_of(identity.node_id);
        let portals: Vec<iscsi_target::Portal> = identity
            .addresses
            .portals
            .iter()
            .map(|a| iscsi_target::Portal {
                addr: *a,
                group_tag,
            })
            .collect();
        for p in &portals {
            listeners.push(
                tokio::net::TcpListener::bind(p.addr)
                    .await
                    .with_context(|| format!("cannot listen on portal {}", p.addr))?,
            );
        }
        let net = serving::admission::start_replication(&node, replication_plaintext).await?;
        let serving = serving::Serving::new(&node, server.clone(), &data_dir, portals, net);
        tokio::spawn(serving.clone().run(node.state()));
        Some(serving)
    };
    {
        let (server, serving) = (server.clone(), serving.clone());
        node.set_local_info(Arc::new(move || {
            let sessions = server
                .sessions()
                .into_iter()
                .map(|s| cluster::status::SessionView {
                    target: s.target.unwrap_or_default(),
                    initiator: s.initiator,
                    peer: s.peer.to_string(),
                })
                .collect();
            cluster::status::LocalReport {
                sessions,
                serving: serving
                    .as_ref()
                    .map(|s| s.served_targets())
                    .unwrap_or_default(),
                volumes: serving
                    .as_ref()
                    .map(|s| s.volume_views())
                    .unwrap_or_default(),
                replication_plaintext,
                disk: serving.as_ref().and_then(|s| s.disk()),
            }
        }));
    }
    let alerts = alerts::Alerts::start(node.clone(), server.clone());
    let http_addr: Option<std::net::SocketAddr> = match http.as_deref() {
        Some("off") => None,
        Some(a) => Some(
            a.parse()
                .with_context(|| format!("--http {a:?}: expected IP:PORT or \"off\""))?,
        ),
        None => Some(std::net::SocketAddr::new(
            identity.addresses.control.ip(),
            http::HTTP_PORT,
        )),
    };
    if let Some(listen) = http_addr {
        http::AdminHttp::start(
            http::HttpOptions {
                listen,
                metrics_open,
            },
            node.clone(),
            serving.clone(),
            server.clone(),
            alerts,
        )
        .await?;
    }
    println!(
        "Bulwark node {} (id {}) of cluster {}: control {}{}",
        identity.name,
        identity.node_id,
        identity.cluster_id,
        identity.addresses.control,
        if witness {
            ", witness".to_string()
        } else {
            format!(", portals {:?}", identity.addresses.portals)
        }
    );
    if let Some(a) = http_addr {
        println!("Console and metrics: https://{a}/ and https://{a}/metrics");
    }
    println!("Ready. Ctrl-C stops the node.");
    service::ready(&tokio::runtime::Handle::current());
    let removed = {
        let node = node.clone();
        async move { node.removed().await }
    };
    let removed_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = removed_flag.clone();
    let stopping = (node.clone(), serving.clone());
    server
        .serve(listeners, async move {
            tokio::select! {
                _ = signals::shutdown_signal() => hand_over(&stopping.0, stopping.1.as_deref()).await,
                _ = removed => {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .await?;
    if let Some(s) = &serving {
        // The next primary takes the addresses over; none must stay behind here.
        let s = s.clone();
        let _ = tokio::task::spawn_blocking(move || s.release_vips()).await;
    }
    if removed_flag.load(std::sync::atomic::Ordering::SeqCst) {
        node.events().push(
            EventKind::Membership,
            format!(
                "node {} was removed from the cluster; stopping",
                identity.name
            ),
        );
        // Let the leader finish taking this node out of the membership.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// How long a stopping node waits for its targets to move.
const HANDOVER_LIMIT: Duration = Duration::from_millis(1500);

/// How long a stopping node waits for its replicas to leave the in-sync sets.
const LEAVE_LIMIT: Duration = Duration::from_millis(1500);

/// How long a stopping node keeps forwarding after its targets moved, so multipath
/// initiators move their I/O to the new primary's path before this path goes away:
/// multipathd takes the new access states at its next path check (`initiator-config`
/// sets one a second); the rest is room for a slow initiator.
const LINGER: Duration = Duration::from_millis(2500);

/// A graceful stop is a planned move: the targets this node is primary of move to
/// another in-sync node first; its replicas leave their in-sync sets (so primaries do
/// not wait out the replica timeout for them); then the node stays a forwarding path
/// for a moment.
async fn hand_over(node: &cluster::ClusterNode, serving: Option<&serving::Serving>) {
    let Some(serving) = serving else {
        return; // a witness serves nothing
    };
    println!("Stopping: handing over the targets this node serves...");
    let h = node.hand_over_primaries(HANDOVER_LIMIT).await;
    for (v, to) in &h.moved {
        println!("  {v} (with the rest of its target) moved to {to}");
    }
    for (v, why) in &h.left {
        println!("  {v} stays until this node stops, then fails over: {why}");
    }
    // Its replicas leave their in-sync sets, and keep leaving while it lingers: the
    // moved volumes' new primaries seal this node as a replica first.
    let start = std::time::Instant::now();
    let linger = if h.moved.is_empty() {
        Duration::ZERO
    } else {
        LINGER
    };
    loop {
        let still = node.in_sync_sets_joined();
        if !still.is_empty() {
            serving.leave_in_sync_sets();
        }
        let elapsed = start.elapsed();
        if still.is_empty() && elapsed >= linger {
            break;
        }
        if elapsed >= linger.max(LEAVE_LIMIT) {
            println!(
                "  still in the in-sync set of {}: their primaries wait for this node's replica timeout",
                still.join(", ")
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn default_config(data_dir: &Path, listen: &str) -> Config {
    Config {
        server: Default::default(),
        chap: Vec::new(),
        target: vec![TargetSection {
            iqn: DEFAULT_IQN.to_string(),
            alias: Some("bulwark-default".into()),
            portals: vec![listen.to_string()],
            chap: Vec::new(),
            allowed_initiators: None,
            allow_target_reset: false,
            lun: vec![LunSection {
                lun: 0,
                path: data_dir.join("default.img"),
                size: Some("1GiB".into()),
                block_size: 512,
                read_only: false,
                direct: false,
                write_cache: true,
                serial: None,
                physical_block_size: 4096,
                sanitize_bytes_per_s: 16 << 20,
            }],
        }],
    }
}

fn lu_config(target: &TargetSection, lun: &LunSection) -> scsi::LuConfig {
    let lun_bytes = lun.lun.to_be_bytes();
    let h1 = serving::lu_identity::fnv1a(&[target.iqn.as_bytes(), &lun_bytes]);
    let h2 =
        serving::lu_identity::fnv1a(&[&h1.to_be_bytes(), lun.path.as_os_str().as_encoded_bytes()]);
    scsi::LuConfig {
        block_size: lun.block_size,
        read_only: lun.read_only,
        write_cache: lun.write_cache,
        serial: lun.serial.clone().unwrap_or_else(|| format!("{h1:016x}")),
        naa: serving::lu_identity::naa_identifier(h1, h2),
        pr_file: Some(lun.path.with_extension("pr")),
        physical_block_size: lun.physical_block_size,
        sanitize_bytes_per_s: lun.sanitize_bytes_per_s,
        ..Default::default()
    }
}

fn chap_account(c: &config::ChapSection) -> ChapAccount {
    ChapAccount {
        user: c.user.clone(),
        secret: c.secret.clone(),
        mutual: match (&c.target_user, &c.target_secret) {
            (Some(u), Some(s)) => Some((u.clone(), s.clone())),
            _ => None,
        },
    }
}

async fn serve(cfg: Config) -> Result<()> {
    let accounts = |names: &[String]| -> Vec<ChapAccount> {
        names
            .iter()
            .filter_map(|n| cfg.chap.iter().find(|c| &c.name == n))
            .map(chap_account)
            .collect()
    };
    let settings = iscsi_target::ServerSettings {
        queue_depth: cfg.server.queue_depth,
        nop_interval: Duration::from_millis(cfg.server.nop_interval_ms),
        nop_timeout: Duration::from_millis(cfg.server.nop_timeout_ms),
        login_timeout: Duration::from_millis(cfg.server.login_timeout_ms),
        max_connections: cfg.server.max_connections,
        discovery_chap: accounts(&cfg.server.discovery_chap),
        ..Default::default()
    };
    let server = iscsi_target::Server::new(settings);
    let mut banner = Vec::new();
    for t in &cfg.target {
        let device = Arc::new(scsi::TargetDevice::new());
        for l in &t.lun {
            let create = l.size.as_deref().map(parse_size).transpose()?;
            let store = blockstore::FileStore::open(
                &l.path,
                &blockstore::OpenOptions {
                    create_size_bytes: create,
                    block_size: l.block_size,
                    direct: l.direct,
                    // Single-node mode keeps its configured choice for every write.
                    bulk_direct: false,
                    read_only: l.read_only,
                    volatile_cache: false,
                },
            )
            .with_context(|| format!("target {} LUN {}", t.iqn, l.lun))?;
            let size = scsi::BlockDevice::size_bytes(&store);
            device
                .add_lun(l.lun, lu_config(t, l), Arc::new(store))
                .with_context(|| format!("target {} LUN {}", t.iqn, l.lun))?;
            banner.push(format!(
                "  LUN {}: {} ({} MiB, {}-byte blocks{}) ",
                l.lun,
                l.path.display(),
                size >> 20,
                l.block_size,
                if l.read_only { ", read-only" } else { "" }
            ));
        }
        let portals = t
            .portals
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(iscsi_target::Portal {
                    addr: parse_portal(p)?,
                    group_tag: (i + 1) as u16,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        println!("Bulwark serving {}", t.iqn);
        for p in &portals {
            println!("  portal {} (portal group {})", p.addr, p.group_tag);
        }
        for b in banner.drain(..) {
            println!("{b}");
        }
        if let Some(p) = portals.first() {
            let host = match p.addr {
                std::net::SocketAddr::V4(a) => a.ip().to_string(),
                std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
            };
            println!(
                "  try: iscsi-inq iscsi://{host}:{}/{}/0",
                p.addr.port(),
                t.iqn
            );
        }
        server.set_target(iscsi_target::TargetConfig {
            name: t.iqn.clone(),
            alias: t.alias.clone(),
            device,
            portals,
            remote_portals: Vec::new(),
            allowed_initiators: t.allowed_initiators.clone(),
            chap: accounts(&t.chap),
            allow_target_reset: t.allow_target_reset,
        });
    }
    let listeners = server.bind().await?;
    println!("Ready. Ctrl-C stops the server after in-flight commands finish.");
    service::ready(&tokio::runtime::Handle::current());
    server
        .serve(listeners, async {
            signals::shutdown_signal().await;
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod cli_tests {
    use super::*;

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
