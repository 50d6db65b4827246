//! SANITIZE (SBC-3 §5.30) and sanitize operations (SBC-3 §4.11).
//!
//! A sanitize operation is a background operation of the logical unit: it runs on a
//! thread of its own, so task management (ABORT TASK, ABORT TASK SET, LOGICAL UNIT
//! RESET, target resets) and I_T nexus loss do not stop it. While it runs, every command
//! but INQUIRY, REPORT LUNS and REQUEST SENSE ends with NOT READY, LOGICAL UNIT NOT
//! READY, SANITIZE IN PROGRESS, carrying the progress indication; REQUEST SENSE returns
//! that sense as its parameter data. The SANITIZE command itself returns status when the
//! operation has completed (IMMED=0) or as soon as the CDB and parameter data are
//! validated (IMMED=1).
//!
//! The operation writes at most [`LuConfig::sanitize_bytes_per_s`]: see there why.
//!
//! If the operation fails, the logical unit enters the sanitize failed state: commands
//! other than INQUIRY, REPORT LUNS, REQUEST SENSE and SANITIZE end with MEDIUM ERROR,
//! SANITIZE COMMAND FAILED (31h/03h) until a SANITIZE EXIT FAILURE MODE (when the failed
//! operation was requested with AUSE=1) or another sanitize operation completes without
//! error (SBC-3 §4.11.4).
//!
//! Not done: a real device resumes a sanitize operation after a power cycle. The state is
//! not persisted here, so a daemon restart abandons a running operation (the medium is
//! then partly overwritten and the logical unit reports no failure).
//!
//! [`LuConfig::sanitize_bytes_per_s`]: crate::LuConfig::sanitize_bytes_per_s

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cdb::{get_be16, get_u8, opcode as op};
use crate::lu::{good, CmdResult, Ctx, Failure, LogicalUnit};
use crate::sense::Sense;
use crate::ItNexus;

/// Bytes the operation writes per device call (and between progress updates).
const CHUNK_BYTES: u64 = 1 << 20;

/// SANITIZE commands with IMMED=0 that may wait at once per logical unit. Only one
/// sanitize operation runs at a time and each has at most one waiter, so this is never
/// reached in practice; it bounds the list anyway.
const WAITERS_MAX: usize = 8;

/// Service actions (SBC-3 Table 41).
const SA_OVERWRITE: u8 = 0x01;
const SA_BLOCK_ERASE: u8 = 0x02;
const SA_EXIT_FAILURE_MODE: u8 = 0x1F;

/// Where the logical unit stands with respect to sanitize operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SanitizeState {
    /// No sanitize operation runs and the last one, if any, succeeded.
    #[default]
    Idle,
    /// A sanitize operation runs.
    InProgress {
        /// Bytes written (or deallocated) so far.
        done_bytes: u64,
        /// Bytes the operation writes in all.
        total_bytes: u64,
    },
    /// The last sanitize operation failed (the sanitize failed state).
    Failed {
        /// The failed operation was requested with AUSE=1 (unrestricted completion
        /// mode): EXIT FAILURE MODE may leave this state.
        ause: bool,
    },
}

impl SanitizeState {
    /// The sense a command with this operation code ends with in this state, if it may
    /// not run. INQUIRY, REPORT LUNS and REQUEST SENSE never get here (the caller lets
    /// them through, SBC-3 §4.11.1).
    pub fn refuses(&self, opcode: u8) -> Option<Sense> {
        match self {
            SanitizeState::Idle => None,
            SanitizeState::InProgress { .. } => Some(self.sense_in_progress()),
            SanitizeState::Failed { .. } if opcode == op::SANITIZE => None,
            SanitizeState::Failed { .. } => Some(Sense::MEDIUM_ERROR_SANITIZE_COMMAND_FAILED),
        }
    }

    /// What REQUEST SENSE reports when no unit attention is pending.
    pub fn request_sense(&self) -> Option<Sense> {
        match self {
            SanitizeState::Idle => None,
            SanitizeState::InProgress { .. } => Some(self.sense_in_progress()),
            SanitizeState::Failed { .. } => Some(Sense::MEDIUM_ERROR_SANITIZE_COMMAND_FAILED),
        }
    }

