//! The gate's decisions on a principal's statements, kept in the sandbox's
//! memo for when the same principal sends the same statement again
//! (dashboards and drivers repeat theirs): parsing, planning, the policy
//! check and the release split take longer than running a small aggregate.
//! A decision is taken up again only while everything it rests on holds
//! (see `still_holds` in the pipeline): the very catalog snapshot, and its
//! grant unchanged and active. Refusals are not kept; they go through the
//! gate each time.

use super::Request;
use super::gate::Gated;
use crate::app::Sandbox;
use crate::store::Principal;
use std::sync::Arc;

/// Everything of a request and its principal that the gate reads besides
/// the catalog and the grant, as one unambiguous string.
fn key(principal: &Principal, request: &Request) -> String {
    serde_json::json!([
        "plan",
        principal.id,
        principal.region,
        request.sql,
        request.grant,
        request.purpose,
        format!("{:?}", request.dp),
    ])
    .to_string()
}

/// The decision kept for this principal's request, if any (not yet checked
/// against the catalog and grant of now).
pub fn recall(sandbox: &Sandbox, principal: &Principal, request: &Request) -> Option<Arc<Gated>> {
    sandbox.memo.get(&key(principal, request))
}

/// Keeps a new decision, and drops those made on an older catalog: they
/// can never be taken up again, and each would hold its snapshot (with
/// the in-memory copies of datasets since updated or withdrawn) alive.
pub fn keep(sandbox: &Sandbox, principal: &Principal, request: &Request, gated: &Arc<Gated>) {
    sandbox
        .memo
        .retain::<Gated>(|kept| Arc::ptr_eq(&kept.catalog, &gated.catalog));
    sandbox.memo.put(key(principal, request), gated.clone());
}
