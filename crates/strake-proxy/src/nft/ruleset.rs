//! The desired nftables state, as a pure function of the model and the configuration.
//!
//! One table per family (`ip strake-proxy`, `ip6 strake-proxy`), laid out after upstream
//! kube-proxy's nftables mode (same hooks, verdict maps and reject/drop sets) so that each
//! packet costs O(1) whatever the number of Services, but with endpoints held in data maps
//! so that a change costs O(1) in the kernel too:
//!
//! - `nat-prerouting` / `nat-output` jump to `services`, which looks up
//!   `daddr . l4proto . dport` in the verdict map `service-ips` (ClusterIPs, external IPs,
//!   LoadBalancer IPs) and, for `fib daddr type local`, `l4proto . dport` in `service-nodeports`.
//! - A plain service port (no session affinity, no `Local` traffic policy) has no chain of its
//!   own: its ClusterIP, external/LoadBalancer IP and NodePort elements jump to chains shared
//!   by all ports with the same number of endpoints N (`cluster-N`, `external-N`,
//!   `nodeport-N`), which mark for masquerade as needed and DNAT through the data map
//!   `endpoints` (`nodeport-endpoints`), keyed by the frontend and `numgen random mod N`.
//!   Endpoint changes are then element changes only, and the kernel's validation of the
//!   table, which walks every chain reachable from the base chains whenever a jump is
//!   added, stays proportional to the few shared chains instead of the number of Services.
//! - Other ports keep upstream's layout: the internal chain `svc-<port>` (cluster endpoints)
//!   or `local-<port>` (`internalTrafficPolicy: Local`), and `ext-<port>` for external
//!   destinations, which marks for masquerade (or, for `externalTrafficPolicy: Local`,
//!   keeps the source and uses the local chain). `svc-`/`local-` chains pick an endpoint at
//!   random (a short `numgen` rule ladder, or for more than [`DISPATCH_RULES_MAX`] endpoints
//!   `numgen random mod N vmap @eps-<chain>`), after checking the per-endpoint affinity sets
//!   `aff-<endpoint>` (sessionAffinity ClientIP); the endpoint chain `ep-<endpoint>` refreshes
//!   its affinity set and DNATs.
//! - Hairpin traffic (an endpoint reaching a Service and landing on itself) is masqueraded in
//!   `nat-postrouting` by looking up `saddr . daddr` in the set `hairpin`.
//! - Filter hooks reject (TCP reset, ICMP unreachable) traffic to services without endpoints
//!   (`no-endpoint-services`, `no-endpoint-nodeports`), drop it where only a `Local` policy lacks
//!   endpoints, reject unused ports of ClusterIPs (`cluster-ips`), and enforce
//!   loadBalancerSourceRanges before DNAT (`firewall-ips` -> `fw-<port>`).
//! - `nat-postrouting` masquerades packets carrying the masquerade mark.
//!
//! Every object belonging to a service port is named or keyed after it
//! (`<ns>/<name>/<proto>/<port>`, or its frontend addresses and ports), so a change to one
//! service touches only its own chains, sets and map elements, and the shared chain for a new
//! endpoint count.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::Config;
use crate::model::{Endpoint, IpFamily, Model, ServicePort, ServicePortName};
pub use crate::nft::objects::Chain;
use crate::nft::objects::{
    Addr, AddrValue, BaseChain, ChainType, Expr, Hook, Key, KeyPart, MarkOp, NamedPriority,
    Priority, Reject, Rule, SetData, SetDecl, Slot, Stmt, Value, Verdict,
};

/// Services with at most this many endpoints pick one with a rule ladder, larger ones with a
/// named verdict map (see `Builder::dispatch_rules`).
pub const DISPATCH_RULES_MAX: usize = 16;

/// The packet mark bit meaning "masquerade this" (upstream's default bit 14).
pub const MASQUERADE_MARK: u32 = 0x4000;

/// A set or map: its declaration and its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// The declaration.
    pub decl: SetDecl,
    /// Elements: key to value ([`Value::None`] for plain sets).
    pub elements: BTreeMap<Key, Value>,
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
        let mut rules = Rules::new(config, &model.node);
        for port in model.services.values() {
            rules.update(None, Some(port));
        }
        rules.materialize()
    }

    /// Both tables.
    pub fn tables(&self) -> [&Table; 2] {
        [&self.v4, &self.v6]
    }

    /// Both tables, borrowed.
    pub fn views(&self) -> [TableView<'_>; 2] {
        [self.v4.view(), self.v6.view()]
    }
}

impl Table {
    /// The table, borrowed.
    pub fn view(&self) -> TableView<'_> {
        TableView {
            family: self.family,
            chains: self.chains.iter().map(|(n, c)| (n.as_str(), c)).collect(),
            sets: self
                .sets
                .iter()
                .map(|(n, s)| (n.as_str(), s, s.elements.iter().collect()))
                .collect(),
        }
    }
}

/// One table's content borrowed from where it is kept, in name and key order, without a copy
/// of any rule or element: what a full sync writes.
pub struct TableView<'a> {
    /// Which family (and so which table) this is.
    pub family: IpFamily,
    /// Chains by name.
    pub chains: Vec<(&'a str, &'a Chain)>,
    /// Sets and maps by name: the declaration and the elements (the declaration's own are
    /// not read).
    pub sets: Vec<SetView<'a>>,
}

/// A set's name, declaration and elements (key, value), borrowed.
pub type SetView<'a> = (&'a str, &'a Set, Vec<(&'a Key, &'a Value)>);

/// The loopback addresses of a family, which NodePorts do not answer on.
fn loopback(family: IpFamily) -> AddrValue {
    match family {
        IpFamily::V4 => AddrValue::Net(ipnet::IpNet::V4(ipnet::Ipv4Net::new_assert(
            std::net::Ipv4Addr::new(127, 0, 0, 0),
            8,
        ))),
        IpFamily::V6 => AddrValue::Addr(std::net::Ipv6Addr::LOCALHOST.into()),
    }
}

fn goto_value(chain: &str) -> Value {
    Value::verdict(Verdict::goto(chain))
}

fn jump(chain: &str) -> Stmt {
    Stmt::Verdict(Verdict::jump(chain))
}

fn goto(chain: &str) -> Stmt {
    Stmt::Verdict(Verdict::goto(chain))
}

/// `ip saddr|daddr [!=] value`.
fn addr_cmp(addr: Addr, neq: bool, value: AddrValue) -> Stmt {
    Stmt::AddrCmp { addr, neq, value }
}

/// `ip saddr|daddr [!=] @set`.
fn in_set(addr: Addr, neq: bool, set: &str) -> Stmt {
    Stmt::Lookup {
        key: [Expr::Addr(addr)].into(),
        neq,
        set: set.into(),
    }
}

/// `ip daddr . meta l4proto . th dport vmap @map`.
fn frontend_vmap(map: &str) -> Stmt {
    Stmt::Vmap {
        key: Expr::FRONTEND.into(),
        map: map.into(),
    }
}

/// `meta l4proto . th dport vmap @map`.
fn port_vmap(map: &str) -> Stmt {
    Stmt::Vmap {
        key: [Expr::L4proto, Expr::Dport].into(),
        map: map.into(),
    }
}

fn interval_set(family: IpFamily) -> SetDecl {
    let mut decl = SetDecl::of_type([KeyPart::addr(family)], false);
    decl.flags.interval = true;
    decl
}

