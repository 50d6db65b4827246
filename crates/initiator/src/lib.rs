//! A small iSCSI initiator (RFC 7143): login with optional CHAP, discovery, one command
//! at a time with immediate data and R2T handling, logout.
//!
//! It exists for Bulwark's own tools and tests (integrity checker, benchmarks, bad-input
//! tests that need to send exactly the PDUs they want); real initiators (libiscsi,
//! open-iscsi, QEMU) remain the truth for conformance.
#![warn(missing_docs)]

pub mod checker;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use iscsi_proto::chap;
use iscsi_proto::pdu::{
    decode_wire, DataOut, Login, LogoutRequest, Lun, Pdu, ScsiCommand, StatusSeq, Text, WireError,
    BHS_LEN, RESERVED_TAG,
};
use iscsi_proto::text::TextPairs;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Initiator errors.
#[derive(Debug, Error)]
pub enum InitiatorError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The target refused the login.
    #[error("login refused: status class {class} detail {detail}")]
    LoginRefused {
        /// Status-Class.
        class: u8,
        /// Status-Detail.
        detail: u8,
    },
    /// The target sent something we did not expect.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The target closed the connection.
    #[error("connection closed")]
    Closed,
}

/// CHAP credentials.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// CHAP_N.
    pub user: String,
    /// Secret.
    pub secret: String,
}

/// What to log in to.
#[derive(Clone, Debug)]
pub struct LoginOptions {
    /// InitiatorName.
    pub initiator_name: String,
    /// TargetName; `None` opens a discovery session.
    pub target_name: Option<String>,
    /// CHAP credentials, if the target wants them.
    pub chap: Option<Credentials>,
    /// ISID.
    pub isid: [u8; 6],
    /// Offer CRC32C header and data digests.
    pub digests: bool,
    /// Time allowed for each answer.
    pub timeout: Duration,
}

