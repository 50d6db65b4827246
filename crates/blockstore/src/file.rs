use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use block_device::{BlockDevice, Extent, Provisioning};
use rustix::fs::{FallocateFlags, SeekFrom};

use crate::volatile::VolatileCache;
use crate::StoreError;

/// How to open a [`FileStore`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Size to create a missing file with (sparse); ignored for existing files and devices.
    pub create_size_bytes: Option<u64>,
    /// Logical block size the store must be a multiple of.
    pub block_size: u32,
    /// Open with `O_DIRECT` (bypass the page cache; buffers must then be aligned, so the
    /// store falls back to buffered I/O for unaligned buffers).
    pub direct: bool,
    /// Write large aligned writes (at least [`BULK_MIN_BYTES`]) around the page cache,
    /// through a second descriptor opened with `O_DIRECT`: a rebuild streams a whole
    /// volume through a replica, which would otherwise evict the cache and run at the
    /// page cache's copy speed (on the reference machine, half of the disk's). Small
    /// writes stay buffered. Ignored where the file system has no `O_DIRECT` (tmpfs).
    pub bulk_direct: bool,
    /// Open read-only.
    pub read_only: bool,
    /// Test only: hold writes in memory until flushed, so a power cut can take them
    /// back (see [`crate::volatile`]). Never for data anyone wants to keep.
    pub volatile_cache: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            create_size_bytes: None,
            block_size: 512,
            direct: false,
            bulk_direct: false,
            read_only: false,
            volatile_cache: false,
        }
    }
}

/// A file or block device holding a logical unit's blocks.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
    /// A second descriptor without O_DIRECT for buffers that are not aligned.
    buffered: Option<File>,
    /// With [`OpenOptions::bulk_direct`]: an `O_DIRECT` descriptor for large writes.
    bulk: Option<File>,
    /// Grows with [`FileStore::grow`]; never shrinks.
    size_bytes: std::sync::atomic::AtomicU64,
    is_block_device: bool,
    /// Flushes asked for and flushes that cover them (group commit: callers that
    /// arrive while one fsync runs share the next one).
    flush_requests: AtomicU64,
    flushes_done: AtomicU64,
    flush_lock: Mutex<()>,
    /// Test only (see [`OpenOptions::volatile_cache`]).
    volatile: Option<Arc<VolatileCache>>,
    /// Reads with `RWF_NOWAIT` are possible here ([`BlockDevice::read_cached`]); cleared
    /// when the file system refuses them.
    nowait_reads: std::sync::atomic::AtomicBool,
}

