//! The usage ledger: an append-only log whose entries are the leaves of an
//! RFC 6962 Merkle tree, with Ed25519-signed tree heads.
//!
//! Appends go through one committer thread that gathers whatever is waiting
//! into a single SQLite transaction (WAL, `synchronous=FULL`): concurrent
//! queries share one fsync, and a receipt is handed out only after its
//! transaction is durable. A failed commit stops the process: carrying on
//! after a lost fsync could answer from a ledger the disk does not hold.
//! The CLI appends through the same [`Writer`], catching up on entries the
//! server wrote, so one tree serves both.

pub mod archive;
pub mod event;
pub mod evidence;
pub mod history;
pub mod merkle;
pub mod settlement;
pub mod tables;
pub mod usage;
pub mod usage_table;
pub mod verify;

use crate::util::sha256_hex;
use crate::util::sql::CachedStatements;
use event::{Entry, LedgerEvent};
use merkle::{Frontier, Hash, Subtrees};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

pub fn leaf_hash_hex(entry: &[u8]) -> String {
    hex::encode(merkle::leaf_hash(entry))
}

const HEAD_DOMAIN: &[u8] = b"frostglass-tree-head-v1\n";
const KEY_FILE: &str = "ledger-ed25519.pk8";
const PUBLIC_KEY_FILE: &str = "ledger-ed25519.pub";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ledger key: {0}")]
    Key(String),
    #[error("ledger is corrupt: {0}")]
    Corrupt(String),
    #[error("ledger committer stopped")]
    Stopped,
    /// The state change an entry records was refused (a conflict, a missing principal).
    #[error(transparent)]
    Change(#[from] crate::store::StoreError),
}

impl From<LedgerError> for crate::error::Error {
    fn from(e: LedgerError) -> Self {
        match e {
            // A state change the request asked for and the state refused.
            LedgerError::Change(refused) => refused.into(),
            other => crate::error::Error::Internal(other.to_string()),
        }
    }
}

/// A signed statement of the tree's size and root at a moment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignedHead {
    pub tree_size: u64,
    pub timestamp_ms: u64,
    pub root_hash: String,
    pub signature: String,
    pub key_id: String,
}

impl SignedHead {
    pub fn message(tree_size: u64, timestamp_ms: u64, root: &Hash) -> Vec<u8> {
        let mut m = HEAD_DOMAIN.to_vec();
        m.extend_from_slice(&tree_size.to_be_bytes());
        m.extend_from_slice(&timestamp_ms.to_be_bytes());
        m.extend_from_slice(root);
        m
    }

    /// Checks the signature against a public key (raw 32-byte Ed25519).
    pub fn verify(&self, public_key: &[u8]) -> bool {
        let (Ok(root), Ok(sig)) = (hex::decode(&self.root_hash), hex::decode(&self.signature))
        else {
            return false;
        };
        let Ok(root): Result<Hash, _> = root.try_into() else {
            return false;
        };
        let message = Self::message(self.tree_size, self.timestamp_ms, &root);
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&message, &sig)
            .is_ok()
    }

    pub fn root(&self) -> Option<Hash> {
        hex::decode(&self.root_hash).ok()?.try_into().ok()
    }
}

/// What a client gets for an entry: enough to fetch and check an inclusion proof later.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    pub ledger_index: u64,
    pub entry_hash: String,
    pub tree_size: u64,
    pub root_hash: String,
    pub timestamp_ms: u64,
    pub signature: String,
    pub key_id: String,
}

pub struct Signer {
    key_pair: Ed25519KeyPair,
    pub key_id: String,
}

