//! HTTP/1.1 to a registry: connections kept per `scheme://host:port`, HTTPS verified with the
//! system's roots (rustls with ring), plain HTTP only for a loopback registry that does not
//! speak TLS, and bodies read up to a bound.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;
use url::{Host, Url};

use super::session::Session;
use super::{MAX_ERROR_BYTES, RegistryError};

/// An answer, its body read up to a bound.
pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    /// False when the body was longer than the bound (and was not read to the end).
    pub(super) complete: bool,
}

/// The system roots are read once per process (the first HTTPS connection).
static SYSTEM_TLS: Mutex<Option<Arc<rustls::ClientConfig>>> = Mutex::new(None);

fn system_tls(registry: &str) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    // A poisoned lock only means another thread panicked while holding it; the value is fine.
    let mut cached = SYSTEM_TLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(config) = cached.as_ref() {
        return Ok(config.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return Err(RegistryError::NoSystemRoots {
            registry: registry.to_string(),
        });
    }
    let config = Arc::new(tls_config(roots).map_err(|detail| RegistryError::Tls {
        registry: registry.to_string(),
        address: registry.to_string(),
        detail: format!("cannot set up TLS: {detail}"),
    })?);
    *cached = Some(config.clone());
    Ok(config)
}

/// The client configuration over `roots`, with ring named explicitly (as the hub link does)
/// so that it works whether or not a process default was installed.
pub(super) fn tls_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, String> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(Host::Ipv4(a)) => a.is_loopback(),
        Some(Host::Ipv6(a)) => {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        None => false,
    }
}

/// `host:port` as the URL names it (the key for the plain-HTTP memo).
pub(super) fn authority(url: &Url) -> String {
    match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or("")),
        None => url.host_str().unwrap_or("").to_string(),
    }
}

/// True when a TLS handshake failed because the peer does not speak TLS (a plain HTTP server
/// answers a ClientHello with a `400` or hangs up), not because it was refused or untrusted.
fn peer_speaks_no_tls(err: &std::io::Error) -> bool {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(e) => matches!(
            e,
            rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. }
        ),
        None => matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

