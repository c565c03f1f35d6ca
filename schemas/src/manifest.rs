//! Batch manifests and the framing of a shipped batch.
//!
//! A shipped batch is one Kafka record whose value is
//! `b"FRY1"`, the manifest's length (u32, big-endian), the manifest (Avro single-object
//! encoding, schema `schemas/avro/manifest.avsc`), the manifest's CRC-32 (u32, big-endian), then
//! the payload. The manifest says what the payload covers and carries the payload's CRC-32, so
//! every byte of a batch is checked before any of it is used.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use crate::avro::{Fingerprint, SINGLE_OBJECT_MARKER};

/// The manifest's Avro schema.
pub const MANIFEST_SCHEMA: &str = include_str!("../avro/manifest.avsc");

/// The four bytes that open every shipped batch.
pub const BATCH_MAGIC: [u8; 4] = *b"FRY1";

/// What a shipped batch covers and contains. See `schemas/avro/manifest.avsc` for each field.
#[allow(missing_docs)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub batch_id: String,
    pub kind: String,
    pub origin_cluster: String,
    pub origin_topic: String,
    pub origin_partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub source_region: String,
    pub destination_region: String,
    pub table: String,
    pub events_in: i64,
    pub events_out: i64,
    pub min_lsn: i64,
    pub max_lsn: i64,
    pub schema_fingerprints: Vec<String>,
    pub codec: String,
    pub zstd_level: i32,
    pub raw_bytes: i64,
    pub payload_bytes: i64,
    pub uncompressed_bytes: i64,
    pub crc32: i64,
    pub producer_version: String,
    pub created_at_us: i64,
}

/// What a shipped batch carries: its manifest's `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ManifestKind {
    /// Compacted change rows of one origin range (`changes`): what apply applies.
    Changes,
    /// The output of a named ship transform over that range (`aggregate:<name>`).
    Aggregate(String),
    /// A kind this version does not know (a newer shipper's).
    Other(String),
}

impl ManifestKind {
    /// The kind a manifest's `kind` field names.
    pub fn parse(kind: &str) -> ManifestKind {
        match kind {
            "changes" => ManifestKind::Changes,
            _ => match kind.strip_prefix("aggregate:") {
                Some(name) => ManifestKind::Aggregate(name.to_string()),
                None => ManifestKind::Other(kind.to_string()),
            },
        }
    }
}

impl std::fmt::Display for ManifestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestKind::Changes => f.write_str("changes"),
            ManifestKind::Aggregate(name) => write!(f, "aggregate:{name}"),
            ManifestKind::Other(kind) => f.write_str(kind),
        }
    }
}

impl Manifest {
    /// Its kind.
    pub fn kind(&self) -> ManifestKind {
        ManifestKind::parse(&self.kind)
    }

    /// Whether it carries the change rows of a range of `topic[partition]`.
    pub fn covers_changes_of(&self, topic: &str, partition: i32) -> bool {
        self.kind() == ManifestKind::Changes
            && self.origin_topic == topic
            && self.origin_partition == partition
    }
}

/// The deterministic id of a batch covering `first..=last` of an origin partition, in the
/// topic's first incarnation.
pub fn batch_id(cluster: &str, topic: &str, partition: i32, first: i64, last: i64) -> String {
    BatchId {
        cluster: cluster.to_string(),
        topic: topic.to_string(),
        incarnation: 0,
        partition,
        first,
        last,
    }
    .to_string()
}

/// A batch's identity: the origin range it covers,
/// `<cluster>/<topic>[@<incarnation>]/<partition>/<first>-<last>` (offsets inclusive). Shipping
/// the same range again gives the same id, which is what makes apply idempotent. A topic
/// deleted and created again starts its offsets over: its incarnation (1, 2, … after the
/// first, written only then) keeps the new topic's ranges apart from the old one's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchId {
    /// The origin cluster's name (`origin`).
    pub cluster: String,
    /// The origin topic (Kafka topic names hold no `/` and no `@`).
    pub topic: String,
    /// Which incarnation of the topic: 0 for the first.
    pub incarnation: u32,
    /// The origin partition.
    pub partition: i32,
    /// First origin offset in the batch.
    pub first: i64,
    /// Last origin offset in the batch.
    pub last: i64,
}

