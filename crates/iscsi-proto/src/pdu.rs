//! iSCSI PDUs (RFC 7143 §11): the 48-byte basic header segment and one typed struct per
//! opcode, each with `parse` (from a [`Bhs`]) and `to_bhs` (back to wire bytes).
//!
//! A PDU on the wire is BHS, AHS (TotalAHSLength words), optional header digest, data
//! segment padded to 4 bytes, optional data digest. The data segment is carried as
//! [`Bytes`] beside the typed header so payloads are never copied by this layer.

use bytes::Bytes;
use thiserror::Error;

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;

/// Initiator task tag reserved for PDUs that answer no task (RFC 7143 §11.2.1.8).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// iSCSI opcodes (RFC 7143 §11.2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Opcode {
    /// NOP-Out (0x00).
    NopOut,
    /// SCSI Command (0x01).
    ScsiCommand,
    /// SCSI Task Management Function Request (0x02).
    TaskMgmtRequest,
    /// Login Request (0x03).
    LoginRequest,
    /// Text Request (0x04).
    TextRequest,
    /// SCSI Data-Out (0x05).
    DataOut,
    /// Logout Request (0x06).
    LogoutRequest,
    /// SNACK Request (0x10).
    SnackRequest,
    /// NOP-In (0x20).
    NopIn,
    /// SCSI Response (0x21).
    ScsiResponse,
    /// Task Management Function Response (0x22).
    TaskMgmtResponse,
    /// Login Response (0x23).
    LoginResponse,
    /// Text Response (0x24).
    TextResponse,
    /// SCSI Data-In (0x25).
    DataIn,
    /// Logout Response (0x26).
    LogoutResponse,
    /// Ready To Transfer (0x31).
    R2t,
    /// Asynchronous Message (0x32).
    AsyncMessage,
    /// Reject (0x3f).
    Reject,
}

impl Opcode {
    /// Decodes the 6-bit opcode field.
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v & 0x3f {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::SnackRequest,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::R2t,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Opcode::NopOut => 0x00,
            Opcode::ScsiCommand => 0x01,
            Opcode::TaskMgmtRequest => 0x02,
            Opcode::LoginRequest => 0x03,
            Opcode::TextRequest => 0x04,
            Opcode::DataOut => 0x05,
            Opcode::LogoutRequest => 0x06,
            Opcode::SnackRequest => 0x10,
            Opcode::NopIn => 0x20,
            Opcode::ScsiResponse => 0x21,
            Opcode::TaskMgmtResponse => 0x22,
            Opcode::LoginResponse => 0x23,
            Opcode::TextResponse => 0x24,
            Opcode::DataIn => 0x25,
            Opcode::LogoutResponse => 0x26,
            Opcode::R2t => 0x31,
            Opcode::AsyncMessage => 0x32,
            Opcode::Reject => 0x3f,
        }
    }
}

/// Why a header could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PduError {
    /// The opcode is not one RFC 7143 defines (Reject reason 0x04, command not supported).
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// A field has a value the RFC forbids (Reject reason 0x09, invalid PDU field).
    #[error("invalid PDU field: {0}")]
    InvalidField(&'static str),
    /// The buffer is shorter than a basic header segment.
    #[error("truncated header: {0} bytes")]
    Truncated(usize),
}

/// The raw 48-byte basic header segment with typed accessors (big-endian fields).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs(op={:#04x}, itt={:#x})",
            self.opcode_raw(),
            self.itt()
        )
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl Bhs {
    /// Copies a header out of `buf`.
    pub fn from_slice(buf: &[u8]) -> Result<Bhs, PduError> {
        let head = buf.get(..BHS_LEN).ok_or(PduError::Truncated(buf.len()))?;
        let mut b = [0u8; BHS_LEN];
        b.copy_from_slice(head);
        Ok(Bhs(b))
    }

    fn u8_at(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }
    fn u16_at(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.u8_at(i), self.u8_at(i + 1)])
    }
    fn u32_at(&self, i: usize) -> u32 {
        u32::from_be_bytes([
            self.u8_at(i),
            self.u8_at(i + 1),
            self.u8_at(i + 2),
            self.u8_at(i + 3),
        ])
    }
    fn u64_at(&self, i: usize) -> u64 {
        (u64::from(self.u32_at(i)) << 32) | u64::from(self.u32_at(i + 4))
    }
    fn set_u8(&mut self, i: usize, v: u8) {
        if let Some(b) = self.0.get_mut(i) {
            *b = v;
        }
    }
    fn set_u16(&mut self, i: usize, v: u16) {
        for (k, b) in v.to_be_bytes().into_iter().enumerate() {
            self.set_u8(i + k, b);
        }
    }
    fn set_u32(&mut self, i: usize, v: u32) {
        for (k, b) in v.to_be_bytes().into_iter().enumerate() {
            self.set_u8(i + k, b);
        }
    }
    fn set_u64(&mut self, i: usize, v: u64) {
        self.set_u32(i, (v >> 32) as u32);
        self.set_u32(i + 4, v as u32);
    }

    /// The raw opcode byte without the I bit.
    pub fn opcode_raw(&self) -> u8 {
        self.u8_at(0) & 0x3f
    }
    /// The decoded opcode.
    pub fn opcode(&self) -> Result<Opcode, PduError> {
        Opcode::from_u8(self.opcode_raw()).ok_or(PduError::UnknownOpcode(self.opcode_raw()))
    }
    /// The immediate-delivery bit (I).
    pub fn immediate(&self) -> bool {
        self.u8_at(0) & 0x40 != 0
    }
    /// The final bit (F) of byte 1.
    pub fn final_bit(&self) -> bool {
        self.u8_at(1) & 0x80 != 0
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.u8_at(4)) * 4
    }
    /// DataSegmentLength in bytes (without padding).
    pub fn data_len(&self) -> usize {
        (usize::from(self.u8_at(5)) << 16)
            | (usize::from(self.u8_at(6)) << 8)
            | usize::from(self.u8_at(7))
    }
    /// Sets DataSegmentLength.
    pub fn set_data_len(&mut self, len: usize) {
        debug_assert!(len < 1 << 24);
        self.set_u8(5, (len >> 16) as u8);
        self.set_u8(6, (len >> 8) as u8);
        self.set_u8(7, len as u8);
    }
    /// Initiator task tag (bytes 16..20).
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    /// The LUN field (bytes 8..16), raw.
    pub fn lun_raw(&self) -> u64 {
        self.u64_at(8)
    }
}

