//! Keeps what this node serves equal to what the cluster state says: volume files for
//! every replica placed here, and an iSCSI target for every target whose volumes are
//! primary here. Changes apply to live targets: a new LUN is added to the running
//! `TargetDevice` (raising REPORTED LUNS DATA HAS CHANGED), a grown volume raises
//! CAPACITY DATA HAS CHANGED, ACL and CHAP changes take effect at the next login.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use cluster::state::{ClusterState, NodeId, Target, Volume};
use cluster::ClusterNode;
use iscsi_proto::login::ChapAccount;
use tracing::{error, info};

/// One target served here.
struct Served {
    device: Arc<scsi::TargetDevice>,
    /// LUN → (volume name, its store).
    luns: BTreeMap<u64, (String, Arc<blockstore::FileStore>)>,
    /// The configuration last given to the iSCSI server.
    config: Target,
    chap: Vec<ChapAccount>,
}

/// The serving side of a cluster node.
pub struct Serving {
    me: NodeId,
    node_name: String,
    volumes_dir: PathBuf,
    server: target::Server,
    portals: Vec<target::Portal>,
    served: Mutex<HashMap<String, Served>>,
    events: Arc<cluster::status::EventLog>,
}

impl Serving {
    /// Serving for `node` through `server` on `portals`; volume files live in
    /// `<data_dir>/volumes`.
    pub fn new(
        node: &ClusterNode,
        server: target::Server,
        data_dir: &Path,
        portals: Vec<target::Portal>,
    ) -> Arc<Serving> {
        Arc::new(Serving {
            me: node.id(),
            node_name: node.identity().name.clone(),
            volumes_dir: data_dir.join("volumes"),
            server,
            portals,
            served: Mutex::new(HashMap::new()),
            events: node.events(),
        })
    }

