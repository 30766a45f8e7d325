//! A DP release's bounded per-group sums in one pass over rows that arrive
//! unit by unit.
//!
//! From rows in no particular order a release needs an aggregation keyed by
//! (unit, group) — a hash table over millions of keys — and then
//! [`super::bound::BoundContributions`]. When the rows come clustered by
//! unit ([`crate::catalog::clustered`]), each unit's rows are consecutive: the
//! operator collects one unit at a time, bounds it exactly as
//! `BoundContributions` does (at most `max_groups` groups, the first in
//! [`super::bound::rank_groups`] order, and `max_rows` rows over them, each
//! group's values scaled to the rows kept), and adds what the unit keeps to
//! its groups' sums. The only hash table is over the groups.
//!
//! When the groups are many, most of them kept by one or two units of a
//! partition, summing here is a second hash aggregation beside the one that
//! must add up the partitions anyway. Then the operator passes each kept
//! pair on as a row of its own and leaves the sums to that one aggregation,
//! planned over rows shuffled by group ([`AggregateOnce`]), as plain
//! DataFusion does for keys of high cardinality.
//!
//! Input: the unit, the group keys, then one column per value other than
//! [`Value::Rows`]. Output: rows of the group keys, each value's bounded sum
//! over some of the group's kept pairs (Float64, NULL when none gave one) and
//! how many pairs those were (Int64); a group may have several rows, which
//! the aggregate above adds up. The operator requires its input
//! partitioned and ordered by unit; DataFusion shuffles and sorts what does
//! not already come so.

use crate::catalog::clustered::unit_order;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, RecordBatch, UInt32Array,
    make_comparator,
};
use datafusion::arrow::compute::kernels::partition::partition;
use datafusion::arrow::compute::{cast, filter, take};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::arrow::row::{OwnedRow, RowConverter, Rows, SortField};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    EmitTo, Expr, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::{
    Distribution, EquivalenceProperties, LexRequirement, OrderingRequirements, Partitioning,
    PhysicalExpr, PhysicalSortRequirement,
};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    BaselineMetrics, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use futures::{StreamExt, TryStreamExt};
use std::cmp::Ordering;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// What one released value sums per (unit, group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd)]
pub enum Value {
    /// Its rows (no input column).
    Rows,
    /// Its non-NULL values of the input column.
    NonNull,
    /// The sum of the input column (Float64), NULL when every value is.
    Sum,
}

/// The bounds and the layout of the input.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct Layout {
    /// Group key columns, right after the unit.
    pub keys: usize,
    pub values: Vec<Value>,
    pub max_groups: u64,
    pub max_rows: u64,
}

impl Layout {
    fn input_columns(&self) -> usize {
        1 + self.keys + self.values.iter().filter(|v| **v != Value::Rows).count()
    }
}

/// The name of value `i`'s bounded sum in the output.
pub fn partial_name(i: usize) -> String {
    format!("__fg_p{i}")
}

/// The output's count of kept (unit, group) pairs.
pub const KEPT_UNITS: &str = "__fg_pu";

/// The metric of how many kept pairs left as rows of their own.
pub const PAIRS_PASSED: &str = "pairs_passed";

fn output_fields(keys: impl IntoIterator<Item = Arc<Field>>, values: usize) -> Vec<Arc<Field>> {
    let mut out: Vec<Arc<Field>> = keys.into_iter().collect();
    out.extend((0..values).map(|i| Arc::new(Field::new(partial_name(i), DataType::Float64, true))));
    out.push(Arc::new(Field::new(KEPT_UNITS, DataType::Int64, false)));
    out
}

/// The logical node over rows that carry their unit first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamedBounds {
    input: LogicalPlan,
    layout: Layout,
    schema: DFSchemaRef,
}

impl StreamedBounds {
    pub fn try_new(input: LogicalPlan, layout: Layout) -> Result<StreamedBounds> {
        let fields = input.schema();
        if fields.fields().len() != layout.input_columns() {
            return Err(DataFusionError::Plan(
                "streamed bounding: the input does not match its layout".into(),
            ));
        }
        let mut out: Vec<_> = (1..=layout.keys)
            .map(|i| {
                let (q, f) = fields.qualified_field(i);
                (q.cloned(), f.clone())
            })
            .collect();
        out.extend(
            output_fields([], layout.values.len())
                .into_iter()
                .map(|f| (None, f)),
        );
        let schema = Arc::new(DFSchema::new_with_metadata(out, Default::default())?);
        Ok(StreamedBounds {
            input,
            layout,
            schema,
        })
    }

