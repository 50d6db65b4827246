//! The state machine: every command's validation, determinism, invariants.

use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;

pub(super) const GIB: u64 = 1 << 30;
pub(super) const IQN: &str = "iqn.2026-11.io.bulwark:t1";

pub(super) fn addrs(i: u8) -> NodeAddresses {
    let a = |port| SocketAddr::from(([127, 0, 0, i], port));
    NodeAddresses {
        control: a(3261),
        replication: a(3262),
        portals: vec![a(3260)],
    }
}

pub(super) fn add_node(st: &mut ClusterState, name: &str, i: u8, cap: u64) -> NodeId {
    match st.apply(&Command::AddNode {
        name: name.into(),
        addresses: addrs(i),
        capacity_bytes: cap,
        public_key: None,
    }) {
        Ok(Applied::NodeAdded(id)) => id,
        other => panic!("{other:?}"),
    }
}

pub(super) fn create(name: &str, size: u64, replicas: u8, nodes: &[&str]) -> Command {
    Command::CreateVolume {
        name: name.into(),
        size_bytes: size,
        replicas,
        block_size: 512,
        physical_block_size: None,
        nodes: nodes.iter().map(|s| s.to_string()).collect(),
    }
}

/// Three storage nodes of 10 GiB (n1, n2, n3).
pub(super) fn three() -> ClusterState {
    let mut st = ClusterState::new();
    for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
        add_node(&mut st, n, i as u8 + 1, 10 * GIB);
    }
    st
}

pub(super) fn refused(st: &mut ClusterState, cmd: Command) -> Refused {
    let before = st.clone();
    let r = st.apply(&cmd).expect_err("must be refused");
    assert_eq!(*st, before, "a refused command changes nothing");
    r
}

