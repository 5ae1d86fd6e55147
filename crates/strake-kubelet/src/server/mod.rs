//! The kubelet's HTTPS API on `--address`:`--port` (0.0.0.0:10250), as upstream's
//! `pkg/kubelet/server`: every request is authenticated and authorized ([`auth`]), then served:
//!
//! - `/healthz`, `/pods` (the pods bound to this node, as the kubelet's watch sees them)
//! - `/containerLogs/{ns}/{pod}/{container}` ([`logs`])
//! - `/exec`, `/attach`, `/portForward` proxied to the runtime's streaming server ([`streaming`])
//! - `/stats/summary`, `/metrics/resource` ([`stats`]) and `/metrics` (the kubelet's own)
//!
//! Each connection is TLS ([`tls`]), HTTP/1.1 with upgrades, on its own task.

pub mod auth;
pub mod logs;
pub mod stats;
pub mod streaming;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector;
use strake_types::cri;
use strake_types::http::Limits;

use crate::config::Config;
use crate::pod_spec::labels;
use crate::runtime::{Runtime, RuntimeError};
use auth::{Auth, AuthError, User};

/// How much of a log is gathered before a `/containerLogs` answer starts.
const FIRST_LOG_BLOCK: usize = 64 * 1024;

/// Streams an HTTP/2 client may have open at once on one connection (Go's server default).
const H2_MAX_STREAMS: u32 = 250;
/// The largest header block an HTTP/2 client may send (kubelet API requests carry a few
/// hundred bytes; hyper's default is 16 KiB).
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;

/// How long a client has to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Response bodies of the API: whole or streamed.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A complete body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(full(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(b) => {
            let mut r = Response::new(full(b));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// 429 with `Retry-After`, for requests whose review the rate limit has no turn for.
fn too_many_requests() -> Response<Body> {
    let mut r = text(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many requests, please try again later.\n",
    );
    r.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    r
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

/// The API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TLS setup of the kubelet API")]
    Tls(#[source] tls::TlsError),
    #[error("bind kubelet API on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// (method, path family, long running).
type RequestKey = (String, String, bool);

/// Request counters for `/metrics` (`kubelet_http_requests_total`,
/// `kubelet_http_inflight_requests`).
#[derive(Debug, Default)]
struct HttpMetrics {
    /// Per request kind: (total, in flight).
    counts: Mutex<BTreeMap<RequestKey, (u64, i64)>>,
}

impl HttpMetrics {
    fn change(&self, key: &RequestKey, total: u64, inflight: i64) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(key.clone()).or_default();
        e.0 += total;
        e.1 += inflight;
    }
}

struct InFlight<'a> {
    metrics: &'a HttpMetrics,
    key: RequestKey,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.change(&self.key, 0, -1);
    }
}

struct State {
    config: Config,
    runtime: Runtime,
    auth: Auth,
    pods: Option<reflector::Store<Pod>>,
    rates: stats::CpuRates,
    metrics: HttpMetrics,
}

