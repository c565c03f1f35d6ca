//! Shipping across regions, side by side in one run with the same change stream in the origin
//! broker and the same destination broker:
//!
//! 1. `ferry ship` (compaction + Arrow IPC + zstd, with manifests);
//! 2. a MirrorMaker-style relay: consume each origin record, produce it unchanged to the
//!    destination with `compression.type=zstd`, `linger.ms=100`, `batch.size=1 MB`.
//!
//! Workloads: insert-only, and update-heavy (60% updates on Zipf-distributed keys, 30% inserts,
//! 10% deletes). Bytes to the destination are the producers' own socket counts (librdkafka
//! `txbytes`, what went on the wire), not Ferry's counters. A third line measures the kernel
//! alone: compaction + encoding of the same changes, in memory, per CPU-second.
//!
//! `cargo run --release -p ferry-benches --bin ship -- --changes 200000`

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ferry_benches::thousands;
use ferry_connectors::kafka::{Cluster, TopicSpec};
use ferry_pipeline::batch::payload;
use ferry_pipeline::batch::Entry;
use ferry_pipeline::config::Config;
use ferry_pipeline::ship::compact;
use ferry_pipeline::ship::{self, ShipStats};
use ferry_pipeline::topics;
use ferry_schemas::{
    ChangeEvent, Column, ColumnType, Datum, EncodedSchema, Op, Source, TableId, TableSchema,
};
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;

#[derive(Parser)]
struct Args {
    /// Changes per workload.
    #[arg(long, default_value_t = 200_000)]
    changes: usize,
    /// Ferry configuration (for the stack's addresses).
    #[arg(long, default_value = "ops/ferry.toml")]
    config: PathBuf,
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn table() -> TableSchema {
    let c = |name: &str, pg: &str, ty: ColumnType, key: bool| Column {
        name: name.into(),
        pg_type: pg.into(),
        type_oid: 0,
        type_mod: -1,
        missing: None,
        attnum: None,
        ty,
        key,
        key_order: 0,
    };
    TableSchema {
        database: "shop".into(),
        id: TableId::new("public", "orders"),
        columns: vec![
            c("id", "int8", ColumnType::Int8, true),
            c("customer", "text", ColumnType::Text, false),
            c("amount", "numeric", ColumnType::Numeric, false),
            c("status", "text", ColumnType::Text, false),
            c("quantity", "int4", ColumnType::Int4, false),
            c("updated_at", "timestamptz", ColumnType::TimestampTz, false),
        ],
    }
}

/// Zipf(s = 1) over ranks 0..n, by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Zipf {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n);
        for k in 1..=n {
            acc += 1.0 / k as f64;
            cdf.push(acc);
        }
        let total = acc;
        cdf.iter_mut().for_each(|v| *v /= total);
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

fn workload(n: usize, update_heavy: bool) -> Vec<ChangeEvent> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let row = |id: i64, rng: &mut rand::rngs::StdRng, version: i64| {
        vec![
            Datum::Long(id),
            Datum::Text(format!("customer-{}", id % 9973)),
            Datum::Text(format!(
                "{}.{:02}",
                rng.random_range(1..5000),
                rng.random_range(0..100)
            )),
            Datum::Text(["new", "paid", "shipped", "delivered"][(version % 4) as usize].into()),
            Datum::Int(rng.random_range(1..20)),
            Datum::Long(1_790_000_000_000_000 + version * 1_000),
        ]
    };
    let source = |lsn: usize| Source {
        region: "origin".into(),
        database: "shop".into(),
        schema: "public".into(),
        table: "orders".into(),
        lsn: 1_000_000 + lsn as u64,
        seq: 0,
        txid: Some(lsn as i64 / 100),
        commit_ts_us: Some(1_790_000_000_000_000 + lsn as i64),
        snapshot: false,
    };
    let mut out = Vec::with_capacity(n);
    let mut live: Vec<i64> = Vec::new();
    let mut next_id = 1i64;
    let zipf = Zipf::new(50_000);
    for i in 0..n {
        let roll: f64 = rng.random();
        let insert = !update_heavy || live.len() < 1_000 || roll < 0.30;
        if insert {
            let id = next_id;
            next_id += 1;
            live.push(id);
            let after = row(id, &mut rng, 0);
            out.push(ChangeEvent {
                op: Op::Create,
                before: None,
                after: Some(after),
                source: source(i),
            });
        } else {
            let rank = zipf.sample(&mut rng) % live.len();
            let idx = live.len() - 1 - rank;
            let id = live[idx];
            if roll < 0.90 {
                let after = row(id, &mut rng, i as i64);
                out.push(ChangeEvent {
                    op: Op::Update,
                    before: None,
                    after: Some(after),
                    source: source(i),
                });
            } else {
                live.swap_remove(idx);
                let mut before = vec![Datum::Null; 6];
                before[0] = Datum::Long(id);
                out.push(ChangeEvent {
                    op: Op::Delete,
                    before: Some(before),
                    after: None,
                    source: source(i),
                });
            }
        }
    }
    out
}

