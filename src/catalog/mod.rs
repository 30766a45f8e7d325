//! The catalog: dataset manifests (`catalog/*.json`) and the DataFusion
//! tables behind them. Manifests are validated against
//! `schemas/dataset.schema.json` and against their own data before a dataset
//! becomes queryable.

use crate::validate::{self, Problem};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod clustered;
pub mod consent;
mod domain;
pub mod location;
mod per_unit;
pub mod registry;
pub use domain::{Domain, MAX_DOMAIN_VALUES};
pub use per_unit::{Part, ROWS, UnitSummary, clamped};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    General,
    Important,
    Core,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::General => "general",
            Level::Important => "important",
            Level::Core => "core",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnClass {
    Identifier,
    QuasiIdentifier,
    Sensitive,
    Attribute,
}

impl ColumnClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnClass::Identifier => "identifier",
            ColumnClass::QuasiIdentifier => "quasi_identifier",
            ColumnClass::Sensitive => "sensitive",
            ColumnClass::Attribute => "attribute",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    Parquet,
    Csv,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub format: SourceFormat,
    pub location: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColumnSpec {
    pub name: String,
    pub class: ColumnClass,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joinable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Narrows the scalar functions the class allows on this column (never widens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
    /// Narrows the aggregates the class allows on this column (never widens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregates: Option<Vec<String>>,
    /// What attribute of a person the column describes, shared by columns of
    /// other datasets that describe the same (`telecom_usage.district` and
    /// `city_health.district`); prohibited combinations are checked by it.
    /// Without it, the column describes only itself (`dataset.column`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meaning: Option<String>,
    /// The values the column can take, public (see [`Domain`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<Domain>,
    /// The kind of values the owner declares the data holds; checked at registration.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
}

/// A column's kind of values, as an owner declares it (any width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Integer,
    Float,
    Decimal,
    String,
    Boolean,
    Date,
    Timestamp,
}

impl Kind {
    pub fn of(t: &DataType) -> Option<Kind> {
        Some(match t {
            t if t.is_integer() => Kind::Integer,
            DataType::Float16 | DataType::Float32 | DataType::Float64 => Kind::Float,
            DataType::Decimal128(..) | DataType::Decimal256(..) => Kind::Decimal,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Kind::String,
            DataType::Boolean => Kind::Boolean,
            DataType::Date32 | DataType::Date64 => Kind::Date,
            DataType::Timestamp(..) => Kind::Timestamp,
            _ => return None,
        })
    }
}

impl ColumnSpec {
    /// The attribute the column describes (see `meaning`).
    pub fn meaning_in(&self, dataset: &str) -> String {
        self.meaning
            .clone()
            .unwrap_or_else(|| format!("{dataset}.{}", self.name))
    }

    pub fn narrows_out_function(&self, name: &str) -> bool {
        self.functions
            .as_ref()
            .is_some_and(|f| !f.iter().any(|x| x == name))
    }

    pub fn narrows_out_aggregate(&self, name: &str) -> bool {
        self.aggregates
            .as_ref()
            .is_some_and(|a| !a.iter().any(|x| x == name))
    }
}

/// The noise added to released values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMechanism {
    /// Discrete Laplace: pure epsilon for the values.
    #[default]
    Laplace,
    /// Discrete Gaussian: (epsilon, delta), lighter tails.
    Gaussian,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DpRules {
    #[serde(default)]
    pub mechanism: DpMechanism,
    pub epsilon_per_query: f64,
    #[serde(default)]
    pub delta: f64,
    /// The dataset's lifetime epsilon, shared by all buyers; the server default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_total: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_unit: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReleaseRules {
    /// Fewest distinct privacy units (rows, for non-personal data) a released group covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_group_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<DpRules>,
    /// Every answer reading the dataset waits for its owner's review.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub review: bool,
}

