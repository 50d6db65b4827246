//! One iSCSI connection: the login phase, then the full feature phase of its session.
//!
//! Sessions have one connection (MaxConnections=1, ErrorRecoveryLevel=0), so the
//! connection task owns the session state. The reader loop decodes PDUs and dispatches
//! SCSI commands to the blocking pool; completions queue their Data-In and SCSI Response
//! PDUs to the writer task, which stamps StatSN/ExpCmdSN/MaxCmdSN at send time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_proto::login::{
    Authentication, LoginNegotiator, LoginPolicy, LoginStatus, OsChallenges, SessionParams,
    SessionType, TargetAdmission,
};
use iscsi_proto::name::Loggable;
use iscsi_proto::pdu::{
    reject, tmf, AsyncMessage, Bhs, DataIn, DataOut, Login, LogoutRequest, LogoutResponse, Lun,
    Nop, Opcode, R2t, Reject, ScsiCommand, ScsiResponse as ScsiResponsePdu, StatusSeq,
    TaskMgmtRequest, TaskMgmtResponse, Text, RESERVED_TAG,
};
use iscsi_proto::text::TextPairs;
use iscsi_proto::SerialNumber;
use scsi::{ItNexus, ResetKind, ScsiRequest, ScsiStatus, TargetPort, TaskAttribute};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::budget::BufferPermit;
use crate::discovery;
use crate::iopool::JobSlot;
use crate::registry::{ConnectionGuard, SessionEntry, SessionKey, Shared};
use crate::wire::{self, Digests, Out, OutPdu, ReadError, StatSn, Window};
use crate::{SessionInfo, TargetConfig};

/// Largest write a single command may carry; larger ones fail with INVALID FIELD IN CDB
/// before any buffer is allocated.
const WRITE_BYTES_MAX: u32 = 64 << 20;
/// ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (47h/05h): how RFC 7143 §7.8 ends a task
/// whose data was lost at ErrorRecoveryLevel 0.
const PROTOCOL_SERVICE_CRC_ERROR: scsi::Sense =
    scsi::Sense::new(scsi::SenseKey::AbortedCommand, 0x47, 0x05);
/// How long a login waits for the session it reinstates to end.
const REINSTATEMENT_WAIT_MAX: Duration = Duration::from_secs(10);
/// How long task management and logout wait for aborted commands to leave the device.
const TASK_WAIT_MAX: Duration = Duration::from_secs(30);
/// Write buffers one session may hold while their data arrives.
const PENDING_WRITE_BYTES_MAX: u64 = 256 << 20;
/// SANITIZE operation code (SBC-3 §5.30).
const SANITIZE: u8 = 0x48;
/// PERSISTENT RESERVE OUT operation code (SPC-4 §6.16).
const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// Largest data segment accepted during login.
const LOGIN_TEXT_MAX: usize = 64 * 1024;
/// Immediate SCSI commands a session may have outstanding. Immediate commands bypass the
/// CmdSN window (RFC 7143 §4.2.2.1, RFC 3720 §3.2.2.1), so without a limit an initiator
/// could queue any number of them; past it they get Reject "Immediate command reject -
/// too many immediate commands" (0x06, RFC 7143 §11.17.1; the initiator may resend).
/// Initiators send no immediate SCSI commands in normal operation (Linux, libiscsi and
/// QEMU send only task management, NOP-Out, Text and Logout as immediate, which this
/// connection answers one at a time before it reads the next PDU and so never counts),
/// and the RFC asks a target to take at least one immediate task management and one
/// other immediate request per connection at any time: four leaves room for both.
const IMMEDIATE_COMMANDS_MAX: u32 = 4;
/// While the reader waits for the I/O queue or the buffer budget (our back-pressure, not
/// the initiator's silence), it tells the keepalive it is alive this often.
const STALL_TICK: Duration = Duration::from_millis(500);
/// [`Clocks::data_wait`] when no write waits for data.
const NO_DATA_WAIT: u64 = u64::MAX;

/// What the reader tells the keepalive, in milliseconds since `epoch`: when the
/// initiator was last heard from, and since when the writes waiting for data have had
/// none (the Data-Out timeout, [`crate::ServerSettings::data_out_timeout`]).
struct Clocks {
    epoch: Instant,
    /// When the last PDU header arrived (or the reader last waited for our own
    /// resources, see [`Session::stalled`]).
    last_rx: AtomicU64,
    /// When a write started waiting for data or a Data-Out last delivered some;
    /// [`NO_DATA_WAIT`] while no write waits. Only the reader stores it.
    data_wait: AtomicU64,
}

impl Clocks {
    fn new() -> Clocks {
        Clocks {
            epoch: Instant::now(),
            last_rx: AtomicU64::new(0),
            data_wait: AtomicU64::new(NO_DATA_WAIT),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A PDU arrived.
    fn heard(&self) {
        self.last_rx.store(self.now(), Ordering::Relaxed);
    }

    /// A Data-Out delivered data to a waiting write: the Data-Out timeout starts over.
    fn data_progress(&self) {
        self.data_wait.store(self.now(), Ordering::Relaxed);
    }

    /// After a PDU was handled: no clock while nothing waits for data; one starting now
    /// if a write has just begun waiting.
    fn data_waiting(&self, waiting: bool) {
        if !waiting {
            self.data_wait.store(NO_DATA_WAIT, Ordering::Relaxed);
        } else if self.data_wait.load(Ordering::Relaxed) == NO_DATA_WAIT {
            self.data_progress();
        }
    }

    /// The reader waited for the server's own resources and read nothing meanwhile:
    /// that time is not the initiator's, so the keepalive and the Data-Out timeout do
    /// not count it.
    fn stalled(&self) {
        self.heard();
        self.data_paused();
    }

    /// The Data-Out timeout starts over if it runs: the reader was not reading.
    fn data_paused(&self) {
        if self.data_wait.load(Ordering::Relaxed) != NO_DATA_WAIT {
            self.data_progress();
        }
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    guard: ConnectionGuard,
) {
    let span = info_span!("conn", %peer);
    async move {
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let login = tokio::time::timeout(
            shared.settings.login_timeout,
            login_phase(&shared, &mut rd, &mut wr, local),
        )
        .await;
        let est = match login {
            Ok(Ok(Some(est))) => est,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(error = %e, "connection ended during login");
                return;
            }
            Err(_) => {
                shared.stats.login_failed("timeout");
                warn!(
                    "login did not finish within {:?}; closing",
                    shared.settings.login_timeout
                );
                return;
            }
        };
        full_feature(shared, rd, wr, peer, local, est).await;
        drop(guard);
    }
    .instrument(span)
    .await
}

struct Established {
    params: SessionParams,
    isid: [u8; 6],
    tsih: u16,
    stat_sn: u32,
    exp_cmd_sn: u32,
    target: Option<Arc<TargetConfig>>,
}

struct Policy<'a> {
    shared: &'a Shared,
    local: Option<SocketAddr>,
}

fn portal_matches(portal: SocketAddr, local: Option<SocketAddr>) -> bool {
    match local {
        None => true,
        Some(l) => {
            portal.port() == l.port() && (portal.ip().is_unspecified() || portal.ip() == l.ip())
        }
    }
}

impl LoginPolicy for Policy<'_> {
    fn admit(&self, initiator: &str, target: &str) -> Result<TargetAdmission, LoginStatus> {
        let t = self.shared.target(target).ok_or(LoginStatus::NOT_FOUND)?;
        let portal = t
            .portals
            .iter()
            .find(|p| portal_matches(p.addr, self.local))
            .ok_or(LoginStatus::NOT_FOUND)?;
        if !discovery::allowed(&t, initiator) {
            return Err(LoginStatus::AUTHORIZATION_FAILURE);
        }
        let auth = if t.chap.is_empty() {
            Authentication::None
        } else {
            Authentication::Chap(t.chap.clone())
        };
        Ok(TargetAdmission {
            auth,
            portal_group_tag: portal.group_tag,
            alias: t.alias.clone(),
        })
    }

