//! The signing round trip through the real `outpost-ctl` binary: keys, sign, verify, and each kind
//! of tampering refused with its own message.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use serde_json::Value;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../manifests/examples/line-3-vision.json"
);

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-ctl"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ops", "other"] {
            let out = ctl(&["keys", "generate", "--out", p(&dir.path().join(name))]);
            assert!(out.status.success(), "{out:?}");
        }
        let f = Fixture { dir };
        let out = ctl(&[
            "manifest",
            "sign",
            EXAMPLE,
            "--key",
            p(&f.path("ops.key")),
            "--out",
            p(&f.path("signed.json")),
        ]);
        assert!(out.status.success(), "{out:?}");
        f
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    fn envelope(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.path("signed.json")).unwrap()).unwrap()
    }
    /// Verifies `envelope` against the `ops` key; returns the exit code and the output.
    fn verify(&self, envelope: &Value) -> (i32, String) {
        let file = self.path("candidate.json");
        std::fs::write(&file, envelope.to_string()).unwrap();
        let out = ctl(&[
            "manifest",
            "verify",
            p(&file),
            "--trusted-key",
            p(&self.path("ops.pub")),
        ]);
        (out.status.code().unwrap(), stdout(&out))
    }
}

#[test]
fn sign_then_verify_round_trips() {
    let f = Fixture::new();
    let (code, out) = f.verify(&f.envelope());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verified, signed by key"), "{out}");
    assert!(out.contains("line-3-vision v7 is valid"), "{out}");
    // The private key is owner-only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(f.path("ops.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn a_tampered_payload_is_refused() {
    let f = Fixture::new();
    let mut env = f.envelope();
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = b64.decode(env["payload"].as_str().unwrap()).unwrap();
    let tampered = String::from_utf8(payload)
        .unwrap()
        .replace("\"version\": 7", "\"version\": 8");
    env["payload"] = Value::String(b64.encode(tampered));
    let (code, out) = f.verify(&env);
    assert_eq!(code, 1);
    assert!(out.contains("does not match the payload"), "{out}");
}

#[test]
fn an_unknown_key_is_refused() {
    let f = Fixture::new();
    let out = ctl(&[
        "manifest",
        "sign",
        EXAMPLE,
        "--key",
        p(&f.path("other.key")),
    ]);
    let env: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (code, out) = f.verify(&env);
    assert_eq!(code, 1);
    assert!(out.contains("signed only by unknown key(s)"), "{out}");
}

#[test]
fn a_wrong_payload_type_is_refused() {
    let f = Fixture::new();
    let mut env = f.envelope();
    env["payloadType"] = Value::String("application/vnd.in-toto+json".into());
    let (code, out) = f.verify(&env);
    assert_eq!(code, 1);
    assert!(
        out.contains("payloadType is `application/vnd.in-toto+json`"),
        "{out}"
    );
}

#[test]
fn bad_base64_is_refused() {
    let f = Fixture::new();
    let mut env = f.envelope();
    env["payload"] = Value::String("*not base64*".into());
    let (code, out) = f.verify(&env);
    assert_eq!(code, 1);
    assert!(
        out.contains("/payload: /payload is not valid base64"),
        "{out}"
    );
}

#[test]
fn an_unsigned_manifest_is_refused_where_keys_are_trusted() {
    let f = Fixture::new();
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(EXAMPLE).unwrap()).unwrap();
    let (code, out) = f.verify(&manifest);
    assert_eq!(code, 1);
    assert!(out.contains("accepts only signed deployments"), "{out}");
}

#[test]
fn an_invalid_manifest_is_not_signed() {
    let f = Fixture::new();
    let bad = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/invalid/13-image-without-tag.json"
    );
    let out = ctl(&["manifest", "sign", bad, "--key", p(&f.path("ops.key"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("/modules/app/image"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn validate_opens_a_signed_envelope() {
    let f = Fixture::new();
    let out = ctl(&["manifest", "validate", p(&f.path("signed.json"))]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("ok (line-3-vision v7"));
}
