//! DataFusion, locked down for untrusted SQL: one parsed SELECT at a time, a
//! session that holds only the tables of one grant, no table functions, URL
//! tables, information_schema or recursive CTEs, and execution under a
//! memory pool (spilling off), a row cap on the answer, and caps on SQL size
//! that bound expression depth before anything recursive sees it.

pub mod bound;
#[cfg(feature = "ballista")]
pub mod cluster;
mod functions;
pub mod streamed;
mod total;

use crate::catalog::Dataset;
use crate::config::{Execution, Limits};
use crate::error::{Error, Refusal};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider, SchemaProvider, TableProvider,
};
use datafusion::common::TableReference;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{LogicalPlan, TableScan, TableSource};
use datafusion::optimizer::{Analyzer, AnalyzerRule};
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::SessionConfig;
use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;

pub const CATALOG: &str = "datafusion";
pub const SCHEMA: &str = "public";

pub struct Engine {
    template: SessionState,
    limits: Limits,
    /// File listings, statistics and Parquet footers, shared by every
    /// query's runtime (each has its own memory pool) so they are read once.
    caches: CacheManagerConfig,
    /// Where release jobs over files run, when not here.
    #[cfg(feature = "ballista")]
    cluster: Option<cluster::Cluster>,
}

/// Everything a session that plans or runs buyers' queries must have, here
/// and on a cluster's nodes: the allowed functions, the analyzer rules that
/// make expressions total, the planner that knows contribution bounding.
fn rules(config: SessionConfig) -> SessionStateBuilder {
    // Every executed plan passes the default analyzer rules between the
    // two that make its expressions total (see `total`).
    let mut analyzer: Vec<Arc<dyn AnalyzerRule + Send + Sync>> =
        vec![Arc::new(total::TotalOperators)];
    analyzer.extend(Analyzer::new().rules);
    analyzer.push(Arc::new(total::TryCasts));
    functions::register(SessionStateBuilder::new())
        .with_config(config)
        .with_analyzer_rules(analyzer)
        .with_query_planner(Arc::new(bound::QueryPlanner))
        .with_physical_optimizer_rule(Arc::new(streamed::AggregateOnce))
        // No generate_series/range, no CREATE EXTERNAL TABLE factories.
        .with_table_function_list(Vec::new())
        .with_table_factories(HashMap::new())
}

/// Maps an engine error to one that is safe to show: engine messages can
/// quote data values (a failed cast names the string it could not cast), so
/// none of their text passes.
pub fn engine_error(e: DataFusionError) -> Error {
    match e.find_root() {
        DataFusionError::ResourcesExhausted(_) => {
            Error::ResourceLimit("the query exceeded its memory limit".into())
        }
        _ => {
            tracing::debug!(kind = error_kind(&e), "query failed during execution");
            Error::SqlError("the query failed during execution".into())
        }
    }
}

fn error_kind(e: &DataFusionError) -> &'static str {
    match e.find_root() {
        DataFusionError::ArrowError(..) => "arrow",
        DataFusionError::Execution(_) => "execution",
        DataFusionError::Plan(_) => "plan",
        DataFusionError::NotImplemented(_) => "not_implemented",
        DataFusionError::Internal(_) => "internal",
        _ => "other",
    }
}

impl Engine {
    pub fn new(limits: Limits) -> Engine {
        let mut config = SessionConfig::new()
            .with_information_schema(false)
            .with_create_default_catalog_and_schema(false)
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_target_partitions(crate::util::query_partitions());
        config.options_mut().execution.enable_recursive_ctes = false;
        // Rows already partitioned by the privacy unit (a DP dataset's
        // clustered copy, a join on the unit) stay where they are for an
        // aggregation keyed by the unit and more: DataFusion's default
        // re-shuffles them by the whole key when there are fewer than four
        // partitions, as on two cores.
        config.options_mut().optimizer.subset_repartition_threshold = 1;
        let template = rules(config).build();
        let shared = &template.runtime_env().cache_manager;
        let caches = CacheManagerConfig::default()
            .with_file_metadata_cache(Some(shared.get_file_metadata_cache()))
            .with_file_statistics_cache(shared.get_file_statistic_cache())
            .with_list_files_cache(shared.get_list_files_cache());
        Engine {
            template,
            limits,
            caches,
            #[cfg(feature = "ballista")]
            cluster: None,
        }
    }