    fn admit_discovery(&self, _initiator: &str) -> Result<TargetAdmission, LoginStatus> {
        let chap = &self.shared.settings.discovery_chap;
        let auth = if chap.is_empty() {
            Authentication::None
        } else {
            Authentication::Chap(chap.clone())
        };
        Ok(TargetAdmission {
            auth,
            portal_group_tag: 1,
            alias: None,
        })
    }
}

async fn login_phase(
    shared: &Shared,
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    local: Option<SocketAddr>,
) -> Result<Option<Established>, ReadError> {
    let mut neg = LoginNegotiator::new(shared.settings.limits.clone());
    let policy = Policy { shared, local };
    let mut stat_sn: u32 = initial_stat_sn();
    let mut first = true;
    loop {
        let bhs = wire::read_header(rd, Digests::default()).await?;
        if bhs.opcode() != Ok(Opcode::LoginRequest) {
            shared.stats.login_failed("protocol error");
            warn!(
                opcode = bhs.opcode_raw(),
                "PDU other than Login Request before login completed; closing"
            );
            return Ok(None);
        }
        let (data, _) =
            wire::read_data(rd, bhs.data_len(), LOGIN_TEXT_MAX, Digests::default()).await?;
        let req = Login::parse(&bhs);
        if first && req.tsih != 0 {
            // Adding a connection to an existing session (MC/S) is not offered.
            let status = if shared.session_exists_with_tsih(req.tsih) {
                LoginStatus::TOO_MANY_CONNECTIONS
            } else {
                LoginStatus::SESSION_DOES_NOT_EXIST
            };
            send_login_failure(shared, wr, &req, stat_sn, status).await?;
            return Ok(None);
        }
        first = false;
        let reply = neg.step(&req, &data, &policy, &mut OsChallenges);
        let established = reply.established.is_some();
        if let Some(p) = reply
            .established
            .as_ref()
            .filter(|p| p.session_type == SessionType::Normal)
        {
            // Session reinstatement (RFC 7143 §6.3.5): the old session with this ISID
            // must be gone, its tasks ended, before the new one is acknowledged —
            // otherwise a write still running there could land over a retry.
            let key: SessionKey = (
                p.initiator_name.clone(),
                req.isid,
                p.target_name.clone().unwrap_or_default(),
            );
            if !shared.end_session(&key, REINSTATEMENT_WAIT_MAX).await {
                send_login_failure(shared, wr, &req, stat_sn, LoginStatus::SERVICE_UNAVAILABLE)
                    .await?;
                return Ok(None);
            }
        }
        let tsih = if established {
            shared.allocate_tsih()
        } else {
            req.tsih
        };
        let header = Login {
            isid: req.isid,
            itt: req.itt,
            tsih,
            version_max: 0,
            version_min: 0,
            seq: StatusSeq {
                stat_sn,
                exp_cmd_sn: req.seq.stat_sn,
                max_cmd_sn: req
                    .seq
                    .stat_sn
                    .wrapping_add(shared.settings.queue_depth.max(1) - 1),
            },
            ..reply.header.clone()
        };
        let pdu = iscsi_proto::pdu::Pdu::LoginResponse(header, Bytes::from(reply.text.encode()));
        wr.write_all(&pdu.to_wire(false, false)).await?;
        stat_sn = stat_sn.wrapping_add(1);
        if reply.failed() {
            let status = LoginStatus {
                class: reply.header.status_class,
                detail: reply.header.status_detail,
            };
            let p = neg.params();
            if let Some(bad) = neg.refused_name() {
                // The name came from the network and failed the checks: it is shown
                // escaped and cut (a newline in it must not forge a log line).
                shared.stats.login_failed("bad iSCSI name");
                warn!(
                    key = bad.key,
                    name = %Loggable(&bad.name),
                    error = %bad.error,
                    reason = status.reason(),
                    "login refused: not an iSCSI name"
                );
            } else {
                shared.stats.login_failed(status.reason());
                warn!(
                    initiator = %Loggable(&p.initiator_name),
                    target = %Loggable(p.target_name.as_deref().unwrap_or("-")),
                    reason = status.reason(),
                    "login refused"
                );
            }
            let _ = wr.flush().await;
            return Ok(None);
        }
        if let Some(params) = reply.established {
            let target = params.target_name.as_deref().and_then(|n| shared.target(n));
            if params.session_type == SessionType::Normal && target.is_none() {
                return Ok(None);
            }
            return Ok(Some(Established {
                params,
                isid: req.isid,
                tsih,
                stat_sn,
                exp_cmd_sn: req.seq.stat_sn,
                target,
            }));
        }
    }
}

async fn send_login_failure(
    shared: &Shared,
    wr: &mut OwnedWriteHalf,
    req: &Login,
    stat_sn: u32,
    status: LoginStatus,
) -> Result<(), ReadError> {
    shared.stats.login_failed(status.reason());
    warn!(reason = status.reason(), tsih = req.tsih, "login refused");
    let header = Login {
        csg: req.csg,
        nsg: req.nsg,
        isid: req.isid,
        itt: req.itt,
        tsih: req.tsih,
        seq: StatusSeq {
            stat_sn,
            exp_cmd_sn: req.seq.stat_sn,
            max_cmd_sn: req.seq.stat_sn,
        },
        status_class: status.class,
        status_detail: status.detail,
        ..Default::default()
    };
    let pdu = iscsi_proto::pdu::Pdu::LoginResponse(header, Bytes::new());
    wr.write_all(&pdu.to_wire(false, false)).await?;
    Ok(())
}

/// The first StatSN of a connection: random (RFC 7143 §4.2.2.2 leaves it to the target),
/// so a stale response from an earlier connection cannot pass for a current one. The top
/// byte stays clear, as it always has here: numbers read more easily in traces.
fn initial_stat_sn() -> u32 {
    rand::random::<u32>() & 0x00ff_ffff
}

/// One sequence of Data-Out PDUs: the unsolicited burst or the answer to one R2T.
#[derive(Debug)]
struct DataSequence {
    next_offset: u32,
    next_data_sn: u32,
    end: u32,
}

/// A write command whose data is still arriving.
struct WriteTask {
    cmd: ScsiCommand,
    buf: BytesMut,
    received: u32,
    unsolicited: Option<DataSequence>,
    r2ts: HashMap<u32, DataSequence>,
    next_r2t_offset: u32,
    r2t_sn: u32,
    /// A data sequence or digest error happened; the task fails at the end of its data.
    failed: bool,
    /// When its SCSI Command PDU arrived (latency is counted from there).
    arrived: Instant,
    /// Its share of the server's buffer budget.
    buffers: BufferPermit,
}

/// A command handed to the SCSI layer.
#[derive(Debug)]
pub(crate) struct Running {
    pub lun: u64,
    pub aborted: bool,
}

pub(crate) type Executing = Arc<Mutex<HashMap<u32, Running>>>;

/// Why the full feature phase ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("data digest error")]
    DataDigest,
    #[error("writer stopped")]
    WriterGone,
    #[error("logged out")]
    LoggedOut,
}

struct Session {
    shared: Arc<Shared>,
    /// Shared with every command completion (cloning it is one atomic increment).
    params: Arc<SessionParams>,
    digests: Digests,
    target: Option<Arc<TargetConfig>>,
    nexus: Option<Arc<ItNexus>>,
    window: Arc<Window>,
    out: mpsc::Sender<Out>,
    receiving: HashMap<u32, WriteTask>,
    executing: Executing,
    /// Woken when a command completes (logout and abort wait on it).
    completed: Arc<Notify>,
    next_ttt: u32,
    /// Shared with the keepalive, which drops the connection when they run out.
    clocks: Arc<Clocks>,
    local: Option<SocketAddr>,
    text_continuation: Option<(u32, Bytes)>,
    cid: Option<u16>,
}

