//! Near-data aggregation: a named SQL transform over a batch's changes, run with DataFusion in
//! the origin region so only its (small) result crosses regions.
//!
//! The transform sees one table, `changes`: `_op` (`c`, `u`, `d`, `r`, `t`), `_lsn`, `_offset`,
//! and the after image's columns by name (null for deletes and truncates). The result is shipped
//! as an Arrow IPC stream (zstd-compressed, with a manifest) to `<prefix>.agg.<name>`.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::writer::StreamWriter;
use datafusion::prelude::SessionContext;
use ferry_schemas::Datum;

use crate::batch::columnar;
use crate::batch::Entry;
use crate::config::Transform;

/// A transform that could not run over a batch: its SQL, or the batch's columns. The same
/// batch fails the same way every time.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransformError(String);

fn te(e: impl std::fmt::Display) -> TransformError {
    TransformError(e.to_string())
}

/// Builds the `changes` table of a batch (columns of the newest schema version, by name).
pub fn changes_table(entries: &[Entry]) -> Result<RecordBatch, TransformError> {
    let Some(last) = entries.last() else {
        return Err(TransformError("empty batch".into()));
    };
    let table = last.schema.table();
    let mut fields = vec![
        Field::new("_op", DataType::Utf8, false),
        Field::new("_lsn", DataType::Int64, false),
        Field::new("_offset", DataType::Int64, false),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            entries.iter().map(|e| e.event.op.code()),
        )),
        Arc::new(Int64Array::from_iter_values(
            entries.iter().map(|e| e.event.source.lsn as i64),
        )),
        Arc::new(Int64Array::from_iter_values(
            entries.iter().map(|e| e.offset),
        )),
    ];
    for c in &table.columns {
        let values: Vec<Option<&Datum>> = entries
            .iter()
            .map(|e| {
                let i = e
                    .schema
                    .table()
                    .columns
                    .iter()
                    .position(|x| x.name == c.name && x.ty == c.ty)?;
                e.event.after.as_ref().and_then(|a| a.get(i))
            })
            .collect();
        let one = ferry_schemas::TableSchema {
            database: table.database.clone(),
            id: table.id.clone(),
            columns: vec![c.clone()],
        };
        let events: Vec<ferry_schemas::ChangeEvent> = values
            .iter()
            .map(|d| ferry_schemas::ChangeEvent {
                op: ferry_schemas::Op::Create,
                before: None,
                after: Some(vec![d.cloned().unwrap_or(Datum::Null)]),
                source: last.event.source.clone(),
            })
            .collect();
        let refs: Vec<(i64, &ferry_schemas::ChangeEvent)> = events.iter().map(|e| (0, e)).collect();
        let b = columnar::to_batch(&one, &refs).map_err(te)?;
        fields.push(Field::new(&c.name, columnar::arrow_type(&c.ty), true));
        cols.push(b.column(columnar::META_COLUMNS).clone());
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(te)
}

/// Runs a transform over a batch; returns its result as an Arrow IPC stream.
pub async fn run(t: &Transform, entries: &[Entry]) -> Result<Vec<u8>, TransformError> {
    let batch = changes_table(entries)?;
    let ctx = SessionContext::new();
    ctx.register_batch("changes", batch).map_err(te)?;
    let df = ctx.sql(&t.sql).await.map_err(te)?;
    let schema: Arc<Schema> = Arc::new(df.schema().as_arrow().clone());
    let results = df.collect().await.map_err(te)?;
    let mut out = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut out, &schema).map_err(te)?;
        for b in &results {
            w.write(b).map_err(te)?;
        }
        w.finish().map_err(te)?;
    }
    Ok(out)
}
