//! `frostglass bench --ballista`: the query suite with release jobs on an
//! in-process Ballista cluster (a scheduler and two executors on loopback
//! ports; or, with `--scheduler`, a cluster of `frostglass cluster`
//! processes) beside the same sandbox executing locally, run by run. DP from
//! rows (unit summaries off, so every release job is one the cluster runs)
//! and threshold releases.

use super::bench::{
    Options, SUITE, Subject, buyer, ensure_data, ms, prepare_catalog, sandbox_query, settings,
    timing, write_report,
};
use frostglass::config::Execution;
use frostglass::engine::JobMetrics;
use serde_json::json;
use std::time::Duration;

pub fn run(options: Options, scheduler: Option<String>) -> Result<(), String> {
    let data = ensure_data(&options)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    // One executor slot per core, split over the two executors.
    let vcores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let in_process = scheduler.is_none();
    let scheduler = match scheduler {
        Some(scheduler) => scheduler,
        None => rt.block_on(frostglass::engine::cluster::in_process(
            2,
            (vcores / 2).max(1),
        ))?,
    };
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
    let mut where_time = Vec::new();
    for (name, sql) in SUITE {
        if options.only.as_ref().is_some_and(|only| only != name) {
            continue;
        }
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
        let mut splits: Vec<Vec<Split>> = vec![Vec::new(); subjects.len()];
        let mut refused = vec![None; subjects.len()];
        // One warm-up, then the four modes interleaved run by run.
        for run in 0..=options.runs {
            let fresh = format!("SELECT * FROM ({sql}) AS run_{run}");
            for (i, (_, subject, principal)) in subjects.iter().enumerate() {
                let mut jobs = subject.sandbox.engine.cluster_jobs();
                match sandbox_query(&rt, subject, principal, &fresh, false) {
                    Ok(t) if run > 0 => {
                        samples[i].push(ms(t));
                        if let Some(jobs) = jobs.as_mut() {
                            splits[i].push(Split::of(&rt, jobs, ms(t)));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => refused[i] = Some(e),
                }
            }
        }
        for (i, split) in splits.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
            where_time.push((name, subjects[i].0.clone(), Split::median(split)));
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
    println!(
        "\nwhere a cluster query's time goes (ms, medians; compute and shuffle summed over tasks)"
    );
    println!(
        "{:<18} {:<18} {:>6} {:>5} {:>9} {:>8} {:>7} {:>8} {:>7} {:>7}",
        "query",
        "mode",
        "wall",
        "jobs",
        "sched.pl",
        "stages",
        "rest",
        "compute",
        "sh.wr",
        "sh.fetch"
    );
    for (name, mode, s) in &where_time {
        println!(
            "{:<18} {:<18} {:>6.1} {:>5} {:>9.1} {:>8.1} {:>7.1} {:>8.1} {:>7.1} {:>7.1}",
            name,
            mode,
            s.wall_ms,
            s.jobs,
            s.scheduler_planning_ms,
            s.stages_running_ms,
            s.wall_ms - s.scheduler_planning_ms - s.stages_running_ms,
            s.compute_ms,
            s.shuffle_write_ms,
            s.shuffle_fetch_ms,
        );
    }
    let where_time: Vec<_> = where_time
        .iter()
        .map(|(name, mode, s)| json!({ "query": name, "mode": mode, "split": s }))
        .collect();
    write_report(
        &options.out,
        &json!({ "scale": options.scale, "runs": options.runs, "scheduler": scheduler,
                 "in_process": in_process, "suite": rows,
                 "where_time_goes": where_time }),
    )
}

/// One query on the cluster: its wall time in the sandbox and what the
/// scheduler reports for its jobs, added up.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Split {
    wall_ms: f64,
    jobs: u64,
    scheduler_planning_ms: f64,
    stages_running_ms: f64,
    compute_ms: f64,
    shuffle_write_ms: f64,
    shuffle_fetch_ms: f64,
}

impl Split {
    /// The metrics of the jobs the query just ran, which the sandbox
    /// fetches after answering: they arrive within moments of each other.
    fn of(
        rt: &tokio::runtime::Runtime,
        jobs: &mut tokio::sync::broadcast::Receiver<JobMetrics>,
        wall_ms: f64,
    ) -> Split {
        let mut split = Split {
            wall_ms,
            ..Split::default()
        };
        let mut wait = Duration::from_secs(2);
        while let Ok(Ok(job)) = rt.block_on(async { tokio::time::timeout(wait, jobs.recv()).await })
        {
            wait = Duration::from_millis(200);
            split.jobs += 1;
            split.scheduler_planning_ms += job.scheduler_planning_ms as f64;
            split.stages_running_ms += job.stages_running_ms as f64;
            split.compute_ms += job.compute_ms as f64;
            split.shuffle_write_ms += job.shuffle_write_ms as f64;
            split.shuffle_fetch_ms += job.shuffle_fetch_ms as f64;
        }
        split
    }

    /// Each figure's median over runs.
    fn median(splits: &[Split]) -> Split {
        let m = |f: fn(&Split) -> f64| timing(splits.iter().map(f).collect()).median_ms;
        Split {
            wall_ms: m(|s| s.wall_ms),
            jobs: splits.iter().map(|s| s.jobs).max().unwrap_or(0),
            scheduler_planning_ms: m(|s| s.scheduler_planning_ms),
            stages_running_ms: m(|s| s.stages_running_ms),
            compute_ms: m(|s| s.compute_ms),
            shuffle_write_ms: m(|s| s.shuffle_write_ms),
            shuffle_fetch_ms: m(|s| s.shuffle_fetch_ms),
        }
    }
}
