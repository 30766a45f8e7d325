//! The trade over HTTP: principals and their keys, access requests under a
//! signed commitment, owners' decisions and operators, grant revocation
//! (see `app::market`).

use super::error::ApiError;
use super::{Authenticated, auth, json_body as body};
use crate::app::Sandbox;
use crate::app::market::{self, Approval, NewRequest};
use crate::app::review;
use crate::store::{Principal, Role};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/principals", web::post().to(add_principal))
        .route("/principals/me/keys/rotate", web::post().to(rotate_key))
        .route(
            "/principals/me/signing-keys",
            web::post().to(add_signing_key),
        )
        .route("/access-requests", web::post().to(file_request))
        .route("/access-requests", web::get().to(list_requests))
        .route("/access-requests/{id}", web::get().to(get_request))
        .route(
            "/access-requests/{id}/commitment",
            web::post().to(sign_request),
        )
        .route("/access-requests/{id}/approve", web::post().to(approve))
        .route("/access-requests/{id}/reject", web::post().to(reject))
        .route("/datasets/{id}/operators", web::post().to(delegate))
        .route(
            "/datasets/{id}/operators/{principal}",
            web::delete().to(undelegate),
        )
        .route("/grants/{id}/revoke", web::post().to(revoke_grant))
        .route("/evidence/{query_id}", web::get().to(evidence))
        .route("/settlements", web::get().to(settlement))
        .route("/queries/{query_id}", web::get().to(held_query))
        .route("/reviews", web::get().to(reviews))
        .route(
            "/reviews/{query_id}/approve",
            web::post().to(approve_answer),
        )
        .route("/reviews/{query_id}/reject", web::post().to(reject_answer));
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewPrincipal {
    #[schema(min_length = 1, max_length = 128)]
    id: String,
    #[schema(value_type = String)]
    role: Role,
    org: Option<String>,
    #[schema(pattern = "^[A-Z]{2}$")]
    region: String,
}

/// Register a principal (returns its first API key, once)
#[utoipa::path(post, path = "/v1/principals", tag = "principals", request_body = NewPrincipal, responses((status = 201, description = "Created", body = Object)))]
async fn add_principal(
    sandbox: web::Data<Sandbox>,
    _: Authenticated,
    bytes: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let new: NewPrincipal = body(&bytes)?;
    let principal = Principal {
        id: new.id,
        role: new.role,
        org: new.org,
        region: new.region,
    };
    let id = principal.id.clone();
    let key = market::add_principal(&sandbox, principal).await?;
    Ok(HttpResponse::Created().json(json!({ "id": id, "key": key })))
}