impl Signer {
    /// Loads the ledger key from the data directory, making it (mode 0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Signer, LedgerError> {
        let path = data_dir.join(KEY_FILE);
        let pkcs8 = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(data_dir, &path)?,
            Err(e) => {
                return Err(LedgerError::Key(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let key_pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| LedgerError::Key(format!("{}: {e}", path.display())))?;
        let key_id = key_id(key_pair.public_key().as_ref());
        Ok(Signer { key_pair, key_id })
    }

    pub fn public_key(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }

    /// Signs a settlement statement (its message has its own header, so it
    /// can never be taken for a head).
    pub fn sign_statement(&self, statement: &settlement::Statement) -> String {
        hex::encode(self.key_pair.sign(&statement.message()).as_ref())
    }

    pub fn sign_head(&self, tree_size: u64, root: &Hash) -> SignedHead {
        let timestamp_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let sig = self
            .key_pair
            .sign(&SignedHead::message(tree_size, timestamp_ms, root));
        SignedHead {
            tree_size,
            timestamp_ms,
            root_hash: hex::encode(root),
            signature: hex::encode(sig.as_ref()),
            key_id: self.key_id.clone(),
        }
    }
}

pub fn key_id(public_key: &[u8]) -> String {
    sha256_hex(public_key)[..16].to_string()
}

fn create_key(data_dir: &Path, path: &Path) -> Result<Vec<u8>, LedgerError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| LedgerError::Key(e.to_string()))?;
    let key_pair =
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| LedgerError::Key(e.to_string()))?;
    let io = |e: std::io::Error| LedgerError::Key(format!("cannot write {}: {e}", path.display()));
    std::fs::create_dir_all(data_dir).map_err(io)?;
    crate::util::write_secret(path, pkcs8.as_ref()).map_err(io)?;
    std::fs::write(
        data_dir.join(PUBLIC_KEY_FILE),
        hex::encode(key_pair.public_key().as_ref()),
    )
    .map_err(io)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(pkcs8.as_ref().to_vec())
}

/// One entry to append.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub entry: Entry,
    /// Kept beside the tree so retention can delete it without breaking proofs.
    pub sql: Option<String>,
    /// The answer this entry charged for, kept for repetition in the same
    /// transaction (see `store::keep_answer`).
    pub answer: Option<Arc<crate::store::ReleasedAnswer>>,
}

impl NewEntry {
    pub fn event(event: LedgerEvent) -> NewEntry {
        NewEntry {
            entry: Entry::now(event),
            sql: None,
            answer: None,
        }
    }
}

/// The tree as the server knows it: its right edge (enough to append and
/// to compute the root) and the latest signed head. Everything older is
/// read from the stored nodes when a proof needs it.
#[derive(Default)]
pub struct View {
    pub frontier: Frontier,
    pub head: Option<SignedHead>,
}

pub fn open_connection(data_dir: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open(data_dir.join("frostglass.db"))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Appends touch index pages all over a large ledger (usage by day,
    // principal, grant); SQLite's default 2 MiB page cache made them disk
    // reads once the file outgrew it.
    conn.pragma_update(None, "cache_size", -65536)?;
    tables::create(&conn)?;
    Ok(conn)
}

/// What one transaction appended: the index of its first entry and the
/// leaf hashes, in order.
#[derive(Debug, Clone)]
pub struct Appended {
    first: u64,
    leaves: Vec<Hash>,
}

impl Appended {
    /// The receipts of these entries under `head`, a checkpoint that covers them.
    pub fn receipts(&self, head: &SignedHead) -> Vec<Receipt> {
        self.leaves
            .iter()
            .enumerate()
            .map(|(i, leaf)| Receipt {
                ledger_index: self.first + i as u64,
                entry_hash: hex::encode(leaf),
                tree_size: head.tree_size,
                root_hash: head.root_hash.clone(),
                timestamp_ms: head.timestamp_ms,
                signature: head.signature.clone(),
                key_id: head.key_id.clone(),
            })
            .collect()
    }
}

/// Appends entries; owns a connection and shares its view of the tree.
pub struct Writer {
    conn: Connection,
    signer: Signer,
    view: Arc<Mutex<View>>,
    startup: Startup,
}

/// What opening the ledger read: the verified checkpoint it started from,
/// and the entries after it that it re-hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startup {
    pub checkpoint: u64,
    pub tail_entries: u64,
}

