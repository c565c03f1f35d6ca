//! The `ferry` binary: parse arguments, load configuration, start logging, run, map errors to
//! exit codes (0 ok, 1 a check failed, 2 a permanent error, 3 bad configuration).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_connectors::kafka::Cluster;
use ferry_pipeline::capture::{self, SinkMode, Stats};
use ferry_pipeline::config::{parse_table, Config};
use ferry_pipeline::{check, inspect, metrics, sink, status};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Keeps data in sync across regions: change capture, shipping and apply over Kafka"
)]
struct Cli {
    /// Configuration file (TOML); FERRY__SECTION__KEY environment variables override it.
    #[arg(
        long,
        global = true,
        env = "FERRY_CONFIG",
        default_value = "ops/ferry.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify prerequisites (brokers, Postgres, wal_level, privileges, slot, publication) and say what to fix.
    Check,
    /// Capture Postgres changes into the origin Kafka topics (runs until stopped).
    Capture {
        /// Decode and encode only, send nothing (measures capture without a broker).
        #[arg(long)]
        null_sink: bool,
    },
    /// Ship compacted, compressed micro-batches from the origin topics to the destination (runs until stopped).
    Ship,
    /// Apply shipped batches in the destination: verify, replicate topics, write the destination database (runs until stopped).
    Apply,
    /// Re-ship exactly the origin offset range of a batch, under the same id (after a corrupt batch was quarantined).
    Reship {
        /// The batch id, as in the manifest and the quarantine topic's keys.
        #[arg(long)]
        batch: String,
    },
    /// Backfill a table online, in key-ordered chunks throttled by the origin's health, while capture runs.
    Backfill {
        /// The table, as schema.table.
        #[arg(long)]
        table: String,
        /// Only rows matching this SQL predicate.
        #[arg(long = "where")]
        predicate: Option<String>,
        /// Rows per chunk (default: backfill.chunk_rows).
        #[arg(long)]
        chunk_rows: Option<usize>,
        /// Job name (default: derived from the table and the time).
        #[arg(long)]
        job: Option<String>,
        /// Follow the job's progress until it is done.
        #[arg(long)]
        wait: bool,
    },
    /// List backfill jobs with their state, progress, throttle rate and the signal limiting it.
    Jobs,
    /// Pause a job (takes effect in stream order; survives restarts).
    Pause {
        /// Job name (see `ferry jobs`).
        job: String,
    },
    /// Resume a paused job.
    Resume {
        /// Job name.
        job: String,
    },
    /// Cancel a job: it reads no more chunks.
    Cancel {
        /// Job name.
        job: String,
    },
    /// Re-ship a historical origin range (throttled, resumable; already-shipped ranges keep their batch ids).
    Replay {
        /// Origin topic, e.g. ferry.public.orders.
        #[arg(long)]
        topic: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
        /// Start at this offset.
        #[arg(
            long,
            conflicts_with = "from_time",
            required_unless_present = "from_time"
        )]
        from_offset: Option<i64>,
        /// Start at this time (epoch ms, or 2026-11-25T10:00:00Z).
        #[arg(long)]
        from_time: Option<String>,
        /// End before this offset (default: the current end).
        #[arg(long, conflicts_with = "to_time")]
        to_offset: Option<i64>,
        /// End before this time.
        #[arg(long)]
        to_time: Option<String>,
        /// Job name for checkpoints; the same name resumes.
        #[arg(long)]
        job: Option<String>,
        /// Rate cap in changes per second.
        #[arg(long, default_value_t = 10_000.0)]
        max_events_per_sec: f64,
    },
    /// Which batch, origin partition/offset and source LSN last wrote a row of the destination database.
    Lineage {
        /// The table, as schema.table.
        table: String,
        /// The primary key value(s), comma-separated in key column order.
        key: String,
    },
    /// Compare a table in the origin and destination databases by key-range hashes; exit 1 on any difference.
    Verify {
        /// The table, as schema.table.
        #[arg(long)]
        table: String,
        /// Ask capture to re-read the differing rows (they travel the normal path as snapshot rows).
        #[arg(long)]
        repair: bool,
    },
    /// Show where everything stands: slot, shipping lag, batches and egress saved.
    Status,
    /// List the origin topics with their partitions and record counts.
    Topics,
    /// Print a table topic's records decoded with the published Avro schemas, as JSON lines.
    Tail {
        /// The table, as schema.table.
        table: String,
        /// Stop after this many records.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Export every published writer schema as <fingerprint>.avsc files.
    Schemas {
        /// Directory to write into.
        #[arg(long, default_value = "schemas-export")]
        out: PathBuf,
    },
}

