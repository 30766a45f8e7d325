//! Usage reports for buyers and owners, and SQL over usage metadata for auditors.

use super::Authenticated;
use super::error::ApiError;
use crate::app::Sandbox;
use crate::ledger::usage::summarize;
use crate::ledger::usage_table::UsageTable;
use crate::store::{Principal, Role};
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/usage", web::get().to(usage))
        .route("/refusals", web::get().to(refusals))
        .route("/queries", web::get().to(query_history))
        .route("/audit/sql", web::post().to(audit_sql));
}

/// Whether `principal` may see a query of `asker` over `datasets`: buyers
/// their own, owners those reading their datasets, auditors all.
fn sees(principal: &Principal, owned: &[String], asker: &str, datasets: &[String]) -> bool {
    match principal.role {
        Role::Buyer => asker == principal.id,
        Role::Owner => datasets.iter().any(|d| owned.contains(d)),
        Role::Auditor | Role::Admin => true,
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Days {
    /// How many days back, today included.
    #[serde(default = "thirty")]
    #[param(minimum = 1, maximum = 366)]
    days: u64,
}

fn thirty() -> u64 {
    30
}

/// Refused queries per day, code and rule
///
/// Buyers see their own refusals; owners those of queries on their
/// datasets; auditors all.
#[utoipa::path(get, path = "/v1/refusals", tag = "usage", params(Days), responses((status = 200, description = "OK", body = Object)))]
async fn refusals(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    params: web::Query<Days>,
) -> Result<HttpResponse, ApiError> {
    if !(1..=366).contains(&params.days) {
        return Err(ApiError::invalid("days must be between 1 and 366"));
    }
    let since = (chrono::Utc::now() - chrono::Duration::days(params.days as i64 - 1))
        .format("%Y-%m-%d")
        .to_string();
    let reader = sandbox.clone();
    let since_day = since.clone();
    let all = web::block(move || reader.ledger.refusals(&since_day))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let owned = super::owned_ids(&sandbox, &who.0);
    let mut counts: std::collections::BTreeMap<(String, Option<String>, Option<String>), u64> =
        Default::default();
    for r in all
        .iter()
        .filter(|r| sees(&who.0, &owned, &r.principal, &r.datasets))
    {
        *counts
            .entry((r.day.clone(), r.code.clone(), r.rule.clone()))
            .or_default() += r.count;
    }
    let rows: Vec<_> = counts
        .into_iter()
        .map(|((day, code, rule), count)| json!({ "day": day, "code": code, "rule": rule, "count": count }))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "since": since, "refusals": rows })))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Recent {
    /// How many queries, newest first.
    #[serde(default = "fifty")]
    #[param(minimum = 1, maximum = 500)]
    limit: u64,
}

fn fifty() -> u64 {
    50
}

/// The caller's recent queries, newest first; answers with the evidence (receipt) to fetch
#[utoipa::path(get, path = "/v1/queries", tag = "queries", params(Recent), responses((status = 200, description = "OK", body = Object)))]
async fn query_history(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    params: web::Query<Recent>,
) -> Result<HttpResponse, ApiError> {
    if !(1..=500).contains(&params.limit) {
        return Err(ApiError::invalid("limit must be between 1 and 500"));
    }
    let reader = sandbox.clone();
    let principal = who.0.id.clone();
    let limit = params.limit;
    let queries = web::block(move || reader.ledger.recent_queries(&principal, limit))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let queries: Vec<_> = queries
        .into_iter()
        .map(|q| {
            // Evidence is kept for answers: what a buyer may have to prove.
            let evidence = q
                .query_id
                .as_ref()
                .filter(|_| q.decision == "answered")
                .map(|id| format!("/v1/evidence/{id}"));
            let mut v = json!(q);
            v["evidence"] = json!(evidence);
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "queries": queries })))
}

/// Metered use per grant and day
///
/// Buyers see their own use; owners the use of their datasets; auditors all.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", responses((status = 200, description = "OK", body = Object)))]
async fn usage(sandbox: web::Data<Sandbox>, who: Authenticated) -> Result<HttpResponse, ApiError> {
    let principal = who.0;
    let reader = sandbox.clone();
    let all = web::block(move || reader.ledger.usage_rollups())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let owned = super::owned_ids(&sandbox, &principal);
    let visible = all
        .iter()
        .filter(|r| sees(&principal, &owned, &r.principal, &r.datasets));
    Ok(HttpResponse::Ok().json(json!({ "usage": summarize(visible) })))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AuditSql {
    /// One SELECT over the `usage` table.
    #[schema(min_length = 1, pattern = r"\S")]
    sql: String,
}

/// SQL over usage metadata (table `usage`) and the trade (`requests`, `decisions`, `grants`), never over datasets
///
/// The session holds those tables and nothing else: `usage` has one row
/// per query entry, read from the ledger's typed rows with filters,
/// projection and LIMIT pushed down, at most a million rows read per
/// request; the others are read from the state store.
#[utoipa::path(post, path = "/v1/audit/sql", tag = "audit", request_body = AuditSql, responses((status = 200, description = "OK", body = Object)))]
async fn audit_sql(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    if body.len() > sandbox.settings.limits.max_body_bytes {
        return Err(ApiError::PayloadTooLarge(
            sandbox.settings.limits.max_body_bytes,
        ));
    }
    let request: AuditSql = super::json_body(&body)?;
    if request.sql.trim().is_empty() {
        return Err(ApiError::invalid("sql must hold a statement"));
    }
    let table = UsageTable::new(
        &sandbox.settings.data_dir,
        std::time::Duration::from_millis(sandbox.settings.limits.query_timeout_ms),
    );
    let sandbox = sandbox.into_inner();
    let job = {
        let sandbox = sandbox.clone();
        async move {
            let engine = &sandbox.engine;
            let statement = engine.parse(&request.sql)?;
            let mut tables = crate::app::market::supervision_tables(&sandbox)?;
            tables.push(("usage".to_string(), Arc::new(table) as _));
            let state = engine.session_with(tables)?;
            let plan = engine.plan(&state, statement).await?;
            let plan = engine.optimize(&state, &plan)?;
            let (batches, physical) = engine
                .execute(&state, &plan, sandbox.settings.limits.max_result_rows)
                .await?;
            let rows = super::format::JsonRows(&batches);
            Ok::<_, ApiError>(
                json!({ "columns": super::format::columns(&physical.schema()), "rows": rows }),
            )
        }
    };
    let timeout = std::time::Duration::from_millis(sandbox.settings.limits.query_timeout_ms);
    let answer = sandbox
        .runtime
        .spawn(async move { tokio::time::timeout(timeout, job).await })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|_| ApiError::resource_limit("the query ran too long and was cancelled"))??;
    Ok(HttpResponse::Ok().json(answer))
}
