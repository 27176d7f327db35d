//! Batch mode: every input file of a folder through the model, one output file per input.
//!
//! Owns reading inputs (`.npy` for a single-input model; `.json` holding an Open Inference
//! Protocol request or `{"data": ...}`), writing outputs (`.npy` for a `.npy` input and a
//! single output, JSON otherwise), and the report. A file that fails is listed with its
//! reason and the batch goes on.
//!
//! Outputs are written through [`OutputDir`]: relative to the output folder's descriptor,
//! to a new temporary file opened create-new without following links, then renamed over the
//! final name. A link planted at an output path (by whoever else can write that folder) is
//! replaced, never followed, and nothing is written outside the folder.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, CWD, Mode, OFlags};

use serde::Serialize;
use tract_onnx::prelude::*;

use crate::engine::{AnyRequest, Request, respond, score_input, score_result};
use crate::metrics::{Metrics, Source};
use crate::model::{InferError, LoadedModel};

/// Why the batch as a whole could not run (single files failing is not an error).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("reading input folder {path}: {error}")]
    ReadDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("creating output folder {path}: {error}")]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("writing the report {path}: {error}")]
    Report {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Why an output file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output name {0:?} is not a plain file name inside the output folder")]
    Name(String),
    #[error("writing {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// The output folder, opened once; every output is created relative to its descriptor, so a
/// folder swapped for a link after the start does not redirect later outputs either.
#[derive(Debug)]
pub struct OutputDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// Makes temporary names unique within the process (the pid makes them unique across).
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Accepts `name` only as one plain path component: not empty, `.` or `..`, no `/` or NUL.
/// Output names come from input file names; this keeps any name, however made, inside.
pub fn confined_name(name: &str) -> Result<&str, OutputError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(OutputError::Name(name.to_string()));
    }
    Ok(name)
}

