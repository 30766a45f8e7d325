use crate::helpers::{CONSENTED, PURPOSE, spawn_app, truth};
use serde_json::{Value, json};

fn rows(doc: &Value) -> Vec<Vec<Value>> {
    serde_json::from_value(doc["rows"].clone()).unwrap()
}

/// The noise scale the release reports for output column `i` (after the group columns).
fn scale(doc: &Value, column: &str) -> f64 {
    doc["release"]["noise"]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["column"] == column)
        .and_then(|c| c["scale"].as_f64())
        .unwrap_or_else(|| panic!("no noise reported for {column}: {doc}"))
}

/// Far enough into the tail that a correct release never lands outside it (p < 1e-6 per value).
const TAIL: f64 = 14.0;

#[test]
fn grouped_count_is_released_with_noise_usage_and_receipt() {
    let app = spawn_app();
    let r = app.query(
        "SELECT district, COUNT(*) AS visits FROM city_health GROUP BY district ORDER BY district",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["columns"][0]["name"], "district");
    assert_eq!(doc["columns"][1]["name"], "visits");
    assert_eq!(doc["purpose"], PURPOSE);
    let release = &doc["release"];
    assert_eq!(release["mechanism"], "differential_privacy");
    assert_eq!(release["noise"]["mechanism"], "discrete_laplace");
    assert_eq!(release["noise"]["epsilon"], 0.5);
    assert!(
        release["suppressed_groups"].is_null(),
        "an exact count of small groups would leak"
    );
    // The truth the release estimates: consenting persons only, each person's
    // visits capped at max_rows_per_unit (20).
    let truth_rows = truth(
        "city_health",
        &format!(
            "SELECT district, SUM(CASE WHEN n > 20 THEN 20 ELSE n END) FROM \
             (SELECT district, person_id, COUNT(*) AS n FROM city_health WHERE {CONSENTED} GROUP BY district, person_id) \
             GROUP BY district ORDER BY district"
        ),
    );
    // Noise is reported under the name the answer uses.
    let b = scale(&doc, "visits");
    // Sensitivity max_rows_per_unit = 20; the districts are a public domain,
    // so all of epsilon goes to the one value and every district comes out.
    assert_eq!(b, 20.0 / 0.5);
    assert_eq!(release["noise"]["partitions"], "public");
    assert!(release["noise"]["selection_threshold"].is_null());
    let released = rows(&doc);
    assert!(!released.is_empty());
    for row in &released {
        let t = truth_rows.iter().find(|t| t[0] == row[0]).unwrap()[1]
            .as_f64()
            .unwrap();
        let v = row[1].as_f64().unwrap();
        assert!(
            (v - t).abs() <= TAIL * b,
            "{}: released {v}, truth {t}, scale {b}",
            row[0]
        );
    }
    let usage = &doc["usage"];
    assert_eq!(usage["rows_scanned"], 20_000);
    assert_eq!(usage["epsilon"], 0.5);
    assert_eq!(usage["cells_released"], released.len() as u64 * 2);
    // 0.50 per query + 2.00 per million rows x 20,000 rows + 1.00 per ε x 0.5 = 1.04
    assert_eq!(usage["charge"], "1.04");
    assert_eq!(doc["budget"]["epsilon_spent"], 0.5);
    let receipt = &doc["receipt"];
    // The harness's five principals and two grants, then the five dataset
    // registrations and their quality cards, come first.
    assert_eq!(receipt["ledger_index"], 17);
    assert_eq!(receipt["tree_size"], 18);
    assert_eq!(receipt["entry_hash"].as_str().unwrap().len(), 64);
    assert_eq!(receipt["signature"].as_str().unwrap().len(), 128);
}

