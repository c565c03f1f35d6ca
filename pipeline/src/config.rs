//! Configuration: plain serde data, loaded from a TOML file layered with `FERRY__SECTION__KEY`
//! environment overrides, validated once at start. Errors name the field path.

use std::path::Path;

use ferry_connectors::kafka::KafkaConfig;
use ferry_connectors::postgres::PgConfig;
use ferry_connectors::registry::{RegistryConfig, RegistryError, SchemaRegistry};
use ferry_schemas::TableId;
use serde::Deserialize;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The origin region: its database and Kafka cluster.
    pub origin: Origin,
    /// The destination region.
    pub destination: Destination,
    /// Change capture settings.
    #[serde(default)]
    pub capture: Capture,
    /// Shipping settings.
    #[serde(default)]
    pub ship: Ship,
    /// Apply settings.
    #[serde(default)]
    pub apply: Apply,
    /// Backfill throttling.
    #[serde(default)]
    pub backfill: BackfillCfg,
    /// Where long-running commands serve Prometheus metrics.
    #[serde(default)]
    pub metrics: Metrics,
    /// Settings of the topics Ferry creates.
    #[serde(default)]
    pub topics: Topics,
}

/// Settings of the topics Ferry creates. A topic that exists already keeps its own (`ferry
/// check` shows them); `kafka-configs --alter` changes them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    /// `retention.ms` of the change topics: origin table topics, the batch topic, replicated
    /// and aggregate topics (`-1`: kept for ever). A stage stopped for longer than this loses
    /// the changes retention deletes: the shipper then stops that partition and says so, never
    /// skipping. Schema, state and control topics are compacted; held and quarantine topics are
    /// kept for ever.
    pub retention_ms: i64,
}

impl Config {
    /// How long apply keeps its bookkeeping (`apply.bookkeeping_ms`): `None` for ever.
    pub fn bookkeeping_horizon(&self) -> Option<std::time::Duration> {
        let ms = match self.apply.bookkeeping_ms {
            0 if self.topics.retention_ms < 0 => return None,
            0 => self.topics.retention_ms.saturating_mul(2),
            ms if ms < 0 => return None,
            ms => ms,
        };
        Some(std::time::Duration::from_millis(ms as u64))
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            retention_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// Metrics and control endpoint.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// `host:port` to serve `GET /metrics` (and the job control API) on; empty turns it off.
    pub listen: String,
    /// Bearer token required by every request that changes state (`POST /jobs/...`); empty
    /// refuses them all.
    pub control_token: ferry_connectors::Secret,
}

/// Shipping settings: micro-batches from the origin topics to the destination cluster.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ship {
    /// Consumer group of the shippers (several `ferry ship` processes share the partitions).
    pub group_id: String,
    /// Destination topic for batches; empty means `<capture.topic_prefix>.batches`.
    pub batch_topic: String,
    /// Partitions of the batch topic when Ferry creates it.
    pub batch_partitions: i32,
    /// Cut a batch at this many changes. 20k changes compress well and compact well while
    /// keeping a batch's memory to a few MB.
    pub max_events: usize,
    /// Cut a batch at this many bytes of origin records.
    pub max_bytes: usize,
    /// Cut a batch this long after its first change, so quiet tables still ship promptly.
    pub linger_ms: u64,
    /// Bytes of origin records buffered across all partitions; past it the largest buffer is
    /// shipped early. This (plus one batch being encoded) bounds the shipper's memory.
    pub max_buffered_bytes: usize,
    /// A single origin record larger than this stops its partition with an error naming it.
    pub max_record_bytes: usize,
    /// zstd level for payloads (1-22). 3 is zstd's default: most of the gain at a fraction of
    /// the CPU of high levels.
    pub zstd_level: i32,
    /// Compact batches to their net effect per key.
    pub compaction: bool,
    /// Tables (`schema.table`) shipped without compaction.
    pub uncompacted_tables: Vec<String>,
    /// Named SQL transforms run on each batch near the data.
    pub transforms: Vec<Transform>,
    /// Consumer group session timeout: how long a crashed shipper's partitions wait before
    /// another member takes them (Kafka's default, 45 s; see `instance_id` for quick restarts).
    pub session_timeout_ms: u64,
    /// Static group membership id (`group.instance.id`): a restarted shipper with the same id
    /// takes its partitions back at once instead of waiting for its old session to expire.
    /// Give every shipper process its own; empty disables static membership.
    pub instance_id: String,
    /// Price of egress in $ per GB, keyed by `<source region>-><destination region>`.
    pub prices_per_gb: std::collections::BTreeMap<String, f64>,
}