    pub fn into_plan(self) -> LogicalPlan {
        LogicalPlan::Extension(datafusion::logical_expr::Extension {
            node: Arc::new(self),
        })
    }
}

impl PartialOrd for StreamedBounds {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        match self.input.partial_cmp(&other.input) {
            Some(std::cmp::Ordering::Equal) => self.layout.partial_cmp(&other.layout),
            other => other,
        }
    }
}

impl UserDefinedLogicalNodeCore for StreamedBounds {
    fn name(&self) -> &str {
        "StreamedBounds"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "StreamedBounds: keys={}, values={:?}, max_groups={}, max_rows={}",
            self.layout.keys, self.layout.values, self.layout.max_groups, self.layout.max_rows
        )
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let input = inputs
            .pop()
            .ok_or_else(|| DataFusionError::Internal("streamed bounding needs its input".into()))?;
        StreamedBounds::try_new(input, self.layout.clone())
    }
}

/// Plans [`StreamedBounds`] nodes.
#[derive(Debug)]
pub struct StreamedPlanner;

#[async_trait::async_trait]
impl ExtensionPlanner for StreamedPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn datafusion::catalog::Session,
        _context: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<StreamedBounds>() else {
            return Ok(None);
        };
        let [input] = physical_inputs else {
            return Err(DataFusionError::Internal(
                "streamed bounding has one input".into(),
            ));
        };
        Ok(Some(Arc::new(StreamedBoundsExec::new(
            input.clone(),
            node.layout.clone(),
        )?)))
    }
}

#[derive(Debug)]
pub struct StreamedBoundsExec {
    input: Arc<dyn ExecutionPlan>,
    layout: Layout,
    schema: SchemaRef,
    unit: Arc<dyn PhysicalExpr>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl StreamedBoundsExec {
    fn new(input: Arc<dyn ExecutionPlan>, layout: Layout) -> Result<Self> {
        let fields = input.schema();
        if fields.fields().len() != layout.input_columns() {
            return Err(DataFusionError::Plan(
                "streamed bounding: the input does not match its layout".into(),
            ));
        }
        let schema = Arc::new(Schema::new(output_fields(
            fields.fields()[1..=layout.keys].iter().cloned(),
            layout.values.len(),
        )));
        let unit = Arc::new(datafusion::physical_expr::expressions::Column::new(
            fields.field(0).name(),
            0,
        ));
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            EmissionType::Both,
            Boundedness::Bounded,
        ));
        Ok(StreamedBoundsExec {
            input,
            layout,
            schema,
            unit,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }
}

impl DisplayAs for StreamedBoundsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "StreamedBoundsExec: keys={}, max_groups={}, max_rows={}",
            self.layout.keys, self.layout.max_groups, self.layout.max_rows
        )
    }
}

impl ExecutionPlan for StreamedBoundsExec {
    fn name(&self) -> &str {
        "StreamedBoundsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        f(&self.unit)
    }

