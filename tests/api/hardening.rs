//! Abuse limits and the API contract: every limit reached and answered with
//! its code while others keep being served; 405s; the OpenAPI document.

use crate::helpers::{Options, spawn_app, spawn_app_with, spawn_app_with_limits};
use frostglass::config::Settings;
use serde_json::json;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const SLOW: &str = "SELECT COUNT(*) FROM power_grid a JOIN power_grid b ON a.district = b.district";
const QUICK: &str = "SELECT industry, COUNT(*) FROM enterprise_registry GROUP BY industry";

#[test]
fn wrong_methods_answer_405_with_the_allowed_ones() {
    let app = spawn_app();
    let r = app.request(
        "DELETE",
        "/v1/queries",
        Some(app.key("buyer:acme")),
        None,
        None,
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.code().as_deref(), Some("method_not_allowed"));
    assert_eq!(
        r.headers.get("allow").map(String::as_str),
        Some("POST, GET")
    );
    let r = app.request(
        "PATCH",
        "/v1/datasets/city_health",
        Some(app.key("buyer:acme")),
        None,
        None,
    );
    assert_eq!(r.status, 405);
    assert_eq!(
        r.headers.get("allow").map(String::as_str),
        Some("GET, PUT, DELETE")
    );
}

#[test]
fn the_openapi_document_is_valid_and_matches_the_served_routes() {
    let app = spawn_app();
    let r = app.get("/openapi.json", None);
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    let mut served: Vec<(String, String)> = frostglass::api::ROUTES
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
    // Every documented route is really served: neither 404 nor 405.
    let auditor = app.key("auditor:cac").to_string();
    for (method, path) in &served {
        // A withdrawal would end the grants the other routes need.
        let id = if *method == "DELETE" {
            "no_such_dataset"
        } else {
            "city_health"
        };
        let path = path.replace("{id}", id);
        let path = match path.as_str() {
            "/v1/audit/proof/inclusion" => format!("{path}?index=0&size=1"),
            "/v1/audit/proof/consistency" => format!("{path}?from=0&to=1"),
            _ => path,
        };
        let body = serde_json::to_vec(&json!({ "sql": "SELECT 1" })).unwrap();
        let r = app.request(
            method,
            &path,
            Some(&auditor),
            (method == "POST").then_some(&body[..]),
            None,
        );
        // A 404 of a route that exists names the missing resource, not the route.
        let unrouted = r.status == 404 && r.json()["error"]["message"] == "no such route";
        assert!(
            !unrouted && r.status != 405,
            "{method} {path}: {}",
            r.status
        );
    }
    // The query request schema in the document is the one the server validates with.
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/query-request.schema.json")).unwrap();
    let documented = &doc["paths"]["/v1/queries"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"];
    assert_eq!(documented["properties"], schema["properties"]);
}

#[test]
fn a_principal_over_its_request_rate_is_slowed_while_others_are_served() {
    let app = spawn_app_with_limits(|limits| {
        limits.requests_per_second = 0.5;
        limits.request_burst = 3.0;
    });
    let key = app.key("buyer:acme").to_string();
    let statuses: Vec<u16> = (0..4)
        .map(|_| app.get("/v1/datasets", Some(&key)).status)
        .collect();
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    let r = app.get("/v1/datasets", Some(&key));
    assert_eq!(r.code().as_deref(), Some("rate_limited"));
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    assert_eq!(
        app.get("/v1/datasets", Some(app.key("buyer:other"))).status,
        200
    );
}

#[test]
fn one_principal_cannot_hold_every_query_slot() {
    let app = spawn_app_with_limits(|limits| {
        limits.max_concurrent_queries_per_principal = 1;
        limits.query_timeout_ms = 3_000;
    });
    std::thread::scope(|s| {
        let slow = s.spawn(|| app.query(SLOW));
        std::thread::sleep(Duration::from_millis(400));
        let second = app.query(QUICK);
        assert_eq!(second.status, 429, "{}", second.text());
        assert_eq!(second.code().as_deref(), Some("rate_limited"));
        let other = app.query_as("buyer:abroad", json!({ "sql": QUICK }));
        assert_eq!(other.status, 200, "{}", other.text());
        assert_eq!(
            slow.join().unwrap().code().as_deref(),
            Some("resource_limit")
        );
    });
}

#[test]
fn overload_is_answered_503_quickly() {
    let app = spawn_app_with_limits(|limits| {
        limits.max_concurrent_queries = 1;
        limits.queue_wait_ms = 200;
        limits.query_timeout_ms = 3_000;
    });
    std::thread::scope(|s| {
        let slow = s.spawn(|| app.query(SLOW));
        std::thread::sleep(Duration::from_millis(400));
        let started = Instant::now();
        let r = app.query_as("buyer:abroad", json!({ "sql": QUICK }));
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.code().as_deref(), Some("overloaded"));
        assert!(started.elapsed() < Duration::from_secs(2));
        slow.join().unwrap();
    });
    // Once the slot is free again, queries are answered.
    assert_eq!(app.query(QUICK).status, 200);
}

