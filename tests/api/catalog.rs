use crate::helpers::{column_values, spawn_app};

#[test]
fn datasets_are_listed_with_classes_and_rules() {
    let app = spawn_app();
    let r = app.get("/v1/datasets", Some(app.key("buyer:other")));
    assert_eq!(r.status, 200);
    let doc = r.json();
    let datasets = doc["datasets"].as_array().unwrap();
    let ids: Vec<&str> = datasets.iter().map(|d| d["id"].as_str().unwrap()).collect();
    for id in [
        "city_health",
        "telecom_usage",
        "enterprise_registry",
        "power_grid",
        "population_registry",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    let health = datasets.iter().find(|d| d["id"] == "city_health").unwrap();
    assert_eq!(health["level"], "general");
    assert_eq!(health["privacy_unit"], "person_id");
    assert_eq!(health["release"]["min_group_size"], 10);
    let name = health["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "name")
        .unwrap();
    assert_eq!(name["class"], "identifier");
    // Prices as the owner lists them, and the quality card.
    assert_eq!(health["pricing"]["per_epsilon"], "1.00");
    assert_eq!(health["quality"]["method"], "differential_privacy");
    assert_eq!(health["status"], "active");
    let grants = app.get("/v1/grants", Some(app.key("buyer:acme"))).json();
    assert_eq!(
        grants["grants"][0]["subscription"]["monthly"], "300.00",
        "{grants}"
    );
    let one = app.get("/v1/datasets/power_grid", Some(app.key("buyer:other")));
    assert_eq!(one.json()["level"], "important");
    let missing = app.get("/v1/datasets/nope", Some(app.key("buyer:other")));
    assert_eq!(missing.status, 404);
}

#[test]
fn previews_are_synthetic() {
    let app = spawn_app();
    let r = app.get(
        "/v1/datasets/city_health/preview",
        Some(app.key("buyer:other")),
    );
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["synthetic"], true);
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 10);
    let text = r.text();
    let names = column_values("city_health", "name");
    let cards = column_values("city_health", "id_card");
    for value in names.iter().chain(cards.iter()) {
        assert!(
            !text.contains(value.as_str()),
            "preview contains a real value"
        );
    }
    // Ages stay within the declared bounds.
    let age_index = doc["columns"]
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c["name"] == "age")
        .unwrap();
    for row in rows {
        let age = row[age_index].as_i64().unwrap();
        assert!((0..=110).contains(&age));
    }
}
