//! Table schemas: one version of a source table's columns.

use std::fmt;

/// A source table's qualified name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId {
    /// The Postgres schema (namespace), e.g. `public`.
    pub schema: String,
    /// The table name.
    pub table: String,
}

impl TableId {
    /// A table id from its schema and name.
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            table: table.into(),
        }
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Text that is not `schema.table`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not schema.table")]
pub struct NotATable(pub String);

impl std::str::FromStr for TableId {
    type Err = NotATable;

    /// `schema.table`, split at the first dot (so a table name may hold dots; a schema name
    /// may not). Both parts must be non-empty.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('.') {
            Some((schema, table)) if !schema.is_empty() && !table.is_empty() => {
                Ok(TableId::new(schema, table))
            }
            _ => Err(NotATable(s.to_string())),
        }
    }
}

/// How a column's values are represented in events and in Avro.
///
/// Exact types stay exact: `numeric` is carried as its decimal text, never as a float.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnType {
    /// `int2`, as Avro `int`.
    Int2,
    /// `int4`, as Avro `int`.
    Int4,
    /// `int8`, as Avro `long`.
    Int8,
    /// `float4`, as Avro `float`.
    Float4,
    /// `float8`, as Avro `double`.
    Float8,
    /// `bool`, as Avro `boolean`.
    Bool,
    /// `numeric`, as its exact decimal text (also `NaN`, `Infinity`).
    Numeric,
    /// `text`, `varchar`, `char`/`bpchar`, `name`.
    Text,
    /// `bytea`, as Avro `bytes`.
    Bytea,
    /// `date`, as Avro `int` days since 1970-01-01 (logical type `date`).
    Date,
    /// `time`, as Avro `long` microseconds since midnight (logical type `time-micros`).
    Time,
    /// `timestamp`, as Avro `long` µs (logical type `local-timestamp-micros`).
    Timestamp,
    /// `timestamptz`, as Avro `long` µs since the Unix epoch, UTC (`timestamp-micros`).
    TimestampTz,
    /// `uuid`, as its canonical text (logical type `uuid`).
    Uuid,
    /// `json` or `jsonb`, as the JSON text.
    Json,
    /// A Postgres enum; values are their labels.
    Enum,
    /// An array of the element type: one-dimensional with lower bound 1 as an Avro `array`;
    /// any other shape (more dimensions, other bounds) as its text (see
    /// [`ColumnType::has_text_form`]).
    Array(Box<ColumnType>),
    /// Anything else: the value's Postgres text form; the type name is in [`Column::pg_type`].
    Other,
}

impl ColumnType {
    /// Whether some of the type's values do not fit its typed form and travel as their
    /// Postgres text instead ([`crate::Datum::Text`], a `string` branch in Avro): arrays that
    /// are not one-dimensional from 1, timestamps after 294247-01-10 (beyond microseconds since
    /// 1970), and arrays whose elements are such values. Every other type's values all fit.
    pub fn has_text_form(&self) -> bool {
        matches!(
            self,
            ColumnType::Array(_) | ColumnType::Timestamp | ColumnType::TimestampTz
        )
    }
}

impl fmt::Display for ColumnType {
    /// The compact name recorded in schemas (`ferry_type`): `int4`, `numeric`, `array<text>`, …
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ColumnType::Int2 => "int2",
            ColumnType::Int4 => "int4",
            ColumnType::Int8 => "int8",
            ColumnType::Float4 => "float4",
            ColumnType::Float8 => "float8",
            ColumnType::Bool => "bool",
            ColumnType::Numeric => "numeric",
            ColumnType::Text => "text",
            ColumnType::Bytea => "bytea",
            ColumnType::Date => "date",
            ColumnType::Time => "time",
            ColumnType::Timestamp => "timestamp",
            ColumnType::TimestampTz => "timestamptz",
            ColumnType::Uuid => "uuid",
            ColumnType::Json => "json",
            ColumnType::Enum => "enum",
            ColumnType::Other => "other",
            ColumnType::Array(inner) => return write!(f, "array<{inner}>"),
        };
        f.write_str(name)
    }
}

impl std::str::FromStr for ColumnType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(inner) = s.strip_prefix("array<").and_then(|r| r.strip_suffix('>')) {
            return Ok(ColumnType::Array(Box::new(inner.parse()?)));
        }
        Ok(match s {
            "int2" => ColumnType::Int2,
            "int4" => ColumnType::Int4,
            "int8" => ColumnType::Int8,
            "float4" => ColumnType::Float4,
            "float8" => ColumnType::Float8,
            "bool" => ColumnType::Bool,
            "numeric" => ColumnType::Numeric,
            "text" => ColumnType::Text,
            "bytea" => ColumnType::Bytea,
            "date" => ColumnType::Date,
            "time" => ColumnType::Time,
            "timestamp" => ColumnType::Timestamp,
            "timestamptz" => ColumnType::TimestampTz,
            "uuid" => ColumnType::Uuid,
            "json" => ColumnType::Json,
            "enum" => ColumnType::Enum,
            "other" => ColumnType::Other,
            _ => return Err(format!("unknown column type {s:?}")),
        })
    }
}

/// One column of a table version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// The column's name in the source database.
    pub name: String,
    /// The Postgres type name as the catalog spells it (`int4`, `_text`, `mood`, `inet`, …).
    pub pg_type: String,
    /// The Postgres type oid (to recognise type changes that keep the name).
    pub type_oid: u32,
    /// The type modifier (`atttypmod`: a length, precision or scale), `-1` when none.
    pub type_mod: i32,
    /// The value rows that existed when the column was added with a default hold (Postgres's
    /// `attmissingval`, as text), so the destination's existing rows get it too.
    pub missing: Option<String>,
    /// The column's number in the source table (`attnum`): it stays the same across a
    /// rename and is never reused, so the destination can tell a rename from a drop and an
    /// add. `None` when unknown.
    pub attnum: Option<i16>,
    /// How the column is represented.
    pub ty: ColumnType,
    /// Whether the column is part of the table's key (primary key, else replica identity).
    pub key: bool,
    /// The column's place in the key as declared (`PRIMARY KEY (b, a)`: `b` is 0, `a` 1), which
    /// is the order of the key's index. Equal places (versions published before it was
    /// recorded, non-key columns) fall back to column order.
    pub key_order: u16,
}

/// One version of a source table: its columns in ordinal order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    /// The source database name.
    pub database: String,
    /// The qualified table name.
    pub id: TableId,
    /// Columns in the order the source sends them.
    pub columns: Vec<Column>,
}

impl TableSchema {
    /// Indexes of the key columns, in declared key order (see [`Column::key_order`]).
    pub fn key_indexes(&self) -> Vec<usize> {
        let mut keys: Vec<usize> = (0..self.columns.len())
            .filter(|&i| self.columns[i].key)
            .collect();
        keys.sort_by_key(|&i| (self.columns[i].key_order, i));
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_ids_parse_back_from_their_text() {
        for (schema, table) in [("public", "t"), ("My Schema", "odd.name"), ("s", "\"q\"")] {
            let id = TableId::new(schema, table);
            assert_eq!(id.to_string().parse::<TableId>(), Ok(id));
        }
        for bad in ["", "nodot", ".t", "s.", "."] {
            assert_eq!(
                bad.parse::<TableId>(),
                Err(NotATable(bad.to_string())),
                "{bad:?}"
            );
        }
    }
}
