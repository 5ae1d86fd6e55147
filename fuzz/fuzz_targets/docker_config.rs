//! Image pull secrets as a user writes them (`.dockerconfigjson`, `.dockercfg`): read into
//! registry entries and matched against image names, as the kubelet does before a pull.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use strake_kubelet::credentials::{auth_configs, entries_of_secret};

const IMAGES: &[&str] = &[
    "busybox",
    "registry.k8s.io/pause:3.10",
    "localhost:5000/a/b@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "example.com/team/app:v1",
];

fuzz_target!(|data: &[u8]| {
    let mut entries = Vec::new();
    for (type_, key) in [
        ("kubernetes.io/dockerconfigjson", ".dockerconfigjson"),
        ("kubernetes.io/dockercfg", ".dockercfg"),
    ] {
        let secret = BTreeMap::from([(key.to_string(), data.to_vec())]);
        if let Ok(e) = entries_of_secret("fuzz", Some(type_), &secret) {
            entries.push(e);
        }
    }
    for image in IMAGES {
        let _ = auth_configs(image, &entries);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = auth_configs(text, &entries);
    }
});
