//! Attacks on the release, each shown to fail: differencing, averaging by
//! repetition and by rewriting, one person's many rows skewing a sum, an
//! absurd value skewing an average, and multiplying the budget through
//! several grants or several buyers.

use crate::helpers::{CONSENTED, Options, TestApp, catalog_with, spawn_app, spawn_app_with, truth};
use frostglass::store::{NewGrant, Principal, Role};
use serde_json::{Value, json};

fn value(r: &crate::helpers::Response) -> f64 {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["rows"][0][1]
        .as_f64()
        .or_else(|| r.json()["rows"][0][0].as_f64())
        .unwrap_or(f64::NAN)
}

pub fn new_buyer(app: &TestApp, id: &str, epsilon: f64) -> (String, String) {
    let store = app.admin();
    let p = Principal {
        id: id.into(),
        role: Role::Buyer,
        org: Some(id.into()),
        region: "CN".into(),
    };
    let key = store.add_principal(&p).unwrap();
    let grant = store
        .add_grant(&NewGrant {
            buyer: id.into(),
            datasets: vec!["city_health".into()],
            purpose: "public_health_research".into(),
            epsilon: Some(epsilon),
            ..NewGrant::default()
        })
        .unwrap();
    (key, grant)
}

fn ask(app: &TestApp, key: &str, sql: &str) -> crate::helpers::Response {
    app.ask(key, json!({ "sql": sql }))
}

#[test]
fn differencing_two_counts_does_not_reveal_the_group_between_them() {
    let app = spawn_app();
    // The difference of two counts is the number of persons of one age in
    // chaoyang: pick an age whose group is far below the threshold.
    let small = truth(
        "city_health",
        &format!(
            "SELECT age, COUNT(DISTINCT person_id) AS c FROM city_health WHERE {CONSENTED} AND district = 'chaoyang' \
             GROUP BY age HAVING COUNT(DISTINCT person_id) BETWEEN 2 AND 9 ORDER BY c DESC, age LIMIT 1"
        ),
    );
    let (age, secret) = (small[0][0].as_i64().unwrap(), small[0][1].as_f64().unwrap());
    let all = "SELECT district, COUNT(DISTINCT person_id) FROM city_health WHERE district = 'chaoyang' GROUP BY district";
    let without = format!(
        "SELECT district, COUNT(DISTINCT person_id) FROM city_health WHERE district = 'chaoyang' AND age <> {age} GROUP BY district"
    );
    // Many attackers, each with their own grant: every difference is off by
    // the noise of two releases, whose spread dwarfs the secret.
    let mut errors = Vec::new();
    let mut scale = 0.0;
    for i in 0..40 {
        let (key, _) = new_buyer(&app, &format!("buyer:diff{i}"), 10.0);
        let first = ask(&app, &key, all);
        scale = first.json()["release"]["noise"]["columns"][0]["scale"]
            .as_f64()
            .unwrap();
        let d = value(&first) - value(&ask(&app, &key, &without));
        errors.push(d - secret);
    }
    let exact = errors.iter().filter(|e| e.abs() < 0.5).count();
    let mean_abs = errors.iter().map(|e| e.abs()).sum::<f64>() / errors.len() as f64;
    // COUNT(DISTINCT unit) over public districts: scale max_groups / ε = 8
    // per release; the difference of two such draws averages 1.5 scales.
    assert_eq!(scale, 8.0);
    assert!(
        exact <= 6,
        "{exact} of 40 differences were exact: {errors:?}"
    );
    assert!(
        mean_abs > 0.6 * 1.5 * scale,
        "mean error {mean_abs} is too small to protect a group of {secret}"
    );
}

#[test]
fn repeating_a_query_returns_the_same_answer_at_no_cost() {
    let app = spawn_app();
    let (key, _) = new_buyer(&app, "buyer:repeat", 10.0);
    let sql = "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district ORDER BY district";
    let first = ask(&app, &key, sql);
    assert_eq!(first.json()["usage"]["epsilon"], 0.5);
    for spelling in [
        sql,
        "select district, count(*) as n from city_health group by district order by district",
        "SELECT  district ,COUNT(*)  AS n\nFROM city_health\nGROUP BY district ORDER BY district",
    ] {
        let again = ask(&app, &key, spelling);
        assert_eq!(again.json()["rows"], first.json()["rows"], "{spelling}");
        assert_eq!(again.json()["usage"]["epsilon"], 0.0);
    }
    assert_eq!(first.json()["budget"]["epsilon_spent"], 0.5);
    let grants = app.get("/v1/grants", Some(&key)).json();
    assert_eq!(grants["grants"][0]["budget"]["epsilon_spent"], 0.5);
}

