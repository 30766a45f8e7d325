//! The OpenAPI document, generated from the code: paths, parameters and
//! bodies from the handlers' `#[utoipa::path]` annotations, who may call
//! each route (and with what credentials) from [`super::ROUTES`], the query
//! request schema from the file requests are validated with, and the error
//! codes from [`ApiError::CODES`]. Served at `/openapi.json`; the copy in the
//! repository is checked against it by a test, so every change shows up in
//! review (`frostglass openapi > openapi.json` refreshes it).

use super::error::{ApiError, ErrorBody};
use crate::store::Role;
use serde_json::{Value, json};
use std::sync::OnceLock;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Frostglass",
        version = "1",
        description = "Privacy-preserving data trading sandbox: SQL in, approved aggregates out, every use on a verifiable ledger. Errors are JSON: {\"error\": {\"code\", \"message\", \"details\"}}."
    ),
    servers((url = "http://127.0.0.1:8080")),
    paths(
        super::healthz,
        super::openapi,
        super::datasets::list_datasets,
        super::datasets::register_dataset,
        super::datasets::get_dataset,
        super::datasets::update_dataset,
        super::datasets::withdraw_dataset,
        super::datasets::preview_dataset,
        super::datasets::dataset_usage,
        super::market::delegate,
        super::market::undelegate,
        super::market::add_principal,
        super::market::rotate_key,
        super::market::add_signing_key,
        super::market::file_request,
        super::market::list_requests,
        super::market::get_request,
        super::market::sign_request,
        super::market::approve,
        super::market::reject,
        super::market::revoke_grant,
        super::market::evidence,
        super::market::settlement,
        super::market::held_query,
        super::market::reviews,
        super::market::approve_answer,
        super::market::reject_answer,
        super::post_query,
        super::list_grants,
        super::usage::usage,
        super::audit::entries,
        super::audit::head,
        super::audit::public_key,
        super::audit::inclusion,
        super::audit::consistency,
        super::usage::audit_sql,
        super::audit::last_verification,
        super::audit::verify_now,
        super::usage::refusals,
        super::usage::query_history,
    ),
    components(schemas(ErrorBody))
)]
struct Annotated;

fn roles_text(roles: &[Role]) -> String {
    if roles.is_empty() {
        return "Roles: anyone.".into();
    }
    if roles.len() == 4 {
        return "Roles: any principal.".into();
    }
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    format!("Roles: {}.", names.join(", "))
}

/// The whole document, as served.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_string_pretty(&generate()).unwrap_or_default() + "\n")
}

fn generate() -> Value {
    let mut doc = serde_json::to_value(Annotated::openapi()).unwrap_or_default();
    for (method, path, roles) in super::ROUTES {
        let op = &mut doc["paths"][*path][method.to_ascii_lowercase()];
        let description = match op["description"].as_str() {
            Some(d) => format!("{d}\n\n{}", roles_text(roles)),
            None => roles_text(roles),
        };
        op["description"] = json!(description);
        if roles.is_empty() {
            op["security"] = json!([]);
        }
        op["responses"]["default"] = json!({ "$ref": "#/components/responses/Error" });
    }
    doc["security"] = json!([{ "bearer": [] }]);
    doc["components"]["securitySchemes"] = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "API key (fgk_…); only its SHA-256 is stored. With mutual TLS, principals bound to a client certificate must present it too."
        }
    });
    doc["components"]["responses"] = json!({
        "Error": {
            "description": "A refusal or failure with a stable code",
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
        }
    });
    doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"] =
        json!(ApiError::CODES);
    let mut request: Value =
        serde_json::from_str(include_str!("../../schemas/query-request.schema.json"))
            .unwrap_or_default();
    if let Some(schema) = request.as_object_mut() {
        schema.retain(|k, _| !k.starts_with('$'));
    }
    // Registration and update bodies are manifests, validated with the
    // schema the catalog's files are.
    let mut manifest: Value =
        serde_json::from_str(include_str!("../../schemas/dataset.schema.json")).unwrap_or_default();
    if let Some(schema) = manifest.as_object_mut() {
        schema.retain(|k, _| !k.starts_with('$'));
    }
    for method in ["post", "put"] {
        let path = if method == "post" {
            "/v1/datasets"
        } else {
            "/v1/datasets/{id}"
        };
        doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"] =
            manifest.clone();
    }
    let query = &mut doc["paths"]["/v1/queries"]["post"];
    query["requestBody"]["content"]["application/json"]["schema"] = request;
    query["responses"]["200"]["content"]["application/vnd.apache.arrow.stream"]["schema"] =
        json!({ "type": "string", "format": "binary" });
    add_links(&mut doc);
    doc
}

/// Where the ids of one route come from in another's answer, so a client
/// (and stateful testing) can walk the real flows: the catalog to a
/// dataset, an answer to the proof of its receipt, the head to its proofs.
fn add_links(doc: &mut Value) {
    let dataset = json!({ "id": "$response.body#/datasets/0/id" });
    doc["paths"]["/v1/datasets"]["get"]["responses"]["200"]["links"] = json!({
        "dataset": { "operationId": "get_dataset", "parameters": dataset,
                     "description": "The first dataset of the catalog" },
        "preview": { "operationId": "preview_dataset", "parameters": dataset,
                     "description": "Synthetic rows of the first dataset" },
    });
    doc["paths"]["/v1/queries"]["post"]["responses"]["200"]["links"] = json!({
        "receipt_inclusion": {
            "operationId": "inclusion",
            "parameters": {
                "index": "$response.body#/receipt/ledger_index",
                "size": "$response.body#/receipt/tree_size",
            },
            "description": "The inclusion proof of the answer's ledger entry under the checkpoint its receipt names",
        },
    });
    doc["paths"]["/v1/audit/head"]["get"]["responses"]["200"]["links"] = json!({
        "first_entry_inclusion": {
            "operationId": "inclusion",
            "parameters": { "index": 0, "size": "$response.body#/tree_size" },
            "description": "The first entry's inclusion proof under this head",
        },
        "consistency_from_empty": {
            "operationId": "consistency",
            "parameters": { "from": 0, "to": "$response.body#/tree_size" },
            "description": "The proof that the empty tree is a prefix of this head's",
        },
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_document_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == super::document(),
            "openapi.json is stale: run `cargo run -- openapi > openapi.json` and review the diff"
        );
    }
}
