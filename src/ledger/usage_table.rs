//! The auditors' `usage` table (`POST /v1/audit/sql`): one row per query
//! entry, read from the typed rows the append transaction keeps — never by
//! parsing entries, never the whole ledger per request. Comparisons of a
//! column with a literal, the projection and `LIMIT` are pushed into SQLite;
//! a bare `COUNT(*)` reads a counter; at most [`MAX_ROWS_READ`] rows are read.

use super::usage::UsageRecord;
use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags};
use std::path::PathBuf;
use std::sync::Arc;

/// Most rows one audit query reads from the ledger.
pub const MAX_ROWS_READ: usize = 1_000_000;

pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS query_usage (
    ledger_index INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    day TEXT NOT NULL,
    principal TEXT NOT NULL,
    grant_id TEXT,
    purpose TEXT,
    datasets TEXT NOT NULL,
    decision TEXT NOT NULL,
    code TEXT,
    rule TEXT,
    rows_scanned INTEGER NOT NULL,
    bytes_scanned INTEGER NOT NULL,
    cpu_ms INTEGER NOT NULL,
    wall_ms INTEGER NOT NULL,
    groups_released INTEGER NOT NULL,
    groups_suppressed INTEGER NOT NULL,
    cells_released INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    charge_micros INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS query_usage_day ON query_usage (day);
CREATE INDEX IF NOT EXISTS query_usage_decision ON query_usage (decision, rule);
"#;

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Count,
    Real,
    Micros,
}

/// The columns, in table order: the SQLite and the Arrow names are the same.
const COLUMNS: [(&str, Kind); 19] = [
    ("ledger_index", Kind::Count),
    ("at", Kind::Text),
    ("day", Kind::Text),
    ("principal", Kind::Text),
    ("grant_id", Kind::Text),
    ("purpose", Kind::Text),
    ("datasets", Kind::Text),
    ("decision", Kind::Text),
    ("code", Kind::Text),
    ("rule", Kind::Text),
    ("rows_scanned", Kind::Count),
    ("bytes_scanned", Kind::Count),
    ("cpu_ms", Kind::Count),
    ("wall_ms", Kind::Count),
    ("groups_released", Kind::Count),
    ("groups_suppressed", Kind::Count),
    ("cells_released", Kind::Count),
    ("epsilon", Kind::Real),
    ("charge_micros", Kind::Micros),
];

/// The record's values in table order, borrowed from it (`datasets` is
/// its dataset list joined with commas, the one value it does not hold).
fn values<'a>(r: &'a UsageRecord, datasets: &'a str) -> [ValueRef<'a>; 19] {
    let text = |s: &'a str| ValueRef::Text(s.as_bytes());
    let opt = |s: &'a Option<String>| s.as_deref().map_or(ValueRef::Null, text);
    let int = |n: u64| ValueRef::Integer(n as i64);
    [
        int(r.ledger_index),
        text(&r.at),
        text(&r.day),
        text(&r.principal),
        opt(&r.grant_id),
        opt(&r.purpose),
        text(datasets),
        text(&r.decision),
        opt(&r.code),
        opt(&r.rule),
        int(r.rows_scanned),
        int(r.bytes_scanned),
        int(r.cpu_ms),
        int(r.wall_ms),
        int(r.groups_released),
        int(r.groups_suppressed),
        int(r.cells_released),
        ValueRef::Real(r.epsilon),
        ValueRef::Integer(r.charge_micros),
    ]
}

/// Stores a query entry's row and counts it (in the append transaction).
pub fn insert(conn: &Connection, r: &UsageRecord) -> rusqlite::Result<()> {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        let marks: Vec<String> = (1..=COLUMNS.len()).map(|i| format!("?{i}")).collect();
        format!(
            "INSERT INTO query_usage ({}) VALUES ({})",
            column_list(""),
            marks.join(", ")
        )
    });
    conn.prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(
            values(r, &r.datasets.join(",")).map(rusqlite::types::ToSqlOutput::Borrowed),
        ))?;
    conn.prepare_cached(
        "INSERT INTO ledger_state (key, value) VALUES ('query_entries', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1",
    )?
    .execute([])?;
    Ok(())
}

