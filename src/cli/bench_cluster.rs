//! `frostglass bench --ballista`: the query suite with release jobs on an
//! in-process Ballista cluster (a scheduler and two executors on loopback
//! ports) beside the same sandbox executing locally, run by run. DP from
//! rows (unit summaries off, so every release job is one the cluster runs)
//! and threshold releases.

use super::bench::{
    Options, SUITE, Subject, buyer, ensure_data, ms, prepare_catalog, sandbox_query, settings,
    timing, write_report,
};
use frostglass::config::Execution;
use serde_json::json;

pub fn run(options: Options) -> Result<(), String> {
    let data = ensure_data(&options)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    // One executor slot per core, split over the two executors.
    let vcores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let scheduler = rt.block_on(frostglass::engine::cluster::in_process(
        2,
        (vcores / 2).max(1),
    ))?;
    let mut subjects = Vec::new();
    for (dp, mode) in [(false, "threshold"), (true, "dp-rows")] {
        let catalog = prepare_catalog(&options, &data, dp)?;
        for (where_, execution) in [
            ("local", Execution::Local),
            (
                "cluster",
                Execution::Ballista {
                    scheduler: scheduler.clone(),
                },
            ),
        ] {
            let mut s = settings(&options, catalog.clone(), &format!("{mode}-{where_}"));
            s.unit_summaries = false;
            s.execution = execution;
            let subject = Subject::open(&rt, s)?;
            let (principal, _) = buyer(&subject.admin)?;
            subjects.push((format!("{mode} {where_}"), subject, principal));
        }
    }
    println!(
        "{:<18} {:>12} {:>14} {:>7} {:>12} {:>14} {:>7}",
        "query", "thresh local", "thresh cluster", "ratio", "dp local", "dp cluster", "ratio"
    );
    let mut rows = Vec::new();
    for (name, sql) in SUITE {
        if options.only.as_ref().is_some_and(|only| only != name) {
            continue;
        }
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
        let mut refused = vec![None; subjects.len()];
        // One warm-up, then the four modes interleaved run by run.
        for run in 0..=options.runs {
            let fresh = format!("SELECT * FROM ({sql}) AS run_{run}");
            for (i, (_, subject, principal)) in subjects.iter().enumerate() {
                match sandbox_query(&rt, subject, principal, &fresh, false) {
                    Ok(t) if run > 0 => samples[i].push(ms(t)),
                    Ok(_) => {}
                    Err(e) => refused[i] = Some(e),
                }
            }
        }
        let t: Vec<_> = samples.into_iter().map(timing).collect();
        let median = |i: usize| refused[i].is_none().then_some(t[i].median_ms);
        let ratio = |local: usize| Some(median(local + 1)? / median(local)?);
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let ratio_cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        println!(
            "{:<18} {:>12} {:>14} {:>7} {:>12} {:>14} {:>7}",
            name,
            cell(median(0)),
            cell(median(1)),
            ratio_cell(ratio(0)),
            cell(median(2)),
            cell(median(3)),
            ratio_cell(ratio(2)),
        );
        rows.push(json!({
            "query": name, "sql": sql,
            "modes": subjects.iter().zip(&t).zip(&refused).map(|(((mode, _, _), t), r)|
                json!({ "mode": mode, "timing": t, "refused": r })).collect::<Vec<_>>(),
            "ratio_threshold_cluster_to_local": ratio(0),
            "ratio_dp_rows_cluster_to_local": ratio(2),
        }));
    }
    write_report(
        &options.out,
        &json!({ "scale": options.scale, "runs": options.runs, "executors": 2,
                 "vcores_per_executor": (vcores / 2).max(1), "suite": rows }),
    )
}
