//! Usage as buyers, owners and auditors read it: query entries flattened
//! into records, and summed per grant and day.

use super::event::{Decision, Entry, LedgerEvent};
use crate::accounting::{format_money, parse_money};
use serde::Serialize;

/// One query entry of the ledger, flattened: the rows of the auditors'
/// `usage` table and of usage reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageRecord {
    pub ledger_index: u64,
    pub at: String,
    pub day: String,
    pub principal: String,
    pub grant_id: Option<String>,
    pub purpose: Option<String>,
    pub datasets: Vec<String>,
    pub decision: String,
    pub code: Option<String>,
    pub rule: Option<String>,
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub cpu_ms: u64,
    pub wall_ms: u64,
    pub groups_released: u64,
    pub groups_suppressed: u64,
    pub cells_released: u64,
    pub epsilon: f64,
    /// Millionths of the currency unit.
    pub charge_micros: i64,
}

impl UsageRecord {
    /// Reads a ledger entry through the typed event; entries other than
    /// queries (and bodies that do not decode) give `None`.
    pub fn from_entry(index: u64, body: &str) -> Option<UsageRecord> {
        let entry = Entry::decode(body).ok()?;
        let LedgerEvent::Query(q) = entry.event else {
            return None;
        };
        let usage = q.usage.unwrap_or_default();
        Some(UsageRecord {
            ledger_index: index,
            day: crate::util::day_of(&entry.at).to_string(),
            at: entry.at,
            principal: q.principal,
            grant_id: q.grant,
            purpose: q.purpose,
            datasets: q.datasets.into_iter().collect(),
            decision: match q.decision {
                Decision::Answered => "answered",
                Decision::Refused => "refused",
            }
            .to_string(),
            code: q.code,
            rule: q.rule,
            rows_scanned: usage.rows_scanned,
            bytes_scanned: usage.bytes_scanned,
            cpu_ms: usage.cpu_ms,
            wall_ms: q.wall_ms.unwrap_or(usage.wall_ms),
            groups_released: usage.groups_released,
            groups_suppressed: usage.groups_suppressed.unwrap_or(0),
            cells_released: usage.cells_released,
            epsilon: usage.epsilon,
            charge_micros: parse_money(&usage.charge).unwrap_or(0) as i64,
        })
    }
}

/// Usage summed per grant and day.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageSummary {
    pub grant: Option<String>,
    pub principal: String,
    pub day: String,
    pub queries_answered: u64,
    pub queries_refused: u64,
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub cpu_ms: u64,
    pub cells_released: u64,
    pub epsilon: f64,
    pub charge: String,
}

pub fn summarize<'a>(records: impl Iterator<Item = &'a UsageRecord>) -> Vec<UsageSummary> {
    let mut groups: std::collections::BTreeMap<
        (String, Option<String>, String),
        (UsageSummary, i128),
    > = Default::default();
    for r in records {
        let key = (r.day.clone(), r.grant_id.clone(), r.principal.clone());
        let (s, charge) = groups.entry(key).or_insert_with(|| {
            (
                UsageSummary {
                    grant: r.grant_id.clone(),
                    principal: r.principal.clone(),
                    day: r.day.clone(),
                    ..Default::default()
                },
                0,
            )
        });
        if r.decision == "answered" {
            s.queries_answered += 1;
        } else {
            s.queries_refused += 1;
        }
        s.rows_scanned += r.rows_scanned;
        s.bytes_scanned += r.bytes_scanned;
        s.cpu_ms += r.cpu_ms;
        s.cells_released += r.cells_released;
        s.epsilon += r.epsilon;
        *charge += r.charge_micros as i128;
    }
    groups
        .into_values()
        .map(|(mut s, charge)| {
            s.charge = format_money(charge);
            s
        })
        .collect()
}
