//! Pod spec -> CRI configuration: pure functions, the kubelet's rules as upstream applies them.

use std::collections::{BTreeMap, HashMap};

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use strake_types::cri;

use crate::config::Config;

/// Label keys the kubelet puts on CRI objects to find them again (upstream's names).
pub mod labels {
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    /// Annotation holding the container's restart count.
    pub const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
}

/// An ephemeral container as the container it runs: the same fields, less the target (which
/// only chooses the process namespace, [`target_container`]).
pub fn ephemeral_container(ec: &EphemeralContainer) -> Container {
    let EphemeralContainer {
        args,
        command,
        env,
        env_from,
        image,
        image_pull_policy,
        lifecycle,
        liveness_probe,
        name,
        ports,
        readiness_probe,
        resize_policy,
        resources,
        restart_policy,
        restart_policy_rules,
        security_context,
        startup_probe,
        stdin,
        stdin_once,
        target_container_name: _,
        termination_message_path,
        termination_message_policy,
        tty,
        volume_devices,
        volume_mounts,
        working_dir,
    } = ec.clone();
    Container {
        args,
        command,
        env,
        env_from,
        image,
        image_pull_policy,
        lifecycle,
        liveness_probe,
        name,
        ports,
        readiness_probe,
        resize_policy,
        resources,
        restart_policy,
        restart_policy_rules,
        security_context,
        startup_probe,
        stdin,
        stdin_once,
        termination_message_path,
        termination_message_policy,
        tty,
        volume_devices,
        volume_mounts,
        working_dir,
    }
}

/// Container `name` of the pod's spec: init, app or ephemeral (names are unique across the
/// three, as the API server validates).
pub fn find_container<'a>(pod: &'a Pod, name: &str) -> Option<Cow<'a, Container>> {
    let spec = pod.spec.as_ref()?;
    let found = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name);
    match found {
        Some(c) => Some(Cow::Borrowed(c)),
        None => spec
            .ephemeral_containers
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .map(|e| Cow::Owned(ephemeral_container(e))),
    }
}

/// The container whose process namespace ephemeral container `name` joins, if it names one.
pub fn target_container<'a>(pod: &'a Pod, name: &str) -> Option<&'a str> {
    pod.spec
        .as_ref()?
        .ephemeral_containers
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .target_container_name
        .as_deref()
}

/// A pod's QoS class: the API server's (`status.qosClass`, immutable once set), else derived
/// as upstream derives it.
pub fn qos_class(pod: &Pod) -> &'static str {
    match pod.status.as_ref().and_then(|s| s.qos_class.as_deref()) {
        Some("Guaranteed") => "Guaranteed",
        Some("Burstable") => "Burstable",
        Some("BestEffort") => "BestEffort",
        _ => compute_qos_class(pod),
    }
}

/// Upstream's QoS rules: only CPU and memory count, zero quantities count as unset, init
/// containers count, and a pod is Guaranteed when every container limits both and the pod's
/// summed requests equal its summed limits (a request left out defaults to its limit, as the
/// API server's defaulting makes it). Pod-level `resources`, when set, stand for the
/// containers'.
pub fn compute_qos_class(pod: &Pod) -> &'static str {
    const QOS_RESOURCES: [&str; 2] = ["cpu", "memory"];
    let Some(spec) = pod.spec.as_ref() else {
        return "BestEffort";
    };
    let nonzero = |map: Option<&BTreeMap<String, Quantity>>, name: &str| {
        map.and_then(|m| m.get(name))
            .and_then(|q| crate::resources::parse_milli(&q.0).ok())
            .filter(|v| *v > 0)
    };
    let mut requests: BTreeMap<&str, i128> = BTreeMap::new();
    let mut limits: BTreeMap<&str, i128> = BTreeMap::new();
    let mut guaranteed = true;
    let mut add = |res: Option<&ResourceRequirements>| {
        let (req, lim) = (
            res.and_then(|r| r.requests.as_ref()),
            res.and_then(|r| r.limits.as_ref()),
        );
        for name in QOS_RESOURCES {
            let limit = nonzero(lim, name);
            if let Some(v) = nonzero(req, name).or(limit) {
                *requests.entry(name).or_default() += v;
            }
            match limit {
                Some(v) => *limits.entry(name).or_default() += v,
                None => guaranteed = false,
            }
        }
    };
    match spec.resources.as_ref() {
        Some(pod_level) => add(Some(pod_level)),
        None => {
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                add(c.resources.as_ref());
            }
        }
    }
    if requests.is_empty() && limits.is_empty() {
        "BestEffort"
    } else if guaranteed && requests == limits {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn meta(pod: &Pod) -> (String, String, String) {
    let m = &pod.metadata;
    (
        m.name.clone().unwrap_or_default(),
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.uid.clone().unwrap_or_default(),
    )
}

/// The sandbox configuration cannot be made (upstream's `generatePodSandboxConfig` errors).
#[derive(Debug, thiserror::Error)]
pub enum SandboxConfigError {
    #[error(transparent)]
    Hostname(#[from] HostnameError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
}

/// The pod's hostname or FQDN is not usable (upstream's messages).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostnameError {
    #[error("pod Hostname {0:?} is not a valid DNS label")]
    InvalidHostname(String),
    #[error("pod HostnameOverride {0:?} is not a valid DNS subdomain")]
    InvalidHostnameOverride(String),
    #[error("pod Subdomain {0:?} is not a valid DNS label")]
    InvalidSubdomain(String),
    #[error("hostname for pod {pod:?} was invalid: {hostname:?}")]
    Truncated { pod: String, hostname: String },
    #[error(
        "failed to construct FQDN from pod hostname and cluster domain, FQDN {fqdn} is too long \
         (64 characters is the max, {len} characters requested)",
        len = fqdn.len()
    )]
    FqdnTooLong { fqdn: String },
}

/// RFC 1123 label: at most 63 characters of `[a-z0-9-]`, alphanumeric at both ends.
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: labels joined by dots, at most 253 characters.
fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// Caps a hostname at 63 characters (the kernel's 64 bytes with the terminating NUL), without
/// a trailing `-` or `.`.
fn truncate_hostname(pod: &str, hostname: &str) -> Result<String, HostnameError> {
    if hostname.len() <= 63 {
        return Ok(hostname.to_string());
    }
    let cut: String = hostname.chars().take(63).collect();
    let cut = cut.trim_end_matches(['-', '.']);
    if cut.is_empty() {
        return Err(HostnameError::Truncated {
            pod: pod.to_string(),
            hostname: hostname.to_string(),
        });
    }
    tracing::warn!(
        pod,
        hostname = cut,
        "hostname for pod was too long, truncated it"
    );
    Ok(cut.to_string())
}