fn lock(view: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    view.lock().unwrap_or_else(|p| p.into_inner())
}

impl Writer {
    pub fn open(data_dir: &Path) -> Result<Writer, LedgerError> {
        let conn = open_connection(data_dir)?;
        let signer = Signer::load_or_create(data_dir)?;
        let mut view = View::default();
        let startup = start_from_checkpoint(&conn, &mut view, signer.public_key())?;
        Ok(Writer {
            conn,
            signer,
            view: Arc::new(Mutex::new(view)),
            startup,
        })
    }

    pub fn startup(&self) -> Startup {
        self.startup
    }

    pub fn view(&self) -> Arc<Mutex<View>> {
        self.view.clone()
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.signer.public_key().to_vec()
    }

    /// Appends all entries in one durable transaction and signs the new head.
    pub fn append(&mut self, entries: &[NewEntry]) -> Result<Vec<Receipt>, LedgerError> {
        let (appended, head, ()) = self.transact(true, |_| Ok((entries.to_vec(), ())))?;
        Ok(head.map(|h| appended.receipts(&h)).unwrap_or_default())
    }

    /// Appends all entries in one durable transaction, signing the new head
    /// only when `sign` says so (the server's committer signs checkpoints on
    /// a cadence, not every commit).
    pub fn append_checkpointed(
        &mut self,
        entries: &[NewEntry],
        sign: bool,
    ) -> Result<(Appended, Option<SignedHead>), LedgerError> {
        let (appended, head, ()) = self.transact(sign, |_| Ok((entries.to_vec(), ())))?;
        Ok((appended, head))
    }

    /// Makes a state change and appends the entries that record it in one
    /// transaction: `change` writes the store through the transaction and
    /// returns the entries; either both commit or neither does.
    pub fn commit<T>(
        &mut self,
        change: impl FnOnce(&Connection) -> Result<(Vec<LedgerEvent>, T), LedgerError>,
    ) -> Result<(Vec<Receipt>, T), LedgerError> {
        let (appended, head, value) = self.transact(true, |tx| {
            let (events, value) = change(tx)?;
            Ok((events.into_iter().map(NewEntry::event).collect(), value))
        })?;
        Ok((
            head.map(|h| appended.receipts(&h)).unwrap_or_default(),
            value,
        ))
    }

    fn transact<T>(
        &mut self,
        sign: bool,
        change: impl FnOnce(&Connection) -> Result<(Vec<NewEntry>, T), LedgerError>,
    ) -> Result<(Appended, Option<SignedHead>, T), LedgerError> {
        let mut view = lock(&self.view);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Others (the CLI, another process) may have appended since we last looked.
        catch_up(&tx, &mut view, false)?;
        let (entries, value) = change(&tx)?;
        let mut frontier = view.frontier.clone();
        let mut new_leaves = Vec::with_capacity(entries.len());
        for e in &entries {
            let index = frontier.len();
            let body = e.entry.body();
            let leaf = merkle::leaf_hash(body.as_bytes());
            tables::insert(
                &tx,
                index,
                &e.entry,
                &body,
                &hex::encode(leaf),
                e.sql.as_deref(),
            )?;
            let mut stored = Ok(());
            frontier.push_completing(leaf, |level, i, hash| {
                if stored.is_ok() {
                    stored = tables::insert_node(&tx, level, i, hash);
                }
            });
            stored?;
            if let Some(answer) = &e.answer {
                crate::store::keep_answer(&tx, answer)?;
            }
            new_leaves.push(leaf);
        }
        let head = sign.then(|| self.signer.sign_head(frontier.len(), &frontier.root()));
        if let Some(head) = &head {
            save_head(&tx, head)?;
        }
        crate::util::failpoint("ledger_before_commit");
        tx.commit()?;
        let appended = Appended {
            first: view.frontier.len(),
            leaves: new_leaves,
        };
        view.frontier = frontier;
        if let Some(head) = &head {
            view.head = Some(head.clone());
        }
        Ok((appended, head, value))
    }