impl Default for Ship {
    fn default() -> Self {
        Ship {
            group_id: "ferry-ship".into(),
            batch_topic: String::new(),
            batch_partitions: 3,
            max_events: 20_000,
            max_bytes: 8 << 20,
            linger_ms: 1_000,
            max_buffered_bytes: 64 << 20,
            max_record_bytes: 4 << 20,
            zstd_level: 3,
            compaction: true,
            uncompacted_tables: Vec::new(),
            transforms: Vec::new(),
            session_timeout_ms: 45_000,
            instance_id: String::new(),
            prices_per_gb: std::collections::BTreeMap::new(),
        }
    }
}

/// A named SQL transform: its results are shipped to `<prefix>.agg.<name>` in the destination.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transform {
    /// Name (also the topic suffix).
    pub name: String,
    /// The table (`schema.table`) whose batches it runs on.
    pub table: String,
    /// DataFusion SQL over the table `changes` (columns: `_op` as c/u/d/r/t, `_lsn`, and the
    /// after image's columns by name).
    pub sql: String,
    /// Ship only the transform's results for this table, not the rows.
    #[serde(default)]
    pub replace_rows: bool,
}

/// The origin region.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// Region name, recorded in every event's `source.region`.
    pub region: String,
    /// The source database.
    pub postgres: PgConfig,
    /// The origin Kafka cluster.
    pub kafka: KafkaConfig,
    /// The origin cluster's schema registry (needed for `capture.format = "confluent"`).
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
}

/// The destination region.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Region name.
    pub region: String,
    /// The destination Kafka cluster.
    pub kafka: KafkaConfig,
    /// The destination cluster's schema registry (needed for `capture.format = "confluent"`).
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// The destination database `ferry apply` writes to (optional).
    #[serde(default)]
    pub postgres: Option<PgConfig>,
}

/// How backfills are throttled (AIMD on the origin's health; see `throttle`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillCfg {
    /// Default rows per chunk.
    pub chunk_rows: usize,
    /// Ceiling of the adaptive rate, rows per second (a hard cap).
    pub max_rows_per_sec: f64,
    /// Floor of the adaptive rate.
    pub min_rows_per_sec: f64,
    /// Additive increase per healthy second.
    pub increase_rows_per_sec: f64,
    /// Multiplicative decrease on an unhealthy second.
    pub decrease: f64,
    /// How far the canary query's p99 may rise over its baseline (1.25 = 25%).
    pub canary_tolerance: f64,
    /// Canary rises below this many ms never count (single slow samples of a few ms are the
    /// canary's own noise); the canary is there to catch stalls.
    pub canary_slack_ms: f64,
    /// The share of live commits a backfill may cost, measured in short quiet periods in
    /// which it pauses (see `live_probe_every_secs`). 0 turns the signal off.
    pub live_harm_budget: f64,
    /// Under live load, a backfill pauses for `live_probe_quiet_secs` every this many seconds
    /// to measure the live commit rate without it.
    pub live_probe_every_secs: f64,
    /// How long each quiet period lasts.
    pub live_probe_quiet_secs: f64,
    /// Budget for WAL retained by the slot while a backfill runs.
    pub wal_budget_bytes: u64,
    /// The canary query, run 20 times a second on its own connection and thread; pick one
    /// like the live workload's (`SELECT 1` only sees connection and CPU pressure).
    pub canary_sql: String,
    /// The canary's sliding window (its p99 is taken over it; the baseline is one window
    /// measured before the first chunk).
    pub canary_window_secs: u64,
    /// Live lane: changes the shipper group may have unshipped before backfills are cut (their
    /// rows queue in the same partitions as live changes); replays yield at half of it. 0
    /// turns the signal off.
    pub live_lag_budget: u64,
    /// Destination acknowledgement time (a probe record once a second) above which backfills
    /// and replays are cut, ms. 0 turns the signal off.
    pub produce_latency_budget_ms: f64,
    /// Hard cap on the bytes per second a job emits (0: none).
    pub max_bytes_per_sec: f64,
    /// A read replica for backfill chunks, so the primary only serves the watermark writes
    /// (live capture keeps the primary's slot). Same fields as `origin.postgres`.
    pub replica: Option<PgConfig>,
    /// How long `ferry backfill --sample` waits for the sample to verify at the destination.
    pub sample_timeout_secs: u64,
}

