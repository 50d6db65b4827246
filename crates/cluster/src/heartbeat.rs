//! Failure detection: every node sends a small authenticated UDP heartbeat to every
//! other node on each network they share (like Corosync's redundant rings), and marks a
//! peer offline once nothing has arrived on any network for the failure timeout.
//!
//! Heartbeats are separate from Raft's: Raft only tells followers about the leader,
//! while every node needs to know about every other, per network. A heartbeat is
//! `"BWHB" | version | ring | node id | incarnation | sequence | HMAC-SHA256` with the
//! cluster secret as key, so a stranger cannot make a dead node look alive; the
//! sequence (per incarnation) stops replays. Time is measured on the monotonic clock,
//! so wall-clock jumps change nothing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::hmac;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::debug;

use crate::state::{ClusterState, NodeId};
use crate::status::{EventLog, PeerLiveness};

const MAGIC: &[u8; 4] = b"BWHB";
const VERSION: u8 = 1;
const BODY: usize = 4 + 1 + 1 + 8 + 8 + 8;
const PACKET: usize = BODY + 32;

/// A decoded, authenticated heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// Which of the sender's networks it was sent on.
    pub ring: u8,
    /// Sender.
    pub node: NodeId,
    /// Random per process start of the sender.
    pub incarnation: u64,
    /// Increases with every heartbeat of one incarnation.
    pub seq: u64,
}

impl Heartbeat {
    /// Encodes and signs.
    pub fn encode(&self, key: &hmac::Key) -> [u8; PACKET] {
        let mut p = [0u8; PACKET];
        p[..4].copy_from_slice(MAGIC);
        p[4] = VERSION;
        p[5] = self.ring;
        p[6..14].copy_from_slice(&self.node.to_be_bytes());
        p[14..22].copy_from_slice(&self.incarnation.to_be_bytes());
        p[22..30].copy_from_slice(&self.seq.to_be_bytes());
        let tag = hmac::sign(key, &p[..BODY]);
        p[BODY..].copy_from_slice(tag.as_ref());
        p
    }

    /// Decodes and verifies; `None` for anything not signed with `key`.
    pub fn decode(p: &[u8], key: &hmac::Key) -> Option<Heartbeat> {
        if p.len() != PACKET || &p[..4] != MAGIC || p[4] != VERSION {
            return None;
        }
        hmac::verify(key, &p[..BODY], &p[BODY..]).ok()?;
        let u64_at = |i: usize| p.get(i..i + 8)?.try_into().ok().map(u64::from_be_bytes);
        Some(Heartbeat {
            ring: p[5],
            node: u64_at(6)?,
            incarnation: u64_at(14)?,
            seq: u64_at(22)?,
        })
    }
}

/// The HMAC key derived from the cluster secret.
pub fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(
        hmac::HMAC_SHA256,
        format!("bulwark-heartbeat:{secret}").as_bytes(),
    )
}

#[derive(Clone, Copy)]
struct Seen {
    at: Instant,
    incarnation: u64,
    seq: u64,
}

/// When each peer was last heard from, per network.
#[derive(Default)]
pub struct Liveness {
    seen: Mutex<HashMap<(NodeId, u8), Seen>>,
}

impl Liveness {
    /// Records a verified heartbeat; replays (same incarnation, old sequence) are ignored.
    pub fn record(&self, hb: &Heartbeat, now: Instant) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let e = seen.entry((hb.node, hb.ring)).or_insert(Seen {
            at: now,
            incarnation: hb.incarnation,
            seq: hb.seq,
        });
        if e.incarnation == hb.incarnation && hb.seq < e.seq {
            return;
        }
        *e = Seen {
            at: now,
            incarnation: hb.incarnation,
            seq: hb.seq,
        };
    }

    /// How `node` with `rings` networks looks at `now`.
    pub fn peer(
        &self,
        node: NodeId,
        rings: usize,
        timeout: Duration,
        now: Instant,
    ) -> PeerLiveness {
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let mut last: Option<Instant> = None;
        let networks: Vec<bool> = (0..rings)
            .map(|r| match seen.get(&(node, r as u8)) {
                Some(s) => {
                    last = Some(last.map_or(s.at, |l| l.max(s.at)));
                    now.saturating_duration_since(s.at) < timeout
                }
                None => false,
            })
            .collect();
        PeerLiveness {
            node,
            online: networks.iter().any(|u| *u),
            networks,
            last_heard_ms: last.map(|l| now.saturating_duration_since(l).as_millis() as u64),
        }
    }
}

