//! `frostglass bench-ledger`: the ledger at N entries, appended directly
//! (no HTTP), then what an operator and an auditor wait for: a restart, the
//! usage report, proofs, a full verification. One JSON line per run.

use frostglass::accounting::Usage;
use frostglass::app::admin;
use frostglass::ledger::event::{Decision, LedgerEvent, QueryEvent};
use frostglass::ledger::usage::summarize;
use frostglass::ledger::usage_table::UsageTable;
use frostglass::ledger::{Ledger, NewEntry, Writer, merkle, open_connection, tables, verify};
use std::path::Path;
use std::time::Instant;

/// Entries per append transaction while filling (group commit batches about this many under load).
const BATCH: u64 = 1000;

fn query(i: u64) -> NewEntry {
    NewEntry::event(LedgerEvent::Query(QueryEvent {
        query_id: format!("q_{i}"),
        principal: format!("buyer:{}", i % 50),
        grant: Some(format!("g_{}", i % 200)),
        purpose: Some("public_health_research".into()),
        datasets: ["city_health".to_string()].into(),
        sql_sha256: frostglass::util::sha256_hex(&i.to_le_bytes()),
        decision: if i.is_multiple_of(10) {
            Decision::Refused
        } else {
            Decision::Answered
        },
        plan_sha256: Some(frostglass::util::sha256_hex(&(i % 97).to_le_bytes())),
        cached: false,
        release: None,
        usage: (!i.is_multiple_of(10)).then(|| Usage {
            rows_scanned: 200_000,
            bytes_scanned: 4_675_620,
            cpu_ms: 12,
            wall_ms: 15,
            groups_released: 12,
            cells_released: 24,
            epsilon: 0.5,
            charge: "0.90".into(),
            currency: Some("CNY".into()),
            ..Usage::default()
        }),
        epsilon_charged: 0.5,
        epsilon_by_dataset: [("city_health".to_string(), 0.5)].into(),
        result_sha256: Some(frostglass::util::sha256_hex(b"rows")),
        code: None,
        rule: None,
        wall_ms: None,
    }))
}

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

pub fn run(entries: u64, work_dir: &Path, reuse: bool) -> Result<(), String> {
    let err = |e: frostglass::ledger::LedgerError| e.to_string();
    if !reuse {
        let _ = std::fs::remove_dir_all(work_dir);
    }
    let mut writer = admin::open(work_dir).map_err(err)?;
    let fill = Instant::now();
    // With `reuse`, a ledger already there counts towards the entries.
    let mut done = writer.view().lock().map_or(0, |v| v.frontier.len());
    let had = done;
    while done < entries {
        let n = BATCH.min(entries - done);
        writer
            .append(&(done..done + n).map(query).collect::<Vec<_>>())
            .map_err(err)?;
        done += n;
        if done % 1_000_000 == 0 {
            eprintln!("bench-ledger: {done} entries appended");
        }
    }
    let append_per_s = (done - had) as f64 / fill.elapsed().as_secs_f64();
    drop(writer);
    // The first open after the fill verifies everything once and records the checkpoint.
    let first = Instant::now();
    drop(Writer::open(work_dir).map_err(err)?);
    let first_open_ms = ms(first);
    // Then what a restart sees: a checkpoint and a tail of recent entries.
    let mut writer = Writer::open(work_dir).map_err(err)?;
    writer
        .append(&(entries..entries + BATCH).map(query).collect::<Vec<_>>())
        .map_err(err)?;
    drop(writer);
    let restart = Instant::now();
    let ledger = Ledger::start(work_dir, std::time::Duration::from_millis(2)).map_err(err)?;
    let restart_ms = ms(restart);

    let usage = Instant::now();
    let report = summarize(ledger.usage_rollups().map_err(err)?.iter());
    let usage_ms = ms(usage);

    let audit = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let count_sql = |sql: &'static str| -> Result<(f64, String), String> {
        audit.block_on(async {
            let ctx = datafusion::prelude::SessionContext::new();
            ctx.register_table(
                "usage",
                std::sync::Arc::new(UsageTable::new(
                    work_dir,
                    std::time::Duration::from_secs(60),
                )),
            )
            .map_err(|e| e.to_string())?;
            let started = Instant::now();
            let batches = ctx
                .sql(sql)
                .await
                .and_then(|df| futures::executor::block_on(df.collect()))
                .map_err(|e| e.to_string())?;
            let shown = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                .map_err(|e| e.to_string())?
                .to_string();
            Ok((ms(started), shown.lines().nth(3).unwrap_or("").to_string()))
        })
    };
    let (audit_count_ms, _) = count_sql("SELECT COUNT(*) FROM usage")?;
    let (audit_count_refused_ms, _) =
        count_sql("SELECT COUNT(*) FROM usage WHERE decision = 'refused'")?;

    let size = ledger.size();
    let conn = open_connection(work_dir).map_err(err)?;
    let proof = Instant::now();
    let nodes = tables::StoredNodes::new(&conn);
    let path = merkle::inclusion_path(&nodes, size / 2, size).ok_or("no proof")?;
    let inclusion_ms = ms(proof);
    let inclusion_reads = nodes.reads();
    let consistency = Instant::now();
    let nodes = tables::StoredNodes::new(&conn);
    merkle::consistency_path(&nodes, entries / 2, size).ok_or("no proof")?;
    let consistency_ms = ms(consistency);

    let verifying = Instant::now();
    let summary = verify::run(&verify::Options {
        source: verify::Source::Local(work_dir.to_path_buf()),
        public_key: None,
        state: None,
        receipt: None,
    })
    .map_err(|f| f.to_string())?;
    let verify_per_s = size as f64 / verifying.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(work_dir.join("frostglass.db")).map_or(0, |m| m.len())
        + std::fs::metadata(work_dir.join("frostglass.db-wal")).map_or(0, |m| m.len());
    let line = serde_json::json!({
        "entries": size,
        "append_entries_per_s": append_per_s.round(),
        "first_open_full_check_ms": first_open_ms.round(),
        "restart_ms": restart_ms,
        "usage_report_ms": usage_ms,
        "usage_report_rows": report.len(),
        "audit_count_ms": audit_count_ms,
        "audit_count_where_ms": audit_count_refused_ms,
        "inclusion_proof_ms": inclusion_ms,
        "inclusion_proof_node_reads": inclusion_reads,
        "inclusion_proof_len": path.len(),
        "consistency_proof_ms": consistency_ms,
        "verify_entries_per_s": verify_per_s.round(),
        "bytes_per_entry": bytes / size.max(1),
        "verify": summary,
    });
    println!("{line}");
    Ok(())
}