/// How many columns a row has.
pub const COLUMN_COUNT: usize = COLUMNS.len();

/// The column names, each prefixed (`q.ledger_index, q.at, …`), for queries
/// that read the rows beside others (`verify`).
pub fn column_list(prefix: &str) -> String {
    COLUMNS
        .iter()
        .map(|(n, _)| format!("{prefix}{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a stored row is the record's row.
pub fn matches(r: &UsageRecord, row: &[ValueRef<'_>]) -> bool {
    row == values(r, &r.datasets.join(","))
}

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(
        COLUMNS
            .iter()
            .map(|(name, kind)| {
                let (ty, nullable) = match kind {
                    Kind::Text => (DataType::Utf8, true),
                    Kind::Count => (DataType::UInt64, false),
                    Kind::Real => (DataType::Float64, false),
                    Kind::Micros => (DataType::Int64, false),
                };
                Field::new(*name, ty, nullable)
            })
            .collect::<Vec<_>>(),
    ))
}

/// The `usage` table over a ledger's database file.
#[derive(Debug)]
pub struct UsageTable {
    db: PathBuf,
    schema: SchemaRef,
    /// How long one read of the ledger may take before SQLite is interrupted
    /// (a scan over an unindexed column of a long ledger; the request's own
    /// timeout cannot stop a blocking read).
    time_limit: std::time::Duration,
}

impl UsageTable {
    pub fn new(data_dir: &std::path::Path, time_limit: std::time::Duration) -> UsageTable {
        UsageTable {
            db: data_dir.join("frostglass.db"),
            schema: schema(),
            time_limit,
        }
    }
}

/// `column <op> literal` (either way round) as SQL, if it is one.
fn pushed(e: &Expr) -> Option<(String, Value)> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else {
        return None;
    };
    let (column, literal, op) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Literal(v, _)) => (c, v, *op),
        (Expr::Literal(v, _), Expr::Column(c)) => (c, v, op.swap()?),
        _ => return None,
    };
    let sql_op = match op {
        Operator::Eq => "=",
        Operator::NotEq => "<>",
        Operator::Lt => "<",
        Operator::LtEq => "<=",
        Operator::Gt => ">",
        Operator::GtEq => ">=",
        _ => return None,
    };
    let Column { name, .. } = column;
    COLUMNS.iter().find(|(n, _)| n == name)?;
    let value = match literal {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => Value::Text(s.clone()),
        ScalarValue::Int64(Some(n)) => Value::Integer(*n),
        ScalarValue::Int32(Some(n)) => Value::Integer(i64::from(*n)),
        ScalarValue::UInt64(Some(n)) => Value::Integer(i64::try_from(*n).ok()?),
        ScalarValue::Float64(Some(x)) => Value::Real(*x),
        _ => return None,
    };
    Some((format!("{name} {sql_op} ?"), value))
}

