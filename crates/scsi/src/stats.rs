//! I/O counters of a logical unit, for metrics.
//!
//! Every command passes here twice (start and status), so the counters are plain
//! relaxed atomics: no lock, no allocation, and a scrape reads them without stopping
//! I/O. A scrape may see a command's count before its bytes; each value is exact on
//! its own.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::cdb::opcode;

/// Upper bounds of the latency histogram's buckets, in seconds: 50 µs (a cached read)
/// to 10 s (a write waiting out a failover).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// What a command does to the medium, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// READ (6/10/12/16).
    Read,
    /// WRITE (6/10/12/16), WRITE AND VERIFY, WRITE SAME, COMPARE AND WRITE.
    Write,
    /// Everything else (INQUIRY, TEST UNIT READY, SYNCHRONIZE CACHE, ...).
    Other,
}

impl IoKind {
    /// The kind of the command with operation code `op`.
    pub fn of(op: u8) -> IoKind {
        match op {
            opcode::READ_6 | opcode::READ_10 | opcode::READ_12 | opcode::READ_16 => IoKind::Read,
            opcode::WRITE_6
            | opcode::WRITE_10
            | opcode::WRITE_12
            | opcode::WRITE_16
            | opcode::WRITE_AND_VERIFY_10
            | opcode::WRITE_AND_VERIFY_12
            | opcode::WRITE_AND_VERIFY_16
            | opcode::WRITE_SAME_10
            | opcode::WRITE_SAME_16
            | opcode::COMPARE_AND_WRITE
            | opcode::ORWRITE_16
            | opcode::WRITE_ATOMIC_16 => IoKind::Write,
            _ => IoKind::Other,
        }
    }

    /// Its name as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Other => "other",
        }
    }

    const ALL: [IoKind; 3] = [IoKind::Read, IoKind::Write, IoKind::Other];
}

/// A latency histogram of fixed buckets ([`LATENCY_BUCKETS`]), non-cumulative; the last
/// slot counts what is above the largest bound.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A consistent-enough copy of a [`Latency`]: cumulative bucket counts as Prometheus
/// wants them.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencySnapshot {
    /// (upper bound in seconds, commands at or below it), ascending; the last bound is
    /// `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    /// Commands observed.
    pub count: u64,
    /// Sum of their latencies, seconds.
    pub sum_seconds: f64,
}

impl Latency {
    fn observe(&self, took: Duration) {
        let s = took.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        self.sum_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The histogram now.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Relaxed);
            buckets.push((
                LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                total,
            ));
        }
        LatencySnapshot {
            buckets,
            count: total,
            sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// Counters of one logical unit.
#[derive(Debug, Default)]
pub struct IoStats {
    /// READ commands completed.
    pub reads: AtomicU64,
    /// Write commands completed.
    pub writes: AtomicU64,
    /// Bytes returned by successful reads.
    pub read_bytes: AtomicU64,
    /// Bytes received by successful writes.
    pub written_bytes: AtomicU64,
    /// Commands that ended with MEDIUM ERROR or HARDWARE ERROR: the disk (or the
    /// replication under it) failed them.
    pub medium_errors: AtomicU64,
    /// Commands started and not yet answered.
    pub in_flight: AtomicI64,
    read_latency: Latency,
    write_latency: Latency,
    other_latency: Latency,
}

impl IoStats {
    /// A command starts.
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// A command of `kind` that received `data_out` bytes is answered with `response`,
    /// `took` after it arrived.
    pub(crate) fn finish(
        &self,
        kind: IoKind,
        data_out: usize,
        response: &crate::ScsiResponse,
        took: Duration,
    ) {
        self.in_flight.fetch_sub(1, Relaxed);
        let good = response.status == crate::ScsiStatus::Good;
        match kind {
            IoKind::Read => {
                self.reads.fetch_add(1, Relaxed);
                if good {
                    self.read_bytes
                        .fetch_add(response.data_in.len() as u64, Relaxed);
                }
            }
            IoKind::Write => {
                self.writes.fetch_add(1, Relaxed);
                if good {
                    self.written_bytes.fetch_add(data_out as u64, Relaxed);
                }
            }
            IoKind::Other => {}
        }
        if response
            .sense
            .as_deref()
            .is_some_and(is_medium_or_hardware_error)
        {
            self.medium_errors.fetch_add(1, Relaxed);
        }
        self.latency_of(kind).observe(took);
    }

    fn latency_of(&self, kind: IoKind) -> &Latency {
        match kind {
            IoKind::Read => &self.read_latency,
            IoKind::Write => &self.write_latency,
            IoKind::Other => &self.other_latency,
        }
    }

    /// Latency histograms by kind.
    pub fn latency(&self) -> impl Iterator<Item = (IoKind, LatencySnapshot)> + '_ {
        IoKind::ALL
            .into_iter()
            .map(|k| (k, self.latency_of(k).snapshot()))
    }
}

