//! A minimal HTTP endpoint: Prometheus text (`GET /metrics`, rendered by the running stage:
//! `capture::stats`, `ship::stats`, `apply::stats`) and the job API (`GET /jobs`,
//! `POST /jobs/<job>/<action>`), without pulling an HTTP stack into the build.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::wal::JobAction;

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
        ("GET", ["jobs"]) => match crate::jobs::list(cfg).await {
            Ok(rows) => json("200 OK", serde_json::json!({ "jobs": rows })),
            Err(e) => json(
                "503 Service Unavailable",
                serde_json::json!({ "error": e.to_string() }),
            ),
        },
        ("POST", ["jobs", job, name]) => {
            let Some(action) = JobAction::operator(name) else {
                return json(
                    "404 Not Found",
                    serde_json::json!({ "error": format!("no action {name:?} (pause, resume or cancel)") }),
                );
            };
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
