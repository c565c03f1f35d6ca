//! Looking at what landed: topic counts, schema export, and decoding a table topic with nothing
//! but a stock Kafka consumer and the Avro library (the way any consumer would).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use apache_avro::Schema;
use ferry_connectors::kafka::{Cluster, KafkaError, Span, TopicPartition};
use ferry_connectors::registry::SchemaRegistry;
use ferry_schemas::Header;
use rdkafka::consumer::Consumer;

/// A failure while inspecting.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The cluster did not answer, or refused.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The topic does not exist.
    #[error("topic {0} does not exist")]
    MissingTopic(String),
    /// A record that does not decode, a file that cannot be written, a wrong argument.
    #[error("{0}")]
    Other(String),
}

impl InspectError {
    /// Whether a retry could help (only when the cluster did not answer).
    pub fn is_retryable(&self) -> bool {
        match self {
            InspectError::Kafka(e) => e.is_retryable(),
            InspectError::MissingTopic(_) | InspectError::Other(_) => false,
        }
    }
}

fn ie(e: impl std::fmt::Display) -> InspectError {
    InspectError::Other(e.to_string())
}

/// One record as read back: partition, offset, key, value.
pub type RawRecord = (i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Reads every record of a topic (all partitions) from the start to the end it has when the
/// call starts (records appended meanwhile are not chased), at most `limit` of them.
pub fn read_all(
    cluster: &Cluster,
    topic: &str,
    limit: usize,
) -> Result<Vec<RawRecord>, InspectError> {
    let mut out = Vec::new();
    scan(cluster, topic, None, |record| {
        if out.len() < limit {
            out.push(record);
        }
        out.len() < limit
    })?;
    Ok(out)
}

/// Hands every record of a topic (or of one of its partitions), up to the end it has when the
/// call starts, to `each`, one at a time and partition by partition (nothing is held in
/// memory); `each` returns whether to go on. Fails when a partition delivers nothing for a
/// minute before reaching its end.
pub fn scan(
    cluster: &Cluster,
    topic: &str,
    partition: Option<i32>,
    mut each: impl FnMut(RawRecord) -> bool,
) -> Result<(), InspectError> {
    let count = cluster.partition_count(topic, Duration::from_secs(10))?;
    if count == 0 {
        return Err(InspectError::MissingTopic(topic.to_string()));
    }
    let partitions: Vec<i32> = match partition {
        Some(p) if (0..count).contains(&p) => vec![p],
        Some(p) => {
            return Err(InspectError::Other(format!(
                "topic {topic} has no partition {p} (it has {count})"
            )))
        }
        None => (0..count).collect(),
    };
    let mut go_on = true;
    for p in partitions {
        cluster.read_partition(&TopicPartition::new(topic, p), Span::ALL, |r| {
            go_on = each((p, r.offset, r.key, r.value));
            go_on
        })?;
        if !go_on {
            break;
        }
    }
    Ok(())
}

/// Every schema in the schema topic, by fingerprint (newest record wins).
pub fn load_schemas(
    cluster: &Cluster,
    prefix: &str,
) -> Result<HashMap<String, String>, InspectError> {
    let topic = crate::topics::schema_topic(prefix);
    let mut map = HashMap::new();
    for (_, _, key, value) in read_all(cluster, &topic, usize::MAX)? {
        if let (Some(k), Some(v)) = (key, value) {
            map.insert(
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    Ok(map)
}

/// Writes every schema as `<fingerprint>.avsc` into `dir`; returns how many.
pub fn export_schemas(cluster: &Cluster, prefix: &str, dir: &Path) -> Result<usize, InspectError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| InspectError::Other(format!("{}: {e}", dir.display())))?;
    let schemas = load_schemas(cluster, prefix)?;
    for (fp, json) in &schemas {
        let path = dir.join(format!("{fp}.avsc"));
        std::fs::write(&path, json)
            .map_err(|e| InspectError::Other(format!("{}: {e}", path.display())))?;
    }
    Ok(schemas.len())
}

/// Decodes the records of a cluster's table topics as JSON, in either format Ferry writes:
/// single-object records with the schemas of the schema topic (by fingerprint, as the topic keys
/// them), Confluent records with the cluster's schema registry (by id).
pub struct Decoder {
    schemas: HashMap<String, String>,
    registry: Option<SchemaRegistry>,
    cache: HashMap<Header, Schema>,
}

impl Decoder {
    /// A decoder with the schema topic of `prefix` in `cluster` loaded, and `registry` for
    /// records in the Confluent wire format.
    pub fn load(
        cluster: &Cluster,
        prefix: &str,
        registry: Option<SchemaRegistry>,
    ) -> Result<Decoder, InspectError> {
        Ok(Decoder {
            schemas: load_schemas(cluster, prefix)?,
            registry,
            cache: HashMap::new(),
        })
    }

    /// Decodes one record (key or value). The body is read with the schema its header names
    /// (not with `apache-avro`'s single-object reader, which checks the header against its
    /// own, non-standard fingerprint). Blocks on a registry lookup.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<serde_json::Value, InspectError> {
        let (header, mut body) = Header::parse(bytes).map_err(ie)?;
        if !self.cache.contains_key(&header) {
            let json: String = match header {
                Header::SingleObject(fp) => {
                    self.schemas.get(&fp.to_string()).cloned().ok_or_else(|| {
                        InspectError::Other(format!("schema {fp} is not in the schema topic"))
                    })?
                }
                Header::Confluent(id) => {
                    let registry = self.registry.as_ref().ok_or_else(|| {
                        InspectError::Other(format!(
                            "record names schema id {id} (Confluent wire format) but no schema \
                             registry is configured"
                        ))
                    })?;
                    registry.schema_blocking(id).map_err(ie)?.to_string()
                }
            };
            let schema = Schema::parse_str(&json).map_err(ie)?;
            self.cache.insert(header, schema);
        }
        let schema = self
            .cache
            .get(&header)
            .ok_or_else(|| InspectError::Other("schema cache".into()))?;
        let value = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .and_then(|r| r.read_value(&mut body))
            .map_err(ie)?;
        if !body.is_empty() {
            return Err(InspectError::Other(format!(
                "record with {header} has {} bytes after its body",
                body.len()
            )));
        }
        serde_json::Value::try_from(finite(value)).map_err(ie)
    }
}

/// JSON has no NaN or infinities: such floats are shown as Postgres spells them, as strings.
fn finite(value: apache_avro::types::Value) -> apache_avro::types::Value {
    use apache_avro::types::Value as V;
    let name = |f: f64| {
        if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        }
    };
    match value {
        V::Float(f) if !f.is_finite() => V::String(name(f64::from(f)).into()),
        V::Double(f) if !f.is_finite() => V::String(name(f).into()),
        V::Record(fields) => V::Record(fields.into_iter().map(|(k, v)| (k, finite(v))).collect()),
        V::Union(i, v) => V::Union(i, Box::new(finite(*v))),
        V::Array(items) => V::Array(items.into_iter().map(finite).collect()),
        V::Map(m) => V::Map(m.into_iter().map(|(k, v)| (k, finite(v))).collect()),
        v => v,
    }
}

/// Per topic with the prefix: partitions and record counts.
pub fn topic_counts(
    cluster: &Cluster,
    prefix: &str,
) -> Result<Vec<(String, usize, i64)>, InspectError> {
    let consumer = cluster.reader()?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(ie)?;
    let mut out = Vec::new();
    for t in md.topics() {
        if !t.name().starts_with(&format!("{prefix}.")) {
            continue;
        }
        let mut total = 0;
        for p in t.partitions() {
            let (lo, hi) = consumer
                .fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))
                .map_err(ie)?;
            total += hi - lo;
        }
        out.push((t.name().to_string(), t.partitions().len(), total));
    }
    out.sort();
    Ok(out)
}
