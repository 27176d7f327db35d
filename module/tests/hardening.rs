//! The hardening of issue 11 over real loopback HTTP against the committed test models:
//! shapes whose product overflows and values outside their datatype are 400s naming the
//! field; bodies in flight are bounded in bytes (503 with Retry-After beyond the budget);
//! connections that do not finish their headers or body in time are closed.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_shapes_are_400_naming_the_field() {
    let s = Running::ready(config(&model_path("mlp"), "mlp")).await;
    let big = 1u64 << 62;
    // [2^62, 2^62]: refused before the model's shape is compared or anything multiplies it.
    // [2^62, 16]: the model accepts [?, 16], so only the checked product stops it.
    // [0, 2^62, 2^62]-like: empty, but its strides overflow; here [2^62, 0] is the mlp's rank.
    for shape in [json!([big, big]), json!([big, 16]), json!([1u64 << 59, 16])] {
        let body = json!({"inputs": [{"name": "sensor", "shape": shape, "datatype": "FP32",
                                      "data": [1.0]}]});
        let (st, v) = post_json(s.addr, "/v2/models/mlp/infer", &body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{shape}: {v}");
        let msg = error_of(&v);
        assert!(
            msg.starts_with("inputs[0].shape: input 'sensor': shape")
                && msg.contains("more elements than this server can hold"),
            "{shape}: {msg}"
        );
    }
    // The server is unharmed.
    let (st, v) = post_json(s.addr, "/v2/models/mlp/infer", &reference_request("mlp")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_outside_the_datatype_are_400_naming_the_element() {
    let s = Running::ready(config(&model_path("dtypes"), "dtypes")).await;
    let good = reference_request("dtypes");
    let index_of = |name: &str| {
        good["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .position(|i| i["name"] == name)
            .unwrap()
    };
    let cases: [(&str, Value, &str); 5] = [
        ("in_fp32", json!(1e39), "outside the range of FP32"),
        ("in_fp32", json!(-1e39), "outside the range of FP32"),
        ("in_fp16", json!(65536.0), "outside the range of FP16"),
        ("in_uint8", json!(300), "outside the range of UINT8"),
        ("in_int32", json!(1u64 << 40), "outside the range of INT32"),
    ];
    for (input, value, needle) in cases {
        let ix = index_of(input);
        let mut r = good.clone();
        r["inputs"][ix]["data"][1] = value.clone();
        let (st, v) = post_json(s.addr, "/v2/models/dtypes/infer", &r).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{input} {value}: {v}");
        let msg = error_of(&v);
        let field = format!("inputs[{ix}].data[1]: input '{input}': element 1 ");
        assert!(
            msg.starts_with(&field) && msg.contains(needle),
            "{input} {value}: '{msg}' should start with '{field}' and say '{needle}'"
        );
    }
    // Non-finite numbers are not JSON: invalid JSON, 400, never a silent null or inf.
    let text = serde_json::to_string(&good).unwrap();
    let ix = index_of("in_fp32");
    let first = good["inputs"][ix]["data"][0].to_string();
    for bad in ["NaN", "Infinity", "1e400"] {
        let mut r = good.clone();
        r["inputs"][ix]["data"][0] = json!("PLACEHOLDER");
        let body = serde_json::to_string(&r)
            .unwrap()
            .replace("\"PLACEHOLDER\"", bad);
        assert_ne!(body, text, "{first}");
        let (st, b) = http(s.addr, "POST", "/v2/models/dtypes/infer", Some(body.into())).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            String::from_utf8_lossy(&b).contains("invalid JSON request"),
            "{bad}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_values_outside_the_datatype_are_400() {
    let s = Running::ready(config(&model_path("mlp"), "mlp")).await;
    let mut row = vec![json!(0.5); 16];
    row[3] = json!(1e39);
    let (st, v) = post_json(s.addr, "/score", &json!({ "data": [row] })).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        error_of(&v)
            .starts_with("data[3]: input 'sensor': element 3 (1e39) is outside the range of FP32"),
        "{v}"
    );
    s.stop().await;
}

/// A raw HTTP/1.1 client: what a slow or hostile client does, byte by byte.
async fn connect(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(addr).await.expect("connect")
}

/// Reads until the server closes the connection (EOF or reset), failing after `timeout`.
/// Returns what arrived.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, timeout: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| panic!("the server kept the connection open for {timeout:?}"));
    got
}

/// Reads one response head (status line and headers), failing after 10 s.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) => got.push(byte[0]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response head within 10 s");
    String::from_utf8_lossy(&got).into_owned()
}

fn infer_head(len: Option<usize>) -> String {
    let framing = match len {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    format!(
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_bytes_in_flight_are_bounded_and_the_rest_get_503() {
    const MIB: usize = 1 << 20;
    let mut c = config(&model_path("mlp"), "mlp");
    c.limits.max_body_bytes = MIB;
    c.limits.max_bytes_in_flight = 4 * MIB;
    c.limits.body_timeout = Duration::from_secs(60);
    let s = Running::ready(c).await;
    let a = s.addr;

    // A valid request padded with spaces to exactly 1 MiB.
    let mut body = serde_json::to_vec(&reference_request("mlp")).unwrap();
    assert!(body.len() < MIB);
    body.resize(MIB, b' ');

    // Four clients announce 1 MiB each and send only half: they hold the whole budget.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut t = connect(a).await;
        t.write_all(infer_head(Some(MIB)).as_bytes()).await.unwrap();
        t.write_all(&body[..MIB / 2]).await.unwrap();
        holders.push(t);
    }
    // Wait until their reservations are in: then even a tiny request is refused. The probe
    // sends its whole (2-byte) body, so a probe admitted before the budget is taken gets its
    // answer (400) instead of waiting for a body that never comes.
    // A minute: a condition, not a sleep; on a loaded CI machine (the ARM build beside the
    // tests) ten seconds once ran out.
    wait_for(
        "the byte budget to be taken",
        Duration::from_secs(60),
        || async move {
            let mut t = connect(a).await;
            t.write_all(infer_head(Some(2)).as_bytes()).await.unwrap();
            t.write_all(b"{}").await.unwrap();
            read_head(&mut t).await.starts_with("HTTP/1.1 503")
        },
    )
    .await;

    // Many more large bodies at once: every one is refused at once with Retry-After, by
    // its Content-Length alone (none of it is buffered) or, chunked, at its first chunk.
    let mut refused = Vec::new();
    for i in 0..24 {
        refused.push(tokio::spawn(async move {
            let mut t = connect(a).await;
            if i % 2 == 0 {
                t.write_all(infer_head(Some(MIB)).as_bytes()).await.unwrap();
            } else {
                t.write_all(infer_head(None).as_bytes()).await.unwrap();
                let chunk = vec![b' '; 64 << 10];
                t.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await
                    .unwrap();
                t.write_all(&chunk).await.unwrap();
                t.write_all(b"\r\n").await.unwrap();
            }
            read_head(&mut t).await
        }));
    }
    for r in refused {
        let head = r.await.unwrap();
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("retry-after: 1"),
            "{head}"
        );
    }

    // The holders finish their bodies and are answered normally; the budget comes back.
    for t in holders.iter_mut() {
        t.write_all(&body[MIB / 2..]).await.unwrap();
    }
    for t in holders.iter_mut() {
        let head = read_head(t).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    drop(holders);
    let (st, v) = http(a, "POST", "/v2/models/mlp/infer", Some(body.clone())).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&v));
    // A body over the size limit is still a 400, not a 503.
    let (st, _) = http(a, "POST", "/v2/models/mlp/infer", Some(vec![b' '; MIB + 1])).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (_, m) = http(a, "GET", "/metrics", None).await;
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("outpost_infer_busy_rejections_total"), "{m}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_slow_bodies_are_cut_off() {
    let mut c = config(&model_path("mlp"), "mlp");
    c.limits.header_timeout = Duration::from_secs(1);
    c.limits.body_timeout = Duration::from_secs(1);
    let s = Running::ready(c).await;
    let a = s.addr;
    let deadline = Duration::from_secs(10);

    // Half a request line and headers, then nothing: closed without an answer.
    let started = std::time::Instant::now();
    let mut t = connect(a).await;
    t.write_all(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut t, deadline).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed by the timeout"
    );
    assert!(
        !got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // Slowloris proper: one header byte every 100 ms never finishes the headers; the
    // deadline does not move with each byte.
    let mut t = connect(a).await;
    let drip = async {
        for b in b"POST /v2/models/mlp/infer HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 400].iter())
        {
            if t.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the server read 40 s of dripped headers");
    };
    tokio::time::timeout(deadline, drip)
        .await
        .expect("the dripping client was cut off");

    // A connection that sends nothing at all is closed too.
    let mut t = connect(a).await;
    read_until_closed(&mut t, deadline).await;

    // Headers complete, half the body, then nothing: 408 and the connection is closed.
    let mut t = connect(a).await;
    t.write_all(infer_head(Some(1000)).as_bytes())
        .await
        .unwrap();
    t.write_all(&[b' '; 500]).await.unwrap();
    let got = String::from_utf8_lossy(&read_until_closed(&mut t, deadline).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("did not arrive within"), "{got}");

    // The server is unharmed.
    let (st, v) = post_json(a, "/v2/models/mlp/infer", &reference_request("mlp")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    s.stop().await;
}

#[test]
fn batch_replaces_a_planted_output_link_without_following_it() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir(&input).unwrap();
    std::fs::create_dir(&output).unwrap();
    let sensor = testdata().join("reference/mlp/inputs/sensor.npy");
    std::fs::copy(&sensor, input.join("a.npy")).unwrap();
    std::fs::write(
        input.join("b.json"),
        serde_json::to_vec(&reference_request("mlp")).unwrap(),
    )
    .unwrap();
    // Files outside the output folder that links planted at the output paths point to,
    // and a link at the report's name too.
    let outside = dir.path().join("precious.txt");
    std::fs::write(&outside, b"do not overwrite").unwrap();
    for name in ["a.npy", "b.json", "batch-report.json"] {
        std::os::unix::fs::symlink(&outside, output.join(name)).unwrap();
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost-infer"))
        .args(["batch", "--quiet", "--model"])
        .arg(model_path("mlp"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 of 2 inputs done"), "{stdout}");

    assert_eq!(std::fs::read(&outside).unwrap(), b"do not overwrite");
    for name in ["a.npy", "b.json", "batch-report.json"] {
        let meta = std::fs::symlink_metadata(output.join(name)).unwrap();
        assert!(meta.is_file(), "{name} is now a regular file, not the link");
    }
    let want = read_npy(&testdata().join("reference/mlp/outputs/0.npy"));
    assert_close("a.npy", &read_npy(&output.join("a.npy")), &want);
    let leftovers: Vec<_> = std::fs::read_dir(&output)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
