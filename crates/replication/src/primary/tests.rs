//! The primary engine's unit tests.

use super::*;

const MIB: u64 = 1 << 20;

/// Primary 1 at epoch 3 of a volume of `size_bytes` with replica 2, in sync or not.
fn test_config(size_bytes: u64, in_sync: bool, resync_rate: u64) -> PrimaryConfig {
    PrimaryConfig {
        me: NodeId(1),
        epoch: Epoch(3),
        region_size: MIB,
        size_bytes,
        replicas: [NodeId(2)].into(),
        in_sync: if in_sync {
            [NodeId(2)].into()
        } else {
            BTreeSet::new()
        },
        rebuilding: BTreeSet::new(),
        own_activity_log: RegionSet::new(),
        dirty_hint: None,
        replica_timeout_ms: 1000,
        resync_window: 16,
        resync_rate,
        rebuild_rate: 0,
        activity_log_slack: crate::replica::ACTIVITY_LOG_SLACK,
        bug_ack_before_replicas: false,
        bug_forget_before_flush: false,
    }
}

/// A primary of a 64-region volume whose replica 2 is out of sync and connected.
fn resyncing(rate: u64) -> (Primary, Vec<Action>) {
    let cfg = test_config(64 * MIB, false, rate);
    let mut p = Primary::new(cfg, 0);
    let mut out = p.tick(0);
    out.extend(p.link_up(0, NodeId(2)));
    out.extend(p.on_message(
        0,
        NodeId(2),
        Message::SealAck {
            epoch: Epoch(3),
            divergent: RegionSet::new(),
        },
    ));
    (p, out)
}

fn reads(actions: &[Action]) -> Vec<Seq> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ReadRegion { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

/// Runs the resync for `ms` of virtual time, the replica acknowledging every region
/// at once; returns the regions read.
fn run(p: &mut Primary, first: Vec<Action>, ms: u64) -> u64 {
    let mut pending = reads(&first);
    let mut total = pending.len() as u64;
    let mut now = 0;
    while now < ms {
        now += 20;
        let mut out = Vec::new();
        if let Some(last) = pending.iter().max().copied() {
            for seq in &pending {
                out.extend(p.region_read(
                    NodeId(2),
                    *seq,
                    Payload::Data(Bytes::from(vec![0u8; 16])),
                ));
            }
            out.extend(p.on_message(
                now,
                NodeId(2),
                Message::Ack {
                    epoch: Epoch(3),
                    seq: last,
                },
            ));
        }
        out.extend(p.tick(now));
        pending = reads(&out);
        total += pending.len() as u64;
    }
    total
}

/// A replica outside the in-sync set whose node restarted its volume (after a disk
/// failure) while the link stayed up ignores the stream it was not sealed into; the
/// primary seals it again once the resync has made no progress for a timeout.
#[test]
fn a_replica_that_stalls_mid_resync_is_sealed_again() {
    let (mut p, first) = resyncing(0);
    let sent = reads(&first);
    assert!(!sent.is_empty(), "the resync started: {first:?}");
    let mut out = Vec::new();
    for seq in &sent {
        out.extend(p.region_read(NodeId(2), *seq, Payload::Data(Bytes::from(vec![0u8; 16]))));
    }
    // No answer: the replica's volume restarted and drops what it was not sealed for.
    let seals = |out: &[Action]| {
        out.iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Send {
                        to: NodeId(2),
                        msg: Message::Seal { .. }
                    }
                )
            })
            .count()
    };
    assert_eq!(seals(&p.tick(999)), 0, "not before the timeout");
    let out = p.tick(1000);
    assert_eq!(seals(&out), 1, "sealed again after the timeout: {out:?}");
    // Its answer resumes the resync.
    let out = p.on_message(
        1001,
        NodeId(2),
        Message::SealAck {
            epoch: Epoch(3),
            divergent: RegionSet::new(),
        },
    );
    let mut out = out;
    out.extend(p.tick(1002));
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::ReadRegion { .. }
                | Action::Send {
                    to: NodeId(2),
                    msg: Message::Write { .. }
                }
        )),
        "the resync goes on: {out:?}"
    );
}

