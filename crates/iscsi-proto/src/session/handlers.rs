//! How the session handles each PDU, and the waits between them.

use std::time::Instant;

use bytes::Bytes;

use crate::login::SessionType;
use crate::pdu::{
    reject, Bhs, DataOut, LogoutRequest, LogoutResponse, Lun, Nop, Pdu, R2t, Reject, ScsiCommand,
    TaskMgmtRequest, TaskMgmtResponse, Text, RESERVED_TAG,
};
use crate::text::TextPairs;

use super::response;
use super::state::*;
use super::{
    CloseReason, CmdSn, Command, CommandResult, DataSn, Event, Itt, Session, TaskManagementRequest,
    Ttt,
};

impl Session {
    pub(super) fn dispatch(&mut self, now: Instant, bhs: Bhs, pdu: Pdu) {
        let discovery = self.config.params.session_type == SessionType::Discovery;
        match pdu {
            Pdu::ScsiCommand(cmd, data) if !discovery => self.scsi_command(now, &bhs, cmd, data),
            Pdu::DataOut(d, data) if !discovery => {
                let len = data.len();
                self.data_out(now, &bhs, d, len, Payload::Bytes(data));
            }
            Pdu::TaskMgmtRequest(req) if !discovery => self.task_management(&req),
            Pdu::NopOut(nop, data) => self.nop_out(&nop, data),
            Pdu::TextRequest(req, data) => self.text(&bhs, req, data),
            Pdu::LogoutRequest(req) => self.logout(now, req),
            Pdu::LoginRequest(..) => {
                self.protocol_error(&bhs, "Login Request in full feature phase")
            }
            // SNACK needs ErrorRecoveryLevel > 0, which is never negotiated; other
            // opcodes are the target's own, or SCSI PDUs in a discovery session.
            _ => self.reject(reject::PROTOCOL_ERROR, &bhs),
        }
    }

    /// After each input: the Data-Out clock runs while writes wait for data.
    pub(super) fn after_input(&mut self, now: Instant) {
        if !self.writes_waiting() {
            self.data_wait_since = None;
        } else if self.data_wait_since.is_none() {
            self.data_wait_since = Some(now);
        }
    }

    /// A wait ended: handles the PDUs kept meanwhile.
    pub(super) fn resume(&mut self, now: Instant) {
        while self.wait.is_none() && !self.closed {
            let Some((bhs, pdu)) = self.deferred.pop_front() else {
                break;
            };
            self.dispatch(now, bhs, pdu);
        }
        self.after_input(now);
    }

    pub(super) fn close(&mut self, reason: CloseReason) {
        if !self.closed {
            self.closed = true;
            self.events.push_back(Event::Close(reason));
        }
    }

    pub(super) fn reject(&mut self, reason: u8, bhs: &Bhs) {
        self.counters.rejects += 1;
        let r = Reject {
            reason,
            ..Default::default()
        };
        self.transmit.push_back(Outgoing::new(
            r.to_bhs(),
            Bytes::copy_from_slice(&bhs.0),
            Stamp::Advance,
        ));
    }

    /// Rejects with a protocol error and ends the connection (ErrorRecoveryLevel 0
    /// recovers by session reinstatement).
    pub(super) fn protocol_error(&mut self, bhs: &Bhs, what: &'static str) {
        self.reject(reject::PROTOCOL_ERROR, bhs);
        self.close(CloseReason::ProtocolError(what));
    }

    pub(super) fn data_digest_error(&mut self, bhs: &Bhs) {
        self.counters.digest_errors += 1;
        self.reject(reject::DATA_DIGEST_ERROR, bhs);
        self.close(CloseReason::DataDigest);
    }

    pub(super) fn respond_check_condition(&mut self, cmd: &ScsiCommand, sense: Bytes) {
        let result = CommandResult {
            status: response::STATUS_CHECK_CONDITION,
            sense: Some(sense),
            ..Default::default()
        };
        self.transmit
            .extend(response::build(cmd, result, &self.config.params));
        self.window.task_ended(cmd.immediate);
    }

    pub(super) fn task_set_full(&mut self, cmd: &ScsiCommand) {
        let result = CommandResult {
            status: response::STATUS_TASK_SET_FULL,
            ..Default::default()
        };
        self.transmit
            .extend(response::build(cmd, result, &self.config.params));
        self.window.task_ended(cmd.immediate);
    }

