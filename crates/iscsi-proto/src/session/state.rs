//! The session's inner state: queued PDUs, the CmdSN window, the keepalive, tasks and
//! what the session waits for.

use std::collections::HashMap;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::pdu::{tmf, Bhs, DataOut, LogoutRequest, ScsiCommand, Text, RESERVED_TAG};
use crate::text::TextPairs;

use super::{CmdSn, DataSn, Itt, ResetKind, TaskManagementRequest, Ttt};

/// How a queued PDU's StatSN is filled in when it leaves (RFC 7143 §4.2.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stamp {
    /// Carries StatSN and advances it (responses).
    Advance,
    /// Carries the next StatSN without advancing (R2T, unsolicited NOP-In, Data-In
    /// without status).
    Peek,
}

#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) bhs: Bhs,
    pub(super) data: Bytes,
    pub(super) stamp: Stamp,
    pub(super) ends_task: Option<Itt>,
}

impl Outgoing {
    pub(super) fn new(mut bhs: Bhs, data: Bytes, stamp: Stamp) -> Outgoing {
        bhs.set_data_len(data.len());
        Outgoing {
            bhs,
            data,
            stamp,
            ends_task: None,
        }
    }
}

/// The CmdSN window (RFC 7143 §4.2.2.1).
#[derive(Debug)]
pub(super) struct Window {
    pub(super) exp: CmdSn,
    /// Highest MaxCmdSN announced so far; commands up to it must be accepted.
    pub(super) max: CmdSn,
    /// Non-immediate commands received and not yet answered.
    pub(super) in_flight: u32,
    /// Immediate SCSI commands received and not yet answered (outside the window).
    pub(super) immediate_in_flight: u32,
    pub(super) queue_depth: u32,
}

impl Window {
    pub(super) fn new(exp: CmdSn, queue_depth: u32) -> Window {
        let queue_depth = queue_depth.max(1);
        Window {
            exp,
            max: CmdSn(exp.0.wrapping_add(queue_depth - 1)),
            in_flight: 0,
            immediate_in_flight: 0,
            queue_depth,
        }
    }

    /// Checks a CmdSN and advances ExpCmdSN. Immediate PDUs are not checked (RFC 7143
    /// §4.2.2.1: "the CmdSN of an immediate command ... is not advanced"). A CmdSN
    /// outside `[ExpCmdSN, MaxCmdSN]` is silently ignored: "the target MUST silently
    /// ignore any non-immediate command outside of this range". One connection delivers
    /// in order, so a gap means the initiator skipped numbers; it is accepted rather
    /// than stalling the session, and what arrives below ExpCmdSN afterwards is ignored,
    /// so commands are still delivered in CmdSN order.
    pub(super) fn accept(&mut self, sn: CmdSn, immediate: bool) -> bool {
        if immediate {
            return true;
        }
        if !sn.serial().in_window(self.exp.serial(), self.max.serial()) {
            return false;
        }
        self.exp = sn.next();
        true
    }

    pub(super) fn task_started(&mut self, immediate: bool) {
        *self.counter(immediate) += 1;
    }

    pub(super) fn task_ended(&mut self, immediate: bool) {
        let c = self.counter(immediate);
        debug_assert!(*c > 0, "task ended that never started");
        *c = c.saturating_sub(1);
    }

    pub(super) fn counter(&mut self, immediate: bool) -> &mut u32 {
        if immediate {
            &mut self.immediate_in_flight
        } else {
            &mut self.in_flight
        }
    }

    /// ExpCmdSN and the MaxCmdSN to announce now: room for `queue_depth` commands
    /// outstanding; MaxCmdSN never moves backwards (RFC 7143 §4.2.2.1).
    pub(super) fn announce(&mut self) -> (CmdSn, CmdSn) {
        let busy = self.in_flight.min(self.queue_depth);
        let want = CmdSn(
            self.exp
                .0
                .wrapping_add(self.queue_depth - busy)
                .wrapping_sub(1),
        );
        if want.serial().gt(self.max.serial()) {
            self.max = want;
        }
        (self.exp, self.max)
    }
}

#[derive(Debug)]
pub(super) struct Keepalive {
    pub(super) last_rx: Instant,
    pub(super) ping_sent_at: Option<Instant>,
    pub(super) ttt: u32,
}

