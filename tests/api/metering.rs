//! Metering, quotas of every kind, usage reports and SQL over usage metadata.

use crate::helpers::spawn_app;
use frostglass::store::NewGrant;
use serde_json::json;

const SQL: &str = "SELECT district, COUNT(*) FROM city_health GROUP BY district";

#[test]
fn rows_and_bytes_quotas_are_enforced_before_reading() {
    let app = spawn_app();
    let store = app.admin();
    // city_health has 20,000 rows at the test scale: two queries fit in 45,000 rows.
    let rows_grant = store
        .add_grant(&NewGrant {
            buyer: "buyer:other".into(),
            datasets: vec!["city_health".into()],
            purpose: "public_health_research".into(),
            rows_per_day: Some(45_000),
            ..NewGrant::default()
        })
        .unwrap();
    let ask = |grant: &str| app.query_as("buyer:other", json!({ "sql": SQL, "grant": grant }));
    assert_eq!(ask(&rows_grant).status, 200);
    assert_eq!(ask(&rows_grant).status, 200);
    let r = ask(&rows_grant);
    assert_eq!(r.status, 429);
    assert!(r.text().contains("rows_per_day"), "{}", r.text());

    let bytes_grant = store
        .add_grant(&NewGrant {
            buyer: "buyer:other".into(),
            datasets: vec!["city_health".into()],
            purpose: "urban_planning".into(),
            bytes_per_day: Some(1),
            ..NewGrant::default()
        })
        .unwrap();
    let r = ask(&bytes_grant);
    assert_eq!(r.status, 429);
    assert!(r.text().contains("bytes_per_day"), "{}", r.text());
    let grants = app.get("/v1/grants", Some(app.key("buyer:other"))).json();
    let listed = grants["grants"].as_array().unwrap();
    let rows_entry = listed
        .iter()
        .find(|g| g["grant"]["id"] == rows_grant.as_str())
        .unwrap();
    assert_eq!(rows_entry["used_today"]["rows"], 40_000);
    assert_eq!(rows_entry["remaining_today"]["rows"], 5_000);
}

#[test]
fn usage_reports_follow_roles() {
    let app = spawn_app();
    app.query(SQL);
    app.query(SQL);
    app.query("SELECT name FROM city_health");
    app.query("SELECT industry, COUNT(*) FROM enterprise_registry GROUP BY industry");
    app.query_as("buyer:abroad", json!({ "sql": SQL }));

    let mine = app.get("/v1/usage", Some(app.key("buyer:acme"))).json();
    let rows = mine["usage"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["queries_answered"], 3);
    assert_eq!(rows[0]["queries_refused"], 1);
    // city_health: 0.54 for the rows and query, twice, plus 1.00 x 0.5 ε
    // once (asked again, the answer comes from the cache and spends no ε);
    // enterprise_registry: 0.00 + 0.10 x 0.005 = 0.0005
    assert_eq!(rows[0]["charge"], "1.5805");
    assert_eq!(rows[0]["rows_scanned"], 20_000 * 2 + 5_000);

    // The hospital sees use of city_health by both buyers, not the enterprise query alone.
    let owner = app.get("/v1/usage", Some(app.key("owner:hospital"))).json();
    let total: u64 = owner["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["queries_answered"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 3);
}

#[test]
fn auditors_run_sql_over_usage_metadata_only() {
    let app = spawn_app();
    app.query(SQL);
    app.query("SELECT name FROM city_health");
    let auditor = app.key("auditor:cac");
    let ask = |key: &str, sql: &str| {
        let body = serde_json::to_vec(&json!({ "sql": sql })).unwrap();
        app.request("POST", "/v1/audit/sql", Some(key), Some(&body), None)
    };
    let r = ask(
        auditor,
        "SELECT decision, rule, COUNT(*) AS n FROM usage GROUP BY decision, rule ORDER BY decision",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rows = r.json()["rows"].clone();
    assert_eq!(
        rows,
        json!([
            ["answered", null, 1],
            ["refused", "aggregation_required", 1]
        ])
    );
    // A bare count (from the counter), pushed filters and a limit agree with the rows.
    let count = |sql: &str| ask(auditor, sql).json()["rows"][0][0].clone();
    assert_eq!(count("SELECT COUNT(*) FROM usage"), json!(2));
    assert_eq!(
        count("SELECT COUNT(*) FROM usage WHERE decision = 'refused'"),
        json!(1)
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM usage WHERE principal = 'buyer:acme' AND ledger_index >= 0"),
        json!(2)
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM usage WHERE decision = 'nothing'"),
        json!(0)
    );
    let first = ask(
        auditor,
        "SELECT decision FROM usage ORDER BY ledger_index LIMIT 1",
    );
    assert_eq!(first.json()["rows"], json!([["answered"]]));
    // Datasets are not reachable from the audit session.
    let r = ask(auditor, "SELECT COUNT(*) FROM city_health");
    assert_eq!(r.code().as_deref(), Some("sql_error"), "{}", r.text());
    let r = ask(auditor, "COPY (SELECT 1) TO '/tmp/x.csv'");
    assert_eq!(r.code().as_deref(), Some("statement_not_allowed"));
    let r = ask(app.key("buyer:acme"), "SELECT COUNT(*) FROM usage");
    assert_eq!(r.status, 403);
}

#[test]
fn a_free_tier_covers_a_grants_first_queries_of_the_month() {
    let catalog = crate::helpers::catalog_with(|m| {
        if m["id"] == "enterprise_registry" {
            m["pricing"] = json!({ "currency": "CNY", "per_query": "1.00",
                "per_million_rows_scanned": "0.00", "free_queries_per_month": 2 });
        }
    });
    let app = crate::helpers::spawn_app_with(crate::helpers::Options {
        catalog: Some(catalog),
        ..Default::default()
    });
    let charge = |n: u32| {
        let sql = format!(
            "SELECT industry, COUNT(*) FROM enterprise_registry WHERE employees > {n} GROUP BY industry"
        );
        let r = app.query(&sql);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["usage"]["charge"].as_str().unwrap().to_string()
    };
    assert_eq!(charge(1), "0.00");
    assert_eq!(charge(2), "0.00");
    // The third answered query this month pays the list price.
    assert_eq!(charge(3), "1.00");
    // A dry run estimates at list price, before any free tier.
    let dry = app.query_as(
        "buyer:acme",
        json!({ "sql": "SELECT industry, COUNT(*) FROM enterprise_registry GROUP BY industry", "dry_run": true }),
    );
    assert_eq!(dry.json()["estimated_usage"]["charge"], "1.00");
}