#[test]
fn rewritten_variants_drain_the_budget_instead_of_averaging_noise_away() {
    let app = spawn_app();
    let (key, _) = new_buyer(&app, "buyer:avg", 2.0);
    let variants = [
        "SELECT district, COUNT(*) FROM city_health WHERE age >= 0 GROUP BY district",
        "SELECT district, COUNT(*) FROM city_health WHERE age >= -1 GROUP BY district",
        "SELECT district, COUNT(*) FROM city_health WHERE age <= 200 GROUP BY district",
        "SELECT district, COUNT(*) FROM city_health WHERE age < 500 GROUP BY district",
        "SELECT district, COUNT(*) FROM city_health WHERE age > -7 GROUP BY district",
    ];
    let statuses: Vec<u16> = variants.iter().map(|v| ask(&app, &key, v).status).collect();
    assert_eq!(statuses[..4], [200, 200, 200, 200]);
    let refused = ask(&app, &key, variants[4]);
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code().as_deref(), Some("budget_exhausted"));
    // Repeats of answered variants still work: they cost nothing.
    assert_eq!(ask(&app, &key, variants[0]).status, 200);
}

#[test]
fn one_person_with_many_rows_moves_a_count_only_by_the_bound() {
    let app = spawn_app();
    // The most frequent visitor, and a bound the buyer tightens to well below
    // their visits (and most persons'), so that capping matters.
    let heavy = truth(
        "city_health",
        &format!(
            "SELECT district, COUNT(*) AS n FROM city_health WHERE {CONSENTED} GROUP BY person_id, district ORDER BY n DESC LIMIT 1"
        ),
    );
    let (district, visits) = (
        heavy[0][0].as_str().unwrap().to_string(),
        heavy[0][1].as_f64().unwrap(),
    );
    const BOUND: u64 = 3;
    assert!(
        visits > 4.0 * BOUND as f64,
        "the demo data has a heavy visitor ({visits})"
    );
    let r = app.query_as(
        "buyer:acme",
        json!({
            "sql": format!("SELECT district, COUNT(*) AS n FROM city_health WHERE district = '{district}' GROUP BY district"),
            "dp": { "max_rows_per_unit": BOUND },
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    let noise = &doc["release"]["noise"];
    assert_eq!(
        noise["max_rows_per_unit"], BOUND,
        "the answer states the bound"
    );
    assert_eq!(noise["partitions"], "public");
    // The district's domain is public: every district comes back, the others near zero.
    let released = doc["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row[0] == district.as_str())
        .expect("the filtered district is released")[1]
        .as_f64()
        .unwrap();
    let b = noise["columns"][0]["scale"].as_f64().unwrap();
    let raw = truth(
        "city_health",
        &format!("SELECT COUNT(*) FROM city_health WHERE {CONSENTED} AND district = '{district}'"),
    )[0][0]
        .as_f64()
        .unwrap();
    let bounded = truth(
        "city_health",
        &format!(
            "SELECT SUM(CASE WHEN n > {BOUND} THEN {BOUND} ELSE n END) FROM (SELECT person_id, COUNT(*) AS n FROM city_health \
             WHERE {CONSENTED} AND district = '{district}' GROUP BY person_id)"
        ),
    )[0][0]
        .as_f64()
        .unwrap();
    // Capping is active here, and the release estimates the capped count: one
    // person moves it by at most the bound, whatever their rows.
    assert!(
        raw - bounded > 4.0 * b,
        "capping must matter here: raw {raw}, bounded {bounded}, scale {b}"
    );
    assert_eq!(
        b,
        BOUND as f64 / 0.5,
        "sensitivity is the bound, not the heavy visitor's {visits} rows; public groups spend no ε on selection"
    );
    assert!(
        (released - bounded).abs() <= 14.0 * b,
        "released {released}, bounded truth {bounded}"
    );
}

#[test]
fn a_buyer_can_tighten_a_release_but_never_loosen_it() {
    let app = spawn_app();
    let sql = "SELECT gender, COUNT(*) AS n FROM city_health GROUP BY gender";
    for dp in [
        json!({ "max_rows_per_unit": 21 }),
        json!({ "max_rows_per_unit": 0 }),
        json!({ "max_groups_per_unit": 5 }),
        json!({ "selection_share": 0.99 }),
        json!({ "epsilon": 5 }),
    ] {
        let r = app.query_as("buyer:acme", json!({ "sql": sql, "dp": dp }));
        assert_eq!(r.status, 400, "{dp}: {}", r.text());
        assert_eq!(r.code().as_deref(), Some("invalid_request"), "{dp}");
    }
    // A selection share is used where groups are selected from the data.
    let r = app.query_as(
        "buyer:acme",
        json!({ "sql": "SELECT visit_date, COUNT(*) AS n FROM city_health GROUP BY visit_date",
                "dp": { "selection_share": 0.2 } }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let noise = &r.json()["release"]["noise"];
    assert_eq!(noise["partitions"], "selected");
    // Count noise: 20 rows / (0.8 × 0.5).
    assert_eq!(noise["columns"][0]["scale"], 50.0);
}

#[test]
fn an_absurd_value_cannot_drag_an_average_out_of_bounds() {
    let app = spawn_app();
    let outliers = truth(
        "city_health",
        &format!("SELECT COUNT(*) FROM city_health WHERE {CONSENTED} AND cost > 50000"),
    )[0][0]
        .as_u64()
        .unwrap();
    assert!(
        outliers > 0,
        "the demo data has values outside the declared bounds"
    );
    let r = app.query("SELECT district, AVG(cost) AS avg_cost, SUM(cost) AS total FROM city_health GROUP BY district");
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    let b_sum = doc["release"]["noise"]["columns"][1]["scale"]
        .as_f64()
        .unwrap();
    for row in doc["rows"].as_array().unwrap() {
        let avg = row[1].as_f64().unwrap();
        assert!(
            (0.0..=50_000.0).contains(&avg),
            "average {avg} outside the declared bounds"
        );
        // The sum estimates the clamped, capped truth, not the raw one.
        let district = row[0].as_str().unwrap();
        let clamped = truth(
            "city_health",
            &format!(
                "SELECT SUM(s) FROM (SELECT person_id, SUM(CASE WHEN cost > 50000 THEN 50000 ELSE cost END) AS s, COUNT(*) AS n \
                 FROM city_health WHERE {CONSENTED} AND district = '{district}' GROUP BY person_id HAVING COUNT(*) <= 20)"
            ),
        )[0][0]
            .as_f64()
            .unwrap_or(0.0);
        let total = row[2].as_f64().unwrap();
        // Persons above 20 visits are scaled down, so the truth lies between the
        // sum over the light visitors and that plus 20 clamped visits per heavy one.
        assert!(
            total >= clamped - 14.0 * b_sum,
            "{district}: sum {total} below {clamped}"
        );
    }
}

#[test]
fn budgets_are_not_multiplied_by_more_grants_or_more_buyers() {
    // A dataset whose lifetime budget is 2.1 epsilon, shared by everyone:
    // 0.1 for its quality card, 2 for queries.
    let catalog = catalog_with(|m| {
        if m["id"] == "city_health" {
            m["release"]["dp"]["epsilon_total"] = json!(2.1);
            m["evaluation"] = json!({ "epsilon": 0.1 });
        }
    });
    let app = spawn_app_with(Options {
        catalog: Some(catalog),
        ..Options::default()
    });
    let (alice, _) = new_buyer(&app, "buyer:alice", 10.0);
    // A second grant of the same buyer.
    let second = app
        .admin()
        .add_grant(&NewGrant {
            buyer: "buyer:alice".into(),
            datasets: vec!["city_health".into()],
            purpose: "urban_planning".into(),
            epsilon: Some(10.0),
            ..NewGrant::default()
        })
        .unwrap();
    let (bob, _) = new_buyer(&app, "buyer:bob", 10.0);
    let q = |n: u32| {
        format!("SELECT district, COUNT(*) FROM city_health WHERE age >= {n} GROUP BY district")
    };
    assert_eq!(ask(&app, &alice, &q(0)).status, 200);
    assert_eq!(ask(&app, &alice, &q(1)).status, 200);
    let body = serde_json::to_vec(&json!({ "sql": q(2), "grant": second })).unwrap();
    let via_second = app.request("POST", "/v1/queries", Some(&alice), Some(&body), None);
    assert_eq!(via_second.status, 200, "{}", via_second.text());
    assert_eq!(ask(&app, &bob, &q(3)).status, 200);
    // Four queries at 0.5: the dataset's 2 epsilon are spent, for every grant of every buyer.
    for key in [&alice, &bob] {
        let r = ask(&app, key, &q(9));
        assert_eq!(
            r.code().as_deref(),
            Some("budget_exhausted"),
            "{}",
            r.text()
        );
        assert!(r.text().contains("dataset:city_health"));
    }
    let body = serde_json::to_vec(&json!({ "sql": q(9), "grant": second })).unwrap();
    let r = app.request("POST", "/v1/queries", Some(&alice), Some(&body), None);
    assert_eq!(r.code().as_deref(), Some("budget_exhausted"));
    // Data without DP (row-thresholded) is not affected.
    let open = app.query("SELECT district, COUNT(*) FROM power_grid GROUP BY district");
    assert_eq!(open.status, 200);
    let _: Value = open.json();
}

#[test]
fn failures_after_reading_data_still_charge_the_budget() {
    let mut settings = frostglass::config::Settings::default();
    settings.limits.max_result_rows = 1;
    let app = spawn_app_with(Options {
        settings,
        ..Options::default()
    });
    let (key, _) = new_buyer(&app, "buyer:fail", 10.0);
    // The release succeeds, the answer is too long: refused after the data was read.
    let r = ask(
        &app,
        &key,
        "SELECT district, COUNT(*) FROM city_health GROUP BY district",
    );
    assert_eq!(r.code().as_deref(), Some("resource_limit"), "{}", r.text());
    let grants = app.get("/v1/grants", Some(&key)).json();
    assert_eq!(grants["grants"][0]["budget"]["epsilon_spent"], 0.5);
    // A refusal before reading (policy) costs nothing.
    let refused = ask(
        &app,
        &key,
        "SELECT name, COUNT(*) FROM city_health GROUP BY name",
    );
    assert_eq!(refused.status, 403);
    let grants = app.get("/v1/grants", Some(&key)).json();
    assert_eq!(grants["grants"][0]["budget"]["epsilon_spent"], 0.5);
}

#[test]
fn a_dataset_may_ask_for_gaussian_noise() {
    let catalog = catalog_with(|m| {
        if m["id"] == "telecom_usage" {
            m["release"]["dp"]["mechanism"] = json!("gaussian");
        }
    });
    let app = spawn_app_with(Options {
        catalog: Some(catalog),
        ..Options::default()
    });
    let r = app.query(
        "SELECT month, COUNT(DISTINCT person_id) AS persons FROM telecom_usage GROUP BY month",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["release"]["noise"]["mechanism"], "discrete_gaussian");
    let truth_persons = truth(
        "telecom_usage",
        "SELECT COUNT(DISTINCT person_id) FROM telecom_usage WHERE strpos(consented_purposes, ',public_health_research,') > 0",
    )[0][0]
        .as_f64()
        .unwrap();
    let sigma = doc["release"]["noise"]["columns"][0]["scale"]
        .as_f64()
        .unwrap();
    for row in doc["rows"].as_array().unwrap() {
        let v = row[1].as_f64().unwrap();
        assert!(
            (v - truth_persons).abs() <= 6.0 * sigma,
            "{v} vs {truth_persons} (sigma {sigma})"
        );
    }
    // Sums of wide bounds would need noise too wide to sample exactly.
    let sum = app.query("SELECT month, SUM(calls) FROM telecom_usage GROUP BY month");
    assert_eq!(
        sum.rule().as_deref(),
        Some("dp_unsupported"),
        "{}",
        sum.text()
    );
}
