//! The fault scenarios. Each runs `iterations` times on a fresh lab and returns the merged
//! figures; the caller asserts the safety figures.

use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use ferry_connectors::postgres::PgConfig;
use ferry_pipeline::runtime::failpoint;
use ferry_pipeline::{apply, inspect, ship};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::broker;
use crate::checker::Figures;
use crate::lab::{Lab, Opts, Role};
use crate::net;
use crate::workload::Shape;

const DRAIN: Duration = Duration::from_secs(180);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

async fn sleep_ms(lo: u64, hi: u64) {
    tokio::time::sleep(Duration::from_millis(rand::random_range(lo..=hi))).await;
}

/// Scenario 1: kill -9 of the shipper at each failpoint, then at random moments.
pub async fn ship_kill9(f: &mut Figures, iterations: u32) {
    for _ in 0..iterations {
        let mut lab = Lab::new("ship", Opts::default()).await;
        lab.spawn(Role::Capture, None);
        lab.spawn(Role::Apply, None);
        lab.start_workload();
        for point in [
            failpoint::SHIP_AFTER_COMPACTION,
            failpoint::SHIP_MID_PRODUCE,
            failpoint::SHIP_AFTER_PRODUCE,
        ] {
            let spec = format!("{point}:{}", rand::random_range(2..=5));
            lab.spawn(Role::Ship, Some(&spec));
            let st = lab.wait_exit(Role::Ship, secs(90)).await;
            if st.success() {
                lab.figures.failures += 1;
                lab.figures
                    .notes
                    .push(format!("failpoint {spec} was never hit"));
            }
            lab.check_checkpoints().await;
        }
        for _ in 0..3 {
            lab.spawn(Role::Ship, None);
            sleep_ms(300, 3000).await;
            lab.kill9(Role::Ship);
            lab.check_checkpoints().await;
        }
        lab.spawn(Role::Ship, None);
        lab.mark_heal();
        lab.recovery(DRAIN).await;
        f.merge(lab.finish(DRAIN).await);
    }
}

/// Scenario 2: kill -9 of capture in a loop while it is behind, and during the initial snapshot.
pub async fn capture_kill9(f: &mut Figures, iterations: u32, seed_rows: i64) {
    for _ in 0..iterations {
        let mut lab = Lab::new("capture", Opts::default()).await;
        lab.spawn(Role::Ship, None);
        lab.spawn(Role::Apply, None);
        lab.start_workload();
        // Capture falls behind while it is down, then dies again and again while catching up.
        tokio::time::sleep(secs(4)).await;
        for _ in 0..5 {
            lab.spawn(Role::Capture, None);
            sleep_ms(300, 2000).await;
            lab.kill9(Role::Capture);
            lab.check_capture().await;
            sleep_ms(0, 1000).await;
        }
        lab.spawn(Role::Capture, None);
        lab.mark_heal();
        lab.recovery(DRAIN).await;
        let mut run = lab.finish(DRAIN).await;
        // This lab and the snapshot one make one iteration.
        run.iterations = 0;
        f.merge(run);

        let opts = Opts {
            seed_rows,
            snapshot_chunk_rows: Some(500),
            ..Opts::default()
        };
        let mut lab = Lab::new("snapshot", opts).await;
        lab.spawn(Role::Ship, None);
        lab.spawn(Role::Apply, None);
        lab.start_workload();
        for _ in 0..3 {
            lab.spawn(Role::Capture, None);
            sleep_ms(800, 2500).await;
            lab.kill9(Role::Capture);
            lab.check_capture().await;
        }
        lab.spawn(Role::Capture, None);
        lab.mark_heal();
        lab.recovery(DRAIN).await;
        f.merge(lab.finish(DRAIN).await);
    }
}

/// Scenario 3: graceful restart of the origin broker, then of the destination broker, mid-stream.
pub async fn broker_restart(f: &mut Figures, iterations: u32) {
    for _ in 0..iterations {
        let mut lab = Lab::new("brokers", Opts::default()).await;
        lab.start_all();
        lab.start_workload();
        for which in ["origin", "destination"] {
            tokio::time::sleep(secs(4)).await;
            let b = if which == "origin" {
                &mut lab.origin
            } else {
                &mut lab.dest
            };
            b.stop();
            tokio::time::sleep(secs(3)).await;
            b.start_again();
            lab.mark_heal();
            lab.recovery(DRAIN).await;
        }
        for r in Role::ALL {
            if !lab.running(r) {
                lab.figures.failures += 1;
                lab.figures.notes.push(format!(
                    "{r:?} exited during the broker restarts; see {}",
                    lab.log(r)
                ));
            }
        }
        f.merge(lab.finish(DRAIN).await);
    }
}

