//! The channels a determined buyer had, each written as the attack and
//! shown to fail: an error oracle, identifiers through join forms, bytes
//! of held-back groups in the output, rows picked below a release, exact
//! differencing of a sensitive measure, a nested release, and averaging
//! noise across grants of one organisation.

use crate::helpers::{CONSENTED, TestApp, spawn_app, truth};
use frostglass::store::{NewGrant, Principal, Role};
use serde_json::json;

/// Binary search for one person's exact age through a partial expression:
/// before, `1/(age - k)` failed (sql_error) exactly when a row of the small
/// group had age k. Now every probe gets an answer of the same kind.
#[test]
fn an_error_oracle_cannot_find_a_value() {
    let app = spawn_app();
    let old = truth(
        "city_health",
        &format!(
            "SELECT DISTINCT age FROM city_health WHERE {CONSENTED} AND district = 'chaoyang' AND age >= 80 ORDER BY age"
        ),
    );
    assert!(!old.is_empty(), "the demo data has old persons in chaoyang");
    let (key, _) = crate::privacy::new_buyer(&app, "buyer:prober", 100.0);
    let present = old[0][0].as_i64().unwrap();
    for k in [present, present + 1, 200] {
        for probe in [
            format!(
                "SELECT COUNT(*) FROM city_health WHERE district = 'chaoyang' AND age >= 80 AND 1 / (age - {k}) IS NOT NULL"
            ),
            format!(
                "SELECT COUNT(*) FROM city_health WHERE district = 'chaoyang' AND age >= 80 AND 7 % (age - {k}) = 0"
            ),
            format!(
                "SELECT COUNT(*) FROM city_health WHERE district = 'chaoyang' AND CAST(CASE WHEN age = {k} THEN 'x' ELSE '1' END AS INT) = 1"
            ),
            format!(
                "SELECT COUNT(*) FROM city_health WHERE district = 'chaoyang' AND abs(age + {}) > 0",
                i64::MAX - k + 1
            ),
        ] {
            let r = app.ask(&key, json!({ "sql": probe }));
            assert_eq!(r.status, 200, "{probe}: {}", r.text());
        }
    }
    let spent = |app: &TestApp| {
        let grants = app.get("/v1/grants", Some(&key)).json();
        grants["grants"][0]["budget"]["epsilon_spent"]
            .as_f64()
            .unwrap()
    };
    let before = spent(&app);
    // Aggregate arguments over protected rows: bare columns, refused before any data is read.
    for sql in [
        "SELECT district, SUM(CAST(cost AS TINYINT)) FROM city_health GROUP BY district",
        "SELECT COUNT(CAST(district AS INT)) FROM city_health",
        "SELECT district, SUM(cost / (cost - 37)) FROM city_health GROUP BY district",
        // The same expressions hidden behind a derived table's or a CTE's column.
        "SELECT gender, COUNT(x) FROM (SELECT gender, CAST(district AS INT) AS x FROM city_health) t GROUP BY gender",
        "WITH t AS (SELECT gender, cost / (cost - 37) AS x FROM city_health) SELECT gender, SUM(x) FROM t GROUP BY gender",
    ] {
        let r = app.ask(&key, json!({ "sql": sql }));
        assert_eq!(
            r.rule().as_deref(),
            Some("aggregate_argument_not_bare"),
            "{sql}: {}",
            r.text()
        );
    }
    // Functions that can fail are not evaluated over protected rows.
    let r = app.query("SELECT COUNT(*) FROM power_grid WHERE to_timestamp(substation_id) IS NULL");
    assert_eq!(
        r.rule().as_deref(),
        Some("partial_function"),
        "{}",
        r.text()
    );
    let r = app.query("SELECT COUNT(*) FROM power_grid WHERE district LIKE substation_id");
    assert_eq!(
        r.rule().as_deref(),
        Some("partial_function"),
        "{}",
        r.text()
    );
    // Nothing was charged for the refusals: they were decided before reading.
    assert_eq!(spent(&app), before);
}

