//! Serving the rendered snapshot as `GET /metrics` on loopback ([`serve_prometheus`]): a
//! minimal HTTP/1.1 server with bounded connections, sizes and time.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Largest request head read from a scraper.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a client has to send its request head, and then to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 8;
/// How long an answered connection keeps reading what the client still sends, and how much.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

const TEXT: &str = "text/plain; charset=utf-8";
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the latest rendered snapshot as `GET /metrics` on `listener` until `stop` is
/// cancelled, then waits for the connections being served (they end at once on `stop`).
/// Answers `503` until the first snapshot is published. The endpoint has no authentication:
/// bind the listener to loopback.
///
/// A minimal HTTP/1.1 server: one request per connection, then the connection is closed.
pub async fn serve_prometheus(
    listener: TcpListener,
    snapshot: watch::Receiver<Option<Arc<String>>>,
    stop: CancellationToken,
) {
    serve(listener, snapshot, stop, IO_TIMEOUT).await;
}

async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<Option<Arc<String>>>,
    stop: CancellationToken,
    io_timeout: Duration,
) {
    let tasks = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, most likely: pause rather than spin.
                        warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "metrics endpoint busy; connection closed");
                    continue;
                };
                let (snapshot, stop) = (snapshot.clone(), stop.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = connection(stream, snapshot, io_timeout) => if let Err(e) = r {
                            debug!(%peer, error = %e, "metrics connection failed");
                        },
                    }
                    drop(permit);
                });
            }
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// What a client sent before the server stopped reading.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Everything up to and including the empty line that ends the head.
    Complete(Vec<u8>),
    /// The client closed before sending anything.
    Empty,
    /// The client closed in the middle of the head.
    Truncated,
    TooLarge,
}

