//! Every job in one place: the live pipeline, backfills and replays, with their state,
//! progress, throttle rate and the signal limiting it (`ferry jobs`, `GET /jobs`); progress
//! bars for following jobs; and the staged check of a backfill's sample (`--sample`).
//!
//! - [`backfill`]: requesting backfills and steering them through the WAL.
//! - [`replay`]: re-shipping a range of the origin topics beside live traffic.
//! - [`control`]: pause/resume/cancel by job name, routed to the right channel.

pub mod backfill;
pub mod control;
pub mod replay;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::config::Config;
use crate::jobs::replay::Checkpoint;
use crate::store::control as gate;
use crate::store::state::{self, TableProgress};

/// One line of `ferry jobs`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JobRow {
    /// Job name (`live` for the live pipeline).
    pub job: String,
    /// `live`, `backfill` or `replay`.
    pub kind: &'static str,
    /// The table or topic it works on.
    pub target: String,
    /// `running`, `waiting`, `paused`, `sampled`, `cancelled` or `done`.
    pub state: String,
    /// Units done and in all (rows for a backfill, offsets otherwise).
    pub done: u64,
    /// See `done`.
    pub total: u64,
    /// The throttle's rate, per second (0: not throttled or not running).
    pub rate: f64,
    /// The signal limiting the rate.
    pub limited_by: String,
    /// Tier in the backfill plan.
    pub tier: Option<u32>,
    /// Jobs it comes after.
    pub after: Vec<String>,
    /// Why it waits, or anything else worth knowing.
    pub note: String,
}

impl JobRow {
    /// Whether the job will do nothing more.
    pub fn finished(&self) -> bool {
        matches!(self.state.as_str(), "done" | "cancelled")
    }
}

/// Reads every job's state from the clusters (blocking).
pub fn list(cfg: &Config) -> Result<Vec<JobRow>, String> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let prefix = &cfg.capture.topic_prefix;
    let state_topic = crate::topics::state_topic(prefix);
    let controls =
        gate::load(&origin, &crate::topics::control_topic(prefix)).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();

    let lag = crate::ship::lag(&origin, prefix, &cfg.ship.group_id).unwrap_or_default();
    let paused = controls.get(&gate::live_key(cfg)).map(String::as_str) == Some("pause");
    let (done, end): (i64, i64) = lag
        .iter()
        .fold((0, 0), |(d, e), l| (d + l.committed, e + l.end));
    rows.push(JobRow {
        job: gate::LIVE.into(),
        kind: "live",
        target: format!("group {}", cfg.ship.group_id),
        state: if paused { "paused" } else { "running" }.into(),
        done: done.max(0) as u64,
        total: end.max(0) as u64,
        rate: 0.0,
        limited_by: String::new(),
        tier: None,
        after: Vec::new(),
        note: format!("lag {} changes", (end - done).max(0)),
    });

    let capture =
        state::load(&origin, &state_topic, &cfg.capture.slot).map_err(|e| e.to_string())?;
    for (job, b) in &capture.backfills {
        let wait = capture.backfill_wait(job);
        let state = match (b.status(), &wait) {
            ("running", Some(_)) => "waiting",
            (s, _) => s,
        };
        rows.push(JobRow {
            job: job.clone(),
            kind: "backfill",
            target: b.table.clone(),
            state: state.into(),
            done: b.rows,
            total: b.total.max(b.rows),
            rate: b.rate,
            limited_by: b.limit.clone(),
            tier: Some(b.tier),
            after: b.after.clone(),
            note: match (state, wait, &b.sample) {
                ("waiting", Some(w), _) => w,
                ("sampled", _, Some(n)) => format!("first {n} rows emitted, awaiting verification"),
                (_, _, Some(n)) => format!(
                    "sample {n}: {}",
                    b.sample_state.as_deref().unwrap_or("not reached")
                ),
                _ => String::new(),
            },
        });
    }

    let replays: std::collections::BTreeMap<String, Checkpoint> =
        state::load_all(&origin, &state_topic, |k| k.starts_with("job/"))
            .map_err(|e| e.to_string())?;
    for (key, cp) in replays {
        let job = key.trim_start_matches("job/").to_string();
        let requested = controls.get(&key).map(String::as_str);
        let state = match (cp.status.as_str(), requested) {
            ("done", _) => "done",
            (_, Some("cancel")) => "cancelled",
            (_, Some("pause")) => "paused",
            ("", _) => "running",
            (s, _) => s,
        };
        let total = cp.total.max(0) as u64;
        rows.push(JobRow {
            job,
            kind: "replay",
            target: cp.topic.clone(),
            state: state.into(),
            done: total.saturating_sub(cp.remaining().max(0) as u64),
            total,
            rate: cp.rate,
            limited_by: cp.limit.clone(),
            tier: None,
            after: Vec::new(),
            note: if state == "running" {
                "resumes with the same `ferry replay` command if its process stopped".into()
            } else {
                String::new()
            },
        });
    }
    Ok(rows)
}

/// Prints the jobs as a table.
pub fn print(rows: &[JobRow]) {
    println!(
        "{:<34} {:<8} {:<26} {:<9} {:>21} {:>6} {:>8} {:<15} {:<5} note",
        "job", "kind", "target", "state", "done/total", "%", "rate/s", "limited by", "tier"
    );
    for r in rows {
        println!(
            "{:<34} {:<8} {:<26} {:<9} {:>21} {:>5.1}% {:>8.0} {:<15} {:<5} {}",
            r.job,
            r.kind,
            r.target,
            r.state,
            format!("{}/{}", r.done, r.total),
            100.0 * r.done as f64 / r.total.max(1) as f64,
            r.rate,
            if r.limited_by.is_empty() {
                "-"
            } else {
                r.limited_by.as_str()
            },
            r.tier.map_or("-".into(), |t| t.to_string()),
            match (r.after.is_empty(), r.note.is_empty()) {
                (true, _) => r.note.clone(),
                (false, true) => format!("after {}", r.after.join(", ")),
                (false, false) => format!("after {}; {}", r.after.join(", "), r.note),
            }
        );
    }
}

