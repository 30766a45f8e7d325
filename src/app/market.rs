//! The trade: a buyer's access request under a signed security-use
//! commitment, each owner's decision (or an authorised operator's on its
//! behalf), and the grant made once every owner approved. Every state
//! change is one transaction with the ledger entry that records it.

use super::Sandbox;
use crate::catalog::{Catalog, Dataset, Manifest};
use crate::error::Error;
use crate::ledger::event::LedgerEvent;
use crate::policy::access;
use crate::policy::check::Requester;
use crate::store::{self, NewGrant, Principal, Role, StoreError};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The commitment of a dataset whose manifest states none.
pub const DEFAULT_COMMITMENT: &str = "I will use the released results only for the stated purpose and period, \
not attempt to re-identify any person or to combine results to single anyone out, not pass them \
on to a third party, and accept that every use is recorded in the usage ledger.";

/// The commitment text a buyer accepts for a dataset, and its SHA-256.
pub fn commitment(manifest: &Manifest) -> (&str, String) {
    let text = manifest.commitment.as_deref().unwrap_or(DEFAULT_COMMITMENT);
    (text, crate::util::sha256_hex(text.as_bytes()))
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queries_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_day: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Period {
    pub from: String,
    pub to: String,
}

/// What a buyer files.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRequest {
    pub datasets: Vec<String>,
    pub purpose: String,
    pub period: Period,
    #[serde(default)]
    pub quotas: Quotas,
    pub epsilon: Option<f64>,
}

/// An owner's approval; each field may only narrow what was asked.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    #[serde(default)]
    pub quotas: Option<Quotas>,
    pub epsilon: Option<f64>,
    /// An earlier end of the period.
    pub period_to: Option<String>,
    pub cross_border_assessment: Option<String>,
    /// Every answer under the grant waits for its owners' review.
    #[serde(default)]
    pub review: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    pub dataset: String,
    pub approved: bool,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_border_assessment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub review: bool,
    pub at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    AwaitingSignature,
    Pending,
    Approved,
    Rejected,
}

impl RequestStatus {
    fn as_str(self) -> &'static str {
        match self {
            RequestStatus::AwaitingSignature => "awaiting_signature",
            RequestStatus::Pending => "pending",
            RequestStatus::Approved => "approved",
            RequestStatus::Rejected => "rejected",
        }
    }
}

/// An access request as stored and shown to its parties.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: String,
    pub buyer: String,
    pub datasets: Vec<String>,
    pub purpose: String,
    pub period: Period,
    pub quotas: Quotas,
    pub epsilon: Option<f64>,
    pub status: RequestStatus,
    /// Dataset → SHA-256 of the commitment text the buyer signs for it.
    pub commitments: BTreeMap<String, String>,
    /// The exact bytes to sign, base64.
    pub to_sign: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
    pub decisions: Vec<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Signature {
    pub key_id: String,
    /// base64 of the 64-byte Ed25519 signature.
    pub signature: String,
}

/// The canonical message a buyer signs: a fixed header, then one
/// `key: value` line each for the request, buyer, purpose and period, and
/// one `dataset: <id> sha256:<commitment digest>` line per dataset in id
/// order; every line ends with `\n`.
pub fn canonical_message(
    id: &str,
    buyer: &str,
    purpose: &str,
    period: &Period,
    commitments: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut text = format!(
        "frostglass security-use commitment v1\nrequest: {id}\nbuyer: {buyer}\npurpose: {purpose}\nperiod: {}/{}\n",
        period.from, period.to
    );
    for (dataset, digest) in commitments {
        text.push_str(&format!("dataset: {dataset} sha256:{digest}\n"));
    }
    text.into_bytes()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str, what: &str) -> Result<Vec<u8>, Error> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| Error::InvalidRequest(format!("{what} is not base64")))
}

fn parse_time(t: &str, what: &str) -> Result<chrono::DateTime<chrono::FixedOffset>, Error> {
    chrono::DateTime::parse_from_rfc3339(t)
        .map_err(|_| Error::InvalidRequest(format!("{what} is not an RFC 3339 time")))
}

