//! Cleanup of stale UDP conntrack entries after a sync.
//!
//! UDP has no connection to close: a client that keeps its source port keeps hitting the
//! conntrack entry made by its first datagram, whose DNAT still names the endpoint chosen then.
//! So after a sync, as upstream kube-proxy does, entries that the new rules can no longer
//! produce are deleted and the next datagram is load-balanced afresh:
//! - an endpoint a UDP service port stopped using: entries whose reply comes from it
//!   (`--reply-src IP --reply-port-src PORT`), unless another UDP service port still uses it;
//! - a UDP service port that had no endpoints and now has some: entries to each of its
//!   addresses and to its NodePort (they were made while traffic was rejected or dropped).
//!
//! [`stale`] decides this from two [`UdpState`]s (pure, unit-tested); the [`Conntrack`] seam
//! carries it out. The real one, [`ConntrackCommand`], runs the `conntrack` program (Debian's
//! conntrack-tools) in the proxy's network namespace, as upstream kube-proxy did for years.
//! Why not netlink yet: ctnetlink deletes one entry by its exact tuple, so "every entry replied
//! to by X" is a dump, a filter and one delete per entry, which the program already does well.
//! Of the Rust crates, `netlink-packet-netfilter` only gained conntrack get/delete messages in
//! 0.4 (late 2025; typed tuples, but no dump-and-delete helper), and `conntrack` (on `neli`)
//! lists but does not delete; either would mean writing and proving that loop ourselves. The
//! cost of the program is one process per deletion, and deletions only follow UDP endpoint
//! changes; the seam lets a netlink implementation replace it without touching the logic.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use crate::model::{IpFamily, Model, Protocol, ServicePort, ServicePortName};

/// What one UDP service port looks like to the cleanup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpPort {
    /// Addresses the port is reachable at (ClusterIPs, external and LoadBalancer IPs), each
    /// with the service port.
    pub destinations: BTreeSet<(IpAddr, u16)>,
    /// The NodePort, if any.
    pub node_port: Option<u16>,
    /// Endpoints (address, target port) some traffic policy of the port may use now.
    pub endpoints: BTreeSet<(IpAddr, u16)>,
}

/// The UDP part of a [`Model`]: what the cleanup compares between syncs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpState {
    /// UDP service ports by name.
    pub ports: BTreeMap<ServicePortName, UdpPort>,
}

impl UdpState {
    /// Extracts the UDP service ports of `model`, with the endpoints its rules select.
    pub fn of(model: &Model) -> Self {
        Self::of_ports(model.services.values(), &model.node.name)
    }

    /// [`UdpState::of`] some service ports (the UDP ones among them count), on node
    /// `node_name`.
    pub fn of_ports<'a>(
        service_ports: impl IntoIterator<Item = &'a ServicePort>,
        node_name: &str,
    ) -> Self {
        let mut ports = BTreeMap::new();
        for port in service_ports {
            if port.id.protocol != Protocol::Udp {
                continue;
            }
            let mut udp = UdpPort {
                node_port: port.node_port,
                ..UdpPort::default()
            };
            for ip in port
                .cluster_ips
                .iter()
                .chain(&port.external_ips)
                .chain(&port.load_balancer_ips)
            {
                udp.destinations.insert((*ip, port.port));
            }
            for family in [IpFamily::V4, IpFamily::V6] {
                let sel = port.select(family, node_name);
                for e in sel.cluster.iter().chain(&sel.local) {
                    udp.endpoints.insert((e.ip, e.port));
                }
            }
            ports.insert(port.id.clone(), udp);
        }
        UdpState { ports }
    }
}

/// One `conntrack -D -p udp` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Deletion {
    /// Entries whose reply comes from this endpoint.
    ReplyFrom {
        /// Endpoint address.
        ip: IpAddr,
        /// Endpoint port.
        port: u16,
    },
    /// Entries originally sent to this service address and port.
    To {
        /// Service address.
        ip: IpAddr,
        /// Service port.
        port: u16,
    },
    /// Entries originally sent to this NodePort, on any address of the family.
    ToNodePort {
        /// The family whose table holds the entries.
        family: IpFamily,
        /// The NodePort.
        port: u16,
    },
}

