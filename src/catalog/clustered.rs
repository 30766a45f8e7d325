//! A personal dataset's in-memory copy, clustered by privacy unit.
//!
//! The copy is cut into partitions by DataFusion's own hash repartitioning
//! on the unit, and each partition is sorted by unit. Its scan says so
//! (hash-partitioned on the unit, ordered by it), so that a release
//! computed per unit (the engine's `StreamedBounds`) reads each unit's rows
//! together, one unit after another, with neither a shuffle nor a hash
//! table over units. The claim is honest for any operator that relies on it: the rows
//! were placed by the same hash DataFusion uses when it repartitions, into
//! as many partitions as the session plans for. A session planning for
//! another number of partitions sees no claim, only the order.

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringViewBuilder};
use datafusion::arrow::compute::{SortOptions, concat_batches};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result, Statistics};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{
    EquivalenceProperties, LexOrdering, Partitioning, PhysicalExpr, PhysicalSortExpr,
};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, StatisticsArgs,
    collect_partitioned,
};
use datafusion::prelude::SessionContext;
use std::fmt;
use std::sync::Arc;

/// The order of units within a partition.
pub fn unit_order() -> SortOptions {
    SortOptions {
        descending: false,
        nulls_first: true,
    }
}

/// Rows of one table, partitioned and sorted by its privacy unit.
#[derive(Debug)]
pub struct ClusteredTable {
    schema: SchemaRef,
    unit: usize,
    partitions: Arc<Vec<Vec<RecordBatch>>>,
    bytes: usize,
}

impl ClusteredTable {
    /// Table `table` of `ctx`, read once and clustered into `partitions`
    /// partitions by column `unit`; `None` when it takes more than
    /// `max_bytes` in memory.
    pub async fn build(
        ctx: &SessionContext,
        table: &str,
        unit: &str,
        partitions: usize,
        max_bytes: usize,
    ) -> Result<Option<ClusteredTable>> {
        let scan = ctx.table(table).await?.create_physical_plan().await?;
        let schema = scan.schema();
        let unit = schema.index_of(unit)?;
        let key: Arc<dyn PhysicalExpr> = Arc::new(Column::new(schema.field(unit).name(), unit));
        let spread = RepartitionExec::try_new(
            scan,
            Partitioning::Hash(vec![key.clone()], partitions.max(1)),
        )?;
        let ordering = LexOrdering::new([PhysicalSortExpr::new(key, unit_order())])
            .ok_or_else(|| DataFusionError::Internal("an empty ordering".into()))?;
        let sorted = SortExec::new(ordering, Arc::new(spread)).with_preserve_partitioning(true);
        let batch_size = ctx.copied_config().batch_size().max(1);
        let mut bytes = 0;
        let mut partitions = Vec::new();
        for sorted in collect_partitioned(Arc::new(sorted), ctx.task_ctx()).await? {
            // The sort hands out slices of larger arrays: one copy per
            // partition holds exactly its rows (and says truly how much
            // memory they take), read in batches of the usual size.
            let whole = compacted(concat_batches(&schema, &sorted)?)?;
            bytes += whole.get_array_memory_size();
            if bytes > max_bytes {
                return Ok(None);
            }
            partitions.push(
                (0..whole.num_rows())
                    .step_by(batch_size)
                    .map(|at| whole.slice(at, batch_size.min(whole.num_rows() - at)))
                    .collect(),
            );
        }
        Ok(Some(ClusteredTable {
            schema,
            unit,
            partitions: Arc::new(partitions),
            bytes,
        }))
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The privacy unit's column.
    pub fn unit(&self) -> &str {
        self.schema.field(self.unit).name()
    }
}

/// `batch` with its string and binary views holding only the bytes they
/// show: the repartitioning and the sort leave them pointing into the
/// buffers of every page they were read from. Each distinct string is
/// stored once, so a value repeated on many rows (a person's consent on
/// each visit) costs one copy, and equal strings have equal views.
fn compacted(batch: RecordBatch) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .map(|c| -> ArrayRef {
            match c.data_type() {
                DataType::Utf8View => {
                    let strings = c.as_string_view();
                    let mut once =
                        StringViewBuilder::with_capacity(strings.len()).with_deduplicate_strings();
                    strings.iter().for_each(|s| once.append_option(s));
                    Arc::new(once.finish())
                }
                DataType::BinaryView => Arc::new(c.as_binary_view().gc()),
                _ => c.clone(),
            }
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

#[async_trait::async_trait]
impl TableProvider for ClusteredTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let projection = projection.cloned();
        let schema = match &projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        let unit_at = match &projection {
            Some(p) => p.iter().position(|&i| i == self.unit),
            None => Some(self.unit),
        };
        let count = self.partitions.len();
        let mut eq = EquivalenceProperties::new(schema.clone());
        let mut partitioning = Partitioning::UnknownPartitioning(count);
        if let Some(at) = unit_at {
            let unit: Arc<dyn PhysicalExpr> = Arc::new(Column::new(schema.field(at).name(), at));
            eq.add_ordering([PhysicalSortExpr::new(unit.clone(), unit_order())]);
            if count == state.config().target_partitions() {
                partitioning = Partitioning::Hash(vec![unit], count);
            }
        }
        let properties = PlanProperties::new(
            eq,
            partitioning,
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Arc::new(ClusteredScanExec {
            partitions: self.partitions.clone(),
            table_schema: self.schema.clone(),
            projection,
            properties: Arc::new(properties),
        }))
    }
}

/// Reads a [`ClusteredTable`]. A leaf: no optimizer rule can re-cut what
/// lies under it.
#[derive(Debug)]
struct ClusteredScanExec {
    partitions: Arc<Vec<Vec<RecordBatch>>>,
    table_schema: SchemaRef,
    projection: Option<Vec<usize>>,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for ClusteredScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "ClusteredScanExec: partitions={}, projection={:?}",
            self.partitions.len(),
            self.projection
        )
    }
}

impl ExecutionPlan for ClusteredScanExec {
    fn name(&self) -> &str {
        "ClusteredScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let batches = self.partitions.get(partition).cloned().unwrap_or_default();
        Ok(Box::pin(MemoryStream::try_new(
            batches,
            self.schema(),
            self.projection.clone(),
        )?))
    }

    fn statistics_from_inputs(
        &self,
        _input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        let partitions = match args.partition() {
            Some(p) => self.partitions.get(p..=p).unwrap_or(&[]),
            None => &self.partitions[..],
        };
        Ok(Arc::new(
            datafusion::physical_plan::common::compute_record_batch_statistics(
                partitions,
                &self.table_schema,
                self.projection.clone(),
            ),
        ))
    }
}
