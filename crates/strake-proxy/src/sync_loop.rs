//! The running proxy: watches on Services, EndpointSlices and the own Node keep what the
//! proxy reads of each object in a store (the API objects are dropped on arrival) and feed a
//! change tracker; the sync loop turns the stores into rules ([`Programmer::sync`], which re-derives
//! only the changed Services and sends the kernel only their difference, then deletes
//! [`conntrack::stale`] UDP flows) no more often than
//! `--min-sync-period`, at least every `--sync-period`, with a full sync at start, after a
//! failure and every [`FULL_SYNC_PERIOD`].
//!
//! An API outage only stops the change feed: the stores keep their last state, the kernel keeps
//! the last ruleset, and the watchers' relist on reconnect counts as a change.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::DaemonConfig;
use crate::conntrack::{self, Conntrack, UdpState};
use crate::health::Health;
use crate::healthcheck::HealthCheckPorts;
use crate::metrics::Metrics;
use crate::model::{
    HEADLESS_LABEL, Interner, NodeInfo, SERVICE_PROXY_NAME_LABEL, ServiceObject, SliceObject,
    Warning,
};
use crate::nft::Nft;
use crate::programmer::{Changed, Key, Programmer};

/// How often a full sync rewrites both tables even when nothing failed (upstream: 1 hour).
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);
/// The shortest wait before retrying a failed sync.
pub const FAILURE_RETRY_MIN: Duration = Duration::from_secs(1);
/// How long one object's warning stays quiet after it was logged and reported as an Event.
pub const WARNING_QUIET_PERIOD: Duration = Duration::from_secs(600);
/// At most this many Events are published per sync; the rest are only logged.
pub const EVENTS_PER_SYNC: usize = 10;
/// Annotation on EndpointSlices: when the change that produced them was triggered.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Trigger times kept per sync for the network programming metric (older ones are dropped).
const MAX_TRIGGER_TIMES: usize = 4096;
/// Objects named per sync; past this many, the sync looks at every object instead.
const MAX_NAMED_CHANGES: usize = 10_000;

/// Changes not yet programmed.
#[derive(Debug, Default)]
struct Pending {
    dirty: bool,
    trigger_times: Vec<Timestamp>,
    /// Every object may have changed (a relist, the Node, or too many to name).
    all: bool,
    /// The Services and EndpointSlices that changed, by `(namespace, name)`.
    services: std::collections::HashSet<Key>,
    slices: std::collections::HashSet<Key>,
}

/// The objects one sync is given.
enum Objects {
    /// Every Service and EndpointSlice.
    All(Vec<Arc<ServiceObject>>, Vec<Arc<SliceObject>>),
    /// Those that changed, as they are now.
    Changed(Vec<Changed<ServiceObject>>, Vec<Changed<SliceObject>>),
}

/// Which objects the next sync is to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Every object.
    All,
    /// These Services and EndpointSlices, by `(namespace, name)`.
    Named {
        /// Services.
        services: Vec<Key>,
        /// EndpointSlices.
        slices: Vec<Key>,
    },
}

/// What the watch task and the sync loop share.
#[derive(Debug)]
pub struct Tracker {
    pending: Mutex<Pending>,
    notify: Notify,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// What kind of object changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Service.
    Service,
    /// An EndpointSlice.
    EndpointSlice,
    /// The own Node.
    Node,
}

impl Tracker {
    /// A tracker reporting to `health` and `metrics`.
    pub fn new(health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        Tracker {
            pending: Mutex::default(),
            notify: Notify::new(),
            health,
            metrics,
        }
    }