/// The bound API, ready to serve.
pub struct Server {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    limits: Limits,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads (or makes) the serving certificate and binds `address:port`. `client` reaches the
    /// API server for TokenReview and SubjectAccessReview; `pods` is the pod source's store of
    /// the node's pods (the kubelet watches them once, see [`crate::pods`]).
    pub async fn bind(
        config: &Config,
        runtime: Runtime,
        client: Option<kube::Client>,
        pods: Option<reflector::Store<Pod>>,
    ) -> Result<Self, ServerError> {
        for what in config.insecure_api_settings() {
            tracing::warn!(
                address = %config.address,
                port = config.port,
                "INSECURE kubelet API: {what}; start with --config (anonymous off, Webhook authentication and authorization) or set --anonymous-auth=false --authentication-token-webhook --authorization-mode=Webhook"
            );
        }
        let tls = tls::server_config(config).map_err(ServerError::Tls)?;
        let addr = SocketAddr::new(config.address, config.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let state = State {
            auth: Auth::new(
                config.authentication.clone(),
                config.authorization.clone(),
                config.node_name.clone(),
                client.clone(),
            ),
            config: config.clone(),
            runtime,
            pods,
            rates: stats::CpuRates::default(),
            metrics: HttpMetrics::default(),
        };
        Ok(Server {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(tls),
            state: Arc::new(state),
            limits: Limits::default(),
        })
    }

    /// Serves within `limits` (connection cap, header deadline) instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn serve(self) {
        let acceptor = self.acceptor.clone();
        let state = self.state.clone();
        let limits = self.limits;
        strake_types::http::accept_loop(self.listener, limits, "kubelet API", move |tcp, peer| {
            let acceptor = acceptor.clone();
            let state = state.clone();
            async move {
                let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let cert_user = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| auth::user_from_certificate(c));
                // When the connection last began a request (HTTP/2 connections idle past the
                // header deadline are closed, as HTTP/1.1 ones are by it).
                let last_request = Arc::new(Mutex::new(tokio::time::Instant::now()));
                let seen = last_request.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    let cert_user = cert_user.clone();
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
                    async move { Ok::<_, Infallible>(handle(&state, cert_user.as_ref(), req).await) }
                });
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let served = if h2 {
                    let conn = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .timer(hyper_util::rt::TokioTimer::new())
                    .max_concurrent_streams(H2_MAX_STREAMS)
                    .max_header_list_size(H2_MAX_HEADER_LIST)
                    .serve_connection(TokioIo::new(tls), svc);
                    close_when_idle(conn, &last_request, limits.header_read_timeout).await
                } else {
                    limits
                        .http1()
                        .serve_connection(TokioIo::new(tls), svc)
                        .with_upgrades()
                        .await
                };
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "kubelet API connection ended");
                }
            }
        })
        .await
    }
}

/// Serves HTTP/2 connection `conn` until it ends; once no request began on it for `idle`, it is
/// shut down gracefully (GOAWAY: the streams under way finish, no new one starts), so that an
/// idle client does not hold one of the server's connections forever.
async fn close_when_idle<F>(
    conn: F,
    last_request: &Mutex<tokio::time::Instant>,
    idle: Duration,
) -> Result<(), hyper::Error>
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + GracefulShutdown,
{
    tokio::pin!(conn);
    loop {
        let since = *last_request.lock().unwrap_or_else(|e| e.into_inner());
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = tokio::time::sleep_until(since + idle) => {
                let since = *last_request.lock().unwrap_or_else(|e| e.into_inner());
                if since.elapsed() >= idle {
                    conn.as_mut().shut_down();
                    return conn.await;
                }
            }
        }
    }
}