    /// A fresh signed head of the current tree (after catching up on others' appends).
    pub fn sign_current(&mut self) -> Result<SignedHead, LedgerError> {
        let mut view = lock(&self.view);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        catch_up(&tx, &mut view, false)?;
        if let Some(head) = &view.head
            && head.tree_size == view.frontier.len()
        {
            return Ok(head.clone());
        }
        let head = self
            .signer
            .sign_head(view.frontier.len(), &view.frontier.root());
        save_head(&tx, &head)?;
        tx.commit()?;
        view.head = Some(head.clone());
        Ok(head)
    }
}

/// Start-up in time proportional to what is recent: the tree up to the
/// last checkpoint a start-up verified is rebuilt from O(log n) stored nodes
/// and checked against its signed head; every entry after it is re-hashed,
/// its stored nodes compared, and every head after it checked. The whole
/// history is `verify`'s (a linear pass), not every start's.
fn start_from_checkpoint(
    conn: &Connection,
    view: &mut View,
    public_key: &[u8],
) -> Result<Startup, LedgerError> {
    let verified = tables::verified_size(conn)?;
    if verified > 0 {
        let nodes = tables::StoredNodes::new(conn);
        let head = head_at(conn, verified)?.ok_or_else(|| {
            LedgerError::Corrupt(format!("the verified checkpoint at {verified} is missing"))
        })?;
        view.frontier = Frontier::at(&nodes, verified).ok_or_else(|| {
            LedgerError::Corrupt(format!("tree nodes below {verified} are missing"))
        })?;
        if !head.verify(public_key) || head.root() != Some(view.frontier.root()) {
            return Err(LedgerError::Corrupt(format!(
                "the entries before {verified} differ from what was signed"
            )));
        }
        view.head = Some(head);
    }
    let start = view.frontier.clone();
    let tail = catch_up(conn, view, true)?;
    let later = heads_after(conn, verified)?;
    check_heads_from(start, &tail, &later, public_key)
        .map_err(|f| LedgerError::Corrupt(f.reason))?;
    if let Some(last) = later.last() {
        view.head = Some(last.clone());
    }
    if view.head.as_ref().map(|h| h.tree_size) == Some(view.frontier.len()) {
        tables::set_verified_size(conn, view.frontier.len())?;
    }
    Ok(Startup {
        checkpoint: verified,
        tail_entries: tail.len() as u64,
    })
}

/// Reads the entries appended since `view` last looked, recomputing each
/// leaf from its body: an entry whose body no longer matches its hash, or a
/// gap in the indexes, is corruption and is reported, never skipped. With
/// `check_nodes`, the stored tree nodes they completed are compared too.
/// Returns the new leaves.
fn catch_up(
    conn: &Connection,
    view: &mut View,
    check_nodes: bool,
) -> Result<Vec<Hash>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx, body, leaf_hash FROM usage_log WHERE idx >= ?1 ORDER BY idx",
    )?;
    let mut rows = stmt.query([view.frontier.len() as i64])?;
    let nodes = tables::StoredNodes::new(conn);
    let mut leaves = Vec::new();
    while let Some(row) = rows.next()? {
        let idx: i64 = row.get(0)?;
        let body: String = row.get(1)?;
        let stored: String = row.get(2)?;
        if idx as u64 != view.frontier.len() {
            return Err(LedgerError::Corrupt(format!(
                "entry {} is missing",
                view.frontier.len()
            )));
        }
        let leaf = merkle::leaf_hash(body.as_bytes());
        if hex::encode(leaf) != stored {
            return Err(LedgerError::Corrupt(format!(
                "entry {idx} does not match its leaf hash"
            )));
        }
        let mut wrong_node = false;
        view.frontier.push_completing(leaf, |level, i, hash| {
            wrong_node |= check_nodes && nodes.perfect(level, i) != Some(*hash);
        });
        if wrong_node {
            return Err(LedgerError::Corrupt(format!(
                "a stored tree node completed by entry {idx} does not match the entries"
            )));
        }
        leaves.push(leaf);
    }
    Ok(leaves)
}

