//! The Avro specification's Parsing Canonical Form and its CRC-64-AVRO fingerprint, computed
//! from a schema's JSON exactly as the specification (and Java's `SchemaNormalization`) does.
//!
//! Not the `apache-avro` crate's: its canonical form keeps `logicalType` (AVRO-4004), so its
//! fingerprint of `{"type":"long","logicalType":"timestamp-micros"}` is not the fingerprint of
//! `"long"` that every other Avro library computes, and a reader that fingerprints the published
//! schema itself (Java's `BinaryMessageDecoder`, fastavro) cannot find Ferry's records.
//!
//! The transformation, per the specification's "Transforming into Parsing Canonical Form":
//! - **PRIMITIVES**: a primitive written as an object (`{"type":"int",...}`) becomes its bare
//!   name (`"int"`), whatever else the object holds (`logicalType`, `precision`, ...).
//! - **FULLNAMES**: names of records, enums and fixeds become full names (the enclosing
//!   namespace applied), and references to named types are written as full names.
//! - **STRIP**: only `type`, `name`, `fields`, `symbols`, `items`, `values` and `size` are kept.
//! - **ORDER**: keys in the order name, type, fields, symbols, items, values, size.
//! - **STRINGS / INTEGERS / WHITESPACE**: no escapes beyond JSON's, integers without leading
//!   zeros, no whitespace.
//!
//! A named type is written in full where it first appears (depth first, left to right) and by
//! its full name after that.

use std::collections::HashSet;
use std::fmt::Write as _;

use serde_json::Value as Json;

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Why a schema has no canonical form (it is not a valid Avro schema).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid Avro schema: {0}")]
pub struct PcfError(pub String);

/// The Parsing Canonical Form of the schema given as JSON text.
pub fn canonical_form_str(schema_json: &str) -> Result<String, PcfError> {
    let v: Json = serde_json::from_str(schema_json).map_err(|e| PcfError(e.to_string()))?;
    canonical_form(&v)
}

/// The Parsing Canonical Form of a schema given as parsed JSON.
pub fn canonical_form(schema: &Json) -> Result<String, PcfError> {
    let mut out = String::new();
    let mut seen = HashSet::new();
    write(schema, "", &mut seen, &mut out)?;
    Ok(out)
}

/// The CRC-64-AVRO fingerprint of `bytes`, least significant byte first (the order
/// single-object encoding writes it).
pub fn crc64_avro(bytes: &[u8]) -> [u8; 8] {
    let mut fp = EMPTY;
    for &b in bytes {
        fp = (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp.to_le_bytes()
}

const EMPTY: u64 = 0xc15d_213a_a4d7_a795;

const TABLE: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut j = 0;
        while j < 8 {
            fp = (fp >> 1) ^ (EMPTY & (0u64.wrapping_sub(fp & 1)));
            j += 1;
        }
        t[i] = fp;
        i += 1;
    }
    t
};

fn quote(s: &str, out: &mut String) {
    // serde_json's escaping: the specification's STRINGS rule (only what JSON requires).
    out.push_str(&Json::String(s.to_string()).to_string());
}

/// The full name of a named type, and the namespace its nested types inherit.
fn full_name(obj: &serde_json::Map<String, Json>, enclosing: &str) -> Result<String, PcfError> {
    let name = obj
        .get("name")
        .and_then(Json::as_str)
        .ok_or_else(|| PcfError("a named type has no \"name\"".into()))?;
    if name.contains('.') {
        return Ok(name.to_string());
    }
    let ns = match obj.get("namespace") {
        Some(Json::String(ns)) => ns.as_str(),
        Some(Json::Null) | None => enclosing,
        Some(other) => return Err(PcfError(format!("namespace {other} is not a string"))),
    };
    Ok(if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}.{name}")
    })
}

fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map_or("", |(ns, _)| ns)
}

/// A reference to a named type by name: resolved like Java's parser (the enclosing namespace
/// first, then the name as given).
fn reference(name: &str, ns: &str, seen: &HashSet<String>) -> String {
    if !name.contains('.') && !ns.is_empty() {
        let qualified = format!("{ns}.{name}");
        if seen.contains(&qualified) || !seen.contains(name) {
            return qualified;
        }
    }
    name.to_string()
}

