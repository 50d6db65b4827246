//! A cluster that trusts no one on the network (issue 15): a real 3-node cluster
//! serving a replicated volume under the integrity checker's writes, while strangers,
//! replayed captures, a node of another cluster, a member forging what only the primary
//! or a replica may say, token holders of every role and a removed node try their
//! luck. Each is refused; no write fails, no failover happens, nothing is lost.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster::auth::{ApiToken, Role};
use cluster::rpc::{Client, Request, Response};
use cluster::state::{ChapAccount, Command};
use cluster::{Identity, Token};
use initiator::checker::Checker;
use replication::{Message, Payload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::load::*;
use common::*;

const CHAP_SECRET: &str = "hostile-test-chap-secret-0123";

/// Makes a token of `role` through `admin`; the token string.
async fn make_token(admin: &cluster::AdminClient, fingerprint: &str, role: Role) -> Token {
    let secret = cluster::identity::random_hex16();
    let record = ApiToken {
        id: cluster::identity::random_hex16()[..8].to_string(),
        role,
        secret_sha256: cluster::auth::secret_digest(&secret),
        created_unix_ms: cluster::auth::now_unix_ms(),
        expires_unix_ms: (role == Role::Join).then(|| cluster::auth::now_unix_ms() + 3_600_000),
        single_use: role == Role::Join,
        used: false,
        revoked: false,
        comment: format!("security test {role}"),
    };
    commit(admin, Command::CreateToken { token: record }).await;
    Token {
        secret,
        fingerprint: fingerprint.to_string(),
    }
}

/// True when the peer closes `s` (or resets it) within 6 s without sending anything
/// that looks like a frame.
async fn closed_by_peer(s: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A replication link to `addr` opened with the certificate of the node whose data
/// folder is `dir` (a real member's, or another cluster's).
async fn link_as(
    dir: &std::path::Path,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tls = Identity::load(dir).unwrap().tls().unwrap();
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"BWR2T").await?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    let name = rustls::pki_types::ServerName::try_from("bulwark-cluster").unwrap();
    tokio_rustls::TlsConnector::from(tls.client)
        .connect(name, s)
        .await
}

/// One volume frame as the replication link carries it.
fn volume_frame(volume: &str, msg: &Message) -> Vec<u8> {
    let (h, data) = replication::net::encode(volume, msg);
    let mut f = h.to_vec();
    if let Some(d) = data {
        f.extend_from_slice(&d);
    }
    f
}

/// One forwarding frame: kind 100 (request) or 101 (reply).
fn forward_frame(kind: u8, target: &str, id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&((2 + target.len() + 1 + 8 + body.len()) as u32).to_be_bytes());
    f.extend_from_slice(&(target.len() as u16).to_be_bytes());
    f.extend_from_slice(target.as_bytes());
    f.push(kind);
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn https() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// What a forging member sends while the load runs; the volume's primary is node
/// `primary` (slot), its replica `replica`, and `forger` a member holding neither.
async fn forge_as_member(c: &Cluster, forger: usize, primary: usize, replica: usize) {
    let st = c.state(0).await.unwrap();
    let v = &st.volumes["v"];
    let epoch = v.epoch;
    let dir = &c.nodes[forger].dir;

    // To the replica: a Seal at an epoch nobody committed (persisted, it would lock
    // every later primary out), a write past the volume's end, a write at the current
    // epoch from a node that is not the primary.
    let mut to_replica = link_as(dir, c.nodes[replica].addresses().replication)
        .await
        .expect("a member's certificate opens a link");
    for msg in [
        Message::Seal {
            epoch: replication::Epoch(u64::MAX),
            next_seq: replication::Seq(1),
        },
        Message::Write {
            epoch: replication::Epoch(epoch),
            seq: replication::Seq(1),
            offset: v.size_bytes + (1 << 30),
            payload: Payload::Data(Bytes::from(vec![0xEE; 4096])),
            committed: replication::Seq(0),
        },
        Message::Write {
            epoch: replication::Epoch(epoch),
            seq: replication::Seq(1),
            offset: 0,
            payload: Payload::Data(Bytes::from(vec![0xEE; 4096])),
            committed: replication::Seq(0),
        },
        // A deallocation of the whole volume, from a node that is not the primary.
        Message::Write {
            epoch: replication::Epoch(epoch),
            seq: replication::Seq(1),
            offset: 0,
            payload: Payload::Deallocate(v.size_bytes),
            committed: replication::Seq(0),
        },
    ] {
        to_replica
            .write_all(&volume_frame("v", &msg))
            .await
            .unwrap();
    }
    // To the primary: a Fenced claiming an epoch nobody committed (it would make the
    // primary stand down), forged acknowledgements and verify results, a forwarded
    // command for a target this node does not serve, and answers to requests never
    // sent to it.
    let mut to_primary = link_as(dir, c.nodes[primary].addresses().replication)
        .await
        .expect("a member's certificate opens a link");
    for msg in [
        Message::Fenced {
            epoch: replication::Epoch(u64::MAX),
        },
        Message::Ack {
            epoch: replication::Epoch(epoch),
            seq: replication::Seq(1_000_000),
        },
        Message::VerifyResult {
            epoch: replication::Epoch(epoch),
            region: 0,
            crc: 0,
        },
    ] {
        to_primary
            .write_all(&volume_frame("v", &msg))
            .await
            .unwrap();
    }
    to_primary
        .write_all(&forward_frame(100, IQN, 1, b"\x00garbage"))
        .await
        .unwrap();
    for id in 1..64 {
        to_primary
            .write_all(&forward_frame(101, IQN, id, b"\x00forged answer"))
            .await
            .unwrap();
    }
    to_primary.flush().await.unwrap();
    to_replica.flush().await.unwrap();
    // Frames naming an epoch ahead of the state are held up to 2 s before refusal.
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// Strangers on the replication port: an old-style hello (a capture replayed), a TLS
/// client with no certificate, and a node of another cluster.
async fn strangers_on_the_replication_port(c: &Cluster, other_cluster: &std::path::Path) {
    let addr = c.nodes[2].addresses().replication;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut replay = b"BWRP".to_vec();
    replay.extend_from_slice(&2u64.to_be_bytes());
    replay.extend_from_slice(&[0x5A; 32]);
    replay.extend_from_slice(&volume_frame(
        "v",
        &Message::Seal {
            epoch: replication::Epoch(u64::MAX),
            next_seq: replication::Seq(1),
        },
    ));
    s.write_all(&replay).await.unwrap();
    assert!(
        closed_by_peer(&mut s).await,
        "a replayed old-style hello is refused"
    );

    let token_tls = cluster::identity::client_config(&c.token().fingerprint).unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"BWR2T").await.unwrap();
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("bulwark-cluster").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(token_tls)
        .connect(name, s)
        .await;
    match handshake {
        Err(_) => {}
        Ok(mut tls) => assert!(
            closed_by_peer(&mut tls).await,
            "a client without a node certificate is refused"
        ),
    }

    match link_as(other_cluster, addr).await {
        Err(_) => {}
        Ok(mut tls) => assert!(
            closed_by_peer(&mut tls).await,
            "a node of another cluster is refused"
        ),
    }
}

/// An InitiatorName with a newline (once a way to inject a registration into the
/// reservations every new primary loads) is refused at login, on every node's portal.
async fn initiator_names_with_a_newline(c: &Cluster) {
    let evil = "iqn.2026-11.io.example:evil\nreg 00000000000000ff 1 000000000000 1 1 p iqn.x";
    for n in &c.nodes {
        let mut opts = initiator::LoginOptions::new(evil, Some(IQN));
        opts.timeout = Duration::from_secs(5);
        match initiator::Session::login(n.addresses().portals[0], &opts).await {
            Err(initiator::InitiatorError::LoginRefused { class: 2, .. }) => {}
            other => panic!(
                "{}: a name with a newline was not refused as an initiator error: {:?}",
                n.name,
                other.map(|_| "logged in")
            ),
        }
    }
}

/// Token holders: each role does only what it may, a token of another cluster and a
/// made-up secret are refused, and a join token joins one node only.
async fn token_holders(c: &Cluster, spare: &Node, spare2: &Node) {
    let admin = c.admin(0);
    let fp = c.token().fingerprint;
    let addr = c.nodes[0].addresses().control;
    let viewer = make_token(&admin, &fp, Role::Viewer).await;
    let metrics = make_token(&admin, &fp, Role::Metrics).await;
    let join = make_token(&admin, &fp, Role::Join).await;

    // A viewer reads, with secrets redacted, and changes nothing.
    let as_viewer = cluster::AdminClient::new(addr, &viewer).unwrap();
    let st = as_viewer.state().await.unwrap();
    let json = serde_json::to_string(&st).unwrap();
    assert!(!json.contains(CHAP_SECRET), "a viewer sees no CHAP secret");
    assert!(
        st.chap.contains_key("hostile"),
        "a viewer sees the accounts"
    );
    let err = as_viewer
        .write(create_volume("by-viewer", &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("viewer"), "{err}");
    assert!(as_viewer.state_with_secrets().await.is_err());
    // Nor does an admin get secrets unless it asks; a token never drives Raft.
    let json = serde_json::to_string(&admin.state().await.unwrap()).unwrap();
    assert!(!json.contains(CHAP_SECRET));
    let raw = Client::new(addr, &c.token(), "test").unwrap();
    for req in [
        Request::RenewLeases {
            node: 1,
            volumes: vec![("v".into(), 1)],
        },
        Request::Write(Command::Promote {
            volumes: vec![("v".into(), 1)],
            node: 1,
            cause: None,
        }),
        // Even a batch of commands an admin may make alone: batches are how nodes
        // forward to the leader, never a token's way in.
        Request::Writes(vec![create_volume("by-batch", &[])]),
    ] {
        match raw.call(&req, Duration::from_secs(5)).await.unwrap() {
            Response::Error(e) => assert!(e.contains("only from cluster nodes"), "{e}"),
            other => panic!("a token drove {req:?}: {other:?}"),
        }
    }
    // A metrics token reads nothing on the control port.
    let as_metrics = cluster::AdminClient::new(addr, &metrics).unwrap();
    assert!(as_metrics.state().await.is_err());

    // HTTPS: no CHAP secret in the status API; a viewer cannot act; a metrics token
    // reads /metrics only.
    let base = format!("https://{}:3263", c.nodes[0].ip);
    let web = https();
    let body = web
        .get(format!("{base}/api/status"))
        .bearer_auth(c.token().to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("hostile"), "the status API lists the account");
    assert!(
        !body.contains(CHAP_SECRET),
        "the status API carries no CHAP secret"
    );
    let r = web
        .post(format!("{base}/api/volumes/v/verify"))
        .bearer_auth(viewer.to_string())
        .header("X-Bulwark-Console", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a viewer cannot act");
    let r = web
        .get(format!("{base}/api/status"))
        .bearer_auth(metrics.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = web
        .get(format!("{base}/metrics"))
        .bearer_auth(metrics.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("replication_refused_frames"));

    // Another cluster's token, and a made-up secret with ours.
    let other_ca = cluster::identity::ClusterCert::generate().unwrap();
    let foreign = Token {
        secret: c.token().secret,
        fingerprint: other_ca.fingerprint().unwrap(),
    };
    assert!(cluster::AdminClient::new(addr, &foreign)
        .unwrap()
        .state()
        .await
        .is_err());
    let made_up = Token {
        secret: cluster::identity::random_hex16(),
        fingerprint: fp.clone(),
    };
    assert!(cluster::AdminClient::new(addr, &made_up)
        .unwrap()
        .state()
        .await
        .is_err());

    // A join token joins one node; the second join with it is refused.
    cluster::node::join(
        &spare.dir,
        addr,
        &join,
        &spare.name,
        spare.addresses(),
        1 << 30,
    )
    .await
    .expect("a join token joins a node");
    let err = cluster::node::join(
        &spare2.dir,
        addr,
        &join,
        &spare2.name,
        spare2.addresses(),
        1 << 30,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("used"), "{err}");
    commit(
        &admin,
        Command::RemoveNode {
            name: spare.name.clone(),
            dead: false,
        },
    )
    .await;
}

/// After an attack: volume "v" is still at `(epoch, primary)` (no primary lost its
/// lease or stood down), both replicas in sync, every acknowledged write readable.
async fn undisturbed(c: &Cluster, (epoch, primary): (u64, u64), checker: &Checker) {
    let after = c
        .admin(0)
        .state()
        .await
        .expect("the control plane still answers");
    let v = &after.volumes["v"];
    assert_eq!(
        (v.epoch, v.primary),
        (epoch, primary),
        "no failover: no primary lost its lease or stood down"
    );
    assert_eq!(v.in_sync.len(), 2, "the replica stayed in sync");
    verify_all(c, checker, &[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_while_the_cluster_serves() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = replicated_volume(31, 16 << 20).await;
    let other = tempfile::tempdir().unwrap();
    cluster::node::init(
        other.path(),
        "stranger",
        c.nodes[0].addresses(), // never started; only its certificate is used
    )
    .unwrap();
    let spares = Cluster::new(31, 5);
    let admin = c.admin(0);
    commit(
        &admin,
        Command::AddChap {
            account: ChapAccount {
                user: "hostile".into(),
                secret: CHAP_SECRET.into(),
                mutual: None,
            },
        },
    )
    .await;
    let before = admin.state().await.unwrap();
    let (epoch, primary) = (before.volumes["v"].epoch, before.volumes["v"].primary);
    let primary_slot = c.index(&before.nodes[&primary].name);
    let replica_slot = c.index(
        &before.nodes[&before.volumes["v"]
            .replicas
            .iter()
            .copied()
            .find(|n| *n != primary)
            .unwrap()]
            .name,
    );
    let forger = (0..3)
        .find(|i| *i != primary_slot && *i != replica_slot)
        .unwrap();

    let mut checker = Checker::new(BLOCK as usize);
    let all = [0usize, 1, 2];
    let until = Instant::now() + Duration::from_secs(20);
    let load = write_load_counting(&c, &mut checker, until, &all);
    let attacks = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        strangers_on_the_replication_port(&c, other.path()).await;
        forge_as_member(&c, forger, primary_slot, replica_slot).await;
        initiator_names_with_a_newline(&c).await;
        token_holders(&c, &spares.nodes[3], &spares.nodes[4]).await;
    };
    let ((longest, failed, _), ()) = tokio::join!(load, attacks);
    eprintln!(
        "{} writes acknowledged under attack, longest gap {longest:?}, {failed} failed",
        checker.acks()
    );
    assert_eq!(failed, 0, "no write failed");
    assert!(checker.acks() > 100, "writes flowed throughout");
    undisturbed(&c, (epoch, primary), &checker).await;
    let replica_log = std::fs::read_to_string(c.nodes[replica_slot].log()).unwrap();
    assert!(
        replica_log.contains("refused a replication frame"),
        "the replica logged the refusals"
    );
    assert!(replica_log.contains("refused a replication connection"));

    // Every file in a running node's data folder is its own.
    let mut todo = vec![c.nodes[primary_slot].dir.clone()];
    let mut files = 0;
    while let Some(p) = todo.pop() {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", p.display());
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{}", p.display());
            files += 1;
        }
    }
    assert!(
        files >= 4,
        "the data folder holds the node's files ({files})"
    );

    // A node stops for good. Heartbeats forged for it with an older incarnation (the
    // node's own key, as a capture would carry) do not keep it online, and once it is
    // removed its certificate opens nothing.
    let dead = forger;
    c.nodes[dead].kill9();
    let identity = Identity::load(&c.nodes[dead].dir).unwrap();
    let key = cluster::heartbeat::key(&identity.node_secret());
    let sock = tokio::net::UdpSocket::bind(SocketAddr::new(c.nodes[dead].ip, 0))
        .await
        .unwrap();
    let alive: Vec<usize> = (0..3).filter(|i| *i != dead).collect();
    let forge_until = Instant::now() + Duration::from_secs(3);
    let mut seq = 1_000_000;
    while Instant::now() < forge_until {
        seq += 1;
        let hb = cluster::heartbeat::Heartbeat {
            ring: 0,
            node: identity.node_id,
            incarnation: 1,
            seq,
        };
        for &i in &alive {
            let _ = sock
                .send_to(&hb.encode(&key), c.nodes[i].addresses().control)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = c.admin(alive[0]).status().await.unwrap();
    let seen = status
        .peers
        .iter()
        .find(|p| p.node == identity.node_id)
        .unwrap();
    assert!(!seen.online, "forged heartbeats kept a dead node online");

    let name = c.nodes[dead].name.clone();
    wait(
        "the dead node's removal",
        Duration::from_secs(20),
        async || {
            c.admin(alive[0])
                .write(Command::RemoveNode {
                    name: name.clone(),
                    dead: false,
                })
                .await
                .ok()
                .and_then(|r| r.ok())
        },
    )
    .await;
    let as_removed = Client::for_node(
        c.nodes[alive[0]].addresses().control,
        &identity.tls().unwrap(),
        "removed",
    );
    let err = as_removed
        .call(&Request::State, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("removed"), "{err}");
    let replica_addr = c.nodes[replica_slot].addresses().replication;
    match link_as(&c.nodes[dead].dir, replica_addr).await {
        Err(_) => {}
        Ok(mut tls) => assert!(
            closed_by_peer(&mut tls).await,
            "a removed node's link is refused"
        ),
    }
    drop(spares);
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Opens `count` connections to `addr` from the addresses in `sources` (in turn), each
/// sending `opening` (a partial TLS record or iSCSI header: a slow login) and then
/// nothing until `until`. Returns how many connections the server accepted at TCP.
async fn slow_connections(
    addr: SocketAddr,
    sources: &[std::net::IpAddr],
    count: usize,
    opening: &'static [u8],
    until: Instant,
) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let source = sources[i % sources.len()];
        tasks.spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().ok()?;
            socket.bind(SocketAddr::new(source, 0)).ok()?;
            let mut s = tokio::time::timeout(Duration::from_secs(2), socket.connect(addr))
                .await
                .ok()?
                .ok()?;
            let _ = s.write_all(opening).await;
            let mut buf = [0u8; 256];
            // Hold the connection (reading whatever comes) until the flood ends or the
            // server closes it.
            let _ = tokio::time::timeout_at(until.into(), async {
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            Some(())
        });
    }
    let mut opened = 0;
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(())) = r {
            opened += 1;
        }
    }
    opened
}

/// Thousands of connections and slow logins against every listener of every node
/// (iSCSI, control, replication, HTTPS), a 10 000-connection burst and garbage
/// heartbeats, while the integrity checker writes: no write fails, no primary loses
/// its lease, and the nodes' memory stays bounded. Loopback only; about 40 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_changes_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let c = replicated_volume(32, 16 << 20).await;
    let admin = c.admin(0);
    let before = admin.state().await.unwrap();
    let (epoch, primary) = (before.volumes["v"].epoch, before.volumes["v"].primary);
    let pids: Vec<u32> = c
        .nodes
        .iter()
        .map(|n| n.child.as_ref().unwrap().id())
        .collect();
    let rss_before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();

    let mut checker = Checker::new(BLOCK as usize);
    let all = [0usize, 1, 2];
    let load_until = Instant::now() + Duration::from_secs(30);
    let load = write_load_counting(&c, &mut checker, load_until, &all);
    // Strangers on 32 addresses of their own (127.0.33.x), none a member's.
    let sources: Vec<std::net::IpAddr> = (1..=32u8)
        .map(|i| std::net::IpAddr::from([127, 0, 33, i]))
        .collect();
    let flood = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let hold = Instant::now() + Duration::from_secs(12);
        const PER_LISTENER: usize = 300;
        const TLS_HELLO_PART: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        const ISCSI_BHS_PART: &[u8] = b"\x43\x87\x00\x00\x00\x00";
        let mut opened = 0;
        let mut floods = Vec::new();
        for n in &c.nodes {
            let a = n.addresses();
            floods.push((a.portals[0], ISCSI_BHS_PART));
            floods.push((a.control, TLS_HELLO_PART));
            floods.push((a.replication, b"BWR2T".as_slice()));
            floods.push((SocketAddr::new(n.ip, 3263), TLS_HELLO_PART));
        }
        let results =
            futures_util::future::join_all(floods.iter().map(|(addr, opening)| {
                slow_connections(*addr, &sources, PER_LISTENER, opening, hold)
            }))
            .await;
        opened += results.iter().sum::<usize>();
        // A burst: 10 000 connections opened and closed at once-ish, 200 at a time,
        // on the primary's control port.
        let burst_to = c.nodes[c.index(&before.nodes[&primary].name)]
            .addresses()
            .control;
        let burst_started = Instant::now();
        let mut burst = 0usize;
        for round in 0..50 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..200 {
                let source = sources[(round * 200 + i) % sources.len()];
                tasks.spawn(async move {
                    let socket = tokio::net::TcpSocket::new_v4().ok()?;
                    socket.bind(SocketAddr::new(source, 0)).ok()?;
                    tokio::time::timeout(Duration::from_secs(2), socket.connect(burst_to))
                        .await
                        .ok()?
                        .ok()
                });
            }
            while let Some(r) = tasks.join_next().await {
                burst += usize::from(matches!(r, Ok(Some(_))));
            }
        }
        // Garbage and forged-looking heartbeats.
        let udp = tokio::net::UdpSocket::bind("127.0.33.1:0").await.unwrap();
        for i in 0..10_000u32 {
            let n = &c.nodes[(i % 3) as usize];
            let _ = udp.send_to(&[0x42; 70], n.addresses().control).await;
        }
        eprintln!(
            "flood: {} slow connections held against {} listeners, {burst} of 10000 burst connections in {:?}",
            opened,
            floods.len(),
            burst_started.elapsed()
        );
        assert!(
            opened >= 1000,
            "the flood opened thousands of connections ({opened})"
        );
    };
    let ((longest, failed, logouts), ()) = tokio::join!(load, flood);
    let rss_after: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    eprintln!(
        "under the flood: {} writes acknowledged, longest gap {longest:?}, {failed} failed, {logouts} logouts",
        checker.acks()
    );
    for (i, (b, a)) in rss_before.iter().zip(&rss_after).enumerate() {
        eprintln!(
            "node {}: resident memory {} MiB before, {} MiB after the flood (+{} MiB)",
            c.nodes[i].name,
            b / 1024,
            a / 1024,
            a.saturating_sub(*b) / 1024
        );
        assert!(
            a.saturating_sub(*b) < 256 * 1024,
            "node {} grew by {} MiB",
            c.nodes[i].name,
            a.saturating_sub(*b) / 1024
        );
    }
    assert_eq!(failed, 0, "no write failed");
    undisturbed(&c, (epoch, primary), &checker).await;
}
