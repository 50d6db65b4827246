//! Small durable records (a replica's epoch, activity log and map of what the others
//! lack), replaced in place.
//!
//! A record file holds two slots of equal size. Each save writes the slot that does not
//! hold the newest valid record and `fdatasync`s it; a read takes the valid slot with
//! the higher sequence number. A save torn by a power cut leaves a slot whose checksum
//! fails, and the other slot still holds the record before it, so a reader sees the old
//! record or the new one, never a mix.
//!
//! Why not a temporary file renamed over the old one: every rename allocates an inode
//! and commits the file system's journal. When a node became primary of 256 volumes at
//! once, those saves kept both cores busy in ext4's inode allocator and each waited on
//! the journal, and the failover of the last volume took half a second longer than the
//! first (issue 19). An overwrite that keeps the file's size needs neither.
//!
//! A file is created (and regrown, when a record outgrows its slot) by writing a
//! temporary file, `fsync`, rename and `fsync` of the folder: rare, and atomic.
//!
//! Slot layout, little-endian: magic (8 bytes), sequence (8), payload length (4),
//! CRC-32C of sequence, length and payload (4), payload.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

const MAGIC: [u8; 8] = *b"BWRECRD1";
const HEADER: usize = 24;
/// The smallest slot: one page.
const MIN_SLOT: usize = 4096;

/// What a record file holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    /// No file.
    Missing,
    /// The newest record's payload.
    Record(Vec<u8>),
    /// A file written before records existed (its whole contents), for the caller to
    /// parse in the format it had.
    Legacy(Vec<u8>),
}

/// One slot as read: its sequence and payload, if its checksum holds.
fn parse_slot(slot: &[u8]) -> Option<(u64, &[u8])> {
    let header = slot.get(..HEADER)?;
    if header[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(header[16..20].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[20..24].try_into().ok()?);
    let payload = slot.get(HEADER..HEADER.checked_add(len)?)?;
    (checksum(seq, payload) == crc).then_some((seq, payload))
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&seq.to_le_bytes());
    head[8..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

fn encode(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + payload.len());
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&checksum(seq, payload).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// A file in the record format: its slot size, and the slot holding the newest valid
/// record with that record's sequence (`None`: no valid slot, the file is damaged).
struct Layout {
    slot: usize,
    newest: Option<(usize, u64)>,
}

/// Reads the layout of `bytes` (a whole file), or `None` if it is not a record file.
fn layout(bytes: &[u8]) -> Option<Layout> {
    let slot = bytes.len() / 2;
    if slot < MIN_SLOT || bytes.len() != 2 * slot {
        return None;
    }
    let slots = [&bytes[..slot], &bytes[slot..]];
    // Either slot's magic marks the format: a save torn in one slot leaves the other.
    if slots.iter().all(|s| s[..8] != MAGIC) {
        return None;
    }
    let newest = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| parse_slot(s).map(|(seq, _)| (i, seq)))
        .max_by_key(|(_, seq)| *seq);
    Some(Layout { slot, newest })
}

/// Reads the record at `path`.
pub(crate) fn read(path: &Path) -> io::Result<Stored> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Stored::Missing),
        Err(e) => return Err(e),
    };
    let Some(l) = layout(&bytes) else {
        return Ok(Stored::Legacy(bytes));
    };
    let Some((i, _)) = l.newest else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is damaged: neither copy checks", path.display()),
        ));
    };
    let (_, payload) = parse_slot(&bytes[i * l.slot..(i + 1) * l.slot])
        .ok_or_else(|| io::Error::other("a record slot changed while read"))?;
    Ok(Stored::Record(payload.to_vec()))
}

/// Saves of one file must not interleave (both would pick the same slot); saves of
/// different files run in parallel unless they share a stripe.
static STRIPES: [Mutex<()>; 64] = [const { Mutex::new(()) }; 64];

fn stripe(path: &Path) -> &'static Mutex<()> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    &STRIPES[(h.finish() % STRIPES.len() as u64) as usize]
}