/// What a buyer pays: amounts are decimal strings in `currency`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pricing {
    pub currency: String,
    pub per_query: String,
    pub per_million_rows_scanned: String,
    /// Per unit of epsilon a query spends on the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_epsilon: Option<String>,
    /// A grant's fee per calendar month it covers the dataset (settled per period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_subscription: Option<String>,
    /// Answered queries per grant and calendar month that cost nothing per query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_queries_per_month: Option<u64>,
}

/// How the quality card is computed (see `quality`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvaluationRules {
    /// Epsilon the card of a personal dataset spends from its lifetime budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// The column whose time range the card reports (else the first date or
    /// timestamp column that is neither identifying nor sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_column: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub title: String,
    pub owner: String,
    #[serde(default)]
    pub description: String,
    pub source: Source,
    pub level: Level,
    pub region: String,
    pub personal_information: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_column: Option<String>,
    pub columns: Vec<ColumnSpec>,
    #[serde(default)]
    pub release: ReleaseRules,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationRules>,
    /// The security-use commitment a buyer signs to be granted access
    /// (a platform default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment: Option<String>,
}

impl Manifest {
    pub fn column(&self, name: &str) -> Option<&ColumnSpec> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// A dataset whose releases must be thresholded: personal data, or data
    /// whose owner set a minimum group size.
    pub fn is_guarded(&self) -> bool {
        self.privacy_unit.is_some() || self.release.min_group_size.is_some()
    }

    /// Where a manifest does not make sense on its own (beyond the JSON
    /// Schema): each problem with the JSON Pointer of the field at fault.
    pub fn semantic_problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.columns.iter().enumerate() {
            if !seen.insert(c.name.as_str()) {
                problems.push((
                    format!("/columns/{i}/name"),
                    format!("column '{}' is declared twice", c.name),
                ));
            }
            if let Some([lo, hi]) = c.bounds
                && !(lo.is_finite() && hi.is_finite() && lo <= hi)
            {
                problems.push((
                    format!("/columns/{i}/bounds"),
                    format!("column '{}' has bounds with lower > upper", c.name),
                ));
            }
            if let Some(problem) = c.domain.as_ref().and_then(Domain::problem) {
                problems.push((
                    format!("/columns/{i}/domain"),
                    format!("column '{}': {problem}", c.name),
                ));
            }
        }
        if self.release.dp.is_some() && self.privacy_unit.is_none() {
            problems.push((
                "/release/dp".into(),
                "differential privacy (release.dp) needs a privacy_unit".into(),
            ));
        }
        if self.personal_information && self.privacy_unit.is_none() {
            problems.push((
                "/personal_information".into(),
                "personal_information is true but no privacy_unit is declared".into(),
            ));
        }
        let time_column = self.evaluation.as_ref().and_then(|e| e.time_column.clone());
        for (what, name) in [
            ("privacy_unit", &self.privacy_unit),
            ("consent_column", &self.consent_column),
            ("evaluation/time_column", &time_column),
        ] {
            if let Some(name) = name
                && self.column(name).is_none()
            {
                problems.push((
                    format!("/{what}"),
                    format!("{what} '{name}' is not a declared column"),
                ));
            }
        }
        problems
    }
}

/// A registered dataset: its manifest and the table that serves it.
pub struct Dataset {
    pub manifest: Manifest,
    /// The files on disk. Queries go through [`Dataset::table`].
    pub provider: Arc<dyn TableProvider>,
    /// The whole dataset decoded in memory, for small ones; valid like `unit_constant`.
    pub(crate) in_memory: Option<Arc<dyn TableProvider>>,
    pub schema: SchemaRef,
    pub num_rows: u64,
    /// Size of the data on disk; with `num_rows`, what a scan is metered as.
    pub num_bytes: u64,
    pub manifest_path: PathBuf,
    /// The SHA-256 of the manifest as registered (the ledger records it).
    pub manifest_sha256: String,
    /// The SHA-256 of the data's files (names and bytes) when registered.
    pub data_sha256: String,
    /// The data-asset evaluation published with the listing, set once computed.
    pub quality: std::sync::OnceLock<serde_json::Value>,
    /// Groupable columns that hold one value per privacy unit, measured at
    /// registration; valid while the data on disk is unchanged (`fingerprint`).
    pub unit_constant: BTreeSet<String>,
    /// One row per privacy unit, taken at registration; valid like `unit_constant`.
    pub(crate) summary: Option<Arc<UnitSummary>>,
    pub(crate) location: PathBuf,
    pub(crate) fingerprint: Fingerprint,
}

