//! Health-check node ports of `externalTrafficPolicy: Local` LoadBalancer Services: on
//! `spec.healthCheckNodePort` every node answers whether it has local endpoints for the
//! Service, so that load balancers send traffic only to nodes that can serve it.
//!
//! As upstream: `GET` any path -> JSON `{"service": {"namespace", "name"}, "localEndpoints": N,
//! "serviceProxyHealthy": bool}`, 200 when N > 0 and the proxy is healthy, else 503.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hyper::{Method, StatusCode};
use k8s_openapi::jiff::Timestamp;

use crate::health::Health;
use crate::model::{IpFamily, Model, ServicePort};
use crate::server::{self, Handler};

/// What one health-check node port reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceHealth {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Ready (or serving-terminating) endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// The health-check node ports the model asks for, with what each reports.
pub fn desired(model: &Model) -> BTreeMap<u16, ServiceHealth> {
    desired_of(model.services.values(), &model.node.name)
}

/// Whether `port` asks for a health-check node port.
pub fn is_checked(port: &ServicePort) -> bool {
    port.health_check_node_port.is_some() && port.external_local()
}

/// [`desired`] of some service ports (those [`is_checked`] among them count), on node
/// `node_name`.
pub fn desired_of<'a>(
    ports: impl IntoIterator<Item = &'a ServicePort>,
    node_name: &str,
) -> BTreeMap<u16, ServiceHealth> {
    let mut out: BTreeMap<u16, ServiceHealth> = BTreeMap::new();
    for port in ports {
        let Some(hc) = port.health_check_node_port else {
            continue;
        };
        if !port.external_local() {
            continue;
        }
        let mut local = BTreeSet::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            local.extend(port.select(family, node_name).local.iter().map(|e| e.ip));
        }
        let entry = out.entry(hc).or_insert_with(|| ServiceHealth {
            namespace: port.id.namespace.clone(),
            name: port.id.name.clone(),
            local_endpoints: 0,
        });
        entry.local_endpoints = entry.local_endpoints.max(local.len());
    }
    out
}

/// The answer of a health-check node port.
pub fn answer(info: &ServiceHealth, proxy_healthy: bool) -> (StatusCode, String) {
    let status = if info.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": { "namespace": info.namespace, "name": info.name },
        "localEndpoints": info.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    (status, body)
}

struct Port {
    info: Arc<Mutex<ServiceHealth>>,
    task: tokio::task::JoinHandle<()>,
}

/// The listeners of the health-check node ports, kept in line with the model after each sync.
pub struct HealthCheckPorts {
    runtime: tokio::runtime::Handle,
    health: Arc<Health>,
    bind: IpAddr,
    ports: HashMap<u16, Port>,
}

impl std::fmt::Debug for HealthCheckPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ports: Vec<&u16> = self.ports.keys().collect();
        ports.sort();
        f.debug_struct("HealthCheckPorts")
            .field("bind", &self.bind)
            .field("ports", &ports)
            .finish_non_exhaustive()
    }
}