impl Deletion {
    /// The `conntrack` arguments that delete these entries.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["-D", "-p", "udp"].map(String::from).to_vec();
        match self {
            Deletion::ReplyFrom { ip, port } => {
                args.extend(family_args(*ip));
                args.extend([
                    "--reply-src".into(),
                    ip.to_string(),
                    "--reply-port-src".into(),
                    port.to_string(),
                ]);
            }
            Deletion::To { ip, port } => {
                args.extend(family_args(*ip));
                args.extend([
                    "--orig-dst".into(),
                    ip.to_string(),
                    "--orig-port-dst".into(),
                    port.to_string(),
                ]);
            }
            Deletion::ToNodePort { family, port } => {
                args.extend([
                    "-f".into(),
                    match family {
                        IpFamily::V4 => "ipv4".into(),
                        IpFamily::V6 => "ipv6".into(),
                    },
                    "--orig-port-dst".into(),
                    port.to_string(),
                ]);
            }
        }
        args
    }
}

fn family_args(ip: IpAddr) -> [String; 2] {
    [
        "-f".into(),
        if ip.is_ipv4() { "ipv4" } else { "ipv6" }.into(),
    ]
}

/// The entries to delete after going from `old` to `new` (sorted, without duplicates).
pub fn stale(old: &UdpState, new: &UdpState) -> Vec<Deletion> {
    let mut out = BTreeSet::new();
    let still_used: BTreeSet<(IpAddr, u16)> = new
        .ports
        .values()
        .flat_map(|p| p.endpoints.iter().copied())
        .collect();
    for (name, before) in &old.ports {
        let now = new.ports.get(name);
        for ep in &before.endpoints {
            let kept = now.is_some_and(|p| p.endpoints.contains(ep));
            if !kept && !still_used.contains(ep) {
                out.insert(Deletion::ReplyFrom {
                    ip: ep.0,
                    port: ep.1,
                });
            }
        }
    }
    for (name, now) in &new.ports {
        if now.endpoints.is_empty() {
            continue;
        }
        let had_none = old.ports.get(name).is_none_or(|p| p.endpoints.is_empty());
        if !had_none {
            continue;
        }
        for (ip, port) in &now.destinations {
            out.insert(Deletion::To {
                ip: *ip,
                port: *port,
            });
        }
        if let Some(port) = now.node_port {
            for family in [IpFamily::V4, IpFamily::V6] {
                if now.endpoints.iter().any(|(ip, _)| family.contains(*ip)) {
                    out.insert(Deletion::ToNodePort { family, port });
                }
            }
        }
    }
    out.into_iter().collect()
}

/// A conntrack deletion that failed: `conntrack` (or `nsenter` wrapping it) could not run, or
/// ran and failed.
pub type ConntrackError = strake_types::command::CommandError;

/// The seam to the kernel's connection tracking table.
pub trait Conntrack: Send + Sync {
    /// Deletes the entries `deletion` describes; none matching is not an error.
    fn delete(&self, deletion: &Deletion) -> Result<(), ConntrackError>;
}

/// The real [`Conntrack`]: runs the `conntrack` program, optionally inside a network namespace.
#[derive(Debug, Clone)]
pub struct ConntrackCommand {
    program: PathBuf,
    netns: Option<PathBuf>,
}

impl Default for ConntrackCommand {
    fn default() -> Self {
        Self::new()
    }
}

impl ConntrackCommand {
    /// Runs `conntrack` from the standard system paths in the caller's network namespace.
    pub fn new() -> Self {
        ConntrackCommand {
            program: PathBuf::from("conntrack"),
            netns: None,
        }
    }

