//! Pod admission: the checks a pod must pass before the kubelet starts anything of it. A
//! rejected pod is never started: its phase becomes Failed with the check's reason and
//! `Pod was rejected: <message>`, and a Warning event says why (upstream's `rejectPod`).
//!
//! Checks here: sysctls ([`crate::sysctls`]), in the pod worker. The general predicates that
//! weigh a pod against the Node and the other pods (resources, affinity, ports, taints) run
//! once when a pod arrives ([`crate::pods`], [`crate::predicates`]).

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{Api, Patch, PatchParams};

use crate::config::Config;
use crate::events::{Events, Kind};
use crate::sysctls::{Allowlist, Rejection};

/// Whether this node admits `pod`.
pub fn admit(pod: &Pod, config: &Config) -> Result<(), Rejection> {
    // The patterns were validated when the configuration was loaded; a list that no longer
    // builds admits nothing rather than everything.
    let list = Allowlist::with_safe(
        crate::sysctls::kernel_version(),
        &config.allowed_unsafe_sysctls,
    )
    .map_err(|e| Rejection {
        reason: crate::sysctls::FORBIDDEN_REASON.into(),
        message: format!("forbidden sysctl: {e}"),
    })?;
    list.admit(pod)
}

/// How the status message of a rejected pod begins.
pub const REJECTED_PREFIX: &str = "Pod was rejected: ";

/// The status of a rejected pod.
pub fn rejected_status(pod: &Pod, r: &Rejection) -> PodStatus {
    PodStatus {
        phase: Some("Failed".into()),
        reason: Some(r.reason.clone()),
        message: Some(format!("{REJECTED_PREFIX}{}", r.message)),
        qos_class: Some(crate::pod_spec::qos_class(pod).into()),
        ..Default::default()
    }
}

/// Whether `pod` already reports rejection `r`.
pub fn reports(pod: &Pod, r: &Rejection) -> bool {
    let want = rejected_status(pod, r);
    pod.status.as_ref().is_some_and(|s| {
        s.phase == want.phase && s.reason == want.reason && s.message == want.message
    })
}

/// Records the rejection of `pod`: a Warning event and the Failed status, once (nothing when
/// the pod already reports it). Without an API server there is nobody to tell but the log.
pub async fn reject(client: Option<&kube::Client>, events: &Events, pod: &Pod, r: &Rejection) {
    if reports(pod, r) {
        return;
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    tracing::warn!(pod = %format!("{ns}/{name}"), reason = %r.reason, message = %r.message, "pod rejected");
    let Some(client) = client else {
        return;
    };
    events.emit(pod, None, Kind::Warning, &r.reason, r.message.clone());
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({ "status": rejected_status(pod, r) });
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "status of rejected pod not updated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flags;

    fn pod(sysctl: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "default", "uid": "u" },
            "spec": {
                "securityContext": { "sysctls": [{ "name": sysctl, "value": "1" }] },
                "containers": [{ "name": "c" }]
            }
        }))
        .unwrap()
    }

    #[test]
    fn unsafe_sysctls_are_rejected_unless_the_node_allows_them() {
        let mut config = Config::load(&Flags::default()).unwrap();
        assert_eq!(admit(&pod("kernel.shm_rmid_forced"), &config), Ok(()));
        let r = admit(&pod("kernel.msgmax"), &config).unwrap_err();
        assert_eq!(r.reason, "SysctlForbidden");
        let mut p = pod("kernel.msgmax");
        let status = rejected_status(&p, &r);
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert_eq!(
            status.message.as_deref(),
            Some("Pod was rejected: forbidden sysctl: \"kernel.msgmax\" not allowlisted")
        );
        assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));
        assert!(!reports(&p, &r));
        p.status = Some(status);
        assert!(
            reports(&p, &r),
            "a pod that reports its rejection is not patched again"
        );
        config.allowed_unsafe_sysctls = vec!["kernel.msg*".into()];
        assert_eq!(admit(&pod("kernel.msgmax"), &config), Ok(()));
    }
}
