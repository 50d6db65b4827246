//! A volume under a write load with the integrity checker: volume "v" as LUN 0 of
//! [`IQN`], versioned writes through the `initiator` crate to whichever node is
//! primary, and a read-back of every acknowledged write. Shared by the failover and
//! security tests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::state::Command;
use initiator::checker::Checker;
use initiator::Session;

use super::*;

pub const IQN: &str = "iqn.2026-11.io.bulwark:failover";
pub const BLOCK: u32 = 512;
pub const LBAS: u64 = 4096;

/// How to reach a cluster's nodes without borrowing it: a load can run in a task of
/// its own while the test stops and starts nodes.
#[derive(Clone)]
pub struct Reach {
    controls: Vec<SocketAddr>,
    token: cluster::Token,
}

impl Reach {
    pub fn of(c: &Cluster) -> Reach {
        Reach {
            controls: c.nodes.iter().map(|n| n.addresses().control).collect(),
            token: c.token(),
        }
    }

    async fn state(&self, i: usize) -> Option<cluster::state::ClusterState> {
        let admin = cluster::AdminClient::new(self.controls[i], &self.token).ok()?;
        admin.state().await.ok()
    }
}

/// The portal of the volume's primary, as the cluster says now.
pub async fn primary_portal(c: &Cluster, via: &[usize]) -> Option<(u64, SocketAddr)> {
    primary_portal_via(&Reach::of(c), via, "v").await
}

async fn primary_portal_via(c: &Reach, via: &[usize], volume: &str) -> Option<(u64, SocketAddr)> {
    for &i in via {
        if let Some(st) = c.state(i).await {
            let v = st.volumes.get(volume)?;
            let n = st.nodes.get(&v.primary)?;
            return Some((v.epoch, n.addresses.portals[0]));
        }
    }
    None
}

/// Writes until `until`, reconnecting to whichever node is primary; returns the
/// longest gap between two acknowledged writes (the I/O pause).
pub async fn write_load(
    c: &Cluster,
    checker: &mut Checker,
    until: Instant,
    via: &[usize],
) -> Duration {
    write_load_counting(c, checker, until, via).await.0
}

/// What a load run saw.
pub type LoadReport = (Duration, u64, u64);

/// True for what an initiator retries by itself: a unit attention, or NOT READY while
/// the volume changes primary.
pub fn retryable(status: u8, sense: &[u8]) -> bool {
    status == 2
        && sense.len() >= 14
        && matches!(
            (sense[2] & 0x0f, sense[12], sense[13]),
            (6, _, _) | (2, 0x04, 0x0a)
        )
}

/// Like [`write_load`], also counting failed writes (statuses an initiator would not
/// retry by itself) and logouts the target asked for.
pub async fn write_load_counting(
    c: &Cluster,
    checker: &mut Checker,
    until: Instant,
    via: &[usize],
) -> LoadReport {
    let s = run_load(c, checker, until, via, &Load::default()).await;
    (s.longest, s.failed, s.logouts)
}

/// What a load writes: single blocks spread over the first `lbas` LBAs of `lun` of
/// `target` (volume `volume`), and a SYNCHRONIZE CACHE after every `flush_every`
/// acknowledged writes (none when 0).
pub struct Load {
    pub lbas: u64,
    pub flush_every: u64,
    /// Stops the load before its deadline once set.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    pub target: String,
    pub lun: u64,
    pub volume: String,
}

impl Default for Load {
    fn default() -> Load {
        Load {
            lbas: LBAS,
            flush_every: 0,
            stop: None,
            target: IQN.into(),
            lun: 0,
            volume: "v".into(),
        }
    }
}

/// What a load run saw.
#[derive(Default)]
pub struct LoadStats {
    /// The longest gap between two acknowledged writes (the I/O pause).
    pub longest: Duration,
    /// Writes failed with a status an initiator would not retry by itself.
    pub failed: u64,
    /// Logouts the target asked for.
    pub logouts: u64,
    pub writes: u64,
    pub flushes: u64,
    /// When the longest gap ended (wall clock, to match the nodes' logs).
    pub longest_ended: Option<std::time::SystemTime>,
}

/// Writes until `until` as `load` says, reconnecting to whichever node is primary.
/// A completed flush marks in `checker` what it covers.
pub async fn run_load(
    c: &Cluster,
    checker: &mut Checker,
    until: Instant,
    via: &[usize],
    load: &Load,
) -> LoadStats {
    run_load_via(&Reach::of(c), checker, until, via, load).await
}

