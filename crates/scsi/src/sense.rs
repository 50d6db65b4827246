//! Sense data (SPC-4 §4.5): fixed format (response code 0x70) and descriptor format
//! (response code 0x72), and the sense key / ASC / ASCQ triples the target reports.

use bytes::Bytes;

use crate::{ScsiResponse, ScsiStatus};

/// Sense keys (SPC-4 Table 27).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    /// NO SENSE.
    NoSense = 0x00,
    /// RECOVERED ERROR.
    RecoveredError = 0x01,
    /// NOT READY.
    NotReady = 0x02,
    /// MEDIUM ERROR.
    MediumError = 0x03,
    /// HARDWARE ERROR.
    HardwareError = 0x04,
    /// ILLEGAL REQUEST.
    IllegalRequest = 0x05,
    /// UNIT ATTENTION.
    UnitAttention = 0x06,
    /// DATA PROTECT.
    DataProtect = 0x07,
    /// COPY ABORTED.
    CopyAborted = 0x0A,
    /// ABORTED COMMAND.
    AbortedCommand = 0x0B,
    /// MISCOMPARE.
    Miscompare = 0x0E,
}

/// Who a sense-key-specific field pointer points into (SPC-4 §4.5.2.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FieldPointer {
    /// Byte (and optionally bit) of the CDB.
    Cdb {
        /// Byte offset in the CDB.
        byte: u16,
        /// Bit number, when one bit is at fault.
        bit: Option<u8>,
    },
    /// Byte (and optionally bit) of the parameter list (Data-Out).
    Parameter {
        /// Byte offset in the parameter data.
        byte: u16,
        /// Bit number, when one bit is at fault.
        bit: Option<u8>,
    },
}

/// One sense condition: key, additional sense code and qualifier, optional INFORMATION
/// and optional sense-key-specific field pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sense {
    /// Sense key.
    pub key: SenseKey,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field (e.g. the offset of a miscompare, SBC-3 §5.3).
    pub information: Option<u64>,
    /// Sense-key-specific field pointer (ILLEGAL REQUEST).
    pub field: Option<FieldPointer>,
    /// Sense-key-specific progress indication (NOT READY, and NO SENSE from REQUEST
    /// SENSE): the fraction of an operation done, in 65536ths (SPC-4 §4.5.2.4.4).
    pub progress: Option<u16>,
}

