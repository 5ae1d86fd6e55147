//! A volume's `subPath`, opened inside the volume without following links out of it, and
//! bind-mounted by descriptor onto a per-container target (upstream's answer to
//! CVE-2017-1002101, `pkg/volume/util/subpath/subpath_linux.go`).
//!
//! A container can write anything into a writable volume, symlinks included, so the text of a
//! `subPath` says nothing about where it leads on the host. [`open_in_volume`] resolves it
//! relative to an opened descriptor of the volume's root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)`, or, where the kernel has no `openat2`, with an equivalent walk of
//! `O_PATH | O_NOFOLLOW` opens that resolves each symlink itself. A symlink that stays inside the
//! volume is followed; one that leads out of it (an absolute target, or `..` past the root) is
//! refused, as upstream refuses it (the container fails with CreateContainerConfigError).
//! Missing directories are made with `mkdirat` relative to the opened parent, never through a
//! link. [`bind`] then mounts `/proc/self/fd/N` of the opened descriptor, never the path string,
//! so nothing the container does after the check changes what is mounted.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::mount::{MountPropagationFlags, UnmountFlags};

/// The most symlinks one resolution follows (the kernel's limit for a path walk).
const MAX_LINKS: usize = 40;

/// A subPath could not be opened or mounted.
#[derive(Debug, thiserror::Error)]
pub enum SubPathError {
    #[error("open volume root {root}")]
    OpenRoot {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("subPath {sub_path:?} leads outside of volume {root}")]
    Escapes { root: PathBuf, sub_path: PathBuf },
    #[error("resolve subPath {sub_path:?} in volume {root}")]
    Resolve {
        root: PathBuf,
        sub_path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create directory {name:?} of subPath {sub_path:?} in volume {root}")]
    CreateDir {
        root: PathBuf,
        sub_path: PathBuf,
        name: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("prepare bind target {target}")]
    PrepareTarget {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bind-mount subPath onto {target}")]
    Bind {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unmount {target}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Opens `sub_path` (relative) inside the directory `root` and returns an `O_PATH` descriptor of
/// what it names, following symlinks only while they stay inside `root`. With `create`, missing
/// directories on the way are made with the root's mode, as upstream's `SafeMakeDir` does.
pub fn open_in_volume(root: &Path, sub_path: &Path, create: bool) -> Result<OwnedFd, SubPathError> {
    // The volume's own directory is the kubelet's (or, for hostPath, named by the pod's author):
    // following links to it is what upstream does too.
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SubPathError::OpenRoot {
        root: root.to_path_buf(),
        source: e.into(),
    })?;
    let fail = |e: Failure| e.into_error(root, sub_path);
    match openat2_beneath(&root_fd, sub_path) {
        Ok(fd) => return Ok(fd),
        Err(Failure::Os(Errno::NOENT)) if create => {}
        // No openat2 (before Linux 5.6, or filtered by seccomp): the walk does the same.
        Err(Failure::Os(Errno::NOSYS | Errno::PERM | Errno::AGAIN)) => {}
        Err(e) => return Err(fail(e)),
    }
    let mode = if create {
        let st = rustix::fs::fstat(&root_fd).map_err(|e| fail(Failure::Os(e)))?;
        Some(Mode::from_raw_mode(st.st_mode) & Mode::from_raw_mode(0o7777))
    } else {
        None
    };
    walk(root_fd, sub_path, mode).map_err(fail)
}

/// Why a resolution failed, before the paths are attached.
#[derive(Debug)]
enum Failure {
    Escapes,
    Os(Errno),
    Create(OsString, Errno),
}

impl Failure {
    fn into_error(self, root: &Path, sub_path: &Path) -> SubPathError {
        let (root, sub_path) = (root.to_path_buf(), sub_path.to_path_buf());
        match self {
            Failure::Escapes => SubPathError::Escapes { root, sub_path },
            Failure::Os(e) => SubPathError::Resolve {
                root,
                sub_path,
                source: e.into(),
            },
            Failure::Create(name, e) => SubPathError::CreateDir {
                root,
                sub_path,
                name,
                source: e.into(),
            },
        }
    }
}

/// The kernel's resolution: `RESOLVE_BENEATH` refuses absolute links and `..` past the root with
/// EXDEV; magic links (`/proc/self/root` and the like) are refused outright.
fn openat2_beneath(root: &OwnedFd, sub_path: &Path) -> Result<OwnedFd, Failure> {
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(
            root,
            sub_path,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => return Ok(fd),
            Err(Errno::XDEV) => return Err(Failure::Escapes),
            // A rename or mount raced the resolution of `..`: the kernel asks to try again.
            Err(Errno::AGAIN) if tries < 3 => tries += 1,
            Err(e) => return Err(Failure::Os(e)),
        }
    }
}

/// One step of a resolution.
enum Step {
    Name(OsString),
    Parent,
}

fn steps(p: &Path) -> Result<Vec<Step>, Failure> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(Step::Name(n.to_os_string())),
            Component::ParentDir => out.push(Step::Parent),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(Failure::Escapes),
        }
    }
    Ok(out)
}

