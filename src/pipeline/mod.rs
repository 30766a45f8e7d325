//! The query pipeline, top to bottom:
//! gate (parse → tables → grant → plan in a session holding only the
//! grant's tables → one SELECT → policy → consent → split at the release
//! aggregates) → reserve quota and budget → execute under limits → release
//! (threshold or noise) → run the rest on released values → meter → append
//! the usage entry durably → answer with a receipt.
//!
//! Refusals are recorded too; nothing is answered before its entry is on
//! disk. The pipeline knows no transport: its request, answer and error
//! types are its own, and each front door maps them to its wire.

pub mod cache;
pub mod charge;
pub mod gate;
pub mod grant;
pub mod outline;
pub mod plans;
pub mod record;

use crate::accounting::{Charge, Reservation, Usage};
use crate::app::Sandbox;
use crate::app::slots::Slot;
use crate::error::Error;
use crate::ledger::Receipt;
use crate::ledger::event::Decision;
use crate::release::{self, JobKind};
use crate::store::{Principal, ReleasedAnswer, Role};
use crate::util::{new_id, sha256_hex};
use charge::Budget;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use gate::Gated;
use record::Trace;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// What a buyer asks, whatever door it came through.
#[derive(Debug, Clone)]
pub struct Request {
    pub sql: String,
    /// The grant to run under; else the oldest active grant that covers the tables.
    pub grant: Option<String>,
    pub purpose: Option<String>,
    /// Decide and outline without releasing anything.
    pub dry_run: bool,
    /// On a dry run, begin executing at once when the sandbox is idle, so
    /// that running the decision later finds its answer under way (Flight
    /// SQL's `GetFlightInfo`, whose `DoGet` follows a round trip later).
    /// Nothing of it is observable before that run.
    pub run_ahead: bool,
    /// The buyer's tightening of DP releases.
    pub dp: release::dp::Tightening,
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
    /// Whether a release read the unit summaries taken at registration
    /// instead of the rows (same answer; a fact about the plan, not the data).
    #[serde(default)]
    pub summary_used: bool,
    /// How many release jobs a Ballista cluster ran (absent: all ran in
    /// the sandbox); a fact about the deployment, not the data.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cluster_jobs: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An answered query: released values only.
pub struct Answer {
    pub query_id: String,
    pub grant: String,
    pub purpose: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub release: ReleaseSummary,
    pub usage: Usage,
    /// The grant's privacy budget after this query.
    pub budget: Budget,
    pub receipt: Receipt,
    /// Owners who review answers of the datasets it read (`release.review`).
    pub review_owners: Vec<String>,
    /// The rows as JSON: the bytes the ledger's digest was taken over.
    rows_json: Vec<u8>,
}

impl Answer {
    /// The answer as JSON, as the buyer receives it.
    pub fn document(&self) -> Document<'_> {
        Document {
            before_rows: self.before_rows(),
            rows: release::encode::JsonRows(&self.batches),
            usage_after: AfterRows { usage: &self.usage },
        }
    }

    /// [`Answer::document`] serialised, as HTTP sends it: the same bytes,
    /// but its rows are the ones already written for the ledger's digest,
    /// not written a second time (a 5,000-row body took 1.24 ms to write,
    /// now 0.12 ms).
    pub fn body(&self) -> Result<Vec<u8>, Error> {
        let json = |e: serde_json::Error| Error::Internal(e.to_string());
        let mut body = Vec::with_capacity(self.rows_json.len() + 1024);
        serde_json::to_writer(&mut body, &self.before_rows()).map_err(json)?;
        // `{"budget":…,"release":…}` and `{"usage":…}` joined around the
        // rows, as the keys come in name order.
        body.pop();
        body.extend_from_slice(b",\"rows\":");
        body.extend_from_slice(&self.rows_json);
        body.push(b',');
        let usage = serde_json::to_vec(&AfterRows { usage: &self.usage }).map_err(json)?;
        body.extend_from_slice(&usage[1..]);
        Ok(body)
    }

    fn before_rows(&self) -> BeforeRows<'_> {
        BeforeRows {
            budget: &self.budget,
            columns: release::encode::columns(&self.schema),
            grant: &self.grant,
            purpose: &self.purpose,
            query_id: &self.query_id,
            receipt: &self.receipt,
            release: &self.release,
        }
    }
}

