//! Kafka: client settings, topic administration, and the idempotent producer capture writes
//! through. Everything speaks the plain Kafka protocol through `rdkafka`, so any cluster works
//! by configuration alone.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use serde::Deserialize;

/// How to reach one Kafka cluster.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Extra librdkafka properties (e.g. `security.protocol`, `sasl.mechanism`,
    /// `sasl.password`). Values of keys that look secret are never printed.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let secret = ["password", "secret", "token", "key"]
                    .iter()
                    .any(|s| k.contains(s));
                (k.as_str(), if secret { "***" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("properties", &props)
            .finish()
    }
}

/// A Kafka failure with what Ferry was doing at the time.
#[derive(Debug, thiserror::Error)]
#[error("kafka {cluster} ({servers}): {action}: {source}")]
pub struct KafkaError {
    /// `origin` or `destination`.
    pub cluster: String,
    /// The bootstrap servers.
    pub servers: String,
    /// What was being done (`creating topic ferry.public.t`, …).
    pub action: String,
    /// The client's error.
    pub source: RdError,
}

impl KafkaError {
    /// Whether retrying could help: configuration and authorization errors are permanent,
    /// everything else (timeouts, transport, broker not available) is retried.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self.source.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidTopic
            )
        ) && !matches!(self.source, RdError::ClientConfig(..))
    }
}

