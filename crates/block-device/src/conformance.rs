//! The conformance suite every [`BlockDevice`] passes: the contract of the trait, checked
//! the same way for the file store, the null store, the replicated volume, the
//! in-memory device and the fault-injecting wrappers. Each implementation calls
//! [`check`] from its own tests; a failure panics with what broke.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{BlockDevice, Provisioning};

/// What the device under test promises beyond the trait's contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keeps {
    /// Reads return what was written (every real store).
    Data,
    /// Writes are dropped and reads return zeroes (the null store, for benchmarks).
    Nothing,
}

/// The block size the suite writes in: the smallest logical block size a logical unit
/// uses, so every offset and length is one a logical unit could pass.
const BLOCK: u64 = 512;

/// How long [`BlockDevice::write_then`]'s completion may take (a replicated write
/// waits for its replicas, on threads of the device).
const COMPLETION_WAIT: Duration = Duration::from_secs(10);

/// Runs the suite on `dev`, which must be at least 1 MiB and not used by anything
/// else meanwhile. Its contents are overwritten.
pub fn check(dev: &dyn BlockDevice, keeps: Keeps) {
    let size = dev.size_bytes();
    assert!(
        size >= 1 << 20 && size.is_multiple_of(BLOCK),
        "size_bytes {size}: the suite needs at least 1 MiB in whole {BLOCK}-byte blocks"
    );
    let expect = |data: &[u8]| -> Vec<u8> {
        match keeps {
            Keeps::Data => data.to_vec(),
            Keeps::Nothing => vec![0; data.len()],
        }
    };
    let read = |offset: u64, len: usize| -> Vec<u8> {
        let mut buf = vec![0xEE; len];
        dev.read_at(offset, &mut buf)
            .unwrap_or_else(|e| panic!("read_at({offset}, {len}): {e}"));
        buf
    };
    let write = |offset: u64, data: &[u8], fua: bool| {
        dev.write_at(offset, data, fua)
            .unwrap_or_else(|e| panic!("write_at({offset}, {}, fua {fua}): {e}", data.len()))
    };

    // Round trips at the first block, in the middle (across 4 KiB and 64 KiB
    // boundaries) and at the last block.
    for (i, offset) in [0, 64 * 1024 - 3 * BLOCK, size / 2 + BLOCK, size - BLOCK]
        .into_iter()
        .enumerate()
    {
        let len = if offset + 8 * BLOCK <= size {
            8 * BLOCK
        } else {
            BLOCK
        };
        let data = pattern(i as u8 + 1, len as usize);
        write(offset, &data, false);
        assert_eq!(
            read(offset, len as usize),
            expect(&data),
            "read after write at {offset}"
        );
    }

    // A read served from memory, when the device serves it so, gives what `read_at` does.
    for offset in [0, 64 * 1024 - 3 * BLOCK, size - BLOCK] {
        let len = BLOCK as usize;
        let mut cached = vec![0xEE; len];
        if dev.read_cached(offset, &mut cached) {
            assert_eq!(cached, read(offset, len), "read_cached at {offset}");
        }
    }

    // A later write wins; the blocks around it keep theirs.
    let base = 256 * 1024;
    write(base, &pattern(10, 4 * BLOCK as usize), false);
    write(base + BLOCK, &pattern(11, BLOCK as usize), true);
    let mut want = pattern(10, 4 * BLOCK as usize);
    want[BLOCK as usize..2 * BLOCK as usize].copy_from_slice(&pattern(11, BLOCK as usize));
    assert_eq!(
        read(base, 4 * BLOCK as usize),
        expect(&want),
        "a partial overwrite (FUA) replaces only its blocks"
    );
    dev.flush().unwrap_or_else(|e| panic!("flush: {e}"));

    // write_then: placed when it returns (a later write to the same place wins and
    // reads see it), completed exactly once.
    let completions = Arc::new(AtomicU32::new(0));
    let outcome = Arc::new(std::sync::Mutex::new(None));
    let offset = 512 * 1024;
    {
        let (completions, outcome) = (completions.clone(), outcome.clone());
        dev.write_then(
            offset,
            &pattern(20, 2 * BLOCK as usize),
            false,
            Box::new(move |r| {
                completions.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut o) = outcome.lock() {
                    *o = Some(r.map_err(|e| e.to_string()));
                }
            }),
        );
    }
    assert_eq!(
        read(offset, 2 * BLOCK as usize),
        expect(&pattern(20, 2 * BLOCK as usize)),
        "write_then is visible to reads once it returns"
    );
    write(offset + BLOCK, &pattern(21, BLOCK as usize), false);
    let deadline = Instant::now() + COMPLETION_WAIT;
    while completions.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "write_then did not complete within {COMPLETION_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Give a second (wrong) completion a chance to show.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        completions.load(Ordering::SeqCst),
        1,
        "write_then completes exactly once"
    );
    let result = outcome.lock().ok().and_then(|o| o.clone());
    assert_eq!(result, Some(Ok(())), "write_then succeeded");
    let mut want = pattern(20, 2 * BLOCK as usize);
    want[BLOCK as usize..].copy_from_slice(&pattern(21, BLOCK as usize));
    assert_eq!(
        read(offset, 2 * BLOCK as usize),
        expect(&want),
        "a write after write_then is ordered after it"
    );

    // Discard: the range reads zeroes whether or not it deallocates; on a device that
    // deallocates, provisioning says so (4 KiB-aligned so file systems can punch it).
    let hole = 640 * 1024;
    let hole_len = 64 * 1024;
    write(hole, &pattern(30, hole_len as usize), false);
    if keeps == Keeps::Data {
        let e = dev
            .provisioning(hole, hole_len)
            .unwrap_or_else(|e| panic!("provisioning({hole}): {e}"));
        assert_eq!(
            (e.offset, e.status),
            (hole, Provisioning::Mapped),
            "written data is mapped"
        );
        assert!(e.len > 0 && e.len <= hole_len, "extent length {}", e.len);
    }
    dev.discard(hole, hole_len)
        .unwrap_or_else(|e| panic!("discard({hole}, {hole_len}): {e}"));
    assert_eq!(
        read(hole, hole_len as usize),
        vec![0; hole_len as usize],
        "a discarded range reads zeroes"
    );
    let e = dev
        .provisioning(hole, hole_len)
        .unwrap_or_else(|e| panic!("provisioning({hole}): {e}"));
    assert!(
        e.offset == hole && e.len > 0 && e.len <= hole_len,
        "provisioning returns the extent that starts where asked, at most as long as asked: {e:?}"
    );
    if dev.supports_discard() {
        assert_eq!(
            e.status,
            Provisioning::Deallocated,
            "a device that deallocates reports a discarded range deallocated"
        );
    }
    dev.prefetch(0, 64 * 1024)
        .unwrap_or_else(|e| panic!("prefetch: {e}"));

    // Writers on several threads, disjoint ranges: each reads back its own.
    let stripe = 16 * 1024;
    let first = 768 * 1024;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for round in 0..8u8 {
                    let at = first + t * stripe;
                    let data = pattern(40 + t as u8 + round, stripe as usize);
                    dev.write_at(at, &data, round % 4 == 3)
                        .unwrap_or_else(|e| panic!("thread {t} write_at({at}): {e}"));
                    let mut back = vec![0; stripe as usize];
                    dev.read_at(at, &mut back)
                        .unwrap_or_else(|e| panic!("thread {t} read_at({at}): {e}"));
                    assert_eq!(back, expect(&data), "thread {t} reads its own write");
                }
            });
        }
    });
    dev.flush().unwrap_or_else(|e| panic!("flush: {e}"));
}

