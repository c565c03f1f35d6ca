//! A steady OLTP load (pgbench, TPC-B-like) on the origin, measured three ways in one run:
//! alone; during a backfill of `pgbench_accounts` with the throttle off; during the same
//! backfill with the throttle on. Then both backfills once more with the load stopped, to
//! compare their rates.
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
use ferry_pipeline::{sink, state};
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
    /// Ferry configuration (for the stack's addresses).
    #[arg(long, default_value = "ops/ferry.toml")]
    config: PathBuf,
}

struct Load {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs pgbench for `seconds` and reads every transaction's latency from its log.
fn pgbench(pg: &PgConfig, args: &Args, dir: &Path) -> Result<Load> {
    let prefix = dir.join("pgb");
    for e in std::fs::read_dir(dir)? {
        let _ = std::fs::remove_file(e?.path());
    }
    let out = Command::new("pgbench")
        .args(["-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user])
        .args([
            "-c",
            &args.clients.to_string(),
            "-j",
            "2",
            "-T",
            &args.seconds.to_string(),
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
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .context("tps in pgbench output")?;
    let mut lat: Vec<f64> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(e?.path())?;
        for line in text.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<f64>().ok())
            {
                lat.push(us / 1000.0);
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Load {
        tps,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

/// Rows the job had done, from the capture state.
fn rows_done(cfg: &Config, job: &str) -> u64 {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    state::load(
        &origin,
        &sink::state_topic(&cfg.capture.topic_prefix),
        &cfg.capture.slot,
    )
    .ok()
    .and_then(|s| s.backfills.get(job).map(|b| b.rows))
    .unwrap_or(0)
}

/// Starts a backfill job, runs `during` (or waits `seconds`), and returns the job's rows/s.
async fn backfill_rate(
    cfg: &Config,
    job: &str,
    seconds: u32,
    during: Option<(&PgConfig, &Args, &Path)>,
) -> Result<(f64, Option<Load>)> {
    let table = TableId::new("public", "pgbench_accounts");
    capture::request_backfill(cfg, &table, None, Some(2_000), Some(job.into())).await?;
    // The throttle measures its baseline for one canary window before the first chunk.
    tokio::time::sleep(Duration::from_secs(cfg.backfill.canary_window_secs + 3)).await;
    let (c, j) = (cfg.clone(), job.to_string());
    let r0 = tokio::task::spawn_blocking(move || rows_done(&c, &j)).await?;
    let t0 = Instant::now();
    let load = match during {
        Some((pg, args, dir)) => {
            let (pg, args2, dir) = (
                pg.clone(),
                Args {
                    config: args.config.clone(),
                    ..*args
                },
                dir.to_path_buf(),
            );
            Some(tokio::task::spawn_blocking(move || pgbench(&pg, &args2, &dir)).await??)
        }
        None => {
            tokio::time::sleep(Duration::from_secs(u64::from(seconds))).await;
            None
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let (c, j) = (cfg.clone(), job.to_string());
    let r1 = tokio::task::spawn_blocking(move || rows_done(&c, &j)).await?;
    capture::control_job(cfg, job, "cancel").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(((r1 - r0) as f64 / secs, load))
}

impl Clone for Args {
    fn clone(&self) -> Self {
        Args {
            config: self.config.clone(),
            ..*self
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    ferry_benches::init_logs();
    let args = Args::parse();
    let base = Config::load(&args.config)?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
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
    cfg.backfill.canary_sql =
        "SELECT abalance FROM pgbench_accounts WHERE aid = 1 + (random() * 1000)::int".into();
    let unthrottled = {
        let mut c = cfg.clone();
        c.backfill.min_rows_per_sec = 1e9;
        c.backfill.max_rows_per_sec = 1e9;
        c
    };
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
        move || pgbench(&pg, &args, &dir)
    })
    .await??;
    // The baseline: the load with live capture running and no backfill, since live sync is
    // always on where a backfill runs; the ratios measure what the backfill adds.
    eprintln!("load alone, live capture running…");
    let alone = {
        let (stop, task) = start(cfg.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let load = tokio::task::spawn_blocking({
            let (pg, args, dir) = (pg.clone(), args.clone(), dir.clone());
            move || pgbench(&pg, &args, &dir)
        })
        .await??;
        let _ = stop.send(true);
        task.await??;
        load
    };

    let mut results = Vec::new();
    for (name, c) in [
        ("throttle off", unthrottled.clone()),
        ("throttle on", cfg.clone()),
    ] {
        eprintln!("load during a backfill, {name}…");
        let (stop, task) = start(c.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rate, load) = backfill_rate(
            &c,
            &format!("{name}-load"),
            args.seconds,
            Some((&pg, &args, &dir)),
        )
        .await?;
        eprintln!("backfill alone, {name}…");
        let (rate_alone, _) =
            backfill_rate(&c, &format!("{name}-alone"), args.seconds, None).await?;
        let _ = stop.send(true);
        task.await??;
        results.push((name, rate, load.context("load")?, rate_alone));
    }

    println!("pgbench -s {} -c {} for {} s each; backfill of pgbench_accounts ({} rows) in chunks of 2,000", args.scale, args.clients, args.seconds, args.scale * 100_000);
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>10} {:>14}",
        "run", "TPS", "p50 ms", "p99 ms", "TPS ratio", "backfill rows/s"
    );
    println!(
        "{:<34} {:>9.0} {:>9.2} {:>9.2} {:>10.2} {:>14}",
        "load alone, no Ferry",
        bare.tps,
        bare.p50_ms,
        bare.p99_ms,
        bare.tps / alone.tps,
        "-"
    );
    println!(
        "{:<34} {:>9.0} {:>9.2} {:>9.2} {:>10} {:>14}",
        "load alone (live capture on)", alone.tps, alone.p50_ms, alone.p99_ms, "1.00", "-"
    );
    for (name, rate, l, _) in &results {
        println!(
            "{:<34} {:>9.0} {:>9.2} {:>9.2} {:>10.2} {:>14}",
            format!("load + backfill, {name}"),
            l.tps,
            l.p50_ms,
            l.p99_ms,
            l.tps / alone.tps,
            thousands(*rate)
        );
    }
    for (name, _, l, _) in &results {
        println!(
            "p99 ratio, {name}: {:.2}",
            l.p99_ms / alone.p99_ms.max(1e-9)
        );
    }
    let (off, on) = (results[0].3, results[1].3);
    println!("backfill with the load stopped: throttle off {} rows/s, throttle on {} rows/s, ratio {:.2}", thousands(off), thousands(on), on / off.max(1e-9));
    println!("goals: throttle on → p99 ≤ 1.25× and TPS ≥ 0.9× of alone (live capture on); load stopped → throttled ≥ 0.8× unthrottled");

    let _ = a
        .batch_execute(&format!("SELECT pg_drop_replication_slot('{db}')"))
        .await;
    a.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    Ok(())
}
