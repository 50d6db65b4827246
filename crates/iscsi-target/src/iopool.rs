//! A fixed pool of threads that run SCSI commands (which do blocking disk I/O).
//!
//! tokio's `spawn_blocking` wakes a thread per call through a condition variable and
//! grows the pool to one thread per queued command; at queue depth 32 that measured as
//! most of the target's CPU time in context switches. Here a few workers take commands
//! from one queue back to back and sleep only when it is empty, so a busy target wakes a
//! thread only when one is idle.
//!
//! A worker that runs out of jobs while they come close together (the last two were
//! queued within [`SPIN`]) looks for the next one for [`SPIN`] before it sleeps
//! (yielding its CPU meanwhile), and a job queued then is left to it rather than waking
//! a sleeper. At queue depth 32 the next command arrives within a few tens of
//! microseconds; sleeping and being woken for it cost each command two context switches
//! and a futex wake, most of the CPU a small command used (issue 20: with it, the
//! target process went from 2.0 to 0.9 context switches per 4 KiB write, and 4 KiB
//! random reads from 1.7 to 2.1 times tgt's rate). A lightly loaded target sleeps as before, and a
//! busy one spins at most [`SPIN`] past its last job, however many workers spin.
//!
//! The queue is bounded (DESIGN.md invariant 6): a job needs a [`JobSlot`], taken before
//! it is queued and given back when it has run. A connection task that finds no slot
//! waits for one, so it stops reading its socket and TCP pushes back on the initiator,
//! instead of the queue growing with every command the initiators send faster than the
//! disks complete them. Taking a free slot is one atomic compare-and-swap.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    /// Workers looking for a job before they sleep: a job queued meanwhile is theirs.
    spinning: usize,
    /// When the last job was queued, and how long after the one before it.
    last_push: std::time::Instant,
    push_gap: std::time::Duration,
    closed: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Jobs queued, read without the lock by spinning workers.
    queued: std::sync::atomic::AtomicUsize,
}

/// How long a worker that ran out of jobs looks for the next before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// One place in the pool (queued or running); the job gives it back when it returns.
#[derive(Debug)]
pub(crate) struct JobSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// A pool of worker threads; dropping the last handle lets the workers finish the
/// queue and exit.
#[derive(Clone)]
pub(crate) struct IoPool {
    inner: Arc<Inner>,
    /// Jobs queued or running, at most the number it was created with.
    slots: Arc<Semaphore>,
    _closer: Arc<Closer>,
}

struct Closer(Arc<Inner>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.0.ready.notify_all();
    }
}

impl IoPool {
    /// Starts `threads` workers (at least one) that hold at most `jobs_max` jobs, queued
    /// and running together (at least one per thread).
    pub fn new(threads: usize, jobs_max: usize) -> std::io::Result<IoPool> {
        let threads = threads.max(1);
        let jobs_max = jobs_max.clamp(threads, Semaphore::MAX_PERMITS);
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                idle: 0,
                spinning: 0,
                last_push: std::time::Instant::now(),
                push_gap: std::time::Duration::MAX,
                closed: false,
            }),
            ready: Condvar::new(),
            queued: std::sync::atomic::AtomicUsize::new(0),
        });
        for i in 0..threads {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("bulwark-io-{i}"))
                .spawn(move || worker(&inner))?;
        }
        Ok(IoPool {
            _closer: Arc::new(Closer(inner.clone())),
            inner,
            slots: Arc::new(Semaphore::new(jobs_max)),
        })
    }

    /// A slot for one job, at once if one is free, else when a job returns. `None` only
    /// if the pool was shut down (its semaphore is never closed, so: never).
    pub async fn slot(&self) -> Option<JobSlot> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(JobSlot(p));
        }
        self.slots.clone().acquire_owned().await.ok().map(JobSlot)
    }

    /// A slot if one is free now.
    pub fn try_slot(&self) -> Option<JobSlot> {
        self.slots.clone().try_acquire_owned().ok().map(JobSlot)
    }

    /// Queues a job in `slot`; wakes a worker only if one is waiting. The slot is given
    /// back when the job returns (or unwinds).
    pub fn spawn(&self, slot: JobSlot, job: impl FnOnce() + Send + 'static) {
        let job = move || {
            job();
            drop(slot);
        };
        let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.push_back(Box::new(job));
        let now = std::time::Instant::now();
        q.push_gap = now.saturating_duration_since(q.last_push);
        q.last_push = now;
        self.inner
            .queued
            .store(q.jobs.len(), std::sync::atomic::Ordering::Release);
        let wake = q.idle > 0 && q.jobs.len() > q.spinning;
        drop(q);
        if wake {
            self.inner.ready.notify_one();
        }
    }
}

