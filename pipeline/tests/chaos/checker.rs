//! The checker: compares what the origin committed with the origin topic, the destination's
//! replicated topic and the destination database, and keeps a scenario's figures.

use std::collections::{BTreeMap, HashMap};

use ferry_connectors::kafka::Cluster;
use ferry_pipeline::{inspect, topics};
use ferry_schemas::TableId;
use serde::Serialize;

use crate::workload::History;

/// One scenario's figures over all its iterations.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub iterations: u32,
    pub skipped: Option<String>,
    pub txns: u64,
    pub versions: u64,
    /// Committed versions missing from the origin topic (from each key's first captured
    /// version on).
    pub lost_origin_topic: u64,
    /// Keys whose last committed version never reached the destination topic.
    pub lost_dest_topic: u64,
    /// Keys whose last committed version is not what the destination database holds.
    pub lost_dest_db: u64,
    /// The same (key, version) applied to the destination database more than once.
    pub duplicate_applications: u64,
    /// A version seen (topic) or applied (database) after a higher one of the same key.
    pub order_violations: u64,
    /// Copies per (key, version) in the origin topic: copies -> how many.
    pub origin_copies: BTreeMap<u32, u64>,
    /// The same for the destination's replicated topic.
    pub dest_copies: BTreeMap<u32, u64>,
    /// Corrupt batches injected into the destination batch topic, and how many of them the
    /// applier quarantined.
    pub corrupted: u64,
    pub quarantined: u64,
    /// Mutated batches run through the applier's verification in process, and how many it
    /// rejected.
    pub mutations: u64,
    pub mutations_caught: u64,
    /// A committed consumer offset (shipper or applier) ahead of what was durably shipped or
    /// applied, checked right after each kill.
    pub checkpoint_ahead: u64,
    /// Bad input that neither reached the destination nor stopped the pipeline with an error.
    pub silent_skips: u64,
    /// Scenario-specific checks that failed (bounded memory, detection in time, …), each
    /// described in the notes.
    pub failures: u64,
    pub recovery_secs: f64,
    pub max_lag_secs: f64,
    pub max_rss_mib: f64,
    /// Scenario-specific readings (throughput, freshness, …).
    pub extra: BTreeMap<String, f64>,
    pub notes: Vec<String>,
}

impl Figures {
    pub fn new(scenario: &str) -> Figures {
        Figures {
            scenario: scenario.into(),
            ..Figures::default()
        }
    }

    /// Every safety figure that is not what it must be.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (name, n) in [
            ("lost (origin topic)", self.lost_origin_topic),
            ("lost (destination topic)", self.lost_dest_topic),
            ("lost (destination database)", self.lost_dest_db),
            ("duplicate applications", self.duplicate_applications),
            ("order violations", self.order_violations),
            ("checkpoint ahead of durable", self.checkpoint_ahead),
            ("silent skips", self.silent_skips),
            ("scenario checks failed", self.failures),
        ] {
            if n > 0 {
                v.push(format!("{name}: {n}"));
            }
        }
        if self.quarantined != self.corrupted {
            v.push(format!(
                "corrupt batches: {} injected, {} quarantined",
                self.corrupted, self.quarantined
            ));
        }
        if self.mutations_caught != self.mutations {
            v.push(format!(
                "mutations: {} made, {} caught",
                self.mutations, self.mutations_caught
            ));
        }
        v
    }

    /// Adds one topic's copy histogram.
    fn add_copies(into: &mut BTreeMap<u32, u64>, copies: &HashMap<(i64, i64), u32>) {
        for n in copies.values() {
            *into.entry(*n).or_default() += 1;
        }
    }
}

/// (key, version) of every record of the workload table's topic in `cluster`, per partition in
/// offset order; none while the topic does not exist yet (capture killed before it made it:
/// Kafka creates no topic on a read, and the checker then compares against an empty topic).
pub fn topic_versions(cluster: &Cluster, prefix: &str) -> Vec<(i64, i64)> {
    let topic = topics::table_topic(prefix, &TableId::new("public", crate::workload::TABLE));
    let partitions = cluster
        .partition_count(&topic, std::time::Duration::from_secs(10))
        .expect("topic metadata");
    if partitions == 0 {
        return Vec::new();
    }
    let mut decoder = inspect::Decoder::load(cluster, prefix, None).expect("schema topic");
    let mut records = inspect::read_all(cluster, &topic, usize::MAX).expect("read topic");
    records.sort_by_key(|r| (r.0, r.1));
    records
        .into_iter()
        .filter_map(|(p, off, _, value)| {
            let value = value?;
            let v = decoder
                .decode(&value)
                .unwrap_or_else(|e| panic!("{topic}[{p}]@{off}: {e}"));
            let after = &v["after"];
            Some((after["id"].as_i64()?, after["version"].as_i64()?))
        })
        .collect()
}

