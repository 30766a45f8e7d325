//! Owners run their listings over HTTP: register, update and withdraw
//! datasets while the sandbox serves, inside their own domain root, with a
//! noised quality card.

use crate::helpers::{Admin, PURPOSE, Server, TestApp, repo, spawn_app};
use frostglass::store::{NewGrant, Principal, Role};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The owner's domain root in the test's data directory (the default, `<data_dir>/owners/<org>`).
fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("owners/hospital")
}

/// Demo data of the repo manifest `source` at `scale`, written as
/// `<root>/<folder>/part-0.parquet`, and its manifest renamed `id`, owned by
/// the hospital, located at that folder.
fn listing(data_dir: &Path, source: &str, id: &str, scale: f64, folder: &str) -> Value {
    let generated = tempfile::tempdir().unwrap();
    frostglass::demo::catalog_folder(
        &repo().join("catalog"),
        generated.path(),
        &[source],
        scale,
        |_| {},
    )
    .unwrap();
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(generated.path().join(source)).unwrap())
            .unwrap();
    let data = generated
        .path()
        .join(manifest["source"]["location"].as_str().unwrap());
    let target = root(data_dir).join(folder);
    std::fs::create_dir_all(&target).unwrap();
    std::fs::copy(&data, target.join("part-0.parquet")).unwrap();
    manifest["id"] = json!(id);
    manifest["owner"] = json!("hospital");
    manifest["source"]["location"] = json!(target.to_str().unwrap());
    manifest
}

fn send(
    app: &TestApp,
    method: &str,
    path: &str,
    who: &str,
    body: &Value,
) -> crate::helpers::Response {
    let bytes = serde_json::to_vec(body).unwrap();
    app.request(method, path, Some(app.key(who)), Some(&bytes), None)
}

fn register(app: &TestApp, manifest: &Value) -> crate::helpers::Response {
    send(app, "POST", "/v1/datasets", "owner:hospital", manifest)
}