/// [`Answer::document`]: its rows written straight from the released
/// batches. Fields in name order, as a JSON object's keys always were.
#[derive(Serialize)]
pub struct Document<'a> {
    #[serde(flatten)]
    before_rows: BeforeRows<'a>,
    rows: release::encode::JsonRows<'a>,
    #[serde(flatten)]
    usage_after: AfterRows<'a>,
}

/// The answer's fields whose names sort before `rows`.
#[derive(Serialize)]
struct BeforeRows<'a> {
    budget: &'a Budget,
    columns: Value,
    grant: &'a str,
    purpose: &'a str,
    query_id: &'a str,
    receipt: &'a Receipt,
    release: &'a ReleaseSummary,
}

/// The answer's fields whose names sort after `rows`.
#[derive(Serialize)]
struct AfterRows<'a> {
    usage: &'a Usage,
}

/// A dry run's decision: its outline, and what a later run of the same
/// request takes up again while it still holds (see `still_holds`).
pub struct Decided {
    pub outline: outline::Outline,
    gated: Arc<Gated>,
    /// Its execution, begun ahead when the request asked for it.
    ahead: Option<Ahead>,
}

/// An execution begun before its run took it up. Unclaimed for
/// [`AHEAD_PATIENCE`] it gives up (and its slot): work nobody asks for
/// stays short, and a run that comes later executes anew. Dropped (its
/// ticket expired, or the decision no longer holds), it stops. It holds no
/// quota or budget: the run reserves them as any other, and if they are
/// spent by then, refuses and drops it.
struct Ahead {
    task: Stopping<Option<Result<Executed, Error>>>,
    /// [`RUNNING`], then [`CLAIMED`] by the run or [`GAVE_UP`] by the task.
    state: Arc<AtomicU8>,
}

/// How long an execution begun ahead waits to be claimed. Drivers redeem
/// a ticket at once; a client that waits longer gets a fresh execution.
const AHEAD_PATIENCE: Duration = Duration::from_secs(3);
const RUNNING: u8 = 0;
const CLAIMED: u8 = 1;
const GAVE_UP: u8 = 2;

impl Ahead {
    /// Its result, unless it gave up first. Claiming it means data was
    /// read for this run: `on_claim` commits the charge before the wait.
    async fn claim(mut self, on_claim: impl FnOnce()) -> Result<Option<Executed>, Error> {
        let claimed =
            self.state
                .compare_exchange(RUNNING, CLAIMED, Ordering::AcqRel, Ordering::Acquire);
        if claimed.is_err() {
            return Ok(None);
        }
        on_claim();
        match (&mut self.task).await? {
            Some(result) => result.map(Some),
            None => Err(Error::Internal("a claimed execution gave up".into())),
        }
    }
}

/// Whether an earlier decision of the gate still holds: the very catalog
/// snapshot it was made on, and its grant unchanged and still active. Any
/// change and the statement goes through the gate anew. If it holds, `trace` learns what
/// the gate would have told it.
fn still_holds(
    sandbox: &Sandbox,
    principal: &Principal,
    gated: &Gated,
    trace: &mut Trace,
) -> Result<bool, Error> {
    if !Arc::ptr_eq(&gated.catalog, &sandbox.catalog.current()) {
        return Ok(false);
    }
    let now = crate::util::now_rfc3339();
    let active = sandbox
        .store
        .grant_of(&principal.id, &gated.grant.id)?
        .is_some_and(|current| current == gated.grant && current.is_active(&now));
    if active {
        trace.grant = Some(gated.grant.id.clone());
        trace.purpose = Some(gated.grant.purpose.clone());
        trace
            .datasets
            .extend(gated.scanned.iter().map(|d| d.id().to_string()));
    }
    Ok(active)
}

pub enum Outcome {
    Answer(Box<Answer>),
    DryRun(Box<Decided>),
    /// Released and recorded, but held for its owners' review (`app::review`).
    Held(String),
}

