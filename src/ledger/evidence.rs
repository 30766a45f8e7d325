//! Evidence for a dispute over one answered query, checkable offline with
//! nothing but the ledger's public key: the query's entry, the grant it ran
//! under and the entries that made it (the request, the buyer's signed
//! commitment and its signing key, every owner's approval), each with its
//! inclusion proof under one signed head, and the commitment's signed bytes.

use super::SignedHead;
use super::event::{Decision, Entry, LedgerEvent};
use super::merkle;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The bundle `GET /v1/evidence/{query_id}` answers and `verify --evidence` checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub query_id: String,
    pub head: SignedHead,
    /// Ledger entries, each with its audit path under `head`.
    pub entries: Vec<ProvenEntry>,
    /// The commitment the buyer signed, when the grant came from a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment: Option<Commitment>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvenEntry {
    pub index: u64,
    pub body: String,
    /// Hex hashes of the audit path (RFC 9162).
    pub proof: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Commitment {
    /// base64 of the exact bytes the buyer signed.
    pub to_sign: String,
    /// base64 of the buyer's raw Ed25519 public key.
    pub public_key: String,
    /// base64 of the signature.
    pub signature: String,
}

fn b64(text: &str, what: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| format!("{what} is not base64"))
}

/// Checks everything the bundle claims; returns a one-line summary.
pub fn verify(bundle: &Bundle, public_key: &[u8]) -> Result<String, String> {
    let head = &bundle.head;
    if !head.verify(public_key) {
        return Err("the head's signature does not verify with the ledger key".into());
    }
    let root = head.root().ok_or("the head's root is malformed")?;
    let mut events = Vec::new();
    for e in &bundle.entries {
        let proof: Vec<merkle::Hash> = e
            .proof
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| format!("the proof of entry {} is malformed", e.index))
            })
            .collect::<Result<_, _>>()?;
        let leaf = merkle::leaf_hash(e.body.as_bytes());
        if !merkle::verify_inclusion(&leaf, e.index, head.tree_size, &proof, &root) {
            return Err(format!("entry {} is not in the signed tree", e.index));
        }
        let entry = Entry::decode(&e.body).map_err(|err| format!("entry {}: {err}", e.index))?;
        events.push(entry.event);
    }
    let query = events
        .iter()
        .find_map(|e| match e {
            LedgerEvent::Query(q) if q.query_id == bundle.query_id => Some(q),
            _ => None,
        })
        .ok_or("the query's entry is not in the bundle")?;
    if query.decision != Decision::Answered {
        return Err("the query was not answered".into());
    }
    let grant_id = query.grant.as_deref().ok_or("the query names no grant")?;
    let grant = events
        .iter()
        .find_map(|e| match e {
            LedgerEvent::GrantMade { grant } if grant.id == grant_id => Some(grant),
            _ => None,
        })
        .ok_or("the grant's entry is not in the bundle")?;
    if grant.buyer != query.principal || !query.datasets.iter().all(|d| grant.covers(d)) {
        return Err("the grant does not cover the query's buyer and datasets".into());
    }
    let mut summary = format!(
        "ok: query {} answered (result sha256 {}) under grant {grant_id} of {}",
        bundle.query_id,
        query.result_sha256.as_deref().unwrap_or("-"),
        grant.buyer
    );
    if let Some(c) = &bundle.commitment {
        let request = check_commitment(c, &events, &query.principal)?;
        let filed = events.iter().any(|e| {
            matches!(e, LedgerEvent::AccessRequested { request: r, buyer, datasets, purpose }
                if *r == request && *buyer == query.principal && *datasets == grant.datasets && *purpose == grant.purpose)
        });
        if !filed {
            return Err(format!(
                "no ledger entry files request {request} for this grant"
            ));
        }
        for dataset in &grant.datasets {
            let approved = events.iter().any(|e| {
                matches!(e, LedgerEvent::AccessDecided { request: r, datasets, approved: true, .. }
                    if *r == request && datasets.contains(dataset))
            });
            if !approved {
                return Err(format!("no approval of '{dataset}' for request {request}"));
            }
        }
        summary.push_str(&format!(
            "; commitment of request {request} signed by the buyer and approved by every owner"
        ));
    }
    Ok(format!(
        "{summary}; {} entries proven under the head of size {}",
        bundle.entries.len(),
        head.tree_size
    ))
}

/// Checks the signed commitment against its ledger entries; returns the request id.
fn check_commitment(c: &Commitment, events: &[LedgerEvent], buyer: &str) -> Result<String, String> {
    let message = b64(&c.to_sign, "the signed bytes")?;
    let public_key = b64(&c.public_key, "the buyer's key")?;
    let signature = b64(&c.signature, "the signature")?;
    let text = String::from_utf8(message.clone()).map_err(|_| "the signed bytes are not text")?;
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::to_string)
    };
    let request = line("request: ").ok_or("the signed bytes name no request")?;
    if line("buyer: ").as_deref() != Some(buyer) {
        return Err("the signed bytes name another buyer".into());
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public_key)
        .verify(&message, &signature)
        .map_err(|_| "the commitment's signature does not verify")?;
    let key_id = &crate::util::sha256_hex(&public_key)[..16];
    let signed = events.iter().any(|e| {
        matches!(e, LedgerEvent::CommitmentSigned { request: r, key_id: k, message_sha256, signature: s }
            if *r == request && k == key_id && *message_sha256 == crate::util::sha256_hex(&message) && *s == c.signature)
    });
    if !signed {
        return Err("no ledger entry records this signature over these bytes".into());
    }
    let registered = events.iter().any(|e| {
        matches!(e, LedgerEvent::SigningKeyAdded { principal, key_id: k } if principal == buyer && k == key_id)
    });
    if !registered {
        return Err("no ledger entry registers the signing key to the buyer".into());
    }
    Ok(request)
}
