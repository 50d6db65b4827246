//! Failover under load with the integrity checker: a real 3-node cluster, a volume with
//! two replicas, continuous versioned writes through the `initiator` crate, kill -9 of
//! the primary. Every acknowledged write must be readable from the new primary, the
//! I/O pause is measured at the initiator, and once the old primary is back the
//! replicas must be identical.

use std::time::{Duration, Instant};

use cluster::state::Command;
use initiator::checker::Checker;
use initiator::Session;

mod common;
use common::load::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_primary_under_writes_loses_no_acknowledged_write() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = replicated_volume(20, 16 << 20).await;

    let mut checker = Checker::new(BLOCK as usize);
    let all = [0usize, 1, 2];
    let warm = write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_secs(2),
        &all,
    )
    .await;
    assert!(
        checker.acks() > 50,
        "writes flow before the fault (longest gap {warm:?})"
    );

    let rounds: usize = std::env::var("BULWARK_FAILOVER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut pauses = Vec::new();
    for round in 1..=rounds {
        // kill -9 whichever node is primary now, while writes continue.
        let (epoch, portal) = primary_portal(&c, &all).await.unwrap();
        let victim = (0..3)
            .find(|i| c.nodes[*i].addresses().portals[0] == portal)
            .unwrap();
        let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
        let before = checker.acks();
        c.nodes[victim].kill9();
        let pause = write_load(
            &c,
            &mut checker,
            Instant::now() + Duration::from_secs(4),
            &survivors,
        )
        .await;
        let (new_epoch, new_portal) = primary_portal(&c, &survivors).await.unwrap();
        assert!(
            new_epoch > epoch,
            "round {round}: a new primary was promoted"
        );
        assert_ne!(new_portal, portal);
        assert!(
            checker.acks() > before + 50,
            "round {round}: writes resumed on the new primary"
        );
        eprintln!(
            "round {round}: killed {}, I/O pause at the initiator {} ms, {} writes acknowledged so far",
            c.nodes[victim].name,
            pause.as_millis(),
            checker.acks()
        );
        pauses.push(pause);
        verify_all(&c, &checker, &survivors).await;

        // The old primary returns, is resynced and rejoins the in-sync set; then the
        // replicas hold the same bytes.
        c.nodes[victim].start();
        let admin = c.admin(survivors[0]);
        wait_in_sync(
            &admin,
            2,
            Duration::from_secs(30),
            "the old primary back in the in-sync set",
        )
        .await;
        let st = admin.state().await.unwrap();
        let holders: Vec<usize> = st.volumes["v"]
            .replicas
            .iter()
            .map(|id| {
                (0..3)
                    .find(|i| c.nodes[*i].name == st.nodes[id].name)
                    .unwrap()
            })
            .collect();
        let img = |i: usize| std::fs::read(c.nodes[i].dir.join("volumes/v.img")).unwrap();
        assert!(
            img(holders[0]) == img(holders[1]),
            "round {round}: replicas differ after resync"
        );
        // The new primary knew from its map what the old one could lack: the regions
        // written since, and those with writes in flight at the kill. Not all 16.
        let new_primary = (0..3)
            .find(|i| c.nodes[*i].addresses().portals[0] == new_portal)
            .unwrap();
        let sent = c.admin(new_primary).status().await.unwrap().volumes[0].resync_regions_sent;
        eprintln!("round {round}: the old primary rejoined after a resync of {sent} of 16 regions");
        assert!(sent < 16, "round {round}: the old primary got a full sync");
    }
    pauses.sort();
    let median = pauses[pauses.len() / 2];
    eprintln!(
        "failover: {rounds} kills of the primary, 0 acknowledged writes lost, median I/O pause {} ms (max {} ms)",
        median.as_millis(),
        pauses.last().unwrap().as_millis()
    );
    // Under 2 s is the goal (issue 4); allow slack for a loaded CI machine.
    assert!(
        median < Duration::from_secs(3),
        "median I/O pause {median:?}"
    );
}

