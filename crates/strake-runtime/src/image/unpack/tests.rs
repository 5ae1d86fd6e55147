//! Good and hostile layers, built in-test.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

use std::sync::atomic::AtomicBool;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// One tar entry, with raw name and link name bytes (so hostile names can be written).
struct E {
    name: &'static str,
    kind: tar::EntryType,
    data: &'static [u8],
    link: &'static str,
    mode: u32,
    uid: u64,
}

fn e(name: &'static str, kind: tar::EntryType) -> E {
    E {
        name,
        kind,
        data: b"",
        link: "",
        mode: if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        },
        uid: 0,
    }
}

fn file(name: &'static str, data: &'static [u8]) -> E {
    E {
        data,
        ..e(name, tar::EntryType::Regular)
    }
}

fn link(name: &'static str, kind: tar::EntryType, target: &'static str) -> E {
    E {
        link: target,
        ..e(name, kind)
    }
}

fn tarball(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for en in entries {
        let mut h = tar::Header::new_gnu();
        let name = &mut h.as_old_mut().name;
        name[..en.name.len()].copy_from_slice(en.name.as_bytes());
        let ln = &mut h.as_old_mut().linkname;
        ln[..en.link.len()].copy_from_slice(en.link.as_bytes());
        h.set_entry_type(en.kind);
        h.set_mode(en.mode);
        h.set_uid(en.uid);
        h.set_gid(en.uid);
        h.set_mtime(1_000_000);
        h.set_size(en.data.len() as u64);
        if matches!(en.kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).expect("major");
            h.set_device_minor(3).expect("minor");
        }
        h.set_cksum();
        b.append(&h, en.data).expect("append");
    }
    b.into_inner().expect("finish")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

struct Bed {
    dir: tempfile::TempDir,
}

impl Bed {
    fn new() -> Bed {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("snapshots")).expect("mkdir");
        std::fs::create_dir(dir.path().join("outside")).expect("mkdir");
        Bed { dir }
    }

    fn snapshots(&self) -> PathBuf {
        self.dir.path().join("snapshots")
    }

    fn unpack(
        &self,
        tar: &[u8],
        media_type: &str,
        blob: &[u8],
        opts: &UnpackOptions,
    ) -> Result<PathBuf, UnpackError> {
        let diff_id = Digest::sha256_of(tar);
        let chain = Digest::sha256_of(blob);
        let path = self.dir.path().join("blob");
        std::fs::write(&path, blob).expect("write blob");
        unpack_layer(
            &path,
            media_type,
            &diff_id,
            &self.snapshots(),
            &chain,
            &Budget::new(opts),
        )?;
        Ok(self.snapshots().join(chain.hex()).join("fs"))
    }

    fn refuse(&self, entries: &[E], opts: &UnpackOptions) -> UnpackError {
        let t = tarball(entries);
        let err = self
            .unpack(&t, TAR, &t, opts)
            .expect_err("hostile layer unpacked");
        let left: Vec<_> = std::fs::read_dir(self.snapshots())
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        let outside: Vec<_> = std::fs::read_dir(self.dir.path().join("outside"))
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(outside.is_empty(), "wrote outside: {outside:?}");
        err
    }
}

fn good_layer() -> Vec<E> {
    use tar::EntryType::*;
    vec![
        e("./", Directory),
        e("./etc/", Directory),
        file("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        E {
            mode: 0o4755,
            uid: 1000,
            ..file("bin/tool", b"#!/bin/sh\n")
        },
        link("bin/abs", Symlink, "/bin/tool"),
        link("bin/rel", Symlink, "../etc/passwd"),
        link("bin/hard", Link, "bin/tool"),
        e("data/.wh.gone", Regular),
        e("data/opaque/.wh..wh..opq", Regular),
        file("data/opaque/new.txt", b"new"),
        e("run/fifo", Fifo),
        e(".wh..wh.plnk", Regular),
    ]
}

