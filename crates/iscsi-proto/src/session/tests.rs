//! An in-memory initiator/target pair in virtual time: PDUs travel as wire bytes (with
//! digests when negotiated) between a small test initiator built from `pdu.rs` and a
//! [`Session`] whose SCSI layer is a RAM disk. No sockets, no sleeps.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::login::SessionType;
use crate::pdu::{
    decode_wire, reject, tmf, DataIn, LogoutRequest, R2t, ScsiResponse, StatusSeq, TaskMgmtRequest,
    Text, WireError,
};
use crate::serial::SerialNumber;

const BLOCK: usize = 512;
const DISK_BYTES: usize = 4 << 20;
const WRITE10: u8 = 0x2a;
const READ10: u8 = 0x28;

fn params() -> SessionParams {
    SessionParams {
        initiator_name: "iqn.2026-01.test:ini".into(),
        target_name: Some("iqn.2026-01.test:tgt".into()),
        max_recv_data_segment_length: 8192,
        max_xmit_data_segment_length: 8192,
        max_burst_length: 16384,
        first_burst_length: 16384,
        max_outstanding_r2t: 1,
        initial_r2t: true,
        immediate_data: false,
        ..SessionParams::default()
    }
}

fn config(p: SessionParams) -> SessionConfig {
    let mut c = SessionConfig::new(p, CmdSn(100), StatSn(7000));
    c.queue_depth = 8;
    c.nop_interval = Duration::from_secs(5);
    c.nop_timeout = Duration::from_secs(15);
    c.data_out_timeout = Duration::from_secs(20);
    c.task_wait_max = Duration::from_secs(30);
    c
}

fn cdb(op: u8, lba: u32, blocks: u16) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

/// The initiator's side: numbering and PDU building.
struct Initiator {
    cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    /// What arrived, in order.
    received: Vec<Pdu>,
}

impl Initiator {
    fn itt(&mut self) -> u32 {
        self.next_itt += 1;
        self.next_itt
    }

    fn take_sn(&mut self, immediate: bool) -> u32 {
        let sn = self.cmd_sn;
        if !immediate {
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
        }
        sn
    }

    fn command(
        &mut self,
        op: u8,
        lba: u32,
        len: usize,
        immediate_data: Bytes,
        final_bit: bool,
    ) -> (u32, Pdu) {
        let itt = self.itt();
        let write = op == WRITE10;
        let c = ScsiCommand {
            immediate: false,
            final_bit,
            read: !write,
            write,
            attr: crate::pdu::attr::SIMPLE,
            lun: Lun(0).to_field(),
            itt,
            expected_data_transfer_length: len as u32,
            cmd_sn: self.take_sn(false),
            exp_stat_sn: self.exp_stat_sn,
            cdb: cdb(op, lba, (len / BLOCK) as u16),
        };
        (itt, Pdu::ScsiCommand(c, immediate_data))
    }

    fn data_out(
        &self,
        itt: u32,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        data: Bytes,
        final_bit: bool,
    ) -> Pdu {
        Pdu::DataOut(
            DataOut {
                final_bit,
                lun: Lun(0).to_field(),
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: offset,
            },
            data,
        )
    }

    fn tmf(&mut self, function: u8, lun: u64, rtt: u32) -> (u32, Pdu) {
        let itt = self.itt();
        let req = TaskMgmtRequest {
            immediate: true,
            function,
            lun: Lun(lun).to_field(),
            itt,
            referenced_task_tag: rtt,
            cmd_sn: self.take_sn(true),
            exp_stat_sn: self.exp_stat_sn,
            ..Default::default()
        };
        (itt, Pdu::TaskMgmtRequest(req))
    }

    fn nop_out(&mut self, data: Bytes) -> (u32, Pdu) {
        let itt = self.itt();
        let nop = Nop {
            immediate: true,
            itt,
            ttt: RESERVED_TAG,
            seq: StatusSeq {
                stat_sn: self.take_sn(true),
                exp_cmd_sn: self.exp_stat_sn,
                max_cmd_sn: 0,
            },
            ..Default::default()
        };
        (itt, Pdu::NopOut(nop, data))
    }

    fn text(&mut self, ttt: u32, body: &[u8]) -> (u32, Pdu) {
        let itt = self.itt();
        let t = Text {
            immediate: true,
            final_bit: true,
            itt,
            ttt,
            seq: StatusSeq {
                stat_sn: self.take_sn(true),
                exp_cmd_sn: self.exp_stat_sn,
                max_cmd_sn: 0,
            },
            ..Default::default()
        };
        (itt, Pdu::TextRequest(t, Bytes::copy_from_slice(body)))
    }

    fn logout(&mut self, reason: u8) -> (u32, Pdu) {
        let itt = self.itt();
        let l = LogoutRequest {
            immediate: true,
            reason,
            itt,
            cid: 0,
            cmd_sn: self.take_sn(true),
            exp_stat_sn: self.exp_stat_sn,
        };
        (itt, Pdu::LogoutRequest(l))
    }

    fn r2ts(&self, itt: u32) -> Vec<R2t> {
        self.received
            .iter()
            .filter_map(|p| match p {
                Pdu::R2t(r) if r.itt == itt => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn status_of(&self, itt: u32) -> Option<(u8, Bytes)> {
        self.received.iter().find_map(|p| match p {
            Pdu::ScsiResponse(r, sense) if r.itt == itt => Some((r.status, sense.clone())),
            Pdu::DataIn(d, _) if d.itt == itt && d.status_present => Some((d.status, Bytes::new())),
            _ => None,
        })
    }

    fn data_in(&self, itt: u32) -> Vec<(DataIn, Bytes)> {
        self.received
            .iter()
            .filter_map(|p| match p {
                Pdu::DataIn(d, b) if d.itt == itt => Some((d.clone(), b.clone())),
                _ => None,
            })
            .collect()
    }

    fn tmf_response(&self, itt: u32) -> Option<u8> {
        self.received.iter().find_map(|p| match p {
            Pdu::TaskMgmtResponse(r) if r.itt == itt => Some(r.response),
            _ => None,
        })
    }

    fn rejects(&self) -> Vec<u8> {
        self.received
            .iter()
            .filter_map(|p| match p {
                Pdu::Reject(r, _) => Some(r.reason),
                _ => None,
            })
            .collect()
    }

    fn last_seq(&self) -> Option<StatusSeq> {
        self.received.iter().rev().find_map(seq_of)
    }
}

fn seq_of(p: &Pdu) -> Option<StatusSeq> {
    Some(match p {
        Pdu::ScsiResponse(h, _) => h.seq,
        Pdu::DataIn(h, _) => h.seq,
        Pdu::R2t(h) => h.seq,
        Pdu::NopIn(h, _) => h.seq,
        Pdu::TextResponse(h, _) => h.seq,
        Pdu::TaskMgmtResponse(h) => h.seq,
        Pdu::LogoutResponse(h) => h.seq,
        Pdu::AsyncMessage(h, _) => h.seq,
        Pdu::Reject(h, _) => h.seq,
        _ => return None,
    })
}

/// Whether a target PDU carries status, and so advances StatSN (RFC 7143 §4.2.2.2).
fn advances_stat_sn(p: &Pdu) -> bool {
    match p {
        Pdu::DataIn(h, _) => h.status_present,
        Pdu::R2t(_) => false,
        Pdu::NopIn(h, _) => h.itt != RESERVED_TAG,
        _ => true,
    }
}

/// The pair: a session, its RAM disk and the initiator, joined by byte queues.
struct Pair {
    t: Session,
    i: Initiator,
    now: Instant,
    digests: (bool, bool),
    to_target: VecDeque<Vec<u8>>,
    disk: Vec<u8>,
    auto_admit: bool,
    auto_execute: bool,
    /// Commands executing (when not completed at once).
    executing: Vec<Command>,
    /// Every event not handled by the pair itself.
    events: Vec<Event>,
    /// StatSN the initiator expects next.
    expected_stat_sn: u32,
    /// Highest MaxCmdSN seen.
    max_cmd_sn: Option<u32>,
    /// Tasks whose last response PDU went out ([`Transmit::ends_task`]).
    ended_tasks: Vec<Itt>,
}

impl Pair {
    fn new(c: SessionConfig) -> Pair {
        let now = Instant::now();
        let digests = (c.params.header_digest, c.params.data_digest);
        Pair {
            i: Initiator {
                cmd_sn: c.exp_cmd_sn.0,
                exp_stat_sn: c.stat_sn.0,
                next_itt: 0x10,
                received: Vec::new(),
            },
            expected_stat_sn: c.stat_sn.0,
            t: Session::new(c, now),
            now,
            digests,
            to_target: VecDeque::new(),
            disk: vec![0; DISK_BYTES],
            auto_admit: true,
            auto_execute: true,
            executing: Vec::new(),
            events: Vec::new(),
            max_cmd_sn: None,
            ended_tasks: Vec::new(),
        }
    }

    fn send(&mut self, p: Pdu) {
        self.to_target
            .push_back(p.to_wire(self.digests.0, self.digests.1));
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        if let Some(t) = self.t.poll_timeout() {
            if t <= self.now {
                self.t.handle_timeout(self.now);
            }
        }
        self.drive();
    }

    /// Runs the pair until nothing moves.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            while self.t.wants_input() {
                let Some(bytes) = self.to_target.pop_front() else {
                    break;
                };
                moved = true;
                self.deliver(&bytes);
            }
            while let Some(e) = self.t.poll_event() {
                moved = true;
                self.on_event(e);
            }
            while let Some(out) = self.t.poll_transmit() {
                moved = true;
                self.receive(out);
            }
            if !moved {
                break;
            }
        }
    }

