//! Reading PDUs from and writing PDUs to a TCP connection.
//!
//! Reads are split so that a data segment can land straight in its final buffer (the
//! write buffer of a SCSI command) and writes are gathered with vectored I/O, so a block
//! is never copied in user space on its way between socket and device.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use iscsi_proto::digest::{crc32c, pad_len};
use iscsi_proto::pdu::{Bhs, BHS_LEN};
use iscsi_proto::SerialNumber;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::budget::BufferPermit;

/// Why reading a PDU failed; each ends the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data segment of {0} bytes exceeds MaxRecvDataSegmentLength {1}")]
    TooLong(usize, usize),
}

/// Digest settings of a connection.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Reads one basic header segment (and skips AHS), checking the header digest.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    digests: Digests,
) -> Result<Bhs, ReadError> {
    let mut b = [0u8; BHS_LEN];
    match r.read_exact(&mut b).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
        Err(e) => return Err(e.into()),
    }
    let bhs = Bhs(b);
    let ahs_len = bhs.ahs_len();
    let mut ahs = vec![0u8; ahs_len];
    if ahs_len > 0 {
        r.read_exact(&mut ahs).await?;
    }
    if digests.header {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).await?;
        if crc32c(&[&bhs.0, &ahs]).to_le_bytes() != d {
            return Err(ReadError::HeaderDigest);
        }
    }
    Ok(bhs)
}

/// Reads a data segment of `len` bytes into `dst` (exactly `len` long), then its padding
/// and digest. Returns whether the data digest matched (always true without digests).
pub(crate) async fn read_data_into<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [u8],
    digests: Digests,
) -> Result<bool, ReadError> {
    r.read_exact(dst).await?;
    let pad = pad_len(dst.len());
    let mut padding = [0u8; 3];
    let padding = padding.get_mut(..pad).unwrap_or(&mut []);
    if pad > 0 {
        r.read_exact(padding).await?;
    }
    if digests.data && !dst.is_empty() {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).await?;
        return Ok(crc32c(&[dst, padding]).to_le_bytes() == d);
    }
    Ok(true)
}

/// Reads a data segment into a fresh buffer.
pub(crate) async fn read_data<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    max: usize,
    digests: Digests,
) -> Result<(Bytes, bool), ReadError> {
    if len > max {
        return Err(ReadError::TooLong(len, max));
    }
    let mut buf = BytesMut::zeroed(len);
    let ok = read_data_into(r, &mut buf, digests).await?;
    Ok((buf.freeze(), ok))
}

/// How a PDU's StatSN field is filled in when it is sent (RFC 7143 §4.2.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatSn {
    /// Carries StatSN and advances it (responses).
    Advance,
    /// Carries the next StatSN without advancing (R2T, unsolicited NOP-In, Data-In
    /// without status).
    Peek,
}

/// One PDU queued for sending.
#[derive(Debug)]
pub(crate) struct OutPdu {
    pub bhs: Bhs,
    pub data: Bytes,
    pub stat: StatSn,
}

impl OutPdu {
    pub fn new(bhs: Bhs, data: Bytes, stat: StatSn) -> OutPdu {
        let mut bhs = bhs;
        bhs.set_data_len(data.len());
        OutPdu { bhs, data, stat }
    }
}

/// Messages to the writer task.
#[derive(Debug)]
pub(crate) enum Out {
    /// PDUs sent back to back.
    Pdus(Vec<OutPdu>),
    /// A command's Data-In and status, with the share of the buffer budget its data
    /// holds: given back once the PDUs are on the socket (or dropped with the queue).
    Response(Vec<OutPdu>, BufferPermit),
    /// Flush and signal when everything before this was written.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The command window and StatSN shared by the reader, the completions and the writer.
#[derive(Debug)]
pub(crate) struct Window {
    pub exp_cmd_sn: AtomicU32,
    /// Highest MaxCmdSN announced so far; commands up to it must be accepted.
    pub max_cmd_sn: AtomicU32,
    /// Non-immediate commands received and not yet answered.
    pub in_flight: AtomicU32,
    /// Immediate SCSI commands received and not yet answered (outside the window).
    pub immediate_in_flight: AtomicU32,
    pub queue_depth: u32,
}

impl Window {
    pub fn new(exp_cmd_sn: u32, queue_depth: u32) -> Window {
        Window {
            exp_cmd_sn: AtomicU32::new(exp_cmd_sn),
            max_cmd_sn: AtomicU32::new(exp_cmd_sn.wrapping_add(queue_depth.max(1) - 1)),
            in_flight: AtomicU32::new(0),
            immediate_in_flight: AtomicU32::new(0),
            queue_depth: queue_depth.max(1),
        }
    }

    /// A SCSI command was received: it counts until it is answered or dropped.
    pub fn task_started(&self, immediate: bool) {
        self.counter(immediate).fetch_add(1, Ordering::AcqRel);
    }

