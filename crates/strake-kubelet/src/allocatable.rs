//! Node allocatable: what is left of the node's capacity for pods once `kubeReserved`,
//! `systemReserved` and the hard eviction thresholds are set aside, as upstream's container
//! manager computes it (`GetNodeAllocatableReservation`, `hardEvictionReservation`). Also the
//! eviction thresholds themselves (`evictionHard`), parsed once at start with upstream's rules so
//! a bad value is refused with the field it came from. Pure functions.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::resources::parse_milli;

/// The signals a threshold may name (upstream's `pkg/kubelet/eviction/api`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Signal {
    MemoryAvailable,
    NodeFsAvailable,
    NodeFsInodesFree,
    ImageFsAvailable,
    ImageFsInodesFree,
    ContainerFsAvailable,
    ContainerFsInodesFree,
    PidAvailable,
    AllocatableMemoryAvailable,
}

impl Signal {
    const ALL: [(Signal, &'static str); 9] = [
        (Signal::MemoryAvailable, "memory.available"),
        (Signal::NodeFsAvailable, "nodefs.available"),
        (Signal::NodeFsInodesFree, "nodefs.inodesFree"),
        (Signal::ImageFsAvailable, "imagefs.available"),
        (Signal::ImageFsInodesFree, "imagefs.inodesFree"),
        (Signal::ContainerFsAvailable, "containerfs.available"),
        (Signal::ContainerFsInodesFree, "containerfs.inodesFree"),
        (Signal::PidAvailable, "pid.available"),
        (
            Signal::AllocatableMemoryAvailable,
            "allocatableMemory.available",
        ),
    ];

    /// The signal's name in configuration and in messages.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("", |(_, n)| n)
    }

    pub fn parse(name: &str) -> Option<Signal> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(s, _)| *s)
    }
}

/// A threshold's value: an absolute quantity (in the signal's unit) or a share of capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ThresholdValue {
    /// Thousandths of the unit (bytes, inodes, PIDs), as [`parse_milli`] returns.
    Milli(i128),
    /// 0 < fraction < 1.
    Fraction(f64),
}

impl ThresholdValue {
    /// The threshold in whole units for a resource of `capacity` units (upstream's
    /// `GetThresholdQuantity`: a percentage is truncated).
    pub fn units_of(self, capacity: i128) -> i128 {
        match self {
            ThresholdValue::Milli(m) => (m + 999).div_euclid(1000),
            ThresholdValue::Fraction(f) => (capacity as f64 * f) as i128,
        }
    }
}

/// One eviction threshold: the signal falls below `value`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    pub signal: Signal,
    pub value: ThresholdValue,
}

/// A threshold or reservation the configuration cannot hold.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ThresholdError {
    #[error("{field}: unsupported eviction signal {signal:?}")]
    Signal { field: String, signal: String },
    #[error("{field}[{signal}]: invalid value {value:?}: {reason}")]
    Value {
        field: String,
        signal: String,
        value: String,
        reason: &'static str,
    },
    #[error("{field}: invalid statement {statement:?} (want SIGNAL<VALUE)")]
    Statement { field: String, statement: String },
    #[error("{field}[{resource}]: invalid quantity {value:?}")]
    Quantity {
        field: String,
        resource: String,
        value: String,
    },
}

/// Upstream's default `evictionHard` on Linux, used when the configuration names none.
pub const DEFAULT_EVICTION_HARD: [(&str, &str); 5] = [
    ("memory.available", "100Mi"),
    ("nodefs.available", "10%"),
    ("nodefs.inodesFree", "5%"),
    ("imagefs.available", "15%"),
    ("imagefs.inodesFree", "5%"),
];

/// The default `evictionHard` as a map.
pub fn default_eviction_hard() -> BTreeMap<String, String> {
    DEFAULT_EVICTION_HARD
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parses a `--eviction-hard` style flag (`memory.available<100Mi,nodefs.available<10%`).
pub fn parse_statements(
    field: &str,
    statements: &[String],
) -> Result<BTreeMap<String, String>, ThresholdError> {
    let mut out = BTreeMap::new();
    for s in statements
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        let (signal, value) = s.split_once('<').ok_or_else(|| ThresholdError::Statement {
            field: field.to_string(),
            statement: s.to_string(),
        })?;
        out.insert(signal.trim().to_string(), value.trim().to_string());
    }
    Ok(out)
}

