//! Termination messages, as upstream: every container gets a host file of its own
//! (`<root-dir>/pods/<uid>/containers/<name>/<random id>`, mode 0666) mounted at its
//! `terminationMessagePath` (default `/dev/termination-log`). After the container exits, the
//! file's last 4096 bytes become `state.terminated.message`; with
//! `terminationMessagePolicy: FallbackToLogsOnError` a failed container with an empty file
//! reports the tail of its log instead (last 80 lines, at most 2048 bytes).
//!
//! The container can write anything into the file, and its directory is the kubelet's: reads
//! never follow a symlink, never block on a FIFO, and read a bounded amount.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

/// Upstream's `MaxContainerTerminationMessageLength`.
pub const MAX_MESSAGE: usize = 4096;
/// Upstream's `MaxPodTerminationMessageLogLength`: shared by all containers of a pod.
pub const MAX_POD_MESSAGES: usize = 12 * 1024;
/// Upstream's `MaxContainerTerminationMessageLogLines` and `...LogLength`.
pub const LOG_TAIL_LINES: usize = 80;
pub const LOG_TAIL_BYTES: usize = 2048;
/// How much of the end of a log file is read to find its last lines.
const LOG_READ_WINDOW: u64 = 256 * 1024;

/// The default `terminationMessagePath`.
pub const DEFAULT_PATH: &str = "/dev/termination-log";

/// A termination message file could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TerminationError {
    #[error("create termination message file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where container `c` wants its message (`None`: an empty path, no file).
pub fn container_path(c: &Container) -> Option<String> {
    match c.termination_message_path.as_deref() {
        Some("") => None,
        Some(p) => Some(p.to_string()),
        None => Some(DEFAULT_PATH.to_string()),
    }
}

/// The directory of container `name`'s message files.
pub fn container_dir(root_dir: &Path, uid: &str, name: &str) -> PathBuf {
    root_dir
        .join("pods")
        .join(uid)
        .join("containers")
        .join(name)
}