impl std::fmt::Display for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let BatchId {
            cluster,
            topic,
            incarnation,
            partition,
            first,
            last,
        } = self;
        let prefix = BatchId::partition_prefix(cluster, topic, *incarnation, *partition);
        write!(f, "{prefix}{first}-{last}")
    }
}

impl BatchId {
    /// What every batch id of one origin partition (in one incarnation of its topic) starts
    /// with: `<cluster>/<topic>[@<incarnation>]/<partition>/`.
    pub fn partition_prefix(
        cluster: &str,
        topic: &str,
        incarnation: u32,
        partition: i32,
    ) -> String {
        if incarnation > 0 {
            format!("{cluster}/{topic}@{incarnation}/{partition}/")
        } else {
            format!("{cluster}/{topic}/{partition}/")
        }
    }
}

/// Text that is not a batch id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a batch id (<cluster>/<topic>[@<incarnation>]/<partition>/<first>-<last>)")]
pub struct NotABatchId(pub String);

impl std::str::FromStr for BatchId {
    type Err = NotABatchId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NotABatchId(s.to_string());
        let parts: Vec<&str> = s.split('/').collect();
        let [cluster, topic, partition, range] = parts.as_slice() else {
            return Err(bad());
        };
        let (first, last) = range.split_once('-').ok_or_else(bad)?;
        let (topic, incarnation) = match topic.split_once('@') {
            Some((topic, text)) => match text.parse::<u32>() {
                // The first incarnation is written without one: one spelling per id.
                Ok(n) if n > 0 && n.to_string() == text => (topic, n),
                _ => return Err(bad()),
            },
            None => (*topic, 0),
        };
        let id = BatchId {
            cluster: cluster.to_string(),
            topic: topic.to_string(),
            incarnation,
            partition: partition.parse().map_err(|_| bad())?,
            first: first.parse().map_err(|_| bad())?,
            last: last.parse().map_err(|_| bad())?,
        };
        let sane = !id.cluster.is_empty()
            && !id.topic.is_empty()
            && id.partition >= 0
            && id.first >= 0
            && id.first <= id.last;
        sane.then_some(id).ok_or_else(bad)
    }
}

/// A batch that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The framing is wrong (magic, lengths).
    #[error("batch framing: {0}")]
    Framing(String),
    /// The manifest does not decode.
    #[error("manifest does not decode: {0}")]
    Manifest(String),
    /// The payload does not match the manifest.
    #[error("batch {batch_id}: {reason}")]
    Mismatch {
        /// The batch.
        batch_id: String,
        /// What disagrees.
        reason: String,
    },
}

fn schema() -> Result<Schema, BatchError> {
    Schema::parse_str(MANIFEST_SCHEMA).map_err(|e| BatchError::Manifest(e.to_string()))
}

/// The manifest schema's fingerprint per the specification.
fn fingerprint() -> Result<Fingerprint, BatchError> {
    serde_json::from_str(MANIFEST_SCHEMA)
        .map_err(|e| BatchError::Manifest(e.to_string()))
        .and_then(|j| Fingerprint::of_json(&j).map_err(|e| BatchError::Manifest(e.to_string())))
}

