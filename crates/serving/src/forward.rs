//! Active/non-optimized paths: a node that holds an in-sync replica of a target's
//! volumes serves the target too, and forwards every command over the replication link
//! to the primary, which executes it for the I_T nexus it arrived on (DESIGN.md, "ALUA
//! and paths"). Reservations, unit attentions and access states are therefore decided
//! in one place, for every path.
//!
//! Wire form (the body of a replication forwarding frame): a kind byte, then for a
//! command the nexus, LUN, task attribute, expected Data-In length, CDB and Data-Out;
//! the answer is the status, the sense and the Data-In. Task management carries its
//! function and is answered with an empty body once done.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use replication::net::{
    ForwardBody, ForwardHandler, ForwardReply, ReplicationNet, FORWARD_TIMEOUT,
};
use replication::NodeId;
use scsi::{
    ForwardedCommand, ForwardedTaskManagement, ItNexus, ResetKind, ScsiResponse, ScsiStatus, Sense,
    TargetPort, TaskAttribute,
};

const COMMAND: u8 = 1;
const TASK_MANAGEMENT: u8 = 2;

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad forwarded command: {what}"),
    )
}

fn put_str(b: &mut BytesMut, s: &str) {
    let bytes = s
        .as_bytes()
        .get(..usize::from(u16::MAX))
        .unwrap_or(s.as_bytes());
    b.put_u16(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
    b.put_slice(bytes);
}

fn get_bytes(b: &mut Bytes, n: usize) -> io::Result<Bytes> {
    if b.remaining() < n {
        return Err(bad("short"));
    }
    Ok(b.split_to(n))
}

fn get_str(b: &mut Bytes) -> io::Result<String> {
    let n = usize::from(get_u16(b)?);
    String::from_utf8(get_bytes(b, n)?.to_vec()).map_err(|_| bad("name"))
}

fn get_u8(b: &mut Bytes) -> io::Result<u8> {
    Ok(get_bytes(b, 1)?.get_u8())
}

fn get_u16(b: &mut Bytes) -> io::Result<u16> {
    Ok(get_bytes(b, 2)?.get_u16())
}

fn get_u32(b: &mut Bytes) -> io::Result<u32> {
    Ok(get_bytes(b, 4)?.get_u32())
}

fn get_u64(b: &mut Bytes) -> io::Result<u64> {
    Ok(get_bytes(b, 8)?.get_u64())
}

fn put_nexus(b: &mut BytesMut, n: &ItNexus) {
    put_str(b, &n.initiator_name);
    b.put_slice(&n.isid);
    put_str(b, &n.target_port.name);
    b.put_u16(n.target_port.relative_id);
    b.put_u16(n.target_port.group);
}

fn get_nexus(b: &mut Bytes) -> io::Result<ItNexus> {
    let initiator_name = get_str(b)?;
    let mut isid = [0u8; 6];
    get_bytes(b, 6)?.copy_to_slice(&mut isid);
    let name = get_str(b)?;
    Ok(ItNexus {
        initiator_name,
        isid,
        target_port: TargetPort {
            name,
            relative_id: get_u16(b)?,
            group: get_u16(b)?,
        },
    })
}

fn attr_code(a: TaskAttribute) -> u8 {
    match a {
        TaskAttribute::Simple => 0,
        TaskAttribute::Ordered => 1,
        TaskAttribute::HeadOfQueue => 2,
        TaskAttribute::Aca => 3,
        TaskAttribute::Untagged => 4,
    }
}

fn attr_of(c: u8) -> TaskAttribute {
    match c {
        1 => TaskAttribute::Ordered,
        2 => TaskAttribute::HeadOfQueue,
        3 => TaskAttribute::Aca,
        4 => TaskAttribute::Untagged,
        _ => TaskAttribute::Simple,
    }
}

/// Encodes a command; the Data-Out follows the head uncopied.
pub fn encode_command(c: &ForwardedCommand) -> ForwardBody {
    let mut b = BytesMut::with_capacity(96 + c.cdb.len());
    b.put_u8(COMMAND);
    put_nexus(&mut b, &c.nexus);
    b.put_u64(c.lun);
    b.put_u8(attr_code(c.attr));
    b.put_u32(c.expected_data_in_len);
    let cdb = c.cdb.get(..usize::from(u8::MAX)).unwrap_or(&c.cdb);
    b.put_u8(u8::try_from(cdb.len()).unwrap_or(u8::MAX));
    b.put_slice(cdb);
    ForwardBody {
        head: b.freeze(),
        data: c.data_out.clone(),
    }
}

/// Encodes task management.
pub fn encode_task_management(t: &ForwardedTaskManagement) -> Bytes {
    let mut b = BytesMut::with_capacity(96);
    b.put_u8(TASK_MANAGEMENT);
    match t {
        ForwardedTaskManagement::Reset { kind, lun, by } => {
            b.put_u8(match kind {
                ResetKind::LogicalUnit => 1,
                ResetKind::TargetWarm => 2,
                ResetKind::TargetCold => 3,
            });
            b.put_u64(lun.map_or(u64::MAX, |l| l));
            put_nexus(&mut b, by);
        }
        ForwardedTaskManagement::AbortTasks { lun, nexus } => {
            b.put_u8(4);
            b.put_u64(*lun);
            b.put_u8(u8::from(nexus.is_some()));
            if let Some(n) = nexus {
                put_nexus(&mut b, n);
            }
        }
        ForwardedTaskManagement::NexusLoss(n) => {
            b.put_u8(5);
            put_nexus(&mut b, n);
        }
    }
    b.freeze()
}

/// A decoded request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A SCSI command.
    Command(ForwardedCommand),
    /// Task management.
    TaskManagement(ForwardedTaskManagement),
}

