//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.3, §6.18): block to block
//! copies between logical units of this target device, named by their NAA designator.

use std::collections::VecDeque;

use crate::cdb::{get_be16, get_be32, get_be64, get_u8, put};
use crate::lu::{data_in, good, CmdResult, Ctx, LogicalUnit};
use crate::sense::{Sense, SenseKey};
use crate::ItNexus;

/// Limits reported by RECEIVE COPY RESULTS OPERATING PARAMETERS and enforced.
pub(crate) mod limits {
    /// MAXIMUM CSCD DESCRIPTOR COUNT.
    pub const MAX_TARGET_DESCRIPTORS: u16 = 8;
    /// MAXIMUM SEGMENT DESCRIPTOR COUNT.
    pub const MAX_SEGMENT_DESCRIPTORS: u16 = 64;
    /// MAXIMUM DESCRIPTOR LIST LENGTH in bytes.
    pub const MAX_DESCRIPTOR_LIST_LENGTH: u32 = 4096;
    /// MAXIMUM SEGMENT LENGTH in bytes (a block to block segment names at most 65535
    /// blocks).
    pub const MAX_SEGMENT_LENGTH: u32 = 256 << 20;
    /// MAXIMUM INLINE DATA LENGTH: inline data is not supported.
    pub const MAX_INLINE_DATA: u32 = 0;
}

/// Copy results held per I_T nexus and list identifier, at most this many in total.
const HELD_RESULTS_MAX: usize = 64;

/// Bytes copied per read/write step.
const COPY_CHUNK_BYTES: u64 = 1 << 20;

const IDENTIFICATION_DESCRIPTOR: u8 = 0xE4;
const BLOCK_TO_BLOCK: u8 = 0x02;
const TARGET_DESCRIPTOR_LEN: usize = 32;
const BLOCK_TO_BLOCK_LEN: usize = 28;

/// Outcome of a finished copy operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CopyStatus {
    ok: bool,
    segments: u16,
    bytes: u64,
}

/// Results of finished copy operations kept for RECEIVE COPY RESULTS.
#[derive(Debug, Default)]
pub(crate) struct CopyResults {
    held: VecDeque<(ItNexus, u8, CopyStatus)>,
}

impl CopyResults {
    fn hold(&mut self, nexus: &ItNexus, list_id: u8, status: CopyStatus) {
        self.held
            .retain(|(n, id, _)| !(n == nexus && *id == list_id));
        if self.held.len() >= HELD_RESULTS_MAX {
            self.held.pop_front();
        }
        self.held.push_back((nexus.clone(), list_id, status));
    }

    fn get(&self, nexus: &ItNexus, list_id: u8) -> Option<CopyStatus> {
        self.held
            .iter()
            .find(|(n, id, _)| n == nexus && *id == list_id)
            .map(|(_, _, s)| *s)
    }

    /// Forgets what an ended I_T nexus had.
    pub fn forget(&mut self, nexus: &ItNexus) {
        self.held.retain(|(n, _, _)| n != nexus);
    }
}

fn copy_aborted(asc: u8, ascq: u8) -> Sense {
    Sense::new(SenseKey::CopyAborted, asc, ascq)
}

struct Segment {
    src: usize,
    dst: usize,
    blocks: u64,
    src_lba: u64,
    dst_lba: u64,
}

