//! One worker per pod UID: drives the pod's desired spec against what the runtime has, through
//! CRI, and reports the pod's status.
//!
//! A worker moves through explicit phases: *sync* (make the sandbox, pull images, create and
//! start containers, restart exited ones per `restartPolicy` with backoff), *terminating* (the
//! pod is being deleted: stop containers within the grace period, stop and remove the sandbox)
//! and *terminated* (confirm the deletion to the API server and end). Everything the worker
//! needs to know about the runtime it finds by the pod UID label, so a restarted kubelet adopts
//! running pods and continues their restart counts.

use std::collections::BTreeMap;
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
use crate::pod_spec::{self, labels};
use crate::pod_status::{self, Observed};
use crate::prober::{self, Action, ProbeState, Timing};
use crate::runtime::Runtime;

/// Restart backoff: 10 s doubling to 300 s; reset after 10 minutes of clean running.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    delay: Option<Duration>,
    until: Option<Instant>,
}

impl Backoff {
    const INITIAL: Duration = Duration::from_secs(10);
    const MAX: Duration = Duration::from_secs(300);
    const RESET_AFTER: Duration = Duration::from_secs(600);

    /// Records a failure at `now`; returns the delay before the next attempt.
    pub fn fail(&mut self, now: Instant, ran_for: Duration) -> Duration {
        let next = match self.delay {
            Some(_) if ran_for >= Self::RESET_AFTER => Self::INITIAL,
            Some(d) => (d * 2).min(Self::MAX),
            None => Self::INITIAL,
        };
        self.delay = Some(next);
        self.until = Some(now + next);
        next
    }

    /// Whether an attempt may be made at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| now >= u)
    }
}

/// How often API-backed volumes are re-read.
const VOLUME_REFRESH: Duration = Duration::from_secs(5);

/// Where one container stands after a sync step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Running,
    Completed,
    Failed,
    Waiting,
}

/// Shared facts every pod worker needs.
#[derive(Clone)]
pub struct Context {
    /// `None` in standalone mode (static pods only, no API server).
    pub client: Option<kube::Client>,
    pub volumes: crate::volumes::Volumes,
    pub runtime: Runtime,
    pub config: Config,
    pub host_ip: String,
    pub runtime_name: String,
    /// Wake-ups from the runtime's container events ([`crate::pleg`]).
    pub nudges: crate::pleg::Nudges,
}

fn uid_filter(uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(labels::POD_UID.to_string(), uid.to_string())])
}

