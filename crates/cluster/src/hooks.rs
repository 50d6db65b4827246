//! Programs the cluster runs on a node's behalf (alert programs, the fence command)
//! come only from one directory that only root may change (`/etc/bulwark/hooks` by
//! default, `bulwark serve --hooks-dir`): the path of a program is cluster state that
//! any administrator sets, and without this an admin token would run any binary on
//! every node as the daemon's user.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where hook programs live unless `--hooks-dir` says otherwise.
pub const DEFAULT_HOOKS_DIR: &str = "/etc/bulwark/hooks";

/// The program `program` resolves to, if it may run: inside `dir` (after resolving
/// links), a regular executable file, and neither it nor `dir` writable by anyone but
/// its owner, who is root or the daemon's own user.
pub fn check_program(program: &str, dir: &Path) -> Result<PathBuf, String> {
    let dir_real = dir.canonicalize().map_err(|e| {
        format!(
            "hook programs must be in {}, which cannot be read ({e}); create it (owned by root, mode 0755) or set bulwark serve --hooks-dir",
            dir.display()
        )
    })?;
    let real = Path::new(program)
        .canonicalize()
        .map_err(|e| format!("{program}: {e}"))?;
    if !real.starts_with(&dir_real) {
        return Err(format!(
            "{program} is not in the hooks directory {}; put it there (bulwark serve --hooks-dir)",
            dir_real.display()
        ));
    }
    let me = own_uid();
    let mut check = Some(real.as_path());
    while let Some(p) = check {
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.uid() != 0 && meta.uid() != me {
            return Err(format!(
                "{} is owned by uid {}; hooks and their directory must be owned by root",
                p.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is writable by group or others (mode {:o}); chmod go-w it",
                p.display(),
                meta.mode() & 0o7777
            ));
        }
        check = if p == dir_real { None } else { p.parent() };
        if p == real && !(meta.is_file() && meta.mode() & 0o111 != 0) {
            return Err(format!("{program} is not an executable file"));
        }
    }
    Ok(real)
}

fn own_uid() -> u32 {
    // The daemon's own files are its own: a node run as a service user may own its
    // hooks directory.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_programs_in_the_hooks_directory_that_only_their_owner_may_change_run() {
        let root = tempfile::tempdir().unwrap();
        let hooks = root.path().join("hooks");
        std::fs::create_dir(&hooks).unwrap();
        std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o755)).unwrap();
        let good = hooks.join("fence");
        std::fs::write(&good, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_program(good.to_str().unwrap(), &hooks).is_ok());

        let outside = root.path().join("elsewhere");
        std::fs::write(&outside, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_program(outside.to_str().unwrap(), &hooks).unwrap_err();
        assert!(e.contains("not in the hooks directory"), "{e}");
        // A link inside that points outside does not count as inside.
        let link = hooks.join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(check_program(link.to_str().unwrap(), &hooks).is_err());
        assert!(check_program("/bin/sh", &hooks).is_err());

        let writable = hooks.join("open");
        std::fs::write(&writable, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_program(writable.to_str().unwrap(), &hooks).unwrap_err();
        assert!(e.contains("writable"), "{e}");
        let plain = hooks.join("plain");
        std::fs::write(&plain, "x").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_program(plain.to_str().unwrap(), &hooks).is_err());
        std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_program(good.to_str().unwrap(), &hooks).unwrap_err();
        assert!(e.contains("writable"), "{e}");
        assert!(check_program(good.to_str().unwrap(), &root.path().join("missing")).is_err());
    }
}
