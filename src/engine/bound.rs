//! Contribution bounding as one engine operator.
//!
//! A differentially private release must limit what any one privacy unit
//! adds: at most `max_groups` groups per unit and at most `max_rows` rows
//! over all of them (its groups taken in [`rank_groups`] order, each with
//! the rows still allowed, and the group's components scaled to the rows
//! kept). In SQL this is a window sorted by (unit, rank) over the
//! per-(unit, group) aggregate, and that sort of millions of rows
//! dominated every release whose keys vary within a unit.
//! [`BoundContributions`] does the same with one hash table over units:
//! with its input partitioned by unit, each partition collects every
//! unit's rows, orders only each unit's few rows, and emits the kept ones
//! scaled.
//!
//! Input: one row per (unit, group) — the unit, the group keys, the
//! components, and the group's row count (Int64), in that order. Output:
//! the group keys, then each component, bounded, as Float64.

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch};
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, SchemaRef};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::hash_utils::{QualityRandomState, create_hashes};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    Expr, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::{Distribution, EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
    ReplaceChildrenOptions,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use futures::{StreamExt, TryStreamExt};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

/// The bounds and the layout of the input.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct Bounds {
    /// Group key columns, right after the unit.
    pub keys: usize,
    /// Component columns, right after the keys; the row count follows.
    pub components: usize,
    pub max_groups: u64,
    pub max_rows: u64,
}

impl Bounds {
    fn rows_column(&self) -> usize {
        1 + self.keys + self.components
    }
}

/// The logical node over per-(unit, group) rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BoundContributions {
    input: LogicalPlan,
    bounds: Bounds,
    schema: DFSchemaRef,
}

/// The name of bounded component `i` in the output.
pub fn bounded_name(i: usize) -> String {
    format!("__fg_b{i}")
}

impl BoundContributions {
    pub fn try_new(input: LogicalPlan, bounds: Bounds) -> Result<BoundContributions> {
        let fields = input.schema();
        if bounds.keys == 0 {
            // Without a key every unit has one group: nothing to bound.
            return Err(DataFusionError::Plan(
                "contribution bounding needs a group key".into(),
            ));
        }
        if bounds.rows_column() >= fields.fields().len()
            || fields.field(bounds.rows_column()).data_type() != &DataType::Int64
        {
            return Err(DataFusionError::Plan(
                "contribution bounding: the input lacks a column it needs".into(),
            ));
        }
        let mut out: Vec<_> = (1..=bounds.keys)
            .map(|i| {
                let (q, f) = fields.qualified_field(i);
                (q.cloned(), f.clone())
            })
            .collect();
        for i in 0..bounds.components {
            out.push((
                None,
                Arc::new(Field::new(bounded_name(i), DataType::Float64, true)),
            ));
        }
        let schema = Arc::new(DFSchema::new_with_metadata(out, Default::default())?);
        Ok(BoundContributions {
            input,
            bounds,
            schema,
        })
    }

    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    pub fn into_plan(self) -> LogicalPlan {
        LogicalPlan::Extension(datafusion::logical_expr::Extension {
            node: Arc::new(self),
        })
    }
}

impl PartialOrd for BoundContributions {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        match self.input.partial_cmp(&other.input) {
            Some(std::cmp::Ordering::Equal) => self.bounds.partial_cmp(&other.bounds),
            other => other,
        }
    }
}

impl UserDefinedLogicalNodeCore for BoundContributions {
    fn name(&self) -> &str {
        "BoundContributions"
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
            "BoundContributions: keys={}, components={}, max_groups={}, max_rows={}",
            self.bounds.keys, self.bounds.components, self.bounds.max_groups, self.bounds.max_rows
        )
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let input = inputs.pop().ok_or_else(|| {
            DataFusionError::Internal("contribution bounding needs its input".into())
        })?;
        BoundContributions::try_new(input, self.bounds.clone())
    }
}

