//! The full-feature phase of one iSCSI connection (RFC 7143 §4.2, §7, §11) as a sans-IO
//! state machine, in the manner of quinn-proto's `Connection`.
//!
//! Input: PDUs ([`Session::handle_pdu`]), the framing layer's verdicts
//! ([`Session::handle_framing_error`]), the passage of time ([`Session::handle_timeout`])
//! and the answers of the SCSI layer ([`Session::admit_command`],
//! [`Session::complete_command`], [`Session::carry_out_task_management`], ...). Output is
//! pulled: PDUs to send from [`Session::poll_transmit`] (sequence numbers stamped as they
//! leave), work for the transport from [`Session::poll_event`] and the next deadline
//! from [`Session::poll_timeout`]. Nothing here reads a clock or owns a socket.
//!
//! Sessions have one connection (MaxConnections=1) at ErrorRecoveryLevel 0, so a session
//! and its connection are one state machine here. Header and data digests stay in the
//! framing layer, which reads whole PDUs: it reports a failed check through
//! [`Session::handle_framing_error`] (a header digest error ends the connection before a
//! session can see the PDU).
//!
//! While the session waits for an answer of the transport (admission of a command, the
//! device's part of task management, a SendTargets answer) or for commands to leave the
//! device (task management, logout), it handles no further PDU: [`Session::wants_input`]
//! is false and a driver stops reading its socket. PDUs handed in anyway are kept, a few
//! at most, and handled once the wait is over.

mod handlers;
mod response;
mod state;
#[cfg(test)]
mod tests;

use state::{
    complete_or_rejected, Admitting, DataSequence, Keepalive, Outgoing, Payload, PendingLogout,
    Stamp, Task, TmfRequestState, TmfStage, Wait, Window, WriteTask,
};

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::login::SessionParams;
use crate::pdu::{
    reject, tmf, AsyncMessage, Bhs, DataOut, Lun, Nop, Pdu, ScsiCommand, RESERVED_TAG,
};
use crate::serial::SerialNumber;
use crate::text::TextPairs;

macro_rules! tag_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u32);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

macro_rules! serial_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        tag_newtype!($(#[$doc])* $name);

        impl $name {
            /// The number as an RFC 1982 serial number.
            pub fn serial(self) -> SerialNumber {
                SerialNumber(self.0)
            }
            /// The next number, wrapping.
            pub fn next(self) -> $name {
                $name(self.0.wrapping_add(1))
            }
        }
    };
}

tag_newtype!(
    /// Initiator task tag (RFC 7143 §11.2.1.8).
    Itt
);
tag_newtype!(
    /// Target transfer tag (RFC 7143 §11.7, §11.8).
    Ttt
);
serial_newtype!(
    /// Command sequence number (RFC 7143 §4.2.2.1).
    CmdSn
);
serial_newtype!(
    /// Status sequence number (RFC 7143 §4.2.2.2).
    StatSn
);
serial_newtype!(
    /// Data (or R2T) sequence number within a task (RFC 7143 §4.2.2.3).
    DataSn
);

/// Immediate SCSI commands a session may have outstanding by default. Immediate
/// commands bypass the CmdSN window (RFC 7143 §4.2.2.1), so without a limit an
/// initiator could queue any number of them; past it they get Reject "Immediate command
/// reject - too many immediate commands" (0x06, RFC 7143 §11.17.1; the initiator may
/// resend). Initiators send no immediate SCSI commands in normal operation (Linux,
/// libiscsi and QEMU send only task management, NOP-Out, Text and Logout as immediate,
/// which a session answers one at a time and never counts), and the RFC asks a target to
/// take at least one immediate task management and one other immediate request per
/// connection at any time: four leaves room for both.
pub const IMMEDIATE_COMMANDS_MAX_DEFAULT: u32 = 4;
/// Largest write a single command may carry by default; larger ones fail with INVALID
/// FIELD IN CDB before any buffer is allocated.
pub const WRITE_BYTES_MAX_DEFAULT: u32 = 64 << 20;
/// Write buffers one session may hold by default while their data arrives; past it new
/// writes get TASK SET FULL (SAM-5 §5.3.1).
pub const PENDING_WRITE_BYTES_MAX_DEFAULT: u64 = 256 << 20;
/// How long task management and logout wait by default for aborted commands to leave
/// the device.
pub const TASK_WAIT_MAX_DEFAULT: Duration = Duration::from_secs(30);
/// PDUs kept while the session waits (see [`Session::wants_input`]); one more ends the
/// connection.
const DEFERRED_PDUS_MAX: usize = 16;

