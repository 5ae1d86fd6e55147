//! What the operator decides: flags and config file, in one struct.

use ipnet::IpNet;

/// The proxy's configuration (upstream flag names in the field docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// This node's name (`--hostname-override`); endpoints with this `nodeName` are local.
    pub node_name: String,
    /// Pod CIDRs (`--cluster-cidr`, one per family); ClusterIP traffic from outside them is
    /// masqueraded. Empty: only hairpin and external traffic is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs (`--masquerade-all`).
    pub masquerade_all: bool,
}
