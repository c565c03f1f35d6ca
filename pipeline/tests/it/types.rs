//! Every supported Postgres type round-trips: a row written in Postgres is decoded from the
//! topic (with a stock Avro reader and the published schema) to the same values.

use std::time::Duration;

use serde_json::json;

use crate::support::{start_capture, TestDb};

const DDL: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE types (
  id int8 PRIMARY KEY, i2 int2, i4 int4, i8 int8, n numeric, n2 numeric(12,2),
  f4 float4, f8 float8, b bool, t text, vc varchar(20), c char(3), by bytea,
  d date, tm time, ts timestamp, tstz timestamptz, u uuid, j json, jb jsonb,
  ai int4[], at text[], e mood, ip inet, iv interval);
"#;

const ROW: &str = r#"
INSERT INTO types VALUES (1, -32768, 2147483647, -9223372036854775808,
  '12345678901234567890.123456789012345', 10.50, 1.5, -2.25, true, 'héllo "q" ''x''', 'vc', 'ab',
  '\x00ff10', '2024-02-29', '13:45:01.5', '2024-02-29 13:45:01.123456',
  '2024-02-29 13:45:01.123456+02', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"a": 1}', '{"b": [1, 2]}', '{1,NULL,3}', '{"x y",z,"q\"uote"}', 'happy', '10.0.0.1/8',
  '1 day 02:00:00');
