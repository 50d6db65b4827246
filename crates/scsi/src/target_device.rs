//! The SCSI target device (SAM-5 §4.6.2): the LUN table of one iSCSI target and the
//! entry point the transport calls.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::cdb::{opcode, Cdb};
use crate::device::BlockDevice;
use crate::lu::LogicalUnit;
use crate::sense::{check_condition, Sense};
use crate::{spc, ItNexus, ResetKind, ScsiRequest, ScsiResponse, ScsiStatus};

/// Configuration of one logical unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuConfig {
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Writes fail with DATA PROTECT, WRITE PROTECTED; MODE SENSE reports WP.
    pub read_only: bool,
    /// Initial WCE bit of the caching mode page.
    pub write_cache: bool,
    /// T10 vendor identification (8 characters, space padded on the wire).
    pub vendor: String,
    /// Product identification (16 characters).
    pub product: String,
    /// Product revision level (4 characters).
    pub revision: String,
    /// Unit serial number (VPD page 0x80).
    pub serial: String,
    /// NAA IEEE Registered Extended (type 6) designator for VPD page 0x83.
    pub naa: [u8; 16],
    /// Where persistent reservation state with APTPL set is kept.
    pub pr_file: Option<PathBuf>,
    /// Rate at which a sanitize operation writes (or, on a device that cannot
    /// deallocate, zeroes) the medium, in bytes per second; 0 means no limit.
    ///
    /// A sanitize operation rewrites the whole logical unit as one long sequential
    /// stream. Unthrottled it saturates the disk (and, for a replicated volume, the
    /// replication link) that the other logical units share, whose latency then suffers
    /// for as long as the operation runs. The initiator asking for a sanitize expects it
    /// to take long (it polls the progress indication), so it is cheap to slow it down.
    /// The default, 16 MiB/s, is a few percent of an SSD or a 10 GbE link and sanitizes
    /// 128 MiB in 8 s, 1 TiB in about 18 hours: raise it for large units on idle storage.
    pub sanitize_bytes_per_s: u64,
    /// Physical block size reported in READ CAPACITY (16) (a power-of-two multiple of
    /// `block_size`, at most 32 KiB). Stores on 4 KiB pages are best described with
    /// 4096: initiators then align I/O and unmaps to it. 0 means equal to `block_size`.
    pub physical_block_size: u32,
}

/// Default of [`LuConfig::sanitize_bytes_per_s`].
pub const SANITIZE_BYTES_PER_S_DEFAULT: u64 = 16 << 20;

impl Default for LuConfig {
    fn default() -> Self {
        let mut naa = [0u8; 16];
        // NAA 6, a zero IEEE company id: a placeholder the configuration replaces.
        naa[0] = 0x60;
        LuConfig {
            block_size: 512,
            read_only: false,
            write_cache: true,
            vendor: "BULWARK".into(),
            product: "VOLUME".into(),
            revision: "0001".into(),
            serial: "0".into(),
            naa,
            pr_file: None,
            sanitize_bytes_per_s: SANITIZE_BYTES_PER_S_DEFAULT,
            physical_block_size: 4096,
        }
    }
}

/// Errors of LUN table changes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScsiError {
    /// The LUN is already in use.
    #[error("LUN {0} already exists")]
    LunExists(u64),
    /// The LUN does not exist.
    #[error("LUN {0} does not exist")]
    NoSuchLun(u64),
    /// The LUN is outside the flat addressing range (0..16384).
    #[error("LUN {0} is out of range (0..16384)")]
    LunOutOfRange(u64),
    /// Block size other than 512 or 4096.
    #[error("unsupported block size {0} (512 or 4096)")]
    BadBlockSize(u32),
    /// The device size is not a multiple of the block size (or is zero).
    #[error("device size {size} is not a non-zero multiple of the block size {block_size}")]
    BadDeviceSize {
        /// Device size in bytes.
        size: u64,
        /// Block size in bytes.
        block_size: u32,
    },
    /// Reading the persistent reservation file failed.
    #[error("persistent reservation state {path}: {source}")]
    PrState {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// An I_T nexus preempted by PERSISTENT RESERVE OUT PREEMPT AND ABORT on a logical unit
/// (see [`TargetDevice::take_preempted_nexuses`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preempted {
    /// The logical unit.
    pub lun: u64,
    /// The I_T nexus whose tasks on it are to be aborted.
    pub nexus: ItNexus,
}

