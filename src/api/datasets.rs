//! The catalog over HTTP: listings with quality cards and prices for
//! everyone; registration, update, withdrawal and per-dataset usage for
//! the owners who run them (see `app::registration`).

use super::error::ApiError;
use super::{Authenticated, read_body};
use crate::app::{Sandbox, registration};
use crate::catalog::Dataset;
use crate::catalog::registry::{Pending, Status};
use crate::ledger::usage::summarize;
use crate::store::{Principal, Role};
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use utoipa::IntoParams;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/datasets", web::get().to(list_datasets))
        .route("/datasets", web::post().to(register_dataset))
        .route("/datasets/{id}", web::get().to(get_dataset))
        .route("/datasets/{id}", web::put().to(update_dataset))
        .route("/datasets/{id}", web::delete().to(withdraw_dataset))
        .route("/datasets/{id}/preview", web::get().to(preview_dataset))
        .route("/datasets/{id}/usage", web::get().to(dataset_usage));
}

fn owns(principal: &Principal, owner: &str) -> bool {
    principal.role == Role::Owner && principal.org.as_deref() == Some(owner)
}

/// A registration that is not active, as `principal` may see it: its
/// owner in full, auditors without the reason of a failure (it may quote
/// the owner's data, a parse error say), others not at all.
fn pending_for(principal: &Principal, pending: Pending) -> Option<Pending> {
    if owns(principal, &pending.owner) {
        Some(pending)
    } else if matches!(principal.role, Role::Auditor | Role::Admin) {
        Some(Pending {
            reason: None,
            ..pending
        })
    } else {
        None
    }
}

fn summary(sandbox: &Sandbox, principal: &Principal, d: &Dataset) -> Value {
    let m = &d.manifest;
    let columns: Vec<Value> = m
        .columns
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "class": c.class,
                "type": d.data_type(&c.name).map(|t| t.to_string()),
                "joinable": c.joinable,
                "bounds": c.bounds,
                "consent_column": m.consent_column.as_deref() == Some(c.name.as_str()),
                "privacy_unit": m.privacy_unit.as_deref() == Some(c.name.as_str()),
            })
        })
        .collect();
    let quality = d.quality.get();
    // Personal data shows the card's noisy count, never the exact one.
    let rows = match &m.privacy_unit {
        Some(_) => quality.map_or(Value::Null, |q| q["rows"].clone()),
        None => json!(d.num_rows),
    };
    let pending = sandbox
        .catalog
        .pending_of(d.id())
        .and_then(|p| pending_for(principal, p));
    let (commitment, commitment_sha256) = crate::app::market::commitment(m);
    json!({
        "id": m.id,
        "title": m.title,
        "owner": m.owner,
        "description": m.description,
        "status": Status::Active,
        "version": { "manifest_sha256": d.manifest_sha256, "data_sha256": d.data_sha256 },
        "pending": pending,
        "level": m.level,
        "region": m.region,
        "personal_information": m.personal_information,
        "privacy_unit": m.privacy_unit,
        "rows": rows,
        "columns": columns,
        "release": {
            "min_group_size": m.is_guarded().then(|| sandbox.policies.min_group_size(m)),
            "max_groups": m.release.max_groups,
            "dp": m.release.dp,
            "row_level_output": !m.is_guarded(),
        },
        "level_rules": sandbox.policies.levels.rule(m.level),
        "pricing": m.pricing,
        "commitment": {
            "text": commitment,
            "sha256": commitment_sha256,
        },
        "quality": quality,
        "lifetime_epsilon": lifetime_epsilon(sandbox, d),
    })
}

/// A DP dataset's lifetime budget, shared by every buyer: what its owner
/// set (`release.dp.epsilon_total`, else the configured default), what is
/// spent and what is left.
fn lifetime_epsilon(sandbox: &Sandbox, d: &Dataset) -> Value {
    lifetime_json(lifetime_budget(sandbox, d))
}

