//! The storage seam: a logical unit executes SCSI commands over a [`BlockDevice`].
//!
//! This crate sits below both sides of the seam: the SCSI layer (`scsi`) executes
//! commands over the trait and knows nothing about where blocks live; the stores
//! (`blockstore`'s file and null stores, `replication`'s replicated volume) implement
//! it and know nothing about SCSI. Every method is blocking; callers run them off async
//! runtime threads.
//!
//! [`conformance::check`] is the one suite every implementation runs in its own tests;
//! [`mem::MemDevice`] is the in-memory device for tests of the crates above.

pub mod conformance;
pub mod mem;

use std::io;

/// How a byte range of a device is provisioned (SBC-3 §5.5, GET LBA STATUS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioning {
    /// The range is mapped: reads return what was written.
    Mapped,
    /// The range is deallocated: reads return zeroes.
    Deallocated,
}

/// A contiguous extent of a device with one provisioning status, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset of the extent.
    pub offset: u64,
    /// Length of the extent in bytes.
    pub len: u64,
    /// Its provisioning status.
    pub status: Provisioning,
}

/// The device cannot serve now but will soon, somewhere: a replicated volume whose
/// primary is changing. Returned inside an `io::Error` (see [`unavailable`]), it becomes
/// NOT READY, ASYMMETRIC ACCESS STATE TRANSITION instead of a medium error, so initiators
/// retry rather than fail the I/O.
#[derive(Debug, thiserror::Error)]
#[error("the volume is changing primary: {0}")]
pub struct Transitioning(pub String);

/// Alignment `O_DIRECT` needs of offsets, lengths and buffers (the largest logical
/// block size of common devices).
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer with room for `len` bytes starting at an `O_DIRECT`-aligned offset:
/// `(buffer, start)`; the caller uses `buffer[start..start + len]` (and can hand that
/// on as `Bytes` without a copy).
pub fn aligned_vec(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + DIRECT_ALIGN];
    let start = v.as_ptr().align_offset(DIRECT_ALIGN);
    (v, start)
}

/// An `io::Error` that the SCSI layer reports as a transition (see [`Transitioning`]).
pub fn unavailable(why: impl Into<String>) -> io::Error {
    io::Error::other(Transitioning(why.into()))
}

/// True when `e` is a [`Transitioning`] error.
pub fn is_transitioning(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<Transitioning>())
}

/// Receives the outcome of a write started with [`BlockDevice::write_then`]; called
/// exactly once, possibly on another thread. It must not block.
pub type WriteDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Block storage under a logical unit.
///
/// Offsets and lengths are in bytes and are always multiples of the logical block size
/// the logical unit was created with; the logical unit checks ranges against
/// [`BlockDevice::size_bytes`] before calling.
///
/// Durability contract: after `write_at(.., fua = false)` returns, the data is visible to
/// every later read but may be lost on power failure until `flush` returns. After
/// `write_at(.., fua = true)` or `flush` returns, the data survives power failure.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Size of the device in bytes.
    fn size_bytes(&self) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset`. Deallocated ranges read as zeroes.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Reads `buf` at `offset` only if that needs no wait for the disk (the data is in
    /// memory, such as the page cache): true when it did. False when it would have
    /// waited or failed: the caller then uses [`Self::read_at`] on a thread that may
    /// block, which reads or reports the error. A small read of cached data is so
    /// answered on the thread that received it, without a hand-off to an I/O thread.
    /// The default never reads here.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> bool {
        false
    }

    /// Writes all of `data` at `offset`; with `fua` the data is durable when this returns.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;

    /// Starts the write `write_at` would do and reports its outcome to `done`, which may
    /// run later on another thread: a device whose writes wait for something other than
    /// its own disk (replicas acknowledging) need not hold the calling thread meanwhile.
    ///
    /// When this returns the write is placed: reads see it and it is ordered before any
    /// write started afterwards; only its completion is pending. The default writes
    /// synchronously.
    fn write_then(&self, offset: u64, data: &[u8], fua: bool, done: WriteDone) {
        done(self.write_at(offset, data, fua))
    }

    /// [`Self::write_then`] for data the caller holds as [`bytes::Bytes`] (a command's
    /// received buffer): a device that keeps the data past the call, to send it to its
    /// replicas, takes it as it is instead of copying it. The default lends it to
    /// `write_then`.
    fn write_bytes_then(&self, offset: u64, data: bytes::Bytes, fua: bool, done: WriteDone) {
        self.write_then(offset, &data, fua, done)
    }

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> io::Result<()>;

    /// Deallocates a range (thin provisioning); it then reads as zeroes.
    /// Devices that cannot deallocate write zeroes instead.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Whether `discard` really deallocates (reported as LBPME / LBPU / LBPWS).
    fn supports_discard(&self) -> bool;

    /// The provisioning status of the bytes starting at `offset`: the extent that starts
    /// there and how far it reaches (at most `max_len` bytes).
    fn provisioning(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        Ok(Extent {
            offset,
            len: max_len,
            status: Provisioning::Mapped,
        })
    }

    /// Hints that a range will be read soon (PRE-FETCH). The default does nothing.
    fn prefetch(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}