#[test]
fn nodes_get_fresh_ids_and_unique_names_and_addresses() {
    let mut st = three();
    assert_eq!(st.nodes.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(matches!(
        refused(
            &mut st,
            Command::AddNode {
                name: "n1".into(),
                addresses: addrs(9),
                capacity_bytes: 0,
                public_key: None
            }
        ),
        Refused::NodeExists(_)
    ));
    assert!(matches!(
        refused(
            &mut st,
            Command::AddNode {
                name: "n9".into(),
                addresses: addrs(2),
                capacity_bytes: 0,
                public_key: None
            }
        ),
        Refused::AddressInUse { .. }
    ));
    assert!(matches!(
        refused(
            &mut st,
            Command::AddNode {
                name: "bad name".into(),
                addresses: addrs(9),
                capacity_bytes: 0,
                public_key: None
            }
        ),
        Refused::BadName(_)
    ));
    st.apply(&Command::RemoveNode {
        name: "n3".into(),
        dead: false,
    })
    .unwrap();
    // Ids are never reused.
    assert_eq!(add_node(&mut st, "n4", 4, GIB), 4);
}

#[test]
fn node_started_updates_role_and_refuses_witness_with_volumes() {
    let mut st = three();
    st.apply(&create("v", GIB, 2, &["n1", "n2"])).unwrap();
    let r = refused(
        &mut st,
        Command::NodeStarted {
            id: 1,
            role: NodeRole::Witness,
            addresses: addrs(1),
            capacity_bytes: 0,
            shares_blocks: None,
        },
    );
    assert!(matches!(r, Refused::WitnessWithVolumes { .. }), "{r}");
    st.apply(&Command::NodeStarted {
        id: 3,
        role: NodeRole::Witness,
        addresses: addrs(3),
        capacity_bytes: 0,
        shares_blocks: None,
    })
    .unwrap();
    assert_eq!(st.nodes[&3].role, NodeRole::Witness);
    assert!(matches!(
        refused(
            &mut st,
            Command::NodeStarted {
                id: 42,
                role: NodeRole::Storage,
                addresses: addrs(42),
                capacity_bytes: 0,
                shares_blocks: None,
            }
        ),
        Refused::NoSuchNodeId(42)
    ));
}

#[test]
fn remove_node_refuses_holders_of_volumes_and_the_last_node() {
    let mut st = three();
    st.apply(&create("v", GIB, 1, &["n2"])).unwrap();
    let r = refused(
        &mut st,
        Command::RemoveNode {
            name: "n2".into(),
            dead: false,
        },
    );
    assert!(r.to_string().contains("holds replicas of [\"v\"]"), "{r}");
    assert!(matches!(
        refused(
            &mut st,
            Command::RemoveNode {
                name: "zz".into(),
                dead: false
            }
        ),
        Refused::NoSuchNode(_)
    ));
    let mut one = ClusterState::new();
    add_node(&mut one, "solo", 1, GIB);
    assert!(matches!(
        refused(
            &mut one,
            Command::RemoveNode {
                name: "solo".into(),
                dead: false,
            }
        ),
        Refused::LastNode(_)
    ));
}

#[test]
fn volume_placement_and_space() {
    let mut st = three();
    // Most free space first, ties by id.
    assert_eq!(
        st.apply(&create("a", 4 * GIB, 2, &[])),
        Ok(Applied::VolumeCreated(vec![1, 2]))
    );
    assert_eq!(
        st.apply(&create("b", 4 * GIB, 2, &[])),
        Ok(Applied::VolumeCreated(vec![3, 1]))
    );
    assert_eq!(st.free_bytes(1), 2 * GIB);
    // Named placement, primary first.
    assert_eq!(
        st.apply(&create("c", GIB, 1, &["n2"])),
        Ok(Applied::VolumeCreated(vec![2]))
    );
    assert_eq!(st.volumes["c"].primary, 2);
    assert_eq!(st.volumes["c"].epoch, 1);

    let r = refused(&mut st, create("big", 9 * GIB, 1, &[]));
    assert!(r.to_string().contains("Add storage nodes"), "{r}");
    let r = refused(&mut st, create("big", 3 * GIB, 1, &["n1"]));
    assert!(
        r.to_string()
            .contains("node \"n1\" has 2.0 GiB free, the volume needs 3.0 GiB"),
        "{r}"
    );
    assert!(matches!(
        refused(&mut st, create("a", GIB, 1, &[])),
        Refused::VolumeExists(_)
    ));
    assert!(matches!(
        refused(&mut st, create("x", 1000, 1, &[])),
        Refused::BadVolumeSize { .. }
    ));
    assert!(matches!(
        refused(&mut st, create("x", 0, 1, &[])),
        Refused::BadVolumeSize { .. }
    ));
    assert!(matches!(
        refused(&mut st, create("x", GIB, 0, &[])),
        Refused::BadReplicaCount(0)
    ));
    assert!(matches!(
        refused(&mut st, create("x", GIB, 4, &[])),
        Refused::BadReplicaCount(4)
    ));
    assert!(matches!(
        refused(&mut st, create("x", GIB, 2, &["n1", "n1"])),
        Refused::DuplicatePlacement(_)
    ));
    assert!(matches!(
        refused(&mut st, create("x", GIB, 1, &["nope"])),
        Refused::NoSuchNode(_)
    ));
    assert!(matches!(
        refused(&mut st, create("x/y", GIB, 1, &[])),
        Refused::BadName(_)
    ));
    let mut bs = create("x", GIB, 1, &[]);
    if let Command::CreateVolume { block_size, .. } = &mut bs {
        *block_size = 1024;
    }
    assert!(matches!(refused(&mut st, bs), Refused::BadBlockSize(1024)));
    for bad in [256, 1000, 65536] {
        let mut pbs = create("x", GIB, 1, &[]);
        if let Command::CreateVolume {
            physical_block_size,
            ..
        } = &mut pbs
        {
            *physical_block_size = Some(bad);
        }
        assert!(
            matches!(refused(&mut st, pbs), Refused::BadPhysicalBlockSize { physical, .. } if physical == bad),
            "{bad}"
        );
    }
    let mut pbs = create("x", GIB, 1, &[]);
    if let Command::CreateVolume {
        physical_block_size,
        ..
    } = &mut pbs
    {
        *physical_block_size = Some(512);
    }
    st.apply(&pbs).unwrap();
    assert_eq!(st.volumes["x"].physical_block_size, Some(512));
}

#[test]
fn witnesses_hold_no_data() {
    let mut st = three();
    st.apply(&Command::NodeStarted {
        id: 3,
        role: NodeRole::Witness,
        addresses: addrs(3),
        capacity_bytes: 10 * GIB,
        shares_blocks: None,
    })
    .unwrap();
    assert!(matches!(
        refused(&mut st, create("x", GIB, 1, &["n3"])),
        Refused::WitnessCannotHold(_)
    ));
    let r = refused(&mut st, create("x", GIB, 3, &[]));
    assert!(r.to_string().contains("n3: witness"), "{r}");
    assert_eq!(
        st.apply(&create("x", GIB, 2, &[])),
        Ok(Applied::VolumeCreated(vec![1, 2]))
    );
}

#[test]
fn resize_grows_only_within_space() {
    let mut st = three();
    st.apply(&create("v", GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&Command::ResizeVolume {
        name: "v".into(),
        size_bytes: 2 * GIB,
    })
    .unwrap();
    assert_eq!(st.volumes["v"].size_bytes, 2 * GIB);
    let r = refused(
        &mut st,
        Command::ResizeVolume {
            name: "v".into(),
            size_bytes: GIB,
        },
    );
    assert!(
        r.to_string().contains("shrinking would destroy data"),
        "{r}"
    );
    assert!(matches!(
        refused(
            &mut st,
            Command::ResizeVolume {
                name: "v".into(),
                size_bytes: 11 * GIB
            }
        ),
        Refused::NoSpace { .. }
    ));
    assert!(matches!(
        refused(
            &mut st,
            Command::ResizeVolume {
                name: "v".into(),
                size_bytes: 2 * GIB + 1
            }
        ),
        Refused::BadVolumeSize { .. }
    ));
    assert!(matches!(
        refused(
            &mut st,
            Command::ResizeVolume {
                name: "w".into(),
                size_bytes: GIB
            }
        ),
        Refused::NoSuchVolume(_)
    ));
}

#[test]
fn targets_luns_and_mapping_rules() {
    let mut st = three();
    st.apply(&create("v1", GIB, 2, &["n1", "n2"])).unwrap();
    st.apply(&create("v2", GIB, 2, &["n1", "n3"])).unwrap();
    st.apply(&create("v3", GIB, 2, &["n2", "n1"])).unwrap();
    st.apply(&Command::CreateTarget {
        iqn: IQN.into(),
        alias: None,
    })
    .unwrap();
    for bad in [
        "iqn.2026.io.x",
        "IQN.2026-11.io.x:a",
        "eui.123",
        "naa.12345678",
        "foo",
        "iqn.2026-11.:x",
    ] {
        assert!(
            matches!(
                refused(
                    &mut st,
                    Command::CreateTarget {
                        iqn: bad.into(),
                        alias: None
                    }
                ),
                Refused::BadIqn(_)
            ),
            "{bad}"
        );
    }
    for good in [
        "eui.0123456789abcdef",
        "naa.0123456789abcdef",
        "iqn.2001-04.com.example",
    ] {
        st.apply(&Command::CreateTarget {
            iqn: good.into(),
            alias: None,
        })
        .unwrap();
    }
    assert!(matches!(
        refused(
            &mut st,
            Command::CreateTarget {
                iqn: IQN.into(),
                alias: None
            }
        ),
        Refused::TargetExists(_)
    ));
    let add = |lun, volume: &str| Command::AddLun {
        iqn: IQN.into(),
        lun,
        volume: volume.into(),
    };
    assert_eq!(st.apply(&add(None, "v1")), Ok(Applied::LunAdded(0)));
    assert_eq!(st.apply(&add(Some(5), "v2")), Ok(Applied::LunAdded(5)));
    assert!(matches!(
        refused(&mut st, add(Some(5), "v3")),
        Refused::PrimaryMismatch { .. }
    ));
    let r = refused(&mut st, add(None, "v3"));
    assert!(r.to_string().contains("a target moves as one unit"), "{r}");
    assert!(matches!(
        refused(&mut st, add(None, "v1")),
        Refused::VolumeAlreadyMapped { .. }
    ));
    assert!(matches!(
        refused(&mut st, add(None, "nope")),
        Refused::NoSuchVolume(_)
    ));
    st.apply(&Command::CreateTarget {
        iqn: "iqn.2026-11.io.bulwark:t2".into(),
        alias: None,
    })
    .unwrap();
    st.apply(&Command::AddLun {
        iqn: "iqn.2026-11.io.bulwark:t2".into(),
        lun: Some(0),
        volume: "v3".into(),
    })
    .unwrap();
    assert_eq!(
        st.target_primary(&st.targets["iqn.2026-11.io.bulwark:t2"]),
        Some(2)
    );
    // LunTaken needs a free volume with the right primary.
    st.apply(&create("v4", GIB, 1, &["n1"])).unwrap();
    assert!(matches!(
        refused(&mut st, add(Some(0), "v4")),
        Refused::LunTaken { .. }
    ));
    assert!(matches!(
        refused(&mut st, add(Some(16384), "v4")),
        Refused::LunOutOfRange(16384)
    ));
    // A mapped volume cannot be deleted; after unmapping it can.
    let r = refused(
        &mut st,
        Command::DeleteVolume {
            name: "v1".into(),
            with_snapshots: false,
        },
    );
    assert!(
        r.to_string()
            .contains("bulwark lun remove iqn.2026-11.io.bulwark:t1 0"),
        "{r}"
    );
    st.apply(&Command::RemoveLun {
        iqn: IQN.into(),
        lun: 0,
    })
    .unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::RemoveLun {
                iqn: IQN.into(),
                lun: 0
            }
        ),
        Refused::NoSuchLun { .. }
    ));
    st.apply(&Command::DeleteVolume {
        name: "v1".into(),
        with_snapshots: false,
    })
    .unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::DeleteVolume {
                name: "v1".into(),
                with_snapshots: false,
            }
        ),
        Refused::NoSuchVolume(_)
    ));
    // Deleting a target unmaps its volumes.
    st.apply(&Command::DeleteTarget { iqn: IQN.into() })
        .unwrap();
    assert!(st.mapping_of("v2").is_none());
    assert!(matches!(
        refused(&mut st, Command::DeleteTarget { iqn: IQN.into() }),
        Refused::NoSuchTarget(_)
    ));
}

