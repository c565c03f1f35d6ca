//! Failpoints for the crash tests: `FERRY_FAILPOINT=<name>[:<n>]` makes the process abort the
//! n-th time (default 1st) execution passes the named point, the way `kill -9` would stop it
//! there. Without the variable every point is a no-op.

use std::collections::HashMap;
use std::sync::Mutex;

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