#[test]
fn resync_keeps_to_its_rate() {
    // 4 MiB/s for 2 s: about 8 regions (one refill may round up).
    let (mut p, first) = resyncing(4 * MIB);
    let sent = run(&mut p, first, 2000);
    assert!((7..=9).contains(&sent), "{sent} regions in 2 s at 4 MiB/s");
    let progress = p.resync_progress();
    assert_eq!(progress.len(), 1);
    assert_eq!(progress[0].done_regions + progress[0].pending_regions, 64);

    // Unlimited: the whole volume in the same time.
    let (mut p, first) = resyncing(0);
    assert_eq!(reads(&first).len(), 16, "one window at once");
    assert_eq!(run(&mut p, first, 2000), 64);
    assert!(p.resync_progress().is_empty(), "done");

    // The rate changes while it runs.
    let (mut p, first) = resyncing(4 * MIB);
    p.set_resync_rate(0);
    assert!(run(&mut p, first, 200) > 20);
}

/// A sealed, leased primary with replica 2 in sync and streaming.
fn in_sync_pair() -> Primary {
    let cfg = test_config(4 * MIB, true, 0);
    let mut p = Primary::new(cfg, 0);
    let _ = p.link_up(0, NodeId(2));
    let _ = p.on_message(
        0,
        NodeId(2),
        Message::SealAck {
            epoch: Epoch(3),
            divergent: RegionSet::new(),
        },
    );
    let _ = p.tick(1);
    let _ = p.set_lease(1, 100_000);
    assert!(p.serving(1).is_ok());
    p
}

