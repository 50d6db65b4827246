//! Real multi-process clusters on loopback aliases: each test starts `bulwark serve`
//! processes on its own 127.0.N.x block, talks to them through the admin API and the
//! iSCSI portals, and kills every process it started (by pid) when it ends.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::rpc::{Client, Request, RpcError};
use cluster::state::{Command, NodeRole};
use cluster::{Applied, Identity, Refused, Token};
use initiator::Credentials;

mod common;
use common::*;

/// 3 nodes (2 storage + 1 witness) form a cluster; what one node commits every node
/// sees; targets are served on the primary and configuration applies live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_and_serve_live_configuration() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = Cluster::new(10, 3);
    c.nodes[2].extra = vec!["--witness".into()];
    c.init().await;
    c.join(1).await;
    c.join(2).await;
    c.wait_voters(0, 3).await;

    // Each change through a different node; forwarded to the leader.
    let iqn = "iqn.2026-11.io.bulwark:cluster-test";
    let placed = commit(&c.admin(1), create_volume("v1", &["n1"])).await;
    assert_eq!(placed, Applied::VolumeCreated(vec![1]));
    commit(
        &c.admin(2),
        Command::CreateTarget {
            iqn: iqn.into(),
            alias: None,
        },
    )
    .await;
    assert_eq!(
        commit(
            &c.admin(0),
            Command::AddLun {
                iqn: iqn.into(),
                lun: None,
                volume: "v1".into()
            }
        )
        .await,
        Applied::LunAdded(0)
    );
    // Conflicts are refused with the reason, through any node.
    let r = c
        .admin(2)
        .write(create_volume("v1", &["n2"]))
        .await
        .unwrap();
    assert!(matches!(r, Err(Refused::VolumeExists(_))), "{r:?}");
    let r = c
        .admin(1)
        .write(Command::DeleteVolume {
            name: "v1".into(),
            with_snapshots: false,
        })
        .await
        .unwrap();
    assert!(matches!(r, Err(Refused::VolumeMapped { .. })), "{r:?}");
    // The witness holds no data.
    let r = c
        .admin(0)
        .write(create_volume("v2", &["n1", "n2", "n3"]))
        .await
        .unwrap();
    assert!(matches!(r, Err(Refused::WitnessCannotHold(_))), "{r:?}");

    // A client reads its own writes through whichever node it wrote through: a
    // follower answers only once it has applied the command itself (the CLI's
    // `volume move` read a follower's state right after the commit and saw no move).
    let leader = c.leader(0).await;
    for i in (0..3).filter(|i| *i != leader) {
        let admin = c.admin(i);
        for n in 0..10 {
            let iqn = format!("iqn.2026-11.io.bulwark:ryw-{i}-{n}");
            commit(
                &admin,
                Command::CreateTarget {
                    iqn: iqn.clone(),
                    alias: None,
                },
            )
            .await;
            let st = admin.state().await.unwrap();
            assert!(
                st.targets.contains_key(&iqn),
                "node {i} answered the write of {iqn} before it applied it"
            );
        }
    }

    // Every node has the same state.
    let want = c.state(0).await.unwrap();
    assert_eq!(want.nodes[&3].role, NodeRole::Witness);
    for i in 1..3 {
        wait(
            "the same state everywhere",
            Duration::from_secs(10),
            async || c.state(i).await.filter(|s| *s == want),
        )
        .await;
    }

    // A new target admits nobody until an ACL entry, a CHAP binding or allow-any: the
    // serving node refuses the login as not authorized (2/2).
    let portal = c.nodes[0].addresses().portals[0];
    wait(
        "the new target served and refusing",
        Duration::from_secs(10),
        async || match login(portal, iqn, None).await {
            Err(initiator::InitiatorError::LoginRefused {
                class: 2,
                detail: 2,
            }) => Some(()),
            _ => None,
        },
    )
    .await;
    commit(
        &c.admin(1),
        Command::SetTargetAccess {
            iqn: iqn.into(),
            allow_any: Some(true),
            allow_target_reset: None,
        },
    )
    .await;

    // The primary serves the target; the others do not.
    let mut s = wait(
        "the target served on n1",
        Duration::from_secs(10),
        async || login(portal, iqn, None).await.ok(),
    )
    .await;
    assert!(login(c.nodes[1].addresses().portals[0], iqn, None)
        .await
        .is_err());
    // TEST UNIT READY: a fresh nexus first reports the power-on unit attention.
    let tur = [0u8; 6];
    let _ = s.command(0, &tur, None, 0).await.unwrap();
    assert_eq!(s.command(0, &tur, None, 0).await.unwrap().status, 0);

    // A new LUN on the live target: REPORTED LUNS DATA HAS CHANGED on the session.
    commit(&c.admin(1), create_volume("v3", &["n1"])).await;
    commit(
        &c.admin(2),
        Command::AddLun {
            iqn: iqn.into(),
            lun: Some(1),
            volume: "v3".into(),
        },
    )
    .await;
    let sense = wait(
        "REPORTED LUNS DATA HAS CHANGED",
        Duration::from_secs(10),
        async || {
            let r = s.command(0, &tur, None, 0).await.ok()?;
            (r.status == 2).then_some(r.sense)
        },
    )
    .await;
    // Fixed-format sense: key UNIT ATTENTION (6), ASC/ASCQ 3F/0E.
    assert_eq!(
        (sense[2] & 0x0f, sense[12], sense[13]),
        (6, 0x3f, 0x0e),
        "{sense:02x?}"
    );
    let luns = [0xa0u8, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0];
    let r = s.command(0, &luns[..12], None, 64).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(r.data[..4].try_into().unwrap()),
        16,
        "two LUNs reported"
    );

    // An ACL that does not list us: our live session ends and new logins are refused,
    // without a restart.
    commit(
        &c.admin(0),
        Command::AddAcl {
            iqn: iqn.into(),
            initiator: "iqn.2026-11.io.example:other".into(),
        },
    )
    .await;
    assert!(
        s.closed_within(Duration::from_secs(10)).await,
        "a session the ACL no longer allows ends"
    );
    wait("the ACL applied", Duration::from_secs(10), async || {
        login(portal, iqn, None).await.err()
    })
    .await;
    commit(
        &c.admin(0),
        Command::AddAcl {
            iqn: iqn.into(),
            initiator: INITIATOR.into(),
        },
    )
    .await;
    wait(
        "our initiator allowed",
        Duration::from_secs(10),
        async || login(portal, iqn, None).await.ok(),
    )
    .await;

    // A CHAP account bound to the target: required from the next login.
    let account = cluster::state::ChapAccount {
        user: "alice".into(),
        secret: "a-secret-of-16ch".into(),
        mutual: None,
    };
    commit(&c.admin(1), Command::AddChap { account }).await;
    commit(
        &c.admin(1),
        Command::BindChap {
            user: "alice".into(),
            iqn: iqn.into(),
        },
    )
    .await;
    wait("CHAP required", Duration::from_secs(10), async || {
        login(portal, iqn, None).await.err()
    })
    .await;
    let creds = Credentials {
        user: "alice".into(),
        secret: "a-secret-of-16ch".into(),
    };
    let s = login(portal, iqn, Some(creds)).await.expect("CHAP login");

    // Status through any node shows the whole cluster and the session.
    let (_, statuses) = c.admin(2).cluster_status().await.unwrap();
    assert_eq!(statuses.len(), 3);
    let n1 = statuses[&1].as_ref().unwrap();
    assert!(n1.serving.iter().any(|t| t == iqn));
    assert!(n1.sessions.iter().any(|x| x.initiator == INITIATOR));
    s.logout().await.unwrap();

    // The witness leaves: its process stops by itself and the membership shrinks.
    commit(
        &c.admin(0),
        Command::RemoveNode {
            name: "n3".into(),
            dead: false,
        },
    )
    .await;
    let child = c.nodes[2].child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "a removed node stops by itself");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.nodes[2].child = None;
    c.wait_voters(0, 2).await;
}

