//! A file server on loopback for artifact downloads: HTTP/1.1 `GET` with `Range: bytes=N-`
//! (answered `206`), optionally throttled so that a test can interrupt a download, and a log
//! of the ranges asked for (to see that a download resumed).
//!
//! Written here rather than taken from a package: Python's `http.server` does not do ranges,
//! and nothing else on the machine serves files.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request seen: the path and the first byte asked for (0 without a range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub from: u64,
}

pub struct FileServer {
    pub port: u16,
    files: Arc<Mutex<BTreeMap<String, PathBuf>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Bytes per second per connection; 0 for no limit.
    rate: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FileServer {
    pub fn start() -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the file server");
        let port = listener.local_addr().expect("its address").port();
        let server = FileServer {
            port,
            files: Arc::default(),
            seen: Arc::default(),
            rate: Arc::default(),
            stop: Arc::default(),
        };
        let (files, seen, rate, stop) = (
            server.files.clone(),
            server.seen.clone(),
            server.rate.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (files, seen, rate) = (files.clone(), seen.clone(), rate.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &files, &seen, &rate);
                });
            }
        });
        server
    }

    /// Serves `file` at `/name`; returns its URL.
    pub fn serve(&self, name: &str, file: PathBuf) -> String {
        self.files
            .lock()
            .expect("files")
            .insert(format!("/{name}"), file);
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Limits each connection to `bytes_per_sec` (0: no limit), from the next chunk on.
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(
    stream: TcpStream,
    files: &Mutex<BTreeMap<String, PathBuf>>,
    seen: &Mutex<Vec<Seen>>,
    rate: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut from = 0u64;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            from = value
                .trim()
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    seen.lock().expect("seen").push(Seen {
        path: path.clone(),
        from,
    });
    let file = files.lock().expect("files").get(&path).cloned();
    let Some(file) = file else {
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
    };
    let body = std::fs::read(&file)?;
    let total = body.len() as u64;
    if from > total {
        return out.write_all(
            format!("HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{total}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
        );
    }
    let head = if from > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {from}-{}/{total}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            total - 1,
            total - from
        )
    } else {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n")
    };
    out.write_all(head.as_bytes())?;
    let mut rest = &body[from as usize..];
    while !rest.is_empty() {
        let per_sec = rate.load(Ordering::SeqCst);
        let chunk = if per_sec == 0 {
            rest.len()
        } else {
            (per_sec as usize / 20).clamp(1024, rest.len().max(1024))
        }
        .min(rest.len());
        out.write_all(&rest[..chunk])?;
        rest = &rest[chunk..];
        if per_sec > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Reads whatever the client still sends, so that it sees the body end cleanly.
    let _ = out.flush();
    let mut sink = [0u8; 64];
    let _ = out.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = (&out).read(&mut sink);
    Ok(())
}
