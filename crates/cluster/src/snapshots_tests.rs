//! Snapshots as cluster state: creation, the primary's report, deletion, and what
//! each refuses.

use super::tests::{create, refused, three, GIB};
use super::*;

fn snap(volumes: &[&str], name: &str) -> Command {
    Command::CreateSnapshot {
        volumes: volumes.iter().map(|s| s.to_string()).collect(),
        name: name.into(),
        at_ms: 1_700_000_000_000,
    }
}

fn delete(volume: &str, name: &str) -> Command {
    Command::DeleteSnapshot {
        volumes: vec![volume.into()],
        name: name.into(),
    }
}

fn taken(volume: &str, name: &str, epoch: u64, members: &[NodeId]) -> Command {
    Command::SnapshotTaken {
        volume: volume.into(),
        name: name.into(),
        epoch,
        members: members.to_vec(),
        pause_us: 900,
    }
}

#[test]
fn a_snapshot_is_asked_for_then_taken_then_deleted() {
    let mut st = three();
    st.apply(&create("a", GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&create("b", GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&snap(&["a", "b"], "s1")).unwrap();
    for v in ["a", "b"] {
        let s = &st.volumes[v].snapshots["s1"];
        assert!(!s.ready && s.members.is_empty() && s.epoch == 1, "{s:?}");
    }
    // One at a time per volume, names unique, valid names only.
    assert!(matches!(
        refused(&mut st, snap(&["a"], "s2")),
        Refused::SnapshotNotNow { .. }
    ));
    assert!(matches!(
        refused(&mut st, snap(&["a"], "s1")),
        Refused::SnapshotExists { .. }
    ));
    assert!(matches!(
        refused(&mut st, snap(&["a"], "a@b")),
        Refused::BadName(_)
    ));
    // The primary's report: at the snapshot's epoch, members among the replicas.
    let (n1, n2) = (st.volumes["a"].replicas[0], st.volumes["a"].replicas[1]);
    assert!(matches!(
        refused(&mut st, taken("a", "s1", 2, &[n1])),
        Refused::StaleEpoch { .. }
    ));
    assert!(matches!(
        refused(&mut st, taken("a", "s1", 1, &[u64::MAX])),
        Refused::SnapshotNotNow { .. }
    ));
    st.apply(&taken("a", "s1", 1, &[n1, n2])).unwrap();
    let s = &st.volumes["a"].snapshots["s1"];
    assert!(s.ready && s.members == vec![n1, n2] && s.pause_us == Some(900));
    assert!(
        matches!(
            refused(&mut st, taken("a", "s1", 1, &[n1])),
            Refused::StaleEpoch { .. }
        ),
        "a second report changes nothing"
    );
    // A volume with snapshots is deleted only with them.
    assert!(matches!(
        refused(
            &mut st,
            Command::DeleteVolume {
                name: "a".into(),
                with_snapshots: false
            }
        ),
        Refused::VolumeHasSnapshots { count: 1, .. }
    ));
    st.apply(&Command::DeleteSnapshot {
        volumes: vec!["a".into(), "b".into()],
        name: "s1".into(),
    })
    .unwrap();
    assert!(st.volumes["a"].snapshots.is_empty() && st.volumes["b"].snapshots.is_empty());
    assert!(matches!(
        refused(&mut st, delete("a", "s1")),
        Refused::NoSuchSnapshot { .. }
    ));
    st.apply(&snap(&["a"], "s3")).unwrap();
    st.apply(&Command::DeleteVolume {
        name: "a".into(),
        with_snapshots: true,
    })
    .unwrap();
    assert!(!st.volumes.contains_key("a"));
}

#[test]
fn a_snapshot_of_several_volumes_needs_one_primary() {
    let mut st = three();
    st.apply(&create("a", GIB, 1, &["n1"])).unwrap();
    st.apply(&create("b", GIB, 1, &["n2"])).unwrap();
    assert!(matches!(
        refused(&mut st, snap(&["a", "b"], "s1")),
        Refused::SnapshotNotNow { .. }
    ));
    assert!(matches!(
        refused(&mut st, snap(&["a", "nope"], "s1")),
        Refused::NoSuchVolume(_)
    ));
    assert!(matches!(
        refused(&mut st, snap(&[], "s1")),
        Refused::BadName(_)
    ));
}

/// A new primary abandons a snapshot still being taken (it cannot know which members
/// took their copy); a taken one stays.
#[test]
fn a_snapshot_not_taken_before_a_failover_is_abandoned() {
    let mut st = three();
    st.apply(&create("a", GIB, 2, &["n1", "n2"])).unwrap();
    let (n1, n2) = (st.volumes["a"].replicas[0], st.volumes["a"].replicas[1]);
    st.apply(&snap(&["a"], "kept")).unwrap();
    st.apply(&taken("a", "kept", 1, &[n1, n2])).unwrap();
    st.apply(&snap(&["a"], "half")).unwrap();
    st.apply(&Command::Promote {
        cause: None,
        volumes: vec![("a".into(), 1)],
        node: n2,
    })
    .unwrap();
    let names: Vec<&String> = st.volumes["a"].snapshots.keys().collect();
    assert_eq!(names, vec!["kept"]);
    assert!(matches!(
        refused(&mut st, taken("a", "half", 1, &[n1])),
        Refused::StaleEpoch { .. }
    ));
}

/// A clone lives on the snapshot's members, in sync from birth, the size the volume
/// had then; the snapshot cannot go while a clone of it exists.
#[test]
fn a_clone_is_made_on_the_snapshot_members() {
    let mut st = three();
    st.apply(&create("a", GIB, 3, &["n2", "n1", "n3"])).unwrap();
    let r = st.volumes["a"].replicas.clone();
    st.apply(&snap(&["a"], "s")).unwrap();
    let clone = |name: &str| Command::CloneSnapshot {
        name: name.into(),
        volume: "a".into(),
        snapshot: "s".into(),
    };
    assert!(
        matches!(refused(&mut st, clone("c")), Refused::SnapshotNotNow { .. }),
        "not before it is taken"
    );
    st.apply(&taken("a", "s", 1, &[r[2], r[0]])).unwrap();
    st.apply(&Command::ResizeVolume {
        name: "a".into(),
        size_bytes: 2 * GIB,
    })
    .unwrap();
    st.apply(&clone("c")).unwrap();
    let c = &st.volumes["c"];
    assert_eq!(c.primary, r[0], "the source's primary first");
    assert_eq!(c.replicas, vec![r[0], r[2]]);
    assert_eq!(c.in_sync, c.replicas);
    assert_eq!(
        c.size_bytes, GIB,
        "the size the volume had when the snapshot was taken"
    );
    assert_eq!(
        c.origin.as_ref().map(|o| o.members.clone()),
        Some(vec![r[0], r[2]])
    );
    assert!(matches!(
        refused(&mut st, clone("c")),
        Refused::VolumeExists(_)
    ));
    let del = delete("a", "s");
    assert!(matches!(
        refused(&mut st, del.clone()),
        Refused::SnapshotHasClones { .. }
    ));
    assert!(matches!(
        refused(
            &mut st,
            Command::DeleteVolume {
                name: "a".into(),
                with_snapshots: true
            }
        ),
        Refused::SnapshotHasClones { .. }
    ));
    st.apply(&Command::DeleteVolume {
        name: "c".into(),
        with_snapshots: false,
    })
    .unwrap();
    st.apply(&del).unwrap();
}

/// A rollback is asked for with a taken snapshot the primary holds, is reported done
/// by the primary at its epoch, and is abandoned at a failover.
#[test]
fn a_rollback_is_asked_for_and_reported() {
    let mut st = three();
    st.apply(&create("a", GIB, 3, &["n1", "n2", "n3"])).unwrap();
    let r = st.volumes["a"].replicas.clone();
    let rollback = |force| Command::RollbackSnapshot {
        volumes: vec!["a".into()],
        name: "s".into(),
        force,
    };
    assert!(matches!(
        refused(&mut st, rollback(false)),
        Refused::NoSuchSnapshot { .. }
    ));
    st.apply(&snap(&["a"], "s")).unwrap();
    assert!(matches!(
        refused(&mut st, rollback(false)),
        Refused::SnapshotNotNow { .. }
    ));
    // Taken without the primary (it could not take its copy): no rollback there.
    st.apply(&taken("a", "s", 1, &[r[1], r[2]])).unwrap();
    let e = refused(&mut st, rollback(false));
    assert!(e.to_string().contains("holds no copy"), "{e}");
    st.apply(&Command::Promote {
        cause: None,
        volumes: vec![("a".into(), 1)],
        node: r[1],
    })
    .unwrap();
    st.apply(&rollback(true)).unwrap();
    let pending = st.volumes["a"].rollback.clone().unwrap();
    assert_eq!(
        (pending.snapshot.as_str(), pending.epoch, pending.force),
        ("s", 2, true)
    );
    assert!(matches!(
        refused(&mut st, snap(&["a"], "t")),
        Refused::SnapshotNotNow { .. }
    ));
    assert!(matches!(
        refused(&mut st, delete("a", "s")),
        Refused::SnapshotNotNow { .. }
    ));
    let done = |epoch| Command::RollbackDone {
        volume: "a".into(),
        name: "s".into(),
        epoch,
        error: None,
    };
    assert!(matches!(
        refused(&mut st, done(1)),
        Refused::StaleEpoch { .. }
    ));
    st.apply(&done(2)).unwrap();
    assert!(st.volumes["a"].rollback.is_none());
    // Abandoned by a failover.
    st.apply(&rollback(false)).unwrap();
    st.apply(&Command::Promote {
        cause: None,
        volumes: vec![("a".into(), 2)],
        node: r[2],
    })
    .unwrap();
    assert!(st.volumes["a"].rollback.is_none());
}

fn target(st: &mut ClusterState, iqn: &str) {
    st.apply(&Command::CreateTarget {
        iqn: iqn.into(),
        alias: None,
    })
    .unwrap();
}

fn lun(iqn: &str, name: &str) -> Command {
    Command::AddLun {
        iqn: iqn.into(),
        lun: None,
        volume: name.into(),
    }
}

/// A snapshot is exported read-only as `VOLUME@SNAPSHOT`, once taken and only while
/// the volume's primary holds a copy, in any target whose LUNs share that primary; the
/// target then moves with the volume (their groups join). It cannot be deleted while
/// exported, and a planned move goes only to a node holding it.
#[test]
fn an_exported_snapshot_moves_with_its_volume() {
    const T1: &str = "iqn.2026-12.com.example:t1";
    const T2: &str = "iqn.2026-12.com.example:t2";
    let mut st = three();
    st.apply(&create("a", GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&create("b", GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&create("c", GIB, 2, &["n2", "n1"])).unwrap();
    let (n1, n2) = (st.volumes["a"].replicas[0], st.volumes["a"].replicas[1]);
    target(&mut st, T1);
    target(&mut st, T2);
    st.apply(&lun(T1, "a")).unwrap();
    assert!(matches!(
        refused(&mut st, lun(T2, "a@s1")),
        Refused::NoSuchSnapshot { .. }
    ));
    st.apply(&snap(&["a"], "s1")).unwrap();
    assert!(matches!(
        refused(&mut st, lun(T2, "a@s1")),
        Refused::SnapshotNotExportable { .. }
    ));
    // Taken on n2 alone (n1, the primary, has no copy): not exportable.
    st.apply(&taken("a", "s1", 1, &[n2])).unwrap();
    assert!(matches!(
        refused(&mut st, lun(T2, "a@s1")),
        Refused::SnapshotNotExportable { .. }
    ));
    st.apply(&snap(&["a"], "s2")).unwrap();
    st.apply(&taken("a", "s2", 1, &[n1, n2])).unwrap();
    // In a target of its own (a backup host sees only it), once.
    assert_eq!(st.apply(&lun(T2, "a@s2")).unwrap(), Applied::LunAdded(0));
    assert!(matches!(
        refused(&mut st, lun(T1, "a@s2")),
        Refused::VolumeAlreadyMapped { .. }
    ));
    assert_eq!(st.targets[T2].volumes(), vec!["a".to_string()]);
    assert_eq!(st.target_primary(&st.targets[T2]), Some(n1));
    // Not with a volume of another primary.
    assert!(matches!(
        refused(&mut st, lun(T2, "c")),
        Refused::PrimaryMismatch { .. }
    ));
    // "b" in T2 ties "a" and "b" into one group: they fail over together.
    st.apply(&lun(T2, "b")).unwrap();
    assert_eq!(st.group_of("a"), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(st.group_of("b"), vec!["a".to_string(), "b".to_string()]);
    let groups = st.groups();
    assert!(
        groups
            .iter()
            .any(|g| g.len() == 2 && g.contains(&"a".into()) && g.contains(&"b".into())),
        "{groups:?}"
    );
    assert!(groups.contains(&vec!["c".to_string()]), "{groups:?}");
    assert!(matches!(
        refused(
            &mut st,
            Command::Promote {
                cause: None,
                volumes: vec![("a".into(), 1)],
                node: n2,
            }
        ),
        Refused::TargetSplit { .. }
    ));
    // Exported: neither the snapshot nor the volume can go.
    assert!(matches!(
        refused(&mut st, delete("a", "s2")),
        Refused::SnapshotExported { lun: 0, .. }
    ));
    st.apply(&Command::RemoveLun {
        iqn: T1.into(),
        lun: 0,
    })
    .unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::DeleteVolume {
                name: "a".into(),
                with_snapshots: true
            }
        ),
        Refused::VolumeMapped { lun: 0, .. }
    ));
    // A planned move goes only to a node holding the exported snapshot (n3 is made an
    // in-sync replica of "a" after the snapshot was taken).
    let n3 = st.node_by_name("n3").unwrap().id;
    for v in ["a", "b"] {
        st.volumes.get_mut(v).unwrap().in_sync.push(n3);
    }
    assert!(matches!(
        refused(
            &mut st,
            Command::MoveVolume {
                volume: "b".into(),
                node: "n3".into()
            }
        ),
        Refused::SnapshotNotExportable { .. }
    ));
    for v in ["a", "b"] {
        st.volumes.get_mut(v).unwrap().in_sync.retain(|n| *n != n3);
    }
    // A failover of the group takes the snapshot's LUN along.
    st.apply(&Command::Promote {
        cause: None,
        volumes: vec![("a".into(), 1), ("b".into(), 1)],
        node: n2,
    })
    .unwrap();
    assert_eq!(st.target_primary(&st.targets[T2]), Some(n2));
    st.apply(&Command::RemoveLun {
        iqn: T2.into(),
        lun: 0,
    })
    .unwrap();
    assert_eq!(st.group_of("a"), vec!["a".to_string()]);
    st.apply(&delete("a", "s2")).unwrap();
}

/// A member whose data folder cannot share blocks (it said so when it started) would
/// drop out of the in-sync set when asked for its copy: the snapshot, and a rollback,
/// are refused up front with the reason.
#[test]
fn a_member_without_reflinks_is_refused_up_front() {
    let mut st = three();
    st.apply(&create("a", GIB, 2, &["n1", "n2"])).unwrap();
    let started = |st: &ClusterState, shares_blocks| {
        let n = &st.nodes[&2];
        Command::NodeStarted {
            id: 2,
            role: n.role,
            addresses: n.addresses.clone(),
            capacity_bytes: n.capacity_bytes,
            shares_blocks,
        }
    };
    st.apply(&started(&st, Some(false))).unwrap();
    match refused(&mut st, snap(&["a"], "s")) {
        Refused::SnapshotNotNow { why, .. } => {
            assert!(why.contains("n2") && why.contains("reflink"), "{why}")
        }
        other => panic!("{other}"),
    }
    // Unknown (a node of an older version) is not refused; one that can, neither.
    st.apply(&started(&st, None)).unwrap();
    st.apply(&snap(&["a"], "s")).unwrap();
    st.apply(&started(&st, Some(true))).unwrap();
    st.apply(&taken("a", "s", 1, &[1, 2])).unwrap();
    st.apply(&started(&st, Some(false))).unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::RollbackSnapshot {
                volumes: vec!["a".into()],
                name: "s".into(),
                force: true
            }
        ),
        Refused::SnapshotNotNow { .. }
    ));
}