/// The pod's hostname and domain (upstream's `GeneratePodHostNameAndDomain`): `hostnameOverride`
/// alone if set; else `spec.hostname` or the pod name, truncated to 63 characters, and with a
/// `subdomain` the domain `<subdomain>.<namespace>.svc.<clusterDomain>`.
pub fn hostname_and_domain(
    pod: &Pod,
    cluster_domain: &str,
) -> Result<(String, String), HostnameError> {
    let (name, ns, _) = meta(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    if let Some(over) = &spec.hostname_override {
        if !is_dns1123_subdomain(over) {
            return Err(HostnameError::InvalidHostnameOverride(over.clone()));
        }
        return Ok((truncate_hostname(&name, over)?, String::new()));
    }
    let hostname = match spec.hostname.as_deref().filter(|h| !h.is_empty()) {
        Some(h) if !is_dns1123_label(h) => return Err(HostnameError::InvalidHostname(h.into())),
        Some(h) => h.to_string(),
        None => name.clone(),
    };
    let hostname = truncate_hostname(&name, &hostname)?;
    let domain = match spec.subdomain.as_deref().filter(|s| !s.is_empty()) {
        Some(sub) if !is_dns1123_label(sub) => {
            return Err(HostnameError::InvalidSubdomain(sub.into()));
        }
        Some(sub) => format!("{sub}.{ns}.svc.{cluster_domain}"),
        None => String::new(),
    };
    Ok((hostname, domain))
}

/// The kernel hostname of the sandbox (upstream's `GetNodenameForKernel`): the FQDN with
/// `setHostnameAsFQDN` and a domain, which must fit the kernel's 64 characters.
pub fn kernel_hostname(
    hostname: &str,
    domain: &str,
    set_hostname_as_fqdn: bool,
) -> Result<String, HostnameError> {
    if domain.is_empty() || !set_hostname_as_fqdn {
        return Ok(hostname.to_string());
    }
    let fqdn = format!("{hostname}.{domain}");
    if fqdn.len() > 64 {
        return Err(HostnameError::FqdnTooLong { fqdn });
    }
    Ok(fqdn)
}

/// RunPodSandbox's configuration. Reads the host's resolver configuration (`resolvConf`).
pub fn sandbox_config(
    pod: &Pod,
    config: &Config,
    attempt: u32,
) -> Result<cri::PodSandboxConfig, SandboxConfigError> {
    let host_dns = crate::dns::host_dns(config)?;
    sandbox_config_with(pod, config, attempt, host_dns)
}

/// [`sandbox_config`] with the host's resolver configuration given.
pub fn sandbox_config_with(
    pod: &Pod,
    config: &Config,
    attempt: u32,
    host_dns: cri::DnsConfig,
) -> Result<cri::PodSandboxConfig, SandboxConfigError> {
    let (name, ns, uid) = meta(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let mut labels: HashMap<String, String> = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    labels.insert(labels::POD_NAME.into(), name.clone());
    labels.insert(labels::POD_NAMESPACE.into(), ns.clone());
    labels.insert(labels::POD_UID.into(), uid.clone());
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.unwrap_or(0) > 0)
        .map(|p| cri::PortMapping {
            protocol: match p.protocol.as_deref() {
                Some("UDP") => cri::Protocol::Udp as i32,
                Some("SCTP") => cri::Protocol::Sctp as i32,
                _ => cri::Protocol::Tcp as i32,
            },
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or(0),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect();
    // Host-network pods keep the node's hostname.
    let hostname = if spec.host_network.unwrap_or(false) {
        String::new()
    } else {
        let (hostname, domain) = hostname_and_domain(pod, &config.cluster_domain)?;
        kernel_hostname(
            &hostname,
            &domain,
            spec.set_hostname_as_fqdn.unwrap_or(false),
        )?
    };
    Ok(cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: uid.clone(),
            namespace: ns.clone(),
            attempt,
        }),
        hostname,
        log_directory: config
            .pod_logs_dir
            .join(format!("{ns}_{name}_{uid}"))
            .display()
            .to_string(),
        dns_config: Some(crate::dns::pod_dns(pod, config, host_dns)),
        port_mappings,
        labels,
        annotations: pod
            .metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: if config.cgroups_per_qos {
                crate::pod_cgroups::pod_cgroup_parent(
                    config.cgroup_driver,
                    &config.cgroup_root,
                    qos_class(pod),
                    &uid,
                )
            } else {
                // Without QoS cgroups, pods go straight below the cgroup root, as upstream's.
                match config.cgroup_root.as_str() {
                    "" => "/".to_string(),
                    root => root.to_string(),
                }
            },
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(&spec)),
                // Runtimes refuse a privileged container in a sandbox that is not.
                privileged: has_privileged_container(&spec),
                ..Default::default()
            }),
            sysctls: crate::sysctls::sandbox_sysctls(pod),
            ..Default::default()
        }),
        windows: None,
    })
}

/// Whether any container of the pod (init and ephemeral ones included) is privileged, which
/// makes its sandbox privileged (upstream's `HasPrivilegedContainer`).
fn has_privileged_container(spec: &k8s_openapi::api::core::v1::PodSpec) -> bool {
    let privileged = |sc: Option<&k8s_openapi::api::core::v1::SecurityContext>| {
        sc.and_then(|s| s.privileged).unwrap_or(false)
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| privileged(c.security_context.as_ref()))
        || spec
            .ephemeral_containers
            .iter()
            .flatten()
            .any(|c| privileged(c.security_context.as_ref()))
}

/// Why a container's configuration cannot be made (CreateContainerConfigError).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContainerConfigError {
    #[error("env var {name}: {reason}")]
    Env { name: String, reason: String },
}

/// `$(VAR)` expansion as the kubelet does it: defined names expand, `$$` escapes, undefined
/// references stay as written.
pub fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    expand_with(input, |name| vars.get(name).cloned())
}

