//! Container and pod sandbox statistics, as the kubelet's summary API and `crictl stats` read
//! them: CPU and memory from the cgroups (v1 or v2, through [`crate::cgroups`]), the writable
//! layer from the overlay's upper directory, network counters from the pod's network namespace
//! (`/proc/<pause>/net/dev`), and process counts from the pids controller.
//!
//! Start at [`container_stats`] and [`pod_stats`]. Statistics are best effort: a counter the
//! kernel does not offer (no swap accounting, no pids controller) is left out rather than
//! failing the whole answer. The pure parts ([`nano_cores`], [`parse_net_dev`]) are
//! unit-tested; the rest only reads files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use strake_types::cri;

use crate::cgroups::ContainerCgroup;
use crate::container::{Container, Containers};
use crate::sandbox::Sandbox;

fn value(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

/// One reading of a cumulative CPU counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSample {
    /// Wall-clock time of the reading, nanoseconds since the epoch.
    pub timestamp_ns: i64,
    /// Cumulative CPU time, nanoseconds.
    pub usage_ns: u64,
}

/// Average cores in use between two readings, in billionths of a core. `None` when the
/// interval is empty or time went backwards; a counter that went backwards (a recreated cgroup)
/// reads as zero.
pub fn nano_cores(prev: CpuSample, now: CpuSample) -> Option<u64> {
    let dt = now.timestamp_ns.checked_sub(prev.timestamp_ns)?;
    if dt <= 0 {
        return None;
    }
    let used = u128::from(now.usage_ns.saturating_sub(prev.usage_ns));
    u64::try_from(used * 1_000_000_000 / dt as u128).ok()
}

/// The previous CPU reading of each container and pod, for `usage_nano_cores`.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: Mutex<HashMap<String, CpuSample>>,
}

impl CpuSampler {
    /// Records `now` for `key` and returns the rate since the previous reading, if any.
    pub fn rate(&self, key: &str, now: CpuSample) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let prev = last.insert(key.to_string(), now)?;
        nano_cores(prev, now)
    }

    /// Forgets keys no longer live (removed containers and pods).
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| live(k));
    }
}

/// Counters of one network interface, from `/proc/net/dev`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// Parses `/proc/net/dev`: two header lines, then `name: rx(8 fields) tx(8 fields)`.
pub fn parse_net_dev(text: &str) -> Vec<InterfaceCounters> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            if f.len() < 16 {
                return None;
            }
            Some(InterfaceCounters {
                name: name.trim().to_string(),
                rx_bytes: f[0],
                rx_packets: f[1],
                rx_errors: f[2],
                rx_dropped: f[3],
                tx_bytes: f[8],
                tx_packets: f[9],
                tx_errors: f[10],
                tx_dropped: f[11],
            })
        })
        .collect()
}

/// The interface CNI gives a pod, reported as its default.
pub const POD_INTERFACE: &str = "eth0";

/// The interfaces of the network namespace `pid` is in, loopback left out.
pub fn interfaces(pid: u32) -> Option<Vec<InterfaceCounters>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    let mut all = parse_net_dev(&text);
    all.retain(|i| i.name != "lo");
    Some(all)
}

/// Network usage of the namespace `pid` is in (loopback left out).
pub fn network_usage(pid: u32, timestamp: i64) -> Option<cri::NetworkUsage> {
    let interfaces: Vec<cri::NetworkInterfaceUsage> = interfaces(pid)?
        .into_iter()
        .map(|i| cri::NetworkInterfaceUsage {
            name: i.name,
            rx_bytes: value(i.rx_bytes),
            rx_errors: value(i.rx_errors),
            tx_bytes: value(i.tx_bytes),
            tx_errors: value(i.tx_errors),
        })
        .collect();
    Some(cri::NetworkUsage {
        timestamp,
        default_interface: interfaces.iter().find(|i| i.name == POD_INTERFACE).cloned(),
        interfaces,
    })
}