    fn deliver(&mut self, bytes: &[u8]) {
        let (hd, dd) = self.digests;
        match decode_wire(bytes, hd, dd) {
            Ok((pdu, used)) => {
                assert_eq!(used, bytes.len());
                let bhs = Bhs::from_slice(bytes).expect("a whole header");
                self.t.handle_received(self.now, bhs, pdu);
            }
            Err(WireError::DataDigest) => {
                let bhs = Bhs::from_slice(bytes).expect("a whole header");
                self.t
                    .handle_framing_error(self.now, &bhs, FramingError::DataDigest);
            }
            Err(e) => panic!("test sent a broken PDU: {e}"),
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::AdmitCommand { itt, .. } if self.auto_admit => {
                self.t
                    .admit_command(self.now, itt)
                    .expect("admission awaited");
            }
            Event::Execute(cmd) if self.auto_execute => {
                let r = self.execute(&cmd);
                self.t
                    .complete_command(self.now, cmd.itt, r)
                    .expect("command executing");
            }
            Event::Execute(cmd) => self.executing.push(cmd),
            other => self.events.push(other),
        }
    }

    /// The RAM disk: READ(10) and WRITE(10) of 512-byte blocks.
    fn execute(&mut self, cmd: &Command) -> CommandResult {
        let c = &cmd.header.cdb;
        let lba = u32::from_be_bytes([c[2], c[3], c[4], c[5]]) as usize;
        let len = usize::from(u16::from_be_bytes([c[7], c[8]])) * BLOCK;
        let range = lba * BLOCK..lba * BLOCK + len;
        match c[0] {
            WRITE10 => {
                assert_eq!(cmd.data_out.len(), len, "write data of the expected length");
                self.disk[range].copy_from_slice(&cmd.data_out);
                CommandResult::default()
            }
            READ10 => CommandResult {
                data_in: Bytes::copy_from_slice(&self.disk[range]),
                ..Default::default()
            },
            _ => CommandResult {
                status: response::STATUS_CHECK_CONDITION,
                sense: Some(response::sense_invalid_field_in_cdb()),
                ..Default::default()
            },
        }
    }

    fn complete_held(&mut self, itt: u32) -> bool {
        let pos = self
            .executing
            .iter()
            .position(|c| c.itt == Itt(itt))
            .expect("command held");
        let cmd = self.executing.remove(pos);
        let r = self.execute(&cmd);
        let sent = self
            .t
            .complete_command(self.now, cmd.itt, r)
            .expect("executing");
        self.drive();
        sent
    }

    /// The initiator receives a PDU: checks the sequence numbers every PDU carries.
    fn receive(&mut self, out: Transmit) {
        self.ended_tasks.extend(out.ends_task);
        let (hd, dd) = self.digests;
        let wire = {
            let mut w = out.bhs.0.to_vec();
            let pdu = Pdu::decode(&out.bhs, out.data.clone()).expect("target PDU decodes");
            assert_eq!(w.len(), crate::pdu::BHS_LEN);
            w = pdu.to_wire(hd, dd);
            w
        };
        let (pdu, _) = decode_wire(&wire, hd, dd).expect("target PDU on the wire");
        let seq = seq_of(&pdu).expect("target PDUs carry sequence numbers");
        assert_eq!(seq.stat_sn, self.expected_stat_sn, "StatSN of {pdu:?}");
        if advances_stat_sn(&pdu) {
            self.expected_stat_sn = self.expected_stat_sn.wrapping_add(1);
            self.i.exp_stat_sn = self.expected_stat_sn;
        }
        if let Some(prev) = self.max_cmd_sn {
            assert!(
                SerialNumber(prev).le(SerialNumber(seq.max_cmd_sn)),
                "MaxCmdSN went backwards: {prev} then {}",
                seq.max_cmd_sn
            );
        }
        self.max_cmd_sn = Some(seq.max_cmd_sn);
        self.i.received.push(pdu);
    }

    /// Sends the data one R2T asks for, in PDUs of MaxRecvDataSegmentLength.
    fn answer_r2t(&mut self, r: &R2t, data: &Bytes) {
        let seg = 8192u32;
        let mut off = r.buffer_offset;
        let end = r.buffer_offset + r.desired_data_transfer_length;
        let mut sn = 0;
        while off < end {
            let len = seg.min(end - off);
            let p = self.i.data_out(
                r.itt,
                r.ttt,
                sn,
                off,
                data.slice(off as usize..(off + len) as usize),
                off + len == end,
            );
            self.send(p);
            off += len;
            sn += 1;
        }
    }

    /// Answers every R2T of `itt` whose TTT is not in `answered`, until no new one comes.
    fn serve_r2ts_except(&mut self, itt: u32, data: &Bytes, answered: &[u32]) {
        let mut answered = answered.to_vec();
        for _ in 0..1000 {
            self.drive();
            let fresh: Vec<R2t> = self
                .i
                .r2ts(itt)
                .into_iter()
                .filter(|r| !answered.contains(&r.ttt))
                .collect();
            if fresh.is_empty() {
                return;
            }
            for r in &fresh {
                self.answer_r2t(r, data);
                answered.push(r.ttt);
            }
        }
        panic!("R2Ts never ended");
    }

    fn serve_r2ts(&mut self, itt: u32, data: &Bytes) {
        self.serve_r2ts_except(itt, data, &[]);
    }

    fn closed_with(&self) -> Option<CloseReason> {
        self.events.iter().find_map(|e| match e {
            Event::Close(r) => Some(*r),
            _ => None,
        })
    }
}

