//! A steady OLTP load (pgbench, TPC-B-like) on the origin, measured three ways in one run:
//! alone; during a backfill of `pgbench_accounts` with the throttle off; during the same
//! backfill with the throttle on. Then both backfills once more with the load stopped, to
//! compare their rates. The backfill starts together with the load, so the throttle measures
//! its baseline under it; only what follows that warm-up is measured. `--fixed` instead pins
//! the backfill at given rates, to see what each costs the load.
//!
//! `cargo run --release -p ferry-benches --bin backfill -- --scale 10 --seconds 20`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_benches::thousands;
use ferry_connectors::kafka::Cluster;
use ferry_connectors::postgres::PgConfig;
use ferry_pipeline::capture::{self, SinkMode, Stats};
use ferry_pipeline::config::Config;
use ferry_pipeline::jobs::backfill;
use ferry_pipeline::store::state;
use ferry_pipeline::topics;
use ferry_schemas::TableId;

#[derive(Parser)]
struct Args {
    /// pgbench scale (100,000 accounts each).
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// pgbench clients.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Rows per backfill chunk (the most; the throttle may read fewer at a time).
    #[arg(long, default_value_t = 2_000)]
    chunk_rows: usize,
    /// The throttle's canary query.
    #[arg(
        long,
        default_value = "SELECT abalance FROM pgbench_accounts WHERE aid = (SELECT 1 + (random() * 99999)::int)"
    )]
    canary_sql: String,
    /// Instead of throttle off / on, run the load next to a backfill pinned at each of these
    /// rates (rows/s), to see what a rate costs the load (for picking `max_rows_per_sec`).
    #[arg(long, value_delimiter = ',')]
    fixed: Vec<f64>,
    /// Ferry configuration (for the stack's addresses).
    #[arg(long, default_value = "ops/ferry.toml")]
    config: PathBuf,
}

