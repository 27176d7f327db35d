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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;
use url::{Host, Url};

use crate::manifest::{ImageRef, RegistryCredentials};

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
/// Where Docker Hub's registry API is; `docker.io` is only its name.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, \
                      application/vnd.docker.distribution.manifest.v2+json, \
                      application/vnd.oci.image.manifest.v1+json";

/// A platform in the names registries and Docker use (Go's `GOOS`/`GOARCH`, and the ARM
/// variant: `linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// `v7` for 32-bit ARM devices; `None` means any variant (the baseline preferred).
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this agent was built for, which is the device's: `linux/amd64`,
    /// `linux/arm64`, `linux/arm/v7` (`v6`/`v5` for older ARM builds).
    pub fn of_this_device() -> Platform {
        let variant = if cfg!(target_arch = "arm") {
            Some(if cfg!(target_feature = "v7") {
                "v7"
            } else if cfg!(target_feature = "v6") {
                "v6"
            } else {
                "v5"
            })
        } else {
            None
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: super::go_arch().to_string(),
            variant: variant.map(str::to_string),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

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

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("image reference `{reference}` is not valid: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error(
        "cannot connect to registry {registry} at {address}: {source}; check the registry's \
         address and the device's network"
    )]
    Connect {
        registry: String,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "TLS with registry {registry} at {address} failed: {detail}; registries are verified \
         with the system's root certificates"
    )]
    Tls {
        registry: String,
        address: String,
        detail: String,
    },
    #[error("HTTP with registry {registry} failed: {detail}")]
    Http { registry: String, detail: String },
    #[error(
        "registry {registry} did not answer within {after:?}; check the device's network and \
         the registry"
    )]
    Timeout { registry: String, after: Duration },
    #[error(
        "registry {registry} requires credentials for `{repository}`: add an entry for \
         {registry} to the deployment's `registries` (registries also answer this for a \
         repository that does not exist: check its name)"
    )]
    CredentialsRequired {
        registry: String,
        repository: String,
    },
    #[error(
        "registry {registry} refused the credentials of user `{username}`: check the username \
         and password of {registry} in the deployment's `registries`"
    )]
    CredentialsRefused { registry: String, username: String },
    #[error(
        "registry {registry} denied {who} access to `{repository}`: check that the user may \
         pull it",
        who = .username.as_deref().map_or_else(|| "anonymous".to_string(), |u| format!("user `{u}`"))
    )]
    Denied {
        registry: String,
        repository: String,
        username: Option<String>,
    },
    #[error(
        "image {image}: {what} not found in registry {registry} ({detail}); check the {kind}",
        kind = if .what.starts_with("digest") { "digest" } else { "tag" }
    )]
    NotFound {
        registry: String,
        image: String,
        /// "tag `1.0`" or "digest `sha256:…`".
        what: String,
        detail: String,
    },
    #[error(
        "image {image} has no manifest for platform {wanted}; it offers: {}",
        if .offered.is_empty() { "none".to_string() } else { .offered.join(", ") }
    )]
    NoPlatform {
        image: String,
        wanted: String,
        offered: Vec<String>,
    },
    #[error("registry {registry} sent a manifest over {limit} bytes for image {image}: refused")]
    TooLarge {
        registry: String,
        image: String,
        limit: usize,
    },
    #[error("registry {registry} sent an unusable manifest for image {image}: {reason}")]
    BadManifest {
        registry: String,
        image: String,
        reason: String,
    },
    #[error("registry {registry} answered {status} to {what}: {detail}")]
    Status {
        registry: String,
        what: String,
        status: u16,
        detail: String,
    },
    #[error("the token service {realm} of registry {registry}: {reason}")]
    Token {
        registry: String,
        realm: String,
        reason: String,
    },
    #[error(
        "registry {registry} asks for authentication this agent does not speak ({schemes}); \
         only Basic and Bearer are supported"
    )]
    UnsupportedAuth { registry: String, schemes: String },
    #[error(
        "registry {registry}: plain HTTP to {url} is refused; only loopback addresses may be \
         used without TLS"
    )]
    Insecure { registry: String, url: String },
    #[error("no root certificates found on this device: cannot verify registry {registry}")]
    NoSystemRoots { registry: String },
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

