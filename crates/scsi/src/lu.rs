//! A logical unit (SAM-5 §4.6.3): state shared by all I_T nexuses (mode parameters,
//! reservations, unit attentions) and the command pipeline.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;

use crate::cdb::{opcode, Cdb};
use crate::commands::{self, Access, CommandSpec};
use crate::device::BlockDevice;
use crate::mode::ModeState;
use crate::pr::PrState;
use crate::sense::Sense;
use crate::target_device::{LuConfig, ScsiError, TargetDevice};
use crate::xcopy::CopyResults;
use crate::{ItNexus, ScsiRequest, ScsiResponse, ScsiStatus};

/// Unit attentions queued per I_T nexus at most; older ones are dropped (SAM-5 §5.14
/// lets a logical unit lose unit attentions when it runs out of room, keeping one).
const UA_QUEUE_MAX: usize = 16;

/// I_T nexuses a logical unit remembers at most; beyond, the oldest idle ones without
/// unit attentions are forgotten first.
const NEXUS_MAX: usize = 4096;

/// How a command ended when it did not fail.
#[derive(Debug)]
pub(crate) enum Done {
    /// GOOD with Data-In.
    Good(Bytes),
    /// CONDITION MET (PRE-FETCH found the range fits the cache).
    ConditionMet,
}

/// How a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// RESERVATION CONFLICT.
    Conflict,
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Self {
        Failure::Check(s)
    }
}

pub(crate) type CmdResult = Result<Done, Failure>;

/// GOOD without data.
pub(crate) fn good() -> CmdResult {
    Ok(Done::Good(Bytes::new()))
}

/// GOOD with `data` cut to the allocation length.
pub(crate) fn data_in(mut data: Vec<u8>, alloc_len: usize) -> CmdResult {
    data.truncate(alloc_len);
    Ok(Done::Good(Bytes::from(data)))
}

/// Per I_T nexus state of a logical unit.
#[derive(Debug, Default)]
pub(crate) struct NexusState {
    pub ua: VecDeque<Sense>,
    /// PREVENT ALLOW MEDIUM REMOVAL with PREVENT=1 is in force from this nexus.
    pub prevent: bool,
}

impl NexusState {
    /// Queues a unit attention. A reset condition replaces everything pending: it tells
    /// the initiator that all state was lost anyway (SAM-5 §5.14).
    pub fn push_ua(&mut self, sense: Sense) {
        if sense.asc == 0x29 {
            self.ua.clear();
        }
        if self.ua.contains(&sense) {
            return;
        }
        if self.ua.len() >= UA_QUEUE_MAX {
            self.ua.pop_back();
        }
        self.ua.push_back(sense);
    }
}

/// State of a logical unit behind its mutex.
#[derive(Debug)]
pub(crate) struct LuState {
    pub nexuses: HashMap<ItNexus, NexusState>,
    pub mode: ModeState,
    /// Holder of a RESERVE(6)/RESERVE(10) reservation (SPC-2 §5.5).
    pub legacy_reservation: Option<ItNexus>,
    pub pr: PrState,
    pub copies: CopyResults,
    /// A SANITIZE is running (SBC-3 §4.11): other commands get NOT READY.
    pub sanitizing: bool,
}

impl LuState {
    /// Queues `sense` for every known nexus but `except`.
    pub fn ua_all(&mut self, except: Option<&ItNexus>, sense: Sense) {
        for (n, s) in self.nexuses.iter_mut() {
            if Some(n) != except {
                s.push_ua(sense);
            }
        }
    }
}

/// A logical unit.
#[derive(Debug)]
pub(crate) struct LogicalUnit {
    pub lun: u64,
    pub config: LuConfig,
    pub device: Arc<dyn BlockDevice>,
    state: Mutex<LuState>,
    /// Writers hold it shared; COMPARE AND WRITE holds it exclusively so that no write
    /// lands between its read and its write (SBC-3 §5.2).
    pub atomic: RwLock<()>,
}

/// The context a command handler runs in.
pub(crate) struct Ctx<'a> {
    pub lu: &'a LogicalUnit,
    pub target: &'a TargetDevice,
    pub req: &'a ScsiRequest<'a>,
    pub cdb: Cdb<'a>,
}

impl Ctx<'_> {
    pub fn nexus(&self) -> &ItNexus {
        self.req.nexus
    }
}