/// Client context for readers that run to the end of a partition: reaching the end is the
/// expected outcome there, not an error worth a log line.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: RdError, reason: &str) {
        let eof = matches!(error, RdError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if !eof {
            tracing::error!(error = %error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// A consumer that reads partitions to their end, outside any consumer group.
pub type Reader = BaseConsumer<ReaderContext>;

/// Producer context that keeps the bytes the client wrote to the brokers' sockets (librdkafka's
/// own `txbytes` statistics: what went on the wire, protocol framing included).
#[derive(Clone, Debug, Default)]
pub struct WireContext {
    tx_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl WireContext {
    /// Bytes written to brokers so far (as of the last statistics callback, every second).
    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ClientContext for WireContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let total: u64 = statistics.brokers.values().map(|b| b.txbytes).sum();
        self.tx_bytes
            .store(total, std::sync::atomic::Ordering::Relaxed);
    }

    fn error(&self, error: RdError, reason: &str) {
        tracing::error!(error = %error, reason, "kafka client error");
    }
}

/// Ferry's producer type: idempotent, with wire statistics.
pub type Producer = FutureProducer<WireContext>;

/// Hands a record to the producer without waiting for the broker; while the local queue is
/// full, waits for it to drain. Returns the delivery to await, or the first other error.
pub async fn enqueue<K, P>(
    producer: &Producer,
    mut record: rdkafka::producer::FutureRecord<'_, K, P>,
) -> Result<rdkafka::producer::DeliveryFuture, RdError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(d) => return Ok(d),
            Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// A topic to create when missing.
#[derive(Clone, Debug)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Topic configuration (e.g. `cleanup.policy=compact`).
    pub config: Vec<(String, String)>,
}

/// A named cluster: configuration plus the name used in messages.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// `origin` or `destination`.
    pub name: String,
    /// Settings.
    pub config: KafkaConfig,
}

/// How long [`Cluster::ensure_topics`] waits for new topics' partition leaders.
const LEADER_WAIT: Duration = Duration::from_secs(10);

impl Cluster {
    /// A cluster handle.
    pub fn new(name: impl Into<String>, config: KafkaConfig) -> Self {
        Cluster {
            name: name.into(),
            config,
        }
    }

    fn err(&self, action: impl Into<String>, source: RdError) -> KafkaError {
        KafkaError {
            cluster: self.name.clone(),
            servers: self.config.bootstrap_servers.clone(),
            action: action.into(),
            source,
        }
    }

    /// Base client settings: bootstrap servers plus the configured extra properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.config.bootstrap_servers);
        for (k, v) in &self.config.properties {
            c.set(k, v);
        }
        c
    }

    /// An idempotent producer (`acks=all`, zstd, murmur2 partitioner so keys land where Java
    /// clients would put them).
    pub fn producer(&self, linger_ms: u64) -> Result<Producer, KafkaError> {
        self.producer_with(linger_ms, "zstd")
    }

    /// Like [`Cluster::producer`] with another `compression.type` (`none` for payloads that
    /// are compressed already).
    pub fn producer_with(&self, linger_ms: u64, compression: &str) -> Result<Producer, KafkaError> {
        self.producer_metered(linger_ms, compression)
            .map(|(p, _)| p)
    }

    /// Like [`Cluster::producer_with`], also returning the handle that reads the bytes the
    /// producer put on the wire.
    pub fn producer_metered(
        &self,
        linger_ms: u64,
        compression: &str,
    ) -> Result<(Producer, WireContext), KafkaError> {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", compression)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", linger_ms.to_string())
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", "300000")
            .set("statistics.interval.ms", "1000");
        for (k, v) in &self.config.properties {
            c.set(k, v);
        }
        let wire = WireContext::default();
        c.create_with_context(wire.clone())
            .map(|p| (p, wire))
            .map_err(|e| self.err("creating producer", e))
    }

    /// A transactional producer (`transactional.id` = `id`, transactions initialised: a
    /// producer of the same id before it is fenced, its open transaction aborted), otherwise
    /// like [`Cluster::producer`]. Blocking.
    pub fn transactional_producer(&self, linger_ms: u64, id: &str) -> Result<Producer, KafkaError> {
        use rdkafka::producer::Producer as _;
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "zstd")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", linger_ms.to_string())
            .set("queue.buffering.max.messages", "200000")
            .set("transactional.id", id)
            // A transaction left open (its producer died) holds read_committed consumers back
            // until the broker aborts it after this long, unless a producer of the same id
            // starts first; its messages may wait as long.
            .set("transaction.timeout.ms", "60000")
            .set("message.timeout.ms", "60000");
        for (k, v) in &self.config.properties {
            c.set(k, v);
        }
        let p: Producer = c
            .create_with_context(WireContext::default())
            .map_err(|e| self.err("creating a transactional producer", e))?;
        p.init_transactions(Duration::from_secs(30))
            .map_err(|e| self.err(format!("initialising transactions of {id}"), e))?;
        Ok(p)
    }

    /// A consumer outside any group, for reading a topic from its start.
    pub fn reader(&self) -> Result<Reader, KafkaError> {
        let mut c = self.client_config();
        c.set("group.id", "ferry-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        c.create_with_context(ReaderContext)
            .map_err(|e| self.err("creating consumer", e))
    }

    /// Creates the topics that do not exist yet; existing ones are left as they are.
    pub async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), KafkaError> {
        if topics.is_empty() {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(|e| self.err("creating admin client", e))?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                t.config.iter().fold(
                    NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(-1)),
                    |n, (k, v)| n.set(k, v),
                )
            })
            .collect();
        // Bounded end to end: an unreachable cluster fails the call (and the caller retries,
        // logging it) instead of holding it for librdkafka's default minute.
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(15)));
        let results = admin
            .create_topics(&new, &opts)
            .await
            .map_err(|e| self.err("creating topics", e))?;
        let mut created = Vec::new();
        for r in results {
            match r {
                Ok(name) => created.push(name),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(self.err(format!("creating topic {name}"), RdError::AdminOp(code)))
                }
            }
        }
        if created.is_empty() {
            return Ok(());
        }
        // A topic Kafka has just created has no partition leader for a moment; reads and
        // writes in that moment fail with NotLeaderForPartition. Wait for the leaders here, so
        // a stage's first use of a new topic does not start with an error and a retry.
        let cluster = self.clone();
        tokio::task::spawn_blocking(move || cluster.await_leaders(&created, LEADER_WAIT))
            .await
            .unwrap_or(Ok(()))
    }

    /// Waits until every partition of `topics` has a leader, for at most `timeout`. Running out
    /// of time is not an error: the caller's first read or write reports what is wrong.
    fn await_leaders(&self, topics: &[String], timeout: Duration) -> Result<(), KafkaError> {
        let reader = self.reader()?;
        let deadline = std::time::Instant::now() + timeout;
        let led = |topic: &str| -> bool {
            reader
                .fetch_metadata(Some(topic), Duration::from_secs(2))
                .ok()
                .and_then(|md| {
                    md.topics().iter().find(|t| t.name() == topic).map(|t| {
                        t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions()
                                .iter()
                                .all(|p| p.error().is_none() && p.leader() >= 0)
                    })
                })
                .unwrap_or(false)
        };
        for topic in topics {
            while !led(topic) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Partition counts of the given topics (0 for a topic the cluster does not know).
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> Result<i32, KafkaError> {
        let consumer = self.reader()?;
        let md = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| self.err(format!("reading metadata of {topic}"), e))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32))
    }

    /// The names of every topic the cluster has that `wanted` accepts.
    pub fn topic_names(
        &self,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<Vec<String>, KafkaError> {
        let md = self
            .reader()?
            .fetch_metadata(None, timeout)
            .map_err(|e| self.err("fetching metadata", e))?;
        Ok(md
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|t| wanted(t))
            .collect())
    }

    /// The settings `names` each topic has (its own or the broker's default), for the topics
    /// that exist.
    pub async fn topic_settings(
        &self,
        topics: &[String],
        names: &[&str],
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>, KafkaError> {
        use rdkafka::admin::{OwnedResourceSpecifier, ResourceSpecifier};
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(|e| self.err("creating admin client", e))?;
        let specs: Vec<ResourceSpecifier<'_>> =
            topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
        let results = admin
            .describe_configs(&specs, &opts)
            .await
            .map_err(|e| self.err("describing topics", e))?;
        let mut out = BTreeMap::new();
        for r in results.into_iter().flatten() {
            let OwnedResourceSpecifier::Topic(topic) = &r.specifier else {
                continue;
            };
            let settings = r
                .entries
                .iter()
                .filter(|e| names.contains(&e.name.as_str()))
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                .collect();
            out.insert(topic.clone(), settings);
        }
        Ok(out)
    }

    /// A client of consumer `group` that does not join it (no subscription).
    fn group_client(&self, group: &str) -> Result<BaseConsumer, KafkaError> {
        self.client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| self.err("creating a consumer", e))
    }

    /// The offset consumer `group` committed for `tp`, if any. Blocking.
    pub fn committed_offset(
        &self,
        group: &str,
        tp: &TopicPartition,
    ) -> Result<Option<i64>, KafkaError> {
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&tp.topic, tp.partition);
        let got = self
            .group_client(group)?
            .committed_offsets(tpl, Duration::from_secs(15))
            .map_err(|e| self.err(format!("reading the committed offset of {tp}"), e))?;
        Ok(got
            .find_partition(&tp.topic, tp.partition)
            .and_then(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            }))
    }

    /// Commits `offset` for `tp` in consumer `group`, from outside the group: the broker
    /// refuses it while the group has members. Blocking.
    pub fn commit_offset(
        &self,
        group: &str,
        tp: &TopicPartition,
        offset: i64,
    ) -> Result<(), KafkaError> {
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&tp.topic, tp.partition, rdkafka::Offset::Offset(offset))
            .map_err(|e| self.err("commit", e))?;
        self.group_client(group)?
            .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
            .map_err(|e| self.err(format!("committing {tp} at {offset} for group {group}"), e))
    }

    /// Asks the cluster for its brokers; used by `ferry check`.
    pub fn probe(&self, timeout: Duration) -> Result<Vec<String>, KafkaError> {
        let consumer = self.reader()?;
        let md = consumer
            .fetch_metadata(None, timeout)
            .map_err(|e| self.err("fetching metadata", e))?;
        Ok(md
            .brokers()
            .iter()
            .map(|b| format!("{}:{} (id {})", b.host(), b.port(), b.id()))
            .collect())
    }
}

