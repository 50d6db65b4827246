//! Bounds and refusals of the iSCSI front end ("bounded everything / safe defaults"):
//! malformed iSCSI names at login, the limit on immediate commands, the bounded I/O
//! queue and the server-wide buffer budget (back-pressure, not failure), the Data-Out
//! timeout (writes whose data never comes do not hold that budget forever), and target
//! resets only where the target allows them. Each test fails without its bound.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use initiator::{InitiatorError, LoginOptions, Session};
use iscsi_proto::pdu::{
    reject, tmf, DataOut, Lun, Nop, Pdu, ScsiCommand, StatusSeq, TaskMgmtRequest, RESERVED_TAG,
};
use iscsi_target::{Portal, Server, ServerSettings, TargetConfig};
use scsi::testing::MemDevice;

const IQN: &str = "iqn.2026-11.io.bulwark:test";
const INITIATOR: &str = "iqn.2026-11.io.example:tester";
const BLOCK: u32 = 512;
const GOOD: u8 = 0x00;
const TASK_SET_FULL: u8 = 0x28;

/// Memory whose reads wait while the gate is closed, so commands stay in the I/O threads
/// for as long as a test needs.
#[derive(Debug)]
struct GatedDevice {
    inner: MemDevice,
    closed: Mutex<bool>,
    opened: Condvar,
}

impl GatedDevice {
    fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }
}

impl scsi::BlockDevice for GatedDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
        drop(closed);
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.inner.write_at(offset, data, fua)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }

    fn supports_discard(&self) -> bool {
        self.inner.supports_discard()
    }
}

struct Fixture {
    server: Server,
    addr: SocketAddr,
    disk: Arc<GatedDevice>,
    device: Arc<scsi::TargetDevice>,
    allow_target_reset: bool,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Fixture {
    async fn start(settings: ServerSettings, allow_target_reset: bool) -> Fixture {
        let server = Server::new(settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let disk = Arc::new(GatedDevice {
            inner: MemDevice::new(16 << 20),
            closed: Mutex::new(false),
            opened: Condvar::new(),
        });
        let device = Arc::new(scsi::TargetDevice::new());
        device
            .add_lun(0, scsi::LuConfig::default(), disk.clone())
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let f = Fixture {
            server,
            addr,
            disk,
            device,
            allow_target_reset,
            _stop: tx,
        };
        f.server.set_target(f.config(None));
        let s = f.server.clone();
        tokio::spawn(async move {
            s.serve(vec![listener], async {
                let _ = rx.await;
            })
            .await
        });
        f
    }

    fn config(&self, allowed_initiators: Option<Vec<String>>) -> TargetConfig {
        TargetConfig {
            name: IQN.into(),
            alias: None,
            device: self.device.clone(),
            portals: vec![Portal {
                addr: self.addr,
                group_tag: 1,
            }],
            remote_portals: Vec::new(),
            allowed_initiators,
            chap: Vec::new(),
            allow_target_reset: self.allow_target_reset,
        }
    }

    async fn login(&self, isid_last: u8) -> Session {
        login_as(self.addr, INITIATOR, isid_last).await.unwrap()
    }
}

async fn login_as(addr: SocketAddr, name: &str, isid_last: u8) -> Result<Session, InitiatorError> {
    Session::login(
        addr,
        &LoginOptions {
            isid: [0x80, 0, 0, 0, 0, isid_last],
            ..LoginOptions::new(name, Some(IQN))
        },
    )
    .await
}

/// TEST UNIT READY until the power-on or reset unit attention is consumed; then GOOD.
async fn ready(s: &mut Session) {
    for _ in 0..4 {
        let r = s.command(0, &[0u8; 6], None, 0).await.unwrap();
        if r.status == GOOD {
            return;
        }
    }
    panic!("TEST UNIT READY never returned GOOD");
}

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = op;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    rw16(0x88, lba, blocks)
}

fn write16(lba: u64, blocks: u32) -> [u8; 16] {
    rw16(0x8a, lba, blocks)
}

/// A SCSI Command PDU without data. An immediate command carries the next CmdSN without
/// consuming it (RFC 7143 §4.2.2.1); the target does not look at it, and taking one here
/// only leaves a gap in the numbers, which the target accepts.
fn command(
    s: &mut Session,
    itt: u32,
    cdb: [u8; 16],
    read: u32,
    write: u32,
    immediate: bool,
) -> Pdu {
    let cmd = ScsiCommand {
        immediate,
        final_bit: true,
        read: read > 0,
        write: write > 0,
        attr: iscsi_proto::pdu::attr::SIMPLE,
        lun: Lun(0).to_field(),
        itt,
        expected_data_transfer_length: read.max(write),
        cmd_sn: s.take_cmd_sn(),
        exp_stat_sn: s.exp_stat_sn(),
        cdb,
    };
    Pdu::ScsiCommand(cmd, Bytes::new())
}

fn ping(s: &Session, itt: u32) -> Pdu {
    let nop = Nop {
        immediate: true,
        itt,
        ttt: RESERVED_TAG,
        seq: StatusSeq {
            stat_sn: 0,
            exp_cmd_sn: s.exp_stat_sn(),
            max_cmd_sn: 0,
        },
        ..Default::default()
    };
    Pdu::NopOut(nop, Bytes::new())
}

fn target_reset(s: &Session, itt: u32, function: u8) -> Pdu {
    Pdu::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function,
        itt,
        referenced_task_tag: RESERVED_TAG,
        exp_stat_sn: s.exp_stat_sn(),
        ..Default::default()
    })
}

