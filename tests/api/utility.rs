//! Utility at a fixed ε: public group domains release every declared group
//! (none selected from the data), and the values estimate the raw files.

use crate::helpers::{CONSENTED, Options, spawn_app, spawn_app_with, truth};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};

/// How far a released value may sit from the truth, in noise scales
/// (Laplace tail mass beyond 14 scales: below 1e-6).
const TAIL: f64 = 14.0;

fn rows(doc: &Value) -> Vec<Vec<Value>> {
    serde_json::from_value(doc["rows"].clone()).unwrap()
}

#[test]
fn a_count_by_district_and_age_is_released_in_full() {
    let app = spawn_app();
    let r = app
        .query("SELECT district, age, COUNT(*) AS visits FROM city_health GROUP BY district, age");
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    let noise = &doc["release"]["noise"];
    assert_eq!(noise["partitions"], "public");
    // Every (district, age) of the declared domains: 12 districts × ages 0..=110,
    // the ones nobody has among them, each once.
    let released = rows(&doc);
    assert_eq!(released.len(), 12 * 111);
    assert_eq!(doc["release"]["released_groups"], 12 * 111);
    let cells: HashSet<(String, i64)> = released
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap()))
        .collect();
    assert_eq!(cells.len(), 12 * 111);
    assert!(cells.contains(&("mentougou".to_string(), 110)));
    // Values estimate the capped truth from the raw file; cells without data
    // estimate zero.
    let b = noise["columns"][0]["scale"].as_f64().unwrap();
    assert_eq!(b, 20.0 / 0.5);
    let truth: HashMap<(String, i64), f64> = truth(
        "city_health",
        &format!(
            "SELECT district, age, SUM(CASE WHEN n > 20 THEN 20 ELSE n END) FROM \
             (SELECT district, age, person_id, COUNT(*) AS n FROM city_health WHERE {CONSENTED} GROUP BY district, age, person_id) \
             GROUP BY district, age"
        ),
    )
    .into_iter()
    .map(|t| {
        (
            (t[0].as_str().unwrap().to_string(), t[1].as_i64().unwrap()),
            t[2].as_f64().unwrap(),
        )
    })
    .collect();
    let mut total_error = 0.0;
    for row in &released {
        let key = (
            row[0].as_str().unwrap().to_string(),
            row[1].as_i64().unwrap(),
        );
        let t = truth.get(&key).copied().unwrap_or(0.0);
        let v = row[2].as_f64().unwrap();
        assert!(
            (v - t).abs() <= TAIL * b,
            "{key:?}: released {v}, truth {t}"
        );
        total_error += (v - t).abs();
    }
    // The noise is there, and as wide as reported (mean |Laplace| = scale;
    // clamping at zero makes empty cells' errors smaller).
    let mean_error = total_error / released.len() as f64;
    assert!(
        (0.2 * b..1.5 * b).contains(&mean_error),
        "mean error {mean_error}, scale {b}"
    );
}

#[test]
fn a_bucket_of_a_public_domain_stays_public() {
    let app = spawn_app();
    let r = app.query(
        "SELECT floor(age / 10) * 10 AS decade, gender, COUNT(DISTINCT person_id) AS persons \
         FROM city_health GROUP BY floor(age / 10) * 10, gender",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["release"]["noise"]["partitions"], "public");
    // Ages 0..=110 make twelve decades, times two genders.
    let released = rows(&doc);
    assert_eq!(released.len(), 24);
    let decades: HashSet<i64> = released
        .iter()
        .map(|r| r[0].as_f64().unwrap() as i64)
        .collect();
    assert_eq!(decades, (0..=110).step_by(10).collect());
    // A key over a column without a domain is selected from the data instead.
    let r = app.query(
        "SELECT gender, date_trunc('month', visit_date) AS m, COUNT(*) AS n FROM city_health \
         GROUP BY gender, date_trunc('month', visit_date)",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let noise = &r.json()["release"]["noise"];
    assert_eq!(noise["partitions"], "selected");
    assert!(noise["selection_threshold"].as_f64().unwrap() > 10.0);
}

/// The shared catalog with `city_health.<column>` declaring `domain`.
fn city_health_with_domain(column: &str, domain: Value) -> std::path::PathBuf {
    crate::helpers::catalog_with(|m| {
        if m["id"] == "city_health" {
            for c in m["columns"].as_array_mut().unwrap() {
                if c["name"] == column {
                    c["domain"] = domain.clone();
                }
            }
        }
    })
}

#[test]
fn only_declared_values_come_out_of_a_public_domain() {
    // The attack: a group the data holds but the domain does not declare
    // (here mentougou, dropped from the declaration) must not show that it
    // exists; a declared value nobody has comes out like any other.
    let catalog = city_health_with_domain("district", json!(["chaoyang", "haidian", "nowhere"]));
    let app = spawn_app_with(Options {
        catalog: Some(catalog),
        ..Default::default()
    });
    let r = app.query("SELECT district, COUNT(*) AS n FROM city_health GROUP BY district");
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["release"]["noise"]["partitions"], "public");
    let districts: HashSet<String> = rows(&doc)
        .iter()
        .map(|r| r[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        districts,
        ["chaoyang", "haidian", "nowhere"]
            .map(str::to_string)
            .into()
    );
}

#[test]
fn a_domain_that_does_not_fit_its_column_stops_the_catalog() {
    let catalog = city_health_with_domain("age", json!(["young", "old"]));
    let schemas = frostglass::validate::Schemas::compiled();
    let loaded = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(frostglass::catalog::Catalog::load(&catalog, &schemas));
    let err = loaded
        .err()
        .expect("a string domain on an integer column loaded")
        .to_string();
    assert!(err.contains("age") && err.contains("domain"), "{err}");
}
