//! Typed configuration: defaults, overridden by an optional JSON file
//! (`--config`), overridden by command-line flags.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub listen: String,
    pub catalog_dir: PathBuf,
    pub policies_dir: PathBuf,
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub tls: Option<TlsSettings>,
    /// Serve plain HTTP on an address other than loopback (behind a TLS proxy, say).
    pub allow_plain_http: bool,
    /// Answer releases from the per-unit summaries taken at registration
    /// where they cover the query (same answers, far fewer rows read).
    pub unit_summaries: bool,
    /// The least time between two signed ledger checkpoints while appends
    /// keep coming; an answer waits at most this long for the checkpoint
    /// that covers it (0: a checkpoint per commit).
    pub checkpoint_interval_ms: u64,
    /// Each owner organisation's domain root: the folder its datasets'
    /// data must lie in to be registered over HTTP. An organisation not
    /// listed gets `<data_dir>/owners/<org>`.
    pub owner_roots: BTreeMap<String, String>,
    /// Each buyer organisation's weight in sharing the query slots (1 when
    /// not listed): while principals wait, a slot goes to the one with the
    /// fewest queries running per unit of its organisation's weight.
    pub slot_weights: BTreeMap<String, u32>,
    pub console: ConsoleSettings,
    /// Where Arrow Flight SQL listens (same TLS as HTTPS); none: off.
    pub flight_listen: Option<String>,
    /// Where release jobs over protected rows run.
    pub execution: Execution,
}

/// Where the release aggregates run: in this process (default) or on an
/// Apache DataFusion Ballista cluster (a build with the `ballista` feature).
/// Everything else — gate, suppression, noise, the query above the release,
/// metering and the ledger — stays in the sandbox either way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum Execution {
    #[default]
    Local,
    Ballista {
        /// The scheduler, `df://host:port`: on the sandbox's private network only.
        scheduler: String,
    },
}

/// The web console's sign-in sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// A session ends after this long without a request.
    pub session_idle_s: u64,
    /// A session ends this long after sign-in, however busy.
    pub session_max_s: u64,
    /// Most sessions open at once, all principals together.
    pub max_sessions: usize,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            session_idle_s: 30 * 60,
            session_max_s: 8 * 60 * 60,
            max_sessions: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA of client certificates: when set, clients may present one, and
    /// principals bound to a certificate must.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// Limits that protect the server from any single request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest manifest an owner may register (public domains of 10,000
    /// values make manifests larger than other requests).
    pub max_manifest_bytes: usize,
    /// Longest accepted SQL text, in bytes.
    pub max_sql_bytes: usize,
    /// Most SQL tokens; bounds expression size and depth before planning.
    pub max_sql_tokens: usize,
    /// Deepest parenthesised nesting the parser accepts.
    pub max_parser_depth: usize,
    /// Wall-clock limit for one query, in milliseconds.
    pub query_timeout_ms: u64,
    /// Memory pool of one query, in bytes; spilling is off.
    pub query_memory_bytes: usize,
    /// Most rows one query may scan (known from table statistics before it runs).
    pub max_rows_scanned: u64,
    /// Most rows in one answer.
    pub max_result_rows: usize,
    /// Queries executing at once; more wait for a slot.
    pub max_concurrent_queries: usize,
    /// Requests per second one principal may make, sustained, and in a burst.
    pub requests_per_second: f64,
    pub request_burst: f64,
    /// Queries one principal may have running at once.
    pub max_concurrent_queries_per_principal: usize,
    /// How long a query waits for a free slot before the answer is 503.
    pub queue_wait_ms: u64,
    /// Open connections the server accepts at once.
    pub max_connections: usize,
    /// Time a client has to send its request head (slow clients are cut off).
    pub client_request_timeout_ms: u64,
    pub keep_alive_s: u64,
    /// Lifetime epsilon of a grant made without `--epsilon`.
    pub default_grant_epsilon: f64,
    /// Lifetime epsilon of a DP dataset whose manifest sets no `epsilon_total`.
    pub default_dataset_epsilon: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 256 * 1024,
            max_manifest_bytes: 4 * 1024 * 1024,
            max_sql_bytes: 64 * 1024,
            max_sql_tokens: 4_000,
            max_parser_depth: 50,
            query_timeout_ms: 30_000,
            query_memory_bytes: 512 * 1024 * 1024,
            max_rows_scanned: 200_000_000,
            max_result_rows: 10_000,
            max_concurrent_queries: 4,
            requests_per_second: 50.0,
            request_burst: 200.0,
            max_concurrent_queries_per_principal: 8,
            queue_wait_ms: 10_000,
            max_connections: 1024,
            client_request_timeout_ms: 5_000,
            keep_alive_s: 30,
            default_grant_epsilon: 10.0,
            default_dataset_epsilon: 100.0,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8080".into(),
            catalog_dir: "catalog".into(),
            policies_dir: "policies".into(),
            data_dir: "data".into(),
            limits: Limits::default(),
            tls: None,
            allow_plain_http: false,
            unit_summaries: true,
            checkpoint_interval_ms: 2,
            owner_roots: BTreeMap::new(),
            slot_weights: BTreeMap::new(),
            console: ConsoleSettings::default(),
            flight_listen: Some("127.0.0.1:50051".into()),
            execution: Execution::Local,
        }
    }
}

impl Settings {
    pub fn load(file: Option<&Path>) -> Result<Settings, String> {
        match file {
            None => Ok(Settings::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
                serde_json::from_str(&text)
                    .map_err(|e| format!("invalid config {}: {e}", path.display()))
            }
        }
    }
}
