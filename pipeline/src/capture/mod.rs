//! The capture loop: Postgres logical replication → change events → origin Kafka topics.
//!
//! ```text
//!  ReplicationClient ──recv──▶ capture loop ──send──▶ rdkafka producer ──▶ origin broker
//!   (pgwire worker)              │    ▲                     │ delivery futures
//!        ▲                       │    │ safe LSN (watch)     ▼
//!        └── update_applied_lsn ─┘    └──────────────── acker task (awaits in WAL order)
//! ```
//!
//! Progress: the position confirmed to Postgres (the slot's flush LSN) only moves to a
//! transaction's end LSN once every record of that transaction and of every transaction before
//! it has been acknowledged by the origin broker (`acks=all`, idempotent producer). It never
//! moves backwards. Kill the process at any point and restart: the slot replays from the last
//! confirmed position, so nothing is lost and only the unacknowledged tail is produced twice.
//! A keepalive's position is confirmed only between transactions, behind the same queue, which
//! is what lets an idle database's slot advance; a periodic heartbeat message keeps WAL moving.
//! A value capture cannot read stops only its table ([`hold`]): its changes are kept in order in
//! the held topic, and the others go on. A malformed message stops capture with an error naming
//! the LSN; nothing after it is acknowledged.

pub mod hold;
pub mod sink;
pub mod snapshot;
pub mod stats;

pub use stats::Stats;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use ferry_connectors::postgres::changes::{ChangeDecoder, Output};
use ferry_connectors::postgres::{catalog, values, PgConfig, Session};
use ferry_schemas::{EncodedSchema, Lsn, TableId};
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::error::{pg, CaptureError};
use crate::store::state::{self, Backfill, CaptureState, SampleState, Stopped, TableProgress};
use crate::throttle::backfill::{BackfillThrottle, THROTTLE_TICK};
use crate::wal::{self, BackfillRequest, JobAction, JobControl, RepairRequest, TableResume};
use ferry_connectors::postgres::changes::RawChange;
use sink::{AckBatch, Sink};
use snapshot::{ChunkStart, Snapshotter};

/// Where capture sends events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkMode {
    /// The origin Kafka cluster (normal operation).
    Kafka,
    /// Decode and encode only; nothing is sent and the slot is still advanced (benchmarks).
    Null,
}

/// Deliveries are handed to the acker in slices of this many, so a huge transaction does not
/// hold millions of futures in one vector.
const ACK_SLICE: usize = 2_000;

/// Transactions whose acknowledgement may be outstanding at once.
const ACK_QUEUE: usize = 16_384;

/// How many recently streamed transaction ids the snapshot visibility check remembers.
const RECENT_XIDS: usize = 1_024;

/// Runs capture until `stop` turns true, retrying transient failures with exponential back-off
/// and jitter. Returns the first permanent error.
pub async fn run(
    cfg: &Config,
    mode: SinkMode,
    stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> Result<(), CaptureError> {
    crate::runtime::retry::retrying(
        cfg.capture.max_backoff_ms,
        stop,
        "capture",
        || {
            stats.retries_total.fetch_add(1, Ordering::Relaxed);
        },
        |mut stop| {
            let stats = stats.clone();
            async move { run_once(cfg, mode, &mut stop, &stats).await }
        },
    )
    .await
}

/// Owns the acker task: aborts it when dropped.
struct Owned<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn prepare_slot(
    session: &Session,
    cfg: &Config,
    target: &str,
    state: &mut CaptureState,
) -> Result<(), CaptureError> {
    let slot = &cfg.capture.slot;
    match catalog::slot(session, slot)
        .await
        .map_err(pg(target, "looking up the replication slot"))?
    {
        None => {
            if !state.tables.is_empty() {
                tracing::warn!(
                    slot,
                    "replication slot is missing although capture ran before; changes since then \
                     are gone from the WAL, so every table is snapshotted again"
                );
            }
            *state = CaptureState::default();
            session
                .query_one(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[slot],
                )
                .await
                .map_err(pg(target, format!("creating replication slot {slot}")))?;
            tracing::info!(slot, "replication slot created");
        }
        Some(info) => {
            if info.plugin.as_deref() != Some("pgoutput") {
                return Err(CaptureError::Setup(format!(
                    "replication slot {slot} uses plugin {:?}; Ferry needs pgoutput. Drop it \
                     (SELECT pg_drop_replication_slot('{slot}')) or set capture.slot to another name",
                    info.plugin
                )));
            }
            if info.database.as_deref() != Some(cfg.origin.postgres.database.as_str()) {
                return Err(CaptureError::Setup(format!(
                    "replication slot {slot} belongs to database {:?}, not {}; set capture.slot \
                     to another name",
                    info.database, cfg.origin.postgres.database
                )));
            }
            if info.wal_status.as_deref() == Some("lost") {
                return Err(CaptureError::Setup(format!(
                    "replication slot {slot} was invalidated by Postgres (wal_status = lost): WAL \
                     it needed is gone. Drop the slot and start again to re-snapshot"
                )));
            }
        }
    }
    Ok(())
}

async fn run_once(
    cfg: &Config,
    mode: SinkMode,
    stop: &mut watch::Receiver<bool>,
    stats: &Stats,
) -> Result<(), CaptureError> {
    Capture::start(cfg, mode, stop, stats).await?.run().await
}

/// What woke the capture loop.
enum Event {
    /// The operator asked to stop.
    Stop,
    /// The acker published a new safe position.
    Acknowledged(Lsn),
    /// The replication stream delivered something.
    Replication(ReplicationEvent),
    /// Time to re-rate backfills.
    ThrottleTick,
    /// Time to write a heartbeat into the WAL.
    Heartbeat,
    /// Time to look for tables added to the publication.
    PublicationPoll,
    /// Time to log progress.
    Report,
}

/// The transaction being streamed.
#[derive(Default)]
struct Txn {
    /// Between a Begin and its Commit.
    open: bool,
    /// It carried live changes (watermark-only transactions are not live commits).
    live: bool,
    /// It moved snapshot or backfill state, to be saved once its end LSN is safe.
    moved_state: bool,
}

/// The loop's timers.
struct Ticks {
    throttle: tokio::time::Interval,
    heartbeat: tokio::time::Interval,
    publication: tokio::time::Interval,
    report: tokio::time::Interval,
    /// Events counted and the time at the last report.
    last_report: (u64, Instant),
}

/// One run of the capture loop: a connected source, stream, sink and acker, and the state the
/// handlers below move. See the module docs for the progress rule each handler keeps.
struct Capture<'a> {
    cfg: &'a Config,
    stats: &'a Stats,
    stop: &'a mut watch::Receiver<bool>,
    /// `host:port/db` of the origin, for errors.
    target: String,
    session: Session,
    /// Where backfill chunks are read (the primary when no replica is configured).
    replica: Option<Session>,
    sink: Sink,
    state: CaptureState,
    state_topic: String,
    /// States to save once the LSN they follow is acknowledged, oldest first.
    state_after: VecDeque<(Lsn, CaptureState)>,
    snap: Snapshotter,
    throttle: BackfillThrottle,
    repl: ReplicationClient,
    decoder: ChangeDecoder,
    outputs: Vec<Output>,
    /// Deliveries of the open transaction not yet handed to the acker.
    pending: Vec<(String, rdkafka::producer::DeliveryFuture)>,
    ack_tx: mpsc::Sender<AckBatch>,
    safe_rx: watch::Receiver<Lsn>,
    acker: Owned<Result<(), CaptureError>>,
    txn: Txn,
    /// Transactions streamed most recently, for the snapshot visibility check.
    recent_xids: VecDeque<u32>,
    ticks: Ticks,
    /// The newest schema version the stream announced per table.
    last_schema: HashMap<TableId, Arc<EncodedSchema>>,
    /// Every schema version by fingerprint, for decoding held changes again.
    versions: hold::Versions,
}

