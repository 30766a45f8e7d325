//! The usage ledger: verification locally and against a running server,
//! tampering of every kind caught, receipts that survive a SIGKILL, and
//! quotas that neither a race nor a crash can overspend.

use crate::helpers::{Options, Server, cli, spawn_app, spawn_app_with};
use frostglass::ledger::merkle;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const SQL: &str = "SELECT district, COUNT(*) FROM city_health GROUP BY district";

fn verify_local(dir: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["verify", "--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, out, err) = cli(&args);
    (ok, format!("{out}{err}"))
}

/// A copy of a data directory, taken while nothing writes.
fn snapshot(from: &Path) -> PathBuf {
    let to = tempfile::tempdir().unwrap().keep();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    to
}

fn hash(value: &Value) -> [u8; 32] {
    hex::decode(value.as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

fn hashes(value: &Value) -> Vec<[u8; 32]> {
    value.as_array().unwrap().iter().map(hash).collect()
}

fn db(dir: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(dir.join("frostglass.db")).unwrap();
    // A forger does not respect our constraints.
    c.pragma_update(None, "foreign_keys", "OFF").unwrap();
    c
}

#[test]
fn the_ledger_verifies_locally_and_remotely_with_receipts() {
    let app = spawn_app();
    let first = app.query(SQL);
    assert_eq!(first.status, 200);
    app.query("SELECT name FROM city_health");
    let work = tempfile::tempdir().unwrap();
    let receipt = work.path().join("response.json");
    std::fs::write(&receipt, first.text()).unwrap();
    let state = work.path().join("state.json");

    let (ok, out) = verify_local(&app.data_dir, &["--receipt", receipt.to_str().unwrap()]);
    assert!(ok, "{out}");
    // Five principals and two grants of the harness, five dataset
    // registrations and their five quality cards, two queries.
    assert!(out.starts_with("ok: 19 entries"), "{out}");

    let auditor = app.key("auditor:cac").to_string();
    let remote = |extra: &[&str]| {
        let mut args = vec![
            "verify",
            "--url",
            &app.base,
            "--key",
            &auditor,
            "--state",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let (ok, out, err) = remote(&["--receipt", receipt.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    // More entries; the second run checks a consistency proof from the head it saw.
    for _ in 0..3 {
        app.query(SQL);
    }
    let (ok, out, err) = remote(&[]);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("ok: 22 entries"), "{out}");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(saved["head"]["tree_size"], 22);

    // A forged receipt fails.
    let mut forged: Value = first.json();
    forged["receipt"]["entry_hash"] = json!(hex::encode(merkle::leaf_hash(b"forged")));
    std::fs::write(&receipt, forged.to_string()).unwrap();
    let (ok, out) = verify_local(&app.data_dir, &["--receipt", receipt.to_str().unwrap()]);
    assert!(!ok && out.contains("broken at index 17"), "{out}");

    // Only auditors read the ledger.
    let r = app.get("/v1/audit/head", Some(app.key("buyer:acme")));
    assert_eq!(r.status, 403);
    // A well-formed request for a tree or entry the ledger does not hold is
    // a 404 (a state), not a malformed request; out of the documented range is.
    let proof = app.get("/v1/audit/proof/inclusion?index=99&size=3", Some(&auditor));
    assert_eq!(proof.status, 404);
    assert_eq!(proof.code().as_deref(), Some("not_found"));
    let beyond = app.get(
        "/v1/audit/proof/consistency?from=0&to=9223372036854775807",
        Some(&auditor),
    );
    assert_eq!(beyond.status, 404);
    let huge = app.get(
        "/v1/audit/entries?limit=9223372036854775808",
        Some(&auditor),
    );
    assert_eq!(huge.code().as_deref(), Some("invalid_request"));
    let too_many = app.get("/v1/audit/entries?limit=1001", Some(&auditor));
    assert_eq!(too_many.code().as_deref(), Some("invalid_request"));
    let blank = app.request(
        "POST",
        "/v1/audit/sql",
        Some(&auditor),
        Some(br#"{"sql": " "}"#),
        None,
    );
    assert_eq!(blank.code().as_deref(), Some("invalid_request"));
    let bad = app.get("/v1/audit/proof/inclusion?index=x", Some(&auditor));
    assert_eq!(bad.code().as_deref(), Some("invalid_request"));
}

#[test]
fn inclusion_and_consistency_proofs_from_the_api_verify() {
    let app = spawn_app();
    let r = app.query(SQL);
    let receipt = &r.json()["receipt"];
    app.query(SQL);
    let auditor = app.key("auditor:cac");
    let head = app.get("/v1/audit/head", Some(auditor)).json();
    let size = head["tree_size"].as_u64().unwrap();
    assert_eq!(size, 19);
    let root = hash(&head["root_hash"]);
    let index = receipt["ledger_index"].as_u64().unwrap();
    let leaf = hash(&receipt["entry_hash"]);
    let proof = app
        .get(
            &format!("/v1/audit/proof/inclusion?index={index}&size={size}"),
            Some(auditor),
        )
        .json();
    let path = hashes(&proof["proof"]);
    assert!(merkle::verify_inclusion(&leaf, index, size, &path, &root));
    let old_root = hash(&receipt["root_hash"]);
    let old_size = receipt["tree_size"].as_u64().unwrap();
    let c = app
        .get(
            &format!("/v1/audit/proof/consistency?from={old_size}&to={size}"),
            Some(auditor),
        )
        .json();
    let cpath = hashes(&c["proof"]);
    assert!(merkle::verify_consistency(
        old_size, size, &old_root, &root, &cpath
    ));
    let key = app.get("/v1/audit/public-key", Some(auditor)).json();
    let head: frostglass::ledger::SignedHead =
        serde_json::from_value(app.get("/v1/audit/head", Some(auditor)).json()).unwrap();
    assert!(head.verify(&hex::decode(key["public_key"].as_str().unwrap()).unwrap()));
    let entries = app
        .get("/v1/audit/entries?from=5&limit=1", Some(auditor))
        .json();
    assert_eq!(entries["entries"].as_array().unwrap().len(), 1);
    assert_eq!(entries["next"], 6);
}

#[test]
fn every_kind_of_tampering_is_caught() {
    let app = spawn_app();
    for sql in [SQL, "SELECT name FROM city_health", SQL, SQL] {
        app.query(sql);
    }
    let base = snapshot(&app.data_dir);
    let state = base.join("verifier-state.json");
    let (ok, out) = verify_local(&base, &["--state", state.to_str().unwrap()]);
    assert!(ok, "{out}");
    let n: i64 = db(&base)
        .query_row("SELECT COUNT(*) FROM usage_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 21);

    let tampered = |name: &str, tamper: &dyn Fn(&Path), expect: &str| {
        let copy = snapshot(&base);
        tamper(&copy);
        let (ok, out) = verify_local(&copy, &["--state", state.to_str().unwrap()]);
        assert!(!ok, "{name}: verify passed: {out}");
        // The server refuses to start on it too, except where only a verifier
        // that remembers an earlier head can tell (a new key, a cut with its heads).
        let beside_the_tree = name.contains("column") || name.contains("roll-up");
        if !(name.contains("another key") || name.contains("and heads") || beside_the_tree) {
            assert!(
                frostglass::ledger::Writer::open(&copy).is_err(),
                "{name}: the ledger opened"
            );
        }
        assert!(
            out.contains(expect),
            "{name}: expected '{expect}' in: {out}"
        );
    };
    tampered(
        "flipped byte",
        &|d| {
            db(d)
                .execute(
                    "UPDATE usage_log SET body = replace(body, 'refused', 'refusex') WHERE idx = 18",
                    [],
                )
                .unwrap();
        },
        "broken at index 18",
    );
    tampered(
        "flipped byte with its leaf hash recomputed",
        &|d| {
            let c = db(d);
            let body: String = c
                .query_row("SELECT body FROM usage_log WHERE idx = 18", [], |r| {
                    r.get(0)
                })
                .unwrap();
            // A field no typed column repeats: only the signed heads can tell.
            let body = body.replace("\"sql_sha256\":\"", "\"sql_sha256\":\"0");
            c.execute(
                "UPDATE usage_log SET body = ?1, leaf_hash = ?2 WHERE idx = 18",
                rusqlite::params![body, hex::encode(merkle::leaf_hash(body.as_bytes()))],
            )
            .unwrap();
        },
        "differ from what the head",
    );
    tampered(
        "dropped entry",
        &|d| {
            db(d)
                .execute("DELETE FROM usage_log WHERE idx = 10", [])
                .unwrap();
        },
        "broken at index 10",
    );
    tampered(
        "reordered entries",
        &|d| {
            let c = db(d);
            c.execute_batch(
                "UPDATE usage_log SET idx = -1 WHERE idx = 18; UPDATE usage_log SET idx = 18 WHERE idx = 19; UPDATE usage_log SET idx = 19 WHERE idx = -1;",
            )
            .unwrap();
        },
        "broken at index",
    );
    tampered(
        "truncated tail",
        &|d| {
            db(d)
                .execute("DELETE FROM usage_log WHERE idx >= 19", [])
                .unwrap();
        },
        "truncated",
    );
    tampered(
        "truncated tail and heads",
        &|d| {
            let c = db(d);
            c.execute("DELETE FROM usage_log WHERE idx >= 19", [])
                .unwrap();
            c.execute("DELETE FROM tree_heads WHERE tree_size > 19", [])
                .unwrap();
        },
        "shrank",
    );
    // Quotas and budgets are read from the typed columns and roll-ups beside
    // the entries: changing one is tampering too (caught by verify's full
    // pass; start-up checks the tree, not every column).
    tampered(
        "a decision column changed beside its entry",
        &|d| {
            db(d)
                .execute(
                    "UPDATE usage_log SET decision = 'refused' WHERE idx = 17",
                    [],
                )
                .unwrap();
        },
        "stored column decision does not match",
    );
    tampered(
        "a created_at column changed beside its entry",
        &|d| {
            db(d)
                .execute(
                    "UPDATE usage_log SET created_at = '1999-01-01T00:00:00.000Z' WHERE idx = 17",
                    [],
                )
                .unwrap();
        },
        "stored column created_at does not match",
    );
    tampered(
        "a flipped privacy budget roll-up",
        &|d| {
            db(d)
                .execute(
                    "UPDATE rollup_budget SET epsilon = 0 WHERE budget LIKE 'grant:%'",
                    [],
                )
                .unwrap();
        },
        "privacy budget roll-up",
    );
    tampered(
        "a usage row column changed beside its entry",
        &|d| {
            db(d)
                .execute(
                    "UPDATE query_usage SET decision = 'answered' WHERE ledger_index = 18",
                    [],
                )
                .unwrap();
        },
        "stored usage row does not match",
    );
    tampered(
        "a flipped usage report roll-up",
        &|d| {
            db(d)
                .execute("UPDATE rollup_usage SET refused = refused + 1", [])
                .unwrap();
        },
        "usage roll-up",
    );
    tampered(
        "a flipped daily usage roll-up",
        &|d| {
            db(d)
                .execute("UPDATE rollup_daily SET queries = queries - 1", [])
                .unwrap();
        },
        "daily usage roll-up",
    );
    tampered(
        "history rewritten and re-signed with another key",
        &|d| {
            let c = db(d);
            let bodies: Vec<String> = {
                let mut s = c
                    .prepare("SELECT body FROM usage_log ORDER BY idx")
                    .unwrap();
                s.query_map([], |r| r.get(0))
                    .unwrap()
                    .map(|b| b.unwrap())
                    .collect()
            };
            let forger_dir = tempfile::tempdir().unwrap();
            let forger = frostglass::ledger::Signer::load_or_create(forger_dir.path()).unwrap();
            let mut leaves = Vec::new();
            c.execute("DELETE FROM tree_heads", []).unwrap();
            for (i, body) in bodies.iter().enumerate() {
                let body = body.replace("refused", "answered");
                let leaf = merkle::leaf_hash(body.as_bytes());
                leaves.push(leaf);
                c.execute(
                    "UPDATE usage_log SET body = ?1, leaf_hash = ?2 WHERE idx = ?3",
                    rusqlite::params![body, hex::encode(leaf), i as i64],
                )
                .unwrap();
                let head = forger.sign_head(leaves.len() as u64, &merkle::root(&leaves));
                c.execute(
                    "INSERT INTO tree_heads (tree_size, timestamp_ms, root_hash, signature, key_id) VALUES (?1, ?2, ?3, ?4, ?5)",
                    rusqlite::params![head.tree_size as i64, head.timestamp_ms as i64, head.root_hash, head.signature, head.key_id],
                )
                .unwrap();
            }
            std::fs::write(
                d.join("ledger-ed25519.pub"),
                hex::encode(forger.public_key()),
            )
            .unwrap();
        },
        "signing key changed",
    );
    // Without tampering the pinned state still verifies.
    let (ok, out) = verify_local(&snapshot(&base), &["--state", state.to_str().unwrap()]);
    assert!(ok, "{out}");
}

#[test]
fn a_race_on_the_last_query_of_a_quota_lets_exactly_the_quota_through() {
    let app = spawn_app_with(Options {
        acme_queries_per_day: Some(5),
        ..Options::default()
    });
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12).map(|_| s.spawn(|| app.query(SQL).status)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        7,
        "{statuses:?}"
    );
}

#[test]
fn receipts_survive_sigkill_and_quotas_are_not_double_spent() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap().to_string();
    let (ok, out, err) = cli(&[
        "principal",
        "add",
        "buyer:crash",
        "--role",
        "buyer",
        "--data-dir",
        &data_arg,
    ]);
    assert!(ok, "{err}");
    let key = out.lines().last().unwrap().trim().to_string();
    let catalog = crate::helpers::shared_catalog()
        .to_str()
        .unwrap()
        .to_string();
    let policies = crate::helpers::repo()
        .join("policies")
        .to_str()
        .unwrap()
        .to_string();
    let (ok, _, err) = cli(&[
        "grant",
        "add",
        "--buyer",
        "buyer:crash",
        "--dataset",
        "city_health",
        "--purpose",
        "public_health_research",
        "--queries-per-day",
        "400",
        "--data-dir",
        &data_arg,
        "--catalog",
        &catalog,
        "--policies",
        &policies,
    ]);
    assert!(ok, "{err}");
    let log = dir.path().join("server.log");

    let fire = |base: &str, stop_after: std::time::Duration| -> Vec<Value> {
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let key = key.clone();
                    s.spawn(move || {
                        let agent: ureq::Agent = ureq::Agent::config_builder()
                            .http_status_as_error(false)
                            .timeout_global(Some(std::time::Duration::from_secs(20)))
                            .build()
                            .into();
                        let mut receipts = Vec::new();
                        while started.elapsed() < stop_after {
                            let Ok(mut resp) = agent
                                .post(format!("{base}/v1/queries"))
                                .header("Authorization", &format!("Bearer {key}"))
                                .send_json(json!({ "sql": SQL }))
                            else {
                                break;
                            };
                            let doc: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
                            match (resp.status().as_u16(), doc["error"]["code"].as_str()) {
                                (200, _) => receipts.push(doc["receipt"].clone()),
                                (_, Some("rate_limited")) => {
                                    std::thread::sleep(std::time::Duration::from_millis(50))
                                }
                                (_, Some("quota_exceeded")) => break,
                                _ => {}
                            }
                        }
                        receipts
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    };

    let server = Server::start(&data, &log, &[]);
    let base = server.base.clone();
    let first = std::thread::scope(|s| {
        let f = s.spawn(|| fire(&base, std::time::Duration::from_secs(30)));
        std::thread::sleep(std::time::Duration::from_millis(1000));
        server.kill();
        f.join().unwrap()
    });
    assert!(!first.is_empty(), "no query was answered before the kill");
    assert!(first.len() < 400, "the kill came too late to matter");

    // Every receipt a client received is in the ledger after restart.
    let server = Server::start(&data, &log, &[]);
    let c = db(&data);
    for receipt in &first {
        let index = receipt["ledger_index"].as_i64().unwrap();
        let leaf: String = c
            .query_row(
                "SELECT leaf_hash FROM usage_log WHERE idx = ?1",
                [index],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(leaf, receipt["entry_hash"].as_str().unwrap());
    }
    let (ok, out) = verify_local(&data, &[]);
    assert!(ok, "{out}");
    // The quota continues from what the ledger holds: 400 in all, never more.
    let second = fire(&server.base, std::time::Duration::from_secs(60));
    let answered: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM usage_log WHERE decision = 'answered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(answered, 400);
    assert!(first.len() + second.len() <= 400);
    drop(server);
}