/// [`expand`] with the values from `lookup` (`None`: the reference stays as written).
pub fn expand_with(input: &str, mut lookup: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let name = &body[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = body;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment: literal values, `$(VAR)` references to earlier variables, and
/// the downward-API fields the kubelet knows without other objects.
/// The ConfigMaps and Secrets a container's environment refers to, fetched beforehand
/// (`None` = does not exist), so that [`env`] stays a pure function.
#[derive(Clone, Debug, Default)]
pub struct EnvSources {
    pub config_maps:
        std::collections::BTreeMap<String, Option<std::collections::BTreeMap<String, String>>>,
    pub secrets:
        std::collections::BTreeMap<String, Option<std::collections::BTreeMap<String, String>>>,
    /// What `limits.*` of a `resourceFieldRef` default to; this machine's when `None`.
    pub node: Option<crate::resources::NodeAllocatable>,
    /// The Services whose environment variables the container gets (see [`service_env`]).
    pub services: Vec<k8s_openapi::api::core::v1::Service>,
}

/// Docker-links-style environment variables for Services, as upstream injects them: for each
/// Service with a cluster IP, `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT` (first port),
/// `<NAME>_SERVICE_PORT_<PORT NAME>`, `<NAME>_PORT` and per port `<NAME>_PORT_<port>_<PROTO>`
/// with its `_PROTO`, `_PORT` and `_ADDR`. Names are upper-cased with `-` as `_`.
pub fn service_env(services: &[k8s_openapi::api::core::v1::Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut sorted: Vec<&k8s_openapi::api::core::v1::Service> = services.iter().collect();
    sorted.sort_by_key(|s| s.metadata.name.clone());
    for svc in sorted {
        let Some(spec) = &svc.spec else { continue };
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let name = svc
            .metadata
            .name
            .clone()
            .unwrap_or_default()
            .to_uppercase()
            .replace('-', "_");
        let ports = spec.ports.clone().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.clone()
        };
        out.push((format!("{name}_SERVICE_HOST"), ip.clone()));
        out.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in &ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        pn.to_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.clone().unwrap_or_else(|| "TCP".into())
        };
        out.push((
            format!("{name}_PORT"),
            format!("{}://{host}:{}", proto(first).to_lowercase(), first.port),
        ));
        for p in &ports {
            let pr = proto(p);
            let prefix = format!("{name}_PORT_{}_{}", p.port, pr.to_uppercase());
            out.push((
                prefix.clone(),
                format!("{}://{host}:{}", pr.to_lowercase(), p.port),
            ));
            out.push((format!("{prefix}_PROTO"), pr.to_lowercase()));
            out.push((format!("{prefix}_PORT"), p.port.to_string()));
            out.push((format!("{prefix}_ADDR"), ip.clone()));
        }
    }
    out
}

impl EnvSources {
    /// Names of the ConfigMaps and Secrets container `c` refers to.
    pub fn wanted(c: &Container) -> (Vec<String>, Vec<String>) {
        let mut cms = Vec::new();
        let mut secrets = Vec::new();
        for e in c.env.iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    cms.push(r.name.clone());
                }
                if let Some(r) = &from.secret_key_ref {
                    secrets.push(r.name.clone());
                }
            }
        }
        for f in c.env_from.iter().flatten() {
            if let Some(r) = &f.config_map_ref {
                cms.push(r.name.clone());
            }
            if let Some(r) = &f.secret_ref {
                secrets.push(r.name.clone());
            }
        }
        cms.sort();
        cms.dedup();
        secrets.sort();
        secrets.dedup();
        (cms, secrets)
    }
}

/// Labels or annotations as the downward API formats them: `key="value"` lines, sorted by key,
/// with no newline after the last (upstream's `FormatMap`).
pub fn format_map(m: &std::collections::BTreeMap<String, String>) -> String {
    let lines: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    lines.join("\n")
}

/// A metadata field of `pod` named by a downward API `fieldPath` (upstream's
/// `ExtractFieldPathAsString`): name, namespace, uid, all labels or annotations, or one of them
/// by subscript (`metadata.labels['key']`, empty when absent). `None` for any other path.
pub fn metadata_field(pod: &Pod, path: &str) -> Option<String> {
    let m = &pod.metadata;
    let subscripted = path
        .strip_suffix("']")
        .and_then(|p| p.split_once("['"))
        .filter(|(field, _)| !field.is_empty());
    if let Some((field, key)) = subscripted {
        let map = match field {
            "metadata.labels" => m.labels.as_ref(),
            "metadata.annotations" => m.annotations.as_ref(),
            _ => return None,
        };
        return Some(map.and_then(|m| m.get(key).cloned()).unwrap_or_default());
    }
    Some(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(&m.labels.clone().unwrap_or_default()),
        "metadata.annotations" => format_map(&m.annotations.clone().unwrap_or_default()),
        _ => return None,
    })
}