/// kill -9 of the Raft leader: a new leader and a committed change within 3 s; the
/// killed node, restarted from its data folder, catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_then_new_leader_commits_and_restarted_node_catches_up() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = Cluster::three_voters(11).await;
    commit(
        &c.admin(0),
        Command::CreateTarget {
            iqn: "iqn.2026-11.io.bulwark:before".into(),
            alias: None,
        },
    )
    .await;

    let leader = c.leader(0).await;
    c.nodes[leader].kill9();
    let killed = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut committed = None;
    while killed.elapsed() < Duration::from_secs(10) {
        for &i in &survivors {
            let cmd = Command::CreateTarget {
                iqn: "iqn.2026-11.io.bulwark:after".into(),
                alias: None,
            };
            if let Ok(Ok(_) | Err(Refused::TargetExists(_))) = c.admin(i).write(cmd).await {
                committed = Some(killed.elapsed());
                break;
            }
        }
        if committed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = committed.expect("a change committed after the leader was killed");
    eprintln!(
        "leader killed -> next committed change: {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let new_leader = c.leader(survivors[0]).await;
    assert_ne!(new_leader, leader);

    // More changes while the old leader is down, then restart it from its folder.
    let on = c.nodes[survivors[0]].name.clone();
    commit(&c.admin(survivors[0]), create_volume("while-down", &[&on])).await;
    c.nodes[leader].start();
    let want = c.state(new_leader).await.unwrap();
    wait(
        "the restarted node to catch up",
        Duration::from_secs(20),
        async || c.state(leader).await.filter(|s| *s == want),
    )
    .await;

    // Removed while down: at its next start the node learns it and stops by itself.
    c.nodes[leader].stop();
    let name = c.nodes[leader].name.clone();
    commit(
        &c.admin(new_leader),
        Command::RemoveNode { name, dead: false },
    )
    .await;
    c.wait_voters(new_leader, 2).await;
    c.nodes[leader].start();
    let child = c.nodes[leader].child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "a node removed while down stops at start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.nodes[leader].child = None;
    let log = std::fs::read_to_string(c.nodes[leader].log()).unwrap();
    assert!(log.contains("no longer a member"), "{log}");
    // The remaining two still commit.
    commit(&c.admin(new_leader), create_volume("after-removal", &[])).await;
}

/// Strangers are refused: a wrong secret, a wrong certificate fingerprint, a join with
/// a bad token; the refusal is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_clients_without_the_secret_are_refused() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = Cluster::new(12, 2);
    c.init().await;
    // The node serves while it records the token `cluster init` printed; until then a
    // wrong secret is refused as "unknown token", after as "unknown or revoked token"
    // (checked below), so wait for the record.
    wait(
        "the first token recorded",
        Duration::from_secs(10),
        async || c.state(0).await.filter(|s| !s.tokens.is_empty()),
    )
    .await;
    let good = c.token();
    let addr = c.nodes[0].addresses().control;

    let wrong_secret = Token {
        secret: "0".repeat(32),
        fingerprint: good.fingerprint.clone(),
    };
    let client = Client::new(addr, &wrong_secret, "test").unwrap();
    let err = client
        .call(&Request::State, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Refused { .. }), "{err}");
    assert!(
        err.to_string().contains("wrong cluster credentials"),
        "{err}"
    );

    let wrong_cert = Token {
        secret: good.secret.clone(),
        fingerprint: "0".repeat(64),
    };
    let client = Client::new(addr, &wrong_cert, "test").unwrap();
    let err = client
        .call(&Request::State, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Tls { .. }), "{err}");

    let n = &c.nodes[1];
    let err = cluster::node::join(&n.dir, addr, &wrong_secret, &n.name, n.addresses(), 1 << 30)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(
        !Identity::exists(&n.dir),
        "a refused join writes no identity"
    );
    // The refused peer never became a member.
    assert_eq!(c.state(0).await.unwrap().nodes.len(), 1);

    // Plain TCP garbage does not disturb the node.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
    }
    c.admin(0).state().await.expect("still serving");
    let log = std::fs::read_to_string(c.nodes[0].log()).unwrap();
    // One event per source per minute: the first refusal is logged, the later ones
    // from the same address are counted into the next event.
    assert!(
        log.contains("test (unknown or revoked token)") && log.contains("auth_refused"),
        "{log}"
    );
    assert_eq!(
        log.matches("auth_refused").count(),
        1,
        "refusals from one address are aggregated: {log}"
    );
}

