//! The threaded driver around the sans-IO state machines: a [`PrimaryVolume`] is the
//! [`block_device::BlockDevice`] the target serves, a [`ReplicaVolume`] applies a primary's
//! stream to a local store. Each runs one driver thread for protocol events (acks,
//! links, time, resync reads). An initiator's write is submitted on the caller's (I/O
//! pool) thread and completes through a callback when every in-sync member has it
//! ([`block_device::BlockDevice::write_then`]), so it holds no thread while it waits; FUA
//! writes and flushes wait on the caller's thread. No lock is held across disk I/O.
//!
//! The network and the control plane are behind [`Transport`] and [`ControlPlane`], so
//! the same driver runs over TCP in the product and over channels in tests.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block_device::BlockDevice;
use bytes::Bytes;

use crate::bitmap::{DirtyMap, RegionSet};
use crate::execute::{run_primary_actions, PrimaryEffects};
use crate::message::{Epoch, Message, NodeId, Payload};
use crate::primary::{Action, Primary, PrimaryConfig, VerifyReport, WriteTag};

mod replica;
mod state;

pub use replica::ReplicaVolume;
pub use state::ReplicaState;

/// Sends replication messages. Never blocks; messages to one node arrive in order or
/// the driver is told the link went down.
pub trait Transport: Send + Sync + 'static {
    /// Queues `msg` for `to`.
    fn send(&self, to: NodeId, msg: Message);
}

/// Asks the control plane for in-sync-set changes; answers come back through
/// [`PrimaryVolume::isr_committed`].
pub trait ControlPlane: Send + Sync + 'static {
    /// Add `node` to the in-sync set at `epoch`.
    fn request_isr_add(&self, epoch: Epoch, node: NodeId);
    /// Remove `node` from the in-sync set at `epoch`.
    fn request_isr_remove(&self, epoch: Epoch, node: NodeId);
    /// Something an administrator should hear about (the event log).
    fn notice(&self, _notice: Notice) {}
    /// An online verify finished: record its report.
    fn verify_finished(&self, _report: VerifyReport) {}
}

/// Reads `region` of `store` (clipped at its end) and returns its CRC32C.
fn region_crc(store: &dyn BlockDevice, region: u64, region_size: u64) -> io::Result<u32> {
    let offset = region * region_size;
    let len = region_size.min(store.size_bytes().saturating_sub(offset));
    let mut buf = vec![0u8; len as usize];
    if len > 0 {
        store.read_at(offset, &mut buf)?;
    }
    Ok(crc32c::crc32c(&buf))
}

/// Events of a primary for the event log.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    /// A resync of `peer` began with `regions` to send.
    ResyncStarted {
        /// The replica.
        peer: NodeId,
        /// Regions to send.
        regions: u64,
    },
    /// This node's copy failed (a write or flush returned an error): the primary gives
    /// its role up for good so an in-sync replica takes over.
    DiskFailed {
        /// The error.
        error: String,
    },
    /// The resync of `peer` finished.
    ResyncFinished {
        /// The replica.
        peer: NodeId,
        /// Regions it received.
        regions: u64,
        /// How long it took.
        took: Duration,
    },
}

/// Where the resync of one replica stands, with its measured rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncStatus {
    /// The replica.
    pub peer: NodeId,
    /// Regions it received in this resync.
    pub done_regions: u64,
    /// Regions still to send or to be acknowledged.
    pub pending_regions: u64,
    /// Bytes per second over the last seconds.
    pub rate_bytes_per_s: u64,
    /// Whether the replica is connected (a resync waits for a replica that is down).
    pub connected: bool,
}

/// One running resync as the driver measures it.
#[derive(Clone, Copy, Debug)]
struct ResyncMeter {
    /// The core's cumulative count when this resync began.
    base: u64,
    started: Instant,
    last_done: u64,
    last_at: Instant,
    /// Smoothed bytes per second.
    rate: f64,
}

enum PrimaryEvent {
    /// Actions that touch the disk, handed over by a thread that must not block.
    Run(Vec<Action>),
    LinkUp(NodeId),
    LinkDown(NodeId),
    IsrCommitted(Epoch, BTreeSet<NodeId>),
    Stop,
}

/// What a member does to its own copy besides reading and writing blocks, which the
/// serving layer knows how to do (where files live, what the store can do).
pub trait LocalCopy: Send + Sync {
    /// Extends the copy to `size` bytes: the stream brought a write past its end
    /// before this node applied the volume's resize.
    fn grow(&self, size: u64) -> io::Result<()>;

    /// Takes this copy's part of snapshot `name`: a copy of it as it is now, every
    /// earlier write in it and no later one (the caller holds them back).
    fn snapshot(&self, name: &str) -> io::Result<()>;

    /// Makes this copy what its copy of snapshot `name` holds (its size stays).
    fn rollback(&self, name: &str) -> io::Result<()>;
}

