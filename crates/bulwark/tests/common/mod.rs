//! Helpers shared by the multi-process cluster tests: start `bulwark serve` processes
//! on a 127.0.N.x block, talk to them, and kill every one of them (by pid) at the end.
#![allow(dead_code)] // each test file uses a part

pub mod load;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cluster::state::{ClusterState, Command, NodeAddresses};
use cluster::status::NodeStatus;
use cluster::{AdminClient, Applied, Token};
use initiator::{Credentials, InitiatorError, LoginOptions, Session};

pub const BIN: &str = env!("CARGO_BIN_EXE_bulwark");

/// One cluster at a time: the tests measure failover and detection times, which a
/// 2-core machine running four clusters at once would blur.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
pub const INITIATOR: &str = "iqn.2026-11.io.example:cluster-test";

pub struct Node {
    pub name: String,
    pub ip: IpAddr,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub extra: Vec<String>,
}

impl Node {
    pub fn addresses(&self) -> NodeAddresses {
        NodeAddresses {
            control: SocketAddr::new(self.ip, 3261),
            replication: SocketAddr::new(self.ip, 3262),
            portals: vec![SocketAddr::new(self.ip, 3260)],
        }
    }

    pub fn log(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = std::process::Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(&self.dir)
            .args(["--capacity", "16GiB"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start bulwark");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits (without blocking the runtime) for the process to exit;
    /// returns how long it took. Panics after 10 s (the process is then killed).
    pub async fn terminate(&mut self) -> Duration {
        let Some(mut c) = self.child.take() else {
            return Duration::ZERO;
        };
        let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
        let start = Instant::now();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!("{} did not stop within 10 s of SIGTERM", self.name);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("{} did not stop on SIGTERM", self.name);
        }
    }
}

pub struct Cluster {
    pub _tmp: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub token: Option<Token>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!("---- log of {} ----", n.name);
                eprintln!("{}", std::fs::read_to_string(n.log()).unwrap_or_default());
            }
        }
    }
}

impl Cluster {
    /// `count` node slots on 127.0.`block`.1.. (nothing started yet).
    pub fn new(block: u8, count: u8) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let nodes = (1..=count)
            .map(|i| Node {
                name: format!("n{i}"),
                ip: IpAddr::V4(Ipv4Addr::new(127, 0, block, i)),
                dir: tmp.path().join(format!("n{i}")),
                child: None,
                extra: Vec::new(),
            })
            .collect();
        Cluster {
            _tmp: tmp,
            nodes,
            token: None,
        }
    }

    /// Three storage nodes on 127.0.`block`.1-3, started, all voting in Raft.
    pub async fn three_voters(block: u8) -> Cluster {
        Cluster::three_voters_with(block, &[]).await
    }

    /// [`Cluster::three_voters`] with `extra` arguments to every `bulwark serve`.
    pub async fn three_voters_with(block: u8, extra: &[String]) -> Cluster {
        let mut c = Cluster::new(block, 3);
        for n in &mut c.nodes {
            n.extra = extra.to_vec();
        }
        c.init().await;
        c.join(1).await;
        c.join(2).await;
        c.wait_voters(0, 3).await;
        c
    }

    pub fn token(&self) -> Token {
        self.token.clone().expect("cluster initialised")
    }

    pub fn admin(&self, i: usize) -> AdminClient {
        AdminClient::new(self.nodes[i].addresses().control, &self.token()).unwrap()
    }

    /// Creates the cluster on node 0 and starts it.
    pub async fn init(&mut self) {
        let n = &mut self.nodes[0];
        let id = cluster::node::init(&n.dir, &n.name, n.addresses()).unwrap();
        self.token = Some(id.token().unwrap());
        self.nodes[0].start();
        let admin = self.admin(0);
        wait(
            "the first node to lead",
            Duration::from_secs(20),
            async || admin.state().await.ok().filter(|s| s.nodes.len() == 1),
        )
        .await;
    }

    /// Joins node `i` through node 0 and starts it.
    pub async fn join(&mut self, i: usize) {
        let token = self.token();
        let seed = self.nodes[0].addresses().control;
        let n = &mut self.nodes[i];
        cluster::node::join(&n.dir, seed, &token, &n.name, n.addresses(), 8 << 30)
            .await
            .unwrap();
        n.start();
    }

    pub async fn wait_voters(&self, via: usize, count: usize) -> NodeStatus {
        let admin = self.admin(via);
        wait(
            &format!("{count} voters"),
            Duration::from_secs(30),
            async || {
                admin
                    .status()
                    .await
                    .ok()
                    .filter(|s| s.raft.voters.len() == count)
            },
        )
        .await
    }

    pub async fn leader(&self, via: usize) -> usize {
        let admin = self.admin(via);
        let id = wait("a leader", Duration::from_secs(20), async || {
            admin.status().await.ok().and_then(|s| s.raft.leader)
        })
        .await;
        let st = admin.state().await.unwrap();
        self.index(&st.nodes[&id].name)
    }

    /// The slot of the node named `name`.
    pub fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    pub async fn state(&self, i: usize) -> Option<ClusterState> {
        self.admin(i).state().await.ok()
    }
}

