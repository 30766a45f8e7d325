//! Test harness: the real application on a random port, over real HTTP,
//! with demo data generated once per test binary at a small scale.

use frostglass::app::admin;
use frostglass::config::{Limits, Settings};
use frostglass::ledger::{LedgerError, Writer};
use frostglass::store::{NewGrant, Principal, Role};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const SCALE: f64 = 0.1;
pub const PURPOSE: &str = "public_health_research";
/// The consent filter the sandbox applies for [`PURPOSE`], for computing ground truth.
pub const CONSENTED: &str = "strpos(consented_purposes, ',public_health_research,') > 0";

/// A catalog folder shared by all tests of this binary: the repo's manifests
/// and freshly generated demo data.
pub fn shared_catalog() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("fg-test-catalog-")
            .tempdir()
            .unwrap()
            .keep();
        frostglass::demo::catalog_folder(&repo().join("catalog"), &dir, &[], SCALE, |_| {})
            .unwrap();
        dir
    })
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct TestApp {
    pub base: String,
    /// Where its Flight SQL server listens.
    pub flight_port: u16,
    pub data_dir: PathBuf,
    pub keys: HashMap<String, String>,
    pub grants: HashMap<String, String>,
    agent: ureq::Agent,
}

pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub bytes: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }

    pub fn code(&self) -> Option<String> {
        self.json()["error"]["code"].as_str().map(str::to_string)
    }

    pub fn rule(&self) -> Option<String> {
        self.json()["error"]["details"]["rule"]
            .as_str()
            .map(str::to_string)
    }
}

#[derive(Default)]
pub struct Options {
    pub settings: Settings,
    pub acme_queries_per_day: Option<u64>,
    /// A catalog other than the shared one (see [`catalog_with`]).
    pub catalog: Option<PathBuf>,
}

/// A catalog of the shared data whose manifests `edit` may change.
pub fn catalog_with(edit: impl Fn(&mut Value)) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("fg-test-catalog-edit-")
        .tempdir()
        .unwrap()
        .keep();
    for entry in std::fs::read_dir(shared_catalog()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let mut manifest: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let location = shared_catalog().join(manifest["source"]["location"].as_str().unwrap());
            manifest["source"]["location"] = json!(location.to_str().unwrap());
            edit(&mut manifest);
            std::fs::write(dir.join(path.file_name().unwrap()), manifest.to_string()).unwrap();
        }
    }
    dir
}

pub fn spawn_app() -> TestApp {
    spawn_app_with(Options::default())
}

/// An app whose limits `edit` changes; everything else as in [`spawn_app`].
pub fn spawn_app_with_limits(edit: impl FnOnce(&mut Limits)) -> TestApp {
    let mut settings = Settings::default();
    edit(&mut settings.limits);
    spawn_app_with(Options {
        settings,
        ..Options::default()
    })
}

pub fn spawn_app_with(options: Options) -> TestApp {
    let data_dir = tempfile::Builder::new()
        .prefix("fg-test-data-")
        .tempdir()
        .unwrap()
        .keep();
    let store = Admin::open(&data_dir);
    let mut keys = HashMap::new();
    for (id, role, org, region) in [
        ("owner:hospital", Role::Owner, "hospital", "CN"),
        ("auditor:cac", Role::Auditor, "cac", "CN"),
        ("buyer:acme", Role::Buyer, "acme", "CN"),
        ("buyer:other", Role::Buyer, "other", "CN"),
        ("buyer:abroad", Role::Buyer, "abroad", "US"),
    ] {
        let p = Principal {
            id: id.into(),
            role,
            org: Some(org.into()),
            region: region.into(),
        };
        let key = store.add_principal(&p).unwrap();
        keys.insert(id.to_string(), key);
    }
    let mut grants = HashMap::new();
    let all = [
        "city_health",
        "telecom_usage",
        "enterprise_registry",
        "power_grid",
    ];
    for (buyer, datasets, assessment, quota) in [
        ("buyer:acme", &all[..], None, options.acme_queries_per_day),
        ("buyer:abroad", &all[..], None, None),
    ] {
        let g = NewGrant {
            buyer: buyer.into(),
            datasets: datasets.iter().map(|s| s.to_string()).collect(),
            purpose: PURPOSE.into(),
            queries_per_day: quota,
            rows_per_day: None,
            bytes_per_day: None,
            epsilon: None,
            expires_at: None,
            cross_border_assessment: assessment,
        };
        grants.insert(buyer.to_string(), store.add_grant(&g).unwrap());
    }
    drop(store);

    let mut settings = options.settings;
    settings.listen = "127.0.0.1:0".into();
    settings.flight_listen = Some("127.0.0.1:0".into());
    settings.catalog_dir = options
        .catalog
        .unwrap_or_else(|| shared_catalog().to_path_buf());
    settings.policies_dir = repo().join("policies");
    settings.data_dir = data_dir.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let doors = frostglass::startup::start(settings)
                .await
                .expect("the application starts");
            tx.send((doors.http.port(), doors.flight_port)).unwrap();
            let _ = doors.http.run_until_stopped().await;
        })
    });
    let (port, flight_port) = rx.recv().expect("the application reports its port");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .build()
        .into();
    TestApp {
        base: format!("http://127.0.0.1:{port}"),
        flight_port: flight_port.unwrap_or(0),
        data_dir,
        keys,
        grants,
        agent,
    }
}

impl TestApp {
    pub fn key(&self, principal: &str) -> &str {
        &self.keys[principal]
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&[u8]>,
        accept: Option<&str>,
    ) -> Response {
        let bearer = key.map(|k| format!("Bearer {k}"));
        let mut headers = Vec::new();
        if let Some(b) = &bearer {
            headers.push(("Authorization", b.as_str()));
        }
        if let Some(a) = accept {
            headers.push(("Accept", a));
        }
        self.send(method, path, &headers, body)
    }

