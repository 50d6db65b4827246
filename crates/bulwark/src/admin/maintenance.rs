//! Nodes in and out of service and replicas moved between them, from the command line:
//! `node drain/undrain/remove --dead` and `volume replicas`. The cluster does the work
//! (the leader moves primaries off drained nodes and rebuilds replicas, see the
//! cluster crate's upkeep); these commands ask for it, and wait and show progress where
//! the administrator needs the outcome.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use cluster::state::{Applied, NodeId};
use cluster::{ClusterState, Command};

use super::{commit, done, human, names, Conn};

/// A change to a volume's replicas (`bulwark volume replicas NAME ...`).
#[derive(Subcommand, Debug)]
pub enum ReplicaChange {
    /// Adds a replica on NODE: it receives a full copy of the data while the volume
    /// serves (only the regions that hold data), then joins the in-sync set.
    Add {
        /// Node name. (Not `node`: that is the global --node.)
        #[arg(value_name = "NODE")]
        to: String,
        /// Wait until it is in sync, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Removes the replica on NODE. Never the primary's (move the volume first), and
    /// refused when it would leave fewer than two in-sync copies, unless --force.
    Remove {
        /// Node name.
        #[arg(value_name = "NODE")]
        from: String,
        /// Remove it even if that leaves a single in-sync copy.
        #[arg(long)]
        force: bool,
    },
    /// Rebuilds OLD's replica on NEW, then removes it from OLD (at once when OLD is out
    /// of sync: down or dead).
    Replace {
        /// The node that gives its replica up.
        old: String,
        /// The node that receives the new replica.
        new: String,
        /// Wait until the new replica is in sync, showing progress.
        #[arg(long)]
        wait: bool,
    },
}

pub async fn replicas(conn: &Conn, volume: &str, change: ReplicaChange) -> Result<()> {
    let (add, remove, force, wait) = match &change {
        ReplicaChange::Add { to, wait } => (Some(to.clone()), None, false, *wait),
        ReplicaChange::Remove { from, force } => (None, Some(from.clone()), *force, false),
        ReplicaChange::Replace { old, new, wait } => {
            (Some(new.clone()), Some(old.clone()), false, *wait)
        }
    };
    let a = commit(
        conn,
        Command::ChangeReplicas {
            volume: volume.to_string(),
            add: add.clone(),
            remove: remove.clone(),
            force,
        },
    )
    .await?;
    let Applied::ReplicasChanged(group) = &a else {
        bail!("unexpected answer from the cluster: {a:?}");
    };
    let with = if group.len() > 1 {
        format!(
            " (with {}: a target's volumes share their nodes)",
            group
                .iter()
                .filter(|g| *g != volume)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        String::new()
    };
    let text = match (&add, &remove) {
        (Some(n), None) => format!(
            "replica of {volume}{with} added on {n}; it is rebuilt while the volume serves (`bulwark status` shows the progress)"
        ),
        (None, Some(n)) => format!("replica of {volume}{with} removed from {n}"),
        (Some(n), Some(o)) => format!(
            "replica of {volume}{with} is rebuilt on {n}; {o} keeps its replica until then, unless it was out of sync"
        ),
        (None, None) => unreachable!("every change names a node"),
    };
    done(conn, &a, text)?;
    if let (Some(node), true) = (add, wait) {
        wait_rebuilt(conn, group, &node).await?;
    }
    Ok(())
}

/// Waits until `node` is in sync for every volume of `group`, printing the progress.
async fn wait_rebuilt(conn: &Conn, group: &[String], node: &str) -> Result<()> {
    let client = conn.client()?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    // The node asked may apply the change a moment after the leader did: until every
    // volume shows the new replica once, its absence means "not applied here yet".
    let mut seen = false;
    loop {
        let (st, statuses) = client.cluster_status().await?;
        let id = st
            .node_by_name(node)
            .ok_or_else(|| anyhow!("node {node} left the cluster"))?
            .id;
        let mut pending = Vec::new();
        let placed = group
            .iter()
            .all(|g| st.volumes.get(g).is_some_and(|v| v.replicas.contains(&id)));
        if !seen && !placed {
            if started.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the change is not visible on the node asked after 10 s (see `bulwark status`)"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        seen = true;
        for g in group {
            let v = st
                .volumes
                .get(g)
                .ok_or_else(|| anyhow!("volume {g} was deleted"))?;
            if !v.replicas.contains(&id) {
                bail!("the replica of {g} on {node} was removed before it was in sync (see `bulwark status` and the events)");
            }
            if !v.in_sync.contains(&id) {
                pending.push((v, progress_of(&statuses, v, id)));
            }
        }
        if pending.is_empty() {
            println!(
                "{} in sync on {node} after {:.1} s",
                group.join(", "),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            for (v, p) in &pending {
                println!("  {}: {}", v.name, p.as_deref().unwrap_or("waiting"));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// "REBUILD to n3 45% (460 MiB of 1.0 GiB), 98 MiB/s, 6 s left", as the primary reports.
fn progress_of(
    statuses: &super::Statuses,
    v: &cluster::state::Volume,
    id: NodeId,
) -> Option<String> {
    let s = statuses.get(&v.primary)?.as_ref().ok()?;
    let x = s.volumes.iter().find(|x| x.name == v.name)?;
    let r = x.resyncs.iter().find(|r| r.node == id)?;
    let region = serving::REGION_SIZE;
    Some(format!(
        "{:.0}% ({} of {}), {}/s",
        r.percent(),
        human(r.done_regions * region),
        human((r.done_regions + r.pending_regions) * region),
        human(r.rate_bytes_per_s)
    ))
}

pub async fn drain(conn: &Conn, name: &str, evacuate: bool, no_wait: bool) -> Result<()> {
    let a = commit(
        conn,
        Command::DrainNode {
            name: name.to_string(),
            drained: true,
            evacuate,
        },
    )
    .await?;
    let what = if evacuate {
        "its primaries move to other in-sync replicas by planned moves, and its replicas are rebuilt on other nodes, then removed from it"
    } else {
        "its primaries move to other in-sync replicas by planned moves; its replicas stay and keep in sync"
    };
    done(conn, &a, format!("node {name} drained: {what}"))?;
    if no_wait {
        return Ok(());
    }
    let client = conn.client()?;
    let started = Instant::now();
    let mut last = String::new();
    let mut stuck_since = Instant::now();
    loop {
        let st = client.state().await?;
        let id = st
            .node_by_name(name)
            .ok_or_else(|| anyhow!("node {name} left the cluster"))?
            .id;
        let primaries = primaries_on(&st, id);
        let held = if evacuate {
            st.volumes
                .values()
                .filter(|v| v.replicas.contains(&id))
                .map(|v| v.name.clone())
                .collect()
        } else {
            Vec::new()
        };
        if primaries.is_empty() && held.is_empty() {
            println!(
                "node {name} holds {} after {:.1} s; `bulwark node undrain {name}` puts it back in service{}",
                if evacuate { "no replica" } else { "no primary" },
                started.elapsed().as_secs_f64(),
                if evacuate {
                    format!(", `bulwark node remove {name}` removes it")
                } else {
                    String::new()
                }
            );
            return Ok(());
        }
        let now = format!(
            "primary of: {}; replicas left: {}",
            list(&primaries),
            if evacuate { list(&held) } else { "-".into() }
        );
        if now != last {
            println!("  {now}");
            last = now;
            stuck_since = Instant::now();
        }
        // Moves take well under a second; a volume that stays is one with no other
        // in-sync replica online (a rebuild shows progress in `bulwark status`).
        if !primaries.is_empty() && stuck_since.elapsed() > Duration::from_secs(30) {
            bail!(
                "{} cannot move off {name}: no other in-sync replica is online and not drained (see `bulwark status`; a volume with one copy needs another first: `bulwark volume replicas VOLUME add NODE`); the drain stays in effect",
                list(&primaries)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn primaries_on(st: &ClusterState, id: NodeId) -> Vec<String> {
    st.volumes
        .values()
        .filter(|v| v.primary == id)
        .map(|v| v.name.clone())
        .collect()
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

pub async fn undrain(conn: &Conn, name: &str) -> Result<()> {
    let a = commit(
        conn,
        Command::DrainNode {
            name: name.to_string(),
            drained: false,
            evacuate: false,
        },
    )
    .await?;
    done(
        conn,
        &a,
        format!("node {name} is back in service (primaries stay where they are; `bulwark volume move` moves one back)"),
    )
}

/// `node remove NAME --dead`: gives a node that will never return up.
pub async fn remove_dead(conn: &Conn, name: &str, yes: bool) -> Result<()> {
    let client = conn.client()?;
    let (st, statuses) = client.cluster_status().await?;
    let node = st
        .node_by_name(name)
        .ok_or_else(|| anyhow!("no node named {name:?}; `bulwark node list` shows the members"))?;
    let id = node.id;
    let answered = statuses.get(&id).is_some_and(|s| s.is_ok());
    let live = statuses
        .values()
        .filter_map(|s| s.as_ref().ok())
        .find_map(|s| s.peers.iter().find(|p| p.node == id).cloned());
    // It must have been silent past the failure timeout and a whole lease: by then the
    // leader has failed its primaries over, and it serves nothing.
    let quiet_ms = st.settings.failure_timeout_ms + cluster::node::LEASE.as_millis() as u64;
    if answered || live.as_ref().is_some_and(|l| l.online) {
        bail!("{name} is online (it answers heartbeats): a node that is alive is drained and evacuated instead (`bulwark node drain {name} --evacuate`), then removed (`bulwark node remove {name}`)");
    }
    if let Some(ms) = live
        .and_then(|l| l.last_heard_ms)
        .filter(|ms| *ms < quiet_ms)
    {
        bail!(
            "{name} was heard from {:.1} s ago; a node is given up only after {:.1} s of silence (the failure timeout and a lease), once its primaries have failed over",
            ms as f64 / 1000.0,
            quiet_ms as f64 / 1000.0
        );
    }
    let held: Vec<String> = st
        .volumes
        .values()
        .filter(|v| v.replicas.contains(&id))
        .map(|v| v.name.clone())
        .collect();
    if !yes {
        bail!(
            "this gives up {name} for good: its replicas of {} are dropped (each is rebuilt on a node with room), its certificate is no longer accepted and its id is never reused. Add --yes to confirm",
            list(&held)
        );
    }
    let a = commit(
        conn,
        Command::RemoveNode {
            name: name.to_string(),
            dead: true,
        },
    )
    .await?;
    let st = client.state().await?;
    let mut lines = vec![format!(
        "node {name} removed for good (id {id} is never reused; its certificate is no longer accepted)"
    )];
    if let Applied::DeadNodeRemoved(volumes) = &a {
        for (v, new) in volumes {
            lines.push(match new {
                Some(n) => format!("  {v}: rebuilding a replica on {}", names(&st, &[*n])),
                None => format!(
                    "  {v}: no node has room for another replica; it runs with one less until one has (the cluster adds it then)"
                ),
            });
        }
    }
    done(conn, &a, lines.join("\n"))
}