struct Line {
    name: String,
    events_per_sec: f64,
    bytes_per_change: f64,
    cpu_seconds: f64,
    seconds: f64,
}

async fn produce_origin(
    cfg: &Config,
    schema: &EncodedSchema,
    events: &[ChangeEvent],
) -> Result<(String, u64)> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let prefix = &cfg.capture.topic_prefix;
    let topic = topics::table_topic(prefix, &schema.table().id);
    origin
        .ensure_topics(&[
            TopicSpec {
                name: topic.clone(),
                partitions: 3,
                config: vec![],
            },
            TopicSpec {
                name: topics::schema_topic(prefix),
                partitions: 1,
                config: vec![],
            },
        ])
        .await?;
    let producer = origin.producer(20)?;
    for (fp, json) in [
        (schema.value_fp, &schema.value_json),
        (schema.key_fp, &schema.key_json),
    ] {
        let key = fp.to_string();
        producer
            .send(
                FutureRecord::to(&topics::schema_topic(prefix))
                    .key(&key)
                    .payload(json.as_bytes()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let mut raw = 0u64;
    let mut pending = Vec::new();
    for e in events {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        schema.encode_key(e.key_image().context("image")?, &mut k)?;
        schema.encode_value(e, &mut v)?;
        raw += (k.len() + v.len()) as u64;
        let record = FutureRecord::to(&topic).key(&k).payload(&v);
        pending.push(ferry_connectors::kafka::enqueue(&producer, record).await?);
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok((topic, raw))
}

async fn ferry_ship(cfg: &Config, n: usize) -> Result<Line> {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let stats = Arc::new(ShipStats::default());
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let task = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, stats).await })
    };
    while (stats.total().events_in as usize) < n {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(900),
            "ferry ship did not finish in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let steady = stats
        .first_record_at
        .get()
        .map_or(t0, |t| *t)
        .elapsed()
        .as_secs_f64();
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let _ = stop.send(true);
    task.await??;
    let wire = stats
        .wire_tx_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let t = stats.total();
    Ok(Line {
        name: format!(
            "ferry ship ({} batches, {} rows out)",
            t.batches,
            thousands(t.events_out as f64)
        ),
        events_per_sec: n as f64 / steady,
        bytes_per_change: wire as f64 / n as f64,
        cpu_seconds: cpu,
        seconds,
    })
}

