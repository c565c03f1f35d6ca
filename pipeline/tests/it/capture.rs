//! Change semantics: insert/update/delete/truncate, multi-statement transactions, replica
//! identity, unchanged TOAST values, heartbeats and snapshots of tables added later.

use std::time::Duration;

use serde_json::json;

use crate::support::{current_lsn, ops, start_capture, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_truncate_and_transactions() {
    let db = TestDb::new("ops").await;
    db.exec(
        "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int);
         CREATE TABLE audit (id int PRIMARY KEY, note text);
         ALTER TABLE audit REPLICA IDENTITY FULL;",
    )
    .await;
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.exec(
        "INSERT INTO acct VALUES (1, 'ann', 10), (2, 'bob', 20);
         BEGIN;
           UPDATE acct SET balance = balance - 5 WHERE id = 1;
           UPDATE acct SET balance = balance + 5 WHERE id = 2;
           INSERT INTO audit VALUES (1, 'transfer');
         COMMIT;
         UPDATE acct SET id = 3 WHERE id = 2;
         DELETE FROM acct WHERE id = 1;
         UPDATE audit SET note = 'checked' WHERE id = 1;
         DELETE FROM audit WHERE id = 1;
         TRUNCATE acct;",
    )
    .await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;

    let acct = db.events("public.acct").await;
    let mut stream: Vec<_> = acct.iter().filter(|e| e["op"] != "t").cloned().collect();
    stream.sort_by_key(|e| {
        (
            e["source"]["lsn"].as_i64().unwrap_or(0),
            e["source"]["seq"].as_i64().unwrap_or(0),
        )
    });
    assert_eq!(
        ops(&stream),
        ["c", "c", "u", "u", "d", "c", "d"],
        "{stream:#?}"
    );
    // The two updates of one transaction share its txid and commit LSN.
    assert_eq!(stream[2]["source"]["txid"], stream[3]["source"]["txid"]);
    assert_eq!(stream[2]["source"]["lsn"], stream[3]["source"]["lsn"]);
    assert_eq!(stream[2]["after"]["balance"], 5);
    // A key change is a delete of the old key and an insert of the new one.
    assert_eq!(stream[4]["_key"], json!({"id": 2}));
    assert_eq!(stream[5]["_key"], json!({"id": 3}));
    assert_eq!(stream[5]["after"]["balance"], 25);
    // A delete under REPLICA IDENTITY DEFAULT carries the key in `before`.
    assert_eq!(stream[6]["before"]["id"], 1);
    assert!(stream[6]["after"].is_null());
    // Truncate reaches every partition, without a key.
    let truncates: Vec<_> = acct.iter().filter(|e| e["op"] == "t").collect();
    assert_eq!(truncates.len() as i32, db.cfg.capture.partitions);
    let mut parts: Vec<i64> = truncates
        .iter()
        .map(|e| e["_partition"].as_i64().unwrap_or(-1))
        .collect();
    parts.sort();
    assert_eq!(
        parts,
        (0..db.cfg.capture.partitions as i64).collect::<Vec<_>>()
    );
    assert!(truncates.iter().all(|e| e["_key"].is_null()));

    // Same key → same partition.
    let p1: Vec<_> = acct
        .iter()
        .filter(|e| e["_key"] == json!({"id": 1}))
        .map(|e| &e["_partition"])
        .collect();
    assert!(p1.windows(2).all(|w| w[0] == w[1]), "{p1:?}");

    // REPLICA IDENTITY FULL: updates and deletes carry the whole old row.
    let audit = db.events("public.audit").await;
    assert_eq!(ops(&audit), ["c", "u", "d"]);
    assert_eq!(audit[1]["before"]["note"], "transfer");
    assert_eq!(audit[1]["after"]["note"], "checked");
    assert_eq!(audit[2]["before"]["note"], "checked");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_marked_not_invented() {
    let db = TestDb::new("toast").await;
    db.exec(
        "CREATE TABLE doc (id int PRIMARY KEY, title text, body text);
         ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await;
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.exec(
        "INSERT INTO doc VALUES (1, 'a', repeat('x', 100000));
         UPDATE doc SET title = 'b' WHERE id = 1;",
    )
    .await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;
    let ev = db.events("public.doc").await;
    assert_eq!(ops(&ev), ["c", "u"]);
    assert_eq!(ev[0]["after"]["body"].as_str().map(str::len), Some(100_000));
    assert_eq!(ev[1]["after"]["title"], "b");
    assert!(ev[1]["after"]["body"].is_null());
    assert_eq!(ev[1]["unchanged_toast"], json!(["body"]));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_database_still_advances_the_slot() {
    let db = TestDb::new("idle").await;
    db.exec("CREATE TABLE quiet (id int PRIMARY KEY)").await;
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // No writes to captured tables at all: heartbeats alone must move the slot forward.
    let lsn = current_lsn(&db.session).await as u64;
    db.wait_confirmed(lsn, Duration::from_secs(30)).await;
    cap.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_added_to_the_publication_is_picked_up_without_restart() {
    let mut db = TestDb::new("added").await;
    db.exec("CREATE TABLE first (id int PRIMARY KEY)").await;
    db.cfg.capture.tables = vec!["public.first".into()];
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.exec(
        "CREATE TABLE later (id int PRIMARY KEY, v text);
         INSERT INTO later SELECT g, 'v' || g FROM generate_series(1, 500) g;",
    )
    .await;
    let name = db.name.clone();
    db.exec(&format!("ALTER PUBLICATION {name} ADD TABLE later"))
        .await;
    db.exec("UPDATE later SET v = 'live' WHERE id = 7").await;
    // Wait for the snapshot to finish, then for the stream to catch up.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while cap
        .stats
        .snapshots_done_total
        .load(std::sync::atomic::Ordering::Relaxed)
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "snapshot of the added table did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;
    let ev = db.events("public.later").await;
    let reads = ev.iter().filter(|e| e["op"] == "r").count();
    assert!(reads >= 499, "snapshot rows: {reads}");
    // Row 7's final value is 'live' whichever way it arrived.
    let last7 = ev
        .iter()
        .filter(|e| e["_key"] == json!({"id": 7}))
        .max_by_key(|e| (e["source"]["lsn"].as_i64(), e["source"]["seq"].as_i64()))
        .expect("row 7");
    assert_eq!(last7["after"]["v"], "live");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_backfill_reads_nothing_and_stays_paused_across_a_restart() {
    let mut db = TestDb::new("pause").await;
    db.exec(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 5000) g;",
    )
    .await;
    db.cfg.capture.snapshot = false;
    db.cfg.backfill.min_rows_per_sec = 200.0;
    db.cfg.backfill.max_rows_per_sec = 400.0;
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let table = ferry_schemas::TableId::new("public", "big");
    let (job, _) = ferry_pipeline::jobs::backfill::request_backfill(
        &db.cfg,
        &table,
        None,
        Some(100),
        Some("slow".into()),
    )
    .await
    .expect("backfill");
    tokio::time::sleep(Duration::from_secs(2)).await;
    ferry_pipeline::jobs::backfill::control_job(
        &db.cfg,
        &job,
        ferry_pipeline::wal::JobAction::Pause,
    )
    .await
    .expect("pause");
    // Wait until the pause is in the state, then nothing more may be read.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let paused_rows = loop {
        let lsn = db.sync_point().await;
        db.wait_confirmed(lsn, Duration::from_secs(30)).await;
        let st = crate::support::capture_state(&db.cfg).await;
        if let Some(b) = st.backfills.get(&job) {
            if b.paused {
                break b.rows;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pause never reached the state"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        paused_rows < 5_000,
        "the job finished before it could be paused"
    );
    cap.stop().await;

    // Restart: still paused, still nothing read.
    let cap = start_capture(&db.cfg).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = crate::support::capture_state(&db.cfg)
        .await
        .backfills
        .get(&job)
        .cloned()
        .expect("job");
    assert!(b.paused, "paused state survives a restart");
    assert_eq!(b.rows, paused_rows, "a paused job reads nothing");
    let before = db.events("public.big").await.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        db.events("public.big").await.len(),
        before,
        "no rows emitted while paused"
    );

    // Resume: it runs to the end.
    ferry_pipeline::jobs::backfill::control_job(
        &db.cfg,
        &job,
        ferry_pipeline::wal::JobAction::Resume,
    )
    .await
    .expect("resume");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let b = crate::support::capture_state(&db.cfg)
            .await
            .backfills
            .get(&job)
            .cloned()
            .expect("job");
        if b.status() == ferry_pipeline::store::state::JobState::Done {
            assert!(b.rows >= 5_000, "{b:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "resumed job did not finish: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cap.stop().await;
    db.cleanup().await;
}