/// A gated query with its quota and budget held.
struct Prepared {
    gated: Arc<Gated>,
    /// Who shares released answers with this query (see `cache::scope`).
    cache_scope: String,
    reservation: Reservation,
    /// Epsilon this query spends, in all and per dataset.
    epsilon: f64,
    epsilon_by_dataset: BTreeMap<String, f64>,
    /// Held until the query starts reading data; from then on it stands.
    charge: Option<Charge>,
    /// The answer released before to the same query in the same scope.
    cached: Option<(Vec<u8>, String)>,
}

/// Released values, copied out of the engine's buffers, with the digest
/// the ledger records of them (of their JSON rows).
pub struct Executed {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    result_sha256: String,
    /// The rows as JSON, which `result_sha256` is the digest of.
    rows_json: Vec<u8>,
    release: ReleaseSummary,
    cpu_ns: u64,
}

impl Executed {
    pub fn new(
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        release: ReleaseSummary,
        cpu_ns: u64,
    ) -> Result<Executed, Error> {
        let batches = release::encode::rematerialize(batches)?;
        let rows = serde_json::to_vec(&release::encode::JsonRows(&batches))
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Executed {
            schema,
            batches,
            result_sha256: sha256_hex(&rows),
            rows_json: rows,
            release,
            cpu_ns,
        })
    }
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
    request: Request,
    client_gone: impl Future<Output = ()> + Send,
) -> Result<Outcome, Error> {
    run_decided(sandbox, principal, request, None, client_gone).await
}

/// [`run`], with an earlier dry run's decision on the same request, taken
/// up again if nothing it rests on changed.
pub async fn run_decided(
    sandbox: Arc<Sandbox>,
    principal: Principal,
    request: Request,
    decided: Option<Box<Decided>>,
    client_gone: impl Future<Output = ()> + Send,
) -> Result<Outcome, Error> {
    let started = Instant::now();
    let query_id = new_id("q");
    let mut trace = Trace::default();
    let timeout = Duration::from_millis(sandbox.settings.limits.query_timeout_ms);
    let answered = tokio::time::timeout(
        timeout,
        answer(&sandbox, &principal, &request, decided, &mut trace),
    );
    let result = tokio::select! {
        r = answered => r.unwrap_or_else(|_| Err(ran_too_long(timeout))),
        () = client_gone => Err(Error::ClientClosed),
    };
    match result {
        Ok(Step::DryRun(decided)) => Ok(Outcome::DryRun(decided)),
        Ok(Step::Done(prepared, executed)) => {
            let answer = finish(
                &sandbox, &principal, &request, query_id, started, prepared, executed,
            )
            .await?;
            if answer.review_owners.is_empty() {
                return Ok(Outcome::Answer(Box::new(answer)));
            }
            // The owner reviews the SQL, how it was released, and the
            // released aggregate; the buyer later gets the answer alone.
            let held = serde_json::json!({
                "answer": answer.document(),
                "sql": request.sql,
                "trace": {
                    "grant": answer.grant,
                    "purpose": answer.purpose,
                    "release": answer.release,
                },
            });
            let owners = answer.review_owners.clone();
            crate::app::review::hold(&sandbox, &principal, &answer.query_id, owners, &held).await?;
            Ok(Outcome::Held(answer.query_id))
        }
        Err(e) => {
            let wall_ms = started.elapsed().as_millis() as u64;
            record::refusal(
                &sandbox, &principal, &request, &query_id, &trace, wall_ms, &e,
            )
            .await?;
            Err(e)
        }
    }
}

fn ran_too_long(timeout: Duration) -> Error {
    Error::ResourceLimit(format!(
        "the query ran longer than {} ms and was cancelled",
        timeout.as_millis()
    ))
}

enum Step {
    DryRun(Box<Decided>),
    Done(Box<Prepared>, Executed),
}