/// The same resolution as [`openat2_beneath`] done one component at a time: each name is opened
/// `O_PATH | O_NOFOLLOW` relative to the descriptor of its parent, a symlink's target is read
/// from its own descriptor and walked in its place, and `..` returns to the descriptor already
/// held for the parent (so a concurrent rename cannot move the walk out of the root). With
/// `create`, a missing name is made with `mkdirat` in the held parent and opened without
/// following links.
fn walk(root: OwnedFd, sub_path: &Path, create: Option<Mode>) -> Result<OwnedFd, Failure> {
    let mut held: Vec<OwnedFd> = vec![root];
    let mut todo: VecDeque<Step> = steps(sub_path)?.into();
    let mut links = 0;
    let mut creates = 0;
    while let Some(step) = todo.pop_front() {
        let name = match step {
            Step::Parent if held.len() == 1 => return Err(Failure::Escapes),
            Step::Parent => {
                held.pop();
                continue;
            }
            Step::Name(n) => n,
        };
        let parent = held.last().ok_or(Failure::Escapes)?;
        let fd = match rustix::fs::openat(
            parent,
            name.as_os_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create.is_some() && creates < MAX_LINKS => {
                creates += 1;
                let mode = create.unwrap_or(Mode::from_raw_mode(0o755));
                make_dir(parent, &name, mode)?;
                // Open what is there now, whoever made it, through the same checks.
                todo.push_front(Step::Name(name));
                continue;
            }
            Err(e) => return Err(Failure::Os(e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(Failure::Os)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Failure::Os(Errno::LOOP));
                }
                let target = rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(Failure::Os)?;
                let target = PathBuf::from(OsString::from_vec(target.into_bytes()));
                for s in steps(&target)?.into_iter().rev() {
                    todo.push_front(s);
                }
            }
            FileType::Directory => held.push(fd),
            _ if todo.is_empty() => held.push(fd),
            _ => return Err(Failure::Os(Errno::NOTDIR)),
        }
    }
    held.pop().ok_or(Failure::Escapes)
}

/// `mkdirat` in the held parent, then `fchmod` through a no-follow descriptor of the new
/// directory (mkdirat's mode is reduced by the umask). A name that appeared meanwhile is fine:
/// the caller opens it again with the same checks.
fn make_dir(parent: &OwnedFd, name: &OsStr, mode: Mode) -> Result<(), Failure> {
    let failed = |e| Failure::Create(name.to_os_string(), e);
    match rustix::fs::mkdirat(parent, name, mode) {
        Ok(()) => {}
        Err(Errno::EXIST) => return Ok(()),
        Err(e) => return Err(failed(e)),
    }
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(failed)?;
    rustix::fs::fchmod(&dir, mode).map_err(failed)
}

/// Bind-mounts what `fd` refers to onto `target` (a file or directory made to match), private,
/// unless `target` already shows that same file (a container restarting re-uses its bind). An
/// older bind of something else is unmounted first.
pub fn bind(fd: &OwnedFd, target: &Path) -> Result<(), SubPathError> {
    let prepare = |source: std::io::Error| SubPathError::PrepareTarget {
        target: target.to_path_buf(),
        source,
    };
    let st = rustix::fs::fstat(fd).map_err(|e| prepare(e.into()))?;
    let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
    if let Some(parent) = target.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(parent)
            .map_err(prepare)?;
    }
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.dev() == st.st_dev && m.ino() == st.st_ino => return Ok(()),
        Ok(m) => {
            unmount_all(target)?;
            let m = std::fs::symlink_metadata(target).unwrap_or(m);
            if m.is_dir() != is_dir || m.file_type().is_symlink() {
                let removed = if m.is_dir() {
                    std::fs::remove_dir(target)
                } else {
                    std::fs::remove_file(target)
                };
                removed.map_err(prepare)?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(prepare(e)),
    }
    let made = if is_dir {
        std::fs::DirBuilder::new().mode(0o750).create(target)
    } else {
        // A file serves for every other type: the bind gives the target the source's type.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)
            .map(drop)
    };
    match made {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(prepare(e)),
    }
    let source = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    let bind = |e: Errno| SubPathError::Bind {
        target: target.to_path_buf(),
        source: e.into(),
    };
    rustix::mount::mount_bind(source.as_str(), target).map_err(bind)?;
    rustix::mount::mount_change(target, MountPropagationFlags::PRIVATE).map_err(bind)
}