/// The destination database, which `lineage` and `verify` need.
fn destination_pg(cfg: &Config) -> anyhow::Result<ferry_connectors::postgres::PgConfig> {
    cfg.destination
        .postgres
        .clone()
        .context("destination.postgres is not configured")
}

/// Epoch milliseconds, or an ISO time such as `2026-11-25T10:00:00Z` / `2026-11-25 10:00:00+01`.
fn parse_time_ms(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let iso = text.replacen('T', " ", 1);
    let iso = match iso.strip_suffix('Z') {
        Some(t) => format!("{t}+00"),
        None => iso,
    };
    match ferry_connectors::postgres::values::parse(&iso, &ferry_schemas::ColumnType::TimestampTz) {
        Ok(ferry_schemas::Datum::Long(us)) => Ok(us / 1000),
        _ => {
            anyhow::bail!("{text:?} is not a time: use epoch milliseconds or 2026-11-25T10:00:00Z")
        }
    }
}

/// Serves metrics when `metrics.listen` is set; the task ends with `stop`, or with the process.
fn serve_metrics(
    cfg: &Config,
    stop: tokio::sync::watch::Receiver<bool>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Option<tokio::task::JoinHandle<()>> {
    let listen = cfg.metrics.listen.clone();
    let cfg = Arc::new(cfg.clone());
    (!listen.is_empty()).then(|| {
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(&listen, render, cfg, stop).await {
                tracing::error!(listen, error = %e, "metrics endpoint failed; fix metrics.listen");
            }
        })
    })
}