/// Everything a session needs to know when the full-feature phase starts.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// What login negotiated.
    pub params: SessionParams,
    /// ExpCmdSN after login: the CmdSN of the login request (RFC 7143 §4.2.2.1).
    pub exp_cmd_sn: CmdSn,
    /// The next StatSN after the login responses.
    pub stat_sn: StatSn,
    /// Commands the session may have outstanding: the CmdSN window.
    pub queue_depth: u32,
    /// Immediate SCSI commands the session may have outstanding.
    pub immediate_commands_max: u32,
    /// Largest write a command may carry.
    pub write_bytes_max: u32,
    /// Write buffers the session may hold while their data arrives.
    pub pending_write_bytes_max: u64,
    /// Idle time after which the target pings with a NOP-In (RFC 7143 §11.19).
    pub nop_interval: Duration,
    /// Time without any PDU after a ping before the connection is dropped.
    pub nop_timeout: Duration,
    /// How long writes waiting for data may go without a Data-Out that delivers some
    /// before the connection is dropped (at ErrorRecoveryLevel 0 a target has no recovery
    /// R2T, RFC 7143 §7.1.4.1, §7.1.5).
    pub data_out_timeout: Duration,
    /// How long task management and logout wait for commands to leave the device.
    pub task_wait_max: Duration,
    /// Whether TARGET WARM RESET and TARGET COLD RESET are carried out; refused, they are
    /// answered "Function authorization failed" (RFC 7143 §11.5.1, §11.6.1).
    pub target_reset_allowed: bool,
    /// The connection's CID, if the transport tracks it (Logout reason 1 names one).
    pub cid: Option<u16>,
}

impl SessionConfig {
    /// A configuration with the defaults of this module for what login does not decide.
    pub fn new(params: SessionParams, exp_cmd_sn: CmdSn, stat_sn: StatSn) -> SessionConfig {
        SessionConfig {
            params,
            exp_cmd_sn,
            stat_sn,
            queue_depth: 128,
            immediate_commands_max: IMMEDIATE_COMMANDS_MAX_DEFAULT,
            write_bytes_max: WRITE_BYTES_MAX_DEFAULT,
            pending_write_bytes_max: PENDING_WRITE_BYTES_MAX_DEFAULT,
            nop_interval: Duration::from_secs(5),
            nop_timeout: Duration::from_secs(15),
            data_out_timeout: Duration::from_secs(20),
            task_wait_max: TASK_WAIT_MAX_DEFAULT,
            target_reset_allowed: false,
            cid: None,
        }
    }
}

/// One PDU to send, its sequence numbers filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The header, DataSegmentLength set.
    pub bhs: Bhs,
    /// The data segment (without padding and digest: the framing layer adds them).
    pub data: Bytes,
    /// Set on the last PDU of a command's response: once it is on the wire, resources the
    /// transport holds for the task (its data buffer's share of a budget) may go.
    pub ends_task: Option<Itt>,
}

impl Transmit {
    /// The PDU, decoded again (for tests and logs).
    pub fn to_pdu(&self) -> Option<Pdu> {
        Pdu::decode(&self.bhs, self.data.clone()).ok()
    }
}

/// A SCSI command with all its data, to be executed by the SCSI layer and answered with
/// [`Session::complete_command`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// Its task tag.
    pub itt: Itt,
    /// The logical unit, decoded.
    pub lun: Lun,
    /// The header as received (CDB, task attribute, flags, expected length).
    pub header: ScsiCommand,
    /// All the data the initiator sent (immediate, unsolicited and solicited).
    pub data_out: Bytes,
    /// When its SCSI Command PDU arrived.
    pub arrived: Instant,
}

/// How a SCSI command ended, as the SCSI layer reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandResult {
    /// SCSI status (SAM-5 §5.3.1).
    pub status: u8,
    /// Sense data, if any.
    pub sense: Option<Bytes>,
    /// Data for the initiator.
    pub data_in: Bytes,
    /// For a write: the bytes the command wanted, when known (gives the residual).
    pub data_out_needed: Option<u32>,
}