#[test]
fn acls() {
    let mut st = three();
    st.apply(&Command::CreateTarget {
        iqn: IQN.into(),
        alias: None,
    })
    .unwrap();
    let ini = "iqn.1994-05.com.redhat:client";
    st.apply(&Command::AddAcl {
        iqn: IQN.into(),
        initiator: ini.into(),
    })
    .unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::AddAcl {
                iqn: IQN.into(),
                initiator: ini.into()
            }
        ),
        Refused::AclExists { .. }
    ));
    assert!(matches!(
        refused(
            &mut st,
            Command::AddAcl {
                iqn: IQN.into(),
                initiator: "not an iqn".into()
            }
        ),
        Refused::BadIqn(_)
    ));
    assert!(matches!(
        refused(
            &mut st,
            Command::AddAcl {
                iqn: "iqn.2026-11.x:none".into(),
                initiator: ini.into()
            }
        ),
        Refused::NoSuchTarget(_)
    ));
    st.apply(&Command::RemoveAcl {
        iqn: IQN.into(),
        initiator: ini.into(),
    })
    .unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::RemoveAcl {
                iqn: IQN.into(),
                initiator: ini.into()
            }
        ),
        Refused::NoSuchAcl { .. }
    ));
}

#[test]
fn chap_accounts_are_shared_and_validated() {
    let mut st = three();
    st.apply(&Command::CreateTarget {
        iqn: IQN.into(),
        alias: None,
    })
    .unwrap();
    st.apply(&Command::CreateTarget {
        iqn: "iqn.2026-11.io.bulwark:t2".into(),
        alias: None,
    })
    .unwrap();
    let acct = |secret: &str, mutual: Option<(&str, &str)>| Command::AddChap {
        account: ChapAccount {
            user: "alice".into(),
            secret: secret.into(),
            mutual: mutual.map(|(u, s)| (u.into(), s.into())),
        },
    };
    let r = refused(&mut st, acct("short", None));
    assert!(r.to_string().contains("12 to 255"), "{r}");
    assert!(matches!(
        refused(&mut st, acct("twelve-chars", Some(("tgt", "twelve-chars")))),
        Refused::ChapSameSecret
    ));
    assert!(matches!(
        refused(&mut st, acct("twelve-chars", Some(("", "other-secret")))),
        Refused::BadName(_)
    ));
    st.apply(&acct("twelve-chars", Some(("tgt", "other-secret"))))
        .unwrap();
    assert!(matches!(
        refused(&mut st, acct("twelve-chars", None)),
        Refused::ChapExists(_)
    ));
    for t in [IQN, "iqn.2026-11.io.bulwark:t2"] {
        st.apply(&Command::BindChap {
            user: "alice".into(),
            iqn: t.into(),
        })
        .unwrap();
    }
    assert!(matches!(
        refused(
            &mut st,
            Command::BindChap {
                user: "alice".into(),
                iqn: IQN.into()
            }
        ),
        Refused::ChapAlreadyBound { .. }
    ));
    assert!(matches!(
        refused(
            &mut st,
            Command::BindChap {
                user: "bob".into(),
                iqn: IQN.into()
            }
        ),
        Refused::NoSuchChap(_)
    ));
    let r = refused(
        &mut st,
        Command::RemoveChap {
            user: "alice".into(),
        },
    );
    assert!(
        matches!(&r, Refused::ChapBound { targets, .. } if targets.len() == 2),
        "{r}"
    );
    for t in [IQN, "iqn.2026-11.io.bulwark:t2"] {
        st.apply(&Command::UnbindChap {
            user: "alice".into(),
            iqn: t.into(),
        })
        .unwrap();
    }
    assert!(matches!(
        refused(
            &mut st,
            Command::UnbindChap {
                user: "alice".into(),
                iqn: IQN.into()
            }
        ),
        Refused::ChapNotBound { .. }
    ));
    st.apply(&Command::RemoveChap {
        user: "alice".into(),
    })
    .unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::RemoveChap {
                user: "alice".into()
            }
        ),
        Refused::NoSuchChap(_)
    ));
}

