//! Watches the pods bound to this node and hands each to its own [`pod_worker`].

use std::collections::HashMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::sync::watch;

use crate::pod_worker::{self, Context};

/// Runs until the watch ends (it does not: the watcher retries through API outages).
pub async fn run(ctx: Context, client: kube::Client) {
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={}", ctx.config.node_name);
    let stream = watcher(pods, watcher::Config::default().fields(&selector));
    futures::pin_mut!(stream);
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut seen_in_relist: Vec<String> = Vec::new();
    let mut backoff = std::time::Duration::from_millis(500);
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => {
                backoff = std::time::Duration::from_millis(500);
                e
            }
            Err(e) => {
                // API outage: pods keep running; the watcher resumes on its own.
                tracing::warn!(error = %e, "pod watch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                continue;
            }
        };
        match event {
            watcher::Event::Init => seen_in_relist.clear(),
            watcher::Event::InitApply(pod) => {
                if let Some(uid) = pod.metadata.uid.clone() {
                    seen_in_relist.push(uid);
                }
                dispatch(&ctx, &mut workers, pod);
            }
            watcher::Event::InitDone => {
                // Pods that vanished while we were not watching.
                for (uid, tx) in workers.iter() {
                    if !seen_in_relist.contains(uid) {
                        let _ = tx.send(None);
                    }
                }
                workers.retain(|uid, _| seen_in_relist.contains(uid));
            }
            watcher::Event::Apply(pod) => dispatch(&ctx, &mut workers, pod),
            watcher::Event::Delete(pod) => {
                if let Some(tx) = pod.metadata.uid.as_ref().and_then(|u| workers.remove(u)) {
                    let _ = tx.send(None);
                }
            }
        }
        workers.retain(|_, tx| !tx.is_closed());
    }
}

/// Hands `pod` to its worker, starting one for a new UID.
pub fn dispatch(
    ctx: &Context,
    workers: &mut HashMap<String, watch::Sender<Option<Pod>>>,
    pod: Pod,
) {
    // Mirror pods are the API's view of static pods, which run from their manifests.
    if crate::static_pods::is_mirror(&pod) {
        return;
    }
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    match workers.get(&uid) {
        Some(tx) if !tx.is_closed() => {
            let _ = tx.send(Some(pod));
        }
        _ => {
            let (tx, rx) = watch::channel(Some(pod));
            tokio::spawn(pod_worker::run(ctx.clone(), uid.clone(), rx));
            workers.insert(uid, tx);
        }
    }
}