impl LogicalUnit {
    pub fn new(
        lun: u64,
        config: LuConfig,
        device: Arc<dyn BlockDevice>,
    ) -> Result<LogicalUnit, ScsiError> {
        let pr = match &config.pr_file {
            Some(path) => PrState::load(path).map_err(|source| ScsiError::PrState {
                path: path.clone(),
                source,
            })?,
            None => PrState::default(),
        };
        let mode = ModeState::new(&config);
        Ok(LogicalUnit {
            lun,
            config,
            device,
            state: Mutex::new(LuState {
                nexuses: HashMap::new(),
                mode,
                legacy_reservation: None,
                pr,
                copies: CopyResults::default(),
                sanitizing: false,
            }),
            atomic: RwLock::new(()),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, LuState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn block_size(&self) -> u32 {
        self.config.block_size
    }

    /// Capacity in logical blocks, read from the device each time so growth shows.
    pub fn num_blocks(&self) -> u64 {
        self.device.size_bytes() / u64::from(self.config.block_size)
    }

    pub fn ua_all(&self, except: Option<&ItNexus>, sense: Sense) {
        self.lock().ua_all(except, sense);
    }

    pub fn nexus_loss(&self, nexus: &ItNexus) {
        let mut st = self.lock();
        if st.legacy_reservation.as_ref() == Some(nexus) {
            st.legacy_reservation = None;
        }
        st.nexuses.remove(nexus);
        st.copies.forget(nexus);
    }

    pub fn reset(&self, ua: Sense) {
        let mut st = self.lock();
        st.legacy_reservation = None;
        for n in st.nexuses.values_mut() {
            n.prevent = false;
            n.push_ua(ua);
        }
    }

    /// Whether the unit is write protected (read-only configuration or SWP).
    pub fn write_protect(&self) -> Option<Sense> {
        if self.config.read_only {
            return Some(Sense::DATA_PROTECT_WRITE_PROTECTED);
        }
        if self.lock().mode.swp {
            return Some(Sense::DATA_PROTECT_SOFTWARE_WRITE_PROTECTED);
        }
        None
    }

    pub fn execute(&self, target: &TargetDevice, req: &ScsiRequest<'_>) -> ScsiResponse {
        let cdb = Cdb(req.cdb);
        let result = self.run(target, req, cdb);
        let descriptor = self.lock().mode.d_sense;
        match result {
            Ok(Done::Good(data)) => ScsiResponse {
                status: ScsiStatus::Good,
                sense: None,
                data_in: data,
            },
            Ok(Done::ConditionMet) => ScsiResponse {
                status: ScsiStatus::ConditionMet,
                sense: None,
                data_in: Bytes::new(),
            },
            Err(Failure::Conflict) => ScsiResponse {
                status: ScsiStatus::ReservationConflict,
                sense: None,
                data_in: Bytes::new(),
            },
            Err(Failure::Check(sense)) => crate::sense::check_condition_format(sense, descriptor),
        }
    }

    fn run(&self, target: &TargetDevice, req: &ScsiRequest<'_>, cdb: Cdb<'_>) -> CmdResult {
        let spec = commands::lookup(cdb);
        {
            let mut st = self.lock();
            if !st.nexuses.contains_key(req.nexus) {
                if st.nexuses.len() >= NEXUS_MAX {
                    let idle: Option<ItNexus> = st
                        .nexuses
                        .iter()
                        .find(|(_, s)| s.ua.is_empty() && !s.prevent)
                        .map(|(n, _)| n.clone());
                    if let Some(idle) = idle {
                        st.nexuses.remove(&idle);
                    }
                }
                let mut ns = NexusState::default();
                ns.push_ua(Sense::UNIT_ATTENTION_POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED);
                st.nexuses.insert(req.nexus.clone(), ns);
            }
            // SAM-5 §5.14: INQUIRY, REPORT LUNS and REQUEST SENSE neither report nor clear
            // a pending unit attention (REQUEST SENSE returns it as its data instead).
            let ua_exempt = matches!(
                cdb.opcode(),
                opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE
            );
            if !ua_exempt {
                if let Some(ua) = st.nexuses.get_mut(req.nexus).and_then(|n| n.ua.pop_front()) {
                    return Err(Failure::Check(ua));
                }
                if st.sanitizing {
                    return Err(Failure::Check(Sense::NOT_READY_SANITIZE_IN_PROGRESS));
                }
            }
        }
        let Some(spec) = spec else {
            return Err(commands::unsupported(cdb).into());
        };
        if req.cdb.len() < spec.cdb_len() {
            return Err(Sense::ILLEGAL_REQUEST_INVALID_FIELD_IN_CDB.into());
        }
        // NACA=1 asks for ACA, which this target does not support (SAM-5 §5.9.1.1).
        if cdb.control(spec.cdb_len()) & 0x04 != 0 {
            let byte = u16::try_from(spec.cdb_len().saturating_sub(1)).unwrap_or(0);
            return Err(Sense::invalid_bit_in_cdb(byte, 2).into());
        }
        if self.conflicts(req.nexus, spec, cdb) {
            return Err(Failure::Conflict);
        }
        tracing::trace!(lun = self.lun, command = spec.name, "execute");
        let ctx = Ctx {
            lu: self,
            target,
            req,
            cdb,
        };
        (spec.handler)(&ctx)
    }

    fn conflicts(&self, nexus: &ItNexus, spec: &CommandSpec, cdb: Cdb<'_>) -> bool {
        let st = self.lock();
        if let Some(holder) = &st.legacy_reservation {
            if holder != nexus && !commands::allowed_under_legacy_reservation(cdb) {
                return true;
            }
        }
        let access = match spec.access {
            Access::PreventAllow if cdb.u8(4) & 0x03 == 0 => Access::Free,
            Access::PreventAllow => Access::Write,
            a => a,
        };
        st.pr.conflicts(nexus, access)
    }
}

/// Data-Out bytes a CDB asks for (the transport checks this against the iSCSI expected
/// data transfer length).
pub(crate) fn data_out_len(block_size: u32, cdb: Cdb<'_>) -> Option<u32> {
    let spec = commands::lookup(cdb)?;
    if cdb.bytes().len() < spec.cdb_len() {
        return None;
    }
    let blocks = |n: u64| u32::try_from(n.saturating_mul(u64::from(block_size))).ok();
    Some(match cdb.opcode() {
        opcode::WRITE_6 => {
            let n = cdb.u8(4);
            return blocks(if n == 0 { 256 } else { u64::from(n) });
        }
        opcode::WRITE_10 | opcode::WRITE_AND_VERIFY_10 => return blocks(u64::from(cdb.be16(7))),
        opcode::WRITE_12 | opcode::WRITE_AND_VERIFY_12 => return blocks(u64::from(cdb.be32(6))),
        opcode::WRITE_16 | opcode::WRITE_AND_VERIFY_16 | opcode::ORWRITE_16 => {
            return blocks(u64::from(cdb.be32(10)))
        }
        opcode::WRITE_ATOMIC_16 => return blocks(u64::from(cdb.be16(12))),
        opcode::COMPARE_AND_WRITE => return blocks(2 * u64::from(cdb.u8(13))),
        opcode::VERIFY_10 | opcode::VERIFY_12 | opcode::VERIFY_16 => {
            let n = match cdb.opcode() {
                opcode::VERIFY_10 => u64::from(cdb.be16(7)),
                opcode::VERIFY_12 => u64::from(cdb.be32(6)),
                _ => u64::from(cdb.be32(10)),
            };
            match (cdb.u8(1) >> 1) & 0x03 {
                0 => 0,
                1 => return blocks(n),
                3 => return blocks(1),
                _ => 0,
            }
        }
        opcode::WRITE_SAME_10 | opcode::WRITE_SAME_16 => {
            let ndob = cdb.opcode() == opcode::WRITE_SAME_16 && cdb.u8(1) & 0x01 != 0;
            if ndob {
                0
            } else {
                block_size
            }
        }
        opcode::MODE_SELECT_6 => u32::from(cdb.u8(4)),
        opcode::MODE_SELECT_10 | opcode::UNMAP | opcode::SANITIZE => u32::from(cdb.be16(7)),
        opcode::PERSISTENT_RESERVE_OUT => cdb.be32(5),
        opcode::EXTENDED_COPY => cdb.be32(10),
        opcode::RESERVE_10 => u32::from(cdb.be16(7)),
        _ => 0,
    })
}