/// Decodes a request body.
pub fn decode_request(mut b: Bytes) -> io::Result<Request> {
    match get_u8(&mut b)? {
        COMMAND => {
            let nexus = get_nexus(&mut b)?;
            let lun = get_u64(&mut b)?;
            let attr = attr_of(get_u8(&mut b)?);
            let expected_data_in_len = get_u32(&mut b)?;
            let n = usize::from(get_u8(&mut b)?);
            let cdb = get_bytes(&mut b, n)?;
            Ok(Request::Command(ForwardedCommand {
                nexus,
                lun,
                cdb,
                data_out: b,
                expected_data_in_len,
                attr,
                arrived: std::time::Instant::now(),
            }))
        }
        TASK_MANAGEMENT => {
            let t = match get_u8(&mut b)? {
                k @ 1..=3 => {
                    let lun = get_u64(&mut b)?;
                    ForwardedTaskManagement::Reset {
                        kind: match k {
                            1 => ResetKind::LogicalUnit,
                            2 => ResetKind::TargetWarm,
                            _ => ResetKind::TargetCold,
                        },
                        lun: (lun != u64::MAX).then_some(lun),
                        by: get_nexus(&mut b)?,
                    }
                }
                4 => {
                    let lun = get_u64(&mut b)?;
                    let nexus = if get_u8(&mut b)? != 0 {
                        Some(get_nexus(&mut b)?)
                    } else {
                        None
                    };
                    ForwardedTaskManagement::AbortTasks { lun, nexus }
                }
                5 => ForwardedTaskManagement::NexusLoss(get_nexus(&mut b)?),
                _ => return Err(bad("task management function")),
            };
            if b.has_remaining() {
                return Err(bad("trailing bytes"));
            }
            Ok(Request::TaskManagement(t))
        }
        _ => Err(bad("kind")),
    }
}