/// A task management function waiting for the transport's part, answered with
/// [`Session::carry_out_task_management`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskManagementRequest {
    /// Its task tag.
    pub itt: Itt,
    /// The function (see [`tmf`]).
    pub function: u8,
    /// The logical unit it names.
    pub lun: Lun,
    /// The task ABORT TASK names.
    pub referenced_task_tag: Itt,
}

/// The reset a task management function asks the device for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetKind {
    /// LOGICAL UNIT RESET.
    LogicalUnit(Lun),
    /// TARGET WARM RESET.
    TargetWarm,
    /// TARGET COLD RESET: the transport ends the target's sessions once the response is
    /// sent ([`Event::EndTargetSessions`]).
    TargetCold,
}

/// Why the connection must close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The initiator broke a rule that ErrorRecoveryLevel 0 recovers from only by
    /// ending the connection (a Reject was queued first).
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// A data digest failed on a PDU other than in-sequence Data-Out (RFC 7143 §7.8).
    #[error("data digest error")]
    DataDigest,
    /// Logout completed (the Logout Response was queued first).
    #[error("logged out")]
    LoggedOut,
    /// No PDU arrived within the NOP timeout after a ping.
    #[error("no answer to NOP-In")]
    NopTimeout,
    /// Writes waited for data past the Data-Out timeout.
    #[error("no Data-Out for the writes waiting for data")]
    DataOutTimeout,
}

/// Work for the transport, from [`Session::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A SCSI command passed the window and transport checks and needs
    /// `buffer_bytes` of data buffer: answer [`Session::admit_command`] or
    /// [`Session::refuse_command`] (TASK SET FULL). `writes_waiting` says the session
    /// holds writes whose data only this connection can deliver, so waiting for buffers
    /// here could deadlock.
    AdmitCommand {
        /// The command.
        itt: Itt,
        /// Its expected data transfer length.
        buffer_bytes: u32,
        /// Whether writes of this session wait for Data-Out.
        writes_waiting: bool,
    },
    /// A command with all its data, to execute.
    Execute(Command),
    /// A task management function: the transport says whether the logical unit exists
    /// with [`Session::carry_out_task_management`].
    TaskManagement(TaskManagementRequest),
    /// An admitted task left the session without a response (aborted while its data
    /// was arriving): what the transport holds for it (its buffer's share of a budget)
    /// may go. Admitted tasks otherwise end with a [`Transmit::ends_task`], or with
    /// [`Session::complete_command`] returning `false`.
    TaskDropped {
        /// The task.
        itt: Itt,
    },
    /// Tasks of this session running on these logical units were aborted: the device
    /// should let them end early (their responses will be dropped).
    AbortInDevice {
        /// The logical units.
        luns: Vec<Lun>,
    },
    /// A reset aborts every initiator's tasks in the device: on `lun`, or on every
    /// logical unit if `None`.
    AbortAllNexuses {
        /// The logical unit, or all.
        lun: Option<Lun>,
    },
    /// The device is to carry out a reset; answer [`Session::reset_done`].
    Reset {
        /// The task management function's tag.
        itt: Itt,
        /// Which reset.
        kind: ResetKind,
    },
    /// After a TARGET COLD RESET's response: every session of the target ends
    /// (RFC 7143 §11.5.1).
    EndTargetSessions,
    /// A Text Request asks for SendTargets (RFC 7143 Appendix C); answer
    /// [`Session::answer_send_targets`].
    SendTargets {
        /// The request's tag.
        itt: Itt,
        /// The key's value (`All`, a target name, or empty).
        value: String,
    },
    /// The connection must close once what is queued has been sent.
    Close(CloseReason),
}

/// What the framing layer found wrong with a PDU it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FramingError {
    /// The opcode is not one RFC 7143 defines (its data segment was read and dropped).
    #[error("unknown opcode")]
    UnknownOpcode,
    /// The data segment is longer than the MaxRecvDataSegmentLength the target declared.
    #[error("data segment longer than MaxRecvDataSegmentLength")]
    SegmentTooLong,
    /// The data digest did not match.
    #[error("data digest mismatch")]
    DataDigest,
}