/// One topic's position for a consumer group, summed over its partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicLag {
    /// The topic.
    pub topic: String,
    /// Offsets the group committed (a partition without a commit counts from its low
    /// watermark).
    pub committed: i64,
    /// End offsets.
    pub end: i64,
    /// Whether the group committed anything in this topic, i.e. a member consumes it.
    pub claimed: bool,
}

impl TopicLag {
    /// Records not consumed yet.
    pub fn lag(&self) -> i64 {
        (self.end - self.committed).max(0)
    }
}

/// Reads a consumer group's committed offsets against end offsets, with one client kept open.
/// It does not join the group.
pub struct LagReader {
    cluster: Cluster,
    consumer: Reader,
}

impl LagReader {
    /// A reader for `group`.
    pub fn new(cluster: &Cluster, group: &str) -> Result<LagReader, KafkaError> {
        let mut c = cluster.client_config();
        c.set("group.id", group).set("enable.auto.commit", "false");
        Ok(LagReader {
            cluster: cluster.clone(),
            consumer: c
                .create_with_context(ReaderContext)
                .map_err(|e| cluster.err("creating consumer", e))?,
        })
    }

    /// The group's position in every topic `wanted` picks, sorted by topic.
    pub fn read(&self, wanted: impl Fn(&str) -> bool) -> Result<Vec<TopicLag>, KafkaError> {
        let timeout = Duration::from_secs(10);
        let consumer = &self.consumer;
        let md = consumer
            .fetch_metadata(None, timeout)
            .map_err(|e| self.cluster.err("fetching metadata", e))?;
        let mut topics: Vec<_> = md.topics().iter().filter(|t| wanted(t.name())).collect();
        topics.sort_by_key(|t| t.name());
        let mut rows = Vec::with_capacity(topics.len());
        for mt in topics {
            let t = mt.name().to_string();
            let mut tpl = rdkafka::TopicPartitionList::new();
            for p in mt.partitions() {
                tpl.add_partition(&t, p.id());
            }
            let committed = consumer.committed_offsets(tpl, timeout).map_err(|e| {
                self.cluster
                    .err(format!("reading committed offsets of {t}"), e)
            })?;
            let (mut done, mut end, mut claimed) = (0, 0, false);
            for e in committed.elements() {
                let tp = TopicPartition::new(t.clone(), e.partition());
                // Gone since the metadata was read: nothing to count.
                let Some((lo, hi)) = self.cluster.watermarks_with(consumer, &tp)? else {
                    continue;
                };
                end += hi;
                done += match e.offset() {
                    rdkafka::Offset::Offset(o) => {
                        claimed = true;
                        o
                    }
                    _ => lo,
                };
            }
            rows.push(TopicLag {
                topic: t,
                committed: done,
                end,
                claimed,
            });
        }
        Ok(rows)
    }
}