/// Bytes that differ by block and by `seed`, so a misplaced block shows.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31) ^ (i / BLOCK as usize) as u8 ^ (i as u8).rotate_left(3))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDevice;

    #[test]
    fn the_in_memory_devices_conform() {
        check(&MemDevice::new(2 << 20), Keeps::Data);
        check(&MemDevice::thick(2 << 20), Keeps::Data);
    }

    /// The suite must fail a device that breaks the contract.
    #[test]
    fn a_device_that_loses_writes_fails_the_suite() {
        #[derive(Debug)]
        struct Forgetful(MemDevice);
        impl BlockDevice for Forgetful {
            fn size_bytes(&self) -> u64 {
                self.0.size_bytes()
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
                self.0.read_at(offset, buf)
            }
            fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
                // Drops every FUA write.
                if fua {
                    return Ok(());
                }
                self.0.write_at(offset, data, fua)
            }
            fn flush(&self) -> std::io::Result<()> {
                Ok(())
            }
            fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
                self.0.discard(offset, len)
            }
            fn supports_discard(&self) -> bool {
                self.0.supports_discard()
            }
        }
        let r =
            std::panic::catch_unwind(|| check(&Forgetful(MemDevice::new(2 << 20)), Keeps::Data));
        assert!(
            r.is_err(),
            "the suite catches a device that drops FUA writes"
        );
    }
}
