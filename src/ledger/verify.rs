//! `frostglass verify`: checks a ledger without trusting whoever serves it.
//! Recomputes every leaf and the tree, checks every signed head against a
//! pinned public key, checks that the log only grew since the last head this
//! verifier saw (kept in a state file), and checks receipts.

use crate::ledger::archive::ArchivedBodies;
use crate::ledger::event::Entry;
use crate::ledger::merkle::{self, Hash};
use crate::ledger::tables;
use crate::ledger::usage::{UsageRecord, UsageRollup};
use crate::ledger::{Receipt, SignedHead, key_id};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the ledger comes from.
pub enum Source {
    Local(PathBuf),
    /// A running server; `ca` is a PEM file of the CA to trust for its
    /// certificate (public CAs when absent).
    Remote {
        url: String,
        key: String,
        ca: Option<PathBuf>,
    },
}

pub struct Options {
    pub source: Source,
    pub public_key: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub receipt: Option<PathBuf>,
}

/// What a verifier remembers between runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub public_key: String,
    pub head: SignedHead,
}

/// A broken ledger: the first index found broken, and why.
#[derive(Debug)]
pub struct Failure {
    pub index: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "broken at index {i}: {}", self.reason),
            None => write!(f, "{}", self.reason),
        }
    }
}

fn fail(index: Option<u64>, reason: impl Into<String>) -> Failure {
    Failure {
        index,
        reason: reason.into(),
    }
}

/// What was read, from either source: the leaf of every entry (recomputed
/// from its body as the entries stream past; bodies are not kept).
struct Ledger {
    leaves: Vec<Hash>,
    heads: Vec<SignedHead>,
    public_key: Vec<u8>,
    remote: Option<Remote>,
    /// Locally: what the entries add up to, for the roll-ups (checked after
    /// the tree, whose findings say more).
    recount: Option<Recount>,
}

/// Entries must come contiguous, each matching its stored leaf hash; progress
/// goes to stderr every million entries.
#[derive(Default)]
struct Leaves {
    leaves: Vec<Hash>,
    started: Option<std::time::Instant>,
}

const PROGRESS_EVERY: usize = 1_000_000;

impl Leaves {
    fn push(&mut self, index: u64, body: &str, stored: Option<&str>) -> Result<(), Failure> {
        let started = *self.started.get_or_insert_with(std::time::Instant::now);
        let expected = self.leaves.len() as u64;
        if index != expected {
            return Err(fail(Some(expected), format!("entry {expected} is missing")));
        }
        let leaf = merkle::leaf_hash(body.as_bytes());
        if let Some(stored) = stored
            && decode_hash(stored) != Some(leaf)
        {
            return Err(fail(Some(index), "the entry does not match its leaf hash"));
        }
        self.leaves.push(leaf);
        if self.leaves.len().is_multiple_of(PROGRESS_EVERY) {
            let rate = self.leaves.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprintln!("verify: {} entries read ({rate:.0}/s)", self.leaves.len());
        }
        Ok(())
    }
}

struct Remote {
    agent: ureq::Agent,
    url: String,
    key: String,
}

impl Remote {
    fn get(&self, path: &str) -> Result<serde_json::Value, Failure> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.key))
            .call()
            .map_err(|e| fail(None, format!("GET {path}: {e}")))?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp
            .body_mut()
            .read_json()
            .map_err(|e| fail(None, format!("GET {path}: {e}")))?;
        if status != 200 {
            return Err(fail(None, format!("GET {path}: HTTP {status}: {body}")));
        }
        Ok(body)
    }
}

fn decode_hash(s: &str) -> Option<Hash> {
    hex::decode(s).ok()?.try_into().ok()
}

fn read_public_key(path: &Path) -> Result<Vec<u8>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(None, format!("cannot read {}: {e}", path.display())))?;
    hex::decode(text.trim())
        .map_err(|_| fail(None, format!("{} is not a hex public key", path.display())))
}

fn load_local(dir: &Path, public_key: Option<&Path>) -> Result<Ledger, Failure> {
    let db = dir.join("frostglass.db");
    if !db.exists() {
        return Err(fail(None, format!("no ledger at {}", db.display())));
    }
    let (leaves, recount) = scan_entries(&db)?;
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| fail(None, e.to_string()))?;
    let heads = crate::ledger::heads(&conn).map_err(|e| fail(None, e.to_string()))?;
    let key_path = public_key
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("ledger-ed25519.pub"));
    Ok(Ledger {
        leaves,
        heads,
        public_key: read_public_key(&key_path)?,
        remote: None,
        recount: Some(recount),
    })
}

