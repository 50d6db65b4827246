//! `/metrics`: this node's view in the Prometheus text format.
//!
//! Nothing here sits on the data path. The I/O counters are the logical units' atomics
//! ([`scsi::stats::IoStats`]); everything else is read from the status a scrape
//! gathers anyway. A scrape builds a [`Snapshot`], and a `prometheus-client`
//! collector encodes it, so names, types and escaping follow the exposition format.
//!
//! Every sample carries `node` (this node's name). Volume, replication and failover
//! series come from a volume's primary only, so a sum over nodes counts each once.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use cluster::state::ClusterState;
use cluster::status::NodeStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use serving::Serving;

type Labels = Vec<(&'static str, String)>;

/// One family: its samples with their labels.
#[derive(Debug)]
enum Family {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, f64)>),
    Histogram(Vec<HistogramSample>),
}

/// (labels, non-cumulative buckets with `f64::MAX` as +Inf, count, sum)
type HistogramSample = (Labels, Vec<(f64, u64)>, u64, f64);

/// Everything one scrape reports.
#[derive(Debug, Default)]
pub struct Snapshot {
    families: Vec<(&'static str, &'static str, Family)>,
}

impl Snapshot {
    fn counter(&mut self, name: &'static str, help: &'static str, s: Vec<(Labels, u64)>) {
        self.families.push((name, help, Family::Counter(s)));
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, s: Vec<(Labels, f64)>) {
        self.families.push((name, help, Family::Gauge(s)));
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, family) in &self.families {
            match family {
                Family::Counter(samples) => {
                    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                    for (labels, v) in samples {
                        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
                    }
                }
                Family::Gauge(samples) => {
                    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                    for (labels, v) in samples {
                        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
                    }
                }
                Family::Histogram(samples) => {
                    let mut m =
                        encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
                    for (labels, buckets, count, sum) in samples {
                        m.encode_family(labels)?
                            .encode_histogram::<Labels>(*sum, *count, buckets, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a scrape reads.
pub struct Sources<'a> {
    /// This node's status (Raft, peers, sessions, volumes here).
    pub status: &'a NodeStatus,
    /// The committed cluster state.
    pub state: &'a ClusterState,
    /// The iSCSI server.
    pub server: &'a iscsi_target::Server,
    /// The storage side (`None` on a witness).
    pub serving: Option<&'a Arc<Serving>>,
    /// Alert deliveries by (alert, result).
    pub alert_deliveries: BTreeMap<(String, &'static str), u64>,
}

/// Builds the snapshot of one scrape.
pub fn snapshot(src: &Sources<'_>) -> Snapshot {
    let mut out = Snapshot::default();
    let st = src.state;
    let me = src.status.node;
    let name_of = |id: u64| st.node_name(id);
    cluster_metrics(&mut out, src, &name_of);
    target_metrics(&mut out, src);
    volume_metrics(&mut out, src, me, &name_of);
    out.counter(
        "alert_deliveries",
        "Alert deliveries from this node, by alert and result (delivered, failed: given up after the retries)",
        src.alert_deliveries
            .iter()
            .map(|((a, r), v)| (vec![("alert", a.clone()), ("result", r.to_string())], *v))
            .collect(),
    );
    out
}

fn cluster_metrics(out: &mut Snapshot, src: &Sources<'_>, name_of: &dyn Fn(u64) -> String) {
    let raft = &src.status.raft;
    out.gauge(
        "raft_term",
        "Current Raft term",
        vec![(vec![], raft.term as f64)],
    );
    out.gauge(
        "raft_has_leader",
        "1 while this node knows a leader (it reaches a majority), 0 otherwise",
        vec![(vec![], flag(raft.leader.is_some()))],
    );
    out.gauge(
        "raft_is_leader",
        "1 on the Raft leader",
        vec![(vec![], flag(raft.leader == Some(src.status.node)))],
    );
    out.gauge(
        "raft_leader",
        "The leader this node knows, as a label (value 1)",
        raft.leader
            .map(|l| (vec![("leader", name_of(l))], 1.0))
            .into_iter()
            .collect(),
    );
    out.gauge(
        "raft_last_log_index",
        "Index of the last entry in this node's Raft log",
        vec![(vec![], raft.last_log_index.unwrap_or(0) as f64)],
    );
    out.gauge(
        "raft_applied_index",
        "Index of the last committed entry this node has applied",
        vec![(vec![], raft.last_applied.unwrap_or(0) as f64)],
    );
    let mut up = Vec::new();
    for p in &src.status.peers {
        if p.node == src.status.node {
            continue;
        }
        for (i, on) in p.networks.iter().enumerate() {
            up.push((
                vec![("peer", name_of(p.node)), ("network", i.to_string())],
                flag(*on),
            ));
        }
    }
    out.gauge(
        "node_up",
        "1 while this node hears peer on network (0 = control network, then portals, replication)",
        up,
    );
}

fn target_metrics(out: &mut Snapshot, src: &Sources<'_>) {
    let stats = src.server.stats();
    let mut sessions: BTreeMap<(String, String), u64> = BTreeMap::new();
    for s in src.server.sessions() {
        let Some(t) = s.target else { continue };
        let portal = s.portal.map(|p| p.to_string()).unwrap_or_default();
        *sessions.entry((t, portal)).or_default() += 1;
    }
    // Every target this node serves appears, with 0 when nobody is logged in.
    if let Some(serving) = src.serving {
        for t in serving.served_targets() {
            for p in &serving.portal_addrs() {
                sessions.entry((t.clone(), p.to_string())).or_default();
            }
        }
    }
    let per_portal: Vec<(Labels, f64)> = sessions
        .iter()
        .map(|((t, p), n)| {
            (
                vec![("target", t.clone()), ("portal", p.clone())],
                *n as f64,
            )
        })
        .collect();
    out.gauge(
        "target_sessions",
        "iSCSI sessions logged in to target through portal",
        per_portal.clone(),
    );
    out.gauge(
        "target_connections",
        "iSCSI connections to target through portal (one per session: MaxConnections=1)",
        per_portal,
    );
    out.counter(
        "iscsi_connections_accepted",
        "TCP connections accepted on the portals",
        vec![(vec![], stats.connections_accepted.load(Relaxed))],
    );
    out.counter(
        "iscsi_login_failures",
        "Failed iSCSI logins, by reason",
        stats
            .login_failures_by_reason()
            .into_iter()
            .map(|(r, v)| (vec![("reason", r.to_string())], v))
            .collect(),
    );
    if let Some(serving) = src.serving {
        out.counter(
            "replication_refused_frames",
            "Replication and forwarding frames from authenticated nodes refused because they contradict the committed cluster state",
            vec![(vec![], serving.refused_replication_frames())],
        );
    }
    out.counter(
        "iscsi_rejects",
        "Reject PDUs sent",
        vec![(vec![], stats.rejects.load(Relaxed))],
    );
    out.counter(
        "iscsi_digest_errors",
        "Header and data digest errors",
        vec![(vec![], stats.digest_errors.load(Relaxed))],
    );
    for (name, help, v) in [
        (
            "iscsi_connections_refused",
            "Connections closed at accept: the server's or one address's limit was reached",
            &stats.connections_refused,
        ),
        (
            "iscsi_io_queue_waits",
            "Commands whose connection waited for room in the I/O queue (back-pressure)",
            &stats.io_queue_waits,
        ),
        (
            "iscsi_buffer_waits",
            "Commands that waited for the server-wide buffer budget",
            &stats.buffer_waits,
        ),
        (
            "iscsi_buffer_refusals",
            "Commands answered TASK SET FULL for want of buffer budget",
            &stats.buffer_refusals,
        ),
        (
            "iscsi_immediate_rejects",
            "Immediate commands rejected beyond the per-session limit",
            &stats.immediate_rejects,
        ),
        (
            "iscsi_data_out_timeouts",
            "Connections dropped because their writes waited too long for Data-Out",
            &stats.data_out_timeouts,
        ),
        (
            "iscsi_target_resets_refused",
            "TARGET WARM/COLD RESET refused on targets that do not allow them",
            &stats.target_resets_refused,
        ),
    ] {
        out.counter(name, help, vec![(vec![], v.load(Relaxed))]);
    }
    out.counter(
        "iscsi_aborted_tasks",
        "Tasks aborted by task management",
        vec![(vec![], stats.aborted_tasks.load(Relaxed))],
    );
}

fn volume_metrics(out: &mut Snapshot, src: &Sources<'_>, me: u64, name_of: &dyn Fn(u64) -> String) {
    let st = src.state;
    let vol = |v: &str| -> Labels { vec![("volume", v.to_string())] };
    let primaries: Vec<&cluster::state::Volume> =
        st.volumes.values().filter(|v| v.primary == me).collect();
    out.gauge(
        "volume_replicas",
        "Copies of the volume the cluster keeps (reported by its primary)",
        primaries
            .iter()
            .map(|v| (vol(&v.name), v.replicas.len() as f64))
            .collect(),
    );
    out.gauge(
        "volume_in_sync_replicas",
        "Copies known to hold every acknowledged write, the primary's included",
        primaries
            .iter()
            .map(|v| (vol(&v.name), v.in_sync.len() as f64))
            .collect(),
    );
    out.gauge(
        "last_failover_pause_seconds",
        "How long I/O paused at the volume's last change of primary",
        primaries
            .iter()
            .filter_map(|v| {
                let f = v.last_failover.as_ref()?;
                Some((vol(&v.name), f.pause_ms? as f64 / 1000.0))
            })
            .collect(),
    );
    let views = &src.status.volumes;
    out.gauge(
        "volume_allocated_bytes",
        "Bytes this node's copy of the volume takes on disk",
        views
            .iter()
            .map(|v| (vol(&v.name), v.allocated_bytes as f64))
            .collect(),
    );
    out.gauge(
        "volume_snapshots",
        "Snapshots of the volume (taken or being taken), reported by its primary",
        primaries
            .iter()
            .map(|v| (vol(&v.name), v.snapshots.len() as f64))
            .collect(),
    );
    out.gauge(
        "snapshot_allocated_bytes",
        "Bytes this node's copy of a snapshot takes on disk, blocks shared with the volume included",
        views
            .iter()
            .flat_map(|v| {
                v.snapshots.iter().map(move |s| {
                    (
                        vec![("volume", v.name.clone()), ("snapshot", s.name.clone())],
                        s.allocated_bytes as f64,
                    )
                })
            })
            .collect(),
    );
    if let Some(d) = src.status.disk {
        out.gauge(
            "disk_free_bytes",
            "Bytes free on this node's data file system",
            vec![(Vec::new(), d.free_bytes as f64)],
        );
        out.gauge(
            "disk_size_bytes",
            "Size of this node's data file system",
            vec![(Vec::new(), d.total_bytes as f64)],
        );
        out.gauge(
            "disk_low",
            "1 while the data file system has less than 10% free (the space_low event)",
            vec![(Vec::new(), flag(serving::space::is_low(&d)))],
        );
    }
    out.gauge(
        "volume_primary",
        "1 while this node is the volume's primary and serves I/O",
        views
            .iter()
            .filter(|v| v.role == "primary")
            .map(|v| (vol(&v.name), flag(v.serving)))
            .collect(),
    );
    let mut lag_w = Vec::new();
    let mut lag_b = Vec::new();
    let mut resync_left = Vec::new();
    let mut resync_rate = Vec::new();
    let mut verify = Vec::new();
    for v in views.iter().filter(|v| v.role == "primary") {
        for l in &v.lag {
            let labels = vec![("volume", v.name.clone()), ("peer", name_of(l.node))];
            lag_w.push((labels.clone(), l.writes as f64));
            lag_b.push((labels, l.bytes as f64));
        }
        for r in &v.resyncs {
            let labels = vec![("volume", v.name.clone()), ("peer", name_of(r.node))];
            resync_left.push((
                labels.clone(),
                (r.pending_regions * serving::REGION_SIZE) as f64,
            ));
            resync_rate.push((labels, r.rate_bytes_per_s as f64));
        }
        if let Some(x) = &v.verify {
            verify.push((vol(&v.name), x.differing as f64));
        }
    }
    out.gauge(
        "replica_lag_writes",
        "Writes the replica has not acknowledged",
        lag_w,
    );
    out.gauge(
        "replica_lag_bytes",
        "Bytes the replica has not acknowledged",
        lag_b,
    );
    out.gauge(
        "resync_remaining_bytes",
        "Bytes still to resync to the replica",
        resync_left,
    );
    out.gauge(
        "resync_rate_bytes_per_second",
        "Measured resync rate to the replica",
        resync_rate,
    );
    out.gauge(
        "verify_differing_regions",
        "Regions (1 MiB) that differed between the primary and a replica in the volume's last online verify",
        verify,
    );
    let counts = src.serving.map(|s| &s.failovers);
    out.counter(
        "failovers",
        "Volumes this node took over as primary, by kind (planned move, unplanned failover)",
        vec![
            (
                vec![("kind", "planned".to_string())],
                counts.map_or(0, |c| c.planned.load(Relaxed)),
            ),
            (
                vec![("kind", "unplanned".to_string())],
                counts.map_or(0, |c| c.unplanned.load(Relaxed)),
            ),
        ],
    );
    io_metrics(out, src);
}

/// The I/O counters of every logical unit executed here, by volume.
fn io_metrics(out: &mut Snapshot, src: &Sources<'_>) {
    let mut units = Vec::new();
    if let Some(serving) = src.serving {
        let devices = serving.executing_devices();
        for t in src.state.targets.values() {
            let Some(d) = devices.get(&t.iqn) else {
                continue;
            };
            for (lun, volume) in &t.luns {
                if let Some(s) = d.io_stats(*lun) {
                    units.push((volume.clone(), s));
                }
            }
        }
    }
    let each = |f: &dyn Fn(&scsi::stats::IoStats) -> u64| -> Vec<(Labels, u64)> {
        units
            .iter()
            .map(|(v, s)| (vec![("volume", v.clone())], f(s)))
            .collect()
    };
    out.counter(
        "volume_reads",
        "READ commands completed",
        each(&|s| s.reads.load(Relaxed)),
    );
    out.counter(
        "volume_writes",
        "Write commands completed (WRITE, WRITE AND VERIFY, WRITE SAME, COMPARE AND WRITE)",
        each(&|s| s.writes.load(Relaxed)),
    );
    out.counter(
        "volume_read_bytes",
        "Bytes returned by successful reads",
        each(&|s| s.read_bytes.load(Relaxed)),
    );
    out.counter(
        "volume_written_bytes",
        "Bytes received by successful writes",
        each(&|s| s.written_bytes.load(Relaxed)),
    );
    out.counter(
        "disk_io_errors",
        "Commands that failed with MEDIUM ERROR or HARDWARE ERROR",
        each(&|s| s.medium_errors.load(Relaxed)),
    );
    out.gauge(
        "volume_commands_in_flight",
        "SCSI commands started and not yet answered",
        units
            .iter()
            .map(|(v, s)| {
                (
                    vec![("volume", v.clone())],
                    s.in_flight.load(Relaxed) as f64,
                )
            })
            .collect(),
    );
    let mut hist = Vec::new();
    for (v, s) in &units {
        for (kind, snap) in s.latency() {
            // The encoder adds the buckets up itself and wants +Inf as f64::MAX.
            let mut prev = 0;
            let buckets = snap
                .buckets
                .iter()
                .map(|(le, cum)| {
                    let n = cum - prev;
                    prev = *cum;
                    (if le.is_finite() { *le } else { f64::MAX }, n)
                })
                .collect();
            hist.push((
                vec![("volume", v.clone()), ("op", kind.label().to_string())],
                buckets,
                snap.count,
                snap.sum_seconds,
            ));
        }
    }
    out.families.push((
        "volume_command_duration_seconds",
        "Time from a SCSI command's arrival to its status, by operation",
        Family::Histogram(hist),
    ));
}

/// The text exposition of `snapshot`, every series labelled with `node`.
pub fn encode(node: &str, snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix_and_labels(
        "bulwark",
        [(Cow::Borrowed("node"), Cow::Owned(node.to_string()))].into_iter(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    to_prometheus_text(&text)
}

/// The crate writes OpenMetrics; Prometheus' own text format (0.0.4, what `promtool
/// check metrics` and every scraper read) differs only in naming a counter's HELP and
/// TYPE lines after its `_total` samples and in having no `# EOF`.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_after_their_samples() {
        let om = "# HELP x_reads Reads\n# TYPE x_reads counter\nx_reads_total{node=\"a\"} 3\n# HELP x_up Up\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_reads_total Reads\n# TYPE x_reads_total counter\nx_reads_total{node=\"a\"} 3\n# HELP x_up Up\n# TYPE x_up gauge\nx_up 1\n"
        );
    }

    #[test]
    fn a_snapshot_encodes_every_family_with_the_node_label() {
        let mut s = Snapshot::default();
        s.counter(
            "volume_writes",
            "Writes",
            vec![(vec![("volume", "v<1>".into())], 7)],
        );
        s.gauge("raft_term", "Term", vec![(vec![], 3.0)]);
        s.families.push((
            "volume_command_duration_seconds",
            "Latency",
            Family::Histogram(vec![(
                vec![("volume", "v".into()), ("op", "write".into())],
                vec![(0.001, 2), (f64::MAX, 1)],
                3,
                0.5,
            )]),
        ));
        let text = encode("n1", s);
        assert!(
            text.contains("# TYPE bulwark_volume_writes_total counter"),
            "{text}"
        );
        assert!(
            text.contains("bulwark_volume_writes_total{node=\"n1\",volume=\"v<1>\"} 7"),
            "{text}"
        );
        assert!(text.contains("bulwark_raft_term{node=\"n1\"} 3"), "{text}");
        assert!(
            text.contains("le=\"0.001\",volume=\"v\",op=\"write\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("le=\"+Inf\",volume=\"v\",op=\"write\"} 3"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }
}
