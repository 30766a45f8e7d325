//! The error of the core: what the pipeline, policy, release and engine
//! refuse or fail with. It knows no transport; each front door maps it to
//! its wire once (`api::error` for HTTP).
//!
//! Messages are schema-level by construction: variants carry table, column,
//! site and rule names, never a data value. Engine errors (whose text can
//! quote data, e.g. a failed cast) are turned into [`Error::SqlError`] or
//! [`Error::ResourceLimit`] with a fixed message before they get here.

use serde_json::{Value, json};

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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidRequest(String),
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
    #[error("the sandbox is busy; try again shortly")]
    Overloaded,
    /// The client hung up while its query ran; the query was cancelled.
    #[error("the client closed the connection; the query was cancelled")]
    ClientClosed,
    /// A manifest that fails its schema or its data: each problem at its
    /// JSON Pointer.
    #[error("the manifest is invalid: {}", .0.iter().map(|(at, m)| format!("{at}: {m}")).collect::<Vec<_>>().join("; "))]
    InvalidManifest(Vec<(String, String)>),
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts the state (an id taken, a registration under way).
    #[error("{0}")]
    Conflict(String),
    #[error("internal error")]
    Internal(String),
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        Error::PolicyViolation(r)
    }
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Error::Forbidden(_) => "forbidden",
            Error::InvalidRequest(_) | Error::InvalidManifest(_) => "invalid_request",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::SqlError(_) => "sql_error",
            Error::StatementNotAllowed(_) => "statement_not_allowed",
            Error::UnknownTable(_) => "unknown_table",
            Error::NoGrant(_) => "no_grant",
            Error::PolicyViolation(_) => "policy_violation",
            Error::QuotaExceeded(_) => "quota_exceeded",
            Error::BudgetExhausted(_) => "budget_exhausted",
            Error::ResourceLimit(_) => "resource_limit",
            Error::Overloaded => "overloaded",
            Error::ClientClosed => "client_closed",
            Error::Internal(_) => "internal",
        }
    }

    /// The rule id recorded in the usage log for refusals.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Error::PolicyViolation(r) => Some(&r.rule),
            _ => None,
        }
    }

    pub fn details(&self) -> Value {
        match self {
            Error::PolicyViolation(r) => {
                let mut d = r.details.clone();
                d.insert("rule".into(), Value::from(r.rule.clone()));
                Value::Object(d)
            }
            Error::UnknownTable(t) => json!({ "table": t }),
            Error::InvalidManifest(problems) => json!({
                "problems": problems
                    .iter()
                    .map(|(path, message)| json!({ "path": path, "message": message }))
                    .collect::<Vec<_>>()
            }),
            _ => json!({}),
        }
    }

    /// The message a client may see: the cause of an internal error goes to
    /// the log, never to the client.
    pub fn public_message(&self) -> String {
        match self {
            Error::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }

    /// Every code [`Error::code`] can return.
    pub const CODES: [&'static str; 15] = [
        "forbidden",
        "not_found",
        "conflict",
        "invalid_request",
        "sql_error",
        "statement_not_allowed",
        "unknown_table",
        "no_grant",
        "policy_violation",
        "quota_exceeded",
        "budget_exhausted",
        "resource_limit",
        "overloaded",
        "client_closed",
        "internal",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_lists_exactly_the_codes_errors_have() {
        let s = || String::from("x");
        let all = [
            Error::Forbidden(s()),
            Error::InvalidRequest(s()),
            Error::SqlError(s()),
            Error::StatementNotAllowed(s()),
            Error::UnknownTable(s()),
            Error::NoGrant(s()),
            Error::PolicyViolation(Refusal::new("r", "m")),
            Error::QuotaExceeded(s()),
            Error::BudgetExhausted(s()),
            Error::ResourceLimit(s()),
            Error::Overloaded,
            Error::ClientClosed,
            Error::InvalidManifest(vec![(s(), s())]),
            Error::NotFound(s()),
            Error::Conflict(s()),
            Error::Internal(s()),
        ];
        let mut produced: Vec<&str> = all.iter().map(Error::code).collect();
        produced.sort();
        produced.dedup();
        let mut listed = Error::CODES.to_vec();
        listed.sort();
        assert_eq!(produced, listed);
        assert_eq!(
            Error::Internal("secret cause".into()).public_message(),
            "internal error"
        );
    }
}
