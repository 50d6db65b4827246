//! Primary commands (SPC-4): INQUIRY, REPORT LUNS, REQUEST SENSE, TEST UNIT READY,
//! REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, REPORT TARGET PORT
//! GROUPS, and the SBC media commands START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL.

use bytes::Bytes;

use crate::cdb::{put, put_u8, Cdb};
use crate::commands::{self, COMMANDS};
use crate::lu::{data_in, good, CmdResult, Ctx};
use crate::sense::Sense;
use crate::target_device::{NoLuResult, TargetDevice};
use crate::vpd;

/// Recommended command timeout reported with RCTD (seconds).
const RECOMMENDED_TIMEOUT_S: u32 = 60;

/// INQUIRY (SPC-4 §6.4).
pub(crate) fn inquiry(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    check_inquiry_cdb(cdb)?;
    let alloc = usize::from(cdb.be16(3));
    if cdb.bit(1, 0) {
        let code = cdb.u8(2);
        let page = vpd::vpd_page(ctx.lu, &ctx.nexus().target_port, code)
            .ok_or(Sense::invalid_field_in_cdb(2))?;
        return data_in(page, alloc);
    }
    // Explicit ALUA (SET TARGET PORT GROUPS) only where a cluster publishes port
    // groups and acts on the requests.
    let explicit = !ctx.target.port_groups().is_empty();
    data_in(vpd::standard_inquiry(ctx.lu, explicit), alloc)
}

fn check_inquiry_cdb(cdb: Cdb<'_>) -> Result<(), Sense> {
    // CMDDT (obsolete) and reserved bits of byte 1.
    if cdb.u8(1) & 0xFE != 0 {
        return Err(Sense::invalid_field_in_cdb(1));
    }
    // A page code without EVPD is invalid (SPC-4 §6.4.1).
    if !cdb.bit(1, 0) && cdb.u8(2) != 0 {
        return Err(Sense::invalid_field_in_cdb(2));
    }
    Ok(())
}

/// INQUIRY addressed to a LUN without a logical unit.
pub(crate) fn inquiry_no_lu(cdb: Cdb<'_>) -> NoLuResult {
    check_inquiry_cdb(cdb)?;
    let alloc = usize::from(cdb.be16(3));
    if cdb.bit(1, 0) {
        // Only the supported pages list: the qualifier says there is no unit here.
        if cdb.u8(2) != 0 {
            return Err(Sense::invalid_field_in_cdb(2));
        }
        let mut p = vec![0x7F, 0x00, 0x00, 0x01, 0x00];
        p.truncate(alloc);
        return Ok(Bytes::from(p));
    }
    let mut d = vpd::standard_inquiry_no_lu();
    d.truncate(alloc);
    Ok(Bytes::from(d))
}

/// REPORT LUNS through a logical unit.
pub(crate) fn report_luns_cmd(ctx: &Ctx<'_>) -> CmdResult {
    let data = report_luns(ctx.target, ctx.cdb)?;
    Ok(crate::lu::Done::Good(data))
}

/// REPORT LUNS (SPC-4 §6.33); works through any LUN, with or without a logical unit.
pub(crate) fn report_luns(target: &TargetDevice, cdb: Cdb<'_>) -> NoLuResult {
    let select = cdb.u8(2);
    let alloc = usize::try_from(cdb.be32(6)).unwrap_or(usize::MAX);
    // SPC-4: an allocation length below 16 is an error.
    if alloc < 16 {
        return Err(Sense::invalid_field_in_cdb(6));
    }
    let luns = match select {
        0x00 | 0x02 => target.luns(),
        0x01 => Vec::new(), // well known logical units: none
        _ => return Err(Sense::invalid_field_in_cdb(2)),
    };
    let mut b = Vec::with_capacity(8 + 8 * luns.len());
    let list_len = u32::try_from(luns.len() * 8).unwrap_or(u32::MAX);
    b.extend_from_slice(&list_len.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    for lun in luns {
        b.extend_from_slice(&encode_lun(lun));
    }
    b.truncate(alloc);
    Ok(Bytes::from(b))
}

/// The 8-byte LUN field: peripheral device addressing below 256, flat space above
/// (SAM-5 §4.7.7).
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut out = [0u8; 8];
    if lun < 256 {
        out[1] = lun as u8;
    } else {
        let l = (lun & 0x3FFF) as u16;
        out[0] = 0x40 | (l >> 8) as u8;
        out[1] = (l & 0xFF) as u8;
    }
    out
}

/// TEST UNIT READY (SPC-4 §6.47).
pub(crate) fn test_unit_ready(_ctx: &Ctx<'_>) -> CmdResult {
    good()
}

