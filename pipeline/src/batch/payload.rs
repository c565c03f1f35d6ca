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