/// Highest LUN of the flat space addressing method (SAM-5 §4.7.7).
const LUN_MAX: u64 = 16383;

/// The SCSI target device: logical units by LUN. `Send + Sync`; every method takes
/// `&self`.
#[derive(Debug, Default)]
pub struct TargetDevice {
    luns: RwLock<BTreeMap<u64, Arc<LogicalUnit>>>,
    /// The target port groups and their states (SPC-4 §5.15); empty: one group, the
    /// port's own, active/optimized.
    port_groups: RwLock<Vec<crate::alua::TargetPortGroup>>,
    /// SET TARGET PORT GROUPS requests for the cluster to act on.
    alua_requests: std::sync::Mutex<Vec<crate::alua::AluaRequest>>,
    /// Set while another node executes this target's commands (this node's ports are
    /// active/non-optimized or worse): every command goes there.
    forwarding: RwLock<Option<Arc<Forwarding>>>,
    /// The logical units took over from another node's: an I_T nexus they see first
    /// gets ASYMMETRIC ACCESS STATE CHANGED instead of POWER ON, RESET.
    took_over: std::sync::atomic::AtomicBool,
    /// The paths to these logical units through other nodes, told of what must reach
    /// their sessions.
    remote_paths: RwLock<Option<Arc<dyn RemotePaths>>>,
}

/// The paths to a target device's logical units that other nodes serve (forwarding
/// their commands here): what this device executes that must reach sessions there.
pub trait RemotePaths: Send + Sync + std::fmt::Debug {
    /// A TARGET COLD RESET was executed here: the target's sessions end on every node
    /// (RFC 7143 §11.5.1).
    fn cold_reset(&self, by: &ItNexus);
    /// PERSISTENT RESERVE OUT with PREEMPT AND ABORT removed the registration of
    /// `nexus` on `lun`: its tasks are aborted wherever its session is (SPC-4
    /// §5.13.11.2.5).
    fn preempted(&self, lun: u64, nexus: &ItNexus);
    /// PREEMPT or PREEMPT AND ABORT by `by` removed the registrations of `removed` on
    /// `lun`: worth telling an administrator (a cluster node fenced another off).
    fn reservation_preempted(&self, _lun: u64, _by: &ItNexus, _removed: &[ItNexus]) {}
}

/// Where a logical unit keeps its persistent reservation state when more than one
/// node serves it: the registrations, the reservation and the generation, as one
/// opaque text the logical unit writes and reads back.
pub trait ReservationStore: Send + Sync + std::fmt::Debug {
    /// The state last saved, if any.
    fn load(&self) -> Option<String>;
    /// Saves `state`. PERSISTENT RESERVE OUT completes only after this returns `Ok`;
    /// on an error the change is undone and the command fails as transitioning (the
    /// initiator retries). Blocking; called with the logical unit's state locked, so
    /// changes are saved in the order they were made.
    fn save(&self, state: &str) -> std::io::Result<()>;
}

/// Where a target device sends the commands it does not execute itself: the node that
/// is primary for the target's volumes (DESIGN.md, "ALUA and paths"). The forwarder
/// carries the I_T nexus along, so reservations, unit attentions and the access state
/// are decided there, for the port the command really arrived through.
pub trait Forwarder: Send + Sync + std::fmt::Debug {
    /// Executes `cmd` where the logical units are; the answer goes to `respond`. A
    /// forwarder that cannot reach them answers NOT READY, ASYMMETRIC ACCESS STATE
    /// TRANSITION, so the initiator retries (SPC-4 §5.15.2.5).
    fn execute(&self, cmd: ForwardedCommand, respond: crate::Responder);
    /// Task management and nexus events for the logical units there. Blocking until
    /// done or given up on.
    fn task_management(&self, tmf: ForwardedTaskManagement);
}

