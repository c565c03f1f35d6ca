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
//! tombstone with their position, so a replayed older insert cannot resurrect a row.
//!
//! Replicated topics (`apply.exactly_once_topics`): a batch's records go out in one Kafka
//! transaction of its batch partition's producer, which commits after the database transaction,
//! together with the batch-topic offset. A crash in between aborts the Kafka transaction; the
//! record comes again, the database says it has the batch *from that record*, and only the
//! replicated records are written again. Without it they are at-least-once: a crash between
//! their acks and the offset commit repeats records (`source.lsn`/`source.seq` tell them).

pub mod stats;

pub use stats::ApplyStats;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_connectors::kafka::{Cluster, KafkaError, Span, TopicPartition, TopicSpec};
use ferry_connectors::postgres::pgtext::to_text;
use ferry_connectors::postgres::{quote_ident, PgConfig, Session};
use ferry_connectors::registry::{subject, SchemaRegistry};
use ferry_schemas::manifest::{self, Manifest, ManifestKind};
use ferry_schemas::{
    ChangeEvent, Column, ColumnType, Datum, EncodedSchema, Header as WireHeader, Op, TableId,
    TableSchema,
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
use crate::ship::{Registry, ShipError};

/// Why applying stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A Kafka operation failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// A client call on the destination cluster failed.
    #[error("kafka destination: {action}: {source}")]
    Client {
        /// What was being done.
        action: String,
        /// The client's error.
        source: rdkafka::error::KafkaError,
    },
    /// A statement in the destination database failed.
    #[error("postgres {target}: {action}: {source}")]
    Postgres {
        /// `host:port/db`.
        target: String,
        /// What was being done.
        action: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The destination's schema registry refused or did not answer.
    #[error(transparent)]
    Registry(#[from] ferry_connectors::registry::RegistryError),
    /// The destination's schema topic could not be read.
    #[error(transparent)]
    Schemas(#[from] ShipError),
    /// Something retrying cannot change: a destination table without a key, a row that does
    /// not encode, a lineage key of the wrong shape.
    #[error("{0}")]
    Permanent(String),
}

impl ApplyError {
    /// Whether a retry could help: brokers and connections yes; refused statements (by
    /// SQLSTATE class, [`crate::error::passing`]), refused records and setup no.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApplyError::Kafka(e) => e.is_retryable(),
            ApplyError::Client { source, .. } => !crate::error::refused_for_good(source),
            ApplyError::Postgres { source, .. } => crate::error::passing(source),
            ApplyError::Registry(e) => e.is_retryable(),
            ApplyError::Schemas(e) => e.is_retryable(),
            ApplyError::Permanent(_) => false,
        }
    }
}

impl ApplyError {
    /// Whether the failure is the table's: the destination refused its rows or its DDL (a
    /// constraint, a value out of range, a type it lacks), which holds that table and no other.
    pub fn is_table_fault(&self) -> bool {
        match self {
            ApplyError::Postgres { source, .. } => !crate::error::passing(source),
            ApplyError::Permanent(_) => true,
            _ => false,
        }
    }
}

impl crate::runtime::retry::Retryable for ApplyError {
    fn is_retryable(&self) -> bool {
        ApplyError::is_retryable(self)
    }
}

fn client_err(action: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> ApplyError {
    let action = action.into();
    move |source| ApplyError::Client { action, source }
}

/// Why a batch failed verification: it is quarantined with this reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// Verifies a batch record completely before anything of it is used: framing and both
/// checksums, manifest consistency, payload decoding with known schemas, row count, offsets and
/// positions within the manifest's ranges, and the table.
pub fn verify(
    value: &[u8],
    schema_of: impl Fn(&str) -> Option<Arc<EncodedSchema>>,
) -> Result<(Manifest, Vec<Run>), Rejected> {
    let (m, payload_bytes) = manifest::unframe(value).map_err(|e| Rejected(e.to_string()))?;
    if m.kind() != ManifestKind::Changes {
        return Err(Rejected(format!("kind {:?} is not a change batch", m.kind)));
    }
    if m.codec != payload::CODEC {
        return Err(Rejected(format!("unknown codec {:?}", m.codec)));
    }
    for fp in &m.schema_fingerprints {
        if schema_of(fp).is_none() {
            return Err(Rejected(format!(
                "schema {fp} is not in the destination schema topic"
            )));
        }
    }
    let runs = payload::decode(
        payload_bytes,
        usize::try_from(m.uncompressed_bytes)
            .map_err(|_| Rejected("negative uncompressed size".into()))?,
        &m.schema_fingerprints,
        &m.source_region,
        &schema_of,
    )
    .map_err(|e| Rejected(e.to_string()))?;
    let rows: usize = runs.iter().map(|r| r.events.len()).sum();
    if rows as i64 != m.events_out {
        return Err(Rejected(format!(
            "payload has {rows} rows, manifest says {}",
            m.events_out
        )));
    }
    for r in &runs {
        if r.schema.table().id.to_string() != m.table {
            return Err(Rejected(format!(
                "payload holds {}, manifest says {}",
                r.schema.table().id,
                m.table
            )));
        }
        for (offset, e) in &r.events {
            if *offset < m.first_offset || *offset > m.last_offset {
                return Err(Rejected(format!(
                    "row at origin offset {offset} is outside {}-{}",
                    m.first_offset, m.last_offset
                )));
            }
            let lsn = e.source.lsn as i64;
            if lsn < m.min_lsn || lsn > m.max_lsn {
                return Err(Rejected(format!(
                    "row at LSN {lsn} is outside the manifest's {}-{}",
                    m.min_lsn, m.max_lsn
                )));
            }
        }
    }
    Ok((m, runs))
}

/// The destination column type for a source column: the origin's own type with its modifier
/// (`bit(8)`, `character(5)`, `numeric(12,2)`, `timestamp(3) without time zone`), so every value
/// arrives unchanged. A type from outside `pg_catalog` (a domain, enum, composite or extension
/// type) is that type when the destination has it (`have` answers for its quoted qualified
/// name), else `text`, holding the value's text form.
pub fn dest_type(c: &Column, have: &dyn Fn(&str) -> bool) -> String {
    let (base, array) = type_name(c);
    let base = match base.split_once('.') {
        None => builtin_with_mod(&base, c.type_mod),
        Some((schema, name)) => {
            let q = format!("{}.{}", quote_ident(schema), quote_ident(name));
            if have(&q) {
                q
            } else {
                "text".into()
            }
        }
    };
    if array {
        format!("{base}[]")
    } else {
        base
    }
}

/// A column's type name without modifier (`int4`, `bpchar`, `public.mood`; for an array, its
/// element's: `_int4` is `int4`) and whether the column is an array of it.
fn type_name(c: &Column) -> (String, bool) {
    let name = c.pg_type.as_str();
    if !matches!(c.ty, ColumnType::Array(_)) {
        return (name.to_string(), false);
    }
    let element = match name.rsplit_once('.') {
        Some((schema, t)) => format!("{schema}.{}", t.strip_prefix('_').unwrap_or(t)),
        None => name.strip_prefix('_').unwrap_or(name).to_string(),
    };
    (element, true)
}

/// A `pg_catalog` type spelled with its modifier, the way `format_type` spells it.
fn builtin_with_mod(name: &str, type_mod: i32) -> String {
    const VARHDRSZ: i32 = 4;
    let precision = |base: &str, zone: &str| format!("{base}({type_mod}) {zone}");
    match (name, type_mod) {
        ("bpchar", m) if m >= VARHDRSZ => format!("character({})", m - VARHDRSZ),
        ("varchar", m) if m >= VARHDRSZ => format!("character varying({})", m - VARHDRSZ),
        ("bit", m) if m >= 0 => format!("bit({m})"),
        ("varbit", m) if m >= 0 => format!("bit varying({m})"),
        ("numeric", m) if m >= VARHDRSZ => {
            let t = m - VARHDRSZ;
            // Scale is an 11-bit signed field since Postgres 15 (negative scales).
            let (p, scale) = ((t >> 16) & 0xffff, ((t & 0x7ff) ^ 1024) - 1024);
            format!("numeric({p},{scale})")
        }
        ("time", m) if m >= 0 => precision("time", "without time zone"),
        ("timetz", m) if m >= 0 => precision("time", "with time zone"),
        ("timestamp", m) if m >= 0 => precision("timestamp", "without time zone"),
        ("timestamptz", m) if m >= 0 => precision("timestamp", "with time zone"),
        // `char` alone means character(1).
        ("char", _) => "\"char\"".into(),
        (name, _) => name.into(),
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

/// A column's identity across versions: its number at the origin when known, else its name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ColumnKey {
    Number(i16),
    Name(String),
}

impl ColumnKey {
    fn of(c: &Column) -> ColumnKey {
        c.attnum
            .map_or_else(|| ColumnKey::Name(c.name.clone()), ColumnKey::Number)
    }
}

/// The destination database.
pub struct DestDb {
    session: Session,
    target: String,
    /// Per table, the columns and destination types last made sure of.
    tables: HashMap<TableId, Vec<(String, String)>>,
    /// Types from outside `pg_catalog` (quoted, qualified), and whether the destination has them.
    udts: HashMap<String, bool>,
    /// The labels of each destination enum type seen so far (quoted name → labels).
    enum_labels: HashMap<String, HashSet<String>>,
    /// Per table, the origin key (column names) of the version last ensured.
    keys_seen: HashMap<TableId, Vec<String>>,
    /// Per table, the destination's primary key (quoted column names, in index order): upserts
    /// name it as their conflict target, whichever version a row comes from.
    pkeys: HashMap<TableId, Vec<String>>,
    /// Per table, columns added at the origin with a default, and the value rows older than
    /// them hold there (see [`DestDb::older_rows`]).
    /// Keyed by the column's number when known (so a later rename does not lose it), else by
    /// its name.
    missing: HashMap<TableId, BTreeMap<ColumnKey, (String, String)>>,
    /// Per table, the highest source position a schema version was applied with: only a
    /// version at least that new may change column types (batches of different partitions
    /// arrive in any order, and an older version must never change a type back).
    newest: HashMap<TableId, (u64, u64)>,
    /// Per table, the destination name of each origin column by its number (`attnum`): a
    /// column renamed at the origin is renamed here, and rows of older versions are written to
    /// it under its new name. Kept in `ferry.columns`.
    names: HashMap<TableId, HashMap<i16, String>>,
    statements: HashMap<String, tokio_postgres::Statement>,
}

/// A Postgres error with its target and action; lost connections and passing conditions
/// ([`crate::error::passing`]) are retried, anything else is not.
fn db_err(target: &str, action: &str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
    let (target, action) = (target.to_string(), action.to_string());
    move |source| ApplyError::Postgres {
        target,
        action,
        source,
    }
}

impl DestDb {
    /// Connects and creates Ferry's bookkeeping tables when missing.
    pub async fn connect(pg: &PgConfig) -> Result<DestDb, ApplyError> {
        let target = pg.display();
        let session = pg.connect().await.map_err(db_err(&target, "connecting"))?;
        session
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS ferry;
                 CREATE TABLE IF NOT EXISTS ferry.applied_batches (
                   batch_id text PRIMARY KEY, origin_topic text NOT NULL, origin_partition int NOT NULL,
                   first_offset bigint NOT NULL, last_offset bigint NOT NULL, rows int NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now());
                 ALTER TABLE ferry.applied_batches ADD COLUMN IF NOT EXISTS batch_partition int,
                   ADD COLUMN IF NOT EXISTS batch_offset bigint,
                   ADD COLUMN IF NOT EXISTS live boolean;
                 CREATE INDEX IF NOT EXISTS applied_batches_applied_at
                   ON ferry.applied_batches (applied_at);
                 CREATE INDEX IF NOT EXISTS applied_batches_origin
                   ON ferry.applied_batches (origin_topic, origin_partition, last_offset);
                 CREATE TABLE IF NOT EXISTS ferry.tombstones (
                   tbl text NOT NULL, key text NOT NULL, lsn bigint NOT NULL, seq bigint NOT NULL,
                   batch text NOT NULL, PRIMARY KEY (tbl, key));
                 ALTER TABLE ferry.tombstones ADD COLUMN IF NOT EXISTS at timestamptz NOT NULL DEFAULT now();
                 CREATE INDEX IF NOT EXISTS tombstones_at ON ferry.tombstones (at);
                 CREATE TABLE IF NOT EXISTS ferry.truncates (
                   tbl text PRIMARY KEY, lsn bigint NOT NULL, seq bigint NOT NULL, batch text NOT NULL);
                 CREATE TABLE IF NOT EXISTS ferry.held_tables (
                   tbl text PRIMARY KEY, reason text NOT NULL, batch text NOT NULL,
                   since timestamptz NOT NULL DEFAULT now(), batches int NOT NULL DEFAULT 1,
                   resume_requested timestamptz);
                 CREATE TABLE IF NOT EXISTS ferry.columns (
                   tbl text NOT NULL, attnum smallint NOT NULL, name text NOT NULL,
                   PRIMARY KEY (tbl, attnum));",
            )
            .await
            .map_err(db_err(&target, "creating ferry bookkeeping tables"))?;
        Ok(DestDb {
            session,
            target,
            tables: HashMap::new(),
            udts: HashMap::new(),
            enum_labels: HashMap::new(),
            keys_seen: HashMap::new(),
            pkeys: HashMap::new(),
            missing: HashMap::new(),
            newest: HashMap::new(),
            names: HashMap::new(),
            statements: HashMap::new(),
        })
    }

    /// A row written under an older version of `table` lacks the columns added since; at the
    /// origin such a row holds each one's default (`attmissingval`). Those of them this version
    /// lacks, as (quoted column, value, type): an insert under the old version writes them.
    fn older_rows(&self, table: &TableSchema) -> Vec<(String, String, String)> {
        let Some(missing) = self.missing.get(&table.id) else {
            return Vec::new();
        };
        let written: HashSet<String> = table
            .columns
            .iter()
            .map(|c| self.col_name(&table.id, c))
            .collect();
        missing
            .iter()
            .filter(|(key, _)| !table.columns.iter().any(|c| ColumnKey::of(c) == **key))
            .filter_map(|(key, (value, ty))| {
                let dest = match key {
                    ColumnKey::Number(n) => quote_ident(self.names.get(&table.id)?.get(n)?),
                    ColumnKey::Name(name) => quote_ident(name),
                };
                (!written.contains(&dest)).then(|| (dest, value.clone(), ty.clone()))
            })
            .collect()
    }

    /// The destination column a column of `table` is written to, quoted.
    fn col_name(&self, table: &TableId, c: &Column) -> String {
        let renamed = c
            .attnum
            .and_then(|n| self.names.get(table).and_then(|m| m.get(&n)));
        quote_ident(renamed.unwrap_or(&c.name))
    }

    /// Renames in the destination the columns renamed at the origin (known by their number,
    /// `ferry.columns`), and records where each column of this version is written. Only the
    /// newest version renames (`forward`); an older one writes to the renamed column.
    /// `existing` (name → type) is updated.
    async fn follow_renames(
        &mut self,
        t: &TableSchema,
        q: &str,
        forward: bool,
        existing: &mut HashMap<String, String>,
    ) -> Result<(), ApplyError> {
        let tbl = t.id.to_string();
        let recorded: HashMap<i16, String> = self
            .session
            .query(
                "SELECT attnum, name FROM ferry.columns WHERE tbl = $1",
                &[&tbl],
            )
            .await
            .map_err(db_err(&self.target, "reading ferry.columns"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut candidates = Vec::new();
        let mut names = HashMap::new();
        for c in &t.columns {
            let Some(n) = c.attnum else { continue };
            match recorded.get(&n) {
                Some(d) if d != &c.name && existing.contains_key(d) => {
                    if forward {
                        candidates.push((n, d.clone(), c.name.clone()));
                    }
                    names.insert(n, d.clone());
                }
                _ => {
                    names.insert(n, c.name.clone());
                }
            }
        }
        // A target may be taken only by a column that is itself renamed away (a swap).
        let leaving: HashSet<&String> = candidates.iter().map(|(_, from, _)| from).collect();
        let (renames, blocked): (Vec<_>, Vec<_>) = candidates
            .iter()
            .partition(|(_, _, to)| !existing.contains_key(to) || leaving.contains(to));
        for (_, from, to) in &blocked {
            tracing::warn!(table = %t.id, from, to,
                "column renamed at the origin, but the destination already has a column of the new name; writing to the old one");
        }
        if !renames.is_empty() {
            // Through temporary names, in one transaction, so that swaps work.
            let mut sql = String::new();
            for (i, (_, from, _)) in renames.iter().enumerate() {
                sql += &format!(
                    "ALTER TABLE {q} RENAME COLUMN {} TO {};\n",
                    quote_ident(from),
                    quote_ident(&format!("_ferry_renaming_{i}"))
                );
            }
            for (i, (n, from, to)) in renames.iter().enumerate() {
                sql += &format!(
                    "ALTER TABLE {q} RENAME COLUMN {} TO {};\n",
                    quote_ident(&format!("_ferry_renaming_{i}")),
                    quote_ident(to)
                );
                names.insert(*n, to.clone());
                tracing::info!(table = %t.id, from, to, "column renamed in the destination");
            }
            self.session
                .batch_execute(&format!("BEGIN;\n{sql}COMMIT"))
                .await
                .map_err(db_err(&self.target, &format!("renaming columns of {q}")))?;
            let moved: Vec<(String, String)> = renames
                .iter()
                .filter_map(|(_, from, to)| Some((to.clone(), existing.remove(from)?)))
                .collect();
            existing.extend(moved);
        }
        let (nums, dest): (Vec<i16>, Vec<String>) =
            names.iter().map(|(n, d)| (*n, d.clone())).unzip();
        self.session
            .execute(
                "INSERT INTO ferry.columns SELECT $1, n, d FROM unnest($2::int2[], $3::text[]) AS u(n, d)
                 ON CONFLICT (tbl, attnum) DO UPDATE SET name = EXCLUDED.name",
                &[&tbl, &nums, &dest],
            )
            .await
            .map_err(db_err(&self.target, "recording ferry.columns"))?;
        self.names.insert(t.id.clone(), names);
        Ok(())
    }

    /// The destination type of a column (see [`dest_type`]).
    fn col_type(&self, c: &Column) -> String {
        dest_type(c, &|q| self.udts.get(q).copied().unwrap_or(false))
    }

    /// What `format_type` calls a column's destination type there: its name for `to_regtype`
    /// and its modifier.
    fn type_key(&self, c: &Column) -> (String, i32) {
        let ddl = self.col_type(c);
        let (base, array) = type_name(c);
        let suffix = if array { "[]" } else { "" };
        match base.split_once('.') {
            // `char` alone would name character(1).
            None if base == "char" => (format!("\"char\"{suffix}"), -1),
            None => (format!("{base}{suffix}"), c.type_mod),
            Some(_) if ddl.starts_with("text") => (format!("text{suffix}"), -1),
            Some((schema, name)) => (
                format!("{}.{}{suffix}", quote_ident(schema), quote_ident(name)),
                c.type_mod,
            ),
        }
    }

    /// Learns which of a table's types from outside `pg_catalog` the destination has.
    async fn resolve_types(&mut self, t: &TableSchema) -> Result<(), ApplyError> {
        for c in &t.columns {
            let (base, _) = type_name(c);
            let Some((schema, name)) = base.split_once('.') else {
                continue;
            };
            let q = format!("{}.{}", quote_ident(schema), quote_ident(name));
            if self.udts.contains_key(&q) {
                continue;
            }
            let have: bool = self
                .session
                .query_one("SELECT to_regtype($1) IS NOT NULL", &[&q])
                .await
                .map_err(db_err(&self.target, &format!("looking type {q} up")))?
                .get(0);
            if !have {
                tracing::warn!(table = %t.id, column = c.name, pg_type = q,
                    "the destination has no such type; the column is created as text, holding its text form (create the type in the destination first to keep it)");
            }
            self.udts.insert(q, have);
        }
        Ok(())
    }

    /// Adds to the destination's enum types the labels this batch writes that they lack: a
    /// value added at the origin (`ALTER TYPE … ADD VALUE`, which sends no DDL to capture)
    /// arrives instead of holding its table. A new label goes last, so one added `BEFORE` or
    /// `AFTER` another at the origin sorts differently here until the same `ALTER TYPE` runs.
    async fn add_enum_labels(&mut self, runs: &[Run]) -> Result<(), ApplyError> {
        let mut wanted: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for r in runs {
            for (i, c) in r.schema.table().columns.iter().enumerate() {
                let array = match &c.ty {
                    ColumnType::Enum => false,
                    ColumnType::Array(inner) if **inner == ColumnType::Enum => true,
                    _ => continue,
                };
                let (base, _) = type_name(c);
                let Some((schema, name)) = base.split_once('.') else {
                    continue;
                };
                let q = format!("{}.{}", quote_ident(schema), quote_ident(name));
                if self.udts.get(&q) != Some(&true) {
                    continue; // created as text
                }
                let labels = wanted.entry(q).or_default();
                let images = r
                    .events
                    .iter()
                    .flat_map(|(_, e)| [e.before.as_ref(), e.after.as_ref()])
                    .flatten();
                for image in images {
                    match (image.get(i), array) {
                        (Some(Datum::Text(l)), false) => {
                            labels.insert(l.clone());
                        }
                        (Some(Datum::Array(items)), true) => {
                            for item in items {
                                if let Datum::Text(l) = item {
                                    labels.insert(l.clone());
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        for (q, labels) in wanted {
            let known = self.enum_labels.get(&q);
            if labels.iter().all(|l| known.is_some_and(|k| k.contains(l))) {
                continue;
            }
            let rows = self
                .session
                .query(
                    "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = to_regtype($1)::oid",
                    &[&q],
                )
                .await
                .map_err(db_err(&self.target, &format!("reading the labels of {q}")))?;
            let mut known: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
            let missing: Vec<&String> = labels.iter().filter(|l| !known.contains(*l)).collect();
            for l in missing {
                let sql = format!(
                    "ALTER TYPE {q} ADD VALUE IF NOT EXISTS {}",
                    ferry_connectors::postgres::quote_literal(l)
                );
                self.session
                    .batch_execute(&sql)
                    .await
                    .map_err(db_err(&self.target, &sql))?;
                tracing::info!(
                    pg_type = q,
                    label = l,
                    "enum value added at the destination (it was added at the origin)"
                );
                known.insert(l.clone());
            }
            self.enum_labels.insert(q, known);
        }
        Ok(())
    }

    /// Creates the table when missing, adds columns it lacks, and changes the type of columns
    /// whose type changed at the origin (`USING col::text::new`: the value's text form, so a
    /// change that cannot hold a value fails instead of rounding it).
    async fn ensure_table(
        &mut self,
        t: &TableSchema,
        position: (u64, u64),
    ) -> Result<(), ApplyError> {
        self.resolve_types(t).await?;
        let newest = self.newest.entry(t.id.clone()).or_default();
        let forward = position >= *newest;
        *newest = (*newest).max(position);
        let added: Vec<(ColumnKey, (String, String))> = t
            .columns
            .iter()
            .filter_map(|c| Some((ColumnKey::of(c), (c.missing.clone()?, self.col_type(c)))))
            .collect();
        let known = self.missing.entry(t.id.clone()).or_default();
        for (name, value) in added {
            known.entry(name).or_insert(value);
        }
        let wanted: Vec<(String, String)> = t
            .columns
            .iter()
            .map(|c| (c.name.clone(), self.col_type(c)))
            .collect();
        let wanted_key: Vec<String> = t
            .key_indexes()
            .iter()
            .map(|&i| t.columns[i].name.clone())
            .collect();
        if self.tables.get(&t.id) == Some(&wanted) && self.keys_seen.get(&t.id) == Some(&wanted_key)
        {
            return Ok(());
        }
        let q = format!("{}.{}", quote_ident(&t.id.schema), quote_ident(&t.id.table));
        let defs: Vec<String> = wanted
            .iter()
            .map(|(name, ty)| format!("{} {ty}", quote_ident(name)))
            .collect();
        let keys: Vec<String> = t
            .key_indexes()
            .iter()
            .map(|&i| quote_ident(&t.columns[i].name))
            .collect();
        // A table without a key gets none in the destination either: rows are matched by
        // their whole image there.
        let primary_key = if keys.is_empty() {
            String::new()
        } else {
            format!(", PRIMARY KEY ({})", keys.join(", "))
        };
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {q} ({defs}, _ferry_lsn bigint NOT NULL, _ferry_seq bigint NOT NULL,
               _ferry_batch text NOT NULL, _ferry_partition int NOT NULL, _ferry_offset bigint NOT NULL{primary_key})",
            schema = quote_ident(&t.id.schema),
            defs = defs.join(", "),
        );
        self.session
            .batch_execute(&ddl)
            .await
            .map_err(db_err(&self.target, &format!("creating {q}")))?;
        let mut existing: HashMap<String, String> = self
            .session
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                &[&q],
            )
            .await
            .map_err(db_err(&self.target, "reading columns"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        self.follow_renames(t, &q, forward, &mut existing).await?;
        let (names, mods): (Vec<String>, Vec<i32>) =
            t.columns.iter().map(|c| self.type_key(c)).unzip();
        let canonical: Vec<Option<String>> = self
            .session
            .query(
                "SELECT format_type(to_regtype(n), m) FROM unnest($1::text[], $2::int4[]) WITH ORDINALITY AS u(n, m, i) ORDER BY i",
                &[&names, &mods],
            )
            .await
            .map_err(db_err(&self.target, "naming column types"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (((name, ty), canonical), c) in wanted.iter().zip(&canonical).zip(&t.columns) {
            // Where this column lives in the destination (renamed there, maybe).
            let col = self.col_name(&t.id, c);
            let here = c
                .attnum
                .and_then(|n| self.names.get(&t.id).and_then(|m| m.get(&n)))
                .unwrap_or(name);
            match existing.get(here) {
                None => {
                    // A column added at the origin with a default: rows older than it hold that
                    // value there, so they get it here too.
                    let missing = t
                        .columns
                        .iter()
                        .find(|c| &c.name == name)
                        .and_then(|c| c.missing.as_deref());
                    let sql = match missing {
                        Some(v) => format!(
                            "ALTER TABLE {q} ADD COLUMN IF NOT EXISTS {col} {ty} DEFAULT {}::{ty};
                             ALTER TABLE {q} ALTER COLUMN {col} DROP DEFAULT",
                            ferry_connectors::postgres::quote_literal(v)
                        ),
                        None => format!("ALTER TABLE {q} ADD COLUMN IF NOT EXISTS {col} {ty}"),
                    };
                    self.session
                        .batch_execute(&sql)
                        .await
                        .map_err(db_err(&self.target, &format!("adding {name} to {q}")))?;
                    tracing::info!(table = %t.id, column = name, ty, "column added in the destination");
                }
                Some(have) if forward && canonical.as_ref().is_some_and(|c| c != have) => {
                    let sql = format!(
                        "ALTER TABLE {q} ALTER COLUMN {col} TYPE {ty} USING {col}::text::{ty}"
                    );
                    self.session.batch_execute(&sql).await.map_err(db_err(
                        &self.target,
                        &format!("changing the type of {name} in {q} from {have} to {ty}"),
                    ))?;
                    tracing::info!(table = %t.id, column = name, from = have, to = ty, "column type changed in the destination");
                }
                Some(_) => {}
            }
        }
        if !wanted_key.is_empty() {
            self.follow_key(t, &q, forward).await?;
        }
        self.tables.insert(t.id.clone(), wanted);
        self.keys_seen.insert(t.id.clone(), wanted_key);
        Ok(())
    }

    /// Learns the destination's primary key and, for the newest version (`forward`), makes it
    /// the origin's when the key columns changed there (`DROP CONSTRAINT …, ADD PRIMARY KEY …`;
    /// also a table that had no key). The new key holds in the destination when it holds for
    /// the rows there; if not, the change fails and the table is held. The same columns in
    /// another order are left as they are.
    async fn follow_key(
        &mut self,
        t: &TableSchema,
        q: &str,
        forward: bool,
    ) -> Result<(), ApplyError> {
        let desired: Vec<String> = t
            .key_indexes()
            .iter()
            .map(|&i| self.col_name(&t.id, &t.columns[i]))
            .collect();
        let rows = self
            .session
            .query(
                "SELECT a.attname::text, c.conname::text FROM pg_constraint c
                 CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)
                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
                 WHERE c.conrelid = to_regclass($1) AND c.contype = 'p' ORDER BY k.n",
                &[&q],
            )
            .await
            .map_err(db_err(
                &self.target,
                &format!("reading the primary key of {q}"),
            ))?;
        let mut current: Vec<String> = rows
            .iter()
            .map(|r| quote_ident(&r.get::<_, String>(0)))
            .collect();
        let as_set = |v: &[String]| v.iter().cloned().collect::<std::collections::BTreeSet<_>>();
        if forward && as_set(&current) != as_set(&desired) {
            let drop = rows.first().map_or(String::new(), |r| {
                format!("DROP CONSTRAINT {}, ", quote_ident(&r.get::<_, String>(1)))
            });
            let sql = format!(
                "ALTER TABLE {q} {drop}ADD PRIMARY KEY ({})",
                desired.join(", ")
            );
            self.session.batch_execute(&sql).await.map_err(db_err(
                &self.target,
                &format!(
                    "changing the primary key of {q} from ({}) to ({})",
                    current.join(", "),
                    desired.join(", ")
                ),
            ))?;
            tracing::info!(table = %t.id, from = current.join(", "), to = desired.join(", "),
                "primary key changed in the destination");
            current = desired;
        }
        self.pkeys.insert(t.id.clone(), current);
        Ok(())
    }

    async fn statement(
        &mut self,
        sql: String,
        params: usize,
    ) -> Result<tokio_postgres::Statement, ApplyError> {
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

    /// The tables held (see [`Applier::hold_table`]).
    pub async fn held(&mut self) -> Result<HashSet<String>, ApplyError> {
        let t = self.target.clone();
        Ok(self
            .session
            .query("SELECT tbl FROM ferry.held_tables", &[])
            .await
            .map_err(db_err(&t, "reading held tables"))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Records that `table` is held at `batch` for `reason` (a new hold, or a resume that
    /// failed again: the resume request is cleared).
    async fn hold(&mut self, table: &str, batch: &str, reason: &str) -> Result<(), ApplyError> {
        let t = self.target.clone();
        self.session
            .execute(
                "INSERT INTO ferry.held_tables (tbl, reason, batch) VALUES ($1, $2, $3)
                 ON CONFLICT (tbl) DO UPDATE SET reason = EXCLUDED.reason, batch = EXCLUDED.batch,
                   resume_requested = NULL",
                &[&table, &reason, &batch],
            )
            .await
            .map_err(db_err(&t, "recording a held table"))?;
        Ok(())
    }

    /// Counts one more batch held for `table`.
    async fn held_one_more(&mut self, table: &str) -> Result<(), ApplyError> {
        let t = self.target.clone();
        self.session
            .execute(
                "UPDATE ferry.held_tables SET batches = batches + 1 WHERE tbl = $1",
                &[&table],
            )
            .await
            .map_err(db_err(&t, "counting a held batch"))?;
        Ok(())
    }

    /// Held tables an operator asked to resume.
    async fn resume_requests(&mut self) -> Result<Vec<String>, ApplyError> {
        let t = self.target.clone();
        Ok(self
            .session
            .query(
                "SELECT tbl FROM ferry.held_tables WHERE resume_requested IS NOT NULL ORDER BY 1",
                &[],
            )
            .await
            .map_err(db_err(&t, "reading resume requests"))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Ends a hold.
    async fn release(&mut self, table: &str) -> Result<(), ApplyError> {
        let t = self.target.clone();
        self.session
            .execute("DELETE FROM ferry.held_tables WHERE tbl = $1", &[&table])
            .await
            .map_err(db_err(&t, "releasing a held table"))?;
        Ok(())
    }

    /// Deletes the bookkeeping older than `horizon`: applied batch ids and tombstones. Nothing
    /// that old can arrive again once the topics' retention deleted it (the horizon is longer),
    /// so neither dedupe nor resurrection depends on them any more. Returns (batches,
    /// tombstones) deleted.
    pub async fn prune(&mut self, horizon: Duration) -> Result<(u64, u64), ApplyError> {
        let t = self.target.clone();
        let secs = horizon.as_secs_f64();
        let batches = self
            .session
            .execute(
                "DELETE FROM ferry.applied_batches WHERE applied_at < now() - make_interval(secs => $1)",
                &[&secs],
            )
            .await
            .map_err(db_err(&t, "pruning applied batches"))?;
        let tombstones = self
            .session
            .execute(
                "DELETE FROM ferry.tombstones WHERE at < now() - make_interval(secs => $1)",
                &[&secs],
            )
            .await
            .map_err(db_err(&t, "pruning tombstones"))?;
        Ok((batches, tombstones))
    }

    /// Whether a batch was applied before.
    pub async fn has(&mut self, batch_id: &str) -> Result<bool, ApplyError> {
        Ok(self.applied_from(batch_id).await?.is_some())
    }

    /// The newest origin offset covered by an applied live-lane batch with rows of an origin
    /// partition in one incarnation of its topic (a replay's or reship's batches are not the
    /// live lane's progress; batches from before the `live` column count as not live).
    pub async fn covered(
        &mut self,
        (topic, partition, incarnation): &(String, i32, u32),
    ) -> Result<Option<i64>, ApplyError> {
        let prefix = ferry_schemas::manifest::BatchId::partition_prefix(
            "origin",
            topic,
            *incarnation,
            *partition,
        );
        let row = self
            .session
            .query_one(
                "SELECT max(last_offset) FROM ferry.applied_batches
                 WHERE origin_topic = $1 AND origin_partition = $2 AND rows > 0 AND live
                   AND starts_with(batch_id, $3)",
                &[topic, partition, &prefix],
            )
            .await
            .map_err(db_err(&self.target, "reading what applied batches covered"))?;
        Ok(row.get(0))
    }

    /// Where in the batch topic a batch applied before came from: `Some(None)` when that was
    /// not recorded (before this version), `None` when it was not applied.
    pub async fn applied_from(
        &mut self,
        batch_id: &str,
    ) -> Result<Option<Option<(i32, i64)>>, ApplyError> {
        let t = self.target.clone();
        let row = self
            .session
            .query_opt(
                "SELECT batch_partition, batch_offset FROM ferry.applied_batches WHERE batch_id = $1",
                &[&batch_id],
            )
            .await
            .map_err(db_err(&t, "looking a batch up"))?;
        Ok(row.map(|r| {
            let (p, o): (Option<i32>, Option<i64>) = (r.get(0), r.get(1));
            p.zip(o)
        }))
    }

    /// Applies a verified batch in one transaction with its id. Returns false when the batch
    /// had been applied before (nothing is changed then).
    pub async fn apply(
        &mut self,
        m: &Manifest,
        runs: &[Run],
        stats: &ApplyStats,
    ) -> Result<bool, ApplyError> {
        self.apply_from(m, runs, stats, None, false).await
    }

    /// [`DestDb::apply`], recording where in the batch topic the batch came from and whether
    /// the live lane shipped it (only those count for [`DestDb::covered`]).
    pub async fn apply_from(
        &mut self,
        m: &Manifest,
        runs: &[Run],
        stats: &ApplyStats,
        from: Option<(i32, i64)>,
        live: bool,
    ) -> Result<bool, ApplyError> {
        for r in runs {
            // Versions change within a transaction too: order them by (lsn, seq).
            let position = r
                .events
                .iter()
                .map(|(_, e)| (e.source.lsn, e.source.seq))
                .max()
                .unwrap_or_default();
            self.ensure_table(r.schema.table(), position).await?;
        }
        self.add_enum_labels(runs).await?;
        let t = self.target.clone();
        self.session
            .batch_execute("BEGIN")
            .await
            .map_err(db_err(&t, "BEGIN"))?;
        let result = self.apply_in_txn(m, runs, stats, from, live).await;
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
        from: Option<(i32, i64)>,
        live: bool,
    ) -> Result<bool, ApplyError> {
        let t = self.target.clone();
        let rows: usize = runs.iter().map(|r| r.events.len()).sum();
        let fresh = self
            .session
            .execute(
                "INSERT INTO ferry.applied_batches (batch_id, origin_topic, origin_partition, first_offset, last_offset, rows, batch_partition, batch_offset, live)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (batch_id) DO NOTHING",
                &[&m.batch_id, &m.origin_topic, &m.origin_partition, &m.first_offset, &m.last_offset, &(rows as i32), &from.map(|f| f.0), &from.map(|f| f.1), &live],
            )
            .await
            .map_err(db_err(&t, "recording the batch"))?;
        if fresh == 0 {
            return Ok(false);
        }
        for r in runs {
            let table = r.schema.table();
            let keyed = !table.key_indexes().is_empty();
            for (offset, e) in &r.events {
                let n = match (e.op, keyed) {
                    (Op::Truncate, _) => self.truncate(table, m, e).await?,
                    (Op::Create | Op::Update | Op::Read, true) => {
                        self.upsert(table, m, *offset, e).await?
                    }
                    (Op::Delete, true) => self.delete(table, m, *offset, e).await?,
                    (Op::Create | Op::Read, false) => self.insert_row(table, m, *offset, e).await?,
                    (Op::Update, false) => {
                        self.delete_one(table, e).await?;
                        self.insert_row(table, m, *offset, e).await?
                    }
                    (Op::Delete, false) => self.delete_one(table, e).await?,
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

    /// A row's key as tombstones record it: the text of each key column in column order (not
    /// key order), so every schema version of a table, whatever order its key was read in,
    /// names a row the same way.
    fn key_text(table: &TableSchema, image: &[ferry_schemas::Datum]) -> String {
        let mut keys = table.key_indexes();
        keys.sort_unstable();
        let parts: Vec<Option<String>> = keys
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
    ) -> Result<u64, ApplyError> {
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
            cols.push(self.col_name(&table.id, c));
            selects.push(format!("${}::text::{}", params.len(), self.col_type(c)));
        }
        // Written on insert only: an existing row keeps what it has.
        let set_cols = cols.clone();
        for (col, value, ty) in self.older_rows(table) {
            params.push(Some(value));
            cols.push(col);
            selects.push(format!("${}::text::{ty}", params.len()));
        }
        let n = params.len();
        params.push(Some(e.source.lsn.to_string()));
        params.push(Some(e.source.seq.to_string()));
        params.push(Some(m.batch_id.clone()));
        params.push(Some(m.origin_partition.to_string()));
        params.push(Some(offset.to_string()));
        params.push(Some(table.id.to_string()));
        params.push(Some(Self::key_text(table, after)));
        // The conflict target is the destination's key, so a row of a version from before a
        // key change still finds it; the version's own key when that key has a column the row
        // lacks.
        let keys: Vec<String> = match self.pkeys.get(&table.id) {
            Some(pk) if !pk.is_empty() && pk.iter().all(|k| set_cols.contains(k)) => pk.clone(),
            _ => table
                .key_indexes()
                .iter()
                .map(|&i| self.col_name(&table.id, &table.columns[i]))
                .collect(),
        };
        let set: Vec<String> = set_cols
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

    /// Inserts a row of a table without a key (no position guard: such a table's order is its
    /// single partition's, and each batch is applied once through `applied_batches`). A value
    /// TOAST left out of an update is taken from the old image, which REPLICA IDENTITY FULL
    /// sends whole.
    async fn insert_row(
        &mut self,
        table: &TableSchema,
        m: &Manifest,
        offset: i64,
        e: &ChangeEvent,
    ) -> Result<u64, ApplyError> {
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
            let mut value = &after[i];
            if matches!(value, ferry_schemas::Datum::UnchangedToast) {
                match e.before.as_ref().map(|b| &b[i]) {
                    Some(old) if !matches!(old, ferry_schemas::Datum::UnchangedToast) => {
                        value = old
                    }
                    _ => continue, // left to the column default rather than invented
                }
            }
            params.push(to_text(value, &c.ty));
            cols.push(self.col_name(&table.id, c));
            selects.push(format!("${}::text::{}", params.len(), self.col_type(c)));
        }
        for (col, value, ty) in self.older_rows(table) {
            params.push(Some(value));
            cols.push(col);
            selects.push(format!("${}::text::{ty}", params.len()));
        }
        let n = params.len();
        params.push(Some(e.source.lsn.to_string()));
        params.push(Some(e.source.seq.to_string()));
        params.push(Some(m.batch_id.clone()));
        params.push(Some(m.origin_partition.to_string()));
        params.push(Some(offset.to_string()));
        params.push(Some(table.id.to_string()));
        let sql = format!(
            "INSERT INTO {q} ({cols}{sep}_ferry_lsn, _ferry_seq, _ferry_batch, _ferry_partition, _ferry_offset)
             SELECT {selects}{sep}${l}::text::bigint, ${s}::text::bigint, ${b}, ${p}::text::int, ${o}::text::bigint
             WHERE NOT EXISTS (SELECT 1 FROM ferry.truncates WHERE tbl = ${tb}
                                 AND (lsn, seq) >= (${l}::text::bigint, ${s}::text::bigint))",
            cols = cols.join(", "),
            selects = selects.join(", "),
            sep = if cols.is_empty() { "" } else { ", " },
            l = n + 1,
            s = n + 2,
            b = n + 3,
            p = n + 4,
            o = n + 5,
            tb = n + 6,
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

    /// Deletes one row equal to the change's old image, in a table without a key. Values are
    /// compared as text, after a cast to the column's type in this session, so types without
    /// an equality operator (json, xml, point) compare too and equal values match however they
    /// were written. Without an old image (no replica identity) nothing can be matched.
    async fn delete_one(
        &mut self,
        table: &TableSchema,
        e: &ChangeEvent,
    ) -> Result<u64, ApplyError> {
        let Some(before) = &e.before else {
            tracing::warn!(table = %table.id, lsn = e.source.lsn,
                "an update or delete without its old row (the table has no replica identity); nothing matched");
            return Ok(0);
        };
        let q = format!(
            "{}.{}",
            quote_ident(&table.id.schema),
            quote_ident(&table.id.table)
        );
        let mut params: Vec<Option<String>> = Vec::new();
        let mut conds = Vec::new();
        for (i, c) in table.columns.iter().enumerate() {
            if matches!(before[i], ferry_schemas::Datum::UnchangedToast) {
                continue;
            }
            params.push(to_text(&before[i], &c.ty));
            conds.push(format!(
                "{col}::text IS NOT DISTINCT FROM (${n}::text::{ty})::text",
                col = self.col_name(&table.id, c),
                n = params.len(),
                ty = self.col_type(c)
            ));
        }
        if conds.is_empty() {
            conds.push("true".into());
        }
        let sql = format!(
            "DELETE FROM {q} WHERE ctid = (SELECT ctid FROM {q} WHERE {conds} LIMIT 1)",
            conds = conds.join(" AND ")
        );
        let st = self.statement(sql, params.len()).await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let t = self.target.clone();
        self.session
            .execute(&st, &refs)
            .await
            .map_err(db_err(&t, &format!("deleting from {q}")))
    }

    async fn delete(
        &mut self,
        table: &TableSchema,
        m: &Manifest,
        _offset: i64,
        e: &ChangeEvent,
    ) -> Result<u64, ApplyError> {
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
                self.col_name(&table.id, c),
                params.len(),
                self.col_type(c)
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
                           ON CONFLICT (tbl, key) DO UPDATE SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq, batch = EXCLUDED.batch, at = now()
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
    ) -> Result<u64, ApplyError> {
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
) -> Result<(), ApplyError> {
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
    stop: watch::Receiver<bool>,
    stats: Arc<ApplyStats>,
) -> Result<(), ApplyError> {
    Applier::start(cfg, stop, stats).await?.run().await
}

/// How often the applier prunes its bookkeeping.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What woke the applier.
enum Event {
    /// The operator asked to stop.
    Stop,
    /// A batch record.
    Batch(Incoming),
    /// Time to look for held tables an operator resumed.
    Tick,
}

/// A batch-topic record, copied out of the consumer.
struct Incoming {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    /// Shipped by the live lane (not a replay or reship).
    live: bool,
}

/// One run of the applier: a consumer of the batch topic, the destination database, and the
/// producers of the replicated and quarantine topics. See the module docs for the progress
/// rule.
struct Applier<'a> {
    cfg: &'a Config,
    stats: Arc<ApplyStats>,
    stop: watch::Receiver<bool>,
    dest: Cluster,
    producer: ferry_connectors::kafka::Producer,
    /// With `apply.exactly_once_topics`: the transactional producer of the batch in hand.
    txn: Option<ferry_connectors::kafka::Producer>,
    /// With `apply.exactly_once_topics`: a transactional producer per batch partition, its
    /// id `ferry-apply-<group>-<batch topic>-<partition>`. Whoever applies that partition next
    /// fences this one and aborts a transaction it left open at once (read_committed
    /// consumers would wait for it otherwise).
    txns: HashMap<i32, ferry_connectors::kafka::Producer>,
    /// Per origin partition (and topic incarnation), the newest origin offset an applied live
    /// batch with rows covered: a later live batch's rows at or below it are left out.
    covered: HashMap<(String, i32, u32), i64>,
    db: Option<DestDb>,
    /// Writer schemas from the destination's schema topic.
    registry: Registry,
    /// The destination's schema registry: the replicated topics carry its ids (Confluent
    /// format).
    dest_registry: Option<SchemaRegistry>,
    consumer: StreamConsumer,
    batch_topic: String,
    quarantine: String,
    /// Replicated topics known to exist.
    /// Replicated topics made sure of, with their real partition counts (an existing topic
    /// keeps its own, whatever `capture.partitions` says now).
    known_topics: HashMap<String, i32>,
    /// Batch partitions stopped on a corrupt batch (`apply.on_corrupt = stop`) or on batches
    /// retention deleted before they were applied.
    stopped: HashSet<i32>,
    /// The offset each batch partition's next record has when nothing came in between.
    next: HashMap<i32, i64>,
    /// Partitions checked for deleted batches before any record of theirs came.
    checked: HashSet<i32>,
    /// When the bookkeeping was last pruned.
    pruned: Option<std::time::Instant>,
    /// Tables held: their batches go to the held topic until an operator resumes them.
    held: HashSet<String>,
    held_topic: String,
    /// When to look for resume requests.
    tick: tokio::time::Interval,
}

impl<'a> Applier<'a> {
    /// Creates the batch and quarantine topics, connects the database and joins the group.
    async fn start(
        cfg: &'a Config,
        stop: watch::Receiver<bool>,
        stats: Arc<ApplyStats>,
    ) -> Result<Applier<'a>, ApplyError> {
        let dest = Cluster::new("destination", cfg.destination.kafka.clone());
        let batch_topic = cfg.batch_topic();
        let quarantine = cfg.quarantine_topic();
        dest.ensure_topics(&[
            TopicSpec {
                name: batch_topic.clone(),
                partitions: cfg.ship.batch_partitions,
                config: crate::topics::change_settings(cfg.topics.retention_ms),
            },
            TopicSpec {
                name: quarantine.clone(),
                partitions: 1,
                // Evidence for an operator: kept.
                config: crate::topics::kept_settings(),
            },
            TopicSpec {
                name: crate::topics::held_topic(&cfg.capture.topic_prefix),
                partitions: 1,
                // Kept until resumed, however long that takes.
                config: crate::topics::kept_settings(),
            },
        ])
        .await?;
        let producer = dest.producer(5)?;
        let mut db = match (&cfg.destination.postgres, cfg.apply.postgres) {
            (Some(pg), true) => Some(DestDb::connect(pg).await?),
            _ => None,
        };
        let held = match db.as_mut() {
            Some(db) => db.held().await?,
            None => HashSet::new(),
        };
        for table in &held {
            tracing::warn!(table, "table held: its batches wait in the held topic (`ferry resume-table {table}` once the cause is fixed)");
            if let Ok(mut h) = stats.held.lock() {
                h.insert(table.clone());
            }
        }
        let mut cc = dest.client_config();
        cc.set("group.id", &cfg.apply.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        if !cfg.apply.instance_id.is_empty() {
            cc.set("group.instance.id", &cfg.apply.instance_id);
        }
        let consumer: StreamConsumer = cc.create().map_err(client_err("creating the consumer"))?;
        consumer
            .subscribe(&[&batch_topic])
            .map_err(client_err(format!("subscribing to {batch_topic}")))?;
        tracing::info!(
            group = cfg.apply.group_id,
            batch_topic,
            database = db.is_some(),
            topics = cfg.apply.topics,
            "applying"
        );
        Ok(Applier {
            cfg,
            stats,
            stop,
            registry: Registry::new(dest.clone(), &cfg.capture.topic_prefix),
            dest_registry: cfg.destination_registry()?,
            dest,
            producer,
            txn: None,
            txns: HashMap::new(),
            covered: HashMap::new(),
            db,
            consumer,
            batch_topic,
            quarantine,
            known_topics: HashMap::new(),
            stopped: HashSet::new(),
            next: HashMap::new(),
            checked: HashSet::new(),
            pruned: None,
            held,
            held_topic: crate::topics::held_topic(&cfg.capture.topic_prefix),
            tick: tokio::time::interval(Duration::from_secs(2)),
        })
    }

    /// The loop: one batch at a time, its offset committed once it is applied (or
    /// quarantined).
    async fn run(mut self) -> Result<(), ApplyError> {
        loop {
            match self.next_event().await? {
                Event::Stop => break,
                Event::Batch(b) if self.stopped.contains(&b.partition) => {}
                Event::Batch(b) => {
                    // The first record of a partition, or one after a jump (a restart, a
                    // rebalance, a reset past deleted records): nothing may be missing before it.
                    if self.next.get(&b.partition) != Some(&b.offset)
                        && self.batches_lost(b.partition).await?
                    {
                        continue;
                    }
                    self.next.insert(b.partition, b.offset + 1);
                    if self.on_batch(&b).await? {
                        self.commit(b.partition, b.offset)?;
                    }
                }
                Event::Tick => self.on_tick().await?,
            }
        }
        Ok(())
    }

    async fn next_event(&mut self) -> Result<Event, ApplyError> {
        tokio::select! {
            _ = self.stop.changed() => Ok(Event::Stop),
            _ = self.tick.tick() => Ok(Event::Tick),
            m = self.consumer.recv() => {
                let m = m.map_err(client_err("consuming"))?;
                let lane = {
                    use rdkafka::message::Headers as _;
                    m.headers()
                        .and_then(|h| h.iter().find(|h| h.key == crate::ship::LANE_HEADER))
                        .and_then(|h| h.value)
                };
                let live = crate::ship::Lane::named(lane) == crate::ship::Lane::Live;
                Ok(Event::Batch(Incoming {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().unwrap_or_default().to_vec(),
                    live,
                }))
            }
        }
    }

    /// Verifies a batch and applies it, or quarantines it; false when its partition stopped
    /// instead (its offset is not committed).
    async fn on_batch(&mut self, b: &Incoming) -> Result<bool, ApplyError> {
        // A schema the schema topic lacks proves nothing against the batch (the shipper
        // publishes every schema before the batch that uses it): its partition stops there,
        // nothing quarantined, nothing committed.
        if let Some((batch, fp)) = self.missing_schema(&b.value)? {
            self.stopped.insert(b.partition);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.batch_topic, b.partition);
            let _ = self.consumer.pause(&tpl);
            self.stats
                .schema_missing(&self.batch_topic, b.partition, b.offset, &batch, &fp);
            return Ok(false);
        }
        match self.check(&b.value)? {
            Ok((m, runs)) => {
                self.on_verified(b, &m, &runs).await?;
                Ok(true)
            }
            Err(Rejected(reason)) => self.on_corrupt(b, &reason).await,
        }
    }

    /// The first schema a batch record names that the destination schema topic lacks, even
    /// after reading it again, with the batch id; `None` for a record that does not unframe
    /// (verification then rejects it).
    fn missing_schema(&mut self, value: &[u8]) -> Result<Option<(String, String)>, ApplyError> {
        let Ok((m, _)) = manifest::unframe(value) else {
            return Ok(None);
        };
        for fp in &m.schema_fingerprints {
            if tokio::task::block_in_place(|| self.registry.get(fp))?.is_none() {
                return Ok(Some((m.batch_id.clone(), fp.clone())));
            }
        }
        Ok(None)
    }

    /// Verifies a batch record, loading the schemas it names first (a miss re-reads the
    /// schema topic). The outer error is a schema topic that could not be read: that proves
    /// nothing about the batch, so it is retried rather than quarantined.
    fn check(
        &mut self,
        value: &[u8],
    ) -> Result<Result<(Manifest, Vec<Run>), Rejected>, ApplyError> {
        if let Ok((m, _)) = manifest::unframe(value) {
            for fp in &m.schema_fingerprints {
                tokio::task::block_in_place(|| self.registry.get(fp))?;
            }
        }
        Ok(verify(value, |fp| self.registry.cached(fp)))
    }

    /// A verified batch: replicated topics first, then the database in one transaction with
    /// the batch id. A batch the database has is in the replicated topics too (they are
    /// written first): a re-delivered copy goes to neither.
    async fn on_verified(
        &mut self,
        b: &Incoming,
        m: &Manifest,
        runs: &[Run],
    ) -> Result<(), ApplyError> {
        if self.held.contains(&m.table) {
            // Behind a batch the destination refused: kept, in order, for the resume.
            self.send_held(b, &m.table, "held behind an earlier batch of the table")
                .await?;
            if let Some(db) = self.db.as_mut() {
                db.held_one_more(&m.table).await?;
            }
            return Ok(());
        }
        let from = (b.partition, b.offset);
        let before = match self.db.as_mut() {
            Some(db) => db.applied_from(&m.batch_id).await?,
            None => None,
        };
        // In a transaction, a batch the database has from this very record is delivered again
        // because the transaction that replicated it did not commit: replicate it again. Any
        // other copy (a replay, a reship) goes to neither.
        let replicate = self.cfg.apply.topics
            && match before {
                None => true,
                Some(at) => self.txn.is_some() && at == Some(from),
            };
        // A live batch overlapping one applied before (a stalled shipper's late batch beside
        // its successor's): what the earlier one covered is left out, so nothing older comes
        // after something newer, in the database or the replicated topics.
        let origin = (
            m.origin_topic.clone(),
            m.origin_partition,
            crate::ship::incarnation_of(&m.batch_id),
        );
        let trimmed = if b.live && before.is_none() {
            self.trim(&origin, m, runs).await?
        } else {
            None
        };
        let runs = trimmed.as_deref().unwrap_or(runs);
        self.txn = if self.cfg.apply.topics && self.cfg.apply.exactly_once_topics {
            Some(self.transactional(b.partition).await?)
        } else {
            None
        };
        if let Some(txn) = &self.txn {
            use rdkafka::producer::Producer as _;
            if let Err(e) = txn.begin_transaction() {
                self.txns.remove(&b.partition);
                return Err(client_err("beginning a transaction")(e));
            }
        }
        let replicated = if replicate {
            self.replicate(runs).await
        } else {
            Ok(())
        };
        if let Err(e) = replicated {
            // Best effort: a transaction left open would hold read_committed consumers back
            // until the broker times it out.
            let _ = self.abort_transaction().await;
            return Err(e);
        }
        crate::runtime::failpoint::hit(crate::runtime::failpoint::APPLY_AFTER_REPLICATE);
        let applied = match self.db.as_mut() {
            Some(db) if before.is_none() => {
                db.apply_from(m, runs, &self.stats, Some(from), b.live)
                    .await
            }
            Some(_) => Ok(false),
            None => Ok(true),
        };
        let applied = match applied {
            Err(e) if e.is_table_fault() => {
                self.abort_transaction().await?;
                return self.hold_table(b, m, &e).await;
            }
            Err(e) => {
                let _ = self.abort_transaction().await;
                return Err(e);
            }
            Ok(a) => a,
        };
        if let Err(e) = self.commit_transaction(b).await {
            let _ = self.abort_transaction().await;
            self.txns.remove(&b.partition);
            return Err(e);
        }
        if applied {
            self.stats.applied(&m.batch_id, m.events_out);
            if b.live && m.events_out > 0 {
                let c = self.covered.entry(origin).or_insert(m.last_offset);
                *c = (*c).max(m.last_offset);
            }
        } else {
            self.stats.duplicate(&m.batch_id);
        }
        Ok(())
    }

    /// `runs` without the rows at or below the newest origin offset an applied live batch of
    /// the partition covered; `None` when nothing is left out.
    async fn trim(
        &mut self,
        origin: &(String, i32, u32),
        m: &Manifest,
        runs: &[Run],
    ) -> Result<Option<Vec<Run>>, ApplyError> {
        let covered = match self.covered.get(origin) {
            Some(c) => Some(*c),
            None => {
                let c = match self.db.as_mut() {
                    Some(db) => db.covered(origin).await?,
                    None => None,
                };
                if let Some(c) = c {
                    self.covered.insert(origin.clone(), c);
                }
                c
            }
        };
        let Some(covered) = covered.filter(|c| m.first_offset <= *c) else {
            return Ok(None);
        };
        let mut left_out = 0usize;
        let trimmed: Vec<Run> = runs
            .iter()
            .map(|r| {
                let events: Vec<_> = r
                    .events
                    .iter()
                    .filter(|(offset, _)| *offset > covered)
                    .cloned()
                    .collect();
                left_out += r.events.len() - events.len();
                Run {
                    schema: r.schema.clone(),
                    events,
                }
            })
            .filter(|r| !r.events.is_empty())
            .collect();
        self.stats
            .rows_trimmed_total
            .fetch_add(left_out as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            batch = m.batch_id,
            covered,
            rows_left_out = left_out,
            "a live batch overlaps origin offsets an applied one covered (a stalled shipper's late \
             batch): those rows are left out"
        );
        Ok(Some(trimmed))
    }

    /// The destination refused a batch of one table (a constraint, a value out of range, a
    /// type it lacks): that table is held. The batch and every later one of the table go to
    /// the held topic, in order, and their offsets are committed; every other table goes on.
    /// `ferry resume-table` re-applies them, in order, once the cause is fixed.
    async fn hold_table(
        &mut self,
        b: &Incoming,
        m: &Manifest,
        e: &ApplyError,
    ) -> Result<(), ApplyError> {
        let reason = crate::error::causes(e);
        self.send_held(b, &m.table, &reason).await?;
        if let Some(db) = self.db.as_mut() {
            db.hold(&m.table, &m.batch_id, &reason).await?;
        }
        self.held.insert(m.table.clone());
        self.stats.table_held(&m.table, &m.batch_id, &reason);
        Ok(())
    }

    /// Appends a batch record to the held topic, keyed by its table.
    async fn send_held(&self, b: &Incoming, table: &str, reason: &str) -> Result<(), ApplyError> {
        let source = format!("{}/{}/{}", self.batch_topic, b.partition, b.offset);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ferry.reason",
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: "ferry.source",
                value: Some(source.as_bytes()),
            });
        self.producer
            .send(
                FutureRecord::to(&self.held_topic)
                    .key(table)
                    .payload(&b.value)
                    .headers(headers),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| client_err(format!("holding a batch of {table}"))(e))?;
        Ok(())
    }

    /// Resumes the held tables an operator asked for.
    async fn on_tick(&mut self) -> Result<(), ApplyError> {
        // A partition that delivers nothing (everything after the group's offset deleted) is
        // checked once it is assigned, not only when its next batch comes.
        let assigned: Vec<i32> = self
            .consumer
            .assignment()
            .map_err(client_err("reading the assignment"))?
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        for p in assigned {
            if !self.next.contains_key(&p) && !self.stopped.contains(&p) && self.checked.insert(p) {
                self.batches_lost(p).await?;
            }
        }
        let Some(db) = self.db.as_mut() else {
            return Ok(());
        };
        if let Some(horizon) = self.cfg.bookkeeping_horizon() {
            if self.pruned.is_none_or(|at| at.elapsed() > PRUNE_EVERY) {
                self.pruned = Some(std::time::Instant::now());
                let (batches, tombstones) = db.prune(horizon).await?;
                if batches + tombstones > 0 {
                    tracing::info!(
                        batches,
                        tombstones,
                        horizon_days = horizon.as_secs() / 86_400,
                        "bookkeeping older than the horizon pruned"
                    );
                }
            }
        }
        for table in db.resume_requests().await? {
            self.resume(&table).await?;
        }
        Ok(())
    }

    /// Re-applies a held table's batches from the held topic, in order (those applied before
    /// are skipped by batch id), then lets its new batches through. A batch refused again holds
    /// the table again, with the new reason.
    async fn resume(&mut self, table: &str) -> Result<(), ApplyError> {
        let tp = TopicPartition::new(&self.held_topic, 0);
        let wanted = table.as_bytes().to_vec();
        let (records, _) = self
            .dest
            .fold_partition(&tp, Span::ALL, Vec::new(), move |out, r| {
                if r.key.as_deref() == Some(wanted.as_slice()) {
                    out.push((r.offset, r.value.unwrap_or_default()));
                }
                true
            })
            .await?;
        tracing::info!(table, batches = records.len(), "resuming a held table");
        let mut applied = 0usize;
        for (offset, value) in records {
            if let Some((batch, fp)) = self.missing_schema(&value)? {
                // Never skipped: the table stays held, for the next resume request.
                tracing::error!(
                    table,
                    batch,
                    offset,
                    schema = fp,
                    "a held batch names a schema the destination schema topic lacks; the table \
                     stays held (restore the schema, then `ferry resume-table` again)"
                );
                return Ok(());
            }
            let (m, runs) = match self.check(&value)? {
                Ok(v) => v,
                Err(Rejected(reason)) => {
                    tracing::error!(
                        table,
                        offset,
                        reason,
                        "a held batch does not verify; skipped (it was verified when it was held)"
                    );
                    continue;
                }
            };
            let Some(db) = self.db.as_mut() else {
                return Ok(());
            };
            match db.apply(&m, &runs, &self.stats).await {
                Ok(fresh) => applied += usize::from(fresh),
                Err(e) if e.is_table_fault() => {
                    let reason = crate::error::causes(&e);
                    db.hold(table, &m.batch_id, &reason).await?;
                    self.stats.table_held(table, &m.batch_id, &reason);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(db) = self.db.as_mut() {
            db.release(table).await?;
        }
        self.held.remove(table);
        self.stats.table_resumed(table, applied);
        Ok(())
    }

    /// A batch that failed verification goes to the quarantine topic, nothing of it applied.
    /// A verified re-shipped copy later in the partition supersedes it; otherwise, with
    /// `apply.on_corrupt = stop`, the partition stops there (false: do not commit).
    async fn on_corrupt(&mut self, b: &Incoming, reason: &str) -> Result<bool, ApplyError> {
        let (topic, partition, offset) = (self.batch_topic.clone(), b.partition, b.offset);
        let topic = topic.as_str();
        self.stats.quarantined(topic, partition, offset, reason);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ferry.reason",
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: "ferry.source",
                value: Some(format!("{topic}/{partition}/{offset}").as_bytes()),
            });
        let key = b.key.clone().unwrap_or_default();
        self.producer
            .send(
                FutureRecord::to(&self.quarantine)
                    .key(&key)
                    .payload(&b.value)
                    .headers(headers),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| client_err("quarantining")(e))?;
        let copies = same_key_after(&self.dest, topic, partition, offset, b.key.as_deref()).await?;
        let mut superseded = None;
        for (at, copy) in copies {
            if self.check(&copy)?.is_ok() {
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
            return Ok(true);
        }
        if self.cfg.apply.on_corrupt != OnCorrupt::Stop {
            return Ok(true);
        }
        self.stopped.insert(partition);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let _ = self.consumer.pause(&tpl);
        self.stats
            .partition_stopped(topic, partition, offset, reason);
        Ok(false)
    }

    /// Whether batches of `partition` were deleted (by retention) before they were applied:
    /// the group's committed offset lies below the partition's first offset. That partition
    /// stops there, loudly; the others go on.
    async fn batches_lost(&mut self, partition: i32) -> Result<bool, ApplyError> {
        let Some(gap) = batch_gap(
            &self.dest,
            &self.cfg.apply.group_id,
            &self.batch_topic,
            partition,
        )
        .await?
        else {
            return Ok(false);
        };
        self.stopped.insert(partition);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.batch_topic, partition);
        let _ = self.consumer.pause(&tpl);
        self.stats.batches_lost(&self.batch_topic, partition, gap);
        Ok(true)
    }

    /// The transactional producer of batch partition `partition`, created (and its id's
    /// earlier transactions fenced) on first use.
    async fn transactional(
        &mut self,
        partition: i32,
    ) -> Result<ferry_connectors::kafka::Producer, ApplyError> {
        if let Some(p) = self.txns.get(&partition) {
            return Ok(p.clone());
        }
        let id = format!(
            "ferry-apply-{}-{}-{partition}",
            self.cfg.apply.group_id, self.batch_topic
        );
        let d = self.dest.clone();
        let p = tokio::task::spawn_blocking(move || d.transactional_producer(5, &id))
            .await
            .map_err(|e| ApplyError::Permanent(e.to_string()))??;
        self.txns.insert(partition, p.clone());
        Ok(p)
    }

    /// Commits the open transaction (if any) with the batch record's offset: its replicated
    /// records and its progress become visible together.
    async fn commit_transaction(&self, b: &Incoming) -> Result<(), ApplyError> {
        let Some(txn) = &self.txn else {
            return Ok(());
        };
        use rdkafka::producer::Producer as _;
        let group = self
            .consumer
            .group_metadata()
            .ok_or_else(|| ApplyError::Permanent("the applier's consumer has no group".into()))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.batch_topic, b.partition, Offset::Offset(b.offset + 1))
            .map_err(client_err("committing"))?;
        tokio::task::block_in_place(|| {
            txn.send_offsets_to_transaction(&tpl, &group, Duration::from_secs(60))
                .and_then(|()| txn.commit_transaction(Duration::from_secs(60)))
        })
        .map_err(client_err(format!(
            "committing the transaction of batch-topic offset {}[{}]@{}",
            self.batch_topic, b.partition, b.offset
        )))
    }

    /// Aborts the open transaction (if any): nothing of it becomes visible.
    async fn abort_transaction(&self) -> Result<(), ApplyError> {
        let Some(txn) = &self.txn else {
            return Ok(());
        };
        use rdkafka::producer::Producer as _;
        tokio::task::block_in_place(|| txn.abort_transaction(Duration::from_secs(60)))
            .map_err(client_err("aborting a transaction"))
    }

    fn commit(&self, partition: i32, offset: i64) -> Result<(), ApplyError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.batch_topic, partition, Offset::Offset(offset + 1))
            .map_err(client_err("committing"))?;
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(client_err("committing"))
    }

    /// Writes a batch's changes to the replicated per-table topics, in the origin's format:
    /// with a destination registry, the Confluent wire format with its ids.
    async fn replicate(&mut self, runs: &[Run]) -> Result<(), ApplyError> {
        let cfg = self.cfg;
        let mut pending = Vec::new();
        for r in runs {
            let topic = crate::topics::table_topic(&cfg.capture.topic_prefix, &r.schema.table().id);
            let partitions = match self.known_topics.get(&topic) {
                Some(p) => *p,
                None => {
                    self.dest
                        .ensure_topics(&[TopicSpec {
                            name: topic.clone(),
                            partitions: cfg.capture.partitions,
                            config: crate::topics::change_settings(cfg.topics.retention_ms),
                        }])
                        .await?;
                    let (dest, t) = (self.dest.clone(), topic.clone());
                    let real = tokio::task::spawn_blocking(move || {
                        dest.partition_count(&t, Duration::from_secs(15))
                    })
                    .await
                    .map_err(|e| ApplyError::Permanent(e.to_string()))??;
                    let p = if real > 0 {
                        real
                    } else {
                        cfg.capture.partitions
                    };
                    self.known_topics.insert(topic.clone(), p);
                    p
                }
            };
            let headers = match &self.dest_registry {
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
                    .map_err(|err| {
                        ApplyError::Permanent(format!("encoding a row for {topic}: {err}"))
                    })?;
                for p in crate::record::targets(e.op, partitions, r.schema.has_key()) {
                    let mut rec = FutureRecord::to(&topic).payload(&value);
                    if keyed {
                        rec = rec.key(&key);
                    }
                    if let Some(p) = p {
                        rec = rec.partition(p);
                    }
                    let d = ferry_connectors::kafka::enqueue(
                        self.txn.as_ref().unwrap_or(&self.producer),
                        rec,
                    )
                    .await
                    .map_err(client_err(format!("replicating to {topic}")))?;
                    pending.push(d);
                }
            }
        }
        for d in pending {
            d.await
                .map_err(|_| client_err("replicating")(rdkafka::error::KafkaError::Canceled))?
                .map_err(|(err, _)| client_err("replicating")(err))?;
        }
        Ok(())
    }
}

/// Asks the applier to resume a held table (`ferry resume-table`); returns the batches held
/// and why, or `None` when the table is not held.
pub async fn request_resume(
    pg: &PgConfig,
    table: &TableId,
) -> Result<Option<(i32, String)>, ApplyError> {
    let target = pg.display();
    let s = pg.connect().await.map_err(db_err(&target, "connecting"))?;
    let row = s
        .query_opt(
            "UPDATE ferry.held_tables SET resume_requested = now() WHERE tbl = $1
             RETURNING batches, reason",
            &[&table.to_string()],
        )
        .await
        .map_err(db_err(&target, "requesting a resume"))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The batch offsets of `partition` retention deleted before apply group `group` applied them
/// (its committed offset, 0 without one, lies below the partition's first offset).
async fn batch_gap(
    dest: &Cluster,
    group: &str,
    batch_topic: &str,
    partition: i32,
) -> Result<Option<(i64, i64)>, ApplyError> {
    let tp = TopicPartition::new(batch_topic, partition);
    let (d, g, t) = (dest.clone(), group.to_string(), tp.clone());
    let committed = tokio::task::spawn_blocking(move || d.committed_offset(&g, &t))
        .await
        .map_err(|e| ApplyError::Permanent(e.to_string()))??
        .unwrap_or(0);
    let (low, _) = dest.watermarks(&tp)?.unwrap_or_default();
    Ok((committed < low).then_some((committed, low - 1)))
}

/// The batch offsets, per partition of the batch topic, that retention deleted before `ferry
/// apply` applied them. With `accept` (apply stopped: the broker refuses a commit while the
/// group has members), the apply group's offset moves past each, so apply goes on after it.
pub async fn batch_gaps(cfg: &Config, accept: bool) -> Result<Vec<(i32, i64, i64)>, ApplyError> {
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let topic = cfg.batch_topic();
    let partitions = {
        let (d, t) = (dest.clone(), topic.clone());
        tokio::task::spawn_blocking(move || d.partition_count(&t, Duration::from_secs(15)))
            .await
            .map_err(|e| ApplyError::Permanent(e.to_string()))??
    };
    let group = &cfg.apply.group_id;
    let mut out = Vec::new();
    for p in 0..partitions {
        let Some((first, last)) = batch_gap(&dest, group, &topic, p).await? else {
            continue;
        };
        if accept {
            let (d, g, tp) = (dest.clone(), group.clone(), TopicPartition::new(&topic, p));
            tokio::task::spawn_blocking(move || d.commit_offset(&g, &tp, last + 1))
                .await
                .map_err(|e| ApplyError::Permanent(e.to_string()))?
                .map_err(|e| {
                    ApplyError::Permanent(format!(
                        "{e} (stop every `ferry apply` of group {group} first: the broker \
                         refuses a commit from outside a group that has members)"
                    ))
                })?;
        }
        out.push((p, first, last));
    }
    Ok(out)
}

/// The held tables: (table, batches held, reason, held since).
pub async fn held_tables(pg: &PgConfig) -> Result<Vec<(String, i32, String, String)>, ApplyError> {
    let target = pg.display();
    let s = pg.connect().await.map_err(db_err(&target, "connecting"))?;
    let rows = s
        .query(
            "SELECT tbl, batches, reason, since::text FROM ferry.held_tables
             WHERE to_regclass('ferry.held_tables') IS NOT NULL ORDER BY 1",
            &[],
        )
        .await;
    match rows {
        Ok(rows) => Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()),
        // Nothing applied here yet: no bookkeeping tables, nothing held.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            Ok(Vec::new())
        }
        Err(e) => Err(db_err(&target, "reading held tables")(e)),
    }
}

/// Answers which batch, origin partition/offset and source position last wrote a row (or
/// deleted it), from the lineage columns and tombstones Ferry keeps in the destination.
pub async fn lineage(pg: &PgConfig, table: &TableId, key: &str) -> Result<String, ApplyError> {
    let target = pg.display();
    let s = pg.connect().await.map_err(db_err(&target, "connecting"))?;
    // The key in index order (how the user gives it), with each column's number.
    let (keys, numbers): (Vec<String>, Vec<i16>) = s
        .query(
            "SELECT a.attname::text, a.attnum FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.table))],
        )
        .await
        .map_err(db_err(&target, "reading the key"))?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i16>(1)))
        .unzip();
    if keys.is_empty() {
        return Err(ApplyError::Permanent(format!(
            "{table} does not exist in the destination (or has no key)"
        )));
    }
    let values: Vec<&str> = key.split(',').map(str::trim).collect();
    if values.len() != keys.len() {
        return Err(ApplyError::Permanent(format!(
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
    // Tombstones name a row by its key columns in column order.
    let mut by_column: Vec<(i16, &str)> = numbers
        .iter()
        .copied()
        .zip(values.iter().copied())
        .collect();
    by_column.sort_unstable();
    let key_json = serde_json::to_string(
        &by_column
            .iter()
            .map(|(_, v)| Some(v.to_string()))
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
/// copies (`ferry reship` produces them). A read that fails is an error (retried), never "no
/// copy".
async fn same_key_after(
    dest: &Cluster,
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
) -> Result<Vec<(i64, Vec<u8>)>, KafkaError> {
    let Some(key) = key.map(<[u8]>::to_vec) else {
        return Ok(Vec::new());
    };
    let tp = TopicPartition::new(topic, partition);
    let (copies, _) = dest
        .fold_partition(&tp, Span::from(offset + 1), Vec::new(), move |out, r| {
            if r.key.as_deref() == Some(key.as_slice()) {
                out.push((r.offset, r.value.unwrap_or_default()));
            }
            true
        })
        .await?;
    Ok(copies)
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
            type_mod: -1,
            missing: None,
            attnum: None,
            ty,
            key,
            key_order: 0,
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
            kind: ManifestKind::Changes.to_string(),
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
            .map_err(|Rejected(reason)| reason)
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
