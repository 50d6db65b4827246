//! Snapshots from the command line (issue 21): `bulwark snapshot create|list|delete`.
//! The cluster does the work (the primary takes a snapshot at one point of every
//! volume's stream on each in-sync member); `create` asks for it and waits for the
//! outcome.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use cluster::{ClusterState, Command};

use super::{commit, human, print_json, Conn};

/// `bulwark snapshot ...`
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Takes a snapshot of a volume, or of every volume of a target at the same point
    /// (crash-consistent across its LUNs), on the primary and every in-sync replica.
    /// Writes pause for the few milliseconds the copies take; a copy takes no space
    /// until blocks change. Needs a data folder on a file system with reflinks (XFS,
    /// btrfs). Waits until it is taken.
    Create {
        /// A volume, or a target's IQN (all its volumes).
        source: String,
        /// Snapshot name: letters, digits, '.', '-', '_'.
        name: String,
        /// Return once asked, without waiting for the outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Lists snapshots (of one volume, or of all).
    List {
        /// Only this volume's.
        volume: Option<String>,
    },
    /// Rolls a volume (or every volume of a target) back to a snapshot, on every
    /// in-sync node that holds it (the others are resynced in full). Refused while
    /// initiators are logged in to a target the volume is a LUN of, unless --force,
    /// which ends their sessions first. Waits until it is done.
    Rollback {
        /// A volume, or a target's IQN.
        source: String,
        /// Snapshot name.
        name: String,
        /// End the initiators' sessions first (they log in again and see the
        /// snapshot's data).
        #[arg(long)]
        force: bool,
    },
    /// Deletes a snapshot of a volume, or of every volume of a target: every node
    /// removes its copy.
    Delete {
        /// A volume, or a target's IQN.
        source: String,
        /// Snapshot name.
        name: String,
    },
}

/// The volumes `source` names: itself, or the volumes of the target with that IQN.
fn volumes_of(st: &ClusterState, source: &str) -> Result<Vec<String>> {
    if st.volumes.contains_key(source) {
        return Ok(vec![source.to_string()]);
    }
    match st.targets.get(source) {
        Some(t) if t.luns.is_empty() => bail!("target {source} has no LUN: nothing to snapshot"),
        Some(t) => {
            let mut v = t.volumes();
            v.sort();
            Ok(v)
        }
        None => bail!("no volume or target named {source:?}; `bulwark volume list` and `bulwark target list` show them"),
    }
}

pub async fn run(conn: &Conn, cmd: SnapshotCmd) -> Result<()> {
    let client = conn.client()?;
    match cmd {
        SnapshotCmd::Create {
            source,
            name,
            no_wait,
        } => {
            let volumes = volumes_of(&client.state().await?, &source)?;
            let at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            commit(
                conn,
                Command::CreateSnapshot {
                    volumes: volumes.clone(),
                    name: name.clone(),
                    at_ms,
                },
            )
            .await?;
            if no_wait {
                println!(
                    "snapshot {name} of {} asked for (`bulwark snapshot list` shows when it is taken)",
                    volumes.join(", ")
                );
                return Ok(());
            }
            wait_taken(conn, &volumes, &name).await
        }
        SnapshotCmd::List { volume } => {
            let st = client.state().await?;
            if let Some(v) = &volume {
                if !st.volumes.contains_key(v) {
                    bail!("no volume named {v:?}");
                }
            }
            let rows: Vec<(&String, &String, &cluster::state::Snapshot)> = st
                .volumes
                .values()
                .filter(|v| volume.as_ref().is_none_or(|x| *x == v.name))
                .flat_map(|v| v.snapshots.iter().map(move |(n, s)| (&v.name, n, s)))
                .collect();
            // Where each snapshot is exported read-only, if it is.
            let exported = |v: &str, n: &str| -> Option<(String, u64)> {
                let lun_name = format!("{v}@{n}");
                st.targets.values().find_map(|t| {
                    t.luns
                        .iter()
                        .find(|(_, x)| **x == lun_name)
                        .map(|(l, _)| (t.iqn.clone(), *l))
                })
            };
            if conn.json {
                let json: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(v, n, s)| {
                        let exported = exported(v, n)
                            .map(|(target, lun)| serde_json::json!({ "target": target, "lun": lun }));
                        serde_json::json!({ "volume": v, "name": n, "snapshot": s, "exported": exported })
                    })
                    .collect();
                return print_json(&json);
            }
            if rows.is_empty() {
                println!("no snapshots");
                return Ok(());
            }
            println!(
                "{:<20} {:<24} {:>10} {:<10} {:>12}  {:<24} exported as",
                "volume", "snapshot", "size", "state", "writes held", "members"
            );
            for (v, n, s) in rows {
                let members: Vec<String> = s.members.iter().map(|m| st.node_name(*m)).collect();
                println!(
                    "{:<20} {:<24} {:>10} {:<10} {:>12}  {:<24} {}",
                    v,
                    n,
                    human(s.size_bytes),
                    if s.ready { "taken" } else { "taking" },
                    s.pause_us
                        .map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
                    members.join(", "),
                    exported(v, n)
                        .map_or("-".into(), |(t, l)| format!("LUN {l} of {t} (read-only)"))
                );
            }
            Ok(())
        }
        SnapshotCmd::Rollback {
            source,
            name,
            force,
        } => {
            let st = client.state().await?;
            let volumes = volumes_of(&st, &source)?;
            if !force {
                let targets: Vec<&String> = st
                    .targets
                    .values()
                    .filter(|t| t.luns.values().any(|v| volumes.contains(v)))
                    .map(|t| &t.iqn)
                    .collect();
                let (_, statuses) = client.cluster_status().await?;
                for s in statuses.values().filter_map(|s| s.as_ref().ok()) {
                    if let Some(x) = s.sessions.iter().find(|x| targets.contains(&&x.target)) {
                        bail!(
                            "initiator {} ({}) is logged in to {} through {}: log it out first, or roll back with --force, which ends the target's sessions",
                            x.initiator, x.peer, x.target, s.name
                        );
                    }
                }
            }
            let asked_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            commit(
                conn,
                Command::RollbackSnapshot {
                    volumes: volumes.clone(),
                    name: name.clone(),
                    force,
                },
            )
            .await?;
            wait_rolled_back(conn, &volumes, &name, asked_ms).await
        }
        SnapshotCmd::Delete { source, name } => {
            let volumes = volumes_of(&client.state().await?, &source)?;
            commit(
                conn,
                Command::DeleteSnapshot {
                    volumes: volumes.clone(),
                    name: name.clone(),
                },
            )
            .await?;
            println!(
                "snapshot {name} of {} deleted; every node removes its copy",
                volumes.join(", ")
            );
            Ok(())
        }
    }
}