async fn answer(
    sandbox: &Arc<Sandbox>,
    principal: &Principal,
    request: &Request,
    decided: Option<Box<Decided>>,
    trace: &mut Trace,
) -> Result<Step, Error> {
    if principal.role != Role::Buyer {
        return Err(Error::Forbidden("only buyers run queries".into()));
    }
    sandbox.policies.check_principal(&principal.id)?;
    let (gated, ahead) = match decided {
        Some(d) if still_holds(sandbox, principal, &d.gated, trace)? => (d.gated, d.ahead),
        _ => (admit(sandbox, principal, request, trace).await?, None),
    };
    let mut prepared = Box::new(hold(sandbox, principal, gated)?);
    if request.dry_run {
        let ahead = match request.run_ahead {
            true => run_ahead(sandbox, principal, &prepared),
            false => None,
        };
        return Ok(Step::DryRun(Box::new(Decided {
            outline: outline::outline(&prepared.gated),
            gated: prepared.gated.clone(),
            ahead,
        })));
    }
    if let Some((answer, release)) = &prepared.cached {
        let executed = cache::from_cache(answer, release)?;
        return Ok(Step::Done(prepared, executed));
    }
    let ahead = match ahead {
        Some(ahead) => ahead.claim(|| commit_charge(&mut prepared, trace)).await?,
        None => None,
    };
    let executed = match ahead {
        Some(executed) => executed,
        None => {
            // A bounded wait: under overload, answer 503 quickly rather than pile up.
            let wait = Duration::from_millis(sandbox.settings.limits.queue_wait_ms);
            let weight = principal
                .org
                .as_ref()
                .and_then(|org| sandbox.settings.slot_weights.get(org))
                .copied()
                .unwrap_or(1);
            let slot =
                tokio::time::timeout(wait, sandbox.query_slots.acquire(&principal.id, weight))
                    .await
                    .map_err(|_| Error::Overloaded)?;
            commit_charge(&mut prepared, trace);
            in_lane(sandbox, slot, prepared.gated.clone()).await?
        }
    };
    Ok(Step::Done(prepared, executed))
}

/// Reserved until data is read (an `overloaded` refusal costs nothing);
/// from then on the charge stands whatever happens.
fn commit_charge(prepared: &mut Prepared, trace: &mut Trace) {
    if let Some(charge) = prepared.charge.as_mut() {
        charge.commit();
        trace.epsilon_charged = prepared.epsilon;
        trace.epsilon_by_dataset = prepared.epsilon_by_dataset.clone();
    }
}

/// Executes on the lane of `slot`, which it holds until the execution
/// ends. Dropped (timeout, client gone), it stops the execution.
async fn in_lane(sandbox: &Arc<Sandbox>, slot: Slot, gated: Arc<Gated>) -> Result<Executed, Error> {
    let task = sandbox.lane(&slot).spawn({
        let sandbox = sandbox.clone();
        async move {
            let _slot = slot;
            execute(&sandbox, &gated).await
        }
    });
    Stopping(task).await?
}

/// A task that is stopped when whoever waits for it goes away.
struct Stopping<T>(tokio::task::JoinHandle<T>);

impl<T> Future for Stopping<T> {
    type Output = Result<T, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map_err(|e| Error::Internal(format!("the query task failed: {e}")))
    }
}

