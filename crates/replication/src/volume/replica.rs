//! The replica side's driver: a thread per replicated volume that applies the
//! primary's stream to the local store through the pure [`Replica`] engine, acknowledges
//! it, and flushes the store in the background.

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block_device::BlockDevice;

use super::{region_crc, LocalCopy, ReplicaState, Transport};
use crate::bitmap::{DirtyMap, RegionSet};
use crate::execute::{run_replica_actions, ReplicaEffects};
use crate::message::{Epoch, Message, NodeId, Payload};
use crate::replica::{Replica, ReplicaAction};

/// How long a replica lets applied writes wait for a background flush of its store
/// (an initiator's SYNCHRONIZE CACHE flushes at once).
const BACKGROUND_FLUSH: Duration = Duration::from_secs(1);

/// How long the replica's thread looks for the next message before it sleeps: under
/// load the next write arrives within tens of microseconds, and sleeping and being
/// woken for it cost two context switches and a futex wake per burst (issue 20).
const SPIN: Duration = Duration::from_micros(50);

/// How long the replica's thread may hold the acknowledgement of applied writes while
/// it applies more of a burst (acks are cumulative: one per burst saves a message and a
/// wake-up of the primary per write, but holding it through a long burst stalls the
/// primary's window).
const ACK_HELD_MAX: Duration = Duration::from_millis(1);

/// When the replica's thread last got a message, and how long after the one before.
struct Arrivals {
    last: Instant,
    gap: Duration,
}

impl Arrivals {
    fn saw_one(&mut self) {
        let now = Instant::now();
        self.gap = now.saturating_duration_since(self.last);
        self.last = now;
    }
}

/// The next event if messages come close together (the last two within [`SPIN`]) and
/// one comes within [`SPIN`] (yielding the CPU meanwhile); `None` at once otherwise, so
/// a quiet volume's thread sleeps.
fn recv_soon<T>(rx: &Receiver<T>, arrivals: &Arrivals) -> Option<T> {
    if arrivals.gap >= SPIN {
        return None;
    }
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(ev) => return Some(ev),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if start.elapsed() >= SPIN => return None,
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
}

/// The product's effects of a replica's actions (see [`run_replica_actions`]): the
/// store, the small state files and the transport, on the replica's thread. Acks are
/// cumulative: only the last one of a burst goes out (`ack`), which saves a message
/// and a wake-up of the primary per write.
struct ReplicaDriver<'a, F: Fn(String)> {
    core: &'a mut Replica,
    transport: &'a dyn Transport,
    state: &'a ReplicaState,
    store: &'a dyn BlockDevice,
    copy: &'a dyn LocalCopy,
    fail: &'a F,
    region_size: u64,
    ack: &'a mut Option<(NodeId, Message)>,
    /// A failure stopped the replica: nothing more is carried out, no ack goes out.
    stopped: bool,
}

impl<F: Fn(String)> ReplicaDriver<'_, F> {
    fn stop(&mut self, why: String) -> Option<()> {
        (self.fail)(why);
        self.stopped = true;
        None
    }
}

