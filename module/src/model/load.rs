//! Loading a model file: parse, apply declared shapes, name every unknown input dimension,
//! type (with symbols where tract can), optimize with our kernels, and plan the probe shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;
use tract_onnx::tract_hir::internal::{DimLike, Factoid};

use super::{Dim, FileStamp, InferError, LoadedModel, TensorSpec};
use crate::plans::{Plan, PlanLimits, PlanMode, Plans};
use crate::tensor::DataType;

/// Why a model could not be loaded. Causes are part of each message rather than a `#[source]`:
/// the message is served whole on `/v2/health/ready`, and a source would print twice in a chain.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a loadable ONNX model: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(
        "{path}: declared shape for unknown input '{input}' (the model's inputs are {known:?})"
    )]
    UnknownDeclaredInput {
        path: PathBuf,
        input: String,
        known: Vec<String>,
    },
    #[error("{path}: {what} '{name}' has datatype {datum} that this server cannot carry")]
    Datatype {
        path: PathBuf,
        what: &'static str,
        name: String,
        datum: String,
    },
    #[error("{path}: input '{input}': {reason}")]
    Shape {
        path: PathBuf,
        input: String,
        reason: String,
    },
    #[error("{path}: cannot optimize the model: {reason}")]
    Optimize { path: PathBuf, reason: String },
}

/// How to load models: what the command line and environment declare.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Shapes declared for inputs, fixed or symbolic per dimension (`--input-shape`): to fix
    /// what the model leaves open (faster), or to name dimensions it leaves unknown.
    pub shapes: HashMap<String, Vec<Dim>>,
    /// Threads for tract's matrix products; 1 keeps everything on the calling thread;
    /// `None` chooses by the model's size ([`auto_threads`]).
    pub threads: Option<usize>,
    /// How models with symbolic input dimensions are planned.
    pub plan_mode: PlanMode,
    /// Bounds on the plans made per input shape: how many are kept, how much memory one may
    /// need.
    pub plan_limits: PlanLimits,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            shapes: HashMap::new(),
            threads: None,
            plan_mode: PlanMode::PerShape,
            plan_limits: PlanLimits::default(),
        }
    }
}

/// The shape of a typed fact, symbolic dimensions by their expression.
fn dims_of(shape: &ShapeFact) -> Vec<Dim> {
    shape
        .iter()
        .map(|d| match d.to_usize() {
            Ok(n) => Dim::Fixed(n),
            Err(_) => Dim::Symbolic(d.to_string()),
        })
        .collect()
}

fn spec(
    path: &Path,
    what: &'static str,
    name: String,
    datum: DatumType,
    shape: Vec<Dim>,
) -> Result<TensorSpec, LoadError> {
    let datatype = DataType::from_datum(datum).ok_or_else(|| LoadError::Datatype {
        path: path.to_path_buf(),
        what,
        name: name.clone(),
        datum: format!("{datum:?}"),
    })?;
    Ok(TensorSpec {
        name,
        datatype,
        shape,
    })
}

/// An output's served name: its label (the ONNX output name), else its node's name.
fn output_name(label: Option<&str>, node: &str) -> String {
    label.unwrap_or(node).to_string()
}

/// A tract error while typing or optimizing `path`, as a load error.
fn optimize_error(path: &Path) -> impl Fn(TractError) -> LoadError + Copy + '_ {
    move |e| LoadError::Optimize {
        path: path.to_path_buf(),
        reason: format!("{e:#}"),
    }
}

/// The outputs of a typed model, by label (the ONNX output name) or node name.
fn typed_outputs(path: &Path, model: &TypedModel) -> Result<Vec<TensorSpec>, LoadError> {
    let mut outputs = Vec::new();
    for outlet in &model.outputs {
        let name = output_name(model.outlet_label(*outlet), &model.node(outlet.node).name);
        let fact = model.outlet_fact(*outlet).map_err(optimize_error(path))?;
        outputs.push(spec(
            path,
            "output",
            name,
            fact.datum_type,
            dims_of(&fact.shape),
        )?);
    }
    Ok(outputs)
}

/// Model files from this size up get two threads for their matrix products by default.
pub const AUTO_THREADS_BYTES: u64 = 2 << 20;

/// The default thread count for a model of `size` bytes: measured on the benchmark models
/// (`docs/benchmarks.md`), two threads cut magika's latency (3.2 MB) by a quarter while the
/// small CNN, the MLP and the PP-OCR classifier (0.6 MB) gain nothing or lose up to half:
/// their products are too small to share. Never more threads than CPUs.
pub fn auto_threads(size: u64) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if size >= AUTO_THREADS_BYTES {
        cpus.min(2)
    } else {
        1
    }
}

/// A name made of what a symbol may hold: `x.1` becomes `x_1`.
fn symbol_name(input: &str, axis: usize) -> String {
    let clean: String = input
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{clean}_{axis}")
}