async fn relay(cfg: &Config, origin_topic: &str, n: usize) -> Result<Line> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let topic = format!("{origin_topic}.mirror");
    dest.ensure_topics(&[TopicSpec {
        name: topic.clone(),
        partitions: 3,
        config: vec![],
    }])
    .await?;
    let mut pc = dest.client_config();
    pc.set("compression.type", "zstd")
        .set("linger.ms", "100")
        .set("batch.size", "1000000")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("statistics.interval.ms", "1000");
    let wire = ferry_connectors::kafka::WireContext::default();
    let producer: ferry_connectors::kafka::Producer = pc.create_with_context(wire.clone())?;
    let mut cc = origin.client_config();
    cc.set("group.id", format!("relay-{origin_topic}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("fetch.max.bytes", "52428800");
    let consumer: StreamConsumer = cc.create()?;
    consumer.subscribe(&[origin_topic])?;
    let cpu0 = cpu_seconds();
    let t_start = Instant::now();
    let mut t0 = t_start;
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let m = consumer.recv().await?;
        if i == 0 {
            t0 = Instant::now();
        }
        let mut record = FutureRecord::to(&topic).partition(m.partition());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        pending.push(ferry_connectors::kafka::enqueue(&producer, record).await?);
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    let steady = t0.elapsed().as_secs_f64();
    let seconds = t_start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    Ok(Line {
        name: "relay (per record, producer zstd)".into(),
        events_per_sec: n as f64 / steady,
        bytes_per_change: wire.tx_bytes() as f64 / n as f64,
        cpu_seconds: cpu,
        seconds,
    })
}

/// Compaction + encoding alone, on one thread, in batches like the shipper's.
async fn kernel(
    schema: &Arc<EncodedSchema>,
    events: &[ChangeEvent],
    batch: usize,
) -> Result<(f64, f64)> {
    let mut keyed = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let mut k = Vec::new();
        schema.encode_key(e.key_image().context("image")?, &mut k)?;
        keyed.push(Entry {
            offset: i as i64,
            key: Some(k),
            schema: schema.clone(),
            event: e.clone(),
        });
    }
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut out_bytes = 0;
    for chunk in keyed.chunks(batch) {
        let runs = compact::compact(chunk.to_vec(), true).await?;
        out_bytes += payload::encode(&runs, 3)?.bytes.len();
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let _ = out_bytes;
    Ok((
        events.len() as f64 / cpu.max(1e-9),
        events.len() as f64 / wall,
    ))
}

fn main() -> Result<()> {
    ferry_benches::init_logs();
    let args = Args::parse();
    let base = Config::load(&args.config)?;
    let run = ferry_benches::unix_secs() as u64;
    let schema = Arc::new(EncodedSchema::new(&table())?);
    let mut report: HashMap<&str, Vec<Line>> = HashMap::new();
    let mut kernels = Vec::new();
    for (name, heavy) in [("insert-only", false), ("update-heavy", true)] {
        let events = workload(args.changes, heavy);
        // The kernel runs on a single-threaded runtime, so its CPU time is one core's.
        let (per_cpu_s, per_wall_s) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(kernel(&schema, &events, 20_000))?;
        kernels.push((name, per_cpu_s, per_wall_s));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let lines = rt.block_on(async {
            let mut cfg = base.clone();
            cfg.capture.topic_prefix = format!("shipbench{run}.{}", name.replace('-', "_"));
            cfg.ship.group_id = format!("shipbench-{run}-{name}");
            cfg.ship.instance_id = format!("shipbench-{run}-{name}");
            eprintln!(
                "{name}: producing {} changes to the origin broker…",
                args.changes
            );
            let (topic, raw) = produce_origin(&cfg, &schema, &events).await?;
            eprintln!(
                "{name}: {:.0} bytes per change in the origin topic; shipping…",
                raw as f64 / args.changes as f64
            );
            let ferry = ferry_ship(&cfg, args.changes).await?;
            eprintln!("{name}: relaying…");
            let relay = relay(&cfg, &topic, args.changes).await?;
            anyhow::Ok(vec![ferry, relay])
        })?;
        report.insert(name, lines);
    }
    println!(
        "shipping {} changes per workload (table of 6 columns), origin → destination broker",
        args.changes
    );
    println!(
        "{:<14} {:<40} {:>12} {:>10} {:>9} {:>8}",
        "workload", "shipper", "bytes/change", "events/s", "CPU s", "wall s"
    );
    for name in ["insert-only", "update-heavy"] {
        let lines = &report[name];
        for l in lines {
            println!(
                "{:<14} {:<40} {:>12.1} {:>10} {:>9.2} {:>8.2}",
                name,
                l.name,
                l.bytes_per_change,
                thousands(l.events_per_sec),
                l.cpu_seconds,
                l.seconds
            );
        }
        let (f, r) = (&lines[0], &lines[1]);
        println!(
            "{:<14} {:<40} {:>11.2}x {:>9.2}x {:>8.2}x",
            name,
            "ratio relay/ferry (bytes, ferry/relay speed, relay/ferry CPU)",
            r.bytes_per_change / f.bytes_per_change,
            f.events_per_sec / r.events_per_sec,
            r.cpu_seconds / f.cpu_seconds.max(1e-9)
        );
    }
    for (name, per_cpu, per_wall) in kernels {
        println!("kernel {name:<14} compaction + encoding: {} events per CPU-second ({} per wall-second)", thousands(per_cpu), thousands(per_wall));
    }
    println!("goals: bytes ≥ 3x fewer than the relay (update-heavy), ≥ 1.5x (insert-only); ≥ 5x the relay's events/s; kernel ≥ 500k events/s per core");
    Ok(())
}
