//! The model: loading an ONNX file into an optimized tract plan, describing its inputs and
//! outputs, checking requests against them, running it, and swapping it when the file changes.
//!
//! Owns [`LoadedModel`] (one immutable, runnable plan with its metadata) and [`ModelSlot`] (the
//! model currently served, replaced atomically by a reload; requests hold an `Arc` of the
//! model they started on, so a swap never cuts one short).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;
use tract_onnx::tract_hir::internal::{DimLike, Factoid};

use crate::metrics::Metrics;
use crate::plans::{Plan, PlanMode, Plans};
use crate::tensor::{
    DataType, InferRequest, TensorError, request_datatype, request_shape, request_tensor,
};

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

/// Why a request could not be run. [`InferError::is_client_error`] decides 400 against 500.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("no model is loaded: {0}")]
    NotReady(String),
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("unknown input '{name}'; the model's inputs are {known:?}")]
    UnknownInput { name: String, known: Vec<String> },
    #[error("input '{0}' appears more than once")]
    DuplicateInput(String),
    #[error("missing input '{0}'")]
    MissingInput(String),
    #[error("input '{name}' has datatype {got} but the model expects {expected}")]
    WrongDatatype {
        name: String,
        got: String,
        expected: DataType,
    },
    #[error("input '{name}' has shape {got:?} but the model expects {expected}")]
    WrongShape {
        name: String,
        got: Vec<i64>,
        expected: String,
    },
    #[error(
        "dimension {symbol} is {first_size} in input '{first}' but {second_size} in input '{second}'; inputs sharing it must agree"
    )]
    SymbolMismatch {
        symbol: String,
        first: String,
        first_size: i64,
        second: String,
        second_size: i64,
    },
    #[error("unknown output '{name}'; the model's outputs are {known:?}")]
    UnknownOutput { name: String, known: Vec<String> },
    #[error("{0}")]
    BadRequest(String),
    #[error("inference failed: {0}")]
    Run(String),
}

impl InferError {
    /// True when the request is at fault (answered 400); false for server-side failures.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, InferError::NotReady(_) | InferError::Run(_))
            && !matches!(self, InferError::Tensor(TensorError::Internal { .. }))
    }
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
    /// Plans kept for different input shapes (per-shape mode); the least recently used goes.
    pub plan_cache: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            shapes: HashMap::new(),
            threads: None,
            plan_mode: PlanMode::PerShape,
            plan_cache: 8,
        }
    }
}

/// One dimension of a tensor: a fixed size, or a symbol every request may choose (its name
/// in the model, or `input_axis` for dimensions the model leaves unnamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Symbolic(String),
}

impl Dim {
    pub fn fixed(&self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Symbolic(_) => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// One input or output as served in metadata; symbolic dimensions are sent as -1.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// Shape in the protocol's form: symbolic dimensions are -1.
    pub fn oip_shape(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| d.fixed().map_or(-1, |d| d as i64))
            .collect()
    }

    fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        format!("[{}]", dims.join(", "))
    }

    /// Accepts `shape` when rank and every fixed dimension agree, and every symbolic one is
    /// at least 1 (an empty batch is nothing to run, and not every operator survives it).
    fn accepts(&self, shape: &[i64]) -> bool {
        shape.len() == self.shape.len()
            && shape
                .iter()
                .zip(&self.shape)
                .all(|(&got, want)| match want {
                    Dim::Fixed(w) => got == *w as i64,
                    Dim::Symbolic(_) => got >= 1,
                })
    }
}

/// The metadata document of `GET /v2/models/{name}`, also logged at load.
#[derive(Debug, Clone, Serialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

impl From<&TensorSpec> for TensorMetadata {
    fn from(s: &TensorSpec) -> Self {
        TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.oip_name(),
            shape: s.oip_shape(),
        }
    }
}

/// A loaded, optimized, runnable model and what is known about it. Immutable once built.
pub struct LoadedModel {
    pub path: PathBuf,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Threads of tract's matrix products, as given or as chosen by [`auto_threads`].
    pub threads: usize,
    /// Time from reading the file to a runnable plan.
    pub load_time: Duration,
    /// Identity of the file this was loaded from, to notice replacement.
    pub stamp: FileStamp,
    /// Counts loads in this process, served as the model version.
    pub version: u64,
    /// The plan (fixed inputs) or the plans per input shape (symbolic inputs).
    pub plans: Plans,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("load_time", &self.load_time)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What identifies a version of the model file: replacing it by rename changes the inode,
/// rewriting it in place changes the length or the modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode,
        })
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

