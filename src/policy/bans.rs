//! Rules over the whole query rather than one column use: how many
//! quasi-identifiers, banned column combinations, banned dataset pairs.

use super::Policies;
use crate::catalog::Catalog;
use crate::error::{Error, Refusal};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Checks what the plan walk collected: the quasi-identifiers grouped or
/// filtered by, the columns used per dataset, and the datasets read.
pub fn query_wide_rules(
    policies: &Policies,
    catalog: &Catalog,
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
    // The persons' attributes the query looks at, by meaning: personal
    // datasets join only on their privacy unit, so together they describe
    // the same persons, whichever dataset each attribute comes from.
    let meaning = |dataset: &str, column: &str| {
        catalog
            .get(dataset)
            .and_then(|d| d.manifest.columns.iter().find(|c| c.name == column))
            .map_or_else(|| format!("{dataset}.{column}"), |c| c.meaning_in(dataset))
    };
    let personal = |dataset: &str| {
        catalog
            .get(dataset)
            .is_some_and(|d| d.manifest.personal_information)
    };
    let attributes: BTreeSet<String> = used_columns
        .iter()
        .filter(|(d, _)| personal(d))
        .flat_map(|(d, columns)| columns.iter().map(|c| meaning(d, c)))
        .collect();
    for ban in &policies.prohibitions.column_combinations {
        let hit = if personal(&ban.dataset) {
            ban.columns
                .iter()
                .all(|c| attributes.contains(&meaning(&ban.dataset, c)))
        } else {
            let used = used_columns.get(&ban.dataset);
            used.is_some_and(|u| ban.columns.iter().all(|c| u.contains(c)))
        };
        if hit {
            return Err(Refusal::new(
                "prohibited_combination",
                format!(
                    "columns {} of {} (or columns of joined datasets that describe the same) may not be used together: {}",
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
