//! Requesting backfills and steering them: `ferry backfill`, `ferry pause|resume|cancel <job>`.
//!
//! Both travel through the origin's WAL ([`crate::wal`]), so a job starts, pauses or stops at a
//! definite point of the change stream and a request made while capture is down waits in the
//! slot. Capture runs the job (`capture` and `snapshot`); its progress lives in the capture
//! state.

use ferry_schemas::TableId;

use crate::config::Config;
use crate::error::{pg, CaptureError};
use crate::wal::{self, BackfillRequest, JobAction, JobControl};

/// One backfill job to request: a table with its options, and its place in a plan.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillSpec {
    /// Job name (default: derived from the table and the time).
    #[serde(default, rename = "name")]
    pub job: Option<String>,
    /// `schema.table`.
    pub table: String,
    /// Only rows matching this SQL predicate.
    #[serde(default, rename = "where")]
    pub predicate: Option<String>,
    /// Rows per chunk (default `backfill.chunk_rows`).
    #[serde(default)]
    pub chunk_rows: Option<usize>,
    /// Tier: lower tiers run first (core tables at 0).
    #[serde(default)]
    pub tier: u32,
    /// Jobs that must be done first.
    #[serde(default)]
    pub after: Vec<String>,
    /// Hold after this many rows until they verify at the destination.
    #[serde(default)]
    pub sample: Option<u64>,
}

/// Sends a job control message for a backfill job.
pub async fn control_job(cfg: &Config, job: &str, action: JobAction) -> Result<(), CaptureError> {
    let pgc = &cfg.origin.postgres;
    let target = pgc.display();
    let session = pgc.connect().await.map_err(pg(&target, "connecting"))?;
    let message = JobControl {
        slot: cfg.capture.slot.clone(),
        job: job.to_string(),
        action,
    };
    wal::emit_json(&session, &target, wal::Kind::JobControl, &message).await
}

/// Asks the capture pipeline to backfill a table. Returns the job name and the number of rows
/// matching now.
pub async fn request_backfill(
    cfg: &Config,
    table: &TableId,
    predicate: Option<String>,
    chunk_rows: Option<usize>,
    job: Option<String>,
) -> Result<(String, u64), CaptureError> {
    request(
        cfg,
        &BackfillSpec {
            job,
            table: table.to_string(),
            predicate,
            chunk_rows,
            ..BackfillSpec::default()
        },
    )
    .await
}

/// Requests one backfill job of a plan; see [`request_backfill`].
pub async fn request(cfg: &Config, spec: &BackfillSpec) -> Result<(String, u64), CaptureError> {
    let table = crate::config::parse_table(&spec.table).ok_or_else(|| {
        CaptureError::Setup(format!(
            "backfill table {:?} is not schema.table",
            spec.table
        ))
    })?;
    let pgc = &cfg.origin.postgres;
    let target = pgc.display();
    let session = pgc.connect().await.map_err(pg(&target, "connecting"))?;
    // A backfill re-emits rows the destination may hold; without a key it would insert them
    // again.
    let relid = ferry_connectors::postgres::catalog::table_oid(&session, &table)
        .await
        .map_err(pg(&target, format!("looking up {table}")))?
        .ok_or_else(|| CaptureError::Setup(format!("backfill: table {table} does not exist")))?;
    let keys = ferry_connectors::postgres::catalog::key_columns(&session, relid)
        .await
        .map_err(pg(&target, format!("reading the key of {table}")))?;
    if keys.is_empty() {
        return Err(CaptureError::Setup(format!(
            "backfill: {table} has no primary key or replica identity index, so re-emitted rows \
             could not be told from rows the destination already has (they would be inserted \
             twice); add a key, or drop the slot to snapshot everything again"
        )));
    }
    let q = format!(
        "{}.{}",
        ferry_connectors::postgres::quote_ident(&table.schema),
        ferry_connectors::postgres::quote_ident(&table.table)
    );
    let count_sql = match &spec.predicate {
        Some(p) => format!("SELECT count(*) FROM {q} WHERE ({p})"),
        None => format!("SELECT count(*) FROM {q}"),
    };
    let total: i64 = session
        .query_one(&count_sql, &[])
        .await
        .map_err(pg(
            &target,
            format!("counting the rows of {table} to backfill"),
        ))?
        .get(0);
    let job = spec.job.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("backfill-{table}-{now}")
    });
    let request = BackfillRequest {
        slot: cfg.capture.slot.clone(),
        job: job.clone(),
        table: table.to_string(),
        predicate: spec.predicate.clone(),
        chunk_rows: spec.chunk_rows.unwrap_or(cfg.backfill.chunk_rows),
        total: total.max(0) as u64,
        tier: spec.tier,
        after: spec.after.clone(),
        sample: spec.sample,
    };
    wal::emit_json(&session, &target, wal::Kind::Backfill, &request).await?;
    Ok((job, total.max(0) as u64))
}