fn write(
    schema: &Json,
    ns: &str,
    seen: &mut HashSet<String>,
    out: &mut String,
) -> Result<(), PcfError> {
    match schema {
        Json::String(s) if PRIMITIVES.contains(&s.as_str()) => quote(s, out),
        Json::String(name) => {
            let full = reference(name, ns, seen);
            if !seen.contains(&full) {
                return Err(PcfError(format!("undefined named type {name:?}")));
            }
            quote(&full, out);
        }
        Json::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(b, ns, seen, out)?;
            }
            out.push(']');
        }
        Json::Object(obj) => {
            let ty = obj
                .get("type")
                .ok_or_else(|| PcfError(format!("object without \"type\": {schema}")))?;
            let Json::String(ty) = ty else {
                // {"type": {...}} or {"type": [...]}: the type is the nested schema.
                return write(ty, ns, seen, out);
            };
            match ty.as_str() {
                t if PRIMITIVES.contains(&t) => quote(t, out),
                "record" | "error" | "enum" | "fixed" => {
                    let full = full_name(obj, ns)?;
                    if !seen.insert(full.clone()) {
                        quote(&full, out);
                        return Ok(());
                    }
                    out.push_str("{\"name\":");
                    quote(&full, out);
                    out.push_str(",\"type\":");
                    let kind = if ty == "error" { "record" } else { ty.as_str() };
                    quote(kind, out);
                    match kind {
                        "record" => {
                            let fields = obj
                                .get("fields")
                                .and_then(Json::as_array)
                                .ok_or_else(|| PcfError(format!("record {full} has no fields")))?;
                            out.push_str(",\"fields\":[");
                            for (i, f) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let fname =
                                    f.get("name").and_then(Json::as_str).ok_or_else(|| {
                                        PcfError(format!("a field of {full} has no name"))
                                    })?;
                                let fty = f.get("type").ok_or_else(|| {
                                    PcfError(format!("field {fname} of {full} has no type"))
                                })?;
                                out.push_str("{\"name\":");
                                quote(fname, out);
                                out.push_str(",\"type\":");
                                write(fty, namespace_of(&full), seen, out)?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                        "enum" => {
                            let symbols = obj
                                .get("symbols")
                                .and_then(Json::as_array)
                                .ok_or_else(|| PcfError(format!("enum {full} has no symbols")))?;
                            out.push_str(",\"symbols\":[");
                            for (i, s) in symbols.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let s = s.as_str().ok_or_else(|| {
                                    PcfError(format!("a symbol of {full} is not a string"))
                                })?;
                                quote(s, out);
                            }
                            out.push(']');
                        }
                        _ => {
                            let size = obj.get("size").and_then(Json::as_u64).ok_or_else(|| {
                                PcfError(format!("fixed {full} has no integer size"))
                            })?;
                            let _ = write!(out, ",\"size\":{size}");
                        }
                    }
                    out.push('}');
                }
                "array" => {
                    let items = obj
                        .get("items")
                        .ok_or_else(|| PcfError("array without \"items\"".into()))?;
                    out.push_str("{\"type\":\"array\",\"items\":");
                    write(items, ns, seen, out)?;
                    out.push('}');
                }
                "map" => {
                    let values = obj
                        .get("values")
                        .ok_or_else(|| PcfError("map without \"values\"".into()))?;
                    out.push_str("{\"type\":\"map\",\"values\":");
                    write(values, ns, seen, out)?;
                    out.push('}');
                }
                // {"type": "SomeNamedType"}: a reference written as an object.
                other => write(&Json::String(other.to_string()), ns, seen, out)?,
            }
        }
        other => return Err(PcfError(format!("{other} is not a schema"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: [u8; 8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn pcf(s: &str) -> String {
        canonical_form_str(s).expect("valid schema")
    }

    /// Fingerprints of the specification's test vectors (as Java prints them, signed decimal).
    #[test]
    fn fingerprints_match_the_specification_vectors() {
        for (schema, fp) in [
            (r#""null""#, 7195948357588979594i64),
            (r#""int""#, 8247732601305521295),
            (r#""long""#, -3434872931120570953),
            (
                r#"{"type":"fixed","name":"foo","size":15}"#,
                1756455273707447556,
            ),
            (
                r#"{"type":"record","name":"foo","fields":[{"name":"f1","type":"boolean"}]}"#,
                7843277075252814651,
            ),
        ] {
            let got = i64::from_le_bytes(crc64_avro(pcf(schema).as_bytes()));
            assert_eq!(got, fp, "{schema}");
        }
    }

    #[test]
    fn logical_types_are_their_primitive() {
        assert_eq!(
            pcf(r#"{"type":"long","logicalType":"timestamp-micros"}"#),
            r#""long""#
        );
        assert_eq!(
            hex(crc64_avro(
                pcf(r#"{"type":"long","logicalType":"timestamp-micros"}"#).as_bytes()
            )),
            "b71df49344e154d0"
        );
        assert_eq!(
            pcf(r#"{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}"#),
            r#""bytes""#
        );
        assert_eq!(
            pcf(
                r#"{"type":"fixed","name":"dur","namespace":"ns","size":12,"logicalType":"duration"}"#
            ),
            r#"{"name":"ns.dur","type":"fixed","size":12}"#
        );
    }

    #[test]
    fn names_are_full_attributes_stripped_and_keys_ordered() {
        let s = r#"{"fields":[{"type":{"type":"enum","name":"Kind","symbols":["A","B"],"default":"A","doc":"d"},"name":"kind","pg_name":"Kind","order":"descending"},
            {"name":"kind2","type":"Kind"},{"name":"kind3","type":["null","ferry.pg.Kind"]},
            {"name":"f","type":{"type":"fixed","name":"F4","size":4}},{"name":"f2","type":{"type":"array","items":"F4"}},
            {"name":"m","type":{"type":"map","values":{"type":"int","logicalType":"date"}}}],
            "type":"record","name":"Row","namespace":"ferry.pg","doc":"x","connect.name":"y"}"#;
        assert_eq!(
            pcf(s),
            r#"{"name":"ferry.pg.Row","type":"record","fields":[{"name":"kind","type":{"name":"ferry.pg.Kind","type":"enum","symbols":["A","B"]}},{"name":"kind2","type":"ferry.pg.Kind"},{"name":"kind3","type":["null","ferry.pg.Kind"]},{"name":"f","type":{"name":"ferry.pg.F4","type":"fixed","size":4}},{"name":"f2","type":{"type":"array","items":"ferry.pg.F4"}},{"name":"m","type":{"type":"map","values":"int"}}]}"#
        );
    }

    #[test]
    fn nested_namespaces_and_dotted_names() {
        let s = r#"{"type":"record","name":"Outer","namespace":"a.b","fields":[
            {"name":"inner","type":{"type":"record","name":"Inner","fields":[{"name":"x","type":"long"},
              {"name":"deep","type":{"type":"record","name":"Deep","namespace":"c.d","fields":[{"name":"y","type":"string"}]}}]}},
            {"name":"again","type":"Inner"},{"name":"deep2","type":"c.d.Deep"},
            {"name":"full","type":{"type":"record","name":"x.y.Full","namespace":"ignored","fields":[]}}]}"#;
        assert_eq!(
            pcf(s),
            r#"{"name":"a.b.Outer","type":"record","fields":[{"name":"inner","type":{"name":"a.b.Inner","type":"record","fields":[{"name":"x","type":"long"},{"name":"deep","type":{"name":"c.d.Deep","type":"record","fields":[{"name":"y","type":"string"}]}}]}},{"name":"again","type":"a.b.Inner"},{"name":"deep2","type":"c.d.Deep"},{"name":"full","type":{"name":"x.y.Full","type":"record","fields":[]}}]}"#
        );
    }

    #[test]
    fn invalid_schemas_are_errors_not_panics() {
        for s in [
            "",
            "{",
            "42",
            r#""Nope""#,
            r#"{"type":"record","name":"R"}"#,
            r#"{"type":"record","fields":[]}"#,
            r#"{"type":"enum","name":"E","symbols":[1]}"#,
            r#"{"type":"fixed","name":"F","size":"x"}"#,
            r#"{"type":"array"}"#,
            r#"{"type":"map"}"#,
            r#"{"name":"x"}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"a"}]}"#,
            r#"{"type":"record","name":"R","fields":[{"type":"int"}]}"#,
        ] {
            assert!(canonical_form_str(s).is_err(), "{s:?} should be refused");
        }
    }
}
