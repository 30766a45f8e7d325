//! Release jobs on an Apache DataFusion Ballista cluster (build with
//! `--features ballista`): the sandbox gates, the cluster scans and
//! aggregates, and the answers are those of local execution.

use crate::helpers::{Options, TestApp, spawn_app_with};
use frostglass::config::{Execution, Settings};
use serde_json::Value;
use std::sync::OnceLock;

/// A scheduler and two executors in this process, on loopback ports, as
/// Ballista's own tests run them; shared by the tests of this file.
fn in_process_cluster() -> String {
    static SCHEDULER: OnceLock<String> = OnceLock::new();
    SCHEDULER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let scheduler = frostglass::engine::cluster::in_process(2, 2).await;
                    tx.send(scheduler.expect("the cluster starts")).unwrap();
                    std::future::pending::<()>().await
                })
            });
            rx.recv().unwrap()
        })
        .clone()
}

/// Unit summaries off unless said: releases they answer never leave the sandbox.
pub fn app_on(execution: Execution, unit_summaries: bool) -> TestApp {
    let settings = Settings {
        execution,
        unit_summaries,
        ..Settings::default()
    };
    spawn_app_with(Options {
        settings,
        ..Options::default()
    })
}

fn sorted_rows(doc: &Value) -> Vec<Vec<Value>> {
    let mut rows: Vec<Vec<Value>> = serde_json::from_value(doc["rows"].clone()).unwrap();
    rows.sort_by_key(|r| format!("{r:?}"));
    rows
}

/// Threshold releases of exact values: identical, row for row.
const EXACT: &[&str] = &[
    "SELECT district, COUNT(*) AS readings, COUNT(DISTINCT substation_id) AS substations \
     FROM power_grid GROUP BY district",
    "SELECT district, substation_id, COUNT(*) AS n FROM power_grid \
     WHERE hour < TIMESTAMP '2025-01-02 00:00:00' GROUP BY district, substation_id HAVING COUNT(*) > 12",
    // A second dataset in a subquery (IN, NOT IN) or a join: joins the
    // scheduler cuts into stages with a shuffle.
    "SELECT district, COUNT(*) AS n FROM power_grid WHERE district IN \
     (SELECT district FROM enterprise_registry WHERE employees > 100) GROUP BY district",
    "SELECT district, COUNT(*) AS n FROM power_grid WHERE district NOT IN \
     (SELECT district FROM enterprise_registry WHERE employees > 2000) GROUP BY district",
    "SELECT e.industry, COUNT(*) AS n, COUNT(DISTINCT p.substation_id) AS substations \
     FROM power_grid p JOIN enterprise_registry e ON p.district = e.district \
     WHERE e.founded_year > 2015 AND p.hour < TIMESTAMP '2025-01-01 06:00:00' GROUP BY e.industry",
];

/// Refused at the gate, before any plan reaches the cluster.
const REFUSED: &[(&str, &str)] = &[
    ("SELECT * FROM city_health", "policy_violation"),
    ("SELECT COUNT(*) FROM no_such_table", "unknown_table"),
    ("DROP TABLE power_grid", "statement_not_allowed"),
];

/// Differential privacy over consenting persons' rows; the second's keys
/// vary within a person, so it bounds contributions with the sandbox's own
/// operator, shipped to the executors by its codec.
const NOISY: &[&str] = &[
    "SELECT district, COUNT(*) AS visits FROM city_health GROUP BY district",
    "SELECT date_trunc('month', visit_date) AS month, COUNT(*) AS visits, \
     SUM(cost) AS spent FROM city_health GROUP BY 1",
];

/// `sql` answered by the local sandbox and by the one whose cluster ran it.
fn answered_both_ways(local: &TestApp, cluster: &TestApp, sql: &str) -> (Value, Value) {
    let (here, there) = (local.query(sql), cluster.query(sql));
    assert_eq!(here.status, 200, "{sql}: {}", here.text());
    assert_eq!(there.status, 200, "{sql}: {}", there.text());
    let (here, there) = (here.json(), there.json());
    assert_eq!(there["release"]["cluster_jobs"], 1, "{there}");
    assert!(here["release"]["cluster_jobs"].is_null(), "{here}");
    (here, there)
}