/// Polls the owner's view of `id` until no registration of it is under
/// way; panics if it failed. Returns the dataset as listed.
fn wait_settled(app: &TestApp, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let doc = app
            .get(
                &format!("/v1/datasets/{id}"),
                Some(app.key("owner:hospital")),
            )
            .json();
        let pending = &doc["pending"]["status"];
        assert_ne!(pending, "failed", "{doc}");
        if doc["status"] == "active" && pending != "registering" {
            return doc;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{doc}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`listing`], registered and waited for until active; returns its manifest.
fn registered(app: &TestApp, source: &str, id: &str, scale: f64, folder: &str) -> Value {
    let manifest = listing(&app.data_dir, source, id, scale, folder);
    let r = register(app, &manifest);
    assert_eq!(r.status, 202, "{}", r.text());
    wait_settled(app, id);
    manifest
}

fn grant(app: &TestApp, datasets: &[&str]) -> String {
    app.admin()
        .add_grant(&NewGrant {
            buyer: "buyer:acme".into(),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
            purpose: PURPOSE.into(),
            ..NewGrant::default()
        })
        .unwrap()
}

/// Ledger entry bodies of one kind, for one dataset.
fn entries(app: &TestApp, kind: &str, dataset: &str) -> Vec<Value> {
    app.admin()
        .entries(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|(_, body, _)| serde_json::from_str::<Value>(&body).unwrap())
        .filter(|e| e["kind"] == kind && e["dataset"] == dataset)
        .collect()
}

#[test]
fn an_owner_registers_a_dataset_live_and_buyers_see_it_only_once_active() {
    let app = spawn_app();
    let manifest = listing(
        &app.data_dir,
        "city_health.json",
        "clinic_visits",
        0.2,
        "clinic",
    );
    let r = register(&app, &manifest);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["status"], "registering");
    assert_eq!(
        r.headers.get("location").map(String::as_str),
        Some("/v1/datasets/clinic_visits")
    );
    let sql = "SELECT district, COUNT(*) FROM clinic_visits GROUP BY district";
    // While the owner still sees it registering, a buyer's query (asked
    // before that look) cannot have seen it.
    let mut seen_registering = 0;
    loop {
        let asked = app.query(sql);
        let other = app.get("/v1/datasets/clinic_visits", Some(app.key("buyer:other")));
        let doc = app
            .get(
                "/v1/datasets/clinic_visits",
                Some(app.key("owner:hospital")),
            )
            .json();
        if doc["status"] != "registering" {
            break;
        }
        seen_registering += 1;
        assert_eq!(
            asked.code().as_deref(),
            Some("unknown_table"),
            "{}",
            asked.text()
        );
        // Other buyers do not see the registration at all.
        assert_eq!(other.status, 404);
        // Within the per-principal rate limit.
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        seen_registering > 0,
        "registration finished before it could be observed"
    );
    let listed = wait_settled(&app, "clinic_visits");
    assert!(
        listed["quality"]["rows"].as_f64().unwrap() > 0.0,
        "{listed}"
    );
    // Active: queryable under a grant, from the unit summaries taken at registration.
    grant(&app, &["clinic_visits"]);
    let answer = app.query(sql);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["release"]["summary_used"], true);
    // The ledger has the version (who, manifest and data digests) and the card's charge.
    let registered = entries(&app, "dataset_registered", "clinic_visits");
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0]["by"], "owner:hospital");
    assert_eq!(registered[0]["version"], 1);
    assert_eq!(
        registered[0]["data_sha256"],
        listed["version"]["data_sha256"]
    );
    let evaluated = entries(&app, "dataset_evaluated", "clinic_visits");
    assert_eq!(evaluated.len(), 1);
    assert_eq!(evaluated[0]["epsilon"], 0.5);
    // The owner's views: its datasets, the use of this one and its lifetime ε.
    let mine = app
        .get("/v1/datasets?mine=true", Some(app.key("owner:hospital")))
        .json();
    let ids: Vec<&str> = mine["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"clinic_visits") && ids.contains(&"city_health"),
        "{ids:?}"
    );
    assert!(
        !ids.contains(&"power_grid"),
        "another owner's dataset: {ids:?}"
    );
    let usage = app
        .get(
            "/v1/datasets/clinic_visits/usage",
            Some(app.key("owner:hospital")),
        )
        .json();
    let answered: u64 = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["queries_answered"].as_u64().unwrap())
        .sum();
    assert_eq!(answered, 1, "{usage}");
    assert_eq!(
        usage["lifetime_epsilon"]["spent"], 1.0,
        "card and query: {usage}"
    );
    let granted = app
        .get("/v1/datasets?mine=true", Some(app.key("buyer:other")))
        .json();
    assert!(
        granted["datasets"].as_array().unwrap().is_empty(),
        "{granted}"
    );
}