/// A logical unit number as carried in the 8-byte SAM LUN field (SAM-5 §4.7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lun(pub u64);

impl Lun {
    /// Decodes the LUN field: peripheral (00b) and flat (01b) addressing of the first
    /// level; other addressing methods are returned as an out-of-range LUN so the
    /// logical unit lookup fails cleanly.
    pub fn from_field(raw: u64) -> Lun {
        let first = (raw >> 48) as u16;
        match first >> 14 {
            0b00 => Lun(u64::from(first & 0xff)),
            0b01 => Lun(u64::from(first & 0x3fff)),
            _ => Lun(u64::MAX),
        }
    }
    /// Encodes the LUN field: peripheral addressing below 256, flat addressing above.
    pub fn to_field(self) -> u64 {
        if self.0 < 256 {
            self.0 << 48
        } else {
            (0x4000 | (self.0 & 0x3fff)) << 48
        }
    }
}

/// Task attributes of the SCSI Command PDU (RFC 7143 §11.3.1).
pub mod attr {
    /// Untagged.
    pub const UNTAGGED: u8 = 0;
    /// Simple.
    pub const SIMPLE: u8 = 1;
    /// Ordered.
    pub const ORDERED: u8 = 2;
    /// Head of queue.
    pub const HEAD_OF_QUEUE: u8 = 3;
    /// ACA.
    pub const ACA: u8 = 4;
}

/// SCSI Command (RFC 7143 §11.3).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ScsiCommand {
    /// Immediate delivery.
    pub immediate: bool,
    /// F: no unsolicited Data-Out PDUs follow.
    pub final_bit: bool,
    /// R: the command expects Data-In.
    pub read: bool,
    /// W: the command sends Data-Out.
    pub write: bool,
    /// Task attribute (see [`attr`]).
    pub attr: u8,
    /// LUN field, raw.
    pub lun: u64,
    /// Initiator task tag.
    pub itt: u32,
    /// Expected data transfer length.
    pub expected_data_transfer_length: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// The 16-byte CDB field.
    pub cdb: [u8; 16],
}

impl ScsiCommand {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> ScsiCommand {
        let mut cdb = [0u8; 16];
        if let Some(src) = b.0.get(32..48) {
            cdb.copy_from_slice(src);
        }
        let f = b.u8_at(1);
        ScsiCommand {
            immediate: b.immediate(),
            final_bit: f & 0x80 != 0,
            read: f & 0x40 != 0,
            write: f & 0x20 != 0,
            attr: f & 0x07,
            lun: b.lun_raw(),
            itt: b.itt(),
            expected_data_transfer_length: b.u32_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
            cdb,
        }
    }
    /// Encodes the header (DataSegmentLength is set by the caller).
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x01 | if self.immediate { 0x40 } else { 0 });
        let mut f = self.attr & 0x07;
        if self.final_bit {
            f |= 0x80;
        }
        if self.read {
            f |= 0x40;
        }
        if self.write {
            f |= 0x20;
        }
        b.set_u8(1, f);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.expected_data_transfer_length);
        b.set_u32(24, self.cmd_sn);
        b.set_u32(28, self.exp_stat_sn);
        if let Some(dst) = b.0.get_mut(32..48) {
            dst.copy_from_slice(&self.cdb);
        }
        b
    }
}

/// Fields every target-to-initiator PDU carries at bytes 24..36.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusSeq {
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl StatusSeq {
    fn read(b: &Bhs) -> StatusSeq {
        StatusSeq {
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
        }
    }
    /// Writes the three fields into a target PDU header (bytes 24..36).
    pub fn write(&self, b: &mut Bhs) {
        b.set_u32(24, self.stat_sn);
        b.set_u32(28, self.exp_cmd_sn);
        b.set_u32(32, self.max_cmd_sn);
    }
}