/// Versions per key in first-seen order, copies per (key, version), order violations (with
/// a description of the first few).
type Sequences = (
    BTreeMap<i64, Vec<i64>>,
    HashMap<(i64, i64), u32>,
    (u64, Vec<String>),
);

/// Per key, versions in the order first seen; and copies per (key, version). A version first
/// seen after a higher one of its key is an order violation.
fn sequences(records: &[(i64, i64)]) -> Sequences {
    let mut seen: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut copies: HashMap<(i64, i64), u32> = HashMap::new();
    let (mut violations, mut notes) = (0, Vec::new());
    for (i, &(k, v)) in records.iter().enumerate() {
        let n = copies.entry((k, v)).or_default();
        *n += 1;
        if *n > 1 {
            continue;
        }
        let versions = seen.entry(k).or_default();
        if let Some(&last) = versions.last().filter(|&&last| last > v) {
            violations += 1;
            if notes.len() < 5 {
                notes.push(format!(
                    "key {k}: version {v} first seen (record {i} in read order) after version {last}"
                ));
            }
        }
        versions.push(v);
    }
    (seen, copies, (violations, notes))
}

/// The origin topic holds every committed version from each key's first captured one (the
/// snapshot may start a key past version 1); every key committed appears.
pub fn check_origin_topic(f: &mut Figures, history: &History, records: &[(i64, i64)]) {
    let (seen, copies, (violations, notes)) = sequences(records);
    f.order_violations += violations;
    f.notes
        .extend(notes.into_iter().map(|n| format!("origin topic: {n}")));
    Figures::add_copies(&mut f.origin_copies, &copies);
    for (k, committed) in &history.keys {
        let Some(first) = seen.get(k).and_then(|v| v.iter().min()) else {
            f.lost_origin_topic += committed.len() as u64;
            f.notes
                .push(format!("origin topic: key {k} never captured"));
            continue;
        };
        let missing: Vec<i64> = committed
            .iter()
            .map(|v| v.version)
            .filter(|v| v >= first && !copies.contains_key(&(*k, *v)))
            .collect();
        if !missing.is_empty() {
            f.lost_origin_topic += missing.len() as u64;
            f.notes
                .push(format!("origin topic: key {k} lacks versions {missing:?}"));
        }
    }
}

/// The destination topic (compacted batches: intermediate versions may be folded) ends every
/// key at its last committed version.
pub fn check_dest_topic(f: &mut Figures, history: &History, records: &[(i64, i64)]) {
    let (seen, copies, (violations, notes)) = sequences(records);
    f.order_violations += violations;
    f.notes
        .extend(notes.into_iter().map(|n| format!("destination topic: {n}")));
    Figures::add_copies(&mut f.dest_copies, &copies);
    for (k, last) in history.last() {
        let top = seen.get(&k).and_then(|v| v.iter().max()).copied();
        if top != Some(last) {
            f.lost_dest_topic += 1;
            f.notes.push(format!(
                "destination topic: key {k} ends at {top:?}, committed {last}"
            ));
        }
    }
}

/// One row write in the destination database, as its audit trigger saw it.
pub struct Applied {
    pub key: i64,
    pub version: i64,
    /// The source change it came from: (LSN, sequence within the transaction).
    pub change: (i64, i64),
}

