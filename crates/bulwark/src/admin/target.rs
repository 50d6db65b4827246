//! `bulwark target`, `lun`, `acl` and `chap`: what initiators see and who may log in.

use super::*;

#[derive(Subcommand, Debug)]
pub enum TargetCmd {
    /// Creates an iSCSI target.
    Create {
        /// IQN, like iqn.2026-11.com.example:storage.
        iqn: String,
        /// TargetAlias.
        #[arg(long)]
        alias: Option<String>,
    },
    /// Lists targets.
    List,
    /// Deletes a target (its volumes stay).
    Delete {
        /// IQN.
        iqn: String,
    },
    /// Gives a target a virtual IP that follows its primary (added to INTERFACE of the
    /// serving node, announced by gratuitous ARP, with a portal on port 3260), for
    /// initiators without multipath.
    AddVip {
        /// IQN.
        iqn: String,
        /// ADDRESS/PREFIX, like 198.18.0.100/24.
        address: String,
        /// The interface it goes on (same name on every storage node).
        #[arg(long)]
        interface: String,
    },
    /// Takes a virtual IP from a target; the serving node removes it.
    RemoveVip {
        /// IQN.
        iqn: String,
        /// The address.
        address: std::net::IpAddr,
    },
    /// Lets any initiator log in to the target while no ACL entry and no CHAP binding
    /// says who may (a new target admits nobody). Same as `settings IQN --allow-any on`.
    AllowAny {
        /// IQN.
        iqn: String,
    },
    /// Who may log in without an ACL entry, and whether initiators may reset the whole
    /// target.
    Settings {
        /// IQN.
        iqn: String,
        /// on: admit any initiator while neither ACL nor CHAP says who; off: admit
        /// only those (the default).
        #[arg(long, value_parser = ["on", "off"])]
        allow_any: Option<String>,
        /// on: TARGET WARM/COLD RESET from an initiator is carried out (it ends every
        /// session of the target on every node); off: refused (the default, as LIO).
        #[arg(long, value_parser = ["on", "off"])]
        allow_target_reset: Option<String>,
    },
    /// How the target's ports on in-sync nodes other than the primary serve I/O:
    /// `non-optimized` (the default: active/non-optimized, every command forwarded to
    /// the primary) or `standby` (only management commands; multipath uses them once
    /// they become the primary).
    Paths {
        /// IQN.
        iqn: String,
        /// non-optimized or standby.
        #[arg(value_parser = ["non-optimized", "standby"])]
        mode: String,
    },
}

/// Parses ADDRESS/PREFIX.
fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8)> {
    let (a, p) = s.split_once('/').with_context(|| {
        format!("{s:?}: write the address with its prefix, like 198.18.0.100/24")
    })?;
    let address = a
        .parse()
        .with_context(|| format!("{a:?} is not an IP address"))?;
    let prefix = p
        .parse()
        .with_context(|| format!("{p:?} is not a prefix length"))?;
    Ok((address, prefix))
}

