//! Shipping against the real brokers: coverage of origin offsets, crash between produce and
//! commit, and that a shipped batch decodes to exactly the compacted changes.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use ferry_pipeline::batch::payload;
use ferry_pipeline::batch::{Entry, Run};
use ferry_pipeline::config::Config;
use ferry_pipeline::inspect;
use ferry_pipeline::ship::compact;
use ferry_pipeline::ship::{self, Registry, ShipStats};
use ferry_schemas::manifest::{self, Manifest};
use ferry_schemas::Fingerprint;
use tokio::sync::watch;

use crate::support::{start_capture, TestDb};

/// Every manifest (with payload) in the batch topic.
fn batches(cfg: &Config) -> Vec<(Manifest, Vec<u8>)> {
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    match inspect::read_all(&dest, &cfg.batch_topic(), usize::MAX) {
        Ok(records) => records
            .into_iter()
            .filter_map(|(_, _, _, v)| v)
            .map(|v| {
                let (m, p) = manifest::unframe(&v).expect("every shipped batch verifies");
                (m, p.to_vec())
            })
            .filter(|(m, _)| m.kind() == ferry_schemas::manifest::ManifestKind::Changes)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// [`batches`] from async code.
async fn read_batches(cfg: &Config) -> Vec<(Manifest, Vec<u8>)> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || batches(&cfg))
        .await
        .expect("task")
}

/// High watermark of every origin table partition.
fn origin_ends(cfg: &Config, table: &str) -> BTreeMap<(String, i32), i64> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = format!("{}.{table}", cfg.capture.topic_prefix);
    let reader = origin.reader().expect("reader");
    (0..cfg.capture.partitions)
        .map(|p| {
            let (_, hi) = rdkafka::consumer::Consumer::fetch_watermarks(
                &reader,
                &topic,
                p,
                Duration::from_secs(10),
            )
            .expect("watermarks");
            ((topic.clone(), p), hi)
        })
        .collect()
}