/// The next PDU that answers something: R2Ts, Data-In without status and the target's
/// own pings are skipped.
async fn answer(s: &mut Session, within: Duration) -> Result<Pdu, InitiatorError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match s.recv_within(left).await? {
            Pdu::R2t(_) => {}
            Pdu::DataIn(d, _) if !d.status_present => {}
            Pdu::NopIn(n, _) if n.itt == RESERVED_TAG => {}
            p => return Ok(p),
        }
    }
}

/// (ITT, status) of a SCSI response, however it came.
fn status_of(p: &Pdu) -> Option<(u32, u8)> {
    match p {
        Pdu::ScsiResponse(r, _) => Some((r.itt, r.status)),
        Pdu::DataIn(d, _) if d.status_present => Some((d.itt, d.status)),
        _ => None,
    }
}

/// Statuses of `n` commands, in arrival order.
async fn statuses(s: &mut Session, n: usize) -> Vec<(u32, u8)> {
    let mut out = Vec::new();
    while out.len() < n {
        let p = answer(s, Duration::from_secs(10)).await.unwrap();
        out.push(status_of(&p).unwrap_or_else(|| panic!("expected a SCSI status, got {p:?}")));
    }
    out.sort_unstable();
    out
}

/// The statuses of `n` commands and the answer to the ping `ping_itt`, in whatever order
/// they come (a connection that was waiting reads the ping as soon as its command is
/// handed on, so the NOP-In may overtake the command's status).
async fn statuses_and_ping(s: &mut Session, n: usize, ping_itt: u32) -> Vec<(u32, u8)> {
    let mut out = Vec::new();
    let mut pinged = false;
    while out.len() < n || !pinged {
        match answer(s, Duration::from_secs(10)).await.unwrap() {
            Pdu::NopIn(nop, _) if nop.itt == ping_itt => pinged = true,
            p => out.push(status_of(&p).unwrap_or_else(|| panic!("unexpected {p:?}"))),
        }
    }
    out.sort_unstable();
    out
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---- iSCSI names at login ----------------------------------------------------------

#[tokio::test]
async fn malformed_initiator_names_are_refused_at_login() {
    let f = Fixture::start(ServerSettings::default(), false).await;
    let too_long = format!("iqn.2026-11.io.example:{}", "a".repeat(300));
    let bad = [
        "iqn.2026-11.io.example:host\nWARN forged log line",
        "iqn.2026-11.io.example:host/a",
        "host-a",
        "iqn.2026-13.io.example:host",
        too_long.as_str(),
    ];
    for name in bad {
        for target in [Some(IQN), None] {
            let r = Session::login(f.addr, &LoginOptions::new(name, target)).await;
            assert!(
                matches!(
                    r,
                    Err(InitiatorError::LoginRefused {
                        class: 2,
                        detail: 0
                    })
                ),
                "{name:?} to {target:?}: {:?}",
                r.err()
            );
        }
    }
    let by_reason = f.server.stats().login_failures_by_reason();
    assert_eq!(
        by_reason.get("bad iSCSI name"),
        Some(&(2 * bad.len() as u64))
    );
    let mut s = f.login(1).await;
    ready(&mut s).await;
}

#[tokio::test]
async fn malformed_target_name_is_not_found() {
    let f = Fixture::start(ServerSettings::default(), false).await;
    let r = Session::login(
        f.addr,
        &LoginOptions::new(INITIATOR, Some("iqn.2026-11.io.bulwark:test\r\n")),
    )
    .await;
    assert!(
        matches!(
            r,
            Err(InitiatorError::LoginRefused {
                class: 2,
                detail: 3
            })
        ),
        "{:?}",
        r.err()
    );
    let by_reason = f.server.stats().login_failures_by_reason();
    assert_eq!(by_reason.get("bad iSCSI name"), Some(&1));
}

#[tokio::test]
async fn real_initiator_names_still_log_in() {
    let f = Fixture::start(ServerSettings::default(), false).await;
    for name in [
        "iqn.1993-08.org.debian:01:abcdef",
        "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
        "iqn.2008-11.org.linux-kvm",
        "iqn.2008-11.org.linux-kvm:6f1e3c2a-8b4d-4e5f-9a0b-1c2d3e4f5a6b",
        "iqn.1998-01.com.vmware:ESX01-5f2a3b4c",
        "eui.02004567A425678D",
    ] {
        let mut s = login_as(f.addr, name, 1)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        ready(&mut s).await;
        s.logout().await.unwrap();
    }
}

/// Names are case-insensitive (RFC 3722): an ACL entry admits the initiator whatever
/// the case, and updating the target keeps the session it admitted.
#[tokio::test]
async fn acl_compares_names_without_case_and_keeps_admitted_sessions() {
    let f = Fixture::start(ServerSettings::default(), false).await;
    let acl = Some(vec!["iqn.1998-01.com.vmware:esx01-5f2a3b4c".to_string()]);
    f.server.set_target(f.config(acl.clone()));
    let mut s = login_as(f.addr, "iqn.1998-01.com.vmware:ESX01-5f2a3b4c", 1)
        .await
        .unwrap();
    ready(&mut s).await;
    f.server.set_target(f.config(acl));
    assert!(
        !s.closed_within(Duration::from_millis(300)).await,
        "the session the ACL admitted must survive a target update"
    );
    ready(&mut s).await;
}

// ---- immediate commands ------------------------------------------------------------

#[tokio::test]
async fn immediate_commands_beyond_the_limit_are_rejected() {
    let f = Fixture::start(ServerSettings::default(), false).await;
    let mut s = f.login(1).await;
    ready(&mut s).await;
    // Four immediate writes whose data never comes stay outstanding.
    for itt in 0x100..0x104 {
        let p = command(&mut s, itt, write16(0, 8), 0, 4096, true);
        s.send(&p).await.unwrap();
    }
    let fifth = command(&mut s, 0x104, [0u8; 16], 0, 0, true);
    s.send(&fifth).await.unwrap();
    match answer(&mut s, Duration::from_secs(5)).await.unwrap() {
        Pdu::Reject(r, data) => {
            assert_eq!(r.reason, reject::IMMEDIATE_COMMAND_REJECT);
            assert_eq!(&data[..], &fifth.to_wire(false, false)[..48]);
        }
        other => panic!("expected Reject 0x06, got {other:?}"),
    }
    assert_eq!(f.server.stats().immediate_rejects.load(Relaxed), 1);
    // What initiators really send as immediate still works: a ping, task management.
    s.send(&ping(&s, 0x200)).await.unwrap();
    match answer(&mut s, Duration::from_secs(5)).await.unwrap() {
        Pdu::NopIn(n, _) => assert_eq!(n.itt, 0x200),
        other => panic!("expected the NOP-In, got {other:?}"),
    }
    // The CmdSN window is untouched.
    ready(&mut s).await;
    let abort = Pdu::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: tmf::ABORT_TASK,
        lun: Lun(0).to_field(),
        itt: 0x201,
        referenced_task_tag: 0x100,
        exp_stat_sn: s.exp_stat_sn(),
        ..Default::default()
    });
    s.send(&abort).await.unwrap();
    match answer(&mut s, Duration::from_secs(5)).await.unwrap() {
        Pdu::TaskMgmtResponse(r) => assert_eq!((r.itt, r.response), (0x201, tmf::RESP_COMPLETE)),
        other => panic!("expected the TMF response, got {other:?}"),
    }
    // The aborted write gave its place back.
    let p = command(&mut s, 0x105, [0u8; 16], 0, 0, true);
    s.send(&p).await.unwrap();
    let p = answer(&mut s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status_of(&p), Some((0x105, GOOD)), "{p:?}");
}

