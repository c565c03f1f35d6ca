//! A minimal Prometheus text-format endpoint (`GET /metrics`), so capture and ship counters can be
//! scraped without pulling an HTTP stack into the build. Metric names follow
//! `ferry_<component>_<thing>_<unit>`; counters end in `_total`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::capture::Stats;
use crate::config::Config;
use crate::ship::ShipStats;

/// Renders capture counters.
pub fn render_capture(stats: &Stats, slot: &str, out: &mut String) {
    let rows = [
        (
            "ferry_capture_events_total",
            "counter",
            "change events emitted",
            stats.events_total.load(Ordering::Relaxed),
        ),
        (
            "ferry_capture_snapshot_rows_total",
            "counter",
            "snapshot rows emitted",
            stats.snapshot_rows_total.load(Ordering::Relaxed),
        ),
        (
            "ferry_capture_transactions_total",
            "counter",
            "source transactions seen",
            stats.transactions_total.load(Ordering::Relaxed),
        ),
        (
            "ferry_capture_encoded_bytes_total",
            "counter",
            "bytes of encoded keys and values",
            stats.encoded_bytes_total.load(Ordering::Relaxed),
        ),
        (
            "ferry_capture_retries_total",
            "counter",
            "retries after transient failures",
            stats.retries_total.load(Ordering::Relaxed),
        ),
        (
            "ferry_capture_confirmed_lsn",
            "gauge",
            "position confirmed to Postgres",
            stats.confirmed_lsn.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{slot=\"{slot}\"}} {v}"
        );
    }
}

/// Renders ship counters, per table and region pair, with the egress cost.
pub fn render_ship(stats: &ShipStats, cfg: &Config, out: &mut String) {
    let pair = format!("{}->{}", cfg.origin.region, cfg.destination.region);
    let price = cfg.ship.prices_per_gb.get(&pair).copied();
    let tables = stats.tables.lock().map(|t| t.clone()).unwrap_or_default();
    type Series = (&'static str, &'static str, fn(&crate::ship::Egress) -> f64);
    let series: [Series; 5] = [
        ("ferry_ship_batches_total", "batches shipped", |e| {
            e.batches as f64
        }),
        ("ferry_ship_events_in_total", "changes consumed", |e| {
            e.events_in as f64
        }),
        (
            "ferry_ship_events_out_total",
            "rows shipped after compaction",
            |e| e.events_out as f64,
        ),
        (
            "ferry_ship_raw_bytes_total",
            "bytes of origin records consumed",
            |e| e.raw_bytes as f64,
        ),
        (
            "ferry_ship_shipped_bytes_total",
            "bytes produced to the destination",
            |e| e.shipped_bytes as f64,
        ),
    ];
    for (name, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (table, e) in &tables {
            let _ = writeln!(
                out,
                "{name}{{regions=\"{pair}\",table=\"{table}\"}} {}",
                get(e)
            );
        }
    }
    if let Some(p) = price {
        let name = "ferry_ship_egress_cost_dollars_total";
        let _ = writeln!(
            out,
            "# HELP {name} egress cost at ship.prices_per_gb\n# TYPE {name} counter"
        );
        for (table, e) in &tables {
            let _ = writeln!(
                out,
                "{name}{{regions=\"{pair}\",table=\"{table}\"}} {}",
                p * e.shipped_bytes as f64 / 1e9
            );
        }
    }
    let name = "ferry_ship_wire_bytes_total";
    let _ = writeln!(
        out,
        "# HELP {name} bytes the destination producer wrote to the brokers' sockets\n# TYPE {name} counter\n{name}{{regions=\"{pair}\"}} {}",
        stats.wire_tx_bytes.load(Ordering::Relaxed)
    );
    let stopped = stats
        .stopped_partitions
        .lock()
        .map(|s| s.len())
        .unwrap_or(0);
    let _ = writeln!(out, "# HELP ferry_ship_stopped_partitions partitions stopped by bad data\n# TYPE ferry_ship_stopped_partitions gauge\nferry_ship_stopped_partitions {stopped}");
}

/// Renders apply counters.
pub fn render_apply(stats: &crate::apply::ApplyStats, out: &mut String) {
    let rows = [
        (
            "ferry_apply_batches_applied_total",
            "batches applied",
            &stats.batches_applied_total,
        ),
        (
            "ferry_apply_batches_duplicate_total",
            "batches skipped because they were applied before",
            &stats.batches_duplicate_total,
        ),
        (
            "ferry_apply_batches_quarantined_total",
            "batches that failed verification",
            &stats.batches_quarantined_total,
        ),
        (
            "ferry_apply_rows_written_total",
            "rows inserted or updated in the destination database",
            &stats.rows_written_total,
        ),
        (
            "ferry_apply_rows_deleted_total",
            "rows deleted in the destination database",
            &stats.rows_deleted_total,
        ),
        (
            "ferry_apply_rows_stale_total",
            "changes ignored because the destination held a newer position",
            &stats.rows_stale_total,
        ),
    ];
    for (name, help, v) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let stopped = stats.stopped.lock().map(|s| s.len()).unwrap_or(0);
    let _ = writeln!(out, "# HELP ferry_apply_stopped_partitions partitions stopped on a corrupt batch\n# TYPE ferry_apply_stopped_partitions gauge\nferry_apply_stopped_partitions {stopped}");
}

/// Serves `render()` at `GET /metrics` on `listen` until `stop` turns true.
pub async fn serve(
    listen: &str,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(listen, "metrics endpoint ready");
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((mut sock, _)) = accepted else { continue };
                let body = render();
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf)).await;
                let found = buf.starts_with(b"GET /metrics");
                let (status, body) = if found { ("200 OK", body) } else { ("404 Not Found", "try /metrics\n".to_string()) };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            }
        }
    }
}