/// Per origin partition, the sorted ranges the manifests cover.
fn coverage(ms: &[(Manifest, Vec<u8>)]) -> BTreeMap<(String, i32), Vec<(i64, i64)>> {
    let mut out: BTreeMap<(String, i32), Vec<(i64, i64)>> = BTreeMap::new();
    for (m, _) in ms {
        out.entry((m.origin_topic.clone(), m.origin_partition))
            .or_default()
            .push((m.first_offset, m.last_offset));
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

async fn wait_covered(cfg: &Config, table: &str, timeout: Duration) -> Vec<(Manifest, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let (c, ends) = {
            let cfg = cfg.clone();
            let table = table.to_string();
            tokio::task::spawn_blocking(move || (batches(&cfg), origin_ends(&cfg, &table)))
                .await
                .expect("task")
        };
        let cov = coverage(&c);
        // Nothing in the origin topic yet (its end not visible) is not "covered".
        let done = ends.values().any(|hi| *hi > 0)
            && ends.iter().all(|(tp, hi)| {
                *hi == 0
                    || cov
                        .get(tp)
                        .and_then(|r| r.last())
                        .is_some_and(|(_, last)| last + 1 >= *hi)
            });
        if done {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "batches do not cover the origin topics: {cov:?} vs {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn assert_exact_coverage(ms: &[(Manifest, Vec<u8>)], ends: &BTreeMap<(String, i32), i64>) {
    let ids: Vec<&str> = ms.iter().map(|(m, _)| m.batch_id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate batch ids");
    let cov = coverage(ms);
    for (tp, hi) in ends {
        let mut next = 0;
        for (first, last) in cov.get(tp).cloned().unwrap_or_default() {
            assert_eq!(
                first, next,
                "{tp:?}: hole or overlap at {next} (batch starts at {first})"
            );
            next = last + 1;
        }
        assert_eq!(next, *hi, "{tp:?}: batches end at {next}, topic at {hi}");
    }
}

async fn workload(db: &TestDb) {
    db.exec("INSERT INTO acct SELECT g, 'owner ' || g, 0 FROM generate_series(1, 400) g;")
        .await;
    for round in 0..15 {
        db.exec(&format!(
            "BEGIN; UPDATE acct SET balance = balance + 1 WHERE id % 5 = {}; \
             DELETE FROM acct WHERE id = {}; INSERT INTO acct VALUES ({}, 'late', {round}); COMMIT;",
            round % 5,
            round * 7 + 1,
            1000 + round
        ))
        .await;
    }
}

/// Creates `acct`, runs the workload under capture and waits until it is all in the origin topic.
async fn captured_workload(db: &TestDb) {
    db.exec("CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int)")
        .await;
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload(db).await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;
}

/// `acct` captured (see [`captured_workload`]) with a destination database, and the shipper
/// configuration of [`ship_config`].
async fn acct_with_destination(test: &str) -> (TestDb, Config) {
    let mut db = TestDb::new(test).await;
    db.cfg.destination.postgres = Some(crate::apply::dest_db(&db, "dst").await);
    captured_workload(&db).await;
    let cfg = ship_config(&db);
    (db, cfg)
}

fn ship_config(db: &TestDb) -> Config {
    let mut cfg = db.cfg.clone();
    cfg.ship.group_id = format!("{}_ship", db.name);
    cfg.apply.group_id = format!("{}_apply", db.name);
    cfg.ship.max_events = 150;
    cfg.ship.linger_ms = 200;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_cover_every_offset_once_and_decode_to_the_compacted_changes() {
    let db = TestDb::new("ship").await;
    captured_workload(&db).await;

    let cfg = ship_config(&db);
    let (stop, rx) = watch::channel(false);
    let stats = Arc::new(ShipStats::default());
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, stats).await })
    };
    let ms = wait_covered(&cfg, "public.acct", Duration::from_secs(90)).await;
    let _ = stop.send(true);
    task.await.expect("join").expect("shipper ok");

    let ends = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || origin_ends(&cfg, "public.acct"))
            .await
            .expect("task")
    };
    assert_exact_coverage(&ms, &ends);
    let total = stats.total();
    assert!(
        total.events_out < total.events_in,
        "compaction removed nothing: {total:?}"
    );
    assert!(total.shipped_bytes < total.raw_bytes, "{total:?}");

    // Decoding each batch reproduces exactly what compacting its origin range gives.
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = format!("{}.public.acct", cfg.capture.topic_prefix);
    let records = {
        let (o, t) = (origin.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            inspect::read_all(&o, &t, usize::MAX).expect("origin records")
        })
        .await
        .expect("task")
    };
    let mut registry = Registry::new(origin, &cfg.capture.topic_prefix);
    for (m, payload_bytes) in &ms {
        let mut entries = Vec::new();
        for (p, off, key, value) in &records {
            if *p != m.origin_partition || *off < m.first_offset || *off > m.last_offset {
                continue;
            }
            let value = value.as_ref().expect("value");
            let fp = Fingerprint::from_record(value).expect("fp").to_string();
            let schema = tokio::task::block_in_place(|| registry.get(&fp))
                .expect("registry")
                .expect("schema");
            let event = schema.decode_value(value).expect("decodes");
            entries.push(Entry {
                offset: *off,
                key: key.clone(),
                schema,
                event,
            });
        }
        assert_eq!(entries.len() as i64, m.events_in, "{}", m.batch_id);
        let expected = compact::compact(entries, true).await.expect("compacts");
        let shipped = payload::decode(
            payload_bytes,
            m.uncompressed_bytes as usize,
            &m.schema_fingerprints,
            &m.source_region,
            |fp| registry.cached(fp),
        )
        .expect("payload decodes");
        let flat = |runs: &[Run]| -> Vec<_> {
            runs.iter().flat_map(|r| r.events.iter().cloned()).collect()
        };
        assert_eq!(flat(&shipped), flat(&expected), "{}", m.batch_id);
        assert_eq!(shipped.len() as i64, m.schema_fingerprints.len() as i64);
        assert_eq!(flat(&shipped).len() as i64, m.events_out);
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_produce_and_commit_leaves_no_duplicate_and_no_hole() {
    let db = TestDb::new("shipcrash").await;
    captured_workload(&db).await;

    let cfg = ship_config(&db);
    let dir = std::env::temp_dir();
    let base = db.write_config(&dir);
    let extra = format!(
        "\n[ship]\ngroup_id = \"{}\"\nmax_events = {}\nlinger_ms = {}\ninstance_id = \"shipper-1\"\n",
        cfg.ship.group_id, cfg.ship.max_events, cfg.ship.linger_ms
    );
    let text = std::fs::read_to_string(&base).expect("config") + &extra;
    std::fs::write(&base, text).expect("config");
    let log = dir.join(format!("{}-ship.log", db.name));
    let spawn = |failpoint: Option<&str>| spawn_ferry(&base, "ship", &log, failpoint);
    // The failpoint aborts the process right after the broker acknowledged its 3rd batch,
    // before the offset commit — the worst moment to crash.
    let mut crashing = spawn(Some("ship.after_produce:3"));
    let status = tokio::task::spawn_blocking(move || crashing.wait())
        .await
        .expect("task")
        .expect("wait");
    assert!(
        !status.success(),
        "the failpoint should have aborted the shipper"
    );
    let produced_before_restart = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || batches(&cfg).len())
            .await
            .expect("task")
    };
    assert!(
        produced_before_restart >= 3,
        "batches before the crash: {produced_before_restart}"
    );

    let mut child = spawn(None);
    let ms = wait_covered(&cfg, "public.acct", Duration::from_secs(90)).await;
    let _ = child.kill();
    let _ = child.wait();
    let ends = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || origin_ends(&cfg, "public.acct"))
            .await
            .expect("task")
    };
    assert_exact_coverage(&ms, &ends);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transforms_ship_their_aggregates_besides_the_rows() {
    let db = TestDb::new("shipagg").await;
    captured_workload(&db).await;

    let mut cfg = ship_config(&db);
    cfg.ship.transforms = vec![ferry_pipeline::config::Transform {
        name: "ops".into(),
        table: "public.acct".into(),
        sql: "SELECT _op, count(*) AS n, sum(balance) AS balance FROM changes GROUP BY _op".into(),
        replace_rows: false,
    }];
    let (stop, rx) = watch::channel(false);
    let stats = Arc::new(ShipStats::default());
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, stats).await })
    };
    let ms = wait_covered(&cfg, "public.acct", Duration::from_secs(90)).await;
    let _ = stop.send(true);
    task.await.expect("join").expect("shipper ok");
    let events_in: i64 = ms.iter().map(|(m, _)| m.events_in).sum();

    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let topic = format!("{}.agg.ops", cfg.capture.topic_prefix);
    let records = tokio::task::spawn_blocking(move || {
        inspect::read_all(&dest, &topic, usize::MAX).expect("agg topic")
    })
    .await
    .expect("task");
    assert_eq!(records.len(), ms.len(), "one aggregate per batch");
    let mut counted = 0i64;
    for (_, _, _, v) in records {
        let v = v.expect("value");
        let (m, payload_bytes) = manifest::unframe(&v).expect("aggregate verifies");
        assert_eq!(m.kind, "aggregate:ops");
        let raw =
            zstd::bulk::decompress(payload_bytes, m.uncompressed_bytes as usize).expect("zstd");
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(raw), None)
            .expect("ipc");
        for batch in reader {
            let batch = batch.expect("batch");
            let n = batch
                .column_by_name("n")
                .expect("n")
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .expect("count is Int64")
                .clone();
            counted += n.iter().flatten().sum::<i64>();
        }
    }
    assert_eq!(
        counted, events_in,
        "the aggregates count every change exactly once"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_replay_resumes_and_keeps_batch_ids() {
    let db = TestDb::new("replaycrash").await;
    captured_workload(&db).await;
    let cfg = ship_config(&db);
    let (stop, rx) = watch::channel(false);
    let task = {
        let cfg = cfg.clone();
        tokio::spawn(async move { ship::run(&cfg, rx, Arc::new(ShipStats::default())).await })
    };
    let shipped = wait_covered(&cfg, "public.acct", Duration::from_secs(90)).await;
    let _ = stop.send(true);
    task.await.expect("join").expect("shipper ok");
    let ids: HashSet<String> = shipped.iter().map(|(m, _)| m.batch_id.clone()).collect();

    let dir = std::env::temp_dir();
    let config = db.write_config(&dir);
    let text = std::fs::read_to_string(&config).expect("config")
        + &format!("\n[ship]\nmax_events = {}\n", cfg.ship.max_events);
    std::fs::write(&config, text).expect("config");
    let topic = format!("{}.public.acct", cfg.capture.topic_prefix);
    let replay = move |failpoint: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args([
            "--config",
            &config.to_string_lossy(),
            "replay",
            "--topic",
            &topic,
            "--from-offset",
            "0",
            "--job",
            "crashy-replay",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if let Some(f) = failpoint {
            c.env("FERRY_FAILPOINT", f);
        }
        c.output().expect("run ferry replay")
    };
    // Killed right after its 3rd batch was acknowledged, before that batch's checkpoint.
    let crashed = tokio::task::spawn_blocking({
        let r = replay.clone();
        move || r(Some("replay.before_checkpoint:3"))
    })
    .await
    .expect("task");
    assert!(
        !crashed.status.success(),
        "the failpoint should have aborted the replay"
    );
    let resumed = tokio::task::spawn_blocking({
        let r = replay.clone();
        move || r(None)
    })
    .await
    .expect("task");
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stdout)
    );
    let again = tokio::task::spawn_blocking(move || replay(None))
        .await
        .expect("task");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains(": 0 batches"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );

    // Every batch the replay produced carries an id shipped before: the destination's dedupe
    // makes all of it a no-op, crash included.
    let all = read_batches(&cfg).await;
    assert!(all.len() > shipped.len(), "the replay produced batches");
    for (m, _) in &all {
        assert!(
            ids.contains(&m.batch_id),
            "new id {} from a replay",
            m.batch_id
        );
    }
    db.cleanup().await;
}