#[test]
fn an_update_swaps_in_atomically_and_running_queries_finish_on_their_version() {
    // Version 2's self-join takes four times as long: room for it under
    // load; and no rate limit on the watch for the swap.
    let app = crate::helpers::spawn_app_with_limits(|l| {
        l.query_timeout_ms = 300_000;
        l.requests_per_second = 1e6;
        l.request_burst = 1e6;
    });
    let mut manifest = registered(&app, "power_grid.json", "substations", 0.03, "grid/v1");
    grant(&app, &["substations"]);
    // Version 2: twice the rows (the same file twice), in a new folder.
    let folder = |v: &str| root(&app.data_dir).join("grid").join(v);
    std::fs::create_dir_all(folder("v2")).unwrap();
    for part in ["part-0.parquet", "part-1.parquet"] {
        std::fs::copy(folder("v1").join("part-0.parquet"), folder("v2").join(part)).unwrap();
    }
    let slow = "SELECT COUNT(*) FROM substations a JOIN substations b ON a.district = b.district";
    // One answer: (rows metered, pairs counted, when it came back).
    let ask = || {
        let r = app.query(slow);
        assert_eq!(r.status, 200, "{}", r.text());
        let doc = r.json();
        let rows = doc["usage"]["rows_scanned"].as_u64().unwrap();
        (rows, doc["rows"][0][0].as_u64().unwrap(), Instant::now())
    };
    let small = ask();
    let version = |r: &crate::helpers::Response| match r.status {
        200 => Some(r.json()["version"]["data_sha256"].clone()),
        _ => None,
    };
    let watch = || app.get("/v1/datasets/substations", Some(app.key("owner:hospital")));
    // Updates back and forth between the two folders, with slow queries
    // running back to back throughout, until one query is seen running
    // through a swap (the watch sees a swap within a millisecond or two of
    // it, so the first try nearly always does).
    let mut caught = None;
    for to in ["v2", "v1", "v2"] {
        let before = version(&watch());
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (answers, swapped_at) = std::thread::scope(|s| {
            let running = s.spawn(|| {
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    answers.push(ask());
                }
                answers
            });
            std::thread::sleep(Duration::from_millis(300));
            manifest["source"]["location"] = json!(folder(to).to_str().unwrap());
            let r = send(
                &app,
                "PUT",
                "/v1/datasets/substations",
                "owner:hospital",
                &manifest,
            );
            assert_eq!(r.status, 202, "{}", r.text());
            let started = Instant::now();
            loop {
                let now = version(&watch());
                if now.is_some() && now != before {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(300), "no swap");
                // Leaves the preparing thread (idle priority) a core now and then.
                std::thread::sleep(Duration::from_millis(1));
            }
            let swapped_at = Instant::now();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (running.join().unwrap(), swapped_at)
        });
        // Twice the rows: twice the rows metered (two scans), four times the pairs.
        let v1 = (small.0, small.1);
        let v2 = (2 * small.0, 4 * small.1);
        let (old, new) = if to == "v2" { (v1, v2) } else { (v2, v1) };
        // New queries see the new version at once.
        let r = app.query("SELECT COUNT(*) FROM substations");
        assert_eq!(r.json()["rows"][0][0].as_u64().unwrap(), new.0 / 2);
        // Every answer is wholly one version's: metered rows and counted pairs agree.
        for (metered, counted, _) in &answers {
            assert!(
                [old, new].contains(&(*metered, *counted)),
                "an answer mixed versions: {metered} rows metered, {counted} pairs"
            );
        }
        // A query that read the old version and came back after the swap
        // was seen ran through the swap: it finished on its own version.
        if let Some(through) = answers
            .iter()
            .find(|(m, c, at)| (*m, *c) == old && *at > swapped_at)
        {
            caught = Some(*through);
            break;
        }
    }
    assert!(
        caught.is_some(),
        "no query ran through a swap in three tries"
    );
    // Each version is on the ledger, with its data digest.
    let versions = entries(&app, "dataset_registered", "substations");
    assert!(versions.len() >= 2);
    assert_eq!(versions[1]["version"], 2);
    assert_ne!(versions[0]["data_sha256"], versions[1]["data_sha256"]);
}