/// SCSI Response (RFC 7143 §11.4).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    /// Residual overflow (O).
    pub overflow: bool,
    /// Residual underflow (U).
    pub underflow: bool,
    /// iSCSI response code (0 = command completed at target).
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// Sequence numbers.
    pub seq: StatusSeq,
    /// ExpDataSN: number of Data-In PDUs sent for the task.
    pub exp_data_sn: u32,
    /// Residual count.
    pub residual_count: u32,
}

impl ScsiResponse {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> ScsiResponse {
        let f = b.u8_at(1);
        ScsiResponse {
            overflow: f & 0x04 != 0,
            underflow: f & 0x02 != 0,
            response: b.u8_at(2),
            status: b.u8_at(3),
            itt: b.itt(),
            seq: StatusSeq::read(b),
            exp_data_sn: b.u32_at(36),
            residual_count: b.u32_at(44),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x21);
        b.set_u8(
            1,
            0x80 | if self.overflow { 0x04 } else { 0 } | if self.underflow { 0x02 } else { 0 },
        );
        b.set_u8(2, self.response);
        b.set_u8(3, self.status);
        b.set_u32(16, self.itt);
        self.seq.write(&mut b);
        b.set_u32(36, self.exp_data_sn);
        b.set_u32(44, self.residual_count);
        b
    }
}

/// SCSI Data-In (RFC 7143 §11.7).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DataIn {
    /// F: last PDU of the sequence.
    pub final_bit: bool,
    /// A: acknowledge requested (ERL > 0 only).
    pub ack: bool,
    /// O: residual overflow (with S).
    pub overflow: bool,
    /// U: residual underflow (with S).
    pub underflow: bool,
    /// S: status is carried in this PDU.
    pub status_present: bool,
    /// SCSI status (with S).
    pub status: u8,
    /// LUN field.
    pub lun: u64,
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag.
    pub ttt: u32,
    /// Sequence numbers (StatSN is meaningful only with S).
    pub seq: StatusSeq,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer offset.
    pub buffer_offset: u32,
    /// Residual count (with S).
    pub residual_count: u32,
}

impl DataIn {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> DataIn {
        let f = b.u8_at(1);
        DataIn {
            final_bit: f & 0x80 != 0,
            ack: f & 0x40 != 0,
            overflow: f & 0x04 != 0,
            underflow: f & 0x02 != 0,
            status_present: f & 0x01 != 0,
            status: b.u8_at(3),
            lun: b.lun_raw(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            seq: StatusSeq::read(b),
            data_sn: b.u32_at(36),
            buffer_offset: b.u32_at(40),
            residual_count: b.u32_at(44),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x25);
        let mut f = 0;
        if self.final_bit {
            f |= 0x80;
        }
        if self.ack {
            f |= 0x40;
        }
        if self.overflow {
            f |= 0x04;
        }
        if self.underflow {
            f |= 0x02;
        }
        if self.status_present {
            f |= 0x01;
        }
        b.set_u8(1, f);
        b.set_u8(3, if self.status_present { self.status } else { 0 });
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        self.seq.write(&mut b);
        b.set_u32(36, self.data_sn);
        b.set_u32(40, self.buffer_offset);
        b.set_u32(44, self.residual_count);
        b
    }
}

/// SCSI Data-Out (RFC 7143 §11.7).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DataOut {
    /// F: last PDU of the sequence.
    pub final_bit: bool,
    /// LUN field.
    pub lun: u64,
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag (0xffffffff for unsolicited data).
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// DataSN within the sequence.
    pub data_sn: u32,
    /// Buffer offset.
    pub buffer_offset: u32,
}

impl DataOut {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> DataOut {
        DataOut {
            final_bit: b.final_bit(),
            lun: b.lun_raw(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            exp_stat_sn: b.u32_at(28),
            data_sn: b.u32_at(36),
            buffer_offset: b.u32_at(40),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x05);
        b.set_u8(1, if self.final_bit { 0x80 } else { 0 });
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(28, self.exp_stat_sn);
        b.set_u32(36, self.data_sn);
        b.set_u32(40, self.buffer_offset);
        b
    }
}

/// Ready To Transfer (RFC 7143 §11.8).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct R2t {
    /// LUN field.
    pub lun: u64,
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag.
    pub ttt: u32,
    /// Sequence numbers (StatSN is the next StatSN, not advanced).
    pub seq: StatusSeq,
    /// R2TSN.
    pub r2t_sn: u32,
    /// Buffer offset.
    pub buffer_offset: u32,
    /// Desired data transfer length.
    pub desired_data_transfer_length: u32,
}

impl R2t {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> R2t {
        R2t {
            lun: b.lun_raw(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            seq: StatusSeq::read(b),
            r2t_sn: b.u32_at(36),
            buffer_offset: b.u32_at(40),
            desired_data_transfer_length: b.u32_at(44),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x31);
        b.set_u8(1, 0x80);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        self.seq.write(&mut b);
        b.set_u32(36, self.r2t_sn);
        b.set_u32(40, self.buffer_offset);
        b.set_u32(44, self.desired_data_transfer_length);
        b
    }
}

/// NOP-Out (RFC 7143 §11.18) and NOP-In (§11.19) share one shape.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Nop {
    /// Immediate (NOP-Out only).
    pub immediate: bool,
    /// LUN field.
    pub lun: u64,
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag.
    pub ttt: u32,
    /// NOP-Out: CmdSN and ExpStatSN at 24/28. NOP-In: StatSN/ExpCmdSN/MaxCmdSN.
    pub seq: StatusSeq,
}

