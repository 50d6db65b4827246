//! Server-wide state: targets, sessions (for reinstatement and status), counters.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::{ServerSettings, TargetConfig};

/// Counters of the server (cheap atomics; read by status and metrics).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections refused at the connection limit.
    pub connections_refused: AtomicU64,
    /// Logins that failed.
    pub login_failures: AtomicU64,
    /// Reject PDUs sent.
    pub rejects: AtomicU64,
    /// Digest errors seen.
    pub digest_errors: AtomicU64,
    /// Tasks aborted by task management.
    pub aborted_tasks: AtomicU64,
    /// Commands whose connection waited for a place in the I/O threads' queue.
    pub io_queue_waits: AtomicU64,
    /// Commands whose connection waited for the server-wide buffer budget.
    pub buffer_waits: AtomicU64,
    /// Commands answered TASK SET FULL because the buffer budget was used up while their
    /// session had writes waiting for data (waiting then could deadlock, see `conn`).
    pub buffer_refusals: AtomicU64,
    /// Immediate SCSI commands rejected beyond the per-session limit.
    pub immediate_rejects: AtomicU64,
    /// TARGET WARM/COLD RESET refused because the target does not allow them.
    pub target_resets_refused: AtomicU64,
    /// Connections dropped because writes waited for Data-Out longer than
    /// [`crate::ServerSettings::data_out_timeout`].
    pub data_out_timeouts: AtomicU64,
    /// Failed logins by reason ([`iscsi_proto::login::LoginStatus::reason`], "timeout"
    /// or "protocol error"); logins are rare enough for a lock.
    login_failure_reasons: Mutex<BTreeMap<&'static str, u64>>,
}