fn random_id() -> String {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // Uniqueness is all that matters: the clock is a fine fallback.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        buf = t.to_le_bytes();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates an empty message file for a new instance of container `name` (mode 0666, so that
/// a container running as any user can write it); returns its host path.
pub fn create_file(root_dir: &Path, uid: &str, name: &str) -> Result<PathBuf, TerminationError> {
    let dir = container_dir(root_dir, uid, name);
    let path = dir.join(random_id());
    let err = |path: &Path, source| TerminationError::Create {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o666)
        .open(&path)
        .map_err(|e| err(&path, e))?;
    // The umask would otherwise take the write bits away.
    f.set_permissions(std::fs::Permissions::from_mode(0o666))
        .map_err(|e| err(&path, e))?;
    Ok(path)
}

/// Opens `path` for reading without following a symlink and without blocking; only a regular
/// file is read.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// The last `max` bytes of the regular file at `path`.
fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

/// The message in the file at `host_path` (its last [`MAX_MESSAGE`] bytes), when that path is
/// one of ours for container `name` of pod `uid`. A missing file is an empty message; another
/// failure is reported as the message, as upstream does.
pub fn read_message(root_dir: &Path, uid: &str, name: &str, host_path: &Path) -> String {
    let dir = container_dir(root_dir, uid, name);
    // Only a file directly in the container's directory: never a path a runtime's status
    // could point elsewhere.
    if host_path.parent() != Some(dir.as_path()) {
        return String::new();
    }
    match read_tail(host_path, MAX_MESSAGE as u64) {
        Ok(data) => String::from_utf8_lossy(&data).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => format!(
            "Error on reading termination log {}: {e}",
            host_path.display()
        ),
    }
}

/// The tail of the CRI log at `log_path`: the text of its last [`LOG_TAIL_LINES`] lines, at
/// most [`LOG_TAIL_BYTES`] of it (the end).
pub fn log_tail(log_path: &Path) -> String {
    let Ok(mut f) = open_regular(log_path) else {
        return String::new();
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return String::new();
    };
    let start = len.saturating_sub(LOG_READ_WINDOW);
    let mut data = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err()
        || f.take(LOG_READ_WINDOW).read_to_end(&mut data).is_err()
    {
        return String::new();
    }
    // Started mid-file: the first, partial, line is not a log line.
    if start > 0 {
        match data.iter().position(|b| *b == b'\n') {
            Some(nl) => {
                data.drain(..=nl);
            }
            None => return String::new(),
        }
    }
    let mut parser = crate::server::logs::Parser::default();
    let messages = parser.feed(&data);
    let skip = messages.len().saturating_sub(LOG_TAIL_LINES);
    let text: Vec<u8> = messages[skip..]
        .iter()
        .flat_map(|m| m.text.iter().copied())
        .collect();
    let tail = &text[text.len().saturating_sub(LOG_TAIL_BYTES)..];
    String::from_utf8_lossy(tail).into_owned()
}

/// Whether `policy` falls back to the log for a container that exited with `exit_code`.
pub fn falls_back_to_logs(policy: Option<&str>, exit_code: i32, reason: &str) -> bool {
    policy == Some("FallbackToLogsOnError") && exit_code != 0 && reason != "ContainerCannotRun"
}

/// Each container's share of the pod's message budget (upstream divides it evenly).
pub fn per_container_budget(containers: usize) -> usize {
    MAX_POD_MESSAGES / containers.max(1)
}

/// `message` cut to at most `max` bytes (keeping its start, as upstream, on a char boundary).
pub fn truncate(message: &str, max: usize) -> &str {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_files_are_0666_and_read_without_following_links() {
        let root = tempfile::tempdir().unwrap();
        let path = create_file(root.path(), "u", "app").unwrap();
        assert_eq!(
            path.parent().unwrap(),
            container_dir(root.path(), "u", "app")
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
        assert_eq!(read_message(root.path(), "u", "app", &path), "");
        std::fs::write(&path, "bye\n").unwrap();
        assert_eq!(read_message(root.path(), "u", "app", &path), "bye\n");
        // Only the last 4096 bytes.
        let long = format!("{}END", "x".repeat(10_000));
        std::fs::write(&path, &long).unwrap();
        let m = read_message(root.path(), "u", "app", &path);
        assert_eq!(m.len(), MAX_MESSAGE);
        assert!(m.ends_with("END"));
        // A symlink planted in its place is not followed.
        let secret = root.path().join("secret");
        std::fs::write(&secret, "host secret").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        let m = read_message(root.path(), "u", "app", &path);
        assert!(!m.contains("host secret"), "{m}");
        assert!(m.starts_with("Error on reading termination log"), "{m}");
        // Paths outside the container's directory are ignored.
        assert_eq!(read_message(root.path(), "u", "app", &secret), "");
        // A missing file is an empty message.
        assert_eq!(
            read_message(
                root.path(),
                "u",
                "app",
                &container_dir(root.path(), "u", "app").join("gone")
            ),
            ""
        );
    }

    #[test]
    fn a_fifo_does_not_block_the_reader() {
        let root = tempfile::tempdir().unwrap();
        let dir = container_dir(root.path(), "u", "app");
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        let m = read_message(root.path(), "u", "app", &fifo);
        assert!(m.contains("not a regular file"), "{m}");
    }

    #[test]
    fn the_log_tail_is_the_last_80_lines_and_at_most_2048_bytes() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("0.log");
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!(
                "2026-01-01T00:00:00.000000000Z stdout F line {i}\n"
            ));
        }
        text.push_str("2026-01-01T00:00:00.000000000Z stderr P part-\n");
        text.push_str("2026-01-01T00:00:00.000000000Z stderr F one\n");
        std::fs::write(&log, &text).unwrap();
        let tail = log_tail(&log);
        // 80 lines of the file, as upstream's reader counts them: the partial line is one.
        assert!(tail.starts_with("line 22\n"), "{tail}");
        assert!(tail.ends_with("line 99\npart-one\n"), "{tail}");
        let mut big = String::new();
        for _ in 0..10 {
            big.push_str(&format!(
                "2026-01-01T00:00:00.000000000Z stdout F {}\n",
                "y".repeat(1000)
            ));
        }
        std::fs::write(&log, &big).unwrap();
        assert_eq!(log_tail(&log).len(), LOG_TAIL_BYTES);
        assert_eq!(log_tail(&d.path().join("missing")), "");
    }

    #[test]
    fn policies_budgets_and_paths() {
        assert!(falls_back_to_logs(
            Some("FallbackToLogsOnError"),
            1,
            "Error"
        ));
        assert!(!falls_back_to_logs(
            Some("FallbackToLogsOnError"),
            0,
            "Completed"
        ));
        assert!(!falls_back_to_logs(Some("File"), 1, "Error"));
        assert_eq!(per_container_budget(4), 3072);
        assert_eq!(per_container_budget(0), MAX_POD_MESSAGES);
        assert_eq!(truncate("héllo", 2), "h");
        let c = |p: Option<&str>| Container {
            termination_message_path: p.map(String::from),
            ..Default::default()
        };
        assert_eq!(container_path(&c(None)).as_deref(), Some(DEFAULT_PATH));
        assert_eq!(
            container_path(&c(Some("/tmp/m"))).as_deref(),
            Some("/tmp/m")
        );
        assert_eq!(container_path(&c(Some(""))), None);
    }
}
