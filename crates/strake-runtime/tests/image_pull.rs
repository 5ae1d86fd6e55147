//! The image service against the test bed's real registry (docker-registry on loopback, plain
//! HTTP). Needs root (network namespaces, overlay mounts, whiteout devices) and `make testbed`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strake_integration::netns::ClusterNet;
use strake_integration::registry::{self, Registry, TestImage};
use strake_runtime::image::{Endpoint, ErrorCode, ImageService, PullAuth, PullConfig};

struct Bed {
    registry: Registry,
    images: Vec<TestImage>,
    dir: tempfile::TempDir,
    _net: ClusterNet,
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

impl Bed {
    fn start() -> Bed {
        let net = ClusterNet::create().expect("cluster net");
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("registry");
        let registry = Registry::start(&net, &logs).unwrap_or_else(|e| {
            let mut text = String::new();
            for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
                text.push_str(&format!("== {:?}\n{body}\n", entry.file_name()));
            }
            panic!("registry: {e}\n{text}")
        });
        Bed {
            registry,
            images: registry::test_images().expect("images.txt"),
            dir,
            _net: net,
        }
    }

    fn config(&self) -> PullConfig {
        PullConfig {
            insecure_registries: vec![
                self.registry.open_local().to_string(),
                self.registry.protected_local().to_string(),
            ],
            pinned_images: vec![self.open_ref("strake/pause:1")],
            ..Default::default()
        }
    }

    async fn service(&self, name: &str) -> ImageService {
        self.service_with(name, |_: &str| false).await
    }

    async fn service_with(
        &self,
        name: &str,
        usage: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> ImageService {
        ImageService::open(self.store_dir(name), self.config(), usage)
            .await
            .expect("open image service")
    }

    fn store_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn open_ref(&self, name: &str) -> String {
        format!("{}/{name}", self.registry.open_local())
    }

    fn digest_of(&self, name: &str) -> &str {
        &self
            .images
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("{name} not in images.txt"))
            .digest
    }
}

/// Finds `rel` in an image's lower dirs, top first (what overlay would show).
fn find_in_layers(lowers: &[PathBuf], rel: &str) -> Option<PathBuf> {
    lowers
        .iter()
        .map(|l| l.join(rel))
        .find(|p| std::fs::symlink_metadata(p).is_ok())
}

