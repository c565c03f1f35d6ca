//! The applier: destination batch topic → verified batches → replicated per-table topics and a
//! destination PostgreSQL database.
//!
//! ```text
//!  batch topic ──StreamConsumer (group)──▶ verify ──ok──▶ replicated topics (await acks)
//!                                            │                 │
//!                                            │ corrupt         ▼
//!                                            ▼           destination Postgres: one transaction
//!                                     quarantine topic   (rows + batch id), then commit offset
//! ```
//!
//! Progress: a batch-topic offset is committed only after the batch's rows are committed in the
//! destination database (together with its batch id) and its replicated records are
//! acknowledged. Applying a batch twice changes nothing: its id is already recorded, and every
//! row write is guarded by the source position it carries (`(lsn, seq)`), so an older change
//! never overwrites a newer one, also across batches replayed out of order. Deletes leave a
//! tombstone with their position, so a replayed older insert cannot resurrect a row. Replicated
//! topics are at-least-once: a crash between their acks and the offset commit repeats records,
//! which consumers recognise by `source.lsn`/`source.seq`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_connectors::kafka::{Cluster, TopicSpec};
use ferry_connectors::postgres::pgtext::to_text;
use ferry_connectors::postgres::{quote_ident, PgConfig, Session};
use ferry_connectors::registry::{subject, SchemaRegistry};
use ferry_schemas::manifest::{self, Manifest};
use ferry_schemas::{
    ChangeEvent, ColumnType, EncodedSchema, Header as WireHeader, Op, TableId, TableSchema,
};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_postgres::types::Type;

use crate::batch::payload;
use crate::batch::Run;
use crate::config::{Config, OnCorrupt};
use crate::ship::{client, Registry, ShipError};

/// Live counters of an applier.
#[derive(Debug, Default)]
pub struct ApplyStats {
    /// Batches applied.
    pub batches_applied_total: AtomicU64,
    /// Batches skipped because they were applied before.
    pub batches_duplicate_total: AtomicU64,
    /// Batches that failed verification.
    pub batches_quarantined_total: AtomicU64,
    /// Rows written (inserted or updated) in the destination database.
    pub rows_written_total: AtomicU64,
    /// Rows deleted.
    pub rows_deleted_total: AtomicU64,
    /// Changes ignored because the destination already held a newer position.
    pub rows_stale_total: AtomicU64,
    /// Partitions stopped on a corrupt batch.
    pub stopped: Mutex<Vec<String>>,
}

/// Verifies a batch record completely before anything of it is used: framing and both
/// checksums, manifest consistency, payload decoding with known schemas, row count, offsets and
/// positions within the manifest's ranges, and the table.
pub fn verify(
    value: &[u8],
    schema_of: impl Fn(&str) -> Option<Arc<EncodedSchema>>,
) -> Result<(Manifest, Vec<Run>), String> {
    let (m, payload_bytes) = manifest::unframe(value).map_err(|e| e.to_string())?;
    if m.kind != "changes" {
        return Err(format!("kind {:?} is not a change batch", m.kind));
    }
    if m.codec != payload::CODEC {
        return Err(format!("unknown codec {:?}", m.codec));
    }
    for fp in &m.schema_fingerprints {
        if schema_of(fp).is_none() {
            return Err(format!(
                "schema {fp} is not in the destination schema topic"
            ));
        }
    }
    let runs = payload::decode(
        payload_bytes,
        usize::try_from(m.uncompressed_bytes)
            .map_err(|_| "negative uncompressed size".to_string())?,
        &m.schema_fingerprints,
        &m.source_region,
        &schema_of,
    )
    .map_err(|e| e.to_string())?;
    let rows: usize = runs.iter().map(|r| r.events.len()).sum();
    if rows as i64 != m.events_out {
        return Err(format!(
            "payload has {rows} rows, manifest says {}",
            m.events_out
        ));
    }
    for r in &runs {
        if r.schema.table().id.to_string() != m.table {
            return Err(format!(
                "payload holds {}, manifest says {}",
                r.schema.table().id,
                m.table
            ));
        }
        for (offset, e) in &r.events {
            if *offset < m.first_offset || *offset > m.last_offset {
                return Err(format!(
                    "row at origin offset {offset} is outside {}-{}",
                    m.first_offset, m.last_offset
                ));
            }
            let lsn = e.source.lsn as i64;
            if lsn < m.min_lsn || lsn > m.max_lsn {
                return Err(format!(
                    "row at LSN {lsn} is outside the manifest's {}-{}",
                    m.min_lsn, m.max_lsn
                ));
            }
        }
    }
    Ok((m, runs))
}

