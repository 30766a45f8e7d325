//! The pipeline's gate driven directly, without HTTP: the same refusals as
//! over the wire, from the services struct every front door shares.

use crate::helpers::{Admin, PURPOSE, repo, shared_catalog};
use frostglass::app::Sandbox;
use frostglass::config::Settings;
use frostglass::pipeline::gate::{Gated, gate};
use frostglass::pipeline::record::Trace;
use frostglass::pipeline::{self, Outcome, Request};
use frostglass::store::{NewGrant, Principal, Role};
use std::sync::Arc;

struct Harness {
    rt: tokio::runtime::Runtime,
    sandbox: Arc<Sandbox>,
    buyer: Principal,
    _data: tempfile::TempDir,
}

fn harness() -> Harness {
    harness_with(repo().join("policies"))
}

fn harness_with(policies_dir: std::path::PathBuf) -> Harness {
    let data = tempfile::tempdir().unwrap();
    let admin = Admin::open(data.path());
    let buyer = Principal {
        id: "buyer:gate".into(),
        role: Role::Buyer,
        org: Some("gate".into()),
        region: "CN".into(),
    };
    admin.add_principal(&buyer).unwrap();
    admin
        .add_grant(&NewGrant {
            buyer: buyer.id.clone(),
            datasets: [
                "city_health",
                "telecom_usage",
                "enterprise_registry",
                "power_grid",
            ]
            .map(String::from)
            .to_vec(),
            purpose: PURPOSE.into(),
            ..NewGrant::default()
        })
        .unwrap();
    let settings = Settings {
        catalog_dir: shared_catalog().to_path_buf(),
        policies_dir,
        data_dir: data.path().to_path_buf(),
        ..Settings::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sandbox = Arc::new(rt.block_on(Sandbox::open(settings)).unwrap());
    Harness {
        rt,
        sandbox,
        buyer,
        _data: data,
    }
}

fn request(sql: &str) -> Request {
    Request {
        sql: sql.into(),
        grant: None,
        purpose: None,
        dry_run: false,
        run_ahead: false,
        dp: Default::default(),
    }
}

impl Harness {
    fn gate(&self, sql: &str) -> Result<Gated, frostglass::error::Error> {
        let mut trace = Trace::default();
        self.rt
            .block_on(gate(&self.sandbox, &self.buyer, &request(sql), &mut trace))
    }
}

#[test]
fn the_gate_refuses_with_the_same_codes_and_rules_as_http() {
    // The very table the HTTP tests use (`policy.rs`): same codes, same rules.
    let h = harness();
    for (sql, code, rule) in crate::policy::REFUSED {
        let refused = match h.gate(sql) {
            Ok(_) => panic!("{sql}: let through"),
            Err(e) => e,
        };
        assert_eq!(refused.code(), *code, "{sql}: {refused}");
        if rule.is_some() {
            assert_eq!(refused.rule(), *rule, "{sql}: {refused}");
        }
    }
    for sql in crate::policy::ALLOWED {
        if let Err(e) = h.gate(sql) {
            panic!("{sql}: refused: {e}");
        }
    }
}

#[test]
fn the_gate_lets_allowed_queries_through_with_their_release_and_consent_filter() {
    let h = harness();
    let gated = h
        .gate("SELECT district, COUNT(*) FROM city_health GROUP BY district")
        .unwrap();
    assert_eq!(gated.grant.buyer, "buyer:gate");
    assert_eq!(gated.split.jobs.len(), 1);
    assert!(gated.consent_filters.contains("city_health"));
    assert_eq!(gated.scanned.len(), 1);
    // Spelling does not change the plan hash.
    let respelled = h
        .gate("select district,   count(*) from CITY_HEALTH group by district -- again")
        .unwrap();
    assert_eq!(gated.plan_sha256, respelled.plan_sha256);
    // Open data is released row by row: no release job.
    let open = h
        .gate("SELECT name FROM enterprise_registry LIMIT 3")
        .unwrap();
    assert!(open.split.jobs.is_empty());
}

#[test]
fn the_whole_pipeline_answers_without_http() {
    let h = harness();
    let sql = "SELECT district, COUNT(*) AS visits FROM city_health GROUP BY district";
    let run = |sql: &str| {
        h.rt.block_on(pipeline::run(
            h.sandbox.clone(),
            h.buyer.clone(),
            request(sql),
            std::future::pending(),
        ))
    };
    let Ok(Outcome::Answer(answer)) = run(sql) else {
        panic!("not answered");
    };
    assert!(answer.usage.epsilon > 0.0);
    assert_eq!(answer.receipt.ledger_index + 1, answer.receipt.tree_size);
    let refused = run("SELECT name FROM city_health").err().unwrap();
    assert_eq!(refused.rule(), Some("aggregation_required"));
    // Both are in the ledger, read back through the typed event.
    let entries = h.sandbox.ledger.entries(0, 1000).unwrap();
    let decisions: Vec<_> = entries
        .iter()
        .filter_map(|(_, body, _)| frostglass::ledger::event::Entry::decode(body).ok())
        .filter_map(|e| match e.event {
            frostglass::ledger::event::LedgerEvent::Query(q) => Some(q.decision),
            _ => None,
        })
        .collect();
    use frostglass::ledger::event::Decision;
    assert_eq!(decisions, vec![Decision::Answered, Decision::Refused]);
}

#[test]
fn a_level_that_requires_differential_privacy_refuses_exact_releases() {
    // The same policies, with important data (power_grid: threshold-only) under dp_required.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let levels = dir.path().join("levels.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&levels).unwrap()).unwrap();
    doc["important"]["dp_required"] = serde_json::json!(true);
    std::fs::write(&levels, doc.to_string()).unwrap();

    let strict = harness_with(dir.path().to_path_buf());
    let sql = "SELECT district, COUNT(*) FROM power_grid GROUP BY district";
    let refused = strict
        .gate(sql)
        .err()
        .expect("an exact release of important data");
    assert_eq!(refused.rule(), Some("dp_required"), "{refused}");
    // General data with a DP manifest is unaffected; and with the shipped
    // policies the same query passes.
    assert!(
        strict
            .gate("SELECT district, COUNT(*) FROM city_health GROUP BY district")
            .is_ok()
    );
    assert!(harness().gate(sql).is_ok());
}
