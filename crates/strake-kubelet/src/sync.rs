//! The pod-sync core: given a pod's desired spec, what the runtime has of it and the time,
//! which actions bring the runtime towards the spec. No I/O happens here: the pod worker
//! observes through [`crate::runtime::Cri`], calls [`compute_pod_actions`] and executes the
//! actions it returns, so every rule below is unit-tested in milliseconds.
//!
//! Upstream's `computePodActions` and pod workers are the behavioural reference:
//! - no ready sandbox (or several): kill every sandbox and create a new one (attempt + 1);
//!   a `restartPolicy: Never` pod whose containers already ran is not recreated;
//! - init containers run one at a time, in order; a restartable init container (a sidecar,
//!   `restartPolicy: Always`) is started in its turn and kept running; app containers start
//!   once every regular init container completed and every sidecar started;
//! - exited containers restart per `restartPolicy` (init containers: OnFailure unless the
//!   pod's policy is Never), with CrashLoopBackOff: the first restart at once, then 10 s
//!   doubling to 300 s, reset after 10 minutes of running;
//! - a failed liveness or startup probe kills the container (restarted per policy);
//! - ephemeral containers start in the running sandbox (initialized or not) and never again;
//! - termination stops app containers first, then sidecars in reverse order, within the pod's
//!   grace period ([`termination_waves`], [`remaining_grace`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};
use tokio::time::Instant;

use crate::events::Kind;
use crate::prober::ProbeState;

/// A sandbox as the runtime reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxObs {
    pub id: String,
    pub ready: bool,
    pub attempt: u32,
    pub created_at: i64,
    /// The pod's addresses (ready sandbox only), IPv4 first.
    pub ips: Vec<String>,
}

/// A container's runtime state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Exited,
    #[default]
    Unknown,
}

/// A container instance as the runtime reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerObs {
    pub id: String,
    pub name: String,
    pub sandbox_id: String,
    pub attempt: u32,
    pub state: RunState,
    pub exit_code: i32,
    /// Wall-clock nanoseconds, as CRI reports them.
    pub started_at: i64,
    pub finished_at: i64,
}

impl ContainerObs {
    fn ran_for(&self) -> Duration {
        Duration::from_nanos((self.finished_at - self.started_at).max(0) as u64)
    }
}

/// What the runtime has of one pod (everything labelled with its UID).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRuntimeState {
    pub sandboxes: Vec<SandboxObs>,
    pub containers: Vec<ContainerObs>,
}

impl PodRuntimeState {
    /// The newest ready sandbox.
    pub fn ready_sandbox(&self) -> Option<&SandboxObs> {
        self.sandboxes
            .iter()
            .filter(|s| s.ready)
            .max_by_key(|s| s.created_at)
    }

    /// The newest sandbox, ready or not (whose containers the status reports).
    pub fn newest_sandbox(&self) -> Option<&SandboxObs> {
        self.sandboxes.iter().max_by_key(|s| s.created_at)
    }

    /// The newest instance of container `name` in sandbox `sandbox`.
    pub fn current(&self, sandbox: &str, name: &str) -> Option<&ContainerObs> {
        self.containers
            .iter()
            .filter(|c| c.sandbox_id == sandbox && c.name == name)
            .max_by_key(|c| c.attempt)
    }
}

/// Restart backoff of one container: 10 s doubling to 300 s; reset after 10 minutes of running.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    delay: Option<Duration>,
}

impl Backoff {
    pub const INITIAL: Duration = Duration::from_secs(10);
    pub const MAX: Duration = Duration::from_secs(300);
    pub const RESET_AFTER: Duration = Duration::from_secs(600);

    /// The wait still owed at `now` for an instance that exited at `exited` after running for
    /// `ran_for` (`None`: it may restart now).
    pub fn remaining(
        &mut self,
        exited: Instant,
        ran_for: Duration,
        now: Instant,
    ) -> Option<Duration> {
        if ran_for >= Self::RESET_AFTER {
            self.delay = None;
        }
        let d = self.delay?;
        (now < exited + d).then(|| exited + d - now)
    }

    /// Records a restart; returns the delay the next exit will owe.
    pub fn restarted(&mut self) -> Duration {
        let next = self.delay.map_or(Self::INITIAL, |d| (d * 2).min(Self::MAX));
        self.delay = Some(next);
        next
    }

    /// The current delay (`None` before the first restart).
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }
}

/// Why a container is killed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// Its liveness or startup probe failed.
    Probe(&'static str),
    /// The pod failed (an init container failed under `restartPolicy: Never`).
    PodFailed,
    /// The pod is being deleted.
    Terminating,
    /// An in-place resize of a resource whose `resizePolicy` is `RestartContainer`.
    Resize,
}

/// One step the worker takes.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Stop and remove a sandbox, and with it its containers.
    KillSandbox { id: String },
    /// Create a new sandbox; the actions after it act in that sandbox.
    CreateSandbox { attempt: u32 },
    /// Pull (per `imagePullPolicy`), create and start container `name`, then run its
    /// postStart hook.
    StartContainer { name: String, attempt: u32 },
    /// Run container `name`'s preStop hook, then stop it, all within `grace`.
    KillContainer {
        id: String,
        name: String,
        grace: Duration,
        reason: KillReason,
    },
    /// Record an Event about the pod (or one of its containers).
    Event {
        container: Option<String>,
        kind: Kind,
        reason: &'static str,
        note: String,
    },
    /// Actuate an in-place resize: the pod's cgroup (when it was made for other resources)
    /// around UpdateContainerResources of each running container whose resources change.
    Resize {
        pod_cgroup: bool,
        updates: Vec<ResizeUpdate>,
    },
}

/// One container's part of [`Action::Resize`].
#[derive(Clone, Debug, PartialEq)]
pub struct ResizeUpdate {
    pub id: String,
    pub name: String,
    /// The container's allocated resources, which it is to have.
    pub resources: ResourceRequirements,
}