/// The outputs of a typed model, by label (the ONNX output name) or node name.
fn typed_outputs(path: &Path, model: &TypedModel) -> Result<Vec<TensorSpec>, LoadError> {
    let mut outputs = Vec::new();
    for outlet in &model.outputs {
        let name = model
            .outlet_label(*outlet)
            .map(str::to_string)
            .unwrap_or_else(|| model.node(outlet.node).name.clone());
        let fact = model
            .outlet_fact(*outlet)
            .map_err(|e| LoadError::Optimize {
                path: path.to_path_buf(),
                reason: format!("{e:#}"),
            })?;
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

    let optimize = |e: TractError| LoadError::Optimize {
        path: path.to_path_buf(),
        reason: format!("{e:#}"),
    };
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
                        Plans::typed(typed, symbols, run_options, options.plan_cache)
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
                let plans = Plans::parsed(model, symbols, run_options, options.plan_cache);
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
        let name = analysed
            .outlet_label(*outlet)
            .map(str::to_string)
            .unwrap_or_else(|| analysed.node(outlet.node).name.clone());
        let fact = analysed
            .outlet_fact(*outlet)
            .map_err(|e| LoadError::Optimize {
                path: path.to_path_buf(),
                reason: format!("{e:#}"),
            })?;
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

/// A request after checking: tensors in the model's input order, outputs to return.
#[derive(Debug)]
pub struct CheckedRequest {
    pub inputs: TVec<TValue>,
    /// Indices into the model's outputs, in the order the client asked for them.
    pub outputs: Vec<usize>,
}

impl LoadedModel {
    fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|s| s.name.clone()).collect()
    }

    /// Checks an OIP request against the model's inputs and builds its tensors. Every error
    /// names the input and the problem (unknown or missing name, datatype, shape, values).
    pub fn check(&self, request: &InferRequest) -> Result<CheckedRequest, InferError> {
        // Each input with its index in the request, for the field paths of errors.
        let mut by_name: HashMap<&str, (usize, &crate::tensor::RequestInput)> = HashMap::new();
        for (index, input) in request.inputs.iter().enumerate() {
            if !self.inputs.iter().any(|s| s.name == input.name) {
                return Err(InferError::UnknownInput {
                    name: input.name.clone(),
                    known: self.input_names(),
                });
            }
            if by_name.insert(&input.name, (index, input)).is_some() {
                return Err(InferError::DuplicateInput(input.name.clone()));
            }
        }
        let mut tensors = TVec::new();
        // Each symbol's size, and the input that set it: inputs sharing a symbol must agree.
        let mut sizes: HashMap<&str, (i64, &str)> = HashMap::new();
        for spec in &self.inputs {
            let &(index, input) = by_name
                .get(spec.name.as_str())
                .ok_or_else(|| InferError::MissingInput(spec.name.clone()))?;
            let dt = request_datatype(index, input)?;
            if dt != spec.datatype {
                return Err(InferError::WrongDatatype {
                    name: input.name.clone(),
                    got: input.datatype.clone(),
                    expected: spec.datatype,
                });
            }
            // Negative and overflowing shapes first: nothing below may multiply them.
            request_shape(index, input, dt)?;
            if !spec.accepts(&input.shape) {
                return Err(InferError::WrongShape {
                    name: input.name.clone(),
                    got: input.shape.clone(),
                    expected: spec.shape_text(),
                });
            }
            for (dim, &got) in spec.shape.iter().zip(&input.shape) {
                let Dim::Symbolic(symbol) = dim else { continue };
                match sizes.insert(symbol, (got, &spec.name)) {
                    Some((before, other)) if before != got => {
                        return Err(InferError::SymbolMismatch {
                            symbol: symbol.clone(),
                            first: other.to_string(),
                            first_size: before,
                            second: spec.name.clone(),
                            second_size: got,
                        });
                    }
                    _ => {}
                }
            }
            tensors.push(request_tensor(index, input)?.into_tvalue());
        }
        let outputs = match &request.outputs {
            None => (0..self.outputs.len()).collect(),
            Some(wanted) => wanted
                .iter()
                .map(|w| {
                    self.outputs
                        .iter()
                        .position(|o| o.name == w.name)
                        .ok_or_else(|| InferError::UnknownOutput {
                            name: w.name.clone(),
                            known: self.outputs.iter().map(|o| o.name.clone()).collect(),
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(CheckedRequest {
            inputs: tensors,
            outputs,
        })
    }

    /// Checks one ready-made tensor for a single-input model (`/score`, `.npy` batch files).
    /// A tensor one rank short of the model's input is taken as a single sample.
    pub fn check_single(&self, t: Tensor) -> Result<Tensor, InferError> {
        let [spec] = self.inputs.as_slice() else {
            return Err(InferError::BadRequest(format!(
                "this call needs a model with exactly one input; this one has {:?}",
                self.input_names()
            )));
        };
        if DataType::from_datum(t.datum_type()) != Some(spec.datatype) {
            let got = DataType::from_datum(t.datum_type())
                .map_or(format!("{:?}", t.datum_type()), |d| d.to_string());
            return Err(InferError::WrongDatatype {
                name: spec.name.clone(),
                got,
                expected: spec.datatype,
            });
        }
        let mut shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        let mut t = t;
        if shape.len() + 1 == spec.shape.len() {
            shape.insert(0, 1);
            t.insert_axis(0)
                .map_err(|e| InferError::Run(e.to_string()))?;
        }
        if !spec.accepts(&shape) {
            return Err(InferError::WrongShape {
                name: spec.name.clone(),
                got: shape,
                expected: spec.shape_text(),
            });
        }
        Ok(t)
    }

    /// The plan for these inputs' shapes (made now if new: see [`Plans::get`]).
    fn plan_for(&self, inputs: &TVec<TValue>) -> Result<Arc<Plan>, InferError> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
        self.plans.get(&shapes)
    }

    /// Runs the model on checked inputs. Blocking: call it from a blocking thread.
    pub fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>, InferError> {
        self.plan_for(&inputs)?.run(inputs)
    }

    /// Runs `runs` times timing every node, and returns (operator name, total time, share)
    /// sorted by time: where a model spends its time, for tuning (`bench --profile`).
    pub fn profile(
        &self,
        inputs: &TVec<TValue>,
        runs: usize,
    ) -> Result<Vec<(String, Duration, f64)>, InferError> {
        self.plan_for(inputs)?.profile(inputs, runs)
    }

    pub fn metadata_inputs(&self) -> Vec<TensorMetadata> {
        self.inputs.iter().map(Into::into).collect()
    }

    pub fn metadata_outputs(&self) -> Vec<TensorMetadata> {
        self.outputs.iter().map(Into::into).collect()
    }
}

/// What the slot reports about its last load attempt.
#[derive(Debug, Clone, Default)]
struct SlotStatus {
    /// The last load's error, cleared by a successful load.
    last_error: Option<String>,
    loads: u64,
}

/// The model being served, and how to replace it. Cheap to read from any thread.
pub struct ModelSlot {
    /// The served name (`/v2/models/{name}`).
    pub name: String,
    pub path: PathBuf,
    options: LoadOptions,
    current: ArcSwapOption<LoadedModel>,
    status: Mutex<SlotStatus>,
    metrics: Arc<Metrics>,
}

impl ModelSlot {
    /// A slot with nothing loaded yet.
    pub fn new(name: String, path: PathBuf, options: LoadOptions, metrics: Arc<Metrics>) -> Self {
        ModelSlot {
            name,
            path,
            options,
            current: ArcSwapOption::empty(),
            status: Mutex::new(SlotStatus::default()),
            metrics,
        }
    }

    /// The model in service, if any. Holding the `Arc` keeps it alive through a swap.
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.current.load_full()
    }

    /// Why the slot is not ready (or why the last reload failed while an older model serves).
    pub fn last_error(&self) -> Option<String> {
        self.status.lock().ok().and_then(|s| s.last_error.clone())
    }

    /// The model, or the reason there is none, as a request error.
    pub fn require(&self) -> Result<Arc<LoadedModel>, InferError> {
        self.current().ok_or_else(|| {
            InferError::NotReady(self.last_error().unwrap_or_else(|| "still loading".into()))
        })
    }

    /// Loads the file now (blocking) and, when it loads, swaps it in. A failure leaves the
    /// model in service untouched and is kept as the slot's last error.
    pub fn load_now(&self) -> Result<Arc<LoadedModel>, LoadError> {
        let version = self.status.lock().map(|s| s.loads + 1).unwrap_or(1);
        match load(&self.path, &self.options, version) {
            Ok(model) => {
                let model = Arc::new(model);
                tracing::info!(
                    model = %self.name,
                    path = %self.path.display(),
                    version,
                    load_ms = model.load_time.as_secs_f64() * 1e3,
                    threads = model.threads,
                    plans = model.plans.made(),
                    inputs = %serde_json::to_string(&model.metadata_inputs()).unwrap_or_default(),
                    outputs = %serde_json::to_string(&model.metadata_outputs()).unwrap_or_default(),
                    "model loaded"
                );
                self.metrics.model_loaded(model.load_time);
                self.current.store(Some(model.clone()));
                if let Ok(mut s) = self.status.lock() {
                    s.loads = version;
                    s.last_error = None;
                }
                Ok(model)
            }
            Err(e) => {
                tracing::error!(model = %self.name, error = %e, serving_previous = self.current.load().is_some(), "model load failed");
                self.metrics.model_load_failed();
                if let Ok(mut s) = self.status.lock() {
                    s.last_error = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Watches the model file and reloads it when it changes, until `shutdown`.
    ///
    /// Polls the file's identity (inode, length, mtime) every `interval`: inotify does not see
    /// a file replaced through a bind mount, and polling a `stat` is cheap. A file that keeps
    /// changing is loaded once it has been stable for one interval, so a copy in progress is
    /// not loaded half-written (replace by rename to make it immediate).
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut tried: Option<FileStamp> = self
            .current()
            .map(|m| m.stamp.clone())
            .or_else(|| FileStamp::of(&self.path).ok());
        let mut pending: Option<FileStamp> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let Ok(now) = FileStamp::of(&self.path) else {
                continue;
            };
            if Some(&now) == tried.as_ref() {
                pending = None;
                continue;
            }
            if pending.as_ref() != Some(&now) {
                pending = Some(now);
                continue;
            }
            pending = None;
            tried = Some(now);
            tracing::info!(model = %self.name, "model file changed; loading it beside the current one");
            let slot = self.clone();
            // Loading takes hundreds of milliseconds of CPU: keep it off the async threads.
            let _ = tokio::task::spawn_blocking(move || slot.load_now()).await;
        }
    }
}
