//! Ferry's Avro against clients Ferry did not write.
//!
//! - Java's `SchemaNormalization` (org.apache.avro:avro, the tool in `ops/interop/avro-pcf`,
//!   built by `ops/test`) computes the Parsing Canonical Form and fingerprint of every schema
//!   Ferry emits; Ferry's must be the same, byte for byte.

use std::io::Write;
use std::process::{Command, Stdio};

use ferry_schemas::manifest::MANIFEST_SCHEMA;
use ferry_schemas::pcf::canonical_form_str;
use ferry_schemas::{Column, ColumnType, EncodedSchema, Fingerprint, TableId, TableSchema};

use crate::support::repo;

/// Every column type Ferry maps to Avro, plus an array of each.
fn every_type() -> Vec<ColumnType> {
    let scalars = vec![
        ColumnType::Int2,
        ColumnType::Int4,
        ColumnType::Int8,
        ColumnType::Float4,
        ColumnType::Float8,
        ColumnType::Bool,
        ColumnType::Numeric,
        ColumnType::Text,
        ColumnType::Bytea,
        ColumnType::Date,
        ColumnType::Time,
        ColumnType::Timestamp,
        ColumnType::TimestampTz,
        ColumnType::Uuid,
        ColumnType::Json,
        ColumnType::Enum,
        ColumnType::Other,
    ];
    let arrays: Vec<ColumnType> = scalars
        .iter()
        .map(|t| ColumnType::Array(Box::new(t.clone())))
        .collect();
    scalars.into_iter().chain(arrays).collect()
}

fn column(name: &str, ty: ColumnType, key: bool) -> Column {
    Column {
        name: name.into(),
        pg_type: ty.to_string(),
        type_oid: 0,
        type_mod: -1,
        missing: None,
        attnum: None,
        ty,
        key,
        key_order: 0,
    }
}

/// The schemas to compare: a table with every type (keyed by every scalar type), one table per
/// type as its only key, odd identifiers, a keyless table, and the batch manifest.
fn schemas() -> Vec<String> {
    let types = every_type();
    let mut out = vec![MANIFEST_SCHEMA.to_string()];
    let mut all = TableSchema {
        database: "ferry db".into(),
        id: TableId::new("Odd Schema", "every-type"),
        columns: types
            .iter()
            .enumerate()
            .map(|(i, t)| column(&format!("c{i} {t}"), t.clone(), false))
            .collect(),
    };
    all.columns[0].key = true;
    let mut tables = vec![all];
    for (i, t) in types.iter().enumerate() {
        tables.push(TableSchema {
            database: "db".into(),
            id: TableId::new("public", format!("t{i}")),
            columns: vec![column("k", t.clone(), true), column("v", t.clone(), false)],
        });
    }
    tables.push(TableSchema {
        database: "Ünïcode".into(),
        id: TableId::new("Schéma", "table.with.dots"),
        columns: vec![
            column("1st", ColumnType::Text, false),
            column("1st", ColumnType::Int4, false),
            column("ключ", ColumnType::Uuid, false),
        ],
    });
    for t in &tables {
        let s = EncodedSchema::new(t).unwrap_or_else(|e| panic!("{}: {e}", t.id));
        out.push(s.value_json.clone());
        out.push(s.key_json.clone());
    }
    out
}

/// The Java reference tool's classpath (`ops/test` builds it).
fn java_tool() -> Command {
    let dir = repo().join("ops/interop/avro-pcf/target");
    assert!(
        dir.join("avro-pcf-1.jar").is_file(),
        "{} is missing: ops/test builds it (mvn -f ops/interop/avro-pcf/pom.xml package)",
        dir.display()
    );
    let java = std::env::var_os("FERRY_JAVA").unwrap_or_else(|| "java".into());
    let mut c = Command::new(java);
    c.arg("-cp")
        .arg(format!(
            "{}:{}/libs/*",
            dir.join("avro-pcf-1.jar").display(),
            dir.display()
        ))
        .arg("dev.ferry.ops.AvroPcf");
    c
}