    /// Every row of a unit in one partition: the bounds hold per partition.
    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::KeyPartitioned(vec![self.unit.clone()])]
    }

    /// Each unit's rows one after another.
    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        let unit = PhysicalSortRequirement::new(self.unit.clone(), Some(unit_order()));
        vec![LexRequirement::new([unit]).map(OrderingRequirements::new)]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "streamed bounding has one input".into(),
            ));
        }
        Ok(Arc::new(StreamedBoundsExec::new(
            children.swap_remove(0),
            self.layout.clone(),
        )?))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context.clone())?;
        let reservation = MemoryConsumer::new(format!("StreamedBounds[{partition}]"))
            .register(context.memory_pool());
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let batch_size = context.session_config().batch_size();
        let units = Streamer::new(
            &self.input.schema(),
            self.layout.clone(),
            self.schema.clone(),
            reservation,
            batch_size as u64 / 2,
        )?;
        let passed = MetricBuilder::new(&self.metrics).counter(PAIRS_PASSED, partition);
        // Kept pairs leave as they are found once the operator emits them
        // as rows; the sums it holds leave at the end.
        let output = futures::stream::unfold(
            Some((input, units, baseline, passed)),
            move |state| async move {
                let (mut input, mut units, baseline, passed) = state?;
                loop {
                    let Some(batch) = input.next().await else {
                        let _timer = baseline.elapsed_compute().timer();
                        let sums = match units.finish() {
                            Ok(sums) => sums,
                            Err(e) => return Some((Err(e), None)),
                        };
                        baseline.record_output(sums.num_rows());
                        let chunks: Vec<_> = (0..sums.num_rows())
                            .step_by(batch_size.max(1))
                            .map(|at| Ok(sums.slice(at, batch_size.min(sums.num_rows() - at))))
                            .collect();
                        return Some((Ok(futures::stream::iter(chunks)), None));
                    };
                    let timer = baseline.elapsed_compute().timer();
                    match batch.and_then(|batch| units.add(&batch)) {
                        Ok(None) => continue,
                        Ok(Some(pairs)) => {
                            timer.done();
                            baseline.record_output(pairs.num_rows());
                            passed.add(pairs.num_rows());
                            let pairs = futures::stream::iter(vec![Ok(pairs)]);
                            return Some((Ok(pairs), Some((input, units, baseline, passed))));
                        }
                        Err(e) => return Some((Err(e), None)),
                    }
                }
            },
        )
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            output,
        )))
    }
}

/// Plans the aggregation that adds up [`StreamedBoundsExec`]'s rows as one
/// aggregation over rows shuffled by group, without the partial one
/// DataFusion puts first: the operator has already summed in its partition
/// where that pays (few groups), and where it does not, the partial step
/// would only hash every pair a second time.
#[derive(Debug)]
pub struct AggregateOnce;

