//! Reading PDUs from and writing PDUs to a TCP connection.
//!
//! Reads are split so that a Data-Out's data segment can land straight in its final
//! buffer (the write buffer of a SCSI command, lent by the session) and writes are
//! gathered with vectored I/O, so a block is not copied in user space on its way between
//! socket and device. (Immediate data is read before the command is admitted; when the
//! write needs Data-Out as well, the session copies that first part into the write
//! buffer once. A write carried whole as immediate data is not copied.)
//!
//! Header and data digests (RFC 7143 §13.1) are checked and computed here, not in the
//! session: a failed data digest is reported to it as
//! [`iscsi_proto::session::FramingError::DataDigest`].

use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use iscsi_proto::digest::{crc32c, pad_len};
use iscsi_proto::pdu::{Bhs, BHS_LEN};
use iscsi_proto::session::Transmit;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::conn::Link;

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

/// The writer task: takes the PDUs the session queued (their sequence numbers are
/// stamped as they are taken) and writes them with as few system calls as the queue
/// allows, until the connection closes and everything queued is written. The buffer
/// budget of a command's data goes back once its response is on the socket.
pub(crate) async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    link: Arc<Link>,
    digests: Digests,
    write_timeout: std::time::Duration,
    kill: Arc<Notify>,
) -> std::io::Result<()> {
    const BATCH_PDUS_MAX: usize = 64;
    loop {
        let (batch, held) = link.take_batch(BATCH_PDUS_MAX);
        if batch.is_empty() {
            link.batch_written();
            if link.is_closing() {
                break;
            }
            link.transmit_ready().await;
            continue;
        }
        // An initiator that stops reading (zero window) must not hold the session, its
        // buffers and its tasks forever: past the timeout the connection is dropped.
        let written = tokio::time::timeout(write_timeout, write_batch(&mut w, &batch, digests))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "initiator stopped reading")
            })
            .and_then(|r| r);
        if let Err(e) = written {
            link.batch_written();
            kill.notify_one();
            return Err(e);
        }
        // The data is on the socket: its buffers may be reused.
        drop(held);
        link.batch_written();
    }
    w.flush().await
}

async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &[Transmit],
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
