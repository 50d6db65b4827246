//! The Bulwark iSCSI target: listens on portals, runs logins, sessions and connections,
//! and maps initiator I/O onto the SCSI logical units of a [`scsi::TargetDevice`].
//!
//! Protocol rules live in `iscsi-proto` (sans-IO) and SCSI semantics in `scsi`; this crate
//! is the tokio driver between them: sockets, tasks, timers. It knows nothing about
//! where blocks live.
#![warn(missing_docs)]

mod budget;
mod conn;
mod discovery;
mod iopool;
mod registry;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use budget::BUFFER_BYTES_MAX_DEFAULT;
pub use iscsi_proto::login::{ChapAccount, TargetLimits};
pub use registry::{ServerStats, SessionInfo};

use registry::Shared;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// One portal: an address a target is reachable on, in an iSCSI portal group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Portal {
    /// Listening address (IPv4 or IPv6).
    pub addr: SocketAddr,
    /// Target portal group tag (RFC 7143 §4.4.1); each tag is one SCSI target port.
    pub group_tag: u16,
}

/// An iSCSI target as the server serves it.
#[derive(Debug)]
pub struct TargetConfig {
    /// iSCSI qualified name.
    pub name: String,
    /// TargetAlias, if any.
    pub alias: Option<String>,
    /// The logical units.
    pub device: Arc<scsi::TargetDevice>,
    /// Portals the target is reachable on.
    pub portals: Vec<Portal>,
    /// Portals of other nodes that serve the target too: SendTargets lists them with
    /// their own portal group tags, so one discovery finds every path (RFC 7143 §4.4.1),
    /// but logins there are theirs to accept.
    pub remote_portals: Vec<Portal>,
    /// Initiator names allowed to see and log in to the target; `None` allows all.
    pub allowed_initiators: Option<Vec<String>>,
    /// CHAP accounts bound to the target; empty means no authentication.
    pub chap: Vec<ChapAccount>,
    /// Whether initiators may reset the whole target with the task management functions
    /// TARGET WARM RESET and TARGET COLD RESET (RFC 7143 §11.5.1). Off unless the
    /// administrator turns it on, as in LIO: a target reset aborts every task of every
    /// initiator on every logical unit, and a cold reset also ends all their sessions,
    /// so one initiator could disturb all the others. Refused, they are answered
    /// "Function authorization failed"; a Linux initiator then escalates to a session
    /// reset (re-login), which touches only its own session. Conformance suites that
    /// test target resets (libiscsi's Reserve6.Target*Reset, PreventAllow.*Reset) need
    /// it on.
    pub allow_target_reset: bool,
}

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Commands a session may have outstanding (the CmdSN window).
    pub queue_depth: u32,
    /// Idle time after which the target pings the initiator with a NOP-In.
    pub nop_interval: Duration,
    /// Time without any PDU after a ping before the connection is dropped.
    pub nop_timeout: Duration,
    /// Time a login may take before the connection is dropped.
    pub login_timeout: Duration,
    /// Connections accepted at once; more are closed at accept.
    pub max_connections: usize,
    /// Connections accepted at once from one source address. A host logs in to each
    /// target it uses over each path, so this is generous; it keeps a flood (or a
    /// slowloris of logins) from one address from taking every slot.
    pub max_connections_per_source: usize,
    /// Operational limits offered in login.
    pub limits: TargetLimits,
    /// CHAP accounts required for discovery sessions; empty means none.
    pub discovery_chap: Vec<ChapAccount>,
    /// Threads that execute SCSI commands (blocking disk I/O); 0 picks twice the CPUs.
    /// Their queue holds at most twice as many commands as there are threads plus one
    /// session's `queue_depth` (see `iopool`); past that, connections wait.
    pub io_threads: usize,
    /// Bytes all sessions together may hold in data buffers of commands in flight (write
    /// data being collected, read data waiting to be sent); commands past it wait.
    /// Default [`BUFFER_BYTES_MAX_DEFAULT`] (1 GiB; why, see there).
    pub buffer_bytes_max: u64,
    /// How long a connection with writes waiting for their data (solicited by R2T, or
    /// unsolicited) may go without a Data-Out PDU that delivers some of it before the
    /// connection is dropped. At ErrorRecoveryLevel 0 a target has no recovery R2T for
    /// data that does not come (RFC 7143 §7.1.4.1, §7.1.5): it ends the connection, and
    /// the session's tasks, with their share of the buffer budget, end with it. Without
    /// this bound an initiator that sends WRITE commands and never their data holds
    /// [`ServerSettings::buffer_bytes_max`] budget for as long as it answers pings.
    /// Connections with no write waiting for data are never closed by it. Default
    /// [`DATA_OUT_TIMEOUT_DEFAULT`] (20 s; why, see there).
    pub data_out_timeout: Duration,
}