/// REQUEST SENSE (SPC-4 §6.39). A pending unit attention is returned as the parameter
/// data and cleared (SAM-5 §5.14); otherwise the sanitize state when there is one
/// (SANITIZE IN PROGRESS with its progress indication, or SANITIZE COMMAND FAILED; SBC-3
/// §4.11); otherwise NO SENSE.
pub(crate) fn request_sense(ctx: &Ctx<'_>) -> CmdResult {
    let sense = {
        let mut st = ctx.lu.lock();
        let ua = st
            .nexuses
            .get_mut(ctx.nexus())
            .and_then(|n| n.ua.pop_front());
        ua.or_else(|| st.sanitize.state.request_sense())
    };
    let data = request_sense_data(ctx.cdb, sense.unwrap_or(Sense::NO_SENSE))?;
    Ok(crate::lu::Done::Good(data))
}

/// REQUEST SENSE parameter data for `sense` in the format the DESC bit asks for.
pub(crate) fn request_sense_data(cdb: Cdb<'_>, sense: Sense) -> NoLuResult {
    if cdb.u8(1) & 0xFE != 0 {
        return Err(Sense::invalid_field_in_cdb(1));
    }
    let alloc = usize::from(cdb.u8(4));
    let mut b = sense.to_bytes(cdb.bit(1, 0)).to_vec();
    b.truncate(alloc);
    Ok(Bytes::from(b))
}

/// START STOP UNIT (SBC-3 §5.25). The units are not removable and are shared by many
/// initiators, so a stop does not take the medium away from the others: it only flushes
/// the cache (unless NO_FLUSH), as SBC-3 asks before entering the stopped state.
pub(crate) fn start_stop_unit(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    let power_condition = cdb.u8(4) >> 4;
    // SBC-3 Table 93: the defined power conditions.
    if !matches!(
        power_condition,
        0x0 | 0x1 | 0x2 | 0x3 | 0x5 | 0x7 | 0xA | 0xB
    ) {
        return Err(Sense::invalid_field_in_cdb(4).into());
    }
    let start = cdb.bit(4, 0);
    let loej = cdb.bit(4, 1);
    let no_flush = cdb.bit(4, 2);
    if loej && power_condition == 0 {
        let prevented = ctx.lu.lock().nexuses.values().any(|n| n.prevent);
        if prevented {
            return Err(Sense::ILLEGAL_REQUEST_MEDIUM_REMOVAL_PREVENTED.into());
        }
    }
    if !start && !no_flush && power_condition == 0 {
        ctx.lu
            .device
            .flush()
            .map_err(|_| Sense::MEDIUM_ERROR_WRITE_ERROR)?;
    }
    good()
}

/// PREVENT ALLOW MEDIUM REMOVAL (SBC-3 §5.11): recorded per I_T nexus; cleared by
/// nexus loss and resets.
pub(crate) fn prevent_allow(ctx: &Ctx<'_>) -> CmdResult {
    let prevent = ctx.cdb.u8(4) & 0x03;
    if prevent > 1 {
        return Err(Sense::invalid_field_in_cdb(4).into());
    }
    let mut st = ctx.lu.lock();
    st.nexuses.entry(ctx.nexus().clone()).or_default().prevent = prevent == 1;
    drop(st);
    good()
}

fn timeouts_descriptor(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x00, 0x0A, 0x00, 0x00]);
    out.extend_from_slice(&0u32.to_be_bytes()); // nominal: not specified
    out.extend_from_slice(&RECOMMENDED_TIMEOUT_S.to_be_bytes());
}

/// REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35).
pub(crate) fn report_supported_operation_codes(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    let rctd = cdb.bit(2, 7);
    let options = cdb.u8(2) & 0x07;
    let requested_opcode = cdb.u8(3);
    let requested_sa = cdb.be16(4);
    let alloc = usize::try_from(cdb.be32(6)).unwrap_or(usize::MAX);
    if cdb.u8(2) & 0x78 != 0 {
        return Err(Sense::invalid_field_in_cdb(2).into());
    }
    match options {
        0 => {
            let mut b = vec![0u8; 4];
            let thin = ctx.lu.device.supports_discard();
            for c in COMMANDS.iter().filter(|c| commands::implemented(c, thin)) {
                b.push(c.opcode);
                b.push(0);
                b.extend_from_slice(&u16::from(c.service_action.unwrap_or(0)).to_be_bytes());
                b.push(0);
                b.push(if rctd { 0x02 } else { 0 } | u8::from(c.service_action.is_some()));
                b.extend_from_slice(&u16::try_from(c.cdb_len()).unwrap_or(0).to_be_bytes());
                if rctd {
                    timeouts_descriptor(&mut b);
                }
            }
            let len = u32::try_from(b.len() - 4).unwrap_or(u32::MAX);
            put(&mut b, 0, &len.to_be_bytes());
            data_in(b, alloc)
        }
        1..=3 => {
            let with_sa = commands::has_service_actions(requested_opcode);
            // 001b: the operation code must not have service actions; 010b: it must.
            if (options == 1 && with_sa) || (options == 2 && !with_sa) {
                return Err(Sense::invalid_field_in_cdb(2).into());
            }
            let spec = if with_sa {
                u8::try_from(requested_sa)
                    .ok()
                    .and_then(|sa| commands::lookup_by(requested_opcode, sa))
            } else {
                commands::lookup_by(requested_opcode, 0)
            }
            .filter(|c| commands::implemented(c, ctx.lu.device.supports_discard()));
            let mut b = vec![0u8; 4];
            match spec {
                Some(c) => {
                    put_u8(&mut b, 1, if rctd { 0x80 } else { 0 } | 0x03); // SUPPORT 011b
                    put(
                        &mut b,
                        2,
                        &u16::try_from(c.cdb_len()).unwrap_or(0).to_be_bytes(),
                    );
                    b.extend_from_slice(c.usage);
                    if rctd {
                        timeouts_descriptor(&mut b);
                    }
                }
                None => put_u8(&mut b, 1, 0x01), // SUPPORT 001b: not supported
            }
            data_in(b, alloc)
        }
        _ => Err(Sense::invalid_field_in_cdb(2).into()),
    }
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.36): ABORT TASK, ABORT TASK SET,
/// CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET (what the iSCSI transport offers).
pub(crate) fn report_supported_tmfs(ctx: &Ctx<'_>) -> CmdResult {
    let repd = ctx.cdb.bit(2, 7);
    let alloc = usize::try_from(ctx.cdb.be32(6)).unwrap_or(usize::MAX);
    let mut b = vec![0xDA, 0x00, 0x00, 0x00];
    if repd {
        b.resize(16, 0);
        put_u8(&mut b, 3, 0x0C);
    }
    data_in(b, alloc)
}

/// REPORT TARGET PORT GROUPS (SPC-4 §6.37): every group the target device lists, with
/// its state and ports; without a table, the one group of the port the command came
/// through, active/optimized.
pub(crate) fn report_target_port_groups(ctx: &Ctx<'_>) -> CmdResult {
    use crate::alua::{AsymmetricAccessState, TargetPortGroup, SUPPORTED_STATES};
    let extended = ctx.cdb.u8(1) >> 5 == 0x01;
    let alloc = usize::try_from(ctx.cdb.be32(6)).unwrap_or(usize::MAX);
    let port = &ctx.nexus().target_port;
    let mut groups = ctx.target.port_groups();
    if groups.is_empty() {
        groups.push(TargetPortGroup {
            id: port.group,
            state: AsymmetricAccessState::ActiveOptimized,
            preferred: false,
            ports: vec![port.relative_id],
        });
    }
    let mut b = vec![0u8; 4];
    if extended {
        // Format 1; implicit transitions take about a failover (2 s).
        b.extend_from_slice(&[0x10, 0x02, 0x00, 0x00]);
    }
    for g in &groups {
        b.push(u8::from(g.preferred) << 7 | g.state.code());
        b.push(SUPPORTED_STATES);
        b.extend_from_slice(&g.id.to_be_bytes());
        // Reserved, status code (none), vendor specific, target port count.
        let count = u8::try_from(g.ports.len()).unwrap_or(u8::MAX);
        b.extend_from_slice(&[0x00, 0x00, 0x00, count]);
        for p in g.ports.iter().take(usize::from(count)) {
            b.extend_from_slice(&[0x00, 0x00]);
            b.extend_from_slice(&p.to_be_bytes());
        }
    }
    let len = u32::try_from(b.len() - 4).unwrap_or(0);
    put(&mut b, 0, &len.to_be_bytes());
    data_in(b, alloc)
}

/// SET TARGET PORT GROUPS (SPC-4 §6.44): checked here, carried out by the cluster
/// (it moves the primary, then publishes the states, which raises ASYMMETRIC ACCESS
/// STATE CHANGED); GOOD once the request is queued.
pub(crate) fn set_target_port_groups(ctx: &Ctx<'_>) -> CmdResult {
    let len = usize::try_from(ctx.cdb.be32(6)).unwrap_or(usize::MAX);
    if len == 0 {
        return good();
    }
    let data = ctx
        .req
        .data_out
        .get(..len)
        .ok_or(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)?;
    let mut known: Vec<u16> = ctx.target.port_groups().iter().map(|g| g.id).collect();
    if known.is_empty() {
        known.push(ctx.nexus().target_port.group);
    }
    for (group, state) in crate::alua::parse_set_target_port_groups(data, &known)? {
        ctx.target.push_alua_request(crate::alua::AluaRequest {
            group,
            state,
            by: ctx.nexus().clone(),
        });
    }
    good()
}
