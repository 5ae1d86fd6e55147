//! What a registry answers for an image: a manifest or index and a config, read with the very
//! functions a pull runs (`strake_runtime::image::metadata`). Input: a 2-byte length, the
//! manifest, then the config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strake_runtime::image::metadata::{
    config_of, layer_records, parse_config, parse_manifest, select_platform, user_of,
};

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (manifest, config) = rest.split_at(split);
    let Ok(m) = parse_manifest(manifest) else {
        return;
    };
    if let Some(entries) = &m.manifests {
        for (arch, variant) in [("amd64", None), ("arm64", Some("v8")), ("arm", Some("v7"))] {
            if let Some(d) = select_platform(entries, arch, variant) {
                assert!(d.platform.as_ref().is_some_and(|p| p.architecture == arch));
            }
        }
    }
    let _ = config_of(&m);
    if let Ok(c) = parse_config(config) {
        if let Ok(layers) = layer_records(&m, &c) {
            assert_eq!(layers.len(), m.layers.len());
        }
        if let Some(user) = c.config.as_ref().and_then(|c| c.user.as_deref()) {
            let _ = user_of(user);
        }
    }
});