/// Default for [`ServerSettings::data_out_timeout`]: 20 s. A healthy initiator sends the
/// data of a write as soon as the R2T arrives, so the gap between two Data-Out PDUs on
/// a connection with writes waiting is about one PDU's transfer time (a 16 MiB segment
/// takes 1.3 s even at 100 Mb/s), plus the Data-In queued ahead of a new write's R2T —
/// bounded by the buffer budget, 1 GiB, about 9 s at 1 Gb/s and 1 s at 10 Gb/s — plus
/// whatever stalls the network or the host add: TCP's retransmission backoff needs about
/// 12 s to lose the same segment six times in a row (0.2 + 0.4 + … + 6.4 s). 20 s is past
/// all of that, and equals the time the NOP-In keepalive gives a silent connection with
/// the default settings (`nop_interval` + `nop_timeout`), so an initiator in trouble is
/// treated the same whether it answers pings or not. LIO allows 3 s (`dataout_timeout`)
/// and at ErrorRecoveryLevel 0 then drops the connection; this is more forgiving, and
/// still bounds how long a hostile connection holds budget to about 20 s, not forever.
pub const DATA_OUT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(20);

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            queue_depth: 128,
            nop_interval: Duration::from_secs(5),
            nop_timeout: Duration::from_secs(15),
            login_timeout: Duration::from_secs(15),
            max_connections: 1024,
            max_connections_per_source: 256,
            limits: TargetLimits::default(),
            discovery_chap: Vec::new(),
            io_threads: 0,
            buffer_bytes_max: BUFFER_BYTES_MAX_DEFAULT,
            data_out_timeout: DATA_OUT_TIMEOUT_DEFAULT,
        }
    }
}