    pub fn in_progress(&self) -> bool {
        matches!(self, SanitizeState::InProgress { .. })
    }

    /// NOT READY, SANITIZE IN PROGRESS with the progress indication.
    pub fn sense_in_progress(&self) -> Sense {
        Sense::NOT_READY_SANITIZE_IN_PROGRESS.with_progress(self.progress())
    }

    /// PROGRESS INDICATION: the fraction done in 65536ths (SPC-4 §4.5.2.4.4).
    fn progress(&self) -> u16 {
        match *self {
            SanitizeState::InProgress {
                done_bytes,
                total_bytes,
            } if total_bytes > 0 => {
                let p = u128::from(done_bytes.min(total_bytes)) * 65536 / u128::from(total_bytes);
                u16::try_from(p).unwrap_or(u16::MAX)
            }
            _ => 0,
        }
    }
}

/// How a wait for a sanitize operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitEnd {
    /// The operation completed, with this result.
    Done(Result<(), Sense>),
    /// Task management aborted the waiting command; the operation goes on.
    Aborted,
}

/// A SANITIZE command with IMMED=0 waiting for its operation.
#[derive(Debug)]
struct Waiter {
    seq: u64,
    nexus: ItNexus,
    end: Option<WaitEnd>,
}

/// Sanitize bookkeeping of a logical unit, kept under the logical unit's mutex; the
/// logical unit's condition variable signals changes of `waiters`.
#[derive(Debug, Default)]
pub(crate) struct Sanitizer {
    pub state: SanitizeState,
    /// Number of the operation started last.
    seq: u64,
    waiters: Vec<Waiter>,
}

impl Sanitizer {
    /// Task management aborted the tasks of `nexus` (of every nexus when `None`): their
    /// waits end; the operation itself goes on (SBC-3 §4.11.1). Returns whether a wait
    /// ended.
    pub fn abort_waiters(&mut self, nexus: Option<&ItNexus>) -> bool {
        let mut any = false;
        for w in &mut self.waiters {
            // (`Option::is_none_or` is newer than the workspace's rust-version.)
            let hit = match nexus {
                Some(n) => *n == w.nexus,
                None => true,
            };
            if w.end.is_none() && hit {
                w.end = Some(WaitEnd::Aborted);
                any = true;
            }
        }
        any
    }

    fn finish(&mut self, seq: u64, result: Result<(), Sense>, ause: bool) {
        debug_assert!(self.state.in_progress() && seq == self.seq);
        self.state = match result {
            Ok(()) => SanitizeState::Idle,
            Err(_) => SanitizeState::Failed { ause },
        };
        for w in &mut self.waiters {
            if w.seq == seq && w.end.is_none() {
                w.end = Some(WaitEnd::Done(result));
            }
        }
    }
}

/// What a sanitize operation does to the medium.
#[derive(Debug)]
enum Method {
    /// Overwrite every block with `pattern` (one block); passes flagged `true` write its
    /// inversion.
    Overwrite {
        pattern: Vec<u8>,
        inverted_passes: Vec<bool>,
    },
    /// Deallocate every block (a thick device writes zeroes instead).
    BlockErase,
}

/// SANITIZE (SBC-3 §5.30): OVERWRITE, BLOCK ERASE and EXIT FAILURE MODE. CRYPTOGRAPHIC
/// ERASE is not supported (the command table has no row for it, which yields INVALID
/// FIELD IN CDB).
pub(crate) fn sanitize(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    // Byte 1: IMMED (bit 7), reserved (bit 6), AUSE (bit 5), SERVICE ACTION; bytes 2 to 6
    // are reserved.
    if cdb.bit(1, 6) {
        return Err(Sense::invalid_bit_in_cdb(1, 6).into());
    }
    if let Some(byte) = (2u16..=6).find(|&i| cdb.u8(usize::from(i)) != 0) {
        return Err(Sense::invalid_field_in_cdb(byte).into());
    }
    let immed = cdb.bit(1, 7);
    let ause = cdb.bit(1, 5);
    let param_len = usize::from(cdb.be16(7));
    let method = match cdb.service_action() {
        SA_OVERWRITE => overwrite_method(ctx, param_len)?,
        SA_BLOCK_ERASE => {
            if param_len != 0 {
                return Err(Sense::invalid_field_in_cdb(7).into());
            }
            Method::BlockErase
        }
        SA_EXIT_FAILURE_MODE => return exit_failure_mode(ctx, param_len),
        _ => return Err(Sense::invalid_field_in_cdb(1).into()),
    };
    if let Some(s) = ctx.lu.write_protect() {
        return Err(s.into());
    }
    let seq = start(ctx, method, ause, !immed)?;
    if immed {
        return good();
    }
    wait(ctx.lu, seq)
}

