//! The validated model of what the proxy serves: Services, EndpointSlices and the own Node,
//! turned into one entry per service port with its endpoints.
//!
//! [`build`] never fails as a whole: an object that cannot be understood (a bad IP, port or
//! protocol) is left out and described by a [`Warning`], so that one broken Service never
//! blocks the others. Endpoint selection ([`ServicePort::select`]) follows upstream
//! kube-proxy: ready endpoints, else serving-and-terminating ones, restricted to this node for
//! `Local` traffic policies.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::Config;

/// Label that hands a Service to another proxy; such Services are not ours.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking headless Services and their EndpointSlices.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Label on an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Legacy annotation for load-balancer source ranges, honoured when the spec field is empty.
pub const LB_SOURCE_RANGES_ANNOTATION: &str =
    "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Default sessionAffinity ClientIP timeout (upstream: 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

/// A transport protocol a Service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parses the API's spelling; a missing protocol means TCP.
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }

    /// The lower-case name nftables uses.
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// An IP family; the data plane keeps one table per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// Whether `ip` belongs to this family.
    pub fn contains(self, ip: IpAddr) -> bool {
        ip.is_ipv4() == (self == IpFamily::V4)
    }
}

/// Identifies one port of one Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Name of the port (empty for a Service's only, unnamed port).
    pub port_name: String,
    /// Protocol of the port.
    pub protocol: Protocol,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol.nft_name())
    }
}

/// One endpoint of a service port, merged from the Service's EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's address.
    pub ip: IpAddr,
    /// The endpoint's port for this service port.
    pub port: u16,
    /// `conditions.ready` (absent means ready).
    pub ready: bool,
    /// `conditions.serving` (absent means the same as ready).
    pub serving: bool,
    /// `conditions.terminating` (absent means not terminating).
    pub terminating: bool,
    /// The node the endpoint runs on, if known (shared by every endpoint naming it).
    pub node_name: Option<Arc<str>>,
    /// The endpoint's zone, if known (shared likewise).
    pub zone: Option<Arc<str>>,
}

impl Endpoint {
    fn is_local(&self, node_name: &str) -> bool {
        self.node_name.as_deref() == Some(node_name)
    }

    fn is_serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// One port of one Service, with everything the data plane needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Which Service and port this is.
    pub id: ServicePortName,
    /// The Service port number.
    pub port: u16,
    /// ClusterIPs (one per family).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (those not in `ipMode: Proxy`).
    pub load_balancer_ips: Vec<IpAddr>,
    /// The NodePort, if any.
    pub node_port: Option<u16>,
    /// sessionAffinity ClientIP timeout in seconds, if affinity is on.
    pub affinity_timeout_secs: Option<u32>,
    /// `externalTrafficPolicy: Local` (only meaningful when externally accessible).
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    /// `spec.loadBalancerSourceRanges` (or the legacy annotation).
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `spec.healthCheckNodePort` for `externalTrafficPolicy: Local` LoadBalancers.
    pub health_check_node_port: Option<u16>,
    /// Endpoints from all slices of the Service, deduplicated, sorted by address and port.
    pub endpoints: Vec<Endpoint>,
}

/// The endpoints a service port's traffic may go to on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection<'a> {
    /// Endpoints for `Cluster` traffic policies.
    pub cluster: Vec<&'a Endpoint>,
    /// Endpoints on this node, for `Local` traffic policies.
    pub local: Vec<&'a Endpoint>,
    /// Whether any usable endpoint exists anywhere (decides reject versus drop).
    pub has_any: bool,
}

