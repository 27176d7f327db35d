//! Records the target triple: 32-bit ARM's variant (v5, v6, v7) is only known from it, as
//! rustc exposes no stable `cfg` for ARM architecture levels.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=OUTPOST_BUILD_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