/// Unmounts everything stacked on `target`, without following a link there.
pub fn unmount_all(target: &Path) -> Result<(), SubPathError> {
    // Bounded: a target holds at most the binds this module made on it.
    for _ in 0..16 {
        match rustix::mount::unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
            Ok(()) => {}
            // Not (or no longer) a mount point, or gone.
            Err(Errno::INVAL | Errno::NOENT) => return Ok(()),
            Err(e) => {
                return Err(SubPathError::Unmount {
                    target: target.to_path_buf(),
                    source: e.into(),
                });
            }
        }
    }
    Ok(())
}

/// Mount points of this process's namespace (as `/proc/self/mounts` lists them, unescaped).
pub fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|m| PathBuf::from(OsString::from_vec(unescape_octal(m))))
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mount paths as `\NNN`.
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|d| {
            b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match oct {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Whether anything is mounted at or below `dir`.
pub fn has_mounts_below(dir: &Path) -> bool {
    mount_points().iter().any(|m| m.starts_with(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// A volume root and a directory beside it that stands for the host, with a marker file.
    struct Fixture {
        _top: tempfile::TempDir,
        root: PathBuf,
        host: PathBuf,
    }

    fn fixture() -> Fixture {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("volume");
        let host = top.path().join("host");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("marker"), "host").unwrap();
        Fixture {
            _top: top,
            root,
            host,
        }
    }

    /// Both resolvers: the kernel's (openat2, through the public entry) and the walk.
    fn both(root: &Path, sub: &str, create: bool) -> [Result<OwnedFd, SubPathError>; 2] {
        let root_fd =
            rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mode = create.then(|| Mode::from_raw_mode(0o777));
        [
            open_in_volume(root, Path::new(sub), create),
            walk(root_fd, Path::new(sub), mode).map_err(|e| e.into_error(root, Path::new(sub))),
        ]
    }

    fn same_file(fd: &OwnedFd, p: &Path) -> bool {
        let st = rustix::fs::fstat(fd).unwrap();
        let m = std::fs::metadata(p).unwrap();
        st.st_dev == m.dev() && st.st_ino == m.ino()
    }

    fn assert_escapes(r: &[Result<OwnedFd, SubPathError>; 2], what: &str) {
        for (i, r) in r.iter().enumerate() {
            assert!(
                matches!(r, Err(SubPathError::Escapes { .. })),
                "{what} (resolver {i}): {r:?}"
            );
        }
    }

    #[test]
    fn symlink_to_host_root_is_refused() {
        let f = fixture();
        symlink("/", f.root.join("x")).unwrap();
        assert_escapes(&both(&f.root, "x", true), "link to /");
        assert_escapes(&both(&f.root, "x/etc", true), "through a link to /");
    }

    #[test]
    fn symlink_to_parent_is_refused() {
        let f = fixture();
        symlink("..", f.root.join("x")).unwrap();
        assert_escapes(&both(&f.root, "x", true), "link to ..");
        std::fs::create_dir(f.root.join("d")).unwrap();
        symlink("../../host", f.root.join("d/up")).unwrap();
        assert_escapes(&both(&f.root, "d/up", true), "link two levels up");
    }

    #[test]
    fn absolute_symlink_is_refused_even_to_a_host_directory() {
        let f = fixture();
        symlink(&f.host, f.root.join("x")).unwrap();
        assert_escapes(&both(&f.root, "x", true), "absolute link");
        // A file outside, by absolute and by relative link.
        symlink(f.host.join("marker"), f.root.join("file")).unwrap();
        assert_escapes(&both(&f.root, "file", false), "absolute link to a file");
        symlink("../host/marker", f.root.join("rel")).unwrap();
        assert_escapes(&both(&f.root, "rel", false), "relative link to a file");
    }

    #[test]
    fn chain_of_links_leaving_the_volume_is_refused() {
        let f = fixture();
        std::fs::create_dir(f.root.join("d")).unwrap();
        symlink("b", f.root.join("a")).unwrap();
        symlink("d/c", f.root.join("b")).unwrap();
        symlink("../../host", f.root.join("d/c")).unwrap();
        assert_escapes(&both(&f.root, "a", true), "a -> b -> d/c -> ../../host");
        assert!(!f.host.join("new").exists());
    }

    #[test]
    fn links_that_stay_inside_are_followed() {
        let f = fixture();
        std::fs::create_dir_all(f.root.join("data/sub")).unwrap();
        std::fs::write(f.root.join("data/sub/file"), "in").unwrap();
        symlink("data/sub", f.root.join("x")).unwrap();
        symlink("../data/./sub/file", f.root.join("data/y")).unwrap();
        symlink("x", f.root.join("chain")).unwrap();
        for r in both(&f.root, "x", true) {
            assert!(same_file(&r.unwrap(), &f.root.join("data/sub")));
        }
        for r in both(&f.root, "data/y", false) {
            assert!(same_file(&r.unwrap(), &f.root.join("data/sub/file")));
        }
        for r in both(&f.root, "chain/file", false) {
            assert!(same_file(&r.unwrap(), &f.root.join("data/sub/file")));
        }
        // `..` inside the volume that comes back into it.
        symlink("../../data", f.root.join("data/sub/back")).unwrap();
        for r in both(&f.root, "data/sub/back/sub/file", false) {
            assert!(same_file(&r.unwrap(), &f.root.join("data/sub/file")));
        }
    }

    #[test]
    fn missing_nested_directories_are_created_inside_with_the_root_mode() {
        let f = fixture();
        let fd = open_in_volume(&f.root, Path::new("a/b/c"), true).unwrap();
        let made = f.root.join("a/b/c");
        assert!(made.is_dir());
        assert!(same_file(&fd, &made));
        for d in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(f.root.join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o777, "{d} has the volume root's mode");
        }
        // The walk alone does the same.
        let root_fd =
            rustix::fs::open(&f.root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let fd = walk(root_fd, Path::new("w/x"), Some(Mode::from_raw_mode(0o750))).unwrap();
        assert!(same_file(&fd, &f.root.join("w/x")));
        // Without create, a missing path is an error.
        assert!(matches!(
            open_in_volume(&f.root, Path::new("nope"), false),
            Err(SubPathError::Resolve { .. })
        ));
    }

    #[test]
    fn planted_symlink_on_the_creation_path_is_not_followed() {
        let f = fixture();
        symlink(&f.host, f.root.join("a")).unwrap();
        symlink("../host/made", f.root.join("dangling")).unwrap();
        assert_escapes(
            &both(&f.root, "a/new/deeper", true),
            "absolute link on the way",
        );
        assert_escapes(&both(&f.root, "dangling", true), "dangling link out");
        assert_escapes(
            &both(&f.root, "dangling/x", true),
            "dangling link out, nested",
        );
        assert!(!f.host.join("new").exists(), "nothing created on the host");
        assert!(!f.host.join("made").exists(), "nothing created on the host");
        // A dangling link that stays inside gets its target created inside.
        symlink("inside", f.root.join("d2")).unwrap();
        for r in both(&f.root, "d2", true) {
            assert!(same_file(&r.unwrap(), &f.root.join("inside")));
        }
    }

    #[test]
    fn links_into_proc_and_link_loops_are_refused() {
        let f = fixture();
        symlink("/proc/self/root", f.root.join("magic")).unwrap();
        assert_escapes(&both(&f.root, "magic", false), "magic link");
        symlink("loop2", f.root.join("loop1")).unwrap();
        symlink("loop1", f.root.join("loop2")).unwrap();
        for r in both(&f.root, "loop1", true) {
            assert!(matches!(r, Err(SubPathError::Resolve { .. })), "{r:?}");
        }
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_octal(r"/a\040b\134c\011"), b"/a b\\c\t".to_vec());
        assert_eq!(unescape_octal(r"/x\9"), b"/x\\9".to_vec());
    }

    /// Unmounts a target when the test ends, whatever happens.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = unmount_all(&self.0);
        }
    }

    #[test]
    fn bind_mounts_the_descriptor_reuses_the_same_bind_and_replaces_a_changed_one() {
        assert!(rustix::process::geteuid().is_root(), "needs root to mount");
        let f = fixture();
        std::fs::create_dir(f.root.join("one")).unwrap();
        std::fs::write(f.root.join("one/f"), "1").unwrap();
        std::fs::write(f.root.join("file"), "plain").unwrap();
        let target = f.root.parent().unwrap().join("subpaths/vol/c/0");
        let _guard = Unmount(target.clone());
        let fd = open_in_volume(&f.root, Path::new("one"), true).unwrap();
        bind(&fd, &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("f")).unwrap(), "1");
        assert!(has_mounts_below(&target));
        // The same file again: the bind stays, nothing is stacked on it.
        bind(&fd, &target).unwrap();
        let stacked = mount_points().iter().filter(|m| **m == target).count();
        assert_eq!(stacked, 1, "one bind, re-used");
        // Something else (a file now): the old bind goes, the target becomes a file.
        let fd = open_in_volume(&f.root, Path::new("file"), false).unwrap();
        bind(&fd, &target).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "plain");
        let stacked = mount_points().iter().filter(|m| **m == target).count();
        assert_eq!(stacked, 1, "the old bind was replaced");
        unmount_all(&target).unwrap();
        assert!(!has_mounts_below(&target));
    }
}
