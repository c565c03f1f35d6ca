//! Every job in one place: the live pipeline, backfills and replays, with their state,
//! progress, throttle rate and the signal limiting it (`ferry jobs`, `GET /jobs`), and the
//! staged check of a backfill's sample (`--sample`). Showing them is `cli::jobs`'s.
//!
//! - [`backfill`]: requesting backfills and steering them through the WAL.
//! - [`replay`]: re-shipping a range of the origin topics beside live traffic.
//! - [`control`]: pause/resume/cancel by job name, routed to the right channel.

pub mod backfill;
pub mod control;
pub mod replay;

use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use serde::Serialize;

use crate::config::Config;
use crate::jobs::replay::Checkpoint;
use crate::store::control as gate;
use crate::store::state::{self, JobState, SampleState, TableProgress};
use crate::store::StoreError;
use crate::wal::JobAction;

/// Why a job command failed.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The state or control store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A cluster did not answer, or refused.
    #[error(transparent)]
    Kafka(#[from] ferry_connectors::kafka::KafkaError),
    /// Writing a request into the origin's WAL failed.
    #[error(transparent)]
    Capture(#[from] crate::error::CaptureError),
    /// Comparing a sample failed.
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    /// What was asked cannot be done as asked (no destination database, a job without
    /// progress).
    #[error("{0}")]
    Refused(String),
}

impl JobsError {
    /// Whether a retry could help.
    pub fn is_retryable(&self) -> bool {
        match self {
            JobsError::Store(e) => e.is_retryable(),
            JobsError::Kafka(e) => e.is_retryable(),
            JobsError::Capture(e) => e.is_retryable(),
            JobsError::Verify(e) => e.is_retryable(),
            JobsError::Refused(_) => false,
        }
    }
}

/// What a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// The live pipeline (capture → ship → apply).
    Live,
    /// An online backfill of a table.
    Backfill,
    /// A replay of an origin range.
    Replay,
    /// A table stopped by capture or held by apply.
    Table,
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            JobKind::Live => "live",
            JobKind::Backfill => "backfill",
            JobKind::Replay => "replay",
            JobKind::Table => "table",
        })
    }
}

/// One line of `ferry jobs`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JobRow {
    /// Job name (`live` for the live pipeline).
    pub job: String,
    /// What it is.
    pub kind: JobKind,
    /// The table or topic it works on.
    pub target: String,
    /// Where it stands.
    pub state: JobState,
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
        self.state.finished()
    }
}

/// Reads every job's state from the clusters.
pub async fn list(cfg: &Config) -> Result<Vec<JobRow>, JobsError> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let prefix = &cfg.capture.topic_prefix;
    let state_topic = crate::topics::state_topic(prefix);
    let (controls, _) = gate::load(&origin, &crate::topics::control_topic(prefix)).await?;
    let mut rows = Vec::new();

    let lag = crate::ship::lag(&origin, prefix, &cfg.ship.group_id)
        .await
        .unwrap_or_default();
    let paused = controls.get(&gate::live_key(cfg)) == Some(&JobAction::Pause);
    let (done, end): (i64, i64) = lag
        .iter()
        .fold((0, 0), |(d, e), l| (d + l.committed, e + l.end));
    rows.push(JobRow {
        job: gate::LIVE.into(),
        kind: JobKind::Live,
        target: format!("group {}", cfg.ship.group_id),
        state: if paused {
            JobState::Paused
        } else {
            JobState::Running
        },
        done: done.max(0) as u64,
        total: end.max(0) as u64,
        rate: 0.0,
        limited_by: String::new(),
        tier: None,
        after: Vec::new(),
        note: format!("lag {} changes", (end - done).max(0)),
    });

    let capture = state::load(&origin, &state_topic, &cfg.capture.slot).await?;
    for (job, b) in &capture.backfills {
        let wait = capture.backfill_wait(job);
        let state = match (b.status(), &wait) {
            (JobState::Running, Some(_)) => JobState::Waiting,
            (s, _) => s,
        };
        rows.push(JobRow {
            job: job.clone(),
            kind: JobKind::Backfill,
            target: b.table.clone(),
            state,
            done: b.rows,
            total: b.total.max(b.rows),
            rate: b.rate,
            limited_by: b.limit.clone(),
            tier: Some(b.tier),
            after: b.after.clone(),
            note: match (state, wait, &b.sample) {
                (JobState::Waiting, Some(w), _) => w,
                (JobState::Sampled, _, Some(n)) => {
                    format!("first {n} rows emitted, awaiting verification")
                }
                (_, _, Some(n)) => format!(
                    "sample {n}: {}",
                    b.sample_state.map_or("not reached", SampleState::as_str)
                ),
                _ => String::new(),
            },
        });
    }

    for (table, st) in &capture.stopped {
        rows.push(stopped_row(
            table,
            "capture",
            format!("{}; then: ferry resume-table {table}", st.reason),
        ));
    }
    if let Some(pg) = &cfg.destination.postgres {
        // The destination may be down or not set up yet; jobs still lists the rest.
        if let Ok(held) = crate::apply::held_tables(pg).await {
            for (table, batches, reason, _) in held {
                rows.push(stopped_row(
                    &table,
                    "apply",
                    format!("{batches} batches held: {reason}; then: ferry resume-table {table}"),
                ));
            }
        }
    }

    let replays: std::collections::BTreeMap<String, Checkpoint> =
        state::load_all(&origin, &state_topic, |k| k.starts_with("job/")).await?;
    for (key, cp) in replays {
        let job = key.trim_start_matches("job/").to_string();
        let state = match (cp.status, controls.get(&key)) {
            (JobState::Done, _) => JobState::Done,
            (_, Some(JobAction::Cancel)) => JobState::Cancelled,
            (_, Some(JobAction::Pause)) => JobState::Paused,
            (s, _) => s,
        };
        let total = cp.total.max(0) as u64;
        rows.push(JobRow {
            job,
            kind: JobKind::Replay,
            target: cp.topic.clone(),
            state,
            done: total.saturating_sub(cp.remaining().max(0) as u64),
            total,
            rate: cp.rate,
            limited_by: cp.limit.clone(),
            tier: None,
            after: Vec::new(),
            note: if state == JobState::Running {
                "resumes with the same `ferry replay` command if its process stopped".into()
            } else {
                String::new()
            },
        });
    }
    Ok(rows)
}

