//! The desired nftables state, as a pure function of the model and the configuration.
//!
//! One table per family (`ip strake-proxy`, `ip6 strake-proxy`), laid out like upstream
//! kube-proxy's nftables mode so that each packet costs O(1) whatever the number of Services:
//!
//! - `nat-prerouting` / `nat-output` jump to `services`, which looks up
//!   `daddr . l4proto . dport` in the verdict map `service-ips` (ClusterIPs, external IPs,
//!   LoadBalancer IPs) and, for `fib daddr type local`, `l4proto . dport` in `service-nodeports`.
//! - ClusterIPs go to the service's internal chain: `svc-<port>` (cluster endpoints) or
//!   `local-<port>` (`internalTrafficPolicy: Local`); external destinations go to `ext-<port>`,
//!   which marks for masquerade (or, for `externalTrafficPolicy: Local`, keeps the source and
//!   uses the local chain).
//! - `svc-`/`local-` chains pick an endpoint at random (a short `numgen` rule ladder, or for
//!   more than [`DISPATCH_RULES_MAX`] endpoints `numgen random mod N vmap @eps-<chain>`), after
//!   checking the per-endpoint affinity sets `aff-<endpoint>` (sessionAffinity ClientIP); the
//!   endpoint chain `ep-<endpoint>` marks hairpin traffic, refreshes its affinity set and DNATs.
//! - Filter hooks reject (TCP reset, ICMP unreachable) traffic to services without endpoints
//!   (`no-endpoint-services`, `no-endpoint-nodeports`), drop it where only a `Local` policy lacks
//!   endpoints, reject unused ports of ClusterIPs (`cluster-ips`), and enforce
//!   loadBalancerSourceRanges before DNAT (`firewall-ips` -> `fw-<port>`).
//! - `nat-postrouting` masquerades packets carrying the masquerade mark.
//!
//! Every object belonging to a service port is named after it (`<ns>/<name>/<proto>/<port>`),
//! so a change to one service touches only its own chains, sets and map elements.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::Config;
use crate::model::{Endpoint, IpFamily, Model, ServicePort};
use crate::nft::family_keyword;

/// Services with at most this many endpoints pick one with a rule ladder, larger ones with a
/// named verdict map (see `Builder::dispatch_rules`).
pub const DISPATCH_RULES_MAX: usize = 16;

/// The packet mark bit meaning "masquerade this" (upstream's default bit 14).
pub const MASQUERADE_MARK: u32 = 0x4000;

/// A chain: its base-chain declaration (hook, priority), if any, and its rules in nft syntax.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// E.g. `type nat hook prerouting priority dstnat ; policy accept ;` for a base chain.
    pub base: Option<String>,
    /// Rules in nft text syntax, in order.
    pub rules: Vec<String>,
}

/// A set or map: its declaration and its elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Set {
    /// `map` or `set`.
    pub kind: SetKind,
    /// The declaration body, e.g. `type ipv4_addr . inet_proto . inet_service : verdict ;`.
    pub spec: String,
    /// Elements: key to value (the value is empty for plain sets).
    pub elements: BTreeMap<String, String>,
}

/// Whether a [`Set`] is a set or a map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SetKind {
    /// A set.
    #[default]
    Set,
    /// A map (here always a verdict map).
    Map,
}

impl SetKind {
    /// The nft keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            SetKind::Set => "set",
            SetKind::Map => "map",
        }
    }
}

/// The desired content of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Which family (and so which table) this is.
    pub family: IpFamily,
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
    /// Sets and maps by name.
    pub sets: BTreeMap<String, Set>,
}

/// The desired state of both tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// `ip strake-proxy`.
    pub v4: Table,
    /// `ip6 strake-proxy`.
    pub v6: Table,
}

impl Ruleset {
    /// Computes the desired state of both tables from the model.
    pub fn build(model: &Model, config: &Config) -> Ruleset {
        Ruleset {
            v4: build_table(IpFamily::V4, model, config),
            v6: build_table(IpFamily::V6, model, config),
        }
    }

    /// Both tables.
    pub fn tables(&self) -> [&Table; 2] {
        [&self.v4, &self.v6]
    }
}

/// Spelling that differs between the two families.
struct Words {
    ipx: &'static str,
    addr_type: &'static str,
    loopback: &'static str,
    unreachable: &'static str,
}

