//! Mount syscalls of the runtime (bind mounts pinning namespaces, tmpfs, overlay rootfs, image
//! volumes, unmount): the one place that calls mount(2) and umount2(2).

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

/// Mounts an image's layers (`lower`, top first) read-only at directory `target`, for an image
/// volume: an overlay of them, or the one layer bound, without setuid or device files.
pub(crate) fn mount_image_read_only(lower: &[PathBuf], target: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let t = cstring(target)?;
    let hardened = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    let rc = match lower {
        [] => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the image has no layers",
            ));
        }
        // overlayfs needs two lower layers when it has no upper one.
        [one] => {
            let s = cstring(one)?;
            // SAFETY: valid NUL-terminated paths that outlive the calls; binds take no data.
            unsafe {
                let rc = libc::mount(
                    s.as_ptr(),
                    t.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::mount(
                    std::ptr::null(),
                    t.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | hardened,
                    std::ptr::null(),
                );
                if rc != 0 {
                    let err = std::io::Error::last_os_error();
                    libc::umount2(t.as_ptr(), libc::MNT_DETACH);
                    return Err(err);
                }
                rc
            }
        }
        many => {
            let lowers: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
            let data = CString::new(format!("lowerdir={}", lowers.join(":")))?;
            // SAFETY: valid NUL-terminated strings that outlive the call.
            unsafe {
                libc::mount(
                    c"overlay".as_ptr(),
                    t.as_ptr(),
                    c"overlay".as_ptr(),
                    hardened,
                    data.as_ptr().cast(),
                )
            }
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
