//! `outpost-infer`: parses the command line, sets up logging, runs the library, maps the
//! result to an exit code. Exit codes: 0 done; 1 failed; 2 bad command line or configuration
//! (do not restart: it will fail the same way); 3 batch finished but some inputs failed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use outpost_module::bus::BusConfig;
use outpost_module::http::HttpLimits;
use outpost_module::metrics::Metrics;
use outpost_module::model::{Dim, LoadOptions, load};
use outpost_module::plans::{PlanLimits, PlanMode};
use outpost_module::{ServeConfig, batch};
use tokio_util::sync::CancellationToken;
use tract_onnx::prelude::*;

#[derive(Parser, Debug)]
#[command(
    name = "outpost-infer",
    version,
    about = "On-device ONNX inference with tract"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        value_enum,
        default_value = "human",
        global = true,
        env = "OUTPOST_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the model over HTTP (OIP v2, /score, /metrics) and, with --bus, the local bus.
    Serve(ServeArgs),
    /// Run every .npy / .json file of a folder through the model.
    Batch(BatchArgs),
    /// Print the model's inputs, outputs and load time.
    Info(ModelArgs),
    /// Measure in-process latency on random (or given) inputs; prints one JSON line.
    Bench(BenchArgs),
    /// Run the model once on `.npy` inputs and write every output as `<DIR>/<i>.npy`.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An input, `NAME=FILE.npy` (repeatable; every model input must be given).
    #[arg(long = "input", value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Folder for the outputs (created if missing).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// The ONNX model file.
    #[arg(long, env = "OUTPOST_MODEL")]
    model: PathBuf,
    /// Shape of an input, `NAME=D,D,...` (repeatable): a number fixes a dimension, a name
    /// makes it symbolic (`bytes=N,2048`: any batch). Symbolic dimensions the model declares
    /// need no flag; fixing one trades generality for a plan made once, at load.
    /// In the environment: `;`-separated.
    #[arg(
        long = "input-shape",
        value_name = "NAME=DIMS",
        env = "OUTPOST_INPUT_SHAPES",
        value_delimiter = ';'
    )]
    input_shapes: Vec<String>,
    /// Threads for matrix products inside one inference (tract's multithread-mm): a number,
    /// or `auto` (2 for model files of 2 MiB and more when there are 2 CPUs, else 1).
    #[arg(long, default_value = "auto", env = "OUTPOST_THREADS", value_parser = parse_threads)]
    threads: Threads,
    /// How a model with symbolic input dimensions is planned: a plan per input shape made on
    /// first use (faster), or one symbolic plan for all.
    #[arg(long, value_enum, default_value = "per-shape", env = "OUTPOST_PLANS")]
    plans: PlanMode,
    /// Plans kept for different input shapes; the least recently used is dropped beyond it.
    #[arg(long, default_value_t = 8, env = "OUTPOST_PLAN_CACHE")]
    plan_cache: usize,
    /// Largest memory, in MiB, the intermediate tensors of one input shape's plan may need;
    /// larger shapes (big batches of a symbolic dimension) are refused with a 400.
    #[arg(long, default_value_t = 512, env = "OUTPOST_MAX_PLAN_MB")]
    max_plan_mb: u64,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Name the model is served under; defaults to the file's stem.
    #[arg(long, env = "OUTPOST_MODEL_NAME")]
    name: Option<String>,
    /// HTTP listen address.
    #[arg(long, default_value = "0.0.0.0:8000", env = "OUTPOST_LISTEN")]
    listen: SocketAddr,
    /// Local bus (MQTT) URL, e.g. mqtt://172.17.0.1:1883; enables bus mode.
    #[arg(long, env = "OUTPOST_BUS_URL")]
    bus: Option<String>,
    /// The agent sets it (with the password) for each module on its embedded bus.
    #[arg(long, env = "OUTPOST_BUS_USER")]
    bus_username: Option<String>,
    /// The module's name on the bus (its topics are `modules/{name}/...`); the agent sets it.
    /// Without it, the model's name is used.
    #[arg(long, env = "OUTPOST_MODULE_NAME")]
    module_name: Option<String>,
    #[arg(long, env = "OUTPOST_BUS_PASSWORD", hide_env_values = true)]
    bus_password: Option<String>,
    /// Inferences running at once (default: the number of CPUs).
    #[arg(long, env = "OUTPOST_WORKERS")]
    workers: Option<usize>,
    /// Largest request body or bus payload, in bytes.
    #[arg(long, default_value_t = 16 << 20, env = "OUTPOST_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// HTTP inference requests in flight before new ones get 503.
    #[arg(long, default_value_t = 256, env = "OUTPOST_MAX_IN_FLIGHT")]
    max_in_flight: usize,
    /// Request body bytes held by all HTTP requests in flight before new ones get 503
    /// (at least --max-body-bytes).
    #[arg(long, default_value_t = 64 << 20, env = "OUTPOST_MAX_BYTES_IN_FLIGHT")]
    max_bytes_in_flight: usize,
    /// Seconds a connection has to send a request's headers (also the idle keep-alive limit).
    #[arg(long, default_value_t = 10, env = "OUTPOST_HEADER_TIMEOUT_SECS")]
    header_timeout_secs: u64,
    /// Seconds a request has to send its body once its headers are in; then 408.
    #[arg(long, default_value_t = 30, env = "OUTPOST_BODY_TIMEOUT_SECS")]
    body_timeout_secs: u64,
    /// How often to check the model file for replacement, in milliseconds; 0 turns it off.
    #[arg(long, default_value_t = 2000, env = "OUTPOST_RELOAD_INTERVAL_MS")]
    reload_interval_ms: u64,
    /// How long shutdown may take before the process exits anyway, in seconds.
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
}

