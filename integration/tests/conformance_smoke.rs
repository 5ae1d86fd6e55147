//! A conformance smoke in `make test`: a few dozen of upstream's `[sig-node]` and
//! `[sig-network]` `[Conformance]` specs (e2e.test of the pinned release, through ginkgo) on a
//! 2-node all-Strake cluster. Each spec named here must run and pass; the whole set is
//! `make conformance-node-network` (docs/CONFORMANCE.md).
//!
//! Needs `make conformance-bed` (e2e.test, ginkgo, the images), which `make test` builds
//! (cached).

use strake_integration::cluster::{Cluster, NodeKind, Options};
use strake_integration::conformance::{self, RunOptions, SpecSet};

/// The specs, by their full text: quick ones that exercise the node (pod lifecycle, init
/// containers, logs and exec over WebSockets, termination messages, environment, security
/// contexts, sysctls, ephemeral containers, subpaths) and the network (DNS, Services,
/// NodePort, proxying, pod-to-pod across nodes, host ports).
const SMOKE: &[&str] = &[
    "[sig-node] InitContainer should invoke init containers on a RestartAlways pod [Conformance] [NodeConformance]",
    "[sig-node] InitContainer should not start app containers and fail the pod if init containers fail on a RestartNever pod [Conformance] [NodeConformance]",
    "[sig-node] Container Runtime blackbox test on terminated container should report termination message from file when pod succeeds and TerminationMessagePolicy FallbackToLogsOnError is set [Conformance] [NodeConformance]",
    "[sig-node] Container Runtime blackbox test on terminated container should report termination message from log output if TerminationMessagePolicy FallbackToLogsOnError is set [Conformance] [NodeConformance]",
    "[sig-node] Downward API should provide container's limits.cpu/memory and requests.cpu/memory as env vars [Conformance] [NodeConformance]",
    "[sig-node] Downward API should provide pod name, namespace and IP address as env vars [Conformance] [NodeConformance]",
    "[sig-node] Pods should support retrieving logs from the container over websockets [Conformance] [NodeConformance]",
    "[sig-node] Pods should support remote command execution over websockets [Conformance] [NodeConformance]",
    "[sig-node] Pods should be submitted and removed [Conformance] [NodeConformance]",
    "[sig-node] Pods should contain environment variables for services [Conformance] [NodeConformance]",
    "[sig-node] Ephemeral Containers will start an ephemeral container in an existing pod [Conformance] [NodeConformance]",
    "[sig-node] Security Context should support pod.Spec.SecurityContext.RunAsUser And pod.Spec.SecurityContext.RunAsGroup [LinuxOnly] [Conformance]",
    "[sig-node] Security Context when creating containers with AllowPrivilegeEscalation should not allow privilege escalation when false [LinuxOnly] [Conformance] [NodeConformance]",
    "[sig-node] Sysctls [LinuxOnly] should support sysctls [Environment:NotInUserNS] [Conformance] [NodeConformance]",
    "[sig-node] Variable Expansion should allow substituting values in a volume subpath [Conformance]",
    "[sig-node] ConfigMap should be consumable via the environment [Conformance] [NodeConformance]",
    "[sig-node] Secrets should be consumable from pods in env vars [Conformance] [NodeConformance]",
    "[sig-node] Kubelet when scheduling a busybox command in a pod should print the output to logs [Conformance] [NodeConformance]",
    "[sig-node] Kubelet when scheduling a read only busybox container should not write to root filesystem [LinuxOnly] [Conformance] [NodeConformance]",
    "[sig-node] RuntimeClass should schedule a Pod requesting a RuntimeClass and initialize its Overhead [Conformance] [NodeConformance]",
    "[sig-node] Containers should be able to override the image's default command and arguments [Conformance] [NodeConformance]",
    "[sig-network] DNS should provide DNS for the cluster [Conformance]",
    "[sig-network] DNS should support configurable pod DNS nameservers [Conformance]",
    "[sig-network] DNS should provide /etc/hosts entries for the cluster [Conformance]",
    "[sig-network] Proxy version v1 should proxy through a service and a pod [Conformance]",
    "[sig-network] Services should serve a basic endpoint from pods [Conformance]",
    "[sig-network] Services should serve multiport endpoints from pods [Conformance]",
    "[sig-network] Services should be able to create a functioning NodePort service [Conformance]",
    "[sig-network] Services should have session affinity work for service with type clusterIP [LinuxOnly] [Conformance]",
    "[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: http [Conformance] [NodeConformance]",
    "[sig-network] Networking Granular Checks: Pods should function for node-pod communication: udp [LinuxOnly] [Conformance] [NodeConformance]",
    "[sig-network] HostPort validates that there is no conflict between pods with same hostPort but different hostIP and protocol [LinuxOnly] [Conformance]",
];

/// Go regexp syntax with every metacharacter of `s` escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[test]
fn every_smoke_spec_is_a_conformance_spec_of_node_or_network() {
    for s in SMOKE {
        assert!(s.contains("[Conformance]"), "{s}");
        assert!(
            s.starts_with("[sig-node] ") || s.starts_with("[sig-network] "),
            "{s}"
        );
    }
    assert_eq!(escape("a[b](c).d"), r"a\[b\]\(c\)\.d");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_smoke_passes_on_two_strake_nodes() {
    let mut say = |line: String| eprintln!("{line}");
    let c = Cluster::start(
        &Options {
            nodes: 2,
            kind: NodeKind::Strake,
        },
        &mut say,
    )
    .await
    .expect("cluster starts");
    let reports = tempfile::tempdir().expect("tempdir");
    let focus = SMOKE
        .iter()
        .copied()
        .map(escape)
        .collect::<Vec<_>>()
        .join("|");
    let opts = RunOptions {
        set: SpecSet::NodeNetwork,
        procs: 4,
        focus: Some(focus),
        report_dir: reports.path().to_path_buf(),
    };
    let summary =
        tokio::task::block_in_place(|| conformance::run(&c, &opts, &mut std::io::stderr()))
            .expect("the conformance run");
    if summary.failed > 0 {
        let _ = c.collect_logs(&reports.path().join("logs"));
        // Kept for a look at the logs.
        let kept = reports.keep();
        panic!(
            "{}\n{:#?}\nreports in {}",
            summary.line(),
            summary.failures,
            kept.display()
        );
    }
    assert_eq!(
        (summary.passed, summary.skipped),
        (SMOKE.len(), 0),
        "every smoke spec runs and passes: {}",
        summary.line()
    );
    drop(c);
}
