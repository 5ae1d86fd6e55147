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

/// Serves `listener` with `handler` until the task is dropped.
pub async fn serve_with(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handler(req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            // Clients like `nc` half-close after sending the request; answer them anyway.
            let conn = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
}

/// Serves `listener` as the `role` server until the task is dropped.
pub async fn serve(listener: TcpListener, role: Role, shared: Shared) {
    serve_with(
        listener,
        Arc::new(move |method: &Method, path: &str| answer(role, &shared, method, path)),
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
                    _ = serve(health, Role::Health, shared.clone()) => {}
                    _ = serve(metrics, Role::Metrics, shared) => {}
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
}
