//! `ferry verify`: compares a table in the origin and the destination database by primary-key
//! ranges with per-range hashes computed inside each database, so only boundaries, counts and
//! hashes cross regions. A range whose hashes differ is split and compared again until single
//! rows are left, which are then reported (missing in the destination, extra there, or
//! different).

use std::collections::BTreeMap;

use ferry_connectors::postgres::{quote_ident, quote_literal, PgConfig, Session};
use ferry_schemas::TableId;

/// Why a comparison could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A query failed.
    #[error("postgres {target}: {action}: {source}")]
    Postgres {
        /// `host:port/db`.
        target: String,
        /// What was being done.
        action: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The table cannot be compared as it is (missing, no key, columns missing at the
    /// destination).
    #[error("{0}")]
    Table(String),
    /// Writing the repair request failed.
    #[error(transparent)]
    Capture(#[from] crate::error::CaptureError),
}

impl VerifyError {
    /// Whether a retry could help (a lost connection, a passing database condition).
    pub fn is_retryable(&self) -> bool {
        match self {
            VerifyError::Postgres { source, .. } => crate::error::passing(source),
            VerifyError::Table(_) => false,
            VerifyError::Capture(e) => e.is_retryable(),
        }
    }
}

fn db(
    target: &str,
    action: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> VerifyError {
    let (target, action) = (target.to_string(), action.into());
    move |source| VerifyError::Postgres {
        target,
        action,
        source,
    }
}

/// One row that differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The key, as the text of each key column.
    pub key: Vec<String>,
    /// How it differs.
    pub kind: Difference,
}

/// How a row differs between the origin and the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Difference {
    /// In the origin only.
    Missing,
    /// In the destination only.
    Extra,
    /// In both, with different values.
    Differs,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Difference::Missing => "missing in destination",
            Difference::Extra => "extra in destination",
            Difference::Differs => "differs",
        })
    }
}

/// The outcome of a comparison.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Rows in the origin table.
    pub origin_rows: i64,
    /// Rows in the destination table.
    pub destination_rows: i64,
    /// Ranges hashed on both sides.
    pub ranges: usize,
    /// Differing rows.
    pub mismatches: Vec<Mismatch>,
}

struct Side {
    session: Session,
    /// `host:port/db`, for errors.
    target: String,
    q: String,
    /// An extra condition every query of this comparison carries (`true`: the whole table).
    scope: String,
    /// (column, type) in origin column order.
    columns: Vec<(String, String)>,
    /// (column, type, whether it has a collation) of the key columns, in declared order (the
    /// origin's, on both sides).
    keys: Vec<(String, String, bool)>,
}

