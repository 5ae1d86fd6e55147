//! The health (`/healthz`, `/livez`) and metrics (`/metrics`, `/proxyMode`) servers: a few
//! lines of hyper 1 (HTTP/1.1, GET only), run on their own thread and runtime so that they
//! answer while the sync loop is busy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use strake_types::http::Limits;
use tokio::net::TcpListener;

use crate::health::Health;
use crate::metrics::Metrics;

/// Which server a listener belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `/healthz`, `/livez`.
    Health,
    /// `/metrics`, `/proxyMode`.
    Metrics,
}

/// What the servers read.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Sync health.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        resp.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    resp
}

/// Answers one request (pure apart from the clocks; tested directly).
pub fn answer(role: Role, shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match (role, path) {
        (Role::Health, "/healthz" | "/livez") => {
            let report = shared
                .health
                .report(tokio::time::Instant::now(), Timestamp::now());
            let status = if report.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, "application/json", report.body)
        }
        (Role::Metrics, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.render(),
        ),
        (Role::Metrics, "/proxyMode") => text(StatusCode::OK, "text/plain", "nftables".into()),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// How one server answers a request (method, path).
pub type Handler = Arc<dyn Fn(&Method, &str) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `listener` with `handler` until the task is dropped, within the shared limits
/// (connection cap, header deadline, accept back-off: [`strake_types::http`]).
pub async fn serve_with(listener: TcpListener, handler: Handler) {
    serve_limited(listener, handler, Limits::default()).await
}

/// [`serve_with`] under explicit `limits`.
pub async fn serve_limited(listener: TcpListener, handler: Handler, limits: Limits) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = handler(req.method(), req.uri().path());
        async move { Ok::<_, Infallible>(resp) }
    });
    strake_types::http::serve(listener, limits, "strake-proxy", service).await
}

/// Serves `listener` as the `role` server until the task is dropped.
pub async fn serve(listener: TcpListener, role: Role, shared: Shared) {
    serve_role(listener, role, shared, Limits::default()).await
}

async fn serve_role(listener: TcpListener, role: Role, shared: Shared, limits: Limits) {
    serve_limited(
        listener,
        Arc::new(move |method: &Method, path: &str| answer(role, &shared, method, path)),
        limits,
    )
    .await
}

/// A plain response (for other servers of the crate).
pub fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    text(status, content_type, body)
}

/// Binds both addresses (so that errors surface before the daemon reports started) and
/// serves them on a thread of their own until the returned handle is dropped.
pub fn start(
    health_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shared: Shared,
) -> std::io::Result<ServerHandle> {
    start_with_limits(health_addr, metrics_addr, shared, Limits::default())
}

/// [`start`] with explicit connection limits (each server has its own cap).
pub fn start_with_limits(
    health_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shared: Shared,
    limits: Limits,
) -> std::io::Result<ServerHandle> {
    let health = std::net::TcpListener::bind(health_addr)?;
    let metrics = std::net::TcpListener::bind(metrics_addr)?;
    health.set_nonblocking(true)?;
    metrics.set_nonblocking(true)?;
    let local = (health.local_addr()?, metrics.local_addr()?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("strake-proxy-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let health = match TcpListener::from_std(health) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "health listener"),
                };
                let metrics = match TcpListener::from_std(metrics) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "metrics listener"),
                };
                tokio::select! {
                    _ = serve_role(health, Role::Health, shared.clone(), limits) => {}
                    _ = serve_role(metrics, Role::Metrics, shared, limits) => {}
                    _ = stop_rx => {}
                }
            });
        })?;
    Ok(ServerHandle {
        health_addr: local.0,
        metrics_addr: local.1,
        runtime: handle,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// The running servers; dropping the handle stops them.
#[derive(Debug)]
pub struct ServerHandle {
    /// Where `/healthz` is served.
    pub health_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// The servers' runtime, for more listeners that must answer while the sync loop is busy.
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.clone()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;

    fn shared() -> Shared {
        Shared {
            health: Arc::new(Health::new(Duration::from_secs(60))),
            metrics: Arc::new(Metrics::default()),
        }
    }

    async fn body(resp: Response<Full<Bytes>>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn routes() {
        let s = shared();
        let get = Method::GET;
        let r = answer(Role::Health, &s, &get, "/healthz");
        assert_eq!(r.status(), StatusCode::OK);
        assert!(body(r).await.contains("lastUpdated"));
        assert_eq!(
            answer(Role::Health, &s, &get, "/livez").status(),
            StatusCode::OK
        );
        assert_eq!(
            body(answer(Role::Metrics, &s, &get, "/proxyMode")).await,
            "nftables"
        );
        assert!(
            body(answer(Role::Metrics, &s, &get, "/metrics"))
                .await
                .contains("kubeproxy_sync_proxy_rules_duration_seconds")
        );
        assert_eq!(
            answer(Role::Health, &s, &get, "/metrics").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(Role::Health, &s, &Method::POST, "/healthz").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        s.health.failed(tokio::time::Instant::now());
        assert_eq!(
            answer(Role::Health, &s, &get, "/healthz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn serves_on_its_own_thread() {
        let handle = start(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            shared(),
        )
        .unwrap();
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(handle.metrics_addr).unwrap();
        conn.write_all(b"GET /proxyMode HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.") && out.contains(" 200 ") && out.ends_with("nftables"),
            "{out}"
        );
        drop(handle);
    }

    /// Both servers hang up on a client that never finishes its headers and close
    /// connections beyond their cap, while still answering others.
    #[test]
    fn slow_clients_are_cut_off_and_connections_capped() {
        use std::io::{Read, Write};
        let slow_deadline = start_with_limits(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            shared(),
            Limits {
                max_connections: 8,
                header_read_timeout: Duration::from_secs(1),
            },
        )
        .unwrap();
        let capped = start_with_limits(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            shared(),
            Limits {
                max_connections: 2,
                header_read_timeout: Duration::from_secs(600),
            },
        )
        .unwrap();
        let get = |addr: SocketAddr| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            let _ = c.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        };
        for (addr, capped_addr) in [
            (slow_deadline.health_addr, capped.health_addr),
            (slow_deadline.metrics_addr, capped.metrics_addr),
        ] {
            // A trickle: one header byte every 100 ms, until the server hangs up.
            let mut slow = std::net::TcpStream::connect(addr).unwrap();
            slow.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            slow.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
                .unwrap();
            let mut buf = [0u8; 64];
            let mut sent = 0;
            let hung_up = loop {
                match slow.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(_) => break false,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break true,
                }
                if slow.write_all(b"a").is_err() {
                    break true;
                }
                sent += 1;
                assert!(sent < 3000, "still connected after {sent} header bytes");
            };
            assert!(hung_up, "answered a request whose headers never ended");
            // Two idle connections fill the cap: a third is closed unanswered.
            let addr = capped_addr;
            let idle: Vec<_> = (0..2)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            // The server has taken both idle ones once a request on a fresh one is refused.
            let mut refused = false;
            for _ in 0..50 {
                if get(addr).is_empty() {
                    refused = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(refused, "a connection beyond the cap was served");
            drop(idle);
            let mut answered = String::new();
            for _ in 0..100 {
                answered = get(addr);
                if !answered.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(answered.starts_with("HTTP/1."), "{answered:?}");
        }
        drop(slow_deadline);
        drop(capped);
    }
}
