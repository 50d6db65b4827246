//! Typed CDB access (SPC-4 §4.2): operation codes, a bounds-checked view over the CDB
//! bytes, and the newtypes the block commands pass around.

use crate::sense::Sense;

/// Operation codes this target knows (SPC-4 Annex D, SBC-3 Table 13).
#[allow(missing_docs)]
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const MAINTENANCE_OUT: u8 = 0xA4;
    pub const RECEIVE_DIAGNOSTIC_RESULTS: u8 = 0x1C;
    pub const SEND_DIAGNOSTIC: u8 = 0x1D;
    pub const LOG_SELECT: u8 = 0x4C;
    pub const LOG_SENSE: u8 = 0x4D;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;

    /// SERVICE ACTION IN(16) service actions.
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service actions.
    pub const SA_REPORT_TARGET_PORT_GROUPS: u8 = 0x0A;
    /// MAINTENANCE OUT service action.
    pub const SA_SET_TARGET_PORT_GROUPS: u8 = 0x0A;
    pub const SA_REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0C;
    pub const SA_REPORT_SUPPORTED_TMFS: u8 = 0x0D;
    /// RECEIVE COPY RESULTS service actions.
    pub const SA_COPY_STATUS: u8 = 0x00;
    pub const SA_OPERATING_PARAMETERS: u8 = 0x03;
    /// EXTENDED COPY service action (LID1).
    pub const SA_EXTENDED_COPY_LID1: u8 = 0x00;
}

/// The CDB length a group code implies (SPC-4 §4.2.5.1); `None` for the reserved and
/// vendor-specific groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A bounds-checked view over a CDB. The dispatcher checks the length an opcode needs
/// before a handler reads fields, so out-of-range reads (which yield zero) cannot occur
/// for valid lengths; they never panic either way.
#[derive(Clone, Copy, Debug)]
pub struct Cdb<'a>(pub &'a [u8]);

impl<'a> Cdb<'a> {
    /// The operation code.
    pub fn opcode(&self) -> u8 {
        self.u8(0)
    }

    /// The bytes of the CDB.
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Byte `i`, zero beyond the end.
    pub fn u8(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }

    /// Whether bit `bit` of byte `i` is set.
    pub fn bit(&self, i: usize, bit: u8) -> bool {
        self.u8(i) & (1 << bit) != 0
    }

    fn be<const N: usize>(&self, i: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(s) = self.0.get(i..i + N) {
            out.copy_from_slice(s);
        }
        out
    }

    /// Big-endian u16 at `i`.
    pub fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes(self.be(i))
    }

    /// Big-endian 24-bit value at `i`.
    pub fn be24(&self, i: usize) -> u32 {
        let [a, b, c] = self.be::<3>(i);
        u32::from_be_bytes([0, a, b, c])
    }

    /// Big-endian u32 at `i`.
    pub fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes(self.be(i))
    }

    /// Big-endian u64 at `i`.
    pub fn be64(&self, i: usize) -> u64 {
        u64::from_be_bytes(self.be(i))
    }

    /// The service action field of byte 1 (bits 4..0).
    pub fn service_action(&self) -> u8 {
        self.u8(1) & 0x1F
    }

    /// The CONTROL byte (the last byte of the CDB). NACA (bit 2) is refused: ACA is not
    /// supported (SAM-5 §5.9.1.1).
    pub fn control(&self, len: usize) -> u8 {
        self.u8(len.saturating_sub(1))
    }
}

/// A logical block address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lba(pub u64);

/// A number of logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockCount(pub u64);

/// A range of logical blocks already checked against the capacity of the logical unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    /// First LBA.
    pub lba: Lba,
    /// Number of blocks.
    pub count: BlockCount,
}

impl BlockRange {
    /// Checks `lba`/`count` against a capacity of `num_blocks` (SBC-3 §4.5: LOGICAL BLOCK
    /// ADDRESS OUT OF RANGE when the range is not entirely inside the medium; an LBA past
    /// the last one is out of range even with a zero count).
    pub fn checked(lba: Lba, count: BlockCount, num_blocks: u64) -> Result<BlockRange, Sense> {
        match lba.0.checked_add(count.0) {
            Some(end) if lba.0 < num_blocks && end <= num_blocks => Ok(BlockRange { lba, count }),
            _ => Err(Sense::ILLEGAL_REQUEST_LBA_OUT_OF_RANGE),
        }
    }

    /// Byte offset of the range for a block size.
    pub fn offset(&self, block_size: u32) -> u64 {
        self.lba.0.saturating_mul(u64::from(block_size))
    }

    /// Length of the range in bytes for a block size.
    pub fn bytes(&self, block_size: u32) -> u64 {
        self.count.0.saturating_mul(u64::from(block_size))
    }
}

/// Writes `v` into `buf` at `off` when it fits (builders of parameter data use this to
/// stay free of panics).
pub fn put(buf: &mut [u8], off: usize, v: &[u8]) {
    if let Some(dst) = buf.get_mut(off..off.saturating_add(v.len())) {
        dst.copy_from_slice(v);
    }
}

/// Sets byte `off` of `buf` when it exists.
pub fn put_u8(buf: &mut [u8], off: usize, v: u8) {
    if let Some(b) = buf.get_mut(off) {
        *b = v;
    }
}

/// ORs `v` into byte `off` of `buf` when it exists.
pub fn or_u8(buf: &mut [u8], off: usize, v: u8) {
    if let Some(b) = buf.get_mut(off) {
        *b |= v;
    }
}

/// Big-endian reads from parameter data (zero beyond the end, like [`Cdb`]).
pub fn get_be<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = buf.get(off..off.saturating_add(N)) {
        out.copy_from_slice(s);
    }
    out
}

/// Big-endian u16 of parameter data.
pub fn get_be16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(get_be(buf, off))
}

/// Big-endian u32 of parameter data.
pub fn get_be32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(get_be(buf, off))
}

/// Big-endian u64 of parameter data.
pub fn get_be64(buf: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(get_be(buf, off))
}

/// Byte `off` of parameter data, zero beyond the end.
pub fn get_u8(buf: &[u8], off: usize) -> u8 {
    buf.get(off).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(BlockRange::checked(Lba(0), BlockCount(10), 10).is_ok());
        assert!(BlockRange::checked(Lba(9), BlockCount(1), 10).is_ok());
        assert!(BlockRange::checked(Lba(9), BlockCount(2), 10).is_err());
        assert!(BlockRange::checked(Lba(0), BlockCount(0), 10).is_ok());
        assert!(BlockRange::checked(Lba(11), BlockCount(0), 10).is_err());
        assert!(BlockRange::checked(Lba(u64::MAX), BlockCount(2), 10).is_err());
    }

    #[test]
    fn cdb_reads_never_panic() {
        let c = Cdb(&[0x28, 1]);
        assert_eq!(c.be32(2), 0);
        assert_eq!(c.be16(0), 0x2801);
    }
}
