//! strake-kubelet's configuration: upstream's flags and KubeletConfiguration file fields, with
//! upstream's defaults. Flags win over the file, as with the kubelet.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Flags of `strake-kubelet` (upstream's names).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Flags {
    /// kubeconfig to reach the API server; none = standalone mode (static pods only).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// KubeletConfiguration file (kubelet.config.k8s.io/v1beta1); the fields Strake supports.
    #[arg(long = "config")]
    pub config: Option<PathBuf>,
    /// Node name instead of the hostname.
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// The node's IP address (InternalIP).
    #[arg(long)]
    pub node_ip: Option<IpAddr>,
    /// CRI endpoint, e.g. `unix:///run/strake/runtime.sock`.
    #[arg(long)]
    pub container_runtime_endpoint: Option<String>,
    /// Directory of static pod manifests.
    #[arg(long)]
    pub pod_manifest_path: Option<PathBuf>,
    /// Kubelet state directory.
    #[arg(long)]
    pub root_dir: Option<PathBuf>,
    /// Maximum number of pods on this node.
    #[arg(long)]
    pub max_pods: Option<u32>,
    /// Labels to register the node with, `key=value,...`.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// Taints to register the node with, `key=value:Effect,...`.
    #[arg(long, value_delimiter = ',')]
    pub register_with_taints: Vec<String>,
    /// Cluster DNS server addresses.
    #[arg(long, value_delimiter = ',')]
    pub cluster_dns: Vec<IpAddr>,
    /// Cluster domain.
    #[arg(long)]
    pub cluster_domain: Option<String>,
    /// Address the HTTPS API listens on (default 0.0.0.0).
    #[arg(long)]
    pub address: Option<IpAddr>,
    /// Port of the HTTPS API (default 10250).
    #[arg(long)]
    pub port: Option<u16>,
    /// Serving certificate of the HTTPS API; without it a self-signed one is generated into
    /// `<root-dir>/pki`.
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// Key of `--tls-cert-file`.
    #[arg(long)]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle that client certificates of the HTTPS API are verified against.
    #[arg(long)]
    pub client_ca_file: Option<PathBuf>,
    /// Allow anonymous requests to the HTTPS API (user `system:anonymous`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub anonymous_auth: Option<bool>,
    /// Authenticate bearer tokens with TokenReview.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub authentication_token_webhook: Option<bool>,
    /// `AlwaysAllow` or `Webhook` (SubjectAccessReview).
    #[arg(long)]
    pub authorization_mode: Option<String>,
    /// Resources reserved for Kubernetes daemons, `cpu=100m,memory=100Mi,...`.
    #[arg(long, value_delimiter = ',')]
    pub kube_reserved: Vec<String>,
    /// Resources reserved for the operating system, `cpu=100m,memory=100Mi,...`.
    #[arg(long, value_delimiter = ',')]
    pub system_reserved: Vec<String>,
    /// Hard eviction thresholds, `memory.available<100Mi,nodefs.available<10%,...`.
    #[arg(long, value_delimiter = ',')]
    pub eviction_hard: Vec<String>,
    /// Unsafe sysctls or patterns (ending in `*`) pods may set, besides the safe set.
    #[arg(long, value_delimiter = ',')]
    pub allowed_unsafe_sysctls: Vec<String>,
    /// The resolver configuration pods with `dnsPolicy: Default` get ("" = none).
    #[arg(long)]
    pub resolv_conf: Option<String>,
    /// Requests per second to the API server (0 = client-go's default of 5).
    #[arg(long)]
    pub kube_api_qps: Option<i64>,
    /// Burst of requests to the API server (0 = client-go's default of 10).
    #[arg(long)]
    pub kube_api_burst: Option<i64>,
    /// Event writes per second (0 = unlimited).
    #[arg(long)]
    pub event_qps: Option<i64>,
    /// Burst of event writes.
    #[arg(long)]
    pub event_burst: Option<i64>,
    /// QoS and pod cgroups (`kubepods/...`); without them pods go straight below the cgroup
    /// root.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cgroups_per_qos: Option<bool>,
    /// Who makes the QoS and pod cgroups: `cgroupfs` (directories) or `systemd` (slices). The
    /// container runtime's answer (CRI `RuntimeConfig`) wins when it gives one, as upstream's.
    #[arg(long)]
    pub cgroup_driver: Option<String>,
    /// Parent of the `kubepods` cgroup tree (default `/`).
    #[arg(long)]
    pub cgroup_root: Option<String>,
    /// What is held to its share of the node, comma-separated: `pods`, `system-reserved`,
    /// `kube-reserved` (and their `-compressible` forms, CPU only), or `none` (default `pods`).
    #[arg(long)]
    pub enforce_node_allocatable: Option<String>,
    /// The existing cgroup `kubeReserved` is enforced on (`kube-reserved` enforced).
    #[arg(long)]
    pub kube_reserved_cgroup: Option<String>,
    /// The existing cgroup `systemReserved` is enforced on (`system-reserved` enforced).
    #[arg(long)]
    pub system_reserved_cgroup: Option<String>,
    /// Processes per pod (`podPidsLimit`; -1 unlimited).
    #[arg(long)]
    pub pod_max_pids: Option<i64>,
    /// How often unused images are considered for removal (Strake only: upstream's is a fixed
    /// 5m, the default here too).
    #[arg(long)]
    pub image_gc_period: Option<String>,
    /// Soft eviction thresholds, `memory.available<1.5Gi,...` (each needs a grace period).
    #[arg(long, value_delimiter = ',')]
    pub eviction_soft: Vec<String>,
    /// Grace periods of the soft thresholds, `memory.available=1m30s,...`.
    #[arg(long, value_delimiter = ',')]
    pub eviction_soft_grace_period: Vec<String>,
    /// How long a pressure condition outlives its threshold (default 5m0s).
    #[arg(long)]
    pub eviction_pressure_transition_period: Option<String>,
    /// The longest grace period of a pod evicted on a soft threshold (default 0).
    #[arg(long)]
    pub eviction_max_pod_grace_period: Option<i64>,
}

