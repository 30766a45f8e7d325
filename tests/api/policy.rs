//! Refusals, table-driven: each row is an attack or a forbidden statement,
//! with the code (and rule) it must be refused with; near misses must pass.

use crate::helpers::{Options, spawn_app, spawn_app_with};
use frostglass::store::NewGrant;
use serde_json::json;

pub const REFUSED: &[(&str, &str, Option<&str>)] = &[
    // Raw rows and identifiers.
    (
        "SELECT * FROM city_health",
        "policy_violation",
        Some("aggregation_required"),
    ),
    (
        "SELECT district FROM city_health",
        "policy_violation",
        Some("aggregation_required"),
    ),
    // No column of the table, but one row per row of it: its exact size.
    // (Found by the grammar property test, as a 500.)
    (
        "SELECT abs(NULL) FROM telecom_usage",
        "policy_violation",
        Some("aggregation_required"),
    ),
    (
        "SELECT 1 FROM power_grid LIMIT 5",
        "policy_violation",
        Some("aggregation_required"),
    ),
    (
        "SELECT name, COUNT(*) FROM city_health GROUP BY name",
        "policy_violation",
        Some("identifier_in_group_by"),
    ),
    (
        "SELECT COUNT(*) FROM city_health WHERE id_card = '110101199001011234'",
        "policy_violation",
        Some("identifier_in_filter"),
    ),
    // The same violation hidden in a CTE, a subquery, a UNION branch, a CASE, a cast, a join condition, HAVING.
    (
        "WITH t AS (SELECT name AS n FROM city_health) SELECT n, COUNT(*) FROM t GROUP BY n",
        "policy_violation",
        Some("identifier_in_group_by"),
    ),
    (
        "SELECT COUNT(*) FROM (SELECT * FROM city_health WHERE name = 'x') s",
        "policy_violation",
        Some("identifier_in_filter"),
    ),
    (
        "SELECT d, COUNT(*) FROM (SELECT district AS d FROM city_health UNION ALL SELECT name FROM city_health) u GROUP BY d",
        "policy_violation",
        Some("identifier_in_group_by"),
    ),
    (
        "SELECT SUM(CASE WHEN id_card LIKE '11%' THEN 1 ELSE 0 END) FROM city_health",
        "policy_violation",
        Some("identifier_in_filter"),
    ),
    (
        "SELECT CAST(person_id AS VARCHAR) AS p, COUNT(*) FROM city_health GROUP BY p",
        "policy_violation",
        Some("identifier_in_group_by"),
    ),
    (
        "SELECT c.district, COUNT(*) FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id AND c.name = 'x' GROUP BY c.district",
        "policy_violation",
        Some("identifier_in_filter"),
    ),
    (
        "SELECT district, COUNT(*) FROM city_health GROUP BY district HAVING MAX(name) > 'M'",
        "policy_violation",
        Some("aggregate_not_allowed"),
    ),
    // Identifiers extracted through functions; a tracker built with OR.
    (
        "SELECT substr(name, 1, 1) AS initial, COUNT(*) FROM city_health GROUP BY initial",
        "policy_violation",
        Some("prohibited_function"),
    ),
    (
        "SELECT length(id_card) AS l, COUNT(*) FROM city_health GROUP BY l",
        "policy_violation",
        Some("function_not_allowed"),
    ),
    (
        "SELECT COUNT(*) FROM city_health WHERE district = 'haidian' OR name = 'Wang Wei'",
        "policy_violation",
        Some("identifier_in_filter"),
    ),
    // Sensitive values only inside allowed aggregates.
    (
        "SELECT diagnosis, COUNT(*) FROM city_health GROUP BY diagnosis",
        "policy_violation",
        Some("sensitive_in_group_by"),
    ),
    (
        "SELECT district, MAX(cost) FROM city_health GROUP BY district",
        "policy_violation",
        Some("aggregate_not_allowed"),
    ),
    (
        "SELECT district, COUNT(*) FROM city_health WHERE cost > 40000 GROUP BY district",
        "policy_violation",
        Some("sensitive_in_filter"),
    ),
    (
        "SELECT district, SUM(CASE WHEN cost > 40000 THEN 1 ELSE 0 END) FROM city_health GROUP BY district",
        "policy_violation",
        Some("sensitive_in_filter"),
    ),
    // Query-wide rules.
    (
        "SELECT district, age, gender, COUNT(*) FROM city_health GROUP BY district, age, gender",
        "policy_violation",
        Some("prohibited_combination"),
    ),
    (
        "SELECT COUNT(*) FROM city_health WHERE consented_purposes LIKE '%marketing%'",
        "policy_violation",
        Some("consent_column_reserved"),
    ),
    (
        "SELECT COUNT(*) FROM enterprise_registry WHERE district IN (SELECT district FROM city_health WHERE age > 99)",
        "policy_violation",
        Some("subquery_on_guarded_data"),
    ),
    (
        "SELECT district, COUNT(*) FROM population_registry GROUP BY district",
        "policy_violation",
        Some("core_data_denied"),
    ),
    (
        "SELECT COUNT(*) FROM city_health c JOIN population_registry p ON c.person_id = p.person_id",
        "policy_violation",
        Some("core_data_denied"),
    ),
    (
        "SELECT district, rank() OVER (ORDER BY age) FROM city_health",
        "policy_violation",
        Some("window_over_guarded_data"),
    ),
    (
        "SELECT COUNT(*) FROM (SELECT DISTINCT district, age FROM city_health) d",
        "policy_violation",
        Some("distinct_over_guarded_data"),
    ),
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r",
        "policy_violation",
        Some("recursive_query"),
    ),
    (
        "SELECT random() AS x",
        "policy_violation",
        Some("prohibited_function"),
    ),
    // A manifest narrows what its class allows: visit_date only through date functions, cost only summed or averaged.
    (
        "SELECT to_char(visit_date, '%d') AS d, COUNT(*) FROM city_health GROUP BY d",
        "policy_violation",
        Some("function_not_allowed"),
    ),
    (
        "SELECT district, COUNT(cost) FROM city_health GROUP BY district",
        "policy_violation",
        Some("aggregate_not_allowed"),
    ),
    (
        "SELECT c.age, c.gender, t.district, COUNT(*) FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id WHERE c.district = 'haidian' GROUP BY c.age, c.gender, t.district",
        "policy_violation",
        Some("too_many_quasi_identifiers"),
    ),
    // Prohibited dataset pairs.
    (
        "SELECT t.district, COUNT(*) FROM telecom_usage t JOIN power_grid p ON t.district = p.district GROUP BY t.district",
        "policy_violation",
        Some("prohibited_join"),
    ),
    // Statements and tables outside the sandbox.
    (
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
        "statement_not_allowed",
        None,
    ),
    (
        "COPY (SELECT 1) TO '/tmp/fg-test-copy.csv'",
        "statement_not_allowed",
        None,
    ),
    (
        "SET datafusion.catalog.information_schema = true",
        "statement_not_allowed",
        None,
    ),
    (
        "EXPLAIN ANALYZE SELECT district, COUNT(*) FROM city_health GROUP BY district",
        "statement_not_allowed",
        None,
    ),
    ("EXPLAIN SELECT 1", "statement_not_allowed", None),
    ("DESCRIBE city_health", "statement_not_allowed", None),
    (
        "INSERT INTO city_health VALUES (1)",
        "statement_not_allowed",
        None,
    ),
    ("DROP TABLE city_health", "statement_not_allowed", None),
    ("SELECT 1; SELECT 2", "statement_not_allowed", None),
    ("SELECT * FROM '/etc/passwd'", "unknown_table", None),
    (
        "SELECT * FROM information_schema.tables",
        "unknown_table",
        None,
    ),
    (
        "SELECT * FROM generate_series(1, 10)",
        "unknown_table",
        None,
    ),
    ("SELECT * FROM range(1000000000)", "unknown_table", None),
    ("SELEC district FROM", "sql_error", None),
    ("SELECT nope FROM city_health", "sql_error", None),
];

