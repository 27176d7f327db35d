//! What both command lines (the device's `outpost`, the operator's `outpost-ctl`) print the
//! same way: issues under their JSON path, tables, and the report of `manifest validate`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::intake::{self, MAX_MESSAGE_BYTES};
use crate::manifest::Issue;
use crate::signing::TrustedKeys;

/// One line per issue, indented, `(document)` for issues about the whole document.
pub fn issue_lines(issues: &[Issue]) -> String {
    let mut out = String::new();
    for issue in issues {
        let path = if issue.path.is_empty() {
            "(document)"
        } else {
            issue.path.as_str()
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {path}: {}", issue.message);
    }
    out
}

/// Rows under a header, columns padded to their widest cell, trailing spaces trimmed.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Reads a manifest or envelope file, refusing one over the intake limit before reading it.
pub fn read_input(path: &Path) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_MESSAGE_BYTES as u64 {
        return Err(format!(
            "{} is {} bytes, over the {MAX_MESSAGE_BYTES}-byte limit",
            path.display(),
            meta.len(),
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The outcome of `manifest validate` over some files.
#[derive(Debug)]
pub struct Validation {
    /// What a person reads: a line per file, its issues under it.
    pub text: String,
    /// What a program reads: one object per file.
    pub json: Value,
    /// How many files were refused.
    pub refused: usize,
}

/// Validates manifests (bare or in an envelope, whose signature is not checked here).
pub fn validate_files(files: &[PathBuf]) -> Validation {
    let mut reports = Vec::new();
    let mut text = String::new();
    let mut refused = 0;
    for file in files {
        let outcome = read_input(file)
            .map_err(|e| vec![Issue::new("", e)])
            .and_then(|bytes| {
                intake::intake(&bytes, &TrustedKeys::default()).map_err(|e| e.issues())
            });
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        match outcome {
            Ok(accepted) => {
                let d = &accepted.deployment;
                reports.push(json!({"file": file, "valid": true, "id": d.id, "version": d.version, "modules": d.modules.len()}));
                let _ = writeln!(
                    text,
                    "{}: ok ({} v{}, {} module{})",
                    file.display(),
                    d.id,
                    d.version,
                    d.modules.len(),
                    plural(d.modules.len())
                );
            }
            Err(issues) => {
                refused += 1;
                let _ = writeln!(
                    text,
                    "{}: invalid ({} issue{})",
                    file.display(),
                    issues.len(),
                    plural(issues.len())
                );
                text.push_str(&issue_lines(&issues));
                reports.push(json!({"file": file, "valid": false, "issues": issues}));
            }
        }
    }
    Validation {
        text,
        json: Value::Array(reports),
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_to_the_widest_cell() {
        let t = table(
            &["NAME", "STATUS"],
            &[
                ["a".into(), "running".into()],
                ["longer".into(), "x".into()],
            ],
        );
        assert_eq!(t, "NAME    STATUS\na       running\nlonger  x\n");
    }

    #[test]
    fn validation_names_each_file_and_its_issues() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            br#"{"schemaVersion":"1.0","id":"a","version":1,"modules":{}}"#,
        )
        .unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(
            &bad,
            br#"{"schemaVersion":"1.0","id":"a","version":"one","modules":{}}"#,
        )
        .unwrap();
        let v = validate_files(&[good, bad, dir.path().join("missing.json")]);
        assert_eq!(v.refused, 2, "{}", v.text);
        assert!(
            v.text.contains("good.json: ok (a v1, 0 modules)"),
            "{}",
            v.text
        );
        assert!(v.text.contains("bad.json: invalid"), "{}", v.text);
        assert!(v.text.contains("/version"), "{}", v.text);
        assert!(v.text.contains("missing.json: invalid"), "{}", v.text);
        assert_eq!(v.json[0]["valid"], true);
    }
}