fn load_remote(
    url: &str,
    key: &str,
    ca: Option<&Path>,
    public_key: Option<&Path>,
) -> Result<Ledger, Failure> {
    let mut config = ureq::Agent::config_builder().http_status_as_error(false);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca)
            .map_err(|e| fail(None, format!("cannot read {}: {e}", ca.display())))?;
        let roots = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect::<Vec<_>>();
        if roots.is_empty() {
            return Err(fail(None, format!("{} holds no certificate", ca.display())));
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)))
            .build();
        config = config.tls_config(tls);
    }
    let agent: ureq::Agent = config.build().into();
    let remote = Remote {
        agent,
        url: url.to_string(),
        key: key.to_string(),
    };
    let head: SignedHead = serde_json::from_value(remote.get("/v1/audit/head")?)
        .map_err(|e| fail(None, e.to_string()))?;
    let served_key = remote.get("/v1/audit/public-key")?;
    let served_key = hex::decode(served_key["public_key"].as_str().unwrap_or(""))
        .map_err(|_| fail(None, "the served public key is not hex"))?;
    let public_key = match public_key {
        Some(p) => read_public_key(p)?,
        None => served_key,
    };
    let mut leaves = Leaves::default();
    let mut from = 0u64;
    while from < head.tree_size {
        let page = remote.get(&format!("/v1/audit/entries?from={from}&limit=1000"))?;
        let items = page["entries"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            break;
        }
        for item in items {
            let index = item["index"]
                .as_u64()
                .ok_or_else(|| fail(None, "entry without index"))?;
            if index >= head.tree_size {
                break;
            }
            let body = item["body"]
                .as_str()
                .ok_or_else(|| fail(Some(index), "entry without body"))?;
            leaves.push(index, body, item["leaf_hash"].as_str())?;
        }
        from = leaves.leaves.len() as u64;
    }
    Ok(Ledger {
        leaves: leaves.leaves,
        heads: vec![head],
        public_key,
        remote: Some(remote),
        recount: None,
    })
}

/// Verifies; on success returns a one-line summary.
pub fn run(options: &Options) -> Result<String, Failure> {
    let started = std::time::Instant::now();
    let mut ledger = match &options.source {
        Source::Local(dir) => load_local(dir, options.public_key.as_deref())?,
        Source::Remote { url, key, ca } => {
            load_remote(url, key, ca.as_deref(), options.public_key.as_deref())?
        }
    };
    let previous: Option<State> = match &options.state {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| fail(None, format!("cannot read state: {e}")))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| fail(None, format!("invalid state file: {e}")))?,
            )
        }
        _ => None,
    };
    let public_key = match &previous {
        Some(state) => {
            let pinned = hex::decode(&state.public_key)
                .map_err(|_| fail(None, "state file key is not hex"))?;
            if pinned != ledger.public_key {
                return Err(fail(
                    None,
                    format!(
                        "the ledger's signing key changed (pinned {}, now {}): history may have been rewritten",
                        key_id(&pinned),
                        key_id(&ledger.public_key)
                    ),
                ));
            }
            pinned
        }
        None => ledger.public_key.clone(),
    };

    let leaves = &ledger.leaves;
    let n = leaves.len() as u64;

    // Every signed head: signed by the pinned key, and the root of its prefix.
    crate::ledger::check_heads(leaves, &ledger.heads, &public_key)
        .map_err(|f| fail(Some(f.index), f.reason))?;
    let mut heads = ledger.heads.clone();
    heads.sort_by_key(|h| h.tree_size);
    let latest = heads.last().cloned();

    // Only growth since the last head this verifier saw.
    if let Some(state) = &previous {
        let old = &state.head;
        if old.tree_size > n {
            return Err(fail(
                Some(n),
                format!("the log shrank from {} to {n} entries", old.tree_size),
            ));
        }
        if Some(merkle::root(&leaves[..old.tree_size as usize])) != old.root() {
            return Err(fail(
                None,
                format!(
                    "the first {} entries differ from the head seen before",
                    old.tree_size
                ),
            ));
        }
        if let (Some(remote), Some(new)) = (&ledger.remote, &latest)
            && old.tree_size > 0
            && old.tree_size < new.tree_size
        {
            let doc = remote.get(&format!(
                "/v1/audit/proof/consistency?from={}&to={}",
                old.tree_size, new.tree_size
            ))?;
            let proof = hashes(&doc["proof"])?;
            let (Some(old_root), Some(new_root)) = (old.root(), new.root()) else {
                return Err(fail(None, "malformed root in a head"));
            };
            if !merkle::verify_consistency(
                old.tree_size,
                new.tree_size,
                &old_root,
                &new_root,
                &proof,
            ) {
                return Err(fail(None, "the server's consistency proof does not verify"));
            }
        }
    }

    if let (Some(recount), Source::Local(dir)) = (ledger.recount.take(), &options.source) {
        check_rollups(&dir.join("frostglass.db"), recount)?;
    }

    if let Some(path) = &options.receipt {
        check_receipt(path, &ledger.leaves, &public_key, &ledger, latest.as_ref())?;
    }

    if let (Some(path), Some(head)) = (&options.state, &latest) {
        let state = State {
            public_key: hex::encode(&public_key),
            head: head.clone(),
        };
        let text = serde_json::to_string_pretty(&state).unwrap_or_default();
        std::fs::write(path, text).map_err(|e| fail(None, format!("cannot write state: {e}")))?;
    }
    // The latest head's root was just checked against the leaves; only a
    // tail after it needs the tree computed again.
    let root = match &latest {
        Some(head) if head.tree_size == n => head.root_hash.clone(),
        _ => hex::encode(merkle::root(leaves)),
    };
    let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(format!(
        "ok: {n} entries, {} signed heads verified with key {}, root {root} ({rate:.0} entries/s)",
        heads.len(),
        key_id(&public_key)
    ))
}

