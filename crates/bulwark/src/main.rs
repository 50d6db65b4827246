//! `bulwark`: highly available iSCSI block storage in one binary.

mod admin;
mod alerts;
mod cli;
mod config;
mod datadir;
mod demo;
mod http;
mod member;
mod metrics;
mod service;
mod signals;
mod standalone;
mod tokens;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use cli::{Cli, ClusterCmd, Command, LogFormat};
use config::{parse_size, Config};
use member::{serve_cluster, ClusterServe};
use standalone::{default_config, serve};

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
            activity_log_slack,
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
                    activity_log_slack,
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