#[test]
fn in_sync_set_and_promotion_follow_epochs() {
    let mut st = three();
    st.apply(&create("v", GIB, 3, &["n1", "n2", "n3"])).unwrap();
    assert_eq!(st.volumes["v"].in_sync, vec![1, 2, 3]);
    let isr = |epoch, add: Vec<NodeId>, remove: Vec<NodeId>| Command::IsrChange {
        volume: "v".into(),
        epoch,
        add,
        remove,
    };
    st.apply(&isr(1, vec![], vec![3])).unwrap();
    assert_eq!(st.volumes["v"].in_sync, vec![1, 2]);
    assert!(matches!(
        refused(&mut st, isr(1, vec![], vec![1])),
        Refused::RemovePrimary(_)
    ));
    assert!(matches!(
        refused(&mut st, isr(1, vec![9], vec![])),
        Refused::NotAReplica { .. }
    ));
    // Only an in-sync replica may be promoted; the epoch must be current.
    let promote = |epoch, node| Command::Promote {
        cause: None,
        volumes: vec![("v".into(), epoch)],
        node,
    };
    assert!(matches!(
        refused(&mut st, promote(1, 3)),
        Refused::NotInSync { .. }
    ));
    st.apply(&promote(1, 2)).unwrap();
    let v = &st.volumes["v"];
    assert_eq!((v.primary, v.epoch, v.in_sync.clone()), (2, 2, vec![2]));
    // The deposed primary's requests are refused from now on.
    let r = refused(&mut st, isr(1, vec![3], vec![]));
    assert!(r.to_string().contains("a newer primary took over"), "{r}");
    st.apply(&isr(2, vec![1, 3], vec![])).unwrap();
    assert_eq!(st.volumes["v"].in_sync, vec![1, 2, 3]);
    assert!(matches!(
        refused(&mut st, promote(1, 1)),
        Refused::StaleEpoch { .. }
    ));

    // A planned move: only to an in-sync replica; the promotion ends it.
    let mv = |node: &str| Command::MoveVolume {
        volume: "v".into(),
        node: node.into(),
    };
    assert!(matches!(
        refused(&mut st, mv("n2")),
        Refused::AlreadyThere { .. }
    ));
    assert!(matches!(refused(&mut st, mv("zz")), Refused::NoSuchNode(_)));
    st.apply(&isr(2, vec![], vec![3])).unwrap();
    let r = refused(&mut st, mv("n3"));
    assert!(
        r.to_string().contains("wait until its resync finishes"),
        "{r}"
    );
    st.apply(&mv("n1")).unwrap();
    assert_eq!(st.volumes["v"].moving_to, Some(1));
    st.apply(&promote(2, 1)).unwrap();
    assert_eq!(
        (st.volumes["v"].primary, st.volumes["v"].moving_to),
        (1, None)
    );
}