fn write_and_check(p: &mut Pair, lba: u32, data: &Bytes, immediate: usize, final_bit: bool) -> u32 {
    let (itt, cmd) =
        p.i.command(WRITE10, lba, data.len(), data.slice(..immediate), final_bit);
    p.send(cmd);
    p.drive();
    itt
}

fn read_back(p: &mut Pair, lba: u32, len: usize) -> Bytes {
    let (itt, cmd) = p.i.command(READ10, lba, len, Bytes::new(), true);
    p.send(cmd);
    p.drive();
    assert_eq!(p.i.status_of(itt).map(|s| s.0), Some(response::STATUS_GOOD));
    let mut out = Vec::new();
    for (d, b) in p.i.data_in(itt) {
        assert_eq!(
            d.buffer_offset as usize,
            out.len(),
            "Data-In in offset order"
        );
        out.extend_from_slice(&b);
    }
    Bytes::from(out)
}

// ---- R2T and Data-Out ---------------------------------------------------------------

#[test]
fn write_solicited_by_r2ts_one_at_a_time() {
    let mut p = Pair::new(config(params()));
    let data = pattern(40 * 1024, 1);
    let itt = write_and_check(&mut p, 8, &data, 0, true);
    let first = p.i.r2ts(itt);
    assert_eq!(first.len(), 1, "MaxOutstandingR2T=1");
    assert_eq!(
        (
            first[0].buffer_offset,
            first[0].desired_data_transfer_length
        ),
        (0, 16384)
    );
    p.serve_r2ts(itt, &data);
    let r2ts = p.i.r2ts(itt);
    let shape: Vec<(u32, u32, u32)> = r2ts
        .iter()
        .map(|r| (r.r2t_sn, r.buffer_offset, r.desired_data_transfer_length))
        .collect();
    assert_eq!(
        shape,
        vec![(0, 0, 16384), (1, 16384, 16384), (2, 32768, 8192)]
    );
    assert_eq!(p.i.status_of(itt).map(|s| s.0), Some(response::STATUS_GOOD));
    assert_eq!(
        p.ended_tasks,
        vec![Itt(itt)],
        "the status PDU ends the task"
    );
    assert_eq!(read_back(&mut p, 8, data.len()), data);
}

#[test]
fn several_outstanding_r2ts() {
    let mut c = params();
    c.max_outstanding_r2t = 4;
    let mut p = Pair::new(config(c));
    let data = pattern(160 * 1024, 2);
    let itt = write_and_check(&mut p, 0, &data, 0, true);
    let r2ts = p.i.r2ts(itt);
    assert_eq!(r2ts.len(), 4, "four R2Ts at once");
    let mut ttts: Vec<u32> = r2ts.iter().map(|r| r.ttt).collect();
    ttts.sort_unstable();
    ttts.dedup();
    assert_eq!(ttts.len(), 4, "each R2T has its own TTT");
    assert!(r2ts.iter().all(|r| r.ttt != RESERVED_TAG));
    // Answer the last R2T first: sequences may complete in any order.
    p.answer_r2t(&r2ts[3], &data);
    p.drive();
    assert_eq!(
        p.i.r2ts(itt).len(),
        5,
        "a finished sequence frees a place for the next R2T"
    );
    p.serve_r2ts_except(itt, &data, &[r2ts[3].ttt]);
    let all = p.i.r2ts(itt);
    assert_eq!(all.len(), 10);
    assert_eq!(
        all.iter().map(|r| r.r2t_sn).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(p.i.status_of(itt).map(|s| s.0), Some(response::STATUS_GOOD));
    assert_eq!(read_back(&mut p, 0, data.len()), data);
}

#[test]
fn immediate_and_unsolicited_data_then_r2t() {
    let mut c = params();
    c.initial_r2t = false;
    c.immediate_data = true;
    c.first_burst_length = 32768;
    let mut p = Pair::new(config(c));
    let data = pattern(64 * 1024, 3);
    let itt = write_and_check(&mut p, 16, &data, 8192, false);
    // The part past FirstBurstLength is solicited at once, beside the unsolicited burst.
    let r2ts = p.i.r2ts(itt);
    assert_eq!(r2ts.len(), 1);
    assert_eq!(
        (r2ts[0].buffer_offset, r2ts[0].desired_data_transfer_length),
        (32768, 16384)
    );
    // The rest of the first burst, unsolicited (TTT 0xffffffff).
    for (k, off) in [8192u32, 16384, 24576].into_iter().enumerate() {
        let d = p.i.data_out(
            itt,
            RESERVED_TAG,
            k as u32,
            off,
            data.slice(off as usize..off as usize + 8192),
            off == 24576,
        );
        p.send(d);
    }
    p.drive();
    assert_eq!(
        p.i.status_of(itt),
        None,
        "the solicited part is still missing"
    );
    p.serve_r2ts(itt, &data);
    assert_eq!(p.i.r2ts(itt).len(), 2);
    assert_eq!(p.i.status_of(itt).map(|s| s.0), Some(response::STATUS_GOOD));
    assert_eq!(read_back(&mut p, 16, data.len()), data);
}

#[test]
fn a_write_carried_whole_as_immediate_data_runs_at_once() {
    let mut c = params();
    c.immediate_data = true;
    let mut p = Pair::new(config(c));
    p.auto_execute = false;
    let data = pattern(4096, 4);
    let itt = write_and_check(&mut p, 1, &data, 4096, true);
    assert!(p.i.r2ts(itt).is_empty());
    assert_eq!(p.executing.len(), 1);
    assert_eq!(
        p.executing[0].data_out, data,
        "the immediate data as it came"
    );
    assert!(p.complete_held(itt));
    assert_eq!(p.i.status_of(itt).map(|s| s.0), Some(response::STATUS_GOOD));
}

#[test]
fn initial_r2t_yes_solicits_everything_after_immediate_data() {
    let mut c = params();
    c.immediate_data = true;
    let mut p = Pair::new(config(c));
    let data = pattern(20 * 1024, 5);
    let itt = write_and_check(&mut p, 2, &data, 4096, true);
    let r2ts = p.i.r2ts(itt);
    assert_eq!(
        (r2ts[0].buffer_offset, r2ts[0].desired_data_transfer_length),
        (4096, 16384)
    );
    p.serve_r2ts(itt, &data);
    assert_eq!(read_back(&mut p, 2, data.len()), data);
}

fn sequence_error(mutate: impl Fn(&mut DataOut)) -> (Pair, u32) {
    let mut p = Pair::new(config(params()));
    let data = pattern(16384, 6);
    let itt = write_and_check(&mut p, 0, &data, 0, true);
    let r = p.i.r2ts(itt).remove(0);
    let Pdu::DataOut(mut first, d0) = p.i.data_out(itt, r.ttt, 0, 0, data.slice(..8192), false)
    else {
        unreachable!()
    };
    mutate(&mut first);
    p.send(Pdu::DataOut(first, d0));
    p.drive();
    assert_eq!(
        p.i.status_of(itt),
        None,
        "the task waits for the end of the sequence"
    );
    let last = p.i.data_out(itt, r.ttt, 1, 8192, data.slice(8192..), true);
    p.send(last);
    p.drive();
    (p, itt)
}

fn assert_crc_error(p: &Pair, itt: u32) {
    let (status, sense) = p.i.status_of(itt).expect("status");
    assert_eq!(status, response::STATUS_CHECK_CONDITION);
    assert_eq!(&sense[..2], &[0, 18], "SenseLength");
    assert_eq!(
        (sense[2 + 2], sense[2 + 12], sense[2 + 13]),
        (0x0b, 0x47, 0x05)
    );
    assert!(!p.t.writes_waiting(), "the failed task is gone");
    assert_eq!(p.ended_tasks, vec![Itt(itt)], "its resources may go");
}

#[test]
fn data_sn_error_fails_the_task_at_the_end_of_its_sequence() {
    let (p, itt) = sequence_error(|d| d.data_sn = 5);
    assert_crc_error(&p, itt);
}

#[test]
fn buffer_offset_error_fails_the_task() {
    let (p, itt) = sequence_error(|d| d.buffer_offset = 512);
    assert_crc_error(&p, itt);
}

#[test]
fn data_out_with_an_unknown_ttt_fails_the_task() {
    let (p, itt) = sequence_error(|d| d.ttt = 0x7777);
    assert_crc_error(&p, itt);
}

#[test]
fn final_bit_before_the_end_of_the_sequence_fails_the_task() {
    let mut p = Pair::new(config(params()));
    let data = pattern(16384, 7);
    let itt = write_and_check(&mut p, 0, &data, 0, true);
    let r = p.i.r2ts(itt).remove(0);
    let d = p.i.data_out(itt, r.ttt, 0, 0, data.slice(..8192), true);
    p.send(d);
    p.drive();
    assert_crc_error(&p, itt);
}

#[test]
fn data_out_for_no_task_is_dropped() {
    let mut p = Pair::new(config(params()));
    let d = p.i.data_out(0x999, 5, 0, 0, pattern(512, 0), true);
    p.send(d);
    p.drive();
    assert!(p.i.received.is_empty());
    assert!(!p.t.is_closed());
}

// ---- digests --------------------------------------------------------------------------

#[test]
fn data_digest_error_on_data_out_rejects_it_and_fails_the_task() {
    let mut c = params();
    c.header_digest = true;
    c.data_digest = true;
    let mut p = Pair::new(config(c));
    let data = pattern(16384, 8);
    let itt = write_and_check(&mut p, 0, &data, 0, true);
    let r = p.i.r2ts(itt).remove(0);
    let d0 = p.i.data_out(itt, r.ttt, 0, 0, data.slice(..8192), false);
    let mut wire = d0.to_wire(true, true);
    let n = wire.len();
    wire[n - 1] ^= 0xff; // the data digest
    p.to_target.push_back(wire);
    p.drive();
    assert_eq!(p.i.rejects(), vec![reject::DATA_DIGEST_ERROR]);
    assert!(
        !p.t.is_closed(),
        "a Data-Out digest error costs the task, not the connection"
    );
    let d1 = p.i.data_out(itt, r.ttt, 1, 8192, data.slice(8192..), true);
    p.send(d1);
    p.drive();
    assert_crc_error(&p, itt);
    assert_eq!(p.t.take_counters().digest_errors, 1);
}

#[test]
fn data_digest_error_elsewhere_ends_the_connection() {
    let mut c = params();
    c.data_digest = true;
    let mut p = Pair::new(config(c));
    let (_, nop) = p.i.nop_out(pattern(64, 1));
    let mut wire = nop.to_wire(false, true);
    let n = wire.len();
    wire[n - 2] ^= 1;
    p.to_target.push_back(wire);
    p.drive();
    assert_eq!(p.i.rejects(), vec![reject::DATA_DIGEST_ERROR]);
    assert_eq!(p.closed_with(), Some(CloseReason::DataDigest));
}

#[test]
fn placed_data_out_lands_in_the_task_buffer() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    let data = pattern(16384, 9);
    let itt = write_and_check(&mut p, 0, &data, 0, true);
    let r = p.i.r2ts(itt).remove(0);
    for (sn, off) in [(0u32, 0u32), (1, 8192)] {
        let pdu = p.i.data_out(
            itt,
            r.ttt,
            sn,
            off,
            data.slice(off as usize..off as usize + 8192),
            sn == 1,
        );
        let bhs = pdu.encode_header();
        let mut chunk = p.t.lend_data_out_buffer(&bhs).expect("in sequence");
        assert!(
            p.t.lend_data_out_buffer(&bhs).is_none(),
            "one loan at a time"
        );
        chunk.copy_from_slice(&pdu.data());
        p.t.handle_lent_data_out(p.now, &bhs, chunk, true);
    }
    // Out of sequence: no place for it.
    let stray =
        p.i.data_out(itt, r.ttt, 9, 0, data.slice(..512), false)
            .encode_header();
    assert!(p.t.lend_data_out_buffer(&stray).is_none());
    p.drive();
    assert_eq!(p.executing.len(), 1);
    assert_eq!(p.executing[0].data_out, data);
}

