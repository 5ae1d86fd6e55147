//! Image references as a pod spec or a CRI client writes them: parsed, normalised, and
//! parsed again to the same reference; mirror endpoints and the kubelet's registry split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strake_runtime::image::mirror::{Endpoint, parse_mirror_flag};
use strake_runtime::image::reference::{Digest, Reference};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(text) {
        // The normalised form is a reference too, and the same one.
        let again = Reference::parse(&r.to_string()).expect("normalised form parses");
        assert_eq!(again, r);
        let _ = (r.name(), r.repo_tag(), r.domain(), r.path());
        if let Some(d) = r.digest() {
            assert_eq!(Digest::parse(d.as_str()).as_ref(), Some(d));
            let _ = r.repo_digest(d);
        }
    }
    if let Some(d) = Digest::parse(text) {
        assert_eq!(format!("{}:{}", d.algorithm(), d.hex()), d.as_str());
    }
    if let Ok(e) = Endpoint::parse(text) {
        let _ = (e.host(), e.plain_http());
    }
    let _ = parse_mirror_flag(text);
    let (registry, repo) = strake_kubelet::credentials::registry_of(text);
    assert!(!registry.is_empty() || text.is_empty() || repo.len() <= text.len() + 8);
});
