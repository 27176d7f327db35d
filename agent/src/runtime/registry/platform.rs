//! Which entry of a multi-platform index runs on a platform (variants ordered as containerd
//! orders them). The platform itself is the core's.

use super::manifest::{Descriptor, DescriptorPlatform};

pub use outpost_core::platform::Platform;

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
pub(super) fn select_platform<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::registry::manifest::{OCI_INDEX, OCI_MANIFEST, Parsed, parse_manifest};

    fn platform(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant: variant.map(str::to_string),
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
    }
}
