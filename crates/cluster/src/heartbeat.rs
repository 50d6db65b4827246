//! Failure detection: every node sends a small authenticated UDP heartbeat to every
//! other node on each network they share (like Corosync's redundant rings), and marks a
//! peer offline once nothing has arrived on any network for the failure timeout.
//!
//! Heartbeats are separate from Raft's: Raft only tells followers about the leader,
//! while every node needs to know about every other, per network. A heartbeat is
//! `"BWHB" | version | ring | node id | incarnation | sequence | HMAC-SHA256` with a key
//! only nodes hold (derived from the cluster CA's key, never from a token), so neither
//! a stranger nor a token holder can make a dead node look alive. The incarnation rises
//! at every start of a node and the sequence with every heartbeat of one incarnation:
//! a heartbeat not newer than the last one accepted from that node on that network (a
//! replay, or one of an earlier incarnation) is dropped. Time is measured on the
//! monotonic clock, so wall-clock jumps change nothing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::hmac;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::debug;

use crate::state::{ClusterState, NodeId};
use crate::status::EventKind;
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
    /// Rises with every start of the sender ([`next_incarnation`]).
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

/// The HMAC key derived from `node_secret`: material only nodes hold (the cluster CA's
/// private key, see [`crate::identity::Identity::node_secret`]).
pub fn key(node_secret: &[u8]) -> hmac::Key {
    let mut material = b"bulwark-heartbeat:".to_vec();
    material.extend_from_slice(node_secret);
    hmac::Key::new(hmac::HMAC_SHA256, &material)
}

/// This start's incarnation: above every earlier one of this node. Kept in
/// `<dir>/incarnation`, and never below the wall clock in microseconds, so a data
/// folder restored from a backup still starts above what its peers saw.
pub fn next_incarnation(dir: &std::path::Path) -> std::io::Result<u64> {
    let path = dir.join("incarnation");
    let last = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let next = last.saturating_add(1).max(clock);
    crate::store::write_private_file(&path, next.to_string().as_bytes())?;
    Ok(next)
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
    /// Records a verified heartbeat if it is newer than the last one accepted from
    /// that node on that network; returns whether it was. A replay (the same or an
    /// older sequence) or a heartbeat of an earlier incarnation is dropped.
    pub fn record(&self, hb: &Heartbeat, now: Instant) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        let fresh = Seen {
            at: now,
            incarnation: hb.incarnation,
            seq: hb.seq,
        };
        match seen.entry((hb.node, hb.ring)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(fresh);
                true
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let e = o.get();
                if (hb.incarnation, hb.seq) <= (e.incarnation, e.seq) {
                    return false;
                }
                o.insert(fresh);
                true
            }
        }
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
#[allow(clippy::too_many_arguments)]
pub async fn run(
    me: NodeId,
    node_secret: Vec<u8>,
    incarnation: u64,
    my_networks: Vec<IpAddr>,
    port: u16,
    state: watch::Receiver<Arc<ClusterState>>,
    liveness: Arc<Liveness>,
    events: Arc<EventLog>,
) {
    let key = Arc::new(key(&node_secret));
    let mut sockets = Vec::new();
    for (ring, ip) in my_networks.iter().enumerate() {
        match UdpSocket::bind(SocketAddr::new(*ip, port)).await {
            Ok(s) => sockets.push((ring as u8, Arc::new(s))),
            Err(e) => events.push(
                EventKind::NetworkDown,
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
                    Some(hb) if hb.node != me => {
                        if !liveness.record(&hb, Instant::now()) {
                            debug!(%from, node = hb.node, "dropped a replayed or outdated heartbeat");
                        }
                    }
                    Some(_) => {}
                    None => debug!(%from, "dropped a heartbeat that is not signed with the cluster's key"),
                }
            }
        });
    }
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
            EventKind::NodeOffline,
            format!(
                "node {name} is offline: no heartbeat on any network for {} ms",
                timeout.as_millis()
            ),
        );
    } else if !prev.online && cur.online {
        events.push(EventKind::NodeOnline, format!("node {name} is online"));
    }
    for (i, (p, c)) in prev.networks.iter().zip(&cur.networks).enumerate() {
        let ip = nets.get(i).map(|ip| ip.to_string()).unwrap_or_default();
        // A whole node going down is one event, not one per network.
        if *p && !*c && cur.online {
            events.push(
                EventKind::NetworkDown,
                format!("node {name}: network {i} ({ip}) lost its heartbeat; still reachable on another network"),
            );
        } else if !*p && *c && prev.online {
            events.push(
                EventKind::NetworkUp,
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
        let k = key(b"s1");
        let hb = Heartbeat {
            ring: 1,
            node: 7,
            incarnation: 9,
            seq: 3,
        };
        let p = hb.encode(&k);
        assert_eq!(Heartbeat::decode(&p, &k), Some(hb));
        assert_eq!(Heartbeat::decode(&p, &key(b"s2")), None, "other secret");
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
            incarnation: 10,
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
        // A replay of an old heartbeat, or of the last one, does not revive ring 0;
        // nor does one of an earlier incarnation.
        assert!(!l.record(&hb(0, 4), t0 + Duration::from_millis(900)));
        assert!(!l.record(&hb(0, 5), t0 + Duration::from_millis(900)));
        let earlier = Heartbeat {
            incarnation: 9,
            seq: 1000,
            ..hb(0, 0)
        };
        assert!(!l.record(&earlier, t0 + Duration::from_millis(900)));
        let p = l.peer(2, 2, to, t0 + Duration::from_millis(950));
        assert_eq!(p.networks, vec![false, true]);
        // Nothing for a full timeout: offline.
        let p = l.peer(2, 2, to, t0 + Duration::from_millis(1600));
        assert!(!p.online);
        assert_eq!(p.last_heard_ms, Some(900));
        // A restart (a higher incarnation) starts its sequence again.
        let restarted = Heartbeat {
            incarnation: 11,
            seq: 1,
            ..hb(0, 0)
        };
        assert!(l.record(&restarted, t0 + Duration::from_millis(1700)));
    }

    #[test]
    fn incarnations_rise_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let a = next_incarnation(dir.path()).unwrap();
        let b = next_incarnation(dir.path()).unwrap();
        assert!(b > a);
        // A folder whose counter says more than the clock still rises.
        std::fs::write(dir.path().join("incarnation"), format!("{}", u64::MAX / 2)).unwrap();
        assert_eq!(next_incarnation(dir.path()).unwrap(), u64::MAX / 2 + 1);
    }
}
