//! `ferry status`: where everything stands, from what the systems themselves store — the slot,
//! the origin topics and the shipper's committed offsets, and the manifests of every batch in
//! the destination (which carry the egress figures).

use std::collections::BTreeMap;

use ferry_connectors::kafka::Cluster;
use ferry_connectors::postgres::catalog;
use ferry_schemas::manifest;

use crate::batch::egress::Egress;
use crate::config::Config;
use crate::inspect::{self, InspectError};

/// Formats bytes for people.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// Egress figures keyed by (`source->destination` region pair, table).
pub type EgressTable = BTreeMap<(String, String), Egress>;

/// Egress per (region pair, table) from the manifests in the destination batch topic, and how
/// many records there could not be read.
pub fn egress(cfg: &Config) -> Result<(EgressTable, usize), InspectError> {
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let mut out = EgressTable::new();
    let mut unreadable = 0;
    // One record at a time: the batch topic holds everything shipped within its retention.
    let scanned = inspect::scan(&dest, &cfg.batch_topic(), None, |(_, _, key, value)| {
        let Some(value) = value else { return true };
        match manifest::unframe(&value) {
            Ok((m, _)) => {
                let pair = format!("{}->{}", m.source_region, m.destination_region);
                let shipped = (value.len() + key.map_or(0, |k| k.len())) as u64;
                out.entry((pair, m.table.clone()))
                    .or_default()
                    .add(&m, shipped);
            }
            Err(_) => unreadable += 1,
        }
        true
    });
    match scanned {
        Ok(()) => Ok((out, unreadable)),
        Err(InspectError::MissingTopic(_)) => Ok((EgressTable::new(), 0)),
        Err(e) => Err(e),
    }
}

/// Prints the status report.
pub async fn print(cfg: &Config) -> Result<(), InspectError> {
    println!("capture");
    let pgc = &cfg.origin.postgres;
    match pgc.connect().await {
        Ok(s) => match catalog::slot(&s, &cfg.capture.slot).await {
            Ok(Some(slot)) => {
                println!(
                    "  slot {:<20} active {:<5} confirmed {:<14} retains {} (wal_status {})",
                    cfg.capture.slot,
                    slot.active,
                    slot.confirmed_flush_lsn.as_deref().unwrap_or_default(),
                    human_bytes(slot.retained_bytes.unwrap_or(0).max(0) as u64),
                    slot.wal_status.as_deref().unwrap_or("-")
                );
                if let Some(risk) = slot.at_risk() {
                    println!("  WARNING: {risk}");
                }
            }
            Ok(None) => println!("  slot {} does not exist yet", cfg.capture.slot),
            Err(e) => println!("  slot: {e}"),
        },
        Err(e) => println!("  postgres {}: {e}", pgc.display()),
    }
    match crate::capture::stopped_tables(cfg).await {
        Ok(stopped) if stopped.is_empty() => println!("  no table stopped"),
        Ok(stopped) => {
            for (table, st) in stopped {
                println!(
                    "  STOPPED {table}: changes held since LSN {}: {}",
                    ferry_schemas::Lsn(st.since.0),
                    st.reason
                );
                println!("       fix the cause, then: ferry resume-table {table}");
            }
        }
        Err(e) => println!("  capture state: {e}"),
    }

    println!("ship (group {})", cfg.ship.group_id);
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let lag = crate::ship::lag(&origin, &cfg.capture.topic_prefix, &cfg.ship.group_id).await?;
    for l in &lag {
        println!(
            "  {:<48} shipped to offset {:>10} of {:>10}  lag {:>8}",
            l.topic,
            l.committed,
            l.end,
            l.lag()
        );
        match crate::ship::topic_gaps(cfg, &l.topic, None, false).await {
            Ok(gaps) => {
                for g in gaps {
                    match g.kind {
                        crate::ship::GapKind::Retention => println!(
                            "  GAP [{}] offsets {}-{}: deleted by retention before they were shipped (the partition is stopped; see `ferry accept-gap`)",
                            g.partition, g.first, g.last
                        ),
                        crate::ship::GapKind::Recreated => println!(
                            "  GAP [{}] the topic was deleted and created again since it was shipped from ({}); the partition is stopped (see `ferry accept-gap`)",
                            g.partition, g.detail
                        ),
                    }
                }
            }
            Err(e) => println!("  gaps of {}: {e}", l.topic),
        }
    }

    let cfg2 = cfg.clone();
    let (egress, unreadable) = tokio::task::spawn_blocking(move || egress(&cfg2))
        .await
        .map_err(|e| InspectError::Other(format!("reading the batch topic: {e}")))??;
    match crate::apply::batch_gaps(cfg, false).await {
        Ok(gaps) => {
            for (p, first, last) in gaps {
                println!(
                    "  GAP {}[{p}] offsets {first}-{last}: batches deleted by retention before they were applied (apply stops there; see `ferry accept-gap --batches`)",
                    cfg.batch_topic()
                );
            }
        }
        Err(e) => println!("  batch gaps: {e}"),
    }
    if let Some(pg) = &cfg.destination.postgres {
        println!("apply (destination database {})", pg.display());
        match crate::apply::held_tables(pg).await {
            Ok(held) if held.is_empty() => println!("  no table held"),
            Ok(held) => {
                for (table, batches, reason, since) in held {
                    println!("  HELD {table}: {batches} batches since {since}: {reason}");
                    println!("       fix the cause, then: ferry resume-table {table}");
                }
            }
            Err(e) => println!("  {e}"),
        }
    }
    println!("egress (from batch manifests in {})", cfg.batch_topic());
    println!(
        "  {:<22} {:<28} {:>8} {:>10} {:>10} {:>11} {:>11} {:>7} {:>10}",
        "regions", "table", "batches", "changes", "rows out", "raw", "shipped", "ratio", "cost $"
    );
    let mut total = Egress::default();
    for ((pair, table), e) in &egress {
        let price = cfg.ship.prices_per_gb.get(pair).copied();
        let cost = price.map(|p| p * e.shipped_bytes as f64 / 1e9);
        println!(
            "  {:<22} {:<28} {:>8} {:>10} {:>10} {:>11} {:>11} {:>6.1}x {:>10}",
            pair,
            table,
            e.batches,
            e.events_in,
            e.events_out,
            human_bytes(e.raw_bytes),
            human_bytes(e.shipped_bytes),
            e.raw_bytes as f64 / e.shipped_bytes.max(1) as f64,
            cost.map_or_else(|| "-".into(), |c| format!("{c:.6}"))
        );
        total.batches += e.batches;
        total.raw_bytes += e.raw_bytes;
        total.shipped_bytes += e.shipped_bytes;
    }
    println!(
        "  total: {} batches, {} consumed, {} shipped, {} saved{}",
        total.batches,
        human_bytes(total.raw_bytes),
        human_bytes(total.shipped_bytes),
        human_bytes(total.raw_bytes.saturating_sub(total.shipped_bytes)),
        if unreadable > 0 {
            format!("; {unreadable} unreadable records in the batch topic")
        } else {
            String::new()
        }
    );
    Ok(())
}