/// A deallocation takes a place in the stream like a write: sent between the
/// writes around it, its regions in the activity log, carried out locally, and
/// complete only once the replica acknowledges it.
#[test]
fn a_deallocation_is_streamed_and_acknowledged_like_a_write() {
    let mut p = in_sync_pair();
    let mut out = p
        .submit_write(10, WriteTag(1), 0, Bytes::from(vec![1u8; 4096]))
        .unwrap();
    out.extend(p.submit_deallocate(10, WriteTag(2), 0, 2 * MIB).unwrap());
    out.extend(
        p.submit_write(10, WriteTag(3), 3 * MIB, Bytes::from(vec![3u8; 4096]))
            .unwrap(),
    );
    let sent: Vec<(Seq, u64, Payload)> = out
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                to: NodeId(2),
                msg:
                    Message::Write {
                        seq,
                        offset,
                        payload,
                        ..
                    },
            } => Some((*seq, *offset, payload.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), 3, "{out:?}");
    assert!(
        sent[0].0 < sent[1].0 && sent[1].0 < sent[2].0,
        "in order: {sent:?}"
    );
    assert_eq!((sent[1].1, &sent[1].2), (0, &Payload::Deallocate(2 * MIB)));
    let logged = out.iter().rev().find_map(|a| match a {
        Action::PersistActivityLog(l) => Some(l.clone()),
        _ => None,
    });
    let logged = logged.expect("the activity log is persisted");
    assert!(logged.contains(0) && logged.contains(1), "{logged:?}");
    let local: Vec<(u64, Payload)> = out
        .iter()
        .filter_map(|a| match a {
            Action::LocalWrite { id, payload, .. } => Some((*id, payload.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(local[1].1, Payload::Deallocate(2 * MIB));
    let mut done = Vec::new();
    for (id, _) in &local {
        done.extend(p.local_done(11, *id));
    }
    assert!(
        !done.iter().any(|a| matches!(a, Action::Complete(_))),
        "nothing completes before the replica has it: {done:?}"
    );
    let out = p.on_message(
        12,
        NodeId(2),
        Message::Ack {
            epoch: Epoch(3),
            seq: sent[1].0,
        },
    );
    assert!(out.contains(&Action::Complete(WriteTag(1))));
    assert!(out.contains(&Action::Complete(WriteTag(2))));
    assert!(!out.contains(&Action::Complete(WriteTag(3))));
}

/// A snapshot is one position of the stream: its local copy waits for the local
/// writes placed before it, writes that arrive meanwhile are held (placed after
/// it, in order, once the copy is made), and it completes when the replica has
/// acknowledged it.
#[test]
fn a_snapshot_is_taken_between_the_writes_before_and_after_it() {
    let local = |out: &[Action]| -> Vec<(u64, Payload)> {
        out.iter()
            .filter_map(|a| match a {
                Action::LocalWrite { id, payload, .. } => Some((*id, payload.clone())),
                _ => None,
            })
            .collect()
    };
    let sent = |out: &[Action]| -> Vec<(Seq, Payload)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send {
                    msg: Message::Write { seq, payload, .. },
                    ..
                } => Some((*seq, payload.clone())),
                _ => None,
            })
            .collect()
    };
    let mut p = in_sync_pair();
    let before = p
        .submit_write(10, WriteTag(1), 0, Bytes::from(vec![1u8; 4096]))
        .unwrap();
    let (w1, _) = local(&before)[0].clone();
    let out = p.submit_snapshot(11, WriteTag(2), "s1".into()).unwrap();
    assert_eq!(
        sent(&out).last().map(|(_, pl)| pl.clone()),
        Some(Payload::Snapshot("s1".into())),
        "the position goes to the replica at once"
    );
    assert!(
        local(&out).is_empty(),
        "the local copy waits for write 1: {out:?}"
    );
    assert!(matches!(
        p.submit_snapshot(11, WriteTag(9), "s2".into()),
        Err(NotServing::Busy)
    ));
    // A write meanwhile is held: neither sent nor written.
    let out = p
        .submit_write(12, WriteTag(3), 4096, Bytes::from(vec![3u8; 4096]))
        .unwrap();
    assert!(out.is_empty(), "{out:?}");
    // Write 1 done locally: now the copy is made.
    let out = p.local_done(13, w1);
    let copies = local(&out);
    assert_eq!(copies.len(), 1, "{out:?}");
    assert_eq!(copies[0].1, Payload::Snapshot("s1".into()));
    // The copy made: the held write goes on, after the snapshot in the stream.
    let out = p.local_done(14, copies[0].0);
    assert_eq!(local(&out).len(), 1, "{out:?}");
    let after = sent(&out);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1, Payload::Data(Bytes::from(vec![3u8; 4096])));
    // The replica acknowledges through the snapshot: writes 1 and the snapshot
    // complete, not the write after it.
    let out = p.on_message(
        15,
        NodeId(2),
        Message::Ack {
            epoch: Epoch(3),
            seq: after[0].0 - 1,
        },
    );
    assert!(out.contains(&Action::Complete(WriteTag(1))));
    assert!(out.contains(&Action::Complete(WriteTag(2))));
    assert!(!out.contains(&Action::Complete(WriteTag(3))));

    // With nothing in flight the copy is made at once.
    let mut p = in_sync_pair();
    let out = p.submit_snapshot(1, WriteTag(5), "s3".into()).unwrap();
    assert_eq!(local(&out).len(), 1, "{out:?}");
}

/// Frozen (a snapshot of several volumes), writes wait until it is thawed and its
/// own snapshot copy is made, whichever comes last.
#[test]
fn a_frozen_primary_holds_writes_until_thawed_and_its_copy_is_made() {
    let data_written = |out: &[Action]| {
        out.iter().any(|a| {
            matches!(
                a,
                Action::LocalWrite {
                    payload: Payload::Data(_),
                    ..
                }
            )
        })
    };
    let mut p = in_sync_pair();
    p.freeze();
    let out = p
        .submit_write(1, WriteTag(1), 0, Bytes::from(vec![1u8; 512]))
        .unwrap();
    assert!(out.is_empty(), "held while frozen: {out:?}");
    let out = p.submit_snapshot(2, WriteTag(2), "s".into()).unwrap();
    let copy = out
        .iter()
        .find_map(|a| match a {
            Action::LocalWrite {
                id,
                payload: Payload::Snapshot(_),
                ..
            } => Some(*id),
            _ => None,
        })
        .expect("nothing in flight: the copy is made at once");
    assert!(!data_written(&p.thaw(3)), "the copy is not made yet");
    assert!(
        data_written(&p.local_done(4, copy)),
        "both done: the write goes on"
    );

    // The other order: the copy first, then the thaw.
    let mut p = in_sync_pair();
    p.freeze();
    let _ = p.submit_write(1, WriteTag(1), 0, Bytes::from(vec![1u8; 512]));
    let out = p.submit_snapshot(2, WriteTag(2), "s".into()).unwrap();
    let copy = out
        .iter()
        .find_map(|a| match a {
            Action::LocalWrite { id, .. } => Some(*id),
            _ => None,
        })
        .unwrap();
    assert!(!data_written(&p.local_done(3, copy)), "still frozen");
    assert!(data_written(&p.thaw(4)));
}

