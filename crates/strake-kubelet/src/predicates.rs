//! The general predicates of pod admission, as upstream's predicate admit handler
//! (`pkg/kubelet/lifecycle/predicate.go`) decides them before anything of a pod starts: the OS
//! label and field, resources against allocatable less what admitted pods request (`OutOfcpu`,
//! `OutOfmemory`, `OutOfephemeral-storage`, `OutOfpods`), required node affinity and node
//! selector (`NodeAffinity`), the node name, host ports (`NodePorts`) and untolerated
//! `NoExecute` taints (`TaintToleration`). A refused pod is set to phase Failed with the reason
//! and message returned here. Pure functions.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Container, Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::resources::parse_milli;

/// Why a pod is not admitted (upstream's `PodAdmitResult`): `reason` is the pod status
/// reason, `message` its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub message: String,
}

impl Rejection {
    fn predicate(name: &str, desc: &str) -> Self {
        Rejection {
            reason: name.to_string(),
            message: format!("Predicate {name} failed: {desc}"),
        }
    }
}

/// Sums of requests, in thousandths of each resource's unit.
pub type Requests = BTreeMap<String, i128>;

fn add(into: &mut Requests, from: &Requests) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn max_into(into: &mut Requests, from: &Requests) {
    for (k, v) in from {
        let e = into.entry(k.clone()).or_default();
        *e = (*e).max(*v);
    }
}

/// Which side of a container's resources to sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Requests,
    Limits,
}

fn side_of(
    r: &k8s_openapi::api::core::v1::ResourceRequirements,
    side: Side,
) -> Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>> {
    match side {
        Side::Requests => r.requests.as_ref(),
        Side::Limits => r.limits.as_ref(),
    }
}

fn container_requests(c: &Container, side: Side) -> Requests {
    c.resources
        .as_ref()
        .and_then(|r| side_of(r, side))
        .map(|r| {
            r.iter()
                .filter_map(|(k, q)| parse_milli(&q.0).ok().map(|m| (k.clone(), m)))
                .collect()
        })
        .unwrap_or_default()
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// A pod's effective requests (upstream's `PodRequests`): the sum over its containers and
/// sidecars, at least what each init container needs while it runs (itself plus the sidecars
/// started before it), pod-level requests where set, plus the RuntimeClass overhead.
pub fn pod_requests(pod: &Pod) -> Requests {
    pod_sum(pod, Side::Requests)
}

/// A pod's effective limits (upstream's `PodLimits`), summed as [`pod_requests`] sums requests.
pub fn pod_limits(pod: &Pod) -> Requests {
    pod_sum(pod, Side::Limits)
}

fn pod_sum(pod: &Pod, side: Side) -> Requests {
    let Some(spec) = pod.spec.as_ref() else {
        return Requests::new();
    };
    let mut total = Requests::new();
    for c in &spec.containers {
        add(&mut total, &container_requests(c, side));
    }
    let mut sidecars = Requests::new();
    let mut init_peak = Requests::new();
    for c in spec.init_containers.iter().flatten() {
        let own = container_requests(c, side);
        if is_sidecar(c) {
            add(&mut total, &own);
            add(&mut sidecars, &own);
            max_into(&mut init_peak, &sidecars);
        } else {
            let mut while_running = own;
            add(&mut while_running, &sidecars);
            max_into(&mut init_peak, &while_running);
        }
    }
    max_into(&mut total, &init_peak);
    if let Some(pod_level) = spec.resources.as_ref().and_then(|r| side_of(r, side)) {
        for (k, q) in pod_level {
            // Pod-level resources cover CPU and memory (upstream's supported set).
            if matches!(k.as_str(), "cpu" | "memory")
                && let Ok(m) = parse_milli(&q.0)
            {
                total.insert(k.clone(), m);
            }
        }
    }
    if let Some(overhead) = spec.overhead.as_ref() {
        let o: Requests = overhead
            .iter()
            .filter_map(|(k, q)| parse_milli(&q.0).ok().map(|m| (k.clone(), m)))
            .collect();
        add(&mut total, &o);
    }
    total
}

/// The first resource quantity of the pod (its containers', init containers', pod-level and
/// overhead requests and limits) or of the node's allocatable that cannot be read:
/// (whose, resource, quantity).
fn unreadable_quantity(pod: &Pod, node: &Node) -> Option<(&'static str, String, String)> {
    let bad = |list: Option<&BTreeMap<String, Quantity>>| {
        list.into_iter()
            .flatten()
            .find(|(_, q)| parse_milli(&q.0).is_err())
            .map(|(k, q)| (k.clone(), q.0.clone()))
    };
    let spec = pod.spec.as_ref()?;
    let requirements = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.resources.as_ref())
        .chain(spec.resources.as_ref());
    for r in requirements {
        if let Some((k, q)) = bad(r.requests.as_ref()).or_else(|| bad(r.limits.as_ref())) {
            return Some(("pod's", k, q));
        }
    }
    if let Some((k, q)) = bad(spec.overhead.as_ref()) {
        return Some(("pod's", k, q));
    }
    let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    bad(allocatable).map(|(k, q)| ("node's", k, q))
}

