//! Who may query a dataset at all, and from where: the rules of its data
//! level (external buyers, differential privacy, cross-border release).

use super::Policies;
use super::check::Requester;
use crate::catalog::Dataset;
use crate::error::{Error, Refusal};

/// Level rule alone: whether external buyers may query this dataset at all.
pub fn level_access(policies: &Policies, dataset: &Dataset) -> Result<(), Error> {
    let m = &dataset.manifest;
    let rule = policies.levels.rule(m.level);
    let refuse = |rule: String, why: &str| -> Result<(), Error> {
        Err(Refusal::new(
            rule,
            format!("dataset '{}' is {} data, {why}", m.id, m.level.as_str()),
        )
        .with("table", m.id.clone())
        .with("level", m.level.as_str())
        .into())
    };
    if !rule.external_buyers {
        return refuse(
            format!("{}_data_denied", m.level.as_str()),
            "which no external buyer may query",
        );
    }
    // A level that requires differential privacy releases nothing exactly:
    // a dataset of that level without `release.dp` (thresholds or rows) is
    // refused whole.
    if rule.dp_required && m.release.dp.is_none() {
        return refuse(
            "dp_required".into(),
            "which is released only with differential privacy, and its manifest declares none",
        );
    }
    Ok(())
}

/// Level rules: who may query this dataset at all, and from where.
pub fn dataset_access(
    policies: &Policies,
    requester: &Requester<'_>,
    dataset: &Dataset,
) -> Result<(), Error> {
    level_access(policies, dataset)?;
    let m = &dataset.manifest;
    if requester.region == m.region {
        return Ok(());
    }
    use super::CrossBorder::*;
    let refusal = match policies.levels.rule(m.level).cross_border {
        Allow => None,
        AssessmentRequired if requester.cross_border_assessment => None,
        AssessmentRequired => Some((
            "cross_border_assessment_required",
            "requires a grant with an approved cross-border assessment",
        )),
        Deny => Some(("cross_border_denied", "may not be released across borders")),
    };
    match refusal {
        None => Ok(()),
        Some((rule_id, why)) => Err(Refusal::new(
            rule_id,
            format!(
                "dataset '{}' is {} data of region {} and {why}",
                m.id,
                m.level.as_str(),
                m.region
            ),
        )
        .with("table", m.id.clone())
        .with("level", m.level.as_str())
        .with("dataset_region", m.region.clone())
        .with("principal_region", requester.region)
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{
        ColumnClass, ColumnSpec, Level, Manifest, ReleaseRules, Source, SourceFormat,
    };
    use crate::validate::Schemas;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::empty::EmptyTable;
    use std::sync::Arc;

    fn dataset(level: Level) -> Dataset {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        Dataset {
            manifest: Manifest {
                id: "d".into(),
                title: "d".into(),
                owner: "o".into(),
                description: String::new(),
                source: Source {
                    format: SourceFormat::Parquet,
                    location: "d.parquet".into(),
                },
                level,
                region: "CN".into(),
                personal_information: false,
                privacy_unit: None,
                consent_column: None,
                columns: vec![ColumnSpec {
                    name: "x".into(),
                    class: ColumnClass::Attribute,
                    joinable: false,
                    bounds: None,
                    description: None,
                    functions: None,
                    aggregates: None,
                    domain: None,
                    meaning: None,
                    kind: None,
                }],
                release: ReleaseRules::default(),
                pricing: None,
                evaluation: None,
                commitment: None,
            },
            provider: Arc::new(EmptyTable::new(schema.clone())),
            in_memory: None,
            schema,
            num_rows: 0,
            num_bytes: 0,
            manifest_path: "d.json".into(),
            manifest_sha256: String::new(),
            data_sha256: String::new(),
            quality: Default::default(),
            unit_constant: Default::default(),
            summary: None,
            location: "d.parquet".into(),
            fingerprint: Default::default(),
        }
    }

    fn policies() -> Policies {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        Policies::load(&dir, &Schemas::compiled()).expect("shipped policies load")
    }

    fn rule_of(r: Result<(), Error>) -> Option<String> {
        r.err().and_then(|e| e.rule().map(str::to_string))
    }

    #[test]
    fn cross_border_rules_follow_the_level() {
        let mut p = policies();
        let abroad = Requester {
            region: "US",
            cross_border_assessment: false,
        };
        let assessed = Requester {
            region: "US",
            cross_border_assessment: true,
        };
        let home = Requester {
            region: "CN",
            cross_border_assessment: false,
        };
        let important = dataset(Level::Important);
        assert_eq!(
            rule_of(dataset_access(&p, &abroad, &important)).as_deref(),
            Some("cross_border_assessment_required")
        );
        assert!(dataset_access(&p, &assessed, &important).is_ok());
        assert!(dataset_access(&p, &home, &important).is_ok());
        assert!(dataset_access(&p, &abroad, &dataset(Level::General)).is_ok());
        // A level that denies crossing borders outright, even with an assessment.
        p.levels.important.cross_border = super::super::CrossBorder::Deny;
        assert_eq!(
            rule_of(dataset_access(&p, &assessed, &important)).as_deref(),
            Some("cross_border_denied")
        );
        assert!(dataset_access(&p, &home, &important).is_ok());
        assert_eq!(
            rule_of(dataset_access(&p, &home, &dataset(Level::Core))).as_deref(),
            Some("core_data_denied")
        );
    }

    #[test]
    fn a_manifest_may_raise_but_never_lower_the_threshold() {
        let p = policies();
        let mut d = dataset(Level::Important);
        d.manifest.release.min_group_size = Some(2);
        assert_eq!(p.min_group_size(&d.manifest), 10);
        d.manifest.release.min_group_size = Some(25);
        assert_eq!(p.min_group_size(&d.manifest), 25);
    }
}