// ---- the I/O queue -----------------------------------------------------------------

/// With the I/O threads' queue full, a connection with one more command waits for a place
/// and reads nothing meanwhile (its ping stays unanswered); all completes once the disk
/// moves again.
#[tokio::test]
async fn a_full_io_queue_stops_reading_the_socket() {
    // One thread and a window of 4: the queue holds 2 × 1 + 4 = 6 commands.
    let settings = ServerSettings {
        io_threads: 1,
        queue_depth: 4,
        ..Default::default()
    };
    let f = Fixture::start(settings, false).await;
    let mut a = f.login(1).await;
    let mut b = f.login(2).await;
    ready(&mut a).await;
    ready(&mut b).await;
    f.disk.close();
    for itt in 0x10..0x14 {
        let p = command(&mut a, itt, read16(u64::from(itt), 1), BLOCK, 0, false);
        a.send(&p).await.unwrap();
    }
    // A's four are queued first; B's third command is the seventh.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.server.stats().io_queue_waits.load(Relaxed), 0);
    for itt in 0x20..0x23 {
        let p = command(&mut b, itt, read16(u64::from(itt), 1), BLOCK, 0, false);
        b.send(&p).await.unwrap();
    }
    let stats = f.server.stats();
    wait_for("a connection waiting for the I/O queue", || {
        stats.io_queue_waits.load(Relaxed) >= 1
    })
    .await;
    b.send(&ping(&b, 0x2ff)).await.unwrap();
    assert!(
        matches!(
            answer(&mut b, Duration::from_millis(300)).await,
            Err(InitiatorError::Timeout)
        ),
        "a connection waiting for the queue must not read its socket"
    );
    f.disk.open();
    let got_a = statuses(&mut a, 4).await;
    assert_eq!(got_a, (0x10..0x14).map(|i| (i, GOOD)).collect::<Vec<_>>());
    let got_b = statuses_and_ping(&mut b, 3, 0x2ff).await;
    assert_eq!(got_b, (0x20..0x23).map(|i| (i, GOOD)).collect::<Vec<_>>());
}

