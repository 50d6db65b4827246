//! What a node reports about itself, and its event log.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::state::NodeId;

/// What an event is about: the one list that producers, the alert filter, `bulwark
/// alert add --help` and the README's list of events all read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    AuthRefused,
    NodeOffline,
    NodeOnline,
    NetworkDown,
    NetworkUp,
    Leader,
    Membership,
    QuorumLost,
    QuorumRegained,
    FailoverStarted,
    FailoverFinished,
    Handover,
    VolumeOffline,
    Fence,
    Power,
    Primary,
    ReplicaLeft,
    ReplicaRejoined,
    ResyncStarted,
    ResyncFinished,
    Rebuild,
    Drain,
    SpaceLow,
    Verify,
    Snapshot,
    Disk,
    ReservationPreempted,
    LoginFailures,
    Alua,
    Vip,
    Config,
    AlertTest,
    /// About alert deliveries: recorded, never delivered (no loops).
    Alert,
}

impl EventKind {
    /// Every kind, in the order documentation lists them.
    pub const ALL: [EventKind; 33] = [
        EventKind::AuthRefused,
        EventKind::NodeOffline,
        EventKind::NodeOnline,
        EventKind::NetworkDown,
        EventKind::NetworkUp,
        EventKind::Leader,
        EventKind::Membership,
        EventKind::QuorumLost,
        EventKind::QuorumRegained,
        EventKind::FailoverStarted,
        EventKind::FailoverFinished,
        EventKind::Handover,
        EventKind::VolumeOffline,
        EventKind::Fence,
        EventKind::Power,
        EventKind::Primary,
        EventKind::ReplicaLeft,
        EventKind::ReplicaRejoined,
        EventKind::ResyncStarted,
        EventKind::ResyncFinished,
        EventKind::Rebuild,
        EventKind::Drain,
        EventKind::SpaceLow,
        EventKind::Verify,
        EventKind::Snapshot,
        EventKind::Disk,
        EventKind::ReservationPreempted,
        EventKind::LoginFailures,
        EventKind::Alua,
        EventKind::Vip,
        EventKind::Config,
        EventKind::AlertTest,
        EventKind::Alert,
    ];

