use crate::helpers::spawn_app;
use serde_json::json;

#[test]
fn health_check_needs_no_key() {
    let app = spawn_app();
    let r = app.get("/healthz", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    assert!(r.headers.contains_key("x-request-id"));
}

#[test]
fn missing_wrong_and_malformed_keys_are_unauthenticated() {
    let app = spawn_app();
    let body = serde_json::to_vec(&json!({ "sql": "SELECT 1" })).unwrap();
    for key in [
        None,
        Some("wrong-key"),
        Some("fgk_0000000000000000000000000000000000000000000000000000000000000000"),
    ] {
        let r = app.request("POST", "/v1/queries", key, Some(&body), None);
        assert_eq!(r.status, 401, "key {key:?}");
        assert_eq!(r.code().as_deref(), Some("unauthenticated"));
        assert_eq!(
            r.headers.get("www-authenticate").map(String::as_str),
            Some("Bearer")
        );
    }
    let r = app.get("/v1/datasets", None);
    assert_eq!(r.status, 401);
}

#[test]
fn only_buyers_run_queries() {
    let app = spawn_app();
    for who in ["owner:hospital", "auditor:cac"] {
        let r = app.query_as(
            who,
            json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district" }),
        );
        assert_eq!(r.status, 403, "{who}: {}", r.text());
        assert_eq!(r.code().as_deref(), Some("forbidden"));
    }
}

#[test]
fn unknown_routes_answer_json_404() {
    let app = spawn_app();
    let r = app.get("/v2/nothing", None);
    assert_eq!(r.status, 404);
    assert_eq!(r.code().as_deref(), Some("not_found"));
}
