//! Fetching an artifact (a file a deployment names by URL, SHA-256 and size) into a folder of
//! the state directory: resumable, capped at its declared size, and verified before anyone
//! may use it.
//!
//! The file grows as `{sha256}.part`; an interrupted fetch (lost link, `kill -9`, reboot) goes
//! on from where it stopped with an HTTP `Range` request (from the start when the server does
//! not do ranges). Only a file whose length and digest match is renamed to `{sha256}`, so a
//! finished name always holds the verified content. `https://` is verified with the system's
//! roots (or a configured CA) judged at a time no earlier than this build (a device that boots
//! at 1970 can still fetch); `http://` is allowed, the digest protecting the content; redirects
//! are followed (release downloads usually redirect to a CDN).

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use url::{Host, Url};

use crate::manifest::Artifact;

/// The longest wait for a connection, and for the next bytes of a body.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;
/// Progress is told at most this often (bytes).
const PROGRESS_STEP: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {detail}")]
    Network { url: String, detail: String },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url}: the file is larger than the {declared} bytes the deployment declares")]
    TooLarge { url: String, declared: u64 },
    #[error("{url}: the file has {actual} bytes, the deployment declares {declared}")]
    Short {
        url: String,
        actual: u64,
        declared: u64,
    },
    #[error("{url}: the file's SHA-256 is {actual}, the deployment pins {expected}")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: {size} bytes is more than the {limit} this device accepts ({setting})")]
    OverLimit {
        url: String,
        size: u64,
        limit: u64,
        setting: &'static str,
    },
    #[error(
        "not enough disk space for {url}: {needed} bytes needed (with the reserve), {available} available on {dir}"
    )]
    NoSpace {
        url: String,
        needed: u64,
        available: u64,
        dir: PathBuf,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("stopped")]
    Cancelled,
}

impl FetchError {
    /// Whether trying again later can help (a lost link, a busy server), as opposed to a file
    /// that is not what the deployment says.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Network { .. } | FetchError::Io { .. } | FetchError::NoSpace { .. } => true,
            FetchError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            _ => false,
        }
    }
}

/// Fetches artifacts; holds the TLS configuration, built once.
#[derive(Debug, Clone)]
pub struct Fetcher {
    tls: Option<Arc<rustls::ClientConfig>>,
    tls_problem: Option<String>,
    /// Free space left on the disk beyond a file, as the pulls keep.
    reserve: u64,
}

impl Fetcher {
    /// `ca_file`: the CA for `https://` instead of the system's roots.
    pub fn new(ca_file: Option<&Path>, reserve: u64) -> Fetcher {
        let files = outpost_mqtt::tls::TlsFiles {
            ca_file: ca_file.map(Path::to_path_buf),
            client_auth: None,
            ca_setting: "update.ca_file",
        };
        match outpost_mqtt::tls::client_config(&files) {
            Ok(mut c) => {
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Fetcher {
                    tls: Some(Arc::new(c)),
                    tls_problem: None,
                    reserve,
                }
            }
            Err(e) => Fetcher {
                tls: None,
                tls_problem: Some(format!("no TLS for https:// downloads: {e}")),
                reserve,
            },
        }
    }