impl<F: Fn(String)> ReplicaEffects for ReplicaDriver<'_, F> {
    fn engine<R>(&mut self, f: impl FnOnce(&mut Replica) -> R) -> Option<R> {
        Some(f(self.core))
    }

    fn send(&mut self, to: NodeId, msg: Message) {
        match msg {
            m @ Message::Ack { .. } => *self.ack = Some((to, m)),
            m => self.transport.send(to, m),
        }
    }

    fn persist_epoch(&mut self, epoch: Epoch) -> Option<()> {
        match self.state.set_epoch(epoch) {
            Ok(()) => Some(()),
            // Without the epoch on disk this replica must not ack.
            Err(err) => self.stop(format!("cannot persist the epoch: {err}")),
        }
    }

    fn persist_activity_log(&mut self, log: RegionSet) -> Option<()> {
        match self.state.set_activity_log(&log) {
            Ok(()) => Some(()),
            Err(err) => self.stop(format!("cannot persist the activity log: {err}")),
        }
    }

    fn persist_dirty_map(&mut self, map: DirtyMap) -> Option<()> {
        match self.state.set_dirty_map(&map) {
            Ok(()) => Some(()),
            // Without it this replica must not ack what follows.
            Err(err) => self.stop(format!(
                "cannot persist the map of out-of-sync regions: {err}"
            )),
        }
    }

    fn apply(&mut self, offset: u64, payload: &Payload) -> Option<()> {
        let size = self.store.size_bytes();
        let done = match payload {
            Payload::Flush => self.store.flush(),
            // A resynced region past the end (the activity log runs ahead of the
            // writes): nothing to do.
            Payload::Data(data) if data.is_empty() => Ok(()),
            Payload::Data(data) if offset + data.len() as u64 > size => self
                .copy
                .grow(offset + data.len() as u64)
                .and_then(|()| self.store.write_at(offset, data, false)),
            Payload::Data(data) => self.store.write_at(offset, data, false),
            // Past this copy's end (a resize not applied here yet) there is nothing to
            // deallocate: growing it later adds bytes that read as zeroes.
            Payload::Deallocate(len) => match size.checked_sub(offset) {
                Some(room) if room > 0 => self.store.discard(offset, (*len).min(room)),
                _ => Ok(()),
            },
            // Every earlier position is applied (this thread applies them in order):
            // the copy is this member's part of the snapshot. A member that cannot take
            // it stops, as for a failed write: it leaves the in-sync set rather than
            // acknowledge a snapshot it does not hold.
            Payload::Snapshot(name) => self
                .copy
                .snapshot(name)
                .map_err(|e| io::Error::other(format!("snapshot {name}: {e}"))),
            // A member without the snapshot stops: the primary resyncs it in full.
            Payload::Rollback { snapshot, .. } => self
                .copy
                .rollback(snapshot)
                .map_err(|e| io::Error::other(format!("rollback to snapshot {snapshot}: {e}"))),
        };
        match done {
            Ok(()) => Some(()),
            // No ack: the primary drops this replica from the in-sync set through the
            // control plane.
            Err(err) => self.stop(format!("disk write failed: {err}")),
        }
    }

    fn checksum_region(&mut self, region: u64) -> Option<u32> {
        // A failed read sends nothing: the primary reports the region as not compared.
        region_crc(self.store, region, self.region_size)
            .map_err(|err| tracing::error!(error = %err, region, "verify read failed"))
            .ok()
    }

    fn stopped(&self) -> bool {
        self.stopped
    }
}

enum ReplicaEvent {
    Message(NodeId, Message),
    /// The background flush asked for through `seq` is done.
    Flushed(crate::replica::FlushTicket, Result<(), String>),
    /// The node stops: tell the primary (see [`ReplicaVolume::leave`]).
    Leave,
    Stop,
}

/// A replica of a volume on this node.
pub struct ReplicaVolume {
    tx: Sender<ReplicaEvent>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Why it stopped applying the stream, once it has.
    failed: Arc<Mutex<Option<String>>>,
}

