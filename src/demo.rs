//! The demo catalog's data, generated from a fixed seed, and the demo
//! principals a first start creates. Distributions are skewed on purpose
//! (costs, visit counts, seasonal load) so releases look like real ones.

use crate::catalog::{Manifest, SourceFormat, data_location};
use crate::util::Rng;
use datafusion::arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int64Array, StringArray, TimestampSecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub const DISTRICTS: [&str; 12] = [
    "dongcheng",
    "xicheng",
    "chaoyang",
    "haidian",
    "fengtai",
    "shijingshan",
    "tongzhou",
    "shunyi",
    "changping",
    "daxing",
    "fangshan",
    "mentougou",
];
const DISTRICT_WEIGHTS: [f64; 12] = [
    6.0, 6.0, 16.0, 14.0, 10.0, 3.0, 9.0, 7.0, 9.0, 8.0, 6.0, 1.5,
];
const SURNAMES: [&str; 16] = [
    "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Sun", "Ma",
    "Zhu", "Hu", "Guo",
];
const GIVEN: [&str; 16] = [
    "Wei", "Fang", "Na", "Min", "Jing", "Li", "Qiang", "Lei", "Jun", "Yang", "Yong", "Yan", "Jie",
    "Tao", "Ming", "Chao",
];
const DIAGNOSES: [&str; 10] = [
    "hypertension",
    "diabetes",
    "influenza",
    "fracture",
    "asthma",
    "gastritis",
    "migraine",
    "pneumonia",
    "dermatitis",
    "checkup",
];
const INDUSTRIES: [&str; 10] = [
    "manufacturing",
    "retail",
    "software",
    "finance",
    "logistics",
    "construction",
    "healthcare",
    "education",
    "catering",
    "energy",
];
pub const PURPOSES: [&str; 3] = [
    "public_health_research",
    "insurance_pricing",
    "urban_planning",
];

/// Row counts at scale 1, as the foundation issue fixes them.
pub struct Sizes {
    pub persons: usize,
    pub visits: usize,
    pub companies: usize,
    pub readings: usize,
}

impl Sizes {
    pub fn at(scale: f64) -> Sizes {
        let n = |base: f64| ((base * scale).round() as usize).max(1);
        Sizes {
            persons: n(40_000.0),
            visits: n(200_000.0),
            companies: n(50_000.0),
            readings: n(1_000_000.0),
        }
    }
}

struct Person {
    id: i64,
    name: String,
    id_card: String,
    district: &'static str,
    birth_year: i64,
    gender: &'static str,
    household: i64,
    consent: String,
}

fn persons(n: usize) -> Vec<Person> {
    let mut rng = Rng::new(0xF205_7000);
    (0..n)
        .map(|i| {
            let district = DISTRICTS[rng.weighted(&DISTRICT_WEIGHTS)];
            let age = ((rng.normal() * 20.0 + 42.0).clamp(0.0, 100.0)) as i64;
            let birth_year = 2025 - age;
            let mut consent: Vec<&str> = Vec::new();
            for (p, share) in PURPOSES.iter().zip([0.9, 0.45, 0.7]) {
                if rng.unit() < share {
                    consent.push(p);
                }
            }
            Person {
                id: 100_000 + i as i64,
                name: format!("{} {}", rng.pick(&SURNAMES), rng.pick(&GIVEN)),
                id_card: format!(
                    "11{:04}{birth_year}{:04}{:04}",
                    rng.below(10_000),
                    rng.below(1232),
                    rng.below(10_000)
                ),
                district,
                birth_year,
                gender: if rng.unit() < 0.5 { "F" } else { "M" },
                household: 1 + rng.below(5) as i64,
                // Delimited on both sides so a purpose matches only whole.
                consent: format!(",{},", consent.join(",")),
            }
        })
        .collect()
}

fn strings(values: Vec<String>) -> ArrayRef {
    Arc::new(StringArray::from(values))
}