/// How a replay of a stopped table's held changes ended.
enum Replay {
    /// Every held change was sent (`sent` events), or, for a keyed row that still cannot be
    /// read, its key is to be read again from the table (`repairs`).
    Done {
        sent: u64,
        repairs: Vec<Vec<String>>,
    },
    /// A held change still cannot be read (and cannot be replaced by a read): the table stays
    /// stopped from it.
    /// `from` is the held record's offset.
    Unreadable {
        since: (u64, u64),
        from: i64,
        reason: String,
    },
}

impl<'a> Capture<'a> {
    /// Checks the source, loads the stored state, prepares slot, publication and topics, and
    /// opens the replication stream.
    async fn start(
        cfg: &'a Config,
        mode: SinkMode,
        stop: &'a mut watch::Receiver<bool>,
        stats: &'a Stats,
    ) -> Result<Capture<'a>, CaptureError> {
        let pgc: &PgConfig = &cfg.origin.postgres;
        let target = pgc.display();
        let c = &cfg.capture;
        let session = pgc.connect().await.map_err(pg(&target, "connecting"))?;
        check_source(&session, pgc, &target).await?;
        let publication =
            catalog::ensure_publication(&session, &c.publication, &cfg.tables(), c.all_tables)
                .await
                .map_err(pg(
                    &target,
                    format!("creating publication {}", c.publication),
                ))?;
        if c.ddl_trigger {
            match catalog::install_ddl_trigger(&session).await {
                Ok(()) => tracing::debug!("DDL event trigger ferry_columns installed"),
                Err(e) => tracing::warn!(error = %crate::error::causes(&e),
                    "could not install the DDL event trigger ferry_columns (it needs superuser); \
                     renamed columns are followed only while capture keeps up with the DDL \
                     (set capture.ddl_trigger = false to silence this)"),
            }
        }
        if publication == catalog::Publication::NoTables {
            return Err(CaptureError::Setup(format!(
                "publication {} does not exist and capture.tables is empty: name the tables                  (capture.tables = [\"public.orders\", …]), create the publication yourself, or                  set capture.all_tables = true to create it FOR ALL TABLES (needs superuser, and                  Postgres then refuses UPDATE and DELETE on tables without a replica identity)",
                c.publication
            )));
        }

        let origin = Cluster::new("origin", cfg.origin.kafka.clone());
        let state_topic = crate::topics::state_topic(&c.topic_prefix);
        let (mut sink, mut state) = match mode {
            SinkMode::Kafka => {
                let sink = Sink::kafka(
                    origin.clone(),
                    &c.topic_prefix,
                    c.partitions,
                    c.linger_ms,
                    cfg.origin_registry()?,
                    cfg.topics.retention_ms,
                )
                .await?;
                (sink, state::load(&origin, &state_topic, &c.slot).await?)
            }
            SinkMode::Null => (Sink::Null { buf: Vec::new() }, CaptureState::default()),
        };
        prepare_slot(&session, cfg, &target, &mut state).await?;

