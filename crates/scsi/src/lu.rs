//! A logical unit (SAM-5 §4.6.3): state shared by all I_T nexuses (mode parameters,
//! reservations, unit attentions) and the command pipeline.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use bytes::Bytes;

use crate::cdb::{opcode, Cdb};
use crate::commands::{self, Access, CommandSpec};
use crate::device::BlockDevice;
use crate::mode::ModeState;
use crate::pr::PrState;
use crate::sanitize::Sanitizer;
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
    /// The handler took the responder from [`Ctx::respond`] and answers later.
    Deferred,
}

/// How a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// RESERVATION CONFLICT.
    Conflict,
    /// TASK ABORTED: task management aborted the command while it waited (its status is
    /// not delivered; the transport drops it).
    Aborted,
    /// Run with [`Ctx::cached_only`], the command would have waited for the disk: it has
    /// done nothing, and runs again where it may wait ([`LogicalUnit::try_execute_cached`]).
    WouldWait,
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
    /// Sanitize operations (SBC-3 §4.11): while one runs, other commands get NOT READY.
    pub sanitize: Sanitizer,
    /// I_T nexuses whose registrations PERSISTENT RESERVE OUT PREEMPT AND ABORT removed
    /// and whose tasks the transport has yet to abort (SPC-4 §5.13.11.2.?).
    pub preempted: Vec<ItNexus>,
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
    /// Where the persistent reservations are kept when they are shared with other
    /// nodes; `None`: in memory, and in `config.pr_file` with APTPL.
    pub pr_store: Option<Arc<dyn crate::ReservationStore>>,
    state: Mutex<LuState>,
    /// Writers hold it shared; COMPARE AND WRITE holds it exclusively so that no write
    /// lands between its read and its write (SBC-3 §5.2). Take it through
    /// [`LogicalUnit::medium_shared`] / [`LogicalUnit::medium_exclusive`], never while
    /// holding the state mutex.
    pub atomic: RwLock<()>,
    /// Signals the end of waits for sanitize operations (used with the state mutex).
    sanitize_cv: Condvar,
    /// This logical unit, for the threads of its background operations.
    me: Weak<LogicalUnit>,
    /// Its I/O counters.
    pub stats: Arc<crate::stats::IoStats>,
}

/// The context a command handler runs in.
pub(crate) struct Ctx<'a> {
    pub lu: &'a LogicalUnit,
    pub target: &'a TargetDevice,
    pub req: &'a ScsiRequest<'a>,
    pub cdb: Cdb<'a>,
    /// The caller's responder when it accepts a deferred answer
    /// ([`LogicalUnit::execute_then`]); a handler that takes it returns [`Done::Deferred`].
    pub respond: Option<&'a std::cell::Cell<Option<crate::Responder>>>,
    /// The caller's thread must not wait for the disk: a handler that would fails with
    /// [`Failure::WouldWait`] before it changes anything.
    pub cached_only: bool,
}

impl Ctx<'_> {
    pub fn nexus(&self) -> &ItNexus {
        self.req.nexus
    }

    /// The responder, for a handler that will answer later; `None` when the caller
    /// waits for the answer.
    pub fn take_responder(&self) -> Option<crate::Responder> {
        self.respond.and_then(std::cell::Cell::take)
    }
}

impl LogicalUnit {
    pub fn new(
        lun: u64,
        config: LuConfig,
        device: Arc<dyn BlockDevice>,
        pr_store: Option<Arc<dyn crate::ReservationStore>>,
    ) -> Result<Arc<LogicalUnit>, ScsiError> {
        let pr = match (&pr_store, &config.pr_file) {
            (Some(store), _) => store.load().map(|t| PrState::parse(&t)).unwrap_or_default(),
            (None, Some(path)) => PrState::load(path).map_err(|source| ScsiError::PrState {
                path: path.clone(),
                source,
            })?,
            (None, None) => PrState::default(),
        };
        let mode = ModeState::new(&config);
        Ok(Arc::new_cyclic(|me| LogicalUnit {
            lun,
            config,
            device,
            pr_store,
            state: Mutex::new(LuState {
                nexuses: HashMap::new(),
                mode,
                legacy_reservation: None,
                pr,
                copies: CopyResults::default(),
                sanitize: Sanitizer::default(),
                preempted: Vec::new(),
            }),
            atomic: RwLock::new(()),
            sanitize_cv: Condvar::new(),
            me: me.clone(),
            stats: Arc::default(),
        }))
    }