/// A replica whose node stops says so: its removal is requested at once, not after
/// the replica timeout, and the write waiting for it completes on the commit.
#[test]
fn a_leaving_replica_is_dropped_without_waiting_for_the_timeout() {
    let mut p = in_sync_pair();
    let out = p
        .submit_write(10, WriteTag(7), 0, Bytes::from(vec![1u8; 512]))
        .unwrap();
    let id = out
        .iter()
        .find_map(|a| match a {
            Action::LocalWrite { id, .. } => Some(*id),
            _ => None,
        })
        .unwrap();
    let _ = p.local_done(11, id);
    let out = p.on_message(12, NodeId(2), Message::Leaving { epoch: Epoch(3) });
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::RequestIsrRemove {
                node: NodeId(2),
                ..
            }
        )),
        "removal requested at once: {out:?}"
    );
    let out = p.isr_committed(20, Epoch(3), [NodeId(1)].into());
    assert!(
        out.contains(&Action::Complete(WriteTag(7))),
        "the write completes once the removal commits: {out:?}"
    );
    // A Leaving from another epoch changes nothing.
    let mut p = in_sync_pair();
    let out = p.on_message(12, NodeId(2), Message::Leaving { epoch: Epoch(2) });
    assert!(out.is_empty());
}

#[test]
fn verify_holds_writes_to_a_region_under_comparison_and_repairs_a_difference() {
    let mut p = in_sync_pair();
    // A write in flight to region 0: the verify waits for it before comparing.
    let w = p
        .submit_write(2, WriteTag(7), 0, Bytes::from(vec![1u8; 512]))
        .unwrap();
    let mut out = p.start_verify(3, 42, true);
    let asked = |out: &[Action]| -> Vec<u64> {
        out.iter()
            .filter_map(|a| match a {
                Action::ChecksumRegion { region } => Some(*region),
                _ => None,
            })
            .collect()
    };
    assert_eq!(asked(&out), vec![1, 2, 3], "region 0 waits for its write");
    // A new write to region 1 (under comparison) is held, not placed.
    let held = p
        .submit_write(4, WriteTag(8), MIB, Bytes::from(vec![2u8; 512]))
        .unwrap();
    assert!(held.is_empty(), "held while region 1 is compared");
    assert_eq!(p.in_flight(), 2);
    // The first write completes: region 0 is compared now.
    let id = w
        .iter()
        .find_map(|a| match a {
            Action::LocalWrite { id, .. } => Some(*id),
            _ => None,
        })
        .unwrap();
    out = p.local_done(5, id);
    out.extend(p.on_message(
        5,
        NodeId(2),
        Message::Ack {
            epoch: Epoch(3),
            seq: Seq(1),
        },
    ));
    assert!(out.contains(&Action::Complete(WriteTag(7))));
    assert_eq!(asked(&out), vec![0]);
    // Every region's checksums arrive; region 2 differs on the replica.
    let mut out = Vec::new();
    for r in 0..4u64 {
        out.extend(p.verify_local(6, r, 100 + r as u32));
        let crc = if r == 2 { 999 } else { 100 + r as u32 };
        out.extend(p.on_message(
            6,
            NodeId(2),
            Message::VerifyResult {
                epoch: Epoch(3),
                region: r,
                crc,
            },
        ));
    }
    let report = p.verify_report().unwrap();
    assert!(report.finished);
    assert_eq!(report.compared, 4);
    assert_eq!(
        report.differing[&NodeId(2)].iter().collect::<Vec<_>>(),
        vec![2]
    );
    assert!(out.contains(&Action::VerifyDone(report)));
    // The held write is placed once region 1 is compared, and region 2 is resynced.
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::LocalWrite { offset, .. } if *offset == MIB)));
    assert_eq!(reads(&out).len(), 1, "the differing region is repaired");
}

