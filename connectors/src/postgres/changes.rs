//! Replication messages → change events.
//!
//! The [`ChangeDecoder`] keeps the relation map (table oid → current schema version) and the
//! current transaction's context, and turns each pgoutput message into zero or more
//! [`Output`]s. It does no I/O except catalog look-ups when a Relation message announces a new
//! table shape (rare).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use ferry_schemas::{ChangeEvent, Datum, EncodedSchema, Lsn, Op, Source, TableId, TableSchema};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::catalog;
use super::pgoutput::{self, Cell, DecodeError, Message, OldTuple};
use super::values::{self, ValueError, PG_EPOCH_OFFSET_US};

/// Why a change could not be turned into an event.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The message itself is malformed.
    #[error("at LSN {lsn}: {source}")]
    Decode {
        /// Where in the WAL.
        lsn: Lsn,
        /// What was wrong.
        source: DecodeError,
    },
    /// A column value does not parse as its type.
    #[error("at LSN {lsn}, table {table}, column {column:?}: {source}")]
    Value {
        /// Where in the WAL.
        lsn: Lsn,
        /// The table.
        table: TableId,
        /// The column.
        column: String,
        /// What was wrong.
        source: ValueError,
    },
    /// A change referred to a table the stream had not described.
    #[error("at LSN {lsn}: change for relation oid {oid} arrived before its Relation message")]
    UnknownRelation {
        /// Where in the WAL.
        lsn: Lsn,
        /// The table oid.
        oid: u32,
    },
    /// A tuple's column count does not match its relation.
    #[error("at LSN {lsn}, table {table}: tuple has {got} columns, relation has {expected}")]
    Arity {
        /// Where in the WAL.
        lsn: Lsn,
        /// The table.
        table: TableId,
        /// Columns in the relation.
        expected: usize,
        /// Columns in the tuple.
        got: usize,
    },
    /// A value arrived in binary form, which Ferry never requests.
    #[error("at LSN {lsn}, table {table}: binary column values are not supported")]
    Binary {
        /// Where in the WAL.
        lsn: Lsn,
        /// The table.
        table: TableId,
    },
    /// The schema for a new table shape could not be built.
    #[error("at LSN {lsn}: {source}")]
    Schema {
        /// Where in the WAL.
        lsn: Lsn,
        /// What was wrong.
        source: ferry_schemas::AvroError,
    },
    /// A catalog look-up failed (connection trouble: retryable).
    #[error("catalog query failed: {0}")]
    Catalog(#[from] tokio_postgres::Error),
}

impl ChangeError {
    /// Whether retrying could help. Bad data is permanent; catalog trouble is not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ChangeError::Catalog(_))
    }

    /// Whether the error is about one table's data (a value that does not parse, a tuple of
    /// the wrong shape): that table is held, the others go on.
    pub fn is_table_data(&self) -> bool {
        matches!(
            self,
            ChangeError::Value { .. } | ChangeError::Arity { .. } | ChangeError::Binary { .. }
        )
    }
}

/// What decoding a message produced.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // events are the common case; boxing them would allocate per change
pub enum Output {
    /// A table has a new schema version (first sight, or a column was added, dropped or changed
    /// type). Emitted before any event that uses it.
    Schema(Arc<EncodedSchema>),
    /// A change event, with the schema version it is encoded with.
    Event(Arc<EncodedSchema>, ChangeEvent),
    /// A change kept as the stream sent it: its table is held ([`ChangeDecoder::hold`]), or
    /// one of its values cannot be read (`reason`). Decoded again on resume
    /// ([`ChangeDecoder::redecode`]).
    Held {
        /// The table's schema version when the change was written.
        schema: Arc<EncodedSchema>,
        /// The change.
        change: RawChange,
        /// Why it could not be decoded (`None`: its table was already held).
        reason: Option<String>,
    },
}

/// What kind of row change a [`RawChange`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawOp {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
    /// The table was truncated.
    Truncate,
}

/// One value as the stream sent it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawCell {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that was not sent.
    UnchangedToast,
    /// The text form.
    Text(String),
    /// A text form that is not UTF-8, as bytes.
    Bytes(Vec<u8>),
    /// A binary form (never requested by Ferry).
    Binary(Vec<u8>),
}

