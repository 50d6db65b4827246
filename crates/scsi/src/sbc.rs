//! Block commands (SBC-3): READ / WRITE of every size, WRITE AND VERIFY, VERIFY, WRITE
//! SAME, UNMAP, GET LBA STATUS, COMPARE AND WRITE, ORWRITE, WRITE ATOMIC, PRE-FETCH,
//! SYNCHRONIZE CACHE, READ CAPACITY and READ DEFECT DATA. SANITIZE is in `sanitize`.

use bytes::{Bytes, BytesMut};

use crate::cdb::{
    get_be16, get_be32, get_be64, opcode as op, put, BlockCount, BlockRange, Cdb, Lba,
};
use crate::device::Provisioning;
use crate::lu::{data_in, good, CmdResult, Ctx, Done, Failure, LogicalUnit};
use crate::sense::Sense;

/// Limits reported in the block limits VPD page and enforced here.
pub(crate) mod limits {
    /// Largest single transfer in bytes (READ/WRITE/VERIFY/...).
    pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;
    /// Optimal transfer in bytes.
    pub const OPTIMAL_TRANSFER_BYTES: u32 = 1 << 20;
    /// Largest WRITE SAME in bytes: bounded so one command cannot hold the unit for long.
    pub const MAX_WRITE_SAME_BYTES: u64 = 64 << 20;
    /// Largest WRITE SAME in blocks whatever the block size: what LIO reports too. It
    /// keeps MAXIMUM WRITE SAME LENGTH below 65536 blocks, the largest range initiators
    /// (libiscsi's conformance tests among them) also move with one READ or WRITE when
    /// they check a 4-byte WRITE SAME length; a larger report invites them to send
    /// transfers beyond MAXIMUM TRANSFER LENGTH.
    pub const MAX_WRITE_SAME_BLOCKS: u32 = 0xFFFF;
    /// MAXIMUM COMPARE AND WRITE LENGTH (the CDB field is one byte).
    pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;
    /// MAXIMUM UNMAP LBA COUNT: no limit.
    pub const MAX_UNMAP_LBA_COUNT: u32 = 0xFFFF_FFFF;
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

    /// MAXIMUM TRANSFER LENGTH in blocks.
    pub fn max_transfer_blocks(block_size: u32) -> u32 {
        MAX_TRANSFER_BYTES / block_size.max(1)
    }

    /// OPTIMAL TRANSFER LENGTH in blocks.
    pub fn optimal_transfer_blocks(block_size: u32) -> u32 {
        OPTIMAL_TRANSFER_BYTES / block_size.max(1)
    }

    /// MAXIMUM WRITE SAME LENGTH in blocks.
    pub fn max_write_same_blocks(block_size: u32) -> u32 {
        u32::try_from(MAX_WRITE_SAME_BYTES / u64::from(block_size.max(1)))
            .unwrap_or(u32::MAX)
            .min(MAX_WRITE_SAME_BLOCKS)
    }

    /// MAXIMUM ATOMIC TRANSFER LENGTH in blocks: one device write.
    pub fn max_atomic_blocks(block_size: u32) -> u32 {
        max_transfer_blocks(block_size)
    }
}

/// Sense for a Data-Out buffer that does not hold what the CDB describes (the transport
/// delivered less or more than the command needs).
const DATA_OUT_MISMATCH: Sense = Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB;

/// Size of the buffer WRITE SAME fills the medium with, per device write.
const FILL_CHUNK_BYTES: usize = 1 << 20;

/// LBA, transfer length and the byte-1 flags of a READ/WRITE/VERIFY style CDB.
struct RwFields {
    lba: Lba,
    count: BlockCount,
    flags: u8,
}

