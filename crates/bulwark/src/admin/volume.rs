//! `bulwark volume ...`: create, resize, move, replicas, verify and the rest of a
//! volume's life, as cluster commands.

use super::*;

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Creates a volume, thin, on the nodes with the most free space (or --node); or,
    /// with --from-snapshot, a clone of a snapshot on the nodes that hold it.
    Create {
        /// Volume name.
        name: String,
        /// Size, like 10GiB (a clone has the size its source had).
        #[arg(required_unless_present = "from_snapshot")]
        size: Option<String>,
        /// Make it a writable copy of snapshot VOLUME@SNAPSHOT, in seconds whatever
        /// its size, on the snapshot's nodes; independent of its source afterwards
        /// (the snapshot cannot be deleted while the clone exists).
        #[arg(long, value_name = "VOLUME@SNAPSHOT", conflicts_with_all = ["size", "replicas", "block_size", "physical_block_size", "on"])]
        from_snapshot: Option<String>,
        /// Number of replicas (1 to 3), each on a different storage node.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// Logical block size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Physical block size initiators see (a power of two from the block size to
        /// 32768; default 4096): 512 for software that assumes one logical block per
        /// physical block.
        #[arg(long)]
        physical_block_size: Option<u32>,
        /// Place it on this node (repeat for each replica; the first is the primary).
        #[arg(long = "on")]
        on: Vec<String>,
    },
    /// Lists volumes.
    List,
    /// Grows a volume; initiators see CAPACITY DATA HAS CHANGED.
    Resize {
        /// Volume name.
        name: String,
        /// New size (larger).
        size: String,
    },
    /// Moves a volume (with the rest of its target) to another in-sync replica: the
    /// primary drains, releases its lease and hands over; initiators reconnect.
    Move {
        /// Volume name.
        name: String,
        /// Destination node (an in-sync replica).
        #[arg(value_name = "NODE")]
        to: String,
    },
    /// Deletes a volume that no target maps, with its data.
    Delete {
        /// Volume name.
        name: String,
        /// Delete its snapshots too (a volume with snapshots is refused otherwise).
        #[arg(long)]
        with_snapshots: bool,
    },
    /// Adds, removes or replaces a replica of the volume (and of every other volume of
    /// its target: a target's volumes share their nodes).
    Replicas {
        /// Volume name.
        name: String,
        #[command(subcommand)]
        change: maintenance::ReplicaChange,
    },
    /// Compares the volume's replicas online, region by region (CRC32C of each 1 MiB
    /// region on the primary and on every in-sync replica; writes to a region wait the
    /// few milliseconds it is compared). Waits for the result; exits with status 1 when
    /// replicas differ and --repair was not given.
    Verify {
        /// Volume name.
        name: String,
        /// Resync the differing regions from the primary.
        #[arg(long)]
        repair: bool,
        /// Start it and return; `bulwark status` shows its progress and result.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Turns a CLI command into the cluster command it commits. Pure, so every command's
/// validation can be tested without a cluster.
pub fn volume_command(cmd: &VolumeCmd) -> Result<Option<Command>> {
    Ok(match cmd {
        VolumeCmd::Create {
            from_snapshot: Some(from),
            name,
            ..
        } => {
            let (volume, snapshot) = from
                .split_once('@')
                .ok_or_else(|| anyhow!("--from-snapshot takes VOLUME@SNAPSHOT, not {from:?}"))?;
            Some(Command::CloneSnapshot {
                name: name.clone(),
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            })
        }
        VolumeCmd::Create {
            name,
            size,
            replicas,
            block_size,
            physical_block_size,
            on,
            ..
        } => {
            let size = size
                .as_deref()
                .ok_or_else(|| anyhow!("give the volume's size, like 10GiB"))?;
            if !on.is_empty() && on.len() > usize::from(*replicas) {
                bail!(
                    "--on names {} nodes but --replicas is {replicas}; name at most one node per replica",
                    on.len()
                );
            }
            Some(Command::CreateVolume {
                name: name.clone(),
                size_bytes: parse_size(size)?,
                replicas: *replicas,
                block_size: *block_size,
                physical_block_size: *physical_block_size,
                nodes: on.clone(),
            })
        }
        VolumeCmd::Resize { name, size } => Some(Command::ResizeVolume {
            name: name.clone(),
            size_bytes: parse_size(size)?,
        }),
        VolumeCmd::Delete {
            name,
            with_snapshots,
        } => Some(Command::DeleteVolume {
            name: name.clone(),
            with_snapshots: *with_snapshots,
        }),
        VolumeCmd::Move { name, to } => Some(Command::MoveVolume {
            volume: name.clone(),
            node: to.clone(),
        }),
        VolumeCmd::Verify { name, repair, .. } => Some(Command::StartVerify {
            volume: name.clone(),
            repair: *repair,
        }),
        VolumeCmd::List | VolumeCmd::Replicas { .. } => None,
    })
}

pub async fn volume(conn: &Conn, cmd: VolumeCmd) -> Result<()> {
    if let VolumeCmd::Replicas { name, change } = cmd {
        return maintenance::replicas(conn, &name, change).await;
    }
    let Some(c) = volume_command(&cmd)? else {
        let (st, statuses) = conn.client()?.cluster_status().await?;
        if conn.json {
            return print_json(&st.volumes);
        }
        let mut out = String::new();
        render_volumes(&mut out, &st, &statuses);
        print!("{out}");
        return Ok(());
    };
    let started = std::time::Instant::now();
    let a = commit(conn, c).await?;
    if let VolumeCmd::Verify {
        name,
        repair,
        no_wait,
    } = &cmd
    {
        return verify_wait(conn, name, *repair, *no_wait).await;
    }
    if let VolumeCmd::Move { name, to: node } = &cmd {
        // Wait for the handover so the command reports its outcome.
        let client = conn.client()?;
        loop {
            let (st, statuses) = client.cluster_status().await?;
            let v = st
                .volumes
                .get(name)
                .ok_or_else(|| anyhow!("volume {name} disappeared"))?;
            // Done when the new primary says it serves (sealed and leased), not merely
            // when the cluster has named it.
            let serving = statuses.get(&v.primary).is_some_and(|s| {
                s.as_ref().is_ok_and(|s| {
                    s.volumes
                        .iter()
                        .any(|x| &x.name == name && x.role == "primary" && x.serving)
                })
            });
            if serving && st.nodes.get(&v.primary).is_some_and(|n| &n.name == node) {
                return done(
                    conn,
                    &a,
                    format!(
                        "volume {name} is primary on {node} (epoch {}), handed over in {} ms",
                        v.epoch,
                        started.elapsed().as_millis()
                    ),
                );
            }
            let named = st.nodes.get(&v.primary).is_some_and(|n| &n.name == node);
            if v.moving_to.is_none() && !named {
                bail!("the move of {name} did not happen (the destination fell out of sync, or a failover intervened): see `bulwark status`");
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!("volume {name} has not moved within 15 s; see `bulwark status`");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let text = match (&cmd, &a) {
        (VolumeCmd::Create { name, .. }, Applied::VolumeCreated(placement)) => {
            let st = conn.client()?.state().await?;
            let from = st
                .volumes
                .get(name)
                .and_then(|v| v.origin.as_ref())
                .map_or(String::new(), |o| {
                    format!(" from {}@{}", o.volume, o.snapshot)
                });
            format!(
                "volume {name} ({}){from} created on {}; primary {}",
                st.volumes
                    .get(name)
                    .map_or("?".into(), |v| human(v.size_bytes)),
                names(&st, placement),
                names(&st, &placement[..1])
            )
        }
        (VolumeCmd::Resize { name, size }, _) => format!("volume {name} is now {size}"),
        (VolumeCmd::Delete { name, .. }, _) => format!("volume {name} deleted"),
        _ => "done".into(),
    };
    done(conn, &a, text)
}

/// Verify `id` of volume `v` as its primary reports it while running.
pub(super) fn live_verify(
    statuses: &Statuses,
    v: &cluster::state::Volume,
    id: u64,
) -> Option<cluster::status::VerifyView> {
    statuses
        .get(&v.primary)
        .and_then(|s| s.as_ref().ok())
        .and_then(|s| s.volumes.iter().find(|x| x.name == v.name))
        .and_then(|x| x.verify.clone())
        .filter(|x| x.id == id)
}

/// Waits for the verify just asked for and reports it.
async fn verify_wait(conn: &Conn, name: &str, repair: bool, no_wait: bool) -> Result<()> {
    let client = conn.client()?;
    let id = client
        .state()
        .await?
        .volumes
        .get(name)
        .and_then(|v| v.verify.as_ref())
        .map(|x| x.id)
        .ok_or_else(|| anyhow!("volume {name} has no verify request; see `bulwark status`"))?;
    if no_wait {
        if conn.json {
            return print_json(&serde_json::json!({ "volume": name, "verify": id }));
        }
        println!("verify {id} of {name} started; `bulwark status` shows its progress and result");
        return Ok(());
    }
    let mut last_print = std::time::Instant::now();
    loop {
        let (st, statuses) = client.cluster_status().await?;
        let v = st
            .volumes
            .get(name)
            .ok_or_else(|| anyhow!("volume {name} disappeared"))?;
        let Some(asked) = v.verify.as_ref().filter(|x| x.id >= id) else {
            bail!("the verify of {name} was cleared; see `bulwark status`");
        };
        if asked.id != id {
            bail!(
                "another verify of {name} was asked for (number {}); it replaces this one",
                asked.id
            );
        }
        if let Some(r) = &asked.result {
            if conn.json {
                print_json(r)?;
            } else {
                println!("verify of {name}: {}", r.summary(&st, repair));
            }
            if r.differs() && !repair {
                bail!("replicas of {name} differ; `bulwark volume verify {name} --repair` resyncs those regions from the primary");
            }
            return Ok(());
        }
        if last_print.elapsed() >= Duration::from_secs(2) && !conn.json {
            last_print = std::time::Instant::now();
            let live = live_verify(&statuses, v, id);
            match live {
                Some(x) => eprintln!(
                    "verify of {name}: {} of {} regions compared, {} differing so far",
                    x.compared, x.regions, x.differing
                ),
                None => eprintln!("verify of {name}: waiting for the primary to start it"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
