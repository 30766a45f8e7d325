//! Arrow Flight SQL against the real server on a random port, with
//! arrow-flight's own `FlightSqlServiceClient`: catalog calls list what the
//! principal may see, answers equal HTTP's, refusals carry HTTP's codes and
//! rules, tickets are single-use and bound to their principal, writes are
//! refused, and every statement lands on the ledger like an HTTP query.

use crate::helpers::*;
use arrow_flight::decode::{DecodedPayload, FlightDataDecoder};
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{
    ActionBeginTransactionRequest, CommandGetPrimaryKeys, CommandGetTables, CommandStatementQuery,
    ProstMessageExt,
};
use arrow_flight::{Action, Criteria, FlightDescriptor, FlightInfo, Ticket};
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use prost::Message;
use serde_json::{Value, json};
use tonic::transport::Channel;

const QUICK: &str = "SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry";
/// Runs for minutes in small memory (a billion joined rows, counted).
const SLOW: &str = "SELECT COUNT(*) FROM power_grid a JOIN power_grid b ON a.district = b.district";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn channel(app: &TestApp) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{}", app.flight_port))
        .unwrap()
        .connect()
        .await
        .expect("Flight SQL listens")
}

async fn client(app: &TestApp, key: &str) -> FlightSqlServiceClient<Channel> {
    let mut c = FlightSqlServiceClient::new(channel(app).await);
    c.set_token(key.to_string());
    c
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// `GetFlightInfo` for `sql`, as the raw gRPC answer (a refusal's status intact).
async fn flight_info(app: &TestApp, key: &str, sql: &str) -> Result<FlightInfo, tonic::Status> {
    let command = CommandStatementQuery {
        query: sql.to_string(),
        transaction_id: None,
    };
    let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
    let mut raw = FlightServiceClient::new(channel(app).await);
    raw.get_flight_info(with_key(descriptor, key))
        .await
        .map(|r| r.into_inner())
}

/// Redeems a ticket: the batches and the stream's first app_metadata.
async fn redeem(
    app: &TestApp,
    key: &str,
    ticket: &Ticket,
) -> Result<(Vec<RecordBatch>, Value), tonic::Status> {
    let mut raw = FlightServiceClient::new(channel(app).await);
    let stream = raw
        .do_get(with_key(ticket.clone(), key))
        .await?
        .into_inner();
    let mut decoder = FlightDataDecoder::new(stream.map_err(Into::into));
    let (mut batches, mut metadata) = (Vec::new(), Value::Null);
    while let Some(data) = decoder
        .try_next()
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
    {
        if metadata.is_null() && !data.inner.app_metadata.is_empty() {
            metadata = serde_json::from_slice(&data.inner.app_metadata).unwrap();
        }
        if let DecodedPayload::RecordBatch(b) = data.payload {
            batches.push(b);
        }
    }
    Ok((batches, metadata))
}

/// Every batch behind `info`'s ticket, through the SQL client.
async fn fetch(c: &mut FlightSqlServiceClient<Channel>, info: &FlightInfo) -> Vec<RecordBatch> {
    c.do_get(ticket_of(info))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

fn ticket_of(info: &FlightInfo) -> Ticket {
    info.endpoint[0]
        .ticket
        .clone()
        .expect("an endpoint with a ticket")
}

/// A refusal's JSON body, checked to be HTTP's error shape.
fn body_of(status: &tonic::Status) -> Value {
    let body: Value = serde_json::from_str(status.message()).expect("the message is JSON");
    assert!(body["error"]["code"].is_string(), "{body}");
    body
}

/// Rows as HTTP's JSON shows them, for comparing answers.
fn rows(batches: &[RecordBatch]) -> Vec<Vec<Value>> {
    let mut out: Vec<Vec<Value>> =
        serde_json::from_value(json!(frostglass::release::encode::JsonRows(batches))).unwrap();
    out.sort_by_key(|r| r.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    out
}

#[test]
fn statements_answer_as_http_does_and_refuse_with_its_codes() {
    let app = spawn_app();
    let acme = app.key("buyer:acme").to_string();
    let http = app.query(QUICK);
    assert_eq!(http.status, 200, "{}", http.text());
    let mut http_rows: Vec<Vec<Value>> =
        serde_json::from_value(http.json()["rows"].clone()).unwrap();
    http_rows.sort_by_key(|r| r.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    let entries_before = app
        .get("/v1/audit/head", Some(app.key("auditor:cac")))
        .json()["tree_size"]
        .as_u64()
        .unwrap();
    let rt = runtime();
    rt.block_on(async {
        // The answer equals HTTP's (a threshold release is exact), with its
        // receipt and release summary on the stream.
        let info = flight_info(&app, &acme, QUICK).await.expect("allowed");
        let outline: Value = serde_json::from_slice(&info.app_metadata).unwrap();
        assert_eq!(outline["decision"], "allowed", "{outline}");
        let (batches, metadata) = redeem(&app, &acme, &ticket_of(&info)).await.unwrap();
        assert_eq!(rows(&batches), http_rows);
        assert_eq!(
            info.clone().try_decode_schema().unwrap().fields().len(),
            batches[0].schema().fields().len()
        );
        assert!(metadata["receipt"]["signature"].is_string(), "{metadata}");
        assert_eq!(
            metadata["release"]["mechanism"],
            http.json()["release"]["mechanism"]
        );
        let query_id = metadata["query_id"].as_str().unwrap().to_string();

        // A ticket is used once, and only by its principal.
        let again = redeem(&app, &acme, &ticket_of(&info)).await.unwrap_err();
        assert_eq!(again.code(), tonic::Code::NotFound);
        assert_eq!(body_of(&again)["error"]["code"], "not_found");
        let fresh = flight_info(&app, &acme, QUICK).await.unwrap();
        let stolen = redeem(&app, app.key("buyer:other"), &ticket_of(&fresh))
            .await
            .unwrap_err();
        assert_eq!(stolen.code(), tonic::Code::NotFound);
        assert!(
            redeem(&app, &acme, &ticket_of(&fresh)).await.is_ok(),
            "still its own"
        );

        // Refusals: raw rows, DDL, an unknown table, no key, another role.
        for (sql, code, error, rule) in [
            (
                "SELECT * FROM city_health",
                tonic::Code::PermissionDenied,
                "policy_violation",
                Some("aggregation_required"),
            ),
            (
                "CREATE TABLE t (a INT)",
                tonic::Code::InvalidArgument,
                "statement_not_allowed",
                None,
            ),
            (
                "SELECT COUNT(*) FROM no_such_table",
                tonic::Code::NotFound,
                "unknown_table",
                None,
            ),
        ] {
            let refused = flight_info(&app, &acme, sql).await.unwrap_err();
            assert_eq!(refused.code(), code, "{sql}: {refused:?}");
            let body = body_of(&refused);
            assert_eq!(body["error"]["code"], error, "{sql}");
            if let Some(rule) = rule {
                assert_eq!(body["error"]["details"]["rule"], rule, "{sql}");
            }
            // The same code as HTTP gives.
            assert_eq!(app.query(sql).code().as_deref(), Some(error), "{sql}");
        }
        let anonymous = flight_info(&app, "not-a-key", QUICK).await.unwrap_err();
        assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
        let owner = flight_info(&app, app.key("owner:hospital"), QUICK)
            .await
            .unwrap_err();
        assert_eq!(owner.code(), tonic::Code::PermissionDenied);

        // Writes are refused whatever the door.
        let mut c = client(&app, &acme).await;
        let update = c
            .execute_update("DELETE FROM city_health".into(), None)
            .await
            .unwrap_err();
        assert!(
            update.to_string().contains("statement_not_allowed"),
            "{update}"
        );

        // Prepared statements (what JDBC always uses), without parameters.
        let mut prepared = c.prepare(QUICK.to_string(), None).await.unwrap();
        assert_eq!(prepared.dataset_schema().unwrap().fields().len(), 2);
        let info = prepared.execute().await.unwrap();
        let (batches, _) = redeem(&app, &acme, &ticket_of(&info)).await.unwrap();
        assert_eq!(rows(&batches), http_rows);
        prepared.close().await.unwrap();

        // The handshake answers the key as bearer token.
        let mut fresh = FlightSqlServiceClient::new(channel(&app).await);
        fresh.handshake("anyone", &acme).await.unwrap();
        assert_eq!(fresh.token(), Some(&acme));
        assert!(
            FlightSqlServiceClient::new(channel(&app).await)
                .handshake("anyone", "wrong")
                .await
                .is_err()
        );
        query_id
    });

    // Every statement is on the ledger like an HTTP query: three answers
    // (two tickets and the prepared one), three refusals of this buyer,
    // one of the owner.
    let queries = app.query_entries(entries_before);
    let answered = queries
        .iter()
        .filter(|q| q["decision"] == "answered")
        .count();
    let refused = queries
        .iter()
        .filter(|q| q["decision"] == "refused")
        .count();
    assert_eq!(answered, 3, "{queries:?}");
    // Three by Flight (with the same codes HTTP recorded for its three).
    assert_eq!(refused, 3 + 3 + 1, "{queries:?}");
    // The entry just before them is HTTP's answer to the same SQL.
    let http_entry = app.query_entries(entries_before - 1).remove(0);
    let flight_entry = queries
        .iter()
        .find(|q| q["decision"] == "answered")
        .unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(flight_entry),
        keys(&http_entry),
        "the same fields as HTTP"
    );
    assert_eq!(flight_entry["sql_sha256"], http_entry["sql_sha256"]);
    // The same answer, the same digest: of its rows as HTTP's JSON writes them.
    let http_digest = frostglass::util::sha256_hex(http.json()["rows"].to_string().as_bytes());
    assert_eq!(http_entry["result_sha256"], http_digest.as_str());
    assert_eq!(flight_entry["result_sha256"], http_digest.as_str());
}

#[test]
fn catalog_calls_list_only_what_the_principal_may_see() {
    let app = spawn_app();
    let rt = runtime();
    rt.block_on(async {
        let tables = |key: String| {
            let app = &app;
            async move {
                let mut c = client(app, &key).await;
                let info = c
                    .get_tables(CommandGetTables {
                        include_schema: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                fetch(&mut c, &info).await
            }
        };
        let listed = |batches: &[RecordBatch]| -> Vec<String> {
            let mut names: Vec<String> = rows(batches)
                .iter()
                .map(|r| r[2].as_str().unwrap().to_string())
                .collect();
            names.sort();
            names
        };
        let buyer = tables(app.key("buyer:acme").to_string()).await;
        assert_eq!(
            listed(&buyer),
            [
                "city_health",
                "enterprise_registry",
                "power_grid",
                "telecom_usage"
            ],
            "the granted tables, not population_registry"
        );
        assert!(
            listed(&tables(app.key("buyer:other").to_string()).await).is_empty(),
            "no grant, no table"
        );
        assert_eq!(
            listed(&tables(app.key("owner:hospital").to_string()).await),
            ["city_health"]
        );
        // Each column carries its class.
        let schemas = buyer[0]
            .column_by_name("table_schema")
            .expect("schemas included")
            .clone();
        let bytes = schemas
            .as_any()
            .downcast_ref::<datafusion::arrow::array::BinaryArray>()
            .unwrap();
        let names = rows(&buyer);
        let city = names
            .iter()
            .position(|r| r[2] == json!("city_health"))
            .unwrap();
        let message = arrow_flight::IpcMessage(bytes.value(city).to_vec().into());
        let schema = datafusion::arrow::datatypes::Schema::try_from(message).unwrap();
        let person = schema.field_with_name("person_id").unwrap();
        assert_eq!(person.metadata()["frostglass.class"], "identifier");
        assert_eq!(person.metadata()["frostglass.privacy_unit"], "true");
        let mut c = client(&app, app.key("buyer:acme")).await;
        let info = c.get_catalogs().await.unwrap();
        let catalogs = fetch(&mut c, &info).await;
        assert_eq!(rows(&catalogs), vec![vec![json!("datafusion")]]);
    });
}

#[test]
fn a_dropped_stream_cancels_its_query_and_the_ledger_records_it() {
    let app = spawn_app_with_limits(|limits| {
        limits.query_timeout_ms = 300_000;
        // One slot: the next query runs only once the abandoned one stopped.
        limits.max_concurrent_queries = 1;
        limits.queue_wait_ms = 60_000;
    });
    let acme = app.key("buyer:acme").to_string();
    let rt = runtime();
    rt.block_on(async {
        let info = flight_info(&app, &acme, SLOW).await.expect("allowed");
        let ticket = ticket_of(&info);
        let (app_ref, key) = (&app, acme.clone());
        let redeeming = async move { redeem(app_ref, &key, &ticket).await };
        let gave_up = tokio::time::timeout(std::time::Duration::from_secs(1), redeeming).await;
        assert!(gave_up.is_err(), "the join runs longer than a second");
    });
    drop(rt);
    let started = std::time::Instant::now();
    assert_eq!(app.query(QUICK).status, 200);
    assert!(
        started.elapsed().as_secs() < 20,
        "the abandoned query kept its slot for {:?}",
        started.elapsed()
    );
    let closed = app
        .query_entries(0)
        .iter()
        .filter(|q| q["code"] == "client_closed")
        .count();
    assert_eq!(closed, 1, "the cancelled query is in the ledger once");
}

#[test]
fn a_ticket_is_decided_again_when_its_grant_ends_before_it_is_redeemed() {
    let app = spawn_app();
    let acme = app.key("buyer:acme").to_string();
    let rt = runtime();
    let ticket = rt.block_on(async {
        let sql = "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district";
        ticket_of(&flight_info(&app, &acme, sql).await.expect("allowed"))
    });
    let revoke = app.request(
        "POST",
        &format!("/v1/grants/{}/revoke", app.grants["buyer:acme"]),
        Some(app.key("owner:hospital")),
        None,
        None,
    );
    assert_eq!(revoke.status, 200, "{}", revoke.text());
    let refused = rt
        .block_on(redeem(&app, &acme, &ticket))
        .expect_err("the grant it was decided under is gone");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(body_of(&refused)["error"]["code"], "no_grant");
}

#[test]
fn work_begun_ahead_is_charged_and_recorded_only_when_its_ticket_is_redeemed() {
    let app = spawn_app();
    let acme = app.key("buyer:acme").to_string();
    let sql = "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district";
    let rt = runtime();
    let metadata = rt.block_on(async {
        // Both decisions begin executing ahead; only the second is redeemed.
        let unredeemed = flight_info(&app, &acme, sql).await.expect("allowed");
        let info = flight_info(&app, &acme, sql).await.expect("allowed");
        let (batches, metadata) = redeem(&app, &acme, &ticket_of(&info)).await.unwrap();
        assert!(!batches.is_empty());
        drop(unredeemed);
        metadata
    });
    let epsilon = metadata["usage"]["epsilon"].as_f64().unwrap();
    assert!(epsilon > 0.0, "{metadata}");
    assert_eq!(
        metadata["budget"]["epsilon_spent"].as_f64(),
        Some(epsilon),
        "one query's ε is spent, not two"
    );
    let entries = app.query_entries(0);
    assert_eq!(entries.len(), 1, "only the redeemed statement: {entries:?}");
    assert_eq!(entries[0]["decision"], "answered");
}

#[test]
fn an_execution_nobody_claims_gives_up_its_slot_and_a_late_ticket_runs_anew() {
    let app = spawn_app_with_limits(|limits| {
        limits.query_timeout_ms = 300_000;
        limits.max_concurrent_queries = 1;
        limits.queue_wait_ms = 2_000;
    });
    let acme = app.key("buyer:acme").to_string();
    let rt = runtime();
    let (heavy_ticket, quick_ticket) = rt.block_on(async {
        let heavy = flight_info(&app, &acme, SLOW).await.expect("allowed");
        // No slot is free now: this one waits for its redemption to execute.
        let quick = flight_info(&app, &acme, QUICK).await.expect("allowed");
        (ticket_of(&heavy), ticket_of(&quick))
    });
    assert_eq!(
        app.query(QUICK).code().as_deref(),
        Some("overloaded"),
        "the heavy statement's execution holds the only slot"
    );
    std::thread::sleep(std::time::Duration::from_millis(4_500));
    let http = app.query(QUICK);
    assert_eq!(
        http.status,
        200,
        "unclaimed, it gave the slot up: {}",
        http.text()
    );
    let mut http_rows: Vec<Vec<Value>> =
        serde_json::from_value(http.json()["rows"].clone()).unwrap();
    http_rows.sort_by_key(|r| r.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    let (batches, _) = rt.block_on(redeem(&app, &acme, &quick_ticket)).unwrap();
    assert_eq!(rows(&batches), http_rows, "a late ticket executes anew");
    drop(heavy_ticket);
    let decisions: Vec<Value> = app
        .query_entries(0)
        .iter()
        .map(|q| q["decision"].clone())
        .collect();
    assert_eq!(
        decisions,
        ["refused", "answered", "answered"],
        "the overloaded query and the two answers; nothing for the unredeemed statement"
    );
}

/// Whatever the sandbox does not serve is refused with the JSON error body
/// of every refusal, whoever wrote the refusal: its own (the session
/// actions, among them `CloseSession`, which ADBC sends as it closes a
/// connection; writes through a prepared statement), arrow-flight's
/// defaults (keys, transactions) and the plain Flight calls (`GetSchema`,
/// `ListFlights`). What it does not serve is `UNIMPLEMENTED`, what drivers
/// take for "not supported"; a command it cannot decode, `INVALID_ARGUMENT`.
/// The stable code of a refusal with gRPC code `code`.
fn refused<T>(answer: Result<T, tonic::Status>, code: tonic::Code, what: &str) -> String {
    let status = answer
        .err()
        .unwrap_or_else(|| panic!("{what}: not refused"));
    assert_eq!(status.code(), code, "{what}: {status:?}");
    body_of(&status)["error"]["code"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn calls_it_does_not_serve_are_refused_with_the_json_body() {
    let app = spawn_app();
    let acme = app.key("buyer:acme").to_string();
    runtime().block_on(async {
        let mut raw = FlightServiceClient::new(channel(&app).await);
        let action = |kind: &str, body: Vec<u8>| Action {
            r#type: kind.to_string(),
            body: body.into(),
        };
        let begin = ActionBeginTransactionRequest {}.as_any().encode_to_vec();
        for (kind, body) in [
            ("CloseSession", Vec::new()),
            ("SetSessionOptions", Vec::new()),
            ("no such action", Vec::new()),
            ("BeginTransaction", begin),
        ] {
            let request = action(kind, body);
            let answer = raw.do_action(with_key(request.clone(), &acme)).await;
            let code = refused(answer, tonic::Code::Unimplemented, kind);
            assert_eq!(code, "not_found", "{kind}");
            if kind != "BeginTransaction" {
                // The sandbox's own answer, to a caller with a key only
                // (arrow-flight answers its defaults to anyone).
                let anonymous = raw.do_action(tonic::Request::new(request)).await;
                assert_eq!(
                    refused(anonymous, tonic::Code::Unauthenticated, kind),
                    "unauthenticated"
                );
            }
        }
        let keys = CommandGetPrimaryKeys {
            table: "city_health".into(),
            ..Default::default()
        };
        let descriptor = FlightDescriptor::new_cmd(keys.as_any().encode_to_vec());
        let answer = raw
            .get_flight_info(with_key(descriptor.clone(), &acme))
            .await;
        assert_eq!(
            refused(answer, tonic::Code::Unimplemented, "keys"),
            "not_found"
        );
        let answer = raw.get_schema(with_key(descriptor, &acme)).await;
        assert_eq!(
            refused(answer, tonic::Code::Unimplemented, "GetSchema"),
            "not_found"
        );
        let answer = raw.list_flights(with_key(Criteria::default(), &acme)).await;
        assert_eq!(
            refused(answer, tonic::Code::Unimplemented, "ListFlights"),
            "not_found"
        );
        let garbage = FlightDescriptor::new_cmd(b"not a command".to_vec());
        let answer = raw.get_flight_info(with_key(garbage, &acme)).await;
        let code = refused(answer, tonic::Code::InvalidArgument, "garbage");
        assert_eq!(code, "invalid_request");

        let mut sql = client(&app, &acme).await;
        let mut prepared = sql.prepare(QUICK.to_string(), None).await.unwrap();
        let write = prepared
            .execute_update()
            .await
            .expect_err("writes are refused");
        assert!(
            write.to_string().contains("statement_not_allowed"),
            "{write}"
        );
    });
}
