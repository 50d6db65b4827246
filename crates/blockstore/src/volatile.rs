//! Test only: a page cache that a power cut can take back.
//!
//! Every fault the process-level tests inject kills a process, and the kernel's page
//! cache survives that: every write a node applied is still there when it restarts. A
//! power cut loses what was not flushed. With [`crate::OpenOptions::volatile_cache`] a
//! [`crate::FileStore`] keeps the writes since its last flush here, in memory, per
//! 512-byte sector, instead of in the file:
//!
//! - a flush writes them to the file (the file's own page cache then survives the
//!   process, which is the durability boundary of this model);
//! - a background thread writes a random part back now and then, as the kernel's
//!   writeback does, so what survives a kill is a random subset, and a write spanning
//!   several sectors may be torn;
//! - `kill -9` loses whatever is still here;
//! - creating the file `power-cut` next to the store cuts the power of the whole
//!   process: every volatile store keeps a random half of its cached sectors, and the
//!   process aborts at once without running anything else.
//!
//! Never enable it for data anyone wants to keep.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Sector size of the model: a power cut keeps or loses whole sectors.
pub const SECTOR: u64 = 512;

/// The name of the file that cuts the power when it appears next to a store.
pub const POWER_CUT_FILE: &str = "power-cut";

/// The mark a power cut leaves next to the stores: a restarted node reads it as "this
/// machine lost power" (as a changed boot id says it in real life).
pub const POWER_WAS_CUT_FILE: &str = "power-was-cut";

/// How often the writeback thread runs, and the share of cached sectors it writes.
const WRITEBACK_EVERY: Duration = Duration::from_millis(50);
const WRITEBACK_SHARE: f64 = 0.1;

/// The cached sectors of one store.
#[derive(Debug)]
pub(crate) struct VolatileCache {
    file: File,
    trigger: PathBuf,
    sectors: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

static REGISTRY: Mutex<Vec<Weak<VolatileCache>>> = Mutex::new(Vec::new());
static WRITEBACK: std::sync::Once = std::sync::Once::new();

fn poisoned() -> io::Error {
    io::Error::other("volatile cache poisoned")
}

/// A small xorshift generator: the model needs randomness, not quality.
fn random() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        x = t ^ (u64::from(std::process::id()) << 32) | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    x
}

fn chance(p: f64) -> bool {
    (random() >> 11) as f64 / (1u64 << 53) as f64 <= p
}

impl VolatileCache {
    /// A cache over `file`; `power-cut` in `dir` cuts the power.
    pub(crate) fn new(file: File, dir: PathBuf) -> Arc<VolatileCache> {
        let cache = Arc::new(VolatileCache {
            file,
            trigger: dir.join(POWER_CUT_FILE),
            sectors: Mutex::new(BTreeMap::new()),
        });
        if let Ok(mut r) = REGISTRY.lock() {
            r.retain(|w| w.strong_count() > 0);
            r.push(Arc::downgrade(&cache));
        }
        WRITEBACK.call_once(|| {
            let _ = std::thread::Builder::new()
                .name("bulwark-test-writeback".into())
                .spawn(writeback_loop);
        });
        tracing::warn!(
            "TEST ONLY: writes are held in memory until flushed and a power cut loses them"
        );
        cache
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, BTreeMap<u64, Box<[u8]>>>> {
        self.sectors.lock().map_err(|_| poisoned())
    }

    /// Caches `data` at `offset`; a sector it covers in part is completed from what
    /// a reader sees now.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut sectors = self.lock()?;
        let end = offset + data.len() as u64;
        let mut s = offset / SECTOR;
        while s * SECTOR < end {
            let start = s * SECTOR;
            let mut sector = match sectors.get(&s) {
                Some(old) => old.clone(),
                None if offset <= start && start + SECTOR <= end => {
                    vec![0u8; SECTOR as usize].into_boxed_slice()
                }
                None => {
                    let mut b = vec![0u8; SECTOR as usize].into_boxed_slice();
                    read_file(&self.file, start, &mut b)?;
                    b
                }
            };
            let from = offset.max(start);
            let to = end.min(start + SECTOR);
            let src = data
                .get((from - offset) as usize..(to - offset) as usize)
                .ok_or_else(|| io::Error::other("sector arithmetic"))?;
            if let Some(dst) = sector.get_mut((from - start) as usize..(to - start) as usize) {
                dst.copy_from_slice(src);
            }
            sectors.insert(s, sector);
            s += 1;
        }
        Ok(())
    }

