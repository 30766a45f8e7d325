//! Admin changes and their ledger entries commit together: a crash between
//! the store write and the commit leaves neither.

use crate::helpers::{PURPOSE, repo, shared_catalog};
use rusqlite::Connection;

/// Runs the CLI; with `failpoint`, the process aborts after the change and
/// its entry are written but before they commit.
fn frostglass(args: &[&str], failpoint: Option<&str>) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_frostglass"));
    command.args(args);
    if let Some(point) = failpoint {
        command.env("FROSTGLASS_FAILPOINT", point);
    }
    command.output().unwrap()
}

fn count(db: &Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn a_crash_before_commit_leaves_neither_the_change_nor_its_entry() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let catalog = shared_catalog().to_str().unwrap().to_string();
    let policies = repo().join("policies").to_str().unwrap().to_string();
    let add_buyer = [
        "principal",
        "add",
        "buyer:atomic",
        "--role",
        "buyer",
        "--data-dir",
        &data,
    ];
    let add_grant = [
        "grant",
        "add",
        "--buyer",
        "buyer:atomic",
        "--dataset",
        "city_health",
        "--purpose",
        PURPOSE,
        "--data-dir",
        &data,
        "--catalog",
        &catalog,
        "--policies",
        &policies,
    ];

    let crashed = frostglass(&add_buyer, Some("ledger_before_commit"));
    assert!(!crashed.status.success(), "the failpoint did not fire");
    let db = Connection::open(dir.path().join("frostglass.db")).unwrap();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM principals"), 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM api_keys"), 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM usage_log"), 0);

    let added = frostglass(&add_buyer, None);
    assert!(added.status.success(), "{added:?}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM principals"), 1);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM usage_log WHERE kind = 'principal_added'"
        ),
        1
    );

    let crashed = frostglass(&add_grant, Some("ledger_before_commit"));
    assert!(!crashed.status.success());
    assert_eq!(count(&db, "SELECT COUNT(*) FROM grants"), 0);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM usage_log WHERE kind = 'grant_made'"
        ),
        0
    );

    let granted = frostglass(&add_grant, None);
    assert!(granted.status.success(), "{granted:?}");
    let id = String::from_utf8_lossy(&granted.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM grants"), 1);
    let recorded: String = db
        .query_row(
            "SELECT body FROM usage_log WHERE kind = 'grant_made'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(recorded.contains(&id), "{recorded}");

    // The ledger still verifies: nothing half-written was left behind.
    let verified = frostglass(&["verify", "--data-dir", &data], None);
    assert!(verified.status.success(), "{verified:?}");
}
