//! The systemd cgroup driver against a real systemd manager: Debian's `systemd --user`, run by
//! the test in a cgroup of its own (`strake_integration::systemd`), reached on its session
//! bus as the kubelet reaches the system manager on the system bus. The kubelet's `kubepods`, QoS and
//! pod cgroups become transient slices named as upstream names them, with upstream's values as
//! the slices' properties (read back from systemd) and in the v1 controllers' files, which the
//! kubelet writes below the test's own cgroups; a changed pod updates its existing slice; a
//! removed pod's slice is stopped and its directories go.
//!
//! The manager here tracks units in the named `systemd` v1 hierarchy and cgroup2 (this machine
//! is hybrid); a v2-only host's properties (`CPUWeight`, `MemoryMax`) are checked against the
//! same manager by the second test.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use strake_integration::systemd::UserManager;
use strake_kubelet::pod_cgroups::{PodCgroups, node_values};
use strake_types::cgroups::{CgroupLayout, CgroupMode};
use strake_types::systemd::{SLICE, Systemd, UNIT, string_of, u64_of};

const INFINITY: u64 = u64::MAX;

/// The host's hierarchies as a kubelet in a cgroup namespace rooted at the test's own cgroups
/// sees them, so every directory the kubelet makes is below the test's own cgroup.
fn own_rooted_layout() -> CgroupLayout {
    let mut layout = CgroupLayout::detect().expect("cgroup mounts");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let mut by_controller = BTreeMap::new();
    let mut unified_own = None;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if ctrls.is_empty() {
            unified_own = Some(path.trim_start_matches('/').to_string());
        }
        for c in ctrls.split(',') {
            by_controller.insert(c.to_string(), path.trim_start_matches('/').to_string());
        }
    }
    for (controller, mount) in layout.v1.iter_mut() {
        if let Some(own) = by_controller.get(controller) {
            *mount = mount.join(own);
        }
    }
    if let (Some(mount), Some(own)) = (layout.unified.as_mut(), unified_own) {
        *mount = mount.join(own);
    }
    layout
}

/// The manager on its session bus, once the bus is up and the manager is on it.
async fn connect(manager: &UserManager) -> Systemd {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last = match Systemd::connect_bus(&manager.bus_address()).await {
            Ok(s) => match s.control_group().await {
                Ok(_) => return s,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "systemd not on its bus: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pod(uid: &str, containers: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": uid, "namespace": "default", "uid": uid },
        "spec": { "containers": containers }
    }))
    .expect("pod")
}

fn res(requests: serde_json::Value, limits: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "requests": requests, "limits": limits })
}

async fn slice_u64(systemd: &Systemd, unit: &str, property: &str) -> u64 {
    let v = systemd
        .unit_property(unit, SLICE, property)
        .await
        .expect("property")
        .unwrap_or_else(|| panic!("no unit {unit}"));
    u64_of(&v).unwrap_or_else(|| panic!("{unit} {property} is not a number: {v:?}"))
}

async fn unit_string(systemd: &Systemd, unit: &str, interface: &str, property: &str) -> String {
    let v = systemd
        .unit_property(unit, interface, property)
        .await
        .expect("property")
        .unwrap_or_else(|| panic!("no unit {unit}"));
    string_of(&v).unwrap_or_default()
}

