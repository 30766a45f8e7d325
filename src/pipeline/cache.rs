//! Released answers kept per grant and plan: asking again returns the same
//! noise at no charge, so repetition cannot average it away.

use super::{Executed, ReleaseSummary};
use crate::error::Error;

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
    Ok(Executed {
        schema,
        batches,
        release,
        cpu_ns: 0,
    })
}
