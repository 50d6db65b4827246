//! Target side of the login phase (RFC 7143 §6.2, §13): security negotiation with CHAP
//! and operational parameter negotiation with the RFC's result functions.
//!
//! [`LoginNegotiator::step`] takes one login request (header and text) and returns the
//! response to send; the transport owns the socket, the session table and the TSIH.

use crate::chap;
use crate::name::{check_iscsi_name, NameError};
use crate::pdu::Login;
use crate::text::TextPairs;

/// Login stage codes (RFC 7143 §11.12.3).
pub mod stage {
    /// SecurityNegotiation.
    pub const SECURITY: u8 = 0;
    /// LoginOperationalNegotiation.
    pub const OPERATIONAL: u8 = 1;
    /// FullFeaturePhase.
    pub const FULL_FEATURE: u8 = 3;
}

/// Login status class and detail (RFC 7143 §11.13.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginStatus {
    /// Status-Class.
    pub class: u8,
    /// Status-Detail.
    pub detail: u8,
}

impl LoginStatus {
    /// Success.
    pub const SUCCESS: LoginStatus = LoginStatus {
        class: 0,
        detail: 0,
    };
    /// Initiator error (miscellaneous).
    pub const INITIATOR_ERROR: LoginStatus = LoginStatus {
        class: 2,
        detail: 0,
    };
    /// Authentication failure.
    pub const AUTH_FAILURE: LoginStatus = LoginStatus {
        class: 2,
        detail: 1,
    };
    /// Authorization failure (not allowed by the target's ACL).
    pub const AUTHORIZATION_FAILURE: LoginStatus = LoginStatus {
        class: 2,
        detail: 2,
    };
    /// Target not found.
    pub const NOT_FOUND: LoginStatus = LoginStatus {
        class: 2,
        detail: 3,
    };
    /// Target removed.
    pub const TARGET_REMOVED: LoginStatus = LoginStatus {
        class: 2,
        detail: 4,
    };
    /// Unsupported version.
    pub const UNSUPPORTED_VERSION: LoginStatus = LoginStatus {
        class: 2,
        detail: 5,
    };
    /// Too many connections.
    pub const TOO_MANY_CONNECTIONS: LoginStatus = LoginStatus {
        class: 2,
        detail: 6,
    };
    /// Missing parameter.
    pub const MISSING_PARAMETER: LoginStatus = LoginStatus {
        class: 2,
        detail: 7,
    };
    /// Can't include in session.
    pub const CANT_INCLUDE_IN_SESSION: LoginStatus = LoginStatus {
        class: 2,
        detail: 8,
    };
    /// Session type not supported.
    pub const SESSION_TYPE_NOT_SUPPORTED: LoginStatus = LoginStatus {
        class: 2,
        detail: 9,
    };
    /// Session does not exist.
    pub const SESSION_DOES_NOT_EXIST: LoginStatus = LoginStatus {
        class: 2,
        detail: 10,
    };
    /// Invalid request during login.
    pub const INVALID_DURING_LOGIN: LoginStatus = LoginStatus {
        class: 2,
        detail: 11,
    };
    /// Target error.
    pub const TARGET_ERROR: LoginStatus = LoginStatus {
        class: 3,
        detail: 0,
    };
    /// Service unavailable.
    pub const SERVICE_UNAVAILABLE: LoginStatus = LoginStatus {
        class: 3,
        detail: 1,
    };
    /// Out of resources.
    pub const OUT_OF_RESOURCES: LoginStatus = LoginStatus {
        class: 3,
        detail: 2,
    };

    /// A short reason for logs and metrics.
    pub fn reason(self) -> &'static str {
        match (self.class, self.detail) {
            (0, _) => "success",
            (2, 1) => "authentication failed",
            (2, 2) => "not authorized",
            (2, 3) => "target not found",
            (2, 4) => "target removed",
            (2, 5) => "unsupported version",
            (2, 6) => "too many connections",
            (2, 7) => "missing parameter",
            (2, 8) => "can't include in session",
            (2, 9) => "session type not supported",
            (2, 10) => "session does not exist",
            (2, 11) => "invalid during login",
            (2, _) => "initiator error",
            (3, 1) => "service unavailable",
            (3, 2) => "out of resources",
            _ => "target error",
        }
    }
}

/// Discovery or normal session (RFC 7143 §13.21).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SessionType {
    /// SendTargets only.
    Discovery,
    /// SCSI I/O.
    #[default]
    Normal,
}

/// A CHAP account (RFC 7143 §12.1.3). Mutual CHAP adds the secret the target proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapAccount {
    /// CHAP_N the initiator sends.
    pub user: String,
    /// Secret the initiator proves.
    pub secret: String,
    /// For mutual CHAP: the name and secret the target answers with.
    pub mutual: Option<(String, String)>,
}