fn check_good(fs: &Path) {
    let passwd = std::fs::read_to_string(fs.join("etc/passwd")).expect("passwd");
    assert!(passwd.starts_with("root:"));
    let tool = std::fs::symlink_metadata(fs.join("bin/tool")).expect("tool");
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid kept after chown");
    assert_eq!((tool.uid(), tool.gid()), (1000, 1000));
    assert_eq!(tool.mtime(), 1_000_000);
    assert_eq!(
        std::fs::read_link(fs.join("bin/abs")).expect("abs"),
        Path::new("/bin/tool")
    );
    assert_eq!(
        std::fs::read_link(fs.join("bin/rel")).expect("rel"),
        Path::new("../etc/passwd")
    );
    let hard = std::fs::metadata(fs.join("bin/hard")).expect("hard");
    assert_eq!(hard.ino(), tool.ino());
    let wh = std::fs::symlink_metadata(fs.join("data/gone")).expect("whiteout");
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!fs.join("data/.wh.gone").exists());
    let opq = rustix::fs::getxattr(fs.join("data/opaque"), OPAQUE_XATTR, &mut [0u8; 4][..])
        .expect("opaque xattr");
    assert_eq!(opq, 1);
    assert!(!fs.join("data/opaque/.wh..wh..opq").exists());
    assert!(fs.join("data/opaque/new.txt").is_file());
    assert!(
        std::fs::symlink_metadata(fs.join("run/fifo"))
            .expect("fifo")
            .file_type()
            .is_fifo()
    );
    assert!(!fs.join(".wh..wh.plnk").exists());
    assert_eq!(
        std::fs::metadata(fs.join("etc")).expect("etc").mtime(),
        1_000_000
    );
}

#[test]
fn good_gzip_layer_with_whiteouts_links_and_metadata() {
    let bed = Bed::new();
    let t = tarball(&good_layer());
    let fs = bed
        .unpack(&t, GZIP, &gzip(&t), &UnpackOptions::default())
        .expect("unpack");
    check_good(&fs);
    // Unpacking again is a no-op.
    let chain = Digest::sha256_of(&gzip(&t));
    let again = unpack_layer(
        &bed.dir.path().join("blob"),
        GZIP,
        &Digest::sha256_of(&t),
        &bed.snapshots(),
        &chain,
        &Budget::new(&UnpackOptions::default()),
    )
    .expect("again");
    assert_eq!(again, Unpacked::AlreadyPresent);
}

#[test]
fn zstd_multi_frame_and_plain_layers_unpack() {
    let bed = Bed::new();
    let t = tarball(&good_layer());
    // Two zstd frames with a skippable frame between them, as zstd:chunked writes.
    let (a, b) = t.split_at(t.len() / 2);
    let mut z = ruzstd::encoding::compress_to_vec(a, ruzstd::encoding::CompressionLevel::Fastest);
    z.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
    z.extend(ruzstd::encoding::compress_to_vec(
        b,
        ruzstd::encoding::CompressionLevel::Fastest,
    ));
    check_good(
        &bed.unpack(&t, ZSTD, &z, &UnpackOptions::default())
            .expect("zstd"),
    );
    let bed = Bed::new();
    check_good(
        &bed.unpack(&t, TAR, &t, &UnpackOptions::default())
            .expect("tar"),
    );
}

#[test]
fn media_type_and_magic_must_agree() {
    let bed = Bed::new();
    let t = tarball(&good_layer());
    let err = bed
        .unpack(&t, GZIP, &t, &UnpackOptions::default())
        .expect_err("mismatch");
    assert!(
        matches!(err, UnpackError::CompressionMismatch { .. }),
        "{err}"
    );
    let err = bed
        .unpack(&t, TAR, &gzip(&t), &UnpackOptions::default())
        .expect_err("mismatch");
    assert!(
        matches!(err, UnpackError::CompressionMismatch { .. }),
        "{err}"
    );
    let err = bed
        .unpack(
            &t,
            "application/vnd.oci.image.config.v1+json",
            &t,
            &UnpackOptions::default(),
        )
        .expect_err("not a layer");
    assert!(
        matches!(err, UnpackError::UnsupportedMediaType { .. }),
        "{err}"
    );
}