impl LoginOptions {
    /// A normal session to `target` as `initiator`.
    pub fn new(initiator: &str, target: Option<&str>) -> LoginOptions {
        LoginOptions {
            initiator_name: initiator.to_string(),
            target_name: target.map(str::to_string),
            chap: None,
            isid: [0x80, 0x12, 0x34, 0x56, 0x00, 0x01],
            digests: false,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The outcome of a SCSI command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandResult {
    /// SCSI status.
    pub status: u8,
    /// Sense data, if any.
    pub sense: Bytes,
    /// Data-In.
    pub data: Vec<u8>,
    /// Residual count and flags (overflow, underflow).
    pub residual: (bool, bool, u32),
}

/// A logged-in session with one connection.
pub struct Session {
    stream: TcpStream,
    cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    header_digest: bool,
    data_digest: bool,
    max_send: usize,
    immediate_data: bool,
    first_burst: usize,
    timeout: Duration,
    /// The text the target answered during login (negotiated keys).
    pub negotiated: TextPairs,
    /// TSIH the target assigned.
    pub tsih: u16,
    /// The target sent an Async Message asking for a logout (AsyncEvent 1).
    logout_requested: bool,
}

impl Session {
    /// True once the target asked this session to log out (RFC 7143 §11.9.1): a real
    /// initiator logs out and reconnects, possibly elsewhere.
    pub fn logout_requested(&self) -> bool {
        self.logout_requested
    }

    /// Connects and logs in.
    pub async fn login(addr: SocketAddr, opts: &LoginOptions) -> Result<Session, InitiatorError> {
        let stream = tokio::time::timeout(opts.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| InitiatorError::Timeout)??;
        stream.set_nodelay(true)?;
        let mut s = Session {
            stream,
            cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 1,
            header_digest: false,
            data_digest: false,
            max_send: 8192,
            immediate_data: true,
            first_burst: 65_536,
            timeout: opts.timeout,
            negotiated: TextPairs::default(),
            tsih: 0,
            logout_requested: false,
        };
        s.do_login(opts).await?;
        Ok(s)
    }

    async fn login_step(
        &mut self,
        opts: &LoginOptions,
        csg: u8,
        nsg: u8,
        transit: bool,
        text: TextPairs,
    ) -> Result<(Login, TextPairs), InitiatorError> {
        let req = Login {
            transit,
            csg,
            nsg,
            isid: opts.isid,
            tsih: 0,
            itt: 0,
            seq: StatusSeq {
                stat_sn: self.cmd_sn,
                exp_cmd_sn: self.exp_stat_sn,
                max_cmd_sn: 0,
            },
            ..Default::default()
        };
        self.send(&Pdu::LoginRequest(req, Bytes::from(text.encode())))
            .await?;
        match self.recv().await? {
            Pdu::LoginResponse(h, data) => {
                if h.status_class != 0 {
                    return Err(InitiatorError::LoginRefused {
                        class: h.status_class,
                        detail: h.status_detail,
                    });
                }
                self.exp_stat_sn = h.seq.stat_sn.wrapping_add(1);
                let t =
                    TextPairs::parse(&data).map_err(|e| InitiatorError::Protocol(e.to_string()))?;
                Ok((h, t))
            }
            other => Err(InitiatorError::Protocol(format!(
                "expected a login response, got {other:?}"
            ))),
        }
    }

    async fn do_login(&mut self, opts: &LoginOptions) -> Result<(), InitiatorError> {
        let mut first = TextPairs::default();
        first.push("InitiatorName", opts.initiator_name.clone());
        match &opts.target_name {
            Some(t) => {
                first.push("SessionType", "Normal");
                first.push("TargetName", t.clone());
            }
            None => first.push("SessionType", "Discovery"),
        }
        first.push(
            "AuthMethod",
            if opts.chap.is_some() {
                "CHAP,None"
            } else {
                "None"
            },
        );
        let (h, t) = self
            .login_step(opts, 0, 1, opts.chap.is_none(), first)
            .await?;
        self.negotiated.0.extend(t.0.clone());
        if !h.transit {
            let cred = opts
                .chap
                .clone()
                .ok_or_else(|| InitiatorError::Protocol("target wants CHAP".into()))?;
            let mut a = TextPairs::default();
            a.push("CHAP_A", "5");
            let (_, t) = self.login_step(opts, 0, 1, false, a).await?;
            let id: u8 = t
                .get("CHAP_I")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| InitiatorError::Protocol("no CHAP_I".into()))?;
            let c = t
                .get("CHAP_C")
                .and_then(chap::decode_binary)
                .ok_or_else(|| InitiatorError::Protocol("no CHAP_C".into()))?;
            let mut r = TextPairs::default();
            r.push("CHAP_N", cred.user.clone());
            r.push(
                "CHAP_R",
                chap::encode_hex(&chap::response(id, cred.secret.as_bytes(), &c)),
            );
            self.login_step(opts, 0, 1, true, r).await?;
        }
        let mut op = TextPairs::default();
        let digest = if opts.digests { "CRC32C,None" } else { "None" };
        op.push("HeaderDigest", digest);
        op.push("DataDigest", digest);
        if opts.target_name.is_some() {
            op.push("InitialR2T", "Yes");
            op.push("ImmediateData", "Yes");
            op.push("MaxBurstLength", "262144");
            op.push("FirstBurstLength", "65536");
            op.push("MaxOutstandingR2T", "1");
        }
        op.push("MaxRecvDataSegmentLength", "262144");
        let (h, t) = self.login_step(opts, 1, 3, true, op).await?;
        if !h.transit || h.nsg != 3 {
            return Err(InitiatorError::Protocol(
                "target did not enter full feature phase".into(),
            ));
        }
        self.tsih = h.tsih;
        self.header_digest = t.get("HeaderDigest") == Some("CRC32C");
        self.data_digest = t.get("DataDigest") == Some("CRC32C");
        if let Some(n) = t
            .get("MaxRecvDataSegmentLength")
            .and_then(|v| v.parse().ok())
        {
            self.max_send = n;
        }
        self.immediate_data = t.get("ImmediateData") != Some("No");
        if let Some(n) = t
            .get("FirstBurstLength")
            .and_then(|v| v.parse::<usize>().ok())
        {
            self.first_burst = n;
        }
        self.negotiated.0.extend(t.0);
        Ok(())
    }

    /// Sends one PDU as is (tests use this to send malformed PDUs).
    pub async fn send(&mut self, pdu: &Pdu) -> Result<(), InitiatorError> {
        let wire = pdu.to_wire(self.header_digest, self.data_digest);
        self.send_raw(&wire).await
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), InitiatorError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Receives the next PDU, waiting at most the session's timeout.
    pub async fn recv(&mut self) -> Result<Pdu, InitiatorError> {
        self.recv_within(self.timeout).await
    }

    /// Receives the next PDU within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Pdu, InitiatorError> {
        tokio::time::timeout(limit, self.recv_inner())
            .await
            .map_err(|_| InitiatorError::Timeout)?
    }

    async fn recv_inner(&mut self) -> Result<Pdu, InitiatorError> {
        let mut buf = vec![0u8; BHS_LEN];
        read_exact(&mut self.stream, &mut buf).await?;
        let bhs = iscsi_proto::pdu::Bhs::from_slice(&buf)
            .map_err(|e| InitiatorError::Protocol(e.to_string()))?;
        let mut rest = bhs.ahs_len();
        if self.header_digest {
            rest += 4;
        }
        let dlen = bhs.data_len();
        if dlen > 0 {
            rest += dlen + iscsi_proto::digest::pad_len(dlen);
            if self.data_digest {
                rest += 4;
            }
        }
        let start = buf.len();
        buf.resize(start + rest, 0);
        read_exact(&mut self.stream, &mut buf[start..]).await?;
        match decode_wire(&buf, self.header_digest, self.data_digest) {
            Ok((pdu, _)) => Ok(pdu),
            Err(WireError::Incomplete) => Err(InitiatorError::Protocol("short PDU".into())),
            Err(e) => Err(InitiatorError::Protocol(e.to_string())),
        }
    }

    /// The next CmdSN (and advances it).
    pub fn take_cmd_sn(&mut self) -> u32 {
        let c = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        c
    }

    /// The next initiator task tag.
    pub fn take_itt(&mut self) -> u32 {
        let t = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == RESERVED_TAG {
            self.next_itt = 1;
        }
        t
    }

    /// ExpStatSN to put in requests.
    pub fn exp_stat_sn(&self) -> u32 {
        self.exp_stat_sn
    }

    /// Runs one SCSI command to completion.
    pub async fn command(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: Option<&[u8]>,
        data_in_len: u32,
    ) -> Result<CommandResult, InitiatorError> {
        let itt = self.take_itt();
        let mut cdb16 = [0u8; 16];
        let n = cdb.len().min(16);
        cdb16[..n].copy_from_slice(&cdb[..n]);
        let out = data_out.unwrap_or(&[]);
        let immediate = if self.immediate_data {
            out.len().min(self.first_burst).min(self.max_send)
        } else {
            0
        };
        let cmd = ScsiCommand {
            immediate: false,
            final_bit: true,
            read: data_in_len > 0,
            write: !out.is_empty(),
            attr: iscsi_proto::pdu::attr::SIMPLE,
            lun: Lun(lun).to_field(),
            itt,
            expected_data_transfer_length: if out.is_empty() {
                data_in_len
            } else {
                out.len() as u32
            },
            cmd_sn: self.take_cmd_sn(),
            exp_stat_sn: self.exp_stat_sn,
            cdb: cdb16,
        };
        self.send(&Pdu::ScsiCommand(
            cmd,
            Bytes::copy_from_slice(&out[..immediate]),
        ))
        .await?;
        let mut data = Vec::new();
        loop {
            match self.recv().await? {
                Pdu::R2t(r) if r.itt == itt => {
                    let start = r.buffer_offset as usize;
                    let end = (start + r.desired_data_transfer_length as usize).min(out.len());
                    let mut off = start;
                    let mut data_sn = 0;
                    while off < end {
                        let len = (end - off).min(self.max_send);
                        let d = DataOut {
                            final_bit: off + len == end,
                            lun: Lun(lun).to_field(),
                            itt,
                            ttt: r.ttt,
                            exp_stat_sn: self.exp_stat_sn,
                            data_sn,
                            buffer_offset: off as u32,
                        };
                        self.send(&Pdu::DataOut(
                            d,
                            Bytes::copy_from_slice(&out[off..off + len]),
                        ))
                        .await?;
                        off += len;
                        data_sn += 1;
                    }
                }
                Pdu::DataIn(h, d) if h.itt == itt => {
                    let off = h.buffer_offset as usize;
                    if data.len() < off + d.len() {
                        data.resize(off + d.len(), 0);
                    }
                    data[off..off + d.len()].copy_from_slice(&d);
                    if h.status_present {
                        self.exp_stat_sn = h.seq.stat_sn.wrapping_add(1);
                        return Ok(CommandResult {
                            status: h.status,
                            sense: Bytes::new(),
                            data,
                            residual: (h.overflow, h.underflow, h.residual_count),
                        });
                    }
                }
                Pdu::ScsiResponse(h, d) if h.itt == itt => {
                    self.exp_stat_sn = h.seq.stat_sn.wrapping_add(1);
                    let sense = if d.len() >= 2 {
                        let l = u16::from_be_bytes([d[0], d[1]]) as usize;
                        d.slice(2..(2 + l).min(d.len()))
                    } else {
                        Bytes::new()
                    };
                    return Ok(CommandResult {
                        status: h.status,
                        sense,
                        data,
                        residual: (h.overflow, h.underflow, h.residual_count),
                    });
                }
                Pdu::NopIn(h, _) if h.ttt != RESERVED_TAG => {
                    // Answer the target's ping so it keeps the connection.
                    let nop = iscsi_proto::pdu::Nop {
                        immediate: true,
                        itt: RESERVED_TAG,
                        ttt: h.ttt,
                        seq: StatusSeq {
                            stat_sn: self.cmd_sn,
                            exp_cmd_sn: self.exp_stat_sn,
                            max_cmd_sn: 0,
                        },
                        ..Default::default()
                    };
                    self.send(&Pdu::NopOut(nop, Bytes::new())).await?;
                }
                Pdu::AsyncMessage(m, _) => {
                    if m.event == 1 {
                        self.logout_requested = true;
                    }
                }
                Pdu::NopIn(..) => {}
                other => {
                    return Err(InitiatorError::Protocol(format!(
                        "unexpected PDU {other:?}"
                    )))
                }
            }
        }
    }

    /// READ(16) of `blocks` blocks at `lba`.
    pub async fn read16(
        &mut self,
        lun: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<CommandResult, InitiatorError> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        self.command(lun, &cdb, None, blocks * block_size).await
    }

    /// WRITE(16) of `data` at `lba` (FUA optional).
    pub async fn write16(
        &mut self,
        lun: u64,
        lba: u64,
        data: &[u8],
        block_size: u32,
        fua: bool,
    ) -> Result<CommandResult, InitiatorError> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8a;
        if fua {
            cdb[1] = 0x08;
        }
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&((data.len() as u32) / block_size).to_be_bytes());
        self.command(lun, &cdb, Some(data), 0).await
    }

    /// SendTargets=All on a discovery session: (target name, addresses).
    pub async fn send_targets(&mut self) -> Result<Vec<(String, Vec<String>)>, InitiatorError> {
        let mut t = TextPairs::default();
        t.push("SendTargets", "All");
        let req = Text {
            final_bit: true,
            itt: self.take_itt(),
            ttt: RESERVED_TAG,
            seq: StatusSeq {
                stat_sn: self.take_cmd_sn(),
                exp_cmd_sn: self.exp_stat_sn,
                max_cmd_sn: 0,
            },
            ..Default::default()
        };
        self.send(&Pdu::TextRequest(req, Bytes::from(t.encode())))
            .await?;
        match self.recv().await? {
            Pdu::TextResponse(h, d) => {
                self.exp_stat_sn = h.seq.stat_sn.wrapping_add(1);
                let pairs =
                    TextPairs::parse(&d).map_err(|e| InitiatorError::Protocol(e.to_string()))?;
                let mut out: Vec<(String, Vec<String>)> = Vec::new();
                for (k, v) in pairs.0 {
                    match k.as_str() {
                        "TargetName" => out.push((v, Vec::new())),
                        "TargetAddress" => {
                            if let Some(last) = out.last_mut() {
                                last.1.push(v);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(out)
            }
            other => Err(InitiatorError::Protocol(format!(
                "expected a text response, got {other:?}"
            ))),
        }
    }

    /// Logs out (close the session) and waits for the response.
    pub async fn logout(mut self) -> Result<(), InitiatorError> {
        let req = LogoutRequest {
            immediate: true,
            reason: 0,
            itt: self.take_itt(),
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.send(&Pdu::LogoutRequest(req)).await?;
        loop {
            match self.recv().await? {
                Pdu::LogoutResponse(r) if r.response == 0 => return Ok(()),
                Pdu::LogoutResponse(r) => {
                    return Err(InitiatorError::Protocol(format!(
                        "logout response {}",
                        r.response
                    )))
                }
                _ => continue,
            }
        }
    }

    /// Whether the target has closed the connection (reads until EOF or `limit`).
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut b = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

async fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> Result<(), InitiatorError> {
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(InitiatorError::Closed),
        Err(e) => Err(e.into()),
    }
}
