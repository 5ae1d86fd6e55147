//! The sync pipeline from API objects to the kernel, kept incremental: a sync costs in
//! proportion to what changed, not to the number of Services.
//!
//! The [`Programmer`] remembers, per Service, the objects it last saw (by identity: the
//! reflector store hands out a new `Arc` for every change) and the service ports it derived
//! from them. A sync re-derives only the Services whose Service or EndpointSlice objects
//! changed, replaces their ports' contributions in [`Rules`], and sends the kernel the
//! difference of the touched objects alone. A full sync (the first one, after a failure, on
//! the long period, or when the node's name or addresses change) writes the whole ruleset.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;

use crate::config::Config;
use crate::model::{
    self, Model, Protocol, ServiceObject, ServicePort, ServicePortName, SliceObject, Warning,
};
use crate::nft::Nft;
use crate::nft::ruleset::Rules;
use crate::nft::sync::{SyncError, SyncReport, apply, full_script_of, partial_script};

type Key = (String, String);
type Map<K, V> = foldhash::HashMap<K, V>;

/// The objects of the last sync, by identity (the `Arc`s are kept so that an address is
/// never reused while it is remembered), and the Service each belongs to.
#[derive(Debug)]
struct Seen<K> {
    by_ptr: Map<usize, (Arc<K>, Option<Key>)>,
}

impl<K> Default for Seen<K> {
    fn default() -> Self {
        Seen {
            by_ptr: Map::default(),
        }
    }
}

impl<K> Seen<K> {
    /// Compares `now` with the last objects: calls `appeared` for each new one (with the key
    /// `key_of` gives it) and `gone` for each one no longer there.
    fn update(
        &mut self,
        now: &[Arc<K>],
        key_of: impl Fn(&K) -> Option<Key>,
        mut appeared: impl FnMut(&Arc<K>, &Option<Key>),
        mut gone: impl FnMut(&Arc<K>, &Option<Key>),
    ) {
        let mut next = Map::with_capacity_and_hasher(now.len(), Default::default());
        for obj in now {
            let ptr = Arc::as_ptr(obj) as usize;
            let entry = match self.by_ptr.remove(&ptr) {
                Some(entry) => entry,
                None => {
                    let key = key_of(obj);
                    appeared(obj, &key);
                    (obj.clone(), key)
                }
            };
            next.insert(ptr, entry);
        }
        for (_, (obj, key)) in self.by_ptr.drain() {
            gone(&obj, &key);
        }
        self.by_ptr = next;
    }
}

/// Keeps the model and the ruleset of the last sync, and brings the kernel to the next one.
#[derive(Debug)]
pub struct Programmer {
    config: Config,
    services: Seen<ServiceObject>,
    slices: Seen<SliceObject>,
    service_by_key: Map<Key, Arc<ServiceObject>>,
    slices_by_key: Map<Key, Vec<Arc<SliceObject>>>,
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
            services: Seen::default(),
            slices: Seen::default(),
            service_by_key: Map::default(),
            slices_by_key: Map::default(),
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

    /// Objects left out of the model as of the last sync.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut out: Vec<Warning> = self.warnings.values().flatten().cloned().collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// Updates the model, and the rules, from the current objects.
    fn update_model(
        &mut self,
        services: &[Arc<ServiceObject>],
        slices: &[Arc<SliceObject>],
        node: Option<&Node>,
    ) {
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

        // Which Services need their ports derived again: those whose Service or any of
        // whose EndpointSlices appeared, changed (a new object) or went away.
        let mut dirty: foldhash::HashSet<Key> = Default::default();
        let (by_key, dirty_ref) = (&mut self.service_by_key, &mut dirty);
        let mut gone_services = Vec::new();
        self.services.update(
            services,
            |svc| Some(svc.key()),
            |svc, key| {
                if let Some(key) = key {
                    by_key.insert(key.clone(), svc.clone());
                    dirty_ref.insert(key.clone());
                }
            },
            |svc, key| {
                if let Some(key) = key {
                    gone_services.push((svc.clone(), key.clone()));
                }
            },
        );
        for (svc, key) in gone_services {
            if by_key.get(&key).is_some_and(|s| Arc::ptr_eq(s, &svc)) {
                by_key.remove(&key);
            }
            dirty_ref.insert(key);
        }
        let slices_by_key = &mut self.slices_by_key;
        let mut gone_slices = Vec::new();
        self.slices.update(
            slices,
            SliceObject::service_key,
            |slice, key| {
                if let Some(key) = key {
                    slices_by_key
                        .entry(key.clone())
                        .or_default()
                        .push(slice.clone());
                    dirty_ref.insert(key.clone());
                }
            },
            |slice, key| {
                if let Some(key) = key {
                    gone_slices.push((slice.clone(), key.clone()));
                }
            },
        );
        for (slice, key) in gone_slices {
            if let Some(list) = slices_by_key.get_mut(&key) {
                list.retain(|s| !Arc::ptr_eq(s, &slice));
                if list.is_empty() {
                    slices_by_key.remove(&key);
                }
            }
            dirty_ref.insert(key);
        }

        if rebuild {
            for port in self.model.services.values() {
                if !dirty.contains(&(port.id.namespace.clone(), port.id.name.clone())) {
                    rules.update(None, Some(port));
                }
            }
        }
        for key in dirty {
            let old = take_ports(&mut self.model, &key);
            let (new, warnings) = match self.service_by_key.get(&key) {
                Some(svc) => {
                    let mut slices = self.slices_by_key.get(&key).cloned().unwrap_or_default();
                    slices.sort_by(|a, b| a.name.cmp(&b.name));
                    model::service_model(svc, &slices)
                }
                None => Default::default(),
            };
            // Rebuilt rules never held the old ports.
            replace_ports(rules, &old, &new, !rebuild);
            for port in new {
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
        self.update_model(services, slices, node);
        let Some(rules) = self.rules.as_mut() else {
            unreachable!("update_model always leaves rules");
        };
        let partial = if self.in_sync {
            let (old, new) = rules.take_delta();
            partial_script(&old, &new).filter(|script| {
                nft.rules_on_existing_data_maps()
                    || !crate::nft::sync::adds_rules_using_data_maps(script)
            })
        } else {
            rules.discard_delta();
            None
        };
        let (script, full) = match partial {
            Some(script) => (script, false),
            None => (full_script_of(&rules.views()), true),
        };
        let result = apply(nft, &script, full);
        self.in_sync = result.is_ok();
        result
    }
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
                full_script_of(&rules.views()),
                crate::nft::sync::full_script(&rules.materialize()),
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
