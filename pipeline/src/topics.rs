//! Every Kafka topic Ferry reads or writes, named in one place.
//!
//! All names hang off `capture.topic_prefix` (`<prefix>` below), so two pipelines with
//! different prefixes never share a topic:
//!
//! | topic | cluster | what it holds |
//! |---|---|---|
//! | `<prefix>.<schema>.<table>` | origin, and destination (replicated) | one table's change events, keyed by primary key |
//! | `<prefix>._schemas` | both | every writer schema, keyed by fingerprint (compacted) |
//! | `<prefix>._state` | origin | capture and job state, keyed by slot or job (compacted) |
//! | `<prefix>._control` | origin | operator pause/resume/cancel, keyed by target (compacted) |
//! | `<prefix>.batches` | destination | shipped batches (`ship.batch_topic` overrides) |
//! | `<prefix>.quarantine` | destination | batches that failed verification (`apply.quarantine_topic` overrides) |
//! | `<prefix>.agg.<name>` | destination | a SQL transform's results |
//!
//! Table topics are the only names in the origin with exactly two dot-separated parts after the
//! prefix ([`is_table_topic`]; the internal topics have one); the shipper subscribes to them by
//! [`table_topic_regex`]. In the destination, a transform's `<prefix>.agg.<name>` has the shape
//! of the replicated topic of a table `agg.<name>`: do not name a transform after such a table.

use ferry_schemas::TableId;

/// Topic settings, as `(name, value)` pairs for topic creation.
pub type Settings = Vec<(String, String)>;

fn settings(pairs: &[(&str, &str)]) -> Settings {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The settings of a change topic (table, batch, replicated, aggregate): deleted after
/// `retention_ms` (`topics.retention_ms`), never by size.
pub fn change_settings(retention_ms: i64) -> Settings {
    settings(&[
        ("cleanup.policy", "delete"),
        ("retention.ms", &retention_ms.to_string()),
        ("retention.bytes", "-1"),
    ])
}

/// The settings of a topic keyed by name whose newest record per key is what counts (schema,
/// state, control): compacted, never deleted by age.
pub fn compacted_settings() -> Settings {
    settings(&[("cleanup.policy", "compact")])
}

/// The settings of a topic whose records wait for an operator (held, quarantine): kept for
/// ever.
pub fn kept_settings() -> Settings {
    settings(&[
        ("cleanup.policy", "delete"),
        ("retention.ms", "-1"),
        ("retention.bytes", "-1"),
    ])
}

/// The Kafka topic of a table: `<prefix>.<schema>.<table>`. A schema or table name made of
/// `[A-Za-z0-9_-]` without `--` is kept; any other (dots, spaces, quotes, non-ASCII, `--`) is
/// escaped: the characters Kafka does not allow become `_`, then `--` and the CRC-64 of the
/// name in hex (`app v2` is `app_v2--<crc64>`), so two tables never share a topic. The longest
/// names Postgres allows (63 bytes) stay well within Kafka's 249 characters.
pub fn table_topic(prefix: &str, table: &TableId) -> String {
    let clean = |s: &str| -> String {
        if !s.is_empty() && s.chars().all(allowed) && !s.contains("--") {
            s.to_string()
        } else {
            ferry_schemas::avro::escaped(
                s,
                |c| c.is_ascii_alphanumeric() || c == '_',
                '_',
                "--",
                false,
            )
        }
    };
    format!("{prefix}.{}.{}", clean(&table.schema), clean(&table.table))
}

/// Whether `topic` is a table topic of `prefix` (see [`table_topic`]).
pub fn is_table_topic(prefix: &str, topic: &str) -> bool {
    topic
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| {
            let mut parts = rest.split('.');
            let (s, t) = (parts.next(), parts.next());
            parts.next().is_none()
                && [s, t]
                    .iter()
                    .all(|p| p.is_some_and(|p| !p.is_empty() && p.chars().all(allowed)))
        })
}

/// The characters a table topic keeps from a schema or table name; others become `_`.
fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A regular expression (librdkafka subscription syntax) matching exactly the table topics of
/// `prefix`.
pub fn table_topic_regex(prefix: &str) -> String {
    let escaped: String = prefix
        .chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect();
    format!("^{escaped}\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$")
}

/// The compacted topic holding every writer schema, keyed by fingerprint.
pub fn schema_topic(prefix: &str) -> String {
    format!("{prefix}._schemas")
}

/// The compacted topic holding capture and job state, keyed by slot or job.
pub fn state_topic(prefix: &str) -> String {
    format!("{prefix}._state")
}

/// The compacted topic holding operator control requests.
pub fn control_topic(prefix: &str) -> String {
    format!("{prefix}._control")
}