#[test]
fn application_writes_go_before_resync() {
    let (mut p, _first) = resyncing(0);
    let mut out = p.set_lease(0, 10_000);
    out.extend(p.tick(1));
    assert!(p.serving(1).is_ok());
    // The replica falls behind on application writes: no new resync region joins
    // its stream until it catches up.
    let mut acted = Vec::new();
    for i in 0..(APP_BACKLOG_BEFORE_RESYNC_WAITS as u64 + 1) {
        acted.extend(
            p.submit_write(2, WriteTag(i), i * 4096, Bytes::from(vec![1u8; 4096]))
                .unwrap(),
        );
    }
    let resync_seqs: Vec<Seq> = (1..=16).map(Seq).collect();
    let mut out = Vec::new();
    for seq in &resync_seqs {
        out.extend(p.region_read(NodeId(2), *seq, Payload::Data(Bytes::from(vec![0u8; 16]))));
    }
    out.extend(p.on_message(
        3,
        NodeId(2),
        Message::Ack {
            epoch: Epoch(3),
            seq: Seq(16),
        },
    ));
    out.extend(p.tick(500));
    assert!(
        reads(&out).is_empty(),
        "resync waits behind the application writes"
    );
    let last = 16 + APP_BACKLOG_BEFORE_RESYNC_WAITS as u64 + 1;
    let out = p.on_message(
        600,
        NodeId(2),
        Message::Ack {
            epoch: Epoch(3),
            seq: Seq(last),
        },
    );
    assert_eq!(
        reads(&out).len(),
        16,
        "and resumes once they are acknowledged"
    );
}

/// Plays replica `peer` perfectly for `steps` rounds: every region read at once,
/// every write sent to it acknowledged. Returns what the primary did.
fn serve_peer(p: &mut Primary, peer: NodeId, first: Vec<Action>, steps: u64) -> Vec<Action> {
    let mut all = Vec::new();
    let mut out = first;
    for step in 0..steps {
        // 50 ms a round: checkpoints are due every second.
        let now = 10 + step * 50;
        let mut next = Vec::new();
        let mut last = None;
        for a in &out {
            match a {
                Action::ReadRegion { peer: to, seq, .. } if *to == peer => {
                    next.extend(p.region_read(
                        peer,
                        *seq,
                        Payload::Data(Bytes::from(vec![7u8; 16])),
                    ));
                }
                Action::Send {
                    to,
                    msg: Message::Write { seq, .. },
                } if *to == peer => last = last.max(Some(*seq)),
                Action::Send {
                    to,
                    msg: Message::Seal { epoch, .. },
                } if *to == peer => next.extend(p.on_message(
                    now,
                    peer,
                    Message::SealAck {
                        epoch: *epoch,
                        divergent: RegionSet::new(),
                    },
                )),
                _ => {}
            }
        }
        all.append(&mut out);
        // Writes sent by the reads above are acknowledged in the next round.
        if let Some(seq) = last {
            next.extend(p.on_message(
                now,
                peer,
                Message::Ack {
                    epoch: p.epoch(),
                    seq,
                },
            ));
        }
        next.extend(p.tick(now));
        out = next;
    }
    all.extend(out);
    all
}

fn isr_adds(actions: &[Action]) -> Vec<NodeId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RequestIsrAdd { node, .. } => Some(*node),
            _ => None,
        })
        .collect()
}