#[test]
fn an_update_rebuilds_the_unit_summaries_a_changed_file_had_lost() {
    let app = spawn_app();
    let manifest = registered(&app, "city_health.json", "clinic_visits", 0.1, "clinic");
    grant(&app, &["clinic_visits"]);
    let summary_used = |n: u32| {
        let sql = format!(
            "SELECT district, COUNT(*) FROM clinic_visits WHERE age >= {n} GROUP BY district"
        );
        let r = app.query(&sql);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["release"]["summary_used"].as_bool().unwrap()
    };
    assert!(summary_used(1));
    // Twice the rows written over the file in place: the summaries no longer
    // describe the data, so releases read the rows.
    let twice = listing(
        &app.data_dir,
        "city_health.json",
        "ignored",
        0.2,
        "clinic-next",
    );
    let file = root(&app.data_dir).join("clinic/part-0.parquet");
    std::fs::copy(
        root(&app.data_dir).join("clinic-next/part-0.parquet"),
        &file,
    )
    .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    assert!(!summary_used(2));
    drop(twice);
    // The owner publishes it as a new version: summaries rebuilt, used again.
    let r = send(
        &app,
        "PUT",
        "/v1/datasets/clinic_visits",
        "owner:hospital",
        &manifest,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_settled(&app, "clinic_visits");
    assert!(summary_used(3));
    let versions = entries(&app, "dataset_registered", "clinic_visits");
    assert_eq!(versions.len(), 2);
    assert!(versions[1]["rows"].as_u64() > versions[0]["rows"].as_u64());
}

#[test]
fn a_withdrawn_dataset_is_unknown_to_buyers_and_its_grants_end() {
    let app = spawn_app();
    let manifest = registered(&app, "enterprise_registry.json", "shops", 0.1, "shops");
    let granted = grant(&app, &["shops"]);
    let sql = "SELECT industry, COUNT(*) FROM shops GROUP BY industry";
    assert_eq!(app.query(sql).status, 200);
    // A new version is being prepared when the owner withdraws: it never comes.
    let r = send(
        &app,
        "PUT",
        "/v1/datasets/shops",
        "owner:hospital",
        &manifest,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let by_buyer = app.request(
        "DELETE",
        "/v1/datasets/shops",
        Some(app.key("buyer:acme")),
        None,
        None,
    );
    assert_eq!(by_buyer.status, 403);
    let r = app.request(
        "DELETE",
        "/v1/datasets/shops",
        Some(app.key("owner:hospital")),
        None,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["grants_ended"], json!([granted]));
    let refused = app.query(sql);
    assert_eq!(refused.status, 404);
    assert_eq!(refused.code().as_deref(), Some("unknown_table"));
    assert_eq!(
        app.get("/v1/datasets/shops", Some(app.key("buyer:acme")))
            .status,
        404
    );
    let grants = app.get("/v1/grants", Some(app.key("buyer:acme"))).json();
    let ended = grants["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["grant"]["id"] == granted.as_str())
        .unwrap();
    assert_eq!(ended["grant"]["status"], "revoked");
    let started = Instant::now();
    let pending = loop {
        let doc = app
            .get("/v1/datasets/shops", Some(app.key("owner:hospital")))
            .json();
        if doc["status"] == "failed" {
            break doc;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{doc}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        pending["pending"]["reason"]
            .as_str()
            .unwrap()
            .contains("withdrawn"),
        "{pending}"
    );
    assert_eq!(app.query(sql).code().as_deref(), Some("unknown_table"));
    // History stays: the registration, the answered query, the withdrawal.
    assert_eq!(entries(&app, "dataset_registered", "shops").len(), 1);
    let withdrawn = entries(&app, "dataset_withdrawn", "shops");
    assert_eq!(withdrawn[0]["by"], "owner:hospital");
    // Ids are not reused.
    let again = register(&app, &manifest);
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(again.code().as_deref(), Some("conflict"));
}

#[test]
fn owners_register_only_inside_their_own_root_and_under_their_own_name() {
    let app = spawn_app();
    let mut manifest = listing(
        &app.data_dir,
        "enterprise_registry.json",
        "shops",
        0.05,
        "shops",
    );
    let inside = root(&app.data_dir).join("shops/part-0.parquet");
    // Data another organisation holds, beside the hospital's root.
    let elsewhere = app.data_dir.join("owners/telecom");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::copy(&inside, elsewhere.join("theirs.parquet")).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.join("theirs.parquet"),
        root(&app.data_dir).join("link.parquet"),
    )
    .unwrap();
    let linked_folder = root(&app.data_dir).join("linked");
    std::fs::create_dir_all(&linked_folder).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.join("theirs.parquet"),
        linked_folder.join("p.parquet"),
    )
    .unwrap();
    for location in [
        root(&app.data_dir).join("../telecom/theirs.parquet"),
        elsewhere.join("theirs.parquet"),
        root(&app.data_dir).join("link.parquet"),
        linked_folder.clone(),
        PathBuf::from("/etc/passwd"),
    ] {
        manifest["source"]["location"] = json!(location.to_str().unwrap());
        let r = register(&app, &manifest);
        assert_eq!(r.status, 403, "{location:?}: {}", r.text());
        assert_eq!(r.code().as_deref(), Some("forbidden"));
    }
    // Relative locations resolve against the catalog folder, outside the root.
    manifest["source"]["location"] = json!("data/enterprise_registry.parquet");
    assert_eq!(register(&app, &manifest).status, 403);
    // Under another owner's name, or by a principal that is not an owner.
    manifest["source"]["location"] = json!(inside.to_str().unwrap());
    manifest["owner"] = json!("telecom");
    assert_eq!(
        register(&app, &manifest).code().as_deref(),
        Some("forbidden")
    );
    manifest["owner"] = json!("hospital");
    let by_buyer = send(&app, "POST", "/v1/datasets", "buyer:acme", &manifest);
    assert_eq!(by_buyer.status, 403);
    // Another owner's dataset cannot be updated or withdrawn.
    let mut grid: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("catalog/power_grid.json")).unwrap(),
    )
    .unwrap();
    grid["owner"] = json!("hospital");
    let r = send(
        &app,
        "PUT",
        "/v1/datasets/power_grid",
        "owner:hospital",
        &grid,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = app.request(
        "DELETE",
        "/v1/datasets/power_grid",
        Some(app.key("owner:hospital")),
        None,
        None,
    );
    assert_eq!(r.status, 403);
    // Nothing of it was registered; inside the root it is.
    assert_eq!(register(&app, &manifest).status, 202);
    wait_settled(&app, "shops");
}

#[test]
fn a_bad_manifest_is_refused_naming_each_failing_path() {
    let app = spawn_app();
    let good = listing(
        &app.data_dir,
        "enterprise_registry.json",
        "shops",
        0.05,
        "shops",
    );
    let problems = |manifest: &Value| {
        let r = register(&app, manifest);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.code().as_deref(), Some("invalid_request"));
        r.json()["error"]["details"]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["path"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let mut bad = good.clone();
    bad["level"] = json!("secret");
    bad["columns"][1]["class"] = json!("weird");
    bad["pricing"]["per_epsilon"] = json!("-1");
    bad.as_object_mut().unwrap().remove("title");
    let paths = problems(&bad);
    for expected in ["/level", "/columns/1/class", "/pricing/per_epsilon", "/"] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not in {paths:?}"
        );
    }
    // Valid on its own, wrong about its data.
    let mut wrong = good.clone();
    wrong["columns"].as_array_mut().unwrap().remove(2);
    wrong["columns"][0]["type"] = json!("string");
    wrong["columns"][1]["bounds"] = json!([0, 10]);
    let paths = problems(&wrong);
    for expected in ["/columns", "/columns/0/type", "/columns/1/bounds"] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not in {paths:?}"
        );
    }
    let mut sideways = good.clone();
    sideways["columns"][0]["bounds"] = json!([5, 1]);
    assert!(problems(&sideways).contains(&"/columns/0/bounds".to_string()));
    let mut missing = good.clone();
    missing["source"]["location"] = json!(root(&app.data_dir).join("nothing").to_str().unwrap());
    assert_eq!(problems(&missing), ["/source/location"]);
    let r = app.request(
        "POST",
        "/v1/datasets",
        Some(app.key("owner:hospital")),
        Some(b"{not json"),
        None,
    );
    assert_eq!(r.status, 400);
    // Manifests may be larger than other requests (public domains of
    // 10,000 values), up to 4 MiB.
    let mut padded = good.clone();
    padded["description"] = json!("x".repeat(1 << 20));
    let r = register(&app, &padded);
    assert_eq!(
        r.status,
        400,
        "schema-checked, not cut off: {}",
        &r.text()[..200.min(r.text().len())]
    );
    padded["description"] = json!("x".repeat(5 << 20));
    assert_eq!(register(&app, &padded).status, 413);
    // None of it registered anything.
    assert_eq!(
        app.get("/v1/datasets/shops", Some(app.key("owner:hospital")))
            .status,
        404
    );
}

