//! What the operator decides: flags (upstream kube-proxy's names) and the
//! KubeProxyConfiguration file, merged into [`DaemonConfig`]; [`Config`] is the part the pure
//! core (model and ruleset) reads. Flags win over the file, as with kube-proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// The proxy's data-plane configuration (upstream flag names in the field docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// This node's name (`--hostname-override`); endpoints with this `nodeName` are local.
    pub node_name: String,
    /// Pod CIDRs (`--cluster-cidr`, one per family); ClusterIP traffic from outside them is
    /// masqueraded. Empty: only hairpin and external traffic is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs (`--masquerade-all`).
    pub masquerade_all: bool,
    /// Which local addresses accept NodePort traffic (`--nodeport-addresses`).
    pub nodeport_addresses: NodePortAddresses,
}

/// The local addresses that accept NodePort traffic (`--nodeport-addresses`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address but loopback (upstream's `0.0.0.0/0,::/0`, or the keyword `all`).
    #[default]
    All,
    /// Local addresses within `cidrs`, and with `primary` the node's primary address of each
    /// family (its first InternalIP, else ExternalIP): upstream's nftables default.
    Only {
        /// CIDRs from the flag.
        cidrs: Vec<IpNet>,
        /// The keyword `primary` was given.
        primary: bool,
    },
}

impl NodePortAddresses {
    /// Parses upstream's list: CIDRs and the keywords `primary` and `all`.
    pub fn parse(values: &[String]) -> Result<Self, ConfigError> {
        let mut cidrs = Vec::new();
        let mut primary = false;
        for value in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
            match value {
                "primary" => primary = true,
                "all" => return Ok(NodePortAddresses::All),
                "localhost" => {
                    return Err(invalid(
                        "nodePortAddresses",
                        value,
                        "NodePorts on localhost are not supported (nor by upstream's nftables mode)",
                    ));
                }
                cidr => cidrs.push(cidr.parse::<IpNet>().map_err(|e| {
                    invalid(
                        "nodePortAddresses",
                        cidr,
                        format!("{e}: expected a CIDR, primary or all"),
                    )
                })?),
            }
        }
        let all4 = cidrs
            .iter()
            .any(|c| c.addr().is_ipv4() && c.prefix_len() == 0);
        let all6 = cidrs
            .iter()
            .any(|c| c.addr().is_ipv6() && c.prefix_len() == 0);
        Ok(match (cidrs.is_empty() && !primary, all4 && all6) {
            (true, _) => NodePortAddresses::Only {
                cidrs,
                primary: true,
            },
            (_, true) => NodePortAddresses::All,
            _ => NodePortAddresses::Only { cidrs, primary },
        })
    }
}

/// Upstream's `--sync-period` default.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
/// Upstream's `--min-sync-period` default in nftables mode.
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
/// Upstream's `--healthz-bind-address` default.
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
/// Upstream's `--metrics-bind-address` default.
pub const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";

/// Flags of `strake-proxy` (upstream kube-proxy's names).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Flags {
    /// kubeconfig to reach the API server (default: in-cluster service account, then
    /// `$KUBECONFIG`/`~/.kube/config`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1); the fields Strake
    /// supports.
    #[arg(long = "config")]
    pub config: Option<PathBuf>,
    /// Node name instead of the hostname.
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// Pod CIDRs, comma separated (at most one per family); traffic to ClusterIPs from
    /// outside them is masqueraded.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// Masquerade all traffic sent to Service ClusterIPs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,
    /// Maximum interval between syncs of the rules (e.g. `30s`, `1m`).
    #[arg(long, value_parser = strake_types::duration::parse)]
    pub sync_period: Option<Duration>,
    /// Minimum interval between syncs; changes within it are batched (e.g. `1s`).
    #[arg(long, value_parser = strake_types::duration::parse)]
    pub min_sync_period: Option<Duration>,
    /// Address (`ip:port`) of the health server (`/healthz`, `/livez`).
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// Address (`ip:port`) of the metrics server (`/metrics`, `/proxyMode`).
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Local addresses that accept NodePort traffic, comma separated: CIDRs, `primary` (the
    /// node's primary IPs, the default) or `all`.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Remove the proxy's own nftables tables and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// How rules reach the kernel: `netlink` (nf_tables messages, one batch per sync) or
    /// `nft` (the `nft` program, much slower at scale; for diagnosis). Strake's own flag.
    #[arg(long, value_enum, default_value_t)]
    pub nft_backend: NftBackend,
}

/// Which nftables backend the daemon uses (`--nft-backend`; [`crate::nft::backend`] makes it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NftBackend {
    /// nf_tables netlink batches.
    #[default]
    Netlink,
    /// `nft -f` with the same rules rendered as a script.
    Nft,
}