// ---- the buffer budget -------------------------------------------------------------

/// Past the server-wide buffer budget a command waits (its connection reads nothing
/// meanwhile) and then runs: nothing fails.
#[tokio::test]
async fn commands_past_the_buffer_budget_wait_and_then_run() {
    let settings = ServerSettings {
        buffer_bytes_max: 1 << 20,
        io_threads: 4,
        ..Default::default()
    };
    let f = Fixture::start(settings, false).await;
    let mut a = f.login(1).await;
    let mut b = f.login(2).await;
    ready(&mut a).await;
    ready(&mut b).await;
    f.disk.close();
    // Two 512 KiB reads hold the whole budget until their data is sent.
    for (itt, lba) in [(0x10, 0), (0x11, 1024)] {
        let p = command(&mut a, itt, read16(lba, 1024), 512 << 10, 0, false);
        a.send(&p).await.unwrap();
    }
    let p = command(&mut b, 0x20, read16(4096, 8), 4096, 0, false);
    b.send(&p).await.unwrap();
    let stats = f.server.stats();
    wait_for("a command waiting for the buffer budget", || {
        stats.buffer_waits.load(Relaxed) >= 1
    })
    .await;
    b.send(&ping(&b, 0x2ff)).await.unwrap();
    assert!(
        matches!(
            answer(&mut b, Duration::from_millis(300)).await,
            Err(InitiatorError::Timeout)
        ),
        "a connection waiting for budget must not read its socket"
    );
    f.disk.open();
    assert_eq!(statuses(&mut a, 2).await, vec![(0x10, GOOD), (0x11, GOOD)]);
    assert_eq!(
        statuses_and_ping(&mut b, 1, 0x2ff).await,
        vec![(0x20, GOOD)]
    );
    assert_eq!(stats.buffer_refusals.load(Relaxed), 0);
}