    /// This logical unit as an `Arc` (`None` only while it is being dropped).
    pub fn arc(&self) -> Option<Arc<LogicalUnit>> {
        self.me.upgrade()
    }

    /// Waits for a change of the sanitize waits (see [`LogicalUnit::notify_sanitize`]).
    pub fn wait_sanitize<'a>(&self, guard: MutexGuard<'a, LuState>) -> MutexGuard<'a, LuState> {
        self.sanitize_cv
            .wait(guard)
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the commands waiting for sanitize operations to look at their state again.
    pub fn notify_sanitize(&self) {
        self.sanitize_cv.notify_all();
    }

    /// Task management aborted the tasks of `nexus` (every nexus when `None`): a SANITIZE
    /// waiting for its operation stops waiting; the operation goes on.
    pub fn abort_tasks(&self, nexus: Option<&ItNexus>) {
        if self.lock().sanitize.abort_waiters(nexus) {
            self.notify_sanitize();
        }
    }

    /// The shared side of `atomic` for a write to the medium; refused while a sanitize
    /// operation runs (a command that passed the check in `run` before the operation
    /// began may get here after it began).
    pub fn medium_shared(&self) -> Result<RwLockReadGuard<'_, ()>, Sense> {
        let guard = self.atomic.read().unwrap_or_else(|e| e.into_inner());
        self.check_not_sanitizing()?;
        Ok(guard)
    }

    /// The exclusive side of `atomic` (COMPARE AND WRITE, ORWRITE, WRITE ATOMIC), with the
    /// same check as [`LogicalUnit::medium_shared`].
    pub fn medium_exclusive(&self) -> Result<RwLockWriteGuard<'_, ()>, Sense> {
        let guard = self.atomic.write().unwrap_or_else(|e| e.into_inner());
        self.check_not_sanitizing()?;
        Ok(guard)
    }

    fn check_not_sanitizing(&self) -> Result<(), Sense> {
        let state = self.lock().sanitize.state;
        match state.in_progress() {
            true => Err(state.sense_in_progress()),
            false => Ok(()),
        }
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
        st.preempted.retain(|n| n != nexus);
        let woke = st.sanitize.abort_waiters(Some(nexus));
        drop(st);
        if woke {
            self.notify_sanitize();
        }
    }

    /// A reset aborts every task of the logical unit; a running sanitize operation goes
    /// on (SBC-3 §4.11.1).
    pub fn reset(&self, ua: Sense) {
        let mut st = self.lock();
        st.legacy_reservation = None;
        for n in st.nexuses.values_mut() {
            n.prevent = false;
            n.push_ua(ua);
        }
        let woke = st.sanitize.abort_waiters(None);
        drop(st);
        if woke {
            self.notify_sanitize();
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
        let result = self.run(target, req, Cdb(req.cdb), None, false);
        self.response(result)
    }

    /// [`LogicalUnit::execute`] for a caller that accepts the response later: a handler
    /// may take `respond` and answer from another thread (see
    /// [`crate::BlockDevice::write_then`]).
    pub fn execute_then(
        &self,
        target: &TargetDevice,
        req: &ScsiRequest<'_>,
        respond: crate::Responder,
    ) {
        // From the command's arrival at the target to its response being handed to the
        // transport.
        let arrived = req.arrived;
        let stats = self.stats.clone();
        let kind = crate::stats::IoKind::of(req.cdb.first().copied().unwrap_or(0));
        let data_out = req.data_out.len();
        stats.start();
        let respond = crate::Responder::new(move |response: ScsiResponse| {
            stats.finish(kind, data_out, &response, arrived.elapsed());
            respond.send(response);
        });
        let slot = std::cell::Cell::new(Some(respond));
        let result = self.run(target, req, Cdb(req.cdb), Some(&slot), false);
        if let Some(respond) = slot.take() {
            debug_assert!(
                !matches!(result, Ok(Done::Deferred)),
                "deferred without taking the responder"
            );
            respond.send(self.response(result));
        }
    }

    /// Runs a small READ at once, on the caller's thread, when its data is in memory
    /// ([`crate::BlockDevice::read_cached`]): that spares the hand-off to an I/O thread,
    /// most of what a cached 4 KiB read costs. Gives `respond` back, with nothing done,
    /// for any other command or when the data would come from the disk: the caller then
    /// runs it with [`LogicalUnit::execute_then`] on a thread that may block.
    pub fn try_execute_cached(
        &self,
        target: &TargetDevice,
        req: &ScsiRequest<'_>,
        respond: crate::Responder,
    ) -> Result<(), crate::Responder> {
        let op = req.cdb.first().copied().unwrap_or(0);
        if !is_read(req.cdb) {
            return Err(respond);
        }
        let result = self.run(target, req, Cdb(req.cdb), None, true);
        if matches!(result, Err(Failure::WouldWait)) {
            return Err(respond);
        }
        self.stats.start();
        let response = self.response(result);
        let kind = crate::stats::IoKind::of(op);
        self.stats.finish(kind, 0, &response, req.arrived.elapsed());
        respond.send(response);
        Ok(())
    }

    fn response(&self, result: CmdResult) -> ScsiResponse {
        response_of(result, self.lock().mode.d_sense)
    }

    fn run<'a>(
        &'a self,
        target: &'a TargetDevice,
        req: &'a ScsiRequest<'a>,
        cdb: Cdb<'a>,
        respond: Option<&'a std::cell::Cell<Option<crate::Responder>>>,
        cached_only: bool,
    ) -> CmdResult {
        let spec = commands::lookup(cdb);
        // Read before this unit's lock: publishing states takes the table, then units.
        let access = target.access_state(req.nexus.target_port.group);
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
                let registered = st.pr.registration(req.nexus).is_some();
                ns.push_ua(target.first_contact_unit_attention(registered));
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
                // SBC-3 §4.11.1: while a sanitize operation runs, or after one failed,
                // the logical unit refuses everything but the commands above (and, in
                // the failed state, SANITIZE).
                if let Some(sense) = st.sanitize.state.refuses(cdb.opcode()) {
                    return Err(Failure::Check(sense));
                }
            }
            // SPC-4 §5.15.2.4: through a port that is not active, only what its state
            // allows (the unit attention above comes first).
            if let Some(sense) = crate::alua::refuses(access, cdb) {
                return Err(Failure::Check(sense));
            }
        }
        let Some(spec) = spec.filter(|s| commands::implemented(s, self.device.supports_discard()))
        else {
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
            respond,
            cached_only,
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

/// READ(6/10/12/16): the commands [`LogicalUnit::try_execute_cached`] may answer.
pub(crate) fn is_read(cdb: &[u8]) -> bool {
    matches!(
        cdb.first().copied(),
        Some(opcode::READ_6 | opcode::READ_10 | opcode::READ_12 | opcode::READ_16)
    )
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
        // NUMBER OF LOGICAL BLOCKS is one byte: an initiator asking for 256 blocks sends
        // 0 with 256 blocks of data. `None` hands the command all the data, which it then
        // refuses instead of taking the zero-block no-op at its word.
        opcode::COMPARE_AND_WRITE if cdb.u8(13) == 0 => return None,
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
        opcode::MAINTENANCE_OUT => cdb.be32(6),
        opcode::EXTENDED_COPY => cdb.be32(10),
        opcode::RESERVE_10 => u32::from(cdb.be16(7)),
        _ => 0,
    })
}

/// The SCSI response for a command's outcome; `descriptor` is the control mode page's
/// D_SENSE (sense data format).
pub(crate) fn response_of(result: CmdResult, descriptor: bool) -> ScsiResponse {
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
        Ok(Done::Deferred) => crate::sense::check_condition_format(
            Sense::HARDWARE_ERROR_INTERNAL_TARGET_FAILURE,
            descriptor,
        ),
        Err(Failure::Conflict) => ScsiResponse {
            status: ScsiStatus::ReservationConflict,
            sense: None,
            data_in: Bytes::new(),
        },
        Err(Failure::Aborted) => ScsiResponse {
            status: ScsiStatus::TaskAborted,
            sense: None,
            data_in: Bytes::new(),
        },
        Err(Failure::Check(sense)) => crate::sense::check_condition_format(sense, descriptor),
        Err(Failure::WouldWait) => {
            debug_assert!(
                false,
                "a command that would wait is run again, not answered"
            );
            crate::sense::check_condition_format(
                Sense::HARDWARE_ERROR_INTERNAL_TARGET_FAILURE,
                descriptor,
            )
        }
    }
}
