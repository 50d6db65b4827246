//! Alerts through failovers: a real 3-node cluster with a volume on all three, an
//! alert program that records what it is given, kill -9 of the primary under writes.
//! The failover's start and end reach the program within seconds of the kill, each
//! event once; then a second alert whose program hangs (and must be killed at its
//! timeout) is added, and the next failover must not be slower for it. Malformed
//! alerts are refused with a reason, and `alert test` reaches the named alert.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::state::{Alert, ClusterState, Command, Refused};
use cluster::status::Event;
use cluster::{AdminClient, Token};
use initiator::Session;
use serde_json::Value;

mod common;
use common::*;

/// 127.0.42.x: used by no other test.
const NET: u8 = 42;
const IQN: &str = "iqn.2026-11.io.bulwark:alerts";
const BLOCK: u32 = 512;
const LBAS: u64 = 4096;
/// How soon after the kill the failover's start and end must have reached the alert.
const DELIVERY_LIMIT: Duration = Duration::from_secs(5);

/// The alert programs, in a directory of their own that outlives the cluster: when
/// dropped (after the cluster's nodes are killed), any `hang` still sleeping (one a
/// killed node left behind) is killed, by the pid it recorded.
struct Programs {
    dir: tempfile::TempDir,
}

impl Programs {
    fn new() -> Programs {
        let p = Programs {
            dir: tempfile::tempdir().unwrap(),
        };
        let events = p.events_file();
        // One line per delivery; the lock keeps concurrent deliveries' lines apart.
        p.script(
            "record",
            &format!(
                "{{ flock 9; cat >> '{f}'; echo >> '{f}'; }} 9>>'{f}.lock'\n",
                f = events.display()
            ),
        );
        // Records its pid (the process group the node made for it, kept by exec), its
        // parent (the node), when it started and the event's kind; then hangs.
        p.script(
            "hang",
            &format!(
                "echo \"$$ $PPID $(date +%s%3N) $BULWARK_EVENT_KIND\" >> '{}'\nexec sleep 600\n",
                p.hang_pids().display()
            ),
        );
        p
    }

    fn script(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn events_file(&self) -> PathBuf {
        self.path("events.jsonl")
    }

    fn hang_pids(&self) -> PathBuf {
        self.path("hang.pids")
    }

    /// The events `record` got so far, in file order. Every line must be whole JSON.
    fn recorded(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.events_file()).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("events.jsonl: a line that is no JSON ({e}): {l}"))
            })
            .collect()
    }

    /// `hang` runs so far: (pid, parent pid, started at ms since the epoch, event kind).
    fn hangs(&self) -> Vec<(i32, i32, u64, String)> {
        let text = std::fs::read_to_string(self.hang_pids()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.parse().ok()?,
                    w.next()?.parse().ok()?,
                    w.next()?.parse().ok()?,
                    w.next().unwrap_or_default().to_string(),
                ))
            })
            .collect()
    }
}

/// Whether `pid` is still one of our `hang` programs, sleeping.
fn hang_alive(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    cmdline == b"sleep\x00600\x00"
        && environ
            .split(|b| *b == 0)
            .any(|kv| kv == b"BULWARK_ALERT_NAME=hang")
}

impl Drop for Programs {
    fn drop(&mut self) {
        for (pid, ..) in self.hangs() {
            if hang_alive(pid) {
                if let Some(p) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::Kill);
                }
            }
        }
    }
}

fn alert(name: &str, program: &Path, events: &[&str], timeout_ms: u64, retries: u32) -> Alert {
    Alert {
        name: name.into(),
        program: Some(program.display().to_string()),
        url: None,
        events: events.iter().map(|e| e.to_string()).collect(),
        tests: 0,
        timeout_ms,
        retries,
    }
}

