//! Owners run their listings while the sandbox serves: register, update
//! and withdraw datasets. A version is checked before the owner gets an
//! answer (schema, owner, domain root, data against manifest); prepared in
//! the background at the lowest CPU priority (counts, digests, unit
//! summaries, in-memory copy, quality card); committed (manifest, card and
//! ledger entries in one transaction, the card's ε charged there); and
//! only then swapped into the catalog queries read. A crash before the
//! commit leaves the catalog as it was.
//!
//! Manifest files in `catalog/` and registrations over HTTP land in one
//! registry: a dataset registered, updated or withdrawn over HTTP is kept
//! in the state store and wins over a file with the same id.

use super::{Sandbox, StartError};
use crate::catalog::location::{self, LocationError};
use crate::catalog::{self, Catalog, CatalogError, Dataset, Manifest};
use crate::error::Error;
use crate::ledger::event::{LedgerEvent, version_key};
use crate::ledger::tables;
use crate::release::quality;
use crate::store::{self, Principal, Store};
use crate::validate::{self, Schemas};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The catalog at start-up: the files in `catalog/`, with what owners
/// registered over HTTP put over them. A registered dataset whose data
/// cannot be opened any more is left out and reported (id, owner, reason)
/// rather than stopping the server; a bad file still stops it.
pub async fn load_catalog(
    dir: &Path,
    schemas: &Schemas,
    store: &Store,
) -> Result<(Catalog, Vec<(String, String, String)>), StartError> {
    let registered = store.registered_datasets()?;
    let withdrawn: BTreeSet<&str> = registered
        .iter()
        .filter(|r| r.withdrawn)
        .map(|r| r.id.as_str())
        .collect();
    let mut over_files = BTreeMap::new();
    for r in registered.iter().filter(|r| !r.withdrawn) {
        let manifest: Manifest = serde_json::from_str(&r.manifest).map_err(|e| {
            StartError::Config(format!(
                "the stored manifest of '{}' is unreadable: {e}",
                r.id
            ))
        })?;
        over_files.insert(r.id.clone(), manifest);
    }
    let mut catalog = Catalog::default();
    for (path, manifest) in catalog::read_manifests(dir, schemas)? {
        if withdrawn.contains(manifest.id.as_str()) || over_files.contains_key(&manifest.id) {
            continue;
        }
        let dataset = catalog::open_dataset(dir, path, manifest).await?;
        catalog
            .datasets
            .insert(dataset.id().to_string(), Arc::new(dataset));
    }
    let mut unavailable = Vec::new();
    for (id, manifest) in over_files {
        let owner = manifest.owner.clone();
        match catalog::open_dataset(dir, registry_path(&id), manifest).await {
            Ok(dataset) => {
                catalog.datasets.insert(id, Arc::new(dataset));
            }
            Err(e) => {
                // The reason may quote the data (a parse error): its owner
                // reads it in the dataset's status, the log does not.
                tracing::error!(dataset = %id, "a registered dataset cannot be opened");
                unavailable.push((id, owner, e.to_string()));
            }
        }
    }
    Ok((catalog, unavailable))
}

/// Where a dataset registered over HTTP "lives" as a manifest.
fn registry_path(id: &str) -> PathBuf {
    PathBuf::from(format!("registry:{id}"))
}

/// Gives every dataset of the start-up catalog its quality card: the one
/// stored for its version, else a fresh one, charged and recorded.
pub async fn evaluate_catalog(sandbox: &Sandbox) -> Result<(), StartError> {
    for dataset in sandbox.catalog.current().datasets.values() {
        let key = version_key(&dataset.manifest_sha256, Some(&dataset.data_sha256));
        let card = match sandbox.store.quality_card(dataset.id(), &key)? {
            Some(stored) => serde_json::from_str(&stored).unwrap_or(Value::Null),
            None => match evaluate(sandbox, dataset, None).await {
                Ok(card) => card,
                Err(e) => {
                    tracing::warn!(dataset = %dataset.id(), code = e.code(), "no quality card");
                    continue;
                }
            },
        };
        let _ = dataset.quality.set(card);
    }
    Ok(())
}

/// What an owner registration commits beside the card: the manifest, as
/// the active version, and who registered it.
struct Registration {
    by: String,
    manifest_json: String,
}