/// Sense data (fixed or descriptor format) with sense key MEDIUM ERROR or HARDWARE
/// ERROR (SPC-4 §4.5).
fn is_medium_or_hardware_error(sense: &[u8]) -> bool {
    let key = match sense.first().map(|b| b & 0x7f) {
        Some(0x70 | 0x71) => sense.get(2),
        Some(0x72 | 0x73) => sense.get(1),
        _ => None,
    };
    matches!(key.map(|k| k & 0x0f), Some(0x03 | 0x04))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn response(
        status: crate::ScsiStatus,
        data: usize,
        sense: Option<&[u8]>,
    ) -> crate::ScsiResponse {
        crate::ScsiResponse {
            status,
            sense: sense.map(Bytes::copy_from_slice),
            data_in: Bytes::from(vec![0; data]),
        }
    }

    #[test]
    fn counts_commands_bytes_errors_and_latency() {
        let s = IoStats::default();
        s.start();
        s.start();
        s.start();
        assert_eq!(s.in_flight.load(Relaxed), 3);
        s.finish(
            IoKind::Read,
            0,
            &response(crate::ScsiStatus::Good, 4096, None),
            Duration::from_micros(80),
        );
        s.finish(
            IoKind::Write,
            8192,
            &response(crate::ScsiStatus::Good, 0, None),
            Duration::from_millis(3),
        );
        // A failed write counts as a write, its bytes do not, its medium error does.
        let medium = [0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0];
        s.finish(
            IoKind::Write,
            512,
            &response(crate::ScsiStatus::CheckCondition, 0, Some(&medium)),
            Duration::from_secs(20),
        );
        assert_eq!(s.in_flight.load(Relaxed), 0);
        assert_eq!(s.reads.load(Relaxed), 1);
        assert_eq!(s.writes.load(Relaxed), 2);
        assert_eq!(s.read_bytes.load(Relaxed), 4096);
        assert_eq!(s.written_bytes.load(Relaxed), 8192);
        assert_eq!(s.medium_errors.load(Relaxed), 1);
        let lat: Vec<_> = s.latency().collect();
        let (_, read) = &lat[0];
        assert_eq!(read.count, 1);
        // 80 µs lands in the 100 µs bucket, not the 50 µs one.
        assert_eq!(read.buckets[0], (0.000_05, 0));
        assert_eq!(read.buckets[1], (0.000_1, 1));
        let (_, write) = &lat[1];
        assert_eq!(write.count, 2);
        assert_eq!(write.buckets.last(), Some(&(f64::INFINITY, 2)));
        // 3 ms: above 2.5 ms, within 5 ms; 20 s: only in +Inf.
        assert_eq!(write.buckets[5], (0.002_5, 0));
        assert_eq!(write.buckets[6], (0.005, 1));
        assert_eq!(write.buckets[15], (10.0, 1));
        assert!((write.sum_seconds - 20.003).abs() < 1e-6);
    }

    #[test]
    fn recognizes_medium_and_hardware_errors_in_both_sense_formats() {
        assert!(is_medium_or_hardware_error(&[0x72, 0x04, 0x44, 0]));
        assert!(is_medium_or_hardware_error(&[0x70, 0, 0x03]));
        assert!(!is_medium_or_hardware_error(&[0x70, 0, 0x05]));
        assert!(!is_medium_or_hardware_error(&[0x72, 0x02]));
        assert!(!is_medium_or_hardware_error(&[]));
    }
}