/// Encodes a command's response; the Data-In follows the head uncopied.
pub fn encode_response(r: &ScsiResponse) -> ForwardBody {
    let sense = r.sense.as_deref().unwrap_or(&[]);
    let mut b = BytesMut::with_capacity(8 + sense.len());
    b.put_u8(r.status as u8);
    b.put_u8(u8::from(r.sense.is_some()));
    let sense = sense.get(..usize::from(u16::MAX)).unwrap_or(sense);
    b.put_u16(u16::try_from(sense.len()).unwrap_or(u16::MAX));
    b.put_slice(sense);
    ForwardBody {
        head: b.freeze(),
        data: r.data_in.clone(),
    }
}

/// Decodes a command's response.
pub fn decode_response(mut b: Bytes) -> io::Result<ScsiResponse> {
    let status = match get_u8(&mut b)? {
        0x00 => ScsiStatus::Good,
        0x02 => ScsiStatus::CheckCondition,
        0x04 => ScsiStatus::ConditionMet,
        0x08 => ScsiStatus::Busy,
        0x18 => ScsiStatus::ReservationConflict,
        0x28 => ScsiStatus::TaskSetFull,
        0x30 => ScsiStatus::AcaActive,
        0x40 => ScsiStatus::TaskAborted,
        _ => return Err(bad("status")),
    };
    let has_sense = get_u8(&mut b)? != 0;
    let n = usize::from(get_u16(&mut b)?);
    let sense = get_bytes(&mut b, n)?;
    Ok(ScsiResponse {
        status,
        sense: has_sense.then_some(sense),
        data_in: b,
    })
}

/// What a forwarded command gets when the primary cannot be reached or answers
/// nonsense: the initiator retries, on this path or another (SPC-4 §5.15.2.5).
fn transitioning() -> ScsiResponse {
    scsi::check_condition(Sense::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION)
}

/// The forwarder of a target served here while `primary` executes its commands.
pub struct NetForwarder {
    /// The replication endpoint.
    net: Arc<ReplicationNet>,
    /// The primary.
    primary: NodeId,
    /// The target's name.
    target: String,
    /// Since when no forwarded command has reached the primary (`None`: the last did).
    failing_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// How long a TEST UNIT READY that cannot reach the primary still answers GOOD: a
/// failover completes within about a second; a primary unreachable for longer is not
/// coming back through this path soon, and the path checker should drop the path.
const TUR_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

impl NetForwarder {
    /// Forwards `target`'s commands to `primary` through `net`.
    pub fn new(net: Arc<ReplicationNet>, primary: NodeId, target: String) -> NetForwarder {
        NetForwarder {
            net,
            primary,
            target,
            failing_since: Arc::default(),
        }
    }
}

impl std::fmt::Debug for NetForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetForwarder")
            .field("primary", &self.primary)
            .field("target", &self.target)
            .finish()
    }
}

/// TEST UNIT READY.
const TEST_UNIT_READY: u8 = 0x00;

impl scsi::Forwarder for NetForwarder {
    fn execute(&self, cmd: ForwardedCommand, respond: scsi::Responder) {
        // A TEST UNIT READY that cannot reach the primary answers GOOD for a while (see
        // TUR_GRACE): it is how multipathd's `tur` checker tells a live path from a
        // dead one, and it counts NOT READY, ASYMMETRIC ACCESS STATE TRANSITION as
        // dead. This path is fine; the primary is changing (a failover completes
        // within a second, and the commands meanwhile get the transition sense, which
        // Linux's ALUA handler retries). Failing it would keep the path out until a
        // check after the failover: the kernel-initiator harness measured 3.1 s
        // instead of 1.1 s.
        let tur = cmd.cdb.first() == Some(&TEST_UNIT_READY);
        let failing_since = self.failing_since.clone();
        self.net.forward(
            self.primary,
            &self.target,
            encode_command(&cmd),
            Box::new(move |answer| {
                let decoded = answer.and_then(|b| decode_response(b).ok());
                let failing_for = {
                    let mut since = failing_since.lock().unwrap_or_else(|e| e.into_inner());
                    match (&decoded, *since) {
                        (Some(_), _) => {
                            *since = None;
                            std::time::Duration::ZERO
                        }
                        (None, Some(t)) => t.elapsed(),
                        (None, None) => {
                            *since = Some(std::time::Instant::now());
                            std::time::Duration::ZERO
                        }
                    }
                };
                let r = decoded.unwrap_or_else(|| {
                    if tur && failing_for < TUR_GRACE {
                        ScsiResponse {
                            status: ScsiStatus::Good,
                            sense: None,
                            data_in: Bytes::new(),
                        }
                    } else {
                        transitioning()
                    }
                });
                respond.send(r);
            }),
        );
    }