/// Parses a threshold map (`evictionHard`), with upstream's rules: a known signal; `0%` and
/// `100%` are ignored; a percentage within 0..100; a quantity above zero.
pub fn parse_thresholds(
    field: &str,
    map: &BTreeMap<String, String>,
) -> Result<Vec<Threshold>, ThresholdError> {
    let mut out = Vec::new();
    for (name, value) in map {
        let signal = Signal::parse(name).ok_or_else(|| ThresholdError::Signal {
            field: field.to_string(),
            signal: name.clone(),
        })?;
        let bad = |reason| ThresholdError::Value {
            field: field.to_string(),
            signal: name.clone(),
            value: value.clone(),
            reason,
        };
        let v = value.trim();
        let parsed = if let Some(p) = v.strip_suffix('%') {
            if v == "0%" || v == "100%" {
                continue;
            }
            let pct: f64 = p.trim().parse().map_err(|_| bad("not a percentage"))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(bad("a percentage must be within 0% and 100%"));
            }
            ThresholdValue::Fraction(pct / 100.0)
        } else {
            let m = parse_milli(v).map_err(|_| bad("not a quantity"))?;
            if m <= 0 {
                return Err(bad("must be positive"));
            }
            ThresholdValue::Milli(m)
        };
        out.push(Threshold {
            signal,
            value: parsed,
        });
    }
    Ok(out)
}

