//! Tidy checks over the whole workspace: crate boundaries from design.md.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// (crate, dependencies it must not have, directly or transitively).
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("ksrpc-core", &["actix-web", "actix-http", "actix-ws", "pyo3", "tokio", "reqwest"]),
    ("ksrpc-cache", &["actix-web", "actix-http", "actix-ws", "pyo3", "reqwest"]),
    ("ksrpc-transport", &["pyo3", "actix-ws", "ksrpc-transport-http", "ksrpc-transport-ws"]),
    // Neither transport depends on the other: what they share is in ksrpc-transport.
    ("ksrpc-transport-http", &["pyo3", "ksrpc-transport-ws"]),
    ("ksrpc-transport-ws", &["pyo3", "ksrpc-transport-http"]),
    ("ksrpc-py", &["actix-web", "actix-http", "actix-ws"]),
    ("ksrpc-client", &["actix-web", "actix-http", "actix-ws", "pyo3"]),
];

#[test]
fn crates_do_not_gain_forbidden_dependencies() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, Vec<(&str, bool)>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    // Only normal (non-dev, non-build) edges count.
                    let normal = d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null());
                    (d["pkg"].as_str().unwrap(), normal)
                })
                .collect();
            (n["id"].as_str().unwrap(), deps)
        })
        .collect();
    let mut problems = Vec::new();
    for (krate, forbidden) in FORBIDDEN {
        let root = names.iter().find(|(_, n)| *n == krate).map(|(id, _)| *id).expect("crate exists");
        let mut seen = BTreeSet::new();
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            for &(dep, normal) in nodes.get(id).into_iter().flatten() {
                if normal && seen.insert(dep) {
                    stack.push(dep);
                }
            }
        }
        for dep in &seen {
            if forbidden.contains(&names[dep]) {
                problems.push(format!("{krate} depends on {}", names[dep]));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
