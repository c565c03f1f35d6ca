//! Replication messages → change events.
//!
//! The [`ChangeDecoder`] keeps the relation map (table oid → current schema version) and the
//! current transaction's context, and turns each pgoutput message into zero or more
//! [`Output`]s. It does no I/O except catalog look-ups when a Relation message announces a new
//! table shape (rare).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ferry_schemas::{ChangeEvent, Datum, EncodedSchema, Lsn, Op, Source, TableId, TableSchema};
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
}

impl ChangeDecoder {
    /// A decoder for one source database.
    pub fn new(region: impl Into<String>, database: impl Into<String>) -> Self {
        ChangeDecoder {
            region: region.into(),
            database: database.into(),
            relations: HashMap::new(),
            txn: Txn::default(),
        }
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
                let mut schema =
                    catalog::build_schema(client, &self.database, id, rel.oid, &columns).await?;
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
                let schema = self.relation(lsn, relation)?;
                let after = row(lsn, &schema, &new)?;
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
            Message::Update { relation, old, new } => {
                let schema = self.relation(lsn, relation)?;
                let mut after = row(lsn, &schema, &new)?;
                let before = match &old {
                    Some(OldTuple::Full(cells)) | Some(OldTuple::Key(cells)) => {
                        Some(row(lsn, &schema, cells)?)
                    }
                    None => None,
                };
                if let (Some(OldTuple::Full(_)), Some(b)) = (&old, &before) {
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
            Message::Delete { relation, old } => {
                let schema = self.relation(lsn, relation)?;
                let cells = match &old {
                    OldTuple::Full(c) | OldTuple::Key(c) => c,
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
            Message::Truncate { relations, .. } => {
                for oid in relations {
                    let schema = self.relation(lsn, oid)?;
                    let source = self.source(schema.table());
                    out.push(Output::Event(
                        schema,
                        ChangeEvent {
                            op: Op::Truncate,
                            before: None,
                            after: None,
                            source,
                        },
                    ));
                }
            }
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
    values::parse(text, ty)
}
