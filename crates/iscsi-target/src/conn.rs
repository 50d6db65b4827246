//! One iSCSI connection: the login phase, then the full feature phase of its session.
//!
//! The full feature phase is the sans-IO state machine [`iscsi_proto::session::Session`];
//! this module is its driver, as the `quinn` crate drives `quinn-proto`. Sessions have
//! one connection (MaxConnections=1, ErrorRecoveryLevel=0). The session sits behind a
//! mutex in a [`Link`] shared by four parties, none of which holds the lock across an
//! `.await`:
//! - the reader (the connection task) reads PDUs from the socket into the session and
//!   carries out its events: admission against the buffer budget, SCSI execution on the
//!   I/O pool, the device's part of task management, SendTargets;
//! - the I/O threads hand completions back ([`Session::complete_command`]);
//! - the writer task takes what the session queued ([`Session::poll_transmit`], which
//!   stamps StatSN/ExpCmdSN/MaxCmdSN as PDUs leave) and writes it;
//! - the timer task calls [`Session::handle_timeout`] (NOP-In pings and their timeout,
//!   the Data-Out timeout, waits for aborted commands) and asks for a logout at shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_proto::login::{
    Authentication, LoginNegotiator, LoginPolicy, LoginStatus, OsChallenges, SessionParams,
    SessionType, TargetAdmission,
};
use iscsi_proto::name::Loggable;
use iscsi_proto::pdu::{Login, Lun, Opcode, Pdu, StatusSeq};
use iscsi_proto::session::{
    CloseReason, CmdSn, Command, CommandResult, Counters, Event, FramingError, Itt, ResetKind,
    Session, SessionConfig, StatSn, Transmit,
};
use scsi::{ItNexus, ScsiRequest, ScsiStatus, TargetPort, TaskAttribute};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::budget::BufferPermit;
use crate::discovery;
use crate::iopool::JobSlot;
use crate::registry::{ConnectionGuard, SessionEntry, SessionKey, Shared};
use crate::wire::{self, Digests, ReadError};
use crate::{SessionInfo, TargetConfig};

/// Largest write a single command may carry; larger ones fail with INVALID FIELD IN CDB
/// before any buffer is allocated.
const WRITE_BYTES_MAX: u32 = iscsi_proto::session::WRITE_BYTES_MAX_DEFAULT;
/// How long a login waits for the session it reinstates to end.
const REINSTATEMENT_WAIT_MAX: Duration = Duration::from_secs(10);
/// How long task management and logout wait for aborted commands to leave the device.
const TASK_WAIT_MAX: Duration = iscsi_proto::session::TASK_WAIT_MAX_DEFAULT;
/// Write buffers one session may hold while their data arrives.
const PENDING_WRITE_BYTES_MAX: u64 = iscsi_proto::session::PENDING_WRITE_BYTES_MAX_DEFAULT;
/// SANITIZE operation code (SBC-3 §5.30).
const SANITIZE: u8 = 0x48;

/// Where a dispatched command runs.
enum Run {
    /// On an I/O pool thread (disk I/O never blocks a runtime thread).
    Pool(JobSlot),
    /// On the connection's task: it does not block (a forwarded command).
    Here,
    /// On tokio's blocking threads: SANITIZE, which holds its thread to the end.
    Blocking,
}
/// PERSISTENT RESERVE OUT operation code (SPC-4 §6.16).
const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// Largest data segment accepted during login.
const LOGIN_TEXT_MAX: usize = 64 * 1024;
/// Immediate SCSI commands a session may have outstanding (why four: see
/// [`iscsi_proto::session::IMMEDIATE_COMMANDS_MAX_DEFAULT`]).
const IMMEDIATE_COMMANDS_MAX: u32 = iscsi_proto::session::IMMEDIATE_COMMANDS_MAX_DEFAULT;
/// While the reader waits for the I/O queue or the buffer budget (our back-pressure, not
/// the initiator's silence), it tells the session it is alive this often.
const STALL_TICK: Duration = Duration::from_millis(500);
/// PDUs the session may have queued for the writer before the reader stops reading: an
/// initiator that does not read its answers (pings, rejects) cannot make them pile up.
const TRANSMIT_PDUS_MAX: usize = 4096;
/// How long ending a connection waits for what is queued to be written.
const FLUSH_WAIT_MAX: Duration = Duration::from_secs(5);