/// CPU usage of a cgroup; `key` names it in the sampler.
pub fn cpu_usage(
    cg: &ContainerCgroup,
    sampler: &CpuSampler,
    key: &str,
    timestamp: i64,
) -> Option<cri::CpuUsage> {
    let usage_ns = cg.cpu_usage_nanos().ok()??;
    let rate = sampler.rate(
        key,
        CpuSample {
            timestamp_ns: timestamp,
            usage_ns,
        },
    );
    Some(cri::CpuUsage {
        timestamp,
        usage_core_nano_seconds: value(usage_ns),
        usage_nano_cores: rate.and_then(value),
        psi: None,
    })
}

/// Memory usage of a cgroup: usage, working set, RSS, page faults and what is left below the
/// limit.
pub fn memory_usage(cg: &ContainerCgroup, timestamp: i64) -> Option<cri::MemoryUsage> {
    let usage = cg.memory_usage().ok()??;
    let working_set = cg.memory_working_set().ok().flatten().unwrap_or(usage);
    let stat = cg.memory_stat().ok().flatten().unwrap_or_default();
    // v1 reports the hierarchy's totals with a `total_` prefix; v2 has only those.
    let key = |v1: &str, v2: &str| match cg {
        ContainerCgroup::V1(_) => stat.get(v1).copied(),
        ContainerCgroup::V2(_) => stat.get(v2).copied(),
    };
    let limit = cg.memory_limit().ok().flatten();
    Some(cri::MemoryUsage {
        timestamp,
        working_set_bytes: value(working_set),
        available_bytes: limit.and_then(|l| value(l.saturating_sub(working_set))),
        usage_bytes: value(usage),
        rss_bytes: key("total_rss", "anon").and_then(value),
        page_faults: key("total_pgfault", "pgfault").and_then(value),
        major_page_faults: key("total_pgmajfault", "pgmajfault").and_then(value),
        psi: None,
    })
}

/// Swap usage of a cgroup, when the kernel accounts it.
pub fn swap_usage(cg: &ContainerCgroup, timestamp: i64) -> Option<cri::SwapUsage> {
    let (used, limit) = cg.swap()?;
    Some(cri::SwapUsage {
        timestamp,
        swap_available_bytes: limit.and_then(|l| value(l.saturating_sub(used))),
        swap_usage_bytes: value(used),
    })
}

/// Bytes (allocated blocks) and inodes under `dir`, symlinks not followed.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            bytes = bytes.saturating_add(meta.blocks().saturating_mul(512));
            inodes += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    (bytes, inodes)
}

/// The writable layer's usage: the overlay's upper directory.
pub fn writable_layer(upper: &Path, timestamp: i64) -> cri::FilesystemUsage {
    let (bytes, inodes) = disk_usage(upper);
    cri::FilesystemUsage {
        timestamp,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: upper.display().to_string(),
        }),
        used_bytes: value(bytes),
        inodes_used: value(inodes),
    }
}

/// The process count of a cgroup.
pub fn process_usage(cg: &ContainerCgroup, timestamp: i64) -> Option<cri::ProcessUsage> {
    Some(cri::ProcessUsage {
        timestamp,
        process_count: value(cg.pids()?),
    })
}

/// Sums containers' CPU and memory, for a pod without a cgroup of its own.
pub fn sum_containers(
    containers: &[cri::ContainerStats],
    timestamp: i64,
) -> (Option<cri::CpuUsage>, Option<cri::MemoryUsage>) {
    let total = |f: &dyn Fn(&cri::ContainerStats) -> Option<u64>| -> Option<u64> {
        containers.iter().filter_map(f).reduce(u64::saturating_add)
    };
    let cpu = total(&|c| {
        c.cpu
            .as_ref()?
            .usage_core_nano_seconds
            .as_ref()
            .map(|v| v.value)
    })
    .map(|usage| cri::CpuUsage {
        timestamp,
        usage_core_nano_seconds: value(usage),
        usage_nano_cores: total(&|c| c.cpu.as_ref()?.usage_nano_cores.as_ref().map(|v| v.value))
            .and_then(value),
        psi: None,
    });
    let mem = |pick: fn(&cri::MemoryUsage) -> Option<&cri::UInt64Value>| {
        total(&|c| c.memory.as_ref().and_then(pick).map(|v| v.value)).and_then(value)
    };
    let memory = total(&|c| c.memory.as_ref()?.usage_bytes.as_ref().map(|v| v.value)).map(|_| {
        cri::MemoryUsage {
            timestamp,
            working_set_bytes: mem(|m| m.working_set_bytes.as_ref()),
            available_bytes: None,
            usage_bytes: mem(|m| m.usage_bytes.as_ref()),
            rss_bytes: mem(|m| m.rss_bytes.as_ref()),
            page_faults: mem(|m| m.page_faults.as_ref()),
            major_page_faults: mem(|m| m.major_page_faults.as_ref()),
            psi: None,
        }
    });
    (cpu, memory)
}