/// A connection that can be asked to finish what it has and take nothing new.
trait GracefulShutdown {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B, E> GracefulShutdown for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

async fn handle(state: &State, cert_user: Option<&User>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    // Label values stay within the API's own path families.
    let family = match path.split('/').nth(1).unwrap_or("") {
        f @ ("healthz" | "pods" | "containerLogs" | "exec" | "attach" | "portForward" | "stats"
        | "metrics") => f.to_string(),
        _ => "other".to_string(),
    };
    let long_running = matches!(family.as_str(), "exec" | "attach" | "portForward");
    let key = (req.method().to_string(), family, long_running);
    state.metrics.change(&key, 1, 1);
    let _inflight = InFlight {
        metrics: &state.metrics,
        key,
    };
    let attrs = auth::attributes(req.method(), &path);
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = match state.auth.authenticate(cert_user, header).await {
        Ok(u) => u,
        Err(AuthError::Throttled) => return too_many_requests(),
        Err(e) => {
            if !matches!(e, AuthError::Unauthenticated) {
                tracing::warn!(error = %e, "authentication failed");
            }
            return text(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
    };
    let describe = format!(
        "user={}, verb={}, resource=nodes, subresource={}",
        user.name,
        attrs.verb,
        attrs.subresources.first().copied().unwrap_or("proxy")
    );
    match state.auth.authorize(&user, &attrs).await {
        Ok(true) => {}
        Ok(false) => return text(StatusCode::FORBIDDEN, format!("Forbidden ({describe})")),
        Err(AuthError::Throttled) => return too_many_requests(),
        Err(e) => {
            tracing::warn!(error = %e, "authorization failed");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Authorization error ({describe})"),
            );
        }
    }
    route(state, req).await
}

async fn route(state: &State, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let get = req.method() == Method::GET;
    let stream_method = get || req.method() == Method::POST;
    match segs.as_slice() {
        ["healthz"] | ["healthz", "ping"] if get => text(StatusCode::OK, "ok"),
        ["pods"] | ["pods", ""] if get => pod_list(state),
        ["containerLogs", ns, pod, container] if get => {
            container_logs(state, ns, pod, container, &query).await
        }
        ["exec", ns, pod, container] if stream_method => {
            let (ns, pod, c) = (ns.to_string(), pod.to_string(), container.to_string());
            exec(state, req, &ns, &pod, None, &c, &query, true).await
        }
        ["exec", ns, pod, uid, container] if stream_method => {
            let (ns, pod, uid, c) = (
                ns.to_string(),
                pod.to_string(),
                uid.to_string(),
                container.to_string(),
            );
            exec(state, req, &ns, &pod, Some(&uid), &c, &query, true).await
        }
        ["attach", ns, pod, container] if stream_method => {
            let (ns, pod, c) = (ns.to_string(), pod.to_string(), container.to_string());
            exec(state, req, &ns, &pod, None, &c, &query, false).await
        }
        ["attach", ns, pod, uid, container] if stream_method => {
            let (ns, pod, uid, c) = (
                ns.to_string(),
                pod.to_string(),
                uid.to_string(),
                container.to_string(),
            );
            exec(state, req, &ns, &pod, Some(&uid), &c, &query, false).await
        }
        ["portForward", ns, pod] if stream_method => {
            let (ns, pod) = (ns.to_string(), pod.to_string());
            port_forward(state, req, &ns, &pod, None, &query).await
        }
        ["portForward", ns, pod, uid] if stream_method => {
            let (ns, pod, uid) = (ns.to_string(), pod.to_string(), uid.to_string());
            port_forward(state, req, &ns, &pod, Some(&uid), &query).await
        }
        ["stats", "summary"] if get => match summary(state).await {
            Ok(s) => json(&s),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to get summary stats: {e}"),
            ),
        },
        ["metrics", "resource"] if get => {
            let s = summary(state).await;
            if let Err(e) = &s {
                tracing::warn!(error = %e, "resource metrics");
            }
            prometheus(stats::resource_metrics(s.as_ref().ok()))
        }
        ["metrics"] if get => prometheus(kubelet_metrics(state).await),
        _ => not_found(),
    }
}

fn prometheus(body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

async fn summary(state: &State) -> Result<stats::Summary, RuntimeError> {
    stats::summary(
        &state.runtime,
        &state.rates,
        &state.config.node_name,
        &state.config.root_dir,
        &state.config.pod_logs_dir,
    )
    .await
}

fn pod_list(state: &State) -> Response<Body> {
    let mut items: Vec<Pod> = state
        .pods
        .as_ref()
        .map(|s| s.state().iter().map(|p| (**p).clone()).collect())
        .unwrap_or_default();
    items.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    json(&serde_json::json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": items,
    }))
}

/// The UID of pod `ns/name` as the kubelet's watch knows it. A mirror pod's UID is not its
/// static pod's, so mirror pods give none (the newest containers by name are used).
fn known_uid(state: &State, ns: &str, name: &str) -> Option<String> {
    state.pods.as_ref()?.state().iter().find_map(|p| {
        (p.metadata.namespace.as_deref() == Some(ns)
            && p.metadata.name.as_deref() == Some(name)
            && !crate::static_pods::is_mirror(p))
        .then(|| p.metadata.uid.clone())
        .flatten()
    })
}

