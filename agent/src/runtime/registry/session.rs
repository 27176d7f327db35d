//! One call's session with a registry: where its API is, the manifest requests (resolving an
//! index to this device's platform and checking content against its digest), and what an
//! error answer says.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::StatusCode;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use serde::Deserialize;
use sha2::Digest as _;
use tracing::debug;
use url::Url;

use super::manifest::{ACCEPT, Parsed, compressed_size, digest_like, parse_manifest, valid_digest};
use super::platform::select_platform;
use super::transport::Reply;
use super::{ImageSize, MAX_INDEX_DEPTH, MAX_MANIFEST_BYTES, Platform, RegistryError};
use crate::manifest::{ImageRef, RegistryCredentials};

/// Where Docker Hub's registry API is; `docker.io` is only its name.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// One call's worth of connections and authentication.
pub(super) struct Session<'a> {
    /// As the reference names it, for messages.
    pub(super) registry: String,
    /// `https://host[:port]` of the registry API.
    pub(super) base: Url,
    /// The repository path on the registry (`library/` added for Docker Hub's official images).
    pub(super) repository: String,
    pub(super) credentials: Option<&'a RegistryCredentials>,
    /// `Authorization` once the registry asked for it.
    pub(super) auth: Option<HeaderValue>,
    pub(super) authenticated: bool,
    /// Open connections by `scheme://host:port`, reused for the index, the manifest and tokens.
    pub(super) connections: HashMap<String, http1::SendRequest<Empty<Bytes>>>,
    /// Loopback `host:port`s found not to speak TLS.
    pub(super) plain: HashSet<String>,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    /// Connection tasks end by then even if a peer stalls.
    pub(super) deadline: tokio::time::Instant,
}

impl<'a> Session<'a> {
    pub(super) fn new(
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

    pub(super) async fn size(
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

    /// What an error answer says, shortened, without control characters or the password.
    pub(super) fn detail(&self, body: &[u8]) -> String {
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
}
