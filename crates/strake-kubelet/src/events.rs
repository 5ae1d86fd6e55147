//! Events about pods, as upstream's kubelet reports them (`Pulling`, `Pulled`, `Created`,
//! `Started`, `Killing`, `BackOff`, `Failed`, `Unhealthy`, `FailedCreatePodSandBox`), through
//! `events.k8s.io/v1` with kube-runtime's recorder (which folds repeats into a series).
//! Publishing never blocks a pod worker: each event is sent by a task of its own.

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// Where a pod worker sends its events; silent without an API server (standalone mode).
#[derive(Clone)]
pub struct Events {
    recorder: Option<Recorder>,
    node: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("enabled", &self.recorder.is_some())
            .finish()
    }
}

/// An event's severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

impl Events {
    /// Events reported as component `kubelet`, instance `node`.
    pub fn new(client: Option<kube::Client>, node: &str) -> Self {
        Events {
            recorder: client.map(|c| {
                Recorder::new(
                    c,
                    Reporter {
                        controller: "kubelet".into(),
                        instance: Some(node.to_string()),
                    },
                )
            }),
            node: node.to_string(),
        }
    }

    /// Reports `reason` with `note` about `pod` (and its container `container`, if any).
    pub fn emit(&self, pod: &Pod, container: Option<&str>, kind: Kind, reason: &str, note: String) {
        self.publish(reference(pod, container), kind, reason, note);
    }

    /// Reports `reason` with `note` about the node itself (as upstream, the Node's UID is its
    /// name).
    pub fn emit_node(&self, kind: Kind, reason: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.clone()),
            uid: Some(self.node.clone()),
            ..Default::default()
        };
        self.publish(reference, kind, reason, note);
    }

    fn publish(&self, reference: ObjectReference, kind: Kind, reason: &str, note: String) {
        let Some(recorder) = self.recorder.clone() else {
            return;
        };
        let event = Event {
            type_: match kind {
                Kind::Normal => EventType::Normal,
                Kind::Warning => EventType::Warning,
            },
            reason: reason.to_string(),
            // The API refuses notes over 1 kB.
            note: Some(truncate(note, 1024)),
            action: reason.to_string(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!(reason = %event.reason, error = %e, "event not recorded");
            }
        });
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The object an event is about: the pod, with upstream's field path for a container
/// (`spec.containers{name}` or `spec.initContainers{name}`).
pub fn reference(pod: &Pod, container: Option<&str>) -> ObjectReference {
    let field_path = container.map(|name| {
        let init = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .any(|c| c.name == name);
        if init {
            format!("spec.initContainers{{{name}}}")
        } else {
            format!("spec.containers{{{name}}}")
        }
    });
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: Some(
            pod.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
        ),
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone(),
        field_path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_the_pod_and_the_container_field() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7" },
            "spec": {
                "initContainers": [{ "name": "setup" }],
                "containers": [{ "name": "app" }]
            }
        }))
        .unwrap();
        let r = reference(&pod, Some("app"));
        assert_eq!(r.field_path.as_deref(), Some("spec.containers{app}"));
        assert_eq!(
            (
                r.kind.as_deref(),
                r.name.as_deref(),
                r.namespace.as_deref(),
                r.uid.as_deref()
            ),
            (Some("Pod"), Some("p"), Some("ns"), Some("u"))
        );
        assert_eq!(
            reference(&pod, Some("setup")).field_path.as_deref(),
            Some("spec.initContainers{setup}")
        );
        assert_eq!(reference(&pod, None).field_path, None);
        assert_eq!(truncate("é".repeat(600), 1024).len(), 1024);
        assert_eq!(truncate("aé".into(), 2), "a");
    }
}
