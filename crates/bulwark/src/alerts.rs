//! Alert delivery: every event a node records goes to the alerts that want it, from
//! exactly one node, in tasks of their own.
//!
//! Who delivers: an event only one node sees (a failover it decided, a takeover it
//! finished, a resync it runs, a disk error, a preempted reservation, login failures)
//! is delivered by that node. An event every node sees (a node down or up, a network
//! down or up, a new leader, a membership change) is delivered by the Raft leader only,
//! once one is known. So each event reaches each alert once, or more often only when
//! a delivery is retried after a failure that hid its success (at least once).
//!
//! A delivery runs the alert's program with the event as JSON on stdin, or POSTs the
//! JSON to its URL; it is killed at the alert's timeout and retried (1, 2, 4 s ...
//! apart) up to the alert's retries. Nothing waits for it: I/O and the control plane
//! never see a slow alert. An event that could not be delivered is logged (and recorded
//! as an `alert` event, which is never itself delivered).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::state::Alert;
use cluster::status::Event;
use cluster::status::EventKind;
use cluster::ClusterNode;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

/// Repeated failed logins: this many within [`LOGIN_WINDOW`] raise `login_failures`.
const LOGIN_FAILURES: u64 = 5;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// The alert dispatcher of this node.
pub struct Alerts {
    node: ClusterNode,
    http: reqwest::Client,
    /// (alert, "delivered" | "failed") → count, for metrics.
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Alerts {
    /// Starts delivering this node's events; `server` is watched for repeated login
    /// failures.
    pub fn start(node: ClusterNode, server: iscsi_target::Server) -> Arc<Alerts> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("bulwark/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        let alerts = Arc::new(Alerts {
            node,
            http,
            deliveries: Mutex::new(BTreeMap::new()),
        });
        tokio::spawn(alerts.clone().run(server));
        alerts
    }

    /// Deliveries so far by (alert, result).
    pub fn deliveries(&self) -> BTreeMap<(String, &'static str), u64> {
        self.deliveries
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    async fn run(self: Arc<Self>, server: iscsi_target::Server) {
        let events = self.node.events();
        let mut rx = events.subscribe();
        let mut state = self.node.state();
        let mut tests: HashMap<String, u64> = state
            .borrow()
            .alerts
            .values()
            .map(|a| (a.name.clone(), a.tests))
            .collect();
        let mut logins: Vec<(Instant, u64)> = Vec::new();
        let mut login_reported: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => self.route(ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "alert delivery fell behind; {n} event(s) not delivered");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let st = state.borrow_and_update().clone();
                    // Several changes may arrive as one: an alert added (or re-added)
                    // and tested at once counts from zero.
                    tests.retain(|n, _| st.alerts.contains_key(n));
                    for a in st.alerts.values() {
                        let seen = tests.insert(a.name.clone(), a.tests).unwrap_or(0);
                        if seen < a.tests && self.is_leader() {
                            events.push_with(
                                EventKind::AlertTest,
                                format!("test of alert {} (bulwark alert test)", a.name),
                                details(&[("alert", a.name.clone().into()), ("test", a.tests.into())]),
                            );
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let total = server.stats().login_failures.load(std::sync::atomic::Ordering::Relaxed);
                    logins.retain(|(t, _)| now.duration_since(*t) <= LOGIN_WINDOW);
                    logins.push((now, total));
                    let first = logins.first().map_or(total, |(_, n)| *n);
                    if total - first >= LOGIN_FAILURES
                        && login_reported.is_none_or(|t| now.duration_since(t) > LOGIN_WINDOW)
                    {
                        login_reported = Some(now);
                        let reasons = server.stats().login_failures_by_reason();
                        let reasons: Vec<String> =
                            reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect();
                        events.push_with(
                            EventKind::LoginFailures,
                            format!(
                                "{} failed iSCSI logins on {} within {} s (since start: {})",
                                total - first,
                                self.node.identity().name,
                                LOGIN_WINDOW.as_secs(),
                                reasons.join(", ")
                            ),
                            details(&[("count", (total - first).into())]),
                        );
                    }
                }
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.node.current_leader() == Some(self.node.id())
    }

    /// Sends `ev` to the alerts that want it, if this node is the one to.
    fn route(self: &Arc<Self>, ev: Event) {
        let Some(kind) = EventKind::ALL.into_iter().find(|k| ev.is(*k)) else {
            return; // a kind a newer node added: no alert of this version asks for it
        };
        if !kind.subscribable() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            if kind.cluster_wide() {
                // The leader may be the node that just went away: wait for the next.
                let deadline = Instant::now() + Duration::from_secs(15);
                while me.node.current_leader().is_none() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !me.is_leader() {
                    return;
                }
                // Each node records the new leader; the leader reports itself.
                if kind == EventKind::Leader
                    && ev.details.get("leader").and_then(|l| l.as_str())
                        != Some(me.node.identity().name.as_str())
                {
                    return;
                }
            }
            let alerts: Vec<Alert> = {
                let st = me.node.state().borrow().clone();
                st.alerts
                    .values()
                    .filter(|a| match kind {
                        EventKind::AlertTest => {
                            ev.details.get("alert").and_then(|n| n.as_str()) == Some(&a.name)
                        }
                        k => a.wants(k),
                    })
                    .cloned()
                    .collect()
            };
            let cluster_id = me.node.identity().cluster_id.clone();
            let mut body = serde_json::to_value(&ev).unwrap_or_default();
            if let Some(o) = body.as_object_mut() {
                o.insert("cluster".into(), cluster_id.into());
            }
            let body = Arc::new(serde_json::to_vec(&body).unwrap_or_default());
            for a in alerts {
                tokio::spawn(me.clone().deliver(a, ev.clone(), body.clone()));
            }
        });
    }

    async fn deliver(self: Arc<Self>, alert: Alert, ev: Event, body: Arc<Vec<u8>>) {
        let timeout = Duration::from_millis(alert.timeout_ms);
        let started = Instant::now();
        let mut why = String::new();
        for attempt in 0..=alert.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(5))).await;
            }
            let result = match (&alert.program, &alert.url) {
                (Some(p), _) => match cluster::hooks::check_program(p, self.node.hooks_dir()) {
                    Ok(path) => {
                        run_program(&path.to_string_lossy(), &alert, &ev, &body, timeout).await
                    }
                    Err(why) => Err(why),
                },
                (None, Some(u)) => self.post(u, &body, timeout).await,
                (None, None) => Err("neither program nor URL".into()),
            };
            match result {
                Ok(()) => {
                    self.count(&alert.name, "delivered");
                    debug!(alert = %alert.name, event = %ev.id, "alert delivered");
                    if ev.is(EventKind::AlertTest) {
                        self.node.events().push_with(
                            EventKind::Alert,
                            format!(
                                "alert {}: test event delivered in {} ms",
                                alert.name,
                                started.elapsed().as_millis()
                            ),
                            details(&[
                                ("alert", alert.name.clone().into()),
                                ("test", ev.details.get("test").cloned().unwrap_or_default()),
                                ("delivered", true.into()),
                            ]),
                        );
                    }
                    return;
                }
                Err(e) => {
                    warn!(alert = %alert.name, event = %ev.id, attempt = attempt + 1, error = %e, "alert delivery failed");
                    why = e;
                }
            }
        }
        self.count(&alert.name, "failed");
        self.node.events().push_with(
            EventKind::Alert,
            format!(
                "alert {}: event {} ({}) undelivered after {} attempt(s): {why}",
                alert.name,
                ev.id,
                ev.kind,
                alert.retries + 1
            ),
            details(&[
                ("alert", alert.name.clone().into()),
                ("event", ev.id.clone().into()),
                ("test", ev.details.get("test").cloned().unwrap_or_default()),
                ("delivered", false.into()),
            ]),
        );
    }

    async fn post(&self, url: &str, body: &[u8], timeout: Duration) -> Result<(), String> {
        let r = self
            .http
            .post(url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("POST {url}: HTTP {}", r.status()))
        }
    }

    fn count(&self, alert: &str, result: &'static str) {
        if let Ok(mut d) = self.deliveries.lock() {
            *d.entry((alert.to_string(), result)).or_default() += 1;
        }
    }
}

/// Runs `program` with `body` on stdin, in a process group of its own so that a
/// timeout kills whatever it started too.
async fn run_program(
    program: &str,
    alert: &Alert,
    ev: &Event,
    body: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new(program)
        .env("BULWARK_ALERT_NAME", &alert.name)
        .env("BULWARK_EVENT_ID", &ev.id)
        .env("BULWARK_EVENT_KIND", &ev.kind)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let pid = child.id();
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A program that does not read its input still gets to run.
            let _ = stdin.write_all(body).await;
        }
        child.wait().await
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} exited with {status}")),
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        Err(_) => {
            if let Some(pgid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::Kill);
            }
            let _ = child.kill().await;
            Err(format!(
                "{program} did not finish within {} ms; killed",
                timeout.as_millis()
            ))
        }
    }
}

fn details(pairs: &[(&str, serde_json::Value)]) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}
