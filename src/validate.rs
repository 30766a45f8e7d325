//! JSON Schema validation of manifests, policy files and requests.
//!
//! The schemas under `schemas/` are compiled into the binary, so a server
//! started from any folder validates against the same contract the repo
//! documents.

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in one file, located by JSON Pointer.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: PathBuf,
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(file: &Path, path: &str, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_path_buf(),
            path: path.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(f, "{}: {}: {}", self.file.display(), path, self.message)
    }
}

pub struct Schemas {
    pub dataset: jsonschema::Validator,
    pub classification: jsonschema::Validator,
    pub levels: jsonschema::Validator,
    pub prohibitions: jsonschema::Validator,
    pub query_request: jsonschema::Validator,
}

const DATASET: &str = include_str!("../schemas/dataset.schema.json");
const CLASSIFICATION: &str = include_str!("../schemas/classification.schema.json");
const LEVELS: &str = include_str!("../schemas/levels.schema.json");
const PROHIBITIONS: &str = include_str!("../schemas/prohibitions.schema.json");
const QUERY_REQUEST: &str = include_str!("../schemas/query-request.schema.json");

fn compile(name: &str, text: &str) -> jsonschema::Validator {
    // The schemas are part of the binary and covered by tests; a broken one is
    // a build defect, not a runtime condition.
    let value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("schema {name} is not JSON: {e}"));
    jsonschema::validator_for(&value)
        .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"))
}

impl Schemas {
    pub fn compiled() -> Schemas {
        Schemas {
            dataset: compile("dataset", DATASET),
            classification: compile("classification", CLASSIFICATION),
            levels: compile("levels", LEVELS),
            prohibitions: compile("prohibitions", PROHIBITIONS),
            query_request: compile("query-request", QUERY_REQUEST),
        }
    }
}

/// Every schema violation of `value`, as problems located in `file`.
pub fn problems(file: &Path, value: &Value, schema: &jsonschema::Validator) -> Vec<Problem> {
    schema
        .iter_errors(value)
        .map(|e| Problem::new(file, e.instance_path().as_str(), e.masked().to_string()))
        .collect()
}

/// Reads a JSON file, validates it and deserializes it.
pub fn load_validated<T: DeserializeOwned>(
    file: &Path,
    schema: &jsonschema::Validator,
) -> Result<T, Vec<Problem>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| vec![Problem::new(file, "", format!("cannot read: {e}"))])?;
    parse_validated(file, &text, schema)
}

pub fn parse_validated<T: DeserializeOwned>(
    file: &Path,
    text: &str,
    schema: &jsonschema::Validator,
) -> Result<T, Vec<Problem>> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| vec![Problem::new(file, "", format!("not valid JSON: {e}"))])?;
    let found = problems(file, &value, schema);
    if !found.is_empty() {
        return Err(found);
    }
    serde_json::from_value(value).map_err(|e| vec![Problem::new(file, "", e.to_string())])
}