/// One SCSI command as forwarded to the node that executes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardedCommand {
    /// The I_T nexus it arrived on.
    pub nexus: ItNexus,
    /// The LUN.
    pub lun: u64,
    /// The CDB.
    pub cdb: Bytes,
    /// Data-Out.
    pub data_out: Bytes,
    /// Expected Data-In length.
    pub expected_data_in_len: u32,
    /// Task attribute.
    pub attr: crate::TaskAttribute,
    /// When it arrived on this node (not where it was first received: clocks differ).
    pub arrived: std::time::Instant,
}

impl ForwardedCommand {
    /// The request to execute.
    pub fn request(&self) -> ScsiRequest<'_> {
        ScsiRequest {
            nexus: &self.nexus,
            lun: self.lun,
            cdb: &self.cdb,
            data_out: &self.data_out,
            expected_data_in_len: self.expected_data_in_len,
            attr: self.attr,
            arrived: self.arrived,
        }
    }
}

/// Task management that reaches the logical units of another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardedTaskManagement {
    /// [`TargetDevice::reset`].
    Reset {
        /// The reset.
        kind: ResetKind,
        /// Its LUN (LOGICAL UNIT RESET).
        lun: Option<u64>,
        /// The nexus that asked.
        by: ItNexus,
    },
    /// [`TargetDevice::abort_tasks`].
    AbortTasks {
        /// The LUN.
        lun: u64,
        /// Whose tasks; every nexus's when `None`.
        nexus: Option<ItNexus>,
    },
    /// [`TargetDevice::nexus_loss`].
    NexusLoss(ItNexus),
}

impl TargetDevice {
    /// Carries out task management forwarded from another node.
    pub fn apply_task_management(&self, tmf: &ForwardedTaskManagement) {
        match tmf {
            ForwardedTaskManagement::Reset { kind, lun, by } => self.reset(*kind, *lun, by),
            ForwardedTaskManagement::AbortTasks { lun, nexus } => {
                self.abort_tasks(*lun, nexus.as_ref());
            }
            ForwardedTaskManagement::NexusLoss(n) => self.nexus_loss(n),
        }
    }
}

#[derive(Debug)]
struct Forwarding {
    to: Arc<dyn Forwarder>,
    /// LUN → logical block size (what Data-Out a command carries is decided here).
    luns: BTreeMap<u64, u32>,
}

impl TargetDevice {
    /// An empty target device.
    pub fn new() -> Self {
        TargetDevice::default()
    }

    /// Adds a logical unit. Every I_T nexus known to another logical unit gets a REPORTED
    /// LUNS DATA HAS CHANGED unit attention there (SPC-4 §7.? / SAM-5 §5.14).
    pub fn add_lun(
        &self,
        lun: u64,
        config: LuConfig,
        device: Arc<dyn BlockDevice>,
    ) -> Result<(), ScsiError> {
        self.add_shared_lun(lun, config, device, None)
    }

    /// [`Self::add_lun`] for a logical unit whose persistent reservations live in
    /// `store` (shared by every node that serves it) rather than in this process.
    pub fn add_shared_lun(
        &self,
        lun: u64,
        config: LuConfig,
        device: Arc<dyn BlockDevice>,
        store: Option<Arc<dyn ReservationStore>>,
    ) -> Result<(), ScsiError> {
        let new_lu = Self::checked_lu(lun, config, device, store)?;
        let mut luns = self.write();
        if luns.contains_key(&lun) {
            return Err(ScsiError::LunExists(lun));
        }
        for lu in luns.values() {
            lu.ua_all(None, Sense::UNIT_ATTENTION_REPORTED_LUNS_DATA_HAS_CHANGED);
        }
        luns.insert(lun, new_lu);
        Ok(())
    }

    /// A logical unit for `lun` over `device`, once the LUN, the block size and the
    /// device's size are checked.
    fn checked_lu(
        lun: u64,
        config: LuConfig,
        device: Arc<dyn BlockDevice>,
        store: Option<Arc<dyn ReservationStore>>,
    ) -> Result<Arc<LogicalUnit>, ScsiError> {
        if lun > LUN_MAX {
            return Err(ScsiError::LunOutOfRange(lun));
        }
        if config.block_size != 512 && config.block_size != 4096 {
            return Err(ScsiError::BadBlockSize(config.block_size));
        }
        let size = device.size_bytes();
        if size == 0 || size % u64::from(config.block_size) != 0 {
            return Err(ScsiError::BadDeviceSize {
                size,
                block_size: config.block_size,
            });
        }
        LogicalUnit::new(lun, config, device, store)
    }

