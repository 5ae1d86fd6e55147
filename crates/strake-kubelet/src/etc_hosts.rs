//! The kubelet-managed `/etc/hosts` (upstream's `makeHostsMount`): written to
//! `<root-dir>/pods/<uid>/etc-hosts` once the sandbox's IPs are known and bind-mounted at
//! `/etc/hosts` in every container that does not mount something there itself. A pod on the pod
//! network gets localhost entries, its IPs with its hostname (and FQDN with a `subdomain`) and
//! its `hostAliases`; a host-network pod gets the node's file plus its `hostAliases`. The mount
//! is a CRI mount, so it wins over a runtime's own sandbox file (strake-runtime and containerd
//! both leave `/etc/hosts` to a CRI mount at that path).

use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, HostAlias, Pod};
use strake_types::cri;

use crate::config::Config;
use crate::pod_spec::{self, HostnameError};

/// Where containers see the file.
pub const ETC_HOSTS: &str = "/etc/hosts";

/// The node's file, read for host-network pods.
const NODE_HOSTS: &str = "/etc/hosts";

/// The longest node hosts file copied into a pod.
const MAX_NODE_HOSTS: u64 = 1 << 20;

const MANAGED_HEADER: &str = "# Kubernetes-managed hosts file.\n";
const MANAGED_HEADER_HOST_NETWORK: &str = "# Kubernetes-managed hosts file (host network).\n";

/// The hosts file of a pod could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EtcHostsError {
    #[error("pod UID {0:?} cannot name a directory")]
    InvalidUid(String),
    #[error(transparent)]
    Hostname(#[from] HostnameError),
    #[error("read the node's hosts file {path}")]
    ReadNodeHosts {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write hosts file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The `# Entries added by HostAliases.` section: one line per alias IP, names tab-separated.
pub fn host_aliases_section(aliases: &[HostAlias]) -> String {
    if aliases.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n# Entries added by HostAliases.\n");
    for a in aliases {
        out.push_str(&a.ip);
        out.push('\t');
        out.push_str(&a.hostnames.clone().unwrap_or_default().join("\t"));
        out.push('\n');
    }
    out
}

/// The managed file of a pod on the pod network (upstream's `managedHostsFileContent`).
pub fn managed_content(
    ips: &[String],
    hostname: &str,
    domain: &str,
    aliases: &[HostAlias],
) -> String {
    let mut out = String::from(MANAGED_HEADER);
    out.push_str("127.0.0.1\tlocalhost\n");
    out.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
    out.push_str("fe00::0\tip6-localnet\n");
    out.push_str("fe00::0\tip6-mcastprefix\n");
    out.push_str("fe00::1\tip6-allnodes\n");
    out.push_str("fe00::2\tip6-allrouters\n");
    for ip in ips {
        if domain.is_empty() {
            out.push_str(&format!("{ip}\t{hostname}\n"));
        } else {
            out.push_str(&format!("{ip}\t{hostname}.{domain}\t{hostname}\n"));
        }
    }
    out.push_str(&host_aliases_section(aliases));
    out
}

/// The file of a host-network pod: the node's file plus the aliases.
pub fn host_network_content(node_hosts: &str, aliases: &[HostAlias]) -> String {
    let mut out = String::from(MANAGED_HEADER_HOST_NETWORK);
    out.push_str(node_hosts);
    out.push_str(&host_aliases_section(aliases));
    out
}

/// Whether container `c` gets the managed file: the pod's IPs are known (or it is on the host
/// network) and the container mounts nothing at `/etc/hosts` itself.
pub fn should_mount(pod: &Pod, c: &Container, ips: &[String]) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    (!ips.is_empty() || host_network)
        && !c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == ETC_HOSTS)
}

/// The content of the pod's file (reads the node's file for host-network pods).
pub fn content(pod: &Pod, config: &Config, ips: &[String]) -> Result<String, EtcHostsError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let aliases = spec.host_aliases.clone().unwrap_or_default();
    if spec.host_network.unwrap_or(false) {
        let err = |source| EtcHostsError::ReadNodeHosts {
            path: NODE_HOSTS.into(),
            source,
        };
        let mut node = String::new();
        std::fs::File::open(NODE_HOSTS)
            .map_err(err)?
            .take(MAX_NODE_HOSTS)
            .read_to_string(&mut node)
            .map_err(err)?;
        return Ok(host_network_content(&node, &aliases));
    }
    let (hostname, domain) = pod_spec::hostname_and_domain(pod, &config.cluster_domain)?;
    Ok(managed_content(ips, &hostname, &domain, &aliases))
}

/// `<root-dir>/pods/<uid>/etc-hosts`. The UID comes from the API (or a static manifest's
/// hash); it must be one path component.
pub fn path(root_dir: &Path, uid: &str) -> Result<PathBuf, EtcHostsError> {
    if uid.is_empty() || uid == "." || uid == ".." || uid.contains(['/', '\0']) {
        return Err(EtcHostsError::InvalidUid(uid.to_string()));
    }
    Ok(root_dir.join("pods").join(uid).join("etc-hosts"))
}

