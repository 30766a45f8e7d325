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
        UsageRecord::of(index, &Entry::decode(body).ok()?)
    }

    /// A query entry as a record; other entries give `None`.
    pub fn of(index: u64, entry: &Entry) -> Option<UsageRecord> {
        let LedgerEvent::Query(q) = &entry.event else {
            return None;
        };
        let usage = q.usage.clone().unwrap_or_default();
        Some(UsageRecord {
            ledger_index: index,
            day: crate::util::day_of(&entry.at).to_string(),
            at: entry.at.clone(),
            principal: q.principal.clone(),
            grant_id: q.grant.clone(),
            purpose: q.purpose.clone(),
            datasets: q.datasets.iter().cloned().collect(),
            decision: match q.decision {
                Decision::Answered => "answered",
                Decision::Refused => "refused",
            }
            .to_string(),
            code: q.code.clone(),
            rule: q.rule.clone(),
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

/// Usage summed per (day, grant, principal, datasets read): the roll-up the
/// append transaction keeps, so usage reports never read the ledger. The
/// dataset set is kept so owners see exactly the use of their datasets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageRollup {
    pub day: String,
    pub grant: Option<String>,
    pub principal: String,
    pub datasets: Vec<String>,
    pub answered: u64,
    pub refused: u64,
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub cpu_ms: u64,
    pub cells_released: u64,
    pub epsilon: f64,
    pub charge_micros: i64,
}

impl UsageRollup {
    /// One query's contribution.
    pub fn of(r: &UsageRecord) -> UsageRollup {
        let answered = r.decision == "answered";
        UsageRollup {
            day: r.day.clone(),
            grant: r.grant_id.clone(),
            principal: r.principal.clone(),
            datasets: r.datasets.clone(),
            answered: u64::from(answered),
            refused: u64::from(!answered),
            rows_scanned: r.rows_scanned,
            bytes_scanned: r.bytes_scanned,
            cpu_ms: r.cpu_ms,
            cells_released: r.cells_released,
            epsilon: r.epsilon,
            charge_micros: r.charge_micros,
        }
    }

    pub fn add(&mut self, other: &UsageRollup) {
        self.answered += other.answered;
        self.refused += other.refused;
        self.rows_scanned += other.rows_scanned;
        self.bytes_scanned += other.bytes_scanned;
        self.cpu_ms += other.cpu_ms;
        self.cells_released += other.cells_released;
        self.epsilon += other.epsilon;
        self.charge_micros += other.charge_micros;
    }
}

/// Sums roll-up rows (or single queries, through [`UsageRollup::of`]) per grant and day.
pub fn summarize<'a>(rows: impl Iterator<Item = &'a UsageRollup>) -> Vec<UsageSummary> {
    let mut groups: std::collections::BTreeMap<(String, Option<String>, String), UsageRollup> =
        Default::default();
    for r in rows {
        let key = (r.day.clone(), r.grant.clone(), r.principal.clone());
        groups
            .entry(key)
            .or_insert_with(|| UsageRollup {
                day: r.day.clone(),
                grant: r.grant.clone(),
                principal: r.principal.clone(),
                ..UsageRollup::default()
            })
            .add(r);
    }
    groups
        .into_values()
        .map(|r| UsageSummary {
            grant: r.grant,
            principal: r.principal,
            day: r.day,
            queries_answered: r.answered,
            queries_refused: r.refused,
            rows_scanned: r.rows_scanned,
            bytes_scanned: r.bytes_scanned,
            cpu_ms: r.cpu_ms,
            cells_released: r.cells_released,
            epsilon: r.epsilon,
            charge: format_money(r.charge_micros as i128),
        })
        .collect()
}
