//! Change events: one row-level change with its images and its source.

use std::fmt;

/// What happened to a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Insert (`c`reate).
    Create,
    /// Update.
    Update,
    /// Delete.
    Delete,
    /// Snapshot `r`ead: the row as it stood when the snapshot was taken.
    Read,
    /// Truncate of the whole table; carries no row.
    Truncate,
}

impl Op {
    /// The one-letter code used on the wire (`c`, `u`, `d`, `r`, `t`).
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }

    /// The position of this op in the Avro enum `ferry.Op` (symbols c, u, d, r, t).
    pub fn avro_index(self) -> usize {
        match self {
            Op::Create => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Read => 3,
            Op::Truncate => 4,
        }
    }

    /// The op for an Avro enum index; `None` for an index outside c, u, d, r, t.
    pub fn from_avro_index(i: usize) -> Option<Op> {
        [Op::Create, Op::Update, Op::Delete, Op::Read, Op::Truncate]
            .get(i)
            .copied()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One column value. Logical types are already reduced to their Avro representation
/// (dates to days, times and timestamps to microseconds, numerics and uuids to text).
#[derive(Clone, Debug, PartialEq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change and that the source did not send. It is written as
    /// null and named in the event's `unchanged_toast` list, never replaced by a made-up value.
    UnchangedToast,
    /// `boolean`.
    Bool(bool),
    /// `int` (int2, int4, date).
    Int(i32),
    /// `long` (int8, time, timestamps).
    Long(i64),
    /// `float`.
    Float(f32),
    /// `double`.
    Double(f64),
    /// `string` (text, numeric, uuid, json, enum labels, other types' text form).
    Text(String),
    /// `bytes`.
    Bytes(Vec<u8>),
    /// An array; elements may be [`Datum::Null`].
    Array(Vec<Datum>),
}

/// Where a change came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The region the source database lives in (from configuration).
    pub region: String,
    /// The source database name.
    pub database: String,
    /// The source schema.
    pub schema: String,
    /// The source table.
    pub table: String,
    /// Commit LSN of the transaction (for snapshot rows: the slot's consistent point, or the
    /// high watermark of the chunk).
    pub lsn: u64,
    /// Position of this change inside its transaction, so (lsn, seq) orders all changes.
    pub seq: u64,
    /// Transaction id, when known.
    pub txid: Option<i64>,
    /// Commit time in microseconds since the Unix epoch, when known.
    pub commit_ts_us: Option<i64>,
    /// True for rows read by a snapshot rather than from the change stream.
    pub snapshot: bool,
}

/// One row-level change of one table.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeEvent {
    /// What happened.
    pub op: Op,
    /// The row before the change, when the source provides it (REPLICA IDENTITY FULL, or the
    /// old key of a delete). Columns not provided are [`Datum::Null`].
    pub before: Option<Vec<Datum>>,
    /// The row after the change (absent for deletes and truncates).
    pub after: Option<Vec<Datum>>,
    /// Where it came from.
    pub source: Source,
}

impl ChangeEvent {
    /// The image that carries the row's key: `after` when present, else `before`.
    pub fn key_image(&self) -> Option<&[Datum]> {
        self.after.as_deref().or(self.before.as_deref())
    }
}
