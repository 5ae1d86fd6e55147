//! The runtime's container events (CRI `GetContainerEvents`), where the runtime offers them:
//! each event wakes the worker of the pod it concerns at once, instead of at its next 1 s
//! relist. The relist stays the source of truth (upstream's evented PLEG does the same); a
//! runtime without the stream (containerd 1.6) just leaves the relist alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use strake_types::cri;
use tokio::sync::Notify;

use crate::runtime::Runtime;

/// Wake-ups for pod workers, by pod UID.
#[derive(Clone, Debug, Default)]
pub struct Nudges {
    inner: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl Nudges {
    /// The notifier of pod `uid`'s worker (created on first use).
    pub fn register(&self, uid: &str) -> Arc<Notify> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(uid.to_string()).or_default().clone()
    }

    /// Forgets pod `uid` (its worker ended).
    pub fn unregister(&self, uid: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(uid);
    }

    /// Wakes pod `uid`'s worker, if it has one; returns whether it had.
    pub fn nudge(&self, uid: &str) -> bool {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(uid) {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        }
    }
}

/// The pod UID an event concerns: its sandbox's metadata, else the container labels'.
pub fn pod_uid(ev: &cri::ContainerEventResponse) -> Option<String> {
    ev.pod_sandbox_status
        .as_ref()
        .and_then(|s| s.metadata.as_ref())
        .map(|m| m.uid.clone())
        .filter(|u| !u.is_empty())
        .or_else(|| {
            ev.containers_statuses
                .iter()
                .find_map(|c| c.labels.get(crate::pod_spec::labels::POD_UID).cloned())
        })
}

/// Follows the runtime's event stream for as long as the kubelet runs, reconnecting with
/// backoff; returns only if the runtime does not offer the stream at all.
pub async fn run(runtime: Runtime, nudges: Nudges) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut client = runtime.runtime_client();
        match client.get_container_events(cri::GetEventsRequest {}).await {
            Ok(resp) => {
                tracing::info!("following the runtime's container events");
                backoff = Duration::from_millis(500);
                let mut stream = resp.into_inner();
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(ev) => {
                            if let Some(uid) = pod_uid(&ev) {
                                nudges.nudge(&uid);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "container event stream ended");
                            break;
                        }
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!("the runtime offers no container events; relisting only");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "container events not available yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_name_their_pod_and_nudges_reach_registered_workers() {
        let ev = cri::ContainerEventResponse {
            pod_sandbox_status: Some(cri::PodSandboxStatus {
                metadata: Some(cri::PodSandboxMetadata {
                    uid: "u1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(pod_uid(&ev).as_deref(), Some("u1"));
        let by_label = cri::ContainerEventResponse {
            containers_statuses: vec![cri::ContainerStatus {
                labels: [(
                    crate::pod_spec::labels::POD_UID.to_string(),
                    "u2".to_string(),
                )]
                .into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(pod_uid(&by_label).as_deref(), Some("u2"));
        assert_eq!(pod_uid(&cri::ContainerEventResponse::default()), None);

        let nudges = Nudges::default();
        let n = nudges.register("u1");
        assert!(nudges.nudge("u1"));
        assert!(!nudges.nudge("other"));
        // The permit is stored: the worker sees it even if it was not waiting yet.
        let waited = tokio::time::timeout(Duration::from_secs(1), n.notified()).await;
        assert!(waited.is_ok());
        nudges.unregister("u1");
        assert!(!nudges.nudge("u1"));
    }
}