/// EXTENDED COPY(LID1) (SPC-4 §6.3).
pub(crate) fn extended_copy(ctx: &Ctx<'_>) -> CmdResult {
    let param_len = usize::try_from(ctx.cdb.be32(10)).unwrap_or(usize::MAX);
    if param_len == 0 {
        return good();
    }
    let data = ctx
        .req
        .data_out
        .get(..param_len)
        .ok_or(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)?;
    if data.len() < 16 {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let list_id = get_u8(data, 0);
    let list_id_usage = (get_u8(data, 1) >> 3) & 0x03;
    let tgt_len = usize::from(get_be16(data, 2));
    let seg_len = usize::try_from(get_be32(data, 8)).unwrap_or(usize::MAX);
    let inline_len = usize::try_from(get_be32(data, 12)).unwrap_or(usize::MAX);
    let total = tgt_len.saturating_add(seg_len).saturating_add(inline_len);
    if total > limits::MAX_DESCRIPTOR_LIST_LENGTH as usize || 16 + total > data.len() {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    if inline_len != 0 {
        return Err(Sense::invalid_field_in_parameter_list(12).into());
    }
    if tgt_len % TARGET_DESCRIPTOR_LEN != 0 {
        return Err(Sense::invalid_field_in_parameter_list(2).into());
    }
    if tgt_len / TARGET_DESCRIPTOR_LEN > usize::from(limits::MAX_TARGET_DESCRIPTORS) {
        return Err(Sense::ILLEGAL_REQUEST_TOO_MANY_TARGET_DESCRIPTORS.into());
    }
    let tgt_list = data.get(16..16 + tgt_len).unwrap_or(&[]);
    let seg_list = data
        .get(16 + tgt_len..16 + tgt_len + seg_len)
        .unwrap_or(&[]);

    // Segment descriptors: count them first (TOO MANY before anything else about them).
    let mut segments = Vec::new();
    let mut pos = 0;
    while pos < seg_list.len() {
        if segments.len() >= usize::from(limits::MAX_SEGMENT_DESCRIPTORS) {
            return Err(Sense::ILLEGAL_REQUEST_TOO_MANY_SEGMENT_DESCRIPTORS.into());
        }
        let kind = get_u8(seg_list, pos);
        let len = usize::from(get_be16(seg_list, pos + 2)) + 4;
        segments.push((pos, kind, len));
        pos += len.max(4);
    }

    // Target (CSCD) descriptors.
    let lus = ctx.target.all_lus();
    let mut targets: Vec<Option<std::sync::Arc<LogicalUnit>>> = Vec::new();
    for d in tgt_list.chunks(TARGET_DESCRIPTOR_LEN) {
        let field = u16::try_from(16 + targets.len() * TARGET_DESCRIPTOR_LEN).unwrap_or(0);
        if get_u8(d, 0) != IDENTIFICATION_DESCRIPTOR {
            return Err(Sense::ILLEGAL_REQUEST_UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE.into());
        }
        if get_u8(d, 1) & 0x1F != 0x00 {
            // Only direct access block devices are copy targets here.
            return Err(Sense::invalid_field_in_parameter_list(field + 1).into());
        }
        let desig_type = get_u8(d, 5) & 0x0F;
        let desig_len = usize::from(get_u8(d, 7));
        let value = d.get(8..8 + desig_len).unwrap_or(&[]);
        let lu = if desig_type == 0x03 {
            lus.iter()
                .find(|lu| {
                    lu.config.naa.get(..value.len()) == Some(value)
                        && value.len() == lu.config.naa.len()
                })
                .cloned()
        } else {
            None
        };
        if let Some(lu) = &lu {
            let block_len = get_be32(d, 28) & 0x00FF_FFFF;
            if block_len != 0 && block_len != lu.block_size() {
                return Err(Sense::invalid_field_in_parameter_list(field + 29).into());
            }
        }
        targets.push(lu);
    }

    let mut parsed = Vec::with_capacity(segments.len());
    for (pos, kind, len) in segments {
        if kind != BLOCK_TO_BLOCK {
            return Err(Sense::ILLEGAL_REQUEST_UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE.into());
        }
        if len != BLOCK_TO_BLOCK_LEN {
            let field = u16::try_from(16 + tgt_len + pos + 2).unwrap_or(0);
            return Err(Sense::invalid_field_in_parameter_list(field).into());
        }
        let s = seg_list.get(pos..pos + len).unwrap_or(&[]);
        parsed.push(Segment {
            src: usize::from(get_be16(s, 4)),
            dst: usize::from(get_be16(s, 6)),
            blocks: u64::from(get_be16(s, 10)),
            src_lba: get_be64(s, 12),
            dst_lba: get_be64(s, 20),
        });
    }

    let mut status = CopyStatus {
        ok: true,
        segments: 0,
        bytes: 0,
    };
    let result = run_segments(&targets, &parsed, &mut status);
    status.ok = result.is_ok();
    if list_id_usage != 0x03 {
        ctx.lu.lock().copies.hold(ctx.nexus(), list_id, status);
    }
    result?;
    good()
}

fn run_segments(
    targets: &[Option<std::sync::Arc<LogicalUnit>>],
    segments: &[Segment],
    status: &mut CopyStatus,
) -> Result<(), Sense> {
    for seg in segments {
        let (Some(Some(src)), Some(Some(dst))) = (targets.get(seg.src), targets.get(seg.dst))
        else {
            return Err(copy_aborted(0x0D, 0x02));
        };
        if src.block_size() != dst.block_size() {
            return Err(copy_aborted(0x00, 0x00));
        }
        let bs = u64::from(src.block_size());
        let in_range = |lu: &LogicalUnit, lba: u64| {
            lba.checked_add(seg.blocks)
                .is_some_and(|e| e <= lu.num_blocks())
        };
        if !in_range(src, seg.src_lba) || !in_range(dst, seg.dst_lba) {
            return Err(copy_aborted(0x00, 0x00));
        }
        if let Some(s) = dst.write_protect() {
            return Err(s);
        }
        let fua = !dst.lock().mode.wce;
        let total = seg.blocks * bs;
        let mut done = 0u64;
        let mut buf = vec![0u8; usize::try_from(COPY_CHUNK_BYTES.min(total)).unwrap_or(0)];
        while done < total {
            let n = COPY_CHUNK_BYTES.min(total - done);
            let chunk = buf
                .get_mut(..usize::try_from(n).unwrap_or(0))
                .unwrap_or(&mut []);
            src.device
                .read_at(seg.src_lba * bs + done, chunk)
                .map_err(|_| Sense::MEDIUM_ERROR_UNRECOVERED_READ_ERROR)?;
            let _shared = dst.medium_shared()?;
            dst.device
                .write_at(seg.dst_lba * bs + done, chunk, fua)
                .map_err(|_| Sense::MEDIUM_ERROR_WRITE_ERROR)?;
            done += n;
            status.bytes += n;
        }
        status.segments = status.segments.saturating_add(1);
    }
    Ok(())
}

/// RECEIVE COPY RESULTS (SPC-4 §6.18): COPY STATUS and OPERATING PARAMETERS.
pub(crate) fn receive_copy_results(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    let alloc = usize::try_from(cdb.be32(10)).unwrap_or(usize::MAX);
    match cdb.service_action() {
        0x00 => {
            let list_id = cdb.u8(2);
            let Some(s) = ctx.lu.lock().copies.get(ctx.nexus(), list_id) else {
                return Err(Sense::invalid_field_in_cdb(2).into());
            };
            let mut b = vec![0u8; 12];
            put(&mut b, 0, &8u32.to_be_bytes());
            put(&mut b, 4, &[if s.ok { 0x01 } else { 0x02 }]);
            put(&mut b, 5, &s.segments.to_be_bytes());
            put(&mut b, 7, &[0x00]); // TRANSFER COUNT UNITS: bytes
            put(
                &mut b,
                8,
                &u32::try_from(s.bytes).unwrap_or(u32::MAX).to_be_bytes(),
            );
            data_in(b, alloc)
        }
        _ => {
            let codes = [BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR];
            let mut b = vec![0u8; 44];
            put(&mut b, 8, &limits::MAX_TARGET_DESCRIPTORS.to_be_bytes());
            put(&mut b, 10, &limits::MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
            put(
                &mut b,
                12,
                &limits::MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes(),
            );
            put(&mut b, 16, &limits::MAX_SEGMENT_LENGTH.to_be_bytes());
            put(&mut b, 20, &limits::MAX_INLINE_DATA.to_be_bytes());
            put(&mut b, 34, &1u16.to_be_bytes()); // total concurrent copies
            put(&mut b, 36, &[1]); // maximum concurrent copies
            put(&mut b, 43, &[codes.len() as u8]);
            b.extend_from_slice(&codes);
            let len = u32::try_from(b.len() - 4).unwrap_or(0);
            put(&mut b, 0, &len.to_be_bytes());
            data_in(b, alloc)
        }
    }
}