    /// Puts a new logical unit under `lun` in one step, or adds it: a command arriving
    /// meanwhile finds the old one or the new one, never no logical unit (which fails
    /// it with LOGICAL UNIT NOT SUPPORTED, an error multipath does not retry). For a
    /// volume re-promoted at a new epoch on the same node. The LUN inventory does not
    /// change, so the other logical units get no unit attention.
    pub fn replace_shared_lun(
        &self,
        lun: u64,
        config: LuConfig,
        device: Arc<dyn BlockDevice>,
        store: Option<Arc<dyn ReservationStore>>,
    ) -> Result<(), ScsiError> {
        if !self.read().contains_key(&lun) {
            return self.add_shared_lun(lun, config, device, store);
        }
        let new_lu = Self::checked_lu(lun, config, device, store)?;
        self.write().insert(lun, new_lu);
        Ok(())
    }

    /// Removes a logical unit; the others report REPORTED LUNS DATA HAS CHANGED.
    pub fn remove_lun(&self, lun: u64) -> Result<(), ScsiError> {
        let mut luns = self.write();
        if luns.remove(&lun).is_none() {
            return Err(ScsiError::NoSuchLun(lun));
        }
        for lu in luns.values() {
            lu.ua_all(None, Sense::UNIT_ATTENTION_REPORTED_LUNS_DATA_HAS_CHANGED);
        }
        Ok(())
    }

    /// The LUNs in ascending order.
    pub fn luns(&self) -> Vec<u64> {
        if let Some(f) = self.forwarding() {
            return f.luns.keys().copied().collect();
        }
        self.read().keys().copied().collect()
    }

