//! Snapshots that never lock the source or hold a long transaction: tables are read in
//! key-ordered chunks that interleave with the live change stream (the DBLog idea, with
//! Postgres visibility made exact).
//!
//! ```text
//!  capture loop (stream paused at P)            source database
//!  ─────────────────────────────────            ───────────────
//!  BEGIN REPEATABLE READ; pg_current_snapshot() ─▶ S = (xmin, xmax, in-progress xids)
//!  SELECT … WHERE key > last ORDER BY key LIMIT n ▶ rows as of S
//!  COMMIT; emit high watermark ─────────────────▶ pg_logical_emit_message('ferry.watermark', …)
//!
//!  stream:  … P … txns (keys of txns S cannot see are noted) … [high] → remaining rows as op=r …
//! ```
//!
//! Every transaction streamed after P and before the high watermark is either visible to S
//! (the chunk already reflects it) or not (xid ≥ xmax or in progress at S): its keys are dropped
//! from the chunk, because its streamed change is newer than what the read saw. The remaining
//! rows are emitted at the watermark's stream position, so for every key the output follows the
//! database's order and no stale chunk row can overwrite a newer change. A transaction whose
//! commit was already streamed before P is normally visible to S; in the microseconds between
//! its commit record and its visibility it would not be, so a snapshot that still lists a
//! recently streamed xid as in progress is discarded and taken again. A table without a key
//! is read in one chunk (rows move between `ctid` ranges when updated, so key-less chunks could
//! overlap), and since its rows cannot be upserted, each change is carried exactly once: until
//! its chunk is read, and while the read could see them, the table's streamed changes are
//! absorbed (not sent: the chunk holds their effect); a streamed update or delete the read
//! could not see drops one chunk row equal to its old image. Its rows are held in memory
//! until the chunk's watermark.
//!
//! Progress: a chunk's position is recorded (in [`crate::store::state`]) only once the rows emitted at
//! its watermark are acknowledged; after a crash the same chunk is read again (duplicates from
//! the unacknowledged tail only). Watermarks from earlier runs are ignored by id.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use ferry_connectors::postgres::changes::text_datum;
use ferry_connectors::postgres::{catalog, quote_ident, quote_literal};
use ferry_schemas::{ChangeEvent, Datum, EncodedSchema, Op, Source, TableId};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::error::{pg, CaptureError};
use crate::store::state::{CaptureState, TableProgress};

struct Chunk {
    id: String,
    /// Keys a repair asked for (`None` for a table snapshot chunk).
    repair: Option<Vec<Vec<String>>>,
    /// The backfill job this chunk belongs to.
    backfill: Option<String>,
    schema: Arc<EncodedSchema>,
    rows: Vec<(Vec<u8>, Vec<Datum>)>,
    /// The key columns the rows are read in the order of (empty without a key), and the last
    /// row's value of each.
    order: Vec<String>,
    last: Option<Vec<String>>,
    complete: bool,
    visibility: Visibility,
    seen: HashSet<Vec<u8>>,
    /// Tables without a key: row images the stream already accounts for, with how many
    /// chunk rows equal to each must be dropped (see [`Snapshotter::observe`]).
    drop_images: std::collections::HashMap<String, usize>,
    truncated: bool,
}

/// Whether a change's new row lacks a TOASTed value the source did not send.
pub fn leaves_toast_out(event: &ChangeEvent) -> bool {
    event
        .after
        .as_ref()
        .is_some_and(|a| a.iter().any(|d| matches!(d, Datum::UnchangedToast)))
}

/// A row's key as the text of each key column (how repairs name rows).
pub fn key_texts(schema: &EncodedSchema, image: &[Datum]) -> Option<Vec<String>> {
    let cols = &schema.table().columns;
    schema
        .table()
        .key_indexes()
        .iter()
        .map(|&i| ferry_connectors::postgres::pgtext::to_text(image.get(i)?, &cols[i].ty))
        .collect()
}

/// A row image as the keyless de-duplication compares it: every value, in column order.
fn image_text(row: &[Datum]) -> String {
    format!("{row:?}")
}

/// Which transactions a read's snapshot could see (32-bit xids, as the stream reports them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visibility {
    xmax: u32,
    in_progress: HashSet<u32>,
}

impl Visibility {
    /// Parses `pg_current_snapshot()`'s text form `xmin:xmax:xip,xip,…` (64-bit xids).
    pub fn parse(text: &str) -> Option<Visibility> {
        let mut parts = text.split(':');
        let _xmin: u64 = parts.next()?.parse().ok()?;
        let xmax: u64 = parts.next()?.parse().ok()?;
        let xip = parts.next()?;
        let in_progress = xip
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse::<u64>().ok().map(|v| v as u32))
            .collect::<Option<HashSet<u32>>>()?;
        Some(Visibility {
            xmax: xmax as u32,
            in_progress,
        })
    }

    /// Whether the snapshot saw transaction `xid`'s effects (xid comparison is modular).
    pub fn sees(&self, xid: u32) -> bool {
        (xid.wrapping_sub(self.xmax) as i32) < 0 && !self.in_progress.contains(&xid)
    }
}