/// A command larger than the whole budget takes all of it and runs alone.
#[tokio::test]
async fn a_command_larger_than_the_budget_runs_alone() {
    let settings = ServerSettings {
        buffer_bytes_max: 1 << 20,
        ..Default::default()
    };
    let f = Fixture::start(settings, false).await;
    let mut s = f.login(1).await;
    ready(&mut s).await;
    let data: Vec<u8> = (0..2 << 20).map(|i| (i * 13 % 251) as u8).collect();
    let w = tokio::time::timeout(
        Duration::from_secs(10),
        s.write16(0, 0, &data, BLOCK, false),
    )
    .await
    .expect("the write must not wait forever")
    .unwrap();
    assert_eq!(w.status, GOOD);
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        s.read16(0, 0, (data.len() as u32) / BLOCK, BLOCK),
    )
    .await
    .expect("the read must not wait forever")
    .unwrap();
    assert_eq!(r.status, GOOD);
    assert!(r.data == data, "read back differs");
}

/// A session whose write is still waiting for its Data-Out does not wait for budget (only
/// its own reader can receive that data): its next command gets TASK SET FULL, and the
/// write completes once its data arrives.
#[tokio::test]
async fn a_session_with_writes_waiting_for_data_gets_task_set_full() {
    let settings = ServerSettings {
        buffer_bytes_max: 1 << 20,
        ..Default::default()
    };
    let f = Fixture::start(settings, false).await;
    let mut s = f.login(1).await;
    ready(&mut s).await;
    // A 1 MiB write without immediate data takes the whole budget; the target asks for
    // its data with R2Ts.
    let len: u32 = 1 << 20;
    let p = command(&mut s, 0x30, write16(0, len / BLOCK), 0, len, false);
    s.send(&p).await.unwrap();
    let first_r2t = match s.recv_within(Duration::from_secs(5)).await.unwrap() {
        Pdu::R2t(r) => r,
        other => panic!("expected an R2T, got {other:?}"),
    };
    let p = command(&mut s, 0x31, read16(4096, 8), 4096, 0, false);
    s.send(&p).await.unwrap();
    let p = answer(&mut s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status_of(&p), Some((0x31, TASK_SET_FULL)), "{p:?}");
    assert_eq!(f.server.stats().buffer_refusals.load(Relaxed), 1);
    // Now the data: one Data-Out per R2T.
    let mut r2t = first_r2t;
    loop {
        let d = DataOut {
            final_bit: true,
            lun: Lun(0).to_field(),
            itt: 0x30,
            ttt: r2t.ttt,
            exp_stat_sn: s.exp_stat_sn(),
            data_sn: 0,
            buffer_offset: r2t.buffer_offset,
        };
        let chunk = vec![0x5a; r2t.desired_data_transfer_length as usize];
        s.send(&Pdu::DataOut(d, Bytes::from(chunk))).await.unwrap();
        match s.recv_within(Duration::from_secs(5)).await.unwrap() {
            Pdu::R2t(next) => r2t = next,
            p => {
                assert_eq!(status_of(&p), Some((0x30, GOOD)), "{p:?}");
                break;
            }
        }
    }
    let p = command(&mut s, 0x32, read16(0, 8), 4096, 0, false);
    s.send(&p).await.unwrap();
    match answer(&mut s, Duration::from_secs(5)).await.unwrap() {
        Pdu::DataIn(d, data) => {
            assert_eq!((d.itt, d.status), (0x32, GOOD));
            assert!(data.iter().all(|b| *b == 0x5a));
        }
        other => panic!("expected the read's data and status, got {other:?}"),
    }
}

