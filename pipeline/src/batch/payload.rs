//! The payload of a shipped batch: its runs as Arrow IPC streams, compressed with zstd.
//!
//! Layout before compression: for each run, its length (u32, big-endian) and an Arrow IPC
//! stream holding the run's rows (schema: [`crate::batch::columnar::arrow_schema`], with every `Int64`
//! column delta-encoded: [`crate::batch::columnar::to_wire`]). The manifest lists
//! each run's value-schema fingerprint in the same order. The whole buffer is then compressed
//! with zstd at the configured level.
//!
//! Why Arrow IPC and whole-payload zstd: a batch is written once and read once in full, so
//! Parquet's page indexes and statistics buy nothing, and IPC encodes with no per-value work
//! beyond building the columns. Compressing the whole payload (rather than IPC's per-buffer
//! compression) lets zstd use one context across columns and keeps the level configurable;
//! `benches/` prints the bytes per change of both choices side by side with per-record Avro.

use std::io::Cursor;
use std::sync::Arc;

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use ferry_schemas::{ChangeEvent, EncodedSchema};

use crate::batch::columnar::{self, ColumnarError};
use crate::batch::Run;

/// The codec name recorded in manifests.
pub const CODEC: &str = "arrow-ipc+zstd";

/// Upper bound on a payload's uncompressed size, whatever a manifest claims.
pub const MAX_UNCOMPRESSED: usize = 1 << 30;

/// A payload that does not encode or decode.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Arrow conversion failed.
    #[error(transparent)]
    Columnar(#[from] ColumnarError),
    /// Arrow IPC failed.
    #[error("arrow ipc: {0}")]
    Ipc(String),
    /// zstd failed.
    #[error("zstd: {0}")]
    Zstd(String),
    /// The payload's structure is wrong.
    #[error("payload: {0}")]
    Layout(String),
}

/// An encoded payload.
pub struct Encoded {
    /// The compressed bytes.
    pub bytes: Vec<u8>,
    /// Size before compression.
    pub uncompressed: usize,
    /// Value-schema fingerprint of each run, in order.
    pub fingerprints: Vec<String>,
    /// Rows in all runs.
    pub rows: usize,
}

/// Encodes runs into a payload.
pub fn encode(runs: &[Run], zstd_level: i32) -> Result<Encoded, PayloadError> {
    let mut raw = Vec::new();
    let mut fingerprints = Vec::with_capacity(runs.len());
    let mut rows = 0;
    for run in runs {
        let events: Vec<(i64, &ChangeEvent)> = run.events.iter().map(|(o, e)| (*o, e)).collect();
        let batch = columnar::to_wire(&columnar::to_batch(run.schema.table(), &events)?)?;
        rows += batch.num_rows();
        let mut ipc = Vec::new();
        {
            let mut w = StreamWriter::try_new(&mut ipc, &batch.schema())
                .map_err(|e| PayloadError::Ipc(e.to_string()))?;
            w.write(&batch)
                .map_err(|e| PayloadError::Ipc(e.to_string()))?;
            w.finish().map_err(|e| PayloadError::Ipc(e.to_string()))?;
        }
        raw.extend_from_slice(&(ipc.len() as u32).to_be_bytes());
        raw.extend_from_slice(&ipc);
        fingerprints.push(run.schema.value_fp.to_string());
    }
    let bytes =
        zstd::bulk::compress(&raw, zstd_level).map_err(|e| PayloadError::Zstd(e.to_string()))?;
    Ok(Encoded {
        bytes,
        uncompressed: raw.len(),
        fingerprints,
        rows,
    })
}

