//! Lease renewals for every primary on this node, in one request per round: the Raft
//! leader confirms its leadership once for all of them, however many volumes a node is
//! primary of (256 LUNs renewed one by one every 200 ms were 1280 leadership checks a
//! second, which drowned the leader; issue 19).

use super::*;

/// The primaries of this node whose leases are kept.
pub(super) struct Leases {
    node: ClusterNode,
    held: Mutex<Held>,
    /// A new primary: renew now rather than at the next round.
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Held {
    /// Primaries renewed each round: name -> (epoch, volume).
    volumes: BTreeMap<String, (u64, Arc<PrimaryVolume>)>,
    /// Leases asked for before their primaries started ([`Leases::ask_early`]): name ->
    /// (epoch, valid until).
    early: HashMap<String, (u64, Instant)>,
}

/// Keeps one primary's lease renewed until [`LeaseHandle::abort`] or drop.
pub(super) struct LeaseHandle {
    leases: Arc<Leases>,
    name: String,
    volume: Arc<PrimaryVolume>,
}

impl LeaseHandle {
    /// No renewal reaches the volume once this returns (a planned move releases the
    /// lease right after).
    pub(super) fn abort(&self) {
        if let Ok(mut held) = self.leases.held.lock() {
            if held
                .volumes
                .get(&self.name)
                .is_some_and(|(_, v)| Arc::ptr_eq(v, &self.volume))
            {
                held.volumes.remove(&self.name);
            }
        }
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        self.abort();
    }
}

impl Leases {
    pub(super) fn new(node: ClusterNode) -> Arc<Leases> {
        Arc::new(Leases {
            node,
            held: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Renews the lease of `volume`, primary of `name` at `epoch`, from now on.
    pub(super) fn hold(
        self: &Arc<Self>,
        name: &str,
        epoch: u64,
        volume: Arc<PrimaryVolume>,
    ) -> LeaseHandle {
        if let Ok(mut held) = self.held.lock() {
            if let Some((_, until)) = held.early.remove(name).filter(|(e, _)| *e == epoch) {
                volume.lease(until);
            }
            held.volumes
                .insert(name.to_string(), (epoch, volume.clone()));
        }
        self.wake.notify_one();
        LeaseHandle {
            leases: self.clone(),
            name: name.to_string(),
            volume,
        }
    }

    /// Asks for the leases of primaries about to start (name, epoch), in one request
    /// sent now: a node taking over many volumes starts them one after another, and a
    /// primary serves only once it holds a lease, so without this the last ones waited
    /// for the renewal rounds that followed their starts (issue 19). A lease granted
    /// here is counted from before the request, as every renewal is.
    pub(super) fn ask_early(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        volumes: Vec<(String, u64)>,
    ) {
        if volumes.is_empty() {
            return;
        }
        let me = self.clone();
        rt.spawn(async move {
            let sent = Instant::now();
            let Ok(answers) = me.node.renew_leases(&volumes).await else {
                return;
            };
            let until = sent + cluster::node::LEASE - LEASE_MARGIN;
            if let Ok(mut held) = me.held.lock() {
                for ((name, epoch), answer) in volumes.into_iter().zip(answers) {
                    if answer.is_err() {
                        continue;
                    }
                    match held.volumes.get(&name) {
                        Some((e, v)) if *e == epoch => v.lease(until),
                        Some(_) => {}
                        None => {
                            held.early.insert(name, (epoch, until));
                        }
                    }
                }
                // Never held (a start that failed): forget them once they are over.
                let now = Instant::now();
                held.early.retain(|_, (_, until)| *until > now);
            }
        });
    }

    /// Renews every held lease each round until the process stops.
    pub(super) async fn run(self: Arc<Self>) {
        loop {
            // A failed copy never serves again: its lease lapses, so the leader
            // promotes an in-sync replica.
            let batch: Vec<(String, u64)> = match self.held.lock() {
                Ok(held) => held
                    .volumes
                    .iter()
                    .filter(|(_, (_, v))| v.failure().is_none())
                    .map(|(name, (epoch, _))| (name.clone(), *epoch))
                    .collect(),
                Err(_) => return,
            };
            let next = if batch.is_empty() {
                RENEW_EVERY
            } else {
                let sent = Instant::now();
                match self.node.renew_leases(&batch).await {
                    Ok(answers) => {
                        if let Ok(held) = self.held.lock() {
                            for ((name, epoch), answer) in batch.iter().zip(answers) {
                                match (answer, held.volumes.get(name)) {
                                    (Ok(()), Some((e, v))) if e == epoch => {
                                        v.lease(sent + cluster::node::LEASE - LEASE_MARGIN)
                                    }
                                    (Err(why), _) => {
                                        tracing::debug!(volume = %name, %why, "lease not renewed")
                                    }
                                    _ => {}
                                }
                            }
                        }
                        RENEW_EVERY
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "leases not renewed");
                        // No leader, or a new one: renew as soon as one answers.
                        RENEW_RETRY
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}