fn tmp_entries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["blobs/sha256", "snapshots", "records"] {
        let Ok(rd) = std::fs::read_dir(root.join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn pulls_every_open_test_image_and_reports_it_as_cri_expects() {
    run(async {
        let bed = Bed::start();
        let svc = bed.service("store").await;
        let host = bed.registry.open_local().to_string();
        for name in [
            "strake/busybox:1",
            "strake/multilayer:1",
            "strake/multiarch:1",
            "strake/http:1",
            "strake/pause:1",
        ] {
            let reference = bed.open_ref(name);
            let started = Instant::now();
            let id = svc
                .pull(&reference, &PullAuth::default())
                .await
                .unwrap_or_else(|e| {
                    panic!("pull {name}: {}", strake_runtime::image::error_chain(&e))
                });
            eprintln!("pulled {name} in {:?}", started.elapsed());
            assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
            let record = svc.status(&reference).expect("status by tag");
            assert_eq!(record.id, id);
            assert!(
                record.repo_tags.contains(&reference),
                "{:?}",
                record.repo_tags
            );
            let repo = name.split(':').next().unwrap_or(name);
            let repo_digest = format!("{host}/{repo}@{}", bed.digest_of(name));
            assert!(
                record.repo_digests.contains(&repo_digest),
                "{:?} lacks {repo_digest}",
                record.repo_digests
            );
            assert!(record.size > 0);
            assert_eq!(record.pinned, name == "strake/pause:1", "{name} pinned");
            assert_eq!(svc.status(&id).map(|r| r.id), Some(id.clone()));
            assert_eq!(svc.status(&id[7..19]).map(|r| r.id), Some(id.clone()));
            assert_eq!(svc.status(&repo_digest).map(|r| r.id), Some(id.clone()));
            let lowers = svc.lower_dirs(&id).expect("lower dirs");
            assert!(lowers.iter().all(|l| l.is_dir()), "{lowers:?}");
            assert!(
                find_in_layers(&lowers, "bin/busybox").is_some(),
                "{name}: no busybox"
            );
            svc.config(&id).await.expect("config blob verifies");
        }
        assert_eq!(svc.list().len(), 5);
        // Missing images: status is None, not an error.
        assert!(svc.status(&bed.open_ref("strake/nope:1")).is_none());
        let err = svc
            .pull(&bed.open_ref("strake/nope:1"), &PullAuth::default())
            .await
            .expect_err("missing image");
        assert_eq!(err.code(), ErrorCode::NotFound, "{err:?}");
        let err = svc
            .pull("Not A Reference", &PullAuth::default())
            .await
            .expect_err("bad reference");
        assert_eq!(err.code(), ErrorCode::InvalidArgument);

        // Everything survives a restart of the service.
        drop(svc);
        let svc = bed.service("store").await;
        assert_eq!(svc.list().len(), 5);
        assert!(tmp_entries(&bed.store_dir("store")).is_empty());
        let info = svc.fs_info().await.expect("fs info");
        assert!(
            info.used_bytes > 1 << 20 && info.inodes_used > 100,
            "{info:?}"
        );
    });
}

#[test]
fn protected_image_needs_credentials() {
    run(async {
        let bed = Bed::start();
        let reference = format!("{}/strake/protected:1", bed.registry.protected_local());
        let svc = bed.service("store").await;
        let err = svc
            .pull(&reference, &PullAuth::default())
            .await
            .expect_err("pulled without credentials");
        assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err:?}");
        let err = svc
            .pull(&reference, &PullAuth::basic(registry::USER, "wrong"))
            .await
            .expect_err("pulled with a wrong password");
        assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err:?}");
        assert!(svc.list().is_empty());

        let id = svc
            .pull(
                &reference,
                &PullAuth::basic(registry::USER, registry::PASSWORD),
            )
            .await
            .expect("pull with username/password");
        // The same image through the `auth` field (base64 user:password), into another store.
        let svc2 = bed.service("store2").await;
        use base64_auth::encode;
        let auth = PullAuth {
            auth: encode(&format!("{}:{}", registry::USER, registry::PASSWORD)),
            ..Default::default()
        };
        assert_eq!(
            svc2.pull(&reference, &auth).await.expect("pull with auth"),
            id
        );
    });
}

#[test]
fn a_pull_in_flight_is_not_shared_with_other_credentials() {
    run(async {
        let bed = Bed::start();
        let reference = format!("{}/strake/protected:1", bed.registry.protected_local());
        let svc = bed.service("store").await;
        let good = PullAuth::basic(registry::USER, registry::PASSWORD);
        let anonymous = PullAuth::default();
        // Started together: the anonymous pull must not ride on the authorised one.
        let (with, without) = tokio::join!(
            svc.pull(&reference, &good),
            svc.pull(&reference, &anonymous)
        );
        with.expect("pull with credentials");
        let err = without.expect_err("an anonymous pull joined the authorised one");
        assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err:?}");
    });
}