impl FileStore {
    /// Opens (or creates, sparse) the store at `path`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<FileStore, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let io_err = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let exists = path.exists();
        if !exists {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(open_err)?;
            }
        }
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(!opts.read_only);
        if !exists && opts.create_size_bytes.is_some() {
            o.create(true);
        }
        let plain = o.open(path).map_err(open_err)?;
        let meta = plain.metadata().map_err(io_err)?;
        let is_block_device = meta.file_type().is_block_device();
        if !exists {
            if let Some(size) = opts.create_size_bytes {
                plain.set_len(size).map_err(io_err)?;
            }
        }
        let size_bytes = if is_block_device {
            rustix::fs::seek(&plain, SeekFrom::End(0)).map_err(|e| io_err(e.into()))?
        } else {
            plain.metadata().map_err(io_err)?.len()
        };
        let bs = u64::from(opts.block_size);
        if size_bytes == 0 || size_bytes % bs != 0 {
            return Err(StoreError::BadSize {
                path: path.to_path_buf(),
                size: size_bytes,
                block_size: opts.block_size,
            });
        }
        let (file, buffered) = if opts.direct {
            let mut d = std::fs::OpenOptions::new();
            d.read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_DIRECT);
            (d.open(path).map_err(open_err)?, Some(plain))
        } else {
            (plain, None)
        };
        // tmpfs refuses O_DIRECT: then large writes stay buffered like the rest.
        let bulk = (opts.bulk_direct && !opts.direct && !opts.read_only && !opts.volatile_cache)
            .then(|| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten();
        let volatile = if opts.volatile_cache && !opts.read_only {
            let handle = buffered
                .as_ref()
                .unwrap_or(&file)
                .try_clone()
                .map_err(io_err)?;
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            Some(VolatileCache::new(handle, dir))
        } else {
            None
        };
        Ok(FileStore {
            path: path.to_path_buf(),
            file,
            buffered,
            bulk,
            size_bytes: std::sync::atomic::AtomicU64::new(size_bytes),
            is_block_device,
            flush_requests: AtomicU64::new(0),
            flushes_done: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            volatile,
            nowait_reads: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Grows a file store to `new_size` bytes (a volume resize). The file is extended
    /// sparse before the new size is published, so no reader sees blocks past the end of
    /// the file. Block devices cannot grow here.
    pub fn grow(&self, new_size: u64) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let old = self.size_bytes.load(Ordering::Acquire);
        if new_size <= old {
            return Ok(());
        }
        if self.is_block_device {
            return Err(StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("a block device cannot be grown by Bulwark"),
            });
        }
        let io_err = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.set_len(new_size).map_err(io_err)?;
        self.file.sync_all().map_err(io_err)?;
        self.size_bytes.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Makes `dest` a copy of this store as it is now that shares its blocks (a
    /// reflink, `FICLONE`): it takes no space until one of the two changes, and it
    /// takes milliseconds whatever the size. Every write that returned before the call
    /// is in the copy (the file system writes the source's cached pages back first).
    /// When this returns the copy is durable, its name included. On failure nothing is
    /// left at `dest`. A file system that cannot share blocks (ext4, tmpfs) gives
    /// [`StoreError::NoReflink`]: there is no fallback to a full copy, which would take
    /// minutes and the space of the whole volume.
    pub fn reflink_to(&self, dest: &Path) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io {
            path: dest.to_path_buf(),
            source,
        };
        if self.is_block_device {
            return Err(io_err(io::Error::other(
                "a block device cannot be snapshotted by Bulwark (only a file store can)",
            )));
        }
        if self.volatile.is_some() {
            // Test only: writes held in memory reach the file first.
            self.flush().map_err(io_err)?;
        }
        if dest.exists() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "already exists",
            )));
        }
        let dir = dest.parent().unwrap_or(Path::new("."));
        let mut tmp_name = dest.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        let made = (|| {
            let copy = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            rustix::fs::ioctl_ficlone(&copy, &self.file).map_err(io::Error::from)?;
            copy.sync_all()?;
            std::fs::rename(&tmp, dest)?;
            File::open(dir)?.sync_all()
        })();
        made.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY) => StoreError::NoReflink {
                    path: self.path.clone(),
                    source: e,
                },
                Some(libc::EXDEV) => io_err(io::Error::other(format!(
                    "not on the file system of {} ({e}): a copy that shares blocks must be",
                    self.path.display()
                ))),
                _ => io_err(e),
            }
        })
    }

    /// Makes this store what the file at `src` holds, sharing its blocks (a reflink
    /// over the whole file, as [`Self::reflink_to`] makes one): a rollback to a
    /// snapshot. The store keeps its size (a volume grown since reads zeroes past the
    /// snapshot's end). Durable when this returns. Writes must not run meanwhile.
    pub fn reflink_from(&self, src: &Path) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        if self.is_block_device || self.volatile.is_some() {
            return Err(io_err(io::Error::other(
                "only a plain file store can be rolled back",
            )));
        }
        let source = File::open(src).map_err(|e| StoreError::Open {
            path: src.to_path_buf(),
            source: e,
        })?;
        if let Err(e) = rustix::fs::ioctl_ficlone(&self.file, &source) {
            let e = io::Error::from(e);
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY) => StoreError::NoReflink {
                    path: self.path.clone(),
                    source: e,
                },
                _ => io_err(e),
            });
        }
        let size = self.size_bytes.load(Ordering::Acquire);
        if self.file.metadata().map_err(io_err)?.len() < size {
            self.file.set_len(size).map_err(io_err)?;
        }
        self.file.sync_all().map_err(io_err)
    }

    /// Whether files in `dir` can share blocks (reflinks), as snapshots and clones
    /// need: two small files are made there, one cloned onto the other (`FICLONE`),
    /// and removed. A node checks its data folder once at start and tells the cluster,
    /// so a snapshot that some member could not take is refused before it starts.
    pub fn shares_blocks(dir: &Path) -> io::Result<bool> {
        let tag = format!(".bulwark-reflink-probe.{}", std::process::id());
        let (a, b) = (dir.join(format!("{tag}.a")), dir.join(format!("{tag}.b")));
        let probe = (|| {
            let src = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&a)?;
            src.write_all_at(&[0x5a; 4096], 0)?;
            let dest = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&b)?;
            match rustix::fs::ioctl_ficlone(&dest, &src).map_err(io::Error::from) {
                Ok(()) => Ok(true),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY)
                    ) =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })();
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        probe
    }

    /// The path the store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file_for(&self, ptr: *const u8, len: usize, offset: u64) -> &File {
        const ALIGN: usize = 4096;
        match &self.buffered {
            Some(b)
                if !(ptr as usize).is_multiple_of(ALIGN)
                    || !len.is_multiple_of(ALIGN)
                    || !offset.is_multiple_of(ALIGN as u64) =>
            {
                b
            }
            _ => &self.file,
        }
    }
}

