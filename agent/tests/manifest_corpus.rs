//! The manifest corpus: every example is accepted, every invalid case is refused with the path
//! and message its `.expect` file names, and the committed schema agrees with the types.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_agent::manifest::{self, Deployment, schema};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_is_valid() {
    let examples = files("manifests/examples", "json");
    assert!(examples.len() >= 3);
    for file in &examples {
        let bytes = std::fs::read(file).unwrap();
        if let Err(e) = manifest::parse(&bytes) {
            panic!("{} is refused: {e}", file.display());
        }
    }
}

#[test]
fn every_invalid_case_is_refused_with_its_expected_issue() {
    let cases = files("manifests/invalid", "json");
    assert!(cases.len() >= 25, "the corpus must hold at least 25 cases");
    for file in &cases {
        let expect = std::fs::read_to_string(file.with_extension("expect"))
            .unwrap_or_else(|_| panic!("{} has no .expect file", file.display()));
        let mut lines = expect.lines();
        let (path, message) = (lines.next().unwrap(), lines.next().unwrap());
        let bytes = std::fs::read(file).unwrap();
        let err = manifest::parse(&bytes)
            .err()
            .unwrap_or_else(|| panic!("{} was accepted", file.display()));
        let issues = err.issues();
        assert!(
            issues
                .iter()
                .any(|i| i.path == path && i.message.contains(message)),
            "{}: expected `{path}: ...{message}...`, got {issues:#?}",
            file.display()
        );
    }
}

#[test]
fn the_cli_accepts_the_examples_and_refuses_the_invalid_cases() {
    let bin = env!("CARGO_BIN_EXE_outpost");
    let out = Command::new(bin)
        .args(["manifest", "validate"])
        .args(files("manifests/examples", "json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let invalid = files("manifests/invalid", "json");
    let out = Command::new(bin)
        .args(["manifest", "validate", "--json"])
        .args(&invalid)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports.len(), invalid.len());
    for (report, file) in reports.iter().zip(&invalid) {
        assert_eq!(report["valid"], false, "{}", file.display());
        let expected_path = std::fs::read_to_string(file.with_extension("expect")).unwrap();
        let expected_path = expected_path.lines().next().unwrap();
        assert!(
            report["issues"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["path"] == expected_path),
            "{report}"
        );
    }
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let committed =
        std::fs::read_to_string(repo().join("manifests/schema/deployment.schema.json")).unwrap();
    assert!(
        committed == schema::schema_text(),
        "manifests/schema/deployment.schema.json is stale: run \
         `outpost-ctl manifest schema > manifests/schema/deployment.schema.json`"
    );
}

/// The schema is never looser than the types: what it accepts the types parse, and what the
/// types cannot parse it refuses. Checked with an independent validator instance on every
/// example and every invalid case that is JSON.
#[test]
fn schema_and_types_agree_on_the_corpus() {
    let validator = jsonschema::validator_for(schema::schema()).unwrap();
    let mut all = files("manifests/examples", "json");
    all.extend(files("manifests/invalid", "json"));
    for file in all {
        let Ok(value) = serde_json::from_slice::<Value>(&std::fs::read(&file).unwrap()) else {
            continue; // not JSON: neither side gets to judge it
        };
        let schema_ok = validator.is_valid(&value);
        let types_ok = serde_json::from_value::<Deployment>(value).is_ok();
        assert!(
            !schema_ok || types_ok,
            "{}: the schema accepts what the types refuse",
            file.display()
        );
        if file.starts_with(repo().join("manifests/examples")) {
            assert!(schema_ok && types_ok, "{}", file.display());
        }
    }
}