impl PhysicalOptimizerRule for AggregateOnce {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_down(|plan| {
            let Some(last) = plan.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(plan));
            };
            let Some(shuffle) = last.input().downcast_ref::<RepartitionExec>() else {
                return Ok(Transformed::no(plan));
            };
            let Some(first) = shuffle.input().downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(plan));
            };
            let (AggregateMode::FinalPartitioned, AggregateMode::Partial, Partitioning::Hash(_, n)) =
                (last.mode(), first.mode(), shuffle.partitioning())
            else {
                return Ok(Transformed::no(plan));
            };
            if first.input().downcast_ref::<StreamedBoundsExec>().is_none() {
                return Ok(Transformed::no(plan));
            }
            let by_group = Partitioning::Hash(first.group_expr().input_exprs(), *n);
            let shuffled = RepartitionExec::try_new(first.input().clone(), by_group)?;
            let once = AggregateExec::try_new(
                AggregateMode::SinglePartitioned,
                first.group_expr().clone(),
                first.aggr_expr().to_vec(),
                first.filter_expr().to_vec(),
                Arc::new(shuffled),
                first.input_schema(),
            )?
            .with_limit_options(last.limit_options());
            Ok(Transformed::yes(Arc::new(once) as Arc<dyn ExecutionPlan>))
        })
        .data()
    }

    fn name(&self) -> &str {
        "AggregateOnce"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// What each group has been given.
struct Credit {
    width: usize,
    /// Per group and value: the sum of the bounded values, and whether any
    /// unit gave one.
    sums: Vec<f64>,
    seen: Vec<bool>,
    /// Per group: the units that kept it.
    units: Vec<i64>,
    /// The (unit, group) pairs added, over all groups.
    pairs: u64,
}

impl Credit {
    /// One unit's kept (unit, group): its values, scaled by `factor`.
    fn add(&mut self, group: usize, factor: f64, values: impl Iterator<Item = Option<f64>>) {
        for (i, v) in values.enumerate() {
            if let Some(v) = v {
                self.sums[group * self.width + i] += v * factor;
                self.seen[group * self.width + i] = true;
            }
        }
        self.units[group] += 1;
        self.pairs += 1;
    }
}

/// The share of a (unit, group)'s `rows` the unit may still add after
/// `rows_before` rows in its earlier groups: the arithmetic of
/// `BoundContributions`, in the same order, so that both give the same
/// values.
fn kept_share(max_rows: u64, rows_before: i64, rows: i64) -> f64 {
    let rows = rows as f64;
    let left = max_rows as f64 - rows_before as f64;
    let allowed = if left < 0.0 {
        0.0
    } else if left > rows {
        rows
    } else {
        left
    };
    allowed / rows
}

/// A run of rows' contribution to a value: the sum of its rows', NULL when
/// none has one.
fn value_over(value: Value, column: Option<&ArrayRef>, rows: Range<usize>) -> Option<f64> {
    match (value, column) {
        (Value::NonNull, Some(c)) => Some(rows.filter(|&row| c.is_valid(row)).count() as f64),
        (Value::Sum, Some(c)) => {
            let c = c.as_primitive::<Float64Type>();
            rows.fold(None, |acc, row| {
                c.is_valid(row)
                    .then(|| acc.unwrap_or(0.0) + c.value(row))
                    .or(acc)
            })
        }
        _ => Some(rows.len() as f64),
    }
}

/// Whether two values of `t` fall in one group exactly when arrow's
/// comparator finds them equal: flat types without floats. (Floats may
/// disagree on zeros and NaNs; nested and dictionary types could hide one.)
fn grouped_by_value(t: &DataType) -> bool {
    use DataType::*;
    t.is_integer()
        || t.is_temporal()
        || matches!(
            t,
            Boolean
                | Utf8
                | LargeUtf8
                | Utf8View
                | Binary
                | LargeBinary
                | BinaryView
                | Decimal128(..)
                | Decimal256(..)
        )
}

/// Adds a run's values to its group's, NULL staying NULL until a value comes.
fn merge_values(acc: &mut [Option<f64>], values: impl Iterator<Item = Option<f64>>) {
    for (acc, v) in acc.iter_mut().zip(values) {
        if let Some(v) = v {
            *acc = Some(acc.unwrap_or(0.0) + v);
        }
    }
}

/// A unit's first `max_groups` groups, taken in order, each with the share
/// of its rows the unit may still add.
fn kept_factors<'a>(
    layout: &Layout,
    entries: &'a [Entry],
) -> impl Iterator<Item = (&'a Entry, f64)> {
    let max_groups = usize::try_from(layout.max_groups).unwrap_or(usize::MAX);
    let max_rows = layout.max_rows;
    entries
        .iter()
        .take(max_groups)
        .scan(0i64, move |rows_before, e| {
            let factor = kept_share(max_rows, *rows_before, e.rows);
            *rows_before += e.rows;
            Some((e, factor))
        })
}

/// One (unit, group) of the unit being collected, or a run of its rows.
struct Entry {
    group: usize,
    /// The group's [`super::bound::rank_groups`] rank in its unit.
    rank: u64,
    rows: i64,
    /// Where its values start in the values beside it.
    at: usize,
}

/// One partition's state: the groups' sums, and the unit being collected.
struct Streamer {
    layout: Layout,
    schema: SchemaRef,
    /// Group ids by key; `None` without keys (one group).
    groups: Option<Box<dyn GroupValues>>,
    /// Per group id, its keys in row format (ordered as the keys are).
    key_rows: RowConverter,
    group_keys: Rows,
    /// The group and the rank of each run of the batch being added.
    ids: Vec<usize>,
    ranks: Vec<u64>,
    /// The runs whose group is looked up (`usize::MAX` in `ids` for the
    /// others), and what the batch's whole units keep: per unit its kept
    /// groups, each as a run of the group, its factor and its values.
    needed: Vec<u32>,
    needed_ids: Vec<usize>,
    kept: Vec<(u32, f64, usize)>,
    kept_values: Vec<Option<f64>>,
    unit_rows: RowConverter,
    last_unit: Option<OwnedRow>,
    credit: Credit,
    /// Whether the units bounded within one batch leave as rows, one per
    /// kept pair, rather than being summed here (see [`Streamer::add`]).
    as_pairs: bool,
    /// How many pairs are summed before the operator judges whether summing
    /// pays: half a batch.
    judge_after: u64,
    /// The current unit's runs of rows of one group, and their values.
    pending: Vec<Entry>,
    pending_values: Vec<Option<f64>>,
    entries: Vec<Entry>,
    entry_values: Vec<Option<f64>>,
    order: Vec<usize>,
    /// The runs of a unit being selected, by rank.
    by_rank: Vec<(u64, u32)>,
    reservation: MemoryReservation,
}

