//! Bad input gets a clear error, never a panic, a hang or a 500; the server stays up.

use crate::helpers::{Options, spawn_app, spawn_app_with, spawn_app_with_limits};
use serde_json::json;

/// Who asked each recorded query, in the order the ledger recorded them.
fn principals_in_ledger_order(app: &crate::helpers::TestApp) -> Vec<String> {
    app.query_entries(0)
        .iter()
        .map(|q| q["principal"].as_str().unwrap().to_string())
        .collect()
}

fn still_serving(app: &crate::helpers::TestApp) {
    let r = app.query("SELECT district, COUNT(*) FROM city_health GROUP BY district");
    assert_eq!(r.status, 200, "the server stopped answering: {}", r.text());
}

#[test]
fn malformed_bodies_are_invalid_requests() {
    let app = spawn_app();
    let key = Some(app.key("buyer:acme"));
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"{not json".to_vec(), 400),
        (b"".to_vec(), 400),
        (vec![0xff, 0xfe, 0x00], 400),
        (br#"{"sql": 42}"#.to_vec(), 400),
        (br#"{"sql": "SELECT 1", "surprise": true}"#.to_vec(), 400),
        (br#"{"sql": "SELECT 1", "format": "xml"}"#.to_vec(), 400),
        (br#"{"sql": ""}"#.to_vec(), 400),
        (vec![b' '; 300 * 1024], 413),
    ];
    for (body, status) in cases {
        let r = app.request("POST", "/v1/queries", key, Some(&body), None);
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.code().as_deref(), Some("invalid_request"));
    }
    still_serving(&app);
}

#[test]
fn deep_and_long_expressions_are_refused_before_planning() {
    let app = spawn_app();
    let nested = format!("SELECT {}1{} AS x", "(".repeat(5000), ")".repeat(5000));
    let r = app.query(&nested);
    assert!(r.status == 400 || r.status == 422, "{}", r.text());
    let chain = format!("SELECT {} AS x", vec!["1"; 20_000].join(" + "));
    let r = app.query(&chain);
    assert_eq!(r.status, 400, "{}", &r.text()[..200.min(r.text().len())]);
    assert_eq!(r.code().as_deref(), Some("invalid_request"));
    // Under the byte cap but over the token cap.
    let chain = format!("SELECT {} AS x", vec!["1"; 5_000].join("+"));
    let r = app.query(&chain);
    assert_eq!(r.code().as_deref(), Some("resource_limit"));
    // Just under both caps: long but legal, and planned without overflowing the stack.
    let legal = format!(
        "SELECT district, COUNT(*) FROM city_health WHERE age > {} GROUP BY district",
        vec!["0"; 1_500].join("+")
    );
    let r = app.query(&legal);
    assert_eq!(r.status, 200, "{}", &r.text()[..300.min(r.text().len())]);
    still_serving(&app);
}

#[test]
fn endless_queries_are_cancelled() {
    let app = spawn_app_with_limits(|limits| {
        limits.query_timeout_ms = 1_500;
    });
    let started = std::time::Instant::now();
    let r =
        app.query("SELECT COUNT(*) FROM power_grid a JOIN power_grid b ON a.district = b.district");
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.code().as_deref(), Some("resource_limit"));
    assert!(
        started.elapsed().as_secs() < 30,
        "the timeout did not cut the query short"
    );
    still_serving(&app);
}

#[test]
fn memory_and_answer_size_are_capped() {
    let app = spawn_app_with_limits(|limits| {
        limits.query_memory_bytes = 64 * 1024;
        limits.max_result_rows = 100;
    });
    let big = app.query(
        "SELECT industry, COUNT(DISTINCT name) AS n FROM enterprise_registry GROUP BY industry",
    );
    assert_eq!(
        big.code().as_deref(),
        Some("resource_limit"),
        "{}",
        big.text()
    );
    assert!(big.text().contains("memory"), "{}", big.text());
    let rows = app.query("SELECT name FROM enterprise_registry");
    assert_eq!(
        rows.code().as_deref(),
        Some("resource_limit"),
        "{}",
        rows.text()
    );
    let small = app.query("SELECT name FROM enterprise_registry LIMIT 100");
    assert_eq!(small.status, 200, "{}", small.text());
}