/// Writes the pod's hosts file and returns the mount of it for container `c`, if `c` gets one
/// (see [`should_mount`]). The file is rewritten for every container created, as upstream does,
/// so that it follows the sandbox's current IPs.
pub async fn mount(
    config: &Config,
    pod: &Pod,
    c: &Container,
    ips: &[String],
) -> Result<Option<cri::Mount>, EtcHostsError> {
    if !should_mount(pod, c, ips) {
        return Ok(None);
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let file = path(&config.root_dir, &uid)?;
    let text = content(pod, config, ips)?;
    let target = file.clone();
    tokio::task::spawn_blocking(move || write_atomic(&target, text.as_bytes()))
        .await
        .map_err(|e| EtcHostsError::Write {
            path: file.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| EtcHostsError::Write {
            path: file.clone(),
            source,
        })?;
    Ok(Some(cri::Mount {
        container_path: ETC_HOSTS.into(),
        host_path: file.display().to_string(),
        readonly: false,
        selinux_relabel: true,
        ..Default::default()
    }))
}

/// Replaces `path` with `data` (mode 0644) through a temporary file and a rename, so that a
/// container never reads half a file. The pod directory is the kubelet's own (created 0750).
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("hosts file path without a directory"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)?;
    let tmp = dir.join(".etc-hosts.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(data)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(ip: &str, names: &[&str]) -> HostAlias {
        HostAlias {
            ip: ip.into(),
            hostnames: Some(names.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn pod(spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        if spec.get("containers").is_none() {
            spec["containers"] = serde_json::json!([{ "name": "c" }]);
        }
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web-0", "namespace": "prod", "uid": "u-1" },
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn managed_file_matches_upstreams_layout() {
        let aliases = [
            alias("123.45.67.89", &["foo", "bar"]),
            alias("::1", &["ip6"]),
        ];
        assert_eq!(
            managed_content(&["10.88.0.5".into()], "web-0", "", &aliases),
            "# Kubernetes-managed hosts file.\n\
             127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n\
             fe00::0\tip6-mcastprefix\n\
             fe00::1\tip6-allnodes\n\
             fe00::2\tip6-allrouters\n\
             10.88.0.5\tweb-0\n\
             \n\
             # Entries added by HostAliases.\n\
             123.45.67.89\tfoo\tbar\n\
             ::1\tip6\n"
        );
        let fqdn = managed_content(
            &["10.88.0.5".into(), "fd00::5".into()],
            "web-0",
            "nginx.prod.svc.cluster.local",
            &[],
        );
        assert!(fqdn.ends_with(
            "fe00::2\tip6-allrouters\n\
             10.88.0.5\tweb-0.nginx.prod.svc.cluster.local\tweb-0\n\
             fd00::5\tweb-0.nginx.prod.svc.cluster.local\tweb-0\n"
        ));
    }

    #[test]
    fn host_network_file_is_the_nodes_plus_aliases() {
        assert_eq!(
            host_network_content("127.0.0.1 localhost\n", &[alias("1.2.3.4", &["a"])]),
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n\n\
             # Entries added by HostAliases.\n1.2.3.4\ta\n"
        );
        assert_eq!(
            host_network_content("x\n", &[]),
            "# Kubernetes-managed hosts file (host network).\nx\n"
        );
    }

    #[test]
    fn content_uses_the_pods_hostname_and_subdomain() {
        let mut config = Config::load(&crate::config::Flags::default()).unwrap();
        config.cluster_domain = "cluster.local".into();
        let p = pod(serde_json::json!({ "hostname": "db", "subdomain": "nginx" }));
        let text = content(&p, &config, &["10.88.0.7".into()]).unwrap();
        assert!(
            text.contains("10.88.0.7\tdb.nginx.prod.svc.cluster.local\tdb\n"),
            "{text}"
        );
        let p = pod(serde_json::json!({ "hostname": "Not_A_Label" }));
        assert!(matches!(
            content(&p, &config, &["10.88.0.7".into()]),
            Err(EtcHostsError::Hostname(HostnameError::InvalidHostname(_)))
        ));
    }

    #[test]
    fn mounted_unless_the_container_mounts_etc_hosts_or_the_ip_is_unknown() {
        let p = pod(serde_json::json!({
            "containers": [
                { "name": "a" },
                { "name": "b", "volumeMounts": [{ "name": "h", "mountPath": "/etc/hosts" }] }
            ]
        }));
        let cs = &p.spec.as_ref().unwrap().containers;
        let ips = ["10.88.0.5".to_string()];
        assert!(should_mount(&p, &cs[0], &ips));
        assert!(!should_mount(&p, &cs[1], &ips));
        assert!(!should_mount(&p, &cs[0], &[]));
        let hn = pod(serde_json::json!({ "hostNetwork": true }));
        assert!(should_mount(
            &hn,
            &hn.spec.as_ref().unwrap().containers[0],
            &[]
        ));
    }

    #[test]
    fn uids_must_be_one_path_component() {
        let root = Path::new("/var/lib/kubelet");
        assert_eq!(
            path(root, "u-1").unwrap(),
            PathBuf::from("/var/lib/kubelet/pods/u-1/etc-hosts")
        );
        for bad in ["", ".", "..", "../x", "a/b"] {
            assert!(path(root, bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn mount_writes_the_file_and_rewrites_it_for_new_ips() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::load(&crate::config::Flags::default()).unwrap();
        config.root_dir = dir.path().to_path_buf();
        let p =
            pod(serde_json::json!({ "hostAliases": [{ "ip": "1.2.3.4", "hostnames": ["x"] }] }));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let m = mount(&config, &p, c, &["10.88.0.5".into()])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.container_path, "/etc/hosts");
        assert!(!m.readonly && m.selinux_relabel);
        let file = dir.path().join("pods/u-1/etc-hosts");
        assert_eq!(m.host_path, file.display().to_string());
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("10.88.0.5\tweb-0\n") && text.ends_with("1.2.3.4\tx\n"),
            "{text}"
        );
        mount(&config, &p, c, &["10.88.0.6".into()]).await.unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("10.88.0.6\tweb-0\n") && !text.contains("10.88.0.5"),
            "{text}"
        );
        assert!(mount(&config, &p, c, &[]).await.unwrap().is_none());
    }
}
