//! Tests of the threaded driver: in-process nodes over channels, stores in memory.

use super::*;
use block_device::mem::MemDevice;

/// Channels between in-process nodes, routed by node id.
#[derive(Default)]
struct Net {
    primaries: Mutex<HashMap<NodeId, Arc<PrimaryVolume>>>,
    replicas: Mutex<HashMap<NodeId, Arc<ReplicaVolume>>>,
    /// Each node's copy, with the snapshots it took.
    copies: Mutex<HashMap<NodeId, Arc<MemCopy>>>,
}

/// A node's copy in memory: snapshots are copies of its bytes, by name.
struct MemCopy {
    store: Arc<MemDevice>,
    snapshots: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    /// Snapshots fail here (a file system without reflink).
    refuse_snapshots: std::sync::atomic::AtomicBool,
}

impl LocalCopy for MemCopy {
    fn grow(&self, size: u64) -> io::Result<()> {
        self.store.resize(size);
        Ok(())
    }

    fn snapshot(&self, name: &str) -> io::Result<()> {
        if self
            .refuse_snapshots
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(io::Error::other("no reflink here"));
        }
        let bytes = self.store.snapshot(0, self.store.size_bytes() as usize);
        self.snapshots.lock().unwrap().insert(name.into(), bytes);
        Ok(())
    }

    fn rollback(&self, name: &str) -> io::Result<()> {
        let bytes = self
            .snapshots
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| io::Error::other("no such snapshot here"))?;
        self.store.write_at(0, &bytes, false)
    }
}

fn copy_of(net: &Arc<Net>, me: NodeId, store: &Arc<MemDevice>) -> Arc<MemCopy> {
    let copy = Arc::new(MemCopy {
        store: store.clone(),
        snapshots: Mutex::default(),
        refuse_snapshots: false.into(),
    });
    net.copies.lock().unwrap().insert(me, copy.clone());
    copy
}

struct Port {
    me: NodeId,
    net: Arc<Net>,
}

impl Transport for Port {
    fn send(&self, to: NodeId, msg: Message) {
        let to_replica = msg.to_replica();
        // Delivered without holding the map: a primary handles a message on the
        // sender's thread, and may call back into the control plane.
        if to_replica {
            let r = self.net.replicas.lock().unwrap().get(&to).cloned();
            if let Some(r) = r {
                r.deliver(self.me, msg);
            }
        } else {
            let p = self.net.primaries.lock().unwrap().get(&to).cloned();
            if let Some(p) = p {
                p.deliver(self.me, msg);
            }
        }
    }
}

/// Commits every request at once.
struct Cp {
    isr: Mutex<BTreeSet<NodeId>>,
    net: Arc<Net>,
    primary: NodeId,
}