impl std::fmt::Display for NftBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NftBackend::Netlink => "netlink",
            NftBackend::Nft => "nft",
        })
    }
}

/// The KubeProxyConfiguration fields Strake reads; others are ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileConfig {
    /// Must be `KubeProxyConfiguration` when present.
    pub kind: Option<String>,
    /// `kubeproxy.config.k8s.io/v1alpha1` (or `v1alpha2`).
    pub api_version: Option<String>,
    /// API client settings.
    pub client_connection: Option<ClientConnection>,
    /// Node name.
    pub hostname_override: Option<String>,
    /// Comma-separated pod CIDRs.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    /// `ip:port` of the health server.
    pub healthz_bind_address: Option<String>,
    /// `ip:port` of the metrics server.
    pub metrics_bind_address: Option<String>,
    /// CIDRs and keywords (`primary`, `all`) of the addresses accepting NodePort traffic.
    pub node_port_addresses: Option<Vec<String>>,
    /// Proxy mode; only `nftables` (or empty) is accepted.
    pub mode: Option<String>,
    /// v1alpha2's mode-independent sync period (Go duration).
    pub sync_period: Option<String>,
    /// v1alpha2's mode-independent minimum sync period (Go duration).
    pub min_sync_period: Option<String>,
    /// nftables mode settings (v1alpha1).
    pub nftables: Option<NftablesConfig>,
}

/// `clientConnection` of the file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    /// Path of the kubeconfig.
    pub kubeconfig: Option<PathBuf>,
}

/// `nftables` of the file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NftablesConfig {
    /// Masquerade all ClusterIP traffic.
    pub masquerade_all: Option<bool>,
    /// Go duration.
    pub sync_period: Option<String>,
    /// Go duration.
    pub min_sync_period: Option<String>,
}

/// Everything the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// What the pure core reads.
    pub proxy: Config,
    /// kubeconfig; `None` means the client's default inference.
    pub kubeconfig: Option<PathBuf>,
    /// Maximum interval between syncs.
    pub sync_period: Duration,
    /// Minimum interval between syncs.
    pub min_sync_period: Duration,
    /// Health server address.
    pub healthz_bind_address: SocketAddr,
    /// Metrics server address.
    pub metrics_bind_address: SocketAddr,
    /// Remove own tables and exit.
    pub cleanup: bool,
    /// How rules reach the kernel.
    pub nft_backend: NftBackend,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a KubeProxyConfiguration Strake understands.
    #[error("parse {path}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// A value is invalid.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The flag or field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The node name could not be found.
    #[error("cannot determine the node name: set --hostname-override")]
    NodeName,
}

fn invalid(
    field: &'static str,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.into(),
        reason: reason.into(),
    }
}

