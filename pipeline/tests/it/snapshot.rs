//! Snapshots interleave correctly with live changes: a table snapshotted in small chunks while
//! it is being updated ends with the topic's last image per key equal to the table.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::{start_capture, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_concurrent_updates_ends_equal() {
    let mut db = TestDb::new("snap").await;
    db.exec(
        "CREATE TABLE hot (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO hot SELECT g, 0 FROM generate_series(1, 5000) g;",
    )
    .await;
    db.cfg.capture.snapshot_chunk_rows = 100;
    // Three concurrent writers, so commits race with the chunk reads' snapshots.
    let mut writers = Vec::new();
    for w in 0..3i64 {
        let writer_db = db.cfg.origin.postgres.clone();
        writers.push(tokio::spawn(async move {
            let s = writer_db.connect().await.expect("writer connects");
            for round in 1..=80i64 {
                let sql = format!(
                    "UPDATE hot SET v = {v} WHERE id % 97 = {m}; DELETE FROM hot WHERE id = {d}; \
                     INSERT INTO hot VALUES ({i}, {v});",
                    v = round * 10 + w,
                    m = (round * 3 + w) % 97,
                    d = round * 13 + w * 1_500,
                    i = 10_000 + w * 1_000 + round
                );
                s.batch_execute(&sql).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let cap = start_capture(&db.cfg).await;
    for w in writers {
        w.await.expect("writer");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while cap
        .stats
        .snapshots_done_total
        .load(std::sync::atomic::Ordering::Relaxed)
        < 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "snapshot did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;

    let table: BTreeMap<i64, i64> = db
        .session
        .query("SELECT id::int8, v::int8 FROM hot", &[])
        .await
        .expect("read")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Replay the topic per key in (lsn, seq) order, as a consumer applying it would.
    let mut events = db.events("public.hot").await;
    events.sort_by_key(|e| (e["source"]["lsn"].as_i64(), e["source"]["seq"].as_i64()));
    let mut replica: BTreeMap<i64, i64> = BTreeMap::new();
    for e in &events {
        match e["op"].as_str() {
            Some("d") => {
                replica.remove(&e["before"]["id"].as_i64().expect("id"));
            }
            Some(_) => {
                replica.insert(
                    e["after"]["id"].as_i64().expect("id"),
                    e["after"]["v"].as_i64().expect("v"),
                );
            }
            None => panic!("event without op"),
        }
    }
    assert_eq!(replica.len(), table.len());
    assert_eq!(replica, table);
    let reads = events.iter().filter(|e| e["op"] == "r").count();
    assert!(reads > 4000, "snapshot rows: {reads}");
    db.cleanup().await;
}