impl Nop {
    /// Decodes a NOP-Out (CmdSN in `seq.stat_sn`, ExpStatSN in `seq.exp_cmd_sn`) or NOP-In.
    pub fn parse(b: &Bhs) -> Nop {
        Nop {
            immediate: b.immediate(),
            lun: b.lun_raw(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            seq: StatusSeq::read(b),
        }
    }
    /// Encodes a NOP-In.
    pub fn to_nop_in(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x20);
        b.set_u8(1, 0x80);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        self.seq.write(&mut b);
        b
    }
    /// Encodes a NOP-Out (`seq.stat_sn` = CmdSN, `seq.exp_cmd_sn` = ExpStatSN).
    pub fn to_nop_out(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, if self.immediate { 0x40 } else { 0 });
        b.set_u8(1, 0x80);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(24, self.seq.stat_sn);
        b.set_u32(28, self.seq.exp_cmd_sn);
        b
    }
}

/// Login Request (RFC 7143 §11.12) and Login Response (§11.13).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Login {
    /// T: transit to the next stage.
    pub transit: bool,
    /// C: text continues in the next PDU.
    pub continue_bit: bool,
    /// Current stage (0 security, 1 operational, 3 full feature).
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Version-max (request) / Version-max (response).
    pub version_max: u8,
    /// Version-min (request) / Version-active (response).
    pub version_min: u8,
    /// ISID.
    pub isid: [u8; 6],
    /// TSIH.
    pub tsih: u16,
    /// Initiator task tag.
    pub itt: u32,
    /// CID (request only).
    pub cid: u16,
    /// Request: CmdSN at 24, ExpStatSN at 28. Response: StatSN/ExpCmdSN/MaxCmdSN.
    pub seq: StatusSeq,
    /// Status class (response only).
    pub status_class: u8,
    /// Status detail (response only).
    pub status_detail: u8,
}

impl Login {
    /// Decodes a login request or response.
    pub fn parse(b: &Bhs) -> Login {
        let f = b.u8_at(1);
        let mut isid = [0u8; 6];
        if let Some(s) = b.0.get(8..14) {
            isid.copy_from_slice(s);
        }
        Login {
            transit: f & 0x80 != 0,
            continue_bit: f & 0x40 != 0,
            csg: (f >> 2) & 0x03,
            nsg: f & 0x03,
            version_max: b.u8_at(2),
            version_min: b.u8_at(3),
            isid,
            tsih: b.u16_at(14),
            itt: b.itt(),
            cid: b.u16_at(20),
            seq: StatusSeq::read(b),
            status_class: b.u8_at(36),
            status_detail: b.u8_at(37),
        }
    }
    fn flags(&self) -> u8 {
        let mut f = ((self.csg & 3) << 2) | (self.nsg & 3);
        if self.transit {
            f |= 0x80;
        }
        if self.continue_bit {
            f |= 0x40;
        }
        f
    }
    /// Encodes a Login Response.
    pub fn to_response(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x23);
        b.set_u8(1, self.flags());
        b.set_u8(2, self.version_max);
        b.set_u8(3, self.version_min);
        if let Some(d) = b.0.get_mut(8..14) {
            d.copy_from_slice(&self.isid);
        }
        b.set_u16(14, self.tsih);
        b.set_u32(16, self.itt);
        self.seq.write(&mut b);
        b.set_u8(36, self.status_class);
        b.set_u8(37, self.status_detail);
        b
    }
    /// Encodes a Login Request (`seq.stat_sn` = CmdSN, `seq.exp_cmd_sn` = ExpStatSN).
    pub fn to_request(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x43);
        b.set_u8(1, self.flags());
        b.set_u8(2, self.version_max);
        b.set_u8(3, self.version_min);
        if let Some(d) = b.0.get_mut(8..14) {
            d.copy_from_slice(&self.isid);
        }
        b.set_u16(14, self.tsih);
        b.set_u32(16, self.itt);
        b.set_u16(20, self.cid);
        b.set_u32(24, self.seq.stat_sn);
        b.set_u32(28, self.seq.exp_cmd_sn);
        b
    }
}

/// Text Request (RFC 7143 §11.10) and Text Response (§11.11).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Text {
    /// Immediate (request only).
    pub immediate: bool,
    /// F.
    pub final_bit: bool,
    /// C: continue.
    pub continue_bit: bool,
    /// LUN field.
    pub lun: u64,
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag.
    pub ttt: u32,
    /// Request: CmdSN / ExpStatSN. Response: StatSN / ExpCmdSN / MaxCmdSN.
    pub seq: StatusSeq,
}