    pub(super) fn scsi_command(&mut self, now: Instant, bhs: &Bhs, cmd: ScsiCommand, data: Bytes) {
        if !self.window.accept(CmdSn(cmd.cmd_sn), cmd.immediate) {
            return;
        }
        if cmd.immediate && self.window.immediate_in_flight >= self.config.immediate_commands_max {
            self.counters.immediate_rejects += 1;
            return self.reject(reject::IMMEDIATE_COMMAND_REJECT, bhs);
        }
        let dlen = data.len();
        let edtl = cmd.expected_data_transfer_length;
        // RFC 7143 §11.3.6, §13.11: immediate data only with W, when ImmediateData=Yes, and no
        // more than the expected data transfer length.
        if dlen > 0
            && (!cmd.write || !self.config.params.immediate_data || dlen as u64 > u64::from(edtl))
        {
            self.window.task_started(cmd.immediate);
            self.respond_check_condition(&cmd, response::sense_invalid_field_in_cdb());
            return self.reject(reject::PROTOCOL_ERROR, bhs);
        }
        let itt = Itt(cmd.itt);
        if self.tasks.contains_key(&itt) {
            return self.reject(reject::TASK_IN_PROGRESS, bhs);
        }
        self.window.task_started(cmd.immediate);
        let write = cmd.write && edtl > 0;
        if write && edtl > self.config.write_bytes_max {
            return self.respond_check_condition(&cmd, response::sense_invalid_field_in_cdb());
        }
        // Bound the memory one session can pin with writes whose data has not arrived
        // (queue depth × the largest write would be gigabytes).
        let pending: u64 = self
            .tasks
            .values()
            .map(|t| match t {
                Task::Receiving(w) => u64::from(w.cmd.expected_data_transfer_length),
                _ => 0,
            })
            .sum();
        if write && pending + u64::from(edtl) > self.config.pending_write_bytes_max {
            return self.task_set_full(&cmd);
        }
        let writes_waiting = self.writes_waiting();
        self.tasks.insert(
            itt,
            Task::Admitting(Admitting {
                cmd,
                data,
                arrived: now,
            }),
        );
        self.wait = Some(Wait::Admission(itt));
        self.events.push_back(Event::AdmitCommand {
            itt,
            buffer_bytes: edtl,
            writes_waiting,
        });
    }

    pub(super) fn execute(&mut self, cmd: ScsiCommand, data_out: Bytes, arrived: Instant) {
        let itt = Itt(cmd.itt);
        self.tasks.insert(
            itt,
            Task::Executing(Executing {
                cmd: cmd.clone(),
                aborted: false,
            }),
        );
        self.events.push_back(Event::Execute(Command {
            itt,
            lun: Lun::from_field(cmd.lun),
            header: cmd,
            data_out,
            arrived,
        }));
    }

    pub(super) fn next_ttt(&mut self) -> Ttt {
        let ttt = Ttt(self.next_ttt);
        self.next_ttt = match self.next_ttt.wrapping_add(1) {
            0 | RESERVED_TAG => 1,
            t => t,
        };
        ttt
    }

    /// R2Ts for the not yet solicited part of a write, up to MaxOutstandingR2T at once,
    /// each at most MaxBurstLength (RFC 7143 §11.8, §13.17).
    pub(super) fn issue_r2ts(&mut self, task: &mut WriteTask) -> Vec<Outgoing> {
        let edtl = task.cmd.expected_data_transfer_length;
        let mut out = Vec::new();
        while task.next_r2t_offset < edtl
            && (task.r2ts.len() as u32) < self.config.params.max_outstanding_r2t
        {
            let len = (edtl - task.next_r2t_offset).min(self.config.params.max_burst_length);
            let ttt = self.next_ttt();
            let r2t = R2t {
                lun: task.cmd.lun,
                itt: task.cmd.itt,
                ttt: ttt.0,
                r2t_sn: task.r2t_sn.0,
                buffer_offset: task.next_r2t_offset,
                desired_data_transfer_length: len,
                ..Default::default()
            };
            task.r2ts.insert(
                ttt,
                DataSequence {
                    next_offset: task.next_r2t_offset,
                    next_data_sn: DataSn(0),
                    end: task.next_r2t_offset + len,
                },
            );
            task.r2t_sn = task.r2t_sn.next();
            task.next_r2t_offset += len;
            out.push(Outgoing::new(r2t.to_bhs(), Bytes::new(), Stamp::Peek));
        }
        out
    }