/// An identifier equated to a constant through any join form is an identifier filter.
#[test]
fn identifiers_cannot_be_pinned_through_joins() {
    let app = spawn_app();
    let person = truth("city_health", "SELECT person_id FROM city_health LIMIT 1")[0][0].clone();
    for sql in [
        format!(
            "SELECT COUNT(*) FROM city_health c JOIN (VALUES ({person})) v(person_id) USING (person_id)"
        ),
        format!(
            "SELECT COUNT(*) FROM city_health c JOIN (SELECT {person} AS pid) v ON c.person_id = v.pid"
        ),
        format!(
            "WITH v AS (SELECT {person} AS person_id) SELECT COUNT(*) FROM city_health c JOIN v ON c.person_id = v.person_id"
        ),
        format!(
            "SELECT COUNT(*) FROM city_health c, (SELECT {person} AS pid) v WHERE c.person_id = v.pid"
        ),
        // An open dataset's column the buyer then filters is no privacy unit.
        format!(
            "SELECT COUNT(*) FROM city_health c JOIN enterprise_registry e ON c.person_id = e.company_id WHERE e.company_id = {person}"
        ),
    ] {
        let r = app.query(&sql);
        assert_eq!(
            r.rule().as_deref(),
            Some("identifier_in_filter"),
            "{sql}: {}",
            r.text()
        );
    }
    // The privacy-unit join between two personal datasets still works.
    let ok = app.query(
        "SELECT c.district, COUNT(*) FROM city_health c JOIN telecom_usage t USING (person_id) GROUP BY c.district",
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// The raw bytes of every format hold released values only: the keys of
/// held-back groups (long enough to live in a string view's data buffer)
/// appear nowhere.
#[test]
fn no_format_carries_a_held_back_group() {
    let app = spawn_app();
    let substation = truth("power_grid", "SELECT substation_id FROM power_grid LIMIT 1")[0][0]
        .as_str()
        .unwrap()
        .to_string();
    let cases = [
        // DP: per district, the few centenarians (held back) and everyone else (released).
        "SELECT district || '-a-long-padding-' || CAST(age > 100 AS VARCHAR) AS k, COUNT(*) AS n FROM city_health GROUP BY k".to_string(),
        // Threshold: one substation's five readings (held back) and the rest of its district.
        format!(
            "SELECT district || '-a-long-padding-' || CAST(substation_id = '{substation}' AS VARCHAR) AS k, COUNT(*) AS n \
             FROM power_grid WHERE hour < TIMESTAMP '2025-01-01 05:00:00' GROUP BY k"
        ),
    ];
    for sql in cases {
        let answer = app.query(&sql);
        assert_eq!(answer.status, 200, "{}", answer.text());
        let released: Vec<String> = answer.json()["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[0].as_str().unwrap().to_string())
            .collect();
        assert!(
            released.iter().any(|k| k.ends_with("false")),
            "{sql}: nothing released"
        );
        let held_back: Vec<String> = released
            .iter()
            .map(|k| k.replace("-false", "-true"))
            .filter(|k| !released.contains(k))
            .collect();
        assert!(!held_back.is_empty(), "{sql}: nothing held back");
        for format in ["json", "csv", "arrow"] {
            let r = app.ask(
                app.key("buyer:acme"),
                json!({ "sql": sql, "format": format }),
            );
            assert_eq!(r.status, 200);
            for key in &held_back {
                let found = r.bytes.windows(key.len()).any(|w| w == key.as_bytes());
                assert!(!found, "{format}: held-back key {key} in the output bytes");
            }
        }
    }
}

/// LIMIT, OFFSET and top-N below a release decide who contributes by
/// comparing persons; above it they act on released values.
#[test]
fn rows_cannot_be_picked_below_a_release() {
    let app = spawn_app();
    for sql in [
        "SELECT district, COUNT(*) FROM (SELECT * FROM city_health ORDER BY age DESC LIMIT 100) t GROUP BY district",
        "SELECT COUNT(*) FROM (SELECT district FROM city_health LIMIT 10 OFFSET 5) t",
        "SELECT district, COUNT(*) FROM (SELECT district FROM power_grid LIMIT 50) t GROUP BY district",
    ] {
        let r = app.query(sql);
        assert_eq!(
            r.rule().as_deref(),
            Some("row_selection_below_release"),
            "{sql}: {}",
            r.text()
        );
    }
    let above = app.query(
        "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district ORDER BY n DESC LIMIT 3",
    );
    assert_eq!(above.status, 200);
}

/// Two exact sums that differ by one substation would give its load.
#[test]
fn a_sensitive_measure_is_never_released_exactly() {
    let app = spawn_app();
    let substation = truth("power_grid", "SELECT substation_id FROM power_grid LIMIT 1")[0][0]
        .as_str()
        .unwrap()
        .to_string();
    for sql in [
        "SELECT district, SUM(load_mw) FROM power_grid GROUP BY district".to_string(),
        format!(
            "SELECT district, SUM(load_mw) FROM power_grid WHERE substation_id <> '{substation}' GROUP BY district"
        ),
        "SELECT district, AVG(load_mw) FROM power_grid GROUP BY district".to_string(),
    ] {
        let r = app.query(&sql);
        assert_eq!(
            r.rule().as_deref(),
            Some("sensitive_measure_requires_dp"),
            "{sql}: {}",
            r.text()
        );
    }
    // Where the release adds noise, the same measure is released.
    let dp = app.query("SELECT district, SUM(cost) FROM city_health GROUP BY district");
    assert_eq!(dp.status, 200, "{}", dp.text());
}

/// A release inside a join under another release ran against an empty
/// placeholder and charged epsilon for no rows; it is refused, uncharged.
#[test]
fn a_nested_release_is_refused_before_it_costs_anything() {
    let app = spawn_app();
    let r = app.query(
        "SELECT c.district, COUNT(*) FROM city_health c JOIN \
         (SELECT district, COUNT(*) AS n FROM telecom_usage GROUP BY district) t ON c.district = t.district \
         GROUP BY c.district",
    );
    assert_eq!(r.rule().as_deref(), Some("nested_release"), "{}", r.text());
    let grants = app.get("/v1/grants", Some(app.key("buyer:acme"))).json();
    assert_eq!(grants["grants"][0]["budget"]["epsilon_spent"], 0.0);
}

/// Fresh noise cannot be bought with another grant or another account of
/// the same organisation: the released answer is reused for the same plan.
#[test]
fn noise_cannot_be_averaged_across_grants_of_one_organisation() {
    let app = spawn_app();
    let admin = app.admin();
    let mut keys = Vec::new();
    for id in ["buyer:bank-1", "buyer:bank-2"] {
        keys.push(
            admin
                .add_principal(&Principal {
                    id: id.into(),
                    role: Role::Buyer,
                    org: Some("bank".into()),
                    region: "CN".into(),
                })
                .unwrap(),
        );
        for _ in 0..2 {
            admin
                .add_grant(&NewGrant {
                    buyer: id.into(),
                    datasets: vec!["city_health".into()],
                    purpose: "public_health_research".into(),
                    ..NewGrant::default()
                })
                .unwrap();
        }
    }
    let sql = "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district";
    let first = app.ask(&keys[0], json!({ "sql": sql }));
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(first.json()["usage"]["epsilon"].as_f64().unwrap() > 0.0);
    let grants = app.get("/v1/grants", Some(&keys[0])).json();
    let other_grant = grants["grants"][1]["grant"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (key, grant) in [(&keys[0], Some(other_grant)), (&keys[1], None)] {
        let mut body = json!({ "sql": sql });
        if let Some(g) = grant {
            body["grant"] = json!(g);
        }
        let again = app.ask(key, body);
        assert_eq!(again.json()["rows"], first.json()["rows"]);
        assert_eq!(again.json()["usage"]["epsilon"], 0.0);
    }
    // Owners and buyers see the dataset's lifetime budget: the quality
    // card's 0.5 and one query's so far.
    let lifetime = |app: &TestApp| {
        app.get("/v1/datasets/city_health", Some(app.key("owner:hospital")))
            .json()["lifetime_epsilon"]
            .clone()
    };
    assert_eq!(lifetime(&app)["limit"], 100.0);
    assert_eq!(lifetime(&app)["spent"], 1.0);
    // Another organisation draws its own noise, and pays for it.
    let other = app.query(sql);
    assert!(other.json()["usage"]["epsilon"].as_f64().unwrap() > 0.0);
    assert_eq!(lifetime(&app)["spent"], 1.5);
}

/// A wide release is a bounded piece of work that does not hold up
/// another buyer: its noise is drawn only for released groups, from
/// per-thread pools (no global lock), off the runtime's workers, and it
/// stops when its query is dropped (unit test in `release::dp`).
#[test]
fn a_wide_release_does_not_block_another_buyer() {
    let app = spawn_app();
    let (wide_key, _) = crate::privacy::new_buyer(&app, "buyer:wide", 1000.0);
    // Every distinct aggregate the release takes, over about one group per visit.
    let wide = "SELECT district, age, visit_date, COUNT(*) AS a, COUNT(age) AS b, \
                COUNT(visit_date) AS c, COUNT(district) AS d, SUM(cost) AS e, AVG(cost) AS f, \
                COUNT(DISTINCT person_id) AS g FROM city_health GROUP BY district, age, visit_date";
    let small = "SELECT industry, COUNT(*) FROM enterprise_registry GROUP BY industry";
    std::thread::scope(|s| {
        let heavy = s.spawn(|| app.ask(&wide_key, json!({ "sql": wide })));
        for _ in 0..5 {
            let r = app.query_as("buyer:abroad", json!({ "sql": small }));
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let heavy = heavy.join().unwrap();
        assert_eq!(heavy.status, 200, "{}", heavy.text());
        assert!(
            heavy.json()["release"]["noise"]["columns"]
                .as_array()
                .unwrap()
                .len()
                >= 6
        );
    });
}

/// A banned combination (district, age, gender of the same persons) is
/// assembled from two datasets joined on the privacy unit: the district
/// from the telecom data, age and gender from the hospital's.
#[test]
fn a_banned_combination_cannot_be_assembled_across_a_join() {
    let app = spawn_app();
    let r = app.query(
        "SELECT t.district, c.age, c.gender, COUNT(*) FROM city_health c \
         JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY t.district, c.age, c.gender",
    );
    assert_eq!(
        r.rule().as_deref(),
        Some("prohibited_combination"),
        "{}",
        r.text()
    );
    // Two of the three from either side are fine.
    let ok = app.query(
        "SELECT t.district, c.age, COUNT(*) FROM city_health c \
         JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY t.district, c.age",
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
}
