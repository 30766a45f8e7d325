//! Which of a buyer's grants a query runs under.

use super::Request;
use crate::app::Sandbox;
use crate::catalog::Dataset;
use crate::error::Error;
use crate::store::{Grant, Principal};
use crate::util::now_rfc3339;
use std::sync::Arc;

/// The buyer's active grant that covers every named table (and the requested grant or purpose, if any).
pub fn choose(
    sandbox: &Sandbox,
    principal: &Principal,
    request: &Request,
    named: &[Arc<Dataset>],
) -> Result<Grant, Error> {
    let now = now_rfc3339();
    let grants = match request.grant.as_deref() {
        Some(id) => Vec::from_iter(sandbox.store.grant_of(&principal.id, id)?),
        None => sandbox.store.grants_of(&principal.id)?,
    };
    let candidates: Vec<&Grant> = grants
        .iter()
        .filter(|g| g.is_active(&now))
        .filter(|g| request.grant.as_deref().is_none_or(|id| id == g.id))
        .filter(|g| request.purpose.as_deref().is_none_or(|p| p == g.purpose))
        .collect();
    if let Some(g) = candidates
        .iter()
        .find(|g| named.iter().all(|d| g.covers(d.id())))
    {
        return Ok((*g).clone());
    }
    let uncovered: Vec<&str> = named
        .iter()
        .map(|d| d.id())
        .filter(|d| !candidates.iter().any(|g| g.covers(d)))
        .collect();
    let message = match (request.grant.as_deref(), uncovered.is_empty()) {
        (Some(id), _) if candidates.is_empty() => {
            format!("grant '{id}' is not an active grant of yours for this purpose")
        }
        (_, false) => format!("no active grant covers: {}", uncovered.join(", ")),
        (_, true) => "no single active grant covers all tables of the query".to_string(),
    };
    Err(Error::NoGrant(message))
}
