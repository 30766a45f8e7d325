use crate::helpers::{CONSENTED, PURPOSE, spawn_app, truth};
use serde_json::{Value, json};

fn rows(doc: &Value) -> Vec<Vec<Value>> {
    serde_json::from_value(doc["rows"].clone()).unwrap()
}

#[test]
fn grouped_count_is_answered_with_release_usage_and_receipt() {
    let app = spawn_app();
    let r = app.query(
        "SELECT district, COUNT(*) AS visits FROM city_health GROUP BY district ORDER BY district",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["columns"][0]["name"], "district");
    assert_eq!(doc["columns"][1]["name"], "visits");
    assert_eq!(doc["release"]["mechanism"], "threshold");
    assert_eq!(doc["release"]["min_group_size"], 10);
    assert_eq!(doc["purpose"], PURPOSE);
    // Every district is large, so the released counts are the exact truth
    // (over the visits of persons who consented to the purpose).
    let expected = truth(
        "city_health",
        &format!(
            "SELECT district, COUNT(*) FROM city_health WHERE {CONSENTED} GROUP BY district ORDER BY district"
        ),
    );
    assert_eq!(rows(&doc), expected);
    let usage = &doc["usage"];
    assert_eq!(usage["rows_scanned"], 20_000);
    assert_eq!(usage["cells_released"], expected.len() as u64 * 2);
    // 0.50 per query + 2.00 per million rows x 20,000 rows = 0.54
    assert_eq!(usage["charge"], "0.54");
    let receipt = &doc["receipt"];
    // The five dataset registrations come first.
    assert_eq!(receipt["ledger_index"], 5);
    assert_eq!(receipt["tree_size"], 6);
    assert_eq!(receipt["entry_hash"].as_str().unwrap().len(), 64);
    assert_eq!(receipt["signature"].as_str().unwrap().len(), 128);
}

