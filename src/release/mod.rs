//! Release: the only way aggregates of protected data leave the sandbox.
//!
//! The plan is split at each *release aggregate* — the lowest aggregate above
//! a protected scan. Each one runs on its own with one extra hidden output,
//! the number of distinct privacy units behind every group (rows, for
//! non-personal data with a threshold). Groups under the threshold are
//! dropped, and only then does the rest of the query (HAVING, ORDER BY,
//! LIMIT, arithmetic, joins of released results) run — on released values,
//! never on exact ones.

mod batches;
mod component;
mod consent;
pub mod dp;
pub mod encode;
pub mod noise;
mod partitions;
pub mod quality;
pub mod quantile;
mod split;
mod summary;

pub use batches::{fill, in_key_order, threshold};
pub use consent::filter_consent;
use split::base_column;
pub use split::{output_names, split};

use crate::catalog::Catalog;
use crate::error::{Error, Refusal};
use crate::policy::{Policies, strip_alias};
use datafusion::arrow::array::{Array, BooleanArray, Int64Array};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, TableReference};
use datafusion::datasource::{MemTable, empty::EmptyTable, provider_as_source};
use datafusion::functions_aggregate::expr_fn::{count, count_distinct};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Expr, Join, LogicalPlan, LogicalPlanBuilder, Projection, SubqueryAlias, Union, lit,
};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

/// The hidden column that carries each row's privacy unit up to the release aggregate.
const UNIT: &str = "__fg_unit";
/// The hidden per-group count of distinct units the threshold is applied to.
const UNITS: &str = "__fg_units";

/// One release aggregate, ready to run.
pub struct ReleaseJob {
    /// The placeholder table standing for this aggregate's released output.
    pub slot: String,
    /// The aggregate with the hidden unit count as its last column.
    pub plan: LogicalPlan,
    /// The aggregate's own output schema (without the hidden column).
    pub schema: SchemaRef,
    pub min_group_size: u64,
    pub max_groups: Option<u64>,
    pub datasets: BTreeSet<String>,
    pub kind: JobKind,
    /// How many leading columns of `schema` are group keys.
    pub groups: usize,
}

pub enum JobKind {
    /// Groups under `min_group_size` distinct units (or rows) are dropped.
    Threshold { counts_rows: bool },
    /// Noisy values, noisy selection.
    Dp(dp::DpJob),
}

impl ReleaseJob {
    /// Whether the job reads a unit summary taken at registration.
    pub fn reads_summary(&self) -> bool {
        summary::reads_summary(&self.plan)
    }

    /// The epsilon this job spends.
    pub fn epsilon(&self) -> f64 {
        match &self.kind {
            JobKind::Dp(job) => job.params.epsilon,
            JobKind::Threshold { .. } => 0.0,
        }
    }
}

pub struct ReleasePlan {
    /// The query with each release aggregate replaced by a placeholder table.
    pub upper: LogicalPlan,
    pub jobs: Vec<ReleaseJob>,
}

/// What a release job's threshold let through.
pub struct Released {
    pub batches: Vec<RecordBatch>,
    pub released_groups: u64,
    pub suppressed_groups: u64,
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

fn refuse(rule: &str, message: &str) -> Error {
    Refusal::new(rule, message).into()
}
