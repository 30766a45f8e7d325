//! Differentially private release of one aggregate.
//!
//! The aggregate is rewritten so that contribution bounds are enforced, not
//! assumed: every summed value is clamped to its column's declared bounds,
//! rows are aggregated per (privacy unit, group), each unit keeps at most
//! `max_groups_per_unit` groups and at most `max_rows_per_unit` rows over
//! all of them (its per-group components scaled to the rows kept), and only
//! then are groups summed. Sensitivities follow from those bounds alone: a
//! unit moves a count by at most `max_rows_per_unit`, a sum by that times
//! the largest bound, the number of units of at most `max_groups_per_unit`
//! groups by one. The engine returns exact per-group components in a type
//! that never leaves this module; [`release`] adds discrete noise, drops
//! groups whose noisy unit count is under the selection threshold, and
//! builds the released batch from noisy values only.

use super::component::Component;
use super::noise::{self, Noise};
use super::partitions::Partitions;
use crate::catalog::{Catalog, DpMechanism, DpRules};
use crate::engine::bound::{BoundContributions, Bounds, bounded_name};
use crate::engine::streamed::{KEPT_UNITS, Layout, StreamedBounds, Value, partial_name};
use crate::error::{Error, Refusal};
use datafusion::arrow::array::{Array, ArrayRef, Float64Array, Int64Array, UInt32Array};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Column;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Aggregate, Cast, Expr, LogicalPlan, LogicalPlanBuilder, lit, when};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const UNITS: &str = "__fg_units";

impl Component {
    /// The aggregate computing this component from rows.
    fn over_rows(&self) -> Result<Expr, Error> {
        Ok(match self {
            Component::Rows => count(lit(1i64)),
            Component::Count(arg) => count(arg.clone()),
            Component::ClampedSum { arg, lo, hi } => sum(clamp(arg.clone(), *lo, *hi)?),
        })
    }
}

/// How one output aggregate is computed from the noisy components.
#[derive(Debug, Clone)]
enum Output {
    /// COUNT(*) or COUNT(col): one bounded count component.
    Count {
        comp: usize,
    },
    /// COUNT(DISTINCT unit): the number of units in the group.
    Units,
    Sum {
        comp: usize,
        bound: f64,
    },
    Avg {
        sum: usize,
        count: usize,
        lo: f64,
        hi: f64,
    },
}

/// The parameters of a DP release, from the strictest of the datasets
/// involved, tightened by the buyer.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub mechanism: DpMechanism,
    pub epsilon: f64,
    pub delta: f64,
    pub max_groups_per_unit: u64,
    pub max_rows_per_unit: u64,
    /// The share of ε that selects groups (when they are not public); by
    /// default an equal share beside each value's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection_share: Option<f64>,
}

/// A buyer's tightening of one query's DP releases: lower contribution
/// bounds (less noise for more clipping, a trade only the buyer can judge
/// for their question) and the split of ε between selection and values.
/// It never loosens what the owners set: ε is theirs, and a bound above
/// theirs is refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tightening {
    #[serde(default)]
    pub max_rows_per_unit: Option<u64>,
    #[serde(default)]
    pub max_groups_per_unit: Option<u64>,
    #[serde(default)]
    pub selection_share: Option<f64>,
}

impl Params {
    pub fn tightened(mut self, t: &Tightening) -> Result<Params, Error> {
        let tighten = |what: &str, owners: u64, asked: Option<u64>| match asked {
            None => Ok(owners),
            Some(n) if (1..=owners).contains(&n) => Ok(n),
            Some(_) => Err(Error::InvalidRequest(format!(
                "dp.{what} may only tighten the datasets' bound: 1 to {owners}"
            ))),
        };
        self.max_rows_per_unit = tighten(
            "max_rows_per_unit",
            self.max_rows_per_unit,
            t.max_rows_per_unit,
        )?;
        self.max_groups_per_unit = tighten(
            "max_groups_per_unit",
            self.max_groups_per_unit,
            t.max_groups_per_unit,
        )?;
        if let Some(share) = t.selection_share {
            if !(0.05..=0.95).contains(&share) {
                return Err(Error::InvalidRequest(
                    "dp.selection_share must lie between 0.05 and 0.95".into(),
                ));
            }
            self.selection_share = Some(share);
        }
        Ok(self)
    }

    pub fn strictest<'a>(rules: impl Iterator<Item = &'a DpRules>) -> Option<Params> {
        let mut out: Option<Params> = None;
        for r in rules {
            let p = Params {
                mechanism: r.mechanism,
                epsilon: r.epsilon_per_query,
                delta: r.delta,
                max_groups_per_unit: r.max_groups_per_unit.unwrap_or(1),
                max_rows_per_unit: r.max_rows_per_unit.unwrap_or(1),
                selection_share: None,
            };
            out = Some(match out {
                None => p,
                Some(o) => Params {
                    // Pure epsilon wins when the datasets disagree.
                    mechanism: if o.mechanism == p.mechanism {
                        o.mechanism
                    } else {
                        DpMechanism::Laplace
                    },
                    epsilon: o.epsilon.min(p.epsilon),
                    delta: o.delta.min(p.delta),
                    max_groups_per_unit: o.max_groups_per_unit.min(p.max_groups_per_unit),
                    max_rows_per_unit: o.max_rows_per_unit.min(p.max_rows_per_unit),
                    selection_share: None,
                },
            });
        }
        out
    }
}

/// A DP job: how to read the engine's output and what noise to add.
#[derive(Debug, Clone)]
pub struct DpJob {
    pub params: Params,
    groups: usize,
    components: usize,
    outputs: Vec<Output>,
    pub min_group_size: u64,
    /// The groups to release when they are public; else they are selected
    /// from the data by a noisy unit count.
    public: Option<Partitions>,
}