/// Plans [`BoundContributions`] nodes; every other node is left to DataFusion.
#[derive(Debug)]
pub struct BoundPlanner;

#[async_trait::async_trait]
impl ExtensionPlanner for BoundPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn datafusion::catalog::Session,
        _context: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<BoundContributions>() else {
            return Ok(None);
        };
        let [input] = physical_inputs else {
            return Err(DataFusionError::Internal(
                "contribution bounding has one input".into(),
            ));
        };
        Ok(Some(Arc::new(BoundContributionsExec::over(
            input.clone(),
            node.bounds.clone(),
        )?)))
    }
}

#[derive(Debug)]
pub struct BoundContributionsExec {
    input: Arc<dyn ExecutionPlan>,
    bounds: Bounds,
    schema: SchemaRef,
    unit: Arc<dyn PhysicalExpr>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BoundContributionsExec {
    /// The operator over `input`, its output schema derived from the
    /// input's, so a plan rebuilt on another node has the very same one.
    pub fn over(input: Arc<dyn ExecutionPlan>, bounds: Bounds) -> Result<Self> {
        let fields = input.schema();
        if bounds.keys == 0
            || bounds.rows_column() >= fields.fields().len()
            || fields.field(bounds.rows_column()).data_type() != &DataType::Int64
        {
            return Err(DataFusionError::Plan(
                "contribution bounding: the input lacks a column it needs".into(),
            ));
        }
        let mut out: Vec<Arc<Field>> = fields.fields()[1..=bounds.keys].to_vec();
        out.extend(
            (0..bounds.components)
                .map(|i| Arc::new(Field::new(bounded_name(i), DataType::Float64, true))),
        );
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(out));
        Ok(Self::new(input, bounds, schema))
    }

    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    fn new(input: Arc<dyn ExecutionPlan>, bounds: Bounds, schema: SchemaRef) -> Self {
        let unit_name = input.schema().field(0).name().clone();
        let unit = Arc::new(datafusion::physical_expr::expressions::Column::new(
            &unit_name, 0,
        ));
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        BoundContributionsExec {
            input,
            bounds,
            schema,
            unit,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for BoundContributionsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "BoundContributionsExec: keys={}, max_groups={}, max_rows={}",
            self.bounds.keys, self.bounds.max_groups, self.bounds.max_rows
        )
    }
}

impl ExecutionPlan for BoundContributionsExec {
    fn name(&self) -> &str {
        "BoundContributionsExec"
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

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "contribution bounding has one input".into(),
            ));
        }
        Ok(Arc::new(BoundContributionsExec::new(
            children.swap_remove(0),
            self.bounds.clone(),
            self.schema.clone(),
        )))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
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
        let reservation = MemoryConsumer::new(format!("BoundContributions[{partition}]"))
            .register(context.memory_pool());
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let mut units = Units::new(
            &self.input.schema(),
            self.bounds.clone(),
            self.schema.clone(),
            reservation,
        )?;
        let batch_size = context.session_config().batch_size();
        let output = futures::stream::once(async move {
            let mut input = input;
            while let Some(batch) = input.next().await {
                let batch = batch?;
                let _timer = baseline.elapsed_compute().timer();
                units.add(batch)?;
            }
            let _timer = baseline.elapsed_compute().timer();
            let batches = units.finish(batch_size)?;
            baseline.record_output(batches.iter().map(|b| b.num_rows()).sum());
            Ok::<_, DataFusionError>(futures::stream::iter(batches.into_iter().map(Ok)))
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            output,
        )))
    }
}