impl Text {
    /// Decodes a text request or response.
    pub fn parse(b: &Bhs) -> Text {
        let f = b.u8_at(1);
        Text {
            immediate: b.immediate(),
            final_bit: f & 0x80 != 0,
            continue_bit: f & 0x40 != 0,
            lun: b.lun_raw(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            seq: StatusSeq::read(b),
        }
    }
    /// Encodes a text response (`request == false`) or request.
    pub fn to_bhs(&self, request: bool) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(
            0,
            if request {
                0x04 | if self.immediate { 0x40 } else { 0 }
            } else {
                0x24
            },
        );
        b.set_u8(
            1,
            if self.final_bit { 0x80 } else { 0 } | if self.continue_bit { 0x40 } else { 0 },
        );
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        if request {
            b.set_u32(24, self.seq.stat_sn);
            b.set_u32(28, self.seq.exp_cmd_sn);
        } else {
            self.seq.write(&mut b);
        }
        b
    }
}

/// Task management function codes (RFC 7143 §11.5.1).
pub mod tmf {
    /// ABORT TASK.
    pub const ABORT_TASK: u8 = 1;
    /// ABORT TASK SET.
    pub const ABORT_TASK_SET: u8 = 2;
    /// CLEAR ACA.
    pub const CLEAR_ACA: u8 = 3;
    /// CLEAR TASK SET.
    pub const CLEAR_TASK_SET: u8 = 4;
    /// LOGICAL UNIT RESET.
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    /// TARGET WARM RESET.
    pub const TARGET_WARM_RESET: u8 = 6;
    /// TARGET COLD RESET.
    pub const TARGET_COLD_RESET: u8 = 7;
    /// TASK REASSIGN.
    pub const TASK_REASSIGN: u8 = 8;

    /// Function complete.
    pub const RESP_COMPLETE: u8 = 0;
    /// Task does not exist.
    pub const RESP_NO_TASK: u8 = 1;
    /// LUN does not exist.
    pub const RESP_NO_LUN: u8 = 2;
    /// Task still allegiant.
    pub const RESP_TASK_ALLEGIANT: u8 = 3;
    /// Task allegiance reassignment not supported.
    pub const RESP_REASSIGN_UNSUPPORTED: u8 = 4;
    /// Task management function not supported.
    pub const RESP_NOT_SUPPORTED: u8 = 5;
    /// Function authorization failed.
    pub const RESP_AUTH_FAILED: u8 = 6;
    /// Function rejected.
    pub const RESP_REJECTED: u8 = 255;
}

/// SCSI Task Management Function Request (RFC 7143 §11.5).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TaskMgmtRequest {
    /// Immediate.
    pub immediate: bool,
    /// Function code (see [`tmf`]).
    pub function: u8,
    /// LUN field.
    pub lun: u64,
    /// Initiator task tag.
    pub itt: u32,
    /// Referenced task tag.
    pub referenced_task_tag: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// RefCmdSN.
    pub ref_cmd_sn: u32,
    /// ExpDataSN.
    pub exp_data_sn: u32,
}

impl TaskMgmtRequest {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> TaskMgmtRequest {
        TaskMgmtRequest {
            immediate: b.immediate(),
            function: b.u8_at(1) & 0x7f,
            lun: b.lun_raw(),
            itt: b.itt(),
            referenced_task_tag: b.u32_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
            ref_cmd_sn: b.u32_at(32),
            exp_data_sn: b.u32_at(36),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x02 | if self.immediate { 0x40 } else { 0 });
        b.set_u8(1, 0x80 | (self.function & 0x7f));
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.referenced_task_tag);
        b.set_u32(24, self.cmd_sn);
        b.set_u32(28, self.exp_stat_sn);
        b.set_u32(32, self.ref_cmd_sn);
        b.set_u32(36, self.exp_data_sn);
        b
    }
}

/// Task Management Function Response (RFC 7143 §11.6).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TaskMgmtResponse {
    /// Response code (see [`tmf`]).
    pub response: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// Sequence numbers.
    pub seq: StatusSeq,
}

impl TaskMgmtResponse {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> TaskMgmtResponse {
        TaskMgmtResponse {
            response: b.u8_at(2),
            itt: b.itt(),
            seq: StatusSeq::read(b),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x22);
        b.set_u8(1, 0x80);
        b.set_u8(2, self.response);
        b.set_u32(16, self.itt);
        self.seq.write(&mut b);
        b
    }
}

/// Logout Request (RFC 7143 §11.14).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LogoutRequest {
    /// Immediate.
    pub immediate: bool,
    /// Reason code: 0 close session, 1 close connection, 2 remove connection for recovery.
    pub reason: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// CID to close.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl LogoutRequest {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> LogoutRequest {
        LogoutRequest {
            immediate: b.immediate(),
            reason: b.u8_at(1) & 0x7f,
            itt: b.itt(),
            cid: b.u16_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x06 | if self.immediate { 0x40 } else { 0 });
        b.set_u8(1, 0x80 | (self.reason & 0x7f));
        b.set_u32(16, self.itt);
        b.set_u16(20, self.cid);
        b.set_u32(24, self.cmd_sn);
        b.set_u32(28, self.exp_stat_sn);
        b
    }
}

/// Logout Response (RFC 7143 §11.15).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    /// 0 closed successfully, 1 CID not found, 2 recovery not supported, 3 cleanup failed.
    pub response: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// Sequence numbers.
    pub seq: StatusSeq,
    /// Time2Wait.
    pub time2wait: u16,
    /// Time2Retain.
    pub time2retain: u16,
}