async fn full_feature(
    shared: Arc<Shared>,
    mut rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    est: Established,
) {
    let params = est.params.clone();
    let digests = Digests {
        header: params.header_digest,
        data: params.data_digest,
    };
    let window = Arc::new(Window::new(est.exp_cmd_sn, shared.settings.queue_depth));
    let (out_tx, out_rx) = mpsc::channel::<Out>(1024);
    let writer = tokio::spawn(wire::writer(
        wr,
        out_rx,
        window.clone(),
        est.stat_sn,
        digests,
        shared.settings.nop_timeout,
    ));
    let kill = Arc::new(Notify::new());
    let logout = Arc::new(Notify::new());
    let (ended_tx, ended_rx) = watch::channel(false);
    let target_name = est.target.as_ref().map(|t| t.name.clone());
    let key: SessionKey = (
        params.initiator_name.clone(),
        est.isid,
        target_name.clone().unwrap_or_default(),
    );
    let nexus = est.target.as_ref().map(|t| {
        let tag = params.portal_group_tag;
        Arc::new(ItNexus {
            initiator_name: params.initiator_name.clone(),
            isid: est.isid,
            target_port: TargetPort {
                name: format!("{},t,0x{:04x}", t.name, tag),
                relative_id: tag,
                // One target port group per portal group: in a cluster, one per node
                // (DESIGN.md, "ALUA and paths").
                group: tag,
            },
        })
    });
    let info = SessionInfo {
        initiator: params.initiator_name.clone(),
        isid: est.isid.iter().map(|b| format!("{b:02x}")).collect(),
        target: target_name.clone(),
        tsih: est.tsih,
        peer,
        portal: local,
    };
    let normal = params.session_type == SessionType::Normal;
    let executing: Executing = Arc::new(Mutex::new(HashMap::new()));
    if normal {
        shared.register_session(
            key.clone(),
            SessionEntry {
                info,
                kill: kill.clone(),
                logout: logout.clone(),
                ended: ended_rx,
                nexus: nexus.clone(),
                executing: executing.clone(),
            },
        );
    }
    info!(
        initiator = %params.initiator_name,
        target = target_name.as_deref().unwrap_or("(discovery)"),
        tsih = est.tsih,
        header_digest = params.header_digest,
        data_digest = params.data_digest,
        "session established"
    );
    let clocks = Arc::new(Clocks::new());
    let keepalive = tokio::spawn(keepalive(
        shared.clone(),
        out_tx.clone(),
        kill.clone(),
        logout,
        clocks.clone(),
        params.initiator_name.clone(),
    ));
    let mut s = Session {
        shared: shared.clone(),
        params: Arc::new(params),
        digests,
        target: est.target,
        nexus,
        window,
        out: out_tx,
        receiving: HashMap::new(),
        executing,
        completed: Arc::new(Notify::new()),
        next_ttt: 1,
        clocks,
        local,
        text_continuation: None,
        cid: None,
    };
    let result = loop {
        let bhs = tokio::select! {
            r = wire::read_header(&mut rd, digests) => r,
            _ = kill.notified() => break Ok(()),
        };
        let bhs = match bhs {
            Ok(b) => b,
            Err(ReadError::HeaderDigest) => {
                shared.stats.digest_errors.fetch_add(1, Ordering::Relaxed);
                break Err(ConnError::Read(ReadError::HeaderDigest));
            }
            Err(e) => break Err(e.into()),
        };
        s.clocks.heard();
        // A PDU whose data never arrives must not pin the session past a kill.
        let handled = tokio::select! {
            r = s.handle(&mut rd, bhs) => r,
            _ = kill.notified() => break Ok(()),
        };
        if let Err(e) = handled {
            break Err(e);
        }
        s.clocks.data_waiting(!s.receiving.is_empty());
    };
    match &result {
        Ok(()) => info!("session ended by the target"),
        Err(ConnError::LoggedOut) => info!("initiator logged out"),
        Err(ConnError::Read(ReadError::Closed)) => info!("initiator closed the connection"),
        Err(e) => warn!(error = %e, "connection dropped"),
    }
    keepalive.abort();
    s.end().await;
    drop(s);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    if normal {
        shared.unregister_session(&key, est.tsih);
    }
    let _ = ended_tx.send(true);
}

/// Target-initiated NOP-In pings (RFC 7143 §11.19), the Data-Out timeout and the logout
/// request at shutdown.
///
/// The Data-Out timeout: while writes wait for their data, some Data-Out must deliver
/// part of it every [`crate::ServerSettings::data_out_timeout`], or the connection is
/// dropped. Any in-sequence Data-Out with data for any waiting write counts (a healthy
/// initiator serves R2Ts one task after another, so a single task may wait for the
/// others' data), and nothing else does: an initiator that answers pings and sends other
/// commands but never the data would otherwise hold its writes' buffers forever. A
/// target at ErrorRecoveryLevel 0 cannot ask for the data again (no recovery R2T, RFC
/// 7143 §7.1.4.1); its recovery is to end the connection and with it the session's tasks
/// (§7.1.5), which gives their share of the buffer budget back.
async fn keepalive(
    shared: Arc<Shared>,
    out: mpsc::Sender<Out>,
    kill: Arc<Notify>,
    logout: Arc<Notify>,
    clocks: Arc<Clocks>,
    initiator: String,
) {
    let interval = shared.settings.nop_interval.max(Duration::from_millis(100));
    let timeout = shared.settings.nop_timeout;
    let data_out_timeout = shared
        .settings
        .data_out_timeout
        .max(Duration::from_millis(100));
    // Checked four times per Data-Out timeout: a connection is dropped at most a quarter
    // of it late.
    let tick = interval
        .min(timeout)
        .min(data_out_timeout / 4)
        .max(Duration::from_millis(50));
    let mut shutdown = shared.shutting_down.subscribe();
    let mut ttt: u32 = 0x4000_0000;
    let mut ping_sent_at: Option<u64> = None;
    let mut logout_requested = false;
    // A full send queue means the initiator stopped reading: give up on it rather than
    // wait forever (the writer has the same bound on the socket).
    let send = |pdu: OutPdu| {
        let out = out.clone();
        async move {
            matches!(
                tokio::time::timeout(timeout, out.send(Out::Pdus(vec![pdu]))).await,
                Ok(Ok(()))
            )
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            r = async {
                tokio::select! {
                    r = shutdown.wait_for(|s| *s) => r.is_ok(),
                    // The target moved to another node (planned move, failover).
                    _ = logout.notified() => true,
                }
            }, if !logout_requested => {
                logout_requested = true;
                if r {
                    // RFC 7143 §11.9.1 AsyncEvent 1: the target requests a logout within
                    // Parameter3 seconds.
                    let msg = AsyncMessage { event: 1, parameters: [0, 0, 2], ..Default::default() };
                    if !send(OutPdu::new(msg.to_bhs(), Bytes::new(), StatSn::Advance)).await {
                        kill.notify_one();
                        return;
                    }
                }
                continue;
            }
        }
        let now = clocks.now();
        let data_wait = clocks.data_wait.load(Ordering::Relaxed);
        if data_wait != NO_DATA_WAIT
            && now.saturating_sub(data_wait) >= data_out_timeout.as_millis() as u64
        {
            shared
                .stats
                .data_out_timeouts
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                initiator = %Loggable(&initiator),
                "no Data-Out for the writes waiting for data within {data_out_timeout:?}; dropping the connection"
            );
            kill.notify_one();
            return;
        }
        let last = clocks.last_rx.load(Ordering::Relaxed);
        match ping_sent_at {
            Some(sent) if last < sent => {
                if now.saturating_sub(sent) >= timeout.as_millis() as u64 {
                    warn!("no answer to NOP-In within {timeout:?}; dropping the connection");
                    kill.notify_one();
                    return;
                }
            }
            _ => {
                ping_sent_at = None;
                if now.saturating_sub(last) >= interval.as_millis() as u64 {
                    ttt = ttt.wrapping_add(1) | 0x4000_0000;
                    let nop = Nop {
                        itt: RESERVED_TAG,
                        ttt,
                        ..Default::default()
                    };
                    let pdu = OutPdu::new(nop.to_nop_in(), Bytes::new(), StatSn::Peek);
                    if !send(pdu).await {
                        warn!("the initiator does not read what the target sends; dropping the connection");
                        kill.notify_one();
                        return;
                    }
                    ping_sent_at = Some(now);
                }
            }
        }
    }
}