macro_rules! senses {
    ($($(#[$doc:meta])* $name:ident = $key:ident, $asc:literal, $ascq:literal;)*) => {
        impl Sense {
            $($(#[$doc])* pub const $name: Sense = Sense::new(SenseKey::$key, $asc, $ascq);)*
        }
    };
}

senses! {
    /// NO SENSE, no additional sense information.
    NO_SENSE = NoSense, 0x00, 0x00;
    /// NOT READY, LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED (stopped unit).
    NOT_READY_INITIALIZING_COMMAND_REQUIRED = NotReady, 0x04, 0x02;
    /// NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS.
    NOT_READY_SANITIZE_IN_PROGRESS = NotReady, 0x04, 0x1B;
    /// NOT READY, MEDIUM NOT PRESENT.
    NOT_READY_MEDIUM_NOT_PRESENT = NotReady, 0x3A, 0x00;
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION: the
    /// volume is changing primary; initiators retry (SPC-4 §5.15.2.2).
    NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION = NotReady, 0x04, 0x0A;
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE (SPC-4
    /// §5.15.2.4.4).
    NOT_READY_TARGET_PORT_IN_STANDBY_STATE = NotReady, 0x04, 0x0B;
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE (SPC-4
    /// §5.15.2.4.6).
    NOT_READY_TARGET_PORT_IN_UNAVAILABLE_STATE = NotReady, 0x04, 0x0C;
    /// MEDIUM ERROR, WRITE ERROR.
    MEDIUM_ERROR_WRITE_ERROR = MediumError, 0x0C, 0x00;
    /// MEDIUM ERROR, UNRECOVERED READ ERROR.
    MEDIUM_ERROR_UNRECOVERED_READ_ERROR = MediumError, 0x11, 0x00;
    /// MEDIUM ERROR, MEDIUM FORMAT CORRUPTED (a failed sanitize, SBC-3 §4.11).
    MEDIUM_ERROR_MEDIUM_FORMAT_CORRUPTED = MediumError, 0x31, 0x00;
    /// MEDIUM ERROR, SANITIZE COMMAND FAILED: the sanitize failed state (SBC-3 §4.11).
    MEDIUM_ERROR_SANITIZE_COMMAND_FAILED = MediumError, 0x31, 0x03;
    /// HARDWARE ERROR, INTERNAL TARGET FAILURE.
    HARDWARE_ERROR_INTERNAL_TARGET_FAILURE = HardwareError, 0x44, 0x00;
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR = IllegalRequest, 0x1A, 0x00;
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    ILLEGAL_REQUEST_INVALID_COMMAND_OPERATION_CODE = IllegalRequest, 0x20, 0x00;
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    ILLEGAL_REQUEST_LBA_OUT_OF_RANGE = IllegalRequest, 0x21, 0x00;
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB.
    ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB = IllegalRequest, 0x24, 0x00;
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    ILLEGAL_REQUEST_LOGICAL_UNIT_NOT_SUPPORTED = IllegalRequest, 0x25, 0x00;
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST.
    ILLEGAL_REQUEST_INVALID_FIELD_IN_PARAMETER_LIST = IllegalRequest, 0x26, 0x00;
    /// ILLEGAL REQUEST, PARAMETER NOT SUPPORTED.
    ILLEGAL_REQUEST_PARAMETER_NOT_SUPPORTED = IllegalRequest, 0x26, 0x01;
    /// ILLEGAL REQUEST, TOO MANY TARGET DESCRIPTORS.
    ILLEGAL_REQUEST_TOO_MANY_TARGET_DESCRIPTORS = IllegalRequest, 0x26, 0x06;
    /// ILLEGAL REQUEST, UNSUPPORTED TARGET DESCRIPTOR TYPE CODE.
    ILLEGAL_REQUEST_UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = IllegalRequest, 0x26, 0x07;
    /// ILLEGAL REQUEST, TOO MANY SEGMENT DESCRIPTORS.
    ILLEGAL_REQUEST_TOO_MANY_SEGMENT_DESCRIPTORS = IllegalRequest, 0x26, 0x08;
    /// ILLEGAL REQUEST, UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE.
    ILLEGAL_REQUEST_UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = IllegalRequest, 0x26, 0x09;
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    ILLEGAL_REQUEST_SAVING_PARAMETERS_NOT_SUPPORTED = IllegalRequest, 0x39, 0x00;
    /// ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES.
    ILLEGAL_REQUEST_INSUFFICIENT_REGISTRATION_RESOURCES = IllegalRequest, 0x55, 0x04;
    /// ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED.
    ILLEGAL_REQUEST_MEDIUM_REMOVAL_PREVENTED = IllegalRequest, 0x53, 0x02;
    /// ILLEGAL REQUEST, OPERATION IN PROGRESS (copy operation id already in use).
    ILLEGAL_REQUEST_OPERATION_IN_PROGRESS = IllegalRequest, 0x00, 0x16;
    /// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    UNIT_ATTENTION_POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED = UnitAttention, 0x29, 0x00;
    /// UNIT ATTENTION, POWER ON OCCURRED.
    UNIT_ATTENTION_POWER_ON_OCCURRED = UnitAttention, 0x29, 0x01;
    /// UNIT ATTENTION, SCSI BUS RESET OCCURRED.
    UNIT_ATTENTION_SCSI_BUS_RESET_OCCURRED = UnitAttention, 0x29, 0x02;
    /// UNIT ATTENTION, BUS DEVICE RESET FUNCTION OCCURRED.
    UNIT_ATTENTION_BUS_DEVICE_RESET_FUNCTION_OCCURRED = UnitAttention, 0x29, 0x03;
    /// UNIT ATTENTION, I_T NEXUS LOSS OCCURRED.
    UNIT_ATTENTION_I_T_NEXUS_LOSS_OCCURRED = UnitAttention, 0x29, 0x07;
    /// UNIT ATTENTION, MODE PARAMETERS CHANGED.
    UNIT_ATTENTION_MODE_PARAMETERS_CHANGED = UnitAttention, 0x2A, 0x01;
    /// UNIT ATTENTION, RESERVATIONS PREEMPTED.
    UNIT_ATTENTION_RESERVATIONS_PREEMPTED = UnitAttention, 0x2A, 0x03;
    /// UNIT ATTENTION, RESERVATIONS RELEASED.
    UNIT_ATTENTION_RESERVATIONS_RELEASED = UnitAttention, 0x2A, 0x04;
    /// UNIT ATTENTION, REGISTRATIONS PREEMPTED.
    UNIT_ATTENTION_REGISTRATIONS_PREEMPTED = UnitAttention, 0x2A, 0x05;
    /// UNIT ATTENTION, ASYMMETRIC ACCESS STATE CHANGED.
    UNIT_ATTENTION_ASYMMETRIC_ACCESS_STATE_CHANGED = UnitAttention, 0x2A, 0x06;
    /// UNIT ATTENTION, CAPACITY DATA HAS CHANGED.
    UNIT_ATTENTION_CAPACITY_DATA_HAS_CHANGED = UnitAttention, 0x2A, 0x09;
    /// UNIT ATTENTION, THIN PROVISIONING SOFT THRESHOLD REACHED.
    UNIT_ATTENTION_THIN_PROVISIONING_SOFT_THRESHOLD_REACHED = UnitAttention, 0x38, 0x07;
    /// UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED.
    UNIT_ATTENTION_REPORTED_LUNS_DATA_HAS_CHANGED = UnitAttention, 0x3F, 0x0E;
    /// DATA PROTECT, WRITE PROTECTED.
    DATA_PROTECT_WRITE_PROTECTED = DataProtect, 0x27, 0x00;
    /// DATA PROTECT, SOFTWARE WRITE PROTECTED (the SWP bit of the control mode page).
    DATA_PROTECT_SOFTWARE_WRITE_PROTECTED = DataProtect, 0x27, 0x02;
    /// COPY ABORTED, UNREACHABLE COPY TARGET.
    COPY_ABORTED_UNREACHABLE_COPY_TARGET = CopyAborted, 0x08, 0x04;
    /// COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE.
    COPY_ABORTED_COPY_TARGET_DEVICE_NOT_REACHABLE = CopyAborted, 0x0D, 0x02;
    /// ABORTED COMMAND, NO ADDITIONAL SENSE INFORMATION.
    ABORTED_COMMAND = AbortedCommand, 0x00, 0x00;
    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION.
    MISCOMPARE_DURING_VERIFY_OPERATION = Miscompare, 0x1D, 0x00;
}

impl Sense {
    /// A sense condition without INFORMATION or field pointer.
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field: None,
            progress: None,
        }
    }

    /// INVALID FIELD IN CDB pointing at `byte` of the CDB.
    pub const fn invalid_field_in_cdb(byte: u16) -> Sense {
        Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB
            .with_field(FieldPointer::Cdb { byte, bit: None })
    }

    /// INVALID FIELD IN CDB pointing at one bit of `byte` of the CDB.
    pub const fn invalid_bit_in_cdb(byte: u16, bit: u8) -> Sense {
        Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB.with_field(FieldPointer::Cdb {
            byte,
            bit: Some(bit),
        })
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte` of the parameter data.
    pub const fn invalid_field_in_parameter_list(byte: u16) -> Sense {
        Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_PARAMETER_LIST
            .with_field(FieldPointer::Parameter { byte, bit: None })
    }

    /// The same condition with a field pointer.
    pub const fn with_field(mut self, field: FieldPointer) -> Sense {
        self.field = Some(field);
        self
    }

    /// The same condition with a progress indication (in 65536ths of the operation).
    pub const fn with_progress(mut self, progress: u16) -> Sense {
        self.progress = Some(progress);
        self
    }

    /// The same condition with an INFORMATION field.
    pub const fn with_information(mut self, information: u64) -> Sense {
        self.information = Some(information);
        self
    }

    /// Whether this is a unit attention condition.
    pub fn is_unit_attention(&self) -> bool {
        self.key == SenseKey::UnitAttention
    }

    fn sense_key_specific(&self) -> Option<[u8; 3]> {
        let Some(field) = self.field else {
            // SKSV, then the PROGRESS INDICATION (SPC-4 §4.5.2.4.4).
            let [hi, lo] = self.progress?.to_be_bytes();
            return Some([0x80, hi, lo]);
        };
        let (cd, byte, bit) = match field {
            FieldPointer::Cdb { byte, bit } => (0x40u8, byte, bit),
            FieldPointer::Parameter { byte, bit } => (0x00u8, byte, bit),
        };
        let bit_bits = match bit {
            Some(b) => 0x08 | (b & 0x07),
            None => 0,
        };
        let [hi, lo] = byte.to_be_bytes();
        Some([0x80 | cd | bit_bits, hi, lo])
    }

    /// Fixed format sense data (SPC-4 §4.5.3), 18 bytes.
    ///
    /// An INFORMATION value wider than 32 bits does not fit: VALID is then zero.
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key as u8;
        if let Some(info) = self.information {
            if let Ok(info) = u32::try_from(info) {
                b[0] |= 0x80;
                b[3..7].copy_from_slice(&info.to_be_bytes());
            }
        }
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(sks) = self.sense_key_specific() {
            b[15..18].copy_from_slice(&sks);
        }
        b
    }

    /// Descriptor format sense data (SPC-4 §4.5.2) with an information descriptor and a
    /// sense key specific descriptor when present.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key as u8, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.information {
            b.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.sense_key_specific() {
            b.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            b.extend_from_slice(&sks);
            b.push(0);
        }
        let additional = b.len().saturating_sub(8);
        if let Some(len) = b.get_mut(7) {
            *len = u8::try_from(additional).unwrap_or(u8::MAX);
        }
        b
    }

    /// Sense data in the format D_SENSE selects.
    pub fn to_bytes(&self, descriptor: bool) -> Bytes {
        if descriptor {
            Bytes::from(self.to_descriptor())
        } else {
            Bytes::copy_from_slice(&self.to_fixed())
        }
    }
}

/// A CHECK CONDITION response carrying `sense` in fixed format.
///
/// The logical units use the format their control mode page selects; this helper is for
/// the transport (e.g. a command it refuses before it reaches a logical unit).
pub fn check_condition(sense: Sense) -> ScsiResponse {
    check_condition_format(sense, false)
}

/// A CHECK CONDITION response with sense data in fixed or descriptor format.
pub fn check_condition_format(sense: Sense, descriptor: bool) -> ScsiResponse {
    ScsiResponse {
        status: ScsiStatus::CheckCondition,
        sense: Some(sense.to_bytes(descriptor)),
        data_in: Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let s = Sense::MISCOMPARE_DURING_VERIFY_OPERATION.with_information(0x1234);
        let b = s.to_fixed();
        assert_eq!(b[0], 0xF0);
        assert_eq!(b[2], 0x0E);
        assert_eq!(&b[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x1D, 0x00));
    }

    #[test]
    fn fixed_format_field_pointer() {
        let b = Sense::invalid_bit_in_cdb(1, 3).to_fixed();
        assert_eq!(&b[15..18], &[0x80 | 0x40 | 0x08 | 3, 0, 1]);
    }

    #[test]
    fn wide_information_clears_valid() {
        let b = Sense::MISCOMPARE_DURING_VERIFY_OPERATION
            .with_information(1 << 40)
            .to_fixed();
        assert_eq!(b[0], 0x70);
    }

    #[test]
    fn descriptor_format_layout() {
        let s = Sense::invalid_field_in_cdb(2).with_information(7);
        let b = s.to_descriptor();
        assert_eq!(&b[..4], &[0x72, 0x05, 0x24, 0x00]);
        assert_eq!(b[7] as usize, b.len() - 8);
        assert_eq!(&b[8..12], &[0x00, 0x0A, 0x80, 0x00]);
        assert_eq!(&b[12..20], &7u64.to_be_bytes());
        assert_eq!(&b[20..24], &[0x02, 0x06, 0, 0]);
        assert_eq!(&b[24..27], &[0xC0, 0, 2]);
    }

    #[test]
    fn progress_indication_in_both_formats() {
        let s = Sense::NOT_READY_SANITIZE_IN_PROGRESS.with_progress(0x8000);
        let f = s.to_fixed();
        assert_eq!((f[2], f[12], f[13]), (0x02, 0x04, 0x1B));
        assert_eq!(&f[15..18], &[0x80, 0x80, 0x00]);
        let d = s.to_descriptor();
        assert_eq!(&d[8..12], &[0x02, 0x06, 0, 0]);
        assert_eq!(&d[12..15], &[0x80, 0x80, 0x00]);
        assert_eq!(d[7] as usize, d.len() - 8);
    }
}