        let mut snap = Snapshotter::new(
            (&c.slot, &c.publication),
            &cfg.origin.region,
            &pgc.database,
            (c.snapshot_chunk_rows, c.snapshot_chunk_bytes),
            &target,
        );
        let tables = catalog::publication_tables(&session, &c.publication)
            .await
            .map_err(pg(&target, "listing publication tables"))?;
        let mut state_dirty = false;
        for t in &tables {
            match state.tables.get(&t.to_string()) {
                Some(TableProgress::Done) => {}
                _ if !c.snapshot => {
                    state.tables.insert(t.to_string(), TableProgress::Done);
                    state_dirty = true;
                }
                _ => snap.enqueue(t.clone()),
            }
        }
        if state_dirty {
            if let Some(p) = sink.producer() {
                state::save(p, &state_topic, &c.slot, &state).await?;
            }
        }
        // Create every table's topic up front so consumers can subscribe before the first
        // change.
        let mut last_schema = HashMap::new();
        for t in &tables {
            if let Some(s) =
                register_table(&session, &mut sink, (pgc, &c.publication), t, &target).await?
            {
                last_schema.insert(t.clone(), s);
            }
        }
        for (job, b) in &state.backfills {
            if b.progress != Some(TableProgress::Done) {
                snap.enqueue_backfill(job.clone());
            }
        }
        let mut decoder = ChangeDecoder::new(cfg.origin.region.clone(), pgc.database.clone());
        for (name, st) in &state.stopped {
            if let Some(t) = crate::config::parse_table(name) {
                tracing::error!(table = name, since = %Lsn(st.since.0), reason = st.reason,
                    "table is stopped: its changes are held until `ferry resume-table {name}`");
                decoder.hold(t.clone());
                snap.set_table_stopped(&t, true);
            }
        }
        stats
            .tables_stopped
            .store(state.stopped.len() as u64, Ordering::Relaxed);
        sync_backfills(&mut snap, &state);
        let mut versions = hold::Versions::default();
        for s in last_schema.values() {
            versions.add(s);
        }
        tracing::info!(
            slot = c.slot,
            publication = c.publication,
            tables = tables.len(),
            to_snapshot = tables.len() - snap_count(&snap, &tables),
            "capture starting"
        );
        // Backfill chunks read from the replica when one is configured (watermarks still go
        // to the primary, through `session`).
        let replica = match &cfg.backfill.replica {
            Some(r) => Some(
                r.connect()
                    .await
                    .map_err(pg(&r.display(), "connecting to the backfill replica"))?,
            ),
            None => None,
        };
        let repl = connect_replication(cfg).await?;