/// A signed head that does not match the entries: the first index not
/// covered by a good head, and why.
#[derive(Debug)]
pub struct HeadFailure {
    pub index: u64,
    pub reason: String,
}

/// Checks every signed head against the leaves in one linear pass: each is
/// signed by `public_key` and is the root of its prefix. Used at start and
/// by `verify`.
pub fn check_heads(
    leaves: &[Hash],
    heads: &[SignedHead],
    public_key: &[u8],
) -> Result<(), HeadFailure> {
    check_heads_from(Frontier::default(), leaves, heads, public_key)
}

/// As [`check_heads`], for the heads of a tree whose first `start.len()`
/// leaves are already checked (`start` is their frontier) and `leaves`
/// follow.
pub fn check_heads_from(
    start: Frontier,
    leaves: &[Hash],
    heads: &[SignedHead],
    public_key: &[u8],
) -> Result<(), HeadFailure> {
    let offset = start.len();
    let n = offset + leaves.len() as u64;
    let mut frontier = start;
    let mut verified_up_to = offset;
    let mut sorted: Vec<&SignedHead> = heads.iter().collect();
    sorted.sort_by_key(|h| h.tree_size);
    for head in sorted {
        if !head.verify(public_key) {
            return Err(HeadFailure {
                index: verified_up_to,
                reason: format!("the head at size {} has a bad signature", head.tree_size),
            });
        }
        if head.tree_size > n {
            return Err(HeadFailure {
                index: n,
                reason: format!(
                    "a signed head covers {} entries but only {n} exist: the log was truncated",
                    head.tree_size
                ),
            });
        }
        if head.tree_size < offset {
            continue;
        }
        while frontier.len() < head.tree_size {
            frontier.push(leaves[(frontier.len() - offset) as usize]);
        }
        if Some(frontier.root()) != head.root() {
            return Err(HeadFailure {
                index: verified_up_to,
                reason: format!(
                    "entries in [{verified_up_to}, {}) differ from what the head at size {} signed",
                    head.tree_size, head.tree_size
                ),
            });
        }
        verified_up_to = head.tree_size;
    }
    Ok(())
}

fn save_head(conn: &Connection, head: &SignedHead) -> Result<(), LedgerError> {
    conn.run(
        "INSERT OR REPLACE INTO tree_heads (tree_size, timestamp_ms, root_hash, signature, key_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![head.tree_size as i64, head.timestamp_ms as i64, head.root_hash, head.signature, head.key_id],
    )?;
    Ok(())
}

/// The signed heads of trees larger than `size`, in order.
fn heads_after(conn: &Connection, size: u64) -> Result<Vec<SignedHead>, LedgerError> {
    let mut stmt = conn.prepare(
        "SELECT tree_size, timestamp_ms, root_hash, signature, key_id FROM tree_heads WHERE tree_size > ?1 ORDER BY tree_size",
    )?;
    let rows = stmt.query_map([size as i64], head_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn head_at(conn: &Connection, size: u64) -> Result<Option<SignedHead>, LedgerError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT tree_size, timestamp_ms, root_hash, signature, key_id FROM tree_heads WHERE tree_size = ?1",
            [size as i64],
            head_row,
        )
        .optional()?)
}

fn head_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SignedHead> {
    Ok(SignedHead {
        tree_size: r.get::<_, i64>(0)? as u64,
        timestamp_ms: r.get::<_, i64>(1)? as u64,
        root_hash: r.get(2)?,
        signature: r.get(3)?,
        key_id: r.get(4)?,
    })
}

pub fn heads(conn: &Connection) -> Result<Vec<SignedHead>, LedgerError> {
    heads_after(conn, 0).map(|mut heads| {
        if let Ok(Some(empty)) = head_at(conn, 0) {
            heads.insert(0, empty);
        }
        heads
    })
}