struct Worker {
    ctx: Context,
    uid: String,
    backoff: BTreeMap<String, Backoff>,
    pull_backoff: BTreeMap<String, Backoff>,
    waiting: BTreeMap<String, (String, String)>,
    /// The exited container instance already counted per container name.
    crashed: BTreeMap<String, String>,
    /// Host paths of the pod's volumes, and when they were last refreshed.
    volume_paths: BTreeMap<String, std::path::PathBuf>,
    volumes_refreshed: Option<Instant>,
    /// Probe states per (container ID, kind).
    probes: BTreeMap<(String, &'static str), ProbeState>,
    last_status: Option<k8s_openapi::api::core::v1::PodStatus>,
    /// The pod's RuntimeClass and its handler, once resolved.
    runtime_class: Option<(String, String)>,
    events: crate::events::Events,
}

/// Runs the worker of one pod until the pod is gone. `updates` carries the newest pod object,
/// `None` once the pod was deleted from the API server.
pub async fn run(ctx: Context, uid: String, mut updates: watch::Receiver<Option<Pod>>) {
    let events = crate::events::Events::new(ctx.client.clone(), &ctx.config.node_name);
    let mut w = Worker {
        ctx,
        uid,
        backoff: BTreeMap::new(),
        pull_backoff: BTreeMap::new(),
        waiting: BTreeMap::new(),
        crashed: BTreeMap::new(),
        probes: BTreeMap::new(),
        volume_paths: BTreeMap::new(),
        volumes_refreshed: None,
        last_status: None,
        runtime_class: None,
        events,
    };
    // The last pod object seen: a pod that vanished (deleted from the API, or its static
    // manifest removed) is still terminated with its own spec and grace period.
    let mut last: Option<Pod> = None;
    let nudge = w.ctx.nudges.register(&w.uid);
    loop {
        let pod = updates.borrow_and_update().clone();
        match pod {
            Some(p) if p.metadata.deletion_timestamp.is_none() => {
                if let Err(e) = w.sync(&p).await {
                    tracing::warn!(pod = %pod_key(&p), error = %e, "pod sync failed");
                }
                last = Some(p);
            }
            other => {
                w.terminate(other.as_ref().or(last.as_ref())).await;
                w.ctx.nudges.unregister(&w.uid);
                return;
            }
        }
        // Relist: re-check the runtime every second even without a spec change (PLEG), and at
        // once when the runtime reports an event of this pod.
        tokio::select! {
            _ = updates.changed() => {}
            _ = nudge.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
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

impl Worker {
    async fn sandboxes(&self) -> Result<Vec<cri::PodSandbox>, crate::runtime::RuntimeError> {
        let mut c = self.ctx.runtime.runtime_client();
        let filter = cri::PodSandboxFilter {
            label_selector: uid_filter(&self.uid).into_iter().collect(),
            ..Default::default()
        };
        let resp = self
            .ctx
            .runtime
            .call_with(
                "ListPodSandbox",
                None,
                c.list_pod_sandbox(cri::ListPodSandboxRequest {
                    filter: Some(filter),
                }),
            )
            .await?;
        Ok(resp.items)
    }

    async fn containers(&self) -> Result<Vec<cri::Container>, crate::runtime::RuntimeError> {
        let mut c = self.ctx.runtime.runtime_client();
        let filter = cri::ContainerFilter {
            label_selector: uid_filter(&self.uid).into_iter().collect(),
            ..Default::default()
        };
        let resp = self
            .ctx
            .runtime
            .call_with(
                "ListContainers",
                None,
                c.list_containers(cri::ListContainersRequest {
                    filter: Some(filter),
                }),
            )
            .await?;
        Ok(resp.containers)
    }

    async fn ensure_sandbox(
        &mut self,
        pod: &Pod,
        handler: &str,
    ) -> Result<(String, Vec<String>), crate::runtime::RuntimeError> {
        let all = self.sandboxes().await?;
        let ready = all
            .iter()
            .filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
            .max_by_key(|s| s.created_at);
        let mut rt = self.ctx.runtime.runtime_client();
        let id = match ready {
            Some(s) => s.id.clone(),
            None => {
                // A new sandbox: the old ones (and their containers) go first.
                for s in &all {
                    let _ = self
                        .ctx
                        .runtime
                        .call_with(
                            "StopPodSandbox",
                            Some(Duration::from_secs(60)),
                            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                                pod_sandbox_id: s.id.clone(),
                            }),
                        )
                        .await;
                    let _ = self
                        .ctx
                        .runtime
                        .call_with(
                            "RemovePodSandbox",
                            Some(Duration::from_secs(60)),
                            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                                pod_sandbox_id: s.id.clone(),
                            }),
                        )
                        .await;
                }
                let attempt = all
                    .iter()
                    .filter_map(|s| s.metadata.as_ref().map(|m| m.attempt + 1))
                    .max()
                    .unwrap_or(0);
                let config = pod_spec::sandbox_config(pod, &self.ctx.config, attempt);
                let resp = self
                    .ctx
                    .runtime
                    .call_with(
                        "RunPodSandbox",
                        Some(Duration::from_secs(120)),
                        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                            config: Some(config),
                            runtime_handler: handler.to_string(),
                        }),
                    )
                    .await?;
                tracing::info!(pod = %pod_key(pod), sandbox = %resp.pod_sandbox_id, "sandbox created");
                resp.pod_sandbox_id
            }
        };
        let status = self
            .ctx
            .runtime
            .call_with(
                "PodSandboxStatus",
                None,
                rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.clone(),
                    verbose: false,
                }),
            )
            .await?;
        let ips = status
            .status
            .and_then(|s| s.network)
            .map(|n| {
                std::iter::once(n.ip)
                    .chain(n.additional_ips.into_iter().map(|p| p.ip))
                    .filter(|ip| !ip.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Ok((id, ips))
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
        let mut ic = self.ctx.runtime.image_client();
        let spec = cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        };
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
            let r = self
                .ctx
                .runtime
                .call_with(
                    "PullImage",
                    Some(Duration::from_secs(600)),
                    ic.pull_image(cri::PullImageRequest {
                        image: Some(spec.clone()),
                        auth,
                        sandbox_config: None,
                    }),
                )
                .await;
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
                Ok(r.image_ref)
            }
            Err(e) => {
                self.pull_backoff
                    .entry(c.name.clone())
                    .or_default()
                    .fail(now, Duration::ZERO);
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

    async fn sync(&mut self, pod: &Pod) -> Result<(), crate::runtime::RuntimeError> {
        let spec = pod.spec.clone().unwrap_or_default();
        let handler = match self.runtime_handler(pod).await {
            Ok(h) => h,
            Err(message) => {
                // No sandbox without its runtime: every container waits, with the reason.
                tracing::warn!(pod = %pod_key(pod), %message, "cannot create the pod sandbox");
                self.all_creating(&spec, message);
                return self.report(pod, "", None).await;
            }
        };
        let (sandbox_id, ips) = match self.ensure_sandbox(pod, &handler).await {
            Ok(s) => s,
            Err(e) => {
                let message = format!("Failed to create pod sandbox: {}", e.detail());
                if self.all_creating(&spec, message.clone()) {
                    self.events
                        .emit(pod, None, Kind::Warning, "FailedCreatePodSandBox", message);
                }
                self.report(pod, "", None).await?;
                return Err(e);
            }
        };
        let restart_policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        // Volumes first, refreshed every few seconds so that ConfigMap and Secret changes and
        // token rotation reach the files.
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
                    return self.report(pod, &sandbox_id, Some(ips)).await;
                }
                Err(e) => tracing::warn!(pod = %pod_key(pod), error = %e, "volume refresh failed"),
            }
        }
        let containers = self.containers().await?;
        // Init containers in order: a regular one must complete before the next starts; a
        // sidecar (restartPolicy Always) must be running. App containers wait for all of them.
        let mut initialized = true;
        for c in spec.init_containers.iter().flatten() {
            let sidecar = c.restart_policy.as_deref() == Some("Always");
            let mode = if sidecar {
                "Always"
            } else if restart_policy == "Never" {
                "Never"
            } else {
                "OnFailure"
            };
            match self
                .step(pod, &sandbox_id, &ips, c, &containers, mode)
                .await?
            {
                Step::Running if sidecar => {}
                Step::Completed if !sidecar => {}
                _ => {
                    initialized = false;
                    break;
                }
            }
        }
        if initialized {
            for c in &spec.containers {
                self.step(pod, &sandbox_id, &ips, c, &containers, &restart_policy)
                    .await?;
            }
        } else {
            for c in &spec.containers {
                self.waiting
                    .insert(c.name.clone(), ("PodInitializing".into(), String::new()));
            }
        }
        self.probe(pod, &sandbox_id, &ips).await?;
        self.report(pod, &sandbox_id, Some(ips)).await
    }

    /// Brings one container towards running under restart mode `mode` (Always, OnFailure,
    /// Never): creates and starts it when it has no instance, restarts an exited instance after
    /// its backoff when the mode says so.
    async fn step(
        &mut self,
        pod: &Pod,
        sandbox_id: &str,
        ips: &[String],
        c: &Container,
        containers: &[cri::Container],
        mode: &str,
    ) -> Result<Step, crate::runtime::RuntimeError> {
        let mut rt = self.ctx.runtime.runtime_client();
        let newest = containers
            .iter()
            .filter(|k| {
                k.pod_sandbox_id == sandbox_id
                    && k.metadata.as_ref().is_some_and(|m| m.name == c.name)
            })
            .max_by_key(|k| k.metadata.as_ref().map_or(0, |m| m.attempt));
        let attempt = match newest {
            Some(k)
                if k.state == cri::ContainerState::ContainerRunning as i32
                    || k.state == cri::ContainerState::ContainerCreated as i32 =>
            {
                self.waiting.remove(&c.name);
                return Ok(Step::Running);
            }
            Some(k) => {
                let st = self
                    .ctx
                    .runtime
                    .call_with(
                        "ContainerStatus",
                        None,
                        rt.container_status(cri::ContainerStatusRequest {
                            container_id: k.id.clone(),
                            verbose: false,
                        }),
                    )
                    .await?;
                let exit = st.status.as_ref().map_or(0, |s| s.exit_code);
                let restart = match mode {
                    "Never" => false,
                    "OnFailure" => exit != 0,
                    _ => true,
                };
                if !restart {
                    self.waiting.remove(&c.name);
                    return Ok(if exit == 0 {
                        Step::Completed
                    } else {
                        Step::Failed
                    });
                }
                let ran = st.status.as_ref().map_or(Duration::ZERO, |s| {
                    Duration::from_nanos((s.finished_at - s.started_at).max(0) as u64)
                });
                let now = Instant::now();
                // Each exited instance counts once against the backoff.
                if self.crashed.get(&c.name) != Some(&k.id) {
                    self.crashed.insert(c.name.clone(), k.id.clone());
                    let delay = self
                        .backoff
                        .entry(c.name.clone())
                        .or_default()
                        .fail(now, ran);
                    let message = format!(
                        "back-off {}s restarting failed container={} pod={}",
                        delay.as_secs(),
                        c.name,
                        pod_key(pod)
                    );
                    self.events.emit(
                        pod,
                        Some(&c.name),
                        Kind::Warning,
                        "BackOff",
                        format!(
                            "Back-off restarting failed container {} in pod {}",
                            c.name,
                            pod_key(pod)
                        ),
                    );
                    self.waiting
                        .insert(c.name.clone(), ("CrashLoopBackOff".into(), message));
                }
                if !self.backoff.get(&c.name).is_none_or(|b| b.ready(now)) {
                    return Ok(Step::Waiting);
                }
                k.metadata.as_ref().map_or(0, |m| m.attempt + 1)
            }
            None => 0,
        };
        let image_ref = match self.ensure_image(pod, c).await {
            Ok(r) => r,
            Err(reason) => {
                self.waiting.insert(c.name.clone(), reason);
                return Ok(Step::Waiting);
            }
        };
        let sources = match self.env_sources(pod, c).await {
            Ok(s) => s,
            Err(e) => {
                self.config_error(pod, c, e.to_string());
                return Ok(Step::Waiting);
            }
        };
        let env = match pod_spec::env(
            pod,
            c,
            ips.first().map_or("", String::as_str),
            &self.ctx.host_ip,
            &sources,
        ) {
            Ok(e) => e,
            Err(e) => {
                self.config_error(pod, c, e.to_string());
                return Ok(Step::Waiting);
            }
        };
        let mounts = match self
            .ctx
            .volumes
            .container_mounts(pod, c, &self.volume_paths, &env)
        {
            Ok(m) => m,
            Err(e) => {
                self.config_error(pod, c, e.to_string());
                return Ok(Step::Waiting);
            }
        };
        let image_user = match self.image_user(&image_ref).await {
            Ok(u) => u,
            Err(message) => {
                self.config_error(pod, c, message);
                return Ok(Step::Waiting);
            }
        };
        if let Err(message) = verify_non_root(pod, c, &image_user) {
            self.config_error(pod, c, message);
            return Ok(Step::Waiting);
        }
        let config = pod_spec::container_config(
            pod,
            c,
            attempt,
            &image_ref,
            &image_user,
            &env,
            mounts,
            &self.ctx.config.root_dir.join("seccomp"),
        );
        let sandbox_config = pod_spec::sandbox_config(pod, &self.ctx.config, 0);
        let created = self
            .ctx
            .runtime
            .call_with(
                "CreateContainer",
                Some(Duration::from_secs(120)),
                rt.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox_id.to_string(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                }),
            )
            .await;
        let id = match created {
            Ok(r) => {
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Normal,
                    "Created",
                    format!("Created container: {}", c.name),
                );
                r.container_id
            }
            Err(e) => {
                self.events.emit(
                    pod,
                    Some(&c.name),
                    Kind::Warning,
                    "Failed",
                    format!("Error: {}", e.detail()),
                );
                self.waiting.insert(
                    c.name.clone(),
                    ("CreateContainerError".into(), e.to_string()),
                );
                return Ok(Step::Waiting);
            }
        };
        if let Err(e) = self
            .ctx
            .runtime
            .call_with(
                "StartContainer",
                Some(Duration::from_secs(120)),
                rt.start_container(cri::StartContainerRequest { container_id: id }),
            )
            .await
        {
            self.events.emit(
                pod,
                Some(&c.name),
                Kind::Warning,
                "Failed",
                format!("Error: {}", e.detail()),
            );
            self.waiting
                .insert(c.name.clone(), ("RunContainerError".into(), e.to_string()));
            return Ok(Step::Waiting);
        }
        self.events.emit(
            pod,
            Some(&c.name),
            Kind::Normal,
            "Started",
            format!("Started container {}", c.name),
        );
        self.waiting.remove(&c.name);
        tracing::info!(pod = %pod_key(pod), container = %c.name, attempt, "container started");
        Ok(Step::Running)
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
            new |= self.waiting.get(&c.name) != Some(&entry);
            self.waiting.insert(c.name.clone(), entry);
        }
        new
    }

    /// A container whose configuration cannot be made: CreateContainerConfigError with the
    /// reason, and a Warning event saying so (once per distinct message).
    fn config_error(&mut self, pod: &Pod, c: &Container, message: String) {
        let known = self
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
        self.waiting.insert(
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
        let mut ic = self.ctx.runtime.image_client();
        let status = self
            .ctx
            .runtime
            .call_with(
                "ImageStatus",
                None,
                ic.image_status(cri::ImageStatusRequest {
                    image: Some(cri::ImageSpec {
                        image: image.to_string(),
                        ..Default::default()
                    }),
                    verbose: false,
                }),
            )
            .await
            .map_err(|e| e.detail())?;
        Ok(status.image)
    }

    /// Fetches the ConfigMaps and Secrets container `c`'s environment refers to (each
    /// individually, as the Node authorizer allows).
    async fn env_sources(
        &self,
        pod: &Pod,
        c: &Container,
    ) -> Result<pod_spec::EnvSources, kube::Error> {
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
                .await?
                .map(|cm| cm.data.unwrap_or_default());
            sources.config_maps.insert(name, data);
        }
        sources.services = self.services(&client, pod, &ns).await?;
        let secret_api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, &ns);
        for name in secrets {
            let data = secret_api.get_opt(&name).await?.map(|s| {
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

    /// The Services whose variables a container of `pod` gets: the `kubernetes` Service of
    /// the default namespace always, and with `enableServiceLinks` (the default) every Service
    /// of the pod's namespace, like upstream.
    async fn services(
        &self,
        client: &kube::Client,
        pod: &Pod,
        ns: &str,
    ) -> Result<Vec<k8s_openapi::api::core::v1::Service>, kube::Error> {
        use k8s_openapi::api::core::v1::Service;
        let links = pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let mut out: Vec<Service> = Vec::new();
        if links {
            let api: Api<Service> = Api::namespaced(client.clone(), ns);
            out = api.list(&kube::api::ListParams::default()).await?.items;
        }
        if ns != "default" || !links {
            let api: Api<Service> = Api::namespaced(client.clone(), "default");
            if let Some(k) = api.get_opt("kubernetes").await? {
                out.retain(|s| s.metadata.name.as_deref() != Some("kubernetes"));
                out.push(k);
            }
        }
        Ok(out)
    }

    /// Runs the probes that are due on running containers; a failed liveness or startup probe
    /// stops the container (the sync then restarts it per the restart policy).
    async fn probe(
        &mut self,
        pod: &Pod,
        sandbox_id: &str,
        ips: &[String],
    ) -> Result<(), crate::runtime::RuntimeError> {
        let spec = pod.spec.clone().unwrap_or_default();
        let grace = spec.termination_grace_period_seconds.unwrap_or(30);
        let pod_ip = ips.first().cloned().unwrap_or_default();
        let mut rt = self.ctx.runtime.runtime_client();
        let running: Vec<cri::Container> = self
            .containers()
            .await?
            .into_iter()
            .filter(|k| {
                k.pod_sandbox_id == sandbox_id
                    && k.state == cri::ContainerState::ContainerRunning as i32
            })
            .collect();
        let live: std::collections::BTreeSet<String> =
            running.iter().map(|k| k.id.clone()).collect();
        self.probes.retain(|(id, _), _| live.contains(id));
        for k in running {
            let Some(c) = spec
                .containers
                .iter()
                .find(|c| k.metadata.as_ref().is_some_and(|m| m.name == c.name))
            else {
                continue;
            };
            let ports: Vec<(String, i32)> = c
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone()?, p.container_port)))
                .collect();
            // CRI reports creation time; the probe clock starts with the container.
            let age = Duration::from_nanos(
                (Timestamp::now().as_nanosecond() - i128::from(k.created_at)).max(0) as u64,
            );
            let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let startup_done = c.startup_probe.is_none()
                || self
                    .probes
                    .get(&(k.id.clone(), "startup"))
                    .is_some_and(|p| p.result == Some(true));
            for (kind, probe) in [
                ("startup", &c.startup_probe),
                ("liveness", &c.liveness_probe),
                ("readiness", &c.readiness_probe),
            ] {
                let Some(probe) = probe else { continue };
                if kind != "startup" && !startup_done {
                    continue;
                }
                if kind == "startup" && startup_done {
                    continue;
                }
                let state = self
                    .probes
                    .entry((k.id.clone(), kind))
                    .or_insert_with(|| ProbeState::new(Timing::of(probe), started));
                let now = Instant::now();
                if !state.due(now) {
                    continue;
                }
                let timeout = state.timing.timeout;
                let outcome = match prober::action(probe, &pod_ip, &ports) {
                    Action::Exec(cmd) => self
                        .ctx
                        .runtime
                        .call_with(
                            "ExecSync",
                            Some(timeout + Duration::from_secs(2)),
                            rt.exec_sync(cri::ExecSyncRequest {
                                container_id: k.id.clone(),
                                cmd,
                                timeout: timeout.as_secs() as i64,
                            }),
                        )
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| {
                            if r.exit_code == 0 {
                                Ok(())
                            } else {
                                Err(format!("command exited with {}", r.exit_code))
                            }
                        }),
                    Action::Http {
                        host,
                        port,
                        path,
                        headers,
                        ..
                    } => prober::http_get(&host, port, &path, &headers, timeout).await,
                    Action::Tcp { host, port } => prober::tcp(&host, port, timeout).await,
                    Action::Grpc {
                        host,
                        port,
                        service,
                    } => prober::grpc(&host, port, &service, timeout).await,
                    Action::Unsupported(why) => Err(why),
                };
                let Some(state) = self.probes.get_mut(&(k.id.clone(), kind)) else {
                    continue;
                };
                let verdict = state.record(Instant::now(), outcome.is_ok());
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
                if verdict == Some(false) && kind != "readiness" {
                    self.events.emit(
                        pod,
                        Some(&c.name),
                        Kind::Normal,
                        "Killing",
                        format!(
                            "Container {} failed {kind} probe, will be restarted",
                            c.name
                        ),
                    );
                    tracing::info!(pod = %pod_key(pod), container = %c.name, kind, "probe failed; restarting container");
                    let _ = self
                        .ctx
                        .runtime
                        .call_with(
                            "StopContainer",
                            Some(Duration::from_secs(grace.max(0) as u64 + 30)),
                            rt.stop_container(cri::StopContainerRequest {
                                container_id: k.id.clone(),
                                timeout: grace,
                            }),
                        )
                        .await;
                }
            }
        }
        Ok(())
    }

    async fn observe(
        &self,
        pod: &Pod,
        sandbox_id: &str,
        ips: Option<Vec<String>>,
    ) -> Result<Observed, crate::runtime::RuntimeError> {
        let mut rt = self.ctx.runtime.runtime_client();
        let mut observed = Observed {
            sandbox_ips: ips,
            waiting: self.waiting.clone(),
            runtime_name: self.ctx.runtime_name.clone(),
            ..Default::default()
        };
        let mut by_name: BTreeMap<String, Vec<cri::ContainerStatus>> = BTreeMap::new();
        for k in self
            .containers()
            .await?
            .into_iter()
            .filter(|k| k.pod_sandbox_id == sandbox_id)
        {
            let st = self
                .ctx
                .runtime
                .call_with(
                    "ContainerStatus",
                    None,
                    rt.container_status(cri::ContainerStatusRequest {
                        container_id: k.id.clone(),
                        verbose: false,
                    }),
                )
                .await?;
            if let Some(s) = st.status {
                let name = s
                    .metadata
                    .as_ref()
                    .map(|m| m.name.clone())
                    .unwrap_or_default();
                by_name.entry(name).or_default().push(s);
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
        // Probe verdicts of the current instances: no verdict yet counts as failing.
        for c in pod.spec.iter().flat_map(|sp| sp.containers.iter()) {
            let Some(id) = observed.containers.get(&c.name).map(|s| s.id.clone()) else {
                continue;
            };
            let passed = |kind: &'static str| {
                self.probes
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
        Ok(observed)
    }

    async fn report(
        &mut self,
        pod: &Pod,
        sandbox_id: &str,
        ips: Option<Vec<String>>,
    ) -> Result<(), crate::runtime::RuntimeError> {
        let observed = self.observe(pod, sandbox_id, ips).await?;
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
        let patch = serde_json::json!({ "status": status });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.last_status = Some(status),
            Err(e) => tracing::warn!(pod = %pod_key(pod), error = %e, "pod status update failed"),
        }
        Ok(())
    }

    /// Stops everything of the pod (within its grace period), removes it from the runtime and
    /// confirms the deletion to the API server.
    async fn terminate(&mut self, pod: Option<&Pod>) {
        let grace = pod
            .and_then(|p| {
                p.metadata
                    .deletion_grace_period_seconds
                    .or(p.spec.as_ref()?.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0);
        let mut rt = self.ctx.runtime.runtime_client();
        // App containers first, then sidecars (newest-declared first), as upstream terminates.
        let sidecars: Vec<String> = pod
            .and_then(|p| p.spec.as_ref()?.init_containers.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"))
            .map(|c| c.name)
            .collect();
        if let Ok(containers) = self.containers().await {
            let running: Vec<&cri::Container> = containers
                .iter()
                .filter(|k| k.state == cri::ContainerState::ContainerRunning as i32)
                .collect();
            let name_of = |k: &cri::Container| {
                k.metadata
                    .as_ref()
                    .map(|m| m.name.clone())
                    .unwrap_or_default()
            };
            if let Some(pod) = pod {
                for k in &running {
                    let name = name_of(k);
                    self.events.emit(
                        pod,
                        Some(&name),
                        Kind::Normal,
                        "Killing",
                        format!("Stopping container {name}"),
                    );
                }
            }
            let mut waves: Vec<Vec<String>> = vec![
                running
                    .iter()
                    .filter(|k| !sidecars.contains(&name_of(k)))
                    .map(|k| k.id.clone())
                    .collect(),
            ];
            for sidecar in sidecars.iter().rev() {
                waves.push(
                    running
                        .iter()
                        .filter(|k| &name_of(k) == sidecar)
                        .map(|k| k.id.clone())
                        .collect(),
                );
            }
            for wave in waves {
                let stops = wave.into_iter().map(|id| {
                    let mut rt = rt.clone();
                    let runtime = self.ctx.runtime.clone();
                    async move {
                        let _ = runtime
                            .call_with(
                                "StopContainer",
                                Some(Duration::from_secs(grace as u64 + 30)),
                                rt.stop_container(cri::StopContainerRequest {
                                    container_id: id,
                                    timeout: grace,
                                }),
                            )
                            .await;
                    }
                });
                futures::future::join_all(stops).await;
            }
        }
        if let Ok(sandboxes) = self.sandboxes().await {
            for s in sandboxes {
                let _ = self
                    .ctx
                    .runtime
                    .call_with(
                        "StopPodSandbox",
                        Some(Duration::from_secs(60)),
                        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                            pod_sandbox_id: s.id.clone(),
                        }),
                    )
                    .await;
                let _ = self
                    .ctx
                    .runtime
                    .call_with(
                        "RemovePodSandbox",
                        Some(Duration::from_secs(60)),
                        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                            pod_sandbox_id: s.id,
                        }),
                    )
                    .await;
            }
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

    #[test]
    fn backoff_doubles_to_five_minutes_and_resets_after_a_clean_run() {
        let t = Instant::now();
        let mut b = Backoff::default();
        assert!(b.ready(t));
        assert_eq!(b.fail(t, Duration::ZERO), Duration::from_secs(10));
        assert!(!b.ready(t + Duration::from_secs(5)));
        assert!(b.ready(t + Duration::from_secs(10)));
        assert_eq!(b.fail(t, Duration::ZERO), Duration::from_secs(20));
        for _ in 0..10 {
            b.fail(t, Duration::ZERO);
        }
        assert_eq!(b.fail(t, Duration::ZERO), Duration::from_secs(300));
        assert_eq!(b.fail(t, Duration::from_secs(601)), Duration::from_secs(10));
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