fn ints(values: Vec<i64>) -> ArrayRef {
    Arc::new(Int64Array::from(values))
}

fn floats(values: Vec<f64>) -> ArrayRef {
    Arc::new(Float64Array::from(values))
}

fn batch(fields: Vec<(&str, DataType)>, columns: Vec<ArrayRef>) -> Result<RecordBatch, String> {
    let schema = Arc::new(Schema::new(
        fields
            .into_iter()
            .map(|(n, t)| Field::new(n, t, false))
            .collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(schema, columns).map_err(|e| e.to_string())
}

fn city_health(people: &[Person], visits: usize) -> Result<RecordBatch, String> {
    let mut rng = Rng::new(0xC17E_0001);
    let (
        mut pid,
        mut name,
        mut card,
        mut district,
        mut age,
        mut gender,
        mut diag,
        mut cost,
        mut date,
        mut consent,
    ) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    let epoch_2025 = 20089; // days from 1970-01-01 to 2025-01-01
    // Each person visits at a rate of their own, lognormal: most come one to
    // five times a year, a few heavy visitors a few dozen times (what
    // contribution bounds clip), nobody hundreds of times.
    let mut rates = Rng::new(0xC17E_0002);
    let mut cumulative = Vec::with_capacity(people.len());
    let mut total = 0.0;
    for _ in people {
        total += (rates.normal() * 0.5).exp();
        cumulative.push(total);
    }
    for _ in 0..visits {
        let at = rng.unit() * total;
        let p = &people[cumulative
            .partition_point(|c| *c <= at)
            .min(people.len() - 1)];
        let a = 2025 - p.birth_year;
        let d = if a > 60 && rng.unit() < 0.4 {
            DIAGNOSES[rng.below(2) as usize]
        } else {
            *rng.pick(&DIAGNOSES)
        };
        let base = match d {
            "fracture" | "pneumonia" => 6000.0,
            "checkup" => 300.0,
            _ => 1200.0,
        };
        // Mostly within the declared bounds, with the odd data-entry error far
        // outside them, which the release must clamp rather than trust.
        let c = if rng.unit() < 0.001 {
            base * 400.0
        } else {
            (base * (rng.normal() * 0.8).exp()).min(50_000.0)
        };
        pid.push(p.id);
        name.push(p.name.clone());
        card.push(p.id_card.clone());
        district.push(p.district.to_string());
        age.push(a);
        gender.push(p.gender.to_string());
        diag.push(d.to_string());
        cost.push((c * 100.0).round() / 100.0);
        date.push(epoch_2025 + rng.below(365) as i32);
        consent.push(p.consent.clone());
    }
    batch(
        vec![
            ("person_id", DataType::Int64),
            ("name", DataType::Utf8),
            ("id_card", DataType::Utf8),
            ("district", DataType::Utf8),
            ("age", DataType::Int64),
            ("gender", DataType::Utf8),
            ("diagnosis", DataType::Utf8),
            ("cost", DataType::Float64),
            ("visit_date", DataType::Date32),
            ("consented_purposes", DataType::Utf8),
        ],
        vec![
            ints(pid),
            strings(name),
            strings(card),
            strings(district),
            ints(age),
            strings(gender),
            strings(diag),
            floats(cost),
            Arc::new(Date32Array::from(date)),
            strings(consent),
        ],
    )
}

fn telecom_usage(people: &[Person]) -> Result<RecordBatch, String> {
    let mut rng = Rng::new(0x7E1E_C000);
    let (mut pid, mut month, mut district, mut calls, mut data, mut consent) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for p in people {
        let heavy = (rng.normal() * 0.7).exp();
        for m in 1..=12 {
            pid.push(p.id);
            month.push(format!("2025-{m:02}"));
            district.push(p.district.to_string());
            calls
                .push(((120.0 * heavy * (rng.normal() * 0.3).exp()).round() as i64).clamp(0, 3000));
            data.push(
                ((8.0 * heavy * (rng.normal() * 0.5).exp() * 10.0).round() / 10.0).min(500.0),
            );
            consent.push(p.consent.clone());
        }
    }
    batch(
        vec![
            ("person_id", DataType::Int64),
            ("month", DataType::Utf8),
            ("district", DataType::Utf8),
            ("calls", DataType::Int64),
            ("data_gb", DataType::Float64),
            ("consented_purposes", DataType::Utf8),
        ],
        vec![
            ints(pid),
            strings(month),
            strings(district),
            ints(calls),
            floats(data),
            strings(consent),
        ],
    )
}

fn enterprise_registry(n: usize) -> Result<RecordBatch, String> {
    let mut rng = Rng::new(0xE17E_2000);
    let (mut id, mut name, mut industry, mut district, mut capital, mut employees, mut founded) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let size = (rng.normal() * 1.3 + 2.5).exp();
        id.push(9_000_000 + i as i64);
        name.push(format!(
            "{} {} Co., Ltd.",
            rng.pick(&SURNAMES),
            rng.pick(&INDUSTRIES)
        ));
        industry.push(rng.pick(&INDUSTRIES).to_string());
        district.push(DISTRICTS[rng.weighted(&DISTRICT_WEIGHTS)].to_string());
        capital.push((size * 50_000.0).round() as i64);
        employees.push((size.round() as i64).max(1));
        founded.push(1980 + rng.below(46) as i64);
    }
    batch(
        vec![
            ("company_id", DataType::Int64),
            ("name", DataType::Utf8),
            ("industry", DataType::Utf8),
            ("district", DataType::Utf8),
            ("registered_capital", DataType::Int64),
            ("employees", DataType::Int64),
            ("founded_year", DataType::Int64),
        ],
        vec![
            ints(id),
            strings(name),
            strings(industry),
            strings(district),
            ints(capital),
            ints(employees),
            ints(founded),
        ],
    )
}

fn power_grid(n: usize) -> Result<RecordBatch, String> {
    let mut rng = Rng::new(0x90E2_0003);
    let substations = 200usize.min(n.max(1));
    let sub_district: Vec<&str> = (0..substations)
        .map(|_| DISTRICTS[rng.weighted(&DISTRICT_WEIGHTS)])
        .collect();
    let start = 1_735_689_600i64; // 2025-01-01T00:00:00Z
    let (mut sid, mut district, mut hour, mut load) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let s = i % substations;
        let h = (i / substations) as i64;
        let hour_of_day = (h % 24) as f64;
        let day_of_year = ((h / 24) % 365) as f64;
        let daily = 1.0 + 0.35 * ((hour_of_day - 14.0) / 24.0 * 2.0 * std::f64::consts::PI).cos();
        let seasonal =
            1.0 + 0.25 * ((day_of_year - 200.0) / 365.0 * 2.0 * std::f64::consts::PI).cos();
        let base = 40.0 + 30.0 * ((s * 7919) % 13) as f64;
        sid.push(format!("SS{:04}", s));
        district.push(sub_district[s].to_string());
        hour.push(start + h * 3600);
        load.push(
            ((base * daily * seasonal * (1.0 + 0.05 * rng.normal())).clamp(0.0, 2000.0) * 10.0)
                .round()
                / 10.0,
        );
    }
    let schema_fields = vec![
        ("substation_id", DataType::Utf8),
        ("district", DataType::Utf8),
        ("hour", DataType::Timestamp(TimeUnit::Second, None)),
        ("load_mw", DataType::Float64),
    ];
    batch(
        schema_fields,
        vec![
            strings(sid),
            strings(district),
            Arc::new(TimestampSecondArray::from(hour)),
            floats(load),
        ],
    )
}

