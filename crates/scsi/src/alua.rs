//! Asymmetric logical unit access (SPC-4 §5.15): target port groups, their access
//! states, and what a logical unit accepts through a port in each state.
//!
//! The target device holds the table of groups ([`crate::TargetDevice::set_port_groups`]);
//! the cluster decides the states (in Bulwark every storage node is one group, and the
//! primary's group is active/optimized). SET TARGET PORT GROUPS does not change states
//! itself: it queues the request for the cluster ([`crate::TargetDevice::take_alua_requests`]),
//! which moves the primary and then publishes the new table.

use crate::cdb::{opcode, Cdb};
use crate::sense::Sense;
use crate::ItNexus;

/// An asymmetric access state (SPC-4 §6.37, Table 167).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AsymmetricAccessState {
    /// Active/optimized: every command, best performance.
    ActiveOptimized,
    /// Active/non-optimized: every command, lower performance (forwarded).
    ActiveNonOptimized,
    /// Standby: management commands only.
    Standby,
    /// Unavailable: identification commands only.
    Unavailable,
    /// Offline: the port cannot serve the logical unit at all.
    Offline,
    /// Transitioning between two of the states above.
    Transitioning,
}

impl AsymmetricAccessState {
    /// The 4-bit code of REPORT TARGET PORT GROUPS.
    pub fn code(self) -> u8 {
        match self {
            AsymmetricAccessState::ActiveOptimized => 0x0,
            AsymmetricAccessState::ActiveNonOptimized => 0x1,
            AsymmetricAccessState::Standby => 0x2,
            AsymmetricAccessState::Unavailable => 0x3,
            AsymmetricAccessState::Offline => 0xE,
            AsymmetricAccessState::Transitioning => 0xF,
        }
    }

    /// The state a 4-bit code names.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code & 0x0F {
            0x0 => AsymmetricAccessState::ActiveOptimized,
            0x1 => AsymmetricAccessState::ActiveNonOptimized,
            0x2 => AsymmetricAccessState::Standby,
            0x3 => AsymmetricAccessState::Unavailable,
            0xE => AsymmetricAccessState::Offline,
            0xF => AsymmetricAccessState::Transitioning,
            _ => return None,
        })
    }

    /// Whether reads and writes are served through a port in this state.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            AsymmetricAccessState::ActiveOptimized | AsymmetricAccessState::ActiveNonOptimized
        )
    }
}

impl std::fmt::Display for AsymmetricAccessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AsymmetricAccessState::ActiveOptimized => "active/optimized",
            AsymmetricAccessState::ActiveNonOptimized => "active/non-optimized",
            AsymmetricAccessState::Standby => "standby",
            AsymmetricAccessState::Unavailable => "unavailable",
            AsymmetricAccessState::Offline => "offline",
            AsymmetricAccessState::Transitioning => "transitioning",
        })
    }
}

/// A target port group: its ports (relative target port identifiers) and their
/// common state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPortGroup {
    /// Target port group identifier (non-zero).
    pub id: u16,
    /// Its asymmetric access state.
    pub state: AsymmetricAccessState,
    /// The PREF bit: the group the device prefers initiators to use.
    pub preferred: bool,
    /// Relative target port identifiers of its ports.
    pub ports: Vec<u16>,
}

/// What an initiator asked for with SET TARGET PORT GROUPS: `group` to `state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AluaRequest {
    /// The target port group.
    pub group: u16,
    /// The state asked for (active/optimized, active/non-optimized, standby or
    /// unavailable).
    pub state: AsymmetricAccessState,
    /// Who asked.
    pub by: ItNexus,
}

/// Supported states in a REPORT TARGET PORT GROUPS descriptor: T_SUP, U_SUP, S_SUP,
/// AN_SUP, AO_SUP (offline is not used).
pub(crate) const SUPPORTED_STATES: u8 = 0x8F;

/// The sense that refuses `cdb` through a port in `state`, or `None` when the command
/// is accepted (SPC-4 §5.15.2.4).
pub(crate) fn refuses(state: AsymmetricAccessState, cdb: Cdb<'_>) -> Option<Sense> {
    let op = cdb.opcode();
    let sa = cdb.service_action();
    // Identification and ALUA management work in every state.
    let always = matches!(
        op,
        opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE
    ) || (op == opcode::MAINTENANCE_IN
        && matches!(
            sa,
            opcode::SA_REPORT_TARGET_PORT_GROUPS
                | opcode::SA_REPORT_SUPPORTED_OPERATION_CODES
                | opcode::SA_REPORT_SUPPORTED_TMFS
        ))
        || (op == opcode::MAINTENANCE_OUT && sa == opcode::SA_SET_TARGET_PORT_GROUPS);
    match state {
        AsymmetricAccessState::ActiveOptimized | AsymmetricAccessState::ActiveNonOptimized => None,
        _ if always => None,
        // §5.15.2.4.4: standby also takes mode and log pages, diagnostics and
        // persistent reservations (they are cluster state, the same on every path).
        AsymmetricAccessState::Standby
            if matches!(
                op,
                opcode::MODE_SENSE_6
                    | opcode::MODE_SENSE_10
                    | opcode::MODE_SELECT_6
                    | opcode::MODE_SELECT_10
                    | opcode::LOG_SENSE
                    | opcode::LOG_SELECT
                    | opcode::RECEIVE_DIAGNOSTIC_RESULTS
                    | opcode::SEND_DIAGNOSTIC
                    | opcode::PERSISTENT_RESERVE_IN
                    | opcode::PERSISTENT_RESERVE_OUT
            ) =>
        {
            None
        }
        AsymmetricAccessState::Standby => Some(Sense::NOT_READY_TARGET_PORT_IN_STANDBY_STATE),
        AsymmetricAccessState::Unavailable | AsymmetricAccessState::Offline => {
            Some(Sense::NOT_READY_TARGET_PORT_IN_UNAVAILABLE_STATE)
        }
        AsymmetricAccessState::Transitioning => {
            Some(Sense::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION)
        }
    }
}