/// Sends the records `from..end` of every partition of `topic` again, byte for byte, as a
/// capture that crashed after producing them and before its slot confirmed them does.
fn send_again(cfg: &Config, topic: &str, from: impl Fn(i64) -> i64) -> usize {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let records = inspect::read_all(&origin, topic, usize::MAX).expect("origin records");
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, off, _, _) in &records {
        let e = ends.entry(*p).or_default();
        *e = (*e).max(off + 1);
    }
    let producer: BaseProducer = origin.client_config().create().expect("producer");
    let mut sent = 0;
    for (p, off, key, value) in &records {
        if *off < from(ends[p]) {
            continue;
        }
        let mut r = BaseRecord::<Vec<u8>, Vec<u8>>::to(topic).partition(*p);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(v) = value {
            r = r.payload(v);
        }
        producer.send(r).map_err(|(e, _)| e).expect("send again");
        sent += 1;
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    sent
}

/// Runs the live shipper until the batches cover the origin topic, then stops it cleanly.
async fn ship_until_covered(cfg: &Config, stats: Arc<ShipStats>) -> Vec<(Manifest, Vec<u8>)> {
    let (stop, rx) = watch::channel(false);
    let task = {
        let cfg = cfg.clone();
        tokio::spawn(async move { ship::run(&cfg, rx, stats).await })
    };
    let ms = wait_covered(cfg, "public.acct", Duration::from_secs(90)).await;
    let _ = stop.send(true);
    task.await.expect("join").expect("shipper ok");
    ms
}

