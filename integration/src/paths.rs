//! Where the test bed's pinned versions and cached binaries are.

use std::path::PathBuf;

use crate::{Error, Result};

/// `integration/versions.env`, compiled in so tests and the cache agree on one pin.
const VERSIONS_ENV: &str = include_str!("../versions.env");

/// The pinned upstream versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    pub kubernetes: String,
    pub etcd: String,
    pub cri_tools: String,
    pub cni_plugins: String,
    pub gvisor: String,
}

impl Versions {
    /// The versions pinned in `integration/versions.env`.
    pub fn pinned() -> Self {
        Self::parse(VERSIONS_ENV)
    }

    fn parse(text: &str) -> Self {
        let get = |key: &str| {
            text.lines()
                .filter_map(|l| l.trim().split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        Versions {
            kubernetes: get("KUBERNETES_VERSION"),
            etcd: get("ETCD_VERSION"),
            cri_tools: get("CRI_TOOLS_VERSION"),
            cni_plugins: get("CNI_PLUGINS_VERSION"),
            gvisor: get("GVISOR_VERSION"),
        }
    }
}

/// Root of the cache of upstream binaries and test images (`$STRAKE_CACHE`, default
/// `/var/cache/strake`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("STRAKE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/strake"))
}

fn existing(path: PathBuf) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingBinary { path })
    }
}

/// A Kubernetes binary (`kube-apiserver`, `kubectl`, `kubelet`, ...) of the pinned release.
pub fn kubernetes_bin(name: &str) -> Result<PathBuf> {
    let v = Versions::pinned();
    existing(cache_dir().join(format!("kubernetes-{}/bin/{name}", v.kubernetes)))
}

/// The pinned `etcd`.
pub fn etcd_bin() -> Result<PathBuf> {
    let v = Versions::pinned();
    existing(cache_dir().join(format!("etcd-{}/bin/etcd", v.etcd)))
}

/// `crictl` or `critest` of the pinned cri-tools.
pub fn cri_tools_bin(name: &str) -> Result<PathBuf> {
    let v = Versions::pinned();
    existing(cache_dir().join(format!("cri-tools-{}/bin/{name}", v.cri_tools)))
}

/// The directory of the pinned CNI plugins (`bridge`, `host-local`, `loopback`, `portmap`, ...).
pub fn cni_bin_dir() -> Result<PathBuf> {
    let v = Versions::pinned();
    existing(cache_dir().join(format!("cni-plugins-{}/bin", v.cni_plugins)))
}

/// gVisor's `runsc` of the pinned commit.
pub fn runsc_bin() -> Result<PathBuf> {
    let v = Versions::pinned();
    existing(cache_dir().join(format!("gvisor-{}/bin/runsc", v.gvisor)))
}

/// The published test images (registry storage roots, htpasswd, `images.txt`).
pub fn images_dir() -> Result<PathBuf> {
    existing(cache_dir().join("images-current/images.txt"))?;
    Ok(cache_dir().join("images-current"))
}

/// The `strake-testbed` helper binary (forwarder, `up`), found next to the running test or
/// binary, or through `$STRAKE_TESTBED_EXE`.
pub fn testbed_exe() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("STRAKE_TESTBED_EXE") {
        return existing(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(crate::io_err("locate", "current executable"))?;
    if exe.file_name().is_some_and(|n| n == "strake-testbed") {
        return Ok(exe);
    }
    existing(beside_current_exe(&exe, "strake-testbed"))
}

/// `name` in the directory of binaries that `exe` belongs to: binaries live in
/// `target/<profile>`, test binaries in `target/<profile>/deps`.
fn beside_current_exe(exe: &std::path::Path, name: &str) -> PathBuf {
    let dir = exe.parent().unwrap_or(std::path::Path::new("."));
    let here = dir.join(name);
    if here.exists() || dir.file_name().is_none_or(|n| n != "deps") {
        return here;
    }
    dir.parent().unwrap_or(dir).join(name)
}

/// A binary of this workspace (`strake-runtime`, `strake-pause`, ...) from the same target
/// directory as the running test. `cargo test --workspace` builds them all; a single-package
/// run may need `cargo build -p <package>` first, which the error says.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(crate::io_err("locate", "current executable"))?;
    let path = beside_current_exe(&exe, name);
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::Invalid(format!(
            "{} is missing: run `cargo build --workspace --bins` first",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_versions_are_all_set() {
        let v = Versions::pinned();
        for (name, value) in [
            ("kubernetes", &v.kubernetes),
            ("etcd", &v.etcd),
            ("cri-tools", &v.cri_tools),
            ("cni-plugins", &v.cni_plugins),
            ("gvisor", &v.gvisor),
        ] {
            assert!(
                value.starts_with('v') && value.matches('.').count() == 2,
                "{name}: {value:?}"
            );
        }
    }

    #[test]
    fn parse_ignores_comments_and_quotes() {
        let v = Versions::parse(
            "# KUBERNETES_VERSION=v0\nKUBERNETES_VERSION=\"v1.2.3\"\nETCD_VERSION=v3\n",
        );
        assert_eq!(v.kubernetes, "v1.2.3");
        assert_eq!(v.etcd, "v3");
        assert_eq!(v.cri_tools, "");
    }
}
