//! The streaming server: exec, attach and port-forward over HTTP, as the kubelet's CRI
//! streaming library (`k8s.io/kubelet/pkg/cri/streaming`) serves them for containerd and CRI-O.
//!
//! The CRI calls Exec, Attach and PortForward validate the request and park it under a
//! one-time token ([`RequestCache`]: single use, expiring after a minute), answering with
//! `http://<address>/<exec|attach|portforward>/<token>`. The client (the kubelet proxying for
//! the API server, crictl, critest) then upgrades that URL to SPDY/3.1 ([`spdy`]), negotiating
//! `v4.channel.k8s.io` (down to v2) for exec and attach ([`remotecommand`]) or
//! `portforward.k8s.io` ([`portforward`]), and opens one stream per channel.
//!
//! The address defaults to containerd's (`stream_server_address = "127.0.0.1"`,
//! `stream_server_port = "0"`, a random port): the kubelet proxies streams, so nothing but the
//! node itself has to reach it.

pub mod portforward;
pub mod remotecommand;
pub mod spdy;
pub mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use strake_types::cri;
use strake_types::http::Limits;
use tokio::time::Instant;

use crate::container::Containers;
use crate::sandbox::Sandboxes;

/// How long a token stays valid (upstream's `cacheTTL`).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Parked requests at most (upstream's `maxInFlight`).
pub const MAX_IN_FLIGHT: usize = 1000;
/// How long a client has to open the streams it announced (upstream's
/// `DefaultStreamCreationTimeout`).
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Upstream's header naming the sub-protocols a client speaks / the one the server chose.
pub const HEADER_PROTOCOL_VERSION: &str = "X-Stream-Protocol-Version";
/// Upstream's header listing what the server accepts, when negotiation fails.
pub const HEADER_ACCEPTED_PROTOCOL_VERSIONS: &str = "X-Accepted-Stream-Protocol-Versions";
/// The `Upgrade` token of SPDY/3.1.
pub const SPDY_31: &str = "SPDY/3.1";

/// A request parked until its URL is fetched.
#[derive(Clone, Debug)]
pub enum Pending {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

/// One-time tokens for parked requests.
#[derive(Debug, Default)]
pub struct RequestCache {
    entries: Mutex<HashMap<String, (Instant, Pending)>>,
}

/// The cache holds [`MAX_IN_FLIGHT`] live requests already.
#[derive(Debug, thiserror::Error)]
#[error("maximum number of in-flight requests exceeded")]
pub struct TooManyInFlight;

impl RequestCache {
    /// Parks `req`; returns its token.
    pub fn insert(&self, req: Pending) -> Result<String, TooManyInFlight> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        entries.retain(|_, (expires, _)| *expires > now);
        if entries.len() >= MAX_IN_FLIGHT {
            return Err(TooManyInFlight);
        }
        let token = loop {
            let t = new_token();
            if !entries.contains_key(&t) {
                break t;
            }
        };
        entries.insert(token.clone(), (now + TOKEN_TTL, req));
        Ok(token)
    }

    /// Takes the request parked under `token`, if it is there and has not expired.
    pub fn consume(&self, token: &str) -> Option<Pending> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (expires, req) = entries.remove(token)?;
        (expires > Instant::now()).then_some(req)
    }
}

/// Eight URL-safe characters from six random bytes, like upstream's tokens.
fn new_token() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 6];
    // SAFETY: getrandom(2) writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never expected; a token from the clock is still unguessable enough for one minute.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Why the streaming server could not start.
#[derive(Debug, thiserror::Error)]
#[error("listen for streaming on {addr}")]
pub struct ListenError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// The streaming HTTP server and the CRI side that hands out its URLs.
pub struct StreamServer {
    listener: Mutex<Option<std::net::TcpListener>>,
    addr: SocketAddr,
    idle_timeout: Option<Duration>,
    limits: Limits,
    cache: RequestCache,
    containers: Arc<Containers>,
    sandboxes: Arc<Sandboxes>,
}

impl std::fmt::Debug for StreamServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl StreamServer {
    /// Binds `address:port` (port 0: a random one) now, so URLs are known before serving.
    /// SPDY connections idle for `idle_timeout` are closed (zero: never).
    pub fn bind(
        address: &str,
        port: u16,
        idle_timeout: Duration,
        containers: Arc<Containers>,
        sandboxes: Arc<Sandboxes>,
    ) -> Result<Self, ListenError> {
        let host = if address.is_empty() {
            "127.0.0.1"
        } else {
            address
        };
        let spec = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let err = |source| ListenError {
            addr: spec.clone(),
            source,
        };
        let listener = std::net::TcpListener::bind(&spec).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(StreamServer {
            listener: Mutex::new(Some(listener)),
            addr,
            idle_timeout: (!idle_timeout.is_zero()).then_some(idle_timeout),
            limits: Limits::default(),
            cache: RequestCache::default(),
            containers,
            sandboxes,
        })
    }