impl Side {
    async fn open(
        pg: &PgConfig,
        table: &TableId,
        only: Option<&[String]>,
    ) -> Result<Side, VerifyError> {
        let target = pg.display();
        let session = pg.connect().await.map_err(db(&target, "connecting"))?;
        let q = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.table)
        );
        let rows = session
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                        array_position(i.indkey::int2[], a.attnum), a.attcollation <> 0
                 FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&q],
            )
            .await
            .map_err(db(&target, format!("reading columns of {q}")))?;
        if rows.is_empty() {
            return Err(VerifyError::Table(format!(
                "{q} does not exist in {target}"
            )));
        }
        let mut columns = Vec::new();
        let mut keys = Vec::new();
        for r in rows {
            let (name, ty, key, collated): (String, String, Option<i32>, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if name.starts_with("_ferry_") || only.is_some_and(|o| !o.contains(&name)) {
                continue;
            }
            if let Some(place) = key {
                keys.push((place, (name.clone(), ty.clone(), collated)));
            }
            columns.push((name, ty));
        }
        // As declared: the order of the key's index, which ranges can walk.
        keys.sort_by_key(|(place, _)| *place);
        let keys: Vec<_> = keys.into_iter().map(|(_, k)| k).collect();
        if keys.is_empty() {
            return Err(VerifyError::Table(format!(
                "{q} has no primary key in {target}"
            )));
        }
        Ok(Side {
            session,
            target,
            q,
            scope: "true".into(),
            columns,
            keys,
        })
    }

    /// The key columns in comparison order. Text keys compare by bytes (`COLLATE "C"`) on both
    /// sides, so a range holds the same rows whatever collation each database gives them.
    fn order(&self) -> String {
        self.keys
            .iter()
            .map(|(k, _, collated)| {
                if *collated {
                    format!("{} COLLATE \"C\"", quote_ident(k))
                } else {
                    quote_ident(k)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Each key column as text, in key order.
    fn key_texts(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|(k, _, _)| format!("{}::text", quote_ident(k)))
            .collect()
    }

    fn row_text(&self) -> String {
        let parts: Vec<String> = self
            .columns
            .iter()
            .map(|(c, _)| format!("quote_nullable({}::text)", quote_ident(c)))
            .collect();
        format!("concat_ws(',', {})", parts.join(", "))
    }

    /// `(k1, k2) <= (v1, v2)` for the given key columns in the given order, compared like
    /// [`Side::order`].
    fn at_most(&self, key: &[(String, String)]) -> Result<String, VerifyError> {
        let mut cols = Vec::new();
        let mut vals = Vec::new();
        for (name, v) in key {
            let (_, ty, collated) =
                self.keys
                    .iter()
                    .find(|(k, _, _)| k == name)
                    .ok_or_else(|| {
                        VerifyError::Table(format!(
                            "{name} is not a key column of {} in {}",
                            self.q, self.target
                        ))
                    })?;
            cols.push(if *collated {
                format!("{} COLLATE \"C\"", quote_ident(name))
            } else {
                quote_ident(name)
            });
            vals.push(format!("{}::{ty}", quote_literal(v)));
        }
        Ok(format!("({}) <= ({})", cols.join(", "), vals.join(", ")))
    }

    fn bound(&self, key: &[String]) -> String {
        let vals: Vec<String> = self
            .keys
            .iter()
            .zip(key)
            .map(|((_, ty, _), v)| format!("{}::{ty}", quote_literal(v)))
            .collect();
        format!("({})", vals.join(", "))
    }

    fn predicate(&self, lo: Option<&[String]>, hi: Option<&[String]>) -> String {
        let mut p = vec![self.scope.clone()];
        if let Some(lo) = lo {
            p.push(format!("({}) >= {}", self.order(), self.bound(lo)));
        }
        if let Some(hi) = hi {
            p.push(format!("({}) < {}", self.order(), self.bound(hi)));
        }
        p.join(" AND ")
    }

    async fn hash(
        &self,
        lo: Option<&[String]>,
        hi: Option<&[String]>,
    ) -> Result<(i64, String), VerifyError> {
        let sql = format!(
            "SELECT count(*), coalesce(md5(string_agg({}, E'\\n' ORDER BY {})), '') FROM {} WHERE {}",
            self.row_text(),
            self.order(),
            self.q,
            self.predicate(lo, hi)
        );
        let r = self
            .session
            .query_one(&sql, &[])
            .await
            .map_err(db(&self.target, format!("hashing {}", self.q)))?;
        Ok((r.get(0), r.get(1)))
    }

    /// Every `step`-th key in the range, in key order (the range's split points).
    async fn boundaries(
        &self,
        lo: Option<&[String]>,
        hi: Option<&[String]>,
        step: i64,
    ) -> Result<Vec<Vec<String>>, VerifyError> {
        let keys = self.key_texts();
        let sql = format!(
            "SELECT {cols} FROM (SELECT {keys}, row_number() OVER (ORDER BY {order}) AS _rn FROM {q} WHERE {pred}) s
             WHERE (_rn - 1) % {step} = 0 ORDER BY _rn",
            cols = (0..keys.len()).map(|i| format!("k{i}")).collect::<Vec<_>>().join(", "),
            keys = keys.iter().enumerate().map(|(i, k)| format!("{k} AS k{i}")).collect::<Vec<_>>().join(", "),
            order = self.order(),
            q = self.q,
            pred = self.predicate(lo, hi),
        );
        let rows = self
            .session
            .query(&sql, &[])
            .await
            .map_err(db(&self.target, format!("splitting {}", self.q)))?;
        Ok(rows
            .iter()
            .map(|r| {
                (0..self.keys.len())
                    .map(|i| r.get::<_, String>(i))
                    .collect()
            })
            .collect())
    }

    async fn rows(
        &self,
        lo: Option<&[String]>,
        hi: Option<&[String]>,
    ) -> Result<BTreeMap<Vec<String>, String>, VerifyError> {
        let keys = self.key_texts();
        let sql = format!(
            "SELECT {}, md5({}) FROM {} WHERE {} ORDER BY {}",
            keys.join(", "),
            self.row_text(),
            self.q,
            self.predicate(lo, hi),
            self.order()
        );
        let rows = self
            .session
            .query(&sql, &[])
            .await
            .map_err(db(&self.target, format!("reading {}", self.q)))?;
        let n = self.keys.len();
        Ok(rows
            .iter()
            .map(|r| {
                (
                    (0..n).map(|i| r.get::<_, String>(i)).collect(),
                    r.get::<_, String>(n),
                )
            })
            .collect())
    }
}

/// A key as the text of each key column.
type Key = Vec<String>;

/// Rows per range in the first pass; mismatching ranges are split into 16 until at most this
/// many rows are left, then compared row by row.
const FIRST_RANGE_ROWS: i64 = 10_000;
const ROW_BY_ROW: i64 = 64;

/// Which rows a comparison covers.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only rows up to and including this key, in the order of its columns: (key column,
    /// text of its value), in the order the rows were read (a backfill's sample).
    pub upto: Option<Vec<(String, String)>>,
    /// Only rows matching this SQL predicate.
    pub predicate: Option<String>,
}

/// Compares `table` in both databases.
pub async fn verify(
    origin: &PgConfig,
    destination: &PgConfig,
    table: &TableId,
) -> Result<Report, VerifyError> {
    verify_scope(origin, destination, table, &Scope::default()).await
}

/// Compares the rows of `table` within `scope` in both databases (a backfill's sample).
pub async fn verify_scope(
    origin: &PgConfig,
    destination: &PgConfig,
    table: &TableId,
    scope: &Scope,
) -> Result<Report, VerifyError> {
    let mut o = Side::open(origin, table, None).await?;
    let names: Vec<String> = o.columns.iter().map(|(c, _)| c.clone()).collect();
    let mut d = Side::open(destination, table, Some(&names)).await?;
    // Both sides walk the origin's key order (a destination table may have been created with
    // its key columns in another order).
    d.keys
        .sort_by_key(|(k, _, _)| o.keys.iter().position(|(ok, _, _)| ok == k));
    for side in [&mut o, &mut d] {
        let mut parts = vec!["true".to_string()];
        if let Some(k) = &scope.upto {
            parts.push(side.at_most(k)?);
        }
        if let Some(p) = &scope.predicate {
            parts.push(format!("({p})"));
        }
        side.scope = parts.join(" AND ");
    }
    if d.columns.len() != o.columns.len() {
        return Err(VerifyError::Table(format!(
            "the destination lacks columns of {table}: origin has {}, destination {}",
            names.join(", "),
            d.columns
                .iter()
                .map(|(c, _)| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut report = Report {
        origin_rows: o.hash(None, None).await?.0,
        destination_rows: d.hash(None, None).await?.0,
        ..Report::default()
    };
    // Ranges: (-inf, b1), [b1, b2), …, [bn, +inf), boundaries taken from the origin.
    let mut work: Vec<(Option<Key>, Option<Key>, i64)> = Vec::new();
    let bounds = o.boundaries(None, None, FIRST_RANGE_ROWS).await?;
    let mut lo: Option<Vec<String>> = None;
    for b in bounds.into_iter().chain(std::iter::once(Vec::new())) {
        let hi = (!b.is_empty()).then_some(b);
        work.push((lo.clone(), hi.clone(), FIRST_RANGE_ROWS));
        lo = hi;
    }
    while let Some((lo, hi, size)) = work.pop() {
        report.ranges += 1;
        let (a, b) = (
            o.hash(lo.as_deref(), hi.as_deref()).await?,
            d.hash(lo.as_deref(), hi.as_deref()).await?,
        );
        if a == b {
            continue;
        }
        if a.0.max(b.0) <= ROW_BY_ROW || size <= ROW_BY_ROW {
            let (ro, rd) = (
                o.rows(lo.as_deref(), hi.as_deref()).await?,
                d.rows(lo.as_deref(), hi.as_deref()).await?,
            );
            for (k, h) in &ro {
                match rd.get(k) {
                    None => report.mismatches.push(Mismatch {
                        key: k.clone(),
                        kind: Difference::Missing,
                    }),
                    Some(x) if x != h => report.mismatches.push(Mismatch {
                        key: k.clone(),
                        kind: Difference::Differs,
                    }),
                    _ => {}
                }
            }
            for k in rd.keys().filter(|k| !ro.contains_key(*k)) {
                report.mismatches.push(Mismatch {
                    key: k.clone(),
                    kind: Difference::Extra,
                });
            }
            continue;
        }
        let step = (size / 16).max(1);
        // Split points from whichever side has rows there (extra destination rows need theirs).
        let mut points = o.boundaries(lo.as_deref(), hi.as_deref(), step).await?;
        if points.is_empty() {
            points = d.boundaries(lo.as_deref(), hi.as_deref(), step).await?;
        }
        let mut sub_lo = lo.clone();
        for p in points
            .into_iter()
            .skip(1)
            .map(Some)
            .chain(std::iter::once(hi.clone()))
        {
            work.push((sub_lo.clone(), p.clone(), step));
            sub_lo = p;
        }
    }
    report.mismatches.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(report)
}

/// Asks the capture pipeline to re-read `mismatches` (through a message in the origin's WAL, so
/// the rows re-enter the normal path in order, as snapshot rows; keys gone from the origin
/// become deletes).
pub async fn request_repair(
    cfg: &crate::config::Config,
    table: &TableId,
    mismatches: &[Mismatch],
) -> Result<(), VerifyError> {
    let request = crate::wal::RepairRequest::new(
        &cfg.capture.slot,
        table,
        mismatches.iter().map(|m| m.key.clone()).collect(),
    );
    let pg = &cfg.origin.postgres;
    let target = pg.display();
    let s = pg.connect().await.map_err(db(&target, "connecting"))?;
    Ok(crate::wal::emit_json(&s, &target, crate::wal::Kind::Repair, &request).await?)
}