fn rw_fields(cdb: Cdb<'_>) -> RwFields {
    match cdb.opcode() {
        op::READ_6 | op::WRITE_6 => {
            let n = cdb.u8(4);
            RwFields {
                lba: Lba(u64::from(cdb.be24(1) & 0x1F_FFFF)),
                // SBC-3 §5.?: a TRANSFER LENGTH of zero in READ(6)/WRITE(6) means 256.
                count: BlockCount(if n == 0 { 256 } else { u64::from(n) }),
                flags: 0,
            }
        }
        op::READ_10
        | op::WRITE_10
        | op::WRITE_AND_VERIFY_10
        | op::VERIFY_10
        | op::PRE_FETCH_10
        | op::SYNCHRONIZE_CACHE_10
        | op::WRITE_SAME_10 => RwFields {
            lba: Lba(u64::from(cdb.be32(2))),
            count: BlockCount(u64::from(cdb.be16(7))),
            flags: cdb.u8(1),
        },
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 | op::VERIFY_12 => RwFields {
            lba: Lba(u64::from(cdb.be32(2))),
            count: BlockCount(u64::from(cdb.be32(6))),
            flags: cdb.u8(1),
        },
        op::WRITE_ATOMIC_16 => RwFields {
            lba: Lba(cdb.be64(2)),
            count: BlockCount(u64::from(cdb.be16(12))),
            flags: cdb.u8(1),
        },
        op::COMPARE_AND_WRITE => RwFields {
            lba: Lba(cdb.be64(2)),
            count: BlockCount(u64::from(cdb.u8(13))),
            flags: cdb.u8(1),
        },
        _ => RwFields {
            lba: Lba(cdb.be64(2)),
            count: BlockCount(u64::from(cdb.be32(10))),
            flags: cdb.u8(1),
        },
    }
}

/// RDPROTECT / WRPROTECT / VRPROTECT must be zero: the units have no protection
/// information (SBC-3 §4.22; PROTECT = 0 in INQUIRY).
fn check_no_protection(f: &RwFields) -> Result<(), Sense> {
    if f.flags & 0xE0 != 0 {
        return Err(Sense::invalid_field_in_cdb(1));
    }
    Ok(())
}

fn check_transfer_length(lu: &LogicalUnit, count: BlockCount, byte: u16) -> Result<(), Sense> {
    if count.0 > u64::from(limits::max_transfer_blocks(lu.block_size())) {
        return Err(Sense::invalid_field_in_cdb(byte));
    }
    Ok(())
}

/// The CDB byte holding the transfer length (for field pointers).
fn length_byte(cdb: Cdb<'_>) -> u16 {
    match cdb.opcode() {
        op::READ_6 | op::WRITE_6 => 4,
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 | op::VERIFY_12 => 6,
        op::READ_16
        | op::WRITE_16
        | op::WRITE_AND_VERIFY_16
        | op::VERIFY_16
        | op::ORWRITE_16
        | op::PRE_FETCH_16 => 10,
        op::WRITE_ATOMIC_16 => 12,
        op::COMPARE_AND_WRITE => 13,
        _ => 7,
    }
}

fn range(lu: &LogicalUnit, f: &RwFields) -> Result<BlockRange, Sense> {
    BlockRange::checked(f.lba, f.count, lu.num_blocks())
}

fn read_error(e: std::io::Error) -> Sense {
    if crate::device::is_transitioning(&e) {
        return Sense::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION;
    }
    Sense::MEDIUM_ERROR_UNRECOVERED_READ_ERROR
}

fn write_error(e: std::io::Error) -> Sense {
    if crate::device::is_transitioning(&e) {
        return Sense::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION;
    }
    Sense::MEDIUM_ERROR_WRITE_ERROR
}

fn usize_of(n: u64) -> Result<usize, Sense> {
    usize::try_from(n).map_err(|_| Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB)
}

/// Reads a range into one freshly allocated buffer (the only copy of the data).
fn read_range(lu: &LogicalUnit, r: &BlockRange) -> Result<Bytes, Sense> {
    let bs = lu.block_size();
    let len = usize_of(r.bytes(bs))?;
    let mut buf = BytesMut::zeroed(len);
    if len > 0 {
        lu.device
            .read_at(r.offset(bs), &mut buf)
            .map_err(read_error)?;
    }
    Ok(buf.freeze())
}

