//! `frostglass bench --flight`: the same server answering the same queries
//! through its two front doors, side by side in one run — HTTP with JSON
//! answers (read to the last byte) and Arrow Flight SQL (`GetFlightInfo`,
//! then `DoGet` to the last batch) — the suite, two wide answers of 1,000+
//! rows, and the load test's small query from concurrent clients on each.

use super::bench::{
    Options, SMALL_QUERY, SUITE, Server, Timing, buyer, cpu_ms, ensure_data, grant, load, ms,
    percentile, prepare_catalog, settings, timing, write_report,
};
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use serde_json::json;
use std::cell::RefCell;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Answers of many rows, where Arrow's columnar encoding should tell.
const WIDE: [(&str, &str); 2] = [
    (
        "wide_open_rows",
        "SELECT company_id, name, district, industry, employees FROM enterprise_registry LIMIT 5000",
    ),
    (
        "wide_dp_groups",
        "SELECT district, age, COUNT(*) AS n FROM city_health GROUP BY district, age",
    ),
];

struct Doors {
    base: String,
    key: String,
    agent: ureq::Agent,
    flight_port: u16,
}

/// A Flight SQL client as a driver holds one: its own connection, driven
/// on the calling thread (a runtime of its own), as ureq drives HTTP, and
/// kept with its token for every statement. A channel shared by threads
/// would measure the hand-offs between them, not the door.
struct FlightClient {
    rt: tokio::runtime::Runtime,
    client: FlightSqlServiceClient<Channel>,
}

impl FlightClient {
    fn connect(port: u16, key: &str) -> Result<FlightClient, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let endpoint =
            Channel::from_shared(format!("http://127.0.0.1:{port}")).map_err(|e| e.to_string())?;
        let channel = rt
            .block_on(endpoint.connect())
            .map_err(|e| format!("Flight SQL: {e}"))?;
        let mut client = FlightSqlServiceClient::new(channel);
        client.set_token(key.to_string());
        Ok(FlightClient { rt, client })
    }
}

