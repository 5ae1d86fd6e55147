//! A pod's resolver configuration (`dnsPolicy`, `dnsConfig`), as upstream's kubelet forms it
//! (`pkg/kubelet/network/dns`): the host's `resolvConf` is the base; ClusterFirst replaces its
//! servers with the cluster DNS, puts the cluster search domains before the host's and sets
//! `ndots:5`; None starts empty; Default keeps the host's; `dnsConfig` is appended to any of
//! them; the result is cut to the API's limits (3 nameservers, 32 search domains of at most 253
//! characters, 2048 characters in all).

use std::io::Read;

use k8s_openapi::api::core::v1::Pod;
use strake_types::cri;

use crate::config::Config;

/// Longest `resolvConf` read, as upstream.
const MAX_RESOLV_CONF: u64 = 10 << 20;
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCH_PATHS: usize = 32;
const MAX_SEARCH_CHARS: usize = 2048;
const MAX_DOMAIN_LEN: usize = 253;

/// The host's resolver configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("read resolver configuration {path}")]
    ReadResolvConf {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// `resolv.conf` as parsed (nameservers, search domains without the trailing dot, options with
/// later ones of the same name winning).
pub fn parse_resolv_conf(text: &str) -> cri::DnsConfig {
    let mut dns = cri::DnsConfig::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("nameserver") => dns.servers.extend(fields.next().map(str::to_string)),
            Some("search") => {
                dns.searches = fields
                    .filter(|s| *s != ".")
                    .map(|s| s.trim_end_matches('.').to_string())
                    .collect();
            }
            Some("options") => {
                for o in fields {
                    set_option(&mut dns.options, o.to_string());
                }
            }
            _ => {}
        }
    }
    dns
}

/// Sets option `opt` (`name` or `name:value`), replacing one of the same name in place.
fn set_option(options: &mut Vec<String>, opt: String) {
    let name = opt.split(':').next().unwrap_or_default().to_string();
    match options
        .iter_mut()
        .find(|o| o.split(':').next() == Some(name.as_str()))
    {
        Some(existing) => *existing = opt,
        None => options.push(opt),
    }
}

fn push_unique(into: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for i in items {
        if !into.contains(&i) {
            into.push(i);
        }
    }
}

/// The host's resolver configuration from `config.resolv_conf` (empty when that is "").
pub fn host_dns(config: &Config) -> Result<cri::DnsConfig, DnsError> {
    if config.resolv_conf.is_empty() {
        return Ok(cri::DnsConfig::default());
    }
    let err = |source| DnsError::ReadResolvConf {
        path: config.resolv_conf.clone(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(&config.resolv_conf)
        .map_err(err)?
        .take(MAX_RESOLV_CONF)
        .read_to_string(&mut text)
        .map_err(err)?;
    Ok(parse_resolv_conf(&text))
}

/// The pod's DNS configuration, from its policy, the cluster's DNS settings in `config`, and
/// `host` (the host's parsed `resolvConf`).
pub fn pod_dns(pod: &Pod, config: &Config, host: cri::DnsConfig) -> cri::DnsConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_network = spec.host_network.unwrap_or(false);
    #[derive(PartialEq)]
    enum Kind {
        Cluster,
        Host,
        None,
    }
    let kind = match spec.dns_policy.as_deref() {
        Some("None") => Kind::None,
        Some("ClusterFirstWithHostNet") => Kind::Cluster,
        Some("Default") => Kind::Host,
        Some("ClusterFirst") | None if host_network => Kind::Host,
        // ClusterFirst, and what the API server would have refused.
        _ => Kind::Cluster,
    };
    let mut dns = host;
    match kind {
        Kind::None => dns = cri::DnsConfig::default(),
        Kind::Cluster if !config.cluster_dns.is_empty() => {
            dns.servers = config.cluster_dns.iter().map(ToString::to_string).collect();
            if !config.cluster_domain.is_empty() {
                let d = &config.cluster_domain;
                let mut searches = vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()];
                push_unique(&mut searches, std::mem::take(&mut dns.searches));
                dns.searches = searches;
            }
            dns.options = vec!["ndots:5".into()];
        }
        // ClusterFirst without cluster DNS falls back to Default.
        Kind::Cluster | Kind::Host => {
            if config.resolv_conf.is_empty() {
                // No resolver configuration: the local machine's nameserver, no search.
                dns.servers = match config.node_ip {
                    Some(ip) if ip.is_ipv6() => vec!["::1".into()],
                    _ => vec!["127.0.0.1".into()],
                };
                dns.searches = vec![".".into()];
            }
        }
    }
    if let Some(c) = &spec.dns_config {
        let servers = std::mem::take(&mut dns.servers);
        push_unique(&mut dns.servers, servers);
        push_unique(&mut dns.servers, c.nameservers.clone().unwrap_or_default());
        let searches = std::mem::take(&mut dns.searches);
        push_unique(&mut dns.searches, searches);
        push_unique(&mut dns.searches, c.searches.clone().unwrap_or_default());
        for o in c.options.iter().flatten() {
            let name = o.name.clone().unwrap_or_default();
            set_option(
                &mut dns.options,
                match o.value.as_deref() {
                    Some(v) if !v.is_empty() => format!("{name}:{v}"),
                    _ => name,
                },
            );
        }
    }
    fit_limits(dns)
}