impl Words {
    fn of(family: IpFamily) -> Words {
        match family {
            IpFamily::V4 => Words {
                ipx: "ip",
                addr_type: "ipv4_addr",
                loopback: "127.0.0.0/8",
                unreachable: "reject with icmp type host-unreachable",
            },
            IpFamily::V6 => Words {
                ipx: "ip6",
                addr_type: "ipv6_addr",
                loopback: "::1",
                unreachable: "reject with icmpv6 type addr-unreachable",
            },
        }
    }
}

const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const FIREWALL_IPS: &str = "firewall-ips";
const CLUSTER_IPS: &str = "cluster-ips";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const REJECT_CHAIN: &str = "reject-chain";

struct Builder<'a> {
    family: IpFamily,
    words: Words,
    config: &'a Config,
    table: Table,
}

fn build_table(family: IpFamily, model: &Model, config: &Config) -> Table {
    let mut b = Builder {
        family,
        words: Words::of(family),
        config,
        table: Table {
            family,
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
        },
    };
    b.fixed();
    for svc in model.services.values() {
        b.service(svc, &model.node.name, &model.node.ips);
    }
    b.table
}

/// `base` of a service port's object names: `<ns>/<name>/<proto>/<port name or number>`.
/// Namespaces, names and port names are DNS labels, so this is a valid nft identifier tail.
fn port_base(svc: &ServicePort) -> String {
    let id = &svc.id;
    let port = if id.port_name.is_empty() {
        svc.port.to_string()
    } else {
        id.port_name.clone()
    };
    format!(
        "{}/{}/{}/{}",
        id.namespace,
        id.name,
        id.protocol.nft_name(),
        port
    )
}

/// The suffix naming one endpoint: `<ip>/<port>`, with `:` (not allowed in identifiers)
/// spelled `.`; only one family lives in a table, so this cannot collide.
fn endpoint_suffix(ep: &Endpoint) -> String {
    format!("{}/{}", ep.ip.to_string().replace(':', "."), ep.port)
}

fn dnat_target(ep: &Endpoint) -> String {
    match ep.ip {
        IpAddr::V4(ip) => format!("{ip}:{}", ep.port),
        IpAddr::V6(ip) => format!("[{ip}]:{}", ep.port),
    }
}

