//! Mount syscalls of the runtime (bind mounts pinning namespaces, tmpfs, overlay rootfs,
//! unmount): the one place that calls mount(2) and umount2(2).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub(crate) fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

pub(crate) fn bind_mount(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::File::create(dst)?;
    let (s, d) = (cstring(src)?, cstring(dst)?);
    // SAFETY: both are valid NUL-terminated paths; a bind mount takes no data argument.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(crate) fn mount_tmpfs(dst: &Path, options: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    let (d, o) = (cstring(dst)?, CString::new(options)?);
    let fstype = c"tmpfs";
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"shm".as_ptr(),
            d.as_ptr(),
            fstype.as_ptr(),
            flags,
            o.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmounts `path` if something is mounted there; missing paths and non-mounts are fine.
pub(crate) fn unmount(path: &Path) -> std::io::Result<()> {
    let Ok(p) = cstring(path) else { return Ok(()) };
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        _ => Err(err),
    }
}

pub(crate) fn mount_overlay(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> std::io::Result<()> {
    if lower.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the image has no layers",
        ));
    }
    let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    let data = std::ffi::CString::new(options)?;
    let t = cstring(target)?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"overlay".as_ptr(),
            t.as_ptr(),
            c"overlay".as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
