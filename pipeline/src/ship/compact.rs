//! Compaction of a micro-batch to its net effect per primary key, with DataFusion.
//!
//! Within a run of changes of one table version (a truncate is a barrier that is never
//! reordered, and a schema change starts a new run), DataFusion groups the changes by key and
//! finds each key's first and last change; the net change then follows from their ops:
//!
//! | first → last | result |
//! | --- | --- |
//! | insert → … → insert/update | one insert of the final image |
//! | update → … → update | one update: final image, first before-image |
//! | insert → … → delete | nothing |
//! | update/read → … → delete | delete |
//! | read → … → update | read (snapshot row) of the final image |
//! | delete → … → insert/update | insert of the final image |
//!
//! Each surviving change keeps the last source position of its key, and output keeps the order
//! of those last positions, so per-key order is preserved.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{BinaryArray, Int64Array, RecordBatch, UInt8Array};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::SessionContext;
use ferry_schemas::{ChangeEvent, Datum, Op};

use crate::batch::{Entry, Run};

/// Compaction failed (DataFusion refused the plan: a bug, reported as such).
#[derive(Debug, thiserror::Error)]
#[error("compaction: {0}")]
pub struct CompactError(String);

/// Fills unchanged-TOAST values from an earlier change of the same key in the batch. The value
/// is real (the batch carried it), and the shipped row no longer depends on the destination's
/// copy.
fn fill_toast(entries: &mut [Entry]) {
    if !entries.iter().any(|e| {
        e.event
            .after
            .as_ref()
            .is_some_and(|a| a.iter().any(|d| matches!(d, Datum::UnchangedToast)))
    }) {
        return;
    }
    let mut known: HashMap<(Vec<u8>, [u8; 8]), Vec<Datum>> = HashMap::new();
    for e in entries.iter_mut() {
        let Some(key) = e.key.clone() else { continue };
        let k = (key, e.schema.value_fp.0);
        match (&mut e.event.after, e.event.op) {
            (_, Op::Delete | Op::Truncate) | (None, _) => {
                known.remove(&k);
            }
            (Some(after), _) => {
                if let Some(prev) = known.get(&k) {
                    for (a, p) in after.iter_mut().zip(prev) {
                        if matches!(a, Datum::UnchangedToast) && !matches!(p, Datum::UnchangedToast)
                        {
                            *a = p.clone();
                        }
                    }
                }
                known.insert(k, after.clone());
            }
        }
    }
}

/// Splits a batch into runs: a new run at every schema version change and around every truncate.
fn runs(entries: Vec<Entry>) -> Vec<(Run, bool)> {
    let mut out: Vec<(Run, bool)> = Vec::new();
    for e in entries {
        let barrier = e.event.op == Op::Truncate;
        let extend = out.last().is_some_and(|(r, was_barrier)| {
            !barrier && !was_barrier && r.schema.value_fp == e.schema.value_fp
        });
        if extend {
            if let Some((r, _)) = out.last_mut() {
                r.events.push((e.offset, e.event));
            }
        } else {
            out.push((
                Run {
                    schema: e.schema,
                    events: vec![(e.offset, e.event)],
                },
                barrier,
            ));
        }
    }
    out
}

/// Net change of one key from its first and last change.
fn net(first: &ChangeEvent, last: &ChangeEvent) -> Option<ChangeEvent> {
    let op = match (first.op, last.op) {
        (Op::Create, Op::Delete) => return None,
        (_, Op::Delete) => Op::Delete,
        (Op::Create | Op::Delete, _) => Op::Create,
        (Op::Read, _) => Op::Read,
        (Op::Update, _) => Op::Update,
        (Op::Truncate, _) => last.op,
    };
    let before = match op {
        Op::Update => first.before.clone(),
        Op::Delete if first.op == Op::Update && first.before.is_some() => first.before.clone(),
        Op::Delete => last.before.clone(),
        _ => None,
    };
    Some(ChangeEvent {
        op,
        before,
        after: last.after.clone(),
        source: last.source.clone(),
    })
}

