//! Avro schemas per table version, and the single-object encoding of keys and values.
//!
//! A table version gets two schemas: `<ns>.Key` (the key columns, never null) and
//! `<ns>.Envelope` (op, before, after, source, unchanged_toast), where `<ns>` is
//! `ferry.<database>.<schema>.<table>` with every name in its injective Avro form ([`avro_name`]).
//! Fields carry their Postgres type (`pg_type`, `type_oid`), the original column name
//! (`pg_name`), Ferry's column type (`ferry_type`) and whether they are part of the key (`key`);
//! the envelope carries `pg_database`, `pg_schema` and `pg_table`. Avro readers ignore these
//! attributes and they are not part of the fingerprint; they let [`EncodedSchema::from_json`]
//! rebuild the exact table version from the published schema alone. A column whose type has a
//! text form (arrays, timestamps: `ColumnType::has_text_form`) is a union with a last `string`
//! branch, which carries the Postgres text of a value the typed branch cannot hold (a
//! two-dimensional array, a timestamp after 294247-01-10).
//!
//! Records are written with the specification's single-object encoding: `C3 01`, the 8-byte
//! little-endian CRC-64-AVRO (Rabin) fingerprint of the schema's Parsing Canonical Form, then
//! the Avro binary body. The body is written here directly (no intermediate `Value` tree), which
//! keeps capture cheap; the tests decode every shape with the `apache-avro` reader.

use std::collections::HashSet;
use std::fmt;

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use serde_json::{json, Value as Json};

use crate::event::{ChangeEvent, Datum, Op};
use crate::pcf::{canonical_form, crc64_avro, PcfError};
use crate::table::{Column, ColumnType, TableSchema};

/// The two bytes that open every single-object encoded record.
pub const SINGLE_OBJECT_MARKER: [u8; 2] = [0xC3, 0x01];

/// The byte that opens every record in the Confluent wire format.
pub const CONFLUENT_MAGIC: u8 = 0;

/// How a record names its writer schema: the first bytes of every key and value Ferry writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Header {
    /// The Avro specification's single-object encoding: `C3 01` and the schema's 8-byte
    /// CRC-64-AVRO fingerprint.
    SingleObject(Fingerprint),
    /// The Confluent wire format: `00` and the schema's 4-byte big-endian id in the schema
    /// registry of the cluster the record is in.
    Confluent(u32),
}

impl Header {
    /// Appends the header to `out`.
    pub fn write(self, out: &mut Vec<u8>) {
        match self {
            Header::SingleObject(fp) => {
                out.extend_from_slice(&SINGLE_OBJECT_MARKER);
                out.extend_from_slice(&fp.0);
            }
            Header::Confluent(id) => {
                out.push(CONFLUENT_MAGIC);
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
    }

    /// Reads the header of a record; returns it and the Avro body after it.
    pub fn parse(record: &[u8]) -> Result<(Header, &[u8]), AvroError> {
        match record {
            [0xC3, 0x01, rest @ ..] if rest.len() >= 8 => {
                let mut fp = [0u8; 8];
                fp.copy_from_slice(&rest[..8]);
                Ok((Header::SingleObject(Fingerprint(fp)), &rest[8..]))
            }
            [CONFLUENT_MAGIC, a, b, c, d, body @ ..] => Ok((
                Header::Confluent(u32::from_be_bytes([*a, *b, *c, *d])),
                body,
            )),
            _ => Err(AvroError::NotSingleObject { len: record.len() }),
        }
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Header::SingleObject(fp) => write!(f, "fingerprint {fp}"),
            Header::Confluent(id) => write!(f, "schema id {id}"),
        }
    }
}

/// A schema's CRC-64-AVRO fingerprint, in the byte order single-object encoding writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 8]);

impl Fingerprint {
    /// The CRC-64-AVRO fingerprint of a schema's Parsing Canonical Form, as the specification
    /// defines both (see [`crate::pcf`]): what Java, fastavro and every other reader compute.
    pub fn of_json(schema: &Json) -> Result<Fingerprint, PcfError> {
        Ok(Fingerprint(crc64_avro(canonical_form(schema)?.as_bytes())))
    }

    /// The fingerprint Ferry wrote before it computed the canonical form itself: the
    /// `apache-avro` crate's, which keeps `logicalType` (AVRO-4004). Records written by those
    /// versions carry it; Ferry still reads them.
    pub fn legacy_of(schema: &Schema) -> Fingerprint {
        let fp = schema.fingerprint::<Rabin>();
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&fp.bytes[..8]);
        Fingerprint(bytes)
    }

    /// Reads the fingerprint from a single-object encoded record's header.
    pub fn from_record(record: &[u8]) -> Result<Fingerprint, AvroError> {
        if record.len() < 10 || record[..2] != SINGLE_OBJECT_MARKER {
            return Err(AvroError::NotSingleObject { len: record.len() });
        }
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&record[2..10]);
        Ok(Fingerprint(bytes))
    }
}