#[test]
fn canonical_forms_and_fingerprints_match_java_schema_normalization() {
    let schemas = schemas();
    let mut child = java_tool()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start java (FERRY_JAVA or java on PATH)");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for s in &schemas {
            // One schema per line: the tool reads lines.
            let one_line: serde_json::Value = serde_json::from_str(s).expect("schema json");
            writeln!(stdin, "{one_line}").expect("write to java");
        }
    }
    let out = child.wait_with_output().expect("java output");
    assert!(
        out.status.success(),
        "java: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), schemas.len(), "one answer per schema:\n{text}");
    for (schema, line) in schemas.iter().zip(lines) {
        let (java_fp, java_pcf) = line.split_once('\t').expect("fp<TAB>pcf");
        assert_ne!(
            java_fp, "ERROR",
            "Java refused a schema Ferry emits: {java_pcf}\n{schema}"
        );
        let ours = canonical_form_str(schema).expect("our canonical form");
        assert_eq!(ours, java_pcf, "canonical form differs for\n{schema}");
        let json: serde_json::Value = serde_json::from_str(schema).expect("json");
        let fp = Fingerprint::of_json(&json).expect("fingerprint");
        assert_eq!(fp.to_string(), java_fp, "fingerprint differs for\n{schema}");
    }
}

/// Ferry's encoders put the same fingerprint in the record header.
#[test]
fn record_headers_carry_the_specification_fingerprint() {
    let t = TableSchema {
        database: "db".into(),
        id: TableId::new("public", "ts"),
        columns: vec![
            column("id", ColumnType::Int8, true),
            column("at", ColumnType::TimestampTz, false),
        ],
    };
    let s = EncodedSchema::new(&t).expect("schema");
    let json: serde_json::Value = serde_json::from_str(&s.value_json).expect("json");
    assert_eq!(s.value_fp, Fingerprint::of_json(&json).expect("fp"));
    // This schema has logical types, so the legacy (apache-avro) fingerprint differs.
    assert_ne!(s.value_fp, s.legacy_value_fp);
}

/// The venv `ops/test` makes with confluent-kafka[avro] and fastavro (`FERRY_PYTHON`).
fn python() -> Command {
    let py = std::env::var_os("FERRY_PYTHON").unwrap_or_else(|| {
        panic!("FERRY_PYTHON is not set: ops/test makes a venv with confluent-kafka[avro] and fastavro")
    });
    let mut c = Command::new(py);
    c.arg(repo().join("ops/interop/read_replicated.py"));
    c
}

