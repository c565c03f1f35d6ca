//! Benchmark harnesses. Each prints Ferry side by side with a baseline measured in the same run,
//! as rates and ratios; none asserts on time. Run them in release, by hand (see RESULTS.md).

use std::time::Duration;

/// Formats a rate with thousands separators.
pub fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().rev().enumerate() {
        if i > 0 && i % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out.chars().rev().collect()
}

/// Seconds since the Unix epoch (run ids for scratch databases and topics; pgbench's log
/// timestamps).
pub fn unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Logs to stderr; `RUST_LOG=info` shows Ferry's own lines (batches, throttle decisions).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Creates a scratch database next to the configured one; returns an admin session (for
/// clean-up) and the new database's settings.
pub async fn scratch_database(
    base: &ferry_connectors::postgres::PgConfig,
    name: &str,
) -> anyhow::Result<(
    ferry_connectors::postgres::Session,
    ferry_connectors::postgres::PgConfig,
)> {
    use anyhow::Context;
    let admin = ferry_connectors::postgres::PgConfig {
        database: "postgres".into(),
        ..base.clone()
    };
    let a = admin
        .connect()
        .await
        .context("postgres (run ops/stack up)")?;
    a.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let pg = ferry_connectors::postgres::PgConfig {
        database: name.to_string(),
        ..base.clone()
    };
    Ok((a, pg))
}
