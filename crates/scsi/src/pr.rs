//! Reservations: RESERVE/RELEASE(6/10) (SPC-2 §5.5) and persistent reservations
//! (SPC-4 §5.13, PERSISTENT RESERVE IN §6.15 / OUT §6.16).
//!
//! Registrations are kept per I_T nexus; a registration made with ALL_TG_PT applies to
//! the initiator port through every target port. PREEMPT AND ABORT preempts like PREEMPT;
//! aborting the preempted nexuses' tasks is the transport's business. REGISTER with
//! SPEC_I_PT registers the initiator ports its iSCSI TransportIDs name (with an ISID).

use std::io::{self, Write as _};
use std::path::Path;

use crate::cdb::{get_be16, get_be32, get_be64, get_u8, put, put_u8};
use crate::commands::Access;
use crate::lu::{data_in, good, CmdResult, Ctx, Failure, LuState};
use crate::sense::Sense;
use crate::{ItNexus, TargetPort};

/// Registrations kept at most per logical unit (INSUFFICIENT REGISTRATION RESOURCES
/// beyond).
const REGISTRATIONS_MAX: usize = 1024;

/// Persistent reservation types (SPC-4 Table 170).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum PrType {
    WriteExclusive = 0x1,
    ExclusiveAccess = 0x3,
    WriteExclusiveRegistrantsOnly = 0x5,
    ExclusiveAccessRegistrantsOnly = 0x6,
    WriteExclusiveAllRegistrants = 0x7,
    ExclusiveAccessAllRegistrants = 0x8,
}