/// A topic and one of its partitions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
}

impl TopicPartition {
    /// `topic[partition]`.
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// One record, as [`Cluster::read_partition`] hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRecord {
    /// Its offset.
    pub offset: i64,
    /// Its key (`None`: no key).
    pub key: Option<Vec<u8>>,
    /// Its value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// Its timestamp, epoch milliseconds, when it has one.
    pub timestamp_ms: Option<i64>,
    /// Its headers, in order (a header without a value has an empty one).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ReadRecord {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Which offsets a [`Cluster::read_partition`] reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// The first offset (`None`, or one below the log start: from the log start).
    pub from: Option<i64>,
    /// The offset to stop before (`None`, or one beyond it: the partition's end when the read
    /// starts, its high watermark).
    pub to: Option<i64>,
}

impl Span {
    /// From the log start to the end.
    pub const ALL: Span = Span {
        from: None,
        to: None,
    };

    /// From `from` to the end.
    pub fn from(from: i64) -> Span {
        Span {
            from: Some(from),
            to: None,
        }
    }

    /// Offsets `from..to`.
    pub fn between(from: i64, to: i64) -> Span {
        Span {
            from: Some(from),
            to: Some(to),
        }
    }
}

/// What a [`Cluster::read_partition`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// The partition's log start offset when the read began.
    pub low: i64,
    /// Its high watermark then.
    pub high: i64,
    /// Whether the topic exists (a missing topic reads as empty).
    pub exists: bool,
}

/// How long a read may go without a record before it reports the partition stalled.
pub const READ_STALL: Duration = Duration::from_secs(60);

impl Cluster {
    /// A partition's log start offset and high watermark; `None` when the topic (or the
    /// partition) does not exist.
    pub fn watermarks(&self, tp: &TopicPartition) -> Result<Option<(i64, i64)>, KafkaError> {
        let reader = self.reader()?;
        self.watermarks_with(&reader, tp)
    }

