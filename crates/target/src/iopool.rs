//! A fixed pool of threads that run SCSI commands (which do blocking disk I/O).
//!
//! tokio's `spawn_blocking` wakes a thread per call through a condition variable and
//! grows the pool to one thread per queued command; at queue depth 32 that measured as
//! most of the target's CPU time in context switches. Here a few workers take commands
//! from one queue back to back and sleep only when it is empty, so a busy target wakes a
//! thread only when one is idle.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    closed: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// A pool of worker threads; dropping the last handle lets the workers finish the
/// queue and exit.
#[derive(Clone)]
pub(crate) struct IoPool {
    inner: Arc<Inner>,
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
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> std::io::Result<IoPool> {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                idle: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("bulwark-io-{i}"))
                .spawn(move || worker(&inner))?;
        }
        Ok(IoPool {
            _closer: Arc::new(Closer(inner.clone())),
            inner,
        })
    }

    /// Queues a job; wakes a worker only if one is waiting.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.push_back(Box::new(job));
        let wake = q.idle > 0;
        drop(q);
        if wake {
            self.inner.ready.notify_one();
        }
    }
}

fn worker(inner: &Inner) {
    let mut q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = q.jobs.pop_front() {
            drop(q);
            // A panicking job must not take the worker with it.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                tracing::error!("an I/O job panicked");
            }
            q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
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

    #[test]
    fn runs_every_job() {
        let pool = IoPool::new(3).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..1000 {
            let n = n.clone();
            let tx = tx.clone();
            pool.spawn(move || {
                n.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(());
            });
        }
        for _ in 0..1000 {
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        }
        assert_eq!(n.load(Ordering::Relaxed), 1000);
    }
}