impl From<&Cell> for RawCell {
    fn from(c: &Cell) -> RawCell {
        match c {
            Cell::Null => RawCell::Null,
            Cell::UnchangedToast => RawCell::UnchangedToast,
            Cell::Text(b) => match std::str::from_utf8(b) {
                Ok(s) => RawCell::Text(s.to_string()),
                Err(_) => RawCell::Bytes(b.to_vec()),
            },
            Cell::Binary(b) => RawCell::Binary(b.to_vec()),
        }
    }
}

impl RawCell {
    fn to_cell(&self) -> Cell {
        match self {
            RawCell::Null => Cell::Null,
            RawCell::UnchangedToast => Cell::UnchangedToast,
            RawCell::Text(s) => Cell::Text(Bytes::from(s.clone())),
            RawCell::Bytes(b) => Cell::Text(Bytes::from(b.clone())),
            RawCell::Binary(b) => Cell::Binary(Bytes::from(b.clone())),
        }
    }

    /// The text form, when there is one.
    pub fn text(&self) -> Option<&str> {
        match self {
            RawCell::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A row change as the stream sent it, with its place in the stream: what a held table keeps
/// (in the dead-letter topic) until it is resumed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawChange {
    /// What happened.
    pub op: RawOp,
    /// Commit LSN of its transaction.
    pub lsn: u64,
    /// Its sequence number in the transaction.
    pub seq: u64,
    /// Transaction id.
    pub xid: Option<i64>,
    /// Commit time, microseconds since 1970.
    pub commit_ts_us: Option<i64>,
    /// The old key or row, when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<RawTuple>,
    /// The new row (insert, update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Vec<RawCell>>,
}

/// An old image: the key columns only, or the whole row (REPLICA IDENTITY FULL).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawTuple {
    /// The whole old row.
    pub full: bool,
    /// Its values (non-key columns are NULL in a key image).
    pub cells: Vec<RawCell>,
}

impl RawChange {
    /// The text of each key column (`key` indexes) of the row it is about: the new row for an
    /// insert or update, the old for a delete. `None` when there is no such row or a key value
    /// has no text.
    pub fn key_texts(&self, key: &[usize]) -> Option<Vec<String>> {
        let cells = match (&self.new, &self.old) {
            (Some(n), _) if self.op != RawOp::Delete => n,
            (_, Some(o)) => &o.cells,
            _ => return None,
        };
        key.iter()
            .map(|&i| cells.get(i).and_then(RawCell::text).map(str::to_string))
            .collect()
    }
}

#[derive(Default)]
struct Txn {
    lsn: u64,
    xid: Option<i64>,
    commit_ts_us: Option<i64>,
    seq: u64,
}

/// Turns pgoutput messages into change events. See the module docs.
pub struct ChangeDecoder {
    region: String,
    database: String,
    relations: HashMap<u32, Arc<EncodedSchema>>,
    txn: Txn,
    /// Tables whose changes are kept as sent rather than decoded.
    held: HashSet<TableId>,
    /// Per table oid, each column's number by name, as the DDL event trigger last wrote them
    /// into the stream (exact at this point of the stream, unlike today's catalog).
    attnums: HashMap<u32, HashMap<String, i16>>,
}

impl ChangeDecoder {
    /// A decoder for one source database.
    pub fn new(region: impl Into<String>, database: impl Into<String>) -> Self {
        ChangeDecoder {
            region: region.into(),
            database: database.into(),
            relations: HashMap::new(),
            txn: Txn::default(),
            held: HashSet::new(),
            attnums: HashMap::new(),
        }
    }

    /// A `ferry.columns` message from the DDL event trigger: a table's column numbers from
    /// this point of the stream on. Returns why it does not parse.
    pub fn columns_message(&mut self, content: &[u8]) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Columns {
            relid: u32,
            columns: Vec<(i16, String)>,
        }
        let m: Columns = serde_json::from_slice(content).map_err(|e| e.to_string())?;
        self.attnums.insert(
            m.relid,
            m.columns.into_iter().map(|(n, name)| (name, n)).collect(),
        );
        Ok(())
    }

    /// From now on, the table's changes come out as [`Output::Held`], in order.
    pub fn hold(&mut self, table: TableId) {
        self.held.insert(table);
    }

    /// The table's changes are decoded again.
    pub fn release(&mut self, table: &TableId) {
        self.held.remove(table);
    }

    /// The schema version currently in force for a table oid.
    pub fn schema_of(&self, oid: u32) -> Option<&Arc<EncodedSchema>> {
        self.relations.get(&oid)
    }

    /// Commit LSN of the transaction being decoded (0 before the first Begin).
    pub fn txn_lsn(&self) -> u64 {
        self.txn.lsn
    }

