//! Shared test helpers: a private database per test, in-process capture, reading topics back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use ferry_connectors::postgres::{PgConfig, Session};
use ferry_pipeline::capture::{self, SinkMode, Stats};
use ferry_pipeline::config::Config;
use ferry_pipeline::{inspect, topics};
use ferry_schemas::TableId;
use serde_json::Value;
use tokio::sync::watch;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A random lowercase tag for names.
pub fn tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A private database (with its own slot, publication and topic prefix) for one test.
pub struct TestDb {
    pub name: String,
    pub cfg: Config,
    pub session: Session,
}

impl TestDb {
    /// The local stack's settings (ops/ferry.toml).
    pub fn new_config() -> Config {
        Config::load(&repo().join("ops/ferry.toml")).expect("ops/ferry.toml loads")
    }

    pub async fn new(test: &str) -> TestDb {
        let base = TestDb::new_config();
        let pg = base.origin.postgres.clone();
        TestDb::on(base, pg, test).await
    }

    /// A private database on the server `pg` names, with the rest of the settings of `base`.
    pub async fn on(base: Config, pg: PgConfig, test: &str) -> TestDb {
        TestDb::on_with(base, pg, test, "").await
    }

    /// [`TestDb::on`] with `CREATE DATABASE` options (e.g. an encoding).
    pub async fn on_with(mut base: Config, pg: PgConfig, test: &str, options: &str) -> TestDb {
        init_logs();
        base.origin.postgres = pg;
        let t = tag();
        let name = format!("ferry_it_{test}_{t}");
        let admin = PgConfig {
            database: "postgres".into(),
            ..base.origin.postgres.clone()
        };
        let a = admin
            .connect()
            .await
            .expect("postgres reachable (run ops/stack up)");
        a.batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .expect("create database");
        let mut cfg = base;
        cfg.origin.postgres.database = name.clone();
        cfg.capture.slot = name.clone();
        cfg.capture.publication = name.clone();
        // A private database: its publication may take every table.
        cfg.capture.all_tables = true;
        cfg.capture.topic_prefix = format!("it.{test}.{t}");
        cfg.capture.heartbeat_interval_ms = 1_000;
        cfg.capture.publication_poll_ms = 500;
        cfg.capture.status_interval_ms = 200;
        cfg.capture.linger_ms = 5;
        cfg.capture.max_backoff_ms = 2_000;
        let session = cfg
            .origin
            .postgres
            .connect()
            .await
            .expect("connect test db");
        TestDb { name, cfg, session }
    }

