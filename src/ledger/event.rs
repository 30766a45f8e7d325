//! What a ledger entry holds: one typed, versioned event. This is the only
//! definition of an entry body. The typed columns stored beside each entry
//! (grant, day, rows, bytes, charge, ε per budget), from which quotas and
//! budgets are rebuilt, are derived from the event by [`Entry::columns`] —
//! by the writer when it appends and by `verify` when it checks — so a
//! writer's field and a reader's column cannot drift apart.

use crate::accounting::{Usage, parse_money};
use crate::store::{Grant, Principal};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The version of the body layout; bumped when a field changes meaning.
pub const VERSION: u32 = 1;

/// An entry body: version, time, and the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub v: u32,
    pub at: String,
    #[serde(flatten)]
    pub event: LedgerEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerEvent {
    Query(QueryEvent),
    /// A version of a dataset became active: at start-up for a new or
    /// changed manifest file, or by its owner over HTTP (`by`).
    DatasetRegistered {
        dataset: String,
        owner: String,
        level: String,
        manifest_sha256: String,
        rows: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_sha256: Option<String>,
        /// Of registrations over HTTP: 1, then one more per update.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// The version's price list: what settlements charge by.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pricing: Option<crate::catalog::Pricing>,
    },
    /// An owner withdrew a dataset: new queries are refused, the grants on it ended.
    DatasetWithdrawn {
        dataset: String,
        owner: String,
        by: String,
        grants_ended: Vec<String>,
    },
    /// A principal registered an Ed25519 key it signs commitments with.
    SigningKeyAdded {
        principal: String,
        key_id: String,
    },
    /// A buyer asked for access; pending once it signs the commitment.
    AccessRequested {
        request: String,
        buyer: String,
        datasets: Vec<String>,
        purpose: String,
    },
    /// The buyer signed the security-use commitment of a request: the
    /// exact bytes' digest and the signature, for dispute evidence.
    CommitmentSigned {
        request: String,
        key_id: String,
        message_sha256: String,
        signature: String,
    },
    /// An owner — or an operator on its behalf — decided on its datasets of a request.
    AccessDecided {
        request: String,
        datasets: Vec<String>,
        approved: bool,
        by: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_behalf_of: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A released answer is held for review by the owners of its datasets.
    AnswerHeld {
        query_id: String,
        owners: Vec<String>,
    },
    /// An owner approved a held answer (the buyer may fetch it) or rejected
    /// it (its sealed bytes were destroyed).
    AnswerReviewed {
        query_id: String,
        approved: bool,
        by: String,
    },
    /// An owner delegated (or withdrew) decisions on a dataset to an operator.
    OperatorDelegated {
        dataset: String,
        operator: String,
        by: String,
        withdrawn: bool,
    },
    /// A version's quality card was computed; for personal data its ε is
    /// charged to the dataset's lifetime budget.
    DatasetEvaluated {
        dataset: String,
        manifest_sha256: String,
        data_sha256: String,
        epsilon: f64,
        card_sha256: String,
    },
    PrincipalAdded {
        principal: Principal,
    },
    KeyAdded {
        principal: String,
        key_hash_prefix: String,
    },
    KeyRevoked {
        principal: String,
        key_hash_prefix: String,
    },
    CertificateBound {
        principal: String,
        spki_sha256: String,
    },
    GrantMade {
        grant: Grant,
    },
    GrantRevoked {
        grant: String,
    },
    /// An owner measured a contribution bound from the data with
    /// differential privacy; its ε is charged to the dataset's lifetime budget.
    BoundMeasured {
        dataset: String,
        /// What was measured (`rows_per_unit`).
        measure: String,
        quantile: f64,
        epsilon: f64,
        bound: u64,
    },
    /// Entries `first..end` were sealed into an archive segment (their
    /// bodies left the database); `root_hash` is the checkpoint ending it.
    SegmentArchived {
        first: u64,
        end: u64,
        file: String,
        sha256: String,
        root_hash: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Answered,
    Refused,
}

/// A query, answered or refused: who asked what (the SQL only as a hash),
/// what it was metered and charged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryEvent {
    pub query_id: String,
    pub principal: String,
    pub grant: Option<String>,
    pub purpose: Option<String>,
    pub datasets: BTreeSet<String>,
    pub sql_sha256: String,
    pub decision: Decision,
    /// Of the planned query: equal for queries that differ only in spelling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
    /// Answered from the stored release of the same plan, at no charge.
    #[serde(default)]
    pub cached: bool,
    /// How the answer was released (as the buyer saw it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<serde_json::Value>,
    /// Metered use; an answer's only (a refusal uses no quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Epsilon that stands: spent by an answer, or by a refusal after data was read.
    pub epsilon_charged: f64,
    pub epsilon_by_dataset: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_sha256: Option<String>,
    /// A refusal's stable code and rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_ms: Option<u64>,
}

/// The typed, indexed columns stored beside an entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Columns {
    pub kind: &'static str,
    pub created_at: String,
    pub day: String,
    pub principal: Option<String>,
    pub grant: Option<String>,
    pub decision: &'static str,
    /// Counted by the daily quotas: answered queries only.
    pub queries: u64,
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub charge_micros: i64,
    /// Epsilon charged per budget (`grant:<id>`, `dataset:<id>`).
    pub epsilon: Vec<(String, f64)>,
}