#[test]
fn rows_scanned_cap_is_checked_before_reading() {
    let app = spawn_app_with_limits(|limits| {
        limits.max_rows_scanned = 50_000;
    });
    let r = app.query("SELECT district, COUNT(*) FROM power_grid GROUP BY district");
    assert_eq!(r.code().as_deref(), Some("resource_limit"));
    let ok = app.query("SELECT district, COUNT(*) FROM city_health GROUP BY district");
    assert_eq!(ok.status, 200);
}

#[test]
fn daily_query_quota_is_enforced() {
    let app = spawn_app_with(Options {
        acme_queries_per_day: Some(2),
        ..Options::default()
    });
    let sql = "SELECT district, COUNT(*) FROM city_health GROUP BY district";
    assert_eq!(app.query(sql).status, 200);
    // Refusals do not use up the quota.
    assert_eq!(app.query("SELECT name FROM city_health").status, 403);
    assert_eq!(app.query(sql).status, 200);
    let r = app.query(sql);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code().as_deref(), Some("quota_exceeded"));
    let grants = app.get("/v1/grants", Some(app.key("buyer:acme"))).json();
    assert_eq!(grants["grants"][0]["remaining_today"]["queries"], 0);
    // The other buyer's grant is unaffected.
    let other = app.query_as("buyer:abroad", json!({ "sql": sql }));
    assert_eq!(other.status, 200);
}

#[test]
fn runtime_errors_never_quote_data() {
    let app = spawn_app();
    let names = crate::helpers::column_values("enterprise_registry", "name");
    // Casts and division are total (NULL where they would fail); a function
    // that fails on open data fails without quoting the value.
    for (sql, fails) in [
        ("SELECT CAST(name AS INT) FROM enterprise_registry", false),
        (
            "SELECT employees / (employees - employees) FROM enterprise_registry",
            false,
        ),
        ("SELECT to_timestamp(name) FROM enterprise_registry", true),
    ] {
        let r = app.query(sql);
        if fails {
            assert_eq!(
                r.code().as_deref(),
                Some("sql_error"),
                "{sql}: {}",
                r.text()
            );
        } else {
            assert_eq!(r.status, 200, "{sql}");
            assert!(
                r.json()["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|row| row[0].is_null())
            );
        }
        let text = r.text();
        assert!(
            !names.iter().any(|n| text.contains(n.as_str())),
            "{sql} leaked a value: {text}"
        );
    }
}

#[test]
fn a_query_whose_client_hangs_up_is_cancelled_and_recorded() {
    use std::io::Write;
    let app = spawn_app_with_limits(|limits| {
        limits.query_timeout_ms = 300_000;
        // One slot: the next query waits for it, so it is answered only once the
        // abandoned one has really stopped.
        limits.max_concurrent_queries = 1;
        limits.queue_wait_ms = 60_000;
    });
    let body = json!({
        "sql": "SELECT COUNT(*) FROM power_grid a JOIN power_grid b ON a.district = b.district"
    })
    .to_string();
    let mut client = std::net::TcpStream::connect(app.base.trim_start_matches("http://")).unwrap();
    write!(
        client,
        "POST /v1/queries HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        app.key("buyer:acme"),
        body.len()
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1_000));
    drop(client);
    let started = std::time::Instant::now();
    still_serving(&app);
    assert!(
        started.elapsed().as_secs() < 20,
        "the abandoned query kept its slot for {:?}",
        started.elapsed()
    );
    let closed: Vec<serde_json::Value> = app
        .query_entries(0)
        .into_iter()
        .filter(|q| q["code"] == "client_closed")
        .collect();
    assert_eq!(closed.len(), 1, "the cancelled query is in the ledger once");
}

