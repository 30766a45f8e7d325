//! The query pipeline, top to bottom:
//! parse → resolve the grant → plan in a session holding only the grant's
//! tables → policy check → split at the release aggregates → execute under
//! limits → threshold → run the rest on released values → meter → append the
//! usage entry durably → answer with a receipt.
//!
//! Refusals are recorded too; nothing is answered before its entry is on disk.

use crate::catalog::{Catalog, Dataset};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::ledger::sha256_hex;
use crate::ledger::{NewEntry, Receipt};
use crate::metering::{self, BudgetBook, Charge, DailyLimits, QuotaBook, Reservation, Usage};
use crate::policy::Policies;
use crate::policy::check::{self, Requester};
use crate::release::{self, JobKind};
use crate::startup::Sandbox;
use crate::store::DailyUse;
use crate::store::{Grant, Principal, Role, new_id, now_rfc3339};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DFStatement;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Json,
    Csv,
    Arrow,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QueryRequest {
    pub sql: String,
    #[serde(default)]
    pub grant: Option<String>,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(default)]
    pub dry_run: bool,
}

/// How a release was made, as the buyer sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseSummary {
    pub mechanism: String,
    pub min_group_size: Option<u64>,
    pub released_groups: u64,
    /// Not reported under differential privacy: the exact number of small
    /// groups is itself a fact about the data.
    pub suppressed_groups: Option<u64>,
    pub noise: Option<Value>,
}

/// An answered query: released values only.
pub struct Answer {
    pub query_id: String,
    pub grant: String,
    pub purpose: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: Vec<Vec<Value>>,
    pub release: ReleaseSummary,
    pub usage: Usage,
    /// The grant's privacy budget after this query.
    pub budget: Budget,
    pub receipt: Receipt,
}

/// Epsilon of a grant: its lifetime limit and what is left.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub epsilon_limit: f64,
    pub epsilon_spent: f64,
    pub epsilon_remaining: f64,
}

impl Budget {
    pub fn of(sandbox: &Sandbox, grant: &Grant) -> Result<Budget, ApiError> {
        let key = format!("grant:{}", grant.id);
        // Loaded from the ledger once, not per answer (that would read every
        // entry of the grant each time).
        let spent = sandbox
            .budgets
            .spent_or_load(&key, || sandbox.store.epsilon_spent(&key))?;
        let limit = grant
            .epsilon
            .unwrap_or(sandbox.settings.limits.default_grant_epsilon);
        Ok(Budget {
            epsilon_limit: limit,
            epsilon_spent: spent,
            epsilon_remaining: (limit - spent).max(0.0),
        })
    }
}

pub enum Outcome {
    Answer(Box<Answer>),
    DryRun(Value),
}

/// Facts gathered along the way, for the usage entry of a refusal as much as of an answer.
#[derive(Default)]
struct Trace {
    grant: Option<String>,
    purpose: Option<String>,
    datasets: BTreeSet<String>,
    /// Epsilon that stands even if the query now fails.
    epsilon_charged: f64,
    epsilon_by_dataset: BTreeMap<String, f64>,
}

struct Prepared {
    grant: Grant,
    session: SessionState,
    split: release::ReleasePlan,
    scanned: Vec<Arc<Dataset>>,
    reservation: Reservation,
    /// Datasets whose rows were narrowed to data subjects who consented to the purpose.
    consent_filters: BTreeSet<String>,
    /// Of the optimised plan: equal for queries that differ only in spelling.
    plan_sha256: String,
    /// Epsilon this query spends, in all and per dataset.
    epsilon: f64,
    epsilon_by_dataset: BTreeMap<String, f64>,
    /// Held until the query starts reading data; from then on it stands.
    charge: Option<Charge>,
    /// The answer released before to the same query under the same grant.
    cached: Option<(Vec<u8>, String)>,
}

struct Executed {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    release: ReleaseSummary,
    cpu_ns: u64,
}

/// Up to this many rows a query runs in one partition: splitting a small
/// scan across threads costs more in repartitioning and hand-offs than it
/// saves, and concurrent queries keep the cores busy anyway (HTTP load test:
/// 740 → 980 queries/s at scale 1).
const SMALL_SCAN_ROWS: u64 = 1_000_000;