impl ControlPlane for Cp {
    fn request_isr_add(&self, epoch: Epoch, node: NodeId) {
        let isr = {
            let mut i = self.isr.lock().unwrap();
            i.insert(node);
            i.clone()
        };
        if let Some(p) = self.net.primaries.lock().unwrap().get(&self.primary) {
            p.isr_committed(epoch, isr);
        }
    }
    fn request_isr_remove(&self, epoch: Epoch, node: NodeId) {
        let isr = {
            let mut i = self.isr.lock().unwrap();
            i.remove(&node);
            i.clone()
        };
        if let Some(p) = self.net.primaries.lock().unwrap().get(&self.primary) {
            p.isr_committed(epoch, isr);
        }
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn start_primary(
    net: &Arc<Net>,
    me: NodeId,
    epoch: Epoch,
    store: Arc<MemDevice>,
    dir: &std::path::Path,
    isr: &[NodeId],
    others: &[NodeId],
) -> Arc<PrimaryVolume> {
    let state = ReplicaState::new(dir.join(format!("n{me}")), "v");
    std::fs::create_dir_all(dir.join(format!("n{me}"))).unwrap();
    let cfg = primary_config(me, epoch, store.size_bytes(), &state, isr, others);
    let cp = Arc::new(Cp {
        isr: Mutex::new(isr.iter().copied().collect()),
        net: net.clone(),
        primary: me,
    });
    let p = Arc::new(
        PrimaryVolume::start(
            cfg,
            store.clone(),
            copy_of(net, me, &store),
            state,
            Arc::new(Port {
                me,
                net: net.clone(),
            }),
            cp,
        )
        .unwrap(),
    );
    net.primaries.lock().unwrap().insert(me, p.clone());
    for o in others {
        p.link_up(*o);
    }
    p.lease(Instant::now() + Duration::from_secs(60));
    p
}

/// The tests' primary: 64 KiB regions, replicas `others`, of which `isr` in sync.
fn primary_config(
    me: NodeId,
    epoch: Epoch,
    size_bytes: u64,
    state: &ReplicaState,
    isr: &[NodeId],
    others: &[NodeId],
) -> PrimaryConfig {
    PrimaryConfig {
        me,
        epoch,
        region_size: 64 << 10,
        size_bytes,
        replicas: others.iter().copied().collect(),
        in_sync: isr.iter().copied().collect(),
        rebuilding: BTreeSet::new(),
        own_activity_log: state.activity_log().unwrap(),
        dirty_hint: state.dirty_map().unwrap(),
        replica_timeout_ms: 500,
        resync_window: 4,
        resync_rate: 0,
        rebuild_rate: 0,
        activity_log_slack: crate::replica::ACTIVITY_LOG_SLACK,
        bug_ack_before_replicas: false,
        bug_forget_before_flush: false,
    }
}

fn start_replica(net: &Arc<Net>, me: NodeId, store: Arc<MemDevice>, dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join(format!("n{me}"))).unwrap();
    let state = ReplicaState::new(dir.join(format!("n{me}")), "v");
    let r = ReplicaVolume::start(
        64 << 10,
        store.clone(),
        copy_of(net, me, &store),
        state,
        Arc::new(Port {
            me,
            net: net.clone(),
        }),
        crate::ACTIVITY_LOG_SLACK,
    )
    .unwrap();
    net.replicas.lock().unwrap().insert(me, Arc::new(r));
}

fn read(d: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read_at(offset, &mut b).unwrap();
    b
}

#[test]
fn concurrent_saves_of_the_small_state_all_succeed() {
    // One shared temporary name made two saves at once truncate and rename each
    // other's file (ENOENT under load).
    let dir = std::env::temp_dir().join(format!("bulwark-saves-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = ReplicaState::new(&dir, "v");
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let state = state.clone();
            s.spawn(move || {
                for i in 0..100u64 {
                    let mut log = RegionSet::new();
                    log.insert(t * 1000 + i);
                    state.set_activity_log(&log).unwrap();
                    state.set_epoch(Epoch(i)).unwrap();
                }
            });
        }
    });
    assert_eq!(state.activity_log().unwrap().len(), 1);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn regions_leave_the_activity_log_only_after_a_background_flush() {
    use std::sync::atomic::Ordering;
    let dir = std::env::temp_dir().join(format!("bulwark-bgflush-{}", std::process::id()));
    let net = Arc::new(Net::default());
    let stores: Vec<Arc<MemDevice>> = (0..2).map(|_| Arc::new(MemDevice::new(4 << 20))).collect();
    start_replica(&net, NodeId(2), stores[1].clone(), &dir);
    let p = start_primary(
        &net,
        NodeId(1),
        Epoch(1),
        stores[0].clone(),
        &dir,
        &[NodeId(2)],
        &[NodeId(2)],
    );
    wait_until("sealed and serving", || p.serving());
    let before: Vec<u64> = stores
        .iter()
        .map(|s| s.flushes.load(Ordering::Relaxed))
        .collect();
    for i in 0..8u64 {
        p.write_at(i * (64 << 10), &[7u8; 4096], false).unwrap();
    }
    // Applied everywhere, not yet flushed: the replica's log still names them.
    let replica_log = ReplicaState::new(dir.join("n2"), "v");
    assert!(replica_log.activity_log().unwrap().len() >= 8);
    // No SYNCHRONIZE CACHE: both sides flush on their own within a few hundred ms.
    wait_until("background flushes on both copies", || {
        stores
            .iter()
            .zip(&before)
            .all(|(s, b)| s.flushes.load(Ordering::Relaxed) > *b)
    });
    drop(p);
    net.primaries.lock().unwrap().clear();
    net.replicas.lock().unwrap().clear();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A deallocation (UNMAP) goes through the stream: when it returns, every in-sync
/// member has punched the range (reads zeroes, reports it deallocated), and the
/// blocks around it are untouched; a copy that cannot deallocate writes zeroes.
#[test]
fn a_deallocation_reaches_every_replica_before_it_returns() {
    use block_device::Provisioning;
    let dir = tempfile::tempdir().unwrap();
    let net = Arc::new(Net::default());
    let mut stores: Vec<Arc<MemDevice>> =
        (0..2).map(|_| Arc::new(MemDevice::new(4 << 20))).collect();
    stores.push(Arc::new(MemDevice::thick(4 << 20)));
    start_replica(&net, NodeId(2), stores[1].clone(), dir.path());
    start_replica(&net, NodeId(3), stores[2].clone(), dir.path());
    let p = start_primary(
        &net,
        NodeId(1),
        Epoch(1),
        stores[0].clone(),
        dir.path(),
        &[NodeId(2), NodeId(3)],
        &[NodeId(2), NodeId(3)],
    );
    wait_until("sealed and serving", || p.serving());
    assert!(p.supports_discard(), "a thin primary store reports LBPME");
    p.write_at(0, &[5u8; 1 << 20], false).unwrap();
    p.discard(256 << 10, 512 << 10).unwrap();
    for (i, s) in stores.iter().enumerate() {
        assert_eq!(
            read(s.as_ref(), 0, 256 << 10),
            vec![5u8; 256 << 10],
            "copy {i}"
        );
        assert_eq!(
            read(s.as_ref(), 256 << 10, 512 << 10),
            vec![0u8; 512 << 10],
            "copy {i} reads zeroes where deallocated"
        );
        assert_eq!(
            read(s.as_ref(), 768 << 10, 256 << 10),
            vec![5u8; 256 << 10],
            "copy {i}"
        );
        let e = s.provisioning(256 << 10, 512 << 10).unwrap();
        let expect = if s.supports_discard() {
            Provisioning::Deallocated
        } else {
            Provisioning::Mapped
        };
        assert_eq!(e.status, expect, "copy {i}");
    }
    assert_eq!(
        p.provisioning(256 << 10, 512 << 10).unwrap().status,
        Provisioning::Deallocated,
        "GET LBA STATUS through the primary"
    );
    drop(p);
    net.primaries.lock().unwrap().clear();
    net.replicas.lock().unwrap().clear();
}

/// Under writes from several threads, a snapshot holds the same bytes on every
/// member, every write that completed before it was asked for, and nothing written
/// after it returned. A member that cannot take it leaves the in-sync set; the
/// others have it.
#[test]
fn a_snapshot_is_the_same_on_every_member_under_writes() {
    let dir = tempfile::tempdir().unwrap();
    let net = Arc::new(Net::default());
    let size = 1u64 << 20;
    let stores: Vec<Arc<MemDevice>> = (0..3).map(|_| Arc::new(MemDevice::new(size))).collect();
    start_replica(&net, NodeId(2), stores[1].clone(), dir.path());
    start_replica(&net, NodeId(3), stores[2].clone(), dir.path());
    let p = start_primary(
        &net,
        NodeId(1),
        Epoch(1),
        stores[0].clone(),
        dir.path(),
        &[NodeId(2), NodeId(3)],
        &[NodeId(2), NodeId(3)],
    );
    wait_until("sealed and serving", || p.serving());
    for b in 0..(size / 4096) {
        p.write_at(b * 4096, &[1u8; 4096], false).unwrap();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let pause = std::thread::scope(|s| {
        for t in 0..3u64 {
            let (p, stop) = (&p, &stop);
            s.spawn(move || {
                let mut round = 2u8;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for b in (t..size / 4096).step_by(3) {
                        p.write_at(b * 4096, &[round; 4096], false).unwrap();
                    }
                    round = round.wrapping_add(1).max(2);
                }
            });
        }
        std::thread::sleep(Duration::from_millis(30));
        let pause = p.snapshot("s1").unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        pause
    });
    eprintln!(
        "snapshot under writes: writes held {} µs here",
        pause.as_micros()
    );
    let copies = net.copies.lock().unwrap().clone();
    let snap = |n: u64| copies[&NodeId(n)].snapshots.lock().unwrap()["s1"].clone();
    let primary = snap(1);
    assert_eq!(snap(2), primary, "replica 2 took the same snapshot");
    assert_eq!(snap(3), primary, "replica 3 took the same snapshot");
    assert!(
        primary.iter().all(|b| *b != 0),
        "every block written before the snapshot was asked is in it"
    );
    assert_ne!(
        read(stores[0].as_ref(), 0, size as usize),
        primary,
        "writes went on after it"
    );

    // A member that cannot take a snapshot leaves the in-sync set; it still holds
    // on the others.
    copies[&NodeId(3)]
        .refuse_snapshots
        .store(true, std::sync::atomic::Ordering::Relaxed);
    p.write_at(0, &[7u8; 4096], false).unwrap();
    p.snapshot("s2").unwrap();
    assert_eq!(snap_of(&copies, 2, "s2"), snap_of(&copies, 1, "s2"));
    assert!(!copies[&NodeId(3)]
        .snapshots
        .lock()
        .unwrap()
        .contains_key("s2"));
    assert!(!p.in_sync().contains(&NodeId(3)), "{:?}", p.in_sync());
    drop(p);
    net.primaries.lock().unwrap().clear();
    net.replicas.lock().unwrap().clear();
}

/// A rollback makes every member's copy what the snapshot holds; writes after it
/// land on the rolled-back data.
#[test]
fn a_rollback_puts_the_snapshot_back_on_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let net = Arc::new(Net::default());
    let size = 256u64 << 10;
    let stores: Vec<Arc<MemDevice>> = (0..3).map(|_| Arc::new(MemDevice::new(size))).collect();
    start_replica(&net, NodeId(2), stores[1].clone(), dir.path());
    start_replica(&net, NodeId(3), stores[2].clone(), dir.path());
    let p = start_primary(
        &net,
        NodeId(1),
        Epoch(1),
        stores[0].clone(),
        dir.path(),
        &[NodeId(2), NodeId(3)],
        &[NodeId(2), NodeId(3)],
    );
    wait_until("sealed and serving", || p.serving());
    p.write_at(0, &vec![1u8; size as usize], false).unwrap();
    p.snapshot("s").unwrap();
    let snapshot = read(stores[0].as_ref(), 0, size as usize);
    p.write_at(0, &vec![2u8; size as usize], false).unwrap();
    let (pause, members) = PrimaryVolume::rollback_group(&[p.as_ref()], "s").unwrap();
    eprintln!("rollback: writes held {} µs here", pause.as_micros());
    assert_eq!(members, vec![[NodeId(2), NodeId(3)].into()]);
    for s in &stores {
        assert_eq!(read(s.as_ref(), 0, size as usize), snapshot);
    }
    p.write_at(4096, &[3u8; 4096], false).unwrap();
    for s in &stores {
        assert_eq!(read(s.as_ref(), 4096, 4096), vec![3u8; 4096]);
    }
    drop(p);
    net.primaries.lock().unwrap().clear();
    net.replicas.lock().unwrap().clear();
}

fn snap_of(copies: &HashMap<NodeId, Arc<MemCopy>>, n: u64, name: &str) -> Vec<u8> {
    copies[&NodeId(n)].snapshots.lock().unwrap()[name].clone()
}

/// A resync sends a region the primary holds nothing of as a deallocation: the
/// replica ends up with the primary's bytes and as thin as the primary.
#[test]
fn a_resync_leaves_the_replica_as_thin_as_the_primary() {
    use block_device::Provisioning;
    let dir = tempfile::tempdir().unwrap();
    let net = Arc::new(Net::default());
    let size = 4u64 << 20;
    let stores: Vec<Arc<MemDevice>> = (0..2).map(|_| Arc::new(MemDevice::new(size))).collect();
    // The primary holds one region of data; the replica, out of sync, all of them.
    stores[0]
        .write_at(64 << 10, &[3u8; 64 << 10], false)
        .unwrap();
    stores[1]
        .write_at(0, &vec![9u8; size as usize], false)
        .unwrap();
    start_replica(&net, NodeId(2), stores[1].clone(), dir.path());
    let p = start_primary(
        &net,
        NodeId(1),
        Epoch(1),
        stores[0].clone(),
        dir.path(),
        &[],
        &[NodeId(2)],
    );
    wait_until("sealed and serving", || p.serving());
    p.link_up(NodeId(2));
    wait_until("node 2 resynced into the in-sync set", || {
        p.in_sync().contains(&NodeId(2))
    });
    assert_eq!(
        read(stores[1].as_ref(), 0, size as usize),
        read(stores[0].as_ref(), 0, size as usize)
    );
    let mut mapped = 0;
    let mut at = 0;
    while at < size {
        let e = stores[1].provisioning(at, size - at).unwrap();
        if e.status == Provisioning::Mapped {
            mapped += e.len;
        }
        at += e.len;
    }
    assert_eq!(
        mapped,
        64 << 10,
        "only the region the primary holds is mapped on the replica"
    );
    drop(p);
    net.primaries.lock().unwrap().clear();
    net.replicas.lock().unwrap().clear();
}

/// The replicated volume keeps the contract of every `BlockDevice`, and each
/// in-sync replica ends up with the primary's bytes.
#[test]
fn a_replicated_volume_passes_the_conformance_suite() {
    let dir = std::env::temp_dir().join(format!("bulwark-conform-{}", std::process::id()));
    let net = Arc::new(Net::default());
    let stores: Vec<Arc<MemDevice>> = (0..3).map(|_| Arc::new(MemDevice::new(4 << 20))).collect();
    start_replica(&net, NodeId(2), stores[1].clone(), &dir);
    start_replica(&net, NodeId(3), stores[2].clone(), &dir);
    let p = start_primary(
        &net,
        NodeId(1),
        Epoch(1),
        stores[0].clone(),
        &dir,
        &[NodeId(2), NodeId(3)],
        &[NodeId(2), NodeId(3)],
    );
    wait_until("sealed and serving", || p.serving());
    block_device::conformance::check(p.as_ref(), block_device::conformance::Keeps::Data);
    let whole = |s: &MemDevice| read(s, 0, 4 << 20);
    for s in &stores[1..] {
        assert!(
            whole(s) == whole(&stores[0]),
            "a replica holds the primary's bytes"
        );
    }
    net.primaries.lock().unwrap().clear();
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy that neither grows nor takes snapshots.
struct NoCopy;

impl LocalCopy for NoCopy {
    fn grow(&self, _size: u64) -> io::Result<()> {
        Err(io::Error::other("this test's store does not grow"))
    }
    fn snapshot(&self, _name: &str) -> io::Result<()> {
        Err(io::Error::other("this test's store takes no snapshots"))
    }
    fn rollback(&self, _name: &str) -> io::Result<()> {
        Err(io::Error::other("this test's store takes no snapshots"))
    }
}

/// A store that takes its time over each write and counts them.
#[derive(Debug)]
struct SlowStore {
    inner: MemDevice,
    applied: std::sync::atomic::AtomicUsize,
}

impl BlockDevice for SlowStore {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        std::thread::sleep(Duration::from_millis(3));
        self.applied
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.write_at(offset, data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn supports_discard(&self) -> bool {
        false
    }
}

/// Records what the replica sends, with how many writes its store had applied then.
struct Recorder {
    store: Arc<SlowStore>,
    sent: Mutex<Vec<(Message, usize)>>,
}

impl Transport for Recorder {
    fn send(&self, _to: NodeId, msg: Message) {
        let applied = self.store.applied.load(std::sync::atomic::Ordering::SeqCst);
        self.sent.lock().unwrap().push((msg, applied));
    }
}

/// Writes queued behind a slow disk are acknowledged as they are applied, not all
/// at the end of the burst: with 16 writes of 1 MiB in flight, holding the
/// acknowledgement until the queue drained stalled the primary (issue 20).
#[test]
fn a_long_burst_of_writes_is_acknowledged_before_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SlowStore {
        inner: MemDevice::new(1 << 20),
        applied: std::sync::atomic::AtomicUsize::new(0),
    });
    let rec = Arc::new(Recorder {
        store: store.clone(),
        sent: Mutex::new(Vec::new()),
    });
    let r = ReplicaVolume::start(
        64 << 10,
        store.clone(),
        Arc::new(NoCopy),
        ReplicaState::new(dir.path(), "v"),
        rec.clone(),
        crate::ACTIVITY_LOG_SLACK,
    )
    .unwrap();
    let (primary, epoch) = (NodeId(1), Epoch(1));
    r.deliver(
        primary,
        Message::Seal {
            epoch,
            next_seq: crate::Seq(1),
        },
    );
    wait_until("sealed", || {
        rec.sent
            .lock()
            .unwrap()
            .iter()
            .any(|(m, _)| matches!(m, Message::SealAck { .. }))
    });
    const WRITES: u64 = 10;
    for i in 0..WRITES {
        r.deliver(
            primary,
            Message::Write {
                epoch,
                seq: crate::Seq(1 + i),
                offset: i * 4096,
                payload: crate::Payload::Data(Bytes::from(vec![i as u8; 4096])),
                committed: crate::Seq(0),
            },
        );
    }
    wait_until("every write acknowledged", || {
        rec.sent
            .lock()
            .unwrap()
            .iter()
            .any(|(m, _)| matches!(m, Message::Ack { seq, .. } if *seq == crate::Seq(WRITES)))
    });
    let first_ack = rec
        .sent
        .lock()
        .unwrap()
        .iter()
        .find(|(m, _)| matches!(m, Message::Ack { .. }))
        .map(|(_, applied)| *applied);
    assert!(
        first_ack.is_some_and(|a| a < WRITES as usize),
        "the first acknowledgement waited for the whole burst: {first_ack:?} writes applied then"
    );
}

/// A store whose flush takes `flush` (a background flush behind a burst of writes),
/// saying when one is under way.
#[derive(Debug)]
struct SlowFlush {
    inner: MemDevice,
    flush: Duration,
    flushing: std::sync::atomic::AtomicBool,
}

impl BlockDevice for SlowFlush {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.inner.write_at(offset, data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.flushing.store(true, SeqCst);
        std::thread::sleep(self.flush);
        self.flushing.store(false, SeqCst);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn supports_discard(&self) -> bool {
        false
    }
}

/// A lease renewal takes effect when it returns, also while the driver thread is
/// held by a slow disk action: queued behind a background flush of 400 ms, renewals
/// arrived after the lease had lapsed, and writes failed with a transition under a
/// burst of 1 MiB writes (issue 20).
#[test]
fn a_lease_renewal_does_not_wait_for_a_background_flush() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let state = ReplicaState::new(dir.path(), "v");
    let store = Arc::new(SlowFlush {
        inner: MemDevice::new(4 << 20),
        flush: Duration::from_millis(1500),
        flushing: false.into(),
    });
    let net = Arc::new(Net::default());
    let me = NodeId(1);
    let p = PrimaryVolume::start(
        primary_config(me, Epoch(1), store.size_bytes(), &state, &[], &[]),
        store.clone(),
        Arc::new(NoCopy),
        state,
        Arc::new(Port {
            me,
            net: net.clone(),
        }),
        Arc::new(Cp {
            isr: Mutex::default(),
            net,
            primary: me,
        }),
    )
    .unwrap();
    let lease = Duration::from_millis(300);
    p.lease(Instant::now() + lease);
    wait_until("serving", || p.serving());
    // The write leaves its region waiting for a flush: the driver thread starts a
    // background flush within a second, and the flush holds it for 1.5 s.
    p.write_at(0, &[1u8; 4096], false).unwrap();
    wait_until("a background flush runs", || store.flushing.load(SeqCst));
    // Renewed as the lease task does, every 100 ms, for longer than a lease.
    for _ in 0..8 {
        p.lease(Instant::now() + lease);
        assert!(p.serving(), "a renewed lease lapsed behind the flush");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        store.flushing.load(SeqCst),
        "the flush held the driver throughout"
    );
    assert!(p.serving());
}

#[test]
fn writes_are_on_every_replica_when_acknowledged_and_survive_a_failover() {
    let dir = std::env::temp_dir().join(format!("bulwark-repl-{}", std::process::id()));
    let net = Arc::new(Net::default());
    let stores: Vec<Arc<MemDevice>> = (0..3).map(|_| Arc::new(MemDevice::new(4 << 20))).collect();
    start_replica(&net, NodeId(2), stores[1].clone(), &dir);
    start_replica(&net, NodeId(3), stores[2].clone(), &dir);
    let p = start_primary(
        &net,
        NodeId(1),
        Epoch(1),
        stores[0].clone(),
        &dir,
        &[NodeId(2), NodeId(3)],
        &[NodeId(2), NodeId(3)],
    );
    wait_until("sealed and serving", || p.serving());

    for i in 0..64u64 {
        let data = vec![i as u8 + 1; 4096];
        p.write_at(i * 4096, &data, false).unwrap();
        // Acknowledged: already on both replicas.
        for s in &stores[1..] {
            assert_eq!(read(s.as_ref(), i * 4096, 4096), data);
        }
    }
    assert_eq!(read(p.as_ref(), 0, 4096), vec![1u8; 4096]);
    // SYNCHRONIZE CACHE: durable on every in-sync replica before it returns.
    use std::sync::atomic::Ordering;
    let before: Vec<u64> = stores
        .iter()
        .map(|s| s.flushes.load(Ordering::Relaxed))
        .collect();
    p.flush().unwrap();
    for (s, b) in stores.iter().zip(before) {
        assert!(s.flushes.load(Ordering::Relaxed) > b, "every copy flushed");
    }

    // The primary dies; node 2 is promoted at epoch 2 with node 3 in sync.
    net.primaries.lock().unwrap().clear();
    drop(p);
    net.replicas.lock().unwrap().remove(&NodeId(2));
    let p2 = start_primary(
        &net,
        NodeId(2),
        Epoch(2),
        stores[1].clone(),
        &dir,
        &[NodeId(3)],
        &[NodeId(1), NodeId(3)],
    );
    wait_until("the new primary serves", || p2.serving());
    for i in 0..64u64 {
        assert_eq!(read(p2.as_ref(), i * 4096, 4096), vec![i as u8 + 1; 4096]);
    }
    p2.write_at(0, &[9u8; 4096], true).unwrap();
    assert_eq!(read(stores[2].as_ref(), 0, 4096), vec![9u8; 4096]);

    // The old primary returns as a replica: it is resynced and joins the in-sync set.
    start_replica(&net, NodeId(1), stores[0].clone(), &dir);
    p2.link_up(NodeId(1));
    wait_until("node 1 back in sync", || p2.in_sync().contains(&NodeId(1)));
    for s in &stores {
        assert_eq!(
            read(s.as_ref(), 0, 4 << 20),
            read(stores[1].as_ref(), 0, 4 << 20)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
