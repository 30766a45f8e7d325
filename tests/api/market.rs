//! The trade over HTTP: principals, a signed security-use commitment,
//! owners' decisions (one through a delegated operator), the grant they
//! make, and its revocation.

use crate::helpers::{PURPOSE, Response, TestApp, shared_catalog, spawn_app};
use base64::Engine;
use frostglass::store::{Principal, Role};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn post(app: &TestApp, key: &str, path: &str, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap();
    app.request("POST", path, Some(key), Some(&bytes), None)
}

fn keypair() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

/// A fresh Ed25519 key pair, registered for the principal holding `key`; and its id.
fn signing_key(app: &TestApp, key: &str) -> (Ed25519KeyPair, String) {
    let pair = keypair();
    let body = json!({ "public_key": b64(pair.public_key().as_ref()) });
    let r = post(app, key, "/v1/principals/me/signing-keys", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["key_id"].as_str().unwrap().to_string();
    (pair, id)
}

/// An app whose hospital reviews every answer on its visits (`city_health`).
fn reviewing_city_health() -> TestApp {
    let catalog = crate::helpers::catalog_with(|m| {
        if m["id"] == "city_health" {
            m["release"]["review"] = json!(true);
        }
    });
    crate::helpers::spawn_app_with(crate::helpers::Options {
        catalog: Some(catalog),
        ..Default::default()
    })
}

/// The app with an admin, whose key is returned.
fn with_admin(app: &TestApp) -> String {
    app.admin()
        .add_principal(&Principal {
            id: "admin:ops".into(),
            role: Role::Admin,
            org: Some("ops".into()),
            region: "CN".into(),
        })
        .unwrap()
}

fn kinds(app: &TestApp, kind: &str) -> Vec<Value> {
    app.admin()
        .entries(0, 100_000)
        .unwrap()
        .into_iter()
        .map(|(_, body, _)| serde_json::from_str::<Value>(&body).unwrap())
        .filter(|e| e["kind"] == kind)
        .collect()
}

#[test]
fn the_whole_trade_from_principals_to_settlement_evidence_and_revocation() {
    // The hospital reviews every answer on its visits.
    let app = reviewing_city_health();
    let admin = with_admin(&app);
    // The admin registers the principals of the trade over HTTP.
    let mut keys = std::collections::HashMap::new();
    for (id, role, org) in [
        ("buyer:newco", "buyer", "newco"),
        ("owner:grid", "owner", "grid_operator"),
        ("owner:opco", "owner", "opco"),
    ] {
        let r = post(
            &app,
            &admin,
            "/v1/principals",
            &json!({ "id": id, "role": role, "org": org, "region": "CN" }),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        keys.insert(id, r.json()["key"].as_str().unwrap().to_string());
    }
    let again = post(
        &app,
        &admin,
        "/v1/principals",
        &json!({ "id": "buyer:newco", "role": "buyer", "region": "CN" }),
    );
    assert_eq!(again.code().as_deref(), Some("conflict"));
    let by_owner = post(
        &app,
        app.key("owner:hospital"),
        "/v1/principals",
        &json!({ "id": "x", "role": "admin", "region": "CN" }),
    );
    assert_eq!(by_owner.status, 403);
    let buyer = keys["buyer:newco"].clone();
    // The buyer rotates its key: the old one stops working at once.
    let rotated = post(&app, &buyer, "/v1/principals/me/keys/rotate", &json!({}));
    assert_eq!(rotated.status, 201, "{}", rotated.text());
    assert_eq!(app.get("/v1/datasets", Some(&buyer)).status, 401);
    let buyer = rotated.json()["key"].as_str().unwrap().to_string();
    // ... registers a signing key, discovers and previews.
    let (pair, key_id) = signing_key(&app, &buyer);
    let listing = app.get("/v1/datasets", Some(&buyer)).json();
    let commitment_of = |id: &str| {
        listing["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap()["commitment"]["sha256"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        app.get("/v1/datasets/power_grid/preview", Some(&buyer))
            .status,
        200
    );
    // ... files a request over two owners' datasets.
    let request = json!({
        "datasets": ["city_health", "power_grid"],
        "purpose": PURPOSE,
        "period": { "from": "2026-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z" },
        "quotas": { "queries_per_day": 100 },
        "epsilon": 5.0,
    });
    let filed = post(&app, &buyer, "/v1/access-requests", &request);
    assert_eq!(filed.status, 201, "{}", filed.text());
    let filed = filed.json();
    assert_eq!(filed["status"], "awaiting_signature");
    let id = filed["id"].as_str().unwrap().to_string();
    let to_sign = unb64(filed["to_sign"].as_str().unwrap());
    let text = String::from_utf8(to_sign.clone()).unwrap();
    assert!(
        text.starts_with("frostglass security-use commitment v1\n"),
        "{text}"
    );
    assert!(text.contains(&format!("request: {id}\n")));
    assert!(text.contains(&format!(
        "dataset: city_health sha256:{}\n",
        commitment_of("city_health")
    )));
    assert!(text.contains(&format!(
        "dataset: power_grid sha256:{}\n",
        commitment_of("power_grid")
    )));
    let sign =
        |bytes: &[u8]| json!({ "key_id": key_id, "signature": b64(pair.sign(bytes).as_ref()) });
    let commit = |request: &str, body: &Value| {
        post(
            &app,
            &buyer,
            &format!("/v1/access-requests/{request}/commitment"),
            body,
        )
    };
    // A wrong signature, and a valid signature of another request, are refused.
    assert_eq!(
        commit(&id, &sign(b"something else")).code().as_deref(),
        Some("forbidden")
    );
    let other = post(&app, &buyer, "/v1/access-requests", &request).json();
    let other_sig = sign(&unb64(other["to_sign"].as_str().unwrap()));
    assert_eq!(commit(&id, &other_sig).code().as_deref(), Some("forbidden"));
    let stranger = keypair();
    let forged = json!({ "key_id": key_id, "signature": b64(stranger.sign(&to_sign).as_ref()) });
    assert_eq!(commit(&id, &forged).code().as_deref(), Some("forbidden"));
    // Nobody decides before the buyer signs.
    let early = post(
        &app,
        app.key("owner:hospital"),
        &format!("/v1/access-requests/{id}/approve"),
        &json!({}),
    );
    assert_eq!(early.code().as_deref(), Some("conflict"));
    let signed = commit(&id, &sign(&to_sign));
    assert_eq!(signed.status, 200, "{}", signed.text());
    assert_eq!(signed.json()["status"], "pending");
    // Replayed: the request is no longer waiting for it.
    assert_eq!(
        commit(&id, &sign(&to_sign)).code().as_deref(),
        Some("conflict")
    );
    // The buyer cannot approve its own request; an owner decides only its own datasets.
    let approve = |key: &str, body: &Value| {
        post(
            &app,
            key,
            &format!("/v1/access-requests/{id}/approve"),
            body,
        )
    };
    assert_eq!(approve(&buyer, &json!({})).status, 403);
    let widened = approve(
        app.key("owner:hospital"),
        &json!({ "quotas": { "queries_per_day": 1000 } }),
    );
    assert_eq!(widened.code().as_deref(), Some("invalid_request"));
    let first = approve(
        app.key("owner:hospital"),
        &json!({ "quotas": { "queries_per_day": 50 } }),
    );
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["status"], "pending", "power_grid is undecided");
    assert_eq!(
        approve(app.key("owner:hospital"), &json!({}))
            .code()
            .as_deref(),
        Some("forbidden")
    );
    // The grid operator delegates its decisions, withdraws, delegates again.
    let operators = "/v1/datasets/power_grid/operators";
    let grid = keys["owner:grid"].clone();
    let opco = keys["owner:opco"].clone();
    assert_eq!(
        post(
            &app,
            app.key("owner:hospital"),
            operators,
            &json!({ "principal": "owner:opco" })
        )
        .status,
        403
    );
    assert_eq!(
        post(
            &app,
            &grid,
            operators,
            &json!({ "principal": "owner:opco" })
        )
        .status,
        200
    );
    let withdrawn = app.request(
        "DELETE",
        &format!("{operators}/owner:opco"),
        Some(&grid),
        None,
        None,
    );
    assert_eq!(withdrawn.status, 200, "{}", withdrawn.text());
    assert_eq!(
        approve(&opco, &json!({})).code().as_deref(),
        Some("forbidden")
    );
    assert_eq!(
        post(
            &app,
            &grid,
            operators,
            &json!({ "principal": "owner:opco" })
        )
        .status,
        200
    );
    let done = approve(&opco, &json!({ "epsilon": 2.0 }));
    assert_eq!(done.status, 200, "{}", done.text());
    let done = done.json();
    assert_eq!(done["status"], "approved");
    let grant = done["grant"].as_str().unwrap().to_string();
    // The ledger says who decided, on whose behalf; the grant is the narrowest.
    let decided = kinds(&app, "access_decided");
    assert_eq!(decided.len(), 2);
    assert_eq!(decided[1]["by"], "owner:opco");
    assert_eq!(decided[1]["on_behalf_of"], "grid_operator");
    assert_eq!(kinds(&app, "commitment_signed")[0]["request"], id.as_str());
    let grants = app.get("/v1/grants", Some(&buyer)).json();
    let made = &grants["grants"][0]["grant"];
    assert_eq!(made["id"], grant.as_str());
    assert_eq!(made["queries_per_day"], 50);
    assert_eq!(made["epsilon"], 2.0);
    assert_eq!(made["expires_at"], "2030-01-01T00:00:00Z");
    // The buyer queries under it; after revocation the next query is refused.
    let sql = json!({ "sql": "SELECT district, COUNT(*) FROM city_health GROUP BY district" });
    // Held for review: the owner approves one answer and rejects another.
    let held = |sql: &Value| {
        let r = app.ask(&buyer, sql.clone());
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["query_id"].as_str().unwrap().to_string()
    };
    let verdict = |id: &str, v: &str| {
        let path = format!("/v1/reviews/{id}/{v}");
        let r = app.request("POST", &path, Some(app.key("owner:hospital")), None, None);
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let query_id = held(&sql);
    verdict(&query_id, "approve");
    let answered = app
        .get(&format!("/v1/queries/{query_id}"), Some(&buyer))
        .json();
    assert!(
        answered["rows"].as_array().is_some_and(|r| !r.is_empty()),
        "{answered}"
    );
    let rejected =
        held(&json!({ "sql": "SELECT gender, COUNT(*) FROM city_health GROUP BY gender" }));
    verdict(&rejected, "reject");
    let gone = app
        .get(&format!("/v1/queries/{rejected}"), Some(&buyer))
        .json();
    assert_eq!(gone, json!({ "query_id": rejected, "status": "rejected" }));
    check_evidence(&app, &buyer, &query_id);
    // Both queries were answered (noise drawn, ε spent) and are metered.
    let charged: i128 = kinds(&app, "query")
        .iter()
        .filter(|q| q["grant"] == grant.as_str())
        .map(|q| {
            frostglass::accounting::parse_money(
                q["usage"]["charges"]["city_health"].as_str().unwrap(),
            )
            .unwrap()
        })
        .sum();
    let charge = json!(frostglass::accounting::format_money(charged));
    check_settlement(&app, &buyer, &grant, &charge);
    let revoked = post(
        &app,
        app.key("owner:hospital"),
        &format!("/v1/grants/{grant}/revoke"),
        &json!({}),
    );
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(app.ask(&buyer, sql).code().as_deref(), Some("no_grant"));
    // Auditors supervise the trade in SQL: requests, decisions, grants.
    let audit = |sql: &str| {
        let r = post(
            &app,
            app.key("auditor:cac"),
            "/v1/audit/sql",
            &json!({ "sql": sql }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["rows"].clone()
    };
    assert_eq!(
        audit("SELECT status, COUNT(*) FROM requests GROUP BY status ORDER BY status"),
        json!([["approved", 1], ["awaiting_signature", 1]])
    );
    assert_eq!(
        audit("SELECT dataset, by, on_behalf_of FROM decisions ORDER BY at, dataset"),
        json!([
            ["city_health", "owner:hospital", null],
            ["power_grid", "owner:opco", "grid_operator"]
        ])
    );
    assert_eq!(
        audit(&format!(
            "SELECT status, queries_per_day FROM grants WHERE id = '{grant}'"
        )),
        json!([["revoked", 50]])
    );
    // Buyers do not.
    let r = post(
        &app,
        &buyer,
        "/v1/audit/sql",
        &json!({ "sql": "SELECT * FROM requests" }),
    );
    assert_eq!(r.status, 403);
    // Parties see the request; others do not.
    assert_eq!(
        app.get(&format!("/v1/access-requests/{id}"), Some(&grid))
            .status,
        200
    );
    assert_eq!(
        app.get(
            &format!("/v1/access-requests/{id}"),
            Some(app.key("buyer:acme"))
        )
        .status,
        404
    );
}

#[test]
fn requests_are_refused_by_the_rules_queries_obey_and_a_changed_commitment_voids_a_signature() {
    let app = spawn_app();
    let buyer = app.key("buyer:acme").to_string();
    let period = json!({ "from": "2026-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z" });
    let file = |datasets: Value, purpose: &str| {
        post(
            &app,
            &buyer,
            "/v1/access-requests",
            &json!({ "datasets": datasets, "purpose": purpose, "period": period }),
        )
    };
    assert_eq!(
        file(json!(["city_health"]), "individual_profiling")
            .rule()
            .as_deref(),
        Some("prohibited_purpose")
    );
    assert_eq!(
        file(json!(["population_registry"]), PURPOSE)
            .rule()
            .as_deref(),
        Some("core_data_denied")
    );
    assert_eq!(
        file(json!(["nope"]), PURPOSE).code().as_deref(),
        Some("unknown_table")
    );
    let backwards = post(
        &app,
        &buyer,
        "/v1/access-requests",
        &json!({ "datasets": ["city_health"], "purpose": PURPOSE,
        "period": { "from": "2030-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z" } }),
    );
    assert_eq!(backwards.code().as_deref(), Some("invalid_request"));
    // Filed and about to be signed when the owner publishes a new commitment.
    let (pair, key_id) = signing_key(&app, &buyer);
    let filed = file(json!(["city_health"]), PURPOSE).json();
    let id = filed["id"].as_str().unwrap();
    let root = app.data_dir.join("owners/hospital");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(
        shared_catalog().join("data/city_health.parquet"),
        root.join("visits.parquet"),
    )
    .unwrap();
    let mut manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(shared_catalog().join("city_health.json")).unwrap(),
    )
    .unwrap();
    manifest["source"]["location"] = json!(root.join("visits.parquet").to_str().unwrap());
    manifest["commitment"] = json!("Results are used for hospital capacity planning only.");
    let r = app.request(
        "PUT",
        "/v1/datasets/city_health",
        Some(app.key("owner:hospital")),
        Some(&serde_json::to_vec(&manifest).unwrap()),
        None,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let started = std::time::Instant::now();
    while app.get("/v1/datasets/city_health", Some(&buyer)).json()["commitment"]["text"]
        != manifest["commitment"]
    {
        assert!(started.elapsed() < std::time::Duration::from_secs(120));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let signature = b64(pair
        .sign(&unb64(filed["to_sign"].as_str().unwrap()))
        .as_ref());
    let r = post(
        &app,
        &buyer,
        &format!("/v1/access-requests/{id}/commitment"),
        &json!({ "key_id": key_id, "signature": signature }),
    );
    assert_eq!(r.code().as_deref(), Some("conflict"), "{}", r.text());
    // A key that is not a raw 32-byte Ed25519 key is refused.
    let short = post(
        &app,
        &buyer,
        "/v1/principals/me/signing-keys",
        &json!({ "public_key": b64(b"short") }),
    );
    assert_eq!(short.code().as_deref(), Some("invalid_request"));
}

#[test]
fn important_data_abroad_needs_the_owners_cross_border_assessment_at_approval() {
    let app = spawn_app();
    let admin = with_admin(&app);
    let grid = post(
        &app,
        &admin,
        "/v1/principals",
        &json!({ "id": "owner:grid", "role": "owner", "org": "grid_operator", "region": "CN" }),
    )
    .json()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let abroad = app.key("buyer:abroad").to_string();
    let (pair, key_id) = signing_key(&app, &abroad);
    let filed = post(
        &app,
        &abroad,
        "/v1/access-requests",
        &json!({ "datasets": ["power_grid"], "purpose": PURPOSE,
        "period": { "from": "2026-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z" } }),
    );
    assert_eq!(filed.status, 201, "{}", filed.text());
    let filed = filed.json();
    let id = filed["id"].as_str().unwrap();
    let signature = b64(pair
        .sign(&unb64(filed["to_sign"].as_str().unwrap()))
        .as_ref());
    let signed = post(
        &app,
        &abroad,
        &format!("/v1/access-requests/{id}/commitment"),
        &json!({ "key_id": key_id, "signature": signature }),
    );
    assert_eq!(signed.json()["status"], "pending", "{}", signed.text());
    let approve = |body: &Value| {
        post(
            &app,
            &grid,
            &format!("/v1/access-requests/{id}/approve"),
            body,
        )
    };
    let without = approve(&json!({}));
    assert_eq!(
        without.rule().as_deref(),
        Some("cross_border_assessment_required"),
        "{}",
        without.text()
    );
    // The owner also asks to review every answer under this grant.
    let with = approve(&json!({ "cross_border_assessment": "CBA-2026-17", "review": true }));
    assert_eq!(with.json()["status"], "approved", "{}", with.text());
    let grants = app.get("/v1/grants", Some(&abroad)).json();
    let made = grants["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["grant"]["id"] == with.json()["grant"])
        .unwrap();
    assert_eq!(made["grant"]["cross_border_assessment"], "CBA-2026-17");
    let sql = "SELECT district, COUNT(*) FROM power_grid GROUP BY district";
    let body = json!({ "sql": sql, "grant": with.json()["grant"] });
    let r = app.ask(&abroad, body);
    assert_eq!(r.status, 202, "{}", r.text());
    let waiting = app.get("/v1/reviews", Some(&grid)).json();
    assert_eq!(waiting["waiting"][0]["sql"], sql, "{waiting}");
    assert_eq!(
        waiting["waiting"][0]["trace"]["grant"],
        with.json()["grant"]
    );
}

/// The dispute bundle of `query_id`: who may fetch it, that it verifies
/// offline with the ledger key alone, and that changing any field is caught.
fn check_evidence(app: &TestApp, buyer: &str, query_id: &str) {
    let path = format!("/v1/evidence/{query_id}");
    assert_eq!(app.get(&path, Some(app.key("buyer:other"))).status, 404);
    assert_eq!(app.get(&path, Some(app.key("owner:hospital"))).status, 200);
    let bundle = app.get(&path, Some(buyer));
    assert_eq!(bundle.status, 200, "{}", bundle.text());
    let bundle = bundle.json();
    let (dir, key_file) = ledger_key_file(app);
    let verify = |b: &Value| {
        verify_file(
            dir.path(),
            "--evidence",
            b,
            &["--public-key", key_file.to_str().unwrap()],
        )
    };
    let (ok, out, err) = verify(&bundle);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("signed by the buyer and approved by every owner"),
        "{out}"
    );
    // Every field matters.
    let flip = |s: &str| {
        let mut chars: Vec<char> = s.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == '0' { '1' } else { '0' };
        chars.into_iter().collect::<String>()
    };
    let n = bundle["entries"].as_array().unwrap().len();
    let mut tampered: Vec<(String, Value)> = Vec::new();
    for i in 0..n {
        let mut b = bundle.clone();
        let body = b["entries"][i]["body"]
            .as_str()
            .unwrap()
            .replace("\"at\":\"20", "\"at\":\"19");
        b["entries"][i]["body"] = json!(body);
        tampered.push((format!("entry {i} body"), b));
        if bundle["entries"][i]["proof"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
        {
            let mut b = bundle.clone();
            b["entries"][i]["proof"][0] =
                json!(flip(b["entries"][i]["proof"][0].as_str().unwrap()));
            tampered.push((format!("entry {i} proof"), b));
        }
        let mut b = bundle.clone();
        b["entries"][i]["index"] = json!(b["entries"][i]["index"].as_u64().unwrap() + 1);
        tampered.push((format!("entry {i} index"), b));
        let mut b = bundle.clone();
        b["entries"].as_array_mut().unwrap().remove(i);
        tampered.push((format!("entry {i} left out"), b));
    }
    for field in ["signature", "root_hash"] {
        let mut b = bundle.clone();
        b["head"][field] = json!(flip(b["head"][field].as_str().unwrap()));
        tampered.push((format!("head {field}"), b));
    }
    let mut b = bundle.clone();
    b["head"]["tree_size"] = json!(b["head"]["tree_size"].as_u64().unwrap() + 1);
    tampered.push(("head tree_size".into(), b));
    for field in ["to_sign", "signature", "public_key"] {
        let mut b = bundle.clone();
        let raw = unb64(b["commitment"][field].as_str().unwrap());
        let mut changed = raw.clone();
        changed[raw.len() / 2] ^= 1;
        b["commitment"][field] = json!(b64(&changed));
        tampered.push((format!("commitment {field}"), b));
    }
    let mut b = bundle.clone();
    b["query_id"] = json!("q_0000000000000000");
    tampered.push(("query id".into(), b));
    for (what, b) in tampered {
        let (ok, out, _) = verify(&b);
        assert!(!ok, "{what} was not caught: {out}");
    }
}

/// This month's settlement: the grant's line holds city_health's monthly fee
/// and the query's metered charge; buyers see only their own lines; the
/// statement verifies against the ledger and its key, and not when changed.
fn check_settlement(app: &TestApp, buyer: &str, grant: &str, charge: &Value) {
    let period = &frostglass::util::today()[..7];
    let path = format!("/v1/settlements?period={period}");
    let all = app.get(&path, Some(app.key("auditor:cac")));
    assert_eq!(all.status, 200, "{}", all.text());
    let all = all.json();
    let line = all["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["grant"] == grant && l["owner"] == "hospital")
        .unwrap_or_else(|| panic!("no line for {grant}: {all}"))
        .clone();
    assert_eq!(line["subscription"], "300.00");
    assert_eq!(&line["metered"], charge);
    let hospital: i128 = all["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["owner"] == "hospital")
        .map(|l| frostglass::accounting::parse_money(l["total"].as_str().unwrap()).unwrap())
        .sum();
    assert_eq!(
        all["owners"]["hospital"],
        frostglass::accounting::format_money(hospital)
    );
    let mine = app.get(&path, Some(buyer)).json();
    assert!(
        mine["lines"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["buyer"] == "buyer:newco"),
        "{mine}"
    );
    assert_eq!(
        app.get("/v1/settlements?period=2026-13", Some(buyer))
            .status,
        400
    );
    // Offline: recomputed from the ledger, checked against its key.
    let (dir, key_file) = ledger_key_file(app);
    let data_dir = app.data_dir.to_str().unwrap();
    let args = [
        "--data-dir",
        data_dir,
        "--public-key",
        key_file.to_str().unwrap(),
    ];
    let verify = |statement: &Value| verify_file(dir.path(), "--settlement", statement, &args);
    let (ok, out, err) = verify(&all);
    assert!(ok, "{out}{err}");
    let i = all["lines"]
        .as_array()
        .unwrap()
        .iter()
        .position(|l| l["grant"] == grant)
        .unwrap();
    let mut changes: Vec<(&str, Value)> = Vec::new();
    let mut b = all.clone();
    b["lines"][i]["metered"] = json!("0.01");
    changes.push(("a line's charge", b));
    let mut b = all.clone();
    b["total"] = json!("0.00");
    changes.push(("the total", b));
    let mut b = all.clone();
    b["period"] = json!("2020-01");
    changes.push(("the period", b));
    let mut b = all.clone();
    b["lines"].as_array_mut().unwrap().remove(i);
    changes.push(("a line left out", b));
    let mut b = all.clone();
    let sig = b["signature"].as_str().unwrap().to_string();
    b["signature"] = json!(format!(
        "{}{}",
        if sig.starts_with('0') { "1" } else { "0" },
        &sig[1..]
    ));
    changes.push(("the signature", b));
    let mut b = all.clone();
    b["tree_size"] = json!(b["tree_size"].as_u64().unwrap() - 1);
    changes.push(("the ledger prefix", b));
    for (what, b) in changes {
        let (ok, out, _) = verify(&b);
        assert!(!ok, "{what} was not caught: {out}");
    }
}

#[test]
fn answers_of_reviewed_data_wait_sealed_for_the_owner_and_a_rejected_one_never_arrives() {
    let app = reviewing_city_health();
    let ask = |sql: &str| {
        let r = app.query(sql);
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(r.json()["status"], "held");
        r.json()["query_id"].as_str().unwrap().to_string()
    };
    let first = ask("SELECT district, COUNT(*) FROM city_health GROUP BY district");
    let fetch = |who: &str, id: &str| app.get(&format!("/v1/queries/{id}"), Some(app.key(who)));
    assert_eq!(fetch("buyer:acme", &first).json()["status"], "held");
    assert_eq!(
        fetch("buyer:other", &first).status,
        404,
        "another buyer's held answer"
    );
    // Sealed at rest: the stored bytes hold no district name.
    let db = rusqlite::Connection::open(app.data_dir.join("frostglass.db")).unwrap();
    let sealed: Vec<u8> = db
        .query_row(
            "SELECT sealed FROM held_answers WHERE query_id = ?1",
            [&first],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!String::from_utf8_lossy(&sealed).contains("chaoyang"));
    // The owner sees the released aggregate and approves; the buyer gets it.
    let waiting = app
        .get("/v1/reviews", Some(app.key("owner:hospital")))
        .json();
    let held = &waiting["waiting"][0];
    assert_eq!(held["query_id"], first.as_str());
    assert!(
        held["answer"]["rows"].as_array().unwrap().len() > 1,
        "{held}"
    );
    let review = |id: &str, verdict: &str| {
        let path = format!("/v1/reviews/{id}/{verdict}");
        app.request("POST", &path, Some(app.key("owner:hospital")), None, None)
    };
    assert_eq!(review(&first, "approve").status, 200);
    let answer = fetch("buyer:acme", &first).json();
    assert_eq!(answer["rows"], held["answer"]["rows"]);
    assert!(answer["receipt"]["ledger_index"].is_u64(), "{answer}");
    assert_eq!(review(&first, "reject").code().as_deref(), Some("conflict"));
    // A rejected answer is destroyed and never reaches the buyer.
    let second = ask("SELECT gender, COUNT(*) FROM city_health GROUP BY gender");
    assert_eq!(review(&second, "reject").status, 200);
    let gone = fetch("buyer:acme", &second).json();
    assert_eq!(gone["status"], "rejected");
    assert!(gone["rows"].is_null());
    let destroyed: Option<Vec<u8>> = db
        .query_row(
            "SELECT sealed FROM held_answers WHERE query_id = ?1",
            [&second],
            |r| r.get(0),
        )
        .unwrap();
    assert!(destroyed.is_none());
    let reviewed = kinds(&app, "answer_reviewed");
    assert_eq!(reviewed.len(), 2);
    assert_eq!(reviewed[1]["approved"], false);
    assert_eq!(kinds(&app, "answer_held").len(), 2);
    // Only an owner of the data reviews.
    let third = ask("SELECT district, COUNT(*) FROM city_health WHERE age > 30 GROUP BY district");
    let admin = with_admin(&app);
    let telecom = post(
        &app,
        &admin,
        "/v1/principals",
        &json!({ "id": "owner:tel", "role": "owner", "org": "telecom", "region": "CN" }),
    )
    .json()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app.request(
        "POST",
        &format!("/v1/reviews/{third}/approve"),
        Some(&telecom),
        None,
        None,
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        app.request(
            "POST",
            &format!("/v1/reviews/{third}/approve"),
            Some(app.key("buyer:acme")),
            None,
            None
        )
        .status,
        403
    );
}

/// The ledger's public key (fetched as an auditor), in a file in a fresh
/// folder that lives as long as the returned guard.
fn ledger_key_file(app: &TestApp) -> (tempfile::TempDir, std::path::PathBuf) {
    let key = app
        .get("/v1/audit/public-key", Some(app.key("auditor:cac")))
        .json()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("ledger.pub");
    std::fs::write(&key_file, key).unwrap();
    (dir, key_file)
}

/// `frostglass verify <flag> <doc written to a file in dir> <extra…>`.
fn verify_file(
    dir: &std::path::Path,
    flag: &str,
    doc: &Value,
    extra: &[&str],
) -> (bool, String, String) {
    let file = dir.join("document.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let mut args = vec!["verify", flag, file.to_str().unwrap()];
    args.extend_from_slice(extra);
    crate::helpers::cli(&args)
}
