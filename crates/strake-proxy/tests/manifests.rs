//! The deployment manifests in `manifests/proxy/`: the DaemonSet's arguments parse with the
//! daemon's own flags, and a real API server (test bed; needs root and `make testbed`) accepts
//! all of them by server-side apply, after which `SubjectAccessReview`s show that the
//! ServiceAccount can do exactly what the proxy needs and nothing of what it does not.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use strake_integration::control_plane::{ControlPlane, Options};
use strake_proxy::config::{DaemonConfig, FileConfig, Flags};

const NAMESPACE: &str = "kube-system";
const SERVICE_ACCOUNT: &str = "strake-proxy";

fn manifest<T: DeserializeOwned>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../manifests/proxy")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
}

#[test]
fn daemonset_runs_the_image_with_flags_the_daemon_accepts() {
    let ds: DaemonSet = manifest("daemonset.yaml");
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some(SERVICE_ACCOUNT));
    let tolerations = pod.tolerations.unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some(format!("strake/strake-proxy:{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.add.as_deref().unwrap(), ["NET_ADMIN", "NET_RAW"]);
    let probe = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/livez"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
    );
    // Nothing of the host is mounted: nft needs no /lib/modules (the kernel loads modules in
    // the host's namespaces), and some hosts have none.
    assert!(
        pod.volumes.iter().flatten().all(|v| v.host_path.is_none()),
        "{:?}",
        pod.volumes
    );

    // The arguments, with the downward API's node name substituted, are the daemon's flags,
    // and the config file they name is the ConfigMap's key.
    let args: Vec<String> = c
        .args
        .as_ref()
        .unwrap()
        .iter()
        .map(|a| a.replace("$(NODE_NAME)", "node-1"))
        .collect();
    let cli = <Cli as clap::Parser>::try_parse_from(
        std::iter::once("strake-proxy".to_string()).chain(args),
    )
    .unwrap();
    let config_path = cli.flags.config.clone().unwrap();
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "config")
        .unwrap();
    let cm: ConfigMap = manifest("configmap.yaml");
    let key = config_path
        .strip_prefix(&mount.mount_path)
        .unwrap()
        .to_str()
        .unwrap();
    let text = &cm.data.unwrap()[key];
    let file: FileConfig = serde_saphyr::from_str(text).unwrap();
    let config = DaemonConfig::merge(&cli.flags, file, || None).unwrap();
    assert_eq!(config.proxy.node_name, "node-1");
    assert_eq!(config.healthz_bind_address.port(), 10256);
}

async fn apply<T>(api: Api<T>, obj: T)
where
    T: kube::Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap();
    let params = PatchParams::apply("strake-manifests-test").force();
    api.patch(&name, &params, &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|e| panic!("{} {name} rejected: {e}", T::kind(&())));
}

/// Whether the ServiceAccount may `verb` `resource` in `group` (cluster-wide, or in
/// `namespace`).
async fn allowed(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
            )),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{NAMESPACE}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: namespace.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await.unwrap();
    answer.status.is_some_and(|s| s.allowed)
}

#[tokio::test]
async fn api_server_accepts_the_manifests_and_the_service_account_has_least_privilege() {
    let cp = ControlPlane::start(Options {
        controllers: false,
        ..Options::default()
    })
    .await
    .unwrap();
    let client = cp.client().await.unwrap();
    let c = || client.clone();
    apply::<ServiceAccount>(
        Api::namespaced(c(), NAMESPACE),
        manifest("serviceaccount.yaml"),
    )
    .await;
    apply::<ClusterRole>(Api::all(c()), manifest("clusterrole.yaml")).await;
    apply::<ClusterRoleBinding>(Api::all(c()), manifest("clusterrolebinding.yaml")).await;
    apply::<ConfigMap>(Api::namespaced(c(), NAMESPACE), manifest("configmap.yaml")).await;
    apply::<DaemonSet>(Api::namespaced(c(), NAMESPACE), manifest("daemonset.yaml")).await;
    // Stored as written (the API server validated the pod template, priority class included).
    let ds = Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
        .get("strake-proxy")
        .await
        .unwrap();
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );

    let needed: &[(&str, &str, &str, Option<&str>)] = &[
        ("list", "", "services", None),
        ("watch", "", "services", None),
        ("list", "discovery.k8s.io", "endpointslices", None),
        ("watch", "discovery.k8s.io", "endpointslices", None),
        ("get", "", "nodes", None),
        ("list", "", "nodes", None),
        ("watch", "", "nodes", None),
        ("create", "events.k8s.io", "events", Some("default")),
        ("patch", "events.k8s.io", "events", Some("default")),
        ("create", "", "events", Some("default")),
        ("patch", "", "events", Some("default")),
    ];
    for (verb, group, resource, ns) in needed {
        assert!(
            allowed(&client, verb, group, resource, *ns).await,
            "{verb} {group}/{resource} must be allowed"
        );
    }
    let forbidden: &[(&str, &str, &str, Option<&str>)] = &[
        ("list", "", "secrets", None),
        ("get", "", "secrets", Some(NAMESPACE)),
        ("delete", "", "services", Some("default")),
        ("update", "", "services", Some("default")),
        ("create", "", "services", Some("default")),
        ("get", "", "services", Some("default")),
        (
            "create",
            "discovery.k8s.io",
            "endpointslices",
            Some("default"),
        ),
        (
            "delete",
            "discovery.k8s.io",
            "endpointslices",
            Some("default"),
        ),
        ("patch", "", "nodes", None),
        ("update", "", "nodes", None),
        ("delete", "", "nodes", None),
        ("list", "", "pods", None),
        ("list", "", "configmaps", None),
        ("delete", "events.k8s.io", "events", Some("default")),
        ("list", "events.k8s.io", "events", None),
        ("create", "", "serviceaccounts/token", Some(NAMESPACE)),
        (
            "escalate",
            "rbac.authorization.k8s.io",
            "clusterroles",
            None,
        ),
    ];
    for (verb, group, resource, ns) in forbidden {
        assert!(
            !allowed(&client, verb, group, resource, *ns).await,
            "{verb} {group}/{resource} must be denied"
        );
    }
    // The ClusterRole grants exactly the needed verbs: nothing beyond the list above.
    let role: ClusterRole = manifest("clusterrole.yaml");
    let granted: usize = role
        .rules
        .unwrap()
        .iter()
        .map(|r| r.verbs.len() * r.resources.as_ref().map_or(0, Vec::len))
        .sum();
    assert_eq!(granted, needed.len());
}