const SERVICE_IPS: &str = "service-ips";
const ENDPOINTS: &str = "endpoints";
const NODEPORT_ENDPOINTS: &str = "nodeport-endpoints";
const HAIRPIN: &str = "hairpin";
const NODEPORT_IPS: &str = "nodeport-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const FIREWALL_IPS: &str = "firewall-ips";
const CLUSTER_IPS: &str = "cluster-ips";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const REJECT_CHAIN: &str = "reject-chain";

struct Builder<'a> {
    family: IpFamily,
    config: &'a Config,
    frag: Fragment,
}

/// The sets every table has, whose elements come from many service ports.
const SHARED_SETS: [&str; 9] = [
    SERVICE_IPS,
    NO_ENDPOINT_SERVICES,
    FIREWALL_IPS,
    SERVICE_NODEPORTS,
    NO_ENDPOINT_NODEPORTS,
    CLUSTER_IPS,
    ENDPOINTS,
    NODEPORT_ENDPOINTS,
    HAIRPIN,
];

/// What one service port (or the fixed part of the table) contributes to a table: chains and
/// sets (its own, or shared ones such as `cluster-<n>`, which every user claims alike) and
/// elements of the [`SHARED_SETS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Fragment {
    chains: BTreeMap<String, Chain>,
    /// Chains shared by many ports, alike for all (`cluster-<n>`, ...): counted, not claimed.
    shared_chains: BTreeMap<String, Chain>,
    sets: BTreeMap<String, Set>,
    /// (index in [`SHARED_SETS`], key, value).
    elements: Vec<(usize, Key, Value)>,
}

/// Who claims an object: a service port, or [`fixed_owner`] for the fixed part.
type Owner = std::sync::Arc<ServicePortName>;

/// Sorts before every real service port (whose namespace is never empty).
fn fixed_owner() -> Owner {
    std::sync::Arc::new(ServicePortName {
        namespace: String::new(),
        name: String::new(),
        port_name: String::new(),
        protocol: crate::model::Protocol::Tcp,
    })
}

/// Claims on one object, sorted by owner: the first one's value is the object's (two Services
/// claiming the same address and port: the first by name wins, deterministically).
type ClaimList<T> = smallvec::SmallVec<[(Owner, T); 1]>;

fn claim<T>(list: &mut ClaimList<T>, owner: &Owner, value: T) {
    match list.binary_search_by(|(o, _)| o.cmp(owner)) {
        Ok(i) => list[i].1 = value,
        Err(i) => list.insert(i, (owner.clone(), value)),
    }
}

fn unclaim<T>(list: &mut ClaimList<T>, owner: &Owner) {
    if let Ok(i) = list.binary_search_by(|(o, _)| o.cmp(owner)) {
        list.remove(i);
    }
}

/// The claims of every owner on one table's objects, and what changed since the last
/// [`Claims::take_delta`]: the old value of every object touched since (first touch wins).
#[derive(Debug, Default)]
struct Claims {
    /// Most of the memory of the ruleset lies here (an endpoint map element per endpoint).
    elements: [foldhash::HashMap<Key, ClaimList<Value>>; SHARED_SETS.len()],
    chains: foldhash::HashMap<String, ClaimList<Chain>>,
    /// Shared chains and how many ports use each.
    shared_chains: foldhash::HashMap<String, (Chain, usize)>,
    sets: foldhash::HashMap<String, ClaimList<Set>>,
    touched_elements: [foldhash::HashMap<Key, Option<Value>>; SHARED_SETS.len()],
    touched_chains: foldhash::HashMap<String, Option<Chain>>,
    touched_sets: foldhash::HashMap<String, Option<Set>>,
    /// Skip the bookkeeping of touched objects (a full sync follows).
    untracked: bool,
}

fn first<T: Clone>(list: Option<&ClaimList<T>>) -> Option<T> {
    list.and_then(|l| l.first()).map(|(_, v)| v.clone())
}

impl Claims {
    /// The chain `name` as claimed now.
    fn chain_now(&self, name: &str) -> Option<Chain> {
        first(self.chains.get(name))
            .or_else(|| self.shared_chains.get(name).map(|(c, _)| c.clone()))
    }

    fn add(&mut self, owner: &Owner, frag: Fragment) {
        for (name, chain) in frag.shared_chains {
            match self.shared_chains.get_mut(&name) {
                Some((_, users)) => *users += 1,
                None => {
                    if !self.untracked {
                        self.touched_chains.entry(name.clone()).or_insert(None);
                    }
                    self.shared_chains.insert(name, (chain, 1));
                }
            }
        }
        let track = !self.untracked;
        for (name, chain) in frag.chains {
            if track {
                let old = first(self.chains.get(&name));
                self.touched_chains.entry(name.clone()).or_insert(old);
            }
            claim(self.chains.entry(name).or_default(), owner, chain);
        }
        for (name, set) in frag.sets {
            if track {
                let old = first(self.sets.get(&name));
                self.touched_sets.entry(name.clone()).or_insert(old);
            }
            claim(self.sets.entry(name).or_default(), owner, set);
        }
        for (i, key, value) in frag.elements {
            if track {
                let old = first(self.elements[i].get(&key));
                self.touched_elements[i].entry(key).or_insert(old);
            }
            claim(self.elements[i].entry(key).or_default(), owner, value);
        }
    }

    fn remove(&mut self, owner: &Owner, frag: &Fragment) {
        fn drop_claim<K, T: Clone>(
            map: &mut foldhash::HashMap<K, ClaimList<T>>,
            touched: Option<&mut foldhash::HashMap<K, Option<T>>>,
            name: &K,
            owner: &Owner,
        ) where
            K: Clone + std::hash::Hash + Eq,
        {
            let Some(list) = map.get_mut(name) else {
                return;
            };
            if let Some(touched) = touched {
                touched
                    .entry(name.clone())
                    .or_insert_with(|| list.first().map(|(_, v)| v.clone()));
            }
            unclaim(list, owner);
            if list.is_empty() {
                map.remove(name);
            }
        }
        let track = !self.untracked;
        for name in frag.chains.keys() {
            let touched = track.then_some(&mut self.touched_chains);
            drop_claim(&mut self.chains, touched, name, owner);
        }
        for name in frag.shared_chains.keys() {
            if let Some((chain, users)) = self.shared_chains.get_mut(name) {
                *users -= 1;
                if *users == 0 {
                    if track {
                        let chain = chain.clone();
                        self.touched_chains
                            .entry(name.clone())
                            .or_insert(Some(chain));
                    }
                    self.shared_chains.remove(name);
                }
            }
        }
        for name in frag.sets.keys() {
            let touched = track.then_some(&mut self.touched_sets);
            drop_claim(&mut self.sets, touched, name, owner);
        }
        for (i, key, _) in &frag.elements {
            let touched = track.then_some(&mut self.touched_elements[*i]);
            drop_claim(&mut self.elements[*i], touched, key, owner);
        }
    }

    /// Forgets what was touched (the whole table is about to be written anyway).
    fn discard_delta(&mut self) {
        self.touched_chains.clear();
        self.touched_sets.clear();
        for t in &mut self.touched_elements {
            t.clear();
        }
    }

