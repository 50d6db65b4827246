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
        self.store
            .reflink_to(&snapshot_path(self.store.path(), name))
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