    pub(super) fn data_out(
        &mut self,
        now: Instant,
        bhs: &Bhs,
        d: DataOut,
        len: usize,
        payload: Payload,
    ) {
        let itt = Itt(d.itt);
        let Some(Task::Receiving(task)) = self.tasks.get_mut(&itt) else {
            // Data for a task no longer held (aborted, or failed by an earlier sequence
            // error): dropped.
            return;
        };
        let Some(range) = task.in_sequence(&d, len) else {
            // RFC 7143 §7.8: an out-of-order DataSN implies a lost PDU; without recovery
            // R2Ts (ErrorRecoveryLevel 0) the task ends with CHECK CONDITION "protocol
            // service CRC error" once the initiator has sent the rest of the sequence.
            return self.fail_write_on_final(itt, d.final_bit);
        };
        match payload {
            Payload::Placed { digest_ok: false } => {
                self.counters.digest_errors += 1;
                self.reject(reject::DATA_DIGEST_ERROR, bhs);
                return self.fail_write_on_final(itt, d.final_bit);
            }
            Payload::Placed { digest_ok: true } => {}
            Payload::Bytes(data) => {
                if let Some(dst) = task.buf.get_mut(range) {
                    dst.copy_from_slice(&data);
                }
            }
        }
        let Some(seq) = task.sequence(d.ttt) else {
            return;
        };
        seq.next_data_sn = seq.next_data_sn.next();
        // `in_sequence` checked that the end fits in the sequence, so in u32.
        seq.next_offset += len as u32;
        let seq_done = seq.next_offset == seq.end;
        if len > 0 {
            self.data_wait_since = Some(now);
        }
        if d.final_bit && !seq_done {
            return self.fail_write_on_final(itt, true);
        }
        task.received += len as u32;
        let mut r2ts = Vec::new();
        if seq_done {
            if d.ttt == RESERVED_TAG {
                task.unsolicited = None;
            } else {
                task.r2ts.remove(&Ttt(d.ttt));
                if let Some(Task::Receiving(mut t)) = self.tasks.remove(&itt) {
                    r2ts = self.issue_r2ts(&mut t);
                    self.tasks.insert(itt, Task::Receiving(t));
                }
            }
        }
        let (complete, failed_and_over) = match self.tasks.get(&itt) {
            Some(Task::Receiving(t)) => {
                let all_in = t.received == t.cmd.expected_data_transfer_length;
                (all_in && !t.failed, t.failed && (d.final_bit || all_in))
            }
            _ => (false, false),
        };
        if complete {
            if let Some(Task::Receiving(t)) = self.tasks.remove(&itt) {
                self.execute(t.cmd, t.buf.freeze(), t.arrived);
            }
        }
        // A task failed earlier in its data ends when a sequence of it ends or all its
        // data is in, rather than waiting for a data PDU that will never come.
        if failed_and_over {
            return self.fail_write_on_final(itt, true);
        }
        self.transmit.extend(r2ts);
    }

    /// Marks a write as failed by a data sequence or digest error; once the initiator
    /// ends the sequence (F bit) the task completes with ABORTED COMMAND.
    pub(super) fn fail_write_on_final(&mut self, itt: Itt, final_bit: bool) {
        if let Some(Task::Receiving(t)) = self.tasks.get_mut(&itt) {
            t.failed = true;
        }
        if !final_bit {
            return;
        }
        if let Some(Task::Receiving(t)) = self.tasks.remove(&itt) {
            self.respond_check_condition(&t.cmd, response::sense_protocol_service_crc_error());
            if let Some(last) = self.transmit.back_mut() {
                last.ends_task = Some(itt);
            }
        }
    }