/// Registers the caller's Ed25519 public key (raw 32 bytes, base64).
pub async fn add_signing_key(
    sandbox: &Sandbox,
    principal: &Principal,
    public_key_b64: &str,
) -> Result<String, Error> {
    let key = unb64(public_key_b64, "public_key")?;
    if key.len() != 32 {
        return Err(Error::InvalidRequest(
            "public_key must be a raw 32-byte Ed25519 key".into(),
        ));
    }
    let who = principal.id.clone();
    let (_, key_id) = sandbox
        .ledger
        .commit(move |tx| {
            let key_id = store::add_signing_key(tx, &who, &key)?;
            let event = LedgerEvent::SigningKeyAdded {
                principal: who,
                key_id: key_id.clone(),
            };
            Ok((vec![event], key_id))
        })
        .await?;
    Ok(key_id)
}

/// Files a buyer's request: checked against the policies as a query would
/// be (purpose, data level, cross-border rules, with the same rule ids), and
/// waiting for the buyer's signature over the returned bytes.
pub async fn file_request(
    sandbox: &Sandbox,
    buyer: &Principal,
    new: NewRequest,
) -> Result<AccessRequest, Error> {
    if new.datasets.is_empty() {
        return Err(Error::InvalidRequest("name at least one dataset".into()));
    }
    let (from, to) = (
        parse_time(&new.period.from, "period.from")?,
        parse_time(&new.period.to, "period.to")?,
    );
    if from >= to {
        return Err(Error::InvalidRequest(
            "period.from must come before period.to".into(),
        ));
    }
    if new.epsilon.is_some_and(|e| !(e > 0.0 && e.is_finite())) {
        return Err(Error::InvalidRequest("epsilon must be positive".into()));
    }
    sandbox.policies.check_purpose(&new.purpose)?;
    sandbox.policies.check_principal(&buyer.id)?;
    let catalog = sandbox.catalog.current();
    let mut commitments = BTreeMap::new();
    for id in &new.datasets {
        let d = catalog
            .get(id)
            .ok_or_else(|| Error::UnknownTable(id.clone()))?;
        // An assessment can still come with the owner's approval.
        let requester = Requester {
            region: &buyer.region,
            cross_border_assessment: true,
        };
        access::dataset_access(&sandbox.policies, &requester, d)?;
        commitments.insert(id.clone(), commitment(&d.manifest).1);
    }
    let id = crate::util::new_id("req");
    let to_sign = canonical_message(&id, &buyer.id, &new.purpose, &new.period, &commitments);
    let mut datasets = new.datasets.clone();
    datasets.sort();
    datasets.dedup();
    let request = AccessRequest {
        id: id.clone(),
        buyer: buyer.id.clone(),
        datasets,
        purpose: new.purpose,
        period: new.period,
        quotas: new.quotas,
        epsilon: new.epsilon,
        status: RequestStatus::AwaitingSignature,
        commitments,
        to_sign: b64(&to_sign),
        signature: None,
        decisions: Vec::new(),
        grant: None,
        created_at: crate::util::now_rfc3339(),
    };
    let saved = request.clone();
    sandbox
        .ledger
        .commit(move |tx| {
            save(tx, &saved)?;
            let event = LedgerEvent::AccessRequested {
                request: saved.id.clone(),
                buyer: saved.buyer.clone(),
                datasets: saved.datasets.clone(),
                purpose: saved.purpose.clone(),
            };
            Ok((vec![event], ()))
        })
        .await?;
    Ok(request)
}

fn save(tx: &rusqlite::Connection, request: &AccessRequest) -> Result<(), StoreError> {
    let json = serde_json::to_string(request).map_err(|e| StoreError::Conflict(e.to_string()))?;
    store::save_access_request(tx, &request.id, &json, request.status.as_str())
}

fn load(tx: &rusqlite::Connection, id: &str) -> Result<AccessRequest, StoreError> {
    let json = store::access_request(tx, id)?
        .ok_or_else(|| StoreError::NotFound(format!("no access request '{id}'")))?;
    serde_json::from_str(&json)
        .map_err(|e| StoreError::Conflict(format!("access request '{id}' is unreadable: {e}")))
}