impl ReplicaVolume {
    /// Starts applying streams to `store`; state (epoch, activity log) in `state`.
    ///
    /// `copy` grows the store when a write reaches past its end (the primary writes
    /// there only after the volume was resized, and the stream may bring such a write
    /// before this node has applied the resize itself) and takes snapshots.
    ///
    /// `log_slack`: how many regions the persisted activity log may keep beyond those in
    /// flight (see [`crate::ACTIVITY_LOG_SLACK`]).
    pub fn start(
        region_size: u64,
        store: Arc<dyn BlockDevice>,
        copy: Arc<dyn LocalCopy>,
        state: ReplicaState,
        transport: Arc<dyn Transport>,
        log_slack: usize,
    ) -> io::Result<ReplicaVolume> {
        let dirty_map = state.dirty_map().unwrap_or_else(|e| {
            // Only costs a full sync of the out-of-sync replicas should this node be
            // promoted; the next seal brings a fresh map.
            tracing::warn!(error = %e, "ignoring the map of out-of-sync regions");
            None
        });
        let mut core = Replica::new(region_size, state.epoch()?, state.activity_log()?)
            .with_dirty_map(dirty_map.unwrap_or_default())
            .with_log_slack(log_slack);
        let (tx, rx) = mpsc::channel::<ReplicaEvent>();
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let fail = {
            let failed = failed.clone();
            move |why: String| {
                tracing::error!(
                    "{why}; this replica stops (the primary drops it from the in-sync set)"
                );
                if let Ok(mut f) = failed.lock() {
                    *f = Some(why);
                }
            }
        };
        // Background flushes run beside the stream, so applying writes never waits for
        // one: a flush asked for after `seq` was applied covers it.
        let (flush_tx, flush_rx) = mpsc::channel::<crate::replica::FlushTicket>();
        {
            let (store, tx) = (store.clone(), tx.clone());
            std::thread::Builder::new()
                .name("bulwark-replica-flush".into())
                .spawn(move || {
                    for ticket in flush_rx {
                        let done = store.flush().map_err(|e| e.to_string());
                        if tx.send(ReplicaEvent::Flushed(ticket, done)).is_err() {
                            return;
                        }
                    }
                })?;
        }
        let thread = std::thread::Builder::new()
            .name("bulwark-replica".into())
            .spawn(move || {
                // Acks are cumulative: after a burst of writes only the last one goes
                // out, which saves a message (and a wake-up of the primary) per write.
                let mut next = rx.recv().ok();
                let mut last_flush = Instant::now();
                let mut flushing = false;
                let mut arrivals = Arrivals {
                    last: Instant::now(),
                    gap: Duration::MAX,
                };
                while let Some(ev) = next.take() {
                    arrivals.saw_one();
                    let mut ack: Option<(NodeId, Message)> = None;
                    let mut actions: Vec<ReplicaAction> = match ev {
                        ReplicaEvent::Message(from, msg) => core.on_message(from, msg),
                        ReplicaEvent::Leave => core.leave(),
                        ReplicaEvent::Flushed(seq, Ok(())) => {
                            flushing = false;
                            core.flushed(seq);
                            Vec::new()
                        }
                        ReplicaEvent::Flushed(_, Err(err)) => {
                            fail(format!("disk flush failed: {err}"));
                            return;
                        }
                        ReplicaEvent::Stop => return,
                    };
                    let mut burst = 0;
                    let mut ack_held_since = Instant::now();
                    loop {
                        let mut fx = ReplicaDriver {
                            core: &mut core,
                            transport: transport.as_ref(),
                            state: &state,
                            store: store.as_ref(),
                            copy: copy.as_ref(),
                            fail: &fail,
                            region_size,
                            ack: &mut ack,
                            stopped: false,
                        };
                        run_replica_actions(&mut fx, std::mem::take(&mut actions));
                        if fx.stopped {
                            return;
                        }
                        // A long burst does not hold its acknowledgement: the primary
                        // completes nothing meanwhile, and with 16 writes of 1 MiB in
                        // flight the stream stalled until all were applied here.
                        if ack_held_since.elapsed() >= ACK_HELD_MAX {
                            if let Some((to, m)) = ack.take() {
                                transport.send(to, m);
                            }
                            ack_held_since = Instant::now();
                        }
                        burst += 1;
                        match rx.try_recv() {
                            Ok(ReplicaEvent::Message(from, msg)) if burst < 256 => {
                                arrivals.saw_one();
                                actions = core.on_message(from, msg);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Some((to, m)) = ack {
                        transport.send(to, m);
                    }
                    // Between bursts, and while idle, a background flush lets the
                    // activity log drop regions that are now durable here.
                    loop {
                        let due = if flushing { None } else { core.flush_due() };
                        if let Some(seq) = due {
                            let wait = BACKGROUND_FLUSH.saturating_sub(last_flush.elapsed());
                            if wait.is_zero() {
                                if flush_tx.send(seq).is_err() {
                                    fail("the background flush thread stopped".into());
                                    return;
                                }
                                flushing = true;
                                last_flush = Instant::now();
                                continue;
                            }
                            if next.is_some() {
                                break;
                            }
                            if let Some(ev) = recv_soon(&rx, &arrivals) {
                                next = Some(ev);
                                continue;
                            }
                            match rx.recv_timeout(wait) {
                                Ok(ev) => next = Some(ev),
                                Err(RecvTimeoutError::Timeout) => continue,
                                Err(RecvTimeoutError::Disconnected) => return,
                            }
                        } else if next.is_none() {
                            next = recv_soon(&rx, &arrivals).or_else(|| rx.recv().ok());
                            if next.is_none() {
                                return;
                            }
                        } else {
                            break;
                        }
                    }
                }
            })?;
        Ok(ReplicaVolume {
            tx,
            thread: Some(thread),
            failed,
        })
    }

    /// Why this replica stopped applying the stream, if it has.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// A message from the primary `from`.
    pub fn deliver(&self, from: NodeId, msg: Message) {
        let _ = self.tx.send(ReplicaEvent::Message(from, msg));
    }

    /// This node is stopping: the primary is told to take it out of the in-sync set
    /// at once, so writes do not wait out the replica timeout for it.
    pub fn leave(&self) {
        let _ = self.tx.send(ReplicaEvent::Leave);
    }

    /// Asks the replica's thread to stop, without waiting: dropping the volume waits.
    /// A node that stops many replicas at once asks them all first, so they wind down
    /// together instead of one after another.
    pub fn stop_soon(&self) {
        let _ = self.tx.send(ReplicaEvent::Stop);
    }
}

impl Drop for ReplicaVolume {
    fn drop(&mut self) {
        let _ = self.tx.send(ReplicaEvent::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