fn lifetime_json(budget: Option<(f64, Option<f64>)>) -> Value {
    match budget {
        None => Value::Null,
        Some((limit, Some(spent))) => {
            json!({ "limit": limit, "spent": spent, "remaining": (limit - spent).max(0.0) })
        }
        Some((limit, None)) => json!({ "limit": limit }),
    }
}

/// A DP dataset's lifetime limit and, if it could be read, what is spent.
fn lifetime_budget(sandbox: &Sandbox, d: &Dataset) -> Option<(f64, Option<f64>)> {
    d.manifest.release.dp.as_ref()?;
    let key = format!("dataset:{}", d.id());
    let spent = sandbox
        .budgets
        .spent_or_load(&key, || sandbox.ledger.epsilon_spent(&key))
        .ok();
    Some((sandbox.lifetime_epsilon(&d.manifest), spent))
}

pub(super) fn find_dataset(sandbox: &Sandbox, id: &str) -> Result<Arc<Dataset>, ApiError> {
    sandbox
        .catalog
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("dataset '{id}' does not exist")))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only what is the caller's: an owner's datasets (with registrations
    /// under way or failed), a buyer's granted ones.
    #[serde(default)]
    mine: bool,
}

/// The catalog: schemas, classes, levels, release rules, prices, quality cards
#[utoipa::path(get, path = "/v1/datasets", tag = "catalog", params(ListParams), responses((status = 200, description = "OK", body = Object)))]
async fn list_datasets(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = &who.0;
    let catalog = sandbox.catalog.current();
    let granted: Vec<String> = match (params.mine, principal.role) {
        (true, Role::Buyer) => {
            let now = crate::util::now_rfc3339();
            sandbox
                .store
                .grants_of(&principal.id)?
                .into_iter()
                .filter(|g| g.is_active(&now))
                .flat_map(|g| g.datasets)
                .collect()
        }
        _ => Vec::new(),
    };
    let mine = |d: &Dataset| match principal.role {
        Role::Owner => owns(principal, &d.manifest.owner),
        Role::Buyer => granted.iter().any(|g| g == d.id()),
        Role::Auditor | Role::Admin => true,
    };
    let datasets: Vec<Value> = catalog
        .datasets
        .values()
        .filter(|d| !params.mine || mine(d))
        .map(|d| summary(&sandbox, principal, d))
        .collect();
    // Registrations not yet active: their owner's (and auditors') business.
    let pending: Vec<Pending> = sandbox
        .catalog
        .all_pending()
        .into_iter()
        .filter(|p| params.mine && catalog.get(&p.dataset).is_none())
        .filter_map(|p| pending_for(principal, p))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "datasets": datasets, "pending": pending })))
}

/// One catalog entry, or the state of a registration under way
#[utoipa::path(get, path = "/v1/datasets/{id}", tag = "catalog", params(("id" = String, Path, description = "A dataset id from the catalog")), responses((status = 200, description = "OK", body = Object)))]
async fn get_dataset(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    if let Some(d) = sandbox.catalog.get(&id) {
        return Ok(HttpResponse::Ok().json(summary(&sandbox, &who.0, &d)));
    }
    match sandbox
        .catalog
        .pending_of(&id)
        .and_then(|p| pending_for(&who.0, p))
    {
        Some(p) => Ok(HttpResponse::Ok().json(json!({
            "id": p.dataset,
            "owner": p.owner,
            "status": p.status,
            "pending": p,
        }))),
        None => Err(ApiError::NotFound(format!("dataset '{id}' does not exist"))),
    }
}

/// Synthetic rows made from the schema, never real ones
#[utoipa::path(get, path = "/v1/datasets/{id}/preview", tag = "catalog", params(("id" = String, Path, description = "A dataset id from the catalog")), responses((status = 200, description = "OK", body = Object)))]
async fn preview_dataset(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let d = find_dataset(&sandbox, &id)?;
    let (columns, rows) = crate::catalog::synthetic_preview(&d, 10);
    Ok(HttpResponse::Ok().json(json!({
        "dataset": d.id(),
        "synthetic": true,
        "note": "generated from the schema and declared bounds; no real row was read",
        "columns": columns,
        "rows": rows,
    })))
}