    /// A SCSI command counted by [`Window::task_started`] was answered or dropped.
    pub fn task_ended(&self, immediate: bool) {
        self.counter(immediate).fetch_sub(1, Ordering::AcqRel);
    }

    /// Immediate SCSI commands outstanding now.
    pub fn immediate_in_flight(&self) -> u32 {
        self.immediate_in_flight.load(Ordering::Acquire)
    }

    fn counter(&self, immediate: bool) -> &AtomicU32 {
        if immediate {
            &self.immediate_in_flight
        } else {
            &self.in_flight
        }
    }

    /// ExpCmdSN and the MaxCmdSN to announce now; MaxCmdSN never moves backwards.
    pub fn announce(&self) -> (u32, u32) {
        let exp = self.exp_cmd_sn.load(Ordering::Acquire);
        let busy = self.in_flight.load(Ordering::Acquire).min(self.queue_depth);
        let want = exp.wrapping_add(self.queue_depth - busy).wrapping_sub(1);
        let prev = self.max_cmd_sn.load(Ordering::Acquire);
        let max = if SerialNumber(want).gt(SerialNumber(prev)) {
            want
        } else {
            prev
        };
        self.max_cmd_sn.store(max, Ordering::Release);
        (exp, max)
    }
}

/// The writer task: takes queued PDUs, fills in sequence numbers and digests, and writes
/// them with as few system calls as the queue allows.
pub(crate) async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Out>,
    window: Arc<Window>,
    mut stat_sn: u32,
    digests: Digests,
    write_timeout: std::time::Duration,
) -> std::io::Result<()> {
    const BATCH_PDUS_MAX: usize = 64;
    let mut batch: Vec<OutPdu> = Vec::with_capacity(BATCH_PDUS_MAX);
    let mut barriers = Vec::new();
    let mut held: Vec<BufferPermit> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Out::Pdus(p) => batch.extend(p),
                Out::Response(p, permit) => {
                    batch.extend(p);
                    held.push(permit);
                }
                Out::Barrier(tx) => barriers.push(tx),
            }
            if batch.len() < BATCH_PDUS_MAX {
                next = rx.try_recv().ok();
            }
        }
        let (exp, max) = window.announce();
        for p in batch.iter_mut() {
            p.bhs.0[24..28].copy_from_slice(&stat_sn.to_be_bytes());
            if p.stat == StatSn::Advance {
                stat_sn = stat_sn.wrapping_add(1);
            }
            p.bhs.0[28..32].copy_from_slice(&exp.to_be_bytes());
            p.bhs.0[32..36].copy_from_slice(&max.to_be_bytes());
        }
        // An initiator that stops reading (zero window) must not hold the session, its
        // buffers and its tasks forever: past the timeout the connection is dropped.
        tokio::time::timeout(write_timeout, write_batch(&mut w, &batch, digests))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "initiator stopped reading")
            })??;
        batch.clear();
        // The data is on the socket: its buffers may be reused.
        held.clear();
        for b in barriers.drain(..) {
            let _ = b.send(());
        }
    }
    w.flush().await
}

async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &[OutPdu],
    digests: Digests,
) -> std::io::Result<()> {
    const PAD: [u8; 4] = [0; 4];
    // Digests are computed up front so the slices below can borrow them.
    let mut digest_bytes: Vec<([u8; 4], [u8; 4])> = Vec::with_capacity(batch.len());
    for p in batch {
        let hd = if digests.header {
            crc32c(&[&p.bhs.0]).to_le_bytes()
        } else {
            [0; 4]
        };
        let pad = PAD.get(..pad_len(p.data.len())).unwrap_or(&[]);
        let dd = if digests.data && !p.data.is_empty() {
            crc32c(&[&p.data, pad]).to_le_bytes()
        } else {
            [0; 4]
        };
        digest_bytes.push((hd, dd));
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 5);
    for (p, (hd, dd)) in batch.iter().zip(digest_bytes.iter()) {
        slices.push(IoSlice::new(&p.bhs.0));
        if digests.header {
            slices.push(IoSlice::new(hd));
        }
        if !p.data.is_empty() {
            slices.push(IoSlice::new(&p.data));
            let pad = PAD.get(..pad_len(p.data.len())).unwrap_or(&[]);
            if !pad.is_empty() {
                slices.push(IoSlice::new(pad));
            }
            if digests.data {
                slices.push(IoSlice::new(dd));
            }
        }
    }
    write_all_vectored(w, &mut slices).await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    // IOV_MAX is 1024 on Linux; write in chunks below it.
    while !slices.is_empty() {
        let upto = slices.len().min(1000);
        let n = w.write_vectored(slices.get(..upto).unwrap_or(&[])).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}
