//! [`RegistryError`]: every way asking a registry for an image's size can fail, each naming
//! the registry and what to check.

use std::time::Duration;

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
