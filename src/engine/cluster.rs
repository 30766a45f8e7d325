//! Release jobs on an Apache DataFusion Ballista cluster.
//!
//! The sandbox stays the gate: it parses, checks and rewrites every query
//! and plans each release aggregate (consent filter, contribution bounds,
//! hidden unit counts) exactly as for local execution. Only that logical
//! plan goes to the scheduler, which cuts it into stages for the
//! executors; the per-group aggregates come back, and suppression, noise
//! and the query above the release run here on them.
//!
//! Scheduler and executors plan and run with the sandbox's own rules
//! ([`node_state`]): the same allowed functions, the analyzer rules that
//! make expressions total, and the planner that knows
//! [`BoundContributions`]. That node and its operator travel by the codecs
//! below; everything else by Ballista's.

use super::JobMetrics;
use super::bound::{BoundContributions, BoundContributionsExec, Bounds};
use ballista_core::execution_plans::DistributedQueryExec;
use ballista_core::extension::SessionConfigExt;
use ballista_core::planner::BallistaQueryPlanner;
use ballista_core::serde::protobuf::job_status;
use ballista_core::serde::protobuf::operator_metric::Metric;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use ballista_core::serde::protobuf::{GetJobMetricsParams, GetJobStatusParams};
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, Result, TableReference};
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::source_as_provider;
use datafusion::execution::TaskContext;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionConfig;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use datafusion_proto::protobuf::LogicalPlanNode;
use std::net::SocketAddr;
use std::sync::Arc;

/// A Ballista scheduler the sandbox sends release jobs to.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `http://host:port`, as Ballista's clients want it.
    scheduler: String,
    /// Metrics of jobs as they are fetched, for whoever listens.
    finished: tokio::sync::broadcast::Sender<JobMetrics>,
    /// One connection, opened at the first job, carries every job's
    /// metrics requests (tonic reconnects it if the scheduler restarts).
    metrics_channel: Arc<tokio::sync::OnceCell<tonic::transport::Channel>>,
}

impl Cluster {
    /// `df://host:port` (or `http://host:port`).
    pub fn new(scheduler: &str) -> Result<Cluster, String> {
        let (host, port) = scheduler
            .strip_prefix("df://")
            .or_else(|| scheduler.strip_prefix("http://"))
            .and_then(host_port)
            .ok_or_else(|| format!("scheduler '{scheduler}' is not df://host:port"))?;
        Ok(Cluster {
            scheduler: format!("http://{host}:{port}"),
            finished: tokio::sync::broadcast::channel(64).0,
            metrics_channel: Arc::default(),
        })
    }