/// Near misses: legitimate neighbours of the attacks above.
pub const ALLOWED: &[&str] = &[
    "SELECT district, COUNT(*) FROM city_health GROUP BY district",
    "WITH t AS (SELECT district AS d FROM city_health) SELECT d, COUNT(*) FROM t GROUP BY d",
    "SELECT COUNT(DISTINCT person_id) FROM city_health",
    "SELECT district, SUM(cost), AVG(cost) FROM city_health GROUP BY district",
    "SELECT district, age, COUNT(*) FROM city_health GROUP BY district, age",
    "SELECT floor(age / 10) * 10 AS decade, COUNT(*) FROM city_health GROUP BY decade",
    "SELECT district, COUNT(*) FROM city_health WHERE age > 60 GROUP BY district",
    "SELECT date_trunc('month', visit_date) AS m, COUNT(*) FROM city_health GROUP BY m",
    "SELECT c.district, COUNT(*) FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY c.district",
    "SELECT c.district, COUNT(*) FROM city_health c, telecom_usage t WHERE c.person_id = t.person_id GROUP BY c.district",
    "SELECT e.industry, COUNT(*) FROM enterprise_registry e WHERE e.district IN (SELECT district FROM enterprise_registry WHERE employees > 100) GROUP BY e.industry",
    "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district HAVING COUNT(*) > 100 ORDER BY n DESC LIMIT 5",
    "SELECT name, rank() OVER (ORDER BY employees DESC) FROM enterprise_registry LIMIT 3",
];