// ---- target resets -----------------------------------------------------------------

#[tokio::test]
async fn target_resets_are_refused_unless_the_target_allows_them() {
    let f = Fixture::start(ServerSettings::default(), false).await;
    let mut a = f.login(1).await;
    let mut bystander = f.login(2).await;
    ready(&mut a).await;
    ready(&mut bystander).await;
    for (itt, function) in [
        (0x40, tmf::TARGET_WARM_RESET),
        (0x41, tmf::TARGET_COLD_RESET),
    ] {
        a.send(&target_reset(&a, itt, function)).await.unwrap();
        match answer(&mut a, Duration::from_secs(5)).await.unwrap() {
            Pdu::TaskMgmtResponse(r) => {
                assert_eq!((r.itt, r.response), (itt, tmf::RESP_AUTH_FAILED))
            }
            other => panic!("expected the TMF response, got {other:?}"),
        }
    }
    assert_eq!(f.server.stats().target_resets_refused.load(Relaxed), 2);
    // Nobody was reset: no unit attention, both sessions still there.
    let r = a.command(0, &[0u8; 6], None, 0).await.unwrap();
    assert_eq!(r.status, GOOD);
    let r = bystander.command(0, &[0u8; 6], None, 0).await.unwrap();
    assert_eq!(r.status, GOOD);
}

#[tokio::test]
async fn target_resets_run_where_the_target_allows_them() {
    let f = Fixture::start(ServerSettings::default(), true).await;
    let mut a = f.login(1).await;
    let mut bystander = f.login(2).await;
    ready(&mut a).await;
    ready(&mut bystander).await;
    a.send(&target_reset(&a, 0x40, tmf::TARGET_WARM_RESET))
        .await
        .unwrap();
    match answer(&mut a, Duration::from_secs(5)).await.unwrap() {
        Pdu::TaskMgmtResponse(r) => assert_eq!((r.itt, r.response), (0x40, tmf::RESP_COMPLETE)),
        other => panic!("expected the TMF response, got {other:?}"),
    }
    ready(&mut a).await;
    a.send(&target_reset(&a, 0x41, tmf::TARGET_COLD_RESET))
        .await
        .unwrap();
    match answer(&mut a, Duration::from_secs(5)).await.unwrap() {
        Pdu::TaskMgmtResponse(r) => assert_eq!((r.itt, r.response), (0x41, tmf::RESP_COMPLETE)),
        other => panic!("expected the TMF response, got {other:?}"),
    }
    // A cold reset ends every session of the target (RFC 7143 §11.5.1).
    assert!(a.closed_within(Duration::from_secs(5)).await);
    assert!(bystander.closed_within(Duration::from_secs(5)).await);
    assert_eq!(f.server.stats().target_resets_refused.load(Relaxed), 0);
}

// ---- the Data-Out timeout ----------------------------------------------------------

/// The Data-Out PDUs answering `r2t` for the write `itt` of `data` (the whole write's
/// data), in pieces of `piece` bytes.
fn data_outs(
    s: &Session,
    itt: u32,
    r2t: &iscsi_proto::pdu::R2t,
    data: &[u8],
    piece: usize,
) -> Vec<Pdu> {
    let start = r2t.buffer_offset as usize;
    let end = start + r2t.desired_data_transfer_length as usize;
    (start..end)
        .step_by(piece)
        .enumerate()
        .map(|(n, off)| {
            let len = piece.min(end - off);
            let d = DataOut {
                final_bit: off + len == end,
                lun: Lun(0).to_field(),
                itt,
                ttt: r2t.ttt,
                exp_stat_sn: s.exp_stat_sn(),
                data_sn: n as u32,
                buffer_offset: off as u32,
            };
            Pdu::DataOut(d, Bytes::copy_from_slice(&data[off..off + len]))
        })
        .collect()
}

