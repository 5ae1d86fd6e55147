//! Builders for API objects in unit tests.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use crate::config::Config;
use crate::model::{self, Model};

pub const NODE: &str = "node-a";

pub fn config() -> Config {
    Config {
        node_name: NODE.to_string(),
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().expect("cidr"),
            "fd00:244::/64".parse().expect("cidr"),
        ],
        masquerade_all: false,
        nodeport_addresses: Default::default(),
    }
}

pub fn service(ns: &str, name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": { "namespace": ns, "name": name },
        "spec": spec,
    }))
    .expect("valid Service")
}

pub fn with_status(mut svc: Service, status: Value) -> Service {
    svc.status = Some(serde_json::from_value(status).expect("valid status"));
    svc
}

pub fn slice(
    ns: &str,
    svc: &str,
    name: &str,
    family: &str,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "namespace": ns,
            "name": name,
            "labels": { "kubernetes.io/service-name": svc },
        },
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("valid EndpointSlice")
}

/// An endpoint on `node` with the given readiness.
pub fn ep(ip: &str, node: &str, ready: bool) -> Value {
    json!({ "addresses": [ip], "nodeName": node, "conditions": { "ready": ready, "serving": ready, "terminating": false } })
}

/// A plain ClusterIP Service `ns/name` at `ip:80` (port `http`) with endpoints `ips` on port 8080.
pub fn simple(ns: &str, name: &str, ip: &str, ips: &[&str]) -> (Service, EndpointSlice) {
    let svc = service(
        ns,
        name,
        json!({ "clusterIP": ip, "clusterIPs": [ip], "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }] }),
    );
    let eps: Vec<Value> = ips.iter().map(|ip| ep(ip, "node-b", true)).collect();
    let slice = slice(
        ns,
        name,
        &format!("{name}-1"),
        "IPv4",
        json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]),
        json!(eps),
    );
    (svc, slice)
}

pub fn model_of(services: &[Service], slices: &[EndpointSlice]) -> Model {
    let (model, warnings) = model::build(services, slices, None, &config());
    assert!(warnings.is_empty(), "unexpected warnings: {warnings:?}");
    model
}

/// `default/lb`: a LoadBalancer with `externalTrafficPolicy: Local`, health-check node port
/// 30999, NodePort 30081, source ranges `203.0.113.0/24` and ingress `198.51.100.1`; its slice
/// has one endpoint on this node and one on `node-b`.
pub fn local_load_balancer() -> (Service, EndpointSlice) {
    let svc = with_status(
        service(
            "default",
            "lb",
            json!({ "type": "LoadBalancer", "clusterIP": "10.96.0.8", "externalTrafficPolicy": "Local",
                    "loadBalancerSourceRanges": ["203.0.113.0/24"], "healthCheckNodePort": 30999,
                    "ports": [{ "port": 80, "nodePort": 30081 }] }),
        ),
        json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.1" }] } }),
    );
    let sl = slice(
        "default",
        "lb",
        "lb-1",
        "IPv4",
        json!([{ "port": 80 }]),
        json!([
            ep("10.244.3.1", NODE, true),
            ep("10.244.3.2", "node-b", true)
        ]),
    );
    (svc, sl)
}

/// One state of [`corpus`]: a name, the configuration and node, and the objects.
pub struct Case {
    pub name: &'static str,
    pub config: Config,
    pub node: model::NodeInfo,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

impl Case {
    pub fn model(&self) -> Model {
        let (mut model, warnings) = model::build(&self.services, &self.slices, None, &self.config);
        assert!(warnings.is_empty(), "{}: {warnings:?}", self.name);
        model.node = self.node.clone();
        model
    }