/// The KubeletConfiguration fields Strake reads (others are ignored, as the kubelet ignores
/// unknown fields of a known version).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileConfig {
    pub kind: Option<String>,
    pub api_version: Option<String>,
    pub container_runtime_endpoint: Option<String>,
    pub static_pod_path: Option<PathBuf>,
    pub max_pods: Option<u32>,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Option<Vec<IpAddr>>,
    pub cluster_domain: Option<String>,
    /// Go duration strings such as `10s`, `1m0s`.
    pub node_status_update_frequency: Option<String>,
    pub node_status_report_frequency: Option<String>,
    pub node_lease_duration_seconds: Option<u32>,
    pub register_with_taints: Option<Vec<TaintSpec>>,
    pub port: Option<u16>,
    pub healthz_port: Option<u16>,
    pub pod_logs_dir: Option<PathBuf>,
    pub cgroup_root: Option<String>,
    pub file_check_frequency: Option<String>,
    pub address: Option<IpAddr>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub authentication: Option<FileAuthentication>,
    pub authorization: Option<FileAuthorization>,
    pub kube_reserved: Option<BTreeMap<String, String>>,
    pub system_reserved: Option<BTreeMap<String, String>>,
    pub eviction_hard: Option<BTreeMap<String, String>>,
    pub merge_default_eviction_settings: Option<bool>,
    pub container_log_max_size: Option<String>,
    pub container_log_max_files: Option<i64>,
    pub container_log_max_workers: Option<i64>,
    pub container_log_monitor_interval: Option<String>,
    pub allowed_unsafe_sysctls: Option<Vec<String>>,
    pub resolv_conf: Option<String>,
    #[serde(rename = "kubeAPIQPS")]
    pub kube_api_qps: Option<i64>,
    #[serde(rename = "kubeAPIBurst")]
    pub kube_api_burst: Option<i64>,
    #[serde(rename = "eventRecordQPS")]
    pub event_record_qps: Option<i64>,
    pub event_burst: Option<i64>,
    #[serde(rename = "imageGCHighThresholdPercent")]
    pub image_gc_high_threshold_percent: Option<i64>,
    #[serde(rename = "imageGCLowThresholdPercent")]
    pub image_gc_low_threshold_percent: Option<i64>,
    #[serde(rename = "imageMinimumGCAge")]
    pub image_minimum_gc_age: Option<String>,
    #[serde(rename = "imageMaximumGCAge")]
    pub image_maximum_gc_age: Option<String>,
    pub pod_pids_limit: Option<i64>,
    pub enforce_node_allocatable: Option<Vec<String>>,
    #[serde(rename = "cgroupsPerQOS")]
    pub cgroups_per_qos: Option<bool>,
    pub cgroup_driver: Option<String>,
    pub kube_reserved_cgroup: Option<String>,
    pub system_reserved_cgroup: Option<String>,
    pub eviction_soft: Option<BTreeMap<String, String>>,
    pub eviction_soft_grace_period: Option<BTreeMap<String, String>>,
    pub eviction_pressure_transition_period: Option<String>,
    pub eviction_max_pod_grace_period: Option<i64>,
}

/// `authentication` of the configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileAuthentication {
    pub x509: Option<FileX509>,
    pub webhook: Option<FileAuthnWebhook>,
    pub anonymous: Option<FileAnonymous>,
}

/// `authentication.x509`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileX509 {
    #[serde(rename = "clientCAFile")]
    pub client_ca_file: Option<PathBuf>,
}

/// `authentication.webhook`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileAuthnWebhook {
    pub enabled: Option<bool>,
    #[serde(rename = "cacheTTL")]
    pub cache_ttl: Option<String>,
}

/// `authentication.anonymous`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileAnonymous {
    pub enabled: Option<bool>,
}

/// `authorization` of the configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileAuthorization {
    pub mode: Option<String>,
    pub webhook: Option<FileAuthzWebhook>,
}

/// `authorization.webhook`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileAuthzWebhook {
    #[serde(rename = "cacheAuthorizedTTL")]
    pub cache_authorized_ttl: Option<String>,
    #[serde(rename = "cacheUnauthorizedTTL")]
    pub cache_unauthorized_ttl: Option<String>,
}

/// How requests to the HTTPS API are authenticated.
#[derive(Clone, Debug, PartialEq)]
pub struct Authentication {
    /// Client certificates signed by this CA bundle authenticate as CN (user) and O (groups).
    pub client_ca_file: Option<PathBuf>,
    /// Bearer tokens are checked with TokenReview.
    pub webhook: bool,
    /// How long TokenReview answers are cached.
    pub webhook_cache_ttl: Duration,
    /// Requests without credentials run as `system:anonymous`; otherwise they get 401.
    pub anonymous: bool,
}

/// How authenticated requests to the HTTPS API are authorized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorizationMode {
    AlwaysAllow,
    /// SubjectAccessReview against the API server.
    Webhook,
}

/// Authorization of the HTTPS API.
#[derive(Clone, Debug, PartialEq)]
pub struct Authorization {
    pub mode: AuthorizationMode,
    /// How long an "allowed" answer is cached.
    pub cache_authorized_ttl: Duration,
    /// How long a "denied" answer is cached.
    pub cache_unauthorized_ttl: Duration,
}

/// A taint in the configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct TaintSpec {
    pub key: String,
    #[serde(default)]
    pub value: String,
    pub effect: String,
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub node_ip: Option<IpAddr>,
    pub container_runtime_endpoint: String,
    pub pod_manifest_path: Option<PathBuf>,
    pub root_dir: PathBuf,
    pub max_pods: u32,
    pub node_labels: BTreeMap<String, String>,
    pub register_with_taints: Vec<TaintSpec>,
    pub cluster_dns: Vec<IpAddr>,
    pub cluster_domain: String,
    pub node_status_update_frequency: Duration,
    pub node_status_report_frequency: Duration,
    pub node_lease_duration: Duration,
    pub port: u16,
    pub healthz_port: u16,
    /// Where container logs go (`<dir>/<ns>_<pod>_<uid>/<container>/<n>.log`).
    pub pod_logs_dir: std::path::PathBuf,
    /// Parent of the `kubepods` cgroup tree ("" = the hierarchy's root, as upstream's "/").
    pub cgroup_root: String,
    /// How often the static pod directory is re-read.
    pub file_check_frequency: Duration,
    /// Address of the HTTPS API.
    pub address: IpAddr,
    /// Serving certificate and key of the HTTPS API (self-signed into `<root-dir>/pki` if none).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub authentication: Authentication,
    pub authorization: Authorization,
    /// `kubeReserved`, `systemReserved` and `evictionHard`: what allocatable leaves out.
    pub reservation: crate::allocatable::Reservation,
    /// Container log rotation (`containerLogMaxSize`, `containerLogMaxFiles`, ...).
    pub log_rotation: crate::log_rotation::Policy,
    /// `allowedUnsafeSysctls`: validated patterns (see [`crate::sysctls`]).
    pub allowed_unsafe_sysctls: Vec<String>,
    /// `resolvConf`: the host's resolver configuration (default `/etc/resolv.conf`).
    pub resolv_conf: String,
    /// `kubeAPIQPS`/`kubeAPIBurst` and `eventRecordQPS`/`eventBurst` (50/100 each).
    pub api_limits: crate::api_client::Limits,
    /// Image garbage collection (`imageGC*`, `imageMinimumGCAge`, `imageMaximumGCAge`).
    pub image_gc: crate::image_gc::Policy,
    /// `podPidsLimit` (-1: unlimited).
    pub pod_pids_limit: i64,
    /// `enforceNodeAllocatable` (`pods`: `kubepods` is held to the node's allocatable).
    pub enforce_node_allocatable: Vec<String>,
    /// `cgroupsPerQOS` (default true): the kubelet makes the QoS and pod cgroups.
    pub cgroups_per_qos: bool,
    /// `cgroupDriver` (default cgroupfs), replaced at start by the runtime's when it reports one.
    pub cgroup_driver: strake_types::cgroups::CgroupDriver,
    /// `kubeReservedCgroup` and `systemReservedCgroup`: existing cgroups held to the
    /// reservations when `enforceNodeAllocatable` names them.
    pub kube_reserved_cgroup: Option<String>,
    pub system_reserved_cgroup: Option<String>,
    /// The eviction manager's thresholds and periods.
    pub eviction: crate::eviction::Policy,
}