fn raft_store(dir: &Path) -> PathBuf {
    Identity::dir(dir).join("raft.redb")
}

/// Snapshots compact the log; a node that joins afterwards is brought up to date by
/// snapshot; a restarted node keeps its state; a corrupt store is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_and_a_corrupt_store_is_refused() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = Cluster::new(13, 2);
    c.nodes[0].extra = vec!["--snapshot-every".into(), "20".into()];
    c.init().await;
    let admin = c.admin(0);
    for i in 0..60 {
        commit(
            &admin,
            Command::CreateTarget {
                iqn: format!("iqn.2026-11.io.bulwark:t{i}"),
                alias: None,
            },
        )
        .await;
    }
    let status = wait(
        "a snapshot and a purged log",
        Duration::from_secs(10),
        async || {
            admin
                .status()
                .await
                .ok()
                .filter(|s| s.raft.snapshot_index.is_some() && s.raft.purged_index.is_some())
        },
    )
    .await;
    let last = status.raft.last_log_index.unwrap();
    assert!(
        status.raft.log_entries < last,
        "log compacted: {} entries on disk for {} indexes",
        status.raft.log_entries,
        last
    );

    // A node joining now gets the purged part as a snapshot.
    c.join(1).await;
    let want = c.state(0).await.unwrap();
    wait(
        "the new node to receive the snapshot",
        Duration::from_secs(20),
        async || {
            c.state(1)
                .await
                .filter(|s| s.targets.len() == 60 && s.nodes.len() == 2)
        },
    )
    .await;

    // Restart: state recovered from disk.
    c.nodes[0].stop();
    c.nodes[0].start();
    wait(
        "n1 back with its state",
        Duration::from_secs(20),
        async || c.state(0).await.filter(|s| s.targets == want.targets),
    )
    .await;

    // Corrupt one log entry of n2's store (a target name only the log holds).
    commit(
        &c.admin(0),
        Command::CreateTarget {
            iqn: "iqn.2026-11.io.bulwark:needle".into(),
            alias: None,
        },
    )
    .await;
    wait("n2 has the needle", Duration::from_secs(10), async || {
        c.state(1)
            .await
            .filter(|s| s.targets.contains_key("iqn.2026-11.io.bulwark:needle"))
    })
    .await;
    c.nodes[1].stop();
    let path = raft_store(&c.nodes[1].dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = b"bulwark:needle";
    let positions: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert!(!positions.is_empty());
    for p in positions {
        bytes[p + 8] ^= 0x20; // "needle" -> "Needle"
    }
    std::fs::write(&path, &bytes).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&c.nodes[1].dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Either our per-value CRC32C or redb's own page checksums catch it, depending on
    // where the flipped bytes landed; both refuse the file with the same advice.
    assert!(
        stderr.to_lowercase().contains("corrupt") && stderr.contains("rejoin"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&path.display().to_string()),
        "names the file: {stderr}"
    );
}