fn worker(inner: &Inner) {
    use std::sync::atomic::Ordering;
    let mut q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = q.jobs.pop_front() {
            inner.queued.store(q.jobs.len(), Ordering::Release);
            drop(q);
            // A panicking job must not take the worker with it.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                tracing::error!("an I/O job panicked");
            }
            q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            // Only while jobs come close together: a lightly loaded target does not
            // burn CPU looking for the next one.
            if q.jobs.is_empty() && !q.closed && q.push_gap < SPIN {
                q.spinning += 1;
                drop(q);
                let start = std::time::Instant::now();
                while inner.queued.load(Ordering::Acquire) == 0 && start.elapsed() < SPIN {
                    std::thread::yield_now();
                }
                q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.spinning -= 1;
            }
            continue;
        }
        if q.closed {
            return;
        }
        q.idle += 1;
        q = inner.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        q.idle -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn runs_every_job() {
        let pool = IoPool::new(3, 8).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..1000 {
            let n = n.clone();
            let tx = tx.clone();
            let slot = pool.slot().await.unwrap();
            pool.spawn(slot, move || {
                n.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(());
            });
        }
        for _ in 0..1000 {
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        }
        assert_eq!(n.load(Ordering::Relaxed), 1000);
    }

    /// A job queued while a worker looks for one, as that worker gives up, or after it
    /// went to sleep is run all the same: submissions spaced around [`SPIN`], from two
    /// submitters, each waited for with a deadline.
    #[tokio::test]
    async fn a_job_queued_around_a_spinning_worker_still_runs() {
        let pool = IoPool::new(2, 8).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let gaps_us = [0u64, 5, 25, 45, 50, 55, 80, 200, 1000];
        for round in 0..20 {
            for (i, gap) in gaps_us.iter().enumerate() {
                for submitter in 0..2 {
                    let slot = pool.slot().await.unwrap();
                    let tx = tx.clone();
                    pool.spawn(slot, move || {
                        let _ = tx.send((round, i, submitter));
                    });
                }
                std::thread::sleep(std::time::Duration::from_micros(*gap));
                for _ in 0..2 {
                    rx.recv_timeout(std::time::Duration::from_secs(2))
                        .expect("a job queued near a spinning worker was left waiting");
                }
            }
        }
    }

    /// With every slot taken by jobs that cannot finish yet, a submitter waits instead of
    /// queueing; it goes on as soon as one job returns, and a panicking job gives its slot
    /// back too.
    #[tokio::test]
    async fn a_full_queue_makes_the_submitter_wait() {
        let pool = IoPool::new(2, 4).unwrap();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        for _ in 0..4 {
            let gate = gate.clone();
            let slot = pool.try_slot().expect("a free slot");
            pool.spawn(slot, move || {
                let (open, cv) = &*gate;
                let mut g = open.lock().unwrap();
                while !*g {
                    g = cv.wait(g).unwrap();
                }
            });
        }
        assert!(pool.try_slot().is_none(), "the queue is full");
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(200), pool.slot());
        assert!(waiting.await.is_err(), "the submitter must wait");
        {
            let (open, cv) = &*gate;
            *open.lock().unwrap() = true;
            cv.notify_all();
        }
        let slot = tokio::time::timeout(std::time::Duration::from_secs(5), pool.slot())
            .await
            .expect("a slot comes back when a job returns")
            .unwrap();
        pool.spawn(slot, || panic!("a job that panics"));
        let mut held = Vec::new();
        for _ in 0..4 {
            let s = tokio::time::timeout(std::time::Duration::from_secs(5), pool.slot())
                .await
                .expect("every slot comes back, the panicking job's too")
                .unwrap();
            held.push(s);
        }
    }
}
