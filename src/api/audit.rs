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
        .route("/audit/proof/consistency", web::get().to(consistency))
        .route("/audit/verify", web::get().to(last_verification))
        .route("/audit/verify", web::post().to(verify_now));
}

/// The server's own verifications of its ledger: the last result, and one
/// run at a time (a verification reads the whole ledger).
#[derive(Default)]
pub struct Verifications {
    last: std::sync::Mutex<Option<serde_json::Value>>,
    running: tokio::sync::Mutex<()>,
}

/// How many times a verification that failed while the ledger grew is run
/// again: its passes read the live file at slightly different moments, so
/// an append in between can look like a mismatch; a real break fails every time.
const VERIFY_ATTEMPTS: usize = 3;

/// The last verification the server ran (`null` before the first)
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit", responses((status = 200, description = "OK", body = Object)))]
async fn last_verification(
    verifications: web::Data<Verifications>,
    _: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let last = verifications
        .last
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(HttpResponse::Ok().json(json!({ "last": last })))
}

/// Verify the ledger now, server-side: every leaf, the tree, every signed head, the roll-ups
///
/// The same checks as `frostglass verify --data-dir`, against the key in
/// the data directory. The answer names the first broken index, if any.
#[utoipa::path(post, path = "/v1/audit/verify", tag = "audit", responses((status = 200, description = "OK", body = Object)))]
async fn verify_now(
    sandbox: web::Data<Sandbox>,
    verifications: web::Data<Verifications>,
    _: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let Ok(_one_at_a_time) = verifications.running.try_lock() else {
        return Err(
            crate::error::Error::Conflict("a verification is already running".into()).into(),
        );
    };
    let started = std::time::Instant::now();
    let mut outcome = Err(crate::ledger::verify::Failure {
        index: None,
        reason: "not run".into(),
    });
    let mut size = 0;
    for _ in 0..VERIFY_ATTEMPTS {
        let before = sandbox.ledger.size();
        let options = crate::ledger::verify::Options {
            source: crate::ledger::verify::Source::Local(sandbox.settings.data_dir.clone()),
            public_key: None,
            state: None,
            receipt: None,
        };
        outcome = web::block(move || crate::ledger::verify::run(&options))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        size = sandbox.ledger.size();
        if outcome.is_ok() || size == before {
            break;
        }
    }
    let (ok, summary, broken_index) = match outcome {
        Ok(summary) => (true, summary, None),
        Err(failure) => (false, failure.to_string(), failure.index),
    };
    let result = json!({
        "ok": ok,
        "summary": summary,
        "broken_index": broken_index,
        "checked_at": crate::util::now_rfc3339(),
        "ledger_size": size,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    *verifications.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(result.clone());
    Ok(HttpResponse::Ok().json(result))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Page {
    /// The first index to return.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    from: u64,
    /// How many entries, at most.
    #[serde(default = "default_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: u64,
}

/// The largest index or size a ledger can have (SQLite's integers).
const MAX_INDEX: u64 = i64::MAX as u64;

/// Refuses a parameter outside the range the document states.
fn in_range(name: &str, value: u64, lo: u64, hi: u64) -> Result<u64, ApiError> {
    if (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(ApiError::invalid(format!(
            "{name} must lie between {lo} and {hi}"
        )))
    }
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
    let limit = in_range("limit", page.limit, 1, 1000)?;
    let from = in_range("from", page.from, 0, MAX_INDEX)?;
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
    /// The entry's index.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    index: u64,
    /// The size of the tree the path leads to the root of: above `index`, at most the tree's size.
    #[param(minimum = 1, maximum = 9223372036854775807_i64)]
    size: u64,
}

/// Audit path of one entry (any principal: how a buyer checks a receipt)
#[utoipa::path(get, path = "/v1/audit/proof/inclusion", tag = "audit", params(InclusionQuery), responses((status = 200, description = "OK", body = Object)))]
async fn inclusion(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
    q: web::Query<InclusionQuery>,
) -> Result<HttpResponse, ApiError> {
    in_range("index", q.index, 0, MAX_INDEX)?;
    in_range("size", q.size, 1, MAX_INDEX)?;
    // In range but not in this ledger (yet): a state, not a malformed request.
    let proof = sandbox
        .ledger
        .inclusion_proof(q.index, q.size)
        .ok_or_else(|| {
            ApiError::NotFound("no such entry in a tree of that size: index must be below size, and size at most the tree's".into())
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
    /// The older tree's size: at most `to`.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    from: u64,
    /// The newer tree's size: at most the tree's.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    to: u64,
}

/// Consistency proof between two tree sizes
#[utoipa::path(get, path = "/v1/audit/proof/consistency", tag = "audit", params(ConsistencyQuery), responses((status = 200, description = "OK", body = Object)))]
async fn consistency(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
    q: web::Query<ConsistencyQuery>,
) -> Result<HttpResponse, ApiError> {
    in_range("from", q.from, 0, MAX_INDEX)?;
    in_range("to", q.to, 0, MAX_INDEX)?;
    let proof = sandbox
        .ledger
        .consistency_proof(q.from, q.to)
        .ok_or_else(|| {
            ApiError::NotFound(
                "no such pair of trees: from must be at most to, and to at most the tree's size"
                    .into(),
            )
        })?;
    Ok(HttpResponse::Ok().json(json!({
        "from": q.from,
        "to": q.to,
        "proof": proof.iter().map(hex::encode).collect::<Vec<_>>(),
    })))
}
