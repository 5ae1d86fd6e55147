//! Upstream kube-proxy (the pinned release, nftables mode) in a test-bed node namespace: the
//! peer strake-proxy is measured against.
//!
//! It runs with upstream's own flags, confined to its node namespace: it creates only its
//! tables `ip kube-proxy` and `ip6 kube-proxy` there, serves health and metrics on the
//! namespace's loopback, and is told not to write the conntrack sysctls (`nf_conntrack_max` is
//! machine-wide) nor its OOM score beyond the default.

use std::path::{Path, PathBuf};

use crate::control_plane::POD_CIDR;
use crate::netns::NodeNs;
use crate::{Result, paths};

/// Where kube-proxy (and strake-proxy, which keeps upstream's ports) serves `/metrics` inside
/// the node namespace.
pub const METRICS_ADDRESS: &str = "127.0.0.1:10249";
/// Where it serves `/healthz` inside the node namespace.
pub const HEALTHZ_ADDRESS: &str = "127.0.0.1:10256";

/// The pinned `kube-proxy` binary.
pub fn binary() -> Result<PathBuf> {
    paths::kubernetes_bin("kube-proxy")
}

/// kube-proxy's command line for node `node_name`, reaching the API server with `kubeconfig`
/// (the identity needs `system:node-proxier`, e.g. user `system:kube-proxy`).
pub fn args(node_name: &str, kubeconfig: &Path) -> Vec<String> {
    vec![
        "--proxy-mode=nftables".into(),
        format!("--hostname-override={node_name}"),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--cluster-cidr={POD_CIDR}"),
        format!("--metrics-bind-address={METRICS_ADDRESS}"),
        format!("--healthz-bind-address={HEALTHZ_ADDRESS}"),
        // 0 = leave the sysctl alone (nf_conntrack_max is not per namespace).
        "--conntrack-max-per-core=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        // Upstream's default is -999; a test process must stay killable by the OOM killer.
        "--oom-score-adj=0".into(),
        "--v=1".into(),
    ]
}

/// Starts kube-proxy inside `node` (stopped when the node is dropped), logging to `log`.
/// Returns its PID (`nsenter` execs it, so this is kube-proxy itself).
pub fn spawn(node: &mut NodeNs, node_name: &str, kubeconfig: &Path, log: &Path) -> Result<u32> {
    let args = args(node_name, kubeconfig);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.spawn("kube-proxy", &binary()?, &args, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_in_nftables_mode_without_machine_wide_sysctls() {
        let a = args("n1", Path::new("/k"));
        for flag in [
            "--proxy-mode=nftables",
            "--hostname-override=n1",
            "--kubeconfig=/k",
            "--conntrack-max-per-core=0",
            "--metrics-bind-address=127.0.0.1:10249",
        ] {
            assert!(a.iter().any(|x| x == flag), "{flag} missing from {a:?}");
        }
    }
}
