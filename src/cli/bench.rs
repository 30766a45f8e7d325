//! `frostglass bench`: the sandbox measured against plain DataFusion on the
//! same Parquet files and the same queries, side by side in one run, in four
//! modes — (a) plain DataFusion, (b) the sandbox pipeline in-process with
//! threshold release, (c) with differential privacy, (d) end to end over HTTP
//! with the durable ledger; and, to show what the registration-time unit
//! summaries buy, (c) again with them switched off — plus policy-check latency, an HTTP load test and
//! peak memory (the server runs as its own process, so its figure is its own). Prints a table and writes JSON.

use frostglass::app::{Sandbox, admin};
use frostglass::config::Settings;
use frostglass::ledger::Writer;
use frostglass::pipeline::{self, Request};
use frostglass::store::{NewGrant, Principal, Role};
use serde::Serialize;
use serde_json::{Value, json};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Options {
    pub catalog: PathBuf,
    pub policies: PathBuf,
    pub scale: f64,
    pub runs: usize,
    pub work_dir: PathBuf,
    pub out: PathBuf,
    pub http_clients: usize,
    pub http_seconds: u64,
    /// Stop after the suite: no policy latency, no load test.
    pub suite_only: bool,
    /// Run only the suite query of this name.
    pub only: Option<String>,
    /// Time only this mode of the suite (the others are skipped), so that a
    /// profile shows one mode's work.
    pub mode: Option<String>,
}

pub(super) const SUITE: [(&str, &str); 5] = [
    (
        "grouped_count",
        "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district",
    ),
    (
        "sum_avg_two_keys",
        "SELECT district, gender, SUM(cost) AS total, AVG(cost) AS mean FROM city_health GROUP BY district, gender",
    ),
    (
        "join_on_person",
        "SELECT c.district, COUNT(DISTINCT c.person_id) AS persons, AVG(t.calls) AS calls \
         FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY c.district",
    ),
    (
        "selective_filter",
        "SELECT district, COUNT(*) AS n FROM city_health WHERE age > 85 GROUP BY district",
    ),
    (
        "high_cardinality",
        "SELECT district, age, visit_date, COUNT(*) AS n FROM city_health GROUP BY district, age, visit_date",
    ),
];

/// Per suite query, the inherent work of its DP release from rows, on
/// plain DataFusion: one aggregation keyed by (privacy unit, group).
const FLOORS: [&str; 5] = [
    "SELECT person_id, district, COUNT(*) FROM city_health GROUP BY person_id, district",
    "SELECT person_id, district, gender, SUM(cost), COUNT(cost) FROM city_health GROUP BY person_id, district, gender",
    "SELECT c.person_id, c.district, SUM(t.calls), COUNT(t.calls) \
     FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY c.person_id, c.district",
    "SELECT person_id, district, COUNT(*) FROM city_health WHERE age > 85 GROUP BY person_id, district",
    "SELECT person_id, district, age, visit_date, COUNT(*) FROM city_health GROUP BY person_id, district, age, visit_date",
];

