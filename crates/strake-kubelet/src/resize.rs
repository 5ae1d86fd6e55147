//! In-place pod resize (upstream's `InPlacePodVerticalScaling`): a pod's containers may get
//! new CPU and memory requests and limits through the `resize` subresource while they run.
//!
//! As upstream's allocation manager, the kubelet keeps, per pod, the resources it *allocated*
//! (admitted) to each container, apart from the spec: the spec is what is asked, the
//! allocation what the node agreed to and what containers are started and updated with. A
//! resize is decided where every pod of the node is known ([`crate::pods`]): accepted when the
//! pod's new requests fit the node's allocatable beside the other pods' allocations, pending
//! as `Infeasible` when they exceed the node's allocatable outright, and as `Deferred` while
//! they only do not fit now (retried whenever a pod leaves the node). The pod worker then
//! actuates the allocation: the pod's cgroup and UpdateContainerResources, or a restart for a
//! resource whose `resizePolicy` says `RestartContainer`. Allocations are kept in
//! `<root-dir>/allocated_pods_state`, so that a restarted kubelet does not take an unadmitted
//! spec for an allocation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Container, Node, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::resources::parse_milli;

/// The resources a pod's resizable containers (app containers and sidecars) have, by name.
pub type Resources = BTreeMap<String, ResourceRequirements>;

/// The resources the spec of `pod` asks for its resizable containers.
pub fn asked(pod: &Pod) -> Resources {
    let Some(spec) = pod.spec.as_ref() else {
        return Resources::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .chain(&spec.containers)
        .map(|c| (c.name.clone(), c.resources.clone().unwrap_or_default()))
        .collect()
}

fn milli(list: Option<&BTreeMap<String, Quantity>>, name: &str) -> Option<i128> {
    list.and_then(|l| l.get(name))
        .and_then(|q| parse_milli(&q.0).ok())
}

/// Whether two requirements are the same CPU and memory requests and limits (`100m` and
/// `0.1` are the same).
pub fn same(a: &ResourceRequirements, b: &ResourceRequirements) -> bool {
    ["cpu", "memory"].iter().all(|r| {
        milli(a.requests.as_ref(), r) == milli(b.requests.as_ref(), r)
            && milli(a.limits.as_ref(), r) == milli(b.limits.as_ref(), r)
    })
}

/// Whether every container of `a` has the same resources in `b`.
pub fn same_all(a: &Resources, b: &Resources) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(name, r)| b.get(name).is_some_and(|o| same(r, o)))
}

/// Which of CPU and memory differ between `a` and `b`.
pub fn changed(a: &ResourceRequirements, b: &ResourceRequirements) -> Vec<&'static str> {
    ["cpu", "memory"]
        .into_iter()
        .filter(|r| {
            milli(a.requests.as_ref(), r) != milli(b.requests.as_ref(), r)
                || milli(a.limits.as_ref(), r) != milli(b.limits.as_ref(), r)
        })
        .collect()
}

/// Whether changing `resources` of container `c` needs it restarted (`resizePolicy`
/// `RestartContainer` for one of them; `NotRequired` is the default).
pub fn needs_restart(c: &Container, resources: &[&str]) -> bool {
    c.resize_policy.iter().flatten().any(|p| {
        p.restart_policy == "RestartContainer" && resources.contains(&p.resource_name.as_str())
    })
}

/// Whether `pod` already runs with `allocated`: every container the allocation names asks
/// the same CPU and memory, so [`with_allocation`] would change nothing the kubelet acts on.
pub fn holds_allocation(pod: &Pod, allocated: &Resources) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    let none = ResourceRequirements::default();
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .all(|c| {
            allocated
                .get(&c.name)
                .is_none_or(|r| same(r, c.resources.as_ref().unwrap_or(&none)))
        })
}

/// `pod` with its resizable containers' resources replaced by `allocated`.
pub fn with_allocation(mut pod: Pod, allocated: &Resources) -> Pod {
    if let Some(spec) = pod.spec.as_mut() {
        for c in spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(spec.containers.iter_mut())
        {
            if let Some(r) = allocated.get(&c.name) {
                c.resources = Some(r.clone());
            }
        }
    }
    pod
}

/// Why a resize waits (the `PodResizePending` condition's reason and message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// `Infeasible` or `Deferred`.
    pub reason: &'static str,
    pub message: String,
}