fn dp_refusal(message: impl Into<String>) -> Error {
    Refusal::new("dp_unsupported", message).into()
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

fn strip_alias_and_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias_and_casts(&a.expr),
        Expr::Cast(Cast { expr, .. }) => strip_alias_and_casts(expr),
        other => other,
    }
}

/// Declared bounds of the table column an aggregate argument is, traced
/// through the plan (a renamed or computed column has none).
fn bounds_of(arg: &Expr, input: &LogicalPlan, catalog: &Catalog) -> Option<(f64, f64)> {
    let Expr::Column(c) = strip_alias_and_casts(arg) else {
        return None;
    };
    let (table, column) = super::base_column(input, c)?;
    let [lo, hi] = catalog.get(&table)?.manifest.column(&column)?.bounds?;
    Some((lo, hi))
}

fn clamp(e: Expr, lo: f64, hi: f64) -> Result<Expr, Error> {
    crate::catalog::clamped(e, lo, hi).map_err(internal)
}

/// What the splitter knows about the rows under a DP aggregate.
pub struct Shape<'a> {
    /// Every group key holds one value per unit.
    pub one_group_per_unit: bool,
    /// The unit summary that can stand for the rows, if any.
    pub summary: Option<&'a super::summary::Source>,
    /// The most groups the release may have.
    pub max_groups: u64,
    /// The rows come from a copy clustered by unit, so that each unit's
    /// rows can be bounded as they stream past (see `StreamedBounds`).
    pub streams_by_unit: bool,
}

/// The privacy unit under a DP aggregate: its column in the input, and
/// every column that is the unit under another name.
pub struct Unit<'a> {
    pub column: Column,
    pub aliases: &'a HashSet<Column>,
}

/// Builds the engine plan of a DP aggregate over `input`, which carries the
/// privacy unit in `unit`. Output: the group columns, the exact components,
/// and the number of units per group, last.
pub fn plan(
    agg: &Aggregate,
    input: LogicalPlan,
    unit: Unit,
    params: Params,
    min_group_size: u64,
    catalog: &Catalog,
    shape: Shape,
) -> Result<(LogicalPlan, DpJob), Error> {
    let Unit {
        column: unit,
        aliases: unit_aliases,
    } = unit;
    if agg
        .group_expr
        .iter()
        .any(|g| matches!(g, Expr::GroupingSet(_)))
    {
        return Err(dp_refusal(
            "GROUPING SETS, ROLLUP and CUBE are not supported under differential privacy",
        ));
    }
    let mut components: Vec<Component> = Vec::new();
    let mut outputs = Vec::new();
    for e in &agg.aggr_expr {
        let Expr::AggregateFunction(AggregateFunction { func, params: p }) =
            strip_alias_and_casts(e)
        else {
            return Err(dp_refusal("only aggregate function calls can be released"));
        };
        if p.filter.is_some() || !p.order_by.is_empty() {
            return Err(dp_refusal(
                "FILTER and ORDER BY inside aggregates are not supported under differential privacy",
            ));
        }
        let name = func.name().to_ascii_lowercase();
        let arg = p.args.first();
        let is_unit = arg.is_some_and(
            |a| matches!(strip_alias_and_casts(a), Expr::Column(c) if unit_aliases.contains(c)),
        );
        // Outputs over the same exact value share it (`COUNT(*)` twice,
        // `SUM(x)` beside `AVG(x)`); each still draws its own noise.
        let push = |components: &mut Vec<Component>, expr: Component| match components
            .iter()
            .position(|c| *c == expr)
        {
            Some(i) => i,
            None => {
                components.push(expr);
                components.len() - 1
            }
        };
        let output = match (name.as_str(), p.distinct) {
            ("count", true) if is_unit => Output::Units,
            ("count", false) => {
                let counted = match arg.map(strip_alias_and_casts) {
                    None | Some(Expr::Literal(..)) => Component::Rows,
                    Some(_) => Component::Count(p.args[0].clone()),
                };
                Output::Count {
                    comp: push(&mut components, counted),
                }
            }
            ("sum", false) | ("avg", false) => {
                let arg = arg.ok_or_else(|| dp_refusal("SUM and AVG need an argument"))?;
                let (lo, hi) = bounds_of(arg, &input, catalog).ok_or_else(|| {
                    dp_refusal("SUM and AVG are released only over a column with declared bounds, named directly")
                })?;
                let summed = Component::ClampedSum {
                    arg: arg.clone(),
                    lo,
                    hi,
                };
                let s = push(&mut components, summed);
                if name == "sum" {
                    Output::Sum {
                        comp: s,
                        bound: lo.abs().max(hi.abs()),
                    }
                } else {
                    let c = push(&mut components, Component::Count(arg.clone()));
                    Output::Avg {
                        sum: s,
                        count: c,
                        lo,
                        hi,
                    }
                }
            }
            (other, distinct) => {
                let what = if distinct {
                    format!("{other}(DISTINCT …) other than of the privacy unit")
                } else {
                    other.to_string()
                };
                return Err(dp_refusal(format!(
                    "{what} cannot be released under differential privacy; use COUNT, COUNT(DISTINCT unit), SUM or AVG"
                )));
            }
        };
        outputs.push(output);
    }
    if outputs.len() > MAX_OUTPUTS {
        return Err(Error::ResourceLimit(format!(
            "a differentially private release has at most {MAX_OUTPUTS} aggregates; this one has {}",
            outputs.len()
        )));
    }

    // Public groups each draw every output's noise: their number is capped
    // so that the release stays a bounded piece of work.
    let most_public = shape
        .max_groups
        .min(MAX_PUBLIC_DRAWS / outputs.len().max(1) as u64);
    let public = Partitions::of(agg, &input, catalog, most_public);

    // One row per (unit, group) with the unit's bounded components: read
    // off the unit summary when it covers the query, else aggregated from
    // the rows. Each unit then keeps at most max_groups_per_unit groups and
    // max_rows_per_unit rows over them (see `BoundContributions`). When
    // every unit falls into one group (no keys, or keys measured at
    // registration to hold one value per unit, or the summary's one row
    // per unit), the group bound holds by itself and the unit's rows before
    // its group are none: its components are only scaled to max_rows.
    let groups = agg.group_expr.len();
    let summarised = shape
        .summary
        .and_then(|s| s.dp_level1(&agg.group_expr, &components, &input));
    let level2 = match summarised {
        None if shape.streams_by_unit => {
            streamed(input, unit, &agg.group_expr, &components, &params)?
        }
        summarised => hashed(
            summarised,
            input,
            unit,
            agg,
            &components,
            &params,
            shape.one_group_per_unit,
        )?,
    };
    let job = DpJob {
        params,
        groups,
        components: components.len(),
        outputs,
        min_group_size,
        public,
    };
    job.check_samplable()?;
    Ok((level2, job))
}

