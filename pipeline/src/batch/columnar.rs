//! Change events ↔ Arrow columns: the shipped representation of a row group.
//!
//! One row per change. Metadata columns (`_op`, `_lsn`, `_seq`, `_offset`, `_txid`,
//! `_commit_ts_us`, `_snapshot`, `_has_before`, `_has_after`, `_toast`) are followed by the after
//! image (`a0`, `a1`, …) and the before image (`b0`, `b1`, …), one column per table column, typed
//! like the Avro field. Then, for each image, one `Utf8` column per column whose type has a
//! text form (`a3_text`, `b3_text`: see `ColumnType::has_text_form`): a value the typed column
//! cannot hold (a two-dimensional array, a timestamp after 294247-01-10) is null there and its
//! Postgres text is here. Per-batch constants (region, database, table) live in the manifest and
//! the schema, not in every row. Columns that are mostly null (before images) or repeat
//! (metadata) cost almost nothing after zstd.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array,
    ListArray, StringArray, UInt8Array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use ferry_schemas::{ChangeEvent, ColumnType, Datum, Op, Source, TableSchema};

/// A row group that does not convert.
#[derive(Debug, thiserror::Error)]
pub enum ColumnarError {
    /// Arrow refused the arrays.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// A value does not match its column's type.
    #[error("column {column}: {reason}")]
    Shape {
        /// The column.
        column: String,
        /// What was wrong.
        reason: String,
    },
}

/// The Arrow type of a column.
pub fn arrow_type(ty: &ColumnType) -> DataType {
    match ty {
        ColumnType::Int2 | ColumnType::Int4 | ColumnType::Date => DataType::Int32,
        ColumnType::Int8 | ColumnType::Time | ColumnType::Timestamp | ColumnType::TimestampTz => {
            DataType::Int64
        }
        ColumnType::Float4 => DataType::Float32,
        ColumnType::Float8 => DataType::Float64,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Bytea => DataType::Binary,
        ColumnType::Array(inner) => {
            DataType::List(Arc::new(Field::new("item", arrow_type(inner), true)))
        }
        _ => DataType::Utf8,
    }
}

/// The Arrow schema of a table version's row groups.
pub fn arrow_schema(table: &TableSchema) -> SchemaRef {
    let mut fields = vec![
        Field::new("_op", DataType::UInt8, false),
        Field::new("_lsn", DataType::Int64, false),
        Field::new("_seq", DataType::Int64, false),
        Field::new("_offset", DataType::Int64, false),
        Field::new("_txid", DataType::Int64, true),
        Field::new("_commit_ts_us", DataType::Int64, true),
        Field::new("_snapshot", DataType::Boolean, false),
        Field::new("_has_before", DataType::Boolean, false),
        Field::new("_has_after", DataType::Boolean, false),
        Field::new("_toast", DataType::Utf8, true),
    ];
    for prefix in ["a", "b"] {
        for (i, c) in table.columns.iter().enumerate() {
            fields.push(Field::new(format!("{prefix}{i}"), arrow_type(&c.ty), true));
        }
    }
    for prefix in ["a", "b"] {
        for i in text_form_columns(table) {
            fields.push(Field::new(text_column(prefix, i), DataType::Utf8, true));
        }
    }
    Arc::new(Schema::new(fields))
}

/// The positions of the columns whose type has a text form, in column order.
fn text_form_columns(table: &TableSchema) -> impl Iterator<Item = usize> + '_ {
    (0..table.columns.len()).filter(|&i| table.columns[i].ty.has_text_form())
}

/// The name of the text column of image `prefix`'s column `i`.
fn text_column(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}_text")
}

/// Every `Int64` column (positions, timestamps, bigint keys) is stored as the difference to the
/// previous non-null value of the column (the first as is), wrapping on overflow. Positions and
/// serial keys then become runs of small constants, which zstd reduces to almost nothing;
/// unrelated values cost what they cost. Readers undo it with a running sum.
fn delta_encode(values: &Int64Array) -> Int64Array {
    let mut prev = 0i64;
    values
        .iter()
        .map(|v| {
            v.map(|x| {
                let d = x.wrapping_sub(prev);
                prev = x;
                d
            })
        })
        .collect()
}

