//! What a query costs before it runs: quota held for it, epsilon reserved
//! from the grant's and the datasets' budgets, the metered estimate.

use crate::accounting::{
    self, BudgetBook, Charge, DailyLimits, DailyUse, QuotaBook, Reservation, Usage,
};
use crate::app::Sandbox;
use crate::catalog::{Catalog, Dataset};
use crate::error::Error;
use crate::release::ReleasePlan;
use crate::store::Grant;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Epsilon of a grant: its lifetime limit and what is left.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub epsilon_limit: f64,
    pub epsilon_spent: f64,
    pub epsilon_remaining: f64,
}

impl Budget {
    pub fn of(sandbox: &Sandbox, grant: &Grant) -> Result<Budget, Error> {
        let key = format!("grant:{}", grant.id);
        // Loaded from the ledger once, not per answer (that would read every
        // entry of the grant each time).
        let spent = sandbox
            .budgets
            .spent_or_load(&key, || sandbox.ledger.epsilon_spent(&key))?;
        let limit = grant
            .epsilon
            .unwrap_or(sandbox.settings.limits.default_grant_epsilon);
        Ok(Budget {
            epsilon_limit: limit,
            epsilon_spent: spent,
            epsilon_remaining: (limit - spent).max(0.0),
        })
    }
}

/// What the release jobs spend: the grant pays their sum, each dataset the
/// jobs that read it.
pub fn epsilon_of(catalog: &Catalog, split: &ReleasePlan) -> (f64, BTreeMap<String, f64>) {
    let mut by_dataset = BTreeMap::new();
    let mut total = 0.0;
    for job in &split.jobs {
        let eps = job.epsilon();
        if eps <= 0.0 {
            continue;
        }
        total += eps;
        for d in &job.datasets {
            if catalog
                .get(d)
                .is_some_and(|d| d.manifest.release.dp.is_some())
            {
                *by_dataset.entry(d.clone()).or_insert(0.0) += eps;
            }
        }
    }
    (total, by_dataset)
}

/// Reserves the query's epsilon from the grant's budget and from each
/// dataset's budget shared by all buyers, all or nothing.
pub fn reserve_budget(
    sandbox: &Sandbox,
    catalog: &Catalog,
    grant: &Grant,
    by_dataset: &BTreeMap<String, f64>,
    epsilon: f64,
) -> Result<Charge, Error> {
    let limits = &sandbox.settings.limits;
    let mut items = vec![(
        format!("grant:{}", grant.id),
        grant.epsilon.unwrap_or(limits.default_grant_epsilon),
        epsilon,
    )];
    for (d, eps) in by_dataset {
        let total = catalog
            .get(d)
            .and_then(|d| d.manifest.release.dp.as_ref())
            .and_then(|dp| dp.epsilon_total)
            .unwrap_or(limits.default_dataset_epsilon);
        items.push((format!("dataset:{d}"), total, *eps));
    }
    match BudgetBook::reserve(&sandbox.budgets, &items, |key| {
        sandbox.ledger.epsilon_spent(key)
    })? {
        Ok(charge) => Ok(charge),
        Err(over) => Err(Error::BudgetExhausted(format!(
            "the privacy budget of {} is spent: {} of {} epsilon left, this query needs {epsilon}",
            over.budget, over.remaining, over.limit
        ))),
    }
}

/// Holds today's quota for this query: one query and the rows and bytes it
/// is metered for (known before it runs, since metering is by whole table).
pub fn reserve_quota(
    sandbox: &Sandbox,
    grant: &Grant,
    scanned: &[Arc<Dataset>],
) -> Result<Reservation, Error> {
    let amount = DailyUse {
        queries: 1,
        rows: scanned.iter().map(|d| d.num_rows).sum(),
        bytes: scanned.iter().map(|d| d.num_bytes).sum(),
    };
    let limits = DailyLimits {
        queries: grant.queries_per_day,
        rows: grant.rows_per_day,
        bytes: grant.bytes_per_day,
    };
    match QuotaBook::reserve(&sandbox.quotas, &grant.id, limits, amount, || {
        sandbox.ledger.used_today(&grant.id)
    })? {
        Ok(reservation) => Ok(reservation),
        Err(over) => Err(Error::QuotaExceeded(format!(
            "this query would exceed the grant's {} quota of {}",
            over.quota, over.limit
        ))),
    }
}

