//! The life of a cluster, end to end with real processes: a node lost for good is
//! given up and its replicas rebuilt elsewhere (by hand, and on their own after
//! `--replace-after`) with no acknowledged write lost; a rebuild copies only the
//! regions that hold data and resumes where it stopped when either side restarts; a
//! rolling restart with drain/undrain under writes fails no I/O.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::state::{ClusterState, Command};
use initiator::checker::Checker;

mod common;
use common::load::*;
use common::*;

/// A write load on volume "v" in a task of its own, stopped on demand.
struct Background {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Checker, LoadStats)>,
}

impl Background {
    fn start(c: &Cluster) -> Background {
        Background::resume(c, Checker::new(BLOCK as usize))
    }

    /// Goes on with the writes `checker` knows of.
    fn resume(c: &Cluster, mut checker: Checker) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let reach = Reach::of(c);
        let load = Load {
            stop: Some(stop.clone()),
            ..Default::default()
        };
        let task = tokio::spawn(async move {
            // Bounded: every test stops it well before.
            let until = Instant::now() + Duration::from_secs(600);
            let stats = run_load_via(&reach, &mut checker, until, &[0, 1, 2], &load).await;
            (checker, stats)
        });
        Background { stop, task }
    }

    async fn finish(self) -> (Checker, LoadStats) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The slots of the nodes holding `volume`'s in-sync replicas.
fn in_sync_slots(c: &Cluster, st: &ClusterState, volume: &str) -> Vec<usize> {
    st.volumes[volume]
        .in_sync
        .iter()
        .map(|id| c.index(&st.nodes[id].name))
        .collect()
}

/// The replicas of `volume` hold the same bytes (writes stopped).
fn assert_identical(c: &Cluster, slots: &[usize], volume: &str) {
    let img =
        |i: usize| std::fs::read(c.nodes[i].dir.join(format!("volumes/{volume}.img"))).unwrap();
    let first = img(slots[0]);
    for &i in &slots[1..] {
        assert!(
            img(i) == first,
            "{volume}: {} and {} differ",
            c.nodes[slots[0]].name,
            c.nodes[i].name
        );
    }
}

/// Regions sent by resync or rebuild since the primary of "v" started, as it reports.
async fn regions_sent(c: &Cluster, slot: usize, volume: &str) -> u64 {
    let s = c.admin(slot).status().await.unwrap();
    s.volumes
        .iter()
        .find(|x| x.name == volume && x.role == "primary")
        .map_or(0, |x| x.resync_regions_sent)
}

