//! How big an image is before it is pulled: the registry's manifest lists the compressed size of
//! the config and of every layer, so the reconciler can check disk space before starting a pull
//! that would fill the disk (a full disk on a device takes the running modules down with it).
//!
//! This module owns a small registry client for that one question, [`image_size`]:
//! - the distribution API's manifest endpoint, accepting the OCI index, the Docker manifest
//!   list and both single-image manifests; an index is resolved to this device's
//!   [`Platform`] and that manifest fetched by digest (and checked against it);
//! - Docker's authentication: anonymous first, then on `401` what `WWW-Authenticate` asks for,
//!   `Basic` with the deployment's credentials or `Bearer` from the registry's token service;
//! - HTTPS verified with the system's roots (rustls with ring, the workspace's one provider);
//!   plain HTTP only for a loopback registry that does not speak TLS, as Docker does;
//! - bounds: manifests over [`MAX_MANIFEST_BYTES`] are refused and the whole call ends at its
//!   timeout.
//!
//! Nothing here logs or returns a password or token: errors name the registry, the user and
//! what to check.
//!
//! Layout: `session` (one call: the manifest requests, index to platform), `manifest` (reading
//! manifests and indexes, digests), `platform` (this device's, and choosing it from an index),
//! `auth` (challenges, basic and bearer), `transport` (HTTP/1.1 over TCP or rustls, bounded
//! reads), `error` ([`RegistryError`]).

mod auth;
mod error;
mod manifest;
mod platform;
mod session;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use crate::manifest::{ImageRef, RegistryCredentials};

pub use error::RegistryError;
pub use platform::Platform;

use session::Session;

/// Manifests and indexes larger than this are refused: real ones are a few KiB (an index of
/// every platform and attestation stays under 100 KiB), and the device must not buffer
/// whatever a registry sends.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Token answers are a JWT and a little JSON.
const MAX_TOKEN_BYTES: usize = 256 * 1024;
/// Of an error answer only the start is kept, for the message.
const MAX_ERROR_BYTES: usize = 16 * 1024;
/// An index may point at another index (OCI allows it); deeper than this is refused.
const MAX_INDEX_DEPTH: usize = 3;

/// What a pull of the image downloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSize {
    /// The config blob plus every layer, compressed, as the registry stores them: the most a
    /// pull downloads. Unpacked layers take more disk (often 2–3× for gzip); the caller
    /// chooses the margin.
    pub compressed_bytes: u64,
    /// `sha256:…` of the image manifest those sizes come from: for a multi-platform image the
    /// platform's manifest, not the index.
    pub manifest_digest: String,
}

/// The compressed size of `reference` for `platform`, from the registry's manifests, without
/// pulling anything.
///
/// `credentials` are the deployment's for the image's registry (tried only when the registry
/// asks). Fails when the registry cannot be reached or refuses the credentials, when the tag
/// or digest does not exist, when an index has no manifest for `platform` (the error lists
/// what it offers), when a manifest is over [`MAX_MANIFEST_BYTES`] or does not match its
/// digest, and when the whole exchange takes longer than `timeout`.
pub async fn image_size(
    reference: &str,
    credentials: Option<&RegistryCredentials>,
    platform: &Platform,
    timeout: Duration,
) -> Result<ImageSize, RegistryError> {
    image_size_with(reference, credentials, platform, timeout, None).await
}