/// A `ferry jobs` line for a table a stage stopped.
fn stopped_row(table: &str, stage: &str, note: String) -> JobRow {
    JobRow {
        job: format!("{stage}:{table}"),
        kind: JobKind::Table,
        target: table.to_string(),
        state: JobState::Stopped,
        done: 0,
        total: 0,
        rate: 0.0,
        limited_by: String::new(),
        tier: None,
        after: Vec::new(),
        note,
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
) -> Result<Sample, JobsError> {
    let dest = cfg.destination.postgres.clone().ok_or_else(|| {
        JobsError::Refused("--sample needs destination.postgres to verify the sample".into())
    })?;
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = crate::topics::state_topic(&cfg.capture.topic_prefix);
    let mut announced = false;
    let b = loop {
        let st = state::load(&origin, &topic, &cfg.capture.slot).await?;
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
    let upto = match b.progress.clone() {
        Some(TableProgress::Past { order, key }) if !order.is_empty() => {
            order.into_iter().zip(key).collect::<Vec<_>>()
        }
        Some(TableProgress::After(_)) => {
            return Err(JobsError::Refused(format!(
                "job {job} holds a sample an older Ferry read; compare it with ferry verify {}, \
                 then ferry jobs resume {job}",
                b.table
            )))
        }
        _ => {
            return Err(JobsError::Refused(format!(
                "job {job} holds without progress"
            )))
        }
    };
    let table = crate::config::parse_table(&b.table)
        .ok_or_else(|| JobsError::Refused(format!("{} is not schema.table", b.table)))?;
    let scope = crate::verify::Scope {
        upto: Some(upto.clone()),
        predicate: b.predicate.clone(),
    };
    say(&format!(
        "sample of {} rows emitted (keys up to ({})); verifying it at the destination",
        b.rows,
        upto.iter()
            .map(|(c, v)| format!("{c} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let deadline = Instant::now() + Duration::from_secs(cfg.backfill.sample_timeout_secs);
    loop {
        // The destination may not have the table or the rows yet: compare until it does.
        let report =
            match crate::verify::verify_scope(&cfg.origin.postgres, &dest, &table, &scope).await {
                Ok(r) => r,
                Err(e) if Instant::now() > deadline => {
                    backfill::control_job(cfg, job, JobAction::SampleFailed).await?;
                    return Err(e.into());
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
        if report.mismatches.is_empty() {
            backfill::control_job(cfg, job, JobAction::SamplePassed).await?;
            return Ok(Sample::Passed {
                rows: report.origin_rows,
            });
        }
        if Instant::now() > deadline {
            backfill::control_job(cfg, job, JobAction::SampleFailed).await?;
            return Ok(Sample::Failed { report });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