#[test]
fn a_replica_added_while_serving_gets_the_regions_holding_data_then_joins() {
    let mut p = in_sync_pair();
    // A write in flight when the replica is added: copied whatever the scan says.
    let w = p
        .submit_write(2, WriteTag(1), 3 * MIB, Bytes::from(vec![1u8; 512]))
        .unwrap();
    let out = p.set_replicas(
        3,
        [NodeId(2), NodeId(3)].into(),
        &[NodeId(3)].into(),
        4 * MIB,
    );
    assert!(out.contains(&Action::ScanAllocation { peer: NodeId(3) }));
    let full = out.iter().find_map(|a| match a {
        Action::PersistDirtyMap(m) => m.get(&NodeId(3)).map(RegionSet::len),
        _ => None,
    });
    assert_eq!(full, Some(4), "until the scan answers, it lacks everything");
    // Nothing is copied before the scan, even once connected.
    let mut out = p.link_up(4, NodeId(3));
    out.extend(p.on_message(
        4,
        NodeId(3),
        Message::SealAck {
            epoch: Epoch(3),
            divergent: RegionSet::new(),
        },
    ));
    assert!(reads(&out).is_empty());
    // Region 0 holds data; region 3 is being written; 1 and 2 are holes.
    let mut allocated = RegionSet::new();
    allocated.insert(0);
    let out = p.allocation_scanned(5, NodeId(3), Some(&allocated));
    let copied: Vec<u64> = out
        .iter()
        .filter_map(|a| match a {
            Action::ReadRegion { region, .. } => Some(*region),
            _ => None,
        })
        .collect();
    assert_eq!(copied, vec![0], "region 3 waits for its local write");
    let mut first = out;
    let id = w
        .iter()
        .find_map(|a| match a {
            Action::LocalWrite { id, .. } => Some(*id),
            _ => None,
        })
        .unwrap();
    let out = p.local_done(6, id);
    let copied: BTreeSet<u64> = out
        .iter()
        .filter_map(|a| match a {
            Action::ReadRegion { region, .. } => Some(*region),
            _ => None,
        })
        .collect();
    assert_eq!(copied, [3].into(), "only regions that hold data");
    first.extend(out);
    first.extend(p.on_message(
        6,
        NodeId(2),
        Message::Ack {
            epoch: Epoch(3),
            seq: Seq(1),
        },
    ));
    let all = serve_peer(&mut p, NodeId(3), first, 20);
    assert_eq!(
        isr_adds(&all),
        vec![NodeId(3)],
        "caught up: proposed for the set"
    );
    // The flush barrier came before the request.
    assert!(all.iter().any(|a| matches!(
        a,
        Action::Send {
            to: NodeId(3),
            msg: Message::Write {
                payload: Payload::Flush,
                ..
            }
        }
    )));
}

#[test]
fn a_removed_replica_is_no_longer_waited_for() {
    let mut p = in_sync_pair();
    let w = p
        .submit_write(2, WriteTag(1), 0, Bytes::from(vec![1u8; 512]))
        .unwrap();
    let id = w
        .iter()
        .find_map(|a| match a {
            Action::LocalWrite { id, .. } => Some(*id),
            _ => None,
        })
        .unwrap();
    let out = p.local_done(3, id);
    assert!(!out.contains(&Action::Complete(WriteTag(1))), "waits for 2");
    let out = p.set_replicas(4, BTreeSet::new(), &BTreeSet::new(), 4 * MIB);
    assert!(out.contains(&Action::Complete(WriteTag(1))));
    assert!(p.in_sync().is_empty());
    assert!(p.dirty_map().get(&NodeId(2)).is_none());
    // Its late acknowledgement changes nothing.
    let out = p.on_message(
        5,
        NodeId(2),
        Message::Ack {
            epoch: Epoch(3),
            seq: Seq(1),
        },
    );
    assert!(out.is_empty());
}

#[test]
fn a_rebuild_keeps_its_progress_in_the_persisted_map() {
    // 512 regions, replica 2 rebuilding from scratch, every region holding data.
    let (mut p, first) = resyncing(0);
    let mut cfg = p.cfg.clone();
    cfg.size_bytes = 512 * MIB;
    cfg.rebuilding = [NodeId(2)].into();
    p = Primary::new(cfg, 0);
    let mut out = p.tick(0);
    out.extend(p.link_up(0, NodeId(2)));
    drop(first);
    // About 200 regions copied, part of the way.
    let all = serve_peer(&mut p, NodeId(2), out, 30);
    let maps: Vec<usize> = all
        .iter()
        .filter_map(|a| match a {
            Action::PersistDirtyMap(m) => m.get(&NodeId(2)).map(RegionSet::len),
            _ => None,
        })
        .collect();
    assert!(
        maps.iter().any(|n| *n < 512 - 100),
        "the map shrank as copies became durable: {maps:?}"
    );
    // What the map still lists covers what is left to copy.
    let left = p.resync_progress()[0].pending_regions as usize;
    let listed = p.dirty_map()[&NodeId(2)].len();
    assert!(listed >= left, "{listed} listed, {left} left");
    assert!(listed <= left + 2 * CHECKPOINT_REGIONS as usize);
}

