//! Apply in the destination: end-to-end equality, idempotent re-application in any order, and
//! corruption caught before anything is applied.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use ferry_connectors::postgres::{PgConfig, Session};
use ferry_pipeline::apply::{self, ApplyStats, DestDb};
use ferry_pipeline::config::{Config, OnCorrupt};
use ferry_pipeline::inspect;
use ferry_pipeline::ship::{self, Registry, ShipStats};
use ferry_schemas::manifest::{self, Manifest};
use rand::{Rng, SeedableRng};
use rdkafka::producer::FutureRecord;
use tokio::sync::watch;

use crate::support::{drop_db, start_capture, TestDb};

pub(crate) async fn dest_db(db: &TestDb, suffix: &str) -> PgConfig {
    let admin = PgConfig {
        database: "postgres".into(),
        ..db.cfg.origin.postgres.clone()
    };
    let a = admin.connect().await.expect("admin");
    let name = format!("{}_{suffix}", db.name);
    a.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .expect("drop old destination database");
    a.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create destination database");
    PgConfig {
        database: name,
        ..db.cfg.origin.postgres.clone()
    }
}

/// md5 over the table's rows in key order, Ferry's bookkeeping columns left out.
async fn table_hash(s: &Session, table: &str) -> (i64, String) {
    let row = s
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t.id)), '') \
                 FROM (SELECT id, owner, balance, note FROM {table}) t"
            ),
            &[],
        )
        .await
        .expect("hash");
    (row.get(0), row.get(1))
}

fn all_batches(cfg: &Config) -> Vec<Vec<u8>> {
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    inspect::read_all(&dest, &cfg.batch_topic(), usize::MAX)
        .expect("batch topic")
        .into_iter()
        .filter_map(|(_, _, _, v)| v)
        .collect()
}