/// Rows and bytes a query is metered for: whole tables per scan, from the
/// catalog, so the figures never depend on what a filter matched. Priced
/// per scan at each dataset's list: per query, per million rows, per unit
/// of the ε it spends there — nothing for a dataset whose free tier
/// (`in_free_tier`) still covers the query.
pub fn estimate(
    scanned: &[Arc<Dataset>],
    epsilon_by_dataset: &BTreeMap<String, f64>,
    in_free_tier: &dyn Fn(&Dataset) -> bool,
) -> Usage {
    let rows_scanned = scanned.iter().map(|d| d.num_rows).sum();
    let bytes_scanned = scanned.iter().map(|d| d.num_bytes).sum();
    let mut by_dataset: BTreeMap<String, i128> = BTreeMap::new();
    let mut currency = None;
    let mut priced_epsilon = std::collections::BTreeSet::new();
    for d in scanned {
        let Some(pricing) = &d.manifest.pricing else {
            continue;
        };
        currency.get_or_insert_with(|| pricing.currency.clone());
        let owed = by_dataset.entry(d.id().to_string()).or_default();
        if in_free_tier(d) {
            continue;
        }
        *owed += accounting::price(
            &pricing.per_query,
            &pricing.per_million_rows_scanned,
            d.num_rows,
        )
        .unwrap_or(0);
        // ε is spent per dataset, not per scan: priced once.
        if let (Some(rate), Some(eps)) = (&pricing.per_epsilon, epsilon_by_dataset.get(d.id()))
            && priced_epsilon.insert(d.id().to_string())
        {
            *owed += accounting::epsilon_price(rate, *eps).unwrap_or(0);
        }
    }
    let charge = by_dataset.values().sum();
    let charges = by_dataset
        .into_iter()
        .map(|(d, c)| (d, accounting::format_money(c)))
        .collect();
    Usage {
        rows_scanned,
        bytes_scanned,
        charge: accounting::format_money(charge),
        currency,
        charges,
        ..Usage::default()
    }
}

/// Whether a grant's answered queries this month leave `dataset`'s free tier open.
pub fn free_tier<'a>(sandbox: &'a Sandbox, grant: &Grant) -> impl Fn(&Dataset) -> bool + 'a {
    let used = std::cell::OnceCell::new();
    let ledger = &sandbox.ledger;
    let grant = grant.id.clone();
    move |d: &Dataset| {
        let free = d
            .manifest
            .pricing
            .as_ref()
            .and_then(|p| p.free_queries_per_month)
            .unwrap_or(0);
        free > 0
            && *used.get_or_init(|| ledger.queries_this_month(&grant).unwrap_or(u64::MAX)) < free
    }
}

/// A grant's monthly subscription: the sum of the fees of the datasets it
/// covers, in their currency (settled per period, not per query).
pub fn subscription(catalog: &Catalog, grant: &Grant) -> Option<serde_json::Value> {
    let mut total = 0i128;
    let mut currency = None;
    for d in grant.datasets.iter().filter_map(|d| catalog.get(d)) {
        if let Some(p) = &d.manifest.pricing
            && let Some(fee) = &p.monthly_subscription
        {
            total += accounting::parse_money(fee).unwrap_or(0);
            currency.get_or_insert_with(|| p.currency.clone());
        }
    }
    currency
        .map(|c| serde_json::json!({ "currency": c, "monthly": accounting::format_money(total) }))
}
