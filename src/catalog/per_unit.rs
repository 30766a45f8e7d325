//! Per-unit statistics taken once at registration, in one scan: which
//! columns hold one value per privacy unit, and a *unit summary* — one row
//! per unit with those columns and the unit's row count, clamped sums,
//! sums, counts, minima and maxima of its bounded columns.
//!
//! Releases whose filters, group keys and aggregate arguments the summary
//! covers read it instead of the rows (a few hundred thousand units instead
//! of millions of rows). Both are tied to the data's fingerprint: once the
//! files change, neither is used until the dataset is registered again.

use super::{ColumnClass, Fingerprint, Manifest, SourceFormat};
use datafusion::arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch};
use datafusion::arrow::compute::kernels::boolean::{and_kleene, or_kleene};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::Column;
use datafusion::datasource::MemTable;
use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
use datafusion::logical_expr::{Cast, Expr, lit, when};
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Memory the registration statistics may use.
const MEASURE_MEMORY: usize = 1 << 30;
/// A summary larger than this is not kept; releases then read the rows.
const MAX_SUMMARY_BYTES: usize = 512 << 20;

/// Every column the summary adds starts with this; a dataset with a column
/// of that name gets no summary.
const PREFIX: &str = "__fg_";
/// The summary's per-unit row count.
pub const ROWS: &str = "__fg_rows";

/// What a bounded column is summarised into, per unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Part {
    /// The sum of its values clamped to the declared bounds, as Float64.
    ClampedSum,
    Sum,
    Count,
    Min,
    Max,
}

impl Part {
    /// What a release of `manifest` can ask for: DP releases clamped sums
    /// and counts; threshold releases exact sums, counts, minima and maxima.
    fn needed(manifest: &Manifest) -> Vec<Part> {
        if manifest.release.dp.is_some() {
            vec![Part::ClampedSum, Part::Count]
        } else {
            vec![Part::Sum, Part::Count, Part::Min, Part::Max]
        }
    }

    pub fn column(self, name: &str) -> String {
        let part = match self {
            Part::ClampedSum => "csum",
            Part::Sum => "sum",
            Part::Count => "count",
            Part::Min => "min",
            Part::Max => "max",
        };
        format!("{PREFIX}{part}_{name}")
    }
}

/// One row per privacy unit, taken from the data as it was at registration.
#[derive(Debug)]
pub struct UnitSummary {
    pub table: Arc<MemTable>,
    /// The privacy unit's column.
    pub unit: String,
    /// How many units (rows) it holds.
    pub units: usize,
    /// Its size in memory.
    pub bytes: usize,
    /// Columns carried verbatim: they hold one value per unit.
    pub constant: BTreeSet<String>,
    /// Numeric columns with declared bounds, summarised into `parts`.
    pub bounded: BTreeSet<String>,
    pub parts: Vec<Part>,
}

impl UnitSummary {
    /// The summary's column holding `part` of `column`, if it keeps one.
    pub fn part(&self, part: Part, column: &str) -> Option<String> {
        (self.parts.contains(&part) && self.bounded.contains(column)).then(|| part.column(column))
    }
}

/// What registration measured about a dataset's units.
#[derive(Debug, Clone, Default)]
pub struct PerUnit {
    pub constant: BTreeSet<String>,
    pub summary: Option<Arc<UnitSummary>>,
}

/// `e` clamped to `[lo, hi]`, as Float64: the one definition both the unit
/// summary and the row-level release use, so the two agree.
pub fn clamped(e: Expr, lo: f64, hi: f64) -> datafusion::error::Result<Expr> {
    let x = Expr::Cast(Cast::new(Box::new(e), DataType::Float64));
    // NaN compares false with both bounds: without this it would pass
    // unclamped and make the whole sum NaN, saying that one row holds it.
    when(
        datafusion::functions::expr_fn::isnan(x.clone()),
        lit(datafusion::common::ScalarValue::Float64(None)),
    )
    .when(x.clone().lt(lit(lo)), lit(lo))
    .when(x.clone().gt(lit(hi)), lit(hi))
    .otherwise(x)
}

/// Measurements of unchanged data, kept for the life of the process (several
/// sandboxes in one process, as in tests and the benchmark, measure once).
type Measurements = std::collections::HashMap<(PathBuf, String), (Fingerprint, PerUnit)>;