fn delta_decode(deltas: &Int64Array) -> Int64Array {
    let mut prev = 0i64;
    deltas
        .iter()
        .map(|v| {
            v.map(|d| {
                prev = prev.wrapping_add(d);
                prev
            })
        })
        .collect()
}

/// Applies `f` to every top-level `Int64` column of a batch.
fn map_int64(
    batch: &RecordBatch,
    f: fn(&Int64Array) -> Int64Array,
) -> Result<RecordBatch, ColumnarError> {
    let cols = batch
        .columns()
        .iter()
        .map(|c| match c.as_any().downcast_ref::<Int64Array>() {
            Some(a) => Arc::new(f(a)) as ArrayRef,
            None => c.clone(),
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), cols)?)
}

/// The shipped form of a row group: `Int64` columns delta-encoded.
pub fn to_wire(batch: &RecordBatch) -> Result<RecordBatch, ColumnarError> {
    map_int64(batch, delta_encode)
}

/// Undoes [`to_wire`].
pub fn from_wire(batch: &RecordBatch) -> Result<RecordBatch, ColumnarError> {
    map_int64(batch, delta_decode)
}

/// Index of the first after-image column.
pub const META_COLUMNS: usize = 10;

fn shape(column: &str, reason: impl Into<String>) -> ColumnarError {
    ColumnarError::Shape {
        column: column.into(),
        reason: reason.into(),
    }
}

/// Builds one column from optional datums (`None`, [`Datum::Null`] and
/// [`Datum::UnchangedToast`] are all null here).
fn present<'a>(d: &Option<&'a Datum>) -> Option<&'a Datum> {
    match d {
        Some(Datum::Null | Datum::UnchangedToast) | None => None,
        Some(d) => Some(*d),
    }
}