    /// Serves within `limits` (connection cap, header deadline) instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Where the server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Parks `req` and returns its URL.
    pub fn url_for(&self, req: Pending) -> Result<String, TooManyInFlight> {
        let method = match req {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        };
        let token = self.cache.insert(req)?;
        Ok(format!("http://{}/{method}/{token}", self.addr))
    }

    /// Serves HTTP until the task is dropped. Only the first call serves.
    pub async fn serve(self: Arc<Self>) {
        let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "streaming server cannot listen");
                return;
            }
        };
        tracing::info!(address = %self.addr, "serving exec, attach and port-forward");
        let limits = self.limits;
        let server = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let server = server.clone();
            async move { Ok::<_, std::convert::Infallible>(server.handle(req)) }
        });
        strake_types::http::serve(listener, limits, "streaming", service).await
    }

    fn handle(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().trim_matches('/').to_string();
        let Some((method, token)) = path.split_once('/') else {
            return text(StatusCode::NOT_FOUND, "not found");
        };
        if !matches!(method, "exec" | "attach" | "portforward") {
            return text(StatusCode::NOT_FOUND, "not found");
        }
        let Some(pending) = self.cache.consume(token) else {
            return text(StatusCode::NOT_FOUND, "not found");
        };
        let kind_matches = matches!(
            (method, &pending),
            ("exec", Pending::Exec(_))
                | ("attach", Pending::Attach(_))
                | ("portforward", Pending::PortForward(_))
        );
        if !kind_matches {
            return text(StatusCode::NOT_FOUND, "not found");
        }
        if websocket::is_websocket(&req) {
            return self.handle_websocket(req, pending);
        }
        let supported: &[&'static str] = match pending {
            Pending::PortForward(_) => portforward::PROTOCOLS,
            _ => remotecommand::PROTOCOLS,
        };
        let protocol = match negotiate(&req, supported) {
            Ok(p) => p,
            Err(resp) => return *resp,
        };
        if !is_spdy_upgrade(&req) {
            return text(
                StatusCode::BAD_REQUEST,
                "unable to upgrade: missing upgrade headers in request (SPDY/3.1 expected)",
            );
        }
        let upgrade = hyper::upgrade::on(&mut req);
        let server = self.clone();
        let proto = protocol.clone();
        tokio::spawn(async move {
            let io = match upgrade.await {
                Ok(u) => hyper_util::rt::TokioIo::new(u),
                Err(e) => {
                    tracing::debug!(error = %e, "streaming upgrade failed");
                    return;
                }
            };
            let (session, streams) =
                spdy::Session::serve_with_idle_timeout(io, server.idle_timeout);
            match pending {
                Pending::Exec(r) => {
                    remotecommand::serve_exec(
                        server.containers.clone(),
                        r,
                        &proto,
                        session,
                        streams,
                    )
                    .await
                }
                Pending::Attach(r) => {
                    remotecommand::serve_attach(
                        server.containers.clone(),
                        r,
                        &proto,
                        session,
                        streams,
                    )
                    .await
                }
                Pending::PortForward(r) => {
                    portforward::serve(server.sandboxes.clone(), r, session, streams).await
                }
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static(SPDY_31));
        if let Ok(v) = HeaderValue::from_str(&protocol) {
            h.insert(HEADER_PROTOCOL_VERSION, v);
        }
        resp
    }
}

impl StreamServer {
    /// The WebSocket transports: channel protocols for exec and attach, SPDY tunnelled for
    /// port-forward.
    fn handle_websocket(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        pending: Pending,
    ) -> Response<Full<Bytes>> {
        let supported = match pending {
            Pending::PortForward(_) => websocket::PORTFORWARD_PROTOCOLS,
            _ => websocket::REMOTECOMMAND_PROTOCOLS,
        };
        let Some(protocol) = websocket::negotiate(&req, supported) else {
            return text(
                StatusCode::BAD_REQUEST,
                &format!(
                    "unable to upgrade: no supported WebSocket protocol (server accepts {supported:?})"
                ),
            );
        };
        let Some(resp) = websocket::accept(&req, &protocol) else {
            return text(
                StatusCode::BAD_REQUEST,
                "unable to upgrade: missing Sec-WebSocket-Key",
            );
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let server = self.clone();
        tokio::spawn(async move {
            let io = match upgrade.await {
                Ok(u) => hyper_util::rt::TokioIo::new(u),
                Err(e) => {
                    tracing::debug!(error = %e, "streaming upgrade failed");
                    return;
                }
            };
            let ws = websocket::server(io).await;
            match pending {
                Pending::Exec(r) => {
                    let opts = remotecommand::Options {
                        stdin: r.stdin,
                        stdout: r.stdout,
                        stderr: r.stderr,
                        tty: r.tty,
                    };
                    let (session, ch) = websocket::channels(ws, &opts);
                    remotecommand::run_exec(server.containers.clone(), r, &protocol, ch, session)
                        .await
                }
                Pending::Attach(r) => {
                    let opts = remotecommand::Options {
                        stdin: r.stdin,
                        stdout: r.stdout,
                        stderr: r.stderr,
                        tty: r.tty,
                    };
                    let (session, ch) = websocket::channels(ws, &opts);
                    remotecommand::run_attach(server.containers.clone(), r, &protocol, ch, session)
                        .await
                }
                Pending::PortForward(r) => {
                    let (session, streams) = spdy::Session::serve_with_idle_timeout(
                        websocket::tunnel(ws),
                        server.idle_timeout,
                    );
                    portforward::serve(server.sandboxes.clone(), r, session, streams).await
                }
            }
        });
        resp
    }
}

fn text(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn is_spdy_upgrade<B>(req: &Request<B>) -> bool {
    let has = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains(&token.to_ascii_lowercase()))
        })
    };
    has(CONNECTION, "upgrade") && has(UPGRADE, SPDY_31)
}

