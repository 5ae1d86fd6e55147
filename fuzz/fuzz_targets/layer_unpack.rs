//! The layer unpacker over a scratch root: any tar stream (plain, or gzip or zstd by its
//! magic) either unpacks or fails with an error, never panics, and writes nothing outside the
//! root, whatever links, `..`, absolute names, hard links and whiteouts it holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strake_runtime::image::reference::Digest;
use strake_runtime::image::unpack::{Budget, UnpackOptions, unpack_stream};

const SMALL: UnpackOptions = UnpackOptions {
    allow_devices: false,
    max_size: 8 << 20,
    max_entries: 4096,
    max_depth: 32,
};

fuzz_target!(|data: &[u8]| {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).expect("root");
    // The diffID of the input itself when it is a plain tar, so that a well-formed stream
    // goes all the way to the end.
    let diff_id = Digest::sha256_of(data);
    let budget = Budget::new(&SMALL);
    let _ = unpack_stream(
        std::io::BufReader::new(data),
        "application/vnd.oci.image.layer.v1.tar",
        &diff_id,
        &root,
        &budget,
    );
    let beside: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("read scratch")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(beside, ["root"], "the unpack wrote outside its root");
});
