//! Pause, resume or cancel any job by name (`ferry pause|resume|cancel`, `POST /jobs/...`):
//! routes the request to the channel that job listens on.

use ferry_connectors::kafka::Cluster;

use crate::config::Config;
use crate::error::CaptureError;
use crate::store::control::{job_key, live_key, send, LIVE};
use crate::wal::JobAction;

/// What [`request`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through the origin's WAL, to the capture process (a backfill job).
    Wal,
    /// Through the control topic (the live pipeline or a replay job).
    Topic,
}

/// Pauses, resumes or cancels `job`: `live` (the live pipeline's shipping), a backfill job
/// (through the WAL) or a replay job (through the control topic). An unknown name is an error.
pub async fn request(cfg: &Config, job: &str, action: JobAction) -> Result<Route, CaptureError> {
    if job == LIVE {
        if action == JobAction::Cancel {
            return Err(CaptureError::Setup(
                "the live pipeline can be paused and resumed, not cancelled".into(),
            ));
        }
        send(cfg, &live_key(cfg), action).await?;
        return Ok(Route::Topic);
    }
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let state_topic = crate::topics::state_topic(&cfg.capture.topic_prefix);
    let capture = crate::store::state::load(&origin, &state_topic, &cfg.capture.slot).await?;
    let replay: Option<serde_json::Value> =
        crate::store::state::load_value(&origin, &state_topic, &job_key(job)).await?;
    if capture.backfills.contains_key(job) {
        crate::jobs::backfill::control_job(cfg, job, action).await?;
        Ok(Route::Wal)
    } else if replay.is_some() {
        send(cfg, &job_key(job), action).await?;
        Ok(Route::Topic)
    } else {
        Err(CaptureError::Setup(format!(
            "no job named {job:?} (see `ferry jobs`; the live pipeline is `live`)"
        )))
    }
}