/// Cuts the configuration to what the API allows (upstream's `formDNSConfigFitsLimits`).
fn fit_limits(mut dns: cri::DnsConfig) -> cri::DnsConfig {
    dns.servers.truncate(MAX_NAMESERVERS);
    dns.searches.truncate(MAX_SEARCH_PATHS);
    dns.searches.retain(|s| s.len() <= MAX_DOMAIN_LEN);
    while dns.searches.join(" ").len() > MAX_SEARCH_CHARS {
        dns.searches.pop();
    }
    dns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flags;

    fn pod(spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = serde_json::json!([{ "name": "c" }]);
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web", "namespace": "prod" },
            "spec": spec
        }))
        .unwrap()
    }

    fn config(cluster_dns: bool) -> Config {
        let mut c = Config::load(&Flags::default()).unwrap();
        if cluster_dns {
            c.cluster_dns = vec!["10.96.0.10".parse().unwrap()];
        }
        c.cluster_domain = "cluster.local".into();
        c
    }

    fn host() -> cri::DnsConfig {
        parse_resolv_conf(
            "# comment\nnameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch corp.example. .\n\
             options timeout:2 rotate\noptions timeout:3\n",
        )
    }

    #[test]
    fn resolv_conf_parses_like_upstream() {
        let h = host();
        assert_eq!(h.servers, ["192.0.2.53", "192.0.2.54"]);
        assert_eq!(h.searches, ["corp.example"]);
        assert_eq!(h.options, ["timeout:3", "rotate"]);
    }

    #[test]
    fn cluster_first_uses_cluster_dns_and_puts_cluster_searches_before_the_hosts() {
        let d = pod_dns(&pod(serde_json::json!({})), &config(true), host());
        assert_eq!(d.servers, ["10.96.0.10"]);
        assert_eq!(
            d.searches,
            [
                "prod.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example"
            ]
        );
        assert_eq!(d.options, ["ndots:5"]);
        // On the host network ClusterFirst is Default; ClusterFirstWithHostNet is not.
        let hn = pod_dns(
            &pod(serde_json::json!({ "hostNetwork": true })),
            &config(true),
            host(),
        );
        assert_eq!(hn, host());
        let with = pod_dns(
            &pod(
                serde_json::json!({ "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet" }),
            ),
            &config(true),
            host(),
        );
        assert_eq!(with, d);
    }

    #[test]
    fn without_cluster_dns_cluster_first_falls_back_to_the_hosts_configuration() {
        let d = pod_dns(&pod(serde_json::json!({})), &config(false), host());
        assert_eq!(d, host());
        let mut none = config(false);
        none.resolv_conf = String::new();
        let d = pod_dns(
            &pod(serde_json::json!({ "dnsPolicy": "Default" })),
            &none,
            Default::default(),
        );
        assert_eq!(
            (d.servers, d.searches),
            (vec!["127.0.0.1".to_string()], vec![".".to_string()])
        );
    }

    #[test]
    fn dns_config_is_appended_to_every_policy() {
        let spec = |policy: &str| {
            serde_json::json!({
                "dnsPolicy": policy,
                "dnsConfig": {
                    "nameservers": ["1.1.1.1", "10.96.0.10"],
                    "searches": ["my.dns.search.suffix"],
                    "options": [{ "name": "ndots", "value": "2" }, { "name": "edns0" }]
                }
            })
        };
        let none = pod_dns(&pod(spec("None")), &config(true), host());
        assert_eq!(none.servers, ["1.1.1.1", "10.96.0.10"]);
        assert_eq!(none.searches, ["my.dns.search.suffix"]);
        assert_eq!(none.options, ["ndots:2", "edns0"]);
        let cluster = pod_dns(&pod(spec("ClusterFirst")), &config(true), host());
        assert_eq!(
            cluster.servers,
            ["10.96.0.10", "1.1.1.1"],
            "duplicates omitted"
        );
        assert_eq!(cluster.searches.last().unwrap(), "my.dns.search.suffix");
        assert_eq!(cluster.options, ["ndots:2", "edns0"]);
        let default = pod_dns(&pod(spec("Default")), &config(true), host());
        assert_eq!(
            default.servers,
            ["192.0.2.53", "192.0.2.54", "1.1.1.1"],
            "cut to 3"
        );
        assert_eq!(default.searches, ["corp.example", "my.dns.search.suffix"]);
        assert_eq!(default.options, ["timeout:3", "rotate", "ndots:2", "edns0"]);
    }

    #[test]
    fn search_lists_are_cut_to_the_api_limits() {
        let many: Vec<String> = (0..40).map(|i| format!("d{i}.example")).collect();
        let d = pod_dns(
            &pod(serde_json::json!({ "dnsPolicy": "None", "dnsConfig": { "searches": many } })),
            &config(true),
            host(),
        );
        assert_eq!(d.searches.len(), 32);
        let long: Vec<String> = (0..20).map(|i| format!("{i}{}", "a".repeat(200))).collect();
        let d = pod_dns(
            &pod(serde_json::json!({ "dnsPolicy": "None", "dnsConfig": { "searches": long } })),
            &config(true),
            host(),
        );
        assert!(d.searches.join(" ").len() <= 2048);
        assert_eq!(d.searches.len(), 10);
    }
}
