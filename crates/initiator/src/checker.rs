//! The integrity checker: writes self-describing, versioned blocks, records every write
//! the target acknowledged, and verifies what it reads back against that record.
//!
//! A block holds `"BWCK"`, its own LBA, its version and a CRC32C of the header, then a
//! pattern derived from them, so a block from the wrong place, a torn block or a stale
//! version is told apart from a good one. Versions of one LBA only grow; an
//! acknowledged version `v` means every later read of that LBA must show `v` or a newer
//! version that was sent (acknowledged or not: an unacknowledged write may have landed).
//!
//! Power cuts: a write acknowledged under a volatile write cache survives a power cut
//! only once a SYNCHRONIZE CACHE issued after its acknowledgement has completed
//! ([`Checker::flush_mark`], [`Checker::flushed`]); after [`Checker::power_cut`] only
//! those are required.

use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"BWCK";

/// What the checker knows about the writes it issued.
#[derive(Clone, Debug, Default)]
pub struct Checker {
    block_size: usize,
    /// LBA → highest version sent.
    sent: BTreeMap<u64, u64>,
    /// LBA → highest version acknowledged.
    acked: BTreeMap<u64, u64>,
    /// LBA → highest version acknowledged before a completed flush was issued.
    flushed: BTreeMap<u64, u64>,
    acks: u64,
}

/// What a flush covers: the acknowledgements before it was issued.
#[derive(Clone, Debug)]
pub struct FlushMark(BTreeMap<u64, u64>);

/// A block's decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    /// The LBA it was written to.
    pub lba: u64,
    /// Its version.
    pub version: u64,
}

impl Checker {
    /// A checker for blocks of `block_size` bytes (at least 32).
    pub fn new(block_size: usize) -> Checker {
        assert!(block_size >= 32);
        Checker {
            block_size,
            ..Default::default()
        }
    }

    /// The next write to `lba`: its version and the block's bytes.
    pub fn next_write(&mut self, lba: u64) -> (u64, Vec<u8>) {
        let v = self.sent.entry(lba).or_insert(0);
        *v += 1;
        let version = *v;
        (version, encode(lba, version, self.block_size))
    }

    /// The target acknowledged version `version` of `lba`.
    pub fn acked(&mut self, lba: u64, version: u64) {
        let a = self.acked.entry(lba).or_insert(0);
        *a = (*a).max(version);
        self.acks += 1;
    }

    /// Taken just before issuing SYNCHRONIZE CACHE.
    pub fn flush_mark(&self) -> FlushMark {
        FlushMark(self.acked.clone())
    }

    /// The flush issued after `mark` completed: what it covers survives power cuts.
    pub fn flushed(&mut self, mark: FlushMark) {
        for (lba, v) in mark.0 {
            let f = self.flushed.entry(lba).or_insert(0);
            *f = (*f).max(v);
        }
    }

    /// Power was cut where acknowledged, unflushed writes may have lived: from now on
    /// only what a completed flush covers (and what is acknowledged later) is owed.
    pub fn power_cut(&mut self) {
        for (lba, a) in self.acked.iter_mut() {
            *a = (*a).min(self.flushed.get(lba).copied().unwrap_or(0));
        }
    }

    /// Versions a completed flush covers, summed over LBAs (a figure for reports).
    pub fn flushed_writes(&self) -> u64 {
        self.flushed.values().sum()
    }

    /// Acknowledged writes so far.
    pub fn acks(&self) -> u64 {
        self.acks
    }

    /// The highest version of `lba` acknowledged so far (0: none).
    pub fn acked_version(&self, lba: u64) -> u64 {
        self.acked.get(&lba).copied().unwrap_or(0)
    }

    /// LBAs written so far.
    pub fn lbas(&self) -> impl Iterator<Item = u64> + '_ {
        self.sent.keys().copied()
    }

    /// Checks a block read from `lba`.
    pub fn verify(&self, lba: u64, block: &[u8]) -> Result<(), String> {
        self.verify_at_least(lba, block, self.acked_version(lba))
    }

    /// Checks a block read from `lba` against a floor of its own: a copy of the
    /// volume from before some of the acknowledged writes (a snapshot) must hold at
    /// least version `acked` and nothing that was never written.
    pub fn verify_at_least(&self, lba: u64, block: &[u8], acked: u64) -> Result<(), String> {
        let sent = self.sent.get(&lba).copied().unwrap_or(0);
        if block.iter().all(|b| *b == 0) {
            return if acked == 0 {
                Ok(())
            } else {
                Err(format!(
                    "LBA {lba}: version {acked} was acknowledged, the block reads as zeroes"
                ))
            };
        }
        let h = decode(block)
            .ok_or_else(|| format!("LBA {lba}: not a checker block (torn or foreign data)"))?;
        if h.lba != lba {
            return Err(format!(
                "LBA {lba}: holds the block written to LBA {}",
                h.lba
            ));
        }
        if h.version < acked {
            return Err(format!(
                "LBA {lba}: version {acked} was acknowledged, the block holds version {} (an acknowledged write was lost)",
                h.version
            ));
        }
        if h.version > sent {
            return Err(format!(
                "LBA {lba}: holds version {} that was never written",
                h.version
            ));
        }
        Ok(())
    }
}

/// Encodes block `lba` at `version`.
pub fn encode(lba: u64, version: u64, block_size: usize) -> Vec<u8> {
    let mut b = vec![0u8; block_size];
    b[..4].copy_from_slice(MAGIC);
    b[4..12].copy_from_slice(&lba.to_le_bytes());
    b[12..20].copy_from_slice(&version.to_le_bytes());
    let seed = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version;
    for (i, x) in b[24..].iter_mut().enumerate() {
        *x = (seed.rotate_left((i % 64) as u32) as u8) ^ (i as u8);
    }
    let crc = crc32c::crc32c(&[&b[..20], &b[24..]].concat());
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a block; `None` if it is not a whole, intact checker block.
pub fn decode(b: &[u8]) -> Option<BlockHeader> {
    if b.len() < 32 || &b[..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[20..24].try_into().ok()?);
    if crc32c::crc32c(&[&b[..20], &b[24..]].concat()) != crc {
        return None;
    }
    Some(BlockHeader {
        lba: u64::from_le_bytes(b[4..12].try_into().ok()?),
        version: u64::from_le_bytes(b[12..20].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_lost_stale_torn_and_misplaced_blocks_apart() {
        let mut c = Checker::new(512);
        let (v1, b1) = c.next_write(7);
        c.acked(7, v1);
        let (v2, b2) = c.next_write(7);
        assert_eq!((v1, v2), (1, 2));
        c.verify(7, &b1).unwrap(); // v2 not acknowledged: v1 is still fine
        c.verify(7, &b2).unwrap(); // an unacknowledged write may have landed
        c.acked(7, v2);
        assert!(c
            .verify(7, &b1)
            .unwrap_err()
            .contains("acknowledged write was lost"));
        assert!(c.verify(7, &vec![0; 512]).unwrap_err().contains("zeroes"));
        let mut torn = b2.clone();
        torn[300] ^= 1;
        assert!(c.verify(7, &torn).unwrap_err().contains("torn"));
        assert!(c.verify(8, &b2).unwrap_err().contains("written to LBA 7"));
        c.verify(9, &vec![0; 512]).unwrap();
        let (_, future) = (3, encode(7, 3, 512));
        assert!(c.verify(7, &future).unwrap_err().contains("never written"));
    }
}