/// Planned moves under writes: `bulwark volume move` drains the primary, releases its
/// lease and hands over; no write fails, none is lost, the pause is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_moves_under_writes_fail_no_io() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let c = replicated_volume(21, 16 << 20).await;
    let admin = c.admin(0);
    let all = [0usize, 1, 2];
    let mut checker = Checker::new(BLOCK as usize);
    write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_secs(2),
        &all,
    )
    .await;

    let rounds: usize = std::env::var("BULWARK_MOVE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut pauses = Vec::new();
    let mut failed_total = 0;
    let mut logouts_total = 0;
    for round in 1..=rounds {
        let st = admin.state().await.unwrap();
        let v = &st.volumes["v"];
        // Wait for both replicas to be in sync before moving.
        let st = if v.in_sync.len() < 2 {
            wait(
                "both replicas in sync",
                Duration::from_secs(20),
                async || {
                    admin
                        .state()
                        .await
                        .ok()
                        .filter(|s| s.volumes["v"].in_sync.len() == 2)
                },
            )
            .await
        } else {
            st
        };
        let v = &st.volumes["v"];
        let to = v
            .replicas
            .iter()
            .find(|r| **r != v.primary)
            .copied()
            .unwrap();
        let to_name = st.nodes[&to].name.clone();
        let epoch = v.epoch;
        let mover = {
            let admin = c.admin(0);
            let to_name = to_name.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                admin
                    .write(Command::MoveVolume {
                        volume: "v".into(),
                        node: to_name,
                    })
                    .await
            })
        };
        let (pause, failed, logouts) = write_load_counting(
            &c,
            &mut checker,
            Instant::now() + Duration::from_secs(3),
            &all,
        )
        .await;
        logouts_total += logouts;
        mover.await.unwrap().unwrap().unwrap();
        let st = admin.state().await.unwrap();
        assert_eq!(st.volumes["v"].primary, to, "round {round}: moved");
        assert_eq!(st.volumes["v"].epoch, epoch + 1);
        eprintln!(
            "move {round}: to {to_name}, I/O pause {} ms, failed writes {failed}",
            pause.as_millis()
        );
        pauses.push(pause);
        failed_total += failed;
    }
    verify_all(&c, &checker, &all).await;
    pauses.sort();
    let median = pauses[pauses.len() / 2];
    eprintln!(
        "planned moves: {rounds} moves, {} writes acknowledged, {failed_total} failed, median I/O pause {} ms (max {} ms)",
        checker.acks(),
        median.as_millis(),
        pauses.last().unwrap().as_millis()
    );
    assert_eq!(failed_total, 0, "no write fails during a planned move");
    // Issue 19: a move is an ALUA transition on the node's own portals. The session
    // stays and forwards (a multipath initiator then prefers the new primary's path);
    // only sessions that came through a virtual IP are asked to log in again.
    assert_eq!(
        logouts_total, 0,
        "the old primary asked initiators on its own portal to log out"
    );
    // Under 0.5 s is the goal (issue 4); allow slack for a loaded CI machine.
    assert!(
        median < Duration::from_millis(1500),
        "median pause {median:?}"
    );
}

/// A replica down while writes go on: when it returns, the primary sends it only the
/// regions written meanwhile (the dirty regions), not the whole volume, and it rejoins
/// the in-sync set with the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_replica_receives_only_the_dirty_regions() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // 64 MiB = 64 regions of 1 MiB; the load writes LBAs 0..4096 = the first 2 MiB.
    let mut c = replicated_volume(22, 64 << 20).await;
    let admin = c.admin(0);
    let all = [0usize, 1, 2];
    let mut checker = Checker::new(BLOCK as usize);
    write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_secs(1),
        &all,
    )
    .await;

    // The replica dies; writes go on (after the primary drops it from the in-sync set).
    c.nodes[2].kill9();
    let stalled = write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_secs(3),
        &[0, 1],
    )
    .await;
    let st = admin.state().await.unwrap();
    assert_eq!(
        st.volumes["v"].in_sync,
        vec![2],
        "the dead replica left the in-sync set"
    );
    let primary = c.admin(1);
    let sent_before = primary.status().await.unwrap().volumes[0].resync_regions_sent;

    c.nodes[2].start();
    wait_in_sync(
        &admin,
        2,
        Duration::from_secs(30),
        "the replica back in the in-sync set",
    )
    .await;
    let status = primary.status().await.unwrap();
    let v = status.volumes.iter().find(|v| v.name == "v").unwrap();
    let sent = v.resync_regions_sent - sent_before;
    eprintln!(
        "resync after a replica outage: {sent} of 64 regions sent (the load touched 2); writes stalled {} ms while the in-sync set shrank",
        stalled.as_millis()
    );
    assert!(
        (1..=2).contains(&sent),
        "only the dirty regions are resynced, not {sent}"
    );
    let img = |i: usize| std::fs::read(c.nodes[i].dir.join("volumes/v.img")).unwrap();
    assert!(
        img(1) == img(2),
        "the replicas hold the same bytes after resync"
    );
    verify_all(&c, &checker, &all).await;

    // Grow the replicated volume online: the initiator sees the new capacity and can
    // write past the old end; both replicas grow and stay identical.
    commit(
        &admin,
        Command::ResizeVolume {
            name: "v".into(),
            size_bytes: 96 << 20,
        },
    )
    .await;
    let (_, portal) = primary_portal(&c, &all).await.unwrap();
    let mut s = connect(portal, IQN).await.expect("session");
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let blocks = wait("the new capacity", Duration::from_secs(10), async || {
        let r = s.command(0, &cdb, None, 32).await.ok()?;
        let last = u64::from_be_bytes(r.data.get(..8)?.try_into().ok()?);
        (r.status == 0 && last + 1 == (96 << 20) / u64::from(BLOCK)).then_some(last + 1)
    })
    .await;
    let lba = blocks - 1;
    let (version, block) = checker.next_write(lba);
    let r = s.write16(0, lba, &block, BLOCK, true).await.unwrap();
    assert_eq!(r.status, 0, "a write past the old end");
    checker.acked(lba, version);
    let r = s.read16(0, lba, 1, BLOCK).await.unwrap();
    checker.verify(lba, &r.data).unwrap();
    wait(
        "both replicas grown and identical",
        Duration::from_secs(10),
        async || {
            let (a, b) = (img(1), img(2));
            (a.len() == 96 << 20 && a == b).then_some(())
        },
    )
    .await;
}

