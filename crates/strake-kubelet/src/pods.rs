//! The pods this kubelet runs, from its two sources: the API server's pods bound to this node
//! (a watch on `spec.nodeName`, whose store the HTTPS API also reads) and the static-pod
//! manifests ([`crate::static_pods`]). Each
//! pod UID gets its own [`pod_worker`]; mirror pods (the API's view of static pods) are never
//! run.
//!
//! A new pod is admitted here, once, before its worker starts, as upstream's
//! `HandlePodAdditions` does: the general predicates ([`crate::predicates`]: OS, resources
//! against the Node's allocatable less what the pods already admitted request, node affinity
//! and selector, host ports, NoExecute taints) against the Node as this kubelet last reported
//! it. A refused pod gets no worker: it is set Failed with the predicate's reason and a
//! Warning event ([`crate::admission::reject`]), and stays refused. The per-pod checks that
//! need no other pod (sysctls) run in the worker ([`crate::admission::admit`]).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::{mpsc, watch};

use crate::events::Events;
use crate::pod_worker::{self, Context};
use crate::predicates;
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
    /// The manifest directory was read once through.
    FilesRead,
}

/// How many changes may wait for the dispatcher.
const QUEUE: usize = 1024;
/// How long pods wait for the Node at start before they are admitted without it.
const NODE_WAIT: Duration = Duration::from_secs(30);
/// How often what no pod owns is looked for (upstream's housekeeping period).
const HOUSEKEEPING: Duration = Duration::from_secs(2);

/// Runs the pods of both sources until they end (they do not: the watch retries through API
/// outages, and the manifest directory is re-read for ever).
pub async fn run(
    ctx: Context,
    api: Option<(kube::Client, reflector::store::Writer<Pod>)>,
    manifests: Option<(PathBuf, Duration)>,
) {
    let (tx, mut rx) = mpsc::channel::<Change>(QUEUE);
    let mut sources = Vec::new();
    let (node_tx, mut node_rx) = watch::channel(None);
    let client = api.as_ref().map(|(c, _)| c.clone());
    if let Some((client, store)) = api {
        sources.push(tokio::spawn(watch_api(
            client.clone(),
            store,
            ctx.config.node_name.clone(),
            tx.clone(),
        )));
        sources.push(tokio::spawn(watch_node(
            client.clone(),
            ctx.config.node_name.clone(),
            node_tx,
        )));
        // Admission needs the Node (registered before this runs); pods wait for it a while.
        let _ = tokio::time::timeout(NODE_WAIT, node_rx.wait_for(Option::is_some)).await;
    }
    let has_manifests = manifests.is_some();
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
                    ManifestChange::Read => Change::FilesRead,
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut workers = Workers {
        api_ready: client.is_none(),
        files_ready: !has_manifests,
        by_uid: HashMap::new(),
        rejected: HashSet::new(),
        node: node_rx,
        events: Events::new(client, &ctx.config.node_name),
        tasks: HashMap::new(),
    };
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            change = rx.recv() => match change {
                Some(change) => workers.apply(&ctx, change),
                None => break,
            },
            _ = housekeeping.tick() => workers.housekeeping(&ctx).await,
        }
    }
    for s in sources {
        s.abort();
    }
}