/// The pod's containers named `container`, newest first.
async fn containers_of(
    state: &State,
    ns: &str,
    pod: &str,
    uid: Option<&str>,
    container: &str,
) -> Result<Vec<cri::Container>, RuntimeError> {
    let mut selector = HashMap::from([
        (labels::POD_NAMESPACE.to_string(), ns.to_string()),
        (labels::POD_NAME.to_string(), pod.to_string()),
        (labels::CONTAINER_NAME.to_string(), container.to_string()),
    ]);
    if let Some(uid) = uid
        .map(str::to_string)
        .or_else(|| known_uid(state, ns, pod))
    {
        selector.insert(labels::POD_UID.to_string(), uid);
    }
    let mut client = state.runtime.runtime_client();
    let mut list = state
        .runtime
        .call_with(
            "ListContainers",
            None,
            client.list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    label_selector: selector,
                    ..Default::default()
                }),
            }),
        )
        .await?
        .containers;
    list.sort_by_key(|c| std::cmp::Reverse(c.created_at));
    Ok(list)
}

async fn container_status(
    runtime: &Runtime,
    id: &str,
) -> Result<cri::ContainerStatus, RuntimeError> {
    let mut client = runtime.runtime_client();
    let r = runtime
        .call_with(
            "ContainerStatus",
            None,
            client.container_status(cri::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            }),
        )
        .await?;
    Ok(r.status.unwrap_or_default())
}

async fn container_logs(
    state: &State,
    ns: &str,
    pod: &str,
    container: &str,
    query: &str,
) -> Response<Body> {
    let opts = match logs::LogOptions::from_query(query, jiff::Timestamp::now()) {
        Ok(o) => o,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let list = match containers_of(state, ns, pod, None, container).await {
        Ok(l) => l,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let chosen = if opts.previous {
        match list.get(1) {
            Some(c) => c,
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("previous terminated container {container:?} in pod {pod:?} not found"),
                );
            }
        }
    } else {
        match list.first() {
            Some(c) => c,
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("container {container:?} in pod {pod:?} is waiting to start"),
                );
            }
        }
    };
    let status = match container_status(&state.runtime, &chosen.id).await {
        Ok(s) => s,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut path = std::path::PathBuf::from(&status.log_path);
    if path.is_relative() {
        let uid = chosen
            .labels
            .get(labels::POD_UID)
            .cloned()
            .unwrap_or_default();
        path = state
            .config
            .pod_logs_dir
            .join(format!("{ns}_{pod}_{uid}"))
            .join(path);
    }
    if tokio::fs::metadata(&path).await.is_err() {
        return text(
            StatusCode::NOT_FOUND,
            format!("log of container {container:?} in pod {pod:?} not found"),
        );
    }
    let runtime = state.runtime.clone();
    let id = chosen.id.clone();
    let running: logs::RunningCheck = Box::new(move || {
        let runtime = runtime.clone();
        let id = id.clone();
        Box::pin(async move {
            container_status(&runtime, &id)
                .await
                .is_ok_and(|s| s.state == cri::ContainerState::ContainerRunning as i32)
        })
    });
    let follow = opts.follow;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if let Err(e) = logs::stream(path, opts, running, tx).await {
            tracing::debug!(error = %e, "container log stream ended");
        }
    });
    // As upstream's kubelet (whose response writer holds the first bytes back), the answer
    // starts with the log, not before it: the headers go with the first data, and a log that
    // ends within the first block goes whole, with its length. A client that reads the body
    // only once it has the headers (the API server relaying to a WebSocket) then has it all.
    let mut head = Vec::new();
    let mut ended = false;
    while head.len() < FIRST_LOG_BLOCK {
        match rx.recv().await {
            Some(b) => head.extend_from_slice(&b),
            None => {
                ended = true;
                break;
            }
        }
        if follow {
            break;
        }
    }
    let body = if ended {
        full(head)
    } else {
        let first =
            futures::stream::iter([Ok::<_, std::io::Error>(Frame::data(Bytes::from(head)))]);
        let rest = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
        });
        BodyExt::boxed(StreamBody::new(futures::StreamExt::chain(first, rest)))
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