/// Misuse of the session's API by the transport (never caused by the network).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No task with this tag is in the state the call needs.
    #[error("no task {0} in the state this call needs")]
    NoSuchTask(Itt),
    /// The session waits for nothing with this tag.
    #[error("nothing waits for an answer for {0}")]
    NotWaiting(Itt),
}

/// Counts of what happened, for the transport's statistics; see
/// [`Session::take_counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Reject PDUs queued.
    pub rejects: u64,
    /// Immediate commands rejected for being too many.
    pub immediate_rejects: u64,
    /// Data digest errors.
    pub digest_errors: u64,
    /// Tasks aborted by task management or at the session's end.
    pub aborted_tasks: u64,
    /// Target resets refused.
    pub target_resets_refused: u64,
    /// Connections dropped by the Data-Out timeout.
    pub data_out_timeouts: u64,
}

/// The full-feature phase of one connection.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    window: Window,
    stat_sn: StatSn,
    tasks: HashMap<Itt, Task>,
    transmit: VecDeque<Outgoing>,
    events: VecDeque<Event>,
    wait: Option<Wait>,
    deferred: VecDeque<(Bhs, Pdu)>,
    next_ttt: u32,
    text_continuation: Option<(Ttt, Bytes)>,
    keepalive: Keepalive,
    /// Since when writes have waited for data without progress; `None` while none waits.
    data_wait_since: Option<Instant>,
    counters: Counters,
    closed: bool,
}

impl Session {
    /// The full-feature phase starting at `now`.
    pub fn new(config: SessionConfig, now: Instant) -> Session {
        Session {
            window: Window::new(config.exp_cmd_sn, config.queue_depth),
            stat_sn: config.stat_sn,
            config,
            tasks: HashMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            wait: None,
            deferred: VecDeque::new(),
            next_ttt: 1,
            text_continuation: None,
            keepalive: Keepalive {
                last_rx: now,
                ping_sent_at: None,
                ttt: 0x4000_0000,
            },
            data_wait_since: None,
            counters: Counters::default(),
            closed: false,
        }
    }

    /// Handles a PDU from the initiator. Its header is re-encoded for a Reject; a
    /// transport that has the received header uses [`Session::handle_received`].
    pub fn handle_pdu(&mut self, now: Instant, pdu: Pdu) {
        let bhs = pdu.encode_header();
        self.handle_received(now, bhs, pdu);
    }

    /// Handles a PDU decoded from `bhs` (carried in a Reject as received).
    ///
    /// A SCSI Command's immediate data that is only the start of the write's data may
    /// come in a buffer with capacity for the whole expected data transfer length (read
    /// into a `BytesMut`, then frozen): the session then grows that buffer in place into
    /// the write buffer instead of copying the immediate data into a new one.
    pub fn handle_received(&mut self, now: Instant, bhs: Bhs, pdu: Pdu) {
        if self.closed {
            return;
        }
        self.keepalive.heard(now);
        if self.wait.is_some() {
            if self.deferred.len() >= DEFERRED_PDUS_MAX {
                self.protocol_error(&bhs, "PDUs handed in while the session waits");
            } else {
                self.deferred.push_back((bhs, pdu));
            }
            return;
        }
        self.dispatch(now, bhs, pdu);
        self.after_input(now);
    }

    /// Handles a PDU the framing layer could not deliver whole.
    pub fn handle_framing_error(&mut self, now: Instant, bhs: &Bhs, error: FramingError) {
        if self.closed {
            return;
        }
        self.keepalive.heard(now);
        match error {
            FramingError::UnknownOpcode => self.reject(reject::COMMAND_NOT_SUPPORTED, bhs),
            FramingError::SegmentTooLong => {
                self.protocol_error(bhs, "data segment longer than MaxRecvDataSegmentLength")
            }
            FramingError::DataDigest => {
                // An in-sequence Data-Out costs its task (RFC 7143 §7.8); anything else
                // the connection.
                if let Some(chunk) = self.lend_data_out_buffer(bhs) {
                    return self.handle_lent_data_out(now, bhs, chunk, false);
                }
                self.data_digest_error(bhs);
            }
        }
        self.after_input(now);
    }