struct PrimaryShared {
    core: Mutex<Primary>,
    copy: Arc<dyn LocalCopy>,
    /// Snapshots whose local copy was made or failed, by name, until the caller
    /// that asked for them takes the outcome (see [`PrimaryVolume::snapshot`]).
    snapshots_here: Mutex<HashMap<String, SnapshotHere>>,
    /// Signalled when an entry lands in `snapshots_here`.
    snapshot_made: std::sync::Condvar,
    /// Initiator writes waiting for their completion, by tag. Apart from the core so a
    /// completion does not contend with the writes being submitted.
    waiters: Mutex<HashMap<WriteTag, Waiter>>,
    next_tag: std::sync::atomic::AtomicU64,
    store: Arc<dyn BlockDevice>,
    state: ReplicaState,
    transport: Arc<dyn Transport>,
    control: Arc<dyn ControlPlane>,
    region_size: u64,
    start: Instant,
    events: Mutex<Sender<PrimaryEvent>>,
    resync_regions_sent: std::sync::atomic::AtomicU64,
    writes_completed: std::sync::atomic::AtomicU64,
    /// Running resyncs by replica, measured by the driver once a second.
    resyncs: Mutex<HashMap<NodeId, ResyncMeter>>,
    /// Why the local copy failed, once it has: the primary serves nothing more.
    failed: Mutex<Option<String>>,
    /// The activity log last written. Saves run on the threads of the writes that
    /// need them, so they are serialized here, and each writes the core's newest log
    /// (a superset of every region still in flight): an older log never lands last,
    /// and saves that queue up behind one another are written once.
    saved_log: Mutex<Option<RegionSet>>,
    /// The same for the map of what out-of-sync replicas lack.
    saved_map: Mutex<Option<DirtyMap>>,
    /// Resync reads for the readers ([`RESYNC_READERS`]).
    reads: Mutex<Sender<ResyncRead>>,
    /// Where the readers take them from, and whether they run: they start with the
    /// first resync, so a node primary of hundreds of volumes in sync does not start
    /// (and stop, on every move) four idle threads for each.
    read_jobs: Arc<Mutex<Receiver<ResyncRead>>>,
    readers: std::sync::Once,
    /// This, for the readers to hold weakly.
    myself: std::sync::Weak<PrimaryShared>,
}

/// The outcome of a submission, which can be looked at before it is waited for.
#[derive(Default)]
struct Completion {
    result: Mutex<Option<io::Result<()>>>,
    cv: std::sync::Condvar,
}

impl Completion {
    fn set(&self, r: io::Result<()>) {
        if let Ok(mut g) = self.result.lock() {
            *g = Some(r);
        }
        self.cv.notify_all();
    }

    /// The error it completed with, if it has.
    fn failed(&self) -> Option<io::Error> {
        match self.result.lock().ok()?.as_ref()? {
            Err(e) => Some(io::Error::new(e.kind(), e.to_string())),
            Ok(()) => None,
        }
    }

    fn wait(&self, timeout: Duration) -> io::Result<()> {
        let poisoned = || io::Error::other("completion poisoned");
        let g = self.result.lock().map_err(|_| poisoned())?;
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |r| r.is_none())
            .map_err(|_| poisoned())?;
        g.take().unwrap_or_else(|| {
            Err(block_device::unavailable(
                "the snapshot did not complete in time",
            ))
        })
    }
}

/// When this copy's part of a snapshot was made (or its rollback), or why it could
/// not be.
type SnapshotHere = (Instant, Result<(), String>);

/// The key of a rollback's outcome in `snapshots_here` (snapshots are keyed by name).
fn rollback_key(name: &str) -> String {
    format!("rollback to {name}")
}

/// A region to read for a replica's resync: (replica, stream position, region).
type ResyncRead = (NodeId, crate::Seq, u64);

/// Threads reading regions for resyncs and rebuilds: a disk reads faster with several
/// requests in flight than with one (on the reference machine, one 1 MiB read at a
/// time held a rebuild to a third of the disk's speed).
const RESYNC_READERS: usize = 4;

/// An initiator write or flush waiting for every in-sync member.
struct Waiter {
    /// Past this the write fails as a transition (see [`WRITE_WAIT`]).
    deadline: Instant,
    done: block_device::WriteDone,
}

/// Counters of a primary volume since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrimaryStats {
    /// Regions read and sent to replicas by resync (dirty, divergent or full sync).
    pub resync_regions_sent: u64,
    /// Writes and flushes completed on every in-sync member.
    pub writes_completed: u64,
    /// Regions still to resync to replicas.
    pub resync_pending: u64,
    /// Each replica being resynced.
    pub resyncs: Vec<ResyncStatus>,
    /// How far each replica is behind.
    pub lag: Vec<crate::primary::ReplicaLag>,
}

/// The primary of a replicated volume: what the SCSI target reads and writes.
pub struct PrimaryVolume {
    shared: Arc<PrimaryShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for PrimaryVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrimaryVolume({})", self.shared.state.name)
    }
}

/// How often the primary's core hears that time passed.
const TICK: Duration = Duration::from_millis(20);

/// How long an initiator write may wait for its replicas before the target reports a
/// transition (the in-sync set change or failover takes over from there).
const WRITE_WAIT: Duration = Duration::from_secs(10);