/// Parses a SET TARGET PORT GROUPS parameter list (SPC-4 §6.44): 4 reserved bytes,
/// then 4-byte descriptors of (state, group). Only active/optimized, active/non-
/// optimized, standby and unavailable may be asked for, and only for known groups.
pub(crate) fn parse_set_target_port_groups(
    data: &[u8],
    known: &[u16],
) -> Result<Vec<(u16, AsymmetricAccessState)>, Sense> {
    let descriptors = data
        .get(4..)
        .filter(|d| d.len() % 4 == 0)
        .ok_or(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)?;
    let mut out = Vec::new();
    for (i, d) in descriptors.chunks_exact(4).enumerate() {
        let &[code, _, hi, lo] = d else {
            continue;
        };
        let at = u16::try_from(4 + 4 * i).unwrap_or(u16::MAX);
        let state = AsymmetricAccessState::from_code(code)
            .filter(|s| {
                matches!(
                    s,
                    AsymmetricAccessState::ActiveOptimized
                        | AsymmetricAccessState::ActiveNonOptimized
                        | AsymmetricAccessState::Standby
                        | AsymmetricAccessState::Unavailable
                )
            })
            .ok_or(Sense::invalid_field_in_parameter_list(at))?;
        let group = u16::from_be_bytes([hi, lo]);
        if !known.contains(&group) {
            return Err(Sense::invalid_field_in_parameter_list(at + 2));
        }
        out.push((group, state));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(bytes: &[u8]) -> Cdb<'_> {
        Cdb(bytes)
    }

    #[test]
    fn states_round_trip_through_their_codes() {
        for s in [
            AsymmetricAccessState::ActiveOptimized,
            AsymmetricAccessState::ActiveNonOptimized,
            AsymmetricAccessState::Standby,
            AsymmetricAccessState::Unavailable,
            AsymmetricAccessState::Offline,
            AsymmetricAccessState::Transitioning,
        ] {
            assert_eq!(AsymmetricAccessState::from_code(s.code()), Some(s));
        }
        assert_eq!(AsymmetricAccessState::from_code(0x5), None);
    }

    #[test]
    fn each_state_takes_what_spc4_allows() {
        let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let inquiry = [0x12, 0, 0, 0, 96, 0];
        let rtpg = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let prin = [0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0];
        use AsymmetricAccessState::*;
        for s in [ActiveOptimized, ActiveNonOptimized] {
            assert_eq!(refuses(s, cdb(&read10)), None);
        }
        assert_eq!(
            refuses(Standby, cdb(&read10)),
            Some(Sense::NOT_READY_TARGET_PORT_IN_STANDBY_STATE)
        );
        assert_eq!(refuses(Standby, cdb(&prin)), None, "PR works in standby");
        assert_eq!(
            refuses(Unavailable, cdb(&prin)),
            Some(Sense::NOT_READY_TARGET_PORT_IN_UNAVAILABLE_STATE)
        );
        assert_eq!(
            refuses(Transitioning, cdb(&read10)),
            Some(Sense::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION)
        );
        for s in [Standby, Unavailable, Offline, Transitioning] {
            assert_eq!(refuses(s, cdb(&inquiry)), None, "{s:?}");
            assert_eq!(refuses(s, cdb(&rtpg)), None, "{s:?}");
        }
    }

    #[test]
    fn set_target_port_groups_parameters_are_checked() {
        let known = [1, 2, 3];
        let list = [0, 0, 0, 0, 0x00, 0, 0, 2, 0x02, 0, 0, 1];
        assert_eq!(
            parse_set_target_port_groups(&list, &known).unwrap(),
            vec![
                (2, AsymmetricAccessState::ActiveOptimized),
                (1, AsymmetricAccessState::Standby)
            ]
        );
        // Transitioning cannot be asked for; group 9 does not exist; bad length.
        let bad_state = [0, 0, 0, 0, 0x0F, 0, 0, 2];
        assert_eq!(
            parse_set_target_port_groups(&bad_state, &known),
            Err(Sense::invalid_field_in_parameter_list(4))
        );
        let bad_group = [0, 0, 0, 0, 0x00, 0, 0, 9];
        assert_eq!(
            parse_set_target_port_groups(&bad_group, &known),
            Err(Sense::invalid_field_in_parameter_list(6))
        );
        assert_eq!(
            parse_set_target_port_groups(&[0, 0, 0, 0, 0], &known),
            Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)
        );
    }
}