    /// The name in events (`kind`), alerts (`--events`) and `BULWARK_EVENT_KIND`.
    pub fn as_str(self) -> &'static str {
        self.describe().0
    }

    /// What it means, in a few words.
    pub fn meaning(self) -> &'static str {
        self.describe().1
    }

    /// Whether an alert may ask for it ([`EventKind::Alert`] is never delivered).
    pub fn subscribable(self) -> bool {
        self != EventKind::Alert
    }

    /// Kinds every node records for the same happening: the leader alone delivers them.
    pub fn cluster_wide(self) -> bool {
        matches!(
            self,
            EventKind::NodeOffline
                | EventKind::NodeOnline
                | EventKind::NetworkDown
                | EventKind::NetworkUp
                | EventKind::Leader
                | EventKind::Membership
        )
    }

    fn describe(self) -> (&'static str, &'static str) {
        match self {
            EventKind::AuthRefused => (
                "auth_refused",
                "a peer or client failed authentication (one event per source a minute)",
            ),
            EventKind::NodeOffline => ("node_offline", "a node stopped answering heartbeats"),
            EventKind::NodeOnline => ("node_online", "a node answers heartbeats again"),
            EventKind::NetworkDown => ("network_down", "one network path to a node failed"),
            EventKind::NetworkUp => ("network_up", "a network path to a node works again"),
            EventKind::Leader => (
                "leader",
                "the Raft leader changed, or an election is under way",
            ),
            EventKind::Membership => ("membership", "a node joined, left or changed its role"),
            EventKind::QuorumLost => (
                "quorum_lost",
                "a node cannot reach a majority of the voters",
            ),
            EventKind::QuorumRegained => ("quorum_regained", "the node reaches a majority again"),
            EventKind::FailoverStarted => {
                ("failover_started", "a primary is replaced after a failure")
            }
            EventKind::FailoverFinished => (
                "failover_finished",
                "the new primary serves (details.pause_ms)",
            ),
            EventKind::Handover => ("handover", "a planned move of a primary"),
            EventKind::VolumeOffline => (
                "volume_offline",
                "no in-sync member of a volume is reachable",
            ),
            EventKind::Fence => ("fence", "the fence command ran, or failed"),
            EventKind::Power => ("power", "a node came back from a power loss"),
            EventKind::Primary => ("primary", "a node took up or gave up the primary role"),
            EventKind::ReplicaLeft => ("replica_left", "a replica left the in-sync set"),
            EventKind::ReplicaRejoined => {
                ("replica_rejoined", "a replica is back in the in-sync set")
            }
            EventKind::ResyncStarted => ("resync_started", "a replica started catching up"),
            EventKind::ResyncFinished => ("resync_finished", "a replica caught up"),
            EventKind::Rebuild => (
                "rebuild",
                "a replica is added, replaced or removed, or a new replica's full copy starts or finishes",
            ),
            EventKind::Drain => (
                "drain",
                "a node is drained for maintenance, evacuated, or back in service",
            ),
            EventKind::SpaceLow => (
                "space_low",
                "a node's data file system is nearly full (details.free_bytes)",
            ),
            EventKind::Verify => (
                "verify",
                "an online verify started, found differences or finished",
            ),
            EventKind::Snapshot => (
                "snapshot",
                "a snapshot was taken, could not be taken, or was deleted",
            ),
            EventKind::Disk => (
                "disk",
                "a node's copy of a volume failed (I/O error, full disk)",
            ),
            EventKind::ReservationPreempted => (
                "reservation_preempted",
                "a persistent reservation was preempted",
            ),
            EventKind::LoginFailures => (
                "login_failures",
                "5 or more failed iSCSI logins within a minute",
            ),
            EventKind::Alua => (
                "alua",
                "an initiator asked for another active/optimized path",
            ),
            EventKind::Vip => ("vip", "a virtual IP was taken up or released"),
            EventKind::Config => ("config", "a node started or stopped serving a target"),
            EventKind::AlertTest => ("alert_test", "sent by `bulwark alert test`"),
            EventKind::Alert => (
                "alert",
                "about alert deliveries: failures and test results (recorded, never delivered)",
            ),
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventKind {
    type Err = String;

    /// Parses a kind an alert may ask for.
    fn from_str(s: &str) -> Result<Self, String> {
        EventKind::ALL
            .into_iter()
            .filter(|k| k.subscribable())
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = EventKind::ALL
                    .iter()
                    .filter(|k| k.subscribable())
                    .map(|k| k.as_str())
                    .collect();
                format!(
                    "unknown event kind {s:?}; known kinds: {}",
                    known.join(", ")
                )
            })
    }
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique across the cluster and across restarts: the observer's name, when its
    /// process started, and a sequence number. Alerts carry it so that a receiver can
    /// drop a repeated delivery.
    #[serde(default)]
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The node that saw it.
    pub observer: String,
    /// Kind, for filtering and alerts: an [`EventKind`] by name. A string on the wire
    /// and on disk, so a node reads events of kinds a newer version added.
    pub kind: String,
    /// What happened, for people.
    pub message: String,
    /// What happened, for programs: e.g. `volume`, `pause_ms`, `planned` (an object,
    /// empty when there is nothing to add to the message).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    /// Whether it is of `kind`.
    pub fn is(&self, kind: EventKind) -> bool {
        self.kind == kind.as_str()
    }
}

/// Events this node saw: the last few in memory, all of them appended to a file as JSON
/// lines (and to the tracing log).
#[derive(Debug)]
pub struct EventLog {
    observer: String,
    /// Start of this process, ms since the epoch: part of every event id.
    boot_ms: u64,
    sequence: AtomicU64,
    recent: Mutex<VecDeque<Event>>,
    file: Option<Mutex<LogFile>>,
    /// Refused authentications by source, aggregated per minute.
    refusals: Mutex<std::collections::HashMap<String, RefusalWindow>>,
    /// Every event as it happens, for alerts and the console (they may lag and miss
    /// some; the log never waits for them).
    live: tokio::sync::broadcast::Sender<Event>,
}

