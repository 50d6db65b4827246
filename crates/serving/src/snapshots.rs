//! A volume's snapshots on this node: copies of its file that share its blocks
//! (reflinks), next to it as `VOLUME@SNAPSHOT.img`, taken by the replication layer at
//! one position of the volume's stream on every member (issue 21).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockstore::FileStore;

/// Where snapshot `snapshot` of the volume whose copy is `volume_path` lives.
pub fn snapshot_path(volume_path: &Path, snapshot: &str) -> PathBuf {
    let stem = volume_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    volume_path.with_file_name(format!("{stem}@{snapshot}.img"))
}

/// Whether the volumes folder of the node whose data folder is `data_dir` can share
/// blocks between files, as snapshots need (the node tells the cluster when it starts,
/// see [`blockstore::FileStore::shares_blocks`]); `None` if it cannot be checked.
pub fn shares_blocks(data_dir: &Path) -> Option<bool> {
    let dir = data_dir.join("volumes");
    let checked = std::fs::create_dir_all(&dir).and_then(|()| FileStore::shares_blocks(&dir));
    match checked {
        Ok(yes) => {
            if !yes {
                tracing::info!(
                    "{} does not share blocks between files (reflink): snapshots and clones of volumes with a copy here are refused; XFS or btrfs can",
                    dir.display()
                );
            }
            Some(yes)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether {} shares blocks between files", dir.display());
            None
        }
    }
}

/// This node's copies of `volume`'s snapshots, in `volumes_dir`.
pub fn copies_here(volumes_dir: &Path, volume: &str) -> Vec<cluster::status::SnapshotView> {
    let prefix = format!("{volume}@");
    let mut v: Vec<cluster::status::SnapshotView> = std::fs::read_dir(volumes_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let name = file
                .strip_prefix(&prefix)?
                .strip_suffix(".img")?
                .to_string();
            Some(cluster::status::SnapshotView {
                name,
                allocated_bytes: crate::space::allocated_bytes(&e.path()),
            })
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Whether this node keeps its copy of snapshot `snapshot` of `volume`: while the
/// snapshot is being taken (the copy may be one of its members'), and once taken if
/// this node is a member. A copy of a snapshot deleted, abandoned at a failover, or
/// taken while this node was out of sync (its copy is not consistent) goes.
pub fn keep_copy(
    st: &cluster::state::ClusterState,
    me: cluster::state::NodeId,
    volume: &str,
    snapshot: &str,
) -> bool {
    st.volumes
        .get(volume)
        .and_then(|v| v.snapshots.get(snapshot))
        .is_some_and(|s| !s.ready || s.members.contains(&me))
}

/// This node's copy of a volume, as the replication layer sees it: it grows for a
/// resize and takes snapshots.
pub struct VolumeCopy {
    store: Arc<FileStore>,
}

impl VolumeCopy {
    /// The copy held in `store`.
    pub fn new(store: Arc<FileStore>) -> VolumeCopy {
        VolumeCopy { store }
    }
}

impl replication::LocalCopy for VolumeCopy {
    fn grow(&self, size: u64) -> io::Result<()> {
        self.store.grow(size).map_err(io::Error::other)
    }

    fn snapshot(&self, name: &str) -> io::Result<()> {
        let dest = snapshot_path(self.store.path(), name);
        // The stream asks for this snapshot now: a copy of that name is left over
        // from one deleted before this node removed it.
        match std::fs::remove_file(&dest) {
            Ok(()) => tracing::info!(path = %dest.display(), "replacing a stale snapshot copy"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.store.reflink_to(&dest).map_err(io::Error::other)
    }

    fn rollback(&self, name: &str) -> io::Result<()> {
        let src = snapshot_path(self.store.path(), name);
        if !src.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("this node holds no copy of snapshot {name}"),
            ));
        }
        self.store.reflink_from(&src).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_the_copies_the_cluster_names_for_it() {
        use cluster::state::Command;
        let mut st = crate::test_support::state_with_nodes(3);
        st.apply(&Command::CreateVolume {
            name: "v".into(),
            size_bytes: 1 << 30,
            replicas: 3,
            block_size: 512,
            physical_block_size: None,
            nodes: vec![],
        })
        .unwrap();
        let replicas = st.volumes["v"].replicas.clone();
        st.apply(&Command::CreateSnapshot {
            volumes: vec!["v".into()],
            name: "s".into(),
            at_ms: 0,
        })
        .unwrap();
        for n in &replicas {
            assert!(keep_copy(&st, *n, "v", "s"), "kept while being taken");
        }
        st.apply(&Command::SnapshotTaken {
            volume: "v".into(),
            name: "s".into(),
            epoch: 1,
            members: replicas[..2].to_vec(),
            pause_us: 1,
        })
        .unwrap();
        assert!(keep_copy(&st, replicas[0], "v", "s"));
        assert!(keep_copy(&st, replicas[1], "v", "s"));
        assert!(!keep_copy(&st, replicas[2], "v", "s"), "not a member");
        assert!(!keep_copy(&st, replicas[0], "v", "other"));
        assert!(!keep_copy(&st, replicas[0], "gone", "s"));
    }

    #[test]
    fn a_snapshot_lives_next_to_its_volume() {
        assert_eq!(
            snapshot_path(
                Path::new("/var/lib/bulwark/volumes/vm1.img"),
                "before-upgrade"
            ),
            PathBuf::from("/var/lib/bulwark/volumes/vm1@before-upgrade.img")
        );
    }
}