/// What identifies a registered version of a dataset: its manifest and,
/// where recorded, its data.
pub fn version_key(manifest_sha256: &str, data_sha256: Option<&str>) -> String {
    match data_sha256 {
        Some(data) => format!("{manifest_sha256}:{data}"),
        None => manifest_sha256.to_string(),
    }
}

impl LedgerEvent {
    /// What an entry is found by when dispute evidence is assembled.
    pub fn lookup_keys(&self) -> Vec<String> {
        match self {
            LedgerEvent::Query(q) => vec![format!("query:{}", q.query_id)],
            LedgerEvent::GrantMade { grant } => vec![format!("grant:{}", grant.id)],
            LedgerEvent::AccessRequested { request, .. }
            | LedgerEvent::CommitmentSigned { request, .. }
            | LedgerEvent::AccessDecided { request, .. } => vec![format!("request:{request}")],
            LedgerEvent::SigningKeyAdded { key_id, .. } => vec![format!("signing_key:{key_id}")],
            _ => Vec::new(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            LedgerEvent::Query(_) => "query",
            LedgerEvent::DatasetRegistered { .. } => "dataset_registered",
            LedgerEvent::PrincipalAdded { .. } => "principal_added",
            LedgerEvent::KeyAdded { .. } => "key_added",
            LedgerEvent::KeyRevoked { .. } => "key_revoked",
            LedgerEvent::CertificateBound { .. } => "certificate_bound",
            LedgerEvent::GrantMade { .. } => "grant_made",
            LedgerEvent::GrantRevoked { .. } => "grant_revoked",
            LedgerEvent::BoundMeasured { .. } => "bound_measured",
            LedgerEvent::DatasetWithdrawn { .. } => "dataset_withdrawn",
            LedgerEvent::SigningKeyAdded { .. } => "signing_key_added",
            LedgerEvent::AccessRequested { .. } => "access_requested",
            LedgerEvent::CommitmentSigned { .. } => "commitment_signed",
            LedgerEvent::AccessDecided { .. } => "access_decided",
            LedgerEvent::OperatorDelegated { .. } => "operator_delegated",
            LedgerEvent::AnswerHeld { .. } => "answer_held",
            LedgerEvent::AnswerReviewed { .. } => "answer_reviewed",
            LedgerEvent::DatasetEvaluated { .. } => "dataset_evaluated",
            LedgerEvent::SegmentArchived { .. } => "segment_archived",
        }
    }
}

impl Entry {
    /// An entry for `event`, stamped now.
    pub fn now(event: LedgerEvent) -> Entry {
        Entry {
            v: VERSION,
            at: crate::util::now_rfc3339(),
            event,
        }
    }

    /// The canonical body: what the leaf hash covers.
    pub fn body(&self) -> String {
        // Serialising plain structs, strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(body: &str) -> Result<Entry, String> {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            v: u32,
            at: String,
            #[serde(borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        let envelope: Envelope = serde_json::from_str(body).map_err(|e| e.to_string())?;
        if envelope.v != VERSION {
            return Err(format!("unknown entry version {}", envelope.v));
        }
        // Queries, nearly every entry, are decoded as the struct they are
        // (a second, cheap pass): the tagged enum buffers every field first,
        // which was most of `verify`'s time over millions of entries.
        let event = if envelope.kind == "query" {
            LedgerEvent::Query(serde_json::from_str(body).map_err(|e| e.to_string())?)
        } else {
            serde_json::from_str::<Entry>(body)
                .map_err(|e| e.to_string())?
                .event
        };
        Ok(Entry {
            v: envelope.v,
            at: envelope.at,
            event,
        })
    }