fn hashes(value: &serde_json::Value) -> Result<Vec<Hash>, Failure> {
    value
        .as_array()
        .ok_or_else(|| fail(None, "proof is not a list"))?
        .iter()
        .map(|h| {
            h.as_str()
                .and_then(decode_hash)
                .ok_or_else(|| fail(None, "malformed hash in proof"))
        })
        .collect()
}

fn check_receipt(
    path: &Path,
    leaves: &[Hash],
    key: &[u8],
    ledger: &Ledger,
    latest: Option<&SignedHead>,
) -> Result<(), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(None, format!("cannot read receipt: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(None, format!("invalid receipt: {e}")))?;
    // Accept a bare receipt or a whole query response.
    let receipt: Receipt = serde_json::from_value(value.get("receipt").cloned().unwrap_or(value))
        .map_err(|e| fail(None, format!("invalid receipt: {e}")))?;
    let i = receipt.ledger_index;
    let leaf = decode_hash(&receipt.entry_hash)
        .ok_or_else(|| fail(Some(i), "malformed entry hash in receipt"))?;
    if leaves.get(i as usize) != Some(&leaf) {
        return Err(fail(Some(i), "the receipt's entry is not in the ledger"));
    }
    let head = SignedHead {
        tree_size: receipt.tree_size,
        timestamp_ms: receipt.timestamp_ms,
        root_hash: receipt.root_hash.clone(),
        signature: receipt.signature.clone(),
        key_id: receipt.key_id.clone(),
    };
    if !head.verify(key) {
        return Err(fail(
            Some(i),
            "the receipt's tree head is not signed by the ledger key",
        ));
    }
    let size = receipt.tree_size as usize;
    if size > leaves.len() || Some(merkle::root(&leaves[..size])) != head.root() {
        return Err(fail(
            Some(i),
            "the receipt's tree head does not match the ledger",
        ));
    }
    if let (Some(remote), Some(latest)) = (&ledger.remote, latest) {
        let doc = remote.get(&format!(
            "/v1/audit/proof/inclusion?index={i}&size={}",
            latest.tree_size
        ))?;
        let proof = hashes(&doc["proof"])?;
        let root = latest.root().ok_or_else(|| fail(None, "malformed root"))?;
        if !merkle::verify_inclusion(&leaf, i, latest.tree_size, &proof, &root) {
            return Err(fail(
                Some(i),
                "the server's inclusion proof for the receipt does not verify",
            ));
        }
    }
    Ok(())
}

/// Checks every typed column stored beside an entry, and every roll-up,
/// against what the entries themselves say: quotas and budgets are read
/// from these, so a changed column is as much tampering as a changed entry.
/// What the entries of a range add up to, to compare with the roll-ups.
#[derive(Default)]
struct Recount {
    /// The first entry whose columns disagree with it, reported after the
    /// tree's checks (whose findings say more).
    mismatch: Option<(u64, String)>,
    daily: tables::DailyRollups,
    budgets: tables::BudgetRollups,
    usage: std::collections::BTreeMap<(String, Option<String>, String, Vec<String>), UsageRollup>,
}

impl Recount {
    fn merge(&mut self, other: Recount) {
        if let Some(m) = other.mismatch
            && self.mismatch.as_ref().is_none_or(|mine| m.0 < mine.0)
        {
            self.mismatch = Some(m);
        }
        for (key, sums) in other.daily {
            let mine = self.daily.entry(key).or_default();
            for (a, b) in mine.iter_mut().zip(sums) {
                *a += b;
            }
        }
        for (budget, eps) in other.budgets {
            *self.budgets.entry(budget).or_default() += eps;
        }
        for (key, rollup) in other.usage {
            match self.usage.get_mut(&key) {
                Some(mine) => mine.add(&rollup),
                None => {
                    self.usage.insert(key, rollup);
                }
            }
        }
    }
}

/// One pass over the entries of `range`: each entry's leaf (recomputed from
/// its body and compared with the stored one), its stored columns and usage
/// row against the entry, and its share of the roll-ups. The first range
/// reports progress for all.
fn scan(
    conn: &rusqlite::Connection,
    range: std::ops::Range<u64>,
    ranges: u64,
) -> Result<(Vec<Hash>, Recount), Failure> {
    let sql = |e: crate::ledger::LedgerError| fail(None, e.to_string());
    let mut archived = ArchivedBodies::open(conn).map_err(sql)?;
    let mut out = Recount::default();
    let first = range.start;
    let mut leaves: Vec<Hash> = Vec::with_capacity((range.end - range.start) as usize);
    let started = std::time::Instant::now();
    let checked = tables::for_each_stored(conn, range, |index, body, stored| {
        let expected = first + leaves.len() as u64;
        if index != expected {
            return Err(format!("{expected}:entry {expected} is missing"));
        }
        let body = archived
            .fill(index, body)
            .map_err(|e| format!("{index}:{e}"))?;
        let leaf = merkle::leaf_hash(body.as_bytes());
        if decode_hash(&stored.leaf_hash) != Some(leaf) {
            return Err(format!("{index}:the entry does not match its leaf hash"));
        }
        leaves.push(leaf);
        if out.mismatch.is_none()
            && let Err(reason) = recount_entry(&mut out, index, &body, stored)
        {
            out.mismatch = Some((index, reason));
        }
        if first == 0
            && leaves
                .len()
                .is_multiple_of(PROGRESS_EVERY / ranges as usize)
        {
            let read = leaves.len() as f64 * ranges as f64;
            let rate = read / started.elapsed().as_secs_f64().max(1e-9);
            eprintln!("verify: about {read:.0} entries read ({rate:.0}/s)");
        }
        Ok(())
    })
    .map_err(sql)?;
    if let Err(e) = checked {
        let (index, reason) = e.split_once(':').unwrap_or(("", &e));
        return Err(fail(index.parse().ok(), reason));
    }
    Ok((leaves, out))
}

/// Checks one entry's stored columns and usage row against the entry, and
/// adds it to the recount.
fn recount_entry(
    out: &mut Recount,
    index: u64,
    body: &str,
    stored: tables::StoredRow<'_>,
) -> Result<(), String> {
    let entry = Entry::decode(body).map_err(|e| format!("the entry cannot be read: {e}"))?;
    let derived = entry.columns();
    if let Some(column) = stored.mismatch(&derived) {
        return Err(format!(
            "the stored column {column} does not match the entry"
        ));
    }
    // The derived values are moved into the recount's keys, not cloned:
    // millions of entries pass here.
    let crate::ledger::event::Columns {
        grant,
        day,
        queries,
        rows_scanned,
        bytes_scanned,
        charge_micros,
        epsilon,
        ..
    } = derived;
    if let Some(grant) = grant
        && queries > 0
    {
        let sums = out.daily.entry((grant, day)).or_default();
        sums[0] += queries as i64;
        sums[1] += rows_scanned as i64;
        sums[2] += bytes_scanned as i64;
        sums[3] += charge_micros;
    }
    for (budget, eps) in epsilon {
        *out.budgets.entry(budget).or_default() += eps;
    }
    if let Some(record) = UsageRecord::of(index, &entry) {
        if !stored
            .usage
            .as_deref()
            .is_some_and(|row| crate::ledger::usage_table::matches(&record, row))
        {
            return Err("the stored usage row does not match the entry".to_string());
        }
        let mut one = UsageRollup::of(&record);
        let key = (
            std::mem::take(&mut one.day),
            one.grant.take(),
            std::mem::take(&mut one.principal),
            std::mem::take(&mut one.datasets),
        );
        match out.usage.get_mut(&key) {
            Some(sums) => sums.add(&one),
            None => {
                one.day = key.0.clone();
                one.grant = key.1.clone();
                one.principal = key.2.clone();
                one.datasets = key.3.clone();
                out.usage.insert(key, one);
            }
        }
    }
    Ok(())
}

/// How many ranges of the ledger are scanned at once (one per core).
const SCAN_THREADS: u64 = 2;

/// Every entry against its leaf and its typed columns: ranges of the
/// ledger scanned once each, on threads of their own with their own
/// read-only connections. Returns the leaves, in order, and the merged
/// recount for [`check_rollups`].
fn scan_entries(db: &Path) -> Result<(Vec<Hash>, Recount), Failure> {
    // Read through a memory map: a scan of the whole file otherwise spends
    // a tenth of its time copying pages out of the kernel one read at a time.
    let open = || {
        let conn = rusqlite::Connection::open_with_flags(
            db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| fail(None, e.to_string()))?;
        conn.pragma_update(None, "mmap_size", 1i64 << 40)
            .map_err(|e| fail(None, e.to_string()))?;
        Ok::<_, Failure>(conn)
    };
    let conn = open()?;
    let sql = |e: crate::ledger::LedgerError| fail(None, e.to_string());
    let size: u64 = conn
        .query_row("SELECT COALESCE(MAX(idx) + 1, 0) FROM usage_log", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(|e| fail(None, e.to_string()))? as u64;
    ArchivedBodies::open(&conn)
        .map_err(sql)?
        .check_files()
        .map_err(|e| fail(None, e))?;
    let step = size.div_ceil(SCAN_THREADS).max(1);
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..SCAN_THREADS)
            .map(|k| {
                let range = (k * step).min(size)..((k + 1) * step).min(size);
                scope.spawn(move || scan(&open()?, range, SCAN_THREADS))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(fail(None, "the column check stopped")))
            })
            .collect::<Vec<_>>()
    });
    let mut total = Recount::default();
    let mut leaves = Vec::with_capacity(size as usize);
    for part in parts {
        let (part_leaves, recount) = part?;
        leaves.extend(part_leaves);
        total.merge(recount);
    }
    Ok((leaves, total))
}

