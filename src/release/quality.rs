//! The data-asset evaluation: a quality card a buyer judges a dataset by
//! before buying — size, completeness per column, distinct values of the
//! columns that are neither identifying nor sensitive, how often values
//! fall outside their declared bounds, and the time range covered.
//!
//! For personal data every figure is released with differential privacy
//! (discrete Laplace), at the card's ε charged to the dataset's lifetime
//! budget: each person counts for at most `rows_per_person_counted` rows,
//! so one person moves a row-count figure by at most that much, and a
//! person-count figure by one. Non-personal data gets exact figures. No
//! value of an identifying or sensitive column is ever on the card; the
//! time range comes only from a column that is neither, bucketed by month.

use super::noise::{Noise, take};
use crate::catalog::{ColumnClass, Dataset, Kind};
use datafusion::arrow::array::{Array, Float64Array};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The card's ε when the manifest sets none: this, or a twentieth of the
/// dataset's lifetime budget if that is less.
pub const DEFAULT_EPSILON: f64 = 0.5;
/// Rows per person counted when the manifest declares no `max_rows_per_unit`.
pub const DEFAULT_ROWS_PER_UNIT: u64 = 10;
/// The months a time range may be found in: from this many years back
/// to one year ahead (a public window, not taken from the data).
const TIME_WINDOW_YEARS: i64 = 30;

/// The ε a personal dataset's card spends (zero for non-personal data).
pub fn epsilon_for(dataset: &Dataset, lifetime: f64) -> f64 {
    let m = &dataset.manifest;
    if m.privacy_unit.is_none() {
        return 0.0;
    }
    m.evaluation
        .as_ref()
        .and_then(|e| e.epsilon)
        .unwrap_or(DEFAULT_EPSILON.min(lifetime / 20.0))
}

/// One column's figures, before noise.
struct ColumnFigures {
    nulls: f64,
    distinct: Option<f64>,
    outside: Option<f64>,
}

/// Computes the card; `epsilon` must be [`epsilon_for`] this dataset.
pub async fn evaluate(dataset: &Dataset, epsilon: f64) -> Result<Value, String> {
    let m = &dataset.manifest;
    let ctx = SessionContext::new();
    ctx.register_table("t", dataset.table())
        .map_err(|e| e.to_string())?;
    let time_column = time_column(dataset);
    let cap = m
        .release
        .dp
        .as_ref()
        .and_then(|dp| dp.max_rows_per_unit)
        .unwrap_or(DEFAULT_ROWS_PER_UNIT) as f64;
    let version = dataset.version();
    let known = measured()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&version)
        .cloned();
    let exact = match known {
        Some(exact) => exact,
        None => {
            let exact = Arc::new(match &m.privacy_unit {
                Some(unit) => per_person(&ctx, dataset, unit, cap, time_column.as_deref()).await?,
                None => whole(&ctx, dataset, time_column.as_deref()).await?,
            });
            measured()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(version, exact.clone());
            exact
        }
    };
    Ok(exact.release(
        dataset,
        m.privacy_unit.is_some().then_some((epsilon, cap)),
        time_column,
    ))
}

/// Exact figures already measured in this process, by dataset version
/// (id, manifest and data digests): a version is measured once, however
/// many times its card is drawn (each draw is fresh noise, charged anew).
fn measured() -> &'static Mutex<HashMap<String, Arc<Exact>>> {
    static MEASURED: OnceLock<Mutex<HashMap<String, Arc<Exact>>>> = OnceLock::new();
    MEASURED.get_or_init(Mutex::default)
}