    /// The whole table as claimed now.
    /// What [`Claims::materialize`] gives, borrowed.
    fn view(&self, family: IpFamily) -> TableView<'_> {
        // As in `materialize`: a shared chain wins over a claimed one of the same name.
        let chains: BTreeMap<&str, &Chain> = self
            .chains
            .iter()
            .filter_map(|(k, l)| Some((k.as_str(), &l.first()?.1)))
            .chain(self.shared_chains.iter().map(|(k, (c, _))| (k.as_str(), c)))
            .collect();
        let mut sets: Vec<SetView<'_>> = self
            .sets
            .iter()
            .filter_map(|(k, l)| {
                let set = &l.first()?.1;
                let elements = match SHARED_SETS.iter().position(|s| s == k) {
                    Some(i) => {
                        let mut elements: Vec<(&Key, &Value)> = self.elements[i]
                            .iter()
                            .filter_map(|(k, l)| Some((k, &l.first()?.1)))
                            .collect();
                        elements.sort_unstable_by_key(|(k, _)| *k);
                        elements
                    }
                    None => set.elements.iter().collect(),
                };
                Some((k.as_str(), set, elements))
            })
            .collect();
        sets.sort_unstable_by_key(|(name, _, _)| *name);
        TableView {
            family,
            chains: chains.into_iter().collect(),
            sets,
        }
    }

    fn materialize(&self, family: IpFamily) -> Table {
        let mut table = Table {
            family,
            chains: self
                .chains
                .iter()
                .filter_map(|(k, l)| Some((k.clone(), l.first()?.1.clone())))
                .chain(
                    self.shared_chains
                        .iter()
                        .map(|(k, (c, _))| (k.clone(), c.clone())),
                )
                .collect(),
            sets: self
                .sets
                .iter()
                .filter_map(|(k, l)| Some((k.clone(), l.first()?.1.clone())))
                .collect(),
        };
        for (i, name) in SHARED_SETS.iter().enumerate() {
            if let Some(set) = table.sets.get_mut(*name) {
                set.elements = self.elements[i]
                    .iter()
                    .filter_map(|(k, l)| Some((*k, l.first()?.1.clone())))
                    .collect();
            }
        }
        table
    }

    /// The objects touched since the last call, before (first) and now (second): two partial
    /// tables whose difference is the change. Shared sets whose elements changed appear in both
    /// with their declaration and only the touched elements.
    fn take_delta(&mut self, family: IpFamily) -> (Table, Table) {
        let empty = || Table {
            family,
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
        };
        /// Puts each touched object that changed, as it was and as it is, into `old` and `new`.
        fn changed<T: PartialEq>(
            touched: impl Iterator<Item = (String, Option<T>)>,
            now: impl Fn(&str) -> Option<T>,
            old: &mut BTreeMap<String, T>,
            new: &mut BTreeMap<String, T>,
        ) {
            for (name, before) in touched {
                let after = now(&name);
                if before == after {
                    continue;
                }
                if let Some(v) = before {
                    old.insert(name.clone(), v);
                }
                if let Some(v) = after {
                    new.insert(name, v);
                }
            }
        }
        let (mut old, mut new) = (empty(), empty());
        let touched_chains = std::mem::take(&mut self.touched_chains);
        changed(
            touched_chains.into_iter(),
            |name| self.chain_now(name),
            &mut old.chains,
            &mut new.chains,
        );
        let touched_sets = std::mem::take(&mut self.touched_sets);
        changed(
            touched_sets.into_iter(),
            |name| first(self.sets.get(name)),
            &mut old.sets,
            &mut new.sets,
        );
        for (i, touched) in self.touched_elements.iter_mut().enumerate() {
            let name = SHARED_SETS[i];
            for (key, before) in touched.drain() {
                let now = first(self.elements[i].get(&key));
                if before == now {
                    continue;
                }
                let Some(decl) = first(self.sets.get(name)) else {
                    continue;
                };
                if let Some(v) = before {
                    old.sets
                        .entry(name.to_string())
                        .or_insert_with(|| decl.clone())
                        .elements
                        .insert(key, v);
                }
                if let Some(v) = now {
                    new.sets
                        .entry(name.to_string())
                        .or_insert_with(|| decl.clone())
                        .elements
                        .insert(key, v);
                }
                // A set whose elements changed must be in both, so that the difference is one
                // of elements, not of sets.
                old.sets
                    .entry(name.to_string())
                    .or_insert_with(|| decl.clone());
                new.sets.entry(name.to_string()).or_insert(decl);
            }
        }
        (old, new)
    }
}

/// The desired ruleset kept up to date one service port at a time: each port's contribution
/// is a `Fragment`, claimed and unclaimed as the port changes, so that a change costs
/// in proportion to the ports it touches, not to the size of the ruleset.
#[derive(Debug)]
pub struct Rules {
    config: Config,
    node: crate::model::NodeInfo,
    claims: [Claims; 2],
}

impl Rules {
    /// The fixed part of both tables, for `node` (addresses and name) and `config`.
    pub fn new(config: &Config, node: &crate::model::NodeInfo) -> Rules {
        let mut rules = Rules {
            config: config.clone(),
            node: node.clone(),
            claims: [Claims::default(), Claims::default()],
        };
        let owner = fixed_owner();
        for (i, family) in [IpFamily::V4, IpFamily::V6].into_iter().enumerate() {
            let mut b = Builder::new(family, config);
            b.fixed(&node.ips);
            rules.claims[i].add(&owner, b.frag);
        }
        rules
    }

    /// The node these rules were built for.
    pub fn node(&self) -> &crate::model::NodeInfo {
        &self.node
    }

    fn fragment(&self, family: IpFamily, port: &ServicePort) -> Fragment {
        let mut b = Builder::new(family, &self.config);
        b.service(port, &self.node.name, &self.node.ips);
        b.frag
    }

    /// Replaces the contribution of a service port: `old` (as last given) by `new`.
    pub fn update(&mut self, old: Option<&ServicePort>, new: Option<&ServicePort>) {
        let Some(id) = old.or(new).map(|p| &p.id) else {
            return;
        };
        let owner: Owner = std::sync::Arc::new(id.clone());
        for (i, family) in [IpFamily::V4, IpFamily::V6].into_iter().enumerate() {
            if let Some(port) = old {
                let frag = self.fragment(family, port);
                self.claims[i].remove(&owner, &frag);
            }
            if let Some(port) = new {
                let frag = self.fragment(family, port);
                self.claims[i].add(&owner, frag);
            }
        }
    }

    /// Both tables as they stand.
    pub fn materialize(&self) -> Ruleset {
        Ruleset {
            v4: self.claims[0].materialize(IpFamily::V4),
            v6: self.claims[1].materialize(IpFamily::V6),
        }
    }

    /// Both tables as they stand, borrowed: [`Rules::materialize`] without the copy.
    pub fn views(&self) -> [TableView<'_>; 2] {
        [
            self.claims[0].view(IpFamily::V4),
            self.claims[1].view(IpFamily::V6),
        ]
    }

    /// Whether to keep track of changes for [`Rules::take_delta`]; off while building for a
    /// full sync, which needs none.
    pub fn set_tracking(&mut self, on: bool) {
        for c in &mut self.claims {
            c.untracked = !on;
        }
    }

    /// Forgets the changes since the last [`Rules::take_delta`] (before a full sync).
    pub fn discard_delta(&mut self) {
        for c in &mut self.claims {
            c.discard_delta();
        }
    }