/// Every roll-up against the recount of the entries.
fn check_rollups(db: &Path, recount: Recount) -> Result<(), Failure> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| fail(None, e.to_string()))?;
    let sql = |e: crate::ledger::LedgerError| fail(None, e.to_string());
    let Recount {
        mismatch,
        daily,
        budgets,
        usage,
    } = recount;
    if let Some((index, reason)) = mismatch {
        return Err(fail(Some(index), reason));
    }
    let (stored_daily, stored_budgets) = tables::rollups(&conn).map_err(sql)?;
    if stored_daily != daily {
        let key = daily
            .keys()
            .chain(stored_daily.keys())
            .find(|k| daily.get(*k) != stored_daily.get(*k));
        return Err(fail(
            None,
            format!(
                "the daily usage roll-up of grant {} on {} does not match the entries",
                key.map_or("?", |k| k.0.as_str()),
                key.map_or("?", |k| k.1.as_str())
            ),
        ));
    }
    let stored_usage = tables::usage_rollups(&conn).map_err(sql)?;
    let same = |a: &UsageRollup, b: &UsageRollup| {
        (a.epsilon - b.epsilon).abs() <= 1e-9 * a.epsilon.abs().max(1.0)
            && UsageRollup {
                epsilon: 0.0,
                ..a.clone()
            } == UsageRollup {
                epsilon: 0.0,
                ..b.clone()
            }
    };
    let matches = stored_usage.len() == usage.len()
        && stored_usage.iter().all(|row| {
            let key = (
                row.day.clone(),
                row.grant.clone(),
                row.principal.clone(),
                row.datasets.clone(),
            );
            usage.get(&key).is_some_and(|recount| same(recount, row))
        });
    if !matches {
        return Err(fail(None, "the usage roll-up does not match the entries"));
    }
    for budget in budgets.keys().chain(stored_budgets.keys()) {
        let recount = budgets.get(budget).copied().unwrap_or(0.0);
        let stored = stored_budgets.get(budget).copied().unwrap_or(0.0);
        if (recount - stored).abs() > 1e-9 * recount.abs().max(1.0) {
            return Err(fail(
                None,
                format!("the privacy budget roll-up of {budget} does not match the entries"),
            ));
        }
    }
    Ok(())
}