fn task_attribute(attr: u8) -> TaskAttribute {
    match attr {
        iscsi_proto::pdu::attr::UNTAGGED => TaskAttribute::Untagged,
        iscsi_proto::pdu::attr::ORDERED => TaskAttribute::Ordered,
        iscsi_proto::pdu::attr::HEAD_OF_QUEUE => TaskAttribute::HeadOfQueue,
        iscsi_proto::pdu::attr::ACA => TaskAttribute::Aca,
        _ => TaskAttribute::Simple,
    }
}

impl Session {
    async fn send(&self, pdus: Vec<OutPdu>) -> Result<(), ConnError> {
        self.out
            .send(Out::Pdus(pdus))
            .await
            .map_err(|_| ConnError::WriterGone)
    }

    /// Queues one status-bearing PDU (it advances StatSN).
    async fn send_status(&self, bhs: Bhs, data: Bytes) -> Result<(), ConnError> {
        self.send(vec![OutPdu::new(bhs, data, StatSn::Advance)])
            .await
    }

    async fn reject(&self, reason: u8, bhs: &Bhs) -> Result<(), ConnError> {
        self.shared.stats.rejects.fetch_add(1, Ordering::Relaxed);
        debug!(reason, opcode = bhs.opcode_raw(), "rejecting PDU");
        let r = Reject {
            reason,
            ..Default::default()
        };
        self.send_status(r.to_bhs(), Bytes::copy_from_slice(&bhs.0))
            .await
    }

    /// Rejects with a protocol error, lets the writer flush it and ends the connection
    /// (ErrorRecoveryLevel 0 recovers by session reinstatement).
    async fn protocol_error(&self, bhs: &Bhs, what: &'static str) -> ConnError {
        let _ = self.reject(reject::PROTOCOL_ERROR, bhs).await;
        self.flush().await;
        ConnError::Protocol(what)
    }

