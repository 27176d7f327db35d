//! Platforms in the names registries and Docker use (Go's `GOOS`/`GOARCH`, plus the ARM
//! variant: `linux/arm/v7`): which one this build is, which one the engine runs, what a
//! manifest may pin, and whether an image is for a platform.

use std::fmt;

use crate::container::go_arch;

/// Architectures a module may pin, in Go's names.
pub const ARCHITECTURES: &[&str] = &[
    "amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// `v7` for 32-bit ARM; `None` means any variant (the baseline preferred).
    pub variant: Option<String>,
}

/// The ARM level of a 32-bit ARM target triple, as Docker names it: `armv7-...` and
/// `thumbv7neon-...` are `v7`, `arm-...` (the Raspberry Pi 1's ARMv6) and `armv6-...` are
/// `v6`, `armv5te-...` is `v5`.
fn arm_variant(triple: &str) -> &'static str {
    let arch = triple.split('-').next().unwrap_or_default();
    if arch.starts_with("armv7") || arch.starts_with("thumbv7") {
        "v7"
    } else if arch.starts_with("armv5") {
        "v5"
    } else {
        "v6"
    }
}

impl Platform {
    /// The platform this binary was built for: `linux/amd64`, `linux/arm64`, `linux/arm/v7`
    /// (`v6`/`v5` for older ARM builds).
    pub fn of_this_build() -> Platform {
        let variant = cfg!(target_arch = "arm").then(|| arm_variant(env!("OUTPOST_BUILD_TARGET")));
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: go_arch().to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// The platform of the engine that runs the modules, from what it reports (`docker
    /// version`'s `Os`/`Arch`). The engine is the judge, not this build: an agent for one
    /// architecture may drive an engine on another (an emulated agent, a 32-bit agent on a
    /// 64-bit kernel). Engines do not report ARM variants; this build's is used when the
    /// architectures agree.
    pub fn of_engine(os: &str, architecture: &str) -> Platform {
        let here = Platform::of_this_build();
        if architecture.is_empty() {
            return here;
        }
        let variant = (architecture == here.architecture)
            .then_some(here.variant)
            .flatten();
        Platform {
            os: if os.is_empty() { "linux" } else { os }.to_string(),
            architecture: architecture.to_string(),
            variant,
        }
    }

    /// Parses `os/arch[/variant]` as a manifest pins it; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let (os, architecture, variant) = match parts[..] {
            [os, arch] => (os, arch, None),
            [os, arch, variant] => (os, arch, Some(variant)),
            _ => {
                return Err(format!(
                    "platform `{s}` is not `os/architecture` or `os/architecture/variant`, such as `linux/arm64` or `linux/arm/v7`"
                ));
            }
        };
        if os != "linux" {
            return Err(format!(
                "platform `{s}`: modules run on Linux; the operating system must be `linux`"
            ));
        }
        if !ARCHITECTURES.contains(&architecture) {
            return Err(format!(
                "platform `{s}`: architecture `{architecture}` is not one of {} (Go's names: `amd64`, not `x86_64`)",
                ARCHITECTURES.join(", ")
            ));
        }
        if let Some(v) = variant
            && !is_variant(v)
        {
            return Err(format!(
                "platform `{s}`: variant `{v}` is not `v` and a number, such as `v7` or `v8`"
            ));
        }
        Ok(Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        })
    }

    /// Whether an image built for `os/architecture/variant` runs here. The variant only
    /// matters when both name a level: a `v7` CPU runs `v6` code, not the other way round.
    pub fn runs(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if architecture != self.architecture || (!os.is_empty() && os != self.os) {
            return false;
        }
        match (level(self.variant.as_deref()), level(variant)) {
            (Some(wanted), Some(have)) => have <= wanted,
            _ => true,
        }
    }
}

fn is_variant(v: &str) -> bool {
    v.strip_prefix('v').is_some_and(|n| {
        !n.is_empty() && n.len() <= 8 && n.chars().all(|c| c.is_ascii_digit() || c == '.')
    })
}

/// `v7` → 7; `v8.2` → 8.
fn level(variant: Option<&str>) -> Option<u32> {
    variant?.strip_prefix('v')?.split('.').next()?.parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_variants_come_from_the_target_triple() {
        assert_eq!(arm_variant("armv7-unknown-linux-gnueabihf"), "v7");
        assert_eq!(arm_variant("thumbv7neon-unknown-linux-gnueabihf"), "v7");
        assert_eq!(arm_variant("arm-unknown-linux-gnueabihf"), "v6");
        assert_eq!(arm_variant("armv5te-unknown-linux-gnueabi"), "v5");
    }

    #[test]
    fn parses_what_docker_names() {
        for s in [
            "linux/amd64",
            "linux/arm64",
            "linux/arm/v7",
            "linux/arm64/v8",
        ] {
            assert_eq!(Platform::parse(s).unwrap().to_string(), s);
        }
        let e = |s: &str| Platform::parse(s).unwrap_err();
        assert!(e("linux").contains("os/architecture"));
        assert!(e("linux/arm/v7/x").contains("os/architecture"));
        assert!(e("windows/amd64").contains("must be `linux`"));
        assert!(e("linux/x86_64").contains("not `x86_64`"));
        assert!(e("linux/arm/7").contains("variant `7`"));
        assert!(e("linux/arm/v").contains("variant `v`"));
    }

    #[test]
    fn an_image_runs_on_its_platform_and_older_variants_on_newer_cpus() {
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        assert!(v7.runs("linux", "arm", Some("v7")));
        assert!(v7.runs("linux", "arm", Some("v6")));
        assert!(v7.runs("linux", "arm", None));
        assert!(!v7.runs("linux", "arm", Some("v8")));
        assert!(!v7.runs("linux", "arm64", None));
        let amd64 = Platform::parse("linux/amd64").unwrap();
        assert!(amd64.runs("", "amd64", None), "an engine that omits the OS");
        assert!(!amd64.runs("windows", "amd64", None));
    }

    #[test]
    fn the_engine_decides_the_architecture() {
        let here = Platform::of_this_build();
        assert_eq!(Platform::of_engine("", ""), here);
        let other = if here.architecture == "amd64" {
            "arm64"
        } else {
            "amd64"
        };
        let p = Platform::of_engine("linux", other);
        assert_eq!((p.architecture.as_str(), p.variant), (other, None));
        assert_eq!(
            Platform::of_engine("linux", &here.architecture).variant,
            here.variant
        );
    }
}