#[test]
fn the_quality_card_holds_no_identifier_or_sensitive_value_and_is_noised() {
    let app = spawn_app();
    let manifest = listing(
        &app.data_dir,
        "city_health.json",
        "clinic_visits",
        0.1,
        "clinic",
    );
    assert_eq!(register(&app, &manifest).status, 202);
    let card = wait_settled(&app, "clinic_visits")["quality"].clone();
    assert_eq!(card["method"], "differential_privacy", "{card}");
    assert_eq!(card["epsilon"], 0.5);
    // Its shape: statistics only. No field could carry a value of the data.
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&card),
        [
            "columns",
            "computed_at",
            "epsilon",
            "epsilon_charged_to",
            "method",
            "noise",
            "persons",
            "rows",
            "rows_per_person_counted",
            "time_range"
        ]
    );
    for c in card["columns"].as_array().unwrap() {
        assert_eq!(
            keys(c),
            [
                "bounds",
                "class",
                "distinct",
                "name",
                "null_share",
                "outside_bounds_share",
                "type"
            ]
        );
        if matches!(c["class"].as_str(), Some("identifier" | "sensitive")) {
            assert!(c["distinct"].is_null(), "{c}");
        }
    }
    assert_eq!(card["time_range"]["column"], "visit_date");
    // Checked against the Parquet file: no identifying or sensitive value
    // appears anywhere on the card. (Its numbers are counts, shares and
    // scales by the shape above; its strings are checked one by one.)
    let file = root(&app.data_dir).join("clinic/part-0.parquet");
    let data = Data::open(&file);
    let mut secrets = std::collections::HashSet::new();
    for column in ["person_id", "name", "id_card", "diagnosis", "cost"] {
        secrets.extend(data.strings(&format!("CAST({column} AS VARCHAR)")));
    }
    let mut leaves = Vec::new();
    collect_leaves(&card, &mut leaves);
    for leaf in &leaves {
        assert!(
            !secrets.contains(leaf),
            "the card shows a data value: {leaf}"
        );
    }
    // Noised: the figures are not the exact ones (each person counted at most 20 times).
    let exact = |sql: &str| data.strings(sql)[0].parse::<f64>().unwrap();
    let pairs = [
        (
            card["persons"].as_f64().unwrap(),
            exact("SELECT CAST(COUNT(DISTINCT person_id) AS VARCHAR) FROM t"),
        ),
        (
            card["rows"].as_f64().unwrap(),
            exact(
                "SELECT CAST(SUM(LEAST(n, 20)) AS VARCHAR) FROM (SELECT COUNT(*) AS n FROM t GROUP BY person_id)",
            ),
        ),
        // Columns without a declared domain: no clamping after the noise.
        (
            card["columns"][8]["distinct"].as_f64().unwrap(),
            exact("SELECT CAST(COUNT(DISTINCT visit_date) AS VARCHAR) FROM t"),
        ),
        (
            card["columns"][9]["distinct"].as_f64().unwrap(),
            exact("SELECT CAST(COUNT(DISTINCT consented_purposes) AS VARCHAR) FROM t"),
        ),
    ];
    let differ = pairs.iter().filter(|(noisy, truth)| noisy != truth).count();
    assert!(
        differ >= 3,
        "noised figures equal the exact ones: {pairs:?}"
    );
    // A declared domain bounds a distinct count (gender: F, M).
    assert!(card["columns"][5]["distinct"].as_f64().unwrap() <= 2.0);
    // The rows figure is near the truth at its declared noise scale.
    let scale = card["noise"]["rows_scale"].as_f64().unwrap();
    assert!((pairs[1].0 - pairs[1].1).abs() < 20.0 * scale, "{pairs:?}");
    // Its ε was charged to the dataset's lifetime budget, on the ledger.
    assert_eq!(
        entries(&app, "dataset_evaluated", "clinic_visits")[0]["epsilon"],
        0.5
    );
}

