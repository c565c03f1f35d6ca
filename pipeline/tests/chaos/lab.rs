//! One scenario's world: private origin and destination brokers, an origin database with the
//! workload table, a destination database with an audit trigger, and `ferry capture`, `ship`
//! and `apply` as separate processes that can be killed, stopped and restarted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use ferry_connectors::postgres::{PgConfig, Session};
use ferry_pipeline::config::Config;
use ferry_schemas::manifest;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::broker::{self, Broker};
use crate::checker::{self, Figures};
use crate::net::{self, Net};
use crate::support::{drop_db, TestDb};
use crate::workload::{self, Shape, Shared, Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Capture,
    Ship,
    Apply,
    /// A second `ferry ship` in the same group, as another static member.
    ShipB,
}

impl Role {
    /// Every pipeline process, in start order.
    pub const ALL: [Role; 3] = [Role::Capture, Role::Ship, Role::Apply];

    fn command(self) -> &'static str {
        match self {
            Role::Capture => "capture",
            Role::Ship | Role::ShipB => "ship",
            Role::Apply => "apply",
        }
    }

    /// Its log's name.
    fn name(self) -> &'static str {
        match self {
            Role::ShipB => "ship-b",
            r => r.command(),
        }
    }
}

pub struct Opts {
    pub shape: Shape,
    /// Rows present before capture starts (read by the initial snapshot).
    pub seed_rows: i64,
    /// The destination broker in a network namespace behind a veth pair.
    pub netns: bool,
    /// Client-to-destination-broker latency in ms (mean, jitter), through a relay.
    pub latency: Option<(u64, u64)>,
    /// Origin Postgres server (default: the local stack's).
    pub origin_pg: Option<PgConfig>,
    /// `CREATE DATABASE` options for the origin database (an encoding, say).
    pub create: &'static str,
    /// Rows per initial snapshot chunk.
    pub snapshot_chunk_rows: Option<usize>,
    /// Extra TOML appended to the config (in its `[apply]` table, unless it opens another).
    pub toml: String,
    /// Extra keys of the `[ship]` table.
    pub ship_toml: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            shape: Shape {
                keys: 300,
                tps: 60,
                payload: 64,
            },
            seed_rows: 0,
            netns: false,
            latency: None,
            origin_pg: None,
            create: "",
            snapshot_chunk_rows: None,
            toml: String::new(),
            ship_toml: String::new(),
        }
    }
}

/// Readings taken in the background: lag, peak memory, recovery.
#[derive(Default)]
struct Samples {
    max_lag: Duration,
    max_rss_kib: u64,
    /// Per key, the versions that must be applied to count as recovered, and since when.
    target: Option<(Instant, BTreeMap<i64, i64>)>,
    recovered: Option<Duration>,
    applied: BTreeMap<i64, i64>,
}

pub struct Lab {
    pub db: TestDb,
    pub cfg: Config,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub origin: Broker,
    pub dest: Broker,
    pub net: Option<Net>,
    dest_pg: PgConfig,
    dest_session: Session,
    procs: BTreeMap<Role, Child>,
    pids: Arc<Mutex<BTreeMap<Role, u32>>>,
    samples: Arc<Mutex<Samples>>,
    sampler: tokio::task::JoinHandle<()>,
    pub history: Shared,
    workload: Option<Workload>,
    shape: Shape,
    pub figures: Figures,
    /// Records of the workload table's origin topic that are gone from it (the topic was
    /// deleted and created again): the checker reads them before the topic's present ones.
    pub earlier_origin: Vec<(i64, i64)>,
}

/// A memory figure of a process from /proc/<pid>/status, in KiB: `VmHWM` (peak resident) or
/// `VmRSS` (resident now).
pub fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_kib(pid, "VmHWM")
}