/// Whether a write must be durable on return: FUA, or the write cache is disabled.
fn effective_fua(lu: &LogicalUnit, fua: bool) -> bool {
    fua || !lu.lock().mode.wce
}

/// The Data-Out bytes for `r`. When the initiator sent fewer whole blocks than the CDB
/// names (the iSCSI expected length was smaller: residual overflow, RFC 7143 §11.4.5.2),
/// only the blocks that arrived are written; a partial block is refused.
fn data_for<'d>(ctx: &Ctx<'d>, r: &BlockRange) -> Result<(&'d [u8], BlockRange), Sense> {
    let bs = ctx.lu.block_size();
    let need = usize_of(r.bytes(bs))?;
    let got = ctx.req.data_out;
    if let Some(d) = got.get(..need) {
        return Ok((d, *r));
    }
    let bsz = bs as usize;
    if got.len() % bsz != 0 {
        return Err(Sense::new(
            crate::sense::SenseKey::IllegalRequest,
            0x0E,
            0x03,
        ));
    }
    let blocks = (got.len() / bsz) as u64;
    Ok((
        got,
        BlockRange {
            lba: r.lba,
            count: BlockCount(blocks),
        },
    ))
}

/// READ(6/10/12/16) (SBC-3 §5.8-§5.11).
pub(crate) fn read(ctx: &Ctx<'_>) -> CmdResult {
    let f = rw_fields(ctx.cdb);
    check_no_protection(&f)?;
    check_transfer_length(ctx.lu, f.count, length_byte(ctx.cdb))?;
    let r = range(ctx.lu, &f)?;
    if ctx.cached_only {
        return read_cached(ctx.lu, &r);
    }
    Ok(Done::Good(read_range(ctx.lu, &r)?))
}

/// Reads larger than this are left to the I/O threads even when cached: copying them
/// would hold the connection's thread (a runtime thread) too long.
pub(crate) const CACHED_READ_MAX: u64 = 64 << 10;

/// [`read_range`] only from memory ([`crate::BlockDevice::read_cached`]).
fn read_cached(lu: &LogicalUnit, r: &BlockRange) -> CmdResult {
    let bs = lu.block_size();
    let len = r.bytes(bs);
    if len > CACHED_READ_MAX {
        return Err(Failure::WouldWait);
    }
    let mut buf = BytesMut::zeroed(usize_of(len)?);
    if len > 0 && !lu.device.read_cached(r.offset(bs), &mut buf) {
        return Err(Failure::WouldWait);
    }
    Ok(Done::Good(buf.freeze()))
}

/// WRITE(6/10/12/16) (SBC-3 §5.31-§5.34).
pub(crate) fn write(ctx: &Ctx<'_>) -> CmdResult {
    let (f, data, r) = write_prologue(ctx, 0)?;
    let fua = effective_fua(ctx.lu, f.flags & 0x08 != 0);
    if data.is_empty() {
        return good();
    }
    // Held while the write is placed, not until it completes: a COMPARE AND WRITE or
    // SANITIZE that follows is ordered after it all the same.
    let _shared = ctx.lu.medium_shared()?;
    let offset = r.offset(ctx.lu.block_size());
    match ctx.take_responder() {
        Some(respond) => {
            let descriptor = ctx.lu.lock().mode.d_sense;
            let done = move |r: std::io::Result<()>| {
                let result = r.map_err(|e| write_error(e).into()).and_then(|()| good());
                respond.send(crate::lu::response_of(result, descriptor))
            };
            // `data` is a prefix of the command's buffer (`data_for`): no copy.
            let data = ctx.req.data_out.slice(..data.len());
            ctx.lu
                .device
                .write_bytes_then(offset, data, fua, Box::new(done));
            Ok(Done::Deferred)
        }
        None => {
            ctx.lu
                .device
                .write_at(offset, data, fua)
                .map_err(write_error)?;
            good()
        }
    }
}

