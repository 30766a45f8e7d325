//! Metering and prices. Money is exact: decimal strings are parsed into
//! integer millionths, never floats.

pub mod burn_down;

use serde::{Deserialize, Serialize};

const SCALE: i128 = 1_000_000;

/// One day's use of a grant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DailyUse {
    pub queries: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// What one query used and costs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub cpu_ms: u64,
    pub wall_ms: u64,
    pub groups_released: u64,
    pub groups_suppressed: Option<u64>,
    pub cells_released: u64,
    pub epsilon: f64,
    pub charge: String,
    pub currency: Option<String>,
    /// The charge per dataset read (settled to its owner).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub charges: std::collections::BTreeMap<String, String>,
}

/// Parses a non-negative decimal with up to six fractional digits into millionths.
pub fn parse_money(s: &str) -> Option<i128> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty()
        || frac.len() > 6
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole: i128 = whole.parse().ok()?;
    let frac: i128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    whole.checked_mul(SCALE)?.checked_add(frac)
}

/// Formats millionths with at least two and at most six decimals.
pub fn format_money(micros: i128) -> String {
    let whole = micros / SCALE;
    let frac = format!("{:06}", (micros % SCALE).abs());
    let trimmed = frac.trim_end_matches('0');
    let frac = if trimmed.len() < 2 {
        &frac[..2]
    } else {
        trimmed
    };
    format!("{whole}.{frac}")
}

/// The price of scanning `rows` of a dataset: per query plus per million rows, rounded half up to millionths.
pub fn price(per_query: &str, per_million_rows: &str, rows: u64) -> Option<i128> {
    let base = parse_money(per_query)?;
    let per_million = parse_money(per_million_rows)?;
    let scanned = per_million
        .checked_mul(rows as i128)?
        .checked_add(SCALE / 2)?
        / SCALE;
    base.checked_add(scanned)
}

/// The price of `epsilon` at `per_epsilon`, rounded up to the micro-unit.
pub fn epsilon_price(per_epsilon: &str, epsilon: f64) -> Option<i128> {
    let rate = parse_money(per_epsilon)?;
    let micros = (rate as f64 * epsilon.max(0.0)).ceil();
    (micros.is_finite() && micros < 1e30).then_some(micros as i128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_round_trips_exactly() {
        assert_eq!(parse_money("0.50"), Some(500_000));
        assert_eq!(parse_money("12"), Some(12_000_000));
        assert_eq!(parse_money("0.000001"), Some(1));
        assert_eq!(parse_money("1.0000001"), None);
        assert_eq!(parse_money("-1"), None);
        assert_eq!(parse_money("1e3"), None);
        // Found by fuzzing the ledger decoder: too large is not a number, not a panic.
        assert_eq!(parse_money(&"9".repeat(38)), None);
        assert_eq!(price(&"9".repeat(33), "1", 1), None);
        assert_eq!(price("0", &"9".repeat(32), u64::MAX), None);
        assert_eq!(epsilon_price("2.00", 0.5), Some(1_000_000));
        assert_eq!(epsilon_price("1", 0.1234567), Some(123_457));
        assert_eq!(epsilon_price("x", 1.0), None);
        assert_eq!(format_money(700_000), "0.70");
        assert_eq!(format_money(1_234_567), "1.234567");
        assert_eq!(format_money(0), "0.00");
    }

    #[test]
    fn price_is_per_query_plus_rows() {
        // 0.50 + 2.00 per million x 100,000 rows = 0.70
        assert_eq!(
            price("0.50", "2.00", 100_000).map(format_money).as_deref(),
            Some("0.70")
        );
        // 0.1 + 0.3 x 1 row = 0.1000003 -> rounds to 0.100000
        assert_eq!(
            price("0.1", "0.3", 1).map(format_money).as_deref(),
            Some("0.10")
        );
        assert_eq!(
            price("0.1", "0.3", 2).map(format_money).as_deref(),
            Some("0.100001")
        );
    }
}

/// Per-grant daily use, held in memory so that concurrent queries reserve
/// quota atomically: two queries racing for the last unit cannot both pass.
/// Each grant's day starts from the ledger (answered entries) and is kept
/// up to date by reservations; a refusal gives its reservation back.
#[derive(Default)]
pub struct QuotaBook {
    days: std::sync::Mutex<std::collections::HashMap<String, (String, DailyUse)>>,
}

/// Daily limits of a grant.
#[derive(Debug, Clone, Copy, Default)]
pub struct DailyLimits {
    pub queries: Option<u64>,
    pub rows: Option<u64>,
    pub bytes: Option<u64>,
}

/// Quota held for one query; given back on drop unless committed.
pub struct Reservation {
    book: std::sync::Arc<QuotaBook>,
    grant: String,
    day: String,
    amount: DailyUse,
    committed: bool,
}

impl Reservation {
    /// The query was answered: its use stands.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut days = self.book.days.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((day, used)) = days.get_mut(&self.grant)
            && *day == self.day
        {
            used.queries = used.queries.saturating_sub(self.amount.queries);
            used.rows = used.rows.saturating_sub(self.amount.rows);
            used.bytes = used.bytes.saturating_sub(self.amount.bytes);
        }
    }
}