/// Waits until the rollback of `volumes` to `name` is done, and says how it went (from
/// the primary's event).
async fn wait_rolled_back(
    conn: &Conn,
    volumes: &[String],
    name: &str,
    asked_ms: u64,
) -> Result<()> {
    let client = conn.client()?;
    let started = Instant::now();
    loop {
        let (st, statuses) = client.cluster_status().await?;
        let pending = volumes
            .iter()
            .any(|v| st.volumes.get(v).is_some_and(|v| v.rollback.is_some()));
        if !pending {
            let outcome = statuses
                .values()
                .filter_map(|s| s.as_ref().ok())
                .flat_map(|s| s.events.iter())
                .filter(|e| {
                    e.kind == "snapshot"
                        && e.unix_ms + 5_000 >= asked_ms
                        && (e
                            .message
                            .contains(&format!("rolled back to snapshot {name} ("))
                            || e.message
                                .contains(&format!("rolled back to snapshot {name}:")))
                })
                .max_by_key(|e| e.unix_ms);
            return match outcome {
                Some(e) if e.message.contains("could not") => bail!("{}", e.message),
                Some(e) => {
                    println!("{}", e.message);
                    Ok(())
                }
                None => bail!(
                    "the rollback of {} to {name} ended without a report (a failover abandons it); see `bulwark status`",
                    volumes.join(", ")
                ),
            };
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the rollback to {name} is not done after 60 s; see `bulwark status`");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until snapshot `name` of every volume is taken, or gone (it could not be).
async fn wait_taken(conn: &Conn, volumes: &[String], name: &str) -> Result<()> {
    let client = conn.client()?;
    let started = Instant::now();
    loop {
        let st = client.state().await?;
        let mut taken = Vec::new();
        for v in volumes {
            let vol = st
                .volumes
                .get(v)
                .ok_or_else(|| anyhow!("volume {v} was deleted"))?;
            match vol.snapshots.get(name) {
                None => bail!(
                    "snapshot {name} of {v} could not be taken and was removed on every node; the event log says why (`bulwark status`)"
                ),
                Some(s) if s.ready => taken.push((v, s.clone())),
                Some(_) => {}
            }
        }
        if taken.len() == volumes.len() {
            if conn.json {
                let json: Vec<serde_json::Value> = taken
                    .iter()
                    .map(|(v, s)| serde_json::json!({ "volume": v, "name": name, "snapshot": s }))
                    .collect();
                return print_json(&json);
            }
            let pause = taken.iter().filter_map(|(_, s)| s.pause_us).max();
            let members: Vec<String> = taken[0]
                .1
                .members
                .iter()
                .map(|m| st.node_name(*m))
                .collect();
            println!(
                "snapshot {name} of {} taken on {} (writes held {:.1} ms)",
                volumes.join(", "),
                members.join(", "),
                pause.unwrap_or(0) as f64 / 1000.0
            );
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "snapshot {name} is not taken after 60 s; `bulwark snapshot list` and `bulwark status` show where it is"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