#[derive(Args, Debug)]
struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder of inputs (.npy for single-input models, .json OIP or {"data": ...}).
    #[arg(long)]
    input: PathBuf,
    /// Folder for the outputs and batch-report.json (created if missing).
    #[arg(long)]
    output: PathBuf,
    /// Print only the summary.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Timed runs.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// `.npy` input for a single-input model (random, seeded, otherwise).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Shape of a random input, `NAME=D,D,...`, for symbolic dimensions (default: 1).
    #[arg(long = "run-shape", value_name = "NAME=DIMS")]
    run_shapes: Vec<String>,
    /// Also print the time per operator on stderr.
    #[arg(long)]
    profile: bool,
}

/// A configuration error: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

fn parse_shapes(specs: &[String]) -> Result<HashMap<String, Vec<Dim>>, ConfigError> {
    let mut shapes = HashMap::new();
    for spec in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let bad = || {
            ConfigError(format!(
                "--input-shape / OUTPOST_INPUT_SHAPES: '{spec}' is not NAME=D,D,... with positive integers or names (N,2048)"
            ))
        };
        let (name, dims) = spec.rsplit_once('=').ok_or_else(bad)?;
        let numeric = |d: &str| d.trim().chars().all(|c| c.is_ascii_digit());
        // `2x3` is two numbers; `max_x,3` is a name and a number.
        let parts: Vec<&str> = if !dims.contains(',') && dims.split('x').all(numeric) {
            dims.split('x').collect()
        } else {
            dims.split(',').collect()
        };
        let dims = parts
            .into_iter()
            .map(|d| {
                let d = d.trim();
                if numeric(d) {
                    d.parse::<usize>().ok().filter(|&d| d > 0).map(Dim::Fixed)
                } else {
                    let symbol = !d.is_empty()
                        && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !d.starts_with(|c: char| c.is_ascii_digit());
                    symbol.then(|| Dim::Symbolic(d.to_string()))
                }
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        shapes.insert(name.trim().to_string(), dims);
    }
    Ok(shapes)
}

/// `--threads`: a count, or `None` for auto.
#[derive(Debug, Clone, Copy)]
struct Threads(Option<usize>);

fn parse_threads(s: &str) -> Result<Threads, String> {
    match s.trim() {
        "auto" => Ok(Threads(None)),
        n => match n.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Threads(Some(n))),
            _ => Err(format!(
                "'{s}' is not 'auto' or a number of threads (at least 1)"
            )),
        },
    }
}

fn load_options(m: &ModelArgs) -> Result<LoadOptions, ConfigError> {
    if m.plan_cache == 0 {
        return Err(ConfigError(
            "--plan-cache / OUTPOST_PLAN_CACHE must be at least 1".into(),
        ));
    }
    Ok(LoadOptions {
        shapes: parse_shapes(&m.input_shapes)?,
        threads: m.threads.0,
        plan_mode: m.plans,
        plan_limits: PlanLimits {
            cache: m.plan_cache,
            max_bytes: m.max_plan_mb.saturating_mul(1 << 20),
        },
    })
}