/// Runs one query to its answer or refusal, both recorded. Cancelled when
/// it runs out of time or `client_gone` resolves (nobody waits for it).
pub async fn run(
    sandbox: Arc<Sandbox>,
    principal: Principal,
    request: QueryRequest,
    client_gone: impl Future<Output = ()> + Send,
) -> Result<Outcome, ApiError> {
    let started = Instant::now();
    let query_id = new_id("q");
    let mut trace = Trace::default();
    let timeout = Duration::from_millis(sandbox.settings.limits.query_timeout_ms);
    let answered =
        tokio::time::timeout(timeout, answer(&sandbox, &principal, &request, &mut trace));
    let result = tokio::select! {
        r = answered => r.unwrap_or_else(|_| Err(ApiError::ResourceLimit(format!(
            "the query ran longer than {} ms and was cancelled",
            timeout.as_millis()
        )))),
        () = client_gone => Err(ApiError::ClientClosed),
    };
    match result {
        Ok(Step::DryRun(outline)) => Ok(Outcome::DryRun(outline)),
        Ok(Step::Done(prepared, executed)) => {
            let answer = finish(
                &sandbox, &principal, &request, query_id, started, prepared, executed,
            )
            .await?;
            Ok(Outcome::Answer(Box::new(answer)))
        }
        Err(e) => {
            record_refusal(
                &sandbox, &principal, &request, &query_id, &trace, started, &e,
            )
            .await?;
            Err(e)
        }
    }
}

enum Step {
    DryRun(Value),
    Done(Box<Prepared>, Executed),
}

async fn answer(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &QueryRequest,
    trace: &mut Trace,
) -> Result<Step, ApiError> {
    if principal.role != Role::Buyer {
        return Err(ApiError::Forbidden("only buyers run queries".into()));
    }
    sandbox.policies.check_principal(&principal.id)?;
    let mut prepared = prepare(sandbox, principal, request, trace).await?;
    if request.dry_run {
        return Ok(Step::DryRun(outline(&prepared)));
    }
    if let Some((answer, release)) = &prepared.cached {
        let executed = from_cache(answer, release)?;
        return Ok(Step::Done(Box::new(prepared), executed));
    }
    if let Some(charge) = prepared.charge.as_mut() {
        charge.commit();
        trace.epsilon_charged = prepared.epsilon;
        trace.epsilon_by_dataset = prepared.epsilon_by_dataset.clone();
    }
    // A bounded wait: under overload, answer 503 quickly rather than pile up.
    let wait = Duration::from_millis(sandbox.settings.limits.queue_wait_ms);
    let _slot = tokio::time::timeout(wait, sandbox.query_slots.acquire())
        .await
        .map_err(|_| ApiError::Overloaded)?
        .map_err(|_| ApiError::Internal("query slots closed".into()))?;
    let executed = execute(sandbox, &prepared).await?;
    Ok(Step::Done(Box::new(prepared), executed))
}

async fn prepare(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &QueryRequest,
    trace: &mut Trace,
) -> Result<Prepared, ApiError> {
    let engine = &sandbox.engine;
    let statement = engine.parse(&request.sql)?;
    let mut named = Vec::new();
    for reference in engine.table_references(&statement)? {
        let name = reference.table();
        let dataset = sandbox
            .catalog
            .get(name)
            .ok_or_else(|| ApiError::UnknownTable(name.to_string()))?;
        check::level_access(&sandbox.policies, dataset)?;
        trace.datasets.insert(dataset.id().to_string());
        named.push(dataset.clone());
    }
    let grant = choose_grant(sandbox, principal, request, &named)?;
    trace.grant = Some(grant.id.clone());
    trace.purpose = Some(grant.purpose.clone());
    sandbox.policies.check_purpose(&grant.purpose)?;
    let tables: Vec<Arc<Dataset>> = grant
        .datasets
        .iter()
        .filter_map(|d| sandbox.catalog.get(d).cloned())
        .collect();
    let requester = Requester {
        region: &principal.region,
        cross_border_assessment: grant.cross_border_assessment.is_some(),
    };
    let (mut session, plan) = checked_plan(
        engine,
        &tables,
        statement,
        &sandbox.catalog,
        &sandbox.policies,
        &requester,
    )
    .await?;
    let scanned = scanned_datasets(sandbox, &plan);
    let rows: u64 = scanned.iter().map(|d| d.num_rows).sum();
    let cap = sandbox.settings.limits.max_rows_scanned;
    if rows > cap {
        return Err(ApiError::ResourceLimit(format!(
            "the query would scan {rows} rows; at most {cap} are allowed"
        )));
    }
    if rows <= SMALL_SCAN_ROWS {
        session
            .config_mut()
            .options_mut()
            .execution
            .target_partitions = 1;
    }
    // The planned (not optimised) plan: names resolved, so case, whitespace
    // and comments do not change it. An optimiser pass only for the hash
    // cost more than the whole policy check.
    let plan_sha256 = sha256_hex(plan.display_indent().to_string().as_bytes());
    let (plan, consent_filters) = release::filter_consent(plan, &sandbox.catalog, &grant.purpose)?;
    let split = release::split(
        &plan,
        &sandbox.catalog,
        &sandbox.policies,
        sandbox.settings.unit_summaries,
    )?;
    let reservation = reserve_quota(sandbox, &grant, &scanned)?;
    let (epsilon, epsilon_by_dataset) = epsilon_of(sandbox, &split);
    let cached = if epsilon > 0.0 {
        sandbox.store.cached_answer(&grant.id, &plan_sha256)?
    } else {
        None
    };
    let charge = match (&cached, epsilon > 0.0) {
        (None, true) => Some(reserve_budget(
            sandbox,
            &grant,
            &epsilon_by_dataset,
            epsilon,
        )?),
        _ => None,
    };
    Ok(Prepared {
        epsilon,
        epsilon_by_dataset,
        charge,
        cached,
        plan_sha256,
        consent_filters,
        grant,
        session,
        split,
        scanned,
        reservation,
    })
}

