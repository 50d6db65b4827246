//! `bulwark serve` on a cluster member: the node's services (Raft, replication, iSCSI,
//! HTTP) started together, and the hand-over when it stops.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use cluster::status::EventKind;

use crate::{admin, alerts, http, service, signals};

/// `bulwark serve` of a cluster member.
pub(crate) struct ClusterServe {
    pub(crate) data_dir: PathBuf,
    pub(crate) witness: bool,
    pub(crate) capacity: Option<u64>,
    pub(crate) snapshot_every: u64,
    pub(crate) nop_timeout_ms: u64,
    pub(crate) http: Option<String>,
    pub(crate) metrics_open: bool,
    pub(crate) replication_plaintext: bool,
    pub(crate) activity_log_slack: usize,
    pub(crate) hooks_dir: PathBuf,
}

/// Runs this node as a cluster member until Ctrl-C / SIGTERM, or until the cluster
/// removes it.
pub(crate) async fn serve_cluster(o: ClusterServe) -> Result<()> {
    let ClusterServe {
        data_dir,
        witness,
        capacity,
        snapshot_every,
        nop_timeout_ms,
        http,
        metrics_open,
        replication_plaintext,
        activity_log_slack,
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
        let serving = serving::Serving::new(
            &node,
            server.clone(),
            &data_dir,
            portals,
            net,
            activity_log_slack,
        );
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