/// Parses a reservation (`kubeReserved`, `systemReserved`): resource name → thousandths.
pub fn parse_reserved(
    field: &str,
    map: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, i128>, ThresholdError> {
    map.iter()
        .map(|(k, v)| {
            let bad = || ThresholdError::Quantity {
                field: field.to_string(),
                resource: k.clone(),
                value: v.clone(),
            };
            let m = parse_milli(v).map_err(|_| bad())?;
            if m < 0 {
                return Err(bad());
            }
            Ok((k.clone(), m))
        })
        .collect()
}

/// Parses a `--kube-reserved` style flag (`cpu=100m,memory=100Mi`).
pub fn parse_pairs(
    field: &str,
    pairs: &[String],
) -> Result<BTreeMap<String, String>, ThresholdError> {
    let mut out = BTreeMap::new();
    for p in pairs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (k, v) = p.split_once('=').ok_or_else(|| ThresholdError::Quantity {
            field: field.to_string(),
            resource: p.to_string(),
            value: String::new(),
        })?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// What is set aside from capacity before pods get the rest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reservation {
    /// `kubeReserved`, thousandths per resource.
    pub kube_reserved: BTreeMap<String, i128>,
    /// `systemReserved`, thousandths per resource.
    pub system_reserved: BTreeMap<String, i128>,
    /// `evictionHard` (upstream's defaults when the configuration names none).
    pub eviction_hard: Vec<Threshold>,
}

impl Reservation {
    /// Thousandths set aside of `resource` whose capacity is `capacity_milli`: both
    /// reservations, plus the hard eviction threshold of the signal that watches it
    /// (`memory.available` for memory, `nodefs.available` for ephemeral storage).
    pub fn reserved_milli(&self, resource: &str, capacity_milli: i128) -> i128 {
        let mut total = self.kube_reserved.get(resource).copied().unwrap_or(0)
            + self.system_reserved.get(resource).copied().unwrap_or(0);
        let signal = match resource {
            "memory" => Some(Signal::MemoryAvailable),
            "ephemeral-storage" => Some(Signal::NodeFsAvailable),
            _ => None,
        };
        if let Some(t) = signal.and_then(|s| self.eviction_hard.iter().find(|t| t.signal == s)) {
            total += t.value.units_of(capacity_milli / 1000) * 1000;
        }
        total
    }
}

/// Formats thousandths of `resource` as the kubelet reports it: CPU in cores or millicores,
/// byte quantities in `Ki` where exact, else plain.
pub fn format_quantity(resource: &str, milli: i128) -> Quantity {
    let milli = milli.max(0);
    let s = if resource == "cpu" {
        if milli % 1000 == 0 {
            (milli / 1000).to_string()
        } else {
            format!("{milli}m")
        }
    } else {
        let units = milli / 1000;
        if units != 0 && units % 1024 == 0 {
            format!("{}Ki", units / 1024)
        } else {
            units.to_string()
        }
    };
    Quantity(s)
}

/// Allocatable: capacity less the reservation, never below zero, for every resource of
/// `capacity`. Unparsable capacity entries are passed through unchanged.
pub fn allocatable(
    capacity: &BTreeMap<String, Quantity>,
    reservation: &Reservation,
) -> BTreeMap<String, Quantity> {
    capacity
        .iter()
        .map(|(k, q)| {
            let v = match parse_milli(&q.0) {
                Ok(cap) => {
                    let reserved = reservation.reserved_milli(k, cap);
                    if reserved == 0 {
                        q.clone()
                    } else {
                        format_quantity(k, cap - reserved)
                    }
                }
                Err(_) => q.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn thresholds_follow_upstream_rules() {
        let t = parse_thresholds("evictionHard", &default_eviction_hard()).unwrap();
        assert_eq!(t.len(), 5);
        let mem = t
            .iter()
            .find(|t| t.signal == Signal::MemoryAvailable)
            .unwrap();
        assert_eq!(mem.value.units_of(0), 100 * 1024 * 1024);
        let nodefs = t
            .iter()
            .find(|t| t.signal == Signal::NodeFsAvailable)
            .unwrap();
        assert_eq!(nodefs.value.units_of(1000), 100);
        // 0% and 100% are ignored, as upstream.
        assert!(
            parse_thresholds("evictionHard", &map(&[("nodefs.available", "0%")]))
                .unwrap()
                .is_empty()
        );
        for (k, v, want) in [
            ("memory.free", "1Mi", "unsupported eviction signal"),
            ("memory.available", "0", "must be positive"),
            ("memory.available", "lots", "not a quantity"),
            ("nodefs.available", "150%", "within 0% and 100%"),
            ("nodefs.available", "x%", "not a percentage"),
        ] {
            let e = parse_thresholds("evictionHard", &map(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.starts_with("evictionHard"),
                "{k}={v}: {e}"
            );
        }
    }

    #[test]
    fn flag_forms_parse_and_reject_garbage() {
        let m = parse_statements(
            "--eviction-hard",
            &[
                "memory.available<200Mi".into(),
                " nodefs.available<5% ".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            m,
            map(&[("memory.available", "200Mi"), ("nodefs.available", "5%")])
        );
        assert!(parse_statements("--eviction-hard", &["memory.available=1".into()]).is_err());
        let r = parse_pairs("--kube-reserved", &["cpu=100m".into(), "memory=1Gi".into()]).unwrap();
        assert_eq!(r, map(&[("cpu", "100m"), ("memory", "1Gi")]));
        assert!(parse_pairs("--kube-reserved", &["cpu".into()]).is_err());
        let e = parse_reserved("kubeReserved", &map(&[("memory", "1Gx")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kubeReserved[memory]"), "{e}");
    }

    #[test]
    fn allocatable_subtracts_reservations_and_hard_eviction() {
        let capacity: BTreeMap<String, Quantity> = [
            ("cpu", "4"),
            ("memory", "8388608Ki"),             // 8 GiB
            ("ephemeral-storage", "10485760Ki"), // 10 GiB
            ("pods", "110"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect();
        let reservation = Reservation {
            kube_reserved: parse_reserved(
                "kubeReserved",
                &map(&[("cpu", "500m"), ("memory", "1Gi")]),
            )
            .unwrap(),
            system_reserved: parse_reserved("systemReserved", &map(&[("cpu", "250m")])).unwrap(),
            eviction_hard: parse_thresholds("evictionHard", &default_eviction_hard()).unwrap(),
        };
        let a = allocatable(&capacity, &reservation);
        assert_eq!(a["cpu"].0, "3250m");
        // 8 GiB - 1 GiB - 100 MiB.
        assert_eq!(
            a["memory"].0,
            format!("{}Ki", (8 * 1024 - 1024 - 100) * 1024)
        );
        // 10 GiB less 10 % (nodefs.available), truncated to whole bytes.
        let ten_gib: i128 = 10 << 30;
        assert_eq!(
            a["ephemeral-storage"].0,
            format_quantity("ephemeral-storage", (ten_gib - ten_gib / 10) * 1000).0
        );
        assert_eq!(a["pods"].0, "110");
        // Without reservations allocatable is capacity, unchanged.
        let none = Reservation::default();
        assert_eq!(allocatable(&capacity, &none), capacity);
        // Never below zero.
        let huge = Reservation {
            kube_reserved: parse_reserved("kubeReserved", &map(&[("cpu", "64")])).unwrap(),
            ..Default::default()
        };
        assert_eq!(allocatable(&capacity, &huge)["cpu"].0, "0");
    }
}