async fn r2t_for(s: &mut Session, itt: u32) -> iscsi_proto::pdu::R2t {
    match s.recv_within(Duration::from_secs(5)).await.unwrap() {
        Pdu::R2t(r) if r.itt == itt => r,
        other => panic!("expected an R2T for {itt:#x}, got {other:?}"),
    }
}

/// An initiator that sends a WRITE and never its data (pinging the target all the while,
/// which is no progress on the write) loses its connection after the Data-Out timeout,
/// and the buffer budget the write held goes to another session's write that was
/// waiting for it.
#[tokio::test]
async fn a_write_whose_data_never_comes_ends_its_connection_and_frees_the_budget() {
    let timeout = Duration::from_millis(1500);
    let settings = ServerSettings {
        buffer_bytes_max: 1 << 20,
        data_out_timeout: timeout,
        ..Default::default()
    };
    let f = Fixture::start(settings, false).await;
    let mut hostile = f.login(1).await;
    let mut other = f.login(2).await;
    ready(&mut hostile).await;
    ready(&mut other).await;
    // A 1 MiB write without immediate data takes the whole budget; the target asks for
    // the data with an R2T, which never gets an answer.
    let len: u32 = 1 << 20;
    let p = command(&mut hostile, 0x30, write16(0, len / BLOCK), 0, len, false);
    hostile.send(&p).await.unwrap();
    r2t_for(&mut hostile, 0x30).await;
    let started = Instant::now();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let expected = data.clone();
    let waiting = tokio::spawn(async move {
        let w = other.write16(0, 8192, &data, BLOCK, false).await;
        (other, w)
    });
    let stats = f.server.stats();
    wait_for(
        "the other session's write waiting for the buffer budget",
        || stats.buffer_waits.load(Relaxed) >= 1,
    )
    .await;
    assert_eq!(stats.data_out_timeouts.load(Relaxed), 0);
    // Pings (answered) and nothing else: other PDUs are no progress on the write.
    let mut itt = 0x100;
    let closed = loop {
        if hostile.send(&ping(&hostile, itt)).await.is_err()
            || hostile.closed_within(Duration::from_millis(200)).await
        {
            break true;
        }
        if started.elapsed() > timeout * 5 {
            break false;
        }
        itt += 1;
    };
    let after = started.elapsed();
    assert!(
        closed,
        "the connection must be dropped after the Data-Out timeout"
    );
    assert!(
        after >= timeout - Duration::from_millis(100),
        "dropped after {after:?}, before the timeout"
    );
    assert_eq!(stats.data_out_timeouts.load(Relaxed), 1);
    let (mut other, w) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting write must get the budget back")
        .unwrap();
    assert_eq!(w.unwrap().status, GOOD);
    let r = other.read16(0, 8192, len / BLOCK, BLOCK).await.unwrap();
    assert_eq!(r.status, GOOD);
    assert!(r.data == expected, "read back differs");
    // The session that sent its data is not touched by the timeout.
    assert!(
        !other
            .closed_within(timeout + Duration::from_millis(500))
            .await
    );
    ready(&mut other).await;
    assert_eq!(stats.data_out_timeouts.load(Relaxed), 1);
}

/// A write whose Data-Out PDUs come slowly, each within the timeout, completes although
/// the whole transfer takes longer than the timeout; a session with no write waiting
/// for data is never dropped by it, however long it stays idle.
#[tokio::test]
async fn slow_but_steady_data_out_completes() {
    let timeout = Duration::from_millis(1500);
    let settings = ServerSettings {
        data_out_timeout: timeout,
        ..Default::default()
    };
    let f = Fixture::start(settings, false).await;
    let mut s = f.login(1).await;
    ready(&mut s).await;
    let len: u32 = 64 << 10;
    let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
    let p = command(&mut s, 0x30, write16(0, len / BLOCK), 0, len, false);
    s.send(&p).await.unwrap();
    let r2t = r2t_for(&mut s, 0x30).await;
    assert_eq!(
        (r2t.buffer_offset, r2t.desired_data_transfer_length),
        (0, len)
    );
    // Four pieces 700 ms apart: 2.8 s in all.
    let started = Instant::now();
    for d in data_outs(&s, 0x30, &r2t, &data, 16 << 10) {
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.send(&d).await.unwrap();
    }
    let p = answer(&mut s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status_of(&p), Some((0x30, GOOD)), "{p:?}");
    assert!(started.elapsed() > timeout);
    // Idle, with nothing waiting for data, for longer than the timeout.
    assert!(!s.closed_within(timeout + Duration::from_millis(500)).await);
    let r = s.read16(0, 0, len / BLOCK, BLOCK).await.unwrap();
    assert_eq!(r.status, GOOD);
    assert!(r.data == data, "read back differs");
    assert_eq!(f.server.stats().data_out_timeouts.load(Relaxed), 0);
}

