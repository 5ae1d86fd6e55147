//! The WebSocket transports (RFC 6455 through `tokio-tungstenite`):
//!
//! - exec and attach over the channel protocols `v5.channel.k8s.io` (what client-go's
//!   WebSocket executor, crictl `--transport websocket` and critest ask for),
//!   `v4.channel.k8s.io` and `channel.k8s.io`: every binary message starts with its channel
//!   (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize); v5 adds 255, `[255, channel]`, the
//!   client closing its side of a channel (stdin's end of file);
//! - port-forward tunnelled as SPDY inside binary messages (`SPDY/3.1+portforward.k8s.io`,
//!   client-go's `NewSPDYOverWebsocketDialer`), served by the same SPDY session.
//!
//! The channels are adapted to the SPDY session's [`Stream`]s, so exec, attach and
//! port-forward run unchanged over either transport.

use std::collections::HashMap;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::remotecommand::{Channels, Options};
use super::spdy::{Frame, MAX_DATA_CHUNK, Out, STREAM_BUFFER, Session, Stream, StreamWriter};

/// Channel protocols for exec and attach, preferred first.
pub const REMOTECOMMAND_PROTOCOLS: &[&str] =
    &["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"];
/// SPDY tunnelled through WebSocket, for port-forward.
pub const PORTFORWARD_PROTOCOLS: &[&str] = &["SPDY/3.1+portforward.k8s.io"];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: `[CLOSE, channel]` closes the client's side of a channel.
const CLOSE: u8 = 255;

fn normal_closure() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

/// Whether `req` asks to upgrade to WebSocket.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    let has = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains(token))
        })
    };
    has(CONNECTION, "upgrade") && has(UPGRADE, "websocket")
}

/// The first sub-protocol the client lists (`Sec-WebSocket-Protocol`) that is supported.
pub fn negotiate<B>(req: &Request<B>, supported: &[&str]) -> Option<String> {
    req.headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| supported.contains(p))
        .map(str::to_string)
}

/// The 101 answer completing the handshake with `protocol`; `None` without a key.
pub fn accept<B>(req: &Request<B>, protocol: &str) -> Option<Response<Full<Bytes>>> {
    let key = req.headers().get("sec-websocket-key")?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert("sec-websocket-accept", HeaderValue::from_str(&accept).ok()?);
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(protocol).ok()?,
    );
    Some(resp)
}

/// The largest WebSocket message (and frame) a client may send: clients write stdin and
/// tunnelled SPDY frames in chunks of 32 KiB; tungstenite's default (64 MiB) would let one
/// message hold that much memory.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Takes over an upgraded connection as the server end of a WebSocket.
pub async fn server<IO>(io: IO) -> WebSocketStream<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await
}

/// The server's WebSocket limits (also what the fuzzer reads frames with).
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// What one binary message from the client of a channel protocol means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Data for a channel (never empty).
    Data(u8, &'a [u8]),
    /// The client closed its side of a channel (v5's close channel).
    Close(u8),
    /// Nothing to act on: an empty message, or empty data.
    Ignore,
}

/// Reads a client's binary message: the first byte names the channel, the rest is its data;
/// on the close channel, the data names the channel closed.
pub fn route(message: &[u8]) -> Inbound<'_> {
    match message.split_first() {
        Some((&CLOSE, body)) => body.first().map_or(Inbound::Ignore, |&c| Inbound::Close(c)),
        Some((&ch, body)) if !body.is_empty() => Inbound::Data(ch, body),
        _ => Inbound::Ignore,
    }
}

