//! Capture rate for a fixed WAL volume, four ways in one run:
//!
//! 1. `pg_recvlogical` draining the WAL with pgoutput (the decoding ceiling of the server);
//! 2. Ferry decode + encode with the null sink;
//! 3. the origin broker's raw produce ceiling for records of Ferry's average size;
//! 4. Ferry into the origin broker.
//!
//! Three slots are created before the workload, so every reader drains exactly the same WAL.
//!
//! `cargo run --release -p ferry-benches --bin capture -- --changes 1000000`

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_benches::{rate, thousands};
use ferry_connectors::kafka::{Cluster, TopicSpec};
use ferry_pipeline::capture::{self, SinkMode, Stats};
use ferry_pipeline::config::Config;
use rdkafka::producer::FutureRecord;

#[derive(Parser)]
struct Args {
    /// Changes in the workload (half inserts, half updates).
    #[arg(long, default_value_t = 1_000_000)]
    changes: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 1_000)]
    txn_rows: u64,
    /// Records for the raw produce ceiling.
    #[arg(long, default_value_t = 300_000)]
    produce_records: u64,
    /// Ferry configuration (for the stack's addresses).
    #[arg(long, default_value = "ops/ferry.toml")]
    config: PathBuf,
}

async fn wait_for(stats: &Stats, end: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while stats.confirmed_lsn.load(Ordering::Relaxed) < end {
        if Instant::now() > deadline {
            bail!("capture did not reach the end of the workload in {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn ferry_run(cfg: &Config, mode: SinkMode, end: u64) -> Result<(Duration, Arc<Stats>)> {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let stats = Arc::new(Stats::default());
    let t0 = Instant::now();
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { capture::run(&cfg, mode, rx, stats).await })
    };
    wait_for(&stats, end, Duration::from_secs(1800)).await?;
    let elapsed = t0.elapsed();
    let _ = stop.send(true);
    task.await??;
    Ok((elapsed, stats))
}

#[tokio::main]
async fn main() -> Result<()> {
    ferry_benches::init_logs();
    let args = Args::parse();
    let base = Config::load(&args.config)?;
    let run = ferry_benches::unix_secs() as u64;
    let db = format!("ferry_bench_{run}");
    let (a, pgc) = ferry_benches::scratch_database(&base.origin.postgres, &db).await?;
    let s = pgc.connect().await?;
    s.batch_execute(
        "CREATE TABLE bench (id bigint PRIMARY KEY, a int NOT NULL, b text, c timestamptz, d numeric(12,2));
         CREATE PUBLICATION bench FOR TABLE bench;",
    )
    .await?;
    let slots = ["recv", "null", "kafka", "recv2"].map(|k| format!("{db}_{k}"));
    for slot in &slots {
        s.query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await?;
    }

    eprintln!(
        "writing {} changes in transactions of {} rows…",
        args.changes, args.txn_rows
    );
    let start_lsn: i64 = s
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await?
        .get(0);
    let half = args.changes / 2;
    let mut lo = 1;
    while lo <= half {
        let hi = (lo + args.txn_rows - 1).min(half);
        s.batch_execute(&format!(
            "INSERT INTO bench SELECT g, g % 1000, 'customer-' || g, now(), g * 0.25 FROM generate_series({lo}, {hi}) g"
        ))
        .await?;
        lo = hi + 1;
    }
    let mut lo = 1;
    while lo <= args.changes - half {
        let hi = (lo + args.txn_rows - 1).min(args.changes - half);
        s.batch_execute(&format!(
            "UPDATE bench SET a = a + 1, c = now() WHERE id BETWEEN {lo} AND {hi}"
        ))
        .await?;
        lo = hi + 1;
    }
    let end: i64 = s
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await?
        .get(0);
    let end_text: String = s
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    // One more transaction so every reader has a commit past the end to stop on.
    s.batch_execute("SELECT pg_logical_emit_message(true, 'ferry.bench', 'end')")
        .await?;
    let wal_mib = (end - start_lsn) as f64 / (1024.0 * 1024.0);
    let n = args.changes;

    // 1. pg_recvlogical (run again at the end, so cache and order effects show)
    let recvlogical = |slot: &str| -> Result<Duration> {
        let t0 = Instant::now();
        let out = Command::new("pg_recvlogical")
            .args([
                "-h",
                &pgc.host,
                "-p",
                &pgc.port.to_string(),
                "-U",
                &pgc.user,
                "-d",
                &db,
                "--slot",
                slot,
                "--start",
                "--no-loop",
                "--endpos",
                &end_text,
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=bench",
                "-f",
                "/dev/null",
            ])
            .output()
            .context("running pg_recvlogical (apt-get install postgresql-client)")?;
        if !out.status.success() {
            bail!(
                "pg_recvlogical failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t0.elapsed())
    };
    let recv_first = recvlogical(&slots[0])?;

    let mut cfg = base.clone();
    cfg.origin.postgres.database = db.clone();
    cfg.capture.publication = "bench".into();
    cfg.capture.snapshot = false;
    cfg.capture.tables = vec!["public.bench".into()];
    cfg.capture.topic_prefix = format!("bench{run}");

    // 2. Ferry, null sink
    cfg.capture.slot = slots[1].clone();
    let (null_time, null_stats) = ferry_run(&cfg, SinkMode::Null, end as u64).await?;
    let events = null_stats.events_total.load(Ordering::Relaxed);
    let avg_bytes =
        null_stats.encoded_bytes_total.load(Ordering::Relaxed) as f64 / events.max(1) as f64;

    // 3. Raw produce ceiling: records of the same average size, same producer settings.
    let origin = Cluster::new("origin", base.origin.kafka.clone());
    let topic = format!("bench{run}.raw");
    origin
        .ensure_topics(&[TopicSpec {
            name: topic.clone(),
            partitions: cfg.capture.partitions,
            config: vec![],
        }])
        .await?;
    let producer = origin.producer(cfg.capture.linger_ms)?;
    let value = vec![b'x'; (avg_bytes as usize).saturating_sub(12).max(1)];
    let t0 = Instant::now();
    let mut deliveries = Vec::with_capacity(args.produce_records as usize);
    for i in 0..args.produce_records {
        let key = format!("{i:012}");
        let record = FutureRecord::to(&topic).key(&key).payload(&value);
        deliveries.push(ferry_connectors::kafka::enqueue(&producer, record).await?);
    }
    for d in deliveries {
        d.await?.map_err(|(e, _)| e)?;
    }
    let raw_time = t0.elapsed();

    // 4. Ferry into the origin broker
    cfg.capture.slot = slots[2].clone();
    let (kafka_time, kafka_stats) = ferry_run(&cfg, SinkMode::Kafka, end as u64).await?;
    let kafka_events = kafka_stats.events_total.load(Ordering::Relaxed);
    let recv_last = recvlogical(&slots[3])?;
    let recv_time = (recv_first + recv_last) / 2;

    let recv_rate = rate(n, recv_time);
    let null_rate = rate(events, null_time);
    let raw_rate = rate(args.produce_records, raw_time);
    let kafka_rate = rate(kafka_events, kafka_time);
    println!("capture of {n} changes ({wal_mib:.0} MiB of WAL, transactions of {} rows), avg encoded record {avg_bytes:.0} B", args.txn_rows);
    println!(
        "{:<34} {:>12} {:>10} {:>12}",
        "reader", "events/s", "seconds", "ratio"
    );
    println!(
        "{:<34} {:>12} {:>10.2} {:>12}",
        "pg_recvlogical (pgoutput), mean",
        thousands(recv_rate),
        recv_time.as_secs_f64(),
        "1.00"
    );
    println!(
        "{:<34} {:>12}",
        "  (first run / last run)",
        format!(
            "{} / {}",
            thousands(rate(n, recv_first)),
            thousands(rate(n, recv_last))
        )
    );
    println!(
        "{:<34} {:>12} {:>10.2} {:>12.2}",
        "ferry decode+encode, null sink",
        thousands(null_rate),
        null_time.as_secs_f64(),
        null_rate / recv_rate
    );
    println!(
        "{:<34} {:>12} {:>10.2} {:>12}",
        "broker raw produce ceiling",
        thousands(raw_rate),
        raw_time.as_secs_f64(),
        "1.00"
    );
    println!(
        "{:<34} {:>12} {:>10.2} {:>12.2}",
        "ferry into origin broker",
        thousands(kafka_rate),
        kafka_time.as_secs_f64(),
        kafka_rate / raw_rate
    );
    println!("goals: null sink ≥ 0.70 × pg_recvlogical; into broker ≥ 0.80 × raw ceiling");
    if events != n || kafka_events != n {
        println!("note: ferry emitted {events} (null) and {kafka_events} (broker) events for {n} changes");
    }

    drop(s);
    for slot in &slots {
        let _ = a
            .batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')"))
            .await;
    }
    a.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    Ok(())
}
