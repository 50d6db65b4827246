//! The wire format of a replication link: length-prefixed frames carrying a volume's
//! protocol message (the data of a write sent after its header, uncopied) or a
//! forwarded SCSI command or answer, and the reading of one frame off the stream.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncReadExt;

use crate::bitmap::RegionSet;
use crate::message::{Epoch, Message, NodeId, Payload, Seq};

const MAX_FRAME: usize = 64 << 20;

/// Encodes `msg` for `volume` as one frame (header; the data of a write follows).
pub fn encode(volume: &str, msg: &Message) -> (BytesMut, Option<Bytes>) {
    let mut h = BytesMut::with_capacity(64 + volume.len());
    h.put_u32(0); // length, patched below
    h.put_u16(volume.len() as u16);
    h.put_slice(volume.as_bytes());
    let mut data = None;
    match msg {
        Message::Seal { epoch, next_seq } => {
            h.put_u8(1);
            h.put_u64(epoch.0);
            h.put_u64(next_seq.0);
        }
        Message::SealAck { epoch, divergent } => {
            h.put_u8(2);
            h.put_u64(epoch.0);
            h.put_u32(divergent.len() as u32);
            for r in divergent.iter() {
                h.put_u64(r);
            }
        }
        Message::Write {
            epoch,
            seq,
            offset,
            payload,
            committed,
        } => {
            // A deallocation has a kind of its own, so that a node of the version
            // before it refuses the frame (the link drops and the replica is resynced)
            // instead of taking it for something else.
            h.put_u8(match payload {
                Payload::Deallocate(_) => WRITE_DEALLOCATE,
                Payload::Snapshot(_) => WRITE_SNAPSHOT,
                Payload::Rollback { .. } => WRITE_ROLLBACK,
                Payload::Data(_) | Payload::Flush => 3,
            });
            h.put_u64(epoch.0);
            h.put_u64(seq.0);
            h.put_u64(*offset);
            h.put_u64(committed.0);
            match payload {
                Payload::Data(d) => {
                    h.put_u8(0);
                    h.put_u32(d.len() as u32);
                    data = Some(d.clone());
                }
                Payload::Flush => {
                    h.put_u8(1);
                    h.put_u32(0);
                }
                Payload::Deallocate(len) => h.put_u64(*len),
                Payload::Snapshot(name) => {
                    h.put_u16(name.len() as u16);
                    h.put_slice(name.as_bytes());
                }
                Payload::Rollback { snapshot, len } => {
                    h.put_u64(*len);
                    h.put_u16(snapshot.len() as u16);
                    h.put_slice(snapshot.as_bytes());
                }
            }
        }
        Message::Ack { epoch, seq } => {
            h.put_u8(4);
            h.put_u64(epoch.0);
            h.put_u64(seq.0);
        }
        Message::Fenced { epoch } => {
            h.put_u8(5);
            h.put_u64(epoch.0);
        }
        Message::VerifyRequest { epoch, region } => {
            h.put_u8(6);
            h.put_u64(epoch.0);
            h.put_u64(*region);
        }
        Message::VerifyResult { epoch, region, crc } => {
            h.put_u8(7);
            h.put_u64(epoch.0);
            h.put_u64(*region);
            h.put_u32(*crc);
        }
        Message::Leaving { epoch } => {
            h.put_u8(9);
            h.put_u64(epoch.0);
        }
        Message::DirtyMap {
            epoch,
            full,
            generation,
            peers,
        } => {
            h.put_u8(8);
            h.put_u64(epoch.0);
            h.put_u8(u8::from(*full));
            h.put_u64(*generation);
            h.put_u32(peers.len() as u32);
            for (node, regions) in peers {
                h.put_u64(node.0);
                h.put_u32(regions.len() as u32);
                for r in regions.iter() {
                    h.put_u64(r);
                }
            }
        }
    }
    let len = h.len() - 4 + data.as_ref().map_or(0, |d| d.len());
    h[..4].copy_from_slice(&(len as u32).to_be_bytes());
    (h, data)
}