    /// Records a transaction's start (from the transport's Begin).
    pub fn begin(&mut self, final_lsn: u64, xid: u32, commit_time_pg_us: i64) {
        self.txn = Txn {
            lsn: final_lsn,
            xid: Some(i64::from(xid)),
            commit_ts_us: Some(commit_time_pg_us.saturating_add(PG_EPOCH_OFFSET_US)),
            seq: 0,
        };
    }

    /// The source block for the next change of `table` in the current transaction.
    fn source(&mut self, table: &TableSchema) -> Source {
        let seq = self.txn.seq;
        self.txn.seq += 1;
        Source {
            region: self.region.clone(),
            database: self.database.clone(),
            schema: table.id.schema.clone(),
            table: table.id.table.clone(),
            lsn: self.txn.lsn,
            seq,
            txid: self.txn.xid,
            commit_ts_us: self.txn.commit_ts_us,
            snapshot: false,
        }
    }

    /// Decodes one `XLogData` payload that started at `wal_start`, appending to `out`.
    pub async fn decode(
        &mut self,
        client: &Client,
        wal_start: u64,
        data: &Bytes,
        out: &mut Vec<Output>,
    ) -> Result<(), ChangeError> {
        let lsn = Lsn(wal_start);
        let msg = pgoutput::decode(data).map_err(|source| ChangeError::Decode { lsn, source })?;
        match msg {
            Message::Relation(rel) => {
                let id = TableId::new(rel.namespace.clone(), rel.name.clone());
                let columns: Vec<(String, u32, i32)> = rel
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                    .collect();
                // Column numbers as of the last DDL in the stream, when the trigger wrote them.
                let numbers = self.attnums.get(&rel.oid);
                let mut schema = catalog::build_schema_at(
                    client,
                    &self.database,
                    id,
                    rel.oid,
                    &columns,
                    numbers,
                )
                .await?;
                // The catalog is today's; the stream's flags say which columns identified a row
                // when the change was written. With REPLICA IDENTITY FULL every column is
                // flagged, which is not a key: such a table has none.
                if !schema.columns.iter().any(|c| c.key) && rel.replica_identity != b'f' {
                    for (col, rc) in schema.columns.iter_mut().zip(&rel.columns) {
                        col.key = rc.flags & 1 == 1;
                    }
                }

                let changed = self
                    .relations
                    .get(&rel.oid)
                    .is_none_or(|s| s.table() != &schema);
                if changed {
                    let encoded = Arc::new(
                        EncodedSchema::new(&schema)
                            .map_err(|source| ChangeError::Schema { lsn, source })?,
                    );
                    self.relations.insert(rel.oid, encoded.clone());
                    out.push(Output::Schema(encoded));
                }
            }
            Message::Type { .. } | Message::Origin { .. } => {}
            Message::Insert { relation, new } => {
                self.change(
                    lsn,
                    relation,
                    RawOp::Insert,
                    None,
                    Some(new.as_slice()),
                    out,
                )?;
            }
            Message::Update { relation, old, new } => {
                self.change(
                    lsn,
                    relation,
                    RawOp::Update,
                    old.as_ref(),
                    Some(new.as_slice()),
                    out,
                )?;
            }
            Message::Delete { relation, old } => {
                self.change(lsn, relation, RawOp::Delete, Some(&old), None, out)?;
            }
            Message::Truncate { relations, .. } => {
                for oid in relations {
                    let schema = self.relation(lsn, oid)?;
                    if !self.held.is_empty() && self.held.contains(&schema.table().id) {
                        let change = self.raw(RawOp::Truncate, None, None);
                        out.push(Output::Held {
                            schema,
                            change,
                            reason: None,
                        });
                        continue;
                    }
                    let event = self.truncate(&schema);
                    out.push(Output::Event(schema, event));
                }
            }
        }
        Ok(())
    }

    /// The truncate event of a table, next in the transaction.
    fn truncate(&mut self, schema: &EncodedSchema) -> ChangeEvent {
        ChangeEvent {
            op: Op::Truncate,
            before: None,
            after: None,
            source: self.source(schema.table()),
        }
    }

