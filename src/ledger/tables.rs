//! The ledger's tables: entries with their typed columns, the ε charged per
//! budget, the signed heads, and the roll-ups (per grant and day, per
//! budget) that quotas and budgets are read from. Every row here is written
//! in the transaction that appends its entry, and `verify` recomputes the
//! columns and roll-ups from the entries.

use super::LedgerError;
use super::event::{Columns, Entry};
use super::merkle::{Frontier, Hash, Subtrees};
use super::usage::{UsageRecord, UsageRollup};
use crate::accounting::DailyUse;
use crate::util::sql::CachedStatements;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;

pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS usage_log (
    idx INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    principal TEXT,
    grant_id TEXT,
    decision TEXT NOT NULL,
    body TEXT NOT NULL,
    leaf_hash TEXT NOT NULL,
    day TEXT NOT NULL DEFAULT '',
    queries INTEGER NOT NULL DEFAULT 0,
    rows_scanned INTEGER NOT NULL DEFAULT 0,
    bytes_scanned INTEGER NOT NULL DEFAULT 0,
    charge_micros INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS usage_epsilon (
    idx INTEGER NOT NULL REFERENCES usage_log(idx),
    budget TEXT NOT NULL,
    epsilon REAL NOT NULL,
    PRIMARY KEY (idx, budget)
);
CREATE TABLE IF NOT EXISTS usage_sql (
    idx INTEGER PRIMARY KEY REFERENCES usage_log(idx),
    sql TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tree_heads (
    tree_size INTEGER PRIMARY KEY,
    timestamp_ms INTEGER NOT NULL,
    root_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    key_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollup_daily (
    grant_id TEXT NOT NULL,
    day TEXT NOT NULL,
    queries INTEGER NOT NULL,
    rows_scanned INTEGER NOT NULL,
    bytes_scanned INTEGER NOT NULL,
    charge_micros INTEGER NOT NULL,
    PRIMARY KEY (grant_id, day)
);
CREATE TABLE IF NOT EXISTS rollup_budget (
    budget TEXT PRIMARY KEY,
    epsilon REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entry_keys (
    key TEXT NOT NULL,
    ledger_index INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entry_keys_key ON entry_keys (key);
CREATE TABLE IF NOT EXISTS registered_manifests (
    dataset TEXT PRIMARY KEY,
    manifest_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollup_usage (
    day TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    datasets TEXT NOT NULL,
    answered INTEGER NOT NULL,
    refused INTEGER NOT NULL,
    rows_scanned INTEGER NOT NULL,
    bytes_scanned INTEGER NOT NULL,
    cpu_ms INTEGER NOT NULL,
    cells_released INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    charge_micros INTEGER NOT NULL,
    PRIMARY KEY (day, grant_id, principal, datasets)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tree_nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_state (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"#;

/// `PRAGMA user_version` once the typed columns, roll-ups and stored tree
/// nodes exist.
const TYPED_COLUMNS_VERSION: i64 = 7;

/// Creates the tables; a ledger written before typed columns existed gets
/// them, filled from its entries, once.
pub fn create(conn: &Connection) -> Result<(), LedgerError> {
    conn.execute_batch(super::archive::SCHEMA)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= TYPED_COLUMNS_VERSION {
        return Ok(());
    }
    let tx = conn.unchecked_transaction()?;
    let old_log: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE name = 'usage_log')",
        [],
        |r| r.get(0),
    )?;
    if old_log {
        let columns: Vec<String> = tx
            .prepare("SELECT name FROM pragma_table_info('usage_log')")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for (name, ty) in [
            ("day", "TEXT NOT NULL DEFAULT ''"),
            ("queries", "INTEGER NOT NULL DEFAULT 0"),
            ("rows_scanned", "INTEGER NOT NULL DEFAULT 0"),
            ("bytes_scanned", "INTEGER NOT NULL DEFAULT 0"),
            ("charge_micros", "INTEGER NOT NULL DEFAULT 0"),
        ] {
            if !columns.iter().any(|c| c == name) {
                tx.execute_batch(&format!("ALTER TABLE usage_log ADD COLUMN {name} {ty}"))?;
            }
        }
    }
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(super::usage_table::SCHEMA)?;
    // What each version added over the one before: 2 typed columns, 3 tree
    // nodes, 4 the usage roll-up, 5 typed usage rows (6 an index; 7 dropped
    // indexes no read uses, each a write per entry).
    tx.execute_batch(
        "DROP INDEX IF EXISTS usage_log_grant_day; DROP INDEX IF EXISTS query_usage_principal; DROP INDEX IF EXISTS query_usage_grant;",
    )?;
    if old_log && version < 5 {
        backfill(&tx)?;
    }
    if old_log && version < 3 {
        store_nodes_of_existing_leaves(&tx)?;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {TYPED_COLUMNS_VERSION}"))?;
    tx.commit()?;
    Ok(())
}

/// Derives every entry's columns and the roll-ups from the bodies.
fn backfill(conn: &Connection) -> Result<(), LedgerError> {
    conn.execute_batch(
        "DELETE FROM usage_epsilon; DELETE FROM rollup_daily; DELETE FROM rollup_budget; DELETE FROM registered_manifests; DELETE FROM entry_keys; DELETE FROM rollup_usage; DELETE FROM query_usage; DELETE FROM ledger_state WHERE key = 'query_entries';",
    )?;
    let bodies: Vec<(i64, String)> = conn
        .prepare("SELECT idx, body FROM usage_log ORDER BY idx")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (idx, body) in bodies {
        let entry = Entry::decode(&body)
            .map_err(|e| LedgerError::Corrupt(format!("entry {idx} cannot be read: {e}")))?;
        let c = entry.columns();
        conn.run(
            "UPDATE usage_log SET day = ?2, queries = ?3, rows_scanned = ?4, bytes_scanned = ?5, charge_micros = ?6 WHERE idx = ?1",
            params![idx, c.day, c.queries as i64, c.rows_scanned as i64, c.bytes_scanned as i64, c.charge_micros],
        )?;
        write_derived(conn, idx, &entry, &c)?;
    }
    Ok(())
}

/// A ledger written before tree nodes were stored gets them, once.
fn store_nodes_of_existing_leaves(conn: &Connection) -> Result<(), LedgerError> {
    conn.execute_batch("DELETE FROM tree_nodes")?;
    let leaves: Vec<String> = conn
        .prepare("SELECT leaf_hash FROM usage_log ORDER BY idx")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut frontier = Frontier::default();
    for leaf in leaves {
        let leaf: Hash = hex::decode(&leaf)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| LedgerError::Corrupt("a stored leaf hash is not a hash".into()))?;
        let mut failed = None;
        frontier.push_completing(leaf, |level, idx, hash| {
            if let Err(e) = insert_node(conn, level, idx, hash) {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(())
}

pub fn insert_node(
    conn: &Connection,
    level: u32,
    idx: u64,
    hash: &Hash,
) -> Result<(), LedgerError> {
    conn.run(
        "INSERT OR REPLACE INTO tree_nodes (level, idx, hash) VALUES (?1, ?2, ?3)",
        params![level, idx as i64, &hash[..]],
    )?;
    Ok(())
}

/// The stored roots of perfect subtrees, read one by one; counts its reads
/// (what the ledger's O(log n) promises are tested by).
pub struct StoredNodes<'c> {
    conn: &'c Connection,
    reads: std::cell::Cell<u64>,
}

impl<'c> StoredNodes<'c> {
    pub fn new(conn: &'c Connection) -> StoredNodes<'c> {
        StoredNodes {
            conn,
            reads: std::cell::Cell::new(0),
        }
    }

    pub fn reads(&self) -> u64 {
        self.reads.get()
    }
}

impl Subtrees for StoredNodes<'_> {
    fn perfect(&self, level: u32, index: u64) -> Option<Hash> {
        self.reads.set(self.reads.get() + 1);
        let bytes: Vec<u8> = self
            .conn
            .row(
                "SELECT hash FROM tree_nodes WHERE level = ?1 AND idx = ?2",
                params![level, index as i64],
                |r| r.get(0),
            )
            .ok()?;
        bytes.try_into().ok()
    }
}

/// The tree size up to which start-up last verified every entry against a
/// signed head; start-up checks only what came after.
pub fn verified_size(conn: &Connection) -> Result<u64, LedgerError> {
    Ok(conn
        .row(
            "SELECT value FROM ledger_state WHERE key = 'verified_size'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0)
        .max(0) as u64)
}

pub fn set_verified_size(conn: &Connection, size: u64) -> Result<(), LedgerError> {
    conn.run(
        "INSERT OR REPLACE INTO ledger_state (key, value) VALUES ('verified_size', ?1)",
        [size as i64],
    )?;
    Ok(())
}

/// Inserts one entry with its typed columns and moves the roll-ups.
pub fn insert(
    conn: &Connection,
    idx: u64,
    entry: &Entry,
    body: &str,
    leaf_hash: &str,
    sql: Option<&str>,
) -> Result<(), LedgerError> {
    let c = entry.columns();
    let idx = idx as i64;
    conn.run(
        "INSERT INTO usage_log (idx, created_at, kind, principal, grant_id, decision, body, leaf_hash, day, queries, rows_scanned, bytes_scanned, charge_micros)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            idx, c.created_at, c.kind, c.principal, c.grant, c.decision, body, leaf_hash,
            c.day, c.queries as i64, c.rows_scanned as i64, c.bytes_scanned as i64, c.charge_micros
        ],
    )?;
    if let Some(sql) = sql {
        conn.run(
            "INSERT INTO usage_sql (idx, sql) VALUES (?1, ?2)",
            params![idx, sql],
        )?;
    }
    write_derived(conn, idx, entry, &c)
}

fn write_derived(
    conn: &Connection,
    idx: i64,
    entry: &Entry,
    c: &Columns,
) -> Result<(), LedgerError> {
    for key in entry.event.lookup_keys() {
        conn.run(
            "INSERT INTO entry_keys (key, ledger_index) VALUES (?1, ?2)",
            params![key, idx],
        )?;
    }
    for (budget, eps) in &c.epsilon {
        conn.run(
            "INSERT INTO usage_epsilon (idx, budget, epsilon) VALUES (?1, ?2, ?3)",
            params![idx, budget, eps],
        )?;
        conn.run(
            "INSERT INTO rollup_budget (budget, epsilon) VALUES (?1, ?2)
             ON CONFLICT (budget) DO UPDATE SET epsilon = epsilon + excluded.epsilon",
            params![budget, eps],
        )?;
    }
    if let Some(grant) = &c.grant
        && c.queries > 0
    {
        conn.run(
            "INSERT INTO rollup_daily (grant_id, day, queries, rows_scanned, bytes_scanned, charge_micros) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (grant_id, day) DO UPDATE SET queries = queries + excluded.queries,
                rows_scanned = rows_scanned + excluded.rows_scanned, bytes_scanned = bytes_scanned + excluded.bytes_scanned,
                charge_micros = charge_micros + excluded.charge_micros",
            params![grant, c.day, c.queries as i64, c.rows_scanned as i64, c.bytes_scanned as i64, c.charge_micros],
        )?;
    }
    if let Some(record) = UsageRecord::of(idx as u64, entry) {
        add_usage(conn, &UsageRollup::of(&record))?;
        super::usage_table::insert(conn, &record)?;
    }
    if let super::event::LedgerEvent::DatasetRegistered {
        dataset,
        manifest_sha256,
        data_sha256,
        ..
    } = &entry.event
    {
        // The column holds the version key (manifest and data digests).
        let version = super::event::version_key(manifest_sha256, data_sha256.as_deref());
        conn.run(
            "INSERT OR REPLACE INTO registered_manifests (dataset, manifest_sha256) VALUES (?1, ?2)",
            params![dataset, version],
        )?;
    }
    Ok(())
}

fn add_usage(conn: &Connection, r: &UsageRollup) -> Result<(), LedgerError> {
    conn.run(
        "INSERT INTO rollup_usage (day, grant_id, principal, datasets, answered, refused, rows_scanned, bytes_scanned, cpu_ms, cells_released, epsilon, charge_micros)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (day, grant_id, principal, datasets) DO UPDATE SET answered = answered + excluded.answered,
            refused = refused + excluded.refused, rows_scanned = rows_scanned + excluded.rows_scanned,
            bytes_scanned = bytes_scanned + excluded.bytes_scanned, cpu_ms = cpu_ms + excluded.cpu_ms,
            cells_released = cells_released + excluded.cells_released, epsilon = epsilon + excluded.epsilon,
            charge_micros = charge_micros + excluded.charge_micros",
        params![
            r.day,
            r.grant.as_deref().unwrap_or(""),
            r.principal,
            r.datasets.join(","),
            r.answered as i64,
            r.refused as i64,
            r.rows_scanned as i64,
            r.bytes_scanned as i64,
            r.cpu_ms as i64,
            r.cells_released as i64,
            r.epsilon,
            r.charge_micros
        ],
    )?;
    Ok(())
}

/// Every usage roll-up row: small (days × grants × dataset sets), whatever
/// the ledger's length.
pub fn usage_rollups(conn: &Connection) -> Result<Vec<UsageRollup>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT day, grant_id, principal, datasets, answered, refused, rows_scanned, bytes_scanned, cpu_ms, cells_released, epsilon, charge_micros FROM rollup_usage",
    )?;
    let rows = stmt.query_map([], |r| {
        let grant: String = r.get(1)?;
        let datasets: String = r.get(3)?;
        Ok(UsageRollup {
            day: r.get(0)?,
            grant: (!grant.is_empty()).then_some(grant),
            principal: r.get(2)?,
            datasets: datasets
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect(),
            answered: r.get::<_, i64>(4)? as u64,
            refused: r.get::<_, i64>(5)? as u64,
            rows_scanned: r.get::<_, i64>(6)? as u64,
            bytes_scanned: r.get::<_, i64>(7)? as u64,
            cpu_ms: r.get::<_, i64>(8)? as u64,
            cells_released: r.get::<_, i64>(9)? as u64,
            epsilon: r.get(10)?,
            charge_micros: r.get(11)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// What a grant used on `day`, from the roll-up: what the daily quotas count.
pub fn used_on(conn: &Connection, grant: &str, day: &str) -> Result<DailyUse, LedgerError> {
    let used = conn
        .row(
            "SELECT queries, rows_scanned, bytes_scanned FROM rollup_daily WHERE grant_id = ?1 AND day = ?2",
            params![grant, day],
            |r| {
                Ok(DailyUse {
                    queries: r.get::<_, i64>(0)?.max(0) as u64,
                    rows: r.get::<_, i64>(1)?.max(0) as u64,
                    bytes: r.get::<_, i64>(2)?.max(0) as u64,
                })
            },
        )
        .optional()?;
    Ok(used.unwrap_or_default())
}

/// Answered queries of a grant in the calendar month `month` (`YYYY-MM`).
pub fn queries_in_month(conn: &Connection, grant: &str, month: &str) -> Result<u64, LedgerError> {
    let n: i64 = conn.row(
        "SELECT COALESCE(SUM(queries), 0) FROM rollup_daily WHERE grant_id = ?1 AND day >= ?2 AND day < ?3",
        params![grant, format!("{month}-01"), format!("{month}-99")],
        |r| r.get(0),
    )?;
    Ok(n.max(0) as u64)
}

/// Epsilon charged to a budget (`grant:<id>` or `dataset:<id>`), from the roll-up.
pub fn epsilon_spent(conn: &Connection, budget: &str) -> Result<f64, LedgerError> {
    Ok(conn
        .row(
            "SELECT epsilon FROM rollup_budget WHERE budget = ?1",
            [budget],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0.0))
}

/// The version key (`event::version_key`) each dataset was last registered with.
pub fn registered_manifests(conn: &Connection) -> Result<HashMap<String, String>, LedgerError> {
    let mut stmt = conn.prepare("SELECT dataset, manifest_sha256 FROM registered_manifests")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Entry bodies in index order: (index, body, leaf hash).
pub fn entries(
    conn: &Connection,
    from: u64,
    limit: u64,
) -> Result<Vec<(u64, String, String)>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx, body, leaf_hash FROM usage_log WHERE idx >= ?1 ORDER BY idx LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![from as i64, limit.min(i64::MAX as u64) as i64],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)),
    )?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Reads the stored columns and ε rows of the entries in `range`, in index
/// order, calling `each` with (index, body, stored columns).
pub fn for_each_stored(
    conn: &Connection,
    range: std::ops::Range<u64>,
    mut each: impl FnMut(u64, &str, StoredRow<'_>) -> Result<(), String>,
) -> Result<Result<(), String>, LedgerError> {
    let bounds = params![range.start as i64, range.end.min(i64::MAX as u64) as i64];
    // Three streams in index order, merged: the entries with their typed
    // usage rows (a join on the primary key), and the epsilon rows.
    let mut eps_stmt = conn.prepare(
        "SELECT idx, budget, epsilon FROM usage_epsilon WHERE idx >= ?1 AND idx < ?2 ORDER BY idx, rowid",
    )?;
    let mut eps_rows = eps_stmt.query(bounds)?;
    let mut pending: Option<(i64, String, f64)> = None;
    let usage_columns = super::usage_table::column_list("q.");
    let mut stmt = conn.prepare(&format!(
        "SELECT l.idx, l.body, l.leaf_hash, l.created_at, l.kind, l.principal, l.grant_id, l.decision, l.day, l.queries, l.rows_scanned, l.bytes_scanned, l.charge_micros, q.ledger_index IS NOT NULL, {usage_columns}
         FROM usage_log l LEFT JOIN query_usage q ON q.ledger_index = l.idx
         WHERE l.idx >= ?1 AND l.idx < ?2 ORDER BY l.idx"
    ))?;
    let mut rows = stmt.query(bounds)?;
    while let Some(r) = rows.next()? {
        let idx: i64 = r.get(0)?;
        let body: String = r.get(1)?;
        let mut epsilon = Vec::new();
        loop {
            if pending.is_none() {
                pending = match eps_rows.next()? {
                    Some(e) => Some((e.get(0)?, e.get(1)?, e.get(2)?)),
                    None => None,
                };
            }
            match pending.take() {
                Some((i, budget, eps)) if i == idx => epsilon.push((budget, eps)),
                Some(later) if later.0 > idx => {
                    pending = Some(later);
                    break;
                }
                // An epsilon row of no entry: it shows up as a mismatch of
                // the entry before, or is skipped past here.
                Some(_) => {}
                None => break,
            }
        }
        let usage = if r.get::<_, bool>(13)? {
            Some(
                (14..14 + super::usage_table::COLUMN_COUNT)
                    .map(|i| r.get_ref(i))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        } else {
            None
        };
        let stored = StoredRow {
            leaf_hash: r.get(2)?,
            created_at: r.get(3)?,
            kind: r.get(4)?,
            principal: r.get(5)?,
            grant: r.get(6)?,
            decision: r.get(7)?,
            day: r.get(8)?,
            queries: r.get(9)?,
            rows_scanned: r.get(10)?,
            bytes_scanned: r.get(11)?,
            charge_micros: r.get(12)?,
            epsilon,
            usage,
        };
        if let Err(e) = each(idx as u64, &body, stored) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

/// One entry's columns as stored (not as derived).
#[derive(Debug, PartialEq)]
pub struct StoredRow<'r> {
    /// Not a derived column: what the entry must hash to.
    pub leaf_hash: String,
    pub created_at: String,
    pub kind: String,
    pub principal: Option<String>,
    pub grant: Option<String>,
    pub decision: String,
    pub day: String,
    pub queries: i64,
    pub rows_scanned: i64,
    pub bytes_scanned: i64,
    pub charge_micros: i64,
    pub epsilon: Vec<(String, f64)>,
    /// The typed usage row of a query entry (`usage_table`), if any.
    pub usage: Option<Vec<rusqlite::types::ValueRef<'r>>>,
}

impl StoredRow<'_> {
    /// The first column that differs from what the entry says, if any.
    pub fn mismatch(&self, c: &Columns) -> Option<&'static str> {
        let checks: [(&'static str, bool); 11] = [
            ("created_at", self.created_at == c.created_at),
            ("kind", self.kind == c.kind),
            ("principal", self.principal == c.principal),
            ("grant_id", self.grant == c.grant),
            ("decision", self.decision == c.decision),
            ("day", self.day == c.day),
            ("queries", self.queries == c.queries as i64),
            ("rows_scanned", self.rows_scanned == c.rows_scanned as i64),
            (
                "bytes_scanned",
                self.bytes_scanned == c.bytes_scanned as i64,
            ),
            ("charge_micros", self.charge_micros == c.charge_micros),
            ("epsilon", self.epsilon == c.epsilon),
        ];
        checks.iter().find(|(_, ok)| !ok).map(|(name, _)| *name)
    }
}

/// Per (grant, day): queries, rows scanned, bytes scanned, charge in millionths.
pub type DailyRollups = HashMap<(String, String), [i64; 4]>;
/// Per budget (`grant:<id>`, `dataset:<id>`): epsilon spent.
pub type BudgetRollups = HashMap<String, f64>;

/// The stored roll-ups, for `verify` to compare with a recount.
pub fn rollups(conn: &Connection) -> Result<(DailyRollups, BudgetRollups), LedgerError> {
    let mut daily = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT grant_id, day, queries, rows_scanned, bytes_scanned, charge_micros FROM rollup_daily",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        daily.insert(
            (r.get(0)?, r.get(1)?),
            [r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?],
        );
    }
    let mut budgets = HashMap::new();
    let mut stmt = conn.prepare("SELECT budget, epsilon FROM rollup_budget")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        budgets.insert(r.get(0)?, r.get(1)?);
    }
    Ok((daily, budgets))
}

/// The indexes of the entries filed under `key` (see `LedgerEvent::lookup_keys`), in order.
pub fn entries_by_key(conn: &Connection, key: &str) -> Result<Vec<u64>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT ledger_index FROM entry_keys WHERE key = ?1 ORDER BY ledger_index",
    )?;
    let rows = stmt.query_map([key], |r| r.get::<_, i64>(0))?;
    Ok(rows
        .map(|r| r.map(|i| i.max(0) as u64))
        .collect::<Result<Vec<_>, _>>()?)
}