/// The gate of every buyer query, before anything reads data: planned in a
/// session that holds `tables` and nothing else, one SELECT, and within the
/// policies. Returns the session too, for running the plan.
pub async fn checked_plan(
    engine: &Engine,
    tables: &[Arc<Dataset>],
    statement: DFStatement,
    catalog: &Catalog,
    policies: &Policies,
    requester: &Requester<'_>,
) -> Result<(SessionState, LogicalPlan), ApiError> {
    let session = engine.session(tables)?;
    let plan = engine.plan(&session, statement).await?;
    only_select(&plan)?;
    check::check(&plan, catalog, policies, requester)?;
    Ok((session, plan))
}

/// Refuses DDL, DML and statements (SET, transactions and the like).
pub fn only_select(plan: &LogicalPlan) -> Result<(), ApiError> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|_| ApiError::StatementNotAllowed("only a single SELECT query is allowed".into()))
}

/// What the release jobs spend: the grant pays their sum, each dataset the
/// jobs that read it.
fn epsilon_of(sandbox: &Sandbox, split: &release::ReleasePlan) -> (f64, BTreeMap<String, f64>) {
    let mut by_dataset = BTreeMap::new();
    let mut total = 0.0;
    for job in &split.jobs {
        let eps = job.epsilon();
        if eps <= 0.0 {
            continue;
        }
        total += eps;
        for d in &job.datasets {
            if sandbox
                .catalog
                .get(d)
                .is_some_and(|d| d.manifest.release.dp.is_some())
            {
                *by_dataset.entry(d.clone()).or_insert(0.0) += eps;
            }
        }
    }
    (total, by_dataset)
}

/// Reserves the query's epsilon from the grant's budget and from each
/// dataset's budget shared by all buyers, all or nothing.
fn reserve_budget(
    sandbox: &Sandbox,
    grant: &Grant,
    by_dataset: &BTreeMap<String, f64>,
    epsilon: f64,
) -> Result<Charge, ApiError> {
    let limits = &sandbox.settings.limits;
    let mut items = vec![(
        format!("grant:{}", grant.id),
        grant.epsilon.unwrap_or(limits.default_grant_epsilon),
        epsilon,
    )];
    for (d, eps) in by_dataset {
        let total = sandbox
            .catalog
            .get(d)
            .and_then(|d| d.manifest.release.dp.as_ref())
            .and_then(|dp| dp.epsilon_total)
            .unwrap_or(limits.default_dataset_epsilon);
        items.push((format!("dataset:{d}"), total, *eps));
    }
    match BudgetBook::reserve(&sandbox.budgets, &items, |key| {
        sandbox.store.epsilon_spent(key)
    })? {
        Ok(charge) => Ok(charge),
        Err(over) => Err(ApiError::BudgetExhausted(format!(
            "the privacy budget of {} is spent: {} of {} epsilon left, this query needs {epsilon}",
            over.budget, over.remaining, over.limit
        ))),
    }
}