impl Session<'_> {
    /// GET `url`, reading at most `limit` bytes of the body.
    pub(super) async fn get(
        &mut self,
        url: &Url,
        accept: Option<&'static str>,
        auth: Option<HeaderValue>,
        limit: usize,
    ) -> Result<Reply, RegistryError> {
        let mut retried = false;
        loop {
            let (url, key, mut sender, reused) = self.open(url).await?;
            let path = match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            };
            let mut request = Request::get(path.as_str())
                .header(header::HOST, authority(&url))
                .header(
                    header::USER_AGENT,
                    concat!("outpost/", env!("CARGO_PKG_VERSION")),
                );
            if let Some(accept) = accept {
                request = request.header(header::ACCEPT, accept);
            }
            if let Some(auth) = &auth {
                request = request.header(header::AUTHORIZATION, auth.clone());
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| RegistryError::Http {
                    registry: self.registry.clone(),
                    detail: format!("cannot build the request for {path}: {e}"),
                })?;
            let response = match sender.send_request(request).await {
                Ok(r) => r,
                // A kept-alive connection the server closed meanwhile: once more on a new one
                // (a GET is safe to repeat).
                Err(_) if reused && !retried => {
                    retried = true;
                    continue;
                }
                Err(e) => {
                    return Err(RegistryError::Http {
                        registry: self.registry.clone(),
                        detail: e.to_string(),
                    });
                }
            };
            let (parts, mut body) = response.into_parts();
            let limit = if parts.status.is_success() {
                limit
            } else {
                MAX_ERROR_BYTES
            };
            let (body, complete) = read_limited(&parts.headers, &mut body, limit)
                .await
                .map_err(|e| RegistryError::Http {
                    registry: self.registry.clone(),
                    detail: format!("reading the answer: {e}"),
                })?;
            if complete && !sender.is_closed() {
                self.connections.insert(key, sender);
            }
            return Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
                complete,
            });
        }
    }

    /// A connection for `url` (a kept one when there is one): the URL actually used (HTTP for
    /// a loopback registry without TLS), its connection key, the sender, and whether it was
    /// reused.
    async fn open(
        &mut self,
        url: &Url,
    ) -> Result<(Url, String, http1::SendRequest<Empty<Bytes>>, bool), RegistryError> {
        let mut url = url.clone();
        if url.scheme() == "https" && self.plain.contains(&authority(&url)) {
            // Both are special schemes: switching cannot fail.
            let _ = url.set_scheme("http");
        }
        if url.scheme() == "http" && !is_loopback(&url) {
            return Err(RegistryError::Insecure {
                registry: self.registry.clone(),
                url: format!("http://{}{}", authority(&url), url.path()),
            });
        }
        let key = format!("{}://{}", url.scheme(), authority(&url));
        if let Some(mut sender) = self.connections.remove(&key)
            && sender.ready().await.is_ok()
        {
            return Ok((url, key, sender, true));
        }
        let tcp = self.tcp(&url).await?;
        if url.scheme() == "http" {
            let sender = self.handshake(tcp).await?;
            return Ok((url, key, sender, false));
        }
        let tls = match &self.tls {
            Some(c) => c.clone(),
            None => {
                let c = system_tls(&self.registry)?;
                self.tls = Some(c.clone());
                c
            }
        };
        let name = match url.host() {
            Some(Host::Domain(d)) => rustls::pki_types::ServerName::try_from(d.to_string()).ok(),
            Some(Host::Ipv4(a)) => Some(IpAddr::V4(a).into()),
            Some(Host::Ipv6(a)) => Some(IpAddr::V6(a).into()),
            None => None,
        };
        let address = authority(&url);
        let Some(name) = name else {
            return Err(RegistryError::Tls {
                registry: self.registry.clone(),
                address,
                detail: "not a valid server name".into(),
            });
        };
        match tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
        {
            Ok(stream) => {
                let sender = self.handshake(stream).await?;
                Ok((url, key, sender, false))
            }
            Err(e) if is_loopback(&url) && peer_speaks_no_tls(&e) => {
                debug!(registry = %self.registry, address = %address, "loopback registry without TLS: plain HTTP");
                self.plain.insert(address);
                let _ = url.set_scheme("http");
                let key = format!("http://{}", authority(&url));
                let tcp = self.tcp(&url).await?;
                let sender = self.handshake(tcp).await?;
                Ok((url, key, sender, false))
            }
            Err(e) => Err(RegistryError::Tls {
                registry: self.registry.clone(),
                address,
                detail: e.to_string(),
            }),
        }
    }

    async fn tcp(&self, url: &Url) -> Result<TcpStream, RegistryError> {
        let port = url.port_or_known_default().unwrap_or(443);
        let connected = match url.host() {
            Some(Host::Domain(d)) => TcpStream::connect((d, port)).await,
            Some(Host::Ipv4(a)) => TcpStream::connect((IpAddr::V4(a), port)).await,
            Some(Host::Ipv6(a)) => TcpStream::connect((IpAddr::V6(a), port)).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no host",
            )),
        };
        let stream = connected.map_err(|source| RegistryError::Connect {
            registry: self.registry.clone(),
            address: format!("{}:{port}", url.host_str().unwrap_or("")),
            source,
        })?;
        // Small requests and answers: no Nagle delay.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// HTTP/1.1 over `io`, the connection driven by a task that ends at the call's deadline.
    async fn handshake<T>(&self, io: T) -> Result<http1::SendRequest<Empty<Bytes>>, RegistryError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) =
            http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| RegistryError::Http {
                    registry: self.registry.clone(),
                    detail: e.to_string(),
                })?;
        let deadline = self.deadline;
        tokio::spawn(async move {
            // Ends when the sender is dropped (end of the call) or at the deadline.
            let _ = tokio::time::timeout_at(deadline, connection).await;
        });
        Ok(sender)
    }
}

/// Reads up to `limit` bytes; `complete` is false when the body is longer (by its
/// `Content-Length` before reading anything, or as it arrives).
async fn read_limited(
    headers: &HeaderMap,
    body: &mut Incoming,
    limit: usize,
) -> Result<(Bytes, bool), hyper::Error> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok((Bytes::new(), false));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buf.len() + data.len() > limit {
                return Ok((buf.freeze(), false));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((buf.freeze(), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_for_loopback_only() {
        for url in [
            "http://127.0.0.1:5000/",
            "http://127.9.9.9/",
            "http://localhost:5000/",
            "http://[::1]:5000/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(is_loopback(&Url::parse(url).unwrap()), "{url}");
        }
        for url in [
            "http://10.0.0.1/",
            "http://localhost.example.com/",
            "http://[::2]/",
        ] {
            assert!(!is_loopback(&Url::parse(url).unwrap()), "{url}");
        }
    }
}
