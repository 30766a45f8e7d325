//! Building and running the server, separated from `main` so tests can start
//! the real application on a random port.

use crate::api;
use crate::auth;
use crate::catalog::Catalog;
use crate::config::Settings;
use crate::engine::Engine;
use crate::policy::Policies;
use crate::store::{NewGrant, Principal, Role, Store};
use crate::validate::Schemas;
use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

/// Everything a request needs: the catalog, policies, state store and engine.
pub struct Sandbox {
    pub settings: Settings,
    pub catalog: Catalog,
    pub policies: Policies,
    pub schemas: Schemas,
    pub store: Arc<Store>,
    pub ledger: crate::ledger::Ledger,
    pub quotas: Arc<crate::metering::QuotaBook>,
    pub budgets: Arc<crate::metering::BudgetBook>,
    pub throttle: crate::api::throttle::Throttle,
    pub noise: crate::release::noise::NoisePool,
    pub engine: Engine,
    pub query_slots: tokio::sync::Semaphore,
    pub runtime: QueryRuntime,
}

/// The runtime queries execute on: its own threads with deep stacks, so a
/// query can neither starve the HTTP workers nor overflow a small stack.
pub struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl QueryRuntime {
    pub fn new() -> std::io::Result<QueryRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("fg-query")
            .thread_stack_size(64 * 1024 * 1024)
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
        let catalog = Catalog::load(&settings.catalog_dir, &schemas).await?;
        let store = Arc::new(Store::open(&settings.data_dir)?);
        let ledger = crate::ledger::Ledger::start(&settings.data_dir)?;
        record_registrations(&store, &ledger, &catalog).await?;
        let engine = Engine::new(settings.limits.clone());
        let query_slots =
            tokio::sync::Semaphore::new(settings.limits.max_concurrent_queries.max(1));
        Ok(Sandbox {
            settings,
            catalog,
            policies,
            schemas,
            store,
            ledger,
            quotas: Arc::default(),
            budgets: Arc::default(),
            throttle: Default::default(),
            noise: Default::default(),
            engine,
            query_slots,
            runtime: QueryRuntime::new()?,
        })
    }
}

/// Records each dataset whose manifest is new or changed since its last registration entry.
async fn record_registrations(
    store: &Store,
    ledger: &crate::ledger::Ledger,
    catalog: &Catalog,
) -> Result<(), StartError> {
    let recorded = store.registered_manifests()?;
    for d in catalog.datasets.values() {
        let manifest = serde_json::to_string(&d.manifest).unwrap_or_default();
        let digest = crate::ledger::sha256_hex(manifest.as_bytes());
        if recorded.get(d.id()) == Some(&digest) {
            continue;
        }
        let fields = serde_json::json!({
            "dataset": d.id(),
            "owner": d.manifest.owner,
            "level": d.manifest.level,
            "manifest_sha256": digest,
            "rows": d.num_rows,
        });
        let entry = crate::ledger::NewEntry {
            kind: "dataset_registered",
            principal: None,
            grant: None,
            decision: "recorded",
            body: crate::ledger::event_body("dataset_registered", fields),
            sql: None,
        };
        ledger.append(entry).await?;
    }
    Ok(())
}

/// TLS 1.2 and 1.3 only, with rustls's modern cipher suites (ring provider).
fn tls_config(tls: &crate::config::TlsSettings) -> Result<rustls::ServerConfig, StartError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let bad = |what: &str, e: String| StartError::Config(format!("TLS {what}: {e}"));
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("certificate", format!("{}: {e}", tls.cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| bad("key", format!("{}: {e}", tls.key.display())))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let provider_builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| bad("versions", e.to_string()))?;
    let builder = match &tls.client_ca {
        None => provider_builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).map_err(|e| bad("client CA", e.to_string()))?
            {
                roots
                    .add(c.map_err(|e| bad("client CA", e.to_string()))?)
                    .map_err(|e| bad("client CA", e.to_string()))?;
            }
            // Optional at the TLS layer; principals bound to a certificate are held to it per request.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad("client CA", e.to_string()))?;
            provider_builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate", e.to_string()))
}

pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application, StartError> {
        let tls = match &settings.tls {
            Some(tls) => Some(tls_config(tls)?),
            None => None,
        };
        let listener = TcpListener::bind(&settings.listen)
            .map_err(|e| StartError::Listen(settings.listen.clone(), e))?;
        let local = listener.local_addr()?;
        let port = local.port();
        if tls.is_none() && !local.ip().is_loopback() && !settings.allow_plain_http {
            return Err(StartError::Config(format!(
                "refusing plain HTTP on {local}: configure tls (cert, key) or set allow_plain_http"
            )));
        }
        let limits = settings.limits.clone();
        let sandbox = web::Data::new(Sandbox::open(settings).await?);
        let server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(
                    crate::telemetry::request_span,
                ))
                .app_data(sandbox.clone())
                .app_data(web::QueryConfig::default().error_handler(|e, _| {
                    crate::error::ApiError::InvalidRequest(e.to_string()).into()
                }))
                .app_data(web::PathConfig::default().error_handler(|e, _| {
                    crate::error::ApiError::InvalidRequest(e.to_string()).into()
                }))
                .configure(api::routes)
                .default_service(web::to(api::not_found))
        })
        .max_connections(limits.max_connections)
        .client_request_timeout(std::time::Duration::from_millis(
            limits.client_request_timeout_ms,
        ))
        .client_disconnect_timeout(std::time::Duration::from_secs(2))
        .keep_alive(std::time::Duration::from_secs(limits.keep_alive_s))
        .on_connect(|conn, data| {
            crate::auth::capture_client_cert(conn, data);
            crate::api::connection::remember(conn, data);
        });
        let server = match tls {
            Some(config) => server.listen_rustls_0_23(listener, config)?,
            None => server.listen(listener)?,
        }
        .run();
        Ok(Application { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// Demo principals and grants, made on a first start with no principals.
pub struct DemoKeys {
    pub keys: Vec<(String, Role, String)>,
}

/// Creates one owner per dataset owner, a buyer with grants on every
/// non-core dataset, and an auditor; returns their keys (shown once).
pub fn bootstrap_demo_principals(
    store: &Store,
    catalog: &Catalog,
    policies: &Policies,
) -> Result<DemoKeys, StartError> {
    let mut keys = Vec::new();
    let mut add = |id: &str, role: Role, org: &str| -> Result<(), StartError> {
        let key = auth::generate_key();
        let p = Principal {
            id: id.to_string(),
            role,
            org: Some(org.to_string()),
            region: "CN".into(),
        };
        store.add_principal(&p, &auth::key_hash(&key))?;
        keys.push((id.to_string(), role, key));
        Ok(())
    };
    let mut owners: Vec<&str> = catalog
        .datasets
        .values()
        .map(|d| d.manifest.owner.as_str())
        .collect();
    owners.sort();
    owners.dedup();
    for owner in owners {
        add(&format!("owner:{owner}"), Role::Owner, owner)?;
    }
    add("buyer:demo", Role::Buyer, "demo")?;
    add("auditor:demo", Role::Auditor, "regulator")?;
    let datasets: Vec<String> = catalog
        .datasets
        .values()
        .filter(|d| policies.levels.rule(d.manifest.level).external_buyers)
        .map(|d| d.id().to_string())
        .collect();
    store.add_grant(&NewGrant {
        buyer: "buyer:demo".into(),
        datasets,
        purpose: "public_health_research".into(),
        queries_per_day: Some(10_000),
        rows_per_day: None,
        bytes_per_day: None,
        epsilon: Some(10.0),
        expires_at: None,
        cross_border_assessment: None,
    })?;
    Ok(DemoKeys { keys })
}

/// Writes the demo keys to a file only the owner can read.
pub fn write_keys_file(path: &Path, keys: &DemoKeys) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(
        file,
        "# Frostglass DEMO API keys. Shown once; only their hashes are stored."
    )?;
    for (id, role, key) in &keys.keys {
        writeln!(file, "{id}\t{}\t{key}", role.as_str())?;
    }
    file.sync_all()
}