/// Rebuilds an answer released before.
fn from_cache(answer: &[u8], release: &str) -> Result<Executed, ApiError> {
    let internal = |e: String| ApiError::Internal(format!("cached answer unreadable: {e}"));
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(
        std::io::Cursor::new(answer.to_vec()),
        None,
    )
    .map_err(|e| internal(e.to_string()))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| internal(e.to_string()))?;
    let release: ReleaseSummary =
        serde_json::from_str(release).map_err(|e| internal(e.to_string()))?;
    Ok(Executed {
        schema,
        batches,
        release,
        cpu_ns: 0,
    })
}

/// Holds today's quota for this query: one query and the rows and bytes it
/// is metered for (known before it runs, since metering is by whole table).
fn reserve_quota(
    sandbox: &Sandbox,
    grant: &Grant,
    scanned: &[Arc<Dataset>],
) -> Result<Reservation, ApiError> {
    let amount = DailyUse {
        queries: 1,
        rows: scanned.iter().map(|d| d.num_rows).sum(),
        bytes: scanned.iter().map(|d| d.num_bytes).sum(),
    };
    let limits = DailyLimits {
        queries: grant.queries_per_day,
        rows: grant.rows_per_day,
        bytes: grant.bytes_per_day,
    };
    match QuotaBook::reserve(&sandbox.quotas, &grant.id, limits, amount, || {
        sandbox.store.used_today(&grant.id)
    })? {
        Ok(reservation) => Ok(reservation),
        Err(over) => Err(ApiError::QuotaExceeded(format!(
            "this query would exceed the grant's {} quota of {}",
            over.quota, over.limit
        ))),
    }
}

/// The buyer's active grant that covers every named table (and the requested grant or purpose, if any).
fn choose_grant(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &QueryRequest,
    named: &[Arc<Dataset>],
) -> Result<Grant, ApiError> {
    let now = now_rfc3339();
    let grants = match request.grant.as_deref() {
        Some(id) => Vec::from_iter(sandbox.store.grant_of(&principal.id, id)?),
        None => sandbox.store.grants_of(&principal.id)?,
    };
    let candidates: Vec<&Grant> = grants
        .iter()
        .filter(|g| g.is_active(&now))
        .filter(|g| request.grant.as_deref().is_none_or(|id| id == g.id))
        .filter(|g| request.purpose.as_deref().is_none_or(|p| p == g.purpose))
        .collect();
    if let Some(g) = candidates
        .iter()
        .find(|g| named.iter().all(|d| g.covers(d.id())))
    {
        return Ok((*g).clone());
    }
    let uncovered: Vec<&str> = named
        .iter()
        .map(|d| d.id())
        .filter(|d| !candidates.iter().any(|g| g.covers(d)))
        .collect();
    let message = match (request.grant.as_deref(), uncovered.is_empty()) {
        (Some(id), _) if candidates.is_empty() => {
            format!("grant '{id}' is not an active grant of yours for this purpose")
        }
        (_, false) => format!("no active grant covers: {}", uncovered.join(", ")),
        (_, true) => "no single active grant covers all tables of the query".to_string(),
    };
    Err(ApiError::NoGrant(message))
}

