//! ALUA paths across nodes and persistent reservations as cluster state: a real 3-node
//! cluster with a volume on all three, initiators on different nodes' portals, a
//! kill -9 of the primary. REPORT TARGET PORT GROUPS, the reservation, the
//! registrations and the unit attentions are checked through every path before,
//! during and after the failover.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::state::{ClusterState, Command};
use initiator::{CommandResult, LoginOptions, Session};

mod common;
use common::*;

const IQN: &str = "iqn.2026-11.io.bulwark:multipath";
const HOST_A: &str = "iqn.2026-11.io.example:host-a";
const HOST_B: &str = "iqn.2026-11.io.example:host-b";
const KEY_A: u64 = 0xAAAA;
const KEY_B: u64 = 0xBBBB;
/// WRITE EXCLUSIVE.
const WRITE_EXCLUSIVE: u8 = 0x1;
const RESERVATION_CONFLICT: u8 = 0x18;

/// A path: a session through one node's portal, and the unit attentions it has seen.
struct Path {
    session: Session,
    unit_attentions: Vec<(u8, u8)>,
}

impl Path {
    async fn open(initiator: &str, portal: SocketAddr) -> Option<Path> {
        let mut opts = LoginOptions::new(initiator, Some(IQN));
        opts.timeout = Duration::from_secs(2);
        let session = Session::login(portal, &opts).await.ok()?;
        Some(Path {
            session,
            unit_attentions: Vec::new(),
        })
    }