    /// What changed since the last call: the touched objects before and after, as partial
    /// rulesets (see [`crate::nft::transaction::partial_transaction`]).
    pub fn take_delta(&mut self) -> (Ruleset, Ruleset) {
        let (old4, new4) = self.claims[0].take_delta(IpFamily::V4);
        let (old6, new6) = self.claims[1].take_delta(IpFamily::V6);
        (
            Ruleset { v4: old4, v6: old6 },
            Ruleset { v4: new4, v6: new6 },
        )
    }
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

impl<'a> Builder<'a> {
    fn new(family: IpFamily, config: &'a Config) -> Self {
        Builder {
            family,
            config,
            frag: Fragment::default(),
        }
    }

    fn chain(&mut self, name: impl Into<String>, rules: Vec<Rule>) {
        self.frag
            .chains
            .insert(name.into(), Chain { base: None, rules });
    }

    fn base_chain(
        &mut self,
        name: &str,
        kind: ChainType,
        hook: Hook,
        priority: Priority,
        rules: Vec<Rule>,
    ) {
        let base = BaseChain {
            kind,
            hook,
            priority,
        };
        self.frag.chains.insert(
            name.to_string(),
            Chain {
                base: Some(base),
                rules,
            },
        );
    }

    fn set(&mut self, name: impl Into<String>, decl: SetDecl) {
        self.frag.sets.insert(
            name.into(),
            Set {
                decl,
                elements: BTreeMap::new(),
            },
        );
    }

    /// Adds an element to one of the fragment's own sets, or claims one in a shared set.
    fn element(&mut self, set: &str, key: Key, value: Value) {
        if let Some(s) = self.frag.sets.get_mut(set) {
            s.elements.entry(key).or_insert(value);
        } else if let Some(i) = SHARED_SETS.iter().position(|s| *s == set) {
            self.frag.elements.push((i, key, value));
        }
    }

    /// What selects NodePort traffic (`--nodeport-addresses`): every local address but
    /// loopback, or those in the set `nodeport-ips` (filled here), or nothing (`None`).
    fn nodeport_match(&mut self, node_ips: &[IpAddr]) -> Option<Vec<Stmt>> {
        let family = self.family;
        let mut local = vec![
            Stmt::FibLocal(Addr::Destination),
            addr_cmp(Addr::Destination, true, loopback(family)),
        ];
        let crate::config::NodePortAddresses::Only { cidrs, primary } =
            &self.config.nodeport_addresses
        else {
            return Some(local);
        };
        let mut ranges: Vec<ipnet::IpNet> = cidrs
            .iter()
            .copied()
            .filter(|c| family.contains(c.addr()))
            .collect();
        if *primary
            && let Some(ip) = node_ips
                .iter()
                .copied()
                .find(|ip| family.contains(*ip) && !ip.is_loopback())
        {
            ranges.push(ipnet::IpNet::from(ip));
        }
        if ranges.iter().any(|r| r.prefix_len() == 0) {
            return Some(local);
        }
        if ranges.is_empty() {
            return None;
        }
        self.set(NODEPORT_IPS, interval_set(family));
        for range in outermost(ranges) {
            self.element(NODEPORT_IPS, Key::Prefix(range), Value::None);
        }
        local.push(in_set(Addr::Destination, false, NODEPORT_IPS));
        Some(local)
    }

