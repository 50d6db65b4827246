//! `bulwark status`: the whole cluster on one screen (nodes, volumes, targets, sessions,
//! events), and the tables the `node`, `volume` and `target` lists share with it.

use super::*;

/// `bulwark status`: one screen, like crm_mon.
pub async fn status(conn: &Conn, watch: bool, interval: Duration) -> Result<()> {
    let client = conn.client()?;
    loop {
        let view = client.cluster_status().await;
        if conn.json {
            let (st, statuses) = view?;
            print_json(&serde_json::json!({ "state": st, "nodes": statuses }))?;
        } else {
            let text = match view {
                Ok((st, statuses)) => render_status(&st, &statuses, &conn.node),
                Err(e) if watch => format!("cannot get the status from {}: {e:#}\n", conn.node),
                Err(e) => return Err(e.into()),
            };
            if watch {
                // Clear the screen and home the cursor, like watch(1).
                print!("\x1b[2J\x1b[H");
            }
            print!("{text}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = crate::signals::shutdown_signal() => return Ok(()),
        }
    }
}

/// The answering node's view: the first status that answered, the local one first.
fn leader_of(statuses: &Statuses) -> Option<(NodeId, u64)> {
    statuses
        .values()
        .filter_map(|s| s.as_ref().ok())
        .filter_map(|s| s.raft.leader.map(|l| (l, s.raft.term)))
        .max_by_key(|(_, t)| *t)
}

pub fn render_status(st: &ClusterState, statuses: &Statuses, via: &str) -> String {
    let mut out = String::new();
    let now = chrono_like_now();
    let leader = leader_of(statuses);
    let voters: Vec<NodeId> = statuses
        .values()
        .filter_map(|s| s.as_ref().ok())
        .find(|s| leader.is_some_and(|(l, _)| s.node == l))
        .or_else(|| statuses.values().filter_map(|s| s.as_ref().ok()).next())
        .map(|s| s.raft.voters.clone())
        .unwrap_or_default();
    let online_voters = voters
        .iter()
        .filter(|v| statuses.get(v).is_some_and(|s| s.is_ok()))
        .count();
    let quorum = voters.len() / 2 + 1;
    let _ = writeln!(out, "Bulwark cluster status at {now} (via {via})");
    let _ = writeln!(
        out,
        "{} node(s); leader: {}; quorum: {} ({online_voters} of {} voters reachable, {quorum} needed)",
        st.nodes.len(),
        match leader {
            Some((l, term)) => format!("{} (term {term})", names(st, &[l])),
            None => "NONE".into(),
        },
        if online_voters >= quorum && !voters.is_empty() {
            "OK"
        } else {
            "LOST"
        },
        voters.len()
    );
    out.push('\n');
    render_nodes(&mut out, st, statuses);
    out.push('\n');
    render_volumes(&mut out, st, statuses);
    out.push('\n');
    render_targets(&mut out, st, statuses);
    out.push('\n');
    let mut events: Vec<&cluster::status::Event> = statuses
        .values()
        .filter_map(|s| s.as_ref().ok())
        .flat_map(|s| s.events.iter())
        .collect();
    events.sort_by_key(|e| e.unix_ms);
    let _ = writeln!(out, "Recent events:");
    if events.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for e in events.iter().rev().take(12).rev() {
        let _ = writeln!(
            out,
            "  {}  [{}] {}",
            format_time(e.unix_ms),
            e.observer,
            e.message
        );
    }
    out
}

pub(super) fn render_nodes(out: &mut String, st: &ClusterState, statuses: &Statuses) {
    let _ = writeln!(out, "Nodes:");
    let any = statuses.values().filter_map(|s| s.as_ref().ok()).next();
    for n in st.nodes.values() {
        let status = statuses.get(&n.id);
        let raft_role = match status {
            Some(Ok(s)) => s.raft.state.to_lowercase(),
            _ => {
                if any.is_some_and(|a| a.raft.voters.contains(&n.id)) {
                    "voter".into()
                } else {
                    "learner".into()
                }
            }
        };
        // Liveness as the answering node's heartbeats see it.
        let live = any.and_then(|a| a.peers.iter().find(|p| p.node == n.id));
        let liveness = match (status, live) {
            (Some(Ok(_)), Some(l)) if l.online => {
                let nets: Vec<String> = n
                    .addresses
                    .networks()
                    .iter()
                    .zip(&l.networks)
                    .map(|(ip, up)| format!("{ip} {}", if *up { "up" } else { "DOWN" }))
                    .collect();
                format!("online [{}]", nets.join(", "))
            }
            (Some(Ok(_)), _) => "online".into(),
            (_, Some(l)) if l.online => "online (status not answered)".into(),
            (_, Some(l)) => match l.last_heard_ms {
                Some(ms) => format!("OFFLINE (last heard {:.1} s ago)", ms as f64 / 1000.0),
                None => "OFFLINE (never heard)".into(),
            },
            _ => "OFFLINE".into(),
        };
        let disk = match status {
            Some(Ok(s)) => s.disk.map(|d| {
                format!(
                    "; disk {} free of {}{}",
                    human(d.free_bytes),
                    human(d.total_bytes),
                    if serving::space::is_low(&d) {
                        " (LOW)"
                    } else {
                        ""
                    }
                )
            }),
            _ => None,
        };
        let space = match n.role {
            NodeRole::Witness => "no data".to_string(),
            NodeRole::Storage => format!(
                "{} of {} placed{}{}",
                human(st.allocated_bytes(n.id)),
                human(n.capacity_bytes),
                disk.unwrap_or_default(),
                if n.shares_blocks == Some(false) {
                    "; no reflink (no snapshots)"
                } else {
                    ""
                }
            ),
        };
        let _ = writeln!(
            out,
            "  {:<12} {:<8} {:<10} {}  control {}  {}{}{}",
            n.name,
            n.role,
            raft_role,
            liveness,
            n.addresses.control,
            space,
            n.zone
                .as_ref()
                .map(|z| format!("  zone {z}"))
                .unwrap_or_default(),
            match (n.drained, n.evacuate) {
                (true, true) => "  DRAINED, EVACUATING",
                (true, false) => "  DRAINED",
                _ => "",
            }
        );
        if let Some(Ok(s)) = status {
            let _ = writeln!(
                out,
                "  {:<12} raft: last log {} applied {} snapshot {} ({} entries on disk); replication {}",
                "",
                opt(s.raft.last_log_index),
                opt(s.raft.last_applied),
                opt(s.raft.snapshot_index),
                s.raft.log_entries,
                if s.replication_plaintext {
                    "IN THE CLEAR (--replication-tls off)"
                } else {
                    "TLS"
                }
            );
        }
    }
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub(super) fn render_volumes(out: &mut String, st: &ClusterState, statuses: &Statuses) {
    let _ = writeln!(out, "Volumes:");
    if st.volumes.is_empty() {
        let _ = writeln!(out, "  (none; `bulwark volume create NAME SIZE`)");
    }
    for v in st.volumes.values() {
        let mapped = st
            .mapping_of(&v.name)
            .map(|(t, l)| format!("LUN {l} of {}", t.iqn))
            .unwrap_or_else(|| "not mapped".into());
        let joining: Vec<NodeId> = v
            .joining
            .iter()
            .map(|j| j.node)
            .filter(|n| !v.in_sync.contains(n))
            .collect();
        let behind: Vec<NodeId> = v
            .replicas
            .iter()
            .copied()
            .filter(|r| !v.in_sync.contains(r) && !joining.contains(r))
            .collect();
        let mut health = Vec::new();
        if !behind.is_empty() {
            health.push(format!("DEGRADED: {} out of sync", names(st, &behind)));
        }
        if !joining.is_empty() {
            health.push(format!("REBUILDING on {}", names(st, &joining)));
        }
        if v.lasting_replicas().count() < v.wanted() {
            health.push(format!(
                "SHORT of replicas: {} of {} wanted",
                v.lasting_replicas().count(),
                v.wanted()
            ));
        }
        let health = if health.is_empty() {
            "in sync".to_string()
        } else {
            health.join(", ")
        };
        let _ = writeln!(
            out,
            "  {:<12} {:>10}  {}-byte blocks  primary {}  replicas {}  epoch {}  {}  {}",
            v.name,
            human(v.size_bytes),
            v.block_size,
            names(st, &[v.primary]),
            names(st, &v.replicas),
            v.epoch,
            health,
            mapped
        );
        // What each node runs for it, as it reports.
        let mut parts = Vec::new();
        for s in statuses.values().filter_map(|s| s.as_ref().ok()) {
            if let Some(x) = s.volumes.iter().find(|x| x.name == v.name) {
                parts.push(if x.role == "primary" {
                    let resync = if x.resyncs.is_empty() && x.resync_pending_regions > 0 {
                        format!(
                            ", RESYNC: {} MiB to go, {} MiB sent",
                            x.resync_pending_regions, x.resync_regions_sent
                        )
                    } else if x.resyncs.is_empty() {
                        format!(", {} MiB resynced", x.resync_regions_sent)
                    } else {
                        let each: Vec<String> = x
                            .resyncs
                            .iter()
                            .map(|r| {
                                let rebuild = v.joining.iter().any(|j| j.node == r.node);
                                resync_line(st, r, rebuild)
                            })
                            .collect();
                        format!(", {}", each.join(", "))
                    };
                    let state = match (&x.error, x.serving) {
                        (Some(e), _) => format!("FAILED ({e}), handing over"),
                        (None, true) => "serving".into(),
                        (None, false) => "NOT SERVING".into(),
                    };
                    format!(
                        "{}: primary epoch {} {state} ({} writes, {} on disk{resync})",
                        s.name,
                        x.epoch,
                        x.writes_completed,
                        human(x.allocated_bytes),
                    )
                } else {
                    match &x.error {
                        Some(e) => format!(
                            "{}: replica STOPPED ({e}); it returns when its node restarts",
                            s.name
                        ),
                        None => {
                            format!("{}: replica ({} on disk)", s.name, human(x.allocated_bytes))
                        }
                    }
                });
            }
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "  {:<12} {}", "", parts.join("; "));
        }
        if !v.snapshots.is_empty() || v.rollback.is_some() {
            let each: Vec<String> = v
                .snapshots
                .iter()
                .map(|(n, s)| {
                    if s.ready {
                        n.clone()
                    } else {
                        format!("{n} (being taken)")
                    }
                })
                .collect();
            let rollback = v.rollback.as_ref().map_or(String::new(), |r| {
                format!("; ROLLING BACK to {}", r.snapshot)
            });
            let _ = writeln!(out, "  {:<12} snapshots: {}{rollback}", "", each.join(", "));
        }
        if !v.primary_reason.is_empty() {
            let _ = writeln!(
                out,
                "  {:<12} primary {} since epoch {}: {}",
                "",
                names(st, &[v.primary]),
                v.epoch,
                v.primary_reason
            );
        }
        if let Some(asked) = &v.verify {
            let line = match &asked.result {
                Some(r) => format!("last verify: {}", r.summary(st, asked.repair)),
                None => {
                    let live = live_verify(statuses, v, asked.id);
                    match live {
                        Some(x) => format!(
                            "VERIFY running: {:.0}% ({} of {} regions), {} differing so far",
                            x.compared as f64 * 100.0 / x.regions.max(1) as f64,
                            x.compared,
                            x.regions,
                            x.differing
                        ),
                        None => "VERIFY asked for; waiting for the primary to start it".into(),
                    }
                }
            };
            let _ = writeln!(out, "  {:<12} {line}", "");
        }
    }
}

/// "RESYNC to n3 45% (460 MiB of 1.0 GiB), 98 MiB/s, 6 s left" (1 MiB regions).
fn resync_line(st: &ClusterState, r: &cluster::status::ResyncView, rebuild: bool) -> String {
    const REGION: u64 = serving::REGION_SIZE;
    let total = (r.done_regions + r.pending_regions) * REGION;
    let head = format!(
        "{} to {} {:.0}% ({} of {})",
        if rebuild { "REBUILD" } else { "RESYNC" },
        names(st, &[r.node]),
        r.percent(),
        human(r.done_regions * REGION),
        human(total)
    );
    if !r.connected {
        return format!("{head}, waiting for the replica to connect");
    }
    match r.time_left(REGION) {
        Some(left) => format!(
            "{head}, {}/s, {} left",
            human(r.rate_bytes_per_s),
            human_duration(left)
        ),
        None => format!("{head}, starting"),
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64().ceil() as u64;
    match s {
        0..=99 => format!("{} s", s.max(1)),
        100..=5999 => format!("{} min", s.div_ceil(60)),
        _ => format!("{:.1} h", s as f64 / 3600.0),
    }
}

pub(super) fn render_targets(out: &mut String, st: &ClusterState, statuses: &Statuses) {
    let _ = writeln!(out, "Targets:");
    if st.targets.is_empty() {
        let _ = writeln!(out, "  (none; `bulwark target create IQN`)");
    }
    for t in st.targets.values() {
        let served_by = st
            .target_primary(t)
            .map(|p| {
                let portals: Vec<String> = st
                    .nodes
                    .get(&p)
                    .map(|n| n.addresses.portals.iter().map(|a| a.to_string()).collect())
                    .unwrap_or_default();
                format!("served by {} on {}", names(st, &[p]), portals.join(", "))
            })
            .unwrap_or_else(|| "no LUNs, not served".into());
        let _ = writeln!(out, "  {}  {served_by}", t.iqn);
        // Every node holding the volumes is a path (one target port group each).
        let paths: Vec<String> = serving::port_groups(st, t)
            .iter()
            .map(|g| {
                let node = st.nodes.get(&u64::from(g.id));
                let portals: Vec<String> = node
                    .map(|n| n.addresses.portals.iter().map(|a| a.to_string()).collect())
                    .unwrap_or_default();
                format!(
                    "{} {} {}",
                    node.map_or_else(|| format!("#{}", g.id), |n| n.name.clone()),
                    portals.join(","),
                    g.state
                )
            })
            .collect();
        if !paths.is_empty() {
            let _ = writeln!(out, "    paths (ALUA): {}", paths.join("; "));
        }
        for (lun, name) in &t.luns {
            let _ = match cluster::state::lun_backing(name) {
                (vol, Some(snap)) => writeln!(
                    out,
                    "    LUN {lun}: snapshot {snap} of volume {vol} (read-only)"
                ),
                _ => writeln!(out, "    LUN {lun}: volume {name}"),
            };
        }
        for v in t.vips.values() {
            let _ = writeln!(
                out,
                "    virtual IP: {}/{} on {} (portal {})",
                v.address,
                v.prefix,
                v.interface,
                SocketAddr::new(v.address, 3260)
            );
        }
        let _ = writeln!(
            out,
            "    ACL: {}   CHAP: {}",
            if t.acl.is_empty() {
                "any initiator".to_string()
            } else {
                t.acl.iter().cloned().collect::<Vec<_>>().join(", ")
            },
            if t.chap.is_empty() {
                "none".to_string()
            } else {
                t.chap.iter().cloned().collect::<Vec<_>>().join(", ")
            }
        );
        for s in statuses.values().filter_map(|s| s.as_ref().ok()) {
            for sess in s.sessions.iter().filter(|x| x.target == t.iqn) {
                let _ = writeln!(
                    out,
                    "    session: {} from {} on {}",
                    sess.initiator, sess.peer, s.name
                );
            }
        }
    }
}

fn chrono_like_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format_time(ms)
}