/// What the target requires of an initiator.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Authentication {
    /// AuthMethod=None is accepted.
    #[default]
    None,
    /// CHAP is required with one of these accounts.
    Chap(Vec<ChapAccount>),
}

/// The answer of the transport's policy to a login for a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetAdmission {
    /// Authentication required.
    pub auth: Authentication,
    /// The TargetPortalGroupTag of the portal the connection came in on.
    pub portal_group_tag: u16,
    /// TargetAlias to declare, if any.
    pub alias: Option<String>,
}

/// The transport's view of its targets, asked once the initiator names itself.
pub trait LoginPolicy {
    /// Admission of `initiator` to `target` (a normal session), or the status to refuse
    /// with (target not found, not authorized by ACL, ...).
    fn admit(&self, initiator: &str, target: &str) -> Result<TargetAdmission, LoginStatus>;
    /// Admission to a discovery session.
    fn admit_discovery(&self, initiator: &str) -> Result<TargetAdmission, LoginStatus>;
}

/// What the target offers and accepts in operational negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetLimits {
    /// MaxRecvDataSegmentLength the target declares (what it can receive).
    pub max_recv_data_segment_length: u32,
    /// Largest MaxBurstLength accepted.
    pub max_burst_length: u32,
    /// Largest FirstBurstLength accepted.
    pub first_burst_length: u32,
    /// Largest MaxOutstandingR2T accepted.
    pub max_outstanding_r2t: u32,
    /// Whether ImmediateData=Yes is accepted.
    pub immediate_data: bool,
    /// Whether the target insists on InitialR2T=Yes.
    pub initial_r2t: bool,
    /// Whether CRC32C digests are accepted.
    pub digests: bool,
}

impl Default for TargetLimits {
    fn default() -> Self {
        TargetLimits {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            max_outstanding_r2t: 8,
            immediate_data: true,
            initial_r2t: false,
            digests: true,
        }
    }
}

/// The operational parameters in force after login (RFC 7143 §13 defaults until changed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    /// Discovery or normal.
    pub session_type: SessionType,
    /// InitiatorName.
    pub initiator_name: String,
    /// InitiatorAlias.
    pub initiator_alias: Option<String>,
    /// TargetName (normal sessions).
    pub target_name: Option<String>,
    /// TargetPortalGroupTag of the login portal.
    pub portal_group_tag: u16,
    /// HeaderDigest=CRC32C.
    pub header_digest: bool,
    /// DataDigest=CRC32C.
    pub data_digest: bool,
    /// MaxConnections.
    pub max_connections: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxRecvDataSegmentLength declared by the target (largest PDU data it receives).
    pub max_recv_data_segment_length: u32,
    /// MaxRecvDataSegmentLength declared by the initiator (largest PDU data we may send).
    pub max_xmit_data_segment_length: u32,
    /// MaxBurstLength.
    pub max_burst_length: u32,
    /// FirstBurstLength.
    pub first_burst_length: u32,
    /// DefaultTime2Wait.
    pub default_time2wait: u32,
    /// DefaultTime2Retain.
    pub default_time2retain: u32,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u32,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            target_name: None,
            portal_group_tag: 1,
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_recv_data_segment_length: 8192,
            max_xmit_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// The response the transport sends for one login request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginReply {
    /// Header fields: transit, csg, nsg, status (ISID, ITT, TSIH and sequence numbers are
    /// filled in by the transport).
    pub header: Login,
    /// Text of the response.
    pub text: TextPairs,
    /// Set when this reply moves the connection to full feature phase.
    pub established: Option<SessionParams>,
}

impl LoginReply {
    /// Whether the login failed (the transport closes the connection after sending it).
    pub fn failed(&self) -> bool {
        self.header.status_class != 0
    }
}

/// A login refused because a name in it is not an iSCSI name (see
/// [`LoginNegotiator::refused_name`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedName {
    /// The key that carried it: `InitiatorName` or `TargetName`.
    pub key: &'static str,
    /// The name as the initiator sent it: untrusted, log it only through
    /// [`crate::name::Loggable`].
    pub name: String,
    /// What is wrong with it.
    pub error: NameError,
}

#[derive(Debug, PartialEq, Eq)]
enum ChapState {
    /// No CHAP exchange begun.
    Idle,
    /// AuthMethod=CHAP chosen; waiting for CHAP_A.
    ExpectAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ExpectResponse { id: u8, challenge: [u8; 16] },
    /// Authenticated.
    Done,
}

/// Target-side login state for one connection.
#[derive(Debug)]
pub struct LoginNegotiator {
    limits: TargetLimits,
    params: SessionParams,
    admission: Option<TargetAdmission>,
    chap: ChapState,
    current_stage: u8,
    first_request: bool,
    declared_mrdsl: bool,
    isid: [u8; 6],
    tsih: u16,
    pending_text: Vec<u8>,
    /// Keys negotiated once already (a repeated key is a protocol error, RFC 7143 §6.2).
    seen: Vec<String>,
    /// Set when the login was refused for a malformed name.
    refused_name: Option<RefusedName>,
}

