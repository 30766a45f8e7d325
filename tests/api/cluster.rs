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
        let (here, there) = (local.query(sql), cluster.query(sql));
        assert_eq!(here.status, 200, "{sql}: {}", here.text());
        assert_eq!(there.status, 200, "{sql}: {}", there.text());
        let (here, there) = (here.json(), there.json());
        assert_eq!(there["release"]["cluster_jobs"], 1, "{there}");
        assert!(here["release"]["cluster_jobs"].is_null());
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
        let (here, there) = (local.query(sql), cluster.query(sql));
        assert_eq!(here.status, 200, "{sql}: {}", here.text());
        assert_eq!(there.status, 200, "{sql}: {}", there.text());
        let (here, there) = (here.json(), there.json());
        assert_eq!(there["release"]["cluster_jobs"], 1, "{there}");
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
