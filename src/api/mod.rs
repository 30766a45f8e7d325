//! HTTP API v1: routes, authentication and the translation of pipeline
//! outcomes into responses. Errors become JSON in one place
//! ([`error::ApiError`]'s `ResponseError`).

pub mod audit;
pub mod auth;
pub mod connection;
pub mod console;
pub mod datasets;
pub mod error;
pub mod market;
pub mod openapi;
pub mod server;
pub mod telemetry;
pub mod throttle;
pub mod usage;

use crate::app::Sandbox;
use crate::pipeline::{self, Outcome};
use crate::release::encode as format;
use crate::store::{Principal, Role};
use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use error::ApiError;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use throttle::Throttle;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .configure(console::routes)
        .route("/openapi.json", web::get().to(openapi))
        .service(
            web::scope("/v1")
                .configure(datasets::routes)
                .configure(market::routes)
                .route("/queries", web::post().to(post_query))
                .route("/grants", web::get().to(list_grants))
                .configure(audit::routes)
                .configure(usage::routes),
        );
}

const ANY_ROLE: &[Role] = &[Role::Owner, Role::Buyer, Role::Auditor, Role::Admin];
const BUYERS: &[Role] = &[Role::Buyer];
const OWNERS: &[Role] = &[Role::Owner];
const OWNERS_AND_AUDITORS: &[Role] = &[Role::Owner, Role::Auditor, Role::Admin];
const OWNERS_AND_ADMINS: &[Role] = &[Role::Owner, Role::Admin];
const ADMINS: &[Role] = &[Role::Admin];
const AUDITORS: &[Role] = &[Role::Auditor, Role::Admin];

/// Every route of the API and the roles that may call it (empty: no key
/// needed). Roles are enforced here, in one place, by [`Authenticated`]; the
/// 405 answers and the OpenAPI test read this table too.
pub const ROUTES: &[(&str, &str, &[Role])] = &[
    ("GET", "/healthz", &[]),
    ("GET", "/openapi.json", &[]),
    ("GET", "/v1/datasets", ANY_ROLE),
    ("POST", "/v1/datasets", OWNERS),
    ("GET", "/v1/datasets/{id}", ANY_ROLE),
    ("PUT", "/v1/datasets/{id}", OWNERS),
    ("DELETE", "/v1/datasets/{id}", OWNERS),
    ("GET", "/v1/datasets/{id}/preview", ANY_ROLE),
    ("GET", "/v1/datasets/{id}/usage", OWNERS_AND_AUDITORS),
    ("POST", "/v1/datasets/{id}/operators", OWNERS),
    ("DELETE", "/v1/datasets/{id}/operators/{principal}", OWNERS),
    ("POST", "/v1/principals", ADMINS),
    ("POST", "/v1/principals/me/keys/rotate", ANY_ROLE),
    ("POST", "/v1/principals/me/signing-keys", ANY_ROLE),
    ("POST", "/v1/access-requests", BUYERS),
    ("GET", "/v1/access-requests", ANY_ROLE),
    ("GET", "/v1/access-requests/{id}", ANY_ROLE),
    ("POST", "/v1/access-requests/{id}/commitment", BUYERS),
    ("POST", "/v1/access-requests/{id}/approve", OWNERS),
    ("POST", "/v1/access-requests/{id}/reject", OWNERS),
    ("POST", "/v1/grants/{id}/revoke", OWNERS_AND_ADMINS),
    ("GET", "/v1/evidence/{query_id}", ANY_ROLE),
    ("GET", "/v1/settlements", ANY_ROLE),
    ("GET", "/v1/queries/{query_id}", BUYERS),
    ("GET", "/v1/reviews", OWNERS_AND_ADMINS),
    ("POST", "/v1/reviews/{query_id}/approve", OWNERS),
    ("POST", "/v1/reviews/{query_id}/reject", OWNERS),
    ("POST", "/v1/queries", BUYERS),
    ("GET", "/v1/grants", ANY_ROLE),
    ("GET", "/v1/usage", ANY_ROLE),
    ("GET", "/v1/audit/entries", AUDITORS),
    ("GET", "/v1/audit/head", AUDITORS),
    ("GET", "/v1/audit/public-key", AUDITORS),
    // Any principal: a buyer checks its own receipt with it. A path is
    // hashes only, and the tree's size is on every receipt anyway.
    ("GET", "/v1/audit/proof/inclusion", ANY_ROLE),
    ("GET", "/v1/audit/proof/consistency", AUDITORS),
    ("POST", "/v1/audit/sql", AUDITORS),
    ("GET", "/v1/audit/verify", AUDITORS),
    ("POST", "/v1/audit/verify", AUDITORS),
    ("GET", "/v1/refusals", ANY_ROLE),
    ("GET", "/v1/queries", BUYERS),
];

/// The roles allowed on the route a request matched; none if it matched none.
fn allowed_roles(req: &HttpRequest) -> &'static [Role] {
    let pattern = req.match_pattern();
    ROUTES
        .iter()
        .find(|(method, path, _)| {
            *method == req.method().as_str() && pattern.as_deref() == Some(*path)
        })
        .map_or(&[], |(_, _, roles)| *roles)
}