impl ServicePort {
    /// Whether the port is reachable from outside the cluster (NodePort, external or LB IPs).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Whether some traffic policy of this port uses cluster-wide endpoints.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || (self.externally_accessible() && !self.external_policy_local)
    }

    /// Whether some traffic policy of this port uses only this node's endpoints.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.externally_accessible() && self.external_policy_local)
    }

    /// Whether `externalTrafficPolicy: Local` applies.
    pub fn external_local(&self) -> bool {
        self.external_policy_local && self.externally_accessible()
    }

    /// Selects endpoints of `family` as upstream kube-proxy does: ready ones; when none are
    /// ready, serving-and-terminating ones; `Local` policies take only endpoints on `node_name`.
    pub fn select(&self, family: IpFamily, node_name: &str) -> Selection<'_> {
        let mut sel = Selection::default();
        let endpoints = || self.endpoints.iter().filter(move |e| family.contains(e.ip));
        if self.uses_cluster_endpoints() {
            sel.cluster = endpoints().filter(|e| e.ready).collect();
            if sel.cluster.is_empty() {
                sel.cluster = endpoints().filter(|e| e.is_serving_terminating()).collect();
            }
            sel.has_any = !sel.cluster.is_empty();
        }
        if !self.uses_local_endpoints() {
            return sel;
        }
        let usable = |e: &&Endpoint| e.ready || e.is_serving_terminating();
        sel.has_any |= endpoints().any(|e| usable(&e));
        let local_ready: Vec<&Endpoint> = endpoints()
            .filter(|e| e.ready && e.is_local(node_name))
            .collect();
        sel.local = if local_ready.is_empty() {
            endpoints()
                .filter(|e| e.is_serving_terminating() && e.is_local(node_name))
                .collect()
        } else {
            local_ready
        };
        sel
    }
}

/// What the proxy knows about its own Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name (endpoints with this `nodeName` are local).
    pub name: String,
    /// The node's addresses from `status.addresses`.
    pub ips: Vec<IpAddr>,
    /// The node's zone label, if any.
    pub zone: Option<String>,
}

impl NodeInfo {
    /// Reads name, addresses and zone from a Node object.
    pub fn from_node(node: &Node) -> Self {
        let ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|addrs| {
                addrs
                    .iter()
                    .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .cloned();
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            ips,
            zone,
        }
    }
}

/// The whole model: every service port this proxy serves, keyed and ordered by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Service ports by name.
    pub services: BTreeMap<ServicePortName, ServicePort>,
    /// The own node.
    pub node: NodeInfo,
}

/// An object left out of the model, and why; meant to become a log line and an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
    /// A short machine-readable reason, e.g. `InvalidClusterIP`.
    pub reason: &'static str,
    /// What exactly was wrong.
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}/{} skipped ({}): {}",
            self.kind, self.namespace, self.name, self.reason, self.message
        )
    }
}

/// Builds the model from the API objects (the own Node once it has been seen). Objects that cannot be used are skipped and
/// reported in the returned warnings; the rest is always built.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: Option<&Node>,
    config: &Config,
) -> (Model, Vec<Warning>) {
    let mut interner = Interner::default();
    let slices: Vec<SliceObject> = slices
        .into_iter()
        .map(|s| SliceObject::new(s, &mut interner))
        .collect();
    let services: Vec<ServiceObject> = services.into_iter().map(ServiceObject::new).collect();
    build_from_objects(&services, &slices, node, config)
}

/// [`build`] from the objects as the proxy keeps them.
pub fn build_from_objects<'a>(
    services: impl IntoIterator<Item = &'a ServiceObject>,
    slices: impl IntoIterator<Item = &'a SliceObject>,
    node: Option<&Node>,
    config: &Config,
) -> (Model, Vec<Warning>) {
    let mut warnings = Vec::new();
    let mut model = Model {
        services: BTreeMap::new(),
        node: node_info(node, config),
    };
    let by_service = group_slices(slices);
    for svc in services {
        let slices = by_service
            .get(&svc.key())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (ports, mut w) = service_model(svc, slices);
        warnings.append(&mut w);
        for port in ports {
            model.services.insert(port.id.clone(), port);
        }
    }
    (model, warnings)
}

/// What the proxy knows of its node: the Node's addresses and zone, under the configured name
/// (`--hostname-override` wins, as upstream).
pub fn node_info(node: Option<&Node>, config: &Config) -> NodeInfo {
    let mut info = node.map(NodeInfo::from_node).unwrap_or_default();
    info.name = config.node_name.clone();
    info
}