/// Compacts one run with DataFusion: per key, the first and last change.
async fn compact_run(run: Run, keys: Vec<Option<Vec<u8>>>) -> Result<Run, CompactError> {
    let err = |e: &dyn std::fmt::Display| CompactError(e.to_string());
    let n = run.events.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new("_idx", DataType::Int64, false),
        Field::new("_key", DataType::Binary, true),
        Field::new("_op", DataType::UInt8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..n as i64)),
            Arc::new(BinaryArray::from(
                keys.iter().map(|k| k.as_deref()).collect::<Vec<_>>(),
            )),
            Arc::new(UInt8Array::from_iter_values(
                run.events.iter().map(|(_, e)| e.op.avro_index() as u8),
            )),
        ],
    )
    .map_err(|e| err(&e))?;
    let ctx = SessionContext::new();
    ctx.register_batch("changes", batch).map_err(|e| err(&e))?;
    let groups = ctx
        .sql(
            "SELECT min(_idx) AS first_idx, max(_idx) AS last_idx FROM changes \
             GROUP BY _key ORDER BY last_idx",
        )
        .await
        .map_err(|e| err(&e))?
        .collect()
        .await
        .map_err(|e| err(&e))?;
    let mut out = Vec::new();
    for g in &groups {
        let first = g
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| CompactError("first_idx is not Int64".into()))?;
        let last = g
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| CompactError("last_idx is not Int64".into()))?;
        for i in 0..g.num_rows() {
            let (f, l) = (first.value(i) as usize, last.value(i) as usize);
            let (offset, last_event) = &run.events[l];
            if let Some(e) = net(&run.events[f].1, last_event) {
                out.push((*offset, e));
            }
        }
    }
    Ok(Run {
        schema: run.schema,
        events: out,
    })
}

