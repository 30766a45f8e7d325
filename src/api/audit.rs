//! Auditor endpoints: entries, signed tree heads, proofs and the public key.
//! Everything here is metadata about use; none of it reads a dataset.

use super::Authenticated;
use super::error::ApiError;
use crate::app::Sandbox;
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/audit/entries", web::get().to(entries))
        .route("/audit/head", web::get().to(head))
        .route("/audit/public-key", web::get().to(public_key))
        .route("/audit/proof/inclusion", web::get().to(inclusion))
        .route("/audit/proof/consistency", web::get().to(consistency));
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Page {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_limit")]
    limit: u64,
}

fn default_limit() -> u64 {
    100
}

/// Ledger entries in order, with exact bytes and leaf hashes
#[utoipa::path(get, path = "/v1/audit/entries", tag = "audit", params(Page), responses((status = 200, description = "OK", body = Object)))]
async fn entries(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
    page: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let limit = page.limit.clamp(1, 1000);
    let from = page.from;
    let reader = sandbox.clone();
    let rows = web::block(move || reader.ledger.entries(from, limit))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let next = rows.last().map(|(i, _, _)| i + 1);
    let entries: Vec<_> = rows
        .into_iter()
        .map(|(index, body, leaf_hash)| json!({ "index": index, "leaf_hash": leaf_hash, "body": body }))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "entries": entries, "next": next })))
}

/// The latest signed tree head
#[utoipa::path(get, path = "/v1/audit/head", tag = "audit", responses((status = 200, description = "OK", body = Object)))]
async fn head(sandbox: web::Data<Sandbox>, _: Authenticated) -> Result<HttpResponse, ApiError> {
    let head = sandbox
        .ledger
        .head()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(head))
}

/// The Ed25519 key that signs tree heads
#[utoipa::path(get, path = "/v1/audit/public-key", tag = "audit", responses((status = 200, description = "OK", body = Object)))]
async fn public_key(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(json!({
        "algorithm": "Ed25519",
        "key_id": sandbox.ledger.key_id(),
        "public_key": hex::encode(sandbox.ledger.public_key()),
    })))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct InclusionQuery {
    index: u64,
    size: u64,
}

/// Audit path of one entry
#[utoipa::path(get, path = "/v1/audit/proof/inclusion", tag = "audit", params(InclusionQuery), responses((status = 200, description = "OK", body = Object)))]
async fn inclusion(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
    q: web::Query<InclusionQuery>,
) -> Result<HttpResponse, ApiError> {
    let proof = sandbox
        .ledger
        .inclusion_proof(q.index, q.size)
        .ok_or_else(|| {
            ApiError::invalid("index must be below size, and size at most the tree size")
        })?;
    Ok(HttpResponse::Ok().json(json!({
        "index": q.index,
        "size": q.size,
        "proof": proof.iter().map(hex::encode).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ConsistencyQuery {
    from: u64,
    to: u64,
}

/// Consistency proof between two tree sizes
#[utoipa::path(get, path = "/v1/audit/proof/consistency", tag = "audit", params(ConsistencyQuery), responses((status = 200, description = "OK", body = Object)))]
async fn consistency(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
    q: web::Query<ConsistencyQuery>,
) -> Result<HttpResponse, ApiError> {
    let proof = sandbox
        .ledger
        .consistency_proof(q.from, q.to)
        .ok_or_else(|| {
            ApiError::invalid("from must be at most to, and to at most the tree size")
        })?;
    Ok(HttpResponse::Ok().json(json!({
        "from": q.from,
        "to": q.to,
        "proof": proof.iter().map(hex::encode).collect::<Vec<_>>(),
    })))
}
