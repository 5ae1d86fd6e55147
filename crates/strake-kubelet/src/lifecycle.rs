//! Container lifecycle hooks (`lifecycle.postStart`, `lifecycle.preStop`): what a handler
//! asks for ([`Hook::of`], pure) and running it ([`run`]): exec through CRI ExecSync, an HTTP
//! GET from the kubelet to the pod (any response counts as success, as upstream), or a sleep.

use std::time::Duration;

use k8s_openapi::api::core::v1::{LifecycleHandler, Probe};

use crate::prober;
use crate::runtime::Cri;

/// One hook, resolved against the pod's IP and the container's named ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hook {
    Exec(Vec<String>),
    /// An HTTP GET, over TLS (not verified, as upstream's) when `tls`.
    Http {
        tls: bool,
        host: String,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Sleep(Duration),
    /// A handler that cannot run (why); running it fails, as upstream's does.
    Invalid(String),
}

impl Hook {
    /// The hook of `handler` for a container with named ports `ports` in a pod at `pod_ip`.
    pub fn of(handler: &LifecycleHandler, pod_ip: &str, ports: &[(String, i32)]) -> Hook {
        if let Some(s) = &handler.sleep {
            return Hook::Sleep(Duration::from_secs(s.seconds.max(0) as u64));
        }
        if handler.exec.is_none() && handler.http_get.is_none() {
            return Hook::Invalid(if handler.tcp_socket.is_some() {
                "tcpSocket is not supported as a lifecycle handler".into()
            } else {
                "lifecycle handler has no action".into()
            });
        }
        // exec and httpGet read the same as in a probe.
        let as_probe = Probe {
            exec: handler.exec.clone(),
            http_get: handler.http_get.clone(),
            ..Default::default()
        };
        match prober::action(&as_probe, pod_ip, ports) {
            prober::Action::Exec(cmd) => Hook::Exec(cmd),
            prober::Action::Http {
                scheme,
                host,
                port,
                path,
                headers,
            } => match prober::is_https(&scheme) {
                Ok(tls) => Hook::Http {
                    tls,
                    host,
                    port,
                    path,
                    headers,
                },
                Err(why) => Hook::Invalid(why),
            },
            prober::Action::Unsupported(why) => Hook::Invalid(why),
            other => Hook::Invalid(format!("unsupported lifecycle handler {other:?}")),
        }
    }
}

/// Runs `hook` for container `container_id` within `timeout` (`None`: unbounded, as upstream
/// runs postStart). The error is the message upstream reports.
pub async fn run(
    cri: &dyn Cri,
    container_id: &str,
    hook: &Hook,
    timeout: Option<Duration>,
) -> Result<(), String> {
    match hook {
        Hook::Exec(cmd) => {
            let r = cri
                .exec_sync(container_id, cmd.clone(), timeout.unwrap_or_default())
                .await
                .map_err(|e| e.detail())?;
            if r.exit_code == 0 {
                return Ok(());
            }
            let output = String::from_utf8_lossy(if r.stderr.is_empty() {
                &r.stdout
            } else {
                &r.stderr
            })
            .chars()
            .take(512)
            .collect::<String>();
            Err(format!(
                "command '{}' exited with {}: {output}",
                cmd.join(" "),
                r.exit_code
            ))
        }
        Hook::Http {
            tls,
            host,
            port,
            path,
            headers,
        } => {
            let limit = timeout.unwrap_or(HTTP_TIMEOUT).min(HTTP_TIMEOUT);
            prober::http_request(
                *tls,
                host,
                *port,
                path,
                headers,
                "kube-lifecycle/1.37",
                limit,
            )
            .await
            .map(drop)
        }
        Hook::Sleep(d) => {
            tokio::time::sleep(timeout.map_or(*d, |t| (*d).min(t))).await;
            Ok(())
        }
        Hook::Invalid(why) => Err(why.clone()),
    }
}

/// Upstream's HTTP hook client gives up after 10 s.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(v: serde_json::Value) -> LifecycleHandler {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn handlers_resolve_like_probes_and_unsupported_ones_fail() {
        assert_eq!(
            Hook::of(
                &handler(serde_json::json!({ "exec": { "command": ["touch", "/x"] } })),
                "",
                &[]
            ),
            Hook::Exec(vec!["touch".into(), "/x".into()])
        );
        assert_eq!(
            Hook::of(
                &handler(serde_json::json!({ "httpGet": { "port": "web", "path": "/bye" } })),
                "10.88.0.9",
                &[("web".into(), 8080)]
            ),
            Hook::Http {
                tls: false,
                host: "10.88.0.9".into(),
                port: 8080,
                path: "/bye".into(),
                headers: vec![]
            }
        );
        // HTTPS hooks run over TLS, as upstream's do; an unknown scheme cannot run.
        assert!(matches!(
            Hook::of(
                &handler(serde_json::json!({ "httpGet": { "port": 8443, "scheme": "HTTPS" } })),
                "10.88.0.9",
                &[]
            ),
            Hook::Http {
                tls: true,
                port: 8443,
                ..
            }
        ));
        assert!(matches!(
            Hook::of(
                &handler(serde_json::json!({ "httpGet": { "port": 80, "scheme": "GOPHER" } })),
                "10.88.0.9",
                &[]
            ),
            Hook::Invalid(_)
        ));
        assert_eq!(
            Hook::of(
                &handler(serde_json::json!({ "sleep": { "seconds": 5 } })),
                "",
                &[]
            ),
            Hook::Sleep(Duration::from_secs(5))
        );
        assert!(matches!(
            Hook::of(
                &handler(serde_json::json!({ "tcpSocket": { "port": 80 } })),
                "",
                &[]
            ),
            Hook::Invalid(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_hook_is_cut_short_by_its_timeout() {
        let cri = crate::runtime::fake::FakeCri::default();
        let t = tokio::time::Instant::now();
        run(
            &cri,
            "c",
            &Hook::Sleep(Duration::from_secs(60)),
            Some(Duration::from_secs(3)),
        )
        .await
        .unwrap();
        assert_eq!(t.elapsed(), Duration::from_secs(3));
    }
}