fn population_registry(people: &[Person]) -> Result<RecordBatch, String> {
    batch(
        vec![
            ("person_id", DataType::Int64),
            ("id_card", DataType::Utf8),
            ("name", DataType::Utf8),
            ("birth_year", DataType::Int64),
            ("district", DataType::Utf8),
            ("household_size", DataType::Int64),
        ],
        vec![
            ints(people.iter().map(|p| p.id).collect()),
            strings(people.iter().map(|p| p.id_card.clone()).collect()),
            strings(people.iter().map(|p| p.name.clone()).collect()),
            ints(people.iter().map(|p| p.birth_year).collect()),
            strings(people.iter().map(|p| p.district.to_string()).collect()),
            ints(people.iter().map(|p| p.household).collect()),
        ],
    )
}

/// The demo datasets this generator knows, by manifest id.
pub const DEMO_DATASETS: [&str; 5] = [
    "city_health",
    "telecom_usage",
    "enterprise_registry",
    "power_grid",
    "population_registry",
];

fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    // Write aside and rename, so a reader never sees half a file.
    let tmp = path.with_extension("parquet.tmp");
    let file =
        std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).map_err(|e| e.to_string())?;
    for offset in (0..batch.num_rows()).step_by(65_536) {
        let len = 65_536.min(batch.num_rows() - offset);
        writer
            .write(&batch.slice(offset, len))
            .map_err(|e| e.to_string())?;
    }
    writer.close().map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot move {} into place: {e}", path.display()))
}

