//! One worker per pod UID: observes what the runtime has of the pod (everything labelled with
//! its UID, through [`Cri`]), asks the pure core ([`crate::sync::compute_pod_actions`]) what
//! to do, executes those actions and reports the pod's status.
//!
//! Executing is where the outside world is met: volumes, image pulls with the pod's pull
//! secrets, the environment from ConfigMaps, Secrets and Services, the image user
//! (`runAsNonRoot`), the RuntimeClass handler, termination message files, lifecycle hooks,
//! probes and Events. When the pod is deleted the worker stops its containers in upstream's
//! order within the grace period ([`crate::sync::termination_waves`]), removes the sandbox and
//! confirms the deletion. Because the runtime is the record, a restarted kubelet adopts
//! running pods and continues their restart counts.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use strake_types::cri;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::events::Kind;
use crate::lifecycle::{self, Hook};
use crate::pod_spec;
use crate::pod_status::{self, Observed};
use crate::prober::{self, ProbeState, Timing};
use crate::runtime::{Cri, RuntimeError};
use crate::sync::{self, Action, ContainerObs, KillReason, PodRuntimeState, RunState, SandboxObs};
use crate::termination;

/// Image pull backoff: 10 s doubling to 300 s after each failed pull.
#[derive(Clone, Debug, Default)]
struct PullBackoff {
    delay: Option<Duration>,
    until: Option<Instant>,
}

impl PullBackoff {
    /// Records a failed pull at `now`; returns the delay before the next attempt.
    fn fail(&mut self, now: Instant) -> Duration {
        let next = self
            .delay
            .map_or(sync::Backoff::INITIAL, |d| (d * 2).min(sync::Backoff::MAX));
        self.delay = Some(next);
        self.until = Some(now + next);
        next
    }

    /// Whether a pull may be attempted at `now`.
    fn ready(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| now >= u)
    }
}

/// How often API-backed volumes are re-read.
const VOLUME_REFRESH: Duration = Duration::from_secs(5);

/// How the kubelet was asked to end a pod: the Failed status to report and the grace period
/// its containers get (`None`: the pod's own).
#[derive(Clone, Debug)]
pub struct EndRequest {
    pub ending: pod_status::Ending,
    pub grace_seconds: Option<i64>,
}

/// Requests, by pod UID, that a pod's worker end it (the eviction manager's).
#[derive(Clone, Default)]
pub struct EndRequests {
    inner: Arc<std::sync::Mutex<BTreeMap<String, EndRequest>>>,
}

impl EndRequests {
    /// Asks the worker of pod `uid` to end it; it acts on its next sync.
    pub fn request(&self, uid: &str, req: EndRequest) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(uid.to_string(), req);
    }

    fn take(&self, uid: &str) -> Option<EndRequest> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(uid)
    }
}

/// Shared facts every pod worker needs.
#[derive(Clone)]
pub struct Context {
    /// `None` in standalone mode (static pods only, no API server).
    pub client: Option<kube::Client>,
    pub volumes: crate::volumes::Volumes,
    /// The runtime.
    pub cri: Arc<dyn Cri>,
    pub config: Config,
    pub host_ip: String,
    pub runtime_name: String,
    /// Wake-ups from the runtime's container events ([`crate::pleg`]).
    pub nudges: crate::pleg::Nudges,
    /// The node's shared listing of the runtime.
    pub relist: Arc<crate::relist::Relist>,
    /// The QoS and pod cgroups (`None` where the host's hierarchies are not known).
    pub cgroups: Option<Arc<crate::pod_cgroups::PodCgroups>>,
    /// The Services informer (`None` in standalone mode).
    pub services: Option<crate::services::Services>,
    /// Pods the kubelet was asked to end.
    pub end_requests: EndRequests,
    /// The node's pressure conditions (from the eviction manager).
    pub pressure: crate::eviction::Pressure,
    /// What each pod's containers were allocated ([`crate::resize`]).
    pub allocations: crate::resize::Allocations,
}

/// What the runtime has of the pod at one moment.
#[derive(Clone, Debug, Default)]
struct Observation {
    state: PodRuntimeState,
    /// CRI statuses by container ID (exited ones with their termination message).
    statuses: BTreeMap<String, cri::ContainerStatus>,
}

/// Dead instances kept per container (upstream's `maxPerPodContainer`).
const MAX_PER_POD_CONTAINER: usize = 1;

struct Worker {
    ctx: Context,
    uid: String,
    /// The core's memory: backoff, probe verdicts, waiting reasons.
    state: sync::WorkerState,
    pull_backoff: BTreeMap<String, PullBackoff>,
    /// Host paths of the pod's volumes, and when they were last refreshed.
    volume_paths: BTreeMap<String, std::path::PathBuf>,
    volumes_refreshed: Option<Instant>,
    /// Statuses of exited instances, which do not change: read (with their termination
    /// message) once.
    exited: BTreeMap<String, cri::ContainerStatus>,
    /// Statuses of running instances, reused while the node's listing says they run.
    running: BTreeMap<String, cri::ContainerStatus>,
    /// The ready sandbox's addresses, asked once per sandbox.
    sandbox_ips: Option<(String, Vec<String>)>,
    /// Whether the pod's cgroup was made (or found, after a kubelet restart) by this worker.
    cgroup_made: bool,
    /// Observations must come from this listing or a later one (the first started after the
    /// worker's last change to the runtime, or the runtime's last event about the pod).
    min_listing: u64,
    last_status: Option<k8s_openapi::api::core::v1::PodStatus>,
    /// The pod's RuntimeClass and its handler, once resolved.
    runtime_class: Option<(String, String)>,
    /// Set once the pod is deleted and its containers stopped: its last status is terminal.
    terminated: bool,
    events: crate::events::Events,
    /// Set once the kubelet ended the pod: nothing of it runs again.
    ended: Option<EndRequest>,
    /// The resources each running container (by ID) was started or last updated with.
    applied: BTreeMap<String, k8s_openapi::api::core::v1::ResourceRequirements>,
    /// The allocation the pod's cgroup was last written for.
    cgroup_for: Option<crate::resize::Resources>,
    /// Why the pod's resize waits, or why its actuation failed (for the status).
    resize: Option<pod_status::Resize>,
}

/// Runs the worker of one pod until the pod is gone. `updates` carries the newest pod object,
/// `None` once the pod was deleted from the API server.
pub async fn run(ctx: Context, uid: String, mut updates: watch::Receiver<Option<Arc<Pod>>>) {
    let events = crate::events::Events::new(ctx.client.clone(), &ctx.config.node_name);
    let mut w = Worker {
        ctx,
        uid,
        state: sync::WorkerState::default(),
        pull_backoff: BTreeMap::new(),
        volume_paths: BTreeMap::new(),
        volumes_refreshed: None,
        exited: BTreeMap::new(),
        running: BTreeMap::new(),
        sandbox_ips: None,
        cgroup_made: false,
        min_listing: 0,
        last_status: None,
        runtime_class: None,
        terminated: false,
        events,
        ended: None,
        applied: BTreeMap::new(),
        cgroup_for: None,
        resize: None,
    };
    // The last pod object seen: a pod that vanished (deleted from the API, or its static
    // manifest removed) is still terminated with its own spec and grace period.
    let mut last: Option<Arc<Pod>> = None;
    let nudge = w.ctx.nudges.register(&w.uid);
    loop {
        let pod = updates.borrow_and_update().clone();
        match pod {
            Some(p) if p.metadata.deletion_timestamp.is_none() => {
                // Containers run with what was allocated to them, which a resize not (yet)
                // admitted leaves behind the spec.
                let p = w.allocated(p);
                if let Err(e) = w.sync(&p).await {
                    tracing::warn!(pod = %pod_key(&p), error = %e, "pod sync failed");
                }
                last = Some(p);
            }
            other => {
                w.terminate(other.as_deref().or(last.as_deref())).await;
                w.ctx.nudges.unregister(&w.uid);
                w.ctx.allocations.remove(&w.uid);
                return;
            }
        }
        // Relist: re-check the runtime every second even without a spec change (PLEG), and at
        // once when the runtime reports an event of this pod.
        tokio::select! {
            _ = updates.changed() => {}
            // The runtime reported a change of this pod: look at a listing taken after it.
            _ = nudge.notified() => w.min_listing = w.ctx.relist.next_listing(),
            _ = tokio::time::sleep(crate::relist::PERIOD) => {}
        }
    }
}

/// The pod's spec, borrowed (the API server always sets one; an empty one otherwise). The
/// worker looks at it every relist period: a copy each time cost more than the look.
fn spec_of(pod: &Pod) -> Cow<'_, k8s_openapi::api::core::v1::PodSpec> {
    pod.spec
        .as_ref()
        .map_or_else(|| Cow::Owned(Default::default()), Cow::Borrowed)
}

fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// The named ports of container `c`, for probes and hooks.
fn named_ports(c: &Container) -> Vec<(String, i32)> {
    c.ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.clone()?, p.container_port)))
        .collect()
}

fn run_state(state: i32) -> RunState {
    match cri::ContainerState::try_from(state) {
        Ok(cri::ContainerState::ContainerCreated) => RunState::Created,
        Ok(cri::ContainerState::ContainerRunning) => RunState::Running,
        Ok(cri::ContainerState::ContainerExited) => RunState::Exited,
        _ => RunState::Unknown,
    }
}