    async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.out.send(Out::Barrier(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }

    /// Reads and drops a PDU's data segment (with the same checks as `read_segment`).
    async fn skip_data(
        &self,
        rd: &mut BufReader<OwnedReadHalf>,
        bhs: &Bhs,
    ) -> Result<(), ConnError> {
        self.read_segment(rd, bhs).await.map(drop)
    }

    async fn read_segment(
        &self,
        rd: &mut BufReader<OwnedReadHalf>,
        bhs: &Bhs,
    ) -> Result<Bytes, ConnError> {
        let len = bhs.data_len();
        let max = self.params.max_recv_data_segment_length as usize;
        if len > max {
            return Err(self
                .protocol_error(bhs, "data segment longer than MaxRecvDataSegmentLength")
                .await);
        }
        let (data, ok) = wire::read_data(rd, len, max, self.digests).await?;
        if !ok {
            return Err(self.data_digest_error(bhs).await);
        }
        Ok(data)
    }

    async fn data_digest_error(&self, bhs: &Bhs) -> ConnError {
        self.shared
            .stats
            .digest_errors
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.reject(reject::DATA_DIGEST_ERROR, bhs).await;
        self.flush().await;
        ConnError::DataDigest
    }

    /// Checks a non-immediate CmdSN against the window and advances ExpCmdSN. Returns
    /// false if the PDU is outside the window and must be ignored (RFC 7143 §4.2.2.1).
    fn accept_cmd_sn(&self, cmd_sn: u32, immediate: bool) -> bool {
        if immediate {
            return true;
        }
        let exp = SerialNumber(self.window.exp_cmd_sn.load(Ordering::Acquire));
        let max = SerialNumber(self.window.max_cmd_sn.load(Ordering::Acquire));
        let sn = SerialNumber(cmd_sn);
        if !sn.in_window(exp, max) {
            debug!(
                cmd_sn,
                exp = exp.0,
                max = max.0,
                "CmdSN outside the window; ignoring the PDU"
            );
            return false;
        }
        // One connection delivers in order; a gap means the initiator skipped numbers,
        // which we accept rather than stall the session.
        self.window.exp_cmd_sn.store(sn.next().0, Ordering::Release);
        true
    }

    async fn handle(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
        bhs: Bhs,
    ) -> Result<(), ConnError> {
        let op = match bhs.opcode() {
            Ok(op) => op,
            Err(_) => {
                self.skip_data(rd, &bhs).await?;
                return self.reject(reject::COMMAND_NOT_SUPPORTED, &bhs).await;
            }
        };
        let discovery = self.params.session_type == SessionType::Discovery;
        match op {
            Opcode::ScsiCommand if !discovery => self.scsi_command(rd, bhs).await,
            Opcode::DataOut if !discovery => self.data_out(rd, bhs).await,
            Opcode::TaskMgmtRequest if !discovery => {
                self.skip_data(rd, &bhs).await?;
                self.task_mgmt(bhs).await
            }
            Opcode::NopOut => {
                let data = self.read_segment(rd, &bhs).await?;
                self.nop_out(bhs, data).await
            }
            Opcode::TextRequest => {
                let data = self.read_segment(rd, &bhs).await?;
                self.text(bhs, data).await
            }
            Opcode::LogoutRequest => {
                self.skip_data(rd, &bhs).await?;
                self.logout(bhs).await
            }
            Opcode::SnackRequest => {
                // SNACK needs ErrorRecoveryLevel > 0, which we never negotiate.
                self.skip_data(rd, &bhs).await?;
                self.reject(reject::PROTOCOL_ERROR, &bhs).await
            }
            Opcode::LoginRequest => {
                self.skip_data(rd, &bhs).await?;
                Err(self
                    .protocol_error(&bhs, "Login Request in full feature phase")
                    .await)
            }
            _ => {
                self.skip_data(rd, &bhs).await?;
                self.reject(reject::PROTOCOL_ERROR, &bhs).await
            }
        }
    }

    /// Whether this session's target lets initiators reset it. When it does not, TARGET
    /// WARM RESET and TARGET COLD RESET are answered "Function authorization failed" (6,
    /// RFC 7143 §11.6.1), not "Task management function not supported" (5): the
    /// functions are implemented and other targets allow them, so what fails is this
    /// initiator's authority over this target. RFC 7143 §11.5.1 subjects TARGET WARM
    /// RESET to access controls with exactly this answer, and leaves TARGET COLD RESET's
    /// privileges to "iSCSI mechanisms" such as this setting; LIO answers the same for
    /// both. Both codes map to the SCSI service response FUNCTION REJECTED.
    fn target_reset_allowed(&self) -> bool {
        self.target.as_ref().is_some_and(|t| t.allow_target_reset)
    }

    fn nexus_and_device(&self) -> Option<(Arc<ItNexus>, Arc<scsi::TargetDevice>)> {
        Some((self.nexus.clone()?, self.target.as_ref()?.device.clone()))
    }

    async fn scsi_command(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
        bhs: Bhs,
    ) -> Result<(), ConnError> {
        let arrived = Instant::now();
        let cmd = ScsiCommand::parse(&bhs);
        let dlen = bhs.data_len();
        let mrdsl = self.params.max_recv_data_segment_length as usize;
        if dlen > mrdsl {
            return Err(self
                .protocol_error(&bhs, "immediate data longer than MaxRecvDataSegmentLength")
                .await);
        }
        if !self.accept_cmd_sn(cmd.cmd_sn, cmd.immediate) {
            return self.skip_data(rd, &bhs).await;
        }
        if cmd.immediate && self.window.immediate_in_flight() >= IMMEDIATE_COMMANDS_MAX {
            self.shared
                .stats
                .immediate_rejects
                .fetch_add(1, Ordering::Relaxed);
            debug!(
                itt = cmd.itt,
                limit = IMMEDIATE_COMMANDS_MAX,
                "too many immediate commands; rejecting"
            );
            self.skip_data(rd, &bhs).await?;
            return self.reject(reject::IMMEDIATE_COMMAND_REJECT, &bhs).await;
        }
        if dlen > 0
            && (!cmd.write
                || !self.params.immediate_data
                || dlen as u32 > cmd.expected_data_transfer_length)
        {
            self.skip_data(rd, &bhs).await?;
            self.window.task_started(cmd.immediate);
            self.respond_check_condition(&cmd, scsi::Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB)
                .await;
            return self.reject(reject::PROTOCOL_ERROR, &bhs).await;
        }
        if self.receiving.contains_key(&cmd.itt) || self.executing_contains(cmd.itt) {
            self.skip_data(rd, &bhs).await?;
            return self.reject(reject::TASK_IN_PROGRESS, &bhs).await;
        }
        self.window.task_started(cmd.immediate);
        let edtl = cmd.expected_data_transfer_length;
        let write = cmd.write && edtl > 0;
        if write && edtl > WRITE_BYTES_MAX {
            self.skip_data(rd, &bhs).await?;
            self.respond_check_condition(&cmd, scsi::Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB)
                .await;
            return Ok(());
        }
        // Bound the memory one session can pin with writes whose data has not arrived
        // (queue depth × the largest EDTL would be gigabytes): past the bound the
        // initiator gets TASK SET FULL and retries later (SAM-5 §5.3.1).
        let pending: u64 = self.receiving.values().map(|t| t.buf.len() as u64).sum();
        if write && pending + u64::from(edtl) > PENDING_WRITE_BYTES_MAX {
            self.skip_data(rd, &bhs).await?;
            return self.task_set_full(&cmd).await;
        }
        // The data buffer (write data to collect, or read data to send) comes out of the
        // server-wide budget before it exists.
        let Some(buffers) = self.reserve_buffers(edtl).await else {
            self.skip_data(rd, &bhs).await?;
            return self.task_set_full(&cmd).await;
        };
        if !write {
            self.dispatch(cmd, Bytes::new(), arrived, buffers).await;
            return Ok(());
        }
        let mut buf = BytesMut::zeroed(edtl as usize);
        if dlen > 0 {
            let ok = wire::read_data_into(rd, &mut buf[..dlen], self.digests).await?;
            if !ok {
                return Err(self.data_digest_error(&bhs).await);
            }
        }
        let first_burst = self.params.first_burst_length.min(edtl);
        let unsolicited_end = if cmd.final_bit || self.params.initial_r2t {
            dlen as u32
        } else {
            first_burst.max(dlen as u32)
        };
        let unsolicited = (unsolicited_end > dlen as u32).then_some(DataSequence {
            next_offset: dlen as u32,
            next_data_sn: 0,
            end: unsolicited_end,
        });
        let mut task = WriteTask {
            cmd,
            buf,
            received: dlen as u32,
            unsolicited,
            r2ts: HashMap::new(),
            next_r2t_offset: unsolicited_end,
            r2t_sn: 0,
            failed: false,
            arrived,
            buffers,
        };
        if task.received == edtl {
            let data = task.buf.freeze();
            self.dispatch(task.cmd, data, task.arrived, task.buffers)
                .await;
            return Ok(());
        }
        let r2ts = self.issue_r2ts(&mut task);
        let itt = task.cmd.itt;
        self.receiving.insert(itt, task);
        if !r2ts.is_empty() {
            self.send(r2ts).await?;
        }
        Ok(())
    }

    /// Answers a command TASK SET FULL (SAM-5 §5.3.1): the initiator retries it later.
    async fn task_set_full(&self, cmd: &ScsiCommand) -> Result<(), ConnError> {
        let full = scsi::ScsiResponse {
            status: ScsiStatus::TaskSetFull,
            sense: None,
            data_in: Bytes::new(),
        };
        let pdus = build_response(cmd, None, full, &self.params);
        self.window.task_ended(cmd.immediate);
        self.send(pdus).await
    }

    /// `bytes` of the server-wide buffer budget for one command: at once if free, else
    /// after waiting for other commands to give theirs back. `None` means answer TASK SET
    /// FULL instead of waiting: this session has writes waiting for Data-Out, which only
    /// this reader can receive, so if it stopped here to wait for budget those writes
    /// (holding budget themselves) could never finish, and with several sessions in the
    /// same state nothing would. A reader that waits therefore holds no budget that
    /// depends on its own progress: every byte it waits for belongs to a command that is
    /// executing, to Data-In on its way out, or to another session that is still reading.
    async fn reserve_buffers(&self, bytes: u32) -> Option<BufferPermit> {
        if let Some(p) = self.shared.buffers.try_reserve(bytes) {
            return Some(p);
        }
        if !self.receiving.is_empty() {
            self.shared
                .stats
                .buffer_refusals
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.shared
            .stats
            .buffer_waits
            .fetch_add(1, Ordering::Relaxed);
        self.stalled(self.shared.buffers.reserve(bytes)).await
    }

    /// A slot in the I/O threads' queue, waiting for one if the queue is full.
    async fn job_slot(&self) -> Option<JobSlot> {
        if let Some(slot) = self.shared.io.try_slot() {
            return Some(slot);
        }
        self.shared
            .stats
            .io_queue_waits
            .fetch_add(1, Ordering::Relaxed);
        self.stalled(self.shared.io.slot()).await
    }

    /// Runs `f`, which waits for the server's resources, telling the keepalive every
    /// [`STALL_TICK`] that the connection is alive: it is this target that is not reading
    /// the socket, and an initiator must not be dropped for the answer to a ping, or the
    /// Data-Out of a waiting write, that sits unread in it.
    async fn stalled<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(f);
        loop {
            tokio::select! {
                v = &mut f => {
                    self.clocks.data_paused();
                    return v;
                }
                _ = tokio::time::sleep(STALL_TICK) => self.clocks.stalled(),
            }
        }
    }

    fn executing_contains(&self, itt: u32) -> bool {
        self.executing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&itt)
    }

    /// R2Ts for the not yet solicited part of a write, up to MaxOutstandingR2T at once,
    /// each at most MaxBurstLength (RFC 7143 §11.8).
    fn issue_r2ts(&mut self, task: &mut WriteTask) -> Vec<OutPdu> {
        let edtl = task.cmd.expected_data_transfer_length;
        let mut out = Vec::new();
        while task.next_r2t_offset < edtl
            && (task.r2ts.len() as u32) < self.params.max_outstanding_r2t
        {
            let len = (edtl - task.next_r2t_offset).min(self.params.max_burst_length);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if self.next_ttt == RESERVED_TAG {
                self.next_ttt = 1;
            }
            let r2t = R2t {
                lun: task.cmd.lun,
                itt: task.cmd.itt,
                ttt,
                r2t_sn: task.r2t_sn,
                buffer_offset: task.next_r2t_offset,
                desired_data_transfer_length: len,
                ..Default::default()
            };
            task.r2ts.insert(
                ttt,
                DataSequence {
                    next_offset: task.next_r2t_offset,
                    next_data_sn: 0,
                    end: task.next_r2t_offset + len,
                },
            );
            task.r2t_sn = task.r2t_sn.wrapping_add(1);
            task.next_r2t_offset += len;
            out.push(OutPdu::new(r2t.to_bhs(), Bytes::new(), StatSn::Peek));
        }
        out
    }

