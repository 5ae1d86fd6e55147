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

/// HTTP GET probe: success on a 2xx or 3xx status (redirects are not followed). `scheme`
/// `HTTPS` speaks TLS without verifying the pod's certificate, as upstream's prober does.
pub async fn http_get(
    scheme: &str,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    let tls = is_https(scheme)?;
    let code = http_request(tls, host, port, path, headers, "kube-probe/1.37", timeout).await?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// Whether an `httpGet` scheme is HTTPS (`HTTP` or `HTTPS`, any case, as upstream accepts).
pub fn is_https(scheme: &str) -> Result<bool, String> {
    if scheme.eq_ignore_ascii_case("HTTPS") {
        Ok(true)
    } else if scheme.eq_ignore_ascii_case("HTTP") {
        Ok(false)
    } else {
        Err(format!("unsupported httpGet scheme {scheme:?}"))
    }
}

/// One HTTP/1.1 GET as `user_agent`, over TLS when `tls`; returns the response's status code.
pub async fn http_request(
    tls: bool,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    user_agent: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: {user_agent}\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        if !tls {
            return status_of(tcp, &req).await;
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("server name {host:?}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(insecure_tls()?)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        status_of(stream, &req).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| "request timed out".to_string())?
}

/// Sends `req` and reads the status code of the response.
async fn status_of<S>(mut s: S, req: &str) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| "not an HTTP response".to_string())
}

/// Accepts any certificate chain (Go's `InsecureSkipVerify`, which upstream's prober and hook
/// runner use: a pod's serving certificate is rarely one the node could check), while still
/// checking that the server holds the key of the certificate it shows.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client of HTTPS probes and hooks (built once).
fn insecure_tls() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Result<std::sync::Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS client: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Ok(std::sync::Arc::new(config))
        })
        .clone()
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
        assert_eq!(
            http_get("HTTP", "127.0.0.1", port, "/", &[], t).await,
            Ok(())
        );
        assert!(
            http_get("HTTP", "127.0.0.1", port, "/", &[], t)
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

    /// A TLS server on loopback with a self-signed certificate, answering `status` once per
    /// connection; its port.
    async fn tls_server(status: u16) -> u16 {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["pod.invalid".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A plaintext request fails the handshake: nothing to answer.
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                    let _ = s.shutdown().await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn https_probes_speak_tls_without_verifying_the_pods_certificate() {
        let t = Duration::from_secs(5);
        let ok = tls_server(200).await;
        // A self-signed certificate for another name: accepted, as upstream's prober does.
        http_get("HTTPS", "127.0.0.1", ok, "/livez", &[], t)
            .await
            .unwrap();
        http_get("https", "127.0.0.1", ok, "/livez", &[], t)
            .await
            .unwrap();
        // Plain HTTP to a TLS port fails; so does a failing status over TLS.
        assert!(
            http_get("HTTP", "127.0.0.1", ok, "/livez", &[], t)
                .await
                .is_err()
        );
        let failing = tls_server(500).await;
        let e = http_get("HTTPS", "127.0.0.1", failing, "/", &[], t)
            .await
            .unwrap_err();
        assert!(e.contains("500"), "{e}");
        assert!(http_get("FTP", "127.0.0.1", ok, "/", &[], t).await.is_err());
    }
}
