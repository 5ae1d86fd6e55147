//! The Services a container's environment variables come from (`enableServiceLinks`), read
//! from one informer over all Services, as upstream's kubelet does, instead of a List of the
//! namespace at every container start.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::{WatchStreamExt, reflector, watcher};

/// How long a container start waits for the first list of Services before it fails (and is
/// retried by its worker), as upstream refuses to build the variables before that.
const FIRST_LIST: Duration = Duration::from_secs(10);

/// The cluster's Services as the informer last saw them.
#[derive(Clone)]
pub struct Services {
    store: reflector::Store<Service>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").finish_non_exhaustive()
    }
}

/// The first list of Services has not arrived.
#[derive(Debug, thiserror::Error)]
#[error("services have not yet been read at least once, cannot construct envvars")]
pub struct NotSynced;

impl Services {
    /// Starts the informer; it runs (through API outages, with backoff) until the process ends.
    pub fn start(client: kube::Client) -> Services {
        let (store, writer) = reflector::store();
        let api: kube::Api<Service> = kube::Api::all(client);
        // Only the name, namespace and spec are read: the rest is dropped on arrival.
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|s| {
                s.metadata.managed_fields = None;
                s.metadata.annotations = None;
                s.metadata.labels = None;
                s.status = None;
            });
        tokio::spawn(reflector(writer, stream).for_each(|event| async move {
            if let Err(e) = event {
                tracing::debug!(error = %e, "service watch failed; retrying");
            }
        }));
        Services { store }
    }

    /// The Services whose variables a container of `pod` gets.
    pub async fn for_pod(&self, pod: &Pod) -> Result<Vec<Service>, NotSynced> {
        tokio::time::timeout(FIRST_LIST, self.store.wait_until_ready())
            .await
            .map_err(|_| NotSynced)?
            .map_err(|_| NotSynced)?;
        Ok(visible(&self.store.state(), pod))
    }
}

/// The Services a container of `pod` sees: the `kubernetes` Service of the default namespace
/// always, and with `enableServiceLinks` (the default) every Service of the pod's namespace,
/// which wins over a default-namespace Service of the same name.
pub fn visible(all: &[Arc<Service>], pod: &Pod) -> Vec<Service> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    let name = |s: &Service| s.metadata.name.clone().unwrap_or_default();
    let in_ns = |s: &Service, n: &str| s.metadata.namespace.as_deref().unwrap_or("default") == n;
    let mut out: Vec<Service> = if links {
        all.iter()
            .filter(|s| in_ns(s, ns))
            .map(|s| (**s).clone())
            .collect()
    } else {
        Vec::new()
    };
    if !out.iter().any(|s| name(s) == "kubernetes")
        && let Some(k) = all
            .iter()
            .find(|s| in_ns(s, "default") && name(s) == "kubernetes")
    {
        out.push((**k).clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str) -> Arc<Service> {
        let mut s = Service::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        Arc::new(s)
    }

    fn names(v: &[Service]) -> Vec<String> {
        let mut n: Vec<String> = v
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    s.metadata.namespace.clone().unwrap_or_default(),
                    s.metadata.name.clone().unwrap_or_default()
                )
            })
            .collect();
        n.sort();
        n
    }

    #[test]
    fn a_pod_sees_its_namespaces_services_and_always_the_api_servers() {
        let all = vec![
            svc("default", "kubernetes"),
            svc("default", "web"),
            svc("team", "db"),
            svc("team", "cache"),
            svc("other", "secret-thing"),
        ];
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("team".into());
        assert_eq!(
            names(&visible(&all, &pod)),
            ["default/kubernetes", "team/cache", "team/db"]
        );
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            enable_service_links: Some(false),
            ..Default::default()
        });
        assert_eq!(names(&visible(&all, &pod)), ["default/kubernetes"]);
        let mut default_pod = Pod::default();
        default_pod.metadata.namespace = Some("default".into());
        assert_eq!(
            names(&visible(&all, &default_pod)),
            ["default/kubernetes", "default/web"]
        );
        // A Service named `kubernetes` in the pod's namespace wins.
        let shadowed = [all.clone(), vec![svc("team", "kubernetes")]].concat();
        pod.spec = None;
        assert_eq!(
            names(&visible(&shadowed, &pod)),
            ["team/cache", "team/db", "team/kubernetes"]
        );
    }
}