mod login;

use login::{login_phase, Established};

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

/// The state of one connection in the full feature phase, shared by its reader, its
/// writer, its timer and the I/O threads that complete its commands.
pub(crate) struct Link {
    session: Mutex<Session>,
    /// Buffer budget held by admitted commands: given back once their response is
    /// written ([`Transmit::ends_task`]), or when they end without one.
    permits: Mutex<HashMap<Itt, BufferPermit>>,
    /// Wakes the writer: the session queued PDUs (or the connection is closing).
    transmit_ready: Notify,
    /// Wakes the reader: the session may take input again, or has events.
    state_changed: Notify,
    /// Wakes the reader out of a socket read: the session closed.
    closed: Notify,
    /// The writer wrote a batch.
    written: Notify,
    /// PDUs the writer took and has not written yet.
    writing: AtomicUsize,
    /// The writer writes what is queued and stops.
    closing: AtomicBool,
}

impl Link {
    fn new(session: Session) -> Link {
        Link {
            session: Mutex::new(session),
            permits: Mutex::new(HashMap::new()),
            transmit_ready: Notify::new(),
            state_changed: Notify::new(),
            closed: Notify::new(),
            written: Notify::new(),
            writing: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn permits(&self) -> MutexGuard<'_, HashMap<Itt, BufferPermit>> {
        self.permits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the session, then passes on what it changed: counters to the
    /// server's statistics, and wake-ups to the writer and the reader.
    fn with<R>(&self, shared: &Shared, f: impl FnOnce(&mut Session) -> R) -> R {
        let (r, counters, transmit, closed) = {
            let mut s = self.lock();
            let r = f(&mut s);
            (
                r,
                s.take_counters(),
                s.pending_transmit() > 0,
                s.is_closed(),
            )
        };
        record(shared, counters);
        if transmit {
            self.transmit_ready.notify_one();
        }
        self.state_changed.notify_one();
        if closed {
            self.closed.notify_one();
        }
        r
    }

    /// Aborts this session's commands running on `lun` (PERSISTENT RESERVE OUT with
    /// PREEMPT AND ABORT executed for another nexus); returns how many.
    pub fn abort_running_on(&self, lun: u64) -> usize {
        let n = self.lock().abort_running_on(Lun(lun));
        self.state_changed.notify_one();
        n
    }

    /// For the writer: up to `max` PDUs to write, with the budget their tasks held.
    pub(crate) fn take_batch(&self, max: usize) -> (Vec<Transmit>, Vec<BufferPermit>) {
        let mut batch = Vec::new();
        let mut held = Vec::new();
        let mut s = self.lock();
        while batch.len() < max {
            let Some(t) = s.poll_transmit() else {
                break;
            };
            if let Some(itt) = t.ends_task {
                if let Some(p) = self.permits().remove(&itt) {
                    held.push(p);
                }
            }
            batch.push(t);
        }
        self.writing.store(batch.len(), Ordering::Release);
        (batch, held)
    }

    /// For the writer: the batch is on the socket.
    pub(crate) fn batch_written(&self) {
        self.writing.store(0, Ordering::Release);
        self.written.notify_waiters();
    }

    /// For the writer: whether to stop once nothing is queued.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// For the writer: waits until PDUs are queued (or the connection closes).
    pub(crate) async fn transmit_ready(&self) {
        self.transmit_ready.notified().await;
    }

    /// Whether everything queued has been written.
    fn drained(&self) -> bool {
        self.lock().pending_transmit() == 0 && self.writing.load(Ordering::Acquire) == 0
    }

    /// Waits until everything queued has been written (at most `max`).
    async fn flush(&self, max: Duration) {
        let wait = async {
            loop {
                let written = self.written.notified();
                tokio::pin!(written);
                written.as_mut().enable();
                if self.drained() {
                    return;
                }
                self.transmit_ready.notify_one();
                written.await;
            }
        };
        let _ = tokio::time::timeout(max, wait).await;
    }

    /// Waits while the writer has too much queued.
    async fn room_to_read(&self) {
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if self.lock().pending_transmit() < TRANSMIT_PDUS_MAX {
                return;
            }
            written.await;
        }
    }
}

/// The session's counters, added to the server's.
fn record(shared: &Shared, c: Counters) {
    let s = &shared.stats;
    for (counter, n) in [
        (&s.rejects, c.rejects),
        (&s.immediate_rejects, c.immediate_rejects),
        (&s.digest_errors, c.digest_errors),
        (&s.aborted_tasks, c.aborted_tasks),
        (&s.target_resets_refused, c.target_resets_refused),
        (&s.data_out_timeouts, c.data_out_timeouts),
    ] {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Why the full feature phase ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Closed(CloseReason),
    #[error("ended by the target")]
    Killed,
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
    let settings = &shared.settings;
    let config = SessionConfig {
        queue_depth: settings.queue_depth,
        immediate_commands_max: IMMEDIATE_COMMANDS_MAX,
        write_bytes_max: WRITE_BYTES_MAX,
        pending_write_bytes_max: PENDING_WRITE_BYTES_MAX,
        nop_interval: settings.nop_interval.max(Duration::from_millis(100)),
        nop_timeout: settings.nop_timeout,
        data_out_timeout: settings.data_out_timeout.max(Duration::from_millis(100)),
        task_wait_max: TASK_WAIT_MAX,
        target_reset_allowed: est.target.as_ref().is_some_and(|t| t.allow_target_reset),
        cid: None,
        ..SessionConfig::new(params.clone(), CmdSn(est.exp_cmd_sn), StatSn(est.stat_sn))
    };
    let link = Arc::new(Link::new(Session::new(config, Instant::now())));
    let kill = Arc::new(Notify::new());
    let writer = tokio::spawn(wire::writer(
        wr,
        link.clone(),
        digests,
        shared.settings.nop_timeout,
        kill.clone(),
    ));
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
    if normal {
        shared.register_session(
            key.clone(),
            SessionEntry {
                info,
                kill: kill.clone(),
                logout: logout.clone(),
                ended: ended_rx,
                nexus: nexus.clone(),
                session: link.clone(),
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
    let timer = tokio::spawn(timer(shared.clone(), link.clone(), logout));
    let driver = Driver {
        shared: shared.clone(),
        link: link.clone(),
        params: Arc::new(params),
        digests,
        target: est.target,
        nexus,
        local,
        kill,
        undispatched: Mutex::new(Vec::new()),
        prereserved: Mutex::new(None),
    };
    let end = driver.run(&mut rd).await;
    match &end {
        End::Killed => info!("session ended by the target"),
        End::Closed(CloseReason::LoggedOut) => info!("initiator logged out"),
        End::Read(ReadError::Closed) => info!("initiator closed the connection"),
        End::Closed(CloseReason::NopTimeout) => warn!(
            "no answer to NOP-In within {:?}; dropping the connection",
            shared.settings.nop_timeout
        ),
        End::Closed(CloseReason::DataOutTimeout) => warn!(
            initiator = %Loggable(&driver.params.initiator_name),
            "no Data-Out for the writes waiting for data within {:?}; dropping the connection",
            shared.settings.data_out_timeout
        ),
        e => warn!(error = %e, "connection dropped"),
    }
    timer.abort();
    driver.end().await;
    link.closing.store(true, Ordering::Release);
    link.transmit_ready.notify_one();
    let _ = tokio::time::timeout(FLUSH_WAIT_MAX, writer).await;
    // Whatever budget is left belongs to tasks that will never be answered now.
    link.permits().clear();
    if normal {
        shared.unregister_session(&key, est.tsih);
    }
    let _ = ended_tx.send(true);
}

/// Time for the session: target-initiated NOP-In pings (RFC 7143 §11.19) and their
/// timeout, the Data-Out timeout, the deadlines of waits for aborted commands — all
/// decided by [`Session::handle_timeout`] — and the logout request at shutdown or when
/// the target moves (Async Message, RFC 7143 §11.9.1).
async fn timer(shared: Arc<Shared>, link: Arc<Link>, logout: Arc<Notify>) {
    let settings = &shared.settings;
    let interval = settings.nop_interval.max(Duration::from_millis(100));
    let data_out_timeout = settings.data_out_timeout.max(Duration::from_millis(100));
    // Checked four times per Data-Out timeout: a connection is dropped at most a quarter
    // of it late.
    let tick = interval
        .min(settings.nop_timeout)
        .min(data_out_timeout / 4)
        .max(Duration::from_millis(50));
    let mut shutdown = shared.shutting_down.subscribe();
    let mut logout_requested = false;
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
                    link.with(&shared, |s| s.request_logout());
                }
                continue;
            }
        }
        let now = Instant::now();
        let closed = link.with(&shared, |s| {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
            s.is_closed()
        });
        if closed {
            return;
        }
    }
}

/// The SCSI layer's view of a command and all its data.
fn scsi_request<'a>(cmd: &'a Command, nexus: &'a ItNexus) -> ScsiRequest<'a> {
    ScsiRequest {
        nexus,
        lun: cmd.lun.0,
        cdb: &cmd.header.cdb[..],
        // All the data the initiator sent: the command decides what a surplus means
        // (ignored by WRITE, refused by WRITE SAME and COMPARE AND WRITE).
        data_out: &cmd.data_out,
        expected_data_in_len: cmd.header.expected_data_transfer_length,
        attr: task_attribute(cmd.header.attr),
        arrived: cmd.arrived,
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

/// Reads one PDU and hands it to the session. A Data-Out that is the next of its
/// sequence is read straight into its command's buffer (the session lends the place),
/// so write data is never copied on its way from the socket to the device.
///
/// So is the immediate data of a write that also needs Data-Out, when the budget has
/// room for the whole write now: it is read into a buffer that will become the write
/// buffer, whose budget waits in `prereserved` for the session's
/// [`Event::AdmitCommand`]. Without room it is read into a buffer of its own and
/// copied once admitted (the budget is then waited for as usual, before the write
/// buffer exists).
async fn read_pdu(
    shared: &Shared,
    link: &Link,
    rd: &mut BufReader<OwnedReadHalf>,
    digests: Digests,
    max_recv: usize,
    prereserved: &Mutex<Option<(Itt, BufferPermit)>>,
) -> Result<(), ReadError> {
    let bhs = match wire::read_header(rd, digests).await {
        Err(ReadError::HeaderDigest) => {
            shared.stats.digest_errors.fetch_add(1, Ordering::Relaxed);
            return Err(ReadError::HeaderDigest);
        }
        r => r?,
    };
    let len = bhs.data_len();
    if len > max_recv {
        link.with(shared, |s| {
            s.handle_framing_error(Instant::now(), &bhs, FramingError::SegmentTooLong)
        });
        return Ok(());
    }
    if bhs.opcode() == Ok(Opcode::DataOut) {
        if let Some(mut chunk) = link.with(shared, |s| s.lend_data_out_buffer(&bhs)) {
            let ok = wire::read_data_into(rd, &mut chunk, digests).await?;
            link.with(shared, |s| {
                s.handle_lent_data_out(Instant::now(), &bhs, chunk, ok)
            });
            return Ok(());
        }
    }
    let (data, ok) = match write_buffer_for(shared, &bhs, prereserved) {
        Some(mut buf) => {
            let ok = wire::read_data_into(rd, &mut buf, digests).await?;
            (buf.freeze(), ok)
        }
        None => wire::read_data(rd, len, max_recv, digests).await?,
    };
    let now = Instant::now();
    match (ok, Pdu::decode(&bhs, data)) {
        (false, _) => link.with(shared, |s| {
            s.handle_framing_error(now, &bhs, FramingError::DataDigest)
        }),
        (true, Ok(pdu)) => link.with(shared, |s| s.handle_received(now, bhs, pdu)),
        (true, Err(_)) => link.with(shared, |s| {
            s.handle_framing_error(now, &bhs, FramingError::UnknownOpcode)
        }),
    }
    Ok(())
}

/// For a SCSI Command whose immediate data is only the start of its write: a buffer of
/// the immediate data's length with room for the whole write, if the budget has room
/// for it now (the permit goes to `prereserved`).
fn write_buffer_for(
    shared: &Shared,
    bhs: &iscsi_proto::pdu::Bhs,
    prereserved: &Mutex<Option<(Itt, BufferPermit)>>,
) -> Option<BytesMut> {
    if bhs.opcode() != Ok(Opcode::ScsiCommand) {
        return None;
    }
    let cmd = iscsi_proto::pdu::ScsiCommand::parse(bhs);
    let (len, edtl) = (bhs.data_len(), cmd.expected_data_transfer_length);
    if !cmd.write || len == 0 || len >= edtl as usize || edtl > WRITE_BYTES_MAX {
        return None;
    }
    let permit = shared.buffers.try_reserve(edtl)?;
    *prereserved.lock().unwrap_or_else(|e| e.into_inner()) = Some((Itt(cmd.itt), permit));
    let mut buf = iscsi_proto::session::block_aligned_buffer(edtl as usize);
    buf.resize(len, 0);
    Some(buf)
}

/// The reader's side of a connection: the socket into the session, the session's
/// events out to the SCSI layer.
struct Driver {
    shared: Arc<Shared>,
    link: Arc<Link>,
    params: Arc<SessionParams>,
    digests: Digests,
    target: Option<Arc<TargetConfig>>,
    nexus: Option<Arc<ItNexus>>,
    local: Option<SocketAddr>,
    kill: Arc<Notify>,
    /// Commands the session handed out ([`Event::Execute`]) that have not reached the
    /// I/O pool yet: if the connection is killed meanwhile they are never run, and the
    /// session must hear that at its end.
    undispatched: Mutex<Vec<Itt>>,
    /// Budget taken for the write buffer of the command just read (see [`read_pdu`]),
    /// until the session asks for its admission; dropped if it does not.
    prereserved: Mutex<Option<(Itt, BufferPermit)>>,
}

impl Driver {
    async fn run(&self, rd: &mut BufReader<OwnedReadHalf>) -> End {
        let max_recv = self.params.max_recv_data_segment_length as usize;
        loop {
            let events = tokio::select! {
                r = self.process_events() => r,
                _ = self.kill.notified() => return End::Killed,
            };
            if let Some(end) = events {
                return end;
            }
            if !self.link.lock().wants_input() {
                // Wait for another task (an I/O completion, the timer) to give the session
                // events or make it want input. Checked without `Link::with`: that wakes
                // `state_changed` itself, so the reader's own calls (the events it just
                // carried out) leave a stale wake-up that must not send it round again,
                // or it spins at full CPU until the wait ends.
                loop {
                    let changed = self.link.state_changed.notified();
                    tokio::pin!(changed);
                    changed.as_mut().enable();
                    {
                        let s = self.link.lock();
                        if s.wants_input() || s.has_events() {
                            break;
                        }
                    }
                    tokio::select! {
                        _ = changed => {}
                        _ = self.kill.notified() => return End::Killed,
                    }
                }
                continue;
            }
            tokio::select! {
                _ = self.link.room_to_read() => {}
                _ = self.kill.notified() => return End::Killed,
            }
            tokio::select! {
                r = read_pdu(&self.shared, &self.link, rd, self.digests, max_recv, &self.prereserved) => {
                    if let Err(e) = r {
                        return End::Read(e);
                    }
                }
                _ = self.kill.notified() => return End::Killed,
                // The timer closed the session: no reason to finish the read.
                _ = self.link.closed.notified() => {}
            }
        }
    }

    /// Carries out the session's events until it has none; returns why the connection
    /// ends, if it does.
    async fn process_events(&self) -> Option<End> {
        loop {
            let events: Vec<Event> = self.link.with(&self.shared, |s| {
                std::iter::from_fn(|| s.poll_event()).collect()
            });
            if events.is_empty() {
                // A command the session did not offer for admission (outside the
                // window, refused, ...) gives its budget back.
                self.prereserved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                return None;
            }
            self.undispatched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(events.iter().filter_map(|e| match e {
                    Event::Execute(c) => Some(c.itt),
                    _ => None,
                }));
            for e in events {
                if let Some(end) = self.on_event(e).await {
                    return Some(end);
                }
            }
        }
    }

    fn nexus_and_device(&self) -> Option<(Arc<ItNexus>, Arc<scsi::TargetDevice>)> {
        Some((self.nexus.clone()?, self.target.as_ref()?.device.clone()))
    }

    async fn on_event(&self, e: Event) -> Option<End> {
        let shared = &self.shared;
        match e {
            Event::AdmitCommand {
                itt,
                buffer_bytes,
                writes_waiting,
            } => {
                let early = self
                    .prereserved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .filter(|(i, _)| *i == itt)
                    .map(|(_, p)| p);
                let permit = match early {
                    Some(p) => Some(p),
                    None => self.reserve_buffers(buffer_bytes, writes_waiting).await,
                };
                let now = Instant::now();
                let r = match permit {
                    Some(p) => {
                        self.link.permits().insert(itt, p);
                        self.link.with(shared, |s| s.admit_command(now, itt))
                    }
                    None => self.link.with(shared, |s| s.refuse_command(now, itt)),
                };
                debug_assert!(r.is_ok(), "{r:?}");
            }
            Event::Execute(cmd) => self.dispatch(cmd).await,
            Event::TaskDropped { itt } => {
                self.link.permits().remove(&itt);
            }
            Event::TaskManagement(req) => {
                let lun_exists = self
                    .nexus_and_device()
                    .is_some_and(|(_, d)| d.luns().contains(&req.lun.0));
                if matches!(
                    req.function,
                    iscsi_proto::pdu::tmf::TARGET_WARM_RESET
                        | iscsi_proto::pdu::tmf::TARGET_COLD_RESET
                ) && !self.target.as_ref().is_some_and(|t| t.allow_target_reset)
                {
                    warn!(
                        function = req.function,
                        "target reset refused: not allowed on this target (allow_target_reset)"
                    );
                }
                if req.function == iscsi_proto::pdu::tmf::ABORT_TASK {
                    debug!(itt = %req.referenced_task_tag, "ABORT TASK");
                }
                let r = self.link.with(shared, |s| {
                    s.carry_out_task_management(Instant::now(), req.itt, lun_exists)
                });
                debug_assert!(r.is_ok(), "{r:?}");
            }
            Event::AbortInDevice { luns } => {
                // A command blocked on a background operation of its logical unit
                // (SANITIZE with IMMED=0) must return now, or the task management
                // response would wait for the whole operation.
                if let Some((nexus, device)) = self.nexus_and_device() {
                    for lun in luns {
                        device.abort_tasks(lun.0, Some(&nexus));
                    }
                }
            }
            Event::AbortAllNexuses { lun } => {
                if let Some((_, device)) = self.nexus_and_device() {
                    match lun {
                        Some(l) => device.abort_tasks(l.0, None),
                        None => {
                            for l in device.luns() {
                                device.abort_tasks(l, None);
                            }
                        }
                    }
                }
            }
            Event::Reset { itt, kind } => {
                if let Some((nexus, device)) = self.nexus_and_device() {
                    let (k, lun) = match kind {
                        ResetKind::LogicalUnit(l) => (scsi::ResetKind::LogicalUnit, Some(l.0)),
                        ResetKind::TargetWarm => (scsi::ResetKind::TargetWarm, None),
                        _ => (scsi::ResetKind::TargetCold, None),
                    };
                    info!(?kind, "reset");
                    let _ = tokio::task::spawn_blocking(move || device.reset(k, lun, &nexus)).await;
                }
                let r = self
                    .link
                    .with(shared, |s| s.reset_done(Instant::now(), itt));
                debug_assert!(r.is_ok(), "{r:?}");
            }
            Event::EndTargetSessions => {
                // RFC 7143 §11.5.1: after a cold reset the target drops all its sessions.
                self.link.flush(FLUSH_WAIT_MAX).await;
                if let Some(t) = &self.target {
                    shared.kill_target_sessions(&t.name);
                }
                return Some(End::Killed);
            }
            Event::SendTargets { itt, value } => {
                let target = self.target.as_ref().map(|t| t.name.as_str());
                let pairs = discovery::send_targets(
                    shared,
                    &value,
                    &self.params.initiator_name,
                    target,
                    self.local,
                );
                let r = self.link.with(shared, |s| {
                    s.answer_send_targets(Instant::now(), itt, pairs)
                });
                debug_assert!(r.is_ok(), "{r:?}");
            }
            Event::Close(reason) => return Some(End::Closed(reason)),
            other => debug!(event = ?other, "event not handled"),
        }
        None
    }

    /// The share of the server-wide buffer budget for one command: at once if free, else
    /// after waiting for other commands to give theirs back. `None` means answer TASK SET
    /// FULL instead of waiting: this session has writes waiting for Data-Out, which only
    /// this reader can receive, so if it stopped here to wait for budget those writes
    /// (holding budget themselves) could never finish, and with several sessions in the
    /// same state nothing would. A reader that waits therefore holds no budget that
    /// depends on its own progress: every byte it waits for belongs to a command that is
    /// executing, to Data-In on its way out, or to another session that is still reading.
    async fn reserve_buffers(&self, bytes: u32, writes_waiting: bool) -> Option<BufferPermit> {
        if let Some(p) = self.shared.buffers.try_reserve(bytes) {
            return Some(p);
        }
        if writes_waiting {
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

    /// Runs `f`, which waits for the server's resources, telling the session every
    /// [`STALL_TICK`] that the connection is alive: it is this target that is not reading
    /// the socket, and an initiator must not be dropped for the answer to a ping, or the
    /// Data-Out of a waiting write, that sits unread in it.
    async fn stalled<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(f);
        loop {
            tokio::select! {
                v = &mut f => {
                    self.link.with(&self.shared, |s| s.note_local_stall(Instant::now()));
                    return v;
                }
                _ = tokio::time::sleep(STALL_TICK) => {
                    self.link.with(&self.shared, |s| s.note_local_stall(Instant::now()));
                }
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

    /// Hands a command with all its data to the SCSI layer on the I/O pool; the
    /// completion goes back to the session from whichever thread it happens on. Waits
    /// for a place in the pool's queue if it is full.
    async fn dispatch(&self, cmd: Command) {
        let itt = cmd.itt;
        let Some((nexus, device)) = self.nexus_and_device() else {
            // Discovery sessions never get here (SCSI commands are rejected there).
            debug_assert!(false, "dispatch without a target");
            self.forget_undispatched(itt);
            let _ = self.link.with(&self.shared, |s| {
                s.complete_command(
                    Instant::now(),
                    itt,
                    CommandResult {
                        status: ScsiStatus::Busy as u8,
                        ..Default::default()
                    },
                )
            });
            return;
        };
        let respond = self.responder(itt, &cmd, &device);
        // A small READ of data in memory is answered here, before anything else: the
        // hand-off to an I/O thread is most of what it would cost (issue 20). Data that
        // would come from the disk goes to the I/O pool as any other command.
        let respond = if device.is_forwarding() {
            respond
        } else {
            let req = scsi_request(&cmd, &nexus);
            // A bug in a handler costs one command (the responder, dropped, answers
            // HARDWARE ERROR), not the connection (DESIGN.md invariant 4).
            let tried = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                device.try_execute_cached(&req, respond)
            }));
            match tried {
                Ok(Err(respond)) => respond,
                done => {
                    if done.is_err() {
                        tracing::error!(cdb = ?req.cdb, "SCSI command handler panicked");
                    }
                    self.forget_undispatched(itt);
                    return;
                }
            }
        };
        // SANITIZE with IMMED=0 holds its thread until the whole operation ends; it must
        // not take one of the few I/O threads every other command needs, so it runs on
        // tokio's blocking threads (rare, and bounded by the sessions' windows).
        //
        // A command this node forwards to the primary (an active/non-optimized path)
        // only encodes a frame and queues it on the replication link: it runs here,
        // which saves a wake-up of an I/O thread per command (issue 20).
        let run = if cmd.header.cdb[0] == SANITIZE {
            Run::Blocking
        } else if device.is_forwarding() {
            Run::Here
        } else {
            match self.job_slot().await {
                Some(slot) => Run::Pool(slot),
                // The pool never closes its semaphore while a session runs.
                None => Run::Blocking,
            }
        };
        // The command runs, and its response is queued, on an I/O pool thread: one
        // hand-off per command, and disk I/O never blocks a runtime thread.
        let job = move || {
            let req = scsi_request(&cmd, &nexus);
            // A bug in a command handler must cost one command, not the process
            // (DESIGN.md invariant 4); the responder answers HARDWARE ERROR if dropped.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                device.execute_then(&req, respond)
            }))
            .is_err()
            {
                tracing::error!(cdb = ?req.cdb, "SCSI command handler panicked");
            }
        };
        self.forget_undispatched(itt);
        match run {
            Run::Pool(slot) => self.shared.io.spawn(slot, job),
            Run::Here => job(),
            Run::Blocking => drop(tokio::task::spawn_blocking(job)),
        }
    }

    /// Where the response of `cmd` goes: the session, from whichever thread the command
    /// completes on (here, an I/O thread, or the thread that hears the replicas
    /// acknowledge a write).
    fn responder(
        &self,
        itt: Itt,
        cmd: &Command,
        device: &Arc<scsi::TargetDevice>,
    ) -> scsi::Responder {
        let cdb_bytes = cmd.header.cdb;
        let needed = if cmd.header.write {
            device.data_out_len(cmd.lun.0, &cdb_bytes)
        } else {
            None
        };
        let link = self.link.clone();
        let shared = self.shared.clone();
        let hide_target_reset = !self.target_reset_allowed();
        let target = self.target.clone();
        let device = device.clone();
        scsi::Responder::new(move |resp: scsi::ScsiResponse| {
            if cdb_bytes[0] == PERSISTENT_RESERVE_OUT && resp.status == ScsiStatus::Good {
                let target_name = target.as_ref().map_or("", |t| t.name.as_str());
                shared.abort_preempted_tasks(target_name, &device);
            }
            let resp = if hide_target_reset {
                without_target_reset(&cdb_bytes, resp)
            } else {
                resp
            };
            let result = CommandResult {
                status: resp.status as u8,
                sense: resp.sense,
                data_in: resp.data_in,
                data_out_needed: needed,
            };
            // The session drops the response of a task aborted meanwhile; its budget
            // goes now rather than with a response that is never written.
            let sent = link.with(&shared, |s| s.complete_command(Instant::now(), itt, result));
            if sent != Ok(true) {
                link.permits().remove(&itt);
            }
        })
    }

    fn forget_undispatched(&self, itt: Itt) {
        let mut u = self.undispatched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = u.iter().position(|i| *i == itt) {
            u.swap_remove(pos);
        }
    }

    /// The session is over: drop pending data, let running commands finish without a
    /// response, and tell the logical units the I_T nexus is gone.
    async fn end(&self) {
        let shared = &self.shared;
        let now = Instant::now();
        let undispatched: Vec<Itt> =
            std::mem::take(&mut *self.undispatched.lock().unwrap_or_else(|e| e.into_inner()));
        let events: Vec<Event> = self.link.with(shared, |s| {
            s.abort_all();
            // Commands handed out but never run will not complete by themselves.
            for itt in undispatched {
                let _ = s.complete_command(now, itt, CommandResult::default());
            }
            std::iter::from_fn(|| s.poll_event()).collect()
        });
        for e in events {
            match e {
                Event::AbortInDevice { luns } => {
                    if let Some((nexus, device)) = self.nexus_and_device() {
                        for lun in luns {
                            device.abort_tasks(lun.0, Some(&nexus));
                        }
                    }
                }
                Event::TaskDropped { itt } => {
                    self.link.permits().remove(&itt);
                }
                Event::Execute(c) => {
                    let _ = self.link.with(shared, |s| {
                        s.complete_command(now, c.itt, CommandResult::default())
                    });
                }
                _ => {}
            }
        }
        let idle = async {
            loop {
                let changed = self.link.state_changed.notified();
                if self.link.lock().executing_count() == 0 {
                    return;
                }
                changed.await;
            }
        };
        let _ = tokio::time::timeout(TASK_WAIT_MAX, idle).await;
        if let Some((nexus, device)) = self.nexus_and_device() {
            let _ = tokio::task::spawn_blocking(move || device.nexus_loss(&nexus)).await;
        }
    }
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.39) for a target that refuses
/// target resets (see [`Driver::target_reset_allowed`]): the SCSI layer reports what the
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

#[cfg(test)]
mod tests {
    /// The sense data the session builds itself (for data lost at ErrorRecoveryLevel 0,
    /// and for commands refused before they reach a logical unit) is byte for byte what
    /// the SCSI layer builds for the same sense (pinned in `iscsi-proto` too).
    #[test]
    fn session_sense_matches_the_scsi_layer() {
        let scsi_bytes =
            scsi::check_condition(scsi::Sense::new(scsi::SenseKey::AbortedCommand, 0x47, 0x05))
                .sense
                .unwrap_or_default();
        assert_eq!(
            &scsi_bytes[..],
            &[0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x47, 0x05, 0, 0, 0, 0]
        );
        let invalid = scsi::check_condition(scsi::Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB)
            .sense
            .unwrap_or_default();
        assert_eq!(
            &invalid[..],
            &[0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0]
        );
    }
}
