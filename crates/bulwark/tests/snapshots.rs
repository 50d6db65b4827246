//! Snapshots on a real 3-node cluster (issue 21), each node's volumes on an XFS image
//! of its own (a loop device: reflinks need XFS or btrfs; needs root and xfsprogs,
//! which scripts/test-all installs). Under writes from the integrity checker, a
//! snapshot holds every write acknowledged before it was asked for, is the same on
//! every member, pauses writes for a few milliseconds (measured at the initiator and
//! on the primary, printed), and goes from every node when deleted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::state::Command;
use initiator::checker::{decode, Checker};

mod common;
use common::load::*;
use common::*;

/// An XFS image mounted on a folder; unmounted (lazily: a node may still hold files
/// open) when dropped.
struct Xfs {
    mnt: PathBuf,
    _image: tempfile::TempDir,
}

/// Three voting nodes on 127.0.`block`.1-3, each node's volumes folder on an XFS image
/// of `size` bytes, mounted before the node starts (it checks then that its file system
/// shares blocks, and tells the cluster).
async fn three_voters_on_xfs(block: u8, size: u64) -> (Cluster, Vec<Xfs>) {
    let mut c = Cluster::new(block, 3);
    let disks = (0..3)
        .map(|i| Xfs::mount_on_sized(&c.nodes[i].dir.join("volumes"), size))
        .collect();
    c.init().await;
    c.join(1).await;
    c.join(2).await;
    c.wait_voters(0, 3).await;
    (c, disks)
}

