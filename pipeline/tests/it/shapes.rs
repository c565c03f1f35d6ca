//! The tables users really have: without a primary key (audit and event tables,
//! pgbench_history; with REPLICA IDENTITY FULL, identical rows updated and deleted), pgbench
//! under load, odd identifiers, and a table the destination refuses (held alone, resumed in
//! order). `ferry check` says per table what UPDATE and DELETE will do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_connectors::postgres::{PgConfig, Session};
use ferry_pipeline::apply::{self, ApplyStats};
use ferry_pipeline::ship::{self, ShipStats};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::apply::dest_db;
use crate::support::{drop_db, start_capture, Running, TestDb, UNREADABLE};

/// Every row of `table` as text, counted and hashed in text order (a multiset: identical rows
/// count as often as they occur). Ferry's bookkeeping columns are left out.
async fn multiset(s: &Session, table: &str, cols: &str) -> (i64, String) {
    let row = s
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(r, '|' ORDER BY r)), '') \
                 FROM (SELECT ({cols})::text AS r FROM {table}) t"
            ),
            &[],
        )
        .await
        .expect("multiset");
    (row.get(0), row.get(1))
}

/// [`multiset`] of a table that may not exist yet (then empty).
async fn multiset_if_any(s: &Session, table: &str, cols: &str) -> (i64, String) {
    let exists = s
        .query_one(
            &format!(
                "SELECT to_regclass('{}') IS NOT NULL",
                table.replace('\'', "''")
            ),
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, bool>(0));
    if !exists {
        return (0, String::new());
    }
    // Columns the destination does not have yet read as nothing there yet.
    s.query_one(
        &format!(
            "SELECT count(*), coalesce(md5(string_agg(r, '|' ORDER BY r)), '') \
             FROM (SELECT ({cols})::text AS r FROM {table}) t"
        ),
        &[],
    )
    .await
    .map_or((0, String::new()), |row| (row.get(0), row.get(1)))
}