INSERT INTO types (id) VALUES (2);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_through_the_topic() {
    let db = TestDb::new("types").await;
    db.exec(DDL).await;
    let cap = start_capture(&db.cfg).await;
    // Rows written while streaming (not from the snapshot), so the stream decoder is tested.
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.exec(ROW).await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;

    let events = db.events("public.types").await;
    let mut by_id: Vec<_> = events.iter().filter(|e| e["op"] == "c").collect();
    by_id.sort_by_key(|e| e["after"]["id"].as_i64());
    assert_eq!(by_id.len(), 2, "{events:#?}");
    let after = &by_id[0]["after"];
    // Dates are days since 1970-01-01, times µs since midnight, timestamps µs since the epoch.
    let expected = json!({
        "id": 1, "i2": -32768, "i4": 2147483647, "i8": i64::MIN,
        "n": "12345678901234567890.123456789012345", "n2": "10.50",
        "f4": 1.5, "f8": -2.25, "b": true, "t": "héllo \"q\" 'x'", "vc": "vc", "c": "ab ",
        "by": [0, 255, 16],
        "d": 19782,
        "tm": 49_501_500_000i64,
        "ts": 1_709_214_301_123_456i64,
        "tstz": 1_709_207_101_123_456i64,
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": "{\"a\": 1}", "jb": "{\"b\": [1, 2]}",
        "ai": [1, null, 3], "at": ["x y", "z", "q\"uote"],
        "e": "happy", "ip": "10.0.0.1/8", "iv": "1 day 02:00:00"
    });
    assert_eq!(after, &expected);
    assert_eq!(by_id[0]["_key"], json!({"id": 1}));

    let nulls = &by_id[1]["after"];
    for (k, v) in nulls.as_object().expect("record") {
        if k != "id" {
            assert!(v.is_null(), "{k} should be null, got {v}");
        }
    }
    // The schema records the Postgres type of every field.
    let cluster = ferry_connectors::kafka::Cluster::new("origin", db.cfg.origin.kafka.clone());
    let prefix = db.cfg.capture.topic_prefix.clone();
    let schemas = tokio::task::spawn_blocking(move || {
        ferry_pipeline::inspect::load_schemas(&cluster, &prefix).expect("schemas")
    })
    .await
    .expect("task");
    let fp = by_id[0]["_fingerprint"].as_str().expect("fp");
    let schema = &schemas[fp];
    for pg_type in [
        "\"inet\"",
        "\"public.mood\"",
        "\"_int4\"",
        "\"numeric\"",
        "\"interval\"",
    ] {
        assert!(schema.contains(pg_type), "schema lacks {pg_type}: {schema}");
    }
    db.cleanup().await;
}

/// Every built-in type (and domains, enums, composites, ranges, arrays, contrib types), as
/// key where Postgres allows and as value, typical, NULL and extreme values: each arrives in
/// the destination as the same type (`format_type`) with the same text (which for every type
/// here is canonical in a session with Ferry's settings, and tells `-0` from `0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_arrives_equal_in_the_destination() {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use ferry_pipeline::apply::{self, ApplyStats};
    use ferry_pipeline::ship::{self, ShipStats};
    use tokio::sync::watch;

    // (column, type, values): one row per value index; a shorter list leaves NULL.
    #[rustfmt::skip]
    let columns: &[(&str, &str, &[&str])] = &[
        ("i2", "int2", &["0", "-32768", "32767"]),
        ("i4", "int4", &["-2147483648", "2147483647"]),
        ("i8", "int8", &["-9223372036854775808", "9223372036854775807"]),
        ("n", "numeric", &["NaN", "Infinity", "-Infinity", "0.000000000000000000001", "-12345678901234567890.5"]),
        ("n2", "numeric(12,2)", &["12.34", "-9999999999.99"]),
        ("f4", "float4", &["NaN", "Infinity", "-Infinity", "-0", "1.1754944e-38", "3.4028235e+38"]),
        ("f8", "float8", &["NaN", "Infinity", "-Infinity", "-0", "2.2250738585072014e-308", "1.7976931348623157e+308"]),
        ("m", "money", &["-92233720368547758.08", "92233720368547758.07"]),
        ("bt", "bit(8)", &["10101010", "00000001"]),
        ("vb", "varbit(12)", &["101", ""]),
        ("c5", "char(5)", &["ab", ""]),
        ("vc", "varchar(10)", &["x", "0123456789"]),
        ("t", "text", &["", "tab\there", "quote's \"dq\" \\", "ünï 𝄞"]),
        ("ch", "\"char\"", &["a"]),
        ("nm", "name", &["a_name"]),
        ("by", "bytea", &["\\x", "\\x00ff"]),
        ("d", "date", &["4713-01-01 BC", "5874897-12-31", "infinity", "-infinity", "2000-02-29"]),
        ("tm", "time", &["00:00:00", "24:00:00", "23:59:59.999999"]),
        ("tm3", "time(3)", &["12:00:00.123"]),
        ("ttz", "timetz", &["00:00:00+14:59", "24:00:00-15:59"]),
        // The last timestamp that fits in microseconds since 1970 (Avro's timestamp-micros),
        // then Postgres's last ones, which travel as text.
        ("ts", "timestamp", &["4713-01-01 00:00:00 BC", "294247-01-10 04:00:54.775806", "infinity", "-infinity", "294247-01-10 04:00:54.775807", "294276-12-31 23:59:59.999999"]),
        ("ts0", "timestamp(0)", &["2026-12-01 10:00:01"]),
        ("tz", "timestamptz", &["4713-01-02 00:00:00+00 BC", "294247-01-10 04:00:54.775806+00", "infinity", "-infinity", "294276-12-31 23:59:59.999999+00"]),
        ("iv", "interval", &["178000000 years", "-178000000 years", "1 mon 2 days 03:04:05.678901", "-1 days +02:00:00"]),
        ("u", "uuid", &["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
        ("j", "json", &["{\"a\": [1, 2.0, \"x\"],  \"a\": 2}"]),
        ("jb", "jsonb", &["{\"b\": null, \"n\": 1.50}"]),
        ("x", "xml", &["<a>1</a>"]),
        ("ip", "inet", &["::1/128", "192.168.0.1/24"]),
        ("cd", "cidr", &["10.0.0.0/8", "2001:db8::/32"]),
        ("mac", "macaddr", &["08:00:2b:01:02:03"]),
        ("mac8", "macaddr8", &["08:00:2b:01:02:03:04:05"]),
        ("pt", "point", &["(1.5,-2)"]),
        ("ln", "line", &["{1,2,3}"]),
        ("lseg", "lseg", &["[(0,0),(1,1)]"]),
        ("bx", "box", &["(1,1),(0,0)"]),
        ("pa", "path", &["[(0,0),(1,1),(2,0)]"]),
        ("pg", "polygon", &["((0,0),(1,1),(1,0))"]),
        ("ci", "circle", &["<(0,0),5>"]),
        ("tsv", "tsvector", &["a fat cat"]),
        ("tsq", "tsquery", &["fat & cat"]),
        ("r", "int4range", &["[1,10)", "empty"]),
        ("nr", "numrange", &["(1.5,)"]),
        ("tr", "tstzrange", &["[2026-01-01 00:00:00+00,infinity)"]),
        ("mr", "int4multirange", &["{[1,3), [5,7)}"]),
        // Any dimension and bounds (those other than one dimension from 1 travel as text).
        ("ai", "int4[]", &["{1,NULL,3}", "{}", "{{1,2},{3,NULL}}", "[0:1]={5,6}", "[-2:-1][3:3]={{1},{2}}", "{{{7}}}"]),
        ("at", "text[]", &["{\"a b\",NULL,\"\\\"\"}", "{{\"a b\",NULL},{\"}\",\"{\"}}"]),
        ("ats", "timestamp[]", &["{\"294276-12-31 23:59:59.999999\",NULL}", "{\"2026-12-01 00:00:00\"}"]),
        ("dom", "posint", &["7"]),
        ("en", "mood", &["happy"]),
        ("comp", "pair", &["(1,\"a b\")"]),
        ("lsn", "pg_lsn", &["0/0", "FFFFFFFF/FFFFFFFF"]),
        ("o", "oid", &["4294967295"]),
        ("hs", "hstore", &["\"a\"=>\"1\", \"b\"=>NULL"]),
        ("ct", "citext", &["MiXeD"]),
        ("lt", "ltree", &["top.middle.leaf"]),
    ];
    let rows = columns.iter().map(|(_, _, v)| v.len()).max().unwrap_or(0);
    let setup = "CREATE EXTENSION IF NOT EXISTS hstore; CREATE EXTENSION IF NOT EXISTS citext;
                 CREATE EXTENSION IF NOT EXISTS ltree;
                 CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
                 CREATE TYPE mood AS ENUM ('sad', 'happy');
                 CREATE TYPE pair AS (x int, y text);";
    let mut db = TestDb::new("alltypes").await;
    db.exec(setup).await;
    let defs: Vec<String> = columns.iter().map(|(c, t, _)| format!("{c} {t}")).collect();
    db.exec(&format!(
        "CREATE TABLE all_types (id int PRIMARY KEY, {})",
        defs.join(", ")
    ))
    .await;
    let literal =
        |t: &str, v: &str| format!("{}::{t}", ferry_connectors::postgres::quote_literal(v));
    let insert = |row: usize| {
        let values: Vec<String> = columns
            .iter()
            .map(|(_, t, v)| match v.get(row) {
                Some(v) => literal(t, v),
                None => "NULL".into(),
            })
            .collect();
        format!(
            "INSERT INTO all_types VALUES ({row}, {})",
            values.join(", ")
        )
    };
    // Each type with a btree order is a key column too, with all its values: tables keyed by
    // `id` and up to 31 such columns (Postgres allows 32).
    const UNORDERED: &[&str] = &[
        "json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle",
    ];
    let keyable: Vec<_> = columns
        .iter()
        .filter(|(_, t, _)| !UNORDERED.contains(t))
        .collect();
    let key_tables: Vec<(String, Vec<_>)> = keyable
        .chunks(31)
        .enumerate()
        .map(|(n, cs)| (format!("public.keys_{n}"), cs.to_vec()))
        .collect();
    for (name, cs) in &key_tables {
        let defs: Vec<String> = cs.iter().map(|(c, t, _)| format!("{c} {t}")).collect();
        let key: Vec<&str> = cs.iter().map(|(c, _, _)| *c).collect();
        db.exec(&format!(
            "CREATE TABLE {name} (id int, {}, PRIMARY KEY (id, {}))",
            defs.join(", "),
            key.join(", ")
        ))
        .await;
    }
    let key_insert = |row: usize| {
        let mut sql = String::new();
        for (name, cs) in &key_tables {
            let values: Vec<String> = cs
                .iter()
                .map(|(_, t, v)| literal(t, v[row % v.len()]))
                .collect();
            sql += &format!("INSERT INTO {name} VALUES ({row}, {});", values.join(", "));
        }
        sql
    };
    // Half the rows come through the snapshot, half through the stream; one row all NULL.
    for row in 0..rows / 2 {
        db.exec(&insert(row)).await;
        db.exec(&key_insert(row)).await;
    }
    let dest = crate::apply::dest_db(&db, "dest").await;
    dest.connect()
        .await
        .expect("destination")
        .batch_execute(setup)
        .await
        .expect("destination types");
    db.cfg.destination.postgres = Some(dest.clone());
    db.cfg.ship.group_id = format!("{}_ship", db.name);
    db.cfg.ship.linger_ms = 100;
    db.cfg.apply.group_id = format!("{}_apply", db.name);
    let cap = start_capture(&db.cfg).await;
    let (stop, rx) = watch::channel(false);
    let ship = {
        let (cfg, rx) = (db.cfg.clone(), rx.clone());
        tokio::spawn(async move { ship::run(&cfg, rx, Arc::new(ShipStats::default())).await })
    };
    let apply = {
        let cfg = db.cfg.clone();
        tokio::spawn(async move { apply::run(&cfg, rx, Arc::new(ApplyStats::default())).await })
    };
    for row in rows / 2..rows {
        db.exec(&insert(row)).await;
        db.exec(&key_insert(row)).await;
    }
    // Deletes find their row by every key type; one row comes back.
    for (name, _) in &key_tables {
        db.exec(&format!("DELETE FROM {name} WHERE id IN (0, 1)"))
            .await;
    }
    db.exec(&key_insert(1)).await;
    db.exec(&format!("INSERT INTO all_types (id) VALUES ({rows})"))
        .await;

    let d = dest.connect().await.expect("destination");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);

    loop {
        let n = match d
            .query_one("SELECT count(*) FROM public.all_types", &[])
            .await
        {
            Ok(r) => r.get::<_, i64>(0),
            Err(_) => 0,
        };
        if n == rows as i64 + 1 {
            break;
        }
        if std::time::Instant::now() > deadline {
            panic!("destination has {n} of {} rows", rows + 1);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (table, cs) in &key_tables {
        let names: Vec<&str> = cs.iter().map(|(c, _, _)| *c).collect();
        let o = text_rows(&db.session, table, &names).await;
        while text_rows(&d, table, &names).await != o && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let _ = stop.send(true);
    let shipped = ship.await.expect("join");
    let applied = apply.await.expect("join");
    cap.stop().await;

    // Types and values, column by column; every difference is listed before failing.
    let type_query = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                      WHERE a.attrelid = 'public.all_types'::regclass AND a.attnum > 0 AND NOT a.attisdropped";
    let types = |rows: Vec<tokio_postgres::Row>| -> BTreeMap<String, String> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let origin_types = types(
        db.session
            .query(type_query, &[])
            .await
            .expect("origin types"),
    );
    let dest_types = types(d.query(type_query, &[]).await.expect("destination types"));
    let mut wrong = Vec::new();
    for (c, _, _) in columns {
        if origin_types.get(*c) != dest_types.get(*c) {
            wrong.push(format!(
                "{c}: type {:?} arrived as {:?}",
                origin_types.get(*c),
                dest_types.get(*c)
            ));
        }
    }
    let mut compare = |table: &str, cs: &[&str], o: Vec<(i32, Vec<Option<String>>)>, dr| {
        if o.len() != Vec::len(&dr) {
            let ids = |rows: &[(i32, _)]| rows.iter().map(|r| r.0).collect::<Vec<_>>();
            wrong.push(format!(
                "{table}: rows {:?} arrived as {:?}",
                ids(&o),
                ids(&dr)
            ));
        }
        for ((id, a), (_, b)) in o.iter().zip(&dr) {
            for (i, c) in cs.iter().enumerate() {
                if a[i] != b[i] {
                    wrong.push(format!(
                        "{table} row {id} {c}: {:?} arrived as {:?}",
                        a[i], b[i]
                    ));
                }
            }
        }
    };
    let names: Vec<&str> = columns.iter().map(|(c, _, _)| *c).collect();
    let o = text_rows(&db.session, "public.all_types", &names).await;
    let dr = text_rows(&d, "public.all_types", &names).await;
    compare("public.all_types", &names, o, dr);
    for (table, cs) in &key_tables {
        let names: Vec<&str> = cs.iter().map(|(c, _, _)| *c).collect();
        let o = text_rows(&db.session, table, &names).await;
        assert_eq!(o.len(), rows - 1, "{table} in the origin");
        let dr = text_rows(&d, table, &names).await;
        compare(table, &names, o, dr);
    }
    assert!(
        wrong.is_empty(),
        "{} differences (ship {shipped:?}, apply {applied:?}):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    drop(d);
    crate::support::drop_db(&dest).await;
    db.cleanup().await;
}

/// Every value of `cs` as text, by `id`: for the types of the matrix this tells every two
/// values apart. Empty while the table does not exist.
async fn text_rows(
    s: &tokio_postgres::Client,
    table: &str,
    cs: &[&str],
) -> Vec<(i32, Vec<Option<String>>)> {
    let list: Vec<String> = cs.iter().map(|c| format!("{c}::text")).collect();
    let sql = format!("SELECT id, {} FROM {table} ORDER BY id", list.join(", "));
    s.query(&sql, &[])
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), (1..r.len()).map(|i| r.get(i)).collect()))
                .collect()
        })
        .unwrap_or_default()
}