impl Manifest {
    /// Single-object encoding of the manifest.
    pub fn encode(&self) -> Result<Vec<u8>, BatchError> {
        let schema = schema()?;
        let body = GenericDatumWriter::builder(&schema)
            .build()
            .and_then(|w| w.write_ser_to_vec(self))
            .map_err(|e| BatchError::Manifest(e.to_string()))?;
        let mut out = Vec::with_capacity(body.len() + 10);
        out.extend_from_slice(&SINGLE_OBJECT_MARKER);
        out.extend_from_slice(&fingerprint()?.0);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes a single-object encoded manifest.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, BatchError> {
        let schema = schema()?;
        let fp =
            Fingerprint::from_record(bytes).map_err(|e| BatchError::Manifest(e.to_string()))?;
        // Batches framed before the specification-exact fingerprint carry the legacy one.
        if fp != fingerprint()? && fp != Fingerprint::legacy_of(&schema) {
            return Err(BatchError::Manifest(format!(
                "unknown manifest schema {fp}"
            )));
        }
        let mut body = &bytes[10..];
        let manifest: Manifest = GenericDatumReader::builder(&schema)
            .build()
            .and_then(|r| r.read_deser(&mut body))
            .map_err(|e| BatchError::Manifest(e.to_string()))?;
        if !body.is_empty() {
            return Err(BatchError::Manifest(format!(
                "{} trailing bytes",
                body.len()
            )));
        }
        Ok(manifest)
    }

    /// Checks the payload against the manifest: size and CRC-32.
    pub fn verify(&self, payload: &[u8]) -> Result<(), BatchError> {
        let mismatch = |reason: String| BatchError::Mismatch {
            batch_id: self.batch_id.clone(),
            reason,
        };
        if payload.len() as i64 != self.payload_bytes {
            return Err(mismatch(format!(
                "payload is {} bytes, manifest says {}",
                payload.len(),
                self.payload_bytes
            )));
        }
        let crc = i64::from(crc32fast::hash(payload));
        if crc != self.crc32 {
            return Err(mismatch(format!(
                "payload CRC-32 {crc:08x}, manifest says {:08x}",
                self.crc32
            )));
        }
        if self.first_offset > self.last_offset || self.events_out > self.events_in {
            return Err(mismatch(
                "offset range or event counts are inconsistent".into(),
            ));
        }
        // The id names the range (in any incarnation of its topic).
        let incarnation = self
            .batch_id
            .parse::<BatchId>()
            .map_or(0, |id| id.incarnation);
        let expected = BatchId {
            cluster: self.origin_cluster.clone(),
            topic: self.origin_topic.clone(),
            incarnation,
            partition: self.origin_partition,
            first: self.first_offset,
            last: self.last_offset,
        }
        .to_string();
        if self.kind() == ManifestKind::Changes && self.batch_id != expected {
            return Err(mismatch(format!(
                "batch id does not match its range ({expected})"
            )));
        }
        Ok(())
    }
}

/// Frames a manifest and its payload into one record value.
pub fn frame(manifest: &Manifest, payload: &[u8]) -> Result<Vec<u8>, BatchError> {
    let m = manifest.encode()?;
    let mut out = Vec::with_capacity(12 + m.len() + payload.len());
    out.extend_from_slice(&BATCH_MAGIC);
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Splits a record value into its manifest and payload, verifying the payload.
pub fn unframe(value: &[u8]) -> Result<(Manifest, &[u8]), BatchError> {
    if value.len() < 8 || value[..4] != BATCH_MAGIC {
        return Err(BatchError::Framing(format!(
            "not a Ferry batch ({} bytes, no FRY1 magic)",
            value.len()
        )));
    }
    let len = u32::from_be_bytes([value[4], value[5], value[6], value[7]]) as usize;
    let end = 8usize
        .checked_add(len)
        .filter(|&e| e + 4 <= value.len())
        .ok_or_else(|| BatchError::Framing(format!("manifest length {len} exceeds the record")))?;
    let m = &value[8..end];
    let crc = u32::from_be_bytes([value[end], value[end + 1], value[end + 2], value[end + 3]]);
    if crc != crc32fast::hash(m) {
        return Err(BatchError::Framing(format!(
            "manifest CRC-32 {:08x} does not match the recorded {crc:08x}",
            crc32fast::hash(m)
        )));
    }
    let manifest = Manifest::decode(m)?;
    let payload = &value[end + 4..];
    manifest.verify(payload)?;
    Ok((manifest, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_kinds_round_trip() {
        for kind in [
            ManifestKind::Changes,
            ManifestKind::Aggregate("per_region".into()),
            ManifestKind::Other("rows-v2".into()),
        ] {
            assert_eq!(ManifestKind::parse(&kind.to_string()), kind);
        }
        assert_eq!(ManifestKind::Changes.to_string(), "changes");
    }

    #[test]
    fn batch_ids_round_trip_and_reject_what_is_not_one() {
        let id = BatchId {
            cluster: "origin".into(),
            topic: "ferry.My_Schema.t-1".into(),
            incarnation: 0,
            partition: 2,
            first: 0,
            last: 41,
        };
        assert_eq!(id.to_string(), "origin/ferry.My_Schema.t-1/2/0-41");
        assert_eq!(id.to_string().parse::<BatchId>(), Ok(id.clone()));
        assert_eq!(
            batch_id("origin", "ferry.My_Schema.t-1", 2, 0, 41),
            id.to_string()
        );
        let again = BatchId {
            incarnation: 3,
            ..id.clone()
        };
        assert_eq!(again.to_string(), "origin/ferry.My_Schema.t-1@3/2/0-41");
        assert_eq!(again.to_string().parse::<BatchId>(), Ok(again.clone()));
        assert_ne!(again.to_string(), id.to_string());
        for bad in [
            "",
            "nonsense",
            "origin/t/0/1",
            "origin/t/x/1-2",
            "origin/t/0/2-1",
            "origin/t/-1/1-2",
            "origin/t/0/-1-2",
            "origin//0/1-2",
            "origin/t/0/1-2/aggregate:sum",
            "origin/t@0/0/1-2",
            "origin/t@01/0/1-2",
            "origin/t@x/0/1-2",
            "origin/t@/0/1-2",
            "origin/@1/0/1-2",
        ] {
            assert!(bad.parse::<BatchId>().is_err(), "{bad:?}");
        }
    }

    fn manifest(payload: &[u8]) -> Manifest {
        Manifest {
            batch_id: batch_id("origin", "ferry.public.t", 2, 100, 199),
            kind: ManifestKind::Changes.to_string(),
            origin_cluster: "origin".into(),
            origin_topic: "ferry.public.t".into(),
            origin_partition: 2,
            first_offset: 100,
            last_offset: 199,
            source_region: "eu".into(),
            destination_region: "us".into(),
            table: "public.t".into(),
            events_in: 100,
            events_out: 10,
            min_lsn: 5,
            max_lsn: 9,
            schema_fingerprints: vec!["0011223344556677".into()],
            codec: "arrow-ipc+zstd".into(),
            zstd_level: 3,
            raw_bytes: 13_000,
            payload_bytes: payload.len() as i64,
            uncompressed_bytes: 4_000,
            crc32: i64::from(crc32fast::hash(payload)),
            producer_version: "0.1.0".into(),
            created_at_us: 1_700_000_000_000_000,
        }
    }

    #[test]
    fn frames_round_trip() {
        let payload = b"columnar bytes";
        let m = manifest(payload);
        let framed = frame(&m, payload).expect("frames");
        let (back, p) = unframe(&framed).expect("unframes");
        assert_eq!(back, m);
        assert_eq!(p, payload);
    }

    /// A batch id names its range, in whichever incarnation of the topic; another range (or
    /// another topic) under the id is caught.
    #[test]
    fn the_batch_id_must_name_the_range_in_any_incarnation() {
        let payload = b"columnar bytes";
        let mut m = manifest(payload);
        m.batch_id = "origin/ferry.public.t@2/2/100-199".into();
        assert!(m.verify(payload).is_ok());
        for bad in [
            "origin/ferry.public.t@2/2/100-198",
            "origin/ferry.public.u@2/2/100-199",
            "origin/ferry.public.t@2/1/100-199",
            "origin/ferry.public.t@02/2/100-199",
            "elsewhere/ferry.public.t/2/100-199",
        ] {
            m.batch_id = bad.into();
            assert!(m.verify(payload).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let payload = b"columnar bytes, a little longer to have something to flip";
        let framed = frame(&manifest(payload), payload).expect("frames");
        for i in 0..framed.len() * 8 {
            let mut bad = framed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(unframe(&bad).is_err(), "flip at bit {i} went unnoticed");
        }
        for len in 0..framed.len() {
            assert!(unframe(&framed[..len]).is_err(), "truncated to {len}");
        }
    }
}