/// The OVERWRITE parameter list (SBC-3 Table 44): INVERT, TEST, OVERWRITE COUNT,
/// INITIALIZATION PATTERN LENGTH and the pattern (at most one logical block).
fn overwrite_method(ctx: &Ctx<'_>, param_len: usize) -> Result<Method, Failure> {
    let bsz = usize::try_from(ctx.lu.block_size()).unwrap_or(512);
    if param_len < 5 || param_len > bsz + 4 {
        return Err(Sense::invalid_field_in_cdb(7).into());
    }
    let data = ctx
        .req
        .data_out
        .get(..param_len)
        .ok_or(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)?;
    let invert = get_u8(data, 0) & 0x80 != 0;
    let test = (get_u8(data, 0) >> 5) & 0x03;
    let owcount = get_u8(data, 0) & 0x1F;
    let pattern_len = usize::from(get_be16(data, 2));
    if owcount == 0 || test != 0 {
        return Err(Sense::invalid_field_in_parameter_list(0).into());
    }
    if pattern_len == 0 || pattern_len + 4 != param_len {
        return Err(Sense::invalid_field_in_parameter_list(2).into());
    }
    let pattern = data.get(4..).unwrap_or(&[]);
    let block: Vec<u8> = pattern.iter().copied().cycle().take(bsz).collect();
    // With INVERT the pattern alternates with its inversion and the last pass writes the
    // pattern itself (SBC-3 §5.30.2).
    let inverted_passes = (0..owcount)
        .map(|pass| invert && (owcount - 1 - pass) % 2 == 1)
        .collect();
    Ok(Method::Overwrite {
        pattern: block,
        inverted_passes,
    })
}

/// EXIT FAILURE MODE (SBC-3 §5.30.4): leaves the sanitize failed state when the failed
/// operation ran in the unrestricted completion mode (AUSE=1); in the restricted mode
/// only a sanitize operation that completes without error does (SBC-3 §4.11.4).
fn exit_failure_mode(ctx: &Ctx<'_>, param_len: usize) -> CmdResult {
    if param_len != 0 {
        return Err(Sense::invalid_field_in_cdb(7).into());
    }
    let mut st = ctx.lu.lock();
    match st.sanitize.state {
        SanitizeState::Failed { ause: false } => Err(Sense::invalid_field_in_cdb(1).into()),
        SanitizeState::Failed { ause: true } => {
            st.sanitize.state = SanitizeState::Idle;
            drop(st);
            good()
        }
        SanitizeState::InProgress { .. } => Err(st.sanitize.state.sense_in_progress().into()),
        SanitizeState::Idle => good(),
    }
}