/// The challenge source: random bytes for CHAP_I and CHAP_C.
pub trait ChallengeSource {
    /// Fills `buf` with unpredictable bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

/// Challenges from the operating system's CSPRNG via `rand`.
#[derive(Debug, Default)]
pub struct OsChallenges;

impl ChallengeSource for OsChallenges {
    fn fill(&mut self, buf: &mut [u8]) {
        use rand::RngCore;
        rand::rngs::OsRng.fill_bytes(buf);
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn parse_num(v: &str, lo: u32, hi: u32) -> Option<u32> {
    let n: u32 = v.parse().ok()?;
    (lo..=hi).contains(&n).then_some(n)
}

impl LoginNegotiator {
    /// A new connection's login state.
    pub fn new(limits: TargetLimits) -> LoginNegotiator {
        LoginNegotiator {
            limits,
            params: SessionParams::default(),
            admission: None,
            chap: ChapState::Idle,
            current_stage: stage::SECURITY,
            first_request: true,
            declared_mrdsl: false,
            isid: [0; 6],
            tsih: 0,
            pending_text: Vec::new(),
            seen: Vec::new(),
            refused_name: None,
        }
    }

    /// The malformed name the login was refused for, if that is why it failed: the
    /// transport logs it (escaped) instead of the usual refusal line.
    pub fn refused_name(&self) -> Option<&RefusedName> {
        self.refused_name.as_ref()
    }

    /// Refuses a login for a name that is not an iSCSI name.
    fn refuse_name(&mut self, key: &'static str, name: &str, error: NameError) {
        self.refused_name = Some(RefusedName {
            key,
            name: name.to_string(),
            error,
        });
    }

    /// The ISID and TSIH of the first request (the session the initiator names).
    pub fn session_id(&self) -> ([u8; 6], u16) {
        (self.isid, self.tsih)
    }

    /// The parameters negotiated so far.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    fn fail(&self, req: &Login, status: LoginStatus) -> LoginReply {
        LoginReply {
            header: Login {
                transit: false,
                continue_bit: false,
                csg: req.csg,
                nsg: req.nsg,
                status_class: status.class,
                status_detail: status.detail,
                ..Default::default()
            },
            text: TextPairs::default(),
            established: None,
        }
    }

    /// Handles one login request.
    pub fn step(
        &mut self,
        req: &Login,
        data: &[u8],
        policy: &dyn LoginPolicy,
        rng: &mut dyn ChallengeSource,
    ) -> LoginReply {
        if self.first_request {
            self.first_request = false;
            self.isid = req.isid;
            self.tsih = req.tsih;
            // RFC 7143 §11.12.4: Version-max/min 0x00 is the only version.
            if req.version_min > 0 {
                return self.fail(req, LoginStatus::UNSUPPORTED_VERSION);
            }
        } else if req.isid != self.isid || req.tsih != self.tsih {
            return self.fail(req, LoginStatus::INITIATOR_ERROR);
        }
        // Stage checks (RFC 7143 §6.3): CSG must be the stage we are in or, from the
        // security stage, the operational stage the initiator moved to after a transit.
        if req.csg == 2 || req.nsg == 2 || (req.transit && req.nsg <= req.csg) {
            return self.fail(req, LoginStatus::INITIATOR_ERROR);
        }
        if req.csg < self.current_stage {
            return self.fail(req, LoginStatus::INITIATOR_ERROR);
        }
        // Text split over several PDUs with C=1 (RFC 7143 §6.2.1): answer with an empty
        // response until the last piece arrives.
        self.pending_text.extend_from_slice(data);
        if self.pending_text.len() > 64 * 1024 {
            return self.fail(req, LoginStatus::OUT_OF_RESOURCES);
        }
        if req.continue_bit {
            return LoginReply {
                header: Login {
                    csg: req.csg,
                    nsg: req.nsg,
                    ..Default::default()
                },
                text: TextPairs::default(),
                established: None,
            };
        }
        let text = std::mem::take(&mut self.pending_text);
        let pairs = match TextPairs::parse(&text) {
            Ok(p) => p,
            Err(_) => return self.fail(req, LoginStatus::INITIATOR_ERROR),
        };
        match self.step_pairs(req, &pairs, policy, rng) {
            Ok(reply) => reply,
            Err(status) => self.fail(req, status),
        }
    }

    fn step_pairs(
        &mut self,
        req: &Login,
        pairs: &TextPairs,
        policy: &dyn LoginPolicy,
        rng: &mut dyn ChallengeSource,
    ) -> Result<LoginReply, LoginStatus> {
        let mut out = TextPairs::default();
        if self.admission.is_none() {
            self.admit(pairs, policy, &mut out)?;
        }
        let Some(admission) = self.admission.clone() else {
            return Err(LoginStatus::MISSING_PARAMETER);
        };
        let chap_required = matches!(admission.auth, Authentication::Chap(_));
        let mut transit = req.transit;
        match req.csg {
            stage::SECURITY => {
                self.current_stage = stage::SECURITY;
                self.security(pairs, &admission.auth, &mut out, rng)?;
                if self.chap != ChapState::Done && chap_required {
                    // The initiator may not leave the security stage before proving itself.
                    transit = false;
                    if req.transit && self.chap == ChapState::Idle {
                        return Err(LoginStatus::AUTH_FAILURE);
                    }
                }
                if matches!(
                    self.chap,
                    ChapState::ExpectAlgorithm | ChapState::ExpectResponse { .. }
                ) {
                    transit = false;
                }
            }
            stage::OPERATIONAL => {
                if chap_required && self.chap != ChapState::Done {
                    return Err(LoginStatus::AUTH_FAILURE);
                }
                self.current_stage = stage::OPERATIONAL;
                self.operational(pairs, &mut out)?;
            }
            _ => return Err(LoginStatus::INITIATOR_ERROR),
        }
        let mut established = None;
        if transit {
            self.current_stage = req.nsg;
            if req.nsg == stage::FULL_FEATURE {
                if !self.declared_mrdsl && self.params.session_type == SessionType::Normal {
                    // RFC 7143 §13.12: declarative; say what we can receive.
                    out.push(
                        "MaxRecvDataSegmentLength",
                        self.params.max_recv_data_segment_length.to_string(),
                    );
                }
                established = Some(self.params.clone());
            }
        }
        Ok(LoginReply {
            header: Login {
                transit,
                continue_bit: false,
                csg: req.csg,
                nsg: if transit {
                    req.nsg
                } else {
                    req.csg.min(req.nsg)
                },
                status_class: 0,
                status_detail: 0,
                ..Default::default()
            },
            text: out,
            established,
        })
    }

    fn admit(
        &mut self,
        pairs: &TextPairs,
        policy: &dyn LoginPolicy,
        out: &mut TextPairs,
    ) -> Result<(), LoginStatus> {
        // RFC 7143 §13.5: InitiatorName MUST be in the first login request.
        let initiator = pairs
            .get("InitiatorName")
            .ok_or(LoginStatus::MISSING_PARAMETER)?;
        if initiator.is_empty() {
            return Err(LoginStatus::MISSING_PARAMETER);
        }
        // The name is present but is not an iSCSI name (RFC 7143 §4.2.7): "Initiator
        // error" (0x0200, "miscellaneous iSCSI initiator errors", RFC 7143 §11.13.5).
        // "Missing parameter" (0x0207) is for a key that is absent, which this one is not.
        // Nothing from this login is kept, so the name reaches no ACL, log or status
        // output unchecked.
        if let Err(e) = check_iscsi_name(initiator) {
            self.refuse_name("InitiatorName", initiator, e);
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        self.params.initiator_name = initiator.to_string();
        self.params.initiator_alias = pairs.get("InitiatorAlias").map(str::to_string);
        let session_type = match pairs.get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(LoginStatus::SESSION_TYPE_NOT_SUPPORTED),
        };
        self.params.session_type = session_type;
        let admission = match session_type {
            SessionType::Discovery => policy.admit_discovery(initiator)?,
            SessionType::Normal => {
                let target = pairs
                    .get("TargetName")
                    .ok_or(LoginStatus::MISSING_PARAMETER)?;
                // A name the target serves is the administrator's, so it is admitted as
                // configured; a name it does not serve is checked so the refusal says
                // why. A malformed TargetName names no target here: "Not found"
                // (0x0203, RFC 7143 §11.13.5), as for any other unknown name, so the
                // answer tells a scanner nothing more.
                let a = match policy.admit(initiator, target) {
                    Ok(a) => a,
                    Err(status) => {
                        if let Err(e) = check_iscsi_name(target) {
                            self.refuse_name("TargetName", target, e);
                            return Err(LoginStatus::NOT_FOUND);
                        }
                        return Err(status);
                    }
                };
                self.params.target_name = Some(target.to_string());
                a
            }
        };
        self.params.portal_group_tag = admission.portal_group_tag;
        self.params.max_recv_data_segment_length = self.limits.max_recv_data_segment_length;
        // RFC 7143 §13.9: the target returns TargetPortalGroupTag in the first response
        // of a normal session.
        if session_type == SessionType::Normal {
            out.push(
                "TargetPortalGroupTag",
                admission.portal_group_tag.to_string(),
            );
            if let Some(alias) = &admission.alias {
                out.push("TargetAlias", alias.clone());
            }
        }
        self.admission = Some(admission);
        Ok(())
    }

    fn security(
        &mut self,
        pairs: &TextPairs,
        auth: &Authentication,
        out: &mut TextPairs,
        rng: &mut dyn ChallengeSource,
    ) -> Result<(), LoginStatus> {
        if let Some(methods) = pairs.get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let chosen = match auth {
                Authentication::None if offered.contains(&"None") => "None",
                Authentication::None if offered.contains(&"CHAP") => "CHAP",
                Authentication::Chap(_) if offered.contains(&"CHAP") => "CHAP",
                _ => return Err(LoginStatus::AUTH_FAILURE),
            };
            out.push("AuthMethod", chosen);
            if chosen == "CHAP" {
                self.chap = ChapState::ExpectAlgorithm;
            }
        }
        if let Some(algs) = pairs.get("CHAP_A") {
            if self.chap != ChapState::ExpectAlgorithm {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
            if !algs.split(',').any(|a| a == "5") {
                // RFC 7143 §12.1.3: only MD5 is defined here; answer Reject then fail.
                return Err(LoginStatus::AUTH_FAILURE);
            }
            let mut id = [0u8; 1];
            let mut challenge = [0u8; 16];
            rng.fill(&mut id);
            rng.fill(&mut challenge);
            out.push("CHAP_A", "5");
            out.push("CHAP_I", id[0].to_string());
            out.push("CHAP_C", chap::encode_hex(&challenge));
            self.chap = ChapState::ExpectResponse {
                id: id[0],
                challenge,
            };
        }
        if pairs.get("CHAP_R").is_some() || pairs.get("CHAP_N").is_some() {
            let ChapState::ExpectResponse { id, challenge } = self.chap else {
                return Err(LoginStatus::INITIATOR_ERROR);
            };
            let name = pairs.get("CHAP_N").ok_or(LoginStatus::AUTH_FAILURE)?;
            let resp = pairs
                .get("CHAP_R")
                .and_then(chap::decode_binary)
                .ok_or(LoginStatus::AUTH_FAILURE)?;
            let accounts: &[ChapAccount] = match auth {
                Authentication::Chap(a) => a,
                Authentication::None => &[],
            };
            let account = accounts
                .iter()
                .find(|a| a.user == name)
                .ok_or(LoginStatus::AUTH_FAILURE)?;
            let expected = chap::response(id, account.secret.as_bytes(), &challenge);
            if !chap::constant_time_eq(&expected, &resp) {
                return Err(LoginStatus::AUTH_FAILURE);
            }
            // Mutual CHAP: the initiator challenges us in the same PDU.
            if let (Some(mi), Some(mc)) = (pairs.get("CHAP_I"), pairs.get("CHAP_C")) {
                let (tuser, tsecret) = account.mutual.as_ref().ok_or(LoginStatus::AUTH_FAILURE)?;
                let mid: u8 = mi.parse().map_err(|_| LoginStatus::AUTH_FAILURE)?;
                let mchal = chap::decode_binary(mc).ok_or(LoginStatus::AUTH_FAILURE)?;
                // RFC 7143 §12.1.3: a challenge equal to ours is a reflection attack.
                if mchal == challenge || mchal.is_empty() {
                    return Err(LoginStatus::AUTH_FAILURE);
                }
                out.push("CHAP_N", tuser.clone());
                out.push(
                    "CHAP_R",
                    chap::encode_hex(&chap::response(mid, tsecret.as_bytes(), &mchal)),
                );
            } else if account.mutual.is_some() {
                // The account asks for mutual authentication; the initiator must ask too.
                return Err(LoginStatus::AUTH_FAILURE);
            }
            self.chap = ChapState::Done;
        }
        // Operational keys may also appear in the security stage (RFC 7143 §6.3).
        self.operational(pairs, out)
    }

    fn operational(&mut self, pairs: &TextPairs, out: &mut TextPairs) -> Result<(), LoginStatus> {
        let discovery = self.params.session_type == SessionType::Discovery;
        for (key, value) in &pairs.0 {
            let key = key.as_str();
            let value = value.as_str();
            match key {
                "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType"
                | "AuthMethod" | "CHAP_A" | "CHAP_I" | "CHAP_C" | "CHAP_N" | "CHAP_R" => continue,
                _ => {}
            }
            if self.seen.iter().any(|k| k == key) && key != "MaxRecvDataSegmentLength" {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
            self.seen.push(key.to_string());
            let answer: String = match key {
                "HeaderDigest" | "DataDigest" => {
                    let choice = value
                        .split(',')
                        .find(|v| *v == "None" || (*v == "CRC32C" && self.limits.digests));
                    match choice {
                        Some(c) => {
                            let on = c == "CRC32C";
                            if key == "HeaderDigest" {
                                self.params.header_digest = on;
                            } else {
                                self.params.data_digest = on;
                            }
                            c.to_string()
                        }
                        None => "Reject".to_string(),
                    }
                }
                "MaxConnections" => match parse_num(value, 1, 65535) {
                    Some(_) if discovery => "Irrelevant".to_string(),
                    Some(_) => {
                        self.params.max_connections = 1;
                        "1".to_string()
                    }
                    None => "Reject".to_string(),
                },
                "InitialR2T" => match parse_bool(value) {
                    Some(_) if discovery => "Irrelevant".to_string(),
                    Some(v) => {
                        self.params.initial_r2t = v || self.limits.initial_r2t;
                        yes_no(self.params.initial_r2t).to_string()
                    }
                    None => "Reject".to_string(),
                },
                "ImmediateData" => match parse_bool(value) {
                    Some(_) if discovery => "Irrelevant".to_string(),
                    Some(v) => {
                        self.params.immediate_data = v && self.limits.immediate_data;
                        yes_no(self.params.immediate_data).to_string()
                    }
                    None => "Reject".to_string(),
                },
                "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(value) {
                    Some(_) if discovery => "Irrelevant".to_string(),
                    // OR function; we only do in-order, so the result is always Yes.
                    Some(_) => "Yes".to_string(),
                    None => "Reject".to_string(),
                },
                "MaxRecvDataSegmentLength" => match parse_num(value, 512, 16_777_215) {
                    Some(n) => {
                        self.params.max_xmit_data_segment_length = n;
                        if self.declared_mrdsl {
                            continue;
                        }
                        self.declared_mrdsl = true;
                        self.params.max_recv_data_segment_length.to_string()
                    }
                    None => "Reject".to_string(),
                },
                "MaxBurstLength" => match parse_num(value, 512, 16_777_215) {
                    Some(_) if discovery => "Irrelevant".to_string(),
                    Some(n) => {
                        self.params.max_burst_length = n.min(self.limits.max_burst_length);
                        self.params.first_burst_length = self
                            .params
                            .first_burst_length
                            .min(self.params.max_burst_length);
                        self.params.max_burst_length.to_string()
                    }
                    None => "Reject".to_string(),
                },
                "FirstBurstLength" => match parse_num(value, 512, 16_777_215) {
                    Some(_) if discovery => "Irrelevant".to_string(),
                    Some(n) => {
                        self.params.first_burst_length = n
                            .min(self.limits.first_burst_length)
                            .min(self.params.max_burst_length);
                        self.params.first_burst_length.to_string()
                    }
                    None => "Reject".to_string(),
                },
                "DefaultTime2Wait" => match parse_num(value, 0, 3600) {
                    Some(n) => {
                        self.params.default_time2wait = n.max(2);
                        self.params.default_time2wait.to_string()
                    }
                    None => "Reject".to_string(),
                },
                "DefaultTime2Retain" => match parse_num(value, 0, 3600) {
                    // At ErrorRecoveryLevel 0 nothing is retained after a connection ends.
                    Some(_) => {
                        self.params.default_time2retain = 0;
                        "0".to_string()
                    }
                    None => "Reject".to_string(),
                },
                "MaxOutstandingR2T" => match parse_num(value, 1, 65535) {
                    Some(_) if discovery => "Irrelevant".to_string(),
                    Some(n) => {
                        self.params.max_outstanding_r2t = n.min(self.limits.max_outstanding_r2t);
                        self.params.max_outstanding_r2t.to_string()
                    }
                    None => "Reject".to_string(),
                },
                "ErrorRecoveryLevel" => match parse_num(value, 0, 2) {
                    Some(_) => {
                        self.params.error_recovery_level = 0;
                        "0".to_string()
                    }
                    None => "Reject".to_string(),
                },
                "OFMarker" | "IFMarker" => match parse_bool(value) {
                    Some(_) => "No".to_string(),
                    None => "Reject".to_string(),
                },
                "OFMarkInt" | "IFMarkInt" => "Irrelevant".to_string(),
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {
                    // Only the target may send these (RFC 7143 §13.7–13.9).
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                _ if key.starts_with("X-") || key.starts_with("X#") => "NotUnderstood".to_string(),
                _ => "NotUnderstood".to_string(),
            };
            out.push(key, answer);
        }
        // RFC 7143 §13.14: with InitialR2T=Yes and ImmediateData=No, FirstBurstLength is
        // irrelevant; keep the parameters consistent for the data path either way.
        if self.params.first_burst_length > self.params.max_burst_length {
            self.params.first_burst_length = self.params.max_burst_length;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INITIATOR: &str = "iqn.1993-08.org.debian:01:abcdef";
    const TARGET: &str = "iqn.2026-11.io.bulwark:t";
    const DENIED: &str = "iqn.2026-11.io.example:denied";
    /// A target the administrator named outside the iSCSI name rules.
    const ODD_TARGET: &str = "iqn.2026-11.io.bulwark:odd_name";

    struct Policy(Authentication);
    impl LoginPolicy for Policy {
        fn admit(&self, initiator: &str, target: &str) -> Result<TargetAdmission, LoginStatus> {
            if target != TARGET && target != ODD_TARGET {
                return Err(LoginStatus::NOT_FOUND);
            }
            if initiator == DENIED {
                return Err(LoginStatus::AUTHORIZATION_FAILURE);
            }
            Ok(TargetAdmission {
                auth: self.0.clone(),
                portal_group_tag: 1,
                alias: None,
            })
        }
        fn admit_discovery(&self, _initiator: &str) -> Result<TargetAdmission, LoginStatus> {
            Ok(TargetAdmission {
                auth: Authentication::None,
                portal_group_tag: 1,
                alias: None,
            })
        }
    }

    struct Fixed;
    impl ChallengeSource for Fixed {
        fn fill(&mut self, buf: &mut [u8]) {
            buf.fill(7);
        }
    }

    fn req(csg: u8, nsg: u8, transit: bool) -> Login {
        Login {
            transit,
            csg,
            nsg,
            isid: [0x80, 0, 0, 0, 0, 1],
            itt: 1,
            ..Default::default()
        }
    }

    fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut t = TextPairs::default();
        for (k, v) in pairs {
            t.push(*k, *v);
        }
        t.encode()
    }

    #[test]
    fn no_auth_to_full_feature() {
        let mut n = LoginNegotiator::new(TargetLimits::default());
        let p = Policy(Authentication::None);
        let r = n.step(
            &req(0, 1, true),
            &text(&[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "None"),
            ]),
            &p,
            &mut Fixed,
        );
        assert!(!r.failed());
        assert_eq!(r.text.get("AuthMethod"), Some("None"));
        assert_eq!(r.text.get("TargetPortalGroupTag"), Some("1"));
        let r = n.step(
            &req(1, 3, true),
            &text(&[
                ("HeaderDigest", "CRC32C,None"),
                ("MaxBurstLength", "16776192"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "262144"),
                ("X-com.example", "1"),
            ]),
            &p,
            &mut Fixed,
        );
        let params = r.established.expect("full feature");
        assert!(params.header_digest);
        assert_eq!(params.max_burst_length, 1024 * 1024);
        assert!(!params.initial_r2t);
        assert_eq!(params.max_xmit_data_segment_length, 262_144);
        assert_eq!(r.text.get("X-com.example"), Some("NotUnderstood"));
    }

    #[test]
    fn unknown_target_and_acl() {
        let p = Policy(Authentication::None);
        let mut n = LoginNegotiator::new(TargetLimits::default());
        let r = n.step(
            &req(0, 1, true),
            &text(&[
                ("InitiatorName", INITIATOR),
                ("TargetName", "iqn.2026-11.io.bulwark:x"),
            ]),
            &p,
            &mut Fixed,
        );
        assert_eq!((r.header.status_class, r.header.status_detail), (2, 3));
        let mut n = LoginNegotiator::new(TargetLimits::default());
        let r = n.step(
            &req(0, 1, true),
            &text(&[("InitiatorName", DENIED), ("TargetName", TARGET)]),
            &p,
            &mut Fixed,
        );
        assert_eq!((r.header.status_class, r.header.status_detail), (2, 2));
    }

    fn chap_login(account: ChapAccount, secret: &str, mutual: bool) -> LoginReply {
        let p = Policy(Authentication::Chap(vec![account]));
        let mut n = LoginNegotiator::new(TargetLimits::default());
        let r = n.step(
            &req(0, 1, true),
            &text(&[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "CHAP,None"),
            ]),
            &p,
            &mut Fixed,
        );
        assert_eq!(r.text.get("AuthMethod"), Some("CHAP"));
        assert!(!r.header.transit);
        let r = n.step(&req(0, 1, false), &text(&[("CHAP_A", "5")]), &p, &mut Fixed);
        let id: u8 = r.text.get("CHAP_I").unwrap().parse().unwrap();
        let c = chap::decode_binary(r.text.get("CHAP_C").unwrap()).unwrap();
        let resp = chap::encode_hex(&chap::response(id, secret.as_bytes(), &c));
        let mut pairs = vec![("CHAP_N", "user"), ("CHAP_R", resp.as_str())];
        if mutual {
            pairs.push(("CHAP_I", "9"));
            pairs.push(("CHAP_C", "0x0102030405"));
        }
        n.step(&req(0, 1, true), &text(&pairs), &p, &mut Fixed)
    }

    #[test]
    fn chap_one_way_and_mutual() {
        let acct = ChapAccount {
            user: "user".into(),
            secret: "secretsecret".into(),
            mutual: None,
        };
        let r = chap_login(acct.clone(), "secretsecret", false);
        assert!(!r.failed());
        assert!(r.header.transit);
        let r = chap_login(acct, "wrong", false);
        assert_eq!((r.header.status_class, r.header.status_detail), (2, 1));
        let acct = ChapAccount {
            user: "user".into(),
            secret: "secretsecret".into(),
            mutual: Some(("tgt".into(), "targetsecret".into())),
        };
        let r = chap_login(acct, "secretsecret", true);
        assert!(!r.failed());
        let expected = chap::encode_hex(&chap::response(9, b"targetsecret", &[1, 2, 3, 4, 5]));
        assert_eq!(r.text.get("CHAP_R"), Some(expected.as_str()));
        assert_eq!(r.text.get("CHAP_N"), Some("tgt"));
    }

    #[test]
    fn chap_required_but_skipped() {
        let acct = ChapAccount {
            user: "user".into(),
            secret: "s".into(),
            mutual: None,
        };
        let p = Policy(Authentication::Chap(vec![acct]));
        let mut n = LoginNegotiator::new(TargetLimits::default());
        let r = n.step(
            &req(1, 3, true),
            &text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]),
            &p,
            &mut Fixed,
        );
        assert_eq!((r.header.status_class, r.header.status_detail), (2, 1));
    }
    fn first_step(initiator: &str, target: Option<&str>) -> (LoginNegotiator, LoginReply) {
        let p = Policy(Authentication::None);
        let mut n = LoginNegotiator::new(TargetLimits::default());
        let mut pairs = vec![("InitiatorName", initiator), ("AuthMethod", "None")];
        match target {
            Some(t) => pairs.push(("TargetName", t)),
            None => pairs.push(("SessionType", "Discovery")),
        }
        let r = n.step(&req(0, 1, true), &text(&pairs), &p, &mut Fixed);
        (n, r)
    }