fn accepted(pending: &Pending) -> HttpResponse {
    HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/datasets/{}", pending.dataset)))
        .json(json!({ "id": pending.dataset, "status": pending.status, "pending": pending }))
}

/// Register a dataset: its manifest, over data inside the owner's domain root
///
/// Checked at once (schema, owner, domain root, data against manifest);
/// statistics, unit summaries and the quality card are prepared in the
/// background (`status: registering`, then `active` or `failed`).
#[utoipa::path(post, path = "/v1/datasets", tag = "owners", request_body(content = Object, content_type = "application/json"), responses((status = 202, description = "Accepted: being prepared", body = Object)))]
async fn register_dataset(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, sandbox.settings.limits.max_manifest_bytes).await?;
    let sandbox = sandbox.into_inner();
    let pending = registration::submit(&sandbox, &who.0, &body, None).await?;
    Ok(accepted(&pending))
}

/// A new version of the owner's dataset (new data files or manifest)
///
/// Prepared beside the active version and swapped in atomically once
/// ready; queries running meanwhile finish on the version they started with.
#[utoipa::path(put, path = "/v1/datasets/{id}", tag = "owners", params(("id" = String, Path, description = "The owner's dataset")), request_body(content = Object, content_type = "application/json"), responses((status = 202, description = "Accepted: being prepared", body = Object)))]
async fn update_dataset(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, sandbox.settings.limits.max_manifest_bytes).await?;
    let sandbox = sandbox.into_inner();
    let pending = registration::submit(&sandbox, &who.0, &body, Some(&id)).await?;
    Ok(accepted(&pending))
}

/// Withdraw the owner's dataset: new queries refused, grants on it ended
#[utoipa::path(delete, path = "/v1/datasets/{id}", tag = "owners", params(("id" = String, Path, description = "The owner's dataset")), responses((status = 200, description = "Withdrawn", body = Object)))]
async fn withdraw_dataset(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ended = registration::withdraw(&sandbox, &who.0, &id).await?;
    Ok(HttpResponse::Ok().json(json!({
        "id": id.as_str(),
        "status": Status::Withdrawn,
        "grants_ended": ended,
    })))
}

/// Use of one dataset per buyer and day, and its lifetime epsilon
///
/// For the dataset's owner and auditors.
#[utoipa::path(get, path = "/v1/datasets/{id}/usage", tag = "owners", params(("id" = String, Path, description = "A dataset id from the catalog")), responses((status = 200, description = "OK", body = Object)))]
async fn dataset_usage(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let d = find_dataset(&sandbox, &id)?;
    if who.0.role == Role::Owner && !owns(&who.0, &d.manifest.owner) {
        return Err(ApiError::forbidden(format!(
            "dataset '{id}' belongs to another owner"
        )));
    }
    let reader = sandbox.clone();
    let all = web::block(move || reader.ledger.usage_rollups())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let usage = summarize(
        all.iter()
            .filter(|r| r.datasets.iter().any(|x| x == d.id())),
    );
    let budget = lifetime_budget(&sandbox, &d);
    let mut lifetime = lifetime_json(budget);
    if let Some((limit, Some(spent))) = budget {
        let reader = sandbox.clone();
        let key = format!("dataset:{}", d.id());
        let by_day = web::block(move || reader.ledger.epsilon_by_day(&key))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        let today = chrono::Utc::now().date_naive();
        let burn = crate::accounting::burn_down::burn_down(limit, spent, &by_day, today);
        lifetime["by_day"] = json!(burn.by_day);
        lifetime["pace_per_day"] = json!(burn.pace_per_day);
        lifetime["projected_exhaustion"] = json!(burn.projected_exhaustion);
    }
    Ok(HttpResponse::Ok().json(json!({
        "dataset": d.id(),
        "usage": usage,
        "lifetime_epsilon": lifetime,
    })))
}