/// What an in-place resize asks of the pod's running containers, given `desired` (the pod with
/// its allocation), what each running instance was last given (`applied`, by container ID)
/// and, when the kubelet manages pod cgroups, the resources the pod's cgroup was made for
/// (`pod_cgroup_for`, `None` before it was made). A changed resource whose `resizePolicy` is `RestartContainer`
/// kills the container (the restart policy starts it again with the new resources); the other
/// changes are one [`Action::Resize`]. An instance adopted after a kubelet restart, with
/// nothing recorded, is given its resources once.
pub fn compute_resize_actions(
    desired: &Pod,
    observed: &PodRuntimeState,
    applied: &BTreeMap<String, ResourceRequirements>,
    manages_pod_cgroups: bool,
    pod_cgroup_for: Option<&crate::resize::Resources>,
) -> Vec<Action> {
    let Some(sandbox) = observed.ready_sandbox() else {
        return Vec::new();
    };
    let allocated = crate::resize::asked(desired);
    let mut actions = Vec::new();
    let mut updates = Vec::new();
    for k in observed
        .containers
        .iter()
        .filter(|k| k.sandbox_id == sandbox.id && k.state == RunState::Running)
    {
        let (Some(want), Some(c)) = (
            allocated.get(&k.name),
            crate::pod_spec::find_container(desired, &k.name),
        ) else {
            continue;
        };
        if let Some(have) = applied.get(&k.id) {
            if crate::resize::same(have, want) {
                continue;
            }
            if crate::resize::needs_restart(&c, &crate::resize::changed(have, want)) {
                let grace = grace_seconds(desired, Some(&c), &KillReason::Resize);
                actions.push(Action::KillContainer {
                    id: k.id.clone(),
                    name: k.name.clone(),
                    grace: Duration::from_secs(grace as u64),
                    reason: KillReason::Resize,
                });
                continue;
            }
        }
        updates.push(ResizeUpdate {
            id: k.id.clone(),
            name: k.name.clone(),
            resources: want.clone(),
        });
    }
    let pod_cgroup = manages_pod_cgroups
        && pod_cgroup_for.is_none_or(|made| !crate::resize::same_all(made, &allocated));
    if pod_cgroup || !updates.is_empty() {
        actions.push(Action::Resize {
            pod_cgroup,
            updates,
        });
    }
    actions
}

/// What a worker remembers between syncs.
#[derive(Clone, Debug, Default)]
pub struct WorkerState {
    /// Why a container has no running instance (reason, message), for the status.
    pub waiting: BTreeMap<String, (String, String)>,
    /// Probe states per (container ID, probe kind).
    pub probes: BTreeMap<(String, &'static str), ProbeState>,
    backoff: BTreeMap<String, Backoff>,
    /// When each exited instance was first seen: its backoff runs from there.
    exits: BTreeMap<String, Instant>,
    /// Exited instances whose BackOff event was already recorded.
    backoff_reported: BTreeSet<String>,
}

impl WorkerState {
    /// The restart backoff of container `name`.
    pub fn backoff(&self, name: &str) -> Option<&Backoff> {
        self.backoff.get(name)
    }

    fn probe_result(&self, id: &str, kind: &'static str) -> Option<bool> {
        self.probes
            .get(&(id.to_string(), kind))
            .and_then(|p| p.result)
    }

    /// Whether instance `k` of `c` counts as started (its startup probe, if any, passed).
    fn started(&self, c: &Container, k: &ContainerObs) -> bool {
        k.state == RunState::Running
            && (c.startup_probe.is_none() || self.probe_result(&k.id, "startup") == Some(true))
    }

