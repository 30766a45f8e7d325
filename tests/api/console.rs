//! The console's sessions over real HTTP: sign-in, the cookie standing in
//! for the key on the API, CSRF and origin checks on state changes, expiry,
//! key rotation and sign-out ending sessions, role-gated views; and the read
//! routes the console renders (refusals, query history, server-side verify).
//! The pages themselves are exercised in a real browser by tests/console/run.py.

use crate::helpers::*;
use frostglass::config::Settings;
use serde_json::{Value, json};

struct Signed {
    cookie: String,
    csrf: String,
}

fn sign_in(app: &TestApp, principal: &str) -> Signed {
    let body = serde_json::to_vec(&json!({ "key": app.key(principal) })).unwrap();
    let r = app.send("POST", "/console/session", &[], Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    let set = &r.headers["set-cookie"];
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    Signed {
        cookie: set.split(';').next().unwrap().to_string(),
        csrf: r.json()["csrf"].as_str().unwrap().to_string(),
    }
}

fn with_cookie<'a>(s: &'a Signed, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut headers = vec![("Cookie", s.cookie.as_str())];
    headers.extend_from_slice(extra);
    headers
}

#[test]
fn a_session_cookie_stands_in_for_the_key_and_state_changes_need_the_token_and_origin() {
    let app = spawn_app();
    let owner = sign_in(&app, "owner:hospital");
    // Reads with the cookie alone: the same answer as with the key.
    let by_cookie = app.send("GET", "/v1/grants", &with_cookie(&owner, &[]), None);
    assert_eq!(by_cookie.status, 200);
    assert_eq!(
        by_cookie.json(),
        app.get("/v1/grants", Some(app.key("owner:hospital")))
            .json()
    );
    // The role behind the cookie is the key's: an owner is no auditor.
    let audit = app.send("GET", "/v1/audit/head", &with_cookie(&owner, &[]), None);
    assert_eq!(audit.code().as_deref(), Some("forbidden"));
    // A state change without the token, with a wrong one, or from another
    // origin (another port is the same site, so the cookie rides along).
    let path = "/v1/reviews/q_missing/approve";
    let own_origin = app.base.clone();
    for headers in [
        with_cookie(&owner, &[]),
        with_cookie(&owner, &[("X-CSRF-Token", "0000")]),
        with_cookie(
            &owner,
            &[
                ("X-CSRF-Token", owner.csrf.as_str()),
                ("Origin", "http://127.0.0.1:1"),
            ],
        ),
    ] {
        let r = app.send("POST", path, &headers, None);
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.code().as_deref(), Some("csrf_rejected"));
    }
    // With both, the request reaches the route (no such held answer).
    let r = app.send(
        "POST",
        path,
        &with_cookie(
            &owner,
            &[
                ("X-CSRF-Token", owner.csrf.as_str()),
                ("Origin", own_origin.as_str()),
            ],
        ),
        None,
    );
    assert_eq!(r.code().as_deref(), Some("not_found"), "{}", r.text());
    // Another session's token does not fit this one.
    let other = sign_in(&app, "owner:hospital");
    let r = app.send(
        "POST",
        path,
        &with_cookie(&owner, &[("X-CSRF-Token", other.csrf.as_str())]),
        None,
    );
    assert_eq!(r.code().as_deref(), Some("csrf_rejected"));
    // Sign-out needs the token too, then the cookie is dead.
    let out = app.send(
        "DELETE",
        "/console/session",
        &with_cookie(&owner, &[("X-CSRF-Token", owner.csrf.as_str())]),
        None,
    );
    assert_eq!(out.status, 200, "{}", out.text());
    assert!(out.headers["set-cookie"].contains("Max-Age=0"));
    let after = app.send("GET", "/v1/grants", &with_cookie(&owner, &[]), None);
    assert_eq!(after.code().as_deref(), Some("unauthenticated"));
}

#[test]
fn sign_in_refuses_bad_keys_forms_from_other_sites_and_wrong_bodies() {
    let app = spawn_app();
    let r = app.send("POST", "/console/session", &[], Some(br#"{"key": "nope"}"#));
    assert_eq!(r.code().as_deref(), Some("unauthenticated"));
    assert!(!r.headers.contains_key("set-cookie"));
    for body in [&b"{}"[..], b"not json", br#"{"key": "k", "extra": 1}"#] {
        let r = app.send("POST", "/console/session", &[], Some(body));
        assert_eq!(r.code().as_deref(), Some("invalid_request"), "{}", r.text());
    }
    // A form post with the right key signs in and sends the browser to its view…
    let form = format!("key={}", app.key("buyer:acme"));
    let form_headers = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = app.send(
        "POST",
        "/console/session",
        &form_headers,
        Some(form.as_bytes()),
    );
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.headers["location"], "/console/buyer");
    // …a wrong key shows the page again with a fixed sentence, never the input…
    let r = app.send(
        "POST",
        "/console/session",
        &form_headers,
        Some(b"key=%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
    );
    assert_eq!(r.status, 401);
    assert!(r.text().contains("That key was not accepted."));
    assert!(!r.text().contains("<script>alert"));
    // …and the same post from another site's page is refused (login CSRF).
    let cross = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", "http://evil.example"),
    ];
    let r = app.send("POST", "/console/session", &cross, Some(form.as_bytes()));
    assert_eq!(r.code().as_deref(), Some("csrf_rejected"));
}

#[test]
fn views_open_only_for_their_roles_and_pages_carry_a_strict_policy() {
    let app = spawn_app();
    let page = app.get("/console/", None);
    assert_eq!(page.status, 200);
    let csp = &page.headers["content-security-policy"];
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.headers["x-frame-options"], "DENY");
    // Without a session every view sends the browser to sign in.
    assert_eq!(app.get("/console/auditor", None).status, 303);
    let buyer = sign_in(&app, "buyer:acme");
    let cookie = with_cookie(&buyer, &[]);
    let view = |name: &str| app.send("GET", &format!("/console/{name}"), &cookie, None);
    assert_eq!(view("buyer").status, 200);
    assert!(view("buyer").text().contains("data-view=\"buyer\""));
    for other in ["auditor", "owner"] {
        let r = view(other);
        assert_eq!(r.status, 403, "{other}");
        assert!(r.text().contains("data-view=\"refused\""), "{other}");
    }
    assert_eq!(view("nothing").status, 404);
    let home = app.send("GET", "/console/", &cookie, None);
    assert_eq!(
        (home.status, home.headers["location"].as_str()),
        (303, "/console/buyer")
    );
    let script = app.get("/console/console.js", None);
    assert!(script.headers["content-type"].starts_with("text/javascript"));
    // The script never writes markup from data.
    assert!(!script.text().contains("innerHTML"));
}

