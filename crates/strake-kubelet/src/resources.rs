//! Container resources: Kubernetes quantities, the CRI's Linux resources (cgroup CPU shares,
//! CFS quota, memory limit, OOM score) derived from requests and limits, and the values
//! `resourceFieldRef` exposes to a container. Pure functions, upstream's rules.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::{Container, ResourceFieldSelector};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use strake_types::cri;

/// The CFS period the kubelet gives every container (100 ms, upstream's default).
pub const CPU_PERIOD_US: i64 = 100_000;
/// Smallest CFS quota the kernel accepts (1 ms).
const MIN_QUOTA_US: i64 = 1_000;
/// cgroup CPU shares bounds (v1 `cpu.shares`).
const MIN_SHARES: i64 = 2;
const MAX_SHARES: i64 = 262_144;
const SHARES_PER_CPU: i64 = 1024;
/// OOM score adjustments per QoS class (upstream's `pkg/kubelet/qos`).
const GUARANTEED_OOM_SCORE_ADJ: i64 = -997;
const BESTEFFORT_OOM_SCORE_ADJ: i64 = 1000;

/// A quantity that is not one Kubernetes accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid quantity {0:?}")]
pub struct BadQuantity(pub String);

/// Parses a Kubernetes quantity (`500m`, `1.5`, `64Mi`, `1G`, `1e3`) into thousandths of its
/// unit, rounding up like upstream's `MilliValue`. Thousandths keep CPU exact (1 CPU = 1000)
/// and bytes within i128 (a quantity is at most 2^63-1 units).
pub fn parse_milli(q: &str) -> Result<i128, BadQuantity> {
    let bad = || BadQuantity(q.to_string());
    let s = q.trim();
    let (sign, s) = match s.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, s.strip_prefix('+').unwrap_or(s)),
    };
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    if num.is_empty() || num == "." {
        return Err(bad());
    }
    // (multiplier numerator, power of ten) applied to the number, in thousandths.
    let (mult, exp10): (i128, i32) = match suffix {
        "" => (1, 3),
        "m" => (1, 0),
        "n" => (1, -6),
        "u" => (1, -3),
        "k" => (1, 6),
        "M" => (1, 9),
        "G" => (1, 12),
        "T" => (1, 15),
        "P" => (1, 18),
        "E" => (1, 21),
        "Ki" => (1 << 10, 3),
        "Mi" => (1 << 20, 3),
        "Gi" => (1 << 30, 3),
        "Ti" => (1 << 40, 3),
        "Pi" => (1 << 50, 3),
        "Ei" => (1 << 60, 3),
        e if e.starts_with(['e', 'E']) => {
            let n: i32 = e[1..].parse().map_err(|_| bad())?;
            (1, n.checked_add(3).ok_or_else(bad)?)
        }
        _ => return Err(bad()),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.contains('.') {
        return Err(bad());
    }
    let digits = format!("{int}{frac}");
    let mut value: i128 = digits.parse().map_err(|_| bad())?;
    let mut exp = exp10 - frac.len() as i32;
    value = value.checked_mul(mult).ok_or_else(bad)?;
    // `0e999999999` is zero: no need to scale it that many times.
    if value == 0 {
        exp = 0;
    }
    while exp > 0 {
        value = value.checked_mul(10).ok_or_else(bad)?;
        exp -= 1;
    }
    let mut rounded_up = false;
    while exp < 0 {
        rounded_up |= value % 10 != 0;
        value /= 10;
        exp += 1;
    }
    if rounded_up {
        value += 1;
    }
    // What a quantity can hold: at most 2^63-1 units; bigger ones are that many.
    Ok(sign * value.min(MAX_MILLI))
}

/// The largest quantity, in thousandths: 2^63-1 units.
pub const MAX_MILLI: i128 = i64::MAX as i128 * 1000;

fn milli_of(map: Option<&BTreeMap<String, Quantity>>, name: &str) -> Option<i128> {
    map?.get(name).and_then(|q| parse_milli(&q.0).ok())
}

