//! Targets and how initiators reach them, as cluster state: targets, LUN maps, ACLs,
//! virtual IPs and CHAP accounts. Part of the state machine ([`ClusterState::apply`]).

use super::*;

impl ClusterState {
    /// Targets and how they are reached: [`Command::CreateTarget`],
    /// [`Command::DeleteTarget`], [`Command::SetTargetPaths`] and
    /// [`Command::SetTargetAccess`].
    pub(super) fn apply_target(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::CreateTarget { iqn, alias } => {
                check_iscsi_name(iqn)?;
                if self.targets.contains_key(iqn) {
                    return Err(Refused::TargetExists(iqn.clone()));
                }
                self.targets.insert(
                    iqn.clone(),
                    Target {
                        iqn: iqn.clone(),
                        alias: alias.clone(),
                        ..Default::default()
                    },
                );
                Ok(Applied::Done)
            }
            Command::DeleteTarget { iqn } => {
                if self.targets.remove(iqn).is_none() {
                    return Err(Refused::NoSuchTarget(iqn.clone()));
                }
                Ok(Applied::Done)
            }
            Command::SetTargetPaths { iqn, standby } => {
                self.target_mut(iqn)?.standby_paths = *standby;
                Ok(Applied::Done)
            }
            Command::SetTargetAccess {
                iqn,
                allow_any,
                allow_target_reset,
            } => {
                let t = self.target_mut(iqn)?;
                if let Some(a) = allow_any {
                    t.allow_any_initiator = *a;
                }
                if let Some(r) = allow_target_reset {
                    t.allow_target_reset = *r;
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only target commands here"),
        }
    }

    /// LUN maps: [`Command::AddLun`] and [`Command::RemoveLun`].
    pub(super) fn apply_lun(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::AddLun { iqn, lun, volume } => {
                let target = self
                    .targets
                    .get(iqn)
                    .ok_or_else(|| Refused::NoSuchTarget(iqn.clone()))?;
                let (source, snapshot) = lun_backing(volume);
                let vol = self
                    .volumes
                    .get(source)
                    .ok_or_else(|| Refused::NoSuchVolume(source.to_string()))?;
                if let Some(name) = snapshot {
                    self.check_snapshot_exportable(vol, name)?;
                }
                if let Some((t, l)) = self.targets.values().find_map(|t| {
                    t.luns
                        .iter()
                        .find(|(_, v)| *v == volume)
                        .map(|(l, _)| (t, *l))
                }) {
                    return Err(Refused::VolumeAlreadyMapped {
                        volume: volume.clone(),
                        iqn: t.iqn.clone(),
                        lun: l,
                    });
                }
                if let Some(p) = self.target_primary(target) {
                    if p != vol.primary {
                        return Err(Refused::PrimaryMismatch {
                            iqn: iqn.clone(),
                            volume: volume.clone(),
                            target_primary: self.node_name(p),
                            volume_primary: self.node_name(vol.primary),
                        });
                    }
                }
                let lun = match lun {
                    Some(l) if *l > LUN_MAX => return Err(Refused::LunOutOfRange(*l)),
                    Some(l) => {
                        if let Some(v) = target.luns.get(l) {
                            return Err(Refused::LunTaken {
                                iqn: iqn.clone(),
                                lun: *l,
                                volume: v.clone(),
                            });
                        }
                        *l
                    }
                    None => (0..=LUN_MAX)
                        .find(|l| !target.luns.contains_key(l))
                        .ok_or(Refused::LunOutOfRange(LUN_MAX + 1))?,
                };
                self.target_mut(iqn)?.luns.insert(lun, volume.clone());
                Ok(Applied::LunAdded(lun))
            }
            Command::RemoveLun { iqn, lun } => {
                let t = self.target_mut(iqn)?;
                if t.luns.remove(lun).is_none() {
                    return Err(Refused::NoSuchLun {
                        iqn: iqn.clone(),
                        lun: *lun,
                    });
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only LUN commands here"),
        }
    }

    /// Target ACLs: [`Command::AddAcl`] and [`Command::RemoveAcl`].
    pub(super) fn apply_acl(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::AddAcl { iqn, initiator } => {
                check_iscsi_name(initiator)?;
                let t = self.target_mut(iqn)?;
                if !t.acl.insert(initiator.clone()) {
                    return Err(Refused::AclExists {
                        iqn: iqn.clone(),
                        initiator: initiator.clone(),
                    });
                }
                Ok(Applied::Done)
            }
            Command::RemoveAcl { iqn, initiator } => {
                let t = self.target_mut(iqn)?;
                if !t.acl.remove(initiator) {
                    return Err(Refused::NoSuchAcl {
                        iqn: iqn.clone(),
                        initiator: initiator.clone(),
                    });
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only ACL commands here"),
        }
    }

    /// Virtual IPs of targets: [`Command::AddVip`] and [`Command::RemoveVip`].
    pub(super) fn apply_vip(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::AddVip { iqn, vip } => {
                let max = if vip.address.is_ipv4() { 32 } else { 128 };
                if vip.prefix == 0 || vip.prefix > max {
                    return Err(Refused::BadVip(format!(
                        "prefix /{} of {} is not 1..={max}",
                        vip.prefix, vip.address
                    )));
                }
                if vip.address.is_unspecified() || vip.address.is_multicast() {
                    return Err(Refused::BadVip(format!(
                        "{} cannot be a host address",
                        vip.address
                    )));
                }
                let iface_ok = !vip.interface.is_empty()
                    && vip.interface.len() < 16
                    && vip
                        .interface
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
                if !iface_ok {
                    return Err(Refused::BadVip(format!(
                        "{:?} is not an interface name (1 to 15 letters, digits, - _ . @)",
                        vip.interface
                    )));
                }
                if let Some(t) = self
                    .targets
                    .values()
                    .find(|t| t.vips.contains_key(&vip.address))
                {
                    return Err(Refused::VipInUse {
                        iqn: t.iqn.clone(),
                        address: vip.address,
                    });
                }
                let in_use = self.nodes.values().any(|n| {
                    n.addresses.control.ip() == vip.address
                        || n.addresses.replication.ip() == vip.address
                        || n.addresses.portals.iter().any(|p| p.ip() == vip.address)
                });
                if in_use {
                    return Err(Refused::BadVip(format!(
                        "{} is a node's own address; a virtual IP must be free",
                        vip.address
                    )));
                }
                self.target_mut(iqn)?.vips.insert(vip.address, vip.clone());
                Ok(Applied::Done)
            }
            Command::RemoveVip { iqn, address } => {
                if self.target_mut(iqn)?.vips.remove(address).is_none() {
                    return Err(Refused::NoSuchVip {
                        iqn: iqn.clone(),
                        address: *address,
                    });
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only virtual IP commands here"),
        }
    }

    /// CHAP accounts and their binding to targets: [`Command::AddChap`],
    /// [`Command::RemoveChap`], [`Command::BindChap`] and [`Command::UnbindChap`].
    pub(super) fn apply_chap(&mut self, cmd: &Command) -> Result<Applied, Refused> {
        match cmd {
            Command::AddChap { account } => {
                if account.user.is_empty() || account.user.len() > 255 {
                    return Err(Refused::BadName(
                        "a CHAP user name is 1 to 255 characters".into(),
                    ));
                }
                if self.chap.contains_key(&account.user) {
                    return Err(Refused::ChapExists(account.user.clone()));
                }
                let check = |s: &str| {
                    if (CHAP_SECRET_MIN..=255).contains(&s.len()) {
                        Ok(())
                    } else {
                        Err(Refused::ChapSecretLength {
                            len: s.len(),
                            min: CHAP_SECRET_MIN,
                        })
                    }
                };
                check(&account.secret)?;
                if let Some((user, secret)) = &account.mutual {
                    if user.is_empty() {
                        return Err(Refused::BadName(
                            "the mutual CHAP name (the target's CHAP_N) must not be empty".into(),
                        ));
                    }
                    check(secret)?;
                    if *secret == account.secret {
                        return Err(Refused::ChapSameSecret);
                    }
                }
                self.chap.insert(account.user.clone(), account.clone());
                Ok(Applied::Done)
            }
            Command::RemoveChap { user } => {
                if !self.chap.contains_key(user) {
                    return Err(Refused::NoSuchChap(user.clone()));
                }
                let targets: Vec<String> = self
                    .targets
                    .values()
                    .filter(|t| t.chap.contains(user))
                    .map(|t| t.iqn.clone())
                    .collect();
                if !targets.is_empty() {
                    return Err(Refused::ChapBound {
                        user: user.clone(),
                        targets,
                    });
                }
                self.chap.remove(user);
                Ok(Applied::Done)
            }
            Command::BindChap { user, iqn } => {
                if !self.chap.contains_key(user) {
                    return Err(Refused::NoSuchChap(user.clone()));
                }
                let t = self.target_mut(iqn)?;
                if !t.chap.insert(user.clone()) {
                    return Err(Refused::ChapAlreadyBound {
                        user: user.clone(),
                        iqn: iqn.clone(),
                    });
                }
                Ok(Applied::Done)
            }
            Command::UnbindChap { user, iqn } => {
                let t = self.target_mut(iqn)?;
                if !t.chap.remove(user) {
                    return Err(Refused::ChapNotBound {
                        user: user.clone(),
                        iqn: iqn.clone(),
                    });
                }
                Ok(Applied::Done)
            }
            _ => unreachable!("apply routes only CHAP commands here"),
        }
    }
}