impl Streamer {
    fn new(
        input: &SchemaRef,
        layout: Layout,
        schema: SchemaRef,
        reservation: MemoryReservation,
        judge_after: u64,
    ) -> Result<Streamer> {
        let field = |i: usize| {
            SortField::new_with_options(input.field(i).data_type().clone(), unit_order())
        };
        let key_schema = Arc::new(Schema::new(input.fields()[1..=layout.keys].to_vec()));
        let groups = if layout.keys == 0 {
            None
        } else {
            Some(new_group_values(key_schema, &GroupOrdering::None)?)
        };
        let key_rows = RowConverter::new((1..=layout.keys).map(field).collect())?;
        let width = layout.values.len();
        let group_keys = key_rows.empty_rows(0, 0);
        Ok(Streamer {
            unit_rows: RowConverter::new(vec![field(0)])?,
            key_rows,
            group_keys,
            groups,
            layout,
            schema,
            ids: Vec::new(),
            ranks: Vec::new(),
            needed: Vec::new(),
            needed_ids: Vec::new(),
            kept: Vec::new(),
            kept_values: Vec::new(),
            last_unit: None,
            credit: Credit {
                width,
                sums: Vec::new(),
                seen: Vec::new(),
                units: Vec::new(),
                pairs: 0,
            },
            as_pairs: false,
            judge_after,
            pending: Vec::new(),
            pending_values: Vec::new(),
            entries: Vec::new(),
            entry_values: Vec::new(),
            order: Vec::new(),
            by_rank: Vec::new(),
            reservation,
        })
    }

    fn group_count(&self) -> usize {
        self.credit.units.len()
    }

    /// Gives each of the `needed` runs its group id from its keys (those of
    /// its first row), registering new groups.
    fn intern(&mut self, keys: &[ArrayRef], runs: usize) -> Result<()> {
        let before = self.group_count();
        let Some(groups) = self.groups.as_mut() else {
            self.ids.clear();
            self.ids.resize(runs, 0);
            if before == 0 {
                self.grow(1);
            }
            return Ok(());
        };
        if self.needed.is_empty() {
            return Ok(());
        }
        let keys = if self.needed.len() == runs {
            keys.to_vec()
        } else {
            let needed = UInt32Array::from_iter_values(self.needed.iter().copied());
            keys.iter()
                .map(|k| take(k.as_ref(), &needed, None))
                .collect::<std::result::Result<Vec<ArrayRef>, _>>()?
        };
        groups.intern(&keys, &mut self.needed_ids)?;
        self.ids.clear();
        if self.needed.len() == runs {
            self.ids.extend_from_slice(&self.needed_ids);
        } else {
            self.ids.resize(runs, usize::MAX);
            for (&run, &id) in self.needed.iter().zip(&self.needed_ids) {
                self.ids[run as usize] = id;
            }
        }
        let after = groups.len();
        if after > before {
            // Ids are handed out in order of first appearance.
            let mut firsts = Vec::with_capacity(after - before);
            for (run, &id) in self.needed_ids.iter().enumerate() {
                if id == before + firsts.len() {
                    firsts.push(run as u32);
                    if before + firsts.len() == after {
                        break;
                    }
                }
            }
            let firsts = UInt32Array::from(firsts);
            let new_keys = keys
                .iter()
                .map(|k| take(k.as_ref(), &firsts, None))
                .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
            let rows = self.key_rows.convert_columns(&new_keys)?;
            for row in rows.iter() {
                self.group_keys.push(row);
            }
            self.grow(after - before);
        }
        Ok(())
    }

    fn grow(&mut self, groups: usize) {
        let c = &mut self.credit;
        let total = c.units.len() + groups;
        c.sums.resize(total * c.width, 0.0);
        c.seen.resize(total * c.width, false);
        c.units.resize(total, 0);
    }

