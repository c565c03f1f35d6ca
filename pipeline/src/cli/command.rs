//! Every `ferry` command: its arguments and what it does. `main.rs` parses, loads the
//! configuration, starts logging and hands the command over to [`run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use ferry_connectors::kafka::Cluster;

use crate::capture::{self, SinkMode, Stats};
use crate::cli::{check, jobs as cli_jobs, metrics, status};
use crate::config::{parse_table, Config};
use crate::inspect::{self, InspectError};
use crate::jobs::backfill::BackfillSpec;
use crate::runtime::telemetry::Exposition;
use crate::wal::JobAction;
use crate::{jobs, topics};

/// Returns a [`CliError::Usage`] (exit code 3) with a formatted message.
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(CliError::Usage(format!($($arg)*)))
    };
}

/// Why a command failed; the class decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A wrong argument or a missing setting.
    #[error("{0}")]
    Usage(String),
    /// The configuration does not load.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Capture, or a request written into the origin's WAL.
    #[error(transparent)]
    Capture(#[from] crate::error::CaptureError),
    /// Shipping, a reship or a replay.
    #[error(transparent)]
    Ship(#[from] crate::ship::ShipError),
    /// Applying, or a lineage lookup.
    #[error(transparent)]
    Apply(#[from] crate::apply::ApplyError),
    /// A job command.
    #[error(transparent)]
    Jobs(#[from] crate::jobs::JobsError),
    /// A comparison.
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    /// Reading topics back.
    #[error(transparent)]
    Inspect(#[from] InspectError),
    /// The state or control store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A cluster.
    #[error(transparent)]
    Kafka(#[from] ferry_connectors::kafka::KafkaError),
    /// A schema registry.
    #[error(transparent)]
    Registry(#[from] ferry_connectors::registry::RegistryError),
    /// Work on the blocking pool ended abnormally.
    #[error("a background task ended: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Exit codes, by class of outcome (README, "Exit codes").
pub mod exit {
    /// A check found something wrong (`check`, `verify`, `backfill --sample`).
    pub const CHECK_FAILED: u8 = 1;
    /// A permanent error: bad data, a refused request, a setup problem. Retrying as is fails
    /// the same way.
    pub const PERMANENT: u8 = 2;
    /// The configuration file or an argument is wrong.
    pub const CONFIG: u8 = 3;
    /// A one-shot command could not reach a broker, database or registry (or failed in a way
    /// not known to be permanent): run it again later.
    pub const TRANSIENT: u8 = 4;
}

impl CliError {
    /// The exit code (README, "Exit codes"): 3 for arguments and configuration, else 2 when
    /// retrying as is fails the same way and 4 when it may pass later.
    pub fn exit_code(&self) -> u8 {
        let retryable = match self {
            CliError::Usage(_) | CliError::Config(_) => return exit::CONFIG,
            CliError::Capture(e) => e.is_retryable(),
            CliError::Ship(e) => e.is_retryable(),
            CliError::Apply(e) => e.is_retryable(),
            CliError::Jobs(e) => e.is_retryable(),
            CliError::Verify(e) => e.is_retryable(),
            CliError::Inspect(e) => e.is_retryable(),
            CliError::Store(e) => e.is_retryable(),
            CliError::Kafka(e) => e.is_retryable(),
            CliError::Registry(e) => e.is_retryable(),
            CliError::Task(_) => true,
        };
        if retryable {
            exit::TRANSIENT
        } else {
            exit::PERMANENT
        }
    }
}

pub use crate::error::causes;

/// Every `ferry` command, with its arguments.
#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Backfill a table (or a plan of tables) online, in key-ordered chunks throttled by the origin's health, while capture runs.
    Backfill {
        /// The table, as schema.table.
        #[arg(long, required_unless_present = "plan", conflicts_with = "plan")]
        table: Option<String>,
        /// A plan file (TOML): [[job]] entries with name, table, where, chunk_rows, tier, after, sample.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Tier in the plan: lower tiers run first.
        #[arg(long, default_value_t = 0)]
        tier: u32,
        /// Jobs this one comes after (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        after: Vec<String>,
        /// Staged progression: ship this many rows first, verify them at the destination, then go on.
        #[arg(long)]
        sample: Option<u64>,
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
    /// List every job (the live pipeline, backfills, replays) with state, progress, throttle rate and the signal limiting it.
    Jobs {
        /// Follow the backfills and replays with progress bars until they finish.
        #[arg(long)]
        watch: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause a job, or `live` (shipping of the live pipeline); survives restarts.
    Pause {
        /// Job name (see `ferry jobs`), or `live`.
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
        /// Rate cap in changes per second (the adaptive throttle's ceiling).
        #[arg(long, default_value_t = 10_000.0)]
        max_events_per_sec: f64,
        /// Egress cap in bytes per second.
        #[arg(long)]
        max_bytes_per_sec: Option<f64>,
    },
    /// Resume a table capture stopped (a change it could not read) or apply holds (the destination refused one of its batches): its held changes or batches go on in order, then its new ones.
    ResumeTable {
        /// The table, as schema.table.
        table: String,
    },
    /// List the ranges of a table's origin topic (or with --batches, of the batch topic) that retention deleted before they were shipped (applied), and origin partitions whose topic was deleted and created again; with --accept, go on after them (backfill or repair first).
    AcceptGap {
        /// The table, as schema.table.
        #[arg(required_unless_present = "batches", conflicts_with = "batches")]
        table: Option<String>,
        /// The batch topic's gaps instead: batches deleted before `ferry apply` applied them. With --accept, the apply group's offsets move past them (stop `ferry apply` first).
        #[arg(long)]
        batches: bool,
        /// Ship the empty batches (without it, only list the gaps).
        #[arg(long)]
        accept: bool,
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
fn destination_pg(cfg: &Config) -> Result<ferry_connectors::postgres::PgConfig, CliError> {
    cfg.destination
        .postgres
        .clone()
        .ok_or_else(|| CliError::Usage("destination.postgres is not configured".into()))
}

/// Reads a backfill plan: `[[job]]` tables with name, table, where, chunk_rows, tier, after,
/// sample.
fn read_plan(path: &std::path::Path) -> Result<Vec<BackfillSpec>, CliError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Plan {
        job: Vec<BackfillSpec>,
    }
    let plan: Plan = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| CliError::Usage(format!("plan {}: {e}", path.display())))?;
    let names: Vec<&str> = plan.job.iter().filter_map(|j| j.job.as_deref()).collect();
    for (i, j) in plan.job.iter().enumerate() {
        if parse_table(&j.table).is_none() {
            usage!(
                "plan {}: job {} table {:?} is not schema.table",
                path.display(),
                i + 1,
                j.table
            );
        }
        if j.job.is_none() && !plan.job.iter().all(|o| o.after.is_empty()) {
            usage!(
                "plan {}: job {} needs a name, since jobs refer to each other with `after`",
                path.display(),
                i + 1
            );
        }
        for dep in &j.after {
            if !names.contains(&dep.as_str()) {
                usage!(
                    "plan {}: job {} comes after {dep:?}, which the plan does not define",
                    path.display(),
                    i + 1
                );
            }
        }
    }
    Ok(plan.job)
}

/// Pauses, resumes or cancels a job or the live pipeline, saying which way the request went.
async fn control(cfg: &Config, job: &str, action: JobAction) -> Result<(), CliError> {
    let route = crate::jobs::control::request(cfg, job, action).await?;
    println!(
        "{action} of {job} requested ({})",
        match route {
            crate::jobs::control::Route::Wal =>
                "through the origin's WAL: capture applies it in stream order",
            crate::jobs::control::Route::Topic =>
                "through the control topic: it holds across restarts",
        }
    );
    Ok(())
}

/// A progress bar for a replay (hidden when stderr is not a terminal).
fn replay_bar(job: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(1)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} offsets {percent:>3}% ETA {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(job.to_string());
    bar
}

/// Epoch milliseconds, or an ISO time such as `2026-11-25T10:00:00Z` / `2026-11-25 10:00:00+01`.
fn parse_time_ms(text: &str) -> Result<i64, CliError> {
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
            usage!("{text:?} is not a time: use epoch milliseconds or 2026-11-25T10:00:00Z")
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

/// Runs one command to its end; the exit code says how it went (`Err`: how it failed, see
/// [`CliError::exit_code`]).
pub async fn run(command: Command, cfg: Config) -> Result<ExitCode, CliError> {
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
                return Ok(ExitCode::from(exit::CHECK_FAILED));
            }
            println!("all checks passed");
        }
        Command::Capture { null_sink } => {
            let stop_rx = stop_on_signal();
            let mode = if null_sink {
                SinkMode::Null
            } else {
                SinkMode::Kafka
            };
            let stats = Arc::new(Stats::default());
            let (s, slot) = (stats.clone(), cfg.capture.slot.clone());
            let _metrics = serve_metrics(
                &cfg,
                stop_rx.clone(),
                Arc::new(move || {
                    let mut out = Exposition::default();
                    s.render(&slot, &mut out);
                    out.finish()
                }),
            );
            capture::run(&cfg, mode, stop_rx, stats).await?;
        }
        Command::Ship => {
            let stats = Arc::new(crate::ship::ShipStats::default());
            let stop = stop_on_signal();
            let (s, c) = (stats.clone(), cfg.clone());
            let _metrics = serve_metrics(
                &cfg,
                stop.clone(),
                Arc::new(move || {
                    let mut out = Exposition::default();
                    s.render(&c, &mut out);
                    out.finish()
                }),
            );
            crate::ship::run(&cfg, stop, stats).await?;
        }
        Command::Apply => {
            let stats = Arc::new(crate::apply::ApplyStats::default());
            let stop = stop_on_signal();
            let s = stats.clone();
            let _metrics = serve_metrics(
                &cfg,
                stop.clone(),
                Arc::new(move || {
                    let mut out = Exposition::default();
                    s.render(&mut out);
                    out.finish()
                }),
            );
            crate::apply::run(&cfg, stop, stats).await?;
        }
        Command::Backfill {
            table,
            plan,
            tier,
            after,
            sample,
            predicate,
            chunk_rows,
            job,
            wait,
        } => {
            let specs: Vec<BackfillSpec> = match (plan, table) {
                (Some(path), _) => read_plan(&path)?,
                (None, Some(table)) => {
                    parse_table(&table).ok_or_else(|| {
                        CliError::Usage(format!("table {table:?} is not schema.table"))
                    })?;
                    vec![BackfillSpec {
                        job,
                        table,
                        predicate,
                        chunk_rows,
                        tier,
                        after,
                        sample,
                    }]
                }
                (None, None) => usage!("give --table or --plan"),
            };
            let mut names = Vec::new();
            for spec in &specs {
                let (name, total) = crate::jobs::backfill::request(&cfg, spec).await?;
                println!(
                    "backfill {name} requested: {total} rows of {} (tier {}{}{}); capture runs it between live changes",
                    spec.table,
                    spec.tier,
                    if spec.after.is_empty() { String::new() } else { format!(", after {}", spec.after.join(", ")) },
                    spec.sample.map_or(String::new(), |n| format!(", sample {n}")),
                );
                names.push((name, spec.sample.is_some()));
            }
            for (name, _) in names.iter().filter(|(_, s)| *s) {
                let outcome =
                    jobs::check_sample(&cfg, name, |line| eprintln!("{name}: {line}")).await?;
                match outcome {
                    jobs::Sample::NotReached => println!("{name}: finished before its sample size; nothing held"),
                    jobs::Sample::Passed { rows } => println!("{name}: sample verified ({rows} rows match at the destination); the job continues"),
                    jobs::Sample::Failed { report } => {
                        println!("{name}: sample did NOT verify within backfill.sample_timeout_secs; the job is stopped");
                        println!("  origin {} rows, destination {} rows", report.origin_rows, report.destination_rows);
                        for m in report.mismatches.iter().take(20) {
                            println!("  key ({}): {}", m.key.join(", "), m.kind);
                        }
                        if report.mismatches.len() > 20 {
                            println!("  … and {} more", report.mismatches.len() - 20);
                        }
                        return Ok(ExitCode::from(exit::CHECK_FAILED));
                    }
                }
            }
            if wait {
                let names: Vec<String> = names.into_iter().map(|(n, _)| n).collect();
                let rows = cli_jobs::follow(&cfg, &names, stop_on_signal()).await?;
                for r in rows.iter().filter(|r| names.contains(&r.job)) {
                    println!(
                        "backfill {}: {} ({}/{} rows)",
                        r.job, r.state, r.done, r.total
                    );
                }
            }
        }
        Command::Jobs { watch, json } => {
            let rows = if watch {
                cli_jobs::follow(&cfg, &[], stop_on_signal()).await?
            } else {
                jobs::list(&cfg).await?
            };
            if json {
                let json = serde_json::to_string_pretty(&rows)
                    .map_err(|e| CliError::Usage(format!("jobs as JSON: {e}")))?;
                println!("{json}");
            } else {
                print!("{}", cli_jobs::table(&rows));
            }
        }
        Command::Pause { job } => control(&cfg, &job, JobAction::Pause).await?,
        Command::Resume { job } => control(&cfg, &job, JobAction::Resume).await?,
        Command::Cancel { job } => control(&cfg, &job, JobAction::Cancel).await?,
        Command::Replay {
            topic,
            partition,
            from_offset,
            from_time,
            to_offset,
            to_time,
            job,
            max_events_per_sec,
            max_bytes_per_sec,
        } => {
            use crate::jobs::replay::{self, Bound};
            let from = match (from_offset, from_time) {
                (Some(o), _) => Bound::Offset(o),
                (None, Some(t)) => Bound::TimeMs(parse_time_ms(&t)?),
                (None, None) => usage!("give --from-offset or --from-time"),
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
                max_bytes_per_sec,
            };
            let bar = replay_bar(&job);
            let report = replay::run(&cfg, &spec, stop_on_signal(), |p| {
                if p.total > 0 {
                    bar.set_length(p.total as u64);
                    bar.set_position(p.done as u64);
                    bar.set_message(format!(
                        "{:.0} changes/s · throttle {:.0}/s ({})",
                        p.rate, p.throttle.0, p.throttle.1
                    ));
                }
                if bar.is_hidden() || p.total == 0 {
                    eprintln!("{job}: {} [{}/{}]", p.line, p.done, p.total);
                }
            })
            .await?;
            bar.finish_and_clear();
            println!(
                "replay {job}: {} batches ({} under ids shipped before), {} changes",
                report.batches, report.reused_ids, report.events
            );
        }
        Command::Reship { batch } => {
            let (events_in, events_out) = crate::ship::reship(&cfg, &batch).await?;
            println!("re-shipped {batch}: {events_in} changes, {events_out} rows after compaction");
        }
        Command::AcceptGap {
            table: None,
            accept,
            ..
        } => {
            let gaps = crate::apply::batch_gaps(&cfg, accept).await?;
            let topic = cfg.batch_topic();
            if gaps.is_empty() {
                println!("{topic}: no batch is missing before what apply applied");
            }
            for (p, first, last) in &gaps {
                println!(
                    "{topic}[{p}] offsets {first}-{last}: deleted before they were applied{}",
                    if accept {
                        "; accepted (the apply group goes on after them): start `ferry apply`"
                    } else {
                        ""
                    }
                );
            }
            if !accept && !gaps.is_empty() {
                println!(
                    "repair the tables (`ferry verify --table T --repair`), stop `ferry apply`, then run this again with --accept"
                );
            }
        }
        Command::AcceptGap {
            table: Some(table),
            accept,
            ..
        } => {
            let id = parse_table(&table)
                .ok_or_else(|| CliError::Usage(format!("table {table:?} is not schema.table")))?;
            let gaps = crate::ship::gaps(&cfg, &id, accept).await?;
            if gaps.is_empty() {
                println!("{id}: nothing is missing before what was shipped");
            }
            for g in &gaps {
                match g.kind {
                    crate::ship::GapKind::Retention => println!(
                        "{}[{}] offsets {}-{}: deleted before they were shipped{}",
                        g.topic,
                        g.partition,
                        g.first,
                        g.last,
                        if accept {
                            "; accepted (shipped as an empty batch): restart `ferry ship`"
                        } else {
                            ""
                        }
                    ),
                    crate::ship::GapKind::Recreated => println!(
                        "{}[{}]: deleted and created again since it was shipped from ({}){}",
                        g.topic,
                        g.partition,
                        g.detail,
                        if accept {
                            format!(
                                "; accepted: its new records are shipped from offset {} on, as \
                                 incarnation {}: restart `ferry ship`",
                                g.first,
                                g.incarnation + 1
                            )
                        } else {
                            String::new()
                        }
                    ),
                }
            }
            if !accept && !gaps.is_empty() {
                println!(
                    "backfill {id} (`ferry backfill --table {id}`), then run this again with --accept"
                );
            }
        }
        Command::ResumeTable { table } => {
            let id = parse_table(&table)
                .ok_or_else(|| CliError::Usage(format!("table {table:?} is not schema.table")))?;
            let mut resumed = false;
            if let Some(reason) = crate::capture::request_resume(&cfg, &id).await? {
                println!(
                    "resume of {id} requested from capture: its held changes are sent in order, then its new ones (it was stopped for: {reason})"
                );
                resumed = true;
            }
            if let Some(pg) = &cfg.destination.postgres {
                if let Some((batches, reason)) = crate::apply::request_resume(pg, &id).await? {
                    println!(
                        "resume of {id} requested from apply: the applier re-applies its {batches} held batches in order, then its new ones (it was held for: {reason})"
                    );
                    resumed = true;
                }
            }
            if !resumed {
                return Err(CliError::Usage(format!(
                    "{id} is neither stopped by capture nor held by apply (`ferry status` lists both)"
                )));
            }
        }
        Command::Lineage { table, key } => {
            let id = parse_table(&table)
                .ok_or_else(|| CliError::Usage(format!("table {table:?} is not schema.table")))?;
            let pg = destination_pg(&cfg)?;
            println!("{}", crate::apply::lineage(&pg, &id, &key).await?);
        }
        Command::Verify { table, repair } => {
            let id = parse_table(&table)
                .ok_or_else(|| CliError::Usage(format!("table {table:?} is not schema.table")))?;
            let dest = destination_pg(&cfg)?;
            let report = crate::verify::verify(&cfg.origin.postgres, &dest, &id).await?;
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
                crate::verify::request_repair(&cfg, &id, &report.mismatches).await?;
                println!("repair requested: capture re-reads these rows and they travel through ship and apply; run verify again to confirm");
            }
            return Ok(ExitCode::from(exit::CHECK_FAILED));
        }
        Command::Status => {
            status::print(&cfg).await?;
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
            let id = parse_table(&table)
                .ok_or_else(|| CliError::Usage(format!("table {table:?} is not schema.table")))?;
            let topic = topics::table_topic(&prefix, &id);
            let registry = cfg.origin_registry()?;
            tokio::task::spawn_blocking(move || -> Result<(), CliError> {
                let mut decoder = inspect::Decoder::load(&origin, &prefix, registry)?;
                for (p, off, _key, value) in inspect::read_all(&origin, &topic, limit)? {
                    let Some(value) = value else { continue };
                    let json = decoder.decode(&value).map_err(|e| {
                        InspectError::Other(format!("{topic} partition {p} offset {off}: {e}"))
                    })?;
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
