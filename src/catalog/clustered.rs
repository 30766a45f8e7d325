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
//!
//! Consent is kept beside the rows: for each purpose the consent column
//! names, which rows consent to it, worked out once when the copy is made.
//! A scan takes the consent filter over ([`crate::catalog::consent::consented`]) and
//! hands on only consenting rows, without the consent column, and without
//! testing every row's consent again for every query.

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, StringViewArray, StringViewBuilder,
};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::compute::kernels::boolean::and;
use datafusion::arrow::compute::{SortOptions, concat_batches};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result, Statistics};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::TableProviderFilterPushDown;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{
    EquivalenceProperties, LexOrdering, Partitioning, PhysicalExpr, PhysicalSortExpr,
};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, StatisticsArgs,
    collect_partitioned,
};
use datafusion::prelude::SessionContext;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// The order of units within a partition.
pub fn unit_order() -> SortOptions {
    SortOptions {
        descending: false,
        nulls_first: true,
    }
}

/// At most this many purposes get their consent kept beside the rows; a
/// copy whose consent column names more keeps none.
const KEPT_PURPOSES: usize = 32;

/// Per partition, per batch: which of its rows consent to one purpose.
type Consenting = Arc<Vec<Vec<BooleanArray>>>;

/// Rows of one table, partitioned and sorted by its privacy unit.
#[derive(Debug)]
pub struct ClusteredTable {
    schema: SchemaRef,
    unit: usize,
    partitions: Arc<Vec<Vec<RecordBatch>>>,
    /// The consent column's name, and the rows consenting to each purpose
    /// it names.
    consent: Option<(String, HashMap<String, Consenting>)>,
    bytes: usize,
}

