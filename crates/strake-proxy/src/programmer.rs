//! The sync pipeline from API objects to the kernel, kept incremental: a sync costs in
//! proportion to what changed, not to the number of Services.
//!
//! The [`Programmer`] remembers, by namespace and name, the objects it last saw (a store hands
//! out a new `Arc` for every change, so identity tells a changed object) and the service ports
//! it derived from them. A sync is given either every object ([`Programmer::sync`]: the first
//! one, after a relist, on the long period) or only the objects that changed
//! ([`Programmer::sync_changed`]: what the watches reported), re-derives only the Services
//! whose Service or EndpointSlice objects changed, replaces their ports' contributions in
//! [`Rules`], and sends the kernel the difference of the touched objects alone. A full sync
//! (the first one, after a failure, on the long period, or when the node's name or addresses
//! change) writes the whole ruleset.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;

use crate::config::Config;
use crate::model::{
    self, Model, Protocol, ServiceObject, ServicePort, ServicePortName, SliceObject, Warning,
};
use crate::nft::Nft;
use crate::nft::ruleset::Rules;
use crate::nft::transaction::{SyncError, SyncReport, apply_sync, partial_transaction};

/// `(namespace, name)`.
pub type Key = (String, String);
type Map<K, V> = foldhash::HashMap<K, V>;

/// One object as it is now, by `(namespace, name)`; `None` when it is gone.
pub type Changed<T> = (Key, Option<Arc<T>>);

/// Keeps the model and the ruleset of the last sync, and brings the kernel to the next one.
#[derive(Debug)]
pub struct Programmer {
    config: Config,
    /// The Services of the last sync, by name.
    services: Map<Key, Arc<ServiceObject>>,
    /// The EndpointSlices of the last sync, by name.
    slices: Map<Key, Arc<SliceObject>>,
    /// The same slices by the Service they belong to.
    slices_by_key: Map<Key, Vec<Arc<SliceObject>>>,
    /// Whether a sync was given every object yet (before that, only [`Programmer::sync`]
    /// can be right).
    seen_all: bool,
    /// The UDP service ports of the model, for [`Programmer::udp_state`].
    udp: std::collections::BTreeSet<ServicePortName>,
    /// The service ports with a health-check node port, for [`Programmer::health_checks`].
    checked: std::collections::BTreeSet<ServicePortName>,
    /// What was left out, for the Services that had something left out.
    warnings: Map<Key, Vec<Warning>>,
    /// The service ports of the last sync; the only copy of them.
    model: Model,
    rules: Option<Rules>,
    /// Whether the kernel holds what `rules` held after the last sync.
    in_sync: bool,
}

impl Programmer {
    /// Nothing seen or programmed yet: the first sync is full.
    pub fn new(config: &Config) -> Self {
        Programmer {
            config: config.clone(),
            services: Map::default(),
            slices: Map::default(),
            slices_by_key: Map::default(),
            seen_all: false,
            udp: Default::default(),
            checked: Default::default(),
            warnings: Map::default(),
            model: Model {
                services: Default::default(),
                node: model::node_info(None, config),
            },
            rules: None,
            in_sync: false,
        }
    }

    /// Makes the next sync a full one.
    pub fn force_full(&mut self) {
        self.in_sync = false;
    }

    /// The model as of the last sync.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The UDP service ports as of the last sync ([`crate::conntrack::UdpState::of`] the model, without a walk
    /// of every port).
    pub fn udp_state(&self) -> crate::conntrack::UdpState {
        let ports = self.udp.iter().filter_map(|id| self.model.services.get(id));
        crate::conntrack::UdpState::of_ports(ports, &self.model.node.name)
    }

    /// The health-check node ports as of the last sync ([`crate::healthcheck::desired`] of
    /// the model, without a walk of every port).
    pub fn health_checks(
        &self,
    ) -> std::collections::BTreeMap<u16, crate::healthcheck::ServiceHealth> {
        let ports = self
            .checked
            .iter()
            .filter_map(|id| self.model.services.get(id));
        crate::healthcheck::desired_of(ports, &self.model.node.name)
    }

