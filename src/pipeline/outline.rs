//! A dry run's answer: the decision, the consent filters and releases that
//! would apply, and the estimated charge — read from the gate's output, no
//! data touched.

use super::charge::estimate;
use super::gate::Gated;
use crate::accounting::Usage;
use crate::release::JobKind;
use crate::release::dp::Params;
use serde::Serialize;
use std::collections::BTreeSet;

#[derive(Debug, Serialize)]
pub struct Outline {
    pub decision: &'static str,
    pub grant: String,
    pub purpose: String,
    pub consent_filters: Vec<ConsentFilter>,
    pub releases: Vec<PlannedRelease>,
    pub estimated_usage: Usage,
    /// The answer's columns (for Flight SQL's `FlightInfo`; not in the JSON).
    #[serde(skip)]
    pub schema: datafusion::arrow::datatypes::SchemaRef,
}

#[derive(Debug, Serialize)]
pub struct ConsentFilter {
    pub dataset: String,
    pub rule: String,
}

#[derive(Debug, Serialize)]
pub struct PlannedRelease {
    pub datasets: BTreeSet<String>,
    pub min_group_size: u64,
    pub mechanism: PlannedMechanism,
    pub epsilon: f64,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum PlannedMechanism {
    Threshold {
        threshold: u64,
        /// `rows` or `distinct_privacy_units`.
        counts: &'static str,
    },
    DifferentialPrivacy {
        differential_privacy: Params,
        /// `None` when the groups are public (every declared domain value is released).
        selection_threshold: Option<f64>,
    },
}

pub fn outline(g: &Gated) -> Outline {
    let releases = g
        .split
        .jobs
        .iter()
        .map(|j| PlannedRelease {
            datasets: j.datasets.clone(),
            min_group_size: j.min_group_size,
            mechanism: match &j.kind {
                JobKind::Threshold { counts_rows } => PlannedMechanism::Threshold {
                    threshold: j.min_group_size,
                    counts: if *counts_rows {
                        "rows"
                    } else {
                        "distinct_privacy_units"
                    },
                },
                JobKind::Dp(dp) => PlannedMechanism::DifferentialPrivacy {
                    differential_privacy: dp.params.clone(),
                    selection_threshold: dp.selection_threshold(),
                },
            },
            epsilon: j.epsilon(),
        })
        .collect();
    Outline {
        schema: std::sync::Arc::new(g.split.upper.schema().as_arrow().clone()),
        decision: "allowed",
        grant: g.grant.id.clone(),
        purpose: g.grant.purpose.clone(),
        consent_filters: g
            .consent_filters
            .iter()
            .map(|d| ConsentFilter {
                dataset: d.clone(),
                rule: format!(
                    "only rows whose data subject consented to '{}'",
                    g.grant.purpose
                ),
            })
            .collect(),
        releases,
        // Before any free tier: what the query costs at list price.
        estimated_usage: estimate(
            &g.scanned,
            &super::charge::epsilon_of(&g.catalog, &g.split).1,
            &|_| false,
        ),
    }
}