    fn pending<T>(&self, f: impl FnOnce(&mut Pending) -> T) -> T {
        f(&mut self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records a change of the object of `kind` named `name` (`None`: any object of any
    /// kind may have changed), with the EndpointSlice's trigger time, if any.
    pub fn changed(&self, kind: Kind, name: Option<Key>, trigger: Option<Timestamp>) {
        self.pending(|p| {
            p.dirty = true;
            if let Some(t) = trigger
                && p.trigger_times.len() < MAX_TRIGGER_TIMES
            {
                p.trigger_times.push(t);
            }
            match (kind, name) {
                _ if p.all => {}
                (Kind::Service, Some(name)) => {
                    p.services.insert(name);
                }
                (Kind::EndpointSlice, Some(name)) => {
                    p.slices.insert(name);
                }
                _ => p.all = true,
            }
            if p.services.len() + p.slices.len() > MAX_NAMED_CHANGES {
                p.all = true;
            }
            if p.all {
                p.services.clear();
                p.slices.clear();
            }
        });
        self.metrics.update(|v| {
            match kind {
                Kind::Service => v.service_changes += 1,
                Kind::EndpointSlice => v.endpoint_changes += 1,
                Kind::Node => {}
            }
            v.last_queued_timestamp = unix_now();
        });
        self.health.queued(Instant::now());
        self.notify.notify_one();
    }

    fn take(&self) -> (Vec<Timestamp>, Changes) {
        self.pending(|p| {
            p.dirty = false;
            let changes = if std::mem::take(&mut p.all) {
                Changes::All
            } else {
                Changes::Named {
                    services: p.services.drain().collect(),
                    slices: p.slices.drain().collect(),
                }
            };
            (std::mem::take(&mut p.trigger_times), changes)
        })
    }

    /// Gives back what a failed sync took; the next sync looks at every object.
    fn put_back(&self, mut times: Vec<Timestamp>) {
        self.pending(|p| {
            p.dirty = true;
            p.all = true;
            p.services.clear();
            p.slices.clear();
            times.truncate(MAX_TRIGGER_TIMES.saturating_sub(p.trigger_times.len()));
            p.trigger_times.extend(times);
        });
    }

    fn is_dirty(&self) -> bool {
        self.pending(|p| p.dirty)
    }
}

fn unix_now() -> f64 {
    Timestamp::now().as_millisecond() as f64 / 1000.0
}

fn trigger_time(slice: &EndpointSlice) -> Option<Timestamp> {
    slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?
        .parse()
        .ok()
}

/// The stores the sync loop reads: what the proxy keeps of each object ([`ServiceObject`],
/// [`SliceObject`], a trimmed Node), never the API objects themselves.
#[derive(Clone)]
pub struct Stores {
    /// Services.
    pub services: Store<ServiceObject>,
    /// EndpointSlices.
    pub slices: Store<SliceObject>,
    /// The own Node (at most one object).
    pub node: Store<Node>,
}

/// Keyed by namespace and name alone in the stores: no resource version or UID is copied
/// into each key.
macro_rules! lookup {
    ($kept:ty, $api:ty) => {
        impl reflector::Lookup for $kept {
            type DynamicType = ();

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                <$api as k8s_openapi::Resource>::KIND.into()
            }

            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                <$api as k8s_openapi::Resource>::GROUP.into()
            }

            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                <$api as k8s_openapi::Resource>::VERSION.into()
            }

            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                <$api as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }

            fn name(&self) -> Option<std::borrow::Cow<'_, str>> {
                Some(self.name.as_str().into())
            }

            fn namespace(&self) -> Option<std::borrow::Cow<'_, str>> {
                Some(self.namespace.as_str().into())
            }

            fn resource_version(&self) -> Option<std::borrow::Cow<'_, str>> {
                None
            }

            fn uid(&self) -> Option<std::borrow::Cow<'_, str>> {
                None
            }
        }
    };
}
lookup!(ServiceObject, Service);
lookup!(SliceObject, EndpointSlice);

/// Label selector of upstream kube-proxy's informers: objects of other proxies and headless
/// Services are none of ours.
fn selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// A watch event carrying `keep(object)` instead of the object.
fn kept<K, T>(event: watcher::Event<K>, keep: &mut impl FnMut(K) -> T) -> watcher::Event<T> {
    match event {
        watcher::Event::Apply(obj) => watcher::Event::Apply(keep(obj)),
        watcher::Event::Delete(obj) => watcher::Event::Delete(keep(obj)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(obj) => watcher::Event::InitApply(keep(obj)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Drives one watch until its stream ends: each object becomes `keep(object)` in `store`
/// (the API object is dropped there), then its change is reported to `tracker`.
async fn drive<K, T>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    mut store: reflector::store::Writer<T>,
    mut keep: impl FnMut(K) -> T,
    kind: Kind,
    tracker: Arc<Tracker>,
    trigger: fn(&K) -> Option<Timestamp>,
) where
    K: kube::Resource,
    T: reflector::Lookup + Clone,
    T::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut stream = pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let change = match &event {
                    watcher::Event::Apply(obj) | watcher::Event::Delete(obj) => {
                        let meta = obj.meta();
                        let name = (
                            meta.namespace.clone().unwrap_or_default(),
                            meta.name.clone().unwrap_or_default(),
                        );
                        Some((Some(name), trigger(obj)))
                    }
                    // A (re)list replaced the store: whatever changed meanwhile is in it now.
                    watcher::Event::InitDone => {
                        if failing {
                            tracing::info!(?kind, "watch recovered");
                        }
                        Some((None, None))
                    }
                    watcher::Event::Init | watcher::Event::InitApply(_) => None,
                };
                store.apply_watcher_event(&kept(event, &mut keep));
                if let Some((name, trigger)) = change {
                    failing = false;
                    tracker.changed(kind, name, trigger);
                }
            }
            Err(e) => {
                // The watcher retries with backoff; rules stay as they are meanwhile.
                if !failing {
                    tracing::warn!(?kind, error = %e, "watch failed; keeping the current rules");
                } else {
                    tracing::debug!(?kind, error = %e, "watch still failing");
                }
                failing = true;
            }
        }
    }
}