#[test]
fn segment_longer_than_max_recv_ends_the_connection() {
    let mut p = Pair::new(config(params()));
    let (_, nop) = p.i.nop_out(Bytes::new());
    let bhs = nop.encode_header();
    p.t.handle_framing_error(p.now, &bhs, FramingError::SegmentTooLong);
    p.drive();
    assert_eq!(p.i.rejects(), vec![reject::PROTOCOL_ERROR]);
    assert!(matches!(
        p.closed_with(),
        Some(CloseReason::ProtocolError(_))
    ));
}

#[test]
fn unknown_opcode_is_rejected_and_the_session_goes_on() {
    let mut p = Pair::new(config(params()));
    let mut bhs = Bhs::default();
    bhs.0[0] = 0x1c;
    p.t.handle_framing_error(p.now, &bhs, FramingError::UnknownOpcode);
    p.drive();
    assert_eq!(p.i.rejects(), vec![reject::COMMAND_NOT_SUPPORTED]);
    let Pdu::Reject(_, header) = &p.i.received[0] else {
        unreachable!()
    };
    assert_eq!(
        &header[..],
        &bhs.0[..],
        "the Reject carries the rejected header"
    );
    assert!(!p.t.is_closed());
}

// ---- Data-In and status -------------------------------------------------------------

#[test]
fn read_data_in_respects_segment_and_burst_lengths() {
    let mut p = Pair::new(config(params()));
    let data = pattern(40 * 1024, 10);
    p.disk[..data.len()].copy_from_slice(&data);
    let (itt, cmd) = p.i.command(READ10, 0, data.len(), Bytes::new(), true);
    p.send(cmd);
    p.drive();
    let d = p.i.data_in(itt);
    let shape: Vec<(u32, u32, usize, bool, bool)> = d
        .iter()
        .map(|(h, b)| {
            (
                h.data_sn,
                h.buffer_offset,
                b.len(),
                h.final_bit,
                h.status_present,
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            (0, 0, 8192, false, false),
            (1, 8192, 8192, true, false),
            (2, 16384, 8192, false, false),
            (3, 24576, 8192, true, false),
            (4, 32768, 8192, true, true),
        ]
    );
    assert!(
        !p.i.received
            .iter()
            .any(|x| matches!(x, Pdu::ScsiResponse(..))),
        "phase collapse"
    );
    assert_eq!(read_back(&mut p, 0, data.len()), data);
}

#[test]
fn residuals_and_sense_in_a_scsi_response() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    let (itt, cmd) = p.i.command(READ10, 0, 4096, Bytes::new(), true);
    p.send(cmd);
    p.drive();
    let held = p.executing.remove(0);
    p.t.complete_command(
        p.now,
        held.itt,
        CommandResult {
            data_in: pattern(1024, 0),
            ..Default::default()
        },
    )
    .expect("executing");
    p.drive();
    let last = p.i.data_in(itt).pop().expect("data");
    assert!(last.0.status_present && last.0.underflow);
    assert_eq!(last.0.residual_count, 3072);

    let (itt, cmd) = p.i.command(0x12, 0, 96, Bytes::new(), true);
    p.send(cmd);
    p.drive();
    let held = p.executing.remove(0);
    p.t.complete_command(
        p.now,
        held.itt,
        CommandResult {
            status: response::STATUS_CHECK_CONDITION,
            sense: Some(response::sense_invalid_field_in_cdb()),
            data_in: pattern(200, 0),
            data_out_needed: None,
        },
    )
    .expect("executing");
    p.drive();
    let r =
        p.i.received
            .iter()
            .find_map(|x| match x {
                Pdu::ScsiResponse(r, s) if r.itt == itt => Some((r.clone(), s.clone())),
                _ => None,
            })
            .expect("a SCSI Response");
    let (r, sense): (ScsiResponse, Bytes) = r;
    assert!(r.overflow);
    assert_eq!(r.residual_count, 104);
    assert_eq!(r.exp_data_sn, 1, "one Data-In went before the status");
    assert_eq!(&sense[..2], &[0, 18]);
    assert_eq!(sense[2 + 12], 0x24);
}

