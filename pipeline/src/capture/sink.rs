//! Where captured events go: the origin Kafka cluster, or nowhere (the null sink, for measuring
//! decode and encode alone). A closed set, so an enum rather than a trait.
//!
//! Progress: every record handed to the producer yields a delivery future. The capture loop
//! groups them per transaction into [`AckBatch`]es, in WAL order, and the [`acker`] task awaits
//! them in that order; only when every record of a batch (and of every batch before it) is
//! acknowledged by the broker (`acks=all`, idempotent producer) is the batch's LSN published as
//! safe to confirm to Postgres.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ferry_connectors::kafka::{Cluster, KafkaError, TopicSpec};
use ferry_connectors::registry::{subject, SchemaRegistry};
use ferry_schemas::{ChangeEvent, EncodedSchema, Header, Lsn, TableId};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer};
use tokio::sync::{mpsc, watch};

use crate::error::CaptureError;
use crate::topics::{capture_held_topic, schema_topic, state_topic, table_topic};

/// Records of one transaction (or one slice of a large one) and the LSN that becomes safe once
/// they are all acknowledged (`None` for a slice in the middle of a transaction).
pub struct AckBatch {
    /// Safe position after this batch, if it closes a transaction.
    pub lsn: Option<Lsn>,
    /// Delivery futures, in production order.
    pub deliveries: Vec<(String, DeliveryFuture)>,
}

/// Awaits deliveries in order and publishes each batch's LSN once everything up to it is
/// acknowledged. Ends with an error on the first failed delivery; nothing after it is ever
/// published as safe.
pub async fn acker(
    mut rx: mpsc::Receiver<AckBatch>,
    safe: watch::Sender<Lsn>,
) -> Result<(), CaptureError> {
    while let Some(batch) = rx.recv().await {
        let lsn = batch
            .lsn
            .map_or_else(|| "mid-transaction".into(), |l| l.to_string());
        for (topic, d) in batch.deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, msg))) => {
                    let size =
                        msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len);
                    return Err(crate::error::undelivered(topic, lsn, &e, size));
                }
                Err(_) => {
                    return Err(CaptureError::Delivery {
                        topic,
                        lsn,
                        reason: "producer closed before the broker answered".into(),
                        permanent: false,
                    })
                }
            }
        }
        if let Some(l) = batch.lsn {
            safe.send_if_modified(|cur| {
                let moved = l > *cur;
                if moved {
                    *cur = l;
                }
                moved
            });
        }
    }
    Ok(())
}

/// Sends events to the origin cluster.
pub struct KafkaSink {
    cluster: Cluster,
    producer: ferry_connectors::kafka::Producer,
    prefix: String,
    partitions: i32,
    /// `retention.ms` of the table topics it creates (`topics.retention_ms`).
    retention_ms: i64,
    topics: HashMap<TableId, (String, i32)>,
    schemas: HashSet<[u8; 8]>,
    /// `capture.format = "confluent"`: the origin registry, and the ids it gave each schema
    /// version (by value fingerprint): (key id, value id).
    registry: Option<SchemaRegistry>,
    ids: HashMap<[u8; 8], (Option<u32>, u32)>,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// Where events go.
pub enum Sink {
    /// The origin Kafka cluster.
    Kafka(Box<KafkaSink>),
    /// Nowhere: events are encoded and dropped (benchmarks).
    Null {
        /// Scratch buffer, reused.
        buf: Vec<u8>,
    },
}

fn compacted(name: String) -> TopicSpec {
    TopicSpec {
        name,
        partitions: 1,
        config: crate::topics::compacted_settings(),
    }
}

impl Sink {
    /// A Kafka sink; creates the schema and state topics when missing. With a `registry`,
    /// records are written in the Confluent wire format with that registry's ids.
    pub async fn kafka(
        cluster: Cluster,
        prefix: &str,
        partitions: i32,
        linger_ms: u64,
        registry: Option<SchemaRegistry>,
        retention_ms: i64,
    ) -> Result<Sink, KafkaError> {
        cluster
            .ensure_topics(&[
                compacted(schema_topic(prefix)),
                compacted(state_topic(prefix)),
                TopicSpec {
                    name: capture_held_topic(prefix),
                    partitions: 1,
                    // Kept until resumed, however long that takes.
                    config: crate::topics::kept_settings(),
                },
            ])
            .await?;
        let producer = cluster.producer(linger_ms)?;
        Ok(Sink::Kafka(Box::new(KafkaSink {
            cluster,
            producer,
            prefix: prefix.to_string(),
            partitions,
            retention_ms,
            topics: HashMap::new(),
            schemas: HashSet::new(),
            registry,
            ids: HashMap::new(),
            key: Vec::new(),
            value: Vec::new(),
        })))
    }