/// Events kept in memory per node.
const RECENT: usize = 200;

/// `events.log` is rotated past this size: `events.log.1` ... `events.log.{KEPT}`.
pub const EVENT_FILE_MAX: u64 = 16 << 20;
/// Rotated event files kept.
pub const EVENT_FILES_KEPT: u32 = 4;

/// One refusal event per source per this long; the rest are counted.
const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Sources tracked at once; past this, refusals are counted under one shared entry.
const REFUSAL_SOURCES: usize = 1024;

/// The append-only event file and its size, rotated by size.
#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

impl LogFile {
    fn open(path: PathBuf) -> std::io::Result<LogFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let size = file.metadata()?.len();
        Ok(LogFile { path, file, size })
    }

    fn append(&mut self, line: &str) -> std::io::Result<()> {
        if self.size + line.len() as u64 + 1 > EVENT_FILE_MAX && self.size > 0 {
            self.rotate()?;
        }
        writeln!(self.file, "{line}")?;
        self.size += line.len() as u64 + 1;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        for n in (1..EVENT_FILES_KEPT).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        std::fs::rename(&self.path, numbered(1))?;
        *self = LogFile::open(self.path.clone())?;
        Ok(())
    }
}

#[derive(Debug)]
struct RefusalWindow {
    since: std::time::Instant,
    /// Refusals in this window not reported yet.
    suppressed: u64,
}

/// `text` from the network, fit for a log line: control and non-ASCII characters
/// escaped, at most `max` characters kept.
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

/// Events a slow subscriber may fall behind by before it misses some.
const LIVE: usize = 1024;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// An event log for `observer`, appending to `path` when given.
    pub fn new(observer: &str, path: Option<PathBuf>) -> std::io::Result<EventLog> {
        let file = match path {
            Some(p) => Some(Mutex::new(LogFile::open(p)?)),
            None => None,
        };
        Ok(EventLog {
            observer: observer.to_string(),
            boot_ms: unix_ms(),
            sequence: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            file,
            refusals: Mutex::default(),
            live: tokio::sync::broadcast::channel(LIVE).0,
        })
    }

    /// Records an event.
    pub fn push(&self, kind: EventKind, message: String) {
        self.push_with(kind, message, serde_json::Map::new());
    }

    /// Records an event with details for programs.
    pub fn push_with(
        &self,
        kind: EventKind,
        message: String,
        details: serde_json::Map<String, serde_json::Value>,
    ) {
        let kind = kind.as_str();
        tracing::info!(event = kind, "{message}");
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let ev = Event {
            id: format!("{}-{:x}-{seq}", self.observer, self.boot_ms),
            unix_ms: unix_ms(),
            observer: self.observer.clone(),
            kind: kind.to_string(),
            message,
            details,
        };
        if let Some(f) = &self.file {
            if let (Ok(mut f), Ok(line)) = (f.lock(), serde_json::to_string(&ev)) {
                // The event log is best effort: a full disk must not stop the node.
                let _ = f.append(&line);
            }
        }
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(ev.clone());
        }
        // No receiver is fine: nothing listens.
        let _ = self.live.send(ev);
    }

    /// Records a refused authentication from `source` (an address): one
    /// `auth_refused` event per source per minute, saying how many more came in the
    /// window before; `why` comes from the peer only through [`sanitize`]. A flood of
    /// strangers therefore writes a bounded number of events and runs alert programs
    /// a bounded number of times.
    pub fn push_refusal(&self, source: &str, why: &str) {
        let now = std::time::Instant::now();
        let report = {
            let Ok(mut m) = self.refusals.lock() else {
                return;
            };
            m.retain(|_, w| now.duration_since(w.since) < REFUSAL_WINDOW || w.suppressed > 0);
            let key = if m.len() >= REFUSAL_SOURCES && !m.contains_key(source) {
                "other sources".to_string()
            } else {
                source.to_string()
            };
            match m.get_mut(&key) {
                Some(w) if now.duration_since(w.since) < REFUSAL_WINDOW => {
                    w.suppressed += 1;
                    None
                }
                Some(w) => {
                    let before = w.suppressed;
                    *w = RefusalWindow {
                        since: now,
                        suppressed: 0,
                    };
                    Some(before)
                }
                None => {
                    m.insert(
                        key,
                        RefusalWindow {
                            since: now,
                            suppressed: 0,
                        },
                    );
                    Some(0)
                }
            }
        };
        if let Some(before) = report {
            let mut details = serde_json::Map::new();
            details.insert("source".into(), source.into());
            details.insert("refused_since_last_event".into(), before.into());
            let more = if before > 0 {
                format!(" ({before} more refused from there in the minute before)")
            } else {
                String::new()
            };
            self.push_with(
                EventKind::AuthRefused,
                format!("refused {source}: {}{more}", sanitize(why, 200)),
                details,
            );
        }
    }

    /// Events from now on, as they happen.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    /// The most recent events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        self.recent
            .lock()
            .map(|r| r.iter().rev().take(n).rev().cloned().collect())
            .unwrap_or_default()
    }
}