async fn run_until<F: Fn() -> bool, W: Fn() -> String>(what: W, timeout: Duration, done: F) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{} did not finish in {timeout:?}",
            what()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn apply_all(cfg: &Config, expected: u64) -> Arc<ApplyStats> {
    let (stop, rx) = watch::channel(false);
    let stats = Arc::new(ApplyStats::default());
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { apply::run(&cfg, rx, stats).await })
    };
    let s = stats.clone();
    let s2 = stats.clone();
    let what = move || {
        format!(
            "apply (applied {}, duplicate {}, quarantined {}, stopped {:?})",
            s2.batches_applied_total.load(Ordering::Relaxed),
            s2.batches_duplicate_total.load(Ordering::Relaxed),
            s2.batches_quarantined_total.load(Ordering::Relaxed),
            s2.stopped.lock().map(|v| v.clone()).unwrap_or_default()
        )
    };
    run_until(what, Duration::from_secs(120), move || {
        s.batches_applied_total.load(Ordering::Relaxed)
            + s.batches_duplicate_total.load(Ordering::Relaxed)
            + s.batches_quarantined_total.load(Ordering::Relaxed)
            >= expected
    })
    .await;
    let _ = stop.send(true);
    task.await.expect("join").expect("applier ok");
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_equal_idempotent_and_corruption_is_caught() {
    let mut db = TestDb::new("apply").await;
    db.exec("CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int, note text)")
        .await;
    let dest = dest_db(&db, "dest").await;
    db.cfg.destination.postgres = Some(dest.clone());
    db.cfg.ship.group_id = format!("{}_ship", db.name);
    db.cfg.ship.instance_id = "ship-1".into();
    db.cfg.ship.max_events = 200;
    db.cfg.ship.linger_ms = 200;
    db.cfg.apply.group_id = format!("{}_apply", db.name);
    db.cfg.apply.on_corrupt = OnCorrupt::Quarantine;

    // A random mixed workload in transactions, some rows touched many times.
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for _ in 0..60 {
        let mut sql = String::from("BEGIN;");
        for _ in 0..rng.random_range(1..8) {
            let id = rng.random_range(1..300);
            match rng.random_range(0..10) {
                0..=3 => sql.push_str(&format!(
                    "INSERT INTO acct VALUES ({id}, 'o{id}', {}, NULL) ON CONFLICT (id) DO UPDATE SET balance = acct.balance + 1;",
                    rng.random_range(0..100)
                )),
                4..=7 => sql.push_str(&format!(
                    "UPDATE acct SET balance = balance + {}, note = 'n{}' WHERE id = {id};",
                    rng.random_range(1..5),
                    rng.random_range(0..1000)
                )),
                _ => sql.push_str(&format!("DELETE FROM acct WHERE id = {id};")),
            }
        }
        sql.push_str("COMMIT;");
        db.exec(&sql).await;
    }
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;

    // Ship everything.
    let (stop, rx) = watch::channel(false);
    let ship_stats = Arc::new(ShipStats::default());
    let task = {
        let (cfg, stats) = (db.cfg.clone(), ship_stats.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, stats).await })
    };
    let origin_events = db.events("public.acct").await.len() as u64;
    let s = ship_stats.clone();
    run_until(
        || "ship".to_string(),
        Duration::from_secs(120),
        move || s.total().events_in >= origin_events,
    )
    .await;
    let _ = stop.send(true);
    task.await.expect("join").expect("shipper ok");
    let batches = {
        let cfg = db.cfg.clone();
        tokio::task::spawn_blocking(move || all_batches(&cfg))
            .await
            .expect("task")
    };
    let n = batches.len() as u64;
    assert!(n >= 2, "want several batches, got {n}");

    // Apply: destination equals origin.
    let stats = apply_all(&db.cfg, n).await;
    assert_eq!(stats.batches_applied_total.load(Ordering::Relaxed), n);
    let dest_session = dest.connect().await.expect("dest");
    let origin_hash = table_hash(&db.session, "acct").await;
    assert_eq!(table_hash(&dest_session, "public.acct").await, origin_hash);
    let report = ferry_pipeline::verify::verify(
        &db.cfg.origin.postgres,
        &dest,
        &ferry_schemas::TableId::new("public", "acct"),
    )
    .await
    .expect("verify");
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);

    // Lineage names the batch and position that last wrote a row.
    let some_id: i32 = db
        .session
        .query_one("SELECT min(id) FROM acct", &[])
        .await
        .expect("row")
        .get(0);
    let lineage = apply::lineage(
        &dest,
        &ferry_schemas::TableId::new("public", "acct"),
        &some_id.to_string(),
    )
    .await
    .expect("lineage");
    assert!(
        lineage.contains("last written by batch origin/") && lineage.contains("source LSN"),
        "{lineage}"
    );

    // Applying everything again (a new consumer group re-reads the topic) changes nothing.
    db.cfg.apply.group_id = format!("{}_apply_again", db.name);
    let again = apply_all(&db.cfg, n).await;
    assert_eq!(again.batches_duplicate_total.load(Ordering::Relaxed), n);
    assert_eq!(table_hash(&dest_session, "public.acct").await, origin_hash);

    // Applying the batches in reverse order into a fresh database gives the same table.
    let dest2 = dest_db(&db, "dest2").await;
    let mut registry = Registry::new(
        Cluster::new("destination", db.cfg.destination.kafka.clone()),
        &db.cfg.capture.topic_prefix,
    );
    let mut fresh = DestDb::connect(&dest2).await.expect("dest2");
    let scratch = ApplyStats::default();
    for value in batches.iter().rev() {
        let (m, _) = manifest::unframe(value).expect("clean");
        for fp in &m.schema_fingerprints {
            tokio::task::block_in_place(|| registry.get(fp)).expect("registry");
        }
        let (m, runs) =
            apply::verify(value, |fp| registry.cached(fp)).expect("clean batch verifies");
        assert!(fresh.apply(&m, &runs, &scratch).await.expect("applies"));
        assert!(
            !fresh.apply(&m, &runs, &scratch).await.expect("re-applies"),
            "second time is a no-op"
        );
    }
    let s2 = dest2.connect().await.expect("dest2");
    assert_eq!(
        table_hash(&s2, "public.acct").await,
        origin_hash,
        "reverse order gives the same table"
    );

    // Corruption: ≥ 1,000 mutated batches, every one refused by verification; no false alarm.
    let schema_of = |fp: &str| registry.cached(fp);
    let mut caught = 0;
    let mut mutations = 0;
    for value in &batches {
        assert!(
            apply::verify(value, schema_of).is_ok(),
            "false alarm on a clean batch"
        );
        let (m, payload) = manifest::unframe(value).expect("clean");
        let alter: [fn(&mut Manifest); 12] = [
            |m| m.events_out += 1,
            |m| m.events_out -= 1,
            |m| m.table = "public.other".into(),
            |m| m.first_offset += 1,
            |m| m.crc32 ^= 1,
            |m| m.payload_bytes += 1,
            |m| m.uncompressed_bytes += 1,
            |m| m.uncompressed_bytes -= 1,
            |m| m.max_lsn = m.min_lsn - 1,
            |m| m.codec = "parquet".into(),
            |m| m.kind = "aggregate:x".into(),
            |m| m.schema_fingerprints = vec!["0000000000000000".into()],
        ];
        for f in &alter {
            let mut bad = m.clone();
            f(&mut bad);
            let framed = manifest::frame(&bad, payload).expect("frame");
            mutations += 1;
            caught += usize::from(apply::verify(&framed, schema_of).is_err());
        }
        for _ in 0..(1_100 / batches.len()).max(100) {
            let mut bad = value.clone();
            match rng.random_range(0..3) {
                0 => {
                    let bit = rng.random_range(0..bad.len() * 8);
                    bad[bit / 8] ^= 1 << (bit % 8);
                }
                1 => {
                    for _ in 0..rng.random_range(2..10) {
                        let i = rng.random_range(0..bad.len());
                        bad[i] = rng.random();
                    }
                    if bad == *value {
                        continue;
                    }
                }
                _ => bad.truncate(rng.random_range(0..bad.len())),
            }
            mutations += 1;
            caught += usize::from(apply::verify(&bad, schema_of).is_err());
        }
    }
    assert!(mutations >= 1_000, "only {mutations} mutations");
    assert_eq!(caught, mutations, "every corrupted batch is caught");

    // Corrupted records injected into the batch topic are quarantined and nothing is applied.
    let producer = Cluster::new("destination", db.cfg.destination.kafka.clone())
        .producer(5)
        .expect("producer");
    let mut bad = batches[0].clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    for (i, v) in [bad, b"not a batch".to_vec()].iter().enumerate() {
        producer
            .send(
                FutureRecord::to(&db.cfg.batch_topic())
                    .key(&format!("junk-{i}"))
                    .payload(v)
                    .partition(0),
                Duration::from_secs(30),
            )
            .await
            .expect("inject");
    }
    db.cfg.apply.group_id = format!("{}_apply", db.name); // resumes after the clean batches
    let q = apply_all(&db.cfg, 2).await;
    assert_eq!(q.batches_quarantined_total.load(Ordering::Relaxed), 2);
    assert_eq!(q.batches_applied_total.load(Ordering::Relaxed), 0);
    assert_eq!(table_hash(&dest_session, "public.acct").await, origin_hash);
    let quarantined = {
        let cfg = db.cfg.clone();
        tokio::task::spawn_blocking(move || {
            inspect::read_all(
                &Cluster::new("destination", cfg.destination.kafka.clone()),
                &cfg.quarantine_topic(),
                usize::MAX,
            )
            .expect("quarantine topic")
            .len()
        })
        .await
        .expect("task")
    };
    assert_eq!(quarantined, 2);

    // A batch topic whose only copy of one batch is corrupt: apply (on_corrupt = stop) would
    // stop there; `ferry reship` re-ships that origin range under the same id, and apply then
    // carries on past the corrupt copy and ends equal to the origin.
    let dest3 = dest_db(&db, "dest3").await;
    let mut cfg3 = db.cfg.clone();
    cfg3.ship.batch_topic = format!("{}.batches2", db.cfg.capture.topic_prefix);
    cfg3.destination.postgres = Some(dest3.clone());
    cfg3.apply.group_id = format!("{}_apply3", db.name);
    cfg3.apply.on_corrupt = OnCorrupt::Stop;
    Cluster::new("destination", cfg3.destination.kafka.clone())
        .ensure_topics(&[ferry_connectors::kafka::TopicSpec {
            name: cfg3.batch_topic(),
            partitions: cfg3.ship.batch_partitions,
            config: vec![],
        }])
        .await
        .expect("topic");
    let victim = manifest::unframe(&batches[0]).expect("clean").0;
    for v in &batches {
        let (m, _) = manifest::unframe(v).expect("clean");
        let mut v = v.clone();
        if m.batch_id == victim.batch_id {
            let at = v.len() - 3;
            v[at] ^= 0x10;
        }
        let p = ship::batch_partition(
            &m.origin_topic,
            m.origin_partition,
            cfg3.ship.batch_partitions,
        );
        producer
            .send(
                FutureRecord::to(&cfg3.batch_topic())
                    .key(&m.batch_id)
                    .payload(&v)
                    .partition(p),
                Duration::from_secs(30),
            )
            .await
            .expect("copy");
    }
    let (events_in, _) = ship::reship(&cfg3, &victim.batch_id).await.expect("reship");
    assert_eq!(
        events_in as i64, victim.events_in,
        "reship covers exactly the batch's range"
    );
    let st = apply_all(&cfg3, n + 1).await;
    assert_eq!(st.batches_quarantined_total.load(Ordering::Relaxed), 1);
    assert_eq!(st.batches_applied_total.load(Ordering::Relaxed), n);
    let s3 = dest3.connect().await.expect("dest3");
    assert_eq!(
        table_hash(&s3, "public.acct").await,
        origin_hash,
        "reship closed the gap"
    );

    drop(dest_session);
    drop(s2);
    drop(s3);
    drop(fresh);
    drop_db(&dest).await;
    drop_db(&dest2).await;
    drop_db(&dest3).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_drift_and_repair_fixes_it() {
    let mut db = TestDb::new("verify").await;
    db.exec(
        "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int, note text);
         INSERT INTO acct SELECT g, 'o' || g, g, NULL FROM generate_series(1, 300) g;",
    )
    .await;
    let dest = dest_db(&db, "dest").await;
    db.cfg.destination.postgres = Some(dest.clone());
    db.cfg.ship.group_id = format!("{}_ship", db.name);
    db.cfg.ship.instance_id = "ship-1".into();
    db.cfg.ship.linger_ms = 200;
    db.cfg.apply.group_id = format!("{}_apply", db.name);
    db.cfg.apply.instance_id = "apply-1".into();

    // The whole pipeline runs: capture, ship and apply.
    let cap = start_capture(&db.cfg).await;
    let (stop, rx) = watch::channel(false);
    let ship_task = {
        let cfg = db.cfg.clone();
        let rx = rx.clone();
        tokio::spawn(async move { ship::run(&cfg, rx, Arc::new(ShipStats::default())).await })
    };
    let apply_task = {
        let cfg = db.cfg.clone();
        tokio::spawn(async move { apply::run(&cfg, rx, Arc::new(ApplyStats::default())).await })
    };
    let table = ferry_schemas::TableId::new("public", "acct");
    let until_equal = |what: &'static str| {
        let (o, d, t) = (db.cfg.origin.postgres.clone(), dest.clone(), table.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if let Ok(r) = ferry_pipeline::verify::verify(&o, &d, &t).await {
                    if r.mismatches.is_empty() {
                        return;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: destination never matched"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    until_equal("initial sync").await;
    db.exec("UPDATE acct SET balance = balance + 1000 WHERE id <= 10")
        .await;
    until_equal("live changes").await;

    // Drift behind Ferry's back in the destination.
    let d = dest.connect().await.expect("dest");
    d.batch_execute(
        "UPDATE public.acct SET balance = -1 WHERE id = 5;
         DELETE FROM public.acct WHERE id = 6;
         INSERT INTO public.acct VALUES (9999, 'ghost', 0, NULL, 0, 0, 'none', 0, 0);",
    )
    .await
    .expect("tamper");
    let report = ferry_pipeline::verify::verify(&db.cfg.origin.postgres, &dest, &table)
        .await
        .expect("verify");
    let found: Vec<(String, String)> = report
        .mismatches
        .iter()
        .map(|m| (m.key.join(","), m.kind.to_string()))
        .collect();
    assert_eq!(
        found,
        vec![
            ("5".to_string(), "differs".to_string()),
            ("6".to_string(), "missing in destination".to_string()),
            ("9999".to_string(), "extra in destination".to_string())
        ]
    );
    ferry_pipeline::verify::request_repair(&db.cfg, &table, &report.mismatches)
        .await
        .expect("repair");
    until_equal("repair").await;

    // Replaying the whole topic (from time 0) re-ships every range under its old id: the
    // destination skips them all, and a second run of the same job has nothing left to do.
    let spec = ferry_pipeline::jobs::replay::Spec {
        topic: format!("{}.public.acct", db.cfg.capture.topic_prefix),
        partition: None,
        from: ferry_pipeline::jobs::replay::Bound::TimeMs(0),
        to: None,
        job: "replay-all".into(),
        max_events_per_sec: 1e6,
        max_bytes_per_sec: None,
    };
    let never = watch::channel(false).1;
    let r = ferry_pipeline::jobs::replay::run(&db.cfg, &spec, never.clone(), |_| {})
        .await
        .expect("replay");
    assert!(r.batches > 0 && r.events > 0, "{r:?}");
    assert_eq!(
        r.reused_ids, r.batches,
        "every replayed range keeps its batch id"
    );
    let again = ferry_pipeline::jobs::replay::run(&db.cfg, &spec, never, |_| {})
        .await
        .expect("replay again");
    assert_eq!(again.batches, 0, "the job resumes at its checkpoint: done");
    until_equal("after replay").await;

    let _ = stop.send(true);
    ship_task.await.expect("join").expect("shipper ok");
    apply_task.await.expect("join").expect("applier ok");
    cap.stop().await;
    drop(d);
    drop_db(&dest).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_under_live_updates_ends_equal() {
    let mut db = TestDb::new("backfill").await;
    db.exec(
        "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int, note text);
         INSERT INTO acct SELECT g, 'o' || g, 0, NULL FROM generate_series(1, 3000) g;",
    )
    .await;
    let dest = dest_db(&db, "dest").await;
    db.cfg.destination.postgres = Some(dest.clone());
    // Existing rows are not snapshotted: only the backfill brings them over.
    db.cfg.capture.snapshot = false;
    db.cfg.backfill.min_rows_per_sec = 1_000.0;
    db.cfg.ship.group_id = format!("{}_ship", db.name);
    db.cfg.ship.instance_id = "ship-1".into();
    db.cfg.ship.linger_ms = 200;
    db.cfg.apply.group_id = format!("{}_apply", db.name);
    db.cfg.apply.instance_id = "apply-1".into();

    let cap = start_capture(&db.cfg).await;
    let (stop, rx) = watch::channel(false);
    let ship_task = {
        let (cfg, rx) = (db.cfg.clone(), rx.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, Arc::new(ShipStats::default())).await })
    };
    let apply_task = {
        let cfg = db.cfg.clone();
        tokio::spawn(async move { apply::run(&cfg, rx, Arc::new(ApplyStats::default())).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Live writers keep changing rows the backfill is reading.
    let writer_db = db.cfg.origin.postgres.clone();
    let writer = tokio::spawn(async move {
        let s = writer_db.connect().await.expect("writer");
        for round in 1..=60 {
            s.batch_execute(&format!(
                "UPDATE acct SET balance = balance + 1, note = 'r{round}' WHERE id % 50 = {m};
                 DELETE FROM acct WHERE id = {d};
                 INSERT INTO acct VALUES ({i}, 'late', {round}, NULL);",
                m = round % 50,
                d = round * 37,
                i = 5_000 + round
            ))
            .await
            .expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let table = ferry_schemas::TableId::new("public", "acct");
    let (job, total) = ferry_pipeline::jobs::backfill::request_backfill(
        &db.cfg,
        &table,
        None,
        Some(200),
        Some("bf1".into()),
    )
    .await
    .expect("backfill requested");
    assert!(total >= 2_900, "{total}");
    writer.await.expect("writer");

    // The job finishes (its state says so) …
    crate::support::wait_backfill_done(&db.cfg, &job, Duration::from_secs(120)).await;
    // … and the destination ends equal to the origin.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = ferry_pipeline::verify::verify(&db.cfg.origin.postgres, &dest, &table).await;
        if r.as_ref().is_ok_and(|r| r.mismatches.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "destination never matched: {:?}",
            r.map(|r| r.mismatches.len())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = stop.send(true);
    ship_task.await.expect("join").expect("shipper ok");
    apply_task.await.expect("join").expect("applier ok");
    cap.stop().await;
    drop_db(&dest).await;
    db.cleanup().await;
}

/// Applied batch ids and tombstones older than the horizon (twice the topics' retention by
/// default) are pruned; newer ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookkeeping_older_than_the_horizon_is_pruned() {
    let db = TestDb::new("prune").await;
    let pg = dest_db(&db, "dst").await;
    let mut dest = DestDb::connect(&pg).await.expect("destination");
    let s = pg.connect().await.expect("session");
    s.batch_execute(
        "INSERT INTO ferry.applied_batches (batch_id, origin_topic, origin_partition, first_offset, last_offset, rows, applied_at)
           VALUES ('old', 't', 0, 0, 1, 1, now() - interval '30 days'), ('new', 't', 0, 2, 3, 1, now());
         INSERT INTO ferry.tombstones (tbl, key, lsn, seq, batch, at)
           VALUES ('public.t', '1', 1, 0, 'old', now() - interval '30 days'), ('public.t', '2', 2, 0, 'new', now());",
    )
    .await
    .expect("bookkeeping");
    let mut cfg = db.cfg.clone();
    let horizon = cfg.bookkeeping_horizon().expect("a horizon by default");
    assert_eq!(horizon, Duration::from_secs(14 * 86_400));
    assert_eq!(dest.prune(horizon).await.expect("prune"), (1, 1));
    let left: Vec<String> = s
        .query(
            "SELECT batch_id FROM ferry.applied_batches UNION ALL SELECT key FROM ferry.tombstones ORDER BY 1",
            &[],
        )
        .await
        .expect("left")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["2", "new"]);
    cfg.topics.retention_ms = -1;
    assert_eq!(
        cfg.bookkeeping_horizon(),
        None,
        "kept for ever with the topics"
    );
    cfg.apply.bookkeeping_ms = 3_600_000;
    assert_eq!(cfg.bookkeeping_horizon(), Some(Duration::from_secs(3600)));
    drop_db(&pg).await;
    db.cleanup().await;
}