/// A live process in the pod's own network namespace (its pause process, checked against a
/// recycled PID); `None` for a pod on the host's network.
pub fn network_pid(sb: &Sandbox) -> Option<u32> {
    let pid = sb.record.pause_pid.filter(|_| !sb.record.host_network)?;
    crate::sandbox::process_start_time(pid)
        .is_some_and(|t| Some(t) == sb.record.pause_start_time)
        .then_some(pid)
}

/// The sampler keys of pods' own cgroups start with this (containers are keyed by their ID).
pub const POD_SAMPLE_PREFIX: &str = "pod/";

/// The stats of one container: CPU, memory and swap while its init lives, and its writable
/// layer.
pub fn container_stats(
    containers: &Containers,
    samples: &CpuSampler,
    c: &Container,
    timestamp: i64,
) -> cri::ContainerStats {
    let cg = containers.cgroup(c);
    let id = &c.record.id;
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: id.clone(),
            metadata: c.config.metadata.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
        }),
        cpu: cg
            .as_ref()
            .and_then(|cg| cpu_usage(cg, samples, id, timestamp)),
        memory: cg.as_ref().and_then(|cg| memory_usage(cg, timestamp)),
        writable_layer: Some(writable_layer(&containers.upper_dir(id), timestamp)),
        swap: cg.as_ref().and_then(|cg| swap_usage(cg, timestamp)),
        io: None,
    }
}

/// The stats of one pod: its cgroup parent's CPU, memory and processes (the sum of its
/// containers' when it has no parent of its own), the network of its namespace and its
/// containers' stats.
pub fn pod_stats(
    containers: &Containers,
    samples: &CpuSampler,
    sb: &Sandbox,
    timestamp: i64,
) -> cri::PodSandboxStats {
    let id = &sb.record.id;
    let members: Vec<cri::ContainerStats> = containers
        .of_sandbox(id)
        .iter()
        .filter_map(|cid| containers.get(cid).ok())
        .map(|c| container_stats(containers, samples, &c, timestamp))
        .collect();
    let parent = sb
        .config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.as_str())
        .unwrap_or_default();
    // A relative parent resolves against the cgroup the monitors (and so the OCI runtime)
    // inherit from us.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let cg = containers
        .layout()
        .and_then(|l| l.pod_cgroup(containers.driver(), parent, &own))
        .filter(ContainerCgroup::exists);
    let (cpu, memory, process) = match &cg {
        Some(cg) => (
            cpu_usage(cg, samples, &format!("{POD_SAMPLE_PREFIX}{id}"), timestamp),
            memory_usage(cg, timestamp),
            process_usage(cg, timestamp),
        ),
        None => {
            let (cpu, memory) = sum_containers(&members, timestamp);
            (cpu, memory, None)
        }
    };
    let network = network_pid(sb).and_then(|pid| network_usage(pid, timestamp));
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: id.clone(),
            metadata: sb.config.metadata.clone(),
            labels: sb.config.labels.clone(),
            annotations: sb.config.annotations.clone(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu,
            memory,
            network,
            process,
            containers: members,
            io: None,
        }),
        windows: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(timestamp_ns: i64, usage_ns: u64) -> CpuSample {
        CpuSample {
            timestamp_ns,
            usage_ns,
        }
    }

    #[test]
    fn nano_cores_from_two_samples() {
        // Half a second of CPU over one second: half a core.
        assert_eq!(
            nano_cores(s(1_000_000_000, 100), s(2_000_000_000, 500_000_100)),
            Some(500_000_000)
        );
        // Two cores busy for 250 ms.
        assert_eq!(
            nano_cores(s(0, 0), s(250_000_000, 500_000_000)),
            Some(2_000_000_000)
        );
        assert_eq!(nano_cores(s(5, 0), s(5, 10)), None);
        assert_eq!(nano_cores(s(6, 0), s(5, 10)), None);
        assert_eq!(nano_cores(s(0, 900), s(1_000, 100)), Some(0));
    }

    #[test]
    fn sampler_rates_need_a_previous_reading() {
        let sampler = CpuSampler::default();
        assert_eq!(sampler.rate("c", s(0, 0)), None);
        assert_eq!(
            sampler.rate("c", s(1_000_000_000, 1_000_000_000)),
            Some(1_000_000_000)
        );
        assert_eq!(sampler.rate("other", s(1, 1)), None);
        sampler.retain(|k| k == "other");
        assert_eq!(sampler.rate("c", s(2_000_000_000, 1)), None);
    }

    #[test]
    fn net_dev_is_parsed_per_interface() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0
  eth0: 1296      16    3    5    0     0          0         0      726       9    4    6    0     0       0          0