/// What the data on disk looked like when its statistics were taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Fingerprint(Vec<(PathBuf, u64, Option<std::time::SystemTime>)>);

fn fingerprint(path: &Path) -> Fingerprint {
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => {
                if let Ok(entries) = std::fs::read_dir(&p) {
                    stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
                }
            }
            Ok(m) => files.push((p, m.len(), m.modified().ok())),
            Err(_) => files.push((p, 0, None)),
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Fingerprint(files)
}

impl Dataset {
    /// How many rows each privacy unit has (one count per unit, unordered);
    /// empty for a dataset without a privacy unit.
    pub async fn rows_per_unit(&self) -> Result<Vec<u64>, String> {
        use datafusion::arrow::array::{Array, Int64Array};
        let Some(unit) = &self.manifest.privacy_unit else {
            return Ok(Vec::new());
        };
        let ctx = SessionContext::new();
        ctx.register_table("t", self.provider.clone())
            .map_err(|e| e.to_string())?;
        let batches = ctx
            .sql(&format!("SELECT COUNT(*) FROM t GROUP BY \"{unit}\""))
            .await
            .map_err(|e| e.to_string())?
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let mut counts = Vec::new();
        for b in &batches {
            let c = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or("row counts are not integers")?;
            counts.extend((0..c.len()).map(|i| c.value(i).max(0) as u64));
        }
        Ok(counts)
    }

    /// Which version of the dataset this is: its manifest and the size of
    /// its data when registered.
    pub fn version(&self) -> String {
        format!(
            "{}:{}:{}",
            self.id(),
            self.manifest_sha256,
            self.data_sha256
        )
    }

    /// Whether `column` holds one value per privacy unit in the data as it is now.
    pub fn is_unit_constant(&self, column: &str) -> bool {
        self.unit_constant.contains(column) && self.unchanged()
    }

    /// The unit summary, if the data on disk is still what it was taken from.
    pub fn summary(&self) -> Option<&Arc<UnitSummary>> {
        self.summary.as_ref().filter(|_| self.unchanged())
    }

    /// What queries read: the in-memory copy while the data on disk is
    /// still what it was taken from, else the files.
    pub fn table(&self) -> Arc<dyn TableProvider> {
        match &self.in_memory {
            Some(table) if self.unchanged() => table.clone(),
            _ => self.provider.clone(),
        }
    }

    /// Whether the data on disk is still what registration measured.
    fn unchanged(&self) -> bool {
        fingerprint(&self.location) == self.fingerprint
    }

    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    pub fn data_type(&self, column: &str) -> Option<&DataType> {
        self.schema
            .field_with_name(column)
            .ok()
            .map(|f| f.data_type())
    }
}

#[derive(Default, Clone)]
pub struct Catalog {
    pub datasets: BTreeMap<String, Arc<Dataset>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Io(String),
    #[error("invalid manifests:\n{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
    #[error("dataset '{dataset}': {message}")]
    Data { dataset: String, message: String },
    /// The data does not match its manifest; each problem at its field.
    #[error("dataset '{dataset}': {}", .problems.iter().map(|(at, m)| format!("{at}: {m}")).collect::<Vec<_>>().join("; "))]
    Mismatch {
        dataset: String,
        problems: Vec<(String, String)>,
    },
}