enum Job {
    Append(
        Box<NewEntry>,
        tokio::sync::oneshot::Sender<Result<Receipt, String>>,
    ),
    Head(tokio::sync::oneshot::Sender<Result<SignedHead, String>>),
    /// A state change committed with its entries (see [`Ledger::commit`]).
    Run(Box<dyn FnOnce(&mut Writer) + Send>),
}

/// The server's handle on the ledger: appends are batched by a committer
/// thread (group commit); reads use the shared view.
pub struct Ledger {
    jobs: Mutex<mpsc::Sender<Job>>,
    view: Arc<Mutex<View>>,
    public_key: Vec<u8>,
    /// For the roll-ups and entries; never used to write.
    reader: Mutex<Connection>,
}

/// Most jobs taken between two looks at the clock, and most appends left
/// waiting uncommitted for a checkpoint.
const MAX_BATCH: usize = 512;

/// Entries waiting for a checkpoint to cover them, with who waits.
type Waiting = Vec<(Appended, Vec<Reply>)>;

/// The ledger thread: group commit, and checkpoints on a cadence. An
/// append's receipt (and so the answer it belongs to) waits for a signed
/// checkpoint covering it, so appends wait for the next checkpoint
/// uncommitted and go into its transaction together: one commit per
/// checkpoint under load, not one per handful of appends. A checkpoint is
/// due `interval` after the previous one — at once when the ledger was
/// idle — and is taken then if anything waits for it: at most one
/// signature per interval however fast appends come, and no wait beyond
/// the interval. Nothing is acknowledged before its transaction commits.
struct Committer {
    writer: Writer,
    interval: Duration,
    last_signed: Instant,
    /// Committed entries a checkpoint does not cover yet, with who waits.
    waiting: Waiting,
    /// Appends not yet committed, with who waits.
    pending: Vec<(NewEntry, Reply)>,
}

type Reply = tokio::sync::oneshot::Sender<Result<Receipt, String>>;