/// Runs `bulwark ARGS` against node `i` of `c`: whether it succeeded, its standard
/// output and its standard error.
fn try_cli(c: &Cluster, i: usize, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .arg("--node")
        .arg(c.nodes[i].addresses().control.to_string())
        .arg("--token")
        .arg(c.token().to_string())
        .output()
        .expect("bulwark runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `bulwark ARGS` against node `i` of `c`, which must succeed; its standard output.
fn cli(c: &Cluster, i: usize, args: &[&str]) -> String {
    let (ok, out, err) = try_cli(c, i, args);
    assert!(ok, "bulwark {args:?}: {err}");
    out
}

/// `bulwark volume verify` under load finds nothing on healthy replicas, finds the
/// regions of a replica damaged behind Bulwark's back, and `--repair` makes the
/// replicas identical again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_and_repairs_a_damaged_replica_under_load() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let c = replicated_volume(27, 16 << 20).await;
    let all = [0usize, 1, 2];
    let mut checker = Checker::new(BLOCK as usize);
    write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_secs(1),
        &all,
    )
    .await;

    // Healthy replicas, writes running: identical, and the writes go on.
    let (node, token) = (
        c.nodes[0].addresses().control.to_string(),
        c.token().to_string(),
    );
    let verify = |args: Vec<&'static str>| {
        let (node, token) = (node.clone(), token.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(BIN)
                .args(["volume", "verify", "v"])
                .args(args)
                .args(["--node", &node, "--token", &token])
                .output()
                .expect("bulwark runs");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        })
    };
    let running = verify(vec![]);
    let mut longest = Duration::ZERO;
    while !running.is_finished() {
        let pause = write_load(
            &c,
            &mut checker,
            Instant::now() + Duration::from_millis(300),
            &all,
        )
        .await;
        longest = longest.max(pause);
    }
    let (ok, out) = running.await.unwrap();
    eprintln!(
        "verify under load: {}; longest write pause meanwhile {} ms",
        out.trim(),
        longest.as_millis()
    );
    assert!(ok && out.contains("16 of 16 regions identical"), "{out}");
    // Writes to a region wait only while it is compared.
    assert!(
        longest < Duration::from_secs(2),
        "writes paused {longest:?}"
    );

    // Damage n3's copy of regions 5 and 9 behind Bulwark's back (outside the load).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.nodes[2].dir.join("volumes/v.img"))
            .unwrap();
        f.write_all_at(b"bit rot", 5 << 20).unwrap();
        f.write_all_at(b"bit rot", (9 << 20) + 4096).unwrap();
    }
    let (ok, out) = verify(vec![]).await.unwrap();
    eprintln!("verify of a damaged replica: {}", out.trim());
    assert!(!ok, "differences fail the command");
    assert!(
        out.contains("2 region(s) DIFFER on n3") && out.contains("regions 5, 9"),
        "{out}"
    );
    let status = cli(&c, 0, &["status"]);
    assert!(
        status.contains("last verify: 2 region(s) DIFFER on n3"),
        "{status}"
    );

    let (ok, out) = verify(vec!["--repair"]).await.unwrap();
    assert!(ok && out.contains("repaired from the primary"), "{out}");
    let img = |i: usize| std::fs::read(c.nodes[i].dir.join("volumes/v.img")).unwrap();
    wait(
        "the repaired replica identical",
        Duration::from_secs(10),
        async || (img(1) == img(2)).then_some(()),
    )
    .await;
    let (ok, out) = verify(vec![]).await.unwrap();
    assert!(ok && out.contains("16 of 16 regions identical"), "{out}");
    verify_all(&c, &checker, &all).await;
}