/// Every node's recent events, as `cluster_status` gathers them, collected in the
/// background (a node keeps only its last 30) until dropped.
struct Watcher {
    seen: Arc<Mutex<BTreeMap<String, Event>>>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Watcher {
    fn start(controls: Vec<SocketAddr>, token: Token) -> Watcher {
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (seen, stop) = (seen.clone(), stop.clone());
            tokio::spawn(async move {
                let admins: Vec<AdminClient> = controls
                    .iter()
                    .map(|a| AdminClient::new(*a, &token).unwrap())
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    for a in &admins {
                        let Ok(Ok((_, nodes))) =
                            tokio::time::timeout(Duration::from_secs(3), a.cluster_status()).await
                        else {
                            continue;
                        };
                        let mut seen = seen.lock().unwrap();
                        for s in nodes.into_values().flatten() {
                            for e in s.events {
                                seen.insert(e.id.clone(), e);
                            }
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        Watcher {
            seen,
            stop,
            task: Some(task),
        }
    }

    fn find(&self, f: impl Fn(&Event) -> bool) -> Option<Event> {
        self.seen.lock().unwrap().values().find(|e| f(e)).cloned()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Writes to the volume's primary, reconnecting as it changes, until stopped; the
/// time of every acknowledged write.
struct Load {
    acks: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

async fn primary_portal(admins: &[AdminClient]) -> Option<SocketAddr> {
    for a in admins {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), a.state()).await {
            let v = st.volumes.get("v")?;
            return Some(st.nodes.get(&v.primary)?.addresses.portals[0]);
        }
    }
    None
}

impl Load {
    fn start(controls: Vec<SocketAddr>, token: Token) -> Load {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (acks, stop) = (acks.clone(), stop.clone());
            tokio::spawn(async move {
                let admins: Vec<AdminClient> = controls
                    .iter()
                    .map(|a| AdminClient::new(*a, &token).unwrap())
                    .collect();
                let mut session: Option<Session> = None;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if session.is_none() {
                        if let Some(portal) = primary_portal(&admins).await {
                            session = connect(portal, IQN).await;
                        }
                        if session.is_none() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                    let s = session.as_mut().unwrap();
                    n += 1;
                    let lba = (n * 7919) % LBAS;
                    let block = vec![(n % 251) as u8; BLOCK as usize];
                    match tokio::time::timeout(
                        Duration::from_secs(3),
                        s.write16(0, lba, &block, BLOCK, false),
                    )
                    .await
                    {
                        Ok(Ok(r)) if r.status == 0 => acks.lock().unwrap().push(Instant::now()),
                        // A unit attention, NOT READY in a transition: retry.
                        Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
                        _ => session = None,
                    }
                    // The target asks us to log out (the volume moved): reconnect.
                    if session.as_ref().is_some_and(|s| s.logout_requested()) {
                        session = None;
                    }
                }
            })
        };
        Load { acks, stop, task }
    }

    fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Stops; the longest gap between two acknowledged writes, and when it began and
    /// ended relative to `kill` (ms; negative: before it).
    async fn finish(self, kill: Instant) -> (Duration, i64, i64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let acks = self.acks.lock().unwrap().clone();
        let rel = |t: Instant| {
            if t >= kill {
                (t - kill).as_millis() as i64
            } else {
                -((kill - t).as_millis() as i64)
            }
        };
        acks.windows(2)
            .max_by_key(|w| w[1] - w[0])
            .map_or((Duration::ZERO, 0, 0), |w| {
                (w[1] - w[0], rel(w[0]), rel(w[1]))
            })
    }
}

fn name_of(st: &ClusterState, id: u64) -> String {
    st.nodes[&id].name.clone()
}

/// Whether node `i` serves volume "v" as its primary.
async fn serves(c: &Cluster, i: usize) -> bool {
    c.admin(i).status().await.is_ok_and(|s| {
        s.volumes
            .iter()
            .any(|v| v.name == "v" && v.role == "primary" && v.serving)
    })
}

/// Waits until "v" is in sync on all three nodes and served by a primary that is not
/// the Raft leader (moving it if it is), so that each kill costs one failover, not an
/// election too; the primary's slot.
async fn served_away_from_the_leader(c: &Cluster, via: usize) -> usize {
    let admin = c.admin(via);
    wait(
        "v in sync on all three nodes",
        Duration::from_secs(30),
        async || {
            admin
                .state()
                .await
                .ok()
                .filter(|s| s.volumes.get("v").is_some_and(|v| v.in_sync.len() == 3))
        },
    )
    .await;
    let leader = c.leader(via).await;
    let st = admin.state().await.unwrap();
    let mut primary = c.index(&name_of(&st, st.volumes["v"].primary));
    if primary == leader {
        let to = (0..3).find(|i| *i != leader).unwrap();
        commit(
            &admin,
            Command::MoveVolume {
                volume: "v".into(),
                node: c.nodes[to].name.clone(),
            },
        )
        .await;
        primary = to;
    }
    wait(
        "v served by its primary",
        Duration::from_secs(30),
        async || serves(c, primary).await.then_some(()),
    )
    .await;
    primary
}

/// What one kill of the primary showed.
struct Round {
    victim: usize,
    /// The cluster's figure: from I/O stop to the new primary serving.
    pause_ms: u64,
    /// The longest gap between acknowledged writes at the initiator.
    io_pause: Duration,
    /// When the alert program had recorded the start and the end, after the kill.
    started_after: Duration,
    finished_after: Duration,
    started: Value,
    killed: Instant,
}

/// Kills the primary under writes and waits for `rec` to record the failover.
async fn kill_the_primary(c: &mut Cluster, p: &Programs, label: &str) -> Round {
    let victim = served_away_from_the_leader(c, 0).await;
    let controls: Vec<SocketAddr> = c.nodes.iter().map(|n| n.addresses().control).collect();
    let load = Load::start(controls, c.token());
    wait("writes flowing", Duration::from_secs(20), async || {
        (load.count() > 50).then_some(())
    })
    .await;
    let epoch = c.state(victim).await.unwrap().volumes["v"].epoch;
    let already = p.recorded().len();
    let kill = Instant::now();
    c.nodes[victim].kill9();
    let victim_name = c.nodes[victim].name.clone();

    let mut started: Option<(usize, Value, Duration)> = None;
    let mut finished: Option<(usize, Value, Duration)> = None;
    while started.is_none() || finished.is_none() {
        assert!(
            kill.elapsed() < DELIVERY_LIMIT,
            "{label}: within {DELIVERY_LIMIT:?} of the kill, rec recorded only {:?} (and before: {already} lines)",
            &p.recorded()[already..]
        );
        for (i, e) in p.recorded().into_iter().enumerate().skip(already) {
            let d = &e["details"];
            match e["kind"].as_str() {
                Some("failover_started")
                    if started.is_none()
                        && d["planned"] == false
                        && d["from"] == victim_name.as_str()
                        && d["volumes"]
                            .as_array()
                            .is_some_and(|v| v.iter().any(|x| x == "v")) =>
                {
                    started = Some((i, e, kill.elapsed()));
                }
                Some("failover_finished")
                    if finished.is_none()
                        && d["planned"] == false
                        && d["volume"] == "v"
                        && d["from"] == victim_name.as_str() =>
                {
                    finished = Some((i, e, kill.elapsed()));
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (si, started, started_after) = started.unwrap();
    let (fi, finished, finished_after) = finished.unwrap();
    // A second of writes on the new primary, so the load sees the pause end.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (io_pause, stopped_at, resumed_at) = load.finish(kill).await;

    let d = &finished["details"];
    let pause_ms = d["pause_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("{label}: pause_ms is no number: {finished}"));
    assert!(
        started["unix_ms"].as_u64().unwrap_or(u64::MAX)
            <= finished["unix_ms"].as_u64().unwrap_or(0),
        "{label}: the failover finished before it started: {started} / {finished}"
    );
    for e in [&started, &finished] {
        assert!(
            e["cluster"].as_str().is_some_and(|s| !s.is_empty()),
            "{label}: the event names its cluster: {e}"
        );
    }
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let st = c.state(survivors[0]).await.unwrap();
    assert!(
        st.volumes["v"].epoch > epoch,
        "{label}: a new primary was promoted"
    );
    let to = name_of(&st, st.volumes["v"].primary);
    assert_ne!(to, victim_name);
    assert_eq!(d["to"], to.as_str(), "{label}: {finished}");
    eprintln!(
        "{label}: killed primary {victim_name}; rec recorded failover_started {} ms (line {si}) and failover_finished {} ms (line {fi}) after the kill{}; \
         cluster-reported pause {pause_ms} ms, I/O pause at the initiator {} ms (from {stopped_at} to {resumed_at} ms after the kill), new primary {to}",
        started_after.as_millis(),
        finished_after.as_millis(),
        if si < fi { "" } else { " (in the other order in the file)" },
        io_pause.as_millis(),
    );
    Round {
        victim,
        pause_ms,
        io_pause,
        started_after,
        finished_after,
        started,
        killed: kill,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_record_failovers_and_a_hanging_alert_does_not_delay_them() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let test_started = Instant::now();
    // Declared before the cluster: dropped after its nodes are killed.
    let programs = Programs::new();
    let mut c = Cluster::three_voters_with(NET, &hooks_dir_args(programs.dir.path())).await;
    let admin = c.admin(0);
    commit(&admin, create_volume("v", &["n1", "n2", "n3"])).await;
    target_with_lun(&admin, IQN, "v").await;
    let controls: Vec<SocketAddr> = c.nodes.iter().map(|n| n.addresses().control).collect();
    let watcher = Watcher::start(controls, c.token());

    // Malformed alerts are refused, with the reason.
    let record = programs.path("record");
    let mut bad = Vec::new();
    let mut relative = alert("bad", &record, &[], 5000, 0);
    relative.program = Some("record".into());
    bad.push(("a relative program path", relative));
    let mut both = alert("bad", &record, &[], 5000, 0);
    both.url = Some("http://127.0.0.1:9/hook".into());
    bad.push(("both a program and a URL", both));
    bad.push((
        "an unknown event kind",
        alert("bad", &record, &["failover_begun"], 5000, 0),
    ));
    for (what, a) in bad {
        match admin.write(Command::SetAlert { alert: a }).await.unwrap() {
            Err(Refused::BadAlert(why)) => eprintln!("refused, {what}: {why}"),
            other => panic!("an alert with {what}: {other:?}"),
        }
    }
    let r = admin
        .write(Command::TestAlert {
            name: "nope".into(),
        })
        .await
        .unwrap();
    assert!(matches!(r, Err(Refused::NoSuchAlert(_))), "{r:?}");
    assert!(c.state(0).await.unwrap().alerts.is_empty());

    // Phase A: only `rec`, for the failover's start and end.
    commit(
        &admin,
        Command::SetAlert {
            alert: alert(
                "rec",
                &record,
                &["failover_started", "failover_finished"],
                5000,
                2,
            ),
        },
    )
    .await;
    let a = kill_the_primary(&mut c, &programs, "phase A (rec only)").await;

    // The old primary returns and catches up.
    c.nodes[a.victim].start();
    let survivor = (0..3).find(|i| *i != a.victim).unwrap();
    served_away_from_the_leader(&c, survivor).await;

    // Phase B: and `hang`, for everything, killed after 1 s and not retried.
    let hang = programs.path("hang");
    commit(
        &c.admin(survivor),
        Command::SetAlert {
            alert: alert("hang", &hang, &[], 1000, 0),
        },
    )
    .await;
    wait(
        "every node to know the hang alert",
        Duration::from_secs(10),
        async || {
            for i in 0..3 {
                c.state(i).await?.alerts.get("hang")?;
            }
            Some(())
        },
    )
    .await;
    let b = kill_the_primary(&mut c, &programs, "phase B (rec and hang)").await;

    // The hanging delivery of the failover's start was killed and recorded undelivered.
    let started_id = b.started["id"].as_str().unwrap().to_string();
    let undelivered = wait(
        "the hang alert's undelivered record of failover_started (10 s after the kill)",
        Duration::from_secs(10).saturating_sub(b.killed.elapsed()),
        async || {
            watcher.find(|e| {
                e.kind == "alert"
                    && e.details.get("alert").and_then(Value::as_str) == Some("hang")
                    && e.details.get("delivered") == Some(&Value::Bool(false))
                    && e.details.get("event").and_then(Value::as_str) == Some(&started_id)
            })
        },
    )
    .await;
    eprintln!(
        "phase B: {} recorded: {}",
        undelivered.observer, undelivered.message
    );

    // Every hang a running node started was killed at its timeout (those of the node
    // killed -9 are orphans; `Programs` kills them at the end).
    let node_pids: Vec<i32> = c
        .nodes
        .iter()
        .filter_map(|n| n.child.as_ref().map(|ch| ch.id() as i32))
        .collect();
    let hangs = programs.hangs();
    assert!(!hangs.is_empty(), "hang never ran");
    wait(
        "hang programs killed at their timeout",
        Duration::from_secs(5),
        async || {
            let now = cluster::status::unix_ms();
            let late: Vec<_> = programs
                .hangs()
                .into_iter()
                .filter(|(pid, parent, at, _)| {
                    node_pids.contains(parent) && now > at + 2500 && hang_alive(*pid)
                })
                .collect();
            late.is_empty().then_some(())
        },
    )
    .await;
    let kinds: Vec<&str> = hangs.iter().map(|h| h.3.as_str()).collect();
    eprintln!(
        "phase B: hang ran {} time(s) ({kinds:?}); each one a running node started was killed at its timeout",
        hangs.len()
    );
    assert!(
        kinds.contains(&"failover_started") && kinds.contains(&"failover_finished"),
        "hang ran during the failover"
    );

    // A hanging alert does not delay the failover.
    let bound = |a: u64| a + a.max(1000);
    eprintln!(
        "pauses: phase A {} ms, phase B {} ms (cluster-reported); at the initiator A {} ms, B {} ms; \
         rec had the start/end after A {}/{} ms, B {}/{} ms",
        a.pause_ms,
        b.pause_ms,
        a.io_pause.as_millis(),
        b.io_pause.as_millis(),
        a.started_after.as_millis(),
        a.finished_after.as_millis(),
        b.started_after.as_millis(),
        b.finished_after.as_millis(),
    );
    assert!(
        b.pause_ms <= bound(a.pause_ms),
        "with a hanging alert the failover paused I/O {} ms, without {} ms",
        b.pause_ms,
        a.pause_ms
    );
    let (ia, ib) = (a.io_pause.as_millis() as u64, b.io_pause.as_millis() as u64);
    assert!(
        ib <= bound(ia),
        "with a hanging alert the initiator saw a pause of {ib} ms, without {ia} ms"
    );

    // `alert test` reaches the named alert, whatever its event filter.
    let live = (0..3).find(|i| *i != b.victim).unwrap();
    let before = programs.recorded().len();
    let asked = Instant::now();
    commit(&c.admin(live), Command::TestAlert { name: "rec".into() }).await;
    let test_event = wait(
        "rec to record the test event",
        Duration::from_secs(5),
        async || {
            programs.recorded()[before..]
                .iter()
                .find(|e| e["kind"] == "alert_test" && e["details"]["alert"] == "rec")
                .cloned()
        },
    )
    .await;
    eprintln!(
        "alert test: rec recorded {} {} ms after the command",
        test_event["id"],
        asked.elapsed().as_millis()
    );
    let delivered = wait(
        "the test's delivery record",
        Duration::from_secs(5),
        async || {
            watcher.find(|e| {
                e.kind == "alert"
                    && e.details.get("alert").and_then(Value::as_str) == Some("rec")
                    && e.details.get("delivered") == Some(&Value::Bool(true))
            })
        },
    )
    .await;
    eprintln!("alert test: {}", delivered.message);
    // hang is not sent rec's test.
    assert!(
        watcher
            .find(|e| e.kind == "alert"
                && e.details.get("alert").and_then(Value::as_str) == Some("hang")
                && e.details.get("test").is_some_and(|t| !t.is_null()))
            .is_none(),
        "the test of rec went to hang too"
    );

    // Each event reached rec once.
    let recorded = programs.recorded();
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    for e in &recorded {
        *ids.entry(e["id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    let repeated: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "events recorded more than once: {repeated:?}"
    );
    // Only the kinds it asked for, and its test.
    for e in &recorded {
        assert!(
            ["failover_started", "failover_finished", "alert_test"]
                .contains(&e["kind"].as_str().unwrap_or_default()),
            "rec got an event it did not ask for: {e}"
        );
    }
    drop(watcher);
    let lines: Vec<String> = recorded
        .iter()
        .map(|e| match e["details"]["planned"].as_bool() {
            Some(true) => format!("{} (planned)", e["kind"].as_str().unwrap_or_default()),
            _ => e["kind"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    eprintln!(
        "alerts: rec recorded {} event(s), each once: {lines:?}; the test took {:.1} s ({:.1} s after the second kill)",
        recorded.len(),
        test_started.elapsed().as_secs_f64(),
        b.killed.elapsed().as_secs_f64()
    );
}
