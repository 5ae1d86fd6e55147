//! Liveness, readiness and startup probes: when to run them and what their results mean
//! (pure, [`ProbeState`]), and how to run one (exec through CRI, HTTP GET, TCP connect, gRPC
//! health checking).

use std::time::Duration;

use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Timing and thresholds of one probe, with upstream's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    /// From a Probe (defaults: delay 0, period 10 s, timeout 1 s, thresholds 1 and 3).
    pub fn of(p: &Probe) -> Self {
        let secs = |v: Option<i32>, d: u64| Duration::from_secs(v.map_or(d, |s| s.max(0) as u64));
        Timing {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: p.success_threshold.map_or(1, |v| v.max(1) as u32),
            failure_threshold: p.failure_threshold.map_or(3, |v| v.max(1) as u32),
        }
    }
}

/// The running state of one probe of one container instance.
#[derive(Clone, Debug)]
pub struct ProbeState {
    pub timing: Timing,
    started: Instant,
    last_run: Option<Instant>,
    successes: u32,
    failures: u32,
    /// The current verdict: `None` until the thresholds decide.
    pub result: Option<bool>,
}

impl ProbeState {
    /// A probe for a container that started at `started`.
    pub fn new(timing: Timing, started: Instant) -> Self {
        ProbeState {
            timing,
            started,
            last_run: None,
            successes: 0,
            failures: 0,
            result: None,
        }
    }

    /// Whether the probe should run at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.started + self.timing.initial_delay
            && self.last_run.is_none_or(|t| now >= t + self.timing.period)
    }

    /// Records one outcome; returns the verdict when it changes.
    pub fn record(&mut self, now: Instant, ok: bool) -> Option<bool> {
        self.last_run = Some(now);
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let verdict = if self.successes >= self.timing.success_threshold {
            Some(true)
        } else if self.failures >= self.timing.failure_threshold {
            Some(false)
        } else {
            self.result
        };
        let changed = verdict != self.result;
        self.result = verdict;
        if changed { verdict } else { None }
    }
}

/// How to run a probe's action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Exec(Vec<String>),
    Http {
        host: String,
        port: u16,
        path: String,
        scheme: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    /// `grpc.health.v1.Health/Check` of `service` on the pod IP.
    Grpc {
        host: String,
        port: u16,
        service: String,
    },
    Unsupported(String),
}

fn port_of(p: &IntOrString, ports: &[(String, i32)]) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => ports
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, n)| u16::try_from(*n).ok())
            .or_else(|| name.parse().ok()),
    }
}

/// The action of `probe` for a container with named ports `ports` in a pod at `pod_ip`.
pub fn action(probe: &Probe, pod_ip: &str, ports: &[(String, i32)]) -> Action {
    if let Some(e) = &probe.exec {
        return Action::Exec(e.command.clone().unwrap_or_default());
    }
    if let Some(h) = &probe.http_get {
        let Some(port) = port_of(&h.port, ports) else {
            return Action::Unsupported(format!("invalid port {:?}", h.port));
        };
        return Action::Http {
            host: h
                .host
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| pod_ip.to_string()),
            port,
            path: h
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
            scheme: h.scheme.clone().unwrap_or_else(|| "HTTP".into()),
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect(),
        };
    }
    if let Some(t) = &probe.tcp_socket {
        let Some(port) = port_of(&t.port, ports) else {
            return Action::Unsupported(format!("invalid port {:?}", t.port));
        };
        return Action::Tcp {
            host: t
                .host
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| pod_ip.to_string()),
            port,
        };
    }
    if let Some(g) = &probe.grpc {
        let Ok(port) = u16::try_from(g.port) else {
            return Action::Unsupported(format!("invalid port {}", g.port));
        };
        if g.mode.as_deref().is_some_and(|m| m != "Plaintext") {
            // TLS without verification (an alpha field) is refused rather than run plaintext.
            return Action::Unsupported(format!("gRPC probe mode {:?} is not supported", g.mode));
        }
        return Action::Grpc {
            host: pod_ip.to_string(),
            port,
            service: g.service.clone().unwrap_or_default(),
        };
    }
    Action::Unsupported("probe has no handler".into())
}