    /// Takes in a batch run by run: a run is rows of one unit and one group,
    /// one after another (one person's visits in one district), so groups
    /// are looked up and values summed once per run, not per row.
    ///
    /// Once the groups seen are more than half the pairs kept, the units
    /// bounded within a batch are no longer summed here: their kept pairs
    /// are returned as rows, and only units that straddle batches (or
    /// whose groups must be told apart by lookup) are.
    fn add(&mut self, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(None);
        }
        // Each value with its column (none for `Rows`).
        let mut next_column = 1 + self.layout.keys;
        let mut columns: Vec<(Value, Option<ArrayRef>)> =
            Vec::with_capacity(self.layout.values.len());
        for &v in &self.layout.values {
            let column = match v {
                Value::Rows => None,
                Value::NonNull => {
                    next_column += 1;
                    Some(batch.column(next_column - 1).clone())
                }
                Value::Sum => {
                    next_column += 1;
                    Some(cast(batch.column(next_column - 1), &DataType::Float64)?)
                }
            };
            columns.push((v, column));
        }
        let runs = partition(&batch.columns()[..=self.layout.keys])?.ranges();
        // The unit and the keys of each run.
        let (unit, keys) = if runs.len() == n {
            (
                batch.column(0).clone(),
                batch.columns()[1..=self.layout.keys].to_vec(),
            )
        } else {
            let starts = UInt32Array::from_iter_values(runs.iter().map(|r| r.start as u32));
            let at_starts = |c: &ArrayRef| take(c.as_ref(), &starts, None);
            (
                at_starts(batch.column(0))?,
                batch.columns()[1..=self.layout.keys]
                    .iter()
                    .map(at_starts)
                    .collect::<std::result::Result<Vec<ArrayRef>, _>>()?,
            )
        };
        super::bound::rank_groups(&unit, &keys, &mut self.ranks)?;
        // Each unit's runs, as ranges of runs.
        let units = partition(&[unit])?.ranges();
        let unit = batch.column(0);
        let first = self.unit_rows.convert_columns(&[unit.slice(0, 1)])?;
        let continues = self
            .last_unit
            .as_ref()
            .is_some_and(|last| last.row() == first.row(0));
        let last_unit = units.len() - 1;
        let values_of = |rows: Range<usize>| {
            columns
                .iter()
                .map(move |(v, c)| value_over(*v, c.as_ref(), rows.clone()))
        };
        // A unit of several runs that lies wholly in this batch is bounded
        // before any group is looked up, and only the groups it keeps are:
        // a person of twenty visit dates and a bound of four looks up four.
        // Runs are told apart by their keys' values, which is how groups
        // are for the flat types of `grouped_by_value`; other keys go the
        // way of every run.
        let selecting = self.groups.is_some()
            && self.layout.keys > 0
            && keys.iter().all(|k| grouped_by_value(k.data_type()));
        let compare = if selecting {
            keys.iter()
                .map(|k| make_comparator(k.as_ref(), k.as_ref(), unit_order()))
                .collect::<std::result::Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let compare = |a: usize, b: usize| {
            compare
                .iter()
                .map(|c| c(a, b))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        };
        let selected = |i: usize, unit_runs: &Range<usize>| {
            selecting && !(i == 0 && continues) && i < last_unit && unit_runs.len() > 1
        };
        // Most units lie within one batch and fall into one group: they
        // are bounded straight from the batch.
        let single = |i: usize, unit_runs: &Range<usize>| {
            !(i == 0 && continues) && i < last_unit && unit_runs.len() == 1
        };
        let as_pairs = self.as_pairs;
        self.needed.clear();
        self.kept.clear();
        self.kept_values.clear();
        let mut kept_by_unit = Vec::with_capacity(units.len());
        for (i, unit_runs) in units.iter().enumerate() {
            let from = self.kept.len();
            if selected(i, unit_runs) {
                self.select(unit_runs.clone(), &runs, compare, values_of);
                if !as_pairs {
                    self.needed.extend(self.kept[from..].iter().map(|k| k.0));
                }
            } else if as_pairs && single(i, unit_runs) {
                if self.layout.max_groups > 0 {
                    let rows = runs[unit_runs.start].clone();
                    let factor = kept_share(self.layout.max_rows, 0, rows.len() as i64);
                    self.kept
                        .push((unit_runs.start as u32, factor, self.kept_values.len()));
                    self.kept_values.extend(values_of(rows));
                }
            } else {
                self.needed.extend(unit_runs.clone().map(|r| r as u32));
            }
            kept_by_unit.push(from..self.kept.len());
        }
        self.intern(&keys, runs.len())?;
        let width = self.layout.values.len();
        for (i, unit_runs) in units.into_iter().enumerate() {
            let continuing = i == 0 && continues;
            if !continuing {
                self.finish_unit();
            }
            if as_pairs && (selected(i, &unit_runs) || single(i, &unit_runs)) {
                continue;
            }
            if selected(i, &unit_runs) {
                for &(run, factor, at) in &self.kept[kept_by_unit[i].clone()] {
                    let values = self.kept_values[at..at + width].iter().copied();
                    self.credit.add(self.ids[run as usize], factor, values);
                }
                continue;
            }
            if single(i, &unit_runs) {
                if self.layout.max_groups > 0 {
                    let rows = &runs[unit_runs.start];
                    let factor = kept_share(self.layout.max_rows, 0, rows.len() as i64);
                    self.credit
                        .add(self.ids[unit_runs.start], factor, values_of(rows.clone()));
                }
                continue;
            }
            for run in unit_runs {
                let rows = &runs[run];
                self.pending.push(Entry {
                    group: self.ids[run],
                    rank: self.ranks[run],
                    rows: rows.len() as i64,
                    at: self.pending_values.len(),
                });
                self.pending_values.extend(values_of(rows.clone()));
            }
        }
        let last = self.unit_rows.convert_columns(&[unit.slice(n - 1, 1)])?;
        self.last_unit = Some(last.row(0).owned());
        let held = self.groups.as_ref().map_or(0, |g| g.size())
            + self.group_keys.size()
            + self.credit.sums.capacity() * 9
            + self.credit.units.capacity() * 8
            + self.pending.capacity() * std::mem::size_of::<Entry>()
            + self.pending_values.capacity() * 16;
        self.reservation.try_resize(held)?;
        let pairs = if as_pairs {
            Some(self.kept_pairs(&keys)?)
        } else {
            self.as_pairs = self.layout.keys > 0
                && self.credit.pairs >= self.judge_after
                && self.group_count() as u64 * 2 > self.credit.pairs;
            None
        };
        Ok(pairs)
    }

