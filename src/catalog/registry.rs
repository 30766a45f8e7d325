//! The registry: the catalog queries read, swapped whole when a dataset is
//! registered, updated or withdrawn, and the state of registrations still
//! being prepared. A query takes one snapshot when it starts and keeps it
//! to the end, so it finishes on the versions it started with however the
//! registry changes meanwhile.

use super::{Catalog, Dataset};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// Where a dataset's newest registration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Statistics, unit summaries and the quality card are being computed;
    /// queries do not see this version yet.
    Registering,
    Active,
    /// Preparing failed; `reason` says why. An active older version stays.
    Failed,
    Withdrawn,
}

/// A registration (or update) that is not, or not yet, the active version.
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    pub dataset: String,
    pub owner: String,
    pub status: Status,
    /// What preparation is doing now, or why it failed.
    pub stage: String,
    pub started_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Default)]
pub struct Registry {
    current: RwLock<Arc<Catalog>>,
    pending: Mutex<BTreeMap<String, Pending>>,
}

/// Another registration of the same dataset is being prepared.
#[derive(Debug)]
pub struct Busy;

impl Registry {
    pub fn new(catalog: Catalog) -> Registry {
        Registry {
            current: RwLock::new(Arc::new(catalog)),
            pending: Mutex::default(),
        }
    }

    /// The catalog as it is now; a query keeps this snapshot to its end.
    pub fn current(&self) -> Arc<Catalog> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Dataset>> {
        self.current().get(id).cloned()
    }

    /// Makes `dataset` the active version of its id, atomically for
    /// queries: each sees either the old catalog or the new one.
    pub fn install(&self, dataset: Arc<Dataset>) {
        let id = dataset.id().to_string();
        self.swap(|datasets| {
            datasets.insert(id.clone(), dataset);
        });
        self.pending().remove(&id);
    }

    /// Takes a dataset out of the catalog; queries that started before go
    /// on. A version being prepared meanwhile stays listed until its commit
    /// refuses it.
    pub fn remove(&self, id: &str) -> Option<Arc<Dataset>> {
        let mut removed = None;
        self.swap(|datasets| removed = datasets.remove(id));
        removed
    }

    fn swap(&self, change: impl FnOnce(&mut BTreeMap<String, Arc<Dataset>>)) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut datasets = current.datasets.clone();
        change(&mut datasets);
        *current = Arc::new(Catalog { datasets });
    }

    /// Starts preparing a version of `dataset`; refused while another is.
    pub fn begin(&self, dataset: &str, owner: &str) -> Result<(), Busy> {
        let mut pending = self.pending();
        if pending
            .get(dataset)
            .is_some_and(|p| p.status == Status::Registering)
        {
            return Err(Busy);
        }
        pending.insert(
            dataset.to_string(),
            Pending {
                dataset: dataset.to_string(),
                owner: owner.to_string(),
                status: Status::Registering,
                stage: "queued".into(),
                started_at: crate::util::now_rfc3339(),
                reason: None,
            },
        );
        Ok(())
    }

    pub fn progress(&self, dataset: &str, stage: &str) {
        if let Some(p) = self.pending().get_mut(dataset) {
            p.stage = stage.to_string();
        }
    }

    pub fn fail(&self, dataset: &str, reason: String) {
        if let Some(p) = self.pending().get_mut(dataset) {
            p.status = Status::Failed;
            p.reason = Some(reason);
        }
    }

    /// The registration of `dataset` not (yet) active, if any.
    pub fn pending_of(&self, dataset: &str) -> Option<Pending> {
        self.pending().get(dataset).cloned()
    }

    pub fn all_pending(&self) -> Vec<Pending> {
        self.pending().values().cloned().collect()
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}