#[test]
fn the_cluster_gives_the_decisions_and_answers_of_local_execution() {
    let local = app_on(Execution::Local, false);
    let cluster = app_on(
        Execution::Ballista {
            scheduler: in_process_cluster(),
        },
        false,
    );
    for sql in EXACT {
        let (here, there) = answered_both_ways(&local, &cluster, sql);
        assert_eq!(sorted_rows(&here), sorted_rows(&there), "{sql}");
        assert_eq!(
            here["release"]["released_groups"],
            there["release"]["released_groups"]
        );
        assert_eq!(
            here["release"]["suppressed_groups"],
            there["release"]["suppressed_groups"]
        );
        // Charged from the catalog either way.
        assert_eq!(
            here["usage"]["rows_scanned"],
            there["usage"]["rows_scanned"]
        );
    }
    for (sql, code) in REFUSED {
        let (here, there) = (local.query(sql), cluster.query(sql));
        assert_eq!(
            here.code().as_deref(),
            Some(*code),
            "{sql}: {}",
            here.text()
        );
        assert_eq!(
            there.code().as_deref(),
            Some(*code),
            "{sql}: {}",
            there.text()
        );
        assert_eq!(here.rule(), there.rule(), "{sql}");
    }
    for sql in NOISY {
        let (here, there) = answered_both_ways(&local, &cluster, sql);
        assert_eq!(here["columns"], there["columns"]);
        assert_eq!(
            here["release"]["noise"], there["release"]["noise"],
            "same mechanism and scales"
        );
        consistent(sql, &here, &there);
    }
}

