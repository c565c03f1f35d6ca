//! Fault-injection suite with a Jepsen-style checker (issue 6).
//!
//! Each scenario builds a private world (two tansu brokers, an origin and a destination
//! database, `ferry capture`, `ship` and `apply` as processes), runs a workload of per-key
//! monotonic versions, injects its fault, lets the pipeline drain, and checks what the origin
//! committed against the origin topic, the destination topic and the destination database.
//!
//! The fast scenarios run in every `cargo test`; the long ones are `#[ignore]`d and run by
//! `ops/chaos`, which also sets `FERRY_CHAOS_FULL=1` (longer faults) and
//! `FERRY_CHAOS_ITERATIONS`. Every scenario appends its figures as a JSON line to
//! `FERRY_CHAOS_REPORT` (default `target/chaos/report.jsonl`) and fails on any non-zero safety
//! figure. A scenario keeps its processes' and brokers' logs (the path is printed) when it
//! finds a violation, or always with `FERRY_CHAOS_KEEP_LOGS=1`.

#[path = "../it/support.rs"]
#[allow(dead_code)]
mod support;

mod broker;
mod checker;
mod lab;
mod net;
mod scenarios;
mod workload;

use std::io::Write;

use checker::Figures;

/// One scenario at a time: they measure lag and memory, and two cores are few.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn full() -> bool {
    std::env::var("FERRY_CHAOS_FULL").is_ok_and(|v| v == "1")
}

fn iterations() -> u32 {
    std::env::var("FERRY_CHAOS_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Writes the figures to the report and fails on any safety violation.
fn report(f: &Figures) {
    let path = std::env::var("FERRY_CHAOS_REPORT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| support::repo().join("target/chaos/report.jsonl"));
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let line = serde_json::to_string(f).expect("figures serialise");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        let _ = writeln!(file, "{line}");
    }
    if let Some(why) = &f.skipped {
        eprintln!("chaos {}: SKIPPED: {why}", f.scenario);
        return;
    }
    eprintln!(
        "chaos {}: {} iterations, {} txns, {} versions; lost {}/{}/{}, duplicate applications {}, \
         order violations {}, checkpoint ahead {}, corrupt {}/{} caught, mutations {}/{} caught, \
         recovery {:.1}s, max lag {:.1}s, max RSS {:.0} MiB, extra {:?}",
        f.scenario,
        f.iterations,
        f.txns,
        f.versions,
        f.lost_origin_topic,
        f.lost_dest_topic,
        f.lost_dest_db,
        f.duplicate_applications,
        f.order_violations,
        f.checkpoint_ahead,
        f.quarantined,
        f.corrupted,
        f.mutations_caught,
        f.mutations,
        f.recovery_secs,
        f.max_lag_secs,
        f.max_rss_mib,
        f.extra
    );
    let v = f.violations();
    let notes: Vec<&String> = f.notes.iter().take(30).collect();
    assert!(v.is_empty(), "{}: {v:?}\nnotes: {notes:#?}", f.scenario);
    if !f.notes.is_empty() {
        eprintln!("notes: {notes:#?}");
    }
}

macro_rules! scenario {
    ($(#[$attr:meta])* $test:ident, $name:expr, |$f:ident, $n:ident| $body:expr) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let _one = SERIAL.lock().await;
            let mut $f = Figures::new($name);
            let $n = iterations();
            $body.await;
            report(&$f);
        }
    };
}

scenario!(s01_shipper_kill9, "1 shipper kill -9", |f, n| {
    scenarios::ship_kill9(&mut f, n)
});
scenario!(s02_capture_kill9, "2 capture kill -9", |f, n| {
    scenarios::capture_kill9(&mut f, n, if full() { 20_000 } else { 5_000 })
});
scenario!(s03_broker_restarts, "3 broker restarts", |f, n| {
    scenarios::broker_restart(&mut f, n)
});
scenario!(s04_partition, "4 partition", |f, n| {
    if full() {
        scenarios::partition(&mut f, n, &[10, 60], 10)
    } else {
        scenarios::partition(&mut f, n, &[10], 0)
    }
});
scenario!(
    #[ignore = "long: ops/chaos runs it"]
    s05_degraded_link,
    "5 degraded link",
    |f, n| scenarios::degraded_link(&mut f, n, 30)
);
scenario!(s06_stalled_destination, "6 stalled destination", |f, n| {
    scenarios::stalled_destination(&mut f, n, if full() { 30 } else { 15 })
});
scenario!(s07_corrupt_batches, "7 corrupt batches", |f, n| {
    scenarios::corrupt_batches(&mut f, n, if full() { 300 } else { 40 }, 10_000)
});
scenario!(s09_slot_wal_budget, "9 slot WAL budget", |f, n| {
    scenarios::slot_budget(&mut f, n)
});
scenario!(s10_pause_resume, "10 pause/resume", |f, n| {
    scenarios::pause_resume(&mut f, n, if full() { 6 } else { 3 })
});
scenario!(s11_replay_beside_live, "11 replay beside live", |f, n| {
    scenarios::replay_beside_live(&mut f, n, if full() { 6 } else { 2 })
});
scenario!(s12_zombie_shipper, "12 zombie shipper", |f, n| {
    scenarios::zombie_shipper(&mut f, n, if full() { 4 } else { 2 })
});
scenario!(s13_recreated_topic, "13 recreated topic", |f, n| {
    scenarios::recreated_topic(&mut f, n)
});
scenario!(
    #[ignore = "long: ops/chaos runs it"]
    s08_poison_data,
    "8 poison data",
    |f, n| scenarios::poison(&mut f, n)
);