/// A capture killed between producing and confirming sends those changes again. Behind a batch
/// cut, such a repeat would bring an older version back into the batches (and the replicated
/// topics) after a newer one. The shipper leaves out every change it shipped already: the
/// repeats it reads itself, and after its own restart, the ones behind what its last batch
/// shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_capture_sends_again_are_shipped_once() {
    let db = TestDb::new("shiprepeat").await;
    db.exec("CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int)")
        .await;
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.exec("INSERT INTO acct SELECT g, 'owner ' || g, 0 FROM generate_series(1, 60) g")
        .await;
    for round in 1..=10 {
        db.exec(&format!("UPDATE acct SET balance = {round}")).await;
    }
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;

    let mut cfg = ship_config(&db);
    cfg.ship.max_events = 37;
    let topic = format!("{}.public.acct", cfg.capture.topic_prefix);
    let again = |from: fn(i64) -> i64| {
        let (cfg, topic) = (cfg.clone(), topic.clone());
        tokio::task::spawn_blocking(move || send_again(&cfg, &topic, from))
    };
    // Repeats the shipper reads after their originals, then repeats after its restart.
    let first = again(|end| end / 2).await.expect("task");
    let stats = Arc::new(ShipStats::default());
    ship_until_covered(&cfg, stats.clone()).await;
    let second = again(|end| end / 3).await.expect("task");
    let ms = ship_until_covered(&cfg, stats.clone()).await;
    assert!(first > 0 && second > 0);

    let ends = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || origin_ends(&cfg, "public.acct"))
            .await
            .expect("task")
    };
    assert_exact_coverage(&ms, &ends);
    // Per origin partition in offset order, every (id, balance) once and none going back.
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let mut registry = Registry::new(origin, &cfg.capture.topic_prefix);
    let mut ordered: Vec<_> = ms.iter().collect();
    ordered.sort_by_key(|(m, _)| (m.origin_partition, m.first_offset));
    let mut seen: HashSet<(i32, i32)> = HashSet::new();
    let mut newest: BTreeMap<i32, i32> = BTreeMap::new();
    for (m, payload_bytes) in ordered {
        for fp in &m.schema_fingerprints {
            tokio::task::block_in_place(|| registry.get(fp)).expect("registry");
        }
        let runs = payload::decode(
            payload_bytes,
            m.uncompressed_bytes as usize,
            &m.schema_fingerprints,
            &m.source_region,
            |fp| registry.cached(fp),
        )
        .expect("payload decodes");
        for (_, e) in runs.iter().flat_map(|r| r.events.iter()) {
            let row = e.after.as_ref().expect("no deletes here");
            let (&ferry_schemas::Datum::Int(id), &ferry_schemas::Datum::Int(balance)) =
                (&row[0], &row[2])
            else {
                panic!("unexpected row {row:?}");
            };
            assert!(
                seen.insert((id, balance)),
                "{}: id {id} balance {balance} shipped twice",
                m.batch_id
            );
            let top = newest.entry(id).or_insert(balance);
            assert!(
                balance >= *top,
                "{}: id {id} goes back from balance {top} to {balance}",
                m.batch_id
            );
            *top = balance;
        }
    }
    assert_eq!(newest.len(), 60);
    assert!(newest.values().all(|b| *b == 10), "{newest:?}");
    assert_eq!(
        stats
            .repeats_total
            .load(std::sync::atomic::Ordering::Relaxed),
        (first + second) as u64,
        "every repeat left out, and counted"
    );
    db.cleanup().await;
}

/// Deletes the records before `end - keep` of every partition of `topic` (the table
/// `public.acct`), as retention does; returns each partition's new first offset.
async fn delete_before_end(cfg: &Config, topic: &str, keep: i64) -> BTreeMap<i32, i64> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let admin: AdminClient<DefaultClientContext> = origin.client_config().create().expect("admin");
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut starts = BTreeMap::new();
    for ((_, p), end) in origin_ends(cfg, "public.acct") {
        let start = (end - keep).max(0);
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(start))
            .expect("offset");
        starts.insert(p, start);
    }
    let result = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("delete records");
    for e in result.elements() {
        assert!(e.error().is_ok(), "{e:?}");
    }
    starts
}