fn model_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn serve_config(a: &ServeArgs) -> Result<ServeConfig, ConfigError> {
    let name = a.name.clone().unwrap_or_else(|| model_name(&a.model.model));
    if name.is_empty() || name.contains(['/', '+', '#']) {
        return Err(ConfigError(format!(
            "--name / OUTPOST_MODEL_NAME: '{name}' must be non-empty without '/', '+' or '#'"
        )));
    }
    if a.max_body_bytes > u32::MAX as usize {
        return Err(ConfigError(format!(
            "--max-body-bytes / OUTPOST_MAX_BODY_BYTES: {} is above the 4 GiB this server can budget",
            a.max_body_bytes
        )));
    }
    if a.max_bytes_in_flight < a.max_body_bytes {
        return Err(ConfigError(format!(
            "--max-bytes-in-flight / OUTPOST_MAX_BYTES_IN_FLIGHT: {} is below --max-body-bytes ({}); the largest bodies could never be accepted",
            a.max_bytes_in_flight, a.max_body_bytes
        )));
    }
    for (flag, secs) in [
        (
            "--header-timeout-secs / OUTPOST_HEADER_TIMEOUT_SECS",
            a.header_timeout_secs,
        ),
        (
            "--body-timeout-secs / OUTPOST_BODY_TIMEOUT_SECS",
            a.body_timeout_secs,
        ),
    ] {
        if secs == 0 {
            return Err(ConfigError(format!("{flag} must be at least 1")));
        }
    }
    let workers = a
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bus = match &a.bus {
        None => None,
        Some(url) => {
            let module = a.module_name.as_deref().unwrap_or(&name);
            let mut b = BusConfig::from_url(url, module)
                .map_err(|e| ConfigError(format!("--bus / OUTPOST_BUS_URL: {e}")))?;
            if a.bus_username.is_some() {
                b.username = a.bus_username.clone();
                b.password = a.bus_password.clone();
            }
            b.workers = workers;
            b.max_payload = a.max_body_bytes;
            Some(b)
        }
    };
    Ok(ServeConfig {
        model: a.model.model.clone(),
        name,
        listen: a.listen,
        load: load_options(&a.model)?,
        reload_interval: (a.reload_interval_ms > 0)
            .then(|| Duration::from_millis(a.reload_interval_ms)),
        limits: HttpLimits {
            max_body_bytes: a.max_body_bytes,
            max_in_flight: a.max_in_flight,
            max_bytes_in_flight: a.max_bytes_in_flight,
            header_timeout: Duration::from_secs(a.header_timeout_secs),
            body_timeout: Duration::from_secs(a.body_timeout_secs),
        },
        workers,
        bus,
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only at a terminal: a container's log (a pipe to the engine) gets plain text.
    use std::io::IsTerminal as _;
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `token` on SIGTERM or SIGINT; a second signal exits at once.
async fn signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutdown requested; a second signal stops at once");
    token.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(1);
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = serve_config(&args)?;
    let grace = Duration::from_secs(args.grace_secs);
    let token = CancellationToken::new();
    let server = outpost_module::Server::bind(config).await?;
    tokio::spawn(signals(token.clone()));
    let run = tokio::spawn(server.run(token.clone()));
    token.cancelled().await;
    let started = Instant::now();
    match tokio::time::timeout(grace, run).await {
        Ok(joined) => {
            joined.context("server task")??;
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "stopped cleanly within the grace period"
            );
            Ok(())
        }
        Err(_) => bail!("shutdown did not finish within {} s", grace.as_secs()),
    }
}

fn batch(args: BatchArgs) -> anyhow::Result<ExitCode> {
    let options = load_options(&args.model)?;
    let model = load(&args.model.model, &options, 1)?;
    eprintln!(
        "loaded {} in {:.0} ms",
        args.model.model.display(),
        model.load_time.as_secs_f64() * 1e3
    );
    let name = model_name(&args.model.model);
    let quiet = args.quiet;
    let report = batch::run(
        &model,
        &name,
        &args.input,
        &args.output,
        &Metrics::default(),
        |p| {
            if quiet {
                return;
            }
            match p.result {
                Ok(out) => eprintln!(
                    "[{}/{}] {} -> {} ({:.2} ms)",
                    p.index + 1,
                    p.total,
                    p.file,
                    out.display(),
                    p.elapsed.as_secs_f64() * 1e3
                ),
                Err(e) => eprintln!("[{}/{}] {} FAILED: {e}", p.index + 1, p.total, p.file),
            }
        },
    )?;
    println!(
        "{} of {} inputs done in {:.3} s ({:.1} per second); {} failed; {} skipped",
        report.succeeded,
        report.total,
        report.seconds,
        report.per_second,
        report.failed.len(),
        report.skipped.len()
    );
    for f in &report.failed {
        println!("failed: {}: {}", f.file, f.error);
    }
    for s in &report.skipped {
        println!("skipped (not .npy or .json): {s}");
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn info(args: ModelArgs) -> anyhow::Result<()> {
    let model = load(&args.model, &load_options(&args)?, 1)?;
    let doc = serde_json::json!({
        "model": args.model,
        "load_ms": model.load_time.as_secs_f64() * 1e3,
        "inputs": model.metadata_inputs(),
        "outputs": model.metadata_outputs(),
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// Seeded xorshift: inputs that are the same on every run without a rand dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use outpost_module::tensor::{DataType, Origin, Scalar, checked_len, tensor_from_scalars};
    let model = load(&args.model.model, &load_options(&args.model)?, 1)?;
    let run_shapes = parse_shapes(&args.run_shapes)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let inputs: TVec<TValue> = match &args.input {
        Some(p) => tvec![
            model
                .check_single(outpost_module::npy::read(&std::fs::read(p)?)?)?
                .into_tvalue()
        ],
        None => model
            .inputs
            .iter()
            .map(|spec| {
                let shape: Vec<usize> = match run_shapes.get(&spec.name) {
                    Some(dims) => dims.iter().map(|d| d.fixed().unwrap_or(1)).collect(),
                    None => spec.shape.iter().map(|d| d.fixed().unwrap_or(1)).collect(),
                };
                let n = checked_len(&shape, spec.datatype.size()).ok_or_else(|| {
                    anyhow::anyhow!("input '{}': shape {shape:?} is too large", spec.name)
                })?;
                let values: Vec<Scalar> = (0..n)
                    .map(|_| match spec.datatype {
                        DataType::Bool => Scalar::Bool(rng.next() & 1 == 1),
                        DataType::Fp16 | DataType::Fp32 | DataType::Fp64 => {
                            Scalar::Float(rng.unit() * 2.0 - 1.0)
                        }
                        _ => Scalar::Int((rng.next() % 100) as i64),
                    })
                    .collect();
                Ok(
                    tensor_from_scalars(Origin::File, &spec.name, spec.datatype, &shape, &values)?
                        .into_tvalue(),
                )
            })
            .collect::<anyhow::Result<_>>()?,
    };
    for _ in 0..args.warmup {
        model.run(inputs.clone())?;
    }
    if args.profile {
        for (op, took, share) in model.profile(&inputs, args.iterations)? {
            eprintln!(
                "{:>6.1}% {:>10.3} ms  {op}",
                share * 100.0,
                took.as_secs_f64() * 1e3 / args.iterations.max(1) as f64
            );
        }
    }
    let mut times = Vec::with_capacity(args.iterations);
    for _ in 0..args.iterations.max(1) {
        let t = Instant::now();
        model.run(inputs.clone())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "model": args.model.model, "threads": model.threads,
            "load_ms": model.load_time.as_secs_f64() * 1e3,
            "iterations": times.len(), "median_ms": pct(0.5), "p90_ms": pct(0.9), "min_ms": times[0],
        })
    );
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let model = load(&args.model.model, &load_options(&args.model)?, 1)?;
    let mut given = HashMap::new();
    for spec in &args.inputs {
        let (name, file) = spec
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("--input '{spec}' is not NAME=FILE.npy")))?;
        let path = Path::new(file);
        let t = outpost_module::npy::read(&std::fs::read(path).with_context(|| file.to_string())?)
            .with_context(|| file.to_string())?;
        given.insert(name.to_string(), t);
    }
    let mut inputs = TVec::new();
    for spec in &model.inputs {
        let t = given.remove(&spec.name).ok_or_else(|| {
            ConfigError(format!("no --input for the model's input '{}'", spec.name))
        })?;
        inputs.push(t.into_tvalue());
    }
    if let Some(name) = given.keys().next() {
        return Err(ConfigError(format!("the model has no input '{name}'")).into());
    }
    let outputs = model.run(inputs)?;
    let dir = batch::OutputDir::create(&args.output)
        .with_context(|| args.output.display().to_string())?;
    for (i, t) in outputs.iter().enumerate() {
        dir.write(&format!("{i}.npy"), &outpost_module::npy::write(t)?)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(serve(args)))
            .map(|_| ExitCode::SUCCESS),
        Command::Batch(args) => batch(args),
        Command::Info(args) => info(args).map(|_| ExitCode::SUCCESS),
        Command::Bench(args) => bench(args).map(|_| ExitCode::SUCCESS),
        Command::Run(args) => run(args).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // The whole chain once, in the log format chosen.
            tracing::error!(error = format!("{e:#}"), "outpost-infer failed");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_shapes_parse() {
        let s = parse_shapes(&[
            "x=1,3,48,192".into(),
            " y = 2x3 ".into(),
            "".into(),
            "bytes=N,2048".into(),
            "z=max_x".into(),
        ])
        .unwrap();
        let f = Dim::Fixed;
        assert_eq!(s["x"], vec![f(1), f(3), f(48), f(192)]);
        assert_eq!(s["y"], vec![f(2), f(3)]);
        assert_eq!(s["bytes"], vec![Dim::Symbolic("N".into()), f(2048)]);
        assert_eq!(s["z"], vec![Dim::Symbolic("max_x".into())]);
        assert!(matches!(parse_threads("auto"), Ok(Threads(None))));
        assert!(matches!(parse_threads("2"), Ok(Threads(Some(2)))));
        assert!(parse_threads("0").is_err() && parse_threads("two").is_err());
        for bad in ["x=1,0", "x", "x=1,,2", "x=2y", "x=N-1", "x=-1"] {
            assert!(parse_shapes(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