    /// An engine whose release jobs run where `execution` says.
    pub fn with_execution(limits: Limits, execution: &Execution) -> Result<Engine, String> {
        #[cfg_attr(not(feature = "ballista"), expect(unused_mut))]
        let mut engine = Engine::new(limits);
        match execution {
            Execution::Local => {}
            #[cfg(feature = "ballista")]
            Execution::Ballista { scheduler } => {
                engine.cluster = Some(cluster::Cluster::new(scheduler)?);
            }
            #[cfg(not(feature = "ballista"))]
            Execution::Ballista { .. } => {
                return Err("this build cannot use a Ballista cluster: \
                     build with `--features ballista`"
                    .into());
            }
        }
        Ok(engine)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Parses exactly one plain query; anything else is refused before planning.
    pub fn parse(&self, sql: &str) -> Result<DFStatement, Error> {
        if sql.len() > self.limits.max_sql_bytes {
            return Err(Error::InvalidRequest(format!(
                "SQL is longer than {} bytes",
                self.limits.max_sql_bytes
            )));
        }
        let dialect = GenericDialect {};
        let tokens = Tokenizer::new(&dialect, sql)
            .tokenize()
            .map_err(|e| Error::SqlError(format!("cannot tokenize SQL: {e}")))?;
        let significant = tokens
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .count();
        if significant > self.limits.max_sql_tokens {
            return Err(Error::ResourceLimit(format!(
                "the query has {significant} tokens; at most {} are allowed",
                self.limits.max_sql_tokens
            )));
        }
        let mut statements = DFParserBuilder::new(sql)
            .with_recursion_limit(self.limits.max_parser_depth)
            .build()
            .and_then(|mut p| p.parse_statements())
            .map_err(|e| Error::SqlError(format!("cannot parse SQL: {e}")))?;
        if statements.len() != 1 {
            return Err(Error::StatementNotAllowed(
                "exactly one SQL statement is allowed".into(),
            ));
        }
        let statement = statements
            .pop_front()
            .ok_or_else(|| Error::SqlError("no statement".into()))?;
        match &statement {
            DFStatement::Statement(s) => match s.as_ref() {
                SqlStatement::Query(q) if q.with.as_ref().is_some_and(|w| w.recursive) => {
                    Err(Refusal::new("recursive_query", "recursive queries are not allowed").into())
                }
                SqlStatement::Query(_) => Ok(statement),
                _ => Err(Error::StatementNotAllowed(
                    "only a single SELECT query is allowed".into(),
                )),
            },
            _ => Err(Error::StatementNotAllowed(
                "only a single SELECT query is allowed".into(),
            )),
        }
    }

    /// The tables a statement names (CTE names excluded).
    pub fn table_references(&self, statement: &DFStatement) -> Result<Vec<TableReference>, Error> {
        self.template
            .resolve_table_references(statement)
            .map_err(|e| Error::SqlError(format!("cannot resolve tables: {e}")))
    }

    /// A session whose catalog holds exactly the tables of `datasets`: their
    /// files when a cluster runs release jobs (its executors read them),
    /// else what is quickest here.
    pub fn session(&self, datasets: &[Arc<Dataset>]) -> Result<SessionState, Error> {
        self.session_with(
            datasets
                .iter()
                .map(|d| {
                    let table = if self.on_cluster() {
                        d.provider.clone()
                    } else {
                        d.table()
                    };
                    (d.id().to_string(), table)
                })
                .collect(),
        )
    }

    fn on_cluster(&self) -> bool {
        #[cfg(feature = "ballista")]
        return self.cluster.is_some();
        #[cfg(not(feature = "ballista"))]
        false
    }

    /// A session whose catalog holds exactly `tables`.
    pub fn session_with(
        &self,
        tables: Vec<(String, Arc<dyn TableProvider>)>,
    ) -> Result<SessionState, Error> {
        let internal = |e: DataFusionError| Error::Internal(e.to_string());
        let schema = MemorySchemaProvider::new();
        for (name, provider) in tables {
            schema.register_table(name, provider).map_err(internal)?;
        }
        let catalog = MemoryCatalogProvider::new();
        catalog
            .register_schema(SCHEMA, Arc::new(schema))
            .map_err(internal)?;
        let list = MemoryCatalogProviderList::new();
        list.register_catalog(CATALOG.to_string(), Arc::new(catalog));
        let mut state = self.template.clone();
        state.register_catalog_list(Arc::new(list));
        Ok(state)
    }

    pub async fn plan(
        &self,
        state: &SessionState,
        statement: DFStatement,
    ) -> Result<LogicalPlan, Error> {
        // Planner errors describe the query against the schema (unknown
        // column, type mismatch of the query's own literals), not data.
        state
            .statement_to_plan(statement)
            .await
            .map_err(|e| match e.find_root() {
                DataFusionError::Plan(msg)
                    if msg.contains("table") && msg.contains("not found") =>
                {
                    Error::SqlError("a table in the query is not available".into())
                }
                root => Error::SqlError(format!("cannot plan query: {root}")),
            })
    }

    /// Passes a plan through the analyzer (with the rules that make its
    /// expressions total) and the optimiser, once: what runs is the result.
    pub fn optimize(&self, state: &SessionState, plan: &LogicalPlan) -> Result<Optimized, Error> {
        state.optimize(plan).map(Optimized).map_err(engine_error)
    }

    /// Runs a plan to completion under the per-query memory pool, refusing
    /// answers longer than `max_rows`.
    pub async fn execute(
        &self,
        state: &SessionState,
        plan: &Optimized,
        max_rows: usize,
    ) -> Result<(Vec<RecordBatch>, Arc<dyn ExecutionPlan>), Error> {
        self.run(state, plan, max_rows, |e| Err(engine_error(e)))
            .await
    }

    /// Runs a release job over protected rows. Expressions there are total
    /// (see `total`), so a failure while rows are read is not expected; if
    /// one happens anyway (not a limit), the job yields no rows rather than
    /// an error, so whether a query failed says nothing about any row.
    pub async fn execute_release(
        &self,
        state: &SessionState,
        plan: &Optimized,
        max_rows: usize,
    ) -> Result<(Vec<RecordBatch>, Arc<dyn ExecutionPlan>), Error> {
        #[cfg(feature = "ballista")]
        if let Some(cluster) = &self.cluster
            && cluster::Cluster::can_run(plan.plan())
        {
            return self.execute_on(cluster, state, plan, max_rows).await;
        }
        self.run(state, plan, max_rows, |e| match e.find_root() {
            DataFusionError::ResourcesExhausted(_) => Err(engine_error(e)),
            _ => {
                tracing::warn!(
                    kind = error_kind(&e),
                    "a release job failed; it releases nothing"
                );
                Ok(Vec::new())
            }
        })
        .await
    }

    /// A release job on the cluster. A job the cluster could not finish
    /// (an executor lost past Ballista's retries, the scheduler gone) is
    /// refused as `overloaded`: releasing nothing would be a wrong answer,
    /// and the failure depends on the cluster's state, not on any row.
    #[cfg(feature = "ballista")]
    async fn execute_on(
        &self,
        cluster: &cluster::Cluster,
        state: &SessionState,
        plan: &Optimized,
        max_rows: usize,
    ) -> Result<(Vec<RecordBatch>, Arc<dyn ExecutionPlan>), Error> {
        let physical = cluster.physical(state, plan).await.map_err(engine_error)?;
        match self.drain(state, &physical, max_rows).await? {
            Ok(batches) => Ok((batches, physical)),
            Err(e) if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) => {
                Err(engine_error(e))
            }
            Err(e) => {
                tracing::warn!(
                    kind = error_kind(&e),
                    "the cluster did not finish a release job"
                );
                Err(Error::Overloaded)
            }
        }
    }

