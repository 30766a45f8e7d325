//! Entry points of the fuzz targets in `fuzz/` (run with `scripts/fuzz.sh`).
//!
//! Each takes arbitrary bytes and must return — never panic, abort or hang.
//! `cargo test` replays the seed corpus and every saved crash through the
//! same functions on stable Rust (`tests/api/fuzz_replay.rs`), so a crash
//! found once stays fixed.

use crate::catalog::{Catalog, Manifest};
use crate::config::Limits;
use crate::engine::Engine;
use crate::error::Error;
use crate::ledger::SignedHead;
use crate::ledger::merkle::{self, Hash};
use crate::ledger::usage::UsageRecord;
use crate::policy::check::Requester;
use crate::policy::{Classification, Levels, Policies, Prohibitions};
use crate::validate::{self, Schemas};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The purpose the gate narrows consent to.
const PURPOSE: &str = "public_health_research";

/// The SQL gate over the demo catalog: what the sandbox does to a buyer's
/// SQL before anything runs.
struct Gate {
    engine: Engine,
    catalog: Catalog,
    policies: Policies,
    runtime: tokio::runtime::Runtime,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(Schemas::compiled)
}

fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| {
        // Planning runs on threads with the stack the server gives queries.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_stack_size(64 * 1024 * 1024)
            .enable_all()
            .build()
            .expect("a fuzz run needs a runtime");
        let dir = demo_catalog();
        let catalog = runtime
            .block_on(Catalog::load(&dir, schemas()))
            .expect("the demo catalog loads");
        let policies =
            Policies::load(&repo().join("policies"), schemas()).expect("the policies load");
        Gate {
            engine: Engine::new(Limits::default()),
            catalog,
            policies,
            runtime,
        }
    })
}

/// The repository's manifests over a tiny generated dataset, made once per process.
fn demo_catalog() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("frostglass-fuzz-{}", std::process::id()));
    crate::demo::catalog_folder(&repo().join("catalog"), &dir, &[], 0.001, |_| {})
        .expect("the demo catalog is written");
    dir
}

impl Gate {
    async fn check(&self, sql: &str) -> Result<(), Error> {
        let statement = self.engine.parse(sql)?;
        let mut tables = Vec::new();
        for reference in self.engine.table_references(&statement)? {
            let dataset = self
                .catalog
                .get(reference.table())
                .ok_or_else(|| Error::UnknownTable(reference.table().to_string()))?;
            tables.push(dataset.clone());
        }
        let requester = Requester {
            region: "CN",
            cross_border_assessment: false,
        };
        let (_, plan) = crate::pipeline::gate::checked_plan(
            &self.engine,
            &tables,
            statement,
            &self.catalog,
            &self.policies,
            &requester,
        )
        .await?;
        let (plan, _) = crate::release::filter_consent(plan, &self.catalog, PURPOSE)?;
        crate::release::split(
            &plan,
            &self.catalog,
            &self.policies,
            true,
            &Default::default(),
        )?;
        Ok(())
    }
}

/// Parse, plan, policy check, consent filter and release split of arbitrary
/// SQL; the outcome (accepted or refused) does not matter, returning does.
pub fn sql_gate(data: &[u8]) -> Option<Result<(), Error>> {
    let sql = std::str::from_utf8(data).ok()?.to_string();
    let gate = gate();
    let outcome = gate
        .runtime
        .block_on(gate.runtime.spawn(async move { gate.check(&sql).await }));
    // A panic inside the gate surfaces here, as it would in the server.
    Some(outcome.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
}

/// The manifest and policy validators on arbitrary text.
pub fn validators(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.json");
    let s = schemas();
    if let Ok(m) = validate::parse_validated::<Manifest>(file, text, &s.dataset) {
        let _ = m.semantic_problems();
    }
    let _ = validate::parse_validated::<Classification>(file, text, &s.classification);
    let _ = validate::parse_validated::<Levels>(file, text, &s.levels);
    let _ = validate::parse_validated::<Prohibitions>(file, text, &s.prohibitions);
}

/// The ledger's decoders on arbitrary bytes: an entry body read as a usage
/// record, a signed head (decoded and checked), and — from the raw bytes —
/// inclusion and consistency proofs (two sizes, then 32-byte hashes).
pub fn ledger_record(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = UsageRecord::from_entry(0, text);
        if let Ok(head) = serde_json::from_str::<SignedHead>(text) {
            let _ = head.root();
            let _ = head.verify(&[7u8; 32]);
        }
    }
    let Some((sizes, rest)) = data.split_first_chunk::<16>() else {
        return;
    };
    let a = u64::from_le_bytes(sizes[..8].try_into().unwrap_or_default());
    let b = u64::from_le_bytes(sizes[8..].try_into().unwrap_or_default());
    let hashes: Vec<Hash> = rest
        .chunks_exact(32)
        .filter_map(|c| c.try_into().ok())
        .collect();
    let (first, proof) = match hashes.split_first() {
        Some((h, p)) => (*h, p),
        None => ([0u8; 32], &[][..]),
    };
    let _ = merkle::verify_inclusion(&first, a, b, proof, &first);
    let _ = merkle::verify_consistency(a, b, &first, &first, proof);
    let _ = merkle::root(&hashes);
}