impl ClusteredTable {
    /// Table `table` of `ctx`, read once and clustered into `partitions`
    /// partitions by column `unit`, with its rows' consent to each purpose
    /// column `consent` names; `None` when it takes more than `max_bytes` in
    /// memory.
    pub async fn build(
        ctx: &SessionContext,
        table: &str,
        unit: &str,
        consent: Option<&str>,
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
        let mut wholes = Vec::new();
        for sorted in collect_partitioned(Arc::new(sorted), ctx.task_ctx()).await? {
            // The sort hands out slices of larger arrays: one copy per
            // partition holds exactly its rows (and says truly how much
            // memory they take), read in batches of the usual size.
            let whole = compacted(concat_batches(&schema, &sorted)?)?;
            bytes += whole.get_array_memory_size();
            if bytes > max_bytes {
                return Ok(None);
            }
            wholes.push(whole);
        }
        let consent = match consent {
            Some(column) => {
                let at = schema.index_of(column)?;
                let (by_purpose, masks_bytes) = consenting(&wholes, at, batch_size);
                bytes += masks_bytes;
                Some((column.to_string(), by_purpose))
            }
            None => None,
        };
        if bytes > max_bytes {
            return Ok(None);
        }
        let partitions = wholes
            .iter()
            .map(|whole| in_batches(whole, batch_size, |at, len| whole.slice(at, len)))
            .collect();
        Ok(Some(ClusteredTable {
            schema,
            unit,
            partitions: Arc::new(partitions),
            consent,
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

    /// The rows consenting to the purpose `filter` is the consent filter
    /// for, if this copy keeps them.
    fn consenting(&self, filter: &Expr) -> Option<&Consenting> {
        let (column, by_purpose) = self.consent.as_ref()?;
        by_purpose.get(super::consent::purpose_of(filter, column)?)
    }
}

/// `len` rows of `whole` starting at `at`, for each batch of `batch_size`.
fn in_batches<T>(
    whole: &RecordBatch,
    batch_size: usize,
    slice: impl Fn(usize, usize) -> T,
) -> Vec<T> {
    let rows = whole.num_rows();
    (0..rows)
        .step_by(batch_size)
        .map(|at| slice(at, batch_size.min(rows - at)))
        .collect()
}

/// For each purpose named in column `at` of the partitions `wholes`, which
/// rows consent to it, cut in batches as the rows are, and the bytes that
/// takes; nothing when the column is not a string view or names more than
/// [`KEPT_PURPOSES`].
fn consenting(
    wholes: &[RecordBatch],
    at: usize,
    batch_size: usize,
) -> (HashMap<String, Consenting>, usize) {
    let Some(columns) = wholes
        .iter()
        .map(|whole| whole.column(at).as_string_view_opt())
        .collect::<Option<Vec<&StringViewArray>>>()
    else {
        return (HashMap::new(), 0);
    };
    let mut values = HashSet::new();
    for column in &columns {
        // A unit's rows are consecutive and each distinct string is stored
        // once, so equal neighbours have equal views.
        let mut previous = None;
        for (row, view) in column.views().iter().enumerate() {
            if previous != Some(*view) && column.is_valid(row) {
                values.insert(column.value(row));
            }
            previous = Some(*view);
        }
    }
    let purposes: BTreeSet<&str> = values
        .into_iter()
        .flat_map(super::consent::purposes_in)
        .collect();
    if purposes.len() > KEPT_PURPOSES {
        return (HashMap::new(), 0);
    }
    // Counted whole: each batch's slice reports its whole partition's mask.
    let mut bytes = 0;
    let by_purpose = purposes
        .into_iter()
        .map(|purpose| {
            let partitions = wholes
                .iter()
                .zip(&columns)
                .map(|(whole, column)| {
                    let mask = super::consent::mask(column, purpose);
                    bytes += mask.get_array_memory_size();
                    in_batches(whole, batch_size, |at, len| mask.slice(at, len))
                })
                .collect();
            (purpose.to_string(), Arc::new(partitions))
        })
        .collect();
    (by_purpose, bytes)
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

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Beside a filter of the query's own, the consent filter stays in
        // one filter with it: that copies only the few rows both admit,
        // where taking consent over here would copy every consenting row
        // first.
        let only_consent = filters.iter().all(|f| self.consenting(f).is_some());
        Ok(filters
            .iter()
            .map(|_| match only_consent {
                true => TableProviderFilterPushDown::Exact,
                false => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Only filters this copy took over reach it; anything else would be
        // a filter silently dropped.
        let consenting = filters
            .iter()
            .map(|filter| {
                self.consenting(filter).cloned().ok_or_else(|| {
                    DataFusionError::Internal("a filter the clustered copy cannot apply".into())
                })
            })
            .collect::<Result<Vec<_>>>()?;
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
            consenting,
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
    /// The consent filters taken over: only rows every one admits are read.
    consenting: Vec<Consenting>,
    table_schema: SchemaRef,
    projection: Option<Vec<usize>>,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for ClusteredScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "ClusteredScanExec: partitions={}, projection={:?}, consent_filters={}",
            self.partitions.len(),
            self.projection,
            self.consenting.len()
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
        let consenting: Vec<Vec<BooleanArray>> = self
            .consenting
            .iter()
            .map(|by_partition| by_partition.get(partition).cloned().unwrap_or_default())
            .collect();
        let projection = self.projection.clone();
        let read = batches
            .into_iter()
            .enumerate()
            .map(move |(at, batch)| admitted(batch, projection.as_deref(), &consenting, at))
            .filter_map(Result::transpose);
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            futures::stream::iter(read),
        )))
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
        let all_rows = datafusion::physical_plan::common::compute_record_batch_statistics(
            partitions,
            &self.table_schema,
            self.projection.clone(),
        );
        // Counted before consent: exact figures would let the optimizer
        // answer `COUNT(*)` from them, non-consenting rows included.
        Ok(Arc::new(match self.consenting.is_empty() {
            true => all_rows,
            false => all_rows.to_inexact(),
        }))
    }
}

/// Batch number `at` of a partition, projected, with only the rows every
/// consent filter admits; `None` when none is left.
fn admitted(
    batch: RecordBatch,
    projection: Option<&[usize]>,
    consenting: &[Vec<BooleanArray>],
    at: usize,
) -> Result<Option<RecordBatch>> {
    let batch = match projection {
        Some(columns) => batch.project(columns)?,
        None => batch,
    };
    let mut admits: Option<BooleanArray> = None;
    for by_batch in consenting {
        let mask = by_batch
            .get(at)
            .ok_or_else(|| DataFusionError::Internal("a batch without its consent mask".into()))?;
        admits = Some(match admits {
            Some(before) => and(&before, mask)?,
            None => mask.clone(),
        });
    }
    let Some(mask) = admits else {
        return Ok(Some(batch));
    };
    match mask.true_count() {
        0 => Ok(None),
        all if all == batch.num_rows() => Ok(Some(batch)),
        _ => Ok(Some(filter_record_batch(&batch, &mask)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringViewArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::functions_aggregate::count::count_all;
    use datafusion::prelude::{SessionConfig, col, lit};

    /// Units 0..30 with four rows each, consenting to overlapping purposes,
    /// to a lookalike ("ab"), to nothing or with no consent at all.
    fn rows() -> (Vec<i64>, Vec<Option<&'static str>>, Vec<i64>) {
        let kinds = [
            Some(",a,b,"),
            Some(",b,"),
            None,
            Some(",ab,"),
            Some(","),
            Some(",a,"),
        ];
        let (mut unit, mut consent, mut value) = (Vec::new(), Vec::new(), Vec::new());
        for row in 0..120 {
            // Rows arrive out of unit order; the copy clusters them.
            let u = (row * 7) % 30;
            unit.push(u);
            consent.push(kinds[(u % 6) as usize]);
            value.push(row);
        }
        (unit, consent, value)
    }

    /// The consent bits count once toward the copy's memory limit, however
    /// many batches share them. Each batch's slice reports its whole
    /// partition's bits; counting per slice kept 10 million visits out of
    /// memory.
    #[tokio::test]
    async fn consent_bits_count_once_toward_the_copys_memory() {
        let n = 20_000usize;
        let schema = Arc::new(Schema::new(vec![
            Field::new("unit", DataType::Int64, false),
            Field::new("consent", DataType::Utf8View, true),
        ]));
        let consent: Vec<Option<&str>> = (0..n)
            .map(|i| Some(if i % 3 == 0 { ",a," } else { ",a,b," }))
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| i / 4))),
                Arc::new(StringViewArray::from(consent)),
            ],
        )
        .unwrap();
        let config = SessionConfig::new()
            .with_batch_size(100)
            .with_target_partitions(2);
        let ctx = SessionContext::new_with_config(config);
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        let mut sizes = Vec::new();
        for consent in [None, Some("consent")] {
            let copy = ClusteredTable::build(&ctx, "t", "unit", consent, 2, usize::MAX)
                .await
                .unwrap()
                .unwrap();
            sizes.push(copy.bytes());
        }
        let masks = sizes[1] - sizes[0];
        // Two purposes, one bit per row each, and a little per partition.
        let (purposes, partitions) = (2, 2);
        assert!(
            masks >= purposes * n / 8,
            "{masks} bytes for the consent bits"
        );
        assert!(
            masks <= purposes * (n / 8 + partitions * 1024),
            "{masks} bytes for the consent bits"
        );
    }

    /// A scan of the copy takes the consent filter over (no filter is left
    /// in the plan) and reads exactly the consenting rows, in batches that
    /// cut units apart; an unknown purpose, or a filter of the query's own
    /// beside it, leaves consent to the filter. The
    /// figures are counted here, not by the engine, and `COUNT(*)` is asked
    /// for on its own, which the optimizer answers from exact statistics.
    #[tokio::test]
    async fn a_scan_takes_over_the_consent_filter_and_reads_only_consenting_rows() {
        let (unit, consent, value) = rows();
        let schema = Arc::new(Schema::new(vec![
            Field::new("unit", DataType::Int64, false),
            Field::new("consent", DataType::Utf8View, true),
            Field::new("v", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(unit.clone())),
                Arc::new(StringViewArray::from(consent.clone())),
                Arc::new(Int64Array::from(value.clone())),
            ],
        )
        .unwrap();
        let config = SessionConfig::new()
            .with_batch_size(5)
            .with_target_partitions(3);
        let ctx = SessionContext::new_with_config(config);
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        let copy = ClusteredTable::build(&ctx, "t", "unit", Some("consent"), 3, usize::MAX)
            .await
            .unwrap()
            .unwrap();
        ctx.register_table("c", Arc::new(copy)).unwrap();
        let own_filters = [None, None, None, None, Some(60)];
        for (purpose, above) in ["a", "b", "ab", "elsewhere", "a"]
            .into_iter()
            .zip(own_filters)
        {
            let mut expected: Vec<(i64, i64)> = (0..unit.len())
                .filter(|&r| consent[r].is_some_and(|c| c.contains(&format!(",{purpose},"))))
                .filter(|&r| above.is_none_or(|above| value[r] >= above))
                .map(|r| (unit[r], value[r]))
                .collect();
            expected.sort();
            let mut consenting = ctx
                .table("c")
                .await
                .unwrap()
                .filter(crate::catalog::consent::consented(col("consent"), purpose))
                .unwrap();
            if let Some(above) = above {
                consenting = consenting.filter(col("v").gt_eq(lit(above))).unwrap();
            }
            let read = consenting.clone().select_columns(&["unit", "v"]).unwrap();
            let plan = read.clone().create_physical_plan().await.unwrap();
            let shown = datafusion::physical_plan::displayable(plan.as_ref())
                .indent(false)
                .to_string();
            let taken_over = purpose != "elsewhere" && above.is_none();
            assert_eq!(
                shown.contains("FilterExec"),
                !taken_over,
                "{purpose}: {shown}"
            );
            assert_eq!(
                shown.contains("consent_filters=1"),
                taken_over,
                "{purpose}: {shown}"
            );
            let mut got: Vec<(i64, i64)> = Vec::new();
            for b in read.collect().await.unwrap() {
                let (u, v) = (
                    b.column(0)
                        .as_primitive::<datafusion::arrow::datatypes::Int64Type>(),
                    b.column(1)
                        .as_primitive::<datafusion::arrow::datatypes::Int64Type>(),
                );
                got.extend((0..b.num_rows()).map(|r| (u.value(r), v.value(r))));
            }
            got.sort();
            assert_eq!(got, expected, "{purpose}");
            let counted = consenting
                .aggregate(vec![], vec![count_all()])
                .unwrap()
                .collect()
                .await
                .unwrap();
            let n = counted[0]
                .column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0);
            assert_eq!(n as usize, expected.len(), "{purpose}: COUNT(*)");
        }
    }
}
