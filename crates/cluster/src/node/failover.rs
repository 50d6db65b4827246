//! The leader's failover loop: a primary that holds no lease is replaced, once any lease
//! it could hold has expired, after the fence program (if any) has run.

use super::*;

impl ClusterNode {
    /// Leader only: promotes a new primary for every volume (a target's volumes
    /// together) whose primary holds no lease, once any lease it could hold has expired.
    pub(super) async fn watch_primaries(self) {
        let me = self.id();
        let mut offline_reported: std::collections::HashSet<String> = Default::default();
        // Fencing done, and failed attempts' next try, by (old primary, epoch).
        let mut fenced: std::collections::HashSet<(NodeId, u64)> = Default::default();
        let mut fence_retry: HashMap<(NodeId, u64), Instant> = HashMap::new();
        // The state last looked at, and its volume groups: recomputed only when the
        // state changes, not on every tick.
        let mut seen: Option<Arc<ClusterState>> = None;
        let mut groups: Vec<Vec<String>> = Vec::new();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let st = self.inner.state.borrow().clone();
            let now = Instant::now();
            if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &st)) {
                // Leading or not: when each epoch was first seen here.
                if let Ok(mut l) = self.inner.leases.lock() {
                    for v in st.volumes.values() {
                        l.observe(now, &v.name, v.epoch);
                    }
                    l.retain_current(|v| st.volumes.get(v).map(|x| x.epoch));
                }
                groups = st.groups();
                seen = Some(st.clone());
            }
            let leading = self.inner.leases.lock().is_ok_and(|l| l.leading());
            if !leading || self.inner.raft.metrics().borrow().current_leader != Some(me) {
                continue;
            }
            if let Ok(mut l) = self.inner.leases.lock() {
                l.retain_current(|v| st.volumes.get(v).map(|x| x.epoch));
            }
            // Promotions of this pass, one command per (successor, old primary, reason):
            // a node with 64 targets fails over in one commit, and its successor starts
            // them all in one pass, as fast as one target (issue 19).
            type Batch = (
                Vec<(String, u64)>,
                Option<crate::state::FailoverCause>,
                Vec<(String, serde_json::Map<String, serde_json::Value>)>,
            );
            let mut batches: BTreeMap<(NodeId, NodeId, String), Batch> = BTreeMap::new();
            for group in &groups {
                let vols: Vec<&crate::state::Volume> =
                    group.iter().filter_map(|n| st.volumes.get(n)).collect();
                let Some(first) = vols.first() else { continue };
                let primary = first.primary;
                let online = primary == me || self.peer_liveness(primary).is_some_and(|l| l.online);
                let expired = self.inner.leases.lock().is_ok_and(|mut l| {
                    vols.iter()
                        .any(|v| l.lease_over(now, &v.name, v.epoch, online))
                });
                if !expired {
                    continue;
                }
                let members: Vec<Member> = st
                    .nodes
                    .values()
                    .filter(|n| n.role == NodeRole::Storage)
                    .filter(|n| vols.iter().all(|v| v.in_sync.contains(&n.id)))
                    .map(|n| Member {
                        id: n.id,
                        online: self.peer_liveness(n.id).is_some_and(|l| l.online),
                        lost_power: vols.iter().any(|v| v.lost_power.contains(&n.id)),
                    })
                    .collect();
                let Some(successor) = crate::failover::successor(primary, &members) else {
                    let key = group.join(",");
                    if offline_reported.insert(key.clone()) {
                        self.inner.events.push(
                            EventKind::VolumeOffline,
                            format!("volume(s) {key} offline: the primary holds no lease and no in-sync replica is reachable; waiting for one to return (never serving stale data)"),
                        );
                    }
                    continue;
                };
                offline_reported.remove(&group.join(","));
                let node = successor.node();
                let fence_key = (primary, first.epoch);
                if let Some(program) =
                    st.settings.fence_command.as_ref().filter(|_| {
                        node != primary && primary != me && !fenced.contains(&fence_key)
                    })
                {
                    if fence_retry.get(&fence_key).is_some_and(|t| now < *t) {
                        continue;
                    }
                    let old = st.nodes.get(&primary);
                    let env = [
                        (
                            "BULWARK_FENCE_NODE",
                            old.map(|n| n.name.clone()).unwrap_or_default(),
                        ),
                        ("BULWARK_FENCE_NODE_ID", primary.to_string()),
                        (
                            "BULWARK_FENCE_ADDRESS",
                            old.map(|n| n.addresses.control.ip().to_string())
                                .unwrap_or_default(),
                        ),
                        ("BULWARK_FENCE_VOLUMES", group.join(",")),
                        ("BULWARK_FENCE_EPOCH", first.epoch.to_string()),
                    ];
                    let name = env[0].1.clone();
                    let timeout = Duration::from_millis(st.settings.fence_timeout_ms);
                    let checked =
                        crate::hooks::check_program(program, &self.inner.options.hooks_dir);
                    let outcome = match checked {
                        Ok(path) => run_fence(&path.to_string_lossy(), &env, timeout).await,
                        Err(why) => Err(why),
                    };
                    match outcome {
                        Ok(took) => {
                            fenced.insert(fence_key);
                            fence_retry.remove(&fence_key);
                            self.inner.events.push(
                                EventKind::Fence,
                                format!("fenced {name} with {program} in {} ms", took.as_millis()),
                            );
                        }
                        Err(why) => {
                            fence_retry.insert(fence_key, Instant::now() + FENCE_RETRY);
                            self.inner.events.push(
                                EventKind::Fence,
                                format!(
                                    "fencing {name} failed: {why}; {} stay(s) offline until it succeeds (next try in {} s)",
                                    group.join(", "),
                                    FENCE_RETRY.as_secs()
                                ),
                            );
                            continue;
                        }
                    }
                }
                // I/O stopped when the old primary was last heard from, at the latest.
                let silent_ms = self
                    .peer_liveness(primary)
                    .and_then(|l| l.last_heard_ms)
                    .filter(|_| primary != me)
                    .unwrap_or(0);
                let reason = successor.reason(primary, |id| {
                    st.nodes.get(&id).map_or(id.to_string(), |n| n.name.clone())
                });
                let batch = batches
                    .entry((node, primary, reason.clone()))
                    .or_insert_with(|| {
                        let cause = crate::state::FailoverCause {
                            planned: false,
                            io_stopped_unix_ms: crate::status::unix_ms().saturating_sub(silent_ms),
                            reason,
                        };
                        (Vec::new(), Some(cause), Vec::new())
                    });
                batch
                    .0
                    .extend(vols.iter().map(|v| (v.name.clone(), v.epoch)));
                let name = |id: NodeId| {
                    st.nodes
                        .get(&id)
                        .map(|n| n.name.clone())
                        .unwrap_or_else(|| format!("id {id}"))
                };
                let mut details = serde_json::Map::new();
                details.insert("volumes".into(), group.clone().into());
                details.insert("from".into(), name(primary).into());
                details.insert("to".into(), name(node).into());
                details.insert("epoch".into(), (first.epoch + 1).into());
                details.insert("planned".into(), false.into());
                let event = format!(
                    "failover: {} from {} to {} (epoch {}): {} silent for {} ms",
                    group.join(", "),
                    name(primary),
                    name(node),
                    first.epoch + 1,
                    name(primary),
                    silent_ms
                );
                batch.2.push((event, details));
            }
            let mut promotions = tokio::task::JoinSet::new();
            for ((node, _, _), (volumes, cause, events)) in batches {
                let cmd = Command::Promote {
                    volumes,
                    node,
                    cause,
                };
                let me = self.clone();
                promotions.spawn(async move {
                    match me.write(cmd).await {
                        Ok(Ok(_)) => {
                            for (event, details) in events {
                                me.inner.events.push_with(
                                    EventKind::FailoverStarted,
                                    event,
                                    details,
                                );
                            }
                        }
                        Ok(Err(r)) => debug!(refused = %r, "promotion refused"),
                        Err(e) => debug!(error = %e, "promotion not committed"),
                    }
                });
            }
            while promotions.join_next().await.is_some() {}
        }
    }
}

/// How long a failed fencing waits before it is tried again.
const FENCE_RETRY: Duration = Duration::from_secs(5);

/// Runs the fence program with `env`; how long it took, or why it did not fence.
async fn run_fence(
    program: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let child = tokio::process::Command::new(program)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // Past the timeout the future is dropped, and the program with it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "{program} did not finish within {} s and was killed",
            timeout.as_secs()
        )),
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(started.elapsed()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().last().unwrap_or("").trim().to_string();
            Err(format!(
                "{program} exited with {}{}",
                out.status,
                if last.is_empty() {
                    String::new()
                } else {
                    format!(" ({last})")
                }
            ))
        }
    }
}