/// The container's environment: `envFrom` sources first, then `env` entries (literal values
/// with `$(VAR)` expansion, downward-API fields, ConfigMap and Secret keys), as upstream orders
/// them; later names override earlier ones.
pub fn env(
    pod: &Pod,
    c: &Container,
    pod_ip: &str,
    host_ip: &str,
    sources: &EnvSources,
) -> Result<Vec<(String, String)>, ContainerConfigError> {
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_default();
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut out: Vec<(String, String)> = Vec::new();
    let set = |out: &mut Vec<(String, String)>,
               vars: &mut HashMap<String, String>,
               k: String,
               v: String| {
        out.retain(|(n, _)| *n != k);
        vars.insert(k.clone(), v.clone());
        out.push((k, v));
    };
    // Service variables first: the container's own variables override and can refer to them.
    for (k, v) in service_env(&sources.services) {
        set(&mut out, &mut vars, k, v);
    }
    for f in c.env_from.iter().flatten() {
        let prefix = f.prefix.clone().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(r) = &f.config_map_ref {
            (
                "configmap",
                r.name.clone(),
                r.optional.unwrap_or(false),
                sources.config_maps.get(&r.name).cloned().flatten(),
            )
        } else if let Some(r) = &f.secret_ref {
            (
                "secret",
                r.name.clone(),
                r.optional.unwrap_or(false),
                sources.secrets.get(&r.name).cloned().flatten(),
            )
        } else {
            continue;
        };
        match data {
            Some(d) => {
                for (k, v) in d {
                    set(&mut out, &mut vars, format!("{prefix}{k}"), v);
                }
            }
            None if optional => {}
            None => {
                return Err(ContainerConfigError::Env {
                    name: format!("envFrom {kind}"),
                    reason: format!("{kind} {name:?} not found"),
                });
            }
        }
    }
    for e in c.env.iter().flatten() {
        if let Some(from) = &e.value_from {
            let keyed = if let Some(r) = &from.config_map_key_ref {
                Some((
                    "configmap",
                    &r.name,
                    &r.key,
                    r.optional.unwrap_or(false),
                    sources.config_maps.get(&r.name).cloned().flatten(),
                ))
            } else {
                from.secret_key_ref.as_ref().map(|r| {
                    (
                        "secret",
                        &r.name,
                        &r.key,
                        r.optional.unwrap_or(false),
                        sources.secrets.get(&r.name).cloned().flatten(),
                    )
                })
            };
            if let Some((kind, name, key, optional, data)) = keyed {
                match data.and_then(|d| d.get(key).cloned()) {
                    Some(v) => set(&mut out, &mut vars, e.name.clone(), v),
                    None if optional => {}
                    None => {
                        return Err(ContainerConfigError::Env {
                            name: e.name.clone(),
                            reason: format!("key {key:?} of {kind} {name:?} not found"),
                        });
                    }
                }
                continue;
            }
        }
        let value = if let Some(v) = &e.value {
            expand(v, &vars)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "spec.nodeName" => node_name.clone(),
                    "spec.serviceAccountName" => sa.clone(),
                    "status.podIP" | "status.podIPs" => pod_ip.to_string(),
                    "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
                    path if metadata_field(pod, path).is_some() => {
                        metadata_field(pod, path).unwrap_or_default()
                    }
                    other => {
                        return Err(ContainerConfigError::Env {
                            name: e.name.clone(),
                            reason: format!("unsupported fieldRef {other}"),
                        });
                    }
                }
            } else if let Some(sel) = &from.resource_field_ref {
                let node = sources
                    .node
                    .unwrap_or_else(crate::resources::NodeAllocatable::of_this_machine);
                crate::resources::field_value(sel, c, &node).map_err(|reason| {
                    ContainerConfigError::Env {
                        name: e.name.clone(),
                        reason,
                    }
                })?
            } else {
                return Err(ContainerConfigError::Env {
                    name: e.name.clone(),
                    reason: "valueFrom names no source".into(),
                });
            }
        } else {
            String::new()
        };
        set(&mut out, &mut vars, e.name.clone(), value);
    }
    Ok(out)
}

/// The user an image runs as, from the runtime's ImageStatus: its `uid`, else its `username`;
/// an image that names neither (or that the runtime does not know) runs as root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageUser {
    /// A numeric user.
    Uid(i64),
    /// A user name the runtime resolves in the image's `/etc/passwd`.
    Name(String),
}

impl Default for ImageUser {
    fn default() -> Self {
        ImageUser::Uid(0)
    }
}

impl ImageUser {
    /// The user of `image` as ImageStatus reports it (`None`: no such image).
    pub fn of_image(image: Option<&cri::Image>) -> Self {
        match image {
            Some(cri::Image { uid: Some(uid), .. }) => ImageUser::Uid(uid.value),
            Some(i) if !i.username.is_empty() => ImageUser::Name(i.username.clone()),
            _ => ImageUser::default(),
        }
    }
}

/// The UID a container will run as when it sets `runAsUser` itself or through its pod.
pub fn explicit_run_as_user(pod: &Pod, c: &Container) -> Option<i64> {
    c.security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.security_context.as_ref())
                .and_then(|s| s.run_as_user)
        })
}

/// The pod's namespaces, for its sandbox and each of its containers alike (upstream's
/// `namespacesForPod`): the node's network, IPC and PID namespaces when asked for, else the
/// pod's; processes in a namespace of their own per container unless `shareProcessNamespace`.
pub fn namespace_options(spec: &k8s_openapi::api::core::v1::PodSpec) -> cri::NamespaceOption {
    let node_or_pod = |on: Option<bool>| {
        if on.unwrap_or(false) {
            cri::NamespaceMode::Node as i32
        } else {
            cri::NamespaceMode::Pod as i32
        }
    };
    cri::NamespaceOption {
        network: node_or_pod(spec.host_network),
        pid: if spec.host_pid.unwrap_or(false) {
            cri::NamespaceMode::Node as i32
        } else if spec.share_process_namespace.unwrap_or(false) {
            cri::NamespaceMode::Pod as i32
        } else {
            cri::NamespaceMode::Container as i32
        },
        ipc: node_or_pod(spec.host_ipc),
        ..Default::default()
    }
}

/// Makes an ephemeral container's configuration join the processes of container `target_id`
/// (`targetContainerName`), as upstream's kubelet asks it of the runtime.
pub fn join_processes_of(config: &mut cri::ContainerConfig, target_id: &str) {
    let sc = config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default);
    let ns = sc.namespace_options.get_or_insert_with(Default::default);
    ns.pid = cri::NamespaceMode::Target as i32;
    ns.target_id = target_id.to_string();
}