fn read(
    db: &std::path::Path,
    schema: &SchemaRef,
    columns: &[usize],
    filters: &[(String, Value)],
    limit: Option<usize>,
    time_limit: std::time::Duration,
) -> Result<Vec<RecordBatch>> {
    let deadline = std::time::Instant::now() + time_limit;
    let sql_err = move |e: rusqlite::Error| {
        if std::time::Instant::now() > deadline {
            DataFusionError::ResourcesExhausted(format!(
                "an audit query may read the ledger for {} ms; filter by day, principal, grant or decision",
                time_limit.as_millis()
            ))
        } else {
            DataFusionError::External(Box::new(e))
        }
    };
    let conn =
        Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql_err)?;
    // The request's timeout cannot stop a blocking read: a watchdog
    // interrupts SQLite at the deadline, unless the read ends first (the
    // sender is dropped with this function).
    let (_reading, done) = std::sync::mpsc::channel::<()>();
    let interrupt = conn.get_interrupt_handle();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(time_limit) {
            interrupt.interrupt();
        }
    });
    let clause = if filters.is_empty() {
        String::new()
    } else {
        let conditions: Vec<&str> = filters.iter().map(|(c, _)| c.as_str()).collect();
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let params = rusqlite::params_from_iter(filters.iter().map(|(_, v)| v));
    let projected = Arc::new(schema.project(columns)?);
    if columns.is_empty() {
        // COUNT(*): rows with no columns; a counter when nothing filters.
        let n: i64 = if filters.is_empty() {
            conn.query_row(
                "SELECT COALESCE((SELECT value FROM ledger_state WHERE key = 'query_entries'), 0)",
                [],
                |r| r.get(0),
            )
        } else {
            conn.query_row(
                &format!("SELECT COUNT(*) FROM query_usage{clause}"),
                params,
                |r| r.get(0),
            )
        }
        .map_err(sql_err)?;
        let n = limit.map_or(n as usize, |l| l.min(n as usize));
        let options = RecordBatchOptions::new().with_row_count(Some(n));
        return Ok(vec![RecordBatch::try_new_with_options(
            projected,
            vec![],
            &options,
        )?]);
    }
    let names: Vec<&str> = columns.iter().map(|i| COLUMNS[*i].0).collect();
    let cap = limit.unwrap_or(MAX_ROWS_READ).min(MAX_ROWS_READ + 1);
    let sql = format!(
        "SELECT {} FROM query_usage{clause} ORDER BY ledger_index LIMIT {cap}",
        names.join(", ")
    );
    let mut stmt = conn.prepare(&sql).map_err(sql_err)?;
    let mut rows = stmt.query(params).map_err(sql_err)?;
    let mut cells: Vec<Vec<Value>> = vec![Vec::new(); columns.len()];
    let mut count = 0usize;
    while let Some(row) = rows.next().map_err(sql_err)? {
        count += 1;
        if count > MAX_ROWS_READ {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "an audit query reads at most {MAX_ROWS_READ} rows of the ledger; filter by day, principal or grant"
            )));
        }
        for (i, out) in cells.iter_mut().enumerate() {
            out.push(row.get(i).map_err(sql_err)?);
        }
    }
    let arrays: Vec<ArrayRef> = columns
        .iter()
        .zip(cells)
        .map(|(i, values)| -> ArrayRef {
            let int = |v: &Value| match v {
                Value::Integer(n) => Some(*n),
                _ => None,
            };
            match COLUMNS[*i].1 {
                Kind::Text => Arc::new(StringArray::from(
                    values
                        .iter()
                        .map(|v| match v {
                            Value::Text(s) => Some(s.as_str()),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                )),
                Kind::Count => Arc::new(UInt64Array::from(
                    values
                        .iter()
                        .map(|v| int(v).unwrap_or(0).max(0) as u64)
                        .collect::<Vec<_>>(),
                )),
                Kind::Real => Arc::new(Float64Array::from(
                    values
                        .iter()
                        .map(|v| match v {
                            Value::Real(x) => *x,
                            Value::Integer(n) => *n as f64,
                            _ => 0.0,
                        })
                        .collect::<Vec<_>>(),
                )),
                Kind::Micros => Arc::new(Int64Array::from(
                    values
                        .iter()
                        .map(|v| int(v).unwrap_or(0))
                        .collect::<Vec<_>>(),
                )),
            }
        })
        .collect();
    Ok(vec![RecordBatch::try_new(projected, arrays)?])
}

#[async_trait::async_trait]
impl TableProvider for UsageTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| match pushed(f) {
                Some(_) => TableProviderFilterPushDown::Exact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let columns: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..COLUMNS.len()).collect());
        let filters: Vec<(String, Value)> = filters.iter().filter_map(pushed).collect();
        let (db, schema, time_limit) = (self.db.clone(), self.schema.clone(), self.time_limit);
        let projected_columns = columns.clone();
        let batches = tokio::task::spawn_blocking(move || {
            read(
                &db,
                &schema,
                &projected_columns,
                &filters,
                limit,
                time_limit,
            )
        })
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))??;
        let projected = Arc::new(self.schema.project(&columns)?);
        let exec: Arc<dyn ExecutionPlan> =
            MemorySourceConfig::try_new_exec(&[batches], projected, None)?;
        Ok(exec)
    }
}