/// One partition's input, and for each of its rows the unit it belongs to.
struct Units {
    bounds: Bounds,
    schema: SchemaRef,
    unit_rows: RowConverter,
    key_rows: RowConverter,
    hasher: hashbrown::DefaultHashBuilder,
    /// Every unit: its hash, its number, and where its row bytes lie in
    /// `unit_bytes` (kept in the entry, so that a lookup reads one place).
    table: hashbrown::HashTable<UnitEntry>,
    unit_bytes: Vec<u8>,
    units: u32,
    batches: Vec<RecordBatch>,
    /// Per batch: its keys in row format (ordered as the keys are).
    keys: Vec<Rows>,
    /// Per batch and component: the component as Float64.
    components: Vec<Vec<Float64Array>>,
    /// Per input row, in order: (batch, row, unit).
    refs: Vec<(u32, u32, u32)>,
    /// Per input row, in order: its rank among its unit's groups.
    ranks: Vec<u64>,
    batch_ranks: Vec<u64>,
    reservation: MemoryReservation,
}

/// Which of a unit's groups it keeps first: the smallest rank, then the
/// smallest key bytes (ascending, nulls first) between equal ranks.
///
/// A rank is a hash of the unit and the group's keys, so that no part of
/// the key range is favoured: in key order, a person with more visits than
/// `max_groups` would give only their earliest dates, and a count by date
/// would lean to January. The choice depends on the unit's own rows only,
/// as bounding must, and is the same in every path that bounds (this
/// operator, [`super::streamed::StreamedBounds`], and the reference in SQL)
/// and on every machine: the hash has fixed seeds.
pub fn rank_groups(unit: &ArrayRef, keys: &[ArrayRef], ranks: &mut Vec<u64>) -> Result<()> {
    const STATE: QualityRandomState = QualityRandomState::with_seed(0x6672_6f73_7467_6c61);
    let mut units = vec![0u64; unit.len()];
    create_hashes([unit], &STATE, &mut units)?;
    ranks.clear();
    ranks.resize(unit.len(), 0);
    if !keys.is_empty() {
        create_hashes(keys, &STATE, ranks)?;
    }
    // DataFusion combines columns' hashes linearly: mixed, the bits of the
    // unit and of every key reach every bit of the rank.
    for (rank, unit) in ranks.iter_mut().zip(units) {
        *rank = mix(*rank ^ mix(unit));
    }
    Ok(())
}

/// SplitMix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn options() -> SortOptions {
    // The order between groups of equal rank: ascending, nulls first.
    SortOptions {
        descending: false,
        nulls_first: true,
    }
}

impl Units {
    fn new(
        input: &SchemaRef,
        bounds: Bounds,
        schema: SchemaRef,
        reservation: MemoryReservation,
    ) -> Result<Units> {
        let field =
            |i: usize| SortField::new_with_options(input.field(i).data_type().clone(), options());
        Ok(Units {
            unit_rows: RowConverter::new(vec![field(0)])?,
            key_rows: RowConverter::new((1..=bounds.keys).map(field).collect())?,
            bounds,
            schema,
            hasher: Default::default(),
            table: Default::default(),
            unit_bytes: Vec::new(),
            units: 0,
            batches: Vec::new(),
            keys: Vec::new(),
            components: Vec::new(),
            refs: Vec::new(),
            ranks: Vec::new(),
            batch_ranks: Vec::new(),
            reservation,
        })
    }

    fn unit(&mut self, bytes: &[u8]) -> u32 {
        let hash = self.hasher.hash_one(bytes);
        let stored = &self.unit_bytes;
        if let Some(e) = self.table.find(hash, |e| {
            e.hash == hash && stored.get(e.start..e.start + e.len as usize) == Some(bytes)
        }) {
            return e.unit;
        }
        let entry = UnitEntry {
            hash,
            start: self.unit_bytes.len(),
            len: bytes.len() as u32,
            unit: self.units,
        };
        self.unit_bytes.extend_from_slice(bytes);
        self.units += 1;
        self.table.insert_unique(hash, entry, |e| e.hash);
        entry.unit
    }