impl ServerStats {
    /// A login failed for `reason`.
    pub fn login_failed(&self, reason: &'static str) {
        self.login_failures.fetch_add(1, Ordering::Relaxed);
        *self
            .login_failure_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Failed logins so far, by reason.
    pub fn login_failures_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.login_failure_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A logged-in session, for status output.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// Initiator name.
    pub initiator: String,
    /// ISID as hex.
    pub isid: String,
    /// Target name (None for discovery).
    pub target: Option<String>,
    /// TSIH.
    pub tsih: u16,
    /// Initiator address.
    pub peer: SocketAddr,
    /// The portal it logged in through.
    pub portal: Option<SocketAddr>,
}

/// A session's entry: how to end it, and a signal when it has ended.
pub(crate) struct SessionEntry {
    pub info: SessionInfo,
    pub kill: Arc<Notify>,
    /// Asks the initiator to log out (Async Message, event 1).
    pub logout: Arc<Notify>,
    pub ended: watch::Receiver<bool>,
    /// The session's I_T nexus (None for discovery sessions).
    pub nexus: Option<Arc<scsi::ItNexus>>,
    /// The session, for aborts ordered by another session.
    pub session: Arc<crate::conn::Link>,
}

/// (initiator name, ISID, target name): the identity of a session for reinstatement
/// (RFC 7143 §6.3.5).
pub(crate) type SessionKey = (String, [u8; 6], String);

pub(crate) struct Shared {
    pub settings: ServerSettings,
    /// Runs SCSI commands off the async runtime.
    pub io: crate::iopool::IoPool,
    /// Bytes of data buffers of commands in flight, across sessions.
    pub buffers: crate::budget::BufferBudget,
    targets: RwLock<BTreeMap<String, Arc<TargetConfig>>>,
    sessions: Mutex<HashMap<SessionKey, SessionEntry>>,
    next_tsih: AtomicU16,
    connections: AtomicUsize,
    /// Connections held per source address (the per-source cap).
    connections_by_source: Mutex<HashMap<std::net::IpAddr, usize>>,
    pub stats: ServerStats,
    /// Flips to true at shutdown; connections ask their initiators to log out.
    pub shutting_down: watch::Sender<bool>,
}

/// Holds one slot of the connection limit.
pub(crate) struct ConnectionGuard {
    shared: Arc<Shared>,
    /// The source address it counts against, once admitted.
    source: Option<std::net::IpAddr>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.source {
            let mut m = self
                .shared
                .connections_by_source
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }
}

impl Shared {
    pub fn new(settings: ServerSettings) -> Shared {
        let threads = match settings.io_threads {
            0 => std::thread::available_parallelism().map_or(4, |n| n.get() * 2),
            n => n,
        };
        // Every thread busy with one more command ready behind it, plus a whole session's
        // CmdSN window: one initiator at full queue depth never waits for the pool, and
        // many together wait for the disks (holding their sockets) rather than pile up
        // queued commands. Each queued command is a few hundred bytes; its data buffer
        // is bounded separately by the buffer budget.
        let jobs_max = threads
            .saturating_mul(2)
            .saturating_add(settings.queue_depth.max(1) as usize);
        // Failing to start threads at start-up leaves nothing to serve with.
        #[allow(clippy::expect_used)]
        let io =
            crate::iopool::IoPool::new(threads, jobs_max).expect("cannot start the I/O threads");
        Shared {
            io,
            buffers: crate::budget::BufferBudget::new(settings.buffer_bytes_max),
            settings,
            targets: RwLock::new(BTreeMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
            connections: AtomicUsize::new(0),
            connections_by_source: Mutex::default(),
            stats: ServerStats::default(),
            shutting_down: watch::channel(false).0,
        }
    }

    /// A slot for a new connection from `source`, unless the server or that source
    /// holds its limit already (a flood from one address leaves room for the others).
    pub fn try_admit_connection(
        self: &Arc<Self>,
        source: std::net::IpAddr,
    ) -> Option<ConnectionGuard> {
        let n = self.connections.fetch_add(1, Ordering::AcqRel);
        let mut guard = ConnectionGuard {
            shared: self.clone(),
            source: None,
        };
        if n >= self.settings.max_connections {
            return None;
        }
        {
            let mut m = self
                .connections_by_source
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let held = m.entry(source).or_default();
            if *held >= self.settings.max_connections_per_source {
                return None;
            }
            *held += 1;
            guard.source = Some(source);
        }
        self.stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        Some(guard)
    }

    /// Adds or replaces a target. Sessions of initiators the new ACL no longer allows
    /// end now: revoking access must not wait for their next login.
    pub fn set_target(&self, target: TargetConfig) {
        let name = target.name.clone();
        let allowed = target.allowed_initiators.clone();
        {
            let mut t = self.targets.write().unwrap_or_else(|e| e.into_inner());
            t.insert(name.clone(), Arc::new(target));
        }
        if let Some(allowed) = allowed {
            self.each_session_of(&name, |entry| {
                // Compared as at login (`discovery::allowed`): iSCSI names are
                // case-insensitive (RFC 3722).
                if !allowed
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(&entry.info.initiator))
                {
                    tracing::info!(initiator = %entry.info.initiator, target = %name, "ending a session whose initiator the ACL no longer allows");
                    entry.kill.notify_one();
                }
            });
        }
    }

    pub fn remove_target(&self, name: &str) {
        self.targets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.kill_target_sessions(name);
    }

    /// Calls `f` on every session of `target`.
    fn each_session_of(&self, target: &str, f: impl Fn(&SessionEntry)) {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for (key, entry) in sessions.iter() {
            if key.2 == target {
                f(entry);
            }
        }
    }

    pub fn target(&self, name: &str) -> Option<Arc<TargetConfig>> {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn targets(&self) -> Vec<Arc<TargetConfig>> {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn portal_addrs(&self) -> Vec<SocketAddr> {
        self.targets()
            .iter()
            .flat_map(|t| t.portals.iter().map(|p| p.addr))
            .collect()
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    pub fn session_exists_with_tsih(&self, tsih: u16) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|e| e.info.tsih == tsih)
    }

    pub fn allocate_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            // TSIH 0 is reserved (RFC 7143 §11.12.6).
            if t != 0 && !self.session_exists_with_tsih(t) {
                return t;
            }
        }
    }