impl Builder<'_> {
    fn chain(&mut self, name: impl Into<String>, rules: Vec<String>) {
        self.table
            .chains
            .insert(name.into(), Chain { base: None, rules });
    }

    fn base_chain(&mut self, name: &str, base: &str, rules: &[&str]) {
        self.table.chains.insert(
            name.to_string(),
            Chain {
                base: Some(format!("{base} ; policy accept ;")),
                rules: rules.iter().map(|r| r.to_string()).collect(),
            },
        );
    }

    fn set(&mut self, name: impl Into<String>, kind: SetKind, spec: String) {
        self.table.sets.insert(
            name.into(),
            Set {
                kind,
                spec,
                elements: BTreeMap::new(),
            },
        );
    }

    /// Adds an element unless its key is taken (two Services claiming the same IP and port:
    /// the first by name wins, deterministically).
    fn element(&mut self, set: &str, key: String, value: String) {
        if let Some(s) = self.table.sets.get_mut(set) {
            s.elements.entry(key).or_insert(value);
        }
    }

    /// The chains, sets and maps every table has, whatever the Services.
    fn fixed(&mut self) {
        let Words {
            ipx,
            addr_type,
            loopback,
            unreachable,
        } = self.words;
        let addr_key = format!("type {addr_type} . inet_proto . inet_service : verdict ;");
        let port_key = "type inet_proto . inet_service : verdict ;".to_string();
        self.set(SERVICE_IPS, SetKind::Map, addr_key.clone());
        self.set(NO_ENDPOINT_SERVICES, SetKind::Map, addr_key.clone());
        self.set(FIREWALL_IPS, SetKind::Map, addr_key);
        self.set(SERVICE_NODEPORTS, SetKind::Map, port_key.clone());
        self.set(NO_ENDPOINT_NODEPORTS, SetKind::Map, port_key);
        self.set(CLUSTER_IPS, SetKind::Set, format!("type {addr_type} ;"));

        self.base_chain(
            "nat-prerouting",
            "type nat hook prerouting priority dstnat",
            &["jump services"],
        );
        self.base_chain(
            "nat-output",
            "type nat hook output priority -100",
            &["jump services"],
        );
        self.base_chain(
            "nat-postrouting",
            "type nat hook postrouting priority srcnat",
            &["jump masquerading"],
        );
        // Source ranges are checked before DNAT, so at a more urgent priority.
        self.base_chain(
            "filter-prerouting",
            "type filter hook prerouting priority dstnat - 10",
            &["ct state new jump firewall-check"],
        );
        self.base_chain(
            "filter-input",
            "type filter hook input priority -110",
            &[
                "ct state new jump nodeport-endpoints-check",
                "ct state new jump service-endpoints-check",
            ],
        );
        self.base_chain(
            "filter-forward",
            "type filter hook forward priority -110",
            &[
                "ct state new jump service-endpoints-check",
                "ct state new jump cluster-ips-check",
            ],
        );
        self.base_chain(
            "filter-output",
            "type filter hook output priority -110",
            &[
                "ct state new jump service-endpoints-check",
                "ct state new jump firewall-check",
            ],
        );
        // Unused ClusterIP ports are recognised after DNAT had its chance.
        self.base_chain(
            "filter-output-post-dnat",
            "type filter hook output priority -90",
            &["ct state new jump cluster-ips-check"],
        );

        self.chain(
            MARK_FOR_MASQUERADE,
            vec![format!("meta mark set meta mark | {MASQUERADE_MARK:#x}")],
        );
        self.chain(
            "masquerading",
            vec![
                format!("meta mark & {MASQUERADE_MARK:#x} == 0 return"),
                format!("meta mark set meta mark ^ {MASQUERADE_MARK:#x}"),
                "masquerade fully-random".to_string(),
            ],
        );
        self.chain(
            REJECT_CHAIN,
            vec![
                "meta l4proto tcp reject with tcp reset".to_string(),
                unreachable.to_string(),
            ],
        );
        self.chain(
            "services",
            vec![
                format!("{ipx} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"),
                format!(
                    "fib daddr type local {ipx} daddr != {loopback} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"
                ),
            ],
        );
        self.chain(
            "firewall-check",
            vec![format!(
                "{ipx} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"
            )],
        );
        self.chain(
            "service-endpoints-check",
            vec![format!(
                "{ipx} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"
            )],
        );
        self.chain(
            "nodeport-endpoints-check",
            vec![format!(
                "fib daddr type local {ipx} daddr != {loopback} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"
            )],
        );
        self.chain(
            "cluster-ips-check",
            vec![
                format!("{ipx} daddr @{CLUSTER_IPS} meta l4proto tcp reject with tcp reset"),
                format!("{ipx} daddr @{CLUSTER_IPS} reject"),
            ],
        );
    }

    fn cluster_cidr(&self) -> Option<ipnet::IpNet> {
        self.config
            .cluster_cidrs
            .iter()
            .copied()
            .find(|c| self.family.contains(c.addr()))
    }

    /// All objects of one service port in this family.
    fn service(&mut self, svc: &ServicePort, node_name: &str, node_ips: &[IpAddr]) {
        let family = self.family;
        let cluster_ips: Vec<IpAddr> = svc
            .cluster_ips
            .iter()
            .copied()
            .filter(|ip| family.contains(*ip))
            .collect();
        // A Service exists in a family only if it has a ClusterIP there (as upstream's
        // per-family proxiers see it).
        if cluster_ips.is_empty() {
            return;
        }
        let ipx = self.words.ipx;
        let proto = svc.id.protocol.nft_name();
        let base = port_base(svc);
        let sel = svc.select(family, node_name);

        let svc_chain = format!("svc-{base}");
        let local_chain = format!("local-{base}");
        let ext_chain = format!("ext-{base}");
        let has_cluster_chain = svc.uses_cluster_endpoints() && !sel.cluster.is_empty();
        let has_local_chain = svc.uses_local_endpoints() && !sel.local.is_empty();
        let internal_chain = if svc.internal_policy_local {
            has_local_chain.then_some(&local_chain)
        } else {
            has_cluster_chain.then_some(&svc_chain)
        };
        let external_has_endpoints = if svc.external_local() {
            has_local_chain
        } else {
            has_cluster_chain
        };
        let no_endpoint_verdict = if sel.has_any {
            "drop".to_string()
        } else {
            format!("goto {REJECT_CHAIN}")
        };

        // Endpoint chains (shared by the cluster and local chains) and affinity sets.
        let mut endpoints: Vec<&Endpoint> = sel.cluster.clone();
        for ep in &sel.local {
            if !endpoints.contains(ep) {
                endpoints.push(ep);
            }
        }
        for ep in &endpoints {
            let suffix = endpoint_suffix(ep);
            let mut rules = vec![format!("{ipx} saddr {} jump {MARK_FOR_MASQUERADE}", ep.ip)];
            if let Some(timeout) = svc.affinity_timeout_secs {
                let set = format!("aff-{base}__{suffix}");
                self.set(
                    set.clone(),
                    SetKind::Set,
                    format!(
                        "type {} ; flags dynamic,timeout ; timeout {timeout}s ;",
                        self.words.addr_type
                    ),
                );
                rules.push(format!("update @{set} {{ {ipx} saddr }}"));
            }
            rules.push(format!("meta l4proto {proto} dnat to {}", dnat_target(ep)));
            self.chain(format!("ep-{base}__{suffix}"), rules);
        }

        // ClusterIP masquerading lives in the internal chain, guarded by the ClusterIP
        // itself, because external traffic passes through the same chain.
        let mut masq_rules = Vec::new();
        for cip in &cluster_ips {
            let matcher = format!("{ipx} daddr {cip} {proto} dport {}", svc.port);
            if self.config.masquerade_all {
                masq_rules.push(format!("{matcher} jump {MARK_FOR_MASQUERADE}"));
            } else if let Some(cidr) = self.cluster_cidr() {
                masq_rules.push(format!(
                    "{matcher} {ipx} saddr != {cidr} jump {MARK_FOR_MASQUERADE}"
                ));
            }
        }
        if has_cluster_chain {
            let masq = if internal_chain == Some(&svc_chain) {
                masq_rules.clone()
            } else {
                Vec::new()
            };
            let rules = self.dispatch_rules(&svc_chain, &base, svc, &sel.cluster, masq);
            self.chain(svc_chain.clone(), rules);
        }
        if has_local_chain {
            let masq = if internal_chain == Some(&local_chain) {
                masq_rules
            } else {
                Vec::new()
            };
            let rules = self.dispatch_rules(&local_chain, &base, svc, &sel.local, masq);
            self.chain(local_chain.clone(), rules);
        }

        // ClusterIPs.
        for cip in &cluster_ips {
            let key = format!("{cip} . {proto} . {}", svc.port);
            match internal_chain {
                Some(chain) => self.element(SERVICE_IPS, key, format!("goto {chain}")),
                None => self.element(NO_ENDPOINT_SERVICES, key, no_endpoint_verdict.clone()),
            }
            self.element(CLUSTER_IPS, cip.to_string(), String::new());
        }

        if !svc.externally_accessible() {
            return;
        }
        if external_has_endpoints {
            let mut rules = Vec::new();
            if svc.external_local() {
                // Pods reaching an external address get the internal behaviour.
                if let (Some(cidr), Some(chain)) = (self.cluster_cidr(), internal_chain) {
                    rules.push(format!("{ipx} saddr {cidr} goto {chain}"));
                }
                // The node itself has a local source address that the endpoint could not
                // answer to: masquerade it and use any endpoint.
                let local_target = if has_cluster_chain {
                    &svc_chain
                } else {
                    &local_chain
                };
                rules.push(format!("fib saddr type local jump {MARK_FOR_MASQUERADE}"));
                rules.push(format!("fib saddr type local goto {local_target}"));
                rules.push(format!("goto {local_chain}"));
            } else {
                rules.push(format!("jump {MARK_FOR_MASQUERADE}"));
                rules.push(format!("goto {svc_chain}"));
            }
            self.chain(ext_chain.clone(), rules);
        }
        let external_verdict = if external_has_endpoints {
            format!("goto {ext_chain}")
        } else {
            no_endpoint_verdict.clone()
        };
        let external_map = if external_has_endpoints {
            SERVICE_IPS
        } else {
            NO_ENDPOINT_SERVICES
        };
        let lb_ips: Vec<IpAddr> = svc
            .load_balancer_ips
            .iter()
            .copied()
            .filter(|ip| family.contains(*ip))
            .collect();
        for ip in svc
            .external_ips
            .iter()
            .copied()
            .filter(|ip| family.contains(*ip))
            .chain(lb_ips.iter().copied())
        {
            let key = format!("{ip} . {proto} . {}", svc.port);
            self.element(external_map, key, external_verdict.clone());
        }
        if let Some(node_port) = svc.node_port {
            let key = format!("{proto} . {node_port}");
            let map = if external_has_endpoints {
                SERVICE_NODEPORTS
            } else {
                NO_ENDPOINT_NODEPORTS
            };
            self.element(map, key, external_verdict);
        }

        // loadBalancerSourceRanges: checked before DNAT, for the LB IPs only.
        if !lb_ips.is_empty() && !svc.load_balancer_source_ranges.is_empty() {
            let mut allowed: Vec<ipnet::IpNet> = svc
                .load_balancer_source_ranges
                .iter()
                .copied()
                .filter(|r| family.contains(r.addr()))
                .collect();
            // Traffic from the node to a LB IP it holds has that IP as source: allow it
            // when the node itself is allowed.
            let node_allowed = node_ips.iter().any(|ip| {
                svc.load_balancer_source_ranges
                    .iter()
                    .any(|r| r.contains(ip))
            });
            if node_allowed {
                allowed.extend(lb_ips.iter().map(|ip| ipnet::IpNet::from(*ip)));
            }
            // Interval sets refuse overlapping elements: keep only the outermost ranges.
            allowed.sort_by_key(|r| (r.prefix_len(), r.addr()));
            allowed.dedup();
            let allowed: Vec<String> = allowed
                .iter()
                .enumerate()
                .filter(|(i, r)| !allowed[..*i].iter().any(|outer| outer.contains(*r)))
                .map(|(_, r)| r.to_string())
                .collect();
            let fw_chain = format!("fw-{base}");
            // A named set, not an anonymous one (see `dispatch_rules`).
            self.set(
                fw_chain.clone(),
                SetKind::Set,
                format!("type {} ; flags interval ;", self.words.addr_type),
            );
            for range in allowed {
                self.element(&fw_chain, range, String::new());
            }
            self.chain(
                fw_chain.clone(),
                vec![format!("{ipx} saddr != @{fw_chain} drop")],
            );
            for ip in &lb_ips {
                let key = format!("{ip} . {proto} . {}", svc.port);
                self.element(FIREWALL_IPS, key, format!("goto {fw_chain}"));
            }
        }
    }

    /// Rules of the `svc-`/`local-` chain `chain`: masquerade marks, affinity checks, then a
    /// uniform random pick among `endpoints`.
    ///
    /// Up to [`DISPATCH_RULES_MAX`] endpoints the pick is a short rule ladder (rule `i` takes
    /// endpoint `i` with probability `1/(N-i)`), above it a named verdict map `eps-<chain>`
    /// looked up with `numgen random mod N` (O(1)). Why not a map everywhere: every set costs the
    /// kernel a walk of the table's list of sets when it is created and each time it is
    /// referenced, and an anonymous `vmap { ... }` also walks the whole pending transaction, so
    /// one set per Service makes a full sync quadratic (10k Services x 10 endpoints: 196 s with
    /// anonymous maps, 13.5 s with named ones, see `examples/syntax_bench.rs`). Only the first
    /// packet of a connection goes through these chains.
    fn dispatch_rules(
        &mut self,
        chain: &str,
        base: &str,
        svc: &ServicePort,
        endpoints: &[&Endpoint],
        mut rules: Vec<String>,
    ) -> Vec<String> {
        let ipx = self.words.ipx;
        if svc.affinity_timeout_secs.is_some() {
            for ep in endpoints {
                let suffix = endpoint_suffix(ep);
                rules.push(format!(
                    "{ipx} saddr @aff-{base}__{suffix} goto ep-{base}__{suffix}"
                ));
            }
        }
        if endpoints.len() <= DISPATCH_RULES_MAX {
            let n = endpoints.len();
            for (i, ep) in endpoints.iter().enumerate() {
                let target = format!("goto ep-{base}__{}", endpoint_suffix(ep));
                if i + 1 == n {
                    rules.push(target);
                } else {
                    rules.push(format!("numgen random mod {} 0 {target}", n - i));
                }
            }
            return rules;
        }
        let map = format!("eps-{chain}");
        // The modulus in `typeof` only gives the key's type; fixed so that scaling does not
        // change the declaration.
        self.set(
            map.clone(),
            SetKind::Map,
            "typeof numgen random mod 1 : verdict ;".to_string(),
        );
        for (i, ep) in endpoints.iter().enumerate() {
            self.element(
                &map,
                i.to_string(),
                format!("goto ep-{base}__{}", endpoint_suffix(ep)),
            );
        }
        rules.push(format!("numgen random mod {} vmap @{map}", endpoints.len()));
        rules
    }
}