    fn task_management(&self, tmf: ForwardedTaskManagement) {
        let wait = !matches!(tmf, ForwardedTaskManagement::AbortTasks { .. });
        let (tx, rx) = std::sync::mpsc::channel();
        self.net.forward(
            self.primary,
            &self.target,
            encode_task_management(&tmf),
            Box::new(move |answer| {
                let _ = tx.send(answer.is_some());
            }),
        );
        // Aborts are called from the connection's task and must not block it; the
        // others run on a blocking thread and complete once the primary has them.
        if wait && !matches!(rx.recv_timeout(FORWARD_TIMEOUT), Ok(true)) {
            tracing::warn!(target = %self.target, ?tmf, "forwarded task management not confirmed");
        }
    }
}

/// SANITIZE (SBC-4 §5.30): runs as long as the whole operation when IMMED=0.
const SANITIZE: u8 = 0x48;

/// Looks up the target device that executes a target's commands here (this node is
/// its primary), or `None`.
pub type DeviceLookup = dyn Fn(&str) -> Option<Arc<scsi::TargetDevice>> + Send + Sync;

/// Executes commands forwarded to this node.
pub struct ForwardServer {
    /// The targets this node executes.
    pub lookup: Box<DeviceLookup>,
    /// The iSCSI server (to abort the tasks of preempted nexuses).
    pub server: iscsi_target::Server,
}