impl LogoutResponse {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> LogoutResponse {
        LogoutResponse {
            response: b.u8_at(2),
            itt: b.itt(),
            seq: StatusSeq::read(b),
            time2wait: b.u16_at(40),
            time2retain: b.u16_at(42),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x26);
        b.set_u8(1, 0x80);
        b.set_u8(2, self.response);
        b.set_u32(16, self.itt);
        self.seq.write(&mut b);
        b.set_u16(40, self.time2wait);
        b.set_u16(42, self.time2retain);
        b
    }
}

/// Asynchronous Message (RFC 7143 §11.9).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AsyncMessage {
    /// LUN field.
    pub lun: u64,
    /// Sequence numbers.
    pub seq: StatusSeq,
    /// AsyncEvent: 0 SCSI async event, 1 logout request, 2 drop connection, 3 drop all
    /// connections, 4 renegotiate.
    pub event: u8,
    /// AsyncVCode.
    pub vcode: u8,
    /// Parameter1..3.
    pub parameters: [u16; 3],
}

impl AsyncMessage {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> AsyncMessage {
        AsyncMessage {
            lun: b.lun_raw(),
            seq: StatusSeq::read(b),
            event: b.u8_at(36),
            vcode: b.u8_at(37),
            parameters: [b.u16_at(38), b.u16_at(40), b.u16_at(42)],
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x32);
        b.set_u8(1, 0x80);
        b.set_u64(8, self.lun);
        b.set_u32(16, RESERVED_TAG);
        self.seq.write(&mut b);
        b.set_u8(36, self.event);
        b.set_u8(37, self.vcode);
        b.set_u16(38, self.parameters[0]);
        b.set_u16(40, self.parameters[1]);
        b.set_u16(42, self.parameters[2]);
        b
    }
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK_REJECT: u8 = 0x03;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    /// Immediate command reject: too many immediate commands.
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    /// Task in progress.
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    /// Invalid data ACK.
    pub const INVALID_DATA_ACK: u8 = 0x08;
    /// Invalid PDU field.
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    /// Long operation reject: out of resources.
    pub const LONG_OPERATION_REJECT: u8 = 0x0a;
    /// Waiting for logout.
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Reject (RFC 7143 §11.17). The data segment carries the rejected PDU's header.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Reject {
    /// Reason (see [`reject`]).
    pub reason: u8,
    /// Sequence numbers.
    pub seq: StatusSeq,
    /// DataSN/R2TSN (for SNACK rejects).
    pub data_sn: u32,
}

impl Reject {
    /// Decodes the header.
    pub fn parse(b: &Bhs) -> Reject {
        Reject {
            reason: b.u8_at(2),
            seq: StatusSeq::read(b),
            data_sn: b.u32_at(36),
        }
    }
    /// Encodes the header.
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::default();
        b.set_u8(0, 0x3f);
        b.set_u8(1, 0x80);
        b.set_u8(2, self.reason);
        b.set_u32(16, RESERVED_TAG);
        self.seq.write(&mut b);
        b.set_u32(36, self.data_sn);
        b
    }
}

/// A decoded PDU header with its data segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pdu {
    /// NOP-Out.
    NopOut(Nop, Bytes),
    /// SCSI Command with immediate data.
    ScsiCommand(ScsiCommand, Bytes),
    /// Task management request.
    TaskMgmtRequest(TaskMgmtRequest),
    /// Login request with its text.
    LoginRequest(Login, Bytes),
    /// Text request with its text.
    TextRequest(Text, Bytes),
    /// Data-Out with its data.
    DataOut(DataOut, Bytes),
    /// Logout request.
    LogoutRequest(LogoutRequest),
    /// SNACK (not supported at ErrorRecoveryLevel 0).
    SnackRequest(Bhs),
    /// NOP-In.
    NopIn(Nop, Bytes),
    /// SCSI Response with its data segment (sense).
    ScsiResponse(ScsiResponse, Bytes),
    /// TMF response.
    TaskMgmtResponse(TaskMgmtResponse),
    /// Login response.
    LoginResponse(Login, Bytes),
    /// Text response.
    TextResponse(Text, Bytes),
    /// Data-In.
    DataIn(DataIn, Bytes),
    /// Logout response.
    LogoutResponse(LogoutResponse),
    /// R2T.
    R2t(R2t),
    /// Async message.
    AsyncMessage(AsyncMessage, Bytes),
    /// Reject with the rejected header.
    Reject(Reject, Bytes),
}

