//! The ledger entry of every query, answered or refused, as a typed event.

use super::Request;
use crate::app::Sandbox;
use crate::error::Error;
use crate::ledger::event::{Decision, Entry, LedgerEvent, QueryEvent};
use crate::ledger::{NewEntry, Receipt};
use crate::store::{Principal, ReleasedAnswer};
use crate::util::sha256_hex;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Facts gathered along the way, for the entry of a refusal as much as of an answer.
#[derive(Default)]
pub struct Trace {
    pub grant: Option<String>,
    pub purpose: Option<String>,
    pub datasets: BTreeSet<String>,
    /// Epsilon that stands even if the query now fails.
    pub epsilon_charged: f64,
    pub epsilon_by_dataset: BTreeMap<String, f64>,
}

/// A query event with who asked what (the SQL only as a hash); the outcome's
/// fields are filled in by the caller.
pub fn query_event(
    query_id: &str,
    principal: &Principal,
    request: &Request,
    trace: &Trace,
    decision: Decision,
) -> QueryEvent {
    QueryEvent {
        query_id: query_id.to_string(),
        principal: principal.id.clone(),
        grant: trace.grant.clone(),
        purpose: trace.purpose.clone(),
        datasets: trace.datasets.clone(),
        sql_sha256: sha256_hex(request.sql.as_bytes()),
        decision,
        plan_sha256: None,
        cached: false,
        release: None,
        usage: None,
        epsilon_charged: trace.epsilon_charged,
        epsilon_by_dataset: trace.epsilon_by_dataset.clone(),
        result_sha256: None,
        code: None,
        rule: None,
        wall_ms: None,
    }
}

pub async fn refusal(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &Request,
    query_id: &str,
    trace: &Trace,
    wall_ms: u64,
    error: &Error,
) -> Result<(), Error> {
    let mut event = query_event(query_id, principal, request, trace, Decision::Refused);
    event.code = Some(error.code().to_string());
    event.rule = error.rule().map(str::to_string);
    event.wall_ms = Some(wall_ms);
    append(sandbox, event, &request.sql, None).await.map(|_| ())
}

/// Appends the entry (with the answer it keeps for repetition, if any);
/// resolves once it is durable.
pub async fn append(
    sandbox: &Sandbox,
    event: QueryEvent,
    sql: &str,
    answer: Option<ReleasedAnswer>,
) -> Result<Receipt, Error> {
    let entry = NewEntry {
        entry: Entry::now(LedgerEvent::Query(event)),
        sql: Some(sql.to_string()),
        answer: answer.map(Arc::new),
    };
    sandbox
        .ledger
        .append(entry)
        .await
        .map_err(|e| Error::Internal(e.to_string()))
}