/// What WRITE, WRITE AND VERIFY and ORWRITE check before they touch the medium, in this
/// order: protection and `reserved` bits of byte 1, transfer length limit, LBA range,
/// write protection; then the Data-Out blocks to write.
fn write_prologue<'d>(
    ctx: &Ctx<'d>,
    reserved: u8,
) -> Result<(RwFields, &'d [u8], BlockRange), Sense> {
    let f = rw_fields(ctx.cdb);
    check_no_protection(&f)?;
    if f.flags & reserved != 0 {
        return Err(Sense::invalid_field_in_cdb(1));
    }
    check_transfer_length(ctx.lu, f.count, length_byte(ctx.cdb))?;
    let r = range(ctx.lu, &f)?;
    if let Some(s) = ctx.lu.write_protect() {
        return Err(s);
    }
    let (data, r) = data_for(ctx, &r)?;
    Ok((f, data, r))
}

fn write_blocks(lu: &LogicalUnit, r: &BlockRange, data: &[u8], fua: bool) -> Result<(), Sense> {
    if data.is_empty() {
        return Ok(());
    }
    let _shared = lu.medium_shared()?;
    lu.device
        .write_at(r.offset(lu.block_size()), data, fua)
        .map_err(write_error)
}

/// WRITE AND VERIFY(10/12/16) (SBC-3 §5.35-§5.37). The data is written through to the
/// medium (FUA) so the verification the command asks for is meaningful; with BYTCHK=1 the
/// comparison of the written data against itself cannot fail.
pub(crate) fn write_and_verify(ctx: &Ctx<'_>) -> CmdResult {
    // Byte 1: WRPROTECT, DPO (bit 4), BYTCHK (bit 1); bits 3, 2 and 0 are reserved.
    let (_, data, r) = write_prologue(ctx, 0x0D)?;
    write_blocks(ctx.lu, &r, data, true)?;
    good()
}