impl Pdu {
    /// Builds a typed PDU from a header and its data segment (without padding).
    pub fn decode(bhs: &Bhs, data: Bytes) -> Result<Pdu, PduError> {
        let op = bhs.opcode()?;
        Ok(match op {
            Opcode::NopOut => Pdu::NopOut(Nop::parse(bhs), data),
            Opcode::ScsiCommand => Pdu::ScsiCommand(ScsiCommand::parse(bhs), data),
            Opcode::TaskMgmtRequest => Pdu::TaskMgmtRequest(TaskMgmtRequest::parse(bhs)),
            Opcode::LoginRequest => Pdu::LoginRequest(Login::parse(bhs), data),
            Opcode::TextRequest => Pdu::TextRequest(Text::parse(bhs), data),
            Opcode::DataOut => Pdu::DataOut(DataOut::parse(bhs), data),
            Opcode::LogoutRequest => Pdu::LogoutRequest(LogoutRequest::parse(bhs)),
            Opcode::SnackRequest => Pdu::SnackRequest(*bhs),
            Opcode::NopIn => Pdu::NopIn(Nop::parse(bhs), data),
            Opcode::ScsiResponse => Pdu::ScsiResponse(ScsiResponse::parse(bhs), data),
            Opcode::TaskMgmtResponse => Pdu::TaskMgmtResponse(TaskMgmtResponse::parse(bhs)),
            Opcode::LoginResponse => Pdu::LoginResponse(Login::parse(bhs), data),
            Opcode::TextResponse => Pdu::TextResponse(Text::parse(bhs), data),
            Opcode::DataIn => Pdu::DataIn(DataIn::parse(bhs), data),
            Opcode::LogoutResponse => Pdu::LogoutResponse(LogoutResponse::parse(bhs)),
            Opcode::R2t => Pdu::R2t(R2t::parse(bhs)),
            Opcode::AsyncMessage => Pdu::AsyncMessage(AsyncMessage::parse(bhs), data),
            Opcode::Reject => Pdu::Reject(Reject::parse(bhs), data),
        })
    }

    /// Encodes the header with DataSegmentLength set from the data segment.
    pub fn encode_header(&self) -> Bhs {
        let (mut b, len) = match self {
            Pdu::NopOut(h, d) => (h.to_nop_out(), d.len()),
            Pdu::ScsiCommand(h, d) => (h.to_bhs(), d.len()),
            Pdu::TaskMgmtRequest(h) => (h.to_bhs(), 0),
            Pdu::LoginRequest(h, d) => (h.to_request(), d.len()),
            Pdu::TextRequest(h, d) => (h.to_bhs(true), d.len()),
            Pdu::DataOut(h, d) => (h.to_bhs(), d.len()),
            Pdu::LogoutRequest(h) => (h.to_bhs(), 0),
            Pdu::SnackRequest(b) => (*b, 0),
            Pdu::NopIn(h, d) => (h.to_nop_in(), d.len()),
            Pdu::ScsiResponse(h, d) => (h.to_bhs(), d.len()),
            Pdu::TaskMgmtResponse(h) => (h.to_bhs(), 0),
            Pdu::LoginResponse(h, d) => (h.to_response(), d.len()),
            Pdu::TextResponse(h, d) => (h.to_bhs(false), d.len()),
            Pdu::DataIn(h, d) => (h.to_bhs(), d.len()),
            Pdu::LogoutResponse(h) => (h.to_bhs(), 0),
            Pdu::R2t(h) => (h.to_bhs(), 0),
            Pdu::AsyncMessage(h, d) => (h.to_bhs(), d.len()),
            Pdu::Reject(h, d) => (h.to_bhs(), d.len()),
        };
        b.set_data_len(len);
        b
    }

    /// The data segment.
    pub fn data(&self) -> Bytes {
        match self {
            Pdu::NopOut(_, d)
            | Pdu::ScsiCommand(_, d)
            | Pdu::LoginRequest(_, d)
            | Pdu::TextRequest(_, d)
            | Pdu::DataOut(_, d)
            | Pdu::NopIn(_, d)
            | Pdu::ScsiResponse(_, d)
            | Pdu::LoginResponse(_, d)
            | Pdu::TextResponse(_, d)
            | Pdu::DataIn(_, d)
            | Pdu::AsyncMessage(_, d)
            | Pdu::Reject(_, d) => d.clone(),
            _ => Bytes::new(),
        }
    }

    /// Encodes the whole PDU into one buffer (tests and the login phase; the data path
    /// writes header and data with vectored I/O instead).
    pub fn to_wire(&self, header_digest: bool, data_digest: bool) -> Vec<u8> {
        let bhs = self.encode_header();
        let data = self.data();
        let mut out = Vec::with_capacity(BHS_LEN + 8 + data.len() + 3);
        out.extend_from_slice(&bhs.0);
        if header_digest {
            out.extend_from_slice(&crate::digest::crc32c(&[&bhs.0]).to_le_bytes());
        }
        if !data.is_empty() {
            let pad = [0u8; 3];
            let pad = pad.get(..crate::digest::pad_len(data.len())).unwrap_or(&[]);
            out.extend_from_slice(&data);
            out.extend_from_slice(pad);
            if data_digest {
                out.extend_from_slice(&crate::digest::crc32c(&[&data, pad]).to_le_bytes());
            }
        }
        out
    }
}

/// Errors of [`decode_wire`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// More bytes are needed.
    #[error("incomplete PDU")]
    Incomplete,
    /// Header digest mismatch.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// Data digest mismatch.
    #[error("data digest mismatch")]
    DataDigest,
    /// Header decode error.
    #[error(transparent)]
    Pdu(#[from] PduError),
}

