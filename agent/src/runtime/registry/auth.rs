//! Docker's registry authentication: `WWW-Authenticate` challenges (parsed without failing),
//! `Basic` with the deployment's credentials, and `Bearer` tokens from the registry's token
//! service, without ever logging or returning a password or token.

use std::collections::BTreeMap;

use base64::Engine as _;
use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderValue};
use serde::Deserialize;
use url::Url;

use super::session::Session;
use super::transport::authority;
use super::{MAX_TOKEN_BYTES, RegistryError};
use crate::manifest::RegistryCredentials;

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

pub(super) fn basic_auth(credentials: &RegistryCredentials) -> HeaderValue {
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

impl Session<'_> {
    /// The error for a `401` after authenticating (or with nothing to authenticate with).
    pub(super) fn refused(&self) -> RegistryError {
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
    pub(super) async fn authenticate(&mut self, headers: &HeaderMap) -> Result<(), RegistryError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
