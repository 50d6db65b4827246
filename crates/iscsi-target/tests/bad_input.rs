//! The target against hostile and broken initiators (RFC 7143 error handling): each case
//! gets the Reject, login status or connection drop the RFC names, and never disturbs
//! another session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use initiator::{InitiatorError, LoginOptions, Session};
use iscsi_proto::pdu::{Bhs, DataOut, Lun, Nop, Pdu, ScsiCommand, StatusSeq, RESERVED_TAG};
use iscsi_target::{Portal, Server, ServerSettings, TargetConfig};
use scsi::testing::MemDevice;

const IQN: &str = "iqn.2026-11.io.bulwark:test";
const INITIATOR: &str = "iqn.2026-11.io.example:tester";

async fn start(settings: ServerSettings) -> (Server, SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let server = Server::new(settings);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let device = Arc::new(scsi::TargetDevice::new());
    device
        .add_lun(
            0,
            scsi::LuConfig::default(),
            Arc::new(MemDevice::new(16 << 20)),
        )
        .unwrap();
    server.set_target(TargetConfig {
        name: IQN.into(),
        alias: None,
        device,
        portals: vec![Portal { addr, group_tag: 1 }],
        remote_portals: Vec::new(),
        allowed_initiators: None,
        chap: Vec::new(),
        allow_target_reset: false,
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    tokio::spawn(async move {
        s.serve(vec![listener], async {
            let _ = rx.await;
        })
        .await
    });
    (server, addr, tx)
}

async fn login(addr: SocketAddr) -> Session {
    Session::login(addr, &LoginOptions::new(INITIATOR, Some(IQN)))
        .await
        .unwrap()
}

/// TEST UNIT READY until the power-on unit attention is consumed; then GOOD.
async fn ready(s: &mut Session) {
    for _ in 0..3 {
        let r = s.command(0, &[0u8; 6], None, 0).await.unwrap();
        if r.status == 0 {
            return;
        }
    }
    panic!("TEST UNIT READY never returned GOOD");
}

#[tokio::test]
async fn write_read_roundtrip_and_logout() {
    let (_srv, addr, _stop) = start(ServerSettings::default()).await;
    let mut s = login(addr).await;
    ready(&mut s).await;
    // 300 KiB: immediate data plus R2T-solicited bursts.
    let data: Vec<u8> = (0..300 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let w = s.write16(0, 8, &data, 512, true).await.unwrap();
    assert_eq!(w.status, 0);
    let r = s
        .read16(0, 8, (data.len() / 512) as u32, 512)
        .await
        .unwrap();
    assert_eq!(r.status, 0);
    assert!(r.data == data, "read back differs");
    s.logout().await.unwrap();
}

#[tokio::test]
async fn unknown_opcode_is_rejected_and_session_continues() {
    let (_srv, addr, _stop) = start(ServerSettings::default()).await;
    let mut s = login(addr).await;
    ready(&mut s).await;
    let mut bhs = Bhs::default();
    bhs.0[0] = 0x1c; // not an initiator opcode
    bhs.0[1] = 0x80;
    s.send_raw(&bhs.0).await.unwrap();
    match s.recv().await.unwrap() {
        Pdu::Reject(r, data) => {
            assert_eq!(r.reason, iscsi_proto::pdu::reject::COMMAND_NOT_SUPPORTED);
            assert_eq!(&data[..], &bhs.0[..], "Reject carries the rejected header");
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    ready(&mut s).await;
}

#[tokio::test]
async fn cmdsn_outside_window_is_ignored() {
    let (_srv, addr, _stop) = start(ServerSettings {
        queue_depth: 8,
        ..Default::default()
    })
    .await;
    let mut s = login(addr).await;
    ready(&mut s).await;
    let cmd = ScsiCommand {
        final_bit: true,
        itt: 0x777,
        cmd_sn: s.take_cmd_sn().wrapping_add(1000),
        exp_stat_sn: s.exp_stat_sn(),
        ..Default::default()
    };
    s.send(&Pdu::ScsiCommand(cmd, Bytes::new())).await.unwrap();
    match s.recv_within(Duration::from_millis(500)).await {
        Err(InitiatorError::Timeout) => {}
        other => panic!("a command outside the window must be ignored, got {other:?}"),
    }
    // The skipped CmdSN was never consumed by the target: reuse it.
    let mut s2 = s;
    let cmd = ScsiCommand {
        final_bit: true,
        itt: 0x778,
        cmd_sn: s2.take_cmd_sn().wrapping_sub(1),
        exp_stat_sn: s2.exp_stat_sn(),
        ..Default::default()
    };
    s2.send(&Pdu::ScsiCommand(cmd, Bytes::new())).await.unwrap();
    match s2.recv().await.unwrap() {
        Pdu::ScsiResponse(r, _) => assert_eq!((r.itt, r.status), (0x778, 0)),
        other => panic!("expected a response, got {other:?}"),
    }
}

#[tokio::test]
async fn data_segment_beyond_max_recv_drops_connection_only() {
    let (_srv, addr, _stop) = start(ServerSettings::default()).await;
    let mut bystander = login(addr).await;
    ready(&mut bystander).await;
    let mut s = Session::login(
        addr,
        &LoginOptions {
            isid: [0x80, 0, 0, 0, 0, 9],
            ..LoginOptions::new(INITIATOR, Some(IQN))
        },
    )
    .await
    .unwrap();
    let huge = vec![0u8; 2 << 20];
    let nop = Nop {
        itt: 5,
        ttt: RESERVED_TAG,
        seq: StatusSeq {
            stat_sn: s.take_cmd_sn(),
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
        },
        ..Default::default()
    };
    s.send(&Pdu::NopOut(nop, Bytes::from(huge))).await.ok();
    assert!(
        s.closed_within(Duration::from_secs(5)).await,
        "connection must be dropped"
    );
    ready(&mut bystander).await;
}

#[tokio::test]
async fn data_out_for_unknown_task_is_discarded() {
    let (_srv, addr, _stop) = start(ServerSettings::default()).await;
    let mut s = login(addr).await;
    ready(&mut s).await;
    let d = DataOut {
        final_bit: true,
        lun: Lun(0).to_field(),
        itt: 0xdead,
        ttt: RESERVED_TAG,
        exp_stat_sn: s.exp_stat_sn(),
        data_sn: 0,
        buffer_offset: 0,
    };
    s.send(&Pdu::DataOut(d, Bytes::from(vec![1u8; 512])))
        .await
        .unwrap();
    ready(&mut s).await;
}

#[tokio::test]
async fn login_that_never_finishes_is_dropped() {
    let settings = ServerSettings {
        login_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (srv, addr, _stop) = start(settings).await;
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
    )
    .await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "idle login must be closed: {r:?}"
    );
    assert!(
        srv.stats()
            .login_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_and_service_continues() {
    let settings = ServerSettings {
        max_connections: 50,
        ..Default::default()
    };
    let (srv, addr, _stop) = start(settings).await;
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(c) = tokio::net::TcpStream::connect(addr).await {
            held.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        srv.stats()
            .connections_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 100
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = login(addr).await;
    ready(&mut s).await;
}

#[tokio::test]
async fn dead_initiator_is_dropped_after_nop_timeout() {
    let settings = ServerSettings {
        nop_interval: Duration::from_millis(100),
        nop_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (_srv, addr, _stop) = start(settings).await;
    let mut s = login(addr).await;
    // Never answer: the target pings, then gives up.
    match s.recv_within(Duration::from_secs(2)).await.unwrap() {
        Pdu::NopIn(h, _) => assert_ne!(h.ttt, RESERVED_TAG, "a ping carries a target transfer tag"),
        other => panic!("expected a NOP-In ping, got {other:?}"),
    }
    assert!(
        s.closed_within(Duration::from_secs(3)).await,
        "unanswered pings must drop the connection"
    );
}

#[tokio::test]
async fn session_reinstatement_closes_the_old_connection() {
    let (srv, addr, _stop) = start(ServerSettings::default()).await;
    let mut old = login(addr).await;
    ready(&mut old).await;
    let mut new = login(addr).await;
    ready(&mut new).await;
    assert!(
        old.closed_within(Duration::from_secs(5)).await,
        "the old connection of the same ISID must be closed"
    );
    assert_eq!(srv.sessions().len(), 1);
}

#[tokio::test]
async fn header_digest_error_drops_the_connection() {
    let (_srv, addr, _stop) = start(ServerSettings::default()).await;
    let mut s = Session::login(
        addr,
        &LoginOptions {
            digests: true,
            ..LoginOptions::new(INITIATOR, Some(IQN))
        },
    )
    .await
    .unwrap();
    assert_eq!(s.negotiated.get("HeaderDigest"), Some("CRC32C"));
    ready(&mut s).await;
    let cmd = ScsiCommand {
        final_bit: true,
        itt: 9,
        cmd_sn: s.take_cmd_sn(),
        ..Default::default()
    };
    let mut wire = Pdu::ScsiCommand(cmd, Bytes::new()).to_wire(true, true);
    wire[48] ^= 0xff; // corrupt the header digest
    s.send_raw(&wire).await.unwrap();
    assert!(s.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn discovery_lists_the_portal_with_its_tag() {
    let (_srv, addr, _stop) = start(ServerSettings::default()).await;
    let mut s = Session::login(addr, &LoginOptions::new(INITIATOR, None))
        .await
        .unwrap();
    let targets = s.send_targets().await.unwrap();
    assert_eq!(targets, vec![(IQN.to_string(), vec![format!("{addr},1")])]);
}

#[tokio::test]
async fn writes_waiting_for_data_are_bounded_per_session() {
    let (_srv, addr, _stop) = start(ServerSettings::default()).await;
    let mut s = login(addr).await;
    ready(&mut s).await;
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a; // WRITE(16) of 131072 blocks = 64 MiB, data never sent
    cdb[10..14].copy_from_slice(&131_072u32.to_be_bytes());
    let mut statuses = Vec::new();
    for itt in 100..106u32 {
        let cmd = ScsiCommand {
            final_bit: true,
            write: true,
            itt,
            expected_data_transfer_length: 64 << 20,
            cmd_sn: s.take_cmd_sn(),
            exp_stat_sn: s.exp_stat_sn(),
            cdb,
            ..Default::default()
        };
        s.send(&Pdu::ScsiCommand(cmd, Bytes::new())).await.unwrap();
    }
    // Four 64 MiB buffers fit the 256 MiB bound; the fifth and sixth get TASK SET FULL.
    while let Ok(p) = s.recv_within(Duration::from_millis(500)).await {
        if let Pdu::ScsiResponse(r, _) = p {
            statuses.push((r.itt, r.status));
        }
    }
    assert_eq!(statuses, vec![(104, 0x28), (105, 0x28)]);
}