impl<T> Drop for Stopping<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Begins executing a decided query if the sandbox is idle (no query holds
/// a slot, nobody waits), else leaves it to its run, which queues like any
/// other: under load, work ahead would only compete with work asked for.
/// It runs under the query timeout, since nothing may come to wait for it.
fn run_ahead(sandbox: &Arc<Sandbox>, principal: &Principal, prepared: &Prepared) -> Option<Ahead> {
    if prepared.cached.is_some() {
        return None;
    }
    let slot = sandbox.query_slots.acquire_if_idle(&principal.id)?;
    let lane = sandbox.lane(&slot);
    let (sandbox, gated) = (sandbox.clone(), prepared.gated.clone());
    let timeout = Duration::from_millis(sandbox.settings.limits.query_timeout_ms);
    let state = Arc::new(AtomicU8::new(RUNNING));
    let watched = state.clone();
    let task = lane.spawn(async move {
        let _slot = slot;
        let run = tokio::time::timeout(timeout, execute(&sandbox, &gated));
        tokio::pin!(run);
        let finished = |r: Result<Result<Executed, Error>, _>| {
            Some(r.unwrap_or_else(|_| Err(ran_too_long(timeout))))
        };
        tokio::select! {
            r = &mut run => finished(r),
            () = tokio::time::sleep(AHEAD_PATIENCE) => {
                let gave_up = watched
                    .compare_exchange(RUNNING, GAVE_UP, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if gave_up { None } else { finished(run.await) }
            }
        }
    });
    Some(Ahead {
        task: Stopping(task),
        state,
    })
}

/// Through the gate (or the principal's same statement let through before,
/// if that decision still holds), and within the scan limit.
async fn admit(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &Request,
    trace: &mut Trace,
) -> Result<Arc<Gated>, Error> {
    if let Some(gated) = plans::recall(sandbox, principal, request)
        && still_holds(sandbox, principal, &gated, trace)?
    {
        return Ok(gated);
    }
    let mut gated = gate::gate(sandbox, principal, request, trace).await?;
    let rows: u64 = gated.scanned.iter().map(|d| d.num_rows).sum();
    let cap = sandbox.settings.limits.max_rows_scanned;
    if rows > cap {
        return Err(Error::ResourceLimit(format!(
            "the query would scan {rows} rows; at most {cap} are allowed"
        )));
    }
    if rows <= SMALL_SCAN_ROWS {
        gated
            .session
            .config_mut()
            .options_mut()
            .execution
            .target_partitions = 1;
    }
    let gated = Arc::new(gated);
    plans::keep(sandbox, principal, request, &gated);
    Ok(gated)
}

/// Holds the quota and budget an admitted query needs (or finds its
/// answer released before).
fn hold(sandbox: &Sandbox, principal: &Principal, gated: Arc<Gated>) -> Result<Prepared, Error> {
    let reservation = charge::reserve_quota(sandbox, &gated.grant, &gated.scanned)?;
    let (epsilon, epsilon_by_dataset) = charge::epsilon_of(&gated.catalog, &gated.split);
    let cache_scope = cache::scope(principal, &gated);
    let cached = if epsilon > 0.0 {
        sandbox
            .store
            .cached_answer(&cache_scope, &gated.plan_sha256)?
    } else {
        None
    };
    let charge = match (&cached, epsilon > 0.0) {
        (None, true) => Some(charge::reserve_budget(
            sandbox,
            &gated.catalog,
            &gated.grant,
            &epsilon_by_dataset,
            epsilon,
        )?),
        _ => None,
    };
    Ok(Prepared {
        gated,
        cache_scope,
        reservation,
        epsilon,
        epsilon_by_dataset,
        charge,
        cached,
    })
}

async fn execute(sandbox: &Sandbox, gated: &Gated) -> Result<Executed, Error> {
    let engine = &sandbox.engine;
    let limits = &sandbox.settings.limits;
    let mut cpu = 0u64;
    let mut filled = Vec::new();
    let (mut released_groups, mut suppressed_groups) = (0u64, Some(0u64));
    let mut min_group_size: Option<u64> = None;
    let mut noise = Vec::new();
    let mut cluster_jobs = 0u64;
    // Noise is reported under the names the buyer reads (`visits`), not
    // the engine's (`count(Int64(1))`).
    let output_names = release::output_names(&gated.split.upper);
    let optimized = gated.optimized(engine)?;
    for (job, plan) in gated.split.jobs.iter().zip(&optimized.jobs) {
        // Groups before release only bound memory; the owner's max_groups
        // applies to what is released (a count the answer shows anyway).
        let candidates = limits.max_result_rows.saturating_mul(100);
        let (batches, physical) = engine
            .execute_release(&gated.session, plan, candidates)
            .await?;
        cpu += crate::engine::cpu_ns(&physical);
        if let Some(metrics) = engine.cluster_metrics(&physical) {
            cluster_jobs += 1;
            // A check for the operator's log: the answer does not wait for it.
            let charged = charged_rows(gated, job);
            tokio::spawn(async move {
                if let Some(metrics) = metrics.await {
                    cross_check(charged, &metrics);
                }
            });
        }
        let batches = match &job.kind {
            JobKind::Threshold { .. } => {
                let released = release::threshold(batches, job.min_group_size, &job.schema)?;
                released_groups += released.released_groups;
                suppressed_groups = suppressed_groups.map(|s| s + released.suppressed_groups);
                released.batches
            }
            JobKind::Dp(dp_job) => {
                let (released, count) =
                    release_dp(batches, dp_job.clone(), job.schema.clone()).await?;
                released_groups += count;
                suppressed_groups = None;
                let mut report = dp_job.report(&job.schema);
                report.name_columns(&output_names);
                noise.push(serde_json::to_value(report).unwrap_or_default());
                released
            }
        };
        let released_rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if let Some(max) = job.max_groups
            && released_rows as u64 > max
        {
            return Err(Error::ResourceLimit(format!(
                "the release has more than the {max} groups its dataset allows"
            )));
        }
        let batches = release::in_key_order(batches, job.groups, &job.schema)?;
        min_group_size =
            Some(min_group_size.map_or(job.min_group_size, |m| m.max(job.min_group_size)));
        let table = MemTable::try_new(job.schema.clone(), vec![batches])
            .map_err(|e| Error::Internal(e.to_string()))?;
        filled.push((job.slot.clone(), Arc::new(table)));
    }
    let upper = release::fill(&optimized.upper, filled)?;
    let (batches, physical) = engine
        .execute(&gated.session, &upper, limits.max_result_rows)
        .await?;
    cpu += crate::engine::cpu_ns(&physical);
    let mechanism = match (gated.split.jobs.is_empty(), noise.is_empty()) {
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
        summary_used: gated.split.jobs.iter().any(|j| j.reads_summary()),
        cluster_jobs,
    };
    Executed::new(physical.schema(), batches, release, cpu)
}

/// The rows the ledger charges for `job`: what the catalog says its datasets hold.
fn charged_rows(gated: &Gated, job: &release::ReleaseJob) -> u64 {
    gated
        .scanned
        .iter()
        .filter(|d| job.datasets.contains(d.id()))
        .map(|d| d.num_rows)
        .sum()
}

/// The cluster's own count of rows its scans produced (after Parquet
/// pruning) can only be at most what was charged; more would mean the
/// charge undercounts.
fn cross_check(charged: u64, metrics: &crate::engine::JobMetrics) {
    if metrics.rows_scanned > charged {
        tracing::error!(
            charged,
            cluster = metrics.rows_scanned,
            "the cluster scanned more rows than the ledger charges"
        );
    } else {
        tracing::debug!(
            charged,
            cluster = metrics.rows_scanned,
            bytes = metrics.bytes_scanned,
            stages = metrics.stages,
            "cluster job metrics"
        );
    }
}

async fn finish(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &Request,
    query_id: String,
    started: Instant,
    p: Box<Prepared>,
    e: Executed,
) -> Result<Answer, Error> {
    let cached = p.cached.is_some();
    let (epsilon, by_dataset) = if cached {
        (0.0, BTreeMap::new())
    } else {
        (p.epsilon, p.epsilon_by_dataset.clone())
    };
    let free = charge::free_tier(sandbox, &p.gated.grant);
    let mut usage = charge::estimate(&p.gated.scanned, &by_dataset, &free);
    usage.cpu_ms = e.cpu_ns / 1_000_000;
    usage.wall_ms = started.elapsed().as_millis() as u64;
    usage.groups_released = e.release.released_groups;
    usage.groups_suppressed = e.release.suppressed_groups;
    usage.epsilon = epsilon;
    let rows: usize = e.batches.iter().map(RecordBatch::num_rows).sum();
    usage.cells_released = rows as u64 * e.schema.fields().len() as u64;
    let gated = &p.gated;
    let trace = Trace {
        grant: Some(gated.grant.id.clone()),
        purpose: Some(gated.grant.purpose.clone()),
        datasets: gated.scanned.iter().map(|d| d.id().to_string()).collect(),
        epsilon_charged: epsilon,
        epsilon_by_dataset: by_dataset,
    };
    let mut event = record::query_event(&query_id, principal, request, &trace, Decision::Answered);
    event.plan_sha256 = Some(gated.plan_sha256.clone());
    event.cached = cached;
    event.release = Some(serde_json::to_value(&e.release).unwrap_or_default());
    event.usage = Some(usage.clone());
    event.result_sha256 = Some(e.result_sha256);
    // Asking again returns this answer, not fresh noise to average away.
    let keep = match epsilon > 0.0 {
        true => Some(ReleasedAnswer {
            scope: p.cache_scope.clone(),
            plan_sha256: gated.plan_sha256.clone(),
            answer: release::encode::arrow_stream(&e.schema, &e.batches)?,
            release: serde_json::to_string(&e.release).unwrap_or_default(),
        }),
        false => None,
    };
    let receipt = record::append(sandbox, event, &request.sql, keep).await?;
    // Owners of datasets that review every answer, or all of the query's
    // owners when one asked, approving the grant, to review its answers.
    let mut review_owners: Vec<String> = gated
        .scanned
        .iter()
        .filter(|d| gated.grant_reviewed || d.manifest.release.review)
        .map(|d| d.manifest.owner.clone())
        .collect();
    review_owners.sort();
    review_owners.dedup();
    let Prepared {
        gated, reservation, ..
    } = *p;
    reservation.commit();
    let budget = Budget::of(sandbox, &gated.grant)?;
    Ok(Answer {
        budget,
        query_id,
        grant: gated.grant.id.clone(),
        purpose: gated.grant.purpose.clone(),
        schema: e.schema,
        batches: e.batches,
        release: e.release,
        usage,
        receipt,
        review_owners,
        rows_json: e.rows_json,
    })
}

/// The noise step of a DP release, on a blocking thread: a long one
/// neither stalls the runtime's workers (other buyers' queries) nor
/// outlives its query — when the query is dropped (timeout, client gone),
/// the guard tells the step to stop.
async fn release_dp(
    batches: Vec<RecordBatch>,
    job: release::dp::DpJob,
    schema: SchemaRef,
) -> Result<(Vec<RecordBatch>, u64), Error> {
    use std::sync::atomic::{AtomicBool, Ordering};
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(stop.clone());
    tokio::task::spawn_blocking(move || {
        let exact = release::dp::Exact::new(batches);
        release::dp::release(exact, &job, &schema, &|| stop.load(Ordering::Relaxed))
    })
    .await
    .map_err(|e| Error::Internal(format!("the release step failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn answer() -> Answer {
        let schema = Arc::new(Schema::new(vec![
            Field::new("district", DataType::Utf8, true),
            Field::new("visits", DataType::Int64, false),
        ]));
        let batch = |names: Vec<Option<&str>>, counts: Vec<i64>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(names)),
                    Arc::new(Int64Array::from(counts)),
                ],
            )
            .unwrap()
        };
        let batches = vec![
            batch(vec![Some("north \"quoted\""), None], vec![12, 7]),
            batch(vec![Some("süd\n")], vec![30]),
        ];
        let release = ReleaseSummary {
            mechanism: "threshold".into(),
            min_group_size: Some(5),
            released_groups: 3,
            suppressed_groups: Some(1),
            noise: None,
            summary_used: false,
            cluster_jobs: 0,
        };
        let e = Executed::new(schema, batches, release, 0).unwrap();
        Answer {
            query_id: "q_1".into(),
            grant: "g_1".into(),
            purpose: "research".into(),
            schema: e.schema,
            batches: e.batches,
            release: e.release,
            usage: Usage {
                rows_scanned: 40,
                ..Usage::default()
            },
            budget: Budget {
                epsilon_limit: 1.0,
                epsilon_spent: 0.25,
                epsilon_remaining: 0.75,
            },
            receipt: Receipt {
                ledger_index: 3,
                entry_hash: "ab".into(),
                tree_size: 4,
                root_hash: "cd".into(),
                timestamp_ms: 1,
                signature: "ef".into(),
                key_id: "k".into(),
            },
            review_owners: Vec::new(),
            rows_json: e.rows_json,
        }
    }

    #[test]
    fn the_http_body_is_the_document_with_the_digested_rows() {
        let answer = answer();
        let body = answer.body().unwrap();
        assert_eq!(body, serde_json::to_vec(&answer.document()).unwrap());
        let text = String::from_utf8(body).unwrap();
        let rows = r#""rows":[["north \"quoted\"",12],[null,7],["süd\n",30]]"#;
        assert!(text.contains(&format!(r#"}},{rows},"usage":{{"rows_scanned":40,"#)));
        // Keys in name order, as every answer has had them.
        let keys = [
            "budget", "columns", "grant", "purpose", "query_id", "receipt", "release", "rows",
            "usage",
        ];
        let at: Vec<usize> = keys
            .iter()
            .map(|k| text.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(text.starts_with(r#"{"budget":{"epsilon_limit":1.0,"#));
    }
}
