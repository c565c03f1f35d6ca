//! `ferry check`: verifies every prerequisite and says exactly what to fix.

use std::time::Duration;

use ferry_connectors::kafka::Cluster;
use ferry_connectors::postgres::catalog;

use crate::config::Config;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, and for a failure what to do.
    pub detail: String,
}

fn finding(name: &str, ok: bool, detail: impl Into<String>) -> Finding {
    Finding {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

/// Runs every check. Never fails itself: an unreachable system is a failed finding.
pub async fn run(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, kafka) in [
        ("origin broker", &cfg.origin.kafka),
        ("destination broker", &cfg.destination.kafka),
    ] {
        let cluster = Cluster::new(name, kafka.clone());
        let probe =
            tokio::task::spawn_blocking(move || cluster.probe(Duration::from_secs(5))).await;
        out.push(match probe {
            Ok(Ok(brokers)) => finding(name, true, format!("reachable: {}", brokers.join(", "))),
            Ok(Err(e)) => finding(
                name,
                false,
                format!("{e}. Is it running? `ops/stack up` starts the local brokers"),
            ),
            Err(e) => finding(name, false, e.to_string()),
        });
    }

    out.extend(topic_findings(cfg).await);

    // capture.format = "confluent": both schema registries must answer.
    for (name, registry) in [
        ("origin schema registry", cfg.origin_registry()),
        ("destination schema registry", cfg.destination_registry()),
    ] {
        out.push(match registry {
            Ok(None) => continue,
            Ok(Some(r)) => match r.subjects().await {
                Ok(subjects) => finding(
                    name,
                    true,
                    format!("reachable: {} ({} subjects)", r.url(), subjects.len()),
                ),
                Err(e) => finding(
                    name,
                    false,
                    format!("{e}. Is it running? `ops/stack up` starts the local registries"),
                ),
            },
            Err(e) => finding(name, false, e.to_string()),
        });
    }

    let pgc = &cfg.origin.postgres;
    let target = pgc.display();
    let session = match pgc.connect().await {
        Ok(s) => {
            out.push(finding("postgres", true, format!("reachable: {target}")));
            s
        }
        Err(e) => {
            out.push(finding(
                "postgres",
                false,
                format!("{target}: {e}. Is it running and does the database exist? `ops/stack up` prepares it"),
            ));
            return out;
        }
    };
    let facts = match catalog::server_facts(&session).await {
        Ok(f) => f,
        Err(e) => {
            out.push(finding("postgres settings", false, e.to_string()));
            return out;
        }
    };
    out.push(if facts.wal_level == "logical" {
        finding("wal_level", true, "logical")
    } else {
        finding(
            "wal_level",
            false,
            format!(
                "is {}; capture needs logical. Fix: ALTER SYSTEM SET wal_level = logical; then restart Postgres",
                facts.wal_level
            ),
        )
    });
    if facts.server_encoding == "SQL_ASCII" {
        // Not a failure: most such databases hold only ASCII or UTF-8.
        out.push(finding(
            "encoding",
            true,
            "WARNING: the database is SQL_ASCII: Postgres does not check its text, and text that \
             is not UTF-8 cannot be sent to capture. In a snapshot that table stops alone; in the \
             replication stream capture stops at that change for every table (see the README's \
             troubleshooting). Moving the database to UTF8 (dump, fix, restore) removes the \
             risk",
        ));
    }
    if cfg.capture.ddl_trigger {
        out.push(match catalog::has_ddl_trigger(&session).await {
            Ok(true) => finding(
                "DDL trigger",
                true,
                "ferry_columns is installed: renamed columns are followed exactly",
            ),
            // Not a failure: capture installs it when it can, and works without it.
            Ok(false) => finding(
                "DDL trigger",
                true,
                "ferry_columns is not installed yet (capture installs it when its role is a superuser); \
                 without it a renamed column is followed only while capture keeps up with the DDL",
            ),
            Err(e) => finding("DDL trigger", false, e.to_string()),
        });
    }
    out.push(if facts.can_replicate {
        finding(
            "replication privilege",
            true,
            format!("user {} may replicate", pgc.user),
        )
    } else {
        finding(
            "replication privilege",
            false,
            format!(
                "user {0} may not replicate. Fix: ALTER ROLE {0} WITH REPLICATION",
                pgc.user
            ),
        )
    });
    if facts.superuser {
        // Not a failure (a development stack runs so), but more than capture needs.
        out.push(finding(
            "least privilege",
            true,
            format!(
                "WARNING: user {0} is a superuser, more than capture needs: REPLICATION, SELECT on \
                 the captured tables and ownership of the publication (a superuser only once, to \
                 create a publication FOR ALL TABLES or the DDL trigger). Consider: CREATE ROLE \
                 ferry_capture LOGIN REPLICATION; GRANT SELECT ON <tables> TO ferry_capture",
                pgc.user
            ),
        ));
    }
    let c = &cfg.capture;
    let slot = catalog::slot(&session, &c.slot).await;
    let free = facts.max_replication_slots - facts.slots_used;
    match slot {
        Ok(Some(s)) => {
            let mut problems = Vec::new();
            if s.plugin.as_deref() != Some("pgoutput") {
                problems.push(format!("uses plugin {:?}, not pgoutput", s.plugin));
            }
            if s.database.as_deref() != Some(pgc.database.as_str()) {
                problems.push(format!("belongs to database {:?}", s.database));
            }
            if s.wal_status.as_deref() == Some("lost") {
                problems.push("was invalidated (wal_status lost); drop it".into());
            }
            if let Some(risk) = s.at_risk() {
                problems.push(risk);
            }
            let detail = format!(
                "slot {} exists (active: {}, confirmed flush {}, wal_status {}, retains {} bytes)",
                c.slot,
                s.active,
                s.confirmed_flush_lsn.unwrap_or_else(|| "-".into()),
                s.wal_status.unwrap_or_else(|| "-".into()),
                s.retained_bytes.unwrap_or(0)
            );
            out.push(if problems.is_empty() {
                finding("replication slot", true, detail)
            } else {
                finding("replication slot", false, format!("{detail}: {}", problems.join("; ")))
            });
        }
        Ok(None) if free > 0 => out.push(finding(
            "replication slot",
            true,
            format!(
                "slot {} will be created ({free} of {} slots free)",
                c.slot, facts.max_replication_slots
            ),
        )),
        Ok(None) => out.push(finding(
            "replication slot",
            false,
            format!(
                "slot {} does not exist and all {} slots are used. Fix: raise max_replication_slots or drop an unused slot",
                c.slot, facts.max_replication_slots
            ),
        )),
        Err(e) => out.push(finding("replication slot", false, e.to_string())),
    }
    out.push(finding(
        "wal senders",
        facts.max_wal_senders > 0,
        format!("max_wal_senders = {}", facts.max_wal_senders),
    ));
    let published = match catalog::publication_exists(&session, &c.publication).await {
        Ok(true) => {
            let tables = catalog::publication_tables(&session, &c.publication)
                .await
                .unwrap_or_default();
            let missing: Vec<String> = cfg
                .tables()
                .into_iter()
                .filter(|t| !tables.contains(t))
                .map(|t| t.to_string())
                .collect();
            out.push(finding(
                "publication",
                true,
                if missing.is_empty() {
                    format!("{} covers {} tables", c.publication, tables.len())
                } else {
                    format!(
                        "{} covers {} tables; capture will add {}",
                        c.publication,
                        tables.len(),
                        missing.join(", ")
                    )
                },
            ));
            tables
        }
        Ok(false) if cfg.tables().is_empty() && !c.all_tables => {
            out.push(finding(
                "publication",
                false,
                format!(
                    "{} does not exist and capture.tables is empty: name the tables, create the \
                     publication, or set capture.all_tables = true",
                    c.publication
                ),
            ));
            Vec::new()
        }
        Ok(false) => {
            out.push(finding(
                "publication",
                true,
                format!("{} will be created by capture", c.publication),
            ));
            if cfg.tables().is_empty() {
                catalog::user_tables(&session).await.unwrap_or_default()
            } else {
                Vec::new()
            }
        }
        Err(e) => {
            out.push(finding("publication", false, e.to_string()));
            Vec::new()
        }
    };
    // Per table: what UPDATE and DELETE will do (a table without a replica identity in a
    // publication makes Postgres refuse them: an outage of the application), and the SELECT
    // grant snapshots and backfills need.
    let mut tables = published;
    for t in cfg.tables() {
        if !tables.contains(&t) {
            tables.push(t);
        }
    }
    for t in &tables {
        let name = format!("table {t}");
        out.push(match catalog::table_facts(&session, t).await {
            Ok(Some(f)) => {
                let (ok, what) = f.updates();
                if f.can_select {
                    finding(&name, ok, what)
                } else {
                    finding(
                        &name,
                        false,
                        format!(
                            "{what}; {} may not SELECT it (GRANT SELECT ON {t} TO {})",
                            pgc.user, pgc.user
                        ),
                    )
                }
            }
            Ok(None) => finding(&name, false, "does not exist"),
            Err(e) => finding(&name, false, e.to_string()),
        });
    }
    out
}

/// How long a `retention.ms` is, for people.
fn retention_text(ms: &str) -> String {
    match ms.parse::<i64>() {
        Ok(-1) => "kept for ever".into(),
        Ok(ms) if ms % 86_400_000 == 0 => format!("{} d", ms / 86_400_000),
        Ok(ms) if ms % 3_600_000 == 0 => format!("{} h", ms / 3_600_000),
        Ok(ms) => format!("{ms} ms"),
        Err(_) => ms.to_string(),
    }
}

/// The settings of the change topics that exist (origin table topics; the batch topic and the
/// replicated topics in the destination): a change topic deleting sooner than
/// `topics.retention_ms`, or compacted, is a warning.
async fn topic_findings(cfg: &Config) -> Vec<Finding> {
    let prefix = cfg.capture.topic_prefix.clone();
    let batch_topic = cfg.batch_topic();
    let mut out = Vec::new();
    for (name, kafka) in [
        ("origin topics", &cfg.origin.kafka),
        ("destination topics", &cfg.destination.kafka),
    ] {
        let cluster = Cluster::new(name, kafka.clone());
        let (p, b, c) = (prefix.clone(), batch_topic.clone(), cluster.clone());
        let Ok(Ok(topics)) = tokio::task::spawn_blocking(move || {
            c.topic_names(
                |t| crate::topics::is_table_topic(&p, t) || t == b,
                Duration::from_secs(5),
            )
        })
        .await
        else {
            continue;
        };
        if topics.is_empty() {
            continue;
        }
        let settings = match cluster
            .topic_settings(&topics, &["cleanup.policy", "retention.ms"])
            .await
        {
            Ok(s) => s,
            Err(e) => {
                out.push(finding(
                    name,
                    false,
                    format!("cannot read topic settings: {e}"),
                ));
                continue;
            }
        };
        let mut groups: std::collections::BTreeMap<(String, String), Vec<String>> =
            Default::default();
        for (topic, s) in &settings {
            let get = |k: &str| s.get(k).cloned().unwrap_or_else(|| "?".into());
            groups
                .entry((get("cleanup.policy"), get("retention.ms")))
                .or_default()
                .push(topic.clone());
        }
        let mut warnings = Vec::new();
        let lines: Vec<String> = groups
            .iter()
            .map(|((policy, retention), topics)| {
                let short = retention
                    .parse::<i64>()
                    .is_ok_and(|r| r != -1 && (cfg.topics.retention_ms == -1 || r < cfg.topics.retention_ms));
                if short || policy.contains("compact") {
                    warnings.push(format!(
                        "{} ({policy}, {}): {}",
                        topics.join(", "),
                        retention_text(retention),
                        if policy.contains("compact") {
                            "compaction drops versions of a row before they are shipped"
                        } else {
                            "deletes sooner than topics.retention_ms: a longer outage loses changes (the shipper stops on them)"
                        }
                    ));
                }
                format!(
                    "{} topic{}: {policy}, {}",
                    topics.len(),
                    if topics.len() == 1 { "" } else { "s" },
                    retention_text(retention)
                )
            })
            .collect();
        let mut detail = lines.join("; ");
        if !warnings.is_empty() {
            detail = format!("{detail}. WARNING: {}", warnings.join("; "));
        }
        out.push(finding(name, true, detail));
    }
    out
}