async fn lose_a_node_for_good(block: u8, automatic: bool) {
    let _serial = ONE_AT_A_TIME.lock().await;
    // "v" on n2 (primary) and n3; n1 leads Raft and holds no replica. The load writes
    // to the first 2 MiB of a 64 MiB volume: 2 regions hold data.
    let mut c = replicated_volume(block, 64 << 20).await;
    let admin = c.admin(0);
    if automatic {
        let (ok, out, err) =
            run_cli(&c, 0, &["cluster", "settings", "--replace-after", "10s"]).await;
        assert!(ok, "{err}");
        assert!(out.contains("replace after:      10 s"), "{out}");
    }
    let load = Background::start(&c);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // n3's disk dies for good.
    let killed = Instant::now();
    c.nodes[2].kill9();
    wait_in_sync(
        &admin,
        1,
        Duration::from_secs(10),
        "n3 out of the in-sync set",
    )
    .await;
    if automatic {
        eprintln!("waiting for the leader to replace n3 after 10 s offline");
    } else {
        // Too soon: n3 may still be about to fail over.
        let (ok, _, err) = run_cli(&c, 0, &["node", "remove", "n3", "--dead", "--yes"]).await;
        assert!(!ok && err.contains("given up only after"), "{err}");
        // Silent past the failure timeout and a lease: the CLI wants a confirmation,
        // and says what it gives up.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (ok, _, err) = run_cli(&c, 0, &["node", "remove", "n3", "--dead"]).await;
        assert!(!ok && err.contains("Add --yes"), "{err}");
        let (ok, out, err) = run_cli(&c, 0, &["node", "remove", "n3", "--dead", "--yes"]).await;
        assert!(ok, "{err}");
        assert!(out.contains("v: rebuilding a replica on n1"), "{out}");
        // Its id is gone and never reused; the volume is rebuilt on n1.
        let st = admin.state().await.unwrap();
        assert!(st.node_by_name("n3").is_none());
    }
    let st = wait(
        "the volume back to two in-sync replicas",
        Duration::from_secs(60),
        async || {
            admin.state().await.ok().filter(|s| {
                let v = &s.volumes["v"];
                v.in_sync.len() == 2 && v.replicas.len() == 2 && v.joining.is_empty()
            })
        },
    )
    .await;
    let restored = killed.elapsed();
    let (checker, stats) = load.finish().await;
    let holders = in_sync_slots(&c, &st, "v");
    assert!(holders.contains(&0) && holders.contains(&1), "{holders:?}");
    let sent = regions_sent(&c, 1, "v").await;
    eprintln!(
        "{}: redundancy restored {:.1} s after the kill; the rebuild sent {sent} of 64 regions; {} writes, {} failed, longest pause {} ms",
        if automatic { "automatic (replace-after 10 s)" } else { "node remove --dead" },
        restored.as_secs_f64(),
        stats.writes,
        stats.failed,
        stats.longest.as_millis()
    );
    assert_eq!(stats.failed, 0, "no write failed");
    assert!(stats.writes > 100, "writes flowed");
    assert!(
        sent <= 4,
        "only the regions holding data were copied: {sent}"
    );
    verify_all(&c, &checker, &[0, 1]).await;
    assert_identical(&c, &holders, "v");
    if automatic {
        // n3 holds nothing any more: it can be removed like any empty node.
        let (ok, _, err) = run_cli(&c, 0, &["node", "remove", "n3"]).await;
        assert!(ok, "{err}");
    } else {
        // The dead node's certificate no longer admits it: it stops if it returns.
        c.nodes[2].start();
        let child = c.nodes[2].child.as_mut().unwrap();
        let exited = wait(
            "the removed node to stop",
            Duration::from_secs(30),
            async || child.try_wait().ok().flatten(),
        )
        .await;
        c.nodes[2].child = None;
        eprintln!("the removed node, restarted, stopped with {exited}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_removed_by_hand_is_replaced_without_losing_a_write() {
    lose_a_node_for_good(60, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_offline_past_replace_after_is_replaced_on_its_own() {
    lose_a_node_for_good(61, true).await;
}

/// Fills volume `name` (LUN 0 of `iqn`) with data through node `slot`, 1 MiB at a time.
async fn fill(c: &Cluster, slot: usize, iqn: &str, bytes: u64) {
    let portal = c.nodes[slot].addresses().portals[0];
    let mut s = wait(
        "a session on the new target",
        Duration::from_secs(10),
        async || connect(portal, iqn).await,
    )
    .await;
    let chunk = 1u64 << 20;
    for i in 0..bytes / chunk {
        let data: Vec<u8> = (0..chunk).map(|b| (b as u8) ^ (i as u8) ^ 0x5a).collect();
        let lba = i * chunk / u64::from(BLOCK);
        let r = s.write16(0, lba, &data, BLOCK, false).await.unwrap();
        assert_eq!(r.status, 0, "write at {lba}");
    }
}

/// The rebuild of `v` on `node` as its primary reports it: (done, pending) regions.
async fn rebuild_progress(c: &Cluster, primary: usize, node: &str) -> Option<(u64, u64)> {
    let st = c.admin(primary).state().await.ok()?;
    let id = st.node_by_name(node)?.id;
    let s = c.admin(primary).status().await.ok()?;
    let x = s
        .volumes
        .iter()
        .find(|x| x.name == "v" && x.role == "primary")?;
    let r = x.resyncs.iter().find(|r| r.node == id)?;
    Some((r.done_regions, r.pending_regions))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rebuild_resumes_where_it_stopped() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const REGIONS: u64 = 256;
    let mut c = Cluster::three_voters(62).await;
    let admin = c.admin(0);
    commit(
        &admin,
        Command::CreateVolume {
            name: "v".into(),
            size_bytes: REGIONS << 20,
            replicas: 1,
            block_size: BLOCK,
            physical_block_size: None,
            nodes: vec!["n2".into()],
        },
    )
    .await;
    target_with_lun(&admin, IQN, "v").await;
    fill(&c, 1, IQN, REGIONS << 20).await;
    // Slow enough to interrupt part-way: 64 MiB/s, about 4 s for the volume.
    let (ok, _, err) = run_cli(&c, 0, &["cluster", "settings", "--rebuild-rate", "64MiB"]).await;
    assert!(ok, "{err}");

    // 1. The new replica restarts part-way.
    let (ok, out, err) = run_cli(&c, 0, &["volume", "replicas", "v", "add", "n3"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("added on n3"), "{out}");
    let (done, _) = wait(
        "a third of the rebuild",
        Duration::from_secs(30),
        async || {
            rebuild_progress(&c, 1, "n3")
                .await
                .filter(|(d, _)| *d >= REGIONS / 3)
        },
    )
    .await;
    c.nodes[2].kill9();
    c.nodes[2].start();
    wait_in_sync(
        &admin,
        2,
        Duration::from_secs(60),
        "n3 rebuilt after its restart",
    )
    .await;
    let sent = regions_sent(&c, 1, "v").await;
    eprintln!(
        "rebuild interrupted at {done} of {REGIONS} regions by a restart of the new replica: {sent} regions sent in all, {} MiB copied again",
        sent.saturating_sub(REGIONS)
    );
    assert!(
        sent < REGIONS + done / 2,
        "the rebuild went on where it stopped ({sent} sent)"
    );
    assert_identical(&c, &[1, 2], "v");

    // 2. The source restarts part-way: a rebuild on n1 from n2, whose process is
    // killed; the new primary (n3, or n2 back) goes on from the progress kept.
    let (ok, _, err) = run_cli(&c, 0, &["volume", "replicas", "v", "add", "n1"]).await;
    assert!(ok, "{err}");
    let (done, _) = wait(
        "half of the second rebuild",
        Duration::from_secs(30),
        async || {
            rebuild_progress(&c, 1, "n1")
                .await
                .filter(|(d, _)| *d >= REGIONS / 2)
        },
    )
    .await;
    let before = regions_sent(&c, 1, "v").await;
    c.nodes[1].kill9();
    let st = wait(
        "n1 rebuilt after the source died",
        Duration::from_secs(60),
        async || {
            admin.state().await.ok().filter(|s| {
                let v = &s.volumes["v"];
                v.in_sync.contains(&1) && v.joining.is_empty()
            })
        },
    )
    .await;
    let primary = c.index(&st.nodes[&st.volumes["v"].primary].name);
    let after = regions_sent(&c, primary, "v").await;
    eprintln!(
        "rebuild interrupted at {done} of {REGIONS} regions by the death of its source: the new primary {} sent {after} regions (so {} copied again)",
        c.nodes[primary].name,
        (before - sent + after).saturating_sub(REGIONS)
    );
    // Progress is kept every 64 regions; 16 more may be in flight.
    assert!(
        after < REGIONS - done + 64 + 16,
        "the new primary went on from the progress kept ({after} sent)"
    );
    c.nodes[1].start();
    wait_in_sync(&admin, 3, Duration::from_secs(60), "n2 back in sync").await;
    assert_identical(&c, &[0, 1, 2], "v");
}

/// Every node drained, restarted and undrained in turn under writes; then the
/// primary's node evacuated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_drains_fails_no_io() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = replicated_volume(63, 16 << 20).await;
    let admin = c.admin(0);
    let mut load = Background::start(&c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut writes, mut failed, mut longest) = (0, 0, Duration::ZERO);
    for i in 0..3 {
        let name = c.nodes[i].name.clone();
        let via = (i + 1) % 3;
        let step = Instant::now();
        let (ok, out, err) = run_cli(&c, via, &["node", "drain", &name]).await;
        assert!(ok, "drain {name}: {err}");
        assert!(out.contains("holds no primary"), "{out}");
        let drained = step.elapsed();
        let holds = admin_of(&c, via).state().await.unwrap().volumes["v"]
            .replicas
            .iter()
            .any(|id| c.nodes[i].name == format!("n{id}"));
        c.nodes[i].stop();
        if holds {
            wait_in_sync(
                &admin_of(&c, via),
                1,
                Duration::from_secs(10),
                "the stopped node out of sync",
            )
            .await;
        }
        c.nodes[i].start();
        wait_in_sync(
            &admin_of(&c, via),
            2,
            Duration::from_secs(60),
            "the restarted node in sync",
        )
        .await;
        let (ok, _, err) = run_cli(&c, via, &["node", "undrain", &name]).await;
        assert!(ok, "undrain {name}: {err}");
        let (checker, stats) = load.finish().await;
        eprintln!(
            "{name}: drained in {} ms, restarted and back in sync after {:.1} s; I/O pause at the initiator {} ms, {} writes, {} failed",
            drained.as_millis(),
            step.elapsed().as_secs_f64(),
            stats.longest.as_millis(),
            stats.writes,
            stats.failed
        );
        writes += stats.writes;
        failed += stats.failed;
        longest = longest.max(stats.longest);
        load = Background::resume(&c, checker);
    }
    let (checker, stats) = load.finish().await;
    failed += stats.failed;
    eprintln!(
        "rolling restart of 3 nodes under load: {writes} writes, {failed} failed, longest pause {} ms",
        longest.as_millis()
    );
    assert_eq!(failed, 0, "no write failed");

    // Then the primary's node is evacuated under the same load: its primary moves
    // away, its replica is rebuilt on the node that held none, and it ends up empty.
    let st = admin.state().await.unwrap();
    let evacuee = st.nodes[&st.volumes["v"].primary].name.clone();
    let spare = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| !holders(&st).contains(&n.to_string()))
        .unwrap();
    let via = (c.index(&evacuee) + 1) % 3;
    let load = Background::resume(&c, checker);
    let step = Instant::now();
    let (ok, out, err) = run_cli(&c, via, &["node", "drain", &evacuee, "--evacuate"]).await;
    assert!(ok, "drain --evacuate {evacuee}: {err}");
    assert!(out.contains("holds no replica"), "{out}");
    let (checker, stats) = load.finish().await;
    let st = admin_of(&c, via).state().await.unwrap();
    assert!(!holders(&st).contains(&evacuee), "{:?}", holders(&st));
    assert!(holders(&st).contains(&spare.to_string()));
    assert_eq!(st.volumes["v"].in_sync.len(), 2);
    eprintln!(
        "{evacuee} evacuated in {:.1} s (its replica rebuilt on {spare}): I/O pause {} ms, {} writes, {} failed",
        step.elapsed().as_secs_f64(),
        stats.longest.as_millis(),
        stats.writes,
        stats.failed
    );
    assert_eq!(stats.failed, 0, "no write failed during the evacuation");
    verify_all(&c, &checker, &[0, 1, 2]).await;
    drop(admin);
}

/// The names of the nodes holding "v".
fn holders(st: &ClusterState) -> Vec<String> {
    let mut names: Vec<String> = st.volumes["v"]
        .replicas
        .iter()
        .map(|id| st.nodes[id].name.clone())
        .collect();
    names.sort();
    names
}

fn admin_of(c: &Cluster, i: usize) -> cluster::AdminClient {
    c.admin(i)
}
