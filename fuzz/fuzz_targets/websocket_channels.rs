//! What a client sends over an exec/attach WebSocket: frames read with the server's limits
//! (`websocket::config`), each binary message routed to its channel (`websocket::route`), and
//! the resize channel's JSON read as the server reads it (`parse_sizes`), whose leftover never
//! exceeds what came in.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use strake_runtime::streaming::remotecommand::parse_sizes;
use strake_runtime::streaming::websocket::{Inbound, config, route};
use tokio_tungstenite::tungstenite::protocol::{Message, Role, WebSocket};

/// The client's bytes in, the server's answers (pongs, closes) dropped.
struct Wire(Cursor<Vec<u8>>);

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const RESIZE: u8 = 4;

fuzz_target!(|data: &[u8]| {
    let mut ws = WebSocket::from_raw_socket(
        Wire(Cursor::new(data.to_vec())),
        Role::Server,
        Some(config()),
    );
    let mut resize = Vec::new();
    for _ in 0..1024 {
        let Ok(msg) = ws.read() else { break };
        let Message::Binary(body) = msg else { continue };
        match route(&body) {
            Inbound::Data(ch, payload) => {
                assert!(!payload.is_empty());
                assert_eq!(ch, body[0]);
                if ch == RESIZE {
                    let before = resize.len() + payload.len();
                    resize.extend_from_slice(payload);
                    let _ = parse_sizes(&mut resize);
                    assert!(resize.len() <= before);
                }
            }
            Inbound::Close(ch) => assert_eq!(body.get(1), Some(&ch)),
            Inbound::Ignore => {}
        }
    }
});