    /// Whether the cluster can run `plan`: every table it reads is files
    /// (the executors read them themselves). In-memory copies and unit
    /// summaries live only in the sandbox, so plans over them run here.
    pub fn can_run(plan: &LogicalPlan) -> bool {
        use datafusion::common::tree_node::TreeNodeRecursion;
        let mut files_only = true;
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                files_only &= source_as_provider(&scan.source)
                    .is_ok_and(|p| p.downcast_ref::<ListingTable>().is_some());
            }
            Ok(if files_only {
                TreeNodeRecursion::Continue
            } else {
                TreeNodeRecursion::Stop
            })
        });
        files_only
    }

    /// The physical plan that runs the already gated `plan` on the cluster:
    /// one operator that submits it to the scheduler and streams back the
    /// results. Planned in `state`, the buyer's session with only its query
    /// planner swapped, so its analyzer rules run before the plan leaves.
    pub async fn physical(
        &self,
        state: &SessionState,
        plan: &super::Optimized,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let config = node_config(state.config().clone());
        let planner = BallistaQueryPlanner::<LogicalPlanNode>::with_extension(
            self.scheduler.clone(),
            config.ballista_config(),
            Arc::new(LogicalCodec::default()),
        );
        let remote = SessionStateBuilder::new_from_existing(state.clone())
            .with_config(config)
            .with_query_planner(Arc::new(planner))
            .build();
        remote
            .query_planner()
            .create_physical_plan(plan.plan(), &remote)
            .await
    }

    /// The id of the job `physical` ran on the cluster, if it ran one.
    pub fn job_id(physical: &Arc<dyn ExecutionPlan>) -> Option<String> {
        physical
            .downcast_ref::<DistributedQueryExec<LogicalPlanNode>>()?
            .job_id()
            .map(|id| id.to_string())
    }

    pub fn finished_jobs(&self) -> tokio::sync::broadcast::Receiver<JobMetrics> {
        self.finished.subscribe()
    }

    /// What the scheduler reports for the finished job `job_id`.
    pub async fn job_metrics(&self, job_id: String) -> Option<JobMetrics> {
        let channel = self
            .metrics_channel
            .get_or_try_init(|| async {
                tonic::transport::Endpoint::from_shared(self.scheduler.clone())?
                    .connect()
                    .await
            })
            .await
            .ok()?;
        let mut client = SchedulerGrpcClient::new(channel.clone());
        let status = client
            .get_job_status(GetJobStatusParams {
                job_id: job_id.clone(),
            })
            .await
            .ok()?
            .into_inner();
        let Some(job_status::Status::Successful(job)) = status.status?.status else {
            return None;
        };
        let result = client
            .get_job_metrics(GetJobMetricsParams {
                job_id: job_id.clone(),
            })
            .await
            .ok()?
            .into_inner();
        let mut metrics = JobMetrics {
            job_id,
            stages: result.stages.len() as u64,
            scheduler_planning_ms: job.started_at.saturating_sub(job.queued_at),
            stages_running_ms: job.ended_at.saturating_sub(job.started_at),
            ..JobMetrics::default()
        };
        let (mut compute_ns, mut write_ns, mut fetch_ns) = (0, 0, 0);
        for operator in result.stages.iter().flat_map(|s| &s.operators) {
            let scan = operator.operator_type == "DataSourceExec";
            for metric in operator.metrics.iter().filter_map(|m| m.metric.as_ref()) {
                match metric {
                    Metric::OutputRows(rows) if scan => metrics.rows_scanned += rows,
                    Metric::Count(c) if scan && c.name == "bytes_scanned" => {
                        metrics.bytes_scanned += c.value
                    }
                    Metric::ElapseTime(ns) => compute_ns += ns,
                    Metric::Time(t) if t.name == "write_time" => write_ns += t.value,
                    Metric::Time(t) if t.name == "fetch_time" => fetch_ns += t.value,
                    _ => {}
                }
            }
        }
        metrics.compute_ms = compute_ns / 1_000_000;
        metrics.shuffle_write_ms = write_ns / 1_000_000;
        metrics.shuffle_fetch_ms = fetch_ns / 1_000_000;
        // Nobody listening is the usual case.
        let _ = self.finished.send(metrics.clone());
        Some(metrics)
    }
}

/// `host:port`, split.
fn host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// The session a scheduler plans and an executor runs with: the sandbox's
/// functions, analyzer rules and planner, the codecs for its plan nodes.
pub fn node_state(config: SessionConfig) -> SessionState {
    let mut state = super::rules(node_config(config)).build();
    super::functions::register_internal(&mut state);
    state
}

/// Ballista's adaptive planner is off: after a stage it runs join
/// selection again over hash joins whose dynamic filters already exist,
/// which DataFusion 55 refuses with an internal error, and the job then
/// never finishes (the person join at scale 10 did this on every run). The
/// static planner cuts the same plan into stages once.
fn node_config(config: SessionConfig) -> SessionConfig {
    config
        .upgrade_for_ballista()
        .with_ballista_adaptive_query_planner(false)
        .with_ballista_logical_extension_codec(Arc::new(LogicalCodec::default()))
        .with_ballista_physical_extension_codec(Arc::new(PhysicalCodec::default()))
}