/// While the connection waits for the target's own resources (here a full I/O queue) it
/// reads nothing, so the Data-Out of a write sits unread in the socket: that time does
/// not count against the initiator.
#[tokio::test]
async fn data_out_held_up_by_the_targets_back_pressure_is_not_a_timeout() {
    let timeout = Duration::from_secs(1);
    // One thread and a window of 4: the queue holds 2 × 1 + 4 = 6 commands.
    let settings = ServerSettings {
        io_threads: 1,
        queue_depth: 4,
        data_out_timeout: timeout,
        ..Default::default()
    };
    let f = Fixture::start(settings, false).await;
    let mut a = f.login(1).await;
    let mut b = f.login(2).await;
    ready(&mut a).await;
    ready(&mut b).await;
    f.disk.close();
    for itt in 0x10..0x14 {
        let p = command(&mut b, itt, read16(u64::from(itt), 1), BLOCK, 0, false);
        b.send(&p).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A write waiting for its data, then three reads: the third is the seventh command
    // and waits for a place in the queue.
    let len: u32 = 4096;
    let data = vec![0xa5u8; len as usize];
    let p = command(&mut a, 0x20, write16(64, len / BLOCK), 0, len, false);
    a.send(&p).await.unwrap();
    let r2t = r2t_for(&mut a, 0x20).await;
    for itt in 0x21..0x24 {
        let p = command(&mut a, itt, read16(u64::from(itt), 1), BLOCK, 0, false);
        a.send(&p).await.unwrap();
    }
    let stats = f.server.stats();
    wait_for("a connection waiting for the I/O queue", || {
        stats.io_queue_waits.load(Relaxed) >= 1
    })
    .await;
    for d in data_outs(&a, 0x20, &r2t, &data, len as usize) {
        a.send(&d).await.unwrap();
    }
    tokio::time::sleep(timeout * 2).await;
    assert_eq!(stats.data_out_timeouts.load(Relaxed), 0);
    f.disk.open();
    let got_b = statuses(&mut b, 4).await;
    assert_eq!(got_b, (0x10..0x14).map(|i| (i, GOOD)).collect::<Vec<_>>());
    let got_a = statuses(&mut a, 4).await;
    assert_eq!(got_a, (0x20..0x24).map(|i| (i, GOOD)).collect::<Vec<_>>());
    assert_eq!(stats.data_out_timeouts.load(Relaxed), 0);
}

// ---- REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS ------------------------------------

/// TARGET RESET is reported supported (TRS, byte 0 bit 1) only where the target lets
/// initiators reset it; the other functions are reported either way.
#[tokio::test]
async fn reported_task_management_functions_follow_allow_target_reset() {
    for allow in [false, true] {
        let f = Fixture::start(ServerSettings::default(), allow).await;
        let mut s = f.login(1).await;
        ready(&mut s).await;
        // ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET; TARGET RESET.
        let expected = if allow { 0xda } else { 0xd8 };
        for (repd, alloc) in [(0x00u8, 4u8), (0x80, 16)] {
            let cdb = [0xa3, 0x0d, repd, 0, 0, 0, 0, 0, 0, alloc, 0, 0];
            let r = s.command(0, &cdb, None, u32::from(alloc)).await.unwrap();
            assert_eq!(r.status, GOOD, "allow_target_reset {allow}, REPD {repd:#x}");
            assert_eq!(r.data.len(), usize::from(alloc));
            assert_eq!(
                r.data[0], expected,
                "allow_target_reset {allow}, REPD {repd:#x}"
            );
        }
    }
}
