//! The nft script → netlink batch encoder: any text either compiles to a well-formed batch
//! (every message's length inside the buffer, begin and end markers) or is refused with the
//! line at fault.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strake_proxy::nft::netlink::text::{Layouts, compile};

fuzz_target!(|data: &[u8]| {
    let Ok(script) = std::str::from_utf8(data) else {
        return;
    };
    let mut layouts = Layouts::new();
    match compile(script, 7, &mut layouts) {
        Ok(batch) => {
            // Walk the netlink messages: each header's length covers at least itself and
            // stays in the buffer.
            let mut b = &batch.bytes[..];
            let mut count = 0usize;
            while !b.is_empty() {
                assert!(b.len() >= 16, "truncated header");
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                assert!(
                    len >= 16 && len <= b.len(),
                    "message length {len} of {}",
                    b.len()
                );
                let aligned = (len + 3) & !3;
                b = &b[aligned.min(b.len())..];
                count += 1;
            }
            assert_eq!(count, batch.lines.len() + 2, "begin, one per command, end");
        }
        Err(e) => assert!(e.line >= 1 && e.line <= script.lines().count().max(1)),
    }
});
