//! The one error type every request path returns, and its single mapping to HTTP.
//!
//! Messages are schema-level by construction: variants carry table, column,
//! site and rule names, never a data value. Engine errors (whose text can
//! quote data, e.g. a failed cast) are turned into [`ApiError::SqlError`] or
//! [`ApiError::ResourceLimit`] with a fixed message before they get here.

use actix_web::{HttpResponse, ResponseError, http::StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

/// A refusal by the policy engine: the stable rule id plus schema-level facts.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub rule: String,
    pub message: String,
    pub details: serde_json::Map<String, Value>,
}

impl Refusal {
    pub fn new(rule: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal {
            rule: rule.into(),
            message: message.into(),
            details: serde_json::Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

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
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    SqlError(String),
    #[error("{0}")]
    StatementNotAllowed(String),
    #[error("table '{0}' does not exist in the catalog")]
    UnknownTable(String),
    #[error("{0}")]
    NoGrant(String),
    #[error("{}", .0.message)]
    PolicyViolation(Refusal),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    BudgetExhausted(String),
    #[error("{0}")]
    ResourceLimit(String),
    #[error("{0}")]
    RateLimited(String),
    #[error("the sandbox is busy; try again shortly")]
    Overloaded,
    /// The client hung up while its query ran; the query was cancelled.
    #[error("the client closed the connection; the query was cancelled")]
    ClientClosed,
    #[error("method not allowed on this route")]
    MethodNotAllowed(Vec<&'static str>),
    #[error("internal error")]
    Internal(String),
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError::PolicyViolation(r)
    }
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::InvalidRequest(_) | ApiError::PayloadTooLarge(_) => "invalid_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::SqlError(_) => "sql_error",
            ApiError::StatementNotAllowed(_) => "statement_not_allowed",
            ApiError::UnknownTable(_) => "unknown_table",
            ApiError::NoGrant(_) => "no_grant",
            ApiError::PolicyViolation(_) => "policy_violation",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::BudgetExhausted(_) => "budget_exhausted",
            ApiError::ResourceLimit(_) => "resource_limit",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Overloaded => "overloaded",
            ApiError::ClientClosed => "client_closed",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The rule id recorded in the usage log for refusals.
    pub fn rule(&self) -> Option<&str> {
        match self {
            ApiError::PolicyViolation(r) => Some(&r.rule),
            _ => None,
        }
    }

    pub fn details(&self) -> Value {
        match self {
            ApiError::PolicyViolation(r) => {
                let mut d = r.details.clone();
                d.insert("rule".into(), Value::from(r.rule.clone()));
                Value::Object(d)
            }
            ApiError::UnknownTable(t) => json!({ "table": t }),
            _ => json!({}),
        }
    }

    pub fn body(&self) -> Value {
        let message = match self {
            // The cause of an internal error goes to the log, never to the client.
            ApiError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
                details: self.details(),
            },
        };
        serde_json::to_value(body).unwrap_or_else(|_| json!({ "error": { "code": "internal" } }))
    }

    /// Every code [`ApiError::code`] can return.
    pub const CODES: [&'static str; 17] = [
        "unauthenticated",
        "forbidden",
        "invalid_request",
        "not_found",
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

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::NoGrant(_) | ApiError::PolicyViolation(_) => {
                StatusCode::FORBIDDEN
            }
            ApiError::InvalidRequest(_)
            | ApiError::SqlError(_)
            | ApiError::StatementNotAllowed(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) | ApiError::UnknownTable(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QuotaExceeded(_) | ApiError::BudgetExhausted(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::ResourceLimit(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            // nginx's "client closed request": nobody reads it, the ledger records it.
            ApiError::ClientClosed => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) = self {
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
            ApiError::RateLimited(_) | ApiError::Overloaded => {
                response.insert_header(("Retry-After", "1"));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_lists_exactly_the_codes_errors_have() {
        let s = || String::from("x");
        let all = [
            ApiError::Unauthenticated,
            ApiError::Forbidden(s()),
            ApiError::InvalidRequest(s()),
            ApiError::PayloadTooLarge(1),
            ApiError::NotFound(s()),
            ApiError::SqlError(s()),
            ApiError::StatementNotAllowed(s()),
            ApiError::UnknownTable(s()),
            ApiError::NoGrant(s()),
            ApiError::PolicyViolation(Refusal::new("r", "m")),
            ApiError::QuotaExceeded(s()),
            ApiError::BudgetExhausted(s()),
            ApiError::ResourceLimit(s()),
            ApiError::RateLimited(s()),
            ApiError::Overloaded,
            ApiError::ClientClosed,
            ApiError::MethodNotAllowed(vec![]),
            ApiError::Internal(s()),
        ];
        let mut produced: Vec<&str> = all.iter().map(ApiError::code).collect();
        produced.sort();
        produced.dedup();
        let mut listed = ApiError::CODES.to_vec();
        listed.sort();
        assert_eq!(produced, listed);
        for e in &all {
            assert_eq!(e.body()["error"]["code"], e.code());
        }
    }
}
