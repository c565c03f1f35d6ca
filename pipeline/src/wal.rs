//! Every message Ferry writes into the origin database's WAL, and the one way to write it.
//!
//! Operator requests that must take effect at a definite point of the change stream travel
//! through the WAL as logical decoding messages (`pg_logical_emit_message`): capture sees them
//! in commit order among the changes, so a backfill starts, a job pauses or a repair re-reads
//! rows exactly there, and a request made while capture is down waits in the slot.
//!
//! ```text
//!  ferry backfill / pause / verify --repair ─┐
//!  snapshot chunk (low/high watermark) ──────┼─▶ emit() ─▶ origin WAL ─▶ slot ─▶ capture loop
//!  capture heartbeat (keeps an idle slot moving) ┘                              (Kind::of)
//! ```
//!
//! Each message names the slot it is for, so several capture pipelines can share a database.

use ferry_schemas::TableId;
use tokio_postgres::Client;

use crate::error::{pg, CaptureError};

/// The kinds of message, by the prefix they carry in the WAL. A prefix Ferry does not know
/// (another tool's messages) is ignored by capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A snapshot chunk's low or high watermark (body: `<low|high> <chunk id>`).
    Watermark,
    /// A backfill request ([`BackfillRequest`], JSON).
    Backfill,
    /// Pause, resume or cancel a backfill job ([`JobControl`], JSON).
    JobControl,
    /// Re-capture rows found different by `ferry verify --repair` ([`RepairRequest`], JSON).
    Repair,
    /// A periodic empty message that keeps WAL moving past an idle slot.
    Heartbeat,
    /// Resume a table capture stopped ([`TableResume`], JSON).
    TableResume,
    /// A table's column numbers, written by the DDL event trigger at each `ALTER TABLE`
    /// (`catalog::install_ddl_trigger`), never by Ferry's code.
    Columns,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] = [
        Kind::Watermark,
        Kind::Backfill,
        Kind::JobControl,
        Kind::Repair,
        Kind::Heartbeat,
        Kind::TableResume,
        Kind::Columns,
    ];

    /// The prefix in the WAL.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Watermark => "ferry.watermark",
            Kind::Backfill => "ferry.backfill",
            Kind::JobControl => "ferry.job",
            Kind::Repair => "ferry.repair",
            Kind::Heartbeat => "ferry.heartbeat",
            Kind::TableResume => "ferry.resume-table",
            Kind::Columns => ferry_connectors::postgres::catalog::COLUMNS_MESSAGE,
        }
    }

    /// The kind a prefix names, if it is one of Ferry's.
    pub fn of(prefix: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.prefix() == prefix)
    }

    /// Whether the message is part of the writing transaction (decoded at its commit) rather
    /// than decoded at once. Only the heartbeat is not: it exists to make WAL, not to be read.
    fn transactional(self) -> bool {
        self != Kind::Heartbeat
    }

    /// What writing it is called in errors.
    fn what(self) -> &'static str {
        match self {
            Kind::Watermark => "writing a snapshot watermark",
            Kind::Backfill => "writing the backfill request",
            Kind::JobControl => "writing the job control message",
            Kind::Repair => "writing the repair request",
            Kind::Heartbeat => "writing a heartbeat",
            Kind::TableResume => "writing the table resume request",
            Kind::Columns => "writing column numbers",
        }
    }
}

/// Writes one message into the WAL through `client` (inside the client's open transaction, if
/// any). `target` names the database in errors.
pub async fn emit(
    client: &Client,
    target: &str,
    kind: Kind,
    body: &str,
) -> Result<(), CaptureError> {
    // Simple query protocol, literals quoted: it also runs inside the snapshot's
    // REPEATABLE READ transaction and on a session that has no prepared statements.
    let sql = format!(
        "SELECT pg_logical_emit_message({}, {}, {})",
        kind.transactional(),
        ferry_connectors::postgres::quote_literal(kind.prefix()),
        ferry_connectors::postgres::quote_literal(body)
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(pg(target, kind.what()))
}

/// Writes a JSON message ([`BackfillRequest`], [`JobControl`], [`RepairRequest`]).
pub async fn emit_json<T: serde::Serialize>(
    client: &Client,
    target: &str,
    kind: Kind,
    message: &T,
) -> Result<(), CaptureError> {
    let body = serde_json::to_string(message)
        .map_err(|e| CaptureError::Setup(format!("encoding a {} message: {e}", kind.prefix())))?;
    emit(client, target, kind, &body).await
}

/// A request addressed to one capture pipeline.
pub trait ForSlot {
    /// The slot of the pipeline it is for.
    fn slot(&self) -> &str;
}

macro_rules! for_slot {
    ($($t:ty),*) => {$(
        impl ForSlot for $t {
            fn slot(&self) -> &str {
                &self.slot
            }
        }
    )*};
}

for_slot!(JobControl, BackfillRequest, RepairRequest, TableResume);

/// Resume a table capture stopped: its held changes are sent in order at this point of the
/// stream, then its changes flow again (`ferry resume-table`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct TableResume {
    /// The capture pipeline (slot).
    pub slot: String,
    /// `schema.table`.
    pub table: String,
}