    /// Runs `conntrack` inside the network namespace pinned at `path` (`nsenter --net=PATH`).
    pub fn in_netns(path: impl Into<PathBuf>) -> Self {
        ConntrackCommand {
            program: PathBuf::from("conntrack"),
            netns: Some(path.into()),
        }
    }

    /// Uses `program` instead of `conntrack` from `PATH`.
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }
}

impl Conntrack for ConntrackCommand {
    fn delete(&self, deletion: &Deletion) -> Result<(), ConntrackError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                let mut net = OsString::from("--net=");
                net.push(ns);
                cmd.arg(net).arg("--").arg(&self.program);
                cmd
            }
            None => Command::new(&self.program),
        };
        cmd.args(deletion.args())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C");
        let ran = strake_types::command::run(&mut cmd, None)?;
        // conntrack exits 1 when nothing matched; that is the common, successful case.
        if ran.status.success() || ran.stderr.contains("0 flow entries have been deleted") {
            return Ok(());
        }
        Err(ran.failed())
    }
}

/// Carries out `deletions`, logging failures (a failed cleanup never fails the sync: the
/// entries time out on their own). Returns how many failed.
pub fn clean(conntrack: &dyn Conntrack, deletions: &[Deletion]) -> usize {
    let mut failed = 0;
    for d in deletions {
        match conntrack.delete(d) {
            Ok(()) => tracing::debug!(deletion = ?d, "deleted stale UDP conntrack entries"),
            Err(e) => {
                failed += 1;
                tracing::warn!(deletion = ?d, error = %e, "cannot delete stale UDP conntrack entries");
            }
        }
    }
    failed
}

/// A fake [`Conntrack`] that records deletions.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct RecordingConntrack {
    pub deleted: std::sync::Mutex<Vec<Deletion>>,
}