    /// Makes `{dir}/{sha256}` hold the artifact and returns its path. `progress` is told
    /// (bytes so far, total) as the file grows.
    pub async fn fetch(
        &self,
        artifact: &Artifact,
        dir: &Path,
        mut progress: impl FnMut(u64, u64) + Send,
        cancel: &CancellationToken,
    ) -> Result<PathBuf, FetchError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FetchError::Io { path, source }
        };
        crate::update::record::private_dir(dir).map_err(io(dir))?;
        let done = dir.join(&artifact.sha256);
        if done.is_file() {
            // Named by its digest only once verified; checked again in case the disk lied.
            if let Ok(d) = digest_of(&done)
                && d.0 == artifact.sha256
                && d.1 == artifact.size
            {
                return Ok(done);
            }
            std::fs::remove_file(&done).map_err(io(&done))?;
        }
        let part = dir.join(format!("{}.part", artifact.sha256));
        let (mut hasher, mut have) = match std::fs::File::open(&part) {
            Ok(f) => hash_reader(f).map_err(io(&part))?,
            Err(_) => (Sha256::new(), 0),
        };
        if have > artifact.size {
            std::fs::remove_file(&part).map_err(io(&part))?;
            (hasher, have) = (Sha256::new(), 0);
        }
        self.check_space(artifact, have, dir)?;
        progress(have, artifact.size);
        let url = Url::parse(&artifact.url).map_err(|e| FetchError::Network {
            url: artifact.url.clone(),
            detail: format!("not a URL: {e}"),
        })?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(io(&part))?;
        let mut sink = Sink {
            file: &mut file,
            path: &part,
            hasher: &mut hasher,
            have: &mut have,
            limit: artifact.size,
            url: &artifact.url,
            told: 0,
            progress: &mut progress,
        };
        match url.scheme() {
            "file" => copy_file(&url, &mut sink, cancel).await?,
            "http" | "https" => self.download(url, &mut sink, cancel).await?,
            other => {
                return Err(FetchError::Network {
                    url: artifact.url.clone(),
                    detail: format!("scheme `{other}` is not fetched"),
                });
            }
        }
        let have = *sink.have;
        (sink.progress)(have, artifact.size);
        file.sync_all().map_err(io(&part))?;
        drop(file);
        if have < artifact.size {
            return Err(FetchError::Short {
                url: artifact.url.clone(),
                actual: have,
                declared: artifact.size,
            });
        }
        let actual = hex(&hasher.finalize());
        if actual != artifact.sha256 {
            // Not the file the deployment pins: fetching it again would give the same bytes.
            let _ = std::fs::remove_file(&part);
            return Err(FetchError::Digest {
                url: artifact.url.clone(),
                expected: artifact.sha256.clone(),
                actual,
            });
        }
        std::fs::rename(&part, &done).map_err(io(&done))?;
        crate::fsutil::sync_dir(dir).map_err(io(dir))?;
        Ok(done)
    }

    fn check_space(&self, artifact: &Artifact, have: u64, dir: &Path) -> Result<(), FetchError> {
        let Some(usage) = crate::disk::usage(dir) else {
            return Ok(());
        };
        let needed = (artifact.size - have).saturating_add(self.reserve);
        if usage.available_bytes < needed {
            return Err(FetchError::NoSpace {
                url: artifact.url.clone(),
                needed,
                available: usage.available_bytes,
                dir: dir.to_path_buf(),
            });
        }
        Ok(())
    }

    async fn download(
        &self,
        mut url: Url,
        sink: &mut Sink<'_, impl FnMut(u64, u64) + Send>,
        cancel: &CancellationToken,
    ) -> Result<(), FetchError> {
        for _ in 0..=MAX_REDIRECTS {
            let have = *sink.have;
            if have == sink.limit {
                // Everything is here already (a kill after the last byte, before the rename).
                return Ok(());
            }
            let mut sender = self.connect(&url).await?;
            let path = match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            };
            let mut request = Request::get(path.as_str())
                .header(header::HOST, authority(&url))
                .header(
                    header::USER_AGENT,
                    format!("outpost/{}", outpost_core::version::current()),
                );
            if have > 0 {
                request = request.header(header::RANGE, format!("bytes={have}-"));
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| network(&url, format!("cannot build the request: {e}")))?;
            let response = tokio::select! {
                _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                r = tokio::time::timeout(IO_TIMEOUT, sender.send_request(request)) => match r {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => return Err(network(&url, e.to_string())),
                    Err(_) => return Err(network(&url, format!("no answer in {} s", IO_TIMEOUT.as_secs()))),
                },
            };
            let status = response.status();
            if status.is_redirection() {
                let next = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                    .ok_or_else(|| network(&url, format!("{status} without a usable Location")))?;
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(network(&url, format!("redirected to `{next}`")));
                }
                url = next;
                continue;
            }
            match status {
                StatusCode::PARTIAL_CONTENT => {
                    let start = content_range_start(response.headers().get(header::CONTENT_RANGE));
                    if start != Some(have) {
                        // Not the range asked for: start over.
                        sink.restart()?;
                        continue;
                    }
                }
                StatusCode::OK => {
                    if have > 0 {
                        // The server ignores ranges: the whole file comes again.
                        sink.restart()?;
                    }
                }
                StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                    sink.restart()?;
                    continue;
                }
                _ => {
                    return Err(FetchError::Status {
                        url: url.to_string(),
                        status,
                    });
                }
            }
            let mut body = response.into_body();
            loop {
                let frame = tokio::select! {
                    _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                    f = tokio::time::timeout(IO_TIMEOUT, body.frame()) => match f {
                        Ok(f) => f,
                        Err(_) => return Err(network(&url, format!("no data for {} s", IO_TIMEOUT.as_secs()))),
                    },
                };
                match frame {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(network(&url, e.to_string())),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            sink.write(&data)?;
                        }
                    }
                }
            }
        }
        Err(network(
            &url,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }

    async fn connect(&self, url: &Url) -> Result<http1::SendRequest<Empty<Bytes>>, FetchError> {
        let port = url.port_or_known_default().unwrap_or(443);
        let tcp = match url.host() {
            Some(Host::Domain(d)) => {
                tokio::time::timeout(IO_TIMEOUT, TcpStream::connect((d, port))).await
            }
            Some(Host::Ipv4(a)) => {
                tokio::time::timeout(IO_TIMEOUT, TcpStream::connect((IpAddr::V4(a), port))).await
            }
            Some(Host::Ipv6(a)) => {
                tokio::time::timeout(IO_TIMEOUT, TcpStream::connect((IpAddr::V6(a), port))).await
            }
            None => return Err(network(url, "no host".into())),
        };
        let tcp = match tcp {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(network(url, format!("cannot connect: {e}"))),
            Err(_) => return Err(network(url, "connecting timed out".into())),
        };
        if url.scheme() == "http" {
            return handshake(tcp, url).await;
        }
        let Some(tls) = &self.tls else {
            return Err(FetchError::Tls(
                self.tls_problem.clone().unwrap_or_default(),
            ));
        };
        let name = match url.host() {
            Some(Host::Domain(d)) => rustls::pki_types::ServerName::try_from(d.to_string())
                .map_err(|e| network(url, e.to_string()))?,
            Some(Host::Ipv4(a)) => IpAddr::V4(a).into(),
            Some(Host::Ipv6(a)) => IpAddr::V6(a).into(),
            None => return Err(network(url, "no host".into())),
        };
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| FetchError::Tls(format!("{}: TLS: {e}", authority(url))))?;
        handshake(stream, url).await
    }
}

