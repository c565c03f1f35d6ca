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
//! A malformed message or value stops capture with an error naming the LSN and relation; nothing
//! after it is acknowledged.

pub mod sink;
pub mod snapshot;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::store::state::{self, CaptureState, TableProgress};
use crate::throttle::backfill::{BackfillThrottle, THROTTLE_TICK};
use crate::wal::{self, BackfillRequest, JobControl, RepairRequest};
use sink::{AckBatch, Sink};
use snapshot::Snapshotter;

/// Where capture sends events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkMode {
    /// The origin Kafka cluster (normal operation).
    Kafka,
    /// Decode and encode only; nothing is sent and the slot is still advanced (benchmarks).
    Null,
}

/// Live counters, readable while capture runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Change events emitted (stream and snapshot).
    pub events_total: AtomicU64,
    /// Bytes of encoded keys and values produced.
    pub encoded_bytes_total: AtomicU64,
    /// Snapshot rows emitted.
    pub snapshot_rows_total: AtomicU64,
    /// Transactions seen.
    pub transactions_total: AtomicU64,
    /// Retries after transient failures.
    pub retries_total: AtomicU64,
    /// The last LSN confirmed to Postgres.
    pub confirmed_lsn: AtomicU64,
    /// Tables whose snapshot is complete.
    pub snapshots_done_total: AtomicU64,
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
    let pgc: &PgConfig = &cfg.origin.postgres;
    let target = pgc.display();
    let c = &cfg.capture;
    let session = pgc.connect().await.map_err(pg(&target, "connecting"))?;
    let facts = catalog::server_facts(&session)
        .await
        .map_err(pg(&target, "reading server settings"))?;
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
    catalog::ensure_publication(&session, &c.publication, &cfg.tables())
        .await
        .map_err(pg(
            &target,
            format!("creating publication {}", c.publication),
        ))?;

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
            )
            .await?;
            let origin2 = origin.clone();
            let (topic, slot) = (state_topic.clone(), c.slot.clone());
            let st = tokio::task::spawn_blocking(move || state::load(&origin2, &topic, &slot))
                .await
                .map_err(|e| CaptureError::State {
                    topic: state_topic.clone(),
                    reason: e.to_string(),
                    transient: false,
                })??;
            (sink, st)
        }
        SinkMode::Null => (Sink::Null { buf: Vec::new() }, CaptureState::default()),
    };
    prepare_slot(&session, cfg, &target, &mut state).await?;

    let mut snap = Snapshotter::new(
        &c.slot,
        &cfg.origin.region,
        &pgc.database,
        c.snapshot_chunk_rows,
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
    // Create every table's topic up front so consumers can subscribe before the first change.
    for t in &tables {
        register_table(&session, &mut sink, pgc, t, &target).await?;
    }
    tracing::info!(
        slot = c.slot,
        publication = c.publication,
        tables = tables.len(),
        to_snapshot = tables.len() - snap_count(&snap, &tables),
        "capture starting"
    );

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
    let repl_err = |source| CaptureError::Replication {
        slot: c.slot.clone(),
        source,
    };
    let mut repl = ReplicationClient::connect(repl_cfg)
        .await
        .map_err(repl_err)?;

    // One batch per source transaction: an OLTP stream of small transactions needs thousands
    // in flight while the broker acknowledges (a few ms to tens of ms each), or capture stalls
    // on the queue. A batch without deliveries is a few dozen bytes.
    let (ack_tx, ack_rx) = mpsc::channel::<AckBatch>(ACK_QUEUE);
    let (safe_tx, mut safe_rx) = watch::channel(Lsn::ZERO);
    let mut acker = Owned(tokio::spawn(sink::acker(ack_rx, safe_tx)));

    let mut decoder = ChangeDecoder::new(cfg.origin.region.clone(), pgc.database.clone());
    let mut outputs = Vec::new();
    let mut pending = Vec::new();
    let mut in_txn = false;
    let mut snapshot_progress = false;
    let mut state_after: VecDeque<(Lsn, CaptureState)> = VecDeque::new();
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(c.heartbeat_interval_ms.max(100)));
    let mut poll = tokio::time::interval(Duration::from_millis(c.publication_poll_ms.max(100)));
    let mut report = tokio::time::interval(Duration::from_secs(10));
    let mut last_events = stats.events_total.load(Ordering::Relaxed);
    let mut last_report = Instant::now();
    // Transactions streamed most recently, for the snapshot visibility check.
    let mut recent_xids: VecDeque<u32> = VecDeque::with_capacity(RECENT_XIDS);

    for (job, b) in &state.backfills {
        if b.progress != Some(TableProgress::Done) {
            snap.enqueue_backfill(job.clone());
        }
    }
    sync_backfills(&mut snap, &state);
    // Backfill chunks read from the replica when one is configured (watermarks still go to
    // the primary, through `session`).
    let replica = match &cfg.backfill.replica {
        Some(r) => Some(
            r.connect()
                .await
                .map_err(pg(&r.display(), "connecting to the backfill replica"))?,
        ),
        None => None,
    };
    let mut throttle = BackfillThrottle::new(cfg);
    let mut throttle_tick = tokio::time::interval(THROTTLE_TICK);
    // Whether the open transaction carried live changes (watermark-only ones do not count
    // as live commits).
    let mut live_txn = false;

    loop {
        // Live changes and snapshots first; a backfill chunk only when the throttle allows.
        let backfill_cap = throttle.chunk_rows();
        let start = !in_txn
            && (snap.wants_chunk(false)
                || (snap.wants_chunk(true)
                    && throttle.allows(snap.next_backfill_rows(&state, backfill_cap))));
        if start {
            let recent: HashSet<u32> = recent_xids.iter().copied().collect();
            if let Some(schema) = snap
                .start_chunk(&session, replica.as_deref(), &state, &recent, backfill_cap)
                .await?
            {
                sink.register(&schema).await?;
            }
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            joined = &mut acker.0 => {
                return Err(match joined {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => CaptureError::Setup("internal: acknowledgement task ended early".into()),
                    Err(e) => CaptureError::Setup(format!("internal: acknowledgement task failed: {e}")),
                });
            }
            Ok(()) = safe_rx.changed() => {
                let safe = *safe_rx.borrow_and_update();
                repl.update_applied_lsn(pgwire_replication::Lsn::from_u64(safe.0));
                stats.confirmed_lsn.store(safe.0, Ordering::Relaxed);
                while state_after.front().is_some_and(|(l, _)| *l <= safe) {
                    let Some((_, st)) = state_after.pop_front() else { break };
                    if let Some(p) = sink.producer() {
                        state::save(p, &state_topic, &c.slot, &st).await?;
                    }
                    let done = st.tables.values().filter(|p| **p == TableProgress::Done).count();
                    stats.snapshots_done_total.store(done as u64, Ordering::Relaxed);
                }
            }
            ev = repl.recv() => {
                let ev = match ev {
                    Ok(Some(ev)) => ev,
                    Ok(None) => return Err(CaptureError::Replication {
                        slot: c.slot.clone(),
                        source: pgwire_replication::PgWireError::Internal("stream ended".into()),
                    }),
                    Err(e) => return Err(repl_err(e)),
                };
                match ev {
                    ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                        decoder.begin(final_lsn.as_u64(), xid, commit_time_micros);
                        in_txn = true;
                        if recent_xids.len() == RECENT_XIDS {
                            recent_xids.pop_front();
                        }
                        recent_xids.push_back(xid);
                    }
                    ReplicationEvent::XLogData { wal_start, data, .. } => {
                        decoder.decode(&session, wal_start.as_u64(), &data, &mut outputs).await?;
                        for out in outputs.drain(..) {
                            match out {
                                Output::Schema(s) => sink.register(&s).await?,
                                Output::Event(s, e) => {
                                    live_txn = true;
                                    snap.observe(&s, &e);
                                    let n = sink.send(&s, &e, &mut pending).await?;
                                    stats.encoded_bytes_total.fetch_add(n as u64, Ordering::Relaxed);
                                    stats.events_total.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        if pending.len() >= ACK_SLICE {
                            send_batch(&ack_tx, None, &mut pending).await?;
                        }
                    }
                    ReplicationEvent::Message { prefix, content, lsn, .. } => {
                        let kind = wal::Kind::of(&prefix);
                        if kind == Some(wal::Kind::Watermark) {
                            if let Some(done) = snap.on_watermark(&content, if in_txn { decoder.txn_lsn() } else { lsn.as_u64() }) {
                                snapshot_progress |= finish_chunk(&mut sink, done, (throttle.aimd.rate().round(), throttle.aimd.limit().to_string()), &mut pending, &mut state, stats).await?;
                                sync_backfills(&mut snap, &state);
                            }
                        } else if kind == Some(wal::Kind::Backfill) {
                            match serde_json::from_slice::<BackfillRequest>(&content) {
                                Ok(r) if r.slot == c.slot => {
                                    if !state.backfills.contains_key(&r.job) {
                                        tracing::info!(job = r.job, table = r.table, total = r.total, tier = r.tier, after = ?r.after, sample = r.sample, "backfill requested");
                                        let mut b = crate::store::state::Backfill::new(r.table, r.predicate, r.chunk_rows, r.total);
                                        b.tier = r.tier;
                                        b.after = r.after;
                                        b.sample = r.sample;
                                        state.backfills.insert(r.job.clone(), b);
                                        snap.enqueue_backfill(r.job);
                                        sync_backfills(&mut snap, &state);
                                        snapshot_progress = true;
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "unreadable backfill request; ignored"),
                            }
                        } else if kind == Some(wal::Kind::JobControl) {
                            match serde_json::from_slice::<JobControl>(&content) {
                                Ok(r) if r.slot == c.slot => match state.backfills.get_mut(&r.job) {
                                    Some(b) => {
                                        match r.action.as_str() {
                                            "pause" => b.paused = true,
                                            "resume" => b.paused = false,
                                            "cancel" => b.cancelled = true,
                                            "sample-passed" => b.sample_state = Some("passed".into()),
                                            "sample-failed" => {
                                                b.sample_state = Some("failed".into());
                                                b.cancelled = true;
                                            }
                                            other => tracing::warn!(action = other, "unknown job action; ignored"),
                                        }
                                        tracing::info!(job = r.job, action = r.action, status = b.status(), "job control");
                                        if b.progress != Some(TableProgress::Done) {
                                            snap.enqueue_backfill(r.job.clone());
                                        }
                                        sync_backfills(&mut snap, &state);
                                        snapshot_progress = true;
                                    }
                                    None => tracing::warn!(job = r.job, "job control for an unknown job; ignored"),
                                },
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "unreadable job control; ignored"),
                            }
                        } else if kind == Some(wal::Kind::Repair) {
                            match serde_json::from_slice::<RepairRequest>(&content) {
                                Ok(r) if r.slot == c.slot => match crate::config::parse_table(&r.table) {
                                    Some(t) => {
                                        tracing::info!(table = %t, keys = r.keys.len(), "repair requested");
                                        snap.enqueue_repair(t, r.keys);
                                    }
                                    None => tracing::warn!(table = r.table, "repair request names no schema.table; ignored"),
                                },
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "unreadable repair request; ignored"),
                            }
                        }
                    }
                    ReplicationEvent::Commit { end_lsn, .. } => {
                        in_txn = false;
                        if std::mem::take(&mut live_txn) {
                            throttle.live_commit();
                        }
                        stats.transactions_total.fetch_add(1, Ordering::Relaxed);
                        let end = Lsn(end_lsn.as_u64());
                        send_batch(&ack_tx, Some(end), &mut pending).await?;
                        if snapshot_progress {
                            state_after.push_back((end, state.clone()));
                            snapshot_progress = false;
                        }
                    }
                    ReplicationEvent::KeepAlive { wal_end, .. } => {
                        if !in_txn {
                            send_batch(&ack_tx, Some(Lsn(wal_end.as_u64())), &mut pending).await?;
                        }
                    }
                    ReplicationEvent::StoppedAt { .. } => break,
                }
            }
            _ = throttle_tick.tick() => {
                if snap.has_backfill() {
                    let events = stats.events_total.load(Ordering::Relaxed).max(1);
                    throttle.tick(stats.encoded_bytes_total.load(Ordering::Relaxed) as f64 / events as f64);
                } else {
                    throttle.idle();
                }
            }
            _ = heartbeat.tick() => {
                wal::emit(&session, &target, wal::Kind::Heartbeat, "").await?;
            }
            _ = poll.tick() => {
                let now = catalog::publication_tables(&session, &c.publication)
                    .await
                    .map_err(pg(&target, "listing publication tables"))?;
                for t in now {
                    let known = state.tables.contains_key(&t.to_string()) || snap.covers(&t);
                    if !known {
                        tracing::info!(table = %t, "table added to the publication; snapshotting it");
                        register_table(&session, &mut sink, pgc, &t, &target).await?;
                        if c.snapshot {
                            snap.enqueue(t);
                        } else {
                            state.tables.insert(t.to_string(), TableProgress::Done);
                        }
                    }
                }
            }
            _ = report.tick() => {
                let events = stats.events_total.load(Ordering::Relaxed);
                let secs = last_report.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    events_total = events,
                    events_per_sec = ((events - last_events) as f64 / secs).round(),
                    confirmed_lsn = %Lsn(stats.confirmed_lsn.load(Ordering::Relaxed)),
                    snapshot_idle = snap.is_idle(),
                    retries_total = stats.retries_total.load(Ordering::Relaxed),
                    "capture progress"
                );
                last_events = events;
                last_report = Instant::now();
            }
        }
    }

    // Graceful stop: everything handed to the producer is acknowledged, the final position is
    // confirmed, and the stream is closed.
    tracing::info!("capture stopping");
    drop(ack_tx);
    sink.flush(Duration::from_secs(30));
    match tokio::time::timeout(Duration::from_secs(30), &mut acker.0).await {
        Ok(Ok(Ok(()))) => {
            let safe = *safe_rx.borrow();
            repl.update_applied_lsn(pgwire_replication::Lsn::from_u64(safe.0));
            stats.confirmed_lsn.store(safe.0, Ordering::Relaxed);
            for (l, st) in state_after {
                if l <= safe {
                    if let Some(p) = sink.producer() {
                        state::save(p, &state_topic, &c.slot, &st).await?;
                    }
                }
            }
            // The transport sends positions on its status interval; give it one.
            tokio::time::sleep(Duration::from_millis(c.status_interval_ms + 200)).await;
        }
        Ok(Ok(Err(e))) => return Err(e),
        _ => tracing::warn!("acknowledgements did not finish in 30 s; the unconfirmed tail will be produced again on restart"),
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

/// Tells the snapshotter which backfill jobs may read (see `CaptureState::backfill_wait`) and
/// in which order (tier, then request order).
fn sync_backfills(snap: &mut Snapshotter, state: &CaptureState) {
    for job in state.backfills.keys() {
        snap.set_backfill_blocked(job, state.backfill_wait(job).is_some());
    }
    snap.order_backfills(|job| state.backfills.get(job).map_or(u32::MAX, |b| b.tier));
}

fn snap_count(snap: &Snapshotter, tables: &[TableId]) -> usize {
    tables.iter().filter(|t| !snap.covers(t)).count()
}

async fn register_table(
    session: &Session,
    sink: &mut Sink,
    pgc: &PgConfig,
    table: &TableId,
    target: &str,
) -> Result<(), CaptureError> {
    let Some(relid) = catalog::table_oid(session, table)
        .await
        .map_err(pg(target, format!("looking up {table}")))?
    else {
        return Ok(());
    };
    let columns = catalog::table_columns(session, relid)
        .await
        .map_err(pg(target, format!("reading columns of {table}")))?;
    let schema = catalog::build_schema(session, &pgc.database, table.clone(), relid, &columns)
        .await
        .map_err(pg(target, format!("reading types of {table}")))?;
    let encoded = EncodedSchema::new(&schema).map_err(|source| CaptureError::Encode {
        lsn: Lsn::ZERO,
        source,
    })?;
    sink.register(&encoded).await
}

async fn finish_chunk(
    sink: &mut Sink,
    done: snapshot::ChunkDone,
    rate_limit: (f64, String),
    pending: &mut Vec<(String, rdkafka::producer::DeliveryFuture)>,
    state: &mut CaptureState,
    stats: &Stats,
) -> Result<bool, CaptureError> {
    for e in &done.events {
        let n = sink.send(&done.schema, e, pending).await?;
        stats
            .encoded_bytes_total
            .fetch_add(n as u64, Ordering::Relaxed);
    }
    let n = done.events.len() as u64;
    stats.events_total.fetch_add(n, Ordering::Relaxed);
    stats.snapshot_rows_total.fetch_add(n, Ordering::Relaxed);
    if let (Some(job), Some(progress)) = (&done.backfill, &done.progress) {
        if let Some(b) = state.backfills.get_mut(job) {
            b.rows += n;
            b.progress = Some(progress.clone());
            b.rate = rate_limit.0;
            b.limit = rate_limit.1.clone();
            if let Some(n) = b.sample {
                if b.rows >= n && b.sample_state.is_none() && *progress != TableProgress::Done {
                    b.sample_state = Some("held".into());
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
            state.tables.insert(done.table.to_string(), progress);
            Ok(true)
        }
        None => {
            tracing::info!(table = %done.table, rows = n, "repair rows re-captured");
            Ok(false)
        }
    }
}

async fn send_batch(
    tx: &mpsc::Sender<AckBatch>,
    lsn: Option<Lsn>,
    pending: &mut Vec<(String, rdkafka::producer::DeliveryFuture)>,
) -> Result<(), CaptureError> {
    let deliveries = std::mem::take(pending);
    tx.send(AckBatch { lsn, deliveries })
        .await
        .map_err(|_| CaptureError::Setup("internal: acknowledgement task is gone".into()))
}