/// Compacts a batch (or only splits it into runs when `enabled` is false). Returns the runs to
/// ship, in order.
pub async fn compact(mut entries: Vec<Entry>, enabled: bool) -> Result<Vec<Run>, CompactError> {
    if enabled {
        fill_toast(&mut entries);
    }
    let keys: Vec<Option<Vec<u8>>> = entries.iter().map(|e| e.key.clone()).collect();
    let mut out = Vec::new();
    let mut at = 0;
    for (run, barrier) in runs(entries) {
        let len = run.events.len();
        let run_keys = keys[at..at + len].to_vec();
        at += len;
        let keyed = run.schema.has_key() && run_keys.iter().all(Option::is_some);
        if enabled && !barrier && keyed && len > 1 {
            let compacted = compact_run(run, run_keys).await?;
            if !compacted.events.is_empty() {
                out.push(compacted);
            }
        } else {
            out.push(run);
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use ferry_schemas::EncodedSchema;
    use ferry_schemas::{Column, ColumnType, Source, TableId, TableSchema};

    fn schema() -> Arc<EncodedSchema> {
        let t = TableSchema {
            database: "db".into(),
            id: TableId::new("public", "t"),
            columns: vec![
                Column {
                    name: "id".into(),
                    pg_type: "int4".into(),
                    type_oid: 23,
                    type_mod: -1,
                    missing: None,
                    attnum: None,
                    ty: ColumnType::Int4,
                    key: true,
                    key_order: 0,
                },
                Column {
                    name: "v".into(),
                    pg_type: "text".into(),
                    type_oid: 25,
                    type_mod: -1,
                    missing: None,
                    attnum: None,
                    ty: ColumnType::Text,
                    key: false,
                    key_order: 0,
                },
            ],
        };
        Arc::new(EncodedSchema::new(&t).expect("schema"))
    }

    fn row(id: i32, v: &str) -> Vec<Datum> {
        vec![Datum::Int(id), Datum::Text(v.into())]
    }

    /// `spec` is a list of (op, key, value); offsets and LSNs follow the list order.
    pub(in crate::ship) fn entries(spec: &[(Op, i32, &str)]) -> Vec<Entry> {
        let s = schema();
        spec.iter()
            .enumerate()
            .map(|(i, &(op, id, v))| {
                let (before, after) = match op {
                    Op::Create | Op::Read => (None, Some(row(id, v))),
                    Op::Update => (Some(row(id, &format!("before-{v}"))), Some(row(id, v))),
                    Op::Delete => (Some(row(id, "gone")), None),
                    Op::Truncate => (None, None),
                };
                let event = ChangeEvent {
                    op,
                    before,
                    after,
                    source: Source {
                        region: "r".into(),
                        database: "db".into(),
                        schema: "public".into(),
                        table: "t".into(),
                        lsn: 100 + i as u64,
                        seq: 0,
                        txid: Some(1),
                        commit_ts_us: None,
                        snapshot: op == Op::Read,
                    },
                };
                let mut key = Vec::new();
                if op != Op::Truncate {
                    s.encode_key(event.key_image().expect("image"), &mut key)
                        .expect("key");
                }
                Entry {
                    offset: i as i64,
                    key: (op != Op::Truncate).then_some(key),
                    schema: s.clone(),
                    event,
                }
            })
            .collect()
    }

    /// (op, key, value of after or before, offset) of every output change, in order.
    async fn run(spec: &[(Op, i32, &str)]) -> Vec<(Op, i32, String, i64)> {
        let runs = compact(entries(spec), true).await.expect("compacts");
        runs.into_iter()
            .flat_map(|r| r.events)
            .map(|(off, e)| {
                let image = e.after.clone().or(e.before.clone());
                let (id, v) = match image.as_deref() {
                    Some([Datum::Int(id), Datum::Text(v)]) => (*id, v.clone()),
                    _ => (0, String::new()),
                };
                (e.op, id, v, off)
            })
            .collect()
    }

    use Op::{Create as C, Delete as D, Read as R, Truncate as T, Update as U};

    #[tokio::test]
    async fn net_effect_per_key() {
        type Case<'a> = (
            &'a str,
            Vec<(Op, i32, &'a str)>,
            Vec<(Op, i32, &'a str, i64)>,
        );
        let cases: Vec<Case> = vec![
            (
                "insert then updates",
                vec![(C, 1, "a"), (U, 1, "b"), (U, 1, "c")],
                vec![(C, 1, "c", 2)],
            ),
            (
                "updates",
                vec![(U, 1, "a"), (U, 1, "b")],
                vec![(U, 1, "b", 1)],
            ),
            (
                "insert to delete",
                vec![(C, 1, "a"), (U, 1, "b"), (D, 1, "")],
                vec![],
            ),
            (
                "update then delete",
                vec![(U, 1, "a"), (D, 1, "")],
                vec![(D, 1, "before-a", 1)],
            ),
            (
                "delete then insert",
                vec![(D, 1, ""), (C, 1, "x")],
                vec![(C, 1, "x", 1)],
            ),
            (
                "read then update",
                vec![(R, 1, "a"), (U, 1, "b")],
                vec![(R, 1, "b", 1)],
            ),
            ("single delete", vec![(D, 1, "")], vec![(D, 1, "gone", 0)]),
            (
                "interleaved keys keep last-position order",
                vec![
                    (C, 1, "a"),
                    (C, 2, "a"),
                    (U, 1, "b"),
                    (U, 3, "a"),
                    (U, 2, "b"),
                ],
                vec![(C, 1, "b", 2), (U, 3, "a", 3), (C, 2, "b", 4)],
            ),
            (
                "truncate is a barrier",
                vec![
                    (C, 1, "a"),
                    (U, 1, "b"),
                    (T, 0, ""),
                    (C, 1, "c"),
                    (U, 1, "d"),
                ],
                vec![(C, 1, "b", 1), (T, 0, "", 2), (C, 1, "d", 4)],
            ),
        ];
        for (name, input, expected) in cases {
            let got = run(&input).await;
            let expected: Vec<_> = expected
                .into_iter()
                .map(|(op, id, v, off)| (op, id, v.to_string(), off))
                .collect();
            assert_eq!(got, expected, "{name}");
        }
    }

    #[tokio::test]
    async fn update_keeps_the_first_before_image() {
        let runs = compact(entries(&[(U, 1, "a"), (U, 1, "b")]), true)
            .await
            .expect("compacts");
        let e = &runs[0].events[0].1;
        assert_eq!(e.before.as_deref(), Some(row(1, "before-a").as_slice()));
        assert_eq!(e.after.as_deref(), Some(row(1, "b").as_slice()));
        assert_eq!(e.source.lsn, 101);
    }

    #[tokio::test]
    async fn disabled_compaction_passes_everything_through() {
        let spec = [(C, 1, "a"), (U, 1, "b"), (D, 1, "")];
        let runs = compact(entries(&spec), false).await.expect("runs");
        assert_eq!(runs.iter().map(|r| r.events.len()).sum::<usize>(), 3);
    }

    #[tokio::test]
    async fn keys_across_batches_compose() {
        // Compacting two consecutive batches separately and applying the results in order
        // gives the same final state as the uncompacted stream.
        let all = [
            (C, 1, "a"),
            (U, 2, "a"),
            (U, 1, "b"),
            (D, 2, ""),
            (C, 2, "c"),
            (U, 1, "d"),
        ];
        let mut state: HashMap<i32, String> = HashMap::new();
        for part in [&all[..3], &all[3..]] {
            for (op, id, v, _) in run(part).await {
                match op {
                    D => {
                        state.remove(&id);
                    }
                    _ => {
                        state.insert(id, v);
                    }
                }
            }
        }
        assert_eq!(state.get(&1).map(String::as_str), Some("d"));
        assert_eq!(state.get(&2).map(String::as_str), Some("c"));
    }

    #[tokio::test]
    async fn unchanged_toast_is_filled_from_the_batch() {
        let mut es = entries(&[(C, 1, "big"), (U, 1, "x")]);
        if let Some(a) = es[1].event.after.as_mut() {
            a[1] = Datum::UnchangedToast;
        }
        let runs = compact(es, true).await.expect("compacts");
        let e = &runs[0].events[0].1;
        assert_eq!(e.after.as_deref(), Some(row(1, "big").as_slice()));
    }
}