async fn handshake<T>(io: T, url: &Url) -> Result<http1::SendRequest<Empty<Bytes>>, FetchError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| network(url, e.to_string()))?;
    // Ends when the sender is dropped (the end of the request).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Where the bytes go: the part file, the digest, the count, the cap.
struct Sink<'a, P: FnMut(u64, u64)> {
    file: &'a mut std::fs::File,
    path: &'a Path,
    hasher: &'a mut Sha256,
    have: &'a mut u64,
    limit: u64,
    url: &'a str,
    told: u64,
    progress: &'a mut P,
}

impl<P: FnMut(u64, u64)> Sink<'_, P> {
    fn write(&mut self, data: &[u8]) -> Result<(), FetchError> {
        if *self.have + data.len() as u64 > self.limit {
            return Err(FetchError::TooLarge {
                url: self.url.to_string(),
                declared: self.limit,
            });
        }
        self.file.write_all(data).map_err(|source| FetchError::Io {
            path: self.path.to_path_buf(),
            source,
        })?;
        self.hasher.update(data);
        *self.have += data.len() as u64;
        if *self.have - self.told >= PROGRESS_STEP {
            self.told = *self.have;
            (self.progress)(*self.have, self.limit);
        }
        Ok(())
    }

    /// Empties the part file: the bytes come again from the start.
    fn restart(&mut self) -> Result<(), FetchError> {
        self.file.set_len(0).map_err(|source| FetchError::Io {
            path: self.path.to_path_buf(),
            source,
        })?;
        *self.hasher = Sha256::new();
        *self.have = 0;
        self.told = 0;
        Ok(())
    }
}

/// Copies a `file://` artifact, from where the part file stops.
async fn copy_file(
    url: &Url,
    sink: &mut Sink<'_, impl FnMut(u64, u64) + Send>,
    cancel: &CancellationToken,
) -> Result<(), FetchError> {
    use std::io::{Read as _, Seek as _};
    let path = url
        .to_file_path()
        .map_err(|()| network(url, "not a local path".into()))?;
    let mut source = std::fs::File::open(&path).map_err(|source| FetchError::Io {
        path: path.clone(),
        source,
    })?;
    source
        .seek(std::io::SeekFrom::Start(*sink.have))
        .map_err(|source| FetchError::Io {
            path: path.clone(),
            source,
        })?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if cancel.is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        let n = source.read(&mut buf).map_err(|source| FetchError::Io {
            path: path.clone(),
            source,
        })?;
        if n == 0 {
            return Ok(());
        }
        sink.write(&buf[..n])?;
        // A large local copy leaves the runtime's other tasks their turn.
        tokio::task::yield_now().await;
    }
}