#[test]
fn a_node_back_from_a_power_loss_leaves_the_in_sync_sets_it_does_not_serve() {
    let mut st = three();
    st.apply(&create("v", GIB, 3, &["n1", "n2", "n3"])).unwrap();
    st.apply(&create("w", GIB, 2, &["n2", "n3"])).unwrap();
    st.apply(&Command::NodeLostPower { id: 2 }).unwrap();
    // A replica of v: out, and named until it is back in sync.
    assert_eq!(st.volumes["v"].in_sync, vec![1, 3]);
    assert_eq!(st.volumes["v"].lost_power, vec![2]);
    // The primary of w keeps its place (the failover decides, promoting it last).
    assert_eq!(st.volumes["w"].primary, 2);
    assert_eq!(st.volumes["w"].in_sync, vec![2, 3]);
    // The last in-sync member stays: after a whole-cluster loss someone must serve.
    st.apply(&Command::NodeLostPower { id: 3 }).unwrap();
    assert_eq!(st.volumes["v"].in_sync, vec![1]);
    st.apply(&Command::NodeLostPower { id: 1 }).unwrap();
    assert_eq!(st.volumes["v"].in_sync, vec![1], "the primary stays");
    assert_eq!(st.volumes["w"].in_sync, vec![2], "the last member stays");
    // Back in sync through resync: no longer named.
    st.apply(&Command::IsrChange {
        volume: "v".into(),
        epoch: 1,
        add: vec![2],
        remove: vec![],
    })
    .unwrap();
    assert_eq!(st.volumes["v"].lost_power, vec![3, 1]);
    assert!(matches!(
        refused(&mut st, Command::NodeLostPower { id: 9 }),
        Refused::NoSuchNodeId(9)
    ));
    assert!(Command::NodeLostPower { id: 1 }.node_only());
}