#[test]
fn hostile_paths_are_refused_and_nothing_is_written_outside() {
    use tar::EntryType::*;
    let bed = Bed::new();
    let opts = UnpackOptions::default();
    let outside = bed.dir.path().join("outside");
    let outside_abs: &'static str = Box::leak(outside.display().to_string().into_boxed_str());
    let outside_file: &'static str = Box::leak(format!("{outside_abs}/pwned").into_boxed_str());

    let err = bed.refuse(&[file(outside_file, b"x")], &opts);
    assert!(matches!(err, UnpackError::AbsolutePath { .. }), "{err}");
    let err = bed.refuse(&[file("a/../../../outside/pwned", b"x")], &opts);
    assert!(matches!(err, UnpackError::ParentComponent { .. }), "{err}");
    let err = bed.refuse(&[file("../outside/pwned", b"x")], &opts);
    assert!(matches!(err, UnpackError::ParentComponent { .. }), "{err}");
    // A symlink planted by the layer, then written through (absolute and relative targets).
    let err = bed.refuse(
        &[link("evil", Symlink, outside_abs), file("evil/pwned", b"x")],
        &opts,
    );
    assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");
    let err = bed.refuse(
        &[
            link("evil", Symlink, "../../outside"),
            file("evil/pwned", b"x"),
        ],
        &opts,
    );
    assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");
    // Replacing the symlink's target file through a symlink at the last component must not
    // follow it either: the symlink itself is replaced.
    let t = tarball(&[link("f", Symlink, outside_file), file("f", b"x")]);
    let fs = bed.unpack(&t, TAR, &t, &opts).expect("replace symlink");
    assert!(fs.join("f").is_file());
    assert!(!Path::new(outside_file).exists());
    std::fs::remove_dir_all(bed.snapshots()).expect("clean");
    std::fs::create_dir(bed.snapshots()).expect("mkdir");
    // Hard links out of the layer.
    for target in [outside_file, "../outside/pwned", "a/../../x"] {
        let err = bed.refuse(&[link("h", Link, target)], &opts);
        assert!(
            matches!(err, UnpackError::HardlinkEscape { .. }),
            "{target}: {err}"
        );
    }
    let err = bed.refuse(
        &[link("d", Symlink, outside_abs), link("h", Link, "d/pwned")],
        &opts,
    );
    assert!(matches!(err, UnpackError::HardlinkEscape { .. }), "{err}");
    // Whiteouts that name no sibling.
    for w in ["a/.wh...", "a/.wh..", ".wh."] {
        let err = bed.refuse(&[e(w, Regular)], &opts);
        assert!(
            matches!(err, UnpackError::WhiteoutOutside { .. }),
            "{w}: {err}"
        );
    }
    let err = bed.refuse(&[e("a/../.wh.x", Regular)], &opts);
    assert!(matches!(err, UnpackError::ParentComponent { .. }), "{err}");
}

#[test]
fn device_nodes_only_when_allowed() {
    let bed = Bed::new();
    for kind in [tar::EntryType::Char, tar::EntryType::Block] {
        let err = bed.refuse(&[e("dev/null", kind)], &UnpackOptions::default());
        assert!(matches!(err, UnpackError::DeviceNode { .. }), "{err}");
    }
    let t = tarball(&[e("dev/null", tar::EntryType::Char)]);
    let opts = UnpackOptions {
        allow_devices: true,
        ..Default::default()
    };
    let fs = bed.unpack(&t, TAR, &t, &opts).expect("allowed");
    let meta = std::fs::symlink_metadata(fs.join("dev/null")).expect("dev");
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), rustix::fs::makedev(1, 3));
}

#[test]
fn size_limit_and_diff_id_are_enforced() {
    let bed = Bed::new();
    let big: &'static [u8] = Box::leak(vec![7u8; 100_000].into_boxed_slice());
    let opts = UnpackOptions {
        max_size: 50_000,
        ..Default::default()
    };
    let err = bed.refuse(&[file("big", big)], &opts);
    assert!(matches!(err, UnpackError::SizeLimit { .. }), "{err}");
    // A compressed bomb is stopped by the same count.
    let t = tarball(&[file("big", big)]);
    let err = bed.unpack(&t, GZIP, &gzip(&t), &opts).expect_err("bomb");
    assert!(matches!(err, UnpackError::SizeLimit { .. }), "{err}");

    let t = tarball(&[file("a", b"a")]);
    let path = bed.dir.path().join("blob");
    std::fs::write(&path, &t).expect("write");
    let wrong = Digest::sha256_of(b"something else");
    let chain = Digest::sha256_of(b"chain");
    let err = unpack_layer(
        &path,
        TAR,
        &wrong,
        &bed.snapshots(),
        &chain,
        &Budget::new(&UnpackOptions::default()),
    )
    .expect_err("diffID");
    assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
    assert_eq!(std::fs::read_dir(bed.snapshots()).expect("read").count(), 0);
}

