//! An in-memory [`BlockDevice`] for tests of this crate and of the crates above it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{BlockDevice, Extent, Provisioning};

/// Granularity (bytes) at which [`MemDevice`] tracks deallocated ranges.
pub const MEM_DEVICE_GRANULE: u64 = 512;

#[derive(Debug)]
struct Inner {
    data: Vec<u8>,
    /// One flag per granule: mapped (written since creation or the last discard).
    mapped: Vec<bool>,
}

/// A RAM-backed device. Thin (discard deallocates) unless built with
/// [`MemDevice::thick`]; reads and writes can be made to fail for error-path tests.
#[derive(Debug)]
pub struct MemDevice {
    inner: Mutex<Inner>,
    thin: bool,
    /// When set, `read_at` fails with an I/O error.
    pub fail_reads: AtomicBool,
    /// When set, `write_at` fails with an I/O error.
    pub fail_writes: AtomicBool,
    /// This many next `write_at` calls fail as transitioning (a replicated volume
    /// changing primary or resealing), as [`crate::unavailable`] says.
    pub transitioning_writes: AtomicU64,
    /// Number of `flush` calls.
    pub flushes: AtomicU64,
    /// Number of `write_at` calls with `fua = true`.
    pub fua_writes: AtomicU64,
}

impl MemDevice {
    /// A thin device of `size` bytes, all deallocated (reads zeroes).
    pub fn new(size: u64) -> MemDevice {
        MemDevice::build(size, true)
    }

    /// A device whose discard writes zeroes and which reports everything mapped.
    pub fn thick(size: u64) -> MemDevice {
        MemDevice::build(size, false)
    }

    fn build(size: u64, thin: bool) -> MemDevice {
        let len = usize::try_from(size).unwrap_or(0);
        let granules = len.div_ceil(MEM_DEVICE_GRANULE as usize);
        MemDevice {
            inner: Mutex::new(Inner {
                data: vec![0; len],
                mapped: vec![!thin; granules],
            }),
            thin,
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            transitioning_writes: AtomicU64::new(0),
        }
    }

    /// Grows (or shrinks) the device to `size` bytes.
    pub fn resize(&self, size: u64) {
        let mut g = self.lock();
        let len = usize::try_from(size).unwrap_or(0);
        g.data.resize(len, 0);
        let granules = len.div_ceil(MEM_DEVICE_GRANULE as usize);
        g.mapped.resize(granules, !self.thin);
    }

    /// A copy of `len` bytes at `offset` (test inspection).
    pub fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        let _ = self.read_at(offset, &mut v);
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn range(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
    if end > size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "beyond end of device",
        ));
    }
    Ok(start..end)
}

fn granules(r: &std::ops::Range<usize>) -> std::ops::Range<usize> {
    let g = MEM_DEVICE_GRANULE as usize;
    r.start / g..r.end.div_ceil(g)
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.lock().data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.fail_reads.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected read error"));
        }
        let g = self.lock();
        let r = range(offset, buf.len(), g.data.len())?;
        buf.copy_from_slice(g.data.get(r).ok_or(io::ErrorKind::InvalidInput)?);
        Ok(())
    }

    /// Memory never waits: every read that would succeed is done here.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.read_at(offset, buf).is_ok()
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected write error"));
        }
        if self
            .transitioning_writes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(crate::unavailable("injected transition"));
        }
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        let mut g = self.lock();
        let r = range(offset, data.len(), g.data.len())?;
        let gr = granules(&r);
        g.data
            .get_mut(r)
            .ok_or(io::ErrorKind::InvalidInput)?
            .copy_from_slice(data);
        for m in g.mapped.get_mut(gr).into_iter().flatten() {
            *m = true;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected write error"));
        }
        let mut g = self.lock();
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let r = range(offset, len, g.data.len())?;
        let gr = granules(&r);
        g.data
            .get_mut(r)
            .ok_or(io::ErrorKind::InvalidInput)?
            .fill(0);
        if self.thin {
            for m in g.mapped.get_mut(gr).into_iter().flatten() {
                *m = false;
            }
        }
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        self.thin
    }

    fn provisioning(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        let g = self.lock();
        let first = usize::try_from(offset / MEM_DEVICE_GRANULE)
            .map_err(|_| io::ErrorKind::InvalidInput)?;
        let Some(&status) = g.mapped.get(first) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond end of device",
            ));
        };
        let run = g
            .mapped
            .iter()
            .skip(first)
            .take_while(|&&m| m == status)
            .count() as u64;
        let len = (run * MEM_DEVICE_GRANULE)
            .min(max_len)
            .min(g.data.len() as u64 - offset);
        let status = if status {
            Provisioning::Mapped
        } else {
            Provisioning::Deallocated
        };
        Ok(Extent {
            offset,
            len,
            status,
        })
    }
}