/// The per-group sums of bounded components from the unit summary's
/// level-1 rows, if given, else from an aggregation of the rows by (unit,
/// group).
fn hashed(
    summarised: Option<LogicalPlan>,
    input: LogicalPlan,
    unit: Column,
    agg: &Aggregate,
    components: &[Component],
    params: &Params,
    one_group_per_unit: bool,
) -> Result<LogicalPlan, Error> {
    let groups = agg.group_expr.len();
    let max_rows = params.max_rows_per_unit as f64;
    let (level1, one_group_per_unit) = match summarised {
        Some(level1) => (level1, true),
        None => (
            per_unit_group(input, unit, &agg.group_expr, components)?,
            groups == 0 || one_group_per_unit,
        ),
    };
    let level1b = if one_group_per_unit {
        scaled(
            LogicalPlanBuilder::from(level1),
            groups,
            components.len(),
            max_rows,
            |_| lit(0i64),
        )?
    } else {
        let bounds = Bounds {
            keys: groups,
            components: components.len(),
            max_groups: params.max_groups_per_unit,
            max_rows: params.max_rows_per_unit,
        };
        BoundContributions::try_new(level1, bounds)
            .map_err(internal)?
            .into_plan()
    };
    let cols1b = level1b.schema().columns();

    // Level 2: sum the bounded components per group; rows here are units.
    let group2: Vec<Expr> = cols1b[..groups].iter().cloned().map(Expr::Column).collect();
    let mut aggs2: Vec<Expr> = (0..components.len())
        .map(|i| sum(Expr::Column(cols1b[groups + i].clone())).alias(format!("__fg_s{i}")))
        .collect();
    aggs2.push(count(lit(1i64)).alias(UNITS));
    LogicalPlanBuilder::from(level1b)
        .aggregate(group2, aggs2)
        .and_then(|b| b.build())
        .map_err(internal)
}

/// The same per-group sums from rows that arrive clustered by unit: each
/// unit bounded as its rows stream past, with no aggregation by (unit,
/// group) (see [`StreamedBounds`]). The operator sums per partition; the
/// aggregate above adds the partitions up.
fn streamed(
    input: LogicalPlan,
    unit: Column,
    group_expr: &[Expr],
    components: &[Component],
    params: &Params,
) -> Result<LogicalPlan, Error> {
    let mut exprs = vec![Expr::Column(unit).alias("__fg_streamed_unit")];
    exprs.extend(group_expr.iter().cloned());
    let mut values = Vec::new();
    for (i, c) in components.iter().enumerate() {
        let (value, column) = match c {
            Component::Rows => (Value::Rows, None),
            Component::Count(arg) => (Value::NonNull, Some(arg.clone())),
            Component::ClampedSum { arg, lo, hi } => {
                (Value::Sum, Some(clamp(arg.clone(), *lo, *hi)?))
            }
        };
        values.push(value);
        exprs.extend(column.map(|e| e.alias(format!("__fg_v{i}"))));
    }
    let layout = Layout {
        keys: group_expr.len(),
        values,
        max_groups: params.max_groups_per_unit,
        max_rows: params.max_rows_per_unit,
    };
    let rows = LogicalPlanBuilder::from(input)
        .project(exprs)
        .and_then(|b| b.build())
        .map_err(internal)?;
    let partials = StreamedBounds::try_new(rows, layout)
        .map_err(internal)?
        .into_plan();
    let cols = partials.schema().columns();
    let keys: Vec<Expr> = cols[..group_expr.len()]
        .iter()
        .cloned()
        .map(Expr::Column)
        .collect();
    let mut sums: Vec<Expr> = (0..components.len())
        .map(|i| sum(Expr::Column(Column::from_name(partial_name(i)))).alias(format!("__fg_s{i}")))
        .collect();
    // Without keys the aggregate answers one row even over no partitions' rows.
    sums.push(
        datafusion::functions::expr_fn::coalesce(vec![
            sum(Expr::Column(Column::from_name(KEPT_UNITS))),
            lit(0i64),
        ])
        .alias(UNITS),
    );
    LogicalPlanBuilder::from(partials)
        .aggregate(keys, sums)
        .and_then(|b| b.build())
        .map_err(internal)
}