    /// Lends the transport the place of the Data-Out PDU `bhs`'s data segment in its
    /// task's buffer, if the PDU is the next of its sequence: the transport reads the
    /// data straight into it (no copy) and gives it back with
    /// [`Session::handle_lent_data_out`] before it hands in anything else. `None`: read
    /// the data as usual and hand the whole PDU to [`Session::handle_received`].
    pub fn lend_data_out_buffer(&mut self, bhs: &Bhs) -> Option<BytesMut> {
        if self.closed || self.wait.is_some() || bhs.opcode() != Ok(crate::pdu::Opcode::DataOut) {
            return None;
        }
        let d = DataOut::parse(bhs);
        let Some(Task::Receiving(task)) = self.tasks.get_mut(&Itt(d.itt)) else {
            return None;
        };
        let range = task.in_sequence(&d, bhs.data_len())?;
        if task.lent_rest.is_some() || range.end > task.buf.len() {
            return None;
        }
        let mut chunk = task.buf.split_off(range.start);
        task.lent_rest = Some(chunk.split_off(range.len()));
        Some(chunk)
    }

    /// Takes back the buffer of [`Session::lend_data_out_buffer`], now holding the
    /// Data-Out's data; `digest_ok` says whether its data digest matched.
    pub fn handle_lent_data_out(
        &mut self,
        now: Instant,
        bhs: &Bhs,
        mut chunk: BytesMut,
        digest_ok: bool,
    ) {
        let d = DataOut::parse(bhs);
        if let Some(Task::Receiving(task)) = self.tasks.get_mut(&Itt(d.itt)) {
            if let Some(rest) = task.lent_rest.take() {
                debug_assert_eq!(
                    chunk.len(),
                    bhs.data_len(),
                    "the lent buffer came back resized"
                );
                // Contiguous with both neighbours: put back without a copy.
                chunk.unsplit(rest);
                task.buf.unsplit(chunk);
            }
        }
        if self.closed {
            return;
        }
        self.keepalive.heard(now);
        let len = bhs.data_len();
        self.data_out(now, bhs, d, len, Payload::Placed { digest_ok });
        self.after_input(now);
    }

    /// PDUs queued and not yet taken by [`Session::poll_transmit`]: a transport stops
    /// reading while too many wait, so an initiator that does not read what it asked
    /// for cannot make the queue grow.
    pub fn pending_transmit(&self) -> usize {
        self.transmit.len()
    }

    /// Admits the command [`Event::AdmitCommand`] announced: its buffer is reserved.
    pub fn admit_command(&mut self, now: Instant, itt: Itt) -> Result<(), SessionError> {
        if self.wait != Some(Wait::Admission(itt)) {
            return Err(SessionError::NotWaiting(itt));
        }
        let Some(Task::Admitting(a)) = self.tasks.remove(&itt) else {
            return Err(SessionError::NoSuchTask(itt));
        };
        self.wait = None;
        let Admitting { cmd, data, arrived } = a;
        let edtl = cmd.expected_data_transfer_length;
        if !(cmd.write && edtl > 0) {
            self.execute(cmd, Bytes::new(), arrived);
        } else if data.len() == edtl as usize {
            self.execute(cmd, data, arrived);
        } else {
            let dlen = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let buf = write_buffer(data, edtl as usize);
            let p = &self.config.params;
            let first_burst = p.first_burst_length.min(edtl);
            // RFC 7143 §13.10/§13.11: with InitialR2T=No the initiator may send up to
            // FirstBurstLength unsolicited (immediate data included) unless F says none
            // follows.
            let unsolicited_end = if cmd.final_bit || p.initial_r2t {
                dlen
            } else {
                first_burst.max(dlen)
            };
            let unsolicited = (unsolicited_end > dlen).then_some(DataSequence {
                next_offset: dlen,
                next_data_sn: DataSn(0),
                end: unsolicited_end,
            });
            let mut task = WriteTask {
                cmd,
                buf,
                received: dlen,
                unsolicited,
                r2ts: HashMap::new(),
                next_r2t_offset: unsolicited_end,
                r2t_sn: DataSn(0),
                failed: false,
                arrived,
                lent_rest: None,
            };
            let r2ts = self.issue_r2ts(&mut task);
            self.tasks.insert(itt, Task::Receiving(task));
            self.transmit.extend(r2ts);
        }
        self.resume(now);
        Ok(())
    }

