//! This node's space: what the data file system has left, what each volume's local
//! copy takes (a thin file holds only what was written), and a `space_low` event
//! before the file system fills up — a full disk stops a replica (it leaves the
//! in-sync set) or a primary (it fails over), so the administrator hears first.

use std::path::Path;
use std::time::Duration;

use cluster::status::{DiskView, EventKind};

/// Below this share of the file system free, the node raises `space_low`.
pub const LOW_SPACE_PERCENT: u64 = 10;

/// The event is raised again only once free space went back above this share (no
/// event storm around the threshold).
const REARM_PERCENT: u64 = 15;

/// How often free space is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// The file system holding `dir`.
pub fn disk_usage(dir: &Path) -> Option<DiskView> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(DiskView {
        free_bytes: s.f_bavail.saturating_mul(s.f_frsize),
        total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

/// Bytes `path` takes on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks().saturating_mul(512))
}

/// Whether `d` is low: under [`LOW_SPACE_PERCENT`] free.
pub fn is_low(d: &DiskView) -> bool {
    d.free_bytes.saturating_mul(100) < d.total_bytes.saturating_mul(LOW_SPACE_PERCENT)
}

impl crate::Serving {
    /// This node's data file system.
    pub fn disk(&self) -> Option<DiskView> {
        disk_usage(self.volumes_dir())
    }

    /// Raises `space_low` when the data file system crosses under
    /// [`LOW_SPACE_PERCENT`] free, and says when it is back above [`REARM_PERCENT`].
    pub(crate) async fn watch_space(self: std::sync::Arc<Self>) {
        let mut low = false;
        loop {
            let me = self.clone();
            let disk = tokio::task::spawn_blocking(move || me.disk())
                .await
                .ok()
                .flatten();
            if let Some(d) = disk {
                let rearmed =
                    d.free_bytes.saturating_mul(100) >= d.total_bytes.saturating_mul(REARM_PERCENT);
                if !low && is_low(&d) {
                    low = true;
                    let units = self.thin_threshold_reached();
                    let mut details = serde_json::Map::new();
                    details.insert("free_bytes".into(), d.free_bytes.into());
                    details.insert("total_bytes".into(), d.total_bytes.into());
                    details.insert("thin_units_told".into(), units.into());
                    self.events().push_with(
                        EventKind::SpaceLow,
                        format!(
                            "{}'s data file system has {} free of {} (under {LOW_SPACE_PERCENT}%): a replica stops when it is full; free space, or move replicas off (`bulwark volume replicas VOLUME replace {} NODE`); {units} thin logical unit(s) served here report THIN PROVISIONING SOFT THRESHOLD REACHED to their initiators",
                            self.node_name(),
                            cluster::state::human(d.free_bytes),
                            cluster::state::human(d.total_bytes),
                            self.node_name(),
                        ),
                        details,
                    );
                } else if low && rearmed {
                    low = false;
                    self.events().push(
                        EventKind::SpaceLow,
                        format!(
                            "{}'s data file system has {} free again",
                            self.node_name(),
                            cluster::state::human(d.free_bytes)
                        ),
                    );
                }
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_space_is_a_share_of_the_file_system() {
        let d = |free, total| DiskView {
            free_bytes: free,
            total_bytes: total,
        };
        assert!(is_low(&d(9, 100)));
        assert!(!is_low(&d(10, 100)));
        assert!(!is_low(&d(0, 0)), "an unknown size is not low");
        let dir = tempfile::tempdir().unwrap();
        let real = disk_usage(dir.path()).unwrap();
        assert!(real.total_bytes > 0 && real.free_bytes <= real.total_bytes);
        let f = dir.path().join("thin.img");
        let file = std::fs::File::create(&f).unwrap();
        file.set_len(1 << 30).unwrap();
        assert!(allocated_bytes(&f) < 1 << 20, "a sparse file takes nothing");
    }
}
