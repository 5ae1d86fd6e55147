//! Pod sysctls (`securityContext.sysctls`): which ones the kubelet admits, and the names sent to
//! the runtime in the sandbox's `linux.sysctls`.
//!
//! Upstream's rules (`pkg/kubelet/sysctl`): the safe set (the sysctls the kernel namespaces and
//! that cannot hurt the node, some only from a kernel version on) plus the operator's
//! `allowedUnsafeSysctls` (names, or prefixes ending in `*`, each of a namespaced group). A pod
//! with any other sysctl, or with a network sysctl on the host network (IPC sysctl on the host
//! IPC namespace, `user.*` in the host user namespace), is rejected at admission with reason
//! `SysctlForbidden` and never started. Names may use `/` instead of `.` as separator
//! (`kernel/shm_rmid_forced`); they are normalised as `sysctl.d(5)` says.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;

/// The reason of a pod rejected for its sysctls (upstream's `ForbiddenReason`).
pub const FORBIDDEN_REASON: &str = "SysctlForbidden";

/// The safe sysctls and the kernel version (major, minor) from which each is namespaced
/// (upstream's `safeSysctls` and `pkg/util/kernel/constants.go`, v1.37).
const SAFE: &[(&str, Option<(u32, u32)>)] = &[
    ("kernel.shm_rmid_forced", None),
    ("net.ipv4.ip_local_port_range", None),
    ("net.ipv4.tcp_syncookies", None),
    ("net.ipv4.ping_group_range", None),
    ("net.ipv4.ip_unprivileged_port_start", None),
    ("net.ipv4.ip_local_reserved_ports", Some((3, 16))),
    ("net.ipv4.tcp_keepalive_time", Some((4, 5))),
    ("net.ipv4.tcp_fin_timeout", Some((4, 6))),
    ("net.ipv4.tcp_keepalive_intvl", Some((4, 5))),
    ("net.ipv4.tcp_keepalive_probes", Some((4, 5))),
    ("net.ipv4.tcp_rmem", Some((4, 15))),
    ("net.ipv4.tcp_wmem", Some((4, 15))),
    ("net.ipv4.tcp_slow_start_after_idle", Some((4, 15))),
    ("net.ipv4.tcp_notsent_lowat", Some((4, 6))),
];

/// Longest sysctl name or pattern the API accepts.
const MAX_LEN: usize = 253;

/// The kernel namespace a sysctl belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespace {
    Ipc,
    Net,
    Uts,
    User,
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Upstream's names, as they appear in its messages.
        f.write_str(match self {
            Namespace::Ipc => "IPC",
            Namespace::Net => "Net",
            Namespace::Uts => "UTS",
            Namespace::User => "User",
        })
    }
}

/// An allow-list pattern cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SysctlError {
    /// Not a sysctl name or a prefix ending in `*`.
    #[error(
        "sysctl {0:?} must have at most 253 characters and match regex \
         ([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\\./])*([a-z0-9][-_a-z0-9]*)?[a-z0-9*]"
    )]
    InvalidPattern(String),
    /// The kernel does not namespace it: allowing it would let a pod change the node.
    #[error("the sysctls {0:?} are not known to be namespaced")]
    NotNamespaced(String),
}

pub use crate::predicates::Rejection;

/// `net/ipv4/ip_forward` as `net.ipv4.ip_forward`: when the first separator is `/`, dots and
/// slashes swap (a dot then belongs to a name part, such as an interface `eno2.100`).
pub fn normalize_name(name: &str) -> String {
    match name.find(['.', '/']) {
        Some(i) if name.as_bytes()[i] == b'/' => name
            .chars()
            .map(|c| match c {
                '.' => '/',
                '/' => '.',
                c => c,
            })
            .collect(),
        _ => name.to_string(),
    }
}