/// The destination topic batches are shipped to (`configured` when not empty).
pub fn batch_topic(prefix: &str, configured: &str) -> String {
    if configured.is_empty() {
        format!("{prefix}.batches")
    } else {
        configured.to_string()
    }
}

/// The destination topic holding the batches of tables apply could not write (`<prefix>._held`,
/// keyed by table), until an operator resumes them (`ferry resume-table`).
pub fn held_topic(prefix: &str) -> String {
    format!("{prefix}._held")
}

/// The origin topic holding the changes of tables capture stopped (`<prefix>._held_changes`,
/// keyed by table, one partition so they keep WAL order), as the stream sent them, until an
/// operator resumes the table (`ferry resume-table`).
pub fn capture_held_topic(prefix: &str) -> String {
    format!("{prefix}._held_changes")
}

/// The destination dead-letter topic for corrupt batches (`configured` when not empty).
pub fn quarantine_topic(prefix: &str, configured: &str) -> String {
    if configured.is_empty() {
        format!("{prefix}.quarantine")
    } else {
        configured.to_string()
    }
}

/// The destination topic of a SQL transform's results.
pub fn aggregate_topic(prefix: &str, transform: &str) -> String {
    format!("{prefix}.agg.{transform}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_topics_are_recognised_by_rule_and_by_regex() {
        let re = regex_lite(&table_topic_regex("it.x-1"));
        let odd = TableId::new("My Schema", "tab.le$");
        let cases = [
            (table_topic("it.x-1", &TableId::new("public", "t")), true),
            (table_topic("it.x-1", &odd), true),
            (schema_topic("it.x-1"), false),
            (state_topic("it.x-1"), false),
            (control_topic("it.x-1"), false),
            (batch_topic("it.x-1", ""), false),
            ("it.x-1._private.t".to_string(), true),
            ("it.x-1.a.b.c".to_string(), false),
            ("it.x-1..b".to_string(), false),
            ("it.x-2.public.t".to_string(), false),
            ("itXx-1.public.t".to_string(), false),
        ];
        for (topic, table) in cases {
            assert_eq!(is_table_topic("it.x-1", &topic), table, "{topic}");
            assert_eq!(re(&topic), table, "regex on {topic}");
        }
        let topic = table_topic("p", &odd);
        assert!(
            topic.starts_with("p.My_Schema--") && topic.contains(".tab_le--"),
            "{topic}"
        );
    }

    #[test]
    fn no_two_tables_share_a_topic() {
        let names = [
            "app-v2", "app_v2", "app v2", "app.v2", "App_V2", "a--b", "a-b", "a_b", "ünï", "\"q\"",
            "x", "select", "a.b",
        ];
        let mut seen = std::collections::HashMap::new();
        for schema in ["public", "a", "a.b", "a b"] {
            for table in names {
                let topic = table_topic("p", &TableId::new(schema, table));
                assert!(is_table_topic("p", &topic), "{topic}");
                assert!(topic.len() <= 249);
                if let Some(other) = seen.insert(topic.clone(), (schema, table)) {
                    panic!("{schema}.{table} and {other:?} share {topic}");
                }
            }
        }
        assert_eq!(
            table_topic("p", &TableId::new("public", "orders")),
            "p.public.orders"
        );
        assert_eq!(
            table_topic("p", &TableId::new("public", "app-v2")),
            "p.public.app-v2"
        );
        let long = "x".repeat(63);
        assert!(table_topic(&"p".repeat(60), &TableId::new(&long, &long)).len() <= 249);
    }

    #[test]
    fn configured_names_win() {
        assert_eq!(batch_topic("p", "b"), "b");
        assert_eq!(quarantine_topic("p", ""), "p.quarantine");
        assert_eq!(quarantine_topic("p", "q"), "q");
    }

    /// A tiny matcher for the one regex shape [`table_topic_regex`] makes:
    /// `^<escaped prefix>\.<class>+\.<class>+$`.
    fn regex_lite(re: &str) -> impl Fn(&str) -> bool {
        let body = re
            .strip_prefix('^')
            .and_then(|r| r.strip_suffix("\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$"))
            .expect("table topic regex shape");
        let mut prefix = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            prefix.push(if c == '\\' {
                chars.next().expect("escaped")
            } else {
                c
            });
        }
        move |topic: &str| {
            topic
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_prefix('.'))
                .is_some_and(|r| {
                    let parts: Vec<_> = r.split('.').collect();
                    parts.len() == 2
                        && parts
                            .iter()
                            .all(|p| !p.is_empty() && p.chars().all(allowed))
                })
        }
    }
}