/// Computes `dataset`'s card and commits it in one transaction: its ε
/// charged to the lifetime budget (refused if that cannot pay), the card
/// stored for the version, and — for a registration — the manifest saved
/// as the active version; all recorded on the ledger.
async fn evaluate(
    sandbox: &Sandbox,
    dataset: &Dataset,
    registration: Option<Registration>,
) -> Result<Value, Error> {
    let lifetime = sandbox.lifetime_epsilon(&dataset.manifest);
    let epsilon = quality::epsilon_for(dataset, lifetime);
    let card = quality::evaluate(dataset, epsilon)
        .await
        .map_err(|e| Error::Internal(format!("evaluating the dataset failed: {e}")))?;
    let card_json = card.to_string();
    let id = dataset.id().to_string();
    let m = &dataset.manifest;
    let key = version_key(&dataset.manifest_sha256, Some(&dataset.data_sha256));
    let evaluated = LedgerEvent::DatasetEvaluated {
        dataset: id.clone(),
        manifest_sha256: dataset.manifest_sha256.clone(),
        data_sha256: dataset.data_sha256.clone(),
        epsilon,
        card_sha256: crate::util::sha256_hex(card_json.as_bytes()),
    };
    let mut registered = LedgerEvent::DatasetRegistered {
        dataset: id.clone(),
        owner: m.owner.clone(),
        level: m.level.as_str().to_string(),
        manifest_sha256: dataset.manifest_sha256.clone(),
        rows: dataset.num_rows,
        data_sha256: Some(dataset.data_sha256.clone()),
        version: None,
        by: None,
        pricing: m.pricing.clone(),
    };
    let owner = m.owner.clone();
    let budget = format!("dataset:{id}");
    let result = sandbox
        .ledger
        .commit(move |tx| {
            // Refusals write nothing and record nothing.
            let spent = tables::epsilon_spent(tx, &budget)?;
            if epsilon > 0.0 && spent + epsilon > lifetime {
                let left = (lifetime - spent).max(0.0);
                let message = format!(
                    "the lifetime budget of {budget} has {left} epsilon left; the quality card needs {epsilon}"
                );
                return Ok((Vec::new(), Some(Error::BudgetExhausted(message))));
            }
            // Withdrawn while this version was being prepared: it stays so.
            if registration.is_some() && store::is_withdrawn(tx, &id)? {
                let message = format!("dataset '{id}' was withdrawn meanwhile");
                return Ok((Vec::new(), Some(Error::Conflict(message))));
            }
            store::save_quality_card(tx, &id, &key, &card_json)?;
            let mut events = vec![evaluated];
            if let Some(r) = registration {
                let number = store::save_dataset(tx, &id, &owner, &r.manifest_json)?;
                if let LedgerEvent::DatasetRegistered { version, by, .. } = &mut registered {
                    (*version, *by) = (Some(number), Some(r.by));
                }
                events.push(registered);
            }
            Ok((events, None))
        })
        .await?;
    match result {
        (_, None) => Ok(card),
        (_, Some(refused)) => Err(refused),
    }
}

/// Checks a new version of a dataset and starts preparing it: a
/// registration (`update_of` none) or an update of the owner's dataset
/// `update_of`. Answers once preparation has started; the dataset's
/// status then says how it goes.
pub async fn submit(
    sandbox: &Arc<Sandbox>,
    principal: &Principal,
    body: &[u8],
    update_of: Option<&str>,
) -> Result<crate::catalog::registry::Pending, Error> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Error::InvalidRequest(format!("the body is not valid JSON: {e}")))?;
    let problems: Vec<(String, String)> =
        validate::problems(Path::new("manifest"), &value, &sandbox.schemas.dataset)
            .into_iter()
            .map(|p| {
                (
                    if p.path.is_empty() {
                        "/".into()
                    } else {
                        p.path
                    },
                    p.message,
                )
            })
            .collect();
    if !problems.is_empty() {
        return Err(Error::InvalidManifest(problems));
    }
    let mut manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| Error::InvalidManifest(vec![("/".into(), e.to_string())]))?;
    let problems = manifest.semantic_problems();
    if !problems.is_empty() {
        return Err(Error::InvalidManifest(problems));
    }
    let org = principal.org.as_deref().unwrap_or_default();
    if manifest.owner != org {
        return Err(Error::Forbidden(
            "an owner registers datasets under its own organisation only".into(),
        ));
    }
    let id = manifest.id.clone();
    match update_of {
        None => {
            if sandbox.catalog.get(&id).is_some() || stored(sandbox, &id)?.is_some() {
                return Err(Error::Conflict(format!(
                    "dataset '{id}' exists or was withdrawn; ids are not reused"
                )));
            }
        }
        Some(path_id) => {
            if path_id != id {
                return Err(Error::InvalidManifest(vec![(
                    "/id".into(),
                    format!("the manifest's id must be '{path_id}', the dataset updated"),
                )]));
            }
            let current = owned(sandbox, principal, &id)?;
            if current.manifest.owner != manifest.owner {
                return Err(Error::Forbidden("a dataset's owner cannot change".into()));
            }
        }
    }
    let root = location::owner_root(
        &sandbox.settings.owner_roots,
        &sandbox.settings.data_dir,
        org,
    )
    .map_err(|e| Error::Forbidden(e.to_string()))?;
    let wanted = catalog::data_location(&sandbox.settings.catalog_dir, &manifest);
    let resolved = location::inside_root(&root, &wanted).map_err(|e| match e {
        LocationError::Missing => Error::InvalidManifest(vec![(
            "/source/location".into(),
            "no data at the source location".into(),
        )]),
        other => Error::Forbidden(other.to_string()),
    })?;
    // Recorded resolved, so the version does not depend on where the
    // catalog folder is when the server restarts.
    manifest.source.location = resolved.to_string_lossy().into_owned();
    let inspected = catalog::inspect(resolved, registry_path(&id), manifest)
        .await
        .map_err(|e| match e {
            CatalogError::Mismatch { problems, .. } => Error::InvalidManifest(problems),
            other => Error::InvalidManifest(vec![("/source/location".into(), other.to_string())]),
        })?;
    sandbox
        .catalog
        .begin(&id, org)
        .map_err(|_| Error::Conflict(format!("a version of '{id}' is being registered already")))?;
    let pending = sandbox
        .catalog
        .pending_of(&id)
        .ok_or_else(|| Error::Internal("the registration vanished".into()))?;
    let by = principal.id.clone();
    let background = sandbox.clone();
    sandbox.registrations.spawn(async move {
        let sandbox = background;
        let activated = tokio::select! {
            activated = activate(&sandbox, inspected, by) => activated,
            never = give_way_to_queries(&sandbox) => match never {},
        };
        match activated {
            Ok(dataset) => {
                tracing::info!(dataset = %dataset.id(), "dataset active");
                sandbox.catalog.install(dataset);
            }
            Err(e) => {
                tracing::warn!(dataset = %id, code = e.code(), "registration failed");
                sandbox.catalog.fail(&id, e.public_message());
            }
        }
    });
    Ok(pending)
}