    /// From now on every command, and task management, goes to `to`: another node
    /// executes them on its logical units, which are `luns` (LUN → block size). The
    /// logical units here are dropped, without unit attentions: the initiators learn
    /// of the change from the access states (ASYMMETRIC ACCESS STATE CHANGED there).
    pub fn forward_to(&self, to: Arc<dyn Forwarder>, luns: BTreeMap<u64, u32>) {
        *self.forwarding.write().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(Forwarding { to, luns }));
        self.write().clear();
    }

    /// Stops forwarding: the logical units are added here again ([`Self::add_lun`]),
    /// and, having taken over from another node's, greet each registered I_T nexus with
    /// ASYMMETRIC ACCESS STATE CHANGED rather than POWER ON (SPC-4 §5.15.2.6: the
    /// initiator learns that this port's state changed, and keeps its reservations).
    pub fn take_over(&self) {
        *self.forwarding.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.took_over
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Sets the paths other nodes serve to this device's logical units.
    pub fn set_remote_paths(&self, paths: Arc<dyn RemotePaths>) {
        *self.remote_paths.write().unwrap_or_else(|e| e.into_inner()) = Some(paths);
    }

    pub(crate) fn remote_paths(&self) -> Option<Arc<dyn RemotePaths>> {
        self.remote_paths
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether commands are forwarded to another node.
    pub fn is_forwarding(&self) -> bool {
        self.forwarding().is_some()
    }

    /// The unit attention an I_T nexus gets when a logical unit sees it first. After a
    /// takeover, a nexus that is registered (its initiator used the unit before, through
    /// the old primary) learns that the access state changed; any other nexus, as on a
    /// fresh unit, of the power on (initiators such as libiscsi expect that at login).
    pub(crate) fn first_contact_unit_attention(&self, registered: bool) -> Sense {
        if registered && self.took_over.load(std::sync::atomic::Ordering::Acquire) {
            Sense::UNIT_ATTENTION_ASYMMETRIC_ACCESS_STATE_CHANGED
        } else {
            Sense::UNIT_ATTENTION_POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED
        }
    }

    /// Per command: an `Arc` clone under a read lock, nothing more.
    fn forwarding(&self) -> Option<Arc<Forwarding>> {
        self.forwarding
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Executes one command. Blocking (device I/O); never panics.
    pub fn execute(&self, req: &ScsiRequest<'_>) -> ScsiResponse {
        if self.forwarding().is_none() {
            return match self.lu(req.lun) {
                Some(lu) => lu.execute(self, req),
                None => self.execute_without_lu(req),
            };
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.execute_then(
            req,
            crate::Responder::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| check_condition(Sense::HARDWARE_ERROR_INTERNAL_TARGET_FAILURE))
    }

    /// Executes one command and hands its response to `respond`: at once, or later from
    /// another thread when the device completes a write asynchronously
    /// ([`crate::BlockDevice::write_then`]) or another node answers a forwarded one.
    /// Blocking until the command is placed.
    pub fn execute_then(&self, req: &ScsiRequest<'_>, respond: crate::Responder) {
        if let Some(f) = self.forwarding() {
            let cmd = ForwardedCommand {
                nexus: req.nexus.clone(),
                lun: req.lun,
                cdb: Bytes::copy_from_slice(req.cdb),
                data_out: req.data_out.clone(),
                expected_data_in_len: req.expected_data_in_len,
                attr: req.attr,
                arrived: req.arrived,
            };
            return f.to.execute(cmd, respond);
        }
        match self.lu(req.lun) {
            Some(lu) => lu.execute_then(self, req, respond),
            None => respond.send(self.execute_without_lu(req)),
        }
    }

    /// [`LogicalUnit::try_execute_cached`]: a small READ of data in memory, answered on
    /// the caller's thread; `respond` comes back, with nothing done, for anything else.
    pub fn try_execute_cached(
        &self,
        req: &ScsiRequest<'_>,
        respond: crate::Responder,
    ) -> Result<(), crate::Responder> {
        // Before any lookup: every command of a session comes through here first.
        if !crate::lu::is_read(req.cdb) || self.forwarding().is_some() {
            return Err(respond);
        }
        match self.lu(req.lun) {
            Some(lu) => lu.try_execute_cached(self, req, respond),
            None => Err(respond),
        }
    }

    /// How many Data-Out bytes `cdb` asks for on `lun`; `None` when the CDB cannot be
    /// decoded or the LUN does not exist.
    pub fn data_out_len(&self, lun: u64, cdb: &[u8]) -> Option<u32> {
        if let Some(f) = self.forwarding() {
            return crate::lu::data_out_len(*f.luns.get(&lun)?, Cdb(cdb));
        }
        let lu = self.lu(lun)?;
        crate::lu::data_out_len(lu.block_size(), Cdb(cdb))
    }

    /// The I_T nexus ended: legacy reservations it held are released and its PREVENT
    /// ALLOW MEDIUM REMOVAL state is cleared. Persistent reservations survive
    /// (SPC-4 §5.13.1).
    pub fn nexus_loss(&self, nexus: &ItNexus) {
        if let Some(f) = self.forwarding() {
            return f
                .to
                .task_management(ForwardedTaskManagement::NexusLoss(nexus.clone()));
        }
        for lu in self.read().values() {
            lu.nexus_loss(nexus);
        }
    }

    /// A task management reset. LOGICAL UNIT RESET (`lun` given) establishes BUS DEVICE
    /// RESET FUNCTION OCCURRED (29h/03h); TARGET WARM RESET and TARGET COLD RESET
    /// establish POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h) and POWER ON
    /// OCCURRED (29h/01h) on every logical unit (SAM-5 §6.3, §7.?). Legacy reservations
    /// and PREVENT state are cleared; persistent reservations survive.
    pub fn reset(&self, kind: ResetKind, lun: Option<u64>, by: &ItNexus) {
        if let Some(f) = self.forwarding() {
            return f.to.task_management(ForwardedTaskManagement::Reset {
                kind,
                lun,
                by: by.clone(),
            });
        }
        let luns = self.read();
        match (kind, lun) {
            (ResetKind::LogicalUnit, Some(lun)) => {
                if let Some(lu) = luns.get(&lun) {
                    lu.reset(Sense::UNIT_ATTENTION_BUS_DEVICE_RESET_FUNCTION_OCCURRED);
                }
            }
            (ResetKind::LogicalUnit, None) => {}
            (ResetKind::TargetWarm, _) => {
                for lu in luns.values() {
                    lu.reset(Sense::UNIT_ATTENTION_POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED);
                }
            }
            (ResetKind::TargetCold, _) => {
                for lu in luns.values() {
                    lu.reset(Sense::UNIT_ATTENTION_POWER_ON_OCCURRED);
                }
                drop(luns);
                if let Some(p) = self.remote_paths() {
                    p.cold_reset(by);
                }
            }
        }
    }

    /// Task management aborted tasks of `nexus` (of every I_T nexus when `None`) on
    /// `lun` (ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, or the
    /// preempted nexuses of PREEMPT AND ABORT). A command of theirs that is blocked
    /// waiting for a background operation of the logical unit (SANITIZE with IMMED=0)
    /// returns at once with TASK ABORTED, which the transport drops; the operation goes on
    /// (SBC-3 §4.11.1). Other commands are not affected: they finish on their own.
    ///
    /// The transport calls this before it waits for the aborted tasks to end; otherwise
    /// that wait lasts as long as the sanitize operation.
    pub fn abort_tasks(&self, lun: u64, nexus: Option<&ItNexus>) {
        if let Some(f) = self.forwarding() {
            return f.to.task_management(ForwardedTaskManagement::AbortTasks {
                lun,
                nexus: nexus.cloned(),
            });
        }
        if let Some(lu) = self.lu(lun) {
            lu.abort_tasks(nexus);
        }
    }

    /// Takes the I_T nexuses whose registrations PERSISTENT RESERVE OUT with PREEMPT AND
    /// ABORT removed since the last call, with their LUN. The transport aborts their
    /// tasks on that LUN (SPC-4 §5.13.11.2.?: the tasks of the preempted I_T nexuses are
    /// aborted as if by ABORT TASK SET) and should call this after every PERSISTENT
    /// RESERVE OUT (operation code 5Fh) that completed with GOOD status.
    pub fn take_preempted_nexuses(&self) -> Vec<Preempted> {
        let mut out = Vec::new();
        for lu in self.read().values() {
            let mut st = lu.lock();
            out.extend(
                st.preempted
                    .drain(..)
                    .map(|nexus| Preempted { lun: lu.lun, nexus }),
            );
        }
        if let Some(paths) = self.remote_paths() {
            for p in &out {
                paths.preempted(p.lun, &p.nexus);
            }
        }
        out
    }

    /// Flushes the device of every logical unit (at shutdown): what was written becomes
    /// durable. Errors are logged; the other units are flushed anyway.
    pub fn flush_all(&self) {
        for lu in self.all_lus() {
            if let Err(e) = lu.device.flush() {
                tracing::error!(lun = lu.lun, error = %e, "flushing the device failed");
            }
        }
    }

    /// Publishes the target port groups and their states. When a group's state
    /// changes, every I_T nexus gets ASYMMETRIC ACCESS STATE CHANGED on every logical
    /// unit (SPC-4 §5.15.2.6): all the LUNs of the target change together.
    pub fn set_port_groups(&self, groups: Vec<crate::alua::TargetPortGroup>) {
        let changed = {
            let mut current = self.port_groups.write().unwrap_or_else(|e| e.into_inner());
            let state_of = |list: &[crate::alua::TargetPortGroup], id: u16| {
                list.iter().find(|g| g.id == id).map(|g| g.state)
            };
            let changed = groups
                .iter()
                .any(|g| state_of(&current, g.id) != Some(g.state))
                || current.iter().any(|g| state_of(&groups, g.id).is_none());
            let was_empty = current.is_empty();
            *current = groups;
            changed && !was_empty
        };
        // Raised after the table lock is released: a command holds a logical unit's
        // lock and then reads the table.
        if changed {
            for lu in self.read().values() {
                lu.ua_all(None, Sense::UNIT_ATTENTION_ASYMMETRIC_ACCESS_STATE_CHANGED);
            }
        }
    }

    /// The target port groups as last published (empty: the single-group default).
    pub fn port_groups(&self) -> Vec<crate::alua::TargetPortGroup> {
        self.port_groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The access state of target port group `group`: active/optimized without a
    /// table; unavailable for a group the table does not list.
    pub fn access_state(&self, group: u16) -> crate::alua::AsymmetricAccessState {
        let groups = self.port_groups.read().unwrap_or_else(|e| e.into_inner());
        if groups.is_empty() {
            return crate::alua::AsymmetricAccessState::ActiveOptimized;
        }
        groups
            .iter()
            .find(|g| g.id == group)
            .map_or(crate::alua::AsymmetricAccessState::Unavailable, |g| g.state)
    }

    /// Takes the SET TARGET PORT GROUPS requests received since the last call.
    pub fn take_alua_requests(&self) -> Vec<crate::alua::AluaRequest> {
        std::mem::take(&mut *self.alua_requests.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn push_alua_request(&self, r: crate::alua::AluaRequest) {
        let mut q = self.alua_requests.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a burst of requests is acted on as its last one anyway.
        if q.len() >= 64 {
            q.remove(0);
        }
        q.push(r);
    }

    /// The device under `lun` changed size: CAPACITY DATA HAS CHANGED to every nexus.
    pub fn capacity_changed(&self, lun: u64) {
        if let Some(lu) = self.lu(lun) {
            lu.ua_all(None, Sense::UNIT_ATTENTION_CAPACITY_DATA_HAS_CHANGED);
        }
    }

    /// The space behind `lun` runs low: a thin unit reports THIN PROVISIONING SOFT
    /// THRESHOLD REACHED to every nexus (SBC-3 4.7.3.7.3), so initiators hear before
    /// writes fail; a fully provisioned one, whose space is its own, is left alone.
    /// Returns whether the unit attention was set.
    pub fn thin_threshold_reached(&self, lun: u64) -> bool {
        match self.lu(lun) {
            Some(lu) if lu.device.supports_discard() => {
                lu.ua_all(
                    None,
                    Sense::UNIT_ATTENTION_THIN_PROVISIONING_SOFT_THRESHOLD_REACHED,
                );
                true
            }
            _ => false,
        }
    }

    pub(crate) fn lu(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.read().get(&lun).cloned()
    }

    /// The I/O counters of `lun` when it executes here (not while forwarding).
    pub fn io_stats(&self, lun: u64) -> Option<Arc<crate::stats::IoStats>> {
        self.lu(lun).map(|lu| lu.stats.clone())
    }

    /// Every logical unit (EXTENDED COPY looks targets up by designator).
    pub(crate) fn all_lus(&self) -> Vec<Arc<LogicalUnit>> {
        self.read().values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<LogicalUnit>>> {
        self.luns.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Arc<LogicalUnit>>> {
        self.luns.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Commands addressed to a LUN without a logical unit (SPC-4 §4.? and SAM-5 §5.?):
    /// INQUIRY answers peripheral qualifier 3, REPORT LUNS works, REQUEST SENSE reports
    /// LOGICAL UNIT NOT SUPPORTED, everything else fails with it.
    fn execute_without_lu(&self, req: &ScsiRequest<'_>) -> ScsiResponse {
        let cdb = Cdb(req.cdb);
        let result = match cdb.opcode() {
            _ if req.cdb.is_empty() => Err(Sense::ILLEGAL_REQUEST_INVALID_COMMAND_OPERATION_CODE),
            opcode::INQUIRY => spc::inquiry_no_lu(cdb),
            opcode::REPORT_LUNS => spc::report_luns(self, cdb),
            opcode::REQUEST_SENSE => {
                spc::request_sense_data(cdb, Sense::ILLEGAL_REQUEST_LOGICAL_UNIT_NOT_SUPPORTED)
            }
            _ => Err(Sense::ILLEGAL_REQUEST_LOGICAL_UNIT_NOT_SUPPORTED),
        };
        match result {
            Ok(data) => ScsiResponse {
                status: ScsiStatus::Good,
                sense: None,
                data_in: data,
            },
            Err(sense) => check_condition(sense),
        }
    }
}

/// Data-In of a command without a logical unit.
pub(crate) type NoLuResult = Result<Bytes, Sense>;
