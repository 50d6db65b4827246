//! The login phase of a connection (RFC 7143 §6): the sans-IO negotiation of
//! `iscsi_proto::login` over the socket, admission by ACL and CHAP, session
//! reinstatement. Ends with what the full-feature phase starts from.

use super::*;

pub(super) struct Established {
    pub(super) params: SessionParams,
    pub(super) isid: [u8; 6],
    pub(super) tsih: u16,
    pub(super) stat_sn: u32,
    pub(super) exp_cmd_sn: u32,
    pub(super) target: Option<Arc<TargetConfig>>,
}

struct Policy<'a> {
    shared: &'a Shared,
    local: Option<SocketAddr>,
}

fn portal_matches(portal: SocketAddr, local: Option<SocketAddr>) -> bool {
    match local {
        None => true,
        Some(l) => {
            portal.port() == l.port() && (portal.ip().is_unspecified() || portal.ip() == l.ip())
        }
    }
}

impl LoginPolicy for Policy<'_> {
    fn admit(&self, initiator: &str, target: &str) -> Result<TargetAdmission, LoginStatus> {
        let t = self.shared.target(target).ok_or(LoginStatus::NOT_FOUND)?;
        let portal = t
            .portals
            .iter()
            .find(|p| portal_matches(p.addr, self.local))
            .ok_or(LoginStatus::NOT_FOUND)?;
        if !discovery::allowed(&t, initiator) {
            return Err(LoginStatus::AUTHORIZATION_FAILURE);
        }
        let auth = if t.chap.is_empty() {
            Authentication::None
        } else {
            Authentication::Chap(t.chap.clone())
        };
        Ok(TargetAdmission {
            auth,
            portal_group_tag: portal.group_tag,
            alias: t.alias.clone(),
        })
    }

    fn admit_discovery(&self, _initiator: &str) -> Result<TargetAdmission, LoginStatus> {
        let chap = &self.shared.settings.discovery_chap;
        let auth = if chap.is_empty() {
            Authentication::None
        } else {
            Authentication::Chap(chap.clone())
        };
        Ok(TargetAdmission {
            auth,
            portal_group_tag: 1,
            alias: None,
        })
    }
}

pub(super) async fn login_phase(
    shared: &Shared,
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    local: Option<SocketAddr>,
) -> Result<Option<Established>, ReadError> {
    let mut neg = LoginNegotiator::new(shared.settings.limits.clone());
    let policy = Policy { shared, local };
    let mut stat_sn: u32 = initial_stat_sn();
    let mut first = true;
    loop {
        let bhs = wire::read_header(rd, Digests::default()).await?;
        if bhs.opcode() != Ok(Opcode::LoginRequest) {
            shared.stats.login_failed("protocol error");
            warn!(
                opcode = bhs.opcode_raw(),
                "PDU other than Login Request before login completed; closing"
            );
            return Ok(None);
        }
        let (data, _) =
            wire::read_data(rd, bhs.data_len(), LOGIN_TEXT_MAX, Digests::default()).await?;
        let req = Login::parse(&bhs);
        if first && req.tsih != 0 {
            // Adding a connection to an existing session (MC/S) is not offered.
            let status = if shared.session_exists_with_tsih(req.tsih) {
                LoginStatus::TOO_MANY_CONNECTIONS
            } else {
                LoginStatus::SESSION_DOES_NOT_EXIST
            };
            send_login_failure(shared, wr, &req, stat_sn, status).await?;
            return Ok(None);
        }
        first = false;
        let reply = neg.step(&req, &data, &policy, &mut OsChallenges);
        let established = reply.established.is_some();
        if let Some(p) = reply
            .established
            .as_ref()
            .filter(|p| p.session_type == SessionType::Normal)
        {
            // Session reinstatement (RFC 7143 §6.3.5): the old session with this ISID
            // must be gone, its tasks ended, before the new one is acknowledged —
            // otherwise a write still running there could land over a retry.
            let key: SessionKey = (
                p.initiator_name.clone(),
                req.isid,
                p.target_name.clone().unwrap_or_default(),
            );
            if !shared.end_session(&key, REINSTATEMENT_WAIT_MAX).await {
                send_login_failure(shared, wr, &req, stat_sn, LoginStatus::SERVICE_UNAVAILABLE)
                    .await?;
                return Ok(None);
            }
        }
        let tsih = if established {
            shared.allocate_tsih()
        } else {
            req.tsih
        };
        let header = Login {
            isid: req.isid,
            itt: req.itt,
            tsih,
            version_max: 0,
            version_min: 0,
            seq: StatusSeq {
                stat_sn,
                exp_cmd_sn: req.seq.stat_sn,
                max_cmd_sn: req
                    .seq
                    .stat_sn
                    .wrapping_add(shared.settings.queue_depth.max(1) - 1),
            },
            ..reply.header.clone()
        };
        let pdu = iscsi_proto::pdu::Pdu::LoginResponse(header, Bytes::from(reply.text.encode()));
        wr.write_all(&pdu.to_wire(false, false)).await?;
        stat_sn = stat_sn.wrapping_add(1);
        if reply.failed() {
            let status = LoginStatus {
                class: reply.header.status_class,
                detail: reply.header.status_detail,
            };
            let p = neg.params();
            if let Some(bad) = neg.refused_name() {
                // The name came from the network and failed the checks: it is shown
                // escaped and cut (a newline in it must not forge a log line).
                shared.stats.login_failed("bad iSCSI name");
                warn!(
                    key = bad.key,
                    name = %Loggable(&bad.name),
                    error = %bad.error,
                    reason = status.reason(),
                    "login refused: not an iSCSI name"
                );
            } else {
                shared.stats.login_failed(status.reason());
                warn!(
                    initiator = %Loggable(&p.initiator_name),
                    target = %Loggable(p.target_name.as_deref().unwrap_or("-")),
                    reason = status.reason(),
                    "login refused"
                );
            }
            let _ = wr.flush().await;
            return Ok(None);
        }
        if let Some(params) = reply.established {
            let target = params.target_name.as_deref().and_then(|n| shared.target(n));
            if params.session_type == SessionType::Normal && target.is_none() {
                return Ok(None);
            }
            return Ok(Some(Established {
                params,
                isid: req.isid,
                tsih,
                stat_sn,
                exp_cmd_sn: req.seq.stat_sn,
                target,
            }));
        }
    }
}

async fn send_login_failure(
    shared: &Shared,
    wr: &mut OwnedWriteHalf,
    req: &Login,
    stat_sn: u32,
    status: LoginStatus,
) -> Result<(), ReadError> {
    shared.stats.login_failed(status.reason());
    warn!(reason = status.reason(), tsih = req.tsih, "login refused");
    let header = Login {
        csg: req.csg,
        nsg: req.nsg,
        isid: req.isid,
        itt: req.itt,
        tsih: req.tsih,
        seq: StatusSeq {
            stat_sn,
            exp_cmd_sn: req.seq.stat_sn,
            max_cmd_sn: req.seq.stat_sn,
        },
        status_class: status.class,
        status_detail: status.detail,
        ..Default::default()
    };
    let pdu = iscsi_proto::pdu::Pdu::LoginResponse(header, Bytes::new());
    wr.write_all(&pdu.to_wire(false, false)).await?;
    Ok(())
}

/// The first StatSN of a connection: random (RFC 7143 §4.2.2.2 leaves it to the target),
/// so a stale response from an earlier connection cannot pass for a current one. The top
/// byte stays clear, as it always has here: numbers read more easily in traces.
fn initial_stat_sn() -> u32 {
    rand::random::<u32>() & 0x00ff_ffff
}