/// Loads `path` into runnable plans: parse, apply declared shapes, name every unknown input
/// dimension, type, optimize.
///
/// Inputs with symbolic dimensions load without flags: the model is typed with its symbols
/// where tract can, and planned per request shape (or once, symbolically, in
/// [`PlanMode::Symbolic`]); the shape with every symbol at 1 is planned at load, so a model
/// that cannot run at all fails here, not at its first request.
///
/// Fails when the file cannot be read or parsed, when a declared shape names an input the
/// model does not have or disagrees with its rank, when an input has no datatype or rank,
/// when an input or output has a datatype the protocols cannot carry, or when tract cannot
/// type or optimize the graph (usually an unsupported operator).
pub fn load(path: &Path, options: &LoadOptions, version: u64) -> Result<LoadedModel, LoadError> {
    let start = Instant::now();
    let stamp = FileStamp::of(path).map_err(|error| LoadError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let bytes = std::fs::read(path).map_err(|error| LoadError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let parse = |e: TractError| LoadError::Parse {
        path: path.to_path_buf(),
        reason: format!("{e:#}"),
    };
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut bytes.as_slice())
        .map_err(parse)?;

    let names: Vec<String> = model
        .input_outlets()
        .map_err(parse)?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    for declared in options.shapes.keys() {
        if !names.contains(declared) {
            return Err(LoadError::UnknownDeclaredInput {
                path: path.to_path_buf(),
                input: declared.clone(),
                known: names.clone(),
            });
        }
    }
    let shape_error = |input: &str, reason: String| LoadError::Shape {
        path: path.to_path_buf(),
        input: input.to_string(),
        reason,
    };
    let mut inputs = Vec::new();
    let mut symbols = Vec::new();
    for (ix, name) in names.iter().enumerate() {
        let fact = model.input_fact(ix).map_err(parse)?.clone();
        let datum = fact
            .datum_type
            .concretize()
            .ok_or_else(|| shape_error(name, "the model declares no datatype".into()))?;
        let rank = (!fact.shape.is_open()).then(|| fact.shape.dims().count());
        let dims: Vec<TDim> = match options.shapes.get(name) {
            Some(declared) => {
                if let Some(rank) = rank.filter(|&r| r != declared.len()) {
                    return Err(shape_error(
                        name,
                        format!(
                            "the declared shape has {} dimensions but the model's input has {rank}",
                            declared.len()
                        ),
                    ));
                }
                declared
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => n.to_dim(),
                        Dim::Symbolic(s) => model.symbols.sym(s).to_dim(),
                    })
                    .collect()
            }
            None if rank.is_none() => {
                return Err(shape_error(
                    name,
                    format!(
                        "the model declares no rank; give its shape with --input-shape {name}=D,D,..."
                    ),
                ));
            }
            None => fact
                .shape
                .dims()
                .enumerate()
                .map(|(axis, d)| match d.concretize() {
                    Some(d @ (TDim::Val(_) | TDim::Sym(_))) => d,
                    // Unknown, or an expression of symbols: a symbol of its own.
                    _ => model.symbols.sym(&symbol_name(name, axis)).to_dim(),
                })
                .collect(),
        };
        if dims.iter().any(|d| matches!(d, TDim::Val(v) if *v < 1)) {
            return Err(shape_error(
                name,
                format!("the shape {dims:?} has a dimension below 1"),
            ));
        }
        symbols.push(
            dims.iter()
                .map(|d| match d {
                    TDim::Sym(s) => Some(s.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        );
        let shape = dims
            .iter()
            .map(|d| match d.to_usize() {
                Ok(n) => Dim::Fixed(n),
                Err(_) => Dim::Symbolic(d.to_string()),
            })
            .collect();
        inputs.push(spec(path, "input", name.clone(), datum, shape)?);
        model
            .set_input_fact(ix, InferenceFact::dt_shape(datum, dims))
            .map_err(parse)?;
    }

    let optimize = optimize_error(path);
    let threads = options
        .threads
        .unwrap_or_else(|| auto_threads(bytes.len() as u64));
    let run_options = RunOptions {
        executor: (threads > 1).then(|| tract_linalg::multithread::Executor::multithread(threads)),
        ..RunOptions::default()
    };
    let symbolic = symbols.iter().flatten().any(Option::is_some);
    let (plans, outputs) = if !symbolic {
        let typed = model
            .into_typed()
            .and_then(crate::kernels::into_optimized)
            .map_err(optimize)?;
        let outputs = typed_outputs(path, &typed)?;
        let plan = Plan::new(typed, &run_options).map_err(optimize)?;
        (Plans::single(plan), outputs)
    } else {
        // The shape planned at load: every symbol at 1.
        let probe: Vec<Vec<usize>> = inputs
            .iter()
            .map(|s| s.shape.iter().map(|d| d.fixed().unwrap_or(1)).collect())
            .collect();
        let probe: Vec<&[usize]> = probe.iter().map(Vec::as_slice).collect();
        let refused = |e: InferError| LoadError::Optimize {
            path: path.to_path_buf(),
            reason: format!(
                "planning it with every symbolic input dimension at 1 failed ({e}); if it needs larger sizes, give them with --input-shape (numbers fix a dimension, names keep it symbolic)"
            ),
        };
        match model
            .clone()
            .into_typed()
            .and_then(|t| t.into_decluttered())
        {
            Ok(typed) => {
                let outputs = typed_outputs(path, &typed)?;
                let plans = match options.plan_mode {
                    PlanMode::Symbolic => Plans::single(
                        Plan::new(
                            crate::kernels::into_optimized(typed).map_err(optimize)?,
                            &run_options,
                        )
                        .map_err(optimize)?,
                    ),
                    PlanMode::PerShape => {
                        Plans::typed(typed, symbols, run_options, options.plan_limits)
                    }
                };
                plans.get(&probe).map_err(refused)?;
                (plans, outputs)
            }
            Err(typing) if options.plan_mode == PlanMode::Symbolic => {
                return Err(LoadError::Optimize {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tract cannot type this model with symbolic dimensions ({typing:#}); plan it per shape (the default)"
                    ),
                });
            }
            Err(typing) => {
                tracing::debug!(
                    error = format!("{typing:#}"),
                    "typing with symbols failed; planning per shape from the parsed model"
                );
                let analysed = parsed_outputs(path, &model)?;
                let plans = Plans::parsed(model, symbols, run_options, options.plan_limits);
                let plan = plans.get(&probe).map_err(refused)?;
                let outputs = probe_outputs(path, plan.model(), analysed)?;
                (plans, outputs)
            }
        }
    };
    Ok(LoadedModel {
        path: path.to_path_buf(),
        inputs,
        outputs,
        threads,
        load_time: start.elapsed(),
        stamp,
        version,
        plans,
    })
}

/// The outputs of a model tract cannot type with symbols, from its plan at the probe shape
/// (every symbol at 1) and what shape inference found: a dimension inference knows is kept, a
/// dimension of 1 it does not know is taken as following a symbol (the batch, most often) and
/// served as -1, any other is fixed.
fn probe_outputs(
    path: &Path,
    probe: &TypedModel,
    analysed: Vec<TensorSpec>,
) -> Result<Vec<TensorSpec>, LoadError> {
    let planned = typed_outputs(path, probe)?;
    Ok(planned
        .into_iter()
        .zip(analysed)
        .map(|(planned, analysed)| {
            let shape = planned
                .shape
                .iter()
                .enumerate()
                .map(|(axis, dim)| match (dim, analysed.shape.get(axis)) {
                    (_, Some(known @ Dim::Fixed(_))) => known.clone(),
                    (Dim::Fixed(1), Some(symbolic @ Dim::Symbolic(s))) if s != "?" => {
                        symbolic.clone()
                    }
                    (Dim::Fixed(1), _) => Dim::Symbolic("?".into()),
                    (dim, _) => dim.clone(),
                })
                .collect();
            TensorSpec { shape, ..planned }
        })
        .collect())
}

/// The outputs of a model tract cannot type with symbols: what shape inference finds before
/// it stops (a dimension it cannot tell is symbolic, sent as -1).
fn parsed_outputs(path: &Path, model: &InferenceModel) -> Result<Vec<TensorSpec>, LoadError> {
    let mut analysed = model.clone();
    // Analysis stops at the operator that needs known shapes; the facts found so far stay.
    let _ = analysed.analyse(false);
    let mut outputs = Vec::new();
    for outlet in &analysed.outputs {
        let name = output_name(
            analysed.outlet_label(*outlet),
            &analysed.node(outlet.node).name,
        );
        let fact = analysed
            .outlet_fact(*outlet)
            .map_err(optimize_error(path))?;
        let datum = fact
            .datum_type
            .concretize()
            .ok_or_else(|| LoadError::Optimize {
                path: path.to_path_buf(),
                reason: format!("cannot tell the datatype of output '{name}'"),
            })?;
        let shape = if fact.shape.is_open() {
            vec![]
        } else {
            fact.shape
                .dims()
                .map(|d| match d.concretize().map(|d| d.to_usize()) {
                    Some(Ok(n)) => Dim::Fixed(n),
                    Some(Err(_)) => {
                        Dim::Symbolic(d.concretize().map_or("?".into(), |d| d.to_string()))
                    }
                    None => Dim::Symbolic("?".into()),
                })
                .collect()
        };
        outputs.push(spec(path, "output", name, datum, shape)?);
    }
    Ok(outputs)
}