/// Enters the in-progress state and starts the operation's thread. Returns the
/// operation's number.
fn start(ctx: &Ctx<'_>, method: Method, ause: bool, wait: bool) -> Result<u64, Failure> {
    let lu = ctx.lu;
    let Some(me) = lu.arc() else {
        // The logical unit is being dropped: nothing can run on it any more.
        return Err(Sense::HARDWARE_ERROR_INTERNAL_TARGET_FAILURE.into());
    };
    let size = lu.num_blocks() * u64::from(lu.block_size());
    let total_bytes = match &method {
        Method::Overwrite {
            inverted_passes, ..
        } => size.saturating_mul(inverted_passes.len() as u64),
        Method::BlockErase => size,
    };
    let mut st = lu.lock();
    let previous = st.sanitize.state;
    match previous {
        SanitizeState::InProgress { .. } => return Err(previous.sense_in_progress().into()),
        // A failed operation in the restricted completion mode may only be followed by
        // another restricted one (SBC-3 §5.30.1).
        SanitizeState::Failed { ause: false } if ause => {
            return Err(Sense::invalid_bit_in_cdb(1, 5).into())
        }
        _ => {}
    }
    st.sanitize.seq = st.sanitize.seq.wrapping_add(1);
    let seq = st.sanitize.seq;
    st.sanitize.state = SanitizeState::InProgress {
        done_bytes: 0,
        total_bytes,
    };
    if wait {
        if st.sanitize.waiters.len() >= WAITERS_MAX {
            st.sanitize.waiters.remove(0);
        }
        st.sanitize.waiters.push(Waiter {
            seq,
            nexus: ctx.nexus().clone(),
            end: None,
        });
    }
    drop(st);
    tracing::info!(
        lun = lu.lun,
        total_bytes,
        method = method_name(&method),
        "sanitize started"
    );
    let spawned = std::thread::Builder::new()
        .name(format!("sanitize-lun{}", lu.lun))
        .spawn(move || run_operation(me, seq, method, ause));
    if let Err(e) = spawned {
        tracing::error!(lun = lu.lun, error = %e, "cannot start the sanitize thread");
        let mut st = lu.lock();
        st.sanitize.state = previous;
        st.sanitize.waiters.retain(|w| w.seq != seq);
        return Err(Sense::HARDWARE_ERROR_INTERNAL_TARGET_FAILURE.into());
    }
    Ok(seq)
}

fn method_name(m: &Method) -> &'static str {
    match m {
        Method::Overwrite { .. } => "overwrite",
        Method::BlockErase => "block erase",
    }
}

/// Blocks until operation `seq` completes or task management aborts the waiting command.
fn wait(lu: &LogicalUnit, seq: u64) -> CmdResult {
    let mut st = lu.lock();
    loop {
        let Some(i) = st.sanitize.waiters.iter().position(|w| w.seq == seq) else {
            // Dropped to keep the list bounded.
            return Err(Failure::Aborted);
        };
        if let Some(end) = st.sanitize.waiters.get(i).and_then(|w| w.end) {
            st.sanitize.waiters.remove(i);
            return match end {
                WaitEnd::Done(Ok(())) => good(),
                WaitEnd::Done(Err(s)) => Err(s.into()),
                WaitEnd::Aborted => Err(Failure::Aborted),
            };
        }
        st = lu.wait_sanitize(st);
    }
}

/// The body of the operation's thread.
fn run_operation(lu: Arc<LogicalUnit>, seq: u64, method: Method, ause: bool) {
    // Writes that passed the gate before the operation began hold the shared side of
    // `atomic`; taking the exclusive side once lets them land before the first pass.
    // Later ones see the in-progress state under the lock and are refused.
    drop(lu.atomic.write().unwrap_or_else(|e| e.into_inner()));
    let started = Instant::now();
    let result = match &method {
        Method::Overwrite {
            pattern,
            inverted_passes,
        } => overwrite(&lu, pattern, inverted_passes),
        Method::BlockErase => block_erase(&lu),
    }
    .and_then(|()| lu.device.flush());
    let result = result.map_err(|e| {
        tracing::error!(lun = lu.lun, error = %e, "sanitize failed");
        Sense::MEDIUM_ERROR_SANITIZE_COMMAND_FAILED
    });
    if result.is_ok() {
        tracing::info!(
            lun = lu.lun,
            method = method_name(&method),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sanitize completed"
        );
    }
    lu.lock().sanitize.finish(seq, result, ause);
    lu.notify_sanitize();
}

/// Paces the operation to at most `bytes_per_s` (0: no limit).
struct Throttle {
    start: Instant,
    bytes_per_s: u64,
}

impl Throttle {
    fn new(bytes_per_s: u64) -> Throttle {
        Throttle {
            start: Instant::now(),
            bytes_per_s,
        }
    }