/// Every `*.json` file directly under `dir`, sorted so loading is deterministic.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, CatalogError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        CatalogError::Io(format!("cannot read catalog folder {}: {e}", dir.display()))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Reads and validates every manifest, without touching the data.
pub fn read_manifests(
    dir: &Path,
    schemas: &validate::Schemas,
) -> Result<Vec<(PathBuf, Manifest)>, CatalogError> {
    let mut problems = Vec::new();
    let mut manifests = Vec::new();
    for path in manifest_files(dir)? {
        match validate::load_validated::<Manifest>(&path, &schemas.dataset) {
            Ok(m) => {
                for (at, p) in m.semantic_problems() {
                    problems.push(Problem::new(&path, &at, p));
                }
                manifests.push((path, m));
            }
            Err(mut found) => problems.append(&mut found),
        }
    }
    let mut ids = std::collections::HashSet::new();
    for (path, m) in &manifests {
        if !ids.insert(m.id.clone()) {
            problems.push(Problem::new(
                path,
                "/id",
                format!("dataset id '{}' is used twice", m.id),
            ));
        }
    }
    if problems.is_empty() {
        Ok(manifests)
    } else {
        Err(CatalogError::Invalid(problems))
    }
}

/// Resolves a manifest's data location: relative to the catalog folder, or absolute.
pub fn data_location(catalog_dir: &Path, manifest: &Manifest) -> PathBuf {
    let loc = Path::new(&manifest.source.location);
    if loc.is_absolute() {
        loc.to_path_buf()
    } else {
        catalog_dir.join(loc)
    }
}

impl Catalog {
    /// The protected dataset this plan node scans, if it is a scan of one:
    /// rows that may leave only through a release aggregate. The one
    /// definition the policy check and the release split share.
    pub fn guarded_scan(
        &self,
        plan: &datafusion::logical_expr::LogicalPlan,
    ) -> Option<&Arc<Dataset>> {
        match plan {
            datafusion::logical_expr::LogicalPlan::TableScan(scan) => self
                .get(scan.table_name.table())
                .filter(|d| d.manifest.is_guarded()),
            _ => None,
        }
    }

    /// Loads every manifest and opens its data. Fails on the first dataset
    /// whose data does not match its manifest.
    pub async fn load(dir: &Path, schemas: &validate::Schemas) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog::default();
        for (path, manifest) in read_manifests(dir, schemas)? {
            let dataset = open_dataset(dir, path, manifest).await?;
            catalog
                .datasets
                .insert(dataset.id().to_string(), Arc::new(dataset));
        }
        Ok(catalog)
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Dataset>> {
        self.datasets.get(id)
    }
}

pub async fn open_dataset(
    catalog_dir: &Path,
    manifest_path: PathBuf,
    manifest: Manifest,
) -> Result<Dataset, CatalogError> {
    let location = data_location(catalog_dir, &manifest);
    inspect(location, manifest_path, manifest)
        .await?
        .prepare(&|_| {})
        .await
}

/// A dataset's data opened and checked against its manifest, not yet
/// counted or summarised: what registration checks before it answers.
pub struct Inspected {
    manifest: Manifest,
    manifest_path: PathBuf,
    location: PathBuf,
    ctx: SessionContext,
    provider: Arc<dyn TableProvider>,
    schema: SchemaRef,
}