/// No route matched: 405 with the allowed methods where the path exists, else 404.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    let allowed: Vec<&'static str> = ROUTES
        .iter()
        .filter(|(_, pattern, _)| actix_web::dev::ResourceDef::new(*pattern).is_match(req.path()))
        .map(|(method, _, _)| *method)
        .collect();
    let error = if allowed.is_empty() {
        ApiError::NotFound("no such route".into())
    } else {
        ApiError::MethodNotAllowed(allowed)
    };
    actix_web::ResponseError::error_response(&error)
}

/// This document
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, description = "OK", body = Object)))]
async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(openapi::document())
}

/// Liveness
#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, description = "OK", body = Object)))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// The principal behind a request's API key.
pub struct Authenticated(pub Principal);

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let sandbox = req.app_data::<web::Data<Sandbox>>().cloned();
        let throttle = req.app_data::<web::Data<Throttle>>().cloned();
        let cert = req.conn_data::<auth::ClientCert>().cloned();
        let roles = allowed_roles(req);
        let key_hash = credentials(req);
        Box::pin(async move {
            let sandbox = sandbox.ok_or_else(|| ApiError::internal("sandbox state missing"))?;
            let principal = principal_of(&sandbox, key_hash?, cert).await?;
            if !roles.contains(&principal.role) {
                return Err(ApiError::forbidden(format!(
                    "a principal with role {} may not call this route",
                    principal.role.as_str()
                )));
            }
            let limits = &sandbox.settings.limits;
            let throttle = throttle.ok_or_else(|| ApiError::internal("throttle state missing"))?;
            throttle.admit(
                &principal.id,
                limits.requests_per_second,
                limits.request_burst,
            )?;
            Ok(Authenticated(principal))
        })
    }
}

/// The hash of the API key a request presents: in its `Authorization`
/// header, or held by the console session its cookie names (state changes
/// then pass [`console::guard_state_change`]).
fn credentials(req: &HttpRequest) -> Result<String, ApiError> {
    let bearer = req
        .headers()
        .get("Authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(auth::bearer);
    if let Some(token) = bearer {
        return Ok(crate::auth::key_hash(token));
    }
    let (_, session) = console::session_of(req).ok_or(ApiError::Unauthenticated)?;
    if !req.method().is_safe() {
        console::guard_state_change(req, &session)?;
    }
    Ok(session.key_hash)
}

/// The principal whose API key has hash `key_hash`; a key bound to a client
/// certificate only counts over a connection that presented it.
async fn principal_of(
    sandbox: &Sandbox,
    key_hash: String,
    cert: Option<auth::ClientCert>,
) -> Result<Principal, ApiError> {
    let store = sandbox.store.clone();
    let principal = web::block(move || store.principal_by_key_hash(&key_hash))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let (principal, bound) = principal.ok_or(ApiError::Unauthenticated)?;
    if let Some(bound) = bound
        && cert.as_ref().is_none_or(|c| c.spki_sha256 != bound)
    {
        return Err(ApiError::Unauthenticated);
    }
    Ok(principal)
}

/// Ids of the datasets `principal`'s organisation owns.
fn owned_ids(sandbox: &Sandbox, principal: &Principal) -> Vec<String> {
    sandbox
        .catalog
        .current()
        .datasets
        .values()
        .filter(|d| principal.org.as_deref() == Some(d.manifest.owner.as_str()))
        .map(|d| d.id().to_string())
        .collect()
}

/// Grants with today's use, remaining quotas and privacy budget
#[utoipa::path(get, path = "/v1/grants", tag = "grants", responses((status = 200, description = "OK", body = Object)))]
async fn list_grants(
    sandbox: web::Data<Sandbox>,
    who: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let principal = who.0;
    let s = sandbox.clone();
    let catalog_owned = owned_ids(&sandbox, &principal);
    let default_epsilon = sandbox.settings.limits.default_grant_epsilon;
    let grants = web::block(move || -> Result<_, crate::error::Error> {
        let all = match principal.role {
            Role::Buyer => s.store.grants_of(&principal.id)?,
            Role::Owner => {
                let mut out = Vec::new();
                for d in &catalog_owned {
                    for g in s.store.grants_on(d)? {
                        if !out.iter().any(|o: &crate::store::Grant| o.id == g.id) {
                            out.push(g);
                        }
                    }
                }
                out
            }
            Role::Auditor | Role::Admin => s.store.all_grants()?,
        };
        let catalog = s.catalog.current();
        let mut rows = Vec::with_capacity(all.len());
        for g in all {
            let used = match s.quotas.used(&g.id) {
                Some(used) => used,
                None => s.ledger.used_today(&g.id)?,
            };
            let left = |limit: Option<u64>, used: u64| limit.map(|l| l.saturating_sub(used));
            let limit = g.epsilon.unwrap_or(default_epsilon);
            let budget = format!("grant:{}", g.id);
            let spent = s
                .budgets
                .spent_or_load(&budget, || s.ledger.epsilon_spent(&budget))?;
            rows.push(json!({
                "grant": g,
                "budget": { "epsilon_limit": limit, "epsilon_spent": spent, "epsilon_remaining": (limit - spent).max(0.0) },
                "used_today": used,
                "subscription": crate::pipeline::charge::subscription(&catalog, &g),
                "remaining_today": {
                    "queries": left(g.queries_per_day, used.queries),
                    "rows": left(g.rows_per_day, used.rows),
                    "bytes": left(g.bytes_per_day, used.bytes),
                },
            }));
        }
        Ok(rows)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(json!({ "grants": grants })))
}

/// A JSON body of type `T`; a malformed one is `invalid_request`.
fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the body is not a valid request: {e}")))
}

/// Reads a body up to `limit` bytes; larger bodies are refused without reading them all.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::invalid("the request body could not be read"))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An answer's encoding on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Json,
    Csv,
    Arrow,
}