// ---- task management ----------------------------------------------------------------

#[test]
fn abort_task_waits_for_the_command_and_drops_its_response() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    let (itt, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    p.drive();
    let (tmf_itt, abort) = p.i.tmf(tmf::ABORT_TASK, 0, itt);
    p.send(abort);
    p.drive();
    assert!(!p.t.wants_input(), "the session waits for the transport");
    let Some(Event::TaskManagement(req)) = p.events.pop() else {
        panic!("no TMF event")
    };
    assert_eq!(req.referenced_task_tag, Itt(itt));
    p.t.carry_out_task_management(p.now, req.itt, true)
        .expect("awaited");
    p.drive();
    assert_eq!(p.events, vec![Event::AbortInDevice { luns: vec![Lun(0)] }]);
    assert_eq!(
        p.i.tmf_response(tmf_itt),
        None,
        "not before the command left the device"
    );
    assert!(
        !p.complete_held(itt),
        "an aborted command's response is dropped"
    );
    assert_eq!(p.i.tmf_response(tmf_itt), Some(tmf::RESP_COMPLETE));
    assert_eq!(p.i.status_of(itt), None);
    assert!(p.t.wants_input());
    assert_eq!(p.t.take_counters().aborted_tasks, 1);
}

#[test]
fn abort_task_of_a_write_waiting_for_data() {
    let mut p = Pair::new(config(params()));
    let data = pattern(16384, 11);
    let itt = write_and_check(&mut p, 0, &data, 0, true);
    assert!(p.t.writes_waiting());
    let (tmf_itt, abort) = p.i.tmf(tmf::ABORT_TASK, 0, itt);
    p.send(abort);
    p.drive();
    let Some(Event::TaskManagement(req)) = p.events.pop() else {
        panic!()
    };
    p.t.carry_out_task_management(p.now, req.itt, true)
        .expect("awaited");
    p.drive();
    assert_eq!(p.i.tmf_response(tmf_itt), Some(tmf::RESP_COMPLETE));
    assert!(!p.t.writes_waiting());
    // Its data, still in flight, is dropped.
    let r = p.i.r2ts(itt).remove(0);
    p.answer_r2t(&r, &data);
    p.drive();
    assert_eq!(p.i.status_of(itt), None);
}

#[test]
fn abort_task_for_no_task_and_timeouts() {
    let mut p = Pair::new(config(params()));
    let (tmf_itt, abort) = p.i.tmf(tmf::ABORT_TASK, 0, 0x5555);
    p.send(abort);
    p.drive();
    let Some(Event::TaskManagement(req)) = p.events.pop() else {
        panic!()
    };
    p.t.carry_out_task_management(p.now, req.itt, true)
        .expect("awaited");
    p.drive();
    assert_eq!(p.i.tmf_response(tmf_itt), Some(tmf::RESP_NO_TASK));

    // A command that never leaves the device: the function is rejected after the wait.
    p.auto_execute = false;
    let (itt, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    p.drive();
    let (tmf_itt, abort) = p.i.tmf(tmf::ABORT_TASK, 0, itt);
    p.send(abort);
    p.drive();
    let Some(Event::TaskManagement(req)) = p.events.pop() else {
        panic!()
    };
    p.t.carry_out_task_management(p.now, req.itt, true)
        .expect("awaited");
    p.drive();
    p.advance(Duration::from_secs(29));
    assert_eq!(p.i.tmf_response(tmf_itt), None);
    p.advance(Duration::from_secs(1));
    assert_eq!(p.i.tmf_response(tmf_itt), Some(tmf::RESP_REJECTED));
}

#[test]
fn logical_unit_reset_aborts_the_unit_and_resets_it() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    let (running, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    let data = pattern(16384, 12);
    let writing = write_and_check(&mut p, 0, &data, 0, true);
    assert!(p.t.writes_waiting());
    let (tmf_itt, reset) = p.i.tmf(tmf::LOGICAL_UNIT_RESET, 0, RESERVED_TAG);
    p.send(reset);
    p.drive();
    let Some(Event::TaskManagement(req)) = p.events.pop() else {
        panic!()
    };
    p.t.carry_out_task_management(p.now, req.itt, true)
        .expect("awaited");
    p.drive();
    assert!(!p.t.writes_waiting(), "the write waiting for data is gone");
    assert_eq!(
        p.events,
        vec![
            Event::TaskDropped { itt: Itt(writing) },
            Event::AbortInDevice { luns: vec![Lun(0)] },
            Event::AbortAllNexuses { lun: Some(Lun(0)) }
        ]
    );
    p.events.clear();
    assert!(!p.complete_held(running));
    assert_eq!(
        p.events,
        vec![Event::Reset {
            itt: Itt(tmf_itt),
            kind: ResetKind::LogicalUnit(Lun(0))
        }]
    );
    assert_eq!(
        p.i.tmf_response(tmf_itt),
        None,
        "not before the device reset"
    );
    p.t.reset_done(p.now, Itt(tmf_itt)).expect("reset awaited");
    p.drive();
    assert_eq!(p.i.tmf_response(tmf_itt), Some(tmf::RESP_COMPLETE));
    assert_eq!(p.i.status_of(writing), None);
    assert_eq!(p.t.take_counters().aborted_tasks, 2);

    let (tmf_itt, reset) = p.i.tmf(tmf::LOGICAL_UNIT_RESET, 9, RESERVED_TAG);
    p.send(reset);
    p.drive();
    let Some(Event::TaskManagement(req)) = p.events.pop() else {
        panic!()
    };
    assert_eq!(req.lun, Lun(9));
    p.t.carry_out_task_management(p.now, req.itt, false)
        .expect("awaited");
    p.drive();
    assert_eq!(p.i.tmf_response(tmf_itt), Some(tmf::RESP_NO_LUN));
}

#[test]
fn target_resets_follow_the_configuration() {
    let mut p = Pair::new(config(params()));
    let (tmf_itt, reset) = p.i.tmf(tmf::TARGET_WARM_RESET, 0, RESERVED_TAG);
    p.send(reset);
    p.drive();
    let Some(Event::TaskManagement(req)) = p.events.pop() else {
        panic!()
    };
    p.t.carry_out_task_management(p.now, req.itt, true)
        .expect("awaited");
    p.drive();
    assert_eq!(p.i.tmf_response(tmf_itt), Some(tmf::RESP_AUTH_FAILED));
    assert_eq!(p.t.take_counters().target_resets_refused, 1);

    let mut c = config(params());
    c.target_reset_allowed = true;
    let mut p = Pair::new(c);
    let (tmf_itt, reset) = p.i.tmf(tmf::TARGET_COLD_RESET, 0, RESERVED_TAG);
    p.send(reset);
    p.drive();
    let Some(Event::TaskManagement(req)) = p.events.pop() else {
        panic!()
    };
    p.t.carry_out_task_management(p.now, req.itt, true)
        .expect("awaited");
    p.drive();
    assert_eq!(
        p.events,
        vec![
            Event::AbortAllNexuses { lun: None },
            Event::Reset {
                itt: Itt(tmf_itt),
                kind: ResetKind::TargetCold
            }
        ]
    );
    p.events.clear();
    p.t.reset_done(p.now, Itt(tmf_itt)).expect("awaited");
    p.drive();
    assert_eq!(p.i.tmf_response(tmf_itt), Some(tmf::RESP_COMPLETE));
    assert_eq!(p.events, vec![Event::EndTargetSessions]);
}

#[test]
fn unsupported_task_management_functions() {
    let mut p = Pair::new(config(params()));
    for (function, want) in [
        (tmf::TASK_REASSIGN, tmf::RESP_REASSIGN_UNSUPPORTED),
        (tmf::CLEAR_ACA, tmf::RESP_NOT_SUPPORTED),
    ] {
        let (tmf_itt, req) = p.i.tmf(function, 0, RESERVED_TAG);
        p.send(req);
        p.drive();
        let Some(Event::TaskManagement(req)) = p.events.pop() else {
            panic!()
        };
        p.t.carry_out_task_management(p.now, req.itt, true)
            .expect("awaited");
        p.drive();
        assert_eq!(p.i.tmf_response(tmf_itt), Some(want));
    }
}

#[test]
fn pdus_handed_in_during_a_wait_are_handled_after_it() {
    let mut p = Pair::new(config(params()));
    let (tmf_itt, req) = p.i.tmf(tmf::ABORT_TASK, 0, 0x4444);
    p.send(req);
    p.drive();
    // A careless driver hands in a ping while the session waits.
    let (nop_itt, nop) = p.i.nop_out(Bytes::new());
    p.t.handle_pdu(p.now, nop);
    p.drive();
    assert!(p.i.received.is_empty());
    let Some(Event::TaskManagement(r)) = p.events.pop() else {
        panic!()
    };
    p.t.carry_out_task_management(p.now, r.itt, true)
        .expect("awaited");
    p.drive();
    let order: Vec<u32> =
        p.i.received
            .iter()
            .filter_map(|x| match x {
                Pdu::TaskMgmtResponse(r) => Some(r.itt),
                Pdu::NopIn(n, _) => Some(n.itt),
                _ => None,
            })
            .collect();
    assert_eq!(order, vec![tmf_itt, nop_itt]);
}

// ---- the command window -------------------------------------------------------------

#[test]
fn commands_outside_the_window_are_ignored() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    // Fill the window: 8 commands, CmdSN 100..=107.
    let mut itts = Vec::new();
    for k in 0..8 {
        let (itt, cmd) = p.i.command(READ10, k, 512, Bytes::new(), true);
        itts.push(itt);
        p.send(cmd);
    }
    p.drive();
    assert_eq!(p.executing.len(), 8);
    assert_eq!(
        p.t.command_window(),
        (CmdSn(108), CmdSn(107)),
        "window full"
    );
    // CmdSN 108 is past MaxCmdSN: silently ignored (RFC 7143 §4.2.2.1).
    let (_, beyond) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(beyond);
    p.drive();
    assert_eq!(p.executing.len(), 8);
    assert!(p.i.received.is_empty(), "no answer at all");
    // A completion opens the window by one.
    assert!(p.complete_held(itts[0]));
    assert_eq!(
        p.i.last_seq().map(|s| (s.exp_cmd_sn, s.max_cmd_sn)),
        Some((108, 108))
    );
    // A stale CmdSN (below ExpCmdSN) is ignored too.
    let (_, mut stale) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    if let Pdu::ScsiCommand(c, _) = &mut stale {
        c.cmd_sn = 101;
    }
    p.send(stale);
    p.drive();
    assert_eq!(p.executing.len(), 7);
}