#[derive(Subcommand, Debug)]
pub enum LunCmd {
    /// Maps a volume, or a snapshot read-only (VOLUME@SNAPSHOT --read-only), as a LUN
    /// of a target; live sessions see REPORTED LUNS DATA HAS CHANGED.
    Add {
        /// Target IQN.
        iqn: String,
        /// Volume name, or VOLUME@SNAPSHOT for a snapshot (with --read-only).
        volume: String,
        /// LUN number (default: the lowest free).
        #[arg(long)]
        lun: Option<u64>,
        /// Export read-only: writes fail with DATA PROTECT. Snapshots only (a
        /// snapshot never changes); a volume is always exported writable.
        #[arg(long)]
        read_only: bool,
    },
    /// Unmaps a LUN.
    Remove {
        /// Target IQN.
        iqn: String,
        /// LUN number.
        lun: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum AclCmd {
    /// Allows an initiator on a target (a target with no entries allows every initiator).
    Add {
        /// Target IQN.
        iqn: String,
        /// Initiator IQN.
        initiator: String,
    },
    /// Removes an initiator from a target's ACL.
    Remove {
        /// Target IQN.
        iqn: String,
        /// Initiator IQN.
        initiator: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ChapCmd {
    /// Defines a CHAP account (then bind it to targets).
    Add {
        /// User name the initiator logs in with.
        user: String,
        /// Initiator secret, 12 to 255 characters (or BULWARK_CHAP_SECRET).
        #[arg(long, env = "BULWARK_CHAP_SECRET", hide_env_values = true)]
        secret: String,
        /// For mutual CHAP: the name the target answers with.
        #[arg(long, requires = "mutual_secret")]
        mutual_user: Option<String>,
        /// For mutual CHAP: the target's secret.
        #[arg(long, requires = "mutual_user")]
        mutual_secret: Option<String>,
    },
    /// Lists accounts (without secrets) and the targets they are bound to.
    List {
        /// Show the secrets too (admin token or node certificate).
        #[arg(long)]
        show_secrets: bool,
    },
    /// Deletes an account that no target uses.
    Remove {
        /// User name.
        user: String,
    },
    /// Requires the account on a target.
    Bind {
        /// User name.
        user: String,
        /// Target IQN.
        iqn: String,
    },
    /// Unbinds the account from a target.
    Unbind {
        /// User name.
        user: String,
        /// Target IQN.
        iqn: String,
    },
}

pub async fn target(conn: &Conn, cmd: TargetCmd) -> Result<()> {
    let (c, text) = match cmd {
        TargetCmd::List => {
            let (st, statuses) = conn.client()?.cluster_status().await?;
            if conn.json {
                return print_json(&st.targets);
            }
            let mut out = String::new();
            render_targets(&mut out, &st, &statuses);
            print!("{out}");
            return Ok(());
        }
        TargetCmd::Create { iqn, alias } => (
            Command::CreateTarget {
                iqn: iqn.clone(),
                alias,
            },
            format!("target {iqn} created; it admits no initiator until you run `bulwark acl add {iqn} INITIATOR`, `bulwark chap bind USER {iqn}` or `bulwark target allow-any {iqn}`; map volumes with `bulwark lun add {iqn} VOLUME`"),
        ),
        TargetCmd::Delete { iqn } => (
            Command::DeleteTarget { iqn: iqn.clone() },
            format!("target {iqn} deleted"),
        ),
        TargetCmd::AddVip {
            iqn,
            address,
            interface,
        } => {
            let (address, prefix) = parse_cidr(&address)?;
            (
                Command::AddVip {
                    iqn: iqn.clone(),
                    vip: cluster::state::VirtualIp {
                        address,
                        prefix,
                        interface: interface.clone(),
                    },
                },
                format!("{address}/{prefix} on {interface} follows the primary of {iqn}; portal {address}:3260"),
            )
        }
        TargetCmd::RemoveVip { iqn, address } => (
            Command::RemoveVip {
                iqn: iqn.clone(),
                address,
            },
            format!("{address} removed from {iqn}"),
        ),
        TargetCmd::AllowAny { iqn } => (
            Command::SetTargetAccess {
                iqn: iqn.clone(),
                allow_any: Some(true),
                allow_target_reset: None,
            },
            format!(
                "{iqn} admits any initiator while it has no ACL entry and no CHAP binding (`bulwark target settings {iqn} --allow-any off` undoes it)"
            ),
        ),
        TargetCmd::Settings {
            iqn,
            allow_any,
            allow_target_reset,
        } => {
            if allow_any.is_none() && allow_target_reset.is_none() {
                bail!("nothing to change: give --allow-any and/or --allow-target-reset");
            }
            let on = |v: &Option<String>| v.as_deref().map(|v| v == "on");
            (
                Command::SetTargetAccess {
                    iqn: iqn.clone(),
                    allow_any: on(&allow_any),
                    allow_target_reset: on(&allow_target_reset),
                },
                format!("settings of {iqn} changed"),
            )
        }
        TargetCmd::Paths { iqn, mode } => (
            Command::SetTargetPaths {
                iqn: iqn.clone(),
                standby: mode == "standby",
            },
            format!(
                "ports of {iqn} on the other in-sync nodes are now {}",
                if mode == "standby" {
                    "standby"
                } else {
                    "active/non-optimized"
                }
            ),
        ),
    };
    let a = commit(conn, c).await?;
    done(conn, &a, text)
}

pub async fn lun(conn: &Conn, cmd: LunCmd) -> Result<()> {
    let (c, text) = match cmd {
        LunCmd::Add {
            iqn,
            volume,
            lun,
            read_only,
        } => {
            let text = match (cluster::state::lun_backing(&volume), read_only) {
                ((v, Some(s)), true) => format!("snapshot {s} of {v} mapped read-only to {iqn}"),
                ((_, Some(_)), false) => bail!(
                    "{volume} is a snapshot, which is exported read-only: add --read-only"
                ),
                ((_, None), true) => bail!(
                    "a volume is exported writable; to export it read-only, take a snapshot (`bulwark snapshot create {volume} NAME`) and add {volume}@NAME --read-only"
                ),
                ((_, None), false) => format!("volume {volume} mapped to {iqn}"),
            };
            (
                Command::AddLun {
                    iqn: iqn.clone(),
                    lun,
                    volume: volume.clone(),
                },
                text,
            )
        }
        LunCmd::Remove { iqn, lun } => (
            Command::RemoveLun {
                iqn: iqn.clone(),
                lun,
            },
            format!("LUN {lun} removed from {iqn}"),
        ),
    };
    let a = commit(conn, c).await?;
    let text = match a {
        Applied::LunAdded(l) => format!("{text} as LUN {l}"),
        _ => text,
    };
    done(conn, &a, text)
}

pub async fn acl(conn: &Conn, cmd: AclCmd) -> Result<()> {
    let (c, text) = match cmd {
        AclCmd::Add { iqn, initiator } => (
            Command::AddAcl {
                iqn: iqn.clone(),
                initiator: initiator.clone(),
            },
            format!("{initiator} may log in to {iqn}"),
        ),
        AclCmd::Remove { iqn, initiator } => (
            Command::RemoveAcl {
                iqn: iqn.clone(),
                initiator: initiator.clone(),
            },
            format!("{initiator} removed from the ACL of {iqn}"),
        ),
    };
    let a = commit(conn, c).await?;
    done(conn, &a, text)
}

pub async fn chap(conn: &Conn, cmd: ChapCmd) -> Result<()> {
    let (c, text) = match cmd {
        ChapCmd::List { show_secrets } => {
            let client = conn.client()?;
            let st = if show_secrets {
                client.state_with_secrets().await?
            } else {
                client.state().await?
            };
            let rows: Vec<serde_json::Value> = st
                .chap
                .values()
                .map(|a| {
                    let bound: Vec<&String> = st
                        .targets
                        .values()
                        .filter(|t| t.chap.contains(&a.user))
                        .map(|t| &t.iqn)
                        .collect();
                    let mut row = serde_json::json!({
                        "user": a.user,
                        "mutual_user": a.mutual.as_ref().map(|m| &m.0),
                        "targets": bound,
                    });
                    if show_secrets {
                        row["secret"] = a.secret.clone().into();
                        row["mutual_secret"] = a.mutual.as_ref().map(|m| m.1.clone()).into();
                    }
                    row
                })
                .collect();
            if conn.json {
                return print_json(&rows);
            }
            if rows.is_empty() {
                println!("no CHAP accounts");
            }
            for r in rows {
                println!(
                    "{}  mutual: {}  targets: {}{}",
                    r["user"].as_str().unwrap_or(""),
                    r["mutual_user"].as_str().unwrap_or("no"),
                    r["targets"],
                    match (r["secret"].as_str(), r["mutual_secret"].as_str()) {
                        (Some(s), Some(m)) => format!("  secret: {s}  mutual secret: {m}"),
                        (Some(s), None) => format!("  secret: {s}"),
                        _ => String::new(),
                    }
                );
            }
            return Ok(());
        }
        ChapCmd::Add {
            user,
            secret,
            mutual_user,
            mutual_secret,
        } => (
            Command::AddChap {
                account: ChapAccount {
                    user: user.clone(),
                    secret,
                    mutual: mutual_user.zip(mutual_secret),
                },
            },
            format!("CHAP account {user} defined; bind it with `bulwark chap bind {user} IQN`"),
        ),
        ChapCmd::Remove { user } => (
            Command::RemoveChap { user: user.clone() },
            format!("CHAP account {user} removed"),
        ),
        ChapCmd::Bind { user, iqn } => (
            Command::BindChap {
                user: user.clone(),
                iqn: iqn.clone(),
            },
            format!("{iqn} now requires CHAP; {user} may log in"),
        ),
        ChapCmd::Unbind { user, iqn } => (
            Command::UnbindChap {
                user: user.clone(),
                iqn: iqn.clone(),
            },
            format!("{user} unbound from {iqn}"),
        ),
    };
    let a = commit(conn, c).await?;
    done(conn, &a, text)
}