/// Follows `jobs` (all backfill and replay jobs when empty) with a progress bar each until
/// they are finished or `stop` turns true. Without a terminal, prints a line every 10 s.
pub async fn follow(
    cfg: &Config,
    jobs: &[String],
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<JobRow>, String> {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:<30} [{bar:30}] {pos}/{len} {percent:>3}% {per_sec:>12} ETA {eta:<5} {msg}",
    )
    .map_err(|e| e.to_string())?
    .progress_chars("=> ");
    let mut bars: std::collections::BTreeMap<String, ProgressBar> = Default::default();
    let mut last_line = Instant::now();
    loop {
        let c = cfg.clone();
        let rows = tokio::task::spawn_blocking(move || list(&c))
            .await
            .map_err(|e| e.to_string())??;
        let mine: Vec<&JobRow> = rows
            .iter()
            .filter(|r| r.kind != "live")
            .filter(|r| jobs.is_empty() || jobs.contains(&r.job))
            .collect();
        for r in &mine {
            let bar = bars.entry(r.job.clone()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(r.total.max(1)));
                b.set_style(style.clone());
                b.set_prefix(r.job.clone());
                b
            });
            bar.set_length(r.total.max(1));
            bar.set_position(r.done);
            bar.set_message(format!(
                "{} · throttle {:.0}/s ({})",
                r.state,
                r.rate,
                if r.limited_by.is_empty() {
                    "-"
                } else {
                    &r.limited_by
                }
            ));
        }
        let all_finished = !mine.is_empty() && mine.iter().all(|r| r.finished());
        if !tty && (last_line.elapsed() >= Duration::from_secs(10) || all_finished) {
            last_line = Instant::now();
            for r in &mine {
                eprintln!(
                    "{}: {} {}/{} ({:.1}%), throttle {:.0}/s limited by {}",
                    r.job,
                    r.state,
                    r.done,
                    r.total,
                    100.0 * r.done as f64 / r.total.max(1) as f64,
                    r.rate,
                    if r.limited_by.is_empty() {
                        "-"
                    } else {
                        &r.limited_by
                    }
                );
            }
        }
        if all_finished || *stop.borrow() {
            for b in bars.values() {
                b.abandon();
            }
            return Ok(rows);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The outcome of a staged backfill's sample check.
#[derive(Debug)]
pub enum Sample {
    /// The job finished before reaching its sample size.
    NotReached,
    /// The sample verified and the job goes on.
    Passed {
        /// Rows compared.
        rows: i64,
    },
    /// The sample did not verify in time; the job is stopped.
    Failed {
        /// What differed.
        report: crate::verify::Report,
    },
}

/// Waits for backfill `job` to hold at its sample, compares the sample in the origin and the
/// destination database until it matches or `backfill.sample_timeout_secs` pass, then lets
/// the job continue or stops it.
pub async fn check_sample(
    cfg: &Config,
    job: &str,
    mut say: impl FnMut(&str),
) -> Result<Sample, String> {
    let dest = cfg
        .destination
        .postgres
        .clone()
        .ok_or("--sample needs destination.postgres to verify the sample")?;
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = crate::topics::state_topic(&cfg.capture.topic_prefix);
    let mut announced = false;
    let b = loop {
        let (o, t, slot) = (origin.clone(), topic.clone(), cfg.capture.slot.clone());
        let st = tokio::task::spawn_blocking(move || state::load(&o, &t, &slot))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        match st.backfills.get(job) {
            Some(b) if b.held() => break b.clone(),
            Some(b) if b.progress == Some(TableProgress::Done) || b.cancelled => {
                return Ok(Sample::NotReached)
            }
            Some(b) if !announced => {
                announced = true;
                say(&format!(
                    "waiting for the first {} rows to be emitted",
                    b.sample.unwrap_or(0)
                ));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let Some(TableProgress::After(upto)) = b.progress.clone() else {
        return Err(format!("job {job} holds without progress"));
    };
    let table =
        crate::config::parse_table(&b.table).ok_or(format!("{} is not schema.table", b.table))?;
    let scope = crate::verify::Scope {
        upto: Some(upto.clone()),
        predicate: b.predicate.clone(),
    };
    say(&format!(
        "sample of {} rows emitted (keys up to ({})); verifying it at the destination",
        b.rows,
        upto.join(", ")
    ));
    let deadline = Instant::now() + Duration::from_secs(cfg.backfill.sample_timeout_secs);
    loop {
        // The destination may not have the table or the rows yet: compare until it does.
        let report =
            match crate::verify::verify_scope(&cfg.origin.postgres, &dest, &table, &scope).await {
                Ok(r) => r,
                Err(e) if Instant::now() > deadline => {
                    backfill::control_job(cfg, job, "sample-failed")
                        .await
                        .map_err(|e| e.to_string())?;
                    return Err(format!("the sample could not be verified: {e}"));
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
        if report.mismatches.is_empty() {
            backfill::control_job(cfg, job, "sample-passed")
                .await
                .map_err(|e| e.to_string())?;
            return Ok(Sample::Passed {
                rows: report.origin_rows,
            });
        }
        if Instant::now() > deadline {
            backfill::control_job(cfg, job, "sample-failed")
                .await
                .map_err(|e| e.to_string())?;
            return Ok(Sample::Failed { report });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
