//! The `frostglass` command line: serve the sandbox, manage principals and
//! grants, generate demo data, check manifests and policies.

mod bench;
#[cfg(feature = "ballista")]
mod bench_cluster;
mod bench_flight;
mod bench_ledger;

use clap::{Parser, Subcommand};
use frostglass::app::admin;
use frostglass::catalog;
use frostglass::config::Settings;
use frostglass::ledger::{Writer, verify};
use frostglass::policy::Policies;
use frostglass::store::{NewGrant, Principal, Role, Store};
use frostglass::validate::{Problem, Schemas};
use frostglass::{auth, demo, telemetry};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "frostglass",
    version,
    about = "A privacy-preserving data trading sandbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the sandbox server (generates demo data and demo keys on first start).
    Serve {
        #[arg(long)]
        listen: Option<String>,
        #[arg(long)]
        catalog: Option<PathBuf>,
        #[arg(long)]
        policies: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// JSON configuration file (see README, "Configuration").
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where Arrow Flight SQL listens (default 127.0.0.1:50051; `off`: not at all).
        #[arg(long)]
        flight_listen: Option<String>,
    },
    /// Manage principals.
    Principal {
        #[command(subcommand)]
        command: PrincipalCommand,
    },
    /// Manage grants.
    Grant {
        #[command(subcommand)]
        command: GrantCommand,
    },
    /// (Re)generate the deterministic demo data.
    DemoData {
        #[arg(long, default_value = "catalog")]
        catalog: PathBuf,
        /// Multiplies every row count (e.g. 10 for benchmarks, 0.05 for quick tests).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
    },
    /// Verify the usage ledger: leaves, tree, signed heads, growth since the last run, a receipt.
    Verify {
        /// A local data directory to verify.
        #[arg(long, conflicts_with = "url")]
        data_dir: Option<PathBuf>,
        /// A running server to verify (with an auditor's key).
        #[arg(long, requires = "key")]
        url: Option<String>,
        #[arg(long)]
        key: Option<String>,
        /// CA certificate (PEM) to trust for an https --url, e.g. a self-signed server's.
        #[arg(long, requires = "url")]
        ca: Option<PathBuf>,
        /// The ledger's public key (hex); pins it instead of trusting the source.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Remembers the last verified head and key between runs.
        #[arg(long)]
        state: Option<PathBuf>,
        /// A receipt (or a whole query response) to check.
        #[arg(long)]
        receipt: Option<PathBuf>,
        /// A dispute evidence bundle (`GET /v1/evidence/{query_id}`) to check
        /// offline against `--public-key` alone.
        #[arg(long, requires = "public_key")]
        evidence: Option<PathBuf>,
        /// A settlement statement (`GET /v1/settlements`) to recompute from
        /// the ledger in `--data-dir` and check against `--public-key`.
        #[arg(long, requires = "public_key", conflicts_with = "evidence")]
        settlement: Option<PathBuf>,
    },
    /// Benchmark the sandbox against plain DataFusion, side by side (build with --release).
    Bench {
        #[arg(long, default_value = "catalog")]
        catalog: PathBuf,
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// Demo data scale: 50 gives 10 million city_health rows.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Timed runs per query and mode (after one warm-up).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Where generated data and bench state go (data is reused across runs).
        #[arg(long, default_value = "/tmp/frostglass-bench")]
        work_dir: PathBuf,
        #[arg(long, default_value = "bench.json")]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        http_clients: usize,
        #[arg(long, default_value_t = 10)]
        http_seconds: u64,
        /// Compare the two front doors instead: HTTP (JSON) and Flight SQL (Arrow).
        #[arg(long)]
        flight: bool,
        /// Run the suite with release jobs on an in-process Ballista cluster beside local execution.
        #[cfg(feature = "ballista")]
        #[arg(long)]
        ballista: bool,
        /// With --ballista: a running cluster's scheduler (df://host:port)
        /// instead of the in-process one, e.g. `frostglass cluster` processes.
        #[cfg(feature = "ballista")]
        #[arg(long, requires = "ballista")]
        scheduler: Option<String>,
        /// Stop after the query suite (no policy latency, no load tests).
        #[arg(long)]
        suite_only: bool,
        /// Run only this suite query (grouped_count, sum_avg_two_keys, join_on_person, selective_filter, high_cardinality).
        #[arg(long)]
        only: Option<String>,
        /// Time only this mode of the suite, for a profiler's sake (plain, floor, threshold, dp, dp-rows, http).
        #[arg(long)]
        mode: Option<String>,
    },
    /// The ledger at N entries, appended directly: restart, usage report, proofs, verify (build with --release).
    BenchLedger {
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
        /// Where the ledger is made (replaced on every run, unless --reuse).
        #[arg(long, default_value = "/tmp/frostglass-bench-ledger")]
        work_dir: PathBuf,
        /// Keep a ledger already in the work folder and fill it up to --entries.
        #[arg(long)]
        reuse: bool,
    },
    /// Measure a dataset's bound on rows per person with differential privacy
    /// (a DP quantile, charged to its lifetime budget and recorded in the
    /// ledger), to set `max_rows_per_unit` in its manifest.
    Bounds {
        #[arg(long)]
        dataset: String,
        #[arg(long, default_value_t = 0.99)]
        quantile: f64,
        #[arg(long, default_value_t = 0.1)]
        epsilon: f64,
        /// The largest bound considered.
        #[arg(long, default_value_t = 1000)]
        max: u64,
        #[arg(long, default_value = "catalog")]
        catalog: PathBuf,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Seal old ledger entries into a Parquet segment (with the checkpoint
    /// that ends it) and drop their bodies from the database; `verify`
    /// reads them back from the segment.
    Archive {
        /// Seal entries below this index (up to the newest verified checkpoint there).
        #[arg(long)]
        before: u64,
        /// Where segments go [default: <data-dir>/archive].
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Validate every manifest and policy file against schemas/.
    Check {
        #[arg(long, default_value = "catalog")]
        catalog: PathBuf,
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
    },
    /// Print the OpenAPI document generated from the code (what /openapi.json serves).
    Openapi,
    /// Run a Ballista scheduler or executor with the sandbox's functions,
    /// rules and plan codecs (on the sandbox's private network only).
    #[cfg(feature = "ballista")]
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[cfg(feature = "ballista")]
#[derive(Subcommand)]
enum ClusterCommand {
    /// The scheduler the sandbox sends release jobs to (`execution.scheduler`).
    Scheduler {
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: std::net::SocketAddr,
        /// Give up on an executor silent this long; its tasks run elsewhere.
        #[arg(long, default_value_t = 30)]
        executor_timeout_s: u64,
        /// How tasks reach executors; the executors must be started with the same.
        #[arg(long, value_enum, default_value_t = SchedulingArg::Push)]
        scheduling: SchedulingArg,
    },
    /// An executor: takes tasks from the scheduler, serves shuffle data over Flight on `--bind`.
    Executor {
        #[arg(long, default_value = "127.0.0.1:50051")]
        bind: std::net::SocketAddr,
        /// Where the scheduler pushes tasks (push scheduling only).
        #[arg(long, default_value_t = 50052)]
        grpc_port: u16,
        /// The scheduler, host:port.
        #[arg(long, default_value = "127.0.0.1:50050")]
        scheduler: String,
        #[arg(long, value_enum, default_value_t = SchedulingArg::Push)]
        scheduling: SchedulingArg,
        /// Seconds between heartbeats (push scheduling); keep it well below
        /// the scheduler's --executor-timeout-s.
        #[arg(long, default_value_t = 5)]
        heartbeat_s: u64,
        #[arg(long, default_value_t = 2)]
        vcores: usize,
        /// Where shuffle files go (default: a temporary folder).
        #[arg(long)]
        work_dir: Option<String>,
    },
}

#[cfg(feature = "ballista")]
#[derive(Clone, Copy, clap::ValueEnum)]
enum SchedulingArg {
    Push,
    Pull,
}

#[cfg(feature = "ballista")]
impl From<SchedulingArg> for frostglass::engine::cluster::Scheduling {
    fn from(arg: SchedulingArg) -> Self {
        match arg {
            SchedulingArg::Push => Self::Push,
            SchedulingArg::Pull => Self::Pull,
        }
    }
}

#[cfg(feature = "ballista")]
fn cluster(command: ClusterCommand) -> Result<(), String> {
    use frostglass::engine::cluster;
    frostglass::telemetry::init();
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        match command {
            ClusterCommand::Scheduler {
                bind,
                executor_timeout_s,
                scheduling,
            } => cluster::run_scheduler(bind, executor_timeout_s, scheduling.into()).await,
            ClusterCommand::Executor {
                bind,
                grpc_port,
                scheduler,
                scheduling,
                heartbeat_s,
                vcores,
                work_dir,
            } => {
                cluster::run_executor(cluster::ExecutorOptions {
                    bind,
                    grpc_port,
                    scheduler,
                    scheduling: scheduling.into(),
                    heartbeat_s,
                    vcores,
                    work_dir,
                })
                .await
            }
        }
    })
}

/// A principal's role, as the command line spells it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Owner,
    Buyer,
    Auditor,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Owner => Role::Owner,
            RoleArg::Buyer => Role::Buyer,
            RoleArg::Auditor => Role::Auditor,
            RoleArg::Admin => Role::Admin,
        }
    }
}

