//! What inference clients people already use send and call, over real loopback HTTP: the
//! binary tensor data extension, compressed bodies, Triton's configuration / statistics /
//! repository endpoints, Azure ML's `input_data`, JSON bodies on every error, models with
//! symbolic dimensions served at any batch — and Triton's own client, `tritonclient.http`,
//! with its defaults against real PyPI models (`clients/tritonclient_check.py`).

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::{Value, json};

fn f32_bytes(t: &tract_onnx::prelude::Tensor) -> Vec<u8> {
    values(t)
        .iter()
        .flat_map(|&v| (v as f32).to_le_bytes())
        .collect()
}

/// A batch of 4 PP-OCR images is 2.5 MB as JSON: the server's default limits, not the
/// harness's 1 MiB.
fn large_bodies(mut c: outpost_module::ServeConfig) -> outpost_module::ServeConfig {
    c.limits = outpost_module::http::HttpLimits::default();
    c
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)))
}

/// The `error` of a JSON error body (every 4xx/5xx has one).
fn error_of(body: &[u8]) -> String {
    match json_of(body)["error"].as_str() {
        Some(e) => e.to_string(),
        None => panic!("no 'error' in {}", String::from_utf8_lossy(body)),
    }
}

/// POSTs `body` to the MLP's infer route with a `Content-Encoding`.
async fn post_encoded(
    addr: std::net::SocketAddr,
    encoding: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let headers = [("content-encoding", encoding.to_string())];
    let (st, _, b) = http_with(addr, "POST", "/v2/models/mlp/infer", &headers, body).await;
    (st, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensor_data_in_and_out() {
    let s = Running::ready(config(&model_path("mlp"), "mlp")).await;
    let input = read_npy(&testdata().join("reference/mlp/inputs/sensor.npy"));
    let want = values(&read_npy(&testdata().join("reference/mlp/outputs/0.npy")));
    let raw = f32_bytes(&input);
    let header = json!({
        "inputs": [{"name": "sensor", "shape": input.shape(), "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "score", "parameters": {"binary_data": true}}],
    });
    let header = serde_json::to_vec(&header).unwrap();
    let mut body = header.clone();
    body.extend_from_slice(&raw);
    let length = ("inference-header-content-length", header.len().to_string());

    let (st, h, b) = http_with(
        s.addr,
        "POST",
        "/v2/models/mlp/infer",
        std::slice::from_ref(&length),
        body.clone(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let n: usize = h["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let meta = json_of(&b[..n]);
    let out = &meta["outputs"][0];
    assert_eq!(out["shape"], json!([4, 1]));
    assert!(out.get("data").is_none(), "{meta}");
    assert_eq!(out["parameters"]["binary_data_size"], json!(16));
    let got: Vec<f64> = b[n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    assert_close_values("binary out", &got, &want, ATOL, RTOL);

    // Binary in, JSON out (nothing asks for binary outputs): a plain JSON answer.
    let mut plain = json_of(&header);
    plain.as_object_mut().unwrap().remove("outputs");
    let plain = serde_json::to_vec(&plain).unwrap();
    let mut body2 = plain.clone();
    body2.extend_from_slice(&raw);
    let (st, h, b) = http_with(
        s.addr,
        "POST",
        "/v2/models/mlp/infer",
        &[("inference-header-content-length", plain.len().to_string())],
        body2,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(h.get("inference-header-content-length").is_none());
    let v = json_of(&b);
    let data: Vec<f64> = v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_close_values("json out", &data, &want, ATOL, RTOL);

    // Wrong sizes are 400s naming the field; the server keeps serving.
    let cases: Vec<(Vec<u8>, String, &str)> = vec![
        (
            body[..body.len() - 4].to_vec(),
            header.len().to_string(),
            "declares 256 bytes but only 252 remain",
        ),
        (
            [&body[..], &[0u8; 4]].concat(),
            header.len().to_string(),
            "4 bytes after the JSON header belong to no input",
        ),
        (
            body.clone(),
            "999999".into(),
            "Inference-Header-Content-Length: 999999 is longer than the body",
        ),
        (header.clone(), "x".into(), "'x' is not a byte count"),
    ];
    for (body, length, message) in cases {
        let (st, _, b) = http_with(
            s.addr,
            "POST",
            "/v2/models/mlp/infer",
            &[("inference-header-content-length", length)],
            body,
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let e = error_of(&b);
        assert!(e.contains(message), "{e}");
    }
    // A binary size without the header.
    let (st, b) = http(s.addr, "POST", "/v2/models/mlp/infer", Some(header.clone())).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(error_of(&b).contains("needs the Inference-Header-Content-Length"));
    let (st, _, _) = http_with(s.addr, "POST", "/v2/models/mlp/infer", &[length], body).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_read_and_unknown_encodings_refused() {
    let s = Running::ready(config(&model_path("mlp"), "mlp")).await;
    let request = serde_json::to_vec(&reference_request("mlp")).unwrap();
    let want = values(&read_npy(&testdata().join("reference/mlp/outputs/0.npy")));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&request).unwrap();
    let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    zl.write_all(&request).unwrap();
    for (encoding, body) in [
        ("gzip", gz.finish().unwrap()),
        ("deflate", zl.finish().unwrap()),
    ] {
        let (st, b) = post_encoded(s.addr, encoding, body).await;
        assert_eq!(
            st,
            StatusCode::OK,
            "{encoding}: {}",
            String::from_utf8_lossy(&b)
        );
        let data: Vec<f64> = json_of(&b)["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_close_values(encoding, &data, &want, ATOL, RTOL);
    }
    let (st, b) = post_encoded(s.addr, "br", request.clone()).await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(error_of(&b).contains("'br' is not supported"));
    let (st, b) = post_encoded(s.addr, "gzip", request).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(error_of(&b).contains("not valid gzip"));
    // A bomb: 2 MiB of spaces in a few kB, beyond the test server's 1 MiB body limit.
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b' '; 2 << 20]).unwrap();
    let (st, b) = post_encoded(s.addr, "gzip", bomb.finish().unwrap()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(error_of(&b).contains("larger than the limit"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_a_json_body_and_triton_endpoints_answer() {
    let s = Running::ready(config(&model_path("mlp"), "mlp")).await;
    let a = s.addr;
    let cases = [
        (
            "GET",
            "/v2/models/mlp/infer",
            StatusCode::METHOD_NOT_ALLOWED,
            "GET is not allowed on /v2/models/mlp/infer",
        ),
        (
            "POST",
            "/v2/health/ready",
            StatusCode::METHOD_NOT_ALLOWED,
            "POST is not allowed",
        ),
        (
            "GET",
            "/nothing",
            StatusCode::NOT_FOUND,
            "no such route: /nothing",
        ),
        (
            "GET",
            "/v2/systemsharedmemory/status",
            StatusCode::NOT_FOUND,
            "system shared memory extension is not supported",
        ),
        (
            "POST",
            "/v2/repository/models/mlp/load",
            StatusCode::BAD_REQUEST,
            "cannot load 'mlp' over HTTP",
        ),
        (
            "POST",
            "/v2/repository/models/mlp/unload",
            StatusCode::BAD_REQUEST,
            "cannot unload 'mlp'",
        ),
        (
            "GET",
            "/v2/models/other/config",
            StatusCode::NOT_FOUND,
            "unknown model 'other'",
        ),
    ];
    for (method, path, status, message) in cases {
        let (st, b) = http(a, method, path, None).await;
        assert_eq!(st, status, "{method} {path}");
        let e = error_of(&b);
        assert!(e.contains(message), "{method} {path}: {e}");
    }
    // Classification would change what the answer means: refused, not ignored.
    let mut classify = reference_request("mlp");
    classify["outputs"] = json!([{"name": "score", "parameters": {"classification": 1}}]);
    let (st, v) = post_json(a, "/v2/models/mlp/infer", &classify).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let e = v["error"].as_str().unwrap();
    assert!(
        e.starts_with("outputs[0].parameters.classification: the classification extension"),
        "{e}"
    );
    let (_, v) = get_json(a, "/v2").await;
    assert_eq!(
        v["extensions"],
        json!(["binary_tensor_data", "model_configuration", "statistics"])
    );

    let (st, v) = get_json(a, "/v2/models/mlp/config").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["input"],
        json!([{"name": "sensor", "data_type": "TYPE_FP32", "dims": [-1, 16]}])
    );
    assert_eq!(v["output"][0]["dims"], json!([-1, 1]));
    assert_eq!(
        get_json(a, "/v2/models/mlp/versions/1/config").await.0,
        StatusCode::OK
    );

    // Statistics count what ran, succeeded or not.
    let before = get_json(a, "/v2/models/mlp/stats").await.1;
    let ok = |v: &Value, k: &str| {
        v["model_stats"][0]["inference_stats"][k]["count"]
            .as_u64()
            .unwrap()
    };
    post_json(a, "/v2/models/mlp/infer", &reference_request("mlp")).await;
    post_json(a, "/v2/models/mlp/infer", &json!({"inputs": []})).await;
    let after = get_json(a, "/v2/models/stats").await.1;
    assert_eq!(ok(&after, "success"), ok(&before, "success") + 1, "{after}");
    assert_eq!(ok(&after, "fail"), ok(&before, "fail") + 1, "{after}");
    assert!(after["model_stats"][0]["last_inference"].as_u64().unwrap() > 0);

    let (st, b) = http(a, "POST", "/v2/repository/index", Some(b"{}".to_vec())).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        json_of(&b),
        json!([{"name": "mlp", "version": "1", "state": "READY"}])
    );

    // Azure ML's input_data forms on /score answer the bare result.
    let x = read_npy(&testdata().join("reference/mlp/inputs/sensor.npy"));
    let rows: Vec<Vec<f64>> = values(&x).chunks(16).map(<[f64]>::to_vec).collect();
    let want = values(&read_npy(&testdata().join("reference/mlp/outputs/0.npy")));
    for body in [
        json!({"input_data": rows}),
        json!({"input_data": {"columns": (0..16).collect::<Vec<_>>(), "index": [0, 1, 2, 3], "data": rows}}),
        json!({"input_data": {"sensor": rows}}),
    ] {
        let (st, v) = post_json(a, "/score", &body).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let got: Vec<f64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[0].as_f64().unwrap())
            .collect();
        assert_close_values("input_data", &got, &want, ATOL, RTOL);
    }
    let (st, v) = post_json(a, "/score", &json!({"input_data": {"other": rows}})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown input 'other'"),
        "{v}"
    );
    s.stop().await;
}

/// magika (`[unk, 2048]`) and the PP-OCR classifier (`[-1, 3, ?, ?]`) load with no flags
/// and answer batches of 1 and 4 like onnxruntime; a new shape gets its own plan, a shape
/// the model cannot take is a 400 that names it, and inputs must keep fixed dims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbolic_dimensions_serve_any_batch() {
    for (model, input) in [("magika", "bytes"), ("ppocr_cls", "x")] {
        let Some(path) = pypi_model(model) else {
            return;
        };
        let s = Running::ready(large_bodies(config(&path, model))).await;
        let (_, meta) = get_json(s.addr, &format!("/v2/models/{model}")).await;
        assert_eq!(meta["inputs"][0]["shape"][0], json!(-1), "{meta}");
        for case in [model.to_string(), format!("{model}_b4")] {
            let dir = testdata().join("pypi/reference").join(&case);
            let x = read_npy(&dir.join(format!("inputs/{input}.npy")));
            let want = read_npy(&dir.join("outputs/0.npy"));
            let dt = outpost_module::tensor::DataType::from_datum(x.datum_type()).unwrap();
            let data: Vec<Value> = values(&x).into_iter().map(|v| json!(v)).collect();
            let req = json!({"inputs": [{"name": input, "shape": x.shape(), "datatype": dt.oip_name(), "data": data}]});
            let (st, v) = post_json(s.addr, &format!("/v2/models/{model}/infer"), &req).await;
            assert_eq!(st, StatusCode::OK, "{case}: {v}");
            assert_eq!(
                v["outputs"][0]["shape"].as_array().unwrap()[0],
                json!(x.shape()[0])
            );
            let got: Vec<f64> = v["outputs"][0]["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_close_values(&case, &got, &values(&want), ATOL, RTOL);
        }
        // A fixed dimension changed: refused before anything runs, naming the model's shape.
        let mut bad_shape = vec![1usize; if model == "magika" { 2 } else { 4 }];
        bad_shape[1] = 7;
        let n: usize = bad_shape.iter().product();
        let dt = if model == "magika" { "INT32" } else { "FP32" };
        let req = json!({"inputs": [{"name": input, "shape": bad_shape, "datatype": dt, "data": vec![0; n]}]});
        let (st, v) = post_json(s.addr, &format!("/v2/models/{model}/infer"), &req).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let e = v["error"].as_str().unwrap();
        assert!(e.contains("the model expects"), "{e}");
        s.stop().await;
    }
}

/// A symbolic batch the body limit allows but the plan limit does not is a 400 that says
/// why, decided before anything runs; smaller batches keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_large_for_memory_is_refused_before_it_runs() {
    let mut c = config(&model_path("mlp"), "mlp");
    c.load.plan_limits.max_bytes = 64 << 10;
    let s = Running::ready(c).await;
    let request = |batch: usize| {
        json!({"inputs": [{"name": "sensor", "shape": [batch, 16], "datatype": "FP32",
                           "data": vec![0.5; batch * 16]}]})
    };
    let (st, v) = post_json(s.addr, "/v2/models/mlp/infer", &request(2000)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("[[2000, 16]]") && e.contains("beyond this server's limit of 64 KiB"),
        "{e}"
    );
    // Refused again from the cache, and a batch that fits still runs.
    let (st, _) = post_json(s.addr, "/v2/models/mlp/infer", &request(2000)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, v) = post_json(s.addr, "/v2/models/mlp/infer", &request(4)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"][0]["shape"], json!([4, 1]));
    s.stop().await;
}

/// Triton's HTTP client with its defaults (binary inputs and outputs), JSON and gzip, at
/// batch 1 and 4, against onnxruntime in the same script. Needs `tritonclient[http]`
/// (scripts/setup installs it); with CI=true its absence fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_with_its_defaults() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import tritonclient.http, onnxruntime"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            !in_ci(),
            "python3 with tritonclient[http] and onnxruntime missing with CI=true: run scripts/setup"
        );
        eprintln!("SKIPPED: python3 -m pip install 'tritonclient[http]' onnxruntime");
        return;
    }
    let script = testdata().join("../tests/clients/tritonclient_check.py");
    for model in ["magika", "ppocr_cls"] {
        let Some(path) = pypi_model(model) else {
            return;
        };
        let s = Running::ready(large_bodies(config(&path, model))).await;
        let url = s.addr.to_string();
        let (script, path) = (script.clone(), path.clone());
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("python3")
                    .arg(&script)
                    .args([url.as_str(), model, path.to_str().unwrap(), "1", "4"])
                    .output()
                    .expect("python3 runs")
            }),
        )
        .await
        .expect("tritonclient check within 120 s")
        .unwrap();
        assert!(
            out.status.success(),
            "{model}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let report = json_of(&out.stdout);
        assert_eq!(report["checks"].as_array().unwrap().len(), 2, "{report}");
        eprintln!("{report}");
        s.stop().await;
    }
}