impl DaemonConfig {
    /// Reads the file named by `--config` (if any) and merges the flags over it.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(flags, file, hostname)
    }

    /// Flags over file over upstream defaults; `hostname` is asked only when neither names
    /// the node.
    pub fn merge(
        flags: &Flags,
        file: FileConfig,
        hostname: impl FnOnce() -> Option<String>,
    ) -> Result<Self, ConfigError> {
        if let Some(kind) = &file.kind
            && kind != "KubeProxyConfiguration"
        {
            return Err(invalid("kind", kind, "expected KubeProxyConfiguration"));
        }
        if let Some(mode) = &file.mode
            && !mode.is_empty()
            && mode != "nftables"
        {
            return Err(invalid("mode", mode, "strake-proxy only has nftables mode"));
        }
        let nft = file.nftables.clone().unwrap_or_default();
        let file_duration = |field: &'static str, v: &Option<String>| -> Result<_, ConfigError> {
            v.as_deref()
                .map(|s| strake_types::duration::parse(s).map_err(|e| invalid(field, s, e.reason)))
                .transpose()
        };
        let sync_period = match flags.sync_period {
            Some(d) => d,
            None => file_duration("syncPeriod", &file.sync_period)?
                .or(file_duration("nftables.syncPeriod", &nft.sync_period)?)
                .unwrap_or(DEFAULT_SYNC_PERIOD),
        };
        let min_sync_period = match flags.min_sync_period {
            Some(d) => d,
            None => file_duration("minSyncPeriod", &file.min_sync_period)?
                .or(file_duration(
                    "nftables.minSyncPeriod",
                    &nft.min_sync_period,
                )?)
                .unwrap_or(DEFAULT_MIN_SYNC_PERIOD),
        };
        if sync_period.is_zero() {
            return Err(invalid("syncPeriod", "0s", "must be positive"));
        }
        if min_sync_period > sync_period {
            return Err(invalid(
                "minSyncPeriod",
                format!("{min_sync_period:?}"),
                "must not exceed syncPeriod",
            ));
        }
        let cluster_cidrs = if !flags.cluster_cidr.is_empty() {
            flags.cluster_cidr.clone()
        } else {
            parse_cidrs(file.cluster_cidr.as_deref().unwrap_or_default())?
        };
        let families = cluster_cidrs.iter().filter(|c| c.addr().is_ipv4()).count();
        if families > 1 || cluster_cidrs.len() - families > 1 {
            return Err(invalid(
                "clusterCIDR",
                format!("{cluster_cidrs:?}"),
                "at most one CIDR per IP family",
            ));
        }
        let node_name = flags
            .hostname_override
            .clone()
            .or(file.hostname_override.clone())
            .filter(|n| !n.is_empty())
            .or_else(hostname)
            .map(|n| n.trim().to_lowercase())
            .filter(|n| !n.is_empty())
            .ok_or(ConfigError::NodeName)?;
        let address = |field: &'static str,
                       flag: &Option<String>,
                       file: &Option<String>,
                       default: &str|
         -> Result<SocketAddr, ConfigError> {
            let value = flag
                .clone()
                .or(file.clone())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string());
            value
                .parse()
                .map_err(|e: std::net::AddrParseError| invalid(field, &value, e.to_string()))
        };
        Ok(DaemonConfig {
            proxy: Config {
                node_name,
                cluster_cidrs,
                masquerade_all: flags.masquerade_all.or(nft.masquerade_all).unwrap_or(false),
                // Unset: upstream's nftables default, the node's primary IPs.
                nodeport_addresses: NodePortAddresses::parse(
                    if flags.nodeport_addresses.is_empty() {
                        file.node_port_addresses.as_deref().unwrap_or_default()
                    } else {
                        &flags.nodeport_addresses
                    },
                )?,
            },
            kubeconfig: flags.kubeconfig.clone().or(file
                .client_connection
                .as_ref()
                .and_then(|c| c.kubeconfig.clone())
                .filter(|p| !p.as_os_str().is_empty())),
            sync_period,
            min_sync_period,
            healthz_bind_address: address(
                "healthzBindAddress",
                &flags.healthz_bind_address,
                &file.healthz_bind_address,
                DEFAULT_HEALTHZ_BIND_ADDRESS,
            )?,
            metrics_bind_address: address(
                "metricsBindAddress",
                &flags.metrics_bind_address,
                &file.metrics_bind_address,
                DEFAULT_METRICS_BIND_ADDRESS,
            )?,
            cleanup: flags.cleanup,
            nft_backend: flags.nft_backend,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok()
}

fn parse_cidrs(text: &str) -> Result<Vec<IpNet>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|e| invalid("clusterCIDR", s, e.to_string()))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_addresses_default_to_primary_and_parse_cidrs_and_keywords() {
        let parse = |v: &[&str]| {
            NodePortAddresses::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let primary_only = NodePortAddresses::Only {
            cidrs: vec![],
            primary: true,
        };
        assert_eq!(parse(&[]).unwrap(), primary_only);
        assert_eq!(parse(&["primary"]).unwrap(), primary_only);
        assert_eq!(parse(&["all"]).unwrap(), NodePortAddresses::All);
        assert_eq!(
            parse(&["0.0.0.0/0", "::/0"]).unwrap(),
            NodePortAddresses::All
        );
        assert_eq!(
            parse(&["10.0.0.0/8", "primary"]).unwrap(),
            NodePortAddresses::Only {
                cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                primary: true
            }
        );
        assert!(parse(&["10.0.0.0/33"]).is_err());
        assert!(parse(&["localhost"]).is_err());
        // Flag, then file, then upstream's nftables default.
        let file: FileConfig =
            serde_saphyr::from_str("nodePortAddresses: [\"192.168.0.0/16\"]\n").unwrap();
        let c = DaemonConfig::merge(&Flags::default(), file.clone(), || Some("n".into())).unwrap();
        assert_eq!(
            c.proxy.nodeport_addresses,
            NodePortAddresses::Only {
                cidrs: vec!["192.168.0.0/16".parse().unwrap()],
                primary: false
            }
        );
        let flags = Flags {
            nodeport_addresses: vec!["all".into()],
            ..Flags::default()
        };
        let c = DaemonConfig::merge(&flags, file, || Some("n".into())).unwrap();
        assert_eq!(c.proxy.nodeport_addresses, NodePortAddresses::All);
        let c = DaemonConfig::merge(&Flags::default(), FileConfig::default(), || {
            Some("n".into())
        })
        .unwrap();
        assert_eq!(c.proxy.nodeport_addresses, primary_only);
    }

    #[test]
    fn defaults_are_upstreams() {
        let c = DaemonConfig::merge(&Flags::default(), FileConfig::default(), || {
            Some("Node-A\n".into())
        })
        .unwrap();
        assert_eq!(c.proxy.node_name, "node-a");
        assert_eq!(c.sync_period, Duration::from_secs(30));
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(c.metrics_bind_address.to_string(), "127.0.0.1:10249");
        assert!(!c.proxy.masquerade_all && c.proxy.cluster_cidrs.is_empty());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = serde_saphyr::from_str(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             mode: nftables\nclusterCIDR: 10.244.0.0/16,fd00:244::/64\nhostnameOverride: from-file\n\
             clientConnection:\n  kubeconfig: /etc/kp.conf\nhealthzBindAddress: 127.0.0.1:20256\n\
             nftables:\n  masqueradeAll: true\n  syncPeriod: 1m\n  minSyncPeriod: 2s\n",
        )
        .unwrap();
        let flags = Flags {
            hostname_override: Some("from-flag".into()),
            min_sync_period: Some(Duration::from_millis(100)),
            ..Flags::default()
        };
        let c = DaemonConfig::merge(&flags, file, || None).unwrap();
        assert_eq!(c.proxy.node_name, "from-flag");
        assert_eq!(c.proxy.cluster_cidrs.len(), 2);
        assert!(c.proxy.masquerade_all);
        assert_eq!(c.sync_period, Duration::from_secs(60));
        assert_eq!(c.min_sync_period, Duration::from_millis(100));
        assert_eq!(c.kubeconfig.unwrap(), PathBuf::from("/etc/kp.conf"));
        assert_eq!(c.healthz_bind_address.to_string(), "127.0.0.1:20256");
    }

    #[test]
    fn parses_upstream_flag_spellings() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            flags: Flags,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "strake-proxy",
            "--kubeconfig=/k",
            "--hostname-override=n1",
            "--cluster-cidr=10.244.0.0/16,fd00:244::/64",
            "--masquerade-all",
            "--sync-period=1m",
            "--min-sync-period=500ms",
            "--healthz-bind-address=127.0.0.1:10256",
            "--metrics-bind-address=0.0.0.0:10249",
        ])
        .unwrap();
        let c = DaemonConfig::merge(&cli.flags, FileConfig::default(), || None).unwrap();
        assert_eq!(c.proxy.node_name, "n1");
        assert_eq!(c.proxy.cluster_cidrs.len(), 2);
        assert!(c.proxy.masquerade_all);
        assert_eq!(c.sync_period, Duration::from_secs(60));
        assert_eq!(c.min_sync_period, Duration::from_millis(500));
        assert_eq!(c.metrics_bind_address.to_string(), "0.0.0.0:10249");
        assert_eq!(c.nft_backend, NftBackend::Netlink);
        let cli = <Cli as clap::Parser>::try_parse_from([
            "strake-proxy",
            "--masquerade-all=false",
            "--cleanup",
            "--nft-backend=nft",
        ])
        .unwrap();
        assert_eq!(cli.flags.masquerade_all, Some(false));
        assert!(cli.flags.cleanup);
        assert_eq!(cli.flags.nft_backend, NftBackend::Nft);
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        let iptables = FileConfig {
            mode: Some("iptables".into()),
            ..FileConfig::default()
        };
        assert!(DaemonConfig::merge(&Flags::default(), iptables, || Some("n".into())).is_err());
        let two_v4 = Flags {
            cluster_cidr: vec![
                "10.0.0.0/8".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            ..Flags::default()
        };
        assert!(DaemonConfig::merge(&two_v4, FileConfig::default(), || Some("n".into())).is_err());
        assert!(matches!(
            DaemonConfig::merge(&Flags::default(), FileConfig::default(), || None),
            Err(ConfigError::NodeName)
        ));
    }

    #[test]
    fn the_shipped_configmap_loads_with_the_daemons_loader() {
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_saphyr::from_str(include_str!("../../../manifests/proxy/configmap.yaml"))
                .unwrap();
        let text = cm.data.unwrap().remove("config.conf").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.conf");
        std::fs::write(&path, text).unwrap();
        // As the DaemonSet runs it: the file plus the node name from the downward API.
        let flags = Flags {
            config: Some(path),
            hostname_override: Some("node-1".into()),
            ..Flags::default()
        };
        let c = DaemonConfig::load(&flags).unwrap();
        assert_eq!(c.proxy.node_name, "node-1");
        assert_eq!(c.proxy.cluster_cidrs, ["10.244.0.0/16".parse().unwrap()]);
        assert!(!c.proxy.masquerade_all);
        assert_eq!(c.kubeconfig, None, "in-cluster credentials");
        assert_eq!(c.sync_period, Duration::from_secs(30));
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(c.metrics_bind_address.to_string(), "127.0.0.1:10249");
    }
}