/// The destination column type for a source column.
pub fn dest_type(ty: &ColumnType, pg_type: &str) -> String {
    match ty {
        ColumnType::Int2 => "int2".into(),
        ColumnType::Int4 => "int4".into(),
        ColumnType::Int8 => "int8".into(),
        ColumnType::Float4 => "float4".into(),
        ColumnType::Float8 => "float8".into(),
        ColumnType::Bool => "bool".into(),
        ColumnType::Numeric => "numeric".into(),
        ColumnType::Text | ColumnType::Enum => "text".into(),
        ColumnType::Bytea => "bytea".into(),
        ColumnType::Date => "date".into(),
        ColumnType::Time => "time".into(),
        ColumnType::Timestamp => "timestamp".into(),
        ColumnType::TimestampTz => "timestamptz".into(),
        ColumnType::Uuid => "uuid".into(),
        ColumnType::Json => if pg_type == "jsonb" { "jsonb" } else { "json" }.into(),
        ColumnType::Array(inner) => {
            format!("{}[]", dest_type(inner, pg_type.trim_start_matches('_')))
        }
        ColumnType::Other => {
            // A built-in type (inet, interval, …) keeps its type; anything else becomes text.
            if !pg_type.contains('.')
                && pg_type
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                pg_type.into()
            } else {
                "text".into()
            }
        }
    }
}

/// Ferry's bookkeeping columns on every destination table.
pub const LINEAGE_COLUMNS: [&str; 5] = [
    "_ferry_lsn",
    "_ferry_seq",
    "_ferry_batch",
    "_ferry_partition",
    "_ferry_offset",
];

/// The destination database.
pub struct DestDb {
    session: Session,
    target: String,
    tables: HashMap<TableId, HashSet<String>>,
    statements: HashMap<String, tokio_postgres::Statement>,
}

/// A Postgres error with its target and action; lost connections and passing conditions
/// ([`crate::error::passing`]) are retried, anything else is not.
fn db_err(target: &str, action: &str) -> impl FnOnce(tokio_postgres::Error) -> ShipError {
    let msg = format!("postgres {target}: {action}");
    move |e| {
        if crate::error::passing(&e) {
            ShipError::Unavailable(format!("{msg}: {e}"))
        } else {
            ShipError::Permanent(format!("{msg}: {e}"))
        }
    }
}