/// A scheduler and `executors` executors in this process, on loopback
/// ports, run as `frostglass cluster` runs them (tasks pushed); returns the
/// scheduler's `df://` address once every executor has registered.
pub async fn in_process(executors: usize, vcores: usize) -> Result<String, String> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = nodelay_listener(loopback)?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    tokio::spawn(async move {
        if let Err(e) = serve_scheduler(listener, 30, Scheduling::Push).await {
            tracing::error!(error = %e, "in-process scheduler stopped");
        }
    });
    connect(&format!("http://127.0.0.1:{port}")).await?;
    let mut flight_ports = Vec::new();
    for _ in 0..executors {
        // Ballista's executor binds its own ports from numbers: take free
        // ones from the kernel and hand them over, both held until both are
        // known, so the kernel cannot hand the same one out twice.
        let free = || std::net::TcpListener::bind(loopback).map_err(|e| e.to_string());
        let (flight, grpc) = (free()?, free()?);
        let address = |l: &std::net::TcpListener| l.local_addr().map_err(|e| e.to_string());
        let (bind, grpc_port) = (address(&flight)?, address(&grpc)?.port());
        drop((flight, grpc));
        let options = ExecutorOptions {
            bind,
            grpc_port,
            scheduler: format!("127.0.0.1:{port}"),
            scheduling: Scheduling::Push,
            heartbeat_s: 5,
            vcores,
            work_dir: None,
        };
        flight_ports.push(options.bind);
        tokio::spawn(async move {
            if let Err(e) = run_executor(options).await {
                tracing::error!(error = %e, "in-process executor stopped");
            }
        });
    }
    // A pushing executor registers before it serves Flight.
    for address in flight_ports {
        let mut tries = 0;
        while tokio::net::TcpStream::connect(address).await.is_err() {
            tries += 1;
            if tries == 200 {
                return Err(format!("no in-process executor answers at {address}"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
    Ok(format!("df://127.0.0.1:{port}"))
}

async fn connect(url: &str) -> Result<SchedulerGrpcClient<tonic::transport::Channel>, String> {
    for _ in 0..100 {
        if let Ok(client) = SchedulerGrpcClient::connect(url.to_string()).await {
            return Ok(client);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Err(format!("no scheduler answers at {url}"))
}

/// How tasks reach executors. Scheduler and executors must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// The scheduler sends tasks to the executors' gRPC ports as soon as
    /// they are runnable; executors send heartbeats.
    Push,
    /// Idle executors ask the scheduler for tasks every 50 ms: each stage
    /// waits half of that on average before it starts.
    Pull,
}

impl Scheduling {
    fn policy(self) -> ballista_core::config::TaskSchedulingPolicy {
        match self {
            Scheduling::Push => ballista_core::config::TaskSchedulingPolicy::PushStaged,
            Scheduling::Pull => ballista_core::config::TaskSchedulingPolicy::PullStaged,
        }
    }
}

/// Runs a scheduler on `bind` until the process ends. Executors that stop
/// answering are given up after `executor_timeout_s`, and their tasks run
/// again elsewhere.
pub async fn run_scheduler(
    bind: SocketAddr,
    executor_timeout_s: u64,
    scheduling: Scheduling,
) -> Result<(), String> {
    serve_scheduler(nodelay_listener(bind)?, executor_timeout_s, scheduling).await
}

async fn serve_scheduler(
    listener: tokio::net::TcpListener,
    executor_timeout_s: u64,
    scheduling: Scheduling,
) -> Result<(), String> {
    use ballista_scheduler::cluster::BallistaCluster;
    use ballista_scheduler::config::SchedulerConfig;
    use ballista_scheduler::scheduler_process;
    use datafusion_proto::protobuf::PhysicalPlanNode;
    let bind = listener.local_addr().map_err(|e| e.to_string())?;
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        bind_port: bind.port(),
        external_host: bind.ip().to_string(),
        scheduling_policy: scheduling.policy(),
        executor_timeout_seconds: executor_timeout_s,
        expire_dead_executor_interval_seconds: (executor_timeout_s / 3).clamp(1, 15),
        no_executors_grace_period_seconds: executor_timeout_s,
        override_session_builder: Some(Arc::new(|config| Ok(node_state(config)))),
        override_config_producer: Some(Arc::new(|| node_config(SessionConfig::new()))),
        override_logical_codec: Some(Arc::new(LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(PhysicalCodec::default())),
        ..SchedulerConfig::default()
    };
    config.validate().map_err(|e| e.to_string())?;
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    let scheduler = scheduler_process::create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(
        cluster,
        Arc::new(config),
    )
    .await
    .map_err(|e| e.to_string())?;
    scheduler_process::start_grpc_service_with_listener(listener, scheduler)
        .await
        .map_err(|e| e.to_string())
}

/// A listener whose connections send at once. The scheduler streams each
/// job's status to the sandbox in small messages; Ballista serves it with
/// Nagle's algorithm on, so the message that says a job finished waited for
/// the previous one's delayed ACK: about 25 ms on every job. Linux gives
/// accepted sockets the listener's TCP_NODELAY.
fn nodelay_listener(bind: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    let socket = if bind.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    socket.set_nodelay(true).map_err(|e| e.to_string())?;
    socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
    socket.bind(bind).map_err(|e| format!("{bind}: {e}"))?;
    socket.listen(1024).map_err(|e| e.to_string())
}

/// How an executor runs: where it serves shuffle data (Flight) and, under
/// push scheduling, takes tasks (gRPC).
pub struct ExecutorOptions {
    pub bind: SocketAddr,
    pub grpc_port: u16,
    pub scheduler: String,
    pub scheduling: Scheduling,
    /// Under push scheduling, well below the scheduler's executor timeout.
    pub heartbeat_s: u64,
    pub vcores: usize,
    pub work_dir: Option<String>,
}

/// Runs an executor until the process ends.
pub async fn run_executor(options: ExecutorOptions) -> Result<(), String> {
    use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
    let scheduler = &options.scheduler;
    let (host, port) =
        host_port(scheduler).ok_or_else(|| format!("scheduler '{scheduler}' is not host:port"))?;
    let bind = options.bind;
    let state = node_state(SessionConfig::new());
    let config = ExecutorProcessConfig {
        bind_host: bind.ip().to_string(),
        external_host: Some(bind.ip().to_string()),
        port: bind.port(),
        grpc_port: options.grpc_port,
        scheduler_host: host,
        scheduler_port: port,
        vcores: options.vcores,
        work_dir: options.work_dir,
        task_scheduling_policy: options.scheduling.policy(),
        executor_heartbeat_interval_seconds: options.heartbeat_s.max(1),
        override_function_registry: Some(Arc::new((&state).into())),
        override_config_producer: Some(Arc::new(|| node_config(SessionConfig::new()))),
        override_logical_codec: Some(Arc::new(LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(PhysicalCodec::default())),
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| e.to_string())
}

/// Marks a [`BoundContributions`] node or operator on the wire; Ballista's
/// own messages are protobuf and never start with it.
const BOUND_TAG: &[u8] = b"frostglass/bound-contributions/1\0";

fn encode_bounds(bounds: &Bounds, buf: &mut Vec<u8>) {
    buf.extend_from_slice(BOUND_TAG);
    for n in [
        bounds.keys as u64,
        bounds.components as u64,
        bounds.max_groups,
        bounds.max_rows,
    ] {
        buf.extend_from_slice(&n.to_le_bytes());
    }
}

fn decode_bounds(buf: &[u8]) -> Option<Result<Bounds>> {
    let rest = buf.strip_prefix(BOUND_TAG)?;
    let numbers: Vec<u64> = rest
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Some(match numbers[..] {
        [keys, components, max_groups, max_rows] if rest.len() == 32 => Ok(Bounds {
            keys: keys as usize,
            components: components as usize,
            max_groups,
            max_rows,
        }),
        _ => Err(DataFusionError::Internal(
            "a contribution bound arrived malformed".into(),
        )),
    })
}

fn one_input<T: Clone>(inputs: &[T]) -> Result<T> {
    match inputs {
        [input] => Ok(input.clone()),
        _ => Err(DataFusionError::Internal(
            "contribution bounding has one input".into(),
        )),
    }
}

/// Ballista's logical codec, knowing [`BoundContributions`].
#[derive(Debug, Default)]
pub struct LogicalCodec {
    ballista: BallistaLogicalExtensionCodec,
}

impl LogicalExtensionCodec for LogicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        match decode_bounds(buf) {
            Some(bounds) => Ok(Extension {
                node: Arc::new(BoundContributions::try_new(one_input(inputs)?, bounds?)?),
            }),
            None => self.ballista.try_decode(buf, inputs, ctx),
        }
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        match node.node.as_any().downcast_ref::<BoundContributions>() {
            Some(bound) => {
                encode_bounds(bound.bounds(), buf);
                Ok(())
            }
            None => self.ballista.try_encode(node, buf),
        }
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        self.ballista
            .try_decode_table_provider(buf, table_ref, schema, ctx)
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        self.ballista
            .try_encode_table_provider(table_ref, node, buf)
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn FileFormatFactory>> {
        self.ballista.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> Result<()> {
        self.ballista.try_encode_file_format(buf, node)
    }
}

/// Ballista's physical codec, knowing [`BoundContributionsExec`].
#[derive(Debug, Default)]
pub struct PhysicalCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for PhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match decode_bounds(buf) {
            Some(bounds) => Ok(Arc::new(BoundContributionsExec::over(
                one_input(inputs)?,
                bounds?,
            )?)),
            None => self.ballista.try_decode(buf, inputs, ctx, converter),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        match node.downcast_ref::<BoundContributionsExec>() {
            Some(bound) => {
                encode_bounds(bound.bounds(), buf);
                Ok(())
            }
            None => self.ballista.try_encode(node, buf, converter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_survive_the_wire_and_damage_is_an_error() {
        let bounds = Bounds {
            keys: 3,
            components: 2,
            max_groups: 7,
            max_rows: u64::MAX,
        };
        let mut buf = Vec::new();
        encode_bounds(&bounds, &mut buf);
        assert_eq!(decode_bounds(&buf).expect("tagged").expect("whole"), bounds);
        assert!(
            decode_bounds(&buf[..buf.len() - 1])
                .expect("tagged")
                .is_err()
        );
        assert!(decode_bounds(&buf[1..]).is_none());
    }

    /// What executors decode function names with, and what the scheduler
    /// plans with: the sandbox's allow-list, not Ballista's defaults.
    #[test]
    fn cluster_nodes_know_exactly_the_sandbox_functions() {
        use super::super::functions::{AGGREGATE, INTERNAL, SCALAR, WINDOW};
        use std::collections::BTreeSet;
        let state = node_state(SessionConfig::new());
        let registry = ballista_core::registry::BallistaFunctionRegistry::from(&state);
        let names = |it: &mut dyn Iterator<Item = String>| it.collect::<BTreeSet<String>>();
        let allowed = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            names(
                &mut registry
                    .scalar_functions
                    .values()
                    .map(|f| f.name().to_string())
            ),
            allowed(&[SCALAR, INTERNAL].concat())
        );
        assert_eq!(
            names(
                &mut registry
                    .aggregate_functions
                    .values()
                    .map(|f| f.name().to_string())
            ),
            allowed(AGGREGATE)
        );
        assert_eq!(
            names(
                &mut registry
                    .window_functions
                    .values()
                    .map(|f| f.name().to_string())
            ),
            allowed(WINDOW)
        );
        assert!(registry.higher_order_functions.is_empty());
    }

    /// The metering cross-check has figures to compare: a job's scans
    /// report every row of the file they read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_job_reports_the_rows_its_scans_read() {
        use crate::config::{Execution, Limits};
        use datafusion::dataframe::DataFrameWriteOptions;
        use datafusion::prelude::{ParquetReadOptions, SessionContext};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let path = path.to_str().unwrap();
        let ctx = SessionContext::new();
        ctx.sql("SELECT CAST(v AS BIGINT) AS x FROM (SELECT unnest(range(0, 5000)) AS v)")
            .await
            .unwrap()
            .write_parquet(path, DataFrameWriteOptions::new(), None)
            .await
            .unwrap();
        ctx.register_parquet("t", path, ParquetReadOptions::default())
            .await
            .unwrap();
        let table = ctx.table_provider("t").await.unwrap();

        let scheduler = in_process(2, 1).await.unwrap();
        let engine = super::super::Engine::with_execution(
            Limits::default(),
            &Execution::Ballista { scheduler },
        )
        .unwrap();
        let state = engine.session_with(vec![("t".into(), table)]).unwrap();
        let sql = "SELECT x > 2499 AS k, SUM(x) AS s FROM t WHERE x >= 0 GROUP BY x > 2499";
        let plan = engine
            .plan(&state, engine.parse(sql).unwrap())
            .await
            .unwrap();
        assert!(Cluster::can_run(&plan));
        let mut finished = engine.cluster_jobs().expect("on a cluster");
        let plan = engine.optimize(&state, &plan).unwrap();
        let (batches, physical) = engine.execute_release(&state, &plan, 10).await.unwrap();
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 2);
        let metrics = engine
            .cluster_metrics(&physical)
            .expect("the job ran on the cluster")
            .await
            .expect("job metrics");
        assert_eq!(metrics.rows_scanned, 5000, "{metrics:?}");
        assert!(
            metrics.bytes_scanned > 0 && metrics.stages >= 1,
            "{metrics:?}"
        );
        // Tasks go out over gRPC and write their output to shuffle files:
        // no job finishes within the millisecond it started in.
        assert!(metrics.stages_running_ms > 0, "{metrics:?}");
        assert_eq!(finished.try_recv().ok(), Some(metrics));
    }

    #[test]
    fn a_scheduler_address_must_name_host_and_port() {
        assert_eq!(
            Cluster::new("df://10.0.0.5:50050")
                .expect("valid")
                .scheduler,
            "http://10.0.0.5:50050"
        );
        for bad in [
            "10.0.0.5:50050",
            "df://:50050",
            "df://host",
            "df://host:port",
        ] {
            assert!(Cluster::new(bad).is_err(), "{bad}");
        }
    }
}