/// Scenario 4: the path to the destination broker cut (blackholed) for each of `cuts`, then flapping.
pub async fn partition(f: &mut Figures, iterations: u32, cuts: &[u64], flaps: u32) {
    if let Some(why) = net::unavailable() {
        f.skipped = Some(why);
        return;
    }
    for _ in 0..iterations {
        let mut lab = Lab::new(
            "partition",
            Opts {
                netns: true,
                ..Opts::default()
            },
        )
        .await;
        lab.start_all();
        lab.start_workload();
        let net = lab.net.take().expect("network");
        for &cut in cuts {
            tokio::time::sleep(secs(4)).await;
            net.cut();
            tokio::time::sleep(secs(cut)).await;
            net.heal();
            lab.mark_heal();
            if let Some(r) = lab.recovery(DRAIN).await {
                lab.figures
                    .extra
                    .insert(format!("recovery_after_{cut}s_cut"), r.as_secs_f64());
            }
        }
        if flaps > 0 {
            for _ in 0..flaps {
                net.cut();
                tokio::time::sleep(secs(2)).await;
                net.heal();
                tokio::time::sleep(secs(2)).await;
            }
            lab.mark_heal();
            lab.recovery(DRAIN).await;
        }
        lab.net = Some(net);
        f.merge(lab.finish(DRAIN).await);
    }
}

