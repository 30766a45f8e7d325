//! Dependencies point one way: front doors → pipeline → services → domain
//! (policy, release, accounting, ledger) → catalog, engine, store →
//! foundations → util. Each top-level module has a rank; a module may use
//! only modules of a lower rank, so there are no cycles, and nothing below
//! the front doors knows HTTP.

use crate::helpers::repo;
use std::collections::BTreeSet;
use std::path::Path;

const RANKS: &[(&str, u8)] = &[
    ("util", 0),
    ("error", 1),
    ("config", 1),
    ("validate", 1),
    ("auth", 1),
    ("telemetry", 1),
    ("store", 2),
    ("catalog", 2),
    ("accounting", 2),
    ("engine", 3),
    ("demo", 3),
    ("policy", 3),
    ("ledger", 3),
    ("release", 4),
    ("app", 5),
    ("pipeline", 6),
    ("api", 7),
    ("fuzzing", 7),
    // Flight SQL answers with HTTP's error bodies and shares its throttle.
    ("flight", 8),
    ("startup", 9),
];

fn rank(module: &str) -> u8 {
    RANKS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, r)| *r)
        .unwrap_or_else(|| panic!("module {module} has no rank in the architecture test"))
}

/// The source without `#[cfg(test)]` items: tests may reach anywhere.
fn without_tests(source: &str) -> String {
    let mut out = String::new();
    let mut rest = source;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let brace = after.find('{').unwrap_or(after.len());
        let semi = after.find(';').unwrap_or(after.len());
        if semi < brace {
            rest = &after[semi + 1..];
            continue;
        }
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after.char_indices().skip(brace) {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (module, the crate modules its non-test code names, whether it names actix or clap)
fn modules() -> Vec<(String, BTreeSet<String>, bool)> {
    let src = repo().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out: Vec<(String, BTreeSet<String>, bool)> = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let mut parts = rel.iter().map(|p| p.to_str().unwrap());
        let first = parts.next().unwrap();
        let module = first.trim_end_matches(".rs").to_string();
        // The binary (a front door) and the crate root may use anything.
        if module == "cli" || module == "lib" {
            continue;
        }
        let code = without_tests(&std::fs::read_to_string(&file).unwrap());
        let mut uses = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                uses.insert(name);
            }
        }
        let web = ["actix_web", "actix_tls", "clap::"]
            .iter()
            .any(|w| code.contains(w));
        match out.iter_mut().find(|(m, _, _)| *m == module) {
            Some((_, all, w)) => {
                all.extend(uses);
                *w |= web;
            }
            None => out.push((module, uses, web)),
        }
    }
    out
}

#[test]
fn dependencies_point_one_way_and_only_front_doors_know_http() {
    let modules = modules();
    assert!(modules.len() >= RANKS.len() - 1, "{modules:?}");
    let mut wrong = Vec::new();
    for (module, uses, web) in &modules {
        for used in uses {
            if rank(used) >= rank(module) {
                wrong.push(format!(
                    "{module} (rank {}) uses {used} (rank {})",
                    rank(module),
                    rank(used)
                ));
            }
        }
        if *web && module != "api" {
            wrong.push(format!("{module} uses actix or clap; only front doors may"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_a_violation_when_there_is_one() {
    // The same scan over a made-up source: a test-only use is ignored, a real one is not.
    let code = "use crate::api::x;\n#[cfg(test)]\nmod tests { use crate::pipeline; }\n";
    let kept = without_tests(code);
    assert!(kept.contains("crate::api"));
    assert!(!kept.contains("crate::pipeline"));
    assert!(rank("api") > rank("policy"));
}