impl Default for BackfillCfg {
    fn default() -> Self {
        BackfillCfg {
            chunk_rows: 1_000,
            max_rows_per_sec: 50_000.0,
            min_rows_per_sec: 200.0,
            increase_rows_per_sec: 5_000.0,
            decrease: 0.5,
            canary_tolerance: 1.25,
            canary_slack_ms: 10.0,
            live_harm_budget: 0.05,
            live_probe_every_secs: 3.0,
            live_probe_quiet_secs: 1.0,
            wal_budget_bytes: 1 << 30,
            canary_sql: "SELECT 1".into(),
            canary_window_secs: 5,
            live_lag_budget: 200_000,
            produce_latency_budget_ms: 2_000.0,
            max_bytes_per_sec: 0.0,
            replica: None,
            sample_timeout_secs: 300,
        }
    }
}

/// What a corrupt batch does to its partition.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnCorrupt {
    /// Quarantine it and stop the partition until a human looks (the default).
    #[default]
    Stop,
    /// Quarantine it and carry on with the next batch.
    Quarantine,
}

/// Apply settings: the destination side.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Apply {
    /// Consumer group of the appliers.
    pub group_id: String,
    /// Static group membership id (see `ship.instance_id`).
    pub instance_id: String,
    /// Write replicated per-table topics in the destination cluster.
    pub topics: bool,
    /// Write to `destination.postgres` (when configured).
    pub postgres: bool,
    /// What a batch that fails verification does to its partition.
    pub on_corrupt: OnCorrupt,
    /// Dead-letter topic; empty means `<capture.topic_prefix>.quarantine`.
    pub quarantine_topic: String,
    /// Write each batch's replicated records in one Kafka transaction with its batch-topic
    /// offset, so a `read_committed` consumer sees every change once, crashes included.
    pub exactly_once_topics: bool,
    /// Keep applied batch ids and delete tombstones this long (ms); 0: twice
    /// `topics.retention_ms` (never pruned when that is -1); -1: never pruned.
    pub bookkeeping_ms: i64,
}

impl Default for Apply {
    fn default() -> Self {
        Apply {
            group_id: "ferry-apply".into(),
            instance_id: String::new(),
            topics: true,
            postgres: true,
            on_corrupt: OnCorrupt::Stop,
            quarantine_topic: String::new(),
            exactly_once_topics: true,
            bookkeeping_ms: 0,
        }
    }
}

/// Change capture settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capture {
    /// Replication slot name (created when missing).
    pub slot: String,
    /// Publication name (created when missing).
    pub publication: String,
    /// Tables to capture as `schema.table`; empty means every table of an existing
    /// publication (see `all_tables`).
    pub tables: Vec<String>,
    /// With no `tables` and no publication yet, create it `FOR ALL TABLES`. Off by default:
    /// such a publication needs superuser, takes in every table created later, and makes
    /// Postgres refuse UPDATE and DELETE on any table without a replica identity.
    pub all_tables: bool,
    /// Install an event trigger (`ferry_columns`, needs superuser) that writes each altered
    /// table's column numbers into the WAL at the DDL, so a renamed column is followed as a
    /// rename in the destination even when capture reads the change later. Without it (or
    /// when it cannot be installed) renames are recognised only while capture keeps up.
    pub ddl_trigger: bool,
    /// Topics are named `<topic_prefix>.<schema>.<table>`.
    pub topic_prefix: String,
    /// How keys and values in the table topics (origin and replicated) name their schema.
    pub format: Format,
    /// Partitions of each new table topic.
    pub partitions: i32,
    /// Whether to snapshot tables' existing rows before streaming their changes.
    pub snapshot: bool,
    /// Rows per snapshot chunk. 10k rows keeps a chunk's key set small in memory while making
    /// the per-chunk watermark writes negligible.
    pub snapshot_chunk_rows: usize,
    /// Bytes a snapshot or backfill chunk may hold (the text of its rows), so wide rows make
    /// smaller chunks: the first chunk of a table reads 100 rows to measure them.
    pub snapshot_chunk_bytes: usize,
    /// How often the position is reported to Postgres. 1 s keeps retained WAL low at the cost
    /// of one small message per second.
    pub status_interval_ms: u64,
    /// How often a heartbeat is written to the WAL so an idle database still advances the slot.
    pub heartbeat_interval_ms: u64,
    /// How often the publication is checked for newly added tables.
    pub publication_poll_ms: u64,
    /// Producer linger: how long the producer waits to fill a batch. 20 ms trades a little
    /// latency for far fewer, better-compressed requests.
    pub linger_ms: u64,
    /// Longest back-off between retries of a transient failure.
    pub max_backoff_ms: u64,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            slot: "ferry".into(),
            publication: "ferry".into(),
            tables: Vec::new(),
            all_tables: false,
            ddl_trigger: true,
            topic_prefix: "ferry".into(),
            format: Format::SingleObject,
            partitions: 3,
            snapshot: true,
            snapshot_chunk_rows: 10_000,
            snapshot_chunk_bytes: 64 << 20,
            status_interval_ms: 1_000,
            heartbeat_interval_ms: 10_000,
            publication_poll_ms: 5_000,
            linger_ms: 20,
            max_backoff_ms: 30_000,
        }
    }
}