    async fn data_out(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
        bhs: Bhs,
    ) -> Result<(), ConnError> {
        let d = DataOut::parse(&bhs);
        let len = bhs.data_len();
        if len > self.params.max_recv_data_segment_length as usize {
            return Err(self
                .protocol_error(&bhs, "Data-Out longer than MaxRecvDataSegmentLength")
                .await);
        }
        let Some(task) = self.receiving.get_mut(&d.itt) else {
            // Data for a task we no longer hold (aborted, or already failed because of an
            // earlier sequence error): drop it.
            debug!(itt = d.itt, "Data-Out for no pending task; discarding");
            return self.skip_data(rd, &bhs).await;
        };
        let seq = if d.ttt == RESERVED_TAG {
            task.unsolicited.as_mut()
        } else {
            task.r2ts.get_mut(&d.ttt)
        };
        let end = d.buffer_offset as u64 + len as u64;
        let in_sequence = seq.as_ref().is_some_and(|seq| {
            d.data_sn == seq.next_data_sn
                && d.buffer_offset == seq.next_offset
                && end <= seq.end as u64
        });
        let Some(seq) = seq.filter(|_| in_sequence) else {
            // RFC 7143 §7.8: an out-of-order DataSN implies a lost PDU; without recovery
            // R2Ts (ErrorRecoveryLevel 0) the task ends with CHECK CONDITION "protocol
            // service CRC error" once the initiator has sent the rest of the sequence.
            debug!(
                itt = d.itt,
                data_sn = d.data_sn,
                offset = d.buffer_offset,
                "Data-Out out of sequence"
            );
            self.skip_data(rd, &bhs).await?;
            return self.fail_write_on_final(d.itt, d.final_bit).await;
        };
        let start = d.buffer_offset as usize;
        let ok = wire::read_data_into(rd, &mut task.buf[start..start + len], self.digests).await?;
        if !ok {
            self.shared
                .stats
                .digest_errors
                .fetch_add(1, Ordering::Relaxed);
            self.reject(reject::DATA_DIGEST_ERROR, &bhs).await?;
            return self.fail_write_on_final(d.itt, d.final_bit).await;
        }
        seq.next_data_sn = seq.next_data_sn.wrapping_add(1);
        seq.next_offset += len as u32;
        if len > 0 {
            self.clocks.data_progress();
        }
        let seq_done = seq.next_offset == seq.end;
        if d.final_bit && !seq_done {
            return self.fail_write_on_final(d.itt, true).await;
        }
        task.received += len as u32;
        let mut r2ts = Vec::new();
        if seq_done {
            if d.ttt == RESERVED_TAG {
                task.unsolicited = None;
            } else {
                task.r2ts.remove(&d.ttt);
                let mut t = self
                    .receiving
                    .remove(&d.itt)
                    .ok_or(ConnError::Protocol("task vanished"))?;
                r2ts = self.issue_r2ts(&mut t);
                self.receiving.insert(d.itt, t);
            }
        }
        let complete = self
            .receiving
            .get(&d.itt)
            .is_some_and(|t| t.received == t.cmd.expected_data_transfer_length && !t.failed);
        if complete {
            if let Some(t) = self.receiving.remove(&d.itt) {
                let data = t.buf.freeze();
                self.dispatch(t.cmd, data, t.arrived, t.buffers).await;
            }
        }
        // A task failed earlier in its data ends when a sequence of it ends or all its
        // data is in, rather than waiting for a data PDU that will never come.
        let failed_and_over = self.receiving.get(&d.itt).is_some_and(|t| {
            t.failed && (d.final_bit || t.received == t.cmd.expected_data_transfer_length)
        });
        if failed_and_over {
            return self.fail_write_on_final(d.itt, true).await;
        }
        if !r2ts.is_empty() {
            self.send(r2ts).await?;
        }
        Ok(())
    }

    /// Marks a write as failed by a data sequence or digest error; once the initiator
    /// ends the sequence (F bit) the task completes with ABORTED COMMAND.
    async fn fail_write_on_final(&mut self, itt: u32, final_bit: bool) -> Result<(), ConnError> {
        if let Some(t) = self.receiving.get_mut(&itt) {
            t.failed = true;
        }
        if !final_bit {
            return Ok(());
        }
        if let Some(t) = self.receiving.remove(&itt) {
            self.respond_check_condition(&t.cmd, PROTOCOL_SERVICE_CRC_ERROR)
                .await;
        }
        Ok(())
    }

    async fn respond_check_condition(&self, cmd: &ScsiCommand, sense: scsi::Sense) {
        let resp = scsi::check_condition(sense);
        let pdus = build_response(cmd, None, resp, &self.params);
        self.window.task_ended(cmd.immediate);
        let _ = self.send(pdus).await;
    }