    /// The chains, sets and maps every table has, whatever the Services.
    fn fixed(&mut self, node_ips: &[IpAddr]) {
        let family = self.family;
        let addr_type = KeyPart::addr(family);
        let addr_key = [addr_type, KeyPart::Proto, KeyPart::Service];
        let port_key = [KeyPart::Proto, KeyPart::Service];
        self.set(SERVICE_IPS, SetDecl::of_type(addr_key, true));
        self.set(NO_ENDPOINT_SERVICES, SetDecl::of_type(addr_key, true));
        self.set(FIREWALL_IPS, SetDecl::of_type(addr_key, true));
        self.set(SERVICE_NODEPORTS, SetDecl::of_type(port_key, true));
        self.set(NO_ENDPOINT_NODEPORTS, SetDecl::of_type(port_key, true));
        self.set(CLUSTER_IPS, SetDecl::of_type([addr_type], false));
        // The modulus in `typeof` only gives the key's type (see `dispatch_rules`).
        let target = SetData::Typeof([Expr::Addr(Addr::Destination), Expr::Dport].into());
        self.set(
            ENDPOINTS,
            SetDecl::of_typeof(
                [
                    Expr::Addr(Addr::Destination),
                    Expr::L4proto,
                    Expr::Dport,
                    Expr::Numgen(1),
                ],
                target.clone(),
            ),
        );
        self.set(
            NODEPORT_ENDPOINTS,
            SetDecl::of_typeof([Expr::L4proto, Expr::Dport, Expr::Numgen(1)], target),
        );
        self.set(HAIRPIN, SetDecl::of_type([addr_type, addr_type], false));

        let jump_to = |chain: &str| vec![Rule::from(Verdict::jump(chain))];
        let when_new = |chains: &[&str]| -> Vec<Rule> {
            chains
                .iter()
                .map(|c| Rule::new([Stmt::CtStateNew, jump(c)]))
                .collect()
        };
        use ChainType::{Filter, Nat};
        let dstnat = |offset| Priority::Named(NamedPriority::Dstnat, offset);
        self.base_chain(
            "nat-prerouting",
            Nat,
            Hook::Prerouting,
            dstnat(0),
            jump_to("services"),
        );
        self.base_chain(
            "nat-output",
            Nat,
            Hook::Output,
            Priority::Number(-100),
            jump_to("services"),
        );
        self.base_chain(
            "nat-postrouting",
            Nat,
            Hook::Postrouting,
            Priority::Named(NamedPriority::Srcnat, 0),
            jump_to("masquerading"),
        );
        // Source ranges are checked before DNAT, so at a more urgent priority.
        self.base_chain(
            "filter-prerouting",
            Filter,
            Hook::Prerouting,
            dstnat(-10),
            when_new(&["firewall-check"]),
        );
        self.base_chain(
            "filter-input",
            Filter,
            Hook::Input,
            Priority::Number(-110),
            when_new(&["nodeport-endpoints-check", "service-endpoints-check"]),
        );
        self.base_chain(
            "filter-forward",
            Filter,
            Hook::Forward,
            Priority::Number(-110),
            when_new(&["service-endpoints-check", "cluster-ips-check"]),
        );
        self.base_chain(
            "filter-output",
            Filter,
            Hook::Output,
            Priority::Number(-110),
            when_new(&["service-endpoints-check", "firewall-check"]),
        );
        // Unused ClusterIP ports are recognised after DNAT had its chance.
        self.base_chain(
            "filter-output-post-dnat",
            Filter,
            Hook::Output,
            Priority::Number(-90),
            when_new(&["cluster-ips-check"]),
        );

        self.chain(
            MARK_FOR_MASQUERADE,
            vec![Rule::new([Stmt::SetMark(MarkOp::Or, MASQUERADE_MARK)])],
        );
        self.chain(
            "masquerading",
            vec![
                // A pod reaching a Service and landing on itself (hairpin): its reply must
                // come back through the node.
                Rule::new([
                    Stmt::Lookup {
                        key: [Expr::Addr(Addr::Source), Expr::Addr(Addr::Destination)].into(),
                        neq: false,
                        set: HAIRPIN.into(),
                    },
                    Stmt::Masquerade { fully_random: true },
                ]),
                Rule::new([
                    Stmt::Mark {
                        mask: MASQUERADE_MARK,
                        neq: false,
                        value: 0,
                    },
                    Stmt::Verdict(Verdict::Return),
                ]),
                Rule::new([Stmt::SetMark(MarkOp::Xor, MASQUERADE_MARK)]),
                Rule::new([Stmt::Masquerade { fully_random: true }]),
            ],
        );
        self.chain(
            REJECT_CHAIN,
            vec![
                Rule::new([
                    Stmt::L4proto(crate::model::Protocol::Tcp),
                    Stmt::Reject(Reject::TcpReset),
                ]),
                Rule::new([Stmt::Reject(Reject::HostUnreachable)]),
            ],
        );
        let nodeports = self.nodeport_match(node_ips);
        let mut services = vec![Rule::new([frontend_vmap(SERVICE_IPS)])];
        if let Some(m) = &nodeports {
            let mut rule = m.clone();
            rule.push(port_vmap(SERVICE_NODEPORTS));
            services.push(Rule(rule));
        }
        self.chain("services", services);
        self.chain(
            "firewall-check",
            vec![Rule::new([frontend_vmap(FIREWALL_IPS)])],
        );
        self.chain(
            "service-endpoints-check",
            vec![Rule::new([frontend_vmap(NO_ENDPOINT_SERVICES)])],
        );
        self.chain(
            "nodeport-endpoints-check",
            nodeports
                .into_iter()
                .map(|mut m| {
                    m.push(port_vmap(NO_ENDPOINT_NODEPORTS));
                    Rule(m)
                })
                .collect(),
        );
        self.chain(
            "cluster-ips-check",
            vec![
                Rule::new([
                    in_set(Addr::Destination, false, CLUSTER_IPS),
                    Stmt::L4proto(crate::model::Protocol::Tcp),
                    Stmt::Reject(Reject::TcpReset),
                ]),
                Rule::new([
                    in_set(Addr::Destination, false, CLUSTER_IPS),
                    Stmt::Reject(Reject::PortUnreachable),
                ]),
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
        let protocol = svc.id.protocol;
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
        let no_endpoint_verdict = Value::verdict(if sel.has_any {
            Verdict::Drop
        } else {
            Verdict::goto(REJECT_CHAIN)
        });
        let lb_ips: Vec<IpAddr> = svc
            .load_balancer_ips
            .iter()
            .copied()
            .filter(|ip| family.contains(*ip))
            .collect();
        if is_plain(svc) {
            self.plain_service(
                svc,
                &cluster_ips,
                &lb_ips,
                &sel.cluster,
                &no_endpoint_verdict,
            );
            self.source_ranges(svc, &lb_ips, &base, node_ips);
            return;
        }

        // Endpoint chains (shared by the cluster and local chains) and affinity sets.
        let mut endpoints: Vec<&Endpoint> = sel.cluster.clone();
        for ep in &sel.local {
            if !endpoints.contains(ep) {
                endpoints.push(ep);
            }
        }
        for ep in &endpoints {
            self.hairpin(ep);
            let suffix = endpoint_suffix(ep);
            let mut rules = Vec::new();
            if let Some(timeout) = svc.affinity_timeout_secs {
                let set = format!("aff-{base}__{suffix}");
                let mut decl = SetDecl::of_type([KeyPart::addr(family)], false);
                decl.flags.dynamic = true;
                decl.flags.timeout = true;
                decl.timeout_secs = Some(timeout);
                rules.push(Rule::new([Stmt::Update {
                    set: set.as_str().into(),
                    key: Addr::Source,
                }]));
                self.set(set, decl);
            }
            rules.push(Rule::new([
                Stmt::L4proto(protocol),
                Stmt::DnatTo(ep.ip, ep.port),
            ]));
            self.chain(format!("ep-{base}__{suffix}"), rules);
        }

        // ClusterIP masquerading lives in the internal chain, guarded by the ClusterIP
        // itself, because external traffic passes through the same chain.
        let mut masq_rules = Vec::new();
        for cip in &cluster_ips {
            let matcher = [
                addr_cmp(Addr::Destination, false, AddrValue::Addr(*cip)),
                Stmt::Dport(protocol, svc.port),
            ];
            if self.config.masquerade_all {
                masq_rules.push(Rule::new([
                    matcher[0].clone(),
                    matcher[1].clone(),
                    jump(MARK_FOR_MASQUERADE),
                ]));
            } else if let Some(cidr) = self.cluster_cidr() {
                masq_rules.push(Rule::new([
                    matcher[0].clone(),
                    matcher[1].clone(),
                    addr_cmp(Addr::Source, true, AddrValue::Net(cidr)),
                    jump(MARK_FOR_MASQUERADE),
                ]));
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
            let key = Key::AddrProtoPort(*cip, protocol, svc.port);
            match internal_chain {
                Some(chain) => self.element(SERVICE_IPS, key, goto_value(chain)),
                None => self.element(NO_ENDPOINT_SERVICES, key, no_endpoint_verdict.clone()),
            }
            self.element(CLUSTER_IPS, Key::Addr(*cip), Value::None);
        }

        if !svc.externally_accessible() {
            return;
        }
        if external_has_endpoints {
            let mut rules = Vec::new();
            if svc.external_local() {
                // Pods reaching an external address get the internal behaviour.
                if let (Some(cidr), Some(chain)) = (self.cluster_cidr(), internal_chain) {
                    rules.push(Rule::new([
                        addr_cmp(Addr::Source, false, AddrValue::Net(cidr)),
                        goto(chain),
                    ]));
                }
                // The node itself has a local source address that the endpoint could not
                // answer to: masquerade it and use any endpoint.
                let local_target = if has_cluster_chain {
                    &svc_chain
                } else {
                    &local_chain
                };
                rules.push(Rule::new([
                    Stmt::FibLocal(Addr::Source),
                    jump(MARK_FOR_MASQUERADE),
                ]));
                rules.push(Rule::new([
                    Stmt::FibLocal(Addr::Source),
                    goto(local_target),
                ]));
                rules.push(Rule::new([goto(&local_chain)]));
            } else {
                rules.push(Rule::new([jump(MARK_FOR_MASQUERADE)]));
                rules.push(Rule::new([goto(&svc_chain)]));
            }
            self.chain(ext_chain.clone(), rules);
        }
        let external_verdict = if external_has_endpoints {
            goto_value(&ext_chain)
        } else {
            no_endpoint_verdict.clone()
        };
        let external_map = if external_has_endpoints {
            SERVICE_IPS
        } else {
            NO_ENDPOINT_SERVICES
        };
        for ip in svc
            .external_ips
            .iter()
            .copied()
            .filter(|ip| family.contains(*ip))
            .chain(lb_ips.iter().copied())
        {
            let key = Key::AddrProtoPort(ip, protocol, svc.port);
            self.element(external_map, key, external_verdict.clone());
        }
        if let Some(node_port) = svc.node_port {
            let key = Key::ProtoPort(protocol, node_port);
            let map = if external_has_endpoints {
                SERVICE_NODEPORTS
            } else {
                NO_ENDPOINT_NODEPORTS
            };
            self.element(map, key, external_verdict);
        }
        self.source_ranges(svc, &lb_ips, &base, node_ips);
    }

    /// loadBalancerSourceRanges: checked before DNAT, for the LB IPs only.
    fn source_ranges(
        &mut self,
        svc: &ServicePort,
        lb_ips: &[IpAddr],
        base: &str,
        node_ips: &[IpAddr],
    ) {
        let family = self.family;
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
            let allowed = outermost(allowed);
            let fw_chain = format!("fw-{base}");
            // A named set, not an anonymous one (see `dispatch_rules`).
            self.set(fw_chain.clone(), interval_set(family));
            for range in allowed {
                self.element(&fw_chain, Key::Prefix(range), Value::None);
            }
            self.chain(
                fw_chain.clone(),
                vec![Rule::new([
                    in_set(Addr::Source, true, &fw_chain),
                    Stmt::Verdict(Verdict::Drop),
                ])],
            );
            for ip in lb_ips {
                let key = Key::AddrProtoPort(*ip, svc.id.protocol, svc.port);
                self.element(FIREWALL_IPS, key, goto_value(&fw_chain));
            }
        }
    }

    /// A service port without session affinity or `Local` traffic policies: no chains of its
    /// own, only map elements. Each frontend (ClusterIP, external or LoadBalancer IP, NodePort)
    /// maps to a chain shared by every service port with the same number of endpoints
    /// (`cluster-<n>`, `external-<n>`, `nodeport-<n>`), which picks slot
    /// `numgen random mod n` of the frontend in `endpoints` (`nodeport-endpoints`) and DNATs
    /// to it. An endpoint change is then a change of map elements only, and the kernel's
    /// validation of the table (done whenever a jump or goto is added, and walking every chain
    /// reachable from the base chains) stays as small as the number of shared chains.
    fn plain_service(
        &mut self,
        svc: &ServicePort,
        cluster_ips: &[IpAddr],
        lb_ips: &[IpAddr],
        endpoints: &[&Endpoint],
        no_endpoint_verdict: &Value,
    ) {
        let protocol = svc.id.protocol;
        let n = endpoints.len();
        for ep in endpoints {
            self.hairpin(ep);
        }
        let frontend = |b: &mut Self, kind: Shared, map: &str, key: Key| {
            if n == 0 {
                let no_endpoints = if kind == Shared::NodePort {
                    NO_ENDPOINT_NODEPORTS
                } else {
                    NO_ENDPOINT_SERVICES
                };
                b.element(no_endpoints, key, no_endpoint_verdict.clone());
                return;
            }
            let chain = b.shared_chain(kind, n);
            let verdicts = if kind == Shared::NodePort {
                SERVICE_NODEPORTS
            } else {
                SERVICE_IPS
            };
            // Should another port win this frontend, its own slots win too; ours beyond its
            // count stay unused.
            for (slot, ep) in endpoints.iter().enumerate() {
                let slot = Slot(slot as u32);
                let slot_key = match &key {
                    Key::AddrProtoPort(ip, p, port) => Key::AddrProtoPortSlot(*ip, *p, *port, slot),
                    Key::ProtoPort(p, port) => Key::ProtoPortSlot(*p, *port, slot),
                    _ => continue,
                };
                b.element(map, slot_key, Value::AddrPort(ep.ip, ep.port));
            }
            b.element(verdicts, key, goto_value(&chain));
        };
        for cip in cluster_ips {
            let key = Key::AddrProtoPort(*cip, protocol, svc.port);
            frontend(self, Shared::Cluster, ENDPOINTS, key);
            self.element(CLUSTER_IPS, Key::Addr(*cip), Value::None);
        }
        if !svc.externally_accessible() {
            return;
        }
        let family = self.family;
        for ip in svc
            .external_ips
            .iter()
            .copied()
            .filter(|ip| family.contains(*ip))
            .chain(lb_ips.iter().copied())
        {
            let key = Key::AddrProtoPort(ip, protocol, svc.port);
            frontend(self, Shared::External, ENDPOINTS, key);
        }
        if let Some(node_port) = svc.node_port {
            let key = Key::ProtoPort(protocol, node_port);
            frontend(self, Shared::NodePort, NODEPORT_ENDPOINTS, key);
        }
    }

    /// The shared dispatch chain of `kind` for `n` endpoints, created on first use.
    fn shared_chain(&mut self, kind: Shared, n: usize) -> String {
        let name = format!("{}-{n}", kind.prefix());
        if self.frag.shared_chains.contains_key(&name) {
            return name;
        }
        let mut rules = Vec::new();
        match kind {
            // Pods reaching a ClusterIP keep their source; anything else is masqueraded
            // (everything with --masquerade-all).
            Shared::Cluster => {
                if self.config.masquerade_all {
                    rules.push(Rule::new([jump(MARK_FOR_MASQUERADE)]));
                } else if let Some(cidr) = self.cluster_cidr() {
                    rules.push(Rule::new([
                        addr_cmp(Addr::Source, true, AddrValue::Net(cidr)),
                        jump(MARK_FOR_MASQUERADE),
                    ]));
                }
            }
            Shared::External | Shared::NodePort => {
                rules.push(Rule::new([jump(MARK_FOR_MASQUERADE)]));
            }
        }
        let slot = Expr::Numgen(n as u32);
        rules.push(Rule::new([match kind {
            Shared::Cluster | Shared::External => Stmt::DnatMap {
                key: [
                    Expr::Addr(Addr::Destination),
                    Expr::L4proto,
                    Expr::Dport,
                    slot,
                ]
                .into(),
                map: ENDPOINTS.into(),
            },
            Shared::NodePort => Stmt::DnatMap {
                key: [Expr::L4proto, Expr::Dport, slot].into(),
                map: NODEPORT_ENDPOINTS.into(),
            },
        }]));
        self.frag
            .shared_chains
            .insert(name.clone(), Chain { base: None, rules });
        name
    }

    /// Traffic from an endpoint to a Service that lands on the same endpoint is masqueraded
    /// (`masquerading` looks up source and destination in this set). Only an endpoint on this
    /// node (or of unknown node) can send such traffic through this node: elsewhere its own
    /// node does the DNAT.
    fn hairpin(&mut self, ep: &Endpoint) {
        if ep
            .node_name
            .as_deref()
            .is_some_and(|n| n != self.config.node_name)
        {
            return;
        }
        self.element(HAIRPIN, Key::AddrTwice(ep.ip), Value::None);
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
        mut rules: Vec<Rule>,
    ) -> Vec<Rule> {
        if svc.affinity_timeout_secs.is_some() {
            for ep in endpoints {
                let suffix = endpoint_suffix(ep);
                rules.push(Rule::new([
                    in_set(Addr::Source, false, &format!("aff-{base}__{suffix}")),
                    goto(&format!("ep-{base}__{suffix}")),
                ]));
            }
        }
        if endpoints.len() <= DISPATCH_RULES_MAX {
            let n = endpoints.len();
            for (i, ep) in endpoints.iter().enumerate() {
                let target = goto(&format!("ep-{base}__{}", endpoint_suffix(ep)));
                if i + 1 == n {
                    rules.push(Rule::new([target]));
                } else {
                    let modulus = (n - i) as u32;
                    rules.push(Rule::new([Stmt::Numgen { modulus, value: 0 }, target]));
                }
            }
            return rules;
        }
        let map = format!("eps-{chain}");
        // The modulus in `typeof` only gives the key's type; fixed so that scaling does not
        // change the declaration.
        self.set(
            map.clone(),
            SetDecl::of_typeof([Expr::Numgen(1)], SetData::Verdict),
        );
        for (i, ep) in endpoints.iter().enumerate() {
            let target = format!("ep-{base}__{}", endpoint_suffix(ep));
            self.element(&map, Key::Slot(Slot(i as u32)), goto_value(&target));
        }
        rules.push(Rule::new([Stmt::Vmap {
            key: [Expr::Numgen(endpoints.len() as u32)].into(),
            map: map.into(),
        }]));
        rules
    }
}

/// The ranges of `ranges` not inside another one: interval sets refuse overlapping elements.
fn outermost(mut ranges: Vec<ipnet::IpNet>) -> Vec<ipnet::IpNet> {
    ranges.sort_by_key(|r| (r.prefix_len(), r.addr()));
    ranges.dedup();
    ranges
        .iter()
        .enumerate()
        .filter(|(i, r)| !ranges[..*i].iter().any(|outer| outer.contains(*r)))
        .map(|(_, r)| *r)
        .collect()
}

/// Kinds of shared dispatch chain (see `Builder::plain_service`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shared {
    /// ClusterIPs: `cluster-<n>`.
    Cluster,
    /// External and LoadBalancer IPs: `external-<n>`.
    External,
    /// NodePorts: `nodeport-<n>`.
    NodePort,
}

impl Shared {
    fn prefix(self) -> &'static str {
        match self {
            Shared::Cluster => "cluster",
            Shared::External => "external",
            Shared::NodePort => "nodeport",
        }
    }
}

/// Whether a service port needs no chains of its own: no session affinity (which needs
/// per-endpoint affinity sets) and no `Local` traffic policy (whose traffic depends on where
/// it comes from).
fn is_plain(svc: &ServicePort) -> bool {
    svc.affinity_timeout_secs.is_none() && !svc.internal_policy_local && !svc.external_local()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::nft::objects::Syntax as _;
    use crate::testutil::{NODE, config, ep, model_of, service, simple, slice};

    /// The rules of a chain, rendered.
    fn rules(t: &Table, chain: &str) -> Vec<String> {
        t.chains
            .get(chain)
            .unwrap_or_else(|| {
                panic!(
                    "no chain {chain} in {:?}",
                    t.chains.keys().collect::<Vec<_>>()
                )
            })
            .rules
            .iter()
            .map(|r| r.text(t.family).to_string())
            .collect()
    }

    /// An element's value, rendered, found by its key's text.
    fn elem(t: &Table, set: &str, key: &str) -> Elem {
        Elem(
            t.sets[set]
                .elements
                .iter()
                .find(|(k, _)| k.to_string() == key)
                .map(|(_, v)| v.to_string()),
        )
    }

    /// What [`elem`] found, comparable with `Some("text")`.
    #[derive(Debug)]
    struct Elem(Option<String>);

    impl PartialEq<Option<&str>> for Elem {
        fn eq(&self, other: &Option<&str>) -> bool {
            self.0.as_deref() == *other
        }
    }

    /// A set's keys, rendered.
    fn keys(t: &Table, set: &str) -> Vec<String> {
        t.sets[set].elements.keys().map(|k| k.to_string()).collect()
    }

    /// A shared dispatch chain: `cluster-<n>`, `external-<n>` or `nodeport-<n>`.
    fn is_shared(chain: &str) -> bool {
        chain.split_once('-').is_some_and(|(kind, n)| {
            ["cluster", "external", "nodeport"].contains(&kind) && n.parse::<usize>().is_ok()
        })
    }

    /// A claimed element costs its hash table slot and nothing on the heap (bar a verdict):
    /// the maps hold one per endpoint.
    #[test]
    fn claimed_elements_are_small() {
        assert!(std::mem::size_of::<(Key, ClaimList<Value>)>() <= 72);
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
            Some("goto cluster-2")
        );
        assert_eq!(elem(t, CLUSTER_IPS, "10.96.0.10"), Some(""));
        assert_eq!(
            elem(t, ENDPOINTS, "10.96.0.10 . tcp . 80 . 0"),
            Some("10.244.1.1 . 8080")
        );
        assert_eq!(
            elem(t, ENDPOINTS, "10.96.0.10 . tcp . 80 . 1"),
            Some("10.244.1.2 . 8080")
        );
        assert_eq!(t.sets[ENDPOINTS].elements.len(), 2);
        assert_eq!(
            rules(t, "cluster-2"),
            [
                "ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @endpoints",
            ]
        );
        // The endpoints run on another node: no hairpin traffic can come through this one.
        assert!(t.sets[HAIRPIN].elements.is_empty());
        assert_eq!(
            rules(t, "masquerading")[0],
            "ip saddr . ip daddr @hairpin masquerade fully-random"
        );
        // No chain of its own: an endpoint change is a change of map elements only.
        assert!(!t.chains.keys().any(|c| c.contains("web")));
        // A v4-only Service has nothing in the v6 table but the fixed objects.
        assert!(rs.v6.sets.values().all(|s| s.elements.is_empty()));
        assert!(!rs.v6.chains.keys().any(|c| is_shared(c)));
    }