/// Which quota a query would exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    pub quota: &'static str,
    pub limit: u64,
}

impl QuotaBook {
    /// Reserves `amount` of today's quota of `grant`, loading the day's use
    /// with `load` the first time the grant is seen that day.
    pub fn reserve<E>(
        book: &std::sync::Arc<QuotaBook>,
        grant: &str,
        limits: DailyLimits,
        amount: DailyUse,
        load: impl FnOnce() -> Result<DailyUse, E>,
    ) -> Result<Result<Reservation, OverQuota>, E> {
        let today = chrono::Utc::now().date_naive().to_string();
        let mut days = book.days.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = days.get(grant).is_none_or(|(day, _)| *day != today);
        if fresh {
            days.insert(grant.to_string(), (today.clone(), load()?));
        }
        let (_, used) = days
            .entry(grant.to_string())
            .or_insert_with(|| (today.clone(), DailyUse::default()));
        let checks = [
            (
                "queries_per_day",
                limits.queries,
                used.queries,
                amount.queries,
            ),
            ("rows_per_day", limits.rows, used.rows, amount.rows),
            ("bytes_per_day", limits.bytes, used.bytes, amount.bytes),
        ];
        for (quota, limit, used, more) in checks {
            if let Some(limit) = limit
                && used.saturating_add(more) > limit
            {
                return Ok(Err(OverQuota { quota, limit }));
            }
        }
        used.queries += amount.queries;
        used.rows += amount.rows;
        used.bytes += amount.bytes;
        Ok(Ok(Reservation {
            book: book.clone(),
            grant: grant.to_string(),
            day: today,
            amount,
            committed: false,
        }))
    }

    /// Today's use of a grant as the book knows it (reservations included).
    pub fn used(&self, grant: &str) -> Option<DailyUse> {
        let today = chrono::Utc::now().date_naive().to_string();
        let days = self.days.lock().unwrap_or_else(|p| p.into_inner());
        days.get(grant)
            .filter(|(d, _)| *d == today)
            .map(|(_, u)| *u)
    }
}

#[cfg(test)]
mod quota_tests {
    use super::*;
    use std::sync::Arc;

    fn one(rows: u64) -> DailyUse {
        DailyUse {
            queries: 1,
            rows,
            bytes: 0,
        }
    }