/// Renders the table keyword pair, e.g. `ip strake-proxy`.
pub fn table_ref(family: IpFamily) -> String {
    format!("{} {}", family_keyword(family), crate::nft::TABLE)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testutil::{NODE, config, ep, model_of, service, simple, slice};

    fn rules<'a>(t: &'a Table, chain: &str) -> &'a [String] {
        &t.chains
            .get(chain)
            .unwrap_or_else(|| {
                panic!(
                    "no chain {chain} in {:?}",
                    t.chains.keys().collect::<Vec<_>>()
                )
            })
            .rules
    }

    fn elem<'a>(t: &'a Table, set: &str, key: &str) -> Option<&'a str> {
        t.sets[set].elements.get(key).map(String::as_str)
    }

    #[test]
    fn cluster_ip_dispatches_to_endpoints() {
        let (svc, sl) = simple(
            "default",
            "web",
            "10.96.0.10",
            &["10.244.1.1", "10.244.1.2"],
        );
        let rs = Ruleset::build(&model_of(&[svc], &[sl]), &config());
        let t = &rs.v4;
        assert_eq!(
            elem(t, SERVICE_IPS, "10.96.0.10 . tcp . 80"),
            Some("goto svc-default/web/tcp/http")
        );
        assert_eq!(elem(t, CLUSTER_IPS, "10.96.0.10"), Some(""));
        assert_eq!(
            rules(t, "svc-default/web/tcp/http"),
            [
                "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "numgen random mod 2 0 goto ep-default/web/tcp/http__10.244.1.1/8080",
                "goto ep-default/web/tcp/http__10.244.1.2/8080",
            ]
        );
        assert_eq!(
            rules(t, "ep-default/web/tcp/http__10.244.1.1/8080"),
            [
                "ip saddr 10.244.1.1 jump mark-for-masquerade",
                "meta l4proto tcp dnat to 10.244.1.1:8080",
            ]
        );
        // A v4-only Service has nothing in the v6 table but the fixed objects.
        assert!(rs.v6.sets.values().all(|s| s.elements.is_empty()));
        assert!(!rs.v6.chains.keys().any(|c| c.contains("web")));
    }

    #[test]
    fn many_endpoints_are_picked_through_a_named_map() {
        let ips: Vec<String> = (1..=DISPATCH_RULES_MAX + 1)
            .map(|i| format!("10.244.1.{i}"))
            .collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let (svc, sl) = simple("default", "big", "10.96.0.11", &refs);
        let rs = Ruleset::build(&model_of(&[svc], &[sl]), &config());
        let t = &rs.v4;
        let n = DISPATCH_RULES_MAX + 1;
        assert_eq!(
            rules(t, "svc-default/big/tcp/http")[1],
            format!("numgen random mod {n} vmap @eps-svc-default/big/tcp/http")
        );
        let eps = &t.sets["eps-svc-default/big/tcp/http"];
        assert_eq!(eps.kind, SetKind::Map);
        assert_eq!(eps.elements.len(), n);
        assert_eq!(
            elem(t, "eps-svc-default/big/tcp/http", "0"),
            Some("goto ep-default/big/tcp/http__10.244.1.1/8080")
        );
    }

    #[test]
    fn masquerade_all_marks_unconditionally() {
        let (svc, sl) = simple("default", "web", "10.96.0.10", &["10.244.1.1"]);
        let mut cfg = config();
        cfg.masquerade_all = true;
        let rs = Ruleset::build(&model_of(&[svc], &[sl]), &cfg);
        assert_eq!(
            rules(&rs.v4, "svc-default/web/tcp/http")[0],
            "ip daddr 10.96.0.10 tcp dport 80 jump mark-for-masquerade"
        );
    }

    #[test]
    fn no_endpoints_rejects_and_local_policy_without_local_endpoints_drops() {
        let (empty, _) = simple("default", "empty", "10.96.0.1", &[]);
        let itp = service(
            "default",
            "itp",
            json!({ "clusterIP": "10.96.0.2", "internalTrafficPolicy": "Local", "ports": [{ "port": 53, "protocol": "UDP" }] }),
        );
        let itp_slice = slice(
            "default",
            "itp",
            "itp-1",
            "IPv4",
            json!([{ "port": 53, "protocol": "UDP" }]),
            json!([ep("10.244.2.1", "node-b", true)]),
        );
        let rs = Ruleset::build(&model_of(&[empty, itp], &[itp_slice]), &config());
        let t = &rs.v4;
        assert_eq!(
            elem(t, NO_ENDPOINT_SERVICES, "10.96.0.1 . tcp . 80"),
            Some("goto reject-chain")
        );
        assert_eq!(
            elem(t, NO_ENDPOINT_SERVICES, "10.96.0.2 . udp . 53"),
            Some("drop")
        );
        assert_eq!(elem(t, SERVICE_IPS, "10.96.0.1 . tcp . 80"), None);
        assert!(
            !t.chains
                .keys()
                .any(|c| c.contains("empty") || c.contains("itp"))
        );
        assert_eq!(
            rules(t, REJECT_CHAIN),
            [
                "meta l4proto tcp reject with tcp reset",
                "reject with icmp type host-unreachable"
            ]
        );
    }

    fn nodeport(etp: &str, node_of_endpoint: &str) -> Ruleset {
        let svc = service(
            "default",
            "np",
            json!({ "type": "NodePort", "clusterIP": "10.96.0.5", "externalTrafficPolicy": etp, "externalIPs": ["192.0.2.5"], "ports": [{ "port": 80, "nodePort": 30080 }] }),
        );
        let sl = slice(
            "default",
            "np",
            "np-1",
            "IPv4",
            json!([{ "port": 8080 }]),
            json!([ep("10.244.1.1", node_of_endpoint, true)]),
        );
        Ruleset::build(&model_of(&[svc], &[sl]), &config())
    }

    #[test]
    fn node_port_with_cluster_policy_masquerades() {
        let rs = nodeport("Cluster", "node-b");
        let t = &rs.v4;
        assert_eq!(
            elem(t, SERVICE_NODEPORTS, "tcp . 30080"),
            Some("goto ext-default/np/tcp/80")
        );
        assert_eq!(
            elem(t, SERVICE_IPS, "192.0.2.5 . tcp . 80"),
            Some("goto ext-default/np/tcp/80")
        );
        assert_eq!(
            rules(t, "ext-default/np/tcp/80"),
            ["jump mark-for-masquerade", "goto svc-default/np/tcp/80"]
        );
    }

    #[test]
    fn node_port_with_local_policy_keeps_source_and_drops_without_local_endpoint() {
        let rs = nodeport("Local", NODE);
        let t = &rs.v4;
        assert_eq!(
            rules(t, "ext-default/np/tcp/80"),
            [
                "ip saddr 10.244.0.0/16 goto svc-default/np/tcp/80",
                "fib saddr type local jump mark-for-masquerade",
                "fib saddr type local goto svc-default/np/tcp/80",
                "goto local-default/np/tcp/80",
            ]
        );
        assert_eq!(
            rules(t, "local-default/np/tcp/80"),
            ["goto ep-default/np/tcp/80__10.244.1.1/8080"]
        );

        let rs = nodeport("Local", "node-b");
        let t = &rs.v4;
        assert_eq!(elem(t, NO_ENDPOINT_NODEPORTS, "tcp . 30080"), Some("drop"));
        assert_eq!(
            elem(t, NO_ENDPOINT_SERVICES, "192.0.2.5 . tcp . 80"),
            Some("drop")
        );
        // ClusterIP traffic still goes to the remote endpoint.
        assert_eq!(
            elem(t, SERVICE_IPS, "10.96.0.5 . tcp . 80"),
            Some("goto svc-default/np/tcp/80")
        );
        assert!(!t.chains.contains_key("ext-default/np/tcp/80"));
    }

    #[test]
    fn session_affinity_uses_per_endpoint_timeout_sets() {
        let svc = service(
            "default",
            "sticky",
            json!({ "clusterIP": "10.96.0.7", "sessionAffinity": "ClientIP", "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 30 } }, "ports": [{ "port": 80 }] }),
        );
        let sl = slice(
            "default",
            "sticky",
            "s-1",
            "IPv4",
            json!([{ "port": 80 }]),
            json!([ep("10.244.1.1", "node-b", true)]),
        );
        let rs = Ruleset::build(&model_of(&[svc], &[sl]), &config());
        let t = &rs.v4;
        let set = "aff-default/sticky/tcp/80__10.244.1.1/80";
        assert_eq!(
            t.sets[set].spec,
            "type ipv4_addr ; flags dynamic,timeout ; timeout 30s ;"
        );
        assert_eq!(
            rules(t, "svc-default/sticky/tcp/80")[1],
            format!("ip saddr @{set} goto ep-default/sticky/tcp/80__10.244.1.1/80")
        );
        assert_eq!(
            rules(t, "ep-default/sticky/tcp/80__10.244.1.1/80")[1],
            format!("update @{set} {{ ip saddr }}")
        );
    }

    #[test]
    fn source_ranges_filter_load_balancer_ips() {
        let svc = crate::testutil::with_status(
            service(
                "default",
                "lb",
                json!({ "type": "LoadBalancer", "clusterIP": "10.96.0.8", "loadBalancerSourceRanges": ["203.0.113.0/24"], "ports": [{ "port": 80, "nodePort": 30081 }] }),
            ),
            json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.1" }] } }),
        );
        let sl = slice(
            "default",
            "lb",
            "lb-1",
            "IPv4",
            json!([{ "port": 80 }]),
            json!([ep("10.244.1.1", "node-b", true)]),
        );
        let rs = Ruleset::build(&model_of(&[svc], &[sl]), &config());
        let t = &rs.v4;
        assert_eq!(
            elem(t, FIREWALL_IPS, "198.51.100.1 . tcp . 80"),
            Some("goto fw-default/lb/tcp/80")
        );
        assert_eq!(
            rules(t, "fw-default/lb/tcp/80"),
            ["ip saddr != @fw-default/lb/tcp/80 drop"]
        );
        assert_eq!(elem(t, "fw-default/lb/tcp/80", "203.0.113.0/24"), Some(""));
        assert_eq!(
            elem(t, SERVICE_IPS, "198.51.100.1 . tcp . 80"),
            Some("goto ext-default/lb/tcp/80")
        );
    }

    #[test]
    fn dual_stack_service_fills_both_tables() {
        let svc = service(
            "default",
            "ds",
            json!({ "clusterIPs": ["10.96.0.9", "fd00:96::9"], "ports": [{ "port": 80 }] }),
        );
        let s4 = slice(
            "default",
            "ds",
            "ds-4",
            "IPv4",
            json!([{ "port": 80 }]),
            json!([ep("10.244.1.1", "node-b", true)]),
        );
        let s6 = slice(
            "default",
            "ds",
            "ds-6",
            "IPv6",
            json!([{ "port": 80 }]),
            json!([ep("fd00:244::1", "node-b", true)]),
        );
        let rs = Ruleset::build(&model_of(&[svc], &[s4, s6]), &config());
        assert_eq!(
            elem(&rs.v6, SERVICE_IPS, "fd00:96::9 . tcp . 80"),
            Some("goto svc-default/ds/tcp/80")
        );
        assert_eq!(
            rules(&rs.v6, "ep-default/ds/tcp/80__fd00.244..1/80"),
            [
                "ip6 saddr fd00:244::1 jump mark-for-masquerade",
                "meta l4proto tcp dnat to [fd00:244::1]:80"
            ]
        );
        assert_eq!(
            rules(&rs.v6, "svc-default/ds/tcp/80")[0],
            "ip6 daddr fd00:96::9 tcp dport 80 ip6 saddr != fd00:244::/64 jump mark-for-masquerade"
        );
        assert_eq!(
            elem(&rs.v4, SERVICE_IPS, "10.96.0.9 . tcp . 80"),
            Some("goto svc-default/ds/tcp/80")
        );
    }

    #[test]
    fn a_change_to_one_service_touches_only_its_objects() {
        let (a, sa) = simple("default", "a", "10.96.0.1", &["10.244.1.1"]);
        let (b, sb) = simple("default", "b", "10.96.0.2", &["10.244.2.1", "10.244.2.2"]);
        let before = Ruleset::build(
            &model_of(&[a.clone(), b.clone()], &[sa.clone(), sb]),
            &config(),
        );
        let (_, sb2) = simple("default", "b", "10.96.0.2", &["10.244.2.1", "10.244.2.3"]);
        let after = Ruleset::build(&model_of(&[a, b], &[sa, sb2]), &config());
        let changed: Vec<&String> = after
            .v4
            .chains
            .iter()
            .filter(|(n, c)| before.v4.chains.get(*n) != Some(c))
            .map(|(n, _)| n)
            .chain(
                before
                    .v4
                    .chains
                    .keys()
                    .filter(|n| !after.v4.chains.contains_key(*n)),
            )
            .collect();
        assert!(!changed.is_empty());
        assert!(
            changed.iter().all(|n| n.contains("default/b/")),
            "{changed:?}"
        );
        let changed_sets: Vec<&String> = after
            .v4
            .sets
            .iter()
            .filter(|(n, s)| before.v4.sets.get(*n) != Some(s))
            .map(|(n, _)| n)
            .collect();
        assert!(changed_sets.is_empty(), "{changed_sets:?}");
    }
}
