//! Copies that share blocks (`FileStore::reflink_to`), on the file systems they need:
//! an XFS image on a loop device (made here; needs root and xfsprogs, which
//! scripts/test-all installs) and a tmpfs that cannot share blocks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use block_device::BlockDevice;
use blockstore::{FileStore, OpenOptions, StoreError};

/// A file system mounted on a temporary folder for the test; unmounted when dropped
/// (before the folder holding its image goes).
struct Mounted {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

fn run(program: &str, package: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (Debian package {package}; tests run as root): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Mounted {
    /// A fresh XFS with reflink, on a sparse image.
    fn xfs() -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(
            "mkfs.xfs",
            "xfsprogs",
            &["-q", "-m", "reflink=1", img.to_str().unwrap()],
        );
        run(
            "mount",
            "mount",
            &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        Mounted { mnt, _dir: dir }
    }

    fn tmpfs() -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(
            "mount",
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=64m",
                "tmpfs",
                mnt.to_str().unwrap(),
            ],
        );
        Mounted { mnt, _dir: dir }
    }

    fn free_bytes(&self) -> u64 {
        let s = rustix::fs::statvfs(&self.mnt).unwrap();
        s.f_bavail * s.f_frsize
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn store(path: &Path, size: u64) -> FileStore {
    FileStore::open(
        path,
        &OpenOptions {
            create_size_bytes: Some(size),
            ..Default::default()
        },
    )
    .unwrap()
}

fn read(s: &FileStore, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    s.read_at(offset, &mut b).unwrap();
    b
}

/// On XFS the copy holds every write made before it (flushed or not), none made
/// after, takes no space of its own and comes in milliseconds.
#[test]
fn a_reflinked_copy_shares_blocks_and_then_goes_its_own_way() {
    let fs = Mounted::xfs();
    assert!(
        FileStore::shares_blocks(&fs.mnt).unwrap(),
        "XFS with reflink=1"
    );
    assert!(fs.names().is_empty(), "the probe leaves nothing behind");
    let size = 64u64 << 20;
    let src = store(&fs.mnt.join("v.img"), size);
    let mut data: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
    src.write_at(0, &data, false).unwrap();
    src.flush().unwrap();
    // Written, not flushed: still in the copy.
    src.write_at(1 << 20, &[0x5A; 4096], false).unwrap();
    data[1 << 20..(1 << 20) + 4096].fill(0x5A);
    let free = fs.free_bytes();
    let dest = fs.mnt.join("v@snap.img");
    let started = Instant::now();
    src.reflink_to(&dest).unwrap();
    eprintln!(
        "reflink of a fully written {} MiB file: {} ms",
        size >> 20,
        started.elapsed().as_millis()
    );
    let used = free.saturating_sub(fs.free_bytes());
    assert!(used < 4 << 20, "the copy took {used} bytes of its own");
    // After the copy each side's writes stay its own.
    src.write_at(0, &[0xAB; 4096], false).unwrap();
    let copy = FileStore::open(&dest, &OpenOptions::default()).unwrap();
    assert_eq!(read(&copy, 0, size as usize), data);
    copy.write_at(8192, &[0xCD; 4096], false).unwrap();
    assert_eq!(read(&src, 8192, 4096), data[8192..12288].to_vec());
    assert_eq!(read(&src, 0, 4096), vec![0xAB; 4096]);
    assert_eq!(
        fs.names(),
        vec!["v.img", "v@snap.img"],
        "no temporary file left"
    );
    assert!(src.reflink_to(&dest).is_err(), "an existing copy is kept");
    assert_eq!(read(&copy, 8192, 4096), vec![0xCD; 4096]);
    // Rolled back to the copy: the store holds the copy's bytes again, sharing them.
    let free = fs.free_bytes();
    src.reflink_from(&dest).unwrap();
    assert_eq!(read(&src, 0, size as usize), read(&copy, 0, size as usize));
    assert!(
        fs.free_bytes() + (4 << 20) >= free,
        "the rollback copied blocks"
    );
}

/// On a file system that cannot share blocks the answer says what is needed, and
/// nothing is left behind.
#[test]
fn a_file_system_without_reflink_is_refused_with_the_reason() {
    let fs = Mounted::tmpfs();
    assert!(!FileStore::shares_blocks(&fs.mnt).unwrap(), "tmpfs cannot");
    assert!(fs.names().is_empty(), "the probe leaves nothing behind");
    let src = store(&fs.mnt.join("v.img"), 4 << 20);
    src.write_at(0, &[1u8; 4096], false).unwrap();
    match src.reflink_to(&fs.mnt.join("v@snap.img")) {
        Err(e @ StoreError::NoReflink { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("XFS") && msg.contains("reflink"), "{msg}");
        }
        other => panic!("expected NoReflink on tmpfs, got {other:?}"),
    }
    assert_eq!(fs.names(), vec!["v.img"], "nothing left behind");
}
