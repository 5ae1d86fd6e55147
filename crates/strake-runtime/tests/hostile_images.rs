//! strake-runtime against images and registries that attack it, through the real CRI server
//! (the daemon as a child process, driven by upstream's crictl) and a registry written here
//! that serves crafted images: an entry flood, a decompression bomb, a registry that trickles a
//! byte at a time, and an image with a setuid-root binary. Needs root and `make testbed`
//! (crictl, busybox-static, runc).
//!
//! The daemon and the registry live in a network namespace of their own (the registry's socket
//! is made there from a short-lived thread), with host-network pods: no CNI, no traffic
//! anywhere but that namespace's loopback.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use strake_integration::cgroup::CgroupParent;
use strake_integration::containerd::unmount_below;
use strake_integration::netns::NetNs;
use strake_integration::paths;
use strake_integration::process::{Daemon, pid_alive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// One gzip layer and the digest of its tar (the diffID).
struct Layer {
    gz: Vec<u8>,
    diff_id: String,
}

/// A tar stream hashed as it is written and gzipped on the fly, so that big layers never sit
/// in memory uncompressed.
struct Tee {
    hasher: sha2::Sha256,
    gz: flate2::write::GzEncoder<Vec<u8>>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.gz.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.gz.flush()
    }
}

fn layer(build: impl FnOnce(&mut tar::Builder<Tee>)) -> Layer {
    let mut b = tar::Builder::new(Tee {
        hasher: sha2::Sha256::new(),
        gz: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
    });
    build(&mut b);
    let tee = b.into_inner().expect("tar");
    Layer {
        diff_id: format!("sha256:{}", hex::encode(tee.hasher.finalize())),
        gz: tee.gz.finish().expect("gzip"),
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// busybox-static as `bin/busybox`, with `bin/sh` and `bin/sleep` linked to it, and the same
/// binary setuid root as `bin/suid` when asked.
fn busybox_layer(suid: bool) -> Layer {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    layer(|b| {
        for dir in ["bin", "tmp"] {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut h, dir, &[][..]).expect("dir");
        }
        let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
        b.append_data(&mut h, "bin/busybox", &busybox[..])
            .expect("busybox");
        for name in ["sh", "sleep", "cp", "chmod", "ls", "id", "cat"] {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, format!("bin/{name}"), "busybox")
                .expect("link");
        }
        if suid {
            let mut h = header(tar::EntryType::Regular, 0o4755, busybox.len() as u64);
            b.append_data(&mut h, "bin/suid", &busybox[..])
                .expect("suid");
        }
    })
}

/// `chains * depth` directories, each chain `depth` levels deep (`c<n>/d/d/...`): the shape
/// of the issue's 300k-entry, 60-level layer, scaled down.
fn flood_layer(chains: usize, depth: usize) -> Layer {
    layer(|b| {
        for c in 0..chains {
            let mut path = format!("c{c}");
            for d in 0..depth {
                if d > 0 {
                    path.push_str("/d");
                }
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, &path, &[][..]).expect("dir");
            }
        }
    })
}

/// `mib` MiB of zeros in one file, as concatenated gzip members (each a few hundred bytes),
/// which the runtime's decoder reads as one stream. The diffID is deliberately not the
/// stream's: the unpack must stop at the size limit long before it could check it.
fn zero_bomb(mib: u64) -> Layer {
    let member = |data: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).expect("gzip");
        gz.finish().expect("gzip")
    };
    let mut h = header(tar::EntryType::Regular, 0o644, mib << 20);
    h.set_path("zeros").expect("path");
    h.set_cksum();
    let mut gz = member(h.as_bytes());
    let one = member(&vec![0u8; 1 << 20]);
    for _ in 0..mib {
        gz.extend_from_slice(&one);
    }
    gz.extend_from_slice(&member(&[0u8; 1024]));
    Layer {
        gz,
        diff_id: sha256(b"never checked"),
    }
}

/// An image as the registry serves it.
struct Image {
    name: String,
    manifest: Vec<u8>,
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
}

fn image(name: &str, layers: Vec<Layer>, cmd: &[&str]) -> Image {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len() },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": GZIP_LAYER, "digest": sha256(&l.gz), "size": l.gz.len(),
        })).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes();
    Image {
        name: name.to_string(),
        manifest,
        config,
        layers: layers.into_iter().map(|l| l.gz).collect(),
    }
}