impl PrType {
    fn from_u8(v: u8) -> Option<PrType> {
        Some(match v {
            0x1 => PrType::WriteExclusive,
            0x3 => PrType::ExclusiveAccess,
            0x5 => PrType::WriteExclusiveRegistrantsOnly,
            0x6 => PrType::ExclusiveAccessRegistrantsOnly,
            0x7 => PrType::WriteExclusiveAllRegistrants,
            0x8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants only / all registrants: registered nexuses have access.
    fn registrants_have_access(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Registration {
    pub nexus: ItNexus,
    pub key: u64,
    /// Registered through every target port (ALL_TG_PT).
    pub all_tg_pt: bool,
}

impl Registration {
    fn matches(&self, nexus: &ItNexus) -> bool {
        same_initiator_port(&self.nexus, nexus)
            && (self.all_tg_pt || self.nexus.target_port == nexus.target_port)
    }
}

fn same_initiator_port(a: &ItNexus, b: &ItNexus) -> bool {
    a.isid == b.isid && a.initiator_name.eq_ignore_ascii_case(&b.initiator_name)
}

/// The persistent reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// The nexus that holds it (for all-registrants types: the one that created it).
    pub holder: ItNexus,
    pub kind: PrType,
}

/// What [`PrState::serialize`] writes in `format`.
const SAVED_FORMAT: &str = "bulwark-pr-2";

/// Persistent reservations as saved (in the APTPL file, or in the cluster state).
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedPr {
    format: String,
    generation: u32,
    aptpl: bool,
    registrations: Vec<SavedRegistration>,
    reservation: Option<SavedReservation>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedRegistration {
    key: u64,
    all_tg_pt: bool,
    initiator: String,
    isid: [u8; 6],
    port: String,
    relative_port: u16,
    group: u16,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedReservation {
    /// The PERSISTENT RESERVE type code (SPC-4 table 222).
    kind: u8,
    /// Index of the holder's registration.
    holder: usize,
}

/// Persistent reservation state of a logical unit.
#[derive(Debug, Default, Clone)]
pub(crate) struct PrState {
    pub generation: u32,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// Activate persist through power loss: the state is kept in the PR file.
    pub aptpl: bool,
}

impl PrState {
    pub(crate) fn registration(&self, nexus: &ItNexus) -> Option<&Registration> {
        self.registrations.iter().find(|r| r.matches(nexus))
    }

    fn is_holder(&self, nexus: &ItNexus) -> bool {
        match &self.reservation {
            None => false,
            Some(r) if r.kind.all_registrants() => self.registration(nexus).is_some(),
            Some(r) => {
                same_initiator_port(&r.holder, nexus)
                    && self.registration(nexus).is_some_and(|reg| {
                        reg.all_tg_pt || r.holder.target_port == nexus.target_port
                    })
            }
        }
    }

    /// The conflict table of SPC-4 §5.13.1 (Table 45) for a command of class `access`
    /// from `nexus`.
    pub fn conflicts(&self, nexus: &ItNexus, access: Access) -> bool {
        let Some(res) = &self.reservation else {
            return false;
        };
        if access == Access::Free || self.is_holder(nexus) {
            return false;
        }
        if res.kind.registrants_have_access() && self.registration(nexus).is_some() {
            return false;
        }
        match access {
            Access::Read => res.kind.exclusive_access(),
            _ => true,
        }
    }

    fn remove_where(&mut self, keep: impl Fn(&Registration) -> bool) -> Vec<ItNexus> {
        let mut removed = Vec::new();
        self.registrations.retain(|r| {
            let k = keep(r);
            if !k {
                removed.push(r.nexus.clone());
            }
            k
        });
        removed
    }

    /// Drops the reservation when its holder is no longer registered (SPC-4 §5.13.10).
    /// Returns whether a registrants-only reservation was released that way.
    fn release_if_holder_gone(&mut self) -> Option<PrType> {
        let res = self.reservation.as_ref()?;
        let gone = if res.kind.all_registrants() {
            self.registrations.is_empty()
        } else {
            !self.registrations.iter().any(|r| r.matches(&res.holder))
        };
        if gone {
            let kind = res.kind;
            self.reservation = None;
            return Some(kind);
        }
        None
    }

    /// Loads the state saved with APTPL; a missing file means no state.
    pub fn load(path: &Path) -> io::Result<PrState> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(PrState::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PrState::default()),
            Err(e) => Err(e),
        }
    }

    /// The saved form: JSON ([`SavedPr`]), so that no name, however strange, can be
    /// read back as another field or record (the old line format could be, by a name
    /// holding a newline).
    pub(crate) fn serialize(&self) -> String {
        let registrations: Vec<SavedRegistration> = self
            .registrations
            .iter()
            .map(|r| SavedRegistration {
                key: r.key,
                all_tg_pt: r.all_tg_pt,
                initiator: r.nexus.initiator_name.clone(),
                isid: r.nexus.isid,
                port: r.nexus.target_port.name.clone(),
                relative_port: r.nexus.target_port.relative_id,
                group: r.nexus.target_port.group,
            })
            .collect();
        let reservation = self.reservation.as_ref().and_then(|res| {
            let holder = self
                .registrations
                .iter()
                .position(|r| r.matches(&res.holder))?;
            Some(SavedReservation {
                kind: res.kind as u8,
                holder,
            })
        });
        let saved = SavedPr {
            format: SAVED_FORMAT.into(),
            generation: self.generation,
            aptpl: self.aptpl,
            registrations,
            reservation,
        };
        // Plain data: serialising it cannot fail.
        serde_json::to_string(&saved).unwrap_or_default()
    }

    /// Reads what [`PrState::serialize`] wrote, or the line format of earlier
    /// versions. Something unreadable yields no reservations, and says so in the log.
    pub(crate) fn parse(text: &str) -> PrState {
        if text.trim_start().starts_with('{') {
            return match serde_json::from_str::<SavedPr>(text) {
                Ok(saved) if saved.format == SAVED_FORMAT => PrState::from_saved(saved),
                Ok(saved) => {
                    tracing::warn!(format = %saved.format, "persistent reservations in an unknown format; starting without them");
                    PrState::default()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "persistent reservations unreadable; starting without them");
                    PrState::default()
                }
            };
        }
        PrState::parse_lines(text)
    }

    fn from_saved(saved: SavedPr) -> PrState {
        let registrations: Vec<Registration> = saved
            .registrations
            .into_iter()
            .take(REGISTRATIONS_MAX)
            .map(|r| Registration {
                nexus: ItNexus {
                    initiator_name: r.initiator,
                    isid: r.isid,
                    target_port: TargetPort {
                        name: r.port,
                        relative_id: r.relative_port,
                        group: r.group,
                    },
                },
                key: r.key,
                all_tg_pt: r.all_tg_pt,
            })
            .collect();
        let reservation = saved.reservation.and_then(|res| {
            Some(Reservation {
                holder: registrations.get(res.holder)?.nexus.clone(),
                kind: PrType::from_u8(res.kind)?,
            })
        });
        PrState {
            generation: saved.generation,
            registrations,
            reservation,
            aptpl: saved.aptpl,
        }
    }

    /// The line format written before reservations were JSON: `generation <n>`, `aptpl
    /// <0|1>`, `reg <key hex> <all_tg_pt 0|1> <isid hex> <rel port> <group> <port
    /// name> <initiator name>` and `res <type> <holder index>`.
    fn parse_lines(text: &str) -> PrState {
        let mut st = PrState {
            aptpl: true,
            ..PrState::default()
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["generation", n] => st.generation = n.parse().unwrap_or(0),
                // Files written before this line existed were APTPL files.
                ["aptpl", a] => st.aptpl = *a != "0",
                ["reg", key, all, isid, rel, group, port, name] => {
                    let mut isid_b = [0u8; 6];
                    for (i, b) in isid_b.iter_mut().enumerate() {
                        *b = isid
                            .get(2 * i..2 * i + 2)
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                            .unwrap_or(0);
                    }
                    if st.registrations.len() < REGISTRATIONS_MAX {
                        st.registrations.push(Registration {
                            nexus: ItNexus {
                                initiator_name: (*name).to_string(),
                                isid: isid_b,
                                target_port: TargetPort {
                                    name: (*port).to_string(),
                                    relative_id: rel.parse().unwrap_or(0),
                                    group: group.parse().unwrap_or(0),
                                },
                            },
                            key: u64::from_str_radix(key, 16).unwrap_or(0),
                            all_tg_pt: *all == "1",
                        });
                    }
                }
                ["res", kind, idx] => {
                    let kind = kind.parse().ok().and_then(PrType::from_u8);
                    let holder = idx
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| st.registrations.get(i));
                    if let (Some(kind), Some(h)) = (kind, holder) {
                        st.reservation = Some(Reservation {
                            holder: h.nexus.clone(),
                            kind,
                        });
                    }
                }
                _ => {}
            }
        }
        st
    }

    /// Writes the state to `path` atomically (temporary file, fsync, rename, fsync of
    /// the directory), or removes the file when APTPL is off.
    fn persist(&self, path: &Path) -> io::Result<()> {
        if !self.aptpl {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.serialize().as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// RESERVE(6) / RESERVE(10) (SPC-2 §7.21). Conflicts with persistent reservation
/// registrations (SPC-4 §5.13.3).
pub(crate) fn reserve_legacy(ctx: &Ctx<'_>) -> CmdResult {
    let mut st = ctx.lu.lock();
    if !st.pr.registrations.is_empty() || st.pr.reservation.is_some() {
        return Err(Failure::Conflict);
    }
    // Third-party and extent reservations (RESERVE(10) byte 1) are not supported.
    if ctx.cdb.opcode() == crate::cdb::opcode::RESERVE_10 && ctx.cdb.u8(1) & 0x13 != 0 {
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    match &st.legacy_reservation {
        Some(holder) if holder != ctx.nexus() => Err(Failure::Conflict),
        _ => {
            st.legacy_reservation = Some(ctx.nexus().clone());
            drop(st);
            good()
        }
    }
}

/// RELEASE(6) / RELEASE(10): releases the reservation if this nexus holds it; from any
/// other nexus it does nothing (SPC-2 §7.17).
pub(crate) fn release_legacy(ctx: &Ctx<'_>) -> CmdResult {
    let mut st = ctx.lu.lock();
    if !st.pr.registrations.is_empty() || st.pr.reservation.is_some() {
        return Err(Failure::Conflict);
    }
    if st.legacy_reservation.as_ref() == Some(ctx.nexus()) {
        st.legacy_reservation = None;
    }
    drop(st);
    good()
}

/// An iSCSI TransportID (SPC-4 §7.6.4.6) for `nexus`: format 01b with the ISID, padded to
/// a multiple of four bytes.
fn transport_id(nexus: &ItNexus) -> Vec<u8> {
    let name = nexus.initiator_port_name();
    let mut body: Vec<u8> = name.into_bytes();
    body.push(0);
    while body.len() % 4 != 0 {
        body.push(0);
    }
    let mut t = vec![0x40 | 0x05, 0];
    t.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
    t.extend_from_slice(&body);
    t
}

/// PERSISTENT RESERVE IN (SPC-4 §6.15).
pub(crate) fn persistent_reserve_in(ctx: &Ctx<'_>) -> CmdResult {
    let alloc = usize::from(ctx.cdb.be16(7));
    let st = ctx.lu.lock();
    let pr = &st.pr;
    let mut b = Vec::new();
    b.extend_from_slice(&pr.generation.to_be_bytes());
    match ctx.cdb.service_action() {
        0x00 => {
            let len = u32::try_from(pr.registrations.len() * 8).unwrap_or(u32::MAX);
            b.extend_from_slice(&len.to_be_bytes());
            for r in &pr.registrations {
                b.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        0x01 => match &pr.reservation {
            None => b.extend_from_slice(&0u32.to_be_bytes()),
            Some(res) => {
                b.extend_from_slice(&16u32.to_be_bytes());
                let key = if res.kind.all_registrants() {
                    0
                } else {
                    pr.registration(&res.holder).map_or(0, |r| r.key)
                };
                b.extend_from_slice(&key.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0, 0, res.kind as u8, 0, 0]);
            }
        },
        0x02 => {
            b.clear();
            // Length 8; ATP_C, PTPL_C; TMV with ALLOW COMMANDS 001b; PTPL_A; type mask.
            // SIP_C, ATP_C, PTPL_C.
            b.extend_from_slice(&[
                0x00,
                0x08,
                0x08 | 0x04 | 0x01,
                0x80 | 0x10 | u8::from(pr.aptpl),
            ]);
            b.extend_from_slice(&[0xEA, 0x01, 0x00, 0x00]);
        }
        _ => {
            let mut descs = Vec::new();
            for r in &pr.registrations {
                let holder = match &pr.reservation {
                    Some(res) if res.kind.all_registrants() => true,
                    Some(res) => r.matches(&res.holder),
                    None => false,
                };
                let mut d = vec![0u8; 24];
                put(&mut d, 0, &r.key.to_be_bytes());
                put_u8(
                    &mut d,
                    12,
                    if r.all_tg_pt { 0x02 } else { 0 } | u8::from(holder),
                );
                if holder {
                    put_u8(
                        &mut d,
                        13,
                        pr.reservation.as_ref().map_or(0, |res| res.kind as u8),
                    );
                }
                put(&mut d, 18, &r.nexus.target_port.relative_id.to_be_bytes());
                let tid = transport_id(&r.nexus);
                put(
                    &mut d,
                    20,
                    &u32::try_from(tid.len()).unwrap_or(0).to_be_bytes(),
                );
                d.extend_from_slice(&tid);
                descs.extend_from_slice(&d);
            }
            b.extend_from_slice(&u32::try_from(descs.len()).unwrap_or(u32::MAX).to_be_bytes());
            b.extend_from_slice(&descs);
        }
    }
    drop(st);
    data_in(b, alloc)
}

/// Parameters of PERSISTENT RESERVE OUT (SPC-4 §6.16.3).
struct ProutParams {
    key: u64,
    sa_key: u64,
    spec_i_pt: bool,
    all_tg_pt: bool,
    aptpl: bool,
}

/// PERSISTENT RESERVE OUT (SPC-4 §6.16).
pub(crate) fn persistent_reserve_out(ctx: &Ctx<'_>) -> CmdResult {
    let cdb = ctx.cdb;
    let sa = cdb.service_action();
    let scope = cdb.u8(2) >> 4;
    let type_field = cdb.u8(2) & 0x0F;
    let param_len = usize::try_from(cdb.be32(5)).unwrap_or(usize::MAX);
    let data = ctx
        .req
        .data_out
        .get(..param_len)
        .ok_or(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)?;
    // Only REGISTER with SPEC_I_PT carries more than the basic 24 bytes: its
    // TransportIDs (SPC-4 §6.16.3).
    let spec_i_pt_list = sa == 0x00 && get_u8(data, 20) & 0x08 != 0;
    if sa != 0x07 && param_len != 24 && !(spec_i_pt_list && param_len >= 28) {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    if sa == 0x07 && param_len < 24 {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let p = ProutParams {
        key: get_be64(data, 0),
        sa_key: get_be64(data, 8),
        spec_i_pt: sa != 0x07 && get_u8(data, 20) & 0x08 != 0,
        all_tg_pt: sa != 0x07 && get_u8(data, 20) & 0x04 != 0,
        aptpl: if sa == 0x07 {
            get_u8(data, 17) & 0x01 != 0
        } else {
            get_u8(data, 20) & 0x01 != 0
        },
    };
    let nexus = ctx.nexus();
    let mut st = ctx.lu.lock();
    let before = ctx.lu.pr_store.as_ref().map(|_| st.pr.clone());
    let result = match sa {
        0x00 | 0x06 => register(&mut st, nexus, &p, sa == 0x06, data),
        0x01 => reserve(&mut st, nexus, &p, scope, type_field),
        0x02 => release(&mut st, nexus, &p, scope, type_field),
        0x03 => clear(&mut st, nexus, &p),
        0x04 | 0x05 => preempt(&mut st, nexus, &p, scope, type_field).map(|removed| {
            if let Some(paths) = ctx.target.remote_paths().filter(|_| !removed.is_empty()) {
                paths.reservation_preempted(ctx.lu.lun, nexus, &removed);
            }
            if sa == 0x05 {
                note_preempted(&mut st, &removed);
            }
        }),
        _ => register_and_move(&mut st, nexus, &p, data),
    };
    if result.is_ok() {
        if let (Some(store), Some(before)) = (&ctx.lu.pr_store, before) {
            // Shared state: the command completes only once the store has it, and a
            // change the store refused did not happen (SPC-4 §5.13.1: every path sees
            // the same registrations and reservation).
            if let Err(e) = store.save(&st.pr.serialize()) {
                tracing::warn!(lun = ctx.lu.lun, error = %e, "reservation change not saved");
                st.pr = before;
                return Err(Sense::NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION.into());
            }
        } else if let Some(path) = &ctx.lu.config.pr_file {
            if let Err(e) = st.pr.persist(path) {
                tracing::error!(lun = ctx.lu.lun, error = %e, "persisting PR state failed");
                return Err(Sense::HARDWARE_ERROR_INTERNAL_TARGET_FAILURE.into());
            }
        }
    }
    drop(st);
    result?;
    good()
}

/// The caller must be registered with `key` (SPC-4 §5.13.2: otherwise RESERVATION
/// CONFLICT).
fn check_registered(st: &LuState, nexus: &ItNexus, key: u64) -> Result<(), Failure> {
    match st.pr.registration(nexus) {
        Some(r) if r.key == key => Ok(()),
        _ => Err(Failure::Conflict),
    }
}

fn ua_removed(st: &mut LuState, removed: &[ItNexus], sense: Sense) {
    for n in removed {
        for (known, s) in st.nexuses.iter_mut() {
            if same_initiator_port(known, n) {
                s.push_ua(sense);
            }
        }
    }
}

/// RESERVATIONS RELEASED to every registrant but `except` when a registrants-only or
/// all-registrants reservation goes away (SPC-4 §5.13.11.2).
fn ua_released(st: &mut LuState, except: &ItNexus, kind: PrType) {
    if !kind.registrants_have_access() {
        return;
    }
    let others: Vec<ItNexus> = st
        .pr
        .registrations
        .iter()
        .filter(|r| !r.matches(except))
        .map(|r| r.nexus.clone())
        .collect();
    ua_removed(st, &others, Sense::UNIT_ATTENTION_RESERVATIONS_RELEASED);
}

fn register(
    st: &mut LuState,
    nexus: &ItNexus,
    p: &ProutParams,
    ignore: bool,
    data: &[u8],
) -> Result<(), Failure> {
    if p.spec_i_pt && ignore {
        // REGISTER AND IGNORE EXISTING KEY takes no TransportIDs (SPC-4 §6.16.3).
        return Err(Sense::invalid_field_in_parameter_list(20).into());
    }
    let existing = st.pr.registration(nexus).cloned();
    if p.spec_i_pt && existing.is_some() {
        // SPC-4 §5.13.7: SPEC_I_PT only from an unregistered I_T nexus.
        return Err(Sense::invalid_field_in_cdb(1).into());
    }
    match existing {
        None => {
            if !ignore && p.key != 0 {
                return Err(Failure::Conflict);
            }
            if p.sa_key == 0 {
                return Ok(());
            }
            let mut nexuses = vec![nexus.clone()];
            if p.spec_i_pt {
                nexuses.extend(specified_initiator_ports(st, nexus, data)?);
            }
            if st.pr.registrations.len() + nexuses.len() > REGISTRATIONS_MAX {
                return Err(Sense::ILLEGAL_REQUEST_INSUFFICIENT_REGISTRATION_RESOURCES.into());
            }
            for n in nexuses {
                st.pr.registrations.push(Registration {
                    nexus: n,
                    key: p.sa_key,
                    all_tg_pt: p.all_tg_pt,
                });
            }
        }
        Some(reg) => {
            if !ignore && p.key != reg.key {
                return Err(Failure::Conflict);
            }
            if p.sa_key == 0 {
                st.pr.registrations.retain(|r| !r.matches(nexus));
                if let Some(kind) = st.pr.release_if_holder_gone() {
                    ua_released(st, nexus, kind);
                }
            } else {
                for r in st.pr.registrations.iter_mut().filter(|r| r.matches(nexus)) {
                    r.key = p.sa_key;
                }
            }
        }
    }
    st.pr.aptpl = p.aptpl;
    st.pr.generation = st.pr.generation.wrapping_add(1);
    Ok(())
}

fn check_scope_type(scope: u8, type_field: u8) -> Result<PrType, Failure> {
    if scope != 0 {
        return Err(Sense::invalid_field_in_cdb(2).into());
    }
    PrType::from_u8(type_field).ok_or_else(|| Sense::invalid_field_in_cdb(2).into())
}

fn reserve(
    st: &mut LuState,
    nexus: &ItNexus,
    p: &ProutParams,
    scope: u8,
    type_field: u8,
) -> Result<(), Failure> {
    check_registered(st, nexus, p.key)?;
    let kind = check_scope_type(scope, type_field)?;
    match &st.pr.reservation {
        Some(res) => {
            if st.pr.is_holder(nexus) && res.kind == kind {
                Ok(())
            } else {
                Err(Failure::Conflict)
            }
        }
        None => {
            st.pr.reservation = Some(Reservation {
                holder: nexus.clone(),
                kind,
            });
            Ok(())
        }
    }
}

fn release(
    st: &mut LuState,
    nexus: &ItNexus,
    p: &ProutParams,
    scope: u8,
    type_field: u8,
) -> Result<(), Failure> {
    check_registered(st, nexus, p.key)?;
    let Some(res) = st.pr.reservation.clone() else {
        return Ok(());
    };
    if !st.pr.is_holder(nexus) {
        return Ok(());
    }
    if scope != 0 || type_field != res.kind as u8 {
        // INVALID RELEASE OF PERSISTENT RESERVATION.
        return Err(Sense::new(crate::sense::SenseKey::IllegalRequest, 0x26, 0x04).into());
    }
    st.pr.reservation = None;
    ua_released(st, nexus, res.kind);
    Ok(())
}

fn clear(st: &mut LuState, nexus: &ItNexus, p: &ProutParams) -> Result<(), Failure> {
    check_registered(st, nexus, p.key)?;
    let removed = st.pr.remove_where(|_| false);
    st.pr.reservation = None;
    let others: Vec<ItNexus> = removed
        .into_iter()
        .filter(|n| !same_initiator_port(n, nexus) || n.target_port != nexus.target_port)
        .collect();
    ua_removed(st, &others, Sense::UNIT_ATTENTION_RESERVATIONS_PREEMPTED);
    st.pr.generation = st.pr.generation.wrapping_add(1);
    Ok(())
}

fn preempt(
    st: &mut LuState,
    nexus: &ItNexus,
    p: &ProutParams,
    scope: u8,
    type_field: u8,
) -> Result<Vec<ItNexus>, Failure> {
    check_registered(st, nexus, p.key)?;
    let sa_key = p.sa_key;
    let reservation = st.pr.reservation.clone();
    let not_me = |r: &Registration| !r.matches(nexus);
    let removed = match reservation {
        Some(res) if res.kind.all_registrants() && sa_key == 0 => {
            // Everybody else loses the registration; a new reservation for the caller.
            let kind = check_scope_type(scope, type_field)?;
            let removed = st.pr.remove_where(|r| !not_me(r));
            st.pr.reservation = Some(Reservation {
                holder: nexus.clone(),
                kind,
            });
            ua_removed(st, &removed, Sense::UNIT_ATTENTION_REGISTRATIONS_PREEMPTED);
            removed
        }
        Some(res)
            if !res.kind.all_registrants()
                && st
                    .pr
                    .registration(&res.holder)
                    .is_some_and(|h| h.key == sa_key) =>
        {
            let kind = check_scope_type(scope, type_field)?;
            let removed = st.pr.remove_where(|r| r.key != sa_key || !not_me(r));
            st.pr.reservation = Some(Reservation {
                holder: nexus.clone(),
                kind,
            });
            ua_removed(st, &removed, Sense::UNIT_ATTENTION_REGISTRATIONS_PREEMPTED);
            if kind != res.kind {
                let others: Vec<ItNexus> = st
                    .pr
                    .registrations
                    .iter()
                    .filter(|r| not_me(r))
                    .map(|r| r.nexus.clone())
                    .collect();
                ua_removed(st, &others, Sense::UNIT_ATTENTION_RESERVATIONS_RELEASED);
            }
            removed
        }
        _ => {
            // No reservation, or the key names non-holders: remove their registrations.
            if sa_key == 0 {
                return Err(Sense::invalid_field_in_parameter_list(8).into());
            }
            if !st.pr.registrations.iter().any(|r| r.key == sa_key) {
                return Err(Failure::Conflict);
            }
            let removed = st.pr.remove_where(|r| r.key != sa_key || !not_me(r));
            ua_removed(st, &removed, Sense::UNIT_ATTENTION_REGISTRATIONS_PREEMPTED);
            if let Some(kind) = st.pr.release_if_holder_gone() {
                ua_released(st, nexus, kind);
            }
            removed
        }
    };
    st.pr.generation = st.pr.generation.wrapping_add(1);
    Ok(removed)
}

/// The I_T nexuses a REGISTER with SPEC_I_PT names (SPC-4 §5.13.7, §6.16.3): one per
/// iSCSI TransportID with an ISID (format 01b), through the target port the command
/// came on (with ALL_TG_PT, the registration covers every port anyway). Registering
/// is all or nothing: a named nexus already registered is a RESERVATION CONFLICT, a
/// TransportID that cannot be parsed INVALID FIELD IN PARAMETER LIST.
fn specified_initiator_ports(
    st: &LuState,
    nexus: &ItNexus,
    data: &[u8],
) -> Result<Vec<ItNexus>, Failure> {
    let len = usize::try_from(get_be32(data, 24)).unwrap_or(usize::MAX);
    if data.len() != 28usize.saturating_add(len) {
        return Err(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let mut out: Vec<ItNexus> = Vec::new();
    let mut at = 28usize;
    while at < data.len() {
        let tid_len = 4 + usize::from(get_be16(data, at + 2));
        let field = u16::try_from(at).unwrap_or(u16::MAX);
        let tid = data
            .get(at..at + tid_len)
            .ok_or(Sense::invalid_field_in_parameter_list(field))?;
        let (initiator_name, isid) =
            parse_iscsi_transport_id(tid).ok_or(Sense::invalid_field_in_parameter_list(field))?;
        let n = ItNexus {
            initiator_name,
            isid,
            target_port: nexus.target_port.clone(),
        };
        if st.pr.registration(&n).is_some() {
            return Err(Failure::Conflict);
        }
        if !out.contains(&n) && !(same_initiator_port(&n, nexus)) {
            out.push(n);
        }
        at += tid_len;
    }
    Ok(out)
}

/// PREEMPT AND ABORT: the tasks of every I_T nexus of the initiator ports whose
/// registrations were removed are to be aborted (SPC-4 §5.13.11.2.?). The transport
/// collects them with `TargetDevice::take_preempted_nexuses`; until then they wait here,
/// at most once each and at most as many as the logical unit knows nexuses.
fn note_preempted(st: &mut LuState, removed: &[ItNexus]) {
    let hit: Vec<ItNexus> = st
        .nexuses
        .keys()
        .filter(|known| removed.iter().any(|r| same_initiator_port(known, r)))
        .cloned()
        .collect();
    for n in hit {
        if !st.preempted.contains(&n) {
            st.preempted.push(n);
        }
    }
}

/// Parses an iSCSI TransportID (SPC-4 §7.6.4.6) into an initiator name and ISID.
fn parse_iscsi_transport_id(t: &[u8]) -> Option<(String, [u8; 6])> {
    if get_u8(t, 0) & 0x0F != 0x05 {
        return None;
    }
    let format = get_u8(t, 0) >> 6;
    let len = usize::from(get_be16(t, 2));
    let body = t.get(4..4 + len)?;
    let text: String = String::from_utf8_lossy(body)
        .trim_end_matches('\0')
        .to_string();
    match format {
        0x01 => {
            let (name, isid) = text
                .split_once(",i,0x")
                .or_else(|| text.split_once(",I,0X"))?;
            let mut out = [0u8; 6];
            for (i, b) in out.iter_mut().enumerate() {
                *b = u8::from_str_radix(isid.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some((name.to_string(), out))
        }
        _ => None,
    }
}

fn register_and_move(
    st: &mut LuState,
    nexus: &ItNexus,
    p: &ProutParams,
    data: &[u8],
) -> Result<(), Failure> {
    check_registered(st, nexus, p.key)?;
    let Some(res) = st.pr.reservation.clone() else {
        return Err(Failure::Conflict);
    };
    if res.kind.all_registrants() || !st.pr.is_holder(nexus) {
        return Err(Failure::Conflict);
    }
    if p.sa_key == 0 {
        return Err(Sense::invalid_field_in_parameter_list(8).into());
    }
    let unreg = get_u8(data, 17) & 0x02 != 0;
    let rel_port = get_be16(data, 18);
    let tid_len = usize::try_from(get_be32(data, 20)).unwrap_or(usize::MAX);
    let tid = data
        .get(24..24usize.saturating_add(tid_len))
        .ok_or(Sense::ILLEGAL_REQUEST_PARAMETER_LIST_LENGTH_ERROR)?;
    let (name, isid) =
        parse_iscsi_transport_id(tid).ok_or(Sense::invalid_field_in_parameter_list(24))?;
    // The target port is found among the ports this unit has seen.
    let port = if nexus.target_port.relative_id == rel_port {
        Some(nexus.target_port.clone())
    } else {
        st.nexuses
            .keys()
            .map(|n| &n.target_port)
            .find(|tp| tp.relative_id == rel_port)
            .cloned()
    };
    let port = port.ok_or(Sense::invalid_field_in_parameter_list(18))?;
    let dest = ItNexus {
        initiator_name: name,
        isid,
        target_port: port,
    };
    if same_initiator_port(&dest, nexus) && dest.target_port == nexus.target_port {
        return Err(Sense::invalid_field_in_parameter_list(24).into());
    }
    match st.pr.registrations.iter_mut().find(|r| r.matches(&dest)) {
        Some(r) => r.key = p.sa_key,
        None => {
            if st.pr.registrations.len() >= REGISTRATIONS_MAX {
                return Err(Sense::ILLEGAL_REQUEST_INSUFFICIENT_REGISTRATION_RESOURCES.into());
            }
            st.pr.registrations.push(Registration {
                nexus: dest.clone(),
                key: p.sa_key,
                all_tg_pt: false,
            });
        }
    }
    st.pr.reservation = Some(Reservation {
        holder: dest,
        kind: res.kind,
    });
    if unreg {
        st.pr.registrations.retain(|r| !r.matches(nexus));
    }
    st.pr.aptpl = p.aptpl;
    st.pr.generation = st.pr.generation.wrapping_add(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_text() {
        let n = ItNexus {
            initiator_name: "iqn.a".into(),
            isid: [1, 2, 3, 4, 5, 6],
            target_port: TargetPort {
                name: "iqn.t,t,0x0001".into(),
                relative_id: 1,
                group: 2,
            },
        };
        let st = PrState {
            generation: 7,
            registrations: vec![Registration {
                nexus: n.clone(),
                key: 0xABCD,
                all_tg_pt: true,
            }],
            reservation: Some(Reservation {
                holder: n,
                kind: PrType::ExclusiveAccess,
            }),
            aptpl: true,
        };
        let back = PrState::parse(&st.serialize());
        assert_eq!(back.generation, 7);
        assert_eq!(back.registrations, st.registrations);
        assert_eq!(back.reservation, st.reservation);
        assert!(back.aptpl);
    }

    #[test]
    fn a_name_with_a_newline_stays_one_name() {
        // The old line format read this back as a second registration, holding the
        // reservation: a name is data, never structure.
        let evil = ItNexus {
            initiator_name: "iqn.a\nreg 00000000000000ff 1 000000000000 1 1 p iqn.evil\nres 3 1"
                .into(),
            isid: [0; 6],
            target_port: TargetPort {
                name: "p".into(),
                relative_id: 1,
                group: 1,
            },
        };
        let st = PrState {
            generation: 1,
            registrations: vec![Registration {
                nexus: evil.clone(),
                key: 1,
                all_tg_pt: false,
            }],
            reservation: None,
            aptpl: false,
        };
        let back = PrState::parse(&st.serialize());
        assert_eq!(back.registrations.len(), 1);
        assert_eq!(back.registrations[0].nexus, evil);
        assert!(back.reservation.is_none());
    }

    #[test]
    fn the_line_format_of_earlier_versions_still_reads() {
        let old = "bulwark-pr 1\ngeneration 3\naptpl 0\nreg 000000000000abcd 1 010203040506 1 2 iqn.t,t,0x0001 iqn.a\nres 3 0\n";
        let st = PrState::parse(old);
        assert_eq!(
            (st.generation, st.aptpl, st.registrations.len()),
            (3, false, 1)
        );
        assert_eq!(st.registrations[0].key, 0xabcd);
        assert!(st.reservation.is_some());
    }

    #[test]
    fn transport_id_round_trips() {
        let n = ItNexus {
            initiator_name: "iqn.x".into(),
            isid: [0x23, 0, 0, 0, 0, 1],
            target_port: TargetPort {
                name: "t".into(),
                relative_id: 1,
                group: 1,
            },
        };
        let t = transport_id(&n);
        assert_eq!(t.len() % 4, 0);
        assert_eq!(
            parse_iscsi_transport_id(&t),
            Some(("iqn.x".to_string(), n.isid))
        );
    }
}
