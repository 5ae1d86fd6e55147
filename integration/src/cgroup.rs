//! A cgroup parent that belongs to one test run.
//!
//! Containers started by tests must land below a cgroup the test created itself, and nowhere else
//! (this machine's own processes live in memory cgroups that must not be disturbed). OCI runtimes
//! (runc, crun) resolve a *relative* `cgroupsPath` against their own cgroup in each hierarchy, so a
//! relative parent such as `strake-tb-1234-0` puts containers under the test's own cgroups.
//! Dropping the guard removes what is left below that parent, deepest first, and nothing else.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A relative cgroup parent name, cleaned up in every hierarchy on drop.
#[derive(Debug)]
pub struct CgroupParent {
    name: String,
}

impl CgroupParent {
    /// A fresh name, unique to this process.
    pub fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        CgroupParent {
            name: format!("strake-tb-{}-{n}", std::process::id()),
        }
    }

    /// The relative path to hand to a runtime as cgroup parent.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where this parent lives (or would live) in each mounted hierarchy, resolved against our
    /// own cgroup there, as the OCI runtime resolves it.
    pub fn locations(&self) -> Vec<PathBuf> {
        own_cgroups()
            .into_iter()
            .map(|(mount, own)| mount.join(own.trim_start_matches('/')).join(&self.name))
            .collect()
    }
}

impl Default for CgroupParent {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for dir in self.locations() {
            if dir.exists() {
                remove_tree(&dir);
            }
        }
    }
}

/// Removes an (empty of processes) cgroup tree, children first. cgroup directories hold only
/// virtual files, which rmdir removes with them.
pub(crate) fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove test cgroup");
    }
}

/// (mount point, our cgroup path in it) for every mounted cgroup hierarchy, v1 and v2.
pub(crate) fn own_cgroups() -> Vec<(PathBuf, String)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut out = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let (mount, fstype, opts) = (f[1], f[2], f[3]);
        let key = match fstype {
            "cgroup2" => Some(String::new()),
            // The controllers of a v1 hierarchy are among its mount options.
            "cgroup" => Some(
                opts.split(',')
                    .filter(|o| {
                        !matches!(*o, "rw" | "ro" | "relatime" | "nosuid" | "nodev" | "noexec")
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => None,
        };
        let Some(key) = key else { continue };
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let same = if key.is_empty() {
                ctrls.is_empty()
            } else {
                let mut a: Vec<&str> = ctrls.split(',').collect();
                let mut b: Vec<&str> = key.split(',').collect();
                a.sort_unstable();
                b.sort_unstable();
                a == b
            };
            same.then(|| path.to_string())
        });
        if let Some(path) = path {
            out.push((PathBuf::from(mount), path));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_below_our_own_cgroups() {
        let parent = CgroupParent::new();
        let locations = parent.locations();
        assert!(!locations.is_empty(), "no cgroup hierarchy found");
        for l in &locations {
            assert!(l.starts_with("/sys/fs/cgroup"), "{}", l.display());
            assert!(l.ends_with(parent.name()), "{}", l.display());
        }
    }
}
