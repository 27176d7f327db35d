//! Batch mode: every input file of a folder through the model, one output file per input.
//!
//! Owns reading inputs (`.npy` for a single-input model; `.json` holding an Open Inference
//! Protocol request or `{"data": ...}`), writing outputs (`.npy` for a `.npy` input and a
//! single output, JSON otherwise), and the report. A file that fails is listed with its
//! reason and the batch goes on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    std::fs::create_dir_all(output).map_err(|error| BatchError::CreateDir {
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
        let result = one(model, model_name, path, output);
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
    let path = output.join(REPORT);
    let text = serde_json::to_vec_pretty(&report).unwrap_or_default();
    std::fs::write(&path, text).map_err(|error| BatchError::Report { path, error })?;
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
    output: &Path,
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
            let out = output.join(format!("{stem}.npy"));
            std::fs::write(&out, crate::npy::write(single)?)?;
            return Ok(out);
        }
        let all: Vec<usize> = (0..model.outputs.len()).collect();
        let response = respond(model_name, model, None, &outputs, &all)?;
        let out = output.join(format!("{stem}.json"));
        std::fs::write(&out, serde_json::to_vec(&response)?)?;
        return Ok(out);
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
    let out = output.join(format!("{stem}.json"));
    std::fs::write(&out, body)?;
    Ok(out)
}
