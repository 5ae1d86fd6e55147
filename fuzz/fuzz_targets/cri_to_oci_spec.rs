//! CreateContainer's request as it arrives on the wire (protobuf `ContainerConfig` and
//! `PodSandboxConfig`) translated to an OCI runtime spec: built or refused with an error,
//! never a panic, and what is built serialises. Input: a 2-byte length, the container config,
//! then the sandbox config.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strake_runtime::cgroups::CgroupDriver;
use strake_runtime::spec::{
    ImageProcessConfig, NodeOptions, Resolved, SandboxFacts, SandboxNamespaces, SpecInput,
    build_spec,
};
use strake_types::cri;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (c, s) = rest.split_at(split);
    let (Ok(config), Ok(sandbox_config)) = (
        cri::ContainerConfig::decode(c),
        cri::PodSandboxConfig::decode(s),
    ) else {
        return;
    };
    let sandbox = SandboxFacts {
        id: "sb".into(),
        hostname: "pod".into(),
        namespaces: SandboxNamespaces::of_process(4242),
        hosts_path: Some("/run/sb/hosts".into()),
        resolv_conf_path: Some("/run/sb/resolv.conf".into()),
        hostname_path: Some("/run/sb/hostname".into()),
        shm_path: Some("/run/sb/shm".into()),
    };
    let image = ImageProcessConfig {
        entrypoint: vec!["/bin/sh".into()],
        cmd: vec!["-c".into(), "true".into()],
        env: vec!["PATH=/bin".into()],
        working_dir: "/".into(),
        user: String::new(),
        stop_signal: String::new(),
    };
    for (driver, infra) in [
        (CgroupDriver::Cgroupfs, false),
        (CgroupDriver::Systemd, true),
    ] {
        let built = build_spec(&SpecInput {
            container_id: "c",
            config: &config,
            sandbox_config: &sandbox_config,
            sandbox: &sandbox,
            image: &image,
            image_name: "registry.invalid/fuzz:1",
            rootfs: Path::new("/var/lib/strake-fuzz/rootfs"),
            cgroup_driver: driver,
            target_pid_namespace: None,
            resolved: &Resolved::default(),
            node: &NodeOptions::default(),
            infra,
        });
        if let Ok(spec) = built {
            serde_json::to_vec(&spec).expect("a built spec serialises");
        }
    }
});