/// Whole units of a quantity in thousandths, rounded up (upstream's `Value`).
fn units(milli: i128) -> i128 {
    (milli + 999).div_euclid(1000)
}

/// `cpu.shares` for a CPU request in millicores (upstream's `MilliCPUToShares`).
pub fn cpu_shares(milli_cpu: i128) -> i64 {
    if milli_cpu <= 0 {
        return MIN_SHARES;
    }
    let shares = milli_cpu * SHARES_PER_CPU as i128 / 1000;
    shares.clamp(MIN_SHARES.into(), MAX_SHARES.into()) as i64
}

/// The CFS quota for a CPU limit in millicores over `period` µs; 0 (no quota) without a limit.
pub fn cpu_quota(milli_cpu: i128, period: i64) -> i64 {
    if milli_cpu <= 0 {
        return 0;
    }
    let quota = milli_cpu.saturating_mul(period.into()) / 1000;
    quota.clamp(MIN_QUOTA_US.into(), i64::MAX.into()) as i64
}

/// The OOM score adjustment of a container (upstream's `GetContainerOOMScoreAdjust`):
/// Guaranteed pods -997, BestEffort 1000, Burstable scaled by the memory request's share of
/// the node's memory, within 3..=999.
pub fn oom_score_adj(qos: &str, memory_request: i128, memory_capacity: u64) -> i64 {
    match qos {
        "Guaranteed" => GUARANTEED_OOM_SCORE_ADJ,
        "BestEffort" => BESTEFFORT_OOM_SCORE_ADJ,
        _ => {
            let cap = i128::from(memory_capacity.max(1));
            let adj = (1000 - (1000 * memory_request) / cap) as i64;
            let floor = 1000 + GUARANTEED_OOM_SCORE_ADJ;
            if adj < floor {
                floor
            } else if adj >= BESTEFFORT_OOM_SCORE_ADJ {
                BESTEFFORT_OOM_SCORE_ADJ - 1
            } else {
                adj
            }
        }
    }
}

/// The CRI Linux resources of container `c` in a pod of QoS class `qos` on a node with
/// `memory_capacity` bytes. Requests default to limits (the API server does this for stored
/// pods; static pods may lack it).
pub fn linux_resources(
    c: &Container,
    qos: &str,
    memory_capacity: u64,
) -> cri::LinuxContainerResources {
    let res = c.resources.clone().unwrap_or_default();
    let req = res.requests.as_ref();
    let lim = res.limits.as_ref();
    let cpu_limit = milli_of(lim, "cpu").unwrap_or(0);
    let cpu_request = milli_of(req, "cpu").unwrap_or(cpu_limit);
    let mem_limit = milli_of(lim, "memory").map(units).unwrap_or(0);
    let mem_request = milli_of(req, "memory").map(units).unwrap_or(mem_limit);
    cri::LinuxContainerResources {
        cpu_period: CPU_PERIOD_US,
        cpu_quota: cpu_quota(cpu_limit, CPU_PERIOD_US),
        cpu_shares: cpu_shares(cpu_request),
        memory_limit_in_bytes: mem_limit.clamp(0, i64::MAX as i128) as i64,
        oom_score_adj: oom_score_adj(qos, mem_request, memory_capacity),
        ..Default::default()
    }
}

/// What the node offers a container without a limit (upstream defaults `limits.*` of
/// `resourceFieldRef` to the node's allocatable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAllocatable {
    /// CPU in millicores.
    pub milli_cpu: i128,
    /// Memory in bytes.
    pub memory: i128,
    /// Ephemeral storage in bytes.
    pub ephemeral_storage: i128,
}

impl NodeAllocatable {
    /// This machine's CPUs and memory, read once (ephemeral storage is not counted yet and
    /// reads as 0).
    pub fn of_this_machine() -> Self {
        static CACHE: OnceLock<NodeAllocatable> = OnceLock::new();
        *CACHE.get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i128;
            let memory = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|t| crate::machine::parse_meminfo_total(&t))
                .unwrap_or(0) as i128;
            NodeAllocatable {
                milli_cpu: cpus * 1000,
                memory,
                ephemeral_storage: 0,
            }
        })
    }
}