/// Rotate the caller's API key: a new key, the one used for this call revoked
#[utoipa::path(post, path = "/v1/principals/me/keys/rotate", tag = "principals", responses((status = 201, description = "Created", body = Object)))]
async fn rotate_key(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let current = req
        .headers()
        .get("Authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(auth::bearer)
        .map(crate::auth::key_hash)
        .ok_or(ApiError::Unauthenticated)?;
    let key = market::rotate_key(&sandbox, &who.0, current).await?;
    Ok(HttpResponse::Created().json(json!({ "key": key })))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SigningKey {
    /// base64 of the raw 32-byte Ed25519 public key.
    #[schema(min_length = 1)]
    public_key: String,
}

/// Register an Ed25519 public key the caller signs commitments with
#[utoipa::path(post, path = "/v1/principals/me/signing-keys", tag = "principals", request_body = SigningKey, responses((status = 201, description = "Created", body = Object)))]
async fn add_signing_key(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    bytes: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let key: SigningKey = body(&bytes)?;
    let key_id = market::add_signing_key(&sandbox, &who.0, &key.public_key).await?;
    Ok(HttpResponse::Created().json(json!({ "key_id": key_id })))
}

/// File an access request; it waits for the buyer's signature over `to_sign`
#[utoipa::path(post, path = "/v1/access-requests", tag = "market", request_body = NewRequest, responses((status = 201, description = "Created", body = Object)))]
async fn file_request(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    bytes: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let new: NewRequest = body(&bytes)?;
    let request = market::file_request(&sandbox, &who.0, new).await?;
    Ok(HttpResponse::Created().json(request))
}

/// Access requests the caller is a party to
#[utoipa::path(get, path = "/v1/access-requests", tag = "market", responses((status = 200, description = "OK", body = Object)))]
async fn list_requests(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let requests = market::visible_requests(&sandbox, &who.0)?;
    Ok(HttpResponse::Ok().json(json!({ "requests": requests })))
}

/// One access request the caller is a party to
#[utoipa::path(get, path = "/v1/access-requests/{id}", tag = "market", params(("id" = String, Path, description = "An access request")), responses((status = 200, description = "OK", body = Object)))]
async fn get_request(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    market::visible_requests(&sandbox, &who.0)?
        .into_iter()
        .find(|r| r.id == *id)
        .map(|r| HttpResponse::Ok().json(r))
        .ok_or_else(|| ApiError::NotFound(format!("no access request '{id}'")))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Commitment {
    #[schema(min_length = 1)]
    key_id: String,
    /// base64 of the Ed25519 signature over the request's `to_sign` bytes.
    #[schema(min_length = 1)]
    signature: String,
}

/// Sign the security-use commitment: the request becomes pending
#[utoipa::path(post, path = "/v1/access-requests/{id}/commitment", tag = "market", params(("id" = String, Path, description = "An access request")), request_body = Commitment, responses((status = 200, description = "OK", body = Object)))]
async fn sign_request(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
    bytes: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let c: Commitment = body(&bytes)?;
    let request = market::sign_request(&sandbox, &who.0, &id, &c.key_id, &c.signature).await?;
    Ok(HttpResponse::Ok().json(request))
}

/// Approve (possibly narrowed) the caller's datasets of a request
#[utoipa::path(post, path = "/v1/access-requests/{id}/approve", tag = "market", params(("id" = String, Path, description = "An access request")), request_body = Approval, responses((status = 200, description = "OK", body = Object)))]
async fn approve(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
    bytes: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let approval: Approval = if bytes.is_empty() {
        Approval::default()
    } else {
        body(&bytes)?
    };
    let request = market::decide(&sandbox, &who.0, &id, Some(approval), None).await?;
    Ok(HttpResponse::Ok().json(request))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Rejection {
    #[schema(min_length = 1, max_length = 2000)]
    reason: String,
}

/// Reject a request, with a reason
#[utoipa::path(post, path = "/v1/access-requests/{id}/reject", tag = "market", params(("id" = String, Path, description = "An access request")), request_body = Rejection, responses((status = 200, description = "OK", body = Object)))]
async fn reject(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
    bytes: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let r: Rejection = body(&bytes)?;
    if r.reason.trim().is_empty() {
        return Err(ApiError::invalid("a rejection needs a reason"));
    }
    let request = market::decide(&sandbox, &who.0, &id, None, Some(r.reason)).await?;
    Ok(HttpResponse::Ok().json(request))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Operator {
    #[schema(min_length = 1)]
    principal: String,
}

/// Delegate decisions on the owner's dataset to an operator principal
#[utoipa::path(post, path = "/v1/datasets/{id}/operators", tag = "market", params(("id" = String, Path, description = "The owner's dataset")), request_body = Operator, responses((status = 200, description = "OK", body = Object)))]
async fn delegate(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
    bytes: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let op: Operator = body(&bytes)?;
    market::set_operator(&sandbox, &who.0, &id, &op.principal, true).await?;
    Ok(HttpResponse::Ok().json(json!({ "dataset": id.as_str(), "operator": op.principal })))
}

/// Withdraw an operator's delegation
#[utoipa::path(delete, path = "/v1/datasets/{id}/operators/{principal}", tag = "market", params(("id" = String, Path, description = "The owner's dataset"), ("principal" = String, Path, description = "The operator")), responses((status = 200, description = "OK", body = Object)))]
async fn undelegate(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, operator) = path.into_inner();
    market::set_operator(&sandbox, &who.0, &id, &operator, false).await?;
    Ok(HttpResponse::Ok().json(json!({ "dataset": id, "operator": operator, "withdrawn": true })))
}

/// Revoke a grant, effective for the next query
#[utoipa::path(post, path = "/v1/grants/{id}/revoke", tag = "grants", params(("id" = String, Path, description = "A grant")), responses((status = 200, description = "OK", body = Object)))]
async fn revoke_grant(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    market::revoke_grant(&sandbox, &who.0, &id).await?;
    Ok(HttpResponse::Ok().json(json!({ "grant": id.as_str(), "status": "revoked" })))
}

/// Dispute evidence of an answered query, checkable offline (`frostglass verify --evidence`)
#[utoipa::path(get, path = "/v1/evidence/{query_id}", tag = "market", params(("query_id" = String, Path, description = "An answered query")), responses((status = 200, description = "OK", body = Object)))]
async fn evidence(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    query_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let bundle = market::evidence(&sandbox, &who.0, &query_id).await?;
    Ok(HttpResponse::Ok().json(bundle))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Period {
    /// The calendar month, `YYYY-MM`.
    #[param(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$")]
    period: String,
}

/// A month's settlement, signed by the ledger key (`frostglass verify --settlement`)
///
/// Auditors see every line, owners their organisation's, buyers their own.
#[utoipa::path(get, path = "/v1/settlements", tag = "market", params(Period), responses((status = 200, description = "OK", body = Object)))]
async fn settlement(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    params: web::Query<Period>,
) -> Result<HttpResponse, ApiError> {
    let statement = market::settlement(&sandbox, &who.0, &params.period).await?;
    Ok(HttpResponse::Ok().json(statement))
}

/// One of the caller's queries: a held answer's review status, or the answer once an owner approved it; any other query its recorded decision
#[utoipa::path(get, path = "/v1/queries/{query_id}", tag = "queries", params(("query_id" = String, Path, description = "A query of the caller")), responses((status = 200, description = "OK", body = Object)))]
async fn held_query(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    query_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(review::fetch(&sandbox, &who.0, &query_id)?))
}

/// Answers waiting for the caller's review: the released aggregate, never a row
#[utoipa::path(get, path = "/v1/reviews", tag = "market", responses((status = 200, description = "OK", body = Object)))]
async fn reviews(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(json!({ "waiting": review::waiting(&sandbox, &who.0)? })))
}

/// Release a held answer to its buyer
#[utoipa::path(post, path = "/v1/reviews/{query_id}/approve", tag = "market", params(("query_id" = String, Path, description = "A held answer")), responses((status = 200, description = "OK", body = Object)))]
async fn approve_answer(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    query_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    review::review(&sandbox, &who.0, &query_id, true).await?;
    Ok(HttpResponse::Ok().json(json!({ "query_id": query_id.as_str(), "status": "approved" })))
}

/// Reject a held answer: it is destroyed and never reaches the buyer
#[utoipa::path(post, path = "/v1/reviews/{query_id}/reject", tag = "market", params(("query_id" = String, Path, description = "A held answer")), responses((status = 200, description = "OK", body = Object)))]
async fn reject_answer(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
    query_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    review::review(&sandbox, &who.0, &query_id, false).await?;
    Ok(HttpResponse::Ok().json(json!({ "query_id": query_id.as_str(), "status": "rejected" })))
}