#[test]
fn chain_ids_follow_the_oci_formula() {
    let a = Digest::sha256_of(b"a");
    let b = Digest::sha256_of(b"b");
    let ids = chain_ids(&[a.clone(), b.clone()]);
    assert_eq!(ids[0], a);
    assert_eq!(ids[1], Digest::sha256_of(format!("{a} {b}").as_bytes()));
}

/// A tar stream of `n` directories `d0/d1/.../d<depth-1>`-style chains, written straight into
/// a gzip encoder (as an attacker's layer would be: tiny compressed, huge expanded).
fn dir_flood(chains: usize, depth: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for c in 0..chains {
        let mut path = format!("c{c}");
        for d in 0..depth {
            if d > 0 {
                path.push_str(&format!("/{d:02}"));
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(1);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, &path, &[][..]).expect("append");
        }
    }
    b.into_inner().expect("finish")
}

#[test]
fn entry_and_depth_limits_refuse_floods_and_leave_nothing() {
    let bed = Bed::new();
    let opts = UnpackOptions {
        max_entries: 500,
        ..Default::default()
    };
    let t = dir_flood(100, 10);
    let err = bed.unpack(&t, GZIP, &gzip(&t), &opts).expect_err("flood");
    assert!(
        matches!(err, UnpackError::EntryLimit { limit: 500 }),
        "{err}"
    );
    assert!(err.to_string().contains("500 entries"), "{err}");
    assert_eq!(std::fs::read_dir(bed.snapshots()).expect("read").count(), 0);

    // The entry count is per image: two layers share one budget.
    let budget = Budget::new(&UnpackOptions {
        max_entries: 150,
        ..Default::default()
    });
    let small = dir_flood(10, 10);
    let unpack = |chain: &[u8]| {
        let path = bed.dir.path().join("blob");
        std::fs::write(&path, &small).expect("write");
        unpack_layer(
            &path,
            TAR,
            &Digest::sha256_of(&small),
            &bed.snapshots(),
            &Digest::sha256_of(chain),
            &budget,
        )
    };
    unpack(b"first").expect("first layer fits");
    let err = unpack(b"second").expect_err("second layer over the image's budget");
    assert!(matches!(err, UnpackError::EntryLimit { .. }), "{err}");

    let bed = Bed::new();
    let opts = UnpackOptions {
        max_depth: 8,
        ..Default::default()
    };
    let t = dir_flood(1, 9);
    let err = bed.unpack(&t, TAR, &t, &opts).expect_err("deep");
    assert!(
        matches!(err, UnpackError::PathDepth { limit: 8, .. }),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(bed.snapshots()).expect("read").count(), 0);
    // A hard link whose target is too deep is refused the same way.
    let err = bed.refuse(
        &[link("l", tar::EntryType::Link, "a/b/c/d/e/f/g/h/i")],
        &opts,
    );
    assert!(matches!(err, UnpackError::PathDepth { .. }), "{err}");
    // Exactly at the limit is fine.
    let t = dir_flood(1, 8);
    bed.unpack(&t, TAR, &t, &opts).expect("depth 8");
}

#[test]
fn a_zero_bomb_stops_at_the_image_size_limit_and_leaves_nothing() {
    let bed = Bed::new();
    // 64 MiB of zeros: gzip makes it ~64 KiB.
    let zeros: &'static [u8] = Box::leak(vec![0u8; 64 << 20].into_boxed_slice());
    let t = tarball(&[file("zeros", zeros)]);
    let z = gzip(&t);
    assert!(z.len() < 1 << 20, "{}", z.len());
    let opts = UnpackOptions {
        max_size: 8 << 20,
        ..Default::default()
    };
    let err = bed.unpack(&t, GZIP, &z, &opts).expect_err("bomb");
    assert!(
        matches!(err, UnpackError::SizeLimit { limit } if limit == 8 << 20),
        "{err}"
    );
    assert!(err.is_bad_layer());
    assert_eq!(std::fs::read_dir(bed.snapshots()).expect("read").count(), 0);
}