#[allow(clippy::too_many_arguments)]
async fn exec(
    state: &State,
    req: Request<Incoming>,
    ns: &str,
    pod: &str,
    uid: Option<&str>,
    container: &str,
    query: &str,
    is_exec: bool,
) -> Response<Body> {
    let opts = streaming::StreamOptions::from_query(query);
    let list = match containers_of(state, ns, pod, uid, container).await {
        Ok(l) => l,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let Some(c) = list
        .iter()
        .find(|c| c.state == cri::ContainerState::ContainerRunning as i32)
    else {
        return text(
            StatusCode::NOT_FOUND,
            format!("container not found ({container:?})"),
        );
    };
    let mut client = state.runtime.runtime_client();
    let url = if is_exec {
        state
            .runtime
            .call_with(
                "Exec",
                None,
                client.exec(cri::ExecRequest {
                    container_id: c.id.clone(),
                    cmd: opts.command.clone(),
                    tty: opts.tty,
                    stdin: opts.stdin,
                    stdout: opts.stdout,
                    stderr: opts.stderr,
                }),
            )
            .await
            .map(|r| r.url)
    } else {
        state
            .runtime
            .call_with(
                "Attach",
                None,
                client.attach(cri::AttachRequest {
                    container_id: c.id.clone(),
                    stdin: opts.stdin,
                    tty: opts.tty,
                    stdout: opts.stdout,
                    stderr: opts.stderr,
                }),
            )
            .await
            .map(|r| r.url)
    };
    match url {
        Ok(url) => proxy(req, &url).await,
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn port_forward(
    state: &State,
    req: Request<Incoming>,
    ns: &str,
    pod: &str,
    uid: Option<&str>,
    query: &str,
) -> Response<Body> {
    let mut selector = HashMap::from([
        (labels::POD_NAMESPACE.to_string(), ns.to_string()),
        (labels::POD_NAME.to_string(), pod.to_string()),
    ]);
    if let Some(uid) = uid
        .map(str::to_string)
        .or_else(|| known_uid(state, ns, pod))
    {
        selector.insert(labels::POD_UID.to_string(), uid);
    }
    let mut client = state.runtime.runtime_client();
    let sandboxes = state
        .runtime
        .call_with(
            "ListPodSandbox",
            None,
            client.list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    label_selector: selector,
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            }),
        )
        .await;
    let sandbox = match sandboxes {
        Ok(r) => r.items.into_iter().max_by_key(|s| s.created_at),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let Some(sandbox) = sandbox else {
        return text(StatusCode::NOT_FOUND, format!("pod not found ({ns}/{pod})"));
    };
    // WebSocket clients name the ports in the query; SPDY ones per stream.
    let ports: Vec<i32> = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "ports" || k == "port")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    let url = state
        .runtime
        .call_with(
            "PortForward",
            None,
            client.port_forward(cri::PortForwardRequest {
                pod_sandbox_id: sandbox.id,
                port: ports,
            }),
        )
        .await;
    match url {
        Ok(r) => proxy(req, &r.url).await,
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn proxy(req: Request<Incoming>, url: &str) -> Response<Body> {
    match streaming::proxy(req, url).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "streaming proxy");
            text(StatusCode::BAD_GATEWAY, e.to_string())
        }
    }
}