fn hash_reader(mut r: impl std::io::Read) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher, total));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// The SHA-256 (hex) and length of a file.
pub fn digest_of(path: &Path) -> std::io::Result<(String, u64)> {
    let (hasher, len) = hash_reader(std::fs::File::open(path)?)?;
    Ok((hex(&hasher.finalize()), len))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn network(url: &Url, detail: String) -> FetchError {
    FetchError::Network {
        url: url.to_string(),
        detail,
    }
}

fn authority(url: &Url) -> String {
    match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or("")),
        None => url.host_str().unwrap_or("").to_string(),
    }
}

/// The first byte of `bytes START-END/TOTAL`.
fn content_range_start(v: Option<&HeaderValue>) -> Option<u64> {
    let v = v?.to_str().ok()?.strip_prefix("bytes ")?;
    v.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(url: String, content: &[u8]) -> Artifact {
        Artifact {
            url,
            sha256: hex(&Sha256::digest(content)),
            size: content.len() as u64,
        }
    }

    #[tokio::test]
    async fn a_file_url_is_copied_resumed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let source = dir.path().join("source.bin");
        std::fs::write(&source, &content).unwrap();
        let a = artifact(format!("file://{}", source.display()), &content);
        let downloads = dir.path().join("dl");
        // A fetch interrupted after 300 000 bytes.
        std::fs::create_dir_all(&downloads).unwrap();
        std::fs::write(
            downloads.join(format!("{}.part", a.sha256)),
            &content[..300_000],
        )
        .unwrap();
        let mut seen = Vec::new();
        let fetcher = Fetcher::new(None, 0);
        let path = fetcher
            .fetch(
                &a,
                &downloads,
                |d, t| seen.push((d, t)),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), content);
        assert_eq!(
            seen.first(),
            Some(&(300_000, 1_000_000)),
            "it went on from the part"
        );
        assert_eq!(seen.last(), Some(&(1_000_000, 1_000_000)));
        // Fetched already: nothing is read again.
        std::fs::remove_file(&source).unwrap();
        let again = fetcher
            .fetch(&a, &downloads, |_, _| {}, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(again, path);
    }

    #[tokio::test]
    async fn a_wrong_digest_or_size_is_refused_and_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source.bin");
        std::fs::write(&source, b"the real content").unwrap();
        let url = format!("file://{}", source.display());
        let mut a = artifact(url.clone(), b"the expected content");
        a.size = 16;
        let downloads = dir.path().join("dl");
        let fetcher = Fetcher::new(None, 0);
        let e = fetcher
            .fetch(&a, &downloads, |_, _| {}, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Digest { .. }), "{e}");
        assert!(!e.is_transient());
        assert_eq!(std::fs::read_dir(&downloads).unwrap().count(), 0);

        let small = artifact(url, b"the real");
        let e = fetcher
            .fetch(&small, &downloads, |_, _| {}, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::TooLarge { declared: 8, .. }), "{e}");
    }

    #[tokio::test]
    async fn the_disk_is_checked_before_anything_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source.bin");
        std::fs::write(&source, b"content").unwrap();
        let a = artifact(format!("file://{}", source.display()), b"content");
        // A reserve no disk has.
        let fetcher = Fetcher::new(None, u64::MAX / 2);
        let e = fetcher
            .fetch(
                &a,
                &dir.path().join("dl"),
                |_, _| {},
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::NoSpace { .. }), "{e}");
        assert!(e.is_transient(), "space may be freed: tried again later");
        assert!(e.to_string().contains("not enough disk space"), "{e}");
    }

    #[test]
    fn content_ranges_are_read() {
        let v = HeaderValue::from_static("bytes 100-199/200");
        assert_eq!(content_range_start(Some(&v)), Some(100));
        assert_eq!(content_range_start(None), None);
        let v = HeaderValue::from_static("items 1-2/3");
        assert_eq!(content_range_start(Some(&v)), None);
    }
}
