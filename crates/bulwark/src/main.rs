//! `bulwark`: highly available iSCSI block storage in one binary.

mod config;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use iscsi_proto::login::ChapAccount;

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
    /// Serve iSCSI targets from this node. Without --config: one 1 GiB thin LUN under
    /// ./bulwark-data as iqn.2026-11.io.bulwark:default on 127.0.0.1:3260.
    Serve {
        /// TOML configuration file (see examples/bulwark.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data folder for the default target.
        #[arg(long, default_value = "bulwark-data")]
        data_dir: PathBuf,
        /// Portal for the default target.
        #[arg(long, default_value = "127.0.0.1:3260")]
        listen: String,
        /// Log filter (tracing EnvFilter syntax), e.g. "info" or "target=debug".
        #[arg(long, env = "BULWARK_LOG", default_value = "info")]
        log: String,
    },
}

fn main() {
    if let Err(e) = run() {
        // `{:#}` prints the whole cause chain on one line, without a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            log,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_new(&log).context("bad --log filter")?,
                )
                .with_target(false)
                .init();
            let cfg = match &config {
                Some(p) => Config::load(p)?,
                None => default_config(&data_dir, &listen),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("bulwark")
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(serve(cfg))
        }
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

/// A stable 64-bit FNV-1a hash, for serial numbers and NAA identifiers that must not
/// change across restarts.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn lu_config(target: &TargetSection, lun: &LunSection) -> scsi::LuConfig {
    let lun_bytes = lun.lun.to_be_bytes();
    let h1 = fnv1a(&[target.iqn.as_bytes(), &lun_bytes]);
    let h2 = fnv1a(&[&h1.to_be_bytes(), lun.path.as_os_str().as_encoded_bytes()]);
    // NAA 6 (IEEE registered extended); the company id field carries a hash since
    // Bulwark has no OUI of its own: the identifier is unique and stable, not registered.
    let mut naa = [0u8; 16];
    naa[..8].copy_from_slice(&h1.to_be_bytes());
    naa[8..].copy_from_slice(&h2.to_be_bytes());
    naa[0] = 0x60 | (naa[0] & 0x0f);
    scsi::LuConfig {
        block_size: lun.block_size,
        read_only: lun.read_only,
        write_cache: lun.write_cache,
        serial: lun.serial.clone().unwrap_or_else(|| format!("{h1:016x}")),
        naa,
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
    let settings = target::ServerSettings {
        queue_depth: cfg.server.queue_depth,
        nop_interval: Duration::from_millis(cfg.server.nop_interval_ms),
        nop_timeout: Duration::from_millis(cfg.server.nop_timeout_ms),
        login_timeout: Duration::from_millis(cfg.server.login_timeout_ms),
        max_connections: cfg.server.max_connections,
        discovery_chap: accounts(&cfg.server.discovery_chap),
        ..Default::default()
    };
    let server = target::Server::new(settings);
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
                    read_only: l.read_only,
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
                Ok(target::Portal {
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
        server.set_target(target::TargetConfig {
            name: t.iqn.clone(),
            alias: t.alias.clone(),
            device,
            portals,
            allowed_initiators: t.allowed_initiators.clone(),
            chap: accounts(&t.chap),
        });
    }
    let listeners = server.bind().await?;
    println!("Ready. Ctrl-C stops the server after in-flight commands finish.");
    server
        .serve(listeners, async {
            shutdown_signal().await;
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