    /// Makes a schema version known downstream: creates the table's topic when missing and
    /// publishes the key and value schemas to the schema topic, waiting for the broker.
    pub async fn register(&mut self, schema: &EncodedSchema) -> Result<(), CaptureError> {
        let Sink::Kafka(k) = self else {
            return Ok(());
        };
        let id = schema.table().id.clone();
        if !k.topics.contains_key(&id) {
            let topic = table_topic(&k.prefix, &id);
            k.cluster
                .ensure_topics(&[TopicSpec {
                    name: topic.clone(),
                    partitions: k.partitions,
                    config: crate::topics::change_settings(k.retention_ms),
                }])
                .await?;
            let count = k
                .cluster
                .partition_count(&topic, Duration::from_secs(10))?
                .max(1);
            tracing::info!(table = %id, topic, partitions = count, "table topic ready");
            k.topics.insert(id.clone(), (topic, count));
        }
        if let Some(registry) = &k.registry {
            if !k.ids.contains_key(&schema.value_fp.0) {
                // Before any record that names them: a record is only written once its ids
                // are known, so a registry that is down delays capture and loses nothing.
                let (topic, _) = &k.topics[&id];
                let key_id = if schema.has_key() {
                    Some(
                        registry
                            .register(&subject(topic, true), &schema.key_json)
                            .await?,
                    )
                } else {
                    None
                };
                let value_id = registry
                    .register(&subject(topic, false), &schema.value_json)
                    .await?;
                tracing::info!(table = %id, subject = subject(topic, false), value_id, ?key_id, "schema registered");
                k.ids.insert(schema.value_fp.0, (key_id, value_id));
            }
        }
        let topic = schema_topic(&k.prefix);
        if k.schemas.contains(&schema.key_fp.0) && k.schemas.contains(&schema.value_fp.0) {
            return Ok(());
        }
        for (fp, json) in [
            (schema.key_fp, &schema.key_json),
            (schema.value_fp, &schema.value_json),
        ] {
            if k.schemas.contains(&fp.0) {
                continue;
            }
            let key = fp.to_string();
            k.producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(json.as_bytes()),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| {
                    crate::error::undelivered(
                        topic.clone(),
                        "schema".into(),
                        &e,
                        key.len() + json.len(),
                    )
                })?;
            k.schemas.insert(fp.0);
        }
        tracing::info!(
            table = %schema.table().id,
            value_fingerprint = %schema.value_fp,
            columns = schema.table().columns.len(),
            "schema version published"
        );
        Ok(())
    }

    /// Encodes and sends one event; returns the encoded key + value size. Deliveries to await
    /// are appended to `pending`.
    pub async fn send(
        &mut self,
        schema: &EncodedSchema,
        event: &ChangeEvent,
        pending: &mut Vec<(String, DeliveryFuture)>,
    ) -> Result<usize, CaptureError> {
        let lsn = Lsn(event.source.lsn);
        let encode_err = |source| CaptureError::Encode { lsn, source };
        match self {
            Sink::Null { buf } => {
                buf.clear();
                if let Some(image) = event.key_image().filter(|_| schema.has_key()) {
                    schema.encode_key(image, buf).map_err(encode_err)?;
                }
                schema.encode_value(event, buf).map_err(encode_err)?;
                Ok(buf.len())
            }
            Sink::Kafka(k) => {
                let (topic, partitions) =
                    k.topics.get(&schema.table().id).cloned().ok_or_else(|| {
                        CaptureError::Setup(format!(
                            "internal: no topic registered for {}",
                            schema.table().id
                        ))
                    })?;
                let headers = match k.ids.get(&schema.value_fp.0) {
                    Some(&(key_id, value_id)) => (
                        Some(key_id.map_or(Header::SingleObject(schema.key_fp), Header::Confluent)),
                        Header::Confluent(value_id),
                    ),
                    None if k.registry.is_some() => {
                        return Err(CaptureError::Setup(format!(
                            "internal: no schema registry id for {}",
                            schema.table().id
                        )))
                    }
                    None => (
                        Some(Header::SingleObject(schema.key_fp)),
                        Header::SingleObject(schema.value_fp),
                    ),
                };
                let keyed = crate::record::encode(schema, event, headers, &mut k.key, &mut k.value)
                    .map_err(encode_err)?;
                for partition in crate::record::targets(event.op, partitions, schema.has_key()) {
                    let mut record = FutureRecord::to(&topic).payload(&k.value);
                    if keyed {
                        record = record.key(&k.key);
                    }
                    if let Some(p) = partition {
                        record = record.partition(p);
                    }
                    let d = ferry_connectors::kafka::enqueue(&k.producer, record)
                        .await
                        .map_err(|e| {
                            crate::error::undelivered(
                                topic.clone(),
                                lsn.to_string(),
                                &e,
                                k.key.len() + k.value.len(),
                            )
                        })?;
                    pending.push((topic.clone(), d));
                }
                Ok(k.key.len() + k.value.len())
            }
        }
    }

    /// Sends one held change of a stopped table (`record`, JSON) to the held topic, keyed by
    /// the table; its delivery joins `pending` like any other record of the transaction.
    pub async fn hold(
        &mut self,
        table: &TableId,
        record: &[u8],
        lsn: Lsn,
        pending: &mut Vec<(String, DeliveryFuture)>,
    ) -> Result<(), CaptureError> {
        let Sink::Kafka(k) = self else {
            return Ok(());
        };
        let topic = capture_held_topic(&k.prefix);
        let key = table.to_string();
        let d = ferry_connectors::kafka::enqueue(
            &k.producer,
            FutureRecord::to(&topic)
                .key(key.as_bytes())
                .payload(record)
                .partition(0),
        )
        .await
        .map_err(|e| {
            crate::error::undelivered(topic.clone(), lsn.to_string(), &e, key.len() + record.len())
        })?;
        pending.push((topic, d));
        Ok(())
    }

    /// The origin cluster and the topic prefix (`None` for the null sink).
    pub fn cluster(&self) -> Option<(&Cluster, &str)> {
        match self {
            Sink::Kafka(k) => Some((&k.cluster, &k.prefix)),
            Sink::Null { .. } => None,
        }
    }

    /// The producer, for writing state records.
    pub fn producer(&self) -> Option<&ferry_connectors::kafka::Producer> {
        match self {
            Sink::Kafka(k) => Some(&k.producer),
            Sink::Null { .. } => None,
        }
    }

    /// Waits until everything queued has been sent (on shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Sink::Kafka(k) = self {
            let _ = k.producer.flush(timeout);
        }
    }
}
