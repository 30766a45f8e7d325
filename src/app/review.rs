//! Result review: an answer reading a dataset whose owner reviews answers
//! (`release.review`) is released as usual — noise drawn, ε spent, the
//! entry on the ledger — and then held, sealed with AES-256-GCM under a key
//! only the sandbox holds, until an owner of a reviewed dataset it read
//! approves. Owners see
//! the SQL's digest, the decision trace and the released aggregate, never a
//! row; a rejection destroys the sealed bytes; each step is on the ledger.

use super::Sandbox;
use crate::error::Error;
use crate::ledger::event::LedgerEvent;
use crate::store::{self, HeldAnswer, Principal, Role};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use std::path::Path;

/// The sealing key, kept in the data directory (mode 0600), made on first use.
pub struct Vault {
    key: LessSafeKey,
}

impl Vault {
    pub fn open(data_dir: &Path) -> Result<Vault, Error> {
        let path = data_dir.join("review-aes256.key");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(_) => {
                let mut fresh = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut fresh)
                    .map_err(|_| Error::Internal("no random source".into()))?;
                crate::util::write_secret(&path, &fresh)
                    .map_err(|e| Error::Internal(format!("cannot write the review key: {e}")))?;
                fresh.to_vec()
            }
        };
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| Error::Internal("the review key is malformed".into()))?;
        Ok(Vault {
            key: LessSafeKey::new(key),
        })
    }

    /// Seals `plain`, bound to `query_id`; returns (nonce, ciphertext with tag).
    fn seal(&self, query_id: &str, plain: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Internal("no random source".into()))?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(query_id.as_bytes()),
                &mut data,
            )
            .map_err(|_| Error::Internal("sealing failed".into()))?;
        Ok((nonce.to_vec(), data))
    }

    fn open_sealed(&self, query_id: &str, nonce: &[u8], sealed: &[u8]) -> Result<Value, Error> {
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| Error::Internal("a held answer's nonce is malformed".into()))?;
        let mut data = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(query_id.as_bytes()), &mut data)
            .map_err(|_| Error::Internal("a held answer does not open".into()))?;
        serde_json::from_slice(plain).map_err(|e| Error::Internal(e.to_string()))
    }
}

/// Holds `answer` (`{"answer": the buyer's JSON, "sql", "trace"}`) for the
/// `owners`' review: sealed, stored and recorded in one transaction.
pub async fn hold(
    sandbox: &Sandbox,
    buyer: &Principal,
    query_id: &str,
    owners: Vec<String>,
    answer: &Value,
) -> Result<(), Error> {
    let plain = serde_json::to_vec(answer).map_err(|e| Error::Internal(e.to_string()))?;
    let (nonce, sealed) = sandbox.vault.seal(query_id, &plain)?;
    let held = HeldAnswer {
        query_id: query_id.to_string(),
        buyer: buyer.id.clone(),
        owners,
        status: "held".into(),
        nonce: Some(nonce),
        sealed: Some(sealed),
    };
    sandbox
        .ledger
        .commit(move |tx| {
            store::hold_answer(tx, &held)?;
            let event = LedgerEvent::AnswerHeld {
                query_id: held.query_id.clone(),
                owners: held.owners.clone(),
            };
            Ok((vec![event], ()))
        })
        .await?;
    Ok(())
}

/// What the buyer who asked sees of its query: a held answer once
/// approved, else its review status; any other query its decision as the
/// ledger records it. Anyone else: not found.
pub fn fetch(sandbox: &Sandbox, buyer: &Principal, query_id: &str) -> Result<Value, Error> {
    let missing = || Error::NotFound(format!("no query '{query_id}' of yours"));
    let Some(held) = sandbox.store.held_answer(query_id)? else {
        return recorded(sandbox, buyer, query_id)?.ok_or_else(missing);
    };
    if held.buyer != buyer.id {
        return Err(missing());
    }
    match (held.status.as_str(), &held.nonce, &held.sealed) {
        ("approved", Some(nonce), Some(sealed)) => {
            Ok(sandbox.vault.open_sealed(query_id, nonce, sealed)?["answer"].take())
        }
        (status, _, _) => Ok(serde_json::json!({ "query_id": query_id, "status": status })),
    }
}

/// A query of `buyer` that was not held: its decision, ledger index and,
/// for an answer, where its evidence is (the answer itself is not kept).
fn recorded(sandbox: &Sandbox, buyer: &Principal, query_id: &str) -> Result<Option<Value>, Error> {
    let Some(index) = sandbox
        .ledger
        .entries_by_key(&format!("query:{query_id}"))?
        .pop()
    else {
        return Ok(None);
    };
    let Some((_, body, _)) = sandbox.ledger.entries(index, 1)?.pop() else {
        return Ok(None);
    };
    let entry = crate::ledger::event::Entry::decode(&body).map_err(Error::Internal)?;
    let LedgerEvent::Query(q) = entry.event else {
        return Ok(None);
    };
    if q.principal != buyer.id {
        return Ok(None);
    }
    let answered = q.decision == crate::ledger::event::Decision::Answered;
    Ok(Some(serde_json::json!({
        "query_id": query_id,
        "status": if answered { "answered" } else { "refused" },
        "ledger_index": index,
        "at": entry.at,
        "code": q.code,
        "rule": q.rule,
        "evidence": answered.then(|| format!("/v1/evidence/{query_id}")),
    })))
}

/// Answers waiting for `owner`'s review: the released aggregate and how it
/// was released, never a row.
pub fn waiting(sandbox: &Sandbox, owner: &Principal) -> Result<Vec<Value>, Error> {
    let org = owner.org.clone().unwrap_or_default();
    let mut out = Vec::new();
    for held in sandbox.store.held_answers_waiting()? {
        if !(held.owners.contains(&org) || owner.role == Role::Admin) {
            continue;
        }
        if let (Some(nonce), Some(sealed)) = (&held.nonce, &held.sealed) {
            let mut review = sandbox.vault.open_sealed(&held.query_id, nonce, sealed)?;
            review["query_id"] = Value::from(held.query_id.clone());
            review["buyer"] = Value::from(held.buyer.clone());
            out.push(review);
        }
    }
    Ok(out)
}

/// An owner's verdict on a held answer.
pub async fn review(
    sandbox: &Sandbox,
    owner: &Principal,
    query_id: &str,
    approved: bool,
) -> Result<(), Error> {
    let held = sandbox
        .store
        .held_answer(query_id)?
        .ok_or_else(|| Error::NotFound(format!("no held answer '{query_id}'")))?;
    let org = owner.org.clone().unwrap_or_default();
    if !held.owners.contains(&org) {
        return Err(Error::Forbidden(format!(
            "answer '{query_id}' reads none of your datasets"
        )));
    }
    let (query_id, by) = (query_id.to_string(), owner.id.clone());
    sandbox
        .ledger
        .commit(move |tx| {
            store::review_answer(tx, &query_id, approved)?;
            let event = LedgerEvent::AnswerReviewed {
                query_id,
                approved,
                by,
            };
            Ok((vec![event], ()))
        })
        .await?;
    Ok(())
}