pub(super) fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad replication frame: {what}"),
    )
}

/// Decodes a frame body (without the length): the volume name and the message.
pub fn decode(mut b: Bytes) -> io::Result<(String, Message)> {
    let need = |b: &Bytes, n: usize| {
        if b.remaining() < n {
            Err(bad("short"))
        } else {
            Ok(())
        }
    };
    need(&b, 2)?;
    let nlen = b.get_u16() as usize;
    need(&b, nlen + 1)?;
    let name = String::from_utf8(b.split_to(nlen).to_vec()).map_err(|_| bad("volume name"))?;
    let kind = b.get_u8();
    let msg = match kind {
        1 => {
            need(&b, 16)?;
            Message::Seal {
                epoch: Epoch(b.get_u64()),
                next_seq: Seq(b.get_u64()),
            }
        }
        2 => {
            need(&b, 12)?;
            let epoch = b.get_u64();
            let n = b.get_u32() as usize;
            need(&b, n.checked_mul(8).ok_or_else(|| bad("count"))?)?;
            let mut divergent = RegionSet::new();
            for _ in 0..n {
                divergent.insert(b.get_u64());
            }
            Message::SealAck {
                epoch: Epoch(epoch),
                divergent,
            }
        }
        3 => {
            need(&b, 37)?;
            let epoch = b.get_u64();
            let seq = b.get_u64();
            let offset = b.get_u64();
            let committed = b.get_u64();
            let flush = b.get_u8() != 0;
            let n = b.get_u32() as usize;
            need(&b, n)?;
            let payload = match (flush, n) {
                (false, _) => Payload::Data(b.split_to(n)),
                (true, 0) => Payload::Flush,
                (true, _) => return Err(bad("a flush barrier with data")),
            };
            Message::Write {
                epoch: Epoch(epoch),
                seq: Seq(seq),
                offset,
                committed: Seq(committed),
                payload,
            }
        }
        WRITE_ROLLBACK => {
            need(&b, 42)?;
            let (epoch, seq, offset, committed, len) = (
                b.get_u64(),
                b.get_u64(),
                b.get_u64(),
                b.get_u64(),
                b.get_u64(),
            );
            let n = b.get_u16() as usize;
            need(&b, n)?;
            let snapshot =
                String::from_utf8(b.split_to(n).to_vec()).map_err(|_| bad("snapshot name"))?;
            Message::Write {
                epoch: Epoch(epoch),
                seq: Seq(seq),
                offset,
                committed: Seq(committed),
                payload: Payload::Rollback { snapshot, len },
            }
        }
        WRITE_SNAPSHOT => {
            need(&b, 34)?;
            let (epoch, seq, offset, committed) =
                (b.get_u64(), b.get_u64(), b.get_u64(), b.get_u64());
            let n = b.get_u16() as usize;
            need(&b, n)?;
            let name =
                String::from_utf8(b.split_to(n).to_vec()).map_err(|_| bad("snapshot name"))?;
            Message::Write {
                epoch: Epoch(epoch),
                seq: Seq(seq),
                offset,
                committed: Seq(committed),
                payload: Payload::Snapshot(name),
            }
        }
        WRITE_DEALLOCATE => {
            need(&b, 40)?;
            Message::Write {
                epoch: Epoch(b.get_u64()),
                seq: Seq(b.get_u64()),
                offset: b.get_u64(),
                committed: Seq(b.get_u64()),
                payload: Payload::Deallocate(b.get_u64()),
            }
        }
        4 => {
            need(&b, 16)?;
            Message::Ack {
                epoch: Epoch(b.get_u64()),
                seq: Seq(b.get_u64()),
            }
        }
        5 => {
            need(&b, 8)?;
            Message::Fenced {
                epoch: Epoch(b.get_u64()),
            }
        }
        6 => {
            need(&b, 16)?;
            Message::VerifyRequest {
                epoch: Epoch(b.get_u64()),
                region: b.get_u64(),
            }
        }
        8 => {
            need(&b, 21)?;
            let epoch = b.get_u64();
            let full = b.get_u8() != 0;
            let generation = b.get_u64();
            let n = b.get_u32();
            let mut peers = crate::bitmap::DirtyMap::new();
            for _ in 0..n {
                need(&b, 12)?;
                let node = b.get_u64();
                let count = b.get_u32() as usize;
                need(&b, count.checked_mul(8).ok_or_else(|| bad("count"))?)?;
                let set = peers.entry(NodeId(node)).or_default();
                for _ in 0..count {
                    set.insert(b.get_u64());
                }
            }
            Message::DirtyMap {
                epoch: Epoch(epoch),
                full,
                generation,
                peers,
            }
        }
        7 => {
            need(&b, 20)?;
            Message::VerifyResult {
                epoch: Epoch(b.get_u64()),
                region: b.get_u64(),
                crc: b.get_u32(),
            }
        }
        9 => {
            need(&b, 8)?;
            Message::Leaving {
                epoch: Epoch(b.get_u64()),
            }
        }
        _ => return Err(bad("kind")),
    };
    if b.has_remaining() {
        return Err(bad("trailing bytes"));
    }
    Ok((name, msg))
}