#[test]
fn settings_are_bounded() {
    let mut st = three();
    let set = |hb, ft| Command::SetSettings {
        settings: Settings {
            heartbeat_interval_ms: hb,
            failure_timeout_ms: ft,
            ..Settings::default()
        },
    };
    let rate = |r| Command::SetSettings {
        settings: Settings {
            resync_rate_bytes_per_s: r,
            ..Settings::default()
        },
    };
    assert!(matches!(
        refused(&mut st, rate(4096)),
        Refused::BadSettings(m) if m.contains("1 MiB/s")
    ));
    let fence = |c: &str| Command::SetSettings {
        settings: Settings {
            fence_command: Some(c.into()),
            ..Settings::default()
        },
    };
    for bad in ["fence.sh", "/usr/bin/fence --node x"] {
        assert!(matches!(
            refused(&mut st, fence(bad)),
            Refused::BadSettings(m) if m.contains("absolute path")
        ));
    }
    st.apply(&fence("/usr/local/sbin/bulwark-fence")).unwrap();
    st.apply(&rate(0)).unwrap();
    assert_eq!(st.settings.resync_rate_bytes_per_s, 0, "0 is unlimited");
    // A state written before the setting existed reads with the default.
    let old: Settings =
        serde_json::from_str(r#"{"heartbeat_interval_ms":150,"failure_timeout_ms":800}"#).unwrap();
    assert_eq!(
        old.resync_rate_bytes_per_s,
        crate::state::DEFAULT_RESYNC_RATE
    );
    assert!(matches!(
        refused(&mut st, set(5, 800)),
        Refused::BadSettings(_)
    ));
    assert!(matches!(
        refused(&mut st, set(500, 800)),
        Refused::BadSettings(_)
    ));
    st.apply(&set(100, 500)).unwrap();
    assert_eq!(st.settings.failure_timeout_ms, 500);
}

/// The invariants every reachable state keeps.
pub(super) fn check_invariants(st: &ClusterState) {
    for v in st.volumes.values() {
        assert!(v.replicas.contains(&v.primary), "primary is a replica");
        assert!(v.in_sync.contains(&v.primary), "the primary is in sync");
        assert!(
            v.in_sync.iter().all(|n| v.replicas.contains(n)),
            "in-sync members are replicas"
        );
        if let Some(n) = v.moving_to {
            assert!(
                v.in_sync.contains(&n) && n != v.primary,
                "a move goes to another in-sync replica"
            );
        }
        let mut r = v.replicas.clone();
        r.sort();
        r.dedup();
        assert_eq!(r.len(), v.replicas.len(), "replicas on distinct nodes");
        for id in &v.replicas {
            let n = st.nodes.get(id).expect("replica on a member");
            assert_eq!(n.role, NodeRole::Storage, "no data on witnesses");
        }
        assert_eq!(v.size_bytes % u64::from(v.block_size), 0);
        for j in &v.joining {
            assert!(
                v.replicas.contains(&j.node),
                "a joining replica is a replica"
            );
            if let Some(old) = j.replaces {
                assert!(
                    v.replicas.contains(&old),
                    "a replaced replica stays until then"
                );
                assert_ne!(old, j.node);
            }
        }
        assert!(
            v.lasting_replicas().count() <= 3,
            "at most 3 replicas for good"
        );
    }
    for t in st.targets.values() {
        let primaries: std::collections::BTreeSet<NodeId> = t
            .luns
            .values()
            .map(|v| {
                st.volumes
                    .get(v)
                    .expect("LUN maps an existing volume")
                    .primary
            })
            .collect();
        assert!(primaries.len() <= 1, "a target's volumes share one primary");
        for u in &t.chap {
            assert!(st.chap.contains_key(u), "bound accounts exist");
        }
    }
    let mut mapped = std::collections::BTreeSet::new();
    for v in st.targets.values().flat_map(|t| t.luns.values()) {
        assert!(mapped.insert(v.clone()), "a volume is mapped once");
    }
    assert!(st.nodes.keys().all(|id| *id < st.next_node_id));
}

fn arb_command() -> impl Strategy<Value = Command> {
    let node = prop::sample::select(vec!["n1", "n2", "n3", "n4", "w"]).prop_map(String::from);
    let vol = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
    let iqn = prop::sample::select(vec![IQN, "iqn.2026-11.io.bulwark:t2"]).prop_map(String::from);
    let user = prop::sample::select(vec!["alice", "bob"]).prop_map(String::from);
    prop_oneof![
        (node.clone(), 1u8..6, 0u64..8).prop_map(|(name, i, cap)| Command::AddNode {
            name,
            addresses: addrs(i),
            capacity_bytes: cap * GIB,
            public_key: None,
        }),
        (1u64..6).prop_map(|id| Command::NodeLostPower { id }),
        (1u64..6, any::<bool>(), 1u8..6).prop_map(|(id, w, i)| Command::NodeStarted {
            id,
            role: if w {
                NodeRole::Witness
            } else {
                NodeRole::Storage
            },
            addresses: addrs(i),
            capacity_bytes: 4 * GIB,
            shares_blocks: None,
        }),
        (node.clone(), any::<bool>()).prop_map(|(name, dead)| Command::RemoveNode { name, dead }),
        (node.clone(), any::<bool>(), any::<bool>()).prop_map(|(name, drained, evacuate)| {
            Command::DrainNode {
                name,
                drained,
                evacuate,
            }
        }),
        (
            vol.clone(),
            prop::option::of(node.clone()),
            prop::option::of(node.clone()),
            any::<bool>()
        )
            .prop_map(|(volume, add, remove, force)| Command::ChangeReplicas {
                volume,
                add,
                remove,
                force
            }),
        (
            vol.clone(),
            1u64..4,
            1u8..4,
            prop::collection::vec(node, 0..3)
        )
            .prop_map(|(name, g, replicas, nodes)| Command::CreateVolume {
                name,
                size_bytes: g * GIB,
                replicas,
                block_size: 512,
                physical_block_size: None,
                nodes,
            }),
        (vol.clone(), 1u64..6).prop_map(|(name, g)| Command::ResizeVolume {
            name,
            size_bytes: g * GIB
        }),
        vol.clone().prop_map(|name| Command::DeleteVolume {
            name,
            with_snapshots: false,
        }),
        iqn.clone()
            .prop_map(|iqn| Command::CreateTarget { iqn, alias: None }),
        iqn.clone().prop_map(|iqn| Command::DeleteTarget { iqn }),
        (iqn.clone(), prop::option::of(0u64..3), vol)
            .prop_map(|(iqn, lun, volume)| Command::AddLun { iqn, lun, volume }),
        (iqn.clone(), 0u64..3).prop_map(|(iqn, lun)| Command::RemoveLun { iqn, lun }),
        user.clone().prop_map(|user| Command::AddChap {
            account: ChapAccount {
                user,
                secret: "twelve-chars".into(),
                mutual: None
            }
        }),
        user.clone().prop_map(|user| Command::RemoveChap { user }),
        (user.clone(), iqn.clone()).prop_map(|(user, iqn)| Command::BindChap { user, iqn }),
        (user, iqn).prop_map(|(user, iqn)| Command::UnbindChap { user, iqn }),
        (
            prop::sample::select(vec!["a", "b", "c"]),
            1u64..4,
            1u64..6,
            1u64..6
        )
            .prop_map(|(v, epoch, a, r)| {
                Command::IsrChange {
                    volume: v.into(),
                    epoch,
                    add: vec![a],
                    remove: vec![r],
                }
            }),
        (prop::sample::select(vec!["a", "b", "c"]), 1u64..4, 1u64..6).prop_map(
            |(v, epoch, node)| Command::Promote {
                cause: None,
                volumes: vec![(v.into(), epoch)],
                node
            }
        ),
        (
            prop::sample::select(vec!["a", "b", "c"]),
            prop::sample::select(vec!["n1", "n2", "n3"])
        )
            .prop_map(|(v, n)| Command::MoveVolume {
                volume: v.into(),
                node: n.into()
            }),
    ]
}

proptest! {
    /// Same commands, same order → same state and same results on every node; every
    /// state keeps the invariants; the state survives its snapshot encoding.
    #[test]
    fn apply_is_deterministic_and_keeps_invariants(cmds in prop::collection::vec(arb_command(), 1..60)) {
        let mut a = ClusterState::new();
        let mut b = ClusterState::new();
        for c in &cmds {
            let ra = a.apply(c);
            let rb = b.apply(c);
            prop_assert_eq!(ra, rb);
            check_invariants(&a);
        }
        prop_assert_eq!(&a, &b);
        let json = serde_json::to_vec(&a).unwrap();
        let back: ClusterState = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(a, back);
        // Commands themselves survive the log encoding.
        for c in &cmds {
            let back: Command = serde_json::from_slice(&serde_json::to_vec(c).unwrap()).unwrap();
            prop_assert_eq!(&back, c);
        }
    }
}

#[test]
fn virtual_ips() {
    let mut st = three();
    for iqn in [IQN, "iqn.2026-11.x:other"] {
        st.apply(&Command::CreateTarget {
            iqn: iqn.into(),
            alias: None,
        })
        .unwrap();
    }
    let vip = |a: &str, prefix: u8, interface: &str| VirtualIp {
        address: a.parse().unwrap(),
        prefix,
        interface: interface.into(),
    };
    st.apply(&Command::AddVip {
        iqn: IQN.into(),
        vip: vip("198.18.0.100", 24, "eth0"),
    })
    .unwrap();
    assert_eq!(st.targets[IQN].vips.len(), 1);
    for (bad, want) in [
        (vip("198.18.0.100", 24, "eth0"), "VipInUse"),
        (vip("198.18.0.101", 33, "eth0"), "BadVip"),
        (vip("0.0.0.0", 24, "eth0"), "BadVip"),
        (vip("198.18.0.101", 24, "eth0; reboot"), "BadVip"),
        (vip("198.18.0.101", 24, ""), "BadVip"),
    ] {
        let r = refused(
            &mut st,
            Command::AddVip {
                iqn: "iqn.2026-11.x:other".into(),
                vip: bad.clone(),
            },
        );
        assert!(format!("{r:?}").starts_with(want), "{bad:?}: {r:?}");
        assert!(!r.to_string().is_empty());
    }
    st.apply(&Command::RemoveVip {
        iqn: IQN.into(),
        address: "198.18.0.100".parse().unwrap(),
    })
    .unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::RemoveVip {
                iqn: IQN.into(),
                address: "198.18.0.100".parse().unwrap(),
            }
        ),
        Refused::NoSuchVip { .. }
    ));
}