    /// Forgets what belongs to container instances the runtime no longer has.
    fn prune(&mut self, observed: &PodRuntimeState) {
        let ids: BTreeSet<&str> = observed.containers.iter().map(|c| c.id.as_str()).collect();
        self.exits.retain(|id, _| ids.contains(id.as_str()));
        self.backoff_reported.retain(|id| ids.contains(id.as_str()));
        self.probes.retain(|(id, _), _| ids.contains(id.as_str()));
    }
}

fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The grace period of pod `pod`'s containers when killed for `reason`, in seconds (deletion's
/// own, else `terminationGracePeriodSeconds`, else 30; a probe's own override wins for probe
/// kills).
pub fn grace_seconds(pod: &Pod, c: Option<&Container>, reason: &KillReason) -> i64 {
    let spec = pod.spec.as_ref();
    let pod_grace = spec
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    let grace = match reason {
        KillReason::Terminating => pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(pod_grace),
        KillReason::Probe(kind) => c
            .and_then(|c| match *kind {
                "liveness" => c.liveness_probe.as_ref(),
                _ => c.startup_probe.as_ref(),
            })
            .and_then(|p| p.termination_grace_period_seconds)
            .unwrap_or(pod_grace),
        KillReason::PodFailed | KillReason::Resize => pod_grace,
    };
    grace.max(0)
}

/// The actions that move the pod's runtime state towards `desired` at `now`. `state` is the
/// worker's memory (backoff, probe verdicts, waiting reasons), which this advances; nothing
/// else is touched.
pub fn compute_pod_actions(
    desired: &Pod,
    observed: &PodRuntimeState,
    now: Instant,
    state: &mut WorkerState,
) -> Vec<Action> {
    state.prune(observed);
    let spec = desired.spec.clone().unwrap_or_default();
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let mut actions = Vec::new();
    let ready: Vec<&SandboxObs> = observed.sandboxes.iter().filter(|s| s.ready).collect();
    let sandbox = match ready.as_slice() {
        [one] => one.id.clone(),
        _ => {
            // A Never pod whose sandbox died after its containers ran is done: its status
            // reports how they ended, nothing is started again.
            let ran = !observed.containers.is_empty();
            if ready.is_empty() && ran && policy == "Never" {
                return actions;
            }
            for s in &observed.sandboxes {
                actions.push(Action::KillSandbox { id: s.id.clone() });
            }
            let attempt = observed
                .sandboxes
                .iter()
                .map(|s| s.attempt + 1)
                .max()
                .unwrap_or(0);
            actions.push(Action::CreateSandbox { attempt });
            // The new sandbox is empty: every container starts afresh in it.
            String::new()
        }
    };
    let empty = PodRuntimeState::default();
    let in_sandbox = if sandbox.is_empty() { &empty } else { observed };
    let current = |name: &str| in_sandbox.current(&sandbox, name).cloned();
    let app_started = spec.containers.iter().any(|c| current(&c.name).is_some());

    // Ephemeral containers start in a running sandbox, even before initialization is over,
    // and are never restarted: one that ran (in any sandbox) stays as it ended.
    if !sandbox.is_empty() {
        for ec in spec.ephemeral_containers.iter().flatten() {
            if observed.containers.iter().any(|k| k.name == ec.name) {
                state.waiting.remove(&ec.name);
            } else {
                actions.push(Action::StartContainer {
                    name: ec.name.clone(),
                    attempt: 0,
                });
            }
        }
    }

    let mut initialized = true;
    for c in spec.init_containers.iter().flatten() {
        let cur = current(&c.name);
        if is_sidecar(c) {
            match cur {
                None => {
                    state.waiting.remove(&c.name);
                    actions.push(start(c, 0));
                    // Without a startup probe a sidecar counts as started once StartContainer
                    // (and its postStart hook) returned.
                    if c.startup_probe.is_some() && !app_started {
                        initialized = false;
                        break;
                    }
                }
                Some(k) if k.state == RunState::Exited => {
                    let restarted = restart(desired, c, &k, now, state, &mut actions);
                    let counts_as_started = restarted && c.startup_probe.is_none();
                    if !(app_started || counts_as_started) {
                        initialized = false;
                        break;
                    }
                }
                Some(k) => {
                    state.waiting.remove(&c.name);
                    probe_kills(desired, c, &k, state, &mut actions);
                    if !app_started && !state.started(c, &k) {
                        initialized = false;
                        break;
                    }
                }
            }
            continue;
        }
        if app_started {
            // Initialization is over once app containers exist.
            continue;
        }
        match cur {
            None => {
                state.waiting.remove(&c.name);
                actions.push(start(c, 0));
                initialized = false;
                break;
            }
            Some(k) if k.state != RunState::Exited => {
                state.waiting.remove(&c.name);
                initialized = false;
                break;
            }
            Some(k) if k.exit_code == 0 => {
                state.waiting.remove(&c.name);
            }
            Some(k) => {
                initialized = false;
                if policy == "Never" {
                    // The pod failed: nothing more starts, and what runs is stopped.
                    state.waiting.remove(&c.name);
                    for other in in_sandbox
                        .containers
                        .iter()
                        .filter(|o| o.sandbox_id == sandbox && o.state == RunState::Running)
                    {
                        let spec_c = spec
                            .init_containers
                            .iter()
                            .flatten()
                            .find(|x| x.name == other.name);
                        actions.push(kill(desired, other, spec_c, KillReason::PodFailed));
                    }
                } else {
                    restart(desired, c, &k, now, state, &mut actions);
                }
                break;
            }
        }
    }
    if !initialized {
        for c in &spec.containers {
            state
                .waiting
                .insert(c.name.clone(), ("PodInitializing".into(), String::new()));
        }
        return actions;
    }
    for c in &spec.containers {
        match current(&c.name) {
            None => {
                if state
                    .waiting
                    .get(&c.name)
                    .is_some_and(|(r, _)| r == "PodInitializing")
                {
                    state.waiting.remove(&c.name);
                }
                actions.push(start(c, 0));
            }
            Some(k) if k.state == RunState::Exited => {
                let again = match policy {
                    "Never" => false,
                    "OnFailure" => k.exit_code != 0,
                    _ => true,
                };
                if again {
                    restart(desired, c, &k, now, state, &mut actions);
                } else {
                    state.waiting.remove(&c.name);
                }
            }
            Some(k) => {
                state.waiting.remove(&c.name);
                probe_kills(desired, c, &k, state, &mut actions);
            }
        }
    }
    actions
}

fn start(c: &Container, attempt: u32) -> Action {
    Action::StartContainer {
        name: c.name.clone(),
        attempt,
    }
}

fn kill(pod: &Pod, k: &ContainerObs, c: Option<&Container>, reason: KillReason) -> Action {
    Action::KillContainer {
        id: k.id.clone(),
        name: k.name.clone(),
        grace: Duration::from_secs(grace_seconds(pod, c, &reason) as u64),
        reason,
    }
}

/// Restarts exited instance `k` of `c` unless it owes backoff; returns whether it restarts.
fn restart(
    pod: &Pod,
    c: &Container,
    k: &ContainerObs,
    now: Instant,
    state: &mut WorkerState,
    actions: &mut Vec<Action>,
) -> bool {
    let exited = *state.exits.entry(k.id.clone()).or_insert(now);
    let backoff = state.backoff.entry(c.name.clone()).or_default();
    if backoff.remaining(exited, k.ran_for(), now).is_some() {
        let delay = backoff.delay().unwrap_or(Backoff::INITIAL);
        let message = format!(
            "back-off {}s restarting failed container={} pod={}",
            delay.as_secs(),
            c.name,
            pod_key(pod)
        );
        state
            .waiting
            .insert(c.name.clone(), ("CrashLoopBackOff".into(), message));
        if state.backoff_reported.insert(k.id.clone()) {
            actions.push(Action::Event {
                container: Some(c.name.clone()),
                kind: Kind::Warning,
                reason: "BackOff",
                note: format!(
                    "Back-off restarting failed container {} in pod {}",
                    c.name,
                    pod_key(pod)
                ),
            });
        }
        return false;
    }
    backoff.restarted();
    state.waiting.remove(&c.name);
    actions.push(start(c, k.attempt + 1));
    true
}

/// Kills running instance `k` of `c` when its startup or liveness probe has failed.
fn probe_kills(
    pod: &Pod,
    c: &Container,
    k: &ContainerObs,
    state: &WorkerState,
    actions: &mut Vec<Action>,
) {
    if k.state != RunState::Running {
        return;
    }
    for kind in ["startup", "liveness"] {
        if state.probe_result(&k.id, kind) == Some(false) {
            actions.push(Action::Event {
                container: Some(c.name.clone()),
                kind: Kind::Normal,
                reason: "Killing",
                note: format!(
                    "Container {} failed {kind} probe, will be restarted",
                    c.name
                ),
            });
            actions.push(kill(pod, k, Some(c), KillReason::Probe(kind)));
            return;
        }
    }
}

/// The order in which a deleted pod's running containers stop: one wave of every app
/// container (and any the spec does not name) at once, then each sidecar alone, the last
/// declared first. Each entry is (container ID, name).
pub fn termination_waves(
    pod: Option<&Pod>,
    observed: &PodRuntimeState,
) -> Vec<Vec<(String, String)>> {
    let sidecars: Vec<String> = pod
        .and_then(|p| p.spec.as_ref()?.init_containers.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(is_sidecar)
        .map(|c| c.name)
        .collect();
    let running: Vec<&ContainerObs> = observed
        .containers
        .iter()
        .filter(|k| k.state == RunState::Running)
        .collect();
    let mut waves = vec![
        running
            .iter()
            .filter(|k| !sidecars.contains(&k.name))
            .map(|k| (k.id.clone(), k.name.clone()))
            .collect::<Vec<_>>(),
    ];
    for sidecar in sidecars.iter().rev() {
        waves.push(
            running
                .iter()
                .filter(|k| &k.name == sidecar)
                .map(|k| (k.id.clone(), k.name.clone()))
                .collect(),
        );
    }
    waves.retain(|w| !w.is_empty());
    waves
}

/// Upstream's floor for the time a container gets to stop (`minimumGracePeriodInSeconds`).
pub const MIN_GRACE: Duration = Duration::from_secs(2);

/// The grace left at `now` before `deadline`, in whole seconds (CRI's unit, rounded up),
/// never below [`MIN_GRACE`].
pub fn remaining_grace(deadline: Instant, now: Instant) -> Duration {
    let left = deadline.saturating_duration_since(now);
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    Duration::from_secs(secs).max(MIN_GRACE)
}

/// What upstream's container garbage collector would remove from a live pod: every exited
/// instance of a container but the newest `keep` (`maxPerPodContainer`, 1: the one `lastState`
/// and `kubectl logs --previous` show), and every sandbox that is not ready, is not the pod's
/// newest and holds no container once those are gone. Running and created containers are
/// never collected.
pub fn collectable(state: &PodRuntimeState, keep: usize) -> (Vec<String>, Vec<String>) {
    let mut by_name: BTreeMap<&str, Vec<&ContainerObs>> = BTreeMap::new();
    for k in &state.containers {
        if k.state == RunState::Exited {
            by_name.entry(&k.name).or_default().push(k);
        }
    }
    let mut containers = Vec::new();
    for dead in by_name.values_mut() {
        dead.sort_by_key(|k| std::cmp::Reverse((k.attempt, k.started_at)));
        containers.extend(dead.iter().skip(keep).map(|k| k.id.clone()));
    }
    let newest = state.newest_sandbox().map(|s| s.id.as_str());
    let sandboxes = state
        .sandboxes
        .iter()
        .filter(|s| !s.ready && Some(s.id.as_str()) != newest)
        .filter(|s| {
            !state
                .containers
                .iter()
                .any(|k| k.sandbox_id == s.id && !containers.contains(&k.id))
        })
        .map(|s| s.id.clone())
        .collect();
    (containers, sandboxes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prober::{ProbeState, Timing};

    fn pod(v: serde_json::Value) -> Pod {
        let mut spec = v;
        if spec.get("containers").is_none() {
            spec["containers"] = serde_json::json!([{ "name": "app" }]);
        }
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ns", "uid": "u" },
            "spec": spec
        }))
        .unwrap()
    }