impl HealthCheckPorts {
    /// Listeners on `0.0.0.0`, served by `runtime` (the health server's own).
    pub fn new(runtime: tokio::runtime::Handle, health: Arc<Health>) -> Self {
        Self::with_bind(runtime, health, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// Listeners on `bind`.
    pub fn with_bind(runtime: tokio::runtime::Handle, health: Arc<Health>, bind: IpAddr) -> Self {
        HealthCheckPorts {
            runtime,
            health,
            bind,
            ports: HashMap::new(),
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> BTreeSet<u16> {
        self.ports.keys().copied().collect()
    }

    /// Opens, updates and closes listeners to match `desired`. A port that cannot be bound
    /// (in use) is logged and tried again on the next sync.
    pub fn sync(&mut self, desired: BTreeMap<u16, ServiceHealth>) {
        self.ports.retain(|port, p| {
            let keep = desired.contains_key(port);
            if !keep {
                p.task.abort();
                tracing::info!(port, "closed health-check node port");
            }
            keep
        });
        for (port, info) in desired {
            if let Some(p) = self.ports.get(&port) {
                *p.info.lock().unwrap_or_else(|e| e.into_inner()) = info;
                continue;
            }
            let addr = SocketAddr::new(self.bind, port);
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(port, service = %format!("{}/{}", info.namespace, info.name), error = %e, "cannot open health-check node port");
                    continue;
                }
            };
            tracing::info!(port, service = %format!("{}/{}", info.namespace, info.name), "opened health-check node port");
            let info = Arc::new(Mutex::new(info));
            let (shared, health) = (info.clone(), self.health.clone());
            let handler: Handler = Arc::new(move |method: &Method, _path: &str| {
                if method != Method::GET && method != Method::HEAD {
                    return server::response(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "text/plain",
                        "method not allowed\n".into(),
                    );
                }
                let info = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let healthy = health
                    .report(tokio::time::Instant::now(), Timestamp::now())
                    .healthy;
                let (status, body) = answer(&info, healthy);
                server::response(status, "application/json", body)
            });
            let task = self.runtime.spawn(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => server::serve_with(l, handler).await,
                    Err(e) => tracing::error!(port, error = %e, "health-check listener"),
                }
            });
            self.ports.insert(port, Port { info, task });
        }
    }
}

impl Drop for HealthCheckPorts {
    fn drop(&mut self) {
        for p in self.ports.values() {
            p.task.abort();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::model;
    use crate::testutil::{NODE, config, ep, service, slice};

    fn lb_local(name: &str, hc: u16, endpoints: serde_json::Value) -> Model {
        let svc = service(
            "default",
            name,
            json!({
                "type": "LoadBalancer", "clusterIP": "10.96.0.30",
                "externalTrafficPolicy": "Local", "healthCheckNodePort": hc,
                "ports": [{ "port": 80, "nodePort": 30080 }],
            }),
        );
        let sl = slice(
            "default",
            name,
            &format!("{name}-1"),
            "IPv4",
            json!([{ "port": 8080 }]),
            endpoints,
        );
        let (m, w) = model::build([&svc], [&sl], None, &config());
        assert!(w.is_empty(), "{w:?}");
        m
    }

    #[test]
    fn counts_local_endpoints_of_etp_local_services() {
        let m = lb_local(
            "lb",
            32000,
            json!([
                ep("10.244.0.1", NODE, true),
                ep("10.244.0.2", NODE, false),
                ep("10.244.1.1", "node-b", true)
            ]),
        );
        let d = desired(&m);
        assert_eq!(d.len(), 1);
        assert_eq!(d[&32000].local_endpoints, 1);
        assert_eq!(d[&32000].name, "lb");
        let (status, body) = answer(&d[&32000], true);
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({ "service": { "namespace": "default", "name": "lb" }, "localEndpoints": 1, "serviceProxyHealthy": true })
        );
        assert_eq!(answer(&d[&32000], false).0, StatusCode::SERVICE_UNAVAILABLE);
        let none = lb_local("lb", 32000, json!([ep("10.244.1.1", "node-b", true)]));
        assert_eq!(
            answer(&desired(&none)[&32000], true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    fn get(port: u16) -> String {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn listeners_follow_the_model() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let mut ports = HealthCheckPorts::with_bind(
            rt.handle().clone(),
            health,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        );
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let info = |n| ServiceHealth {
            namespace: "default".into(),
            name: "lb".into(),
            local_endpoints: n,
        };
        ports.sync([(free, info(2))].into());
        let out = get(free);
        assert!(
            out.contains(" 200 ") && out.contains("\"localEndpoints\":2"),
            "{out}"
        );
        ports.sync([(free, info(0))].into());
        let out = get(free);
        assert!(out.contains(" 503 "), "{out}");
        ports.sync(BTreeMap::new());
        assert!(ports.ports().is_empty());
        // Closed: the listener goes with its task.
        let mut closed = false;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", free)).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(closed);
    }
}