/// The channels of an exec or attach over a channel protocol, as streams; the session closes
/// the WebSocket.
pub fn channels<IO>(ws: WebSocketStream<IO>, opts: &Options) -> (Session, Channels)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Out>(64);
    let (mut sink, mut source) = ws.split();
    let mut inputs: HashMap<u8, mpsc::Sender<Bytes>> = HashMap::new();
    let mut input = |ch: u8| {
        let (in_tx, in_rx) = mpsc::channel(STREAM_BUFFER);
        inputs.insert(ch, in_tx);
        Stream::new(
            u32::from(ch),
            Vec::new(),
            in_rx,
            StreamWriter::new(u32::from(ch), tx.clone()),
        )
    };
    let writer = |ch: u8| StreamWriter::new(u32::from(ch), tx.clone());
    let channels = Channels {
        error: Some(writer(ERROR)),
        stdin: opts.stdin.then(|| input(STDIN)),
        stdout: opts.stdout.then(|| writer(STDOUT)),
        stderr: opts.stderr.then(|| writer(STDERR)),
        resize: opts.tty.then(|| input(RESIZE)),
    };
    // Upstream's first message: an empty write on the first output channel.
    let first = if opts.stdout {
        STDOUT
    } else if opts.stderr {
        STDERR
    } else {
        ERROR
    };
    tokio::spawn(async move {
        if sink.send(Message::binary(vec![first])).await.is_err() {
            return;
        }
        while let Some(out) = rx.recv().await {
            match out {
                Out::Frame(Frame::Data {
                    stream_id, data, ..
                }) => {
                    // A stream's end has no message of its own in these protocols.
                    if data.is_empty() {
                        continue;
                    }
                    let mut m = Vec::with_capacity(data.len() + 1);
                    m.push(stream_id as u8);
                    m.extend_from_slice(&data);
                    if sink.send(Message::binary(m)).await.is_err() {
                        return;
                    }
                }
                Out::Frame(_) => {}
                Out::Close => break,
            }
        }
        // A normal closure: clients read it as the end of every channel.
        let _ = sink.send(Message::Close(Some(normal_closure()))).await;
        let _ = sink.close().await;
    });
    tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            let data = match msg {
                Message::Binary(d) => d,
                Message::Close(_) => break,
                _ => continue,
            };
            let (ch, body) = match route(&data) {
                Inbound::Ignore => continue,
                Inbound::Close(closed) => {
                    inputs.remove(&closed);
                    continue;
                }
                Inbound::Data(ch, body) => (ch, body),
            };
            // Waits while the channel's queue is full: the WebSocket is not read meanwhile, so
            // the client is held back by TCP.
            if let Some(tx) = inputs.get(&ch) {
                let mut sent = true;
                for chunk in body.chunks(MAX_DATA_CHUNK) {
                    if tx.send(Bytes::copy_from_slice(chunk)).await.is_err() {
                        sent = false;
                        break;
                    }
                }
                if !sent {
                    inputs.remove(&ch);
                }
            }
        }
    });
    (Session::new(tx), channels)
}

/// A byte stream carried in the WebSocket's binary messages (SPDY tunnelling): the returned
/// end reads what the client sends and writes what goes back.
pub fn tunnel<IO>(ws: WebSocketStream<IO>) -> tokio::io::DuplexStream
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut r, mut w) = tokio::io::split(theirs);
    let (mut sink, mut source) = ws.split();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
        // A normal closure: clients read it as the end of every channel.
        let _ = sink.send(Message::Close(Some(normal_closure()))).await;
        let _ = sink.close().await;
    });
    tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            match msg {
                Message::Binary(d) if w.write_all(&d).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = w.shutdown().await;
    });
    ours
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/exec/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn upgrade_and_negotiation() {
        let r = req(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            (
                "sec-websocket-protocol",
                "v9.channel.k8s.io, v4.channel.k8s.io",
            ),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(is_websocket(&r));
        let p = negotiate(&r, REMOTECOMMAND_PROTOCOLS).unwrap();
        assert_eq!(p, "v4.channel.k8s.io");
        let resp = accept(&r, &p).unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455's own example.
        assert_eq!(
            resp.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(negotiate(&req(&[]), REMOTECOMMAND_PROTOCOLS).is_none());
        assert!(!is_websocket(&req(&[("upgrade", "SPDY/3.1")])));
    }

    /// A client's messages reach the streams by channel; output goes out with its channel
    /// first; v5's close ends stdin.
    #[tokio::test]
    async fn channels_multiplex_over_binary_messages() {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let (server_ws, mut client) = tokio::join!(
            server(server_io),
            WebSocketStream::from_raw_socket(client_io, Role::Client, None)
        );
        let opts = Options {
            stdin: true,
            stdout: true,
            stderr: false,
            tty: true,
        };
        let (session, mut ch) = channels(server_ws, &opts);
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(vec![STDOUT])
        );
        client
            .send(Message::binary(b"\x00input".to_vec()))
            .await
            .unwrap();
        client
            .send(Message::binary(br#"{"Width":1,"Height":2}"#.iter().fold(
                vec![RESIZE],
                |mut v, b| {
                    v.push(*b);
                    v
                },
            )))
            .await
            .unwrap();
        client
            .send(Message::binary(vec![CLOSE, STDIN]))
            .await
            .unwrap();
        let mut stdin = ch.stdin.take().unwrap();
        // What the client sends waits in a bounded queue (then in TCP), never an unbounded one.
        assert_eq!(stdin.buffer_capacity(), STREAM_BUFFER);
        assert_eq!(stdin.read().await.unwrap(), Bytes::from_static(b"input"));
        assert_eq!(stdin.read().await, None);
        let mut resize = ch.resize.take().unwrap();
        assert_eq!(
            resize.read().await.unwrap(),
            Bytes::from_static(br#"{"Width":1,"Height":2}"#)
        );
        ch.stdout.as_ref().unwrap().write(b"out").await.unwrap();
        ch.error.as_ref().unwrap().write(b"{}").await.unwrap();
        session.close().await;
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(b"\x01out".to_vec())
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(b"\x03{}".to_vec())
        );
        assert!(matches!(
            client.next().await,
            Some(Ok(Message::Close(_))) | None
        ));
    }
}
