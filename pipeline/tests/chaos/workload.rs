//! The workload: small transactions that bump per-key monotonic versions in the origin, each
//! recorded once its COMMIT returned.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_connectors::postgres::{PgConfig, Session};
use tokio::sync::watch;

use crate::support::current_lsn;

pub const TABLE: &str = "chaos_item";

/// The origin table; the destination gets the same shape plus Ferry's columns, created up
/// front so that an audit trigger sees every application.
pub const ORIGIN_DDL: &str =
    "CREATE TABLE chaos_item (id bigint PRIMARY KEY, version bigint NOT NULL,
    payload text NOT NULL, ts timestamptz NOT NULL DEFAULT clock_timestamp())";

pub const DEST_DDL: &str = "CREATE TABLE public.chaos_item (id bigint, version bigint, payload text,
    ts timestamptz, _ferry_lsn bigint NOT NULL, _ferry_seq bigint NOT NULL, _ferry_batch text NOT NULL,
    _ferry_partition int NOT NULL, _ferry_offset bigint NOT NULL, PRIMARY KEY (id));
  CREATE TABLE chaos_audit (seq bigserial PRIMARY KEY, id bigint NOT NULL, version bigint NOT NULL,
    lsn bigint NOT NULL, lsn_seq bigint NOT NULL);
  CREATE FUNCTION chaos_audit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN INSERT INTO chaos_audit (id, version, lsn, lsn_seq)
      VALUES (NEW.id, NEW.version, NEW._ferry_lsn, NEW._ferry_seq); RETURN NEW; END $$;
  CREATE TRIGGER chaos_audit AFTER INSERT OR UPDATE ON public.chaos_item
    FOR EACH ROW EXECUTE FUNCTION chaos_audit();";

/// One committed version of a key.
#[derive(Clone, Copy)]
pub struct Version {
    pub version: i64,
    /// When its COMMIT returned.
    pub at: Instant,
    /// The server's WAL position right after that: at or past the commit record.
    pub lsn_after: i64,
}

/// What the origin committed: per key, its versions in commit order.
#[derive(Clone, Default)]
pub struct History {
    pub keys: BTreeMap<i64, Vec<Version>>,
    pub txns: u64,
}

impl History {
    pub fn versions(&self) -> u64 {
        self.keys.values().map(|v| v.len() as u64).sum()
    }

    /// Each key's last committed version.
    pub fn last(&self) -> BTreeMap<i64, i64> {
        self.keys
            .iter()
            .filter_map(|(k, v)| v.last().map(|ver| (*k, ver.version)))
            .collect()
    }

    /// How long the oldest committed version the destination lacks has waited.
    pub fn lag(&self, applied: &BTreeMap<i64, i64>, now: Instant) -> Duration {
        let mut lag = Duration::ZERO;
        for (k, versions) in &self.keys {
            let have = applied.get(k).copied().unwrap_or(0);
            if let Some(v) = versions.iter().find(|v| v.version > have) {
                lag = lag.max(now.saturating_duration_since(v.at));
            }
        }
        lag
    }
}

pub type Shared = Arc<Mutex<History>>;

/// Inserts keys 1..=rows at version 1 in one transaction (rows the initial snapshot reads).
pub async fn seed(s: &Session, history: &Shared, rows: i64) {
    s.batch_execute(&format!(
        "INSERT INTO chaos_item (id, version, payload) SELECT g, 1, repeat('s', 40) FROM generate_series(1, {rows}) g"
    ))
    .await
    .expect("seed rows");
    let lsn_after = current_lsn(s).await;
    let at = Instant::now();
    let mut h = history.lock().expect("history");
    for k in 1..=rows {
        h.keys.entry(k).or_default().push(Version {
            version: 1,
            at,
            lsn_after,
        });
    }
    h.txns += 1;
}

pub struct Workload {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Shape {
    /// Keys drawn from 1..=keys.
    pub keys: i64,
    /// Transactions per second.
    pub tps: u32,
    /// Bytes of payload per row version.
    pub payload: usize,
}

impl Workload {
    pub fn start(pg: PgConfig, history: Shared, shape: Shape) -> Workload {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let s = pg.connect().await.expect("workload connects");
            let st = s
                .prepare(
                    "INSERT INTO chaos_item (id, version, payload) VALUES ($1, 1, $2)
                     ON CONFLICT (id) DO UPDATE SET version = chaos_item.version + 1,
                       payload = EXCLUDED.payload, ts = clock_timestamp()
                     RETURNING version",
                )
                .await
                .expect("prepare");
            let period = Duration::from_secs_f64(1.0 / f64::from(shape.tps.max(1)));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = rx.changed() => break,
                    _ = tick.tick() => {}
                }
                let n = rand::random_range(1..=3);
                let mut keys: Vec<i64> =
                    (0..n).map(|_| rand::random_range(1..=shape.keys)).collect();
                // One lock order, so that no two transactions deadlock.
                keys.sort_unstable();
                keys.dedup();
                let payload: String = (0..shape.payload)
                    .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
                    .collect();
                s.batch_execute("BEGIN").await.expect("begin");
                let mut done = Vec::with_capacity(keys.len());
                for k in keys {
                    let row = s.query_one(&st, &[&k, &payload]).await.expect("upsert");
                    done.push((k, row.get::<_, i64>(0)));
                }
                s.batch_execute("COMMIT").await.expect("commit");
                let at = Instant::now();
                let lsn_after = current_lsn(&s).await;
                let mut h = history.lock().expect("history");
                for (k, version) in done {
                    h.keys.entry(k).or_default().push(Version {
                        version,
                        at,
                        lsn_after,
                    });
                }
                h.txns += 1;
            }
        });
        Workload { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.expect("workload task");
    }
}