    /// The ruleset, built one service port at a time as the daemon does.
    pub fn rules(&self) -> crate::nft::ruleset::Rules {
        let mut rules = crate::nft::ruleset::Rules::new(&self.config, &self.node);
        for port in self.model().services.values() {
            rules.update(None, Some(port));
        }
        rules
    }
}

fn endpoints_on(prefix: &str, n: usize, node: &str) -> Value {
    json!(
        (1..=n)
            .map(|i| ep(&format!("{prefix}{i}"), node, true))
            .collect::<Vec<_>>()
    )
}

/// Rulesets with every kind of object the builder writes, as a sequence of states (so that
/// consecutive ones give partial syncs): many Services, session affinity, `Local` traffic
/// policies, NodePorts, external IPs, LoadBalancer source ranges, IPv6 and dual stack, hairpin
/// endpoints, more than [`crate::nft::ruleset::DISPATCH_RULES_MAX`] endpoints with and without
/// affinity, Services without endpoints, UDP and SCTP, `--masquerade-all` and
/// `--nodeport-addresses`.
pub fn corpus() -> Vec<Case> {
    let node = |ips: &[&str]| model::NodeInfo {
        name: NODE.into(),
        ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
        zone: None,
    };
    let plain = |name: &str, ip: &str, n: usize, prefix: &str| {
        let svc = service(
            "default",
            name,
            json!({ "clusterIP": ip, "ports": [{ "name": "http", "port": 80 }] }),
        );
        let sl = slice(
            "default",
            name,
            &format!("{name}-1"),
            "IPv4",
            json!([{ "name": "http", "port": 8080 }]),
            endpoints_on(prefix, n, "node-b"),
        );
        (svc, sl)
    };
    let state = |big: usize, sticky: usize, ranges: &[&str], lb_present: bool, hairpin: &str| {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut add = |(svc, sl): (Service, EndpointSlice)| {
            services.push(svc);
            slices.push(sl);
        };
        add(plain("a", "10.96.0.1", 2, "10.244.1."));
        add(plain("b", "10.96.0.2", 1, "10.244.2."));
        add(plain("big", "10.96.0.3", big, "10.244.3."));
        add(plain("empty", "10.96.0.4", 0, ""));
        let sticky_svc = service(
            "default",
            "sticky",
            json!({ "clusterIP": "10.96.0.5", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 30 } },
                    "ports": [{ "name": "http", "port": 80 }] }),
        );
        let mut sticky_eps = endpoints_on("10.244.5.", sticky, "node-b");
        if let Some(first) = sticky_eps.get_mut(0) {
            *first = ep(hairpin, NODE, true);
        }
        add((
            sticky_svc,
            slice(
                "default",
                "sticky",
                "sticky-1",
                "IPv4",
                json!([{ "name": "http", "port": 8080 }]),
                sticky_eps,
            ),
        ));
        add((
            service(
                "default",
                "itp",
                json!({ "clusterIP": "10.96.0.6", "internalTrafficPolicy": "Local",
                        "ports": [{ "port": 53, "protocol": "UDP" }, { "name": "sctp", "port": 9, "protocol": "SCTP" }] }),
            ),
            slice(
                "default",
                "itp",
                "itp-1",
                "IPv4",
                json!([{ "port": 5353, "protocol": "UDP" }, { "name": "sctp", "port": 9, "protocol": "SCTP" }]),
                json!([
                    ep("10.244.6.1", NODE, true),
                    ep("10.244.6.2", "node-b", true)
                ]),
            ),
        ));
        add((
            service(
                "default",
                "np-local",
                json!({ "type": "NodePort", "clusterIP": "10.96.0.7", "externalTrafficPolicy": "Local",
                        "externalIPs": ["192.0.2.7"], "ports": [{ "port": 80, "nodePort": 30007 }] }),
            ),
            slice(
                "default",
                "np-local",
                "np-local-1",
                "IPv4",
                json!([{ "port": 8080 }]),
                json!([
                    ep("10.244.7.1", NODE, true),
                    ep("10.244.7.2", "node-b", true)
                ]),
            ),
        ));
        add((
            service(
                "default",
                "np-gone",
                json!({ "type": "NodePort", "clusterIP": "10.96.0.8", "externalTrafficPolicy": "Local",
                        "ports": [{ "port": 80, "nodePort": 30008 }] }),
            ),
            slice(
                "default",
                "np-gone",
                "np-gone-1",
                "IPv4",
                json!([{ "port": 8080 }]),
                json!([ep("10.244.8.1", "node-b", true)]),
            ),
        ));
        if lb_present {
            add((
                with_status(
                    service(
                        "default",
                        "lb",
                        json!({ "type": "LoadBalancer", "clusterIP": "10.96.0.9",
                                "loadBalancerSourceRanges": ranges,
                                "ports": [{ "port": 443, "nodePort": 30009 }] }),
                    ),
                    json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.9" }] } }),
                ),
                slice(
                    "default",
                    "lb",
                    "lb-1",
                    "IPv4",
                    json!([{ "port": 8443 }]),
                    json!([ep("10.244.9.1", "node-b", true)]),
                ),
            ));
        }
        add(local_load_balancer());
        add((
            with_status(
                service(
                    "default",
                    "dual",
                    json!({ "type": "LoadBalancer", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                            "ipFamilies": ["IPv4", "IPv6"], "sessionAffinity": "ClientIP",
                            "loadBalancerSourceRanges": ["2001:db8::/32", "2001:db9::/61", "203.0.113.0/24"],
                            "ports": [{ "port": 80, "nodePort": 30010 }] }),
                ),
                json!({ "loadBalancer": { "ingress": [{ "ip": "2001:db8::10" }, { "ip": "198.51.100.10" }] } }),
            ),
            slice(
                "default",
                "dual",
                "dual-6",
                "IPv6",
                json!([{ "port": 8080 }]),
                json!([
                    ep("fd00:244::10:1", NODE, true),
                    ep("fd00:244::10:2", "node-b", true)
                ]),
            ),
        ));
        add((
            service(
                "default",
                "six",
                json!({ "clusterIPs": ["fd00:96::11"], "ipFamilies": ["IPv6"],
                        "ports": [{ "port": 80 }] }),
            ),
            slice(
                "default",
                "six",
                "six-1",
                "IPv6",
                json!([{ "port": 8080 }]),
                endpoints_on("fd00:244::11:", big, "node-b"),
            ),
        ));
        (services, slices)
    };
    let (services, slices) = state(
        20,
        17,
        &["203.0.113.0/24", "10.0.0.0/12"],
        true,
        "10.244.5.1",
    );
    let first = Case {
        name: "mixed",
        config: config(),
        node: node(&["10.0.0.7"]),
        services,
        slices,
    };
    let (services, slices) = state(
        3,
        18,
        &["203.0.113.0/25", "10.0.0.7/32"],
        true,
        "10.244.5.9",
    );
    let second = Case {
        name: "mixed, changed",
        config: config(),
        node: node(&["10.0.0.7"]),
        services,
        slices,
    };
    let (services, slices) = state(3, 2, &[], false, "10.244.5.9");
    let third = Case {
        name: "mixed, fewer",
        config: config(),
        node: node(&["10.0.0.7"]),
        services,
        slices,
    };
    let (services, slices) = state(20, 17, &["203.0.113.0/24"], true, "10.244.5.1");
    let mut masquerade_all = config();
    masquerade_all.masquerade_all = true;
    masquerade_all.nodeport_addresses = crate::config::NodePortAddresses::Only {
        cidrs: vec![
            "192.168.0.0/16".parse().expect("cidr"),
            "192.168.1.0/24".parse().expect("cidr"),
            "fd00:1::/64".parse().expect("cidr"),
        ],
        primary: true,
    };
    let fourth = Case {
        name: "masquerade all, nodeport addresses",
        config: masquerade_all,
        node: node(&["10.0.0.7", "fd00:2::7"]),
        services,
        slices,
    };
    vec![first, second, third, fourth]
}