    /// Objects left out of the model as of the last sync.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut out: Vec<Warning> = self.warnings.values().flatten().cloned().collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// Whether only [`Programmer::sync`], given every object, can be right for the next
    /// sync (nothing was given in full yet).
    pub fn needs_all(&self) -> bool {
        !self.seen_all
    }

    /// Notes `now` as the Service named `key`; marks its key dirty if it changed.
    fn service_now(
        &mut self,
        key: Key,
        now: Option<Arc<ServiceObject>>,
        dirty: &mut foldhash::HashSet<Key>,
    ) {
        let same = match (self.services.get(&key), &now) {
            (Some(old), Some(now)) => Arc::ptr_eq(old, now),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        match now {
            Some(now) => self.services.insert(key.clone(), now),
            None => self.services.remove(&key),
        };
        dirty.insert(key);
    }

    /// Notes `now` as the EndpointSlice named `key`; marks the keys of the Services it left
    /// and joined dirty if it changed.
    fn slice_now(
        &mut self,
        key: Key,
        now: Option<Arc<SliceObject>>,
        dirty: &mut foldhash::HashSet<Key>,
    ) {
        let old = match (self.slices.get(&key), &now) {
            (Some(old), Some(now)) if Arc::ptr_eq(old, now) => return,
            (None, None) => return,
            _ => match &now {
                Some(now) => self.slices.insert(key, now.clone()),
                None => self.slices.remove(&key),
            },
        };
        if let Some(old) = old
            && let Some(service) = old.service_key()
        {
            if let Some(list) = self.slices_by_key.get_mut(&service) {
                list.retain(|s| !Arc::ptr_eq(s, &old));
                if list.is_empty() {
                    self.slices_by_key.remove(&service);
                }
            }
            dirty.insert(service);
        }
        if let Some(now) = now
            && let Some(service) = now.service_key()
        {
            self.slices_by_key
                .entry(service.clone())
                .or_default()
                .push(now);
            dirty.insert(service);
        }
    }

    /// The keys of the Services to derive again, given every object there is.
    fn all_now(
        &mut self,
        services: &[Arc<ServiceObject>],
        slices: &[Arc<SliceObject>],
    ) -> foldhash::HashSet<Key> {
        let mut dirty = foldhash::HashSet::default();
        let present: foldhash::HashSet<Key> = services.iter().map(|s| s.key()).collect();
        for key in absent(&self.services, &present) {
            self.service_now(key, None, &mut dirty);
        }
        for svc in services {
            self.service_now(svc.key(), Some(svc.clone()), &mut dirty);
        }
        let name = |s: &Arc<SliceObject>| (s.namespace.clone(), s.name.clone());
        let present: foldhash::HashSet<Key> = slices.iter().map(name).collect();
        for key in absent(&self.slices, &present) {
            self.slice_now(key, None, &mut dirty);
        }
        for slice in slices {
            self.slice_now(name(slice), Some(slice.clone()), &mut dirty);
        }
        self.seen_all = true;
        dirty
    }

    /// Updates the model, and the rules, for the Services named `dirty` (those whose
    /// Service or any of whose EndpointSlices appeared, changed or went away).
    fn update_model(&mut self, dirty: foldhash::HashSet<Key>, node: Option<&Node>) {
        let node = model::node_info(node, &self.config);
        if node != self.model.node {
            // Endpoint locality and source ranges depend on the node: start over.
            self.model.node = node;
            self.rules = None;
            self.in_sync = false;
        }
        let rebuild = self.rules.is_none();
        let rules = self
            .rules
            .get_or_insert_with(|| Rules::new(&self.config, &self.model.node));
        // A full sync writes everything: no need to note what changed.
        rules.set_tracking(self.in_sync);

        if rebuild {
            for port in self.model.services.values() {
                if !dirty.contains(&(port.id.namespace.clone(), port.id.name.clone())) {
                    rules.update(None, Some(port));
                }
            }
        }
        for key in dirty {
            let old = take_ports(&mut self.model, &key);
            let (new, warnings) = match self.services.get(&key) {
                Some(svc) => {
                    let mut slices = self.slices_by_key.get(&key).cloned().unwrap_or_default();
                    slices.sort_by(|a, b| a.name.cmp(&b.name));
                    model::service_model(svc, &slices)
                }
                None => Default::default(),
            };
            // Rebuilt rules never held the old ports.
            replace_ports(rules, &old, &new, !rebuild);
            for port in &old {
                self.udp.remove(&port.id);
                self.checked.remove(&port.id);
            }
            for port in new {
                if port.id.protocol == Protocol::Udp {
                    self.udp.insert(port.id.clone());
                }
                if crate::healthcheck::is_checked(&port) {
                    self.checked.insert(port.id.clone());
                }
                self.model.services.insert(port.id.clone(), port);
            }
            if warnings.is_empty() {
                self.warnings.remove(&key);
            } else {
                self.warnings.insert(key, warnings);
            }
        }
    }

    /// Brings the kernel to the ruleset of these objects: the difference since the last
    /// successful sync, or everything when a full sync is due.
    pub fn sync(
        &mut self,
        nft: &dyn Nft,
        services: &[Arc<ServiceObject>],
        slices: &[Arc<SliceObject>],
        node: Option<&Node>,
    ) -> Result<SyncReport, SyncError> {
        let dirty = self.all_now(services, slices);
        self.update_model(dirty, node);
        self.program(nft)
    }

    /// As [`Programmer::sync`], given only the objects that changed since the last sync
    /// (each as it is now, by name): costs in proportion to them. Only right once a sync was
    /// given every object ([`Programmer::needs_all`]).
    pub fn sync_changed(
        &mut self,
        nft: &dyn Nft,
        services: Vec<Changed<ServiceObject>>,
        slices: Vec<Changed<SliceObject>>,
        node: Option<&Node>,
    ) -> Result<SyncReport, SyncError> {
        let mut dirty = foldhash::HashSet::default();
        for (key, now) in services {
            self.service_now(key, now, &mut dirty);
        }
        for (key, now) in slices {
            self.slice_now(key, now, &mut dirty);
        }
        self.update_model(dirty, node);
        self.program(nft)
    }

    /// Sends the kernel the rules' difference since the last successful sync, or all of them
    /// when a full sync is due.
    fn program(&mut self, nft: &dyn Nft) -> Result<SyncReport, SyncError> {
        let Some(rules) = self.rules.as_mut() else {
            unreachable!("update_model always leaves rules");
        };
        let delta = if self.in_sync {
            Some(rules.take_delta())
        } else {
            rules.discard_delta();
            None
        };
        let partial = delta
            .as_ref()
            .and_then(|(old, new)| partial_transaction(old, new));
        let result = apply_sync(nft, partial, || rules.views());
        self.in_sync = result.is_ok();
        result
    }
}

/// The keys of `map` that are not in `present`.
fn absent<V>(map: &Map<Key, V>, present: &foldhash::HashSet<Key>) -> Vec<Key> {
    map.keys()
        .filter(|k| !present.contains(*k))
        .cloned()
        .collect()
}

/// Takes one Service's ports out of the model.
fn take_ports(model: &mut Model, (namespace, name): &Key) -> Vec<ServicePort> {
    // Ports sort by namespace, name, port name and protocol: the Service's ports are the run
    // that starts at its empty port name and TCP.
    let first = ServicePortName {
        namespace: namespace.clone(),
        name: name.clone(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
    };
    let ids: Vec<ServicePortName> = model
        .services
        .range(first..)
        .take_while(|(id, _)| id.namespace == *namespace && id.name == *name)
        .map(|(id, _)| id.clone())
        .collect();
    ids.iter()
        .filter_map(|id| model.services.remove(id))
        .collect()
}

/// Swaps one Service's ports `old` for `new` in the rules (`old_in_rules`: whether the rules
/// hold `old`, or are being rebuilt and hold none of it).
fn replace_ports(rules: &mut Rules, old: &[ServicePort], new: &[ServicePort], old_in_rules: bool) {
    for port in old {
        if old_in_rules && !new.iter().any(|p| p.id == port.id) {
            rules.update(Some(port), None);
        }
    }
    for port in new {
        let before = old.iter().find(|p| p.id == port.id);
        if !old_in_rules {
            rules.update(None, Some(port));
        } else if before != Some(port) {
            rules.update(before, Some(port));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nft::RecordingNft;
    use crate::nft::ruleset::Ruleset;
    use crate::testutil::{config, simple};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    /// What the proxy keeps of a Service and its slice, as its watches store them.
    fn kept(
        (svc, slice): (k8s_openapi::api::core::v1::Service, EndpointSlice),
    ) -> (Arc<ServiceObject>, Arc<SliceObject>) {
        (
            Arc::new(ServiceObject::new(&svc)),
            Arc::new(SliceObject::new(&slice, &mut model::Interner::default())),
        )
    }

    /// After any sequence of partial syncs, the rules equal a build from scratch.
    #[test]
    fn incremental_syncs_keep_the_same_rules_as_a_build_from_scratch() {
        let cfg = config();
        let nft = RecordingNft::default();
        let mut p = Programmer::new(&cfg);
        let (a, sa) = simple("default", "a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]);
        // b and c share an endpoint on this node, so a hairpin element.
        let (b, mut sb) = simple("default", "b", "10.96.0.2", &["10.244.2.1"]);
        let (c, mut sc) = simple("default", "c", "10.96.0.3", &["10.244.2.1", "10.244.3.1"]);
        for slice in [&mut sb, &mut sc] {
            slice.endpoints.as_mut().unwrap()[0].node_name = Some(crate::testutil::NODE.into());
        }
        let ((a, sa), (b, sb), (c, sc)) = (kept((a, sa)), kept((b, sb)), kept((c, sc)));
        type Objects = (Vec<Arc<ServiceObject>>, Vec<Arc<SliceObject>>);
        let steps: Vec<Objects> = vec![
            (vec![a.clone(), b.clone()], vec![sa.clone(), sb.clone()]),
            // c shares an endpoint (and so a hairpin element) with b.
            (
                vec![a.clone(), b.clone(), c.clone()],
                vec![sa.clone(), sb.clone(), sc.clone()],
            ),
            // b goes away: the shared hairpin element stays for c.
            (vec![a.clone(), c.clone()], vec![sa.clone(), sc.clone()]),
            // a's endpoints change (a new slice object).
            (
                vec![a.clone(), c.clone()],
                vec![
                    kept(simple("default", "a", "10.96.0.1", &["10.244.1.9"])).1,
                    Arc::new((*sc).clone()),
                ],
            ),
            (vec![], vec![]),
        ];
        for (i, (svcs, slices)) in steps.iter().enumerate() {
            let report = p.sync(&nft, svcs, slices, None).unwrap();
            assert_eq!(report.full, i == 0, "step {i}");
            let (model, _) = model::build_from_objects(
                svcs.iter().map(|s| s.as_ref()),
                slices.iter().map(|s| s.as_ref()),
                None,
                &cfg,
            );
            assert_eq!(p.model(), &model, "step {i}");
            let rules = p.rules.as_ref().unwrap();
            assert_eq!(
                rules.materialize(),
                Ruleset::build(&model, &cfg),
                "step {i}"
            );
            // A full sync writes from the claims without copying them, the same script.
            assert_eq!(
                crate::nft::transaction::full_script_of(&rules.views()),
                crate::nft::transaction::full_script(&rules.materialize()),
                "step {i}"
            );
        }
        let scripts = nft.scripts();
        assert!(
            scripts[0].contains("add element ip strake-proxy hairpin { 10.244.2.1 . 10.244.2.1 }"),
            "{}",
            scripts[0]
        );
        // Removing b keeps the hairpin element c still needs.
        assert!(
            !scripts[2].contains("hairpin { 10.244.2.1 . 10.244.2.1 }"),
            "{}",
            scripts[2]
        );
        assert!(
            scripts[2]
                .contains("delete element ip strake-proxy service-ips { 10.96.0.2 . tcp . 80 }")
        );
        // Unchanged objects cost nothing.
        let report = p.sync(&nft, &[], &[], None).unwrap();
        assert_eq!((report.full, report.bytes), (false, 0));
    }

    /// Given only what changed, a sync reaches the model and rules of one given everything.
    #[test]
    fn changed_objects_alone_reach_what_every_object_does() {
        let cfg = config();
        let nft = RecordingNft::default();
        let (mut all, mut changed) = (Programmer::new(&cfg), Programmer::new(&cfg));
        let (a, sa) = kept(simple("default", "a", "10.96.0.1", &["10.244.1.1"]));
        let (b, sb) = kept(simple("default", "b", "10.96.0.2", &["10.244.2.1"]));
        let (c, sc) = kept(simple("default", "c", "10.96.0.3", &["10.244.3.1"]));
        let (_, sa2) = kept(simple("default", "a", "10.96.0.1", &["10.244.1.9"]));
        // a's slice, relabelled to belong to c.
        let mut moved = (*sa2).clone();
        moved.service = Some("c".into());
        let moved = Arc::new(moved);
        let name = |s: &Arc<SliceObject>| (s.namespace.clone(), s.name.clone());
        type Step = (
            Vec<Arc<ServiceObject>>,
            Vec<Arc<SliceObject>>,
            Vec<Changed<ServiceObject>>,
            Vec<Changed<SliceObject>>,
        );
        let steps: Vec<Step> = vec![
            (
                vec![a.clone(), b.clone(), c.clone()],
                vec![sa.clone(), sb.clone(), sc.clone()],
                vec![(b.key(), Some(b.clone())), (c.key(), Some(c.clone()))],
                vec![(name(&sb), Some(sb.clone())), (name(&sc), Some(sc.clone()))],
            ),
            (
                vec![a.clone(), c.clone()],
                vec![sa.clone(), sc.clone()],
                vec![(b.key(), None)],
                vec![(name(&sb), None)],
            ),
            (
                vec![a.clone(), c.clone()],
                vec![sa2.clone(), sc.clone()],
                vec![],
                vec![(name(&sa2), Some(sa2.clone()))],
            ),
            (
                vec![a.clone(), c.clone()],
                vec![moved.clone(), sc.clone()],
                // Unchanged objects named again cost nothing.
                vec![(a.key(), Some(a.clone()))],
                vec![
                    (name(&moved), Some(moved.clone())),
                    (name(&sc), Some(sc.clone())),
                ],
            ),
            (
                vec![],
                vec![],
                vec![(a.key(), None), (c.key(), None)],
                vec![(name(&moved), None), (name(&sc), None)],
            ),
        ];
        assert!(changed.needs_all());
        changed
            .sync(
                &nft,
                std::slice::from_ref(&a),
                std::slice::from_ref(&sa),
                None,
            )
            .unwrap();
        assert!(!changed.needs_all());
        for (i, (svcs, slices, changed_svcs, changed_slices)) in steps.into_iter().enumerate() {
            all.sync(&nft, &svcs, &slices, None).unwrap();
            let report = changed
                .sync_changed(&nft, changed_svcs, changed_slices, None)
                .unwrap();
            assert!(!report.full, "step {i}");
            assert_eq!(changed.model(), all.model(), "step {i}");
            assert_eq!(
                changed.rules.as_ref().unwrap().materialize(),
                all.rules.as_ref().unwrap().materialize(),
                "step {i}"
            );
        }
        // The moved slice gave c the endpoint a had.
        assert!(
            nft.scripts()
                .iter()
                .any(|s| s.contains("10.96.0.3 . tcp . 80 . 0 : 10.244.1.9 . 8080")),
            "{:?}",
            nft.scripts()
        );
    }

    /// The UDP and health-check views kept by port name are those of a walk of the model.
    #[test]
    fn udp_and_health_check_views_follow_the_model_without_walking_it() {
        use crate::testutil::{ep, service, slice};
        use serde_json::json;
        let cfg = config();
        let nft = RecordingNft::default();
        let mut p = Programmer::new(&cfg);
        let dns = |protocol: &str| {
            service(
                "default",
                "dns",
                json!({ "clusterIP": "10.96.0.53", "ports": [{ "port": 53, "protocol": protocol }] }),
            )
        };
        let dns_slice = |ip: &str, protocol: &str| {
            slice(
                "default",
                "dns",
                "dns-1",
                "IPv4",
                json!([{ "port": 5353, "protocol": protocol }]),
                json!([ep(ip, "node-b", true)]),
            )
        };
        let (lb, lb_slice) = crate::testutil::local_load_balancer();
        let (web, web_slice) = simple("default", "web", "10.96.0.1", &["10.244.1.1"]);
        let mut interner = model::Interner::default();
        let mut kept_slice = |s| Arc::new(SliceObject::new(&s, &mut interner));
        let kept_svc = |s| Arc::new(ServiceObject::new(&s));
        let steps = [
            (
                vec![
                    kept_svc(dns("UDP")),
                    kept_svc(lb.clone()),
                    kept_svc(web.clone()),
                ],
                vec![
                    kept_slice(dns_slice("10.244.2.1", "UDP")),
                    kept_slice(lb_slice.clone()),
                    kept_slice(web_slice.clone()),
                ],
            ),
            (
                vec![kept_svc(dns("UDP")), kept_svc(web.clone())],
                vec![
                    kept_slice(dns_slice("10.244.2.2", "UDP")),
                    kept_slice(web_slice),
                ],
            ),
            (
                vec![kept_svc(dns("TCP")), kept_svc(lb)],
                vec![
                    kept_slice(dns_slice("10.244.2.2", "TCP")),
                    kept_slice(lb_slice),
                ],
            ),
            (vec![], vec![]),
        ];
        for (i, (svcs, slices)) in steps.iter().enumerate() {
            p.sync(&nft, svcs, slices, None).unwrap();
            let walked_udp = crate::conntrack::UdpState::of(p.model());
            let walked_hc = crate::healthcheck::desired(p.model());
            assert_eq!(p.udp_state(), walked_udp, "step {i}");
            assert_eq!(p.health_checks(), walked_hc, "step {i}");
            // What each step should hold, so that the views are not trivially empty.
            let expect = [(1, 1), (1, 0), (0, 1), (0, 0)][i];
            assert_eq!(
                (walked_udp.ports.len(), walked_hc.len()),
                expect,
                "step {i}"
            );
            // Ports that left (or stopped being UDP) are forgotten.
            assert_eq!((p.udp.len(), p.checked.len()), expect, "step {i}");
        }
    }

    #[test]
    fn a_services_ports_are_taken_out_of_the_model_and_no_neighbours_ones() {
        let port = |ns: &str, name: &str, port_name: &str, protocol| ServicePort {
            id: ServicePortName {
                namespace: ns.into(),
                name: name.into(),
                port_name: port_name.into(),
                protocol,
            },
            port: 80,
            cluster_ips: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            node_port: None,
            affinity_timeout_secs: None,
            external_policy_local: false,
            internal_policy_local: false,
            load_balancer_source_ranges: Vec::new(),
            health_check_node_port: None,
            endpoints: Vec::new(),
        };
        let mut m = Model::default();
        for p in [
            port("a", "web", "", Protocol::Udp),
            port("a", "web", "http", Protocol::Tcp),
            port("a", "web", "http", Protocol::Sctp),
            port("a", "we", "x", Protocol::Tcp),
            port("a", "web-2", "", Protocol::Tcp),
            port("ab", "web", "", Protocol::Tcp),
        ] {
            m.services.insert(p.id.clone(), p);
        }
        let taken = take_ports(&mut m, &("a".into(), "web".into()));
        let names = |ports: Vec<&ServicePort>| -> Vec<String> {
            ports.iter().map(|p| p.id.to_string()).collect()
        };
        assert_eq!(
            names(taken.iter().collect()),
            ["a/web/udp", "a/web:http/tcp", "a/web:http/sctp"]
        );
        assert_eq!(
            names(m.services.values().collect()),
            ["a/we:x/tcp", "a/web-2/tcp", "ab/web/tcp"]
        );
    }

    #[test]
    fn a_failed_sync_makes_the_next_one_full() {
        let cfg = config();
        let nft = RecordingNft::default();
        let mut p = Programmer::new(&cfg);
        let (a, sa) = kept(simple("default", "a", "10.96.0.1", &["10.244.1.1"]));
        let (svcs, slices) = (vec![a], vec![sa]);
        assert!(p.sync(&nft, &svcs, &slices, None).unwrap().full);
        nft.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (a2, sa2) = kept(simple("default", "a", "10.96.0.1", &["10.244.1.2"]));
        let (svcs, slices) = (vec![a2], vec![sa2]);
        assert!(p.sync(&nft, &svcs, &slices, None).is_err());
        let report = p.sync(&nft, &svcs, &slices, None).unwrap();
        assert!(report.full);
        assert!(nft.scripts().last().unwrap().contains("10.244.1.2 . 8080"));
    }
}