    /// Every finished cluster job's metrics, as [`Engine::cluster_metrics`]
    /// futures fetch them (for the bench's account of where time goes).
    #[cfg(feature = "ballista")]
    pub fn cluster_jobs(&self) -> Option<tokio::sync::broadcast::Receiver<JobMetrics>> {
        Some(self.cluster.as_ref()?.finished_jobs())
    }

    /// For a plan that ran on the cluster, what the cluster reports for
    /// its job, to be awaited when convenient (one call to the scheduler);
    /// `None` for a plan that ran here.
    pub fn cluster_metrics(
        &self,
        physical: &Arc<dyn ExecutionPlan>,
    ) -> Option<impl Future<Output = Option<JobMetrics>> + Send + 'static> {
        #[cfg(feature = "ballista")]
        return {
            let cluster = self.cluster.clone()?;
            let job_id = cluster::Cluster::job_id(physical)?;
            Some(async move { cluster.job_metrics(job_id).await })
        };
        #[cfg(not(feature = "ballista"))]
        {
            let _ = physical;
            None::<std::future::Ready<Option<JobMetrics>>>
        }
    }

    /// Plans and drains `plan`; `failed` decides what a failure of the
    /// engine while running becomes.
    async fn run(
        &self,
        state: &SessionState,
        plan: &Optimized,
        max_rows: usize,
        failed: impl FnOnce(DataFusionError) -> Result<Vec<RecordBatch>, Error>,
    ) -> Result<(Vec<RecordBatch>, Arc<dyn ExecutionPlan>), Error> {
        let physical = self.physical(state, plan).await?;
        let batches = match self.drain(state, &physical, max_rows).await? {
            Ok(batches) => batches,
            Err(e) => failed(e)?,
        };
        Ok((batches, physical))
    }

    async fn physical(
        &self,
        state: &SessionState,
        plan: &Optimized,
    ) -> Result<Arc<dyn ExecutionPlan>, Error> {
        let physical = state
            .query_planner()
            .create_physical_plan(&plan.0, state)
            .await
            .map_err(engine_error)?;
        yield_after_joins(physical)
    }

    /// Every batch of the plan; the outer error is a limit or a fault of
    /// the sandbox, the inner one the engine's failure while running.
    async fn drain(
        &self,
        state: &SessionState,
        physical: &Arc<dyn ExecutionPlan>,
        max_rows: usize,
    ) -> Result<Result<Vec<RecordBatch>, DataFusionError>, Error> {
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(self.caches.clone())
            .with_memory_limit(self.limits.query_memory_bytes, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let task = Arc::new(TaskContext::from(state).with_runtime(runtime));
        let mut stream = match execute_stream(physical.clone(), task) {
            Ok(stream) => stream,
            Err(e) => return Ok(Err(e)),
        };
        let mut batches = Vec::new();
        let mut rows = 0usize;
        while let Some(batch) = stream.next().await {
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => return Ok(Err(e)),
            };
            rows += batch.num_rows();
            if rows > max_rows {
                return Err(Error::ResourceLimit(format!(
                    "the answer has more than {max_rows} rows"
                )));
            }
            batches.push(batch);
        }
        Ok(Ok(batches))
    }
}