    /// Hands a command with all its data to the SCSI layer on the blocking pool; the
    /// completion queues the response, which carries `buffers` to the writer. Waits for a
    /// place in the pool's queue if it is full.
    async fn dispatch(
        &mut self,
        cmd: ScsiCommand,
        data: Bytes,
        arrived: Instant,
        buffers: BufferPermit,
    ) {
        let Some((nexus, device)) = self.nexus_and_device() else {
            // Discovery sessions never get here (SCSI commands are rejected there).
            debug_assert!(false, "dispatch without a target");
            self.window.task_ended(cmd.immediate);
            return;
        };
        // SANITIZE with IMMED=0 holds its thread until the whole operation ends; it must
        // not take one of the few I/O threads every other command needs, so it runs on
        // tokio's blocking threads (rare, and bounded by the sessions' windows). Taken
        // before the task is registered, so a wait cancelled by a kill leaves nothing.
        let slot = if cmd.cdb[0] == SANITIZE {
            None
        } else {
            self.job_slot().await
        };
        let lun = Lun::from_field(cmd.lun).0;
        self.executing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                cmd.itt,
                Running {
                    lun,
                    aborted: false,
                },
            );
        let executing = self.executing.clone();
        let shared = self.shared.clone();
        let hide_target_reset = !self.target_reset_allowed();
        let target = self.target.clone();
        let runtime = tokio::runtime::Handle::current();
        let window = self.window.clone();
        let out = self.out.clone();
        let params = self.params.clone();
        let completed = self.completed.clone();
        // The command runs, and its response is queued, on an I/O pool thread: one
        // hand-off per command, and disk I/O never blocks a runtime thread.
        let job = move || {
            let cdb_bytes = cmd.cdb;
            let cdb = &cdb_bytes[..];
            let needed = if cmd.write {
                device.data_out_len(lun, cdb)
            } else {
                None
            };
            let req = ScsiRequest {
                nexus: &nexus,
                lun,
                cdb,
                // All the data the initiator sent: the command decides what a surplus
                // means (ignored by WRITE, refused by WRITE SAME and COMPARE AND WRITE).
                data_out: &data,
                expected_data_in_len: cmd.expected_data_transfer_length,
                attr: task_attribute(cmd.attr),
                arrived,
            };
            // The response goes out from wherever the command completes: here, or the
            // thread that hears the replicas acknowledge a write.
            let respond_device = device.clone();
            let respond = scsi::Responder::new(move |resp: scsi::ScsiResponse| {
                let device = respond_device;
                if cmd.cdb[0] == PERSISTENT_RESERVE_OUT && resp.status == ScsiStatus::Good {
                    let target_name = target.as_ref().map_or("", |t| t.name.as_str());
                    shared.abort_preempted_tasks(target_name, &device);
                }
                let itt = cmd.itt;
                let immediate = cmd.immediate;
                // The task leaves `executing` only once its response is queued, so a logout
                // or task management response waiting for it can never overtake it.
                let aborted = executing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&itt)
                    .is_none_or(|r| r.aborted);
                let finish = move || {
                    executing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&itt);
                    window.task_ended(immediate);
                    completed.notify_waiters();
                };
                if aborted {
                    finish();
                    return;
                }
                let resp = if hide_target_reset {
                    without_target_reset(&cmd.cdb, resp)
                } else {
                    resp
                };
                let pdus = build_response(&cmd, needed, resp, &params);
                // Never block an I/O thread on one slow initiator's full send queue: the
                // other sessions share these threads (DESIGN.md invariant 4).
                match out.try_send(Out::Response(pdus, buffers)) {
                    Err(mpsc::error::TrySendError::Full(msg)) => {
                        runtime.spawn(async move {
                            let _ = out.send(msg).await;
                            finish();
                        });
                    }
                    _ => finish(),
                }
            });
            // A bug in a command handler must cost one command, not the process
            // (DESIGN.md invariant 4); the responder answers HARDWARE ERROR if dropped.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                device.execute_then(&req, respond)
            }))
            .is_err()
            {
                tracing::error!(cdb = ?cdb, "SCSI command handler panicked");
            }
        };
        match slot {
            Some(slot) => self.shared.io.spawn(slot, job),
            // SANITIZE (the pool never shuts its queue while a session runs).
            None => drop(tokio::task::spawn_blocking(job)),
        }
    }

    async fn nop_out(&mut self, bhs: Bhs, data: Bytes) -> Result<(), ConnError> {
        let nop = Nop::parse(&bhs);
        if nop.itt == RESERVED_TAG {
            // An answer to our ping (or a bare ping needing no answer).
            return Ok(());
        }
        // A NOP-Out's CmdSN travels in the StatSN slot of the shared layout.
        if !self.accept_cmd_sn(nop.seq.stat_sn, nop.immediate) {
            return Ok(());
        }
        let mut max_ping = self.params.max_xmit_data_segment_length as usize;
        max_ping = max_ping.min(data.len());
        let reply = Nop {
            itt: nop.itt,
            ttt: RESERVED_TAG,
            lun: nop.lun,
            ..Default::default()
        };
        self.send_status(reply.to_nop_in(), data.slice(..max_ping))
            .await
    }

    async fn text(&mut self, bhs: Bhs, data: Bytes) -> Result<(), ConnError> {
        let req = Text::parse(&bhs);
        if !self.accept_cmd_sn(req.seq.stat_sn, req.immediate) {
            return Ok(());
        }
        let body = if req.ttt != RESERVED_TAG {
            match self.text_continuation.take() {
                Some((ttt, rest)) if ttt == req.ttt => rest,
                _ => return self.reject(reject::INVALID_PDU_FIELD, &bhs).await,
            }
        } else {
            let pairs = match TextPairs::parse(&data) {
                Ok(p) => p,
                Err(_) => return self.reject(reject::PROTOCOL_ERROR, &bhs).await,
            };
            let mut out = TextPairs::default();
            for (k, v) in &pairs.0 {
                if k == "SendTargets" {
                    let target = self.target.as_ref().map(|t| t.name.as_str());
                    let st = discovery::send_targets(
                        &self.shared,
                        v,
                        &self.params.initiator_name,
                        target,
                        self.local,
                    );
                    out.0.extend(st.0);
                } else {
                    out.push(k.clone(), "NotUnderstood");
                }
            }
            Bytes::from(out.encode())
        };
        let max = self.params.max_xmit_data_segment_length as usize;
        let (chunk, rest) = if body.len() > max {
            (body.slice(..max), Some(body.slice(max..)))
        } else {
            (body, None)
        };
        let ttt = if let Some(rest) = rest {
            let ttt = self.next_ttt;
            self.next_ttt = match self.next_ttt.wrapping_add(1) {
                0 | RESERVED_TAG => 1,
                t => t,
            };
            self.text_continuation = Some((ttt, rest));
            ttt
        } else {
            RESERVED_TAG
        };
        let resp = Text {
            final_bit: ttt == RESERVED_TAG,
            continue_bit: ttt != RESERVED_TAG,
            lun: req.lun,
            itt: req.itt,
            ttt,
            ..Default::default()
        };
        self.send_status(resp.to_bhs(false), chunk).await
    }

    async fn logout(&mut self, bhs: Bhs) -> Result<(), ConnError> {
        let req = LogoutRequest::parse(&bhs);
        if !self.accept_cmd_sn(req.cmd_sn, req.immediate) {
            return Ok(());
        }
        let response = match req.reason {
            0 => 0,
            1 if self.cid.is_none_or(|c| c == req.cid) => 0,
            1 => 1,
            // Connection recovery needs ErrorRecoveryLevel 2.
            _ => 2,
        };
        let response = if response == 0 {
            // Commands in flight finish before the session goes (RFC 7143 §11.14); if
            // they cannot, say "cleanup failed" rather than pretend they are gone.
            for (_, t) in self.receiving.drain() {
                self.window.task_ended(t.cmd.immediate);
            }
            if self.wait_idle(TASK_WAIT_MAX).await {
                0
            } else {
                3
            }
        } else {
            response
        };
        let resp = LogoutResponse {
            response,
            itt: req.itt,
            ..Default::default()
        };
        self.send_status(resp.to_bhs(), Bytes::new()).await?;
        if response == 0 {
            self.flush().await;
            return Err(ConnError::LoggedOut);
        }
        Ok(())
    }

    /// Waits until no command of this session is in the SCSI layer (or `max` passed).
    async fn wait_idle(&self, max: Duration) -> bool {
        self.wait_until(|running| running.is_empty(), max).await
    }

    /// Waits until the command `itt` has left the SCSI layer (or `max` passed).
    async fn wait_idle_of(&self, itt: u32, max: Duration) -> bool {
        self.wait_until(|running| !running.contains_key(&itt), max)
            .await
    }

    /// Whether `done` became true within `max`.
    async fn wait_until(
        &self,
        done: impl Fn(&HashMap<u32, Running>) -> bool,
        max: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            // Created before the check, so a completion in between still wakes it.
            let notified = self.completed.notified();
            if done(&self.executing.lock().unwrap_or_else(|e| e.into_inner())) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Aborts the tasks matching `pred`: data still arriving is dropped, running commands
    /// lose their response. Returns how many were aborted.
    fn abort_where(&mut self, pred: impl Fn(u32, u64) -> bool) -> usize {
        let mut n = 0;
        let doomed: Vec<u32> = self
            .receiving
            .iter()
            .filter(|(itt, t)| pred(**itt, Lun::from_field(t.cmd.lun).0))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in doomed {
            if let Some(t) = self.receiving.remove(&itt) {
                self.window.task_ended(t.cmd.immediate);
                n += 1;
            }
        }
        let mut luns = Vec::new();
        for (itt, r) in self
            .executing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            if pred(*itt, r.lun) && !r.aborted {
                r.aborted = true;
                luns.push(r.lun);
                n += 1;
            }
        }
        // A command blocked on a background operation of its logical unit (SANITIZE with
        // IMMED=0) must return now, or the task management response would wait for the
        // whole operation.
        luns.sort_unstable();
        luns.dedup();
        if let Some((nexus, device)) = self.nexus_and_device() {
            for lun in luns {
                device.abort_tasks(lun, Some(&nexus));
            }
        }
        self.shared
            .stats
            .aborted_tasks
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    async fn task_mgmt(&mut self, bhs: Bhs) -> Result<(), ConnError> {
        let req = TaskMgmtRequest::parse(&bhs);
        if !self.accept_cmd_sn(req.cmd_sn, req.immediate) {
            return Ok(());
        }
        let lun = Lun::from_field(req.lun).0;
        let Some((nexus, device)) = self.nexus_and_device() else {
            return self.reject(reject::PROTOCOL_ERROR, &bhs).await;
        };
        let lun_exists = device.luns().contains(&lun);
        let mut cold_reset = false;
        let response = match req.function {
            tmf::ABORT_TASK => {
                let rtt = req.referenced_task_tag;
                if self.abort_where(|itt, _| itt == rtt) > 0 {
                    info!(itt = rtt, "task aborted");
                    complete_or_rejected(self.wait_idle_of(rtt, TASK_WAIT_MAX).await)
                } else {
                    tmf::RESP_NO_TASK
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                if !lun_exists {
                    tmf::RESP_NO_LUN
                } else {
                    self.abort_where(|_, l| l == lun);
                    complete_or_rejected(self.wait_idle(TASK_WAIT_MAX).await)
                }
            }
            tmf::LOGICAL_UNIT_RESET => {
                if !lun_exists {
                    tmf::RESP_NO_LUN
                } else {
                    let n = self.abort_where(|_, l| l == lun);
                    device.abort_tasks(lun, None);
                    let idle = self.wait_idle(TASK_WAIT_MAX).await;
                    info!(lun, aborted = n, "logical unit reset");
                    let (d, nx) = (device.clone(), nexus.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        d.reset(ResetKind::LogicalUnit, Some(lun), &nx)
                    })
                    .await;
                    complete_or_rejected(idle)
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET if !self.target_reset_allowed() => {
                self.shared
                    .stats
                    .target_resets_refused
                    .fetch_add(1, Ordering::Relaxed);
                warn!(
                    function = req.function,
                    "target reset refused: not allowed on this target (allow_target_reset)"
                );
                tmf::RESP_AUTH_FAILED
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                let cold = req.function == tmf::TARGET_COLD_RESET;
                let n = self.abort_where(|_, _| true);
                for l in device.luns() {
                    device.abort_tasks(l, None);
                }
                let idle = self.wait_idle(TASK_WAIT_MAX).await;
                info!(aborted = n, cold, "target reset");
                let kind = if cold {
                    ResetKind::TargetCold
                } else {
                    ResetKind::TargetWarm
                };
                let (d, nx) = (device.clone(), nexus.clone());
                let _ = tokio::task::spawn_blocking(move || d.reset(kind, None, &nx)).await;
                cold_reset = cold;
                complete_or_rejected(idle)
            }
            tmf::TASK_REASSIGN => tmf::RESP_REASSIGN_UNSUPPORTED,
            _ => tmf::RESP_NOT_SUPPORTED,
        };
        let resp = TaskMgmtResponse {
            response,
            itt: req.itt,
            ..Default::default()
        };
        self.send_status(resp.to_bhs(), Bytes::new()).await?;
        if cold_reset {
            // RFC 7143 §11.5.1: after a cold reset the target drops all its sessions.
            self.flush().await;
            if let Some(t) = &self.target {
                self.shared.kill_target_sessions(&t.name);
            }
        }
        Ok(())
    }

    /// The session is over: drop pending data, let running commands finish without a
    /// response, and tell the logical units the I_T nexus is gone.
    async fn end(&mut self) {
        self.abort_where(|_, _| true);
        self.wait_idle(TASK_WAIT_MAX).await;
        if let Some((nexus, device)) = self.nexus_and_device() {
            let _ = tokio::task::spawn_blocking(move || device.nexus_loss(&nexus)).await;
        }
    }
}

/// Builds the Data-In PDUs and the status of a completed command (RFC 7143 §11.4, §11.7):
/// data cut to the expected length, residuals, status in the last Data-In when there is
/// no sense data.
fn build_response(
    cmd: &ScsiCommand,
    write_needed: Option<u32>,
    resp: scsi::ScsiResponse,
    params: &SessionParams,
) -> Vec<OutPdu> {
    let edtl = cmd.expected_data_transfer_length;
    let data = resp.data_in;
    let (overflow, underflow, residual) = if let Some(needed) = write_needed {
        residual(needed, edtl)
    } else if cmd.read || !data.is_empty() {
        residual(data.len() as u32, edtl)
    } else {
        (false, false, 0)
    };
    let data = data.slice(..(data.len().min(edtl as usize)));
    let status = resp.status as u8;
    let phase_collapse = resp.sense.is_none()
        && matches!(resp.status, ScsiStatus::Good | ScsiStatus::ConditionMet)
        && !data.is_empty();
    let mut pdus = Vec::new();
    let max_seg = params.max_xmit_data_segment_length.max(512) as usize;
    let burst = params.max_burst_length.max(512) as usize;
    let mut offset = 0usize;
    let mut data_sn = 0u32;
    while offset < data.len() {
        let burst_end = ((offset / burst) + 1) * burst;
        let len = max_seg.min(data.len() - offset).min(burst_end - offset);
        let last = offset + len == data.len();
        let d = DataIn {
            final_bit: last || offset + len == burst_end,
            status_present: last && phase_collapse,
            status: if last && phase_collapse { status } else { 0 },
            overflow: last && phase_collapse && overflow,
            underflow: last && phase_collapse && underflow,
            residual_count: if last && phase_collapse { residual } else { 0 },
            lun: cmd.lun,
            itt: cmd.itt,
            ttt: RESERVED_TAG,
            data_sn,
            buffer_offset: offset as u32,
            ..Default::default()
        };
        let stat = if last && phase_collapse {
            StatSn::Advance
        } else {
            StatSn::Peek
        };
        let mut bhs = d.to_bhs();
        if !(last && phase_collapse) {
            // StatSN is reserved in Data-In without status; the writer fills it anyway.
            bhs.0[24..28].fill(0);
        }
        pdus.push(OutPdu::new(bhs, data.slice(offset..offset + len), stat));
        offset += len;
        data_sn += 1;
    }
    if !phase_collapse {
        let sense_data = match &resp.sense {
            Some(s) => {
                let mut v = Vec::with_capacity(2 + s.len());
                v.extend_from_slice(&(s.len() as u16).to_be_bytes());
                v.extend_from_slice(s);
                Bytes::from(v)
            }
            None => Bytes::new(),
        };
        let r = ScsiResponsePdu {
            overflow,
            underflow,
            response: 0,
            status,
            itt: cmd.itt,
            exp_data_sn: data_sn,
            residual_count: residual,
            ..Default::default()
        };
        pdus.push(OutPdu::new(r.to_bhs(), sense_data, StatSn::Advance));
    }
    pdus
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.39) for a target that refuses
/// target resets (see [`Session::target_reset_allowed`]): the SCSI layer reports what the
/// iSCSI transport offers, TARGET RESET included (TRS, bit 1 of byte 0; iSCSI's TARGET
/// WARM RESET), but an initiator told so would only learn otherwise from a refusal.
/// Other answers pass unchanged.
fn without_target_reset(cdb: &[u8; 16], mut resp: scsi::ScsiResponse) -> scsi::ScsiResponse {
    use scsi::cdb::opcode::{MAINTENANCE_IN, SA_REPORT_SUPPORTED_TMFS};
    /// TRS, in byte 0 of both formats of the parameter data.
    const TRS: u8 = 0x02;
    let report_tmfs = cdb[0] == MAINTENANCE_IN && cdb[1] & 0x1f == SA_REPORT_SUPPORTED_TMFS;
    if report_tmfs
        && resp.status == ScsiStatus::Good
        && resp.data_in.first().is_some_and(|b| b & TRS != 0)
    {
        let mut data = BytesMut::from(&resp.data_in[..]);
        if let Some(b) = data.first_mut() {
            *b &= !TRS;
        }
        resp.data_in = data.freeze();
    }
    resp
}

/// "Function complete" promises the aborted tasks no longer exist (SAM-5 §7.1); when a
/// command is still inside the device after the wait, the function is rejected instead
/// so the initiator does not retry over a write that may still land.
fn complete_or_rejected(tasks_gone: bool) -> u8 {
    if tasks_gone {
        tmf::RESP_COMPLETE
    } else {
        tmf::RESP_REJECTED
    }
}

fn residual(actual: u32, expected: u32) -> (bool, bool, u32) {
    if actual > expected {
        (true, false, actual - expected)
    } else if actual < expected {
        (false, true, expected - actual)
    } else {
        (false, false, 0)
    }
}