/// A stop signal that turns true on SIGTERM or Ctrl-C.
fn stop_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending().await,
                }
            } => {}
        }
        let _ = stop_tx.send(true);
    });
    stop_rx
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    match run(cli.command, cfg).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command, cfg: Config) -> anyhow::Result<ExitCode> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let prefix = cfg.capture.topic_prefix.clone();
    match command {
        Command::Check => {
            let findings = check::run(&cfg).await;
            let mut failed = 0;
            for f in &findings {
                println!(
                    "{} {:<22} {}",
                    if f.ok { "ok  " } else { "FAIL" },
                    f.name,
                    f.detail
                );
                failed += usize::from(!f.ok);
            }
            if failed > 0 {
                println!("{failed} check(s) failed");
                return Ok(ExitCode::from(1));
            }
            println!("all checks passed");
        }
        Command::Capture { null_sink } => {
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
                let _ = stop_tx.send(true);
            });
            let mode = if null_sink {
                SinkMode::Null
            } else {
                SinkMode::Kafka
            };
            let stats = Arc::new(Stats::default());
            capture::run(&cfg, mode, stop_rx, stats).await?;
        }
        Command::Ship => {
            let stats = Arc::new(ferry_pipeline::ship::ShipStats::default());
            let stop = stop_on_signal();
            let (s, c) = (stats.clone(), cfg.clone());
            let _metrics = serve_metrics(
                &cfg,
                stop.clone(),
                Arc::new(move || {
                    let mut out = String::new();
                    metrics::render_ship(&s, &c, &mut out);
                    out
                }),
            );
            ferry_pipeline::ship::run(&cfg, stop, stats).await?;
        }
        Command::Apply => {
            let stats = Arc::new(ferry_pipeline::apply::ApplyStats::default());
            let stop = stop_on_signal();
            let s = stats.clone();
            let _metrics = serve_metrics(
                &cfg,
                stop.clone(),
                Arc::new(move || {
                    let mut out = String::new();
                    metrics::render_apply(&s, &mut out);
                    out
                }),
            );
            ferry_pipeline::apply::run(&cfg, stop, stats).await?;
        }
        Command::Backfill {
            table,
            predicate,
            chunk_rows,
            job,
            wait,
        } => {
            let id = parse_table(&table).context("table must be schema.table")?;
            let (job, total) =
                capture::request_backfill(&cfg, &id, predicate, chunk_rows, job).await?;
            println!("backfill {job} requested: {total} rows of {id}; capture runs it between live changes");
            if wait {
                let origin = Cluster::new("origin", cfg.origin.kafka.clone());
                let topic = sink::state_topic(&prefix);
                let started = std::time::Instant::now();
                let stop = stop_on_signal();
                loop {
                    let (o, t, slot) = (origin.clone(), topic.clone(), cfg.capture.slot.clone());
                    let st = tokio::task::spawn_blocking(move || {
                        ferry_pipeline::state::load(&o, &t, &slot)
                    })
                    .await??;
                    if let Some(b) = st.backfills.get(&job) {
                        let rate = b.rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
                        let pct = 100.0 * b.rows as f64 / (b.total.max(1)) as f64;
                        let eta = (b.total.saturating_sub(b.rows)) as f64 / rate.max(1.0);
                        eprintln!(
                            "[{pct:>5.1}%] {job}: {}/{} rows · {rate:.0} rows/s · ETA {eta:.0} s",
                            b.rows, b.total
                        );
                        if b.progress == Some(ferry_pipeline::state::TableProgress::Done) {
                            println!("backfill {job} done: {} rows", b.rows);
                            break;
                        }
                    }
                    if *stop.borrow() {
                        println!("stopped following; the job goes on in capture");
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        Command::Jobs => {
            let (o, t, slot) = (
                origin.clone(),
                sink::state_topic(&prefix),
                cfg.capture.slot.clone(),
            );
            let st =
                tokio::task::spawn_blocking(move || ferry_pipeline::state::load(&o, &t, &slot))
                    .await??;
            println!(
                "{:<36} {:<24} {:<10} {:>18} {:>7} {:>9} {:<16}",
                "job", "table", "state", "rows", "done", "rate/s", "limited by"
            );
            for (job, b) in &st.backfills {
                println!(
                    "{:<36} {:<24} {:<10} {:>18} {:>6.1}% {:>9.0} {:<16}",
                    job,
                    b.table,
                    b.status(),
                    format!("{}/{}", b.rows, b.total),
                    100.0 * b.rows as f64 / b.total.max(1) as f64,
                    b.rate,
                    if b.limit.is_empty() {
                        "-"
                    } else {
                        b.limit.as_str()
                    }
                );
            }
            if st.backfills.is_empty() {
                println!("(no jobs)");
            }
        }
        Command::Pause { job } => {
            capture::control_job(&cfg, &job, "pause").await?;
            println!("pause of {job} requested");
        }
        Command::Resume { job } => {
            capture::control_job(&cfg, &job, "resume").await?;
            println!("resume of {job} requested");
        }
        Command::Cancel { job } => {
            capture::control_job(&cfg, &job, "cancel").await?;
            println!("cancel of {job} requested");
        }
        Command::Replay {
            topic,
            partition,
            from_offset,
            from_time,
            to_offset,
            to_time,
            job,
            max_events_per_sec,
        } => {
            use ferry_pipeline::replay::{self, Bound};
            let from = match (from_offset, from_time) {
                (Some(o), _) => Bound::Offset(o),
                (None, Some(t)) => Bound::TimeMs(parse_time_ms(&t)?),
                (None, None) => anyhow::bail!("give --from-offset or --from-time"),
            };
            let to = match (to_offset, to_time) {
                (Some(o), _) => Some(Bound::Offset(o)),
                (None, Some(t)) => Some(Bound::TimeMs(parse_time_ms(&t)?)),
                (None, None) => None,
            };
            let job = job.unwrap_or_else(|| {
                format!(
                    "replay-{topic}-{}-{from:?}-{to:?}",
                    partition.map_or("all".into(), |p| p.to_string())
                )
            });
            let spec = replay::Spec {
                topic,
                partition,
                from,
                to,
                job: job.clone(),
                max_events_per_sec,
            };
            let report =
                replay::run(&cfg, &spec, stop_on_signal(), |line| eprintln!("{line}")).await?;
            println!(
                "replay {job}: {} batches ({} under ids shipped before), {} changes",
                report.batches, report.reused_ids, report.events
            );
        }
        Command::Reship { batch } => {
            let (events_in, events_out) = ferry_pipeline::ship::reship(&cfg, &batch).await?;
            println!("re-shipped {batch}: {events_in} changes, {events_out} rows after compaction");
        }
        Command::Lineage { table, key } => {
            let id = parse_table(&table).context("table must be schema.table")?;
            let pg = destination_pg(&cfg)?;
            println!("{}", ferry_pipeline::apply::lineage(&pg, &id, &key).await?);
        }
        Command::Verify { table, repair } => {
            let id = parse_table(&table).context("table must be schema.table")?;
            let dest = destination_pg(&cfg)?;
            let report = ferry_pipeline::verify::verify(&cfg.origin.postgres, &dest, &id)
                .await
                .map_err(anyhow::Error::msg)?;
            println!(
                "{id}: origin {} rows, destination {} rows, {} ranges compared",
                report.origin_rows, report.destination_rows, report.ranges
            );
            if report.mismatches.is_empty() {
                println!("verify: {id} matches");
                return Ok(ExitCode::SUCCESS);
            }
            for m in report.mismatches.iter().take(50) {
                println!("  key ({}): {}", m.key.join(", "), m.kind);
            }
            if report.mismatches.len() > 50 {
                println!("  … and {} more", report.mismatches.len() - 50);
            }
            println!("verify: {id} DIFFERS in {} rows", report.mismatches.len());
            if repair {
                ferry_pipeline::verify::request_repair(&cfg, &id, &report.mismatches)
                    .await
                    .map_err(anyhow::Error::msg)?;
                println!("repair requested: capture re-reads these rows and they travel through ship and apply; run verify again to confirm");
            }
            return Ok(ExitCode::from(1));
        }
        Command::Status => {
            status::print(&cfg).await.map_err(anyhow::Error::msg)?;
        }
        Command::Topics => {
            let rows = tokio::task::spawn_blocking(move || inspect::topic_counts(&origin, &prefix))
                .await??;
            println!("{:<50} {:>10} {:>12}", "topic", "partitions", "records");
            for (t, p, n) in rows {
                println!("{t:<50} {p:>10} {n:>12}");
            }
        }
        Command::Tail { table, limit } => {
            let id = parse_table(&table).context("table must be schema.table")?;
            let topic = sink::table_topic(&prefix, &id);
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let schemas = inspect::load_schemas(&origin, &prefix)?;
                let mut cache = std::collections::HashMap::new();
                for (p, off, _key, value) in inspect::read_all(&origin, &topic, limit)? {
                    let Some(value) = value else { continue };
                    let json = inspect::decode_record(&schemas, &mut cache, &value)
                        .with_context(|| format!("{topic} partition {p} offset {off}"))?;
                    println!("{json}");
                }
                Ok(())
            })
            .await??;
        }
        Command::Schemas { out } => {
            let n = tokio::task::spawn_blocking(move || {
                inspect::export_schemas(&origin, &prefix, &out)
            })
            .await??;
            println!("exported {n} schemas");
        }
    }
    Ok(ExitCode::SUCCESS)
}
