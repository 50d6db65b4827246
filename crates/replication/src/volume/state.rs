//! A volume replica's small persistent state: epoch, activity log, dirty map.

use super::*;

/// Small persistent state of a volume replica on one node: the highest epoch seen, the
/// activity log and the map of what the others lack. Files next to the volume's data,
/// each a record replaced in place ([`crate::record`]).
#[derive(Clone, Debug)]
pub struct ReplicaState {
    pub(super) dir: PathBuf,
    pub(super) name: String,
}

impl ReplicaState {
    /// State of volume `name` in `dir`.
    pub fn new(dir: impl Into<PathBuf>, name: &str) -> ReplicaState {
        ReplicaState {
            dir: dir.into(),
            name: name.to_string(),
        }
    }

    fn path(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{}.{what}", self.name))
    }

    /// The record `what`'s payload, or the whole file if it predates records (both
    /// formats hold the same bytes); `None` if there is no file.
    fn load(&self, what: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(match crate::record::read(&self.path(what))? {
            crate::record::Stored::Missing => None,
            crate::record::Stored::Record(b) | crate::record::Stored::Legacy(b) => Some(b),
        })
    }

    /// The persisted epoch (0 if none).
    pub fn epoch(&self) -> io::Result<Epoch> {
        let Some(b) = self.load("epoch")? else {
            return Ok(Epoch(0));
        };
        let arr: [u8; 8] = b.as_slice().try_into().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is damaged", self.path("epoch").display()),
            )
        })?;
        Ok(Epoch(u64::from_le_bytes(arr)))
    }

    /// Persists `epoch`.
    pub fn set_epoch(&self, epoch: Epoch) -> io::Result<()> {
        crate::record::write(&self.path("epoch"), &epoch.0.to_le_bytes())
    }

    /// The persisted activity log (empty if none).
    pub fn activity_log(&self) -> io::Result<RegionSet> {
        let mut s = RegionSet::new();
        for c in self.load("al")?.unwrap_or_default().chunks_exact(8) {
            if let Ok(arr) = <[u8; 8]>::try_from(c) {
                s.insert(u64::from_le_bytes(arr));
            }
        }
        Ok(s)
    }

    /// The persisted map of what the replicas outside the in-sync set lack (`None`
    /// when this node never had one, or forgot it: then they need a full sync).
    pub fn dirty_map(&self) -> io::Result<Option<DirtyMap>> {
        let path = self.path("dirty");
        // An empty record is no map (a map's encoding holds at least its count).
        let Some(b) = self.load("dirty")?.filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        let damaged = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is damaged", path.display()),
            )
        };
        let (body, crc) = b
            .split_at_checked(b.len().saturating_sub(4))
            .ok_or_else(damaged)?;
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(damaged());
        }
        let mut words = body
            .chunks_exact(8)
            .map(|c| <[u8; 8]>::try_from(c).map(u64::from_le_bytes));
        let mut next = || words.next().and_then(Result::ok).ok_or_else(damaged);
        let mut map = DirtyMap::new();
        for _ in 0..next()? {
            let node = next()?;
            let set = map.entry(NodeId(node)).or_default();
            for _ in 0..next()? {
                set.insert(next()?);
            }
        }
        Ok(Some(map))
    }

    /// Forgets the map (after a failed update: no map is safe, a stale one is not).
    pub fn forget_dirty_map(&self) {
        let path = self.path("dirty");
        if crate::record::write(&path, &[]).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Persists the map of what the replicas outside the in-sync set lack.
    pub fn set_dirty_map(&self, map: &DirtyMap) -> io::Result<()> {
        let mut b = Vec::new();
        b.extend_from_slice(&(map.len() as u64).to_le_bytes());
        for (node, set) in map {
            b.extend_from_slice(&node.0.to_le_bytes());
            b.extend_from_slice(&(set.len() as u64).to_le_bytes());
            for r in set.iter() {
                b.extend_from_slice(&r.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        crate::record::write(&self.path("dirty"), &b)
    }

    /// Persists the activity log.
    pub fn set_activity_log(&self, s: &RegionSet) -> io::Result<()> {
        let mut b = Vec::with_capacity(s.len() * 8);
        for r in s.iter() {
            b.extend_from_slice(&r.to_le_bytes());
        }
        crate::record::write(&self.path("al"), &b)
    }
}
