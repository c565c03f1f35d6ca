//! Kill -9 of the capture process mid-stream, repeatedly: after a final restart every change is
//! in the topic (checked per primary key and per-row version), duplicates only.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::TestDb;

fn spawn_capture(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--config", &config.to_string_lossy(), "capture"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn ferry capture")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    let db = TestDb::new("crash").await;
    db.exec(
        "CREATE TABLE item (id int PRIMARY KEY, version int NOT NULL);
         INSERT INTO item SELECT g, 1 FROM generate_series(1, 200) g;",
    )
    .await;
    let dir = std::env::temp_dir();
    let config = db.write_config(&dir);
    let log = dir.join(format!("{}.log", db.name));
    let mut child = spawn_capture(&config, &log);

    // A writer bumps versions in small transactions while capture is killed and restarted.
    let writer_db = db.cfg.origin.postgres.clone();
    let writer = tokio::spawn(async move {
        let s = writer_db.connect().await.expect("writer connects");
        for round in 0..60 {
            let sql = format!(
                "BEGIN; UPDATE item SET version = version + 1 WHERE id % 10 = {}; \
                 UPDATE item SET version = version + 1 WHERE id % 7 = {}; COMMIT;",
                round % 10,
                round % 7
            );
            s.batch_execute(&sql).await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(400 + 300 * i)).await;
        child.kill().expect("SIGKILL"); // kill -9: no graceful stop
        let _ = child.wait();
        child = spawn_capture(&config, &log);
    }
    writer.await.expect("writer");
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(90)).await;
    child.kill().expect("stop");
    let _ = child.wait();

    let final_versions: BTreeMap<i64, i64> = db
        .session
        .query("SELECT id::int8, version::int8 FROM item", &[])
        .await
        .expect("read table")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let events = db.events("public.item").await;
    let mut seen: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    let mut copies: BTreeMap<(i64, i64), usize> = BTreeMap::new();
    for e in &events {
        let id = e["after"]["id"].as_i64().expect("id");
        let v = e["after"]["version"].as_i64().expect("version");
        seen.entry(id).or_default().insert(v);
        *copies.entry((id, v)).or_default() += 1;
    }
    for (id, last) in &final_versions {
        let versions = seen
            .get(id)
            .unwrap_or_else(|| panic!("row {id} never captured"));
        // Every version from the snapshot's onwards is present: no gap.
        let first = *versions.iter().next().expect("non-empty");
        for v in first..=*last {
            assert!(
                versions.contains(&v),
                "row {id}: version {v} missing; seen {versions:?}"
            );
        }
        assert_eq!(versions.iter().max(), Some(last), "row {id} final version");
    }
    let dupes = copies.values().filter(|&&n| n > 1).count();
    eprintln!(
        "kill -9 test: {} events, {} distinct (id, version), {} duplicated",
        events.len(),
        copies.len(),
        dupes
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_backfill_resumes_from_its_checkpoint() {
    let db = TestDb::new("bfcrash").await;
    db.exec(
        "CREATE TABLE big (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO big SELECT g, 0 FROM generate_series(1, 4000) g;",
    )
    .await;
    let dir = std::env::temp_dir();
    let config = db.write_config(&dir);
    let extra = "\n[backfill]\nchunk_rows = 100\nmin_rows_per_sec = 400\nmax_rows_per_sec = 800\n";
    let text = std::fs::read_to_string(&config).expect("config").replace(
        "snapshot_chunk_rows",
        "snapshot = false\nsnapshot_chunk_rows",
    ) + extra;
    std::fs::write(&config, text).expect("config");
    let log = dir.join(format!("{}.log", db.name));
    let mut child = spawn_capture(&config, &log);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut cfg = db.cfg.clone();
    cfg.capture.snapshot = false;
    let (job, _) = ferry_pipeline::jobs::backfill::request_backfill(
        &cfg,
        &ferry_schemas::TableId::new("public", "big"),
        None,
        Some(100),
        Some("crashy".into()),
    )
    .await
    .expect("backfill");
    // Live updates meanwhile, and two kill -9 while the job runs.
    for round in 1..=2 {
        db.exec(&format!("UPDATE big SET v = {round} WHERE id % 7 = 0"))
            .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        child = spawn_capture(&config, &log);
    }
    crate::support::wait_backfill_done(&db.cfg, &job, Duration::from_secs(120)).await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    child.kill().expect("stop");
    let _ = child.wait();

    // Replaying the topic per key gives exactly the table: every row arrived, none stale.
    let mut events = db.events("public.big").await;
    events.sort_by_key(|e| (e["source"]["lsn"].as_i64(), e["source"]["seq"].as_i64()));
    let mut replica: BTreeMap<i64, i64> = BTreeMap::new();
    for e in &events {
        let after = &e["after"];
        replica.insert(
            after["id"].as_i64().expect("id"),
            after["v"].as_i64().expect("v"),
        );
    }
    let table: BTreeMap<i64, i64> = db
        .session
        .query("SELECT id::int8, v::int8 FROM big", &[])
        .await
        .expect("read")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(replica, table);
    db.cleanup().await;
}
