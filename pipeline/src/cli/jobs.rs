//! `ferry jobs`: the job table, and following jobs with progress bars (`--watch`,
//! `backfill --wait`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::Config;
use crate::jobs::{list, JobKind, JobRow, JobsError};

/// The jobs as a table, one line each under a header.
pub fn table(rows: &[JobRow]) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<34} {:<8} {:<26} {:<9} {:>21} {:>6} {:>8} {:<15} {:<5} note\n",
        "job", "kind", "target", "state", "done/total", "%", "rate/s", "limited by", "tier"
    );
    for r in rows {
        let _ = writeln!(
            out,
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
    out
}

/// Follows `jobs` (all backfill and replay jobs when empty) with a progress bar each until
/// they are finished or `stop` turns true. Without a terminal, prints a line every 10 s.
pub async fn follow(
    cfg: &Config,
    jobs: &[String],
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<JobRow>, JobsError> {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:<30} [{bar:30}] {pos}/{len} {percent:>3}% {per_sec:>12} ETA {eta:<5} {msg}",
    )
    .map_err(|e| JobsError::Refused(format!("progress bar template: {e}")))?
    .progress_chars("=> ");
    let mut bars: std::collections::BTreeMap<String, ProgressBar> = Default::default();
    let mut last_line = Instant::now();
    loop {
        let rows = list(cfg).await?;
        let mine: Vec<&JobRow> = rows
            .iter()
            .filter(|r| !matches!(r.kind, JobKind::Live | JobKind::Table))
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
