//! `bulwark serve` without a cluster: one node serving the targets of a configuration
//! file (or one default target over a file in the data directory).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use iscsi_proto::login::ChapAccount;

use crate::config::{self, parse_portal, parse_size, Config, LunSection, TargetSection};
use crate::{service, signals};

/// Default target served by `bulwark serve` without a configuration file.
const DEFAULT_IQN: &str = "iqn.2026-11.io.bulwark:default";

pub(crate) fn default_config(data_dir: &Path, listen: &str) -> Config {
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

pub(crate) async fn serve(cfg: Config) -> Result<()> {
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
