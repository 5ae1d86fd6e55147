//! The local OCI registry: Debian's docker-registry serving the test images that
//! `integration/testbed/build-images.sh` built, inside the cluster network namespace.
//!
//! Two instances share nothing but the image cache: an anonymous one on port 5000 and one that
//! demands credentials ([`USER`]/[`PASSWORD`]) on port 5001. Both serve their storage read-only,
//! so tests can never alter the cached images. Node namespaces pull from
//! `10.213.0.1:5000`/`:5001`; the root namespace through loopback forwarders.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::forward::Forward;
use crate::netns::{CLUSTER_GATEWAY, ClusterNet};
use crate::process::Daemon;
use crate::{Error, Result, paths};

/// User name accepted by the protected registry.
pub const USER: &str = "strake";
/// Password accepted by the protected registry.
pub const PASSWORD: &str = "strake-test-password";
/// Port of the anonymous registry in the cluster namespace.
pub const OPEN_PORT: u16 = 5000;
/// Port of the registry that requires credentials.
pub const PROTECTED_PORT: u16 = 5001;
/// Port of a [`ScratchRegistry`] (images built during a test) in the cluster namespace.
pub const SCRATCH_PORT: u16 = 5003;

/// Registries critest pulls from. The open registry holds local equivalents of those images
/// under the same repository paths (`integration/testbed/README.md`), so a runtime that mirrors
/// these registries to it runs critest offline.
pub const CRITEST_REGISTRIES: &[&str] = &["registry.k8s.io", "k8s.gcr.io", "gcr.io"];

/// strake-runtime's `--registry-mirror` flags that send pulls from [`CRITEST_REGISTRIES`] to
/// the open registry (plain HTTP) as nodes see it.
pub fn critest_mirror_flags() -> Vec<String> {
    CRITEST_REGISTRIES
        .iter()
        .map(|r| format!("--registry-mirror={r}=http://{CLUSTER_GATEWAY}:{OPEN_PORT}"))
        .collect()
}

/// One test image as listed in `images.txt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestImage {
    /// Whether it is served only with credentials.
    pub protected: bool,
    /// `repository:tag`, e.g. `strake/busybox:1`.
    pub name: String,
    /// Digest of its manifest or index.
    pub digest: String,
    /// Media type of that manifest or index.
    pub media_type: String,
}

/// The images the test bed built, from `images.txt`.
pub fn test_images() -> Result<Vec<TestImage>> {
    let path = paths::images_dir()?.join("images.txt");
    let text = std::fs::read_to_string(&path).map_err(crate::io_err("read", &path))?;
    Ok(parse_images(&text))
}

fn parse_images(text: &str) -> Vec<TestImage> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let registry = f.next()?;
            Some(TestImage {
                protected: registry == "protected",
                name: f.next()?.to_string(),
                digest: f.next()?.to_string(),
                media_type: f.next()?.to_string(),
            })
        })
        .collect()
}

/// The two running registries. Dropping this stops them.
#[derive(Debug)]
pub struct Registry {
    open_fwd: Forward,
    protected_fwd: Forward,
    _daemons: Vec<Daemon>,
}