/// The configuration is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid {what}: {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error("invalid resource reservation or eviction threshold")]
    Reservation(#[source] crate::allocatable::ThresholdError),
}

fn parse_taint(s: &str) -> Result<TaintSpec, ConfigError> {
    let invalid = || ConfigError::Invalid {
        what: "taint",
        value: s.to_string(),
    };
    let (kv, effect) = s.rsplit_once(':').ok_or_else(invalid)?;
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    if key.is_empty() || !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(invalid());
    }
    Ok(TaintSpec {
        key: key.into(),
        value: value.into(),
        effect: effect.into(),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_else(|_| "localhost".into())
}

/// Authentication: flags over the file over upstream's defaults, which differ between a
/// kubelet started with a configuration file (anonymous off, webhook on, as
/// `kubelet.config.k8s.io/v1beta1` defaults) and one started with flags only (anonymous on,
/// webhook off).
fn authentication(flags: &Flags, file: &FileConfig) -> Result<Authentication, ConfigError> {
    let from_file = flags.config.is_some();
    let f = file.authentication.clone().unwrap_or_default();
    let ttl = f.webhook.as_ref().and_then(|w| w.cache_ttl.clone());
    Ok(Authentication {
        client_ca_file: flags
            .client_ca_file
            .clone()
            .or(f.x509.and_then(|x| x.client_ca_file)),
        webhook: flags
            .authentication_token_webhook
            .or(f.webhook.and_then(|w| w.enabled))
            .unwrap_or(from_file),
        webhook_cache_ttl: go_duration_or("authentication.webhook.cacheTTL", ttl, 120)?,
        anonymous: flags
            .anonymous_auth
            .or(f.anonymous.and_then(|a| a.enabled))
            .unwrap_or(!from_file),
    })
}

/// Authorization: `Webhook` by default with a configuration file, `AlwaysAllow` without.
fn authorization(flags: &Flags, file: &FileConfig) -> Result<Authorization, ConfigError> {
    let f = file.authorization.clone().unwrap_or_default();
    let mode = flags.authorization_mode.clone().or(f.mode);
    let mode = match mode.as_deref() {
        Some("AlwaysAllow") => AuthorizationMode::AlwaysAllow,
        Some("Webhook") => AuthorizationMode::Webhook,
        None if flags.config.is_some() => AuthorizationMode::Webhook,
        None => AuthorizationMode::AlwaysAllow,
        Some(other) => {
            return Err(ConfigError::Invalid {
                what: "authorization mode",
                value: other.to_string(),
            });
        }
    };
    let w = f.webhook.unwrap_or_default();
    Ok(Authorization {
        mode,
        cache_authorized_ttl: go_duration_or(
            "authorization.webhook.cacheAuthorizedTTL",
            w.cache_authorized_ttl,
            300,
        )?,
        cache_unauthorized_ttl: go_duration_or(
            "authorization.webhook.cacheUnauthorizedTTL",
            w.cache_unauthorized_ttl,
            30,
        )?,
    })
}

/// Reservations and hard eviction thresholds: flags over the file; `evictionHard` unset means
/// upstream's defaults, and a partial one is completed from them only with
/// `mergeDefaultEvictionSettings`, as upstream.
fn reservation(
    flags: &Flags,
    file: &FileConfig,
) -> Result<crate::allocatable::Reservation, crate::allocatable::ThresholdError> {
    use crate::allocatable as a;
    let pick = |flag: &[String], name: &str, from_file: &Option<BTreeMap<String, String>>| {
        if flag.is_empty() {
            Ok(from_file.clone().unwrap_or_default())
        } else {
            a::parse_pairs(name, flag)
        }
    };
    let kube = pick(&flags.kube_reserved, "--kube-reserved", &file.kube_reserved)?;
    let system = pick(
        &flags.system_reserved,
        "--system-reserved",
        &file.system_reserved,
    )?;
    let (field, mut hard) = if !flags.eviction_hard.is_empty() {
        (
            "--eviction-hard",
            Some(a::parse_statements(
                "--eviction-hard",
                &flags.eviction_hard,
            )?),
        )
    } else {
        ("evictionHard", file.eviction_hard.clone())
    };
    match hard.as_mut() {
        None => hard = Some(a::default_eviction_hard()),
        Some(h) if file.merge_default_eviction_settings == Some(true) => {
            for (k, v) in a::default_eviction_hard() {
                h.entry(k).or_insert(v);
            }
        }
        Some(_) => {}
    }
    Ok(a::Reservation {
        kube_reserved: a::parse_reserved("kubeReserved", &kube)?,
        system_reserved: a::parse_reserved("systemReserved", &system)?,
        eviction_hard: a::parse_thresholds(field, &hard.unwrap_or_default())?,
    })
}

/// The eviction policy: the hard thresholds (already in the reservation), the soft ones with
/// their grace periods, and the periods; flags over the file.
fn eviction(
    flags: &Flags,
    file: &FileConfig,
    hard: &[crate::allocatable::Threshold],
) -> Result<crate::eviction::Policy, ConfigError> {
    use crate::allocatable as a;
    let invalid = |what: &'static str, value: String| ConfigError::Invalid { what, value };
    let (field, soft) = if flags.eviction_soft.is_empty() {
        (
            "evictionSoft",
            file.eviction_soft.clone().unwrap_or_default(),
        )
    } else {
        (
            "--eviction-soft",
            a::parse_statements("--eviction-soft", &flags.eviction_soft)
                .map_err(ConfigError::Reservation)?,
        )
    };
    let soft = a::parse_thresholds(field, &soft).map_err(ConfigError::Reservation)?;
    let (field, grace) = if flags.eviction_soft_grace_period.is_empty() {
        (
            "evictionSoftGracePeriod",
            file.eviction_soft_grace_period.clone().unwrap_or_default(),
        )
    } else {
        (
            "--eviction-soft-grace-period",
            a::parse_pairs(
                "--eviction-soft-grace-period",
                &flags.eviction_soft_grace_period,
            )
            .map_err(ConfigError::Reservation)?,
        )
    };
    let grace = crate::eviction::parse_grace_periods(field, &grace)
        .map_err(|e| invalid("evictionSoftGracePeriod", e))?;
    let thresholds =
        crate::eviction::thresholds(hard, &soft, &grace).map_err(|e| invalid("evictionSoft", e))?;
    let d = crate::eviction::Policy::default();
    let transition = flags
        .eviction_pressure_transition_period
        .as_ref()
        .or(file.eviction_pressure_transition_period.as_ref());
    let pressure_transition = match transition {
        None => d.pressure_transition,
        Some(s) => strake_types::duration::parse(s)
            .map_err(|_| invalid("evictionPressureTransitionPeriod", s.clone()))?,
    };
    let max = flags
        .eviction_max_pod_grace_period
        .or(file.eviction_max_pod_grace_period)
        .unwrap_or(d.max_pod_grace_seconds);
    Ok(crate::eviction::Policy {
        thresholds,
        pressure_transition,
        max_pod_grace_seconds: max,
    })
}

/// Container log rotation from the file, with upstream's defaults and checks
/// (`containerLogMaxFiles` > 1, `containerLogMaxWorkers` >= 1).
/// The client-side rate limits, with upstream's defaults (50 per second, bursts of 100) and
/// its refusal of negative numbers.
fn api_limits(flags: &Flags, file: &FileConfig) -> Result<crate::api_client::Limits, ConfigError> {
    use crate::api_client::{Limits, Rate};
    let value = |what: &'static str, flag: Option<i64>, file: Option<i64>, default: u32| match flag
        .or(file)
    {
        None => Ok(default),
        Some(n) => u32::try_from(n).map_err(|_| ConfigError::Invalid {
            what,
            value: n.to_string(),
        }),
    };
    Ok(Limits {
        api: Rate::api(
            value("kubeAPIQPS", flags.kube_api_qps, file.kube_api_qps, 50)?,
            value(
                "kubeAPIBurst",
                flags.kube_api_burst,
                file.kube_api_burst,
                100,
            )?,
        ),
        events: Rate::events(
            value("eventRecordQPS", flags.event_qps, file.event_record_qps, 50)?,
            value("eventBurst", flags.event_burst, file.event_burst, 100)?,
        ),
    })
}

/// Image GC settings with upstream's defaults and checks: thresholds within 0..=100, low
/// below high, a maximum age (if any) not below the minimum.
fn image_gc(flags: &Flags, file: &FileConfig) -> Result<crate::image_gc::Policy, ConfigError> {
    let d = crate::image_gc::Policy::default();
    let invalid = |what: &'static str, value: String| ConfigError::Invalid { what, value };
    let percent = |what: &'static str, v: Option<i64>, default: u8| match v {
        None => Ok(default),
        Some(n) => u8::try_from(n)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| invalid(what, format!("{n} (must be between 0 and 100)"))),
    };
    let duration = |what: &'static str, v: &Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(s) => strake_types::duration::parse(s).map_err(|_| invalid(what, s.clone())),
    };
    let policy = crate::image_gc::Policy {
        high_percent: percent(
            "imageGCHighThresholdPercent",
            file.image_gc_high_threshold_percent,
            d.high_percent,
        )?,
        low_percent: percent(
            "imageGCLowThresholdPercent",
            file.image_gc_low_threshold_percent,
            d.low_percent,
        )?,
        min_age: duration("imageMinimumGCAge", &file.image_minimum_gc_age, d.min_age)?,
        max_age: duration("imageMaximumGCAge", &file.image_maximum_gc_age, d.max_age)?,
        period: duration("--image-gc-period", &flags.image_gc_period, d.period)?,
    };
    if policy.low_percent >= policy.high_percent {
        return Err(invalid(
            "imageGCLowThresholdPercent",
            format!(
                "{} (must be less than imageGCHighThresholdPercent {})",
                policy.low_percent, policy.high_percent
            ),
        ));
    }
    if !policy.max_age.is_zero() && policy.max_age < policy.min_age {
        return Err(invalid(
            "imageMaximumGCAge",
            format!(
                "{:?} (must not be less than imageMinimumGCAge)",
                policy.max_age
            ),
        ));
    }
    if policy.period.is_zero() {
        return Err(invalid("--image-gc-period", "0s".into()));
    }
    Ok(policy)
}