/// A chunk whose high watermark arrived: the rows to emit and the progress they make.
pub struct ChunkDone {
    /// The schema version the rows are encoded with.
    pub schema: Arc<EncodedSchema>,
    /// Snapshot events (op = r) to emit now.
    pub events: Vec<ChangeEvent>,
    /// The table.
    pub table: TableId,
    /// The backfill job the rows belong to (`None`: a table snapshot or a repair).
    pub backfill: Option<String>,
    /// Its progress once these are acknowledged (`None` for a repair, which is no progress).
    pub progress: Option<TableProgress>,
}

/// What [`Snapshotter::start_chunk`] did.
pub enum ChunkStart {
    /// Nothing was due.
    Nothing,
    /// A chunk was read, with this schema version (register it before its rows are sent).
    Started(Arc<EncodedSchema>),
    /// A value in the chunk cannot be read: the table must be stopped.
    Unreadable {
        /// The table.
        table: TableId,
        /// Which row and column, and why.
        reason: String,
    },
}

/// Runs snapshots one chunk at a time. See the module docs.
pub struct Snapshotter {
    slot: String,
    region: String,
    database: String,
    chunk_rows: usize,
    queue: VecDeque<TableId>,
    repairs: VecDeque<(TableId, Vec<Vec<String>>)>,
    backfills: VecDeque<String>,
    blocked: HashSet<String>,
    /// Tables capture stopped: nothing of theirs is read until they are resumed.
    stopped: HashSet<TableId>,
    chunk: Option<Chunk>,
    run_id: u64,
    seq: u64,
    target: String,
    /// Bytes a chunk may hold (its rows' text), besides its row count.
    chunk_bytes: usize,
    /// The publication whose column lists and row filters chunks honour.
    publication: String,
    /// Per table, the mean text bytes of a row in its last chunk.
    row_bytes: std::collections::HashMap<TableId, usize>,
}

/// Rows the first chunk of a table reads, to learn how large its rows are.
const PROBE_ROWS: usize = 100;

impl Snapshotter {
    /// A snapshotter for one capture pipeline: chunks of at most `chunk_rows` rows and about
    /// `chunk_bytes` bytes.
    pub fn new(
        (slot, publication): (&str, &str),
        region: &str,
        database: &str,
        (chunk_rows, chunk_bytes): (usize, usize),
        target: &str,
    ) -> Self {
        Snapshotter {
            publication: publication.into(),
            slot: slot.into(),
            region: region.into(),
            database: database.into(),
            chunk_rows,
            chunk_bytes: chunk_bytes.max(1),
            row_bytes: std::collections::HashMap::new(),
            queue: VecDeque::new(),
            repairs: VecDeque::new(),
            backfills: VecDeque::new(),
            blocked: HashSet::new(),
            stopped: HashSet::new(),
            chunk: None,
            run_id: rand::random(),
            seq: 0,
            target: target.into(),
        }
    }

    /// Adds a table to snapshot (once).
    pub fn enqueue(&mut self, table: TableId) {
        let busy = self
            .chunk
            .as_ref()
            .is_some_and(|c| c.schema.table().id == table);
        if !busy && !self.queue.contains(&table) {
            self.queue.push_back(table);
        }
    }

    /// Asks for specific rows to be read again (by key, as the text of each key column), e.g.
    /// ranges `ferry verify` found different. A requested key the read does not find is emitted
    /// as a delete.
    pub fn enqueue_repair(&mut self, table: TableId, keys: Vec<Vec<String>>) {
        for part in keys.chunks(self.chunk_rows.max(1)) {
            self.repairs.push_back((table.clone(), part.to_vec()));
        }
    }

    /// Queues a backfill job (its definition and progress live in the capture state).
    pub fn enqueue_backfill(&mut self, job: String) {
        if !self.backfills.contains(&job) {
            self.backfills.push_back(job);
        }
    }

    /// Blocks (paused or cancelled) or unblocks a backfill job: a blocked job reads nothing.
    pub fn set_backfill_blocked(&mut self, job: &str, blocked: bool) {
        if blocked {
            self.blocked.insert(job.to_string());
        } else {
            self.blocked.remove(job);
        }
    }