/// Every string on `v`, at any depth.
fn collect_leaves(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => map.values().for_each(|x| collect_leaves(x, out)),
        Value::Array(items) => items.iter().for_each(|x| collect_leaves(x, out)),
        Value::String(s) => out.push(s.clone()),
        _ => {}
    }
}

/// A Parquet file as table `t`, for ground truth.
struct Data {
    rt: tokio::runtime::Runtime,
    ctx: datafusion::prelude::SessionContext,
}

impl Data {
    fn open(file: &Path) -> Data {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ctx = datafusion::prelude::SessionContext::new();
        rt.block_on(ctx.register_parquet(
            "t",
            file.to_str().unwrap(),
            datafusion::prelude::ParquetReadOptions::default(),
        ))
        .unwrap();
        Data { rt, ctx }
    }

    /// The first column of `SELECT <expr> FROM t` (or of a whole query), as strings.
    fn strings(&self, sql: &str) -> Vec<String> {
        let sql = if sql.to_ascii_uppercase().starts_with("SELECT") {
            sql.to_string()
        } else {
            format!("SELECT {sql} FROM t")
        };
        let batches = self
            .rt
            .block_on(async { self.ctx.sql(&sql).await.unwrap().collect().await.unwrap() });
        crate::helpers::first_column_strings(batches)
    }
}