/// The kubelet's own metrics (upstream names): `kubelet_node_name`, `kubelet_running_pods`,
/// `kubelet_running_containers`, `kubelet_http_requests_total`,
/// `kubelet_http_inflight_requests`.
async fn kubelet_metrics(state: &State) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP kubelet_node_name [ALPHA] The node's name. The count is always 1.\n\
         # TYPE kubelet_node_name gauge\nkubelet_node_name{{node=\"{}\"}} 1",
        state.config.node_name.replace('"', "\\\"")
    );
    let mut client = state.runtime.runtime_client();
    if let Ok(r) = state
        .runtime
        .call_with(
            "ListPodSandbox",
            None,
            client.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
        )
        .await
    {
        let ready = r
            .items
            .iter()
            .filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
            .count();
        let _ = writeln!(
            out,
            "# HELP kubelet_running_pods [ALPHA] Number of pods that have a running pod sandbox\n\
             # TYPE kubelet_running_pods gauge\nkubelet_running_pods {ready}"
        );
    }
    if let Ok(r) = state
        .runtime
        .call_with(
            "ListContainers",
            None,
            client.list_containers(cri::ListContainersRequest { filter: None }),
        )
        .await
    {
        let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
        for c in &r.containers {
            let s = match cri::ContainerState::try_from(c.state) {
                Ok(cri::ContainerState::ContainerCreated) => "created",
                Ok(cri::ContainerState::ContainerRunning) => "running",
                Ok(cri::ContainerState::ContainerExited) => "exited",
                _ => "unknown",
            };
            *by_state.entry(s).or_default() += 1;
        }
        let _ = writeln!(
            out,
            "# HELP kubelet_running_containers [ALPHA] Number of containers currently running\n\
             # TYPE kubelet_running_containers gauge"
        );
        for (s, n) in by_state {
            let _ = writeln!(
                out,
                "kubelet_running_containers{{container_state=\"{s}\"}} {n}"
            );
        }
    }
    let counts = state
        .metrics
        .counts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let _ = writeln!(
        out,
        "# HELP kubelet_http_requests_total [ALPHA] Number of the http requests received since the server started\n\
         # TYPE kubelet_http_requests_total counter"
    );
    for ((method, path, long), (total, _)) in &counts {
        let _ = writeln!(
            out,
            "kubelet_http_requests_total{{long_running=\"{long}\",method=\"{method}\",path=\"{path}\",server_type=\"readwrite\"}} {total}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP kubelet_http_inflight_requests [ALPHA] Number of the inflight http requests\n\
         # TYPE kubelet_http_inflight_requests gauge"
    );
    for ((method, path, long), (_, inflight)) in &counts {
        let _ = writeln!(
            out,
            "kubelet_http_inflight_requests{{long_running=\"{long}\",method=\"{method}\",path=\"{path}\",server_type=\"readwrite\"}} {inflight}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flags;
    use rustls::pki_types::pem::PemObject;

    /// A flags-only configuration serving on a free loopback port (anonymous requests allowed).
    fn flags_only(dir: &std::path::Path) -> Config {
        Config::load(&Flags {
            hostname_override: Some("node-a".into()),
            root_dir: Some(dir.into()),
            address: Some("127.0.0.1".parse().unwrap()),
            port: Some(0),
            ..Default::default()
        })
        .unwrap()
    }

    /// Serves `config` within `limits`, with no runtime behind it; returns the address.
    async fn serve(config: &Config, limits: Limits) -> SocketAddr {
        let runtime = Runtime::new(
            &format!("unix://{}/no-runtime.sock", config.root_dir.display()),
            Duration::from_secs(1),
        )
        .unwrap();
        let server = Server::bind(config, runtime, None, None)
            .await
            .unwrap()
            .with_limits(limits);
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.serve());
        addr
    }

    /// A client trusting the self-signed certificate at `ca`, offering `alpn`.
    fn client_tls(ca: &std::path::Path, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tls
    }

    /// A request over TLS to a server on loopback, trusting its self-signed certificate.
    async fn get(addr: SocketAddr, ca: &std::path::Path, path: &str) -> (u16, String) {
        let tls = client_tls(ca, &[]);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("node-a").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "node-a")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A client that offers HTTP/2 (as the API server does) is served over it, and its
    /// connection is let go (GOAWAY, then closed) once no request began on it for the header
    /// deadline, as an idle HTTP/1.1 connection is.
    #[tokio::test]
    async fn http2_clients_are_served_and_idle_ones_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_connections: 8,
            header_read_timeout: Duration::from_secs(1),
        };
        let addr = serve(&flags_only(dir.path()), limits).await;
        let tls = client_tls(&dir.path().join("pki/kubelet.crt"), &[b"h2"]);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("node-a").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::get("https://node-a/healthz")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        // Idle past the deadline: the server ends the connection.
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
        assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
    }

    /// 10250 hangs up on a client trickling its headers (after the TLS handshake) and closes
    /// connections beyond its cap; a flags-only start warns that the API is open.
    #[tokio::test]
    async fn slow_clients_are_cut_off_and_connections_capped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let config = flags_only(dir.path());
        assert_eq!(config.insecure_api_settings().len(), 2);
        let limits = Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(1),
        };
        let addr = serve(&config, limits).await;
        let tls = Arc::new(client_tls(&dir.path().join("pki/kubelet.crt"), &[]));
        let connect = || {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("node-a").unwrap();
                tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
            }
        };
        let mut slow = connect().await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let hung_up = loop {
            tokio::select! {
                r = slow.read(&mut buf) => break r.map(|n| n == 0).unwrap_or(true),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if slow.write_all(b"a").await.is_err() || slow.flush().await.is_err() {
                        break true;
                    }
                }
            }
        };
        assert!(hung_up, "answered a request whose headers never ended");
        drop(slow);
        // Two silent connections (in their TLS handshake, accepted first) fill the cap; a third
        // is closed, so its handshake fails.
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        assert!(connect().await.is_err(), "served beyond the cap");
        drop(held);
        let mut served = false;
        for _ in 0..100 {
            if connect().await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served);
    }

    #[tokio::test]
    async fn flag_defaults_serve_anonymously_over_a_self_signed_certificate() {
        let dir = tempfile::tempdir().unwrap();
        // Without a config file upstream allows anonymous requests and authorizes everything.
        let config = Config::load(&Flags {
            hostname_override: Some("node-a".into()),
            root_dir: Some(dir.path().into()),
            address: Some("127.0.0.1".parse().unwrap()),
            port: Some(0),
            ..Default::default()
        })
        .unwrap();
        let runtime = Runtime::new(
            &format!("unix://{}/no-runtime.sock", dir.path().display()),
            Duration::from_secs(1),
        )
        .unwrap();
        let server = Server::bind(&config, runtime, None, None).await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.serve());
        let ca = dir.path().join("pki/kubelet.crt");
        assert_eq!(get(addr, &ca, "/healthz").await, (200, "ok".into()));
        let (status, pods) = get(addr, &ca, "/pods").await;
        assert_eq!(status, 200);
        let pods: serde_json::Value = serde_json::from_str(&pods).unwrap();
        assert_eq!(pods["kind"], "PodList");
        assert_eq!(pods["items"], serde_json::json!([]));
        assert_eq!(get(addr, &ca, "/nope").await.0, 404);
        assert_eq!(get(addr, &ca, "/containerLogs/ns/p").await.0, 404);
        // The runtime is down: the summary fails and the resource metrics say so.
        assert_eq!(get(addr, &ca, "/stats/summary").await.0, 500);
        let (status, metrics) = get(addr, &ca, "/metrics/resource").await;
        assert_eq!(status, 200);
        assert!(metrics.contains("\nscrape_error 1\n"), "{metrics}");
        let (_, own) = get(addr, &ca, "/metrics").await;
        assert!(
            own.contains("kubelet_node_name{node=\"node-a\"} 1"),
            "{own}"
        );
        assert!(
            own.contains(
                "kubelet_http_requests_total{long_running=\"false\",method=\"GET\",path=\"healthz\",server_type=\"readwrite\"} 1"
            ),
            "{own}"
        );
    }
}