#[derive(Subcommand)]
enum PrincipalCommand {
    /// Add a principal; prints its API key alone on the last line.
    Add {
        id: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        #[arg(long)]
        org: Option<String>,
        #[arg(long, default_value = "CN")]
        region: String,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Give a principal a second key (rotation); prints it alone on the last line.
    KeyAdd {
        id: String,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Bind a principal to a client certificate (PEM): its keys then work only over mutual TLS with that certificate's key.
    BindCert {
        id: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Revoke one key (given as the key itself); requests with it are refused from then on.
    KeyRevoke {
        key: String,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Revoke a grant; queries under it are refused from then on.
    Revoke {
        id: String,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Grant a buyer access to datasets for a purpose; prints the grant id on the last line.
    Add(Box<GrantArgs>),
}

#[derive(clap::Args)]
struct GrantArgs {
    #[arg(long)]
    buyer: String,
    #[arg(long = "dataset", required = true)]
    datasets: Vec<String>,
    #[arg(long)]
    purpose: String,
    #[arg(long)]
    queries_per_day: Option<u64>,
    #[arg(long)]
    rows_per_day: Option<u64>,
    #[arg(long)]
    bytes_per_day: Option<u64>,
    #[arg(long)]
    epsilon: Option<f64>,
    /// RFC 3339 timestamp after which the grant is inactive.
    #[arg(long)]
    expires: Option<String>,
    /// Reference of an approved cross-border assessment, for important data abroad.
    #[arg(long)]
    cross_border_assessment: Option<String>,
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "catalog")]
    catalog: PathBuf,
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            listen,
            catalog,
            policies,
            data_dir,
            config,
            flight_listen,
        } => serve(listen, catalog, policies, data_dir, config, flight_listen),
        Command::Principal {
            command:
                PrincipalCommand::Add {
                    id,
                    role,
                    org,
                    region,
                    data_dir,
                },
        } => add_principal(id, role.into(), org, region, &data_dir),
        Command::Principal {
            command: PrincipalCommand::KeyAdd { id, data_dir },
        } => add_key(&id, &data_dir),
        Command::Principal {
            command: PrincipalCommand::BindCert { id, cert, data_dir },
        } => bind_cert(&id, &cert, &data_dir),
        Command::Principal {
            command: PrincipalCommand::KeyRevoke { key, data_dir },
        } => revoke_key(&key, &data_dir),
        Command::Grant { command } => grant(command),
        Command::DemoData { catalog, scale } => demo_data(&catalog, scale, true),
        Command::Check { catalog, policies } => check(&catalog, &policies),
        Command::Archive {
            before,
            out,
            data_dir,
        } => archive(before, out, &data_dir),
        Command::Bounds {
            dataset,
            quantile,
            epsilon,
            max,
            catalog,
            data_dir,
        } => bounds(&dataset, (quantile, epsilon, max), &catalog, &data_dir),
        Command::BenchLedger {
            entries,
            work_dir,
            reuse,
        } => bench_ledger::run(entries.max(1), &work_dir, reuse),
        Command::Openapi => {
            print!("{}", frostglass::api::openapi::document());
            Ok(())
        }
        #[cfg(feature = "ballista")]
        Command::Cluster { command } => cluster(command),
        Command::Bench {
            catalog,
            policies,
            scale,
            runs,
            work_dir,
            out,
            http_clients,
            http_seconds,
            flight,
            #[cfg(feature = "ballista")]
            ballista,
            #[cfg(feature = "ballista")]
            scheduler,
            suite_only,
            only,
            mode,
        } => {
            let options = bench::Options {
                catalog,
                policies,
                scale,
                runs: runs.max(1),
                work_dir,
                out,
                http_clients: http_clients.max(1),
                http_seconds: http_seconds.max(1),
                suite_only,
                only,
                mode,
            };
            let run: fn(bench::Options) -> Result<(), String> = if flight {
                bench_flight::run
            } else {
                bench::run
            };
            #[cfg(feature = "ballista")]
            let run = |options| {
                if ballista {
                    bench_cluster::run(options, scheduler)
                } else {
                    run(options)
                }
            };
            run(options)
        }
        Command::Verify {
            data_dir,
            url,
            key,
            ca,
            public_key,
            state,
            receipt,
            evidence,
            settlement,
        } => {
            if let (Some(bundle), Some(key)) = (&evidence, &public_key) {
                verify_evidence(bundle, key)
            } else if let (Some(statement), Some(key)) = (&settlement, &public_key) {
                let dir = data_dir.unwrap_or_else(|| PathBuf::from("data"));
                verify_settlement(statement, &dir, key)
            } else {
                let source = match (url, key) {
                    (Some(url), Some(key)) => verify::Source::Remote { url, key, ca },
                    _ => verify::Source::Local(data_dir.unwrap_or_else(|| PathBuf::from("data"))),
                };
                match verify::run(&verify::Options {
                    source,
                    public_key,
                    state,
                    receipt,
                }) {
                    Ok(summary) => {
                        println!("{summary}");
                        Ok(())
                    }
                    Err(failure) => Err(failure.to_string()),
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Checks a dispute evidence bundle offline against the ledger key in `key_file` (hex).
fn verify_evidence(bundle: &Path, key_file: &Path) -> Result<(), String> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let bundle: frostglass::ledger::evidence::Bundle =
        serde_json::from_str(&read(bundle)?).map_err(|e| format!("not an evidence bundle: {e}"))?;
    let key =
        hex::decode(read(key_file)?.trim()).map_err(|_| "the public key is not hex".to_string())?;
    let summary = frostglass::ledger::evidence::verify(&bundle, &key)?;
    println!("{summary}");
    Ok(())
}

/// Recomputes a settlement statement from the ledger in `data_dir` and
/// checks its signature against the ledger key in `key_file` (hex).
fn verify_settlement(statement: &Path, data_dir: &Path, key_file: &Path) -> Result<(), String> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let statement: frostglass::ledger::settlement::Statement =
        serde_json::from_str(&read(statement)?)
            .map_err(|e| format!("not a settlement statement: {e}"))?;
    let key =
        hex::decode(read(key_file)?.trim()).map_err(|_| "the public key is not hex".to_string())?;
    let conn = frostglass::ledger::open_connection(data_dir).map_err(|e| e.to_string())?;
    let bodies: Vec<String> = frostglass::ledger::tables::entries(&conn, 0, statement.tree_size)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, body, _)| body)
        .collect();
    let summary = frostglass::ledger::settlement::verify(&statement, &bodies, &key)?;
    println!("{summary}");
    Ok(())
}

fn serve(
    listen: Option<String>,
    catalog: Option<PathBuf>,
    policies: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    flight_listen: Option<String>,
) -> Result<(), String> {
    telemetry::init();
    let mut settings = Settings::load(config.as_deref())?;
    match flight_listen.as_deref() {
        Some("off") => settings.flight_listen = None,
        Some(listen) => settings.flight_listen = Some(listen.to_string()),
        None => {}
    }
    if let Some(l) = listen {
        settings.listen = l;
    }
    if let Some(c) = catalog {
        settings.catalog_dir = c;
    }
    if let Some(p) = policies {
        settings.policies_dir = p;
    }
    if let Some(d) = data_dir {
        settings.data_dir = d;
    }
    demo_data(&settings.catalog_dir, 1.0, false)?;
    let rt = actix_web::rt::System::new();
    rt.block_on(async move {
        first_start(&settings).await?;
        let doors = frostglass::startup::start(settings.clone())
            .await
            .map_err(|e| e.to_string())?;
        eprintln!(
            "Frostglass is serving on http://{}",
            with_port(&settings.listen, doors.http.port())
        );
        if let (Some(listen), Some(port)) = (&settings.flight_listen, doors.flight_port) {
            eprintln!(
                "  Flight SQL on grpc{}://{}",
                if settings.tls.is_some() { "+tls" } else { "" },
                with_port(listen, port)
            );
        }
        eprintln!("  catalog:  {}", settings.catalog_dir.display());
        eprintln!("  policies: {}", settings.policies_dir.display());
        eprintln!(
            "  data:     {} (state, usage log)",
            settings.data_dir.display()
        );
        doors
            .http
            .run_until_stopped()
            .await
            .map_err(|e| e.to_string())
    })
}

fn with_port(listen: &str, port: u16) -> String {
    match listen.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{port}"),
        None => listen.to_string(),
    }
}

/// On a first start (no principals yet) creates the demo principals and prints their keys once.
async fn first_start(settings: &Settings) -> Result<(), String> {
    let store = Store::open(&settings.data_dir).map_err(|e| e.to_string())?;
    if store.principal_count().map_err(|e| e.to_string())? > 0 {
        return Ok(());
    }
    let schemas = Schemas::compiled();
    let policies = Policies::load(&settings.policies_dir, &schemas).map_err(problems_text)?;
    let manifests: Vec<_> = catalog::read_manifests(&settings.catalog_dir, &schemas)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    let mut writer = writer(&settings.data_dir)?;
    let keys =
        admin::bootstrap_demo(&mut writer, &manifests, &policies).map_err(|e| e.to_string())?;
    let path = settings.data_dir.join("demo-keys.txt");
    admin::write_keys_file(&path, &keys)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // Each demo owner gets its domain root, where it may put data to register.
    for m in &manifests {
        if let Ok(root) =
            catalog::location::owner_root(&settings.owner_roots, &settings.data_dir, &m.owner)
        {
            std::fs::create_dir_all(&root)
                .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        }
    }
    println!(
        "First start: created DEMO principals. These keys are shown once and saved (mode 0600) to {}:",
        path.display()
    );
    for (id, role, key) in &keys.keys {
        println!("  {id:<26} {:<8} {key}", role.as_str());
    }
    println!(
        "The demo buyer holds a grant on every non-core dataset for purpose public_health_research."
    );
    Ok(())
}

fn problems_text(problems: Vec<Problem>) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn archive(before: u64, out: Option<PathBuf>, data_dir: &Path) -> Result<(), String> {
    let out = out.unwrap_or_else(|| data_dir.join("archive"));
    let sealed = frostglass::ledger::archive::seal(&mut writer(data_dir)?, data_dir, &out, before)
        .map_err(|e| e.to_string())?;
    match sealed {
        Some(s) => println!(
            "sealed entries {}..{} into {} (sha256 {})",
            s.first,
            s.end,
            s.path.display(),
            s.sha256
        ),
        None => println!("nothing to seal below {before}"),
    }
    Ok(())
}

fn bounds(
    dataset: &str,
    (quantile, epsilon, max): (f64, f64, u64),
    catalog_dir: &Path,
    data_dir: &Path,
) -> Result<(), String> {
    if !((0.0..=1.0).contains(&quantile) && epsilon.is_finite() && epsilon > 0.0) || max == 0 {
        return Err("--quantile lies in [0, 1], --epsilon and --max are positive".into());
    }
    let schemas = Schemas::compiled();
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let (counts, lifetime) = rt.block_on(async {
        let catalog = catalog::Catalog::load(catalog_dir, &schemas)
            .await
            .map_err(|e| e.to_string())?;
        let d = catalog
            .get(dataset)
            .ok_or_else(|| format!("no dataset '{dataset}' in {}", catalog_dir.display()))?;
        let Some(dp) = d.manifest.release.dp.as_ref() else {
            return Err(format!(
                "{dataset} is not released with differential privacy"
            ));
        };
        let lifetime = dp
            .epsilon_total
            .unwrap_or(frostglass::config::Limits::default().default_dataset_epsilon);
        Ok::<_, String>((d.rows_per_unit().await?, lifetime))
    })?;
    let bound = admin::measure_rows_per_unit(
        &mut writer(data_dir)?,
        dataset,
        &counts,
        lifetime,
        (quantile, epsilon, max),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "{dataset}: max_rows_per_unit {bound} (the {quantile} quantile of rows per person, \
         differentially private at epsilon {epsilon}, charged to the dataset's lifetime budget)"
    );
    println!("{bound}");
    Ok(())
}

fn writer(data_dir: &Path) -> Result<Writer, String> {
    admin::open(data_dir).map_err(|e| e.to_string())
}

fn add_key(id: &str, data_dir: &Path) -> Result<(), String> {
    let key = admin::add_key(&mut writer(data_dir)?, id).map_err(|e| e.to_string())?;
    println!("added a key for {id} (shown once):");
    println!("{key}");
    Ok(())
}

fn bind_cert(id: &str, cert: &Path, data_dir: &Path) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_file(cert)
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let spki = auth::spki_sha256(&der)
        .ok_or_else(|| format!("{} is not a usable certificate", cert.display()))?;
    admin::bind_cert(&mut writer(data_dir)?, id, &spki).map_err(|e| e.to_string())?;
    println!("bound {id} to the certificate key {spki}");
    Ok(())
}

