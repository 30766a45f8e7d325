//! The ledger at 100,000 entries, appended directly (no HTTP), checked by
//! counting work, not by timing it: start-up reads only the tail after the
//! last verified checkpoint, proofs read O(log n) stored nodes, roll-ups
//! equal a recount, and `verify` catches a flipped roll-up.

use datafusion::arrow::array::Array;
use frostglass::accounting::Usage;
use frostglass::app::admin;
use frostglass::ledger::event::{Decision, Entry, LedgerEvent, QueryEvent};
use frostglass::ledger::merkle::{self, Hash};
use frostglass::ledger::{NewEntry, SignedHead, Writer, open_connection, tables};
use std::collections::HashMap;

const ENTRIES: u64 = 100_000;
const GRANTS: u64 = 7;

fn answered(i: u64) -> NewEntry {
    NewEntry::event(answered_event(i))
}

fn answered_event(i: u64) -> LedgerEvent {
    let grant = format!("g_{}", i % GRANTS);
    LedgerEvent::Query(QueryEvent {
        query_id: format!("q_{i}"),
        principal: "buyer:scale".into(),
        grant: Some(grant),
        purpose: Some("research".into()),
        datasets: ["city_health".to_string()].into(),
        sql_sha256: "00".into(),
        decision: Decision::Answered,
        plan_sha256: Some("11".into()),
        cached: false,
        release: None,
        usage: Some(Usage {
            rows_scanned: 1000 + i % 13,
            bytes_scanned: 10,
            charge: "0.50".into(),
            ..Usage::default()
        }),
        epsilon_charged: 0.5,
        epsilon_by_dataset: [("city_health".to_string(), 0.5)].into(),
        result_sha256: None,
        code: None,
        rule: None,
        wall_ms: None,
    })
}

fn log2(n: u64) -> u64 {
    64 - u64::from(n.leading_zeros())
}

fn latest_head(conn: &rusqlite::Connection) -> SignedHead {
    frostglass::ledger::heads(conn).unwrap().pop().unwrap()
}

fn root_of(head: &SignedHead) -> Hash {
    head.root().unwrap()
}

#[test]
fn a_hundred_thousand_entries_start_prove_and_verify_by_their_size_not_their_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = admin::open(dir.path()).unwrap();
    let mut checkpoint = 0;
    for batch in 0..ENTRIES / 1000 {
        let entries: Vec<NewEntry> = (batch * 1000..(batch + 1) * 1000).map(answered).collect();
        writer.append(&entries).unwrap();
        if batch == 49 {
            checkpoint = (batch + 1) * 1000;
        }
    }
    drop(writer);

    // Start-up: the first open verifies everything (nothing was verified
    // yet); after it, an open reads only what came since.
    let first = Writer::open(dir.path()).unwrap();
    assert_eq!(first.startup().tail_entries, ENTRIES);
    drop(first);
    let mut second = Writer::open(dir.path()).unwrap();
    assert_eq!(second.startup().checkpoint, ENTRIES);
    assert_eq!(second.startup().tail_entries, 0);
    second
        .append(&(0..10).map(|i| answered(ENTRIES + i)).collect::<Vec<_>>())
        .unwrap();
    drop(second);
    let third = Writer::open(dir.path()).unwrap();
    assert_eq!(third.startup().checkpoint, ENTRIES);
    assert_eq!(third.startup().tail_entries, 10);
    drop(third);

    let conn = open_connection(dir.path()).unwrap();
    let n = ENTRIES + 10;
    let head = latest_head(&conn);
    assert_eq!(head.tree_size, n);
    let leaf = |i: u64| -> Hash {
        let hash: String = conn
            .query_row(
                "SELECT leaf_hash FROM usage_log WHERE idx = ?1",
                [i as i64],
                |r| r.get(0),
            )
            .unwrap();
        hex::decode(hash).unwrap().try_into().unwrap()
    };
    let bound = 2 * log2(n) + 2;
    for i in [0, n / 2, n - 1] {
        let nodes = tables::StoredNodes::new(&conn);
        let proof = merkle::inclusion_path(&nodes, i, n).unwrap();
        assert!(
            nodes.reads() <= bound,
            "inclusion of {i}: {} reads",
            nodes.reads()
        );
        assert!(merkle::verify_inclusion(
            &leaf(i),
            i,
            n,
            &proof,
            &root_of(&head)
        ));
    }
    // Between two checkpoints (signed heads) of the log.
    let old_head: SignedHead = frostglass::ledger::heads(&conn)
        .unwrap()
        .into_iter()
        .find(|h| h.tree_size == checkpoint)
        .unwrap();
    let nodes = tables::StoredNodes::new(&conn);
    let proof = merkle::consistency_path(&nodes, checkpoint, n).unwrap();
    assert!(
        nodes.reads() <= 2 * bound,
        "consistency: {} reads",
        nodes.reads()
    );
    assert!(merkle::verify_consistency(
        checkpoint,
        n,
        &root_of(&old_head),
        &root_of(&head),
        &proof
    ));

    // Roll-ups equal a recount from the entries.
    let mut recount: HashMap<String, (u64, u64)> = HashMap::new();
    let mut stmt = conn.prepare("SELECT body FROM usage_log").unwrap();
    let bodies = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
    for body in bodies {
        if let LedgerEvent::Query(q) = Entry::decode(&body.unwrap()).unwrap().event {
            let e = recount.entry(q.grant.unwrap()).or_default();
            e.0 += 1;
            e.1 += q.usage.unwrap().rows_scanned;
        }
    }
    let today = frostglass::util::today();
    for (grant, (queries, rows)) in &recount {
        let used = tables::used_on(&conn, grant, &today).unwrap();
        assert_eq!((used.queries, used.rows), (*queries, *rows), "{grant}");
    }
    let spent = tables::epsilon_spent(&conn, "dataset:city_health").unwrap();
    assert!((spent - 0.5 * n as f64).abs() < 1e-6, "{spent}");

    // verify: the whole history in one linear pass; it catches a flipped roll-up.
    let data = dir.path().to_str().unwrap();
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_frostglass"))
            .args(["verify", "--data-dir", data])
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    conn.execute(
        "UPDATE rollup_daily SET rows_scanned = rows_scanned + 1 WHERE grant_id = 'g_3'",
        [],
    )
    .unwrap();
    let caught = verify();
    assert!(!caught.status.success());
    assert!(
        String::from_utf8_lossy(&caught.stderr).contains("roll-up"),
        "{}",
        String::from_utf8_lossy(&caught.stderr)
    );
}