/// Opens the data at `location` and checks it against `manifest`: every
/// data column classified, every declared column present with its declared
/// kind, bounds only on numbers, domains of the column's type.
pub async fn inspect(
    location: PathBuf,
    manifest_path: PathBuf,
    manifest: Manifest,
) -> Result<Inspected, CatalogError> {
    let mismatch = |problems: Vec<(String, String)>| CatalogError::Mismatch {
        dataset: manifest.id.clone(),
        problems,
    };
    let at_source = |message: String| mismatch(vec![("/source/location".into(), message)]);
    if !location.exists() {
        return Err(at_source(format!(
            "data not found at {}",
            location.display()
        )));
    }
    let location_str = location.to_string_lossy().to_string();
    let ctx = SessionContext::new();
    let registered = match manifest.source.format {
        SourceFormat::Parquet => {
            ctx.register_parquet("t", &location_str, ParquetReadOptions::default())
                .await
        }
        SourceFormat::Csv => {
            ctx.register_csv("t", &location_str, CsvReadOptions::new().has_header(true))
                .await
        }
    };
    registered.map_err(|e| at_source(format!("cannot open data: {e}")))?;
    let provider = ctx
        .table_provider("t")
        .await
        .map_err(|e| at_source(e.to_string()))?;
    let schema = provider.schema();
    let mut problems = Vec::new();
    for (i, column) in manifest.columns.iter().enumerate() {
        let Ok(field) = schema.field_with_name(&column.name) else {
            problems.push((
                format!("/columns/{i}/name"),
                format!("column '{}' is declared but not in the data", column.name),
            ));
            continue;
        };
        let found = Kind::of(field.data_type());
        if let Some(declared) = column.kind
            && found != Some(declared)
        {
            problems.push((
                format!("/columns/{i}/type"),
                format!(
                    "column '{}' is declared {declared:?} but the data holds {}",
                    column.name,
                    field.data_type()
                ),
            ));
        }
        if column.bounds.is_some() && !field.data_type().is_numeric() {
            problems.push((
                format!("/columns/{i}/bounds"),
                format!("column '{}' has bounds but is not numeric", column.name),
            ));
        }
        if let Some(Err(problem)) = column.domain.as_ref().map(|d| d.array(field.data_type())) {
            problems.push((
                format!("/columns/{i}/domain"),
                format!("column '{}': {problem}", column.name),
            ));
        }
    }
    for field in schema.fields() {
        if manifest.column(field.name()).is_none() {
            problems.push((
                "/columns".into(),
                format!(
                    "column '{}' is in the data but has no classification in the manifest",
                    field.name()
                ),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(mismatch(problems));
    }
    Ok(Inspected {
        manifest,
        manifest_path,
        location,
        ctx,
        provider,
        schema,
    })
}

impl Inspected {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Counts, digests and summarises the data: everything the release
    /// mechanisms use. `progress` hears which step is running.
    pub async fn prepare(self, progress: &(dyn Fn(&str) + Sync)) -> Result<Dataset, CatalogError> {
        let Inspected {
            manifest,
            manifest_path,
            location,
            ctx,
            provider,
            schema,
        } = self;
        let data_err = |message: String| CatalogError::Data {
            dataset: manifest.id.clone(),
            message,
        };
        progress("counting rows");
        let num_rows = count_rows(&ctx)
            .await
            .map_err(|e| data_err(format!("cannot count rows: {e}")))?;
        let num_bytes = disk_size(&location);
        let fingerprint = fingerprint(&location);
        progress("digesting the data");
        let data_sha256 = location::data_sha256(&location)
            .map_err(|e| data_err(format!("cannot read the data: {e}")))?;
        progress("summarising per privacy unit");
        let per_unit = per_unit::measure(&location, &fingerprint, &manifest, &schema).await;
        progress("loading into memory");
        let in_memory =
            match clustered_copy(&ctx, &manifest, &location, &fingerprint, num_bytes).await {
                Some(table) => Some(table),
                None if num_bytes <= IN_MEMORY_DISK_BYTES => decoded(&ctx, schema.clone()).await,
                None => None,
            };
        let manifest_sha256 = crate::util::sha256_hex(
            serde_json::to_string(&manifest)
                .unwrap_or_default()
                .as_bytes(),
        );
        Ok(Dataset {
            manifest,
            provider,
            in_memory,
            schema,
            num_rows,
            num_bytes,
            manifest_path,
            manifest_sha256,
            data_sha256,
            quality: std::sync::OnceLock::new(),
            unit_constant: per_unit.constant,
            summary: per_unit.summary,
            location,
            fingerprint,
        })
    }
}

/// Datasets up to this size on disk are also kept decoded in memory (at
/// most [`IN_MEMORY_BYTES`]): a small query on a small table otherwise spends
/// most of its time opening and decoding Parquet, again for every query.
const IN_MEMORY_DISK_BYTES: u64 = 16 << 20;
const IN_MEMORY_BYTES: usize = 128 << 20;

/// A DP dataset up to this size on disk is kept in memory clustered by its
/// privacy unit (at most [`CLUSTERED_BYTES`] decoded), so that releases from
/// its rows bound each unit as the rows stream past instead of hashing
/// every (unit, group).
const CLUSTERED_DISK_BYTES: u64 = 1 << 30;
const CLUSTERED_BYTES: usize = 2 << 30;

/// Clustered copies of unchanged data, shared by every sandbox of the
/// process that registers the same files (as tests and the bench do), and
/// dropped with the last dataset that holds one.
type ClusteredCopies = std::collections::HashMap<
    (PathBuf, String, Option<String>),
    (Fingerprint, std::sync::Weak<clustered::ClusteredTable>),
>;

/// Table `t` of `ctx` clustered by the privacy unit, when `manifest` releases
/// it under differential privacy and it fits.
async fn clustered_copy(
    ctx: &SessionContext,
    manifest: &Manifest,
    location: &Path,
    fingerprint: &Fingerprint,
    disk_bytes: u64,
) -> Option<Arc<dyn TableProvider>> {
    static COPIES: std::sync::OnceLock<std::sync::Mutex<ClusteredCopies>> =
        std::sync::OnceLock::new();
    let unit = manifest.privacy_unit.as_ref()?;
    if manifest.release.dp.is_none() || disk_bytes > CLUSTERED_DISK_BYTES {
        return None;
    }
    let copies = COPIES.get_or_init(Default::default);
    let consent = manifest.consent_column.as_deref();
    let key = (
        location.to_path_buf(),
        unit.clone(),
        consent.map(str::to_string),
    );
    {
        let known = copies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, copy)) = known.get(&key)
            && at == fingerprint
            && let Some(copy) = copy.upgrade()
        {
            return Some(copy);
        }
    }
    let partitions = crate::util::query_partitions();
    let copy = match clustered::ClusteredTable::build(
        ctx,
        "t",
        unit,
        consent,
        partitions,
        CLUSTERED_BYTES,
    )
    .await
    {
        Ok(Some(copy)) => Arc::new(copy),
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(dataset = %manifest.id, error = %e, "not clustered by privacy unit");
            return None;
        }
    };
    tracing::info!(dataset = %manifest.id, bytes = copy.bytes(), "clustered by privacy unit");
    if self::fingerprint(location) == *fingerprint {
        let mut known = copies.lock().unwrap_or_else(|p| p.into_inner());
        known.insert(key, (fingerprint.clone(), Arc::downgrade(&copy)));
    }
    Some(copy)
}