    #[test]
    fn malformed_initiator_name_is_refused_as_initiator_error() {
        for bad in [
            "iqn.1993-08.org.debian:01:ab\ncd",
            "not-an-iqn",
            "iqn.2026-11.io.example:host/a",
            "eui.123",
        ] {
            for target in [Some(TARGET), None] {
                let (n, r) = first_step(bad, target);
                assert_eq!(
                    (r.header.status_class, r.header.status_detail),
                    (2, 0),
                    "{bad:?}"
                );
                let refused = n.refused_name().expect("the name is recorded");
                assert_eq!(refused.key, "InitiatorName");
                assert_eq!(refused.name, bad);
                assert_eq!(Err(refused.error.clone()), check_iscsi_name(bad));
                assert_eq!(
                    n.params().initiator_name,
                    "",
                    "nothing of the login is kept"
                );
            }
        }
        let long = format!("iqn.2026-11.io.example:{}", "a".repeat(300));
        let (n, r) = first_step(&long, Some(TARGET));
        assert_eq!((r.header.status_class, r.header.status_detail), (2, 0));
        assert_eq!(
            n.refused_name().map(|r| &r.error),
            Some(&NameError::TooLong(323))
        );
    }

    #[test]
    fn real_initiator_names_log_in_and_upper_case_is_accepted() {
        for good in [
            INITIATOR,
            "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
            "iqn.2008-11.org.linux-kvm",
            "iqn.2008-11.org.linux-kvm:6f1e3c2a-8b4d-4e5f-9a0b-1c2d3e4f5a6b",
            "iqn.1998-01.com.vmware:ESX01-5f2a3b4c",
            "IQN.1993-08.ORG.DEBIAN:01:ABCDEF",
        ] {
            let (n, r) = first_step(good, Some(TARGET));
            assert!(!r.failed(), "{good}");
            assert!(n.refused_name().is_none());
            assert_eq!(n.params().initiator_name, good, "kept as sent");
        }
    }

    #[test]
    fn malformed_target_name_is_not_found_unless_configured() {
        let (n, r) = first_step(INITIATOR, Some("iqn.2026-11.io.bulwark:t\r\n"));
        assert_eq!((r.header.status_class, r.header.status_detail), (2, 3));
        let refused = n.refused_name().expect("recorded");
        assert_eq!(refused.key, "TargetName");
        assert_eq!(refused.error, NameError::Character { ch: '\r', at: 24 });
        // A well-formed name the target does not serve: plain "not found".
        let (n, r) = first_step(INITIATOR, Some("iqn.2026-11.io.bulwark:other"));
        assert_eq!((r.header.status_class, r.header.status_detail), (2, 3));
        assert!(n.refused_name().is_none());
        // A name the administrator configured is theirs, even outside the rules.
        let (n, r) = first_step(INITIATOR, Some(ODD_TARGET));
        assert!(!r.failed());
        assert!(n.refused_name().is_none());
    }
}