    /// Refuses the command [`Event::AdmitCommand`] announced with TASK SET FULL (SAM-5
    /// §5.3.1): the initiator retries it later.
    pub fn refuse_command(&mut self, now: Instant, itt: Itt) -> Result<(), SessionError> {
        if self.wait != Some(Wait::Admission(itt)) {
            return Err(SessionError::NotWaiting(itt));
        }
        let Some(Task::Admitting(a)) = self.tasks.remove(&itt) else {
            return Err(SessionError::NoSuchTask(itt));
        };
        self.wait = None;
        self.task_set_full(&a.cmd);
        self.resume(now);
        Ok(())
    }

    /// A command from [`Event::Execute`] completed. Returns whether a response was
    /// queued (`false`: the task was aborted meanwhile and its response is dropped).
    pub fn complete_command(
        &mut self,
        now: Instant,
        itt: Itt,
        result: CommandResult,
    ) -> Result<bool, SessionError> {
        let e = match self.tasks.remove(&itt) {
            Some(Task::Executing(e)) => e,
            Some(other) => {
                self.tasks.insert(itt, other);
                return Err(SessionError::NoSuchTask(itt));
            }
            None => return Err(SessionError::NoSuchTask(itt)),
        };
        self.window.task_ended(e.cmd.immediate);
        let sent = !e.aborted && !self.closed;
        if sent {
            let mut pdus = response::build(&e.cmd, result, &self.config.params);
            if let Some(last) = pdus.last_mut() {
                last.ends_task = Some(itt);
            }
            self.transmit.extend(pdus);
        }
        self.check_wait(now);
        Ok(sent)
    }