/// What the registry answers at a path, and how it sends the body.
struct Blob {
    content_type: &'static str,
    body: Arc<Vec<u8>>,
    trickle: bool,
    /// Announce the whole body's length, send only this many bytes, and hang up.
    truncate: Option<usize>,
}

/// A plain-HTTP registry on the runtime's loopback.
struct Registry {
    addr: std::net::SocketAddr,
    /// Connections currently trickling a body.
    trickling: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Registry {
    /// Serves `images`; the layers of those named in `trickle` come a byte at a time.
    fn start(ns: &NetNs, images: &[Image], trickle: &[&str]) -> Registry {
        Self::start_tampered(ns, images, trickle, |_| {})
    }

    /// Like [`Registry::start`], with `tamper` changing what is served at some paths first.
    fn start_tampered(
        ns: &NetNs,
        images: &[Image],
        trickle: &[&str],
        tamper: impl FnOnce(&mut HashMap<String, Blob>),
    ) -> Registry {
        let mut paths = HashMap::new();
        for i in images {
            let slow = trickle.contains(&i.name.as_str());
            paths.insert(
                format!("/v2/{}/manifests/1", i.name),
                Blob {
                    content_type: "application/vnd.oci.image.manifest.v1+json",
                    body: Arc::new(i.manifest.clone()),
                    trickle: false,
                    truncate: None,
                },
            );
            paths.insert(
                format!("/v2/{}/blobs/{}", i.name, sha256(&i.config)),
                Blob {
                    content_type: "application/octet-stream",
                    body: Arc::new(i.config.clone()),
                    trickle: false,
                    truncate: None,
                },
            );
            for l in &i.layers {
                paths.insert(
                    format!("/v2/{}/blobs/{}", i.name, sha256(l)),
                    Blob {
                        content_type: "application/octet-stream",
                        body: Arc::new(l.clone()),
                        trickle: slow,
                        truncate: None,
                    },
                );
            }
        }
        tamper(&mut paths);
        let listener = listen_in(ns);
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let paths = Arc::new(paths);
        let trickling = Arc::new(AtomicUsize::new(0));
        let t = trickling.clone();
        let server = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(connection(conn, paths.clone(), t.clone()));
            }
        });
        Registry {
            addr,
            trickling,
            server,
        }
    }

    fn reference(&self, name: &str) -> String {
        format!("{}/{name}:1", self.addr)
    }
}

/// A TCP listener on 127.0.0.1 of the namespace `ns`: bound from a thread that entered it
/// (a socket stays in the namespace it was made in) and ends right after.
fn listen_in(ns: &NetNs) -> std::net::TcpListener {
    let path = ns.path();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns(2) with a valid namespace descriptor, on this thread only, which
        // exits after binding.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind")
    })
    .join()
    .expect("listener thread")
}