/// gRPC probe: success when the server's `grpc.health.v1.Health/Check` answers SERVING for
/// `service` within `timeout` (plaintext, like upstream).
pub async fn grpc(host: &str, port: u16, service: &str, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let check = async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("failed to connect service \"{host}:{port}\": {e}"))?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|s| format!("health rpc failed: {}", s.message()))?;
        let status = resp.into_inner().status;
        if status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            let name = ServingStatus::try_from(status)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| status.to_string());
            Err(format!("service unhealthy (responded with \"{name}\")"))
        }
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "timeout: health rpc did not complete within {timeout:?}"
        )),
    }
}

/// HTTP GET probe: success on a 2xx or 3xx status (redirects are not followed).
pub async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    let code = http_request(host, port, path, headers, "kube-probe/1.37", timeout).await?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// One HTTP/1.1 GET as `user_agent`; returns the response's status code.
pub async fn http_request(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    user_agent: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: {user_agent}\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "not an HTTP response".to_string())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| "request timed out".to_string())?
}

/// TCP probe: success when a connection opens.
pub async fn tcp(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("probe timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ExecAction, HTTPGetAction};

    fn timing(delay: u64, period: u64, ok: u32, fail: u32) -> Timing {
        Timing {
            initial_delay: Duration::from_secs(delay),
            period: Duration::from_secs(period),
            timeout: Duration::from_secs(1),
            success_threshold: ok,
            failure_threshold: fail,
        }
    }

    #[test]
    fn defaults_are_upstreams() {
        let t = Timing::of(&Probe::default());
        assert_eq!(t, timing(0, 10, 1, 3));
    }

    #[test]
    fn thresholds_decide_and_only_changes_are_reported() {
        let t0 = Instant::now();
        let mut p = ProbeState::new(timing(5, 2, 1, 3), t0);
        assert!(!p.due(t0 + Duration::from_secs(4)), "initial delay");
        assert!(p.due(t0 + Duration::from_secs(5)));
        assert_eq!(p.record(t0, true), Some(true));
        assert!(!p.due(t0 + Duration::from_secs(1)), "period");
        assert_eq!(p.record(t0, false), None);
        assert_eq!(p.record(t0, false), None);
        assert_eq!(p.record(t0, false), Some(false), "third failure flips it");
        assert_eq!(p.record(t0, false), None);
        assert_eq!(p.record(t0, true), Some(true));
    }

    #[test]
    fn actions_resolve_named_ports_and_default_host_and_path() {
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("web".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let a = action(&probe, "10.88.0.5", &[("web".into(), 8080)]);
        assert_eq!(
            a,
            Action::Http {
                host: "10.88.0.5".into(),
                port: 8080,
                path: "/".into(),
                scheme: "HTTP".into(),
                headers: vec![]
            }
        );
        let exec = Probe {
            exec: Some(ExecAction {
                command: Some(vec!["true".into()]),
            }),
            ..Default::default()
        };
        assert_eq!(action(&exec, "", &[]), Action::Exec(vec!["true".into()]));
        assert!(matches!(
            action(&Probe::default(), "", &[]),
            Action::Unsupported(_)
        ));
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in [200u16, 500] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        assert_eq!(http_get("127.0.0.1", port, "/", &[], t).await, Ok(()));
        assert!(
            http_get("127.0.0.1", port, "/", &[], t)
                .await
                .unwrap_err()
                .contains("500")
        );
        assert!(tcp("127.0.0.1", 1, t).await.is_err());
    }

    #[tokio::test]
    async fn grpc_probes_against_a_real_health_server() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("ready", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("draining", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let t = Duration::from_secs(2);
        // The empty service name is the server as a whole, SERVING by default.
        assert_eq!(grpc("127.0.0.1", port, "", t).await, Ok(()));
        assert_eq!(grpc("127.0.0.1", port, "ready", t).await, Ok(()));
        let err = grpc("127.0.0.1", port, "draining", t).await.unwrap_err();
        assert!(err.contains("NOT_SERVING"), "{err}");
        let err = grpc("127.0.0.1", port, "unknown", t).await.unwrap_err();
        assert!(err.contains("health rpc failed"), "{err}");
        assert!(grpc("127.0.0.1", 1, "", t).await.is_err());
        let probe = Probe {
            grpc: Some(k8s_openapi::api::core::v1::GRPCAction {
                port: 9000,
                service: Some("ready".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            action(&probe, "10.88.0.5", &[]),
            Action::Grpc {
                host: "10.88.0.5".into(),
                port: 9000,
                service: "ready".into()
            }
        );
    }
}