        // One batch per source transaction: an OLTP stream of small transactions needs
        // thousands in flight while the broker acknowledges (a few ms to tens of ms each), or
        // capture stalls on the queue. A batch without deliveries is a few dozen bytes.
        let (ack_tx, ack_rx) = mpsc::channel::<AckBatch>(ACK_QUEUE);
        let (safe_tx, safe_rx) = watch::channel(Lsn::ZERO);
        let acker = Owned(tokio::spawn(sink::acker(ack_rx, safe_tx)));
        let every = |ms: u64| tokio::time::interval(Duration::from_millis(ms.max(100)));
        Ok(Capture {
            cfg,
            stats,
            stop,
            target,
            session,
            replica,
            sink,
            state,
            state_topic,
            state_after: VecDeque::new(),
            snap,
            throttle: BackfillThrottle::new(cfg),
            repl,
            decoder,
            outputs: Vec::new(),
            pending: Vec::new(),
            ack_tx,
            safe_rx,
            acker,
            txn: Txn::default(),
            recent_xids: VecDeque::with_capacity(RECENT_XIDS),
            last_schema,
            versions,
            ticks: Ticks {
                throttle: tokio::time::interval(THROTTLE_TICK),
                heartbeat: every(c.heartbeat_interval_ms),
                publication: every(c.publication_poll_ms),
                report: tokio::time::interval(Duration::from_secs(10)),
                last_report: (stats.events_total.load(Ordering::Relaxed), Instant::now()),
            },
        })
    }

    /// The loop: between transactions, start a snapshot or backfill chunk when one is due;
    /// then handle whatever comes first.
    async fn run(mut self) -> Result<(), CaptureError> {
        loop {
            self.start_chunk_if_due().await?;
            match self.next_event().await? {
                Event::Stop => break,
                Event::Acknowledged(safe) => self.on_acknowledged(safe).await?,
                Event::Replication(ev) => {
                    if !self.on_replication(ev).await? {
                        break;
                    }
                }
                Event::ThrottleTick => self.on_throttle_tick(),
                Event::Heartbeat => self.on_heartbeat().await?,
                Event::PublicationPoll => self.on_publication_poll().await?,
                Event::Report => self.on_report(),
            }
        }
        self.finish().await
    }

    async fn next_event(&mut self) -> Result<Event, CaptureError> {
        tokio::select! {
            biased;
            _ = self.stop.changed() => Ok(Event::Stop),
            joined = &mut self.acker.0 => Err(match joined {
                Ok(Err(e)) => e,
                Ok(Ok(())) => CaptureError::Setup("internal: acknowledgement task ended early".into()),
                Err(e) => CaptureError::Setup(format!("internal: acknowledgement task failed: {e}")),
            }),
            Ok(()) = self.safe_rx.changed() => Ok(Event::Acknowledged(*self.safe_rx.borrow_and_update())),
            ev = self.repl.recv() => match ev {
                Ok(Some(ev)) => Ok(Event::Replication(ev)),
                Ok(None) => Err(CaptureError::Replication {
                    slot: self.cfg.capture.slot.clone(),
                    source: pgwire_replication::PgWireError::Internal("stream ended".into()),
                }),
                Err(source) => Err(CaptureError::Replication {
                    slot: self.cfg.capture.slot.clone(),
                    source,
                }),
            },
            _ = self.ticks.throttle.tick() => Ok(Event::ThrottleTick),
            _ = self.ticks.heartbeat.tick() => Ok(Event::Heartbeat),
            _ = self.ticks.publication.tick() => Ok(Event::PublicationPoll),
            _ = self.ticks.report.tick() => Ok(Event::Report),
        }
    }

    /// Live changes and snapshots first; a backfill chunk only when the throttle allows, and
    /// never inside a streamed transaction.
    async fn start_chunk_if_due(&mut self) -> Result<(), CaptureError> {
        if self.txn.open {
            return Ok(());
        }
        let cap = self.throttle.chunk_rows();
        let due = self.snap.wants_chunk(false)
            || (self.snap.wants_chunk(true)
                && self
                    .throttle
                    .allows(self.snap.next_backfill_rows(&self.state, cap)));
        if !due {
            return Ok(());
        }
        let recent: HashSet<u32> = self.recent_xids.iter().copied().collect();
        let started = self
            .snap
            .start_chunk(
                &self.session,
                self.replica.as_deref(),
                &self.state,
                &recent,
                cap,
            )
            .await?;
        match started {
            ChunkStart::Nothing => {}
            ChunkStart::Started(schema) => {
                self.sink.register(&schema).await?;
                self.versions.add(&schema);
            }
            ChunkStart::Unreadable { table, reason } => {
                // Between transactions: everything later of this table is held; the state is
                // saved behind the positions already handed to the acker.
                let since = (self.decoder.txn_lsn() + 1, 0);
                self.stop_table(&table, since, reason).await;
                let at = self
                    .state_after
                    .back()
                    .map_or(Lsn(self.decoder.txn_lsn()), |(l, _)| *l);
                self.state_after.push_back((at, self.state.clone()));
            }
        }
        Ok(())
    }

    /// Everything up to `safe` is acknowledged: confirm it to Postgres, and save the states
    /// that waited for it.
    async fn on_acknowledged(&mut self, safe: Lsn) -> Result<(), CaptureError> {
        // States first: a position is confirmed only once the state that goes with it is
        // saved (a stopped table must still be stopped after a crash, or its held changes
        // would be skipped).
        while self.state_after.front().is_some_and(|(l, _)| *l <= safe) {
            let Some((_, st)) = self.state_after.pop_front() else {
                break;
            };
            if let Some(p) = self.sink.producer() {
                state::save(p, &self.state_topic, &self.cfg.capture.slot, &st).await?;
            }
            let done = st
                .tables
                .values()
                .filter(|p| **p == TableProgress::Done)
                .count();
            self.stats
                .snapshots_done_total
                .store(done as u64, Ordering::Relaxed);
        }
        self.repl
            .update_applied_lsn(pgwire_replication::Lsn::from_u64(safe.0));
        self.stats.confirmed_lsn.store(safe.0, Ordering::Relaxed);
        Ok(())
    }

    /// One replication event; false when the server ended the stream as asked.
    async fn on_replication(&mut self, ev: ReplicationEvent) -> Result<bool, CaptureError> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => self.on_begin(final_lsn.as_u64(), xid, commit_time_micros),
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => self.on_data(wal_start.as_u64(), &data).await?,
            ReplicationEvent::Message {
                prefix,
                content,
                lsn,
                ..
            } => self.on_message(&prefix, &content, lsn.as_u64()).await?,
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.on_commit(Lsn(end_lsn.as_u64())).await?;
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.on_keepalive(Lsn(wal_end.as_u64())).await?;
            }
            ReplicationEvent::StoppedAt { .. } => return Ok(false),
        }
        Ok(true)
    }

    fn on_begin(&mut self, final_lsn: u64, xid: u32, commit_time_micros: i64) {
        self.decoder.begin(final_lsn, xid, commit_time_micros);
        self.txn.open = true;
        if self.recent_xids.len() == RECENT_XIDS {
            self.recent_xids.pop_front();
        }
        self.recent_xids.push_back(xid);
    }

    /// A pgoutput message: decode it and send its changes (deliveries join the transaction's
    /// batch; a huge transaction hands them to the acker in slices).
    async fn on_data(&mut self, wal_start: u64, data: &bytes::Bytes) -> Result<(), CaptureError> {
        self.decoder
            .decode(&self.session, wal_start, data, &mut self.outputs)
            .await?;
        for out in std::mem::take(&mut self.outputs) {
            match out {
                Output::Schema(s) => {
                    self.sink.register(&s).await?;
                    self.versions.add(&s);
                    self.on_new_version(s).await?;
                }
                Output::Held {
                    schema,
                    change,
                    reason,
                } => {
                    self.txn.live = true;
                    self.on_held(schema, change, reason).await?;
                }
                Output::Event(s, e) => {
                    self.txn.live = true;
                    if e.op == ferry_schemas::Op::Create
                        && s.has_key()
                        && snapshot::leaves_toast_out(&e)
                    {
                        // A key change whose new row left an unchanged TOASTed value out (the
                        // source sends it with neither image): read the row again, so the
                        // destination gets the value instead of NULL.
                        if let Some(key) =
                            e.after.as_deref().and_then(|a| snapshot::key_texts(&s, a))
                        {
                            tracing::info!(table = %s.table().id, "key changed with an unsent TOASTed value; re-reading the row");
                            self.snap.enqueue_repair(s.table().id.clone(), vec![key]);
                        }
                    }
                    self.emit(&s, &e).await?;
                }
            }
        }
        if self.pending.len() >= ACK_SLICE {
            self.hand_to_acker(None).await?;
        }
        Ok(())
    }

    /// Sends one streamed (or replayed) change, unless a pending snapshot absorbs it.
    async fn emit(
        &mut self,
        s: &Arc<EncodedSchema>,
        e: &ferry_schemas::ChangeEvent,
    ) -> Result<(), CaptureError> {
        self.snap.observe(s, e);
        if self.snap.absorbs(s, e) {
            return Ok(());
        }
        let n = self.sink.send(s, e, &mut self.pending).await?;
        self.stats
            .encoded_bytes_total
            .fetch_add(n as u64, Ordering::Relaxed);
        self.stats.events_total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A change of a stopped table, or one whose value cannot be read (`reason`), which stops
    /// its table: kept in the held topic, in WAL order, with the transaction's other records.
    async fn on_held(
        &mut self,
        schema: Arc<EncodedSchema>,
        change: RawChange,
        reason: Option<String>,
    ) -> Result<(), CaptureError> {
        let table = schema.table().id.clone();
        let name = table.to_string();
        if let Some(reason) = &reason {
            let key = change
                .key_texts(&schema.table().key_indexes())
                .filter(|_| schema.has_key())
                .map_or_else(String::new, |k| format!(" (key {})", k.join(", ")));
            self.stop_table(&table, (change.lsn, change.seq), format!("{reason}{key}"))
                .await;
            self.txn.moved_state = true;
        }
        let lsn = Lsn(change.lsn);
        let record = hold::HeldChange {
            table: name,
            value_fingerprint: schema.value_fp.to_string(),
            reason,
            change,
        };
        let json = serde_json::to_vec(&record)
            .map_err(|e| CaptureError::Setup(format!("internal: encoding a held change: {e}")))?;
        self.sink
            .hold(&table, &json, lsn, &mut self.pending)
            .await?;
        self.stats
            .held_changes_total
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Stops a table: from `since` on its changes are held, its snapshot, backfills and
    /// repairs wait, and the other tables go on.
    async fn stop_table(&mut self, table: &TableId, since: (u64, u64), reason: String) {
        let name = table.to_string();
        if self.state.stopped.contains_key(&name) {
            return;
        }
        // The stop's held records come after the topic's current end, so a resume reads from
        // there, not through every earlier stop. Unknown (no broker answer): from the start.
        let held_from = match self.sink.cluster() {
            Some((cluster, prefix)) => {
                let (cluster, tp) = (
                    cluster.clone(),
                    ferry_connectors::kafka::TopicPartition::new(
                        crate::topics::capture_held_topic(prefix),
                        0,
                    ),
                );
                tokio::task::spawn_blocking(move || cluster.watermarks(&tp))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
                    .map_or(0, |(_, high)| high)
            }
            None => 0,
        };
        tracing::error!(table = name, lsn = %Lsn(since.0), reason,
            held_in = crate::topics::capture_held_topic(&self.cfg.capture.topic_prefix),
            "table stopped: capture cannot read a change of it; its changes are held in order \
             and every other table goes on. Fix the cause, then: ferry resume-table {name}");
        self.state.stopped.insert(
            name,
            Stopped {
                since,
                reason,
                at_ms: hold::now_ms(),
                held_from,
            },
        );
        self.decoder.hold(table.clone());
        self.snap.set_table_stopped(table, true);
        sync_backfills(&mut self.snap, &self.state);
        self.stats
            .tables_stopped
            .store(self.state.stopped.len() as u64, Ordering::Relaxed);
    }

    /// An operator resumed a stopped table: its held changes are sent in order, at this point
    /// of the stream, then its changes flow again.
    async fn on_table_resume(&mut self, r: TableResume) -> Result<(), CaptureError> {
        let Some(stopped) = self.state.stopped.get(&r.table).cloned() else {
            tracing::info!(
                table = r.table,
                "resume of a table capture has not stopped; ignored"
            );
            return Ok(());
        };
        let Some(table) = crate::config::parse_table(&r.table) else {
            tracing::warn!(
                table = r.table,
                "resume of a table that is not schema.table; ignored"
            );
            return Ok(());
        };
        self.txn.moved_state = true;
        match self
            .replay_held(&table, stopped.since, stopped.held_from)
            .await?
        {
            Replay::Unreadable {
                since,
                from,
                reason,
            } => {
                tracing::error!(table = r.table, lsn = %Lsn(since.0), reason,
                    "resumed table stopped again: a held change still cannot be read; it stays held from there");
                self.state.stopped.insert(
                    r.table.clone(),
                    Stopped {
                        since,
                        reason,
                        at_ms: hold::now_ms(),
                        held_from: from,
                    },
                );
            }
            Replay::Done { sent, repairs } => {
                self.state.stopped.remove(&r.table);
                self.decoder.release(&table);
                self.snap.set_table_stopped(&table, false);
                sync_backfills(&mut self.snap, &self.state);
                let reread = repairs.len();
                if !repairs.is_empty() {
                    self.snap.enqueue_repair(table.clone(), repairs);
                }
                self.stats
                    .tables_stopped
                    .store(self.state.stopped.len() as u64, Ordering::Relaxed);
                tracing::info!(
                    table = r.table,
                    held_changes_sent = sent,
                    rows_read_again = reread,
                    "table resumed: its held changes were sent in order; its changes flow again"
                );
            }
        }
        Ok(())
    }

    /// Sends a stopped table's held changes from `since` on (reading the held topic from
    /// offset `held_from`), decoded again, in order.
    async fn replay_held(
        &mut self,
        table: &TableId,
        since: (u64, u64),
        held_from: i64,
    ) -> Result<Replay, CaptureError> {
        let Some((cluster, prefix)) = self.sink.cluster() else {
            return Ok(Replay::Done {
                sent: 0,
                repairs: Vec::new(),
            });
        };
        let (cluster, prefix) = (cluster.clone(), prefix.to_string());
        // Every held record produced so far is in the topic before it is read.
        self.sink.flush(Duration::from_secs(30));
        let name = table.to_string();
        let (mut from, mut sent) = (held_from, 0u64);
        let mut seen = HashSet::new();
        let mut repairs = Vec::new();
        loop {
            let (records, end) = hold::page(&cluster, &prefix, &name, from).await?;
            for (offset, parsed) in records {
                from = offset + 1;
                let h = match parsed {
                    Ok(h) => h,
                    Err(e) => {
                        return Ok(Replay::Unreadable {
                            since,
                            from: offset,
                            reason: format!(
                                "held record at offset {offset} of {} does not parse: {e}",
                                crate::topics::capture_held_topic(&prefix)
                            ),
                        })
                    }
                };
                let pos = (h.change.lsn, h.change.seq);
                // Before `since`: an earlier stop's. Twice: produced again after a restart.
                if pos < since || !seen.insert(pos) {
                    continue;
                }
                let Some(schema) = self
                    .versions
                    .get(&cluster, &prefix, &h.value_fingerprint)
                    .await?
                else {
                    return Ok(Replay::Unreadable {
                        since: pos,
                        from: offset,
                        reason: format!(
                            "schema version {} of a held change is not in the schema topic",
                            h.value_fingerprint
                        ),
                    });
                };
                match self.decoder.redecode(&schema, &h.change) {
                    Ok(events) => {
                        self.sink.register(&schema).await?;
                        for e in &events {
                            self.emit(&schema, e).await?;
                            sent += 1;
                        }
                    }
                    Err(e) => match h
                        .change
                        .key_texts(&schema.table().key_indexes())
                        .filter(|_| schema.has_key())
                    {
                        Some(key) => {
                            tracing::warn!(table = name, key = ?key, lsn = %Lsn(pos.0), error = %e,
                                "a held change still cannot be read; its row is read again from the table instead");
                            if !repairs.contains(&key) {
                                repairs.push(key);
                            }
                        }
                        None => {
                            return Ok(Replay::Unreadable {
                                since: pos,
                                from: offset,
                                reason: e.to_string(),
                            })
                        }
                    },
                }
                if self.pending.len() >= ACK_SLICE {
                    self.hand_to_acker(None).await?;
                }
            }
            if end {
                break;
            }
        }
        Ok(Replay::Done { sent, repairs })
    }

    /// A new schema version of a table. A column added with a default whose value the rows
    /// that existed got is not in the change log when the table was rewritten (a volatile
    /// default, or another ALTER in the same breath): no change carries it, so the table is
    /// snapshotted again (upserts: the destination ends with the origin's values).
    async fn on_new_version(&mut self, s: Arc<EncodedSchema>) -> Result<(), CaptureError> {
        let id = s.table().id.clone();
        let Some(prev) = self.last_schema.insert(id.clone(), s.clone()) else {
            return Ok(());
        };
        let added: Vec<String> = s
            .table()
            .columns
            .iter()
            .filter(|c| c.missing.is_none())
            .filter(|c| !prev.table().columns.iter().any(|p| p.name == c.name))
            .map(|c| c.name.clone())
            .collect();
        if added.is_empty() || !s.has_key() || !self.cfg.capture.snapshot || self.snap.covers(&id) {
            return Ok(());
        }
        let has_default = catalog::any_default(&self.session, &id, &added)
            .await
            .map_err(pg(&self.target, format!("reading the defaults of {id}")))?;
        if has_default {
            tracing::info!(table = %id, columns = ?added,
                "columns added with a default the change log does not carry (the table was rewritten); snapshotting the table again");
            self.state.tables.remove(&id.to_string());
            self.snap.enqueue(id);
            self.txn.moved_state = true;
        }
        Ok(())
    }

    /// A logical decoding message: Ferry's own (watermarks and operator requests, see
    /// [`wal`]) are acted on in stream order; others are ignored.
    async fn on_message(
        &mut self,
        prefix: &str,
        content: &[u8],
        lsn: u64,
    ) -> Result<(), CaptureError> {
        match wal::Kind::of(prefix) {
            Some(wal::Kind::Watermark) => {
                let at = if self.txn.open {
                    self.decoder.txn_lsn()
                } else {
                    lsn
                };
                if let Some(done) = self.snap.on_watermark(content, at) {
                    self.txn.moved_state |= self.finish_chunk(done).await?;
                    sync_backfills(&mut self.snap, &self.state);
                }
            }
            Some(wal::Kind::Backfill) => {
                if let Some(r) = self.request::<BackfillRequest>(content, "backfill request") {
                    self.on_backfill_request(r);
                }
            }
            Some(wal::Kind::JobControl) => {
                if let Some(r) = self.request::<JobControl>(content, "job control") {
                    self.on_job_control(r);
                }
            }
            Some(wal::Kind::Repair) => {
                if let Some(r) = self.request::<RepairRequest>(content, "repair request") {
                    self.on_repair_request(r);
                }
            }
            Some(wal::Kind::Columns) => {
                if let Err(e) = self.decoder.columns_message(content) {
                    tracing::warn!(error = e, "unreadable column-number message; ignored");
                }
            }
            Some(wal::Kind::TableResume) => {
                if let Some(r) = self.request::<TableResume>(content, "table resume") {
                    self.on_table_resume(r).await?;
                }
            }
            Some(wal::Kind::Heartbeat) | None => {}
        }
        Ok(())
    }

    /// Decodes an operator request for this pipeline's slot; one for another slot is not
    /// ours, and one that does not decode is reported and ignored.
    fn request<T: serde::de::DeserializeOwned + wal::ForSlot>(
        &self,
        content: &[u8],
        what: &str,
    ) -> Option<T> {
        match serde_json::from_slice::<T>(content) {
            Ok(r) if r.slot() == self.cfg.capture.slot => Some(r),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable {what}; ignored");
                None
            }
        }
    }

    fn on_backfill_request(&mut self, r: BackfillRequest) {
        if self.state.backfills.contains_key(&r.job) {
            return;
        }
        tracing::info!(job = r.job, table = r.table, total = r.total, tier = r.tier,
            after = ?r.after, sample = r.sample, "backfill requested");
        let mut b = Backfill::new(r.table, r.predicate, r.chunk_rows, r.total);
        b.tier = r.tier;
        b.after = r.after;
        b.sample = r.sample;
        self.state.backfills.insert(r.job.clone(), b);
        self.snap.enqueue_backfill(r.job);
        sync_backfills(&mut self.snap, &self.state);
        self.txn.moved_state = true;
    }

    fn on_job_control(&mut self, r: JobControl) {
        let Some(b) = self.state.backfills.get_mut(&r.job) else {
            tracing::warn!(job = r.job, "job control for an unknown job; ignored");
            return;
        };
        match r.action {
            JobAction::Pause => b.paused = true,
            JobAction::Resume => b.paused = false,
            JobAction::Cancel => b.cancelled = true,
            JobAction::SamplePassed => b.sample_state = Some(SampleState::Passed),
            JobAction::SampleFailed => {
                b.sample_state = Some(SampleState::Failed);
                b.cancelled = true;
            }
        }
        tracing::info!(job = r.job, action = %r.action, status = %b.status(), "job control");
        if b.progress != Some(TableProgress::Done) {
            self.snap.enqueue_backfill(r.job.clone());
        }
        sync_backfills(&mut self.snap, &self.state);
        self.txn.moved_state = true;
    }

    fn on_repair_request(&mut self, r: RepairRequest) {
        match r.table.parse::<TableId>() {
            Ok(t) => {
                tracing::info!(table = %t, keys = r.keys.len(), "repair requested");
                self.snap.enqueue_repair(t, r.keys);
            }
            Err(e) => tracing::warn!(table = r.table, error = %e, "repair request ignored"),
        }
    }

    /// A transaction's end: its deliveries become one acker batch whose LSN is safe once they
    /// (and everything before) are acknowledged; state it moved is saved after that.
    async fn on_commit(&mut self, end: Lsn) -> Result<(), CaptureError> {
        self.txn.open = false;
        if std::mem::take(&mut self.txn.live) {
            self.throttle.live_commit();
        }
        self.stats
            .transactions_total
            .fetch_add(1, Ordering::Relaxed);
        self.hand_to_acker(Some(end)).await?;
        if std::mem::take(&mut self.txn.moved_state) {
            self.state_after.push_back((end, self.state.clone()));
        }
        Ok(())
    }

    /// The server's position: confirmable only between transactions, behind the same queue.
    async fn on_keepalive(&mut self, wal_end: Lsn) -> Result<(), CaptureError> {
        if !self.txn.open {
            self.hand_to_acker(Some(wal_end)).await?;
        }
        Ok(())
    }

    fn on_throttle_tick(&mut self) {
        if self.snap.has_backfill() {
            let events = self.stats.events_total.load(Ordering::Relaxed).max(1);
            let bytes = self.stats.encoded_bytes_total.load(Ordering::Relaxed);
            self.throttle.tick(bytes as f64 / events as f64);
        } else {
            self.throttle.idle();
        }
    }

    async fn on_heartbeat(&mut self) -> Result<(), CaptureError> {
        wal::emit(&self.session, &self.target, wal::Kind::Heartbeat, "").await
    }

    /// Tables added to the publication get a topic and a snapshot.
    async fn on_publication_poll(&mut self) -> Result<(), CaptureError> {
        let c = &self.cfg.capture;
        let now = catalog::publication_tables(&self.session, &c.publication)
            .await
            .map_err(pg(&self.target, "listing publication tables"))?;
        for t in now {
            let known = self.state.tables.contains_key(&t.to_string()) || self.snap.covers(&t);
            if known {
                continue;
            }
            tracing::info!(table = %t, "table added to the publication; snapshotting it");
            let pgc = &self.cfg.origin.postgres;
            let registered = register_table(
                &self.session,
                &mut self.sink,
                (pgc, &c.publication),
                &t,
                &self.target,
            )
            .await?;
            if let Some(s) = registered {
                self.versions.add(&s);
                self.last_schema.insert(t.clone(), s);
            }
            if c.snapshot {
                self.snap.enqueue(t);
            } else {
                self.state.tables.insert(t.to_string(), TableProgress::Done);
            }
        }
        Ok(())
    }

    fn on_report(&mut self) {
        let stats = self.stats;
        let events = stats.events_total.load(Ordering::Relaxed);
        let (last_events, last_at) = self.ticks.last_report;
        let secs = last_at.elapsed().as_secs_f64().max(0.001);
        tracing::info!(
            events_total = events,
            events_per_sec = ((events - last_events) as f64 / secs).round(),
            confirmed_lsn = %Lsn(stats.confirmed_lsn.load(Ordering::Relaxed)),
            snapshot_idle = self.snap.is_idle(),
            retries_total = stats.retries_total.load(Ordering::Relaxed),
            "capture progress"
        );
        self.ticks.last_report = (events, Instant::now());
    }

    /// Sends a finished chunk's rows and records its progress; true when the state moved (to
    /// be saved once the rows are acknowledged).
    async fn finish_chunk(&mut self, done: snapshot::ChunkDone) -> Result<bool, CaptureError> {
        let stats = self.stats;
        for e in &done.events {
            let n = self.sink.send(&done.schema, e, &mut self.pending).await?;
            stats
                .encoded_bytes_total
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        let n = done.events.len() as u64;
        stats.events_total.fetch_add(n, Ordering::Relaxed);
        stats.snapshot_rows_total.fetch_add(n, Ordering::Relaxed);
        if let (Some(job), Some(progress)) = (&done.backfill, &done.progress) {
            let (rate, limit) = (
                self.throttle.aimd.rate().round(),
                self.throttle.aimd.limit().to_string(),
            );
            if let Some(b) = self.state.backfills.get_mut(job) {
                b.rows += n;
                b.progress = Some(progress.clone());
                b.rate = rate;
                b.limit = limit;
                if let Some(n) = b.sample {
                    if b.rows >= n && b.sample_state.is_none() && *progress != TableProgress::Done {
                        b.sample_state = Some(SampleState::Held);
                        tracing::info!(
                            job,
                            rows = b.rows,
                            "backfill sample emitted; holding until it verifies at the destination"
                        );
                    }
                }
                tracing::info!(job, table = %done.table, rows = b.rows, total = b.total,
                    done = (*progress == TableProgress::Done), "backfill chunk");
            }
            return Ok(true);
        }
        match done.progress {
            Some(progress) => {
                if progress == TableProgress::Done {
                    tracing::info!(table = %done.table, "snapshot complete");
                }
                self.state.tables.insert(done.table.to_string(), progress);
                Ok(true)
            }
            None => {
                tracing::info!(table = %done.table, rows = n, "repair rows re-captured");
                Ok(false)
            }
        }
    }

    /// Hands the pending deliveries to the acker as one batch (closing a transaction when
    /// `lsn` is given).
    async fn hand_to_acker(&mut self, lsn: Option<Lsn>) -> Result<(), CaptureError> {
        let deliveries = std::mem::take(&mut self.pending);
        self.ack_tx
            .send(AckBatch { lsn, deliveries })
            .await
            .map_err(|_| CaptureError::Setup("internal: acknowledgement task is gone".into()))
    }

    /// Graceful stop: everything handed to the producer is acknowledged, the final position
    /// is confirmed, and the stream is closed.
    async fn finish(self) -> Result<(), CaptureError> {
        tracing::info!("capture stopping");
        let Capture {
            cfg,
            stats,
            sink,
            state_topic,
            state_after,
            mut repl,
            ack_tx,
            safe_rx,
            mut acker,
            ..
        } = self;
        drop(ack_tx);
        sink.flush(Duration::from_secs(30));
        match tokio::time::timeout(Duration::from_secs(30), &mut acker.0).await {
            Ok(Ok(Ok(()))) => {
                let safe = *safe_rx.borrow();
                repl.update_applied_lsn(pgwire_replication::Lsn::from_u64(safe.0));
                stats.confirmed_lsn.store(safe.0, Ordering::Relaxed);
                for (l, st) in state_after {
                    if let (true, Some(p)) = (l <= safe, sink.producer()) {
                        state::save(p, &state_topic, &cfg.capture.slot, &st).await?;
                    }
                }
                // The transport sends positions on its status interval; give it one.
                tokio::time::sleep(Duration::from_millis(cfg.capture.status_interval_ms + 200))
                    .await;
            }
            Ok(Ok(Err(e))) => return Err(e),
            _ => tracing::warn!(
                "acknowledgements did not finish in 30 s; the unconfirmed tail will be produced \
                 again on restart"
            ),
        }
        let _ = repl.shutdown().await;
        tracing::info!(
            events_total = stats.events_total.load(Ordering::Relaxed),
            snapshot_rows_total = stats.snapshot_rows_total.load(Ordering::Relaxed),
            transactions_total = stats.transactions_total.load(Ordering::Relaxed),
            confirmed_lsn = %Lsn(stats.confirmed_lsn.load(Ordering::Relaxed)),
            "capture stopped"
        );
        Ok(())
    }
}

/// The tables capture stopped, from the stored capture state.
pub async fn stopped_tables(
    cfg: &Config,
) -> Result<std::collections::BTreeMap<String, Stopped>, CaptureError> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = crate::topics::state_topic(&cfg.capture.topic_prefix);
    Ok(state::load(&origin, &topic, &cfg.capture.slot)
        .await?
        .stopped)
}