fn read(layout: &CgroupLayout, controller: &str, path: &str, file: &str) -> String {
    let p = layout.v1[controller]
        .join(path.trim_start_matches('/'))
        .join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_and_pod_cgroups_are_systemd_slices_with_upstreams_values() {
    let manager = UserManager::start().expect("systemd --user");
    let systemd = connect(&manager).await;
    let layout = own_rooted_layout();
    assert!(
        !layout.is_v2(),
        "this test is for the hybrid host it runs on"
    );
    let cg = PodCgroups::with_systemd(layout.clone(), systemd.clone(), "", 256)
        .await
        .expect("systemd driver");
    cg.ensure_node(Some(node_values(2000, 1 << 30)))
        .await
        .expect("kubepods");

    let guaranteed = |memory: &str| {
        pod(
            "aaaa-1111",
            serde_json::json!([{ "name": "a", "resources": res(
                serde_json::json!({ "cpu": "500m", "memory": memory }),
                serde_json::json!({ "cpu": "500m", "memory": memory })) }]),
        )
    };
    let burstable = pod(
        "bbbb-2222",
        serde_json::json!([
            { "name": "a", "resources": res(
                serde_json::json!({ "cpu": "100m" }), serde_json::json!({ "memory": "32Mi" })) },
            { "name": "b" }
        ]),
    );
    let best_effort = pod("cccc-3333", serde_json::json!([{ "name": "a" }]));
    for p in [&guaranteed("64Mi"), &burstable, &best_effort] {
        cg.ensure_pod(p).await.expect("pod cgroup");
    }

    let base = manager.cgroup_path();
    // Names and places as upstream's systemd driver makes them.
    let slices = [
        ("kubepods.slice", "/kubepods.slice"),
        (
            "kubepods-burstable.slice",
            "/kubepods.slice/kubepods-burstable.slice",
        ),
        (
            "kubepods-besteffort.slice",
            "/kubepods.slice/kubepods-besteffort.slice",
        ),
        (
            "kubepods-podaaaa_1111.slice",
            "/kubepods.slice/kubepods-podaaaa_1111.slice",
        ),
        (
            "kubepods-burstable-podbbbb_2222.slice",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podbbbb_2222.slice",
        ),
        (
            "kubepods-besteffort-podcccc_3333.slice",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podcccc_3333.slice",
        ),
    ];
    for (unit, path) in slices {
        assert_eq!(
            unit_string(&systemd, unit, UNIT, "ActiveState").await,
            "active",
            "{unit}"
        );
        assert_eq!(
            unit_string(&systemd, unit, SLICE, "ControlGroup").await,
            format!("{base}{path}"),
            "{unit}"
        );
        // systemd made the slice's directories in the hierarchies it tracks units in.
        for loc in manager.cgroup_locations() {
            if loc.starts_with("/sys/fs/cgroup/systemd") {
                assert!(
                    loc.join(path.trim_start_matches('/')).is_dir(),
                    "{unit} in {}",
                    loc.display()
                );
            }
        }
    }

    // The values, as systemd holds them and as the cgroup files hold them.
    let pod_g = format!("{base}/kubepods.slice/kubepods-podaaaa_1111.slice");
    let g = "kubepods-podaaaa_1111.slice";
    assert_eq!(slice_u64(&systemd, g, "CPUShares").await, 512);
    assert_eq!(slice_u64(&systemd, g, "CPUQuotaPerSecUSec").await, 500_000);
    assert_eq!(slice_u64(&systemd, g, "MemoryLimit").await, 64 << 20);
    assert_eq!(slice_u64(&systemd, g, "TasksMax").await, 256);
    assert_eq!(read(&layout, "cpu", &pod_g, "cpu.shares"), "512");
    assert_eq!(read(&layout, "cpu", &pod_g, "cpu.cfs_quota_us"), "50000");
    assert_eq!(
        read(&layout, "memory", &pod_g, "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(read(&layout, "pids", &pod_g, "pids.max"), "256");

    let b = "kubepods-burstable-podbbbb_2222.slice";
    let pod_b = format!(
        "{base}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podbbbb_2222.slice"
    );
    assert_eq!(slice_u64(&systemd, b, "CPUShares").await, 102);
    // Not every container has a memory or CPU limit: none on the pod.
    assert_eq!(slice_u64(&systemd, b, "MemoryLimit").await, INFINITY);
    assert_eq!(slice_u64(&systemd, b, "CPUQuotaPerSecUSec").await, INFINITY);
    assert_eq!(read(&layout, "cpu", &pod_b, "cpu.cfs_quota_us"), "-1");
    assert_eq!(
        slice_u64(&systemd, "kubepods-burstable.slice", "CPUShares").await,
        102,
        "the burstable slice's shares follow its pods' requests"
    );
    assert_eq!(
        slice_u64(
            &systemd,
            "kubepods-besteffort-podcccc_3333.slice",
            "CPUShares"
        )
        .await,
        2
    );
    let kubepods = format!("{base}/kubepods.slice");
    assert_eq!(
        slice_u64(&systemd, "kubepods.slice", "MemoryLimit").await,
        1 << 30
    );
    assert_eq!(
        read(&layout, "memory", &kubepods, "memory.limit_in_bytes"),
        (1u64 << 30).to_string()
    );
    assert_eq!(read(&layout, "cpu", &kubepods, "cpu.shares"), "2048");

    // An enforced reservation holds an existing slice (systemReservedCgroup) to its values,
    // only those it sets.
    systemd
        .start_transient_unit("reserved.slice", &[])
        .await
        .expect("reserved slice");
    // On a systemd host with accounting on, its v1 controller directories exist; this
    // manager manages no v1 controller, so the test makes them.
    for controller in ["cpu", "memory", "pids"] {
        let dir =
            layout.v1[controller].join(format!("{}/reserved.slice", base.trim_start_matches('/')));
        std::fs::create_dir_all(&dir).expect("reserved slice directory");
    }
    let reserved: std::collections::BTreeMap<String, i128> =
        [("memory".to_string(), (200i128 << 20) * 1000)].into();
    cg.enforce_existing(
        "/reserved.slice",
        &strake_kubelet::pod_cgroups::reserved_values(&reserved, false),
    )
    .await
    .expect("enforce");
    assert_eq!(
        slice_u64(&systemd, "reserved.slice", "MemoryLimit").await,
        200 << 20
    );
    assert_eq!(
        slice_u64(&systemd, "reserved.slice", "TasksMax").await,
        INFINITY
    );
    assert_eq!(
        read(
            &layout,
            "memory",
            &format!("{base}/reserved.slice"),
            "memory.limit_in_bytes"
        ),
        (200u64 << 20).to_string()
    );

    // A pod whose values change (an in-place resize) updates its existing slice.
    cg.ensure_pod(&guaranteed("128Mi")).await.expect("resize");
    assert_eq!(slice_u64(&systemd, g, "MemoryLimit").await, 128 << 20);
    assert_eq!(
        read(&layout, "memory", &pod_g, "memory.limit_in_bytes"),
        (128u64 << 20).to_string()
    );

    // Removed pods: slices stopped (and unloaded), directories gone.
    for uid in ["aaaa-1111", "bbbb-2222", "cccc-3333"] {
        cg.remove_pod(uid).await;
    }
    for (unit, path) in &slices[3..] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let state = systemd
                .unit_property(unit, UNIT, "ActiveState")
                .await
                .expect("query");
            let gone = state.is_none_or(|v| string_of(&v).as_deref() != Some("active"));
            if gone {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{unit} still active"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for controller in ["cpu", "memory", "pids"] {
            let dir: PathBuf =
                layout.v1[controller].join(format!("{base}{path}").trim_start_matches('/'));
            assert!(!dir.exists(), "{} left", dir.display());
        }
    }
    // The node's slices stay.
    assert_eq!(
        unit_string(&systemd, "kubepods.slice", UNIT, "ActiveState").await,
        "active"
    );
    drop(manager);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_v2_host_the_slices_get_cpu_weight_and_memory_max() {
    let manager = UserManager::start().expect("systemd --user");
    let systemd = connect(&manager).await;
    // The cgroup2 hierarchy alone, as a v2-only host has it.
    let own = own_rooted_layout();
    let layout = CgroupLayout {
        mode: CgroupMode::Unified,
        v1: BTreeMap::new(),
        unified: own.unified.clone(),
    };
    let cg = PodCgroups::with_systemd(layout, systemd.clone(), "", -1)
        .await
        .expect("systemd driver");
    cg.ensure_node(None).await.expect("kubepods");
    let p = pod(
        "dddd-4444",
        serde_json::json!([{ "name": "a", "resources": res(
            serde_json::json!({ "cpu": "1", "memory": "96Mi" }),
            serde_json::json!({ "cpu": "1", "memory": "96Mi" })) }]),
    );
    cg.ensure_pod(&p).await.expect("pod cgroup");
    let unit = "kubepods-poddddd_4444.slice";
    // 1024 shares are weight 39, as runc and upstream's kubelet convert them.
    assert_eq!(slice_u64(&systemd, unit, "CPUWeight").await, 39);
    assert_eq!(slice_u64(&systemd, unit, "MemoryMax").await, 96 << 20);
    assert_eq!(
        slice_u64(&systemd, unit, "CPUQuotaPerSecUSec").await,
        1_000_000
    );
    assert_eq!(slice_u64(&systemd, unit, "TasksMax").await, INFINITY);
    cg.remove_pod("dddd-4444").await;
    drop(manager);
}
