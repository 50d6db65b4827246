//! The command table: every supported operation code (and service action), its CDB
//! usage data for REPORT SUPPORTED OPERATION CODES, its class in the reservation
//! conflict tables, and its handler.

use crate::cdb::{opcode as op, Cdb};
use crate::lu::{CmdResult, Ctx};
use crate::sense::Sense;
use crate::{mode, pr, sanitize, sbc, spc, xcopy};

/// How a command accesses the medium, for the conflict table of SPC-4 §5.13.1 (Table 45)
/// and SBC-3 Table 13.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Allowed under every persistent reservation type.
    Free,
    /// Conflicts with the exclusive access types only.
    Read,
    /// Conflicts with the write exclusive and exclusive access types.
    Write,
    /// PREVENT ALLOW MEDIUM REMOVAL: free with PREVENT=0, write class otherwise.
    PreventAllow,
}

pub(crate) type Handler = fn(&Ctx<'_>) -> CmdResult;

/// One row of the command table.
pub(crate) struct CommandSpec {
    pub opcode: u8,
    /// Service action, for operation codes that have them.
    pub service_action: Option<u8>,
    pub name: &'static str,
    /// CDB usage data (SPC-4 §6.35.3): the bits the device server looks at. Its length is
    /// the CDB length.
    pub usage: &'static [u8],
    pub access: Access,
    pub handler: Handler,
}

impl CommandSpec {
    pub fn cdb_len(&self) -> usize {
        self.usage.len()
    }
}

const F: u8 = 0xFF;

macro_rules! cmd {
    ($op:expr, $sa:expr, $name:literal, $access:ident, $handler:path, [$($u:expr),* $(,)?]) => {
        CommandSpec {
            opcode: $op,
            service_action: $sa,
            name: $name,
            usage: &[$($u),*],
            access: Access::$access,
            handler: $handler,
        }
    };
}

/// Every supported command. Operation codes with service actions list one row per
/// service action.
pub(crate) static COMMANDS: &[CommandSpec] = &[
    cmd!(
        op::TEST_UNIT_READY,
        None,
        "TEST UNIT READY",
        Free,
        spc::test_unit_ready,
        [0x00, 0, 0, 0, 0, 0]
    ),
    cmd!(
        op::REQUEST_SENSE,
        None,
        "REQUEST SENSE",
        Free,
        spc::request_sense,
        [0x03, 0x01, 0, 0, F, 0]
    ),
    cmd!(
        op::READ_6,
        None,
        "READ(6)",
        Read,
        sbc::read,
        [0x08, 0x1F, F, F, F, 0]
    ),
    cmd!(
        op::WRITE_6,
        None,
        "WRITE(6)",
        Write,
        sbc::write,
        [0x0A, 0x1F, F, F, F, 0]
    ),
    cmd!(
        op::INQUIRY,
        None,
        "INQUIRY",
        Free,
        spc::inquiry,
        [0x12, 0x01, F, F, F, 0]
    ),
    cmd!(
        op::MODE_SELECT_6,
        None,
        "MODE SELECT(6)",
        Write,
        mode::mode_select,
        [0x15, 0x11, 0, 0, F, 0]
    ),
    cmd!(
        op::RESERVE_6,
        None,
        "RESERVE(6)",
        Free,
        pr::reserve_legacy,
        [0x16, 0, 0, 0, 0, 0]
    ),
    cmd!(
        op::RELEASE_6,
        None,
        "RELEASE(6)",
        Free,
        pr::release_legacy,
        [0x17, 0, 0, 0, 0, 0]
    ),
    cmd!(
        op::MODE_SENSE_6,
        None,
        "MODE SENSE(6)",
        Read,
        mode::mode_sense,
        [0x1A, 0x08, F, F, F, 0]
    ),
    cmd!(
        op::START_STOP_UNIT,
        None,
        "START STOP UNIT",
        Write,
        spc::start_stop_unit,
        [0x1B, 0x01, 0, 0x0F, 0xF7, 0]
    ),
    cmd!(
        op::PREVENT_ALLOW_MEDIUM_REMOVAL,
        None,
        "PREVENT ALLOW MEDIUM REMOVAL",
        PreventAllow,
        spc::prevent_allow,
        [0x1E, 0, 0, 0, 0x03, 0]
    ),
    cmd!(
        op::READ_CAPACITY_10,
        None,
        "READ CAPACITY(10)",
        Free,
        sbc::read_capacity_10,
        [0x25, 0, F, F, F, F, 0, 0, 0x01, 0]
    ),
    cmd!(
        op::READ_10,
        None,
        "READ(10)",
        Read,
        sbc::read,
        [0x28, 0x18, F, F, F, F, 0x1F, F, F, 0]
    ),
    cmd!(
        op::WRITE_10,
        None,
        "WRITE(10)",
        Write,
        sbc::write,
        [0x2A, 0x18, F, F, F, F, 0x1F, F, F, 0]
    ),
    cmd!(
        op::WRITE_AND_VERIFY_10,
        None,
        "WRITE AND VERIFY(10)",
        Write,
        sbc::write_and_verify,
        [0x2E, 0x12, F, F, F, F, 0x1F, F, F, 0]
    ),
    cmd!(
        op::VERIFY_10,
        None,
        "VERIFY(10)",
        Read,
        sbc::verify,
        [0x2F, 0x16, F, F, F, F, 0x1F, F, F, 0]
    ),
    cmd!(
        op::PRE_FETCH_10,
        None,
        "PRE-FETCH(10)",
        Read,
        sbc::pre_fetch,
        [0x34, 0x02, F, F, F, F, 0x1F, F, F, 0]
    ),
    cmd!(
        op::SYNCHRONIZE_CACHE_10,
        None,
        "SYNCHRONIZE CACHE(10)",
        Write,
        sbc::synchronize_cache,
        [0x35, 0x02, F, F, F, F, 0x1F, F, F, 0]
    ),
    cmd!(
        op::READ_DEFECT_DATA_10,
        None,
        "READ DEFECT DATA(10)",
        Read,
        sbc::read_defect_data,
        [0x37, 0, 0x1F, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::WRITE_SAME_10,
        None,
        "WRITE SAME(10)",
        Write,
        sbc::write_same,
        [0x41, 0x18, F, F, F, F, 0x1F, F, F, 0]
    ),
    cmd!(
        op::UNMAP,
        None,
        "UNMAP",
        Write,
        sbc::unmap,
        [0x42, 0x01, 0, 0, 0, 0, 0x1F, F, F, 0]
    ),
    cmd!(
        op::SANITIZE,
        Some(0x01),
        "SANITIZE OVERWRITE",
        Write,
        sanitize::sanitize,
        [0x48, 0xA1, 0, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::SANITIZE,
        Some(0x02),
        "SANITIZE BLOCK ERASE",
        Write,
        sanitize::sanitize,
        [0x48, 0xA2, 0, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::SANITIZE,
        Some(0x1F),
        "SANITIZE EXIT FAILURE MODE",
        Write,
        sanitize::sanitize,
        [0x48, 0xBF, 0, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::MODE_SELECT_10,
        None,
        "MODE SELECT(10)",
        Write,
        mode::mode_select,
        [0x55, 0x11, 0, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::RESERVE_10,
        None,
        "RESERVE(10)",
        Free,
        pr::reserve_legacy,
        [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    ),
    cmd!(
        op::RELEASE_10,
        None,
        "RELEASE(10)",
        Free,
        pr::release_legacy,
        [0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    ),
    cmd!(
        op::MODE_SENSE_10,
        None,
        "MODE SENSE(10)",
        Read,
        mode::mode_sense,
        [0x5A, 0x18, F, F, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_IN,
        Some(0x00),
        "PERSISTENT RESERVE IN READ KEYS",
        Free,
        pr::persistent_reserve_in,
        [0x5E, 0x00, 0, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_IN,
        Some(0x01),
        "PERSISTENT RESERVE IN READ RESERVATION",
        Free,
        pr::persistent_reserve_in,
        [0x5E, 0x01, 0, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_IN,
        Some(0x02),
        "PERSISTENT RESERVE IN REPORT CAPABILITIES",
        Free,
        pr::persistent_reserve_in,
        [0x5E, 0x02, 0, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_IN,
        Some(0x03),
        "PERSISTENT RESERVE IN READ FULL STATUS",
        Free,
        pr::persistent_reserve_in,
        [0x5E, 0x03, 0, 0, 0, 0, 0, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x00),
        "PERSISTENT RESERVE OUT REGISTER",
        Free,
        pr::persistent_reserve_out,
        [0x5F, 0x00, 0xFF, 0, 0, F, F, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x01),
        "PERSISTENT RESERVE OUT RESERVE",
        Free,
        pr::persistent_reserve_out,
        [0x5F, 0x01, 0xFF, 0, 0, F, F, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x02),
        "PERSISTENT RESERVE OUT RELEASE",
        Free,
        pr::persistent_reserve_out,
        [0x5F, 0x02, 0xFF, 0, 0, F, F, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x03),
        "PERSISTENT RESERVE OUT CLEAR",
        Free,
        pr::persistent_reserve_out,
        [0x5F, 0x03, 0xFF, 0, 0, F, F, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x04),
        "PERSISTENT RESERVE OUT PREEMPT",
        Free,
        pr::persistent_reserve_out,
        [0x5F, 0x04, 0xFF, 0, 0, F, F, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x05),
        "PERSISTENT RESERVE OUT PREEMPT AND ABORT",
        Free,
        pr::persistent_reserve_out,
        [0x5F, 0x05, 0xFF, 0, 0, F, F, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x06),
        "PERSISTENT RESERVE OUT REGISTER AND IGNORE EXISTING KEY",
        Free,
        pr::persistent_reserve_out,
        [0x5F, 0x06, 0xFF, 0, 0, F, F, F, F, 0]
    ),
    cmd!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x07),
        "PERSISTENT RESERVE OUT REGISTER AND MOVE",
        Free,
        pr::persistent_reserve_out,
        [0x5F, 0x07, 0xFF, 0, 0, F, F, F, F, 0]
    ),
    cmd!(
        op::EXTENDED_COPY,
        Some(op::SA_EXTENDED_COPY_LID1),
        "EXTENDED COPY(LID1)",
        Write,
        xcopy::extended_copy,
        [0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::RECEIVE_COPY_RESULTS,
        Some(op::SA_COPY_STATUS),
        "RECEIVE COPY STATUS(LID1)",
        Read,
        xcopy::receive_copy_results,
        [0x84, 0x00, F, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::RECEIVE_COPY_RESULTS,
        Some(op::SA_OPERATING_PARAMETERS),
        "RECEIVE COPY OPERATING PARAMETERS",
        Read,
        xcopy::receive_copy_results,
        [0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::READ_16,
        None,
        "READ(16)",
        Read,
        sbc::read,
        [0x88, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::COMPARE_AND_WRITE,
        None,
        "COMPARE AND WRITE",
        Write,
        sbc::compare_and_write,
        [0x89, 0x18, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0x1F, 0]
    ),
    cmd!(
        op::WRITE_16,
        None,
        "WRITE(16)",
        Write,
        sbc::write,
        [0x8A, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::ORWRITE_16,
        None,
        "ORWRITE(16)",
        Write,
        sbc::orwrite,
        [0x8B, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::WRITE_AND_VERIFY_16,
        None,
        "WRITE AND VERIFY(16)",
        Write,
        sbc::write_and_verify,
        [0x8E, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::VERIFY_16,
        None,
        "VERIFY(16)",
        Read,
        sbc::verify,
        [0x8F, 0x16, F, F, F, F, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::PRE_FETCH_16,
        None,
        "PRE-FETCH(16)",
        Read,
        sbc::pre_fetch,
        [0x90, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::SYNCHRONIZE_CACHE_16,
        None,
        "SYNCHRONIZE CACHE(16)",
        Write,
        sbc::synchronize_cache,
        [0x91, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::WRITE_SAME_16,
        None,
        "WRITE SAME(16)",
        Write,
        sbc::write_same,
        [0x93, 0x19, F, F, F, F, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::WRITE_ATOMIC_16,
        None,
        "WRITE ATOMIC(16)",
        Write,
        sbc::write_atomic,
        [0x9C, 0x18, F, F, F, F, F, F, F, F, 0, 0, F, F, 0x1F, 0]
    ),
    cmd!(
        op::SERVICE_ACTION_IN_16,
        Some(op::SA_READ_CAPACITY_16),
        "READ CAPACITY(16)",
        Free,
        sbc::read_capacity_16,
        [0x9E, 0x10, F, F, F, F, F, F, F, F, F, F, F, F, 0x01, 0]
    ),
    cmd!(
        op::SERVICE_ACTION_IN_16,
        Some(op::SA_GET_LBA_STATUS),
        "GET LBA STATUS",
        Read,
        sbc::get_lba_status,
        [0x9E, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::REPORT_LUNS,
        None,
        "REPORT LUNS",
        Free,
        spc::report_luns_cmd,
        [0xA0, 0, F, 0, 0, 0, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::MAINTENANCE_IN,
        Some(op::SA_REPORT_TARGET_PORT_GROUPS),
        "REPORT TARGET PORT GROUPS",
        Free,
        spc::report_target_port_groups,
        [0xA3, 0xEA, 0, 0, 0, 0, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::MAINTENANCE_IN,
        Some(op::SA_REPORT_SUPPORTED_OPERATION_CODES),
        "REPORT SUPPORTED OPERATION CODES",
        Free,
        spc::report_supported_operation_codes,
        [0xA3, 0x0C, 0x87, F, F, F, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::MAINTENANCE_IN,
        Some(op::SA_REPORT_SUPPORTED_TMFS),
        "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
        Free,
        spc::report_supported_tmfs,
        [0xA3, 0x0D, 0x80, 0, 0, 0, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::MAINTENANCE_OUT,
        Some(op::SA_SET_TARGET_PORT_GROUPS),
        "SET TARGET PORT GROUPS",
        Free,
        spc::set_target_port_groups,
        [0xA4, 0x0A, 0, 0, 0, 0, F, F, F, F, 0, 0]
    ),
    cmd!(
        op::READ_12,
        None,
        "READ(12)",
        Read,
        sbc::read,
        [0xA8, 0x18, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::WRITE_12,
        None,
        "WRITE(12)",
        Write,
        sbc::write,
        [0xAA, 0x18, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::WRITE_AND_VERIFY_12,
        None,
        "WRITE AND VERIFY(12)",
        Write,
        sbc::write_and_verify,
        [0xAE, 0x12, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::VERIFY_12,
        None,
        "VERIFY(12)",
        Read,
        sbc::verify,
        [0xAF, 0x16, F, F, F, F, F, F, F, F, 0x1F, 0]
    ),
    cmd!(
        op::READ_DEFECT_DATA_12,
        None,
        "READ DEFECT DATA(12)",
        Read,
        sbc::read_defect_data,
        [0xB7, 0x1F, 0, 0, 0, 0, F, F, F, F, 0, 0]
    ),
];

/// Whether an operation code is defined with service actions.
pub(crate) fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// The row for a CDB, `None` when the operation code or service action is unsupported.
pub(crate) fn lookup(cdb: Cdb<'_>) -> Option<&'static CommandSpec> {
    if cdb.bytes().is_empty() {
        return None;
    }
    lookup_by(cdb.opcode(), cdb.service_action())
}

/// The row for an operation code and (when it has them) service action.
pub(crate) fn lookup_by(opcode: u8, service_action: u8) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| {
        c.opcode == opcode
            && (c.service_action.is_none() || c.service_action == Some(service_action))
    })
}

/// Whether a logical unit implements `spec`: UNMAP and SANITIZE BLOCK ERASE only where
/// blocks can be deallocated (`thin`: LBPME=1). A fully provisioned unit neither lists
/// nor accepts them (SBC-3 §4.7.2), rather than accept a deallocation it cannot do.
pub(crate) fn implemented(spec: &CommandSpec, thin: bool) -> bool {
    thin || !matches!(
        (spec.opcode, spec.service_action),
        (op::UNMAP, _) | (op::SANITIZE, Some(0x02))
    )
}

/// The sense for an unsupported command: INVALID COMMAND OPERATION CODE, or INVALID FIELD
/// IN CDB at the service action for a known operation code (SPC-4 §4.2.5.1).
pub(crate) fn unsupported(cdb: Cdb<'_>) -> Sense {
    if !cdb.bytes().is_empty() && has_service_actions(cdb.opcode()) {
        Sense::invalid_field_in_cdb(1)
    } else {
        Sense::ILLEGAL_REQUEST_INVALID_COMMAND_OPERATION_CODE
    }
}

/// Commands another I_T nexus may send while a RESERVE(6)/(10) reservation is held
/// (SPC-2 §5.5.1 Table 10 and SPC-3 §5.6.3).
pub(crate) fn allowed_under_legacy_reservation(cdb: Cdb<'_>) -> bool {
    match cdb.opcode() {
        op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE | op::RELEASE_6 | op::RELEASE_10 => true,
        op::MAINTENANCE_IN => true,
        op::PREVENT_ALLOW_MEDIUM_REMOVAL => cdb.u8(4) & 0x03 == 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_data_starts_with_opcode_and_matches_group_length() {
        for c in COMMANDS {
            assert_eq!(c.usage[0], c.opcode, "{}", c.name);
            assert_eq!(
                Some(c.cdb_len()),
                crate::cdb::cdb_len(c.opcode),
                "{}",
                c.name
            );
            if let Some(sa) = c.service_action {
                assert_eq!(c.usage[1] & 0x1F, sa, "{}", c.name);
            }
        }
    }

    #[test]
    fn rows_are_unique() {
        for (i, a) in COMMANDS.iter().enumerate() {
            for b in &COMMANDS[i + 1..] {
                assert!(
                    !(a.opcode == b.opcode && a.service_action == b.service_action),
                    "{}",
                    a.name
                );
            }
        }
    }
}