    fn watermarks_with(
        &self,
        reader: &Reader,
        tp: &TopicPartition,
    ) -> Result<Option<(i64, i64)>, KafkaError> {
        // A leader moving or a connection being re-established answers with a passing error;
        // ask again for a while before reporting it.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            match reader.fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(10)) {
                Ok(w) => return Ok(Some(w)),
                Err(e) if unknown_topic(&e) => return Ok(None),
                Err(e) => {
                    let e = self.err(format!("reading the watermarks of {tp}"), e);
                    if !e.is_retryable() || std::time::Instant::now() > deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// Reads `span` of one partition, handing each record to `each` in offset order until it
    /// returns false. The end is fixed when the read starts: records produced meanwhile are
    /// not read. A partition that delivers nothing for [`READ_STALL`] before its end is an
    /// error (retryable); a missing topic reads as empty. Blocking: see
    /// [`Cluster::fold_partition`] for async callers.
    pub fn read_partition(
        &self,
        tp: &TopicPartition,
        span: Span,
        mut each: impl FnMut(ReadRecord) -> bool,
    ) -> Result<Read, KafkaError> {
        let reader = self.reader()?;
        let Some((low, high)) = self.watermarks_with(&reader, tp)? else {
            return Ok(Read::default());
        };
        let read = Read {
            low,
            high,
            exists: true,
        };
        let from = span.from.unwrap_or(low).max(low);
        let to = span.to.unwrap_or(high).min(high);
        if from >= to {
            return Ok(read);
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&tp.topic, tp.partition, rdkafka::Offset::Offset(from))
            .and_then(|()| reader.assign(&tpl))
            .map_err(|e| self.err(format!("assigning {tp}"), e))?;
        let mut last_record = std::time::Instant::now();
        loop {
            use rdkafka::Message;
            match reader.poll(Duration::from_millis(200)) {
                None => {
                    if last_record.elapsed() > READ_STALL {
                        return Err(self.err(
                            format!("reading {tp}: nothing for {READ_STALL:?} before offset {to}"),
                            RdError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut),
                        ));
                    }
                }
                // The end now: `to` lies beyond the last record (transaction markers, or
                // records compacted away).
                Some(Err(RdError::PartitionEOF(_))) => return Ok(read),
                Some(Err(e)) => {
                    // A passing condition (all connections down for a moment, a leader
                    // moving): the client recovers by itself; only a stall ends the read.
                    let e = self.err(format!("reading {tp}"), e);
                    if !e.is_retryable() || last_record.elapsed() > READ_STALL {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Some(Ok(m)) => {
                    last_record = std::time::Instant::now();
                    if m.offset() >= to {
                        return Ok(read);
                    }
                    let offset = m.offset();
                    let go_on = each(ReadRecord {
                        offset,
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        timestamp_ms: m.timestamp().to_millis(),
                        headers: m
                            .headers()
                            .map(|h| {
                                use rdkafka::message::Headers;
                                h.iter()
                                    .map(|x| {
                                        (x.key.to_string(), x.value.unwrap_or_default().to_vec())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                    if !go_on || offset + 1 >= to {
                        return Ok(read);
                    }
                }
            }
        }
    }

    /// [`Cluster::read_partition`] for async callers: runs on the blocking pool, folding every
    /// record into `acc` (`each` returns whether to go on), and returns it.
    pub async fn fold_partition<S: Send + 'static>(
        &self,
        tp: &TopicPartition,
        span: Span,
        mut acc: S,
        mut each: impl FnMut(&mut S, ReadRecord) -> bool + Send + 'static,
    ) -> Result<(S, Read), KafkaError> {
        let tp = tp.clone();
        self.blocking(format!("reading {tp}"), move |cluster| {
            let read = cluster.read_partition(&tp, span, |r| each(&mut acc, r))?;
            Ok((acc, read))
        })
        .await
    }

    /// A consumer group's position in every topic `wanted` picks ([`LagReader::read`]), for
    /// async callers.
    pub async fn group_lag(
        &self,
        group: &str,
        wanted: impl Fn(&str) -> bool + Send + 'static,
    ) -> Result<Vec<TopicLag>, KafkaError> {
        let group = group.to_string();
        self.blocking(
            format!("reading the position of group {group}"),
            move |cluster| LagReader::new(cluster, &group)?.read(wanted),
        )
        .await
    }

    /// Runs blocking client work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        work: impl FnOnce(&Cluster) -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, KafkaError> {
        let cluster = self.clone();
        tokio::task::spawn_blocking(move || work(&cluster))
            .await
            .map_err(|e| self.err(format!("{what}: the task ended: {e}"), RdError::Canceled))?
    }
}

/// Whether the broker says a topic or partition does not exist.
pub fn unknown_topic(e: &RdError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}