fn measurements() -> &'static Mutex<Measurements> {
    static MEASURED: OnceLock<Mutex<Measurements>> = OnceLock::new();
    MEASURED.get_or_init(Default::default)
}

/// What a measurement depends on besides the data: the unit and the declared columns.
fn measured_key(location: &Path, manifest: &Manifest) -> (PathBuf, String) {
    let declared = serde_json::to_string(&(
        &manifest.privacy_unit,
        &manifest.columns,
        Part::needed(manifest),
    ))
    .unwrap_or_default();
    (location.to_path_buf(), declared)
}

/// The measurement of the data at `fingerprint`, taken now or remembered.
/// A measurement that fails (say, out of its memory) leaves the columns
/// unmeasured and no summary: releases then bound contributions the slow way.
pub async fn measure(
    location: &Path,
    fingerprint: &Fingerprint,
    manifest: &Manifest,
    schema: &Schema,
) -> PerUnit {
    let key = measured_key(location, manifest);
    {
        let known = measurements().lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, found)) = known.get(&key)
            && at == fingerprint
        {
            return found.clone();
        }
    }
    let found = match scan(location, manifest, schema).await {
        Ok(found) => {
            tracing::info!(
                dataset = %manifest.id,
                constant = ?found.constant,
                summary_units = found.summary.as_ref().map(|s| s.units),
                summary_bytes = found.summary.as_ref().map(|s| s.bytes),
                "per-unit statistics measured"
            );
            found
        }
        Err(e) => {
            tracing::warn!(dataset = %manifest.id, error = %e, "per-unit statistics not measured");
            PerUnit::default()
        }
    };
    // Data that changed during the scan is measured again next time.
    if super::fingerprint(location) == *fingerprint {
        let mut known = measurements().lock().unwrap_or_else(|p| p.into_inner());
        known.insert(key, (fingerprint.clone(), found.clone()));
    }
    found
}

/// The columns that could hold one value per unit and be grouped or filtered on.
fn candidates<'a>(manifest: &'a Manifest, unit: &str) -> Vec<&'a str> {
    manifest
        .columns
        .iter()
        .filter(|c| {
            matches!(
                c.class,
                ColumnClass::QuasiIdentifier | ColumnClass::Attribute
            ) && c.name != unit
        })
        .map(|c| c.name.as_str())
        .collect()
}

fn column(name: &str) -> Expr {
    Expr::Column(Column::from_name(name))
}