    /// Reads through the cache.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let sectors = self.lock()?;
        read_file(&self.file, offset, buf)?;
        let end = offset + buf.len() as u64;
        for (s, data) in sectors.range(offset / SECTOR..end.div_ceil(SECTOR)) {
            let start = s * SECTOR;
            let from = offset.max(start);
            let to = end.min(start + SECTOR);
            if let (Some(dst), Some(src)) = (
                buf.get_mut((from - offset) as usize..(to - offset) as usize),
                data.get((from - start) as usize..(to - start) as usize),
            ) {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Writes every cached sector to the file.
    pub(crate) fn flush(&self) -> io::Result<()> {
        let mut sectors = self.lock()?;
        for (s, data) in sectors.iter() {
            self.file.write_all_at(data, s * SECTOR)?;
        }
        sectors.clear();
        Ok(())
    }

    /// Drops cached sectors in `[offset, offset + len)` (the store then discards the
    /// range in the file itself).
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut sectors = self.lock()?;
        let first = offset.div_ceil(SECTOR);
        let last = (offset + len) / SECTOR;
        let doomed: Vec<u64> = sectors.range(first..last).map(|(s, _)| *s).collect();
        for s in doomed {
            sectors.remove(&s);
        }
        Ok(())
    }

    /// Writes each cached sector back with probability `share` (the kernel's writeback).
    fn write_back(sectors: &mut BTreeMap<u64, Box<[u8]>>, file: &File, share: f64) -> usize {
        let chosen: Vec<u64> = sectors.keys().copied().filter(|_| chance(share)).collect();
        for s in &chosen {
            if let Some(data) = sectors.remove(s) {
                let _ = file.write_all_at(&data, s * SECTOR);
            }
        }
        chosen.len()
    }
}

fn read_file(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    // A sparse file reads zeroes past its written part; only the end of the file stops it.
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

fn caches() -> Vec<Arc<VolatileCache>> {
    REGISTRY
        .lock()
        .map(|r| r.iter().filter_map(Weak::upgrade).collect())
        .unwrap_or_default()
}

fn writeback_loop() {
    loop {
        std::thread::sleep(WRITEBACK_EVERY);
        let caches = caches();
        if caches.iter().any(|c| c.trigger.exists()) {
            cut_power(&caches);
        }
        for c in &caches {
            if let Ok(mut sectors) = c.sectors.lock() {
                VolatileCache::write_back(&mut sectors, &c.file, WRITEBACK_SHARE);
            }
        }
    }
}

/// The power is cut: every store keeps a random half of its cached sectors, then the
/// process ends at once. The caches stay locked until then, so nothing else reaches a
/// file after its cut.
fn cut_power(caches: &[Arc<VolatileCache>]) -> ! {
    let mut held = Vec::new();
    let (mut kept, mut total) = (0, 0);
    for c in caches {
        if let Ok(mut sectors) = c.sectors.lock() {
            total += sectors.len();
            kept += VolatileCache::write_back(&mut sectors, &c.file, 0.5);
            held.push(sectors);
        }
    }
    for c in caches {
        let _ = std::fs::remove_file(&c.trigger);
        if let Some(dir) = c.trigger.parent() {
            let _ = std::fs::write(dir.join(POWER_WAS_CUT_FILE), b"");
        }
    }
    eprintln!(
        "TEST power cut: {kept} of {total} cached sectors reached the disk, {} were lost",
        total - kept
    );
    // No destructor, exit handler or other thread may run after the cut.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> (crate::FileStore, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("bulwark-volatile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("v.img");
        let s = crate::FileStore::open(
            &path,
            &crate::OpenOptions {
                create_size_bytes: Some(64 << 10),
                volatile_cache: true,
                ..Default::default()
            },
        )
        .unwrap();
        (s, path)
    }

    #[test]
    fn writes_stay_in_memory_until_flushed_and_read_back_through_the_cache() {
        use block_device::BlockDevice;
        let (s, path) = store("flush");
        // Unaligned on both ends: the partial sectors are completed from the file.
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 + 1).collect();
        s.write_at(700, &data, false).unwrap();
        let mut back = vec![0u8; 3000];
        s.read_at(700, &mut back).unwrap();
        assert_eq!(back, data, "readers see the cache");
        s.flush().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[700..3700], &data[..], "a flush reaches the file");
        assert!(
            on_disk[..700].iter().all(|b| *b == 0),
            "around it unchanged"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn writeback_takes_a_random_part_and_a_cut_keeps_some_sectors_of_a_write() {
        let mut sectors: BTreeMap<u64, Box<[u8]>> = (0..1000u64)
            .map(|s| (s, vec![s as u8; SECTOR as usize].into_boxed_slice()))
            .collect();
        let dir = std::env::temp_dir().join(format!("bulwark-volatile-{}-wb", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap();
        let written = VolatileCache::write_back(&mut sectors, &file, 0.5);
        // 1000 sectors at one half: far from none and from all (a write is torn).
        assert!(
            (350..650).contains(&written),
            "{written} of 1000 written back"
        );
        assert_eq!(
            sectors.len(),
            1000 - written,
            "what was written left the cache"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
