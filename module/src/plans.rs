//! Runnable plans for the input shapes requests bring.
//!
//! Owns how a model whose inputs have symbolic dimensions (`[N, 2048]`, `[?, 3, 48, ?]`) is
//! run: tract optimises best, and some models only type at all, when every shape is known, so
//! each shape a request brings gets its own concretised plan, made on first use and kept in a
//! small least-recently-used cache. A model with fixed inputs has one plan, made at load.
//! With [`PlanMode::Symbolic`], one plan typed with the symbols serves every shape instead
//! (tract resolves them at each run): slower on every model measured, kept for comparison
//! (`docs/inference.md`).
//!
//! Each plan keeps the run states of finished requests: spawning one allocates every
//! intermediate buffer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::bail;
use tract_onnx::tract_core::runtime::RunOptions;

use crate::model::InferError;

/// Run states kept per plan; more concurrent requests than this spawn a fresh state and drop
/// it afterwards.
const STATE_POOL: usize = 8;

/// How a model with symbolic input dimensions is planned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanMode {
    /// A plan per input shape, concretised on first use and cached (the default: faster).
    #[default]
    PerShape,
    /// One plan typed with the symbols for every shape.
    Symbolic,
}

/// What plans are made from.
enum Origin {
    /// Every plan there will ever be is made: the inputs are fixed, or the mode is symbolic.
    Single(Arc<Plan>),
    /// Typed (and decluttered) with its symbols: a shape substitutes them, then optimises.
    Typed(TypedModel),
    /// tract could not type the model with symbols (some operators need known shapes): each
    /// shape types the parsed model from its inputs.
    Parsed(InferenceModel),
}

/// The input shapes of one request: the cache key.
type Shapes = Vec<TVec<usize>>;

/// A plan for one set of input shapes (or all of them), with its pool of run states.
pub struct Plan {
    runnable: Arc<TypedSimplePlan>,
    states: Mutex<Vec<TypedSimpleState>>,
}

impl Plan {
    /// Plans a model optimized by [`crate::kernels::into_optimized`].
    pub fn new(model: TypedModel, options: &RunOptions) -> TractResult<Plan> {
        Ok(Plan {
            runnable: model.into_runnable_with_options(options)?,
            states: Mutex::new(Vec::new()),
        })
    }

    /// The optimised model behind the plan (its output facts are the outputs' shapes).
    pub fn model(&self) -> &TypedModel {
        self.runnable.model()
    }

    /// Runs the plan. Blocking: call it from a blocking thread.
    pub fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>, InferError> {
        // A poisoned pool only means another run panicked; its states are dropped, not reused.
        let state = self.states.lock().ok().and_then(|mut s| s.pop());
        let mut state = match state {
            Some(s) => s,
            None => self
                .runnable
                .spawn()
                .map_err(|e| InferError::Run(format!("{e:#}")))?,
        };
        let out = state
            .run(inputs)
            .map_err(|e| InferError::Run(format!("{e:#}")))?;
        if let Ok(mut pool) = self.states.lock()
            && pool.len() < STATE_POOL
        {
            pool.push(state);
        }
        Ok(out)
    }

    /// Runs `runs` times timing every node; (operator, total time, share), slowest first.
    pub fn profile(
        &self,
        inputs: &TVec<TValue>,
        runs: usize,
    ) -> Result<Vec<(String, Duration, f64)>, InferError> {
        let mut state = self
            .runnable
            .spawn()
            .map_err(|e| InferError::Run(format!("{e:#}")))?;
        let mut per_op: HashMap<String, Duration> = HashMap::new();
        for _ in 0..runs.max(1) {
            state
                .run_plan_with_eval(inputs.clone(), |ctx, op_state, node, input| {
                    let t = Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                    *per_op.entry(node.op().name().to_string()).or_default() += t.elapsed();
                    r
                })
                .map_err(|e| InferError::Run(format!("{e:#}")))?;
        }
        let total: Duration = per_op.values().sum();
        let mut v: Vec<_> = per_op
            .into_iter()
            .map(|(op, d)| (op, d, d.as_secs_f64() / total.as_secs_f64().max(1e-12)))
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        Ok(v)
    }
}

/// A shape's plan, or why the model cannot run with that shape (kept too: a client repeating
/// a shape the model refuses must not make the server compile it again every time).
type Made = Result<Arc<Plan>, String>;

/// Bounds on the plans made per input shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// Plans kept; the least recently used is dropped beyond it.
    pub cache: usize,
    /// Largest size of a plan's intermediate tensors (every node output but constants, a
    /// bound on what a run holds): a shape needing more is refused before it runs. Symbolic
    /// dimensions let a client pick a batch the body limit allows but the device's memory
    /// does not (16 MiB of magika input is a batch of 2048, and gigabytes of activations).
    pub max_bytes: u64,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits {
            cache: 8,
            max_bytes: 512 << 20,
        }
    }
}

/// The bytes of every intermediate tensor of a concrete model: its node outputs, constants
/// aside.
pub fn intermediate_bytes(model: &TypedModel) -> u64 {
    model
        .nodes()
        .iter()
        .filter(|n| !n.op_is::<tract_onnx::tract_core::ops::konst::Const>())
        .flat_map(|n| n.outputs.iter())
        .map(|o| {
            let elements = o
                .fact
                .shape
                .as_concrete()
                .map_or(0, |s| s.iter().product::<usize>());
            (elements as u64).saturating_mul(o.fact.datum_type.size_of() as u64)
        })
        .fold(0u64, u64::saturating_add)
}

