//! Container log rotation, as upstream's container log manager does it: every
//! `containerLogMonitorInterval` each running container's log is checked; one that reached
//! `containerLogMaxSize` is renamed to `<log>.<YYYYMMDD-hhmmss>` and the runtime is asked to
//! reopen it (ReopenContainerLog). Older rotated files are gzip-compressed, and only
//! `containerLogMaxFiles - 2` of them are kept beside the newest rotated file and the live
//! log, so a container keeps at most `containerLogMaxSize x containerLogMaxFiles` on disk
//! (give or take what it writes within one interval).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use strake_types::cri;
use tokio::sync::Semaphore;

use crate::runtime::Runtime;

const COMPRESSED: &str = ".gz";
const TEMPORARY: &str = ".tmp";

/// When and how logs rotate (`containerLogMaxSize`, `containerLogMaxFiles`,
/// `containerLogMaxWorkers`, `containerLogMonitorInterval`).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub max_size: u64,
    pub max_files: usize,
    pub max_workers: usize,
    pub interval: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_size: 10 * 1024 * 1024,
            max_files: 5,
            max_workers: 1,
            interval: Duration::from_secs(10),
        }
    }
}

/// What one rotation does to the files already rotated (`<log>.*`), oldest first by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Leftovers of an interrupted rotation and files beyond `max_files`.
    pub remove: Vec<PathBuf>,
    /// Rotated files still plain, to gzip.
    pub compress: Vec<PathBuf>,
}

/// Plans a rotation of a log whose rotated siblings are `rotated` (upstream's
/// `cleanupUnusedLogs`, `removeExcessLogs`, compress the rest).
pub fn plan(rotated: &[PathBuf], max_files: usize) -> Plan {
    let name = |p: &PathBuf| p.to_string_lossy().into_owned();
    let all: Vec<String> = rotated.iter().map(name).collect();
    let mut plan = Plan::default();
    let mut in_use: Vec<String> = Vec::new();
    for l in &all {
        // A temporary file is a compression that did not finish; a plain file whose
        // compressed copy exists was compressed but not yet removed.
        let unused = l.ends_with(TEMPORARY)
            || (!l.ends_with(COMPRESSED) && all.contains(&format!("{l}{COMPRESSED}")));
        if unused {
            plan.remove.push(PathBuf::from(l));
        } else {
            in_use.push(l.clone());
        }
    }
    in_use.sort();
    // The live log and the one about to be rotated are the other two files.
    let keep = max_files.saturating_sub(2);
    let excess = in_use.len().saturating_sub(keep);
    plan.remove
        .extend(in_use.drain(..excess).map(PathBuf::from));
    plan.compress = in_use
        .into_iter()
        .filter(|l| !l.ends_with(COMPRESSED))
        .map(PathBuf::from)
        .collect();
    plan
}

/// Why one container's log could not be rotated.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reopen log of container {id}")]
    Reopen {
        id: String,
        #[source]
        source: crate::runtime::RuntimeError,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RotateError {
    let path = path.to_path_buf();
    move |source| RotateError::Io { op, path, source }
}

/// Removes a removed container's log and its rotated siblings, as upstream's container GC
/// does. Only a regular file under `logs_dir` is touched (the path comes from the runtime).
pub fn remove_container_log(logs_dir: &Path, log: &Path) {
    let inside = log.is_absolute()
        && log.starts_with(logs_dir)
        && !log
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if !inside {
        return;
    }
    let mut files = rotated_files(log).unwrap_or_default();
    files.push(log.to_path_buf());
    for f in files {
        // Never follow a link a pod may have planted; unlink the entry itself.
        if std::fs::symlink_metadata(&f).is_ok_and(|m| !m.is_dir()) {
            let _ = std::fs::remove_file(&f);
        }
    }
}

/// The rotated siblings of `log` (`<log>.*`).
fn rotated_files(log: &Path) -> Result<Vec<PathBuf>, RotateError> {
    let (Some(dir), Some(base)) = (log.parent(), log.file_name()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{}.", base.to_string_lossy());
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io("list", dir))?.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            out.push(e.path());
        }
    }
    Ok(out)
}