/// Follows the API's pods bound to `node`: the one watch of them, which also fills `store`
/// (what the HTTPS API serves as `/pods`). Managed fields are dropped on arrival; nothing
/// here reads them.
async fn watch_api(
    client: kube::Client,
    store: reflector::store::Writer<Pod>,
    node: String,
    out: mpsc::Sender<Change>,
) {
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let stream = watcher(pods, watcher::Config::default().fields(&selector)).modify(|p| {
        p.metadata.managed_fields = None;
    });
    let stream = reflector(store, stream);
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

/// Follows this kubelet's Node object (its allocatable, labels and taints, for admission).
async fn watch_node(client: kube::Client, node: String, out: watch::Sender<Option<Node>>) {
    let nodes: Api<Node> = Api::all(client);
    let selector = format!("metadata.name={node}");
    let stream = watcher(nodes, watcher::Config::default().fields(&selector));
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                out.send_replace(Some(n));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "node watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What feeds one pod worker: the pod as it is now (shared with the worker), `None` once it
/// is gone.
type PodSender = watch::Sender<Option<Arc<Pod>>>;

/// The running pod workers by pod UID, and the pods admission refused.
struct Workers {
    by_uid: HashMap<String, (Source, PodSender)>,
    rejected: HashSet<String>,
    node: watch::Receiver<Option<Node>>,
    events: Events,
    /// Whether each source has reported every pod it has once (only then is a pod the
    /// runtime has and no source names an orphan).
    api_ready: bool,
    files_ready: bool,
    /// The task of each pod UID: its worker, terminating ones included, or the cleanup of
    /// an orphan.
    tasks: HashMap<String, tokio::task::JoinHandle<()>>,
}

/// The names of the directories in `dir` (none when it cannot be read).
fn child_names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl Workers {
    fn apply(&mut self, ctx: &Context, change: Change) {
        match change {
            Change::Apply(source, pod) => self.dispatch(ctx, source, Arc::new(*pod)),
            Change::Gone(uid) => {
                self.rejected.remove(&uid);
                if let Some((_, tx)) = self.by_uid.remove(&uid) {
                    let _ = tx.send(None);
                }
                self.retry_deferred_resizes(ctx);
            }
            Change::FilesRead => self.files_ready = true,
            Change::ApiRelisted(uids) => {
                self.api_ready = true;
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
    fn dispatch(&mut self, ctx: &Context, source: Source, pod: Arc<Pod>) {
        // Mirror pods are the API's view of static pods, which run from their manifests.
        if static_pods::is_mirror(&pod) {
            return;
        }
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        match self.by_uid.get(&uid) {
            Some((_, tx)) if !tx.is_closed() => {
                self.resize(ctx, &uid, &pod);
                let _ = tx.send(Some(pod));
            }
            _ if self.rejected.contains(&uid) => {}
            _ => {
                if let Err(r) = self.admit(ctx, &pod) {
                    self.rejected.insert(uid);
                    let (client, events) = (ctx.client.clone(), self.events.clone());
                    tokio::spawn(async move {
                        crate::admission::reject(client.as_ref(), &events, &pod, &r).await;
                    });
                    return;
                }
                ctx.allocations.admit(&uid, &pod);
                let (tx, rx) = watch::channel(Some(pod));
                let task = tokio::spawn(pod_worker::run(ctx.clone(), uid.clone(), rx));
                self.tasks.insert(uid.clone(), task);
                self.by_uid.insert(uid, (source, tx));
            }
        }
    }

    /// Upstream's housekeeping, once every source has reported its pods: what the runtime
    /// runs, and the pod directories the kubelet made, of pods no source names any more
    /// (deleted while the kubelet was down, or left by an interrupted termination) are
    /// terminated and removed as a worker terminates a deleted pod; the log directories of
    /// pods that are gone from the node are removed.
    async fn housekeeping(&mut self, ctx: &Context) {
        self.tasks.retain(|_, t| !t.is_finished());
        if !(self.api_ready && self.files_ready) {
            return;
        }
        let snapshot = match ctx.relist.snapshot(0).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "housekeeping: no runtime listing");
                return;
            }
        };
        let mut in_runtime: HashSet<String> = HashSet::new();
        for s in &snapshot.sandboxes {
            if let Some(uid) = s.metadata.as_ref().map(|m| m.uid.clone()) {
                in_runtime.insert(uid);
            }
        }
        for c in &snapshot.containers {
            if let Some(uid) = c.labels.get(crate::pod_spec::labels::POD_UID) {
                in_runtime.insert(uid.clone());
            }
        }
        let pod_dirs = ctx.config.root_dir.join("pods");
        let (dirs, log_dirs) = tokio::task::spawn_blocking({
            let logs = ctx.config.pod_logs_dir.clone();
            move || (child_names(&pod_dirs), child_names(&logs))
        })
        .await
        .unwrap_or_default();
        let owned = |uid: &str| self.by_uid.contains_key(uid) || self.tasks.contains_key(uid);
        let orphans: Vec<String> = in_runtime
            .iter()
            .chain(&dirs)
            .filter(|uid| !uid.is_empty() && !owned(uid))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        // Log directories are named <namespace>_<name>_<uid>.
        let gone: Vec<PathBuf> = log_dirs
            .iter()
            .filter_map(|name| {
                let uid = name.rsplit('_').next()?;
                (name.matches('_').count() >= 2 && !owned(uid) && !in_runtime.contains(uid))
                    .then(|| ctx.config.pod_logs_dir.join(name))
            })
            .collect();
        for uid in orphans {
            tracing::info!(pod_uid = %uid, "cleaning up a pod no source names");
            // A worker with no pod terminates at once: what runs stops, the sandboxes, cgroup
            // and directories go.
            let (_tx, rx) = watch::channel(None);
            let task = tokio::spawn(pod_worker::run(ctx.clone(), uid.clone(), rx));
            self.tasks.insert(uid, task);
        }
        if !gone.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for dir in gone {
                    tracing::info!(dir = %dir.display(), "removing the logs of a pod that is gone");
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!(dir = %dir.display(), error = %e, "pod logs not removed");
                    }
                }
            })
            .await;
        }
    }

    /// Decides an in-place resize of pod `uid` (its spec asks for other resources than it was
    /// allocated) against the Node and the other pods' allocations ([`crate::resize`]).
    fn resize(&self, ctx: &Context, uid: &str, pod: &Pod) {
        let Some(allocation) = ctx.allocations.get(uid) else {
            return;
        };
        let asked = crate::resize::asked(pod);
        let decision = if crate::resize::same_all(&allocation.containers, &asked) {
            // Nothing to resize (or a pending resize taken back).
            if allocation.pending.is_none() {
                return;
            }
            Ok(())
        } else {
            let others: Vec<Pod> = self
                .by_uid
                .iter()
                .filter(|(other, _)| other.as_str() != uid)
                .filter_map(|(other, (_, tx))| {
                    let p = tx.borrow().clone().filter(|p| !is_terminal(p))?;
                    Some(match ctx.allocations.get(other) {
                        Some(a) => {
                            crate::resize::with_allocation(Arc::unwrap_or_clone(p), &a.containers)
                        }
                        None => Arc::unwrap_or_clone(p),
                    })
                })
                .collect();
            crate::resize::decide(pod, &others, self.node.borrow().as_ref())
        };
        if let Err(p) = &decision {
            tracing::info!(pod = %uid, reason = p.reason, message = %p.message, "resize not admitted");
        }
        ctx.allocations.resolve(uid, pod, decision);
    }

    /// Decides again the resizes deferred for want of room, once a pod left; a worker whose
    /// resize is admitted now is woken to actuate it.
    fn retry_deferred_resizes(&self, ctx: &Context) {
        for uid in ctx.allocations.deferred() {
            let Some((_, tx)) = self.by_uid.get(&uid) else {
                continue;
            };
            let Some(pod) = tx.borrow().clone() else {
                continue;
            };
            self.resize(ctx, &uid, &pod);
            if ctx
                .allocations
                .get(&uid)
                .is_some_and(|a| a.pending.is_none())
            {
                tx.send_replace(Some(pod));
            }
        }
    }

    /// Admits a new pod against the Node and the pods already admitted (those still running
    /// or to run). A pod that has already ended is not judged again, and one refused before
    /// (by this kubelet, before a restart) stays refused; without a Node (no API server, or
    /// none yet) only what needs no Node is left to the worker.
    fn admit(&self, ctx: &Context, pod: &Pod) -> Result<(), predicates::Rejection> {
        if is_terminal(pod) {
            let status = pod.status.as_ref();
            let refused = status
                .and_then(|s| s.message.as_deref())
                .and_then(|m| m.strip_prefix(crate::admission::REJECTED_PREFIX));
            return match refused {
                Some(message) => Err(predicates::Rejection {
                    reason: status.and_then(|s| s.reason.clone()).unwrap_or_default(),
                    message: message.to_string(),
                }),
                None => Ok(()),
            };
        }
        // Under pressure the eviction manager refuses what it would evict next.
        let pressure = ctx.pressure.borrow().clone();
        crate::eviction::admit(pod, &pressure).map_err(|message| predicates::Rejection {
            reason: crate::eviction::REASON.into(),
            message,
        })?;
        let Some(node) = self.node.borrow().clone() else {
            return Ok(());
        };
        let admitted: Vec<Arc<Pod>> = self
            .by_uid
            .values()
            .filter_map(|(_, tx)| tx.borrow().clone())
            .filter(|p| !is_terminal(p))
            .collect();
        let refs: Vec<&Pod> = admitted.iter().map(|p| &**p).collect();
        predicates::admit(pod, &refs, &node)
    }
}