    /// Sleeps until `done_bytes` are due at the configured rate.
    fn pace(&self, done_bytes: u64) {
        if self.bytes_per_s == 0 {
            return;
        }
        let due_ns = u128::from(done_bytes) * 1_000_000_000 / u128::from(self.bytes_per_s);
        let due = Duration::from_nanos(u64::try_from(due_ns).unwrap_or(u64::MAX));
        if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

fn record_progress(lu: &LogicalUnit, done_bytes: u64) {
    if let SanitizeState::InProgress {
        done_bytes: ref mut d,
        ..
    } = lu.lock().sanitize.state
    {
        *d = done_bytes;
    }
}

/// How long a sanitize operation waits out a device that says it is transitioning.
const TRANSITION_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Writes one chunk of a sanitize operation. A device that is transitioning (a
/// replicated volume resealing its in-sync set, a brief primary change) is retried
/// for up to [`TRANSITION_WAIT`]: a long operation must not fail, and leave the unit in
/// the sanitize-failed state, over a pause of a few milliseconds.
fn write_through_transitions(lu: &LogicalUnit, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let started = std::time::Instant::now();
    loop {
        match lu.device.write_at(offset, data, false) {
            Err(e)
                if crate::device::is_transitioning(&e) && started.elapsed() < TRANSITION_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn overwrite(lu: &LogicalUnit, pattern: &[u8], inverted_passes: &[bool]) -> std::io::Result<()> {
    let size = lu.num_blocks() * u64::from(lu.block_size());
    let chunk_len = usize::try_from(CHUNK_BYTES.min(size)).unwrap_or(0);
    if pattern.is_empty() || chunk_len % pattern.len() != 0 {
        return Err(std::io::Error::other("pattern does not tile the chunk"));
    }
    let chunk: Vec<u8> = pattern.iter().copied().cycle().take(chunk_len).collect();
    let inverted: Vec<u8> = chunk.iter().map(|b| !b).collect();
    let throttle = Throttle::new(lu.config.sanitize_bytes_per_s);
    let mut done = 0u64;
    for &inv in inverted_passes {
        let data = if inv { &inverted } else { &chunk };
        let mut offset = 0u64;
        while offset < size {
            let n = CHUNK_BYTES.min(size - offset);
            let slice = data.get(..usize::try_from(n).unwrap_or(0)).unwrap_or(data);
            write_through_transitions(lu, offset, slice)?;
            offset += n;
            done += n;
            record_progress(lu, done);
            throttle.pace(done);
        }
    }
    Ok(())
}

/// Deallocation is a metadata change on a thin device: one call. (Only thin devices
/// implement BLOCK ERASE: see `commands::implemented`.)
fn block_erase(lu: &LogicalUnit) -> std::io::Result<()> {
    debug_assert!(lu.device.supports_discard());
    let size = lu.num_blocks() * u64::from(lu.block_size());
    lu.device.discard(0, size)?;
    record_progress(lu, size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_in_65536ths() {
        let s = SanitizeState::InProgress {
            done_bytes: 1,
            total_bytes: 4,
        };
        assert_eq!(s.progress(), 0x4000);
        let done = SanitizeState::InProgress {
            done_bytes: 4,
            total_bytes: 4,
        };
        assert_eq!(done.progress(), 0xFFFF);
    }

    #[test]
    fn failed_state_lets_only_sanitize_through() {
        let s = SanitizeState::Failed { ause: true };
        assert_eq!(s.refuses(op::SANITIZE), None);
        assert_eq!(
            s.refuses(op::TEST_UNIT_READY),
            Some(Sense::MEDIUM_ERROR_SANITIZE_COMMAND_FAILED)
        );
        let r = SanitizeState::InProgress {
            done_bytes: 0,
            total_bytes: 1,
        };
        assert_eq!(
            r.refuses(op::SANITIZE).map(|s| (s.asc, s.ascq)),
            Some((0x04, 0x1B))
        );
    }

    #[test]
    fn throttle_paces_to_the_rate() {
        let t = Throttle::new(1 << 20);
        t.pace(1 << 17); // 125 ms due
        assert!(t.start.elapsed() >= Duration::from_millis(120));
        let unlimited = Throttle::new(0);
        unlimited.pace(u64::MAX);
        assert!(unlimited.start.elapsed() < Duration::from_millis(50));
    }
}