async fn connection(
    mut conn: TcpStream,
    paths: Arc<HashMap<String, Blob>>,
    trickling: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    loop {
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 4);
                break head;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        let (status, ctype, body, trickle, truncate) = match paths.get(&path) {
            Some(b) => (
                "200 OK",
                b.content_type,
                b.body.clone(),
                b.trickle,
                b.truncate,
            ),
            None if path == "/v2/" => (
                "200 OK",
                "application/json",
                Arc::new(b"{}".to_vec()),
                false,
                None,
            ),
            None => (
                "404 Not Found",
                "application/json",
                Arc::new(br#"{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}"#.to_vec()),
                false,
                None,
            ),
        };
        let digest = if status.starts_with("200") && path != "/v2/" {
            format!("Docker-Content-Digest: {}\r\n", sha256(&body))
        } else {
            String::new()
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{digest}Content-Length: {}\r\n\r\n",
            body.len()
        );
        if conn.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if trickle {
            // A byte every 200 ms: always some progress, never done.
            trickling.fetch_add(1, Ordering::SeqCst);
            for byte in body.iter() {
                if conn.write_all(&[*byte]).await.is_err() || conn.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            trickling.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        if let Some(n) = truncate {
            let _ = conn.write_all(&body[..n.min(body.len())]).await;
            let _ = conn.flush().await;
            return;
        }
        if conn.write_all(&body).await.is_err() {
            return;
        }
    }
}

/// strake-runtime as a child process in the namespace, with its own state under a directory
/// every host user may traverse (as `/var/lib` is), so that only the daemon's own modes
/// protect what is below.
struct Runtime {
    daemon: Option<Daemon>,
    pid: u32,
    socket: PathBuf,
    dir: tempfile::TempDir,
    cgroup: CgroupParent,
}

impl Runtime {
    fn start(ns: &NetNs, registry: &Registry, config: &str) -> Runtime {
        Self::start_with(ns, registry, config, |_| {})
    }

    /// `prepare` may lay out state before the daemon starts (an upgrade from an old version).
    fn start_with(
        ns: &NetNs,
        registry: &Registry,
        config: &str,
        prepare: impl FnOnce(&Path),
    ) -> Runtime {
        let dir = tempfile::Builder::new()
            .prefix("strake-hostile-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        prepare(d);
        std::fs::write(
            d.join("runtime.toml"),
            format!("insecure_registries = [\"{}\"]\n{config}", registry.addr),
        )
        .expect("config");
        std::fs::create_dir_all(d.join("cni")).expect("cni dir");
        let socket = d.join("runtime.sock");
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_strake-runtime"));
        cmd.args([
            format!("--config={}", d.join("runtime.toml").display()),
            format!("--listen={}", socket.display()),
            format!("--state-dir={}", d.join("state").display()),
            format!("--run-dir={}", d.join("run").display()),
            format!("--cni-conf-dir={}", d.join("cni").display()),
            format!("--pause-binary={}", env!("CARGO_BIN_EXE_strake-pause")),
            "--log-level=debug".to_string(),
        ]);
        let daemon = Daemon::spawn("strake-runtime", cmd, &d.join("runtime.log")).expect("spawn");
        let rt = Runtime {
            pid: daemon.pid(),
            daemon: Some(daemon),
            socket,
            dir,
            cgroup: CgroupParent::new(),
        };
        for _ in 0..150 {
            if rt.crictl(&["version"]).is_ok() {
                return rt;
            }
            assert!(pid_alive(rt.pid), "daemon exited: {}", rt.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("strake-runtime did not serve: {}", rt.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("runtime.log")).unwrap_or_default()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn crictl_cmd(&self, timeout: &str) -> Command {
        let endpoint = format!("unix://{}", self.socket.display());
        let mut cmd = Command::new(paths::cri_tools_bin("crictl").expect("crictl"));
        cmd.args([
            "--runtime-endpoint",
            &endpoint,
            "--image-endpoint",
            &endpoint,
            "--timeout",
            timeout,
        ]);
        cmd
    }

    fn crictl(&self, args: &[&str]) -> strake_integration::Result<Output> {
        strake_integration::process::run(self.crictl_cmd("60s").args(args))
    }

    fn out(&self, args: &[&str]) -> String {
        let out = self
            .crictl(args)
            .unwrap_or_else(|e| panic!("crictl {args:?}: {e}\n{}", self.log()));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// crictl from async code, off the runtime's workers (the registry runs there).
    async fn crictl_async(&self, args: &[&str]) -> strake_integration::Result<Output> {
        let mut cmd = self.crictl_cmd("60s");
        cmd.args(args);
        tokio::task::spawn_blocking(move || strake_integration::process::run(&mut cmd))
            .await
            .expect("crictl task")
    }

    /// The daemon's peak resident memory, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    /// Entries under the image store's snapshots directory.
    fn snapshots(&self) -> Vec<String> {
        std::fs::read_dir(self.state().join("images/snapshots"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn pod_file(&self, name: &str) -> String {
        let pod = serde_json::json!({
            "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "attempt": 0 },
            "hostname": name,
            "log_directory": self.dir.path().join("logs").join(name),
            "linux": {
                "cgroup_parent": self.cgroup.name(),
                // Host network; each container its own PID namespace (pid 0 would be POD, a
                // shared one, which strake-runtime refuses).
                "security_context": { "namespace_options": { "network": 2, "pid": 1 } },
            },
        });
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, pod.to_string()).expect("pod file");
        path.to_string_lossy().into_owned()
    }

    fn container_file(&self, name: &str, image: &str, uid: i64, command: &[&str]) -> String {
        let c = serde_json::json!({
            "metadata": { "name": name },
            "image": { "image": image },
            "command": command,
            "log_path": format!("{name}.log"),
            "linux": { "security_context": { "run_as_user": { "value": uid } } },
        });
        let path = self.dir.path().join(format!("c-{name}.json"));
        std::fs::write(&path, c.to_string()).expect("container file");
        path.to_string_lossy().into_owned()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if pid_alive(self.pid) {
            let _ = self.crictl(&["rmp", "--force", "--all"]);
        }
        drop(self.daemon.take());
        unmount_below(self.dir.path());
    }
}

/// Runs a test body on its own two-thread runtime.
fn run(test: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(test);
}

/// Runs `program args` on the host as user `nobody` (no groups). The exec is a shell's, not
/// setpriv's own: setpriv still holds root's effective capabilities when it execs (they go
/// with that exec), so a path it execs is not checked as nobody's.
fn as_nobody(program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args(["/bin/busybox", "sh", "-c", "exec \"$@\"", "sh"])
        .arg(program)
        .args(args)
        .output()
        .expect("setpriv")
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn setuid_files_of_images_are_out_of_reach_of_host_users() {
    run(async {
        let ns = NetNs::create("suid").expect("netns");
        let registry = Registry::start(
            &ns,
            &[image("suid", vec![busybox_layer(true)], &["sleep", "3600"])],
            &[],
        );
        // State as an older version left it: 0755 everywhere.
        let rt = Runtime::start_with(&ns, &registry, "", |d| {
            for sub in ["state/images/snapshots", "state/containers", "run/oci"] {
                let p = d.join(sub);
                std::fs::create_dir_all(&p).expect("old state");
                for a in p.ancestors().take_while(|a| a.starts_with(d) && *a != d) {
                    std::fs::set_permissions(a, std::fs::Permissions::from_mode(0o755))
                        .expect("chmod");
                }
            }
        });
        let reference = registry.reference("suid");
        rt.out(&["pull", &reference]);
        let pod_file = rt.pod_file("suid");
        let pod = rt.out(&["runp", &pod_file]);
        // One container as root that plants a setuid copy in its upper dir, one as nobody
        // that must still reach everything of its own root filesystem.
        let root_file = rt.container_file(
            "planter",
            &reference,
            0,
            &[
                "sh",
                "-c",
                "cp /bin/busybox /planted && chmod 4755 /planted && sleep 3600",
            ],
        );
        let planter = rt.out(&["create", &pod, &root_file, &pod_file]);
        rt.out(&["start", &planter]);
        let user_file = rt.container_file("user", &reference, 65534, &["sleep", "3600"]);
        let user = rt.out(&["create", &pod, &user_file, &pod_file]);
        rt.out(&["start", &user]);
        let seen = rt.out(&[
            "exec",
            "-s",
            &user,
            "sh",
            "-c",
            "id -u; ls /bin/suid; cat /bin/busybox >/dev/null && echo readable; \
             cat /etc/hostname /etc/hosts /etc/resolv.conf >/dev/null && echo dns",
        ]);
        // Including the files the runtime writes for the pod.
        assert_eq!(
            seen, "65534\n/bin/suid\nreadable\ndns",
            "the container's own user"
        );

        let state = rt.state();
        let planted = state.join(format!("containers/{planter}/upper/planted"));
        for _ in 0..100 {
            if planted.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let snapshot = rt
            .snapshots()
            .into_iter()
            .map(|s| state.join("images/snapshots").join(s).join("fs/bin/suid"))
            .find(|p| p.exists())
            .expect("the setuid binary in a snapshot");
        let targets = [
            snapshot.clone(),
            state.join(format!("containers/{user}/bundle/rootfs/bin/suid")),
            planted.clone(),
        ];
        for target in &targets {
            assert_eq!(
                mode(target) & 0o4000,
                0o4000,
                "{} is setuid",
                target.display()
            );
            let out = as_nobody(target, &["true"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && stderr.contains("Permission denied"),
                "nobody ran {}: {:?} {stderr}; modes: {:?}",
                target.display(),
                out.status,
                target
                    .ancestors()
                    .map(|a| format!("{} {:o}", a.display(), mode(a)))
                    .collect::<Vec<_>>()
            );
        }
        // Nobody cannot list or enter any of the state below the roots either.
        for dir in [
            state.join("images"),
            state.join("images/snapshots"),
            state.join("containers"),
            rt.dir.path().join("run/oci"),
            rt.dir.path().join("run/sandboxes"),
            state.join("sandboxes"),
        ] {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
            let out = as_nobody(Path::new("/bin/busybox"), &["ls", &dir.to_string_lossy()]);
            assert!(!out.status.success(), "nobody listed {}", dir.display());
        }
        for root in [state.clone(), rt.dir.path().join("run")] {
            assert_eq!(mode(&root), 0o711, "{}", root.display());
        }
        rt.out(&["rmp", "--force", &pod]);
    });
}

#[test]
fn hostile_layers_fail_clearly_and_the_runtime_stays_bounded_and_answering() {
    run(async {
        let ns = NetNs::create("bomb").expect("netns");
        let images = [
            image("flood", vec![flood_layer(400, 60)], &["true"]),
            image("bomb", vec![zero_bomb(512)], &["true"]),
            image("good", vec![busybox_layer(false)], &["true"]),
        ];
        let registry = Registry::start(&ns, &images, &[]);
        let rt = Runtime::start(
            &ns,
            &registry,
            "image_max_entries = 5000\nimage_max_unpacked_bytes = 67108864\nimage_max_path_depth = 64\n",
        );
        for (name, want) in [
            ("flood", "exceeds the limit of 5000 entries"),
            ("bomb", "exceeds the unpacked size limit of 67108864 bytes"),
        ] {
            let err = rt
                .crictl_async(&["pull", &registry.reference(name)])
                .await
                .expect_err("hostile image pulled");
            let text = err.to_string();
            assert!(text.contains(want), "{name}: {text}");
            assert!(text.contains("FailedPrecondition"), "{name}: {text}");
            // Still answering, nothing half-unpacked left behind.
            rt.crictl_async(&["version"]).await.expect("version");
            let left = rt.snapshots();
            assert!(left.is_empty(), "{name} left {left:?}");
        }
        rt.crictl_async(&["pull", &registry.reference("good")])
            .await
            .expect("good image after the hostile ones");
        let peak = rt.peak_rss_kib();
        eprintln!("daemon peak RSS: {peak} KiB");
        assert!(peak < 256 * 1024, "daemon peak RSS {peak} KiB");
    });
}

/// A tar entry written byte for byte (the tar crate refuses `..` and absolute names, which
/// is the point here): `name`, an optional link target, a device 1:1 for device kinds.
fn raw(b: &mut tar::Builder<Tee>, kind: tar::EntryType, name: &str, link: &str, data: &[u8]) {
    let mut h = header(kind, 0o644, data.len() as u64);
    let old = h.as_old_mut();
    assert!(name.len() < old.name.len() && link.len() < old.linkname.len());
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        h.set_device_major(1).expect("major");
        h.set_device_minor(1).expect("minor");
    }
    h.set_cksum();
    b.append(&h, data).expect("append");
}

#[test]
fn a_hostile_registry_writes_nothing_outside_the_store_and_gets_clear_errors() {
    use tar::EntryType::{Char, Link, Regular, Symlink};
    run(async {
        // A host directory the images aim at, with a file to overwrite, link or white out.
        let outside = tempfile::Builder::new()
            .prefix("strake-outside-")
            .tempdir_in("/tmp")
            .expect("outside dir");
        let out = outside.path().display().to_string();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"host data").expect("victim");
        let up = format!("{}{}", "../".repeat(12), out.trim_start_matches('/'));
        let one =
            |kind, name: String, link: String| layer(move |b| raw(b, kind, &name, &link, b"pwned"));
        let two = |name: String| {
            let out = out.clone();
            layer(move |b| {
                raw(b, Symlink, "d", &out, b"");
                raw(b, Regular, &name, "", b"");
            })
        };
        let cases: Vec<(&str, Layer, &str)> = vec![
            (
                "traversal",
                one(Regular, format!("{up}/traversal"), String::new()),
                "contains '..'",
            ),
            (
                "absolute",
                one(Regular, format!("{out}/absolute"), String::new()),
                "has an absolute path",
            ),
            (
                "symlinked-dir",
                two("d/through-link".into()),
                "goes through a symlink",
            ),
            (
                "hardlink-up",
                one(Link, "h".into(), format!("{up}/victim")),
                "outside the layer",
            ),
            (
                "hardlink-absolute",
                one(Link, "h".into(), format!("{out}/victim")),
                "outside the layer",
            ),
            (
                "whiteout-up",
                one(Regular, format!("{up}/.wh.victim"), String::new()),
                "contains '..'",
            ),
            (
                "whiteout-symlink",
                two("d/.wh.victim".into()),
                "goes through a symlink",
            ),
            (
                "opaque-symlink",
                two("d/.wh..wh..opq".into()),
                "goes through a symlink",
            ),
            (
                "device",
                one(Char, "dev/mem".into(), String::new()),
                "is a device node",
            ),
        ];
        let mut images: Vec<Image> = Vec::new();
        let mut expected = Vec::new();
        for (name, l, want) in cases {
            images.push(image(name, vec![l], &["true"]));
            expected.push((name, want));
        }
        // Transport attacks on a good image: a corrupted blob under a layer's digest, a
        // body cut short, a config whose diffID the layer does not hash to.
        images.push(image(
            "digest-mismatch",
            vec![busybox_layer(false)],
            &["true"],
        ));
        expected.push(("digest-mismatch", "content hashes to"));
        // (A layer no other image here has: a blob already stored would not be fetched again.)
        images.push(image("truncated", vec![busybox_layer(true)], &["true"]));
        let mut wrong = image("diffid-mismatch", vec![busybox_layer(false)], &["true"]);
        let config = String::from_utf8(wrong.config.clone()).expect("utf8");
        let good_diff = busybox_layer(false).diff_id;
        wrong.config = config
            .replace(&good_diff, &sha256(b"another layer"))
            .into_bytes();
        let manifest = String::from_utf8(wrong.manifest.clone()).expect("utf8");
        wrong.manifest = manifest
            .replace(
                &sha256(&config.clone().into_bytes()),
                &sha256(&wrong.config),
            )
            .into_bytes();
        images.push(wrong);
        expected.push(("diffid-mismatch", "the image config says"));
        images.push(image("good", vec![busybox_layer(false)], &["true"]));
        let mismatch_path = format!("/v2/digest-mismatch/blobs/{}", sha256(&images[9].layers[0]));
        let truncated_path = format!("/v2/truncated/blobs/{}", sha256(&images[10].layers[0]));
        // Same length, one byte changed: the body arrives whole and only its digest is wrong.
        let mut corrupt = images[9].layers[0].clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        let corrupt = Arc::new(corrupt);
        let ns = NetNs::create("hostreg").expect("netns");
        let registry = Registry::start_tampered(&ns, &images, &[], |paths| {
            paths.get_mut(&mismatch_path).expect("layer path").body = corrupt;
            let cut = paths.get_mut(&truncated_path).expect("layer path");
            cut.truncate = Some(cut.body.len() / 2);
        });
        let rt = Runtime::start(&ns, &registry, "");
        for (name, want) in &expected {
            let err = rt
                .crictl_async(&["pull", &registry.reference(name)])
                .await
                .expect_err("hostile image pulled");
            let text = err.to_string();
            assert!(text.contains(want), "{name}: want {want:?} in {text}");
            rt.crictl_async(&["version"]).await.expect("version");
        }
        // A body cut short: an error that says so, whichever layer of the stack sees it first.
        let err = rt
            .crictl_async(&["pull", &registry.reference("truncated")])
            .await
            .expect_err("truncated image pulled");
        let text = err.to_string();
        assert!(
            [
                "transfer failed",
                "expected",
                "bytes, got",
                "not a valid archive"
            ]
            .iter()
            .any(|w| text.contains(w)),
            "truncated: {text}"
        );
        // Nothing was written outside the store: the host directory holds its one file,
        // unchanged, not hard-linked anywhere, and no opaque mark.
        let names: Vec<_> = std::fs::read_dir(outside.path())
            .expect("outside")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["victim"]);
        assert_eq!(std::fs::read(&victim).expect("victim"), b"host data");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&victim).expect("stat").nlink(), 1);
        let mut xattr = [0u8; 8];
        let c = std::ffi::CString::new(out.clone()).expect("path");
        let name = c"trusted.overlay.opaque";
        // SAFETY: lgetxattr(2) with NUL-terminated strings and a buffer of the given size.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                xattr.as_mut_ptr().cast(),
                xattr.len(),
            )
        };
        assert_eq!(n, -1, "the outside directory was marked opaque");
        // Nothing half-unpacked stays, and the runtime still pulls and answers.
        assert!(rt.snapshots().is_empty(), "left {:?}", rt.snapshots());
        rt.crictl_async(&["pull", &registry.reference("good")])
            .await
            .expect("good image after the hostile ones");
        assert_eq!(rt.snapshots().len(), 1, "{:?}", rt.snapshots());
        let peak = rt.peak_rss_kib();
        assert!(peak < 256 * 1024, "daemon peak RSS {peak} KiB");
    });
}

#[test]
fn a_pull_whose_client_went_away_stops_unpacking_and_leaves_nothing() {
    run(async {
        let ns = NetNs::create("gone").expect("netns");
        let images = [image("flood", vec![flood_layer(1000, 60)], &["true"])];
        let registry = Registry::start(&ns, &images, &[]);
        let rt = Runtime::start(&ns, &registry, "");
        // crictl's --timeout is not the pull's: --pull-timeout is.
        let mut cmd = rt.crictl_cmd("60s");
        cmd.args(["pull", "--pull-timeout=2s", &registry.reference("flood")]);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("task")
            .expect("crictl");
        assert!(
            !out.status.success(),
            "the 60k-entry layer unpacked within 2s"
        );
        // The server side notices, stops and cleans up: no snapshot, whole or partial.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !rt.log().contains("unpack cancelled") {
            assert!(
                Instant::now() < deadline,
                "pull not cancelled: {}",
                rt.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for _ in 0..100 {
            if rt.snapshots().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(rt.snapshots().is_empty(), "left {:?}", rt.snapshots());
        assert!(rt.crictl_async(&["images", "-q"]).await.is_ok());
    });
}

#[test]
fn a_trickling_registry_blocks_neither_other_pulls_nor_removal_nor_shutdown() {
    run(async {
        let ns = NetNs::create("slow").expect("netns");
        let images = [
            // A layer of its own (a shared one would be in the store already).
            image("slow", vec![flood_layer(5, 5)], &["true"]),
            image("a", vec![busybox_layer(false)], &["true"]),
            image("b", vec![flood_layer(1, 3)], &["true"]),
        ];
        let registry = Registry::start(&ns, &images, &["slow"]);
        let rt = Runtime::start(&ns, &registry, "image_pull_timeout = \"20s\"\n");
        rt.crictl_async(&["pull", &registry.reference("a")])
            .await
            .expect("pull a");

        let slow_ref = registry.reference("slow");
        let mut cmd = rt.crictl_cmd("120s");
        cmd.args(["pull", &slow_ref]);
        let slow = tokio::task::spawn_blocking(move || cmd.output());
        let deadline = Instant::now() + Duration::from_secs(30);
        while registry.trickling.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "slow pull never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // While it trickles: removal of another image and a pull from a good registry go
        // through (crictl's 60s timeout is the failure mode of a queued call).
        rt.crictl_async(&["rmi", &registry.reference("a")])
            .await
            .expect("RemoveImage behind a trickling pull");
        rt.crictl_async(&["pull", &registry.reference("b")])
            .await
            .expect("pull behind a trickling pull");
        assert!(
            registry.trickling.load(Ordering::SeqCst) > 0 && !slow.is_finished(),
            "the slow pull ended before the other calls were tried"
        );
        // The whole-pull deadline ends the trickle with a clear, retryable error.
        let out = slow.await.expect("task").expect("crictl");
        assert!(!out.status.success(), "the trickle finished");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("did not finish within 20s"), "{stderr}");
        assert!(stderr.contains("Unavailable"), "{stderr}");

        // A pull stuck on the registry does not hold SIGTERM up. (The registry notices the
        // abandoned trickle at its next write.)
        let deadline = Instant::now() + Duration::from_secs(30);
        while registry.trickling.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "the abandoned trickle goes on");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut cmd = rt.crictl_cmd("120s");
        cmd.args(["pull", &slow_ref]);
        let stuck = tokio::task::spawn_blocking(move || cmd.output());
        while registry.trickling.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // SAFETY: kill(2) on the PID of the daemon this test started.
        unsafe { libc::kill(rt.pid as libc::pid_t, libc::SIGTERM) };
        let out = stuck.await.expect("task").expect("crictl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Ended by the shutdown, not by its own deadline.
        assert!(
            stderr.contains("cancelled: the runtime is stopping"),
            "{stderr}\n{}",
            rt.log()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while pid_alive(rt.pid) {
            assert!(
                Instant::now() < deadline,
                "daemon still running: {}",
                rt.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