/// Table `t` of `ctx`, decoded, as one in-memory partition; `None` if it is
/// larger than [`IN_MEMORY_BYTES`] decoded or cannot be read.
async fn decoded(ctx: &SessionContext, schema: SchemaRef) -> Option<Arc<dyn TableProvider>> {
    let batches = ctx.table("t").await.ok()?.collect().await.ok()?;
    let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
    if bytes > IN_MEMORY_BYTES {
        return None;
    }
    let table = datafusion::datasource::MemTable::try_new(schema, vec![batches]).ok()?;
    Some(Arc::new(table))
}

async fn count_rows(ctx: &SessionContext) -> datafusion::error::Result<u64> {
    use datafusion::arrow::array::{Array, Int64Array};
    let batches = ctx.sql("SELECT COUNT(*) FROM t").await?.collect().await?;
    let n = batches
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .filter(|a| !a.is_empty())
                .map(|a| a.value(0))
        })
        .unwrap_or(0);
    Ok(n.max(0) as u64)
}

fn disk_size(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| disk_size(&e.path()))
                    .sum()
            })
            .unwrap_or(0),
        _ => 0,
    }
}

/// Rows made up from the schema and the declared bounds alone: what a buyer
/// may see of a dataset before access. No real row is read.
pub fn synthetic_preview(
    dataset: &Dataset,
    n: usize,
) -> (Vec<serde_json::Value>, Vec<Vec<serde_json::Value>>) {
    use serde_json::{Value, json};
    let mut rng = crate::util::Rng::new(0x5EED ^ dataset.id().len() as u64);
    let columns = dataset
        .schema
        .fields()
        .iter()
        .map(|f| json!({ "name": f.name(), "type": f.data_type().to_string() }))
        .collect();
    let rows = (0..n)
        .map(|i| {
            dataset
                .schema
                .fields()
                .iter()
                .map(|f| {
                    let bounds = dataset
                        .manifest
                        .column(f.name())
                        .and_then(|c| c.bounds)
                        .unwrap_or([0.0, 100.0]);
                    let x = bounds[0] + rng.unit() * (bounds[1] - bounds[0]);
                    match f.data_type() {
                        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                            json!(x.round() as i64)
                        }
                        DataType::UInt8
                        | DataType::UInt16
                        | DataType::UInt32
                        | DataType::UInt64 => json!(x.round().max(0.0) as u64),
                        DataType::Float32 | DataType::Float64 => json!((x * 100.0).round() / 100.0),
                        DataType::Boolean => json!(rng.unit() < 0.5),
                        DataType::Date32 | DataType::Date64 => {
                            json!(format!("2025-01-{:02}", 1 + i % 28))
                        }
                        DataType::Timestamp(..) => json!(format!("2025-01-01T{:02}:00:00", i % 24)),
                        _ => Value::String(format!("{}_{}", f.name(), 1 + rng.below(9))),
                    }
                })
                .collect()
        })
        .collect();
    (columns, rows)
}