// ---------------------------------------------------------------------------------------------
// Manifests and platforms (pure).

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<DescriptorPlatform>,
}

#[derive(Debug, Clone, Deserialize)]
struct DescriptorPlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// What a manifest document turned out to be.
#[derive(Debug)]
enum Parsed {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Reads a manifest by its `Content-Type` (the registry's word), falling back to the
/// document's own `mediaType` and then its shape for registries that answer `application/json`.
fn parse_manifest(content_type: Option<&str>, body: &[u8]) -> Result<Parsed, String> {
    let doc: Document = serde_json::from_slice(body).map_err(|e| format!("not a manifest: {e}"))?;
    let header = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|c| c.starts_with("application/vnd."));
    let media = header.or_else(|| doc.media_type.clone());
    if doc.schema_version == Some(1)
        || media
            .as_deref()
            .is_some_and(|m| m.starts_with("application/vnd.docker.distribution.manifest.v1"))
    {
        return Err(
            "it is a schema 1 manifest, which has no layer sizes; push the image again with a \
             current client"
                .into(),
        );
    }
    let index = match media.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(DOCKER_MANIFEST | OCI_MANIFEST) => false,
        Some(other) if other.starts_with("application/vnd.") => {
            return Err(format!(
                "media type `{other}` is not an image manifest or index"
            ));
        }
        _ => doc.manifests.is_some(),
    };
    if index {
        return doc
            .manifests
            .map(Parsed::Index)
            .ok_or_else(|| "an index without `manifests`".into());
    }
    match (doc.config, doc.layers) {
        (Some(config), Some(layers)) => Ok(Parsed::Image { config, layers }),
        _ => Err("an image manifest without `config` or `layers`".into()),
    }
}

/// Config plus layers; `None` on an overflow (a manifest lying about sizes).
fn compressed_size(config: &Descriptor, layers: &[Descriptor]) -> Option<u64> {
    layers
        .iter()
        .try_fold(config.size, |sum, layer| sum.checked_add(layer.size))
}

/// A variant as containerd compares them: `vN` levels are ordered (a `v7` CPU runs `v6` and
/// `v5` code), and a missing variant is the architecture's baseline.
#[derive(Debug, PartialEq, Eq)]
enum Variant {
    Level(u32),
    Other(String),
}

fn variant_of(architecture: &str, variant: Option<&str>) -> Variant {
    match variant {
        Some(v) => match v.strip_prefix('v').and_then(|n| n.parse().ok()) {
            Some(level) => Variant::Level(level),
            None => Variant::Other(v.to_string()),
        },
        None => Variant::Level(match architecture {
            "arm" => 7,
            "arm64" => 8,
            "amd64" => 1,
            _ => 0,
        }),
    }
}

/// How well `offered` fits `wanted`: `None` when it does not run there, else lower is better.
fn platform_rank(wanted: &Platform, offered: &DescriptorPlatform) -> Option<u32> {
    if offered.os != wanted.os || offered.architecture != wanted.architecture {
        return None;
    }
    let arch = wanted.architecture.as_str();
    let have = variant_of(arch, offered.variant.as_deref());
    match &wanted.variant {
        // Any variant; the baseline first, as Docker would pull on an unknown CPU.
        None => Some(u32::from(have != variant_of(arch, None))),
        Some(w) => match (variant_of(arch, Some(w)), have) {
            (Variant::Level(w), Variant::Level(h)) if h <= w => Some(w - h),
            (Variant::Other(w), Variant::Other(h)) if w == h => Some(0),
            _ => None,
        },
    }
}

fn describe(p: &DescriptorPlatform) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