/// A resync keeps to the cluster's resync rate, `bulwark status` shows its progress
/// (percent, rate, time left) and the event log its start and end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_resync_keeps_its_rate_and_shows_its_progress() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const REGIONS: u64 = 24;
    const RATE_MIB: u64 = 4;
    let mut c = replicated_volume(26, 64 << 20).await;
    let admin = c.admin(0);
    let settings = cli(&c, 0, &["cluster", "settings", "--resync-rate", "4MiB"]);
    assert!(
        settings.contains("resync rate:        4.0 MiB/s"),
        "{settings}"
    );

    // The replica is down while one block of each of 24 regions is written.
    c.nodes[2].kill9();
    let mut checker = Checker::new(BLOCK as usize);
    let (_, portal) = primary_portal(&c, &[0, 1]).await.expect("a primary");
    let mut s = connect(portal, IQN).await.expect("a session");
    let per_region = (1 << 20) / u64::from(BLOCK);
    for i in 0..REGIONS {
        let lba = i * per_region;
        let (version, block) = checker.next_write(lba);
        wait("a write", Duration::from_secs(15), async || {
            let r = s.write16(0, lba, &block, BLOCK, false).await.ok()?;
            (r.status == 0).then_some(())
        })
        .await;
        checker.acked(lba, version);
    }

    let primary = c.admin(1);
    let started = Instant::now();
    c.nodes[2].start();
    let view = wait("the resync measured", Duration::from_secs(20), async || {
        let st = primary.status().await.ok()?;
        let v = st.volumes.into_iter().find(|v| v.name == "v")?;
        let r = v.resyncs.first()?.clone();
        (r.rate_bytes_per_s > 0 && r.done_regions > 0).then_some(r)
    })
    .await;
    assert_eq!(view.node, 3, "the returning replica is n3");
    let text = cli(&c, 0, &["status"]);
    let line = text
        .lines()
        .find(|l| l.contains("RESYNC to n3"))
        .unwrap_or_else(|| panic!("no resync line in:\n{text}"));
    assert!(
        line.contains("% (") && line.contains("/s") && line.contains("left"),
        "{line}"
    );
    wait_in_sync(
        &admin,
        2,
        Duration::from_secs(30),
        "the replica back in the in-sync set",
    )
    .await;
    let took = started.elapsed();
    eprintln!(
        "resync of {REGIONS} MiB at {RATE_MIB} MiB/s took {:.1} s; status said: {}",
        took.as_secs_f64(),
        line.trim()
    );
    // The throttle is an upper bound on speed: one region of burst, then the rate.
    let fastest = Duration::from_secs_f64((REGIONS - 2) as f64 / RATE_MIB as f64);
    assert!(
        took >= fastest,
        "{REGIONS} regions at {RATE_MIB} MiB/s cannot take {took:?}"
    );
    assert!(
        view.rate_bytes_per_s <= (2 * RATE_MIB) << 20,
        "measured {} B/s",
        view.rate_bytes_per_s
    );
    // The event log has its start and its end (measured once a second).
    let said = async |what: &str| {
        let events = primary.status().await.ok()?.events;
        events.into_iter().find(|e| {
            e.kind.starts_with("resync_")
                && e.message.starts_with("resync of v to n3")
                && e.message.contains(what)
        })
    };
    let start = said("started").await.expect("a resync-started event");
    assert!(
        start.message.contains("started: 24.0 MiB to send"),
        "{}",
        start.message
    );
    let end = wait(
        "the resync-finished event",
        Duration::from_secs(5),
        async || said("finished").await,
    )
    .await;
    assert!(
        end.message.contains("finished: 24.0 MiB in"),
        "{}",
        end.message
    );
    let img = |i: usize| std::fs::read(c.nodes[i].dir.join("volumes/v.img")).unwrap();
    assert!(img(1) == img(2), "the replicas hold the same bytes");
    verify_all(&c, &checker, &[0, 1, 2]).await;
}

