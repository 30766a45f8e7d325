//! The one mapping of errors to HTTP: status, headers and the JSON body
//! `{"error": {"code", "message", "details"}}`. The core's [`Error`] comes
//! through unchanged; the variants here exist only on the HTTP front door.

use crate::error::Error;
use actix_web::{HttpResponse, ResponseError, http::StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code (one of `ApiError::CODES`).
    code: &'static str,
    message: String,
    /// For policy_violation: rule, and table, column, class, site or
    /// prohibition where they apply. Never a data value.
    #[schema(value_type = Object)]
    details: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key")]
    Unauthenticated,
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    RateLimited(String),
    #[error(
        "a state change with a console session must come from the console and carry its CSRF token"
    )]
    CrossSite,
    #[error("method not allowed on this route")]
    MethodNotAllowed(Vec<&'static str>),
    #[error(transparent)]
    Core(#[from] Error),
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Core(e.into())
    }
}

impl From<crate::ledger::LedgerError> for ApiError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        ApiError::Core(e.into())
    }
}

impl From<crate::error::Refusal> for ApiError {
    fn from(r: crate::error::Refusal) -> Self {
        ApiError::Core(r.into())
    }
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> ApiError {
        Error::InvalidRequest(message.into()).into()
    }

    pub fn internal(cause: impl Into<String>) -> ApiError {
        Error::Internal(cause.into()).into()
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        Error::Forbidden(message.into()).into()
    }

    pub fn resource_limit(message: impl Into<String>) -> ApiError {
        Error::ResourceLimit(message.into()).into()
    }

    /// The HTTP status this error answers with (other doors map from it).
    pub fn http_status(&self) -> u16 {
        ResponseError::status_code(self).as_u16()
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::PayloadTooLarge(_) => "invalid_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::CrossSite => "csrf_rejected",
            ApiError::Core(e) => e.code(),
        }
    }

    pub fn body(&self) -> Value {
        let (message, details) = match self {
            ApiError::Core(e) => (e.public_message(), e.details()),
            other => (other.to_string(), json!({})),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
                details,
            },
        };
        serde_json::to_value(body).unwrap_or_else(|_| json!({ "error": { "code": "internal" } }))
    }

    /// Every code an HTTP error can carry: the core's and the front door's
    /// own, in the order the OpenAPI document lists them.
    pub const CODES: [&'static str; 19] = [
        "unauthenticated",
        "forbidden",
        "csrf_rejected",
        "invalid_request",
        "not_found",
        "conflict",
        "method_not_allowed",
        "sql_error",
        "statement_not_allowed",
        "unknown_table",
        "no_grant",
        "policy_violation",
        "quota_exceeded",
        "budget_exhausted",
        "rate_limited",
        "resource_limit",
        "overloaded",
        "client_closed",
        "internal",
    ];
}

fn core_status(e: &Error) -> StatusCode {
    match e {
        Error::Forbidden(_) | Error::NoGrant(_) | Error::PolicyViolation(_) => {
            StatusCode::FORBIDDEN
        }
        Error::InvalidRequest(_)
        | Error::InvalidManifest(_)
        | Error::SqlError(_)
        | Error::StatementNotAllowed(_) => StatusCode::BAD_REQUEST,
        Error::UnknownTable(_) | Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::QuotaExceeded(_) | Error::BudgetExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::ResourceLimit(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        // nginx's "client closed request": nobody reads it, the ledger records it.
        Error::ClientClosed => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::CrossSite => StatusCode::FORBIDDEN,
            ApiError::Core(e) => core_status(e),
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Core(Error::Internal(cause)) = self {
            tracing::error!(cause = %cause, "internal error");
        }
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthenticated => {
                response.insert_header(("WWW-Authenticate", "Bearer"));
            }
            ApiError::MethodNotAllowed(allowed) => {
                response.insert_header(("Allow", allowed.join(", ")));
            }
            ApiError::RateLimited(_) | ApiError::Core(Error::Overloaded) => {
                response.insert_header(("Retry-After", "1"));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_lists_exactly_the_codes_errors_have() {
        let s = || String::from("x");
        let mut all = vec![
            ApiError::Unauthenticated,
            ApiError::PayloadTooLarge(1),
            ApiError::NotFound(s()),
            ApiError::RateLimited(s()),
            ApiError::MethodNotAllowed(vec![]),
            ApiError::CrossSite,
        ];
        all.extend(Error::CODES.iter().map(|_| ApiError::internal(s())));
        let mut produced: Vec<&str> = all.iter().map(ApiError::code).collect();
        produced.extend(Error::CODES);
        produced.sort();
        produced.dedup();
        let mut listed = ApiError::CODES.to_vec();
        listed.sort();
        assert_eq!(produced, listed);
        for e in &all {
            assert_eq!(e.body()["error"]["code"], e.code());
        }
        let internal = ApiError::internal("the cause");
        assert_eq!(internal.body()["error"]["message"], "internal error");
        assert_eq!(internal.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