async fn scan(
    location: &Path,
    manifest: &Manifest,
    schema: &Schema,
) -> datafusion::error::Result<PerUnit> {
    let Some(unit) = &manifest.privacy_unit else {
        return Ok(PerUnit::default());
    };
    let candidates = candidates(manifest, unit);
    let bounded: Vec<(&str, f64, f64)> = manifest
        .columns
        .iter()
        .filter_map(|c| {
            let [lo, hi] = c.bounds?;
            let numeric = schema
                .field_with_name(&c.name)
                .is_ok_and(|f| f.data_type().is_integer() || f.data_type().is_floating());
            numeric.then_some((c.name.as_str(), lo, hi))
        })
        .collect();
    // Per unit, MIN, MAX and COUNT tell whether a column has one value
    // (all NULL, or never NULL and MIN = MAX); they keep a few bytes per
    // unit, where COUNT(DISTINCT) would keep a hash set per unit.
    let mut aggregates = vec![count(lit(1i64)).alias(ROWS)];
    for c in &candidates {
        aggregates.push(min(column(c)).alias(*c));
        aggregates.push(max(column(c)).alias(format!("{PREFIX}cmax_{c}")));
        aggregates.push(count(column(c)).alias(format!("{PREFIX}ccount_{c}")));
    }
    let parts = Part::needed(manifest);
    for (b, lo, hi) in &bounded {
        for &part in &parts {
            let e = match part {
                Part::ClampedSum => sum(clamped(column(b), *lo, *hi)?),
                Part::Sum => sum(column(b)),
                Part::Count => count(column(b)),
                Part::Min => min(column(b)),
                Part::Max => max(column(b)),
            };
            aggregates.push(e.alias(part.column(b)));
        }
    }
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(MEASURE_MEMORY, 1.0)
        .build_arc()?;
    let ctx = SessionContext::new_with_config_rt(Default::default(), runtime);
    let path = location.to_string_lossy();
    match manifest.source.format {
        SourceFormat::Parquet => {
            ctx.register_parquet("t", path.as_ref(), ParquetReadOptions::default())
                .await?
        }
        SourceFormat::Csv => {
            ctx.register_csv("t", path.as_ref(), CsvReadOptions::new().has_header(true))
                .await?
        }
    }
    let per_unit = ctx
        .table("t")
        .await?
        .aggregate(vec![column(unit).alias(unit.as_str())], aggregates)?;
    let out_schema = Arc::new(per_unit.schema().as_arrow().clone());
    let batches = per_unit.collect().await?;
    let whole = datafusion::arrow::compute::concat_batches(&out_schema, &batches)
        .map_err(|e| datafusion::error::DataFusionError::ArrowError(Box::new(e), None))?;
    let at = |name: &str| -> datafusion::error::Result<&ArrayRef> {
        whole
            .column_by_name(name)
            .ok_or_else(|| datafusion::error::DataFusionError::Internal(format!("no {name}")))
    };
    let rows = at(ROWS)?.clone();
    let mut constant = BTreeSet::new();
    for c in &candidates {
        let n = at(&format!("{PREFIX}ccount_{c}"))?;
        let all_null = eq(n, &Int64Array::new_scalar(0))?;
        let full = eq(n, &rows)?;
        let one_value = eq(at(c)?, at(&format!("{PREFIX}cmax_{c}"))?)?;
        let ok: BooleanArray = or_kleene(&all_null, &and_kleene(&full, &one_value)?)?;
        if ok.true_count() == ok.len() {
            constant.insert(c.to_string());
        }
    }
    let clash = manifest.columns.iter().any(|c| c.name.starts_with(PREFIX));
    let summary = (!clash)
        .then(|| summary_of(&whole, unit, &constant, &bounded, parts))
        .transpose()?
        .flatten();
    Ok(PerUnit { constant, summary })
}

/// String views out of an aggregate point into the pages they were read
/// from; copied out, the summary keeps only its own bytes.
fn compacted(array: &ArrayRef) -> ArrayRef {
    use datafusion::arrow::array::AsArray;
    match array.data_type() {
        DataType::Utf8View => Arc::new(array.as_string_view().gc()),
        DataType::BinaryView => Arc::new(array.as_binary_view().gc()),
        _ => array.clone(),
    }
}

/// The summary's columns out of the per-unit scan: the unit, the constant
/// columns, the row count and the bounded columns' parts.
fn summary_of(
    whole: &RecordBatch,
    unit: &str,
    constant: &BTreeSet<String>,
    bounded: &[(&str, f64, f64)],
    parts: Vec<Part>,
) -> datafusion::error::Result<Option<Arc<UnitSummary>>> {
    let mut names: Vec<String> = vec![unit.to_string()];
    names.extend(constant.iter().cloned());
    names.push(ROWS.to_string());
    for (b, _, _) in bounded {
        names.extend(parts.iter().map(|p| p.column(b)));
    }
    let mut fields: Vec<Field> = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for name in &names {
        let (i, field) = whole.schema().column_with_name(name).map_or_else(
            || {
                Err(datafusion::error::DataFusionError::Internal(format!(
                    "no {name}"
                )))
            },
            |(i, f)| Ok((i, f.clone())),
        )?;
        fields.push(field);
        columns.push(compacted(whole.column(i)));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    if batch.get_array_memory_size() > MAX_SUMMARY_BYTES {
        tracing::info!(
            bytes = batch.get_array_memory_size(),
            "unit summary too large to keep"
        );
        return Ok(None);
    }
    // Two partitions let both cores work on a release.
    let half = batch.num_rows().div_ceil(2);
    let partitions = vec![
        vec![batch.slice(0, half)],
        vec![batch.slice(half, batch.num_rows() - half)],
    ];
    Ok(Some(Arc::new(UnitSummary {
        table: Arc::new(MemTable::try_new(schema, partitions)?),
        unit: unit.to_string(),
        units: batch.num_rows(),
        bytes: batch.get_array_memory_size(),
        constant: constant.clone(),
        bounded: bounded.iter().map(|(b, _, _)| b.to_string()).collect(),
        parts,
    })))
}