impl Xfs {
    /// On a sparse image of `size` bytes.
    fn mount_on_sized(mnt: &Path, size: u64) -> Xfs {
        let image = tempfile::tempdir().unwrap();
        let img = image.path().join("xfs.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        std::fs::create_dir_all(mnt).unwrap();
        for (program, args) in [
            (
                "mkfs.xfs",
                vec!["-q", "-m", "reflink=1", img.to_str().unwrap()],
            ),
            (
                "mount",
                vec!["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
            ),
        ] {
            let out = std::process::Command::new(program)
                .args(&args)
                .output()
                .unwrap_or_else(|e| panic!("{program} (xfsprogs; tests run as root): {e}"));
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Xfs {
            mnt: mnt.to_path_buf(),
            _image: image,
        }
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

fn snapshot_file(c: &Cluster, i: usize, name: &str) -> PathBuf {
    c.nodes[i].dir.join("volumes").join(format!("v@{name}.img"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_under_writes_holds_what_was_acknowledged_on_every_member() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (mut c, _disks) = three_voters_on_xfs(44, 512 << 20).await;
    let admin = c.admin(0);
    let st = wait(
        "every node's start-up check",
        Duration::from_secs(20),
        async || {
            admin
                .state()
                .await
                .ok()
                .filter(|s| s.nodes.values().all(|n| n.shares_blocks.is_some()))
        },
    )
    .await;
    assert!(
        st.nodes.values().all(|n| n.shares_blocks == Some(true)),
        "XFS shares blocks: {:?}",
        st.nodes
    );
    commit(
        &admin,
        Command::CreateVolume {
            name: "v".into(),
            size_bytes: 64 << 20,
            replicas: 3,
            block_size: BLOCK,
            physical_block_size: None,
            nodes: vec!["n2".into(), "n3".into(), "n1".into()],
        },
    )
    .await;
    target_with_lun(&admin, IQN, "v").await;
    let all = [0usize, 1, 2];
    wait_in_sync(&admin, 3, Duration::from_secs(30), "three copies in sync").await;

    // Writes acknowledged before the snapshot is asked for.
    let mut checker = Checker::new(BLOCK as usize);
    let _ = write_load(
        &c,
        &mut checker,
        Instant::now() + Duration::from_millis(1500),
        &all,
    )
    .await;
    let before = checker.clone();
    assert!(
        before.acks() > 0,
        "no write went through before the snapshot"
    );

    // More writes while the snapshot is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let load = Load {
        stop: Some(stop.clone()),
        ..Load::default()
    };
    let reach = Reach::of(&c);
    let writer = tokio::spawn(async move {
        let stats = run_load_via(
            &reach,
            &mut checker,
            Instant::now() + Duration::from_secs(30),
            &all,
            &load,
        )
        .await;
        (checker, stats)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, out, err) = run_cli(&c, 0, &["snapshot", "create", "v", "s1"]).await;
    assert!(ok, "snapshot create: {out}{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (checker, stats) = writer.await.unwrap();
    assert_eq!(stats.failed, 0, "writes failed during the snapshot");
    let st = admin.state().await.unwrap();
    let s = &st.volumes["v"].snapshots["s1"];
    let mut members: Vec<String> = s.members.iter().map(|m| st.node_name(*m)).collect();
    members.sort();
    eprintln!(
        "snapshot: {}; writes held on the primary {:.1} ms; the longest gap between two writes at the initiator {} ms ({} writes meanwhile)",
        out.trim(),
        s.pause_us.unwrap_or(0) as f64 / 1000.0,
        stats.longest.as_millis(),
        stats.writes
    );
    assert!(s.ready);
    assert_eq!(members, ["n1", "n2", "n3"], "every in-sync member holds it");
    assert!(
        s.pause_us.is_some_and(|us| us < 50_000),
        "writes held {:?} µs on the primary",
        s.pause_us
    );

    // The same bytes on every member, holding every write acknowledged before it was
    // asked for, and nothing never written.
    let copies: Vec<Vec<u8>> = all
        .iter()
        .map(|i| std::fs::read(snapshot_file(&c, *i, "s1")).unwrap())
        .collect();
    assert!(
        copies.iter().all(|x| *x == copies[0]),
        "the members' copies differ"
    );
    let mut newer = 0;
    for lba in checker.lbas().collect::<Vec<_>>() {
        let at = (lba * u64::from(BLOCK)) as usize;
        let block = &copies[0][at..at + BLOCK as usize];
        checker
            .verify_at_least(lba, block, before.acked_version(lba))
            .unwrap_or_else(|e| panic!("snapshot: {e}"));
        let version = decode(block).map_or(0, |h| h.version);
        newer += u64::from(version < checker.acked_version(lba));
    }
    assert!(newer > 0, "writes after the snapshot are not in it");

    // A clone of it, mapped as a LUN of a target of its own, reads the snapshot's
    // bytes through iSCSI and is in sync on every member.
    let clone_iqn = "iqn.2026-11.io.bulwark:clone";
    let started = Instant::now();
    let (ok, out, err) =
        run_cli(&c, 0, &["volume", "create", "c", "--from-snapshot", "v@s1"]).await;
    assert!(ok && out.contains("from v@s1"), "{out}{err}");
    target_with_lun(&admin, clone_iqn, "c").await;
    let st = admin.state().await.unwrap();
    let primary = st.volumes["c"].primary;
    let portal = st.nodes[&primary].addresses.portals[0];
    let mut session = wait(
        "a session to the clone",
        Duration::from_secs(10),
        async || connect(portal, clone_iqn).await,
    )
    .await;
    let first = wait("the clone reads", Duration::from_secs(10), async || {
        session
            .read16(0, 0, 1, BLOCK)
            .await
            .ok()
            .filter(|r| r.status == 0)
    })
    .await;
    let readable = started.elapsed();
    eprintln!(
        "clone of a {} MiB volume: readable through iSCSI {} ms after `volume create --from-snapshot` (target and LUN set up meanwhile)",
        copies[0].len() >> 20,
        readable.as_millis()
    );
    assert_eq!(first.data, copies[0][..BLOCK as usize].to_vec());
    for lba in checker.lbas().take(200).collect::<Vec<_>>() {
        let r = session.read16(0, lba, 1, BLOCK).await.unwrap();
        let at = (lba * u64::from(BLOCK)) as usize;
        assert_eq!(
            r.data,
            copies[0][at..at + BLOCK as usize].to_vec(),
            "LBA {lba}"
        );
    }
    assert!(
        readable <= Duration::from_secs(2),
        "the clone took {readable:?} to read"
    );
    let (ok, out, err) = run_cli(&c, 0, &["volume", "verify", "c"]).await;
    assert!(ok, "verify of the clone: {out}{err}");
    // Writes to the clone leave the snapshot alone.
    let w = session
        .write16(0, 0, &vec![0xEE; BLOCK as usize], BLOCK, false)
        .await
        .unwrap();
    assert_eq!(w.status, 0);
    drop(session);
    assert_eq!(
        std::fs::read(snapshot_file(&c, 0, "s1")).unwrap(),
        copies[0]
    );
    let (ok, _, err) = run_cli(&c, 0, &["snapshot", "delete", "v", "s1"]).await;
    assert!(!ok && err.contains("has clones"), "{err}");
    let (ok, out, err) = run_cli(&c, 0, &["lun", "remove", clone_iqn, "0"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run_cli(&c, 0, &["volume", "delete", "c"]).await;
    assert!(ok, "{out}{err}");

    // The snapshot exported read-only in a backup target of its own reads its bytes
    // through every node's path (forwarded to the primary from the others), refuses
    // writes with DATA PROTECT, and cannot be deleted while exported.
    open_target(&admin, BACKUP).await;
    let (ok, _, err) = run_cli(&c, 0, &["lun", "add", BACKUP, "v@s1"]).await;
    assert!(!ok && err.contains("--read-only"), "{err}");
    let (ok, out, err) = run_cli(&c, 0, &["lun", "add", BACKUP, "v@s1", "--read-only"]).await;
    assert!(ok && out.contains("as LUN 0"), "{out}{err}");
    let exported = read_only_lun_reads_the_snapshot(&c, &copies[0], &checker, &all).await;
    eprintln!("snapshot exported read-only: {exported}");
    let (ok, _, err) = run_cli(&c, 0, &["snapshot", "delete", "v", "s1"]).await;
    assert!(!ok && err.contains("is exported as LUN 0"), "{err}");
    let (ok, out, err) = run_cli(&c, 1, &["status"]).await;
    assert!(
        ok && out.contains("LUN 0: snapshot s1 of volume v (read-only)"),
        "{out}{err}"
    );
    let (ok, out, err) = run_cli(&c, 2, &["snapshot", "list"]).await;
    assert!(
        ok && out.contains(&format!("LUN 0 of {BACKUP} (read-only)")),
        "{out}{err}"
    );

    // The primary dies (kill -9); on the new primary the volume is rolled back to the
    // snapshot: it then holds exactly the snapshot's bytes, on every in-sync member.
    let old = c.index(&st.node_name(st.volumes["v"].primary));
    c.nodes[old].kill9();
    let st = wait("a new primary", Duration::from_secs(20), async || {
        admin.state().await.ok().filter(|s| {
            let v = &s.volumes["v"];
            s.node_name(v.primary) != format!("n{}", old + 1) && v.in_sync.len() == 2
        })
    })
    .await;
    let new = c.index(&st.node_name(st.volumes["v"].primary));
    let (ok, out, err) = run_cli(&c, new, &["snapshot", "rollback", "v", "s1", "--force"]).await;
    assert!(ok, "rollback: {out}{err}");
    eprintln!("rollback after kill -9 of the primary: {}", out.trim());
    let portal = st.nodes[&st.volumes["v"].primary].addresses.portals[0];
    let mut session = wait(
        "a session after the rollback",
        Duration::from_secs(10),
        async || connect(portal, IQN).await,
    )
    .await;
    for lba in checker.lbas().collect::<Vec<_>>() {
        let r = wait("a read", Duration::from_secs(10), async || {
            session
                .read16(0, lba, 1, BLOCK)
                .await
                .ok()
                .filter(|r| r.status == 0)
        })
        .await;
        let at = (lba * u64::from(BLOCK)) as usize;
        assert_eq!(
            r.data,
            copies[0][at..at + BLOCK as usize].to_vec(),
            "LBA {lba} after the rollback"
        );
        checker
            .verify_at_least(lba, &r.data, before.acked_version(lba))
            .unwrap_or_else(|e| panic!("after the rollback: {e}"));
    }
    drop(session);
    let (ok, out, err) = run_cli(&c, new, &["volume", "verify", "v"]).await;
    assert!(ok, "verify after the rollback: {out}{err}");
    eprintln!("{}", out.trim());
    // The exported snapshot followed the volume to its new primary, unchanged.
    let survivors: Vec<usize> = all.iter().copied().filter(|i| *i != old).collect();
    read_only_lun_reads_the_snapshot(&c, &copies[0], &checker, &survivors).await;
    // The old primary comes back and is resynced to the rolled-back data.
    c.nodes[old].start();
    wait_in_sync(
        &admin,
        3,
        Duration::from_secs(60),
        "the old primary back in sync",
    )
    .await;
    let (ok, out, err) = run_cli(&c, new, &["volume", "verify", "v"]).await;
    assert!(ok, "verify with the old primary back: {out}{err}");

    // A name in use is refused; deleted, it goes from every node.
    let (ok, _, err) = run_cli(&c, 1, &["snapshot", "create", "v", "s1"]).await;
    assert!(!ok && err.contains("has a snapshot named"), "{err}");
    let (ok, out, err) = run_cli(&c, 2, &["snapshot", "list"]).await;
    assert!(
        ok && out.contains("s1") && out.contains("taken"),
        "{out}{err}"
    );
    let (ok, out, err) = run_cli(&c, 2, &["status"]).await;
    assert!(ok && out.contains("snapshots: s1"), "{out}{err}");
    let (ok, out, err) = run_cli(&c, 0, &["lun", "remove", BACKUP, "0"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run_cli(&c, 0, &["snapshot", "delete", "v", "s1"]).await;
    assert!(ok, "{out}{err}");
    wait("every copy removed", Duration::from_secs(10), async || {
        all.iter()
            .all(|i| !snapshot_file(&c, *i, "s1").exists())
            .then_some(())
    })
    .await;
}

/// The target a backup host reads snapshots through.
const BACKUP: &str = "iqn.2026-12.io.bulwark:backup";

/// LUN 0 of [`BACKUP`], snapshot `snapshot` of "v" exported read-only, read through the
/// portal of each node of `nodes`: the snapshot's bytes at the checker's LBAs (and LBA
/// 0), and a write refused with DATA PROTECT, WRITE PROTECTED (SBC-3 §4.10). Returns
/// what was read, for the log.
async fn read_only_lun_reads_the_snapshot(
    c: &Cluster,
    snapshot: &[u8],
    checker: &Checker,
    nodes: &[usize],
) -> String {
    let admin = c.admin(nodes[0]);
    let st = admin.state().await.unwrap();
    let lbas: Vec<u64> = std::iter::once(0).chain(checker.lbas().take(100)).collect();
    let mut paths = Vec::new();
    for i in nodes {
        let node = &st.nodes[&st.node_by_name(&format!("n{}", i + 1)).unwrap().id];
        let portal = node.addresses.portals[0];
        let mut session = wait(
            "a session for the exported snapshot",
            Duration::from_secs(20),
            async || connect(portal, BACKUP).await,
        )
        .await;
        // The first command may meet a unit attention (the LUN is new, or moved).
        wait(
            "the exported snapshot reads",
            Duration::from_secs(20),
            async || {
                session
                    .read16(0, 0, 1, BLOCK)
                    .await
                    .ok()
                    .filter(|r| r.status == 0)
            },
        )
        .await;
        for lba in &lbas {
            let r = session.read16(0, *lba, 1, BLOCK).await.unwrap();
            let at = (*lba * u64::from(BLOCK)) as usize;
            assert_eq!(r.status, 0, "read of LBA {lba} through {}", node.name);
            assert_eq!(
                r.data,
                snapshot[at..at + BLOCK as usize].to_vec(),
                "LBA {lba} of the exported snapshot through {}",
                node.name
            );
        }
        let w = session
            .write16(0, 0, &vec![0xAB; BLOCK as usize], BLOCK, false)
            .await
            .unwrap();
        assert!(
            w.status == 2
                && w.sense.len() >= 14
                && (w.sense[2] & 0x0f, w.sense[12]) == (0x07, 0x27),
            "a write to the exported snapshot through {}: status {} sense {:02x?}",
            node.name,
            w.status,
            &w.sense[..w.sense.len().min(18)]
        );
        paths.push(node.name.clone());
    }
    format!(
        "{} blocks equal to the snapshot through {} each; writes refused with DATA PROTECT",
        lbas.len(),
        paths.join(", ")
    )
}

/// The write pause of a snapshot does not grow with the volume: a fully written
/// 4 GiB volume (two replicas) is snapshotted under writes; the pause is printed as
/// the primary measured it and as the initiator saw it (the longest gap between two
/// acknowledged writes), and must stay within 50 ms on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_fully_written_4_gib_volume_pauses_writes_for_milliseconds() {
    const SIZE: u64 = 4 << 30;
    let _serial = ONE_AT_A_TIME.lock().await;
    let (c, _disks) = three_voters_on_xfs(45, 6 << 30).await;
    let admin = c.admin(0);
    commit(
        &admin,
        Command::CreateVolume {
            name: "v".into(),
            size_bytes: SIZE,
            replicas: 2,
            block_size: BLOCK,
            physical_block_size: None,
            nodes: vec!["n2".into(), "n3".into()],
        },
    )
    .await;
    target_with_lun(&admin, IQN, "v").await;
    let st = wait_in_sync(&admin, 2, Duration::from_secs(30), "two copies in sync").await;
    let portal = st.nodes[&st.volumes["v"].primary].addresses.portals[0];
    // The primary serves the target before the fill starts.
    let _ = wait("the target serves", Duration::from_secs(10), async || {
        connect(portal, IQN).await
    })
    .await;
    let url = format!("iscsi://{}/{IQN}/0", portal);
    let started = Instant::now();
    let filled = tokio::task::spawn_blocking(move || {
        std::process::Command::new("qemu-img")
            .args([
                "bench",
                "-f",
                "raw",
                "-t",
                "none",
                "-n",
                "-w",
                "-s",
                "1M",
                "-d",
                "16",
                "--pattern=90",
            ])
            .args(["-c", &(SIZE >> 20).to_string(), &url])
            .output()
            .expect("qemu-img (Debian package qemu-utils)")
    })
    .await
    .unwrap();
    assert!(
        filled.status.success(),
        "filling the volume: {}",
        String::from_utf8_lossy(&filled.stderr)
    );
    eprintln!(
        "4 GiB written through iSCSI to both replicas in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = Load {
        stop: Some(stop.clone()),
        ..Load::default()
    };
    let reach = Reach::of(&c);
    let writer = tokio::spawn(async move {
        let mut checker = Checker::new(BLOCK as usize);
        run_load_via(
            &reach,
            &mut checker,
            Instant::now() + Duration::from_secs(30),
            &[0, 1, 2],
            &load,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, out, err) = run_cli(&c, 0, &["snapshot", "create", "v", "full"]).await;
    assert!(ok, "snapshot create: {out}{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let stats = writer.await.unwrap();
    let st = admin.state().await.unwrap();
    let pause_us = st.volumes["v"].snapshots["full"]
        .pause_us
        .unwrap_or(u64::MAX);
    eprintln!(
        "snapshot of a fully written 4 GiB volume: writes held {:.1} ms on the primary; the longest gap between two writes at the initiator {} ms ({} writes around it, {} failed)",
        pause_us as f64 / 1000.0,
        stats.longest.as_millis(),
        stats.writes,
        stats.failed
    );
    assert_eq!(stats.failed, 0);
    assert!(
        pause_us <= 50_000,
        "writes held {pause_us} µs on the primary"
    );

    // A clone of it reads through iSCSI within 2 s of being asked for, its last block
    // included (qemu-img wrote every block).
    let clone_iqn = "iqn.2026-11.io.bulwark:clone4g";
    let started = Instant::now();
    let (ok, out, err) = run_cli(
        &c,
        0,
        &["volume", "create", "c", "--from-snapshot", "v@full"],
    )
    .await;
    assert!(ok, "{out}{err}");
    target_with_lun(&admin, clone_iqn, "c").await;
    let st = admin.state().await.unwrap();
    let portal = st.nodes[&st.volumes["c"].primary].addresses.portals[0];
    let mut session = wait(
        "a session to the clone",
        Duration::from_secs(10),
        async || connect(portal, clone_iqn).await,
    )
    .await;
    let last = SIZE / u64::from(BLOCK) - 1;
    let r = wait("the clone reads", Duration::from_secs(10), async || {
        session
            .read16(0, last, 1, BLOCK)
            .await
            .ok()
            .filter(|r| r.status == 0)
    })
    .await;
    let readable = started.elapsed();
    eprintln!(
        "clone of the 4 GiB snapshot: readable through iSCSI {} ms after `volume create --from-snapshot`",
        readable.as_millis()
    );
    assert_eq!(
        r.data,
        vec![90u8; BLOCK as usize],
        "the clone's last block holds what was written"
    );
    assert!(
        readable <= Duration::from_secs(2),
        "the clone took {readable:?} to read"
    );
}