#[test]
fn small_groups_are_suppressed_and_counted() {
    let app = spawn_app();
    let r = app.query(
        "SELECT district, age, COUNT(DISTINCT person_id) AS persons FROM city_health GROUP BY district, age",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    let released = rows(&doc);
    let suppressed = doc["release"]["suppressed_groups"].as_u64().unwrap();
    let all_groups = truth(
        "city_health",
        &format!("SELECT COUNT(*) FROM (SELECT DISTINCT district, age FROM city_health WHERE {CONSENTED})"),
    )[0][0]
        .as_u64()
        .unwrap();
    let small = truth(
        "city_health",
        &format!(
            "SELECT COUNT(*) FROM (SELECT district, age FROM city_health WHERE {CONSENTED} \
             GROUP BY district, age HAVING COUNT(DISTINCT person_id) < 10)"
        ),
    )[0][0]
        .as_u64()
        .unwrap();
    assert!(small > 0, "the test needs small groups to exist");
    assert_eq!(suppressed, small);
    assert_eq!(released.len() as u64 + suppressed, all_groups);
    for row in &released {
        assert!(
            row[2].as_u64().unwrap() >= 10,
            "released a group of {} persons",
            row[2]
        );
    }
}

#[test]
fn operators_above_the_release_see_only_released_groups() {
    let app = spawn_app();
    // If HAVING ran on the exact aggregate, the small groups would come back.
    let having = app.query(
        "SELECT district, age, COUNT(DISTINCT person_id) AS p FROM city_health GROUP BY district, age HAVING COUNT(DISTINCT person_id) < 10",
    );
    assert_eq!(having.status, 200, "{}", having.text());
    assert_eq!(rows(&having.json()).len(), 0);
    // Counting groups from outside counts only released ones.
    let grouped =
        app.query("SELECT district, age, COUNT(*) FROM city_health GROUP BY district, age");
    let released = grouped.json()["release"]["released_groups"]
        .as_u64()
        .unwrap();
    let outer = app.query(
        "SELECT COUNT(*) AS groups FROM (SELECT district, age, COUNT(*) AS n FROM city_health GROUP BY district, age) t",
    );
    assert_eq!(outer.status, 200, "{}", outer.text());
    assert_eq!(rows(&outer.json())[0][0].as_u64().unwrap(), released);
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
    // A global aggregate over a handful of rows is one small group: suppressed.
    let r =
        app.query("SELECT COUNT(*) FROM city_health WHERE age = 100 AND district = 'mentougou'");
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(rows(&doc).len(), 0);
    assert_eq!(doc["release"]["suppressed_groups"], 1);
}

#[test]
fn personal_datasets_join_on_the_privacy_unit() {
    let app = spawn_app();
    let r = app.query(
        "SELECT c.district, COUNT(DISTINCT c.person_id) AS persons, AVG(t.calls) AS calls \
         FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY c.district",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(rows(&r.json()).len() >= 10);
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
    let r = app.query("SELECT district, AVG(load_mw) AS load FROM power_grid GROUP BY district");
    assert_eq!(r.status, 200, "{}", r.text());
    let raw = app.query("SELECT substation_id, load_mw FROM power_grid");
    assert_eq!(raw.status, 403);
}

#[test]
fn csv_and_arrow_formats() {
    let app = spawn_app();
    let sql = "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district ORDER BY district";
    let csv = app.query_as("buyer:acme", json!({ "sql": sql, "format": "csv" }));
    assert_eq!(csv.status, 200);
    assert!(csv.headers["content-type"].starts_with("text/csv"));
    let text = csv.text();
    assert_eq!(text.lines().next(), Some("district,n"));
    assert_eq!(text.lines().count(), 13);
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
    assert_eq!(total, 12);
    assert!(arrow.headers.contains_key("x-frostglass-release"));
}

#[test]
fn answers_and_refusals_are_recorded_before_the_response() {
    let app = spawn_app();
    let ok = app.query("SELECT district, COUNT(*) FROM city_health GROUP BY district");
    let refused = app.query("SELECT name, COUNT(*) FROM city_health GROUP BY name");
    assert_eq!(refused.status, 403);
    let entries = app.store().entries(0, 100).unwrap();
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
    assert_eq!(doc["estimated_usage"]["charge"], "0.54");
    let refused = app.query_as(
        "buyer:acme",
        json!({ "sql": "SELECT name FROM city_health", "dry_run": true }),
    );
    assert_eq!(refused.status, 403);
    let entries = app.store().entries(0, 100).unwrap();
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
    let research = app.query(sql);
    assert_eq!(research.status, 200, "{}", research.text());
    let counted = rows(&research.json())[0][0].as_u64().unwrap();
    let consenting = truth(
        "city_health",
        &format!("SELECT COUNT(DISTINCT person_id) FROM city_health WHERE {CONSENTED}"),
    )[0][0]
        .as_u64()
        .unwrap();
    let everyone = truth(
        "city_health",
        "SELECT COUNT(DISTINCT person_id) FROM city_health",
    )[0][0]
        .as_u64()
        .unwrap();
    assert_eq!(counted, consenting);
    assert!(
        counted < everyone,
        "the demo data has persons who did not consent"
    );
    // Under another purpose, another set of persons.
    let grant = app
        .store()
        .add_grant(&frostglass::store::NewGrant {
            buyer: "buyer:other".into(),
            datasets: vec!["city_health".into()],
            purpose: "insurance_pricing".into(),
            ..Default::default()
        })
        .unwrap();
    let insurance = app.query_as("buyer:other", json!({ "sql": sql, "grant": grant }));
    let insured = rows(&insurance.json())[0][0].as_u64().unwrap();
    let expected = truth(
        "city_health",
        "SELECT COUNT(DISTINCT person_id) FROM city_health WHERE strpos(consented_purposes, ',insurance_pricing,') > 0",
    )[0][0]
        .as_u64()
        .unwrap();
    assert_eq!(insured, expected);
    // The filter holds under every plan shape: a CTE, a derived table, a join.
    for shaped in [
        "WITH c AS (SELECT person_id FROM city_health) SELECT COUNT(DISTINCT person_id) FROM c",
        "SELECT COUNT(DISTINCT x.person_id) FROM (SELECT * FROM city_health) x",
        "SELECT COUNT(DISTINCT c.person_id) FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id",
    ] {
        let r = app.query(shaped);
        assert_eq!(
            rows(&r.json())[0][0].as_u64().unwrap(),
            consenting,
            "{shaped}"
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
    let hashes: Vec<(String, String)> = app
        .store()
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
    assert_eq!(hashes.len(), 3);
    assert_ne!(hashes[0].0, hashes[1].0, "different SQL text");
    assert_eq!(hashes[0].1, hashes[1].1, "the same plan");
    assert_ne!(hashes[0].1, hashes[2].1);
}