    /// Stops or resumes reading a table (snapshot, repairs; its backfill jobs are blocked by
    /// the caller). Stopping abandons its chunk in flight, to be read again on resume.
    pub fn set_table_stopped(&mut self, table: &TableId, stopped: bool) {
        if !stopped {
            self.stopped.remove(table);
            return;
        }
        self.stopped.insert(table.clone());
        if self
            .chunk
            .as_ref()
            .is_some_and(|c| &c.schema.table().id == table)
        {
            if let Some(c) = self.chunk.take() {
                if let Some(keys) = c.repair {
                    self.repairs.push_front((table.clone(), keys));
                }
                tracing::info!(table = %table, "chunk in flight abandoned; it is read again on resume");
            }
        }
    }

    /// The next table to snapshot that is not stopped.
    fn next_table(&self) -> Option<&TableId> {
        self.queue.iter().find(|t| !self.stopped.contains(*t))
    }

    /// Where the next repair that is not for a stopped table waits.
    fn next_repair(&self) -> Option<usize> {
        self.repairs
            .iter()
            .position(|(t, _)| !self.stopped.contains(t))
    }

    /// Orders queued backfill jobs by `rank` (their tier), keeping request order within one.
    pub fn order_backfills(&mut self, rank: impl Fn(&str) -> u32) {
        self.backfills
            .make_contiguous()
            .sort_by_key(|j| rank(j.as_str()));
    }

    fn next_backfill(&self) -> Option<&String> {
        self.backfills.iter().find(|j| !self.blocked.contains(*j))
    }

    /// Whether a backfill job is waiting for its next chunk.
    pub fn has_backfill(&self) -> bool {
        self.next_backfill().is_some()
    }

    /// Rows the next backfill chunk will read at most: its job's chunk size, but no more than
    /// `cap` (the throttle's pacing: at a low rate, smaller chunks more often keep the load on
    /// the origin even).
    pub fn next_backfill_rows(&self, state: &CaptureState, cap: usize) -> usize {
        self.next_backfill()
            .and_then(|j| state.backfills.get(j))
            .map_or(self.chunk_rows, |b| b.chunk_rows)
            .min(cap)
            .max(1)
    }

    /// Whether a table is queued or being read.
    pub fn covers(&self, table: &TableId) -> bool {
        self.queue.contains(table)
            || self
                .chunk
                .as_ref()
                .is_some_and(|c| &c.schema.table().id == table)
    }