/// Retention deleted a range before it was shipped: the shipper stops that partition (it never
/// skips), names the range, and goes on after it only once an operator accepted the loss
/// (`ferry accept-gap --accept`, after backfilling), which ships it as an empty batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_retention_deleted_stops_its_partition_until_accepted() {
    let db = TestDb::new("shipgap").await;
    captured_workload(&db).await;
    let cfg = ship_config(&db);
    let stats = Arc::new(ShipStats::default());
    ship_until_covered(&cfg, stats.clone()).await;
    let shipped = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || origin_ends(&cfg, "public.acct"))
            .await
            .expect("task")
    };

    // More changes, then retention deletes all but the last 5 records of each partition.
    let cap = start_capture(&db.cfg).await;
    for _ in 0..2 {
        db.exec("UPDATE acct SET balance = balance + 100").await;
    }
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;
    let topic = format!("{}.public.acct", cfg.capture.topic_prefix);
    let starts = delete_before_end(&cfg, &topic, 5).await;
    let lost: i64 = starts
        .iter()
        .map(|(p, start)| start - shipped[&(topic.clone(), *p)])
        .sum();
    assert!(lost > 0);

    // The shipper stops each partition at its gap and ships nothing after it.
    let stats = Arc::new(ShipStats::default());
    let (stop, rx) = watch::channel(false);
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, stats).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.stopped_partitions.lock().expect("lock").len() < starts.len() {
        assert!(Instant::now() < deadline, "partitions not stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop.send(true);
    task.await.expect("join").expect("shipper ok");
    let stopped = stats.stopped_partitions.lock().expect("lock").clone();
    for (p, start) in &starts {
        let first = shipped[&(topic.clone(), *p)];
        let said = format!("offsets {first}-{} are gone", start - 1);
        assert!(
            stopped.iter().any(|s| s.contains(&said)),
            "{said:?} in {stopped:?}"
        );
    }
    assert_eq!(
        stats
            .lost_offsets
            .load(std::sync::atomic::Ordering::Relaxed),
        lost as u64
    );
    let after = read_batches(&cfg).await;
    assert!(
        after
            .iter()
            .all(|(m, _)| m.last_offset < shipped[&(m.origin_topic.clone(), m.origin_partition)]),
        "a batch after the gap"
    );

    // The operator lists the gaps, accepts them, and shipping goes on after them.
    let table = ferry_schemas::TableId::new("public", "acct");
    let listed = ship::gaps(&cfg, &table, false).await.expect("gaps");
    assert_eq!(listed.len(), starts.len());
    let said = status(&db, &cfg);
    for g in &listed {
        let line = format!(
            "GAP [{}] offsets {}-{}: deleted by retention before they were shipped",
            g.partition, g.first, g.last
        );
        assert!(said.contains(&line), "{line:?} in {said}");
    }
    let accepted = ship::gaps(&cfg, &table, true).await.expect("accept");
    assert_eq!(accepted, listed);
    assert!(ship::gaps(&cfg, &table, false)
        .await
        .expect("gaps")
        .is_empty());
    let ms = ship_until_covered(&cfg, Arc::new(ShipStats::default())).await;
    let ends = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || origin_ends(&cfg, "public.acct"))
            .await
            .expect("task")
    };
    assert_exact_coverage(&ms, &ends);
    for g in &accepted {
        let (m, _) = ms
            .iter()
            .find(|(m, _)| m.origin_partition == g.partition && m.first_offset == g.first)
            .expect("the gap's batch");
        assert_eq!((m.last_offset, m.events_in, m.events_out), (g.last, 0, 0));
    }
    // Apply takes the empty batches like any other.
    let applied = crate::apply::apply_all(&cfg, ms.len() as u64).await;
    assert_eq!(
        applied
            .batches_quarantined_total
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // Ferry created the change topics with explicit settings, and `ferry check` shows them;
    // a retention shorter than configured is a warning.
    for (cfg, warned) in [(cfg.clone(), false), {
        let mut c = cfg.clone();
        c.topics.retention_ms = 14 * 24 * 3600 * 1000;
        (c, true)
    }] {
        let findings = ferry_pipeline::cli::check::run(&cfg).await;
        for name in ["origin topics", "destination topics"] {
            let f = findings
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("no {name} in {findings:?}"));
            assert!(f.detail.contains("delete, 7 d"), "{f:?}");
            assert_eq!(f.detail.contains("WARNING"), warned, "{f:?}");
        }
    }
    db.cleanup().await;
}

/// A configuration file for `db` with the shipper and apply groups (and the destination
/// database) of `cfg`.
fn config_file(db: &TestDb, cfg: &Config) -> std::path::PathBuf {
    let file = db.write_config(&std::env::temp_dir());
    let mut text = std::fs::read_to_string(&file).expect("config")
        + &format!(
            "\n[ship]\ngroup_id = \"{}\"\nmax_events = {}\nlinger_ms = {}\n[apply]\ngroup_id = \"{}\"\ninstance_id = \"{}\"\nexactly_once_topics = {}\n",
            cfg.ship.group_id,
            cfg.ship.max_events,
            cfg.ship.linger_ms,
            cfg.apply.group_id,
            cfg.apply.instance_id,
            cfg.apply.exactly_once_topics
        );
    if let Some(pg) = &cfg.destination.postgres {
        text += &format!(
            "[destination.postgres]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndatabase = \"{}\"\n",
            pg.host, pg.port, pg.user, pg.database
        );
    }
    std::fs::write(&file, text).expect("config");
    file
}

/// Starts `ferry <command>` with `config`, its log appended to `log`, aborting at `failpoint`
/// (`FERRY_FAILPOINT`) when given.
fn spawn_ferry(
    config: &std::path::Path,
    command: &str,
    log: &std::path::Path,
    failpoint: Option<&str>,
) -> std::process::Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.args(["--config", &config.to_string_lossy(), command])
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log"),
        );
    if let Some(f) = failpoint {
        c.env("FERRY_FAILPOINT", f);
    }
    c.spawn()
        .unwrap_or_else(|e| panic!("spawn ferry {command}: {e}"))
}