/// The container's Linux security context from its own and the pod's `securityContext`, as
/// upstream's kubelet translates them: user and group (container first, then pod; without a
/// `runAsUser` the image's user, so that a `runAsGroup` never reaches the runtime alone, which
/// the CRI forbids), supplemental groups with `fsGroup`, capabilities, privileged, read-only
/// root filesystem, `allowPrivilegeEscalation: false` as no_new_privs, and the seccomp profile
/// (Unconfined unless one is given, upstream's default without `seccompDefault`; Localhost
/// profiles under `<root-dir>/seccomp`).
pub fn linux_security_context(
    pod: &Pod,
    c: &Container,
    image_user: &ImageUser,
    seccomp_root: &std::path::Path,
) -> cri::LinuxContainerSecurityContext {
    use cri::security_profile::ProfileType;
    let psc = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.clone())
        .unwrap_or_default();
    let csc = c.security_context.clone().unwrap_or_default();
    let mut groups: Vec<i64> = psc.supplemental_groups.clone().unwrap_or_default();
    if let Some(g) = psc.fs_group
        && !groups.contains(&g)
    {
        groups.push(g);
    }
    let seccomp = csc.seccomp_profile.clone().or(psc.seccomp_profile.clone());
    let seccomp = Some(match seccomp {
        Some(p) if p.type_ == "RuntimeDefault" => cri::SecurityProfile {
            profile_type: ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        },
        Some(p) if p.type_ == "Localhost" => cri::SecurityProfile {
            profile_type: ProfileType::Localhost as i32,
            localhost_ref: seccomp_root
                .join(p.localhost_profile.unwrap_or_default())
                .display()
                .to_string(),
        },
        _ => cri::SecurityProfile {
            profile_type: ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        },
    });
    // Upstream's order: the container's or pod's `runAsUser`, else the image's UID, else its
    // user name.
    let (run_as_user, run_as_username) = match (explicit_run_as_user(pod, c), image_user) {
        (Some(uid), _) => (Some(uid), String::new()),
        (None, ImageUser::Uid(uid)) => (Some(*uid), String::new()),
        (None, ImageUser::Name(name)) => (None, name.clone()),
    };
    let caps = csc.capabilities.clone().unwrap_or_default();
    cri::LinuxContainerSecurityContext {
        capabilities: Some(cri::Capability {
            add_capabilities: caps.add.unwrap_or_default(),
            drop_capabilities: caps.drop.unwrap_or_default(),
            ..Default::default()
        }),
        privileged: csc.privileged.unwrap_or(false),
        run_as_user: run_as_user.map(|value| cri::Int64Value { value }),
        run_as_username,
        run_as_group: csc
            .run_as_group
            .or(psc.run_as_group)
            .map(|value| cri::Int64Value { value }),
        readonly_rootfs: csc.read_only_root_filesystem.unwrap_or(false),
        supplemental_groups: groups,
        no_new_privs: csc.allow_privilege_escalation == Some(false),
        seccomp,
        namespace_options: Some(namespace_options(&pod.spec.clone().unwrap_or_default())),
        ..Default::default()
    }
}