    pub async fn exec(&self, sql: &str) {
        self.session
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A position after everything committed so far; wait for it with [`TestDb::wait_confirmed`].
    pub async fn sync_point(&self) -> u64 {
        let lsn = current_lsn(&self.session).await;
        // A transaction after the point, so the stream has a commit past it to confirm.
        self.exec("SELECT pg_logical_emit_message(true, 'ferry.test', 'sync')")
            .await;
        lsn as u64
    }

    /// The slot's confirmed flush position, if the slot exists and has one.
    pub async fn confirmed(&self) -> Option<i64> {
        self.session
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .expect("slot query")
            .and_then(|r| r.get(0))
    }

    /// Waits until the slot's confirmed flush position passes `lsn`.
    pub async fn wait_confirmed(&self, lsn: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let confirmed = self.confirmed().await.unwrap_or(0) as u64;
            if confirmed >= lsn {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slot {} confirmed {confirmed:#x}, still short of {lsn:#x} after {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes the config as TOML for running the `ferry` binary.
    pub fn write_config(&self, dir: &Path) -> PathBuf {
        let c = &self.cfg;
        let p = dir.join(format!("{}.toml", self.name));
        let body = format!(
            r#"[origin]
region = "origin"
[origin.postgres]
host = "{host}"
port = {port}
user = "{user}"
database = "{db}"
[origin.kafka]
bootstrap_servers = "{okafka}"
[destination]
region = "destination"
[destination.kafka]
bootstrap_servers = "{dkafka}"
[capture]
slot = "{db}"
publication = "{db}"
all_tables = true
topic_prefix = "{prefix}"
heartbeat_interval_ms = 1000
publication_poll_ms = 500
status_interval_ms = 200
linger_ms = 5
max_backoff_ms = 2000
snapshot_chunk_rows = {chunk}
"#,
            host = c.origin.postgres.host,
            port = c.origin.postgres.port,
            user = c.origin.postgres.user,
            db = self.name,
            okafka = c.origin.kafka.bootstrap_servers,
            dkafka = c.destination.kafka.bootstrap_servers,
            prefix = c.capture.topic_prefix,
            chunk = c.capture.snapshot_chunk_rows,
        );
        std::fs::write(&p, body).expect("write config");
        p
    }

    /// Every record of a table's topic, decoded with the published schemas, as JSON, in
    /// (partition, offset) order.
    pub async fn events(&self, table: &str) -> Vec<Value> {
        let registry = self.cfg.origin_registry().expect("origin registry");
        let cluster = Cluster::new("origin", self.cfg.origin.kafka.clone());
        let prefix = self.cfg.capture.topic_prefix.clone();
        let (schema, name) = table.split_once('.').expect("schema.table");
        let topic = topics::table_topic(&prefix, &TableId::new(schema, name));
        tokio::task::spawn_blocking(move || {
            let mut decoder = inspect::Decoder::load(&cluster, &prefix, registry).expect("schemas");
            let mut records = inspect::read_all(&cluster, &topic, usize::MAX).expect("read topic");
            records.sort_by_key(|r| (r.0, r.1));
            records
                .into_iter()
                .map(|(p, off, key, value)| {
                    let value = value.expect("record has a value");
                    let mut v = decoder
                        .decode(&value)
                        .unwrap_or_else(|e| panic!("{topic}[{p}]@{off}: {e}"));
                    v["_partition"] = p.into();
                    v["_key"] = match key {
                        Some(k) => decoder
                            .decode(&k)
                            .unwrap_or_else(|e| panic!("key {topic}[{p}]@{off}: {e}")),
                        None => Value::Null,
                    };
                    v["_fingerprint"] = match ferry_schemas::Header::parse(&value) {
                        Ok((ferry_schemas::Header::SingleObject(fp), _)) => fp.to_string().into(),
                        Ok((h, _)) => h.to_string().into(),
                        Err(e) => panic!("{topic}[{p}]@{off}: {e}"),
                    };
                    v
                })
                .collect()
        })
        .await
        .expect("reader task")
    }

    /// Drops the slot and the database.
    pub async fn cleanup(self) {
        let admin = PgConfig {
            database: "postgres".into(),
            ..self.cfg.origin.postgres.clone()
        };
        drop(self.session);
        let Ok(a) = admin.connect().await else { return };
        for _ in 0..50 {
            let r = a
                .batch_execute(&format!(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{}' AND NOT active",
                    self.name
                ))
                .await;
            let left = a
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.name],
                )
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0);
            if r.is_ok() && left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = a
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// The server's current WAL write position, as a number.
pub async fn current_lsn(s: &Session) -> i64 {
    s.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .expect("current WAL position")
        .get(0)
}

/// Drops the database `pg` names (connecting to `postgres` on the same server), if it exists.
pub async fn drop_db(pg: &PgConfig) {
    let admin = PgConfig {
        database: "postgres".into(),
        ..pg.clone()
    };
    if let Ok(a) = admin.connect().await {
        let _ = a
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                pg.database
            ))
            .await;
    }
}

/// Capture running in this process.
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ferry_pipeline::error::CaptureError>>,
    pub stats: Arc<Stats>,
}

/// Starts capture in this process and waits (at most a minute, or until capture ends) for its
/// replication slot: from then on every commit reaches the stream, so a test's changes and WAL
/// messages are captured whatever the start-up cost (topic creation, leader election on a
/// freshly started broker).
pub async fn start_capture(cfg: &Config) -> Running {
    let (stop, rx) = watch::channel(false);
    let stats = Arc::new(Stats::default());
    let c = cfg.clone();
    let s = stats.clone();
    let task = tokio::spawn(async move { capture::run(&c, SinkMode::Kafka, rx, s).await });
    if let Ok(session) = cfg.origin.postgres.connect().await {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !task.is_finished() && Instant::now() < deadline {
            let exists = session
                // The slot is listed while Postgres still creates it (it waits for the
                // transactions running on the whole server, pgbench's of another test
                // included); only once it has a confirmed position are changes committed
                // from then on sure to be streamed.
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL",
                    &[&cfg.capture.slot],
                )
                .await
                .ok()
                .flatten()
                .is_some();
            if exists {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Running { stop, task, stats }
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(60), self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("capture did not stop cleanly: {other:?}"),
        }
    }
}

/// Rows of `events` whose `op` is `op`.
pub fn ops(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["op"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The capture state (snapshot and backfill progress) as stored in the origin cluster.
pub async fn capture_state(cfg: &Config) -> ferry_pipeline::store::state::CaptureState {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = topics::state_topic(&cfg.capture.topic_prefix);
    ferry_pipeline::store::state::load(&origin, &topic, &cfg.capture.slot)
        .await
        .expect("state")
}

/// Waits until a backfill job's state says it is done.
pub async fn wait_backfill_done(cfg: &Config, job: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let st = capture_state(cfg).await;
        if st
            .backfills
            .get(job)
            .is_some_and(|b| b.status() == ferry_pipeline::store::state::JobState::Done)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backfill {job} did not finish: {:?}",
            st.backfills.get(job)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Logs to stderr when `FERRY_TEST_LOG` is set (e.g. `FERRY_TEST_LOG=info`), for debugging.
/// The text that makes capture refuse a value (fault injection: see
/// `ferry_connectors::postgres::changes::UNREADABLE_MARKER_VAR`); no other value contains it.
pub const UNREADABLE: &str = "<ferry-test-unreadable>";

pub fn init_logs() {
    static MARKER: std::sync::Once = std::sync::Once::new();
    // Before any capture runs (the decoder reads it once); tests run as threads of one process.
    MARKER.call_once(|| {
        std::env::set_var(
            ferry_connectors::postgres::changes::UNREADABLE_MARKER_VAR,
            UNREADABLE,
        )
    });
    static ONCE: std::sync::Once = std::sync::Once::new();
    if let Ok(filter) = std::env::var("FERRY_TEST_LOG") {
        ONCE.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        });
    }
}

/// Deletes `topic` from `cluster`.
pub async fn delete_topic(cluster: &Cluster, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = cluster.client_config().create().expect("admin");
    let deleted = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete topic");
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
}

/// Creates `topic` in `cluster` (retrying while a topic of that name is still being deleted),
/// compacted or not.
pub async fn create_topic(cluster: &Cluster, topic: &str, partitions: i32, compacted: bool) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = cluster.client_config().create().expect("admin");
    let mut spec = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    if compacted {
        spec = spec.set("cleanup.policy", "compact");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let created = admin
            .create_topics(std::slice::from_ref(&spec), &AdminOptions::new())
            .await
            .expect("create topic");
        if created.iter().all(Result::is_ok) {
            return;
        }
        assert!(Instant::now() < deadline, "{created:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