#[test]
fn every_attack_is_refused_with_its_code_and_rule() {
    let app = spawn_app();
    let mut failures = Vec::new();
    for (sql, code, rule) in REFUSED {
        let r = app.query(sql);
        let ok = r.status >= 400
            && r.code().as_deref() == Some(code)
            && (rule.is_none() || r.rule().as_deref() == *rule);
        if !ok {
            failures.push(format!("{sql}\n  -> {} {}", r.status, r.text()));
        }
        // A refusal never carries engine internals.
        assert!(!r.text().contains("DataFusion"), "{sql}: {}", r.text());
    }
    assert!(
        failures.is_empty(),
        "{} refusals wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        !std::path::Path::new("/tmp/fg-test-copy.csv").exists(),
        "COPY wrote a file"
    );
}

#[test]
fn legitimate_neighbours_are_answered() {
    let app = spawn_app();
    let mut failures = Vec::new();
    for sql in ALLOWED {
        let r = app.query(sql);
        if r.status != 200 {
            failures.push(format!("{sql}\n  -> {} {}", r.status, r.text()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} allowed queries refused:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_buyer_without_a_grant_is_refused() {
    let app = spawn_app();
    let r = app.query_as(
        "buyer:other",
        json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district" }),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.code().as_deref(), Some("no_grant"));
    let wrong_purpose = app.query_as(
        "buyer:acme",
        json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district", "purpose": "marketing" }),
    );
    assert_eq!(wrong_purpose.code().as_deref(), Some("no_grant"));
    let wrong_grant = app.query_as(
        "buyer:acme",
        json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district", "grant": app.grants["buyer:abroad"] }),
    );
    assert_eq!(
        wrong_grant.code().as_deref(),
        Some("no_grant"),
        "a grant of another buyer is not usable"
    );
}

#[test]
fn important_data_crosses_borders_only_with_an_assessment() {
    let app = spawn_app();
    let sql = "SELECT district, COUNT(*) FROM power_grid GROUP BY district";
    let r = app.query_as("buyer:abroad", json!({ "sql": sql }));
    assert_eq!(r.status, 403);
    assert_eq!(
        r.rule().as_deref(),
        Some("cross_border_assessment_required")
    );
    // General data of the same region is fine for the foreign buyer (level rule: allow).
    let general = app.query_as(
        "buyer:abroad",
        json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district" }),
    );
    assert_eq!(general.status, 200, "{}", general.text());
    let store = app.admin();
    let assessed = store
        .add_grant(&NewGrant {
            buyer: "buyer:abroad".into(),
            datasets: vec!["power_grid".into()],
            purpose: "urban_planning".into(),
            queries_per_day: None,
            rows_per_day: None,
            bytes_per_day: None,
            epsilon: None,
            expires_at: None,
            cross_border_assessment: Some("CAC-2026-0042".into()),
        })
        .unwrap();
    let ok = app.query_as("buyer:abroad", json!({ "sql": sql, "grant": assessed }));
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn prohibited_purposes_are_refused() {
    let app = spawn_app_with(Options::default());
    let store = app.admin();
    let grant = store
        .add_grant(&NewGrant {
            buyer: "buyer:other".into(),
            datasets: vec!["city_health".into()],
            purpose: "individual_profiling".into(),
            queries_per_day: None,
            rows_per_day: None,
            bytes_per_day: None,
            epsilon: None,
            expires_at: None,
            cross_border_assessment: None,
        })
        .unwrap();
    let r = app.query_as(
        "buyer:other",
        json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district", "grant": grant }),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.rule().as_deref(), Some("prohibited_purpose"));
    assert!(
        r.json()["error"]["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("profiling")
    );
}

#[test]
fn expired_grants_do_not_count() {
    let app = spawn_app();
    let store = app.admin();
    store
        .add_grant(&NewGrant {
            buyer: "buyer:other".into(),
            datasets: vec!["city_health".into()],
            purpose: "public_health_research".into(),
            queries_per_day: None,
            rows_per_day: None,
            bytes_per_day: None,
            epsilon: None,
            expires_at: Some("2020-01-01T00:00:00.000Z".into()),
            cross_border_assessment: None,
        })
        .unwrap();
    let r = app.query_as(
        "buyer:other",
        json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district" }),
    );
    assert_eq!(r.code().as_deref(), Some("no_grant"));
}
