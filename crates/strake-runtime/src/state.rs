//! Durable state files: written so that a crash at any moment leaves the old or the new
//! content, never a mix.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of the daemon's state roots that a container process may have to traverse (as
/// containerd's `/var/lib/containerd` and `/run/containerd`): others may pass, not list.
pub const MODE_TRAVERSE: u32 = 0o711;
/// Mode of directories only root may enter: everything below them (image layers, container
/// upper dirs and rootfs mounts, with any setuid file an image carries) is out of other host
/// users' reach (the CVE-2021-41103 class).
pub const MODE_PRIVATE: u32 = 0o700;

/// Makes `dir` a directory of exactly `mode`, whatever the umask: created if missing (missing
/// parents get [`MODE_TRAVERSE`]), and an existing directory's mode corrected, so that state
/// left by an older version with 0755 directories is closed on start. A symlink is refused.
pub fn create_dir_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(MODE_TRAVERSE)
            .create(parent)?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !std::fs::symlink_metadata(dir)?.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", dir.display()),
                ));
            }
        }
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// then fsync of the directory so the rename itself survives a crash.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, data, 0o600)
}

/// [`write_atomic`] with the file's mode: 0644 for files a container's user of any UID reads
/// through a bind mount (`/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`), which the
/// temporary file's 0600 would hide from it.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_get_their_mode_whatever_the_umask_and_old_modes_are_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let deep = dir.path().join("a/b/c");
        create_dir_mode(&deep, MODE_PRIVATE).unwrap();
        assert_eq!(mode(&deep), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o711 & !umask());
        // An upgrade from a version that made it 0755.
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir_mode(&deep, MODE_PRIVATE).unwrap();
        assert_eq!(mode(&deep), 0o700);
        let fs = deep.join("fs");
        create_dir_mode(&fs, 0o755).unwrap();
        assert_eq!(mode(&fs), 0o755);
        std::os::unix::fs::symlink(&deep, dir.path().join("link")).unwrap();
        assert!(create_dir_mode(&dir.path().join("link"), MODE_PRIVATE).is_err());
    }

    fn umask() -> u32 {
        // SAFETY: umask(2) cannot fail; set back at once.
        let old = unsafe { libc::umask(0o022) };
        unsafe { libc::umask(old) };
        old
    }

    #[test]
    fn files_get_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (private, shared) = (dir.path().join("state.json"), dir.path().join("hosts"));
        write_atomic(&private, b"{}").unwrap();
        write_atomic_mode(&shared, b"127.0.0.1 localhost\n", 0o644).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&private), 0o600);
        assert_eq!(mode(&shared), 0o644);
    }

    #[test]
    fn replaces_content_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
