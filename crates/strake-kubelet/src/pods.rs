//! The pods this kubelet runs, from its two sources: the API server's pods bound to this node
//! (a watch on `spec.nodeName`) and the static-pod manifests ([`crate::static_pods`]). Each
//! pod UID gets its own [`pod_worker`]; mirror pods (the API's view of static pods) are never
//! run.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};

use crate::pod_worker::{self, Context};
use crate::static_pods::{self, ManifestChange};

/// Where a pod came from: a relist of the API replaces only the API's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Api,
    File,
}

/// One change from a source.
#[derive(Debug)]
enum Change {
    Apply(Source, Box<Pod>),
    Gone(String),
    /// The API watch relisted: its pods are exactly these UIDs.
    ApiRelisted(HashSet<String>),
}

/// How many changes may wait for the dispatcher.
const QUEUE: usize = 1024;

/// Runs the pods of both sources until they end (they do not: the watch retries through API
/// outages, and the manifest directory is re-read for ever).
pub async fn run(ctx: Context, api: Option<kube::Client>, manifests: Option<(PathBuf, Duration)>) {
    let (tx, mut rx) = mpsc::channel::<Change>(QUEUE);
    let mut sources = Vec::new();
    if let Some(client) = api {
        sources.push(tokio::spawn(watch_api(
            client,
            ctx.config.node_name.clone(),
            tx.clone(),
        )));
    }
    if let Some((dir, every)) = manifests {
        let (mtx, mut mrx) = mpsc::channel(QUEUE);
        sources.push(tokio::spawn(static_pods::run(
            dir,
            ctx.config.node_name.clone(),
            every,
            mtx,
        )));
        let tx = tx.clone();
        sources.push(tokio::spawn(async move {
            while let Some(m) = mrx.recv().await {
                let change = match m {
                    ManifestChange::Added(p) => Change::Apply(Source::File, p),
                    ManifestChange::Removed(uid) => Change::Gone(uid),
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut workers = Workers::default();
    while let Some(change) = rx.recv().await {
        workers.apply(&ctx, change);
    }
    for s in sources {
        s.abort();
    }
}

/// Follows the API's pods bound to `node`.
async fn watch_api(client: kube::Client, node: String, out: mpsc::Sender<Change>) {
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let stream = watcher(pods, watcher::Config::default().fields(&selector));
    futures::pin_mut!(stream);
    let mut relist: HashSet<String> = HashSet::new();
    let mut backoff = Duration::from_millis(500);
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => {
                backoff = Duration::from_millis(500);
                e
            }
            Err(e) => {
                // API outage: pods keep running; the watcher resumes on its own.
                tracing::warn!(error = %e, "pod watch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let change = match event {
            watcher::Event::Init => {
                relist.clear();
                continue;
            }
            watcher::Event::InitApply(pod) => {
                if let Some(uid) = pod.metadata.uid.clone() {
                    relist.insert(uid);
                }
                Change::Apply(Source::Api, Box::new(pod))
            }
            watcher::Event::InitDone => Change::ApiRelisted(std::mem::take(&mut relist)),
            watcher::Event::Apply(pod) => Change::Apply(Source::Api, Box::new(pod)),
            watcher::Event::Delete(pod) => match pod.metadata.uid {
                Some(uid) => Change::Gone(uid),
                None => continue,
            },
        };
        if out.send(change).await.is_err() {
            return;
        }
    }
}

/// The running pod workers by pod UID.
#[derive(Default)]
struct Workers {
    by_uid: HashMap<String, (Source, watch::Sender<Option<Pod>>)>,
}

impl Workers {
    fn apply(&mut self, ctx: &Context, change: Change) {
        match change {
            Change::Apply(source, pod) => self.dispatch(ctx, source, *pod),
            Change::Gone(uid) => {
                if let Some((_, tx)) = self.by_uid.remove(&uid) {
                    let _ = tx.send(None);
                }
            }
            Change::ApiRelisted(uids) => {
                // Pods that vanished from the API while we were not watching.
                self.by_uid.retain(|uid, (source, tx)| {
                    let keep = *source != Source::Api || uids.contains(uid);
                    if !keep {
                        let _ = tx.send(None);
                    }
                    keep
                });
            }
        }
        self.by_uid.retain(|_, (_, tx)| !tx.is_closed());
    }

    /// Hands `pod` to its worker, starting one for a new UID.
    fn dispatch(&mut self, ctx: &Context, source: Source, pod: Pod) {
        // Mirror pods are the API's view of static pods, which run from their manifests.
        if static_pods::is_mirror(&pod) {
            return;
        }
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        match self.by_uid.get(&uid) {
            Some((_, tx)) if !tx.is_closed() => {
                let _ = tx.send(Some(pod));
            }
            _ => {
                let (tx, rx) = watch::channel(Some(pod));
                tokio::spawn(pod_worker::run(ctx.clone(), uid.clone(), rx));
                self.by_uid.insert(uid, (source, tx));
            }
        }
    }
}
