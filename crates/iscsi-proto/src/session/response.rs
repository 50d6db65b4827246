//! Data-In and SCSI Response PDUs for a completed command (RFC 7143 §11.4, §11.7).

use bytes::Bytes;

use crate::login::SessionParams;
use crate::pdu::{DataIn, ScsiCommand, ScsiResponse, RESERVED_TAG};

use super::{CommandResult, Outgoing, Stamp};

/// SCSI status GOOD (SAM-5 §5.3.1).
pub(super) const STATUS_GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub(super) const STATUS_CHECK_CONDITION: u8 = 0x02;
/// SCSI status CONDITION MET.
pub(super) const STATUS_CONDITION_MET: u8 = 0x04;
/// SCSI status TASK SET FULL.
pub(super) const STATUS_TASK_SET_FULL: u8 = 0x28;

/// Fixed-format sense data (SPC-4 §4.5.3) with only key, ASC and ASCQ: what the
/// transport itself reports, before or after a command reaches a logical unit.
pub(super) fn fixed_sense(key: u8, asc: u8, ascq: u8) -> Bytes {
    let mut b = [0u8; 18];
    for (i, v) in [(0, 0x70), (2, key & 0x0f), (7, 10), (12, asc), (13, ascq)] {
        if let Some(slot) = b.get_mut(i) {
            *slot = v;
        }
    }
    Bytes::copy_from_slice(&b)
}

/// ILLEGAL REQUEST, INVALID FIELD IN CDB (05h/24h/00h).
pub(super) fn sense_invalid_field_in_cdb() -> Bytes {
    fixed_sense(0x05, 0x24, 0x00)
}

/// ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (0Bh/47h/05h): how RFC 7143 §7.8 ends a
/// task whose data was lost at ErrorRecoveryLevel 0.
pub(super) fn sense_protocol_service_crc_error() -> Bytes {
    fixed_sense(0x0b, 0x47, 0x05)
}

/// Residual overflow, underflow and count for `actual` bytes against `expected`
/// (RFC 7143 §11.4.5).
fn residual(actual: u32, expected: u32) -> (bool, bool, u32) {
    if actual > expected {
        (true, false, actual - expected)
    } else if actual < expected {
        (false, true, expected - actual)
    } else {
        (false, false, 0)
    }
}

/// Builds the Data-In PDUs and the status of a completed command: data cut to the
/// expected length, Data-In sequences no longer than MaxBurstLength and PDUs no longer
/// than the initiator's MaxRecvDataSegmentLength, residuals, and the status in the last
/// Data-In ("phase collapse", RFC 7143 §11.7) when there is no sense data.
///
/// For a write, `data_out_needed` (what the command wanted, when the device knows it)
/// gives the residual; for a read, the length of the data the command produced.
pub(super) fn build(
    cmd: &ScsiCommand,
    result: CommandResult,
    params: &SessionParams,
) -> Vec<Outgoing> {
    let edtl = cmd.expected_data_transfer_length;
    let data = result.data_in;
    let data_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let (overflow, underflow, residual) = if let Some(needed) = result.data_out_needed {
        residual(needed, edtl)
    } else if cmd.read || !data.is_empty() {
        residual(data_len, edtl)
    } else {
        (false, false, 0)
    };
    let data = data.slice(..(data.len().min(edtl as usize)));
    let status = result.status;
    let phase_collapse = result.sense.is_none()
        && matches!(status, STATUS_GOOD | STATUS_CONDITION_MET)
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
        let with_status = last && phase_collapse;
        let d = DataIn {
            final_bit: last || offset + len == burst_end,
            status_present: with_status,
            status: if with_status { status } else { 0 },
            overflow: with_status && overflow,
            underflow: with_status && underflow,
            residual_count: if with_status { residual } else { 0 },
            lun: cmd.lun,
            itt: cmd.itt,
            ttt: RESERVED_TAG,
            data_sn,
            buffer_offset: offset as u32,
            ..Default::default()
        };
        let stamp = if with_status {
            Stamp::Advance
        } else {
            Stamp::Peek
        };
        pdus.push(Outgoing::new(
            d.to_bhs(),
            data.slice(offset..offset + len),
            stamp,
        ));
        offset += len;
        data_sn += 1;
    }
    if !phase_collapse {
        let sense_data = match &result.sense {
            Some(s) => {
                // SCSI Response data segment: SenseLength, then the sense data
                // (RFC 7143 §11.4.7.2).
                let mut v = Vec::with_capacity(2 + s.len());
                v.extend_from_slice(&u16::try_from(s.len()).unwrap_or(u16::MAX).to_be_bytes());
                v.extend_from_slice(s);
                Bytes::from(v)
            }
            None => Bytes::new(),
        };
        let r = ScsiResponse {
            overflow,
            underflow,
            response: 0,
            status,
            itt: cmd.itt,
            exp_data_sn: data_sn,
            residual_count: residual,
            ..Default::default()
        };
        pdus.push(Outgoing::new(r.to_bhs(), sense_data, Stamp::Advance));
    }
    pdus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_layout_is_fixed_format() {
        let s = sense_protocol_service_crc_error();
        assert_eq!(s.len(), 18);
        assert_eq!(
            &s[..],
            &[0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x47, 5, 0, 0, 0, 0]
        );
    }

    #[test]
    fn residuals() {
        assert_eq!(residual(10, 10), (false, false, 0));
        assert_eq!(residual(12, 10), (true, false, 2));
        assert_eq!(residual(8, 10), (false, true, 2));
    }
}
