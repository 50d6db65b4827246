//! The server-wide budget of bytes held in the data buffers of commands in flight: the
//! write buffer a command's Data-Out is collected into, and the Data-In of a read until
//! the writer task has put it on the socket.
//!
//! Each session's CmdSN window bounds its commands, but not the sessions together: 1024
//! connections × 128 commands × a 64 MiB write is far more memory than any node has. A
//! command with data takes its expected data transfer length out of the budget when it
//! arrives, before its buffer exists, and gives it back when its response has been
//! written. Taking budget that is free is one atomic compare-and-swap.
//!
//! When the budget is used up a connection waits for it (it stops reading its socket,
//! and TCP pushes back on the initiator) rather than failing the command. Waiting is
//! first-come first-served (tokio's semaphore is fair), so a large command is not starved
//! by a stream of small ones. A command larger than the whole budget takes all of it:
//! it runs alone, after everything before it has drained, instead of never.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default for [`crate::ServerSettings::buffer_bytes_max`]: 1 GiB. That is about one second
/// of a 10 GbE link at line rate — more data in flight than the network can deliver in a
/// second only adds latency — and eight sessions' full 128-command windows of 1 MiB
/// commands; on a storage node with a few GiB of RAM it leaves room for the page cache
/// and the replication buffers.
pub const BUFFER_BYTES_MAX_DEFAULT: u64 = 1 << 30;

/// The budget; cloned handles share it.
#[derive(Clone, Debug)]
pub(crate) struct BufferBudget {
    bytes: Arc<Semaphore>,
    /// The whole budget, as a largest single request.
    total: u32,
}

/// Bytes of the budget held by one command; given back when dropped.
#[derive(Debug, Default)]
pub(crate) struct BufferPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl BufferBudget {
    /// A budget of `bytes_max` bytes (at least 64 KiB, at most what a semaphore counts
    /// and what one command can ask for, 4 GiB).
    pub fn new(bytes_max: u64) -> BufferBudget {
        let total = bytes_max
            .clamp(64 << 10, Semaphore::MAX_PERMITS as u64)
            .min(u64::from(u32::MAX));
        let total = u32::try_from(total).unwrap_or(u32::MAX);
        BufferBudget {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// What a command of `bytes` takes: all of it, or the whole budget if it is larger.
    fn share(&self, bytes: u32) -> u32 {
        bytes.min(self.total)
    }

    /// `bytes` of the budget if they are free now (nothing is needed for no data).
    pub fn try_reserve(&self, bytes: u32) -> Option<BufferPermit> {
        if bytes == 0 {
            return Some(BufferPermit(None));
        }
        self.bytes
            .clone()
            .try_acquire_many_owned(self.share(bytes))
            .ok()
            .map(|p| BufferPermit(Some(p)))
    }

    /// `bytes` of the budget, waiting in line until they are free. `None` only if the
    /// semaphore was closed, which nothing does.
    pub async fn reserve(&self, bytes: u32) -> Option<BufferPermit> {
        if bytes == 0 {
            return Some(BufferPermit(None));
        }
        self.bytes
            .clone()
            .acquire_many_owned(self.share(bytes))
            .await
            .ok()
            .map(|p| BufferPermit(Some(p)))
    }

    /// Bytes free now.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_for_budget_and_lets_an_oversized_command_run_alone() {
        let b = BufferBudget::new(4 << 20);
        let first = b.try_reserve(3 << 20).expect("free");
        assert!(b.try_reserve(2 << 20).is_none(), "over budget");
        let small = b.try_reserve(1 << 20).expect("fits");
        assert_eq!(b.available(), 0);
        // Larger than the whole budget: waits for everything, then takes all of it.
        let b2 = b.clone();
        let big = tokio::spawn(async move { b2.reserve(64 << 20).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!big.is_finished());
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!big.is_finished(), "waits for the whole budget");
        // Fair: a small request behind the big one waits its turn.
        let b3 = b.clone();
        let later = tokio::spawn(async move { b3.reserve(1024).await });
        drop(small);
        let big = tokio::time::timeout(Duration::from_secs(5), big)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(b.available(), 0);
        assert!(!later.is_finished());
        drop(big);
        tokio::time::timeout(Duration::from_secs(5), later)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(b.try_reserve(0).is_some(), "no data needs no budget");
    }
}