/// Fair sharing: with one buyer's heavy queries holding the only slot and
/// more of them queued, another buyer's query is the next to start. Checked
/// by order (the ledger's), not by wall time.
#[test]
fn another_buyers_query_starts_before_a_flooders_queued_ones() {
    // Each heavy join holds the one slot until its time runs out (2 s).
    let app = spawn_app_with_limits(|limits| {
        limits.query_timeout_ms = 2_000;
        limits.max_concurrent_queries = 1;
        limits.queue_wait_ms = 300_000;
    });
    let slow = |i: usize| {
        json!({
            "sql": format!("SELECT COUNT(*) AS n{i} FROM power_grid a JOIN power_grid b ON a.district = b.district")
        })
    };
    std::thread::scope(|s| {
        let app = &app;
        let mut flood = Vec::new();
        for i in 0..3 {
            flood.push(s.spawn(move || app.query_as("buyer:acme", slow(i)).status));
            // Arrival order: the first takes the slot, the others queue.
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let quick = app.query_as(
            "buyer:abroad",
            json!({ "sql": "SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry" }),
        );
        assert_eq!(quick.status, 200, "{}", quick.text());
        for f in flood {
            assert_eq!(f.join().unwrap(), 422, "stopped by the time limit");
        }
    });
    assert_eq!(
        principals_in_ledger_order(&app),
        ["buyer:acme", "buyer:abroad", "buyer:acme", "buyer:acme"],
        "the other buyer's query ran right after the one holding the slot"
    );
}

/// Weighted sharing: acme (weight 3) and abroad (weight 1) each hold two of
/// the four slots with slow queries, and each queues a quick one. The first
/// slot to free is abroad's, leaving it one query to acme's two: by count
/// abroad would go next, but per unit of weight acme is the less served
/// (2/3 against 1/1), so acme's quick query starts first, a second before
/// abroad's (the next slot frees when acme's second slow query times out).
/// Checked by order (the ledger's), not by wall time: the slow queries arrive
/// a second apart, so the verdict holds unless one quick query runs a second
/// longer than the other, however loaded the machine.
#[test]
fn a_heavier_organisation_is_served_first_when_both_wait() {
    let mut settings = frostglass::config::Settings::default();
    settings.limits.query_timeout_ms = 4_000;
    settings.limits.max_concurrent_queries = 4;
    settings.limits.queue_wait_ms = 300_000;
    settings.slot_weights.insert("acme".into(), 3);
    let app = spawn_app_with(Options {
        settings,
        ..Options::default()
    });
    // Holds its slot until the time limit: abroad may not read power_grid
    // (cross-border), so both read a three-way join of the registry.
    let slow = |i: usize| {
        json!({
            "sql": format!(
                "SELECT COUNT(*) AS n{i} FROM enterprise_registry a \
                 JOIN enterprise_registry b ON a.industry = b.industry \
                 JOIN enterprise_registry c ON b.industry = c.industry"
            )
        })
    };
    let quick = |i: usize| json!({ "sql": format!("SELECT industry, COUNT(*) AS n{i} FROM enterprise_registry GROUP BY industry") });
    // (who, what, status expected, pause before the next arrival in ms):
    // the slots free in the slow queries' arrival order, a second apart.
    let arrivals = [
        ("buyer:abroad", slow(0), 422, 1_000),
        ("buyer:acme", slow(1), 422, 1_000),
        ("buyer:acme", slow(2), 422, 1_000),
        ("buyer:abroad", slow(3), 422, 300),
        ("buyer:abroad", quick(4), 200, 300),
        ("buyer:acme", quick(5), 200, 0),
    ];
    std::thread::scope(|s| {
        let app = &app;
        let mut asked = Vec::new();
        for (who, body, status, pause) in arrivals {
            asked.push((status, s.spawn(move || app.query_as(who, body))));
            std::thread::sleep(std::time::Duration::from_millis(pause));
        }
        for (status, a) in asked {
            let r = a.join().unwrap();
            assert_eq!(r.status, status, "{}", r.text());
        }
    });
    let answered: Vec<String> = app
        .query_entries(0)
        .iter()
        .filter(|q| q["decision"] == "answered")
        .map(|q| q["principal"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        answered,
        ["buyer:acme", "buyer:abroad"],
        "acme's quick query took the slot abroad freed"
    );
}
