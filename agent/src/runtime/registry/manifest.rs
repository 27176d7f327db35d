//! Manifests and indexes (pure): the media types accepted, reading a manifest document, the
//! compressed size of an image manifest, and the digests that pin content.

use serde::Deserialize;
use sha2::Digest as _;

pub(super) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(super) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, \
                      application/vnd.docker.distribution.manifest.v2+json, \
                      application/vnd.oci.image.manifest.v1+json";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Descriptor {
    #[serde(default)]
    pub(super) media_type: Option<String>,
    pub(super) digest: String,
    pub(super) size: u64,
    #[serde(default)]
    pub(super) platform: Option<DescriptorPlatform>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct DescriptorPlatform {
    pub(super) os: String,
    pub(super) architecture: String,
    #[serde(default)]
    pub(super) variant: Option<String>,
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
pub(super) enum Parsed {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Reads a manifest by its `Content-Type` (the registry's word), falling back to the
/// document's own `mediaType` and then its shape for registries that answer `application/json`.
pub(super) fn parse_manifest(content_type: Option<&str>, body: &[u8]) -> Result<Parsed, String> {
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
pub(super) fn compressed_size(config: &Descriptor, layers: &[Descriptor]) -> Option<u64> {
    layers
        .iter()
        .try_fold(config.size, |sum, layer| sum.checked_add(layer.size))
}

/// `algorithm:encoded` as OCI allows, so that an index entry can go into a URL path.
pub(super) fn valid_digest(digest: &str) -> bool {
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
pub(super) fn digest_like(digest: &str, body: &[u8]) -> Option<String> {
    match digest.split_once(':')?.0 {
        "sha256" => Some(format!("sha256:{:x}", sha2::Sha256::digest(body))),
        "sha512" => Some(format!("sha512:{:x}", sha2::Sha512::digest(body))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