    /// Ends the session registered under `key`, if any (session reinstatement, RFC 7143
    /// §6.3.5), and waits for it to finish. Returns whether no such session remains.
    pub async fn end_session(&self, key: &SessionKey, max: Duration) -> bool {
        let old = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        let Some(old) = old else {
            return true;
        };
        tracing::info!(initiator = %key.0, target = %key.2, tsih = old.info.tsih, "reinstating session");
        old.kill.notify_one();
        let mut ended = old.ended;
        let done = tokio::time::timeout(max, async { ended.wait_for(|e| *e).await.is_ok() }).await;
        done.unwrap_or(false)
    }

    /// Registers a session. A session that slipped in under the same key meanwhile (two
    /// logins racing) is ended: there is one session per key.
    pub fn register_session(&self, key: SessionKey, entry: SessionEntry) {
        let old = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entry);
        if let Some(old) = old {
            old.kill.notify_one();
        }
    }

    pub fn unregister_session(&self, key: &SessionKey, tsih: u16) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.get(key).is_some_and(|e| e.info.tsih == tsih) {
            s.remove(key);
        }
    }

    /// PERSISTENT RESERVE OUT with PREEMPT AND ABORT removed `nexus`'s registration on
    /// `lun`: its tasks there are aborted as by ABORT TASK SET (SPC-4 §5.13.11.2.4), on
    /// whichever session carries that nexus. Returns how many tasks were aborted.
    pub fn abort_preempted(&self, target: &str, nexus: &scsi::ItNexus, lun: u64) -> usize {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for (key, entry) in sessions.iter() {
            if key.2 != target || entry.nexus.as_deref() != Some(nexus) {
                continue;
            }
            n += entry.session.abort_running_on(lun);
        }
        self.stats
            .aborted_tasks
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// After a PERSISTENT RESERVE OUT that completed with GOOD: the tasks of every
    /// I_T nexus PREEMPT AND ABORT preempted on `device` are aborted, in this server's
    /// sessions of `target` and in the logical unit.
    pub fn abort_preempted_tasks(&self, target: &str, device: &scsi::TargetDevice) {
        for p in device.take_preempted_nexuses() {
            let n = self.abort_preempted(target, &p.nexus, p.lun);
            device.abort_tasks(p.lun, Some(&p.nexus));
            tracing::info!(lun = p.lun, initiator = %p.nexus.initiator_port_name(), aborted = n, "PREEMPT AND ABORT");
        }
    }

    /// Removes a target, asking its initiators to log out (RFC 7143 §11.9.1, AsyncEvent
    /// one) so they reconnect elsewhere at once; sessions still there after `grace`
    /// are ended. Must be called within a tokio runtime.
    pub fn hand_over_target(self: &Arc<Self>, name: &str, grace: Duration) {
        self.targets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.each_session_of(name, |e| e.logout.notify_one());
        let shared = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            shared.kill_target_sessions(&name);
        });
    }

    /// Asks the initiators of `name`'s sessions that logged in through one of
    /// `addresses` to log out (RFC 7143 §11.9.1, AsyncEvent one) and ends those still
    /// there after `grace`; the target stays. Must be called within a tokio runtime.
    pub fn ask_to_log_out(&self, name: &str, addresses: &[std::net::IpAddr], grace: Duration) {
        let kills = std::sync::Mutex::new(Vec::new());
        self.each_session_of(name, |e| {
            if !e.info.portal.is_some_and(|p| addresses.contains(&p.ip())) {
                return;
            }
            e.logout.notify_one();
            kills
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(e.kill.clone());
        });
        let kills = kills.into_inner().unwrap_or_else(|e| e.into_inner());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            for k in kills {
                k.notify_one();
            }
        });
    }

    /// Ends every session of the given target (target cold reset).
    pub fn kill_target_sessions(&self, target: &str) {
        self.each_session_of(target, |e| e.kill.notify_one());
    }

    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.shutting_down.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if self
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let entries: Vec<Arc<Notify>> = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.kill.clone())
            .collect();
        for k in entries {
            k.notify_one();
        }
        // Every logical unit flushes whatever the sessions left in its write cache.
        for t in self.targets() {
            let device = t.device.clone();
            let _ = tokio::task::spawn_blocking(move || device.flush_all()).await;
        }
    }
}
