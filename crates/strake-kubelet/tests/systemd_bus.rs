//! The systemd driver finds the system manager where upstream's does, on the system bus
//! (`DBUS_SYSTEM_BUS_ADDRESS`, else `/run/dbus/system_bus_socket`): here a real `systemd --user`
//! manager's bus stands for it through that variable. A test binary of its own, with one test,
//! because it sets the variable for the whole process before any other thread exists.

use std::time::{Duration, Instant};

use strake_integration::systemd::UserManager;
use strake_kubelet::pod_cgroups::PodCgroups;
use strake_types::cgroups::CgroupDriver;
use strake_types::systemd::Systemd;

#[test]
fn the_systemd_driver_reaches_the_manager_on_the_system_bus() {
    let manager = UserManager::start().expect("systemd --user");
    // SAFETY: this binary's only test sets it before starting any thread of its own (the test
    // harness runs a single test on one thread, and no runtime exists yet).
    unsafe { std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", manager.bus_address()) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let base = loop {
            let last = match Systemd::connect().await {
                Ok(s) => match s.control_group().await {
                    Ok(base) => break base,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            assert!(Instant::now() < deadline, "no systemd on the bus: {last}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(base, manager.cgroup_path());
        // The kubelet's own way in: the driver made from the host's hierarchies and the bus.
        PodCgroups::detect(CgroupDriver::Systemd, "", -1)
            .await
            .expect("systemd driver from the system bus");
    });
    drop(rt);
    drop(manager);
}