/// Writes at least this large, aligned, go around the page cache with
/// [`OpenOptions::bulk_direct`]; so do reads that large into an aligned buffer
/// ([`block_device::aligned_vec`]).
pub const BULK_MIN_BYTES: usize = 256 << 10;

use block_device::DIRECT_ALIGN;

fn is_bulk(offset: u64, len: usize) -> bool {
    len >= BULK_MIN_BYTES
        && len.is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
}

thread_local! {
    /// A buffer per thread for bulk writes whose data is not aligned (a slice of a
    /// received frame, usually), reused; its aligned part is what gets written.
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes `data` at `offset` through the `O_DIRECT` descriptor, copying it into an
/// aligned buffer first unless it is aligned already.
fn write_direct(direct: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    if (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
        return direct.write_all_at(data, offset);
    }
    BOUNCE.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < data.len() + DIRECT_ALIGN {
            *buf = vec![0; data.len() + DIRECT_ALIGN];
        }
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut buf[start..start + data.len()];
        aligned.copy_from_slice(data);
        direct.write_all_at(aligned, offset)
    })
}

impl BlockDevice for FileStore {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(std::sync::atomic::Ordering::Acquire)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        debug_assert!(
            offset + buf.len() as u64 <= self.size_bytes.load(std::sync::atomic::Ordering::Acquire)
        );
        if let Some(v) = &self.volatile {
            return v.read(offset, buf);
        }
        match &self.bulk {
            // A resync reading whole regions into an aligned buffer: around the cache
            // too (the kernel writes dirty cached pages of the range back first).
            Some(direct)
                if is_bulk(offset, buf.len())
                    && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) =>
            {
                direct.read_exact_at(buf, offset)
            }
            _ => self
                .file_for(buf.as_ptr(), buf.len(), offset)
                .read_exact_at(buf, offset),
        }
    }

    /// `preadv2(RWF_NOWAIT)`: the kernel copies what the page cache holds and returns
    /// `EAGAIN` rather than start a disk read.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        // With O_DIRECT the data is not in the page cache; the volatile test cache reads
        // its file under a lock.
        if self.buffered.is_some() || self.volatile.is_some() || !self.nowait_reads.load(Relaxed) {
            return false;
        }
        let len = buf.len();
        match rustix::io::preadv2(
            &self.file,
            &mut [io::IoSliceMut::new(buf)],
            offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            // Shorter: only part of it is cached, and `read_at` reads it all.
            Ok(n) => n == len,
            Err(rustix::io::Errno::OPNOTSUPP) => {
                self.nowait_reads.store(false, Relaxed);
                false
            }
            Err(_) => false,
        }
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        debug_assert!(
            offset + data.len() as u64
                <= self.size_bytes.load(std::sync::atomic::Ordering::Acquire)
        );
        if let Some(v) = &self.volatile {
            v.write(offset, data)?;
            return if fua { v.flush() } else { Ok(()) };
        }
        let f = self.file_for(data.as_ptr(), data.len(), offset);
        match &self.bulk {
            Some(direct) if is_bulk(offset, data.len()) => write_direct(direct, offset, data)?,
            _ => f.write_all_at(data, offset)?,
        }
        if fua {
            // RWF_DSYNC would make this one syscall; fdatasync keeps it portable.
            f.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if let Some(v) = &self.volatile {
            return v.flush();
        }
        // Group commit: a sync that began after this call began covers every write
        // completed before it, so a caller that finds one done need not start another.
        let ticket = self.flush_requests.fetch_add(1, Ordering::SeqCst) + 1;
        let _one_at_a_time = self
            .flush_lock
            .lock()
            .map_err(|_| io::Error::other("flush lock poisoned"))?;
        if self.flushes_done.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        let covers = self.flush_requests.load(Ordering::SeqCst);
        self.file.sync_data()?;
        self.flushes_done.store(covers, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if let Some(v) = &self.volatile {
            v.discard(offset, len)?;
        }
        if !self.is_block_device {
            let r = rustix::fs::fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            );
            if r.is_ok() {
                return Ok(());
            }
        }
        // No hole punching (block device or a file system without it): write zeroes so a
        // discarded range still reads as zeroes, as LBPRZ promises.
        let zeroes = vec![0u8; (len.min(1 << 20)) as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            let chunk = zeroes.get(..n).unwrap_or(&[]);
            self.buffered
                .as_ref()
                .unwrap_or(&self.file)
                .write_all_at(chunk, pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        // The volatile-cache model (tests only) does not track holes: provisioning
        // reports it all mapped, so it must not claim to deallocate (the conformance
        // suite caught the mismatch).
        !self.is_block_device && self.volatile.is_none()
    }

    fn provisioning(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        let end =
            (offset + max_len).min(self.size_bytes.load(std::sync::atomic::Ordering::Acquire));
        if self.is_block_device || offset >= end || self.volatile.is_some() {
            return Ok(Extent {
                offset,
                len: end.saturating_sub(offset),
                status: Provisioning::Mapped,
            });
        }
        // SEEK_DATA from offset: if data starts later, [offset, data) is a hole.
        let data = match rustix::fs::seek(&self.file, SeekFrom::Data(offset as i64)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => {
                self.size_bytes.load(std::sync::atomic::Ordering::Acquire)
            }
            Err(e) => return Err(e.into()),
        };
        if data > offset {
            return Ok(Extent {
                offset,
                len: data.min(end) - offset,
                status: Provisioning::Deallocated,
            });
        }
        let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(offset as i64)) {
            Ok(h) => h,
            Err(rustix::io::Errno::NXIO) => {
                self.size_bytes.load(std::sync::atomic::Ordering::Acquire)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Extent {
            offset,
            len: hole.min(end) - offset,
            status: Provisioning::Mapped,
        })
    }

    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::WillNeed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bulwark-blockstore-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("lun.img")
    }

    /// The contract every `BlockDevice` keeps, for buffered, direct and volatile-cache
    /// files and for the null store.
    #[test]
    fn every_kind_of_store_passes_the_conformance_suite() {
        use block_device::conformance::{check, Keeps};
        for (name, direct, bulk_direct, volatile_cache) in [
            ("buffered", false, false, false),
            ("direct", true, false, false),
            ("bulk-direct", false, true, false),
            ("volatile", false, false, true),
        ] {
            let p = tmp(&format!("conformance-{name}"));
            let s = FileStore::open(
                &p,
                &OpenOptions {
                    create_size_bytes: Some(4 << 20),
                    direct,
                    bulk_direct,
                    volatile_cache,
                    ..Default::default()
                },
            )
            .unwrap();
            eprintln!("conformance: {name} file store");
            check(&s, Keeps::Data);
            drop(s);
            let _ = std::fs::remove_dir_all(p.parent().unwrap());
        }
        check(&crate::NullStore::new(4 << 20), Keeps::Nothing);
    }

    #[test]
    fn a_cached_read_is_served_only_from_the_page_cache() {
        let p = tmp("read-cached");
        let s = FileStore::open(
            &p,
            &OpenOptions {
                create_size_bytes: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let data = vec![0x5A; 8192];
        s.write_at(65536, &data, false).unwrap();
        let mut buf = vec![0; 8192];
        assert!(
            s.read_cached(65536, &mut buf),
            "just written: in the page cache"
        );
        assert_eq!(buf, data);
        // Written back and dropped from the page cache: a read would wait for the disk.
        s.flush().unwrap();
        rustix::fs::fadvise(&s.file, 0, 1 << 20, rustix::fs::Advice::DontNeed).unwrap();
        assert!(!s.read_cached(65536, &mut buf), "evicted: not served here");
        let mut again = vec![0; 8192];
        s.read_at(65536, &mut again).unwrap();
        assert_eq!(again, data);
        drop(s);
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn bulk_writes_go_around_the_page_cache_and_read_back_with_small_ones() {
        let p = tmp("bulk");
        let s = FileStore::open(
            &p,
            &OpenOptions {
                create_size_bytes: Some(4 << 20),
                bulk_direct: true,
                ..Default::default()
            },
        )
        .unwrap();
        // Unaligned data (a slice one byte into a buffer) of a bulk size, at an aligned
        // offset; a small buffered write inside it, then another bulk write over both.
        let big: Vec<u8> = (0..BULK_MIN_BYTES + 1).map(|i| (i % 251) as u8).collect();
        s.write_at(1 << 20, &big[1..], false).unwrap();
        s.write_at((1 << 20) + 4096, &[9u8; 512], false).unwrap();
        let mut back = vec![0u8; BULK_MIN_BYTES];
        s.read_at(1 << 20, &mut back).unwrap();
        assert_eq!(&back[..4096], &big[1..4097]);
        assert_eq!(&back[4096..4608], &[9u8; 512]);
        assert_eq!(&back[4608..], &big[4609..]);
        s.write_at(1 << 20, &big[..BULK_MIN_BYTES], true).unwrap();
        s.read_at(1 << 20, &mut back).unwrap();
        assert_eq!(back, big[..BULK_MIN_BYTES]);
        assert!(is_bulk(0, BULK_MIN_BYTES) && !is_bulk(512, BULK_MIN_BYTES));
        assert!(!is_bulk(0, BULK_MIN_BYTES - 4096));
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn write_read_discard_provisioning() {
        let p = tmp("basic");
        let s = FileStore::open(
            &p,
            &OpenOptions {
                create_size_bytes: Some(4 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.size_bytes(), 4 << 20);
        let e = s.provisioning(0, 4 << 20).unwrap();
        assert_eq!(e.status, Provisioning::Deallocated);
        let data = vec![0xabu8; 8192];
        s.write_at(1 << 20, &data, true).unwrap();
        let mut back = vec![0u8; 8192];
        s.read_at(1 << 20, &mut back).unwrap();
        assert_eq!(back, data);
        let e = s.provisioning(1 << 20, 1 << 20).unwrap();
        assert_eq!(e.status, Provisioning::Mapped);
        assert!(e.len >= 8192);
        s.discard(1 << 20, 1 << 20).unwrap();
        s.read_at(1 << 20, &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        assert_eq!(
            s.provisioning(1 << 20, 4096).unwrap().status,
            Provisioning::Deallocated
        );
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn refuses_bad_size() {
        let p = tmp("badsize");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        let e = FileStore::open(&p, &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("not a positive multiple"), "{e}");
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn direct_io_falls_back_for_unaligned_buffers() {
        let p = tmp("direct");
        let opts = OpenOptions {
            create_size_bytes: Some(1 << 20),
            direct: true,
            ..Default::default()
        };
        let s = match FileStore::open(&p, &opts) {
            Ok(s) => s,
            // tmpfs has no O_DIRECT; the store refuses clearly rather than pretending.
            Err(StoreError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                return
            }
            Err(e) => panic!("{e}"),
        };
        let data = vec![7u8; 512];
        s.write_at(512, &data, false).unwrap();
        let mut back = vec![0u8; 512];
        s.read_at(512, &mut back).unwrap();
        assert_eq!(back, data);
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}