/// The value `resourceFieldRef` gives container `c` (upstream's
/// `ExtractContainerResourceValue`): the request or limit divided by the divisor (default 1),
/// rounded up; limits default to the node's allocatable.
pub fn field_value(
    sel: &ResourceFieldSelector,
    c: &Container,
    node: &NodeAllocatable,
) -> Result<String, String> {
    let res = c.resources.clone().unwrap_or_default();
    let (which, name) = sel
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {:?}", sel.resource))?;
    let map = match which {
        "limits" => res.limits.as_ref(),
        "requests" => res.requests.as_ref(),
        _ => return Err(format!("unsupported resource {:?}", sel.resource)),
    };
    // In thousandths, like every parsed quantity.
    let node_default = match name {
        "cpu" => node.milli_cpu,
        "memory" => node.memory * 1000,
        "ephemeral-storage" => node.ephemeral_storage * 1000,
        _ => return Err(format!("unsupported resource {:?}", sel.resource)),
    };
    let value = match (milli_of(map, name), which) {
        (Some(v), _) => v,
        (None, "limits") => node_default,
        // A missing request reads as its limit (API defaulting), else zero.
        (None, _) => milli_of(res.limits.as_ref(), name).unwrap_or(0),
    };
    // The API server stores an omitted divisor as "0", which means 1.
    let divisor = match &sel.divisor {
        Some(d) => parse_milli(&d.0).map_err(|e| e.to_string())?,
        None => 0,
    };
    let divisor = if divisor == 0 { 1000 } else { divisor };
    if divisor < 0 {
        return Err(format!("invalid divisor {:?}", sel.divisor));
    }
    // Both are thousandths of a unit, so the quotient is exact up to the rounding.
    Ok(((value + divisor - 1).div_euclid(divisor)).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;

    fn container(req: &[(&str, &str)], lim: &[(&str, &str)]) -> Container {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect()
            })
        };
        Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: map(req),
                limits: map(lim),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn quantities_parse_to_thousandths_rounding_up() {
        for (q, want) in [
            ("1", 1000),
            ("500m", 500),
            ("0.5", 500),
            ("1.5", 1500),
            ("100Mi", 100 * 1024 * 1024 * 1000),
            ("1Gi", 1024 * 1024 * 1024 * 1000),
            ("1k", 1_000_000),
            ("1M", 1_000_000_000),
            ("1e3", 1_000_000),
            ("1n", 1),
            ("1.0001m", 2),
            ("0", 0),
        ] {
            assert_eq!(parse_milli(q), Ok(want), "{q}");
        }
        for q in ["", "abc", "1Qi", "1..2", "Mi", "."] {
            assert!(parse_milli(q).is_err(), "{q}");
        }
    }

    /// Found by `fuzz/fuzz_targets/quantity_duration.rs`
    /// (`fuzz/artifacts/quantity_duration/crash-09cb3c...`): a 34-digit quantity came back
    /// beyond what a quantity holds, and CPU settings derived from it wrapped around.
    #[test]
    fn huge_quantities_saturate_and_zero_exponents_end_at_once() {
        let huge = "9223372036854337203685477580775807";
        assert_eq!(parse_milli(huge), Ok(MAX_MILLI));
        assert_eq!(parse_milli(&format!("-{huge}")), Ok(-MAX_MILLI));
        assert_eq!(parse_milli("8Ei"), Ok(MAX_MILLI));
        assert_eq!(cpu_quota(MAX_MILLI, 100_000), i64::MAX);
        assert_eq!(cpu_shares(MAX_MILLI), MAX_SHARES);
        // Would multiply by ten two billion times.
        assert_eq!(parse_milli("0e2000000000"), Ok(0));
        assert!(parse_milli("1e2000000000").is_err());
    }

    #[test]
    fn shares_and_quota_follow_upstream() {
        assert_eq!(cpu_shares(0), 2);
        assert_eq!(cpu_shares(1), 2);
        assert_eq!(cpu_shares(100), 102);
        assert_eq!(cpu_shares(1000), 1024);
        assert_eq!(cpu_shares(1_000_000), 262_144);
        assert_eq!(cpu_quota(0, CPU_PERIOD_US), 0);
        assert_eq!(cpu_quota(500, CPU_PERIOD_US), 50_000);
        assert_eq!(cpu_quota(2000, CPU_PERIOD_US), 200_000);
        assert_eq!(cpu_quota(1, CPU_PERIOD_US), 1_000);
    }

    #[test]
    fn oom_score_by_qos() {
        let gib = 1u64 << 30;
        assert_eq!(oom_score_adj("Guaranteed", 0, gib), -997);
        assert_eq!(oom_score_adj("BestEffort", 0, gib), 1000);
        assert_eq!(oom_score_adj("Burstable", (gib / 2) as i128, gib), 500);
        assert_eq!(oom_score_adj("Burstable", 0, gib), 999);
        assert_eq!(oom_score_adj("Burstable", gib as i128, gib), 3);
    }

    #[test]
    fn linux_resources_from_requests_and_limits() {
        let c = container(
            &[("cpu", "250m"), ("memory", "32Mi")],
            &[("cpu", "500m"), ("memory", "64Mi")],
        );
        let r = linux_resources(&c, "Burstable", 1 << 30);
        assert_eq!(r.cpu_shares, 256);
        assert_eq!(r.cpu_quota, 50_000);
        assert_eq!(r.cpu_period, 100_000);
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        assert_eq!(r.oom_score_adj, 1000 - 1000 * 32 / 1024);
        // Limits only: requests default to them.
        let c = container(&[], &[("cpu", "1"), ("memory", "1Gi")]);
        let r = linux_resources(&c, "Guaranteed", 4 << 30);
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.oom_score_adj),
            (1024, 100_000, -997)
        );
        // Nothing: minimum shares, no quota, no memory limit.
        let r = linux_resources(&container(&[], &[]), "BestEffort", 1 << 30);
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.memory_limit_in_bytes),
            (2, 0, 0)
        );
    }

    #[test]
    fn resource_field_values_divide_round_up_and_default_to_the_node() {
        let node = NodeAllocatable {
            milli_cpu: 2000,
            memory: 4 << 30,
            ephemeral_storage: 0,
        };
        let sel = |r: &str, d: Option<&str>| ResourceFieldSelector {
            resource: r.into(),
            divisor: d.map(|d| Quantity(d.into())),
            container_name: None,
        };
        let c = container(
            &[("cpu", "250m"), ("memory", "32Mi")],
            &[("cpu", "500m"), ("memory", "64Mi")],
        );
        assert_eq!(
            field_value(&sel("limits.cpu", None), &c, &node).as_deref(),
            Ok("1")
        );
        assert_eq!(
            field_value(&sel("limits.cpu", Some("1m")), &c, &node).as_deref(),
            Ok("500")
        );
        assert_eq!(
            field_value(&sel("requests.cpu", Some("1m")), &c, &node).as_deref(),
            Ok("250")
        );
        assert_eq!(
            field_value(&sel("limits.memory", Some("1Mi")), &c, &node).as_deref(),
            Ok("64")
        );
        assert_eq!(
            field_value(&sel("requests.memory", None), &c, &node).as_deref(),
            Ok("33554432")
        );
        let none = container(&[], &[]);
        assert_eq!(
            field_value(&sel("limits.cpu", None), &none, &node).as_deref(),
            Ok("2")
        );
        assert_eq!(
            field_value(&sel("limits.memory", Some("1Gi")), &none, &node).as_deref(),
            Ok("4")
        );
        assert_eq!(
            field_value(&sel("requests.cpu", None), &none, &node).as_deref(),
            Ok("0")
        );
        assert!(field_value(&sel("limits.gpu", None), &c, &node).is_err());
        assert_eq!(
            field_value(&sel("limits.cpu", Some("0")), &c, &node).as_deref(),
            Ok("1")
        );
        assert!(field_value(&sel("limits.cpu", Some("-1")), &c, &node).is_err());
    }
}