#[test]
fn a_verify_does_not_wait_for_a_replica_outside_the_set() {
    // Replica 2 is out of sync and down for good: it lacks every region.
    let cfg = test_config(4 * MIB, false, 0);
    let mut p = Primary::new(cfg, 0);
    let _ = p.tick(1);
    let _ = p.set_lease(1, 100_000);
    assert!(p.serving(1).is_ok());
    let out = p.start_verify(2, 1, false);
    let mut out: Vec<Action> = out;
    for r in 0..4u64 {
        out.extend(p.verify_local(3, r, 5));
    }
    let report = p.verify_report().unwrap();
    assert!(report.finished, "{report:?}");
    assert_eq!(report.compared, 4);
}

#[test]
fn a_replica_removed_and_added_again_starts_over_past_its_old_stream() {
    let mut p = in_sync_pair();
    // The volume grew to 8 MiB under this primary; replica 3 is added, then
    // removed while its first copies are being read, then added again.
    let _ = p.set_replicas(
        3,
        [NodeId(2), NodeId(3)].into(),
        &[NodeId(3)].into(),
        8 * MIB,
    );
    assert_eq!(
        p.dirty_map()[&NodeId(3)].len(),
        8,
        "the grown volume, whole"
    );
    let _ = p.allocation_scanned(4, NodeId(3), None);
    let mut out = p.link_up(5, NodeId(3));
    out.extend(p.on_message(
        5,
        NodeId(3),
        Message::SealAck {
            epoch: Epoch(3),
            divergent: RegionSet::new(),
        },
    ));
    let old_reads: Vec<(Seq, u64)> = out
        .iter()
        .filter_map(|a| match a {
            Action::ReadRegion { seq, region, .. } => Some((*seq, *region)),
            _ => None,
        })
        .collect();
    assert!(!old_reads.is_empty());
    let _ = p.set_replicas(6, [NodeId(2)].into(), &BTreeSet::new(), 8 * MIB);
    let _ = p.set_replicas(
        7,
        [NodeId(2), NodeId(3)].into(),
        &[NodeId(3)].into(),
        8 * MIB,
    );
    let _ = p.allocation_scanned(8, NodeId(3), None);
    let mut out = p.link_up(9, NodeId(3));
    let seal_from = out.iter().find_map(|a| match a {
        Action::Send {
            msg: Message::Seal { next_seq, .. },
            ..
        } => Some(*next_seq),
        _ => None,
    });
    let past = old_reads.iter().map(|(s, _)| *s).max().unwrap();
    assert!(seal_from > Some(past), "{seal_from:?} after {past:?}");
    out.extend(p.on_message(
        9,
        NodeId(3),
        Message::SealAck {
            epoch: Epoch(3),
            divergent: RegionSet::new(),
        },
    ));
    // A read of the old stream finishing now sends nothing.
    let (seq, _) = old_reads[0];
    assert!(p
        .region_read(NodeId(3), seq, Payload::Data(Bytes::from(vec![1u8; 16])))
        .is_empty());
    // Marked rebuilding again (removed and added in between, unseen): from scratch.
    let mut q = in_sync_pair();
    let _ = q.set_replicas(3, [NodeId(2)].into(), &[NodeId(2)].into(), 4 * MIB);
    assert_eq!(q.in_sync().len(), 1, "an in-sync replica is not reset");
    let _ = q.isr_committed(4, Epoch(3), BTreeSet::new());
    let out = q.set_replicas(5, [NodeId(2)].into(), &[NodeId(2)].into(), 4 * MIB);
    assert!(out.contains(&Action::ScanAllocation { peer: NodeId(2) }));
    assert_eq!(q.dirty_map()[&NodeId(2)].len(), 4);
}