/// The rotated files of `log` that hold its earlier lines, oldest first: compressed or not,
/// never a compression's temporary file, and a file being compressed once.
pub fn readable_rotations(log: &Path) -> Vec<PathBuf> {
    let all = rotated_files(log).unwrap_or_default();
    let names: std::collections::BTreeSet<String> =
        all.iter().map(|p| p.display().to_string()).collect();
    let mut out: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| {
            let name = p.display().to_string();
            !name.ends_with(TEMPORARY)
                && name
                    .strip_suffix(COMPRESSED)
                    .is_none_or(|plain| !names.contains(plain))
        })
        .collect();
    out.sort_by_key(|p| {
        let name = p.display().to_string();
        name.strip_suffix(COMPRESSED)
            .map(String::from)
            .unwrap_or(name)
    });
    out
}

/// Gzips `path` to `path.gz` through a temporary file, then removes `path`.
fn compress(path: &Path) -> Result<(), RotateError> {
    let tmp = PathBuf::from(format!("{}{TEMPORARY}", path.display()));
    let done = PathBuf::from(format!("{}{COMPRESSED}", path.display()));
    let result = (|| {
        let mut src = std::fs::File::open(path).map_err(io("open", path))?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        std::io::copy(&mut src, &mut gz).map_err(io("compress", path))?;
        gz.finish()
            .and_then(|mut f| f.flush())
            .map_err(io("compress", path))?;
        std::fs::rename(&tmp, &done).map_err(io("rename", &tmp))?;
        std::fs::remove_file(path).map_err(io("remove", path))
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Prepares the rotated files of `log` (cleanup, excess removal, compression) and renames the
/// live log aside; returns the new name.
fn rotate_files(log: &Path, max_files: usize, stamp: &str) -> Result<PathBuf, RotateError> {
    let plan = plan(&rotated_files(log)?, max_files);
    for p in &plan.remove {
        std::fs::remove_file(p).map_err(io("remove", p))?;
    }
    for p in &plan.compress {
        compress(p)?;
    }
    let rotated = PathBuf::from(format!("{}.{stamp}", log.display()));
    std::fs::rename(log, &rotated).map_err(io("rename", log))?;
    Ok(rotated)
}

fn stamp() -> String {
    jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string()
}

/// Rotates the log of container `id` at `log` if it reached the policy's size.
pub async fn check(
    runtime: &Runtime,
    policy: &Policy,
    id: &str,
    log: &Path,
) -> Result<bool, RotateError> {
    let reopen = |id: &str| {
        let mut client = runtime.runtime_client();
        let req = cri::ReopenContainerLogRequest {
            container_id: id.to_string(),
        };
        async move {
            runtime
                .call_with("ReopenContainerLog", None, client.reopen_container_log(req))
                .await
        }
    };
    let size = match tokio::fs::metadata(log).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Removed behind our back: have the runtime make a new one.
            reopen(id).await.map_err(|source| RotateError::Reopen {
                id: id.to_string(),
                source,
            })?;
            return Ok(false);
        }
        Err(e) => return Err(io("stat", log)(e)),
    };
    if size < policy.max_size {
        return Ok(false);
    }
    let (path, max_files, stamp) = (log.to_path_buf(), policy.max_files, stamp());
    let rotated = tokio::task::spawn_blocking(move || rotate_files(&path, max_files, &stamp))
        .await
        .map_err(|e| io("rotate", log)(std::io::Error::other(e)))??;
    if let Err(source) = reopen(id).await {
        // Put the log back so the next round tries again.
        let _ = std::fs::rename(&rotated, log);
        return Err(RotateError::Reopen {
            id: id.to_string(),
            source,
        });
    }
    // A container that wrote faster than the monitor looks left a rotated file over the size:
    // only its newest lines within the size are kept, so that the logs on disk stay within
    // `max_size x max_files` (upstream keeps such a file whole).
    let max_size = policy.max_size;
    tokio::task::spawn_blocking(move || trim_to(&rotated, max_size))
        .await
        .map_err(|e| io("trim", log)(std::io::Error::other(e)))??;
    Ok(true)
}

/// Cuts rotated log `path` down to its last whole lines within `max` bytes, through a
/// temporary file (a leftover of which the next rotation removes).
fn trim_to(path: &Path, max: u64) -> Result<(), RotateError> {
    use std::io::{BufRead, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(io("open", path))?;
    let size = file.metadata().map_err(io("stat", path))?.len();
    if size <= max {
        return Ok(());
    }
    // The byte before the window tells whether it starts a line.
    file.seek(SeekFrom::Start(size - max - 1))
        .map_err(io("seek", path))?;
    let mut reader = std::io::BufReader::new(file);
    let mut before = [0u8];
    std::io::Read::read_exact(&mut reader, &mut before).map_err(io("read", path))?;
    if before[0] != b'\n' {
        // Skip the line cut in the middle (CRI log lines are short: the runtime splits long
        // ones); never more than the window, which holds nothing whole without a line end.
        let mut skipped = Vec::new();
        std::io::Read::take(&mut reader, max)
            .read_until(b'\n', &mut skipped)
            .map_err(io("read", path))?;
    }
    let tmp = PathBuf::from(format!("{}{TEMPORARY}", path.display()));
    let result = (|| {
        let mut out = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        std::io::copy(&mut reader, &mut out).map_err(io("copy", path))?;
        std::fs::rename(&tmp, path).map_err(io("rename", &tmp))
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Checks every running container's log each interval, `max_workers` at a time.
pub async fn run(runtime: Runtime, policy: Policy) {
    let workers = Arc::new(Semaphore::new(policy.max_workers.max(1)));
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut client = runtime.runtime_client();
        let req = cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        };
        let containers = match runtime
            .call_with("ListContainers", None, client.list_containers(req))
            .await
        {
            Ok(r) => r.containers,
            Err(e) => {
                tracing::warn!(error = %e, "log rotation: list containers failed");
                continue;
            }
        };
        let check_one = |c: cri::Container| {
            let (runtime, policy) = (runtime.clone(), policy.clone());
            async move {
                let mut client = runtime.runtime_client();
                let req = cri::ContainerStatusRequest {
                    container_id: c.id.clone(),
                    verbose: false,
                };
                let log = match runtime
                    .call_with("ContainerStatus", None, client.container_status(req))
                    .await
                {
                    Ok(r) => r.status.map(|s| s.log_path).unwrap_or_default(),
                    Err(e) => {
                        tracing::debug!(container = %c.id, error = %e, "log rotation: status failed");
                        return;
                    }
                };
                if log.is_empty() {
                    return;
                }
                match check(&runtime, &policy, &c.id, Path::new(&log)).await {
                    Ok(true) => tracing::debug!(container = %c.id, log, "rotated container log"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(container = %c.id, error = %e, "container log rotation failed")
                    }
                }
            }
        };
        limited(containers, &workers, check_one).await;
    }
}

/// Runs `f` on every item, at most as many at a time as `workers` has permits
/// (`containerLogMaxWorkers`), and returns once all are done.
async fn limited<T, F, Fut>(items: Vec<T>, workers: &Arc<Semaphore>, f: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut batch = tokio::task::JoinSet::new();
    for item in items {
        let work = f(item);
        let workers = workers.clone();
        batch.spawn(async move {
            if let Ok(_permit) = workers.acquire_owned().await {
                work.await;
            }
        });
    }
    while batch.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_most_max_workers_containers_are_checked_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for max in [1, 3] {
            let (now, peak, done) = (
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicUsize::new(0)),
            );
            let work = |_: usize| {
                let (now, peak, done) = (now.clone(), peak.clone(), done.clone());
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            };
            limited((0..10).collect(), &Arc::new(Semaphore::new(max)), work).await;
            assert_eq!(done.load(Ordering::SeqCst), 10);
            assert_eq!(peak.load(Ordering::SeqCst), max, "max_workers {max}");
        }
    }

    #[test]
    fn a_removed_containers_logs_go_but_nothing_outside_the_logs_dir() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("pods");
        let c = logs.join("ns_p_u/app");
        std::fs::create_dir_all(&c).unwrap();
        for f in [
            "0.log",
            "0.log.20260101-000000.gz",
            "0.log.20260101-000001",
            "1.log",
        ] {
            std::fs::write(c.join(f), "x").unwrap();
        }
        let outside = dir.path().join("secret.log");
        std::fs::write(&outside, "keep").unwrap();
        remove_container_log(&logs, &c.join("0.log"));
        let mut left: Vec<String> = std::fs::read_dir(&c)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["1.log"]);
        remove_container_log(&logs, &logs.join("../secret.log"));
        remove_container_log(&logs, &outside);
        remove_container_log(&logs, Path::new("relative/0.log"));
        assert!(outside.exists());
    }

    fn paths(names: &[&str]) -> Vec<PathBuf> {
        names
            .iter()
            .map(|n| PathBuf::from(format!("/l/0.log.{n}")))
            .collect()
    }

    #[test]
    fn plan_keeps_max_files_minus_two_and_compresses_all_but_new() {
        // Five files allowed: live + newly rotated + three older (compressed).
        let p = plan(
            &paths(&[
                "20260101-000001.gz",
                "20260101-000002.gz",
                "20260101-000003.gz",
                "20260101-000004",
            ]),
            5,
        );
        assert_eq!(p.remove, paths(&["20260101-000001.gz"]));
        assert_eq!(p.compress, paths(&["20260101-000004"]));
        // Leftovers of an interrupted compression go first.
        let p = plan(
            &paths(&[
                "20260101-000001",
                "20260101-000001.gz",
                "20260101-000002.tmp",
            ]),
            5,
        );
        assert_eq!(p.remove, paths(&["20260101-000001", "20260101-000002.tmp"]));
        assert!(p.compress.is_empty());
        // Two files allowed: no rotated file is kept besides the one being made.
        let p = plan(&paths(&["20260101-000001"]), 2);
        assert_eq!(p.remove, paths(&["20260101-000001"]));
    }

    #[test]
    fn an_oversized_rotated_log_keeps_its_newest_whole_lines_within_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log.20260101-000000");
        let text: String = (0..1000).map(|i| format!("line {i:04}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        trim_to(&path, 100).unwrap();
        let kept = std::fs::read_to_string(&path).unwrap();
        assert!(kept.len() <= 100, "{}", kept.len());
        assert!(
            kept.ends_with("line 0999\n") && kept.starts_with("line "),
            "{kept:?}"
        );
        assert_eq!(kept.lines().count(), 10);
        // Within the size already: untouched.
        trim_to(&path, 100).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), kept);
        assert!(!dir.path().join("0.log.20260101-000000.tmp").exists());
    }

    #[test]
    fn rotation_bounds_what_stays_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        let chunk = vec![b'x'; 1000];
        for i in 0..12 {
            std::fs::write(&log, &chunk).unwrap();
            rotate_files(&log, 5, &format!("20260101-{i:06}")).unwrap();
        }
        std::fs::write(&log, &chunk).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "0.log",
                "0.log.20260101-000008.gz",
                "0.log.20260101-000009.gz",
                "0.log.20260101-000010.gz",
                "0.log.20260101-000011",
            ]
        );
        // A compressed file holds the original bytes.
        let gz = std::fs::File::open(dir.path().join("0.log.20260101-000010.gz")).unwrap();
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut text).unwrap();
        assert_eq!(text, chunk);
    }
}