/// Asks capture to resume a table it stopped (a message in the WAL, acted on in stream
/// order, so it also waits while capture is down). Returns why the table was stopped, or
/// `None` when it is not.
pub async fn request_resume(cfg: &Config, table: &TableId) -> Result<Option<String>, CaptureError> {
    let Some(stopped) = stopped_tables(cfg).await?.remove(&table.to_string()) else {
        return Ok(None);
    };
    let pgc = &cfg.origin.postgres;
    let target = pgc.display();
    let session = pgc.connect().await.map_err(pg(&target, "connecting"))?;
    let request = TableResume {
        slot: cfg.capture.slot.clone(),
        table: table.to_string(),
    };
    wal::emit_json(&session, &target, wal::Kind::TableResume, &request).await?;
    Ok(Some(stopped.reason))
}

/// Whether the origin can be captured from: logical WAL, a role that may replicate.
async fn check_source(session: &Session, pgc: &PgConfig, target: &str) -> Result<(), CaptureError> {
    let facts = catalog::server_facts(session)
        .await
        .map_err(pg(target, "reading server settings"))?;
    if facts.wal_level != "logical" {
        return Err(CaptureError::Setup(format!(
            "postgres {target} has wal_level = {}; capture needs wal_level = logical \
             (ALTER SYSTEM SET wal_level = logical; then restart Postgres — `ops/stack up` does both)",
            facts.wal_level
        )));
    }
    if !facts.can_replicate {
        return Err(CaptureError::Setup(format!(
            "user {} on {target} may not replicate: ALTER ROLE {} WITH REPLICATION",
            pgc.user, pgc.user
        )));
    }
    Ok(())
}