struct Load {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs pgbench for `warmup + seconds` and reads the latency of every transaction that
/// finished in the last `seconds` from its per-transaction log (fields: client, number,
/// latency µs, script, finish epoch s, finish µs).
fn pgbench(pg: &PgConfig, args: &Args, dir: &Path, warmup: u32) -> Result<Load> {
    let prefix = dir.join("pgb");
    for e in std::fs::read_dir(dir)? {
        let _ = std::fs::remove_file(e?.path());
    }
    // A checkpoint now, so that no timed one falls inside this run (the next is minutes away):
    // every run starts from the same state.
    let checkpoint = Command::new("psql")
        .args(["-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user])
        .args(["-d", &pg.database, "-qXc", "CHECKPOINT"])
        .output()
        .context("psql")?;
    if !checkpoint.status.success() {
        eprintln!(
            "CHECKPOINT before the run failed (measuring anyway): {}",
            String::from_utf8_lossy(&checkpoint.stderr).trim()
        );
    }
    let from = ferry_benches::unix_secs() + f64::from(warmup);
    let out = Command::new("pgbench")
        .args(["-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user])
        .args([
            "-c",
            &args.clients.to_string(),
            "-j",
            "2",
            "-T",
            &(args.seconds + warmup).to_string(),
        ])
        .args([
            "--log",
            "--log-prefix",
            &prefix.to_string_lossy(),
            &pg.database,
        ])
        .output()
        .context("pgbench")?;
    if !out.status.success() {
        bail!("pgbench: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut lat: Vec<f64> = Vec::new();
    let mut last = from;
    for e in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(e?.path())?;
        for line in text.lines() {
            let f: Vec<f64> = line
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            let [_, _, us, _, epoch, frac, ..] = f[..] else {
                continue;
            };
            let done = epoch + frac / 1e6;
            if done >= from {
                lat.push(us / 1000.0);
                last = last.max(done);
            }
        }
    }
    if lat.is_empty() {
        bail!("pgbench logged no transaction in the measured window");
    }
    let tps = lat.len() as f64 / (last - from).max(1e-3);
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok(Load {
        tps,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

/// Rows the job had done, from the capture state.
async fn rows_done(cfg: &Config, job: &str) -> Result<u64> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = topics::state_topic(&cfg.capture.topic_prefix);
    Ok(state::load(&origin, &topic, &cfg.capture.slot)
        .await
        .ok()
        .and_then(|s| s.backfills.get(job).map(|b| b.rows))
        .unwrap_or(0))
}

/// Seconds of load before the measured window: the throttle's canary baseline takes one
/// window, and the first chunks follow it.
fn warmup_secs(cfg: &Config) -> u32 {
    cfg.backfill.canary_window_secs as u32 + 3
}

/// Starts a backfill job and returns its rows/s over the measured window, with the load's
/// figures over the same window when `load` is given. The load (if any) starts together with
/// the job, so the throttle measures its canary baseline under the load, as it would when a
/// backfill is started on a busy database; only what follows that warm-up is measured.
async fn backfill_rate(
    cfg: &Config,
    job: &str,
    args: &Args,
    load: Option<(&PgConfig, &Path)>,
) -> Result<(f64, Option<Load>)> {
    let table = TableId::new("public", "pgbench_accounts");
    let warmup = warmup_secs(cfg);
    let bench = load.map(|(pg, dir)| {
        let (pg, args, dir) = (pg.clone(), args.clone(), dir.to_path_buf());
        tokio::task::spawn_blocking(move || pgbench(&pg, &args, &dir, warmup))
    });
    backfill::request_backfill(cfg, &table, None, Some(args.chunk_rows), Some(job.into())).await?;
    tokio::time::sleep(Duration::from_secs(u64::from(warmup))).await;
    let r0 = rows_done(cfg, job).await?;
    let t0 = Instant::now();
    let load = match bench {
        Some(b) => Some(b.await??),
        None => {
            tokio::time::sleep(Duration::from_secs(u64::from(args.seconds))).await;
            None
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let r1 = rows_done(cfg, job).await?;
    backfill::control_job(cfg, job, ferry_pipeline::wal::JobAction::Cancel).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(((r1 - r0) as f64 / secs, load))
}

impl Clone for Args {
    fn clone(&self) -> Self {
        Args {
            config: self.config.clone(),
            fixed: self.fixed.clone(),
            canary_sql: self.canary_sql.clone(),
            ..*self
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    ferry_benches::init_logs();
    let args = Args::parse();
    let base = Config::load(&args.config)?;
    let run = ferry_benches::unix_secs() as u64;
    let db = format!("ferry_bench_bf_{run}");
    let (a, pg) = ferry_benches::scratch_database(&base.origin.postgres, &db).await?;
    eprintln!("pgbench -i -s {} …", args.scale);
    let init = Command::new("pgbench")
        .args([
            "-i",
            "-q",
            "-s",
            &args.scale.to_string(),
            "-h",
            &pg.host,
            "-p",
            &pg.port.to_string(),
            "-U",
            &pg.user,
            &db,
        ])
        .output()?;
    if !init.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    }
    let dir = std::env::temp_dir().join(format!("ferry-pgbench-{run}"));
    std::fs::create_dir_all(&dir)?;

    let mut cfg = base.clone();
    cfg.origin.postgres = pg.clone();
    cfg.capture.slot = db.clone();
    cfg.capture.publication = db.clone();
    cfg.capture.tables = vec!["public.pgbench_accounts".into()];
    cfg.capture.snapshot = false;
    cfg.capture.topic_prefix = format!("bfbench{run}");
    cfg.backfill.canary_sql = args.canary_sql.clone();
    let unthrottled = {
        let mut c = cfg.clone();
        c.backfill.min_rows_per_sec = 1e9;
        c.backfill.max_rows_per_sec = 1e9;
        c.backfill.live_harm_budget = 0.0; // no quiet periods either
        c
    };
    let warmup = warmup_secs(&cfg);
    let start = |c: Config| {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            capture::run(&c, SinkMode::Kafka, rx, Arc::new(Stats::default())).await
        });
        (stop, task)
    };

    eprintln!("load alone, no Ferry…");
    let bare = tokio::task::spawn_blocking({
        let (pg, args, dir) = (pg.clone(), args.clone(), dir.clone());
        move || pgbench(&pg, &args, &dir, warmup)
    })
    .await??;
    // The baseline: the load with live capture running and no backfill, since live sync is
    // always on where a backfill runs; the ratios measure what the backfill adds. It is measured
    // before and after the backfill runs, and their mean is the baseline, so drift over the
    // run (the broker's storage growing, the tables' bloat) weighs on both sides alike.
    let with_capture = || async {
        let (stop, task) = start(cfg.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let load = tokio::task::spawn_blocking({
            let (pg, args, dir) = (pg.clone(), args.clone(), dir.clone());
            move || pgbench(&pg, &args, &dir, warmup)
        })
        .await??;
        let _ = stop.send(true);
        task.await??;
        anyhow::Ok(load)
    };
    eprintln!("load alone, live capture running…");
    let before = with_capture().await?;

    let mut runs = vec![
        ("throttle off".to_string(), unthrottled.clone(), true),
        ("throttle on".to_string(), cfg.clone(), true),
    ];
    if !args.fixed.is_empty() {
        runs = args
            .fixed
            .iter()
            .map(|&r| {
                let mut c = cfg.clone();
                c.backfill.min_rows_per_sec = r;
                c.backfill.max_rows_per_sec = r;
                (format!("fixed {} rows/s", thousands(r)), c, false)
            })
            .collect();
    }
    let mut results = Vec::new();
    for (name, c, alone_too) in runs {
        eprintln!("load during a backfill, {name}…");
        let (stop, task) = start(c.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rate, load) =
            backfill_rate(&c, &format!("{name}-load"), &args, Some((&pg, &dir))).await?;
        let rate_alone = if alone_too {
            eprintln!("backfill alone, {name}…");
            Some(
                backfill_rate(&c, &format!("{name}-alone"), &args, None)
                    .await?
                    .0,
            )
        } else {
            None
        };
        let _ = stop.send(true);
        task.await??;
        results.push((name, rate, load.context("load")?, rate_alone));
        // Let the broker finish writing what the backfill sent before the next measurement.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    eprintln!("load alone, live capture running, again…");
    let after = with_capture().await?;
    let alone = Load {
        tps: (before.tps + after.tps) / 2.0,
        p50_ms: (before.p50_ms + after.p50_ms) / 2.0,
        p99_ms: (before.p99_ms + after.p99_ms) / 2.0,
    };

    println!(
        "pgbench -s {} -c {} for {} s each; backfill of pgbench_accounts ({} rows) in chunks of up to {}",
        args.scale,
        args.clients,
        args.seconds,
        thousands(f64::from(args.scale) * 100_000.0),
        thousands(args.chunk_rows as f64)
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>10} {:>14}",
        "run", "TPS", "p50 ms", "p99 ms", "TPS ratio", "backfill rows/s"
    );
    let row = |name: &str, l: &Load, rate: String| {
        println!(
            "{:<40} {:>9.0} {:>9.2} {:>9.2} {:>10.2} {:>14}",
            name,
            l.tps,
            l.p50_ms,
            l.p99_ms,
            l.tps / alone.tps,
            rate
        );
    };
    row("load alone, no Ferry", &bare, "-".into());
    row("load alone (live capture on), before", &before, "-".into());
    row("load alone (live capture on), after", &after, "-".into());
    row("baseline: mean of the two", &alone, "-".into());
    for (name, rate, l, _) in &results {
        row(&format!("load + backfill, {name}"), l, thousands(*rate));
    }
    for (name, _, l, _) in &results {
        println!(
            "p99 ratio, {name}: {:.2}",
            l.p99_ms / alone.p99_ms.max(1e-9)
        );
    }
    if let [(_, _, _, Some(off)), (_, _, _, Some(on)), ..] = results[..] {
        println!("backfill with the load stopped: throttle off {} rows/s, throttle on {} rows/s, ratio {:.2}", thousands(off), thousands(on), on / off.max(1e-9));
    }
    println!("goals: throttle on → p99 ≤ 1.25× and TPS ≥ 0.9× of alone (live capture on); load stopped → throttled ≥ 0.8× unthrottled");

    let _ = a
        .batch_execute(&format!("SELECT pg_drop_replication_slot('{db}')"))
        .await;
    a.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    Ok(())
}