/// The buyer's signature over the request's bytes, with a key it
/// registered; the request becomes pending. Refused if a dataset's
/// commitment changed since the request was filed (its owner published a
/// new one: the buyer must file again and sign that).
pub async fn sign_request(
    sandbox: &Sandbox,
    buyer: &Principal,
    id: &str,
    key_id: &str,
    signature_b64: &str,
) -> Result<AccessRequest, Error> {
    let signature = unb64(signature_b64, "signature")?;
    let catalog = sandbox.catalog.current();
    let current: BTreeMap<String, String> = catalog
        .datasets
        .values()
        .map(|d| (d.id().to_string(), commitment(&d.manifest).1))
        .collect();
    let (who, id, key_id) = (buyer.id.clone(), id.to_string(), key_id.to_string());
    let (_, outcome) = sandbox
        .ledger
        .commit(move |tx| {
            let mut request = load(tx, &id)?;
            if request.buyer != who {
                return Ok((Vec::new(), Err(Error::NotFound(format!("no access request '{id}'")))));
            }
            if request.status != RequestStatus::AwaitingSignature {
                let message = format!("access request '{id}' is {} already", request.status.as_str());
                return Ok((Vec::new(), Err(Error::Conflict(message))));
            }
            for (dataset, digest) in &request.commitments {
                if current.get(dataset) != Some(digest) {
                    let message = format!(
                        "the commitment of '{dataset}' changed since the request was filed; file a new request"
                    );
                    return Ok((Vec::new(), Err(Error::Conflict(message))));
                }
            }
            let Some(public_key) = store::signing_key(tx, &who, &key_id)? else {
                let message = format!("'{key_id}' is not a signing key of yours");
                return Ok((Vec::new(), Err(Error::Forbidden(message))));
            };
            let message = unb64(&request.to_sign, "to_sign").unwrap_or_default();
            let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public_key);
            if key.verify(&message, &signature).is_err() {
                let refused = Error::Forbidden("the signature does not verify over the request's bytes".into());
                return Ok((Vec::new(), Err(refused)));
            }
            request.status = RequestStatus::Pending;
            request.signature = Some(Signature {
                key_id: key_id.clone(),
                signature: b64(&signature),
            });
            save(tx, &request)?;
            let event = LedgerEvent::CommitmentSigned {
                request: id.clone(),
                key_id,
                message_sha256: crate::util::sha256_hex(&message),
                signature: b64(&signature),
            };
            Ok((vec![event], Ok(request)))
        })
        .await?;
    outcome
}

/// Whether `principal` decides on `dataset`: its owner, or an operator the
/// owner delegated to. Returns on whose behalf (the owner's organisation,
/// for an operator).
fn decides_for(
    tx: &rusqlite::Connection,
    principal: &Principal,
    dataset: &Dataset,
) -> Result<Option<Option<String>>, StoreError> {
    let owner = &dataset.manifest.owner;
    if principal.org.as_deref() == Some(owner.as_str()) {
        return Ok(Some(None));
    }
    if store::is_operator(tx, dataset.id(), &principal.id)? {
        return Ok(Some(Some(owner.clone())));
    }
    Ok(None)
}