/// One row per (unit, group) of `input`: the unit, the group keys, the
/// exact components, and the rows.
fn per_unit_group(
    input: LogicalPlan,
    unit: Column,
    group_expr: &[Expr],
    components: &[Component],
) -> Result<LogicalPlan, Error> {
    let mut group1 = vec![Expr::Column(unit)];
    group1.extend(group_expr.iter().cloned());
    let mut aggs1: Vec<Expr> = Vec::new();
    for (i, c) in components.iter().enumerate() {
        aggs1.push(c.over_rows()?.alias(format!("__fg_c{i}")));
    }
    aggs1.push(count(lit(1i64)).alias("__fg_rows"));
    LogicalPlanBuilder::from(input)
        .aggregate(group1, aggs1)
        .and_then(|b| b.build())
        .map_err(internal)
}

/// Per-(unit, group) rows — the unit, the group keys, the components, the
/// rows — with each component scaled to the rows the unit may still add:
/// `max_rows` less what `rows_before(rows)` says its earlier groups added,
/// at least none and at most the group's rows.
fn scaled(
    builder: LogicalPlanBuilder,
    groups: usize,
    components: usize,
    max_rows: f64,
    rows_before: impl FnOnce(Expr) -> Expr,
) -> Result<LogicalPlan, Error> {
    let cols1 = builder.schema().columns();
    let rows1 = Expr::Column(cols1[1 + groups + components].clone());
    let as_f64 = |e: Expr| Expr::Cast(Cast::new(Box::new(e), DataType::Float64));
    let left = lit(max_rows) - as_f64(rows_before(rows1.clone()));
    let allowed = when(left.clone().lt(lit(0.0)), lit(0.0))
        .when(
            left.clone().gt(as_f64(rows1.clone())),
            as_f64(rows1.clone()),
        )
        .otherwise(left)
        .map_err(internal)?;
    let factor = allowed / as_f64(rows1);
    let mut bounded: Vec<Expr> = cols1[1..=groups]
        .iter()
        .cloned()
        .map(Expr::Column)
        .collect();
    for i in 0..components {
        let c = as_f64(Expr::Column(cols1[1 + groups + i].clone()));
        bounded.push((c * factor.clone()).alias(bounded_name(i)));
    }
    builder
        .project(bounded)
        .and_then(|b| b.build())
        .map_err(internal)
}

/// The same bounds in SQL — an aggregation by (unit, group), then a window
/// sorted by (unit, rank, group) that ranks each unit's groups and runs its
/// rows —
/// as releases computed them before [`BoundContributions`]: the reference
/// the operator is tested against.
#[cfg(test)]
pub(crate) mod in_sql {
    use super::*;
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::functions_window::expr_fn::row_number;
    use datafusion::logical_expr::expr::WindowFunction;
    use datafusion::logical_expr::{
        ColumnarValue, ExprFunctionExt, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
        Volatility, WindowFunctionDefinition,
    };

    /// `rank(unit, key, …)`: [`crate::engine::bound::rank_groups`] in SQL.
    #[derive(Debug, PartialEq, Eq, Hash)]
    struct Rank(Signature);

    impl ScalarUDFImpl for Rank {
        fn name(&self) -> &str {
            "__fg_group_rank"
        }

        fn signature(&self) -> &Signature {
            &self.0
        }

        fn return_type(&self, _args: &[DataType]) -> datafusion::common::Result<DataType> {
            Ok(DataType::UInt64)
        }

        fn invoke_with_args(
            &self,
            args: ScalarFunctionArgs,
        ) -> datafusion::common::Result<ColumnarValue> {
            let columns = ColumnarValue::values_to_arrays(&args.args)?;
            let mut ranks = Vec::new();
            crate::engine::bound::rank_groups(&columns[0], &columns[1..], &mut ranks)?;
            Ok(ColumnarValue::Array(Arc::new(
                datafusion::arrow::array::UInt64Array::from(ranks),
            )))
        }
    }

    /// The reference for one [`BoundContributions`] node over `level1`.
    pub fn bounds(level1: LogicalPlan, b: &Bounds) -> LogicalPlan {
        let cols1 = level1.schema().columns();
        let unit1 = Expr::Column(cols1[0].clone());
        let rows1 = Expr::Column(cols1[1 + b.keys + b.components].clone());
        let rank = ScalarUDF::new_from_impl(Rank(Signature::variadic_any(Volatility::Immutable)));
        let ranked = rank.call(cols1[..=b.keys].iter().cloned().map(Expr::Column).collect());
        let order: Vec<_> = std::iter::once(ranked.sort(true, true))
            .chain(
                cols1[1..=b.keys]
                    .iter()
                    .map(|g| Expr::Column(g.clone()).sort(true, true)),
            )
            .collect();
        let rank = row_number()
            .partition_by(vec![unit1.clone()])
            .order_by(order.clone())
            .build()
            .unwrap()
            .alias("__fg_rank");
        let running = Expr::WindowFunction(Box::new(WindowFunction::new(
            WindowFunctionDefinition::AggregateUDF(sum_udaf()),
            vec![rows1],
        )))
        .partition_by(vec![unit1])
        .order_by(order)
        .build()
        .unwrap()
        .alias("__fg_running_rows");
        let builder = LogicalPlanBuilder::from(level1)
            .window(vec![rank, running])
            .unwrap()
            .filter(Expr::Column(Column::from_name("__fg_rank")).lt_eq(lit(b.max_groups as i64)))
            .unwrap();
        scaled(builder, b.keys, b.components, b.max_rows as f64, |rows| {
            Expr::Column(Column::from_name("__fg_running_rows")) - rows
        })
        .unwrap()
    }

