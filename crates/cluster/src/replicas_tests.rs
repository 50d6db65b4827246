//! Replica placement over the life of a cluster: adding, removing and replacing
//! replicas (a target's volumes together), dead nodes, drains and the leader's upkeep.

use std::collections::HashMap;
use std::time::Duration;

use super::tests::{add_node, check_invariants, create, refused, three, GIB, IQN};
use super::*;

fn change(volume: &str, add: Option<&str>, remove: Option<&str>) -> Command {
    Command::ChangeReplicas {
        volume: volume.into(),
        add: add.map(String::from),
        remove: remove.map(String::from),
        force: false,
    }
}

/// n1..n3, volumes "a" and "b" on n1 (primary) and n2, both LUNs of one target.
fn target_on_n1_n2() -> ClusterState {
    let mut st = three();
    st.apply(&create("a", GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&create("b", 2 * GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&Command::CreateTarget {
        iqn: IQN.into(),
        alias: None,
    })
    .unwrap();
    for v in ["a", "b"] {
        st.apply(&Command::AddLun {
            iqn: IQN.into(),
            lun: None,
            volume: v.into(),
        })
        .unwrap();
    }
    st
}

fn isr_add(st: &mut ClusterState, volume: &str, node: NodeId) {
    let epoch = st.volumes[volume].epoch;
    st.apply(&Command::IsrChange {
        volume: volume.into(),
        epoch,
        add: vec![node],
        remove: vec![],
    })
    .unwrap();
    check_invariants(st);
}

#[test]
fn an_added_replica_joins_every_volume_of_the_target_and_counts_once_in_sync() {
    let mut st = target_on_n1_n2();
    let a = st.apply(&change("a", Some("n3"), None)).unwrap();
    assert_eq!(a, Applied::ReplicasChanged(vec!["a".into(), "b".into()]));
    check_invariants(&st);
    for v in ["a", "b"] {
        let v = &st.volumes[v];
        assert_eq!(v.replicas, vec![1, 2, 3]);
        assert_eq!(v.in_sync, vec![1, 2], "joins outside the in-sync set");
        assert_eq!(
            v.joining,
            vec![Joining {
                node: 3,
                replaces: None
            }]
        );
        assert_eq!(v.wanted(), 3);
    }
    // Space counts the joining replica: 3 GiB of the target on n3.
    assert_eq!(st.free_bytes(3), 7 * GIB);
    isr_add(&mut st, "a", 3);
    assert_eq!(st.volumes["a"].in_sync, vec![1, 2, 3]);
    assert_eq!(
        st.volumes["b"].in_sync,
        vec![1, 2],
        "b is still being rebuilt"
    );
    // Bad requests.
    for (cmd, want) in [
        (change("a", Some("n3"), None), "AlreadyJoining"),
        (change("a", Some("n2"), None), "AlreadyReplica"),
        (change("a", None, Some("n2")), "WouldLeaveFewCopies"),
        (change("a", Some("zz"), None), "NoSuchNode"),
        (change("zz", Some("n3"), None), "NoSuchVolume"),
        (change("a", None, None), "BadName"),
        (change("a", None, Some("n1")), "ReplicaIsPrimary"),
    ] {
        let r = refused(&mut st, cmd);
        assert!(format!("{r:?}").starts_with(want), "{r:?}");
    }
    isr_add(&mut st, "b", 3);
    assert!(st.volumes["a"].joining.is_empty() && st.volumes["b"].joining.is_empty());
}

#[test]
fn a_replace_keeps_the_old_replica_until_the_new_one_is_in_sync_everywhere() {
    let mut st = target_on_n1_n2();
    st.apply(&change("a", Some("n3"), Some("n2"))).unwrap();
    check_invariants(&st);
    assert_eq!(
        st.volumes["b"].joining,
        vec![Joining {
            node: 3,
            replaces: Some(2)
        }]
    );
    // n3 in sync for a only: n2 stays (it is the other possible successor of b).
    isr_add(&mut st, "a", 3);
    assert_eq!(st.volumes["a"].replicas, vec![1, 2, 3]);
    isr_add(&mut st, "b", 3);
    for v in ["a", "b"] {
        assert_eq!(
            st.volumes[v].replicas,
            vec![1, 3],
            "n2 left once n3 was in sync"
        );
        assert_eq!(st.volumes[v].in_sync, vec![1, 3]);
        assert!(st.volumes[v].joining.is_empty());
    }
}

#[test]
fn a_replica_out_of_sync_is_replaced_at_once_and_removal_keeps_two_copies() {
    let mut st = target_on_n1_n2();
    // n2 fell out of sync (down): replacing it removes it at once.
    for v in ["a", "b"] {
        let epoch = st.volumes[v].epoch;
        st.apply(&Command::IsrChange {
            volume: v.into(),
            epoch,
            add: vec![],
            remove: vec![2],
        })
        .unwrap();
    }
    st.apply(&change("a", Some("n3"), Some("n2"))).unwrap();
    check_invariants(&st);
    assert_eq!(st.volumes["a"].replicas, vec![1, 3]);
    assert_eq!(st.volumes["a"].wanted(), 2);
    // Removing an in-sync copy that leaves one needs --force.
    let mut st = target_on_n1_n2();
    let r = refused(&mut st, change("a", None, Some("n2")));
    assert!(r.to_string().contains("with 1 in-sync copy;"), "{r}");
    st.apply(&Command::ChangeReplicas {
        volume: "a".into(),
        add: None,
        remove: Some("n2".into()),
        force: true,
    })
    .unwrap();
    assert_eq!(
        st.volumes["b"].replicas,
        vec![1],
        "the target's volumes together"
    );
    assert_eq!(st.volumes["b"].wanted(), 1);
    let r = refused(&mut st, change("a", None, Some("n1")));
    assert!(matches!(r, Refused::ReplicaIsPrimary { .. }), "{r:?}");
}

#[test]
fn adding_needs_room_a_storage_node_in_service_and_at_most_three() {
    let mut st = three();
    add_node(&mut st, "small", 4, GIB / 2);
    add_node(&mut st, "n5", 5, 10 * GIB);
    st.apply(&create("v", GIB, 3, &["n1", "n2", "n3"])).unwrap();
    let r = refused(&mut st, change("v", Some("small"), Some("n3")));
    assert!(matches!(r, Refused::NoSpace { .. }), "{r:?}");
    let r = refused(&mut st, change("v", Some("n5"), None));
    assert!(matches!(r, Refused::TooManyReplicas { .. }), "{r:?}");
    st.apply(&Command::DrainNode {
        name: "n5".into(),
        drained: true,
        evacuate: false,
    })
    .unwrap();
    let r = refused(&mut st, change("v", Some("n5"), Some("n3")));
    assert!(r.to_string().contains("undrain"), "{r}");
    // A replace at three replicas is fine: the count stays three.
    st.apply(&Command::DrainNode {
        name: "n5".into(),
        drained: false,
        evacuate: false,
    })
    .unwrap();
    st.apply(&change("v", Some("n5"), Some("n3"))).unwrap();
    check_invariants(&st);
}

#[test]
fn a_dead_node_leaves_its_volumes_which_are_rebuilt_where_there_is_room() {
    let mut st = target_on_n1_n2();
    st.apply(&create("c", GIB, 1, &["n2"])).unwrap();
    // Still primary of c (the only copy): refused, nothing changes.
    let r = refused(
        &mut st,
        Command::RemoveNode {
            name: "n2".into(),
            dead: true,
        },
    );
    assert!(
        r.to_string().contains("still the primary of [\"c\"]"),
        "{r}"
    );
    st.apply(&Command::DeleteVolume {
        name: "c".into(),
        with_snapshots: false,
    })
    .unwrap();
    let a = st
        .apply(&Command::RemoveNode {
            name: "n2".into(),
            dead: true,
        })
        .unwrap();
    assert_eq!(
        a,
        Applied::DeadNodeRemoved(vec![("a".into(), Some(3)), ("b".into(), Some(3))])
    );
    check_invariants(&st);
    assert!(!st.nodes.contains_key(&2));
    for v in ["a", "b"] {
        assert_eq!(st.volumes[v].replicas, vec![1, 3]);
        assert_eq!(st.volumes[v].in_sync, vec![1]);
    }
    // The id is never reused.
    assert_eq!(add_node(&mut st, "n2", 2, GIB), 4);
    // No room anywhere: the volume keeps running short, and says so.
    let mut st = three();
    st.apply(&create("v", GIB, 3, &["n1", "n2", "n3"])).unwrap();
    let a = st
        .apply(&Command::RemoveNode {
            name: "n3".into(),
            dead: true,
        })
        .unwrap();
    assert_eq!(a, Applied::DeadNodeRemoved(vec![("v".into(), None)]));
    assert_eq!(st.volumes["v"].wanted(), 3);
    assert_eq!(st.volumes["v"].lasting_replicas().count(), 2);
}

#[test]
fn upkeep_moves_off_drained_nodes_then_replaces_evacuated_and_long_offline_ones() {
    let mut st = target_on_n1_n2();
    let group = vec!["a".to_string(), "b".to_string()];
    let none = HashMap::new();
    assert_eq!(st.upkeep(&group, &none), None, "nothing to do");
    st.apply(&Command::DrainNode {
        name: "n1".into(),
        drained: true,
        evacuate: true,
    })
    .unwrap();
    assert_eq!(
        st.upkeep(&group, &none),
        Some(Upkeep::Move {
            volume: "a".into(),
            from: 1,
            to: 2
        })
    );
    // n2 offline: no other member can take the primary; wait.
    let n2_off: HashMap<NodeId, Duration> = [(2, Duration::from_secs(1))].into();
    assert_eq!(st.upkeep(&group, &n2_off), None);
    // Moved: the evacuated n1's replicas are rebuilt on n3.
    st.apply(&Command::Promote {
        volumes: ["a", "b"]
            .iter()
            .map(|v| (v.to_string(), st.volumes[*v].epoch))
            .collect(),
        node: 2,
        cause: None,
    })
    .unwrap();
    // The move took n1 out of the in-sync sets: it is evacuated once back in sync,
    // so its replica stays until the new one has everything.
    assert_eq!(st.upkeep(&group, &none), None, "n1 resyncs first");
    isr_add(&mut st, "a", 1);
    isr_add(&mut st, "b", 1);
    let Some(Upkeep::Replace { old, new, why, .. }) = st.upkeep(&group, &none) else {
        panic!("{:?}", st.upkeep(&group, &none));
    };
    assert_eq!((old, new), (1, 3));
    assert!(why.contains("evacuated"), "{why}");
    st.apply(&change("a", Some("n3"), Some("n1"))).unwrap();
    assert_eq!(
        st.volumes["b"].in_sync,
        vec![1, 2],
        "n1 stays until n3 is in sync"
    );

    // Offline past replace-after (and not drained): replaced; before: not.
    let mut st = target_on_n1_n2();
    let short: HashMap<NodeId, Duration> = [(2, Duration::from_secs(60))].into();
    assert_eq!(st.upkeep(&group, &short), None);
    let long: HashMap<NodeId, Duration> = [(2, Duration::from_secs(601))].into();
    assert!(matches!(
        st.upkeep(&group, &long),
        Some(Upkeep::Replace { old: 2, new: 3, .. })
    ));
    st.apply(&Command::DrainNode {
        name: "n2".into(),
        drained: true,
        evacuate: false,
    })
    .unwrap();
    assert_eq!(
        st.upkeep(&group, &long),
        None,
        "drained: maintenance, not replaced"
    );
    // The new replica dies during its rebuild: rebuilt elsewhere, and it takes over
    // what the dead one was to replace.
    let mut st = three();
    add_node(&mut st, "n4", 4, 10 * GIB);
    st.apply(&create("v", GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&change("v", Some("n3"), Some("n2"))).unwrap();
    let one = vec!["v".to_string()];
    assert_eq!(
        st.upkeep(&one, &HashMap::new()),
        None,
        "a rebuild is under way"
    );
    let n3_gone: HashMap<NodeId, Duration> = [(3, Duration::from_secs(601))].into();
    let Some(Upkeep::Replace { old: 3, new: 4, .. }) = st.upkeep(&one, &n3_gone) else {
        panic!("{:?}", st.upkeep(&one, &n3_gone));
    };
    st.apply(&change("v", Some("n4"), Some("n3"))).unwrap();
    check_invariants(&st);
    assert_eq!(st.volumes["v"].replicas, vec![1, 2, 4]);
    assert_eq!(
        st.volumes["v"].joining,
        vec![Joining {
            node: 4,
            replaces: Some(2)
        }]
    );
    // Off when replace-after is 0.
    let mut st = target_on_n1_n2();
    st.settings.replace_after_ms = 0;
    assert_eq!(st.upkeep(&group, &long), None);
}

#[test]
fn placement_spreads_replicas_over_zones() {
    let mut st = three();
    add_node(&mut st, "n4", 4, 10 * GIB);
    for (n, z) in [
        ("n1", "rack1"),
        ("n2", "rack1"),
        ("n3", "rack2"),
        ("n4", "rack2"),
    ] {
        st.apply(&Command::SetNodeZone {
            name: n.into(),
            zone: Some(z.into()),
        })
        .unwrap();
    }
    let Applied::VolumeCreated(nodes) = st.apply(&create("v", GIB, 2, &[])).unwrap() else {
        panic!()
    };
    let zone = |id: NodeId| st.nodes[&id].zone.clone();
    assert_ne!(zone(nodes[0]), zone(nodes[1]), "{nodes:?}");
    let r = refused(
        &mut st,
        Command::SetNodeZone {
            name: "n1".into(),
            zone: Some("bad zone".into()),
        },
    );
    assert!(matches!(r, Refused::BadName(_)), "{r:?}");
}

#[test]
fn a_replaced_node_that_became_primary_hands_over_before_it_leaves() {
    let mut st = target_on_n1_n2();
    st.apply(&change("a", Some("n3"), Some("n2"))).unwrap();
    // A failover picks n2, the node being replaced.
    st.apply(&Command::Promote {
        volumes: ["a", "b"]
            .iter()
            .map(|v| (v.to_string(), st.volumes[*v].epoch))
            .collect(),
        node: 2,
        cause: None,
    })
    .unwrap();
    isr_add(&mut st, "a", 3);
    isr_add(&mut st, "b", 3);
    assert_eq!(
        st.volumes["a"].replicas,
        vec![1, 2, 3],
        "n2 serves: it stays"
    );
    let group = vec!["a".to_string(), "b".to_string()];
    assert_eq!(
        st.upkeep(&group, &HashMap::new()),
        Some(Upkeep::Move {
            volume: "a".into(),
            from: 2,
            to: 3
        })
    );
    st.apply(&Command::Promote {
        volumes: ["a", "b"]
            .iter()
            .map(|v| (v.to_string(), st.volumes[*v].epoch))
            .collect(),
        node: 3,
        cause: None,
    })
    .unwrap();
    check_invariants(&st);
    for v in ["a", "b"] {
        assert!(!st.volumes[v].replicas.contains(&2), "{:?}", st.volumes[v]);
        assert!(st.volumes[v].joining.is_empty());
    }
}

#[test]
fn replacing_a_replica_still_being_rebuilt_decides_once_for_the_whole_target() {
    let mut st = target_on_n1_n2();
    add_node(&mut st, "n4", 4, 10 * GIB);
    // n3 replaces n2; it is in sync for "a" only when it goes away.
    st.apply(&change("a", Some("n3"), Some("n2"))).unwrap();
    isr_add(&mut st, "a", 3);
    st.apply(&change("a", Some("n4"), Some("n3"))).unwrap();
    check_invariants(&st);
    for v in ["a", "b"] {
        let v = &st.volumes[v];
        assert_eq!(v.replicas, vec![1, 2, 4], "{}: n3 gone, n2 kept", v.name);
        assert_eq!(
            v.joining,
            vec![Joining {
                node: 4,
                replaces: Some(2)
            }]
        );
    }
    isr_add(&mut st, "a", 4);
    isr_add(&mut st, "b", 4);
    for v in ["a", "b"] {
        assert_eq!(st.volumes[v].replicas, vec![1, 4]);
    }
}

#[test]
fn a_volume_from_before_the_wanted_count_still_gets_a_new_replica() {
    let mut st = target_on_n1_n2();
    for v in st.volumes.values_mut() {
        v.wanted_replicas = 0;
    }
    let a = st
        .apply(&Command::RemoveNode {
            name: "n2".into(),
            dead: true,
        })
        .unwrap();
    assert_eq!(
        a,
        Applied::DeadNodeRemoved(vec![("a".into(), Some(3)), ("b".into(), Some(3))])
    );
}
