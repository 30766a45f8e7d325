//! Usage reports for buyers and owners, and SQL over usage metadata for auditors.

use super::Authenticated;
use super::error::ApiError;
use crate::app::Sandbox;
use crate::ledger::usage::{UsageRecord, summarize};
use crate::store::Role;
use actix_web::{HttpResponse, web};
use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use utoipa::ToSchema;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/usage", web::get().to(usage))
        .route("/audit/sql", web::post().to(audit_sql));
}

async fn records(sandbox: &web::Data<Sandbox>) -> Result<Vec<UsageRecord>, ApiError> {
    let sandbox = sandbox.clone();
    let entries = web::block(move || sandbox.ledger.entries(0, u64::MAX >> 1))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(entries
        .iter()
        .filter_map(|(i, body, _)| UsageRecord::from_entry(*i, body))
        .collect())
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
    let owned: Vec<&str> = sandbox
        .catalog
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
    sql: String,
}

fn usage_batch(records: &[UsageRecord]) -> Result<RecordBatch, ApiError> {
    let text = |f: &dyn Fn(&UsageRecord) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(records.iter().map(f).collect::<Vec<_>>()))
    };
    let count = |f: &dyn Fn(&UsageRecord) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from(records.iter().map(f).collect::<Vec<_>>()))
    };
    let schema = Schema::new(vec![
        Field::new("ledger_index", DataType::UInt64, false),
        Field::new("at", DataType::Utf8, true),
        Field::new("day", DataType::Utf8, true),
        Field::new("principal", DataType::Utf8, true),
        Field::new("grant_id", DataType::Utf8, true),
        Field::new("purpose", DataType::Utf8, true),
        Field::new("datasets", DataType::Utf8, true),
        Field::new("decision", DataType::Utf8, true),
        Field::new("code", DataType::Utf8, true),
        Field::new("rule", DataType::Utf8, true),
        Field::new("rows_scanned", DataType::UInt64, false),
        Field::new("bytes_scanned", DataType::UInt64, false),
        Field::new("cpu_ms", DataType::UInt64, false),
        Field::new("wall_ms", DataType::UInt64, false),
        Field::new("groups_released", DataType::UInt64, false),
        Field::new("groups_suppressed", DataType::UInt64, false),
        Field::new("cells_released", DataType::UInt64, false),
        Field::new("epsilon", DataType::Float64, false),
        Field::new("charge_micros", DataType::Int64, false),
    ]);
    let columns: Vec<ArrayRef> = vec![
        count(&|r| r.ledger_index),
        text(&|r| Some(r.at.clone())),
        text(&|r| Some(r.day.clone())),
        text(&|r| Some(r.principal.clone())),
        text(&|r| r.grant_id.clone()),
        text(&|r| r.purpose.clone()),
        text(&|r| Some(r.datasets.join(","))),
        text(&|r| Some(r.decision.clone())),
        text(&|r| r.code.clone()),
        text(&|r| r.rule.clone()),
        count(&|r| r.rows_scanned),
        count(&|r| r.bytes_scanned),
        count(&|r| r.cpu_ms),
        count(&|r| r.wall_ms),
        count(&|r| r.groups_released),
        count(&|r| r.groups_suppressed),
        count(&|r| r.cells_released),
        Arc::new(Float64Array::from(
            records.iter().map(|r| r.epsilon).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            records.iter().map(|r| r.charge_micros).collect::<Vec<_>>(),
        )),
    ];
    RecordBatch::try_new(Arc::new(schema), columns).map_err(|e| ApiError::internal(e.to_string()))
}

/// SQL over usage metadata (table `usage`), never over datasets
///
/// The session holds that one table and nothing else.
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
    let request: AuditSql = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the body is not a valid request: {e}")))?;
    let batch = usage_batch(&records(&sandbox).await?)?;
    let table = MemTable::try_new(batch.schema(), vec![vec![batch]])
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let sandbox = sandbox.into_inner();
    let job = {
        let sandbox = sandbox.clone();
        async move {
            let engine = &sandbox.engine;
            let statement = engine.parse(&request.sql)?;
            let state = engine.session_with(vec![("usage".to_string(), Arc::new(table) as _)])?;
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