async fn connection(
    mut stream: TcpStream,
    snapshot: watch::Receiver<Option<Arc<String>>>,
    io_timeout: Duration,
) -> io::Result<()> {
    let response = match tokio::time::timeout(io_timeout, read_head(&mut stream)).await {
        Err(_) => error("408 Request Timeout", false),
        Ok(head) => match head? {
            Head::Empty => return Ok(()),
            Head::Truncated => error("400 Bad Request", false),
            Head::TooLarge => error("431 Request Header Fields Too Large", false),
            Head::Complete(head) => {
                // Cloned out at once: the borrow must not live across an await.
                let text = snapshot.borrow().clone();
                respond(&head, text.as_deref().map(String::as_str))
            }
        },
    };
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(io_timeout, write)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    // Closing with input unread (a request body, the rest of an oversized head) makes the
    // kernel send a reset, which can destroy the answer before the client has read it: read and
    // discard what still comes, for a moment, until the client closes.
    let linger = async {
        let mut sink = [0u8; 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
    Ok(())
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut line_start = 0;
    loop {
        let room = (MAX_HEAD_BYTES - head.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(if head.is_empty() {
                Head::Empty
            } else {
                Head::Truncated
            });
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head, &mut line_start) {
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() >= MAX_HEAD_BYTES {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the head ends (just past its first empty line, `\r\n` or bare `\n`), scanning from
/// `*from`, the start of the first line not yet complete, which is left there for the next call.
fn head_end(bytes: &[u8], from: &mut usize) -> Option<usize> {
    while let Some(nl) = bytes[*from..].iter().position(|&b| b == b'\n') {
        let line = &bytes[*from..*from + nl];
        let next = *from + nl + 1;
        if line.is_empty() || line == b"\r" {
            return Some(next);
        }
        *from = next;
    }
    None
}

/// The whole response to a complete request head, given the rendered snapshot if there is one.
fn respond(head: &[u8], metrics: Option<&str>) -> Vec<u8> {
    let Some((method, path)) = request_line(head) else {
        return error("400 Bad Request", false);
    };
    let head_only = method == "HEAD";
    if path != "/metrics" {
        return error("404 Not Found", head_only);
    }
    if method != "GET" && !head_only {
        let status = "405 Method Not Allowed";
        return response(
            status,
            TEXT,
            "Allow: GET, HEAD\r\n",
            &format!("{status}\n"),
            false,
        );
    }
    match metrics {
        Some(text) => response("200 OK", EXPOSITION, "", text, head_only),
        None => error("503 Service Unavailable", head_only),
    }
}

/// Method and path (query left out) of a request line `METHOD /target HTTP/1.x`.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(is_tchar)
        && target.starts_with('/')
        && !target.bytes().any(|b| b.is_ascii_control())
        && matches!(version, "HTTP/1.0" | "HTTP/1.1");
    if !valid {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Some((method, path))
}

/// A character allowed in an HTTP token such as a method (RFC 9110, 5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn error(status: &str, head_only: bool) -> Vec<u8> {
    response(status, TEXT, "", &format!("{status}\n"), head_only)
}

/// `extra_headers` are whole lines, each ending in `\r\n`. `head_only` answers `HEAD`: the
/// headers describe the body, which is left out.
fn response(
    status: &str,
    content_type: &str,
    extra_headers: &str,
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {extra_headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    use super::super::prometheus::render_prometheus;
    use super::super::snapshot::example as snapshot;
    use super::*;

    #[test]
    fn head_end_across_reads() {
        let mut from = 0;
        let mut buf = b"GET /metrics HTTP/1.1\r\nHo".to_vec();
        assert_eq!(head_end(&buf, &mut from), None);
        assert_eq!(from, 23);
        buf.extend_from_slice(b"st: x\r\n\r");
        assert_eq!(head_end(&buf, &mut from), None);
        buf.extend_from_slice(b"\nbody");
        assert_eq!(head_end(&buf, &mut from), Some(buf.len() - 4));
        let mut from = 0;
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n", &mut from), Some(16));
    }

    #[test]
    fn requests_and_answers() {
        let status = |head: &[u8], metrics: Option<&str>| {
            let r = String::from_utf8(respond(head, metrics)).unwrap();
            r.split(' ').nth(1).unwrap().to_string()
        };
        let m = Some("a 1\n");
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\n\r\n", m), "200");
        assert_eq!(status(b"GET /metrics?x=1 HTTP/1.0\n\n", m), "200");
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\n\r\n", None), "503");
        assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n", m), "404");
        assert_eq!(status(b"POST /metrics HTTP/1.1\r\n\r\n", m), "405");
        assert_eq!(status(b"DELETE /metrics HTTP/1.1\r\n\r\n", m), "405");
        let garbage: [&[u8]; 10] = [
            b"\r\n\r\n",
            b"hello\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 x\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
            b"",
        ];
        for garbage in garbage {
            assert_eq!(status(garbage, m), "400", "{garbage:?}");
        }
        let head = String::from_utf8(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", m)).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("Content-Length: 4\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
        let not_allowed = String::from_utf8(respond(b"PUT /metrics HTTP/1.1\r\n\r\n", m)).unwrap();
        assert!(not_allowed.contains("Allow: GET, HEAD\r\n"));
    }

    struct Server {
        addr: SocketAddr,
        publish: watch::Sender<Option<Arc<String>>>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(io_timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (publish, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, rx, stop.clone(), io_timeout));
        Server {
            addr,
            publish,
            stop,
            task,
        }
    }

    /// Sends `request` and reads the answer until the server closes.
    async fn exchange(
        addr: SocketAddr,
        request: &[u8],
    ) -> (String, BTreeMap<String, String>, String) {
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().to_string();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_ascii_lowercase(), v.to_string())
            })
            .collect();
        (status, headers, body.to_string())
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let server = start(IO_TIMEOUT).await;
        let get = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";

        let (status, headers, _) = exchange(server.addr, get).await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(headers["connection"], "close");

        let text = render_prometheus(&snapshot());
        server.publish.send_replace(Some(Arc::new(text.clone())));
        let (status, headers, body) = exchange(server.addr, get).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(headers["content-length"], text.len().to_string());
        assert_eq!(headers["connection"], "close");
        assert_eq!(body, text);

        let (status, _, _) = exchange(server.addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, headers, _) = exchange(server.addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert_eq!(headers["allow"], "GET, HEAD");
        let (status, _, _) = exchange(server.addr, b"\x16\x03\x01\x02\x00\x01\n\n").await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD_BYTES + 100, b'a');
        let (status, _, _) = exchange(server.addr, &huge).await;
        assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");

        server.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn slow_client_times_out() {
        let server = start(Duration::from_millis(200)).await;
        let (status, _, _) = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert_eq!(status, "HTTP/1.1 408 Request Timeout");
        server.stop.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn stop_ends_open_connections() {
        let server = start(Duration::from_secs(60)).await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        idle.write_all(b"GET /met").await.unwrap();
        // Let the server accept it before stopping.
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .unwrap()
            .unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