/// Two noisy releases of the same truth: every value of a group both
/// released lies within six times its 95% error bound of the other (for
/// Laplace noise about 18 scales: two independent draws land further apart
/// with probability under one in a million).
fn consistent(sql: &str, here: &Value, there: &Value) {
    let columns: Vec<String> = here["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    let bounds: Vec<Option<f64>> = columns
        .iter()
        .map(|name| {
            here["release"]["noise"]["columns"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["column"] == name.as_str())
                .and_then(|c| c["error_95"].as_f64())
        })
        .collect();
    let keys = bounds.iter().take_while(|b| b.is_none()).count();
    let there_rows: std::collections::HashMap<String, Vec<Value>> = sorted_rows(there)
        .into_iter()
        .map(|r| (format!("{:?}", &r[..keys]), r))
        .collect();
    let mut compared = 0;
    for row in sorted_rows(here) {
        let Some(other) = there_rows.get(&format!("{:?}", &row[..keys])) else {
            continue;
        };
        for (i, bound) in bounds.iter().enumerate().skip(keys) {
            let (a, b) = (row[i].as_f64().unwrap(), other[i].as_f64().unwrap());
            compared += 1;
            let bound = bound.expect("a noisy column reports its error");
            assert!(
                (a - b).abs() <= 6.0 * bound,
                "{sql}: {a} and {b} are too far apart"
            );
        }
    }
    assert!(
        compared >= 4,
        "{sql}: only {compared} values released by both"
    );
}

#[test]
fn releases_the_unit_summaries_answer_stay_in_the_sandbox() {
    let app = app_on(
        Execution::Ballista {
            scheduler: in_process_cluster(),
        },
        true,
    );
    let r = app.query(NOISY[0]);
    assert_eq!(r.status, 200, "{}", r.text());
    let release = &r.json()["release"];
    assert_eq!(release["summary_used"], true, "{release}");
    assert!(release["cluster_jobs"].is_null(), "{release}");
    // A release the summaries cannot answer still goes to the cluster.
    let r = app.query(NOISY[1]);
    assert_eq!(r.json()["release"]["cluster_jobs"], 1, "{}", r.text());
}

/// A `frostglass cluster` process, killed on drop.
struct Node(std::process::Child);

impl Node {
    fn start(args: &[&str], log: &std::path::Path) -> Node {
        let log = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_frostglass"))
            .arg("cluster")
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Node(child)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `N` free ports, all held until all are known, so that none is handed out twice.
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// The README's kinds of query, each round with its own DP filter so no
/// answer comes from the cache of released answers.
fn suite(round: u32) -> [(String, bool); 3] {
    [
        (EXACT[0].to_string(), false),
        (
            format!(
                "SELECT district, COUNT(*) AS visits FROM city_health WHERE age > {round} \
                 GROUP BY district ORDER BY visits DESC"
            ),
            true,
        ),
        (
            "SELECT COUNT(*) FROM city_health WHERE id_card = '110101199001011234'".to_string(),
            false,
        ),
    ]
}

#[test]
fn an_executor_killed_mid_suite_costs_an_answer_at_most_never_a_wrong_one() {
    let logs = tempfile::tempdir().unwrap();
    let [scheduler, flight_0, grpc_0, flight_1, grpc_1] = free_ports();
    let executor_ports = [(flight_0, grpc_0), (flight_1, grpc_1)];
    let _scheduler = Node::start(
        &[
            "scheduler",
            "--bind",
            &format!("127.0.0.1:{scheduler}"),
            "--executor-timeout-s",
            "3",
        ],
        &logs.path().join("scheduler.log"),
    );
    let mut executors: Vec<Node> = executor_ports
        .iter()
        .enumerate()
        .map(|(i, (flight, grpc))| {
            Node::start(
                &[
                    "executor",
                    "--bind",
                    &format!("127.0.0.1:{flight}"),
                    "--grpc-port",
                    &grpc.to_string(),
                    "--heartbeat-s",
                    "1",
                    "--scheduler",
                    &format!("127.0.0.1:{scheduler}"),
                    "--vcores",
                    "2",
                ],
                &logs.path().join(format!("executor-{i}.log")),
            )
        })
        .collect();
    let mut settings = Settings {
        execution: Execution::Ballista {
            scheduler: format!("df://127.0.0.1:{scheduler}"),
        },
        unit_summaries: false,
        ..Settings::default()
    };
    settings.limits.query_timeout_ms = 20_000;
    let app = spawn_app_with(Options {
        settings,
        ..Options::default()
    });
    let local = app_on(Execution::Local, false);
    let exact = local.query(EXACT[0]);
    assert_eq!(exact.status, 200, "{}", exact.text());
    let exact = sorted_rows(&exact.json());

    // The cluster is up once it answers.
    let started = std::time::Instant::now();
    loop {
        let r = app.query(EXACT[0]);
        if r.status == 200 {
            assert_eq!(r.json()["release"]["cluster_jobs"], 1);
            break;
        }
        assert!(
            started.elapsed().as_secs() < 60,
            "the cluster never answered: {}",
            r.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    let (mut answered, mut refused, mut dp_sent) = (0, 0, 0);
    let mut victim = Some(executors.remove(0));
    for round in 0..6 {
        for (sql, dp) in suite(round) {
            dp_sent += u32::from(dp);
            let t = std::time::Instant::now();
            let r = std::thread::scope(|s| {
                let asked = s.spawn(|| app.query(&sql));
                if round == 1 && dp {
                    // SIGKILL while the query runs: no goodbye to the scheduler.
                    std::thread::sleep(std::time::Duration::from_millis(30));
                    drop(victim.take());
                }
                asked.join().unwrap()
            });
            assert!(t.elapsed().as_secs() < 60, "{sql} took {:?}", t.elapsed());
            if r.status == 200 {
                assert_eq!(r.json()["release"]["cluster_jobs"], 1, "{}", r.text());
            }
            match (r.status, r.code().as_deref()) {
                (200, _) if sql == EXACT[0] => {
                    assert_eq!(
                        sorted_rows(&r.json()),
                        exact,
                        "a wrong answer after the kill"
                    );
                    answered += 1;
                }
                (200, _) => {
                    assert!(dp, "{sql}: {}", r.text());
                    assert_eq!(r.json()["usage"]["epsilon"], 0.5);
                    answered += 1;
                }
                (_, Some("policy_violation")) => assert!(sql.contains("id_card")),
                (_, Some("overloaded" | "resource_limit")) => refused += 1,
                _ => panic!("{sql}: {} {}", r.status, r.text()),
            }
        }
    }
    // The surviving executor carries on: the last rounds are answered.
    let r = app.query(EXACT[0]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sorted_rows(&r.json()), exact);
    assert!(answered >= 6, "{answered} answered, {refused} refused");
    eprintln!("the suite: {answered} answered, {refused} refused");
    if std::env::var_os("FG_KEEP_CLUSTER_LOGS").is_some() {
        eprintln!("logs kept in {}", logs.keep().display());
    }

    // Budget: what the grant has spent is exactly what the ledger charged,
    // and no more than the DP queries sent.
    let spent = app.get("/v1/grants", Some(app.key("buyer:acme"))).json()["grants"][0]["budget"]
        ["epsilon_spent"]
        .as_f64()
        .unwrap();
    let charged: f64 = app
        .query_entries(0)
        .iter()
        .map(|e| e["epsilon_charged"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(
        (spent - charged).abs() < 1e-9,
        "spent {spent}, ledger {charged}"
    );
    assert!(
        spent <= 0.5 * f64::from(dp_sent) + 1e-9,
        "spent {spent} on {dp_sent}"
    );
}
