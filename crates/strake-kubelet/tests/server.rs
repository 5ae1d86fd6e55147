//! strake-kubelet's HTTPS API on 10250 against a real control plane and containerd:
//! `kubectl logs` (tail, previous, follow), `kubectl exec`, `attach` (to an ephemeral container of
//! `kubectl debug` too) and `port-forward` through the API server (which authenticates with its
//! kubelet client certificate and is authorized by SubjectAccessReview), and direct requests
//! from a ServiceAccount token: 401 without credentials, 403 without RBAC, 200 with it, plus
//! `/stats/summary` and `/metrics/resource`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::forward::Forward;
use strake_integration::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

mod common;
use common::{KubeletNode, RuntimeKind, wait_for};

fn node_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 213, 0, 10 + index)
}

/// Starts a node on containerd (streaming goes through containerd's streaming server); the
/// test bed gives its 10250 a certificate of the cluster CA, which the API server verifies.
async fn start_node(cp: &ControlPlane, index: u8, name: &str, extra: &str) -> KubeletNode {
    KubeletNode::start_on(cp, index, name, extra, RuntimeKind::Containerd)
        .await
        .expect("start node")
}

async fn create_pod(client: &kube::Client, pod: serde_json::Value) -> Pod {
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // The default ServiceAccount appears shortly after the control plane starts.
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await
}

async fn wait_running(client: &kube::Client, name: &str, node: &KubeletNode) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut last = None;
    for _ in 0..480 {
        if let Ok(p) = pods.get(name).await {
            if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                return p;
            }
            last = Some(p);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "pod {name} not Running: {:?}\nkubelet log:\n{}",
        last.and_then(|p| p.status),
        node.log()
    );
}