/// Starts the three watches; their tasks end with the returned handles.
pub fn watch(
    client: &Client,
    node_name: &str,
    tracker: &Arc<Tracker>,
) -> (Stores, Vec<tokio::task::JoinHandle<()>>) {
    // Initial lists from the API server's watch cache (`resourceVersion=0`), as upstream's
    // informers do: one response instead of pages read from etcd.
    let config = watcher::Config::default()
        .labels(&selector())
        .any_semantic();
    let (services, writer) = reflector::store();
    let stream = watcher(Api::<Service>::all(client.clone()), config.clone()).default_backoff();
    let svc_task = tokio::spawn(drive(
        stream,
        writer,
        |svc| ServiceObject::new(&svc),
        Kind::Service,
        tracker.clone(),
        |_| None,
    ));

    let (slices, writer) = reflector::store();
    let stream = watcher(Api::<EndpointSlice>::all(client.clone()), config).default_backoff();
    let mut interner = Interner::default();
    let slice_task = tokio::spawn(drive(
        stream,
        writer,
        move |slice| SliceObject::new(&slice, &mut interner),
        Kind::EndpointSlice,
        tracker.clone(),
        trigger_time,
    ));

    let (node, writer) = reflector::store();
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={node_name}"))
        .any_semantic();
    let stream = watcher(Api::<Node>::all(client.clone()), config).default_backoff();
    // Node status is rewritten often (heartbeats); only what the model reads is a change.
    let mut last: Option<NodeInfo> = None;
    let stream = stream.filter(move |event| {
        let keep = match event {
            Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => {
                let info = NodeInfo::from_node(node);
                let changed = last.as_ref() != Some(&info);
                last = Some(info);
                changed
            }
            _ => true,
        };
        futures::future::ready(keep)
    });
    let node_task = tokio::spawn(drive(
        stream,
        writer,
        trim_node,
        Kind::Node,
        tracker.clone(),
        |_| None,
    ));
    (
        Stores {
            services,
            slices,
            node,
        },
        vec![svc_task, slice_task, node_task],
    )
}

/// The own Node as the proxy keeps it: its name, labels and addresses (the rest of its
/// status, images and conditions, is most of its size and changes with every heartbeat).
fn trim_node(node: Node) -> Node {
    Node {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: node.metadata.name,
            labels: node.metadata.labels,
            ..Default::default()
        },
        spec: None,
        status: node
            .status
            .map(|status| k8s_openapi::api::core::v1::NodeStatus {
                addresses: status.addresses,
                ..Default::default()
            }),
    }
}

/// Turns model warnings into log lines and (best effort, rate-limited) Events.
pub struct WarningReporter {
    recorder: Option<Recorder>,
    last: HashMap<(&'static str, String, String, &'static str), Instant>,
}

impl WarningReporter {
    /// Reports through `client` as `strake-proxy` on `node_name`; `None` only logs.
    pub fn new(client: Option<Client>, node_name: &str) -> Self {
        WarningReporter {
            recorder: client.map(|c| {
                Recorder::new(
                    c,
                    Reporter {
                        controller: "strake-proxy".into(),
                        instance: Some(node_name.to_string()),
                    },
                )
            }),
            last: HashMap::new(),
        }
    }

    /// Logs and reports the warnings not reported within [`WARNING_QUIET_PERIOD`]; returns how
    /// many were new.
    pub fn report(&mut self, warnings: &[Warning], stores: Option<&Stores>) -> usize {
        let now = Instant::now();
        self.last
            .retain(|_, at| now.saturating_duration_since(*at) < WARNING_QUIET_PERIOD);
        let mut fresh = 0;
        for w in warnings {
            let key = (w.kind, w.namespace.clone(), w.name.clone(), w.reason);
            if self.last.contains_key(&key) {
                continue;
            }
            self.last.insert(key, now);
            fresh += 1;
            tracing::warn!(
                kind = w.kind,
                namespace = %w.namespace,
                name = %w.name,
                reason = w.reason,
                "{}", w.message
            );
            let Some(recorder) = &self.recorder else {
                continue;
            };
            if fresh > EVENTS_PER_SYNC {
                continue;
            }
            let reference = object_reference(w, stores);
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: w.reason.to_string(),
                note: Some(format!("skipped by strake-proxy: {}", w.message)),
                action: "Skip".into(),
                secondary: None,
            };
            let recorder = recorder.clone();
            let (kind, ns, name) = (w.kind, w.namespace.clone(), w.name.clone());
            tokio::spawn(async move {
                if let Err(e) = recorder.publish(&event, &reference).await {
                    tracing::debug!(kind, namespace = %ns, name = %name, error = %e, "cannot publish Event");
                }
            });
        }
        fresh
    }
}

