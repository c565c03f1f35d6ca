//! Schema changes mid-stream produce new schema versions; streaming continues without restart.

use std::time::Duration;

use crate::support::{ops, start_capture, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_drop_and_retype_columns_while_streaming() {
    let db = TestDb::new("ddl").await;
    db.exec("CREATE TABLE evolve (id int PRIMARY KEY, a int, b text)")
        .await;
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.exec(
        "INSERT INTO evolve VALUES (1, 1, 'one');
         ALTER TABLE evolve ADD COLUMN c numeric;
         INSERT INTO evolve VALUES (2, 2, 'two', 2.5);
         ALTER TABLE evolve DROP COLUMN b;
         INSERT INTO evolve VALUES (3, 3, 3.5);
         ALTER TABLE evolve ALTER COLUMN a TYPE bigint;
         INSERT INTO evolve VALUES (4, 9000000000, 4.5);",
    )
    .await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    let retries = cap
        .stats
        .retries_total
        .load(std::sync::atomic::Ordering::Relaxed);
    cap.stop().await;
    assert_eq!(retries, 0, "a schema change must not need a restart");

    let mut ev = db.events("public.evolve").await;
    ev.sort_by_key(|e| e["after"]["id"].as_i64());
    assert_eq!(ops(&ev), ["c", "c", "c", "c"]);
    let fps: Vec<&str> = ev
        .iter()
        .map(|e| e["_fingerprint"].as_str().unwrap_or(""))
        .collect();
    for w in fps.windows(2) {
        assert_ne!(w[0], w[1], "each change of shape is a new schema version");
    }
    assert_eq!(ev[0]["after"]["b"], "one");
    assert_eq!(ev[1]["after"]["c"], "2.5");
    assert!(
        ev[2]["after"].get("b").is_none(),
        "b was dropped: {}",
        ev[2]["after"]
    );
    assert_eq!(ev[3]["after"]["a"], 9_000_000_000i64);
    db.cleanup().await;
}
