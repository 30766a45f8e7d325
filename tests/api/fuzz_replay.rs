//! The fuzz targets' seed corpus and every saved crash, replayed through
//! the same entry points on stable Rust (see `scripts/fuzz.sh`).

use frostglass::fuzzing;
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|d| std::fs::read_dir(fuzz.join(d).join(target)).ok())
        .flatten()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn code(sql: &str) -> Result<(), String> {
    fuzzing::sql_gate(sql.as_bytes())
        .expect("UTF-8")
        .map_err(|e| e.code().to_string())
}

#[test]
fn the_sql_gate_returns_on_every_saved_input_and_still_tells_accepted_from_refused() {
    let files = inputs("sql_gate");
    assert!(files.len() >= 20, "the seed corpus is there");
    for f in files {
        // Refused or accepted; never an internal error (a 500).
        if let Some(Err(e)) = fuzzing::sql_gate(&std::fs::read(&f).unwrap()) {
            assert_ne!(e.code(), "internal", "{}: {e}", f.display());
        }
    }
    // The harness runs the real gate: it accepts a safe aggregate and
    // refuses what the policy forbids, each with its code.
    assert_eq!(
        code("SELECT district, COUNT(*) FROM city_health GROUP BY district"),
        Ok(())
    );
    assert_eq!(
        code("SELECT name FROM city_health"),
        Err("policy_violation".into())
    );
    assert_eq!(code("SELECT * FROM nowhere"), Err("unknown_table".into()));
    assert_eq!(
        code(&format!("SELECT {}1{}", "(".repeat(500), ")".repeat(500))),
        Err("sql_error".into())
    );
}

#[test]
fn the_validators_and_ledger_decoders_return_on_every_saved_input() {
    let (validators, records) = (inputs("validators"), inputs("ledger_record"));
    assert!(validators.len() >= 5 && records.len() >= 5);
    for f in validators {
        fuzzing::validators(&std::fs::read(&f).unwrap());
    }
    for f in records {
        fuzzing::ledger_record(&std::fs::read(&f).unwrap());
    }
}