/// Decides the resize of `pod` (its spec holds the new resources) on `node`, beside `others`
/// (the node's other pods, with their allocations). Without a Node (standalone) it is
/// accepted.
pub fn decide(pod: &Pod, others: &[Pod], node: Option<&Node>) -> Result<(), Pending> {
    let Some(allocatable) = node.and_then(|n| n.status.as_ref()?.allocatable.as_ref()) else {
        return Ok(());
    };
    let want = crate::predicates::pod_requests(pod);
    for r in ["cpu", "memory"] {
        let (Some(&requested), Some(capacity)) = (want.get(r), milli(Some(allocatable), r)) else {
            continue;
        };
        let shown = |m: i128| if r == "cpu" { m } else { (m + 999) / 1000 };
        if requested > capacity {
            return Err(Pending {
                reason: "Infeasible",
                message: format!(
                    "Node didn't have enough capacity: {r}, requested: {}, capacity: {}",
                    shown(requested),
                    shown(capacity)
                ),
            });
        }
        let used: i128 = others
            .iter()
            .filter_map(|p| crate::predicates::pod_requests(p).get(r).copied())
            .sum();
        if requested > capacity - used {
            return Err(Pending {
                reason: "Deferred",
                message: format!(
                    "Node didn't have enough resource: {r}, requested: {}, used: {}, capacity: {}",
                    shown(requested),
                    shown(used),
                    shown(capacity)
                ),
            });
        }
    }
    Ok(())
}

/// One pod's allocation, and why its resize waits, if it does.
#[derive(Clone, Debug, Default)]
pub struct Allocation {
    pub containers: Resources,
    pub pending: Option<Pending>,
}

/// The node's allocations by pod UID, kept on disk.
#[derive(Clone, Debug)]
pub struct Allocations {
    path: Option<PathBuf>,
    inner: Arc<Mutex<HashMap<String, Allocation>>>,
}

