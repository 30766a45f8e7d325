//! Released answers kept per scope and plan: asking again returns the same
//! noise at no charge, so repetition cannot average it away.

use super::gate::Gated;
use super::{Executed, ReleaseSummary};
use crate::error::Error;
use crate::store::Principal;

/// Who shares released answers: the same organisation (however many
/// buyers and grants it holds, so fresh noise cannot be bought with another
/// grant), for the same purpose (consent differs by purpose, and so do the
/// rows), over the same versions of the datasets read.
pub fn scope(principal: &Principal, gated: &Gated) -> String {
    let org = principal.org.as_deref().unwrap_or(&principal.id);
    let mut parts = vec![
        format!("org:{org}"),
        format!("purpose:{}", gated.grant.purpose),
    ];
    let mut versions: Vec<String> = gated.scanned.iter().map(|d| d.version()).collect();
    versions.sort();
    versions.dedup();
    parts.extend(versions);
    crate::util::sha256_hex(parts.join("\n").as_bytes())
}

/// Rebuilds an answer released before.
pub fn from_cache(answer: &[u8], release: &str) -> Result<Executed, Error> {
    let internal = |e: String| Error::Internal(format!("cached answer unreadable: {e}"));
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(
        std::io::Cursor::new(answer.to_vec()),
        None,
    )
    .map_err(|e| internal(e.to_string()))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| internal(e.to_string()))?;
    let release: ReleaseSummary =
        serde_json::from_str(release).map_err(|e| internal(e.to_string()))?;
    Executed::new(schema, batches, release, 0)
}