impl PrimaryShared {
    /// Reads `region` of the local copy for a resync: a region this copy holds nothing
    /// of goes as a deallocation, so a resync or rebuild leaves the replica as thin as
    /// this copy (a region holding some data goes whole, holes as zeroes).
    fn read_region(&self, region: u64) -> Option<Payload> {
        let offset = region * self.region_size;
        let len = self
            .region_size
            .min(self.store.size_bytes().saturating_sub(offset));
        if len > 0 && self.store.supports_discard() {
            // A failed query reads the region instead.
            let hole = self
                .store
                .provisioning(offset, len)
                .is_ok_and(|e| e.status == block_device::Provisioning::Deallocated && e.len >= len);
            if hole {
                self.resync_regions_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(Payload::Deallocate(len));
            }
        }
        let len = len as usize;
        // Aligned, so a store that can reads it around the page cache.
        let (mut buf, start) = block_device::aligned_vec(len);
        // A region past the end (activity logs run ahead of the writes) resyncs as
        // nothing.
        if len > 0 {
            if let Err(e) = self.store.read_at(offset, &mut buf[start..start + len]) {
                // A copy that cannot read its own data cannot bring a replica up to
                // date either (the resync would stall there): hand over, as for a
                // failed write.
                tracing::error!(volume = %self.state.name, error = %e, "resync read failed");
                self.disk_failed(&e);
                return None;
            }
            self.resync_regions_sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Some(Payload::Data(Bytes::from(buf).slice(start..start + len)))
    }

    /// Starts the resync readers, once.
    fn start_readers(&self) {
        self.readers.call_once(|| {
            for i in 0..RESYNC_READERS {
                let (weak, jobs) = (self.myself.clone(), self.read_jobs.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("bulwark-read{i}"))
                    .spawn(move || PrimaryShared::resync_reader(weak, jobs));
                if let Err(e) = spawned {
                    // The reads already queued wait for the readers that did start.
                    tracing::warn!(volume = %self.state.name, error = %e, "cannot start a resync reader");
                }
            }
        });
    }

    /// A reader: takes resync reads until the primary is gone, hands each region to
    /// the core and sends what it says.
    fn resync_reader(weak: std::sync::Weak<PrimaryShared>, jobs: Arc<Mutex<Receiver<ResyncRead>>>) {
        loop {
            let job = match jobs.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok((peer, seq, region)) = job else { return };
            let Some(sh) = weak.upgrade() else { return };
            let Some(payload) = sh.read_region(region) else {
                continue;
            };
            let actions = match sh.core.lock() {
                Ok(mut p) => p.region_read(peer, seq, payload),
                Err(_) => return,
            };
            sh.run(actions, true);
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Executes actions; local writes and region reads happen here, without the lock.
    /// With `may_block` false (a network task) the actions that touch the disk go to the
    /// driver thread instead. Completions are delivered together at the end.
    fn run(&self, actions: Vec<Action>, may_block: bool) {
        let mut fx = DriverEffects {
            sh: self,
            may_block,
            completed: Vec::new(),
            to_driver: Vec::new(),
        };
        run_primary_actions(&mut fx, actions);
        let DriverEffects {
            completed,
            to_driver,
            ..
        } = fx;
        if !completed.is_empty() {
            self.writes_completed
                .fetch_add(completed.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let done: Vec<Waiter> = match self.waiters.lock() {
                Ok(mut w) => completed.iter().filter_map(|t| w.remove(t)).collect(),
                Err(_) => Vec::new(),
            };
            for w in done {
                (w.done)(Ok(()));
            }
        }
        if !to_driver.is_empty() {
            self.event(PrimaryEvent::Run(to_driver));
        }
    }

    /// Writes the core's newest activity log unless it is on disk already (see
    /// [`PrimaryShared::saved_log`]).
    fn persist_activity_log(&self) -> io::Result<()> {
        self.save_newest(&self.saved_log, Primary::persisted_log, |log| {
            self.state.set_activity_log(log)
        })
    }

    /// The same for the map of what out-of-sync replicas lack.
    fn persist_dirty_map(&self) -> io::Result<()> {
        self.save_newest(&self.saved_map, Primary::dirty_map, |map| {
            self.state.set_dirty_map(map)
        })
    }

    /// Under `saved`'s lock, takes the core's current state with `current` and writes
    /// it with `write` unless it equals what was written last: concurrent saves are
    /// serialized, the newest always lands last, and queued ones are written once.
    fn save_newest<T: Clone + PartialEq>(
        &self,
        saved: &Mutex<Option<T>>,
        current: impl FnOnce(&Primary) -> &T,
        write: impl FnOnce(&T) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut saved = saved
            .lock()
            .map_err(|_| io::Error::other("saved state poisoned"))?;
        let newest = current(
            &*self
                .core
                .lock()
                .map_err(|_| io::Error::other("primary state poisoned"))?,
        )
        .clone();
        if saved.as_ref() != Some(&newest) {
            write(&newest)?;
            *saved = Some(newest);
        }
        Ok(())
    }

    /// The local copy failed: never serve again (the write stays unacknowledged, and
    /// the lease is no longer renewed, so the leader promotes an in-sync replica that
    /// has the writes), and fail what waits as a transition the initiator retries.
    fn disk_failed(&self, e: &io::Error) {
        let first = match self.failed.lock() {
            Ok(mut f) if f.is_none() => {
                *f = Some(e.to_string());
                true
            }
            _ => false,
        };
        if !first {
            return;
        }
        tracing::error!(volume = %self.state.name, error = %e, "local disk I/O failed; giving the primary role up");
        if let Ok(mut p) = self.core.lock() {
            p.release();
        }
        self.fail_waiters(
            |_| true,
            "the primary's disk failed; another replica takes over",
        );
        self.control.notice(Notice::DiskFailed {
            error: e.to_string(),
        });
    }

    fn event(&self, ev: PrimaryEvent) {
        if let Ok(tx) = self.events.lock() {
            let _ = tx.send(ev);
        }
    }

    /// Fails the waiting writes `which` selects with a transition (NOT READY, the
    /// initiator retries; the in-sync set change or failover takes over from there).
    fn fail_waiters(&self, which: impl Fn(&Waiter) -> bool, why: &str) {
        let failed: Vec<Waiter> = match self.waiters.lock() {
            Ok(mut w) => {
                let tags: Vec<WriteTag> = w
                    .iter()
                    .filter(|(_, w)| which(w))
                    .map(|(t, _)| *t)
                    .collect();
                tags.iter().filter_map(|t| w.remove(t)).collect()
            }
            Err(_) => Vec::new(),
        };
        for w in failed {
            (w.done)(Err(block_device::unavailable(why)));
        }
    }

    /// Handles `msg` from replica `from` on the caller's thread, which must not block.
    fn on_message(&self, from: NodeId, msg: Message) {
        let now = self.now();
        let actions = match self.core.lock() {
            Ok(mut p) => p.on_message(now, from, msg),
            Err(_) => return,
        };
        self.run(actions, false);
    }

    /// Samples the core's resync progress: rates, and the start and end of each resync
    /// for the event log.
    fn measure_resyncs(&self) {
        let (progress, totals) = match self.core.lock() {
            Ok(p) => {
                let progress = p.resync_progress();
                let meters: Vec<NodeId> = match self.resyncs.lock() {
                    Ok(m) => m.keys().copied().collect(),
                    Err(_) => return,
                };
                let totals: HashMap<NodeId, u64> = meters
                    .into_iter()
                    .chain(progress.iter().map(|r| r.peer))
                    .map(|n| (n, p.resync_done_total(n)))
                    .collect();
                (progress, totals)
            }
            Err(_) => return,
        };
        let total = |n: NodeId| totals.get(&n).copied().unwrap_or(0);
        let now = Instant::now();
        let mut notices = Vec::new();
        if let Ok(mut meters) = self.resyncs.lock() {
            for p in &progress {
                let done = total(p.peer);
                let m = meters.entry(p.peer).or_insert_with(|| {
                    notices.push(Notice::ResyncStarted {
                        peer: p.peer,
                        regions: p.done_regions + p.pending_regions,
                    });
                    ResyncMeter {
                        base: done - p.done_regions,
                        started: now,
                        last_done: done,
                        last_at: now,
                        rate: -1.0,
                    }
                });
                let secs = now.duration_since(m.last_at).as_secs_f64();
                if secs > 0.1 {
                    let bytes = (done - m.last_done) as f64 * self.region_size as f64;
                    let sample = bytes / secs;
                    // The first sample stands alone; later ones are smoothed over ~3 s.
                    m.rate = if m.rate < 0.0 {
                        sample
                    } else {
                        0.7 * m.rate + 0.3 * sample
                    };
                    m.last_done = done;
                    m.last_at = now;
                }
            }
            meters.retain(|peer, m| {
                let running = progress.iter().any(|p| p.peer == *peer);
                if !running {
                    notices.push(Notice::ResyncFinished {
                        peer: *peer,
                        regions: total(*peer).saturating_sub(m.base),
                        took: now.duration_since(m.started),
                    });
                }
                running
            });
        }
        for n in notices {
            self.control.notice(n);
        }
    }

    fn event_loop(self: Arc<Self>, epoch: Epoch, rx: Receiver<PrimaryEvent>) {
        // The epoch is durable before this primary can serve: the lease and the
        // in-sync set's commit reach the core only as events, handled below. Done
        // here rather than in `start`, so a node promoted for 256 volumes at once does
        // not start them one disk flush after another (issue 19).
        if let Err(e) = self.state.set_epoch(epoch) {
            self.disk_failed(&io::Error::new(
                e.kind(),
                format!("cannot persist epoch {}: {e}", epoch.0),
            ));
        }
        let mut last_expiry = Instant::now();
        let mut last_meter = Instant::now();
        let mut last_tick = Instant::now();
        loop {
            let ev = match rx.recv_timeout(TICK) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let now = self.now();
            if let Some(PrimaryEvent::Stop) = ev {
                // Writes still waiting fail now (a transition for the initiator)
                // instead of at their timeout.
                self.fail_waiters(|_| true, "the volume stopped serving on this node");
                return;
            }
            if last_meter.elapsed() >= Duration::from_secs(1) {
                last_meter = Instant::now();
                self.measure_resyncs();
            }
            if last_expiry.elapsed() >= Duration::from_millis(100) {
                let now = Instant::now();
                last_expiry = now;
                self.fail_waiters(
                    |w| w.deadline <= now,
                    "the write did not reach every in-sync replica in time",
                );
            }
            let actions = {
                let Ok(mut p) = self.core.lock() else { return };
                // Time passes for the core even while events keep coming.
                let tick = ev.is_none() || last_tick.elapsed() >= TICK;
                if tick {
                    last_tick = Instant::now();
                }
                let mut actions = if tick && ev.is_some() {
                    p.tick(now)
                } else {
                    Vec::new()
                };
                actions.extend(match ev {
                    None => p.tick(now),
                    Some(PrimaryEvent::Run(actions)) => actions,
                    Some(PrimaryEvent::LinkUp(n)) => p.link_up(now, n),
                    Some(PrimaryEvent::LinkDown(n)) => p.link_down(now, n),
                    Some(PrimaryEvent::IsrCommitted(e, isr)) => p.isr_committed(now, e, isr),
                    Some(PrimaryEvent::Stop) => return,
                });
                actions
            };
            self.run(actions, true);
        }
    }
}

/// The product's effects of a primary's actions (see [`run_primary_actions`]): the
/// store, the small state files, the transport and the control plane; the engine
/// behind its lock, taken only between disk operations.
struct DriverEffects<'a> {
    sh: &'a PrimaryShared,
    may_block: bool,
    completed: Vec<WriteTag>,
    to_driver: Vec<Action>,
}

impl PrimaryEffects for DriverEffects<'_> {
    fn engine<R>(&mut self, f: impl FnOnce(&mut Primary, u64) -> R) -> Option<R> {
        let now = self.sh.now();
        self.sh.core.lock().ok().map(|mut p| f(&mut p, now))
    }

    fn may_touch_disk(&self) -> bool {
        self.may_block
    }

    fn defer(&mut self, action: Action) {
        self.to_driver.push(action);
    }

    fn send(&mut self, to: NodeId, msg: Message) {
        self.sh.transport.send(to, msg);
    }

    fn write(&mut self, offset: u64, data: &Bytes) -> Option<()> {
        self.sh
            .store
            .write_at(offset, data, false)
            .map_err(|e| self.sh.disk_failed(&e))
            .ok()
    }

    fn snapshot(&mut self, name: &str) {
        let made = self.sh.copy.snapshot(name).map_err(|e| {
            tracing::error!(volume = %self.sh.state.name, snapshot = name, error = %e, "cannot take the snapshot here");
            e.to_string()
        });
        if let Ok(mut m) = self.sh.snapshots_here.lock() {
            m.insert(name.to_string(), (Instant::now(), made));
        }
        self.sh.snapshot_made.notify_all();
    }

    fn rollback(&mut self, name: &str) -> Option<()> {
        let done = self
            .sh
            .copy
            .rollback(name)
            .map_err(|e| self.sh.disk_failed(&e))
            .ok();
        if let Ok(mut m) = self.sh.snapshots_here.lock() {
            let result = done.ok_or_else(|| "the local copy could not be rolled back".to_string());
            m.insert(rollback_key(name), (Instant::now(), result));
        }
        self.sh.snapshot_made.notify_all();
        done
    }

    fn deallocate(&mut self, offset: u64, len: u64) -> Option<()> {
        self.sh
            .store
            .discard(offset, len)
            .map_err(|e| self.sh.disk_failed(&e))
            .ok()
    }

    fn flush(&mut self) -> Option<()> {
        self.sh
            .store
            .flush()
            .map_err(|e| self.sh.disk_failed(&e))
            .ok()
    }

    fn persist_activity_log(&mut self, _log: RegionSet) -> Option<()> {
        // Saves the core's newest, which covers `_log`.
        self.sh
            .persist_activity_log()
            .map_err(|e| {
                self.sh.disk_failed(&io::Error::new(
                    e.kind(),
                    format!("cannot persist the activity log: {e}"),
                ))
            })
            .ok()
    }

    fn persist_dirty_map(&mut self, _map: DirtyMap) -> Option<()> {
        // The writes that follow make regions lacking that only this map names:
        // without it on disk this copy must not take them.
        self.sh
            .persist_dirty_map()
            .map_err(|e| {
                self.sh.state.forget_dirty_map();
                self.sh.disk_failed(&io::Error::new(
                    e.kind(),
                    format!("cannot persist the map of out-of-sync regions: {e}"),
                ))
            })
            .ok()
    }

    fn read_region_elsewhere(&mut self, peer: NodeId, seq: crate::Seq, region: u64) -> bool {
        self.sh.start_readers();
        self.sh
            .reads
            .lock()
            .is_ok_and(|r| r.send((peer, seq, region)).is_ok())
    }

    fn read_region(&mut self, region: u64) -> Option<Payload> {
        self.sh.read_region(region)
    }

    fn allocated_regions(&mut self) -> Option<RegionSet> {
        let sh = self.sh;
        allocated_regions(sh.store.as_ref(), sh.region_size)
            .map_err(|e| {
                tracing::warn!(volume = %sh.state.name, error = %e, "cannot tell which regions hold data; the new replica gets them all")
            })
            .ok()
    }

    fn checksum_region(&mut self, region: u64) -> Option<u32> {
        let sh = self.sh;
        // On failure the region stays under comparison and is reported as not compared
        // when the verify gives up on it.
        region_crc(sh.store.as_ref(), region, sh.region_size)
            .map_err(|e| {
                tracing::error!(volume = %sh.state.name, region, error = %e, "verify read failed")
            })
            .ok()
    }

    fn complete(&mut self, tag: WriteTag) {
        self.completed.push(tag);
    }

    fn request_isr_add(&mut self, epoch: Epoch, node: NodeId) {
        self.sh.control.request_isr_add(epoch, node);
    }

    fn request_isr_remove(&mut self, epoch: Epoch, node: NodeId) {
        self.sh.control.request_isr_remove(epoch, node);
    }

    fn verify_done(&mut self, report: VerifyReport) {
        self.sh.control.verify_finished(report);
    }

    fn deposed(&mut self, epoch: Epoch) {
        tracing::warn!(volume = %self.sh.state.name, epoch = epoch.0, "deposed by a newer primary");
    }

    fn sealed(&mut self) {
        tracing::info!(volume = %self.sh.state.name, "in-sync set sealed");
    }
}

/// The regions of `store` that hold data, from its provisioning (SEEK_DATA on a
/// file): a thin 100 GiB volume holding 1 GiB has about a thousand.
fn allocated_regions(store: &dyn BlockDevice, region_size: u64) -> io::Result<RegionSet> {
    let size = store.size_bytes();
    let mut out = RegionSet::new();
    let mut offset = 0;
    while offset < size {
        let e = store.provisioning(offset, size - offset)?;
        if e.len == 0 {
            return Err(io::Error::other("the store reported an empty extent"));
        }
        if e.status == block_device::Provisioning::Mapped {
            out.mark(e.offset, e.len, region_size);
        }
        offset = e.offset + e.len;
    }
    Ok(out)
}

impl PrimaryVolume {
    /// Starts the primary of volume `name` at `cfg.epoch` over `store`. It seals the
    /// in-sync set once links come up and serves once sealed, leased and its epoch is
    /// durable.
    pub fn start(
        cfg: PrimaryConfig,
        store: Arc<dyn BlockDevice>,
        copy: Arc<dyn LocalCopy>,
        state: ReplicaState,
        transport: Arc<dyn Transport>,
        control: Arc<dyn ControlPlane>,
    ) -> io::Result<PrimaryVolume> {
        let epoch = cfg.epoch;
        let (tx, rx) = mpsc::channel();
        let (reads, read_jobs) = mpsc::channel();
        let start = Instant::now();
        let region_size = cfg.region_size;
        let shared = Arc::new_cyclic(|myself| PrimaryShared {
            core: Mutex::new(Primary::new(cfg, 0)),
            copy,
            snapshots_here: Mutex::default(),
            snapshot_made: std::sync::Condvar::new(),
            waiters: Mutex::default(),
            next_tag: 1.into(),
            store,
            state,
            transport,
            control,
            region_size,
            start,
            events: Mutex::new(tx),
            resync_regions_sent: Default::default(),
            writes_completed: Default::default(),
            resyncs: Mutex::default(),
            failed: Mutex::default(),
            saved_log: Mutex::default(),
            saved_map: Mutex::default(),
            reads: Mutex::new(reads),
            read_jobs: Arc::new(Mutex::new(read_jobs)),
            readers: std::sync::Once::new(),
            myself: myself.clone(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bulwark-primary".into())
            .spawn(move || s.event_loop(epoch, rx))?;
        Ok(PrimaryVolume {
            shared,
            thread: Some(thread),
        })
    }

    fn event(&self, ev: PrimaryEvent) {
        self.shared.event(ev);
    }

    /// A message from replica `from`. Handled on the caller's thread (acks complete
    /// initiator writes without a hop through the driver thread); what would block is
    /// handed to the driver thread.
    pub fn deliver(&self, from: NodeId, msg: Message) {
        self.shared.on_message(from, msg);
    }

    /// The link to `peer` is up.
    pub fn link_up(&self, peer: NodeId) {
        self.event(PrimaryEvent::LinkUp(peer));
    }

    /// The link to `peer` is down.
    pub fn link_down(&self, peer: NodeId) {
        self.event(PrimaryEvent::LinkDown(peer));
    }

    /// The control plane committed the in-sync set `isr` at `epoch`.
    pub fn isr_committed(&self, epoch: Epoch, isr: BTreeSet<NodeId>) {
        self.event(PrimaryEvent::IsrCommitted(epoch, isr));
    }

    /// The lease is valid until `until` (measured from before it was requested).
    ///
    /// Taken on the caller's thread, which must not block, as acks are: the driver
    /// thread also runs the volume's disk actions, and a background flush behind a
    /// burst of writes held it for up to 400 ms, so a renewal queued there arrived
    /// after the lease it extended had lapsed and writes failed with a transition
    /// (issue 20: 1 MiB writes at depth 16, `qemu-img bench`).
    pub fn lease(&self, until: Instant) {
        let sh = &self.shared;
        let now = sh.now();
        let until = until.saturating_duration_since(sh.start).as_millis() as u64;
        let actions = match sh.core.lock() {
            Ok(mut p) => p.set_lease(now, until),
            Err(_) => return,
        };
        sh.run(actions, false);
    }

    /// Whether the volume serves now.
    pub fn serving(&self) -> bool {
        let now = self.shared.now();
        self.shared
            .core
            .lock()
            .map(|p| p.serving(now).is_ok())
            .unwrap_or(false)
    }

    /// Planned handover, part 1: refuses new writes and waits (up to `timeout`) for
    /// those in flight; true when none is left.
    pub fn drain(&self, timeout: Duration) -> bool {
        if let Ok(mut p) = self.shared.core.lock() {
            p.drain();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.shared.core.lock().map(|p| p.in_flight()).unwrap_or(0);
            if left == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Planned handover, part 2: gives the lease up for good; nothing is served here
    /// from now on.
    pub fn release(&self) {
        if let Ok(mut p) = self.shared.core.lock() {
            p.release();
        }
    }

    /// Counters since this primary started.
    pub fn stats(&self) -> PrimaryStats {
        use std::sync::atomic::Ordering::Relaxed;
        let (pending, progress, lag) = self
            .shared
            .core
            .lock()
            .map(|p| (p.resync_pending(), p.resync_progress(), p.replica_lag()))
            .unwrap_or_default();
        let meters = self
            .shared
            .resyncs
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let resyncs = progress
            .iter()
            .map(|p| {
                let m = meters.get(&p.peer);
                ResyncStatus {
                    peer: p.peer,
                    done_regions: p.done_regions,
                    pending_regions: p.pending_regions,
                    rate_bytes_per_s: m.map_or(0, |m| m.rate.max(0.0) as u64),
                    connected: p.connected,
                }
            })
            .collect();
        PrimaryStats {
            resync_regions_sent: self.shared.resync_regions_sent.load(Relaxed),
            writes_completed: self.shared.writes_completed.load(Relaxed),
            resync_pending: pending,
            resyncs,
            lag,
        }
    }

    /// Starts online verify `id` (replacing one that runs); see
    /// [`Primary::start_verify`]. The report goes to [`ControlPlane::verify_finished`].
    pub fn start_verify(&self, id: u64, repair: bool) {
        let now = self.shared.now();
        let actions = match self.shared.core.lock() {
            Ok(mut p) => p.start_verify(now, id, repair),
            Err(_) => return,
        };
        self.shared.run(actions, false);
    }

    /// The running (or last) online verify.
    pub fn verify_report(&self) -> Option<VerifyReport> {
        self.shared.core.lock().ok().and_then(|p| p.verify_report())
    }

    /// Changes the resync bandwidth per replica and the rebuild bandwidth per new
    /// replica (bytes per second, 0 = unlimited).
    pub fn set_rates(&self, resync: u64, rebuild: u64) {
        if let Ok(mut p) = self.shared.core.lock() {
            p.set_resync_rate(resync);
            p.set_rebuild_rate(rebuild);
        }
    }

    /// The volume grew (see [`Primary::set_size`]).
    pub fn set_size(&self, size_bytes: u64) {
        if let Ok(mut p) = self.shared.core.lock() {
            p.set_size(size_bytes);
        }
    }

    /// The volume's replicas changed (see [`Primary::set_replicas`]); `up` are the
    /// nodes whose links are up now.
    pub fn set_replicas(
        &self,
        replicas: BTreeSet<NodeId>,
        rebuilding: BTreeSet<NodeId>,
        up: &BTreeSet<NodeId>,
    ) {
        let now = self.shared.now();
        let actions = match self.shared.core.lock() {
            Ok(mut p) => {
                let size = self.shared.store.size_bytes();
                let mut a = p.set_replicas(now, replicas.clone(), &rebuilding, size);
                for n in replicas.intersection(up) {
                    a.extend(p.link_up(now, *n));
                }
                a
            }
            Err(_) => return,
        };
        // The allocation scan reads the disk: on the driver thread.
        self.shared.event(PrimaryEvent::Run(actions));
    }

    /// Whether this primary serves or is about to (see [`Primary::claims_service`]):
    /// `grace` is how long a primary that never got a lease keeps its claim.
    pub fn claims_service(&self, grace: Duration) -> bool {
        let now = self.shared.now();
        self.failure().is_none()
            && self
                .shared
                .core
                .lock()
                .map(|p| p.claims_service(now, grace.as_millis() as u64))
                .unwrap_or(false)
    }

    /// Why this node's copy failed, if it has: the primary serves nothing more and
    /// must not renew its lease.
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().ok().and_then(|f| f.clone())
    }

    /// The in-sync set as the primary knows it (without itself).
    pub fn in_sync(&self) -> BTreeSet<NodeId> {
        self.shared
            .core
            .lock()
            .map(|p| p.in_sync().clone())
            .unwrap_or_default()
    }

    /// Takes snapshot `name` at one point of the stream, on this copy and on every
    /// in-sync replica: [`Self::snapshot_group`] of this volume alone.
    pub fn snapshot(&self, name: &str) -> io::Result<Duration> {
        PrimaryVolume::snapshot_group(&[self], name).map(|(pause, _)| pause)
    }

    /// Takes snapshot `name` of `volumes` (all primary here: the volumes of a target)
    /// at one point of each one's stream, on this node's copies and on every in-sync
    /// replica (see [`Primary::submit_snapshot`]). Writes to all of them are held from
    /// before the first position is placed until every copy here is made, so no write
    /// lands between the positions of two volumes: the snapshots are crash-consistent
    /// together. Returns how long writes were held, once every in-sync member of each
    /// volume holds its copy, and for each volume the replicas that hold it (in sync
    /// from before the snapshot to after: a replica that could not take its copy left
    /// the set).
    pub fn snapshot_group(
        volumes: &[&PrimaryVolume],
        name: &str,
    ) -> io::Result<(Duration, Vec<BTreeSet<NodeId>>)> {
        PrimaryVolume::barrier_group(volumes, name, name, |p, now, tag| {
            p.submit_snapshot(now, tag, name.to_string())
        })
    }

    /// Rolls `volumes` (primary here) back to their snapshot `name`, the way
    /// [`Self::snapshot_group`] takes one: writes to all are held until every copy
    /// here is rolled back. Returns the write pause, and for each volume the in-sync
    /// replicas that rolled back (one that could not left the set: it is resynced in
    /// full).
    pub fn rollback_group(
        volumes: &[&PrimaryVolume],
        name: &str,
    ) -> io::Result<(Duration, Vec<BTreeSet<NodeId>>)> {
        PrimaryVolume::barrier_group(volumes, name, &rollback_key(name), |p, now, tag| {
            p.submit_rollback(now, tag, name.to_string())
        })
    }

    /// A snapshot or a rollback of `volumes` at one point of their streams (`key`
    /// names its local outcome in `snapshots_here`).
    fn barrier_group(
        volumes: &[&PrimaryVolume],
        name: &str,
        key: &str,
        submit: impl Fn(&mut Primary, u64, WriteTag) -> Result<Vec<Action>, crate::primary::NotServing>,
    ) -> io::Result<(Duration, Vec<BTreeSet<NodeId>>)> {
        /// Thaws the volumes however the snapshot ends.
        struct Thaw<'a>(&'a [&'a PrimaryVolume]);
        impl Drop for Thaw<'_> {
            fn drop(&mut self) {
                for v in self.0 {
                    let now = v.shared.now();
                    let actions = match v.shared.core.lock() {
                        Ok(mut p) => p.thaw(now),
                        Err(_) => continue,
                    };
                    v.shared.run(actions, true);
                }
            }
        }
        let before: Vec<BTreeSet<NodeId>> = volumes.iter().map(|v| v.in_sync()).collect();
        let frozen_at = Instant::now();
        for v in volumes {
            v.shared
                .core
                .lock()
                .map_err(|_| io::Error::other("primary state poisoned"))?
                .freeze();
        }
        let thaw = Thaw(volumes);
        let mut completions = Vec::new();
        for v in volumes {
            let done = Arc::new(Completion::default());
            let d = done.clone();
            v.submit_then(
                |p, now, tag| submit(p, now, tag),
                Box::new(move |r| d.set(r)),
            );
            completions.push(done);
        }
        let deadline = Instant::now() + WRITE_WAIT;
        for (v, done) in volumes.iter().zip(&completions) {
            v.wait_for_local_snapshot(key, done, deadline)
                .map_err(|e| io::Error::new(e.kind(), format!("{name}: {e}")))?;
        }
        drop(thaw);
        let pause = frozen_at.elapsed();
        for done in &completions {
            done.wait(WRITE_WAIT + Duration::from_secs(5))?;
        }
        let members = volumes
            .iter()
            .zip(before)
            .map(|(v, before)| v.in_sync().intersection(&before).copied().collect())
            .collect();
        Ok((pause, members))
    }

    /// Waits until this copy's part of snapshot `name` is made (or failed, or the
    /// snapshot completed with an error, `done`).
    fn wait_for_local_snapshot(
        &self,
        name: &str,
        done: &Completion,
        deadline: Instant,
    ) -> io::Result<()> {
        let sh = &self.shared;
        let mut made = sh
            .snapshots_here
            .lock()
            .map_err(|_| io::Error::other("primary state poisoned"))?;
        loop {
            if let Some((_, result)) = made.remove(name) {
                return result.map_err(io::Error::other);
            }
            if let Some(e) = done.failed() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(block_device::unavailable(
                    "the snapshot was not taken here in time",
                ));
            }
            // Short waits: a completion with an error does not signal the condvar.
            let wait = (deadline - now).min(Duration::from_millis(5));
            made = sh
                .snapshot_made
                .wait_timeout(made, wait)
                .map_err(|_| io::Error::other("primary state poisoned"))?
                .0;
        }
    }
}

impl PrimaryVolume {
    /// Submits through the core; `done` hears when every in-sync member has it.
    fn submit_then(
        &self,
        submit: impl FnOnce(
            &mut Primary,
            u64,
            WriteTag,
        ) -> Result<Vec<Action>, crate::primary::NotServing>,
        done: block_device::WriteDone,
    ) {
        let sh = &self.shared;
        let tag = WriteTag(
            sh.next_tag
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let waiter = Waiter {
            deadline: Instant::now() + WRITE_WAIT,
            done,
        };
        let Ok(mut waiters) = sh.waiters.lock() else {
            return (waiter.done)(Err(io::Error::other("primary state poisoned")));
        };
        waiters.insert(tag, waiter);
        drop(waiters);
        let submitted = {
            let now = sh.now();
            match sh.core.lock() {
                Ok(mut p) => {
                    submit(&mut p, now, tag).map_err(|e| block_device::unavailable(e.to_string()))
                }
                Err(_) => Err(io::Error::other("primary state poisoned")),
            }
        };
        match submitted {
            Ok(actions) => sh.run(actions, true),
            Err(e) => {
                let w = sh.waiters.lock().ok().and_then(|mut w| w.remove(&tag));
                if let Some(w) = w {
                    (w.done)(Err(e));
                }
            }
        }
    }

    /// Submits through the core and waits for the completion (every in-sync member).
    fn submit_and_wait(
        &self,
        submit: impl FnOnce(
            &mut Primary,
            u64,
            WriteTag,
        ) -> Result<Vec<Action>, crate::primary::NotServing>,
    ) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit_then(
            submit,
            Box::new(move |r| {
                let _ = tx.try_send(r);
            }),
        );
        // The driver fails a write at its deadline; this bound is only a backstop.
        rx.recv_timeout(WRITE_WAIT + Duration::from_secs(5))
            .unwrap_or_else(|_| {
                Err(block_device::unavailable(
                    "the write did not complete in time",
                ))
            })
    }
}

impl Drop for PrimaryVolume {
    fn drop(&mut self) {
        self.event(PrimaryEvent::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl BlockDevice for PrimaryVolume {
    fn size_bytes(&self) -> u64 {
        self.shared.store.size_bytes()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if !self.serving() {
            return Err(block_device::unavailable(
                "not serving (sealing, no lease or deposed)",
            ));
        }
        self.shared.store.read_at(offset, buf)
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        // Not serving: `read_at` says why.
        self.serving() && self.shared.store.read_cached(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        // The one copy of the data: the stream and the local write share it.
        let data = Bytes::copy_from_slice(data);
        self.submit_and_wait(|p, now, tag| p.submit_write(now, tag, offset, data))?;
        if fua {
            // FUA: durable here and on every in-sync replica before the status.
            self.flush()?;
        }
        Ok(())
    }

    fn write_then(&self, offset: u64, data: &[u8], fua: bool, done: block_device::WriteDone) {
        self.write_bytes_then(offset, Bytes::copy_from_slice(data), fua, done);
    }

    fn write_bytes_then(&self, offset: u64, data: Bytes, fua: bool, done: block_device::WriteDone) {
        if fua {
            // The flush that follows must not run where the completion lands (a
            // network task); FUA writes take the blocking path.
            return done(self.write_at(offset, &data, true));
        }
        self.submit_then(|p, now, tag| p.submit_write(now, tag, offset, data), done);
    }

    fn flush(&self) -> io::Result<()> {
        self.submit_and_wait(|p, now, tag| p.submit_flush(now, tag))
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // Through the stream like a write: every in-sync member deallocates the range
        // (or writes zeroes, if its store cannot) before this returns.
        self.submit_and_wait(|p, now, tag| p.submit_deallocate(now, tag, offset, len))
    }

    fn supports_discard(&self) -> bool {
        self.shared.store.supports_discard()
    }

    fn provisioning(&self, offset: u64, max_len: u64) -> io::Result<block_device::Extent> {
        if !self.serving() {
            return Err(block_device::unavailable(
                "not serving (sealing, no lease or deposed)",
            ));
        }
        self.shared.store.provisioning(offset, max_len)
    }

    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.shared.store.prefetch(offset, len)
    }
}

#[cfg(test)]
mod tests;
