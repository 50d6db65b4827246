//! A node's data folder is its own: it holds the cluster's keys, CHAP secrets and
//! volume data.

use anyhow::{Context, Result};

/// What a node creates is its own: the data folder holds the cluster's keys, CHAP
/// secrets and volume data, so files are created 0600 and folders 0700.
pub fn private_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Tightens a data folder made before files were private (or copied in with looser
/// modes): every folder 0700, every file 0600. Block devices and other special files
/// named in a configuration are left alone.
pub fn secure_data_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        return Ok(());
    }
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let want = if meta.is_dir() {
            for entry in std::fs::read_dir(&path)
                .with_context(|| format!("cannot list {}", path.display()))?
            {
                todo.push(entry?.path());
            }
            0o700
        } else if meta.is_file() {
            0o600
        } else {
            continue;
        };
        if meta.permissions().mode() & 0o777 != want {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(want))
                .with_context(|| format!("cannot make {} private", path.display()))?;
        }
    }
    Ok(())
}