/// CreateContainer's configuration for container `c` of `pod` (`image_user`: the user of the
/// image `image_ref`).
#[allow(clippy::too_many_arguments)]
pub fn container_config(
    pod: &Pod,
    c: &Container,
    attempt: u32,
    image_ref: &str,
    image_user: &ImageUser,
    env: &[(String, String)],
    mounts: Vec<cri::Mount>,
    seccomp_root: &std::path::Path,
) -> cri::ContainerConfig {
    let (name, ns, uid) = meta(pod);
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    let labels = HashMap::from([
        (labels::POD_NAME.to_string(), name),
        (labels::POD_NAMESPACE.to_string(), ns),
        (labels::POD_UID.to_string(), uid),
        (labels::CONTAINER_NAME.to_string(), c.name.clone()),
    ]);
    let annotations = HashMap::from([(labels::RESTART_COUNT.to_string(), attempt.to_string())]);
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: c.name.clone(),
            attempt,
        }),
        image: Some(cri::ImageSpec {
            image: image_ref.to_string(),
            user_specified_image: c.image.clone().unwrap_or_default(),
            ..Default::default()
        }),
        command: c
            .command
            .iter()
            .flatten()
            .map(|s| expand(s, &vars))
            .collect(),
        args: c.args.iter().flatten().map(|s| expand(s, &vars)).collect(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs: env
            .iter()
            .map(|(k, v)| cri::KeyValue {
                key: k.clone(),
                value: v.clone().into_bytes(),
            })
            .collect(),
        labels,
        annotations,
        log_path: format!("{}/{attempt}.log", c.name),
        mounts,
        stdin: c.stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
        tty: c.tty.unwrap_or(false),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(crate::resources::linux_resources(
                c,
                qos_class(pod),
                crate::resources::NodeAllocatable::of_this_machine()
                    .memory
                    .clamp(0, u64::MAX as i128) as u64,
            )),
            security_context: Some(linux_security_context(pod, c, image_user, seccomp_root)),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flags;
    use k8s_openapi::api::core::v1::{
        EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, ResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::collections::BTreeMap;

    fn pod(containers: Vec<Container>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("web".into());
        p.metadata.namespace = Some("prod".into());
        p.metadata.uid = Some("u-1".into());
        p.spec = Some(PodSpec {
            containers,
            node_name: Some("n1".into()),
            ..Default::default()
        });
        p
    }

    fn res(req: &[(&str, &str)], lim: &[(&str, &str)]) -> Option<ResourceRequirements> {
        let m = |v: &[(&str, &str)]| {
            Some(
                v.iter()
                    .map(|(k, q)| (k.to_string(), Quantity(q.to_string())))
                    .collect(),
            )
        };
        Some(ResourceRequirements {
            requests: m(req),
            limits: m(lim),
            ..Default::default()
        })
    }

    #[test]
    fn qos_classes() {
        let c = |r| Container {
            name: "c".into(),
            resources: r,
            ..Default::default()
        };
        assert_eq!(qos_class(&pod(vec![c(None)])), "BestEffort");
        assert_eq!(
            qos_class(&pod(vec![c(res(&[("cpu", "1")], &[]))])),
            "Burstable"
        );
        assert_eq!(
            qos_class(&pod(vec![c(res(
                &[("cpu", "1"), ("memory", "1Gi")],
                &[("cpu", "1"), ("memory", "1Gi")]
            ))])),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(vec![c(res(&[], &[("cpu", "1"), ("memory", "1Gi")]))])),
            "Guaranteed"
        );
        // Only CPU and memory count: an extended resource alone is BestEffort, as upstream's
        // (the API server's status.qosClass, which the kubelet must not contradict).
        assert_eq!(
            qos_class(&pod(vec![c(res(
                &[("example.com/fakecpu", "800")],
                &[("example.com/fakecpu", "800")]
            ))])),
            "BestEffort"
        );
        // Zero quantities count as unset.
        assert_eq!(
            qos_class(&pod(vec![c(res(&[("cpu", "0")], &[]))])),
            "BestEffort"
        );
        // An init container without limits makes the pod Burstable.
        let mut p = pod(vec![c(res(&[], &[("cpu", "1"), ("memory", "1Gi")]))]);
        p.spec.as_mut().unwrap().init_containers = Some(vec![c(res(&[("cpu", "1")], &[]))]);
        assert_eq!(qos_class(&p), "Burstable");
        // The API server's class wins.
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            qos_class: Some("Guaranteed".into()),
            ..Default::default()
        });
        assert_eq!(qos_class(&p), "Guaranteed");
    }

    #[test]
    fn without_qos_cgroups_pods_go_below_the_cgroup_root() {
        let mut config = Config::load(&Flags::default()).unwrap();
        let p = spec_pod("web", serde_json::json!({}));
        let parent = |config: &Config| {
            sandbox_config_with(&p, config, 0, cri::DnsConfig::default())
                .unwrap()
                .linux
                .unwrap()
                .cgroup_parent
        };
        assert!(parent(&config).starts_with("/kubepods/besteffort/pod"));
        config.cgroups_per_qos = false;
        assert_eq!(parent(&config), "/");
        config.cgroup_root = "rel".into();
        assert_eq!(parent(&config), "rel");
    }

    fn spec_pod(name: &str, spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = serde_json::json!([{ "name": "c" }]);
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "namespace": "prod", "uid": "u-1" },
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn hostname_is_spec_hostname_or_the_pod_name_truncated_as_upstream() {
        let hd = |name: &str, spec| hostname_and_domain(&spec_pod(name, spec), "cluster.local");
        assert_eq!(
            hd("web", serde_json::json!({})),
            Ok(("web".to_string(), String::new()))
        );
        assert_eq!(
            hd(
                "web",
                serde_json::json!({ "hostname": "db", "subdomain": "nginx" })
            ),
            Ok(("db".into(), "nginx.prod.svc.cluster.local".into()))
        );
        // 70 characters whose 63rd and 62nd are '-' and '.': cut at 63, then trimmed.
        let long = format!("{}.-{}", "a".repeat(61), "b".repeat(7));
        assert_eq!(hd(&long, serde_json::json!({})).unwrap().0, "a".repeat(61));
        assert_eq!(
            hd("web", serde_json::json!({ "hostname": "Bad_Name" })),
            Err(HostnameError::InvalidHostname("Bad_Name".into()))
        );
        assert_eq!(
            hd("web", serde_json::json!({ "subdomain": "a.b" })),
            Err(HostnameError::InvalidSubdomain("a.b".into()))
        );
        assert_eq!(
            hd(
                "web",
                serde_json::json!({ "hostnameOverride": "my.host", "subdomain": "s" })
            ),
            Ok(("my.host".into(), String::new())),
            "an override has no domain"
        );
    }

    #[test]
    fn set_hostname_as_fqdn_needs_a_domain_and_at_most_64_characters() {
        assert_eq!(kernel_hostname("db", "", true), Ok("db".into()));
        assert_eq!(
            kernel_hostname("db", "s.ns.svc.cluster.local", false),
            Ok("db".into())
        );
        assert_eq!(
            kernel_hostname("db", "s.ns.svc.cluster.local", true),
            Ok("db.s.ns.svc.cluster.local".into())
        );
        // 41 + 1 + 22 = 64 fits; one more does not.
        let fits = "h".repeat(41);
        assert!(kernel_hostname(&fits, "s.ns.svc.cluster.local", true).is_ok());
        let host = "h".repeat(42);
        let err = kernel_hostname(&host, "s.ns.svc.cluster.local", true).unwrap_err();
        let fqdn = format!("{host}.s.ns.svc.cluster.local");
        assert_eq!(
            err.to_string(),
            format!(
                "failed to construct FQDN from pod hostname and cluster domain, FQDN {fqdn} is \
                 too long (64 characters is the max, {} characters requested)",
                fqdn.len()
            )
        );
    }

    #[test]
    fn a_privileged_container_makes_a_privileged_sandbox() {
        let config = Config::load(&Flags::default()).unwrap();
        let privileged = |extra: serde_json::Value| {
            let p = spec_pod("web", extra);
            sandbox_config_with(&p, &config, 0, cri::DnsConfig::default())
                .unwrap()
                .linux
                .unwrap()
                .security_context
                .unwrap()
                .privileged
        };
        assert!(!privileged(serde_json::json!({})));
        assert!(privileged(serde_json::json!({ "initContainers": [{
            "name": "init", "image": "busybox", "securityContext": { "privileged": true }
        }] })));
        assert!(!privileged(serde_json::json!({ "initContainers": [{
            "name": "init", "image": "busybox", "securityContext": { "privileged": false }
        }] })));
    }

    #[test]
    fn sandbox_config_carries_hostname_fqdn_sysctls_and_dns() {
        let mut config = Config::load(&Flags::default()).unwrap();
        config.cluster_domain = "cluster.local".into();
        config.cluster_dns = vec!["10.96.0.10".parse().unwrap()];
        let p = spec_pod(
            "web",
            serde_json::json!({
                "hostname": "db", "subdomain": "nginx", "setHostnameAsFQDN": true,
                "securityContext": { "sysctls": [
                    { "name": "net/ipv4/ip_local_port_range", "value": "1024 65000" }
                ]}
            }),
        );
        let cfg = sandbox_config_with(&p, &config, 0, cri::DnsConfig::default()).unwrap();
        assert_eq!(cfg.hostname, "db.nginx.prod.svc.cluster.local");
        let linux = cfg.linux.unwrap();
        assert_eq!(
            linux.sysctls,
            HashMap::from([(
                "net.ipv4.ip_local_port_range".to_string(),
                "1024 65000".to_string()
            )])
        );
        assert_eq!(cfg.dns_config.unwrap().servers, ["10.96.0.10"]);
        let host_net = spec_pod(
            "web",
            serde_json::json!({ "hostNetwork": true, "hostname": "db", "subdomain": "x",
                                "setHostnameAsFQDN": true }),
        );
        let cfg = sandbox_config_with(&host_net, &config, 0, cri::DnsConfig::default()).unwrap();
        assert_eq!(
            cfg.hostname, "",
            "host-network pods keep the node's hostname"
        );
        let too_long = spec_pod(
            "web",
            serde_json::json!({ "hostname": "h".repeat(40), "subdomain": "nginx",
                                "setHostnameAsFQDN": true }),
        );
        let err =
            sandbox_config_with(&too_long, &config, 0, cri::DnsConfig::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("is too long (64 characters is the max"),
            "{err}"
        );
    }

    #[test]
    fn var_expansion_follows_kubernetes_rules() {
        let vars = HashMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "x-$(B)-$(A)-$");
        assert_eq!(expand("$(A", &vars), "$(A");
    }

    #[test]
    fn env_resolves_field_refs_and_refuses_what_it_cannot_fetch() {
        let field = |p: &str| {
            Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: p.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        let c = Container {
            name: "c".into(),
            env: Some(vec![
                EnvVar {
                    name: "POD".into(),
                    value_from: field("metadata.name"),
                    ..Default::default()
                },
                EnvVar {
                    name: "IP".into(),
                    value_from: field("status.podIP"),
                    ..Default::default()
                },
                EnvVar {
                    name: "GREETING".into(),
                    value: Some("hi $(POD)".into()),
                    ..Default::default()
                },
                EnvVar {
                    name: "ANNOTATION".into(),
                    value_from: field("metadata.annotations['mysubpath']"),
                    ..Default::default()
                },
                EnvVar {
                    name: "ABSENT".into(),
                    value_from: field("metadata.labels['none']"),
                    ..Default::default()
                },
                EnvVar {
                    name: "ANNOTATIONS".into(),
                    value_from: field("metadata.annotations"),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let mut annotated = pod(vec![]);
        annotated.metadata.annotations = Some(
            [
                ("mysubpath".to_string(), "mypath".to_string()),
                ("other".to_string(), "x".to_string()),
            ]
            .into(),
        );
        let env = env(
            &annotated,
            &c,
            "10.88.0.5",
            "10.213.0.10",
            &EnvSources::default(),
        )
        .unwrap();
        assert_eq!(
            env,
            [
                ("POD".into(), "web".into()),
                ("IP".into(), "10.88.0.5".into()),
                ("GREETING".into(), "hi web".into()),
                ("ANNOTATION".into(), "mypath".into()),
                ("ABSENT".into(), String::new()),
                (
                    "ANNOTATIONS".into(),
                    "mysubpath=\"mypath\"\nother=\"x\"".into()
                ),
            ]
        );
        let bad = Container {
            name: "c".into(),
            env: Some(vec![EnvVar {
                name: "S".into(),
                value_from: Some(EnvVarSource::default()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(super::env(&pod(vec![]), &bad, "", "", &EnvSources::default()).is_err());
    }

    #[test]
    fn env_from_configmaps_and_secrets_with_prefix_optional_and_override() {
        use k8s_openapi::api::core::v1::{
            ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, SecretKeySelector,
        };
        let mut sources = EnvSources::default();
        sources.config_maps.insert(
            "cfg".into(),
            Some(
                [
                    ("A".to_string(), "1".to_string()),
                    ("B".to_string(), "2".to_string()),
                ]
                .into(),
            ),
        );
        sources.secrets.insert(
            "sec".into(),
            Some([("pw".to_string(), "s3cr3t".to_string())].into()),
        );
        sources.config_maps.insert("gone".into(), None);
        let c = Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cfg".into(),
                    optional: None,
                }),
                prefix: Some("P_".into()),
                ..Default::default()
            }]),
            env: Some(vec![
                EnvVar {
                    name: "PASSWORD".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "sec".into(),
                            key: "pw".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "P_A".into(),
                    value: Some("override $(P_B)".into()),
                    ..Default::default()
                },
                EnvVar {
                    name: "MAYBE".into(),
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "gone".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        assert_eq!(
            EnvSources::wanted(&c),
            (
                vec!["cfg".to_string(), "gone".to_string()],
                vec!["sec".to_string()]
            )
        );
        let e: HashMap<String, String> = env(&pod(vec![]), &c, "", "", &sources)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(e["P_B"], "2");
        assert_eq!(e["PASSWORD"], "s3cr3t");
        assert_eq!(
            e["P_A"], "override 2",
            "env overrides envFrom and expands earlier names"
        );
        assert!(!e.contains_key("MAYBE"), "optional and missing: unset");
        let mut strict = c.clone();
        if let Some(v) = strict.env.as_mut() {
            v[2].value_from
                .as_mut()
                .unwrap()
                .config_map_key_ref
                .as_mut()
                .unwrap()
                .optional = Some(false);
        }
        let err = env(&pod(vec![]), &strict, "", "", &sources).unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }

    #[test]
    fn security_context_merges_container_over_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "spec": {
                "securityContext": {
                    "runAsUser": 1000, "runAsGroup": 2000, "supplementalGroups": [4000],
                    "fsGroup": 5000, "seccompProfile": { "type": "RuntimeDefault" }
                },
                "containers": [{
                    "name": "c",
                    "securityContext": {
                        "runAsUser": 1001, "readOnlyRootFilesystem": true,
                        "allowPrivilegeEscalation": false,
                        "capabilities": { "add": ["NET_ADMIN"], "drop": ["ALL"] }
                    }
                }]
            }
        }))
        .unwrap();
        let c = pod.spec.as_ref().unwrap().containers[0].clone();
        let root = std::path::Path::new("/var/lib/kubelet/seccomp");
        let sc = linux_security_context(&pod, &c, &ImageUser::Name("www-data".into()), root);
        assert_eq!(sc.run_as_user.map(|v| v.value), Some(1001));
        assert_eq!(sc.run_as_username, "");
        assert_eq!(sc.run_as_group.map(|v| v.value), Some(2000));
        assert_eq!(sc.supplemental_groups, vec![4000, 5000]);
        assert!(sc.readonly_rootfs && sc.no_new_privs && !sc.privileged);
        let caps = sc.capabilities.unwrap();
        assert_eq!(
            (caps.add_capabilities, caps.drop_capabilities),
            (vec!["NET_ADMIN".to_string()], vec!["ALL".to_string()])
        );
        assert_eq!(
            sc.seccomp.unwrap().profile_type,
            cri::security_profile::ProfileType::RuntimeDefault as i32
        );
        // Nothing set: the image's user (root for an image without one), no_new_privs off,
        // Unconfined.
        let bare: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" }, "spec": { "containers": [{ "name": "c" }] }
        }))
        .unwrap();
        let bare_c = &bare.spec.as_ref().unwrap().containers[0];
        let sc = linux_security_context(&bare, bare_c, &ImageUser::default(), root);
        assert_eq!(
            (sc.run_as_user, sc.no_new_privs, sc.readonly_rootfs),
            (Some(cri::Int64Value { value: 0 }), false, false)
        );
        assert_eq!(
            sc.seccomp.unwrap().profile_type,
            cri::security_profile::ProfileType::Unconfined as i32
        );
    }

    #[test]
    fn run_as_group_alone_runs_as_the_image_user() {
        // A group without a user is invalid in the CRI: the user comes from the image, as
        // upstream's kubelet fills it (ImageStatus `uid`, else `username`, else root).
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "spec": {
                "securityContext": { "runAsGroup": 1234 },
                "containers": [{ "name": "c" }]
            }
        }))
        .unwrap();
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let root = std::path::Path::new("/var/lib/kubelet/seccomp");
        let image = |uid: Option<i64>, username: &str| cri::Image {
            uid: uid.map(|value| cri::Int64Value { value }),
            username: username.into(),
            ..Default::default()
        };
        let cases = [
            Some(image(Some(1002), "")),
            Some(image(None, "www-data")),
            Some(image(None, "")),
            None,
        ];
        let got: Vec<(Option<i64>, String, Option<i64>)> = cases
            .iter()
            .map(|img| {
                let user = ImageUser::of_image(img.as_ref());
                let sc = linux_security_context(&pod, c, &user, root);
                (
                    sc.run_as_user.map(|v| v.value),
                    sc.run_as_username,
                    sc.run_as_group.map(|v| v.value),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some(1002), String::new(), Some(1234)),
                (None, "www-data".to_string(), Some(1234)),
                (Some(0), String::new(), Some(1234)),
                (Some(0), String::new(), Some(1234)),
            ]
        );
        // The container's own runAsUser wins over the image's user.
        let mut own = c.clone();
        own.security_context = Some(k8s_openapi::api::core::v1::SecurityContext {
            run_as_user: Some(7),
            ..Default::default()
        });
        let sc = linux_security_context(&pod, &own, &ImageUser::Name("www-data".into()), root);
        assert_eq!(
            (sc.run_as_user.map(|v| v.value), sc.run_as_username.as_str()),
            (Some(7), "")
        );
    }

    #[test]
    fn service_links_follow_upstream_names() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "my-db" },
            "spec": { "clusterIP": "10.96.0.20", "ports": [
                { "name": "sql", "port": 5432, "protocol": "TCP" },
                { "port": 53, "protocol": "UDP" }
            ]}
        }))
        .unwrap();
        let headless: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "headless" },
                "spec": { "clusterIP": "None", "ports": [{ "port": 80 }] }
            }))
            .unwrap();
        let env: BTreeMap<String, String> = service_env(&[svc, headless]).into_iter().collect();
        let want: BTreeMap<String, String> = [
            ("MY_DB_SERVICE_HOST", "10.96.0.20"),
            ("MY_DB_SERVICE_PORT", "5432"),
            ("MY_DB_SERVICE_PORT_SQL", "5432"),
            ("MY_DB_PORT", "tcp://10.96.0.20:5432"),
            ("MY_DB_PORT_5432_TCP", "tcp://10.96.0.20:5432"),
            ("MY_DB_PORT_5432_TCP_PROTO", "tcp"),
            ("MY_DB_PORT_5432_TCP_PORT", "5432"),
            ("MY_DB_PORT_5432_TCP_ADDR", "10.96.0.20"),
            ("MY_DB_PORT_53_UDP", "udp://10.96.0.20:53"),
            ("MY_DB_PORT_53_UDP_PROTO", "udp"),
            ("MY_DB_PORT_53_UDP_PORT", "53"),
            ("MY_DB_PORT_53_UDP_ADDR", "10.96.0.20"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(env, want);
    }

    #[test]
    fn container_config_carries_identity_labels_and_log_path() {
        let c = Container {
            name: "app".into(),
            image: Some("busybox".into()),
            args: Some(vec!["$(X)".into()]),
            ..Default::default()
        };
        let cfg = container_config(
            &pod(vec![c.clone()]),
            &c,
            2,
            "sha256:abc",
            &ImageUser::default(),
            &[("X".into(), "1".into())],
            vec![],
            std::path::Path::new("/var/lib/kubelet/seccomp"),
        );
        assert_eq!(cfg.metadata.unwrap().attempt, 2);
        assert_eq!(cfg.log_path, "app/2.log");
        assert_eq!(cfg.args, ["1"]);
        assert_eq!(cfg.labels[labels::CONTAINER_NAME], "app");
        assert_eq!(cfg.labels[labels::POD_UID], "u-1");
        assert_eq!(cfg.image.unwrap().user_specified_image, "busybox");
    }

    #[test]
    fn containers_get_the_pods_namespaces_and_an_ephemeral_one_its_targets_processes() {
        use cri::NamespaceMode as M;
        let c = Container {
            name: "app".into(),
            ..Default::default()
        };
        let pid_of = |edit: &dyn Fn(&mut PodSpec), target: Option<&str>| {
            let mut p = pod(vec![c.clone()]);
            edit(p.spec.as_mut().unwrap());
            let mut cfg = container_config(
                &p,
                &c,
                0,
                "sha256:abc",
                &ImageUser::default(),
                &[],
                vec![],
                std::path::Path::new("/s"),
            );
            if let Some(t) = target {
                join_processes_of(&mut cfg, t);
            }
            let ns = cfg.linux.unwrap().security_context.unwrap();
            let ns = ns.namespace_options.unwrap();
            // The network and IPC namespaces are the pod's (its sandbox's) in every case.
            assert_eq!((ns.network, ns.ipc), (M::Pod as i32, M::Pod as i32));
            (M::try_from(ns.pid).unwrap(), ns.target_id)
        };
        assert_eq!(pid_of(&|_| {}, None), (M::Container, String::new()));
        assert_eq!(
            pid_of(&|s| s.share_process_namespace = Some(true), None),
            (M::Pod, String::new())
        );
        assert_eq!(
            pid_of(&|s| s.host_pid = Some(true), None),
            (M::Node, String::new())
        );
        assert_eq!(pid_of(&|_| {}, Some("c-1")), (M::Target, "c-1".into()));
        // An ephemeral container runs as the container it describes.
        let ec = k8s_openapi::api::core::v1::EphemeralContainer {
            name: "debugger".into(),
            image: Some("busybox".into()),
            tty: Some(true),
            target_container_name: Some("app".into()),
            ..Default::default()
        };
        let mut p = pod(vec![c.clone()]);
        p.spec.as_mut().unwrap().ephemeral_containers = Some(vec![ec]);
        let found = find_container(&p, "debugger").unwrap();
        assert_eq!(
            (found.image.as_deref(), found.tty),
            (Some("busybox"), Some(true))
        );
        assert_eq!(target_container(&p, "debugger"), Some("app"));
        assert_eq!(target_container(&p, "app"), None);
        assert!(matches!(find_container(&p, "app"), Some(Cow::Borrowed(_))));
    }
}