/// Frame kind of a [`Payload::Deallocate`] write (kind 3 carries data or a barrier).
const WRITE_DEALLOCATE: u8 = 10;
/// Frame kind of a [`Payload::Snapshot`] position.
const WRITE_SNAPSHOT: u8 = 11;
/// Frame kind of a [`Payload::Rollback`] position.
const WRITE_ROLLBACK: u8 = 12;

/// Frame kinds of forwarded SCSI traffic (not volume messages).
pub(super) const FORWARD_REQUEST: u8 = 100;
pub(super) const FORWARD_REPLY: u8 = 101;

/// A frame as received.
pub(super) enum Incoming {
    Volume(String, Message),
    ForwardRequest {
        target: String,
        id: u64,
        body: Bytes,
    },
    ForwardReply {
        id: u64,
        body: Bytes,
    },
}

/// A forwarding frame: `kind`, the target's name, the request id; `body` follows as is.
/// The body of a forwarded request or reply: a small head the caller encoded and the
/// data (Data-Out or Data-In) as it came, sent after it without being copied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardBody {
    /// Encoded by the caller (command, status, sense).
    pub head: Bytes,
    /// Sent as it is, after the head; the receiver sees one body, head then data.
    pub data: Bytes,
}

impl ForwardBody {
    /// The body as the receiver sees it (tests, small bodies).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.head.len() + self.data.len());
        b.put_slice(&self.head);
        b.put_slice(&self.data);
        b.freeze()
    }
}

impl From<Bytes> for ForwardBody {
    fn from(head: Bytes) -> ForwardBody {
        ForwardBody {
            head,
            data: Bytes::new(),
        }
    }
}

pub(super) fn encode_forward(kind: u8, target: &str, id: u64, body: ForwardBody) -> Frame {
    let mut h = BytesMut::with_capacity(20 + target.len() + body.head.len());
    h.put_u32((2 + target.len() + 1 + 8 + body.head.len() + body.data.len()) as u32);
    h.put_u16(target.len() as u16);
    h.put_slice(target.as_bytes());
    h.put_u8(kind);
    h.put_u64(id);
    h.put_slice(&body.head);
    (h, (!body.data.is_empty()).then_some(body.data))
}