#[test]
fn slow_clients_are_cut_off_and_do_not_block_others() {
    let app = spawn_app_with_limits(|limits| {
        limits.client_request_timeout_ms = 500;
    });
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /v1/queries HTTP/1.1\r\nHost: x\r\nContent-Le")
        .unwrap();
    // Meanwhile a normal client is served.
    assert_eq!(app.get("/healthz", None).status, 200);
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the slow client was not cut off"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[test]
fn tls_serves_https_and_plain_http_is_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let settings = Settings {
        tls: Some(frostglass::config::TlsSettings {
            cert: cert_path,
            key: key_path,
            client_ca: None,
        }),
        ..Settings::default()
    };
    let app = spawn_app_with(Options {
        settings,
        ..Options::default()
    });
    let port = app.base.rsplit(':').next().unwrap().to_string();
    let root = ureq::tls::Certificate::from_der(cert.cert.der()).to_owned();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
            root,
        ])))
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(format!("https://localhost:{port}/healthz"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.body_mut().read_to_string().unwrap().contains("ok"));
    // A console session over HTTPS gets a Secure cookie; the page's origin
    // (https) is recognised as the server's own.
    let sign_in = ureq::http::Request::post(format!("https://localhost:{port}/console/session"))
        .header("Content-Type", "application/json")
        .header("Origin", format!("https://localhost:{port}"))
        .body(format!(r#"{{"key": "{}"}}"#, app.key("buyer:acme")))
        .unwrap();
    let signed = agent.run(sign_in).unwrap();
    assert_eq!(signed.status(), 200);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Flight SQL serves the same certificate on its own port.
    let flight_tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let flight_url = format!("https://localhost:{}", app.flight_port);
    let listed = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = tonic::transport::Channel::from_shared(flight_url)
            .unwrap()
            .tls_config(flight_tls)
            .unwrap()
            .connect()
            .await
            .expect("Flight SQL over TLS");
        let mut client = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
        client.set_token(app.key("buyer:acme").to_string());
        client.get_catalogs().await.map(|info| info.endpoint.len())
    });
    assert_eq!(listed.unwrap(), 1);
    // A client that does not trust the certificate cannot talk to it.
    let untrusting: ureq::Agent = ureq::Agent::config_builder().build().into();
    assert!(
        untrusting
            .get(format!("https://localhost:{port}/healthz"))
            .call()
            .is_err()
    );
    // Plain HTTP on the TLS port gets nowhere.
    assert!(
        ureq::get(format!("http://127.0.0.1:{port}/healthz"))
            .call()
            .is_err()
    );
    // An auditor verifies the ledger over HTTPS, trusting this server's certificate.
    let ca = dir.path().join("server-ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let url = format!("https://localhost:{port}");
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--url", &url, "--key", app.key("auditor:cac")];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_frostglass"))
            .args(&args)
            .output()
            .unwrap()
    };
    let out = verify(&["--ca", ca.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !verify(&[]).status.success(),
        "an untrusted certificate is refused"
    );

    // Without TLS, anything but loopback is refused at start.
    let open = Settings {
        listen: "0.0.0.0:0".into(),
        catalog_dir: crate::helpers::shared_catalog().to_path_buf(),
        policies_dir: crate::helpers::repo().join("policies"),
        data_dir: tempfile::tempdir().unwrap().keep(),
        ..Settings::default()
    };
    let started =
        actix_web::rt::System::new().block_on(frostglass::api::server::Application::build(open));
    let error = started.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("refusing plain HTTP"), "{error}");
}