impl Allocations {
    /// The allocations stored at `path` (none when the file is missing; an unreadable one is
    /// reported and left for the pods to allocate again).
    pub fn load(path: &Path) -> Self {
        let stored: HashMap<String, Resources> = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "allocations unreadable; starting afresh");
                HashMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "allocations unreadable; starting afresh");
                HashMap::new()
            }
        };
        let inner = stored
            .into_iter()
            .map(|(uid, containers)| {
                (
                    uid,
                    Allocation {
                        containers,
                        pending: None,
                    },
                )
            })
            .collect();
        Allocations {
            path: Some(path.to_path_buf()),
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// Allocations that live in memory only (tests).
    pub fn in_memory() -> Self {
        Allocations {
            path: None,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Allocation>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, map: &HashMap<String, Allocation>) {
        let Some(path) = &self.path else {
            return;
        };
        let stored: HashMap<&String, &Resources> =
            map.iter().map(|(k, v)| (k, &v.containers)).collect();
        let result = serde_json::to_vec(&stored)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "allocations not saved");
        }
    }

    /// Pod `uid`'s allocation.
    pub fn get(&self, uid: &str) -> Option<Allocation> {
        self.lock().get(uid).cloned()
    }

    /// Allocates to an admitted pod what its spec asks, unless it has an allocation already
    /// (a pod adopted after a restart keeps the one it had).
    pub fn admit(&self, uid: &str, pod: &Pod) {
        let mut map = self.lock();
        if map.contains_key(uid) {
            return;
        }
        map.insert(
            uid.to_string(),
            Allocation {
                containers: asked(pod),
                pending: None,
            },
        );
        self.save(&map);
    }

    /// Records the decision on pod `uid`'s resize to `pod`'s spec: its new allocation, or
    /// why it waits. Returns whether anything changed.
    pub fn resolve(&self, uid: &str, pod: &Pod, decision: Result<(), Pending>) -> bool {
        let mut map = self.lock();
        let entry = map.entry(uid.to_string()).or_default();
        let changed = match decision {
            Ok(()) => {
                let asked = asked(pod);
                let changed = !same_all(&entry.containers, &asked) || entry.pending.is_some();
                entry.containers = asked;
                entry.pending = None;
                changed
            }
            Err(p) => {
                let changed = entry.pending.as_ref() != Some(&p);
                entry.pending = Some(p);
                changed
            }
        };
        if changed {
            self.save(&map);
        }
        changed
    }

    /// Forgets pod `uid`.
    pub fn remove(&self, uid: &str) {
        let mut map = self.lock();
        if map.remove(uid).is_some() {
            self.save(&map);
        }
    }

    /// The pods whose resize waits as `Deferred`.
    pub fn deferred(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, a)| a.pending.as_ref().is_some_and(|p| p.reason == "Deferred"))
            .map(|(uid, _)| uid.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "uid": "u" },
            "spec": { "containers": containers }
        }))
        .unwrap()
    }

    fn res(cpu: &str, mem: &str) -> serde_json::Value {
        serde_json::json!({ "requests": { "cpu": cpu, "memory": mem } })
    }

    fn node(cpu: &str, mem: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "n" },
            "status": { "allocatable": { "cpu": cpu, "memory": mem, "pods": "110" } }
        }))
        .unwrap()
    }

    #[test]
    fn equal_quantities_in_other_words_are_the_same_resources() {
        let a = asked(&pod(
            serde_json::json!([{ "name": "c", "resources": res("100m", "1Gi") }]),
        ));
        let b = asked(&pod(
            serde_json::json!([{ "name": "c", "resources": res("0.1", "1024Mi") }]),
        ));
        assert!(same_all(&a, &b));
        let c = asked(&pod(
            serde_json::json!([{ "name": "c", "resources": res("200m", "1Gi") }]),
        ));
        assert!(!same_all(&a, &c));
        assert_eq!(changed(&a["c"], &c["c"]), ["cpu"]);
    }

    #[test]
    fn a_pod_holds_its_allocation_until_a_resize_changes_it() {
        let admitted = pod(serde_json::json!([
            { "name": "c", "resources": res("100m", "1Gi") }, { "name": "d" }
        ]));
        let allocation = asked(&admitted);
        assert!(holds_allocation(&admitted, &allocation));
        // The same in other words, or a container the allocation does not name: held.
        let reworded = pod(serde_json::json!([
            { "name": "c", "resources": res("0.1", "1024Mi") }, { "name": "e" }
        ]));
        assert!(holds_allocation(&reworded, &allocation));
        // A resize not yet admitted: the allocation has to be applied.
        let resized = pod(serde_json::json!([
            { "name": "c", "resources": res("200m", "1Gi") }, { "name": "d" }
        ]));
        assert!(!holds_allocation(&resized, &allocation));
        let applied = with_allocation(resized, &allocation);
        assert!(holds_allocation(&applied, &allocation));
    }

    #[test]
    fn a_resize_is_infeasible_beyond_the_node_deferred_beside_others_else_accepted() {
        let n = node("2", "4Gi");
        let resized = pod(serde_json::json!([{ "name": "c", "resources": res("3", "1Gi") }]));
        let e = decide(&resized, &[], Some(&n)).unwrap_err();
        assert_eq!(e.reason, "Infeasible");
        assert_eq!(
            e.message,
            "Node didn't have enough capacity: cpu, requested: 3000, capacity: 2000"
        );
        let resized = pod(serde_json::json!([{ "name": "c", "resources": res("1500m", "1Gi") }]));
        let other = pod(serde_json::json!([{ "name": "o", "resources": res("1", "1Gi") }]));
        let e = decide(&resized, std::slice::from_ref(&other), Some(&n)).unwrap_err();
        assert_eq!(e.reason, "Deferred");
        assert!(e.message.contains("used: 1000"), "{}", e.message);
        assert_eq!(decide(&resized, &[], Some(&n)), Ok(()));
        assert_eq!(decide(&resized, &[other], None), Ok(()));
    }

    #[test]
    fn allocations_survive_a_restart_and_follow_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allocated_pods_state");
        let first = pod(serde_json::json!([{ "name": "c", "resources": res("100m", "1Gi") }]));
        let a = Allocations::load(&path);
        a.admit("u", &first);
        let bigger = pod(serde_json::json!([{ "name": "c", "resources": res("200m", "1Gi") }]));
        // Admitting again (an adopted pod with a new spec) keeps the allocation.
        a.admit("u", &bigger);
        assert!(same_all(&a.get("u").unwrap().containers, &asked(&first)));
        let pending = Pending {
            reason: "Deferred",
            message: "later".into(),
        };
        assert!(a.resolve("u", &bigger, Err(pending.clone())));
        assert!(!a.resolve("u", &bigger, Err(pending)));
        assert_eq!(a.deferred(), ["u"]);
        assert!(same_all(&a.get("u").unwrap().containers, &asked(&first)));
        assert!(a.resolve("u", &bigger, Ok(())));
        let again = Allocations::load(&path);
        let got = again.get("u").unwrap();
        assert!(same_all(&got.containers, &asked(&bigger)) && got.pending.is_none());
        again.remove("u");
        assert!(Allocations::load(&path).get("u").is_none());
        // A damaged file is reported and starts afresh.
        std::fs::write(&path, b"{not json").unwrap();
        assert!(Allocations::load(&path).get("u").is_none());
    }

    #[test]
    fn restart_policies_name_the_resources_that_restart_a_container() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "resizePolicy": [
                { "resourceName": "cpu", "restartPolicy": "NotRequired" },
                { "resourceName": "memory", "restartPolicy": "RestartContainer" }
            ]
        }))
        .unwrap();
        assert!(!needs_restart(&c, &["cpu"]));
        assert!(needs_restart(&c, &["cpu", "memory"]));
        let allocated = asked(&pod(
            serde_json::json!([{ "name": "c", "resources": res("1", "1Gi") }]),
        ));
        let p = with_allocation(pod(serde_json::json!([{ "name": "c" }])), &allocated);
        assert!(same_all(&asked(&p), &allocated));
    }
}