pub(super) const SMALL_QUERY: &str =
    "SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry";

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// Median, min and max; NaN for a mode that refused the query.
pub(super) fn timing(mut samples: Vec<f64>) -> Timing {
    samples.sort_by(|a, b| a.total_cmp(b));
    Timing {
        median_ms: percentile(&samples, 0.5),
        min_ms: samples.first().copied().unwrap_or(f64::NAN),
        max_ms: samples.last().copied().unwrap_or(f64::NAN),
    }
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Peak resident memory of a process (`self` or a pid), from /proc.
fn peak_rss_mb(process: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time (user and system, ms) a process (`self` or a pid) has used,
/// from /proc, whose clock ticks are always 1/100 s on Linux.
pub(super) fn cpu_ms(process: &str) -> Option<f64> {
    cpu_ms_in(&std::fs::read_to_string(format!("/proc/{process}/stat")).ok()?)
}

/// CPU time (ms) in the text of a `/proc/…/stat`.
fn cpu_ms_in(stat: &str) -> Option<f64> {
    // The command name may hold spaces: count fields after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) * 10.0)
}

/// CPU per answer: steadier than answers per second on a shared machine
/// (the rate moves with whatever else runs; the work per answer does not).
fn per_answer(before: Option<f64>, after: Option<f64>, answers: usize) -> Option<f64> {
    Some((after? - before?) / answers.max(1) as f64)
}

/// A catalog of the demo manifests over data at the given scale; without DP when `dp` is false.
pub(super) fn prepare_catalog(options: &Options, data: &Path, dp: bool) -> Result<PathBuf, String> {
    let dir = options.work_dir.join(if dp {
        "catalog-dp"
    } else {
        "catalog-threshold"
    });
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for path in frostglass::catalog::manifest_files(&options.catalog).map_err(|e| e.to_string())? {
        let mut m: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        let file = Path::new(m["source"]["location"].as_str().unwrap_or(""))
            .file_name()
            .map(PathBuf::from);
        if let Some(file) = file {
            m["source"]["location"] = json!(data.join(file).to_string_lossy());
        }
        if let Some(release) = m.get_mut("release").and_then(|r| r.as_object_mut()) {
            // The suite's high-cardinality query must run to show what
            // suppression costs, not stop at the demo's cap on groups.
            release.insert("max_groups".into(), json!(10_000_000));
            match release.get_mut("dp") {
                Some(dp_rules) if dp => dp_rules["epsilon_total"] = json!(1e12),
                Some(_) => {
                    release.remove("dp");
                }
                None => {}
            }
        }
        let name = path.file_name().ok_or("manifest without a name")?;
        std::fs::write(dir.join(name), m.to_string()).map_err(|e| e.to_string())?;
    }
    Ok(dir)
}

pub(super) fn ensure_data(options: &Options) -> Result<PathBuf, String> {
    let data = options
        .work_dir
        .join(format!("data-scale-{}", options.scale));
    let marker = data.join(".complete");
    if marker.exists() {
        return Ok(data);
    }
    let schemas = frostglass::validate::Schemas::compiled();
    let manifests = frostglass::catalog::read_manifests(&options.catalog, &schemas)
        .map_err(|e| e.to_string())?;
    let targets: Vec<(String, PathBuf)> =
        frostglass::demo::demo_targets(&options.catalog, &manifests)
            .into_iter()
            .filter_map(|(id, path)| Some((id, data.join(path.file_name()?))))
            .collect();
    eprintln!(
        "generating demo data at scale {} in {}",
        options.scale,
        data.display()
    );
    frostglass::demo::generate(&targets, options.scale, |l| eprintln!("{l}"))?;
    std::fs::write(&marker, "").map_err(|e| e.to_string())?;
    Ok(data)
}

pub(super) fn settings(options: &Options, catalog: PathBuf, name: &str) -> Settings {
    let mut s = Settings {
        flight_listen: Some("127.0.0.1:0".into()),
        catalog_dir: catalog,
        policies_dir: options.policies.clone(),
        data_dir: options
            .work_dir
            .join(format!("state-{name}-{}", std::process::id())),
        ..Settings::default()
    };
    s.limits.query_timeout_ms = 600_000;
    s.limits.max_rows_scanned = u64::MAX;
    s.limits.max_result_rows = 1_000_000;
    s.limits.query_memory_bytes = 4 << 30;
    s.limits.default_grant_epsilon = 1e12;
    // The load test measures the server, not the per-principal limits.
    s.limits.requests_per_second = 1e9;
    s.limits.request_burst = 1e9;
    s.limits.max_concurrent_queries_per_principal = 1024;
    s
}

/// Small queries from `clients` threads for `seconds`: sorted latencies
/// (ms) and the number of errors.
pub(super) fn load(
    clients: usize,
    seconds: u64,
    one: &(dyn Fn() -> Result<Duration, String> + Sync),
) -> (Vec<f64>, usize) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let results: Vec<(Vec<f64>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(move || {
                    let (mut lat, mut errors) = (Vec::new(), 0);
                    while Instant::now() < deadline {
                        match one() {
                            Ok(d) => lat.push(ms(d)),
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut latencies: Vec<f64> = results
        .iter()
        .flat_map(|(l, _)| l.iter().copied())
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    (latencies, results.iter().map(|(_, e)| e).sum())
}

/// The server under test: `frostglass serve` in its own process (its own
/// memory, allocator and threads, logging as in production), stopped on drop.
pub(super) struct Server {
    child: std::process::Child,
    pub(super) base: String,
}

impl Server {
    pub(super) fn start(mut settings: Settings) -> Result<Server, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        settings.listen = format!("127.0.0.1:{port}");
        let config = settings.data_dir.join("bench-config.json");
        let text = serde_json::to_string_pretty(&settings).map_err(|e| e.to_string())?;
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let log_path = settings.data_dir.join("server.log");
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        // Another build may serve (`FROSTGLASS_BENCH_SERVER`), so that two
        // builds of the server meet the same load generator side by side.
        let exe = match std::env::var_os("FROSTGLASS_BENCH_SERVER") {
            Some(other) => std::path::PathBuf::from(other),
            None => std::env::current_exe().map_err(|e| e.to_string())?,
        };
        let child = std::process::Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?;
        let mut server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        // Registration scans every dataset (and builds unit summaries) before
        // the server listens: minutes at the largest scales.
        let deadline = Instant::now() + Duration::from_secs(1800);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "the server exited ({status}); see {}",
                    log_path.display()
                ));
            }
            if ureq::get(format!("{}/healthz", server.base)).call().is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = server.child.kill();
        Err(format!(
            "the server did not start; see {}",
            log_path.display()
        ))
    }

    fn peak_rss_mb(&self) -> Option<f64> {
        peak_rss_mb(&self.child.id().to_string())
    }

    pub(super) fn cpu_ms(&self) -> Option<f64> {
        cpu_ms(&self.child.id().to_string())
    }

    /// CPU time (ms) the server's threads have used, by thread family
    /// (`fg-query`, `fg-pipeline`, `actix-rt`…): where its time goes.
    pub(super) fn cpu_ms_by_thread(&self) -> BTreeMap<String, f64> {
        let mut by_family = BTreeMap::new();
        let tasks = format!("/proc/{}/task", self.child.id());
        let Ok(threads) = std::fs::read_dir(&tasks) else {
            return by_family;
        };
        for thread in threads.flatten() {
            let Ok(stat) = std::fs::read_to_string(thread.path().join("stat")) else {
                continue;
            };
            let name = stat
                .split_once('(')
                .and_then(|(_, rest)| rest.rsplit_once(')'))
                .map_or("", |(name, _)| name);
            let family = name.split(['|', ':']).next().unwrap_or(name).to_string();
            if let Some(ms) = cpu_ms_in(&stat) {
                *by_family.entry(family).or_insert(0.0) += ms;
            }
        }
        by_family
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sandbox under test and the admin handle that makes its principals and grants.
pub(super) struct Subject {
    pub(super) sandbox: Arc<Sandbox>,
    pub(super) admin: RefCell<Writer>,
}

impl Subject {
    pub(super) fn open(
        rt: &tokio::runtime::Runtime,
        settings: Settings,
    ) -> Result<Subject, String> {
        let admin = admin::open(&settings.data_dir).map_err(|e| e.to_string())?;
        let sandbox = rt
            .block_on(Sandbox::open(settings))
            .map_err(|e| e.to_string())?;
        Ok(Subject {
            sandbox: Arc::new(sandbox),
            admin: RefCell::new(admin),
        })
    }
}

pub(super) fn buyer(admin: &RefCell<Writer>) -> Result<(Principal, String), String> {
    let p = Principal {
        id: "buyer:bench".into(),
        role: Role::Buyer,
        org: Some("bench".into()),
        region: "CN".into(),
    };
    let key = admin::add_principal(&mut admin.borrow_mut(), &p).map_err(|e| e.to_string())?;
    Ok((p, key))
}

pub(super) fn grant(admin: &RefCell<Writer>) -> Result<String, String> {
    let grant = NewGrant {
        buyer: "buyer:bench".into(),
        datasets: vec![
            "city_health".into(),
            "telecom_usage".into(),
            "enterprise_registry".into(),
            "power_grid".into(),
        ],
        purpose: "public_health_research".into(),
        epsilon: Some(1e12),
        ..NewGrant::default()
    };
    admin::add_grant(&mut admin.borrow_mut(), &grant)
        .map(|g| g.id)
        .map_err(|e| e.to_string())
}

/// Runs one query through the pipeline under a fresh grant (so DP answers are computed, not served from the cache).
pub(super) fn sandbox_query(
    rt: &tokio::runtime::Runtime,
    subject: &Subject,
    principal: &Principal,
    sql: &str,
    dry_run: bool,
) -> Result<Duration, String> {
    let grant = grant(&subject.admin)?;
    let request = Request {
        sql: sql.into(),
        grant: Some(grant),
        purpose: None,
        dry_run,
        run_ahead: false,
        dp: Default::default(),
    };
    let started = Instant::now();
    let handle = subject.sandbox.runtime.spawn(pipeline::run(
        subject.sandbox.clone(),
        principal.clone(),
        request,
        std::future::pending(),
    ));
    rt.block_on(handle)
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{sql}: {e}"))?;
    Ok(started.elapsed())
}

pub fn run(options: Options) -> Result<(), String> {
    let data = ensure_data(&options)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let threshold_catalog = prepare_catalog(&options, &data, false)?;
    let dp_catalog = prepare_catalog(&options, &data, true)?;
    let threshold = Subject::open(&rt, settings(&options, threshold_catalog, "threshold"))?;
    let dp = Subject::open(&rt, settings(&options, dp_catalog.clone(), "dp"))?;
    // The same DP release with the unit summaries off: what they buy.
    let mut rows_settings = settings(&options, dp_catalog.clone(), "dp-rows");
    rows_settings.unit_summaries = false;
    let dp_rows = Subject::open(&rt, rows_settings)?;
    let (principal, _) = buyer(&threshold.admin)?;
    buyer(&dp.admin)?;
    buyer(&dp_rows.admin)?;

    // The HTTP server: DP release, durable ledger, its own state.
    let http_settings = settings(&options, dp_catalog, "http");
    let store = RefCell::new(admin::open(&http_settings.data_dir).map_err(|e| e.to_string())?);
    let (_, key) = buyer(&store)?;
    let mut http_settings = http_settings;
    http_settings.limits.max_concurrent_queries = 8;
    let server = Server::start(http_settings)?;
    let base = server.base.clone();
    // Every client keeps its connection open (ureq keeps only 3 idle per
    // host by default: the other clients reconnected for every query).
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_idle_connections(options.http_clients.max(1) * 2)
        .max_idle_connections_per_host(options.http_clients.max(1) * 2)
        .build()
        .into();
    let http_query = |sql: &str, grant: &str| -> Result<Duration, String> {
        let started = Instant::now();
        let mut resp = agent
            .post(format!("{base}/v1/queries"))
            .header("Authorization", &format!("Bearer {key}"))
            .send_json(json!({ "sql": sql, "grant": grant }))
            .map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        if resp.status() != 200 {
            return Err(format!(
                "HTTP {}: {}",
                resp.status(),
                resp.body_mut().read_to_string().unwrap_or_default()
            ));
        }
        Ok(elapsed)
    };

    let plain = datafusion::prelude::SessionContext::new();
    for name in ["city_health", "telecom_usage", "enterprise_registry"] {
        let path = data.join(format!("{name}.parquet"));
        rt.block_on(plain.register_parquet(
            name,
            path.to_string_lossy().as_ref(),
            Default::default(),
        ))
        .map_err(|e| e.to_string())?;
    }

    let mut rows = Vec::new();
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>7} {:>6}",
        "query",
        "plain ms",
        "floor ms",
        "thresh ms",
        "dp ms",
        "dp-rows",
        "http ms",
        "b/a",
        "c/a",
        "rows/a",
        "rows/fl",
        "d/a"
    );
    for ((name, sql), floor) in SUITE.into_iter().zip(FLOORS) {
        if options.only.as_ref().is_some_and(|only| only != name) {
            continue;
        }
        let mut samples: [Vec<f64>; 6] = Default::default();
        // One warm-up of each mode, then the modes interleaved run by run, so
        // that they share the machine's state as evenly as possible.
        let mut refused = None;
        let wants = |mode: &str| options.mode.as_deref().is_none_or(|m| m == mode);
        let plain_time = |sql: &str| -> Result<Duration, String> {
            let started = Instant::now();
            rt.block_on(async { plain.sql(sql).await?.collect().await })
                .map_err(|e| e.to_string())?;
            Ok(started.elapsed())
        };
        let measured = (0..=options.runs).try_for_each(|run| -> Result<(), String> {
            let a = wants("plain").then(|| plain_time(sql)).transpose()?;
            let f = wants("floor").then(|| plain_time(floor)).transpose()?;
            // A released answer is reused for the same plan by the same
            // organisation: each run asks a plan of its own (a subquery
            // alias, removed by the optimizer) so that it is computed.
            let fresh = format!("SELECT * FROM ({sql}) AS run_{run}");
            // The threshold sandbox refuses exact releases of sensitive
            // measures (the privacy rules); the other modes still run.
            let b = match wants("threshold")
                .then(|| sandbox_query(&rt, &threshold, &principal, &fresh, false))
            {
                Some(Err(e)) => {
                    refused = Some(e);
                    None
                }
                other => other.and_then(Result::ok),
            };
            let c = wants("dp")
                .then(|| sandbox_query(&rt, &dp, &principal, &fresh, false))
                .transpose()?;
            let r = wants("dp-rows")
                .then(|| sandbox_query(&rt, &dp_rows, &principal, &fresh, false))
                .transpose()?;
            let d = wants("http")
                .then(|| http_query(&fresh, &grant(&store)?))
                .transpose()?;
            if run > 0 {
                for (s, t) in samples.iter_mut().zip([a, b, c, r, d, f]) {
                    s.extend(t.map(ms));
                }
            }
            Ok(())
        });
        if let Some(e) = &refused {
            println!("{name:<18} threshold mode refused it: {e}");
        }
        if let Err(e) = measured {
            println!("{name:<18} failed: {e}");
            rows.push(json!({ "query": name, "sql": sql, "error": e }));
            continue;
        }
        let [a, b, c, r, d, f] = samples.map(timing);
        println!(
            "{:<18} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6.2} {:>6.2} {:>6.2} {:>7.2} {:>6.2}",
            name,
            a.median_ms,
            f.median_ms,
            b.median_ms,
            c.median_ms,
            r.median_ms,
            d.median_ms,
            b.median_ms / a.median_ms,
            c.median_ms / a.median_ms,
            r.median_ms / a.median_ms,
            r.median_ms / f.median_ms,
            d.median_ms / a.median_ms
        );
        rows.push(json!({
            "query": name, "sql": sql, "plain": a, "threshold": b, "dp": c, "dp_rows": r, "http": d,
            "floor_sql": floor, "floor": f,
            "ratio_threshold": b.median_ms / a.median_ms, "ratio_dp": c.median_ms / a.median_ms,
            "ratio_dp_rows": r.median_ms / a.median_ms, "ratio_dp_rows_to_floor": r.median_ms / f.median_ms,
            "ratio_http": d.median_ms / a.median_ms,
        }));
    }
    let median_ratio = |key: &str| {
        let mut r: Vec<f64> = rows.iter().filter_map(|row| row[key].as_f64()).collect();
        r.sort_by(|a, b| a.total_cmp(b));
        percentile(&r, 0.5)
    };
    println!(
        "median ratio over the suite: threshold {:.2}x, dp {:.2}x (from rows {:.2}x; to the floor {:.2}x), http {:.2}x",
        median_ratio("ratio_threshold"),
        median_ratio("ratio_dp"),
        median_ratio("ratio_dp_rows"),
        median_ratio("ratio_dp_rows_to_floor"),
        median_ratio("ratio_http")
    );
    if options.suite_only {
        return write_report(
            &options.out,
            &json!({ "scale": options.scale, "runs": options.runs, "suite": rows }),
        );
    }

    // Policy check and rewrite alone: a dry run is parse → plan → check → rewrite.
    let mut policy = Vec::new();
    for (name, sql) in SUITE {
        let mut samples = Vec::new();
        for _ in 0..200 {
            samples.push(ms(sandbox_query(&rt, &dp, &principal, sql, true)?));
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
        println!("policy check + rewrite {name:<18} median {p50:.2} ms, p99 {p99:.2} ms");
        policy.push(json!({ "query": name, "median_ms": p50, "p99_ms": p99 }));
    }

    // The engine's own ceiling for the load query: plain DataFusion, one at a
    // time, with every core to itself, no HTTP and no ledger.
    let mut plain_small = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        rt.block_on(async { plain.sql(SMALL_QUERY).await?.collect().await })
            .map_err(|e| e.to_string())?;
        plain_small.push(ms(started.elapsed()));
    }
    plain_small.sort_by(|a, b| a.total_cmp(b));
    let plain_small_ms = percentile(&plain_small, 0.5);
    // And its throughput: plain DataFusion answering it to as many
    // concurrent clients as the HTTP load test has, for as long.
    let plain_cpu_before = cpu_ms("self");
    let (plain_answers, _) = load(options.http_clients, options.http_seconds, &|| {
        let started = Instant::now();
        rt.block_on(async { plain.sql(SMALL_QUERY).await?.collect().await })
            .map(|_| started.elapsed())
            .map_err(|e| e.to_string())
    });
    let ceiling = plain_answers.len() as f64 / options.http_seconds as f64;
    let plain_cpu = per_answer(plain_cpu_before, cpu_ms("self"), plain_answers.len());

    // Many small aggregate queries from concurrent clients, each answer durably logged.
    let small_grant = grant(&store)?;
    let (server_before, client_before) = (server.cpu_ms(), cpu_ms("self"));
    let (latencies, errors) = load(options.http_clients, options.http_seconds, &|| {
        http_query(SMALL_QUERY, &small_grant)
    });
    let server_cpu = per_answer(server_before, server.cpu_ms(), latencies.len());
    let client_cpu = per_answer(client_before, cpu_ms("self"), latencies.len());
    let qps = latencies.len() as f64 / options.http_seconds as f64;
    let load = json!({
        "clients": options.http_clients, "seconds": options.http_seconds, "answered": latencies.len(), "errors": errors,
        "queries_per_second": qps, "p50_ms": percentile(&latencies, 0.5), "p99_ms": percentile(&latencies, 0.99),
        "sql": SMALL_QUERY, "plain_datafusion_ms": plain_small_ms,
        "plain_datafusion_queries_per_second": ceiling, "of_ceiling": qps / ceiling,
        "cpu_ms_per_answer": { "plain_datafusion": plain_cpu, "server": server_cpu, "load_generator": client_cpu },
    });
    println!(
        "HTTP load: {} clients, {:.0} queries/s, p50 {:.1} ms, p99 {:.1} ms, {} errors \
         (the same query on plain DataFusion: {:.2} ms alone, {:.0} queries/s from as many \
         clients; HTTP reaches {:.0}% of that)",
        options.http_clients,
        qps,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        errors,
        plain_small_ms,
        ceiling,
        100.0 * qps / ceiling
    );
    if let (Some(plain), Some(server), Some(client)) = (plain_cpu, server_cpu, client_cpu) {
        println!(
            "CPU per answer: plain DataFusion {plain:.2} ms; the server {server:.2} ms \
             ({:.0}% of plain's), its load generator {client:.2} ms more",
            100.0 * server / plain
        );
    }
    let server_rss = server.peak_rss_mb();
    let bench_rss = peak_rss_mb("self");
    println!(
        "peak RSS: server {:.0} MiB (its own process: the suite over HTTP and the load test); \
         bench process {:.0} MiB (plain DataFusion and three in-process sandboxes)",
        server_rss.unwrap_or(f64::NAN),
        bench_rss.unwrap_or(f64::NAN)
    );

    let report = json!({
        "scale": options.scale,
        "runs": options.runs,
        "machine": { "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()) },
        "suite": rows,
        "median_ratio": { "threshold": median_ratio("ratio_threshold"), "dp": median_ratio("ratio_dp"), "dp_rows": median_ratio("ratio_dp_rows"), "http": median_ratio("ratio_http") },
        "policy_check": policy,
        "http_load": load,
        "peak_rss_mib": { "server": server_rss, "bench_process": bench_rss },
    });
    write_report(&options.out, &report)
}

/// Writes a bench's JSON report where `--out` says.
pub(super) fn write_report(out: &Path, report: &Value) -> Result<(), String> {
    std::fs::write(
        out,
        serde_json::to_string_pretty(report).unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    println!("wrote {}", out.display());
    Ok(())
}