fn revoke_key(key: &str, data_dir: &Path) -> Result<(), String> {
    let principal = admin::revoke_key(&mut writer(data_dir)?, key).map_err(|e| e.to_string())?;
    println!("revoked a key of {principal}");
    Ok(())
}

fn add_principal(
    id: String,
    role: Role,
    org: Option<String>,
    region: String,
    data_dir: &Path,
) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("principal id must be 1 to 128 characters".into());
    }
    if region.len() != 2 || !region.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("region must be a two-letter upper-case country code".into());
    }
    let principal = Principal {
        id: id.clone(),
        role,
        org,
        region,
    };
    let key =
        admin::add_principal(&mut writer(data_dir)?, &principal).map_err(|e| e.to_string())?;
    println!(
        "added {} principal {id}; its API key (shown once):",
        role.as_str()
    );
    println!("{key}");
    Ok(())
}

fn grant(command: GrantCommand) -> Result<(), String> {
    match command {
        GrantCommand::Revoke { id, data_dir } => {
            admin::revoke_grant(&mut writer(&data_dir)?, &id).map_err(|e| e.to_string())?;
            println!("revoked grant {id}");
            Ok(())
        }
        GrantCommand::Add(args) => add_grant(*args),
    }
}

fn add_grant(args: GrantArgs) -> Result<(), String> {
    let expires_at = match &args.expires {
        Some(e) => Some(
            chrono::DateTime::parse_from_rfc3339(e)
                .map_err(|_| "--expires must be an RFC 3339 timestamp".to_string())?
                .with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        None => None,
    };
    if args.epsilon.is_some_and(|e| !(e.is_finite() && e >= 0.0)) {
        return Err("--epsilon must be a non-negative number".into());
    }
    let grant = NewGrant {
        buyer: args.buyer,
        datasets: args.datasets,
        purpose: args.purpose,
        queries_per_day: args.queries_per_day,
        rows_per_day: args.rows_per_day,
        bytes_per_day: args.bytes_per_day,
        epsilon: args.epsilon,
        expires_at,
        cross_border_assessment: args.cross_border_assessment,
    };
    let schemas = Schemas::compiled();
    let policies = Policies::load(&args.policies, &schemas).map_err(problems_text)?;
    let manifests: Vec<_> = catalog::read_manifests(&args.catalog, &schemas)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    admin::check_grant(&grant, &policies, &manifests)?;
    let made = admin::add_grant(&mut writer(&args.data_dir)?, &grant).map_err(|e| e.to_string())?;
    println!(
        "granted {} access to {} for {}:",
        grant.buyer,
        grant.datasets.join(", "),
        grant.purpose
    );
    println!("{}", made.id);
    Ok(())
}

/// Generates demo data: always when `force`, else only the files that are missing.
fn demo_data(catalog_dir: &Path, scale: f64, force: bool) -> Result<(), String> {
    let schemas = Schemas::compiled();
    let manifests = catalog::read_manifests(catalog_dir, &schemas).map_err(|e| e.to_string())?;
    let targets: Vec<_> = demo::demo_targets(catalog_dir, &manifests)
        .into_iter()
        .filter(|(_, path)| force || !path.exists())
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    eprintln!("Generating demo data (scale {scale}, fixed seed):");
    demo::generate(&targets, scale, |line| eprintln!("{line}"))
}

fn check(catalog_dir: &Path, policies_dir: &Path) -> Result<(), String> {
    let schemas = Schemas::compiled();
    let mut problems = Vec::new();
    let mut manifests = 0;
    match catalog::read_manifests(catalog_dir, &schemas) {
        Ok(found) => manifests = found.len(),
        Err(catalog::CatalogError::Invalid(found)) => problems.extend(found),
        Err(e) => return Err(e.to_string()),
    }
    if let Err(found) = Policies::load(policies_dir, &schemas) {
        problems.extend(found);
    }
    for p in &problems {
        println!("{p}");
    }
    if problems.is_empty() {
        println!("ok: {manifests} manifests and 3 policy files are valid");
        Ok(())
    } else {
        Err(format!("{} problem(s) found", problems.len()))
    }
}