#[test]
fn small_groups_never_come_out() {
    let app = spawn_app();
    let r = app.query(
        "SELECT district, visit_date, COUNT(DISTINCT person_id) AS persons FROM city_health GROUP BY district, visit_date",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    let truth_rows = truth(
        "city_health",
        &format!(
            "SELECT district, CAST(visit_date AS VARCHAR), COUNT(DISTINCT person_id) FROM city_health WHERE {CONSENTED} GROUP BY district, visit_date"
        ),
    );
    let small = truth_rows
        .iter()
        .filter(|t| t[2].as_u64().unwrap() < 10)
        .count();
    assert!(small > 0, "the test needs small groups to exist");
    for row in rows(&doc) {
        let t = truth_rows
            .iter()
            .find(|t| t[0] == row[0] && t[1] == row[1])
            .unwrap();
        assert!(
            t[2].as_u64().unwrap() >= 10,
            "released a group of {} persons",
            t[2]
        );
    }
    let threshold = doc["release"]["noise"]["selection_threshold"]
        .as_f64()
        .unwrap();
    assert!(threshold >= 10.0);
}

#[test]
fn operators_above_the_release_see_only_released_groups() {
    let app = spawn_app();
    // If HAVING ran on the exact aggregate, the small groups would come back.
    let having = app.query(
        "SELECT district, visit_date, COUNT(DISTINCT person_id) AS p FROM city_health GROUP BY district, visit_date HAVING COUNT(DISTINCT person_id) < 10",
    );
    assert_eq!(having.status, 200, "{}", having.text());
    assert_eq!(rows(&having.json()).len(), 0);
    // Counting groups from outside counts only the released ones.
    let outer = app.query(
        "SELECT COUNT(*) AS groups FROM (SELECT district, date_trunc('month', visit_date) AS m, COUNT(*) AS n FROM city_health GROUP BY district, date_trunc('month', visit_date)) t",
    );
    assert_eq!(outer.status, 200, "{}", outer.text());
    let doc = outer.json();
    let all_groups = truth(
        "city_health",
        "SELECT COUNT(DISTINCT district || CAST(date_trunc('month', visit_date) AS VARCHAR)) FROM city_health",
    )[0][0]
        .as_u64()
        .unwrap();
    let released = doc["release"]["released_groups"].as_u64().unwrap();
    assert!(
        released < all_groups,
        "the test needs some groups held back"
    );
    assert_eq!(rows(&doc)[0][0].as_u64().unwrap(), released);
    // ORDER BY and LIMIT apply to released rows.
    let top = app.query(
        "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district ORDER BY n DESC LIMIT 3",
    );
    let top_rows = rows(&top.json());
    assert_eq!(top_rows.len(), 3);
    assert!(top_rows[0][1].as_u64() >= top_rows[1][1].as_u64());
}

#[test]
fn a_lone_person_cannot_be_counted() {
    let app = spawn_app();
    // A global aggregate has one group, known without the data: it is always
    // released, with noise as wide as a person's whole contribution, so its
    // value hardly moves whether the few persons it counts are there or not.
    let answers: Vec<f64> = (0..6)
        .map(|k| {
            let r = app.query(&format!(
                "SELECT COUNT(*) AS n{k} FROM city_health WHERE age = 100 AND district = 'mentougou'"
            ));
            assert_eq!(r.status, 200, "{}", r.text());
            let doc = r.json();
            assert_eq!(doc["release"]["released_groups"], 1);
            assert_eq!(doc["release"]["noise"]["partitions"], "public");
            assert_eq!(scale(&doc, &format!("n{k}")), 40.0);
            rows(&doc)[0][0].as_f64().unwrap()
        })
        .collect();
    let distinct: std::collections::BTreeSet<u64> = answers.iter().map(|v| *v as u64).collect();
    assert!(
        distinct.len() > 1 || answers.iter().all(|v| *v == 0.0),
        "{answers:?}"
    );
    // Each answer is drawn afresh (a new plan), yet none is a count far
    // from zero for a handful of persons only by chance of noise: their
    // mean estimates the exact few.
    let exact = truth(
        "city_health",
        &format!("SELECT COUNT(*) FROM city_health WHERE {CONSENTED} AND age = 100 AND district = 'mentougou'"),
    )[0][0]
        .as_f64()
        .unwrap();
    let mean = answers.iter().sum::<f64>() / answers.len() as f64;
    assert!(
        (mean - exact).abs() < 4.0 * 40.0,
        "mean {mean}, exact {exact}"
    );
}

#[test]
fn personal_datasets_join_on_the_privacy_unit() {
    let app = spawn_app();
    let r = app.query(
        "SELECT c.district, COUNT(DISTINCT c.person_id) AS persons, AVG(t.calls) AS calls \
         FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY c.district",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    // The strictest parameters of the two datasets apply.
    assert_eq!(doc["release"]["noise"]["max_rows_per_unit"], 12);
    assert_eq!(doc["release"]["noise"]["max_groups_per_unit"], 4);
    assert!(!rows(&doc).is_empty());
    for row in rows(&doc) {
        let calls = row[2].as_f64().unwrap();
        assert!(
            (0.0..=3000.0).contains(&calls),
            "an average outside the declared bounds: {calls}"
        );
    }
    let off_unit = app.query(
        "SELECT c.district, COUNT(*) FROM city_health c JOIN telecom_usage t ON c.district = t.district GROUP BY c.district",
    );
    assert_eq!(off_unit.status, 403);
    assert_eq!(
        off_unit.rule().as_deref(),
        Some("join_without_privacy_unit")
    );
}

#[test]
fn open_data_returns_rows() {
    let app = spawn_app();
    let r = app.query(
        "SELECT name, employees FROM enterprise_registry ORDER BY employees DESC, name LIMIT 5",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(rows(&doc).len(), 5);
    assert_eq!(doc["release"]["mechanism"], "none");
    let agg =
        app.query("SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry");
    assert_eq!(agg.status, 200);
}

#[test]
fn non_personal_important_data_is_thresholded_on_rows() {
    let app = spawn_app();
    let r = app.query("SELECT district, COUNT(*) AS readings FROM power_grid GROUP BY district");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["release"]["mechanism"], "threshold");
    // A sensitive measure is never released exactly: not on a threshold dataset.
    let r = app.query("SELECT district, AVG(load_mw) AS load FROM power_grid GROUP BY district");
    assert_eq!(
        r.rule().as_deref(),
        Some("sensitive_measure_requires_dp"),
        "{}",
        r.text()
    );
    let raw = app.query("SELECT substation_id, load_mw FROM power_grid");
    assert_eq!(raw.status, 403);
}

/// A repeated statement runs the plans its first run optimised, kept with
/// the gate's decision: each run fills the plan above the release with its
/// own released rows, so every run's answer is the data's, exactly.
#[test]
fn a_repeated_statement_runs_its_kept_plans_on_the_data() {
    let app = spawn_app();
    let cases = [
        (
            "SELECT district, COUNT(*) AS readings FROM power_grid GROUP BY district \
             ORDER BY readings DESC, district LIMIT 3",
            "power_grid",
            "SELECT district, COUNT(*) AS readings FROM power_grid GROUP BY district \
             HAVING COUNT(*) >= 10 ORDER BY readings DESC, district LIMIT 3",
        ),
        (
            "SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry ORDER BY industry",
            "enterprise_registry",
            "SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry ORDER BY industry",
        ),
    ];
    for (sql, dataset, exact) in cases {
        let expected = truth(dataset, exact);
        assert!(!expected.is_empty(), "{exact}");
        for run in 0..3 {
            let r = app.query(sql);
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(rows(&r.json()), expected, "run {run} of {sql}");
        }
    }
}

#[test]
fn csv_and_arrow_formats() {
    let app = spawn_app();
    // Row-thresholded data: exact, so the formats can be compared with the truth.
    let sql = "SELECT district, COUNT(*) AS n FROM power_grid GROUP BY district ORDER BY district";
    let groups = truth(
        "power_grid",
        "SELECT COUNT(DISTINCT district) FROM power_grid",
    )[0][0]
        .as_u64()
        .unwrap() as usize;
    let csv = app.query_as("buyer:acme", json!({ "sql": sql, "format": "csv" }));
    assert_eq!(csv.status, 200);
    assert!(csv.headers["content-type"].starts_with("text/csv"));
    let text = csv.text();
    assert_eq!(text.lines().next(), Some("district,n"));
    assert_eq!(text.lines().count(), groups + 1);
    let receipt: Value = serde_json::from_str(&csv.headers["x-frostglass-receipt"]).unwrap();
    assert!(receipt["entry_hash"].is_string());

    let body = serde_json::to_vec(&json!({ "sql": sql })).unwrap();
    let arrow = app.request(
        "POST",
        "/v1/queries",
        Some(app.key("buyer:acme")),
        Some(&body),
        Some("application/vnd.apache.arrow.stream"),
    );
    assert_eq!(arrow.status, 200);
    assert_eq!(
        arrow.headers["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(
        std::io::Cursor::new(arrow.bytes),
        None,
    )
    .unwrap();
    let total: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(total, groups);
    assert!(arrow.headers.contains_key("x-frostglass-release"));
}

#[test]
fn answers_and_refusals_are_recorded_before_the_response() {
    let app = spawn_app();
    let ok = app.query("SELECT district, COUNT(*) FROM city_health GROUP BY district");
    let refused = app.query("SELECT name, COUNT(*) FROM city_health GROUP BY name");
    assert_eq!(refused.status, 403);
    let entries = app.admin().entries(0, 100).unwrap();
    let queries: Vec<_> = entries
        .iter()
        .filter(|(_, body, _)| body.contains(r#""kind":"query""#))
        .collect();
    assert_eq!(queries.len(), 2);
    let index = ok.json()["receipt"]["ledger_index"].as_u64().unwrap();
    let (_, body, hash) = &entries[index as usize];
    assert_eq!(hash, ok.json()["receipt"]["entry_hash"].as_str().unwrap());
    assert_eq!(hash, &frostglass::ledger::leaf_hash_hex(body.as_bytes()));
    let answered: Value = serde_json::from_str(body).unwrap();
    assert_eq!(answered["decision"], "answered");
    let refusal: Value = serde_json::from_str(&queries[1].1).unwrap();
    assert_eq!(refusal["decision"], "refused");
    assert_eq!(refusal["rule"], "identifier_in_group_by");
    // The log holds a hash of the SQL, not the SQL.
    assert!(!queries[1].1.contains("SELECT"));
}

#[test]
fn dry_run_decides_without_reading_or_recording() {
    let app = spawn_app();
    let r = app.query_as(
        "buyer:acme",
        json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district", "dry_run": true }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["decision"], "allowed");
    assert_eq!(doc["releases"][0]["min_group_size"], 10);
    assert_eq!(doc["estimated_usage"]["charge"], "1.04");
    let refused = app.query_as(
        "buyer:acme",
        json!({ "sql": "SELECT name FROM city_health", "dry_run": true }),
    );
    assert_eq!(refused.status, 403);
    let entries = app.admin().entries(0, 100).unwrap();
    let queries = entries
        .iter()
        .filter(|(_, body, _)| body.contains(r#""kind":"query""#))
        .count();
    assert_eq!(queries, 1, "only the refusal is recorded");
}

#[test]
fn grants_are_listed_per_role() {
    let app = spawn_app();
    let mine = app.get("/v1/grants", Some(app.key("buyer:acme")));
    assert_eq!(mine.status, 200);
    let grants = mine.json()["grants"].as_array().unwrap().clone();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["grant"]["id"], app.grants["buyer:acme"].as_str());
    let none = app.get("/v1/grants", Some(app.key("buyer:other")));
    assert_eq!(none.json()["grants"].as_array().unwrap().len(), 0);
    let owner = app.get("/v1/grants", Some(app.key("owner:hospital")));
    assert_eq!(
        owner.json()["grants"].as_array().unwrap().len(),
        2,
        "both grants cover city_health"
    );
}

#[test]
fn only_consenting_persons_are_counted_for_the_purpose() {
    let app = spawn_app();
    let sql = "SELECT COUNT(DISTINCT person_id) AS persons FROM city_health";
    let count = |r: &crate::helpers::Response| {
        assert_eq!(r.status, 200, "{}", r.text());
        let doc = r.json();
        (rows(&doc)[0][0].as_f64().unwrap(), scale(&doc, "persons"))
    };
    let persons = |condition: &str| {
        truth(
            "city_health",
            &format!("SELECT COUNT(DISTINCT person_id) FROM city_health WHERE {condition}"),
        )[0][0]
            .as_f64()
            .unwrap()
    };
    let consenting = persons(CONSENTED);
    let (research, b) = count(&app.query(sql));
    assert!(
        (research - consenting).abs() <= TAIL * b,
        "{research} vs {consenting}"
    );
    // Under another purpose, another set of persons.
    let grant = app
        .admin()
        .add_grant(&frostglass::store::NewGrant {
            buyer: "buyer:other".into(),
            datasets: vec!["city_health".into(), "telecom_usage".into()],
            purpose: "insurance_pricing".into(),
            ..Default::default()
        })
        .unwrap();
    let (insured, b) = count(&app.query_as("buyer:other", json!({ "sql": sql, "grant": grant })));
    let expected = persons("strpos(consented_purposes, ',insurance_pricing,') > 0");
    assert!(
        (insured - expected).abs() <= TAIL * b,
        "{insured} vs {expected}"
    );
    assert!(
        (consenting - expected).abs() > 2.0 * TAIL * b,
        "the two purposes must select clearly different persons"
    );
    // The filter holds under every plan shape: a CTE, a derived table, a join.
    for shaped in [
        "WITH c AS (SELECT person_id FROM city_health) SELECT COUNT(DISTINCT person_id) FROM c",
        "SELECT COUNT(DISTINCT x.person_id) FROM (SELECT * FROM city_health) x",
        "SELECT COUNT(DISTINCT c.person_id) FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id",
    ] {
        let r = app.query(shaped);
        assert_eq!(r.status, 200, "{shaped}: {}", r.text());
        let doc = r.json();
        let v = rows(&doc)[0][0].as_f64().unwrap();
        let b = doc["release"]["noise"]["columns"][0]["scale"]
            .as_f64()
            .unwrap();
        assert!(
            (v - consenting).abs() <= TAIL * b,
            "{shaped}: {v} vs {consenting}"
        );
    }
    let dry = app
        .query_as("buyer:acme", json!({ "sql": sql, "dry_run": true }))
        .json();
    assert_eq!(dry["consent_filters"][0]["dataset"], "city_health");
}

#[test]
fn the_ledger_records_a_plan_hash_that_ignores_spelling() {
    let app = spawn_app();
    app.query("SELECT district, COUNT(*) FROM city_health GROUP BY district");
    app.query("select   DISTRICT, count(*)\nfrom CITY_HEALTH group by District");
    app.query("SELECT district, COUNT(*) FROM city_health WHERE age > 50 GROUP BY district");
    app.query(
        "-- by district\nSELECT district, /* all */ COUNT(*) FROM city_health GROUP BY district",
    );
    let hashes: Vec<(String, String)> = app
        .admin()
        .entries(0, 100)
        .unwrap()
        .iter()
        .filter_map(|(_, body, _)| {
            let v: Value = serde_json::from_str(body).ok()?;
            Some((
                v["sql_sha256"].as_str()?.to_string(),
                v["plan_sha256"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(hashes.len(), 4);
    assert_ne!(hashes[0].0, hashes[1].0, "different SQL text");
    assert_eq!(hashes[0].1, hashes[1].1, "the same plan");
    assert_ne!(hashes[0].1, hashes[2].1);
    assert_eq!(
        hashes[0].1, hashes[3].1,
        "comments are not part of the plan"
    );
}