/// Upstream's `httpstream.Handshake`: the first protocol the client lists that the server
/// supports; 400 when the client lists none, 403 (naming what is accepted) when none match.
pub fn negotiate<B>(
    req: &Request<B>,
    supported: &[&'static str],
) -> Result<String, Box<Response<Full<Bytes>>>> {
    let offered: Vec<String> = req
        .headers()
        .get_all(HEADER_PROTOCOL_VERSION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if offered.is_empty() {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            &format!("unable to upgrade: header {HEADER_PROTOCOL_VERSION} is missing or empty"),
        )));
    }
    if let Some(p) = offered.iter().find(|p| supported.contains(&p.as_str())) {
        return Ok(p.clone());
    }
    let mut resp = text(
        StatusCode::FORBIDDEN,
        &format!(
            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {supported:?}"
        ),
    );
    for p in supported {
        resp.headers_mut().append(
            HEADER_ACCEPTED_PROTOCOL_VERSIONS,
            HeaderValue::from_static(p),
        );
    }
    Err(Box::new(resp))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokens_are_single_use_and_expire_after_a_minute() {
        let cache = RequestCache::default();
        let a = cache
            .insert(Pending::Exec(cri::ExecRequest::default()))
            .unwrap();
        assert_eq!(a.len(), 8);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(matches!(cache.consume(&a), Some(Pending::Exec(_))));
        assert!(cache.consume(&a).is_none(), "a token works once");
        let b = cache
            .insert(Pending::Attach(cri::AttachRequest::default()))
            .unwrap();
        tokio::time::advance(TOKEN_TTL + Duration::from_secs(1)).await;
        assert!(cache.consume(&b).is_none(), "expired");
        assert!(cache.consume("nope").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_refuses_more_than_the_in_flight_limit() {
        let cache = RequestCache::default();
        for _ in 0..MAX_IN_FLIGHT {
            cache
                .insert(Pending::PortForward(Default::default()))
                .unwrap();
        }
        assert!(
            cache
                .insert(Pending::PortForward(Default::default()))
                .is_err()
        );
        // Expired entries make room again.
        tokio::time::advance(TOKEN_TTL + Duration::from_secs(1)).await;
        assert!(
            cache
                .insert(Pending::PortForward(Default::default()))
                .is_ok()
        );
    }

    fn req(protocols: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri("/exec/x");
        for p in protocols {
            b = b.header(HEADER_PROTOCOL_VERSION, *p);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn negotiation_follows_the_clients_order_like_upstream() {
        let supported = remotecommand::PROTOCOLS;
        assert_eq!(
            negotiate(&req(&["v4.channel.k8s.io", "v3.channel.k8s.io"]), supported).unwrap(),
            "v4.channel.k8s.io"
        );
        assert_eq!(
            negotiate(&req(&["v9.channel.k8s.io, v2.channel.k8s.io"]), supported).unwrap(),
            "v2.channel.k8s.io"
        );
        let missing = negotiate(&req(&[]), supported).unwrap_err();
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        let none = negotiate(&req(&["v9.channel.k8s.io"]), supported).unwrap_err();
        assert_eq!(none.status(), StatusCode::FORBIDDEN);
        let accepted: Vec<_> = none
            .headers()
            .get_all(HEADER_ACCEPTED_PROTOCOL_VERSIONS)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(accepted, supported);
    }
}