    /// Runs `cdb`, recording and retrying unit attentions (as an initiator does);
    /// NOT READY, ASYMMETRIC ACCESS STATE TRANSITION is returned as is.
    async fn run(&mut self, cdb: &[u8], data: Option<&[u8]>, len: u32) -> CommandResult {
        for _ in 0..8 {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                self.session.command(0, cdb, data, len),
            )
            .await
            .expect("a command hung")
            .expect("session failed");
            match sense(&r) {
                Some((6, asc, ascq)) => self.unit_attentions.push((asc, ascq)),
                _ => return r,
            }
        }
        panic!("unit attentions without end: {:?}", self.unit_attentions);
    }

    async fn good(&mut self, what: &str, cdb: &[u8], data: Option<&[u8]>, len: u32) -> Vec<u8> {
        let r = self.run_through_transitions(what, cdb, data, len).await;
        assert_eq!(
            r.status,
            0,
            "{what}: status {:#x} sense {:?}",
            r.status,
            sense(&r)
        );
        r.data
    }

    async fn register(&mut self, key: u64, all_target_ports: bool) {
        let (cdb, p) = prout(0x00, 0, 0, key, if all_target_ports { 0x04 } else { 0 });
        self.good("REGISTER", &cdb, Some(&p), 0).await;
    }

    /// The status of a WRITE(10), retried while the path says it is transitioning or
    /// unavailable (a multipath initiator would use another path meanwhile).
    /// `cdb`'s result, retried for up to 10 s (as a multipath initiator retries) while
    /// the path answers NOT READY, ASYMMETRIC ACCESS STATE TRANSITION or TARGET PORT IN
    /// UNAVAILABLE STATE: a replica that misses its deadline under load leaves the
    /// in-sync set for a moment and its path becomes unavailable until it is back.
    async fn run_through_transitions(
        &mut self,
        what: &str,
        cdb: &[u8],
        data: Option<&[u8]>,
        len: u32,
    ) -> CommandResult {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.run(cdb, data, len).await;
            let not_now = matches!(sense(&r), Some((2, 0x04, 0x0A | 0x0C)));
            if !not_now || Instant::now() > deadline {
                if r.status == 2 {
                    eprintln!("{what}: sense {:x?}", sense(&r));
                }
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn write_status(&mut self) -> u8 {
        let cdb = [0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0];
        self.run_through_transitions("write", &cdb, Some(&[0x5A; 512]), 0)
            .await
            .status
    }

    async fn read_status(&mut self) -> u8 {
        let cdb = [0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0];
        self.run_through_transitions("read", &cdb, None, 512)
            .await
            .status
    }

    /// PERSISTENT RESERVE IN, READ KEYS: (generation, keys).
    async fn keys(&mut self) -> (u32, Vec<u64>) {
        let d = self
            .good("READ KEYS", &[0x5E, 0, 0, 0, 0, 0, 0, 4, 0, 0], None, 1024)
            .await;
        let generation = u32::from_be_bytes(d[0..4].try_into().unwrap());
        let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
        let mut keys: Vec<u64> = d[8..8 + len]
            .chunks(8)
            .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
            .collect();
        keys.sort_unstable();
        (generation, keys)
    }

    /// PERSISTENT RESERVE IN, READ RESERVATION: (key, type) of the reservation.
    async fn reservation(&mut self) -> Option<(u64, u8)> {
        let d = self
            .good(
                "READ RESERVATION",
                &[0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0],
                None,
                64,
            )
            .await;
        (u32::from_be_bytes(d[4..8].try_into().unwrap()) >= 16).then(|| {
            (
                u64::from_be_bytes(d[8..16].try_into().unwrap()),
                d[21] & 0x0F,
            )
        })
    }

    /// REPORT TARGET PORT GROUPS: group → asymmetric access state code, or the sense
    /// key / ASC / ASCQ it failed with.
    async fn port_groups(&mut self) -> Result<BTreeMap<u16, u8>, (u8, u8, u8)> {
        let cdb = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
        let r = self.run(&cdb, None, 1024).await;
        if r.status != 0 {
            return Err(sense(&r).unwrap_or((0, 0, 0)));
        }
        Ok(parse_port_groups(&r.data))
    }
}

fn parse_port_groups(d: &[u8]) -> BTreeMap<u16, u8> {
    let mut out = BTreeMap::new();
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    let mut at = 4;
    while at + 8 <= (4 + len).min(d.len()) {
        let state = d[at] & 0x0F;
        let group = u16::from_be_bytes([d[at + 2], d[at + 3]]);
        let ports = usize::from(d[at + 7]);
        out.insert(group, state);
        at += 8 + 4 * ports;
    }
    out
}

fn sense(r: &CommandResult) -> Option<(u8, u8, u8)> {
    (r.status == 2 && r.sense.len() >= 14).then(|| (r.sense[2] & 0x0F, r.sense[12], r.sense[13]))
}

fn prout(sa: u8, kind: u8, key: u64, sa_key: u64, flags: u8) -> ([u8; 10], [u8; 24]) {
    let cdb = [0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut p = [0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    (cdb, p)
}

const AO: u8 = 0x0;
const ANO: u8 = 0x1;

/// Group ids are node ids.
fn group(st: &ClusterState, name: &str) -> u16 {
    let id = st.nodes.values().find(|n| n.name == name).unwrap().id;
    u16::try_from(id).unwrap()
}

fn name_of(st: &ClusterState, id: u64) -> String {
    st.nodes[&id].name.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_and_port_groups_hold_on_every_path_through_a_failover() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = Cluster::three_voters(40).await;
    let admin = c.admin(0);
    let mut create = create_volume("v", &["n1", "n2", "n3"]);
    if let Command::CreateVolume { size_bytes, .. } = &mut create {
        *size_bytes = 16 << 20;
    }
    commit(&admin, create).await;
    target_with_lun(&admin, IQN, "v").await;
    let portal = |c: &Cluster, name: &str| c.nodes[c.index(name)].addresses().portals[0];
    let st = wait(
        "all three replicas in sync",
        Duration::from_secs(30),
        async || {
            c.state(0)
                .await
                .filter(|s| s.volumes.get("v").is_some_and(|v| v.in_sync.len() == 3))
        },
    )
    .await;
    let primary = name_of(&st, st.volumes["v"].primary);
    let others: Vec<String> = ["n1", "n2", "n3"]
        .iter()
        .map(|s| s.to_string())
        .filter(|n| *n != primary)
        .collect();
    let (q, r) = (others[0].clone(), others[1].clone());
    eprintln!("primary {primary}; non-optimized paths through {q} and {r}");

    // Host A through the primary, host B through another node (forwarded).
    let mut a = wait(
        "a session through the primary",
        Duration::from_secs(20),
        async || {
            let mut p = Path::open(HOST_A, portal(&c, &primary)).await?;
            (p.session.command(0, &[0; 6], None, 0).await.ok()?.status != 0x18).then_some(())?;
            Some(p)
        },
    )
    .await;
    let mut b = wait(
        "a session through a non-primary node",
        Duration::from_secs(20),
        async || {
            let mut p = Path::open(HOST_B, portal(&c, &q)).await?;
            let r = p.run(&[0; 6], None, 0).await;
            (r.status == 0).then_some(p)
        },
    )
    .await;

    // Before: every path reports the same table, the primary's group optimized.
    let before = BTreeMap::from([
        (group(&st, &primary), AO),
        (group(&st, &q), ANO),
        (group(&st, &r), ANO),
    ]);
    assert_eq!(
        a.port_groups().await,
        Ok(before.clone()),
        "RTPG via {primary}"
    );
    assert_eq!(b.port_groups().await, Ok(before), "RTPG via {q}");

    // A registers (for every target port) and reserves through the primary; B registers
    // through the forwarding node.
    a.register(KEY_A, true).await;
    let (cdb, p) = prout(0x01, WRITE_EXCLUSIVE, KEY_A, 0, 0);
    a.good("RESERVE", &cdb, Some(&p), 0).await;
    b.register(KEY_B, false).await;
    let (generation, keys) = b.keys().await;
    assert_eq!(keys, vec![KEY_A, KEY_B]);
    assert_eq!(b.reservation().await, Some((KEY_A, WRITE_EXCLUSIVE)));
    assert_eq!(
        b.write_status().await,
        RESERVATION_CONFLICT,
        "B writes under A's reservation"
    );
    assert_eq!(b.read_status().await, 0, "B reads under WRITE EXCLUSIVE");
    assert_eq!(a.write_status().await, 0, "the holder writes");
    // The reservation is cluster state, committed before the command completed.
    let committed = c.state(0).await.unwrap().volumes["v"].reservations.clone();
    // Saved as JSON: the reservation is WRITE EXCLUSIVE (type 1), held by A's
    // registration.
    let saved: Option<serde_json::Value> = committed
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok());
    assert!(
        saved.as_ref().is_some_and(|v| v["reservation"]["kind"] == 1
            && v["registrations"][v["reservation"]["holder"].as_u64().unwrap_or(99) as usize]
                ["key"]
                == KEY_A),
        "reservation in the cluster state: {committed:?}"
    );
    let uas_before = b.unit_attentions.len();

    // Kill the primary. Through B's path, REPORT TARGET PORT GROUPS answers the new
    // table or "transitioning" meanwhile, nothing else.
    let victim = c.index(&primary);
    c.nodes[victim].kill9();
    let killed = Instant::now();
    let mut transitioning = 0;
    let after = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "no new table within 20 s"
        );
        match b.port_groups().await {
            Ok(t) if t.values().any(|s| *s == AO) && t.get(&group(&st, &primary)) != Some(&AO) => {
                break t;
            }
            Ok(_) => {}
            Err((2, 0x04, 0x0A)) => transitioning += 1,
            Err(other) => panic!("RTPG during the failover failed with {other:x?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let st2 = c.state(c.index(&q)).await.unwrap();
    let new_primary = name_of(&st2, st2.volumes["v"].primary);
    assert_ne!(new_primary, primary);
    eprintln!(
        "new primary {new_primary} after {} ms; {transitioning} RTPG answer(s) said transitioning",
        killed.elapsed().as_millis()
    );
    assert_eq!(after.get(&group(&st, &new_primary)), Some(&AO));
    assert_ne!(after.get(&group(&st, &primary)), Some(&AO));

    // B saw that the access state changed, and no other unit attention: no reset, no
    // preemption, no released reservation.
    let seen: Vec<(u8, u8)> = b.unit_attentions[uas_before..].to_vec();
    assert!(
        seen.contains(&(0x2A, 0x06)),
        "ASYMMETRIC ACCESS STATE CHANGED on B: {seen:x?}"
    );
    assert!(
        seen.iter().all(|ua| *ua == (0x2A, 0x06)),
        "B saw only ASYMMETRIC ACCESS STATE CHANGED: {seen:x?}"
    );
    // The registrations, the reservation and the generation are those of before.
    assert_eq!(b.keys().await, (generation, vec![KEY_A, KEY_B]));
    assert_eq!(b.reservation().await, Some((KEY_A, WRITE_EXCLUSIVE)));
    assert_eq!(
        b.write_status().await,
        RESERVATION_CONFLICT,
        "B after the failover"
    );

    // A reconnects through the new primary's portal: its registration covers every
    // target port, so it still holds the reservation there; releasing it lets B write.
    let mut a2 = wait(
        "host A through the new primary",
        Duration::from_secs(20),
        async || Path::open(HOST_A, portal(&c, &new_primary)).await,
    )
    .await;
    assert_eq!(
        a2.write_status().await,
        0,
        "the holder writes through the new primary"
    );
    assert!(
        a2.unit_attentions.iter().all(|ua| *ua == (0x2A, 0x06)),
        "A through the new primary: {:x?}",
        a2.unit_attentions
    );
    let (cdb, p) = prout(0x02, WRITE_EXCLUSIVE, KEY_A, 0, 0);
    a2.good("RELEASE", &cdb, Some(&p), 0).await;
    assert_eq!(b.reservation().await, None);
    assert_eq!(b.write_status().await, 0, "B writes once A released");

    // Explicit ALUA: B asks, with SET TARGET PORT GROUPS, for the other surviving node's
    // group to be active/optimized; the cluster moves the volume there.
    let target = if new_primary == q {
        r.clone()
    } else {
        q.clone()
    };
    let mut list = vec![0u8; 8];
    list[4] = AO;
    list[6..8].copy_from_slice(&group(&st, &target).to_be_bytes());
    let cdb = [0xA4, 0x0A, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0];
    b.good("SET TARGET PORT GROUPS", &cdb, Some(&list), 0).await;
    let moved = Instant::now();
    loop {
        assert!(
            moved.elapsed() < Duration::from_secs(15),
            "the move asked by STPG did not happen"
        );
        if let Ok(t) = b.port_groups().await {
            if t.get(&group(&st, &target)) == Some(&AO) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "SET TARGET PORT GROUPS moved the volume to {target} in {} ms",
        moved.elapsed().as_millis()
    );
    assert_eq!(b.write_status().await, 0, "B writes after the move");
    assert_eq!(
        b.keys().await.1,
        vec![KEY_A, KEY_B],
        "registrations after the move"
    );

    // A target whose other paths are standby: B's group says so, and B's writes are
    // refused with the standby sense until the paths are non-optimized again. B's path
    // must go through the surviving node that is not the primary: through q unless the
    // move above made q the primary (the failover may have picked r), else through r.
    let standby_node = if target == q { r.clone() } else { q.clone() };
    let mut through_r = if standby_node == q {
        None
    } else {
        Some(
            wait(
                "host B through the node that is not the primary",
                Duration::from_secs(20),
                async || Path::open(HOST_B, portal(&c, &standby_node)).await,
            )
            .await,
        )
    };
    let path: &mut Path = match through_r.as_mut() {
        Some(p) => p,
        None => &mut b,
    };
    let b_group = group(&st, &standby_node);
    let admin = c.admin(c.index(&q));
    for (standby, want) in [(true, 0x2u8), (false, ANO)] {
        commit(
            &admin,
            Command::SetTargetPaths {
                iqn: IQN.into(),
                standby,
            },
        )
        .await;
        wait(
            "the paths' new state",
            Duration::from_secs(10),
            async || (path.port_groups().await.ok()?.get(&b_group) == Some(&want)).then_some(()),
        )
        .await;
        let r = path
            .run(&[0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0], Some(&[0x5A; 512]), 0)
            .await;
        if standby {
            assert_eq!(
                sense(&r),
                Some((2, 0x04, 0x0B)),
                "write through a standby port"
            );
        } else {
            assert_eq!(
                r.status,
                0,
                "write through a non-optimized port: {:x?}",
                sense(&r)
            );
        }
    }

    // APTPL: B registers again with APTPL set; the whole cluster loses power (kill -9
    // of every node) and comes back: the registrations are there.
    drop(through_r);
    let (cdb, p) = prout(0x06, 0, 0, KEY_B, 0x01);
    b.good("REGISTER AND IGNORE EXISTING KEY, APTPL", &cdb, Some(&p), 0)
        .await;
    drop((a, a2, b));
    for i in 0..3 {
        c.nodes[i].kill9();
    }
    for i in 0..3 {
        c.nodes[i].start();
    }
    let mut b3 = wait(
        "a path after the cluster restart",
        Duration::from_secs(60),
        async || {
            let mut p = Path::open(HOST_B, portal(&c, &q)).await?;
            for _ in 0..5 {
                if p.session.command(0, &[0; 6], None, 0).await.ok()?.status == 0 {
                    return Some(p);
                }
            }
            None
        },
    )
    .await;
    assert_eq!(
        b3.keys().await.1,
        vec![KEY_A, KEY_B],
        "registrations after a full cluster restart"
    );
}