/// Pause, resume or cancel a backfill job; carried through the WAL so it takes effect in stream
/// order and survives restarts through the capture state.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct JobControl {
    /// The capture pipeline (slot).
    pub slot: String,
    /// Job name.
    pub job: String,
    /// What to do.
    pub action: JobAction,
}

/// What an operator (or a sample check) asks of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobAction {
    /// Hold: read nothing more until resumed.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Stop for good.
    Cancel,
    /// A staged backfill's sample verified: go on (backfills only).
    SamplePassed,
    /// A staged backfill's sample did not verify: stop (backfills only).
    SampleFailed,
}

impl JobAction {
    /// The actions an operator gives by name (`ferry pause|resume|cancel`, `POST /jobs/…`).
    pub const OPERATOR: [JobAction; 3] = [JobAction::Pause, JobAction::Resume, JobAction::Cancel];

    /// Its name on the wire and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            JobAction::Pause => "pause",
            JobAction::Resume => "resume",
            JobAction::Cancel => "cancel",
            JobAction::SamplePassed => "sample-passed",
            JobAction::SampleFailed => "sample-failed",
        }
    }

    /// The operator action called `name`.
    pub fn operator(name: &str) -> Option<JobAction> {
        JobAction::OPERATOR.into_iter().find(|a| a.as_str() == name)
    }
}

impl std::fmt::Display for JobAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request to backfill a table.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BackfillRequest {
    /// The capture pipeline (slot) that should run it.
    pub slot: String,
    /// Job name.
    pub job: String,
    /// `schema.table`.
    pub table: String,
    /// Optional SQL predicate.
    pub predicate: Option<String>,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Rows matching at request time.
    pub total: u64,
    /// Tier in a plan (lower tiers first).
    #[serde(default)]
    pub tier: u32,
    /// Jobs this one comes after.
    #[serde(default)]
    pub after: Vec<String>,
    /// Hold after this many rows until the sample is verified.
    #[serde(default)]
    pub sample: Option<u64>,
}

/// A request to re-capture rows.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RepairRequest {
    /// The capture pipeline (slot) that should act on it.
    pub slot: String,
    /// `schema.table`.
    pub table: String,
    /// Keys, each the text of every key column.
    pub keys: Vec<Vec<String>>,
}

impl RepairRequest {
    /// A request for `keys` of `table`.
    pub fn new(slot: &str, table: &TableId, keys: Vec<Vec<String>>) -> Self {
        RepairRequest {
            slot: slot.to_string(),
            table: table.to_string(),
            keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_round_trip_and_are_distinct() {
        for k in Kind::ALL {
            assert_eq!(Kind::of(k.prefix()), Some(k));
        }
        let mut p: Vec<_> = Kind::ALL.iter().map(|k| k.prefix()).collect();
        p.sort_unstable();
        p.dedup();
        assert_eq!(p.len(), Kind::ALL.len());
        assert_eq!(Kind::of("ferry.other"), None);
        assert_eq!(Kind::of("ferry.backfill.x"), None);
    }

    #[test]
    fn job_actions_travel_by_name() {
        for a in [
            JobAction::Pause,
            JobAction::Resume,
            JobAction::Cancel,
            JobAction::SamplePassed,
            JobAction::SampleFailed,
        ] {
            let json = serde_json::to_string(&a).expect("encodes");
            assert_eq!(json, format!("\"{a}\""));
            assert_eq!(
                serde_json::from_str::<JobAction>(&json).expect("decodes"),
                a
            );
        }
        assert_eq!(JobAction::operator("pause"), Some(JobAction::Pause));
        assert_eq!(JobAction::operator("sample-passed"), None);
        assert!(
            serde_json::from_str::<JobControl>(r#"{"slot":"s","job":"j","action":"explode"}"#)
                .is_err()
        );
    }

    #[test]
    fn old_requests_without_plan_fields_still_decode() {
        let r: BackfillRequest = serde_json::from_str(
            r#"{"slot":"s","job":"j","table":"public.t","predicate":null,"chunk_rows":10,"total":3}"#,
        )
        .expect("decodes");
        assert_eq!((r.tier, r.after.len(), r.sample), (0, 0, None));
    }
}