    /// `plan` with every [`BoundContributions`] node replaced by its reference.
    pub fn everywhere(plan: LogicalPlan) -> LogicalPlan {
        plan.transform_up(|node| {
            if let LogicalPlan::Extension(e) = &node
                && let Some(b) = e.node.as_any().downcast_ref::<BoundContributions>()
            {
                return Ok(Transformed::yes(bounds(
                    e.node.inputs()[0].clone(),
                    b.bounds(),
                )));
            }
            Ok(Transformed::no(node))
        })
        .unwrap()
        .data
    }
}

/// What a DP release reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mechanism: &'static str,
    pub epsilon: f64,
    pub delta: f64,
    pub max_groups_per_unit: u64,
    pub max_rows_per_unit: u64,
    /// `public`: every group of the keys' declared domains is released;
    /// `selected`: groups are selected from the data by a noisy unit count.
    pub partitions: &'static str,
    /// Selected groups are released when their noisy unit count reaches this.
    pub selection_threshold: Option<f64>,
    /// Per released column: the noise scale and the half-width of its 95% interval.
    pub columns: Vec<ColumnNoise>,
}

impl Report {
    /// Names each column as the answer does, where `names` knows it.
    pub fn name_columns(&mut self, names: &std::collections::HashMap<String, String>) {
        for c in &mut self.columns {
            if let Some(name) = names.get(&c.column) {
                c.column = name.clone();
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ColumnNoise {
    pub column: String,
    /// Absent for AVG: a ratio of two noisy values, whose error depends on the group's size.
    pub scale: Option<f64>,
    pub error_95: Option<f64>,
}

/// Sums are noised in fixed point with this many units per 1.
const FIXED: f64 = 100.0;

/// The Gaussian noise, per unit of L2 sensitivity, for `k` values that
/// together must be (ε, δ)-DP: the tighter of classic composition (each
/// value (ε/k, δ/k)-DP, σ = sqrt(2 ln(1.25k/δ))·k/ε) and zero-concentrated
/// DP (each value ρ/k-zCDP, σ = sqrt(k/2ρ), where ρ-zCDP implies
/// (ρ + 2 sqrt(ρ ln(1/δ)), δ)-DP; Bun & Steinke 2016, and Canonne, Kamath &
/// Steinke 2020 for the discrete Gaussian).
fn gaussian_sigma(epsilon: f64, delta: f64, k: f64) -> f64 {
    let classic = (2.0 * (1.25 * k / delta).ln()).sqrt() * k / epsilon;
    let l = (1.0 / delta).ln();
    let rho = ((l + epsilon).sqrt() - l.sqrt()).powi(2);
    let zcdp = (k / (2.0 * rho)).sqrt();
    classic.min(zcdp)
}

impl DpJob {
    /// How many noisy values each released group draws.
    fn value_draws(&self) -> usize {
        self.outputs
            .iter()
            .map(|o| {
                if matches!(o, Output::Avg { .. }) {
                    2
                } else {
                    1
                }
            })
            .sum()
    }

    /// The ε the group selection uses: none when the groups are public, else
    /// the buyer's share or an equal share beside the values'.
    fn selection_epsilon(&self) -> f64 {
        let equal = 1.0 / (self.value_draws() + 1) as f64;
        match self.public {
            Some(_) => 0.0,
            None => self.params.epsilon * self.params.selection_share.unwrap_or(equal),
        }
    }

    /// The δ the group selection uses (none when the groups are public).
    fn selection_delta(&self) -> f64 {
        match (&self.public, self.params.mechanism) {
            (Some(_), _) => 0.0,
            (None, DpMechanism::Laplace) => self.params.delta,
            (None, DpMechanism::Gaussian) => self.params.delta / 2.0,
        }
    }

    /// Noise for a released value whose L1 and L2 sensitivities are given,
    /// the values sharing what selection leaves. Laplace: each value an
    /// equal share of ε, scale L1/ε. Gaussian: see [`gaussian_sigma`].
    fn value_noise(&self, l1: f64, l2: f64) -> Noise {
        let k = self.value_draws() as f64;
        let epsilon = self.params.epsilon - self.selection_epsilon();
        match self.params.mechanism {
            DpMechanism::Laplace => Noise::laplace(l1 * k / epsilon),
            DpMechanism::Gaussian => {
                let delta = self.params.delta - self.selection_delta();
                Noise::gaussian(l2 * gaussian_sigma(epsilon, delta, k))
            }
        }
    }

    /// Exact Gaussian sampling works on 128-bit integers, which hold standard
    /// deviations up to about a million; larger ones (sums of wide bounds)
    /// are refused at plan time rather than sampled inexactly.
    fn check_samplable(&self) -> Result<(), Error> {
        if self.params.mechanism != DpMechanism::Gaussian {
            return Ok(());
        }
        let widest = self
            .outputs
            .iter()
            .map(|o| match o {
                Output::Count { .. } => self.count_noise().scale(),
                Output::Units => self.unit_noise().scale(),
                Output::Sum { bound, .. } => self.sum_noise(*bound).scale(),
                Output::Avg { lo, hi, .. } => self.sum_noise(lo.abs().max(hi.abs())).scale(),
            })
            .fold(0.0, f64::max);
        if widest > 1e6 {
            return Err(dp_refusal(
                "the Gaussian noise this release needs is too wide to sample exactly; the dataset should use Laplace",
            ));
        }
        Ok(())
    }

    /// A unit adds at most max_rows_per_unit rows over all groups.
    fn count_noise(&self) -> Noise {
        let rows = self.params.max_rows_per_unit as f64;
        self.value_noise(rows, rows)
    }

    /// A unit is one of the persons of at most max_groups_per_unit groups.
    fn unit_noise(&self) -> Noise {
        let groups = self.params.max_groups_per_unit as f64;
        self.value_noise(groups, groups.sqrt())
    }

    /// The selection's noise: always Laplace, so that its tail bound gives δ.
    fn selection_noise(&self) -> Noise {
        Noise::laplace(self.params.max_groups_per_unit as f64 / self.selection_epsilon())
    }

    /// ... each of them clamped to the column's bounds (in fixed point).
    fn sum_noise(&self, bound: f64) -> Noise {
        let l1 = self.params.max_rows_per_unit as f64 * bound * FIXED;
        self.value_noise(l1, l1)
    }

    /// A new group (one unit, in up to max_groups groups) is released with
    /// probability at most delta. `None` when the groups are public.
    pub fn selection_threshold(&self) -> Option<f64> {
        if self.public.is_some() {
            return None;
        }
        let b = self.selection_noise().scale();
        let l0 = self.params.max_groups_per_unit as f64;
        let tau = 1.0 + b * (l0 / (2.0 * self.selection_delta().max(1e-300))).ln();
        Some(tau.max(self.min_group_size as f64))
    }

    pub fn report(&self, schema: &SchemaRef) -> Report {
        let columns = self
            .outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let name = schema.field(self.groups + i).name().clone();
                let (scale, error_95) = match o {
                    Output::Count { .. } => (
                        Some(self.count_noise().scale()),
                        Some(self.count_noise().bound(0.95)),
                    ),
                    Output::Units => (
                        Some(self.unit_noise().scale()),
                        Some(self.unit_noise().bound(0.95)),
                    ),
                    Output::Sum { bound, .. } => {
                        let n = self.sum_noise(*bound);
                        (Some(n.scale() / FIXED), Some(n.bound(0.95) / FIXED))
                    }
                    Output::Avg { .. } => (None, None),
                };
                ColumnNoise {
                    column: name,
                    scale,
                    error_95,
                }
            })
            .collect();
        Report {
            mechanism: match self.params.mechanism {
                DpMechanism::Laplace => "discrete_laplace",
                DpMechanism::Gaussian => "discrete_gaussian",
            },
            epsilon: self.params.epsilon,
            delta: self.params.delta,
            max_groups_per_unit: self.params.max_groups_per_unit,
            max_rows_per_unit: self.params.max_rows_per_unit,
            partitions: match self.public {
                Some(_) => "public",
                None => "selected",
            },
            selection_threshold: self.selection_threshold(),
            columns,
        }
    }
}

/// Exact components from the engine; deliberately neither `Clone` nor
/// `Serialize`, and consumed by [`release`], so exact values cannot reach a response.
pub struct Exact(Vec<RecordBatch>);

impl Exact {
    pub fn new(batches: Vec<RecordBatch>) -> Exact {
        Exact(batches)
    }
}

/// How many groups are released between two looks at `stop`.
const CHUNK: usize = 1024;

/// The most outputs one DP release may have: each released group draws
/// noise for each, and a release must stay a bounded piece of work.
pub const MAX_OUTPUTS: usize = 64;

/// The most noisy values a release over public groups draws (groups × outputs).
const MAX_PUBLIC_DRAWS: u64 = 1 << 20;

/// Releases the groups with noisy values: every public group, or the groups
/// selected by a noisy count of units. Returns the released batches (in the
/// aggregate's own schema) and how many groups were released. Stops with
/// `resource_limit` when `stop` says the query is gone (timed out, or its
/// client hung up).
pub fn release(
    exact: Exact,
    job: &DpJob,
    schema: &SchemaRef,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<(Vec<RecordBatch>, u64), Error> {
    match &job.public {
        Some(partitions) => release_public(exact, job, partitions, schema, stop),
        None => release_selected(exact, job, schema, stop),
    }
}

fn cancelled() -> Error {
    Error::ResourceLimit("the query was cancelled while its release was drawn".into())
}

/// One engine batch's exact values: per component, and the units, per row.
struct ExactColumns {
    components: Vec<Vec<Option<f64>>>,
    units: Vec<Option<f64>>,
}

impl ExactColumns {
    fn of(batch: &RecordBatch, job: &DpJob) -> Result<ExactColumns, Error> {
        let n = batch.num_rows();
        let f64_col = |i: usize| -> Result<Vec<Option<f64>>, Error> {
            let c = cast(batch.column(i), &DataType::Float64).map_err(internal)?;
            let a = c
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| internal("component not f64"))?;
            Ok((0..n)
                .map(|r| (!a.is_null(r)).then(|| a.value(r)))
                .collect())
        };
        Ok(ExactColumns {
            components: (0..job.components)
                .map(|i| f64_col(job.groups + i))
                .collect::<Result<_, _>>()?,
            units: f64_col(job.groups + job.components)?,
        })
    }

    fn row(&self, row: usize) -> (Vec<Option<f64>>, f64) {
        (
            self.components.iter().map(|c| c[row]).collect(),
            self.units[row].unwrap_or(0.0),
        )
    }
}

/// Every candidate group draws its selection noise; only selected groups
/// draw value noise (how many were selected the answer shows anyway).
fn release_selected(
    exact: Exact,
    job: &DpJob,
    schema: &SchemaRef,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<(Vec<RecordBatch>, u64), Error> {
    let Some(tau) = job.selection_threshold() else {
        return Err(internal("selection without a threshold"));
    };
    let select = |batch: &RecordBatch| -> Result<(RecordBatch, u64), Error> {
        let columns = ExactColumns::of(batch, job)?;
        let mut keep: Vec<u32> = Vec::new();
        let mut values: Vec<Vec<Option<f64>>> = vec![Vec::new(); job.outputs.len()];
        let selection = noise::take_many(job.selection_noise(), batch.num_rows());
        for (row, &noise) in selection.iter().enumerate() {
            if row % CHUNK == 0 && stop() {
                return Err(cancelled());
            }
            let (components, units) = columns.row(row);
            let noisy_units = units + noise as f64;
            if noisy_units < tau {
                continue;
            }
            keep.push(row as u32);
            for (v, o) in values.iter_mut().zip(&job.outputs) {
                v.push(noisy_value(o, &components, units, job));
            }
        }
        let released = keep.len() as u64;
        let indices = UInt32Array::from(keep);
        let keys = (0..job.groups)
            .map(|g| take(batch.column(g), &indices, None).map_err(internal))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((released_batch(schema, job, keys, values)?, released))
    };
    let selected = on_every_core(&exact.0, &select)?;
    let released = selected.iter().map(|(_, n)| n).sum();
    Ok((selected.into_iter().map(|(b, _)| b).collect(), released))
}

/// `f` of every batch, the batches shared out between the machine's cores
/// (a release over hundreds of thousands of candidate groups draws as many
/// noise values); results in the batches' order.
fn on_every_core<T: Send>(
    batches: &[RecordBatch],
    f: &(dyn Fn(&RecordBatch) -> Result<T, Error> + Sync),
) -> Result<Vec<T>, Error> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cores.min(batches.len()).max(1);
    if workers == 1 {
        return batches.iter().map(f).collect();
    }
    let per_worker: Vec<Vec<(usize, Result<T, Error>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    (w..batches.len())
                        .step_by(workers)
                        .map(|i| (i, f(&batches[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut all: Vec<(usize, Result<T, Error>)> = per_worker.into_iter().flatten().collect();
    if all.len() != batches.len() {
        return Err(internal("a release worker stopped"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

/// Every public group is released, found in the data or not (then its
/// exact values are zero): the work and the groups depend on the domains only.
fn release_public(
    exact: Exact,
    job: &DpJob,
    partitions: &Partitions,
    schema: &SchemaRef,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<(Vec<RecordBatch>, u64), Error> {
    let mut found = HashMap::new();
    let mut columns = Vec::with_capacity(exact.0.len());
    for (b, batch) in exact.0.iter().enumerate() {
        for row in 0..batch.num_rows() {
            if let Some(key) = partitions.key(&batch.columns()[..job.groups], row) {
                found.insert(key, (b, row));
            }
        }
        columns.push(ExactColumns::of(batch, job)?);
    }
    let absent = (vec![None; job.components], 0.0);
    let groups = partitions.groups();
    let mut out = Vec::new();
    for start in (0..groups).step_by(CHUNK) {
        if stop() {
            return Err(cancelled());
        }
        let end = (start + CHUNK).min(groups);
        let keys = partitions.key_columns(start..end).map_err(internal)?;
        let mut values: Vec<Vec<Option<f64>>> =
            vec![Vec::with_capacity(end - start); job.outputs.len()];
        for row in 0..end - start {
            let exact_row = partitions
                .key(&keys, row)
                .and_then(|k| found.get(&k))
                .map(|&(b, r)| columns[b].row(r));
            let (components, units) = exact_row.as_ref().unwrap_or(&absent);
            for (v, o) in values.iter_mut().zip(&job.outputs) {
                v.push(noisy_value(o, components, *units, job));
            }
        }
        out.push(released_batch(schema, job, keys, values)?);
    }
    Ok((out, groups as u64))
}

/// A released batch from group keys and noisy values only.
fn released_batch(
    schema: &SchemaRef,
    job: &DpJob,
    keys: Vec<ArrayRef>,
    values: Vec<Vec<Option<f64>>>,
) -> Result<RecordBatch, Error> {
    let mut columns: Vec<ArrayRef> = keys;
    for (i, v) in values.into_iter().enumerate() {
        let field = schema.field(job.groups + i);
        let array: ArrayRef = match field.data_type() {
            DataType::Int64 => Arc::new(Int64Array::from(
                v.into_iter()
                    .map(|x| x.map(|x| x.round() as i64))
                    .collect::<Vec<_>>(),
            )),
            other => {
                cast(&(Arc::new(Float64Array::from(v)) as ArrayRef), other).map_err(internal)?
            }
        };
        columns.push(array);
    }
    let rows = columns.first().map_or(0, |c| c.len());
    RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(internal)
}

fn noisy_value(o: &Output, components: &[Option<f64>], units: f64, job: &DpJob) -> Option<f64> {
    let noisy_count =
        |c: usize| components[c].unwrap_or(0.0) + noise::take(job.count_noise()) as f64;
    let noisy_sum = |c: usize, bound: f64| {
        let fixed = (components[c].unwrap_or(0.0) * FIXED).round()
            + noise::take(job.sum_noise(bound)) as f64;
        fixed / FIXED
    };
    Some(match *o {
        Output::Count { comp } => noisy_count(comp).max(0.0),
        Output::Units => (units + noise::take(job.unit_noise()) as f64).max(0.0),
        Output::Sum { comp, bound } => noisy_sum(comp, bound),
        Output::Avg { sum, count, lo, hi } => {
            let s = noisy_sum(sum, lo.abs().max(hi.abs()));
            let c = noisy_count(count).max(1.0);
            (s / c).clamp(lo, hi)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{Field, Schema};

    fn job() -> DpJob {
        DpJob {
            params: Params {
                mechanism: DpMechanism::Laplace,
                epsilon: 1.0,
                delta: 1e-6,
                max_groups_per_unit: 1,
                max_rows_per_unit: 1,
                selection_share: None,
            },
            groups: 1,
            components: 0,
            outputs: vec![Output::Units],
            min_group_size: 10,
            public: None,
        }
    }

    fn exact(units: i64, groups: usize) -> Exact {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new(UNITS, DataType::Int64, true),
        ]));
        let names: Vec<String> = (0..groups).map(|i| format!("g{i}")).collect();
        Exact::new(vec![
            RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from(names)),
                    Arc::new(Int64Array::from(vec![units; groups])),
                ],
            )
            .unwrap(),
        ])
    }

    fn out_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]))
    }

    #[test]
    fn the_noise_step_stops_when_its_query_is_gone() {
        let job = job();
        let gone = || true;
        let stopped = release(exact(10_000, 5_000), &job, &out_schema(), &gone);
        assert!(
            matches!(stopped, Err(Error::ResourceLimit(_))),
            "{stopped:?}"
        );
    }

    #[test]
    fn group_presence_is_decided_by_a_noisy_count() {
        let job = job();
        let tau = job.selection_threshold().unwrap();
        let go = || false;
        // Groups sitting exactly at the threshold come out about half the time:
        // whether a group appears is not an exact membership oracle.
        let (_, released) =
            release(exact(tau.round() as i64, 2000), &job, &out_schema(), &go).unwrap();
        let share = released as f64 / 2000.0;
        assert!(
            (0.35..0.65).contains(&share),
            "released {share} of groups at the threshold"
        );
        // Far below it: almost never. Each such group passes with a
        // probability of the order of delta, so one of 2,000 does in about
        // one run in a hundred; three would take a one-in-millions run.
        // Far above it: always.
        let (_, low) = release(exact(1, 2000), &job, &out_schema(), &go).unwrap();
        assert!(low <= 2, "{low} groups of one unit released");
        let (batches, high) =
            release(exact((tau * 3.0) as i64, 500), &job, &out_schema(), &go).unwrap();
        assert_eq!(high, 500);
        // Released values are noisy, not the exact count.
        let n = batches[0]
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let exact_share = n
            .iter()
            .flatten()
            .filter(|v| *v == (tau * 3.0) as i64)
            .count() as f64
            / 500.0;
        assert!(
            exact_share < 0.5,
            "{exact_share} of released values were exact"
        );
    }

    #[test]
    fn the_threshold_bounds_the_chance_of_releasing_a_new_group() {
        let job = job();
        // A single unit's group passes with probability at most delta.
        let b = job.selection_noise().scale();
        let tau = job.selection_threshold().unwrap();
        let p_release = 0.5 * (-(tau - 1.0) / b).exp();
        assert!(p_release <= job.params.delta * 1.0001, "{p_release}");
        assert!(tau >= job.min_group_size as f64);
    }
}

#[cfg(test)]
mod gaussian_tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema};

    #[test]
    fn gaussian_values_are_calibrated_to_l2_sensitivity_and_delta() {
        let job = DpJob {
            params: Params {
                mechanism: DpMechanism::Gaussian,
                epsilon: 1.0,
                delta: 1e-6,
                max_groups_per_unit: 4,
                max_rows_per_unit: 20,
                selection_share: None,
            },
            groups: 1,
            components: 1,
            outputs: vec![Output::Count { comp: 0 }],
            min_group_size: 10,
            public: None,
        };
        // Two draws: selection and the count; each gets epsilon 0.5, the count delta 0.5e-6.
        // Two draws: selection and the count. The selection gets ε 0.5 and half of
        // δ, the count the rest: σ is the tighter of classic and zCDP for one value.
        let classic = 20.0 * (2.0 * (1.25f64 / 0.5e-6).ln()).sqrt() / 0.5;
        let l = (1.0f64 / 0.5e-6).ln();
        let rho = ((l + 0.5).sqrt() - l.sqrt()).powi(2);
        let sigma = classic.min(20.0 / (2.0 * rho).sqrt());
        let noise = job.count_noise();
        assert!(matches!(noise, Noise::Gaussian { .. }));
        assert!(
            (noise.scale() - sigma).abs() / sigma < 1e-3,
            "{} vs {sigma}",
            noise.scale()
        );
        // The selection stays Laplace, with the other half of delta.
        assert!(matches!(job.selection_noise(), Noise::Laplace { .. }));
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        assert_eq!(job.report(&schema).mechanism, "discrete_gaussian");
    }

    #[test]
    fn several_gaussian_values_compose_through_zcdp_when_that_is_tighter() {
        // Four values at (1, 1e-6) together: zCDP beats splitting ε and δ four ways.
        let (epsilon, delta) = (1.0, 1e-6);
        let classic = (2.0 * (1.25f64 * 4.0 / delta).ln()).sqrt() * 4.0 / epsilon;
        let sigma = gaussian_sigma(epsilon, delta, 4.0);
        assert!(sigma < 0.75 * classic, "{sigma} vs {classic}");
        // And it is what ρ-zCDP needs: ρ = 4 · 1/(2σ²) converts back to ε ≤ 1.
        let rho = 4.0 / (2.0 * sigma * sigma);
        let back = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt();
        assert!(back <= epsilon * (1.0 + 1e-9), "{back}");
        // One value: never worse than the classic Gaussian.
        let one = (2.0 * (1.25f64 / delta).ln()).sqrt() / epsilon;
        assert!(gaussian_sigma(epsilon, delta, 1.0) <= one);
    }
}