#[test]
fn huge_extension_headers_are_refused_before_they_are_read_into_memory() {
    // A GNU long name of 64 MiB: the tar reader would hold it whole.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().expect("gnu").name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(64 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    let name = vec![b'a'; 64 << 20];
    b.append(&h, &name[..]).expect("longname");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &[][..]).expect("entry");
    let t = b.into_inner().expect("finish");
    let bed = Bed::new();
    let err = bed
        .unpack(&t, GZIP, &gzip(&t), &UnpackOptions::default())
        .expect_err("huge long name");
    assert!(matches!(err, UnpackError::HeaderLimit { .. }), "{err}");
    assert_eq!(std::fs::read_dir(bed.snapshots()).expect("read").count(), 0);
}

#[test]
fn a_cancelled_budget_stops_the_unpack_and_removes_the_partial_snapshot() {
    let bed = Bed::new();
    let t = dir_flood(50, 4);
    let path = bed.dir.path().join("blob");
    std::fs::write(&path, &t).expect("write");
    let shutdown = Arc::new(AtomicBool::new(false));
    let budget = Budget::with_shutdown(&UnpackOptions::default(), shutdown.clone());
    budget.cancel();
    let run = |budget: &Budget| {
        unpack_layer(
            &path,
            TAR,
            &Digest::sha256_of(&t),
            &bed.snapshots(),
            &Digest::sha256_of(b"c"),
            budget,
        )
    };
    let err = run(&budget).expect_err("cancelled");
    assert!(matches!(err, UnpackError::Cancelled), "{err}");
    assert!(!err.is_bad_layer());
    assert_eq!(std::fs::read_dir(bed.snapshots()).expect("read").count(), 0);
    // The service's shutdown flag stops every budget made with it.
    let budget = Budget::with_shutdown(&UnpackOptions::default(), shutdown.clone());
    shutdown.store(true, Ordering::SeqCst);
    assert!(matches!(run(&budget), Err(UnpackError::Cancelled)));
    shutdown.store(false, Ordering::SeqCst);
    run(&budget).expect("not cancelled");
}

#[test]
fn the_directory_times_list_is_bounded() {
    let bed = Bed::new();
    let root = rustix::fs::open(
        bed.snapshots(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open");
    let mut u = Unpacker {
        root,
        opts: UnpackOptions::default(),
        written: 0,
        dir_times: Vec::new(),
        dir_times_bytes: 0,
        meter: Rc::new(Meter::default()),
    };
    // 300k directories 60 levels deep, the flood of the issue: paths of ~1 KiB each.
    let name = [b'n'; 16];
    let comps: Vec<&[u8]> = vec![&name[..]; 60];
    for _ in 0..300_000 {
        u.remember_dir_time(&comps, 1);
    }
    let kept: usize = u.dir_times.iter().map(|(p, _)| p.len()).sum();
    assert!(kept <= MAX_DIR_TIMES_BYTES, "{kept}");
    assert!(u.dir_times.len() < 300_000 && !u.dir_times.is_empty());
}

#[test]
fn implied_parents_get_0755() {
    let bed = Bed::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    b.append_data(&mut h, "implied/parent/f", &b"x"[..])
        .expect("append");
    let t = b.into_inner().expect("finish");
    let fs = bed
        .unpack(&t, TAR, &t, &UnpackOptions::default())
        .expect("unpack");
    for p in ["", "implied", "implied/parent"] {
        let mode = std::fs::metadata(fs.join(p)).expect("implied").mode() & 0o7777;
        assert_eq!(mode, 0o755, "{p:?}");
    }
    let snap = fs.parent().expect("snapshot dir");
    assert_eq!(
        std::fs::metadata(snap).expect("snap").mode() & 0o7777,
        0o700
    );
}
