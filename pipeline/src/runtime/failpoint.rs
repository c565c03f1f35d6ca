//! Failpoints for the crash tests: `FERRY_FAILPOINT=<name>[:<n>]` makes the process abort the
//! n-th time (default 1st) execution passes the named point, the way `kill -9` would stop it
//! there. Without the variable every point is a no-op.

use std::collections::HashMap;
use std::sync::Mutex;

/// The shipper compacted a batch and has produced nothing of it yet.
pub const SHIP_AFTER_COMPACTION: &str = "ship.after_compaction";
/// The shipper handed a batch to the producer; the broker has not acknowledged it.
pub const SHIP_MID_PRODUCE: &str = "ship.mid_produce";
/// The broker acknowledged a batch; its origin offset is not committed yet.
pub const SHIP_AFTER_PRODUCE: &str = "ship.after_produce";
/// A replay shipped a range; its checkpoint is not saved yet.
pub const REPLAY_BEFORE_CHECKPOINT: &str = "replay.before_checkpoint";
/// The broker acknowledged a batch's replicated records; neither the destination database
/// nor the batch-topic offset has it yet.
pub const APPLY_AFTER_REPLICATE: &str = "apply.after_replicate";

/// Every failpoint.
pub const ALL: [&str; 5] = [
    SHIP_AFTER_COMPACTION,
    SHIP_MID_PRODUCE,
    SHIP_AFTER_PRODUCE,
    REPLAY_BEFORE_CHECKPOINT,
    APPLY_AFTER_REPLICATE,
];

/// A failpoint for the crash tests: `FERRY_FAILPOINT=<name>[:<n>]` aborts the process the
/// n-th time (default 1st) execution passes `name`.
pub fn hit(name: &str) {
    static HITS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
    let Ok(spec) = std::env::var("FERRY_FAILPOINT") else {
        return;
    };
    let (want, n) = match spec.split_once(':') {
        Some((w, n)) => (w.to_string(), n.parse().unwrap_or(1)),
        None => (spec.clone(), 1),
    };
    if want != name {
        return;
    }
    if let Ok(mut hits) = HITS.lock() {
        let count = hits
            .get_or_insert_with(HashMap::new)
            .entry(want)
            .or_insert(0);
        *count += 1;
        if *count >= n {
            eprintln!("failpoint {name} hit: aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_distinct_and_scoped_by_stage() {
        let mut names = super::ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), super::ALL.len());
        assert!(names.iter().all(|n| ["ship.", "replay.", "apply."]
            .iter()
            .any(|stage| n.starts_with(stage))));
    }
}
