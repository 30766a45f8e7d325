//! The policy engine's data: the classification matrix, the rules per data
//! level and the prohibition list, all loaded from `policies/` and validated
//! against `schemas/`. [`check`] enforces them on a query plan.

pub mod access;
mod bans;
pub mod check;

use crate::catalog::{ColumnClass, Level};
use crate::error::Refusal;
use crate::validate::{self, Problem, Schemas};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where in a query a column is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// Projected as is into the answer.
    Output,
    GroupBy,
    /// WHERE, JOIN filters, HAVING below the release, CASE conditions, comparisons.
    Filter,
    /// An equality between columns of two different tables.
    JoinKey,
    AggregateArg,
    OrderBy,
    /// Carried through a projection without being looked at; the real site
    /// is wherever the derived column is used later.
    Passthrough,
}

impl Site {
    pub fn as_str(self) -> &'static str {
        match self {
            Site::Output => "output",
            Site::GroupBy => "group_by",
            Site::Filter => "filter",
            Site::JoinKey => "join_key",
            Site::AggregateArg => "aggregate_arg",
            Site::OrderBy => "order_by",
            Site::Passthrough => "passthrough",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Allow {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinKeyRule {
    Allow,
    Deny,
    JoinableOnly,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassRule {
    pub output: Allow,
    pub group_by: Allow,
    pub filter: Allow,
    pub order_by: Allow,
    pub join_key: JoinKeyRule,
    pub aggregate_arg: Vec<String>,
    pub scalar_functions: Vec<String>,
}

impl ClassRule {
    /// Whether a column of this class may be used at `site`; `joinable` is
    /// the manifest's flag for the column.
    pub fn allows(&self, site: Site, joinable: bool) -> bool {
        let allowed = |a: Allow| a == Allow::Allow;
        match site {
            Site::Output => allowed(self.output),
            Site::GroupBy => allowed(self.group_by),
            Site::Filter => allowed(self.filter),
            Site::OrderBy => allowed(self.order_by),
            Site::JoinKey => match self.join_key {
                JoinKeyRule::Allow => true,
                JoinKeyRule::Deny => false,
                JoinKeyRule::JoinableOnly => joinable,
            },
            // Aggregate arguments are checked per function; pass-through says nothing.
            Site::AggregateArg | Site::Passthrough => true,
        }
    }

    pub fn allows_aggregate(&self, name: &str) -> bool {
        self.aggregate_arg.iter().any(|a| a == name)
    }

    pub fn allows_function(&self, name: &str) -> bool {
        self.scalar_functions.iter().any(|f| f == "*" || f == name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassRules {
    pub identifier: ClassRule,
    pub quasi_identifier: ClassRule,
    pub sensitive: ClassRule,
    pub attribute: ClassRule,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Classification {
    pub max_quasi_identifiers: usize,
    pub classes: ClassRules,
}

impl Classification {
    pub fn rule(&self, class: ColumnClass) -> &ClassRule {
        match class {
            ColumnClass::Identifier => &self.classes.identifier,
            ColumnClass::QuasiIdentifier => &self.classes.quasi_identifier,
            ColumnClass::Sensitive => &self.classes.sensitive,
            ColumnClass::Attribute => &self.classes.attribute,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrossBorder {
    Deny,
    AssessmentRequired,
    Allow,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LevelRule {
    pub external_buyers: bool,
    pub min_group_size_floor: u64,
    pub dp_required: bool,
    pub cross_border: CrossBorder,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Levels {
    pub general: LevelRule,
    pub important: LevelRule,
    pub core: LevelRule,
}

impl Levels {
    pub fn rule(&self, level: Level) -> &LevelRule {
        match level {
            Level::General => &self.general,
            Level::Important => &self.important,
            Level::Core => &self.core,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurposeBan {
    pub id: String,
    pub purpose: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrincipalBan {
    pub id: String,
    pub principal: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionBan {
    pub id: String,
    pub function: String,
    #[serde(default)]
    pub on_classes: Option<Vec<ColumnClass>>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CombinationBan {
    pub id: String,
    pub dataset: String,
    pub columns: Vec<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairBan {
    pub id: String,
    pub datasets: [String; 2],
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prohibitions {
    pub purposes: Vec<PurposeBan>,
    pub principals: Vec<PrincipalBan>,
    pub functions: Vec<FunctionBan>,
    pub column_combinations: Vec<CombinationBan>,
    pub dataset_pairs: Vec<PairBan>,
}

pub struct Policies {
    pub classification: Classification,
    pub levels: Levels,
    pub prohibitions: Prohibitions,
}

impl Policies {
    /// Loads and validates the three policy files; every problem is reported, not just the first.
    pub fn load(dir: &Path, schemas: &Schemas) -> Result<Policies, Vec<Problem>> {
        let classification =
            validate::load_validated(&dir.join("classification.json"), &schemas.classification);
        let levels = validate::load_validated(&dir.join("levels.json"), &schemas.levels);
        let prohibitions =
            validate::load_validated(&dir.join("prohibitions.json"), &schemas.prohibitions);
        match (classification, levels, prohibitions) {
            (Ok(classification), Ok(levels), Ok(prohibitions)) => Ok(Policies {
                classification,
                levels,
                prohibitions,
            }),
            (c, l, p) => Err([c.err(), l.err(), p.err()]
                .into_iter()
                .flatten()
                .flatten()
                .collect()),
        }
    }

    pub fn check_purpose(&self, purpose: &str) -> Result<(), Refusal> {
        match self
            .prohibitions
            .purposes
            .iter()
            .find(|b| b.purpose == purpose)
        {
            Some(ban) => Err(Refusal::new(
                "prohibited_purpose",
                format!("purpose '{purpose}' is prohibited: {}", ban.reason),
            )
            .with("purpose", purpose)
            .with("prohibition", ban.id.clone())
            .with("reason", ban.reason.clone())),
            None => Ok(()),
        }
    }

    pub fn check_principal(&self, principal: &str) -> Result<(), Refusal> {
        match self
            .prohibitions
            .principals
            .iter()
            .find(|b| b.principal == principal)
        {
            Some(ban) => Err(Refusal::new(
                "prohibited_principal",
                format!("principal is on the prohibition list: {}", ban.reason),
            )
            .with("prohibition", ban.id.clone())
            .with("reason", ban.reason.clone())),
            None => Ok(()),
        }
    }

    /// The threshold a dataset's releases use: the manifest's, never below its level's floor.
    pub fn min_group_size(&self, manifest: &crate::catalog::Manifest) -> u64 {
        let floor = self.levels.rule(manifest.level).min_group_size_floor;
        manifest.release.min_group_size.unwrap_or(floor).max(floor)
    }
}

impl Classification {
    /// The classification matrix as a Markdown table, as the README shows it.
    pub fn markdown_table(&self) -> String {
        let mut out = String::from(
            "| class | output | group_by | filter | join_key | order_by | aggregate_arg | scalar functions |\n|---|---|---|---|---|---|---|---|\n",
        );
        let word = |a: Allow| if a == Allow::Allow { "allow" } else { "deny" };
        for class in [
            ColumnClass::Identifier,
            ColumnClass::QuasiIdentifier,
            ColumnClass::Sensitive,
            ColumnClass::Attribute,
        ] {
            let r = self.rule(class);
            let join = match r.join_key {
                JoinKeyRule::Allow => "allow",
                JoinKeyRule::Deny => "deny",
                JoinKeyRule::JoinableOnly => "joinable only",
            };
            let list = |v: &[String]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.join(", ")
                }
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                class.as_str(),
                word(r.output),
                word(r.group_by),
                word(r.filter),
                join,
                word(r.order_by),
                list(&r.aggregate_arg),
                list(&r.scalar_functions),
            ));
        }
        out
    }
}

/// An expression without the aliases around it (`x AS y` is `x`): what
/// plan walks compare, in the policy check and the release split alike.
/// By reference, unlike DataFusion's `Expr::unalias`, since the walks only look.
pub fn strip_alias(e: &datafusion::logical_expr::Expr) -> &datafusion::logical_expr::Expr {
    match e {
        datafusion::logical_expr::Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_rule_table_is_the_shipped_classification() {
        let schemas = Schemas::compiled();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let policies =
            Policies::load(&dir.join("policies"), &schemas).expect("shipped policies are valid");
        let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md exists");
        let table = policies.classification.markdown_table();
        assert!(
            readme.contains(&table),
            "README's rule table is out of date; it should read:\n{table}"
        );
    }

    #[test]
    fn class_rules_decide_sites() {
        let schemas = Schemas::compiled();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = Policies::load(&dir.join("policies"), &schemas)
            .unwrap()
            .classification;
        let id = c.rule(ColumnClass::Identifier);
        assert!(!id.allows(Site::Filter, true));
        assert!(id.allows(Site::JoinKey, true));
        assert!(!id.allows(Site::JoinKey, false));
        assert!(id.allows_aggregate("count_distinct") && !id.allows_aggregate("max"));
        let sensitive = c.rule(ColumnClass::Sensitive);
        assert!(sensitive.allows_aggregate("sum") && !sensitive.allows_aggregate("min"));
        assert!(!sensitive.allows(Site::GroupBy, false));
        assert!(c.rule(ColumnClass::Attribute).allows_function("anything"));
    }
}