pub(super) fn decode_incoming(b: Bytes) -> io::Result<Incoming> {
    let kind = b
        .get(..2)
        .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        .and_then(|nlen| b.get(2 + nlen).copied());
    match kind {
        Some(k @ (FORWARD_REQUEST | FORWARD_REPLY)) => {
            let mut b = b;
            let nlen = b.get_u16() as usize;
            let name = String::from_utf8(b.split_to(nlen).to_vec()).map_err(|_| bad("name"))?;
            b.advance(1);
            if b.remaining() < 8 {
                return Err(bad("short"));
            }
            let id = b.get_u64();
            Ok(if k == FORWARD_REQUEST {
                Incoming::ForwardRequest {
                    target: name,
                    id,
                    body: b,
                }
            } else {
                Incoming::ForwardReply { id, body: b }
            })
        }
        _ => decode(b).map(|(v, m)| Incoming::Volume(v, m)),
    }
}

/// Where a received frame ends: a multiple of this, the block size direct I/O needs.
const FRAME_END_ALIGN: usize = 4096;

pub(super) async fn read_frame(s: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Bytes> {
    let len = s.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(bad("too large"));
    }
    // Read into the spare capacity: zeroing a 1 MiB frame before overwriting it cost
    // a memset and, on fresh memory, a page fault per page (issue 20).
    let mut buf = BytesMut::with_capacity(len + FRAME_END_ALIGN);
    // The frame ends on a 4 KiB boundary: a write's data is its tail, so data of whole
    // blocks starts on one too and the replica's `O_DIRECT` write takes it as it is,
    // without a bounce copy (issue 20).
    let pad = (FRAME_END_ALIGN - (buf.as_ptr() as usize + len) % FRAME_END_ALIGN) % FRAME_END_ALIGN;
    buf.resize(pad, 0);
    buf.advance(pad);
    while buf.len() < len {
        let want = len - buf.len();
        if s.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

pub(super) type Frame = (BytesMut, Option<Bytes>);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn a_frame_is_read_whole_across_short_reads_and_a_cut_one_is_an_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let body: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        rt.block_on(async {
            // A reader that hands out at most 1000 bytes per read.
            let (mut tx, mut rx) = tokio::io::duplex(1000);
            let sent = wire.clone();
            let writer = tokio::spawn(async move { tx.write_all(&sent).await });
            assert_eq!(&read_frame(&mut rx).await.unwrap()[..], &body[..]);
            writer.await.unwrap().unwrap();
            let mut cut = &wire[..wire.len() - 1];
            assert_eq!(
                read_frame(&mut cut).await.unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof
            );
        });
    }

    /// A write of whole blocks comes out of a received frame starting on a 4 KiB
    /// boundary, whatever the volume's name, so the replica writes it with `O_DIRECT`
    /// without copying it first.
    #[test]
    fn a_received_write_of_whole_blocks_is_block_aligned() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for name in ["v", "volume-with-a-longer-name", "x".repeat(333).as_str()] {
            let data = Bytes::from(vec![7u8; 64 << 10]);
            let (head, tail) = encode(
                name,
                &Message::Write {
                    epoch: Epoch(2),
                    seq: Seq(5),
                    offset: 1 << 20,
                    payload: Payload::Data(data.clone()),
                    committed: Seq(4),
                },
            );
            let mut wire = head.to_vec();
            wire.extend_from_slice(&tail.unwrap_or_default());
            let frame = rt.block_on(read_frame(&mut &wire[..])).unwrap();
            assert_eq!((frame.as_ptr() as usize + frame.len()) % FRAME_END_ALIGN, 0);
            match decode(frame).unwrap() {
                (
                    v,
                    Message::Write {
                        payload: Payload::Data(got),
                        ..
                    },
                ) => {
                    assert_eq!(v, name);
                    assert_eq!(got, data);
                    assert_eq!(got.as_ptr() as usize % FRAME_END_ALIGN, 0, "{name}");
                }
                (_, other) => panic!("decoded {other:?}"),
            }
        }
    }

    #[test]
    fn forwarding_frames_round_trip_and_leave_volume_frames_alone() {
        // The head travels in the frame header, the data after it uncopied.
        let parts = ForwardBody {
            head: Bytes::from_static(b"a forwarded "),
            data: Bytes::from_static(b"command"),
        };
        let body = parts.to_bytes();
        for kind in [FORWARD_REQUEST, FORWARD_REPLY] {
            let (h, d) = encode_forward(kind, "iqn.t", 77, parts.clone());
            let d = d.unwrap();
            assert_eq!(d.as_ptr(), parts.data.as_ptr(), "the data is not copied");
            let mut frame = h.to_vec();
            frame.extend_from_slice(&d);
            assert_eq!(
                u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
                frame.len() - 4
            );
            match decode_incoming(Bytes::from(frame[4..].to_vec())).unwrap() {
                Incoming::ForwardRequest {
                    target,
                    id,
                    body: b,
                } => {
                    assert_eq!(
                        (kind, target.as_str(), id, b),
                        (FORWARD_REQUEST, "iqn.t", 77, body.clone())
                    );
                }
                Incoming::ForwardReply { id, body: b } => {
                    assert_eq!((kind, id, b), (FORWARD_REPLY, 77, body.clone()));
                }
                Incoming::Volume(..) => panic!("decoded as a volume message"),
            }
        }
        let (h, _) = encode(
            "v",
            &Message::Ack {
                epoch: Epoch(1),
                seq: Seq(2),
            },
        );
        assert!(matches!(
            decode_incoming(Bytes::from(h[4..].to_vec())).unwrap(),
            Incoming::Volume(v, Message::Ack { epoch: Epoch(1), seq: Seq(2) }) if v == "v"
        ));
    }

    #[test]
    fn frames_round_trip() {
        let mut d = RegionSet::new();
        d.insert(3);
        d.insert(99);
        for msg in [
            Message::Seal {
                epoch: Epoch(3),
                next_seq: Seq(9),
            },
            Message::SealAck {
                epoch: Epoch(3),
                divergent: d,
            },
            Message::Write {
                epoch: Epoch(3),
                seq: Seq(10),
                offset: 4096,
                payload: Payload::Data(Bytes::from_static(b"hello")),
                committed: Seq(7),
            },
            Message::Write {
                epoch: Epoch(3),
                seq: Seq(11),
                offset: 0,
                payload: Payload::Flush,
                committed: Seq(7),
            },
            Message::Write {
                epoch: Epoch(3),
                seq: Seq(12),
                offset: 8 << 30,
                payload: Payload::Deallocate(3 << 30),
                committed: Seq(11),
            },
            Message::Write {
                epoch: Epoch(3),
                seq: Seq(13),
                offset: 0,
                payload: Payload::Snapshot("before-upgrade".into()),
                committed: Seq(12),
            },
            Message::Write {
                epoch: Epoch(3),
                seq: Seq(14),
                offset: 0,
                payload: Payload::Rollback {
                    snapshot: "before-upgrade".into(),
                    len: 4 << 30,
                },
                committed: Seq(13),
            },
            Message::Ack {
                epoch: Epoch(3),
                seq: Seq(10),
            },
            Message::Fenced { epoch: Epoch(4) },
            Message::Leaving { epoch: Epoch(4) },
        ] {
            let (h, data) = encode("vol-1", &msg);
            let mut all = h.to_vec();
            if let Some(d) = data {
                all.extend_from_slice(&d);
            }
            let len = u32::from_be_bytes(all[..4].try_into().unwrap()) as usize;
            assert_eq!(len, all.len() - 4);
            let (name, back) = decode(Bytes::from(all[4..].to_vec())).unwrap();
            assert_eq!(name, "vol-1");
            assert_eq!(back, msg);
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(Bytes::from(b));
        }
    }

    #[test]
    fn garbage_frames_are_errors_not_panics() {
        for b in [
            &b""[..],
            b"\x00",
            b"\x00\x01a",
            b"\x00\x01a\x09",
            b"\x00\x01a\x03\x00\x00",
        ] {
            assert!(decode(Bytes::copy_from_slice(b)).is_err());
        }
    }
}
