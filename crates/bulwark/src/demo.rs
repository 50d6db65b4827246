//! `bulwark demo`: a local 3-node cluster as real processes, a demo volume and target,
//! and how to use them. Ctrl-C stops every process it started.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cluster::state::{Command, NodeAddresses};
use cluster::{AdminClient, Identity, Refused};

use crate::admin::{self, CONTROL_PORT};

const NODES: u8 = 3;
const IQN: &str = "iqn.2026-11.io.bulwark:demo";
const VOLUME: &str = "demo";

fn addresses(i: u8) -> NodeAddresses {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, i));
    NodeAddresses {
        control: SocketAddr::new(ip, CONTROL_PORT),
        replication: SocketAddr::new(ip, 3262),
        portals: vec![SocketAddr::new(ip, 3260)],
    }
}

struct Children {
    procs: Vec<(String, tokio::process::Child)>,
}

impl Children {
    /// SIGTERM to every child, then SIGKILL to those still running after 10 s.
    async fn stop(&mut self) {
        for (_, c) in &self.procs {
            if let Some(pid) = c
                .id()
                .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, c) in &mut self.procs {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, c.wait()).await {
                Ok(_) => println!("  {name} stopped"),
                Err(_) => {
                    let _ = c.kill().await;
                    println!("  {name} killed (did not stop within 10 s)");
                }
            }
        }
    }
}

async fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what} did not happen within {limit:?}; see the node logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spawn_node(exe: &Path, dir: &Path, name: &str) -> Result<tokio::process::Child> {
    let data = dir.join(name);
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .with_context(|| format!("creating the log of {name}"))?;
    let log2 = log.try_clone()?;
    tokio::process::Command::new(exe)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--capacity")
        .arg("20GiB")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

/// Runs the demo until Ctrl-C.
pub async fn run(dir: Option<PathBuf>, watch: bool) -> Result<()> {
    let (dir, temporary) = match dir {
        Some(d) => (d, false),
        None => {
            let d = std::env::temp_dir().join(format!("bulwark-demo-{}", std::process::id()));
            (d, true)
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the bulwark executable")?;
    let mut children = Children { procs: Vec::new() };
    let result = start(&exe, &dir, &mut children, watch).await;
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
    }
    println!("Stopping the demo cluster...");
    children.stop().await;
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!(
            "Data kept in {}; `bulwark demo --dir {}` starts it again.",
            dir.display(),
            dir.display()
        );
    }
    result.map_err(|_| anyhow!("the demo failed (see above)"))
}

async fn start(exe: &Path, dir: &Path, children: &mut Children, watch: bool) -> Result<()> {
    let first = dir.join("n1");
    if !Identity::exists(&first) {
        cluster::node::init(&first, "n1", addresses(1))?;
    }
    let token = Identity::load(&first)?.token()?;
    println!("Starting n1 on 127.0.0.1...");
    children
        .procs
        .push(("n1".into(), spawn_node(exe, dir, "n1")?));
    let client = AdminClient::new(addresses(1).control, &token)?;
    wait_for(
        "n1 becoming the leader",
        Duration::from_secs(30),
        async || client.state().await.ok().filter(|s| !s.nodes.is_empty()),
    )
    .await?;

    for i in 2..=NODES {
        let name = format!("n{i}");
        let data = dir.join(&name);
        if !Identity::exists(&data) {
            let cap = admin::filesystem_capacity(&data)?;
            cluster::node::join(
                &data,
                addresses(1).control,
                &token,
                &name,
                addresses(i),
                cap,
            )
            .await
            .with_context(|| format!("joining {name}"))?;
        }
        println!("Starting {name} on 127.0.0.{i}...");
        children
            .procs
            .push((name.clone(), spawn_node(exe, dir, &name)?));
    }
    wait_for("3 Raft voters", Duration::from_secs(60), async || {
        client
            .status()
            .await
            .ok()
            .filter(|s| s.raft.voters.len() == usize::from(NODES))
    })
    .await?;

    ensure(
        &client,
        Command::CreateVolume {
            name: VOLUME.into(),
            size_bytes: 1 << 30,
            replicas: 2,
            block_size: 512,
            physical_block_size: None,
            nodes: vec!["n1".into(), "n2".into()],
        },
    )
    .await?;
    ensure(
        &client,
        Command::CreateTarget {
            iqn: IQN.into(),
            alias: Some("bulwark-demo".into()),
        },
    )
    .await?;
    // A demo on loopback: any initiator may log in (a target made with `bulwark
    // target create` admits nobody until an ACL, a CHAP binding or this).
    ensure(
        &client,
        Command::SetTargetAccess {
            iqn: IQN.into(),
            allow_any: Some(true),
            allow_target_reset: None,
        },
    )
    .await?;
    ensure(
        &client,
        Command::AddLun {
            iqn: IQN.into(),
            lun: Some(0),
            volume: VOLUME.into(),
        },
    )
    .await?;
    let st = client.state().await?;
    let primary = st
        .volumes
        .get(VOLUME)
        .and_then(|v| st.nodes.get(&v.primary))
        .ok_or_else(|| anyhow!("the demo volume has no primary"))?;
    let portal = primary.addresses.portals[0];
    // Wait until the primary serves the target and its volume takes I/O (sealed and
    // leased), so the commands printed below work at once.
    let primary_client = AdminClient::new(primary.addresses.control, &token)?;
    wait_for(
        "the demo target being served",
        Duration::from_secs(20),
        async || {
            primary_client.status().await.ok().filter(|s| {
                s.serving.iter().any(|t| t == IQN)
                    && s.volumes
                        .iter()
                        .any(|v| v.name == VOLUME && v.role == "primary" && v.serving)
            })
        },
    )
    .await?;

    let ip = portal.ip();
    println!();
    println!(
        "Bulwark demo cluster is running; data and logs under {}",
        dir.display()
    );
    for (i, (name, child)) in (1..=NODES).zip(&children.procs) {
        let a = addresses(i);
        println!(
            "  {name}: pid {}  control {}  iSCSI portal {}  log {}",
            child.id().unwrap_or(0),
            a.control,
            a.portals[0],
            dir.join(format!("{name}.log")).display()
        );
        let web = SocketAddr::new(a.control.ip(), crate::http::HTTP_PORT);
        println!("    console: https://{web}/");
        println!("    metrics: https://{web}/metrics");
    }
    println!(
        "  (the console and /metrics take the token below: sign in with it, or send\n   Authorization: Bearer TOKEN; the certificate is the cluster's own, self-signed)"
    );
    println!();
    println!(
        "Volume {VOLUME} (1 GiB, replicas on n1 and n2) is LUN 0 of {IQN}, served by {}:",
        primary.name
    );
    println!("  any initiator may log in (demo: `bulwark target allow-any`; for real targets use `bulwark acl add` or `bulwark chap bind`)");
    println!("  iSCSI URL:  iscsi://{ip}/{IQN}/0");
    println!("  iscsi-ls -s iscsi://{ip}");
    println!("  iscsi-inq iscsi://{ip}/{IQN}/0");
    println!("  qemu-img info iscsi://{ip}/{IQN}/0");
    println!("  iscsiadm -m discovery -t st -p {ip} && iscsiadm -m node -T {IQN} -p {ip} --login");
    // The other replica's node serves the target too (active/non-optimized).
    if let Some(t) = st.targets.get(IQN) {
        for g in serving::port_groups(&st, t) {
            let node = st.nodes.get(&u64::from(g.id));
            if let Some((n, p)) = node.and_then(|n| Some((n, n.addresses.portals.first()?))) {
                println!(
                    "  path via {}: iscsi://{}/{IQN}/0  ({})",
                    n.name,
                    p.ip(),
                    g.state
                );
            }
        }
    }
    println!();
    println!("Administer it from another terminal:");
    println!(
        "  export BULWARK_NODE={} BULWARK_TOKEN={token}",
        addresses(1).control
    );
    println!("  bulwark status --watch");
    println!();
    let primary_pid = children
        .procs
        .iter()
        .find(|(name, _)| *name == primary.name)
        .and_then(|(_, c)| c.id())
        .unwrap_or(0);
    println!("Try a failover: writes keep their data and the volume moves to the other replica:");
    println!("  bulwark volume move {VOLUME} n2      # planned: drain and hand over");
    println!(
        "  kill -9 {primary_pid}                   # unplanned: {} dies, n2 takes over",
        primary.name
    );
    println!();
    println!("token: {token}");
    println!("demo ready; Ctrl-C stops every node");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let conn = admin::Conn {
        node: addresses(1).control.to_string(),
        token: Some(token.to_string()),
        data_dir: first_dir(dir),
        json: false,
    };
    if watch {
        tokio::time::sleep(Duration::from_secs(3)).await;
        admin::status(&conn, true, Duration::from_secs(1)).await?;
    } else {
        admin::status(&conn, false, Duration::from_secs(1)).await?;
        crate::signals::shutdown_signal().await;
    }
    Ok(())
}

fn first_dir(dir: &Path) -> PathBuf {
    dir.join("n1")
}

/// Commits `cmd`, accepting "already exists" so the demo can restart on its own data.
async fn ensure(client: &AdminClient, cmd: Command) -> Result<()> {
    match client.write(cmd).await? {
        Ok(_) => Ok(()),
        Err(
            Refused::VolumeExists(_)
            | Refused::TargetExists(_)
            | Refused::VolumeAlreadyMapped { .. },
        ) => Ok(()),
        Err(r) => Err(anyhow!("{r}")),
    }
}
