//! The ledger over time, read from the typed rows the append transaction
//! keeps (never by parsing the whole ledger): refusals by day and rule, a
//! principal's recent queries, and the ε charged to a budget per day. What
//! the console charts; the API decides who sees which rows.

use super::LedgerError;
use super::event::Entry;
use rusqlite::{Connection, params};
use serde::Serialize;

/// Refused queries of one day with the same code, rule, principal and datasets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusals {
    pub day: String,
    pub code: Option<String>,
    pub rule: Option<String>,
    pub principal: String,
    pub datasets: Vec<String>,
    pub count: u64,
}

fn dataset_list(joined: String) -> Vec<String> {
    joined
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

/// Refusals since `since_day` (`YYYY-MM-DD`), grouped.
pub fn refusals(conn: &Connection, since_day: &str) -> Result<Vec<Refusals>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT day, code, rule, principal, datasets, COUNT(*) FROM query_usage
         WHERE decision = 'refused' AND day >= ?1
         GROUP BY day, code, rule, principal, datasets ORDER BY day",
    )?;
    let rows = stmt.query_map([since_day], |r| {
        Ok(Refusals {
            day: r.get(0)?,
            code: r.get(1)?,
            rule: r.get(2)?,
            principal: r.get(3)?,
            datasets: dataset_list(r.get(4)?),
            count: r.get::<_, i64>(5)?.max(0) as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One query as its buyer finds it in its history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PastQuery {
    /// Absent for an entry whose body was archived.
    pub query_id: Option<String>,
    pub ledger_index: u64,
    pub at: String,
    pub decision: String,
    pub code: Option<String>,
    pub rule: Option<String>,
    pub datasets: Vec<String>,
    pub epsilon: f64,
    pub charge: String,
    pub cached: bool,
}

/// The `limit` most recent queries of `principal`, newest first.
pub fn recent_queries(
    conn: &Connection,
    principal: &str,
    limit: u64,
) -> Result<Vec<PastQuery>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT q.ledger_index, q.at, q.decision, q.code, q.rule, q.datasets, q.epsilon, q.charge_micros, l.body
         FROM query_usage q LEFT JOIN usage_log l ON l.idx = q.ledger_index
         WHERE q.principal = ?1 ORDER BY q.ledger_index DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![principal, limit as i64], |r| {
        let body: Option<String> = r.get(8)?;
        let query = body
            .and_then(|b| Entry::decode(&b).ok())
            .and_then(|e| match e.event {
                super::event::LedgerEvent::Query(q) => Some(q),
                _ => None,
            });
        Ok(PastQuery {
            query_id: query.as_ref().map(|q| q.query_id.clone()),
            cached: query.is_some_and(|q| q.cached),
            ledger_index: r.get::<_, i64>(0)? as u64,
            at: r.get(1)?,
            decision: r.get(2)?,
            code: r.get(3)?,
            rule: r.get(4)?,
            datasets: dataset_list(r.get(5)?),
            epsilon: r.get(6)?,
            charge: crate::accounting::format_money(r.get::<_, i64>(7)? as i128),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// ε charged to `budget` (`dataset:<id>`, `grant:<id>`) per day, oldest
/// first, over the entries still in the live table.
pub fn epsilon_by_day(conn: &Connection, budget: &str) -> Result<Vec<(String, f64)>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT l.day, SUM(e.epsilon) FROM usage_epsilon e JOIN usage_log l ON l.idx = e.idx
         WHERE e.budget = ?1 GROUP BY l.day ORDER BY l.day",
    )?;
    let rows = stmt.query_map([budget], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::usage::UsageRecord;

    fn table() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        crate::ledger::tables::create(&conn).unwrap();
        conn
    }

    fn refused(index: u64, day: &str, rule: &str, datasets: &[&str]) -> UsageRecord {
        UsageRecord {
            ledger_index: index,
            at: format!("{day}T10:00:00Z"),
            day: day.into(),
            principal: "buyer:a".into(),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
            decision: "refused".into(),
            code: Some("prohibited".into()),
            rule: Some(rule.into()),
            ..UsageRecord::default()
        }
    }

    #[test]
    fn refusals_are_grouped_by_day_and_rule_and_start_at_the_day_asked() {
        let conn = table();
        for r in [
            refused(0, "2026-11-01", "P1", &["a"]),
            refused(1, "2026-11-02", "P1", &["a"]),
            refused(2, "2026-11-02", "P1", &["a"]),
            refused(3, "2026-11-02", "P2", &["a", "b"]),
            UsageRecord {
                decision: "answered".into(),
                ..refused(4, "2026-11-02", "P1", &["a"])
            },
        ] {
            crate::ledger::usage_table::insert(&conn, &r).unwrap();
        }
        let got = refusals(&conn, "2026-11-02").unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].rule.as_deref(), got[0].count), (Some("P1"), 2));
        assert_eq!(got[1].datasets, vec!["a", "b"]);
    }
}