fn object_reference(w: &Warning, stores: Option<&Stores>) -> ObjectReference {
    let key = |name: &str, ns: &str| (name.to_string(), ns.to_string());
    let (name, ns) = key(&w.name, &w.namespace);
    let (api_version, uid) = match w.kind {
        "Service" => (
            <Service as k8s_openapi::Resource>::API_VERSION,
            stores.and_then(|s| {
                s.services
                    .get(&ObjectRef::new_with(&name, ()).within(&ns))
                    .and_then(|o| o.uid.clone())
            }),
        ),
        _ => (
            <EndpointSlice as k8s_openapi::Resource>::API_VERSION,
            stores.and_then(|s| {
                s.slices
                    .get(&ObjectRef::new_with(&name, ()).within(&ns))
                    .and_then(|o| o.uid.clone())
            }),
        ),
    };
    ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(w.kind.to_string()),
        name: Some(name),
        namespace: Some(ns),
        uid,
        ..ObjectReference::default()
    }
}

/// Syncs allowed back to back before `--min-sync-period` spaces them (upstream's
/// bounded-frequency runner allows a burst of two).
const SYNC_BURST: u32 = 2;

/// The sync loop's clock-driven decisions, apart from I/O (unit-tested with paused time).
/// Changes are synced at most at the rate of one per `--min-sync-period`, with a burst of
/// [`SYNC_BURST`] (a token bucket, as upstream's kube-proxy does).
#[derive(Debug)]
pub struct Schedule {
    min_sync_period: Duration,
    sync_period: Duration,
    last_sync: Option<Instant>,
    last_full: Option<Instant>,
    failed: bool,
    /// Tokens in the bucket at `last_sync` (after that sync took its own).
    tokens: f64,
}

impl Schedule {
    /// A schedule whose first sync is due at once.
    pub fn new(min_sync_period: Duration, sync_period: Duration) -> Self {
        Schedule {
            min_sync_period,
            sync_period,
            last_sync: None,
            last_full: None,
            failed: false,
            tokens: f64::from(SYNC_BURST),
        }
    }

    /// When the next sync is due, given whether changes are pending.
    pub fn next(&self, dirty: bool) -> Instant {
        let Some(last) = self.last_sync else {
            return Instant::now();
        };
        if self.failed {
            // Not faster than once a second, even with `--min-sync-period=0`: a broken nft
            // would otherwise be retried in a tight loop.
            last + self.min_sync_period.max(FAILURE_RETRY_MIN)
        } else if dirty {
            // When the bucket, refilled at one token per min-sync-period, holds one again.
            let missing = (1.0 - self.tokens).max(0.0);
            last + self.min_sync_period.mul_f64(missing)
        } else {
            last + self.sync_period
        }
    }

    /// Whether the sync starting now must rewrite everything.
    pub fn needs_full(&self, now: Instant) -> bool {
        self.failed
            || self
                .last_full
                .is_none_or(|t| now.saturating_duration_since(t) >= FULL_SYNC_PERIOD)
    }

    /// Records a sync that started at `started`.
    pub fn record(&mut self, started: Instant, ok: bool, full: bool) {
        let refilled = match self.last_sync {
            None => f64::from(SYNC_BURST),
            Some(_) if self.min_sync_period.is_zero() => f64::from(SYNC_BURST),
            Some(last) => {
                let elapsed = started.saturating_duration_since(last);
                self.tokens + elapsed.as_secs_f64() / self.min_sync_period.as_secs_f64()
            }
        };
        self.tokens = (refilled.min(f64::from(SYNC_BURST)) - 1.0).max(0.0);
        self.last_sync = Some(started);
        self.failed = !ok;
        if ok && full {
            self.last_full = Some(started);
        }
    }
}

/// The seams a sync writes the kernel's state through.
#[derive(Clone)]
pub struct Kernel {
    /// nftables: the rules.
    pub nft: Arc<dyn Nft>,
    /// The connection tracking table: stale UDP flows.
    pub conntrack: Arc<dyn Conntrack>,
}