/// An owner's (or operator's) decision on every dataset of the request it
/// decides for and has not decided yet. Once every dataset is approved the
/// grant is made, with the narrowest quotas, ε and period any owner set.
pub async fn decide(
    sandbox: &Sandbox,
    principal: &Principal,
    id: &str,
    approval: Option<Approval>,
    reason: Option<String>,
) -> Result<AccessRequest, Error> {
    if principal.role != Role::Owner {
        return Err(Error::Forbidden(
            "only owners and their operators decide on requests".into(),
        ));
    }
    if let Some(a) = &approval {
        if let Some(to) = &a.period_to {
            parse_time(to, "period_to")?;
        }
        if a.epsilon.is_some_and(|e| !(e > 0.0 && e.is_finite())) {
            return Err(Error::InvalidRequest("epsilon must be positive".into()));
        }
    }
    let catalog = sandbox.catalog.current();
    let filed: AccessRequest = serde_json::from_str(
        &sandbox
            .store
            .access_request(id)?
            .ok_or_else(|| Error::NotFound(format!("no access request '{id}'")))?,
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    // The data level's cross-border rules, for the buyer's region, with the
    // assessment this approval brings (checked here, where the policies are).
    let region = sandbox
        .store
        .principal(&filed.buyer)?
        .map(|p| p.region)
        .unwrap_or_default();
    let requester = Requester {
        region: &region,
        cross_border_assessment: approval
            .as_ref()
            .is_some_and(|a| a.cross_border_assessment.is_some()),
    };
    let checks: Vec<(String, Result<(), Error>)> = filed
        .datasets
        .iter()
        .filter_map(|d| catalog.get(d))
        .map(|d| {
            let checked = access::dataset_access(&sandbox.policies, &requester, d);
            (d.id().to_string(), checked)
        })
        .collect();
    let principal = principal.clone();
    let (id, catalog_now) = (id.to_string(), catalog.clone());
    let (_, outcome) = sandbox
        .ledger
        .commit(move |tx| decide_in(tx, &catalog_now, &principal, &id, approval, reason, checks))
        .await?;
    outcome
}

type Decided = (Vec<LedgerEvent>, Result<AccessRequest, Error>);

fn decide_in(
    tx: &rusqlite::Connection,
    catalog: &Catalog,
    principal: &Principal,
    id: &str,
    approval: Option<Approval>,
    reason: Option<String>,
    checks: Vec<(String, Result<(), Error>)>,
) -> Result<Decided, crate::ledger::LedgerError> {
    let refuse = |e: Error| Ok((Vec::new(), Err(e)));
    let mut request = load(tx, id)?;
    if request.status != RequestStatus::Pending {
        let message = format!("access request '{id}' is {}", request.status.as_str());
        return refuse(Error::Conflict(message));
    }
    let mut mine = Vec::new();
    let mut behalf = None;
    for dataset in &request.datasets {
        let Some(d) = catalog.get(dataset) else {
            continue;
        };
        if request.decisions.iter().any(|x| &x.dataset == dataset) {
            continue;
        }
        if let Some(on_behalf_of) = decides_for(tx, principal, d)? {
            behalf = on_behalf_of.or(behalf);
            mine.push(dataset.clone());
        }
    }
    if mine.is_empty() {
        return refuse(Error::Forbidden(format!(
            "you decide on no undecided dataset of access request '{id}'"
        )));
    }
    if let Some(a) = &approval {
        if let Err(e) = narrows(&request, a) {
            return refuse(e);
        }
        for dataset in &mine {
            if let Some((_, Err(e))) = checks.iter().find(|(d, _)| d == dataset) {
                return refuse(Error::PolicyViolation(match e {
                    Error::PolicyViolation(r) => r.clone(),
                    other => crate::error::Refusal::new("access_denied", other.public_message()),
                }));
            }
        }
    }
    let at = crate::util::now_rfc3339();
    for dataset in &mine {
        request.decisions.push(Decision {
            dataset: dataset.clone(),
            approved: approval.is_some(),
            by: principal.id.clone(),
            on_behalf_of: behalf.clone(),
            reason: reason.clone(),
            quotas: approval.as_ref().and_then(|a| a.quotas.clone()),
            epsilon: approval.as_ref().and_then(|a| a.epsilon),
            period_to: approval.as_ref().and_then(|a| a.period_to.clone()),
            cross_border_assessment: approval
                .as_ref()
                .and_then(|a| a.cross_border_assessment.clone()),
            review: approval.as_ref().is_some_and(|a| a.review),
            at: at.clone(),
        });
    }
    let mut events = vec![LedgerEvent::AccessDecided {
        request: id.to_string(),
        datasets: mine,
        approved: approval.is_some(),
        by: principal.id.clone(),
        on_behalf_of: behalf,
        reason,
    }];
    if approval.is_none() {
        request.status = RequestStatus::Rejected;
    } else if request.datasets.iter().all(|d| {
        request
            .decisions
            .iter()
            .any(|x| &x.dataset == d && x.approved)
    }) {
        let grant = store::add_grant(tx, &grant_of(&request))?;
        if request.decisions.iter().any(|d| d.review) {
            store::require_review(tx, &grant.id)?;
        }
        request.status = RequestStatus::Approved;
        request.grant = Some(grant.id.clone());
        events.push(LedgerEvent::GrantMade { grant });
    }
    save(tx, &request)?;
    Ok((events, Ok(request)))
}

/// Whether an approval only narrows what was asked.
fn narrows(request: &AccessRequest, a: &Approval) -> Result<(), Error> {
    let wider = |asked: Option<u64>, set: Option<u64>| match (asked, set) {
        (Some(asked), Some(set)) => set > asked,
        _ => false,
    };
    if let Some(q) = &a.quotas
        && (wider(request.quotas.queries_per_day, q.queries_per_day)
            || wider(request.quotas.rows_per_day, q.rows_per_day)
            || wider(request.quotas.bytes_per_day, q.bytes_per_day))
    {
        return Err(Error::InvalidRequest(
            "an approval may lower the quotas asked for, not raise them".into(),
        ));
    }
    if let (Some(asked), Some(set)) = (request.epsilon, a.epsilon)
        && set > asked
    {
        return Err(Error::InvalidRequest(
            "an approval may lower the epsilon asked for, not raise it".into(),
        ));
    }
    if let Some(to) = &a.period_to {
        let (to, asked_to) = (
            parse_time(to, "period_to")?,
            parse_time(&request.period.to, "period.to")?,
        );
        if to > asked_to {
            return Err(Error::InvalidRequest(
                "an approval may end the period earlier, not later".into(),
            ));
        }
    }
    Ok(())
}

/// The grant every owner approved: the narrowest of what each set.
fn grant_of(request: &AccessRequest) -> NewGrant {
    let approved: Vec<&Decision> = request.decisions.iter().filter(|d| d.approved).collect();
    let narrowest = |asked: Option<u64>, pick: &dyn Fn(&Quotas) -> Option<u64>| {
        approved
            .iter()
            .filter_map(|d| d.quotas.as_ref().and_then(pick))
            .chain(asked)
            .min()
    };
    let q = &request.quotas;
    let epsilon = approved
        .iter()
        .filter_map(|d| d.epsilon)
        .chain(request.epsilon)
        .reduce(f64::min);
    let expires_at = approved
        .iter()
        .filter_map(|d| d.period_to.clone())
        .chain([request.period.to.clone()])
        .min_by_key(|t| {
            parse_time(t, "period")
                .map(|t| t.timestamp())
                .unwrap_or(i64::MAX)
        });
    let assessments: Vec<String> = approved
        .iter()
        .filter_map(|d| d.cross_border_assessment.clone())
        .collect();
    NewGrant {
        buyer: request.buyer.clone(),
        datasets: request.datasets.clone(),
        purpose: request.purpose.clone(),
        queries_per_day: narrowest(q.queries_per_day, &|q| q.queries_per_day),
        rows_per_day: narrowest(q.rows_per_day, &|q| q.rows_per_day),
        bytes_per_day: narrowest(q.bytes_per_day, &|q| q.bytes_per_day),
        epsilon,
        expires_at,
        cross_border_assessment: (!assessments.is_empty()).then(|| assessments.join(",")),
    }
}

/// An owner delegates decisions on its dataset to an operator (or withdraws that).
pub async fn set_operator(
    sandbox: &Sandbox,
    owner: &Principal,
    dataset: &str,
    operator: &str,
    delegate: bool,
) -> Result<(), Error> {
    let d = sandbox
        .catalog
        .get(dataset)
        .ok_or_else(|| Error::NotFound(format!("dataset '{dataset}' does not exist")))?;
    if owner.org.as_deref() != Some(d.manifest.owner.as_str()) {
        return Err(Error::Forbidden(format!(
            "dataset '{dataset}' belongs to another owner"
        )));
    }
    let (dataset, operator, by) = (dataset.to_string(), operator.to_string(), owner.id.clone());
    sandbox
        .ledger
        .commit(move |tx| {
            store::set_operator(tx, &dataset, &operator, &by, delegate)?;
            let event = LedgerEvent::OperatorDelegated {
                dataset,
                operator,
                by,
                withdrawn: !delegate,
            };
            Ok((vec![event], ()))
        })
        .await?;
    Ok(())
}

/// Ends a grant, from the next query on: an owner of one of its datasets, or an admin.
pub async fn revoke_grant(
    sandbox: &Sandbox,
    principal: &Principal,
    grant: &str,
) -> Result<(), Error> {
    let found = sandbox
        .store
        .all_grants()?
        .into_iter()
        .find(|g| g.id == grant)
        .ok_or_else(|| Error::NotFound(format!("no grant '{grant}'")))?;
    let catalog = sandbox.catalog.current();
    let owns_one = found.datasets.iter().any(|d| {
        catalog
            .get(d)
            .is_some_and(|d| principal.org.as_deref() == Some(d.manifest.owner.as_str()))
    });
    if !(owns_one || principal.role == Role::Admin) {
        return Err(Error::Forbidden(format!(
            "grant '{grant}' covers none of your datasets"
        )));
    }
    let grant = grant.to_string();
    sandbox
        .ledger
        .commit(move |tx| {
            store::revoke_grant(tx, &grant)?;
            Ok((vec![LedgerEvent::GrantRevoked { grant }], ()))
        })
        .await?;
    Ok(())
}

/// Requests `principal` is a party to: the buyer's own, those naming an
/// owner's (or operated) datasets; auditors and admins see all.
pub fn visible_requests(
    sandbox: &Sandbox,
    principal: &Principal,
) -> Result<Vec<AccessRequest>, Error> {
    let catalog = sandbox.catalog.current();
    let all: Vec<AccessRequest> = sandbox
        .store
        .access_requests()?
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    Ok(all
        .into_iter()
        .filter(|r| match principal.role {
            Role::Buyer => r.buyer == principal.id,
            Role::Owner => r.datasets.iter().any(|d| {
                catalog
                    .get(d)
                    .is_some_and(|d| principal.org.as_deref() == Some(d.manifest.owner.as_str()))
                    || r.decisions.iter().any(|x| x.by == principal.id)
            }),
            Role::Auditor | Role::Admin => true,
        })
        .collect())
}

/// Adds a principal over HTTP (an admin's act, as `frostglass principal add`).
pub async fn add_principal(sandbox: &Sandbox, principal: Principal) -> Result<String, Error> {
    if principal.id.trim().is_empty() || principal.region.len() != 2 {
        return Err(Error::InvalidRequest(
            "a principal needs an id and a two-letter region".into(),
        ));
    }
    let key = crate::auth::generate_key();
    let hash = crate::auth::key_hash(&key);
    sandbox
        .ledger
        .commit(move |tx| super::admin::principal_added(tx, &principal, &hash))
        .await?;
    Ok(key)
}

/// A fresh API key for the caller; the key it called with is revoked in
/// the same transaction. Returns the new key (shown once).
pub async fn rotate_key(
    sandbox: &Sandbox,
    principal: &Principal,
    current_hash: String,
) -> Result<String, Error> {
    let key = crate::auth::generate_key();
    let hash = crate::auth::key_hash(&key);
    let who = principal.id.clone();
    sandbox
        .ledger
        .commit(move |tx| {
            let mut events = super::admin::key_added(tx, &who, &hash)?.0;
            events.extend(super::admin::key_revoked(tx, &current_hash)?.0);
            Ok((events, ()))
        })
        .await?;
    Ok(key)
}

/// A table as a session registers it.
pub type NamedTable = (
    String,
    std::sync::Arc<dyn datafusion::catalog::TableProvider>,
);

/// The tables auditors supervise the trade with in `/v1/audit/sql`, beside
/// `usage`: `requests`, `decisions` (one row per dataset decided) and
/// `grants`, read from the state store when the query is asked.
pub fn supervision_tables(sandbox: &Sandbox) -> Result<Vec<NamedTable>, Error> {
    use datafusion::arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
    use std::sync::Arc;
    let text = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
    let requests: Vec<AccessRequest> = sandbox
        .store
        .access_requests()?
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    let decisions: Vec<(&AccessRequest, &Decision)> = requests
        .iter()
        .flat_map(|r| r.decisions.iter().map(move |d| (r, d)))
        .collect();
    let grants = sandbox.store.all_grants()?;
    let some = |s: &str| Some(s.to_string());
    let count = |n: Option<u64>| n.map(|n| n as i64);
    let tables = [
        (
            "requests",
            vec![
                ("id", text(requests.iter().map(|r| some(&r.id)).collect())),
                (
                    "buyer",
                    text(requests.iter().map(|r| some(&r.buyer)).collect()),
                ),
                (
                    "datasets",
                    text(
                        requests
                            .iter()
                            .map(|r| Some(r.datasets.join(",")))
                            .collect(),
                    ),
                ),
                (
                    "purpose",
                    text(requests.iter().map(|r| some(&r.purpose)).collect()),
                ),
                (
                    "status",
                    text(requests.iter().map(|r| some(r.status.as_str())).collect()),
                ),
                (
                    "created_at",
                    text(requests.iter().map(|r| some(&r.created_at)).collect()),
                ),
                (
                    "grant",
                    text(requests.iter().map(|r| r.grant.clone()).collect()),
                ),
            ],
        ),
        (
            "decisions",
            vec![
                (
                    "request",
                    text(decisions.iter().map(|(r, _)| some(&r.id)).collect()),
                ),
                (
                    "dataset",
                    text(decisions.iter().map(|(_, d)| some(&d.dataset)).collect()),
                ),
                (
                    "approved",
                    Arc::new(BooleanArray::from(
                        decisions
                            .iter()
                            .map(|(_, d)| d.approved)
                            .collect::<Vec<_>>(),
                    )) as ArrayRef,
                ),
                (
                    "by",
                    text(decisions.iter().map(|(_, d)| some(&d.by)).collect()),
                ),
                (
                    "on_behalf_of",
                    text(
                        decisions
                            .iter()
                            .map(|(_, d)| d.on_behalf_of.clone())
                            .collect(),
                    ),
                ),
                (
                    "reason",
                    text(decisions.iter().map(|(_, d)| d.reason.clone()).collect()),
                ),
                (
                    "at",
                    text(decisions.iter().map(|(_, d)| some(&d.at)).collect()),
                ),
            ],
        ),
        (
            "grants",
            vec![
                ("id", text(grants.iter().map(|g| some(&g.id)).collect())),
                (
                    "buyer",
                    text(grants.iter().map(|g| some(&g.buyer)).collect()),
                ),
                (
                    "datasets",
                    text(grants.iter().map(|g| Some(g.datasets.join(","))).collect()),
                ),
                (
                    "purpose",
                    text(grants.iter().map(|g| some(&g.purpose)).collect()),
                ),
                (
                    "status",
                    text(grants.iter().map(|g| some(&g.status)).collect()),
                ),
                (
                    "created_at",
                    text(grants.iter().map(|g| some(&g.created_at)).collect()),
                ),
                (
                    "expires_at",
                    text(grants.iter().map(|g| g.expires_at.clone()).collect()),
                ),
                (
                    "queries_per_day",
                    Arc::new(Int64Array::from(
                        grants
                            .iter()
                            .map(|g| count(g.queries_per_day))
                            .collect::<Vec<_>>(),
                    )) as ArrayRef,
                ),
                (
                    "epsilon",
                    Arc::new(Float64Array::from(
                        grants.iter().map(|g| g.epsilon).collect::<Vec<_>>(),
                    )) as ArrayRef,
                ),
                (
                    "cross_border_assessment",
                    text(
                        grants
                            .iter()
                            .map(|g| g.cross_border_assessment.clone())
                            .collect(),
                    ),
                ),
            ],
        ),
    ];
    let mut out = Vec::new();
    for (name, columns) in tables {
        let batch = datafusion::arrow::record_batch::RecordBatch::try_from_iter(columns)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let table = datafusion::datasource::MemTable::try_new(batch.schema(), vec![vec![batch]])
            .map_err(|e| Error::Internal(e.to_string()))?;
        out.push((name.to_string(), Arc::new(table) as _));
    }
    Ok(out)
}

/// The dispute evidence of an answered query, for the buyer who asked, the
/// owners of the datasets it read, auditors and admins (anyone else: not
/// found). See `ledger::evidence`.
pub async fn evidence(
    sandbox: &Sandbox,
    principal: &Principal,
    query_id: &str,
) -> Result<crate::ledger::evidence::Bundle, Error> {
    use crate::ledger::event::Entry;
    let missing = || Error::NotFound(format!("no answered query '{query_id}' you may see"));
    let entry_at = |index: u64| -> Result<(u64, String), Error> {
        let (i, body, _) = sandbox
            .ledger
            .entries(index, 1)?
            .pop()
            .ok_or_else(|| Error::Internal(format!("entry {index} vanished")))?;
        Ok((i, body))
    };
    let keyed = |key: String| -> Result<Vec<(u64, String)>, Error> {
        sandbox
            .ledger
            .entries_by_key(&key)?
            .into_iter()
            .map(entry_at)
            .collect()
    };
    let query_entry = keyed(format!("query:{query_id}"))?
        .pop()
        .ok_or_else(missing)?;
    let LedgerEvent::Query(query) = Entry::decode(&query_entry.1)
        .map_err(Error::Internal)?
        .event
    else {
        return Err(missing());
    };
    let catalog = sandbox.catalog.current();
    let owns_one = query.datasets.iter().any(|d| {
        catalog
            .get(d)
            .is_some_and(|d| principal.org.as_deref() == Some(d.manifest.owner.as_str()))
    });
    let allowed = match principal.role {
        Role::Buyer => query.principal == principal.id,
        Role::Owner => owns_one,
        Role::Auditor | Role::Admin => true,
    };
    let grant = query.grant.clone().ok_or_else(missing)?;
    if !allowed || query.decision != crate::ledger::event::Decision::Answered {
        return Err(missing());
    }
    let mut entries = vec![query_entry];
    entries.extend(keyed(format!("grant:{grant}"))?);
    let request = visible_requests(
        sandbox,
        &Principal {
            role: Role::Auditor,
            ..principal.clone()
        },
    )?
    .into_iter()
    .find(|r| r.grant.as_deref() == Some(grant.as_str()));
    let mut commitment = None;
    if let Some(r) = &request
        && let Some(sig) = &r.signature
    {
        entries.extend(keyed(format!("request:{}", r.id))?);
        entries.extend(keyed(format!("signing_key:{}", sig.key_id))?);
        let public_key = sandbox.store.signing_key(&r.buyer, &sig.key_id)?;
        commitment = Some(crate::ledger::evidence::Commitment {
            to_sign: r.to_sign.clone(),
            public_key: b64(&public_key.unwrap_or_default()),
            signature: sig.signature.clone(),
        });
    }
    let head = sandbox.ledger.head().await?;
    let entries = entries
        .into_iter()
        .map(|(index, body)| {
            let proof = sandbox
                .ledger
                .inclusion_proof(index, head.tree_size)
                .ok_or_else(|| Error::Internal(format!("no proof of entry {index}")))?;
            Ok(crate::ledger::evidence::ProvenEntry {
                index,
                body,
                proof: proof.iter().map(hex::encode).collect(),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(crate::ledger::evidence::Bundle {
        query_id: query_id.to_string(),
        head,
        entries,
        commitment,
    })
}

/// The signed settlement of `period` (`YYYY-MM`) as `principal` may see it:
/// auditors and admins every line, owners their organisation's, buyers
/// their own. Computed from the ledger's entries up to a fresh signed head.
pub async fn settlement(
    sandbox: &Sandbox,
    principal: &Principal,
    period: &str,
) -> Result<crate::ledger::settlement::Statement, Error> {
    use crate::ledger::settlement::{self, Scope};
    if !settlement::valid_period(period) {
        return Err(Error::InvalidRequest("period must be YYYY-MM".into()));
    }
    let scope = match principal.role {
        Role::Auditor | Role::Admin => Scope::All,
        Role::Owner => Scope::Owner(principal.org.clone().unwrap_or_default()),
        Role::Buyer => Scope::Buyer(principal.id.clone()),
    };
    let head = sandbox.ledger.head().await?;
    let bodies = ledger_bodies(sandbox, head.tree_size)?;
    let statement = settlement::compute(period, scope, &bodies).map_err(Error::Internal)?;
    Ok(sandbox.ledger.sign_statement(statement).await?)
}

/// The bodies of the ledger's first `size` entries.
fn ledger_bodies(sandbox: &Sandbox, size: u64) -> Result<Vec<String>, Error> {
    const CHUNK: u64 = 10_000;
    let mut bodies = Vec::with_capacity(size as usize);
    while (bodies.len() as u64) < size {
        let from = bodies.len() as u64;
        let chunk = sandbox.ledger.entries(from, CHUNK.min(size - from))?;
        if chunk.is_empty() {
            return Err(Error::Internal(format!(
                "the ledger ends at {from}, not {size}"
            )));
        }
        bodies.extend(chunk.into_iter().map(|(_, body, _)| body));
    }
    Ok(bodies)
}