/// [`run_load`] through a [`Reach`] (in a task of its own).
pub async fn run_load_via(
    c: &Reach,
    checker: &mut Checker,
    until: Instant,
    via: &[usize],
    load: &Load,
) -> LoadStats {
    let mut stats = LoadStats::default();
    let mut session: Option<Session> = None;
    let mut last_ack = Instant::now();
    let mut n = checker.acks();
    let stopped = || {
        load.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    };
    while Instant::now() < until && !stopped() {
        if session.is_none() {
            if let Some((_, portal)) = primary_portal_via(c, via, &load.volume).await {
                session = connect(portal, &load.target).await;
            }
            if session.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let s = session.as_mut().expect("connected");
        n += 1;
        let lba = (n * 7919) % load.lbas;
        let (version, block) = checker.next_write(lba);
        match tokio::time::timeout(
            Duration::from_secs(3),
            s.write16(load.lun, lba, &block, BLOCK, false),
        )
        .await
        {
            Ok(Ok(r)) if r.status == 0 => {
                checker.acked(lba, version);
                stats.writes += 1;
                let now = Instant::now();
                if now - last_ack > stats.longest {
                    stats.longest = now - last_ack;
                    stats.longest_ended = Some(std::time::SystemTime::now());
                }
                last_ack = now;
            }
            // CHECK CONDITION (a transition, a unit attention): retry on this session.
            Ok(Ok(r)) => {
                if !retryable(r.status, &r.sense) {
                    stats.failed += 1;
                    eprintln!(
                        "failed write: status {:#x} sense {:02x?}",
                        r.status,
                        &r.sense[..r.sense.len().min(18)]
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            _ => session = None,
        }
        if let Some(s) = session
            .as_mut()
            .filter(|_| load.flush_every > 0 && stats.writes.is_multiple_of(load.flush_every))
        {
            let mark = checker.flush_mark();
            let sync = [0x35u8, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            match tokio::time::timeout(Duration::from_secs(3), s.command(load.lun, &sync, None, 0))
                .await
            {
                Ok(Ok(r)) if r.status == 0 => {
                    checker.flushed(mark);
                    stats.flushes += 1;
                }
                Ok(Ok(_)) => {}
                _ => session = None,
            }
        }
        // The target asks us to log out (the volume moved): reconnect, as open-iscsi does.
        if session.as_ref().is_some_and(|s| s.logout_requested()) {
            stats.logouts += 1;
            session = None;
        }
    }
    stats
}

pub async fn verify_all(c: &Cluster, checker: &Checker, via: &[usize]) {
    let (_, portal) = primary_portal(c, via).await.expect("a primary");
    let mut s = wait(
        "a session on the new primary",
        Duration::from_secs(10),
        async || connect(portal, IQN).await,
    )
    .await;
    for lba in checker.lbas().collect::<Vec<_>>() {
        let r = wait("a read", Duration::from_secs(10), async || {
            s.read16(0, lba, 1, BLOCK)
                .await
                .ok()
                .filter(|r| r.status == 0)
        })
        .await;
        if let Err(e) = checker.verify(lba, &r.data) {
            panic!("{e}");
        }
    }
}

/// Waits until volume "v" has `count` in-sync replicas; the state at that point.
pub async fn wait_in_sync(
    admin: &cluster::AdminClient,
    count: usize,
    limit: Duration,
    what: &str,
) -> cluster::state::ClusterState {
    wait(what, limit, async || {
        admin
            .state()
            .await
            .ok()
            .filter(|s| s.volumes["v"].in_sync.len() == count)
    })
    .await
}

/// A 3-node cluster on 127.0.`block`.x with volume "v" (2 replicas, primary n2 while
/// the Raft leader is n1, so the two roles fail apart) as LUN 0 of [`IQN`].
pub async fn replicated_volume(block: u8, size_bytes: u64) -> Cluster {
    replicated_volume_with(block, size_bytes, &[]).await
}

/// [`replicated_volume`] with `extra` arguments to every `bulwark serve`.
pub async fn replicated_volume_with(block: u8, size_bytes: u64, extra: &[String]) -> Cluster {
    let c = Cluster::three_voters_with(block, extra).await;
    let admin = c.admin(0);
    commit(
        &admin,
        Command::CreateVolume {
            name: "v".into(),
            size_bytes,
            replicas: 2,
            block_size: BLOCK,
            physical_block_size: None,
            nodes: vec!["n2".into(), "n3".into()],
        },
    )
    .await;
    target_with_lun(&admin, IQN, "v").await;
    c
}