fn log_rotation(file: &FileConfig) -> Result<crate::log_rotation::Policy, ConfigError> {
    let default = crate::log_rotation::Policy::default();
    let max_size = match &file.container_log_max_size {
        Some(s) => crate::resources::parse_milli(s)
            .ok()
            .filter(|m| *m > 0)
            .and_then(|m| u64::try_from(m / 1000).ok())
            .ok_or_else(|| ConfigError::Invalid {
                what: "containerLogMaxSize",
                value: s.clone(),
            })?,
        None => default.max_size,
    };
    let count = |what: &'static str, v: Option<i64>, min: i64, default: usize| match v {
        Some(n) if n >= min => Ok(n as usize),
        Some(n) => Err(ConfigError::Invalid {
            what,
            value: n.to_string(),
        }),
        None => Ok(default),
    };
    Ok(crate::log_rotation::Policy {
        max_size,
        max_files: count(
            "containerLogMaxFiles",
            file.container_log_max_files,
            2,
            default.max_files,
        )?,
        max_workers: count(
            "containerLogMaxWorkers",
            file.container_log_max_workers,
            1,
            default.max_workers,
        )?,
        interval: go_duration_or(
            "containerLogMonitorInterval",
            file.container_log_monitor_interval.clone(),
            default.interval.as_secs(),
        )?,
    })
}

fn go_duration_or(
    what: &'static str,
    v: Option<String>,
    default_secs: u64,
) -> Result<Duration, ConfigError> {
    match v {
        Some(s) => {
            strake_types::duration::parse(&s).map_err(|_| ConfigError::Invalid { what, value: s })
        }
        None => Ok(Duration::from_secs(default_secs)),
    }
}