/// Checks that every message of an Arrow IPC stream fits in it before the reader allocates
/// what the message claims: a hostile or corrupt length cannot make it allocate gigabytes.
fn check_framing(ipc: &[u8]) -> Result<(), PayloadError> {
    let bad = |what: String| PayloadError::Layout(format!("arrow ipc stream: {what}"));
    let mut at = 0usize;
    while at < ipc.len() {
        let word = |at: usize| -> Result<u32, PayloadError> {
            let b = ipc
                .get(at..at + 4)
                .ok_or_else(|| bad(format!("message header at byte {at} past the end")))?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let mut meta_at = at + 4;
        let mut meta_len = word(at)?;
        if meta_len == u32::MAX {
            meta_len = word(at + 4)?;
            meta_at += 4;
        }
        if meta_len == 0 {
            return Ok(()); // end of stream
        }
        let meta = ipc
            .get(meta_at..meta_at + meta_len as usize)
            .ok_or_else(|| {
                bad(format!(
                    "metadata of {meta_len} bytes at byte {at} past the end"
                ))
            })?;
        let message = arrow::ipc::root_as_message(meta)
            .map_err(|e| bad(format!("message at byte {at}: {e}")))?;
        let body = usize::try_from(message.bodyLength())
            .map_err(|_| bad(format!("negative body length at byte {at}")))?;
        at = meta_at + meta_len as usize;
        if ipc.len() - at < body {
            return Err(bad(format!(
                "body of {body} bytes at byte {at} past the end"
            )));
        }
        at += body;
    }
    Ok(())
}

/// Decodes a payload back into runs, looking each run's schema up by fingerprint.
pub fn decode(
    bytes: &[u8],
    uncompressed: usize,
    fingerprints: &[String],
    region: &str,
    schema_of: impl Fn(&str) -> Option<Arc<EncodedSchema>>,
) -> Result<Vec<Run>, PayloadError> {
    if uncompressed > MAX_UNCOMPRESSED {
        return Err(PayloadError::Layout(format!(
            "declared size {uncompressed} exceeds the {MAX_UNCOMPRESSED}-byte limit"
        )));
    }
    let raw = zstd::bulk::decompress(bytes, uncompressed)
        .map_err(|e| PayloadError::Zstd(e.to_string()))?;
    if raw.len() != uncompressed {
        return Err(PayloadError::Layout(format!(
            "decompressed to {} bytes, manifest says {uncompressed}",
            raw.len()
        )));
    }
    let mut at = 0;
    let mut runs = Vec::with_capacity(fingerprints.len());
    for fp in fingerprints {
        let schema =
            schema_of(fp).ok_or_else(|| PayloadError::Layout(format!("unknown schema {fp}")))?;
        let len_bytes = raw
            .get(at..at + 4)
            .ok_or_else(|| PayloadError::Layout("run header past the end".into()))?;
        let len =
            u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        let ipc = raw
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| PayloadError::Layout("run past the end".into()))?;
        at += 4 + len;
        check_framing(ipc)?;
        let reader = StreamReader::try_new(Cursor::new(ipc), None)
            .map_err(|e| PayloadError::Ipc(e.to_string()))?;
        let mut events = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| PayloadError::Ipc(e.to_string()))?;
            let batch = columnar::from_wire(&batch)?;
            events.extend(columnar::from_batch(schema.table(), region, &batch)?);
        }
        runs.push(Run { schema, events });
    }
    if at != raw.len() {
        return Err(PayloadError::Layout(format!(
            "{} bytes after the last run",
            raw.len() - at
        )));
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_schemas::{Column, ColumnType, Datum, Op, Source, TableId, TableSchema};

    fn schema(table: &str) -> Arc<EncodedSchema> {
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
            id: TableId::new("public", table),
            columns: vec![
                col("id", ColumnType::Int8, "int8", true),
                col("v", ColumnType::Text, "text", false),
            ],
        };
        Arc::new(EncodedSchema::new(&t).expect("schema"))
    }

    fn run(schema: &Arc<EncodedSchema>, rows: i64) -> Run {
        let events = (0..rows)
            .map(|i| {
                let after = vec![
                    Datum::Long(i),
                    if i % 3 == 0 {
                        Datum::Null
                    } else {
                        Datum::Text(format!("v{i}"))
                    },
                ];
                let e = ChangeEvent {
                    op: if i % 5 == 4 { Op::Delete } else { Op::Create },
                    before: (i % 5 == 4).then(|| after.clone()),
                    after: (i % 5 != 4).then_some(after),
                    source: Source {
                        region: "eu".into(),
                        database: "db".into(),
                        schema: "public".into(),
                        table: schema.table().id.table.clone(),
                        lsn: 1000 + i as u64,
                        seq: i as u64,
                        txid: Some(9),
                        commit_ts_us: Some(1_700_000_000_000_000 + i),
                        snapshot: false,
                    },
                };
                (100 + i, e)
            })
            .collect();
        Run {
            schema: schema.clone(),
            events,
        }
    }

    /// Two runs of two schema versions, encoded.
    fn sample() -> (Vec<Run>, Encoded, Vec<Arc<EncodedSchema>>) {
        let (a, b) = (schema("a"), schema("b"));
        let runs = vec![run(&a, 7), run(&b, 3)];
        let enc = encode(&runs, 3).expect("encode");
        (runs, enc, vec![a, b])
    }

    fn lookup(known: &[Arc<EncodedSchema>]) -> impl Fn(&str) -> Option<Arc<EncodedSchema>> + '_ {
        |fp| known.iter().find(|s| s.value_fp.to_string() == fp).cloned()
    }

    #[test]
    fn runs_round_trip_with_nulls_deletes_and_two_schemas() {
        let (runs, enc, known) = sample();
        assert_eq!(enc.rows, 10);
        let back = decode(
            &enc.bytes,
            enc.uncompressed,
            &enc.fingerprints,
            "eu",
            lookup(&known),
        )
        .expect("decode");
        assert_eq!(back.len(), runs.len());
        for (r, b) in runs.iter().zip(&back) {
            assert_eq!(r.schema.value_fp, b.schema.value_fp);
            assert_eq!(r.events, b.events);
        }
        let empty = encode(&[], 3).expect("encode nothing");
        assert!(
            decode(&empty.bytes, empty.uncompressed, &[], "eu", lookup(&known))
                .expect("decode nothing")
                .is_empty()
        );
    }

    #[test]
    fn corrupt_payloads_are_refused_with_a_reason_never_a_panic() {
        let (_, enc, known) = sample();
        let fps = &enc.fingerprints;
        let n = enc.uncompressed;
        let raw = zstd::bulk::decompress(&enc.bytes, n).expect("raw");
        let packed = |raw: &[u8]| zstd::bulk::compress(raw, 3).expect("compress");
        let mut run_len_too_big = raw.clone();
        run_len_too_big[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut ipc_garbage = raw.clone();
        for b in &mut ipc_garbage[4..40] {
            *b ^= 0xA5;
        }
        let mut trailing = raw.clone();
        trailing.extend_from_slice(b"xx");
        // (what, bytes, declared size, fingerprints, a word the error must contain)
        type Case = (&'static str, Vec<u8>, usize, Vec<String>, &'static str);
        let cases: Vec<Case> = vec![
            ("empty bytes", Vec::new(), n, fps.clone(), "manifest says"),
            (
                "truncated",
                enc.bytes[..enc.bytes.len() / 2].to_vec(),
                n,
                fps.clone(),
                "zstd",
            ),
            (
                "not zstd",
                b"definitely not zstd".to_vec(),
                n,
                fps.clone(),
                "zstd",
            ),
            (
                "declared size too small",
                enc.bytes.clone(),
                n - 1,
                fps.clone(),
                "",
            ),
            (
                "declared size too large",
                enc.bytes.clone(),
                n + 1,
                fps.clone(),
                "manifest says",
            ),
            (
                "size beyond the limit",
                enc.bytes.clone(),
                MAX_UNCOMPRESSED + 1,
                fps.clone(),
                "limit",
            ),
            (
                "unknown schema",
                enc.bytes.clone(),
                n,
                vec!["0000000000000000".into(), fps[1].clone()],
                "unknown schema",
            ),
            (
                "fewer runs listed",
                enc.bytes.clone(),
                n,
                vec![fps[0].clone()],
                "after the last run",
            ),
            (
                "more runs listed",
                enc.bytes.clone(),
                n,
                vec![fps[0].clone(), fps[1].clone(), fps[1].clone()],
                "past the end",
            ),
            (
                "run length past the end",
                packed(&run_len_too_big),
                n,
                fps.clone(),
                "past the end",
            ),
            (
                "garbage inside a run",
                packed(&ipc_garbage),
                n,
                fps.clone(),
                "",
            ),
            (
                "bytes after the last run",
                packed(&trailing),
                n + 2,
                fps.clone(),
                "after the last run",
            ),
            (
                "runs swapped",
                enc.bytes.clone(),
                n,
                vec![fps[1].clone(), fps[0].clone()],
                "",
            ),
        ];
        for (what, bytes, size, fps, needle) in cases {
            let t = std::time::Instant::now();
            let r = decode(&bytes, size, &fps, "eu", lookup(&known));
            assert!(
                t.elapsed() < std::time::Duration::from_secs(1),
                "{what}: slow"
            );
            match r {
                Err(e) => assert!(e.to_string().contains(needle), "{what}: {e}"),
                // Both test schemas have the same columns, so swapped runs still decode: the
                // manifest's table check in apply is what catches that.
                Ok(runs) if what == "runs swapped" => assert_eq!(runs.len(), 2),
                Ok(_) => panic!("{what}: decoded"),
            }
        }
    }
}