#[test]
fn sessions_expire_and_end_with_their_key() {
    let mut settings = Settings::default();
    settings.console.session_idle_s = 0;
    let app = spawn_app_with(Options {
        settings,
        ..Options::default()
    });
    let s = sign_in(&app, "buyer:acme");
    let r = app.send("GET", "/v1/grants", &with_cookie(&s, &[]), None);
    assert_eq!(
        r.code().as_deref(),
        Some("unauthenticated"),
        "idle timeout 0"
    );

    let app = spawn_app();
    let s = sign_in(&app, "buyer:acme");
    let rotate = app.request(
        "POST",
        "/v1/principals/me/keys/rotate",
        Some(app.key("buyer:acme")),
        None,
        None,
    );
    assert_eq!(rotate.status, 201, "{}", rotate.text());
    let r = app.send("GET", "/v1/grants", &with_cookie(&s, &[]), None);
    assert_eq!(
        r.code().as_deref(),
        Some("unauthenticated"),
        "the key it was opened with is gone"
    );
}

#[test]
fn refusals_history_and_verification_as_each_role_sees_them() {
    let app = spawn_app();
    let acme = app.key("buyer:acme").to_string();
    let other = app.key("buyer:other").to_string();
    assert_eq!(
        app.query("SELECT hour, COUNT(*) FROM power_grid GROUP BY hour")
            .status,
        200
    );
    for key in [&acme, &acme] {
        let r = app.ask(
            key,
            json!({ "sql": "SELECT * FROM city_health", "purpose": PURPOSE }),
        );
        assert_eq!(r.status, 403);
    }
    let r = app.ask(
        &other,
        json!({ "sql": "SELECT * FROM city_health", "purpose": PURPOSE }),
    );
    assert_eq!(r.status, 403);
    let count = |key: &str| -> u64 {
        let doc = app.get("/v1/refusals?days=7", Some(key)).json();
        doc["refusals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count(&acme), 2, "a buyer sees its own");
    assert_eq!(
        count(app.key("owner:hospital")),
        3,
        "the owner, all on its data"
    );
    assert_eq!(count(app.key("auditor:cac")), 3);
    assert_eq!(
        app.get("/v1/refusals?days=0", Some(&acme))
            .code()
            .as_deref(),
        Some("invalid_request")
    );

    let history = app.get("/v1/queries?limit=10", Some(&acme)).json();
    let queries = history["queries"].as_array().unwrap();
    assert_eq!(queries.len(), 3, "{history}");
    assert_eq!(queries[0]["decision"], "refused", "newest first");
    assert!(queries[0]["evidence"].is_null());
    let answered = &queries[2];
    assert_eq!(answered["decision"], "answered");
    let evidence = app.get(answered["evidence"].as_str().unwrap(), Some(&acme));
    assert_eq!(evidence.status, 200);
    assert_eq!(evidence.json()["query_id"], answered["query_id"]);
    // Each of them by id: its recorded decision, to its buyer only.
    let one = format!("/v1/queries/{}", answered["query_id"].as_str().unwrap());
    let mine = app.get(&one, Some(&acme)).json();
    assert_eq!(mine["status"], "answered", "{mine}");
    assert_eq!(mine["evidence"], answered["evidence"]);
    assert_eq!(
        app.get(&one, Some(&other)).code().as_deref(),
        Some("not_found")
    );
    assert_eq!(
        app.get("/v1/queries", Some(app.key("auditor:cac")))
            .code()
            .as_deref(),
        Some("forbidden")
    );

    let auditor = app.key("auditor:cac");
    assert_eq!(
        app.get("/v1/audit/verify", Some(auditor)).json()["last"],
        Value::Null
    );
    let run = app.request("POST", "/v1/audit/verify", Some(auditor), None, None);
    assert_eq!(run.status, 200, "{}", run.text());
    let result = run.json();
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(
        app.get("/v1/audit/verify", Some(auditor)).json()["last"],
        result
    );
    // A rewritten entry: the server's verification names its index.
    let db = rusqlite::Connection::open(app.data_dir.join("frostglass.db")).unwrap();
    let index: i64 = db
        .query_row(
            "SELECT MIN(idx) FROM usage_log WHERE body LIKE '%buyer:other%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "UPDATE usage_log SET body = replace(body, 'buyer:other', 'buyer:acme') WHERE idx = ?1",
        [index],
    )
    .unwrap();
    let broken = app
        .request("POST", "/v1/audit/verify", Some(auditor), None, None)
        .json();
    assert_eq!(broken["ok"], false, "{broken}");
    assert_eq!(broken["broken_index"], index, "{broken}");
    assert_eq!(
        app.request("POST", "/v1/audit/verify", Some(&acme), None, None)
            .code()
            .as_deref(),
        Some("forbidden")
    );
}
