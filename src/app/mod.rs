//! The running sandbox: the services the pipeline and every front door
//! share, opened from the settings. Nothing here knows a transport.

pub mod admin;
pub mod market;
pub mod memo;
pub mod registration;
pub mod review;
pub mod slots;

use crate::catalog::Catalog;
use crate::catalog::registry::Registry;
use crate::config::Settings;
use crate::engine::Engine;
use crate::ledger::event::LedgerEvent;
use crate::ledger::{Ledger, NewEntry};
use crate::policy::Policies;
use crate::store::Store;
use crate::validate::Schemas;
use std::sync::Arc;

/// The services every front door shares: catalog, policies, state store,
/// ledger, the quota and budget books, the engine and its runtime. A plain
/// struct, so tests and front doors drive the pipeline without HTTP.
pub struct Sandbox {
    pub settings: Settings,
    pub catalog: Registry,
    pub policies: Policies,
    pub schemas: Schemas,
    pub store: Arc<Store>,
    pub ledger: Ledger,
    pub quotas: Arc<crate::accounting::QuotaBook>,
    pub budgets: Arc<crate::accounting::BudgetBook>,
    pub engine: Engine,
    /// Shared fairly between principals (see `slots`).
    pub query_slots: Arc<slots::Slots>,
    /// What the layers above keep so as not to compute it twice.
    pub memo: memo::Memo,
    /// Where requests go through the pipeline (gate, ledger, answer).
    pub runtime: QueryRuntime,
    /// Where queries execute: one runtime per query slot (`lane`), each
    /// with a worker per core.
    ///
    /// Not one runtime with a worker per slot: an engine step that holds
    /// its thread for long (a join's hash table, a sort) now holds only its
    /// own lane's, and the operating system shares the cores between the
    /// running queries, so a small query never waits for a worker
    /// (noisy-neighbour bench). And a query's tasks hand batches to each
    /// other among as many threads as there are cores: spread over a worker
    /// per slot, the hand-offs woke idle workers on every batch (a join at
    /// scale 1: 61 ms on nine workers, 41 ms on two).
    lanes: Vec<QueryRuntime>,
    /// Where registrations are prepared: one thread at idle CPU
    /// priority, so counting and summarising a new dataset takes what
    /// queries leave and never a query's place.
    pub registrations: QueryRuntime,
    /// Seals answers held for owners' review.
    pub vault: review::Vault,
}

/// A runtime of the sandbox's own: its own threads with deep stacks, so a
/// query can neither starve the HTTP workers nor overflow a small stack.
pub struct QueryRuntime(Option<tokio::runtime::Runtime>);

/// At most this many threads for all lanes together: each lane has a
/// worker per core unless the slots are so many that it would pass this.
const LANE_THREADS: usize = 256;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl QueryRuntime {
    pub fn new(name: &str, workers: usize) -> std::io::Result<QueryRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .thread_stack_size(64 * 1024 * 1024)
            .enable_all()
            .build()?;
        Ok(QueryRuntime(Some(rt)))
    }

    /// One worker (and its blocking threads) that runs only on a core
    /// nothing else wants (Linux `SCHED_IDLE`): any query thread that wakes
    /// up takes the core at once, so handing a query from thread to thread
    /// never waits behind it.
    pub fn background() -> std::io::Result<QueryRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("fg-register")
            .worker_threads(1)
            .thread_stack_size(64 * 1024 * 1024)
            .on_thread_start(idle_priority)
            .enable_all()
            .build()?;
        Ok(QueryRuntime(Some(rt)))
    }

    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(rt) => rt.spawn(fut),
            None => unreachable!("the runtime lives until the sandbox is dropped"),
        }
    }
}

/// Moves the calling thread to the idle scheduling class.
#[cfg(target_os = "linux")]
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` only reads `param` during the call, and
    // pid 0 names the calling thread; a failure leaves the thread as it was.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

#[cfg(not(target_os = "linux"))]
fn idle_priority() {}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's thread panics; this never blocks.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("invalid policies:\n{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Policies(Vec<crate::validate::Problem>),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Sandbox {
    pub async fn open(settings: Settings) -> Result<Sandbox, StartError> {
        let schemas = Schemas::compiled();
        let policies =
            Policies::load(&settings.policies_dir, &schemas).map_err(StartError::Policies)?;
        let store = Arc::new(Store::open(&settings.data_dir)?);
        let (catalog, unavailable) =
            registration::load_catalog(&settings.catalog_dir, &schemas, &store).await?;
        let ledger = Ledger::start(
            &settings.data_dir,
            std::time::Duration::from_millis(settings.checkpoint_interval_ms),
        )?;
        record_registrations(&ledger, &catalog).await?;
        let engine = Engine::with_execution(settings.limits.clone(), &settings.execution)
            .map_err(StartError::Config)?;
        let query_slots_total = settings.limits.max_concurrent_queries.max(1);
        let query_slots = slots::Slots::new(query_slots_total);
        let vault = review::Vault::open(&settings.data_dir)
            .map_err(|e| StartError::Config(format!("{e:?}")))?;
        let sandbox = Sandbox {
            settings,
            catalog: Registry::new(catalog),
            policies,
            schemas,
            store,
            ledger,
            quotas: Arc::default(),
            budgets: Arc::default(),
            engine,
            query_slots,
            // Gate decisions of repeated statements (`pipeline::plans`).
            memo: memo::Memo::new(4096),
            runtime: QueryRuntime::new("fg-pipeline", cores())?,
            lanes: (0..query_slots_total)
                .map(|_| {
                    let workers = (LANE_THREADS / query_slots_total).clamp(1, cores());
                    QueryRuntime::new("fg-query", workers)
                })
                .collect::<std::io::Result<_>>()?,
            registrations: QueryRuntime::background()?,
            vault,
        };
        for (id, owner, reason) in unavailable {
            let _ = sandbox.catalog.begin(&id, &owner);
            sandbox.catalog.fail(&id, reason);
        }
        registration::evaluate_catalog(&sandbox).await?;
        Ok(sandbox)
    }

    /// The runtime a query holding `slot` executes on: its own, while it
    /// holds the slot.
    pub fn lane(&self, slot: &slots::Slot) -> &QueryRuntime {
        &self.lanes[slot.lane()]
    }

    /// A dataset's lifetime epsilon: its owner's, else the configured default.
    pub fn lifetime_epsilon(&self, manifest: &crate::catalog::Manifest) -> f64 {
        manifest
            .release
            .dp
            .as_ref()
            .and_then(|dp| dp.epsilon_total)
            .unwrap_or(self.settings.limits.default_dataset_epsilon)
    }
}

/// Records each dataset whose manifest or data is new or changed since its last registration entry.
async fn record_registrations(ledger: &Ledger, catalog: &Catalog) -> Result<(), StartError> {
    let recorded = ledger.registered_manifests()?;
    for d in catalog.datasets.values() {
        let key = crate::ledger::event::version_key(&d.manifest_sha256, Some(&d.data_sha256));
        if recorded.get(d.id()) == Some(&key) {
            continue;
        }
        let event = LedgerEvent::DatasetRegistered {
            dataset: d.id().to_string(),
            owner: d.manifest.owner.clone(),
            level: d.manifest.level.as_str().to_string(),
            manifest_sha256: d.manifest_sha256.clone(),
            rows: d.num_rows,
            data_sha256: Some(d.data_sha256.clone()),
            version: None,
            by: None,
            pricing: d.manifest.pricing.clone(),
        };
        ledger.append(NewEntry::event(event)).await?;
    }
    Ok(())
}