/// [`image_size`] with the TLS configuration given (tests trust their own CA this way).
async fn image_size_with(
    reference: &str,
    credentials: Option<&RegistryCredentials>,
    platform: &Platform,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<ImageSize, RegistryError> {
    let image = ImageRef::parse(reference).map_err(|reason| RegistryError::InvalidReference {
        reference: reference.to_string(),
        reason,
    })?;
    let registry = image.registry.clone();
    let now = tokio::time::Instant::now();
    // A timeout too large to add is as good as none: a year.
    let deadline = now
        .checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
    let mut session = Session::new(&image, credentials, tls, deadline)?;
    match tokio::time::timeout_at(deadline, session.size(&image, platform)).await {
        Ok(result) => result,
        Err(_) => Err(RegistryError::Timeout {
            registry,
            after: timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use sha2::Digest as _;
    use tokio::io::{AsyncRead, AsyncWrite};

    use super::auth::basic_auth;
    use super::manifest::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
    use super::transport::tls_config;
    use super::*;
    use crate::manifest::Secret;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    fn credentials(username: &str, password: &str) -> RegistryCredentials {
        RegistryCredentials {
            username: username.into(),
            password: Secret::new(password),
        }
    }

    fn platform(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant: variant.map(str::to_string),
        }
    }

    // --- A scripted registry on loopback, for the flows ---------------------------------------

    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        headers: HashMap<String, String>,
    }

    #[derive(Default)]
    struct Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
        /// Never answer.
        stall: bool,
        /// No `Content-Length`: the body runs to the end of the connection.
        unframed: bool,
    }

    impl Answer {
        fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Answer {
            Answer {
                status,
                headers: vec![("Content-Type", content_type.to_string())],
                body: body.into(),
                ..Answer::default()
            }
        }
    }

    type Handler = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;
    type Log = Arc<Mutex<Vec<Seen>>>;

    /// Serves `handler` on a free loopback port, over TLS when `tls` is given. A TLS
    /// ClientHello sent to the plain server gets a `400` and a hang-up, as from Go's servers
    /// (the distribution registry among them).
    async fn serve(handler: Handler, tls: Option<tokio_rustls::TlsAcceptor>) -> (u16, Log) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let log: Log = Arc::default();
        let seen = log.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (handler, seen, tls) = (handler.clone(), seen.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                answer(stream, handler, seen).await;
                            }
                        }
                        None => answer(tcp, handler, seen).await,
                    }
                });
            }
        });
        (port, log)
    }

    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, handler: Handler, log: Log) {
        let mut buf = Vec::new();
        loop {
            let end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p;
                }
                let mut chunk = [0u8; 4096];
                let n = match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                if buf.first() == Some(&0x16) {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let path = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("")
                .to_string();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let seen = Seen { path, headers };
            log.lock().unwrap().push(seen.clone());
            let a = handler(&seen);
            if a.stall {
                std::future::pending::<()>().await;
            }
            let mut out = format!("HTTP/1.1 {} X\r\n", a.status);
            if a.unframed {
                out.push_str("Connection: close\r\n");
            } else {
                out.push_str(&format!("Content-Length: {}\r\n", a.body.len()));
            }
            for (k, v) in &a.headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(&a.body);
            if stream.write_all(&bytes).await.is_err() || a.unframed {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }

    fn image_manifest(layer_sizes: &[u64]) -> (Vec<u8>, String) {
        let layers: Vec<_> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, s)| serde_json::json!({ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{i:064}"), "size": s }))
            .collect();
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{:064}", 9), "size": 1000 },
            "layers": layers,
        })
        .to_string()
        .into_bytes();
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(&body));
        (body, digest)
    }

    const SECOND: Duration = Duration::from_secs(5);

    /// A registry with a token service: an index for `app:1.0` (amd64 and arm/v7), both
    /// manifests by digest, all behind `Bearer tok-1`, which the token service gives to
    /// `edge` / `s3cret`.
    async fn bearer_registry() -> (u16, Log, [(u64, String); 2]) {
        let (amd64, amd64_digest) = image_manifest(&[1_000_000, 24]);
        let (arm, arm_digest) = image_manifest(&[700_000]);
        let idx = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                { "mediaType": OCI_MANIFEST, "digest": amd64_digest, "size": amd64.len(), "platform": { "os": "linux", "architecture": "amd64" } },
                { "mediaType": OCI_MANIFEST, "digest": arm_digest, "size": arm.len(), "platform": { "os": "linux", "architecture": "arm", "variant": "v7" } },
            ],
        })
        .to_string();
        let port_cell: Arc<std::sync::OnceLock<u16>> = Arc::default();
        let port_of = port_cell.clone();
        let (a, b) = (amd64_digest.clone(), arm_digest.clone());
        let handler: Handler = Arc::new(move |seen: &Seen| {
            let auth = seen.headers.get("authorization").map(String::as_str);
            if seen.path.starts_with("/token?") {
                let expected = basic_auth(&credentials("edge", "s3cret"));
                return if auth == expected.to_str().ok() {
                    Answer::new(
                        200,
                        "application/json",
                        r#"{"access_token":"tok-1","expires_in":300}"#,
                    )
                } else {
                    Answer::new(
                        401,
                        "application/json",
                        r#"{"details":"incorrect username or password"}"#,
                    )
                };
            }
            if auth != Some("Bearer tok-1") {
                let mut a = Answer::new(
                    401,
                    "application/json",
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                );
                a.headers.push((
                    "WWW-Authenticate",
                    format!(
                        r#"Bearer realm="http://127.0.0.1:{}/token",service="fake-registry",scope="repository:app:pull,push""#,
                        port_of.get().unwrap()
                    ),
                ));
                return a;
            }
            match seen.path.as_str() {
                "/v2/app/manifests/1.0" => Answer::new(200, OCI_INDEX, idx.clone()),
                p if p == format!("/v2/app/manifests/{a}") => {
                    Answer::new(200, OCI_MANIFEST, amd64.clone())
                }
                p if p == format!("/v2/app/manifests/{b}") => {
                    Answer::new(200, OCI_MANIFEST, arm.clone())
                }
                _ => Answer::new(
                    404,
                    "application/json",
                    r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
                ),
            }
        });
        let (port, log) = serve(handler, None).await;
        port_cell.set(port).unwrap();
        (
            port,
            log,
            [
                (1000 + 1_000_000 + 24, amd64_digest),
                (1000 + 700_000, arm_digest),
            ],
        )
    }

    #[tokio::test]
    async fn a_bearer_registry_gives_the_platforms_size() {
        let (port, log, [(amd64_size, amd64_digest), (arm_size, arm_digest)]) =
            bearer_registry().await;
        let reference = format!("127.0.0.1:{port}/app:1.0");
        let creds = credentials("edge", "s3cret");
        let size = image_size(
            &reference,
            Some(&creds),
            &platform("linux", "amd64", None),
            SECOND,
        )
        .await
        .unwrap();
        assert_eq!(
            size,
            ImageSize {
                compressed_bytes: amd64_size,
                manifest_digest: amd64_digest.clone()
            }
        );
        let size = image_size(
            &reference,
            Some(&creds),
            &platform("linux", "arm", Some("v7")),
            SECOND,
        )
        .await
        .unwrap();
        assert_eq!(
            size,
            ImageSize {
                compressed_bytes: arm_size,
                manifest_digest: arm_digest
            }
        );

        // Anonymous first, then the token service with the credentials and only a pull scope,
        // then the index and the platform's manifest by digest with the token.
        let seen = log.lock().unwrap().clone();
        let paths: Vec<&str> = seen.iter().take(4).map(|s| s.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/v2/app/manifests/1.0",
                "/token?service=fake-registry&scope=repository%3Aapp%3Apull",
                "/v2/app/manifests/1.0",
                format!("/v2/app/manifests/{amd64_digest}").as_str(),
            ]
        );
        assert!(!seen[0].headers.contains_key("authorization"));
        assert!(seen[2].headers["accept"].contains(OCI_INDEX));
        assert_eq!(seen[3].headers["authorization"], "Bearer tok-1");
        assert_eq!(seen[0].headers["host"], format!("127.0.0.1:{port}"));

        // No platform: the error says which are offered.
        let err = image_size(
            &reference,
            Some(&creds),
            &platform("linux", "riscv64", None),
            SECOND,
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "image {reference} has no manifest for platform linux/riscv64; it offers: linux/amd64, linux/arm/v7"
            )
        );
    }

    #[tokio::test]
    async fn refused_credentials_name_the_user_and_never_the_password() {
        let (port, _log, _) = bearer_registry().await;
        let reference = format!("127.0.0.1:{port}/app:1.0");
        let here = platform("linux", "amd64", None);
        let wrong = credentials("edge", "not-the-password");
        let err = image_size(&reference, Some(&wrong), &here, SECOND)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::CredentialsRefused { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("user `edge`") && message.contains("registries"),
            "{message}"
        );
        assert!(!message.contains("not-the-password"), "{message}");
        assert!(!format!("{err:?}").contains("not-the-password"));

        let err = image_size(&reference, None, &here, SECOND)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::CredentialsRequired { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_tag_or_digest_is_named() {
        let (port, _log, _) = bearer_registry().await;
        let creds = credentials("edge", "s3cret");
        let here = platform("linux", "amd64", None);
        let err = image_size(
            &format!("127.0.0.1:{port}/app:nope"),
            Some(&creds),
            &here,
            SECOND,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("tag `nope`"), "{err}");
        assert!(err.to_string().contains("MANIFEST_UNKNOWN"), "{err}");

        let digest = format!("sha256:{}", "0".repeat(64));
        let err = image_size(
            &format!("127.0.0.1:{port}/app@{digest}"),
            Some(&creds),
            &here,
            SECOND,
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains(&format!("digest `{digest}`")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn content_that_does_not_match_its_digest_is_refused() {
        let (body, _) = image_manifest(&[5]);
        let handler: Handler =
            Arc::new(move |_: &Seen| Answer::new(200, OCI_MANIFEST, body.clone()));
        let (port, _log) = serve(handler, None).await;
        let digest = format!("sha256:{}", "1".repeat(64));
        let err = image_size(
            &format!("127.0.0.1:{port}/app@{digest}"),
            None,
            &platform("linux", "amd64", None),
            SECOND,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RegistryError::BadManifest { .. }), "{err:?}");
        assert!(err.to_string().contains("not the"), "{err}");
    }

    #[tokio::test]
    async fn basic_auth_registries_get_the_credentials_when_they_ask() {
        let expected = basic_auth(&credentials("edge", "pw"))
            .to_str()
            .unwrap()
            .to_string();
        let (body, digest) = image_manifest(&[10, 20]);
        let handler: Handler = Arc::new(move |seen: &Seen| {
            if seen.headers.get("authorization") == Some(&expected) {
                Answer::new(200, DOCKER_MANIFEST, body.clone())
            } else {
                let mut a = Answer::new(401, "application/json", "{}");
                a.headers
                    .push(("WWW-Authenticate", r#"Basic realm="outpost-test""#.into()));
                a
            }
        });
        let (port, log) = serve(handler, None).await;
        let reference = format!("127.0.0.1:{port}/team/app:2");
        let here = platform("linux", "amd64", None);
        let size = image_size(&reference, Some(&credentials("edge", "pw")), &here, SECOND)
            .await
            .unwrap();
        assert_eq!(
            size,
            ImageSize {
                compressed_bytes: 1030,
                manifest_digest: digest
            }
        );
        assert_eq!(
            log.lock().unwrap().len(),
            2,
            "anonymous, then with credentials"
        );
        let err = image_size(&reference, Some(&credentials("edge", "bad")), &here, SECOND)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::CredentialsRefused { .. }),
            "{err:?}"
        );
        let err = image_size(&reference, None, &here, SECOND)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::CredentialsRequired { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn oversized_manifests_are_refused() {
        for unframed in [false, true] {
            let handler: Handler = Arc::new(move |_: &Seen| Answer {
                unframed,
                ..Answer::new(200, OCI_MANIFEST, vec![b' '; MAX_MANIFEST_BYTES + 1])
            });
            let (port, _log) = serve(handler, None).await;
            let err = image_size(
                &format!("127.0.0.1:{port}/app:1"),
                None,
                &platform("linux", "amd64", None),
                SECOND,
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err, RegistryError::TooLarge { .. }),
                "unframed {unframed}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_registry_that_never_answers_times_out() {
        let handler: Handler = Arc::new(|_: &Seen| Answer {
            stall: true,
            ..Answer::default()
        });
        let (port, _log) = serve(handler, None).await;
        let started = std::time::Instant::now();
        let timeout = Duration::from_millis(300);
        let err = image_size(
            &format!("127.0.0.1:{port}/app:1"),
            None,
            &platform("linux", "amd64", None),
            timeout,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RegistryError::Timeout { .. }), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_token_realm_over_plain_http_elsewhere_is_refused() {
        let handler: Handler = Arc::new(|_: &Seen| {
            let mut a = Answer::new(401, "application/json", "{}");
            a.headers.push((
                "WWW-Authenticate",
                r#"Bearer realm="http://auth.example.invalid/token""#.into(),
            ));
            a
        });
        let (port, _log) = serve(handler, None).await;
        let err = image_size(
            &format!("127.0.0.1:{port}/app:1"),
            Some(&credentials("u", "p")),
            &platform("linux", "amd64", None),
            SECOND,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RegistryError::Insecure { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn https_is_verified_and_an_untrusted_certificate_is_not_downgraded() {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into()),
        )
        .unwrap();
        let (body, digest) = image_manifest(&[42]);
        let handler: Handler =
            Arc::new(move |_: &Seen| Answer::new(200, OCI_MANIFEST, body.clone()));
        let (port, log) = serve(
            handler,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
        )
        .await;
        let reference = format!("localhost:{port}/app:1");
        let here = platform("linux", "amd64", None);

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let trusting = Arc::new(tls_config(roots).unwrap());
        let size = image_size_with(&reference, None, &here, SECOND, Some(trusting))
            .await
            .unwrap();
        assert_eq!(
            size,
            ImageSize {
                compressed_bytes: 1042,
                manifest_digest: digest
            }
        );

        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(other.cert.der().clone()).unwrap();
        let distrusting = Arc::new(tls_config(roots).unwrap());
        let before = log.lock().unwrap().len();
        let err = image_size_with(&reference, None, &here, SECOND, Some(distrusting))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Tls { .. }), "{err:?}");
        assert_eq!(
            log.lock().unwrap().len(),
            before,
            "nothing was sent without TLS"
        );
    }
}