/// The card's time column: declared, else the first date or timestamp
/// column that is neither identifying nor sensitive.
fn time_column(dataset: &Dataset) -> Option<String> {
    let m = &dataset.manifest;
    let usable = |name: &str| {
        m.column(name).is_some_and(|c| {
            matches!(
                c.class,
                ColumnClass::Attribute | ColumnClass::QuasiIdentifier
            )
        }) && matches!(
            dataset.data_type(name).and_then(Kind::of),
            Some(Kind::Date | Kind::Timestamp)
        )
    };
    match m.evaluation.as_ref().and_then(|e| e.time_column.clone()) {
        Some(declared) => usable(&declared).then_some(declared),
        None => m
            .columns
            .iter()
            .map(|c| c.name.clone())
            .find(|name| usable(name)),
    }
}

fn reveals_values(class: ColumnClass) -> bool {
    matches!(class, ColumnClass::Attribute | ColumnClass::QuasiIdentifier)
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `expr` as a month number (year × 12 + month − 1).
fn month_of(expr: &str) -> String {
    format!("(date_part('year', {expr}) * 12 + date_part('month', {expr}) - 1)")
}

fn outside_bounds(name: &str, [lo, hi]: [f64; 2]) -> String {
    let x = format!("CAST({} AS DOUBLE)", quoted(name));
    format!("CASE WHEN {x} < {lo:?} OR {x} > {hi:?} THEN 1 ELSE 0 END")
}

/// Exact figures, before release.
struct Exact {
    rows: f64,
    persons: Option<f64>,
    columns: Vec<ColumnFigures>,
    /// Per month: units (or rows) whose first and last time falls in it.
    first_months: Vec<(i64, f64)>,
    last_months: Vec<(i64, f64)>,
    /// Whether a figure counts persons whose rows hold one value (distinct
    /// of a per-person column moves by one when a person comes or goes).
    distinct_per_person: Vec<bool>,
}

/// Figures of non-personal data: exact, over every row.
async fn whole(
    ctx: &SessionContext,
    dataset: &Dataset,
    time_column: Option<&str>,
) -> Result<Exact, String> {
    let m = &dataset.manifest;
    let mut select = vec!["COUNT(*)".to_string()];
    for c in &m.columns {
        let q = quoted(&c.name);
        select.push(format!("COUNT(*) - COUNT({q})"));
        select.push(if reveals_values(c.class) {
            format!("COUNT(DISTINCT {q})")
        } else {
            "NULL".into()
        });
        select.push(match c.bounds {
            Some(b) => format!("SUM({})", outside_bounds(&c.name, b)),
            None => "NULL".into(),
        });
    }
    if let Some(tc) = time_column {
        let month = month_of(&quoted(tc));
        select.push(format!("MIN({month})"));
        select.push(format!("MAX({month})"));
    }
    let row = first_row(ctx, &cast_all(&select, "FROM t")).await?;
    let mut columns = Vec::new();
    for (i, _) in m.columns.iter().enumerate() {
        let at = 1 + 3 * i;
        columns.push(ColumnFigures {
            nulls: row[at].unwrap_or(0.0),
            distinct: row[at + 1],
            outside: row[at + 2],
        });
    }
    let months = |at: usize| {
        row.get(at)
            .copied()
            .flatten()
            .map(|m| vec![(m as i64, 1.0)])
            .unwrap_or_default()
    };
    let after = 1 + 3 * m.columns.len();
    Ok(Exact {
        rows: row[0].unwrap_or(0.0),
        persons: None,
        first_months: months(after),
        last_months: months(after + 1),
        distinct_per_person: vec![false; m.columns.len()],
        columns,
    })
}

/// Figures of personal data, each person's rows counted at most `cap` times.
async fn per_person(
    ctx: &SessionContext,
    dataset: &Dataset,
    unit: &str,
    cap: f64,
    time_column: Option<&str>,
) -> Result<Exact, String> {
    let m = &dataset.manifest;
    let u = quoted(unit);
    let mut inner = vec!["COUNT(*) AS n".to_string()];
    for (i, c) in m.columns.iter().enumerate() {
        let q = quoted(&c.name);
        inner.push(format!("COUNT(*) - COUNT({q}) AS nulls_{i}"));
        if let Some(b) = c.bounds {
            inner.push(format!(
                "SUM({}) AS outside_{i}",
                outside_bounds(&c.name, b)
            ));
        }
    }
    if let Some(tc) = time_column {
        let month = month_of(&quoted(tc));
        inner.push(format!("MIN({month}) AS first_month"));
        inner.push(format!("MAX({month}) AS last_month"));
    }
    let per_unit = ctx
        .sql(&format!("SELECT {} FROM t GROUP BY {u}", inner.join(", ")))
        .await
        .map_err(|e| e.to_string())?
        .cache()
        .await
        .map_err(|e| e.to_string())?;
    ctx.register_table("per_unit", per_unit.into_view())
        .map_err(|e| e.to_string())?;
    let capped = |x: &str| format!("SUM(CASE WHEN {x} > {cap:?} THEN {cap:?} ELSE {x} END)");
    let mut outer = vec!["COUNT(*)".to_string(), capped("n")];
    for (i, c) in m.columns.iter().enumerate() {
        outer.push(capped(&format!("nulls_{i}")));
        outer.push(match c.bounds {
            Some(_) => capped(&format!("outside_{i}")),
            None => "NULL".into(),
        });
    }
    let row = first_row(ctx, &cast_all(&outer, "FROM per_unit")).await?;
    let mut columns = Vec::new();
    let mut distinct_per_person = Vec::new();
    for (i, c) in m.columns.iter().enumerate() {
        let constant = dataset.is_unit_constant(&c.name);
        let distinct = if reveals_values(c.class) {
            // Each person brings at most `cap` values (one, if the column
            // holds one value per person): the smallest ones, deterministically.
            let q = quoted(&c.name);
            let keep = if constant { 1.0 } else { cap };
            let sql = format!(
                "SELECT CAST(COUNT(DISTINCT v) AS DOUBLE) FROM (SELECT v, row_number() OVER (PARTITION BY u ORDER BY v) AS rn
                 FROM (SELECT DISTINCT {u} AS u, {q} AS v FROM t WHERE {q} IS NOT NULL)) WHERE rn <= {keep:?}"
            );
            first_row(ctx, &sql).await?[0]
        } else {
            None
        };
        distinct_per_person.push(constant);
        columns.push(ColumnFigures {
            nulls: row[2 + 2 * i].unwrap_or(0.0),
            distinct,
            outside: row[3 + 2 * i],
        });
    }
    let (first_months, last_months) = match time_column {
        Some(_) => (
            histogram(ctx, "first_month").await?,
            histogram(ctx, "last_month").await?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    Ok(Exact {
        rows: row[1].unwrap_or(0.0),
        persons: row[0],
        columns,
        first_months,
        last_months,
        distinct_per_person,
    })
}

/// Persons per month of `column` (of `per_unit`).
async fn histogram(ctx: &SessionContext, column: &str) -> Result<Vec<(i64, f64)>, String> {
    let sql = format!(
        "SELECT CAST({column} AS DOUBLE), CAST(COUNT(*) AS DOUBLE) FROM per_unit WHERE {column} IS NOT NULL GROUP BY {column}"
    );
    let batches = collect(ctx, &sql).await?;
    let mut out = Vec::new();
    for b in &batches {
        let (months, counts) = (floats(b, 0)?, floats(b, 1)?);
        for i in 0..b.num_rows() {
            out.push((months.value(i) as i64, counts.value(i)));
        }
    }
    Ok(out)
}

fn cast_all(select: &[String], from: &str) -> String {
    let columns: Vec<String> = select
        .iter()
        .enumerate()
        .map(|(i, e)| format!("CAST({e} AS DOUBLE) AS f{i}"))
        .collect();
    format!("SELECT {} {from}", columns.join(", "))
}

async fn collect(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, String> {
    ctx.sql(sql)
        .await
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())
}

fn floats(batch: &RecordBatch, i: usize) -> Result<&Float64Array, String> {
    batch
        .column(i)
        .as_any()
        .downcast_ref::<Float64Array>()
        .ok_or_else(|| "a figure is not a number".to_string())
}

/// The first row of a query whose columns are all DOUBLE.
async fn first_row(ctx: &SessionContext, sql: &str) -> Result<Vec<Option<f64>>, String> {
    let batches = collect(ctx, sql).await?;
    let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(Vec::new());
    };
    (0..b.num_columns())
        .map(|i| {
            let a = floats(b, i)?;
            Ok((!a.is_null(0)).then(|| a.value(0)))
        })
        .collect()
}

fn month_name(m: i64) -> String {
    format!("{:04}-{:02}", m.div_euclid(12), m.rem_euclid(12) + 1)
}

fn share(part: f64, whole: f64) -> f64 {
    if whole <= 0.0 {
        return 0.0;
    }
    ((part / whole).clamp(0.0, 1.0) * 1000.0).round() / 1000.0
}

impl Exact {
    /// The card: exact figures for non-personal data; for personal data,
    /// each figure with discrete Laplace noise at an equal share of `dp`'s ε.
    fn release(
        &self,
        dataset: &Dataset,
        dp: Option<(f64, f64)>,
        time_column: Option<String>,
    ) -> Value {
        let m = &dataset.manifest;
        let has_time = time_column.is_some();
        let figures = 2
            + m.columns.len()
            + self.columns.iter().filter(|c| c.outside.is_some()).count()
            + self.columns.iter().filter(|c| c.distinct.is_some()).count()
            + if has_time { 2 } else { 0 };
        let per_figure = dp.map(|(eps, cap)| (eps / figures as f64, cap));
        // A figure moves by at most its sensitivity when one person comes
        // or goes: `cap` for counts of rows, one for counts of persons.
        let release = |x: f64, sensitivity: f64| match per_figure {
            Some((eps, _)) => (x + take(Noise::laplace(sensitivity / eps)) as f64).max(0.0),
            None => x,
        };
        let (rows_unit, person) = per_figure.map_or((0.0, 0.0), |(_, cap)| (cap, 1.0));
        let rows = release(self.rows, rows_unit);
        let persons = self.persons.map(|p| release(p, person));
        let columns: Vec<Value> = m
            .columns
            .iter()
            .zip(&self.columns)
            .zip(&self.distinct_per_person)
            .map(|((spec, f), per_person)| {
                let sensitivity = if *per_person { person } else { rows_unit };
                json!({
                    "name": spec.name,
                    "class": spec.class,
                    "type": dataset.data_type(&spec.name).map(|t| t.to_string()),
                    "null_share": share(release(f.nulls, rows_unit), rows),
                    // A declared domain bounds the count (post-processing: free).
                    "distinct": f.distinct.map(|d| {
                        let most = spec.domain.as_ref().map_or(f64::INFINITY, |dom| dom.values() as f64);
                        release(d, sensitivity).round().min(most)
                    }),
                    "bounds": spec.bounds,
                    "outside_bounds_share": f.outside.map(|o| share(release(o, rows_unit), rows)),
                })
            })
            .collect();
        let time_range = time_column.and_then(|column| {
            let (from, to) = match per_figure {
                Some((eps, _)) => (
                    noisy_extreme(&self.first_months, eps, false)?,
                    noisy_extreme(&self.last_months, eps, true)?,
                ),
                None => (
                    self.first_months.iter().map(|x| x.0).min()?,
                    self.last_months.iter().map(|x| x.0).max()?,
                ),
            };
            Some(json!({ "column": column, "from": month_name(from), "to": month_name(to.max(from)) }))
        });
        let method = match dp {
            Some(_) => "differential_privacy",
            None => "exact",
        };
        json!({
            "method": method,
            "epsilon": dp.map(|(eps, _)| eps),
            "epsilon_charged_to": dp.map(|_| format!("dataset:{}", m.id)),
            "rows_per_person_counted": dp.map(|(_, cap)| cap as u64),
            "noise": per_figure.map(|(eps, cap)| json!({
                "mechanism": "discrete_laplace",
                "epsilon_per_figure": eps,
                "rows_scale": cap / eps,
                "persons_scale": 1.0 / eps,
            })),
            "rows": rows.round(),
            "persons": persons.map(f64::round),
            "columns": columns,
            "time_range": time_range,
            "computed_at": crate::util::now_rfc3339(),
        })
    }
}

/// The earliest (or latest) month of a public window whose noisy person
/// count clears a threshold that a month with nobody in it crosses with
/// probability 0.5% across the whole window.
fn noisy_extreme(counts: &[(i64, f64)], eps: f64, latest: bool) -> Option<i64> {
    let now = chrono::Utc::now().date_naive();
    use chrono::Datelike;
    let this_month = now.year() as i64 * 12 + now.month0() as i64;
    let window = (this_month - 12 * TIME_WINDOW_YEARS)..=(this_month + 12);
    let months = window.clone().count() as f64;
    let scale = 1.0 / eps;
    let threshold = scale * (months / 0.005).ln();
    let noisy = window.filter(|month| {
        let exact = counts
            .iter()
            .find(|(m, _)| m == month)
            .map_or(0.0, |(_, n)| *n);
        exact + take(Noise::laplace(scale)) as f64 >= threshold
    });
    if latest { noisy.max() } else { noisy.min() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_data_gets_exact_figures_and_personal_data_noised_ones_without_values() {
        let (_dir, catalog) =
            crate::catalog::demo_catalog(&["enterprise_registry.json", "city_health.json"], |_| {})
                .await;
        let open = catalog.get("enterprise_registry").unwrap();
        assert_eq!(epsilon_for(open, 100.0), 0.0);
        let card = evaluate(open, 0.0).await.unwrap();
        assert_eq!(card["method"], "exact");
        assert_eq!(card["rows"], open.num_rows as f64);
        assert!(card["persons"].is_null() && card["noise"].is_null());
        let industry = card["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "industry")
            .unwrap();
        assert_eq!(industry["null_share"], 0.0);
        assert!(industry["distinct"].as_f64().unwrap() >= 2.0);

        let personal = catalog.get("city_health").unwrap();
        // A twentieth of a small lifetime budget, else 0.5.
        assert_eq!(epsilon_for(personal, 100.0), 0.5);
        assert_eq!(epsilon_for(personal, 2.0), 0.1);
        let card = evaluate(personal, 0.5).await.unwrap();
        assert_eq!(card["method"], "differential_privacy");
        assert_eq!(card["rows_per_person_counted"], 20);
        for c in card["columns"].as_array().unwrap() {
            if matches!(c["class"].as_str(), Some("identifier" | "sensitive")) {
                assert!(c["distinct"].is_null(), "{c}");
            }
        }
        // Drawn afresh each time from figures measured once.
        let again = evaluate(personal, 0.5).await.unwrap();
        assert_ne!(
            (&card["rows"], &card["persons"]),
            (&again["rows"], &again["persons"])
        );
    }

    #[test]
    fn a_time_range_needs_a_month_with_enough_people() {
        let now = chrono::Utc::now().date_naive();
        use chrono::Datelike;
        let month = now.year() as i64 * 12 + now.month0() as i64 - 6;
        // Thousands of people in one month: found (an empty month clears
        // the threshold with probability 0.5% over the whole window, so
        // the earliest month found may rarely lie before it); three people:
        // lost in the noise.
        let found = noisy_extreme(&[(month, 5000.0)], 1.0, false).unwrap();
        assert!(found <= month);
        assert_ne!(noisy_extreme(&[(month, 3.0)], 0.1, true), Some(month));
        assert_eq!(month_name(2025 * 12), "2025-01");
    }
}
