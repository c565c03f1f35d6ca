//! Jobs as an operator drives them: a backfill plan with tiers, dependencies and a staged
//! sample read from a replica connection; a failed sample stops its job; the live pipeline and a
//! replay paused across restarts consume nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use ferry_pipeline::apply::{self, ApplyStats};
use ferry_pipeline::config::Config;
use ferry_pipeline::jobs::backfill::{self, BackfillSpec};
use ferry_pipeline::jobs::{control, replay};
use ferry_pipeline::ship::{self, ShipStats};
use ferry_pipeline::store::control as gate;
use ferry_pipeline::{inspect, jobs};
use ferry_schemas::TableId;
use tokio::sync::watch;

use crate::apply::dest_db;
use crate::support::{capture_state, drop_db, start_capture, wait_backfill_done, TestDb};

/// Shipper and applier running in this process until `stop`.
struct Downstream {
    stop: watch::Sender<bool>,
    ship: tokio::task::JoinHandle<Result<(), ship::ShipError>>,
    ship_stats: Arc<ShipStats>,
    apply: Option<tokio::task::JoinHandle<Result<(), apply::ApplyError>>>,
}

fn start_downstream(cfg: &Config, with_apply: bool) -> Downstream {
    let (stop, rx) = watch::channel(false);
    let ship_stats = Arc::new(ShipStats::default());
    let ship = {
        let (cfg, rx, s) = (cfg.clone(), rx.clone(), ship_stats.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, s).await })
    };
    let apply = with_apply.then(|| {
        let cfg = cfg.clone();
        tokio::spawn(async move { apply::run(&cfg, rx, Arc::new(ApplyStats::default())).await })
    });
    Downstream {
        stop,
        ship,
        ship_stats,
        apply,
    }
}

impl Downstream {
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.ship.await.expect("join").expect("shipper ok");
        if let Some(a) = self.apply {
            a.await.expect("join").expect("applier ok");
        }
    }
}

fn pipeline_cfg(db: &mut TestDb) {
    db.cfg.capture.snapshot = false;
    db.cfg.backfill.min_rows_per_sec = 2_000.0;
    db.cfg.backfill.canary_window_secs = 1;
    db.cfg.ship.group_id = format!("{}_ship", db.name);
    db.cfg.ship.instance_id = "ship-1".into();
    db.cfg.ship.linger_ms = 200;
    db.cfg.apply.group_id = format!("{}_apply", db.name);
    db.cfg.apply.instance_id = "apply-1".into();
}

