//! Retention: sealed segments of old entries leave the hot database for
//! Parquet files, and the ledger still verifies. A segment runs from the end
//! of the previous one to a signed checkpoint at or below the requested
//! index that a start-up has verified; its file holds each entry's index,
//! body and leaf hash, and a `.checkpoint.json` beside it holds the signed
//! head that ends it. The database keeps everything the tree, the proofs,
//! the roll-ups and the auditors' typed columns need (leaf hashes, stored
//! nodes, heads, columns); only the bodies are blanked. Sealing is itself a
//! ledger entry (`segment_archived`, with the file's SHA-256), made in the
//! transaction that blanks the bodies. Verification reads archived bodies
//! back from the files: each must hash to its stored leaf, and each file to
//! its recorded digest. SQL text retention stays separate, as before.

use super::event::LedgerEvent;
use super::{LedgerError, SignedHead, Writer, head_row, open_connection, tables};
use crate::util::sql::CachedStatements;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS archived_segments (
    first INTEGER NOT NULL,
    end_index INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL
);";

/// One sealed segment: entries `first..end` in the Parquet file at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first: u64,
    pub end: u64,
    pub path: PathBuf,
    pub sha256: String,
}

/// Entries per Parquet row group and per batch read back.
const BATCH: usize = 8192;

pub fn segments(conn: &Connection) -> Result<Vec<Segment>, LedgerError> {
    // A ledger opened read-only (by `verify`) may predate the table.
    let exists: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE name = 'archived_segments')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut stmt = conn
        .prepare("SELECT first, end_index, path, sha256 FROM archived_segments ORDER BY first")?;
    let rows = stmt.query_map([], |r| {
        Ok(Segment {
            first: r.get::<_, i64>(0)? as u64,
            end: r.get::<_, i64>(1)? as u64,
            path: PathBuf::from(r.get::<_, String>(2)?),
            sha256: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Seals the entries after the last segment up to the newest signed head at
/// or below `before` that start-up has verified; writes the segment into
/// `out_dir` and blanks the bodies. `None` when there is nothing to seal.
pub fn seal(
    writer: &mut Writer,
    data_dir: &Path,
    out_dir: &Path,
    before: u64,
) -> Result<Option<Segment>, LedgerError> {
    let conn = open_connection(data_dir)?;
    let first = segments(&conn)?.last().map_or(0, |s| s.end);
    let limit = before.min(tables::verified_size(&conn)?);
    let head: Option<SignedHead> = conn
        .query_row(
            "SELECT tree_size, timestamp_ms, root_hash, signature, key_id FROM tree_heads
             WHERE tree_size > ?1 AND tree_size <= ?2 ORDER BY tree_size DESC LIMIT 1",
            params![first as i64, limit as i64],
            head_row,
        )
        .optional()?;
    let Some(head) = head else {
        return Ok(None);
    };
    let end = head.tree_size;
    std::fs::create_dir_all(out_dir).map_err(io)?;
    let name = format!("segment-{first:012}-{end:012}");
    let path = out_dir.join(format!("{name}.parquet"));
    write_segment(&conn, first, end, &path)?;
    let checkpoint = serde_json::to_string_pretty(&head).unwrap_or_default();
    std::fs::write(out_dir.join(format!("{name}.checkpoint.json")), checkpoint).map_err(io)?;
    let sha256 = crate::util::file_sha256_hex(&path).map_err(io)?;
    let segment = Segment {
        first,
        end,
        path: std::fs::canonicalize(&path).map_err(io)?,
        sha256,
    };
    writer.commit(|tx| {
        let sealed_to = segments(tx)?.last().map_or(0, |s| s.end);
        if sealed_to != first {
            return Err(LedgerError::Corrupt(
                "another archive sealed these entries meanwhile".into(),
            ));
        }
        tx.run(
            "UPDATE usage_log SET body = '' WHERE idx >= ?1 AND idx < ?2",
            params![first as i64, end as i64],
        )?;
        tx.run(
            "INSERT INTO archived_segments (first, end_index, path, sha256) VALUES (?1, ?2, ?3, ?4)",
            params![
                first as i64,
                end as i64,
                segment.path.to_string_lossy(),
                segment.sha256
            ],
        )?;
        let event = LedgerEvent::SegmentArchived {
            first,
            end,
            file: format!("{name}.parquet"),
            sha256: segment.sha256.clone(),
            root_hash: head.root_hash.clone(),
        };
        Ok((vec![event], ()))
    })?;
    Ok(Some(segment))
}

fn io(e: std::io::Error) -> LedgerError {
    LedgerError::Corrupt(format!("archive: {e}"))
}

fn write_segment(conn: &Connection, first: u64, end: u64, path: &Path) -> Result<(), LedgerError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("idx", DataType::UInt64, false),
        Field::new("body", DataType::Utf8, false),
        Field::new("leaf_hash", DataType::Utf8, false),
    ]));
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = ArrowWriter::try_new(file, schema.clone(), None)
        .map_err(|e| LedgerError::Corrupt(e.to_string()))?;
    let mut stmt = conn.prepare(
        "SELECT idx, body, leaf_hash FROM usage_log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
    )?;
    let mut rows = stmt.query(params![first as i64, end as i64])?;
    let mut expected = first;
    let (mut idx, mut body, mut leaf) = (Vec::new(), Vec::new(), Vec::new());
    let flush = |out: &mut ArrowWriter<std::fs::File>,
                 idx: &mut Vec<u64>,
                 body: &mut Vec<String>,
                 leaf: &mut Vec<String>|
     -> Result<(), LedgerError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(std::mem::take(idx))),
            Arc::new(StringArray::from(std::mem::take(body))),
            Arc::new(StringArray::from(std::mem::take(leaf))),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| LedgerError::Corrupt(e.to_string()))?;
        out.write(&batch)
            .map_err(|e| LedgerError::Corrupt(e.to_string()))
    };
    while let Some(r) = rows.next()? {
        let i = r.get::<_, i64>(0)? as u64;
        let b: String = r.get(1)?;
        if i != expected || b.is_empty() {
            return Err(LedgerError::Corrupt(format!(
                "entry {expected} cannot be archived"
            )));
        }
        expected += 1;
        idx.push(i);
        body.push(b);
        leaf.push(r.get(2)?);
        if idx.len() == BATCH {
            flush(&mut out, &mut idx, &mut body, &mut leaf)?;
        }
    }
    if expected != end {
        return Err(LedgerError::Corrupt(format!("entry {expected} is missing")));
    }
    if !idx.is_empty() {
        flush(&mut out, &mut idx, &mut body, &mut leaf)?;
    }
    let file = out
        .into_inner()
        .map_err(|e| LedgerError::Corrupt(e.to_string()))?;
    file.sync_all().map_err(io)
}

