//! The command line contract that scripts outside the project rely on.

use crate::helpers::{repo, shared_catalog, spawn_app};
use serde_json::json;
use std::process::Command;

fn frostglass(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_frostglass"))
        .args(args)
        .output()
        .unwrap()
}

fn last_line(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string()
}

#[test]
fn principals_and_grants_added_while_serving_take_effect() {
    let app = spawn_app();
    let data = app.data_dir.to_str().unwrap();
    let out = frostglass(&[
        "principal",
        "add",
        "buyer:late",
        "--role",
        "buyer",
        "--org",
        "late",
        "--region",
        "CN",
        "--data-dir",
        data,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = last_line(&out);
    assert!(key.starts_with("fgk_"));
    // Only the hash is stored.
    let db = std::fs::read(app.data_dir.join("frostglass.db")).unwrap();
    assert!(!db.windows(key.len()).any(|w| w == key.as_bytes()));
    let catalog = shared_catalog().to_str().unwrap().to_string();
    let policies = repo().join("policies");
    let out = frostglass(&[
        "grant",
        "add",
        "--buyer",
        "buyer:late",
        "--dataset",
        "city_health",
        "--purpose",
        "public_health_research",
        "--queries-per-day",
        "5",
        "--data-dir",
        data,
        "--catalog",
        &catalog,
        "--policies",
        policies.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grant = last_line(&out);
    assert!(grant.starts_with("g_"));
    let body = serde_json::to_vec(
        &json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district" }),
    )
    .unwrap();
    let r = app.request("POST", "/v1/queries", Some(&key), Some(&body), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["grant"], grant.as_str());
}

#[test]
fn grants_of_core_data_or_prohibited_purposes_are_refused() {
    let app = spawn_app();
    let data = app.data_dir.to_str().unwrap();
    let catalog = shared_catalog().to_str().unwrap().to_string();
    let policies = repo().join("policies");
    let base = [
        "grant",
        "add",
        "--buyer",
        "buyer:other",
        "--data-dir",
        data,
        "--catalog",
        &catalog,
        "--policies",
        policies.to_str().unwrap(),
    ];
    let mut core = base.to_vec();
    core.extend([
        "--dataset",
        "population_registry",
        "--purpose",
        "public_health_research",
    ]);
    assert!(!frostglass(&core).status.success());
    let mut banned = base.to_vec();
    banned.extend(["--dataset", "city_health", "--purpose", "reidentification"]);
    let out = frostglass(&banned);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prohibited"));
}

#[test]
fn check_reports_each_problem_with_file_and_path() {
    let out = frostglass(&[
        "check",
        "--catalog",
        repo().join("catalog").to_str().unwrap(),
        "--policies",
        repo().join("policies").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    std::fs::create_dir(&catalog).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("catalog/city_health.json")).unwrap(),
    )
    .unwrap();
    manifest["level"] = json!("secret");
    manifest["columns"][3]["class"] = json!("public");
    std::fs::write(catalog.join("broken.json"), manifest.to_string()).unwrap();
    std::fs::write(catalog.join("garbage.json"), "{ nope").unwrap();
    let out = frostglass(&[
        "check",
        "--catalog",
        catalog.to_str().unwrap(),
        "--policies",
        repo().join("policies").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("broken.json: /level:"), "{text}");
    assert!(text.contains("broken.json: /columns/3/class:"), "{text}");
    assert!(text.contains("garbage.json: /: not valid JSON"), "{text}");
}

#[test]
fn demo_data_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    std::fs::create_dir(&catalog).unwrap();
    std::fs::copy(
        repo().join("catalog/enterprise_registry.json"),
        catalog.join("enterprise_registry.json"),
    )
    .unwrap();
    let run = || {
        let out = frostglass(&[
            "demo-data",
            "--catalog",
            catalog.to_str().unwrap(),
            "--scale",
            "0.02",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(catalog.join("data/enterprise_registry.parquet")).unwrap()
    };
    let first = run();
    assert_eq!(first, run());
    let bad = frostglass(&[
        "demo-data",
        "--catalog",
        catalog.to_str().unwrap(),
        "--scale",
        "-1",
    ]);
    assert!(!bad.status.success());
}

#[test]
fn a_revoked_grant_stops_answering_and_is_recorded() {
    let app = spawn_app();
    let data = app.data_dir.to_str().unwrap();
    let sql = json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district" });
    assert_eq!(app.query_as("buyer:acme", sql.clone()).status, 200);
    let out = frostglass(&[
        "grant",
        "revoke",
        &app.grants["buyer:acme"],
        "--data-dir",
        data,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = app.query_as("buyer:acme", sql);
    assert_eq!(r.code().as_deref(), Some("no_grant"));
    let entries = app.admin().entries(0, 1000).unwrap();
    assert!(
        entries
            .iter()
            .any(|(_, body, _)| body.contains(r#""kind":"grant_revoked""#))
    );
    let again = frostglass(&[
        "grant",
        "revoke",
        &app.grants["buyer:acme"],
        "--data-dir",
        data,
    ]);
    assert!(!again.status.success());
}

#[test]
fn keys_rotate_two_at_a_time_and_revoked_ones_stop_working() {
    let app = spawn_app();
    let data = app.data_dir.to_str().unwrap();
    let old = app.key("buyer:acme").to_string();
    let out = frostglass(&["principal", "key-add", "buyer:acme", "--data-dir", data]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = last_line(&out);
    assert_ne!(new, old);
    for key in [&old, &new] {
        assert_eq!(app.get("/v1/grants", Some(key)).status, 200);
    }
    let third = frostglass(&["principal", "key-add", "buyer:acme", "--data-dir", data]);
    assert!(!third.status.success(), "a third active key is refused");
    let out = frostglass(&["principal", "key-revoke", &old, "--data-dir", data]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(app.get("/v1/grants", Some(&old)).status, 401);
    assert_eq!(app.get("/v1/grants", Some(&new)).status, 200);
    let entries = app.admin().entries(0, 1000).unwrap();
    assert!(
        entries
            .iter()
            .any(|(_, b, _)| b.contains(r#""kind":"key_revoked""#))
    );
    assert!(
        !entries.iter().any(|(_, b, _)| b.contains(&old[4..])),
        "no key material in the ledger"
    );
}

#[test]
fn an_owner_measures_a_bound_with_dp_and_pays_for_it_from_the_lifetime_budget() {
    let app = spawn_app();
    let data = app.data_dir.to_str().unwrap();
    let catalog = shared_catalog().to_str().unwrap();
    let measure = |epsilon: &str| {
        frostglass(&[
            "bounds",
            "--dataset",
            "city_health",
            "--quantile",
            "0.99",
            "--epsilon",
            epsilon,
            "--catalog",
            catalog,
            "--data-dir",
            data,
        ])
    };
    // ε = 1: at the test scale (4,000 persons) the top 1% is 40 persons, and
    // ranks that close need little noise to be told apart.
    let out = measure("1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bound: u64 = last_line(&out).parse().unwrap();
    // The 99th percentile of visits per person, within the noise.
    let truth = crate::helpers::truth(
        "city_health",
        "SELECT approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY n) FROM \
         (SELECT person_id, CAST(COUNT(*) AS DOUBLE) AS n FROM city_health GROUP BY person_id)",
    )[0][0]
        .as_f64()
        .unwrap();
    assert!(
        (bound as f64) >= truth * 0.6 && (bound as f64) <= truth * 1.6,
        "bound {bound}, true 99th percentile {truth}"
    );
    // Its ε is charged to the dataset's lifetime budget (after the quality
    // card's 0.5), which every buyer sees.
    let doc = app
        .get("/v1/datasets/city_health", Some(app.key("buyer:acme")))
        .json();
    assert_eq!(doc["lifetime_epsilon"]["spent"], 1.5, "{doc}");
    // More than the budget holds is refused, and charges nothing.
    let out = measure("1000");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lifetime budget"));
    let doc = app
        .get("/v1/datasets/city_health", Some(app.key("buyer:acme")))
        .json();
    assert_eq!(doc["lifetime_epsilon"]["spent"], 1.5);
    // The ledger verifies with the new entry in it.
    let out = frostglass(&["verify", "--data-dir", data]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