    pub fn columns(&self) -> Columns {
        let mut c = Columns {
            kind: self.event.kind(),
            created_at: self.at.clone(),
            day: crate::util::day_of(&self.at).to_string(),
            principal: None,
            grant: None,
            decision: "recorded",
            queries: 0,
            rows_scanned: 0,
            bytes_scanned: 0,
            charge_micros: 0,
            epsilon: Vec::new(),
        };
        if let LedgerEvent::Query(q) = &self.event {
            c.principal = Some(q.principal.clone());
            c.grant = q.grant.clone();
            c.decision = match q.decision {
                Decision::Answered => "answered",
                Decision::Refused => "refused",
            };
            if let (Decision::Answered, Some(usage)) = (q.decision, &q.usage) {
                c.queries = 1;
                c.rows_scanned = usage.rows_scanned;
                c.bytes_scanned = usage.bytes_scanned;
                c.charge_micros = parse_money(&usage.charge)
                    .and_then(|m| i64::try_from(m).ok())
                    .unwrap_or(0);
            }
            if let Some(grant) = &q.grant
                && q.epsilon_charged > 0.0
            {
                c.epsilon
                    .push((format!("grant:{grant}"), q.epsilon_charged));
            }
            for (dataset, eps) in &q.epsilon_by_dataset {
                if *eps > 0.0 {
                    c.epsilon.push((format!("dataset:{dataset}"), *eps));
                }
            }
        }
        if let LedgerEvent::BoundMeasured {
            dataset, epsilon, ..
        }
        | LedgerEvent::DatasetEvaluated {
            dataset, epsilon, ..
        } = &self.event
            && *epsilon > 0.0
        {
            c.epsilon.push((format!("dataset:{dataset}"), *epsilon));
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered() -> Entry {
        Entry {
            v: VERSION,
            at: "2026-11-30T10:00:00.000Z".into(),
            event: LedgerEvent::Query(QueryEvent {
                query_id: "q_1".into(),
                principal: "buyer:a".into(),
                grant: Some("g_1".into()),
                purpose: Some("research".into()),
                datasets: ["city_health".to_string()].into(),
                sql_sha256: "00".into(),
                decision: Decision::Answered,
                plan_sha256: Some("11".into()),
                cached: false,
                release: None,
                usage: Some(Usage {
                    rows_scanned: 10,
                    bytes_scanned: 20,
                    charge: "0.70".into(),
                    ..Usage::default()
                }),
                epsilon_charged: 0.5,
                epsilon_by_dataset: [("city_health".to_string(), 0.5)].into(),
                result_sha256: Some("22".into()),
                code: None,
                rule: None,
                wall_ms: None,
            }),
        }
    }

    #[test]
    fn bodies_round_trip_and_keep_the_field_names_readers_rely_on() {
        let entry = answered();
        let body = entry.body();
        assert_eq!(Entry::decode(&body).unwrap(), entry);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["kind"], "query");
        assert_eq!(v["v"], 1);
        assert_eq!(v["usage"]["rows_scanned"], 10);
        assert_eq!(v["epsilon_by_dataset"]["city_health"], 0.5);
        assert!(Entry::decode(&body.replace("\"v\":1", "\"v\":9")).is_err());
    }

    #[test]
    fn the_fast_decoding_of_queries_agrees_with_the_enum() {
        let other = Entry::now(LedgerEvent::GrantRevoked {
            grant: "g_1".into(),
        });
        for entry in [answered(), other] {
            let body = entry.body();
            let generic: Entry = serde_json::from_str(&body).unwrap();
            assert_eq!(Entry::decode(&body).unwrap(), generic);
        }
        // What the enum refuses, the fast path refuses too.
        let body = answered().body();
        for broken in [
            body.replace("\"query_id\":", "\"query_id\":1,\"x\":"),
            body.replace("\"principal\":", "\"principal\":7,\"y\":"),
            body.replace("\"kind\":\"query\"", "\"kind\":\"quer\""),
            body.replace("\"at\":", "\"at\":null,\"z\":"),
        ] {
            assert_eq!(
                Entry::decode(&broken).is_err(),
                serde_json::from_str::<Entry>(&broken).is_err(),
                "{broken}"
            );
            assert!(Entry::decode(&broken).is_err(), "{broken}");
        }
    }

    #[test]
    fn columns_follow_the_event() {
        let c = answered().columns();
        assert_eq!(
            (c.kind, c.decision, c.day.as_str()),
            ("query", "answered", "2026-11-30")
        );
        assert_eq!((c.queries, c.rows_scanned, c.bytes_scanned), (1, 10, 20));
        assert_eq!(c.charge_micros, 700_000);
        assert_eq!(
            c.epsilon,
            vec![
                ("grant:g_1".to_string(), 0.5),
                ("dataset:city_health".to_string(), 0.5)
            ]
        );
        // A refusal uses no quota, but epsilon it charged stands.
        let mut refused = answered();
        if let LedgerEvent::Query(q) = &mut refused.event {
            q.decision = Decision::Refused;
        }
        let c = refused.columns();
        assert_eq!((c.queries, c.rows_scanned, c.charge_micros), (0, 0, 0));
        assert_eq!(c.epsilon.len(), 2);
    }
}