impl Config {
    /// What makes the HTTPS API open to anyone who reaches it: anonymous requests, or
    /// AlwaysAllow authorization (upstream's defaults without a configuration file, kept for
    /// compatibility; logged as warnings at start).
    pub fn insecure_api_settings(&self) -> Vec<&'static str> {
        let mut found = Vec::new();
        if self.authentication.anonymous {
            found.push(
                "anonymous requests are allowed (--anonymous-auth, authentication.anonymous.enabled)",
            );
        }
        if self.authorization.mode == AuthorizationMode::AlwaysAllow {
            found.push(
                "every authenticated request is authorized (--authorization-mode=AlwaysAllow)",
            );
        }
        found
    }

    /// Flags over the file over upstream's defaults.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                serde_saphyr::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        Self::merge(flags, file)
    }

    fn merge(flags: &Flags, file: FileConfig) -> Result<Self, ConfigError> {
        let duration = |what: &'static str,
                        v: Option<String>,
                        default: u64|
         -> Result<Duration, ConfigError> {
            match v {
                Some(s) => strake_types::duration::parse(&s)
                    .map_err(|_| ConfigError::Invalid { what, value: s }),
                None => Ok(Duration::from_secs(default)),
            }
        };
        // Node labels are a flag only, as upstream.
        let mut labels = BTreeMap::new();
        for l in &flags.node_labels {
            let (k, v) = l.split_once('=').ok_or_else(|| ConfigError::Invalid {
                what: "node label",
                value: l.clone(),
            })?;
            labels.insert(k.to_string(), v.to_string());
        }
        let taints = if flags.register_with_taints.is_empty() {
            file.register_with_taints.clone().unwrap_or_default()
        } else {
            flags
                .register_with_taints
                .iter()
                .map(|t| parse_taint(t))
                .collect::<Result<_, _>>()?
        };
        let reservation = reservation(flags, &file).map_err(ConfigError::Reservation)?;
        let log_rotation = log_rotation(&file)?;
        let unsafe_sysctls = if flags.allowed_unsafe_sysctls.is_empty() {
            file.allowed_unsafe_sysctls.clone().unwrap_or_default()
        } else {
            flags.allowed_unsafe_sysctls.clone()
        };
        // A pattern that cannot be used stops the kubelet, as upstream.
        crate::sysctls::Allowlist::new(&unsafe_sysctls).map_err(|e| ConfigError::Invalid {
            what: "allowedUnsafeSysctls",
            value: e.to_string(),
        })?;
        let api_limits = api_limits(flags, &file)?;
        let image_gc = image_gc(flags, &file)?;
        let eviction = eviction(flags, &file, &reservation.eviction_hard)?;
        // Upstream's choices: pods, system-reserved, kube-reserved, or none alone; and nothing
        // to enforce without QoS cgroups.
        let cgroups_per_qos = flags
            .cgroups_per_qos
            .or(file.cgroups_per_qos)
            .unwrap_or(true);
        let cgroup_driver = match flags
            .cgroup_driver
            .as_deref()
            .or(file.cgroup_driver.as_deref())
        {
            None | Some("cgroupfs") => strake_types::cgroups::CgroupDriver::Cgroupfs,
            Some("systemd") => strake_types::cgroups::CgroupDriver::Systemd,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    what: "cgroupDriver (cgroupfs or systemd)",
                    value: other.to_string(),
                });
            }
        };
        let enforce_flag = flags.enforce_node_allocatable.as_deref().map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        });
        let enforce = enforce_flag
            .or(file.enforce_node_allocatable.clone())
            .unwrap_or_else(|| {
                if cgroups_per_qos {
                    vec!["pods".into()]
                } else {
                    Vec::new()
                }
            });
        if !cgroups_per_qos && enforce.iter().any(|e| e != "none") {
            return Err(ConfigError::Invalid {
                what: "enforceNodeAllocatable (must be empty when cgroupsPerQOS is false)",
                value: enforce.join(","),
            });
        }
        for e in &enforce {
            let known = matches!(
                e.as_str(),
                "pods"
                    | "system-reserved"
                    | "kube-reserved"
                    | "system-reserved-compressible"
                    | "kube-reserved-compressible"
                    | "none"
            );
            if !known || (e == "none" && enforce.len() > 1) {
                return Err(ConfigError::Invalid {
                    what: "enforceNodeAllocatable",
                    value: enforce.join(","),
                });
            }
        }
        // Enforcing a reservation needs the cgroup it is enforced on, as upstream's.
        let kube_reserved_cgroup = flags
            .kube_reserved_cgroup
            .clone()
            .or(file.kube_reserved_cgroup.clone())
            .filter(|c| !c.is_empty());
        let system_reserved_cgroup = flags
            .system_reserved_cgroup
            .clone()
            .or(file.system_reserved_cgroup.clone())
            .filter(|c| !c.is_empty());
        for (reservation, cgroup, what) in [
            (
                "kube-reserved",
                &kube_reserved_cgroup,
                "kubeReservedCgroup (needed when enforceNodeAllocatable has kube-reserved)",
            ),
            (
                "system-reserved",
                &system_reserved_cgroup,
                "systemReservedCgroup (needed when enforceNodeAllocatable has system-reserved)",
            ),
        ] {
            let named = enforce
                .iter()
                .any(|e| e.strip_suffix("-compressible").unwrap_or(e) == reservation);
            if named && cgroup.is_none() {
                return Err(ConfigError::Invalid {
                    what,
                    value: enforce.join(","),
                });
            }
        }
        let authn = authentication(flags, &file)?;
        let authz = authorization(flags, &file)?;
        Ok(Config {
            kubeconfig: flags.kubeconfig.clone(),
            node_name: flags
                .hostname_override
                .clone()
                .map(|h| h.to_lowercase())
                .unwrap_or_else(hostname),
            node_ip: flags.node_ip,
            container_runtime_endpoint: flags
                .container_runtime_endpoint
                .clone()
                .or(file.container_runtime_endpoint)
                .unwrap_or_else(|| "unix:///run/containerd/containerd.sock".into()),
            pod_manifest_path: flags.pod_manifest_path.clone().or(file.static_pod_path),
            root_dir: flags
                .root_dir
                .clone()
                .unwrap_or_else(|| "/var/lib/kubelet".into()),
            max_pods: flags.max_pods.or(file.max_pods).unwrap_or(110),
            node_labels: labels,
            register_with_taints: taints,
            cluster_dns: if flags.cluster_dns.is_empty() {
                file.cluster_dns.unwrap_or_default()
            } else {
                flags.cluster_dns.clone()
            },
            cluster_domain: flags
                .cluster_domain
                .clone()
                .or(file.cluster_domain)
                .unwrap_or_default(),
            node_status_update_frequency: duration(
                "nodeStatusUpdateFrequency",
                file.node_status_update_frequency,
                10,
            )?,
            node_status_report_frequency: duration(
                "nodeStatusReportFrequency",
                file.node_status_report_frequency,
                300,
            )?,
            file_check_frequency: duration(
                "fileCheckFrequency",
                file.file_check_frequency.clone(),
                20,
            )?,
            node_lease_duration: Duration::from_secs(u64::from(
                file.node_lease_duration_seconds.unwrap_or(40),
            )),
            pod_logs_dir: file
                .pod_logs_dir
                .clone()
                .unwrap_or_else(|| "/var/log/pods".into()),
            cgroup_root: flags
                .cgroup_root
                .clone()
                .or(file.cgroup_root.clone())
                .map(|r| if r == "/" { String::new() } else { r })
                .unwrap_or_default(),
            port: flags.port.or(file.port).unwrap_or(10250),
            address: flags
                .address
                .or(file.address)
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            tls_cert_file: flags.tls_cert_file.clone().or(file.tls_cert_file.clone()),
            tls_private_key_file: flags
                .tls_private_key_file
                .clone()
                .or(file.tls_private_key_file.clone()),
            authentication: authn,
            authorization: authz,
            healthz_port: file.healthz_port.unwrap_or(10248),
            reservation,
            log_rotation,
            allowed_unsafe_sysctls: unsafe_sysctls,
            resolv_conf: flags
                .resolv_conf
                .clone()
                .or(file.resolv_conf.clone())
                .unwrap_or_else(|| "/etc/resolv.conf".into()),
            api_limits,
            image_gc,
            pod_pids_limit: flags.pod_max_pids.or(file.pod_pids_limit).unwrap_or(-1),
            enforce_node_allocatable: enforce,
            cgroups_per_qos,
            cgroup_driver,
            kube_reserved_cgroup,
            system_reserved_cgroup,
            eviction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_pids_limit_and_enforce_node_allocatable_follow_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let load = |yaml: &str| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&Flags {
                config: Some(path.clone()),
                ..Default::default()
            })
        };
        let d = load("kind: KubeletConfiguration\n").unwrap();
        assert_eq!(
            (d.pod_pids_limit, d.enforce_node_allocatable),
            (-1, vec!["pods".to_string()])
        );
        let c = load("podPidsLimit: 1024\nenforceNodeAllocatable: []\n").unwrap();
        assert_eq!(
            (c.pod_pids_limit, c.enforce_node_allocatable.len()),
            (1024, 0)
        );
        for bad in [
            "enforceNodeAllocatable: [pods, none]\n",
            "enforceNodeAllocatable: [everything]\n",
        ] {
            let e = load(bad).unwrap_err().to_string();
            assert!(e.contains("enforceNodeAllocatable"), "{bad}: {e}");
        }
    }

    #[test]
    fn cgroup_flags_override_the_file_and_reservations_need_their_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let load = |yaml: &str, flags: Flags| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&Flags {
                config: Some(path.clone()),
                ..flags
            })
        };
        let c = load(
            "cgroupRoot: /file\nenforceNodeAllocatable: [pods]\npodPidsLimit: 10\n",
            Flags {
                cgroup_root: Some("/flag".into()),
                enforce_node_allocatable: Some("pods,kube-reserved".into()),
                kube_reserved_cgroup: Some("/kube.slice".into()),
                pod_max_pids: Some(20),
                ..Flags::default()
            },
        )
        .unwrap();
        assert_eq!(c.cgroup_root, "/flag");
        assert_eq!(c.enforce_node_allocatable, vec!["pods", "kube-reserved"]);
        assert_eq!(c.kube_reserved_cgroup.as_deref(), Some("/kube.slice"));
        assert_eq!(c.pod_pids_limit, 20);
        // `--enforce-node-allocatable=` (empty) enforces nothing.
        let none = load(
            "",
            Flags {
                enforce_node_allocatable: Some(String::new()),
                ..Flags::default()
            },
        )
        .unwrap();
        assert!(none.enforce_node_allocatable.is_empty());
        // Enforcing a reservation without its cgroup is refused, naming the field.
        for (yaml, field) in [
            (
                "enforceNodeAllocatable: [pods, system-reserved]\n",
                "systemReservedCgroup",
            ),
            (
                "enforceNodeAllocatable: [kube-reserved-compressible]\n",
                "kubeReservedCgroup",
            ),
        ] {
            let e = load(yaml, Flags::default()).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
        let ok = load(
            "enforceNodeAllocatable: [system-reserved]\nsystemReservedCgroup: /system.slice\n",
            Flags::default(),
        )
        .unwrap();
        assert_eq!(ok.system_reserved_cgroup.as_deref(), Some("/system.slice"));
        // `--cgroups-per-qos=false` over the file; it leaves nothing to enforce, and refuses
        // an enforcement asked for anyway.
        let flat = load(
            "cgroupsPerQOS: true\n",
            Flags {
                cgroups_per_qos: Some(false),
                ..Flags::default()
            },
        )
        .unwrap();
        assert!(!flat.cgroups_per_qos);
        assert!(flat.enforce_node_allocatable.is_empty());
        let e = load(
            "cgroupsPerQOS: false\nenforceNodeAllocatable: [pods]\n",
            Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cgroupsPerQOS"), "{e}");
    }

    #[test]
    fn the_cgroup_driver_is_cgroupfs_unless_the_flag_or_file_says_systemd() {
        use strake_types::cgroups::CgroupDriver;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let load = |yaml: &str, flag: Option<&str>| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&Flags {
                config: Some(path.clone()),
                cgroup_driver: flag.map(str::to_string),
                ..Default::default()
            })
        };
        let driver = |yaml: &str, flag: Option<&str>| load(yaml, flag).unwrap().cgroup_driver;
        assert_eq!(
            driver("kind: KubeletConfiguration\n", None),
            CgroupDriver::Cgroupfs
        );
        assert_eq!(
            driver("cgroupDriver: systemd\n", None),
            CgroupDriver::Systemd
        );
        assert_eq!(
            driver("cgroupDriver: systemd\n", Some("cgroupfs")),
            CgroupDriver::Cgroupfs
        );
        let e = load("cgroupDriver: systemd.slice\n", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cgroupDriver") && e.contains("systemd.slice"),
            "{e}"
        );
    }

    #[test]
    fn eviction_settings_come_from_flags_over_the_file_with_upstreams_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let load = |yaml: &str, flags: Flags| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&Flags {
                config: Some(path.clone()),
                ..flags
            })
        };
        let d = load("kind: KubeletConfiguration\n", Flags::default())
            .unwrap()
            .eviction;
        assert_eq!(d.pressure_transition, Duration::from_secs(300));
        // Upstream's five hard defaults, no soft ones.
        assert_eq!(d.thresholds.len(), 5);
        assert!(d.thresholds.iter().all(|t| t.grace.is_none()));
        let e = load(
            "evictionSoft: {memory.available: 1Gi}\nevictionSoftGracePeriod: {memory.available: 1m}\nevictionPressureTransitionPeriod: 30s\nevictionMaxPodGracePeriod: 20\n",
            Flags::default(),
        )
        .unwrap()
        .eviction;
        let soft: Vec<_> = e.thresholds.iter().filter(|t| t.grace.is_some()).collect();
        assert_eq!(soft.len(), 1);
        assert_eq!(soft[0].grace, Some(Duration::from_secs(60)));
        assert_eq!(
            (e.pressure_transition, e.max_pod_grace_seconds),
            (Duration::from_secs(30), 20)
        );
        // Flags win over the file.
        let f = load(
            "evictionSoft: {memory.available: 1Gi}\nevictionSoftGracePeriod: {memory.available: 1m}\n",
            Flags {
                eviction_soft: vec!["nodefs.available<50%".into()],
                eviction_soft_grace_period: vec!["nodefs.available=0s".into()],
                ..Default::default()
            },
        )
        .unwrap()
        .eviction;
        let soft: Vec<_> = f.thresholds.iter().filter(|t| t.grace.is_some()).collect();
        assert_eq!(
            soft[0].threshold.signal,
            crate::allocatable::Signal::NodeFsAvailable
        );
        // A soft threshold without a grace period, or a bad period, is refused by name.
        for (yaml, want) in [
            (
                "evictionSoft: {memory.available: 1Gi}\n",
                "grace period must be specified",
            ),
            (
                "evictionPressureTransitionPeriod: soon\n",
                "evictionPressureTransitionPeriod",
            ),
            (
                "evictionSoft: {memory.available: lots}\nevictionSoftGracePeriod: {memory.available: 1m}\n",
                "evictionSoft",
            ),
        ] {
            let e = load(yaml, Flags::default()).unwrap_err();
            let text = format!("{e}: {:?}", std::error::Error::source(&e));
            assert!(text.contains(want), "{yaml}: {text}");
        }
    }

    #[test]
    fn image_gc_settings_follow_upstreams_defaults_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let load = |yaml: &str| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&Flags {
                config: Some(path.clone()),
                ..Default::default()
            })
        };
        let d = load("kind: KubeletConfiguration\n").unwrap().image_gc;
        assert_eq!(d, crate::image_gc::Policy::default());
        assert_eq!((d.high_percent, d.low_percent), (85, 80));
        assert_eq!(d.min_age, Duration::from_secs(120));
        let c = load(
            "imageGCHighThresholdPercent: 50\nimageGCLowThresholdPercent: 10\n\
             imageMinimumGCAge: 0s\nimageMaximumGCAge: 1h\n",
        )
        .unwrap()
        .image_gc;
        assert_eq!(
            (c.high_percent, c.low_percent, c.min_age),
            (50, 10, Duration::ZERO)
        );
        assert_eq!(c.max_age, Duration::from_secs(3600));
        for bad in [
            "imageGCHighThresholdPercent: 101\n",
            "imageGCLowThresholdPercent: -1\n",
            "imageGCHighThresholdPercent: 50\nimageGCLowThresholdPercent: 50\n",
            "imageMinimumGCAge: 10m\nimageMaximumGCAge: 5m\n",
            "imageMinimumGCAge: soon\n",
        ] {
            let e = load(bad).unwrap_err().to_string();
            assert!(e.contains("image"), "{bad}: {e}");
        }
    }

    #[test]
    fn api_rate_limits_follow_upstreams_defaults_flags_and_checks() {
        use crate::api_client::{Limits, Rate};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let load = |yaml: &str, flags: Flags| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&Flags {
                config: Some(path.clone()),
                ..flags
            })
        };
        let d = load("kind: KubeletConfiguration\n", Flags::default()).unwrap();
        assert_eq!(
            d.api_limits,
            Limits {
                api: Rate::Limited {
                    qps: 50.0,
                    burst: 100
                },
                events: Rate::Limited {
                    qps: 50.0,
                    burst: 100
                },
            }
        );
        let c = load(
            "kubeAPIQPS: 0\nkubeAPIBurst: 7\neventRecordQPS: 0\neventBurst: 3\n",
            Flags::default(),
        )
        .unwrap();
        assert_eq!(c.api_limits.api, Rate::Limited { qps: 5.0, burst: 7 });
        assert_eq!(c.api_limits.events, Rate::Unlimited);
        // A flag wins over the file.
        let c = load(
            "kubeAPIQPS: 20\n",
            Flags {
                kube_api_qps: Some(30),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            c.api_limits.api,
            Rate::Limited {
                qps: 30.0,
                burst: 100
            }
        );
        for bad in [
            "kubeAPIQPS: -1\n",
            "kubeAPIBurst: -1\n",
            "eventRecordQPS: -5\n",
            "eventBurst: -1\n",
        ] {
            let e = load(bad, Flags::default()).unwrap_err().to_string();
            let field = bad.split(':').next().unwrap();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn log_rotation_settings_with_upstream_defaults_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let load = |yaml: &str| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&Flags {
                config: Some(path.clone()),
                ..Default::default()
            })
        };
        let d = load("kind: KubeletConfiguration\n").unwrap().log_rotation;
        assert_eq!((d.max_size, d.max_files, d.max_workers), (10 << 20, 5, 1));
        assert_eq!(d.interval, Duration::from_secs(10));
        let c = load(
            "containerLogMaxSize: 1Mi\ncontainerLogMaxFiles: 2\ncontainerLogMaxWorkers: 3\n\
             containerLogMonitorInterval: 2s\n",
        )
        .unwrap()
        .log_rotation;
        assert_eq!((c.max_size, c.max_files, c.max_workers), (1 << 20, 2, 3));
        assert_eq!(c.interval, Duration::from_secs(2));
        for bad in [
            "containerLogMaxFiles: 1\n",
            "containerLogMaxSize: ten\n",
            "containerLogMaxWorkers: 0\n",
            "containerLogMonitorInterval: soon\n",
        ] {
            let e = load(bad).unwrap_err().to_string();
            let field = bad.split(':').next().unwrap();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn reservations_and_eviction_thresholds() {
        use crate::allocatable::Signal;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let load = |yaml: &str, flags: Flags| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&Flags {
                config: Some(path.clone()),
                ..flags
            })
        };
        // Defaults: upstream's five hard thresholds, nothing reserved.
        let c = load("kind: KubeletConfiguration\n", Flags::default()).unwrap();
        assert_eq!(c.reservation.eviction_hard.len(), 5);
        assert!(c.reservation.kube_reserved.is_empty());
        // A partial evictionHard replaces the defaults, unless merged.
        let yaml = "kubeReserved: {cpu: 100m, memory: 1Gi}\nsystemReserved: {cpu: 50m}\n\
                    evictionHard: {memory.available: 200Mi}\n";
        let c = load(yaml, Flags::default()).unwrap();
        assert_eq!(c.reservation.eviction_hard.len(), 1);
        assert_eq!(
            c.reservation.eviction_hard[0].signal,
            Signal::MemoryAvailable
        );
        assert_eq!(c.reservation.kube_reserved["cpu"], 100);
        assert_eq!(c.reservation.system_reserved["cpu"], 50);
        let merged = format!("{yaml}mergeDefaultEvictionSettings: true\n");
        assert_eq!(
            load(&merged, Flags::default())
                .unwrap()
                .reservation
                .eviction_hard
                .len(),
            5
        );
        // Flags win over the file.
        let c = load(
            yaml,
            Flags {
                kube_reserved: vec!["cpu=1".into()],
                eviction_hard: vec!["nodefs.available<20%".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.reservation.kube_reserved["cpu"], 1000);
        assert_eq!(
            c.reservation.eviction_hard[0].signal,
            Signal::NodeFsAvailable
        );
        // Bad values are refused at start, naming the field.
        for (yaml, field) in [
            (
                "evictionHard: {memory.available: lots}\n",
                "evictionHard[memory.available]",
            ),
            (
                "evictionHard: {disk.full: 1Gi}\n",
                "evictionHard: unsupported eviction signal",
            ),
            ("kubeReserved: {memory: 1Gx}\n", "kubeReserved[memory]"),
        ] {
            let e = load(yaml, Flags::default()).unwrap_err();
            let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(chain.contains(field), "{yaml}: {chain}");
        }
    }

    #[test]
    fn upstream_defaults() {
        let c = Config::merge(
            &Flags {
                hostname_override: Some("Node-A".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.max_pods, 110);
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(10));
        assert_eq!(c.node_status_report_frequency, Duration::from_secs(300));
        assert_eq!(c.node_lease_duration, Duration::from_secs(40));
        assert_eq!(c.root_dir, PathBuf::from("/var/lib/kubelet"));
        assert_eq!((c.port, c.healthz_port), (10250, 10248));
    }

    #[test]
    fn unsafe_sysctls_are_validated_and_resolv_conf_defaults_to_etc() {
        let file: FileConfig = serde_saphyr::from_str(
            "allowedUnsafeSysctls: [\"kernel.msg*\", \"net.core.somaxconn\"]\nresolvConf: \"\"\n",
        )
        .unwrap();
        let c = Config::merge(&Flags::default(), file).unwrap();
        assert_eq!(
            c.allowed_unsafe_sysctls,
            ["kernel.msg*", "net.core.somaxconn"]
        );
        assert_eq!(c.resolv_conf, "");
        let d = Config::merge(&Flags::default(), FileConfig::default()).unwrap();
        assert_eq!(d.resolv_conf, "/etc/resolv.conf");
        let bad = Flags {
            allowed_unsafe_sysctls: vec!["vm.swappiness".into()],
            ..Default::default()
        };
        let err = Config::merge(&bad, FileConfig::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    what: "allowedUnsafeSysctls",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn file_fields_and_flags_merge_with_flags_winning() {
        let file: FileConfig = serde_saphyr::from_str(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nmaxPods: 50\n\
             nodeStatusUpdateFrequency: 4s\nnodeLeaseDurationSeconds: 12\nclusterDomain: cluster.local\n\
             clusterDNS: [10.96.0.10]\nregisterWithTaints:\n- key: a\n  value: b\n  effect: NoSchedule\n\
             containerRuntimeEndpoint: unix:///file.sock\nevictionHard: {memory.available: 100Mi}\n",
        )
        .unwrap();
        let flags = Flags {
            max_pods: Some(7),
            node_labels: vec!["zone=z1".into()],
            container_runtime_endpoint: Some("unix:///flag.sock".into()),
            ..Default::default()
        };
        let c = Config::merge(&flags, file).unwrap();
        assert_eq!(c.max_pods, 7);
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(4));
        assert_eq!(c.node_lease_duration, Duration::from_secs(12));
        assert_eq!(c.cluster_domain, "cluster.local");
        assert_eq!(c.cluster_dns, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            c.register_with_taints,
            vec![TaintSpec {
                key: "a".into(),
                value: "b".into(),
                effect: "NoSchedule".into()
            }]
        );
        assert_eq!(c.node_labels["zone"], "z1");
        assert_eq!(c.container_runtime_endpoint, "unix:///flag.sock");
    }

    #[test]
    fn taint_flags_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_taint("dedicated=gpu:NoExecute").unwrap(),
            TaintSpec {
                key: "dedicated".into(),
                value: "gpu".into(),
                effect: "NoExecute".into()
            }
        );
        assert_eq!(parse_taint("k:NoSchedule").unwrap().value, "");
        assert!(parse_taint("k=v").is_err());
        assert!(parse_taint("k=v:Sometimes").is_err());
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let text = include_str!("../../../manifests/kubelet/config.yaml");
        let file: FileConfig = serde_saphyr::from_str(text).unwrap();
        let c = Config::merge(
            &Flags {
                hostname_override: Some("n".into()),
                config: Some("/var/lib/kubelet/config.yaml".into()),
                ..Default::default()
            },
            file,
        )
        .unwrap();
        assert_eq!(
            c.container_runtime_endpoint,
            "unix:///run/strake/runtime.sock"
        );
        // The API is closed to strangers, and the API server's client certificate (signed by
        // the cluster CA) authenticates `kubectl logs/exec`.
        assert!(!c.authentication.anonymous);
        assert!(c.authentication.webhook);
        assert_eq!(c.authorization.mode, AuthorizationMode::Webhook);
        assert_eq!(
            c.authentication.client_ca_file,
            Some(PathBuf::from("/etc/kubernetes/pki/ca.crt"))
        );
        assert!(c.insecure_api_settings().is_empty());
        assert_eq!(
            c.pod_manifest_path,
            Some(PathBuf::from("/etc/kubernetes/manifests"))
        );
        assert_eq!(c.node_status_report_frequency, Duration::from_secs(300));
        assert_eq!(c.cgroup_root, "");
        assert_eq!(c.cluster_dns, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn api_security_defaults_follow_upstream_with_and_without_a_config_file() {
        let flags_only = Config::merge(&Flags::default(), FileConfig::default()).unwrap();
        assert!(flags_only.authentication.anonymous);
        assert!(!flags_only.authentication.webhook);
        assert_eq!(
            flags_only.authorization.mode,
            AuthorizationMode::AlwaysAllow
        );
        assert_eq!(flags_only.address, "0.0.0.0".parse::<IpAddr>().unwrap());
        let with_file = Flags {
            config: Some("/k.yaml".into()),
            ..Default::default()
        };
        assert_eq!(flags_only.insecure_api_settings().len(), 2);
        let c = Config::merge(&with_file, FileConfig::default()).unwrap();
        assert!(c.insecure_api_settings().is_empty());
        assert!(!c.authentication.anonymous);
        assert!(c.authentication.webhook);
        assert_eq!(c.authentication.webhook_cache_ttl, Duration::from_secs(120));
        assert_eq!(c.authorization.mode, AuthorizationMode::Webhook);
        assert_eq!(
            c.authorization.cache_authorized_ttl,
            Duration::from_secs(300)
        );
        assert_eq!(
            c.authorization.cache_unauthorized_ttl,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn api_security_fields_parse_from_the_file_and_flags_win() {
        let file: FileConfig = serde_saphyr::from_str(
            "address: 127.0.0.1\nport: 11250\ntlsCertFile: /c.crt\ntlsPrivateKeyFile: /c.key\n\
             authentication:\n  x509: {clientCAFile: /ca.crt}\n  webhook: {enabled: false, cacheTTL: 5s}\n\
             \x20 anonymous: {enabled: true}\nauthorization:\n  mode: AlwaysAllow\n\
             \x20 webhook: {cacheAuthorizedTTL: 1m, cacheUnauthorizedTTL: 2s}\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some("/k.yaml".into()),
            anonymous_auth: Some(false),
            ..Default::default()
        };
        let c = Config::merge(&flags, file).unwrap();
        assert_eq!(c.address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 11250);
        assert_eq!(c.tls_cert_file, Some(PathBuf::from("/c.crt")));
        assert_eq!(c.tls_private_key_file, Some(PathBuf::from("/c.key")));
        assert_eq!(
            c.authentication.client_ca_file,
            Some(PathBuf::from("/ca.crt"))
        );
        assert!(!c.authentication.webhook);
        assert!(!c.authentication.anonymous, "the flag wins");
        assert_eq!(c.authentication.webhook_cache_ttl, Duration::from_secs(5));
        assert_eq!(c.authorization.mode, AuthorizationMode::AlwaysAllow);
        assert_eq!(
            c.authorization.cache_authorized_ttl,
            Duration::from_secs(60)
        );
        assert_eq!(
            c.authorization.cache_unauthorized_ttl,
            Duration::from_secs(2)
        );
        let bad = Flags {
            authorization_mode: Some("Node".into()),
            ..Default::default()
        };
        assert!(Config::merge(&bad, FileConfig::default()).is_err());
    }

    #[test]
    fn boolean_flags_take_go_style_values() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            flags: Flags,
        }
        let f = Cli::try_parse_from([
            "k",
            "--anonymous-auth=false",
            "--authentication-token-webhook",
            "--authorization-mode=Webhook",
            "--port=11250",
            "--address=127.0.0.1",
            "--client-ca-file=/ca.crt",
        ])
        .unwrap()
        .flags;
        assert_eq!(f.anonymous_auth, Some(false));
        assert_eq!(f.authentication_token_webhook, Some(true));
        let c = Config::merge(&f, FileConfig::default()).unwrap();
        assert!(!c.authentication.anonymous && c.authentication.webhook);
        assert_eq!(c.authorization.mode, AuthorizationMode::Webhook);
        assert_eq!(c.port, 11250);
        assert_eq!(
            c.authentication.client_ca_file,
            Some(PathBuf::from("/ca.crt"))
        );
    }
}
