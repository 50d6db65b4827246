//! MODE SENSE and MODE SELECT (SPC-4 §6.11-§6.14, §7.5) with the read-write error
//! recovery, caching, control and informational exceptions pages.

use crate::cdb::{get_be16, get_u8, opcode, put, put_u8};
use crate::lu::{data_in, good, CmdResult, Ctx};
use crate::sense::Sense;
use crate::target_device::LuConfig;

/// Changeable mode parameters of a logical unit (shared by all I_T nexuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ModeState {
    /// WCE of the caching page: with it clear every write is forced unit access.
    pub wce: bool,
    /// D_SENSE of the control page: descriptor format sense data.
    pub d_sense: bool,
    /// SWP of the control page: software write protect.
    pub swp: bool,
}

impl ModeState {
    pub fn new(config: &LuConfig) -> ModeState {
        ModeState {
            wce: config.write_cache,
            d_sense: false,
            swp: false,
        }
    }
}

const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0A;
const PAGE_INFORMATIONAL_EXCEPTIONS: u8 = 0x1C;
const PAGE_ALL: u8 = 0x3F;

/// Pages in the order MODE SENSE returns them for "all pages".
const PAGES: [u8; 4] = [
    PAGE_RW_ERROR_RECOVERY,
    PAGE_CACHING,
    PAGE_CONTROL,
    PAGE_INFORMATIONAL_EXCEPTIONS,
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

/// One mode page as MODE SENSE returns it.
fn page(code: u8, pc: PageControl, state: &ModeState, defaults: &ModeState) -> Vec<u8> {
    let s = match pc {
        PageControl::Default => defaults,
        _ => state,
    };
    let changeable = pc == PageControl::Changeable;
    match code {
        PAGE_RW_ERROR_RECOVERY => {
            let mut p = vec![0u8; 12];
            put(&mut p, 0, &[PAGE_RW_ERROR_RECOVERY, 0x0A]);
            if !changeable {
                put_u8(&mut p, 2, 0x80); // AWRE
            }
            p
        }
        PAGE_CACHING => {
            let mut p = vec![0u8; 20];
            put(&mut p, 0, &[PAGE_CACHING, 0x12]);
            put_u8(&mut p, 2, if changeable || s.wce { 0x04 } else { 0x00 });
            p
        }
        PAGE_CONTROL => {
            let mut p = vec![0u8; 12];
            put(&mut p, 0, &[PAGE_CONTROL, 0x0A]);
            if changeable {
                put_u8(&mut p, 2, 0x04); // D_SENSE
                put_u8(&mut p, 4, 0x08); // SWP
            } else {
                put_u8(&mut p, 2, if s.d_sense { 0x04 } else { 0 });
                put_u8(&mut p, 3, 0x10); // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
                put_u8(&mut p, 4, if s.swp { 0x08 } else { 0 });
                put(&mut p, 8, &0xFFFFu16.to_be_bytes()); // BUSY TIMEOUT PERIOD: unlimited
            }
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            put(&mut p, 0, &[PAGE_INFORMATIONAL_EXCEPTIONS, 0x0A]);
            if !changeable {
                put_u8(&mut p, 2, 0x08); // DEXCPT: no informational exception reporting
            }
            p
        }
    }
}

/// MODE SENSE(6) and MODE SENSE(10).
pub(crate) fn mode_sense(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    let ten = cdb.opcode() == opcode::MODE_SENSE_10;
    let dbd = cdb.bit(1, 3);
    let llbaa = ten && cdb.bit(1, 4);
    let pc = match cdb.u8(2) >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        _ => return Err(Sense::ILLEGAL_REQUEST_SAVING_PARAMETERS_NOT_SUPPORTED.into()),
    };
    let page_code = cdb.u8(2) & 0x3F;
    let subpage = cdb.u8(3);
    let alloc = if ten {
        usize::from(cdb.be16(7))
    } else {
        usize::from(cdb.u8(4))
    };

    let (state, read_only) = {
        let st = ctx.lu.lock();
        (st.mode, ctx.lu.config.read_only)
    };
    let defaults = ModeState::new(&ctx.lu.config);
    let mut pages = Vec::new();
    match (page_code, subpage) {
        (PAGE_ALL, 0x00 | 0xFF) => {
            for code in PAGES {
                pages.extend(page(code, pc, &state, &defaults));
            }
        }
        (code, 0x00 | 0xFF) if PAGES.contains(&code) => {
            if subpage == 0xFF && code != PAGE_ALL {
                // Subpage FFh of a page without subpages returns the page itself.
            }
            pages.extend(page(code, pc, &state, &defaults));
        }
        (code, _) if PAGES.contains(&code) || code == PAGE_ALL => {
            return Err(Sense::invalid_field_in_cdb(3).into())
        }
        _ => return Err(Sense::invalid_field_in_cdb(2).into()),
    }

    let block_size = ctx.lu.block_size();
    let num_blocks = ctx.lu.num_blocks();
    let descriptor: Vec<u8> = if dbd {
        Vec::new()
    } else if llbaa {
        let mut d = vec![0u8; 16];
        if pc != PageControl::Changeable {
            put(&mut d, 0, &num_blocks.to_be_bytes());
            put(&mut d, 12, &block_size.to_be_bytes());
        }
        d
    } else {
        let mut d = vec![0u8; 8];
        if pc != PageControl::Changeable {
            let n = u32::try_from(num_blocks).unwrap_or(u32::MAX);
            put(&mut d, 0, &n.to_be_bytes());
            put(&mut d, 5, &block_size.to_be_bytes()[1..]);
        }
        d
    };
    // Device-specific parameter: WP (read-only or SWP) and DPOFUA (SBC-3 §6.4.1).
    let wp = if read_only || state.swp { 0x80 } else { 0 };
    let dsp = wp | 0x10;
    let mut out = Vec::with_capacity(8 + descriptor.len() + pages.len());
    if ten {
        let len = 6 + descriptor.len() + pages.len();
        out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        out.push(0);
        out.push(dsp);
        out.push(u8::from(llbaa && !dbd));
        out.push(0);
        out.extend_from_slice(&u16::try_from(descriptor.len()).unwrap_or(0).to_be_bytes());
    } else {
        let len = 3 + descriptor.len() + pages.len();
        out.push(u8::try_from(len).unwrap_or(u8::MAX));
        out.push(0);
        out.push(dsp);
        out.push(u8::try_from(descriptor.len()).unwrap_or(0));
    }
    out.extend_from_slice(&descriptor);
    out.extend_from_slice(&pages);
    data_in(out, alloc)
}