/// Opens the replication stream from the slot's confirmed position.
async fn connect_replication(cfg: &Config) -> Result<ReplicationClient, CaptureError> {
    let (pgc, c) = (&cfg.origin.postgres, &cfg.capture);
    let repl_cfg = ReplicationConfig::new(
        pgc.host.clone(),
        pgc.user.clone(),
        pgc.effective_password()
            .map(|p| p.expose().to_string())
            .unwrap_or_default(),
        pgc.database.clone(),
        c.slot.clone(),
        c.publication.clone(),
    )
    .with_port(pgc.port)
    .with_options(values::SESSION_OPTIONS)
    .with_status_interval(Duration::from_millis(c.status_interval_ms))
    .with_wakeup_interval(Duration::from_millis(c.status_interval_ms.max(1000)))
    .with_application_name("ferry-capture");
    ReplicationClient::connect(repl_cfg)
        .await
        .map_err(|source| CaptureError::Replication {
            slot: c.slot.clone(),
            source,
        })
}

/// Tells the snapshotter which backfill jobs may read (see `CaptureState::backfill_wait`) and
/// in which order (tier, then request order).
fn sync_backfills(snap: &mut Snapshotter, state: &CaptureState) {
    for (job, b) in &state.backfills {
        let blocked = state.backfill_wait(job).is_some() || state.stopped.contains_key(&b.table);
        snap.set_backfill_blocked(job, blocked);
    }
    snap.order_backfills(|job| state.backfills.get(job).map_or(u32::MAX, |b| b.tier));
}