    /// Aborts the tasks matching `pred(itt, lun)`: data still arriving is dropped,
    /// running commands lose their response. Returns how many.
    pub(super) fn abort_where(&mut self, pred: impl Fn(Itt, Lun) -> bool) -> usize {
        let doomed: Vec<Itt> = self
            .tasks
            .iter()
            .filter_map(|(itt, t)| match t {
                Task::Receiving(w) if pred(*itt, Lun::from_field(w.cmd.lun)) => Some(*itt),
                _ => None,
            })
            .collect();
        let mut n = 0;
        for itt in doomed {
            if let Some(Task::Receiving(t)) = self.tasks.remove(&itt) {
                self.window.task_ended(t.cmd.immediate);
                self.events.push_back(Event::TaskDropped { itt });
                n += 1;
            }
        }
        let mut luns = Vec::new();
        for (itt, t) in self.tasks.iter_mut() {
            if let Task::Executing(e) = t {
                let lun = Lun::from_field(e.cmd.lun);
                if pred(*itt, lun) && !e.aborted {
                    e.aborted = true;
                    luns.push(lun);
                    n += 1;
                }
            }
        }
        // A command blocked on a background operation of its logical unit must return
        // now, or the task management response would wait for the whole operation.
        luns.sort_unstable();
        luns.dedup();
        if !luns.is_empty() {
            self.events.push_back(Event::AbortInDevice { luns });
        }
        self.counters.aborted_tasks += n as u64;
        n
    }

    pub(super) fn task_management(&mut self, req: &TaskMgmtRequest) {
        if !self.window.accept(CmdSn(req.cmd_sn), req.immediate) {
            return;
        }
        let req = TaskManagementRequest {
            itt: Itt(req.itt),
            function: req.function,
            lun: Lun::from_field(req.lun),
            referenced_task_tag: Itt(req.referenced_task_tag),
        };
        self.wait = Some(Wait::TaskManagement(TmfRequestState {
            req,
            stage: TmfStage::Decision,
            cold: false,
        }));
        self.events.push_back(Event::TaskManagement(req));
    }

    /// Moves a wait on when what it waits for happened or its deadline passed.
    pub(super) fn check_wait(&mut self, now: Instant) {
        loop {
            let executing_empty = self.executing_count() == 0;
            match &mut self.wait {
                Some(Wait::TaskManagement(tm)) => match tm.stage {
                    TmfStage::Idle {
                        of,
                        deadline,
                        then_reset,
                    } => {
                        let gone = match of {
                            Some(itt) => !matches!(self.tasks.get(&itt), Some(Task::Executing(_))),
                            None => executing_empty,
                        };
                        if !gone && now < deadline {
                            return;
                        }
                        tm.stage = match then_reset {
                            Some(kind) => {
                                let itt = tm.req.itt;
                                self.events.push_back(Event::Reset { itt, kind });
                                TmfStage::Reset { idle: gone, kind }
                            }
                            None => TmfStage::Respond(complete_or_rejected(gone)),
                        };
                    }
                    TmfStage::Respond(response) => {
                        let (itt, cold) = (tm.req.itt, tm.cold);
                        self.wait = None;
                        let resp = TaskMgmtResponse {
                            response,
                            itt: itt.0,
                            ..Default::default()
                        };
                        self.transmit.push_back(Outgoing::new(
                            resp.to_bhs(),
                            Bytes::new(),
                            Stamp::Advance,
                        ));
                        if cold {
                            self.events.push_back(Event::EndTargetSessions);
                        }
                        return self.resume(now);
                    }
                    TmfStage::Decision | TmfStage::Reset { .. } => return,
                },
                Some(Wait::Logout(l)) => {
                    if !executing_empty && now < l.deadline {
                        return;
                    }
                    let req = l.req.clone();
                    self.wait = None;
                    self.logout_respond(&req, if executing_empty { 0 } else { 3 });
                    return self.resume(now);
                }
                Some(Wait::Admission(_)) | Some(Wait::Text(_)) | None => return,
            }
        }
    }