    #[test]
    fn reservations_are_atomic_and_given_back_on_drop() {
        let book = Arc::new(QuotaBook::default());
        let limits = DailyLimits {
            queries: Some(3),
            rows: Some(1000),
            bytes: None,
        };
        let load = || {
            Ok::<_, ()>(DailyUse {
                queries: 1,
                rows: 0,
                bytes: 0,
            })
        };
        let a = QuotaBook::reserve(&book, "g", limits, one(100), load)
            .unwrap()
            .unwrap();
        let b = QuotaBook::reserve(&book, "g", limits, one(100), load)
            .unwrap()
            .unwrap();
        let over = QuotaBook::reserve(&book, "g", limits, one(100), load).unwrap();
        assert_eq!(
            over.err(),
            Some(OverQuota {
                quota: "queries_per_day",
                limit: 3
            })
        );
        drop(b);
        let c = QuotaBook::reserve(&book, "g", limits, one(901), load).unwrap();
        assert_eq!(
            c.err(),
            Some(OverQuota {
                quota: "rows_per_day",
                limit: 1000
            })
        );
        a.commit();
        assert_eq!(
            book.used("g"),
            Some(DailyUse {
                queries: 2,
                rows: 100,
                bytes: 0
            })
        );
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_quota() {
        let book = Arc::new(QuotaBook::default());
        let limits = DailyLimits {
            queries: Some(5),
            ..DailyLimits::default()
        };
        let granted: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..32)
                .map(|_| {
                    let book = book.clone();
                    s.spawn(move || {
                        QuotaBook::reserve(&book, "g", limits, one(0), || {
                            Ok::<_, ()>(DailyUse::default())
                        })
                        .unwrap()
                        .map(Reservation::commit)
                        .is_ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(granted.iter().filter(|g| **g).count(), 5);
    }
}

/// Epsilon spent per grant and per dataset, in millionths so that sums are
/// exact. Like [`QuotaBook`], loaded from the ledger on first use and kept
/// current by reservations, so concurrent queries cannot overspend.
#[derive(Default)]
pub struct BudgetBook {
    spent: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

pub fn to_micro(epsilon: f64) -> u64 {
    (epsilon * 1e6).round().max(0.0) as u64
}

/// Epsilon reserved for one query: refunded on drop unless committed.
/// Committed once the query starts to read data: from then on it stands,
/// whether the query is answered or fails.
pub struct Charge {
    book: std::sync::Arc<BudgetBook>,
    items: Vec<(String, u64)>,
    committed: bool,
}

impl Charge {
    pub fn commit(&mut self) {
        self.committed = true;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut spent = self.book.spent.lock().unwrap_or_else(|p| p.into_inner());
        for (key, amount) in &self.items {
            if let Some(s) = spent.get_mut(key) {
                *s = s.saturating_sub(*amount);
            }
        }
    }
}

/// The budget a query would overspend.
#[derive(Debug, Clone, PartialEq)]
pub struct OverBudget {
    pub budget: String,
    pub limit: f64,
    pub remaining: f64,
}

impl BudgetBook {
    /// Reserves every `(budget key, limit, epsilon)` or none of them.
    pub fn reserve<E>(
        book: &std::sync::Arc<BudgetBook>,
        items: &[(String, f64, f64)],
        load: impl Fn(&str) -> Result<f64, E>,
    ) -> Result<Result<Charge, OverBudget>, E> {
        let mut spent = book.spent.lock().unwrap_or_else(|p| p.into_inner());
        for (key, _, _) in items {
            if !spent.contains_key(key) {
                spent.insert(key.clone(), to_micro(load(key)?));
            }
        }
        for (key, limit, amount) in items {
            let used = spent.get(key).copied().unwrap_or(0);
            if used.saturating_add(to_micro(*amount)) > to_micro(*limit) {
                let remaining = to_micro(*limit).saturating_sub(used) as f64 / 1e6;
                return Ok(Err(OverBudget {
                    budget: key.clone(),
                    limit: *limit,
                    remaining,
                }));
            }
        }
        let mut reserved = Vec::with_capacity(items.len());
        for (key, _, amount) in items {
            *spent.entry(key.clone()).or_default() += to_micro(*amount);
            reserved.push((key.clone(), to_micro(*amount)));
        }
        Ok(Ok(Charge {
            book: book.clone(),
            items: reserved,
            committed: false,
        }))
    }

    /// Epsilon spent on a budget key, loaded with `load` (from the ledger)
    /// the first time and kept: the book is the running total from then on.
    pub fn spent_or_load<E>(
        &self,
        key: &str,
        load: impl FnOnce() -> Result<f64, E>,
    ) -> Result<f64, E> {
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = spent.get(key) {
            return Ok(*m as f64 / 1e6);
        }
        let loaded = to_micro(load()?);
        spent.insert(key.to_string(), loaded);
        Ok(loaded as f64 / 1e6)
    }

    /// Epsilon spent on a budget key as the book knows it.
    pub fn spent(&self, key: &str) -> Option<f64> {
        let spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        spent.get(key).map(|m| *m as f64 / 1e6)
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn spent_is_loaded_from_the_ledger_once_then_kept_by_the_book() {
        let book = Arc::new(BudgetBook::default());
        let loads = std::cell::Cell::new(0);
        let load = || {
            loads.set(loads.get() + 1);
            Ok::<_, ()>(1.5)
        };
        assert_eq!(book.spent_or_load("grant:g", load), Ok(1.5));
        assert_eq!(book.spent_or_load("grant:g", load), Ok(1.5));
        assert_eq!(loads.get(), 1, "the ledger is read once");
        let mut charge = BudgetBook::reserve(&book, &[("grant:g".into(), 10.0, 0.5)], |_| {
            Ok::<_, ()>(99.0)
        })
        .unwrap()
        .unwrap();
        charge.commit();
        assert_eq!(book.spent_or_load("grant:g", load), Ok(2.0));
        assert_eq!(loads.get(), 1);
    }

    #[test]
    fn a_budget_is_reserved_whole_or_not_at_all_and_refunded_unless_committed() {
        let book = Arc::new(BudgetBook::default());
        let load = |_: &str| Ok::<_, ()>(0.0);
        let both = |eps: f64| {
            vec![
                ("grant:a".to_string(), 1.0, eps),
                ("dataset:d".to_string(), 1.2, eps),
            ]
        };
        let mut first = BudgetBook::reserve(&book, &both(0.5), load)
            .unwrap()
            .unwrap();
        first.commit();
        drop(first);
        let second = BudgetBook::reserve(&book, &both(0.5), load)
            .unwrap()
            .unwrap();
        // The grant is full; the dataset would have room, but nothing is reserved.
        let third = BudgetBook::reserve(&book, &both(0.1), load).unwrap();
        assert_eq!(third.err().map(|o| o.budget), Some("grant:a".to_string()));
        drop(second);
        assert_eq!(book.spent("grant:a"), Some(0.5));
        assert_eq!(book.spent("dataset:d"), Some(0.5));
    }
}
