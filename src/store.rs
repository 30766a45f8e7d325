//! Durable state in the data directory: principals and their API keys,
//! grants, and released answers kept for repetition. SQLite in WAL mode
//! with `synchronous=FULL`, so a committed row survives a crash and the CLI
//! and a running server can share the file. The ledger keeps its own tables
//! in the same file; a change here is made inside the ledger transaction
//! that records it (the `&Connection` functions below), never alone.

use crate::util::now_rfc3339;
use crate::util::sql::CachedStatements;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create data directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
}

impl From<StoreError> for crate::error::Error {
    fn from(e: StoreError) -> Self {
        // Conflicts and absences are the request's (an id taken, a key
        // unknown); anything else is the server's.
        match e {
            StoreError::Conflict(m) => crate::error::Error::Conflict(m),
            StoreError::NotFound(m) => crate::error::Error::NotFound(m),
            other => crate::error::Error::Internal(other.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Buyer,
    Auditor,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Buyer => "buyer",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "buyer" => Some(Role::Buyer),
            "auditor" => Some(Role::Auditor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Principal {
    pub id: String,
    pub role: Role,
    pub org: Option<String>,
    pub region: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub buyer: String,
    pub datasets: Vec<String>,
    pub purpose: String,
    pub queries_per_day: Option<u64>,
    pub rows_per_day: Option<u64>,
    pub bytes_per_day: Option<u64>,
    pub epsilon: Option<f64>,
    pub expires_at: Option<String>,
    pub cross_border_assessment: Option<String>,
    pub status: String,
    pub created_at: String,
}

impl Grant {
    pub fn is_active(&self, now: &str) -> bool {
        self.status == "active" && self.expires_at.as_deref().is_none_or(|e| e > now)
    }

    pub fn covers(&self, dataset: &str) -> bool {
        self.datasets.iter().any(|d| d == dataset)
    }
}

/// A new grant, as the CLI or an owner's approval makes it.
#[derive(Debug, Clone, Default)]
pub struct NewGrant {
    pub buyer: String,
    pub datasets: Vec<String>,
    pub purpose: String,
    pub queries_per_day: Option<u64>,
    pub rows_per_day: Option<u64>,
    pub bytes_per_day: Option<u64>,
    pub epsilon: Option<f64>,
    pub expires_at: Option<String>,
    pub cross_border_assessment: Option<String>,
}

fn count(v: Option<i64>) -> Option<u64> {
    v.map(|n| n.max(0) as u64)
}

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS principals (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    org TEXT,
    region TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    principal_id TEXT NOT NULL REFERENCES principals(id),
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS principal_certs (
    principal_id TEXT PRIMARY KEY REFERENCES principals(id),
    spki_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    buyer TEXT NOT NULL REFERENCES principals(id),
    datasets TEXT NOT NULL,
    purpose TEXT NOT NULL,
    queries_per_day INTEGER,
    rows_per_day INTEGER,
    bytes_per_day INTEGER,
    epsilon REAL,
    expires_at TEXT,
    cross_border_assessment TEXT,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS grants_buyer ON grants (buyer);
CREATE TABLE IF NOT EXISTS registered_datasets (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    manifest TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    key_id TEXT PRIMARY KEY,
    principal_id TEXT NOT NULL REFERENCES principals(id),
    public_key BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dataset_operators (
    dataset TEXT NOT NULL,
    operator TEXT NOT NULL REFERENCES principals(id),
    delegated_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (dataset, operator)
);
CREATE TABLE IF NOT EXISTS access_requests (
    id TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    grant_id TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS grant_reviews (
    grant_id TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS held_answers (
    query_id TEXT PRIMARY KEY,
    buyer TEXT NOT NULL,
    owners TEXT NOT NULL,
    status TEXT NOT NULL,
    nonce BLOB,
    sealed BLOB,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS quality_cards (
    dataset TEXT NOT NULL,
    version TEXT NOT NULL,
    card TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (dataset, version)
);
CREATE TABLE IF NOT EXISTS released_answers (
    scope TEXT NOT NULL,
    plan_sha256 TEXT NOT NULL,
    answer BLOB NOT NULL,
    release TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (scope, plan_sha256)
);
"#;

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Io(data_dir.to_path_buf(), e))?;
        let conn = Connection::open(data_dir.join("frostglass.db"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn principal_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .row("SELECT COUNT(*) FROM principals", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    pub fn principal(&self, id: &str) -> Result<Option<Principal>, StoreError> {
        principal_in(&self.conn(), id)
    }

    /// The principal holding a key, and the client certificate it is bound to, if any.
    pub fn principal_by_key_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<(Principal, Option<String>)>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .row(
                "SELECT p.id, p.role, p.org, p.region, c.spki_sha256 FROM api_keys k JOIN principals p ON p.id = k.principal_id
                 LEFT JOIN principal_certs c ON c.principal_id = p.id
                 WHERE k.key_hash = ?1 AND k.revoked_at IS NULL",
                [key_hash],
                |r| Ok((principal_row(r)?, r.get(4)?)),
            )
            .optional()?)
    }

    /// Grants of a buyer, oldest first (the order in which a query picks one).
    pub fn grants_of(&self, buyer: &str) -> Result<Vec<Grant>, StoreError> {
        self.query_grants("WHERE buyer = ?1", &[&buyer])
    }

    /// The buyer's grant with this id, if any (a one-row lookup: a buyer may
    /// hold many grants).
    pub fn grant_of(&self, buyer: &str, id: &str) -> Result<Option<Grant>, StoreError> {
        Ok(self
            .query_grants("WHERE buyer = ?1 AND id = ?2", &[&buyer, &id])?
            .pop())
    }

    /// Grants that cover a dataset.
    pub fn grants_on(&self, dataset: &str) -> Result<Vec<Grant>, StoreError> {
        Ok(self
            .all_grants()?
            .into_iter()
            .filter(|g| g.covers(dataset))
            .collect())
    }

    pub fn all_grants(&self) -> Result<Vec<Grant>, StoreError> {
        self.query_grants("", &[])
    }

    fn query_grants(
        &self,
        condition: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Grant>, StoreError> {
        query_grants(&self.conn(), condition, args)
    }

    /// Datasets registered, changed or withdrawn over HTTP. Each wins over
    /// a manifest file in `catalog/` with the same id.
    pub fn registered_datasets(&self) -> Result<Vec<RegisteredDataset>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, owner, manifest, status, version FROM registered_datasets ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(RegisteredDataset {
                id: r.get(0)?,
                owner: r.get(1)?,
                manifest: r.get(2)?,
                withdrawn: r.get::<_, String>(3)? == "withdrawn",
                version: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The quality card computed for this version of a dataset, if any.
    pub fn quality_card(&self, dataset: &str, version: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .row(
                "SELECT card FROM quality_cards WHERE dataset = ?1 AND version = ?2",
                [dataset, version],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// A released answer kept so that asking again costs no new epsilon.
    pub fn cached_answer(
        &self,
        scope: &str,
        plan_sha256: &str,
    ) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        Ok(self
            .conn()
            .row(
                "SELECT answer, release FROM released_answers WHERE scope = ?1 AND plan_sha256 = ?2",
                params![scope, plan_sha256],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }
}

/// A released answer kept so that asking again returns it, not fresh noise
/// to average away.
pub struct ReleasedAnswer {
    pub scope: String,
    pub plan_sha256: String,
    /// The released batches as an Arrow IPC stream.
    pub answer: Vec<u8>,
    /// Its release summary (JSON).
    pub release: String,
}

/// Never its values, should an entry that carries it be printed.
impl std::fmt::Debug for ReleasedAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleasedAnswer")
            .field("scope", &self.scope)
            .field("plan_sha256", &self.plan_sha256)
            .field("answer_bytes", &self.answer.len())
            .finish()
    }
}

/// Keeps `a`, in the ledger transaction of the entry that charged for it:
/// the two are durable together, with one sync.
pub fn keep_answer(conn: &Connection, a: &ReleasedAnswer) -> Result<(), StoreError> {
    conn.run(
        "INSERT OR IGNORE INTO released_answers (scope, plan_sha256, answer, release, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![a.scope, a.plan_sha256, a.answer, a.release, now_rfc3339()],
    )?;
    Ok(())
}

fn principal_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Principal> {
    let role: String = r.get(1)?;
    Ok(Principal {
        id: r.get(0)?,
        role: Role::parse(&role).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                format!("unknown role '{role}'").into(),
            )
        })?,
        org: r.get(2)?,
        region: r.get(3)?,
    })
}

fn principal_in(conn: &Connection, id: &str) -> Result<Option<Principal>, StoreError> {
    Ok(conn
        .row(
            "SELECT id, role, org, region FROM principals WHERE id = ?1",
            [id],
            principal_row,
        )
        .optional()?)
}

fn require_principal(conn: &Connection, id: &str) -> Result<Principal, StoreError> {
    principal_in(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("no principal '{id}'")))
}

// State changes. Each runs on the connection of the ledger transaction that
// records it (see `app::admin`), so the change and its entry commit together.

pub fn add_principal(conn: &Connection, p: &Principal, key_hash: &str) -> Result<(), StoreError> {
    if principal_in(conn, &p.id)?.is_some() {
        return Err(StoreError::Conflict(format!(
            "principal '{}' already exists",
            p.id
        )));
    }
    let now = now_rfc3339();
    conn.run(
        "INSERT INTO principals (id, role, org, region, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![p.id, p.role.as_str(), p.org, p.region, now],
    )?;
    conn.run(
        "INSERT INTO api_keys (key_hash, principal_id, created_at) VALUES (?1, ?2, ?3)",
        params![key_hash, p.id, now],
    )?;
    Ok(())
}

/// Adds a key to a principal, which may hold at most two active keys (for rotation).
pub fn add_key(conn: &Connection, principal: &str, key_hash: &str) -> Result<(), StoreError> {
    require_principal(conn, principal)?;
    let active: i64 = conn.row(
        "SELECT COUNT(*) FROM api_keys WHERE principal_id = ?1 AND revoked_at IS NULL",
        [principal],
        |r| r.get(0),
    )?;
    if active >= 2 {
        return Err(StoreError::Conflict(format!(
            "'{principal}' already has two active keys; revoke one first"
        )));
    }
    conn.run(
        "INSERT INTO api_keys (key_hash, principal_id, created_at) VALUES (?1, ?2, ?3)",
        params![key_hash, principal, now_rfc3339()],
    )?;
    Ok(())
}

/// Revokes the key with this hash; returns whose it was.
pub fn revoke_key(conn: &Connection, key_hash: &str) -> Result<String, StoreError> {
    let principal: Option<String> = conn
        .row(
            "SELECT principal_id FROM api_keys WHERE key_hash = ?1 AND revoked_at IS NULL",
            [key_hash],
            |r| r.get(0),
        )
        .optional()?;
    let principal =
        principal.ok_or_else(|| StoreError::NotFound("no active key like that".into()))?;
    conn.run(
        "UPDATE api_keys SET revoked_at = ?1 WHERE key_hash = ?2",
        params![now_rfc3339(), key_hash],
    )?;
    Ok(principal)
}

/// Binds a principal to a client certificate (by the SHA-256 of its public key).
pub fn bind_cert(conn: &Connection, principal: &str, spki_sha256: &str) -> Result<(), StoreError> {
    require_principal(conn, principal)?;
    conn.run(
        "INSERT OR REPLACE INTO principal_certs (principal_id, spki_sha256, created_at) VALUES (?1, ?2, ?3)",
        params![principal, spki_sha256, now_rfc3339()],
    )?;
    Ok(())
}

/// Makes a grant; returns it as stored.
pub fn add_grant(conn: &Connection, g: &NewGrant) -> Result<Grant, StoreError> {
    let buyer = require_principal(conn, &g.buyer)?;
    if buyer.role != Role::Buyer {
        return Err(StoreError::Conflict(format!(
            "principal '{}' is not a buyer",
            g.buyer
        )));
    }
    let id = crate::util::new_id("g");
    let datasets = serde_json::to_string(&g.datasets).unwrap_or_else(|_| "[]".into());
    conn.run(
        "INSERT INTO grants (id, buyer, datasets, purpose, queries_per_day, rows_per_day, bytes_per_day, epsilon, expires_at, cross_border_assessment, status, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'active', ?11)",
        params![
            id,
            g.buyer,
            datasets,
            g.purpose,
            g.queries_per_day.map(|n| n as i64),
            g.rows_per_day.map(|n| n as i64),
            g.bytes_per_day.map(|n| n as i64),
            g.epsilon,
            g.expires_at,
            g.cross_border_assessment,
            now_rfc3339()
        ],
    )?;
    query_grants(conn, "WHERE id = ?1", &[&id])?
        .pop()
        .ok_or_else(|| StoreError::NotFound(format!("grant '{id}' vanished")))
}

/// A dataset as registered over HTTP (see [`Store::registered_datasets`]).
#[derive(Debug, Clone)]
pub struct RegisteredDataset {
    pub id: String,
    pub owner: String,
    /// The manifest JSON, its location resolved.
    pub manifest: String,
    pub withdrawn: bool,
    /// 1 for the first registration, one more for each update.
    pub version: u64,
}

/// Whether a dataset was withdrawn (ids are not reused).
pub fn is_withdrawn(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .row(
            "SELECT status = 'withdrawn' FROM registered_datasets WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(false))
}

/// Records the active version of a dataset's manifest; returns its version number.
pub fn save_dataset(
    conn: &Connection,
    id: &str,
    owner: &str,
    manifest: &str,
) -> Result<u64, StoreError> {
    let version: i64 = conn.row(
        "INSERT INTO registered_datasets (id, owner, manifest, status, version, updated_at) VALUES (?1, ?2, ?3, 'active', 1, ?4)
         ON CONFLICT (id) DO UPDATE SET manifest = excluded.manifest, status = 'active', version = version + 1, updated_at = excluded.updated_at
         RETURNING version",
        params![id, owner, manifest, now_rfc3339()],
        |r| r.get(0),
    )?;
    Ok(version.max(0) as u64)
}

/// Marks a dataset withdrawn (its manifest kept for the record) and ends
/// every active grant that covers it; returns the grants ended.
pub fn withdraw_dataset(
    conn: &Connection,
    id: &str,
    owner: &str,
    manifest: &str,
) -> Result<Vec<String>, StoreError> {
    conn.run(
        "INSERT INTO registered_datasets (id, owner, manifest, status, version, updated_at) VALUES (?1, ?2, ?3, 'withdrawn', 1, ?4)
         ON CONFLICT (id) DO UPDATE SET status = 'withdrawn', updated_at = excluded.updated_at",
        params![id, owner, manifest, now_rfc3339()],
    )?;
    let ended: Vec<String> = query_grants(conn, "WHERE status = 'active'", &[])?
        .into_iter()
        .filter(|g| g.covers(id))
        .map(|g| g.id)
        .collect();
    for g in &ended {
        revoke_grant(conn, g)?;
    }
    Ok(ended)
}

pub fn save_quality_card(
    conn: &Connection,
    dataset: &str,
    version: &str,
    card: &str,
) -> Result<(), StoreError> {
    conn.run(
        "INSERT OR REPLACE INTO quality_cards (dataset, version, card, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![dataset, version, card, now_rfc3339()],
    )?;
    Ok(())
}

pub fn revoke_grant(conn: &Connection, id: &str) -> Result<(), StoreError> {
    let changed = conn.run(
        "UPDATE grants SET status = 'revoked' WHERE id = ?1 AND status = 'active'",
        [id],
    )?;
    if changed == 0 {
        return Err(StoreError::NotFound(format!("no active grant '{id}'")));
    }
    Ok(())
}

fn query_grants(
    conn: &Connection,
    condition: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Grant>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT id, buyer, datasets, purpose, queries_per_day, rows_per_day, bytes_per_day, epsilon, expires_at, cross_border_assessment, status, created_at
         FROM grants {condition} ORDER BY created_at, id"
    ))?;
    let rows = stmt.query_map(args, |r| {
        let datasets: String = r.get(2)?;
        Ok(Grant {
            id: r.get(0)?,
            buyer: r.get(1)?,
            datasets: serde_json::from_str(&datasets).unwrap_or_default(),
            purpose: r.get(3)?,
            queries_per_day: count(r.get(4)?),
            rows_per_day: count(r.get(5)?),
            bytes_per_day: count(r.get(6)?),
            epsilon: r.get(7)?,
            expires_at: r.get(8)?,
            cross_border_assessment: r.get(9)?,
            status: r.get(10)?,
            created_at: r.get(11)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

// The market: signing keys, operators, access requests.

/// Registers a principal's Ed25519 public key; its id is the first 16 hex
/// digits of the key's SHA-256.
pub fn add_signing_key(
    conn: &Connection,
    principal: &str,
    public_key: &[u8],
) -> Result<String, StoreError> {
    require_principal(conn, principal)?;
    let key_id = crate::util::sha256_hex(public_key)[..16].to_string();
    let changed = conn.run(
        "INSERT OR IGNORE INTO signing_keys (key_id, principal_id, public_key, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![key_id, principal, public_key, now_rfc3339()],
    )?;
    if changed == 0 {
        return Err(StoreError::Conflict(format!(
            "signing key {key_id} is registered already"
        )));
    }
    Ok(key_id)
}

/// The public key `key_id` of `principal`, if it registered one by that id.
pub fn signing_key(
    conn: &Connection,
    principal: &str,
    key_id: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn
        .row(
            "SELECT public_key FROM signing_keys WHERE key_id = ?1 AND principal_id = ?2",
            [key_id, principal],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn set_operator(
    conn: &Connection,
    dataset: &str,
    operator: &str,
    by: &str,
    delegate: bool,
) -> Result<(), StoreError> {
    if delegate {
        let p = require_principal(conn, operator)?;
        if p.role != Role::Owner {
            return Err(StoreError::Conflict(format!(
                "principal '{operator}' is not an owner or operator"
            )));
        }
        conn.run(
            "INSERT OR REPLACE INTO dataset_operators (dataset, operator, delegated_by, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![dataset, operator, by, now_rfc3339()],
        )?;
    } else if conn.run(
        "DELETE FROM dataset_operators WHERE dataset = ?1 AND operator = ?2",
        [dataset, operator],
    )? == 0
    {
        return Err(StoreError::NotFound(format!(
            "'{operator}' does not operate '{dataset}'"
        )));
    }
    Ok(())
}

pub fn is_operator(conn: &Connection, dataset: &str, operator: &str) -> Result<bool, StoreError> {
    Ok(conn
        .row(
            "SELECT 1 FROM dataset_operators WHERE dataset = ?1 AND operator = ?2",
            [dataset, operator],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// An access request as stored: its JSON (see `app::market::AccessRequest`).
pub fn access_request(conn: &Connection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .row(
            "SELECT request FROM access_requests WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn save_access_request(
    conn: &Connection,
    id: &str,
    request: &str,
    status: &str,
) -> Result<(), StoreError> {
    conn.run(
        "INSERT INTO access_requests (id, request, status, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET request = excluded.request, status = excluded.status, updated_at = excluded.updated_at",
        params![id, request, status, now_rfc3339()],
    )?;
    Ok(())
}

impl Store {
    /// Every access request, oldest first, as stored JSON.
    pub fn access_requests(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT request FROM access_requests ORDER BY rowid")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn access_request(&self, id: &str) -> Result<Option<String>, StoreError> {
        access_request(&self.conn(), id)
    }

    pub fn signing_key(
        &self,
        principal: &str,
        key_id: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        signing_key(&self.conn(), principal, key_id)
    }
}

/// A released answer held for its owners' review, sealed (see `app::review`).
#[derive(Debug, Clone)]
pub struct HeldAnswer {
    pub query_id: String,
    pub buyer: String,
    pub owners: Vec<String>,
    /// `held`, `approved` or `rejected` (then the sealed answer is gone).
    pub status: String,
    pub nonce: Option<Vec<u8>>,
    pub sealed: Option<Vec<u8>>,
}

pub fn hold_answer(conn: &Connection, h: &HeldAnswer) -> Result<(), StoreError> {
    conn.run(
        "INSERT INTO held_answers (query_id, buyer, owners, status, nonce, sealed, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            h.query_id,
            h.buyer,
            serde_json::to_string(&h.owners).unwrap_or_default(),
            h.status,
            h.nonce,
            h.sealed,
            now_rfc3339()
        ],
    )?;
    Ok(())
}

/// Makes every answer under `grant` wait for its owners' review.
pub fn require_review(conn: &Connection, grant: &str) -> Result<(), StoreError> {
    conn.run(
        "INSERT OR IGNORE INTO grant_reviews (grant_id) VALUES (?1)",
        [grant],
    )?;
    Ok(())
}

/// Settles a held answer; a rejection destroys the sealed bytes.
pub fn review_answer(conn: &Connection, query_id: &str, approved: bool) -> Result<(), StoreError> {
    let changed = if approved {
        conn.run(
            "UPDATE held_answers SET status = 'approved' WHERE query_id = ?1 AND status = 'held'",
            [query_id],
        )?
    } else {
        conn.run(
            "UPDATE held_answers SET status = 'rejected', nonce = NULL, sealed = NULL WHERE query_id = ?1 AND status = 'held'",
            [query_id],
        )?
    };
    if changed == 0 {
        return Err(StoreError::Conflict(format!(
            "no answer '{query_id}' waits for review"
        )));
    }
    Ok(())
}

impl Store {
    /// Whether an owner asked, when approving it, to review every answer under `grant`.
    pub fn grant_requires_review(&self, grant: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .row(
                "SELECT 1 FROM grant_reviews WHERE grant_id = ?1",
                [grant],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn held_answer(&self, query_id: &str) -> Result<Option<HeldAnswer>, StoreError> {
        Ok(self
            .held_answers("WHERE query_id = ?1", &[&query_id])?
            .pop())
    }

    pub fn held_answers_waiting(&self) -> Result<Vec<HeldAnswer>, StoreError> {
        self.held_answers("WHERE status = 'held'", &[])
    }

    fn held_answers(
        &self,
        condition: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<HeldAnswer>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT query_id, buyer, owners, status, nonce, sealed FROM held_answers {condition} ORDER BY created_at"
        ))?;
        let rows = stmt.query_map(args, |r| {
            let owners: String = r.get(2)?;
            Ok(HeldAnswer {
                query_id: r.get(0)?,
                buyer: r.get(1)?,
                owners: serde_json::from_str(&owners).unwrap_or_default(),
                status: r.get(3)?,
                nonce: r.get(4)?,
                sealed: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}