/// This node's view of Raft.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftView {
    /// Leader, Follower, Candidate, Learner or Shutdown.
    pub state: String,
    /// Current term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub last_applied: Option<u64>,
    /// Index of the last snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which the log was purged (compacted into the snapshot).
    pub purged_index: Option<u64>,
    /// Entries in the local log.
    pub log_entries: u64,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Learners.
    pub learners: Vec<NodeId>,
}

/// How this node sees one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLiveness {
    /// The peer.
    pub node: NodeId,
    /// Heard from on any network within the failure timeout.
    pub online: bool,
    /// Per network (ring), in the peer's [`crate::state::NodeAddresses::networks`]
    /// order: heard from within the timeout.
    pub networks: Vec<bool>,
    /// Milliseconds since anything was heard, if ever.
    pub last_heard_ms: Option<u64>,
}

/// An iSCSI session on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// Target IQN (empty for discovery).
    pub target: String,
    /// Initiator name.
    pub initiator: String,
    /// Initiator address.
    pub peer: String,
}

/// A volume replica on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeView {
    /// Volume name.
    pub name: String,
    /// "primary" or "replica".
    pub role: String,
    /// Epoch this node runs it at (primaries).
    pub epoch: u64,
    /// Serving I/O now (primaries: sealed and leased).
    pub serving: bool,
    /// Regions sent to replicas by resync since this primary started.
    pub resync_regions_sent: u64,
    /// Initiator writes completed since this primary started.
    pub writes_completed: u64,
    /// Regions (1 MiB) still to resync to replicas.
    #[serde(default)]
    pub resync_pending_regions: u64,
    /// Bytes the local copy takes on disk (a thin file holds only what was written).
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Each replica being resynced (primaries).
    #[serde(default)]
    pub resyncs: Vec<ResyncView>,
    /// The online verify run here (primaries), live.
    #[serde(default)]
    pub verify: Option<VerifyView>,
    /// Why this node's copy stopped (a disk error), if it has.
    #[serde(default)]
    pub error: Option<String>,
    /// How far each replica is behind (primaries).
    #[serde(default)]
    pub lag: Vec<LagView>,
    /// This node's copies of the volume's snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotView>,
}

/// This node's copy of a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotView {
    /// Snapshot name.
    pub name: String,
    /// Bytes its file takes on disk. Blocks it still shares with the volume (a
    /// reflink) count here as in the volume's own figure: the space the snapshot holds
    /// on its own grows from zero as the volume's blocks change.
    pub allocated_bytes: u64,
}

/// What a replica has not acknowledged yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagView {
    /// The replica.
    pub node: NodeId,
    /// Application writes.
    pub writes: u64,
    /// Bytes.
    pub bytes: u64,
}

