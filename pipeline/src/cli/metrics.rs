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
    type Series = (
        &'static str,
        &'static str,
        fn(&crate::batch::egress::Egress) -> f64,
    );
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
    let paused = u8::from(stats.paused.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP ferry_ship_paused 1 while an operator has paused live shipping\n# TYPE ferry_ship_paused gauge\nferry_ship_paused {paused}");
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

/// An HTTP response: status line, content type, body.
type Response = (&'static str, &'static str, String);

fn json(status: &'static str, body: serde_json::Value) -> Response {
    (status, "application/json", body.to_string())
}

/// Routes one request: `GET /metrics`, `GET /jobs`, and `POST /jobs/<job>/<pause|resume|cancel>`
/// (bearer token required).
async fn route(
    request: &str,
    render: &(dyn Fn() -> String + Send + Sync),
    cfg: &Config,
) -> Response {
    let mut lines = request.lines();
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let token = lines
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        })
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["metrics"]) => ("200 OK", "text/plain; version=0.0.4", render()),
        ("GET", ["jobs"]) => {
            let c = cfg.clone();
            match tokio::task::spawn_blocking(move || crate::jobs::list(&c)).await {
                Ok(Ok(rows)) => json("200 OK", serde_json::json!({ "jobs": rows })),
                Ok(Err(e)) => json("503 Service Unavailable", serde_json::json!({ "error": e })),
                Err(e) => json(
                    "500 Internal Server Error",
                    serde_json::json!({ "error": e.to_string() }),
                ),
            }
        }
        ("POST", ["jobs", job, action @ ("pause" | "resume" | "cancel")]) => {
            let expected = cfg.metrics.control_token.expose();
            if expected.is_empty() {
                return json(
                    "403 Forbidden",
                    serde_json::json!({ "error": "set metrics.control_token to allow changes" }),
                );
            }
            if token.as_deref() != Some(expected) {
                return json(
                    "401 Unauthorized",
                    serde_json::json!({ "error": "missing or wrong bearer token" }),
                );
            }
            match crate::jobs::control::request(cfg, job, action).await {
                Ok(_) => json(
                    "202 Accepted",
                    serde_json::json!({ "job": job, "action": action }),
                ),
                Err(e) => json(
                    "503 Service Unavailable",
                    serde_json::json!({ "error": e.to_string() }),
                ),
            }
        }
        _ => json(
            "404 Not Found",
            serde_json::json!({ "routes": ["GET /metrics", "GET /jobs", "POST /jobs/<job>/pause|resume|cancel"] }),
        ),
    }
}

/// Serves metrics and the job control API on `listen` until `stop` turns true.
pub async fn serve(
    listen: &str,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    cfg: Arc<Config>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(listen, "metrics and control endpoint ready");
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((mut sock, _)) = accepted else { continue };
                let mut buf = vec![0u8; 8192];
                let n = tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (status, kind, body) = route(&request, render.as_ref(), &cfg).await;
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(token: &str) -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/ferry.toml");
        let mut c = Config::load(&path).expect("ops/ferry.toml");
        c.metrics.control_token = ferry_connectors::Secret::new(token);
        c
    }

    #[tokio::test]
    async fn changes_need_the_bearer_token() {
        let render = || "ferry_up 1\n".to_string();
        let (status, _, body) =
            route("GET /metrics HTTP/1.1\r\n\r\n", &render, &cfg("s3cret")).await;
        assert_eq!((status, body.as_str()), ("200 OK", "ferry_up 1\n"));
        let (status, _, _) = route(
            "POST /jobs/j1/pause HTTP/1.1\r\nHost: x\r\n\r\n",
            &render,
            &cfg("s3cret"),
        )
        .await;
        assert_eq!(status, "401 Unauthorized");
        let (status, _, _) = route(
            "POST /jobs/j1/pause HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n",
            &render,
            &cfg("s3cret"),
        )
        .await;
        assert_eq!(status, "401 Unauthorized");
        let (status, _, body) = route(
            "POST /jobs/j1/pause HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n",
            &render,
            &cfg(""),
        )
        .await;
        assert_eq!(status, "403 Forbidden", "{body}");
        let (status, _, _) = route(
            "DELETE /everything HTTP/1.1\r\n\r\n",
            &render,
            &cfg("s3cret"),
        )
        .await;
        assert_eq!(status, "404 Not Found");
    }
}