    /// Reconciles on every state change until the state channel closes.
    pub async fn run(self: Arc<Self>, mut state: tokio::sync::watch::Receiver<Arc<ClusterState>>) {
        loop {
            let st = state.borrow_and_update().clone();
            let me = self.clone();
            // File creation and fsync are blocking I/O: keep them off the runtime threads.
            match tokio::task::spawn_blocking(move || me.reconcile(&st)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("applying the cluster configuration: {e:#}"),
                Err(e) => error!("applying the cluster configuration panicked: {e}"),
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Targets served here now.
    pub fn served_targets(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .served
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.volumes_dir.join(format!("{name}.img"))
    }

    fn open_volume(&self, v: &Volume) -> Result<Arc<blockstore::FileStore>> {
        let store = blockstore::FileStore::open(
            &self.volume_path(&v.name),
            &blockstore::OpenOptions {
                create_size_bytes: Some(v.size_bytes),
                block_size: v.block_size,
                direct: false,
                read_only: false,
            },
        )
        .with_context(|| format!("volume {}", v.name))?;
        store
            .grow(v.size_bytes)
            .with_context(|| format!("growing volume {}", v.name))?;
        Ok(Arc::new(store))
    }

    fn reconcile(&self, st: &ClusterState) -> Result<()> {
        std::fs::create_dir_all(&self.volumes_dir)
            .with_context(|| format!("creating {}", self.volumes_dir.display()))?;
        let mut served = self
            .served
            .lock()
            .map_err(|_| anyhow::anyhow!("serving table poisoned"))?;

        // Targets that are no longer ours.
        let gone: Vec<String> = served
            .keys()
            .filter(|iqn| {
                st.targets
                    .get(*iqn)
                    .is_none_or(|t| st.target_primary(t) != Some(self.me))
            })
            .cloned()
            .collect();
        for iqn in gone {
            self.server.remove_target(&iqn);
            served.remove(&iqn);
            self.events.push(
                "config",
                format!("{} stopped serving {iqn}", self.node_name),
            );
        }

        // Replicas placed here: make sure their files exist at the right size, and
        // remove files of volumes the cluster deleted.
        for v in st
            .volumes
            .values()
            .filter(|v| v.replicas.contains(&self.me))
        {
            let in_use = served
                .values()
                .flat_map(|s| s.luns.values())
                .find(|(name, _)| name == &v.name)
                .map(|(_, store)| store.clone());
            // A served volume grows in the target loop below, which also raises the
            // unit attention.
            if in_use.is_none() {
                drop(self.open_volume(v)?);
            }
        }
        if let Ok(dir) = std::fs::read_dir(&self.volumes_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let Some(vol) = name.strip_suffix(".img") else {
                    continue;
                };
                let placed_here = st
                    .volumes
                    .get(vol)
                    .is_some_and(|v| v.replicas.contains(&self.me));
                if !placed_here {
                    info!(
                        volume = vol,
                        "removing the data of a volume this node no longer holds"
                    );
                    let _ = std::fs::remove_file(entry.path());
                    let _ = std::fs::remove_file(entry.path().with_extension("pr"));
                }
            }
        }

        // Targets primary here.
        for t in st.targets.values() {
            if st.target_primary(t) != Some(self.me) {
                continue;
            }
            let is_new = !served.contains_key(&t.iqn);
            let s = served.entry(t.iqn.clone()).or_insert_with(|| Served {
                device: Arc::new(scsi::TargetDevice::new()),
                luns: BTreeMap::new(),
                config: Target::default(),
                chap: Vec::new(),
            });
            // LUNs removed or remapped.
            let stale: Vec<u64> = s
                .luns
                .iter()
                .filter(|(lun, (vol, _))| t.luns.get(lun) != Some(vol))
                .map(|(lun, _)| *lun)
                .collect();
            for lun in stale {
                let _ = s.device.remove_lun(lun);
                s.luns.remove(&lun);
            }
            // LUNs added, volumes grown.
            for (lun, vol_name) in &t.luns {
                let Some(v) = st.volumes.get(vol_name) else {
                    continue;
                };
                if let Some((_, store)) = s.luns.get(lun) {
                    if scsi::BlockDevice::size_bytes(store.as_ref()) < v.size_bytes {
                        store.grow(v.size_bytes)?;
                        s.device.capacity_changed(*lun);
                    }
                    continue;
                }
                let store = self.open_volume(v)?;
                s.device
                    .add_lun(
                        *lun,
                        lu_config(v, &self.volume_path(&v.name)),
                        store.clone(),
                    )
                    .with_context(|| format!("{} LUN {lun}", t.iqn))?;
                s.luns.insert(*lun, (vol_name.clone(), store));
            }
            let chap: Vec<ChapAccount> = t
                .chap
                .iter()
                .filter_map(|u| st.chap.get(u))
                .map(|a| ChapAccount {
                    user: a.user.clone(),
                    secret: a.secret.clone(),
                    mutual: a.mutual.clone(),
                })
                .collect();
            if is_new || s.config != *t || s.chap != chap {
                self.server.set_target(target::TargetConfig {
                    name: t.iqn.clone(),
                    alias: t.alias.clone(),
                    device: s.device.clone(),
                    portals: self.portals.clone(),
                    allowed_initiators: if t.acl.is_empty() {
                        None
                    } else {
                        Some(t.acl.iter().cloned().collect())
                    },
                    chap: chap.clone(),
                });
                if is_new {
                    self.events
                        .push("config", format!("{} serves {}", self.node_name, t.iqn));
                }
                s.config = t.clone();
                s.chap = chap;
            }
        }
        Ok(())
    }
}

/// SCSI identity of a volume's logical unit: derived from the volume name so that it
/// stays the same on every node and across restarts (multipath relies on it).
fn lu_config(v: &Volume, path: &Path) -> scsi::LuConfig {
    let h1 = crate::fnv1a(&[b"volume", v.name.as_bytes()]);
    let h2 = crate::fnv1a(&[&h1.to_be_bytes(), v.name.as_bytes()]);
    scsi::LuConfig {
        block_size: v.block_size,
        serial: format!("{h1:016x}"),
        naa: crate::naa_identifier(h1, h2),
        pr_file: Some(path.with_extension("pr")),
        ..Default::default()
    }
}
