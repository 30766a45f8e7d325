//! Nothing leaks: the real binary, its log captured, attacked through both
//! front doors (HTTP and Flight SQL) with queries that try to pull
//! identifiers out; no response, error and no log line may contain a value
//! of an identifier column.

use crate::helpers::{column_values, repo, shared_catalog};
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::arrow::util::display::array_value_to_string;
use futures::TryStreamExt;
use serde_json::{Value, json};
use std::io::BufRead;
use std::process::Command;

#[test]
fn no_identifier_value_reaches_a_response_or_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bin = env!("CARGO_BIN_EXE_frostglass");
    let add = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string()
    };
    let data_arg = data.to_str().unwrap();
    let key = add(&[
        "principal",
        "add",
        "buyer:x",
        "--role",
        "buyer",
        "--data-dir",
        data_arg,
    ]);
    let catalog = shared_catalog().to_str().unwrap().to_string();
    let policies = repo().join("policies");
    let _ = &catalog;
    add(&[
        "grant",
        "add",
        "--buyer",
        "buyer:x",
        "--dataset",
        "city_health",
        "--dataset",
        "telecom_usage",
        "--purpose",
        "public_health_research",
        "--data-dir",
        data_arg,
        "--catalog",
        &catalog,
        "--policies",
        policies.to_str().unwrap(),
    ]);
    let log_path = dir.path().join("server.log");
    // Everything at trace but the HTTP/2 transport, whose frame-by-frame
    // lines carry no values and would only bury the rest.
    let server = crate::helpers::Server::start(
        &data,
        &log_path,
        &[(
            "FROSTGLASS_LOG",
            "trace,h2=info,hyper=info,tonic=info,tower=info",
        )],
    );
    let base = server.base.clone();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();

    let attacks = [
        "SELECT name, COUNT(*) FROM city_health GROUP BY name",
        "SELECT * FROM city_health",
        "SELECT id_card FROM city_health LIMIT 1",
        "SELECT MIN(name) FROM city_health",
        "SELECT district, MAX(id_card) FROM city_health GROUP BY district",
        "SELECT COUNT(*) FROM city_health WHERE name LIKE 'W%'",
        "SELECT CAST(name AS INT) AS x, COUNT(*) FROM city_health GROUP BY x",
        "SELECT district, COUNT(*) FROM city_health GROUP BY district, person_id",
        "SELECT string_agg(name, ',') FROM city_health",
        "SELECT array_agg(id_card) FROM city_health",
        "SELECT first_value(name) OVER () FROM city_health",
        "SELECT COUNT(*) FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id WHERE c.id_card > '1'",
        "SELECT district, COUNT(*) FROM city_health GROUP BY district",
        "SELECT c.district, COUNT(DISTINCT c.person_id) FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY c.district",
    ];
    let mut bodies = String::new();
    let mut answered = 0;
    for sql in attacks {
        let mut resp = agent
            .post(format!("{base}/v1/queries"))
            .header("Authorization", &format!("Bearer {key}"))
            .send_json(json!({ "sql": sql }))
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap();
        if status == 200 {
            answered += 1;
            let doc: Value = serde_json::from_str(&body).unwrap();
            let ids: Vec<String> = column_values("city_health", "person_id");
            for row in doc["rows"].as_array().unwrap() {
                for cell in row.as_array().unwrap() {
                    assert!(
                        !ids.contains(&cell.to_string()),
                        "{sql} released a person id"
                    );
                }
            }
        }
        bodies.push_str(&body);
    }
    assert_eq!(
        answered, 2,
        "only the two legitimate aggregates are answered"
    );

    // The same attacks through Flight SQL, the second front door.
    let flight = flight_address(&log_path);
    let ids: Vec<String> = column_values("city_health", "person_id");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let flight_answered = rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(flight)
            .unwrap()
            .connect()
            .await
            .expect("Flight SQL listens");
        let mut client = FlightSqlServiceClient::new(channel);
        client.set_token(key.clone());
        let mut answered = 0;
        for sql in attacks {
            let info = match client.execute(sql.to_string(), None).await {
                Ok(info) => info,
                Err(refused) => {
                    bodies.push_str(&refused.to_string());
                    continue;
                }
            };
            let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
            let batches: Vec<_> = client
                .do_get(ticket)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            answered += 1;
            for batch in &batches {
                for column in batch.columns() {
                    for row in 0..batch.num_rows() {
                        let cell = array_value_to_string(column, row).unwrap();
                        assert!(!ids.contains(&cell), "{sql} released a person id");
                        bodies.push_str(&cell);
                        bodies.push('\n');
                    }
                }
            }
        }
        answered
    });
    assert_eq!(
        flight_answered, 2,
        "Flight SQL answers the same two aggregates"
    );
    drop(server);

    let log_lines: Vec<String> = std::io::BufReader::new(std::fs::File::open(&log_path).unwrap())
        .lines()
        .map(|l| l.unwrap())
        .collect();
    assert!(
        log_lines.len() > attacks.len(),
        "the server logged its requests"
    );
    let flight_calls = log_lines
        .iter()
        .filter(|l| l.contains("call done") && l.contains("FlightService/GetFlightInfo"))
        .count();
    assert!(
        flight_calls >= attacks.len(),
        "every Flight SQL call is logged ({flight_calls} GetFlightInfo lines)"
    );
    let mut secrets = column_values("city_health", "name");
    secrets.extend(column_values("city_health", "id_card"));
    secrets.sort();
    secrets.dedup();
    for secret in &secrets {
        assert!(
            !bodies.contains(secret.as_str()),
            "a response contains an identifier value"
        );
        assert!(
            !log_lines.iter().any(|l| l.contains(secret.as_str())),
            "a log line contains an identifier value"
        );
    }
}

/// Where the server says Flight SQL listens (`  Flight SQL on grpc://…`).
fn flight_address(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Flight SQL on grpc://"))
        .expect("the server names its Flight SQL address");
    format!("http://{line}")
}