/// `(namespace, name)` of an object.
pub fn object_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The Service an EndpointSlice belongs to, `(namespace, service name)`, unless it is none of
/// ours (another proxy's, headless, or without a Service).
fn slice_service(slice: &EndpointSlice) -> Option<String> {
    let labels = slice.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k));
    if label(SERVICE_PROXY_NAME_LABEL).is_some() || label(HEADLESS_LABEL).is_some() {
        return None;
    }
    label(SERVICE_NAME_LABEL).cloned()
}

/// The EndpointSlices that are ours, by `(namespace, service name)`, each list in slice-name
/// order (so that merging them is deterministic).
fn group_slices<'a>(
    slices: impl IntoIterator<Item = &'a SliceObject>,
) -> std::collections::HashMap<(String, String), Vec<&'a SliceObject>> {
    let mut by_service: std::collections::HashMap<(String, String), Vec<&'a SliceObject>> =
        std::collections::HashMap::new();
    for slice in slices {
        if let Some(key) = slice.service_key() {
            by_service.entry(key).or_default().push(slice);
        }
    }
    for list in by_service.values_mut() {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }
    by_service
}

/// The service ports of one Service with their endpoints merged from its `slices` (in
/// slice-name order), and what had to be left out.
pub fn service_model<S>(svc: &ServiceObject, slices: &[S]) -> (Vec<ServicePort>, Vec<Warning>)
where
    S: std::ops::Deref<Target = SliceObject>,
{
    let mut warnings = Vec::new();
    let ports = match &svc.ports {
        Ok(Some(ports)) => ports,
        Ok(None) => return (Vec::new(), warnings),
        Err(w) => return (Vec::new(), vec![w.clone()]),
    };
    // By service port (name, protocol), then by address and port.
    type ByAddress = BTreeMap<(IpAddr, u16), Endpoint>;
    let mut endpoints: BTreeMap<(&str, Protocol), ByAddress> = BTreeMap::new();
    for slice in slices {
        let found = match &slice.endpoints {
            Ok(found) => found,
            Err(w) => {
                warnings.push(w.clone());
                continue;
            }
        };
        for (port_name, protocol, port) in &found.ports {
            let entry = endpoints.entry((port_name, *protocol)).or_default();
            for ep in &found.endpoints {
                let ep = ep.at(*port);
                match entry.get(&(ep.ip, ep.port)) {
                    // The same endpoint in two slices (e.g. while it moves): keep the ready
                    // copy.
                    Some(existing) if existing.ready || !ep.ready => {}
                    _ => {
                        entry.insert((ep.ip, ep.port), ep);
                    }
                }
            }
        }
    }
    let ports = ports
        .iter()
        .map(|declared| {
            let mut port = declared.clone();
            let key = (declared.id.port_name.as_str(), declared.id.protocol);
            if let Some(eps) = endpoints.remove(&key) {
                port.endpoints = eps.into_values().collect();
            }
            port
        })
        .collect();
    (ports, warnings)
}

/// What the proxy keeps of a Service: its service ports as the model holds them (without
/// endpoints), or why it is left out. Made once per watch event; the API object is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceObject {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service's UID (for Events about it).
    pub uid: Option<String>,
    /// Its ports; `Ok(None)` when the Service is not ours to proxy.
    pub ports: Result<Option<Vec<ServicePort>>, Warning>,
}

impl ServiceObject {
    /// Derives what the proxy keeps of `svc`.
    pub fn new(svc: &Service) -> Self {
        let (namespace, name) = object_key(&svc.metadata);
        let ports = service_ports(svc, &namespace, &name);
        ServiceObject {
            uid: svc.metadata.uid.clone(),
            ports,
            namespace,
            name,
        }
    }

    /// `(namespace, name)`.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// What the proxy keeps of an EndpointSlice: its Service, its ports and, once for all of
/// them, its endpoints; or why it is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceObject {
    /// The slice's namespace.
    pub namespace: String,
    /// The slice's name.
    pub name: String,
    /// The slice's UID (for Events about it).
    pub uid: Option<String>,
    /// The name of its Service, when the slice is ours.
    pub service: Option<String>,
    /// Its ports and endpoints.
    pub endpoints: Result<SliceEndpoints, Warning>,
}