/// Captures a table with a mix of types, ships and applies it, and returns the destination
/// database once it matches the origin.
async fn replicate(db: &mut crate::support::TestDb) -> ferry_connectors::postgres::PgConfig {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::sync::watch;

    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, price numeric(10,2), \
         ok boolean, tags text[], at timestamptz, day date, u uuid)",
    )
    .await;
    let dest = crate::apply::dest_db(db, "dest").await;
    db.cfg.destination.postgres = Some(dest.clone());
    db.cfg.ship.group_id = format!("{}_ship", db.name);
    db.cfg.ship.linger_ms = 200;
    db.cfg.ship.max_events = 100;
    db.cfg.apply.group_id = format!("{}_apply", db.name);
    let cap = crate::support::start_capture(&db.cfg).await;
    // The changes below must come after the slot, so that capture streams them.
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.confirmed().await.is_none() {
        assert!(Instant::now() < deadline, "capture made no slot in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.exec(
        "INSERT INTO items SELECT g, 'name ' || g, g * 3, g * 1.25, g % 2 = 0, \
           ARRAY['a' || g, NULL, 'ü'], '2024-03-01 12:00:00.123456+00'::timestamptz + g * interval '1 hour', \
           '2024-01-01'::date + g, md5(g::text)::uuid FROM generate_series(1, 300) g",
    )
    .await;
    db.exec("UPDATE items SET name = NULL, tags = NULL, at = NULL WHERE id % 7 = 0")
        .await;
    db.exec("UPDATE items SET qty = qty + 1, price = -price WHERE id % 5 = 0")
        .await;
    db.exec("DELETE FROM items WHERE id % 11 = 0").await;
    let lsn = db.sync_point().await;
    db.wait_confirmed(lsn, Duration::from_secs(60)).await;
    cap.stop().await;

    let (stop, rx) = watch::channel(false);
    let ship = {
        let (cfg, rx) = (db.cfg.clone(), rx.clone());
        tokio::spawn(async move {
            ferry_pipeline::ship::run(
                &cfg,
                rx,
                Arc::new(ferry_pipeline::ship::ShipStats::default()),
            )
            .await
        })
    };
    let apply = {
        let cfg = db.cfg.clone();
        tokio::spawn(async move {
            ferry_pipeline::apply::run(
                &cfg,
                rx,
                Arc::new(ferry_pipeline::apply::ApplyStats::default()),
            )
            .await
        })
    };
    let table = ferry_schemas::TableId::new("public", "items");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let last = ferry_pipeline::verify::verify(&db.cfg.origin.postgres, &dest, &table).await;
        if last.as_ref().is_ok_and(|r| r.mismatches.is_empty()) {
            break;
        }
        assert!(
            !ship.is_finished() && !apply.is_finished(),
            "ship or apply ended early"
        );
        assert!(
            Instant::now() < deadline,
            "destination did not match the origin in 180 s; last verify: {:?}",
            last.map(|r| r.mismatches.len())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = stop.send(true);
    ship.await.expect("join").expect("ship ok");
    apply.await.expect("join").expect("apply ok");
    dest
}

/// The destination table as the Python reader prints it: one JSON object per row, by id.
async fn destination_rows(dest: &ferry_connectors::postgres::PgConfig) -> Vec<serde_json::Value> {
    let s = dest.connect().await.expect("dest");
    s.query(
        "SELECT json_build_object('id', id, 'name', name, 'qty', qty, 'price', price::text, \
           'ok', ok, 'tags', tags, 'at', (extract(epoch FROM at) * 1000000)::bigint, \
           'day', day::text, 'u', u::text)::text FROM public.items ORDER BY id",
        &[],
    )
    .await
    .expect("rows")
    .iter()
    .map(|r| serde_json::from_str(r.get::<_, &str>(0)).expect("json"))
    .collect()
}

fn read_with_python(args: &[&str]) -> Vec<serde_json::Value> {
    let out = python().args(args).output().expect("run python");
    assert!(
        out.status.success(),
        "read_replicated.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// A key changed at the origin is a new schema version (its envelope names the key), and the
/// registry's BACKWARD check (the local stack's, as Confluent's default) accepts it, after a
/// version published before the envelope named its key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_accepts_a_changed_key() {
    let cfg = crate::support::TestDb::new_config();
    let registry = cfg
        .origin
        .registry
        .clone()
        .expect("ops/ferry.toml names the registries");
    let registry =
        ferry_connectors::registry::SchemaRegistry::new("origin", registry).expect("client");
    let subject = format!("it-key-change-{}-value", std::process::id());
    let table = |key: usize| TableSchema {
        database: "db".into(),
        id: TableId::new("public", "acct"),
        columns: vec![
            column("id", ColumnType::Int4, key == 0),
            column("email", ColumnType::Text, key == 1),
            column("v", ColumnType::Text, false),
        ],
    };
    let by_id = EncodedSchema::new(&table(0)).expect("schema");
    let by_email = EncodedSchema::new(&table(1)).expect("schema");
    assert_ne!(by_id.value_fp, by_email.value_fp);
    // As an older Ferry published it: no key field.
    let mut older: serde_json::Value = serde_json::from_str(&by_id.value_json).expect("json");
    older["fields"].as_array_mut().expect("fields").pop();
    let mut ids = Vec::new();
    for schema in [
        older.to_string(),
        by_id.value_json.clone(),
        by_email.value_json.clone(),
    ] {
        ids.push(
            registry
                .register(&subject, &schema)
                .await
                .expect("a compatible version"),
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "three versions: {ids:?}");
    // The check is real: a column whose values the new version cannot read is refused.
    let mut t = table(1);
    t.columns[2].ty = ColumnType::Int4;
    let refused = EncodedSchema::new(&t).expect("schema").value_json;
    assert!(registry.register(&subject, &refused).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_avro_deserializer_reads_the_replicated_topic() {
    let mut db = crate::support::TestDb::new("confluent").await;
    db.cfg.capture.format = ferry_pipeline::config::Format::Confluent;
    assert!(
        db.cfg.destination.registry.is_some(),
        "ops/ferry.toml names the local registries"
    );
    let dest = replicate(&mut db).await;
    let expected = destination_rows(&dest).await;
    assert_eq!(expected.len(), 300 - 27, "rows left after the deletes");
    let registry = db
        .cfg
        .destination
        .registry
        .as_ref()
        .expect("registry")
        .url
        .clone();
    let topic = ferry_pipeline::topics::table_topic(
        &db.cfg.capture.topic_prefix,
        &TableId::new("public", "items"),
    );
    let got = tokio::task::spawn_blocking(move || {
        read_with_python(&[
            "confluent",
            &ferry_pipeline_dest_bootstrap(),
            &topic,
            &registry,
        ])
    })
    .await
    .expect("python");
    assert_eq!(got, expected);
    // The origin topic is in the Confluent format too, with the origin registry's ids.
    let events = db.events("public.items").await;
    assert!(events.iter().all(|e| e["_fingerprint"]
        .as_str()
        .is_some_and(|f| f.starts_with("schema id "))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastavro_decodes_single_object_records_by_its_own_fingerprint() {
    let mut db = crate::support::TestDb::new("fastavro").await;
    let dest = replicate(&mut db).await;
    let expected = destination_rows(&dest).await;
    let prefix = db.cfg.capture.topic_prefix.clone();
    let topic = ferry_pipeline::topics::table_topic(&prefix, &TableId::new("public", "items"));
    let got = tokio::task::spawn_blocking(move || {
        read_with_python(&[
            "single-object",
            &ferry_pipeline_dest_bootstrap(),
            &topic,
            &ferry_pipeline::topics::schema_topic(&prefix),
        ])
    })
    .await
    .expect("python");
    assert_eq!(got, expected);
}

fn ferry_pipeline_dest_bootstrap() -> String {
    crate::support::TestDb::new_config()
        .destination
        .kafka
        .bootstrap_servers
}

/// A private CA and a server certificate for 127.0.0.1 it signed, made with `openssl`.
fn private_ca(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ferry test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// Ferry's registry client against a real registry behind TLS (a private CA given as
/// `ca_file`) and basic auth, the way hosted registries are reached: registering and reading
/// back work with the right settings; a wrong password is a permanent, named refusal; a
/// certificate nobody vouched for is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_client_speaks_tls_with_a_private_ca_and_basic_auth() {
    use ferry_connectors::registry::{RegistryConfig, SchemaRegistry};
    let cfg = crate::support::TestDb::new_config();
    let upstream = cfg
        .destination
        .registry
        .as_ref()
        .expect("ops/ferry.toml names the local registries")
        .url
        .clone();
    let dir = std::env::temp_dir().join(format!("ferry_tls_{}", crate::support::tag()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (ca, cert, key) = private_ca(&dir);
    let mut proxy = Command::new("python3")
        .arg(repo().join("ops/interop/tls_auth_proxy.py"))
        .args([
            cert.to_str().expect("path"),
            key.to_str().expect("path"),
            "ferry-sr",
            "s3cret/+:x",
            &upstream,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proxy.stdout.take().expect("stdout")),
        &mut port,
    )
    .expect("proxy port");
    let url = format!("https://127.0.0.1:{}/", port.trim());
    let config = |password: &str, ca_file: &std::path::Path| -> RegistryConfig {
        serde_json::from_value(serde_json::json!({
            "url": url, "username": "ferry-sr", "password": password,
            "ca_file": ca_file.to_str().expect("path"), "timeout_ms": 5000
        }))
        .expect("registry config")
    };
    let subject = format!("ferry-tls-{}-value", crate::support::tag());
    let schema = r#"{"type":"record","name":"t","fields":[{"name":"id","type":"long"}]}"#;

    let good = SchemaRegistry::new("destination", config("s3cret/+:x", &ca)).expect("client");
    let id = good
        .register(&subject, schema)
        .await
        .expect("register through TLS and basic auth");
    let back = tokio::task::spawn_blocking(move || good.schema_blocking(id))
        .await
        .expect("task")
        .expect("read back");
    assert!(back.contains("\"id\""), "schema {id} reads back: {back}");

    let wrong = SchemaRegistry::new("destination", config("nope", &ca)).expect("client");
    let e = wrong
        .register(&subject, schema)
        .await
        .expect_err("a wrong password is refused");
    assert!(!e.is_retryable(), "401 is permanent: {e}");
    assert!(e.to_string().contains("401"), "the refusal is named: {e}");

    // A CA that did not sign the server's certificate: the handshake fails.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).expect("dir");
    let (other_ca, _, _) = private_ca(&other);
    let untrusted =
        SchemaRegistry::new("destination", config("s3cret/+:x", &other_ca)).expect("client");
    let e = untrusted
        .register(&subject, schema)
        .await
        .expect_err("an unknown certificate is refused");
    assert!(
        e.status.is_none(),
        "no HTTP answer through a failed handshake: {e}"
    );
    assert!(
        !e.is_retryable(),
        "an untrusted certificate is permanent: {e}"
    );

    let missing = config("s3cret/+:x", &dir.join("no-such.pem"));
    let Err(e) = SchemaRegistry::new("destination", missing) else {
        panic!("a missing ca_file is an error");
    };
    assert!(e.to_string().contains("no-such.pem"), "names the file: {e}");

    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
