//! The model: loading an ONNX file into optimized tract plans, describing its inputs and
//! outputs, checking requests against them, running it, and swapping it when the file changes.
//!
//! Owns [`LoadedModel`] (one immutable model with its plans and metadata) and, in `slot`,
//! [`ModelSlot`] (the model currently served, replaced atomically by a reload; requests hold an
//! `Arc` of the model they started on, so a swap never cuts one short). Loading — declared and
//! symbolic shapes, typing, the probe plan — lives in `load`.

mod load;
mod slot;

pub use load::{AUTO_THREADS_BYTES, LoadError, LoadOptions, auto_threads, load};
pub use slot::{FileStamp, ModelSlot};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tract_onnx::prelude::*;

use crate::plans::{Plan, Plans};
use crate::tensor::{
    DataType, InferRequest, TensorError, request_datatype, request_shape, request_tensor,
};

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
