//! What a restart must not lose: spent epsilon, used quotas and released
//! answers are rebuilt from the durable state, exactly as they were.

use crate::helpers::{Admin, PURPOSE, Server};
use frostglass::store::{NewGrant, Principal, Role};
use serde_json::{Value, json};

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(60)))
        .build()
        .into()
}

fn post(base: &str, key: &str, sql: &str) -> Value {
    let mut resp = client()
        .post(format!("{base}/v1/queries"))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(json!({ "sql": sql }))
        .unwrap();
    let status = resp.status().as_u16();
    let doc: Value = resp.body_mut().read_json().unwrap();
    assert_eq!(status, 200, "{doc}");
    doc
}

fn grants(base: &str, key: &str) -> Value {
    let mut resp = client()
        .get(format!("{base}/v1/grants"))
        .header("Authorization", &format!("Bearer {key}"))
        .call()
        .unwrap();
    resp.body_mut().read_json().unwrap()
}

#[test]
fn spent_budget_used_quotas_and_cached_answers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = Admin::open(&data);
    let key = admin
        .add_principal(&Principal {
            id: "buyer:restart".into(),
            role: Role::Buyer,
            org: Some("restart".into()),
            region: "CN".into(),
        })
        .unwrap();
    admin
        .add_grant(&NewGrant {
            buyer: "buyer:restart".into(),
            datasets: vec!["city_health".into(), "enterprise_registry".into()],
            purpose: PURPOSE.into(),
            queries_per_day: Some(50),
            rows_per_day: Some(10_000_000),
            epsilon: Some(5.0),
            ..NewGrant::default()
        })
        .unwrap();
    drop(admin);
    let log = dir.path().join("server.log");

    let server = Server::start(&data, &log, &[]);
    let dp_sql = "SELECT district, COUNT(*) AS visits FROM city_health GROUP BY district";
    let first = post(&server.base, &key, dp_sql);
    assert!(first["usage"]["epsilon"].as_f64().unwrap() > 0.0);
    post(
        &server.base,
        &key,
        "SELECT gender, COUNT(*) FROM city_health GROUP BY gender",
    );
    post(
        &server.base,
        &key,
        "SELECT COUNT(*) FROM enterprise_registry",
    );
    let before = grants(&server.base, &key);
    let spent = before["grants"][0]["budget"]["epsilon_spent"]
        .as_f64()
        .unwrap();
    assert!(spent > 0.0, "{before}");
    assert_eq!(before["grants"][0]["used_today"]["queries"], 3, "{before}");
    // SIGKILL: nothing of the process's memory survives, only what is on disk.
    server.kill();

    let server = Server::start(&data, &log, &[]);
    let after = grants(&server.base, &key);
    for field in ["budget", "used_today", "remaining_today"] {
        assert_eq!(
            after["grants"][0][field], before["grants"][0][field],
            "{field} changed across the restart"
        );
    }
    // The same query again: the stored release, at no charge.
    let again = post(&server.base, &key, dp_sql);
    assert_eq!(again["rows"], first["rows"]);
    assert_eq!(again["usage"]["epsilon"], 0.0);
    assert_eq!(again["budget"]["epsilon_spent"].as_f64().unwrap(), spent);
    let last = grants(&server.base, &key);
    assert_eq!(last["grants"][0]["used_today"]["queries"], 4);
}