/// The index entry to pull on `wanted`, or the platforms the index offers (attestations and
/// entries without a platform left out).
fn select_platform<'a>(
    entries: &'a [Descriptor],
    wanted: &Platform,
) -> Result<&'a Descriptor, Vec<String>> {
    entries
        .iter()
        .filter_map(|e| Some((platform_rank(wanted, e.platform.as_ref()?)?, e)))
        // The first of the best: `min_by_key` keeps the first of equals.
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, e)| e)
        .ok_or_else(|| {
            entries
                .iter()
                .filter_map(|e| e.platform.as_ref())
                .filter(|p| p.os != "unknown")
                .map(describe)
                .collect()
        })
}

/// `algorithm:encoded` as OCI allows, so that an index entry can go into a URL path.
fn valid_digest(digest: &str) -> bool {
    let Some((algorithm, encoded)) = digest.split_once(':') else {
        return false;
    };
    !algorithm.is_empty()
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
        && !encoded.is_empty()
        && encoded.len() <= 256
        && encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b))
}

/// The digest of `body` in `digest`'s algorithm; `None` for an algorithm this agent cannot
/// compute (the content is then taken as it is).
fn digest_like(digest: &str, body: &[u8]) -> Option<String> {
    match digest.split_once(':')?.0 {
        "sha256" => Some(format!("sha256:{:x}", sha2::Sha256::digest(body))),
        "sha512" => Some(format!("sha512:{:x}", sha2::Sha512::digest(body))),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// `WWW-Authenticate` (pure).

#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    /// Lowercase: `basic`, `bearer`.
    scheme: String,
    /// Parameter names lowercase.
    params: BTreeMap<String, String>,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses a `WWW-Authenticate` value (RFC 7235): one or more challenges, each a scheme and
/// comma-separated `name=value` parameters, values as tokens or quoted strings. Anything
/// malformed is skipped; it never fails (the header comes from the network).
fn parse_challenges(value: &str) -> Vec<Challenge> {
    let s = value.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let token = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && is_tchar(s[*i]) {
            *i += 1;
        }
        String::from_utf8_lossy(&s[start..*i]).into_owned()
    };
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t') {
            *i += 1;
        }
    };
    while i < s.len() {
        if matches!(s[i], b' ' | b'\t' | b',') {
            i += 1;
            continue;
        }
        let name = token(&mut i);
        if name.is_empty() {
            i += 1; // not a token character: skip it
            continue;
        }
        skip_ws(&mut i);
        let is_param = s.get(i) == Some(&b'=');
        match out.last_mut() {
            Some(current) if is_param => {
                i += 1;
                if matches!(s.get(i), None | Some(b'=' | b',')) {
                    // A token68 (`Negotiate abc==`): not parameters; skip its padding.
                    while i < s.len() && s[i] == b'=' {
                        i += 1;
                    }
                    continue;
                }
                skip_ws(&mut i);
                let value = if s.get(i) == Some(&b'"') {
                    i += 1;
                    let mut v = Vec::new();
                    while i < s.len() && s[i] != b'"' {
                        if s[i] == b'\\' && i + 1 < s.len() {
                            i += 1;
                        }
                        v.push(s[i]);
                        i += 1;
                    }
                    i += 1; // the closing quote (or past the end)
                    String::from_utf8_lossy(&v).into_owned()
                } else {
                    token(&mut i)
                };
                current.params.insert(name.to_ascii_lowercase(), value);
            }
            _ => {
                // A token68 after a scheme (`Negotiate abc==`) reads as a parameter without a
                // value and is ignored; a new name starts a new challenge.
                if is_param {
                    while i < s.len() && s[i] == b'=' {
                        i += 1;
                    }
                    continue;
                }
                out.push(Challenge {
                    scheme: name.to_ascii_lowercase(),
                    params: BTreeMap::new(),
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The client.

/// An answer, its body read up to a bound.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// False when the body was longer than the bound (and was not read to the end).
    complete: bool,
}

/// One call's worth of connections and authentication.
struct Session<'a> {
    /// As the reference names it, for messages.
    registry: String,
    /// `https://host[:port]` of the registry API.
    base: Url,
    /// The repository path on the registry (`library/` added for Docker Hub's official images).
    repository: String,
    credentials: Option<&'a RegistryCredentials>,
    /// `Authorization` once the registry asked for it.
    auth: Option<HeaderValue>,
    authenticated: bool,
    /// Open connections by `scheme://host:port`, reused for the index, the manifest and tokens.
    connections: HashMap<String, http1::SendRequest<Empty<Bytes>>>,
    /// Loopback `host:port`s found not to speak TLS.
    plain: HashSet<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Connection tasks end by then even if a peer stalls.
    deadline: tokio::time::Instant,
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
fn tls_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, String> {
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
fn authority(url: &Url) -> String {
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

fn basic_auth(credentials: &RegistryCredentials) -> HeaderValue {
    let pair = format!("{}:{}", credentials.username, credentials.password.expose());
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    // Base64 is always a valid header value.
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

impl<'a> Session<'a> {
    fn new(
        image: &ImageRef,
        credentials: Option<&'a RegistryCredentials>,
        tls: Option<Arc<rustls::ClientConfig>>,
        deadline: tokio::time::Instant,
    ) -> Result<Session<'a>, RegistryError> {
        let hub = matches!(
            image.registry.as_str(),
            "docker.io" | "index.docker.io" | DOCKER_HUB_API
        );
        let (host, repository) = if hub {
            let repository = if image.repository.contains('/') {
                image.repository.clone()
            } else {
                format!("library/{}", image.repository)
            };
            (DOCKER_HUB_API, repository)
        } else {
            (image.registry.as_str(), image.repository.clone())
        };
        let base = Url::parse(&format!("https://{host}/")).map_err(|e| {
            RegistryError::InvalidReference {
                reference: image.to_string(),
                reason: format!("registry `{host}`: {e}"),
            }
        })?;
        Ok(Session {
            registry: image.registry.clone(),
            base,
            repository,
            credentials,
            auth: None,
            authenticated: false,
            connections: HashMap::new(),
            plain: HashSet::new(),
            tls,
            deadline,
        })
    }

    async fn size(
        &mut self,
        image: &ImageRef,
        platform: &Platform,
    ) -> Result<ImageSize, RegistryError> {
        // A digest pins the content; a tag is only where to start.
        let (mut reference, mut expected) = match (&image.digest, &image.tag) {
            (Some(d), _) => (d.clone(), Some(d.clone())),
            (None, Some(t)) => (t.clone(), None),
            (None, None) => {
                return Err(RegistryError::InvalidReference {
                    reference: image.to_string(),
                    reason: "no tag or digest".into(),
                });
            }
        };
        let registry = self.registry.clone();
        let bad = |reason: String| RegistryError::BadManifest {
            registry: registry.clone(),
            image: image.to_string(),
            reason,
        };
        for _ in 0..MAX_INDEX_DEPTH {
            let reply = self.manifest(image, &reference).await?;
            let content_type = reply
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            let digest = match &expected {
                Some(want) => match digest_like(want, &reply.body) {
                    Some(got) if &got != want => {
                        return Err(bad(format!(
                            "its content is {got}, not the {want} asked for"
                        )));
                    }
                    _ => want.clone(),
                },
                None => format!("sha256:{:x}", sha2::Sha256::digest(&reply.body)),
            };
            match parse_manifest(content_type, &reply.body).map_err(&bad)? {
                Parsed::Image { config, layers } => {
                    let compressed_bytes = compressed_size(&config, &layers)
                        .ok_or_else(|| bad("its sizes add up to more than 2^64 bytes".into()))?;
                    debug!(
                        registry = %self.registry,
                        repository = %self.repository,
                        digest = %digest,
                        layers = layers.len(),
                        compressed_bytes,
                        "image size from the registry"
                    );
                    return Ok(ImageSize {
                        compressed_bytes,
                        manifest_digest: digest,
                    });
                }
                Parsed::Index(entries) => {
                    let entry = select_platform(&entries, platform).map_err(|offered| {
                        RegistryError::NoPlatform {
                            image: image.to_string(),
                            wanted: platform.to_string(),
                            offered,
                        }
                    })?;
                    if !valid_digest(&entry.digest) {
                        return Err(bad(format!("index entry digest `{}`", entry.digest)));
                    }
                    debug!(
                        registry = %self.registry,
                        platform = %platform,
                        digest = %entry.digest,
                        media_type = entry.media_type.as_deref().unwrap_or(""),
                        "index resolved to the platform's manifest"
                    );
                    reference = entry.digest.clone();
                    expected = Some(entry.digest.clone());
                }
            }
        }
        Err(bad(format!("indexes nested deeper than {MAX_INDEX_DEPTH}")))
    }

    /// The manifest `reference` (tag or digest), authenticating when the registry asks.
    async fn manifest(
        &mut self,
        image: &ImageRef,
        reference: &str,
    ) -> Result<Reply, RegistryError> {
        let mut url = self.base.clone();
        url.set_path(&format!("/v2/{}/manifests/{reference}", self.repository));
        debug!(registry = %self.registry, repository = %self.repository, reference, "asking for the manifest");
        let mut reply = self
            .get(&url, Some(ACCEPT), self.auth.clone(), MAX_MANIFEST_BYTES)
            .await?;
        if reply.status == StatusCode::UNAUTHORIZED && !self.authenticated {
            self.authenticate(&reply.headers).await?;
            reply = self
                .get(&url, Some(ACCEPT), self.auth.clone(), MAX_MANIFEST_BYTES)
                .await?;
        }
        match reply.status {
            StatusCode::OK if !reply.complete => Err(RegistryError::TooLarge {
                registry: self.registry.clone(),
                image: image.to_string(),
                limit: MAX_MANIFEST_BYTES,
            }),
            StatusCode::OK => Ok(reply),
            StatusCode::UNAUTHORIZED => Err(self.refused()),
            StatusCode::FORBIDDEN => Err(RegistryError::Denied {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                username: self.credentials.map(|c| c.username.clone()),
            }),
            StatusCode::NOT_FOUND => Err(RegistryError::NotFound {
                registry: self.registry.clone(),
                image: image.to_string(),
                what: if reference.contains(':') {
                    format!("digest `{reference}`")
                } else {
                    format!("tag `{reference}`")
                },
                detail: self.detail(&reply.body),
            }),
            status => Err(RegistryError::Status {
                registry: self.registry.clone(),
                what: format!("the manifest {reference}"),
                status: status.as_u16(),
                detail: self.detail(&reply.body),
            }),
        }
    }

    /// The error for a `401` after authenticating (or with nothing to authenticate with).
    fn refused(&self) -> RegistryError {
        match self.credentials {
            Some(c) => RegistryError::CredentialsRefused {
                registry: self.registry.clone(),
                username: c.username.clone(),
            },
            None => RegistryError::CredentialsRequired {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
            },
        }
    }

    /// Answers the registry's challenge: a bearer token from its token service, or basic auth.
    async fn authenticate(&mut self, headers: &HeaderMap) -> Result<(), RegistryError> {
        self.authenticated = true;
        let challenges: Vec<Challenge> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let token = self.token(bearer).await?;
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                RegistryError::Token {
                    registry: self.registry.clone(),
                    realm: bearer.params.get("realm").cloned().unwrap_or_default(),
                    reason: "the token is not a valid header value".into(),
                }
            })?;
            value.set_sensitive(true);
            self.auth = Some(value);
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let credentials = self.credentials.ok_or_else(|| self.refused())?;
            self.auth = Some(basic_auth(credentials));
            return Ok(());
        }
        Err(RegistryError::UnsupportedAuth {
            registry: self.registry.clone(),
            schemes: if challenges.is_empty() {
                "no challenge".into()
            } else {
                challenges
                    .iter()
                    .map(|c| c.scheme.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    /// A pull token for the repository from the challenge's realm, with the credentials (when
    /// there are any) as basic auth.
    async fn token(&mut self, challenge: &Challenge) -> Result<String, RegistryError> {
        let registry = self.registry.clone();
        let token_error = |realm: &str, reason: String| RegistryError::Token {
            registry: registry.clone(),
            realm: realm.to_string(),
            reason,
        };
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| token_error("", "the registry's challenge names no realm".into()))?;
        let mut url = Url::parse(realm)
            .map_err(|e| token_error(realm, format!("the realm is not a URL: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
            return Err(token_error(realm, "the realm is not an http(s) URL".into()));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.params.get("service") {
                query.append_pair("service", service);
            }
            // Only what this call needs, whatever the challenge offered.
            query.append_pair("scope", &format!("repository:{}:pull", self.repository));
        }
        let auth = self.credentials.map(basic_auth);
        let reply = self.get(&url, None, auth, MAX_TOKEN_BYTES).await?;
        let realm_shown = format!("{}://{}{}", url.scheme(), authority(&url), url.path());
        match reply.status {
            StatusCode::OK if reply.complete => {
                let answer: TokenAnswer = serde_json::from_slice(&reply.body).map_err(|e| {
                    token_error(&realm_shown, format!("its answer is not JSON: {e}"))
                })?;
                answer
                    .token
                    .filter(|t| !t.is_empty())
                    .or(answer.access_token.filter(|t| !t.is_empty()))
                    .ok_or_else(|| token_error(&realm_shown, "its answer holds no token".into()))
            }
            StatusCode::OK => Err(token_error(
                &realm_shown,
                format!("its answer is over {MAX_TOKEN_BYTES} bytes"),
            )),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(self.refused()),
            status => Err(token_error(
                &realm_shown,
                format!("answered {status}: {}", self.detail(&reply.body)),
            )),
        }
    }

    /// What an error answer says, shortened, without control characters or the password.
    fn detail(&self, body: &[u8]) -> String {
        #[derive(Deserialize)]
        struct Errors {
            errors: Vec<ErrorEntry>,
        }
        #[derive(Deserialize)]
        struct ErrorEntry {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        let text = match serde_json::from_slice::<Errors>(body) {
            Ok(e) if !e.errors.is_empty() => e
                .errors
                .iter()
                .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
                .collect::<Vec<_>>()
                .join("; "),
            _ => String::from_utf8_lossy(body).trim().to_string(),
        };
        let mut text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(300)
            .collect();
        if let Some(c) = self.credentials {
            let password = c.password.expose();
            if !password.is_empty() {
                text = text.replace(password, "<redacted>");
            }
        }
        if text.is_empty() {
            "no details".into()
        } else {
            text
        }
    }

    /// GET `url`, reading at most `limit` bytes of the body.
    async fn get(
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

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn challenges_are_read_as_registries_send_them() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            [
                ("realm", "https://auth.docker.io/token"),
                ("scope", "repository:library/alpine:pull"),
                ("service", "registry.docker.io"),
            ]
        );

        let c = parse_challenges(r#"Basic realm="outpost-test""#);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(params(&c[0]), [("realm", "outpost-test")]);

        // Two challenges in one value; commas inside quoted values; token values; odd spacing.
        let c = parse_challenges(
            r#"Basic realm="a, b" , BEARER Realm = "https://x/token",scope="repository:a/b:pull,push",service=reg"#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(params(&c[0]), [("realm", "a, b")]);
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(
            params(&c[1]),
            [
                ("realm", "https://x/token"),
                ("scope", "repository:a/b:pull,push"),
                ("service", "reg"),
            ]
        );

        // Escapes in quoted strings; a token68 scheme before a known one.
        let c = parse_challenges(r#"Negotiate abc==, Bearer realm="q\"uoted\\""#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "negotiate");
        assert!(c[0].params.is_empty());
        assert_eq!(params(&c[1]), [("realm", r#"q"uoted\"#)]);

        assert!(parse_challenges("").is_empty());
        // Unterminated quotes and stray separators are survived.
        let c = parse_challenges(r#",,Bearer realm="https://x/tok"#);
        assert_eq!(params(&c[0]), [("realm", "https://x/tok")]);
        let _ = parse_challenges("=== ,\"\"\" realm=\\");
    }

    proptest::proptest! {
        #[test]
        fn challenge_parsing_never_panics(value in "[A-Za-z0-9 ,=\"\\\\:/._\t-]{0,80}") {
            let _ = parse_challenges(&value);
        }

        #[test]
        fn challenge_parsing_never_panics_on_any_text(value in ".{0,80}") {
            let _ = parse_challenges(&value);
        }
    }

    fn index(entries: &[(&str, &str, Option<&str>, &str)]) -> Vec<Descriptor> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, variant, digest)| {
                let mut p = serde_json::json!({ "os": os, "architecture": arch });
                if let Some(v) = variant {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": OCI_MANIFEST, "digest": digest, "size": 500, "platform": p,
                })
            })
            .collect();
        let body = serde_json::json!({ "schemaVersion": 2, "manifests": manifests }).to_string();
        match parse_manifest(Some(OCI_INDEX), body.as_bytes()).unwrap() {
            Parsed::Index(entries) => entries,
            other => panic!("not an index: {other:?}"),
        }
    }

    #[test]
    fn an_index_resolves_to_the_devices_platform() {
        let entries = index(&[
            ("linux", "amd64", None, "sha256:a"),
            ("linux", "arm", Some("v6"), "sha256:b"),
            ("linux", "arm", Some("v7"), "sha256:c"),
            ("linux", "arm64", Some("v8"), "sha256:d"),
            ("unknown", "unknown", None, "sha256:e"),
            ("windows", "amd64", None, "sha256:f"),
        ]);
        let pick = |p: &Platform| select_platform(&entries, p).map(|e| e.digest.clone());
        assert_eq!(pick(&platform("linux", "amd64", None)).unwrap(), "sha256:a");
        assert_eq!(
            pick(&platform("linux", "arm", Some("v7"))).unwrap(),
            "sha256:c"
        );
        assert_eq!(
            pick(&platform("linux", "arm", Some("v6"))).unwrap(),
            "sha256:b"
        );
        // arm64 without a variant is arm64/v8.
        assert_eq!(pick(&platform("linux", "arm64", None)).unwrap(), "sha256:d");
        assert_eq!(
            pick(&platform("linux", "arm64", Some("v8"))).unwrap(),
            "sha256:d"
        );
        assert_eq!(
            pick(&platform("windows", "amd64", None)).unwrap(),
            "sha256:f"
        );
        // A v5 device cannot run v6 or v7 code; the error lists what is offered, without the
        // attestation entry.
        let offered = pick(&platform("linux", "arm", Some("v5"))).unwrap_err();
        assert_eq!(
            offered,
            [
                "linux/amd64",
                "linux/arm/v6",
                "linux/arm/v7",
                "linux/arm64/v8",
                "windows/amd64"
            ]
        );
        assert!(pick(&platform("linux", "riscv64", None)).is_err());

        // A v7 device falls back to the newest older variant; an unspecified one prefers the
        // baseline; an arm64 entry without a variant serves a v8 device.
        let older = index(&[
            ("linux", "arm", Some("v5"), "sha256:v5"),
            ("linux", "arm", Some("v6"), "sha256:v6"),
            ("linux", "amd64", Some("v3"), "sha256:v3"),
            ("linux", "amd64", None, "sha256:v1"),
            ("linux", "arm64", None, "sha256:arm64"),
        ]);
        let pick = |p: &Platform| select_platform(&older, p).map(|e| e.digest.clone());
        assert_eq!(
            pick(&platform("linux", "arm", Some("v7"))).unwrap(),
            "sha256:v6"
        );
        assert_eq!(
            pick(&platform("linux", "amd64", None)).unwrap(),
            "sha256:v1"
        );
        assert_eq!(
            pick(&platform("linux", "amd64", Some("v2"))).unwrap(),
            "sha256:v1"
        );
        assert_eq!(
            pick(&platform("linux", "amd64", Some("v3"))).unwrap(),
            "sha256:v3"
        );
        assert_eq!(
            pick(&platform("linux", "arm64", Some("v8"))).unwrap(),
            "sha256:arm64"
        );

        // This machine: the tests run on x86_64.
        let here = Platform::of_this_device();
        assert_eq!(here.os, "linux");
        assert_eq!(here.architecture, crate::runtime::go_arch());
        assert_eq!(here.variant, None);
    }

    #[test]
    fn the_size_is_the_config_plus_every_layer() {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": { "mediaType": "application/vnd.docker.container.image.v1+json", "size": 1469, "digest": "sha256:c" },
            "layers": [
                { "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 2_814_446, "digest": "sha256:l1" },
                { "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 100, "digest": "sha256:l2" },
            ],
        })
        .to_string();
        let Parsed::Image { config, layers } =
            parse_manifest(Some(DOCKER_MANIFEST), manifest.as_bytes()).unwrap()
        else {
            panic!("not an image manifest");
        };
        assert_eq!(
            compressed_size(&config, &layers),
            Some(1469 + 2_814_446 + 100)
        );
        // A registry answering `application/json`: the document's own media type decides.
        assert!(matches!(
            parse_manifest(Some("application/json; charset=utf-8"), manifest.as_bytes()),
            Ok(Parsed::Image { .. })
        ));
        // An OCI manifest without a media type anywhere: its shape decides.
        let oci = r#"{"schemaVersion":2,"config":{"digest":"sha256:c","size":7},"layers":[]}"#;
        let Parsed::Image { config, layers } = parse_manifest(None, oci.as_bytes()).unwrap() else {
            panic!("not an image manifest");
        };
        assert_eq!(compressed_size(&config, &layers), Some(7));

        let huge = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"sha256:c","size":{}}},"layers":[{{"digest":"sha256:l","size":2}}]}}"#,
            u64::MAX
        );
        let Parsed::Image { config, layers } = parse_manifest(None, huge.as_bytes()).unwrap()
        else {
            panic!("not an image manifest");
        };
        assert_eq!(compressed_size(&config, &layers), None);

        let negative =
            r#"{"schemaVersion":2,"config":{"digest":"sha256:c","size":-1},"layers":[]}"#;
        assert!(parse_manifest(Some(OCI_MANIFEST), negative.as_bytes()).is_err());
        let schema1 = r#"{"schemaVersion":1,"name":"a","tag":"1","fsLayers":[]}"#;
        assert!(
            parse_manifest(
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
                schema1.as_bytes()
            )
            .unwrap_err()
            .contains("schema 1")
        );
        assert!(parse_manifest(Some(OCI_INDEX), oci.as_bytes()).is_err());
        assert!(
            parse_manifest(
                Some("application/vnd.oci.artifact.manifest.v1+json"),
                oci.as_bytes()
            )
            .is_err()
        );
        assert!(parse_manifest(None, b"<html>").is_err());
    }

    #[test]
    fn only_well_formed_digests_go_into_a_url() {
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        for bad in [
            "sha256",
            "sha256:",
            ":abc",
            "sha256:../../x",
            "sha256:a/b",
            "SHA256:ab",
        ] {
            assert!(!valid_digest(bad), "{bad}");
        }
    }

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