    /// Carries out the task management function [`Event::TaskManagement`] announced;
    /// `lun_exists` says whether its logical unit exists (RFC 7143 §11.6.1).
    pub fn carry_out_task_management(
        &mut self,
        now: Instant,
        itt: Itt,
        lun_exists: bool,
    ) -> Result<(), SessionError> {
        let Some(Wait::TaskManagement(tm)) = &self.wait else {
            return Err(SessionError::NotWaiting(itt));
        };
        if tm.req.itt != itt || tm.stage != TmfStage::Decision {
            return Err(SessionError::NotWaiting(itt));
        }
        let req = tm.req;
        let deadline = now + self.config.task_wait_max;
        let next = match req.function {
            tmf::ABORT_TASK => {
                let rtt = req.referenced_task_tag;
                if self.abort_where(|t, _| t == rtt) > 0 {
                    TmfStage::Idle {
                        of: Some(rtt),
                        deadline,
                        then_reset: None,
                    }
                } else {
                    TmfStage::Respond(tmf::RESP_NO_TASK)
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET if lun_exists => {
                self.abort_where(|_, l| l == req.lun);
                TmfStage::Idle {
                    of: None,
                    deadline,
                    then_reset: None,
                }
            }
            tmf::LOGICAL_UNIT_RESET if lun_exists => {
                self.abort_where(|_, l| l == req.lun);
                self.events
                    .push_back(Event::AbortAllNexuses { lun: Some(req.lun) });
                TmfStage::Idle {
                    of: None,
                    deadline,
                    then_reset: Some(ResetKind::LogicalUnit(req.lun)),
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => {
                TmfStage::Respond(tmf::RESP_NO_LUN)
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET
                if !self.config.target_reset_allowed =>
            {
                self.counters.target_resets_refused += 1;
                TmfStage::Respond(tmf::RESP_AUTH_FAILED)
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.abort_where(|_, _| true);
                self.events.push_back(Event::AbortAllNexuses { lun: None });
                let kind = if req.function == tmf::TARGET_COLD_RESET {
                    ResetKind::TargetCold
                } else {
                    ResetKind::TargetWarm
                };
                TmfStage::Idle {
                    of: None,
                    deadline,
                    then_reset: Some(kind),
                }
            }
            tmf::TASK_REASSIGN => TmfStage::Respond(tmf::RESP_REASSIGN_UNSUPPORTED),
            _ => TmfStage::Respond(tmf::RESP_NOT_SUPPORTED),
        };
        if let Some(Wait::TaskManagement(tm)) = &mut self.wait {
            tm.stage = next;
        }
        self.check_wait(now);
        Ok(())
    }

    /// The device finished the reset of [`Event::Reset`].
    pub fn reset_done(&mut self, now: Instant, itt: Itt) -> Result<(), SessionError> {
        match &mut self.wait {
            Some(Wait::TaskManagement(tm)) if tm.req.itt == itt => {
                let TmfStage::Reset { idle, kind } = tm.stage else {
                    return Err(SessionError::NotWaiting(itt));
                };
                tm.stage = TmfStage::Respond(complete_or_rejected(idle));
                tm.cold = kind == ResetKind::TargetCold;
            }
            _ => return Err(SessionError::NotWaiting(itt)),
        }
        self.check_wait(now);
        Ok(())
    }

    /// Answers the SendTargets query of [`Event::SendTargets`] with `pairs` (TargetName
    /// and TargetAddress keys).
    pub fn answer_send_targets(
        &mut self,
        now: Instant,
        itt: Itt,
        pairs: TextPairs,
    ) -> Result<(), SessionError> {
        let Some(Wait::Text(pending)) = &self.wait else {
            return Err(SessionError::NotWaiting(itt));
        };
        if pending.header.itt != itt.0 {
            return Err(SessionError::NotWaiting(itt));
        }
        let Some(Wait::Text(pending)) = self.wait.take() else {
            return Err(SessionError::NotWaiting(itt));
        };
        let mut out = TextPairs::default();
        for (k, _) in &pending.pairs.0 {
            if k == "SendTargets" {
                out.0.extend(pairs.0.iter().cloned());
            } else {
                out.push(k.clone(), "NotUnderstood");
            }
        }
        self.text_response(&pending.header, Bytes::from(out.encode()));
        self.resume(now);
        Ok(())
    }

    /// Asks the initiator to log out within 2 seconds (Async Message, AsyncEvent 1,
    /// RFC 7143 §11.9.1): the target moves or shuts down.
    pub fn request_logout(&mut self) {
        if self.closed {
            return;
        }
        let msg = AsyncMessage {
            event: 1,
            parameters: [0, 0, 2],
            ..Default::default()
        };
        self.transmit
            .push_back(Outgoing::new(msg.to_bhs(), Bytes::new(), Stamp::Advance));
    }

    /// The transport waited for its own resources (buffers, execution slots) and read
    /// nothing meanwhile: that time is not the initiator's, so the keepalive and the
    /// Data-Out timeout start over.
    pub fn note_local_stall(&mut self, now: Instant) {
        self.keepalive.heard(now);
        if self.data_wait_since.is_some() {
            self.data_wait_since = Some(now);
        }
    }

    /// Aborts every task (the session ends): data still arriving is dropped, running
    /// commands lose their response. Returns how many.
    pub fn abort_all(&mut self) -> usize {
        self.abort_where(|_, _| true)
    }

    /// Aborts this session's commands running on `lun` (PERSISTENT RESERVE OUT with
    /// PREEMPT AND ABORT, SPC-4 §5.13.11.2.4, executed by another nexus); returns how
    /// many. The device side is the caller's.
    pub fn abort_running_on(&mut self, lun: Lun) -> usize {
        let mut n = 0;
        for t in self.tasks.values_mut() {
            if let Task::Executing(e) = t {
                if Lun::from_field(e.cmd.lun) == lun && !e.aborted {
                    e.aborted = true;
                    n += 1;
                }
            }
        }
        n
    }

    /// The next PDU to send, its StatSN, ExpCmdSN and MaxCmdSN filled in now
    /// (RFC 7143 §4.2.2.2: StatSN advances with each status-bearing PDU).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let mut out = self.transmit.pop_front()?;
        let (exp, max) = self.window.announce();
        let seq = crate::pdu::StatusSeq {
            stat_sn: self.stat_sn.0,
            exp_cmd_sn: exp.0,
            max_cmd_sn: max.0,
        };
        seq.write(&mut out.bhs);
        if out.stamp == Stamp::Advance {
            self.stat_sn = self.stat_sn.next();
        }
        Some(Transmit {
            bhs: out.bhs,
            data: out.data,
            ends_task: out.ends_task,
        })
    }

    /// The next piece of work for the transport.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether [`Session::poll_event`] has something, without taking it.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// When [`Session::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let keepalive = match self.keepalive.ping_sent_at {
            Some(sent) => sent + self.config.nop_timeout,
            None => self.keepalive.last_rx + self.config.nop_interval,
        };
        let data_out = self
            .data_wait_since
            .map(|since| since + self.config.data_out_timeout);
        let wait = match &self.wait {
            Some(Wait::TaskManagement(TmfRequestState {
                stage: TmfStage::Idle { deadline, .. },
                ..
            }))
            | Some(Wait::Logout(PendingLogout { deadline, .. })) => Some(*deadline),
            _ => None,
        };
        [Some(keepalive), data_out, wait]
            .into_iter()
            .flatten()
            .min()
    }

    /// Time passed: pings, the NOP and Data-Out timeouts, and waits for commands that do
    /// not leave the device.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if let Some(since) = self.data_wait_since {
            if now.saturating_duration_since(since) >= self.config.data_out_timeout {
                self.counters.data_out_timeouts += 1;
                self.close(CloseReason::DataOutTimeout);
                return;
            }
        }
        let k = &mut self.keepalive;
        match k.ping_sent_at {
            Some(sent) if k.last_rx <= sent => {
                if now.saturating_duration_since(sent) >= self.config.nop_timeout {
                    self.close(CloseReason::NopTimeout);
                    return;
                }
            }
            _ => {
                k.ping_sent_at = None;
                if now.saturating_duration_since(k.last_rx) >= self.config.nop_interval {
                    k.ttt = k.ttt.wrapping_add(1) | 0x4000_0000;
                    let nop = Nop {
                        itt: RESERVED_TAG,
                        ttt: k.ttt,
                        ..Default::default()
                    };
                    k.ping_sent_at = Some(now);
                    self.transmit.push_back(Outgoing::new(
                        nop.to_nop_in(),
                        Bytes::new(),
                        Stamp::Peek,
                    ));
                }
            }
        }
        self.check_wait(now);
    }

