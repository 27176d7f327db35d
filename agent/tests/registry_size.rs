//! `runtime::registry::image_size` against a real distribution registry (Debian's
//! `docker-registry`, basic auth with htpasswd) holding images pushed by the real Docker engine:
//! the size it reports is what the registry stores, an index made by `docker manifest`
//! resolves to the device's platform, and refusals name what to fix.
//!
//! Needs the Docker engine, `docker-registry` and `htpasswd` (scripts/setup installs the last
//! two); a missing one fails the test with what to install.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_agent::manifest::{RegistryCredentials, Secret};
use outpost_agent::runtime::registry::{ImageSize, Platform, RegistryError, image_size};

const TIMEOUT: Duration = Duration::from_secs(10);

fn require(tool: &str, hint: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("`{tool}` is required by this test and is not installed: {hint} (scripts/setup)")
        })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A registry on a free loopback port with one htpasswd user, and a Docker client config
/// logged in to it (tests run in parallel: none of them touches `~/.docker`).
struct Registry {
    addr: String,
    root: tempfile::TempDir,
    docker_config: PathBuf,
    username: String,
    password: String,
    child: Child,
}

impl Registry {
    fn start() -> Registry {
        require("docker", "apt-get install docker.io");
        let engine = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            engine,
            "the Docker engine does not answer on /var/run/docker.sock; this test needs it"
        );
        let bin = require("docker-registry", "apt-get install docker-registry");
        require("htpasswd", "apt-get install apache2-utils");
        let root = tempfile::tempdir().expect("temp dir");
        let username = "edge".to_string();
        let password = format!("pw-{}-registry-size", std::process::id());
        let htpasswd = run(Command::new("htpasswd").args(["-Bbn", &username, &password]));
        std::fs::write(root.path().join("htpasswd"), htpasswd).expect("write htpasswd");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = root.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n\
                 http:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: outpost-test\n    path: {root}/htpasswd\n",
                root = root.path().display()
            ),
        )
        .expect("write registry config");
        let log = std::fs::File::create(root.path().join("registry.log")).expect("log file");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let docker_config = root.path().join("docker-config");
        std::fs::create_dir_all(&docker_config).expect("docker config dir");
        let registry = Registry {
            addr,
            root,
            docker_config,
            username,
            password,
            child,
        };
        let mut login = registry
            .docker()
            .args([
                "login",
                "-u",
                &registry.username,
                "--password-stdin",
                &registry.addr,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker login");
        {
            use std::io::Write as _;
            let mut stdin = login.stdin.take().expect("stdin");
            stdin
                .write_all(registry.password.as_bytes())
                .expect("password");
        }
        let out = login.wait_with_output().expect("docker login");
        assert!(
            out.status.success(),
            "docker login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        registry
    }

    fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_CONFIG", &self.docker_config);
        cmd
    }

    fn credentials(&self, password: &str) -> RegistryCredentials {
        RegistryCredentials {
            username: self.username.clone(),
            password: Secret::new(password),
        }
    }

    /// Builds a FROM-scratch image holding `bytes` random bytes as `REGISTRY/repo:tag`, pushes
    /// it and removes it from the engine.
    fn push_image(&self, repo: &str, tag: &str, bytes: usize) -> String {
        let reference = format!("{}/{repo}:{tag}", self.addr);
        let ctx = tempfile::tempdir().expect("build context");
        let mut data = vec![0u8; bytes];
        getrandom::fill(&mut data).expect("random bytes");
        std::fs::write(ctx.path().join("data.bin"), &data).expect("write data");
        std::fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY data.bin /data.bin\n",
        )
        .expect("write Dockerfile");
        run(Command::new("docker")
            .args(["build", "-q", "-t", &reference])
            .arg(ctx.path()));
        run(self.docker().args(["push", "-q", &reference]));
        let _ = Command::new("docker")
            .args(["rmi", "-f", &reference])
            .output();
        reference
    }

    fn storage(&self) -> PathBuf {
        self.root.path().join("data/docker/registry/v2")
    }

    /// What the registry stores for a repository holding one image: the sum of the sizes of
    /// the blob files its layer links point to (config included), read from its storage.
    fn stored_blob_bytes(&self, repo: &str) -> u64 {
        let layers = self
            .storage()
            .join("repositories")
            .join(repo)
            .join("_layers/sha256");
        std::fs::read_dir(&layers)
            .unwrap_or_else(|e| panic!("{}: {e}", layers.display()))
            .map(|entry| {
                let hex = entry.expect("dir entry").file_name();
                let hex = hex.to_str().expect("hex name");
                let data = self
                    .storage()
                    .join("blobs/sha256")
                    .join(&hex[..2])
                    .join(hex)
                    .join("data");
                std::fs::metadata(&data)
                    .unwrap_or_else(|e| panic!("{}: {e}", data.display()))
                    .len()
            })
            .sum()
    }

    /// The manifest digest the registry has for `repo:tag`, from its storage.
    fn stored_tag_digest(&self, repo: &str, tag: &str) -> String {
        let link = self
            .storage()
            .join("repositories")
            .join(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("current/link");
        std::fs::read_to_string(&link)
            .unwrap_or_else(|e| panic!("{}: {e}", link.display()))
            .trim()
            .to_string()
    }

    /// Config plus layer sizes as `docker manifest inspect` reads them.
    fn inspected_bytes(&self, reference: &str) -> u64 {
        let out = run(self
            .docker()
            .args(["manifest", "inspect", "--insecure", reference]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("manifest JSON");
        let layers: u64 = v["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["size"].as_u64().expect("layer size"))
            .sum();
        v["config"]["size"].as_u64().expect("config size") + layers
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn linux(architecture: &str, variant: Option<&str>) -> Platform {
    Platform {
        os: "linux".into(),
        architecture: architecture.into(),
        variant: variant.map(str::to_string),
    }
}

#[tokio::test]
async fn the_size_is_what_the_registry_stores() {
    let registry = Registry::start();
    // Random data does not compress: the layer is a little over the file.
    let file_bytes = 1_500_000;
    let reference = registry.push_image("sized", "1", file_bytes);
    let credentials = registry.credentials(&registry.password);
    let size = image_size(
        &reference,
        Some(&credentials),
        &Platform::of_this_build(),
        TIMEOUT,
    )
    .await
    .expect("image size");

    assert_eq!(
        size,
        ImageSize {
            compressed_bytes: registry.stored_blob_bytes("sized"),
            manifest_digest: registry.stored_tag_digest("sized", "1"),
        }
    );
    assert_eq!(size.compressed_bytes, registry.inspected_bytes(&reference));
    assert!(
        (file_bytes as u64..file_bytes as u64 + 16 * 1024).contains(&size.compressed_bytes),
        "{} bytes for a file of {file_bytes}",
        size.compressed_bytes
    );

    // By digest as well, and the digest is checked against the content.
    let pinned = format!("{}/sized@{}", registry.addr, size.manifest_digest);
    let again = image_size(
        &pinned,
        Some(&credentials),
        &Platform::of_this_build(),
        TIMEOUT,
    )
    .await
    .expect("image size by digest");
    assert_eq!(again, size);
}

#[tokio::test]
async fn an_index_made_by_docker_resolves_to_the_platform() {
    let registry = Registry::start();
    let small = registry.push_image("multi", "amd64", 300_000);
    let large = registry.push_image("multi", "armv7", 900_000);
    let list = format!("{}/multi:1", registry.addr);
    run(registry
        .docker()
        .args(["manifest", "create", "--insecure", &list, &small, &large]));
    run(registry.docker().args([
        "manifest",
        "annotate",
        "--os",
        "linux",
        "--arch",
        "arm",
        "--variant",
        "v7",
        &list,
        &large,
    ]));
    run(registry
        .docker()
        .args(["manifest", "push", "--insecure", &list]));

    let credentials = registry.credentials(&registry.password);
    let for_platform = |p: Platform| {
        let (list, credentials) = (list.clone(), credentials.clone());
        async move { image_size(&list, Some(&credentials), &p, TIMEOUT).await }
    };
    let amd64 = for_platform(linux("amd64", None)).await.expect("amd64");
    let arm = for_platform(linux("arm", Some("v7")))
        .await
        .expect("arm/v7");
    assert_eq!(amd64.compressed_bytes, registry.inspected_bytes(&small));
    assert_eq!(
        amd64.manifest_digest,
        registry.stored_tag_digest("multi", "amd64")
    );
    assert_eq!(arm.compressed_bytes, registry.inspected_bytes(&large));
    assert_eq!(
        arm.manifest_digest,
        registry.stored_tag_digest("multi", "armv7")
    );

    let err = for_platform(linux("arm64", None)).await.unwrap_err();
    assert!(matches!(err, RegistryError::NoPlatform { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("linux/arm64") && message.contains("offers: linux/amd64, linux/arm/v7"),
        "{message}"
    );
}

#[tokio::test]
async fn refusals_name_the_credentials_and_the_tag() {
    let registry = Registry::start();
    let reference = registry.push_image("refusals", "1", 10_000);
    let here = Platform::of_this_build();

    let wrong = registry.credentials("not-the-password");
    let err = image_size(&reference, Some(&wrong), &here, TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::CredentialsRefused { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&registry.addr)
            && message.contains("user `edge`")
            && message.contains("password")
            && message.contains("registries"),
        "{message}"
    );
    assert!(!message.contains("not-the-password"), "{message}");
    assert!(!format!("{err:?}").contains("not-the-password"));

    let err = image_size(&reference, None, &here, TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::CredentialsRequired { .. }),
        "{err:?}"
    );

    let credentials = registry.credentials(&registry.password);
    let missing = format!("{}/refusals:2.0-missing", registry.addr);
    let err = image_size(&missing, Some(&credentials), &here, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("tag `2.0-missing`") && message.contains("check the tag"),
        "{message}"
    );
    assert!(!message.contains(&registry.password), "{message}");

    // Nothing listens: a connection error naming the address, well within the timeout.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = image_size(&format!("{closed}/app:1"), None, &here, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&closed.to_string()), "{err}");
}
