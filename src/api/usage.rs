//! Usage reports for buyers and owners, and SQL over usage metadata for auditors.

use super::Authenticated;
use super::error::ApiError;
use crate::app::Sandbox;
use crate::ledger::usage::summarize;
use crate::ledger::usage_table::UsageTable;
use crate::store::Role;
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use utoipa::ToSchema;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/usage", web::get().to(usage))
        .route("/audit/sql", web::post().to(audit_sql));
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
    let catalog = sandbox.catalog.current();
    let owned: Vec<&str> = catalog
        .datasets
        .values()
        .filter(|d| principal.org.as_deref() == Some(d.manifest.owner.as_str()))
        .map(|d| d.id())
        .collect();
    let visible = all.iter().filter(|r| match principal.role {
        Role::Buyer => r.principal == principal.id,
        Role::Owner => r.datasets.iter().any(|d| owned.contains(&d.as_str())),
        Role::Auditor | Role::Admin => true,
    });
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
            let (batches, physical) = engine
                .execute(&state, &plan, sandbox.settings.limits.max_result_rows)
                .await?;
            let rows = super::format::json_rows(&batches)?;
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
