//! Looking at what landed: topic counts, schema export, and decoding a table topic with nothing
//! but a stock Kafka consumer and the Avro library (the way any consumer would).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use apache_avro::{GenericSingleObjectReader, Schema};
use ferry_connectors::kafka::Cluster;
use ferry_schemas::Fingerprint;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError as RdError;
use rdkafka::{Message, Offset, TopicPartitionList};

/// A failure while inspecting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InspectError(pub String);

fn ie(e: impl std::fmt::Display) -> InspectError {
    InspectError(e.to_string())
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
/// call starts, to `each`, one at a time (nothing is held in memory); `each` returns whether to
/// go on. Fails when a partition delivers nothing for a minute before reaching its end.
pub fn scan(
    cluster: &Cluster,
    topic: &str,
    partition: Option<i32>,
    mut each: impl FnMut(RawRecord) -> bool,
) -> Result<(), InspectError> {
    const STALL: Duration = Duration::from_secs(60);
    let consumer = cluster.reader().map_err(ie)?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(ie)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(InspectError(format!("topic {topic} does not exist")));
    }
    let partitions: Vec<i32> = match partition {
        Some(p) if partitions.contains(&p) => vec![p],
        Some(p) => {
            return Err(InspectError(format!(
                "topic {topic} has no partition {p} (it has {})",
                partitions.len()
            )))
        }
        None => partitions,
    };
    let mut tpl = TopicPartitionList::new();
    // Per partition with records, the offset after its last record now.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for &p in &partitions {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(ie)?;
        if hi > lo {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(ie)?;
            ends.insert(p, hi);
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl).map_err(ie)?;
    let mut last_progress = std::time::Instant::now();
    while !ends.is_empty() {
        if last_progress.elapsed() > STALL {
            return Err(InspectError(format!(
                "timed out reading {topic}: nothing for {STALL:?} from partitions {:?}, \
                 which have not reached their end",
                ends.keys().collect::<Vec<_>>()
            )));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(RdError::PartitionEOF(p))) => {
                ends.remove(&p);
            }
            Some(Err(e)) => return Err(ie(e)),
            Some(Ok(m)) => {
                last_progress = std::time::Instant::now();
                let p = m.partition();
                let Some(&end) = ends.get(&p) else { continue };
                if m.offset() + 1 >= end {
                    ends.remove(&p);
                }
                if m.offset() >= end {
                    continue;
                }
                let record = (
                    p,
                    m.offset(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                );
                if !each(record) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Every schema in the schema topic, by fingerprint (newest record wins).
pub fn load_schemas(
    cluster: &Cluster,
    prefix: &str,
) -> Result<HashMap<String, String>, InspectError> {
    let topic = crate::sink::schema_topic(prefix);
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
    std::fs::create_dir_all(dir).map_err(|e| InspectError(format!("{}: {e}", dir.display())))?;
    let schemas = load_schemas(cluster, prefix)?;
    for (fp, json) in &schemas {
        let path = dir.join(format!("{fp}.avsc"));
        std::fs::write(&path, json)
            .map_err(|e| InspectError(format!("{}: {e}", path.display())))?;
    }
    Ok(schemas.len())
}

/// Decodes one single-object record with the schemas from the schema topic, as JSON.
pub fn decode_record(
    schemas: &HashMap<String, String>,
    cache: &mut HashMap<String, GenericSingleObjectReader>,
    bytes: &[u8],
) -> Result<serde_json::Value, InspectError> {
    let fp = Fingerprint::from_record(bytes).map_err(ie)?.to_string();
    if !cache.contains_key(&fp) {
        let json = schemas
            .get(&fp)
            .ok_or_else(|| InspectError(format!("schema {fp} is not in the schema topic")))?;
        let schema = Schema::parse_str(json).map_err(ie)?;
        let reader = GenericSingleObjectReader::builder()
            .schema(schema)
            .build()
            .map_err(ie)?;
        cache.insert(fp.clone(), reader);
    }
    let reader = cache
        .get(&fp)
        .ok_or_else(|| InspectError("schema cache".into()))?;
    let mut cursor = bytes;
    let value = reader.read_value(&mut cursor).map_err(ie)?;
    serde_json::Value::try_from(value).map_err(ie)
}

/// Per topic with the prefix: partitions and record counts.
pub fn topic_counts(
    cluster: &Cluster,
    prefix: &str,
) -> Result<Vec<(String, usize, i64)>, InspectError> {
    let consumer = cluster.reader().map_err(ie)?;
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
