//! Pipeline errors, each knowing whether a retry could help.

use ferry_connectors::kafka::KafkaError;
use ferry_connectors::postgres::changes::ChangeError;
use ferry_connectors::registry::RegistryError;
use ferry_schemas::{AvroError, Lsn};
use rdkafka::error::KafkaError as RdError;

/// Why capture stopped.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A query on the source database failed.
    #[error("postgres {target}: {action}: {source}")]
    Postgres {
        /// `host:port/db`.
        target: String,
        /// What was being done.
        action: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The replication stream failed.
    #[error("replication stream from slot {slot}: {source}")]
    Replication {
        /// The slot.
        slot: String,
        /// The transport's error.
        source: pgwire_replication::PgWireError,
    },
    /// A change could not be decoded.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// An event could not be encoded.
    #[error("encoding a change at LSN {lsn}: {source}")]
    Encode {
        /// Where in the WAL.
        lsn: Lsn,
        /// What was wrong.
        source: AvroError,
    },
    /// A Kafka operation failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The schema registry refused or did not answer.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The broker did not acknowledge a record.
    #[error("kafka origin: record for {topic} (lsn {lsn}) was not acknowledged: {reason}")]
    Delivery {
        /// The topic.
        topic: String,
        /// LSN of the batch it belonged to, when known.
        lsn: String,
        /// The broker's or client's reason.
        reason: String,
        /// Whether sending it again cannot help (a record the broker will never take).
        permanent: bool,
    },
    /// The source is not set up so that capture can work; the message says what to fix.
    #[error("{0}")]
    Setup(String),
    /// Stored capture state or a control request could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CaptureError {
    /// Whether a retry could help. Bad data and bad setup are permanent; connections, brokers
    /// and unknown failures are retried with back-off.
    pub fn is_retryable(&self) -> bool {
        match self {
            CaptureError::Postgres { source, .. } => passing(source),
            // Class 22 (data exception): the server cannot decode the change at the slot's
            // position, e.g. text that is not valid in the database's encoding. It fails the
            // same way every time; stop there rather than skip it.
            CaptureError::Replication { source, .. } => {
                !replication_sqlstate(source).is_some_and(|code| code.starts_with("22"))
            }
            CaptureError::Change(e) => e.is_retryable(),
            CaptureError::Encode { .. } => false,
            CaptureError::Kafka(e) => e.is_retryable(),
            CaptureError::Registry(e) => e.is_retryable(),
            CaptureError::Delivery { permanent, .. } => !permanent,
            CaptureError::Setup(_) => false,
            CaptureError::Store(e) => e.is_retryable(),
        }
    }
}

/// The SQLSTATE of an error the server sent on the replication connection. The transport
/// (pgwire-replication 0.5) keeps a server error as text only, which it formats as
/// `<message> (SQLSTATE <code>)`; this reads the code back from that fixed form, so no other
/// module looks at message text.
pub fn replication_sqlstate(e: &pgwire_replication::PgWireError) -> Option<&str> {
    let pgwire_replication::PgWireError::Server(text) = e else {
        return None;
    };
    let code = text.rsplit_once("(SQLSTATE ")?.1.strip_suffix(')')?;
    (code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(code)
}

/// Why a store (`crate::store`) could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The broker did not answer, or refused.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// A value was not acknowledged.
    #[error("{topic}: writing {key}: {source}")]
    Write {
        /// The store's topic.
        topic: String,
        /// The key written.
        key: String,
        /// The client's error.
        source: RdError,
    },
    /// A stored value does not decode: retrying reads the same bytes.
    #[error("{topic} offset {offset}: {reason}")]
    Corrupt {
        /// The store's topic.
        topic: String,
        /// Where.
        offset: i64,
        /// What is wrong.
        reason: String,
    },
    /// A request the store does not take (an action a key cannot have).
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    /// Whether a retry could help: an unreachable broker yes; corrupt values, refused requests
    /// and records the broker will never take no.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Kafka(e) => e.is_retryable(),
            StoreError::Write { source, .. } => !refused_for_good(source),
            StoreError::Corrupt { .. } | StoreError::Refused(_) => false,
        }
    }
}

/// The error and its causes on one line, each cause once: errors that already print their
/// source are not followed by it again.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Whether a Postgres error may pass on a retry: a lost connection (no SQLSTATE) or class 08
/// (connection), 40 (transaction rollback), 53 (resources), 55 (object in use, lock not
/// available) or 57 (operator intervention). Syntax, privilege, data and undefined-object
/// errors fail the same way every time.
pub fn passing(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_none_or(|db| matches!(&db.code().code()[..2], "08" | "40" | "53" | "55" | "57"))
}

/// Wraps a Postgres error with its target and action.
pub fn pg(
    target: &str,
    action: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> CaptureError {
    let target = target.to_string();
    let action = action.into();
    move |source| CaptureError::Postgres {
        target,
        action,
        source,
    }
}

/// A record the broker did not take; one it will never take (too large, say) stops capture
/// with what to change, instead of being retried for ever.
pub(crate) fn undelivered(
    topic: String,
    lsn: String,
    e: &rdkafka::error::KafkaError,
    size: usize,
) -> CaptureError {
    let permanent = refused_for_good(e);
    let reason = if permanent {
        format!(
            "{e}; the record is {size} bytes and the broker will never take it: capture stops \
             here and skips nothing (for large rows, raise the broker's max.message.bytes and \
             origin.kafka.properties message.max.bytes, then restart)"
        )
    } else {
        e.to_string()
    };
    CaptureError::Delivery {
        topic,
        lsn,
        reason,
        permanent,
    }
}

/// Whether the broker will refuse a record however often it is sent.
pub fn refused_for_good(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::InvalidMessage
                | C::TopicAuthorizationFailed
                | C::InvalidTopic
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError;

    #[test]
    fn replication_errors_are_classified_by_their_sqlstate() {
        let server = |t: &str| PgWireError::Server(t.into());
        let bad_text = server("invalid byte sequence for encoding \"UTF8\": 0xff (SQLSTATE 22021)");
        assert_eq!(replication_sqlstate(&bad_text), Some("22021"));
        let busy = server("replication slot \"s\" is active for PID 7 (SQLSTATE 55006)");
        assert_eq!(replication_sqlstate(&busy), Some("55006"));
        assert_eq!(replication_sqlstate(&server("no code here")), None);
        assert_eq!(replication_sqlstate(&server("(SQLSTATE 2202)")), None);
        assert_eq!(
            replication_sqlstate(&PgWireError::Protocol("(SQLSTATE 22021)".into())),
            None
        );
        let err = |source| CaptureError::Replication {
            slot: "s".into(),
            source,
        };
        assert!(!err(bad_text).is_retryable());
        assert!(err(busy).is_retryable());
        assert!(err(PgWireError::Internal("stream ended".into())).is_retryable());
    }
}