#[test]
fn a_crash_during_registration_leaves_the_catalog_as_it_was_and_withdrawals_persist() {
    let data_dir = tempfile::tempdir().unwrap();
    let admin = Admin::open(data_dir.path());
    let owner = admin
        .add_principal(&Principal {
            id: "owner:hospital".into(),
            role: Role::Owner,
            org: Some("hospital".into()),
            region: "CN".into(),
        })
        .unwrap();
    drop(admin);
    let log = data_dir.path().join("server.log");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let call = |base: &str, method: &str, path: &str, body: Option<&Value>| -> (u16, Value) {
        let url = format!("{base}{path}");
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Authorization", format!("Bearer {owner}"))
            .header("Content-Type", "application/json");
        let result = match body {
            Some(b) => agent.run(request.body(b.to_string()).unwrap()),
            None => agent.run(request.body(()).unwrap()),
        };
        match result {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_json().unwrap_or(Value::Null),
            ),
            Err(_) => (0, Value::Null),
        }
    };
    let ids = |base: &str| {
        let (_, doc) = call(base, "GET", "/v1/datasets", None);
        let mut ids: Vec<String> = doc["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let manifest = listing(
        data_dir.path(),
        "enterprise_registry.json",
        "shops",
        0.05,
        "shops",
    );
    let server = Server::start(
        data_dir.path(),
        &log,
        &[("FROSTGLASS_FAILPOINT", "registration_before_commit")],
    );
    let before = ids(&server.base);
    let (status, _) = call(&server.base, "POST", "/v1/datasets", Some(&manifest));
    assert_eq!(status, 202);
    // The process dies while preparing, before anything is committed.
    let started = Instant::now();
    while call(&server.base, "GET", "/healthz", None).0 != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the failpoint did not fire"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.kill();
    let server = Server::start(data_dir.path(), &log, &[]);
    assert_eq!(ids(&server.base), before, "the catalog is as it was");
    assert_eq!(call(&server.base, "GET", "/v1/datasets/shops", None).0, 404);
    // The id was never taken: registering again works.
    assert_eq!(
        call(&server.base, "POST", "/v1/datasets", Some(&manifest)).0,
        202
    );
    let started = Instant::now();
    while call(&server.base, "GET", "/v1/datasets/shops", None).1["status"] != "active" {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
    // A withdrawal (of a dataset from catalog/ files, too) survives a restart.
    assert_eq!(
        call(&server.base, "DELETE", "/v1/datasets/city_health", None).0,
        200
    );
    server.kill();
    let server = Server::start(data_dir.path(), &log, &[]);
    let after = ids(&server.base);
    assert!(after.contains(&"shops".to_string()), "{after:?}");
    assert!(!after.contains(&"city_health".to_string()), "{after:?}");
}

#[test]
fn a_registration_whose_card_the_budget_cannot_pay_fails_visibly_to_its_owner_only() {
    let app = spawn_app();
    let mut manifest = listing(
        &app.data_dir,
        "city_health.json",
        "clinic_visits",
        0.05,
        "clinic",
    );
    manifest["release"]["dp"]["epsilon_total"] = json!(0.2);
    manifest["evaluation"] = json!({ "epsilon": 0.5 });
    assert_eq!(register(&app, &manifest).status, 202);
    let started = Instant::now();
    let failed = loop {
        let doc = app
            .get(
                "/v1/datasets/clinic_visits",
                Some(app.key("owner:hospital")),
            )
            .json();
        if doc["status"] == "failed" {
            break doc;
        }
        assert_eq!(doc["status"], "registering", "{doc}");
        assert!(started.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(50));
    };
    let reason = failed["pending"]["reason"].as_str().unwrap();
    assert!(reason.contains("lifetime budget"), "{reason}");
    // Auditors see that it failed, not why (a reason may quote the owner's data).
    let audited = app
        .get("/v1/datasets/clinic_visits", Some(app.key("auditor:cac")))
        .json();
    assert_eq!(audited["status"], "failed");
    assert!(audited["pending"]["reason"].is_null(), "{audited}");
    assert_eq!(
        app.get("/v1/datasets/clinic_visits", Some(app.key("buyer:acme")))
            .status,
        404
    );
    // Nothing was charged or recorded, and the id is free to try again.
    assert!(entries(&app, "dataset_evaluated", "clinic_visits").is_empty());
    assert!(entries(&app, "dataset_registered", "clinic_visits").is_empty());
    manifest["evaluation"] = json!({ "epsilon": 0.1 });
    assert_eq!(register(&app, &manifest).status, 202);
    let listed = wait_settled(&app, "clinic_visits");
    assert_eq!(listed["lifetime_epsilon"]["spent"], 0.1, "{listed}");
}