impl Registry {
    /// Starts both registries inside `net`'s namespace, writing configs and logs under `dir`,
    /// and waits until they answer.
    pub fn start(net: &ClusterNet, dir: &Path) -> Result<Self> {
        let images = paths::images_dir()?;
        let exe = PathBuf::from("/usr/bin/docker-registry");
        if !exe.exists() {
            return Err(Error::MissingBinary { path: exe });
        }
        std::fs::create_dir_all(dir).map_err(crate::io_err("create", dir))?;
        let mut daemons = Vec::new();
        for (name, port, auth) in [
            ("open", OPEN_PORT, None),
            ("protected", PROTECTED_PORT, Some(images.join("htpasswd"))),
        ] {
            let config = dir.join(format!("registry-{name}.yml"));
            let text = config_yaml(&images.join(name), port, auth.as_deref());
            std::fs::write(&config, text).map_err(crate::io_err("write", &config))?;
            let mut cmd = net.ns().command(&exe);
            cmd.arg("serve").arg(&config);
            daemons.push(Daemon::spawn(
                &format!("registry-{name}"),
                cmd,
                &dir.join(format!("registry-{name}.log")),
            )?);
        }
        let target = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let open_fwd = Forward::start(
            net.ns(),
            target(OPEN_PORT),
            &dir.join("forward-registry-open.log"),
        )?;
        let protected_fwd = Forward::start(
            net.ns(),
            target(PROTECTED_PORT),
            &dir.join("forward-registry-protected.log"),
        )?;
        let reg = Registry {
            open_fwd,
            protected_fwd,
            _daemons: daemons,
        };
        reg.wait_ready(Duration::from_secs(30))?;
        Ok(reg)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for (addr, want) in [(self.open_local(), 200), (self.protected_local(), 401)] {
            loop {
                let last_error = match http_status(addr, "/v2/") {
                    Ok(status) if status == want => break,
                    Ok(status) => format!("status {status}"),
                    Err(e) => e.to_string(),
                };
                if Instant::now() > deadline {
                    return Err(Error::Timeout {
                        what: format!("registry at {addr}"),
                        secs: timeout.as_secs(),
                        last_error,
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// The anonymous registry, from the root namespace.
    pub fn open_local(&self) -> SocketAddr {
        self.open_fwd.local_addr()
    }

    /// The registry that needs credentials, from the root namespace.
    pub fn protected_local(&self) -> SocketAddr {
        self.protected_fwd.local_addr()
    }

    /// The anonymous registry as nodes see it (`10.213.0.1:5000`).
    pub fn open_in_cluster(&self) -> SocketAddr {
        SocketAddr::from((CLUSTER_GATEWAY, OPEN_PORT))
    }

    /// The registry that needs credentials, as nodes see it (`10.213.0.1:5001`).
    pub fn protected_in_cluster(&self) -> SocketAddr {
        SocketAddr::from((CLUSTER_GATEWAY, PROTECTED_PORT))
    }
}

/// A writable registry for images a test builds itself (the strake-proxy image of the
/// DaemonSet), on [`SCRATCH_PORT`] in the cluster namespace, its storage under the test's own
/// directory: pushed to from the root namespace through a loopback forwarder, pulled from by
/// nodes at `10.213.0.1:5003` (plain HTTP).
pub struct ScratchRegistry {
    fwd: Forward,
    _daemon: Daemon,
}

impl ScratchRegistry {
    /// Starts it with storage in `dir/storage`.
    pub fn start(net: &ClusterNet, dir: &Path) -> Result<Self> {
        let exe = PathBuf::from("/usr/bin/docker-registry");
        if !exe.exists() {
            return Err(Error::MissingBinary { path: exe });
        }
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).map_err(crate::io_err("create", &storage))?;
        let config = dir.join("registry-scratch.yml");
        let text = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 0.0.0.0:{SCRATCH_PORT}\n  secret: strake-testbed\n",
            storage.display()
        );
        std::fs::write(&config, text).map_err(crate::io_err("write", &config))?;
        let mut cmd = net.ns().command(&exe);
        cmd.arg("serve").arg(&config);
        let daemon = Daemon::spawn("registry-scratch", cmd, &dir.join("registry-scratch.log"))?;
        let fwd = Forward::start(
            net.ns(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, SCRATCH_PORT)),
            &dir.join("forward-registry-scratch.log"),
        )?;
        let reg = ScratchRegistry {
            fwd,
            _daemon: daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http_status(reg.local(), "/v2/") {
                Ok(200) => return Ok(reg),
                other if Instant::now() > deadline => {
                    return Err(Error::Timeout {
                        what: format!("scratch registry at {}", reg.local()),
                        secs: 30,
                        last_error: format!("{other:?}"),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// From the root namespace (loopback), for pushing.
    pub fn local(&self) -> SocketAddr {
        self.fwd.local_addr()
    }

    /// As nodes see it (`10.213.0.1:5003`).
    pub fn in_cluster(&self) -> SocketAddr {
        SocketAddr::from((CLUSTER_GATEWAY, SCRATCH_PORT))
    }
}

fn config_yaml(root: &Path, port: u16, htpasswd: Option<&Path>) -> String {
    let auth = htpasswd
        .map(|p| {
            format!(
                "auth:\n  htpasswd:\n    realm: strake-testbed\n    path: {}\n",
                p.display()
            )
        })
        .unwrap_or_default();
    // Read-only storage: the image cache is shared by every suite and must never change.
    format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: true\n  delete:\n    enabled: false\nhttp:\n  addr: 0.0.0.0:{port}\n  secret: strake-testbed\n{auth}",
        root = root.display()
    )
}

/// The status code of a plain HTTP/1.0 GET (enough to probe readiness without a client crate).
pub fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_txt_lines_parse() {
        let text = "open strake/busybox:1 sha256:ab application/vnd.oci.image.manifest.v1+json\n\
                    protected strake/protected:1 sha256:cd application/vnd.oci.image.manifest.v1+json\n\n";
        let images = parse_images(text);
        assert_eq!(images.len(), 2);
        assert!(!images[0].protected);
        assert!(images[1].protected);
        assert_eq!(images[1].name, "strake/protected:1");
        assert_eq!(images[0].digest, "sha256:ab");
    }

    #[test]
    fn critest_registries_are_mirrored_to_the_open_registry() {
        assert_eq!(
            critest_mirror_flags(),
            [
                "--registry-mirror=registry.k8s.io=http://10.213.0.1:5000",
                "--registry-mirror=k8s.gcr.io=http://10.213.0.1:5000",
                "--registry-mirror=gcr.io=http://10.213.0.1:5000",
            ]
        );
    }

    #[test]
    fn protected_config_has_auth_and_is_read_only() {
        let yaml = config_yaml(Path::new("/x/open"), 5001, Some(Path::new("/x/htpasswd")));
        assert!(yaml.contains("addr: 0.0.0.0:5001"));
        assert!(yaml.contains("path: /x/htpasswd"));
        assert!(yaml.contains("readonly:\n      enabled: true"));
        assert!(!config_yaml(Path::new("/x"), 5000, None).contains("htpasswd"));
    }
}