/// What `ferry status` prints for `db` with the shipper group of `cfg`.
fn status(db: &TestDb, cfg: &Config) -> String {
    let file = config_file(db, cfg);
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--config", &file.to_string_lossy(), "status"])
        .output()
        .expect("ferry status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes every record of the batch topic, as retention does after an outage of apply.
async fn delete_all_batches(cfg: &Config) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let admin: AdminClient<DefaultClientContext> = dest.client_config().create().expect("admin");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..cfg.ship.batch_partitions {
        tpl.add_partition_offset(&cfg.batch_topic(), p, rdkafka::Offset::End)
            .expect("offset");
    }
    let result = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("delete records");
    for e in result.elements() {
        assert!(e.error().is_ok(), "{e:?}");
    }
}

/// Retention deleted batches before apply applied them: apply stops those batch partitions
/// (never skipping), names the offsets, and goes on after them only once an operator accepted
/// the loss (`ferry accept-gap --batches --accept`, with apply stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_retention_deleted_stop_apply_until_accepted() {
    let db = TestDb::new("applygap").await;
    captured_workload(&db).await;
    let cfg = ship_config(&db);
    let ms = ship_until_covered(&cfg, Arc::new(ShipStats::default())).await;
    crate::apply::apply_all(&cfg, ms.len() as u64).await;

    // More batches, then an outage of apply longer than the batch topic's retention.
    let cap = start_capture(&db.cfg).await;
    db.exec("UPDATE acct SET balance = balance + 100").await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;
    ship_until_covered(&cfg, Arc::new(ShipStats::default())).await;
    delete_all_batches(&cfg).await;
    let gaps = ferry_pipeline::apply::batch_gaps(&cfg, false)
        .await
        .expect("gaps");
    assert!(!gaps.is_empty());

    // Apply stops exactly those partitions and applies nothing.
    let stats = Arc::new(ferry_pipeline::apply::ApplyStats::default());
    let (stop, rx) = watch::channel(false);
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { ferry_pipeline::apply::run(&cfg, rx, stats).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.stopped.lock().expect("lock").len() < gaps.len() {
        assert!(Instant::now() < deadline, "partitions not stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop.send(true);
    task.await.expect("join").expect("applier ok");
    let stopped = stats.stopped.lock().expect("lock").clone();
    for (p, first, last) in &gaps {
        let said = format!("[{p}] offsets {first}-{last}: deleted by retention");
        assert!(
            stopped.iter().any(|s| s.contains(&said)),
            "{said:?} in {stopped:?}"
        );
    }
    let lost: i64 = gaps.iter().map(|(_, f, l)| l - f + 1).sum();
    assert_eq!(
        stats
            .lost_batches
            .load(std::sync::atomic::Ordering::Relaxed),
        lost as u64
    );

    // `ferry status` names them.
    let said = status(&db, &cfg);
    for (p, first, last) in &gaps {
        let line = format!("[{p}] offsets {first}-{last}: batches deleted by retention");
        assert!(said.contains(&line), "{line:?} in {said}");
    }

    // Accepted, apply goes on after them.
    let accepted = ferry_pipeline::apply::batch_gaps(&cfg, true)
        .await
        .expect("accept");
    assert_eq!(accepted, gaps);
    assert!(ferry_pipeline::apply::batch_gaps(&cfg, false)
        .await
        .expect("gaps")
        .is_empty());
    db.cleanup().await;
}

/// `ferry apply` killed after the broker acknowledged a batch's replicated records, before the
/// destination database and the batch offset had it. With `apply.exactly_once_topics` (the
/// default) those records were in a transaction that never committed: a `read_committed`
/// consumer of the replicated topic sees every change exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_replicating_leaves_each_change_once_in_the_replicated_topic() {
    let (db, mut cfg) = acct_with_destination("applyeo").await;
    // A restarted applier of the same static member gets its partitions back at once.
    cfg.apply.instance_id = "apply-1".into();
    let ms = ship_until_covered(&cfg, Arc::new(ShipStats::default())).await;
    let rows: i64 = ms.iter().map(|(m, _)| m.events_out).sum();

    let file = config_file(&db, &cfg);
    let log = std::env::temp_dir().join(format!("{}-apply.log", db.name));
    let spawn = |failpoint: Option<&str>| spawn_ferry(&file, "apply", &log, failpoint);
    let mut crashing = spawn(Some("apply.after_replicate:3"));
    let status = tokio::task::spawn_blocking(move || crashing.wait())
        .await
        .expect("task")
        .expect("wait");
    assert!(!status.success(), "the failpoint should have aborted apply");

    let mut child = spawn(None);
    let dest = cfg.destination.postgres.clone().expect("destination");
    let session = dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n: i64 = session
            .query_one("SELECT count(*) FROM ferry.applied_batches", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n == ms.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of {} batches applied",
            ms.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = child.kill();
    let _ = child.wait();

    let cluster = Cluster::new("destination", cfg.destination.kafka.clone());
    let topic = format!("{}.public.acct", cfg.capture.topic_prefix);
    let prefix = cfg.capture.topic_prefix.clone();
    let changes = tokio::task::spawn_blocking(move || {
        let mut decoder = inspect::Decoder::load(&cluster, &prefix, None).expect("schemas");
        inspect::read_all(&cluster, &topic, usize::MAX)
            .expect("replicated topic")
            .into_iter()
            .filter_map(|(_, _, _, v)| v)
            .map(|v| {
                let v = decoder.decode(&v).expect("decodes");
                (
                    v["source"]["lsn"].as_i64().expect("lsn"),
                    v["source"]["seq"].as_i64().expect("seq"),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("task");
    let unique: HashSet<_> = changes.iter().collect();
    assert_eq!(
        (changes.len(), unique.len()),
        (rows as usize, rows as usize),
        "records in the replicated topic, distinct changes, rows shipped"
    );
    db.cleanup().await;
}

/// A shipper stalled past its session (SIGSTOP) while another took its partitions over and
/// shipped them: resumed (SIGCONT), it must not ship its stale buffers. Its commit of where the
/// batch starts fails (the group moved on), so it drops them instead: every range is shipped
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shipper_that_lost_its_partitions_ships_nothing_of_them() {
    let db = TestDb::new("shipzombie").await;
    captured_workload(&db).await;
    let mut cfg = ship_config(&db);
    cfg.ship.max_events = 100_000;
    cfg.ship.linger_ms = 8000;
    let file = config_file(&db, &cfg);
    let text = std::fs::read_to_string(&file)
        .expect("config")
        .replace("[apply]", "session_timeout_ms = 6000\n[apply]");
    std::fs::write(&file, text).expect("config");
    let log = std::env::temp_dir().join(format!("{}-ship.log", db.name));
    let spawn = || spawn_ferry(&file, "ship", &log, None);
    let signal = |pid: u32, sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    // A joins and buffers everything (it would ship after 8 s of linger), then stalls.
    let mut a = spawn();
    tokio::time::sleep(Duration::from_secs(5)).await;
    signal(a.id(), "-STOP");
    // B takes the partitions over once A's session expired, and ships them.
    let mut b = spawn();
    let shipped = wait_covered(&cfg, "public.acct", Duration::from_secs(90)).await;
    // A comes back with its stale buffers, its linger long over.
    signal(a.id(), "-CONT");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let _ = a.kill();
    let _ = b.kill();
    let _ = a.wait();
    let _ = b.wait();
    let all = read_batches(&cfg).await;
    let ends = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || origin_ends(&cfg, "public.acct"))
            .await
            .expect("task")
    };
    assert!(!shipped.is_empty());
    assert_exact_coverage(&all, &ends);
    db.cleanup().await;
}

/// Deletes `topic` from the origin cluster and creates it again with `partitions`, as an
/// operator migrating it does.
async fn recreate_topic(cfg: &Config, topic: &str, partitions: i32) {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    crate::support::delete_topic(&origin, topic).await;
    crate::support::create_topic(&origin, topic, partitions, false).await;
}

/// `ferry verify` of `public.acct` finds nothing different.
async fn assert_acct_verifies(cfg: &Config) {
    let dest = cfg.destination.postgres.clone().expect("destination");
    let table = ferry_schemas::TableId::new("public", "acct");
    let report = ferry_pipeline::verify::verify(&cfg.origin.postgres, &dest, &table)
        .await
        .expect("verify");
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
}

/// The batches of the origin topic's incarnation `n` that carry changes (not the empty batch
/// an accepted recreation ships).
fn of_incarnation(ms: &[(Manifest, Vec<u8>)], n: u32) -> Vec<(Manifest, Vec<u8>)> {
    ms.iter()
        .filter(|(m, _)| ship::incarnation_of(&m.batch_id) == n && m.events_in > 0)
        .cloned()
        .collect()
}

/// An origin topic deleted and created again under a running shipper starts its offsets
/// over. Shipping on from the old topic's end would skip the new records; the shipper stops
/// those partitions instead, naming the cause, until an operator accepts. Then it ships the new
/// topic from its first offset under new batch ids (`…/<topic>@1/…`), which apply takes as new
/// batches: the destination equals the origin. With another partition count (the group
/// rebalances) and with the same one (the consumer's position just goes back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_topic_created_again_stops_until_accepted_then_ships_whole() {
    for partitions in [2, 3] {
        topic_created_again(partitions).await;
    }
}

async fn topic_created_again(partitions: i32) {
    let (db, cfg) = acct_with_destination(&format!("shiprecreate{partitions}")).await;
    let topic = format!("{}.public.acct", cfg.capture.topic_prefix);
    let stats = Arc::new(ShipStats::default());
    let (stop, rx) = watch::channel(false);
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, stats).await })
    };
    let old = wait_covered(&cfg, "public.acct", Duration::from_secs(90)).await;
    let old_end = old
        .iter()
        .map(|(m, _)| m.last_offset)
        .max()
        .expect("batches");

    // Under the running shipper: the topic goes, comes back (with `partitions`; it had 3), and
    // capture writes new changes into it, more than the old topic had per partition.
    assert_eq!(cfg.capture.partitions, 3);
    recreate_topic(&cfg, &topic, partitions).await;
    let cap = start_capture(&db.cfg).await;
    for _ in 0..4 {
        db.exec("UPDATE acct SET balance = balance + 100").await;
    }
    db.exec("DELETE FROM acct WHERE id % 10 = 3; INSERT INTO acct VALUES (5000, 'new', 1)")
        .await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while stats.stopped_partitions.lock().expect("lock").len() < partitions as usize {
        assert!(
            Instant::now() < deadline,
            "partitions not stopped: {:?}",
            stats.stopped_partitions.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop.send(true);
    task.await.expect("join").expect("shipper ok");
    let stopped = stats.stopped_partitions.lock().expect("lock").clone();
    assert!(
        stopped
            .iter()
            .all(|s| s.contains("deleted and created again") && s.contains("accept-gap")),
        "{stopped:?}"
    );
    assert_eq!(
        stats
            .recreated_partitions
            .load(std::sync::atomic::Ordering::Relaxed),
        partitions as u64
    );
    let after = read_batches(&cfg).await;
    assert_eq!(after.len(), old.len(), "nothing of the new topic shipped");

    // A restarted shipper stops there too; `ferry status` and `ferry accept-gap` say why.
    let table = ferry_schemas::TableId::new("public", "acct");
    let listed = ship::gaps(&cfg, &table, false).await.expect("gaps");
    assert_eq!(listed.len(), partitions as usize, "{listed:?}");
    assert!(listed
        .iter()
        .all(|g| g.kind == ship::GapKind::Recreated && g.first == 0 && g.incarnation == 0));
    let said = status(&db, &cfg);
    for g in &listed {
        let line = format!(
            "GAP [{}] the topic was deleted and created again since it was shipped from",
            g.partition
        );
        assert!(said.contains(&line), "{line:?} in {said}");
    }
    let accepted = ship::gaps(&cfg, &table, true).await.expect("accept");
    assert_eq!(accepted, listed);
    let left = ship::gaps(&cfg, &table, false).await.expect("gaps");
    assert!(left.is_empty(), "{left:?}");

    // The new topic is shipped whole, once, as incarnation 1.
    let stats = Arc::new(ShipStats::default());
    let (stop, rx) = watch::channel(false);
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, stats).await })
    };
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let ends: BTreeMap<(String, i32), i64> = (0..partitions)
        .map(|p| {
            let tp = ferry_connectors::kafka::TopicPartition::new(&topic, p);
            let (_, high) = origin.watermarks(&tp).expect("marks").expect("partition");
            ((topic.clone(), p), high)
        })
        .collect();
    assert!(
        ends.values().any(|high| *high > old_end),
        "the new topic should reach past the old one's end: {ends:?} vs {old_end}"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let all = loop {
        let all = read_batches(&cfg).await;
        let cov = coverage(&of_incarnation(&all, 1));
        if ends
            .iter()
            .all(|(tp, high)| cov.get(tp).and_then(|r| r.last()).map(|r| r.1 + 1) == Some(*high))
        {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "not covered: {cov:?} vs {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = stop.send(true);
    task.await.expect("join").expect("shipper ok");
    let new = of_incarnation(&all, 1);
    assert_exact_coverage(&new, &ends);
    // A batch of the old topic cannot be shipped again: its records are gone.
    let e = ship::reship(&cfg, &old[0].0.batch_id)
        .await
        .expect_err("the old topic's batch");
    assert!(e.to_string().contains("deleted and created"), "{e}");
    assert!(new
        .iter()
        .all(|(m, _)| m.batch_id.starts_with(&format!("origin/{topic}@1/"))));

    // Apply takes both incarnations' batches (and the empty ones), each id once: a shipper
    // that retried (the topic vanished under it) may have produced a range again under its
    // id. Origin = destination.
    let ids: HashSet<&str> = all.iter().map(|(m, _)| m.batch_id.as_str()).collect();
    let applied = crate::apply::apply_all(&cfg, all.len() as u64).await;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (
            count(&applied.batches_applied_total),
            count(&applied.batches_duplicate_total),
            count(&applied.batches_quarantined_total)
        ),
        (ids.len() as u64, (all.len() - ids.len()) as u64, 0)
    );
    assert_acct_verifies(&cfg).await;
    db.cleanup().await;
}

/// A destination schema topic that cannot be read proves nothing against a batch: with
/// `apply.on_corrupt = "quarantine"`, nothing may be quarantined (that would commit past the
/// batch, its rows never applied). While the topic is gone, apply retries; once it is back but
/// lacks the batch's schema, that batch partition stops there, named. Once the schema is back
/// (a restarted shipper publishes each schema it ships again), apply applies everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_schema_is_missing_is_never_quarantined() {
    use std::sync::atomic::Ordering::Relaxed;
    let (db, mut cfg) = acct_with_destination("schemagone").await;
    cfg.apply.on_corrupt = ferry_pipeline::config::OnCorrupt::Quarantine;
    ship_until_covered(&cfg, Arc::new(ShipStats::default())).await;

    let schemas = ferry_pipeline::topics::schema_topic(&cfg.capture.topic_prefix);
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    crate::support::delete_topic(&dest, &schemas).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run_apply = |secs: u64| {
        let cfg = cfg.clone();
        async move {
            let stats = Arc::new(ferry_pipeline::apply::ApplyStats::default());
            let (stop, rx) = watch::channel(false);
            let task = {
                let (cfg, stats) = (cfg.clone(), stats.clone());
                tokio::spawn(async move { ferry_pipeline::apply::run(&cfg, rx, stats).await })
            };
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let _ = stop.send(true);
            task.await.expect("join").expect("applier ok");
            stats
        }
    };
    // The topic gone: apply retries (the outage of a broker's topic), quarantines nothing.
    let stats = run_apply(8).await;
    assert_eq!(stats.batches_quarantined_total.load(Relaxed), 0);
    assert_eq!(stats.batches_applied_total.load(Relaxed), 0);
    assert!(stats.stopped.lock().expect("lock").is_empty());

    // Back, but empty: the batch partitions stop at their first batch.
    crate::support::create_topic(&dest, &schemas, 1, true).await;
    let stats = Arc::new(ferry_pipeline::apply::ApplyStats::default());
    let (stop, rx) = watch::channel(false);
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { ferry_pipeline::apply::run(&cfg, rx, stats).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.stopped.lock().expect("lock").is_empty() {
        assert!(Instant::now() < deadline, "no partition stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(true);
    task.await.expect("join").expect("applier ok");
    let stopped = stats.stopped.lock().expect("lock").clone();
    assert!(
        stopped
            .iter()
            .all(|s| s.contains("which the destination schema topic lacks")),
        "{stopped:?}"
    );
    assert_eq!(stats.batches_quarantined_total.load(Relaxed), 0);
    assert_eq!(stats.batches_applied_total.load(Relaxed), 0);

    // More changes: a new shipper publishes the schema again with them; apply takes it all.
    let cap = start_capture(&db.cfg).await;
    db.exec("UPDATE acct SET balance = balance + 1 WHERE id < 50")
        .await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;
    let ms = ship_until_covered(&cfg, Arc::new(ShipStats::default())).await;
    let applied = crate::apply::apply_all(&cfg, ms.len() as u64).await;
    assert_eq!(applied.batches_quarantined_total.load(Relaxed), 0);
    assert_eq!(applied.batches_applied_total.load(Relaxed), ms.len() as u64);
    assert_acct_verifies(&cfg).await;
    db.cleanup().await;
}