/// With a fence command set, the leader promotes a new primary only once the program
/// has fenced the old one: while it fails the volume stays offline (and says why),
/// and the failover completes once it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_waits_for_the_fence_command() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = replicated_volume_with(28, 16 << 20, &hooks_dir_args(dir.path())).await;
    let (script, answer, log) = (
        dir.path().join("fence"),
        dir.path().join("answer"),
        dir.path().join("fenced"),
    );
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$BULWARK_FENCE_NODE $BULWARK_FENCE_VOLUMES $BULWARK_FENCE_EPOCH\" >> {}\necho 'power switch unreachable' >&2\nexit $(cat {})\n",
            log.display(),
            answer.display()
        ),
    )
    .unwrap();
    std::fs::write(&answer, "1").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shown = cli(
        &c,
        0,
        &[
            "cluster",
            "settings",
            "--fence-command",
            script.to_str().unwrap(),
        ],
    );
    assert!(shown.contains("fence command:      /"), "{shown}");

    let admin = c.admin(0);
    let mut checker = Checker::new(BLOCK as usize);
    write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_millis(500),
        &[0, 1, 2],
    )
    .await;
    c.nodes[1].kill9(); // n2, the primary
    let killed = Instant::now();
    // The fence fails: no promotion, and the event log says why.
    wait("a failed fencing", Duration::from_secs(10), async || {
        let events = admin.status().await.ok()?.events;
        events
            .into_iter()
            .find(|e| e.kind == "fence" && e.message.contains("fencing n2 failed"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        admin.state().await.unwrap().volumes["v"].epoch,
        1,
        "no promotion while the old primary is not fenced"
    );
    let said = admin.status().await.unwrap().events;
    let failed = said
        .iter()
        .find(|e| e.message.contains("fencing n2 failed"))
        .unwrap();
    assert!(
        failed.message.contains("power switch unreachable")
            && failed.message.contains("stay(s) offline"),
        "{}",
        failed.message
    );

    // The fence works now: the next try fences, then promotes n3.
    std::fs::write(&answer, "0").unwrap();
    let st = wait(
        "the promotion after fencing",
        Duration::from_secs(15),
        async || {
            admin
                .state()
                .await
                .ok()
                .filter(|s| s.volumes["v"].epoch == 2)
        },
    )
    .await;
    eprintln!(
        "fenced failover: new primary {} {} ms after the kill (one failed fencing, retried after 5 s)",
        st.nodes[&st.volumes["v"].primary].name,
        killed.elapsed().as_millis()
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(calls.lines().all(|l| l == "n2 v 1"), "{calls}");
    assert!(calls.lines().count() >= 2, "{calls}");
    write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_millis(500),
        &[0, 2],
    )
    .await;
    verify_all(&c, &checker, &[0, 2]).await;
}

/// A small tmpfs on a node's volume folder: its disk fills up. Unmounted (lazily, the
/// node may still hold files open) when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&dir).unwrap();
        let opt = format!("size={size}");
        run_tool(
            "mount",
            "mount",
            &["-t", "tmpfs", "-o", &opt, "tmpfs", dir.to_str().unwrap()],
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Disks that fill up: a replica whose writes fail leaves the in-sync set and the
/// primary keeps serving; a primary whose writes fail gives its role up and an
/// in-sync replica takes over. No acknowledged write is lost, and `bulwark status`
/// and the event log say what happened. Once there is room again the stopped replicas
/// are retried, resynced and rejoin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disks_drop_a_replica_and_fail_a_primary_over() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let c = Cluster::three_voters(29).await;
    // n2 (the primary) fills at about 8 MiB, n3 at about 4 MiB, n1 has room.
    let n3_disk = SmallDisk::mount(c.nodes[2].dir.join("volumes"), "4m");
    let n2_disk = SmallDisk::mount(c.nodes[1].dir.join("volumes"), "8m");
    let admin = c.admin(0);
    commit(
        &admin,
        Command::CreateVolume {
            name: "v".into(),
            size_bytes: 16 << 20,
            replicas: 3,
            block_size: BLOCK,
            physical_block_size: None,
            nodes: vec!["n2".into(), "n3".into(), "n1".into()],
        },
    )
    .await;
    for cmd in [
        Command::CreateTarget {
            iqn: IQN.into(),
            alias: None,
        },
        Command::SetTargetAccess {
            iqn: IQN.into(),
            allow_any: Some(true),
            allow_target_reset: None,
        },
        Command::AddLun {
            iqn: IQN.into(),
            lun: Some(0),
            volume: "v".into(),
        },
    ] {
        commit(&admin, cmd).await;
    }

    // One block every 4 KiB (a page of tmpfs each) up to 14 MiB, reconnecting to
    // whichever node is primary.
    let all = [0usize, 1, 2];
    let mut checker = Checker::new(BLOCK as usize);
    let mut session: Option<Session> = None;
    let mut longest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0..(14u64 << 20) / 4096 {
        let lba = i * 4096 / u64::from(BLOCK);
        let (version, block) = checker.next_write(lba);
        let started = Instant::now();
        loop {
            assert!(
                Instant::now() < deadline,
                "writes stopped at {} MiB",
                (i * 4096) >> 20
            );
            if session.is_none() {
                if let Some((_, portal)) = primary_portal(&c, &all).await {
                    session = connect(portal, IQN).await;
                }
            }
            let Some(s) = session.as_mut() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match s.write16(0, lba, &block, BLOCK, false).await {
                Ok(r) if r.status == 0 => break,
                Ok(r) if retryable(r.status, &r.sense) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => {
                    session = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        checker.acked(lba, version);
        longest = longest.max(started.elapsed());
    }
    let st = admin.state().await.unwrap();
    let v = &st.volumes["v"];
    let name = |id| st.nodes[&id].name.clone();
    eprintln!(
        "full disks: 14 MiB written, longest write {} ms; primary now {} (epoch {}), in sync {:?}",
        longest.as_millis(),
        name(v.primary),
        v.epoch,
        v.in_sync.iter().map(|n| name(*n)).collect::<Vec<_>>()
    );
    assert_eq!(name(v.primary), "n1", "the primary with room took over");
    assert_eq!(
        v.in_sync,
        vec![1],
        "the nodes with full disks left the in-sync set"
    );
    let events: Vec<String> = admin
        .status()
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.message)
        .collect();
    let text = cli(&c, 0, &["status"]);
    // The full disk stops n3 on whichever write reaches it first: a block of the stream
    // ("disk write failed"), or, when n3 had already left the in-sync set (slow acks on a
    // loaded machine) and the failover's seal came first, the new epoch ("cannot persist
    // the epoch"). Either way the status names the full disk.
    let marker = "n3: replica STOPPED (";
    let n3_reason = text
        .find(marker)
        .and_then(|at| text[at + marker.len()..].split("); ").next())
        .unwrap_or_else(|| panic!("n3 is reported stopped:\n{text}"));
    assert!(
        (n3_reason.starts_with("disk write failed: ")
            || n3_reason.starts_with("cannot persist the epoch: "))
            && n3_reason.contains("No space left on device"),
        "n3's reason is its full disk: {n3_reason}\n{text}"
    );
    let status_n2 = c.admin(1).status().await.unwrap();
    assert!(
        status_n2
            .events
            .iter()
            .any(|e| e.kind == "disk" && e.message.contains("n2's copy of v failed")),
        "{events:?}"
    );
    verify_all(&c, &checker, &[0]).await;

    // Room again: the stopped replicas are retried, resynced, and rejoin.
    for d in [&n2_disk, &n3_disk] {
        run_tool(
            "mount",
            "mount",
            &["-o", "remount,size=32m", d.0.to_str().unwrap()],
        );
    }
    let back = Instant::now();
    let st = wait_in_sync(
        &admin,
        3,
        Duration::from_secs(60),
        "both replicas back in sync",
    )
    .await;
    eprintln!(
        "full disks: with room again both replicas rejoined in {} ms (primary {})",
        back.elapsed().as_millis(),
        st.nodes[&st.volumes["v"].primary].name
    );
    verify_all(&c, &checker, &all).await;
}

/// Links cut with nftables between one node's address and the others' (loopback
/// aliases; the initiator, connecting from 127.0.0.1, still reaches every portal).
/// Removed when dropped.
struct Partition {
    table: String,
}

/// Runs a system tool the fault tests need (`package` names its Debian package, which
/// scripts/test-all installs) and fails the test with its message if it fails.
fn run_tool(program: &str, package: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (Debian package {package}): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nft(args: &[&str]) {
    run_tool("nft", "nftables", args)
}

impl Partition {
    fn cut(block: u8, node: u8, others: &[u8]) -> Partition {
        let table = format!("bulwark_test_{block}");
        nft(&["add", "table", "inet", &table]);
        nft(&[
            "add",
            "chain",
            "inet",
            &table,
            "out",
            "{ type filter hook output priority 0 ; policy accept ; }",
        ]);
        let me = format!("127.0.{block}.{node}");
        let set = format!(
            "{{ {} }}",
            others
                .iter()
                .map(|o| format!("127.0.{block}.{o}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        nft(&[
            "add", "rule", "inet", &table, "out", "ip", "saddr", &me, "ip", "daddr", &set, "drop",
        ]);
        nft(&[
            "add", "rule", "inet", &table, "out", "ip", "saddr", &set, "ip", "daddr", &me, "drop",
        ]);
        Partition { table }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
    }
}

/// The primary is cut from the rest of the cluster but its initiator still reaches it:
/// it stops acknowledging before the new primary starts, so no write is acknowledged
/// by both; after healing every acknowledged write is there and the replicas agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_primary_stops_before_the_new_one_starts() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let c = replicated_volume(23, 16 << 20).await;
    let admin = c.admin(0);
    let old_portal = c.nodes[1].addresses().portals[0];
    let mut checker = Checker::new(BLOCK as usize);
    write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_secs(1),
        &[0],
    )
    .await;
    let checker = std::sync::Arc::new(std::sync::Mutex::new(checker));

    let cut = Partition::cut(23, 2, &[1, 3]);
    let cut_at = Instant::now();
    let until = cut_at + Duration::from_secs(5);

    // Initiator A keeps writing to the old primary, LBAs 0..2048.
    let a = {
        let checker = checker.clone();
        tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut session: Option<Session> = None;
            let mut n = 0u64;
            while Instant::now() < until {
                if session.is_none() {
                    session = connect(old_portal, IQN).await;
                    if session.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                n += 1;
                let lba = (n * 7919) % 2048;
                let (version, block) = checker.lock().unwrap().next_write(lba);
                let s = session.as_mut().unwrap();
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    s.write16(0, lba, &block, BLOCK, false),
                )
                .await
                {
                    Ok(Ok(r)) if r.status == 0 => {
                        acks.push(Instant::now());
                        checker.lock().unwrap().acked(lba, version);
                    }
                    Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                    _ => session = None,
                }
            }
            acks
        })
    };
    // Initiator B writes wherever the cluster says the primary is, LBAs 2048..4096.
    let mut b_acks = Vec::new();
    let mut session: Option<Session> = None;
    let mut n = 0u64;
    while Instant::now() < until {
        if session.is_none() {
            match primary_portal(&c, &[0, 2]).await {
                Some((_, p)) if p != old_portal => session = connect(p, IQN).await,
                _ => {}
            }
            if session.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        n += 1;
        let lba = 2048 + (n * 7919) % 2048;
        let (version, block) = checker.lock().unwrap().next_write(lba);
        let s = session.as_mut().unwrap();
        match tokio::time::timeout(
            Duration::from_secs(1),
            s.write16(0, lba, &block, BLOCK, false),
        )
        .await
        {
            Ok(Ok(r)) if r.status == 0 => {
                b_acks.push(Instant::now());
                checker.lock().unwrap().acked(lba, version);
            }
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            _ => session = None,
        }
    }
    let a_acks = a.await.unwrap();
    let first_new = *b_acks.first().expect("the new primary served writes");
    let last_old = a_acks.last().copied();
    eprintln!(
        "partition: old primary acknowledged {} writes after the cut, the last {} ms after it; the new primary's first ack came {} ms after the cut",
        a_acks.len(),
        last_old.map_or(0, |t| (t - cut_at).as_millis()),
        (first_new - cut_at).as_millis()
    );
    if let Some(last_old) = last_old {
        assert!(
            last_old < first_new,
            "a write was acknowledged by the old primary after the new one served"
        );
    }

    drop(cut);
    wait_in_sync(
        &admin,
        2,
        Duration::from_secs(30),
        "both replicas in sync again",
    )
    .await;
    let checker = std::sync::Arc::try_unwrap(checker)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    verify_all(&c, &checker, &[0, 2]).await;
    let img = |i: usize| std::fs::read(c.nodes[i].dir.join("volumes/v.img")).unwrap();
    assert!(
        img(1) == img(2),
        "the replicas hold the same bytes after healing"
    );
}

/// Issue 4's figure, opt-in (it writes 1 GiB and compares two 10 GiB images):
/// `cargo test --release -p bulwark --test failover -- --ignored one_gib`.
/// A replica is down while 1 GiB is written across a 10 GiB volume (1 MiB at the start
/// of every tenth region); on return it receives only those regions and rejoins the
/// in-sync set with the same bytes as the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "opt-in: writes 1 GiB; run with --ignored"]
async fn one_gib_written_while_a_replica_is_down_resyncs_only_its_regions() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const SIZE: u64 = 10 << 30;
    const REGION: u64 = 1 << 20;
    const CHUNK: u64 = 1 << 20;
    let mut c = replicated_volume(24, SIZE).await;
    let admin = c.admin(0);
    let all = [0usize, 1, 2];
    let (_, portal) = wait("the volume served", Duration::from_secs(20), async || {
        primary_portal(&c, &all).await
    })
    .await;
    let mut s = wait("a session", Duration::from_secs(20), async || {
        connect(portal, IQN).await
    })
    .await;
    let probe = vec![0u8; BLOCK as usize];
    wait("writes accepted", Duration::from_secs(20), async || {
        let r = s.write16(0, 0, &probe, BLOCK, false).await.ok()?;
        (r.status == 0).then_some(())
    })
    .await;

    c.nodes[2].kill9();
    let chunks = (1u64 << 30) / CHUNK;
    let stride = SIZE / chunks;
    let started = Instant::now();
    let mut written = 0u64;
    for i in 0..chunks {
        let offset = i * stride;
        let data = vec![(i % 251) as u8 + 1; CHUNK as usize];
        let lba = offset / u64::from(BLOCK);
        let ok = loop {
            match s.write16(0, lba, &data, BLOCK, false).await {
                Ok(r) if r.status == 0 => break true,
                // NOT READY while the in-sync set shrinks: retry, as an initiator does.
                Ok(r) if retryable(r.status, &r.sense) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if started.elapsed() > Duration::from_secs(300) {
                        break false;
                    }
                }
                other => panic!("write of chunk {i} failed: {other:?}"),
            }
        };
        assert!(ok, "writes did not resume");
        written += CHUNK;
    }
    let primary = c.admin(1);
    let sent_before = primary.status().await.unwrap().volumes[0].resync_regions_sent;
    let back = Instant::now();
    c.nodes[2].start();
    wait_in_sync(
        &admin,
        2,
        Duration::from_secs(300),
        "the replica back in the in-sync set",
    )
    .await;
    let took = back.elapsed();
    let status = primary.status().await.unwrap();
    let v = status.volumes.iter().find(|v| v.name == "v").unwrap();
    let sent = v.resync_regions_sent - sent_before;
    let total = SIZE / REGION;
    eprintln!(
        "dirty-region resync: {} MiB written to a {} GiB volume while a replica was down; \
         on return it received {sent} of {total} regions ({} MiB, {:.1}% of the volume) \
         and rejoined the in-sync set {:.1} s after it restarted",
        written >> 20,
        SIZE >> 30,
        (sent * REGION) >> 20,
        sent as f64 * 100.0 / total as f64,
        took.as_secs_f64()
    );
    assert!(
        (chunks..=chunks + 2).contains(&sent),
        "only the {chunks} dirty regions (and at most the probe's) are resynced, not {sent}"
    );
    // The same bytes on both replicas, compared a chunk at a time.
    use std::io::Read;
    let open = |i: usize| std::fs::File::open(c.nodes[i].dir.join("volumes/v.img")).unwrap();
    let (mut a, mut b) = (open(1), open(2));
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut at = 0u64;
    loop {
        let n = a.read(&mut ba).unwrap();
        let m = b.read(&mut bb[..n.max(1)]).unwrap();
        if n == 0 {
            assert_eq!(m, 0, "replica image longer than the primary's");
            break;
        }
        b.read_exact(&mut bb[m..n]).unwrap();
        assert!(ba[..n] == bb[..n], "replicas differ near byte {at}");
        at += n as u64;
    }
    assert_eq!(at, SIZE);
}

/// A client in its own network namespace, reaching the cluster only through a veth
/// link (198.18.0.0/24) on which the target's virtual IP lives. Removed when dropped.
struct ClientNamespace {
    ns: String,
    host_if: String,
}

fn ip(args: &[&str]) {
    run_tool("ip", "iproute2", args)
}

impl ClientNamespace {
    fn new() -> ClientNamespace {
        let id = std::process::id() % 100_000;
        let c = ClientNamespace {
            ns: format!("bwk-client-{id}"),
            host_if: format!("bwkh{id}"),
        };
        let peer = format!("bwkc{id}");
        ip(&["netns", "add", &c.ns]);
        ip(&[
            "link", "add", &c.host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &c.ns]);
        ip(&["link", "set", &c.host_if, "up"]);
        let n = |args: &[&str]| {
            let mut a = vec!["-n", c.ns.as_str()];
            a.extend_from_slice(args);
            ip(&a)
        };
        n(&["addr", "add", "198.18.0.1/24", "dev", &peer]);
        n(&["link", "set", &peer, "up"]);
        n(&["link", "set", "lo", "up"]);
        c
    }

    fn command(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

impl Drop for ClientNamespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Issue 4, virtual IPs: the target's VIP follows its primary. libiscsi's `iscsi-perf
/// -x` runs from another network namespace through the VIP while the primary is
/// killed with -9, `BULWARK_VIP_ROUNDS` times (default 3, so the median is not the
/// worst round); each time it reconnects
/// through the VIP to the new primary, and the seconds in which it completed no I/O
/// are counted (iscsi-perf reports once a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_ip_follows_the_primary_and_iscsi_perf_reconnects_through_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let rounds: usize = std::env::var("BULWARK_VIP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let client = ClientNamespace::new();
    let mut c = replicated_volume(25, 64 << 20).await;
    let admin = c.admin(0);
    commit(
        &admin,
        Command::AddVip {
            iqn: IQN.into(),
            vip: cluster::state::VirtualIp {
                address: "198.18.0.100".parse().unwrap(),
                prefix: 24,
                interface: client.host_if.clone(),
            },
        },
    )
    .await;
    let url = format!("iscsi://198.18.0.100/{IQN}/0");
    let all = [0usize, 1, 2];
    let mut idle_seconds = Vec::new();
    for round in 0..rounds {
        wait(
            "reads served through the virtual IP",
            Duration::from_secs(30),
            async || {
                let out = client
                    .command("qemu-io")
                    .args(["-f", "raw", "-c", "read 0 4k"])
                    .arg(&url)
                    .output()
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .contains("read 4096/4096")
                    .then_some(())
            },
        )
        .await;
        let (epoch, _) = primary_portal(&c, &all).await.unwrap();
        let st = c.state(0).await.unwrap();
        let primary = st.volumes["v"].primary;
        let victim = c
            .nodes
            .iter()
            .position(|n| st.nodes.get(&primary).map(|p| p.name.as_str()) == Some(n.name.as_str()))
            .unwrap();
        let perf = client
            .command("iscsi-perf")
            .args(["-x", "20", "-m", "8", "-b", "8", "-t", "9"])
            .arg(&url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("iscsi-perf (Debian package libiscsi-bin)");
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.nodes[victim].kill9();
        // Bounded: a libiscsi that cannot reconnect must fail the test, not hang it.
        let out = tokio::task::spawn_blocking(move || {
            let mut perf = perf;
            let deadline = Instant::now() + Duration::from_secs(25);
            while perf.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = perf.kill();
            perf.wait_with_output()
        })
        .await
        .unwrap()
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n")
            + &String::from_utf8_lossy(&out.stderr);
        // The run is over once iscsi-perf prints its summary. It may not exit after a
        // reconnect: its in-flight count ends at -1 and it waits forever (libiscsi's
        // iscsi-perf does the same against tgt after a kill -9 and restart), so the
        // bounded wait above kills it; the summary is what proves the run finished.
        // Its accounting can also go wrong the other way: it keeps reading past the end,
        // its seconds-left counter wrapping below zero (hours in the quadrillions). The
        // run's time is over then too; the stamps up to zero still show the pause.
        let ran_past_end = text.lines().any(|l| {
            l.split_once(" - lba ").is_some_and(|(stamp, _)| {
                stamp
                    .trim()
                    .split(':')
                    .next()
                    .and_then(|h| h.parse::<u64>().ok())
                    .is_some_and(|h| h >= 24)
            })
        });
        assert!(
            ran_past_end
                || text
                    .lines()
                    .any(|l| l.trim_start().starts_with("iops average")),
            "iscsi-perf did not reach the end of its run:\n{text}"
        );
        // One line per second that completed reads, stamped with the seconds left
        // ("00:00:07 - lba …, iops current N"); a second without a completion prints
        // nothing, so the missing stamps are the pause.
        let busy_seconds: std::collections::BTreeSet<u64> = text
            .lines()
            .filter_map(|l| {
                let (stamp, rest) = l.split_once(" - lba ")?;
                let n: u64 = rest
                    .split("iops current ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                let mut hms = stamp.trim().split(':').map(|x| x.parse::<u64>().ok());
                let left = hms
                    .next()??
                    .checked_mul(3600)?
                    .checked_add(hms.next()?? * 60)?
                    .checked_add(hms.next()??)?;
                (n > 0 && left < 3600).then_some(left)
            })
            .collect();
        let (Some(&first), Some(&last)) = (busy_seconds.first(), busy_seconds.last()) else {
            panic!("iscsi-perf reported no I/O:\n{text}");
        };
        assert!(
            first <= 2,
            "no I/O through the VIP at the end of the run:\n{text}"
        );
        let idle = (last - first + 1) as usize - busy_seconds.len();
        let per_second: Vec<u64> = busy_seconds.iter().rev().copied().collect();
        let new_epoch = primary_portal(&c, &all).await.unwrap().0;
        assert!(new_epoch > epoch, "a new primary took over");
        eprintln!(
            "round {round}: iscsi-perf through the VIP: {idle} second(s) without a completed read (seconds left with reads: {per_second:?})"
        );
        idle_seconds.push(idle);
        c.nodes[victim].start();
        wait_in_sync(
            &admin,
            2,
            Duration::from_secs(30),
            "the old primary back in the in-sync set",
        )
        .await;
    }
    idle_seconds.sort();
    let median = idle_seconds[idle_seconds.len() / 2];
    eprintln!(
        "virtual IP failover, {rounds} kill -9 rounds: median {median} whole second(s) without I/O at iscsi-perf (pause < {} s)",
        median + 1
    );
    assert!(
        median <= 1,
        "the I/O pause through the VIP is 2 s or more (median {median} idle seconds)"
    );
}