    fn add(&mut self, batch: RecordBatch) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let b = self.batches.len() as u32;
        let units = self.unit_rows.convert_columns(&[batch.column(0).clone()])?;
        for row in 0..n {
            let u = self.unit(units.row(row).as_ref());
            self.refs.push((b, row as u32, u));
        }
        let key_columns = &batch.columns()[1..=self.bounds.keys];
        rank_groups(batch.column(0), key_columns, &mut self.batch_ranks)?;
        self.ranks.extend_from_slice(&self.batch_ranks);
        let keys = self.key_rows.convert_columns(key_columns)?;
        let components = (0..self.bounds.components)
            .map(|i| {
                let c = cast(batch.column(1 + self.bounds.keys + i), &DataType::Float64)?;
                Ok(c.as_primitive::<Float64Type>().clone())
            })
            .collect::<Result<Vec<_>>>()?;
        let grown = batch.get_array_memory_size()
            + keys.size()
            + components
                .iter()
                .map(|c| c.get_array_memory_size())
                .sum::<usize>()
            + n * 20;
        self.reservation.try_grow(grown)?;
        self.keys.push(keys);
        self.components.push(components);
        self.batches.push(batch);
        Ok(())
    }

    /// The input gathered by unit: one pass in input order (reads in
    /// order, writes scattered), so that each unit's rows then lie together.
    fn gather(&mut self) -> Result<Gathered> {
        let units = self.units as usize;
        let width = self.bounds.components;
        // Per unit: where its rows and its keys' bytes start.
        let mut starts = vec![0usize; units + 1];
        let mut byte_starts = vec![0usize; units + 1];
        for &(b, r, u) in &self.refs {
            starts[u as usize + 1] += 1;
            byte_starts[u as usize + 1] += self.keys[b as usize].row(r as usize).as_ref().len();
        }
        for u in 0..units {
            starts[u + 1] += starts[u];
            byte_starts[u + 1] += byte_starts[u];
        }
        let n = self.refs.len();
        let mut g = Gathered {
            starts: starts.clone(),
            key_bytes: vec![0u8; byte_starts[units]],
            key_ends: vec![0usize; n],
            ranks: vec![0u64; n],
            rows: vec![0i64; n],
            components: vec![None; n * width],
        };
        self.reservation
            .try_grow(g.key_bytes.len() + n * (24 + width * 16) + 16 * (units + 1))?;
        let (mut next, mut next_byte) = (starts, byte_starts);
        for (&(b, r, u), &rank) in self.refs.iter().zip(&self.ranks) {
            let (b, r, u) = (b as usize, r as usize, u as usize);
            let at = next[u];
            next[u] += 1;
            g.ranks[at] = rank;
            let key = self.keys[b].row(r);
            let key = key.as_ref();
            let end = next_byte[u] + key.len();
            g.key_bytes[next_byte[u]..end].copy_from_slice(key);
            g.key_ends[at] = end;
            next_byte[u] = end;
            g.rows[at] = self.batches[b]
                .column(self.bounds.rows_column())
                .as_primitive::<Int64Type>()
                .value(r);
            for c in 0..width {
                let a = &self.components[b][c];
                g.components[at * width + c] = a.is_valid(r).then(|| a.value(r));
            }
        }
        // The input is no longer needed.
        let input = self
            .batches
            .iter()
            .map(|b| b.get_array_memory_size())
            .sum::<usize>()
            + self.keys.iter().map(|k| k.size()).sum::<usize>();
        self.batches = Vec::new();
        self.keys = Vec::new();
        self.components = Vec::new();
        self.refs = Vec::new();
        self.ranks = Vec::new();
        self.reservation.shrink(input.min(self.reservation.size()));
        Ok(g)
    }

    /// The kept rows (indices into `g`) with the factor each one's
    /// components are scaled by.
    fn kept(&self, g: &Gathered) -> Vec<(usize, f64)> {
        let max_rows = self.bounds.max_rows as f64;
        let max_groups = usize::try_from(self.bounds.max_groups).unwrap_or(usize::MAX);
        let mut kept = Vec::with_capacity(g.rows.len());
        let mut mine: Vec<usize> = Vec::new();
        for u in 0..self.units as usize {
            mine.clear();
            mine.extend(g.starts[u]..g.starts[u + 1]);
            if mine.len() > 1 {
                mine.sort_unstable_by(|&a, &b| {
                    g.ranks[a]
                        .cmp(&g.ranks[b])
                        .then_with(|| g.key(a).cmp(g.key(b)))
                });
            }
            let mut rows_before = 0i64;
            for &at in mine.iter().take(max_groups) {
                let group_rows = g.rows[at];
                let rows_f64 = group_rows as f64;
                // The same arithmetic, in the same order, as the SQL form of
                // these bounds, so that both give identical values.
                let left = max_rows - rows_before as f64;
                let allowed = if left < 0.0 {
                    0.0
                } else if left > rows_f64 {
                    rows_f64
                } else {
                    left
                };
                kept.push((at, allowed / rows_f64));
                rows_before += group_rows;
            }
        }
        kept
    }

    fn finish(&mut self, batch_size: usize) -> Result<Vec<RecordBatch>> {
        let g = self.gather()?;
        let kept = self.kept(&g);
        let parser = self.key_rows.parser();
        let width = self.bounds.components;
        let mut out = Vec::new();
        for chunk in kept.chunks(batch_size.max(1)) {
            let mut columns: Vec<ArrayRef> = self
                .key_rows
                .convert_rows(chunk.iter().map(|&(at, _)| parser.parse(g.key(at))))?;
            for c in 0..width {
                let values: Float64Array = chunk
                    .iter()
                    .map(|&(at, factor)| g.components[at * width + c].map(|v| v * factor))
                    .collect();
                columns.push(Arc::new(values));
            }
            let options = datafusion::arrow::record_batch::RecordBatchOptions::new()
                .with_row_count(Some(chunk.len()));
            out.push(RecordBatch::try_new_with_options(
                self.schema.clone(),
                columns,
                &options,
            )?);
        }
        Ok(out)
    }
}