    /// The batch's kept pairs as rows: each with its group's keys, its
    /// values scaled as [`Credit::add`] scales them, and one unit.
    fn kept_pairs(&self, keys: &[ArrayRef]) -> Result<RecordBatch> {
        let width = self.layout.values.len();
        let runs = UInt32Array::from_iter_values(self.kept.iter().map(|k| k.0));
        let mut columns = keys
            .iter()
            .map(|k| take(k.as_ref(), &runs, None))
            .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
        for i in 0..width {
            let values: Float64Array = self
                .kept
                .iter()
                .map(|&(_, factor, at)| self.kept_values[at + i].map(|v| v * factor))
                .collect();
            columns.push(Arc::new(values));
        }
        columns.push(Arc::new(Int64Array::from(vec![1i64; self.kept.len()])));
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// Bounds a unit whose runs all lie in the batch being added, as
    /// [`Streamer::finish_unit`] does, before its groups are looked up: its
    /// runs are ordered by rank and keys (`compare`), so that a group's runs
    /// fall together, in their order, and are merged. Records each kept
    /// group as one of its runs, its factor and its values.
    fn select<I: Iterator<Item = Option<f64>>>(
        &mut self,
        unit_runs: Range<usize>,
        runs: &[Range<usize>],
        compare: impl Fn(usize, usize) -> Ordering,
        values_of: impl Fn(Range<usize>) -> I,
    ) {
        let width = self.layout.values.len();
        let ranks = &self.ranks;
        self.by_rank.clear();
        self.by_rank.extend(unit_runs.map(|r| (ranks[r], r as u32)));
        // A group's runs share its rank and keep their order, as its rows
        // did. Two groups of one rank (one pair in 2^64) fall together
        // too, and are then ordered by their keys.
        self.by_rank.sort_unstable();
        if self
            .by_rank
            .windows(2)
            .any(|w| w[0].0 == w[1].0 && compare(w[0].1 as usize, w[1].1 as usize).is_ne())
        {
            self.by_rank.sort_unstable_by(|a, b| {
                a.0.cmp(&b.0)
                    .then_with(|| compare(a.1 as usize, b.1 as usize))
                    .then(a.1.cmp(&b.1))
            });
        }
        self.entries.clear();
        self.entry_values.clear();
        for &(_, r) in &self.by_rank {
            let r = r as usize;
            let rows = runs[r].len() as i64;
            let values = values_of(runs[r].clone());
            match self.entries.last_mut() {
                Some(e) if e.rank == ranks[r] && compare(e.group, r).is_eq() => {
                    e.rows += rows;
                    merge_values(&mut self.entry_values[e.at..e.at + width], values);
                }
                _ => {
                    self.entries.push(Entry {
                        group: r,
                        rank: ranks[r],
                        rows,
                        at: self.entry_values.len(),
                    });
                    self.entry_values.extend(values);
                }
            }
        }
        for (e, factor) in kept_factors(&self.layout, &self.entries) {
            self.kept
                .push((e.group as u32, factor, self.kept_values.len()));
            self.kept_values
                .extend_from_slice(&self.entry_values[e.at..e.at + width]);
        }
    }

    /// Bounds the collected unit and adds what it keeps to its groups.
    fn finish_unit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let width = self.layout.values.len();
        self.entries.clear();
        self.entry_values.clear();
        self.order.clear();
        self.order.extend(0..self.pending.len());
        let pending = &self.pending;
        if pending.iter().any(|r| r.group != pending[0].group) {
            // Stable: a group's runs keep their order, as its rows did.
            self.order.sort_by_key(|&r| pending[r].group);
        }
        let mut total_rows = 0u64;
        for &r in &self.order {
            let run = &pending[r];
            total_rows += run.rows as u64;
            let values = &self.pending_values[run.at..run.at + width];
            match self.entries.last_mut() {
                Some(e) if e.group == run.group => {
                    e.rows += run.rows;
                    merge_values(
                        &mut self.entry_values[e.at..e.at + width],
                        values.iter().copied(),
                    );
                }
                _ => {
                    self.entries.push(Entry {
                        group: run.group,
                        rank: run.rank,
                        rows: run.rows,
                        at: self.entry_values.len(),
                    });
                    self.entry_values.extend_from_slice(values);
                }
            }
        }
        let max_groups = usize::try_from(self.layout.max_groups).unwrap_or(usize::MAX);
        if self.entries.len() > 1
            && (self.entries.len() > max_groups || total_rows > self.layout.max_rows)
        {
            let keys = &self.group_keys;
            self.entries.sort_unstable_by(|a, b| {
                a.rank
                    .cmp(&b.rank)
                    .then_with(|| keys.row(a.group).cmp(&keys.row(b.group)))
            });
        }
        for (e, factor) in kept_factors(&self.layout, &self.entries) {
            let values = self.entry_values[e.at..e.at + width].iter().copied();
            self.credit.add(e.group, factor, values);
        }
        self.pending.clear();
        self.pending_values.clear();
    }

    fn finish(&mut self) -> Result<RecordBatch> {
        self.finish_unit();
        let width = self.layout.values.len();
        let count = self.group_count();
        let c = &self.credit;
        let kept = BooleanArray::from_iter((0..count).map(|g| Some(c.units[g] > 0)));
        let mut columns: Vec<ArrayRef> = match self.groups.as_mut() {
            Some(groups) => groups.emit(EmitTo::All)?,
            None => Vec::new(),
        };
        for i in 0..width {
            let sums: Float64Array = (0..count)
                .map(|g| c.seen[g * width + i].then(|| c.sums[g * width + i]))
                .collect();
            columns.push(Arc::new(sums));
        }
        columns.push(Arc::new(Int64Array::from(c.units.clone())));
        let columns = columns
            .iter()
            .map(|c| filter(c.as_ref(), &kept))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let rows = kept.true_count();
        let options =
            datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows));
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &options,
        )?)
    }
}