#[cfg(test)]
impl RecordingConntrack {
    pub fn deleted(&self) -> Vec<Deletion> {
        self.deleted.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
impl Conntrack for RecordingConntrack {
    fn delete(&self, deletion: &Deletion) -> Result<(), ConntrackError> {
        if let Ok(mut d) = self.deleted.lock() {
            d.push(*deletion);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testutil::{ep, model_of, service, slice};

    fn udp(eps: &[(&str, bool)], node_port: bool) -> UdpState {
        let mut spec = json!({
            "clusterIP": "10.96.0.53", "clusterIPs": ["10.96.0.53"],
            "externalIPs": ["192.0.2.53"],
            "ports": [
                { "name": "dns", "port": 53, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
            ],
        });
        if node_port {
            spec["type"] = json!("NodePort");
            spec["ports"][0]["nodePort"] = json!(30053);
            spec["ports"][1]["nodePort"] = json!(30054);
        }
        let svc = service("kube-system", "dns", spec);
        let endpoints: Vec<_> = eps.iter().map(|(ip, r)| ep(ip, "node-b", *r)).collect();
        let s = slice(
            "kube-system",
            "dns",
            "dns-1",
            "IPv4",
            json!([
                { "name": "dns", "port": 5353, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 5353, "protocol": "TCP" },
            ]),
            json!(endpoints),
        );
        UdpState::of(&model_of(&[svc], &[s]))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_udp_ports_with_their_selected_endpoints() {
        let state = udp(&[("10.244.1.1", true), ("10.244.1.2", false)], false);
        assert_eq!(state.ports.len(), 1);
        let port = state.ports.values().next().unwrap();
        assert_eq!(
            port.endpoints,
            BTreeSet::from([(ip("10.244.1.1"), 5353)]),
            "a not-ready endpoint is not used while a ready one exists"
        );
        assert_eq!(
            port.destinations,
            BTreeSet::from([(ip("10.96.0.53"), 53), (ip("192.0.2.53"), 53)])
        );
    }

    #[test]
    fn removed_or_unready_endpoint_loses_its_flows() {
        let old = udp(&[("10.244.1.1", true), ("10.244.1.2", true)], false);
        let new = udp(&[("10.244.1.2", true), ("10.244.1.3", false)], false);
        assert_eq!(
            stale(&old, &new),
            [Deletion::ReplyFrom {
                ip: ip("10.244.1.1"),
                port: 5353
            }]
        );
        let unready = udp(&[("10.244.1.1", true), ("10.244.1.2", false)], false);
        assert_eq!(
            stale(&old, &unready),
            [Deletion::ReplyFrom {
                ip: ip("10.244.1.2"),
                port: 5353
            }]
        );
        // No change, nothing to do; a deleted Service loses all its endpoints' flows.
        assert!(stale(&old, &old).is_empty());
        assert_eq!(stale(&old, &UdpState::default()).len(), 2);
    }

    #[test]
    fn first_endpoint_clears_flows_to_the_service_and_node_port() {
        let none = udp(&[], true);
        let one = udp(&[("10.244.1.1", true)], true);
        assert_eq!(
            stale(&none, &one),
            [
                Deletion::To {
                    ip: ip("10.96.0.53"),
                    port: 53
                },
                Deletion::To {
                    ip: ip("192.0.2.53"),
                    port: 53
                },
                Deletion::ToNodePort {
                    family: IpFamily::V4,
                    port: 30053
                },
            ]
        );
        // A new Service that arrives with endpoints counts as going from none to some.
        assert_eq!(stale(&UdpState::default(), &one).len(), 3);
        // Scaling to zero: the last endpoint's flows go.
        assert_eq!(
            stale(&one, &none),
            [Deletion::ReplyFrom {
                ip: ip("10.244.1.1"),
                port: 5353
            }]
        );
    }

    #[test]
    fn endpoint_still_used_by_another_udp_port_is_kept() {
        let mut old = udp(&[("10.244.1.1", true)], false);
        let mut new = udp(&[], false);
        let other = ServicePortName {
            namespace: "default".into(),
            name: "other".into(),
            port_name: String::new(),
            protocol: Protocol::Udp,
        };
        let shared = UdpPort {
            endpoints: BTreeSet::from([(ip("10.244.1.1"), 5353)]),
            ..UdpPort::default()
        };
        old.ports.insert(other.clone(), shared.clone());
        new.ports.insert(other, shared);
        assert!(stale(&old, &new).is_empty());
    }

    #[test]
    fn conntrack_arguments() {
        let args = |d: Deletion| d.args().join(" ");
        assert_eq!(
            args(Deletion::ReplyFrom {
                ip: ip("10.244.1.1"),
                port: 5353
            }),
            "-D -p udp -f ipv4 --reply-src 10.244.1.1 --reply-port-src 5353"
        );
        assert_eq!(
            args(Deletion::To {
                ip: ip("fd00:96::a"),
                port: 53
            }),
            "-D -p udp -f ipv6 --orig-dst fd00:96::a --orig-port-dst 53"
        );
        assert_eq!(
            args(Deletion::ToNodePort {
                family: IpFamily::V4,
                port: 30053
            }),
            "-D -p udp -f ipv4 --orig-port-dst 30053"
        );
    }

    #[test]
    fn clean_counts_failures_and_keeps_going() {
        struct Failing;
        impl Conntrack for Failing {
            fn delete(&self, _: &Deletion) -> Result<(), ConntrackError> {
                Err(ConntrackError::spawn(
                    "conntrack",
                    std::io::Error::other("no"),
                ))
            }
        }
        let d = [
            Deletion::ToNodePort {
                family: IpFamily::V4,
                port: 1,
            },
            Deletion::ToNodePort {
                family: IpFamily::V6,
                port: 1,
            },
        ];
        assert_eq!(clean(&Failing, &d), 2);
        let rec = RecordingConntrack::default();
        assert_eq!(clean(&rec, &d), 0);
        assert_eq!(rec.deleted(), d);
    }
}