#[derive(Clone, Copy)]
struct UnitEntry {
    hash: u64,
    start: usize,
    len: u32,
    unit: u32,
}

/// The input rows laid out unit by unit.
struct Gathered {
    /// Per unit: its first row; one more entry at the end.
    starts: Vec<usize>,
    key_bytes: Vec<u8>,
    /// Per row: where its key's bytes end (they start where the previous
    /// row's end, or at the unit's first byte).
    key_ends: Vec<usize>,
    ranks: Vec<u64>,
    rows: Vec<i64>,
    /// Per row, each component.
    components: Vec<Option<f64>>,
}

impl Gathered {
    fn key(&self, at: usize) -> &[u8] {
        let start = if at == 0 { 0 } else { self.key_ends[at - 1] };
        &self.key_bytes[start..self.key_ends[at]]
    }
}

/// DataFusion's planner, knowing [`BoundContributions`] and
/// [`super::streamed::StreamedBounds`].
#[derive(Debug)]
pub struct QueryPlanner;

#[async_trait::async_trait]
impl datafusion::execution::context::QueryPlanner for QueryPlanner {
    async fn create_physical_plan(
        &self,
        plan: &LogicalPlan,
        session: &dyn datafusion::catalog::Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![
            Arc::new(BoundPlanner),
            Arc::new(super::streamed::StreamedPlanner),
        ])
        .create_physical_plan(plan, session)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::Schema;
    use datafusion::datasource::MemTable;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// `units` persons with one visit on each of `groups` days, as one row
    /// per (person, day): person, day, visits, rows.
    async fn per_unit_group(ctx: &SessionContext, units: usize, groups: usize) -> LogicalPlan {
        let schema = Arc::new(Schema::new(vec![
            Field::new("person", DataType::Utf8, false),
            Field::new("day", DataType::Int64, false),
            Field::new("visits", DataType::Int64, false),
            Field::new("rows", DataType::Int64, false),
        ]));
        let (persons, days): (Vec<String>, Vec<i64>) = (0..units * groups)
            .map(|i| (format!("p{}", i / groups), (i % groups) as i64))
            .unzip();
        let ones = Arc::new(Int64Array::from(vec![1i64; units * groups]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(persons)),
                Arc::new(Int64Array::from(days)),
                ones.clone(),
                ones,
            ],
        )
        .unwrap();
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("visits", Arc::new(table)).unwrap();
        ctx.table("visits").await.unwrap().into_unoptimized_plan()
    }

    fn context(memory: usize) -> SessionContext {
        let state = SessionStateBuilder::new()
            // One partition: the operator is the only consumer of memory.
            .with_config(SessionConfig::new().with_target_partitions(1))
            .with_runtime_env(
                RuntimeEnvBuilder::new()
                    .with_memory_limit(memory, 1.0)
                    .build_arc()
                    .unwrap(),
            )
            .with_default_features()
            .with_query_planner(Arc::new(QueryPlanner))
            .build();
        SessionContext::new_with_state(state)
    }

    fn bounds(keys: usize) -> Bounds {
        Bounds {
            keys,
            components: 1,
            max_groups: 2,
            max_rows: 1,
        }
    }

    async fn bound(ctx: &SessionContext, input: LogicalPlan) -> Result<Vec<RecordBatch>> {
        let plan = BoundContributions::try_new(input, bounds(1))?.into_plan();
        ctx.execute_logical_plan(plan).await?.collect().await
    }

    #[tokio::test]
    async fn each_unit_keeps_its_first_ranked_groups_and_rows() {
        let (units, days) = (1000, 5);
        let ctx = context(1 << 30);
        let input = per_unit_group(&ctx, units, days).await;
        let batches = bound(&ctx, input).await.unwrap();
        let mut kept: Vec<(i64, f64)> = Vec::new();
        for b in &batches {
            let days = b.column(0).as_primitive::<Int64Type>();
            let counts = b.column(1).as_primitive::<Float64Type>();
            kept.extend((0..b.num_rows()).map(|r| (days.value(r), counts.value(r))));
        }
        kept.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        // Two groups per person, one row over both: the person's first day
        // by rank keeps its row, the second is kept with none.
        let mut expected: Vec<(i64, f64)> = Vec::new();
        let mut ranks = Vec::new();
        for p in 0..units {
            let person: ArrayRef = Arc::new(StringArray::from(vec![format!("p{p}"); days]));
            let day: ArrayRef = Arc::new(Int64Array::from_iter_values(0..days as i64));
            rank_groups(&person, &[day], &mut ranks).unwrap();
            let mut order: Vec<i64> = (0..days as i64).collect();
            order.sort_by_key(|&d| (ranks[d as usize], d));
            expected.extend([(order[0], 1.0), (order[1], 0.0)]);
        }
        expected.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        assert_eq!(kept, expected);
        // No day is favoured: in key order, days 0 and 1 would be kept by
        // every person and the others by none. Each is kept by 2 persons in
        // 5 (400 ± 15.5 here); the bounds are six deviations.
        for day in 0..days as i64 {
            let times = kept.iter().filter(|k| k.0 == day).count();
            assert!((300..=500).contains(&times), "day {day} kept {times} times");
        }
    }

    #[tokio::test]
    async fn a_bound_without_a_key_or_past_the_memory_limit_is_an_error_not_a_panic() {
        let ctx = context(64 << 10);
        let input = per_unit_group(&ctx, 20_000, 3).await;
        assert!(BoundContributions::try_new(input.clone(), bounds(0)).is_err());
        let error = bound(&ctx, input).await.expect_err("over the memory limit");
        assert!(
            matches!(error.find_root(), DataFusionError::ResourcesExhausted(m) if m.contains("BoundContributions")),
            "{error}"
        );
    }
}
