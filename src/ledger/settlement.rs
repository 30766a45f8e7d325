//! Settlement of a calendar month, computed from ledger entries alone:
//! per grant and owner, the monthly subscription of each dataset the grant
//! covered while active in the month, plus the metered charges of its
//! answered queries on that owner's datasets — in exact decimals. A
//! statement is signed with the ledger key over the ledger prefix it was
//! computed from, so `frostglass verify --settlement` recomputes it from a
//! copy of the ledger and checks it offline.

use super::event::{Decision, Entry, LedgerEvent};
use super::merkle;
use crate::accounting::{format_money, parse_money};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Whose lines a statement holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    All,
    Owner(String),
    Buyer(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub grant: String,
    pub buyer: String,
    pub owner: String,
    pub currency: Option<String>,
    pub subscription: String,
    pub metered: String,
    pub total: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    /// `YYYY-MM`.
    pub period: String,
    pub scope: Scope,
    /// The ledger prefix it was computed from: its size and root.
    pub tree_size: u64,
    pub root_hash: String,
    pub lines: Vec<Line>,
    /// Per owner: the sum of its lines.
    pub owners: BTreeMap<String, String>,
    pub total: String,
    /// Ed25519 (hex) by the ledger key over [`Statement::message`].
    #[serde(default)]
    pub signature: String,
}

impl Statement {
    /// What the signature covers: a fixed header, then the statement
    /// without its signature as JSON.
    pub fn message(&self) -> Vec<u8> {
        let unsigned = Statement {
            signature: String::new(),
            ..self.clone()
        };
        let json = serde_json::to_string(&unsigned).unwrap_or_default();
        format!("frostglass settlement v1\n{json}").into_bytes()
    }
}

/// Whether `period` is `YYYY-MM`.
pub fn valid_period(period: &str) -> bool {
    let b = period.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit())
        && matches!(
            &period[5..],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        )
}

#[derive(Default)]
struct Owed {
    buyer: String,
    currency: Option<String>,
    subscription: i128,
    metered: i128,
}

/// The statement of `period` for `scope` over `bodies`, the ledger's first
/// entries in order (unsigned; `tree_size` and `root_hash` describe them).
pub fn compute(period: &str, scope: Scope, bodies: &[String]) -> Result<Statement, String> {
    let month_start = format!("{period}-01");
    let month_end = format!("{period}-99");
    let mut owner_of: BTreeMap<String, (String, Option<crate::catalog::Pricing>)> = BTreeMap::new();
    let mut grants: BTreeMap<String, (crate::store::Grant, Option<String>)> = BTreeMap::new();
    let mut owed: BTreeMap<(String, String), Owed> = BTreeMap::new();
    let mut frontier = merkle::Frontier::default();
    for (i, body) in bodies.iter().enumerate() {
        frontier.push(merkle::leaf_hash(body.as_bytes()));
        let entry = Entry::decode(body).map_err(|e| format!("entry {i}: {e}"))?;
        let in_month =
            entry.at.as_str() >= month_start.as_str() && entry.at.as_str() < month_end.as_str();
        match entry.event {
            LedgerEvent::DatasetRegistered {
                dataset,
                owner,
                pricing,
                ..
            } => {
                owner_of.insert(dataset, (owner, pricing));
            }
            LedgerEvent::GrantMade { grant } => {
                grants.insert(grant.id.clone(), (grant, None));
            }
            LedgerEvent::GrantRevoked { grant } => {
                if let Some((_, revoked)) = grants.get_mut(&grant) {
                    revoked.get_or_insert(entry.at.clone());
                }
            }
            LedgerEvent::Query(q) if in_month && q.decision == Decision::Answered => {
                let (Some(grant), Some(usage)) = (&q.grant, &q.usage) else {
                    continue;
                };
                for (dataset, charge) in &usage.charges {
                    let Some((owner, _)) = owner_of.get(dataset) else {
                        continue;
                    };
                    let line = owed.entry((grant.clone(), owner.clone())).or_default();
                    line.buyer = q.principal.clone();
                    line.currency = usage.currency.clone();
                    line.metered += parse_money(charge).unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    // Subscriptions: each grant active at some time in the month pays the
    // month's fee of every dataset it covers.
    for (grant, revoked) in grants.values() {
        let active = grant.created_at.as_str() < month_end.as_str()
            && revoked.as_deref().is_none_or(|r| r >= month_start.as_str())
            && grant
                .expires_at
                .as_deref()
                .is_none_or(|e| e >= month_start.as_str());
        if !active {
            continue;
        }
        for dataset in &grant.datasets {
            let Some((owner, Some(pricing))) = owner_of.get(dataset) else {
                continue;
            };
            let Some(fee) = pricing
                .monthly_subscription
                .as_deref()
                .and_then(parse_money)
            else {
                continue;
            };
            let line = owed.entry((grant.id.clone(), owner.clone())).or_default();
            line.buyer = grant.buyer.clone();
            line.currency.get_or_insert(pricing.currency.clone());
            line.subscription += fee;
        }
    }
    let mut lines = Vec::new();
    let mut owners: BTreeMap<String, i128> = BTreeMap::new();
    let mut total = 0i128;
    for ((grant, owner), o) in owed {
        let visible = match &scope {
            Scope::All => true,
            Scope::Owner(org) => *org == owner,
            Scope::Buyer(buyer) => *buyer == o.buyer,
        };
        if !visible {
            continue;
        }
        let sum = o.subscription + o.metered;
        *owners.entry(owner.clone()).or_default() += sum;
        total += sum;
        lines.push(Line {
            grant,
            buyer: o.buyer,
            owner,
            currency: o.currency,
            subscription: format_money(o.subscription),
            metered: format_money(o.metered),
            total: format_money(sum),
        });
    }
    Ok(Statement {
        period: period.to_string(),
        scope,
        tree_size: bodies.len() as u64,
        root_hash: hex::encode(frontier.root()),
        lines,
        owners: owners
            .into_iter()
            .map(|(o, m)| (o, format_money(m)))
            .collect(),
        total: format_money(total),
        signature: String::new(),
    })
}

/// Checks a statement against the ledger's first entries and its key:
/// recomputed from them, equal in every field, signed by the ledger key.
pub fn verify(
    statement: &Statement,
    bodies: &[String],
    public_key: &[u8],
) -> Result<String, String> {
    if (bodies.len() as u64) < statement.tree_size {
        return Err(format!(
            "the ledger holds {} entries; the statement covers {}",
            bodies.len(),
            statement.tree_size
        ));
    }
    let prefix = &bodies[..statement.tree_size as usize];
    let recomputed = compute(&statement.period, statement.scope.clone(), prefix)?;
    let signature = hex::decode(&statement.signature).map_err(|_| "the signature is not hex")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&statement.message(), &signature)
        .map_err(|_| "the statement's signature does not verify with the ledger key")?;
    let signed = Statement {
        signature: String::new(),
        ..statement.clone()
    };
    if recomputed != signed {
        return Err("the statement differs from the one its ledger entries give".into());
    }
    Ok(format!(
        "ok: settlement {} ({} lines, total {}) recomputed from {} ledger entries",
        statement.period,
        statement.lines.len(),
        statement.total,
        statement.tree_size
    ))
}