impl ForwardHandler for ForwardServer {
    fn request(&self, from: NodeId, target: String, body: Bytes, reply: ForwardReply) {
        let request = match decode_request(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(from = from.0, %target, error = %e, "undecodable forwarded command");
                return reply.send(encode_response(&transitioning()));
            }
        };
        let device = (self.lookup)(&target);
        let server = self.server.clone();
        let cmd = match request {
            Request::TaskManagement(t) => {
                // Applied in arrival order, here: it only takes the units' locks, and a
                // command that came after it (a new session of the same initiator port
                // after a nexus loss) must find it done.
                match (&device, &t) {
                    // This node executes the target: a forwarding node's task management.
                    (Some(device), _) => device.apply_task_management(&t),
                    // This node forwards: the primary tells it to abort the tasks of a
                    // nexus that PREEMPT AND ABORT preempted.
                    (
                        None,
                        ForwardedTaskManagement::AbortTasks {
                            lun,
                            nexus: Some(n),
                        },
                    ) => {
                        let aborted = server.abort_preempted(&target, n, *lun);
                        tracing::info!(lun, initiator = %n.initiator_port_name(), aborted, "PREEMPT AND ABORT on another node");
                    }
                    _ => {}
                }
                if let ForwardedTaskManagement::Reset {
                    kind: ResetKind::TargetCold,
                    ..
                } = t
                {
                    // RFC 7143 §11.5.1: a cold reset ends the target's sessions, on every
                    // node (the one it came through ends its own).
                    server.kill_target_sessions(&target);
                }
                return reply.send(Bytes::new());
            }
            Request::Command(cmd) => cmd,
        };
        let Some(device) = device else {
            return reply.send(encode_response(&transitioning()));
        };
        let prout = cmd.cdb.first() == Some(&0x5F);
        let (d, for_prout) = (device.clone(), server.clone());
        let respond = scsi::Responder::new(move |r: ScsiResponse| {
            if prout && r.status == ScsiStatus::Good {
                for_prout.abort_preempted_tasks(&target, &d);
            }
            reply.send(encode_response(&r));
        });
        // A small READ of data in memory is answered here, on the link's task, as the
        // local sessions' are (iscsi-target's dispatch): no hand-off to an I/O thread.
        let respond = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            device.try_execute_cached(&cmd.request(), respond)
        })) {
            Ok(Err(respond)) => respond,
            Ok(Ok(())) => return,
            // The responder, dropped, answered HARDWARE ERROR.
            Err(_) => {
                tracing::error!(cdb = ?cmd.cdb, "SCSI command handler panicked on a forwarded command");
                return;
            }
        };
        // Commands block on the disk: never on the link's task. They run on the I/O pool
        // of the local sessions' commands, inside its bound and its panic guard (a
        // dropped `Responder` answers HARDWARE ERROR).
        let pool = server;
        let sanitize = cmd.cdb.first() == Some(&SANITIZE);
        let job = move || device.execute_then(&cmd.request(), respond);
        if sanitize {
            // SANITIZE with IMMED=0 holds its thread until the whole operation ends; as
            // for local commands (iscsi-target's dispatch), it must not take one of the
            // I/O threads every other command needs.
            drop(tokio::task::spawn_blocking(job));
        } else if let Err(job) = pool.try_execute_on_io_pool(job) {
            // Every slot taken: wait for one on a task, not on the link's.
            tokio::spawn(async move { pool.execute_on_io_pool(job).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus() -> ItNexus {
        ItNexus {
            initiator_name: "iqn.1994-05.com.example:host".into(),
            isid: [0x80, 1, 2, 3, 4, 5],
            target_port: TargetPort {
                name: "iqn.t,t,0x0002".into(),
                relative_id: 2,
                group: 2,
            },
        }
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let c = ForwardedCommand {
            nexus: nexus(),
            lun: 3,
            cdb: Bytes::from_static(&[0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0]),
            data_out: Bytes::from(vec![7u8; 512]),
            expected_data_in_len: 0,
            attr: TaskAttribute::Ordered,
            arrived: std::time::Instant::now(),
        };
        // The Data-Out is sent as it came, not copied into the head.
        assert_eq!(encode_command(&c).data.as_ptr(), c.data_out.as_ptr());
        // The arrival time is the receiver's own: it does not travel.
        let Request::Command(mut d) = decode_request(encode_command(&c).to_bytes()).unwrap() else {
            panic!("not a command");
        };
        assert!(d.arrived >= c.arrived);
        d.arrived = c.arrived;
        assert_eq!(d, c);
        for t in [
            ForwardedTaskManagement::Reset {
                kind: ResetKind::LogicalUnit,
                lun: Some(0),
                by: nexus(),
            },
            ForwardedTaskManagement::Reset {
                kind: ResetKind::TargetCold,
                lun: None,
                by: nexus(),
            },
            ForwardedTaskManagement::AbortTasks {
                lun: 1,
                nexus: None,
            },
            ForwardedTaskManagement::NexusLoss(nexus()),
        ] {
            assert_eq!(
                decode_request(encode_task_management(&t)).unwrap(),
                Request::TaskManagement(t)
            );
        }
        let r = scsi::check_condition(Sense::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION);
        assert_eq!(decode_response(encode_response(&r).to_bytes()).unwrap(), r);
        let r = ScsiResponse {
            status: ScsiStatus::Good,
            sense: None,
            data_in: Bytes::from_static(b"data"),
        };
        assert_eq!(decode_response(encode_response(&r).to_bytes()).unwrap(), r);
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode_request(Bytes::from(b.clone()));
            let _ = decode_response(Bytes::from(b));
        }
    }
}