impl fmt::Display for Fingerprint {
    /// Lower-case hex of the 8 bytes as written on the wire; this is the schema topic's key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Encoding errors. All are permanent: they describe data or a schema, not a passing fault.
#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    /// The generated schema did not parse (a bug in schema generation, reported with its JSON).
    #[error("generated Avro schema for {table} is invalid: {reason}")]
    InvalidSchema {
        /// The table.
        table: String,
        /// The parser's complaint.
        reason: String,
    },
    /// A value does not fit its column's type.
    #[error("column {column:?} of {table}: expected {expected}, got {got}")]
    TypeMismatch {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The Avro type the schema declares.
        expected: &'static str,
        /// What the value was.
        got: String,
    },
    /// Bytes that do not decode with the schema their header names.
    #[error("{table}: record does not decode at byte {offset}: {reason}")]
    Decode {
        /// The table.
        table: String,
        /// Byte offset in the record.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
    /// A published schema that Ferry cannot read back.
    #[error("schema is not a Ferry envelope schema: {0}")]
    NotFerrySchema(String),
    /// A key column was null or missing.
    #[error("key column {column:?} of {table} is null; a key must be complete")]
    NullKey {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// An image has a different number of columns than the schema.
    #[error("{table}: row has {got} columns, schema has {expected}")]
    Arity {
        /// The table.
        table: String,
        /// Columns in the schema.
        expected: usize,
        /// Columns in the row.
        got: usize,
    },
    /// Bytes that are not a single-object encoded record.
    #[error("not an Avro record Ferry can read ({len} bytes; expected C3 01 + an 8-byte fingerprint, or 00 + a 4-byte schema id)")]
    NotSingleObject {
        /// Length of what was given.
        len: usize,
    },
}

/// The Avro schemas of one table version, ready to encode its keys and values.
#[derive(Clone, Debug)]
pub struct EncodedSchema {
    table: TableSchema,
    /// The `Envelope` schema as JSON text (what the schema topic stores).
    pub value_json: String,
    /// The `Key` schema as JSON text.
    pub key_json: String,
    /// Fingerprint of the value schema.
    pub value_fp: Fingerprint,
    /// Fingerprint of the key schema.
    pub key_fp: Fingerprint,
    /// The value schema's fingerprint as Ferry versions before the specification-exact
    /// canonical form wrote it (equal to `value_fp` for schemas without logical types).
    pub legacy_value_fp: Fingerprint,
    key_indexes: Vec<usize>,
    field_names: Vec<String>,
}

/// The Avro name of a database, schema, table or column: the name itself when it is a valid
/// one (`[A-Za-z_][A-Za-z0-9_]*`) without `__`, else its escaped form (see [`escaped`]:
/// `app-v2` is `app_v2__<crc64>`), so two names never share an Avro name (nor a fingerprint).
pub fn avro_name(name: &str) -> String {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid && !name.contains("__") {
        return name.to_string();
    }
    escaped(name, |c| c.is_ascii_alphanumeric(), '_', "__", true)
}

/// The injective form of a name that cannot be kept as it is: disallowed characters (and runs
/// of the separator) become one `sep`, then `marker` and the CRC-64-AVRO of the original name
/// in hex. Kept names never contain `marker` and escaped ones always do, so no escaped name is
/// a kept one; two escaped names are equal only if their 64-bit hashes are.
pub fn escaped(
    name: &str,
    keep: impl Fn(char) -> bool,
    sep: char,
    marker: &str,
    letter_first: bool,
) -> String {
    let mut out = String::with_capacity(name.len() + 18);
    if letter_first && !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        out.push('x');
    }
    for c in name.chars() {
        if keep(c) {
            out.push(c);
        } else if !out.ends_with(sep) {
            out.push(sep);
        }
    }
    while out.ends_with(sep) {
        out.pop();
    }
    out.push_str(marker);
    for b in crate::pcf::crc64_avro(name.as_bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

const KEY_FIELD_PREFIX: &str = "_key_";

/// The name of the envelope's field that names its key columns (`_key_` and the CRC-64-AVRO of
/// the names, in key order): the field is of type `null`, so it costs nothing in a record, and
/// its name puts the key into the schema's canonical form. Two versions that differ only in
/// their key (a primary key changed at the origin; Postgres keeps a key's columns NOT NULL, so
/// no field's type changes) get different fingerprints, and a registry's BACKWARD check
/// accepts the change (a field with a default appears, one disappears).
pub fn key_field_name(key: &[&str]) -> String {
    let mut out = KEY_FIELD_PREFIX.to_string();
    for b in crate::pcf::crc64_avro(key.join("\0").as_bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn type_json(ty: &ColumnType) -> Json {
    match ty {
        ColumnType::Int2 | ColumnType::Int4 => json!("int"),
        ColumnType::Int8 => json!("long"),
        ColumnType::Float4 => json!("float"),
        ColumnType::Float8 => json!("double"),
        ColumnType::Bool => json!("boolean"),
        ColumnType::Numeric
        | ColumnType::Text
        | ColumnType::Json
        | ColumnType::Enum
        | ColumnType::Other => json!("string"),
        ColumnType::Bytea => json!("bytes"),
        ColumnType::Date => json!({"type": "int", "logicalType": "date"}),
        ColumnType::Time => json!({"type": "long", "logicalType": "time-micros"}),
        ColumnType::Timestamp => json!({"type": "long", "logicalType": "local-timestamp-micros"}),
        ColumnType::TimestampTz => json!({"type": "long", "logicalType": "timestamp-micros"}),
        ColumnType::Uuid => json!({"type": "string", "logicalType": "uuid"}),
        ColumnType::Array(inner) => json!({"type": "array", "items": ["null", type_json(inner)]}),
    }
}

fn avro_kind(ty: &ColumnType) -> &'static str {
    match ty {
        ColumnType::Int2 | ColumnType::Int4 | ColumnType::Date => "int",
        ColumnType::Int8 | ColumnType::Time | ColumnType::Timestamp | ColumnType::TimestampTz => {
            "long"
        }
        ColumnType::Float4 => "float",
        ColumnType::Float8 => "double",
        ColumnType::Bool => "boolean",
        ColumnType::Bytea => "bytes",
        ColumnType::Array(_) => "array",
        _ => "string",
    }
}

fn source_json() -> Json {
    json!({
        "type": "record", "name": "Source", "namespace": "ferry",
        "fields": [
            {"name": "region", "type": "string"},
            {"name": "database", "type": "string"},
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            {"name": "lsn", "type": "long"},
            {"name": "seq", "type": "long"},
            {"name": "txid", "type": ["null", "long"]},
            {"name": "commit_ts_us", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}]},
            {"name": "snapshot", "type": "boolean"}
        ]
    })
}

impl EncodedSchema {
    /// Builds the key and value schemas of a table version.
    pub fn new(table: &TableSchema) -> Result<EncodedSchema, AvroError> {
        EncodedSchema::build(table, true)
    }

    /// [`EncodedSchema::new`]; without `key_field`, as versions published before the
    /// envelope named its key ([`key_field_name`]).
    fn build(table: &TableSchema, key_field: bool) -> Result<EncodedSchema, AvroError> {
        let ns = format!(
            "ferry.{}.{}.{}",
            avro_name(&table.database),
            avro_name(&table.id.schema),
            avro_name(&table.id.table)
        );
        let mut used = HashSet::new();
        let field_names: Vec<String> = table
            .columns
            .iter()
            .map(|c| {
                let base = avro_name(&c.name);
                let mut name = base.clone();
                let mut n = 1;
                while !used.insert(name.clone()) {
                    n += 1;
                    name = format!("{base}_{n}");
                }
                name
            })
            .collect();
        let field = |i: usize, nullable: bool| {
            let c = &table.columns[i];
            // A column with a text form also takes a string: the Postgres text of a value its
            // typed form cannot hold (see `ColumnType::has_text_form`).
            let mut branches = vec![type_json(&c.ty)];
            if c.ty.has_text_form() {
                branches.push(json!("string"));
            }
            if nullable {
                branches.insert(0, json!("null"));
            }
            let ty = if branches.len() == 1 {
                branches.remove(0)
            } else {
                Json::Array(branches)
            };
            let mut f = json!({
                "name": field_names[i],
                "type": ty,
                "pg_name": c.name,
                "pg_type": c.pg_type,
                "type_oid": c.type_oid,
                "ferry_type": c.ty.to_string(),
                "key": c.key,
            });
            // Only when there is one, so schemas of columns without a modifier keep their text.
            if c.type_mod != -1 {
                f["type_mod"] = json!(c.type_mod);
            }
            if let Some(m) = &c.missing {
                f["pg_missing"] = json!(m);
            }
            if let Some(n) = c.attnum {
                f["pg_attnum"] = json!(n);
            }
            if c.key {
                f["key_order"] = json!(c.key_order);
            }
            f
        };
        let key_indexes = table.key_indexes();
        let key = json!({
            "type": "record", "name": "Key", "namespace": ns,
            "fields": key_indexes.iter().map(|&i| field(i, false)).collect::<Vec<_>>(),
        });
        let row = json!({
            "type": "record", "name": "Row", "namespace": ns,
            "fields": (0..table.columns.len()).map(|i| field(i, true)).collect::<Vec<_>>(),
        });
        let mut value = json!({
            "type": "record", "name": "Envelope", "namespace": ns,
            "doc": format!("Ferry change event of {}.{}", table.database, table.id),
            "pg_database": table.database,
            "pg_schema": table.id.schema,
            "pg_table": table.id.table,
            "fields": [
                {"name": "op", "type": {"type": "enum", "name": "Op", "namespace": "ferry", "symbols": ["c", "u", "d", "r", "t"]}},
                {"name": "before", "type": ["null", row]},
                {"name": "after", "type": ["null", format!("{ns}.Row")]},
                {"name": "source", "type": source_json()},
                {"name": "unchanged_toast", "type": {"type": "array", "items": "string"},
                 "doc": "columns whose unchanged TOASTed value the source did not send; null in after"}
            ]
        });
        if key_field && !key_indexes.is_empty() {
            let names: Vec<&str> = key_indexes
                .iter()
                .map(|&i| table.columns[i].name.as_str())
                .collect();
            if let Some(fields) = value["fields"].as_array_mut() {
                fields.push(json!({
                    "name": key_field_name(&names), "type": "null", "default": null,
                    "doc": format!("always null, and nothing on the wire: names the key ({}), so a version whose key changed has its own fingerprint", names.join(", "))
                }));
            }
        }
        let parse = |j: &Json| {
            Schema::parse_str(&j.to_string()).map_err(|e| AvroError::InvalidSchema {
                table: table.id.to_string(),
                reason: e.to_string(),
            })
        };
        let fingerprint = |j: &Json| {
            Fingerprint::of_json(j).map_err(|e| AvroError::InvalidSchema {
                table: table.id.to_string(),
                reason: e.to_string(),
            })
        };
        let legacy_value_fp = Fingerprint::legacy_of(&parse(&value)?);
        parse(&key)?;
        Ok(EncodedSchema {
            table: table.clone(),
            value_json: serde_json::to_string_pretty(&value).unwrap_or_default(),
            key_json: serde_json::to_string_pretty(&key).unwrap_or_default(),
            value_fp: fingerprint(&value)?,
            key_fp: fingerprint(&key)?,
            legacy_value_fp,
            key_indexes,
            field_names,
        })
    }

    /// The table version these schemas describe.
    pub fn table(&self) -> &TableSchema {
        &self.table
    }

    /// The Avro field name used for each column, in column order.
    pub fn field_names(&self) -> &[String] {
        &self.field_names
    }

    /// Whether the table has key columns (a truncate or a keyless table has no Kafka key).
    pub fn has_key(&self) -> bool {
        !self.key_indexes.is_empty()
    }

    /// Appends the single-object encoded key of `image` to `out`.
    pub fn encode_key(&self, image: &[Datum], out: &mut Vec<u8>) -> Result<(), AvroError> {
        self.encode_key_as(Header::SingleObject(self.key_fp), image, out)
    }

    /// Appends the key of `image` to `out` behind `header` (which must name the key schema).
    pub fn encode_key_as(
        &self,
        header: Header,
        image: &[Datum],
        out: &mut Vec<u8>,
    ) -> Result<(), AvroError> {
        self.check_arity(image)?;
        header.write(out);
        for &i in &self.key_indexes {
            let column = &self.table.columns[i];
            match &image[i] {
                Datum::Null | Datum::UnchangedToast => {
                    return Err(AvroError::NullKey {
                        table: self.table.id.to_string(),
                        column: column.name.clone(),
                    })
                }
                d => self.write_present(column, d, false, out)?,
            }
        }
        Ok(())
    }

    /// Appends the single-object encoded envelope of `event` to `out`.
    pub fn encode_value(&self, event: &ChangeEvent, out: &mut Vec<u8>) -> Result<(), AvroError> {
        self.encode_value_as(Header::SingleObject(self.value_fp), event, out)
    }

    /// Appends the envelope of `event` to `out` behind `header` (which must name the value
    /// schema).
    pub fn encode_value_as(
        &self,
        header: Header,
        event: &ChangeEvent,
        out: &mut Vec<u8>,
    ) -> Result<(), AvroError> {
        header.write(out);
        write_long(out, event.op.avro_index() as i64);
        let mut toasted: Vec<&str> = Vec::new();
        for image in [&event.before, &event.after] {
            match image {
                None => write_long(out, 0),
                Some(row) => {
                    self.check_arity(row)?;
                    write_long(out, 1);
                    for (i, d) in row.iter().enumerate() {
                        let column = &self.table.columns[i];
                        match d {
                            Datum::Null => write_long(out, 0),
                            Datum::UnchangedToast => {
                                write_long(out, 0);
                                if std::ptr::eq(image, &event.after) {
                                    toasted.push(&self.field_names[i]);
                                }
                            }
                            d => self.write_present(column, d, true, out)?,
                        }
                    }
                }
            }
        }
        let s = &event.source;
        for text in [&s.region, &s.database, &s.schema, &s.table] {
            write_bytes(out, text.as_bytes());
        }
        write_long(out, s.lsn as i64);
        write_long(out, s.seq as i64);
        for opt in [s.txid, s.commit_ts_us] {
            match opt {
                None => write_long(out, 0),
                Some(v) => {
                    write_long(out, 1);
                    write_long(out, v);
                }
            }
        }
        out.push(u8::from(s.snapshot));
        if !toasted.is_empty() {
            write_long(out, toasted.len() as i64);
            for name in toasted {
                write_bytes(out, name.as_bytes());
            }
        }
        write_long(out, 0);
        Ok(())
    }

    fn check_arity(&self, row: &[Datum]) -> Result<(), AvroError> {
        if row.len() == self.table.columns.len() {
            Ok(())
        } else {
            Err(AvroError::Arity {
                table: self.table.id.to_string(),
                expected: self.table.columns.len(),
                got: row.len(),
            })
        }
    }

    /// Writes a non-null value of `column` with its union branch: the typed one (after `null`
    /// when `nullable`), or for a column with a text form, its `string` branch when the value is
    /// text.
    fn write_present(
        &self,
        column: &Column,
        d: &Datum,
        nullable: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), AvroError> {
        let typed = i64::from(nullable);
        match d {
            Datum::Text(t) if column.ty.has_text_form() => {
                write_long(out, typed + 1);
                write_bytes(out, t.as_bytes());
            }
            d => {
                if nullable || column.ty.has_text_form() {
                    write_long(out, typed);
                }
                self.write_datum(&column.name, &column.ty, d, out)?;
            }
        }
        Ok(())
    }

    fn write_datum(
        &self,
        column: &str,
        ty: &ColumnType,
        d: &Datum,
        out: &mut Vec<u8>,
    ) -> Result<(), AvroError> {
        let kind = avro_kind(ty);
        match (kind, d) {
            ("int", Datum::Int(v)) => write_long(out, i64::from(*v)),
            ("long", Datum::Long(v)) => write_long(out, *v),
            ("float", Datum::Float(v)) => out.extend_from_slice(&v.to_le_bytes()),
            ("double", Datum::Double(v)) => out.extend_from_slice(&v.to_le_bytes()),
            ("boolean", Datum::Bool(v)) => out.push(u8::from(*v)),
            ("bytes", Datum::Bytes(v)) => write_bytes(out, v),
            ("string", Datum::Text(v)) => write_bytes(out, v.as_bytes()),
            ("array", Datum::Array(items)) => {
                let ColumnType::Array(inner) = ty else {
                    unreachable!("avro_kind is array only for arrays")
                };
                if !items.is_empty() {
                    write_long(out, items.len() as i64);
                    for item in items {
                        if matches!(item, Datum::Null) {
                            write_long(out, 0);
                        } else {
                            write_long(out, 1);
                            self.write_datum(column, inner, item, out)?;
                        }
                    }
                }
                write_long(out, 0);
            }
            (expected, got) => {
                return Err(AvroError::TypeMismatch {
                    table: self.table.id.to_string(),
                    column: column.to_string(),
                    expected,
                    got: format!("{got:?}"),
                })
            }
        }
        Ok(())
    }
}

impl EncodedSchema {
    /// Rebuilds a table version from its published envelope schema (the JSON in the schema
    /// topic), so that encoding with it reproduces the same fingerprint and bytes.
    pub fn from_json(value_json: &str) -> Result<EncodedSchema, AvroError> {
        let bad = |what: &str| AvroError::NotFerrySchema(what.to_string());
        let v: Json = serde_json::from_str(value_json).map_err(|e| bad(&e.to_string()))?;
        let text = |j: &Json, k: &str| {
            j.get(k)
                .and_then(Json::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("missing {k}")))
        };
        let fields = v
            .get("fields")
            .and_then(Json::as_array)
            .ok_or_else(|| bad("no fields"))?;
        let before = fields
            .iter()
            .find(|f| f.get("name") == Some(&json!("before")))
            .ok_or_else(|| bad("no before field"))?;
        let row = before
            .get("type")
            .and_then(|t| t.get(1))
            .and_then(|r| r.get("fields"))
            .and_then(Json::as_array)
            .ok_or_else(|| bad("before is not [null, Row]"))?;
        let columns = row
            .iter()
            .map(|f| {
                Ok(Column {
                    name: text(f, "pg_name")?,
                    pg_type: text(f, "pg_type")?,
                    type_oid: f.get("type_oid").and_then(Json::as_u64).unwrap_or(0) as u32,
                    type_mod: f
                        .get("type_mod")
                        .and_then(Json::as_i64)
                        .and_then(|m| i32::try_from(m).ok())
                        .unwrap_or(-1),
                    missing: f
                        .get("pg_missing")
                        .and_then(Json::as_str)
                        .map(str::to_string),
                    attnum: f
                        .get("pg_attnum")
                        .and_then(Json::as_i64)
                        .and_then(|n| i16::try_from(n).ok()),
                    ty: text(f, "ferry_type")?
                        .parse()
                        .map_err(|e: String| bad(&e))?,
                    key: f.get("key").and_then(Json::as_bool).unwrap_or(false),
                    key_order: f
                        .get("key_order")
                        .and_then(Json::as_u64)
                        .and_then(|n| u16::try_from(n).ok())
                        .unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, AvroError>>()?;
        let table = TableSchema {
            database: text(&v, "pg_database")?,
            id: crate::table::TableId::new(text(&v, "pg_schema")?, text(&v, "pg_table")?),
            columns,
        };
        // Versions published before the envelope named its key have no such field.
        let key_field = fields.iter().any(|f| {
            f.get("name")
                .and_then(Json::as_str)
                .is_some_and(|n| n.starts_with(KEY_FIELD_PREFIX))
        });
        EncodedSchema::build(&table, key_field)
    }

    /// Decodes an envelope written with this schema (the inverse of
    /// [`EncodedSchema::encode_value_as`]). A single-object header must carry this schema's
    /// fingerprint; a Confluent header's id is the caller's to have resolved to this schema.
    /// Unchanged TOAST columns come back as [`Datum::UnchangedToast`].
    pub fn decode_value(&self, record: &[u8]) -> Result<ChangeEvent, AvroError> {
        let (header, body) = Header::parse(record)?;
        let table = self.table.id.to_string();
        if let Header::SingleObject(fp) = header {
            if fp != self.value_fp && fp != self.legacy_value_fp {
                return Err(AvroError::Decode {
                    table,
                    offset: 2,
                    reason: format!("fingerprint {fp} is not this schema's {}", self.value_fp),
                });
            }
        }
        let mut r = AvroReader {
            buf: record,
            pos: record.len() - body.len(),
            table: &table,
        };
        let op = Op::from_avro_index(r.long()? as usize).ok_or_else(|| r.err("op out of range"))?;
        let mut images: [Option<Vec<Datum>>; 2] = [None, None];
        for image in &mut images {
            match r.long()? {
                0 => {}
                1 => {
                    let mut row = Vec::with_capacity(self.table.columns.len());
                    for c in &self.table.columns {
                        row.push(match r.long()? {
                            0 => Datum::Null,
                            1 => r.datum(&c.ty)?,
                            2 if c.ty.has_text_form() => Datum::Text(r.string()?),
                            _ => return Err(r.err("union index out of range")),
                        });
                    }
                    *image = Some(row);
                }
                _ => return Err(r.err("union index out of range")),
            }
        }
        let region = r.string()?;
        let database = r.string()?;
        let schema = r.string()?;
        let table_name = r.string()?;
        let lsn = r.long()? as u64;
        let seq = r.long()? as u64;
        let mut opt = || -> Result<Option<i64>, AvroError> {
            match r.long()? {
                0 => Ok(None),
                1 => Ok(Some(r.long()?)),
                _ => Err(r.err("union index out of range")),
            }
        };
        let txid = opt()?;
        let commit_ts_us = opt()?;
        let snapshot = match r.take(1)?[0] {
            0 => false,
            1 => true,
            _ => return Err(r.err("boolean out of range")),
        };
        let [before, mut after] = images;
        loop {
            let n = r.long()?;
            if n == 0 {
                break;
            }
            for _ in 0..n.unsigned_abs() {
                if n < 0 {
                    r.long()?;
                }
                let name = r.string()?;
                let i = self
                    .field_names
                    .iter()
                    .position(|f| *f == name)
                    .ok_or_else(|| r.err("unchanged_toast names an unknown column"))?;
                if let Some(a) = after.as_mut() {
                    a[i] = Datum::UnchangedToast;
                }
            }
        }
        if r.pos != record.len() {
            return Err(r.err("trailing bytes"));
        }
        Ok(ChangeEvent {
            op,
            before,
            after,
            source: crate::event::Source {
                region,
                database,
                schema,
                table: table_name,
                lsn,
                seq,
                txid,
                commit_ts_us,
                snapshot,
            },
        })
    }
}

struct AvroReader<'a> {
    buf: &'a [u8],
    pos: usize,
    table: &'a str,
}

impl<'a> AvroReader<'a> {
    fn err(&self, reason: &str) -> AvroError {
        AvroError::Decode {
            table: self.table.to_string(),
            offset: self.pos,
            reason: reason.to_string(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], AvroError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err("record ends early"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn long(&mut self) -> Result<i64, AvroError> {
        let mut z: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = self.take(1)?[0];
            z |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], AvroError> {
        let n = self.long()?;
        let n = usize::try_from(n).map_err(|_| self.err("negative length"))?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, AvroError> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| self.err("string is not UTF-8"))
    }

    fn datum(&mut self, ty: &ColumnType) -> Result<Datum, AvroError> {
        Ok(match avro_kind(ty) {
            "int" => {
                Datum::Int(i32::try_from(self.long()?).map_err(|_| self.err("int out of range"))?)
            }
            "long" => Datum::Long(self.long()?),
            "float" => {
                let b = self.take(4)?;
                Datum::Float(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            "double" => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Datum::Double(f64::from_le_bytes(a))
            }
            "boolean" => match self.take(1)?[0] {
                0 => Datum::Bool(false),
                1 => Datum::Bool(true),
                _ => return Err(self.err("boolean out of range")),
            },
            "bytes" => Datum::Bytes(self.bytes()?.to_vec()),
            "array" => {
                let ColumnType::Array(inner) = ty else {
                    return Err(self.err("array without element type"));
                };
                let mut items = Vec::new();
                loop {
                    let n = self.long()?;
                    if n == 0 {
                        break;
                    }
                    if n < 0 {
                        self.long()?;
                    }
                    for _ in 0..n.unsigned_abs() {
                        items.push(match self.long()? {
                            0 => Datum::Null,
                            1 => self.datum(inner)?,
                            _ => return Err(self.err("union index out of range")),
                        });
                    }
                }
                Datum::Array(items)
            }
            _ => Datum::Text(self.string()?),
        })
    }
}

/// Avro `long`/`int`: zig-zag, then base-128 varint.
fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Avro `bytes`/`string`: length, then the bytes.
fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    write_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, Source};
    use crate::table::{Column, TableId};
    use apache_avro::types::Value;

    #[test]
    fn avro_names_are_kept_when_valid_and_never_shared() {
        for kept in ["orders", "pgbench_accounts", "_x", "T1", "a_b"] {
            assert_eq!(avro_name(kept), kept);
        }
        let names = [
            "app-v2",
            "app_v2",
            "app v2",
            "app.v2",
            "App_V2",
            "a__b",
            "a_b",
            "1abc",
            "_1abc",
            "select",
            "ünï",
            "ün",
            "\"q\"",
            "",
            "x",
            "a-b-",
            "a-b",
            "a_b_",
            "a63_________________________________________________________bytes",
        ];
        let mut seen = std::collections::HashMap::new();
        for n in names {
            let a = avro_name(n);
            let valid = a
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            assert!(valid, "{n:?} -> {a:?} is not an Avro name");
            if let Some(other) = seen.insert(a.clone(), n) {
                panic!("{n:?} and {other:?} share the Avro name {a:?}");
            }
        }
        assert!(avro_name("app-v2").starts_with("app_v2__"));
    }

    fn col(name: &str, pg_type: &str, ty: ColumnType, key: bool) -> Column {
        Column {
            name: name.into(),
            pg_type: pg_type.into(),
            type_oid: 0,
            type_mod: -1,
            missing: None,
            attnum: None,
            ty,
            key,
            key_order: 0,
        }
    }

    fn table() -> TableSchema {
        TableSchema {
            database: "db".into(),
            id: TableId::new("public", "all-types"),
            columns: vec![
                col("id", "int8", ColumnType::Int8, true),
                col("small", "int2", ColumnType::Int2, false),
                col("f4", "float4", ColumnType::Float4, false),
                col("f8", "float8", ColumnType::Float8, false),
                col("ok", "bool", ColumnType::Bool, false),
                col("amount", "numeric", ColumnType::Numeric, false),
                col("blob", "bytea", ColumnType::Bytea, false),
                col("day", "date", ColumnType::Date, false),
                col("at", "timestamptz", ColumnType::TimestampTz, false),
                col(
                    "tags",
                    "_text",
                    ColumnType::Array(Box::new(ColumnType::Text)),
                    false,
                ),
                col("big text", "text", ColumnType::Text, false),
                col("1st", "inet", ColumnType::Other, false),
            ],
        }
    }

    fn source() -> Source {
        Source {
            region: "eu".into(),
            database: "db".into(),
            schema: "public".into(),
            table: "all-types".into(),
            lsn: 0x16_B374_D848,
            seq: 3,
            txid: Some(771),
            commit_ts_us: Some(1_700_000_000_000_000),
            snapshot: false,
        }
    }

    fn row() -> Vec<Datum> {
        vec![
            Datum::Long(-5),
            Datum::Int(300),
            Datum::Float(1.5),
            Datum::Double(-2.25),
            Datum::Bool(true),
            Datum::Text("12345678901234567890.000000001".into()),
            Datum::Bytes(vec![0, 1, 255]),
            Datum::Int(19_000),
            Datum::Long(1_700_000_000_123_456),
            Datum::Array(vec![Datum::Text("a".into()), Datum::Null]),
            Datum::UnchangedToast,
            Datum::Text("10.0.0.1/32".into()),
        ]
    }

    /// Decodes with `apache-avro`: the header must carry the specification's fingerprint of
    /// the published schema, the body must be exactly one datum of it.
    fn decode(schema_json: &str, bytes: &[u8]) -> Value {
        let schema = Schema::parse_str(schema_json).expect("schema parses");
        let published: Json = serde_json::from_str(schema_json).expect("json");
        assert_eq!(
            Fingerprint::from_record(bytes).expect("header"),
            Fingerprint::of_json(&published).expect("fingerprint"),
            "header fingerprint is not the spec fingerprint of the published schema"
        );
        let mut cursor = &bytes[10..];
        let v = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .and_then(|r| r.read_value(&mut cursor))
            .expect("decodes");
        assert!(cursor.is_empty(), "trailing bytes after the record");
        v
    }

    fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
        let Value::Record(fields) = v else {
            panic!("not a record: {v:?}")
        };
        &fields.iter().find(|(n, _)| n == name).expect("field").1
    }

    #[test]
    fn value_round_trips_through_apache_avro() {
        let s = EncodedSchema::new(&table()).expect("schema");
        let event = ChangeEvent {
            op: Op::Update,
            before: None,
            after: Some(row()),
            source: source(),
        };
        let mut buf = Vec::new();
        s.encode_value(&event, &mut buf).expect("encodes");
        let v = decode(&s.value_json, &buf);
        assert_eq!(field(&v, "op"), &Value::Enum(1, "u".into()));
        assert_eq!(field(&v, "before"), &Value::Union(0, Box::new(Value::Null)));
        let Value::Union(1, after) = field(&v, "after") else {
            panic!("after missing")
        };
        assert_eq!(
            field(after, "id"),
            &Value::Union(1, Box::new(Value::Long(-5)))
        );
        assert_eq!(
            field(after, "amount"),
            &Value::Union(
                1,
                Box::new(Value::String("12345678901234567890.000000001".into()))
            )
        );
        assert_eq!(
            field(after, &avro_name("big text")),
            &Value::Union(0, Box::new(Value::Null))
        );
        assert_eq!(
            field(after, &avro_name("1st")),
            &Value::Union(1, Box::new(Value::String("10.0.0.1/32".into())))
        );
        assert_eq!(
            field(&v, "unchanged_toast"),
            &Value::Array(vec![Value::String(avro_name("big text"))])
        );
        let src = field(&v, "source");
        assert_eq!(field(src, "lsn"), &Value::Long(0x16_B374_D848));
        assert_eq!(
            field(src, "txid"),
            &Value::Union(1, Box::new(Value::Long(771)))
        );
    }

    #[test]
    fn key_round_trips_and_rejects_nulls() {
        let s = EncodedSchema::new(&table()).expect("schema");
        let mut buf = Vec::new();
        s.encode_key(&row(), &mut buf).expect("encodes");
        let v = decode(&s.key_json, &buf);
        assert_eq!(field(&v, "id"), &Value::Long(-5));
        assert_eq!(Fingerprint::from_record(&buf).expect("header"), s.key_fp);

        let mut nulled = row();
        nulled[0] = Datum::Null;
        let err = s
            .encode_key(&nulled, &mut Vec::new())
            .expect_err("null key");
        assert!(err.to_string().contains("\"id\""), "{err}");
    }

    #[test]
    fn mismatched_value_names_the_column() {
        let s = EncodedSchema::new(&table()).expect("schema");
        let mut bad = row();
        bad[1] = Datum::Text("three hundred".into());
        let event = ChangeEvent {
            op: Op::Create,
            before: None,
            after: Some(bad),
            source: source(),
        };
        let err = s
            .encode_value(&event, &mut Vec::new())
            .expect_err("mismatch");
        assert!(err.to_string().contains("\"small\""), "{err}");
        let short = ChangeEvent {
            op: Op::Create,
            before: None,
            after: Some(vec![Datum::Long(1)]),
            source: source(),
        };
        assert!(matches!(
            s.encode_value(&short, &mut Vec::new()),
            Err(AvroError::Arity { .. })
        ));
    }

    #[test]
    fn schema_versions_have_distinct_fingerprints() {
        let a = EncodedSchema::new(&table()).expect("schema");
        let mut t = table();
        t.columns
            .push(col("extra", "int4", ColumnType::Int4, false));
        let b = EncodedSchema::new(&t).expect("schema");
        assert_ne!(a.value_fp, b.value_fp);
        assert_eq!(a.key_fp, b.key_fp, "key columns did not change");
    }

    #[test]
    fn schema_json_rebuilds_the_table_and_values_decode_back() {
        let s = EncodedSchema::new(&table()).expect("schema");
        let again = EncodedSchema::from_json(&s.value_json).expect("rebuilds");
        assert_eq!(again.table(), s.table());
        assert_eq!(again.value_fp, s.value_fp);
        assert_eq!(again.value_json, s.value_json);
        let mut before = row();
        before[10] = Datum::Text("old".into());
        let event = ChangeEvent {
            op: Op::Update,
            before: Some(before),
            after: Some(row()),
            source: source(),
        };
        let mut buf = Vec::new();
        s.encode_value(&event, &mut buf).expect("encodes");
        let back = again.decode_value(&buf).expect("decodes");
        assert_eq!(back, event);
        let mut again_buf = Vec::new();
        again
            .encode_value(&back, &mut again_buf)
            .expect("re-encodes");
        assert_eq!(again_buf, buf);
        // Every truncation is an error, never a panic.
        for len in 0..buf.len() {
            assert!(again.decode_value(&buf[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn values_typed_forms_cannot_hold_take_the_string_branch() {
        let ints = ColumnType::Array(Box::new(ColumnType::Int4));
        let t = TableSchema {
            database: "db".into(),
            id: TableId::new("public", "shapes"),
            columns: vec![
                col("at", "timestamp", ColumnType::Timestamp, true),
                col("grid", "_int4", ints.clone(), true),
                col("n", "int4", ColumnType::Int4, false),
                col("tags", "_int4", ints, false),
            ],
        };
        let s = EncodedSchema::new(&t).expect("schema");
        let far = Datum::Text("294276-12-31 23:59:59.999999".into());
        let grid = Datum::Text("{{1,2},{3,NULL}}".into());
        for (key, value) in [
            (
                [far.clone(), grid.clone()],
                Datum::Text("[0:1]={1,2}".into()),
            ),
            (
                [Datum::Long(5), Datum::Array(vec![Datum::Int(1)])],
                Datum::Array(vec![Datum::Null]),
            ),
        ] {
            let text = matches!(key[0], Datum::Text(_));
            let row = vec![key[0].clone(), key[1].clone(), Datum::Int(1), value.clone()];
            let mut buf = Vec::new();
            s.encode_key(&row, &mut buf).expect("key encodes");
            let k = decode(&s.key_json, &buf);
            let Value::Union(branch, _) = field(&k, "at") else {
                panic!("a key column with a text form is a union: {k:?}")
            };
            assert_eq!(*branch, u32::from(text));
            let event = ChangeEvent {
                op: Op::Create,
                before: None,
                after: Some(row),
                source: source(),
            };
            buf.clear();
            s.encode_value(&event, &mut buf).expect("value encodes");
            let v = decode(&s.value_json, &buf);
            let Value::Union(1, after) = field(&v, "after") else {
                panic!("after missing")
            };
            let Value::Union(branch, _) = field(after, "tags") else {
                panic!("tags is a union")
            };
            assert_eq!(*branch, if text { 2 } else { 1 });
            assert_eq!(field(after, "n"), &Value::Union(1, Box::new(Value::Int(1))));
            assert_eq!(s.decode_value(&buf).expect("decodes back"), event);
        }
    }

    #[test]
    fn the_key_record_follows_the_declared_key_order() {
        let mut t = table();
        t.columns[1].key = true; // `small`, declared first
        t.columns[0].key_order = 1;
        let s = EncodedSchema::new(&t).expect("schema");
        let key: Json = serde_json::from_str(&s.key_json).expect("json");
        let names: Vec<&str> = key["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .filter_map(|f| f["name"].as_str())
            .collect();
        assert_eq!(names, ["small", "id"]);
        let again = EncodedSchema::from_json(&s.value_json).expect("rebuilds");
        assert_eq!(again.key_fp, s.key_fp);
        assert_eq!(again.table().key_indexes(), [1, 0]);
        // A version published before key_order was recorded keeps its column order.
        let old = s.value_json.replace("\"key_order\": 1", "\"key_order\": 0");
        let old = EncodedSchema::from_json(&old).expect("rebuilds");
        assert_eq!(old.table().key_indexes(), [0, 1]);
    }

    #[test]
    fn a_changed_key_is_a_new_value_schema_and_older_versions_still_read() {
        let a = EncodedSchema::new(&table()).expect("schema");
        let mut t = table();
        t.columns[0].key = false;
        t.columns[1].key = true;
        let b = EncodedSchema::new(&t).expect("schema");
        assert_ne!(
            a.value_fp, b.value_fp,
            "the key is part of the value schema"
        );
        let v: Json = serde_json::from_str(&a.value_json).expect("json");
        let last = v["fields"]
            .as_array()
            .and_then(|f| f.last())
            .expect("fields");
        assert_eq!(last["name"], json!(key_field_name(&["id"])));
        assert_eq!(last["type"], json!("null"));
        // A version published before the key field keeps its fingerprint and records.
        let legacy = EncodedSchema::build(&table(), false).expect("schema");
        assert_ne!(legacy.value_fp, a.value_fp);
        let again = EncodedSchema::from_json(&legacy.value_json).expect("rebuilds");
        assert_eq!(again.value_fp, legacy.value_fp);
        let event = ChangeEvent {
            op: Op::Create,
            before: None,
            after: Some(row()),
            source: source(),
        };
        let mut buf = Vec::new();
        legacy.encode_value(&event, &mut buf).expect("encodes");
        assert_eq!(again.decode_value(&buf).expect("decodes"), event);
        let mut new_buf = Vec::new();
        a.encode_value(&event, &mut new_buf).expect("encodes");
        assert_eq!(new_buf[10..], buf[10..], "the key field takes no bytes");
        decode(&a.value_json, &new_buf);
    }

    #[test]
    fn malformed_records_are_not_single_objects() {
        assert!(Fingerprint::from_record(&[]).is_err());
        assert!(Fingerprint::from_record(&[0xC3, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Fingerprint::from_record(&[0xC3, 0x01, 1]).is_err());
    }

    #[test]
    fn confluent_header_frames_the_same_body_and_decodes_back() {
        let s = EncodedSchema::new(&table()).expect("schema");
        let event = ChangeEvent {
            op: Op::Create,
            before: None,
            after: Some(row()),
            source: source(),
        };
        let mut single = Vec::new();
        s.encode_value(&event, &mut single).expect("encodes");
        let mut confluent = Vec::new();
        s.encode_value_as(Header::Confluent(0x0102_0304), &event, &mut confluent)
            .expect("encodes");
        assert_eq!(&confluent[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(
            &confluent[5..],
            &single[10..],
            "same Avro body behind either header"
        );
        let (h, body) = Header::parse(&confluent).expect("header");
        assert_eq!(h, Header::Confluent(0x0102_0304));
        assert_eq!(body, &single[10..]);
        let back = s.decode_value(&confluent).expect("decodes");
        assert_eq!(back.after, event.after);
        let mut key = Vec::new();
        s.encode_key_as(
            Header::Confluent(9),
            event.key_image().expect("key"),
            &mut key,
        )
        .expect("key");
        assert_eq!(&key[..5], &[0, 0, 0, 0, 9]);
    }

    #[test]
    fn headers_of_every_truncated_or_foreign_record_are_errors() {
        for bad in [
            &[][..],
            &[0][..],
            &[0, 0, 0, 0][..],
            &[0xC3][..],
            &[0xC3, 0x01, 1, 2, 3][..],
            &[0xC3, 0x02, 0, 0, 0, 0, 0, 0, 0, 0][..],
            &[0x7B, 0x22][..],
        ] {
            assert!(Header::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Header::parse(&[0, 0, 0, 0, 1]).expect("empty body").0,
            Header::Confluent(1)
        );
    }
}