    /// Whether there is nothing queued and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.chunk.is_none()
            && self.queue.is_empty()
            && self.repairs.is_empty()
            && self.backfills.is_empty()
    }

    /// Whether a new chunk should be read now; backfill chunks only when the throttle allows
    /// (`backfill_allowed`), so live capture and snapshots always go first.
    pub fn wants_chunk(&self, backfill_allowed: bool) -> bool {
        self.chunk.is_none()
            && (self.next_table().is_some()
                || self.next_repair().is_some()
                || (backfill_allowed && self.has_backfill()))
    }

    /// Reads the next chunk of the table at the head of the queue, between two watermarks.
    /// Returns the schema version the chunk uses (to register before its rows are sent).
    /// `recent_xids` are the transactions streamed most recently (see the module docs); a
    /// backfill chunk reads at most `backfill_cap` rows (see `next_backfill_rows`).
    pub async fn start_chunk(
        &mut self,
        client: &Client,
        replica: Option<&Client>,
        state: &CaptureState,
        recent_xids: &HashSet<u32>,
        backfill_cap: usize,
    ) -> Result<ChunkStart, CaptureError> {
        let repair = self.next_repair().and_then(|i| self.repairs.remove(i));
        let mut backfill: Option<(String, crate::store::state::Backfill)> = None;
        let table = match (&repair, self.next_table()) {
            (Some((t, _)), _) => t.clone(),
            (None, Some(t)) => t.clone(),
            (None, None) => {
                let Some(job) = self.next_backfill().cloned() else {
                    return Ok(ChunkStart::Nothing);
                };
                let Some(b) = state.backfills.get(&job).cloned() else {
                    self.backfills.retain(|j| *j != job);
                    return Ok(ChunkStart::Nothing);
                };
                let Some(t) = crate::config::parse_table(&b.table) else {
                    self.backfills.retain(|j| *j != job);
                    return Ok(ChunkStart::Nothing);
                };
                backfill = Some((job, b));
                t
            }
        };
        let repair = repair.map(|(_, keys)| keys);
        let t = &self.target;
        let Some(relid) = catalog::table_oid(client, &table)
            .await
            .map_err(pg(t, format!("looking up {table}")))?
        else {
            tracing::warn!(table = %table, "table disappeared before its snapshot; skipping it");
            if let Some((job, _)) = &backfill {
                self.backfills.retain(|j| j != job);
            } else if repair.is_none() {
                self.queue.retain(|q| *q != table);
            }
            return Ok(ChunkStart::Nothing);
        };
        // Exactly what the stream sends: the publication's columns and rows only.
        let published = catalog::published(client, &self.publication, &table)
            .await
            .map_err(pg(
                t,
                format!("reading what {} publishes of {table}", self.publication),
            ))?;
        let columns = catalog::table_columns(client, relid)
            .await
            .map_err(pg(t, format!("reading columns of {table}")))?;
        let columns = published.keep(columns);
        let schema = catalog::build_schema(client, &self.database, table.clone(), relid, &columns)
            .await
            .map_err(pg(t, format!("reading types of {table}")))?;
        let schema =
            Arc::new(
                EncodedSchema::new(&schema).map_err(|source| CaptureError::Encode {
                    lsn: ferry_schemas::Lsn::ZERO,
                    source,
                })?,
            );
        let progress = match (&repair, &backfill) {
            (None, Some((_, b))) => b.progress.as_ref(),
            (None, None) => state.tables.get(&table.to_string()),
            _ => None,
        };
        // A read goes on in the order it began in (older progress: column order); a new one
        // reads in declared key order, the order of the key's index.
        let (order, after) = match TableProgress::resume_in(progress, schema.table()) {
            Some((order, key)) => (order, Some(key)),
            None => (schema.table().key_indexes(), None),
        };
        let chunk_rows = backfill.as_ref().map_or(self.chunk_rows, |(_, b)| {
            // A staged backfill's sample is exactly its size: no chunk reads past it.
            let to_sample = match b.sample {
                Some(n) if b.sample_state.is_none() && b.rows < n => (n - b.rows) as usize,
                _ => usize::MAX,
            };
            b.chunk_rows.min(backfill_cap).min(to_sample).max(1)
        });
        // A table without a key is read in one chunk: rows move between `ctid` ranges when
        // they are updated, so a later chunk could see again a row an earlier one emitted.
        // Otherwise a chunk holds about `chunk_bytes`, by the size of the table's rows so far
        // (a small first chunk measures them).
        let chunk_rows = if schema.table().key_indexes().is_empty() {
            usize::MAX >> 1
        } else {
            match self.row_bytes.get(&table) {
                Some(&b) => (self.chunk_bytes / b.max(1)).clamp(1, chunk_rows),
                None => chunk_rows.min(PROBE_ROWS),
            }
        };
        let filters: Vec<String> = [
            published.row_filter.clone(),
            backfill.as_ref().and_then(|(_, b)| b.predicate.clone()),
        ]
        .into_iter()
        .flatten()
        .map(|p| format!("({p})"))
        .collect();
        let extra = (!filters.is_empty()).then(|| filters.join(" AND "));
        self.seq += 1;
        let id = format!("{} {:016x}-{}", self.slot, self.run_id, self.seq);
        let key_idx = schema.table().key_indexes();
        let keyed = !key_idx.is_empty();
        let cols = &schema.table().columns;
        let Some(sql) = chunk_query(
            schema.table(),
            &order,
            after.as_deref(),
            repair.as_deref(),
            extra.as_deref(),
            chunk_rows,
        ) else {
            tracing::warn!(table = %table, "repair needs a key; ignored");
            return Ok(ChunkStart::Nothing);
        };
        // A backfill chunk may read from a replica; its snapshot is checked against the
        // stream exactly like the primary's (a lagging replica is waited for below).
        let reader = match (&backfill, replica) {
            (Some(_), Some(r)) => r,
            _ => client,
        };
        let waiting_since = std::time::Instant::now();
        let (visibility, messages) = loop {
            let read = match reader
                .simple_query(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                     SELECT pg_current_snapshot()::text; {sql}; COMMIT"
                ))
                .await
            {
                Ok(read) => read,
                Err(e) if is_table_data_error(&e) => {
                    // This table's rows cannot be read (a value the server cannot send, a
                    // revoked grant): the table stops, the others go on.
                    reader
                        .batch_execute("ROLLBACK")
                        .await
                        .map_err(pg(t, "ending a failed snapshot read"))?;
                    self.emit_watermark(client, "high", &id).await?;
                    if let Some(keys) = repair {
                        self.repairs.push_front((table.clone(), keys));
                    }
                    let from = after.as_ref().map_or(String::new(), |k| {
                        format!(", rows after key ({})", k.join(", "))
                    });
                    return Ok(ChunkStart::Unreadable {
                        table: table.clone(),
                        reason: format!("snapshot of {table}{from}: {}", pg_message(&e)),
                    });
                }
                Err(e) => return Err(pg(t, format!("reading a snapshot chunk of {table}"))(e)),
            };
            let snapshot_text = read.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) if r.columns().len() == 1 => {
                    r.get(0).map(str::to_string)
                }
                _ => None,
            });
            let visibility = snapshot_text
                .as_deref()
                .and_then(Visibility::parse)
                .ok_or_else(|| {
                    CaptureError::Setup(format!(
                        "unexpected pg_current_snapshot() result {snapshot_text:?}"
                    ))
                })?;
            if recent_xids.iter().all(|x| visibility.sees(*x)) {
                break (visibility, read);
            }
            if waiting_since.elapsed() > std::time::Duration::from_secs(120) {
                return Err(CaptureError::Setup(format!(
                    "a snapshot read of {table} has not seen transactions already streamed for 120 s{}",
                    if std::ptr::eq(reader, client) {
                        ""
                    } else {
                        " (the backfill replica lags that far behind the primary)"
                    }
                )));
            }
            // A transaction already streamed is not visible yet: wait a moment and read again.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        self.emit_watermark(client, "high", &id).await?;

        let mut rows = Vec::new();
        let mut bytes = 0usize;
        let mut last = after.clone();
        let mut key_buf = Vec::new();
        for m in messages {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            if r.columns().len() != cols.len() + 1 {
                continue; // the pg_current_snapshot() row
            }
            // A text value that is not UTF-8 (a `SQL_ASCII` database) reads as an error.
            let cells: Vec<Result<Option<&str>, String>> = (0..r.len())
                .map(|i| r.try_get(i).map_err(|e| e.to_string()))
                .collect();
            let cell = |i: usize| cells[i].as_ref().ok().copied().flatten();
            let mut datums = Vec::with_capacity(cols.len());
            bytes += (1..r.len())
                .map(|i| cell(i).map_or(1, str::len))
                .sum::<usize>();
            for (i, col) in cols.iter().enumerate() {
                let datum = match &cells[i + 1] {
                    Ok(None) => Ok(Datum::Null),
                    Ok(Some(text)) => {
                        text_datum(text.as_bytes(), &col.ty).map_err(|e| e.to_string())
                    }
                    Err(e) => Err(format!("not UTF-8: {e}")),
                };
                match datum {
                    Ok(d) => datums.push(d),
                    Err(e) => {
                        // The chunk is dropped (its watermark finds nothing); the caller
                        // stops the table, and the chunk is read again on resume.
                        let key: Vec<&str> = if keyed {
                            key_idx
                                .iter()
                                .map(|&k| cell(k + 1).unwrap_or("NULL"))
                                .collect()
                        } else {
                            vec![cell(0).unwrap_or_default()]
                        };
                        if let Some(keys) = repair {
                            self.repairs.push_front((table.clone(), keys));
                        }
                        return Ok(ChunkStart::Unreadable {
                            table: table.clone(),
                            reason: format!(
                                "snapshot of {table}, row {} ({}): column {:?}: {e}",
                                if keyed { "key" } else { "ctid" },
                                key.join(", "),
                                col.name
                            ),
                        });
                    }
                }
            }
            last = Some(if keyed {
                order
                    .iter()
                    .map(|&i| cell(i + 1).unwrap_or_default().to_string())
                    .collect()
            } else {
                vec![cell(0).unwrap_or_default().to_string()]
            });
            key_buf.clear();
            if keyed {
                schema.encode_key(&datums, &mut key_buf).map_err(|source| {
                    CaptureError::Encode {
                        lsn: ferry_schemas::Lsn::ZERO,
                        source,
                    }
                })?;
            }
            rows.push((key_buf.clone(), datums));
        }
        let complete = repair.is_some() || rows.len() < chunk_rows;
        if !rows.is_empty() && repair.is_none() {
            self.row_bytes.insert(table.clone(), bytes / rows.len());
        }
        tracing::debug!(table = %table, rows = rows.len(), complete, "snapshot chunk read");
        self.chunk = Some(Chunk {
            id,
            repair,
            backfill: backfill.map(|(job, _)| job),
            schema: schema.clone(),
            rows,
            order: order.iter().map(|&i| cols[i].name.clone()).collect(),
            last,
            complete,
            visibility,
            seen: HashSet::new(),
            drop_images: std::collections::HashMap::new(),
            truncated: false,
        });
        Ok(ChunkStart::Started(schema))
    }

    async fn emit_watermark(
        &self,
        client: &Client,
        kind: &str,
        id: &str,
    ) -> Result<(), CaptureError> {
        crate::wal::emit(
            client,
            &self.target,
            crate::wal::Kind::Watermark,
            &format!("{kind} {id}"),
        )
        .await
    }

    /// Notes a streamed change: a change to one of the chunk's keys by a transaction the
    /// chunk's read could not see drops that key's chunk row.
    pub fn observe(&mut self, schema: &EncodedSchema, event: &ChangeEvent) {
        let Some(chunk) = self.chunk.as_mut() else {
            return;
        };
        if schema.table().id != chunk.schema.table().id {
            return;
        }
        let xid = event.source.txid.unwrap_or_default() as u32;
        let visible = chunk.visibility.sees(xid);
        if !schema.has_key() && !visible && matches!(event.op, Op::Update | Op::Delete) {
            // No key to drop by: an update or delete the read could not see changed a row the
            // chunk still holds; drop one chunk row equal to its old image. (Changes the read
            // could see are absorbed instead: see `absorbs`.)
            if let Some(image) = event.before.as_deref() {
                *chunk.drop_images.entry(image_text(image)).or_default() += 1;
            }
        }
        if visible {
            return;
        }
        if event.op == Op::Truncate {
            chunk.truncated = true;
            return;
        }
        if let Some(image) = event.key_image() {
            let mut key = Vec::new();
            if schema.has_key() && schema.encode_key(image, &mut key).is_ok() {
                // The chunk's row for this key is dropped; if the change left a TOASTed value
                // out, the destination may never have had it: read the row again.
                if chunk.seen.insert(key) && leaves_toast_out(event) {
                    if let Some(k) = key_texts(schema, image) {
                        let table = schema.table().id.clone();
                        self.repairs.push_back((table, vec![k]));
                    }
                }
            }
        }
    }

    /// Whether a streamed change must not be sent because a snapshot row carries it: a change
    /// to a table without a key whose snapshot has not been read yet (the read will see it:
    /// every transaction streamed before a read is visible to it, see the module docs), or that
    /// the chunk being read could see. A keyed table needs none of this: its rows are upserts.
    pub fn absorbs(&self, schema: &EncodedSchema, event: &ChangeEvent) -> bool {
        if schema.has_key() || event.op == Op::Truncate {
            return false;
        }
        let table = &schema.table().id;
        if let Some(chunk) = &self.chunk {
            if chunk.schema.table().id == *table
                && chunk.backfill.is_none()
                && chunk.repair.is_none()
            {
                return chunk
                    .visibility
                    .sees(event.source.txid.unwrap_or_default() as u32);
            }
        }
        self.queue.contains(table)
    }

    /// Handles a watermark message. At the chunk's high watermark, returns the rows to emit,
    /// positioned at `lsn` (the commit LSN of the watermark's transaction, so they order with
    /// streamed changes exactly as the stream delivers them).
    pub fn on_watermark(&mut self, content: &[u8], lsn: u64) -> Option<ChunkDone> {
        let text = std::str::from_utf8(content).ok()?;
        let (kind, id) = text.split_once(' ')?;
        let chunk = self.chunk.as_ref()?;
        if chunk.id != id || kind != "high" {
            return None;
        }
        let chunk = self.chunk.take()?;
        let table = chunk.schema.table().id.clone();
        let source = |seq: usize| Source {
            region: self.region.clone(),
            database: self.database.clone(),
            schema: table.schema.clone(),
            table: table.table.clone(),
            lsn,
            seq: seq as u64,
            txid: None,
            commit_ts_us: None,
            snapshot: true,
        };
        let schema = chunk.schema.clone();
        let key_idx = schema.table().key_indexes();
        let mut events = Vec::new();
        let mut found: HashSet<Vec<u8>> = HashSet::new();
        let mut drop_images = chunk.drop_images;
        if !chunk.truncated {
            for (key, row) in chunk.rows {
                if key.is_empty() {
                    if let Some(n) = drop_images.get_mut(&image_text(&row)).filter(|n| **n > 0) {
                        *n -= 1;
                        continue;
                    }
                }
                found.insert(key.clone());
                if key.is_empty() || !chunk.seen.contains(&key) {
                    events.push(ChangeEvent {
                        op: Op::Read,
                        before: None,
                        after: Some(row),
                        source: source(events.len()),
                    });
                }
            }
        }
        // A repaired key that no longer exists at the origin is deleted downstream too (unless
        // the stream already said what happened to it). Keys compare as encoded bytes, so text
        // forms never have to agree.
        for k in chunk.repair.iter().flatten() {
            let mut image = vec![Datum::Null; schema.table().columns.len()];
            let mut ok = true;
            for (&i, v) in key_idx.iter().zip(k) {
                match ferry_connectors::postgres::values::parse(v, &schema.table().columns[i].ty) {
                    Ok(d) => image[i] = d,
                    Err(_) => ok = false,
                }
            }
            let mut key = Vec::new();
            if !ok
                || schema.encode_key(&image, &mut key).is_err()
                || found.contains(&key)
                || chunk.seen.contains(&key)
                || chunk.truncated
            {
                continue;
            }
            events.push(ChangeEvent {
                op: Op::Delete,
                before: Some(image),
                after: None,
                source: source(events.len()),
            });
        }
        let progress = if chunk.repair.is_some() {
            None
        } else if chunk.complete {
            if let Some(job) = &chunk.backfill {
                self.backfills.retain(|j| j != job);
            } else {
                self.queue.retain(|q| *q != table);
            }
            Some(TableProgress::Done)
        } else {
            Some(TableProgress::Past {
                order: chunk.order,
                key: chunk.last.unwrap_or_default(),
            })
        };
        Some(ChunkDone {
            backfill: chunk.backfill,
            schema: chunk.schema,
            events,
            table,
            progress,
        })
    }
}