async fn until<F, Fut>(what: &str, timeout: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_runs_by_tier_and_dependency_and_a_sample_gates_the_rest() {
    let mut db = TestDb::new("plan").await;
    db.exec(
        "CREATE TABLE core (id int PRIMARY KEY, name text);
         INSERT INTO core SELECT g, 'c' || g FROM generate_series(1, 1500) g;
         CREATE TABLE orders (id int PRIMARY KEY, core_id int, amount int);
         INSERT INTO orders SELECT g, g % 1500 + 1, g FROM generate_series(1, 2000) g;
         CREATE TABLE notes (id int PRIMARY KEY, body text);
         INSERT INTO notes SELECT g, 'n' || g FROM generate_series(1, 600) g;",
    )
    .await;
    let dest = dest_db(&db, "dest").await;
    pipeline_cfg(&mut db);
    db.cfg.destination.postgres = Some(dest.clone());
    // Backfill chunks are read through their own connection (a replica's in production).
    db.cfg.backfill.replica = Some(db.cfg.origin.postgres.clone());
    db.cfg.backfill.sample_timeout_secs = 90;
    let dest_session = dest.connect().await.expect("destination");

    let cap = start_capture(&db.cfg).await;
    let down = start_downstream(&db.cfg, true);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // orders (tier 1) comes after core (tier 0) and holds after a sample of 500 rows.
    for spec in [
        BackfillSpec {
            job: Some("orders".into()),
            table: "public.orders".into(),
            chunk_rows: Some(250),
            tier: 1,
            after: vec!["core".into()],
            sample: Some(500),
            ..BackfillSpec::default()
        },
        BackfillSpec {
            job: Some("core".into()),
            table: "public.core".into(),
            chunk_rows: Some(250),
            ..BackfillSpec::default()
        },
    ] {
        backfill::request(&db.cfg, &spec).await.expect("requested");
    }
    // While core runs, orders reads nothing.
    let mut core_done = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !core_done {
        let st = capture_state(&db.cfg).await;
        let (Some(core), Some(orders)) = (st.backfills.get("core"), st.backfills.get("orders"))
        else {
            assert!(
                Instant::now() < deadline,
                "the plan never reached the state"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        if core.status() != ferry_pipeline::store::state::JobState::Done {
            assert_eq!(orders.rows, 0, "orders started before core was done");
            assert!(st.backfill_wait("orders").is_some());
        }
        core_done = core.status() == ferry_pipeline::store::state::JobState::Done;
        assert!(Instant::now() < deadline, "core never finished");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rows = list_jobs(&db.cfg).await;
    let orders = rows.iter().find(|r| r.job == "orders").expect("orders row");
    assert_eq!(
        (orders.kind, orders.tier),
        (jobs::JobKind::Backfill, Some(1))
    );
    assert!(rows
        .iter()
        .any(|r| r.job == "live" && r.kind == ferry_pipeline::jobs::JobKind::Live));

    // The sample: orders holds at 500 rows until they verify in the destination database.
    let outcome = jobs::check_sample(&db.cfg, "orders", |_| {})
        .await
        .expect("sample check");
    match outcome {
        jobs::Sample::Passed { rows } => assert_eq!(rows, 500),
        other => panic!("sample should pass: {other:?}"),
    }
    wait_backfill_done(&db.cfg, "orders", Duration::from_secs(120)).await;
    for t in ["core", "orders"] {
        let table = TableId::new("public", t);
        until(
            &format!("{t} equal at the destination"),
            Duration::from_secs(90),
            || async {
                ferry_pipeline::verify::verify(&db.cfg.origin.postgres, &dest, &table)
                    .await
                    .is_ok_and(|r| r.mismatches.is_empty())
            },
        )
        .await;
    }

    // A sample that does not verify stops its job and says what differed.
    db.cfg.backfill.sample_timeout_secs = 4;
    backfill::request(
        &db.cfg,
        &BackfillSpec {
            job: Some("notes".into()),
            table: "public.notes".into(),
            chunk_rows: Some(100),
            sample: Some(200),
            ..BackfillSpec::default()
        },
    )
    .await
    .expect("requested");
    let held = || async {
        capture_state(&db.cfg)
            .await
            .backfills
            .get("notes")
            .is_some_and(|b| b.held())
    };
    until("notes holds at its sample", Duration::from_secs(60), held).await;
    until(
        "the notes sample reaches the destination",
        Duration::from_secs(60),
        || async {
            dest_session
                .query_one("SELECT count(*) FROM notes WHERE id <= 200", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 200)
        },
    )
    .await;
    dest_session
        .batch_execute("UPDATE notes SET body = 'tampered' WHERE id = 7")
        .await
        .expect("tamper");
    match jobs::check_sample(&db.cfg, "notes", |_| {})
        .await
        .expect("sample check")
    {
        jobs::Sample::Failed { report } => {
            assert_eq!(report.mismatches.len(), 1, "{:?}", report.mismatches);
            assert_eq!(report.mismatches[0].key, vec!["7".to_string()]);
        }
        other => panic!("sample should fail: {other:?}"),
    }
    until("notes is cancelled", Duration::from_secs(30), || async {
        capture_state(&db.cfg)
            .await
            .backfills
            .get("notes")
            .is_some_and(|b| {
                b.status() == ferry_pipeline::store::state::JobState::Cancelled && b.rows == 200
            })
    })
    .await;

    down.stop().await;
    cap.stop().await;
    drop_db(&dest).await;
    db.cleanup().await;
}

async fn list_jobs(cfg: &Config) -> Vec<jobs::JobRow> {
    jobs::list(cfg).await.expect("jobs")
}

/// Batches in the destination batch topic.
fn batches(cfg: &Config) -> usize {
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    inspect::read_all(&dest, &cfg.batch_topic(), usize::MAX)
        .map(|v| v.len())
        .unwrap_or(0)
}

async fn count_batches(cfg: &Config) -> usize {
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || batches(&c))
        .await
        .expect("task")
}

async fn committed(cfg: &Config) -> i64 {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    ship::lag(&origin, &cfg.capture.topic_prefix, &cfg.ship.group_id)
        .await
        .expect("lag")
        .iter()
        .map(|l| l.committed)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_live_pipeline_and_replay_consume_nothing_across_restarts() {
    let mut db = TestDb::new("livepause").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    pipeline_cfg(&mut db);
    let cap = start_capture(&db.cfg).await;
    // Capture streams from its slot once it is up; rows before that are not its to capture.
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    let down = start_downstream(&db.cfg, false);
    db.exec("INSERT INTO t SELECT g, g FROM generate_series(1, 100) g")
        .await;
    let cfg = db.cfg.clone();
    until(
        "the first rows are shipped",
        Duration::from_secs(60),
        || {
            let cfg = cfg.clone();
            async move { committed(&cfg).await >= 100 }
        },
    )
    .await;

    // Pause the live pipeline, then restart the shipper: it comes back paused.
    control::request(&db.cfg, gate::LIVE, ferry_pipeline::wal::JobAction::Pause)
        .await
        .expect("pause live");
    let stats = down.ship_stats.clone();
    until("the shipper pauses", Duration::from_secs(30), || {
        let s = stats.clone();
        async move { s.paused.load(Ordering::Relaxed) }
    })
    .await;
    down.stop().await;
    let down = start_downstream(&db.cfg, false);
    let before = (committed(&db.cfg).await, count_batches(&db.cfg).await);
    db.exec("INSERT INTO t SELECT g, g FROM generate_series(101, 400) g")
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        down.ship_stats.paused.load(Ordering::Relaxed),
        "pause lost in the restart"
    );
    let after = (committed(&db.cfg).await, count_batches(&db.cfg).await);
    assert_eq!(before, after, "a paused pipeline consumed or shipped");
    let rows = list_jobs(&db.cfg).await;
    let live = rows.iter().find(|r| r.job == "live").expect("live row");
    assert_eq!(live.state, ferry_pipeline::store::state::JobState::Paused);

    // Resume: everything held back is shipped.
    control::request(&db.cfg, gate::LIVE, ferry_pipeline::wal::JobAction::Resume)
        .await
        .expect("resume live");
    let cfg = db.cfg.clone();
    until("held rows are shipped", Duration::from_secs(60), || {
        let cfg = cfg.clone();
        async move { committed(&cfg).await >= 400 }
    })
    .await;

    // A replay paused before it started consumes nothing, across a restart of its process.
    let topic = format!("{}.public.t", db.cfg.capture.topic_prefix);
    let spec = replay::Spec {
        topic: topic.clone(),
        partition: None,
        from: replay::Bound::Offset(0),
        to: None,
        job: "rp1".into(),
        max_events_per_sec: 100_000.0,
        max_bytes_per_sec: None,
    };
    gate::send(
        &db.cfg,
        &gate::job_key("rp1"),
        ferry_pipeline::wal::JobAction::Pause,
    )
    .await
    .expect("pause replay");
    let batches_before = count_batches(&db.cfg).await;
    for _ in 0..2 {
        let (stop, rx) = watch::channel(false);
        let (c, s) = (db.cfg.clone(), spec.clone());
        let task = tokio::spawn(async move { replay::run(&c, &s, rx, |_| {}).await });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = stop.send(true);
        let report = task.await.expect("join").expect("replay ok");
        assert_eq!(report.events, 0, "a paused replay read changes");
    }
    assert_eq!(count_batches(&db.cfg).await, batches_before);
    control::request(&db.cfg, "rp1", ferry_pipeline::wal::JobAction::Resume)
        .await
        .expect("resume replay");
    let (_stop, rx) = watch::channel(false);
    let report = replay::run(&db.cfg, &spec, rx, |_| {})
        .await
        .expect("replay");
    assert_eq!(report.events, 400, "{report:?}");
    let rows = list_jobs(&db.cfg).await;
    let rp = rows.iter().find(|r| r.job == "rp1").expect("replay row");
    assert_eq!(
        (rp.kind, rp.state, rp.done),
        (
            jobs::JobKind::Replay,
            ferry_pipeline::store::state::JobState::Done,
            400
        )
    );

    down.stop().await;
    cap.stop().await;
    db.cleanup().await;
}

/// A replay of a later range asked for while the live shipper is behind (here: down) ships
/// nothing past where the live lane is: that is the live lane's to ship, and a replay ahead of
/// it would put newer changes before older ones in the replicated topics. Started afterwards,
/// the live shipper ships every origin offset from its own position, and the destination gets
/// every row. (A replay batch ahead of it, as an older Ferry shipped, never moves it either:
/// it resumes after live-lane batches only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_ahead_of_the_live_shipper_leaves_no_hole() {
    let mut db = TestDb::new("replayahead").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    pipeline_cfg(&mut db);
    db.cfg.capture.partitions = 1;
    let dest = dest_db(&db, "dest").await;
    db.cfg.destination.postgres = Some(dest.clone());
    let cap = start_capture(&db.cfg).await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    // The shipper runs once (it prepares the destination's topics), then is down a while.
    db.exec("INSERT INTO t VALUES (0, 0)").await;
    let down = start_downstream(&db.cfg, true);
    let cfg = db.cfg.clone();
    until("the first row is shipped", Duration::from_secs(60), || {
        let cfg = cfg.clone();
        async move { committed(&cfg).await >= 1 }
    })
    .await;
    down.stop().await;
    db.exec("INSERT INTO t SELECT g, g FROM generate_series(1, 100) g")
        .await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;

    // A later range replayed meanwhile: the live lane has not reached it.
    let spec = replay::Spec {
        topic: format!("{}.public.t", db.cfg.capture.topic_prefix),
        partition: Some(0),
        from: replay::Bound::Offset(51),
        to: None,
        job: "ahead".into(),
        max_events_per_sec: 100_000.0,
        max_bytes_per_sec: None,
    };
    let (_stop, rx) = watch::channel(false);
    let report = replay::run(&db.cfg, &spec, rx, |_| {})
        .await
        .expect("replay");
    assert_eq!(report.events, 0, "{report:?}");
    // A range batch ahead of the live lane anyway (as an older Ferry's replay shipped).
    let mut ranges = ferry_pipeline::ship::RangeShipper::new(&db.cfg).expect("range shipper");
    let (events, _, _) = ranges
        .ship_range(&spec.topic, 0, 51, 100)
        .await
        .expect("range ahead");
    assert_eq!(events, 50);

    let down = start_downstream(&db.cfg, true);
    let d = dest.connect().await.expect("destination");
    let count = || async {
        d.query_one("SELECT count(*) FROM public.t", &[])
            .await
            .map_or(0, |r| r.get::<_, i64>(0))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while count().await < 101 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        count().await,
        101,
        "the live lane skipped to the replay's end"
    );
    drop(d);
    down.stop().await;
    cap.stop().await;
    drop_db(&dest).await;
    db.cleanup().await;
}

/// A scratch cluster from `ops/pg-scratch`, stopped and removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn run(args: &[&str]) -> Scratch {
        let out = std::process::Command::new(crate::support::repo().join("ops/pg-scratch"))
            .args(args)
            .output()
            .expect("run ops/pg-scratch");
        assert!(
            out.status.success(),
            "pg-scratch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Scratch(args[1].into())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::process::Command::new(crate::support::repo().join("ops/pg-scratch"))
            .args(["stop", &self.0.to_string_lossy()])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reads_chunks_from_a_hot_standby_and_ends_equal() {
    let t = crate::support::tag();
    let port = 20_000 + (rand::random::<u16>() % 20_000);
    let tmp = std::env::temp_dir();
    let (pdir, sdir) = (
        tmp.join(format!("ferry-primary-{t}")),
        tmp.join(format!("ferry-standby-{t}")),
    );
    let primary = Scratch::run(&[
        "start",
        &pdir.to_string_lossy(),
        &port.to_string(),
        "wal_level=logical",
        "max_replication_slots=10",
        "max_wal_senders=10",
    ]);
    let standby = Scratch::run(&[
        "standby",
        &sdir.to_string_lossy(),
        &(port + 1).to_string(),
        &port.to_string(),
    ]);

    let mut cfg = Config::load(&crate::support::repo().join("ops/ferry.toml")).expect("config");
    cfg.origin.postgres.port = port;
    cfg.origin.postgres.database = "postgres".into();
    cfg.capture.slot = format!("ferry_it_standby_{t}");
    cfg.capture.publication = cfg.capture.slot.clone();
    cfg.capture.tables = vec!["public.acct".into()];
    cfg.capture.topic_prefix = format!("it.standby.{t}");
    cfg.capture.snapshot = false;
    cfg.capture.status_interval_ms = 200;
    cfg.capture.linger_ms = 5;
    cfg.backfill.min_rows_per_sec = 2_000.0;
    cfg.backfill.canary_window_secs = 1;
    cfg.backfill.replica = Some(ferry_connectors::postgres::PgConfig {
        port: port + 1,
        ..cfg.origin.postgres.clone()
    });
    cfg.ship.group_id = format!("{}_ship", cfg.capture.slot);
    cfg.ship.instance_id = "ship-1".into();
    cfg.ship.linger_ms = 200;
    cfg.apply.group_id = format!("{}_apply", cfg.capture.slot);
    cfg.apply.instance_id = "apply-1".into();
    // The destination database lives in the main cluster.
    let main = Config::load(&crate::support::repo().join("ops/ferry.toml")).expect("config");
    let dest = ferry_connectors::postgres::PgConfig {
        database: format!("ferry_it_standby_dest_{t}"),
        ..main.origin.postgres.clone()
    };
    let admin = ferry_connectors::postgres::PgConfig {
        database: "postgres".into(),
        ..dest.clone()
    }
    .connect()
    .await
    .expect("main cluster");
    admin
        .batch_execute(&format!("CREATE DATABASE {}", dest.database))
        .await
        .expect("destination database");
    cfg.destination.postgres = Some(dest.clone());

    let origin = cfg.origin.postgres.connect().await.expect("primary");
    origin
        .batch_execute(
            "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int);
             INSERT INTO acct SELECT g, 'o' || g, 0 FROM generate_series(1, 3000) g;",
        )
        .await
        .expect("table");
    let replica = cfg.backfill.replica.clone().expect("replica");
    let read_on_standby = || async {
        replica
            .connect()
            .await
            .expect("standby")
            .query_one(
                "SELECT coalesce(sum(tup_returned), 0)::bigint FROM pg_stat_database",
                &[],
            )
            .await
            .expect("stats")
            .get::<_, i64>(0)
    };
    let before = read_on_standby().await;

    let cap = start_capture(&cfg).await;
    let down = start_downstream(&cfg, true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writer_pg = cfg.origin.postgres.clone();
    let writer = tokio::spawn(async move {
        let s = writer_pg.connect().await.expect("writer");
        for round in 1..=40 {
            s.batch_execute(&format!(
                "UPDATE acct SET balance = balance + 1 WHERE id % 40 = {m};
                 DELETE FROM acct WHERE id = {d};",
                m = round % 40,
                d = round * 53
            ))
            .await
            .expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let table = TableId::new("public", "acct");
    backfill::request_backfill(&cfg, &table, None, Some(250), Some("standby".into()))
        .await
        .expect("backfill");
    writer.await.expect("writer");
    wait_backfill_done(&cfg, "standby", Duration::from_secs(120)).await;
    until(
        "the destination equals the primary",
        Duration::from_secs(90),
        || async {
            ferry_pipeline::verify::verify(&cfg.origin.postgres, &dest, &table)
                .await
                .is_ok_and(|r| r.mismatches.is_empty())
        },
    )
    .await;
    // A backend reports its statistics when it goes idle (up to 10 s later): wait for them.
    let stats_deadline = Instant::now() + Duration::from_secs(20);
    let mut read = read_on_standby().await - before;
    while read < 2_900 && Instant::now() < stats_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        read = read_on_standby().await - before;
    }
    assert!(
        read >= 2_900,
        "the standby returned only {read} rows: chunks were not read there"
    );

    down.stop().await;
    cap.stop().await;
    let _ = origin
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('{}')",
            cfg.capture.slot
        ))
        .await;
    drop_db(&dest).await;
    drop((standby, primary));
}
