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