/// Runs failure detection for node `me` until the task is dropped: senders and
/// receivers on each of this node's networks, and a monitor that turns changes into
/// events.
pub async fn run(
    me: NodeId,
    secret: String,
    my_networks: Vec<IpAddr>,
    port: u16,
    state: watch::Receiver<Arc<ClusterState>>,
    liveness: Arc<Liveness>,
    events: Arc<EventLog>,
) {
    let key = Arc::new(key(&secret));
    let mut sockets = Vec::new();
    for (ring, ip) in my_networks.iter().enumerate() {
        match UdpSocket::bind(SocketAddr::new(*ip, port)).await {
            Ok(s) => sockets.push((ring as u8, Arc::new(s))),
            Err(e) => events.push(
                "network_down",
                format!("cannot send heartbeats on network {ring} ({ip}:{port}/udp): {e}"),
            ),
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (_, sock) in &sockets {
        let (sock, key, liveness) = (sock.clone(), key.clone(), liveness.clone());
        tasks.spawn(async move {
            let mut buf = [0u8; 128];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                match Heartbeat::decode(&buf[..n], &key) {
                    Some(hb) if hb.node != me => liveness.record(&hb, Instant::now()),
                    Some(_) => {}
                    None => debug!(%from, "dropped a heartbeat that is not signed with the cluster secret"),
                }
            }
        });
    }
    let incarnation: u64 = rand::random();
    let mut seq = 0u64;
    let mut previous: HashMap<NodeId, PeerLiveness> = HashMap::new();
    let mut last_round = Instant::now();
    loop {
        let st = state.borrow().clone();
        let interval = Duration::from_millis(st.settings.heartbeat_interval_ms.max(10));
        let timeout = Duration::from_millis(st.settings.failure_timeout_ms);
        seq += 1;
        for peer in st.nodes.values().filter(|n| n.id != me) {
            let peer_nets = peer.addresses.networks();
            for (ring, sock) in &sockets {
                let Some(ip) = peer_nets.get(usize::from(*ring)) else {
                    continue;
                };
                let hb = Heartbeat {
                    ring: *ring,
                    node: me,
                    incarnation,
                    seq,
                };
                let to = SocketAddr::new(*ip, peer.addresses.control.port());
                if let Err(e) = sock.try_send_to(&hb.encode(&key), to) {
                    debug!(%to, error = %e, "heartbeat not sent");
                }
            }
        }
        // Monitor: report changes. If this loop itself was stalled for a whole timeout
        // (the process was stopped, the machine swapped), silence from peers says
        // nothing about them: take a new baseline instead of reporting.
        let now = Instant::now();
        let stalled = now.duration_since(last_round) >= timeout;
        last_round = now;
        for peer in st.nodes.values().filter(|n| n.id != me && !stalled) {
            let nets = peer.addresses.networks();
            let cur = liveness.peer(peer.id, nets.len(), timeout, now);
            match previous.get(&peer.id) {
                Some(prev) => report_changes(&events, &peer.name, &nets, prev, &cur, timeout),
                // First sight of a peer: only "online" is news; a peer never heard is
                // shown offline by `bulwark status` without an event.
                None if cur.online => {
                    report_changes(&events, &peer.name, &nets, &offline(&cur), &cur, timeout)
                }
                _ => {}
            }
            previous.insert(peer.id, cur);
        }
        previous.retain(|id, _| st.nodes.contains_key(id));
        tokio::time::sleep(interval).await;
    }
}

fn offline(p: &PeerLiveness) -> PeerLiveness {
    PeerLiveness {
        online: false,
        networks: vec![false; p.networks.len()],
        ..p.clone()
    }
}

fn report_changes(
    events: &EventLog,
    name: &str,
    nets: &[IpAddr],
    prev: &PeerLiveness,
    cur: &PeerLiveness,
    timeout: Duration,
) {
    if prev.online && !cur.online {
        events.push(
            "node_offline",
            format!(
                "node {name} is offline: no heartbeat on any network for {} ms",
                timeout.as_millis()
            ),
        );
    } else if !prev.online && cur.online {
        events.push("node_online", format!("node {name} is online"));
    }
    for (i, (p, c)) in prev.networks.iter().zip(&cur.networks).enumerate() {
        let ip = nets.get(i).map(|ip| ip.to_string()).unwrap_or_default();
        // A whole node going down is one event, not one per network.
        if *p && !*c && cur.online {
            events.push(
                "network_down",
                format!("node {name}: network {i} ({ip}) lost its heartbeat; still reachable on another network"),
            );
        } else if !*p && *c && prev.online {
            events.push(
                "network_up",
                format!("node {name}: network {i} ({ip}) is back"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_round_trip_and_forgery() {
        let k = key("s1");
        let hb = Heartbeat {
            ring: 1,
            node: 7,
            incarnation: 9,
            seq: 3,
        };
        let p = hb.encode(&k);
        assert_eq!(Heartbeat::decode(&p, &k), Some(hb));
        assert_eq!(Heartbeat::decode(&p, &key("s2")), None, "other secret");
        let mut bad = p;
        bad[10] ^= 1;
        assert_eq!(Heartbeat::decode(&bad, &k), None, "tampered");
        assert_eq!(Heartbeat::decode(&p[..40], &k), None, "short");
    }

    #[test]
    fn liveness_times_out_and_ignores_replays() {
        let l = Liveness::default();
        let t0 = Instant::now();
        let to = Duration::from_millis(800);
        let hb = |ring, seq| Heartbeat {
            ring,
            node: 2,
            incarnation: 1,
            seq,
        };
        l.record(&hb(0, 5), t0);
        l.record(&hb(1, 5), t0);
        let p = l.peer(2, 2, to, t0 + Duration::from_millis(100));
        assert!(p.online && p.networks == vec![true, true]);
        // Ring 1 keeps going, ring 0 stops: still online, one network down.
        l.record(&hb(1, 6), t0 + Duration::from_millis(700));
        let p = l.peer(2, 2, to, t0 + Duration::from_millis(900));
        assert!(p.online && p.networks == vec![false, true]);
        // A replay of an old heartbeat does not revive ring 0.
        l.record(&hb(0, 4), t0 + Duration::from_millis(900));
        let p = l.peer(2, 2, to, t0 + Duration::from_millis(950));
        assert_eq!(p.networks, vec![false, true]);
        // Nothing for a full timeout: offline.
        let p = l.peer(2, 2, to, t0 + Duration::from_millis(1600));
        assert!(!p.online);
        assert_eq!(p.last_heard_ms, Some(900));
    }
}