/// A catalog of some of the repository's manifests, edited, over demo data
/// at scale 0.01, in a folder that lives as long as the returned guard.
#[cfg(test)]
pub(crate) async fn demo_catalog(
    manifests: &[&str],
    edit: impl Fn(&mut serde_json::Value),
) -> (tempfile::TempDir, Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("catalog");
    crate::demo::catalog_folder(&repo, dir.path(), manifests, 0.01, edit).unwrap();
    let catalog = Catalog::load(dir.path(), &validate::Schemas::compiled())
        .await
        .unwrap();
    (dir, catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unit_constant_columns_are_measured_and_forgotten_when_the_data_changes() {
        let (dir, catalog) =
            demo_catalog(&["city_health.json", "telecom_usage.json"], |_| {}).await;
        let health = catalog.get("city_health").unwrap();
        for c in ["district", "age", "gender"] {
            assert!(health.is_unit_constant(c), "{c} is one value per person");
        }
        assert!(!health.is_unit_constant("visit_date"));
        let telecom = catalog.get("telecom_usage").unwrap();
        assert!(telecom.is_unit_constant("district") && !telecom.is_unit_constant("month"));
        // New data under the same name: the measurement no longer holds.
        let path = data_location(dir.path(), &health.manifest);
        let bytes = std::fs::read(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, [bytes.as_slice(), b""].concat()).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert!(!health.is_unit_constant("district"));
    }

    #[tokio::test]
    async fn small_datasets_are_read_from_memory_until_the_files_change() {
        let (dir, catalog) = demo_catalog(&["enterprise_registry.json"], |_| {}).await;
        let registry = catalog.get("enterprise_registry").unwrap();
        let rows_read = |table: Arc<dyn TableProvider>| async move {
            let ctx = SessionContext::new();
            ctx.register_table("t", table).unwrap();
            count_rows(&ctx).await.unwrap()
        };
        let in_memory = registry.in_memory.clone().expect("a small dataset");
        assert!(Arc::ptr_eq(&registry.table(), &in_memory));
        assert_eq!(rows_read(registry.table()).await, registry.num_rows);
        // Twice the rows under the same name: queries read the files again.
        let bigger = tempfile::tempdir().unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("catalog");
        let names = ["enterprise_registry.json"];
        crate::demo::catalog_folder(&repo, bigger.path(), &names, 0.02, |_| {}).unwrap();
        let path = data_location(dir.path(), &registry.manifest);
        std::fs::copy(data_location(bigger.path(), &registry.manifest), &path).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert!(!Arc::ptr_eq(&registry.table(), &in_memory));
        assert_eq!(rows_read(registry.table()).await, 2 * registry.num_rows);
    }
}
