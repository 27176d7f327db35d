//! Container image references: `[registry[:port]/]repository[:tag][@sha256:digest]`, following
//! the grammar of the distribution project, with one rule stricter than Docker's: a tag or a
//! digest is required, because an implicit `latest` makes a deployment mean different things on
//! different days.

use std::fmt;

/// Registry used when a reference names none (Docker Hub).
pub const DEFAULT_REGISTRY: &str = "docker.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Host and optional port; [`DEFAULT_REGISTRY`] when the reference named none.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses a reference. The error is a sentence saying what is wrong with it.
    pub fn parse(reference: &str) -> Result<ImageRef, String> {
        if reference.is_empty() {
            return Err("image reference is empty".into());
        }
        if reference.len() > 512 {
            return Err("image reference is longer than 512 characters".into());
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest)?;
                (rest, Some(digest.to_string()))
            }
            None => (reference, None),
        };
        // A ':' after the last '/' starts the tag; before it, it is a registry port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                check_tag(tag)?;
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if tag.is_none() && digest.is_none() {
            return Err(format!(
                "image `{reference}` has no tag or digest; name one (`{reference}:1.0` or \
                 `{reference}@sha256:...`) so that every device runs the same image"
            ));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                check_registry(first)?;
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        check_repository(&repository)?;
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn check_digest(digest: &str) -> Result<(), String> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return Err(format!("digest `{digest}` must start with `sha256:`"));
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "digest `{digest}` must be `sha256:` followed by 64 lowercase hex digits"
        ));
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag `{tag}` is not valid: up to 128 letters, digits, `_`, `.` and `-`, not starting \
             with `.` or `-`"
        ))
    }
}

fn check_registry(registry: &str) -> Result<(), String> {
    let (host, port) = match registry.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (registry, None),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !host_ok {
        return Err(format!(
            "registry host `{host}` is not a valid host name or address"
        ));
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!(
            "registry port `{port}` is not a port number (1-65535)"
        ));
    }
    Ok(())
}

fn check_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("image reference names no repository".into());
    }
    if repository.len() > 255 {
        return Err("repository name is longer than 255 characters".into());
    }
    for component in repository.split('/') {
        if !valid_component(component) {
            return Err(format!(
                "repository component `{component}` is not valid: use lowercase letters and \
                 digits, separated by single `.`, `_`, `__` or dashes"
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__`, or any number of `-`.
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_usual_forms() {
        let r = ImageRef::parse("127.0.0.1:5000/outpost-infer:0.1.0").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "outpost-infer");
        assert_eq!(r.tag.as_deref(), Some("0.1.0"));
        let r = ImageRef::parse("library/alpine:3.19").unwrap();
        assert_eq!(r.registry, DEFAULT_REGISTRY);
        let d = format!("ghcr.io/a/b@sha256:{}", "a".repeat(64));
        assert_eq!(ImageRef::parse(&d).unwrap().digest.unwrap().len(), 71);
        assert!(ImageRef::parse("localhost/my__app:v1").is_ok());
        assert!(ImageRef::parse("reg.example.com:443/a-b/c.d:latest").is_ok());
    }

    #[test]
    fn refuses_what_docker_would_refuse_and_untagged_images() {
        for bad in [
            "",
            "Outpost:1",
            "reg:5000/app",
            "app",
            "app:",
            "app:-x",
            "app@sha256:1234",
            "app@md5:abc",
            "reg:99999/app:1",
            "a//b:1",
            "a/.b:1",
            "-reg.com/app:1",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn displays_with_the_registry() {
        let r = ImageRef::parse("alpine:3").unwrap();
        assert_eq!(r.to_string(), "docker.io/alpine:3");
    }
}