broken: 1 2 3
";
        assert_eq!(
            parse_net_dev(text),
            vec![
                InterfaceCounters {
                    name: "lo".into(),
                    rx_bytes: 140,
                    rx_packets: 2,
                    rx_errors: 0,
                    rx_dropped: 0,
                    tx_bytes: 140,
                    tx_packets: 2,
                    tx_errors: 0,
                    tx_dropped: 0,
                },
                InterfaceCounters {
                    name: "eth0".into(),
                    rx_bytes: 1296,
                    rx_packets: 16,
                    rx_errors: 3,
                    rx_dropped: 5,
                    tx_bytes: 726,
                    tx_packets: 9,
                    tx_errors: 4,
                    tx_dropped: 6,
                },
            ]
        );
    }

    #[test]
    fn memory_and_cpu_read_from_v2_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("memory.current", "1000\n");
        write("memory.max", "4000\n");
        write(
            "memory.stat",
            "anon 600\ninactive_file 300\npgfault 42\npgmajfault 2\n",
        );
        write("cpu.stat", "usage_usec 2000\n");
        write("pids.current", "3\n");
        let cg = ContainerCgroup::V2(dir.path().to_path_buf());
        let m = memory_usage(&cg, 7).unwrap();
        assert_eq!(m.usage_bytes.unwrap().value, 1000);
        assert_eq!(m.working_set_bytes.unwrap().value, 700);
        assert_eq!(m.available_bytes.unwrap().value, 3300);
        assert_eq!(m.rss_bytes.unwrap().value, 600);
        assert_eq!(m.page_faults.unwrap().value, 42);
        assert_eq!(m.major_page_faults.unwrap().value, 2);
        let sampler = CpuSampler::default();
        let c = cpu_usage(&cg, &sampler, "k", 7).unwrap();
        assert_eq!(c.usage_core_nano_seconds.unwrap().value, 2_000_000);
        assert!(c.usage_nano_cores.is_none());
        assert_eq!(
            process_usage(&cg, 7).unwrap().process_count.unwrap().value,
            3
        );
        assert!(swap_usage(&cg, 7).is_none());

        let (cpu, mem) = sum_containers(
            &[
                cri::ContainerStats {
                    cpu: Some(c),
                    memory: Some(m),
                    ..Default::default()
                },
                cri::ContainerStats {
                    cpu: Some(c),
                    memory: Some(m),
                    ..Default::default()
                },
            ],
            8,
        );
        assert_eq!(
            cpu.unwrap().usage_core_nano_seconds.unwrap().value,
            4_000_000
        );
        assert_eq!(mem.unwrap().working_set_bytes.unwrap().value, 1400);
    }

    #[test]
    fn writable_layer_counts_bytes_and_inodes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/file"), vec![1u8; 10_000]).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("link")).unwrap();
        let w = writable_layer(dir.path(), 1);
        assert_eq!(w.inodes_used.unwrap().value, 3);
        assert!(w.used_bytes.unwrap().value >= 10_000);
    }
}