/// Every dataset scan in the plan, once per scan (a self-join reads twice).
fn scanned_datasets(sandbox: &Sandbox, plan: &LogicalPlan) -> Vec<Arc<Dataset>> {
    let mut out = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(d) = sandbox.catalog.get(scan.table_name.table())
        {
            out.push(d.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

fn outline(p: &Prepared) -> Value {
    let releases: Vec<Value> = p
        .split
        .jobs
        .iter()
        .map(|j| {
            let mechanism = match &j.kind {
                JobKind::Threshold { counts_rows: true } => json!({ "threshold": j.min_group_size, "counts": "rows" }),
                JobKind::Threshold { counts_rows: false } => {
                    json!({ "threshold": j.min_group_size, "counts": "distinct_privacy_units" })
                }
                JobKind::Dp(dp) => json!({
                    "differential_privacy": dp.params,
                    "selection_threshold": dp.selection_threshold(),
                }),
            };
            json!({ "datasets": j.datasets, "min_group_size": j.min_group_size, "mechanism": mechanism, "epsilon": j.epsilon() })
        })
        .collect();
    let usage = estimate(p);
    json!({
        "decision": "allowed",
        "grant": p.grant.id,
        "purpose": p.grant.purpose,
        "consent_filters": p.consent_filters.iter().map(|d| json!({
            "dataset": d,
            "rule": format!("only rows whose data subject consented to '{}'", p.grant.purpose),
        })).collect::<Vec<_>>(),
        "releases": releases,
        "estimated_usage": usage,
    })
}

/// Rows and bytes a query is metered for: whole tables per scan, from the
/// catalog, so the figures never depend on what a filter matched.
fn estimate(p: &Prepared) -> Usage {
    let rows_scanned = p.scanned.iter().map(|d| d.num_rows).sum();
    let bytes_scanned = p.scanned.iter().map(|d| d.num_bytes).sum();
    let mut charge = 0i128;
    let mut currency = None;
    for d in &p.scanned {
        if let Some(pricing) = &d.manifest.pricing {
            charge += metering::price(
                &pricing.per_query,
                &pricing.per_million_rows_scanned,
                d.num_rows,
            )
            .unwrap_or(0);
            currency.get_or_insert_with(|| pricing.currency.clone());
        }
    }
    Usage {
        rows_scanned,
        bytes_scanned,
        charge: metering::format_money(charge),
        currency,
        ..Usage::default()
    }
}

async fn execute(sandbox: &Sandbox, p: &Prepared) -> Result<Executed, ApiError> {
    let engine = &sandbox.engine;
    let limits = &sandbox.settings.limits;
    let mut cpu = 0u64;
    let mut filled = Vec::new();
    let (mut released_groups, mut suppressed_groups) = (0u64, Some(0u64));
    let mut min_group_size: Option<u64> = None;
    let mut noise = Vec::new();
    for job in &p.split.jobs {
        // Groups before release only bound memory; the owner's max_groups
        // applies to what is released (a count the answer shows anyway).
        let candidates = limits.max_result_rows.saturating_mul(100);
        let (batches, physical) = engine.execute(&p.session, &job.plan, candidates).await?;
        cpu += crate::engine::cpu_ns(&physical);
        let batches = match &job.kind {
            JobKind::Threshold { .. } => {
                let released = release::threshold(batches, job.min_group_size, &job.schema)?;
                released_groups += released.released_groups;
                suppressed_groups = suppressed_groups.map(|s| s + released.suppressed_groups);
                released.batches
            }
            JobKind::Dp(dp_job) => {
                let exact = release::dp::Exact::new(batches);
                let (released, count) =
                    release::dp::release(exact, dp_job, &job.schema, &sandbox.noise)?;
                released_groups += count;
                suppressed_groups = None;
                noise.push(serde_json::to_value(dp_job.report(&job.schema)).unwrap_or_default());
                released
            }
        };
        let released_rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if let Some(max) = job.max_groups
            && released_rows as u64 > max
        {
            return Err(ApiError::ResourceLimit(format!(
                "the release has more than the {max} groups its dataset allows"
            )));
        }
        let batches = release::in_key_order(batches, job.groups, &job.schema)?;
        min_group_size =
            Some(min_group_size.map_or(job.min_group_size, |m| m.max(job.min_group_size)));
        let table = MemTable::try_new(job.schema.clone(), vec![batches])
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        filled.push((job.slot.clone(), Arc::new(table)));
    }
    let upper = release::fill(p.split.upper.clone(), filled)?;
    let (batches, physical) = engine
        .execute(&p.session, &upper, limits.max_result_rows)
        .await?;
    cpu += crate::engine::cpu_ns(&physical);
    let mechanism = match (p.split.jobs.is_empty(), noise.is_empty()) {
        (true, _) => "none",
        (false, true) => "threshold",
        (false, false) => "differential_privacy",
    };
    let release = ReleaseSummary {
        mechanism: mechanism.to_string(),
        min_group_size,
        released_groups,
        suppressed_groups,
        noise: match noise.len() {
            0 => None,
            1 => noise.pop(),
            _ => Some(Value::Array(noise)),
        },
    };
    Ok(Executed {
        schema: physical.schema(),
        batches,
        release,
        cpu_ns: cpu,
    })
}

async fn finish(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &QueryRequest,
    query_id: String,
    started: Instant,
    p: Box<Prepared>,
    e: Executed,
) -> Result<Answer, ApiError> {
    let rows = crate::api::format::json_rows(&e.batches)?;
    let mut usage = estimate(&p);
    usage.cpu_ms = e.cpu_ns / 1_000_000;
    usage.wall_ms = started.elapsed().as_millis() as u64;
    usage.groups_released = e.release.released_groups;
    usage.groups_suppressed = e.release.suppressed_groups;
    let cached = p.cached.is_some();
    let (epsilon, by_dataset) = if cached {
        (0.0, BTreeMap::new())
    } else {
        (p.epsilon, p.epsilon_by_dataset.clone())
    };
    usage.epsilon = epsilon;
    usage.cells_released = rows.len() as u64 * e.schema.fields().len() as u64;
    let result_sha256 = sha256_hex(serde_json::to_string(&rows).unwrap_or_default().as_bytes());
    let datasets: BTreeSet<&str> = p.scanned.iter().map(|d| d.id()).collect();
    let body = entry(
        &query_id,
        principal,
        Some(&p.grant.id),
        Some(&p.grant.purpose),
        &datasets,
        request,
        json!({
            "plan_sha256": p.plan_sha256,
            "decision": "answered",
            "cached": cached,
            "release": e.release,
            "usage": usage,
            "epsilon_charged": epsilon,
            "epsilon_by_dataset": by_dataset,
            "result_sha256": result_sha256,
        }),
    );
    let appended = append(
        sandbox,
        principal,
        Some(&p.grant.id),
        "answered",
        body,
        &request.sql,
    )
    .await?;
    if epsilon > 0.0 {
        // Asking again returns this answer, not fresh noise to average away.
        let ipc = crate::api::format::arrow_stream(&e.schema, &e.batches)?;
        let release = serde_json::to_string(&e.release).unwrap_or_default();
        sandbox
            .store
            .cache_answer(&p.grant.id, &p.plan_sha256, &ipc, &release)?;
    }
    let Prepared {
        grant, reservation, ..
    } = *p;
    reservation.commit();
    let budget = Budget::of(sandbox, &grant)?;
    Ok(Answer {
        budget,
        query_id,
        grant: grant.id,
        purpose: grant.purpose,
        schema: e.schema,
        batches: e.batches,
        rows,
        release: e.release,
        usage,
        receipt: appended,
    })
}

/// A query's ledger entry: who asked what (the SQL only as a hash), then `outcome`'s fields.
fn entry<D: Serialize>(
    query_id: &str,
    principal: &Principal,
    grant: Option<&str>,
    purpose: Option<&str>,
    datasets: &D,
    request: &QueryRequest,
    outcome: Value,
) -> Value {
    let mut body = json!({
        "v": 1,
        "kind": "query",
        "query_id": query_id,
        "at": now_rfc3339(),
        "principal": principal.id,
        "grant": grant,
        "purpose": purpose,
        "datasets": datasets,
        "sql_sha256": sha256_hex(request.sql.as_bytes()),
    });
    if let (Some(body), Value::Object(fields)) = (body.as_object_mut(), outcome) {
        body.extend(fields);
    }
    body
}

async fn record_refusal(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &QueryRequest,
    query_id: &str,
    trace: &Trace,
    started: Instant,
    error: &ApiError,
) -> Result<(), ApiError> {
    let body = entry(
        query_id,
        principal,
        trace.grant.as_deref(),
        trace.purpose.as_deref(),
        &trace.datasets,
        request,
        json!({
            "decision": "refused",
            "code": error.code(),
            "rule": error.rule(),
            "wall_ms": started.elapsed().as_millis() as u64,
            "epsilon_charged": trace.epsilon_charged,
            "epsilon_by_dataset": trace.epsilon_by_dataset,
        }),
    );
    append(
        sandbox,
        principal,
        trace.grant.as_deref(),
        "refused",
        body,
        &request.sql,
    )
    .await
    .map(|_| ())
}

async fn append(
    sandbox: &Sandbox,
    principal: &Principal,
    grant: Option<&str>,
    decision: &'static str,
    body: Value,
    sql: &str,
) -> Result<Receipt, ApiError> {
    let entry = NewEntry {
        kind: "query",
        principal: Some(principal.id.clone()),
        grant: grant.map(str::to_string),
        decision,
        body: body.to_string(),
        sql: Some(sql.to_string()),
    };
    sandbox
        .ledger
        .append(entry)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
}