/// Decodes one whole PDU from the front of `buf`, returning it and the bytes consumed.
/// Used by tests, the fuzz target and the small initiator.
pub fn decode_wire(
    buf: &[u8],
    header_digest: bool,
    data_digest: bool,
) -> Result<(Pdu, usize), WireError> {
    let bhs = Bhs::from_slice(buf).map_err(|_| WireError::Incomplete)?;
    let mut pos = BHS_LEN + bhs.ahs_len();
    if header_digest {
        let d = buf.get(pos..pos + 4).ok_or(WireError::Incomplete)?;
        let head = buf.get(..pos).ok_or(WireError::Incomplete)?;
        if crate::digest::crc32c(&[head]).to_le_bytes() != d {
            return Err(WireError::HeaderDigest);
        }
        pos += 4;
    }
    let len = bhs.data_len();
    let padded = len + crate::digest::pad_len(len);
    let data = buf.get(pos..pos + len).ok_or(WireError::Incomplete)?;
    let data = Bytes::copy_from_slice(data);
    if len > 0 {
        let seg = buf.get(pos..pos + padded).ok_or(WireError::Incomplete)?;
        pos += padded;
        if data_digest {
            let d = buf.get(pos..pos + 4).ok_or(WireError::Incomplete)?;
            if crate::digest::crc32c(&[seg]).to_le_bytes() != d {
                return Err(WireError::DataDigest);
            }
            pos += 4;
        }
    }
    Ok((Pdu::decode(&bhs, data)?, pos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_bhs_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), BHS_LEN)
    }

    proptest! {
        #[test]
        fn scsi_command_roundtrip(itt in any::<u32>(), edtl in any::<u32>(), sn in any::<u32>(), lun in any::<u64>(), cdb in any::<[u8; 16]>(), attr in 0u8..5, r in any::<bool>(), w in any::<bool>(), f in any::<bool>()) {
            let c = ScsiCommand { immediate: false, final_bit: f, read: r, write: w, attr, lun, itt, expected_data_transfer_length: edtl, cmd_sn: sn, exp_stat_sn: sn ^ 1, cdb };
            prop_assert_eq!(ScsiCommand::parse(&c.to_bhs()), c);
        }

        #[test]
        fn data_in_roundtrip(itt in any::<u32>(), off in any::<u32>(), sn in any::<u32>(), s in any::<bool>(), st in any::<u8>()) {
            let d = DataIn { final_bit: s, ack: false, overflow: false, underflow: s, status_present: s, status: if s { st } else { 0 }, lun: 0, itt, ttt: RESERVED_TAG, seq: StatusSeq { stat_sn: sn, exp_cmd_sn: 1, max_cmd_sn: 2 }, data_sn: sn, buffer_offset: off, residual_count: off };
            prop_assert_eq!(DataIn::parse(&d.to_bhs()), d);
        }

        #[test]
        fn login_roundtrip(isid in any::<[u8; 6]>(), tsih in any::<u16>(), itt in any::<u32>(), csg in 0u8..4, nsg in 0u8..4, t in any::<bool>(), c in any::<bool>()) {
            let l = Login { transit: t, continue_bit: c, csg, nsg, version_max: 0, version_min: 0, isid, tsih, itt, cid: 0, seq: StatusSeq { stat_sn: 3, exp_cmd_sn: 4, max_cmd_sn: 5 }, status_class: 2, status_detail: 1 };
            prop_assert_eq!(Login::parse(&l.to_response()), Login { cid: 0, ..l });
        }

        #[test]
        fn wire_roundtrip(data in proptest::collection::vec(any::<u8>(), 0..300), hd in any::<bool>(), dd in any::<bool>(), itt in any::<u32>()) {
            let pdu = Pdu::DataOut(DataOut { final_bit: true, lun: 0, itt, ttt: 7, exp_stat_sn: 1, data_sn: 0, buffer_offset: 0 }, Bytes::from(data));
            let wire = pdu.to_wire(hd, dd);
            let (back, used) = decode_wire(&wire, hd, dd).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!(back, pdu);
        }

        #[test]
        fn decode_never_panics(b in arb_bhs_bytes(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = b;
            buf.extend(tail);
            let _ = decode_wire(&buf, true, true);
            let _ = decode_wire(&buf, false, false);
        }
    }

    #[test]
    fn lun_addressing() {
        assert_eq!(Lun::from_field(Lun(5).to_field()), Lun(5));
        assert_eq!(Lun::from_field(Lun(300).to_field()), Lun(300));
        assert_eq!(Lun(1).to_field(), 0x0001_0000_0000_0000);
    }

    #[test]
    fn bad_digest_is_detected() {
        let pdu = Pdu::NopOut(
            Nop {
                itt: 1,
                ttt: RESERVED_TAG,
                ..Default::default()
            },
            Bytes::from_static(b"ping"),
        );
        let mut wire = pdu.to_wire(true, true);
        if let Some(b) = wire.get_mut(BHS_LEN + 4) {
            *b ^= 1;
        }
        assert_eq!(decode_wire(&wire, true, true), Err(WireError::DataDigest));
        let mut wire = pdu.to_wire(true, true);
        if let Some(b) = wire.get_mut(3) {
            *b ^= 1;
        }
        assert_eq!(decode_wire(&wire, true, true), Err(WireError::HeaderDigest));
    }
}