/// How long the registration thread works before it checks for queries.
const WORK_SLICE: std::time::Duration = std::time::Duration::from_millis(4);

/// While queries run, holds the registration thread (and so its work) still
/// for three slices after each one it works: idle CPU priority is not enough,
/// since a core busy scanning slows queries on the other through shared
/// caches and memory (an HTTP flood answered 40% fewer queries beside a
/// registration at idle priority, and beside any CPU-bound process).
async fn give_way_to_queries(sandbox: &Sandbox) -> std::convert::Infallible {
    let slots = sandbox.settings.limits.max_concurrent_queries.max(1);
    loop {
        tokio::time::sleep(WORK_SLICE).await;
        if sandbox.query_slots.available() < slots {
            // Blocks the registration runtime's one worker on purpose.
            std::thread::sleep(3 * WORK_SLICE);
        }
    }
}

/// Prepares a checked version and commits it; the caller swaps it in.
async fn activate(
    sandbox: &Sandbox,
    inspected: catalog::Inspected,
    by: String,
) -> Result<Arc<Dataset>, Error> {
    let id = inspected.manifest().id.clone();
    let manifest_json =
        serde_json::to_string(inspected.manifest()).map_err(|e| Error::Internal(e.to_string()))?;
    let dataset = inspected
        .prepare(&|stage| sandbox.catalog.progress(&id, stage))
        .await
        .map_err(|e| Error::InvalidRequest(e.to_string()))?;
    crate::util::failpoint("registration_before_commit");
    sandbox.catalog.progress(&id, "evaluating");
    let registration = Registration { by, manifest_json };
    let card = evaluate(sandbox, &dataset, Some(registration)).await?;
    let _ = dataset.quality.set(card);
    Ok(Arc::new(dataset))
}

/// The owner's active dataset `id`.
fn owned(sandbox: &Sandbox, principal: &Principal, id: &str) -> Result<Arc<Dataset>, Error> {
    let dataset = sandbox
        .catalog
        .get(id)
        .ok_or_else(|| Error::NotFound(format!("dataset '{id}' does not exist")))?;
    if principal.org.as_deref() != Some(dataset.manifest.owner.as_str()) {
        return Err(Error::Forbidden(format!(
            "dataset '{id}' belongs to another owner"
        )));
    }
    Ok(dataset)
}

fn stored(sandbox: &Sandbox, id: &str) -> Result<Option<store::RegisteredDataset>, Error> {
    Ok(sandbox
        .store
        .registered_datasets()?
        .into_iter()
        .find(|r| r.id == id))
}

/// Withdraws the owner's dataset `id`: out of the catalog at once (queries
/// already running finish), its grants ended, both recorded. Returns the
/// grants ended.
pub async fn withdraw(
    sandbox: &Sandbox,
    principal: &Principal,
    id: &str,
) -> Result<Vec<String>, Error> {
    let dataset = owned(sandbox, principal, id)?;
    let manifest_json =
        serde_json::to_string(&dataset.manifest).map_err(|e| Error::Internal(e.to_string()))?;
    sandbox.catalog.remove(id);
    let (dataset_id, owner, by) = (
        id.to_string(),
        dataset.manifest.owner.clone(),
        principal.id.clone(),
    );
    let committed = sandbox
        .ledger
        .commit(move |tx| {
            let ended = store::withdraw_dataset(tx, &dataset_id, &owner, &manifest_json)?;
            let mut events = vec![LedgerEvent::DatasetWithdrawn {
                dataset: dataset_id,
                owner,
                by,
                grants_ended: ended.clone(),
            }];
            events.extend(
                ended
                    .iter()
                    .map(|g| LedgerEvent::GrantRevoked { grant: g.clone() }),
            );
            Ok((events, ended))
        })
        .await;
    match committed {
        Ok((_, ended)) => Ok(ended),
        Err(e) => {
            // Not recorded, so not withdrawn.
            sandbox.catalog.install(dataset);
            Err(e.into())
        }
    }
}