/// MODE SELECT(6) and MODE SELECT(10): WCE, D_SENSE and SWP can be changed; any other
/// difference from the current values is INVALID FIELD IN PARAMETER LIST. A change
/// raises MODE PARAMETERS CHANGED on the other I_T nexuses (SPC-4 §6.11).
pub(crate) fn mode_select(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    let ten = cdb.opcode() == opcode::MODE_SELECT_10;
    if cdb.bit(1, 0) {
        // SP: saved pages are not supported.
        return Err(Sense::invalid_bit_in_cdb(1, 0).into());
    }
    if cdb.u8(1) & 0xEE != 0 {
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    let param_len = if ten {
        usize::from(cdb.be16(7))
    } else {
        usize::from(cdb.u8(4))
    };
    if param_len == 0 {
        return good();
    }
    let data = ctx
        .req
        .data_out
        .get(..param_len)
        .ok_or(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)?;
    let header_len = if ten { 8 } else { 4 };
    if data.len() < header_len {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let bd_len = if ten {
        usize::from(get_be16(data, 6))
    } else {
        usize::from(get_u8(data, 3))
    };
    let long_lba = ten && get_u8(data, 4) & 0x01 != 0;
    let mut pos = header_len;
    let bd_end = pos.saturating_add(bd_len);
    if bd_end > data.len() {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    // Block descriptors may repeat the current block length (or zero); nothing else.
    let desc_size = if long_lba { 16 } else { 8 };
    while pos + desc_size <= bd_end {
        let block_len = if long_lba {
            crate::cdb::get_be32(data, pos + 12)
        } else {
            u32::from_be_bytes(crate::cdb::get_be(data, pos + 4)) & 0x00FF_FFFF
        };
        if block_len != 0 && block_len != ctx.lu.block_size() {
            return Err(
                Sense::invalid_field_in_parameter_list(u16::try_from(pos).unwrap_or(0)).into(),
            );
        }
        pos += desc_size;
    }
    pos = bd_end;

    let mut st = ctx.lu.lock();
    let mut new = st.mode;
    let defaults = ModeState::new(&ctx.lu.config);
    while pos < data.len() {
        let code = get_u8(data, pos) & 0x3F;
        let spf = get_u8(data, pos) & 0x40 != 0;
        let page_len = usize::from(get_u8(data, pos + 1));
        let field = u16::try_from(pos).unwrap_or(0);
        if spf || !PAGES.contains(&code) {
            return Err(Sense::invalid_field_in_parameter_list(field).into());
        }
        let current = page(code, PageControl::Current, &new, &defaults);
        let mask = page(code, PageControl::Changeable, &new, &defaults);
        let Some(sent) = data.get(pos..pos + 2 + page_len) else {
            return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
        };
        if sent.len() != current.len() {
            return Err(Sense::invalid_field_in_parameter_list(field + 1).into());
        }
        // Byte 0 carries PS, which is reserved in MODE SELECT; compare the page code only.
        for (i, ((s, c), m)) in sent.iter().zip(&current).zip(&mask).enumerate().skip(1) {
            if (s ^ c) & !m != 0 {
                let at = u16::try_from(pos + i).unwrap_or(0);
                return Err(Sense::invalid_field_in_parameter_list(at).into());
            }
        }
        match code {
            PAGE_CACHING => new.wce = get_u8(sent, 2) & 0x04 != 0,
            PAGE_CONTROL => {
                new.d_sense = get_u8(sent, 2) & 0x04 != 0;
                new.swp = get_u8(sent, 4) & 0x08 != 0;
            }
            _ => {}
        }
        pos += 2 + page_len;
    }
    let cache_disabled = st.mode.wce && !new.wce;
    if new != st.mode {
        st.mode = new;
        st.ua_all(
            Some(ctx.nexus()),
            Sense::UNIT_ATTENTION_MODE_PARAMETERS_CHANGED,
        );
    }
    drop(st);
    // Writes acknowledged under WCE=1 must not stay volatile once the initiator relies
    // on WCE=0 semantics.
    if cache_disabled {
        ctx.lu
            .device
            .flush()
            .map_err(|_| Sense::MEDIUM_ERROR_WRITE_ERROR)?;
    }
    good()
}