/// Archived entries' bodies, read back from their segments; cheapest when
/// asked in index order (each segment is read once, front to back).
pub struct ArchivedBodies {
    segments: Vec<Segment>,
    open: Option<OpenSegment>,
}

struct OpenSegment {
    segment: usize,
    reader: datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    /// The batch read last, and the index of its first entry.
    batch: Option<(u64, StringArray)>,
}

impl ArchivedBodies {
    pub fn open(conn: &Connection) -> Result<ArchivedBodies, LedgerError> {
        Ok(ArchivedBodies {
            segments: segments(conn)?,
            open: None,
        })
    }

    /// Entries below this are archived.
    pub fn end(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.end)
    }

    /// Each segment file against its recorded digest.
    pub fn check_files(&self) -> Result<(), String> {
        for s in &self.segments {
            let digest = crate::util::file_sha256_hex(&s.path)
                .map_err(|e| format!("segment {} is unreadable: {e}", s.path.display()))?;
            if digest != s.sha256 {
                return Err(format!(
                    "segment {} does not match its recorded digest",
                    s.path.display()
                ));
            }
        }
        Ok(())
    }

    /// The body of archived entry `index`.
    pub fn body(&mut self, index: u64) -> Result<String, String> {
        let segment = self
            .segments
            .iter()
            .position(|s| s.first <= index && index < s.end)
            .ok_or_else(|| format!("entry {index} is in no archived segment"))?;
        let rewind = match &self.open {
            Some(o) => o.segment != segment || o.batch.as_ref().is_some_and(|(f, _)| *f > index),
            None => true,
        };
        if rewind {
            let path = &self.segments[segment].path;
            let file = std::fs::File::open(path)
                .map_err(|e| format!("segment {} is unreadable: {e}", path.display()))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.with_batch_size(BATCH).build())
                .map_err(|e| format!("segment {} is unreadable: {e}", path.display()))?;
            self.open = Some(OpenSegment {
                segment,
                reader,
                batch: None,
            });
        }
        let Some(open) = self.open.as_mut() else {
            return Err("no segment open".into());
        };
        loop {
            if let Some((start, bodies)) = &open.batch
                && index < start + bodies.len() as u64
            {
                return Ok(bodies.value((index - start) as usize).to_string());
            }
            let next_start = open
                .batch
                .as_ref()
                .map_or(self.segments[segment].first, |(s, b)| s + b.len() as u64);
            let batch = open
                .reader
                .next()
                .ok_or_else(|| format!("entry {index} is missing from its segment"))?
                .map_err(|e| format!("segment unreadable: {e}"))?;
            let idx = batch
                .column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .ok_or("segment index column is not integers")?;
            if idx.is_empty() || idx.value(0) != next_start {
                return Err(format!("segment entries out of order near {next_start}"));
            }
            let bodies = batch
                .column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or("segment body column is not text")?
                .clone();
            open.batch = Some((next_start, bodies));
        }
    }

    /// `body` unless the entry is archived, where it is read from its segment.
    pub fn fill<'a>(
        &mut self,
        index: u64,
        body: &'a str,
    ) -> Result<std::borrow::Cow<'a, str>, String> {
        if body.is_empty() && index < self.end() {
            self.body(index).map(std::borrow::Cow::Owned)
        } else {
            Ok(std::borrow::Cow::Borrowed(body))
        }
    }
}