impl Keepalive {
    pub(super) fn heard(&mut self, now: Instant) {
        if now > self.last_rx {
            self.last_rx = now;
        }
    }
}

/// One sequence of Data-Out PDUs: the unsolicited burst or the answer to one R2T.
#[derive(Debug)]
pub(super) struct DataSequence {
    pub(super) next_offset: u32,
    pub(super) next_data_sn: DataSn,
    pub(super) end: u32,
}

#[derive(Debug)]
pub(super) enum Task {
    /// Waits for [`Session::admit_command`].
    Admitting(Admitting),
    /// A write whose data is still arriving.
    Receiving(WriteTask),
    /// Handed to the SCSI layer.
    Executing(Executing),
}

#[derive(Debug)]
pub(super) struct Admitting {
    pub(super) cmd: ScsiCommand,
    pub(super) data: Bytes,
    pub(super) arrived: Instant,
}

#[derive(Debug)]
pub(super) struct WriteTask {
    pub(super) cmd: ScsiCommand,
    pub(super) buf: BytesMut,
    pub(super) received: u32,
    pub(super) unsolicited: Option<DataSequence>,
    pub(super) r2ts: HashMap<Ttt, DataSequence>,
    pub(super) next_r2t_offset: u32,
    pub(super) r2t_sn: DataSn,
    /// A data sequence or digest error happened; the task fails at the end of its data.
    pub(super) failed: bool,
    pub(super) arrived: Instant,
    /// While the transport holds the middle of `buf` (see
    /// [`super::Session::lend_data_out_buffer`]): the part after it.
    pub(super) lent_rest: Option<BytesMut>,
}

impl WriteTask {
    pub(super) fn sequence(&mut self, ttt: u32) -> Option<&mut DataSequence> {
        if ttt == RESERVED_TAG {
            self.unsolicited.as_mut()
        } else {
            self.r2ts.get_mut(&Ttt(ttt))
        }
    }

    /// The buffer range of a Data-Out if it is the next PDU of its sequence (RFC 7143
    /// §7.8: DataSN and BufferOffset must follow on; at ErrorRecoveryLevel 0 anything
    /// else is a lost PDU).
    pub(super) fn in_sequence(
        &mut self,
        d: &DataOut,
        len: usize,
    ) -> Option<std::ops::Range<usize>> {
        let seq = self.sequence(d.ttt)?;
        let end = u64::from(d.buffer_offset) + len as u64;
        let ok = d.data_sn == seq.next_data_sn.0
            && d.buffer_offset == seq.next_offset
            && end <= u64::from(seq.end);
        ok.then_some(d.buffer_offset as usize..end as usize)
    }
}

#[derive(Debug)]
pub(super) struct Executing {
    pub(super) cmd: ScsiCommand,
    pub(super) aborted: bool,
}

pub(super) enum Payload {
    Bytes(Bytes),
    Placed { digest_ok: bool },
}

/// What the session waits for before it takes the next PDU.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wait {
    Admission(Itt),
    TaskManagement(TmfRequestState),
    Text(PendingText),
    Logout(PendingLogout),
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct TmfRequestState {
    pub(super) req: TaskManagementRequest,
    pub(super) stage: TmfStage,
    pub(super) cold: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TmfStage {
    /// Waits for [`Session::carry_out_task_management`].
    Decision,
    /// Waits until the task `of` (or every command of the session) left the device.
    Idle {
        of: Option<Itt>,
        deadline: Instant,
        then_reset: Option<ResetKind>,
    },
    /// Waits for [`Session::reset_done`].
    Reset { idle: bool, kind: ResetKind },
    /// Ready to answer.
    Respond(u8),
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct PendingText {
    pub(super) header: Text,
    pub(super) pairs: TextPairs,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct PendingLogout {
    pub(super) req: LogoutRequest,
    pub(super) deadline: Instant,
}

/// "Function complete" promises the aborted tasks no longer exist (SAM-5 §7.1); when a
/// command is still inside the device after the wait, the function is rejected instead
/// so the initiator does not retry over a write that may still land.
pub(super) fn complete_or_rejected(tasks_gone: bool) -> u8 {
    if tasks_gone {
        tmf::RESP_COMPLETE
    } else {
        tmf::RESP_REJECTED
    }
}