/// The `bulwark serve` arguments that let the nodes run hook programs (alerts, the
/// fence command) from `dir`, which must be owned by root and writable by nobody else
/// (a tempdir is).
pub fn hooks_dir_args(dir: &std::path::Path) -> Vec<String> {
    vec!["--hooks-dir".into(), dir.display().to_string()]
}

pub async fn wait<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn commit(admin: &AdminClient, cmd: Command) -> Applied {
    admin
        .write(cmd.clone())
        .await
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
        .unwrap_or_else(|r| panic!("{cmd:?} refused: {r}"))
}

/// Creates target `iqn` open to any initiator (targets admit nobody by default).
pub async fn open_target(admin: &AdminClient, iqn: &str) {
    commit(
        admin,
        Command::CreateTarget {
            iqn: iqn.into(),
            alias: None,
        },
    )
    .await;
    commit(
        admin,
        Command::SetTargetAccess {
            iqn: iqn.into(),
            allow_any: Some(true),
            allow_target_reset: None,
        },
    )
    .await;
}

/// Creates target `iqn`, open to any initiator, with `volume` as its LUN 0.
pub async fn target_with_lun(admin: &AdminClient, iqn: &str, volume: &str) {
    open_target(admin, iqn).await;
    commit(
        admin,
        Command::AddLun {
            iqn: iqn.into(),
            lun: Some(0),
            volume: volume.into(),
        },
    )
    .await;
}

pub fn create_volume(name: &str, on: &[&str]) -> Command {
    Command::CreateVolume {
        name: name.into(),
        size_bytes: 64 << 20,
        replicas: on.len().max(1) as u8,
        block_size: 512,
        physical_block_size: None,
        nodes: on.iter().map(|s| s.to_string()).collect(),
    }
}

pub async fn login(
    portal: SocketAddr,
    iqn: &str,
    chap: Option<Credentials>,
) -> Result<Session, InitiatorError> {
    let mut opts = LoginOptions::new(INITIATOR, Some(iqn));
    opts.chap = chap;
    Session::login(portal, &opts).await
}

/// A session to `iqn` through `portal` (2 s login timeout) with the power-on unit
/// attention cleared, or `None` while no node serves it there.
pub async fn connect(portal: SocketAddr, iqn: &str) -> Option<Session> {
    let mut opts = LoginOptions::new(INITIATOR, Some(iqn));
    opts.timeout = Duration::from_secs(2);
    let mut s = Session::login(portal, &opts).await.ok()?;
    let _ = s.command(0, &[0u8; 6], None, 0).await;
    Some(s)
}

/// `bulwark ARGS` against node `i` of `c`, off the runtime: (success, standard output,
/// standard error).
pub async fn run_cli(c: &Cluster, i: usize, args: &[&str]) -> (bool, String, String) {
    let (node, token) = (
        c.nodes[i].addresses().control.to_string(),
        c.token().to_string(),
    );
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .args(["--node", &node, "--token", &token])
            .output()
            .expect("bulwark runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}
