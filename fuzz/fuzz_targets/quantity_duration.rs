//! Quantities and durations as pod specs and configuration files write them: the kubelet's
//! quantity parser (every resource request and limit), the Go duration parser every daemon's
//! flags and files use (`strake_types::duration`), reserved resources and eviction thresholds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strake_kubelet::allocatable::{
    parse_pairs, parse_reserved, parse_statements, parse_thresholds,
};
use strake_kubelet::resources::{cpu_quota, cpu_shares, parse_milli};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(milli) = parse_milli(text) {
        // Upstream's bound: a quantity is at most 2^63-1 units.
        assert!(
            milli.unsigned_abs() <= (i64::MAX as u128 + 1) * 1000,
            "{text}: {milli}"
        );
        let _ = (cpu_shares(milli), cpu_quota(milli, 100_000));
    }
    if let Ok(d) = strake_types::duration::parse(text) {
        assert!(d.as_nanos() <= i64::MAX as u128, "{text}: {d:?}");
    }
    // Flags as written on a command line: `--eviction-hard`, `--kube-reserved`.
    let flags: Vec<String> = text.split(',').map(str::to_string).collect();
    if let Ok(map) = parse_statements("evictionHard", &flags) {
        let _ = parse_thresholds("evictionHard", &map);
    }
    if let Ok(map) = parse_pairs("kubeReserved", &flags) {
        let _ = parse_reserved("kubeReserved", &map);
    }
});