/// Adds the termination message of exited container `st` (of `c`, pod `uid`) to its status
/// message, as upstream: the message file, or the log tail under FallbackToLogsOnError.
fn with_termination_message(
    root_dir: &std::path::Path,
    uid: &str,
    c: Option<&Container>,
    mut st: cri::ContainerStatus,
) -> cri::ContainerStatus {
    let Some(c) = c else { return st };
    let fallback = termination::falls_back_to_logs(
        c.termination_message_policy.as_deref(),
        st.exit_code,
        &st.reason,
    );
    let file = termination::container_path(c).and_then(|path| {
        st.mounts
            .iter()
            .find(|m| m.container_path == path)
            .map(|m| std::path::PathBuf::from(&m.host_path))
    });
    let mut message = file
        .map(|f| termination::read_message(root_dir, uid, &c.name, &f))
        .unwrap_or_default();
    if message.is_empty() && fallback && !st.log_path.is_empty() {
        message = termination::log_tail(std::path::Path::new(&st.log_path));
    }
    if !message.is_empty() {
        if !st.message.is_empty() {
            st.message.push_str(": ");
        }
        st.message.push_str(&message);
    }
    st
}

/// `runAsNonRoot`: the user the container will run as (its `runAsUser`, else the pod's, else
/// the image's) must be known and not 0, as upstream verifies before creating it.
fn verify_non_root(
    pod: &Pod,
    c: &Container,
    image_user: &pod_spec::ImageUser,
) -> Result<(), String> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let wanted = c
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_non_root)
        .or_else(|| psc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    if !wanted {
        return Ok(());
    }
    let uid = match (pod_spec::explicit_run_as_user(pod, c), image_user) {
        (Some(uid), _) => uid,
        (None, pod_spec::ImageUser::Uid(uid)) => *uid,
        (None, pod_spec::ImageUser::Name(name)) => {
            return Err(format!(
                "container has runAsNonRoot and image has non-numeric user ({name}), \
                 cannot verify user is non-root (pod: \"{}\", container: {})",
                pod_key(pod),
                c.name
            ));
        }
    };
    if uid == 0 {
        return Err(format!(
            "container has runAsNonRoot and image will run as root (pod: \"{}\", container: {})",
            pod_key(pod),
            c.name
        ));
    }
    Ok(())
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

/// The pod IPs of sandbox `id` as the runtime reports them (primary first).
async fn sandbox_ips(cri: &dyn Cri, id: &str) -> Result<Vec<String>, RuntimeError> {
    Ok(cri
        .sandbox_status(id)
        .await?
        .and_then(|s| s.network)
        .map(|n| {
            std::iter::once(n.ip)
                .chain(n.additional_ips.into_iter().map(|p| p.ip))
                .filter(|ip| !ip.is_empty())
                .collect()
        })
        .unwrap_or_default())
}

impl Worker {
    /// Lists what the runtime has of the pod: its sandboxes (the ready one's IPs), its
    /// containers and their statuses.
    async fn observe(&mut self, pod: Option<&Pod>) -> Result<Observation, RuntimeError> {
        let cri = self.ctx.cri.clone();
        // The node's shared listing: taken after this worker's last action, and at most one
        // relist period old.
        let snapshot = self.ctx.relist.snapshot(self.min_listing).await?;
        let (sandboxes, containers) = snapshot.of_pod(&self.uid);
        let mut obs = Observation::default();
        for s in &sandboxes {
            obs.state.sandboxes.push(SandboxObs {
                id: s.id.clone(),
                ready: s.state == cri::PodSandboxState::SandboxReady as i32,
                attempt: s.metadata.as_ref().map_or(0, |m| m.attempt),
                created_at: s.created_at,
                ips: Vec::new(),
            });
        }
        if let Some(id) = obs.state.ready_sandbox().map(|s| s.id.clone()) {
            // A sandbox keeps its addresses for life: asked once.
            let ips = match &self.sandbox_ips {
                Some((known, ips)) if *known == id => ips.clone(),
                _ => {
                    let ips = sandbox_ips(cri.as_ref(), &id).await?;
                    self.sandbox_ips = Some((id.clone(), ips.clone()));
                    ips
                }
            };
            if let Some(s) = obs.state.sandboxes.iter_mut().find(|s| s.id == id) {
                s.ips = ips;
            }
        }
        for k in &containers {
            // Exited instances never change; a running one's status holds while the listing
            // still says running. Anything else is asked for.
            let cached = self.exited.get(&k.id).or_else(|| {
                self.running.get(&k.id).filter(|st| {
                    st.state == k.state && k.state == cri::ContainerState::ContainerRunning as i32
                })
            });
            let st = match cached {
                Some(st) => st.clone(),
                None => match cri.container_status(&k.id).await {
                    Ok(Some(st)) => st,
                    // Removed since the list, or unreadable: the next relist sees it.
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(container = %k.id, error = %e, "container status");
                        continue;
                    }
                },
            };
            let name = st
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            let st = if run_state(st.state) == RunState::Exited && !self.exited.contains_key(&k.id)
            {
                let root = self.ctx.config.root_dir.clone();
                let uid = self.uid.clone();
                let c = pod.and_then(|p| pod_spec::find_container(p, &name).map(Cow::into_owned));
                let raw = st.clone();
                let st = tokio::task::spawn_blocking(move || {
                    with_termination_message(&root, &uid, c.as_ref(), raw)
                })
                .await
                .unwrap_or(st);
                self.exited.insert(k.id.clone(), st.clone());
                st
            } else {
                if run_state(st.state) == RunState::Running {
                    self.running.insert(k.id.clone(), st.clone());
                }
                st
            };
            obs.state.containers.push(ContainerObs {
                id: k.id.clone(),
                name,
                sandbox_id: k.pod_sandbox_id.clone(),
                attempt: st.metadata.as_ref().map_or(0, |m| m.attempt),
                state: run_state(st.state),
                exit_code: st.exit_code,
                started_at: st.started_at,
                finished_at: st.finished_at,
            });
            obs.statuses.insert(k.id.clone(), st);
        }
        self.exited.retain(|id, _| obs.statuses.contains_key(id));
        self.running.retain(|id, st| {
            obs.statuses.contains_key(id)
                && run_state(st.state) == RunState::Running
                && !self.exited.contains_key(id)
        });
        Ok(obs)
    }

    /// The CRI runtime handler of the pod's `runtimeClassName` (the RuntimeClass's `handler`);
    /// empty for the runtime's default. Resolved once per pod, like upstream's informer cache.
    async fn runtime_handler(&mut self, pod: &Pod) -> Result<String, String> {
        let Some(class) = pod.spec.as_ref().and_then(|s| s.runtime_class_name.clone()) else {
            return Ok(String::new());
        };
        if let Some((name, handler)) = &self.runtime_class
            && *name == class
        {
            return Ok(handler.clone());
        }
        let Some(client) = self.ctx.client.clone() else {
            return Err(format!(
                "RuntimeClass {class:?} cannot be resolved without an API server"
            ));
        };
        let api: Api<k8s_openapi::api::node::v1::RuntimeClass> = Api::all(client);
        match api.get_opt(&class).await {
            Ok(Some(rc)) => {
                self.runtime_class = Some((class, rc.handler.clone()));
                Ok(rc.handler)
            }
            Ok(None) => Err(format!("RuntimeClass {class:?} not found")),
            Err(e) => Err(format!("RuntimeClass {class:?}: {e}")),
        }
    }

    /// Credentials for pulling `image` from the pod's `imagePullSecrets` (each Secret fetched
    /// individually, as the Node authorizer allows), in the order to try them. A missing or
    /// malformed Secret is skipped with a warning, like upstream.
    async fn pull_auths(&self, pod: &Pod, image: &str) -> Vec<cri::AuthConfig> {
        let names: Vec<String> = pod
            .spec
            .iter()
            .flat_map(|s| s.image_pull_secrets.iter().flatten())
            .map(|r| r.name.clone())
            .collect();
        let Some(client) = self.ctx.client.clone() else {
            return Vec::new();
        };
        if names.is_empty() {
            return Vec::new();
        }
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, &ns);
        let mut entries = Vec::new();
        for name in names {
            let secret = match api.get_opt(&name).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    tracing::warn!(pod = %pod_key(pod), secret = %name, "image pull secret not found");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(pod = %pod_key(pod), secret = %name, error = %e, "image pull secret not fetched");
                    continue;
                }
            };
            let data: BTreeMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .chain(
                    secret
                        .string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                )
                .collect();
            match crate::credentials::entries_of_secret(&name, secret.type_.as_deref(), &data) {
                Ok(e) => entries.push(e),
                Err(e) => {
                    tracing::warn!(pod = %pod_key(pod), error = %e, "image pull secret skipped")
                }
            }
        }
        crate::credentials::auth_configs(image, &entries)
    }

    /// Pulls the image per `imagePullPolicy`; returns the image reference to create with.
    async fn ensure_image(&mut self, pod: &Pod, c: &Container) -> Result<String, (String, String)> {
        let image = c.image.clone().unwrap_or_default();
        let policy = c.image_pull_policy.clone().unwrap_or_else(|| {
            if image.ends_with(":latest") || !image.rsplit('/').next().unwrap_or("").contains(':') {
                "Always".into()
            } else {
                "IfNotPresent".into()
            }
        });
        let present = self.image_status(&image).await.ok().flatten().map(|i| i.id);
        match (policy.as_str(), present) {
            ("Never", Some(id)) | ("IfNotPresent", Some(id)) => {
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Normal,
                    "Pulled",
                    format!("Container image \"{image}\" already present on machine"),
                );
                return Ok(id);
            }
            ("Never", None) => {
                return Err((
                    "ErrImageNeverPull".into(),
                    format!("Container image \"{image}\" is not present with pull policy of Never"),
                ));
            }
            _ => {}
        }
        let now = Instant::now();
        if !self.pull_backoff.get(&c.name).is_none_or(|b| b.ready(now)) {
            return Err((
                "ImagePullBackOff".into(),
                format!("Back-off pulling image \"{image}\""),
            ));
        }
        // Each matching credential in turn, then anonymously when none matched (upstream's
        // order); the last error is the one reported.
        let auths = self.pull_auths(pod, &image).await;
        self.events.emit(
            pod,
            Some(&c.name),
            Kind::Normal,
            "Pulling",
            format!("Pulling image \"{image}\""),
        );
        let pull_started = Instant::now();
        let attempts: Vec<Option<cri::AuthConfig>> = if auths.is_empty() {
            vec![None]
        } else {
            auths.into_iter().map(Some).collect()
        };
        let mut result = None;
        for auth in attempts {
            let r = self.ctx.cri.pull_image(&image, auth).await;
            let ok = r.is_ok();
            result = Some(r);
            if ok {
                break;
            }
        }
        let Some(result) = result else {
            return Err(("ErrImagePull".into(), "no pull attempted".into()));
        };
        match result {
            Ok(r) => {
                self.pull_backoff.remove(&c.name);
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Normal,
                    "Pulled",
                    format!(
                        "Successfully pulled image \"{image}\" in {:.3}s",
                        pull_started.elapsed().as_secs_f64()
                    ),
                );
                Ok(r)
            }
            Err(e) => {
                self.pull_backoff
                    .entry(c.name.clone())
                    .or_default()
                    .fail(now);
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Warning,
                    "Failed",
                    format!("Failed to pull image \"{image}\": {}", e.detail()),
                );
                Err(("ErrImagePull".into(), e.detail()))
            }
        }
    }

    async fn sync(&mut self, pod: &Pod) -> Result<(), RuntimeError> {
        if let Err(r) = crate::admission::admit(pod, &self.ctx.config) {
            crate::admission::reject(self.ctx.client.as_ref(), &self.events, pod, &r).await;
            return Ok(());
        }
        // A request is taken even when the pod already ended (an eviction may ask twice), so
        // none is left behind.
        let requested = self.ctx.end_requests.take(&self.uid);
        if self.ended.is_none() {
            self.ended = requested;
        }
        if self.ended.is_none() {
            let start = self
                .last_status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .or_else(|| pod.status.as_ref()?.start_time.as_ref());
            if crate::deadline::past(pod, start, Timestamp::now()) {
                tracing::info!(pod = %pod_key(pod), "pod past its active deadline");
                self.events.emit(
                    pod,
                    None,
                    Kind::Normal,
                    crate::deadline::REASON,
                    crate::deadline::MESSAGE.into(),
                );
                self.ended = Some(EndRequest {
                    ending: crate::deadline::ending(),
                    grace_seconds: None,
                });
            }
        }
        let terminal =
            pod_status::is_terminal(pod.status.as_ref().and_then(|s| s.phase.as_deref()));
        if self.ended.is_some() || terminal {
            return self.finish(pod).await;
        }
        let spec = spec_of(pod);
        let handler = match self.runtime_handler(pod).await {
            Ok(h) => h,
            Err(message) => {
                // No sandbox without its runtime: every container waits, with the reason.
                tracing::warn!(pod = %pod_key(pod), %message, "cannot create the pod sandbox");
                self.all_creating(&spec, message);
                let obs = self.observe(Some(pod)).await?;
                return self.report(pod, &obs).await;
            }
        };
        // Volumes first (as upstream mounts them before SyncPod), refreshed every few seconds
        // so that ConfigMap and Secret changes and token rotation reach the files.
        if self
            .volumes_refreshed
            .is_none_or(|t| t.elapsed() >= VOLUME_REFRESH)
        {
            match self.ctx.volumes.prepare(pod).await {
                Ok(paths) => {
                    self.volume_paths = paths;
                    self.volumes_refreshed = Some(Instant::now());
                }
                Err(e) if self.volumes_refreshed.is_none() => {
                    tracing::warn!(pod = %pod_key(pod), error = %e, "volumes not ready");
                    let message = e.to_string();
                    if self.all_creating(&spec, message.clone()) {
                        self.events
                            .emit(pod, None, Kind::Warning, "FailedMount", message);
                    }
                    let obs = self.observe(Some(pod)).await?;
                    return self.report(pod, &obs).await;
                }
                Err(e) => tracing::warn!(pod = %pod_key(pod), error = %e, "volume refresh failed"),
            }
        }
        // Once per worker: the pod's cgroup values (a pod adopted after a restart counts again
        // towards the Burstable cgroup's shares).
        if !self.cgroup_made
            && let Some(cg) = &self.ctx.cgroups
        {
            match cg.ensure_pod(pod).await {
                Ok(()) => {
                    self.cgroup_made = true;
                    self.cgroup_for = Some(crate::resize::asked(pod));
                }
                Err(e) => tracing::warn!(pod = %pod_key(pod), error = %e, "pod cgroup"),
            }
        }
        let obs = self.observe(Some(pod)).await?;
        let actions = sync::compute_pod_actions(pod, &obs.state, Instant::now(), &mut self.state);
        let obs = if actions.is_empty() {
            obs
        } else {
            let done = self.execute(pod, &obs, &handler, actions).await;
            // What was just done must show in the next listing.
            self.min_listing = self.ctx.relist.next_listing();
            let obs = self.observe(Some(pod)).await?;
            if let Err(e) = done {
                self.report(pod, &obs).await?;
                return Err(e);
            }
            obs
        };
        self.actuate_resize(pod, &obs).await;
        self.probe(pod, &obs).await;
        self.report(pod, &obs).await?;
        self.collect_garbage(pod, &obs).await;
        Ok(())
    }

    /// `pod` with its allocation, and the resize state it reports. The pod is shared with the
    /// dispatcher; it is copied only when an allocation is applied to it.
    fn allocated(&mut self, pod: Arc<Pod>) -> Arc<Pod> {
        let Some(a) = self.ctx.allocations.get(&self.uid) else {
            return pod;
        };
        if let Some(p) = a.pending {
            self.resize = Some(pod_status::Resize::Pending {
                reason: p.reason.to_string(),
                message: p.message,
            });
        } else if matches!(self.resize, Some(pod_status::Resize::Pending { .. })) {
            self.resize = None;
        }
        if crate::resize::holds_allocation(&pod, &a.containers) {
            return pod;
        }
        Arc::new(crate::resize::with_allocation(
            Arc::unwrap_or_clone(pod),
            &a.containers,
        ))
    }

    /// Brings running containers and the pod's cgroup to the pod's allocation (after a
    /// resize): UpdateContainerResources, or a restart where the container's `resizePolicy`
    /// asks for one. The pod's cgroup is written before the containers (room to grow) and
    /// after them (room freed), as upstream orders a resize.
    async fn actuate_resize(&mut self, pod: &Pod, obs: &Observation) {
        let ids: std::collections::BTreeSet<&str> =
            obs.state.containers.iter().map(|k| k.id.as_str()).collect();
        self.applied.retain(|id, _| ids.contains(id.as_str()));
        let actions = sync::compute_resize_actions(
            pod,
            &obs.state,
            &self.applied,
            self.ctx.cgroups.is_some(),
            self.cgroup_for.as_ref(),
        );
        if actions.is_empty() {
            if matches!(self.resize, Some(pod_status::Resize::InProgress { .. })) {
                self.resize = None;
            }
            return;
        }
        let ip = obs
            .state
            .ready_sandbox()
            .and_then(|s| s.ips.first().cloned())
            .unwrap_or_default();
        let mut error = None;
        for action in actions {
            match action {
                Action::KillContainer {
                    id, name, grace, ..
                } => {
                    tracing::info!(pod = %pod_key(pod), container = %name, "restarting container to resize it");
                    self.kill_container(Some(pod), &id, &name, grace, &ip).await;
                    self.applied.remove(&id);
                }
                Action::Resize {
                    pod_cgroup,
                    updates,
                } => error = self.resize_in_place(pod, pod_cgroup, updates).await,
                other => {
                    tracing::warn!(pod = %pod_key(pod), action = ?other, "not a resize action")
                }
            }
        }
        if !matches!(self.resize, Some(pod_status::Resize::Pending { .. })) {
            self.resize = error.map(|message| pod_status::Resize::InProgress {
                error: Some(message),
            });
        }
    }

    /// [`Action::Resize`]: the pod's cgroup, UpdateContainerResources of each container, and
    /// the pod's cgroup again; the last error, if any.
    async fn resize_in_place(
        &mut self,
        pod: &Pod,
        pod_cgroup: bool,
        updates: Vec<sync::ResizeUpdate>,
    ) -> Option<String> {
        let mut error = None;
        let cgroups = self.ctx.cgroups.clone().filter(|_| pod_cgroup);
        if let Some(cg) = &cgroups {
            // May fail when it would shrink below what the containers still hold; the
            // second write below, after them, is the one that must succeed.
            let _ = cg.ensure_pod(pod).await;
        }
        let qos = pod_spec::qos_class(pod);
        let memory = crate::resources::NodeAllocatable::of_this_machine()
            .memory
            .clamp(0, u64::MAX as i128) as u64;
        for u in updates {
            let Some(c) = pod_spec::find_container(pod, &u.name) else {
                continue;
            };
            let resources = crate::resources::linux_resources(&c, qos, memory);
            match self
                .ctx
                .cri
                .update_container_resources(&u.id, resources)
                .await
            {
                Ok(()) => {
                    self.applied.insert(u.id, u.resources);
                }
                Err(e) => {
                    tracing::warn!(pod = %pod_key(pod), container = %u.name, error = %e.detail(), "resize not actuated");
                    error = Some(e.message());
                }
            }
        }
        if let Some(cg) = &cgroups {
            match cg.ensure_pod(pod).await {
                Ok(()) => self.cgroup_for = Some(crate::resize::asked(pod)),
                Err(e) => error = Some(e.to_string()),
            }
        }
        error
    }

    /// Removes what upstream's container garbage collector would ([`sync::collectable`]):
    /// exited instances older than the newest of each container, with their log files, and
    /// old sandboxes left empty. A crash-looping container thus holds one dead instance,
    /// not one per restart.
    async fn collect_garbage(&mut self, pod: &Pod, obs: &Observation) {
        let (containers, sandboxes) = sync::collectable(&obs.state, MAX_PER_POD_CONTAINER);
        if !containers.is_empty() || !sandboxes.is_empty() {
            self.min_listing = self.ctx.relist.next_listing();
        }
        for id in containers {
            if let Err(e) = self.ctx.cri.remove_container(&id).await {
                tracing::debug!(pod = %pod_key(pod), container = %id, error = %e, "remove dead container");
                continue;
            }
            self.exited.remove(&id);
            if let Some(log) = obs.statuses.get(&id).map(|s| s.log_path.clone())
                && !log.is_empty()
            {
                let dir = self.ctx.config.pod_logs_dir.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    crate::log_rotation::remove_container_log(&dir, std::path::Path::new(&log))
                })
                .await;
            }
        }
        for id in sandboxes {
            if let Err(e) = self.ctx.cri.remove_sandbox(&id).await {
                tracing::debug!(pod = %pod_key(pod), sandbox = %id, error = %e, "remove old sandbox");
            }
        }
    }

    /// Carries out the core's actions in order.
    async fn execute(
        &mut self,
        pod: &Pod,
        obs: &Observation,
        handler: &str,
        actions: Vec<Action>,
    ) -> Result<(), RuntimeError> {
        let cri = self.ctx.cri.clone();
        let mut sandbox: Option<(String, Vec<String>)> = obs
            .state
            .ready_sandbox()
            .map(|s| (s.id.clone(), s.ips.clone()));
        for action in actions {
            match action {
                Action::KillSandbox { id } => {
                    if let Err(e) = cri.stop_sandbox(&id).await {
                        tracing::warn!(pod = %pod_key(pod), sandbox = %id, error = %e, "stop sandbox");
                    }
                    if let Err(e) = cri.remove_sandbox(&id).await {
                        tracing::warn!(pod = %pod_key(pod), sandbox = %id, error = %e, "remove sandbox");
                    }
                    if sandbox.as_ref().is_some_and(|(s, _)| *s == id) {
                        sandbox = None;
                    }
                }
                Action::CreateSandbox { attempt } => {
                    // The pod's cgroup first, as upstream makes it before the sandbox.
                    let cgroup = match &self.ctx.cgroups {
                        Some(cg) => cg.ensure_pod(pod).await.map_err(RuntimeError::PodCgroup),
                        None => Ok(()),
                    };
                    let id = match cgroup.and_then(|()| {
                        pod_spec::sandbox_config(pod, &self.ctx.config, attempt)
                            .map_err(RuntimeError::SandboxConfig)
                    }) {
                        Ok(config) => cri.run_sandbox(config, handler).await,
                        Err(e) => Err(e),
                    };
                    let id = match id {
                        Ok(id) => id,
                        Err(e) => {
                            let spec = spec_of(pod);
                            let message = format!("Failed to create pod sandbox: {}", e.detail());
                            if self.all_creating(&spec, message.clone()) {
                                self.events.emit(
                                    pod,
                                    None,
                                    Kind::Warning,
                                    "FailedCreatePodSandBox",
                                    message,
                                );
                            }
                            return Err(e);
                        }
                    };
                    tracing::info!(pod = %pod_key(pod), sandbox = %id, "sandbox created");
                    let ips = sandbox_ips(cri.as_ref(), &id).await?;
                    sandbox = Some((id, ips));
                }
                Action::StartContainer { name, attempt } => {
                    let (Some((sid, ips)), Some(c)) =
                        (&sandbox, pod_spec::find_container(pod, &name))
                    else {
                        continue;
                    };
                    let (sid, ips, c) = (sid.clone(), ips.clone(), c.into_owned());
                    // An ephemeral container may join another container's processes.
                    let target = match pod_spec::target_container(pod, &name) {
                        None => None,
                        Some(t) => match obs.state.current(&sid, t) {
                            Some(k) => Some(k.id.clone()),
                            None => {
                                let message = format!("unable to find target container {t}");
                                self.config_error(pod, &c, message);
                                continue;
                            }
                        },
                    };
                    self.start_container(pod, &sid, &ips, &c, attempt, target.as_deref())
                        .await;
                }
                Action::KillContainer {
                    id,
                    name,
                    grace,
                    reason,
                } => {
                    let ip = sandbox
                        .as_ref()
                        .and_then(|(_, ips)| ips.first().cloned())
                        .unwrap_or_default();
                    if reason != KillReason::Terminating {
                        tracing::info!(pod = %pod_key(pod), container = %name, ?reason, "killing container");
                    }
                    if let KillReason::Probe(kind) = reason {
                        tracing::info!(pod = %pod_key(pod), container = %name, kind, "probe failed; restarting container");
                    }
                    self.kill_container(Some(pod), &id, &name, grace, &ip).await;
                }
                Action::Event {
                    container,
                    kind,
                    reason,
                    note,
                } => self
                    .events
                    .emit(pod, container.as_deref(), kind, reason, note),
                Action::Resize {
                    pod_cgroup,
                    updates,
                } => {
                    if let Some(message) = self.resize_in_place(pod, pod_cgroup, updates).await {
                        self.resize = Some(pod_status::Resize::InProgress {
                            error: Some(message),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs container `name`'s preStop hook (if any) and stops it, all within `grace`.
    async fn kill_container(
        &self,
        pod: Option<&Pod>,
        id: &str,
        name: &str,
        grace: Duration,
        pod_ip: &str,
    ) {
        let started = Instant::now();
        let c = pod.and_then(|p| pod_spec::find_container(p, name));
        let pre_stop = c
            .as_ref()
            .and_then(|c| c.lifecycle.as_ref()?.pre_stop.as_ref());
        if let (Some(pod), Some(c), Some(handler)) = (pod, c.as_ref(), pre_stop) {
            let hook = Hook::of(handler, pod_ip, &named_ports(c));
            let run = lifecycle::run(&*self.ctx.cri, id, &hook, Some(grace));
            match tokio::time::timeout(grace, run).await {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    tracing::info!(pod = %pod_key(pod), container = %name, %message, "preStop hook failed");
                    self.events.emit(
                        pod,
                        Some(name),
                        Kind::Warning,
                        "FailedPreStopHook",
                        format!("PreStopHook failed: {message}"),
                    );
                }
                Err(_) => {
                    tracing::info!(pod = %pod_key(pod), container = %name, "preStop hook not completed in the grace period");
                }
            }
        }
        // What the hook left of the grace period is the container's to stop in.
        let left = sync::remaining_grace(started + grace, Instant::now());
        if let Err(e) = self.ctx.cri.stop_container(id, left).await {
            tracing::warn!(container = %name, error = %e, "stop container");
        }
    }

    /// Pulls, creates and starts container `c` (instance `attempt`) in sandbox `sandbox_id`,
    /// then runs its postStart hook; a reason it cannot goes to the container's waiting state.
    /// `target`: the container whose process namespace an ephemeral container joins.
    async fn start_container(
        &mut self,
        pod: &Pod,
        sandbox_id: &str,
        ips: &[String],
        c: &Container,
        attempt: u32,
        target: Option<&str>,
    ) {
        let cri = self.ctx.cri.clone();
        let image_ref = match self.ensure_image(pod, c).await {
            Ok(r) => r,
            Err(reason) => {
                self.state.waiting.insert(c.name.clone(), reason);
                return;
            }
        };
        // The images of its image volumes, pulled per each volume's pullPolicy.
        let spec = spec_of(pod);
        let mut pulled = BTreeMap::new();
        for m in c.volume_mounts.iter().flatten() {
            let Some(source) = crate::volumes::image_volume(&spec, &m.name) else {
                continue;
            };
            if pulled.contains_key(&m.name) {
                continue;
            }
            let volume_image = Container {
                name: c.name.clone(),
                image: source.reference.clone(),
                image_pull_policy: source.pull_policy.clone(),
                ..Default::default()
            };
            match self.ensure_image(pod, &volume_image).await {
                Ok(r) => {
                    pulled.insert(m.name.clone(), r);
                }
                Err(reason) => {
                    self.state.waiting.insert(c.name.clone(), reason);
                    return;
                }
            }
        }
        let sources = match self.env_sources(pod, c).await {
            Ok(s) => s,
            Err(e) => return self.config_error(pod, c, e.to_string()),
        };
        let pod_ip = ips.first().map_or("", String::as_str);
        let env = match pod_spec::env(pod, c, pod_ip, &self.ctx.host_ip, &sources) {
            Ok(e) => e,
            Err(e) => return self.config_error(pod, c, e.to_string()),
        };
        let mut mounts = match self
            .ctx
            .volumes
            .container_mounts(pod, c, &self.volume_paths, &env)
        {
            Ok(m) => m,
            Err(e) => return self.config_error(pod, c, e.to_string()),
        };
        match crate::volumes::image_mounts(pod, c, &pulled, &env) {
            Ok(m) => mounts.extend(m),
            Err(e) => return self.config_error(pod, c, e.to_string()),
        }
        match crate::etc_hosts::mount(&self.ctx.config, pod, c, ips).await {
            Ok(m) => mounts.extend(m),
            Err(e) => return self.config_error(pod, c, e.to_string()),
        }
        if let Some(path) = termination::container_path(c) {
            match termination::create_file(&self.ctx.config.root_dir, &self.uid, &c.name) {
                Ok(host) => mounts.push(cri::Mount {
                    container_path: path,
                    host_path: host.display().to_string(),
                    ..Default::default()
                }),
                Err(e) => return self.config_error(pod, c, e.to_string()),
            }
        }
        let image_user = match self.image_user(&image_ref).await {
            Ok(u) => u,
            Err(message) => return self.config_error(pod, c, message),
        };
        if let Err(message) = verify_non_root(pod, c, &image_user) {
            return self.config_error(pod, c, message);
        }
        let mut config = pod_spec::container_config(
            pod,
            c,
            attempt,
            &image_ref,
            &image_user,
            &env,
            mounts,
            &self.ctx.config.root_dir.join("seccomp"),
        );
        if let Some(target) = target {
            pod_spec::join_processes_of(&mut config, target);
        }
        let sandbox_config = match pod_spec::sandbox_config(pod, &self.ctx.config, 0) {
            Ok(s) => s,
            Err(e) => return self.config_error(pod, c, e.to_string()),
        };
        let id = match cri
            .create_container(sandbox_id, config, sandbox_config)
            .await
        {
            Ok(id) => {
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Normal,
                    "Created",
                    format!("Created container: {}", c.name),
                );
                id
            }
            Err(e) => {
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Warning,
                    "Failed",
                    format!("Error: {}", e.message()),
                );
                self.state
                    .waiting
                    .insert(c.name.clone(), ("CreateContainerError".into(), e.message()));
                return;
            }
        };
        if let Err(e) = cri.start_container(&id).await {
            self.events.emit(
                pod,
                Some(&c.name),
                Kind::Warning,
                "Failed",
                format!("Error: {}", e.message()),
            );
            self.state
                .waiting
                .insert(c.name.clone(), ("RunContainerError".into(), e.message()));
            return;
        }
        self.events.emit(
            pod,
            Some(&c.name),
            Kind::Normal,
            "Started",
            format!("Started container {}", c.name),
        );
        // postStart runs before anything else happens to the pod: the status reported next
        // shows the container running only once the hook is done.
        if let Some(handler) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
            let hook = Hook::of(handler, pod_ip, &named_ports(c));
            if let Err(message) = lifecycle::run(&*cri, &id, &hook, None).await {
                tracing::info!(pod = %pod_key(pod), container = %c.name, %message, "postStart hook failed");
                // As upstream, the hook's output stays out of the event (it may hold secrets).
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Warning,
                    "FailedPostStartHook",
                    "PostStartHook failed".into(),
                );
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Normal,
                    "Killing",
                    "FailedPostStartHook".into(),
                );
                let grace =
                    Duration::from_secs(
                        sync::grace_seconds(pod, Some(c), &KillReason::PodFailed) as u64
                    );
                self.kill_container(Some(pod), &id, &c.name, grace, pod_ip)
                    .await;
                self.state
                    .waiting
                    .insert(c.name.clone(), ("PostStartHookError".into(), message));
                return;
            }
        }
        self.state.waiting.remove(&c.name);
        self.applied
            .insert(id.clone(), c.resources.clone().unwrap_or_default());
        tracing::info!(pod = %pod_key(pod), container = %c.name, attempt, "container started");
    }

    /// Every container of the pod waits as ContainerCreating with `message` (the pod cannot
    /// get that far yet); returns whether the message is new, so that its event is sent once
    /// rather than on every sync.
    fn all_creating(
        &mut self,
        spec: &k8s_openapi::api::core::v1::PodSpec,
        message: String,
    ) -> bool {
        let mut new = false;
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let entry = ("ContainerCreating".to_string(), message.clone());
            new |= self.state.waiting.get(&c.name) != Some(&entry);
            self.state.waiting.insert(c.name.clone(), entry);
        }
        new
    }

    /// A container whose configuration cannot be made: CreateContainerConfigError with the
    /// reason, and a Warning event saying so (once per distinct message).
    fn config_error(&mut self, pod: &Pod, c: &Container, message: String) {
        let known = self
            .state
            .waiting
            .get(&c.name)
            .is_some_and(|(r, m)| r == "CreateContainerConfigError" && *m == message);
        if !known {
            self.events.emit(
                pod,
                Some(&c.name),
                Kind::Warning,
                "Failed",
                format!("Error: {message}"),
            );
        }
        self.state.waiting.insert(
            c.name.clone(),
            ("CreateContainerConfigError".into(), message),
        );
    }

    /// The user image `image` runs as, from ImageStatus (what upstream's kubelet asks before
    /// every CreateContainer).
    async fn image_user(&self, image: &str) -> Result<pod_spec::ImageUser, String> {
        let status = self.image_status(image).await?;
        Ok(pod_spec::ImageUser::of_image(status.as_ref()))
    }

    /// The runtime's ImageStatus of `image` (`None`: not present).
    async fn image_status(&self, image: &str) -> Result<Option<cri::Image>, String> {
        self.ctx
            .cri
            .image_status(image)
            .await
            .map_err(|e| e.detail())
    }

    /// Fetches the ConfigMaps and Secrets container `c`'s environment refers to (each
    /// individually, as the Node authorizer allows).
    async fn env_sources(&self, pod: &Pod, c: &Container) -> Result<pod_spec::EnvSources, String> {
        let mut sources = pod_spec::EnvSources::default();
        let (cms, secrets) = pod_spec::EnvSources::wanted(c);
        let Some(client) = self.ctx.client.clone() else {
            return Ok(sources);
        };
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let cm_api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(client.clone(), &ns);
        for name in cms {
            let data = cm_api
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
                .map(|cm| cm.data.unwrap_or_default());
            sources.config_maps.insert(name, data);
        }
        if let Some(services) = &self.ctx.services {
            sources.services = services.for_pod(pod).await.map_err(|e| e.to_string())?;
        }
        let secret_api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, &ns);
        for name in secrets {
            let data = secret_api
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
                .map(|s| {
                    let mut d: BTreeMap<String, String> = s.string_data.unwrap_or_default();
                    d.extend(
                        s.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned())),
                    );
                    d
                });
            sources.secrets.insert(name, data);
        }
        Ok(sources)
    }

    /// Runs the probes that are due on running containers; their verdicts go to the core,
    /// which kills a container whose liveness or startup probe failed.
    async fn probe(&mut self, pod: &Pod, obs: &Observation) {
        let Some(sandbox) = obs.state.ready_sandbox() else {
            return;
        };
        let pod_ip = sandbox.ips.first().cloned().unwrap_or_default();
        let running: Vec<&ContainerObs> = obs
            .state
            .containers
            .iter()
            .filter(|k| k.sandbox_id == sandbox.id && k.state == RunState::Running)
            .collect();
        for k in running {
            let Some(c) = pod_spec::find_container(pod, &k.name).map(Cow::into_owned) else {
                continue;
            };
            let ports = named_ports(&c);
            // CRI reports creation time; the probe clock starts with the container.
            let created = obs.statuses.get(&k.id).map_or(0, |s| s.created_at);
            let age = Duration::from_nanos(
                (Timestamp::now().as_nanosecond() - i128::from(created)).max(0) as u64,
            );
            let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let startup_done = c.startup_probe.is_none()
                || self
                    .state
                    .probes
                    .get(&(k.id.clone(), "startup"))
                    .is_some_and(|p| p.result == Some(true));
            for (kind, probe) in [
                ("startup", &c.startup_probe),
                ("liveness", &c.liveness_probe),
                ("readiness", &c.readiness_probe),
            ] {
                let Some(probe) = probe else { continue };
                if (kind != "startup") != startup_done {
                    continue;
                }
                let state = self
                    .state
                    .probes
                    .entry((k.id.clone(), kind))
                    .or_insert_with(|| ProbeState::new(Timing::of(probe), started));
                let now = Instant::now();
                if !state.due(now) {
                    continue;
                }
                let timeout = state.timing.timeout;
                let outcome = match prober::action(probe, &pod_ip, &ports) {
                    prober::Action::Exec(cmd) => self
                        .ctx
                        .cri
                        .exec_sync(&k.id, cmd, timeout)
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| {
                            if r.exit_code == 0 {
                                Ok(())
                            } else {
                                Err(format!("command exited with {}", r.exit_code))
                            }
                        }),
                    prober::Action::Http {
                        scheme,
                        host,
                        port,
                        path,
                        headers,
                    } => prober::http_get(&scheme, &host, port, &path, &headers, timeout).await,
                    prober::Action::Tcp { host, port } => prober::tcp(&host, port, timeout).await,
                    prober::Action::Grpc {
                        host,
                        port,
                        service,
                    } => prober::grpc(&host, port, &service, timeout).await,
                    prober::Action::Unsupported(why) => Err(why),
                };
                let Some(state) = self.state.probes.get_mut(&(k.id.clone(), kind)) else {
                    continue;
                };
                state.record(Instant::now(), outcome.is_ok());
                if let Err(why) = &outcome {
                    tracing::debug!(pod = %pod_key(pod), container = %c.name, kind, reason = %why, "probe failed");
                    let mut probe_name = kind.to_string();
                    probe_name[..1].make_ascii_uppercase();
                    self.events.emit(
                        pod,
                        Some(&c.name),
                        Kind::Warning,
                        "Unhealthy",
                        format!("{probe_name} probe failed: {why}"),
                    );
                }
            }
        }
    }

    /// The status inputs from an observation: the newest sandbox's containers, newest and
    /// previous instance per name, with waiting reasons and probe verdicts.
    fn status_inputs(&self, pod: &Pod, obs: &Observation) -> Observed {
        let mut observed = Observed {
            sandbox_ips: obs.state.ready_sandbox().map(|s| s.ips.clone()),
            waiting: self.state.waiting.clone(),
            runtime_name: self.ctx.runtime_name.clone(),
            ended: self.ended.as_ref().map(|e| e.ending.clone()),
            resize: self.resize.clone(),
            terminated: self.terminated,
            ..Default::default()
        };
        let Some(sandbox) = obs.state.newest_sandbox() else {
            return observed;
        };
        let mut by_name: BTreeMap<String, Vec<cri::ContainerStatus>> = BTreeMap::new();
        for k in obs
            .state
            .containers
            .iter()
            .filter(|k| k.sandbox_id == sandbox.id)
        {
            if let Some(st) = obs.statuses.get(&k.id) {
                by_name.entry(k.name.clone()).or_default().push(st.clone());
            }
        }
        for (name, mut list) in by_name {
            list.sort_by_key(|s| s.metadata.as_ref().map_or(0, |m| m.attempt));
            if let Some(newest) = list.pop() {
                observed.containers.insert(name.clone(), newest);
            }
            if let Some(prev) = list.pop() {
                observed.previous.insert(name, prev);
            }
        }
        for (name, st) in &observed.containers {
            if let Some(r) = self.applied.get(&st.id) {
                observed.resources.insert(name.clone(), r.clone());
            }
        }
        // Probe verdicts of the current instances: no verdict yet counts as failing.
        let spec = spec_of(pod);
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let Some(id) = observed.containers.get(&c.name).map(|s| s.id.clone()) else {
                continue;
            };
            let passed = |kind: &'static str| {
                self.state
                    .probes
                    .get(&(id.clone(), kind))
                    .is_some_and(|p| p.result == Some(true))
            };
            if c.startup_probe.is_some() && !passed("startup") {
                observed.not_started.insert(c.name.clone());
            }
            if c.readiness_probe.is_some() && !passed("readiness") {
                observed.unready.insert(c.name.clone());
            }
        }
        observed
    }

    async fn report(&mut self, pod: &Pod, obs: &Observation) -> Result<(), RuntimeError> {
        let observed = self.status_inputs(pod, obs);
        let status = pod_status::pod_status(pod, &observed, &self.ctx.host_ip, &now_time());
        if self.last_status.as_ref() == Some(&status) {
            return Ok(());
        }
        let Some(client) = self.ctx.client.clone() else {
            // Standalone: nobody to report to.
            self.last_status = Some(status);
            return Ok(());
        };
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let name = pod.metadata.name.clone().unwrap_or_default();
        if crate::static_pods::is_static(pod)
            && let Err(e) =
                crate::static_pods::ensure_mirror(&client, pod, &self.ctx.config.node_name).await
        {
            tracing::warn!(pod = %pod_key(pod), error = %e, "mirror pod not created");
            return Ok(());
        }
        let patch = pod_status::status_patch(&status);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => self.last_status = Some(status),
            Err(e) => tracing::warn!(pod = %pod_key(pod), error = %e, "pod status update failed"),
        }
        Ok(())
    }

    /// A pod that is over (ended by the kubelet, or terminal in the API server) while still
    /// bound to the node: its Failed status goes out first, then its running containers stop
    /// within the grace period and its sandbox is stopped. Nothing of it starts again; what
    /// it left stays for its status and logs until the pod is deleted.
    async fn finish(&mut self, pod: &Pod) -> Result<(), RuntimeError> {
        let obs = self.observe(Some(pod)).await?;
        self.report(pod, &obs).await?;
        let running = obs
            .state
            .containers
            .iter()
            .any(|k| k.state != RunState::Exited);
        let ready = obs.state.sandboxes.iter().any(|s| s.ready);
        if !running && !ready {
            return Ok(());
        }
        let grace = self
            .ended
            .as_ref()
            .and_then(|e| e.grace_seconds)
            .unwrap_or_else(|| sync::grace_seconds(pod, None, &KillReason::Terminating));
        let deadline = Instant::now() + Duration::from_secs(grace.max(0) as u64);
        self.stop_running(Some(pod), &obs, deadline).await;
        for s in obs.state.sandboxes.iter().filter(|s| s.ready) {
            if let Err(e) = self.ctx.cri.stop_sandbox(&s.id).await {
                tracing::warn!(pod = %pod_key(pod), sandbox = %s.id, error = %e, "stop sandbox");
            }
        }
        self.min_listing = self.ctx.relist.next_listing();
        let obs = self.observe(Some(pod)).await?;
        self.report(pod, &obs).await
    }

    /// Stops the pod's running containers in upstream's order (preStop hooks included), all
    /// by `deadline`.
    async fn stop_running(&self, pod: Option<&Pod>, obs: &Observation, deadline: Instant) {
        let ip = obs
            .state
            .ready_sandbox()
            .and_then(|s| s.ips.first().cloned())
            .unwrap_or_default();
        let waves = sync::termination_waves(pod, &obs.state);
        if let Some(pod) = pod {
            for (_, name) in waves.iter().flatten() {
                self.events.emit(
                    pod,
                    Some(name),
                    Kind::Normal,
                    "Killing",
                    format!("Stopping container {name}"),
                );
            }
        }
        for wave in waves {
            let left = sync::remaining_grace(deadline, Instant::now());
            let stops = wave
                .iter()
                .map(|(id, name)| self.kill_container(pod, id, name, left, &ip));
            futures::future::join_all(stops).await;
        }
    }

    /// Stops everything of the pod in upstream's order within its grace period (preStop
    /// hooks included), removes it from the runtime and confirms the deletion to the API
    /// server.
    async fn terminate(&mut self, pod: Option<&Pod>) {
        self.ctx.end_requests.take(&self.uid);
        let grace = pod.map_or(30, |p| {
            sync::grace_seconds(p, None, &KillReason::Terminating)
        });
        let deadline = Instant::now() + Duration::from_secs(grace as u64);
        let cri = self.ctx.cri.clone();
        let sandboxes: Vec<String> = match self.observe(pod).await {
            Ok(obs) => {
                self.stop_running(pod, &obs, deadline).await;
                // The last status, terminal, before the pod goes (upstream's status manager
                // writes it before the kubelet's final delete).
                if let Some(p) = pod {
                    self.min_listing = self.ctx.relist.next_listing();
                    match self.observe(Some(p)).await {
                        Ok(after) => {
                            self.terminated = true;
                            let _ = self.report(p, &after).await;
                        }
                        Err(e) => {
                            tracing::warn!(pod = %pod_key(p), error = %e, "no final status")
                        }
                    }
                }
                obs.state.sandboxes.iter().map(|s| s.id.clone()).collect()
            }
            Err(e) => {
                tracing::warn!(uid = %self.uid, error = %e, "cannot list the pod's containers");
                cri.list_sandboxes(Some(&self.uid))
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|s| s.id)
                    .collect()
            }
        };
        for id in sandboxes {
            let _ = cri.stop_sandbox(&id).await;
            let _ = cri.remove_sandbox(&id).await;
        }
        if let Some(cg) = &self.ctx.cgroups {
            cg.remove_pod(&self.uid).await;
        }
        self.ctx.volumes.cleanup(&self.uid);
        let (Some(p), Some(client)) = (pod, self.ctx.client.clone()) else {
            return;
        };
        let api: Api<Pod> =
            Api::namespaced(client, p.metadata.namespace.as_deref().unwrap_or("default"));
        // A static pod's API object is its mirror: delete it by name, whatever its UID.
        let uid = if crate::static_pods::is_static(p) {
            None
        } else {
            p.metadata.uid.clone()
        };
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: uid.map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api
            .delete(p.metadata.name.as_deref().unwrap_or(""), &dp)
            .await
        {
            Ok(_) => tracing::info!(pod = %pod_key(p), "pod terminated and deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => {
                tracing::warn!(pod = %pod_key(p), error = %e, "confirming pod deletion failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeCri;

    fn worker(root: &std::path::Path) -> (Worker, Arc<FakeCri>) {
        let mut config = Config::load(&crate::config::Flags::default()).unwrap();
        config.root_dir = root.to_path_buf();
        let fake = Arc::new(FakeCri::default());
        let ctx = Context {
            client: None,
            volumes: crate::volumes::Volumes::new(root, None),
            cri: fake.clone(),
            config: config.clone(),
            host_ip: "10.0.0.1".into(),
            runtime_name: "fake".into(),
            nudges: crate::pleg::Nudges::default(),
            // Every observation lists: tests change the fake between syncs.
            relist: Arc::new(crate::relist::Relist::new(fake.clone(), Duration::ZERO)),
            cgroups: None,
            services: None,
            end_requests: EndRequests::default(),
            pressure: tokio::sync::watch::channel(Default::default()).1,
            allocations: crate::resize::Allocations::in_memory(),
        };
        let w = Worker {
            events: crate::events::Events::new(None, &config.node_name),
            ctx,
            uid: "u1".into(),
            state: sync::WorkerState::default(),
            pull_backoff: BTreeMap::new(),
            volume_paths: BTreeMap::new(),
            volumes_refreshed: None,
            exited: BTreeMap::new(),
            running: BTreeMap::new(),
            sandbox_ips: None,
            cgroup_made: false,
            min_listing: 0,
            last_status: None,
            runtime_class: None,
            terminated: false,
            ended: None,
            applied: BTreeMap::new(),
            cgroup_for: None,
            resize: None,
        };
        (w, fake)
    }

    fn test_pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ns", "uid": "u1" },
            "spec": spec
        }))
        .unwrap()
    }

    /// The calls matching `filter`, in order.
    fn calls(fake: &FakeCri, filter: &[&str]) -> Vec<String> {
        fake.calls()
            .into_iter()
            .filter(|c| filter.iter().any(|f| c.starts_with(f)))
            .collect()
    }

    fn terminated(w: &Worker, name: &str) -> k8s_openapi::api::core::v1::ContainerStateTerminated {
        let st = w.last_status.clone().unwrap();
        st.container_statuses
            .unwrap()
            .into_iter()
            .find(|c| c.name == name)
            .and_then(|c| c.state?.terminated)
            .unwrap_or_else(|| panic!("{name} not terminated"))
    }

    #[tokio::test]
    async fn a_pod_past_its_active_deadline_fails_stops_and_never_restarts() {
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        let mut pod = test_pod(serde_json::json!({
            "terminationGracePeriodSeconds": 3,
            "containers": [{ "name": "a", "image": "busybox:1" }]
        }));
        w.sync(&pod).await.unwrap();
        assert_eq!(
            w.last_status.clone().unwrap().phase.as_deref(),
            Some("Running")
        );
        // The deadline is set (as a spec update may) and has passed since the pod started.
        let spec = pod.spec.as_mut().unwrap();
        spec.active_deadline_seconds = Some(5);
        w.last_status.as_mut().unwrap().start_time =
            Some(Time(Timestamp::now() - std::time::Duration::from_secs(6)));
        w.sync(&pod).await.unwrap();
        let st = w.last_status.clone().unwrap();
        assert_eq!(
            (
                st.phase.as_deref(),
                st.reason.as_deref(),
                st.message.as_deref()
            ),
            (
                Some("Failed"),
                Some(crate::deadline::REASON),
                Some(crate::deadline::MESSAGE)
            )
        );
        assert_eq!(
            calls(&fake, &["StopContainer", "StopPodSandbox"]),
            ["StopContainer a 3s", "StopPodSandbox"]
        );
        // Later syncs start nothing again, and the phase stays Failed.
        let before = calls(
            &fake,
            &["RunPodSandbox", "CreateContainer", "StartContainer"],
        );
        w.sync(&pod).await.unwrap();
        w.sync(&pod).await.unwrap();
        assert_eq!(
            calls(
                &fake,
                &["RunPodSandbox", "CreateContainer", "StartContainer"]
            ),
            before
        );
        assert_eq!(
            w.last_status.clone().unwrap().phase.as_deref(),
            Some("Failed")
        );
    }

    #[tokio::test]
    async fn a_pod_terminal_in_the_api_server_is_not_started() {
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        let mut pod = test_pod(serde_json::json!({
            "containers": [{ "name": "a", "image": "busybox:1" }]
        }));
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Failed".into()),
            reason: Some("DeadlineExceeded".into()),
            ..Default::default()
        });
        w.sync(&pod).await.unwrap();
        assert!(calls(&fake, &["RunPodSandbox", "CreateContainer"]).is_empty());
        let st = w.last_status.clone().unwrap();
        assert_eq!((st.phase.as_deref(), st.reason), (Some("Failed"), None));
    }

    #[tokio::test]
    async fn an_end_request_fails_the_pod_with_its_reason_condition_and_grace() {
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        let pod = test_pod(serde_json::json!({
            "terminationGracePeriodSeconds": 30,
            "containers": [{ "name": "a", "image": "busybox:1" }]
        }));
        w.sync(&pod).await.unwrap();
        let condition = k8s_openapi::api::core::v1::PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            reason: Some("TerminationByKubelet".into()),
            message: Some("evicted".into()),
            ..Default::default()
        };
        w.ctx.end_requests.request(
            "u1",
            EndRequest {
                ending: pod_status::Ending {
                    reason: "Evicted".into(),
                    message: "The node was low on resource: memory.".into(),
                    condition: Some(condition),
                },
                grace_seconds: Some(0),
            },
        );
        w.sync(&pod).await.unwrap();
        let st = w.last_status.clone().unwrap();
        assert_eq!(
            (st.phase.as_deref(), st.reason.as_deref()),
            (Some("Failed"), Some("Evicted"))
        );
        let c = st
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "DisruptionTarget")
            .unwrap();
        assert_eq!(c.reason.as_deref(), Some("TerminationByKubelet"));
        // Grace 0 is raised to upstream's 2 s floor, not the pod's 30 s.
        assert_eq!(calls(&fake, &["StopContainer"]), ["StopContainer a 2s"]);
        // Asked again (the eviction manager may, before the API shows the pod Failed): the
        // request is consumed, nothing is left behind or stopped twice.
        let again = w.ctx.end_requests.take("u1");
        assert!(again.is_none());
        w.ctx.end_requests.request(
            "u1",
            EndRequest {
                ending: crate::eviction::ending("again".into()),
                grace_seconds: Some(0),
            },
        );
        w.sync(&pod).await.unwrap();
        assert!(w.ctx.end_requests.take("u1").is_none());
        assert_eq!(
            w.last_status.clone().unwrap().reason.as_deref(),
            Some("Evicted")
        );
        assert_eq!(calls(&fake, &["StopContainer"]), ["StopContainer a 2s"]);
    }

    #[tokio::test]
    async fn a_resize_updates_running_containers_restarts_where_asked_and_waits_when_deferred() {
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        let pod = |cpu: &str, memory: &str| {
            test_pod(serde_json::json!({
                "containers": [
                    { "name": "a", "image": "busybox:1",
                      "resources": { "requests": { "cpu": cpu }, "limits": { "cpu": "1" } } },
                    { "name": "b", "image": "busybox:1",
                      "resources": { "requests": { "memory": "32Mi" }, "limits": { "memory": memory } },
                      "resizePolicy": [{ "resourceName": "memory", "restartPolicy": "RestartContainer" }] }
                ]
            }))
        };
        let first = pod("100m", "64Mi");
        w.ctx.allocations.admit("u1", &first);
        let p = w.allocated(Arc::new(first));
        w.sync(&p).await.unwrap();
        assert!(calls(&fake, &["UpdateContainerResources", "StopContainer"]).is_empty());
        // Admitted: a's CPU is updated in place, b (memory, RestartContainer) is stopped to be
        // started again with its new limit.
        let second = pod("500m", "128Mi");
        w.ctx.allocations.resolve("u1", &second, Ok(()));
        let p = w.allocated(Arc::new(second));
        w.sync(&p).await.unwrap();
        let mut done = calls(&fake, &["UpdateContainerResources", "StopContainer"]);
        done.sort();
        assert_eq!(
            done,
            [
                "StopContainer b 30s",
                "UpdateContainerResources a shares=512 quota=100000 memory=0"
            ]
        );
        let st = w.last_status.clone().unwrap();
        let a = st
            .container_statuses
            .unwrap()
            .into_iter()
            .find(|c| c.name == "a")
            .unwrap();
        assert_eq!(
            a.allocated_resources.unwrap()["cpu"].0,
            "500m",
            "allocatedResources follow the allocation"
        );
        assert!(
            st.conditions
                .unwrap()
                .iter()
                .all(|c| !c.type_.starts_with("PodResize")),
            "nothing pending or in progress once actuated"
        );
        // Deferred: nothing changes on the node, and the pod says why.
        let third = pod("1500m", "128Mi");
        w.ctx.allocations.resolve(
            "u1",
            &third,
            Err(crate::resize::Pending {
                reason: "Deferred",
                message: "no room".into(),
            }),
        );
        let before = fake.calls().len();
        let p = w.allocated(Arc::new(third));
        w.sync(&p).await.unwrap();
        assert!(
            fake.calls()[before..]
                .iter()
                .all(|c| !c.starts_with("UpdateContainerResources")),
            "a deferred resize was actuated"
        );
        let conditions = w.last_status.clone().unwrap().conditions.unwrap();
        let pending = conditions
            .iter()
            .find(|c| c.type_ == "PodResizePending")
            .unwrap();
        assert_eq!(
            (pending.reason.as_deref(), pending.message.as_deref()),
            (Some("Deferred"), Some("no room"))
        );
    }

    #[tokio::test]
    async fn post_start_runs_right_after_start_and_before_the_next_container() {
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        let pod = test_pod(serde_json::json!({
            "containers": [
                { "name": "a", "image": "busybox:1",
                  "lifecycle": { "postStart": { "exec": { "command": ["touch", "/ready"] } } } },
                { "name": "b", "image": "busybox:1" }
            ]
        }));
        w.sync(&pod).await.unwrap();
        assert_eq!(
            calls(
                &fake,
                &[
                    "RunPodSandbox",
                    "CreateContainer",
                    "StartContainer",
                    "ExecSync"
                ]
            ),
            [
                "RunPodSandbox",
                "CreateContainer a",
                "StartContainer a",
                "ExecSync a touch /ready 0s",
                "CreateContainer b",
                "StartContainer b"
            ]
        );
        // Every container got its termination message file at the default path.
        let m = fake.mounts("a");
        let msg = m
            .iter()
            .find(|m| m.container_path == "/dev/termination-log")
            .unwrap();
        assert!(
            msg.host_path.starts_with(
                &root
                    .path()
                    .join("pods/u1/containers/a")
                    .display()
                    .to_string()
            )
        );
    }

    #[tokio::test]
    async fn a_failing_post_start_kills_the_container_which_then_restarts() {
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        fake.exec_exits("false", 1);
        let pod = test_pod(serde_json::json!({
            "terminationGracePeriodSeconds": 5,
            "containers": [
                { "name": "a", "image": "busybox:1",
                  "lifecycle": { "postStart": { "exec": { "command": ["false"] } } } }
            ]
        }));
        w.sync(&pod).await.unwrap();
        assert_eq!(
            calls(&fake, &["StartContainer", "ExecSync", "StopContainer"]),
            [
                "StartContainer a",
                "ExecSync a false 0s",
                "StopContainer a 5s"
            ]
        );
        let (reason, message) = w.state.waiting["a"].clone();
        assert_eq!(reason, "PostStartHookError");
        assert!(
            message.contains("command 'false' exited with 1"),
            "{message}"
        );
        let s = w.last_status.clone().unwrap().container_statuses.unwrap();
        assert!(
            s[0].state.clone().unwrap().running.is_none(),
            "never reported running"
        );
        // The next sync restarts it (restartPolicy Always).
        w.sync(&pod).await.unwrap();
        assert_eq!(
            calls(&fake, &["StartContainer"]),
            ["StartContainer a", "StartContainer a"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn termination_runs_pre_stop_hooks_in_order_within_the_grace_period() {
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        let mut pod = test_pod(serde_json::json!({
            "terminationGracePeriodSeconds": 10,
            "initContainers": [
                { "name": "side", "image": "busybox:1", "restartPolicy": "Always",
                  "lifecycle": { "preStop": { "exec": { "command": ["drain"] } } } }
            ],
            "containers": [
                { "name": "app", "image": "busybox:1",
                  "lifecycle": { "preStop": { "sleep": { "seconds": 3 } } } }
            ]
        }));
        w.sync(&pod).await.unwrap();
        assert_eq!(
            calls(&fake, &["StartContainer"]),
            ["StartContainer side", "StartContainer app"]
        );
        pod.metadata.deletion_grace_period_seconds = Some(10);
        let t = Instant::now();
        w.terminate(Some(&pod)).await;
        // The app first: its 3 s preStop sleep comes out of its 10 s; then the sidecar, its
        // preStop exec bounded by what is left of the pod's grace period.
        assert_eq!(
            calls(
                &fake,
                &[
                    "StopContainer",
                    "ExecSync",
                    "StopPodSandbox",
                    "RemovePodSandbox"
                ]
            ),
            [
                "StopContainer app 7s",
                "ExecSync side drain 7s",
                "StopContainer side 7s",
                "StopPodSandbox",
                "RemovePodSandbox"
            ]
        );
        assert_eq!(t.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn pre_stop_http_get_reaches_its_server_and_a_failing_pre_stop_still_stops() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            // A 500 is still a hook that ran: upstream ignores the status code.
            s.write_all(b"HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        fake.exec_exits("fail", 1);
        let pod = test_pod(serde_json::json!({
            "terminationGracePeriodSeconds": 5,
            "containers": [
                { "name": "web", "image": "busybox:1",
                  "lifecycle": { "preStop": { "httpGet": { "host": "127.0.0.1", "port": port, "path": "/bye" } } } },
                { "name": "bad", "image": "busybox:1",
                  "lifecycle": { "preStop": { "exec": { "command": ["fail"] } } } }
            ]
        }));
        w.sync(&pod).await.unwrap();
        w.terminate(Some(&pod)).await;
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /bye HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("User-Agent: kube-lifecycle/"), "{request}");
        let stops = calls(&fake, &["StopContainer"]);
        assert_eq!(stops.len(), 2, "{stops:?}");
        assert!(stops.iter().any(|c| c.starts_with("StopContainer bad")));
        assert!(stops.iter().any(|c| c.starts_with("StopContainer web")));
    }

    #[tokio::test]
    async fn termination_messages_come_from_the_file_or_the_log_tail() {
        let root = tempfile::tempdir().unwrap();
        let (mut w, fake) = worker(root.path());
        let pod = test_pod(serde_json::json!({
            "restartPolicy": "Never",
            "containers": [
                { "name": "file", "image": "busybox:1", "terminationMessagePath": "/tmp/msg" },
                { "name": "logs", "image": "busybox:1",
                  "terminationMessagePolicy": "FallbackToLogsOnError" }
            ]
        }));
        w.sync(&pod).await.unwrap();
        let file = fake.mounts("file");
        let host = &file
            .iter()
            .find(|m| m.container_path == "/tmp/msg")
            .unwrap()
            .host_path;
        std::fs::write(host, "all done").unwrap();
        let log = root.path().join("logs.log");
        std::fs::write(
            &log,
            "2026-01-01T00:00:00.000000000Z stderr F fatal: no config\n",
        )
        .unwrap();
        fake.log_to("logs", &log);
        fake.exit("file", 0);
        fake.exit("logs", 2);
        w.sync(&pod).await.unwrap();
        assert_eq!(terminated(&w, "file").message.as_deref(), Some("all done"));
        assert_eq!(
            terminated(&w, "logs").message.as_deref(),
            Some("fatal: no config\n")
        );
    }

    #[test]
    fn pull_backoff_doubles_to_five_minutes() {
        let t = Instant::now();
        let mut b = PullBackoff::default();
        assert!(b.ready(t));
        assert_eq!(b.fail(t), Duration::from_secs(10));
        assert!(!b.ready(t + Duration::from_secs(5)));
        assert!(b.ready(t + Duration::from_secs(10)));
        assert_eq!(b.fail(t), Duration::from_secs(20));
        for _ in 0..10 {
            b.fail(t);
        }
        assert_eq!(b.fail(t), Duration::from_secs(300));
    }

    #[test]
    fn run_as_non_root_checks_the_explicit_user_then_the_image_user() {
        use pod_spec::ImageUser;
        let pod = |sc: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "p", "namespace": "ns" },
                "spec": { "securityContext": sc, "containers": [{ "name": "c" }] }
            }))
            .unwrap()
        };
        let check = |p: &Pod, user: ImageUser| {
            verify_non_root(p, &p.spec.as_ref().unwrap().containers[0], &user)
        };
        let non_root = pod(serde_json::json!({ "runAsNonRoot": true }));
        assert!(check(&non_root, ImageUser::Uid(1000)).is_ok());
        let root = check(&non_root, ImageUser::default()).unwrap_err();
        assert!(root.starts_with("container has runAsNonRoot and image will run as root"));
        let named = check(&non_root, ImageUser::Name("www-data".into())).unwrap_err();
        assert!(named.contains("non-numeric user (www-data)"), "{named}");
        let explicit = pod(serde_json::json!({ "runAsNonRoot": true, "runAsUser": 1000 }));
        assert!(check(&explicit, ImageUser::Name("www-data".into())).is_ok());
        assert!(check(&pod(serde_json::json!({})), ImageUser::default()).is_ok());
    }
}