/// One run of scenario 5: once caught up, `steady` seconds of the workload sampling freshness; then
/// 10 s with live shipping paused, and the time to ship that backlog after resuming.
/// Returns (mean lag, max lag, catch-up versions per second).
async fn link_run(lab: &mut Lab, steady: u64) -> (f64, f64, f64) {
    lab.start_all();
    lab.start_workload();
    lab.mark_heal();
    lab.recovery(DRAIN).await;
    let (mut sum, mut n, mut max) = (0.0, 0u32, 0.0f64);
    let end = Instant::now() + secs(steady);
    while Instant::now() < end {
        let l = lab.lag_now().as_secs_f64();
        sum += l;
        n += 1;
        max = max.max(l);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = lab.ferry(&["pause", "live"]);
    assert!(out.status.success(), "ferry pause live: {out:?}");
    let before = lab.history.lock().expect("history").versions();
    tokio::time::sleep(secs(10)).await;
    lab.stop_workload().await;
    let backlog = lab.history.lock().expect("history").versions() - before;
    let out = lab.ferry(&["resume", "live"]);
    assert!(out.status.success(), "ferry resume live: {out:?}");
    lab.mark_heal();
    let took = lab.recovery(DRAIN).await.unwrap_or(DRAIN);
    (
        sum / f64::from(n.max(1)),
        max,
        backlog as f64 / took.as_secs_f64().max(0.001),
    )
}

/// Scenario 5: degraded link vs a clean one: latency 80 ± 20 ms (relay), 1% loss (nftables) and
/// 10 Mbit/s (tc tbf) each way.
pub async fn degraded_link(f: &mut Figures, iterations: u32, steady: u64) {
    if let Some(why) = net::unavailable() {
        f.skipped = Some(why);
        return;
    }
    for _ in 0..iterations {
        for degraded in [false, true] {
            let opts = Opts {
                netns: true,
                latency: degraded.then_some((80, 20)),
                ..Opts::default()
            };
            let mut lab = Lab::new(if degraded { "degraded" } else { "clean" }, opts).await;
            if degraded {
                lab.net.as_ref().expect("network").degrade(10, 1);
            }
            let (mean, max, rate) = link_run(&mut lab, steady).await;
            let which = if degraded { "degraded" } else { "clean" };
            lab.figures
                .extra
                .insert(format!("{which}_mean_lag_s"), mean);
            lab.figures.extra.insert(format!("{which}_max_lag_s"), max);
            lab.figures
                .extra
                .insert(format!("{which}_catchup_versions_per_s"), rate);
            let mut run = lab.finish(DRAIN).await;
            // The clean and the degraded run make one iteration.
            run.iterations = u32::from(degraded);
            f.merge(run);
        }
    }
}

/// Scenario 6: the destination broker stopped (SIGSTOP) for `stall` seconds: the shipper's memory stays
/// bounded, it stops consuming (back-pressure), and nothing is lost after SIGCONT.
pub async fn stalled_destination(f: &mut Figures, iterations: u32, stall: u64) {
    for _ in 0..iterations {
        let mut lab = Lab::new("stall", Opts::default()).await;
        lab.start_all();
        lab.start_workload();
        tokio::time::sleep(secs(6)).await;
        let ship_pid = lab.pid(Role::Ship);
        let rss_before = rss_mib(ship_pid);
        let pid = lab.dest.pid();
        broker::signal(pid, "-STOP");
        let t = Instant::now();
        let mut rss_peak = rss_before;
        async fn lag_at(lab: &Lab) -> i64 {
            let o = Cluster::new("origin", lab.cfg.origin.kafka.clone());
            ferry_pipeline::ship::lag(&o, &lab.cfg.capture.topic_prefix, &lab.cfg.ship.group_id)
                .await
                .map(|l| l.iter().map(|x| x.lag()).sum::<i64>())
                .unwrap_or(0)
        }
        let lag_start = lag_at(&lab).await;
        while t.elapsed() < secs(stall) {
            rss_peak = rss_peak.max(rss_mib(ship_pid));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let lag_end = lag_at(&lab).await;
        broker::signal(pid, "-CONT");
        lab.mark_heal();
        lab.recovery(DRAIN).await;
        let growth = rss_peak - rss_before;
        lab.figures
            .extra
            .insert("ship_rss_before_mib".into(), rss_before);
        lab.figures
            .extra
            .insert("ship_rss_stalled_mib".into(), rss_peak);
        lab.figures
            .extra
            .insert("unshipped_at_stall_end".into(), lag_end as f64);
        // max_buffered_bytes (64 MiB by default) bounds what the shipper holds; allow the
        // allocator and librdkafka's queues as much again.
        let bound = 2.0 * lab.cfg.ship.max_buffered_bytes as f64 / (1024.0 * 1024.0) + 64.0;
        if growth > bound {
            lab.figures.failures += 1;
            lab.figures.notes.push(format!(
                "shipper memory grew {growth:.0} MiB during the stall (bound {bound:.0} MiB)"
            ));
        }
        if lag_end <= lag_start {
            lab.figures.failures += 1;
            lab.figures.notes.push(format!(
                "the shipper kept consuming during the stall (unshipped {lag_start} -> {lag_end})"
            ));
        }
        if !lab.running(Role::Ship) {
            lab.figures.failures += 1;
            lab.figures.notes.push(format!(
                "the shipper died during the stall; see {}",
                lab.log(Role::Ship)
            ));
        }
        f.merge(lab.finish(DRAIN).await);
    }
}

fn rss_mib(pid: u32) -> f64 {
    crate::lab::proc_kib(pid, "VmRSS").map_or(0.0, |kib| kib as f64 / 1024.0)
}

/// A corrupted copy of `value`: never equal to it.
fn mutate(value: &[u8]) -> Vec<u8> {
    loop {
        let mut v = value.to_vec();
        let at = rand::random_range(0..v.len());
        match rand::random_range(0..6) {
            0 => v[at] ^= 1 << rand::random_range(0..8),
            1 => v.truncate(at),
            2 => {
                let end = (at + rand::random_range(1..64)).min(v.len());
                for b in &mut v[at..end] {
                    *b = rand::random();
                }
            }
            3 => {
                let end = (at + rand::random_range(1..64)).min(v.len());
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            4 => v.insert(at, rand::random()),
            _ => {
                v = (0..rand::random_range(0..256))
                    .map(|_| rand::random())
                    .collect()
            }
        }
        if v != value {
            return v;
        }
    }
}

/// Scenario 7: corrupt batches produced straight into the destination batch topic (each followed by a
/// good copy, as a re-ship would), plus `sweep` mutations of real batches run through the
/// applier's verification in process.
pub async fn corrupt_batches(f: &mut Figures, iterations: u32, inject: u64, sweep: u64) {
    for _ in 0..iterations {
        let mut lab = Lab::new("corrupt", Opts::default()).await;
        lab.start_all();
        lab.start_workload();
        let cfg = lab.cfg.clone();
        let dest = Cluster::new("destination", cfg.destination.kafka.clone());
        let batch_topic = cfg.batch_topic();
        // Real batches to corrupt: wait for a few to be shipped.
        let deadline = Instant::now() + secs(90);
        let good: Vec<(i32, Vec<u8>, Vec<u8>)> = loop {
            let (d, t) = (dest.clone(), batch_topic.clone());
            // A bounded read: the shipper keeps appending, and the first batches are enough.
            let read = tokio::task::spawn_blocking(move || inspect::read_all(&d, &t, 64))
                .await
                .expect("task");
            let seen = match &read {
                Ok(records) => format!("{} records", records.len()),
                Err(e) => e.to_string(),
            };
            let good: Vec<_> = read
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(p, _, k, v)| Some((p, k?, v?)))
                .collect();
            if good.len() >= 5 {
                break good;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than 5 batches shipped in 90 s (last read of {batch_topic}: {seen}); see\n{}",
                lab.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let producer: FutureProducer = dest.client_config().create().expect("producer");
        for _ in 0..inject {
            let (p, key, value) = &good[rand::random_range(0..good.len())];
            let bad = mutate(value);
            for v in [&bad, value] {
                producer
                    .send(
                        FutureRecord::to(&batch_topic)
                            .partition(*p)
                            .key(key)
                            .payload(v),
                        secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .expect("inject");
            }
            lab.figures.corrupted += 1;
        }
        // The applier quarantines each; wait for all of them.
        let quarantine = cfg.quarantine_topic();
        let deadline = Instant::now() + secs(120);
        let mut caught = 0;
        while Instant::now() < deadline {
            let (d, q) = (dest.clone(), quarantine.clone());
            caught = tokio::task::spawn_blocking(move || {
                inspect::read_all(&d, &q, usize::MAX).map_or(0, |r| r.len())
            })
            .await
            .expect("task") as u64;
            if caught >= lab.figures.corrupted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        lab.figures.quarantined = caught;

        // In process: every mutation of a real batch fails verification.
        let mut registry = ship::Registry::new(dest.clone(), &cfg.capture.topic_prefix);
        let values: Vec<Vec<u8>> = good.into_iter().map(|(_, _, v)| v).collect();
        let values = tokio::task::spawn_blocking(move || {
            for v in &values {
                if let Ok((m, _)) = ferry_schemas::manifest::unframe(v) {
                    for fp in &m.schema_fingerprints {
                        let _ = registry.get(fp);
                    }
                }
            }
            let mut caught = 0u64;
            for i in 0..sweep {
                let v = &values[i as usize % values.len()];
                if apply::verify(&mutate(v), |fp| registry.cached(fp)).is_err() {
                    caught += 1;
                }
            }
            caught
        })
        .await
        .expect("task");
        lab.figures.mutations += sweep;
        lab.figures.mutations_caught += values;
        f.merge(lab.finish(DRAIN).await);
    }
}

/// Scenario 10: pause and resume of live shipping, across shipper and applier restarts.
pub async fn pause_resume(f: &mut Figures, iterations: u32, cycles: u32) {
    for _ in 0..iterations {
        let mut lab = Lab::new("pause", Opts::default()).await;
        lab.start_all();
        lab.start_workload();
        for i in 0..cycles {
            tokio::time::sleep(secs(2)).await;
            let out = lab.ferry(&["pause", "live"]);
            assert!(out.status.success(), "ferry pause live: {out:?}");
            tokio::time::sleep(secs(1)).await;
            // Restart while paused: the pause must survive it.
            if i % 2 == 0 {
                lab.kill9(Role::Ship);
                lab.spawn(Role::Ship, None);
            } else {
                lab.kill9(Role::Apply);
                lab.spawn(Role::Apply, None);
            }
            let before = lab.applied();
            tokio::time::sleep(secs(3)).await;
            let after = lab.applied();
            // Paused: what the shipper had in flight may still land, then nothing new.
            let moved = after
                .iter()
                .filter(|(k, v)| before.get(k) != Some(v))
                .count();
            lab.figures
                .extra
                .insert("keys_moved_while_paused_max".into(), moved as f64);
            let out = lab.ferry(&["resume", "live"]);
            assert!(out.status.success(), "ferry resume live: {out:?}");
            lab.mark_heal();
            lab.recovery(DRAIN).await;
        }
        f.merge(lab.finish(DRAIN).await);
    }
}

/// Scenario 9: the slot's WAL nearing `max_slot_wal_keep_size` while capture is paused: `ferry status`
/// must warn while the slot is still valid; resuming then loses nothing.
pub async fn slot_budget(f: &mut Figures, iterations: u32) {
    for _ in 0..iterations {
        let dir = std::env::temp_dir().join(format!("ferry-chaos-pg-{}", crate::support::tag()));
        let port = broker::free_port();
        let out = std::process::Command::new(crate::support::repo().join("ops/pg-scratch"))
            .args(["start", &dir.to_string_lossy(), &port.to_string()])
            .args([
                "wal_level=logical",
                "max_wal_size=32MB",
                "min_wal_size=32MB",
                "max_slot_wal_keep_size=96MB",
                "max_wal_senders=10",
                "max_replication_slots=10",
            ])
            .output()
            .expect("ops/pg-scratch");
        if !out.status.success() {
            f.skipped = Some(format!(
                "ops/pg-scratch could not start a Postgres with a WAL limit: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return;
        }
        let pg = PgConfig {
            host: "127.0.0.1".into(),
            port,
            user: crate::support::TestDb::new_config().origin.postgres.user,
            password: Default::default(),
            database: "postgres".into(),
        };
        let mut lab = Lab::new(
            "slot",
            Opts {
                origin_pg: Some(pg),
                shape: Shape {
                    keys: 300,
                    tps: 60,
                    payload: 64,
                },
                ..Opts::default()
            },
        )
        .await;
        lab.start_all();
        lab.start_workload();
        tokio::time::sleep(secs(4)).await;
        // "Paused": capture is stopped for maintenance; the slot holds WAL from here on.
        lab.stop(Role::Capture).await;
        // WAL from another database: the slot must keep it, capture never decodes it.
        let filler = PgConfig {
            database: "postgres".into(),
            ..lab.db.cfg.origin.postgres.clone()
        }
        .connect()
        .await
        .expect("filler");
        filler
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS chaos_filler (id bigserial PRIMARY KEY, blob text)",
            )
            .await
            .expect("filler table");
        let mut detected = None;
        for _ in 0..200 {
            filler
                .batch_execute(
                    "INSERT INTO chaos_filler (blob) SELECT repeat(md5(random()::text), 32) FROM generate_series(1, 2000)",
                )
                .await
                .expect("write WAL");
            let out = lab.ferry(&["status"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let st = filler
                .query_one(
                    "SELECT wal_status, safe_wal_size FROM pg_replication_slots WHERE slot_name = $1",
                    &[&lab.cfg.capture.slot],
                )
                .await
                .expect("slot");
            let (status, safe): (Option<String>, Option<i64>) = (st.get(0), st.get(1));
            if status.as_deref() == Some("lost") {
                break;
            }
            if let Some(line) = text.lines().find(|l| l.contains("WARNING")) {
                detected = Some((line.trim().to_string(), status, safe));
                break;
            }
        }
        match detected {
            Some((line, status, safe)) => {
                lab.figures.notes.push(format!(
                    "detected at wal_status {status:?}, safe_wal_size {safe:?}: {line}"
                ));
                lab.figures.extra.insert(
                    "safe_wal_mib_at_warning".into(),
                    safe.unwrap_or(0) as f64 / 1048576.0,
                );
            }
            None => {
                lab.figures.failures += 1;
                lab.figures
                    .notes
                    .push("ferry status never warned before the slot was lost".into());
            }
        }
        drop(filler);
        lab.spawn(Role::Capture, None);
        lab.mark_heal();
        lab.recovery(DRAIN).await;
        f.merge(lab.finish(DRAIN).await);
        let _ = std::process::Command::new(crate::support::repo().join("ops/pg-scratch"))
            .args(["stop", &dir.to_string_lossy()])
            .output();
    }
}

/// Columns of the poison table compared between origin and destination, as text.
const POISON_COLS: &str = "id, v, note, shape::text, span::text, pair::text";

async fn poison_rows(s: &ferry_connectors::postgres::Session) -> Vec<Vec<Option<String>>> {
    s.query(
        &format!("SELECT {POISON_COLS} FROM chaos_poison ORDER BY id"),
        &[],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| {
                let mut v = vec![Some(r.get::<_, i32>(0).to_string())];
                v.push(Some(r.get::<_, i32>(1).to_string()));
                for i in 2..6 {
                    v.push(r.get(i));
                }
                v
            })
            .collect()
    })
    .unwrap_or_default()
}

/// `text` without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A halted process must name what stopped it, and stay halted on restart (no skip).
async fn expect_loud_halt(lab: &mut Lab, role: Role, what: &str, names: &[&str]) {
    match lab.halted(role, secs(60)).await {
        None => {
            lab.figures.silent_skips += 1;
            lab.figures
                .notes
                .push(format!("{what}: {role:?} neither delivered it nor stopped"));
        }
        Some(log) => {
            let log = strip_ansi(&log);
            let tail: String = log.lines().rev().take(15).collect::<Vec<_>>().join("\n");
            if !names.iter().all(|n| tail.contains(n)) {
                lab.figures.failures += 1;
                lab.figures.notes.push(format!(
                    "{what}: {role:?} stopped without naming {names:?}: {tail}"
                ));
            } else {
                lab.figures.notes.push(format!(
                    "{what}: {role:?} stopped loudly: {}",
                    tail.lines().find(|l| l.starts_with("error:")).unwrap_or("")
                ));
            }
            // Restarting must hit the same record again, not step over it.
            lab.spawn(role, None);
            if lab.halted(role, secs(60)).await.is_none() {
                lab.figures.silent_skips += 1;
                lab.figures
                    .notes
                    .push(format!("{what}: {role:?} went on after a restart"));
            }
        }
    }
}

/// Scenario 8: poison data: types Ferry has no mapping for, a column dropped mid-stream (both must
/// arrive intact), invalid UTF-8 text and an oversized row (each must stop the pipeline with
/// an error that names it, and stay stopped: nothing after it may slip through).
pub async fn poison(f: &mut Figures, iterations: u32) {
    for _ in 0..iterations {
        // A SQL_ASCII database stores any bytes as text; that is where invalid text comes from.
        let opts = Opts {
            create: "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
            ..Opts::default()
        };
        let mut lab = Lab::new("poison", opts).await;
        lab.db
            .exec(
                "CREATE TYPE chaos_pair AS (a int, b text);
                 CREATE TABLE chaos_poison (id int PRIMARY KEY, v int NOT NULL, note text,
                   shape point, span int4range, pair chaos_pair, extra text);",
            )
            .await;
        lab.start_all();
        lab.start_workload();
        tokio::time::sleep(secs(2)).await;
        lab.db
            .exec(
                "INSERT INTO chaos_poison SELECT g, 1, 'row ' || g, point(g, -g), int4range(g, g + 10),
                   ROW(g, 'p' || g)::chaos_pair, 'x' FROM generate_series(1, 20) g;",
            )
            .await;
        for round in 0..10 {
            lab.db
                .exec(&format!(
                    "UPDATE chaos_poison SET v = v + 1, shape = point({round}, v) WHERE id % 3 = {}",
                    round % 3
                ))
                .await;
            if round == 4 {
                lab.db
                    .exec("ALTER TABLE chaos_poison DROP COLUMN extra")
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        lab.db
            .exec("INSERT INTO chaos_poison SELECT g, 1, 'late ' || g, NULL, NULL, NULL FROM generate_series(21, 30) g")
            .await;
        // Both sides must agree on every row and column.
        let dest = lab.dest_db().await;
        let want = poison_rows(&lab.db.session).await;
        let deadline = Instant::now() + secs(90);
        let mut got = Vec::new();
        while Instant::now() < deadline {
            got = poison_rows(&dest).await;
            if got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if got != want {
            let differ = want.iter().filter(|r| !got.contains(r)).count() as u64;
            lab.figures.silent_skips += differ;
            lab.figures.notes.push(format!(
                "poison table: {differ} rows differ at the destination, e.g. {:?} vs {:?}",
                want.iter().find(|r| !got.contains(r)),
                got.first()
            ));
        }

        // Invalid text: the workload pauses so that what was committed before the poison is
        // exactly what must arrive; what follows it must not.
        lab.stop_workload().await;
        let before = lab.history.lock().expect("history").clone();
        lab.db
            .exec("UPDATE chaos_poison SET note = E'bad \\xff\\xfe bytes' WHERE id = 5")
            .await;
        lab.start_workload();
        // Postgres itself cannot convert the value for the replication stream, so the error
        // names the slot and the bad bytes, not the column.
        expect_loud_halt(
            &mut lab,
            Role::Capture,
            "invalid UTF-8",
            &["slot", "invalid byte sequence"],
        )
        .await;
        lab.stop_workload().await;
        *lab.history.lock().expect("history") = before;
        let mut run = lab.finish(DRAIN).await;
        // This lab and the next make one iteration.
        run.iterations = 0;
        f.merge(run);

        // An oversized row: 3 MB of incompressible text.
        let mut lab = Lab::new("oversized", Opts::default()).await;
        lab.db
            .exec("CREATE TABLE chaos_big (id int PRIMARY KEY, blob text)")
            .await;
        lab.start_all();
        lab.start_workload();
        tokio::time::sleep(secs(3)).await;
        // Rows committed before the replication slot existed reach Kafka through the initial
        // snapshot, which runs beside the stream and stops with it: a poison that halts capture
        // mid-snapshot postpones them until the operator fixes the cause and restarts. This
        // lab tests the stream (what was committed before the poison arrives, nothing after),
        // so it waits for both tables' snapshots first.
        if !lab
            .await_log(Role::Capture, "snapshot complete", 2, secs(60))
            .await
        {
            lab.figures.notes.push(format!(
                "oversized row: snapshots not complete in 60 s; {}",
                lab.log(Role::Capture)
            ));
        }
        lab.stop_workload().await;
        let before = lab.history.lock().expect("history").clone();
        lab.db
            .exec("INSERT INTO chaos_big SELECT 1, string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 100000) g")
            .await;
        lab.start_workload();
        let dest = lab.dest_db().await;
        // Either it arrives whole, or a process stops naming it.
        let deadline = Instant::now() + secs(60);
        let mut arrived = false;
        while Instant::now() < deadline && !arrived {
            arrived = dest
                .query_opt("SELECT length(blob) FROM chaos_big WHERE id = 1", &[])
                .await
                .ok()
                .flatten()
                .is_some_and(|r| r.get::<_, i32>(0) == 3_200_000);
            if !arrived && Role::ALL.iter().any(|&r| !lab.running(r)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if arrived {
            lab.figures
                .notes
                .push("oversized row: delivered whole".into());
        } else {
            let role = Role::ALL
                .into_iter()
                .find(|&r| !lab.running(r))
                .unwrap_or(Role::Capture);
            expect_loud_halt(&mut lab, role, "oversized row", &["chaos_big", "bytes"]).await;
            lab.stop_workload().await;
            *lab.history.lock().expect("history") = before;
        }
        f.merge(lab.finish(DRAIN).await);
    }
}

/// Now, in epoch milliseconds.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Scenario 11: replays beside live shipping: each cycle pauses live shipping (it lags), replays
/// the newest range of the origin topic (ahead of the live lane), restarts the shipper while
/// paused, then resumes. The live lane must go on from its own progress, not the replay's end:
/// a hole would lose the changes between.
pub async fn replay_beside_live(f: &mut Figures, iterations: u32, cycles: u32) {
    for _ in 0..iterations {
        let mut lab = Lab::new("replay", Opts::default()).await;
        lab.start_all();
        // No snapshot overlapping the workload: the replicated topic then holds every change
        // exactly once.
        assert!(
            lab.await_log(Role::Capture, "snapshot complete", 1, secs(60))
                .await
        );
        lab.start_workload();
        let topic = format!("{}.public.chaos_item", lab.cfg.capture.topic_prefix);
        for i in 0..cycles {
            tokio::time::sleep(secs(3)).await;
            let out = lab.ferry(&["pause", "live"]);
            assert!(out.status.success(), "ferry pause live: {out:?}");
            let paused_at = now_ms();
            tokio::time::sleep(secs(3)).await;
            // The range written while paused, and a little before: the live lane has not
            // shipped most of it.
            let from = (paused_at - 1_000).to_string();
            let job = format!("chaos-replay-{i}");
            let out = tokio::task::block_in_place(|| {
                lab.ferry(&[
                    "replay",
                    "--topic",
                    &topic,
                    "--from-time",
                    &from,
                    "--job",
                    &job,
                ])
            });
            if !out.status.success() {
                lab.figures.failures += 1;
                lab.figures.notes.push(format!(
                    "ferry replay failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            if i % 2 == 0 {
                lab.kill9(Role::Ship);
                lab.spawn(Role::Ship, None);
            } else {
                lab.stop(Role::Ship).await;
                lab.spawn(Role::Ship, None);
            }
            tokio::time::sleep(secs(1)).await;
            let out = lab.ferry(&["resume", "live"]);
            assert!(out.status.success(), "ferry resume live: {out:?}");
            lab.mark_heal();
            lab.recovery(DRAIN).await;
        }
        let mut figures = lab.finish(DRAIN).await;
        note_dest_duplicates(&mut figures);
        f.merge(figures);
    }
}

/// Counts the changes the destination topic holds more than once (a zombie shipper's batch
/// next to its successor's, a replay's): with no snapshot overlapping the workload (the run
/// starts it once capture's snapshot of the empty table is complete), each version is there
/// once.
fn note_dest_duplicates(f: &mut Figures) {
    let twice: u64 = f
        .dest_copies
        .iter()
        .filter(|(copies, _)| **copies > 1)
        .map(|(_, n)| n)
        .sum();
    f.extra
        .insert("dest_topic_versions_twice".into(), twice as f64);
    if twice > 0 {
        f.failures += 1;
        f.notes.push(format!(
            "destination topic: {twice} versions more than once ({:?})",
            f.dest_copies
        ));
    }
}

/// Scenario 12: a zombie shipper. Two shippers share the group; one is stopped (SIGSTOP) past
/// its session, the other takes its partitions over and ships them, then the stopped one goes
/// on (SIGCONT) with its stale buffers. It must ship nothing of them: no range twice, no
/// duplicate in the replicated topic.
pub async fn zombie_shipper(f: &mut Figures, iterations: u32, cycles: u32) {
    for _ in 0..iterations {
        let opts = Opts {
            ship_toml: "session_timeout_ms = 6000\n".into(),
            ..Opts::default()
        };
        let mut lab = Lab::new("zombie", opts).await;
        lab.start_all();
        assert!(
            lab.await_log(Role::Capture, "snapshot complete", 1, secs(60))
                .await
        );
        lab.start_workload();
        tokio::time::sleep(secs(3)).await;
        lab.spawn(Role::ShipB, None);
        tokio::time::sleep(secs(5)).await;
        for i in 0..cycles {
            let victim = if i % 2 == 0 { Role::Ship } else { Role::ShipB };
            let pid = lab.pid(victim);
            broker::signal(pid, "-STOP");
            // Past the session (6 s): the group gives its partitions to the other, which ships.
            tokio::time::sleep(secs(14)).await;
            broker::signal(pid, "-CONT");
            tokio::time::sleep(secs(6)).await;
        }
        lab.mark_heal();
        lab.recovery(DRAIN).await;
        let mut figures = lab.finish(DRAIN).await;
        note_dest_duplicates(&mut figures);
        f.merge(figures);
    }
}

/// Deletes the workload table's origin topic and creates it again with `partitions`.
async fn recreate_origin_topic(lab: &Lab, partitions: i32) {
    let topic = format!("{}.public.chaos_item", lab.cfg.capture.topic_prefix);
    let origin = Cluster::new("origin", lab.cfg.origin.kafka.clone());
    crate::support::delete_topic(&origin, &topic).await;
    crate::support::create_topic(&origin, &topic, partitions, false).await;
}

/// Scenario 13: the origin topic deleted and created again (with another partition count, as
/// a migration does) once everything in it was shipped, then changes into the new one. The
/// shipper stops those partitions (their offsets started over); once an operator accepts
/// (`ferry accept-gap --accept`), the new topic is shipped from its start under new batch
/// ids: every change arrives once.
pub async fn recreated_topic(f: &mut Figures, iterations: u32) {
    for i in 0..iterations {
        let mut lab = Lab::new("recreate", Opts::default()).await;
        lab.start_all();
        lab.start_workload();
        tokio::time::sleep(secs(6)).await;
        // Everything the old topic will hold is shipped and applied first.
        lab.stop_workload().await;
        lab.mark_heal();
        lab.recovery(DRAIN).await;
        lab.stop(Role::Capture).await;
        let (o, prefix) = (
            Cluster::new("origin", lab.cfg.origin.kafka.clone()),
            lab.cfg.capture.topic_prefix.clone(),
        );
        lab.earlier_origin =
            tokio::task::spawn_blocking(move || crate::checker::topic_versions(&o, &prefix))
                .await
                .expect("task");
        recreate_origin_topic(&lab, if i % 2 == 0 { 2 } else { 3 }).await;
        lab.spawn(Role::Capture, None);
        // A while of changes into the new topic, then none: its offsets stay below the old
        // topic's end, so a shipper resuming after that end never ships them, and every key
        // changed meanwhile would end at an older version in the destination.
        lab.start_workload();
        tokio::time::sleep(secs(6)).await;
        lab.stop_workload().await;
        let stopped = lab
            .await_log(Role::Ship, "deleted and created again", 1, secs(60))
            .await;
        if !stopped {
            lab.figures.failures += 1;
            lab.figures.notes.push(format!(
                "the shipper did not stop at the recreated topic; {}",
                lab.log(Role::Ship)
            ));
        }
        let out = lab.ferry(&["accept-gap", "public.chaos_item", "--accept"]);
        if !out.status.success() {
            lab.figures.failures += 1;
            lab.figures.notes.push(format!(
                "ferry accept-gap failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        lab.stop(Role::Ship).await;
        lab.spawn(Role::Ship, None);
        tokio::time::sleep(secs(4)).await;
        f.merge(lab.finish(DRAIN).await);
    }
}