    /// Whether the session takes the next PDU now (false while it waits for the
    /// transport or for commands to leave the device, and once closed).
    pub fn wants_input(&self) -> bool {
        !self.closed && self.wait.is_none()
    }

    /// Whether the connection is to close (see [`Event::Close`]).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Commands handed to the SCSI layer and not yet completed.
    pub fn executing_count(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| matches!(t, Task::Executing(_)))
            .count()
    }

    /// Whether writes wait for Data-Out.
    pub fn writes_waiting(&self) -> bool {
        self.tasks.values().any(|t| matches!(t, Task::Receiving(_)))
    }

    /// ExpCmdSN and the MaxCmdSN last announced.
    pub fn command_window(&self) -> (CmdSn, CmdSn) {
        (self.window.exp, self.window.max)
    }

    /// The counters since the last call.
    pub fn take_counters(&mut self) -> Counters {
        std::mem::take(&mut self.counters)
    }
}

/// The write buffer of a command, `edtl` bytes, starting with its immediate data. When
/// the transport read the immediate data into a buffer with room for the whole write
/// (see [`Session::handle_received`]), that buffer is used as it is: the immediate data
/// is not copied.
/// An empty buffer with room for `len` bytes that starts on a 4096-byte boundary, for
/// a write's data: a store that writes large writes with `O_DIRECT` takes it as it is,
/// where an unaligned buffer cost a copy into an aligned one (issue 20).
pub fn block_aligned_buffer(len: usize) -> BytesMut {
    const ALIGN: usize = 4096;
    let mut buf = BytesMut::with_capacity(len + ALIGN);
    let pad = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
    buf.resize(pad, 0);
    let _ = buf.split_to(pad);
    debug_assert!(buf.capacity() >= len);
    buf
}

fn write_buffer(immediate: Bytes, edtl: usize) -> BytesMut {
    match immediate.try_into_mut() {
        Ok(mut buf) if buf.capacity() >= edtl => {
            buf.resize(edtl, 0);
            buf
        }
        other => {
            let data = match &other {
                Ok(b) => &b[..],
                Err(b) => &b[..],
            };
            let mut buf = block_aligned_buffer(edtl);
            buf.extend_from_slice(data.get(..edtl).unwrap_or(data));
            buf.resize(edtl, 0);
            buf
        }
    }
}