fn snap_count(snap: &Snapshotter, tables: &[TableId]) -> usize {
    tables.iter().filter(|t| !snap.covers(t)).count()
}

async fn register_table(
    session: &Session,
    sink: &mut Sink,
    (pgc, publication): (&PgConfig, &str),
    table: &TableId,
    target: &str,
) -> Result<Option<Arc<EncodedSchema>>, CaptureError> {
    let Some(relid) = catalog::table_oid(session, table)
        .await
        .map_err(pg(target, format!("looking up {table}")))?
    else {
        return Ok(None);
    };
    let published = catalog::published(session, publication, table)
        .await
        .map_err(pg(
            target,
            format!("reading what {publication} publishes of {table}"),
        ))?;
    let columns = catalog::table_columns(session, relid)
        .await
        .map_err(pg(target, format!("reading columns of {table}")))?;
    let columns = published.keep(columns);
    let schema = catalog::build_schema(session, &pgc.database, table.clone(), relid, &columns)
        .await
        .map_err(pg(target, format!("reading types of {table}")))?;
    let encoded = EncodedSchema::new(&schema).map_err(|source| CaptureError::Encode {
        lsn: Lsn::ZERO,
        source,
    })?;
    sink.register(&encoded).await?;
    Ok(Some(Arc::new(encoded)))
}