/// A frozen node (SIGSTOP) is shown offline in under 1 s by default, comes back by
/// itself when it thaws, and both changes reach the event log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_offline_within_a_second_and_returns_by_itself() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let c = Cluster::three_voters(14).await;
    let admin = c.admin(0);
    let online = async |want: bool| {
        let s = admin.status().await.ok()?;
        let p = s.peers.iter().find(|p| p.node == 3)?;
        (p.online == want).then_some(())
    };
    wait("n3 online", Duration::from_secs(10), async || {
        online(true).await
    })
    .await;
    let n3_events = async |kind: &str| {
        let s = admin.status().await.ok()?;
        let n = s
            .events
            .iter()
            .filter(|e| e.kind == kind && e.message.contains("node n3"))
            .count();
        Some(n)
    };
    wait(
        "n1 has reported n3 online",
        Duration::from_secs(10),
        async || n3_events("node_online").await.filter(|n| *n == 1),
    )
    .await;

    let pid =
        rustix::process::Pid::from_raw(c.nodes[2].child.as_ref().unwrap().id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::Stop).unwrap();
    let stopped = Instant::now();
    wait("n3 offline", Duration::from_secs(5), async || {
        online(false).await
    })
    .await;
    let detected = stopped.elapsed();
    eprintln!("node frozen -> shown offline: {} ms", detected.as_millis());
    // Default failure timeout 800 ms; the status poll adds up to ~100 ms.
    assert!(detected < Duration::from_millis(1000), "took {detected:?}");
    // Stay silent a little longer than one monitor round, so the event is due.
    tokio::time::sleep(Duration::from_millis(500)).await;

    rustix::process::kill_process(pid, rustix::process::Signal::Cont).unwrap();
    wait("n3 back online", Duration::from_secs(5), async || {
        online(true).await
    })
    .await;
    wait(
        "the offline and the second online event",
        Duration::from_secs(5),
        async || {
            let off = n3_events("node_offline").await?;
            let on = n3_events("node_online").await?;
            (off == 1 && on == 2).then_some(())
        },
    )
    .await;
}