impl Lab {
    pub async fn new(scenario: &str, opts: Opts) -> Lab {
        let base = TestDb::new_config();
        let origin_pg = opts
            .origin_pg
            .clone()
            .unwrap_or_else(|| base.origin.postgres.clone());
        let mut db = TestDb::on_with(
            base.clone(),
            origin_pg,
            &format!("chaos_{scenario}"),
            opts.create,
        )
        .await;
        let dir = std::env::temp_dir().join(&db.name);
        std::fs::create_dir_all(&dir).expect("lab dir");

        let origin_port = broker::free_port();
        let origin_addr: SocketAddr = format!("127.0.0.1:{origin_port}").parse().expect("addr");
        let origin = Broker::start("origin", &dir, origin_addr, origin_addr.to_string(), None);
        let net = opts.netns.then(Net::new);
        let dest = match &net {
            Some(n) => {
                let listen: SocketAddr = format!("{}:9092", n.ns_ip).parse().expect("addr");
                let advertised = match opts.latency {
                    Some((d, j)) => net::delay_relay(listen, d, j).await.to_string(),
                    None => listen.to_string(),
                };
                Broker::start("destination", &dir, listen, advertised, Some(n.ns().into()))
            }
            None => {
                let port = broker::free_port();
                let a: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
                Broker::start("destination", &dir, a, a.to_string(), None)
            }
        };
        db.cfg.origin.kafka.bootstrap_servers = origin.bootstrap();
        db.cfg.destination.kafka.bootstrap_servers = dest.bootstrap();

        // The destination database, with the workload table made up front so that its audit
        // trigger sees every application.
        let dest_name = format!("{}_dst", db.name);
        let admin = PgConfig {
            database: "postgres".into(),
            ..base.origin.postgres.clone()
        };
        admin
            .connect()
            .await
            .expect("destination postgres")
            .batch_execute(&format!("CREATE DATABASE {dest_name}"))
            .await
            .expect("create destination database");
        let dest_pg = PgConfig {
            database: dest_name.clone(),
            ..base.origin.postgres.clone()
        };
        let dest_session = dest_pg.connect().await.expect("destination database");
        dest_session
            .batch_execute(workload::DEST_DDL)
            .await
            .expect("destination table");
        db.exec(workload::ORIGIN_DDL).await;
        let history: Shared = Arc::default();
        if opts.seed_rows > 0 {
            workload::seed(&db.session, &history, opts.seed_rows).await;
        }

        if let Some(n) = opts.snapshot_chunk_rows {
            db.cfg.capture.snapshot_chunk_rows = n;
        }
        let config = db.write_config(&dir);
        let extra = format!(
            r#"
[destination.postgres]
host = "{host}"
port = {port}
user = "{user}"
database = "{dest_name}"
[ship]
group_id = "{name}-ship"
instance_id = "chaos-ship"
max_events = 300
linger_ms = 200
{ship_toml}
[apply]
group_id = "{name}-apply"
instance_id = "chaos-apply"
{toml}"#,
            host = dest_pg.host,
            port = dest_pg.port,
            user = dest_pg.user,
            name = db.name,
            toml = opts.toml,
            ship_toml = opts.ship_toml,
        );
        let text = std::fs::read_to_string(&config).expect("config") + &extra;
        std::fs::write(&config, text).expect("config");
        let cfg = Config::load(&config).expect("the lab's config loads");

        let pids: Arc<Mutex<BTreeMap<Role, u32>>> = Arc::default();
        let samples: Arc<Mutex<Samples>> = Arc::default();
        let sampler = {
            let (pids, samples, history) = (pids.clone(), samples.clone(), history.clone());
            let pg = dest_pg.clone();
            tokio::spawn(async move {
                let Ok(s) = pg.connect().await else { return };
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let Ok(rows) = s.query("SELECT id, version FROM chaos_item", &[]).await else {
                        continue;
                    };
                    let applied: BTreeMap<i64, i64> =
                        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                    let now = Instant::now();
                    let lag = history.lock().expect("history").lag(&applied, now);
                    let rss = pids
                        .lock()
                        .expect("pids")
                        .values()
                        .filter_map(|p| peak_rss_kib(*p))
                        .max()
                        .unwrap_or(0);
                    let mut sm = samples.lock().expect("samples");
                    sm.max_lag = sm.max_lag.max(lag);
                    sm.max_rss_kib = sm.max_rss_kib.max(rss);
                    if sm.recovered.is_none() {
                        if let Some((since, target)) = &sm.target {
                            if target
                                .iter()
                                .all(|(k, v)| applied.get(k).is_some_and(|a| a >= v))
                            {
                                sm.recovered = Some(now - *since);
                            }
                        }
                    }
                    sm.applied = applied;
                }
            })
        };
        Lab {
            figures: Figures::new(scenario),
            earlier_origin: Vec::new(),
            db,
            cfg,
            config,
            dir,
            origin,
            dest,
            net,
            dest_pg,
            dest_session,
            procs: BTreeMap::new(),
            pids,
            samples,
            sampler,
            history,
            workload: None,
            shape: opts.shape,
        }
    }

    pub fn start_workload(&mut self) {
        assert!(self.workload.is_none(), "workload already runs");
        let shape = Shape { ..self.shape };
        self.workload = Some(Workload::start(
            self.db.cfg.origin.postgres.clone(),
            self.history.clone(),
            shape,
        ));
    }

    pub async fn stop_workload(&mut self) {
        if let Some(w) = self.workload.take() {
            w.stop().await;
        }
    }

    /// Starts `ferry <role>`; `failpoint` is a `FERRY_FAILPOINT` spec.
    pub fn spawn(&mut self, role: Role, failpoint: Option<&str>) {
        assert!(!self.procs.contains_key(&role), "{role:?} already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", role.name())))
            .expect("log file");
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args(["--config", &self.config.to_string_lossy(), role.command()])
            .env("RUST_LOG", "info,rdkafka=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if role == Role::ShipB {
            c.env("FERRY__SHIP__INSTANCE_ID", "chaos-ship-b");
        }
        if let Some(f) = failpoint {
            c.env("FERRY_FAILPOINT", f);
        } else {
            c.env_remove("FERRY_FAILPOINT");
        }
        let child = c.spawn().expect("spawn ferry");
        self.pids.lock().expect("pids").insert(role, child.id());
        self.procs.insert(role, child);
    }

    pub fn start_all(&mut self) {
        for r in Role::ALL {
            self.spawn(r, None);
        }
    }

    pub fn pid(&self, role: Role) -> u32 {
        self.procs[&role].id()
    }

    fn note_rss(&mut self, pid: u32) {
        if let Some(kib) = peak_rss_kib(pid) {
            let mut sm = self.samples.lock().expect("samples");
            sm.max_rss_kib = sm.max_rss_kib.max(kib);
        }
    }

    /// kill -9.
    pub fn kill9(&mut self, role: Role) {
        let mut child = self.procs.remove(&role).expect("process runs");
        self.note_rss(child.id());
        let _ = child.kill();
        let _ = child.wait();
        self.pids.lock().expect("pids").remove(&role);
    }

    /// Graceful stop (SIGTERM).
    pub async fn stop(&mut self, role: Role) {
        let mut child = self.procs.remove(&role).expect("process runs");
        self.note_rss(child.id());
        broker::signal(child.id(), "-TERM");
        let st = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("task");
        self.pids.lock().expect("pids").remove(&role);
        let st = st.expect("wait");
        assert!(
            st.success(),
            "{role:?} stopped with {st}; see {}",
            self.log(role)
        );
    }

    /// Waits for a process (that is expected to die, at a failpoint say) to exit.
    pub async fn wait_exit(&mut self, role: Role, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.procs.get_mut(&role).expect("process runs");
            let pid = child.id();
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.procs.remove(&role);
                self.pids.lock().expect("pids").remove(&role);
                return st;
            }
            self.note_rss(pid);
            assert!(
                Instant::now() < deadline,
                "{role:?} still runs after {timeout:?}; see {}",
                self.log(role)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn running(&mut self, role: Role) -> bool {
        match self.procs.get_mut(&role) {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    fn log_path(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}.log", role.name()))
    }

    /// Where a process logs, with the log's last lines: the lab's directory is gone by the
    /// time anyone reads a CI failure.
    pub fn log(&self, role: Role) -> String {
        const TAIL: usize = 30;
        let path = self.log_path(role);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(TAIL)..].join("\n");
        format!("{}; its last lines:\n{tail}", path.display())
    }

    /// Waits until `role`'s log holds `needle` at least `times` times; whether it did in time.
    pub async fn await_log(
        &self,
        role: Role,
        needle: &str,
        times: usize,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(self.log_path(role)).unwrap_or_default();
            if text.matches(needle).count() >= times {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// [`Lab::log`] of every process.
    pub fn logs(&self) -> String {
        Role::ALL.map(|r| self.log(r)).join("\n")
    }

    /// Runs a `ferry` command against the lab's config.
    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["--config", &self.config.to_string_lossy()])
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run ferry")
    }

    /// From now on, recovery means: everything committed up to now is applied.
    pub fn mark_heal(&self) {
        let target = self.history.lock().expect("history").last();
        let mut sm = self.samples.lock().expect("samples");
        sm.target = Some((Instant::now(), target));
        sm.recovered = None;
    }

    /// Waits for the recovery begun at the last [`Lab::mark_heal`]; records and returns it.
    pub async fn recovery(&mut self, timeout: Duration) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.samples.lock().expect("samples").recovered;
            if let Some(r) = r {
                self.figures.recovery_secs = self.figures.recovery_secs.max(r.as_secs_f64());
                return Some(r);
            }
            if Instant::now() > deadline {
                self.figures
                    .notes
                    .push(format!("no recovery within {timeout:?}"));
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new session on the destination database.
    pub async fn dest_db(&self) -> Session {
        self.dest_pg.connect().await.expect("destination database")
    }

    /// Waits for a process to exit on its own; returns whether it failed and its log.
    pub async fn halted(&mut self, role: Role, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.running(role) {
                let st = self.wait_exit(role, timeout).await;
                let log = std::fs::read_to_string(self.log_path(role)).unwrap_or_default();
                return (!st.success()).then_some(log);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// Versions the destination holds, as last sampled.
    pub fn applied(&self) -> BTreeMap<i64, i64> {
        self.samples.lock().expect("samples").applied.clone()
    }

    /// Lag right now (seconds), as of the last sample.
    pub fn lag_now(&self) -> Duration {
        let applied = self.applied();
        self.history
            .lock()
            .expect("history")
            .lag(&applied, Instant::now())
    }

    /// Right after a kill: offsets the shipper committed must be covered by batches in the
    /// destination, and batches below the applier's committed offsets must be applied.
    pub async fn check_checkpoints(&mut self) {
        // Offsets first, then what is durable: anything durable later was durable then too.
        let cfg = self.cfg.clone();
        let offsets = tokio::task::spawn_blocking(move || Offsets::read(&cfg))
            .await
            .expect("task");
        let applied: std::collections::HashSet<String> = self
            .dest_session
            .query("SELECT batch_id FROM ferry.applied_batches", &[])
            .await
            .expect("ferry.applied_batches")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let cfg = self.cfg.clone();
        let (ahead, notes) = tokio::task::spawn_blocking(move || offsets.ahead(&cfg, &applied))
            .await
            .expect("task");
        self.figures.checkpoint_ahead += ahead;
        self.figures.notes.extend(notes);
    }

    /// Right after capture was killed: the slot's confirmed position must not be ahead of
    /// what the origin topic holds.
    pub async fn check_capture(&mut self) {
        let Some(confirmed) = self.db.confirmed().await else {
            return;
        };
        let (o, prefix) = (
            Cluster::new("origin", self.cfg.origin.kafka.clone()),
            self.cfg.capture.topic_prefix.clone(),
        );
        let records = tokio::task::spawn_blocking(move || checker::topic_versions(&o, &prefix))
            .await
            .expect("task");
        let history = self.history.lock().expect("history").clone();
        let (ahead, notes) = checker::capture_ahead(&history, confirmed, &records);
        self.figures.checkpoint_ahead += ahead;
        self.figures.notes.extend(notes);
    }

    /// Stops the workload, waits until the destination holds every committed version (or
    /// `drain` passes), stops everything, runs the checker, and drops the lab's databases.
    pub async fn finish(mut self, drain: Duration) -> Figures {
        self.stop_workload().await;
        self.mark_heal();
        let drained = self.recovery(drain).await.is_some();
        let roles: Vec<Role> = self.procs.keys().copied().collect();
        for r in roles {
            self.kill9(r);
        }
        self.sampler.abort();
        let history = std::mem::take(&mut *self.history.lock().expect("history"));
        {
            let sm = self.samples.lock().expect("samples");
            self.figures.max_lag_secs = self.figures.max_lag_secs.max(sm.max_lag.as_secs_f64());
            self.figures.max_rss_mib = self.figures.max_rss_mib.max(sm.max_rss_kib as f64 / 1024.0);
        }
        let f = &mut self.figures;
        f.iterations += 1;
        f.txns += history.txns;
        f.versions += history.versions();

        let (o, d, prefix) = (
            Cluster::new("origin", self.cfg.origin.kafka.clone()),
            Cluster::new("destination", self.cfg.destination.kafka.clone()),
            self.cfg.capture.topic_prefix.clone(),
        );
        let (origin_records, dest_records) = tokio::task::spawn_blocking(move || {
            (
                checker::topic_versions(&o, &prefix),
                checker::topic_versions(&d, &prefix),
            )
        })
        .await
        .expect("task");
        let origin_records = [std::mem::take(&mut self.earlier_origin), origin_records].concat();
        checker::check_origin_topic(f, &history, &origin_records);
        checker::check_dest_topic(f, &history, &dest_records);
        let rows: BTreeMap<i64, i64> = self
            .dest_session
            .query("SELECT id, version FROM chaos_item", &[])
            .await
            .expect("destination rows")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let audit: Vec<checker::Applied> = self
            .dest_session
            .query(
                "SELECT id, version, lsn, lsn_seq FROM chaos_audit ORDER BY seq",
                &[],
            )
            .await
            .expect("audit rows")
            .iter()
            .map(|r| checker::Applied {
                key: r.get(0),
                version: r.get(1),
                change: (r.get(2), r.get(3)),
            })
            .collect();
        checker::check_dest_db(f, &history, &rows, &audit);
        if !drained {
            f.notes.push(format!(
                "the destination did not catch up within {drain:?}; logs in {}",
                self.dir.display()
            ));
        }
        let keep = !f.violations().is_empty()
            || std::env::var("FERRY_CHAOS_KEEP_LOGS").is_ok_and(|v| v == "1");
        let figures = std::mem::take(&mut self.figures);
        self.cleanup(keep).await;
        figures
    }

    async fn cleanup(self, keep_logs: bool) {
        let Lab {
            db,
            dir,
            mut origin,
            mut dest,
            net,
            dest_pg,
            dest_session,
            ..
        } = self;
        drop(dest_session);
        origin.kill9();
        dest.kill9();
        drop(net);
        drop_db(&dest_pg).await;
        db.cleanup().await;
        if keep_logs {
            eprintln!("chaos: logs kept in {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Per partition, the offsets `group` committed in `topic`.
fn committed(cluster: &Cluster, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let mut c = cluster.client_config();
    c.set("group.id", group).set("enable.auto.commit", "false");
    let Ok(consumer) = c.create::<BaseConsumer>() else {
        return BTreeMap::new();
    };
    let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
        return BTreeMap::new();
    };
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    let Ok(done) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return BTreeMap::new();
    };
    done.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// The shipper's committed offsets in the workload table's topic and the applier's in the
/// batch topic.
struct Offsets {
    ship: BTreeMap<i32, i64>,
    apply: BTreeMap<i32, i64>,
}

fn table_topic(cfg: &Config) -> String {
    ferry_pipeline::topics::table_topic(
        &cfg.capture.topic_prefix,
        &ferry_schemas::TableId::new("public", workload::TABLE),
    )
}

impl Offsets {
    fn read(cfg: &Config) -> Offsets {
        let o = Cluster::new("origin", cfg.origin.kafka.clone());
        let d = Cluster::new("destination", cfg.destination.kafka.clone());
        Offsets {
            ship: committed(&o, &cfg.ship.group_id, &table_topic(cfg)),
            apply: committed(&d, &cfg.apply.group_id, &cfg.batch_topic()),
        }
    }

    /// Counts committed offsets ahead of durable work (see [`Lab::check_checkpoints`]).
    fn ahead(
        self,
        cfg: &Config,
        applied: &std::collections::HashSet<String>,
    ) -> (u64, Vec<String>) {
        let d = Cluster::new("destination", cfg.destination.kafka.clone());
        let table_topic = table_topic(cfg);
        let batch_topic = cfg.batch_topic();
        let batches =
            ferry_pipeline::inspect::read_all(&d, &batch_topic, usize::MAX).unwrap_or_default();
        // Shipper: the union of shipped ranges must reach each committed offset.
        let mut ranges: BTreeMap<i32, Vec<(i64, i64)>> = BTreeMap::new();
        let mut valid: Vec<(i32, i64, String)> = Vec::new();
        for (p, off, _, value) in &batches {
            let Some(value) = value else { continue };
            if let Ok((m, _)) = manifest::unframe(value) {
                if m.origin_topic == table_topic {
                    ranges
                        .entry(m.origin_partition)
                        .or_default()
                        .push((m.first_offset, m.last_offset));
                }
                valid.push((*p, *off, m.batch_id));
            }
        }
        let (mut ahead, mut notes) = (0, Vec::new());
        for (p, c) in self.ship {
            let mut rs = ranges.remove(&p).unwrap_or_default();
            rs.sort_unstable();
            let mut next = 0;
            for &(first, last) in &rs {
                if first <= next {
                    next = next.max(last + 1);
                }
            }
            if c > next {
                ahead += 1;
                let near: Vec<_> = rs.iter().filter(|r| r.1 + 5 >= next).take(4).collect();
                notes.push(format!(
                    "shipper committed {table_topic}[{p}] offset {c}, batches cover only up to \
                     {next} (shipped ranges from there: {near:?})"
                ));
            }
        }
        // Applier: every valid batch below its committed offset is in ferry.applied_batches.
        for (p, off, id) in valid {
            if self.apply.get(&p).is_some_and(|&c| off < c) && !applied.contains(&id) {
                ahead += 1;
                notes.push(format!(
                    "applier committed past {batch_topic}[{p}]@{off} ({id}), which is not applied"
                ));
            }
        }
        (ahead, notes)
    }
}