impl Doors {
    /// One statement over HTTP, the JSON answer read to its end and parsed
    /// (the client holds the answer as data, as Flight's decoded batches): rows.
    fn http(&self, sql: &str, grant: &str) -> Result<(Duration, usize), String> {
        let started = Instant::now();
        let mut resp = self
            .agent
            .post(format!("{}/v1/queries", self.base))
            .header("Authorization", &format!("Bearer {}", self.key))
            .send_json(json!({ "sql": sql, "grant": grant }))
            .map_err(|e| e.to_string())?;
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!(
                "HTTP {}: {}",
                resp.status(),
                String::from_utf8_lossy(&body)
            ));
        }
        let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok((
            started.elapsed(),
            doc["rows"].as_array().map_or(0, Vec::len),
        ))
    }

    /// One statement over Flight SQL, every batch received: rows, and how
    /// long its `GetFlightInfo` (the gate's dry run) took of it.
    fn flight(
        on: &mut FlightClient,
        sql: &str,
        grant: &str,
    ) -> Result<(Duration, usize, Duration), String> {
        on.rt
            .block_on(Self::flight_call(&mut on.client, sql, grant))
    }

    async fn flight_call(
        client: &mut FlightSqlServiceClient<Channel>,
        sql: &str,
        grant: &str,
    ) -> Result<(Duration, usize, Duration), String> {
        let started = Instant::now();
        client.set_header("x-frostglass-grant", grant);
        let info = client
            .execute(sql.to_string(), None)
            .await
            .map_err(|e| e.to_string())?;
        let decided = started.elapsed();
        let ticket = info
            .endpoint
            .first()
            .and_then(|e| e.ticket.clone())
            .ok_or("no ticket")?;
        let batches: Vec<_> = client
            .do_get(ticket)
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let rows = batches.iter().map(|b| b.num_rows()).sum();
        Ok((started.elapsed(), rows, decided))
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

pub fn run(options: Options) -> Result<(), String> {
    let data = ensure_data(&options)?;
    let catalog = prepare_catalog(&options, &data, true)?;
    let mut server_settings = settings(&options, catalog, "flight");
    server_settings.limits.max_concurrent_queries = 8;
    let flight_port = free_port()?;
    server_settings.flight_listen = Some(format!("127.0.0.1:{flight_port}"));
    let store = RefCell::new(
        frostglass::app::admin::open(&server_settings.data_dir).map_err(|e| e.to_string())?,
    );
    let (_, key) = buyer(&store)?;
    let server = Server::start(server_settings)?;
    let mut client = FlightClient::connect(flight_port, &key)?;
    let doors = Doors {
        base: server.base.clone(),
        key,
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(options.http_clients * 2)
            .max_idle_connections_per_host(options.http_clients * 2)
            .build()
            .into(),
        flight_port,
    };

    println!(
        "{:<18} {:>7} {:>10} {:>10} {:>9} {:>12}",
        "query", "rows", "http ms", "flight ms", "info ms", "flight/http"
    );
    let mut rows = Vec::new();
    for (name, sql) in SUITE.iter().chain(WIDE.iter()) {
        let (mut http, mut flight, mut info) = (Vec::new(), Vec::new(), Vec::new());
        let mut answer_rows = 0;
        // One warm-up each, then the doors interleaved run by run; every
        // statement a plan of its own under a fresh grant, so it is computed.
        let measured = (0..=options.runs).try_for_each(|run| -> Result<(), String> {
            let fresh = format!("SELECT * FROM ({sql}) AS run_{run}");
            let (h, n) = doors.http(&fresh, &grant(&store)?)?;
            let fresh = format!("SELECT * FROM ({sql}) AS flight_{run}");
            let (f, m, i) = Doors::flight(&mut client, &fresh, &grant(&store)?)?;
            // Where differential privacy selects the groups, two releases may
            // differ in how many pass; elsewhere the doors answer alike.
            answer_rows = n.max(m);
            if run > 0 {
                http.push(ms(h));
                flight.push(ms(f));
                info.push(ms(i));
            }
            Ok(())
        });
        if let Err(e) = measured {
            println!("{name:<18} failed: {e}");
            rows.push(json!({ "query": name, "sql": sql, "error": e }));
            continue;
        }
        let (h, f, i): (Timing, Timing, Timing) = (timing(http), timing(flight), timing(info));
        let ratio = f.median_ms / h.median_ms;
        println!(
            "{name:<18} {answer_rows:>7} {:>10.1} {:>10.1} {:>9.1} {ratio:>12.2}",
            h.median_ms, f.median_ms, i.median_ms
        );
        rows.push(json!({
            "query": name, "sql": sql, "rows": answer_rows, "http": h, "flight": f, "flight_info": i, "ratio_flight_http": ratio,
        }));
    }

    let small_grant = grant(&store)?;
    let clients = options.http_clients;
    let seconds = options.http_seconds;
    thread_local!(static CLIENT: RefCell<Option<FlightClient>> = const { RefCell::new(None) });
    let flight_small = || {
        CLIENT.with_borrow_mut(|client| {
            if client.is_none() {
                *client = Some(FlightClient::connect(doors.flight_port, &doors.key)?);
            }
            let on = client.as_mut().ok_or("no Flight SQL client")?;
            Doors::flight(on, SMALL_QUERY, &small_grant).map(|(d, _, _)| d)
        })
    };
    let http_small = || doors.http(SMALL_QUERY, &small_grant).map(|(d, _)| d);
    // The doors take turns, twice each, so that neither has the quieter
    // half of the run or the shorter ledger to itself.
    let mut totals = [LoadTotals::default(), LoadTotals::default()];
    for _ in 0..2 {
        for (door, one) in [
            &http_small as &(dyn Fn() -> Result<Duration, String> + Sync),
            &flight_small,
        ]
        .into_iter()
        .enumerate()
        {
            let (server_before, client_before) = (server.cpu_ms(), cpu_ms("self"));
            let threads_before = server.cpu_ms_by_thread();
            let (lat, errors) = load(clients, seconds, one);
            let t = &mut totals[door];
            for (family, ms) in server.cpu_ms_by_thread() {
                let before = threads_before.get(&family).copied().unwrap_or(0.0);
                *t.server_threads.entry(family).or_insert(0.0) += ms - before;
            }
            // NaN, and so unknown in the sum, where /proc cannot be read.
            let spent = |after: Option<f64>, before: Option<f64>| {
                after.zip(before).map_or(f64::NAN, |(a, b)| a - b)
            };
            t.server_cpu_ms += spent(server.cpu_ms(), server_before);
            t.client_cpu_ms += spent(cpu_ms("self"), client_before);
            t.latencies.extend(lat);
            t.errors += errors;
        }
    }
    let [http_load, flight_load] = totals.map(|mut t| t.summary(2 * seconds));
    for (door, s) in [("HTTP", &http_load), ("Flight SQL", &flight_load)] {
        let threads = s["cpu_ms_per_answer"]["server_threads"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, ms)| ms.as_f64().unwrap_or(0.0) >= 0.005)
                    .map(|(family, ms)| format!("{family} {:.3}", ms.as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        println!(
            "{door} load: {clients} clients, {:.0} queries/s, p50 {:.1} ms, p99 {:.1} ms, {} errors; \
             CPU per answer: server {:.3} ms, load generator {:.3} ms",
            s["queries_per_second"].as_f64().unwrap_or(0.0),
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0),
            s["errors"],
            s["cpu_ms_per_answer"]["server"]
                .as_f64()
                .unwrap_or(f64::NAN),
            s["cpu_ms_per_answer"]["load_generator"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        println!("  the server's CPU per answer by thread: {threads}");
    }
    let report = json!({
        "scale": options.scale, "runs": options.runs,
        "machine": { "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()) },
        "suite": rows,
        "load": { "sql": SMALL_QUERY, "clients": clients, "seconds": seconds, "http": http_load, "flight": flight_load },
    });
    write_report(&options.out, &report)
}

/// One door's load rounds added up.
#[derive(Default)]
struct LoadTotals {
    latencies: Vec<f64>,
    errors: usize,
    server_cpu_ms: f64,
    client_cpu_ms: f64,
    /// The server's CPU by thread family.
    server_threads: std::collections::BTreeMap<String, f64>,
}

impl LoadTotals {
    fn summary(&mut self, seconds: u64) -> serde_json::Value {
        self.latencies.sort_by(|a, b| a.total_cmp(b));
        let answers = self.latencies.len();
        // NaN where /proc could not be read: unknown, so null.
        let per_answer = |ms: f64| ms.is_finite().then(|| ms / answers.max(1) as f64);
        json!({
            "answered": answers, "errors": self.errors,
            "queries_per_second": answers as f64 / seconds as f64,
            "p50_ms": percentile(&self.latencies, 0.5), "p99_ms": percentile(&self.latencies, 0.99),
            "cpu_ms_per_answer": {
                "server": per_answer(self.server_cpu_ms),
                "load_generator": per_answer(self.client_cpu_ms),
                "server_threads": self.server_threads.iter()
                    .map(|(family, ms)| (family.clone(), json!(ms / answers.max(1) as f64)))
                    .collect::<serde_json::Map<_, _>>(),
            },
        })
    }
}