    #[test]
    fn local_endpoints_and_those_of_unknown_node_are_hairpin_candidates() {
        let svc = service(
            "default",
            "web",
            json!({ "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] }),
        );
        let sl = slice(
            "default",
            "web",
            "web-1",
            "IPv4",
            json!([{ "port": 80 }]),
            json!([
                ep("10.244.1.1", NODE, true),
                ep("10.244.1.2", "node-b", true),
                { "addresses": ["10.244.1.3"] },
            ]),
        );
        let rs = Ruleset::build(&model_of(&[svc], &[sl]), &config());
        let hairpin = keys(&rs.v4, HAIRPIN);
        assert_eq!(
            hairpin,
            ["10.244.1.1 . 10.244.1.1", "10.244.1.3 . 10.244.1.3"]
        );
    }

    #[test]
    fn services_with_the_same_endpoint_count_share_one_chain() {
        let (a, sa) = simple("default", "a", "10.96.0.10", &["10.244.1.1", "10.244.1.2"]);
        let (b, sb) = simple("default", "b", "10.96.0.11", &["10.244.2.1", "10.244.2.2"]);
        let (c, sc) = simple("default", "c", "10.96.0.12", &["10.244.3.1"]);
        let rs = Ruleset::build(&model_of(&[a, b, c], &[sa, sb, sc]), &config());
        let t = &rs.v4;
        assert_eq!(
            elem(t, SERVICE_IPS, "10.96.0.11 . tcp . 80"),
            Some("goto cluster-2")
        );
        assert_eq!(
            elem(t, SERVICE_IPS, "10.96.0.12 . tcp . 80"),
            Some("goto cluster-1")
        );
        let shared: Vec<&String> = t.chains.keys().filter(|c| is_shared(c)).collect();
        assert_eq!(shared, ["cluster-1", "cluster-2"]);
    }

    #[test]
    fn many_endpoints_are_slots_of_one_map() {
        let ips: Vec<String> = (1..=40).map(|i| format!("10.244.1.{i}")).collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let (svc, sl) = simple("default", "big", "10.96.0.11", &refs);
        let rs = Ruleset::build(&model_of(&[svc], &[sl]), &config());
        let t = &rs.v4;
        assert_eq!(
            rules(t, "cluster-40")[1],
            "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 40 map @endpoints"
        );
        assert_eq!(t.sets[ENDPOINTS].elements.len(), 40);
        assert_eq!(
            elem(t, ENDPOINTS, "10.96.0.11 . tcp . 80 . 39"),
            Some("10.244.1.40 . 8080")
        );
    }

    #[test]
    fn many_endpoints_with_affinity_are_picked_through_a_named_map() {
        let ips: Vec<String> = (1..=DISPATCH_RULES_MAX + 1)
            .map(|i| format!("10.244.1.{i}"))
            .collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let (mut svc, sl) = simple("default", "big", "10.96.0.11", &refs);
        svc.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        let rs = Ruleset::build(&model_of(&[svc], &[sl]), &config());
        let t = &rs.v4;
        let n = DISPATCH_RULES_MAX + 1;
        let chain_rules = rules(t, "svc-default/big/tcp/http");
        assert_eq!(
            chain_rules.last().unwrap(),
            &format!("numgen random mod {n} vmap @eps-svc-default/big/tcp/http")
        );
        let eps = &t.sets["eps-svc-default/big/tcp/http"];
        assert!(eps.decl.is_map());
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
        assert_eq!(rules(&rs.v4, "cluster-1")[0], "jump mark-for-masquerade");
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
            Some("goto nodeport-1")
        );
        assert_eq!(
            elem(t, NODEPORT_ENDPOINTS, "tcp . 30080 . 0"),
            Some("10.244.1.1 . 8080")
        );
        assert_eq!(
            rules(t, "nodeport-1"),
            [
                "jump mark-for-masquerade",
                "dnat ip to meta l4proto . th dport . numgen random mod 1 map @nodeport-endpoints",
            ]
        );
        assert_eq!(
            elem(t, SERVICE_IPS, "192.0.2.5 . tcp . 80"),
            Some("goto external-1")
        );
        assert_eq!(
            elem(t, ENDPOINTS, "192.0.2.5 . tcp . 80 . 0"),
            Some("10.244.1.1 . 8080")
        );
        assert_eq!(
            rules(t, "external-1"),
            [
                "jump mark-for-masquerade",
                "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 1 map @endpoints",
            ]
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
    fn nodeport_addresses_select_the_addresses_of_node_ports() {
        let rs = nodeport("Cluster", "node-b");
        assert_eq!(
            rules(&rs.v4, "services")[1],
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
        );
        assert!(!rs.v4.sets.contains_key(NODEPORT_IPS));

        let mut cfg = config();
        cfg.nodeport_addresses = crate::config::NodePortAddresses::Only {
            cidrs: vec![
                "192.168.0.0/16".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap(),
            ],
            primary: true,
        };
        let node = crate::model::NodeInfo {
            name: NODE.into(),
            ips: vec!["10.0.0.7".parse().unwrap()],
            zone: None,
        };
        let mut rules_ = Rules::new(&cfg, &node);
        let (svc, sl) = simple("default", "web", "10.96.0.10", &["10.244.1.1"]);
        for port in model_of(&[svc], &[sl]).services.values() {
            rules_.update(None, Some(port));
        }
        let rs = rules_.materialize();
        let matcher = "fib daddr type local ip daddr != 127.0.0.0/8 ip daddr @nodeport-ips";
        assert_eq!(
            rules(&rs.v4, "services")[1],
            format!("{matcher} meta l4proto . th dport vmap @service-nodeports")
        );
        assert_eq!(
            rules(&rs.v4, "nodeport-endpoints-check"),
            [format!(
                "{matcher} meta l4proto . th dport vmap @no-endpoint-nodeports"
            )]
        );
        let ips = keys(&rs.v4, NODEPORT_IPS);
        assert_eq!(ips, ["10.0.0.7/32", "192.168.0.0/16"]);
        // No IPv6 address is selected: no IPv6 NodePorts at all.
        assert_eq!(rules(&rs.v6, "services").len(), 1);
        assert!(rules(&rs.v6, "nodeport-endpoints-check").is_empty());
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
            t.sets[set].decl.text(t.family).to_string(),
            "type ipv4_addr ; flags dynamic,timeout ; timeout 30s ;"
        );
        assert_eq!(
            rules(t, "svc-default/sticky/tcp/80")[1],
            format!("ip saddr @{set} goto ep-default/sticky/tcp/80__10.244.1.1/80")
        );
        assert_eq!(
            rules(t, "ep-default/sticky/tcp/80__10.244.1.1/80"),
            [
                format!("update @{set} {{ ip saddr }}"),
                "meta l4proto tcp dnat to 10.244.1.1:80".to_string(),
            ]
        );
        assert!(t.sets[HAIRPIN].elements.is_empty());
    }

    #[test]
    fn a_full_script_from_the_claims_is_the_one_from_a_copy_of_them() {
        let ips: Vec<String> = (1..=DISPATCH_RULES_MAX + 1)
            .map(|i| format!("10.244.1.{i}"))
            .collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let (mut big, big_slice) = simple("default", "big", "10.96.0.11", &refs);
        big.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        let (small, small_slice) = simple("default", "small", "10.96.0.12", &["10.244.2.1"]);
        let (lb, lb_slice) = crate::testutil::local_load_balancer();
        let model = model_of(&[big, small, lb], &[big_slice, small_slice, lb_slice]);
        let mut rules = Rules::new(&config(), &model.node);
        for port in model.services.values() {
            rules.update(None, Some(port));
        }
        let copied = crate::nft::transaction::full_script(&rules.materialize());
        assert!(copied.contains("eps-svc-default/big/tcp/http") && copied.contains("30081"));
        assert_eq!(
            crate::nft::transaction::full_script_of(&rules.views()),
            copied
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
            Some("goto external-1")
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
            Some("goto cluster-1")
        );
        assert_eq!(
            elem(&rs.v6, ENDPOINTS, "fd00:96::9 . tcp . 80 . 0"),
            Some("fd00:244::1 . 80")
        );
        assert_eq!(
            rules(&rs.v6, "cluster-1"),
            [
                "ip6 saddr != fd00:244::/64 jump mark-for-masquerade",
                "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 1 map @endpoints",
            ]
        );
        assert!(rs.v6.sets[HAIRPIN].elements.is_empty());
        assert_eq!(
            elem(&rs.v4, SERVICE_IPS, "10.96.0.9 . tcp . 80"),
            Some("goto cluster-1")
        );
    }

    #[test]
    fn an_endpoint_change_touches_only_that_services_elements() {
        let (a, sa) = simple("default", "a", "10.96.0.1", &["10.244.1.1"]);
        let (b, sb) = simple("default", "b", "10.96.0.2", &["10.244.2.1", "10.244.2.2"]);
        let before = Ruleset::build(
            &model_of(&[a.clone(), b.clone()], &[sa.clone(), sb]),
            &config(),
        );
        let (_, sb2) = simple("default", "b", "10.96.0.2", &["10.244.2.1", "10.244.2.3"]);
        let after = Ruleset::build(&model_of(&[a, b], &[sa, sb2]), &config());
        // Same chains: the kernel has no rule or jump to add, only elements.
        assert_eq!(before.v4.chains, after.v4.chains);
        let mut changed = Vec::new();
        for (name, set) in &after.v4.sets {
            let old = &before.v4.sets[name];
            assert_eq!(old.decl, set.decl);
            for (k, v) in &set.elements {
                if old.elements.get(k) != Some(v) {
                    changed.push(format!("{name}: +{k}"));
                }
            }
            for k in old.elements.keys() {
                if !set.elements.contains_key(k) {
                    changed.push(format!("{name}: -{k}"));
                }
            }
        }
        assert_eq!(changed, ["endpoints: +10.96.0.2 . tcp . 80 . 1"]);
    }
}