/// The iSCSI server: a set of targets and the portals that serve them.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A server with no targets.
    pub fn new(settings: ServerSettings) -> Server {
        Server {
            shared: Arc::new(Shared::new(settings)),
        }
    }

    /// Adds a target or replaces one with the same name. Live sessions keep running and
    /// see new CHAP accounts from their next login; sessions of initiators the new ACL
    /// no longer allows end at once.
    pub fn set_target(&self, target: TargetConfig) {
        self.shared.set_target(target);
    }

    /// Removes a target whose service moved to another node: its initiators are asked
    /// to log out (Async Message) and reconnect; sessions left after `grace` end.
    pub fn hand_over_target(&self, name: &str, grace: Duration) {
        self.shared.hand_over_target(name, grace);
    }

    /// Removes a target and ends its sessions.
    pub fn remove_target(&self, name: &str) {
        self.shared.remove_target(name);
    }

    /// Ends every session of target `name` here (a target cold reset on another node).
    pub fn kill_target_sessions(&self, name: &str) {
        self.shared.kill_target_sessions(name);
    }

    /// Asks the initiators logged in to `name` through one of `addresses` to log out
    /// and log in again; ends those sessions if still there after `grace`. The target
    /// and its other sessions stay.
    pub fn ask_to_log_out(&self, name: &str, addresses: &[std::net::IpAddr], grace: Duration) {
        self.shared.ask_to_log_out(name, addresses, grace);
    }

    /// Aborts the tasks of `nexus` on `lun` in the sessions of `target` (PERSISTENT
    /// RESERVE OUT PREEMPT AND ABORT executed for another node's path); returns how
    /// many.
    pub fn abort_preempted(&self, target: &str, nexus: &scsi::ItNexus, lun: u64) -> usize {
        self.shared.abort_preempted(target, nexus, lun)
    }

    /// After a PERSISTENT RESERVE OUT that completed with GOOD on `device` (executed
    /// here for another node's path): aborts the preempted nexuses' tasks.
    pub fn abort_preempted_tasks(&self, target: &str, device: &scsi::TargetDevice) {
        self.shared.abort_preempted_tasks(target, device);
    }

    /// Runs `job` (SCSI execution: blocking disk I/O) on the server's I/O pool, the
    /// one every command of this server's sessions runs on, inside its bound: when
    /// every slot is taken, the job waits for one (without holding a thread). For
    /// commands that reach this node another way (forwarded from another node).
    pub async fn execute_on_io_pool(&self, job: impl FnOnce() + Send + 'static) {
        let pool = &self.shared.io;
        let slot = match pool.try_slot() {
            Some(s) => s,
            None => match pool.slot().await {
                Some(s) => s,
                // The pool's semaphore is never closed; run the job rather than drop it.
                None => return job(),
            },
        };
        pool.spawn(slot, job);
    }

    /// [`Server::execute_on_io_pool`] without waiting: runs `job` if a slot is free now,
    /// else gives it back.
    pub fn try_execute_on_io_pool<F: FnOnce() + Send + 'static>(&self, job: F) -> Result<(), F> {
        match self.shared.io.try_slot() {
            Some(slot) => {
                self.shared.io.spawn(slot, job);
                Ok(())
            }
            None => Err(job),
        }
    }

    /// The sessions logged in now.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.shared.sessions()
    }

    /// Counters.
    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }

    /// Binds every portal address of every target (each once).
    pub async fn bind(&self) -> std::io::Result<Vec<TcpListener>> {
        let mut addrs: Vec<SocketAddr> = self.shared.portal_addrs();
        addrs.sort();
        addrs.dedup();
        let mut out = Vec::new();
        for a in addrs {
            let l = TcpListener::bind(a).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on portal {a}: {e}"))
            })?;
            out.push(l);
        }
        Ok(out)
    }

    /// Listens on one more portal address while serving (a virtual IP that moved
    /// here). Must be called within the runtime. Dropping the returned handle stops
    /// accepting; connections already accepted go on.
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<PortalListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // A previous listener on this address may have left connections in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on portal {addr}: {e}"))
        })?;
        let listener = socket.listen(1024)?;
        let task = tokio::spawn(accept_loop(self.shared.clone(), listener));
        Ok(PortalListener(task.abort_handle()))
    }

    /// Accepts connections on `listeners` until `shutdown` resolves, then asks every
    /// initiator to log out, lets in-flight commands finish and returns.
    pub async fn serve(
        &self,
        listeners: Vec<TcpListener>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut accepts = tokio::task::JoinSet::new();
        for l in listeners {
            let shared = self.shared.clone();
            accepts.spawn(async move { accept_loop(shared, l).await });
        }
        shutdown.await;
        info!("shutting down: closing sessions");
        accepts.abort_all();
        self.shared.shutdown(Duration::from_secs(5)).await;
        Ok(())
    }
}

/// A portal added with [`Server::listen`]; dropping it closes the listening socket.
#[derive(Debug)]
pub struct PortalListener(tokio::task::AbortHandle);

impl Drop for PortalListener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(guard) = shared.try_admit_connection(peer.ip()) else {
            let refused = shared
                .stats
                .connections_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Logged for the first and then every 1000th: a flood must not flood the log.
            if refused.is_multiple_of(1000) {
                warn!(%peer, refused = refused + 1, "connection limit reached (in all or for this address); closing new connections");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().or(local);
        let shared = shared.clone();
        tokio::spawn(async move {
            conn::run(shared, stream, peer, local, guard).await;
        });
    }
}