/// Replaces the record at `path` with `payload`, durably.
pub(crate) fn write(path: &Path, payload: &[u8]) -> io::Result<()> {
    let _serial = stripe(path).lock().unwrap_or_else(|e| e.into_inner());
    let existing = match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let l = existing.as_deref().and_then(layout);
    let seq = l
        .as_ref()
        .and_then(|l| l.newest)
        .map_or(1, |(_, seq)| seq + 1);
    let record = encode(seq, payload);
    match l {
        Some(Layout {
            slot,
            newest: Some((i, _)),
        }) if record.len() <= slot => {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.write_all_at(&record, ((1 - i) * slot) as u64)?;
            f.sync_data()
        }
        _ => create(path, &record),
    }
}

/// Writes a new file with `record` in its first slot, atomically.
fn create(path: &Path, record: &[u8]) -> io::Result<()> {
    use std::io::Write;
    static NEXT_TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let slot = record.len().next_power_of_two().max(MIN_SLOT);
    let mut bytes = vec![0u8; 2 * slot];
    bytes[..record.len()].copy_from_slice(record);
    let n = NEXT_TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{n}"));
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(&bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_record_is_replaced_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.al");
        assert_eq!(read(&path).unwrap(), Stored::Missing);
        write(&path, b"first").unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        for i in 0..5u8 {
            write(&path, &[i; 100]).unwrap();
            assert_eq!(read(&path).unwrap(), Stored::Record(vec![i; 100]));
        }
        // No rename, so no new inode and no journal commit: the point of this module.
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        // A record larger than a slot regrows the file, atomically.
        write(&path, &[7; 10_000]).unwrap();
        assert_eq!(read(&path).unwrap(), Stored::Record(vec![7; 10_000]));
        write(&path, b"").unwrap();
        assert_eq!(read(&path).unwrap(), Stored::Record(Vec::new()));
    }

    #[test]
    fn a_file_from_before_records_reads_as_legacy_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.epoch");
        std::fs::write(&path, 5u64.to_le_bytes()).unwrap();
        assert_eq!(
            read(&path).unwrap(),
            Stored::Legacy(5u64.to_le_bytes().to_vec())
        );
        write(&path, &6u64.to_le_bytes()).unwrap();
        assert_eq!(
            read(&path).unwrap(),
            Stored::Record(6u64.to_le_bytes().to_vec())
        );
    }

    #[test]
    fn both_slots_damaged_is_an_error_not_a_legacy_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        write(&path, b"one").unwrap();
        write(&path, b"two").unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let slot = bytes.len() / 2;
        bytes[HEADER] ^= 1;
        bytes[slot + HEADER] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = read(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    proptest! {
        /// A save cut short at any byte (a power cut) leaves the record before it or,
        /// if the cut came after the last byte, the new one; later saves go on from
        /// whichever survived.
        #[test]
        fn a_torn_save_leaves_the_old_record_or_the_new(
            saves in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..300), any::<u16>()), 1..12),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v.al");
            write(&path, b"start").unwrap();
            let mut current = b"start".to_vec();
            for (payload, cut) in saves {
                let before = std::fs::read(&path).unwrap();
                write(&path, &payload).unwrap();
                let after = std::fs::read(&path).unwrap();
                prop_assert_eq!(before.len(), after.len(), "an in-place save keeps the size");
                // The bytes of the save that reached the disk: a prefix of what changed.
                let changed: Vec<usize> = (0..after.len()).filter(|&i| before[i] != after[i]).collect();
                let kept = usize::from(cut) % (changed.len() + 1);
                let mut torn = before.clone();
                for &i in &changed[..kept] {
                    torn[i] = after[i];
                }
                std::fs::write(&path, &torn).unwrap();
                let got = read(&path).unwrap();
                if kept == changed.len() {
                    prop_assert_eq!(&got, &Stored::Record(payload.clone()));
                    current = payload;
                } else {
                    prop_assert!(got == Stored::Record(current.clone()) || got == Stored::Record(payload.clone()),
                        "a torn save read as neither the old nor the new record");
                    if got == Stored::Record(payload.clone()) {
                        current = payload;
                    }
                }
            }
        }
    }
}