impl SliceObject {
    /// Derives what the proxy keeps of `slice`; node and zone names are shared through
    /// `interner`.
    pub fn new(slice: &EndpointSlice, interner: &mut Interner) -> Self {
        let (namespace, name) = object_key(&slice.metadata);
        SliceObject {
            uid: slice.metadata.uid.clone(),
            service: slice_service(slice),
            endpoints: slice_endpoints(slice, &namespace, &name, interner),
            namespace,
            name,
        }
    }

    /// `(namespace, service name)` of its Service, when the slice is ours.
    pub fn service_key(&self) -> Option<(String, String)> {
        Some((self.namespace.clone(), self.service.clone()?))
    }
}

/// The ports of an EndpointSlice and its endpoints, each of which serves every port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceEndpoints {
    /// `(port name, protocol, number)` of each port.
    pub ports: Vec<(String, Protocol, u16)>,
    /// The endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of an EndpointSlice, for all its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its first address (upstream uses no other).
    pub ip: IpAddr,
    /// `conditions.ready` (absent means ready).
    pub ready: bool,
    /// `conditions.serving` (absent means the same as ready).
    pub serving: bool,
    /// `conditions.terminating` (absent means not terminating).
    pub terminating: bool,
    /// Its node, if known.
    pub node_name: Option<Arc<str>>,
    /// Its zone, if known.
    pub zone: Option<Arc<str>>,
}

impl SliceEndpoint {
    /// This endpoint at one of its slice's ports.
    fn at(&self, port: u16) -> Endpoint {
        Endpoint {
            ip: self.ip,
            port,
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
            node_name: self.node_name.clone(),
            zone: self.zone.clone(),
        }
    }
}

/// Shares node and zone names between endpoints: a cluster has few nodes and many endpoints.
/// Names nothing holds any more are dropped once the set has grown, so that a stream of
/// made-up names cannot grow it for ever.
#[derive(Debug, Default)]
pub struct Interner {
    names: std::collections::HashSet<Arc<str>>,
    /// Size at which the next prune happens.
    prune_at: usize,
}

impl Interner {
    /// The shared copy of `name`.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        if self.names.len() >= self.prune_at.max(1024) {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.prune_at = self.names.len() * 2;
        }
        let shared: Arc<str> = Arc::from(name);
        self.names.insert(shared.clone());
        shared
    }

    /// How many names are held.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

fn warn(
    kind: &'static str,
    ns: &str,
    name: &str,
    reason: &'static str,
    message: String,
) -> Warning {
    Warning {
        kind,
        namespace: ns.to_string(),
        name: name.to_string(),
        reason,
        message,
    }
}