impl DestDb {
    /// Connects and creates Ferry's bookkeeping tables when missing.
    pub async fn connect(pg: &PgConfig) -> Result<DestDb, ShipError> {
        let target = pg.display();
        let session = pg.connect().await.map_err(db_err(&target, "connecting"))?;
        session
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS ferry;
                 CREATE TABLE IF NOT EXISTS ferry.applied_batches (
                   batch_id text PRIMARY KEY, origin_topic text NOT NULL, origin_partition int NOT NULL,
                   first_offset bigint NOT NULL, last_offset bigint NOT NULL, rows int NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now());
                 CREATE TABLE IF NOT EXISTS ferry.tombstones (
                   tbl text NOT NULL, key text NOT NULL, lsn bigint NOT NULL, seq bigint NOT NULL,
                   batch text NOT NULL, PRIMARY KEY (tbl, key));
                 CREATE TABLE IF NOT EXISTS ferry.truncates (
                   tbl text PRIMARY KEY, lsn bigint NOT NULL, seq bigint NOT NULL, batch text NOT NULL);",
            )
            .await
            .map_err(db_err(&target, "creating ferry bookkeeping tables"))?;
        Ok(DestDb {
            session,
            target,
            tables: HashMap::new(),
            statements: HashMap::new(),
        })
    }

    /// Creates the table when missing and adds columns it lacks.
    async fn ensure_table(&mut self, t: &TableSchema) -> Result<(), ShipError> {
        if t.key_indexes().is_empty() {
            return Err(ShipError::Permanent(format!(
                "{} has no key; it cannot be applied idempotently",
                t.id
            )));
        }
        if let Some(cols) = self.tables.get(&t.id) {
            if t.columns.iter().all(|c| cols.contains(&c.name)) {
                return Ok(());
            }
        }
        let q = format!("{}.{}", quote_ident(&t.id.schema), quote_ident(&t.id.table));
        let defs: Vec<String> = t
            .columns
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), dest_type(&c.ty, &c.pg_type)))
            .collect();
        let keys: Vec<String> = t
            .key_indexes()
            .iter()
            .map(|&i| quote_ident(&t.columns[i].name))
            .collect();
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {q} ({defs}, _ferry_lsn bigint NOT NULL, _ferry_seq bigint NOT NULL,
               _ferry_batch text NOT NULL, _ferry_partition int NOT NULL, _ferry_offset bigint NOT NULL,
               PRIMARY KEY ({keys}))",
            schema = quote_ident(&t.id.schema),
            defs = defs.join(", "),
            keys = keys.join(", ")
        );
        self.session
            .batch_execute(&ddl)
            .await
            .map_err(db_err(&self.target, &format!("creating {q}")))?;
        let existing: HashSet<String> = self
            .session
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
                &[&t.id.schema, &t.id.table],
            )
            .await
            .map_err(db_err(&self.target, "reading columns"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for c in &t.columns {
            if !existing.contains(&c.name) {
                let sql = format!(
                    "ALTER TABLE {q} ADD COLUMN IF NOT EXISTS {} {}",
                    quote_ident(&c.name),
                    dest_type(&c.ty, &c.pg_type)
                );
                self.session
                    .batch_execute(&sql)
                    .await
                    .map_err(db_err(&self.target, &format!("adding {} to {q}", c.name)))?;
                tracing::info!(table = %t.id, column = c.name, "column added in the destination");
            }
        }
        let mut cols: HashSet<String> = existing;
        cols.extend(t.columns.iter().map(|c| c.name.clone()));
        self.tables.insert(t.id.clone(), cols);
        Ok(())
    }

    async fn statement(
        &mut self,
        sql: String,
        params: usize,
    ) -> Result<tokio_postgres::Statement, ShipError> {
        if let Some(s) = self.statements.get(&sql) {
            return Ok(s.clone());
        }
        let types = vec![Type::TEXT; params];
        let st = self
            .session
            .prepare_typed(&sql, &types)
            .await
            .map_err(db_err(&self.target, "preparing a statement"))?;
        self.statements.insert(sql, st.clone());
        Ok(st)
    }

    /// Whether a batch was applied before.
    pub async fn has(&mut self, batch_id: &str) -> Result<bool, ShipError> {
        let t = self.target.clone();
        let row = self
            .session
            .query_opt(
                "SELECT 1 FROM ferry.applied_batches WHERE batch_id = $1",
                &[&batch_id],
            )
            .await
            .map_err(db_err(&t, "looking a batch up"))?;
        Ok(row.is_some())
    }

    /// Applies a verified batch in one transaction with its id. Returns false when the batch
    /// had been applied before (nothing is changed then).
    pub async fn apply(
        &mut self,
        m: &Manifest,
        runs: &[Run],
        stats: &ApplyStats,
    ) -> Result<bool, ShipError> {
        for r in runs {
            self.ensure_table(r.schema.table()).await?;
        }
        let t = self.target.clone();
        self.session
            .batch_execute("BEGIN")
            .await
            .map_err(db_err(&t, "BEGIN"))?;
        let result = self.apply_in_txn(m, runs, stats).await;
        match result {
            Ok(true) => {
                self.session
                    .batch_execute("COMMIT")
                    .await
                    .map_err(db_err(&t, "COMMIT"))?;
                Ok(true)
            }
            Ok(false) => {
                self.session
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(db_err(&t, "ROLLBACK"))?;
                Ok(false)
            }
            Err(e) => {
                let _ = self.session.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    async fn apply_in_txn(
        &mut self,
        m: &Manifest,
        runs: &[Run],
        stats: &ApplyStats,
    ) -> Result<bool, ShipError> {
        let t = self.target.clone();
        let rows: usize = runs.iter().map(|r| r.events.len()).sum();
        let fresh = self
            .session
            .execute(
                "INSERT INTO ferry.applied_batches (batch_id, origin_topic, origin_partition, first_offset, last_offset, rows)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (batch_id) DO NOTHING",
                &[&m.batch_id, &m.origin_topic, &m.origin_partition, &m.first_offset, &m.last_offset, &(rows as i32)],
            )
            .await
            .map_err(db_err(&t, "recording the batch"))?;
        if fresh == 0 {
            return Ok(false);
        }
        for r in runs {
            let table = r.schema.table();
            for (offset, e) in &r.events {
                let n = match e.op {
                    Op::Create | Op::Update | Op::Read => self.upsert(table, m, *offset, e).await?,
                    Op::Delete => self.delete(table, m, *offset, e).await?,
                    Op::Truncate => self.truncate(table, m, e).await?,
                };
                match (e.op, n) {
                    (_, 0) => stats.rows_stale_total.fetch_add(1, Ordering::Relaxed),
                    (Op::Delete | Op::Truncate, n) => {
                        stats.rows_deleted_total.fetch_add(n, Ordering::Relaxed)
                    }
                    (_, n) => stats.rows_written_total.fetch_add(n, Ordering::Relaxed),
                };
            }
        }
        Ok(true)
    }

    fn key_text(table: &TableSchema, image: &[ferry_schemas::Datum]) -> String {
        let parts: Vec<Option<String>> = table
            .key_indexes()
            .iter()
            .map(|&i| to_text(&image[i], &table.columns[i].ty))
            .collect();
        serde_json::to_string(&parts).unwrap_or_default()
    }

    async fn upsert(
        &mut self,
        table: &TableSchema,
        m: &Manifest,
        offset: i64,
        e: &ChangeEvent,
    ) -> Result<u64, ShipError> {
        let Some(after) = &e.after else { return Ok(0) };
        let q = format!(
            "{}.{}",
            quote_ident(&table.id.schema),
            quote_ident(&table.id.table)
        );
        let mut cols = Vec::new();
        let mut params: Vec<Option<String>> = Vec::new();
        let mut selects = Vec::new();
        for (i, c) in table.columns.iter().enumerate() {
            if matches!(after[i], ferry_schemas::Datum::UnchangedToast) {
                continue; // never overwrite with an invented value
            }
            params.push(to_text(&after[i], &c.ty));
            cols.push(quote_ident(&c.name));
            selects.push(format!(
                "${}::text::{}",
                params.len(),
                dest_type(&c.ty, &c.pg_type)
            ));
        }
        let n = params.len();
        params.push(Some(e.source.lsn.to_string()));
        params.push(Some(e.source.seq.to_string()));
        params.push(Some(m.batch_id.clone()));
        params.push(Some(m.origin_partition.to_string()));
        params.push(Some(offset.to_string()));
        params.push(Some(table.id.to_string()));
        params.push(Some(Self::key_text(table, after)));
        let keys: Vec<String> = table
            .key_indexes()
            .iter()
            .map(|&i| quote_ident(&table.columns[i].name))
            .collect();
        let set: Vec<String> = cols
            .iter()
            .chain(
                LINEAGE_COLUMNS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .iter(),
            )
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let sql = format!(
            "INSERT INTO {q} ({cols}, _ferry_lsn, _ferry_seq, _ferry_batch, _ferry_partition, _ferry_offset)
             SELECT {selects}, ${l}::text::bigint, ${s}::text::bigint, ${b}, ${p}::text::int, ${o}::text::bigint
             WHERE NOT EXISTS (SELECT 1 FROM ferry.tombstones WHERE tbl = ${tb} AND key = ${k}
                                 AND (lsn, seq) >= (${l}::text::bigint, ${s}::text::bigint))
               AND NOT EXISTS (SELECT 1 FROM ferry.truncates WHERE tbl = ${tb}
                                 AND (lsn, seq) >= (${l}::text::bigint, ${s}::text::bigint))
             ON CONFLICT ({keys}) DO UPDATE SET {set}
             WHERE ({q}._ferry_lsn, {q}._ferry_seq) < (EXCLUDED._ferry_lsn, EXCLUDED._ferry_seq)",
            cols = cols.join(", "),
            selects = selects.join(", "),
            l = n + 1,
            s = n + 2,
            b = n + 3,
            p = n + 4,
            o = n + 5,
            tb = n + 6,
            k = n + 7,
            keys = keys.join(", "),
            set = set.join(", "),
        );
        let st = self.statement(sql, params.len()).await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let t = self.target.clone();
        self.session
            .execute(&st, &refs)
            .await
            .map_err(db_err(&t, &format!("writing a row of {q}")))
    }

    async fn delete(
        &mut self,
        table: &TableSchema,
        m: &Manifest,
        _offset: i64,
        e: &ChangeEvent,
    ) -> Result<u64, ShipError> {
        let Some(before) = &e.before else {
            return Ok(0);
        };
        let q = format!(
            "{}.{}",
            quote_ident(&table.id.schema),
            quote_ident(&table.id.table)
        );
        let mut params: Vec<Option<String>> = Vec::new();
        let mut conds = Vec::new();
        for &i in &table.key_indexes() {
            let c = &table.columns[i];
            params.push(to_text(&before[i], &c.ty));
            conds.push(format!(
                "{} = ${}::text::{}",
                quote_ident(&c.name),
                params.len(),
                dest_type(&c.ty, &c.pg_type)
            ));
        }
        let n = params.len();
        params.push(Some(e.source.lsn.to_string()));
        params.push(Some(e.source.seq.to_string()));
        params.push(Some(table.id.to_string()));
        params.push(Some(Self::key_text(table, before)));
        params.push(Some(m.batch_id.clone()));
        let sql = format!(
            "WITH gone AS (DELETE FROM {q} WHERE {conds} AND (_ferry_lsn, _ferry_seq) < (${l}::text::bigint, ${s}::text::bigint) RETURNING 1),
                  mark AS (INSERT INTO ferry.tombstones (tbl, key, lsn, seq, batch)
                           VALUES (${tb}, ${k}, ${l}::text::bigint, ${s}::text::bigint, ${b})
                           ON CONFLICT (tbl, key) DO UPDATE SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq, batch = EXCLUDED.batch
                           WHERE (ferry.tombstones.lsn, ferry.tombstones.seq) < (EXCLUDED.lsn, EXCLUDED.seq))
             SELECT count(*) FROM gone",
            conds = conds.join(" AND "),
            l = n + 1,
            s = n + 2,
            tb = n + 3,
            k = n + 4,
            b = n + 5,
        );
        let st = self.statement(sql, params.len()).await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let t = self.target.clone();
        let row = self
            .session
            .query_one(&st, &refs)
            .await
            .map_err(db_err(&t, &format!("deleting from {q}")))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn truncate(
        &mut self,
        table: &TableSchema,
        m: &Manifest,
        e: &ChangeEvent,
    ) -> Result<u64, ShipError> {
        let q = format!(
            "{}.{}",
            quote_ident(&table.id.schema),
            quote_ident(&table.id.table)
        );
        let (lsn, seq) = (e.source.lsn as i64, e.source.seq as i64);
        let t = self.target.clone();
        let n = self
            .session
            .execute(
                &format!("DELETE FROM {q} WHERE (_ferry_lsn, _ferry_seq) < ($1, $2)"),
                &[&lsn, &seq],
            )
            .await
            .map_err(db_err(&t, &format!("truncating {q}")))?;
        self.session
            .execute(
                "INSERT INTO ferry.truncates (tbl, lsn, seq, batch) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tbl) DO UPDATE SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq, batch = EXCLUDED.batch
                 WHERE (ferry.truncates.lsn, ferry.truncates.seq) < (EXCLUDED.lsn, EXCLUDED.seq)",
                &[&table.id.to_string(), &lsn, &seq, &m.batch_id],
            )
            .await
            .map_err(db_err(&t, "recording a truncate"))?;
        Ok(n.max(1))
    }
}

/// Runs the applier until `stop` turns true, retrying transient failures (brokers or the
/// destination database away): everything after the last committed offset is applied again,
/// which the batch ids make harmless.
pub async fn run(
    cfg: &Config,
    stop: watch::Receiver<bool>,
    stats: Arc<ApplyStats>,
) -> Result<(), ShipError> {
    crate::runtime::retry::retrying(
        cfg.capture.max_backoff_ms,
        stop,
        "applying",
        || {},
        |stop| {
            let stats = stats.clone();
            async move { run_once(cfg, stop, stats).await }
        },
    )
    .await
}

async fn run_once(
    cfg: &Config,
    mut stop: watch::Receiver<bool>,
    stats: Arc<ApplyStats>,
) -> Result<(), ShipError> {
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let batch_topic = cfg.batch_topic();
    let quarantine = cfg.quarantine_topic();
    dest.ensure_topics(&[
        TopicSpec {
            name: batch_topic.clone(),
            partitions: cfg.ship.batch_partitions,
            config: vec![],
        },
        TopicSpec {
            name: quarantine.clone(),
            partitions: 1,
            config: vec![],
        },
    ])
    .await?;
    let producer = dest.producer(5)?;
    let mut db = match (&cfg.destination.postgres, cfg.apply.postgres) {
        (Some(pg), true) => Some(DestDb::connect(pg).await?),
        _ => None,
    };
    let mut registry = Registry::new(dest.clone(), &cfg.capture.topic_prefix);
    // Confluent format: the replicated topics carry the destination registry's ids.
    let dest_registry = cfg.destination_registry()?;
    let mut cc = dest.client_config();
    cc.set("group.id", &cfg.apply.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    if !cfg.apply.instance_id.is_empty() {
        cc.set("group.instance.id", &cfg.apply.instance_id);
    }
    let consumer: StreamConsumer = cc.create().map_err(|e| {
        ShipError::Permanent(format!("kafka destination: creating the consumer: {e}"))
    })?;
    consumer.subscribe(&[&batch_topic]).map_err(|e| {
        ShipError::Unexpected(format!(
            "kafka destination: subscribing to {batch_topic}: {e}"
        ))
    })?;
    tracing::info!(
        group = cfg.apply.group_id,
        batch_topic,
        database = db.is_some(),
        topics = cfg.apply.topics,
        "applying"
    );
    let mut known_topics: HashSet<String> = HashSet::new();
    let mut stopped: HashSet<i32> = HashSet::new();
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => break,
            m = consumer.recv() => m.map_err(client("destination", "consuming"))?,
        };
        let (partition, offset) = (msg.partition(), msg.offset());
        if stopped.contains(&partition) {
            continue;
        }
        let value = msg.payload().unwrap_or_default().to_vec();
        // Load schemas this batch names before verifying (a miss re-reads the schema topic).
        if let Ok((m, _)) = manifest::unframe(&value) {
            for fp in &m.schema_fingerprints {
                let _ = tokio::task::block_in_place(|| registry.get(fp));
            }
        }
        match verify(&value, |fp| registry.cached(fp)) {
            Err(reason) => {
                stats
                    .batches_quarantined_total
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    topic = batch_topic,
                    partition,
                    offset,
                    reason,
                    "corrupt batch quarantined; nothing of it was applied"
                );
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "ferry.reason",
                        value: Some(reason.as_bytes()),
                    })
                    .insert(Header {
                        key: "ferry.source",
                        value: Some(format!("{batch_topic}/{partition}/{offset}").as_bytes()),
                    });
                let key = msg.key().map(<[u8]>::to_vec).unwrap_or_default();
                producer
                    .send(
                        FutureRecord::to(&quarantine)
                            .key(&key)
                            .payload(&value)
                            .headers(headers),
                        Duration::from_secs(60),
                    )
                    .await
                    .map_err(|(e, _)| client("destination", "quarantining")(e))?;
                let copies = tokio::task::block_in_place(|| {
                    same_key_after(&dest, &batch_topic, partition, offset, msg.key())
                });
                let mut superseded = None;
                for (at, copy) in copies {
                    if let Ok((m, _)) = manifest::unframe(&copy) {
                        for fp in &m.schema_fingerprints {
                            let _ = tokio::task::block_in_place(|| registry.get(fp));
                        }
                    }
                    if verify(&copy, |fp| registry.cached(fp)).is_ok() {
                        superseded = Some(at);
                        break;
                    }
                }
                if let Some(at) = superseded {
                    tracing::warn!(
                        partition,
                        offset,
                        copy_at = at,
                        "a verified re-shipped copy of this batch follows; carrying on"
                    );
                } else if cfg.apply.on_corrupt == OnCorrupt::Stop {
                    stopped.insert(partition);
                    if let Ok(mut s) = stats.stopped.lock() {
                        s.push(format!(
                            "{batch_topic}[{partition}] at offset {offset}: {reason}"
                        ));
                    }
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&batch_topic, partition);
                    let _ = consumer.pause(&tpl);
                    tracing::error!(partition, offset, "partition stopped (apply.on_corrupt = stop): inspect the quarantine topic, re-ship the range (ferry reship), then restart");
                    continue;
                }
            }
            Ok((m, runs)) => {
                // A batch the database has is in the replicated topics too (they are written
                // first): a re-delivered copy goes to neither.
                let before = match db.as_mut() {
                    Some(db) => db.has(&m.batch_id).await?,
                    None => false,
                };
                if cfg.apply.topics && !before {
                    replicate(
                        &dest,
                        &producer,
                        cfg,
                        dest_registry.as_ref(),
                        &runs,
                        &mut known_topics,
                    )
                    .await?;
                }
                let applied = match db.as_mut() {
                    Some(db) if !before => db.apply(&m, &runs, &stats).await?,
                    Some(_) => false,
                    None => true,
                };
                if applied {
                    stats.batches_applied_total.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(batch = m.batch_id, rows = m.events_out, "batch applied");
                } else {
                    stats
                        .batches_duplicate_total
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(batch = m.batch_id, "batch applied before; skipped");
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&batch_topic, partition, Offset::Offset(offset + 1))
            .map_err(|e| ShipError::Unexpected(e.to_string()))?;
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(client("destination", "committing"))?;
    }
    Ok(())
}

/// Writes a batch's changes to the replicated per-table topics, in the origin's format: with a
/// `registry`, the Confluent wire format with that (the destination's) registry's ids.
async fn replicate(
    dest: &Cluster,
    producer: &ferry_connectors::kafka::Producer,
    cfg: &Config,
    registry: Option<&SchemaRegistry>,
    runs: &[Run],
    known: &mut HashSet<String>,
) -> Result<(), ShipError> {
    let mut pending = Vec::new();
    for r in runs {
        let topic = crate::topics::table_topic(&cfg.capture.topic_prefix, &r.schema.table().id);
        if known.insert(topic.clone()) {
            dest.ensure_topics(&[TopicSpec {
                name: topic.clone(),
                partitions: cfg.capture.partitions,
                config: vec![],
            }])
            .await?;
        }
        let headers = match registry {
            // Cached after the first call; the shipper registered them before the batch.
            Some(reg) => (
                if r.schema.has_key() {
                    Some(WireHeader::Confluent(
                        reg.register(&subject(&topic, true), &r.schema.key_json)
                            .await?,
                    ))
                } else {
                    None
                },
                WireHeader::Confluent(
                    reg.register(&subject(&topic, false), &r.schema.value_json)
                        .await?,
                ),
            ),
            None => (
                Some(WireHeader::SingleObject(r.schema.key_fp)),
                WireHeader::SingleObject(r.schema.value_fp),
            ),
        };
        let (mut key, mut value) = (Vec::new(), Vec::new());
        for (_, e) in &r.events {
            let keyed = crate::record::encode(&r.schema, e, headers, &mut key, &mut value)
                .map_err(|err| ShipError::Permanent(err.to_string()))?;
            for p in crate::record::targets(e.op, cfg.capture.partitions) {
                let mut rec = FutureRecord::to(&topic).payload(&value);
                if keyed {
                    rec = rec.key(&key);
                }
                if let Some(p) = p {
                    rec = rec.partition(p);
                }
                let d = ferry_connectors::kafka::enqueue(producer, rec)
                    .await
                    .map_err(client("destination", format!("replicating to {topic}")))?;
                pending.push(d);
            }
        }
    }
    for d in pending {
        d.await
            .map_err(|_| ShipError::Unavailable("kafka destination: producer closed".into()))?
            .map_err(|(err, _)| client("destination", "replicating")(err))?;
    }
    Ok(())
}

/// Answers which batch, origin partition/offset and source position last wrote a row (or
/// deleted it), from the lineage columns and tombstones Ferry keeps in the destination.
pub async fn lineage(pg: &PgConfig, table: &TableId, key: &str) -> Result<String, ShipError> {
    let target = pg.display();
    let s = pg.connect().await.map_err(db_err(&target, "connecting"))?;
    let keys: Vec<String> = s
        .query(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.table))],
        )
        .await
        .map_err(db_err(&target, "reading the key"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if keys.is_empty() {
        return Err(ShipError::Permanent(format!(
            "{table} does not exist in the destination (or has no key)"
        )));
    }
    let values: Vec<&str> = key.split(',').map(str::trim).collect();
    if values.len() != keys.len() {
        return Err(ShipError::Permanent(format!(
            "{table} has key ({}); give {} value(s)",
            keys.join(", "),
            keys.len()
        )));
    }
    let conds: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{}::text = ${}", quote_ident(k), i + 1))
        .collect();
    let sql = format!(
        "SELECT _ferry_batch, _ferry_partition, _ferry_offset, _ferry_lsn, _ferry_seq FROM {}.{} WHERE {}",
        quote_ident(&table.schema),
        quote_ident(&table.table),
        conds.join(" AND ")
    );
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        values.iter().map(|v| v as _).collect();
    let lsn_text = |l: i64| ferry_schemas::Lsn(l as u64).to_string();
    if let Some(r) = s
        .query_opt(&sql, &params)
        .await
        .map_err(db_err(&target, "reading lineage"))?
    {
        let (batch, p, o, l, q): (String, i32, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        return Ok(format!(
            "{table} ({}) = ({key}): last written by batch {batch}\n  origin partition {p}, offset {o}\n  source LSN {} (seq {q})",
            keys.join(", "),
            lsn_text(l)
        ));
    }
    let key_json = serde_json::to_string(
        &values
            .iter()
            .map(|v| Some(v.to_string()))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    match s
        .query_opt(
            "SELECT batch, lsn, seq FROM ferry.tombstones WHERE tbl = $1 AND key = $2",
            &[&table.to_string(), &key_json],
        )
        .await
        .map_err(db_err(&target, "reading tombstones"))?
    {
        Some(r) => Ok(format!(
            "{table} ({key}): deleted by batch {}\n  source LSN {} (seq {})",
            r.get::<_, String>(0),
            lsn_text(r.get(1)),
            r.get::<_, i64>(2)
        )),
        None => Ok(format!(
            "{table} ({key}): no such row in the destination, and no record of a delete"
        )),
    }
}

/// Records after a corrupt batch, in its partition, under the same key: candidate re-shipped
/// copies (`ferry reship` produces them).
fn same_key_after(
    dest: &Cluster,
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
) -> Vec<(i64, Vec<u8>)> {
    let mut out = Vec::new();
    let Some(key) = key else { return out };
    let Ok(reader) = dest.reader() else {
        return out;
    };
    let Ok((_, high)) = reader.fetch_watermarks(topic, partition, Duration::from_secs(10)) else {
        return out;
    };
    if offset + 1 >= high {
        return out;
    }
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(offset + 1))
        .is_err()
        || reader.assign(&tpl).is_err()
    {
        return out;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match reader.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                if m.key() == Some(key) {
                    out.push((m.offset(), m.payload().unwrap_or_default().to_vec()));
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(_)) => break,
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_schemas::{Column, ColumnType, Datum, Op, Source, TableId, TableSchema};

    fn schema() -> Arc<EncodedSchema> {
        let col = |name: &str, ty: ColumnType, pg: &str, key: bool| Column {
            name: name.into(),
            pg_type: pg.into(),
            type_oid: 0,
            ty,
            key,
        };
        let t = TableSchema {
            database: "db".into(),
            id: TableId::new("public", "t"),
            columns: vec![
                col("id", ColumnType::Int4, "int4", true),
                col("v", ColumnType::Text, "text", false),
            ],
        };
        Arc::new(EncodedSchema::new(&t).expect("schema"))
    }

    /// A valid framed batch of rows at offsets 10.. and LSNs 100.., and its manifest.
    fn batch(rows: i32) -> (Manifest, Vec<u8>) {
        let s = schema();
        let events = (0..rows)
            .map(|i| {
                let e = ChangeEvent {
                    op: Op::Create,
                    before: None,
                    after: Some(vec![Datum::Int(i), Datum::Text(format!("v{i}"))]),
                    source: Source {
                        region: "eu".into(),
                        database: "db".into(),
                        schema: "public".into(),
                        table: "t".into(),
                        lsn: 100 + i as u64,
                        seq: 0,
                        txid: Some(7),
                        commit_ts_us: None,
                        snapshot: false,
                    },
                };
                (10 + i64::from(i), e)
            })
            .collect();
        let runs = vec![Run { schema: s, events }];
        let enc = payload::encode(&runs, 3).expect("encode");
        let m = Manifest {
            batch_id: manifest::batch_id("origin", "p.public.t", 0, 10, 9 + i64::from(rows)),
            kind: "changes".into(),
            origin_cluster: "origin".into(),
            origin_topic: "p.public.t".into(),
            origin_partition: 0,
            first_offset: 10,
            last_offset: 9 + i64::from(rows),
            source_region: "eu".into(),
            destination_region: "us".into(),
            table: "public.t".into(),
            events_in: i64::from(rows),
            events_out: enc.rows as i64,
            min_lsn: 100,
            max_lsn: 99 + i64::from(rows),
            schema_fingerprints: enc.fingerprints.clone(),
            codec: payload::CODEC.into(),
            zstd_level: 3,
            raw_bytes: 0,
            payload_bytes: enc.bytes.len() as i64,
            uncompressed_bytes: enc.uncompressed as i64,
            crc32: i64::from(crc32fast::hash(&enc.bytes)),
            producer_version: "test".into(),
            created_at_us: 0,
        };
        let framed = manifest::frame(&m, &enc.bytes).expect("frame");
        (m, framed)
    }

    fn check(value: &[u8]) -> Result<usize, String> {
        let s = schema();
        let fp = s.value_fp.to_string();
        verify(value, |f| (f == fp).then(|| s.clone()))
            .map(|(_, runs)| runs.iter().map(|r| r.events.len()).sum())
    }

    /// The manifest changed by `change`, framed again with the original payload (checksums
    /// of the payload stay right, so only the consistency checks can catch it).
    fn with(change: impl Fn(&mut Manifest)) -> Vec<u8> {
        let (mut m, framed) = batch(5);
        let (_, payload) = manifest::unframe(&framed).expect("unframe");
        let payload = payload.to_vec();
        change(&mut m);
        manifest::frame(&m, &payload).expect("frame")
    }

    #[test]
    fn a_sound_batch_verifies() {
        assert_eq!(check(&batch(5).1), Ok(5));
    }

    #[test]
    fn every_kind_of_damage_is_caught_and_named() {
        let (_, good) = batch(5);
        let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), ""),
            ("truncated frame", good[..good.len() / 2].to_vec(), ""),
            ("one byte short", good[..good.len() - 1].to_vec(), ""),
        ];
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        cases.push(("payload byte flipped", flipped, ""));
        cases.push(("kind", with(|m| m.kind = "aggregate:x".into()), "kind"));
        cases.push(("codec", with(|m| m.codec = "lz4".into()), "codec"));
        cases.push(("row count", with(|m| m.events_out = 4), "rows"));
        cases.push((
            "table",
            with(|m| m.table = "public.other".into()),
            "manifest says public.other",
        ));
        let range = |first: i64, last: i64| {
            with(move |m| {
                m.first_offset = first;
                m.last_offset = last;
                m.batch_id = manifest::batch_id("origin", "p.public.t", 0, first, last);
            })
        };
        cases.push(("offsets", range(10, 12), "outside 10-12"));
        cases.push(("first offset", range(11, 14), "outside 11-14"));
        cases.push((
            "id against range",
            with(|m| m.last_offset = 12),
            "does not match its range",
        ));
        cases.push(("LSNs", with(|m| m.max_lsn = 101), "LSN"));
        cases.push((
            "unknown schema",
            with(|m| m.schema_fingerprints = vec!["00".repeat(8)]),
            "not in the destination schema topic",
        ));
        cases.push(("negative size", with(|m| m.uncompressed_bytes = -1), ""));
        for (what, value, names) in cases {
            match check(&value) {
                Ok(n) => panic!("{what}: verified ({n} rows)"),
                Err(e) => assert!(e.contains(names), "{what}: {e}"),
            }
        }
    }
}
