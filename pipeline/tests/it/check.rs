//! `ferry check` reports a misconfigured Postgres (wal_level = replica) and exits non-zero.

use std::process::Command;

use crate::support::repo;

#[test]
fn check_reports_wal_level_replica() {
    let dir = std::env::temp_dir().join(format!("ferry-scratch-{}", crate::support::tag()));
    let port = 20_000 + (rand::random::<u16>() % 20_000);
    let scratch = repo().join("ops/pg-scratch");
    let start = Command::new(&scratch)
        .args([
            "start",
            &dir.to_string_lossy(),
            &port.to_string(),
            "wal_level=replica",
        ])
        .output()
        .expect("run ops/pg-scratch");
    assert!(
        start.status.success(),
        "pg-scratch failed: {}",
        String::from_utf8_lossy(&start.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "--config",
            &repo().join("ops/ferry.toml").to_string_lossy(),
            "check",
        ])
        .env("FERRY__ORIGIN__POSTGRES__PORT", port.to_string())
        .env("FERRY__ORIGIN__POSTGRES__DATABASE", "postgres")
        .output()
        .expect("run ferry check");
    let _ = Command::new(&scratch)
        .args(["stop", &dir.to_string_lossy()])
        .output();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("wal_level"))
        .unwrap_or_else(|| panic!("no wal_level line: {stdout}"));
    assert!(
        line.starts_with("FAIL") && line.contains("replica") && line.contains("ALTER SYSTEM"),
        "{line}"
    );
}

#[test]
fn bad_config_names_the_field_and_exits_3() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "--config",
            &repo().join("ops/ferry.toml").to_string_lossy(),
            "check",
        ])
        .env("FERRY__CAPTURE__PARTITIONS", "0")
        .output()
        .expect("run ferry");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("capture.partitions"));
}