#[test]
fn a_verify_is_asked_for_and_its_result_recorded_once() {
    let mut st = three();
    st.apply(&create("v", GIB, 2, &[])).unwrap();
    assert!(matches!(
        refused(
            &mut st,
            Command::StartVerify {
                volume: "w".into(),
                repair: false
            }
        ),
        Refused::NoSuchVolume(_)
    ));
    let start = |repair| Command::StartVerify {
        volume: "v".into(),
        repair,
    };
    st.apply(&start(false)).unwrap();
    st.apply(&start(true)).unwrap();
    let asked = st.volumes["v"].verify.clone().unwrap();
    assert_eq!((asked.id, asked.repair, asked.result), (2, true, None));
    let result = VerifyResult {
        regions: 1024,
        compared: 1024,
        replicas: vec![ReplicaVerify {
            node: 3,
            differing: 2,
            sample: vec![5, 9],
            not_compared: 0,
        }],
        ..Default::default()
    };
    // Commands travel and are stored as JSON.
    let cmd = Command::FinishVerify {
        volume: "v".into(),
        id: 2,
        result: result.clone(),
    };
    let json = serde_json::to_string(&cmd).unwrap();
    assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), cmd);
    // The first request was replaced: its result does not land.
    st.apply(&Command::FinishVerify {
        volume: "v".into(),
        id: 1,
        result: result.clone(),
    })
    .unwrap();
    assert_eq!(st.volumes["v"].verify.as_ref().unwrap().result, None);
    st.apply(&Command::FinishVerify {
        volume: "v".into(),
        id: 2,
        result: result.clone(),
    })
    .unwrap();
    assert_eq!(
        st.volumes["v"].verify.as_ref().unwrap().result,
        Some(result)
    );
}