impl Committer {
    fn new(writer: Writer, interval: Duration) -> Committer {
        Committer {
            writer,
            interval,
            last_signed: Instant::now()
                .checked_sub(interval)
                .unwrap_or_else(Instant::now),
            waiting: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            let idle = self.pending.is_empty() && self.waiting.is_empty();
            let job = if idle {
                match rx.recv() {
                    Ok(job) => Some(job),
                    Err(_) => return,
                }
            } else {
                let due = self.last_signed + self.interval;
                match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        self.checkpoint();
                        return;
                    }
                }
            };
            // At most a batch of jobs between two looks at the clock, so a
            // flood cannot hold a due checkpoint back.
            let mut next = job;
            let mut taken = 0;
            while let Some(job) = next.take() {
                self.take(job);
                taken += 1;
                if taken < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if self.last_signed.elapsed() >= self.interval {
                self.checkpoint();
            } else if self.pending.len() >= MAX_BATCH {
                // Durable now, signed when due: memory stays bounded.
                self.commit(false);
            }
        }
    }

    fn take(&mut self, job: Job) {
        if !matches!(job, Job::Append(..)) && !self.pending.is_empty() {
            // Appends that came first are recorded first.
            self.commit(false);
        }
        match job {
            Job::Append(entry, reply) => self.pending.push((*entry, reply)),
            Job::Head(reply) => {
                let head = self.writer.sign_current();
                let _ = reply.send(head.as_ref().map(Clone::clone).map_err(|e| e.to_string()));
                self.settle(head);
            }
            Job::Run(change) => {
                // Commits its own transaction, signed; the entries
                // waiting for a checkpoint get one too.
                change(&mut self.writer);
                let head = self.writer.sign_current();
                self.settle(head);
            }
        }
    }

    /// Signs a checkpoint over everything committed and pending, in the
    /// pending appends' transaction when there are any.
    fn checkpoint(&mut self) {
        if !self.pending.is_empty() {
            self.commit(true);
        } else if !self.waiting.is_empty() {
            let head = self.writer.sign_current();
            self.settle(head);
        }
    }

    /// Commits the pending appends in one transaction, signed if `sign`.
    fn commit(&mut self, sign: bool) {
        let (entries, replies): (Vec<NewEntry>, Vec<Reply>) = self.pending.drain(..).unzip();
        match self.writer.append_checkpointed(&entries, sign) {
            Ok((appended, head)) => {
                self.waiting.push((appended, replies));
                if let Some(head) = head {
                    self.settle(Ok(head));
                }
            }
            Err(e) => {
                // A commit that may not be on disk must not be answered
                // around: stop, and let the restart recover from what is durable.
                tracing::error!(error = %e, "ledger commit failed; stopping");
                for reply in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
                std::process::abort();
            }
        }
    }

    /// Answers everyone waiting with receipts under `head`, which covers them.
    fn settle(&mut self, head: Result<SignedHead, LedgerError>) {
        let head = match head {
            Ok(head) => head,
            Err(e) => {
                tracing::error!(error = %e, "signing a checkpoint failed; stopping");
                for (_, replies) in self.waiting.drain(..) {
                    for reply in replies {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
                std::process::abort();
            }
        };
        self.last_signed = Instant::now();
        for (appended, replies) in self.waiting.drain(..) {
            for (reply, receipt) in replies.into_iter().zip(appended.receipts(&head)) {
                let _ = reply.send(Ok(receipt));
            }
        }
    }
}

impl Ledger {
    /// Starts the committer. `checkpoint_interval`: the least time between
    /// two signed checkpoints while appends keep coming (zero: one per commit).
    pub fn start(data_dir: &Path, checkpoint_interval: Duration) -> Result<Ledger, LedgerError> {
        let writer = Writer::open(data_dir)?;
        let view = writer.view();
        let public_key = writer.public_key();
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fg-ledger".into())
            .spawn(move || Committer::new(writer, checkpoint_interval).run(rx))
            .map_err(|e| LedgerError::Key(format!("cannot start the ledger thread: {e}")))?;
        Ok(Ledger {
            jobs: Mutex::new(tx),
            view,
            public_key,
            reader: Mutex::new(open_connection(data_dir)?),
        })
    }

    /// Appends one entry; resolves once it is durable.
    pub async fn append(&self, entry: NewEntry) -> Result<Receipt, LedgerError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Append(Box::new(entry), reply))?;
        rx.await
            .map_err(|_| LedgerError::Stopped)?
            .map_err(LedgerError::Corrupt)
    }

    /// Makes a state change and appends the entries recording it in one
    /// durable transaction on the ledger's own connection (as
    /// [`Writer::commit`]); resolves with their receipts once committed.
    pub async fn commit<T: Send + 'static>(
        &self,
        change: impl FnOnce(&Connection) -> Result<(Vec<LedgerEvent>, T), LedgerError> + Send + 'static,
    ) -> Result<(Vec<Receipt>, T), LedgerError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Run(Box::new(move |writer: &mut Writer| {
            let _ = reply.send(writer.commit(change));
        })))?;
        rx.await.map_err(|_| LedgerError::Stopped)?
    }

    fn send(&self, job: Job) -> Result<(), LedgerError> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| LedgerError::Stopped)
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    pub fn key_id(&self) -> String {
        key_id(&self.public_key)
    }

    /// The latest signed head; signs a fresh one if others (the CLI) appended since.
    pub async fn head(&self) -> Result<SignedHead, LedgerError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Head(reply))?;
        rx.await
            .map_err(|_| LedgerError::Stopped)?
            .map_err(LedgerError::Corrupt)
    }

    pub fn size(&self) -> u64 {
        lock(&self.view).frontier.len()
    }

    /// Runs `f` over the stored tree nodes of a tree of at most the
    /// committed size, on the reader connection: never under the append lock.
    fn with_nodes<T>(
        &self,
        size: u64,
        f: impl FnOnce(&tables::StoredNodes<'_>) -> Option<T>,
    ) -> Option<T> {
        if size > self.size() {
            return None;
        }
        let reader = self.reader();
        f(&tables::StoredNodes::new(&reader))
    }

    pub fn inclusion_proof(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        self.with_nodes(size, |nodes| merkle::inclusion_path(nodes, index, size))
    }

    pub fn consistency_proof(&self, from: u64, to: u64) -> Option<Vec<Hash>> {
        self.with_nodes(to, |nodes| merkle::consistency_path(nodes, from, to))
    }

    pub fn root_at(&self, size: u64) -> Option<Hash> {
        self.with_nodes(size, |nodes| merkle::range_root(nodes, 0, size))
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a grant used today (UTC), from the roll-up the appends keep.
    pub fn used_today(&self, grant: &str) -> Result<crate::accounting::DailyUse, LedgerError> {
        tables::used_on(&self.reader(), grant, &crate::util::today())
    }

    /// Signs `statement` with the ledger key (on the ledger thread, which holds it).
    pub async fn sign_statement(
        &self,
        mut statement: settlement::Statement,
    ) -> Result<settlement::Statement, LedgerError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Run(Box::new(move |writer: &mut Writer| {
            statement.signature = writer.signer.sign_statement(&statement);
            let _ = reply.send(statement);
        })))?;
        rx.await.map_err(|_| LedgerError::Stopped)
    }

    /// The indexes of the entries filed under `key` (`LedgerEvent::lookup_keys`).
    pub fn entries_by_key(&self, key: &str) -> Result<Vec<u64>, LedgerError> {
        tables::entries_by_key(&self.reader(), key)
    }

    /// Answered queries of a grant this calendar month (UTC).
    pub fn queries_this_month(&self, grant: &str) -> Result<u64, LedgerError> {
        let today = crate::util::today();
        tables::queries_in_month(&self.reader(), grant, today.get(..7).unwrap_or(&today))
    }

    /// Epsilon charged to a budget (`grant:<id>` or `dataset:<id>`), from the roll-up.
    pub fn epsilon_spent(&self, budget: &str) -> Result<f64, LedgerError> {
        tables::epsilon_spent(&self.reader(), budget)
    }

    /// The version key (`event::version_key`) each dataset was last registered with.
    pub fn registered_manifests(
        &self,
    ) -> Result<std::collections::HashMap<String, String>, LedgerError> {
        tables::registered_manifests(&self.reader())
    }

    /// The usage roll-ups (see `usage::UsageRollup`).
    pub fn usage_rollups(&self) -> Result<Vec<usage::UsageRollup>, LedgerError> {
        tables::usage_rollups(&self.reader())
    }

    /// Refusals since `since_day`, grouped (see `history::refusals`).
    pub fn refusals(&self, since_day: &str) -> Result<Vec<history::Refusals>, LedgerError> {
        history::refusals(&self.reader(), since_day)
    }

    /// The most recent queries of `principal`, newest first.
    pub fn recent_queries(
        &self,
        principal: &str,
        limit: u64,
    ) -> Result<Vec<history::PastQuery>, LedgerError> {
        history::recent_queries(&self.reader(), principal, limit)
    }

    /// ε charged to `budget` per day, over the entries not yet archived.
    pub fn epsilon_by_day(&self, budget: &str) -> Result<Vec<(String, f64)>, LedgerError> {
        history::epsilon_by_day(&self.reader(), budget)
    }

    /// Entry bodies in index order: (index, body, leaf hash).
    /// Archived entries' bodies are read back from their segments.
    pub fn entries(
        &self,
        from: u64,
        limit: u64,
    ) -> Result<Vec<(u64, String, String)>, LedgerError> {
        let reader = self.reader();
        let mut entries = tables::entries(&reader, from, limit)?;
        let mut archived = archive::ArchivedBodies::open(&reader)?;
        for (index, body, _) in &mut entries {
            *body = archived
                .fill(*index, body)
                .map(|b| b.into_owned())
                .map_err(LedgerError::Corrupt)?;
        }
        Ok(entries)
    }
}