    pub(super) fn nop_out(&mut self, nop: &Nop, data: Bytes) {
        if nop.itt == RESERVED_TAG {
            // An answer to a ping (or a ping that wants no answer).
            return;
        }
        // A NOP-Out's CmdSN travels in the StatSN slot of the shared layout.
        if !self.window.accept(CmdSn(nop.seq.stat_sn), nop.immediate) {
            return;
        }
        let max_ping = (self.config.params.max_xmit_data_segment_length as usize).min(data.len());
        let reply = Nop {
            itt: nop.itt,
            ttt: RESERVED_TAG,
            lun: nop.lun,
            ..Default::default()
        };
        self.transmit.push_back(Outgoing::new(
            reply.to_nop_in(),
            data.slice(..max_ping),
            Stamp::Advance,
        ));
    }

    pub(super) fn text(&mut self, bhs: &Bhs, req: Text, data: Bytes) {
        if !self.window.accept(CmdSn(req.seq.stat_sn), req.immediate) {
            return;
        }
        if req.ttt != RESERVED_TAG {
            // The initiator asks for the rest of a long response (RFC 7143 §11.10.4).
            match self.text_continuation.take() {
                Some((ttt, rest)) if ttt.0 == req.ttt => self.text_response(&req, rest),
                _ => self.reject(reject::INVALID_PDU_FIELD, bhs),
            }
            return;
        }
        let Ok(pairs) = TextPairs::parse(&data) else {
            return self.reject(reject::PROTOCOL_ERROR, bhs);
        };
        if let Some(value) = pairs.get("SendTargets").map(str::to_string) {
            self.events.push_back(Event::SendTargets {
                itt: Itt(req.itt),
                value,
            });
            self.wait = Some(Wait::Text(PendingText { header: req, pairs }));
            return;
        }
        let mut out = TextPairs::default();
        for (k, _) in &pairs.0 {
            out.push(k.clone(), "NotUnderstood");
        }
        self.text_response(&req, Bytes::from(out.encode()));
    }

    /// A Text Response carrying `body`, or as much of it as one PDU may carry with a
    /// TTT to ask for the rest (RFC 7143 §11.11.2, §11.11.4).
    pub(super) fn text_response(&mut self, req: &Text, body: Bytes) {
        let max = self.config.params.max_xmit_data_segment_length as usize;
        let (chunk, rest) = if body.len() > max {
            (body.slice(..max), Some(body.slice(max..)))
        } else {
            (body, None)
        };
        let ttt = match rest {
            Some(rest) => {
                let ttt = self.next_ttt();
                self.text_continuation = Some((ttt, rest));
                ttt
            }
            None => Ttt(RESERVED_TAG),
        };
        let resp = Text {
            final_bit: ttt.0 == RESERVED_TAG,
            continue_bit: ttt.0 != RESERVED_TAG,
            lun: req.lun,
            itt: req.itt,
            ttt: ttt.0,
            ..Default::default()
        };
        self.transmit
            .push_back(Outgoing::new(resp.to_bhs(false), chunk, Stamp::Advance));
    }

    pub(super) fn logout(&mut self, now: Instant, req: LogoutRequest) {
        if !self.window.accept(CmdSn(req.cmd_sn), req.immediate) {
            return;
        }
        let response = match req.reason {
            0 => 0,
            1 if self.config.cid.is_none_or(|c| c == req.cid) => 0,
            1 => 1,
            // Connection recovery needs ErrorRecoveryLevel 2.
            _ => 2,
        };
        if response != 0 {
            return self.logout_respond(&req, response);
        }
        // Commands in flight finish before the session goes (RFC 7143 §11.14); if they
        // cannot, the answer is "cleanup failed" rather than a pretence they are gone.
        let receiving: Vec<Itt> = self
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t, Task::Receiving(_)))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in receiving {
            if let Some(Task::Receiving(t)) = self.tasks.remove(&itt) {
                self.window.task_ended(t.cmd.immediate);
                self.events.push_back(Event::TaskDropped { itt });
            }
        }
        self.wait = Some(Wait::Logout(PendingLogout {
            req,
            deadline: now + self.config.task_wait_max,
        }));
        self.check_wait(now);
    }

    pub(super) fn logout_respond(&mut self, req: &LogoutRequest, response: u8) {
        let resp = LogoutResponse {
            response,
            itt: req.itt,
            ..Default::default()
        };
        self.transmit
            .push_back(Outgoing::new(resp.to_bhs(), Bytes::new(), Stamp::Advance));
        if response == 0 {
            self.close(CloseReason::LoggedOut);
        }
    }
}