/// Lower-case letters, digits and inner dashes, at most `max` characters.
fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_port(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// The ports of a Service, `Ok(None)` when the Service is not ours to proxy.
fn service_ports(svc: &Service, ns: &str, name: &str) -> Result<Option<Vec<ServicePort>>, Warning> {
    let w = |reason, message| warn("Service", ns, name, reason, message);
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    // Names become parts of nftables identifiers: accept only what the API server's own
    // validation allows, so that nothing else can ever reach an nft script.
    if !is_dns_label(ns, 63) || !is_dns_label(name, 63) {
        return Err(w(
            "InvalidName",
            "namespace or name is not a DNS label".to_string(),
        ));
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut raw_cluster_ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if raw_cluster_ips.is_empty() {
        raw_cluster_ips.extend(spec.cluster_ip.as_deref());
    }
    if raw_cluster_ips.is_empty()
        || raw_cluster_ips
            .iter()
            .any(|ip| *ip == "None" || ip.is_empty())
    {
        // Headless (or not yet allocated): nothing to proxy.
        return Ok(None);
    }
    let parse_ips = |list: &[String], what: &'static str| -> Result<Vec<IpAddr>, Warning> {
        list.iter()
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|_| w(what, format!("{s:?} is not an IP address")))
            })
            .collect()
    };
    let cluster_ips = parse_ips(
        &raw_cluster_ips
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        "InvalidClusterIP",
    )?;
    let external_ips = parse_ips(
        spec.external_ips.as_deref().unwrap_or_default(),
        "InvalidExternalIP",
    )?;
    let mut load_balancer_ips = Vec::new();
    for ingress in svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
    {
        // A load balancer in proxy mode delivers to the node itself, not to the VIP.
        if ingress.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(ip) = &ingress.ip {
            let parsed = ip.parse::<IpAddr>().map_err(|_| {
                w(
                    "InvalidLoadBalancerIP",
                    format!("{ip:?} is not an IP address"),
                )
            })?;
            load_balancer_ips.push(parsed);
        }
    }
    let mut ranges: Vec<String> = spec.load_balancer_source_ranges.clone().unwrap_or_default();
    if ranges.is_empty()
        && let Some(annotation) = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LB_SOURCE_RANGES_ANNOTATION))
    {
        ranges = annotation
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    let load_balancer_source_ranges = ranges
        .iter()
        .map(|r| {
            r.trim()
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| w("InvalidSourceRange", format!("{r:?} is not a CIDR")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let affinity_timeout_secs = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match t {
            None => Some(DEFAULT_AFFINITY_TIMEOUT_SECS),
            Some(t) if (1..=86_400).contains(&t) => Some(t as u32),
            Some(t) => {
                return Err(w(
                    "InvalidSessionAffinity",
                    format!("timeoutSeconds {t} is outside 1..=86400"),
                ));
            }
        }
    } else {
        None
    };
    let health_check_node_port = match spec.health_check_node_port {
        None => None,
        Some(p) => Some(parse_port(p).ok_or_else(|| {
            w(
                "InvalidPort",
                format!("healthCheckNodePort {p} is not a port"),
            )
        })?),
    };
    let mut out = Vec::with_capacity(spec.ports.as_ref().map_or(0, Vec::len));
    for sp in spec.ports.iter().flatten() {
        let protocol = Protocol::parse(sp.protocol.as_deref()).ok_or_else(|| {
            w(
                "InvalidProtocol",
                format!(
                    "protocol {:?} is not TCP, UDP or SCTP",
                    sp.protocol.as_deref().unwrap_or_default()
                ),
            )
        })?;
        if let Some(port_name) = &sp.name
            && !port_name.is_empty()
            && !is_dns_label(port_name, 15)
        {
            return Err(w(
                "InvalidPortName",
                format!("port name {port_name:?} is not valid"),
            ));
        }
        let port = parse_port(sp.port)
            .ok_or_else(|| w("InvalidPort", format!("port {} is not a port", sp.port)))?;
        let node_port = match sp.node_port {
            None => None,
            Some(p) => Some(
                parse_port(p)
                    .ok_or_else(|| w("InvalidPort", format!("nodePort {p} is not a port")))?,
            ),
        };
        out.push(ServicePort {
            id: ServicePortName {
                namespace: ns.to_string(),
                name: name.to_string(),
                port_name: sp.name.clone().unwrap_or_default(),
                protocol,
            },
            port,
            cluster_ips: cluster_ips.clone(),
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            node_port,
            affinity_timeout_secs,
            external_policy_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            health_check_node_port,
            endpoints: Vec::new(),
        });
    }
    Ok(Some(out))
}

/// The ports and endpoints of one slice, or a warning for the slice.
fn slice_endpoints(
    slice: &EndpointSlice,
    ns: &str,
    name: &str,
    interner: &mut Interner,
) -> Result<SliceEndpoints, Warning> {
    let w = |reason, message| warn("EndpointSlice", ns, name, reason, message);
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        // FQDN slices are not proxied by anyone.
        _ => return Ok(SliceEndpoints::default()),
    };
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let protocol = Protocol::parse(p.protocol.as_deref()).ok_or_else(|| {
            w(
                "InvalidProtocol",
                format!(
                    "protocol {:?} is not TCP, UDP or SCTP",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            )
        })?;
        // A port without a number means "all ports", which a proxy cannot use.
        let Some(number) = p.port else { continue };
        let number = parse_port(number)
            .ok_or_else(|| w("InvalidPort", format!("port {number} is not a port")))?;
        ports.push((p.name.clone().unwrap_or_default(), protocol, number));
    }
    let mut endpoints = Vec::new();
    if !ports.is_empty() {
        for ep in slice.endpoints.iter().flatten() {
            // Upstream uses the first address only; the others are reserved for future use.
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let ip: IpAddr = addr.parse().map_err(|_| {
                w(
                    "InvalidEndpointAddress",
                    format!("{addr:?} is not an IP address"),
                )
            })?;
            if ip.is_ipv4() != want_v4 {
                return Err(w(
                    "InvalidEndpointAddress",
                    format!("{addr} does not match addressType {}", slice.address_type),
                ));
            }
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            endpoints.push(SliceEndpoint {
                ip,
                ready,
                serving: cond.and_then(|c| c.serving).unwrap_or(ready),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                node_name: ep.node_name.as_deref().map(|n| interner.intern(n)),
                zone: ep.zone.as_deref().map(|z| interner.intern(z)),
            });
        }
    }
    endpoints.shrink_to_fit();
    Ok(SliceEndpoints { ports, endpoints })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testutil::{NODE, config, ep, model_of, service, simple, slice, with_status};

    fn id(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port_name: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn merges_slices_and_dedupes_endpoints() {
        let (svc, s1) = simple(
            "default",
            "web",
            "10.96.0.10",
            &["10.244.1.2", "10.244.1.1"],
        );
        let mut s2 = slice(
            "default",
            "web",
            "web-2",
            "IPv4",
            json!([{ "name": "http", "port": 8080 }]),
            json!([
                ep("10.244.1.1", "node-b", false),
                ep("10.244.1.3", NODE, true)
            ]),
        );
        s2.metadata.labels.get_or_insert_default();
        let model = model_of(&[svc], &[s2, s1]);
        let port = &model.services[&id("default", "web", "http")];
        assert_eq!(port.port, 80);
        assert_eq!(
            port.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        let got: Vec<(String, u16, bool)> = port
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.port, e.ready))
            .collect();
        // 10.244.1.1 is in both slices; the ready copy wins.
        assert_eq!(
            got,
            vec![
                ("10.244.1.1".into(), 8080, true),
                ("10.244.1.2".into(), 8080, true),
                ("10.244.1.3".into(), 8080, true),
            ]
        );
        assert_eq!(model.node.name, NODE);
    }

    #[test]
    fn skips_services_that_are_not_ours() {
        let (mut other, _) = simple("default", "other", "10.96.0.11", &[]);
        other.metadata.labels =
            Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "x".to_string())].into());
        let headless = service(
            "default",
            "headless",
            json!({ "clusterIP": "None", "ports": [{ "port": 80 }] }),
        );
        let external = service(
            "default",
            "ext",
            json!({ "type": "ExternalName", "externalName": "example.com" }),
        );
        let (kept, _) = simple("default", "kept", "10.96.0.12", &[]);
        let mut headless_slice = slice(
            "default",
            "kept",
            "kept-h",
            "IPv4",
            json!([{ "name": "http", "port": 1 }]),
            json!([ep("10.244.9.9", NODE, true)]),
        );
        headless_slice
            .metadata
            .labels
            .get_or_insert_default()
            .insert(HEADLESS_LABEL.into(), String::new());
        let model = model_of(&[other, headless, external, kept], &[headless_slice]);
        let names: Vec<&str> = model.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, vec!["kept"]);
        assert!(model.services.values().all(|s| s.endpoints.is_empty()));
    }

    #[test]
    fn bad_objects_are_skipped_with_warnings_and_others_kept() {
        let bad_ip = service(
            "default",
            "bad-ip",
            json!({ "clusterIP": "10.96.0.300", "ports": [{ "port": 80 }] }),
        );
        let bad_proto = service(
            "default",
            "bad-proto",
            json!({ "clusterIP": "10.96.0.2", "ports": [{ "port": 80, "protocol": "ICMP" }] }),
        );
        let bad_port = service(
            "default",
            "bad-port",
            json!({ "clusterIP": "10.96.0.3", "ports": [{ "port": 70000 }] }),
        );
        let bad_name = service(
            "default",
            "Bad;Name",
            json!({ "clusterIP": "10.96.0.4", "ports": [{ "port": 80 }] }),
        );
        let bad_port_name = service(
            "default",
            "bad-port-name",
            json!({ "clusterIP": "10.96.0.5", "ports": [{ "name": "a b", "port": 80 }] }),
        );
        let (good, good_slice) = simple("default", "good", "10.96.0.10", &["10.244.1.1"]);
        let bad_slice = slice(
            "default",
            "good",
            "good-bad",
            "IPv4",
            json!([{ "name": "http", "port": 8080 }]),
            json!([ep("not-an-ip", NODE, true)]),
        );
        let (model, warnings) = build(
            &[bad_ip, bad_proto, bad_port, bad_name, bad_port_name, good],
            &[good_slice, bad_slice],
            None,
            &config(),
        );
        let mut reasons: Vec<(&str, &str, &str)> = warnings
            .iter()
            .map(|w| (w.kind, w.name.as_str(), w.reason))
            .collect();
        reasons.sort();
        assert_eq!(
            reasons,
            vec![
                ("EndpointSlice", "good-bad", "InvalidEndpointAddress"),
                ("Service", "Bad;Name", "InvalidName"),
                ("Service", "bad-ip", "InvalidClusterIP"),
                ("Service", "bad-port", "InvalidPort"),
                ("Service", "bad-port-name", "InvalidPortName"),
                ("Service", "bad-proto", "InvalidProtocol"),
            ]
        );
        assert_eq!(model.services.len(), 1);
        assert_eq!(
            model.services[&id("default", "good", "http")]
                .endpoints
                .len(),
            1
        );
    }

    #[test]
    fn reads_external_fields() {
        let svc = service(
            "default",
            "lb",
            json!({
                "type": "LoadBalancer",
                "clusterIPs": ["10.96.0.20", "fd00:96::20"],
                "externalIPs": ["192.0.2.7"],
                "externalTrafficPolicy": "Local",
                "healthCheckNodePort": 32000,
                "sessionAffinity": "ClientIP",
                "ports": [{ "port": 443, "nodePort": 30443, "protocol": "SCTP" }],
            }),
        );
        let mut svc = with_status(
            svc,
            json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.1" }, { "ip": "198.51.100.2", "ipMode": "Proxy" }, { "hostname": "lb.example" }] } }),
        );
        svc.metadata.annotations = Some(
            [(
                LB_SOURCE_RANGES_ANNOTATION.to_string(),
                "203.0.113.0/24, 10.0.0.1/8".to_string(),
            )]
            .into(),
        );
        let model = model_of(&[svc], &[]);
        let port = model.services.values().next().unwrap();
        assert_eq!(port.id.protocol, Protocol::Sctp);
        assert_eq!(port.cluster_ips.len(), 2);
        assert_eq!(
            port.external_ips,
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            port.load_balancer_ips,
            vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(port.node_port, Some(30443));
        assert_eq!(port.health_check_node_port, Some(32000));
        assert_eq!(
            port.affinity_timeout_secs,
            Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
        );
        assert!(port.external_local());
        let ranges: Vec<String> = port
            .load_balancer_source_ranges
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(ranges, vec!["203.0.113.0/24", "10.0.0.0/8"]);
    }

    fn port_with(endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort {
            id: id("default", "x", ""),
            port: 80,
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            external_ips: vec![],
            load_balancer_ips: vec![],
            node_port: None,
            affinity_timeout_secs: None,
            external_policy_local: false,
            internal_policy_local: false,
            load_balancer_source_ranges: vec![],
            health_check_node_port: None,
            endpoints,
        }
    }

    fn e(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 80,
            ready,
            serving,
            terminating,
            node_name: Some(node.into()),
            zone: None,
        }
    }

    fn ips(list: &[&Endpoint]) -> Vec<String> {
        list.iter().map(|e| e.ip.to_string()).collect()
    }

    #[test]
    fn selection_prefers_ready_then_serving_terminating() {
        let port = port_with(vec![
            e("10.0.0.1", NODE, true, true, false),
            e("10.0.0.2", "other", false, true, true),
            e("10.0.0.3", "other", false, false, true),
            e("fd00::1", "other", true, true, false),
        ]);
        let sel = port.select(IpFamily::V4, NODE);
        assert_eq!(ips(&sel.cluster), vec!["10.0.0.1"]);
        assert!(sel.local.is_empty() && sel.has_any);
        assert_eq!(
            ips(&port.select(IpFamily::V6, NODE).cluster),
            vec!["fd00::1"]
        );

        let fallback = port_with(vec![
            e("10.0.0.2", "other", false, true, true),
            e("10.0.0.3", "other", false, false, true),
        ]);
        assert_eq!(
            ips(&fallback.select(IpFamily::V4, NODE).cluster),
            vec!["10.0.0.2"]
        );

        let none = port_with(vec![e("10.0.0.3", "other", false, false, true)]);
        let sel = none.select(IpFamily::V4, NODE);
        assert!(sel.cluster.is_empty() && !sel.has_any);
    }

    #[test]
    fn local_policies_use_this_nodes_endpoints() {
        let mut port = port_with(vec![
            e("10.0.0.1", "other", true, true, false),
            e("10.0.0.2", NODE, false, true, true),
        ]);
        port.internal_policy_local = true;
        let sel = port.select(IpFamily::V4, NODE);
        // Only ITP=Local and not externally accessible: no cluster endpoints needed at all.
        assert!(sel.cluster.is_empty());
        assert_eq!(ips(&sel.local), vec!["10.0.0.2"]);
        assert!(sel.has_any);

        port.internal_policy_local = false;
        port.external_policy_local = true;
        port.node_port = Some(30000);
        let sel = port.select(IpFamily::V4, NODE);
        assert_eq!(ips(&sel.cluster), vec!["10.0.0.1"]);
        assert_eq!(ips(&sel.local), vec!["10.0.0.2"]);

        port.endpoints[1].node_name = Some("other".into());
        let sel = port.select(IpFamily::V4, NODE);
        assert!(sel.local.is_empty() && sel.has_any);
    }

    #[test]
    fn kept_objects_drop_what_the_model_does_not_read() {
        let (svc, mut sl) = simple("default", "web", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]);
        let eps = sl.endpoints.as_mut().unwrap();
        eps[0].addresses.push("10.244.1.99".into());
        eps[0].hostname = Some("web-0".into());
        let mut interner = Interner::default();
        let kept = SliceObject::new(&sl, &mut interner);
        let found = kept.endpoints.as_ref().unwrap();
        assert_eq!(found.ports, [("http".to_string(), Protocol::Tcp, 8080)]);
        // One entry per endpoint, not per endpoint and port; only the first address.
        let ips: Vec<String> = found.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.1.1", "10.244.1.2"]);
        // Both endpoints share one copy of their node's name.
        let (a, b) = (&found.endpoints[0].node_name, &found.endpoints[1].node_name);
        assert!(Arc::ptr_eq(a.as_ref().unwrap(), b.as_ref().unwrap()));
        assert_eq!(interner.len(), 1);
        let kept_svc = ServiceObject::new(&svc);
        assert_eq!(kept_svc.key(), ("default".to_string(), "web".to_string()));
        assert!(
            kept_svc.ports.as_ref().unwrap().as_ref().unwrap()[0]
                .endpoints
                .is_empty()
        );
        // The model from kept objects is the one from the API objects.
        let (from_objects, _) = build_from_objects([&kept_svc], [&kept], None, &config());
        assert_eq!(from_objects, model_of(&[svc], &[sl]));
    }

    #[test]
    fn the_interner_forgets_names_nothing_holds_once_it_has_grown() {
        let mut interner = Interner::default();
        let kept = interner.intern("node-kept");
        for i in 0..5000 {
            interner.intern(&format!("made-up-{i}"));
        }
        // Pruned as it grew: never more than twice what is held, plus the threshold.
        assert!(interner.len() <= 1024 + 1, "{}", interner.len());
        assert!(Arc::ptr_eq(&kept, &interner.intern("node-kept")));
    }
}