fn milli_of(list: Option<&BTreeMap<String, Quantity>>, name: &str) -> Option<i128> {
    list.and_then(|l| l.get(name))
        .and_then(|q| parse_milli(&q.0).ok())
}

/// The value upstream prints for a resource in its messages: millicores for CPU, whole units
/// otherwise.
fn shown(resource: &str, milli: i128) -> i128 {
    if resource == "cpu" {
        milli
    } else {
        (milli + 999).div_euclid(1000)
    }
}

fn out_of(resource: &str, requested: i128, used: i128, capacity: i128) -> Rejection {
    Rejection {
        reason: format!("OutOf{resource}"),
        message: format!(
            "Node didn't have enough resource: {resource}, requested: {}, used: {}, capacity: {}",
            shown(resource, requested),
            shown(resource, used),
            shown(resource, capacity)
        ),
    }
}

fn fits(pod: &Pod, admitted: &[&Pod], node: &Node) -> Option<Rejection> {
    let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    if let Some(max_pods) = milli_of(allocatable, "pods").map(|m| m / 1000)
        && admitted.len() as i128 + 1 > max_pods
    {
        return Some(Rejection {
            reason: "OutOfpods".into(),
            message: format!(
                "Node didn't have enough resource: pods, requested: 1, used: {}, capacity: {max_pods}",
                admitted.len()
            ),
        });
    }
    let want = pod_requests(pod);
    let mut used = Requests::new();
    for p in admitted {
        add(&mut used, &pod_requests(p));
    }
    // Upstream checks cpu, memory, ephemeral-storage, then extended resources by name; an
    // extended resource the node does not know is left to cluster-level allocation.
    let mut order: Vec<&String> = ["cpu", "memory", "ephemeral-storage"]
        .iter()
        .filter_map(|r| want.get_key_value(*r).map(|(k, _)| k))
        .collect();
    order.extend(
        want.keys()
            .filter(|k| !matches!(k.as_str(), "cpu" | "memory" | "ephemeral-storage")),
    );
    for r in order {
        let requested = want[r];
        if requested <= 0 {
            continue;
        }
        let Some(capacity) = milli_of(allocatable, r) else {
            continue;
        };
        let in_use = used.get(r).copied().unwrap_or(0);
        if requested > capacity - in_use {
            return Some(out_of(r, requested, in_use, capacity));
        }
    }
    None
}

fn requirement_matches(req: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    let have = labels.get(&req.key);
    match req.operator.as_str() {
        "In" => have.is_some_and(|v| values.contains(v)),
        "NotIn" => have.is_none_or(|v| !values.contains(v)),
        "Exists" => have.is_some(),
        "DoesNotExist" => have.is_none(),
        op @ ("Gt" | "Lt") => {
            let (Some(v), Some(bound)) = (
                have.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if op == "Gt" { v > bound } else { v < bound }
        }
        _ => false,
    }
}

fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        // An empty term matches no node.
        return false;
    }
    let node_fields = BTreeMap::from([(
        "metadata.name".to_string(),
        node.metadata.name.clone().unwrap_or_default(),
    )]);
    exprs.iter().all(|r| requirement_matches(r, &labels))
        && fields.iter().all(|r| requirement_matches(r, &node_fields))
}

fn affinity_matches(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if let Some(sel) = spec.node_selector.as_ref()
        && !sel.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)))
}

fn host_ports(pod: &Pod) -> BTreeSet<(String, String, i32)> {
    let Some(spec) = pod.spec.as_ref() else {
        return BTreeSet::new();
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let hp = p.host_port.filter(|hp| *hp > 0)?;
            let ip = p
                .host_ip
                .clone()
                .filter(|ip| !ip.is_empty())
                .unwrap_or_else(|| "0.0.0.0".into());
            Some((ip, p.protocol.clone().unwrap_or_else(|| "TCP".into()), hp))
        })
        .collect()
}

fn ports_conflict(a: &(String, String, i32), b: &(String, String, i32)) -> bool {
    let wildcard = |ip: &str| ip == "0.0.0.0" || ip == "::";
    a.1 == b.1 && a.2 == b.2 && (a.0 == b.0 || wildcard(&a.0) || wildcard(&b.0))
}

fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if t.effect
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != taint.effect)
    {
        return false;
    }
    if t.key
        .as_deref()
        .is_some_and(|k| !k.is_empty() && k != taint.key)
    {
        return false;
    }
    match t.operator.as_deref() {
        Some("Exists") => true,
        Some("Equal") | None | Some("") => {
            t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        Some(_) => false,
    }
}

fn is_static(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubernetes.io/config.source"))
        .is_some_and(|s| s != "api")
}

/// Decides whether `pod` may run on `node`, given the pods already admitted there (terminated
/// ones excluded by the caller). `Ok` admits; `Err` carries the status reason and message.
pub fn admit(pod: &Pod, admitted: &[&Pod], node: &Node) -> Result<(), Rejection> {
    let spec = pod.spec.clone().unwrap_or_default();
    if let Some(os) = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/os"))
        && os != "linux"
    {
        return Err(Rejection {
            reason: "PodOSSelectorNodeLabelDoesNotMatch".into(),
            message: "Failed to admit pod as the `kubernetes.io/os` label doesn't match node label"
                .into(),
        });
    }
    if spec.os.as_ref().is_some_and(|o| o.name != "linux") {
        return Err(Rejection {
            reason: "PodOSNotSupported".into(),
            message: "Failed to admit pod as the OS field doesn't match node OS".into(),
        });
    }
    if let Some((whose, resource, quantity)) = unreadable_quantity(pod, node) {
        // The API server validated it; a quantity this kubelet cannot read is its own failing,
        // and admitting the pod would count it as nothing.
        return Err(Rejection {
            reason: "UnexpectedAdmissionError".into(),
            message: format!(
                "Allocate failed due to an unreadable {whose} quantity {quantity:?} of {resource}, which is unexpected"
            ),
        });
    }
    if let Some(r) = fits(pod, admitted, node) {
        return Err(r);
    }
    if !affinity_matches(pod, node) {
        return Err(Rejection::predicate(
            "NodeAffinity",
            "node(s) didn't match Pod's node affinity/selector",
        ));
    }
    if let Some(name) = spec.node_name.as_deref().filter(|n| !n.is_empty())
        && Some(name) != node.metadata.name.as_deref()
    {
        return Err(Rejection::predicate(
            "NodeName",
            "node(s) didn't match the requested node name",
        ));
    }
    let wanted = host_ports(pod);
    if !wanted.is_empty() {
        let taken: Vec<_> = admitted.iter().flat_map(|p| host_ports(p)).collect();
        if wanted
            .iter()
            .any(|w| taken.iter().any(|t| ports_conflict(w, t)))
        {
            return Err(Rejection::predicate(
                "NodePorts",
                "node(s) didn't have free ports for the requested pod ports",
            ));
        }
    }
    if !is_static(pod) {
        let tolerations = spec.tolerations.unwrap_or_default();
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let untolerated = taints
            .iter()
            .filter(|t| t.effect == "NoExecute")
            .any(|taint| !tolerations.iter().any(|t| tolerates(t, taint)));
        if untolerated {
            return Err(Rejection::predicate(
                "TaintToleration",
                "node(s) had untolerated taint(s)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "d"}, "spec": spec}))
            .unwrap()
    }

    fn node(allocatable: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {"zone": "a", "kubernetes.io/os": "linux", "rank": "5"}},
            "spec": {"taints": [{"key": "gone", "effect": "NoExecute"}, {"key": "soft", "effect": "NoSchedule"}]},
            "status": {"allocatable": allocatable},
        }))
        .unwrap()
    }

    fn with_requests(cpu: &str, mem: &str) -> Pod {
        pod(
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": mem}}}],
                   "tolerations": [{"key": "gone", "operator": "Exists"}]}),
        )
    }

    #[test]
    fn requests_count_sidecars_init_peaks_and_overhead() {
        let p = pod(json!({
            "initContainers": [
                {"name": "side", "restartPolicy": "Always", "resources": {"requests": {"cpu": "200m"}}},
                {"name": "big-init", "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}},
            ],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}},
                {"name": "b", "resources": {"requests": {"cpu": "250m"}}},
            ],
            "overhead": {"cpu": "100m"},
        }));
        let r = pod_requests(&p);
        // Init peak: 2 CPUs + the 200m sidecar started before it, beats 950m of long-running.
        assert_eq!(r["cpu"], 2200 + 100);
        assert_eq!(r["memory"], (1i128 << 30) * 1000);
        let plain = with_requests("1", "1Gi");
        assert_eq!(pod_requests(&plain)["cpu"], 1000);
    }

    #[test]
    fn resources_refused_with_upstream_reasons_and_messages() {
        let n = node(json!({"cpu": "2", "memory": "4Gi", "pods": "2"}));
        let running = with_requests("1500m", "1Gi");
        let e = admit(&with_requests("1", "1Gi"), &[&running], &n).unwrap_err();
        assert_eq!(e.reason, "OutOfcpu");
        assert_eq!(
            e.message,
            "Node didn't have enough resource: cpu, requested: 1000, used: 1500, capacity: 2000"
        );
        let e = admit(&with_requests("100m", "5Gi"), &[], &n).unwrap_err();
        assert_eq!(e.reason, "OutOfmemory");
        assert!(
            e.message.contains(&format!("requested: {}", 5i128 << 30)),
            "{}",
            e.message
        );
        let e = admit(&with_requests("1m", "1"), &[&running, &running], &n).unwrap_err();
        assert_eq!(e.reason, "OutOfpods");
        assert!(admit(&with_requests("500m", "1Gi"), &[&running], &n).is_ok());
    }

    #[test]
    fn a_quantity_the_kubelet_cannot_read_is_an_unexpected_admission_error() {
        let n = node(json!({"cpu": "2", "memory": "4Gi", "pods": "110"}));
        // Beyond what the kubelet's arithmetic holds: not counted as nothing, refused.
        let huge = with_requests("100m", "999999999999999999999999999999999999999999Ei");
        let e = admit(&huge, &[], &n).unwrap_err();
        assert_eq!(e.reason, "UnexpectedAdmissionError");
        assert!(
            e.message.contains("memory") && e.message.contains("unexpected"),
            "{}",
            e.message
        );
        let bad_node = node(json!({"cpu": "2", "memory": "4Gi", "pods": "two"}));
        let e = admit(&with_requests("100m", "1Gi"), &[], &bad_node).unwrap_err();
        assert_eq!(e.reason, "UnexpectedAdmissionError");
        assert!(
            e.message.contains("node's") && e.message.contains("pods"),
            "{}",
            e.message
        );
    }

    #[test]
    fn affinity_selector_ports_and_taints() {
        let n = node(json!({"cpu": "2", "memory": "4Gi", "pods": "110"}));
        let tol = json!([{"key": "gone", "operator": "Exists"}]);
        let sel = pod(
            json!({"containers": [{"name": "c"}], "nodeSelector": {"zone": "b"}, "tolerations": tol}),
        );
        assert_eq!(admit(&sel, &[], &n).unwrap_err().reason, "NodeAffinity");
        let aff = |op: &str, vals: serde_json::Value| {
            pod(
                json!({"containers": [{"name": "c"}], "tolerations": tol, "affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "rank", "operator": op, "values": vals}]}]}}}}),
            )
        };
        assert!(admit(&aff("Gt", json!(["4"])), &[], &n).is_ok());
        let e = admit(&aff("Lt", json!(["4"])), &[], &n).unwrap_err();
        assert_eq!(e.reason, "NodeAffinity");
        assert_eq!(
            e.message,
            "Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector"
        );
        assert!(admit(&aff("In", json!(["5", "6"])), &[], &n).is_ok());
        // Host ports: the same port and protocol on overlapping addresses conflicts.
        let hp = |ip: &str, proto: &str| {
            pod(
                json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080, "hostIP": ip, "protocol": proto}]}], "tolerations": tol}),
            )
        };
        let holder = hp("", "TCP");
        assert_eq!(
            admit(&hp("10.0.0.1", "TCP"), &[&holder], &n)
                .unwrap_err()
                .reason,
            "NodePorts"
        );
        assert!(admit(&hp("10.0.0.1", "UDP"), &[&holder], &n).is_ok());
        // NoExecute taints need a toleration; NoSchedule ones are the scheduler's business.
        let bare = pod(json!({"containers": [{"name": "c"}]}));
        assert_eq!(admit(&bare, &[], &n).unwrap_err().reason, "TaintToleration");
        let mut static_pod = bare.clone();
        static_pod.metadata.annotations = Some(BTreeMap::from([(
            "kubernetes.io/config.source".into(),
            "file".into(),
        )]));
        assert!(admit(&static_pod, &[], &n).is_ok());
        let equal = pod(
            json!({"containers": [{"name": "c"}], "tolerations": [{"key": "gone", "operator": "Equal", "value": "", "effect": "NoExecute"}]}),
        );
        assert!(admit(&equal, &[], &n).is_ok());
        let windows = pod(
            json!({"containers": [{"name": "c"}], "os": {"name": "windows"}, "tolerations": tol}),
        );
        assert_eq!(
            admit(&windows, &[], &n).unwrap_err().reason,
            "PodOSNotSupported"
        );
    }
}