#[test]
fn checkpoints_come_on_a_cadence_and_every_receipt_is_covered_by_one() {
    let dir = tempfile::tempdir().unwrap();
    admin::open(dir.path()).unwrap();
    let interval = std::time::Duration::from_millis(40);
    let ledger =
        std::sync::Arc::new(frostglass::ledger::Ledger::start(dir.path(), interval).unwrap());
    let public_key = ledger.public_key().to_vec();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = std::time::Instant::now();
    // 2,000 appends from 16 concurrent writers: many group commits.
    let receipts = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..16u64 {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..125u64 {
                    out.push(ledger.append(answered(w * 1000 + i)).await.unwrap());
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let elapsed = started.elapsed();
    assert_eq!(receipts.len(), 2_000);
    let conn = open_connection(dir.path()).unwrap();
    let heads = frostglass::ledger::heads(&conn).unwrap();
    // Each writer waits for its receipt, so appends come in bursts; far
    // fewer signatures than entries, and at most one per interval (plus
    // the first, signed at once).
    let most = (elapsed.as_millis() / interval.as_millis()) as usize + 2;
    assert!(heads.len() <= most, "{} heads in {elapsed:?}", heads.len());
    assert!(heads.len() < receipts.len() / 10, "{} heads", heads.len());
    // Every receipt names a signed checkpoint that covers its entry, and
    // the entry is in that tree.
    for r in &receipts {
        let head = heads
            .iter()
            .find(|h| h.tree_size == r.tree_size)
            .expect("a receipt's checkpoint is stored");
        assert!(head.verify(&public_key));
        assert_eq!(head.signature, r.signature);
        assert!(r.ledger_index < r.tree_size);
        let path = ledger.inclusion_proof(r.ledger_index, r.tree_size).unwrap();
        let leaf: Hash = hex::decode(&r.entry_hash).unwrap().try_into().unwrap();
        assert!(merkle::verify_inclusion(
            &leaf,
            r.ledger_index,
            r.tree_size,
            &path,
            &root_of(head)
        ));
    }
}

/// Appends wait for their checkpoint uncommitted (here due in half a
/// second); a state change that comes meanwhile commits them first, so the
/// ledger keeps the order in which things happened.
#[test]
fn a_state_change_is_recorded_after_the_appends_that_came_before_it() {
    let dir = tempfile::tempdir().unwrap();
    admin::open(dir.path()).unwrap();
    let interval = std::time::Duration::from_millis(500);
    let ledger =
        std::sync::Arc::new(frostglass::ledger::Ledger::start(dir.path(), interval).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The ledger was idle: signed at once, and the next checkpoint is
        // due only in half a second.
        let first = ledger.append(answered(0)).await.unwrap();
        let waiting = tokio::spawn({
            let ledger = ledger.clone();
            async move { ledger.append(answered(1)).await.unwrap() }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (changed, ()) = ledger
            .commit(|_| Ok((vec![answered_event(2)], ())))
            .await
            .unwrap();
        let appended = waiting.await.unwrap();
        assert_eq!(first.ledger_index, 0);
        assert_eq!(
            (appended.ledger_index, changed[0].ledger_index),
            (1, 2),
            "the append that came first is first in the ledger"
        );
    });
}

#[test]
fn sealed_segments_leave_the_database_and_the_ledger_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut writer = admin::open(data).unwrap();
    for batch in 0..30u64 {
        let entries: Vec<NewEntry> = (0..100).map(|i| answered(batch * 100 + i)).collect();
        writer.append(&entries).unwrap();
    }
    // Start-up verifies the tail: only verified entries may be sealed.
    drop(writer);
    let mut writer = Writer::open(data).unwrap();
    let conn = open_connection(data).unwrap();
    let before = tables::entries(&conn, 0, 3_000).unwrap();
    let out = data.join("archive");
    let first = frostglass::ledger::archive::seal(&mut writer, data, &out, 2_050)
        .unwrap()
        .expect("a segment");
    // Up to the newest checkpoint at or below 2,050: the head at 2,000.
    assert_eq!((first.first, first.end), (0, 2_000));
    assert!(
        out.join("segment-000000000000-000000002000.checkpoint.json")
            .exists()
    );
    let blank: i64 = conn
        .query_row("SELECT COUNT(*) FROM usage_log WHERE body = ''", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(blank, 2_000, "the bodies left the database");
    // The next segment continues where this one ended.
    let second = frostglass::ledger::archive::seal(&mut writer, data, &out, 2_500)
        .unwrap()
        .unwrap();
    assert_eq!((second.first, second.end), (2_000, 2_500));
    drop(writer);

    // Verification reads the archived bodies back, roll-ups included.
    let verify = |data: &std::path::Path| {
        frostglass::ledger::verify::run(&frostglass::ledger::verify::Options {
            source: frostglass::ledger::verify::Source::Local(data.to_path_buf()),
            public_key: None,
            state: None,
            receipt: None,
        })
    };
    verify(data).unwrap();
    // The server serves them as they were, and restarts over them.
    let ledger =
        frostglass::ledger::Ledger::start(data, std::time::Duration::from_millis(2)).unwrap();
    assert_eq!(ledger.entries(0, 3_000).unwrap()[..3_000], before[..]);
    drop(ledger);

    // A changed body in a segment is caught, even with its digest updated.
    let path = &first.path;
    let file = std::fs::File::open(path).unwrap();
    let batches: Vec<_> =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let bodies: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let c = b
                .column(1)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::StringArray>()
                .unwrap();
            (0..c.len())
                .map(|i| c.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut forged = bodies.clone();
    forged[1234] = forged[1234].replace("\"rows_scanned\":", "\"rows_scanned\":1");
    assert_ne!(forged[1234], bodies[1234]);
    let schema = batches[0].schema();
    let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        schema.clone(),
        None,
    )
    .unwrap();
    let forged_batch = datafusion::arrow::record_batch::RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(datafusion::arrow::array::UInt64Array::from_iter_values(
                0..2_000,
            )),
            std::sync::Arc::new(datafusion::arrow::array::StringArray::from(forged)),
            std::sync::Arc::new(datafusion::arrow::array::StringArray::from(
                before[..2_000]
                    .iter()
                    .map(|e| e.2.clone())
                    .collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    writer.write(&forged_batch).unwrap();
    writer.close().unwrap();
    let failure = verify(data).unwrap_err();
    assert!(failure.to_string().contains("digest"), "{failure}");
    let digest = frostglass::util::sha256_hex(&std::fs::read(path).unwrap());
    conn.execute(
        "UPDATE archived_segments SET sha256 = ?1 WHERE first = 0",
        [digest],
    )
    .unwrap();
    let failure = verify(data).unwrap_err();
    assert_eq!(failure.index, Some(1234), "{failure}");
}