/// A byte count for people: MiB from one up, KiB below.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    } else {
        format!("{} KiB", bytes.div_ceil(1 << 10))
    }
}

/// The plans of one loaded model.
pub struct Plans {
    origin: Origin,
    /// The symbols of each input dimension (`None` where fixed), for substitution.
    symbols: Vec<Vec<Option<Symbol>>>,
    options: RunOptions,
    /// Most recently used last; at most `capacity` entries.
    cache: Mutex<Vec<(Shapes, Made)>>,
    limits: PlanLimits,
    /// Plans made since load, for the statistics endpoint and tests.
    made: std::sync::atomic::AtomicU64,
}

impl Plans {
    /// Plans for a model whose inputs are all fixed, or that runs one symbolic plan.
    pub fn single(plan: Plan) -> Plans {
        Plans {
            origin: Origin::Single(Arc::new(plan)),
            symbols: Vec::new(),
            options: RunOptions::default(),
            cache: Mutex::new(Vec::new()),
            limits: PlanLimits::default(),
            made: 1.into(),
        }
    }

    /// Plans made per shape from a model typed with its symbols.
    pub fn typed(
        model: TypedModel,
        symbols: Vec<Vec<Option<Symbol>>>,
        options: RunOptions,
        limits: PlanLimits,
    ) -> Plans {
        Plans::per_shape(Origin::Typed(model), symbols, options, limits)
    }

    /// Plans made per shape from the parsed model, for models tract cannot type symbolically.
    pub fn parsed(
        model: InferenceModel,
        symbols: Vec<Vec<Option<Symbol>>>,
        options: RunOptions,
        limits: PlanLimits,
    ) -> Plans {
        Plans::per_shape(Origin::Parsed(model), symbols, options, limits)
    }

    fn per_shape(
        origin: Origin,
        symbols: Vec<Vec<Option<Symbol>>>,
        options: RunOptions,
        limits: PlanLimits,
    ) -> Plans {
        Plans {
            origin,
            symbols,
            options,
            cache: Mutex::new(Vec::new()),
            limits: PlanLimits {
                cache: limits.cache.max(1),
                ..limits
            },
            made: 0.into(),
        }
    }

    /// How many plans were made since load (1 for a single plan).
    pub fn made(&self) -> u64 {
        self.made.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The plan for inputs of these shapes: from the cache, or made now (blocking, as long as
    /// a load: call it from a blocking thread). A shape the model cannot run is a client
    /// error that names the shapes and tract's reason.
    pub fn get(&self, shapes: &[&[usize]]) -> Result<Arc<Plan>, InferError> {
        if let Origin::Single(plan) = &self.origin {
            return Ok(plan.clone());
        }
        if let Some(made) = self.cached(shapes) {
            return made.map_err(InferError::BadRequest);
        }
        // A shape not seen yet: only now is a key allocated.
        let key: Shapes = shapes.iter().map(|s| s.iter().copied().collect()).collect();
        // Made outside the lock: other shapes keep being served meanwhile. Two requests of
        // one new shape at once may both make it; the second to finish is kept.
        let made: Made = self.make(&key).map(Arc::new).map_err(|e| {
            format!(
                "the model cannot run with input shapes {:?}: {e:#}",
                key.iter().map(|s| s.as_slice()).collect::<Vec<_>>()
            )
        });
        self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|(k, _)| *k != key);
            if cache.len() >= self.limits.cache {
                drop(cache.remove(0));
            }
            cache.push((key, made.clone()));
        }
        made.map_err(InferError::BadRequest)
    }

    /// The plan made for these shapes, marked most recently used; compared in place, so a
    /// request of a known shape allocates nothing here.
    fn cached(&self, shapes: &[&[usize]]) -> Option<Made> {
        let mut cache = self.cache.lock().ok()?;
        let same = |k: &Shapes| {
            k.len() == shapes.len() && k.iter().zip(shapes).all(|(a, b)| a.as_slice() == *b)
        };
        let at = cache.iter().position(|(k, _)| same(k))?;
        let entry = cache.remove(at);
        let made = entry.1.clone();
        cache.push(entry);
        Some(made)
    }

    /// Concretises the model for `shapes` and makes its plan.
    fn make(&self, shapes: &Shapes) -> TractResult<Plan> {
        let typed = match &self.origin {
            Origin::Single(_) => unreachable!("single plans are never made per shape"),
            Origin::Typed(model) => {
                let mut values: HashMap<Symbol, TDim> = HashMap::new();
                for (symbols, shape) in self.symbols.iter().zip(shapes) {
                    for (symbol, &dim) in symbols.iter().zip(shape.iter()) {
                        if let Some(s) = symbol {
                            values.insert(s.clone(), dim.to_dim());
                        }
                    }
                }
                crate::kernels::into_optimized(model.set_symbols(&values)?)?
            }
            Origin::Parsed(model) => {
                let mut model = model.clone();
                for (ix, shape) in shapes.iter().enumerate() {
                    let fact = model.input_fact(ix)?.clone().with_shape(shape.clone());
                    model.set_input_fact(ix, fact)?;
                }
                crate::kernels::into_optimized(model.into_typed()?)?
            }
        };
        let bytes = intermediate_bytes(&typed);
        if bytes > self.limits.max_bytes {
            bail!(
                "its intermediate tensors need about {}, beyond this server's limit of {} (--max-plan-mb); send smaller batches",
                size(bytes),
                size(self.limits.max_bytes)
            );
        }
        Plan::new(typed, &self.options)
    }
}