/// kubectl with the admin kubeconfig (through the root-namespace forward to the API server).
fn kubectl(cp: &ControlPlane, args: &[&str]) -> tokio::process::Command {
    let bin = strake_integration::paths::kubernetes_bin("kubectl").expect("kubectl");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn kubectl_out(cp: &ControlPlane, args: &[&str]) -> std::process::Output {
    kubectl(cp, args).output().await.expect("run kubectl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ticks(s: &str) -> Vec<u64> {
    s.lines()
        .filter_map(|l| l.trim().strip_prefix("tick-")?.parse().ok())
        .collect()
}

const SH: &str = "/bin/sh";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_exec_attach_and_port_forward_work_through_the_api_server() {
    const NODE: &str = "strake-api-0";
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    let node = start_node(&cp, 0, NODE, "").await;
    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    // No "$(" in the scripts: Kubernetes would read it as a variable reference.
    create_pod(
        &client,
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "logger" },
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 1,
                "volumes": [{ "name": "data", "emptyDir": {} }],
                "containers": [
                    { "name": "counter", "image": image, "command": [SH, "-c",
                      "echo first; echo second; echo third; i=0; while true; do echo tick-$i; i=`expr $i + 1`; sleep 1; done"] },
                    { "name": "crasher", "image": image, "command": [SH, "-c",
                      "n=`cat /data/n 2>/dev/null || echo 0`; n=`expr $n + 1`; echo $n > /data/n; echo run-$n; sleep 1; exit 3"],
                      "volumeMounts": [{ "name": "data", "mountPath": "/data" }] },
                    { "name": "web", "image": image, "command": [SH, "-c",
                      "mkdir -p /www && echo hello-from-pod > /www/index.html && exec httpd -f -p 8080 -h /www"] }
                ]
            }
        }),
    )
    .await;
    wait_running(&client, "logger", &node).await;

    // Plain logs: the container's output, in order.
    let out = wait_for("logs of counter", 60, || async {
        let o = kubectl_out(&cp, &["logs", "logger", "-c", "counter"]).await;
        let s = text(&o.stdout);
        (o.status.success() && ticks(&s).len() >= 3).then_some(s)
    })
    .await;
    assert!(out.starts_with("first\nsecond\nthird\ntick-0\n"), "{out}");

    // Over a WebSocket (`binary.k8s.io`), as upstream's conformance reads them: the API server
    // relays the kubelet's answer (which it fetches over HTTP/2, as from upstream's kubelet).
    let kubeconfig = std::fs::read_to_string(cp.kubeconfig()).expect("kubeconfig");
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("server")
        .to_string();
    let api = KubeletApi::new(
        &cp,
        server.parse().expect("API server address"),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
    let (status, ws_out) = api
        .ws_read(
            "/api/v1/namespaces/default/pods/logger/log?container=counter",
            "binary.k8s.io",
        )
        .await
        .expect("websocket");
    assert_eq!(status, 101, "{ws_out}");
    assert!(
        ws_out.starts_with("first\nsecond\nthird\ntick-0\n"),
        "{ws_out:?}"
    );

    // --tail: the last lines only.
    let o = kubectl_out(&cp, &["logs", "logger", "-c", "counter", "--tail=2"]).await;
    let s = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(s.lines().count(), 2, "{s}");
    assert_eq!(ticks(&s).len(), 2, "{s}");
    let t = ticks(&s);
    assert_eq!(t[1], t[0] + 1, "{s}");

    // --limit-bytes and --timestamps.
    let o = kubectl_out(&cp, &["logs", "logger", "-c", "counter", "--limit-bytes=8"]).await;
    assert_eq!(text(&o.stdout), "first\nse");
    let o = kubectl_out(
        &cp,
        &[
            "logs",
            "logger",
            "-c",
            "counter",
            "--timestamps",
            "--tail=1",
        ],
    )
    .await;
    let s = text(&o.stdout);
    let (ts, rest) = s.trim_end().split_once(' ').expect("timestamp prefix");
    assert!(
        ts.parse::<jiff::Timestamp>().is_ok() && rest.starts_with("tick-"),
        "{s}"
    );

    // -f: new lines keep arriving on the open stream.
    let mut follow = kubectl(&cp, &["logs", "-f", "logger", "-c", "counter", "--tail=1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl logs -f");
    let stdout = follow.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let followed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(l)) = lines.next_line().await {
            seen.extend(ticks(&l));
            if seen.len() >= 4 {
                return true;
            }
        }
        false
    })
    .await;
    let _ = follow.start_kill();
    assert!(
        matches!(followed, Ok(true)),
        "follow saw only {seen:?}\n{}",
        node.log()
    );
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");

    // --previous: the run before the current one of a restarting container.
    wait_for("previous and current runs of crasher", 120, || async {
        let cur = kubectl_out(&cp, &["logs", "logger", "-c", "crasher"]).await;
        let prev = kubectl_out(&cp, &["logs", "logger", "-c", "crasher", "--previous"]).await;
        let run = |o: &std::process::Output| -> Option<u64> {
            text(&o.stdout).trim().strip_prefix("run-")?.parse().ok()
        };
        match (run(&cur), run(&prev)) {
            (Some(c), Some(p)) if c >= 2 && p == c - 1 => Some(()),
            _ => None,
        }
    })
    .await;

    // exec: stdout, stderr and the exit code come back.
    let o = kubectl_out(
        &cp,
        &[
            "exec",
            "logger",
            "-c",
            "counter",
            "--",
            SH,
            "-c",
            "echo to-out; echo to-err >&2; exit 7",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(7), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "to-out\n");
    assert!(text(&o.stderr).contains("to-err"), "{}", text(&o.stderr));
    let o = kubectl_out(
        &cp,
        &[
            "exec",
            "logger",
            "-c",
            "web",
            "--",
            "cat",
            "/www/index.html",
        ],
    )
    .await;
    assert_eq!(text(&o.stdout), "hello-from-pod\n", "{}", text(&o.stderr));

    // attach: the running container's output, live.
    let mut attach = kubectl(&cp, &["attach", "logger", "-c", "counter"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kubectl attach");
    let mut attach_lines = tokio::io::BufReader::new(attach.stdout.take().expect("stdout")).lines();
    let attached = tokio::time::timeout(Duration::from_secs(30), async {
        let mut got = Vec::new();
        while let Ok(Some(l)) = attach_lines.next_line().await {
            got.extend(ticks(&l));
            if got.len() >= 2 {
                return got;
            }
        }
        got
    })
    .await;
    let _ = attach.start_kill();
    let _ = attach.wait().await;
    assert!(
        attached.as_ref().is_ok_and(|g| g.len() >= 2),
        "attach saw {attached:?}"
    );

    // kubectl debug: an ephemeral container joins the running pod, and attach follows it.
    let o = kubectl_out(
        &cp,
        &[
            "debug",
            "logger",
            "--image",
            &image,
            "-c",
            "debugger",
            "--",
            SH,
            "-c",
            "i=0; while true; do echo debug-$i; i=`expr $i + 1`; sleep 1; done",
        ],
    )
    .await;
    assert!(o.status.success(), "kubectl debug: {}", text(&o.stderr));
    let mut debug = None;
    for _ in 0..60 {
        let mut attach = kubectl(&cp, &["attach", "logger", "-c", "debugger"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kubectl attach");
        let mut lines = tokio::io::BufReader::new(attach.stdout.take().expect("stdout")).lines();
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            let mut got = Vec::new();
            while let Ok(Some(l)) = lines.next_line().await {
                if l.starts_with("debug-") {
                    got.push(l);
                }
                if got.len() >= 2 {
                    break;
                }
            }
            got
        })
        .await
        .unwrap_or_default();
        let _ = attach.start_kill();
        let _ = attach.wait().await;
        if seen.len() >= 2 {
            debug = Some(seen);
            break;
        }
        // Not running yet: the ephemeral container is being pulled and started.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        debug.is_some(),
        "attach never followed the ephemeral container"
    );

    // port-forward: kubectl listens on root-namespace loopback, the bytes reach the pod.
    let mut pf = kubectl(&cp, &["port-forward", "pod/logger", ":8080"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl port-forward");
    let mut pf_lines = tokio::io::BufReader::new(pf.stdout.take().expect("stdout")).lines();
    let local: SocketAddr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = pf_lines.next_line().await {
            // "Forwarding from 127.0.0.1:41234 -> 8080"
            if let Some(addr) = l
                .strip_prefix("Forwarding from ")
                .and_then(|r| r.split(' ').next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .filter(|a| a.is_ipv4())
            {
                return Some(addr);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("port-forward address");
    assert!(local.ip().is_loopback());
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(local)
            .await
            .expect("connect");
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .await
            .expect("send");
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.expect("read");
        assert!(
            resp.starts_with("HTTP/1.") && resp.contains("hello-from-pod"),
            "{resp}\n{}",
            node.log()
        );
    }
    let _ = pf.start_kill();
    let _ = pf.wait().await;
}

/// A TLS client of the kubelet's 10250 (reached through a loopback forward into the node
/// namespace), verifying the serving certificate against the cluster CA.
struct KubeletApi {
    addr: SocketAddr,
    server_ip: IpAddr,
    anonymous: Arc<rustls::ClientConfig>,
    admin: Arc<rustls::ClientConfig>,
}

impl KubeletApi {
    fn new(cp: &ControlPlane, addr: SocketAddr, server_ip: IpAddr) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&cp.pki().ca.cert).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add ca");
        }
        let builder = || {
            rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("protocols")
                .with_root_certificates(roots.clone())
        };
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&cp.pki().admin.cert)
                .expect("admin cert")
                .map(|c| c.expect("cert"))
                .collect();
        let key = PrivateKeyDer::from_pem_file(&cp.pki().admin.key).expect("admin key");
        KubeletApi {
            addr,
            server_ip,
            anonymous: Arc::new(builder().with_no_client_auth()),
            admin: Arc::new(
                builder()
                    .with_client_auth_cert(certs, key)
                    .expect("client auth"),
            ),
        }
    }

    /// GET `path` with an optional bearer token (or the admin client certificate).
    async fn get(&self, path: &str, token: Option<&str>, cert: bool) -> Option<(u16, String)> {
        let tls = if cert { &self.admin } else { &self.anonymous };
        let tcp = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(ServerName::IpAddress(self.server_ip.into()), tcp)
            .await
            .ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let mut req = http::Request::get(path).header("host", self.server_ip.to_string());
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).ok()?)
            .await
            .ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, text(&body)))
    }

    /// A GET upgraded to a WebSocket speaking `protocol`, with the admin certificate or a bearer
    /// token: the refusal's status and body, or 101 and the binary messages until the server
    /// closes.
    async fn ws(
        &self,
        path: &str,
        protocol: &str,
        token: Option<&str>,
    ) -> Option<Result<Vec<Vec<u8>>, (u16, String)>> {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::{Error, Message};
        let tls = if token.is_some() {
            &self.anonymous
        } else {
            &self.admin
        };
        let tcp = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(ServerName::IpAddress(self.server_ip.into()), tcp)
            .await
            .ok()?;
        let mut req = format!("wss://{}{path}", self.addr)
            .into_client_request()
            .ok()?;
        let h = req.headers_mut();
        if let Some(t) = token {
            h.insert("authorization", format!("Bearer {t}").parse().ok()?);
        }
        h.insert("sec-websocket-protocol", protocol.parse().ok()?);
        let mut ws = match tokio_tungstenite::client_async(req, stream).await {
            Ok((ws, _)) => ws,
            Err(Error::Http(resp)) => {
                let body = resp.body().clone().unwrap_or_default();
                return Some(Err((resp.status().as_u16(), text(&body))));
            }
            Err(_) => return None,
        };
        let mut messages = Vec::new();
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Binary(b) => messages.push(b.to_vec()),
                Message::Close(_) => break,
                _ => {}
            }
        }
        Some(Ok(messages))
    }

    /// Everything a WebSocket read (admin certificate) carried: status 101 and the payloads, or
    /// the refusal.
    async fn ws_read(&self, path: &str, protocol: &str) -> Option<(u16, String)> {
        Some(match self.ws(path, protocol, None).await? {
            Ok(messages) => (101, text(&messages.concat())),
            Err(refused) => refused,
        })
    }

    /// An exec over WebSocket (`v4.channel.k8s.io`) with a bearer token: the refusal's status
    /// and body, or 101 and what came on stdout (channel 1).
    async fn ws_exec(&self, path: &str, token: &str) -> Option<(u16, String)> {
        Some(
            match self.ws(path, "v4.channel.k8s.io", Some(token)).await? {
                Ok(messages) => {
                    let stdout: Vec<u8> = messages
                        .iter()
                        .filter(|m| m.first() == Some(&1))
                        .flat_map(|m| m[1..].iter().copied())
                        .collect();
                    (101, text(&stdout))
                }
                Err(refused) => refused,
            },
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_requests_are_authenticated_and_authorized_and_stats_are_served() {
    const NODE: &str = "strake-api-1";
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    // Denials are cached for a second here instead of upstream's 30 s, so that the grant
    // below shows at once.
    let node = start_node(
        &cp,
        1,
        NODE,
        "authorization:\n  webhook:\n    cacheUnauthorizedTTL: 1s\n",
    )
    .await;
    let fwd = Forward::start(
        node.ns.ns(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 10250)),
        &node.dir.path().join("forward-10250.log"),
    )
    .expect("forward to 10250");
    let api = KubeletApi::new(&cp, fwd.local_addr(), IpAddr::V4(node_ip(1)));
    wait_for("kubelet API answers", 60, || async {
        api.get("/healthz", None, false).await
    })
    .await;

    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    create_pod(
        &client,
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "stats" },
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 1,
                "volumes": [{ "name": "scratch", "emptyDir": {} }],
                "containers": [{ "name": "app", "image": image, "command": [SH, "-c",
                    "head -c 4000000 /dev/zero > /tmp/fill; head -c 2000000 /dev/urandom > /scratch/blob; exec sleep 3600"],
                    "volumeMounts": [{ "name": "scratch", "mountPath": "/scratch" }] }]
            }
        }),
    )
    .await;
    wait_running(&client, "stats", &node).await;

    // No credentials: 401.
    let (status, body) = api.get("/pods", None, false).await.expect("request");
    assert_eq!((status, body.as_str()), (401, "Unauthorized"));
    // A token the API server does not know: 401.
    let (status, _) = api
        .get("/pods", Some("not-a-token"), false)
        .await
        .expect("request");
    assert_eq!(status, 401);

    // A ServiceAccount without RBAC: authenticated by TokenReview, denied by
    // SubjectAccessReview.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "viewer" }
    }))
    .expect("sa");
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create sa");
    let request = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": { "expirationSeconds": 3600 }
    });
    let token_request: serde_json::Value = sas
        .create_subresource("token", "viewer", &PostParams::default(), &request)
        .await
        .expect("token request");
    let token = token_request["status"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    let (status, body) = api
        .get("/pods", Some(&token), false)
        .await
        .expect("request");
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body,
        "Forbidden (user=system:serviceaccount:default:viewer, verb=get, resource=nodes, subresource=pods)"
    );
    let (status, _) = api
        .get("/stats/summary", Some(&token), false)
        .await
        .expect("request");
    assert_eq!(status, 403);

    // Granted nodes/proxy, stats and metrics: 200.
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "kubelet-api-reader" },
        "rules": [{ "apiGroups": [""], "resources": ["nodes/proxy", "nodes/stats", "nodes/metrics"],
                    "verbs": ["get"] }]
    }))
    .expect("role");
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .expect("create role");
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "kubelet-api-reader" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubelet-api-reader" },
        "subjects": [{ "kind": "ServiceAccount", "name": "viewer", "namespace": "default" }]
    }))
    .expect("binding");
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
    let pods_json = wait_for("/pods allowed after the grant", 30, || async {
        let (status, body) = api.get("/pods", Some(&token), false).await?;
        (status == 200).then_some(body)
    })
    .await;
    let list: serde_json::Value = serde_json::from_str(&pods_json).expect("pod list json");
    assert_eq!(list["kind"], "PodList");
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["stats"], "{pods_json}");

    // /stats/summary: the node and the pod, with a nonzero working set and its emptyDir's use.
    let summary: serde_json::Value = wait_for("summary with the pod's memory", 60, || async {
        let (status, body) = api.get("/stats/summary", Some(&token), false).await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let pod = v["pods"]
            .as_array()?
            .iter()
            .find(|p| p["podRef"]["name"] == "stats")?
            .clone();
        let scratch_written = pod["volume"]
            .as_array()?
            .iter()
            .any(|v| v["name"] == "scratch" && v["usedBytes"].as_u64() >= Some(2_000_000));
        (status == 200 && pod["memory"]["workingSetBytes"].as_u64()? > 0 && scratch_written)
            .then_some(v)
    })
    .await;
    assert_eq!(summary["node"]["nodeName"], NODE);
    assert!(summary["node"]["memory"]["workingSetBytes"].as_u64() > Some(0));
    assert!(summary["node"]["cpu"]["usageCoreNanoSeconds"].as_u64() > Some(0));
    assert!(summary["node"]["fs"]["capacityBytes"].as_u64() > Some(0));
    let pod = summary["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["podRef"]["name"] == "stats"))
        .expect("pod in summary");
    assert_eq!(pod["podRef"]["namespace"], "default");
    let app = &pod["containers"][0];
    assert_eq!(app["name"], "app");
    assert!(app["memory"]["workingSetBytes"].as_u64() > Some(0), "{pod}");
    assert!(
        app["cpu"]["usageCoreNanoSeconds"].as_u64().is_some(),
        "{pod}"
    );
    // The container's filesystems: its writable layer (from the runtime) and its logs.
    assert!(app["rootfs"]["usedBytes"].as_u64().is_some(), "{pod}");
    assert!(app["logs"]["usedBytes"].as_u64().is_some(), "{pod}");
    assert!(
        pod["cpu"]["usageCoreNanoSeconds"].as_u64() > Some(0),
        "{pod}"
    );
    assert!(pod["network"]["interfaces"].is_array(), "{pod}");
    // The emptyDir's own use, and the pod's ephemeral storage counting it.
    let scratch = pod["volume"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "scratch"))
        .unwrap_or_else(|| panic!("no scratch volume: {pod}"));
    assert!(
        scratch["usedBytes"].as_u64() >= Some(2_000_000),
        "{scratch}"
    );
    assert!(scratch["capacityBytes"].as_u64() > Some(0), "{scratch}");
    assert!(scratch["inodesUsed"].as_u64() >= Some(2), "{scratch}");
    assert!(
        pod["ephemeral-storage"]["usedBytes"].as_u64() >= Some(2_000_000),
        "{pod}"
    );

    // /metrics/resource: Prometheus text with the container.
    let (status, metrics) = api
        .get("/metrics/resource", Some(&token), false)
        .await
        .expect("request");
    assert_eq!(status, 200);
    let sample = |name: &str| -> Option<f64> {
        metrics.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let mut parts = rest.split_whitespace();
            parts.next()?.parse().ok()
        })
    };
    let labels = "{container=\"app\",namespace=\"default\",pod=\"stats\"}";
    assert!(
        sample(&format!("container_memory_working_set_bytes{labels}")) > Some(0.0),
        "{metrics}"
    );
    assert!(
        sample(&format!("container_cpu_usage_seconds_total{labels}")).is_some(),
        "{metrics}"
    );
    assert!(
        sample(&format!("container_start_time_seconds{labels}")) > Some(1.0e9),
        "{metrics}"
    );
    assert!(
        sample("node_memory_working_set_bytes") > Some(0.0),
        "{metrics}"
    );
    assert!(
        sample("pod_memory_working_set_bytes{namespace=\"default\",pod=\"stats\"}") > Some(0.0),
        "{metrics}"
    );
    assert_eq!(sample("scrape_error"), Some(0.0), "{metrics}");
    for l in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = l.split_whitespace().nth(1);
        assert!(
            value.is_some_and(|v| v.parse::<f64>().is_ok()),
            "unparsable sample line {l:?}"
        );
    }

    // /metrics: the kubelet's own.
    let (status, own) = api
        .get("/metrics", Some(&token), false)
        .await
        .expect("request");
    assert_eq!(status, 200);
    assert!(
        own.contains(&format!("kubelet_node_name{{node=\"{NODE}\"}} 1")),
        "{own}"
    );
    assert!(own.contains("kubelet_running_pods 1"), "{own}");
    assert!(own.contains("kubelet_http_requests_total{"), "{own}");

    // `get` on nodes/proxy does not let anyone run commands: an exec is a WebSocket GET, but
    // the kubelet checks `create` for it (and for attach and port-forward).
    let exec = "/exec/default/stats/app?command=echo&command=from-exec&output=1&error=1";
    let (status, body) = api.ws_exec(exec, &token).await.expect("exec request");
    assert_eq!(status, 403, "{body}");
    // The WebSocket client may not read the refusal's body; when it does, it names the verb.
    assert!(
        body.is_empty() || body.contains("verb=create, resource=nodes, subresource=proxy"),
        "{body}"
    );
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "kubelet-api-exec" },
        "rules": [{ "apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["create"] }]
    }))
    .expect("role");
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .expect("create role");
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "kubelet-api-exec" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubelet-api-exec" },
        "subjects": [{ "kind": "ServiceAccount", "name": "viewer", "namespace": "default" }]
    }))
    .expect("binding");
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
    let out = wait_for("exec allowed after granting create", 30, || async {
        let (status, out) = api.ws_exec(exec, &token).await?;
        (status == 101).then_some(out)
    })
    .await;
    assert_eq!(out.trim(), "from-exec", "{}", node.log());

    // Unknown paths 404 once admitted; a client certificate of the cluster CA authenticates.
    let (status, _) = api
        .get("/nope", Some(&token), false)
        .await
        .expect("request");
    assert_eq!(status, 404);
    let (status, body) = api.get("/healthz", None, true).await.expect("request");
    assert_eq!((status, body.as_str()), (200, "ok"));
    drop(fwd);
}
