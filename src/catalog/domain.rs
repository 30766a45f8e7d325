//! Public group domains: the values a column can take, declared by its owner
//! and known without looking at the data (the districts of a city, ages 0 to
//! 110). A DP release grouped only by such columns releases every domain
//! value, with noise, whether or not the data holds it: which groups exist is
//! then not learned from the data, so no budget goes to selecting them and no
//! selection threshold hides small ones (public partitions, as in Google's DP
//! library and Tumult Analytics).

use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::DataType;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The most values one column's domain may declare.
pub const MAX_DOMAIN_VALUES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Domain {
    /// Every value, listed (strings or integers, not mixed).
    Values(Vec<DomainValue>),
    /// Integers from `min` to `max`, `step` apart.
    Range {
        min: i64,
        max: i64,
        #[serde(default = "one")]
        step: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DomainValue {
    Integer(i64),
    Text(String),
}

fn one() -> i64 {
    1
}

impl Domain {
    /// How many values the domain holds.
    pub fn values(&self) -> u64 {
        match self {
            Domain::Values(v) => v.len() as u64,
            Domain::Range { min, max, step } if *step > 0 && min <= max => {
                ((*max as i128 - *min as i128) / *step as i128 + 1) as u64
            }
            Domain::Range { .. } => 0,
        }
    }

    /// What is wrong with the declaration on its own, if anything.
    pub fn problem(&self) -> Option<String> {
        if let Domain::Range { min, max, step } = self {
            if *step <= 0 {
                return Some("a domain's step must be positive".into());
            }
            if min > max {
                return Some("a domain's min is above its max".into());
            }
        }
        if let Domain::Values(v) = self {
            let texts = v
                .iter()
                .filter(|x| matches!(x, DomainValue::Text(_)))
                .count();
            if texts != 0 && texts != v.len() {
                return Some("a domain lists strings or integers, not both".into());
            }
            let mut seen = std::collections::HashSet::new();
            if !v.iter().all(|x| seen.insert(format!("{x:?}"))) {
                return Some("a domain lists a value twice".into());
            }
        }
        match self.values() {
            0 => Some("a domain must hold at least one value".into()),
            n if n > MAX_DOMAIN_VALUES as u64 => Some(format!(
                "a domain holds at most {MAX_DOMAIN_VALUES} values; this one has {n}"
            )),
            _ => None,
        }
    }

    /// The domain as a column of `data_type`; an error when a value does not
    /// fit that type (a manifest declaring `"x"` for an integer column).
    pub fn array(&self, data_type: &DataType) -> Result<ArrayRef, String> {
        if let Some(problem) = self.problem() {
            return Err(problem);
        }
        let declared: ArrayRef = match self {
            Domain::Range { min, max, step } => Arc::new(Int64Array::from_iter_values(
                (*min..=*max).step_by(*step as usize),
            )),
            Domain::Values(v) if matches!(v.first(), Some(DomainValue::Text(_))) => {
                Arc::new(StringArray::from_iter_values(v.iter().map(|x| match x {
                    DomainValue::Text(s) => s.clone(),
                    DomainValue::Integer(i) => i.to_string(),
                })))
            }
            Domain::Values(v) => {
                Arc::new(Int64Array::from_iter_values(v.iter().map(|x| match x {
                    DomainValue::Integer(i) => *i,
                    DomainValue::Text(_) => 0,
                })))
            }
        };
        let strict = CastOptions {
            safe: false,
            ..Default::default()
        };
        cast_with_options(&declared, data_type, &strict).map_err(|_| {
            format!("the domain's values are not all of the column's type {data_type}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Domain {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn ranges_and_lists_become_columns_of_the_data_type() {
        let ages = parse(r#"{"min": 0, "max": 110, "step": 10}"#);
        assert_eq!(ages.array(&DataType::Int32).unwrap().len(), 12);
        let districts = parse(r#"["a", "b"]"#);
        assert_eq!(districts.array(&DataType::Utf8View).unwrap().len(), 2);
        assert!(districts.array(&DataType::Int64).is_err());
        assert!(parse(r#"[300]"#).array(&DataType::Int8).is_err());
    }

    #[test]
    fn bad_declarations_are_named() {
        for bad in [
            r#"{"min": 5, "max": 1}"#,
            r#"{"min": 0, "max": 10, "step": 0}"#,
            r#"{"min": 0, "max": 100000}"#,
            r#"["a", 1]"#,
            r#"["a", "a"]"#,
            r#"[]"#,
        ] {
            assert!(parse(bad).problem().is_some(), "{bad}");
        }
    }
}
