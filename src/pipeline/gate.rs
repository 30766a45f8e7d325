//! The gate: everything a query passes before any data is read, in named
//! stages. Every front door, the fuzz targets and the tests go through
//! [`gate`] (or, without a grant, [`checked_plan`]).
//!
//! parse → resolve tables (catalog, data level) → choose the grant → plan in
//! a session holding only the grant's tables → one SELECT → policy →
//! consent filter → split at the release aggregates.

use super::Request;
use super::grant;
use super::record::Trace;
use crate::app::Sandbox;
use crate::catalog::{Catalog, Dataset};
use crate::engine::{self, Engine};
use crate::error::Error;
use crate::policy::Policies;
use crate::policy::access;
use crate::policy::check::{self, Requester};
use crate::release::{self, ReleasePlan};
use crate::store::{Grant, Principal};
use crate::util::sha256_hex;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DFStatement;
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

/// A query the gate let through: checked, rewritten and split, not yet run.
pub struct Gated {
    pub grant: Grant,
    /// Whether the grant was approved on condition that its owners review
    /// every answer: fixed when the grant is made, so read once per decision.
    pub grant_reviewed: bool,
    /// The catalog as the query found it: it runs on these versions to the end.
    pub catalog: Arc<Catalog>,
    pub session: SessionState,
    pub split: ReleasePlan,
    /// Every dataset scan of the plan, once per scan (a self-join reads twice).
    pub scanned: Vec<Arc<Dataset>>,
    /// Datasets whose rows were narrowed to data subjects who consented to the purpose.
    pub consent_filters: BTreeSet<String>,
    /// Of the planned query: equal for queries that differ only in spelling.
    pub plan_sha256: String,
    /// The split's plans through the optimiser, worked out on the first run
    /// and kept with the decision for the next.
    optimized: OnceLock<Optimized>,
}

/// The split's upper plan and each release job's plan, optimised.
pub struct Optimized {
    pub upper: engine::Optimized,
    pub jobs: Vec<engine::Optimized>,
}

impl Gated {
    /// The split's plans, optimised in this decision's session (after
    /// admission has set its partitions) on the first call.
    pub fn optimized(&self, engine: &Engine) -> Result<&Optimized, Error> {
        if let Some(done) = self.optimized.get() {
            return Ok(done);
        }
        let jobs = self
            .split
            .jobs
            .iter()
            .map(|job| engine.optimize(&self.session, &job.plan))
            .collect::<Result<_, _>>()?;
        let upper = engine.optimize(&self.session, &self.split.upper)?;
        Ok(self.optimized.get_or_init(|| Optimized { upper, jobs }))
    }
}

/// Runs every stage of the gate; `trace` collects what the ledger entry of
/// a refusal needs (datasets, grant, purpose) as the stages learn it.
pub async fn gate(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &Request,
    trace: &mut Trace,
) -> Result<Gated, Error> {
    let engine = &sandbox.engine;
    let catalog = sandbox.catalog.current();
    let statement = engine.parse(&request.sql)?;
    let named = resolve_tables(sandbox, &catalog, &statement, trace)?;
    let grant = grant::choose(sandbox, principal, request, &named)?;
    trace.grant = Some(grant.id.clone());
    trace.purpose = Some(grant.purpose.clone());
    sandbox.policies.check_purpose(&grant.purpose)?;
    let tables: Vec<Arc<Dataset>> = grant
        .datasets
        .iter()
        .filter_map(|d| catalog.get(d).cloned())
        .collect();
    let requester = Requester {
        region: &principal.region,
        cross_border_assessment: grant.cross_border_assessment.is_some(),
    };
    let (session, plan) = checked_plan(
        engine,
        &tables,
        statement,
        &catalog,
        &sandbox.policies,
        &requester,
    )
    .await?;
    let scanned = scanned_datasets(&catalog, &plan);
    // The planned (not optimised) plan: names resolved, so case, whitespace
    // and comments do not change it. An optimiser pass only for the hash
    // cost more than the whole policy check.
    // The buyer's DP tightening changes the answer, so it is part of the key.
    let plan_sha256 = sha256_hex(format!("{}\n{:?}", plan.display_indent(), request.dp).as_bytes());
    let (plan, consent_filters) = release::filter_consent(plan, &catalog, &grant.purpose)?;
    let split = release::split(
        &plan,
        &catalog,
        &sandbox.policies,
        sandbox.settings.unit_summaries,
        &request.dp,
    )?;
    let grant_reviewed = sandbox.store.grant_requires_review(&grant.id)?;
    Ok(Gated {
        grant,
        grant_reviewed,
        catalog,
        session,
        split,
        scanned,
        consent_filters,
        plan_sha256,
        optimized: OnceLock::new(),
    })
}

/// Stage: every table the SQL names is a catalog dataset whose data level
/// lets external buyers query it.
fn resolve_tables(
    sandbox: &Sandbox,
    catalog: &Catalog,
    statement: &DFStatement,
    trace: &mut Trace,
) -> Result<Vec<Arc<Dataset>>, Error> {
    let mut named = Vec::new();
    for reference in sandbox.engine.table_references(statement)? {
        let name = reference.table();
        let dataset = catalog
            .get(name)
            .ok_or_else(|| Error::UnknownTable(name.to_string()))?;
        access::level_access(&sandbox.policies, dataset)?;
        trace.datasets.insert(dataset.id().to_string());
        named.push(dataset.clone());
    }
    Ok(named)
}

/// Stages plan, one SELECT and policy: planned in a session that holds
/// `tables` and nothing else, and within the policies. Returns the session
/// too, for running the plan.
pub async fn checked_plan(
    engine: &Engine,
    tables: &[Arc<Dataset>],
    statement: DFStatement,
    catalog: &Catalog,
    policies: &Policies,
    requester: &Requester<'_>,
) -> Result<(SessionState, LogicalPlan), Error> {
    let session = engine.session(tables)?;
    let plan = engine.plan(&session, statement).await?;
    only_select(&plan)?;
    check::check(&plan, catalog, policies, requester)?;
    Ok((session, plan))
}

/// Refuses DDL, DML and statements (SET, transactions and the like).
pub fn only_select(plan: &LogicalPlan) -> Result<(), Error> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|_| Error::StatementNotAllowed("only a single SELECT query is allowed".into()))
}

/// Every dataset scan in the plan, once per scan (a self-join reads twice).
fn scanned_datasets(catalog: &Catalog, plan: &LogicalPlan) -> Vec<Arc<Dataset>> {
    let mut out = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(d) = catalog.get(scan.table_name.table())
        {
            out.push(d.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}