#[test]
fn immediate_commands_have_their_own_bound() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    for k in 0..5u32 {
        let (_, mut cmd) = p.i.command(READ10, k, 512, Bytes::new(), true);
        if let Pdu::ScsiCommand(c, _) = &mut cmd {
            c.immediate = true;
            c.cmd_sn = 100;
        }
        p.send(cmd);
    }
    p.drive();
    assert_eq!(
        p.executing.len(),
        4,
        "four immediate commands outstanding at most"
    );
    assert_eq!(p.i.rejects(), vec![reject::IMMEDIATE_COMMAND_REJECT]);
    assert_eq!(
        p.t.command_window().0,
        CmdSn(100),
        "immediate commands do not advance ExpCmdSN"
    );
    let first = p.executing[0].itt.0;
    assert!(p.complete_held(first));
    let (_, mut again) = p.i.command(READ10, 9, 512, Bytes::new(), true);
    if let Pdu::ScsiCommand(c, _) = &mut again {
        c.immediate = true;
        c.cmd_sn = 100;
    }
    p.send(again);
    p.drive();
    assert_eq!(p.executing.len(), 4, "a place came free");
    assert_eq!(p.t.take_counters().immediate_rejects, 1);
}

#[test]
fn a_tag_in_use_is_rejected_and_bad_immediate_data_is_refused() {
    let mut c = params();
    c.immediate_data = false;
    let mut p = Pair::new(config(c));
    p.auto_execute = false;
    let (itt, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    let (_, mut dup) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    if let Pdu::ScsiCommand(c, _) = &mut dup {
        c.itt = itt;
    }
    p.send(dup);
    p.drive();
    assert_eq!(p.i.rejects(), vec![reject::TASK_IN_PROGRESS]);
    // Immediate data although ImmediateData=No: CHECK CONDITION, then Reject.
    let (bad, cmd) = p.i.command(WRITE10, 0, 512, pattern(512, 0), true);
    p.send(cmd);
    p.drive();
    assert_eq!(
        p.i.status_of(bad).map(|s| s.0),
        Some(response::STATUS_CHECK_CONDITION)
    );
    assert_eq!(
        p.i.rejects(),
        vec![reject::TASK_IN_PROGRESS, reject::PROTOCOL_ERROR]
    );
}

#[test]
fn admission_refused_and_pending_write_bound_give_task_set_full() {
    let mut c = config(params());
    c.pending_write_bytes_max = 32 * 1024;
    let mut p = Pair::new(c);
    p.auto_admit = false;
    let (itt, cmd) = p.i.command(READ10, 0, 4096, Bytes::new(), true);
    p.send(cmd);
    p.drive();
    assert_eq!(
        p.events.pop(),
        Some(Event::AdmitCommand {
            itt: Itt(itt),
            buffer_bytes: 4096,
            writes_waiting: false
        })
    );
    assert!(!p.t.wants_input());
    p.t.refuse_command(p.now, Itt(itt)).expect("awaited");
    p.drive();
    assert_eq!(
        p.i.status_of(itt).map(|s| s.0),
        Some(response::STATUS_TASK_SET_FULL)
    );

    p.auto_admit = true;
    let w1 = write_and_check(&mut p, 0, &pattern(24 * 1024, 0), 0, true);
    let w2 = write_and_check(&mut p, 64, &pattern(16 * 1024, 0), 0, true);
    assert_eq!(p.i.status_of(w1), None);
    assert_eq!(
        p.i.status_of(w2).map(|s| s.0),
        Some(response::STATUS_TASK_SET_FULL)
    );
}

#[test]
fn writes_larger_than_the_limit_fail_before_a_buffer_exists() {
    let mut c = config(params());
    c.write_bytes_max = 8192;
    let mut p = Pair::new(c);
    let itt = write_and_check(&mut p, 0, &pattern(16384, 0), 0, true);
    assert!(p.events.is_empty(), "never offered for admission");
    assert_eq!(
        p.i.status_of(itt).map(|s| s.0),
        Some(response::STATUS_CHECK_CONDITION)
    );
}

// ---- NOP ----------------------------------------------------------------------------

#[test]
fn nop_out_ping_is_echoed() {
    let mut p = Pair::new(config(params()));
    let (itt, ping) = p.i.nop_out(pattern(100, 1));
    p.send(ping);
    p.drive();
    let Some(Pdu::NopIn(n, data)) = p.i.received.first() else {
        panic!()
    };
    assert_eq!((n.itt, n.ttt), (itt, RESERVED_TAG));
    assert_eq!(data, &pattern(100, 1));
}

#[test]
fn target_pings_an_idle_initiator_and_drops_a_silent_one() {
    let mut p = Pair::new(config(params()));
    assert_eq!(p.t.poll_timeout(), Some(p.now + Duration::from_secs(5)));
    p.advance(Duration::from_secs(5));
    let Some(Pdu::NopIn(ping, _)) = p.i.received.last().cloned() else {
        panic!("no ping")
    };
    assert_eq!(ping.itt, RESERVED_TAG);
    assert_ne!(ping.ttt, RESERVED_TAG);
    // The initiator answers: the connection lives on and is pinged again later.
    let answer = Pdu::NopOut(
        Nop {
            immediate: true,
            itt: RESERVED_TAG,
            ttt: ping.ttt,
            ..Default::default()
        },
        Bytes::new(),
    );
    p.advance(Duration::from_secs(1));
    p.send(answer);
    p.drive();
    p.advance(Duration::from_secs(14));
    assert_eq!(p.closed_with(), None);
    let pings =
        p.i.received
            .iter()
            .filter(|x| matches!(x, Pdu::NopIn(..)))
            .count();
    assert_eq!(pings, 2);
    // Now silence: dropped nop_timeout after the last ping.
    p.advance(Duration::from_secs(14));
    assert_eq!(p.closed_with(), None);
    p.advance(Duration::from_secs(1));
    assert_eq!(p.closed_with(), Some(CloseReason::NopTimeout));
    assert_eq!(p.t.poll_timeout(), None);
}

#[test]
fn the_data_out_timeout_drops_a_connection_whose_writes_get_no_data() {
    let mut p = Pair::new(config(params()));
    let data = pattern(32 * 1024, 13);
    let itt = write_and_check(&mut p, 0, &data, 0, true);
    let r = p.i.r2ts(itt).remove(0);
    // Steady data keeps it alive ...
    p.advance(Duration::from_secs(19));
    let d = p.i.data_out(itt, r.ttt, 0, 0, data.slice(..8192), false);
    p.send(d);
    p.drive();
    // ... pings answered do not.
    for _ in 0..3 {
        p.advance(Duration::from_secs(5));
        let (_, ping) = p.i.nop_out(Bytes::new());
        p.send(ping);
        p.drive();
    }
    assert_eq!(p.closed_with(), None);
    p.advance(Duration::from_secs(5));
    assert_eq!(p.closed_with(), Some(CloseReason::DataOutTimeout));
    assert_eq!(p.t.take_counters().data_out_timeouts, 1);
}

#[test]
fn waiting_for_local_resources_is_not_the_initiators_time() {
    let mut p = Pair::new(config(params()));
    p.auto_admit = false;
    let (itt, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    p.drive();
    // The driver waits 14 s for buffers, telling the session now and then.
    for _ in 0..28 {
        p.now += Duration::from_millis(500);
        p.t.note_local_stall(p.now);
    }
    p.t.admit_command(p.now, Itt(itt)).expect("awaited");
    p.drive();
    assert!(p.i.status_of(itt).is_some());
    assert_eq!(p.t.poll_timeout(), Some(p.now + Duration::from_secs(5)));
}

// ---- text, logout, async ------------------------------------------------------------

#[test]
fn send_targets_and_long_text_responses() {
    let mut c = params();
    c.max_xmit_data_segment_length = 512;
    let mut p = Pair::new(config(c));
    let (itt, req) = p.i.text(RESERVED_TAG, b"SendTargets=All\0X-Vendor=1\0");
    p.send(req);
    p.drive();
    assert_eq!(
        p.events.pop(),
        Some(Event::SendTargets {
            itt: Itt(itt),
            value: "All".into()
        })
    );
    let mut answer = TextPairs::default();
    for k in 0..20 {
        answer.push(
            "TargetName",
            format!("iqn.2026-01.test:target-number-{k:04}"),
        );
        answer.push("TargetAddress", "192.0.2.1:3260,1");
    }
    p.t.answer_send_targets(p.now, Itt(itt), answer.clone())
        .expect("awaited");
    p.drive();
    let mut body = Vec::new();
    loop {
        let Some(Pdu::TextResponse(t, chunk)) = p.i.received.last().cloned() else {
            panic!()
        };
        assert!(chunk.len() <= 512);
        body.extend_from_slice(&chunk);
        if t.final_bit {
            assert_eq!(t.ttt, RESERVED_TAG);
            break;
        }
        assert!(t.continue_bit);
        let (_, more) = p.i.text(t.ttt, b"");
        p.send(more);
        p.drive();
    }
    let got = TextPairs::parse(&body).expect("text");
    assert_eq!(got.get("X-Vendor"), Some("NotUnderstood"));
    assert_eq!(got.0.len(), 41);
    // A continuation with a stale TTT is an invalid field.
    let (_, stale) = p.i.text(0x1234, b"");
    p.send(stale);
    p.drive();
    assert_eq!(p.i.rejects(), vec![reject::INVALID_PDU_FIELD]);
}

#[test]
fn logout_waits_for_running_commands() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    let (running, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    let writing = write_and_check(&mut p, 0, &pattern(16384, 0), 0, true);
    let (itt, logout) = p.i.logout(0);
    p.send(logout);
    p.drive();
    assert!(!p.t.writes_waiting(), "writes waiting for data are dropped");
    assert!(!p
        .i
        .received
        .iter()
        .any(|x| matches!(x, Pdu::LogoutResponse(_))));
    assert!(
        p.complete_held(running),
        "a command finishing before logout is answered"
    );
    let Some(Pdu::LogoutResponse(r)) = p.i.received.last() else {
        panic!()
    };
    assert_eq!((r.itt, r.response), (itt, 0));
    assert_eq!(p.closed_with(), Some(CloseReason::LoggedOut));
    assert_eq!(p.i.status_of(writing), None);
    assert!(p.events.contains(&Event::TaskDropped { itt: Itt(writing) }));
}

#[test]
fn logout_reports_cleanup_failed_when_commands_stay() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    let (_, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    let (_, logout) = p.i.logout(0);
    p.send(logout);
    p.drive();
    p.advance(Duration::from_secs(30));
    let Some(Pdu::LogoutResponse(r)) = p.i.received.last() else {
        panic!("no response")
    };
    assert_eq!(r.response, 3, "cleanup failed");
    assert_eq!(p.closed_with(), None);
    assert!(p.t.wants_input());
    // Connection recovery (reason 2) needs ErrorRecoveryLevel 2.
    let (_, logout) = p.i.logout(2);
    p.send(logout);
    p.drive();
    let Some(Pdu::LogoutResponse(r)) = p.i.received.last() else {
        panic!()
    };
    assert_eq!(r.response, 2);
}

#[test]
fn the_target_asks_for_a_logout() {
    let mut p = Pair::new(config(params()));
    p.t.request_logout();
    p.drive();
    let Some(Pdu::AsyncMessage(m, _)) = p.i.received.last() else {
        panic!()
    };
    assert_eq!((m.event, m.parameters[2]), (1, 2));
}

#[test]
fn login_in_full_feature_phase_ends_the_connection_and_snack_is_rejected() {
    let mut p = Pair::new(config(params()));
    let mut snack = Bhs::default();
    snack.0[0] = 0x10;
    snack.0[1] = 0x80;
    p.t.handle_pdu(p.now, Pdu::SnackRequest(snack));
    p.drive();
    assert_eq!(p.i.rejects(), vec![reject::PROTOCOL_ERROR]);
    assert_eq!(p.closed_with(), None);
    p.t.handle_pdu(p.now, Pdu::LoginRequest(Default::default(), Bytes::new()));
    p.drive();
    assert!(matches!(
        p.closed_with(),
        Some(CloseReason::ProtocolError(_))
    ));
    // A closed session takes nothing more.
    let (_, ping) = p.i.nop_out(Bytes::new());
    let before = p.i.received.len();
    p.t.handle_pdu(p.now, ping);
    p.drive();
    assert_eq!(p.i.received.len(), before);
}

#[test]
fn a_discovery_session_takes_no_scsi_commands() {
    let mut c = params();
    c.session_type = SessionType::Discovery;
    let mut p = Pair::new(config(c));
    let (_, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    p.drive();
    assert_eq!(p.i.rejects(), vec![reject::PROTOCOL_ERROR]);
    assert!(p.events.is_empty());
}

// ---- the end of a session (reinstatement) -------------------------------------------

#[test]
fn ending_the_session_aborts_everything() {
    let mut p = Pair::new(config(params()));
    p.auto_execute = false;
    let (running, cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
    p.send(cmd);
    write_and_check(&mut p, 0, &pattern(16384, 0), 0, true);
    // Another session's PREEMPT AND ABORT first marks the running command ...
    assert_eq!(p.t.abort_running_on(Lun(0)), 1);
    assert_eq!(p.t.abort_running_on(Lun(0)), 0, "once");
    // ... then the session ends (reinstatement by a new login with the same ISID).
    assert_eq!(p.t.abort_all(), 1, "the write waiting for data");
    assert_eq!(
        p.t.executing_count(),
        1,
        "the transport waits for it to leave the device"
    );
    assert!(!p.complete_held(running));
    assert_eq!(p.t.executing_count(), 0);
    assert_eq!(
        p.t.complete_command(p.now, Itt(running), CommandResult::default()),
        Err(SessionError::NoSuchTask(Itt(running)))
    );
}

#[test]
fn api_misuse_is_an_error_not_a_panic() {
    let mut p = Pair::new(config(params()));
    assert_eq!(
        p.t.admit_command(p.now, Itt(1)),
        Err(SessionError::NotWaiting(Itt(1)))
    );
    assert_eq!(
        p.t.refuse_command(p.now, Itt(1)),
        Err(SessionError::NotWaiting(Itt(1)))
    );
    assert_eq!(
        p.t.reset_done(p.now, Itt(1)),
        Err(SessionError::NotWaiting(Itt(1)))
    );
    assert_eq!(
        p.t.carry_out_task_management(p.now, Itt(1), true),
        Err(SessionError::NotWaiting(Itt(1)))
    );
    assert_eq!(
        p.t.answer_send_targets(p.now, Itt(1), TextPairs::default()),
        Err(SessionError::NotWaiting(Itt(1)))
    );
}

#[test]
fn serial_numbers_wrap_in_the_window() {
    let mut c = config(params());
    c.exp_cmd_sn = CmdSn(u32::MAX - 2);
    let mut p = Pair::new(c);
    for k in 0..6 {
        let (itt, cmd) = p.i.command(READ10, k, 512, Bytes::new(), true);
        p.send(cmd);
        p.drive();
        assert!(p.i.status_of(itt).is_some(), "command {k} across the wrap");
    }
    assert_eq!(p.t.command_window().0, CmdSn(3));
}

proptest! {
    /// Whatever order CmdSNs arrive in, commands reach the SCSI layer in strictly
    /// increasing CmdSN order, each inside the window announced when it arrived, and
    /// MaxCmdSN never moves backwards (the pair checks that on every PDU).
    #[test]
    fn commands_are_delivered_in_cmd_sn_order(
        start in any::<u32>(),
        offsets in proptest::collection::vec(-4i32..12, 1..40),
        completes in proptest::collection::vec(any::<bool>(), 40),
    ) {
        let mut c = config(params());
        c.exp_cmd_sn = CmdSn(start);
        let mut p = Pair::new(c);
        p.auto_execute = false;
        let mut delivered: Vec<u32> = Vec::new();
        for (k, off) in offsets.iter().enumerate() {
            let (exp, max) = p.t.command_window();
            let sn = exp.0.wrapping_add(*off as u32);
            let (_, mut cmd) = p.i.command(READ10, 0, 512, Bytes::new(), true);
            if let Pdu::ScsiCommand(h, _) = &mut cmd {
                h.cmd_sn = sn;
            }
            p.send(cmd);
            p.drive();
            let in_window = SerialNumber(sn).in_window(exp.serial(), max.serial());
            let newly: Vec<u32> = p.executing.iter().map(|c| c.header.cmd_sn).filter(|s| !delivered.contains(s)).collect();
            prop_assert_eq!(newly.len(), usize::from(in_window));
            if let Some(&s) = newly.first() {
                if let Some(&prev) = delivered.last() {
                    prop_assert!(SerialNumber(prev).lt(SerialNumber(s)));
                }
                delivered.push(s);
            }
            if completes[k] {
                if let Some(first) = p.executing.first().map(|c| c.itt.0) {
                    p.complete_held(first);
                }
            }
        }
    }
}

#[test]
fn write_buffers_start_on_a_block_boundary() {
    for len in [512, 4096, 65536, 1 << 20] {
        let mut buf = super::block_aligned_buffer(len);
        assert_eq!(buf.as_ptr() as usize % 4096, 0, "{len}");
        assert!(buf.capacity() >= len);
        let start = buf.as_ptr();
        buf.resize(len, 7);
        assert_eq!(buf.as_ptr(), start, "filled in place, not moved");
        let frozen = buf.freeze();
        assert_eq!(frozen.as_ptr() as usize % 4096, 0);
        assert!(frozen.iter().all(|b| *b == 7));
    }
    // A write without immediate data gets an aligned buffer too.
    let buf = super::write_buffer(Bytes::new(), 1 << 20);
    assert_eq!(buf.as_ptr() as usize % 4096, 0);
    assert_eq!(buf.len(), 1 << 20);
}

#[test]
fn immediate_data_in_a_roomy_buffer_becomes_the_write_buffer() {
    let mut c = params();
    c.immediate_data = true;
    let mut p = Pair::new(config(c));
    p.auto_execute = false;
    let data = pattern(16384, 21);
    let (itt, cmd) = p.i.command(WRITE10, 0, data.len(), Bytes::new(), true);
    let Pdu::ScsiCommand(header, _) = cmd else {
        unreachable!()
    };
    // What a transport does: room for the whole write, the immediate data read into it.
    let mut imm = bytes::BytesMut::with_capacity(data.len());
    imm.extend_from_slice(&data[..4096]);
    let imm = imm.freeze();
    let at = imm.as_ptr();
    p.t.handle_pdu(p.now, Pdu::ScsiCommand(header, imm));
    p.drive();
    p.serve_r2ts(itt, &data);
    assert_eq!(p.executing.len(), 1);
    assert_eq!(p.executing[0].data_out, data);
    assert_eq!(
        p.executing[0].data_out.as_ptr(),
        at,
        "the same buffer, not a copy"
    );
}