/// Waits until `table` holds the same rows in the destination as in the origin (the
/// destination table may not exist yet), failing at `deadline`.
async fn converge(origin: &Session, dest: &Session, table: &str, cols: &str, deadline: Instant) {
    let want = multiset(origin, table, cols).await;
    loop {
        let have = multiset_if_any(dest, table, cols).await;
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{table}: destination {have:?}, origin {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The whole pipeline on a test database: capture, ship and apply into a fresh destination
/// database (`dest`).
/// Waits until capture has stopped some table (or `deadline`); returns the stopped tables.
async fn some_stopped(
    cfg: &ferry_pipeline::config::Config,
    deadline: Instant,
) -> std::collections::BTreeMap<String, ferry_pipeline::store::state::Stopped> {
    loop {
        let stopped = ferry_pipeline::capture::stopped_tables(cfg)
            .await
            .expect("stopped");
        if !stopped.is_empty() || Instant::now() > deadline {
            return stopped;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A table's primary key columns in index order, comma-separated.
async fn primary_key(s: &Session, table: &str) -> String {
    s.query_one(
        "SELECT string_agg(a.attname, ',' ORDER BY k.n) FROM pg_index i
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = to_regclass($1) AND i.indisprimary",
        &[&table],
    )
    .await
    .expect("primary key")
    .get(0)
}

struct Live {
    capture: Option<Running>,
    stop: watch::Sender<bool>,
    ship: JoinHandle<Result<(), ship::ShipError>>,
    apply: JoinHandle<Result<(), apply::ApplyError>>,
    dest: PgConfig,
}

impl Live {
    async fn start(db: &mut TestDb) -> Live {
        Live::start_with(db, "").await
    }

    /// [`Live::start`], running `dest_setup` in the destination first (types it should have).
    async fn start_with(db: &mut TestDb, dest_setup: &str) -> Live {
        let dest = dest_db(db, "dest").await;
        if !dest_setup.is_empty() {
            dest.connect()
                .await
                .expect("destination")
                .batch_execute(dest_setup)
                .await
                .expect("destination setup");
        }
        db.cfg.destination.postgres = Some(dest.clone());
        db.cfg.ship.group_id = format!("{}_ship", db.name);
        db.cfg.ship.linger_ms = 100;
        db.cfg.apply.group_id = format!("{}_apply", db.name);
        let capture = Some(start_capture(&db.cfg).await);
        let (stop, rx) = watch::channel(false);
        let ship = {
            let (cfg, rx) = (db.cfg.clone(), rx.clone());
            tokio::spawn(async move { ship::run(&cfg, rx, Arc::new(ShipStats::default())).await })
        };
        let apply = {
            let cfg = db.cfg.clone();
            tokio::spawn(async move { apply::run(&cfg, rx, Arc::new(ApplyStats::default())).await })
        };
        Live {
            capture,
            stop,
            ship,
            apply,
            dest,
        }
    }

    fn capture(&self) -> &Running {
        self.capture.as_ref().expect("capture is running")
    }

    async fn stop_capture(&mut self) {
        if let Some(c) = self.capture.take() {
            c.stop().await;
        }
    }

    async fn start_capture(&mut self, cfg: &ferry_pipeline::config::Config) {
        self.capture = Some(start_capture(cfg).await);
    }

    /// Stops everything cleanly (each must end without error) and drops both databases.
    async fn finish(self, db: TestDb) {
        let Live {
            capture,
            stop,
            ship,
            apply,
            dest,
        } = self;
        let _ = stop.send(true);
        ship.await.expect("join").expect("ship");
        apply.await.expect("join").expect("apply");
        if let Some(c) = capture {
            c.stop().await;
        }
        drop_db(&dest).await;
        db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_a_key_replicate_exactly() {
    let mut db = TestDb::new("keyless").await;
    // pgbench_history's shape (no key, no replica identity: inserts only), and an audit table
    // with REPLICA IDENTITY FULL holding identical rows.
    db.exec(
        "CREATE TABLE hist (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
         CREATE TABLE audit (who text, what jsonb, n int);
         ALTER TABLE audit REPLICA IDENTITY FULL;
         INSERT INTO hist SELECT g, g % 3, g, g * 10, '2026-01-01'::timestamp + g * interval '1 s', NULL
           FROM generate_series(1, 300) g;
         INSERT INTO audit VALUES ('a', '{\"k\": 1}', 1), ('a', '{\"k\": 1}', 1), ('b', NULL, 2);",
    )
    .await;
    let findings = ferry_pipeline::cli::check::run(&db.cfg).await;
    let of = |t: &str| {
        findings
            .iter()
            .find(|f| f.name == format!("table public.{t}"))
            .unwrap_or_else(|| panic!("no finding for {t}: {findings:?}"))
            .clone()
    };
    assert!(
        !of("hist").ok,
        "hist has no replica identity: {:?}",
        of("hist")
    );
    assert!(of("hist").detail.contains("REPLICA IDENTITY FULL"));
    assert!(of("audit").ok, "{:?}", of("audit"));

    let live = Live::start(&mut db).await;
    let dest = live.dest.clone();

    // Live changes while the snapshot may still run: more inserts, an update of one of two
    // identical rows' siblings, a delete of one of two identical rows, identical rows updated
    // together, a NULL matched as NULL.
    db.exec(
        "INSERT INTO hist SELECT g, g % 3, g, -g, '2026-02-01'::timestamp, NULL FROM generate_series(301, 600) g;
         UPDATE audit SET n = 5 WHERE who = 'b';
         DELETE FROM audit WHERE ctid = (SELECT ctid FROM audit WHERE who = 'a' LIMIT 1);
         INSERT INTO audit VALUES ('c', '[1, 2]', 3), ('c', '[1, 2]', 3), ('e', NULL, NULL);
         UPDATE audit SET who = 'd' WHERE who = 'c';
         DELETE FROM audit WHERE who = 'e';",
    )
    .await;
    for i in 0..20 {
        db.exec(&format!(
            "BEGIN; INSERT INTO audit VALUES ('t{i}', '{{}}', {i}); UPDATE audit SET n = n + 1 WHERE who = 'd'; COMMIT"
        ))
        .await;
    }

    let d = dest.connect().await.expect("destination");
    let tables = [
        ("public.hist", "tid, bid, aid, delta, mtime, filler"),
        ("public.audit", "who, what, n"),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    for (table, cols) in tables {
        converge(&db.session, &d, table, cols, deadline).await;
    }
    drop(d);
    live.finish(db).await;
}

/// Runs a pgbench command against the test database.
fn pgbench(pg: &ferry_connectors::postgres::PgConfig, args: &[&str]) {
    let mut cmd = std::process::Command::new("pgbench");
    cmd.args(["-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user])
        .args(args)
        .arg(&pg.database);
    if let Some(p) = pg.effective_password() {
        cmd.env("PGPASSWORD", p.expose());
    }
    let out = cmd.output().expect("pgbench runs (ops/stack installs it)");
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// pgbench's four tables, `pgbench_history` without a key among them, replicate exactly while
/// pgbench runs against them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_replicates_exactly_under_load() {
    let mut db = TestDb::new("pgbench").await;
    pgbench(&db.cfg.origin.postgres, &["-i", "-q", "-s", "1"]);
    // Some history before capture starts, so the keyless table has a snapshot too.
    pgbench(&db.cfg.origin.postgres, &["-t", "200", "-c", "2"]);
    let live = Live::start(&mut db).await;
    let dest = live.dest.clone();
    let pg = db.cfg.origin.postgres.clone();
    tokio::task::spawn_blocking(move || pgbench(&pg, &["-T", "8", "-c", "2", "-j", "2"]))
        .await
        .expect("pgbench");

    let d = dest.connect().await.expect("destination");
    #[rustfmt::skip]
    let tables = [
        ("public.pgbench_accounts", "aid, bid, abalance, filler"),
        ("public.pgbench_branches", "bid, bbalance, filler"),
        ("public.pgbench_tellers", "tid, bid, tbalance, filler"),
        ("public.pgbench_history", "tid, bid, aid, delta, mtime, filler"),
    ];
    let deadline = Instant::now() + Duration::from_secs(180);
    for (table, cols) in tables {
        converge(&db.session, &d, table, cols, deadline).await;
    }
    drop(d);
    live.finish(db).await;
}

/// A table the destination refuses (a constraint there that the origin does not have) is held:
/// other tables keep flowing, nothing of it is lost, and `ferry resume-table` applies its held
/// batches in order once the cause is fixed. The applier never exits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_table_is_held_alone_and_resumes_in_order() {
    let mut db = TestDb::new("held").await;
    db.exec(
        "CREATE TABLE good (id int PRIMARY KEY, v text);
         CREATE TABLE bad (id int PRIMARY KEY, v text);
         INSERT INTO good SELECT g, 'g' || g FROM generate_series(1, 50) g;
         INSERT INTO bad SELECT g, 'b' || g FROM generate_series(1, 50) g;",
    )
    .await;
    let live = Live::start(&mut db).await;
    let dest = live.dest.clone();
    let d = dest.connect().await.expect("destination");
    let count = |table: &'static str| {
        let d = &d;
        async move {
            d.query_one(&format!("SELECT count(*) FROM public.{table}"), &[])
                .await
                .map_or(0, |r| r.get::<_, i64>(0))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while count("bad").await < 50 || count("good").await < 50 {
        assert!(Instant::now() < deadline, "the snapshot did not arrive");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A rule of the destination's own: the next change of `bad` breaks it.
    d.batch_execute("ALTER TABLE public.bad ADD CONSTRAINT no_poison CHECK (v <> 'poison')")
        .await
        .expect("constraint");
    db.exec(
        "UPDATE bad SET v = 'poison' WHERE id = 7;
         INSERT INTO bad SELECT g, 'b' || g FROM generate_series(51, 80) g;
         INSERT INTO good SELECT g, 'g' || g FROM generate_series(51, 80) g;",
    )
    .await;
    while count("good").await < 80 {
        assert!(
            Instant::now() < deadline,
            "good stopped with bad: {}",
            count("good").await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let table = ferry_schemas::TableId::new("public", "bad");
    let held = apply::held_tables(&dest).await.expect("held tables");
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].0, "public.bad");
    assert!(
        held[0].2.contains("no_poison"),
        "the reason names the constraint: {held:?}"
    );
    // Batches of other partitions processed before the refused one were applied; from the hold
    // on, nothing more of `bad` is.
    let at_hold = count("bad").await;
    db.exec("INSERT INTO bad VALUES (90, 'while held')").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count("bad").await, at_hold, "a held table was written");
    assert!(
        !live.apply.is_finished(),
        "the applier must not exit for one table"
    );

    // Fixed: the held batches are applied in order, then new ones flow again.
    d.batch_execute("ALTER TABLE public.bad DROP CONSTRAINT no_poison")
        .await
        .expect("drop constraint");
    let (batches, _) = apply::request_resume(&dest, &table)
        .await
        .expect("resume")
        .expect("bad is held");
    assert!(batches >= 1);
    db.exec("INSERT INTO bad VALUES (81, 'after the resume')")
        .await;
    let want = multiset(&db.session, "public.bad", "id, v").await;
    loop {
        if multiset(&d, "public.bad", "id, v").await == want {
            break;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "bad did not converge after the resume"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(apply::held_tables(&dest).await.expect("held").is_empty());
    assert_eq!(
        multiset(&d, "public.good", "id, v").await,
        multiset(&db.session, "public.good", "id, v").await
    );
    drop(d);
    live.finish(db).await;
}

/// Names that differ only in characters outside `[A-Za-z0-9_]` (and names with quotes, spaces,
/// dots, upper case, non-ASCII, reserved words) each get their own topic, Avro name,
/// fingerprint and destination table, with their own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_identifiers_never_share_a_topic_schema_or_table() {
    let mut db = TestDb::new("idents").await;
    db.exec(
        r#"CREATE SCHEMA "My Schema";
           CREATE TABLE "app-v2" (id int PRIMARY KEY, v text);
           CREATE TABLE app_v2 (id int PRIMARY KEY, v text);
           CREATE TABLE "app v2" (id int PRIMARY KEY, v text);
           CREATE TABLE "My Schema"."Order.Items ü" ("Key" int PRIMARY KEY, "select" text, "a-b" text, a_b text);
           INSERT INTO "app-v2" VALUES (1, 'dash'), (2, 'dash');
           INSERT INTO app_v2 VALUES (1, 'underscore');
           INSERT INTO "app v2" VALUES (1, 'space'), (3, 'space');
           INSERT INTO "My Schema"."Order.Items ü" VALUES (1, 'sel', 'dash col', 'underscore col');"#,
    )
    .await;
    let live = Live::start(&mut db).await;
    let dest = live.dest.clone();
    db.exec(r#"INSERT INTO "app-v2" VALUES (4, 'dash live'); INSERT INTO app_v2 VALUES (4, 'underscore live');"#)
        .await;
    let d = dest.connect().await.expect("destination");
    let tables = [
        (r#"public."app-v2""#, "id, v"),
        ("public.app_v2", "id, v"),
        (r#"public."app v2""#, "id, v"),
        (
            r#""My Schema"."Order.Items ü""#,
            r#""Key", "select", "a-b", a_b"#,
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(90);
    for (table, cols) in tables {
        converge(&db.session, &d, table, cols, deadline).await;
    }
    drop(d);
    live.finish(db).await;
}

/// A primary-key change of a row whose large (TOASTed) value did not change: the source sends
/// that value with neither image, and the destination still ends with it, not NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_keeps_an_unchanged_toasted_value() {
    let mut db = TestDb::new("toastkey").await;
    // Random text does not compress, so 20 kB is stored out of line.
    db.exec(
        "CREATE TABLE big (id int PRIMARY KEY, note text, blob text);
         INSERT INTO big SELECT g, 'n' || g,
           (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 640) i)
         FROM generate_series(1, 3) g;",
    )
    .await;
    let live = Live::start(&mut db).await;
    let dest = live.dest.clone();
    let d = dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(90);
    let cols = "id, note, md5(blob)";
    let want = multiset(&db.session, "public.big", cols).await;
    while multiset_if_any(&d, "public.big", cols).await != want {
        assert!(Instant::now() < deadline, "the snapshot did not arrive");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    db.exec("UPDATE big SET id = id + 100, note = 'moved' WHERE id <= 2")
        .await;
    let want = multiset(&db.session, "public.big", cols).await;
    loop {
        let have = multiset(&d, "public.big", cols).await;
        if have == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "destination {have:?}, origin {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let nulls: i64 = d
        .query_one("SELECT count(*) FROM public.big WHERE blob IS NULL", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(nulls, 0);
    drop(d);
    live.finish(db).await;
}

/// A publication's column list and row filter (Postgres 15+) hold for the snapshot as for the
/// stream: an unpublished column never leaves the origin, nor does an unpublished row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_honour_a_publications_column_list_and_row_filter() {
    let mut db = TestDb::new("pubfilter").await;
    let publication = db.cfg.capture.publication.clone();
    db.exec(&format!(
        "CREATE TABLE people (id int PRIMARY KEY, name text, secret text);
         INSERT INTO people SELECT g, 'p' || g, 'ssn-' || g FROM generate_series(1, 40) g;
         CREATE PUBLICATION {publication} FOR TABLE people (id, name) WHERE (id % 2 = 0);"
    ))
    .await;
    let live = Live::start(&mut db).await;
    let dest = live.dest.clone();
    db.exec("INSERT INTO people SELECT g, 'p' || g, 'ssn-' || g FROM generate_series(41, 60) g")
        .await;
    let d = dest.connect().await.expect("destination");
    let want = db
        .session
        .query_one(
            "SELECT count(*), md5(string_agg(id || ':' || name, ',' ORDER BY id)) FROM people WHERE id % 2 = 0",
            &[],
        )
        .await
        .expect("origin");
    let want: (i64, String) = (want.get(0), want.get(1));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let have = match d
            .query_one(
                "SELECT count(*), coalesce(md5(string_agg(id || ':' || name, ',' ORDER BY id)), '') FROM public.people",
                &[],
            )
            .await
        {
            Ok(r) => (r.get(0), r.get(1)),
            Err(_) => (0, String::new()),
        };
        if have == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "destination {have:?}, origin's published rows {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let secret: i64 = d
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'people' AND column_name = 'secret'",
            &[],
        )
        .await
        .expect("columns")
        .get(0);
    assert_eq!(secret, 0, "an unpublished column reached the destination");
    drop(d);
    live.finish(db).await;
}

/// DDL while the pipeline runs: a column added with a default (existing rows get it in the
/// destination too), a column whose type widens to numeric(12,2) (no rounding), a NOT NULL
/// column with a default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_reaches_the_destination_with_the_right_data() {
    let mut db = TestDb::new("ddl").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, amount int, note text);
         INSERT INTO t SELECT g, g, 'n' || g FROM generate_series(1, 20) g;",
    )
    .await;
    let live = Live::start(&mut db).await;
    let dest = live.dest.clone();
    let d = dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(120);
    let converge = |cols: &'static str| {
        let (o, d) = (&db.session, &d);
        async move {
            let want = multiset(o, "public.t", cols).await;
            loop {
                let have = multiset_if_any(d, "public.t", cols).await;
                if have == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "({cols}): destination {have:?}, origin {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    converge("id, amount, note").await;
    // Writes go on beside the DDL, from another session.
    let (writing, mut writer_stop) = watch::channel(false);
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (pg, written) = (db.cfg.origin.postgres.clone(), written.clone());
        tokio::spawn(async move {
            let s = pg.connect().await.expect("writer");
            while !*writer_stop.borrow_and_update() {
                s.batch_execute(
                    "UPDATE t SET amount = amount + 1 WHERE id = 1 + (random() * 19)::int",
                )
                .await
                .expect("concurrent write");
                written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    while written.load(std::sync::atomic::Ordering::Relaxed) < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.exec(
        "ALTER TABLE t ADD COLUMN flag int DEFAULT 7;
         INSERT INTO t VALUES (21, 21, 'after flag');
         ALTER TABLE t ALTER COLUMN amount TYPE numeric(12,2);
         UPDATE t SET amount = amount + 0.34 WHERE id <= 5;
         ALTER TABLE t ADD COLUMN label text NOT NULL DEFAULT 'none';
         INSERT INTO t VALUES (22, 22.5, 'after label', 8, 'set');",
    )
    .await;
    // Renames are renames (the values stay), a swap included, not new empty columns.
    db.exec(
        "ALTER TABLE t RENAME COLUMN note TO remark;
         INSERT INTO t VALUES (23, 23, 'after rename', 9, 'r');
         UPDATE t SET remark = 'renamed ' || id WHERE id <= 3;
         BEGIN;
         ALTER TABLE t RENAME COLUMN flag TO tmp;
         ALTER TABLE t RENAME COLUMN label TO flag;
         ALTER TABLE t RENAME COLUMN tmp TO label;
         COMMIT;
         INSERT INTO t (id, amount, remark, flag, label) VALUES (24, 24, 'after swap', 'swapped', 10);",
    )
    .await;
    let _ = writing.send(true);
    writer.await.expect("writer");
    converge("id, amount, remark, flag, label").await;
    let columns: Vec<String> = d
        .query(
            "SELECT attname::text || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = 'public.t'::regclass AND attnum > 0 AND NOT attisdropped
               AND attname NOT LIKE '\\_ferry%' ORDER BY attname",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        [
            "amount numeric(12,2)",
            "flag text",
            "id integer",
            "label integer",
            "remark text"
        ]
    );
    let ty: String = d
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'public.t'::regclass AND attname = 'amount'",
            &[],
        )
        .await
        .expect("type")
        .get(0);
    assert_eq!(ty, "numeric(12,2)");
    drop(d);
    live.finish(db).await;
}

/// A value capture cannot read (every value Postgres sends is readable now, so the test
/// marks some with the fault-injection text `UNREADABLE`) stops only its table, in the stream and in a snapshot: its changes are held in
/// order, the other tables converge, the slot advances, the stop survives a capture restart,
/// and after the fix one resume per table sends the held changes in order (a row still
/// unreadable in a held change is read again from the table) and the table converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_capture_cannot_read_stops_only_its_table() {
    let mut db = TestDb::new("poison").await;
    let poison = format!("'bad {UNREADABLE}'");
    db.exec(
        &"CREATE TABLE good (id int PRIMARY KEY, v text);
         CREATE TABLE arr (id int PRIMARY KEY, a text, v text);
         CREATE TABLE snap_bad (id int PRIMARY KEY, a text);
         INSERT INTO good SELECT g, 'g' || g FROM generate_series(1, 20) g;
         INSERT INTO arr SELECT g, 'x' || g, 'a' || g FROM generate_series(1, 20) g;
         INSERT INTO snap_bad SELECT g, 'x' || g FROM generate_series(1, 10) g;
         UPDATE snap_bad SET a = POISON WHERE id = 5;"
            .replace("POISON", &poison),
    )
    .await;
    let mut live = Live::start(&mut db).await;
    let dest = live.dest.clone();
    let d = dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(120);
    converge(&db.session, &d, "public.good", "id, v", deadline).await;
    converge(&db.session, &d, "public.arr", "id, a, v", deadline).await;
    // The snapshot reaches `snap_bad` last.
    let stopped = some_stopped(&db.cfg, deadline).await;
    assert_eq!(stopped.keys().collect::<Vec<_>>(), ["public.snap_bad"]);
    let reason = &stopped["public.snap_bad"].reason;
    assert!(
        reason.contains("fault injection")
            && reason.contains("key (5)")
            && reason.contains("\"a\""),
        "the reason names row and column: {reason}"
    );

    // In the stream: the poisoned row and everything of `arr` after it is held; `good`, in the
    // same transactions, goes on.
    db.exec(
        &"BEGIN;
         UPDATE arr SET a = POISON WHERE id = 7;
         INSERT INTO good SELECT g, 'g' || g FROM generate_series(21, 30) g;
         COMMIT;
         INSERT INTO arr SELECT g, 'x' || g, 'a' || g FROM generate_series(21, 30) g;
         UPDATE arr SET v = 'changed while held' WHERE id IN (3, 7);
         DELETE FROM arr WHERE id = 4;
         INSERT INTO good SELECT g, 'g' || g FROM generate_series(31, 40) g;"
            .replace("POISON", &poison),
    )
    .await;
    converge(&db.session, &d, "public.good", "id, v", deadline).await;
    let after = crate::support::current_lsn(&db.session).await;
    let stopped = ferry_pipeline::capture::stopped_tables(&db.cfg)
        .await
        .expect("stopped");
    assert_eq!(stopped.len(), 2, "{stopped:?}");
    let reason = &stopped["public.arr"].reason;
    assert!(
        reason.contains("fault injection") && reason.contains("key 7"),
        "{reason}"
    );
    assert_eq!(
        multiset(&d, "public.arr", "id").await.0,
        20,
        "nothing of arr after its stop"
    );
    // The slot moves past the held changes.
    loop {
        let confirmed: i64 = db
            .session
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.cfg.capture.slot],
            )
            .await
            .expect("slot")
            .get(0);
        if confirmed >= after {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stopped at the held table"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        live.capture()
            .stats
            .tables_stopped
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // A restart keeps both stopped, and holds what comes meanwhile.
    live.stop_capture().await;
    db.exec("INSERT INTO arr VALUES (31, 'x31', 'while capture was down')")
        .await;
    live.start_capture(&db.cfg).await;
    db.exec("INSERT INTO good VALUES (41, 'after the restart')")
        .await;
    converge(&db.session, &d, "public.good", "id, v", deadline).await;
    assert_eq!(
        ferry_pipeline::capture::stopped_tables(&db.cfg)
            .await
            .expect("stopped")
            .len(),
        2
    );

    // Fixed at the source; one resume each.
    db.exec(
        "UPDATE arr SET a = 'cafe' WHERE id = 7;
         UPDATE snap_bad SET a = 'cafe' WHERE id = 5;",
    )
    .await;
    for t in ["arr", "snap_bad"] {
        let table = ferry_schemas::TableId::new("public", t);
        let reason = ferry_pipeline::capture::request_resume(&db.cfg, &table)
            .await
            .expect("resume");
        assert!(reason.is_some(), "{t} was stopped");
    }
    db.exec("INSERT INTO arr VALUES (32, 'x32', 'after the resume')")
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    converge(&db.session, &d, "public.arr", "id, a, v", deadline).await;
    converge(&db.session, &d, "public.snap_bad", "id, a", deadline).await;
    converge(&db.session, &d, "public.good", "id, v", deadline).await;
    let stopped = ferry_pipeline::capture::stopped_tables(&db.cfg)
        .await
        .expect("stopped");
    assert!(stopped.is_empty(), "{stopped:?}");
    assert!(apply::held_tables(&dest).await.expect("held").is_empty());

    // A second stop of the same table: its resume reads the held topic from where this stop
    // began, past the first stop's records.
    db.exec(&format!("UPDATE arr SET a = {poison} WHERE id = 9"))
        .await;
    let stopped = some_stopped(&db.cfg, deadline).await;
    assert!(
        stopped["public.arr"].held_from > 0,
        "the stop records where its held records begin: {stopped:?}"
    );
    db.exec("UPDATE arr SET a = 'x9' WHERE id = 9; INSERT INTO arr VALUES (33, 'x33', 'second')")
        .await;
    let table = ferry_schemas::TableId::new("public", "arr");
    ferry_pipeline::capture::request_resume(&db.cfg, &table)
        .await
        .expect("resume");
    converge(&db.session, &d, "public.arr", "id, a, v", deadline).await;
    drop(d);
    live.finish(db).await;
}

/// A table whose rows Postgres itself cannot send (text that is not UTF-8 in a `SQL_ASCII`
/// database: SQLSTATE 22021) stops only that table at its snapshot, with the server's reason;
/// once the row is fixed, one resume reads the table again and it converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_postgres_cannot_send_stops_only_its_table() {
    let base = TestDb::new_config();
    let pg = base.origin.postgres.clone();
    let options = "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0";
    let mut db = TestDb::on_with(base, pg, "sqlascii", options).await;
    db.exec(
        "CREATE TABLE good (id int PRIMARY KEY, v text);
         CREATE TABLE latin (id int PRIMARY KEY, v text);
         INSERT INTO good SELECT g, 'g' || g FROM generate_series(1, 20) g;
         INSERT INTO latin SELECT g, 'l' || g FROM generate_series(1, 20) g;
         UPDATE latin SET v = E'caf\\xe9' WHERE id = 5;",
    )
    .await;
    let findings = ferry_pipeline::cli::check::run(&db.cfg).await;
    let encoding = findings.iter().find(|f| f.name == "encoding");
    assert!(
        encoding.is_some_and(|f| f.detail.contains("SQL_ASCII")),
        "ferry check warns of SQL_ASCII: {findings:?}"
    );
    let live = Live::start(&mut db).await;
    let d = live.dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(120);
    converge(&db.session, &d, "public.good", "id, v", deadline).await;
    let stopped = some_stopped(&db.cfg, deadline).await;
    assert_eq!(stopped.keys().collect::<Vec<_>>(), ["public.latin"]);
    let reason = &stopped["public.latin"].reason;
    assert!(reason.contains("22021"), "{reason}");
    db.exec("INSERT INTO good VALUES (21, 'after the stop')")
        .await;
    converge(&db.session, &d, "public.good", "id, v", deadline).await;

    db.exec("UPDATE latin SET v = 'cafe' WHERE id = 5").await;
    let table = ferry_schemas::TableId::new("public", "latin");
    let resumed = ferry_pipeline::capture::request_resume(&db.cfg, &table)
        .await
        .expect("resume");
    assert!(resumed.is_some(), "latin was stopped");
    converge(&db.session, &d, "public.latin", "id, v", deadline).await;
    drop(d);
    live.finish(db).await;
}

/// A composite key declared in another order than its columns (`PRIMARY KEY (tenant, id)`
/// after `id`) is read in declared order, chunk after chunk, and the destination's key has
/// that order too; `ferry verify` walks it on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_are_read_in_declared_order() {
    let mut db = TestDb::new("keyorder").await;
    db.exec(
        "CREATE TABLE orders (id int, tenant text, v text, PRIMARY KEY (tenant, id));
         INSERT INTO orders SELECT g, 't' || (g % 7), 'v' || g FROM generate_series(1, 3000) g;",
    )
    .await;
    db.cfg.capture.snapshot_chunk_rows = 250;
    let live = Live::start(&mut db).await;
    db.exec(
        "UPDATE orders SET v = 'changed' WHERE id % 10 = 0;
         DELETE FROM orders WHERE id % 13 = 0;
         INSERT INTO orders VALUES (5000, 'a', 'new');",
    )
    .await;
    let d = live.dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(120);
    converge(&db.session, &d, "public.orders", "id, tenant, v", deadline).await;
    assert_eq!(primary_key(&d, "public.orders").await, "tenant,id");
    let table = ferry_schemas::TableId::new("public", "orders");
    let report = ferry_pipeline::verify::verify(&db.cfg.origin.postgres, &live.dest, &table)
        .await
        .expect("verify");
    assert!(
        report.mismatches.is_empty(),
        "{:?}",
        report.mismatches.first()
    );
    assert!(report.origin_rows > 2000);
    // `ferry lineage` takes the key in its declared order, for rows and for deletes.
    let written = apply::lineage(&live.dest, &table, "t3, 10")
        .await
        .expect("lineage");
    assert!(written.contains("last written by batch"), "{written}");
    let deleted = apply::lineage(&live.dest, &table, "t6, 13")
        .await
        .expect("lineage");
    assert!(deleted.contains("deleted by batch"), "{deleted}");
    drop(d);
    live.finish(db).await;
}

/// A value added to an enum at the origin (`ALTER TYPE … ADD VALUE`, which sends no DDL to
/// capture) is added to the destination's enum type when a row first carries it, in a plain
/// and in an array column; the rows arrive as the enum type, not as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enum_values_added_at_the_origin_arrive() {
    let mut db = TestDb::new("enums").await;
    let ty = "CREATE TYPE mood AS ENUM ('sad', 'ok');";
    db.exec(&format!(
        "{ty} CREATE TABLE feel (id int PRIMARY KEY, m mood, ms mood[]);
         INSERT INTO feel VALUES (1, 'sad', '{{sad,ok}}'), (2, NULL, NULL);"
    ))
    .await;
    let live = Live::start_with(&mut db, ty).await;
    let d = live.dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(120);
    converge(&db.session, &d, "public.feel", "id, m, ms", deadline).await;
    db.exec("ALTER TYPE mood ADD VALUE 'happy'").await;
    db.exec("ALTER TYPE mood ADD VALUE 'meh' BEFORE 'sad'")
        .await;
    db.exec(
        "INSERT INTO feel VALUES (3, 'happy', '{meh,happy}');
         UPDATE feel SET m = 'meh' WHERE id = 1;",
    )
    .await;
    converge(&db.session, &d, "public.feel", "id, m, ms", deadline).await;
    let types: Vec<String> = d
        .query(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = 'public.feel'::regclass AND attname IN ('m', 'ms') ORDER BY attname",
            &[],
        )
        .await
        .expect("types")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["mood", "mood[]"]);
    assert!(apply::held_tables(&live.dest)
        .await
        .expect("held")
        .is_empty());
    drop(d);
    live.finish(db).await;
}

/// A primary key changed at the origin (other columns, or a key added to a table that had
/// none) is changed in the destination too, so rows that only the new key tells apart arrive,
/// and changes of versions from before the change still find their rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_primary_key_is_followed() {
    let mut db = TestDb::new("pkchange").await;
    db.exec(
        "CREATE TABLE acct (id int PRIMARY KEY, email text NOT NULL, v text);
         INSERT INTO acct SELECT g, 'u' || g || '@x', 'v' || g FROM generate_series(1, 200) g;
         CREATE TABLE logs (n int NOT NULL, v text);
         INSERT INTO logs SELECT g, 'l' || g FROM generate_series(1, 20) g;",
    )
    .await;
    let live = Live::start(&mut db).await;
    let d = live.dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(120);
    converge(&db.session, &d, "public.acct", "id, email, v", deadline).await;
    converge(&db.session, &d, "public.logs", "n, v", deadline).await;
    db.exec(
        "UPDATE acct SET v = 'before the change' WHERE id % 3 = 0;
         ALTER TABLE acct DROP CONSTRAINT acct_pkey, ADD PRIMARY KEY (email);
         UPDATE acct SET id = id + 1000, v = 'moved' WHERE id <= 50;
         INSERT INTO acct VALUES (60, 'another60@x', 'same id, other key');
         DELETE FROM acct WHERE email IN ('u70@x', 'u71@x');
         ALTER TABLE logs ADD PRIMARY KEY (n);
         UPDATE logs SET v = 'keyed now' WHERE n IN (3, 4);
         DELETE FROM logs WHERE n = 5;",
    )
    .await;
    converge(&db.session, &d, "public.acct", "id, email, v", deadline).await;
    converge(&db.session, &d, "public.logs", "n, v", deadline).await;
    assert_eq!(primary_key(&d, "public.acct").await, "email");
    assert_eq!(primary_key(&d, "public.logs").await, "n");
    assert!(apply::held_tables(&live.dest)
        .await
        .expect("held")
        .is_empty());
    drop(d);
    live.finish(db).await;
}

/// `ferry verify` finds no difference where there is none, whatever collation each side gives
/// a text key (ranges compare by bytes on both sides), and with `char(n)` keys, compared as
/// Postgres compares them (trailing spaces do not count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_is_exact_across_collations_and_char_keys() {
    let mut db = TestDb::new("collate").await;
    db.exec(
        r#"CREATE TABLE words (k text COLLATE "en-x-icu" PRIMARY KEY, v int);
         INSERT INTO words SELECT w, g FROM (
           SELECT g, CASE g % 4 WHEN 0 THEN upper(md5(g::text)) WHEN 1 THEN md5(g::text)
                              WHEN 2 THEN '_' || md5(g::text) ELSE 'Ä' || md5(g::text) END AS w
           FROM generate_series(1, 3000) g) s;
         CREATE TABLE codes (c char(5) PRIMARY KEY, v int);
         INSERT INTO codes SELECT left(md5(g::text), 1 + g % 5), g FROM generate_series(1, 400) g
           ON CONFLICT DO NOTHING;"#,
    )
    .await;
    let live = Live::start(&mut db).await;
    let dest = live.dest.clone();
    let d = dest.connect().await.expect("destination");
    let deadline = Instant::now() + Duration::from_secs(120);
    converge(&db.session, &d, "public.words", "k, v", deadline).await;
    converge(&db.session, &d, "public.codes", "c, v", deadline).await;
    // The destination sorts its keys by bytes; the origin by ICU's rules.
    d.batch_execute(r#"ALTER TABLE public.words ALTER COLUMN k TYPE text COLLATE "C""#)
        .await
        .expect("collation");
    for t in ["words", "codes"] {
        let table = ferry_schemas::TableId::new("public", t);
        let report = ferry_pipeline::verify::verify(&db.cfg.origin.postgres, &dest, &table)
            .await
            .expect("verify");
        assert!(
            report.mismatches.is_empty(),
            "{t}: {} false differences, e.g. {:?}",
            report.mismatches.len(),
            report.mismatches.first()
        );
        assert_eq!(report.origin_rows, report.destination_rows);
        assert!(report.origin_rows > 0);
    }
    drop(d);
    live.finish(db).await;
}