/// A plan through the analyzer and the optimiser ([`Engine::optimize`]),
/// ready for physical planning. A repeated statement runs the one its gate
/// decision keeps: for a small aggregate the optimiser costs more than the
/// aggregation.
#[derive(Clone, Debug)]
pub struct Optimized(LogicalPlan);

impl Optimized {
    pub fn plan(&self) -> &LogicalPlan {
        &self.0
    }

    /// The plan with the sources of some scans swapped (`source_for`
    /// answers `None` for the others). Each new source must have its old
    /// one's schema and take no filter the old one refused: the optimiser
    /// asked the old one, and its answers stand.
    pub fn with_sources(
        &self,
        source_for: impl Fn(&TableScan) -> Option<Arc<dyn TableSource>>,
    ) -> Result<Optimized, Error> {
        self.0
            .clone()
            .transform_up(|node| match &node {
                LogicalPlan::TableScan(scan) => match source_for(scan) {
                    Some(source) => {
                        let mut scan = scan.clone();
                        scan.source = source;
                        Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                    }
                    None => Ok(Transformed::no(node)),
                },
                _ => Ok(Transformed::no(node)),
            })
            .map(|t| Optimized(t.data))
            .map_err(|e| Error::Internal(e.to_string()))
    }
}

/// What a cluster reports having done for one release job: its scans'
/// output rows (after Parquet pruning) and bytes read, from its job
/// metrics, and where the job's time went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobMetrics {
    pub job_id: String,
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub stages: u64,
    /// From submission until the scheduler had cut the plan into stages.
    pub scheduler_planning_ms: u64,
    /// From then until the last stage finished.
    pub stages_running_ms: u64,
    /// Summed over every task, so on several cores it can exceed the wall
    /// time: operators' compute, writing shuffle files, fetching them.
    pub compute_ms: u64,
    pub shuffle_write_ms: u64,
    pub shuffle_fetch_ms: u64,
}

/// Joins can emit many batches per input batch without ever polling a leaf,
/// so DataFusion's cooperative leaves never make them yield and a timeout
/// could not cut them short. Wrapping each join's output in a cooperative
/// stream makes every join yield to the scheduler regularly.
fn yield_after_joins(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>, Error> {
    use datafusion::physical_plan::coop::CooperativeExec;
    plan.transform_up(|node| {
        if node.name().contains("Join") {
            Ok(Transformed::yes(
                Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>
            ))
        } else {
            Ok(Transformed::no(node))
        }
    })
    .map(|t| t.data)
    .map_err(|e| Error::Internal(e.to_string()))
}

/// CPU time of all operators of an executed plan, in nanoseconds.
pub fn cpu_ns(plan: &Arc<dyn ExecutionPlan>) -> u64 {
    let own = plan
        .metrics()
        .and_then(|m| m.elapsed_compute())
        .unwrap_or(0) as u64;
    own + plan.children().into_iter().map(cpu_ns).sum::<u64>()
}