impl OutputDir {
    /// Creates the folder if missing and opens it. The folder itself is the operator's
    /// choice and may be reached through links; what is inside it is not trusted.
    pub fn create(path: &Path) -> std::io::Result<OutputDir> {
        std::fs::create_dir_all(path)?;
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(OutputDir {
            path: path.to_path_buf(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` as `name` in the folder and returns its path.
    ///
    /// The data goes to a new temporary file (`O_CREAT | O_EXCL | O_NOFOLLOW`, relative to
    /// the folder's descriptor), which is then renamed over `name`: a symlink or hard link
    /// already at `name` is replaced, not written through, and readers never see a
    /// half-written output. Fails on a name that is not a plain component, or when the file
    /// cannot be created, written or renamed (e.g. a directory sits at `name`).
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, OutputError> {
        let name = confined_name(name)?;
        let path = self.path.join(name);
        let io = |error: std::io::Error| OutputError::Io {
            path: path.clone(),
            error,
        };
        let (tmp, fd) = loop {
            let tmp = format!(
                ".outpost-{}-{}.tmp",
                std::process::id(),
                TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
            );
            match rustix::fs::openat(
                &self.fd,
                tmp.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            ) {
                Ok(fd) => break (tmp, fd),
                // Left behind by an earlier process of the same pid: take the next number.
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(io(e.into())),
            }
        };
        let written = std::fs::File::from(fd).write_all(bytes).and_then(|()| {
            Ok(rustix::fs::renameat(
                &self.fd,
                tmp.as_str(),
                &self.fd,
                name,
            )?)
        });
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
            return Err(io(e));
        }
        Ok(path)
    }
}

/// One input that did not produce an output.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub file: String,
    pub error: String,
}

/// What the batch did; also written to `batch-report.json` in the output folder.
#[derive(Debug, Clone, Serialize)]
pub struct BatchReport {
    pub model: String,
    pub total: usize,
    pub succeeded: usize,
    pub failed: Vec<Failure>,
    /// Files that are neither `.npy` nor `.json`; not counted in `total`.
    pub skipped: Vec<String>,
    pub seconds: f64,
    pub per_second: f64,
}

/// Progress of one file, handed to the caller (the CLI prints it).
#[derive(Debug)]
pub struct Progress<'a> {
    pub index: usize,
    pub total: usize,
    pub file: &'a str,
    pub elapsed: Duration,
    pub result: Result<&'a Path, &'a str>,
}

/// Name of the report the batch leaves beside its outputs.
pub const REPORT: &str = "batch-report.json";

#[derive(Debug, thiserror::Error)]
enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Npy(#[from] crate::npy::NpyError),
    #[error("invalid JSON request: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Infer(#[from] InferError),
    #[error("{0}")]
    Output(#[from] OutputError),
}

/// Runs every `.npy` and `.json` file of `input` (in name order) and writes the outputs to
/// `output`, calling `progress` after each file.
///
/// Fails only when a folder cannot be read or created or the report cannot be written.
pub fn run(
    model: &LoadedModel,
    model_name: &str,
    input: &Path,
    output: &Path,
    metrics: &Metrics,
    mut progress: impl FnMut(&Progress<'_>),
) -> Result<BatchReport, BatchError> {
    let read_dir = |error| BatchError::ReadDir {
        path: input.to_path_buf(),
        error,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(input)
        .map_err(read_dir)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_dir)?
        .into_iter()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let output = OutputDir::create(output).map_err(|error| BatchError::CreateDir {
        path: output.to_path_buf(),
        error,
    })?;

    let (inputs, skipped): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|p| matches!(ext(p).as_deref(), Some("npy" | "json")));
    let skipped: Vec<String> = skipped.iter().map(|p| file_name(p)).collect();
    let start = Instant::now();
    let mut failed = Vec::new();
    let total = inputs.len();
    for (index, path) in inputs.iter().enumerate() {
        let t0 = Instant::now();
        let name = file_name(path);
        let result = one(model, model_name, path, &output);
        let elapsed = t0.elapsed();
        metrics.observe(Source::Batch, elapsed, result.is_ok());
        match &result {
            Ok(out) => progress(&Progress {
                index,
                total,
                file: &name,
                elapsed,
                result: Ok(out),
            }),
            Err(e) => {
                let error = e.to_string();
                progress(&Progress {
                    index,
                    total,
                    file: &name,
                    elapsed,
                    result: Err(&error),
                });
                failed.push(Failure { file: name, error });
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let succeeded = total - failed.len();
    let report = BatchReport {
        model: model_name.to_string(),
        total,
        succeeded,
        failed,
        skipped,
        seconds,
        per_second: if seconds > 0.0 {
            succeeded as f64 / seconds
        } else {
            0.0
        },
    };
    let text = serde_json::to_vec_pretty(&report).unwrap_or_default();
    output
        .write(REPORT, &text)
        .map_err(|e| BatchError::Report {
            path: output.path().join(REPORT),
            error: match e {
                OutputError::Io { error, .. } => error,
                OutputError::Name(n) => std::io::Error::other(n),
            },
        })?;
    Ok(report)
}

fn ext(p: &Path) -> Option<String> {
    p.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs one file and returns the output written.
fn one(
    model: &LoadedModel,
    model_name: &str,
    path: &Path,
    output: &OutputDir,
) -> Result<PathBuf, FileError> {
    let bytes = std::fs::read(path)?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if ext(path).as_deref() == Some("npy") {
        let t = model.check_single(crate::npy::read(&bytes)?)?;
        let outputs = model.run(tvec![t.into_tvalue()])?;
        if let [single] = outputs.as_slice() {
            return Ok(output.write(&format!("{stem}.npy"), &crate::npy::write(single)?)?);
        }
        let all: Vec<usize> = (0..model.outputs.len()).collect();
        let response = respond(model_name, model, None, &outputs, &all)?;
        return Ok(output.write(&format!("{stem}.json"), &serde_json::to_vec(&response)?)?);
    }
    let request: AnyRequest = serde_json::from_slice(&bytes)?;
    let body = match request.classify()? {
        Request::Infer(r) => {
            let checked = model.check(&r)?;
            let outputs = model.run(checked.inputs)?;
            serde_json::to_vec(&respond(
                model_name,
                model,
                r.id,
                &outputs,
                &checked.outputs,
            )?)?
        }
        Request::Score { data, .. } => {
            let t = score_input(model, &data)?;
            let outputs = model.run(tvec![t.into_tvalue()])?;
            serde_json::to_vec(&serde_json::json!({ "result": score_result(model, &outputs)? }))?
        }
    };
    Ok(output.write(&format!("{stem}.json"), &body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_stay_in_the_folder() {
        for bad in ["", ".", "..", "../x.npy", "/etc/passwd", "a/b.json", "x\0y"] {
            assert!(confined_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a.npy", "..npy", "...json", ".hidden.json"] {
            assert_eq!(confined_name(good).unwrap(), good);
        }
    }

    #[test]
    fn writes_replace_planted_links_without_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"precious").unwrap();
        let out = OutputDir::create(&dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(&outside, out.path().join("a.npy")).unwrap();
        std::fs::hard_link(&outside, out.path().join("b.npy")).unwrap();
        // A dangling link, as a module would plant before the file it points to exists.
        std::os::unix::fs::symlink(dir.path().join("new.txt"), out.path().join("c.npy")).unwrap();
        for name in ["a.npy", "b.npy", "c.npy"] {
            let p = out.write(name, b"result").unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"result");
            assert!(!std::fs::symlink_metadata(&p).unwrap().is_symlink());
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert!(!dir.path().join("new.txt").exists());
        assert!(matches!(
            out.write("../escape.npy", b"x"),
            Err(OutputError::Name(_))
        ));
        assert!(!dir.path().join("escape.npy").exists());
        // A directory at the name is an error for that output; no temporary file is left.
        std::fs::create_dir(out.path().join("d.npy")).unwrap();
        assert!(matches!(
            out.write("d.npy", b"x"),
            Err(OutputError::Io { .. })
        ));
        let names: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}