    /// A request with exactly `headers` (a JSON body gets its content type).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        let url = format!("{}{path}", self.base);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let result = match body {
            Some(b) => {
                if !headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                {
                    builder = builder.header("Content-Type", "application/json");
                }
                self.agent.run(builder.body(b.to_vec()).unwrap())
            }
            None => self.agent.run(builder.body(()).unwrap()),
        };
        let mut response = result.expect("the server answers");
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_vec()
            .unwrap_or_default();
        Response {
            status,
            headers,
            bytes,
        }
    }

    /// The bodies of the ledger's query entries from index `from` on, as
    /// an auditor reads them.
    pub fn query_entries(&self, from: u64) -> Vec<Value> {
        let page = self
            .get(
                &format!("/v1/audit/entries?from={from}&limit=1000"),
                Some(self.key("auditor:cac")),
            )
            .json();
        page["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| serde_json::from_str::<Value>(e["body"].as_str().unwrap()).unwrap())
            .filter(|b| b["kind"] == "query")
            .collect()
    }

    pub fn get(&self, path: &str, key: Option<&str>) -> Response {
        self.request("GET", path, key, None, None)
    }

    pub fn query_as(&self, principal: &str, body: Value) -> Response {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.request(
            "POST",
            "/v1/queries",
            Some(self.key(principal)),
            Some(&bytes),
            None,
        )
    }

    /// A query with an explicit key and request body.
    pub fn ask(&self, key: &str, body: Value) -> Response {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.request("POST", "/v1/queries", Some(key), Some(&bytes), None)
    }

    /// A query by the default buyer, acme, whose grant covers every non-core dataset.
    pub fn query(&self, sql: &str) -> Response {
        self.query_as("buyer:acme", json!({ "sql": sql }))
    }

    /// Makes state changes as the CLI does: each with its ledger entry, in one transaction.
    pub fn admin(&self) -> Admin {
        Admin::open(&self.data_dir)
    }
}

/// State changes and ledger reads on a data directory, through the same
/// code as the CLI (`app::admin`), so every change has its ledger entry.
pub struct Admin {
    writer: std::cell::RefCell<Writer>,
    data_dir: PathBuf,
}

impl Admin {
    pub fn open(data_dir: &Path) -> Admin {
        Admin {
            writer: std::cell::RefCell::new(admin::open(data_dir).unwrap()),
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Adds a principal; returns its API key.
    pub fn add_principal(&self, p: &Principal) -> Result<String, LedgerError> {
        admin::add_principal(&mut self.writer.borrow_mut(), p)
    }

    /// Makes a grant; returns its id.
    pub fn add_grant(&self, g: &NewGrant) -> Result<String, LedgerError> {
        admin::add_grant(&mut self.writer.borrow_mut(), g).map(|g| g.id)
    }

    /// Ledger entries in index order: (index, body, leaf hash).
    pub fn entries(
        &self,
        from: u64,
        limit: u64,
    ) -> Result<Vec<(u64, String, String)>, LedgerError> {
        let conn = frostglass::ledger::open_connection(&self.data_dir)?;
        frostglass::ledger::tables::entries(&conn, from, limit)
    }
}

/// Runs `sql` on the raw data file of `dataset` (registered under its own
/// name): the ground truth tests compare releases with.
fn raw_batches(dataset: &str, sql: &str) -> Vec<datafusion::arrow::record_batch::RecordBatch> {
    use datafusion::prelude::*;
    let path = shared_catalog()
        .join("data")
        .join(format!("{dataset}.parquet"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = SessionContext::new();
        ctx.register_parquet(
            dataset,
            path.to_str().unwrap(),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap();
        ctx.sql(sql).await.unwrap().collect().await.unwrap()
    })
}

/// Reads one string or integer column of a demo data file, for tests that
/// must know the real values (to prove they never come out).
pub fn column_values(dataset: &str, column: &str) -> Vec<String> {
    first_column_strings(raw_batches(
        dataset,
        &format!("SELECT CAST({column} AS VARCHAR) FROM {dataset}"),
    ))
}

/// The first column of `batches`, as strings (nulls left out).
pub fn first_column_strings(
    batches: Vec<datafusion::arrow::record_batch::RecordBatch>,
) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let col = datafusion::arrow::compute::cast(
            b.column(0),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let arr = col
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .unwrap();
        out.extend(arr.iter().flatten().map(str::to_string));
    }
    out
}

/// Runs a query directly on the raw data file: the ground truth tests compare releases with.
pub fn truth(dataset: &str, sql: &str) -> Vec<Vec<Value>> {
    let rows = frostglass::release::encode::JsonRows(&raw_batches(dataset, sql));
    serde_json::from_value(serde_json::to_value(rows).unwrap()).unwrap()
}

/// The real binary serving a data directory, its output captured to a file; killed on drop.
pub struct Server {
    pub base: String,
    child: std::process::Child,
}

impl Server {
    pub fn start(data_dir: &Path, log: &Path, env: &[(&str, &str)]) -> Server {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_frostglass"));
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--flight-listen", "127.0.0.1:0"])
            .args(["--catalog", shared_catalog().to_str().unwrap()])
            .args(["--policies", repo().join("policies").to_str().unwrap()])
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .stdout(std::process::Stdio::from(log.try_clone().unwrap()))
            .stderr(std::process::Stdio::from(log));
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().unwrap();
        let server = Server {
            base: format!("http://127.0.0.1:{port}"),
            child,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        for _ in 0..300 {
            if agent.get(format!("{}/healthz", server.base)).call().is_ok() {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the server did not start");
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the frostglass binary with arguments; returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_frostglass"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