/// An online verify as its primary runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyView {
    /// Which request.
    pub id: u64,
    /// Regions in the volume.
    pub regions: u64,
    /// Regions compared so far.
    pub compared: u64,
    /// Differing regions found so far (all replicas).
    pub differing: u64,
    /// Done.
    pub finished: bool,
}

/// The resync of one replica, as its primary reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncView {
    /// The replica.
    pub node: NodeId,
    /// Regions (1 MiB) it has received in this resync.
    pub done_regions: u64,
    /// Regions still to go.
    pub pending_regions: u64,
    /// Measured rate, bytes per second.
    pub rate_bytes_per_s: u64,
    /// Whether the replica is connected; a resync waits for one that is down.
    pub connected: bool,
}

impl ResyncView {
    /// Percent done.
    pub fn percent(&self) -> f64 {
        let total = self.done_regions + self.pending_regions;
        if total == 0 {
            100.0
        } else {
            self.done_regions as f64 * 100.0 / total as f64
        }
    }

    /// Time left at the measured rate, if it is moving.
    pub fn time_left(&self, region_size: u64) -> Option<std::time::Duration> {
        (self.rate_bytes_per_s > 0).then(|| {
            std::time::Duration::from_secs_f64(
                (self.pending_regions * region_size) as f64 / self.rate_bytes_per_s as f64,
            )
        })
    }
}

/// What the serving layer reports for status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalReport {
    /// iSCSI sessions.
    pub sessions: Vec<SessionView>,
    /// Targets served.
    pub serving: Vec<String>,
    /// Volume replicas here.
    pub volumes: Vec<VolumeView>,
    /// Replication traffic leaves this node in the clear (`--replication-tls off`).
    pub replication_plaintext: bool,
    /// The data file system (`None` on a witness).
    pub disk: Option<DiskView>,
}

/// A node's data file system.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskView {
    /// Bytes available to the node.
    pub free_bytes: u64,
    /// Size of the file system.
    pub total_bytes: u64,
}

/// What `Request::Status` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Raft view.
    pub raft: RaftView,
    /// Liveness of the other members as this node sees them.
    pub peers: Vec<PeerLiveness>,
    /// iSCSI sessions served here.
    pub sessions: Vec<SessionView>,
    /// Targets served here.
    pub serving: Vec<String>,
    /// Volume replicas here.
    #[serde(default)]
    pub volumes: Vec<VolumeView>,
    /// Replication traffic leaves this node in the clear (`--replication-tls off`).
    #[serde(default)]
    pub replication_plaintext: bool,
    /// The data file system (`None` on a witness).
    #[serde(default)]
    pub disk: Option<DiskView>,
    /// Recent events seen here.
    pub events: Vec<Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_aggregated_per_source() {
        let log = EventLog::new("n1", None).unwrap();
        for _ in 0..1000 {
            log.push_refusal("198.18.0.9", "wrong secret");
        }
        log.push_refusal("198.18.0.10", "bad\nline\u{7}");
        let evs = log.recent(10);
        assert_eq!(evs.len(), 2, "{evs:?}");
        assert!(
            evs[1].message.contains("bad\\nline\\u{7}"),
            "{}",
            evs[1].message
        );
        assert!(!evs[1].message.contains('\n'));
    }

    #[test]
    fn sanitize_escapes_and_truncates() {
        assert_eq!(sanitize("iqn.a\nb", 100), "iqn.a\\nb");
        assert_eq!(sanitize(&"x".repeat(10), 4), "xxxx…");
    }

    #[test]
    fn the_event_file_rotates_and_keeps_a_bounded_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let log = EventLog::new("n1", Some(path.clone())).unwrap();
        let big = "x".repeat(1 << 20);
        for _ in 0..(EVENT_FILE_MAX >> 20) * u64::from(EVENT_FILES_KEPT + 2) {
            log.push(EventKind::Config, big.clone());
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len() as u32, EVENT_FILES_KEPT + 1, "{names:?}");
        for n in names {
            let len = std::fs::metadata(dir.path().join(&n)).unwrap().len();
            assert!(len <= EVENT_FILE_MAX, "{n}: {len}");
        }
    }
}