/// The offset of the first differing byte.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// VERIFY(10/12/16) (SBC-3 §5.28-§5.30): BYTCHK 00b verifies the medium (reads it),
/// 01b compares with the Data-Out buffer, 11b compares every block with one block.
pub(crate) fn verify(ctx: &Ctx<'_>) -> CmdResult {
    let f = rw_fields(ctx.cdb);
    check_no_protection(&f)?;
    let bytchk = (f.flags >> 1) & 0x03;
    if bytchk == 0x02 || f.flags & 0x09 != 0 {
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    check_transfer_length(ctx.lu, f.count, length_byte(ctx.cdb))?;
    let r = range(ctx.lu, &f)?;
    let bs = usize_of(u64::from(ctx.lu.block_size()))?;
    let need = match bytchk {
        0 => 0,
        1 => usize_of(r.bytes(ctx.lu.block_size()))?,
        _ => bs,
    };
    let expected = if bytchk == 0 {
        &[][..]
    } else {
        ctx.req.data_out.get(..need).ok_or(DATA_OUT_MISMATCH)?
    };
    let medium = read_range(ctx.lu, &r)?;
    let mismatch = match bytchk {
        0 => None,
        1 => first_difference(&medium, expected),
        _ => medium
            .chunks(bs)
            .enumerate()
            .find_map(|(i, blk)| first_difference(blk, expected).map(|o| i * bs + o)),
    };
    if let Some(off) = mismatch {
        return Err(Sense::MISCOMPARE_DURING_VERIFY_OPERATION
            .with_information(off as u64)
            .into());
    }
    good()
}

/// PRE-FETCH(10/16) (SBC-3 §5.6/§5.7). The range is handed to the device as a hint;
/// CONDITION MET says it was accepted.
pub(crate) fn pre_fetch(ctx: &Ctx<'_>) -> CmdResult {
    let f = rw_fields(ctx.cdb);
    if f.flags & 0xFD != 0 {
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    let r = range(ctx.lu, &f)?;
    let bs = ctx.lu.block_size();
    if r.count.0 > 0 {
        ctx.lu
            .device
            .prefetch(r.offset(bs), r.bytes(bs))
            .map_err(read_error)?;
    }
    Ok(Done::ConditionMet)
}

/// SYNCHRONIZE CACHE(10/16) (SBC-3 §5.22/§5.23): the whole device is flushed, which
/// covers any range asked for.
pub(crate) fn synchronize_cache(ctx: &Ctx<'_>) -> CmdResult {
    let f = rw_fields(ctx.cdb);
    // Byte 1: SYNC_NV (bit 2, obsolete), IMMED (bit 1); the rest is reserved.
    if f.flags & 0xF9 != 0 {
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    let num_blocks = ctx.lu.num_blocks();
    if f.lba.0 >= num_blocks
        || !matches!(f.lba.0.checked_add(f.count.0), Some(e) if e <= num_blocks)
    {
        return Err(Sense::ILLEGAL_REQUEST_LBA_OUT_OF_RANGE.into());
    }
    ctx.lu.device.flush().map_err(write_error)?;
    good()
}

/// READ CAPACITY(10) (SBC-3 §5.15).
pub(crate) fn read_capacity_10(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    // PMI (obsolete) clear with a non-zero LOGICAL BLOCK ADDRESS is invalid.
    if !cdb.bit(8, 0) && cdb.be32(2) != 0 {
        return Err(Sense::invalid_field_in_cdb(2).into());
    }
    let last = ctx.lu.num_blocks().saturating_sub(1);
    let mut b = vec![0u8; 8];
    put(
        &mut b,
        0,
        &u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes(),
    );
    put(&mut b, 4, &ctx.lu.block_size().to_be_bytes());
    data_in(b, 8)
}

/// READ CAPACITY(16) (SBC-3 §5.16): LBPME and LBPRZ when the device deallocates.
pub(crate) fn read_capacity_16(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    if !cdb.bit(14, 0) && cdb.be64(2) != 0 {
        return Err(Sense::invalid_field_in_cdb(2).into());
    }
    let alloc = usize::try_from(cdb.be32(10)).unwrap_or(usize::MAX);
    let last = ctx.lu.num_blocks().saturating_sub(1);
    let mut b = vec![0u8; 32];
    put(&mut b, 0, &last.to_be_bytes());
    put(&mut b, 8, &ctx.lu.block_size().to_be_bytes());
    // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: initiators align I/O and unmaps to it.
    put(&mut b, 13, &[physical_block_exponent(ctx.lu)]);
    if ctx.lu.device.supports_discard() {
        put(&mut b, 14, &[0x80 | 0x40]); // LBPME, LBPRZ
    }
    data_in(b, alloc)
}

/// log2 of logical blocks per physical block (READ CAPACITY (16) byte 13).
pub(crate) fn physical_block_exponent(lu: &LogicalUnit) -> u8 {
    let logical = lu.block_size();
    let physical = lu.config.physical_block_size;
    if logical == 0 || physical <= logical || !physical.is_power_of_two() || physical > 32768 {
        0
    } else {
        (physical / logical).trailing_zeros() as u8
    }
}

/// GET LBA STATUS (SBC-3 §5.5).
pub(crate) fn get_lba_status(ctx: &Ctx<'_>) -> CmdResult {
    /// Descriptors returned at most per command.
    const DESCRIPTORS_MAX: usize = 64;
    let cdb = ctx.cdb;
    let lba = cdb.be64(2);
    let alloc = usize::try_from(cdb.be32(10)).unwrap_or(usize::MAX);
    let num_blocks = ctx.lu.num_blocks();
    if lba >= num_blocks {
        return Err(Sense::ILLEGAL_REQUEST_LBA_OUT_OF_RANGE.into());
    }
    let bs = u64::from(ctx.lu.block_size());
    let room = alloc.saturating_sub(8) / 16;
    let wanted = room.clamp(1, DESCRIPTORS_MAX);
    let mut b = vec![0u8; 8];
    let mut at = lba;
    for _ in 0..wanted {
        if at >= num_blocks {
            break;
        }
        let max_len = (num_blocks - at).min(u64::from(u32::MAX)) * bs;
        let ext = ctx
            .lu
            .device
            .provisioning(at * bs, max_len)
            .map_err(read_error)?;
        let blocks = (ext.len / bs).max(1).min(num_blocks - at);
        let mut d = [0u8; 16];
        put(&mut d, 0, &at.to_be_bytes());
        put(
            &mut d,
            8,
            &u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes(),
        );
        d[12] = match ext.status {
            Provisioning::Mapped => 0x00,
            Provisioning::Deallocated => 0x01,
        };
        b.extend_from_slice(&d);
        at = at.saturating_add(blocks);
    }
    let len = u32::try_from(b.len() - 4).unwrap_or(0);
    put(&mut b, 0, &len.to_be_bytes());
    data_in(b, alloc)
}

/// COMPARE AND WRITE (SBC-3 §5.2): atomic against every other write of the logical unit.
/// On a miscompare nothing is written and INFORMATION holds the offset of the first
/// differing byte.
pub(crate) fn compare_and_write(ctx: &Ctx<'_>) -> CmdResult {
    let f = rw_fields(ctx.cdb);
    check_no_protection(&f)?;
    if f.flags & 0x07 != 0 {
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    if f.count.0 > u64::from(limits::MAX_COMPARE_AND_WRITE_BLOCKS) {
        return Err(Sense::invalid_field_in_cdb(13).into());
    }
    // Zero blocks is a no-op (SBC-3 §5.2), but data sent with it means the initiator
    // asked for 256 blocks, which the one-byte field cannot say (see `data_out_len`).
    if f.count.0 == 0 && !ctx.req.data_out.is_empty() {
        return Err(Sense::invalid_field_in_cdb(13).into());
    }
    let r = range(ctx.lu, &f)?;
    let bs = ctx.lu.block_size();
    let half = usize_of(r.bytes(bs))?;
    if ctx.req.data_out.len() != 2 * half {
        return Err(DATA_OUT_MISMATCH.into());
    }
    if let Some(s) = ctx.lu.write_protect() {
        return Err(s.into());
    }
    if half == 0 {
        return good();
    }
    let (verify_data, write_data) = ctx.req.data_out.split_at(half);
    let fua = effective_fua(ctx.lu, f.flags & 0x08 != 0);
    let _exclusive = ctx.lu.medium_exclusive()?;
    let medium = read_range(ctx.lu, &r)?;
    if let Some(off) = first_difference(&medium, verify_data) {
        return Err(Sense::MISCOMPARE_DURING_VERIFY_OPERATION
            .with_information(off as u64)
            .into());
    }
    ctx.lu
        .device
        .write_at(r.offset(bs), write_data, fua)
        .map_err(write_error)?;
    good()
}

/// ORWRITE(16) (SBC-3 §5.?): ORs the Data-Out buffer into the medium, atomically with
/// respect to other writes.
pub(crate) fn orwrite(ctx: &Ctx<'_>) -> CmdResult {
    let (f, data, r) = write_prologue(ctx, 0x07)?;
    if data.is_empty() {
        return good();
    }
    let fua = effective_fua(ctx.lu, f.flags & 0x08 != 0);
    let bs = ctx.lu.block_size();
    let _exclusive = ctx.lu.medium_exclusive()?;
    let medium = read_range(ctx.lu, &r)?;
    let mut merged = BytesMut::from(&medium[..]);
    for (m, d) in merged.iter_mut().zip(data) {
        *m |= d;
    }
    ctx.lu
        .device
        .write_at(r.offset(bs), &merged, fua)
        .map_err(write_error)?;
    good()
}

/// WRITE ATOMIC(16) (SBC-4 §5.48): one device write under the exclusive lock, so no other
/// write of the unit interleaves with it.
pub(crate) fn write_atomic(ctx: &Ctx<'_>) -> CmdResult {
    let f = rw_fields(ctx.cdb);
    check_no_protection(&f)?;
    if f.flags & 0x07 != 0 {
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    if f.count.0 > u64::from(limits::max_atomic_blocks(ctx.lu.block_size())) {
        return Err(Sense::invalid_field_in_cdb(12).into());
    }
    let r = range(ctx.lu, &f)?;
    if let Some(s) = ctx.lu.write_protect() {
        return Err(s.into());
    }
    let bs = ctx.lu.block_size();
    let need = usize_of(r.bytes(bs))?;
    let data = ctx.req.data_out.get(..need).ok_or(DATA_OUT_MISMATCH)?;
    if data.is_empty() {
        return good();
    }
    let fua = effective_fua(ctx.lu, f.flags & 0x08 != 0);
    let _exclusive = ctx.lu.medium_exclusive()?;
    ctx.lu
        .device
        .write_at(r.offset(bs), data, fua)
        .map_err(write_error)?;
    good()
}

/// Writes `pattern` (one block) repeatedly over `r`.
fn fill(lu: &LogicalUnit, r: &BlockRange, pattern: &[u8], fua: bool) -> Result<(), Sense> {
    let bs = lu.block_size();
    let bsz = usize_of(u64::from(bs))?;
    if pattern.len() != bsz || r.count.0 == 0 {
        return Ok(());
    }
    let per_chunk = (FILL_CHUNK_BYTES / bsz).max(1) as u64;
    let chunk_blocks = per_chunk.min(r.count.0);
    let mut chunk = Vec::with_capacity(usize_of(chunk_blocks)? * bsz);
    for _ in 0..chunk_blocks {
        chunk.extend_from_slice(pattern);
    }
    let _shared = lu.medium_shared()?;
    let mut lba = r.lba.0;
    let end = r.lba.0 + r.count.0;
    while lba < end {
        let n = per_chunk.min(end - lba);
        let bytes = usize_of(n)? * bsz;
        let slice = chunk.get(..bytes).unwrap_or(&chunk);
        lu.device
            .write_at(lba * u64::from(bs), slice, fua)
            .map_err(write_error)?;
        lba += n;
    }
    Ok(())
}

/// WRITE SAME(10/16) (SBC-3 §5.39/§5.40).
///
/// A NUMBER OF LOGICAL BLOCKS of zero means "to the end of the medium" (WSNZ = 0); the
/// range must then still fit the MAXIMUM WRITE SAME LENGTH. UNMAP deallocates when the
/// device can, whatever the Data-Out buffer holds: SBC-3 §5.? lets the device server
/// unmap instead of writing, and deallocated blocks read as zeroes (LBPRZ = 1), which is
/// what initiators then expect to read (LIO does the same). ANCHOR is not supported;
/// NDOB (WRITE SAME(16)) writes zeroes.
pub(crate) fn write_same(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    let f = rw_fields(cdb);
    check_no_protection(&f)?;
    let sixteen = cdb.opcode() == op::WRITE_SAME_16;
    let anchor = f.flags & 0x10 != 0;
    let unmap = f.flags & 0x08 != 0;
    let ndob = sixteen && f.flags & 0x01 != 0;
    // Reserved bits: 10-byte bits 2..0 (bit 1 was LBDATA, bit 2 PBDATA: obsolete),
    // 16-byte bits 2..1.
    if f.flags & if sixteen { 0x06 } else { 0x07 } != 0 {
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    if anchor {
        // ANC_SUP = 0 in the logical block provisioning VPD page.
        return Err(Sense::invalid_bit_in_cdb(1, 4).into());
    }
    if unmap && !ctx.lu.device.supports_discard() {
        // LBPWS = 0 on a fully provisioned unit: the UNMAP bit is not supported.
        return Err(Sense::invalid_bit_in_cdb(1, 3).into());
    }
    let num_blocks = ctx.lu.num_blocks();
    if f.lba.0 >= num_blocks {
        return Err(Sense::ILLEGAL_REQUEST_LBA_OUT_OF_RANGE.into());
    }
    let count = if f.count.0 == 0 {
        BlockCount(num_blocks - f.lba.0)
    } else {
        f.count
    };
    let r = BlockRange::checked(f.lba, count, num_blocks)?;
    if r.count.0 > u64::from(limits::max_write_same_blocks(ctx.lu.block_size())) {
        return Err(Sense::invalid_field_in_cdb(length_byte(cdb)).into());
    }
    // A write-protected unit says so before it looks at the Data-Out.
    if let Some(s) = ctx.lu.write_protect() {
        return Err(s.into());
    }
    let bs = ctx.lu.block_size();
    let bsz = usize_of(u64::from(bs))?;
    let zeroes;
    let pattern: &[u8] = if ndob {
        if !ctx.req.data_out.is_empty() {
            return Err(DATA_OUT_MISMATCH.into());
        }
        zeroes = vec![0u8; bsz];
        &zeroes
    } else {
        if ctx.req.data_out.len() != bsz {
            return Err(DATA_OUT_MISMATCH.into());
        }
        ctx.req.data_out
    };
    let fua = effective_fua(ctx.lu, false);
    let device = &ctx.lu.device;
    if unmap && device.supports_discard() {
        let _shared = ctx.lu.medium_shared()?;
        device
            .discard(r.offset(bs), r.bytes(bs))
            .map_err(write_error)?;
        return good();
    }
    fill(ctx.lu, &r, pattern, fua)?;
    good()
}

/// UNMAP (SBC-3 §5.27).
pub(crate) fn unmap(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    if cdb.bit(1, 0) {
        return Err(Sense::invalid_bit_in_cdb(1, 0).into()); // ANCHOR: ANC_SUP = 0
    }
    let param_len = usize::from(cdb.be16(7));
    if param_len == 0 {
        return good();
    }
    if param_len < 8 {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let data = ctx
        .req
        .data_out
        .get(..param_len)
        .ok_or(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)?;
    let data_len = usize::from(get_be16(data, 0));
    let bd_len = usize::from(get_be16(data, 2));
    if data_len + 2 > param_len || bd_len + 8 > param_len {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let descriptors = bd_len / 16;
    if descriptors > limits::MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_field_in_parameter_list(2).into());
    }
    if let Some(s) = ctx.lu.write_protect() {
        return Err(s.into());
    }
    let num_blocks = ctx.lu.num_blocks();
    let mut ranges = Vec::with_capacity(descriptors);
    for i in 0..descriptors {
        let at = 8 + 16 * i;
        let lba = get_be64(data, at);
        let count = u64::from(get_be32(data, at + 8));
        if count == 0 {
            continue;
        }
        ranges.push(BlockRange::checked(
            Lba(lba),
            BlockCount(count),
            num_blocks,
        )?);
    }
    let bs = ctx.lu.block_size();
    let device = &ctx.lu.device;
    let _shared = ctx.lu.medium_shared()?;
    for r in ranges {
        device
            .discard(r.offset(bs), r.bytes(bs))
            .map_err(write_error)?;
    }
    good()
}

/// READ DEFECT DATA(10/12) (SBC-3 §5.?): the defect lists are empty.
pub(crate) fn read_defect_data(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    if cdb.opcode() == op::READ_DEFECT_DATA_10 {
        let flags = cdb.u8(2) & 0x1F;
        let alloc = usize::from(cdb.be16(7));
        data_in(vec![0, flags, 0, 0], alloc)
    } else {
        let flags = cdb.u8(1) & 0x1F;
        let alloc = usize::try_from(cdb.be32(6)).unwrap_or(usize::MAX);
        data_in(vec![0, flags, 0, 0, 0, 0, 0, 0], alloc)
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<crate::TargetDevice>();
}