/// The record format of the table topics.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The Avro specification's single-object encoding (`C3 01` + 8-byte fingerprint); the
    /// schemas are in the `<topic_prefix>._schemas` topic, keyed by fingerprint.
    #[default]
    SingleObject,
    /// The Confluent wire format (`00` + 4-byte schema id), schemas in each cluster's schema
    /// registry under `<topic>-key` and `<topic>-value`, as Kafka Connect, ksqlDB, Flink,
    /// Spark and the confluent-kafka clients expect.
    Confluent,
}

/// Configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override could not be read or does not match the expected shape.
    #[error("configuration {path}: {message}")]
    Load {
        /// The file.
        path: String,
        /// What was wrong (names the field).
        message: String,
    },
    /// A value is out of range.
    #[error("configuration field {field}: {message}")]
    Invalid {
        /// The field path, e.g. `capture.partitions`.
        field: String,
        /// What was wrong.
        message: String,
    },
}

impl Config {
    /// Loads `path` layered with `FERRY__SECTION__KEY` environment overrides (lists such as
    /// `FERRY__CAPTURE__TABLES` are comma-separated), then validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let load_err = |e: config::ConfigError| ConfigError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if !path.exists() {
            return Err(ConfigError::Load {
                path: path.display().to_string(),
                message: "file not found (pass --config or set FERRY_CONFIG)".into(),
            });
        }
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("FERRY")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("capture.tables")
                    .try_parsing(true),
            )
            .build()
            .map_err(load_err)?;
        let cfg: Config = raw.try_deserialize().map_err(load_err)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| {
            Err(ConfigError::Invalid {
                field: field.into(),
                message: message.into(),
            })
        };
        let c = &self.capture;
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !ident_ok(&c.slot) {
            return invalid(
                "capture.slot",
                "must be 1-63 characters of a-z, 0-9 and _ (a Postgres slot name)",
            );
        }
        if c.publication.is_empty() {
            return invalid("capture.publication", "must not be empty");
        }
        if c.partitions < 1 {
            return invalid("capture.partitions", "must be at least 1");
        }
        if c.snapshot_chunk_rows == 0 {
            return invalid("capture.snapshot_chunk_rows", "must be at least 1");
        }
        if c.topic_prefix.is_empty()
            || !c
                .topic_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return invalid(
                "capture.topic_prefix",
                "must be non-empty and use only a-z, A-Z, 0-9, '.', '_' and '-'",
            );
        }
        for (i, t) in c.tables.iter().enumerate() {
            if parse_table(t).is_none() {
                return invalid(
                    &format!("capture.tables[{i}]"),
                    &format!("{t:?} is not of the form schema.table"),
                );
            }
        }
        let sh = &self.ship;
        if sh.max_events == 0 {
            return invalid("ship.max_events", "must be at least 1");
        }
        if sh.batch_partitions < 1 {
            return invalid("ship.batch_partitions", "must be at least 1");
        }
        if !(1..=22).contains(&sh.zstd_level) {
            return invalid("ship.zstd_level", "must be between 1 and 22");
        }
        if sh.max_record_bytes == 0 || sh.max_bytes == 0 {
            return invalid("ship.max_bytes", "limits must be positive");
        }
        for (i, t) in sh.transforms.iter().enumerate() {
            if t.name.is_empty()
                || !t
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return invalid(
                    &format!("ship.transforms[{i}].name"),
                    "must be non-empty a-z, 0-9, _",
                );
            }
            if parse_table(&t.table).is_none() {
                return invalid(
                    &format!("ship.transforms[{i}].table"),
                    "must be schema.table",
                );
            }
        }
        if self.origin.kafka.bootstrap_servers.is_empty() {
            return invalid("origin.kafka.bootstrap_servers", "must not be empty");
        }
        if self.destination.kafka.bootstrap_servers.is_empty() {
            return invalid("destination.kafka.bootstrap_servers", "must not be empty");
        }
        for (field, registry) in [
            ("origin.registry", &self.origin.registry),
            ("destination.registry", &self.destination.registry),
        ] {
            match registry {
                None if c.format == Format::Confluent => {
                    return invalid(
                        &format!("{field}.url"),
                        "capture.format = \"confluent\" needs a schema registry per region",
                    )
                }
                Some(r) if !(r.url.starts_with("http://") || r.url.starts_with("https://")) => {
                    return invalid(
                        &format!("{field}.url"),
                        "must be an http:// or https:// URL",
                    )
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The destination topic batches are shipped to.
    pub fn batch_topic(&self) -> String {
        crate::topics::batch_topic(&self.capture.topic_prefix, &self.ship.batch_topic)
    }

    /// The dead-letter topic for corrupt batches.
    pub fn quarantine_topic(&self) -> String {
        crate::topics::quarantine_topic(&self.capture.topic_prefix, &self.apply.quarantine_topic)
    }

    /// The origin's schema registry client when the table topics use the Confluent format.
    pub fn origin_registry(&self) -> Result<Option<SchemaRegistry>, RegistryError> {
        self.registry("origin", &self.origin.registry)
    }

    /// The destination's schema registry client when the table topics use the Confluent format.
    pub fn destination_registry(&self) -> Result<Option<SchemaRegistry>, RegistryError> {
        self.registry("destination", &self.destination.registry)
    }

    fn registry(
        &self,
        name: &str,
        cfg: &Option<RegistryConfig>,
    ) -> Result<Option<SchemaRegistry>, RegistryError> {
        match (self.capture.format, cfg) {
            (Format::Confluent, Some(r)) => SchemaRegistry::new(name, r.clone()).map(Some),
            _ => Ok(None),
        }
    }

    /// The configured tables as ids.
    pub fn tables(&self) -> Vec<TableId> {
        self.capture
            .tables
            .iter()
            .filter_map(|t| parse_table(t))
            .collect()
    }
}

/// Parses `schema.table`.
pub fn parse_table(s: &str) -> Option<TableId> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) -> std::path::PathBuf {
        let p = dir.join("ferry.toml");
        std::fs::write(&p, body).expect("write config");
        p
    }

    const BASE: &str = r#"
[origin]
region = "eu"
[origin.postgres]
host = "127.0.0.1"
user = "postgres"
password = "hunter2"
database = "db"
[origin.kafka]
bootstrap_servers = "127.0.0.1:19092"
[destination]
region = "us"
[destination.kafka]
bootstrap_servers = "127.0.0.1:29092"
"#;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("tmpdir");
        d
    }

    #[test]
    fn defaults_apply_and_secrets_stay_hidden() {
        let p = write(&tmpdir("ok"), BASE);
        let cfg = Config::load(&p).expect("valid");
        assert_eq!(cfg.capture.partitions, 3);
        assert_eq!(cfg.origin.postgres.port, 5432);
        let dump = format!("{cfg:?}");
        assert!(!dump.contains("hunter2"), "{dump}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let p = write(
            &tmpdir("unknown"),
            &format!("{BASE}\n[capture]\nslott = \"x\"\n"),
        );
        let err = Config::load(&p).expect_err("unknown field").to_string();
        assert!(err.contains("slott"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let p = write(
            &tmpdir("invalid"),
            &format!("{BASE}\n[capture]\npartitions = 0\n"),
        );
        let err = Config::load(&p).expect_err("invalid").to_string();
        assert!(err.contains("capture.partitions"), "{err}");
        let p = write(
            &tmpdir("tables"),
            &format!("{BASE}\n[capture]\ntables = [\"nodot\"]\n"),
        );
        let err = Config::load(&p).expect_err("invalid").to_string();
        assert!(err.contains("capture.tables[0]"), "{err}");
    }

    #[test]
    fn missing_file_says_how_to_fix() {
        let err = Config::load(Path::new("/nonexistent/ferry.toml"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("--config"), "{err}");
    }
}
