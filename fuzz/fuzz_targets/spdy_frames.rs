//! SPDY/3.1 frames as a streaming client sends them (exec, attach, port-forward): decoded
//! (with the zlib header blocks) until the input ends or fails; every decoded frame encodes
//! again and decodes to the same frame with a fresh pair of codecs.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use strake_runtime::streaming::spdy::{Codec, Frame};

fuzz_target!(|data: &[u8]| {
    let mut codec = Codec::new();
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        frames.push(frame);
        if frames.len() > 256 {
            break;
        }
    }
    let (mut enc, mut dec) = (Codec::new(), Codec::new());
    for frame in frames {
        if matches!(frame, Frame::Unknown { .. }) {
            continue;
        }
        let mut out = Vec::new();
        if enc.encode(&frame, &mut out).is_err() {
            continue;
        }
        let mut wire = BytesMut::from(&out[..]);
        let back = dec.decode(&mut wire).expect("own encoding decodes");
        assert_eq!(back.as_ref(), Some(&frame));
    }
});