#[test]
fn alerts_are_checked_added_tested_and_removed() {
    let mut st = ClusterState::default();
    let alert = |name: &str, program: Option<&str>, url: Option<&str>, events: &[&str]| Alert {
        name: name.into(),
        program: program.map(Into::into),
        url: url.map(Into::into),
        events: events.iter().map(|e| e.to_string()).collect(),
        tests: 0,
        timeout_ms: 5000,
        retries: 2,
    };
    let bad = [
        alert("mail", Some("sendmail-alert"), None, &[]),
        alert("mail", Some("/bin/x"), Some("https://h/a"), &[]),
        alert("mail", None, None, &[]),
        alert("mail", None, Some("ftp://h/a"), &[]),
        alert("mail", Some("/bin/x"), None, &["failover"]),
        alert("<b>m</b>", Some("/bin/x"), None, &[]),
    ];
    for a in bad {
        let why = match st.apply(&Command::SetAlert { alert: a.clone() }) {
            Err(Refused::BadAlert(why)) => why,
            other => panic!("{a:?} was not refused: {other:?}"),
        };
        assert!(!why.is_empty());
    }
    assert!(st.alerts.is_empty());
    let good = alert(
        "mail",
        Some("/usr/local/bin/a"),
        None,
        &["failover_started"],
    );
    st.apply(&Command::SetAlert {
        alert: good.clone(),
    })
    .unwrap();
    assert!(st.alerts["mail"].wants(crate::status::EventKind::FailoverStarted));
    assert!(!st.alerts["mail"].wants(crate::status::EventKind::NodeOffline));
    st.apply(&Command::TestAlert {
        name: "mail".into(),
    })
    .unwrap();
    assert_eq!(st.alerts["mail"].tests, 1);
    // Replacing an alert keeps its test count (a test in flight still finds its report).
    st.apply(&Command::SetAlert { alert: good }).unwrap();
    assert_eq!(st.alerts["mail"].tests, 1);
    assert!(matches!(
        st.apply(&Command::TestAlert { name: "x".into() }),
        Err(Refused::NoSuchAlert(_))
    ));
    st.apply(&Command::RemoveAlert {
        name: "mail".into(),
    })
    .unwrap();
    assert!(matches!(
        st.apply(&Command::RemoveAlert {
            name: "mail".into()
        }),
        Err(Refused::NoSuchAlert(_))
    ));
}
