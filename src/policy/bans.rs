//! Rules over the whole query rather than one column use: how many
//! quasi-identifiers, banned column combinations, banned dataset pairs.

use super::Policies;
use crate::error::{Error, Refusal};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Checks what the plan walk collected: the quasi-identifiers grouped or
/// filtered by, the columns used per dataset, and the datasets read.
pub fn query_wide_rules(
    policies: &Policies,
    quasi: &BTreeSet<(Arc<str>, Arc<str>)>,
    used_columns: &BTreeMap<String, BTreeSet<String>>,
    datasets: &BTreeSet<String>,
) -> Result<(), Error> {
    let max = policies.classification.max_quasi_identifiers;
    if quasi.len() > max {
        let names: Vec<String> = quasi.iter().map(|(d, c)| format!("{d}.{c}")).collect();
        return Err(Refusal::new(
            "too_many_quasi_identifiers",
            format!(
                "the query groups or filters by {} quasi-identifiers; at most {max} are allowed",
                names.len()
            ),
        )
        .with("columns", names)
        .with("max", max)
        .into());
    }
    for ban in &policies.prohibitions.column_combinations {
        let used = used_columns.get(&ban.dataset);
        if used.is_some_and(|u| ban.columns.iter().all(|c| u.contains(c))) {
            return Err(Refusal::new(
                "prohibited_combination",
                format!(
                    "columns {} of {} may not be used together: {}",
                    ban.columns.join(", "),
                    ban.dataset,
                    ban.reason
                ),
            )
            .with("table", ban.dataset.clone())
            .with("columns", ban.columns.clone())
            .with("prohibition", ban.id.clone())
            .with("reason", ban.reason.clone())
            .into());
        }
    }
    let used = datasets;
    for ban in &policies.prohibitions.dataset_pairs {
        let [a, b] = &ban.datasets;
        let hit = used.contains(a)
            && if b == "*" {
                used.len() > 1
            } else {
                used.contains(b)
            };
        if hit {
            return Err(Refusal::new(
                "prohibited_join",
                format!("datasets may not be combined: {}", ban.reason),
            )
            .with("datasets", vec![a.clone(), b.clone()])
            .with("prohibition", ban.id.clone())
            .with("reason", ban.reason.clone())
            .into());
        }
    }
    Ok(())
}