    fn sandbox() -> SandboxObs {
        SandboxObs {
            id: "s1".into(),
            ready: true,
            attempt: 0,
            created_at: 1,
            ips: vec!["10.88.0.2".into()],
        }
    }

    fn ctr(name: &str, attempt: u32, state: RunState, exit: i32) -> ContainerObs {
        ContainerObs {
            id: format!("{name}-{attempt}"),
            name: name.into(),
            sandbox_id: "s1".into(),
            attempt,
            state,
            exit_code: exit,
            started_at: 1_000_000_000,
            finished_at: 2_000_000_000,
        }
    }

    fn obs(containers: Vec<ContainerObs>) -> PodRuntimeState {
        PodRuntimeState {
            sandboxes: vec![sandbox()],
            containers,
        }
    }

    fn starts(actions: &[Action]) -> Vec<(String, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::StartContainer { name, attempt } => Some((name.clone(), *attempt)),
                _ => None,
            })
            .collect()
    }

    fn kills(actions: &[Action]) -> Vec<(String, Duration, KillReason)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::KillContainer {
                    name,
                    grace,
                    reason,
                    ..
                } => Some((name.clone(), *grace, reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn s(name: &str, attempt: u32) -> (String, u32) {
        (name.to_string(), attempt)
    }

    #[test]
    fn a_new_pod_gets_a_sandbox_then_its_containers() {
        let p = pod(serde_json::json!({
            "containers": [{ "name": "a" }, { "name": "b" }]
        }));
        let mut st = WorkerState::default();
        let a = compute_pod_actions(&p, &PodRuntimeState::default(), Instant::now(), &mut st);
        assert_eq!(a[0], Action::CreateSandbox { attempt: 0 });
        assert_eq!(starts(&a), vec![s("a", 0), s("b", 0)]);
    }

    #[test]
    fn a_dead_sandbox_is_killed_and_recreated_with_the_next_attempt() {
        let p = pod(serde_json::json!({}));
        let mut dead = sandbox();
        dead.ready = false;
        let o = PodRuntimeState {
            sandboxes: vec![dead],
            containers: vec![ctr("app", 0, RunState::Exited, 137)],
        };
        let mut st = WorkerState::default();
        let a = compute_pod_actions(&p, &o, Instant::now(), &mut st);
        assert_eq!(
            &a[..2],
            &[
                Action::KillSandbox { id: "s1".into() },
                Action::CreateSandbox { attempt: 1 }
            ]
        );
        assert_eq!(starts(&a), vec![s("app", 0)]);
        // Under restartPolicy Never the pod is over: nothing is recreated.
        let never = pod(serde_json::json!({ "restartPolicy": "Never" }));
        assert!(compute_pod_actions(&never, &o, Instant::now(), &mut st).is_empty());
    }

    #[test]
    fn ephemeral_containers_start_in_the_running_sandbox_once_and_never_restart() {
        let p = pod(serde_json::json!({
            "initContainers": [{ "name": "init" }],
            "ephemeralContainers": [{ "name": "debug" }]
        }));
        let mut st = WorkerState::default();
        // Not with a new sandbox: the pod is being (re)created.
        let a = compute_pod_actions(&p, &PodRuntimeState::default(), Instant::now(), &mut st);
        assert_eq!(starts(&a), vec![s("init", 0)]);
        // In a running sandbox, even while an init container still runs.
        let o = obs(vec![ctr("init", 0, RunState::Running, 0)]);
        let a = compute_pod_actions(&p, &o, Instant::now(), &mut st);
        assert_eq!(starts(&a), vec![s("debug", 0)]);
        // Once it ran, whatever its end, it is left as it is.
        for exit in [0, 1] {
            let o = obs(vec![
                ctr("init", 0, RunState::Exited, 0),
                ctr("app", 0, RunState::Running, 0),
                ctr("debug", 0, RunState::Exited, exit),
            ]);
            assert!(compute_pod_actions(&p, &o, Instant::now(), &mut st).is_empty());
        }
        // Nor when it ran in an earlier sandbox of the pod.
        let mut o = obs(vec![ctr("app", 0, RunState::Running, 0)]);
        let mut old = ctr("debug", 0, RunState::Exited, 0);
        old.sandbox_id = "s0".into();
        o.containers.push(old);
        o.containers.push(ctr("init", 0, RunState::Exited, 0));
        assert!(compute_pod_actions(&p, &o, Instant::now(), &mut st).is_empty());
    }

    #[test]
    fn running_containers_are_left_alone() {
        let p = pod(serde_json::json!({}));
        let mut st = WorkerState::default();
        let o = obs(vec![ctr("app", 0, RunState::Running, 0)]);
        assert!(compute_pod_actions(&p, &o, Instant::now(), &mut st).is_empty());
    }

    #[test]
    fn restart_policies_decide_which_exits_restart() {
        let now = Instant::now();
        for (policy, exit, restarts) in [
            ("Always", 0, true),
            ("Always", 1, true),
            ("OnFailure", 0, false),
            ("OnFailure", 1, true),
            ("Never", 0, false),
            ("Never", 1, false),
        ] {
            let p = pod(serde_json::json!({ "restartPolicy": policy }));
            let mut st = WorkerState::default();
            let o = obs(vec![ctr("app", 0, RunState::Exited, exit)]);
            let a = compute_pod_actions(&p, &o, now, &mut st);
            let want = if restarts { vec![s("app", 1)] } else { vec![] };
            assert_eq!(starts(&a), want, "{policy} exit {exit}");
        }
    }

    #[test]
    fn crash_loop_backoff_waits_10s_doubling_to_300s_and_resets_after_10_minutes() {
        let p = pod(serde_json::json!({}));
        let mut st = WorkerState::default();
        let t0 = Instant::now();
        // The first exit restarts at once.
        let a = compute_pod_actions(
            &p,
            &obs(vec![ctr("app", 0, RunState::Exited, 1)]),
            t0,
            &mut st,
        );
        assert_eq!(starts(&a), vec![s("app", 1)]);
        // The second owes 10 s from when it was seen, as CrashLoopBackOff with one event.
        let o = obs(vec![ctr("app", 1, RunState::Exited, 1)]);
        let a = compute_pod_actions(&p, &o, t0, &mut st);
        assert!(starts(&a).is_empty());
        assert!(a.iter().any(|x| matches!(
            x,
            Action::Event {
                reason: "BackOff",
                ..
            }
        )));
        let (reason, message) = st.waiting["app"].clone();
        assert_eq!(reason, "CrashLoopBackOff");
        assert!(
            message.starts_with("back-off 10s restarting failed container=app"),
            "{message}"
        );
        let a = compute_pod_actions(&p, &o, t0 + Duration::from_secs(9), &mut st);
        assert!(a.is_empty(), "still backing off, event not repeated: {a:?}");
        let a = compute_pod_actions(&p, &o, t0 + Duration::from_secs(10), &mut st);
        assert_eq!(starts(&a), vec![s("app", 2)]);
        assert!(!st.waiting.contains_key("app"));
        // Each further crash doubles the wait, up to five minutes.
        let mut t = t0 + Duration::from_secs(10);
        let mut waits = Vec::new();
        for attempt in 2..10 {
            let o = obs(vec![ctr("app", attempt, RunState::Exited, 1)]);
            assert!(starts(&compute_pod_actions(&p, &o, t, &mut st)).is_empty());
            let mut waited = 0;
            while starts(&compute_pod_actions(&p, &o, t, &mut st)).is_empty() {
                t += Duration::from_secs(1);
                waited += 1;
            }
            waits.push(waited);
        }
        assert_eq!(waits, vec![20, 40, 80, 160, 300, 300, 300, 300]);
        // An instance that ran for 10 minutes restarts at once and starts the ladder over.
        let mut long = ctr("app", 10, RunState::Exited, 1);
        long.finished_at = long.started_at + 601_000_000_000;
        let a = compute_pod_actions(&p, &obs(vec![long]), t, &mut st);
        assert_eq!(starts(&a), vec![s("app", 11)]);
        assert_eq!(
            st.backoff("app").and_then(Backoff::delay),
            Some(Backoff::INITIAL)
        );
    }

    #[test]
    fn init_containers_run_one_at_a_time_in_order_before_the_app() {
        let p = pod(serde_json::json!({
            "initContainers": [{ "name": "i1" }, { "name": "i2" }],
            "containers": [{ "name": "app" }]
        }));
        let now = Instant::now();
        let mut st = WorkerState::default();
        let a = compute_pod_actions(&p, &obs(vec![]), now, &mut st);
        assert_eq!(starts(&a), vec![s("i1", 0)]);
        assert_eq!(st.waiting["app"].0, "PodInitializing");
        let a = compute_pod_actions(
            &p,
            &obs(vec![ctr("i1", 0, RunState::Running, 0)]),
            now,
            &mut st,
        );
        assert!(starts(&a).is_empty(), "i2 waits for i1");
        let done = ctr("i1", 0, RunState::Exited, 0);
        let a = compute_pod_actions(&p, &obs(vec![done.clone()]), now, &mut st);
        assert_eq!(starts(&a), vec![s("i2", 0)]);
        let a = compute_pod_actions(
            &p,
            &obs(vec![done.clone(), ctr("i2", 0, RunState::Exited, 0)]),
            now,
            &mut st,
        );
        assert_eq!(starts(&a), vec![s("app", 0)]);
        assert!(!st.waiting.contains_key("app"));
        // A failed init container is retried (OnFailure) and the app still waits.
        let a = compute_pod_actions(
            &p,
            &obs(vec![done.clone(), ctr("i2", 0, RunState::Exited, 1)]),
            now,
            &mut st,
        );
        assert_eq!(starts(&a), vec![s("i2", 1)]);
        // Under restartPolicy Never a failed init container fails the pod.
        let never = pod(serde_json::json!({
            "restartPolicy": "Never",
            "initContainers": [{ "name": "i1" }],
        }));
        let mut st = WorkerState::default();
        let a = compute_pod_actions(
            &never,
            &obs(vec![ctr("i1", 0, RunState::Exited, 1)]),
            now,
            &mut st,
        );
        assert!(starts(&a).is_empty());
        // Once the app runs, a completed init container is not run again.
        let a = compute_pod_actions(
            &p,
            &obs(vec![ctr("app", 0, RunState::Running, 0)]),
            now,
            &mut WorkerState::default(),
        );
        assert!(a.is_empty(), "{a:?}");
    }

    #[test]
    fn sidecars_start_in_order_and_keep_running_while_the_app_restarts() {
        let p = pod(serde_json::json!({
            "initContainers": [
                { "name": "i1" },
                { "name": "side", "restartPolicy": "Always" },
                { "name": "i2" }
            ],
            "containers": [{ "name": "app" }]
        }));
        let now = Instant::now();
        let mut st = WorkerState::default();
        let i1 = ctr("i1", 0, RunState::Exited, 0);
        // After i1 completes, the sidecar starts and, with no startup probe, i2 right after.
        let a = compute_pod_actions(&p, &obs(vec![i1.clone()]), now, &mut st);
        assert_eq!(starts(&a), vec![s("side", 0), s("i2", 0)]);
        let side = ctr("side", 0, RunState::Running, 0);
        let i2 = ctr("i2", 0, RunState::Exited, 0);
        let a = compute_pod_actions(
            &p,
            &obs(vec![i1.clone(), side.clone(), i2.clone()]),
            now,
            &mut st,
        );
        assert_eq!(starts(&a), vec![s("app", 0)]);
        // The app exits: it restarts; the sidecar is untouched.
        let all = vec![
            i1.clone(),
            side.clone(),
            i2.clone(),
            ctr("app", 0, RunState::Exited, 1),
        ];
        let a = compute_pod_actions(&p, &obs(all), now, &mut st);
        assert_eq!(starts(&a), vec![s("app", 1)]);
        // A sidecar that exits is restarted even after initialization.
        let all = vec![
            i1.clone(),
            ctr("side", 0, RunState::Exited, 0),
            i2.clone(),
            ctr("app", 1, RunState::Running, 0),
        ];
        let a = compute_pod_actions(&p, &obs(all), now, &mut st);
        assert_eq!(starts(&a), vec![s("side", 1)]);

        // A sidecar with a startup probe holds back the next init container until it passes.
        let probed = pod(serde_json::json!({
            "initContainers": [
                { "name": "side", "restartPolicy": "Always",
                  "startupProbe": { "exec": { "command": ["true"] } } },
                { "name": "i2" }
            ],
            "containers": [{ "name": "app" }]
        }));
        let mut st = WorkerState::default();
        let a = compute_pod_actions(&probed, &obs(vec![]), now, &mut st);
        assert_eq!(starts(&a), vec![s("side", 0)]);
        let o = obs(vec![ctr("side", 0, RunState::Running, 0)]);
        assert!(starts(&compute_pod_actions(&probed, &o, now, &mut st)).is_empty());
        let mut passed = ProbeState::new(Timing::of(&Default::default()), now);
        passed.record(now, true);
        st.probes.insert(("side-0".into(), "startup"), passed);
        let a = compute_pod_actions(&probed, &o, now, &mut st);
        assert_eq!(starts(&a), vec![s("i2", 0)]);
    }

    #[test]
    fn a_failed_liveness_probe_kills_the_container_which_restarts_per_policy() {
        let p = pod(serde_json::json!({
            "terminationGracePeriodSeconds": 7,
            "containers": [{ "name": "app", "livenessProbe": { "exec": { "command": ["true"] } } }]
        }));
        let now = Instant::now();
        let mut st = WorkerState::default();
        let o = obs(vec![ctr("app", 0, RunState::Running, 0)]);
        let mut failed = ProbeState::new(
            Timing {
                failure_threshold: 1,
                ..Timing::of(&Default::default())
            },
            now,
        );
        failed.record(now, false);
        st.probes.insert(("app-0".into(), "liveness"), failed);
        let a = compute_pod_actions(&p, &o, now, &mut st);
        assert_eq!(
            kills(&a),
            vec![(
                "app".to_string(),
                Duration::from_secs(7),
                KillReason::Probe("liveness")
            )]
        );
        assert!(a.iter().any(|x| matches!(x, Action::Event { reason: "Killing", note, .. } if note.contains("failed liveness probe"))));
        // Killed, it has exited: Always restarts it.
        let o = obs(vec![ctr("app", 0, RunState::Exited, 137)]);
        assert_eq!(
            starts(&compute_pod_actions(&p, &o, now, &mut st)),
            vec![s("app", 1)]
        );
        // A readiness failure never kills.
        let mut st = WorkerState::default();
        let mut unready = ProbeState::new(Timing::of(&Default::default()), now);
        for _ in 0..3 {
            unready.record(now, false);
        }
        st.probes.insert(("app-0".into(), "readiness"), unready);
        let o = obs(vec![ctr("app", 0, RunState::Running, 0)]);
        assert!(compute_pod_actions(&p, &o, now, &mut st).is_empty());
    }

    #[test]
    fn termination_stops_apps_then_sidecars_in_reverse_order_within_the_grace_period() {
        let p = pod(serde_json::json!({
            "initContainers": [
                { "name": "init" },
                { "name": "side-a", "restartPolicy": "Always" },
                { "name": "side-b", "restartPolicy": "Always" }
            ],
            "containers": [{ "name": "app" }, { "name": "web" }]
        }));
        let o = obs(vec![
            ctr("init", 0, RunState::Exited, 0),
            ctr("side-a", 0, RunState::Running, 0),
            ctr("side-b", 0, RunState::Running, 0),
            ctr("app", 0, RunState::Running, 0),
            ctr("web", 0, RunState::Exited, 0),
        ]);
        let names: Vec<Vec<String>> = termination_waves(Some(&p), &o)
            .into_iter()
            .map(|w| w.into_iter().map(|(_, n)| n).collect())
            .collect();
        assert_eq!(names, vec![vec!["app"], vec!["side-b"], vec!["side-a"]]);
        // Without its spec (the pod vanished), everything stops in one wave.
        assert_eq!(termination_waves(None, &o).len(), 1);
        let t = Instant::now();
        let deadline = t + Duration::from_secs(30);
        assert_eq!(remaining_grace(deadline, t), Duration::from_secs(30));
        assert_eq!(
            remaining_grace(deadline, t + Duration::from_secs(25)),
            Duration::from_secs(5)
        );
        assert_eq!(
            remaining_grace(deadline, t + Duration::from_secs(40)),
            MIN_GRACE
        );
        assert_eq!(
            remaining_grace(deadline, t + Duration::from_millis(20_500)),
            Duration::from_secs(10)
        );
        let mut deleted = p.clone();
        deleted.metadata.deletion_grace_period_seconds = Some(4);
        assert_eq!(grace_seconds(&deleted, None, &KillReason::Terminating), 4);
        assert_eq!(grace_seconds(&p, None, &KillReason::Terminating), 30);
    }

    #[test]
    fn dead_containers_beyond_the_newest_and_old_empty_sandboxes_are_collectable() {
        let mut state = obs(vec![
            ctr("app", 0, RunState::Exited, 1),
            ctr("app", 1, RunState::Exited, 1),
            ctr("app", 2, RunState::Exited, 1),
            ctr("app", 3, RunState::Running, 0),
            ctr("init", 0, RunState::Exited, 0),
            ctr("side", 0, RunState::Created, 0),
        ]);
        let (containers, sandboxes) = collectable(&state, 1);
        // The newest dead app (attempt 2) stays for lastState; so do the only dead init
        // container, the running and the created ones.
        assert_eq!(containers, vec!["app-1", "app-0"]);
        assert!(sandboxes.is_empty());
        assert_eq!(collectable(&state, 3).0, Vec::<String>::new());

        // An old dead sandbox goes once nothing of it is kept; the newest one never does.
        let mut old = sandbox();
        (old.id, old.ready, old.created_at) = ("s0".into(), false, 0);
        state.sandboxes.push(old.clone());
        let mut in_old = ctr("gone", 0, RunState::Exited, 0);
        in_old.sandbox_id = "s0".into();
        state.containers.push(in_old.clone());
        assert!(
            collectable(&state, 1).1.is_empty(),
            "s0 still holds the newest 'gone'"
        );
        let mut newer = in_old.clone();
        (newer.id, newer.attempt, newer.sandbox_id) = ("gone-1".into(), 1, "s1".into());
        state.containers.push(newer);
        let (containers, sandboxes) = collectable(&state, 1);
        assert!(containers.contains(&"gone-0".to_string()));
        assert_eq!(sandboxes, vec!["s0"]);
        let lone = PodRuntimeState {
            sandboxes: vec![old],
            containers: Vec::new(),
        };
        assert!(
            collectable(&lone, 1).1.is_empty(),
            "the pod's newest sandbox stays"
        );
    }

    fn resources(cpu: &str, memory: &str) -> ResourceRequirements {
        serde_json::from_value(serde_json::json!({
            "requests": { "cpu": cpu }, "limits": { "memory": memory }
        }))
        .unwrap()
    }

    fn resizable(a_cpu: &str, b_memory: &str) -> Pod {
        pod(serde_json::json!({
            "terminationGracePeriodSeconds": 7,
            "containers": [
                { "name": "a", "resources": { "requests": { "cpu": a_cpu }, "limits": { "memory": "64Mi" } } },
                { "name": "b", "resources": { "requests": { "cpu": "100m" }, "limits": { "memory": b_memory } },
                  "resizePolicy": [{ "resourceName": "memory", "restartPolicy": "RestartContainer" }] }
            ]
        }))
    }

    fn updates(actions: &[Action]) -> Vec<(String, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Resize {
                    pod_cgroup,
                    updates,
                } => Some(
                    updates
                        .iter()
                        .map(|u| (u.name.clone(), *pod_cgroup))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn resize_updates_in_place_restarts_where_the_policy_says_and_leaves_the_rest() {
        let running = obs(vec![
            ctr("a", 0, RunState::Running, 0),
            ctr("b", 0, RunState::Running, 0),
        ]);
        let applied = |a_cpu: &str, b_memory: &str| {
            BTreeMap::from([
                ("a-0".to_string(), resources(a_cpu, "64Mi")),
                ("b-0".to_string(), resources("100m", b_memory)),
            ])
        };
        let before = resizable("100m", "64Mi");
        let made = crate::resize::asked(&before);
        // Nothing changed: nothing to do.
        assert!(
            compute_resize_actions(
                &before,
                &running,
                &applied("100m", "64Mi"),
                true,
                Some(&made)
            )
            .is_empty()
        );
        // The same quantity written differently is no change.
        assert!(
            compute_resize_actions(
                &before,
                &running,
                &applied("0.1", "64Mi"),
                true,
                Some(&made)
            )
            .is_empty()
        );
        // a's CPU in place (with the pod's cgroup, made for the old values); b's memory, whose
        // policy is RestartContainer, by a kill within the pod's grace period.
        let after = resizable("500m", "128Mi");
        let a = compute_resize_actions(
            &after,
            &running,
            &applied("100m", "64Mi"),
            true,
            Some(&made),
        );
        assert_eq!(updates(&a), [("a".to_string(), true)]);
        assert_eq!(
            kills(&a),
            [("b".to_string(), Duration::from_secs(7), KillReason::Resize)]
        );
        let Some(Action::Resize { updates: u, .. }) =
            a.iter().find(|a| matches!(a, Action::Resize { .. }))
        else {
            panic!("{a:?}")
        };
        assert_eq!(u[0].id, "a-0");
        assert!(crate::resize::same(
            &u[0].resources,
            &resources("500m", "64Mi")
        ));
        // b's CPU alone changes in place: its policy restarts it for memory only.
        let cpu_only = pod(serde_json::json!({
            "containers": [
                { "name": "a", "resources": { "requests": { "cpu": "100m" }, "limits": { "memory": "64Mi" } } },
                { "name": "b", "resources": { "requests": { "cpu": "300m" }, "limits": { "memory": "64Mi" } },
                  "resizePolicy": [{ "resourceName": "memory", "restartPolicy": "RestartContainer" }] }
            ]
        }));
        let a = compute_resize_actions(&cpu_only, &running, &applied("100m", "64Mi"), false, None);
        assert_eq!(updates(&a), [("b".to_string(), false)]);
        assert!(kills(&a).is_empty());
        // Once actuated, nothing is left to do; without pod cgroups none is asked for.
        assert!(
            compute_resize_actions(&after, &running, &applied("500m", "128Mi"), false, None)
                .is_empty()
        );
        assert_eq!(
            compute_resize_actions(&after, &running, &applied("500m", "128Mi"), true, None),
            [Action::Resize {
                pod_cgroup: true,
                updates: Vec::new()
            }]
        );
    }

    #[test]
    fn resize_sets_adopted_instances_once_and_skips_what_does_not_run() {
        let p = resizable("100m", "64Mi");
        let made = crate::resize::asked(&p);
        // Adopted after a restart: nothing recorded, the resources are set once.
        let running = obs(vec![ctr("a", 0, RunState::Running, 0)]);
        let a = compute_resize_actions(&p, &running, &BTreeMap::new(), true, Some(&made));
        assert_eq!(updates(&a), [("a".to_string(), false)]);
        // Exited instances, instances of an old sandbox and a pod without a ready sandbox get
        // nothing; the pod's cgroup still follows the allocation once made.
        let mut old = ctr("a", 0, RunState::Running, 0);
        old.sandbox_id = "s0".into();
        let others = obs(vec![old, ctr("b", 0, RunState::Exited, 1)]);
        assert!(
            compute_resize_actions(&p, &others, &BTreeMap::new(), true, Some(&made)).is_empty()
        );
        let a = compute_resize_actions(&p, &others, &BTreeMap::new(), true, None);
        assert_eq!(
            a,
            [Action::Resize {
                pod_cgroup: true,
                updates: Vec::new()
            }]
        );
        let no_sandbox = PodRuntimeState {
            sandboxes: Vec::new(),
            containers: vec![ctr("a", 0, RunState::Running, 0)],
        };
        assert!(compute_resize_actions(&p, &no_sandbox, &BTreeMap::new(), true, None).is_empty());
    }
}