/// The namespace of a (normalised) sysctl name or prefix, if the kernel namespaces it.
pub fn namespace_of(name: &str) -> Option<Namespace> {
    let exact = match name {
        "kernel.domainname" => Some(Namespace::Uts),
        "kernel.sem"
        | "kernel.shmall"
        | "kernel.shmmax"
        | "kernel.shmmni"
        | "kernel.shm_rmid_forced"
        | "kernel.shm"
        | "kernel.msgmax"
        | "kernel.msgmnb"
        | "kernel.msgmni"
        | "kernel.msg" => Some(Namespace::Ipc),
        _ => None,
    };
    exact.or_else(|| {
        [
            ("net.", Namespace::Net),
            ("fs.mqueue.", Namespace::Ipc),
            ("user.", Namespace::User),
        ]
        .into_iter()
        .find(|(p, _)| name.starts_with(p))
        .map(|(_, ns)| ns)
    })
}

/// One segment of a sysctl name: `[a-z0-9]([-_a-z0-9]*[a-z0-9])?`.
fn valid_segment(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let inner = |c: &u8| alnum(c) || *c == b'-' || *c == b'_';
    match b {
        [] => false,
        [c] => alnum(c),
        [first, mid @ .., last] => alnum(first) && alnum(last) && mid.iter().all(inner),
    }
}

/// Whether `p` is a valid allow-list pattern (upstream's `IsValidSysctlPattern`): segments
/// separated by `.` or `/`, the last of which may end in `*`.
fn valid_pattern(p: &str) -> bool {
    if p.is_empty() || p.len() > MAX_LEN {
        return false;
    }
    let parts: Vec<&str> = p.split(['.', '/']).collect();
    let (last, init) = match parts.split_last() {
        Some(x) => x,
        None => return false,
    };
    if !init.iter().all(|s| valid_segment(s)) {
        return false;
    }
    // The last segment: `([a-z0-9][-_a-z0-9]*)?[a-z0-9*]`.
    let b = last.as_bytes();
    match b.split_last() {
        None => false,
        Some((end, rest)) => {
            (end.is_ascii_lowercase() || end.is_ascii_digit() || *end == b'*')
                && (rest.is_empty()
                    || ((rest[0].is_ascii_lowercase() || rest[0].is_ascii_digit())
                        && rest.iter().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_'
                        })))
        }
    }
}

/// The sysctls a node admits: names and prefixes, each with its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    names: Vec<(String, Namespace)>,
    prefixes: Vec<(String, Namespace)>,
}

impl Allowlist {
    /// An allow-list of `patterns` (names, or prefixes ending in `*`).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, SysctlError> {
        let mut list = Allowlist::default();
        for p in patterns {
            let p = p.as_ref();
            if !valid_pattern(p) {
                return Err(SysctlError::InvalidPattern(p.to_string()));
            }
            let normal = normalize_name(p);
            let (name, prefixed) = match normal.find('*') {
                Some(i) => (normal[..i].to_string(), true),
                None => (normal, false),
            };
            let ns = namespace_of(&name).ok_or_else(|| SysctlError::NotNamespaced(name.clone()))?;
            if prefixed {
                list.prefixes.push((name, ns));
            } else {
                list.names.push((name, ns));
            }
        }
        Ok(list)
    }

    /// The safe set for a kernel of version `kernel` (without a version: only the sysctls
    /// that need none) plus the operator's `unsafe_patterns`.
    pub fn with_safe<S: AsRef<str>>(
        kernel: Option<(u32, u32)>,
        unsafe_patterns: &[S],
    ) -> Result<Self, SysctlError> {
        let mut all: Vec<String> = safe_sysctls(kernel);
        all.extend(unsafe_patterns.iter().map(|p| p.as_ref().to_string()));
        Self::new(&all)
    }

    /// Why sysctl `name` may not be set by a pod with these host namespaces, if it may not.
    fn check(
        &self,
        name: &str,
        host_net: bool,
        host_ipc: bool,
        host_users: bool,
    ) -> Result<(), String> {
        let name = normalize_name(name);
        let ns = self
            .names
            .iter()
            .find(|(n, _)| *n == name)
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| name.starts_with(p.as_str()))
            })
            .map(|(_, ns)| *ns)
            .ok_or_else(|| format!("{name:?} not allowlisted"))?;
        let on_host = match ns {
            Namespace::Ipc => host_ipc,
            Namespace::Net => host_net,
            Namespace::User => host_users,
            Namespace::Uts => false,
        };
        if on_host {
            return Err(format!("{name:?} not allowed with host {ns} enabled"));
        }
        Ok(())
    }

    /// Upstream's sysctl admission: the first sysctl of `pod` this node does not allow
    /// rejects it with reason [`FORBIDDEN_REASON`].
    pub fn admit(&self, pod: &Pod) -> Result<(), Rejection> {
        let Some(spec) = &pod.spec else {
            return Ok(());
        };
        let sysctls = spec
            .security_context
            .as_ref()
            .and_then(|s| s.sysctls.as_ref());
        // `hostUsers` unset means the host's user namespace.
        let host_users = spec.host_users.unwrap_or(true);
        for s in sysctls.into_iter().flatten() {
            self.check(
                &s.name,
                spec.host_network.unwrap_or(false),
                spec.host_ipc.unwrap_or(false),
                host_users,
            )
            .map_err(|e| Rejection {
                reason: FORBIDDEN_REASON.into(),
                message: format!("forbidden sysctl: {e}"),
            })?;
        }
        Ok(())
    }
}