    /// One row change: its events, or, for a held table or a value that cannot be read, the
    /// change as the stream sent it ([`Output::Held`]).
    fn change(
        &mut self,
        lsn: Lsn,
        relation: u32,
        op: RawOp,
        old: Option<&OldTuple>,
        new: Option<&[Cell]>,
        out: &mut Vec<Output>,
    ) -> Result<(), ChangeError> {
        let schema = self.relation(lsn, relation)?;
        if !self.held.is_empty() && self.held.contains(&schema.table().id) {
            let change = self.raw(op, old, new);
            out.push(Output::Held {
                schema,
                change,
                reason: None,
            });
            return Ok(());
        }
        let seq = self.txn.seq;
        match self.events(lsn, &schema, op, old, new, out) {
            Ok(()) => Ok(()),
            Err(e) if e.is_table_data() => {
                self.txn.seq = seq;
                let change = self.raw(op, old, new);
                out.push(Output::Held {
                    schema,
                    change,
                    reason: Some(e.to_string()),
                });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The change as sent, with its place in the transaction (it takes two sequence numbers:
    /// a key change becomes two events when it is decoded again).
    fn raw(&mut self, op: RawOp, old: Option<&OldTuple>, new: Option<&[Cell]>) -> RawChange {
        let seq = self.txn.seq;
        self.txn.seq += 2;
        RawChange {
            op,
            lsn: self.txn.lsn,
            seq,
            xid: self.txn.xid,
            commit_ts_us: self.txn.commit_ts_us,
            old: old.map(|o| match o {
                OldTuple::Full(c) => RawTuple {
                    full: true,
                    cells: c.iter().map(RawCell::from).collect(),
                },
                OldTuple::Key(c) => RawTuple {
                    full: false,
                    cells: c.iter().map(RawCell::from).collect(),
                },
            }),
            new: new.map(|c| c.iter().map(RawCell::from).collect()),
        }
    }

    /// Decodes a held change again (after the cause was fixed), with the place in its
    /// transaction it had when it was streamed.
    pub fn redecode(
        &mut self,
        schema: &Arc<EncodedSchema>,
        raw: &RawChange,
    ) -> Result<Vec<ChangeEvent>, ChangeError> {
        let saved = std::mem::replace(
            &mut self.txn,
            Txn {
                lsn: raw.lsn,
                xid: raw.xid,
                commit_ts_us: raw.commit_ts_us,
                seq: raw.seq,
            },
        );
        let old = raw.old.as_ref().map(|t| {
            let cells = t.cells.iter().map(RawCell::to_cell).collect();
            if t.full {
                OldTuple::Full(cells)
            } else {
                OldTuple::Key(cells)
            }
        });
        let new: Option<Vec<Cell>> = raw
            .new
            .as_ref()
            .map(|c| c.iter().map(RawCell::to_cell).collect());
        let mut out = Vec::new();
        let done = if raw.op == RawOp::Truncate {
            let event = self.truncate(schema);
            out.push(Output::Event(schema.clone(), event));
            Ok(())
        } else {
            self.events(
                Lsn(raw.lsn),
                schema,
                raw.op,
                old.as_ref(),
                new.as_deref(),
                &mut out,
            )
        };
        self.txn = saved;
        done?;
        Ok(out
            .into_iter()
            .filter_map(|o| match o {
                Output::Event(_, e) => Some(e),
                _ => None,
            })
            .collect())
    }

    /// The events of one insert, update or delete; nothing is appended on error.
    fn events(
        &mut self,
        lsn: Lsn,
        schema: &Arc<EncodedSchema>,
        op: RawOp,
        old: Option<&OldTuple>,
        new: Option<&[Cell]>,
        out: &mut Vec<Output>,
    ) -> Result<(), ChangeError> {
        let schema = schema.clone();
        match (op, new) {
            (RawOp::Insert, Some(new)) => {
                let after = row(lsn, &schema, new)?;
                let source = self.source(schema.table());
                out.push(Output::Event(
                    schema,
                    ChangeEvent {
                        op: Op::Create,
                        before: None,
                        after: Some(after),
                        source,
                    },
                ));
            }
            (RawOp::Update, Some(new)) => {
                let mut after = row(lsn, &schema, new)?;
                let before = match old {
                    Some(OldTuple::Full(cells)) | Some(OldTuple::Key(cells)) => {
                        Some(row(lsn, &schema, cells)?)
                    }
                    None => None,
                };
                if let (Some(OldTuple::Full(_)), Some(b)) = (old, &before) {
                    // With the whole old row at hand, an unchanged TOASTed value is known.
                    for (a, b) in after.iter_mut().zip(b) {
                        if matches!(a, Datum::UnchangedToast) && !matches!(b, Datum::UnchangedToast)
                        {
                            *a = b.clone();
                        }
                    }
                }
                let key_moved = before.as_ref().is_some_and(|b| {
                    schema
                        .table()
                        .key_indexes()
                        .iter()
                        .any(|&i| b[i] != after[i])
                });
                if key_moved {
                    // A changed key is a delete of the old key and an insert of the new one, so
                    // each key's history stays on its own partition.
                    let source = self.source(schema.table());
                    out.push(Output::Event(
                        schema.clone(),
                        ChangeEvent {
                            op: Op::Delete,
                            before,
                            after: None,
                            source,
                        },
                    ));
                    let source = self.source(schema.table());
                    out.push(Output::Event(
                        schema,
                        ChangeEvent {
                            op: Op::Create,
                            before: None,
                            after: Some(after),
                            source,
                        },
                    ));
                } else {
                    let before = match old {
                        Some(OldTuple::Full(_)) => before,
                        _ => None,
                    };
                    let source = self.source(schema.table());
                    out.push(Output::Event(
                        schema,
                        ChangeEvent {
                            op: Op::Update,
                            before,
                            after: Some(after),
                            source,
                        },
                    ));
                }
            }
            (RawOp::Delete, _) => {
                let cells = match old {
                    Some(OldTuple::Full(c)) | Some(OldTuple::Key(c)) => c,
                    None => return Err(no_tuple(lsn, &schema)),
                };
                let before = row(lsn, &schema, cells)?;
                let source = self.source(schema.table());
                out.push(Output::Event(
                    schema,
                    ChangeEvent {
                        op: Op::Delete,
                        before: Some(before),
                        after: None,
                        source,
                    },
                ));
            }
            _ => return Err(no_tuple(lsn, &schema)),
        }
        Ok(())
    }

    fn relation(&self, lsn: Lsn, oid: u32) -> Result<Arc<EncodedSchema>, ChangeError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(ChangeError::UnknownRelation { lsn, oid })
    }
}

/// A change that lacks the tuple its kind needs (a row image of no columns).
fn no_tuple(lsn: Lsn, schema: &EncodedSchema) -> ChangeError {
    ChangeError::Arity {
        lsn,
        table: schema.table().id.clone(),
        expected: schema.table().columns.len(),
        got: 0,
    }
}

/// Converts a tuple's cells to datums, typed by the schema.
fn row(lsn: Lsn, schema: &EncodedSchema, cells: &[Cell]) -> Result<Vec<Datum>, ChangeError> {
    let table = schema.table();
    if cells.len() != table.columns.len() {
        return Err(ChangeError::Arity {
            lsn,
            table: table.id.clone(),
            expected: table.columns.len(),
            got: cells.len(),
        });
    }
    cells
        .iter()
        .zip(&table.columns)
        .map(|(cell, col)| match cell {
            Cell::Null => Ok(Datum::Null),
            Cell::UnchangedToast => Ok(Datum::UnchangedToast),
            Cell::Binary(_) => Err(ChangeError::Binary {
                lsn,
                table: table.id.clone(),
            }),
            Cell::Text(bytes) => text_datum(bytes, &col.ty).map_err(|source| ChangeError::Value {
                lsn,
                table: table.id.clone(),
                column: col.name.clone(),
                source,
            }),
        })
        .collect()
}

/// Parses one text-form value, checking it is UTF-8 first.
pub fn text_datum(bytes: &[u8], ty: &ferry_schemas::ColumnType) -> Result<Datum, ValueError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ValueError {
        text: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        ty: format!("{ty:?}"),
        reason: format!("not UTF-8: {e}"),
    })?;
    if let Some(marker) = unreadable_marker() {
        if text.contains(marker) {
            return Err(ValueError {
                text: text.chars().take(200).collect(),
                ty: format!("{ty:?}"),
                reason: format!("refused by fault injection ({UNREADABLE_MARKER_VAR})"),
            });
        }
    }
    values::parse(text, ty)
}

/// Fault injection for tests: a value whose text contains this variable's (non-empty) value
/// is refused as unreadable, so the path that stops one table and holds its changes runs
/// against real Postgres and Kafka. Every value Postgres sends is readable otherwise (text
/// that is not UTF-8 cannot reach capture: the server refuses to send it).
pub const UNREADABLE_MARKER_VAR: &str = "FERRY_FAULT_UNREADABLE_VALUE";

fn unreadable_marker() -> Option<&'static str> {
    static MARKER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    MARKER
        .get_or_init(|| {
            std::env::var(UNREADABLE_MARKER_VAR)
                .ok()
                .filter(|m| !m.is_empty())
        })
        .as_deref()
}