/// Whether a failed read concerns this table's data or rights only (SQLSTATE class 22, data
/// exception, e.g. 22021 for text the server cannot convert; 42501, insufficient privilege),
/// not the connection or the server.
fn is_table_data_error(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || c.code() == "42501")
}

/// The server's message and SQLSTATE of a failed statement.
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The SQL that reads one snapshot chunk of `table`: every column (after the row's `ctid`), in
/// the order of the key columns `order` (`ctid` order for a keyless table, whose `order` is
/// empty), starting after the key `after` (text in that order), within the
/// backfill predicate `extra`, at most `chunk_rows` rows; or, for a repair, exactly the rows
/// with the given keys. `None`: a repair of a keyless table (no key to address rows by).
/// Keys are compared as typed tuples (`(k1, k2) > ('a'::text, '1'::int4)`), so composite keys
/// and every key type order as Postgres orders them.
pub(crate) fn chunk_query(
    table: &ferry_schemas::TableSchema,
    order: &[usize],
    after: Option<&[String]>,
    repair: Option<&[Vec<String>]>,
    extra: Option<&str>,
    chunk_rows: usize,
) -> Option<String> {
    let key_idx = order;
    let keyed = !key_idx.is_empty();
    if repair.is_some() && !keyed {
        return None;
    }
    let cols = &table.columns;
    let select_list = cols
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let order: Vec<String> = if keyed {
        key_idx
            .iter()
            .map(|&i| quote_ident(&cols[i].name))
            .collect()
    } else {
        vec!["ctid".into()]
    };
    let cast = |ty: &str| ty.split('.').map(quote_ident).collect::<Vec<_>>().join(".");
    let typed = |k: &[String]| -> String {
        key_idx
            .iter()
            .zip(k)
            .map(|(&i, v)| format!("{}::{}", quote_literal(v), cast(&cols[i].pg_type)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let predicate = match (after, repair) {
        (None, Some(keys)) => {
            let tuples: Vec<String> = keys.iter().map(|k| format!("({})", typed(k))).collect();
            format!("WHERE ({}) IN ({})", order.join(", "), tuples.join(", "))
        }
        (None, None) => String::new(),
        (Some(k), _) if keyed => format!("WHERE ({}) > ({})", order.join(", "), typed(k)),
        (Some(k), _) => format!(
            "WHERE ctid > {}::tid",
            quote_literal(k.first().map_or("(0,0)", String::as_str))
        ),
    };
    let predicate = match (extra, predicate.is_empty()) {
        (None, _) => predicate,
        (Some(x), true) => format!("WHERE {x}"),
        (Some(x), false) => format!("{predicate} AND {x}"),
    };
    Some(format!(
        "SELECT ctid::text, {select_list} FROM {}.{} {predicate} ORDER BY {} LIMIT {}",
        quote_ident(&table.id.schema),
        quote_ident(&table.id.table),
        order.join(", "),
        if repair.is_some() {
            usize::MAX >> 1
        } else {
            chunk_rows
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(keys: &[(&str, &str)], others: &[(&str, &str)]) -> ferry_schemas::TableSchema {
        let col = |(name, pg): &(&str, &str), key: bool| ferry_schemas::Column {
            name: name.to_string(),
            pg_type: pg.to_string(),
            type_oid: 0,
            type_mod: -1,
            missing: None,
            attnum: None,
            ty: ferry_schemas::ColumnType::Text,
            key,
            key_order: 0,
        };
        ferry_schemas::TableSchema {
            database: "db".into(),
            id: TableId::new("My Schema", "odd\"table"),
            columns: keys
                .iter()
                .map(|c| col(c, true))
                .chain(others.iter().map(|c| col(c, false)))
                .collect(),
        }
    }

    #[test]
    fn chunk_queries_for_every_shape() {
        let keyed = table(&[("id", "int4")], &[("v", "text")]);
        let composite = table(&[("a", "text"), ("b", "public.my type")], &[("v", "text")]);
        let keyless = table(&[], &[("v", "text")]);
        let from = r#"SELECT ctid::text, "#;
        let cases: Vec<(&str, Option<String>, Option<&str>)> = vec![
            (
                "first chunk",
                chunk_query(&keyed, &keyed.key_indexes(), None, None, None, 500),
                Some(r#""id", "v" FROM "My Schema"."odd""table"  ORDER BY "id" LIMIT 500"#),
            ),
            (
                "next chunk",
                chunk_query(
                    &keyed,
                    &keyed.key_indexes(),
                    Some(&["41".into()]),
                    None,
                    None,
                    500,
                ),
                Some(
                    r#""id", "v" FROM "My Schema"."odd""table" WHERE ("id") > ('41'::"int4") ORDER BY "id" LIMIT 500"#,
                ),
            ),
            (
                "composite key, odd values",
                chunk_query(
                    &composite,
                    &composite.key_indexes(),
                    Some(&["it's".into(), r"a\b".into()]),
                    None,
                    None,
                    10,
                ),
                Some(
                    r#""a", "b", "v" FROM "My Schema"."odd""table" WHERE ("a", "b") > ('it''s'::"text", E'a\\b'::"public"."my type") ORDER BY "a", "b" LIMIT 10"#,
                ),
            ),
            (
                "composite key declared in another order",
                chunk_query(
                    &composite,
                    &[1, 0],
                    Some(&["x".into(), "1".into()]),
                    None,
                    None,
                    10,
                ),
                Some(
                    r#""a", "b", "v" FROM "My Schema"."odd""table" WHERE ("b", "a") > ('x'::"public"."my type", '1'::"text") ORDER BY "b", "a" LIMIT 10"#,
                ),
            ),
            (
                "keyless",
                chunk_query(
                    &keyless,
                    &keyless.key_indexes(),
                    Some(&["(3,7)".into()]),
                    None,
                    None,
                    10,
                ),
                Some(
                    r#""v" FROM "My Schema"."odd""table" WHERE ctid > '(3,7)'::tid ORDER BY ctid LIMIT 10"#,
                ),
            ),
            (
                "backfill predicate, first",
                chunk_query(
                    &keyed,
                    &keyed.key_indexes(),
                    None,
                    None,
                    Some("(v <> 'x')"),
                    5,
                ),
                Some(
                    r#""id", "v" FROM "My Schema"."odd""table" WHERE (v <> 'x') ORDER BY "id" LIMIT 5"#,
                ),
            ),
            (
                "backfill predicate, next",
                chunk_query(
                    &keyed,
                    &keyed.key_indexes(),
                    Some(&["9".into()]),
                    None,
                    Some("(v <> 'x')"),
                    5,
                ),
                Some(
                    r#""id", "v" FROM "My Schema"."odd""table" WHERE ("id") > ('9'::"int4") AND (v <> 'x') ORDER BY "id" LIMIT 5"#,
                ),
            ),
            (
                "repair",
                chunk_query(
                    &keyed,
                    &keyed.key_indexes(),
                    None,
                    Some(&[vec!["1".into()], vec!["2".into()]]),
                    None,
                    5,
                ),
                Some(
                    r#""id", "v" FROM "My Schema"."odd""table" WHERE ("id") IN (('1'::"int4"), ('2'::"int4")) ORDER BY "id" LIMIT 9223372036854775807"#,
                ),
            ),
            (
                "repair without a key",
                chunk_query(
                    &keyless,
                    &keyless.key_indexes(),
                    None,
                    Some(&[vec!["1".into()]]),
                    None,
                    5,
                ),
                None,
            ),
        ];
        for (what, got, want) in cases {
            assert_eq!(got, want.map(|w| format!("{from}{w}")), "{what}");
        }
    }

    #[test]
    fn visibility_follows_the_snapshot() {
        let v = Visibility::parse("100:105:101,103").expect("parses");
        assert!(v.sees(99));
        assert!(v.sees(100));
        assert!(!v.sees(101));
        assert!(v.sees(102));
        assert!(!v.sees(103));
        assert!(!v.sees(105));
        assert!(!v.sees(200));
        assert_eq!(
            Visibility::parse("7:7:").map(|v| v.in_progress.len()),
            Some(0)
        );
        // 64-bit xids past the first wraparound compare on their low 32 bits.
        let v = Visibility::parse("4294967396:4294967400:").expect("parses");
        assert!(v.sees(99));
        assert!(!v.sees(104));
        assert!(Visibility::parse("garbage").is_none());
        assert!(Visibility::parse("1:2:x").is_none());
    }
}