/// Where each demo manifest of `catalog_dir` wants its data.
pub fn demo_targets(
    catalog_dir: &Path,
    manifests: &[(PathBuf, Manifest)],
) -> Vec<(String, PathBuf)> {
    manifests
        .iter()
        .filter(|(_, m)| {
            DEMO_DATASETS.contains(&m.id.as_str()) && m.source.format == SourceFormat::Parquet
        })
        .map(|(_, m)| (m.id.clone(), data_location(catalog_dir, m)))
        .collect()
}

/// Generates the data of every demo manifest; `progress` gets one line per dataset.
pub fn generate(
    targets: &[(String, PathBuf)],
    scale: f64,
    mut progress: impl FnMut(&str),
) -> Result<(), String> {
    if !(scale > 0.0 && scale.is_finite()) {
        return Err("scale must be a positive number".into());
    }
    let sizes = Sizes::at(scale);
    let people = persons(sizes.persons);
    for (id, path) in targets {
        let started = Instant::now();
        let batch = match id.as_str() {
            "city_health" => city_health(&people, sizes.visits)?,
            "telecom_usage" => telecom_usage(&people)?,
            "enterprise_registry" => enterprise_registry(sizes.companies)?,
            "power_grid" => power_grid(sizes.readings)?,
            "population_registry" => population_registry(&people)?,
            _ => continue,
        };
        write_parquet(path, &batch)?;
        progress(&format!(
            "  {id}: {} rows -> {} ({:.1}s)",
            batch.num_rows(),
            path.display(),
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// A self-contained catalog folder for tests, fuzzing and experiments: the
/// manifests of `from` named in `names` (every one when empty), each edited
/// by `edit`, written to `dir`, with their demo data generated at `scale`.
pub fn catalog_folder(
    from: &Path,
    dir: &Path,
    names: &[&str],
    scale: f64,
    edit: impl Fn(&mut serde_json::Value),
) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    std::fs::create_dir_all(dir).map_err(io)?;
    for entry in std::fs::read_dir(from).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".json") || !(names.is_empty() || names.contains(&name)) {
            continue;
        }
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).map_err(io)?)
                .map_err(|e| format!("{name}: {e}"))?;
        edit(&mut manifest);
        std::fs::write(dir.join(name), manifest.to_string()).map_err(io)?;
    }
    let schemas = crate::validate::Schemas::compiled();
    let manifests = crate::catalog::read_manifests(dir, &schemas).map_err(|e| e.to_string())?;
    generate(&demo_targets(dir, &manifests), scale, |_| {})
}