fn build(
    column: &str,
    ty: &ColumnType,
    values: &[Option<&Datum>],
) -> Result<ArrayRef, ColumnarError> {
    macro_rules! prim {
        ($array:ty, $variant:ident) => {{
            let v = values
                .iter()
                .map(|d| match present(d) {
                    None => Ok(None),
                    Some(Datum::$variant(x)) => Ok(Some(x.clone())),
                    Some(other) => Err(shape(column, format!("unexpected {other:?}"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(<$array>::from(v)) as ArrayRef
        }};
    }
    Ok(match arrow_type(ty) {
        DataType::Int32 => prim!(Int32Array, Int),
        DataType::Int64 => prim!(Int64Array, Long),
        DataType::Float32 => prim!(Float32Array, Float),
        DataType::Float64 => prim!(Float64Array, Double),
        DataType::Boolean => prim!(BooleanArray, Bool),
        DataType::Binary => {
            let v = values
                .iter()
                .map(|d| match present(d) {
                    None => Ok(None),
                    Some(Datum::Bytes(b)) => Ok(Some(b.as_slice())),
                    Some(other) => Err(shape(column, format!("unexpected {other:?}"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(BinaryArray::from(v))
        }
        DataType::Utf8 => {
            let v = values
                .iter()
                .map(|d| match present(d) {
                    None => Ok(None),
                    Some(Datum::Text(t)) => Ok(Some(t.as_str())),
                    Some(other) => Err(shape(column, format!("unexpected {other:?}"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(StringArray::from(v))
        }
        DataType::List(field) => {
            let ColumnType::Array(inner) = ty else {
                return Err(shape(column, "list without element type"));
            };
            let mut items: Vec<Option<&Datum>> = Vec::new();
            let mut lengths = Vec::with_capacity(values.len());
            let mut valid = Vec::with_capacity(values.len());
            for d in values {
                match present(d) {
                    None => {
                        lengths.push(0);
                        valid.push(false);
                    }
                    Some(Datum::Array(xs)) => {
                        lengths.push(xs.len());
                        valid.push(true);
                        items.extend(xs.iter().map(Some));
                    }
                    Some(other) => return Err(shape(column, format!("unexpected {other:?}"))),
                }
            }
            let child = build(column, inner, &items)?;
            Arc::new(ListArray::try_new(
                field,
                OffsetBuffer::from_lengths(lengths),
                child,
                Some(NullBuffer::from(valid)),
            )?)
        }
        other => return Err(shape(column, format!("no mapping for {other}"))),
    })
}

/// Converts events (with their origin offsets) of one table version to a row group.
pub fn to_batch(
    table: &TableSchema,
    events: &[(i64, &ChangeEvent)],
) -> Result<RecordBatch, ColumnarError> {
    let schema = arrow_schema(table);
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(UInt8Array::from_iter_values(
            events.iter().map(|(_, e)| e.op.avro_index() as u8),
        )),
        Arc::new(Int64Array::from_iter_values(
            events.iter().map(|(_, e)| e.source.lsn as i64),
        )),
        Arc::new(Int64Array::from_iter_values(
            events.iter().map(|(_, e)| e.source.seq as i64),
        )),
        Arc::new(Int64Array::from_iter_values(events.iter().map(|(o, _)| *o))),
        Arc::new(Int64Array::from(
            events
                .iter()
                .map(|(_, e)| e.source.txid)
                .collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            events
                .iter()
                .map(|(_, e)| e.source.commit_ts_us)
                .collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            events
                .iter()
                .map(|(_, e)| e.source.snapshot)
                .collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            events
                .iter()
                .map(|(_, e)| e.before.is_some())
                .collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            events
                .iter()
                .map(|(_, e)| e.after.is_some())
                .collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            events
                .iter()
                .map(|(_, e)| {
                    let toasted: Vec<String> = e
                        .after
                        .iter()
                        .flatten()
                        .enumerate()
                        .filter(|(_, d)| matches!(d, Datum::UnchangedToast))
                        .map(|(i, _)| i.to_string())
                        .collect();
                    (!toasted.is_empty()).then(|| toasted.join(","))
                })
                .collect::<Vec<_>>(),
        )),
    ];
    let values = |image: usize, i: usize| -> Vec<Option<&Datum>> {
        events
            .iter()
            .map(|(_, e)| {
                let img = if image == 0 { &e.after } else { &e.before };
                img.as_ref().and_then(|r| r.get(i))
            })
            .collect()
    };
    for image in [0, 1] {
        for (i, c) in table.columns.iter().enumerate() {
            let mut values = values(image, i);
            if c.ty.has_text_form() {
                // Text goes to the text column; the typed one is null there.
                for v in &mut values {
                    if matches!(v, Some(Datum::Text(_))) {
                        *v = None;
                    }
                }
            }
            cols.push(build(&c.name, &c.ty, &values)?);
        }
    }
    for image in [0, 1] {
        for i in text_form_columns(table) {
            let texts: Vec<Option<&str>> = values(image, i)
                .into_iter()
                .map(|v| match v {
                    Some(Datum::Text(t)) => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            cols.push(Arc::new(StringArray::from(texts)));
        }
    }
    Ok(RecordBatch::try_new(schema, cols)?)
}

fn datum_at(
    column: &str,
    ty: &ColumnType,
    array: &dyn Array,
    i: usize,
) -> Result<Datum, ColumnarError> {
    if array.is_null(i) {
        return Ok(Datum::Null);
    }
    let wrong = || {
        shape(
            column,
            format!("array type {} does not match {ty:?}", array.data_type()),
        )
    };
    macro_rules! get {
        ($array:ty, $variant:ident) => {
            Datum::$variant(
                array
                    .as_any()
                    .downcast_ref::<$array>()
                    .ok_or_else(wrong)?
                    .value(i)
                    .to_owned(),
            )
        };
    }
    Ok(match arrow_type(ty) {
        DataType::Int32 => get!(Int32Array, Int),
        DataType::Int64 => get!(Int64Array, Long),
        DataType::Float32 => get!(Float32Array, Float),
        DataType::Float64 => get!(Float64Array, Double),
        DataType::Boolean => get!(BooleanArray, Bool),
        DataType::Binary => get!(BinaryArray, Bytes),
        DataType::Utf8 => get!(StringArray, Text),
        DataType::List(_) => {
            let ColumnType::Array(inner) = ty else {
                return Err(wrong());
            };
            let list = array
                .as_any()
                .downcast_ref::<ListArray>()
                .ok_or_else(wrong)?;
            let child = list.value(i);
            (0..child.len())
                .map(|j| datum_at(column, inner, child.as_ref(), j))
                .collect::<Result<Vec<_>, _>>()
                .map(Datum::Array)?
        }
        _ => return Err(wrong()),
    })
}

fn col<T: 'static>(batch: &RecordBatch, i: usize) -> Result<&T, ColumnarError> {
    batch
        .column(i)
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| shape(batch.schema().field(i).name(), "unexpected array type"))
}

/// Converts a row group back to events (with their origin offsets).
pub fn from_batch(
    table: &TableSchema,
    region: &str,
    batch: &RecordBatch,
) -> Result<Vec<(i64, ChangeEvent)>, ColumnarError> {
    let n_cols = table.columns.len();
    let n_text = text_form_columns(table).count();
    // Payloads from before text columns existed have none.
    let with_text = batch.num_columns() == META_COLUMNS + 2 * (n_cols + n_text);
    if !with_text && batch.num_columns() != META_COLUMNS + 2 * n_cols {
        return Err(shape(
            "*",
            format!(
                "row group has {} columns, table version needs {}",
                batch.num_columns(),
                META_COLUMNS + 2 * (n_cols + n_text)
            ),
        ));
    }
    // Per image, per column: its text column, if it has one.
    let texts = |prefix: &str| -> Result<Vec<Option<&StringArray>>, ColumnarError> {
        let mut out = vec![None; n_cols];
        if with_text {
            for i in text_form_columns(table) {
                let name = text_column(prefix, i);
                let idx = batch
                    .schema()
                    .index_of(&name)
                    .map_err(|_| shape(&name, "missing text column"))?;
                out[i] = Some(col::<StringArray>(batch, idx)?);
            }
        }
        Ok(out)
    };
    let (after_text, before_text) = (texts("a")?, texts("b")?);
    let op = col::<UInt8Array>(batch, 0)?;
    let lsn = col::<Int64Array>(batch, 1)?;
    let seq = col::<Int64Array>(batch, 2)?;
    let offset = col::<Int64Array>(batch, 3)?;
    let txid = col::<Int64Array>(batch, 4)?;
    let ts = col::<Int64Array>(batch, 5)?;
    let snapshot = col::<BooleanArray>(batch, 6)?;
    let has_before = col::<BooleanArray>(batch, 7)?;
    let has_after = col::<BooleanArray>(batch, 8)?;
    let toast = col::<StringArray>(batch, 9)?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let image =
            |base: usize, text: &[Option<&StringArray>]| -> Result<Vec<Datum>, ColumnarError> {
                table
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match text[i] {
                        Some(t) if !t.is_null(r) => Ok(Datum::Text(t.value(r).to_string())),
                        _ => datum_at(&c.name, &c.ty, batch.column(base + i).as_ref(), r),
                    })
                    .collect()
            };
        let mut after = if has_after.value(r) {
            Some(image(META_COLUMNS, &after_text)?)
        } else {
            None
        };
        if !toast.is_null(r) {
            if let Some(a) = after.as_mut() {
                for idx in toast.value(r).split(',') {
                    let i: usize = idx
                        .parse()
                        .map_err(|_| shape("_toast", format!("bad column index {idx:?}")))?;
                    *a.get_mut(i).ok_or_else(|| {
                        shape("_toast", format!("column index {i} out of range"))
                    })? = Datum::UnchangedToast;
                }
            }
        }
        let before = if has_before.value(r) {
            Some(image(META_COLUMNS + n_cols, &before_text)?)
        } else {
            None
        };
        let op = Op::from_avro_index(op.value(r) as usize)
            .ok_or_else(|| shape("_op", format!("op {} out of range", op.value(r))))?;
        out.push((
            offset.value(r),
            ChangeEvent {
                op,
                before,
                after,
                source: Source {
                    region: region.to_string(),
                    database: table.database.clone(),
                    schema: table.id.schema.clone(),
                    table: table.id.table.clone(),
                    lsn: lsn.value(r) as u64,
                    seq: seq.value(r) as u64,
                    txid: (!txid.is_null(r)).then(|| txid.value(r)),
                    commit_ts_us: (!ts.is_null(r)).then(|| ts.value(r)),
                    snapshot: snapshot.value(r),
                },
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_schemas::{Column, TableId};

    #[test]
    fn deltas_round_trip_with_nulls_and_overflow() {
        let a = Int64Array::from(vec![
            Some(i64::MIN),
            None,
            Some(i64::MAX),
            Some(5),
            None,
            Some(6),
        ]);
        let d = delta_encode(&a);
        assert_eq!(d.null_count(), 2);
        assert_eq!(delta_decode(&d), a);
    }

    #[test]
    fn events_round_trip_through_arrow() {
        let c = |name: &str, ty: ColumnType, key: bool| Column {
            name: name.into(),
            pg_type: "x".into(),
            type_oid: 0,
            type_mod: -1,
            missing: None,
            attnum: None,
            ty,
            key,
            key_order: 0,
        };
        let table = TableSchema {
            database: "db".into(),
            id: TableId::new("s", "t"),
            columns: vec![
                c("id", ColumnType::Int8, true),
                c("f", ColumnType::Float4, false),
                c("b", ColumnType::Bytea, false),
                c("tags", ColumnType::Array(Box::new(ColumnType::Text)), false),
                c("n", ColumnType::Array(Box::new(ColumnType::Int4)), false),
                c("big", ColumnType::Text, false),
                c("ok", ColumnType::Bool, false),
                c("at", ColumnType::TimestampTz, false),
            ],
        };
        let source = |lsn| Source {
            region: "eu".into(),
            database: "db".into(),
            schema: "s".into(),
            table: "t".into(),
            lsn,
            seq: 2,
            txid: Some(9),
            commit_ts_us: None,
            snapshot: false,
        };
        let full = vec![
            Datum::Long(1),
            Datum::Float(0.5),
            Datum::Bytes(vec![1, 2]),
            Datum::Array(vec![Datum::Text("a".into()), Datum::Null]),
            Datum::Array(vec![]),
            Datum::UnchangedToast,
            Datum::Bool(false),
            Datum::Text("294276-12-31 23:59:59.999999+00".into()),
        ];
        // Values only the text columns hold, in the before image.
        let nulls = vec![
            Datum::Long(2),
            Datum::Null,
            Datum::Null,
            Datum::Null,
            Datum::Text("{{1,2},{3,NULL}}".into()),
            Datum::Null,
            Datum::Null,
            Datum::Long(5),
        ];
        let events = [
            ChangeEvent {
                op: Op::Update,
                before: Some(nulls.clone()),
                after: Some(full),
                source: source(7),
            },
            ChangeEvent {
                op: Op::Delete,
                before: Some(nulls),
                after: None,
                source: source(8),
            },
            ChangeEvent {
                op: Op::Truncate,
                before: None,
                after: None,
                source: source(9),
            },
        ];
        let input: Vec<(i64, &ChangeEvent)> = events
            .iter()
            .enumerate()
            .map(|(i, e)| (i as i64 + 40, e))
            .collect();
        let batch = to_batch(&table, &input).expect("to arrow");
        assert_eq!(batch.num_rows(), 3);
        let wire = to_wire(&batch).expect("delta");
        assert_ne!(wire, batch, "positions are delta-encoded");
        assert_eq!(from_wire(&wire).expect("undelta"), batch);
        let back = from_batch(&table, "eu", &batch).expect("from arrow");
        let expected: Vec<(i64, ChangeEvent)> =
            input.iter().map(|(o, e)| (*o, (*e).clone())).collect();
        assert_eq!(back, expected);
        // A row group written before text columns existed still reads.
        let typed_only = batch.project(&(0..META_COLUMNS + 16).collect::<Vec<_>>());
        let old = from_batch(&table, "eu", &typed_only.expect("project")).expect("old shape");
        assert_eq!(
            old[1].1.before.as_ref().map(|b| b[7].clone()),
            Some(Datum::Long(5))
        );
    }
}
