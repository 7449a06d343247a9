//! The command line: `validate` over the examples and a corpus of broken specs, `schema`
//! against the checked-in file, and configuration errors exiting 64.

use std::path::Path;
use std::process::{Command, Output};

use crate::fixtures::berth_bin;

fn berth(args: &[&str]) -> Output {
    Command::new(berth_bin())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("BERTH_DATABASE_URL")
        .env_remove("BERTH_NATS_URL")
        .output()
        .expect("the berth binary runs")
}

#[test]
fn examples_are_valid() {
    let out = berth(&["validate", "examples/"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn broken_specs_each_get_a_located_error() {
    let out = berth(&["validate", "tests/specs/broken"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let expected_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/specs/broken.expected");
    if std::env::var_os("BERTH_BLESS").is_some() {
        std::fs::write(&expected_path, &stdout).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    assert_eq!(
        stdout, expected,
        "validate output differs from tests/specs/broken.expected (BERTH_BLESS=1 rewrites it)"
    );

    // Every broken file is named by at least one `file:line:col: field: message` line.
    for entry in
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/specs/broken")).unwrap()
    {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.ends_with(".yaml") {
            continue;
        }
        let prefix = format!("tests/specs/broken/{name}:");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no error for {name}"));
        let rest: Vec<&str> = line[prefix.len()..].splitn(3, ": ").collect();
        let loc: Vec<&str> = rest[0].split(':').collect();
        assert!(
            loc.len() == 2 && loc.iter().all(|n| n.parse::<usize>().is_ok()),
            "{line}"
        );
        assert_eq!(rest.len(), 3, "file:line:col: field: message in {line}");
    }
}

#[test]
fn validate_json_output_and_missing_paths() {
    let out = berth(&[
        "validate",
        "-o",
        "json",
        "tests/specs/broken/unknown_field.yaml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"][0]["field"], "replica");
    assert_eq!(v["errors"][0]["line"], 5);
    let out = berth(&["validate", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("does/not/exist.yaml:1:1: file: no such file or folder")
    );
}

#[test]
fn checked_in_schema_matches_berth_schema() {
    let out = berth(&["schema"]);
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let checked_in = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/app.schema.json"),
    )
    .unwrap();
    assert_eq!(
        printed.trim_end(),
        checked_in.trim_end(),
        "specs/app.schema.json is stale: run `berth schema > specs/app.schema.json`"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_setting() {
    let out = berth(&["up", "--edge-listen", "not-an-address"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--edge-listen / BERTH_EDGE_LISTEN") && err.contains("not-an-address"),
        "{err}"
    );

    let out = Command::new(berth_bin())
        .args(["up"])
        .env("BERTH_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BERTH_LOG_FORMAT"));

    let out = berth(&["up", "--components", "api,edg"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown component `edg`"));

    let out = berth(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}