/// The safe sysctls available on a kernel of version `kernel` (upstream's
/// `SafeSysctlAllowlist`).
pub fn safe_sysctls(kernel: Option<(u32, u32)>) -> Vec<String> {
    SAFE.iter()
        .filter(|(_, min)| match (min, kernel) {
            (None, _) => true,
            (Some(min), Some(k)) => k >= *min,
            (Some(_), None) => false,
        })
        .map(|(n, _)| n.to_string())
        .collect()
}

/// `6.1.0-13-amd64` as (6, 1).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// This machine's kernel version (read once).
pub fn kernel_version() -> Option<(u32, u32)> {
    static VERSION: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .and_then(|r| parse_kernel_version(&r))
    })
}

/// The sandbox's `linux.sysctls`: the pod's sysctls with `.`-separated names (runc checks the
/// namespace of a name by its dots; upstream converts before RunPodSandbox).
pub fn sandbox_sysctls(pod: &Pod) -> HashMap<String, String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.sysctls.as_ref())
        .into_iter()
        .flatten()
        .map(|s| (normalize_name(&s.name), s.value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_with(sysctls: &[(&str, &str)], host_network: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "default", "uid": "u" },
            "spec": {
                "hostNetwork": host_network,
                "securityContext": {
                    "sysctls": sysctls.iter()
                        .map(|(n, v)| serde_json::json!({ "name": n, "value": v }))
                        .collect::<Vec<_>>()
                },
                "containers": [{ "name": "c" }]
            }
        }))
        .unwrap()
    }

    #[test]
    fn names_with_slashes_are_normalised_as_sysctl_d_says() {
        assert_eq!(
            normalize_name("kernel/shm_rmid_forced"),
            "kernel.shm_rmid_forced"
        );
        assert_eq!(
            normalize_name("net/ipv4/conf/eno2.100/rp_filter"),
            "net.ipv4.conf.eno2/100.rp_filter"
        );
        assert_eq!(
            normalize_name("net.ipv4.conf.eno2/100.rp_filter"),
            "net.ipv4.conf.eno2/100.rp_filter"
        );
        assert_eq!(normalize_name(""), "");
    }

    #[test]
    fn the_safe_set_depends_on_the_kernel_version() {
        let new = safe_sysctls(Some((6, 1)));
        assert_eq!(new.len(), 14);
        assert!(new.contains(&"net.ipv4.tcp_rmem".to_string()));
        let old = safe_sysctls(Some((4, 5)));
        assert!(old.contains(&"net.ipv4.tcp_keepalive_time".to_string()));
        assert!(!old.contains(&"net.ipv4.tcp_fin_timeout".to_string()));
        assert!(!old.contains(&"net.ipv4.tcp_wmem".to_string()));
        assert_eq!(
            safe_sysctls(None).len(),
            5,
            "unknown kernel: only the unversioned ones"
        );
        assert_eq!(parse_kernel_version("6.18.44-fc-v1272"), Some((6, 18)));
        assert_eq!(parse_kernel_version("4.15.0-213-generic\n"), Some((4, 15)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn safe_sysctls_are_admitted_and_others_rejected_with_upstreams_message() {
        let list = Allowlist::with_safe::<&str>(Some((6, 1)), &[]).unwrap();
        assert_eq!(
            list.admit(&pod_with(
                &[
                    ("kernel.shm_rmid_forced", "1"),
                    ("net.ipv4.ip_local_port_range", "1024 65000")
                ],
                false
            )),
            Ok(())
        );
        assert_eq!(
            list.admit(&pod_with(&[("kernel/shm_rmid_forced", "1")], false)),
            Ok(()),
            "slash-separated names are the same sysctl"
        );
        assert_eq!(
            list.admit(&pod_with(
                &[("kernel.shm_rmid_forced", "1"), ("kernel.msgmax", "1")],
                false
            )),
            Err(Rejection {
                reason: "SysctlForbidden".into(),
                message: "forbidden sysctl: \"kernel.msgmax\" not allowlisted".into(),
            })
        );
        assert_eq!(
            list.admit(&pod_with(&[("net.ipv4.tcp_syncookies", "0")], true))
                .unwrap_err()
                .message,
            "forbidden sysctl: \"net.ipv4.tcp_syncookies\" not allowed with host Net enabled"
        );
        assert_eq!(list.admit(&pod_with(&[], true)), Ok(()));
    }

    #[test]
    fn unsafe_patterns_allow_names_and_prefixes_of_namespaced_groups() {
        let list = Allowlist::with_safe(
            Some((6, 1)),
            &["kernel.msg*", "net.core.somaxconn", "fs/mqueue/*"],
        )
        .unwrap();
        for ok in [
            "kernel.msgmax",
            "kernel.msgmnb",
            "net.core.somaxconn",
            "fs.mqueue.msg_max",
        ] {
            assert_eq!(list.admit(&pod_with(&[(ok, "1")], false)), Ok(()), "{ok}");
        }
        for bad in ["kernel.sem", "net.core.rmem_max", "vm.swappiness"] {
            assert!(
                list.admit(&pod_with(&[(bad, "1")], false)).is_err(),
                "{bad}"
            );
        }
        let ipc: Pod = serde_json::from_value(serde_json::json!({
            "spec": {
                "hostIPC": true,
                "securityContext": { "sysctls": [{ "name": "kernel.msgmax", "value": "1" }] },
                "containers": [{ "name": "c" }]
            }
        }))
        .unwrap();
        assert_eq!(
            list.admit(&ipc).unwrap_err().message,
            "forbidden sysctl: \"kernel.msgmax\" not allowed with host IPC enabled"
        );
        let users = Allowlist::new(&["user.max_user_namespaces"]).unwrap();
        let mut own_users = pod_with(&[("user.max_user_namespaces", "10")], false);
        assert!(
            users.admit(&own_users).is_err(),
            "hostUsers defaults to true"
        );
        own_users.spec.as_mut().unwrap().host_users = Some(false);
        assert_eq!(users.admit(&own_users), Ok(()));
    }

    #[test]
    fn patterns_must_be_valid_and_namespaced() {
        assert_eq!(
            Allowlist::new(&["vm.swappiness"]),
            Err(SysctlError::NotNamespaced("vm.swappiness".into()))
        );
        assert_eq!(
            Allowlist::new(&["kernel.*"]),
            Err(SysctlError::NotNamespaced("kernel.".into()))
        );
        for bad in [
            "",
            "Net.core",
            "net..core",
            "net.core.*x",
            "net.-core",
            "net.core.",
            "*net",
        ] {
            assert_eq!(
                Allowlist::new(&[bad]),
                Err(SysctlError::InvalidPattern(bad.into())),
                "{bad:?}"
            );
        }
        assert!(Allowlist::new(&["net.*", "net/ipv4/*", "kernel.shm_rmid_forced"]).is_ok());
        let err = Allowlist::new(&["x".repeat(254)]).unwrap_err();
        assert!(err.to_string().contains("at most 253 characters"), "{err}");
    }

    #[test]
    fn sandbox_sysctls_use_dotted_names() {
        let p = pod_with(
            &[
                ("kernel/shm_rmid_forced", "1"),
                ("net.ipv4.tcp_syncookies", "0"),
            ],
            false,
        );
        assert_eq!(
            sandbox_sysctls(&p),
            HashMap::from([
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
                ("net.ipv4.tcp_syncookies".to_string(), "0".to_string()),
            ])
        );
        assert!(sandbox_sysctls(&pod_with(&[], false)).is_empty());
    }
}