/// `POST /v1/queries`, as validated against `schemas/query_request.schema.json`.
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
    #[serde(default)]
    pub dp: crate::release::dp::Tightening,
}

impl QueryRequest {
    fn into_pipeline(self) -> pipeline::Request {
        pipeline::Request {
            sql: self.sql,
            grant: self.grant,
            purpose: self.purpose,
            dry_run: self.dry_run,
            run_ahead: false,
            dp: self.dp,
        }
    }
}

fn parse_query_request(sandbox: &Sandbox, body: &[u8]) -> Result<QueryRequest, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::invalid("the body is not UTF-8"))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    if let Some(problem) = sandbox.schemas.query_request.iter_errors(&value).next() {
        let at = problem.instance_path().as_str().to_string();
        return Err(ApiError::invalid(format!(
            "{}: {}",
            if at.is_empty() { "/" } else { &at },
            problem.masked()
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::invalid(e.to_string()))
}

fn negotiate(req: &HttpRequest, requested: Option<Format>) -> Format {
    if let Some(f) = requested {
        return f;
    }
    let accept = req
        .headers()
        .get("Accept")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if accept.contains("application/vnd.apache.arrow.stream") {
        Format::Arrow
    } else if accept.contains("text/csv") {
        Format::Csv
    } else {
        Format::Json
    }
}

/// Run SQL under the policies; answers released aggregates with a receipt
#[utoipa::path(
    post,
    path = "/v1/queries",
    tag = "queries",
    // The schema is replaced by the one requests are validated with.
    request_body(content = Object, content_type = "application/json"),
    responses((
        status = 200,
        description = "Released answer (JSON, CSV or an Arrow IPC stream per `format` or Accept); or, for a dry run, the decision and its outline",
        content(
            (Object = "application/json"),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.arrow.stream"),
        )
    ))
)]
async fn post_query(
    sandbox: web::Data<Sandbox>,
    throttle: web::Data<Throttle>,
    who: Authenticated,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, sandbox.settings.limits.max_body_bytes).await?;
    let request = parse_query_request(&sandbox, &body)?;
    let format = negotiate(&req, request.format);
    let _running = throttle.start(
        &who.0.id,
        sandbox.settings.limits.max_concurrent_queries_per_principal,
    )?;
    let sandbox = sandbox.into_inner();
    let client_gone = connection::gone(&req);
    let outcome = sandbox
        .runtime
        .spawn(pipeline::run(
            sandbox.clone(),
            who.0,
            request.into_pipeline(),
            client_gone,
        ))
        .await
        .map_err(|e| ApiError::internal(format!("query task failed: {e}")))??;
    let answer = match outcome {
        Outcome::DryRun(decided) => return Ok(HttpResponse::Ok().json(&decided.outline)),
        Outcome::Held(query_id) => {
            return Ok(HttpResponse::Accepted()
                .insert_header(("Location", format!("/v1/queries/{query_id}")))
                .json(json!({ "query_id": query_id, "status": "held" })));
        }
        Outcome::Answer(a) => a,
    };
    match format {
        Format::Json => Ok(HttpResponse::Ok()
            .content_type("application/json")
            .body(answer.body()?)),
        Format::Csv | Format::Arrow => {
            let (content_type, bytes) = match format {
                Format::Csv => ("text/csv; charset=utf-8", format::csv(&answer.batches)?),
                _ => (
                    "application/vnd.apache.arrow.stream",
                    format::arrow_stream(&answer.schema, &answer.batches)?,
                ),
            };
            Ok(HttpResponse::Ok()
                .content_type(content_type)
                .insert_header(("X-Frostglass-Query-Id", answer.query_id.clone()))
                .insert_header(("X-Frostglass-Release", meta(&answer.release)))
                .insert_header(("X-Frostglass-Usage", meta(&answer.usage)))
                .insert_header(("X-Frostglass-Budget", meta(&answer.budget)))
                .insert_header(("X-Frostglass-Receipt", meta(&answer.receipt)))
                .body(bytes))
        }
    }
}

/// Response metadata as one header value.
fn meta<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