/// Runs syncs until `shutdown` completes. Waits for the Service and EndpointSlice stores to be
/// listed first, so that a restart never programs an empty ruleset over a good one.
pub async fn run(
    config: &DaemonConfig,
    stores: Stores,
    tracker: Arc<Tracker>,
    kernel: Kernel,
    mut warnings: WarningReporter,
    mut health_checks: Option<HealthCheckPorts>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = pin!(shutdown);
    let ready = async {
        let _ = stores.services.wait_until_ready().await;
        let _ = stores.slices.wait_until_ready().await;
    };
    tokio::select! {
        _ = &mut shutdown => return,
        _ = ready => {}
    }
    tracing::info!(
        services = stores.services.len(),
        endpoint_slices = stores.slices.len(),
        "initial list done"
    );
    let mut schedule = Schedule::new(config.min_sync_period, config.sync_period);
    let mut programmer = Some(Programmer::new(&config.proxy));
    // What the last successful sync programmed for UDP; `None` before the first one: a
    // restart keeps the rules, so entries made before it are still right.
    let mut udp: Option<UdpState> = None;
    loop {
        let due = schedule.next(tracker.is_dirty());
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep_until(due) => {}
            // A change may bring the due time forward (from the period to the minimum).
            _ = tracker.notify.notified(), if !tracker.is_dirty() => continue,
        }
        let started = Instant::now();
        // Lost only if a sync panicked: start over with a full sync.
        let mut current = programmer
            .take()
            .unwrap_or_else(|| Programmer::new(&config.proxy));
        if schedule.needs_full(started) {
            current.force_full();
        }
        let (trigger_times, changes) = tracker.take();
        // Every object for a programmer that never saw them all, and on the long period
        // (a check of the bookkeeping); else only those that changed.
        let objects = match changes {
            Changes::Named { services, slices }
                if !current.needs_all() && !schedule.needs_full(started) =>
            {
                let service = |k: Key| {
                    let now = stores
                        .services
                        .get(&ObjectRef::new_with(&k.1, ()).within(&k.0));
                    (k, now)
                };
                let slice = |k: Key| {
                    let now = stores
                        .slices
                        .get(&ObjectRef::new_with(&k.1, ()).within(&k.0));
                    (k, now)
                };
                Objects::Changed(
                    services.into_iter().map(service).collect(),
                    slices.into_iter().map(slice).collect(),
                )
            }
            _ => Objects::All(stores.services.state(), stores.slices.state()),
        };
        let node = stores.node.state().into_iter().next();
        let Kernel { nft, conntrack: ct } = kernel.clone();
        let old_udp = udp.clone();
        let job = tokio::task::spawn_blocking(move || {
            let node = node.as_deref();
            let result = match objects {
                Objects::All(services, slices) => {
                    current.sync(nft.as_ref(), &services, &slices, node)
                }
                Objects::Changed(services, slices) => {
                    current.sync_changed(nft.as_ref(), services, slices, node)
                }
            };
            let hc = current.health_checks();
            let new_udp = current.udp_state();
            let ports = current.model().services.len();
            let warnings = current.warnings();
            // Only once the new rules are in: a deleted entry is re-made by the next packet.
            if result.is_ok()
                && let Some(old) = &old_udp
            {
                let stale = conntrack::stale(old, &new_udp);
                if !stale.is_empty() {
                    let failed = conntrack::clean(ct.as_ref(), &stale);
                    tracing::debug!(
                        deletions = stale.len(),
                        failed,
                        "cleaned stale UDP conntrack entries"
                    );
                }
            }
            (current, result, warnings, ports, hc, new_udp)
        })
        .await;
        let took = started.elapsed();
        let (back, result, model_warnings, ports, hc, new_udp) = match job {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "sync task panicked");
                tracker.put_back(trigger_times);
                tracker.health.failed(Instant::now());
                schedule.record(started, false, false);
                continue;
            }
        };
        programmer = Some(back);
        warnings.report(&model_warnings, Some(&stores));
        if let Some(health_checks) = health_checks.as_mut() {
            health_checks.sync(hc);
        }
        match result {
            Ok(report) => {
                udp = Some(new_udp);
                let wall = Timestamp::now();
                tracker.metrics.observe_sync(
                    report.full,
                    took,
                    wall.as_millisecond() as f64 / 1000.0,
                );
                tracker.metrics.update(|v| {
                    for t in &trigger_times {
                        let secs = wall.duration_since(*t).as_secs_f64();
                        if secs >= 0.0 {
                            v.network_programming_duration.observe(secs);
                        }
                    }
                });
                tracker.health.synced(started, wall);
                schedule.record(started, true, report.full);
                tracing::debug!(
                    full = report.full,
                    bytes = report.bytes,
                    commands = report.commands,
                    service_ports = ports,
                    took_ms = took.as_millis() as u64,
                    "synced"
                );
                if report.full {
                    tracing::info!(
                        service_ports = ports,
                        bytes = report.bytes,
                        took_ms = took.as_millis() as u64,
                        "full sync done"
                    );
                }
            }
            Err(e) => {
                tracing::error!(error = %e, source = %error_chain(&e), "sync failed; keeping the last rules, retrying with a full sync");
                tracker.metrics.update(|v| v.sync_failures += 1);
                tracker.put_back(trigger_times);
                tracker.health.failed(Instant::now());
                schedule.record(started, false, false);
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn schedule_batches_changes_and_syncs_periodically() {
        let min = Duration::from_secs(1);
        let period = Duration::from_secs(30);
        let mut s = Schedule::new(min, period);
        let t0 = Instant::now();
        assert!(s.next(false) >= t0);
        assert!(s.needs_full(t0));
        s.record(t0, true, true);
        assert!(!s.needs_full(t0));
        // Idle: the next sync is the periodic one; a change right after a sync goes out at
        // once (a burst of two), a third waits for the bucket to refill (min-sync-period).
        assert_eq!(s.next(false), t0 + period);
        assert_eq!(s.next(true), t0);
        s.record(t0, true, false);
        assert_eq!(s.next(true), t0 + min);
        s.record(t0 + min, true, false);
        assert_eq!(s.next(true), t0 + 2 * min);
        // After a quiet spell the bucket is full again: two at once.
        let t = t0 + 10 * min;
        s.record(t, true, false);
        assert_eq!(s.next(true), t);
        let mut s = Schedule::new(min, period);
        s.record(t0, true, true);
        // A failure retries after min-sync-period, and in full.
        let t1 = t0 + Duration::from_secs(5);
        s.record(t1, false, false);
        assert_eq!(s.next(false), t1 + FAILURE_RETRY_MIN);
        assert!(s.needs_full(t1));
        s.record(t1 + min, true, true);
        assert!(!s.needs_full(t1 + min));
        // A full sync every FULL_SYNC_PERIOD.
        assert!(s.needs_full(t1 + min + FULL_SYNC_PERIOD));
    }

    #[test]
    fn tracker_counts_changes_and_keeps_trigger_times_until_programmed() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let metrics = Arc::new(Metrics::default());
        let t = Tracker::new(health, metrics.clone());
        let ts: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        let name = |n: &str| Some(("default".to_string(), n.to_string()));
        t.changed(Kind::Service, name("a"), None);
        t.changed(Kind::EndpointSlice, name("a-1"), Some(ts));
        t.changed(Kind::EndpointSlice, name("a-1"), None);
        let v = metrics.snapshot();
        assert_eq!((v.service_changes, v.endpoint_changes), (1, 2));
        assert!(t.is_dirty());
        let (taken, changes) = t.take();
        assert_eq!(taken, vec![ts]);
        // The objects that changed, each once.
        assert_eq!(
            changes,
            Changes::Named {
                services: vec![name("a").unwrap()],
                slices: vec![name("a-1").unwrap()],
            }
        );
        assert!(!t.is_dirty());
        // A failed sync gives its changes back as "everything".
        t.put_back(taken);
        assert!(t.is_dirty());
        let (times, changes) = t.take();
        assert_eq!((times.len(), changes), (1, Changes::All));
        // A relist or the Node: everything; so are too many names.
        t.changed(Kind::Service, name("b"), None);
        t.changed(Kind::Node, None, None);
        assert_eq!(t.take().1, Changes::All);
        for i in 0..=MAX_NAMED_CHANGES {
            t.changed(Kind::Service, name(&format!("s-{i}")), None);
        }
        assert_eq!(t.take().1, Changes::All);
        assert_eq!(
            t.take().1,
            Changes::Named {
                services: vec![],
                slices: vec![]
            }
        );
    }

    #[tokio::test]
    async fn warnings_are_reported_once_per_quiet_period() {
        let mut r = WarningReporter::new(None, "node-a");
        let w = Warning {
            kind: "Service",
            namespace: "default".into(),
            name: "bad".into(),
            reason: "InvalidClusterIP",
            message: "nope".into(),
        };
        assert_eq!(r.report(std::slice::from_ref(&w), None), 1);
        assert_eq!(r.report(std::slice::from_ref(&w), None), 0);
    }

    /// A Service watch event as the Service watch stores it.
    fn kept_service(event: watcher::Event<Service>) -> watcher::Event<ServiceObject> {
        kept(event, &mut |svc| ServiceObject::new(&svc))
    }

    /// An EndpointSlice watch event as the EndpointSlice watch stores it.
    fn kept_slice(event: watcher::Event<EndpointSlice>) -> watcher::Event<SliceObject> {
        kept(event, &mut |slice| {
            SliceObject::new(&slice, &mut Interner::default())
        })
    }

    /// `default/<name>`, as a watch names a changed object.
    fn named(name: &str) -> Option<Key> {
        Some(("default".to_string(), name.to_string()))
    }

    /// Waits (real time, up to 5 s) until `f` holds.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn sync_loop_syncs_full_then_batches_changes_and_retries_failures_in_full() {
        use crate::nft::RecordingNft;
        use crate::testutil::{config, simple};

        let (services, mut svc_writer) = reflector::store::<ServiceObject>();
        let (slices, mut slice_writer) = reflector::store::<SliceObject>();
        let (node, _node_writer) = reflector::store::<Node>();
        let stores = Stores {
            services,
            slices,
            node,
        };
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let metrics = Arc::new(Metrics::default());
        let tracker = Arc::new(Tracker::new(health.clone(), metrics.clone()));
        let nft = Arc::new(RecordingNft::default());
        let conntrack = Arc::new(crate::conntrack::RecordingConntrack::default());
        let daemon = DaemonConfig {
            nft_backend: crate::config::NftBackend::default(),
            proxy: config(),
            kubeconfig: None,
            sync_period: Duration::from_secs(30),
            min_sync_period: Duration::from_millis(200),
            healthz_bind_address: "127.0.0.1:0".parse().unwrap(),
            metrics_bind_address: "127.0.0.1:0".parse().unwrap(),
            cleanup: false,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let (stores, tracker, nft) = (stores.clone(), tracker.clone(), nft.clone());
            let conntrack = conntrack.clone();
            tokio::spawn(async move {
                run(
                    &daemon,
                    stores,
                    tracker,
                    Kernel { nft, conntrack },
                    WarningReporter::new(None, "node-a"),
                    None,
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            })
        };

        // Nothing is programmed before the initial lists are complete.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(nft.scripts().is_empty());
        let (a, sa) = simple("default", "a", "10.96.0.1", &["10.244.1.1"]);
        svc_writer.apply_watcher_event(&kept_service(watcher::Event::Init));
        svc_writer.apply_watcher_event(&kept_service(watcher::Event::InitApply(a)));
        svc_writer.apply_watcher_event(&kept_service(watcher::Event::InitDone));
        slice_writer.apply_watcher_event(&kept_slice(watcher::Event::Init));
        slice_writer.apply_watcher_event(&kept_slice(watcher::Event::InitApply(sa)));
        slice_writer.apply_watcher_event(&kept_slice(watcher::Event::InitDone));
        eventually("the first sync", || nft.scripts().len() == 1).await;
        assert!(nft.scripts()[0].contains("delete table ip strake-proxy"));
        assert!(nft.scripts()[0].contains("10.244.1.1"));

        // Three changes in a burst: one partial sync, after min-sync-period.
        for ip in ["10.244.1.2", "10.244.1.3", "10.244.1.4"] {
            let (_, slice) = simple("default", "a", "10.96.0.1", &[ip]);
            slice_writer.apply_watcher_event(&kept_slice(watcher::Event::Apply(slice)));
            tracker.changed(Kind::EndpointSlice, named("a-1"), None);
        }
        eventually("the batched sync", || nft.scripts().len() == 2).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let scripts = nft.scripts();
        assert_eq!(scripts.len(), 2, "{scripts:#?}");
        assert!(!scripts[1].contains("delete table"), "{}", scripts[1]);
        assert!(scripts[1].contains("10.244.1.4") && !scripts[1].contains("10.244.1.2"));
        assert_eq!(metrics.snapshot().endpoint_changes, 3);
        // TCP only: no conntrack cleanup.
        assert!(conntrack.deleted().is_empty());

        // A failed sync: unhealthy, retried in full, healthy again.
        nft.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (_, slice) = simple("default", "a", "10.96.0.1", &["10.244.1.5"]);
        slice_writer.apply_watcher_event(&kept_slice(watcher::Event::Apply(slice)));
        tracker.changed(Kind::EndpointSlice, named("a-1"), None);
        eventually("the failure", || metrics.snapshot().sync_failures == 1).await;
        let wall = Timestamp::now();
        assert!(!health.report(Instant::now(), wall).healthy);
        eventually("the retry", || nft.scripts().len() == 3).await;
        assert!(nft.scripts()[2].contains("delete table ip strake-proxy"));
        assert!(nft.scripts()[2].contains("10.244.1.5"));
        eventually("health to recover", || {
            health.report(Instant::now(), Timestamp::now()).healthy
        })
        .await;

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn sync_loop_deletes_flows_of_removed_udp_endpoints_after_the_rules_change() {
        use crate::conntrack::{Deletion, RecordingConntrack};
        use crate::nft::RecordingNft;
        use crate::testutil::{config, ep, service, slice};

        let dns = service(
            "default",
            "dns",
            serde_json::json!({ "clusterIP": "10.96.0.53", "ports": [{ "port": 53, "protocol": "UDP" }] }),
        );
        let dns_slice = |ips: &[&str]| {
            let eps: Vec<_> = ips.iter().map(|ip| ep(ip, "node-b", true)).collect();
            slice(
                "default",
                "dns",
                "dns-1",
                "IPv4",
                serde_json::json!([{ "port": 5353, "protocol": "UDP" }]),
                serde_json::json!(eps),
            )
        };
        let (services, mut svc_writer) = reflector::store::<ServiceObject>();
        let (slices, mut slice_writer) = reflector::store::<SliceObject>();
        let (node, _node_writer) = reflector::store::<Node>();
        let stores = Stores {
            services,
            slices,
            node,
        };
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let tracker = Arc::new(Tracker::new(health, Arc::new(Metrics::default())));
        let nft = Arc::new(RecordingNft::default());
        let conntrack = Arc::new(RecordingConntrack::default());
        let daemon = DaemonConfig {
            nft_backend: crate::config::NftBackend::default(),
            proxy: config(),
            kubeconfig: None,
            sync_period: Duration::from_secs(30),
            min_sync_period: Duration::from_millis(50),
            healthz_bind_address: "127.0.0.1:0".parse().unwrap(),
            metrics_bind_address: "127.0.0.1:0".parse().unwrap(),
            cleanup: false,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let kernel = Kernel {
                nft: nft.clone(),
                conntrack: conntrack.clone(),
            };
            let (stores, tracker) = (stores.clone(), tracker.clone());
            tokio::spawn(async move {
                run(
                    &daemon,
                    stores,
                    tracker,
                    kernel,
                    WarningReporter::new(None, "node-a"),
                    None,
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            })
        };
        svc_writer.apply_watcher_event(&kept_service(watcher::Event::Init));
        svc_writer.apply_watcher_event(&kept_service(watcher::Event::InitApply(dns)));
        svc_writer.apply_watcher_event(&kept_service(watcher::Event::InitDone));
        slice_writer.apply_watcher_event(&kept_slice(watcher::Event::Init));
        slice_writer.apply_watcher_event(&kept_slice(watcher::Event::InitApply(dns_slice(&[
            "10.244.1.1",
            "10.244.1.2",
        ]))));
        slice_writer.apply_watcher_event(&kept_slice(watcher::Event::InitDone));
        eventually("the first sync", || nft.scripts().len() == 1).await;
        // After a (re)start the kernel's entries match the kept rules: nothing is deleted.
        assert!(conntrack.deleted().is_empty());

        slice_writer.apply_watcher_event(&kept_slice(watcher::Event::Apply(dns_slice(&[
            "10.244.1.2",
        ]))));
        tracker.changed(Kind::EndpointSlice, named("dns-1"), None);
        eventually("the cleanup", || !conntrack.deleted().is_empty()).await;
        assert_eq!(
            nft.scripts().len(),
            2,
            "deleted after the new rules were applied"
        );
        assert_eq!(
            conntrack.deleted(),
            [Deletion::ReplyFrom {
                ip: "10.244.1.1".parse().unwrap(),
                port: 5353
            }]
        );

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn the_kept_node_keeps_what_the_model_reads_and_drops_its_status() {
        let full: Node = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "node-a", "uid": "u",
                          "labels": { "topology.kubernetes.io/zone": "z1" },
                          "annotations": { "node.alpha.kubernetes.io/ttl": "0" },
                          "managedFields": [{ "manager": "kubelet", "operation": "Update" }] },
            "spec": { "podCIDR": "10.244.1.0/24" },
            "status": {
                "addresses": [{ "type": "InternalIP", "address": "10.0.0.5" },
                              { "type": "Hostname", "address": "node-a" }],
                "images": [{ "names": ["registry/x:1"], "sizeBytes": 1 }],
                "capacity": { "cpu": "2" }
            }
        }))
        .unwrap();
        let kept = trim_node(full.clone());
        assert_eq!(NodeInfo::from_node(&full), NodeInfo::from_node(&kept));
        assert_eq!(NodeInfo::from_node(&kept).zone.as_deref(), Some("z1"));
        let status = kept.status.as_ref().unwrap();
        assert!(status.images.is_none() && status.capacity.is_none());
        assert!(kept.metadata.managed_fields.is_none() && kept.metadata.annotations.is_none());
        assert!(kept.spec.is_none());
    }

    #[test]
    fn reads_trigger_time_annotation() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": { "annotations": { TRIGGER_TIME_ANNOTATION: "2024-05-01T10:00:00Z" } },
            "addressType": "IPv4",
            "endpoints": [],
        }))
        .unwrap();
        assert_eq!(
            trigger_time(&slice),
            Some("2024-05-01T10:00:00Z".parse().unwrap())
        );
    }
}