/// A tiny base64 encoder, so the test does not need a crate for it.
mod base64_auth {
    pub fn encode(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = (u32::from(chunk[0]) << 16)
                | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[test]
fn multiarch_index_selects_the_host_architecture() {
    run(async {
        let bed = Bed::start();
        let svc = bed.service("store").await;
        let id = svc
            .pull(&bed.open_ref("strake/multiarch:1"), &PullAuth::default())
            .await
            .expect("pull");
        let lowers = svc.lower_dirs(&id).expect("lowers");
        let arch_file = find_in_layers(&lowers, "etc/strake-arch").expect("/etc/strake-arch");
        let text = std::fs::read_to_string(arch_file).expect("read");
        let (want, _) = strake_runtime::image::pull::host_platform();
        assert!(
            text.contains(want) && !text.contains(if want == "amd64" { "arm64" } else { "amd64" }),
            "{text:?} is not linux/{want}"
        );
        // The repo digest is the index's, as containerd reports it.
        let record = svc.status(&id).expect("status");
        assert!(
            record.repo_digests[0].ends_with(bed.digest_of("strake/multiarch:1")),
            "{:?}",
            record.repo_digests
        );
    });
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn multilayer_whiteouts_and_opaque_dir_give_the_right_merged_view() {
    run(async {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let bed = Bed::start();
        let svc = bed.service("store").await;
        let started = Instant::now();
        let id = svc
            .pull(&bed.open_ref("strake/multilayer:1"), &PullAuth::default())
            .await
            .expect("pull");
        eprintln!("cold pull of strake/multilayer:1: {:?}", started.elapsed());
        let lowers = svc.lower_dirs(&id).expect("lowers");
        assert_eq!(lowers.len(), 5, "{lowers:?}");
        // In the snapshots: a 0/0 whiteout device and the opaque xattr.
        let wh = find_in_layers(&lowers, "data/removed.txt").expect("whiteout");
        let meta = std::fs::symlink_metadata(&wh).expect("stat");
        assert!(
            meta.file_type().is_char_device() && meta.rdev() == 0,
            "{wh:?}"
        );
        let opaque = lowers
            .iter()
            .map(|l| l.join("data/opaque"))
            .find(|p| p.join("new.txt").exists())
            .expect("layer with opaque/new.txt");
        let mut value = [0u8; 8];
        let n = rustix::fs::getxattr(&opaque, "trusted.overlay.opaque", &mut value[..])
            .expect("opaque xattr");
        assert_eq!(&value[..n], b"y");

        // Through a real read-only overlay mount.
        let target = bed.dir.path().join("merged");
        std::fs::create_dir(&target).expect("mkdir");
        let lowerdir: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
        let status = std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", lowerdir.join(":")))
            .arg(&target)
            .status()
            .expect("mount");
        assert!(status.success(), "mount overlay");
        let _mount = Mount(target.clone());
        let mut names: Vec<String> = std::fs::read_dir(target.join("data"))
            .expect("read /data")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["dir", "kept.txt", "link", "opaque"]);
        let opaque: Vec<_> = std::fs::read_dir(target.join("data/opaque"))
            .expect("read opaque")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(opaque, ["new.txt"]);
        assert_eq!(
            std::fs::read_link(target.join("data/link")).expect("link"),
            Path::new("kept.txt")
        );
        assert!(target.join("data/dir/file.txt").is_file());
        assert!(target.join("bin/busybox").is_file());
    });
}

#[test]
fn concurrent_pulls_of_one_image_share_one_download() {
    run(async {
        let bed = Bed::start();
        let svc = bed.service("store").await;
        let reference = bed.open_ref("strake/multilayer:1");
        let pulls: Vec<_> = (0..6)
            .map(|_| {
                let svc = svc.clone();
                let reference = reference.clone();
                tokio::spawn(async move { svc.pull(&reference, &PullAuth::default()).await })
            })
            .collect();
        let mut ids = HashSet::new();
        for p in pulls {
            ids.insert(p.await.expect("join").expect("pull"));
        }
        assert_eq!(ids.len(), 1);
        // One config and five layers, each fetched once.
        assert_eq!(svc.blobs_downloaded(), 6);
        // A later pull re-resolves the tag but fetches no blob it already has.
        svc.pull(&reference, &PullAuth::default())
            .await
            .expect("again");
        assert_eq!(svc.blobs_downloaded(), 6);
    });
}

#[test]
fn remove_is_refused_while_in_use_and_keeps_shared_content() {
    run(async {
        let bed = Bed::start();
        let used: Arc<Mutex<HashSet<String>>> = Arc::default();
        let u = used.clone();
        let svc = bed
            .service_with("store", move |id: &str| {
                u.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
            })
            .await;
        let busybox = bed.open_ref("strake/busybox:1");
        let multilayer = bed.open_ref("strake/multilayer:1");
        let a = svc
            .pull(&busybox, &PullAuth::default())
            .await
            .expect("busybox");
        let b = svc
            .pull(&multilayer, &PullAuth::default())
            .await
            .expect("multilayer");
        let before = svc.fs_info().await.expect("fs info");

        used.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(b.clone());
        let err = svc.remove(&multilayer).await.expect_err("in use");
        assert_eq!(err.code(), ErrorCode::FailedPrecondition);
        assert!(svc.status(&b).is_some());
        used.lock().unwrap_or_else(|e| e.into_inner()).clear();

        svc.remove(&multilayer).await.expect("remove");
        assert!(svc.status(&multilayer).is_none());
        assert!(svc.status(&b).is_none());
        svc.remove(&multilayer)
            .await
            .expect("removing a missing image is fine");
        let after = svc.fs_info().await.expect("fs info");
        assert!(
            after.used_bytes < before.used_bytes,
            "{before:?} -> {after:?}"
        );
        // busybox still has all its layers (the base layer is shared with multilayer).
        let lowers = svc.lower_dirs(&a).expect("lowers");
        assert!(lowers.iter().all(|l| l.join("bin").is_dir()), "{lowers:?}");
        assert_eq!(svc.list().len(), 1);
        // Removing by ID works too, and the store is empty afterwards.
        svc.remove(&a).await.expect("remove by id");
        assert!(svc.list().is_empty());
    });
}

#[test]
fn a_pull_dropped_at_any_point_leaves_nothing_half_visible() {
    run(async {
        let bed = Bed::start();
        let reference = bed.open_ref("strake/multilayer:1");
        let mut interrupted = 0;
        for (i, delay_ms) in [0u64, 1, 2, 5, 10, 20, 40, 80].into_iter().enumerate() {
            let name = format!("store{i}");
            let svc = bed.service(&name).await;
            let auth = PullAuth::default();
            let pull = svc.pull(&reference, &auth);
            let finished = tokio::time::timeout(Duration::from_millis(delay_ms), pull)
                .await
                .is_ok();
            if !finished {
                interrupted += 1;
            }
            // Blocking writers notice the drop shortly; give them a moment, then "restart".
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(svc);
            let svc = bed.service(&name).await;
            let records = svc.list();
            if finished {
                assert_eq!(records.len(), 1);
            } else {
                assert!(
                    records.is_empty(),
                    "record published by an interrupted pull"
                );
            }
            assert!(
                tmp_entries(&bed.store_dir(&name)).is_empty(),
                "temporaries left after reopen"
            );
            // Every published blob is whole.
            for entry in std::fs::read_dir(bed.store_dir(&name).join("blobs/sha256")).expect("read")
            {
                let entry = entry.expect("entry");
                let bytes = std::fs::read(entry.path()).expect("read blob");
                let digest = strake_runtime::image::Digest::sha256_of(&bytes);
                assert_eq!(digest.hex(), entry.file_name().to_string_lossy());
            }
            // And a pull afterwards completes from whatever was kept.
            svc.pull(&reference, &PullAuth::default())
                .await
                .expect("pull after interruption");
        }
        assert!(interrupted > 0, "no pull was interrupted");
    });
}

#[test]
fn a_pull_killed_with_sigkill_leaves_nothing_half_visible() {
    run(async {
        let bed = Bed::start();
        let reference = bed.open_ref("strake/multilayer:1");
        // The child is the helper binary `tests/helpers/pull_until_killed.rs`.
        let exe = env!("CARGO_BIN_EXE_strake-runtime-test-pull");
        let mut killed_mid_pull = 0;
        for attempt in 0..10 {
            let name = format!("crash{attempt}");
            let store = bed.store_dir(&name);
            let mut child = std::process::Command::new(exe)
                .arg(&store)
                .arg(bed.registry.open_local().to_string())
                .arg(&reference)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn child");
            // Kill it (SIGKILL) the moment unpublished data exists, i.e. mid-write.
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut seen_tmp = false;
            while Instant::now() < deadline {
                if !tmp_entries(&store).is_empty() {
                    seen_tmp = true;
                    break;
                }
                if child.try_wait().expect("wait").is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            let _ = child.kill();
            let status = child.wait().expect("reap");
            let svc = bed.service(&name).await;
            // Whatever is visible is whole: a record only with all its layers unpacked.
            for record in svc.list() {
                for lower in svc.lower_dirs(&record.id).expect("lowers") {
                    assert!(lower.is_dir(), "published image lacks {lower:?}");
                }
            }
            if seen_tmp && !status.success() && svc.list().is_empty() {
                killed_mid_pull += 1;
            }
            assert!(tmp_entries(&store).is_empty(), "temporaries survive reopen");
            // The store recovers: a pull completes and every layer is whole.
            let id = svc
                .pull(&reference, &PullAuth::default())
                .await
                .expect("pull after crash");
            for lower in svc.lower_dirs(&id).expect("lowers") {
                assert!(lower.is_dir(), "{lower:?}");
            }
            if killed_mid_pull >= 2 {
                break;
            }
        }
        assert!(killed_mid_pull > 0, "never caught a pull mid-write");
    });
}

/// critest pulls `registry.k8s.io/pause:3.9` and `k8s.gcr.io/pause:3.9` and expects one image
/// with both names; with both registries mirrored to the test bed's registry (which holds
/// `pause:3.9`), that is what the store must show, and never the mirror's name.
#[test]
fn mirrored_registries_keep_their_names_and_share_one_image() {
    run(async {
        let bed = Bed::start();
        let mirror = Endpoint::parse(&format!("http://{}", bed.registry.open_local()))
            .expect("mirror endpoint");
        let config = PullConfig {
            mirrors: ["registry.k8s.io", "k8s.gcr.io"]
                .into_iter()
                .map(|r| (r.to_string(), vec![mirror.clone()]))
                .collect(),
            ..bed.config()
        };
        let svc = ImageService::open(bed.store_dir("mirrored"), config, |_: &str| false)
            .await
            .expect("open image service");
        let mut ids = Vec::new();
        for name in ["registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"] {
            let id = svc
                .pull(name, &PullAuth::default())
                .await
                .unwrap_or_else(|e| {
                    panic!("pull {name}: {}", strake_runtime::image::error_chain(&e))
                });
            ids.push(id);
        }
        assert_eq!(ids[0], ids[1], "one image from two registries");
        let images = svc.list();
        assert_eq!(images.len(), 1, "{images:?}");
        let mut tags = images[0].repo_tags.clone();
        tags.sort();
        assert_eq!(tags, ["k8s.gcr.io/pause:3.9", "registry.k8s.io/pause:3.9"]);
        let digest = bed.digest_of("pause:3.9");
        let mut digests = images[0].repo_digests.clone();
        digests.sort();
        assert_eq!(
            digests,
            [
                format!("k8s.gcr.io/pause@{digest}"),
                format!("registry.k8s.io/pause@{digest}")
            ]
        );
        assert_eq!(
            svc.status(&format!("registry.k8s.io/pause@{digest}"))
                .map(|r| r.id),
            Some(ids[0].clone())
        );
        assert!(
            svc.status(&format!("{}/pause:3.9", bed.registry.open_local()))
                .is_none()
        );
    });
}