/// The destination database: final versions, and from the audit trigger, duplicate
/// applications (the same source change written twice), re-writes of a version by a later
/// change of identical content (a snapshot read overlapping the stream: counted, harmless),
/// and per-key order.
pub fn check_dest_db(
    f: &mut Figures,
    history: &History,
    rows: &BTreeMap<i64, i64>,
    audit: &[Applied],
) {
    for (k, last) in history.last() {
        if rows.get(&k) != Some(&last) {
            f.lost_dest_db += 1;
            f.notes.push(format!(
                "destination database: key {k} holds {:?}, committed {last}",
                rows.get(&k)
            ));
        }
    }
    let mut changes: HashMap<(i64, (i64, i64)), u32> = HashMap::new();
    let mut versions: HashMap<(i64, i64), u32> = HashMap::new();
    let mut first_change: HashMap<(i64, i64), (i64, i64)> = HashMap::new();
    let mut top: HashMap<i64, i64> = HashMap::new();
    let mut rewrites = 0u64;
    for a in audit {
        let (k, v) = (a.key, a.version);
        let n = changes.entry((k, a.change)).or_default();
        *n += 1;
        if *n > 1 {
            f.duplicate_applications += 1;
            f.notes.push(format!(
                "key {k}: the change at {:?} was applied {n} times",
                a.change
            ));
        }
        let same = versions.entry((k, v)).or_default();
        *same += 1;
        let first = *first_change.entry((k, v)).or_insert(a.change);
        if *same > 1 {
            rewrites += 1;
            if rewrites <= 5 {
                f.notes.push(format!(
                    "key {k}: version {v} written again, by the change at {:?} (first by {first:?})",
                    a.change
                ));
            }
        }
        let t = top.entry(k).or_insert(v);
        if v < *t {
            f.order_violations += 1;
            f.notes
                .push(format!("key {k}: version {v} applied after {t}"));
        }
        *t = (*t).max(v);
    }
    *f.extra.entry("same_version_rewrites".into()).or_default() += rewrites as f64;
}

impl Figures {
    /// Adds another run's figures.
    pub fn merge(&mut self, o: Figures) {
        self.iterations += o.iterations;
        self.txns += o.txns;
        self.versions += o.versions;
        self.lost_origin_topic += o.lost_origin_topic;
        self.lost_dest_topic += o.lost_dest_topic;
        self.lost_dest_db += o.lost_dest_db;
        self.duplicate_applications += o.duplicate_applications;
        self.order_violations += o.order_violations;
        for (k, v) in o.origin_copies {
            *self.origin_copies.entry(k).or_default() += v;
        }
        for (k, v) in o.dest_copies {
            *self.dest_copies.entry(k).or_default() += v;
        }
        self.corrupted += o.corrupted;
        self.quarantined += o.quarantined;
        self.mutations += o.mutations;
        self.mutations_caught += o.mutations_caught;
        self.checkpoint_ahead += o.checkpoint_ahead;
        self.silent_skips += o.silent_skips;
        self.failures += o.failures;
        self.recovery_secs = self.recovery_secs.max(o.recovery_secs);
        self.max_lag_secs = self.max_lag_secs.max(o.max_lag_secs);
        self.max_rss_mib = self.max_rss_mib.max(o.max_rss_mib);
        // Counts add up; readings (rates, lags, sizes) keep the worst.
        for (k, v) in o.extra {
            let e = self.extra.entry(k.clone()).or_insert(0.0);
            if k.ends_with("_rewrites") {
                *e += v;
            } else {
                *e = e.max(v);
            }
        }
        self.notes.extend(o.notes);
    }
}

/// Right after capture was killed: every version whose commit lies at or before the slot's
/// confirmed position (`lsn_after <= confirmed`) must be in the origin topic, or the slot
/// was confirmed ahead of what the broker had.
pub fn capture_ahead(
    history: &History,
    confirmed: i64,
    records: &[(i64, i64)],
) -> (u64, Vec<String>) {
    let have: std::collections::HashSet<(i64, i64)> = records.iter().copied().collect();
    let mut first_seen: HashMap<i64, i64> = HashMap::new();
    for &(k, v) in records {
        let e = first_seen.entry(k).or_insert(v);
        *e = (*e).min(v);
    }
    let (mut ahead, mut notes) = (0, Vec::new());
    for (k, versions) in &history.keys {
        // A key not captured yet may wait for its snapshot chunk; versions before a key's first
        // captured one predate its snapshot read.
        let Some(&first) = first_seen.get(k) else {
            continue;
        };
        for v in versions {
            if v.lsn_after <= confirmed && v.version >= first && !have.contains(&(*k, v.version)) {
                ahead += 1;
                notes.push(format!(
                    "slot confirmed {confirmed:#x} past key {k} version {} (committed by {:#x}), which is not in the origin topic",
                    v.version, v.lsn_after
                ));
            }
        }
    }
    (ahead, notes)
}
