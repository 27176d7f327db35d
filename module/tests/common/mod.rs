//! Shared test harness: test data paths, reference comparison, a small HTTP client, a server
//! on port 0, and a Mosquitto broker on a free loopback port.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use outpost_module::http::HttpLimits;
use outpost_module::model::LoadOptions;
use outpost_module::tensor::{OutputData, output_data};
use outpost_module::{ServeConfig, Server};
use tokio_util::sync::CancellationToken;
use tract_onnx::prelude::Tensor;

pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

pub fn model_path(name: &str) -> PathBuf {
    testdata().join("models").join(format!("{name}.onnx"))
}

/// True when running in CI, where missing parts are failures, not skips.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub fn read_npy(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    outpost_module::npy::read(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Flattened values as f64 (bools as 0/1) for comparison.
pub fn values(t: &Tensor) -> Vec<f64> {
    match output_data("t", t).unwrap().1 {
        OutputData::Bool(v) => v.into_iter().map(|b| b as u8 as f64).collect(),
        OutputData::Int(v) => v.into_iter().map(|x| x as f64).collect(),
        OutputData::UInt(v) => v.into_iter().map(|x| x as f64).collect(),
        OutputData::F32(v) => v.into_iter().map(|x| x as f64).collect(),
        OutputData::F64(v) => v,
    }
}

/// The tolerance the module promises against onnxruntime: |got - want| <= ATOL + RTOL·|want|.
pub const ATOL: f64 = 1e-5;
pub const RTOL: f64 = 1e-4;

/// Asserts two tensors agree: same type and shape, values within tolerance (exact for
/// integers and booleans; FP16 has its own, coarser, tolerance).
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.datum_type(), want.datum_type(), "{what}: datatype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (atol, rtol) = match got.datum_type() {
        tract_onnx::prelude::DatumType::F16 => (1e-3, 1e-3),
        dt if dt.is_float() => (ATOL, RTOL),
        _ => (0.0, 0.0),
    };
    assert_close_values(what, &values(got), &values(want), atol, rtol);
}

pub fn assert_close_values(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= atol + rtol * w.abs(),
            "{what}: element {i}: got {g}, want {w} (diff {d})"
        );
        worst = worst.max(d);
    }
    eprintln!("{what}: {} values, max abs diff {worst:e}", got.len());
}

/// Waits for `cond` to hold, polling every 10 ms, failing after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One HTTP/1.1 request on a fresh connection; answers status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Vec<u8>) {
    let (status, _, body) = http_with(addr, method, path, &[], body.unwrap_or_default()).await;
    (status, body)
}

/// One HTTP/1.1 request with extra headers; answers status, headers and body.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (StatusCode, hyper::HeaderMap, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let req = req.body(Full::new(bytes::Bytes::from(body))).unwrap();
    let resp = sender.send_request(req).await.expect("send");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

/// A PyPI model fetched by scripts/fetch-pypi-models.sh, or `None` (a skip) when it is not
/// there — a failure with CI=true, where the CI script has fetched it.
pub fn pypi_model(name: &str) -> Option<PathBuf> {
    let path = testdata().join("pypi").join(format!("{name}.onnx"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        !in_ci(),
        "{} missing with CI=true: run scripts/fetch-pypi-models.sh",
        path.display()
    );
    eprintln!(
        "SKIPPED: {} missing; run scripts/fetch-pypi-models.sh",
        path.display()
    );
    None
}

pub async fn get_json(addr: SocketAddr, path: &str) -> (StatusCode, serde_json::Value) {
    let (s, b) = http(addr, "GET", path, None).await;
    (
        s,
        serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
    )
}

pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    let (s, b) = http(addr, "POST", path, Some(serde_json::to_vec(body).unwrap())).await;
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&b).into()));
    (s, v)
}

pub fn config(model: &Path, name: &str) -> ServeConfig {
    ServeConfig {
        model: model.to_path_buf(),
        name: name.to_string(),
        listen: "127.0.0.1:0".parse().unwrap(),
        load: LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
        reload_interval: None,
        limits: HttpLimits {
            max_body_bytes: 1 << 20,
            max_in_flight: 64,
            ..HttpLimits::default()
        },
        workers: 2,
        bus: None,
    }
}

/// A server running in the background; stopped (and awaited) by [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    pub token: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), outpost_module::ServeError>>,
}

impl Running {
    pub async fn start(config: ServeConfig) -> Running {
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr().unwrap();
        let token = CancellationToken::new();
        let task = tokio::spawn(server.run(token.clone()));
        Running { addr, token, task }
    }

    /// Starts and waits until the model is ready.
    pub async fn ready(config: ServeConfig) -> Running {
        let r = Running::start(config).await;
        let addr = r.addr;
        wait_for("model ready", Duration::from_secs(30), || async move {
            get_json(addr, "/v2/health/ready").await.0 == StatusCode::OK
        })
        .await;
        r
    }

    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops within 10 s")
            .expect("server task")
            .expect("server result");
    }
}

/// The OIP request of a reference input folder (every `.npy` of `reference/<model>/inputs`).
pub fn reference_request(model: &str) -> serde_json::Value {
    reference_request_from(&testdata().join("reference").join(model).join("inputs"))
}

/// An OIP v2 request holding every `.npy` of `dir`, named by file stem.
pub fn reference_request_from(dir: &Path) -> serde_json::Value {
    let mut inputs = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let t = read_npy(&p);
        let dt = outpost_module::tensor::DataType::from_datum(t.datum_type()).unwrap();
        let data: serde_json::Value = match output_data("x", &t).unwrap().1 {
            OutputData::Bool(v) => v.into(),
            OutputData::Int(v) => v.into(),
            OutputData::UInt(v) => v.into(),
            OutputData::F32(v) => v.into(),
            OutputData::F64(v) => v.into(),
        };
        inputs.push(serde_json::json!({
            "name": p.file_stem().unwrap().to_string_lossy(),
            "shape": t.shape(),
            "datatype": dt.oip_name(),
            "data": data,
        }));
    }
    serde_json::json!({ "id": "ref", "inputs": inputs })
}

/// A Mosquitto broker on a free loopback port, killed when dropped.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto; `None` (the test skips) when it is not installed, except with
    /// `CI=true`, where a missing broker fails the test.
    pub async fn start() -> Option<Mosquitto> {
        // Debian puts it in /usr/sbin, which is not on every user's PATH.
        let bin = ["mosquitto", "/usr/sbin/mosquitto"].into_iter().find(|b| {
            Command::new(b)
                .arg("-h")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        });
        let Some(bin) = bin else {
            assert!(
                !in_ci(),
                "mosquitto is not installed (apt-get install -y mosquitto) and CI=true"
            );
            eprintln!("SKIPPED: mosquitto is not installed (apt-get install -y mosquitto)");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        // Started as root, Mosquitto drops to its own user: it must be able to read the file.
        let _ = std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        );
        let _ =
            std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto");
        let m = Mosquitto {
            port,
            child,
            _dir: dir,
        };
        wait_for(
            "mosquitto listening",
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        Some(m)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