#[test]
fn mutual_tls_binds_a_principal_to_its_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // A CA for clients, a server certificate, and two client certificates.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let client = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert, key)
    };
    let (good_cert, good_key) = client("acme");
    let (other_cert, other_key) = client("mallory");
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let settings = Settings {
        tls: Some(frostglass::config::TlsSettings {
            cert: write("server.pem", server.cert.pem()),
            key: write("server.key", server.signing_key.serialize_pem()),
            client_ca: Some(write("ca.pem", ca_cert.pem())),
        }),
        ..Settings::default()
    };
    let app = spawn_app_with(Options {
        settings,
        ..Options::default()
    });
    let port = app.base.rsplit(':').next().unwrap().to_string();
    let good_path = write("good.pem", good_cert.pem());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_frostglass"))
        .args([
            "principal",
            "bind-cert",
            "buyer:acme",
            "--cert",
            good_path.to_str().unwrap(),
            "--data-dir",
            app.data_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let agent = |client: Option<(&rcgen::Certificate, &KeyPair)>| -> ureq::Agent {
        let root = ureq::tls::Certificate::from_der(server.cert.der()).to_owned();
        let mut tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::Specific(
            std::sync::Arc::new(vec![root]),
        ));
        if let Some((cert, key)) = client {
            let chain = vec![ureq::tls::Certificate::from_der(cert.der()).to_owned()];
            let key = ureq::tls::PrivateKey::from_pem(key.serialize_pem().as_bytes()).unwrap();
            tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
        }
        ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .build()
            .into()
    };
    let grants = |agent: &ureq::Agent, key: &str| {
        agent
            .get(format!("https://localhost:{port}/v1/grants"))
            .header("Authorization", &format!("Bearer {key}"))
            .call()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let acme = app.key("buyer:acme").to_string();
    assert_eq!(
        grants(&agent(Some((&good_cert, &good_key))), &acme),
        200,
        "key and its certificate"
    );
    assert_eq!(
        grants(&agent(None), &acme),
        401,
        "the key without a certificate"
    );
    assert_eq!(
        grants(&agent(Some((&other_cert, &other_key))), &acme),
        401,
        "the key with another principal's certificate"
    );
    // Principals not bound to a certificate are unaffected.
    assert_eq!(grants(&agent(None), app.key("buyer:other")), 200);
}

#[test]
fn every_route_admits_exactly_the_roles_of_the_route_table() {
    let app = spawn_app();
    let keys = [
        (
            frostglass::store::Role::Owner,
            app.key("owner:hospital").to_string(),
        ),
        (
            frostglass::store::Role::Buyer,
            app.key("buyer:acme").to_string(),
        ),
        (
            frostglass::store::Role::Auditor,
            app.key("auditor:cac").to_string(),
        ),
    ];
    let body = serde_json::to_vec(&json!({ "sql": "SELECT 1" })).unwrap();
    // Rotation revokes the key it is called with: it goes last.
    let rotate = "/v1/principals/me/keys/rotate";
    let mut routes: Vec<_> = frostglass::api::ROUTES
        .iter()
        .filter(|(_, _, roles)| !roles.is_empty())
        .collect();
    routes.sort_by_key(|(_, path, _)| *path == rotate);
    for (method, path, roles) in routes {
        // A withdrawal would end the grants the other routes need.
        let id = if *method == "DELETE" {
            "no_such_dataset"
        } else {
            "city_health"
        };
        let path = path.replace("{id}", id);
        let path = match path.as_str() {
            "/v1/audit/proof/inclusion" => format!("{path}?index=0&size=1"),
            "/v1/audit/proof/consistency" => format!("{path}?from=0&to=1"),
            _ => path,
        };
        for (role, key) in &keys {
            let r = app.request(
                method,
                &path,
                Some(key),
                (*method == "POST").then_some(&body[..]),
                None,
            );
            if roles.contains(role) {
                assert_ne!(r.status, 403, "{role:?} {method} {path}: {}", r.text());
            } else {
                assert_eq!(r.status, 403, "{role:?} {method} {path}: {}", r.text());
                assert_eq!(r.code().as_deref(), Some("forbidden"));
            }
        }
    }
}
