//! One relist of the runtime for the whole node, shared by every pod worker, as upstream's
//! PLEG relists once per period instead of once per pod: a worker asks for a snapshot started
//! after its own last change to the runtime (listings are numbered, so this holds whatever the
//! clock's resolution) and at most one period old; concurrent askers share one
//! `ListPodSandbox` + `ListContainers` pair. At 100 pods and steady state that
//! is two CRI calls per second for the node instead of two per pod.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use strake_types::cri;
use tokio::time::Instant;

use crate::pod_spec::labels::POD_UID;
use crate::runtime::{Cri, RuntimeError};

/// How old a snapshot a worker's periodic sync accepts.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Everything the runtime listed at one moment.
#[derive(Debug)]
pub struct Snapshot {
    /// The listing's number: it reflects every change completed before
    /// [`Relist::next_listing`] returned this number or less.
    pub number: u64,
    /// When the listing started.
    pub taken: Instant,
    pub sandboxes: Vec<cri::PodSandbox>,
    pub containers: Vec<cri::Container>,
    /// Positions in the lists by pod UID, made by the first [`Snapshot::of_pod`]: every
    /// worker looks up its own pod in the same listing, and a scan each would cost the node
    /// pods x (sandboxes + containers) comparisons per period.
    by_pod: OnceLock<HashMap<String, Share>>,
}

/// One pod's positions in a [`Snapshot`]'s lists.
#[derive(Debug, Default)]
struct Share {
    sandboxes: Vec<usize>,
    containers: Vec<usize>,
}

impl Snapshot {
    /// A snapshot of these lists.
    pub fn new(
        number: u64,
        taken: Instant,
        sandboxes: Vec<cri::PodSandbox>,
        containers: Vec<cri::Container>,
    ) -> Self {
        Snapshot {
            number,
            taken,
            sandboxes,
            containers,
            by_pod: OnceLock::new(),
        }
    }

    /// The sandboxes and containers of pod `uid`.
    pub fn of_pod(&self, uid: &str) -> (Vec<&cri::PodSandbox>, Vec<&cri::Container>) {
        let index = self.by_pod.get_or_init(|| self.index());
        let Some(share) = index.get(uid) else {
            return (Vec::new(), Vec::new());
        };
        (
            share
                .sandboxes
                .iter()
                .map(|&i| &self.sandboxes[i])
                .collect(),
            share
                .containers
                .iter()
                .map(|&i| &self.containers[i])
                .collect(),
        )
    }

    /// A sandbox belongs to the pod its metadata or its pod-UID label names (both, if they
    /// differ); a container to the one its label names.
    fn index(&self) -> HashMap<String, Share> {
        let mut index: HashMap<String, Share> = HashMap::new();
        for (i, s) in self.sandboxes.iter().enumerate() {
            let by_meta = s.metadata.as_ref().map(|m| m.uid.as_str());
            let by_label = s.labels.get(POD_UID).map(String::as_str);
            for uid in [by_meta, by_label.filter(|l| Some(*l) != by_meta)]
                .into_iter()
                .flatten()
            {
                index.entry(uid.to_string()).or_default().sandboxes.push(i);
            }
        }
        for (i, c) in self.containers.iter().enumerate() {
            if let Some(uid) = c.labels.get(POD_UID) {
                index.entry(uid.clone()).or_default().containers.push(i);
            }
        }
        index
    }
}

/// The node's shared relist.
#[derive(Debug)]
pub struct Relist {
    cri: Arc<dyn Cri>,
    /// How old a listing may be reused (zero: never).
    max_age: Duration,
    /// Listings started so far.
    started: AtomicU64,
    last: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
}

impl Relist {
    /// Listings reused for up to `max_age` ([`PERIOD`] in the kubelet).
    pub fn new(cri: Arc<dyn Cri>, max_age: Duration) -> Self {
        Relist {
            cri,
            max_age,
            started: AtomicU64::new(0),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The number of the next listing to start: a worker that just changed something in the
    /// runtime asks for a snapshot numbered at least this.
    pub fn next_listing(&self) -> u64 {
        self.started.load(Ordering::SeqCst) + 1
    }

    /// A snapshot numbered `at_least` or more and younger than the maximum age: the last one
    /// if it qualifies, else a new listing (which the workers waiting meanwhile share).
    pub async fn snapshot(&self, at_least: u64) -> Result<Arc<Snapshot>, RuntimeError> {
        let mut last = self.last.lock().await;
        if let Some(s) = last.as_ref()
            && s.number >= at_least
            && s.taken.elapsed() < self.max_age
        {
            return Ok(s.clone());
        }
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let taken = Instant::now();
        let sandboxes = self.cri.list_sandboxes(None).await?;
        let containers = self.cri.list_containers(None).await?;
        let snapshot = Arc::new(Snapshot::new(number, taken, sandboxes, containers));
        *last = Some(snapshot.clone());
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeCri;

    #[tokio::test(start_paused = true)]
    async fn workers_share_recent_listings_and_never_get_one_from_before_their_change() {
        let fake = Arc::new(FakeCri::default());
        let relist = Relist::new(fake.clone(), PERIOD);
        let lists = || fake.list_calls();
        let a = relist.snapshot(0).await.unwrap();
        let b = relist.snapshot(0).await.unwrap();
        assert!(Arc::ptr_eq(&a, &b), "a second worker reuses the listing");
        assert_eq!(lists(), 2, "one ListPodSandbox and one ListContainers");
        // A worker that changed something (at the same instant: the clock is paused) gets a
        // new listing, which the others then share.
        let changed = relist.next_listing();
        let c = relist.snapshot(changed).await.unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(lists(), 4);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(Arc::ptr_eq(&c, &relist.snapshot(0).await.unwrap()));
        assert_eq!(lists(), 4);
        // Past the period, a new one.
        tokio::time::advance(PERIOD).await;
        relist.snapshot(0).await.unwrap();
        assert_eq!(lists(), 6);
        // With no maximum age every ask lists.
        let always = Relist::new(fake.clone(), Duration::ZERO);
        always.snapshot(0).await.unwrap();
        always.snapshot(0).await.unwrap();
        assert_eq!(lists(), 10);
    }

    #[test]
    fn a_pods_share_is_picked_by_its_uid() {
        let sandbox = |id: &str, uid: &str| cri::PodSandbox {
            id: id.into(),
            metadata: Some(cri::PodSandboxMetadata {
                uid: uid.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let container = |id: &str, uid: &str| cri::Container {
            id: id.into(),
            labels: [(POD_UID.to_string(), uid.to_string())].into(),
            ..Default::default()
        };
        let mut labelled = sandbox("s3", "c");
        labelled.labels.insert(POD_UID.to_string(), "d".to_string());
        let snap = Snapshot::new(
            1,
            Instant::now(),
            vec![sandbox("s1", "a"), sandbox("s2", "b"), labelled],
            vec![
                container("c1", "a"),
                container("c2", "b"),
                cri::Container::default(),
                container("c3", "a"),
            ],
        );
        let ids = |uid: &str| {
            let (s, c) = snap.of_pod(uid);
            (
                s.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
                c.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(ids("a"), (vec!["s1"], vec!["c1", "c3"]));
        assert_eq!(ids("b"), (vec!["s2"], vec!["c2"]));
        // By metadata or by label, as the runtime recorded it.
        assert_eq!(ids("c"), (vec!["s3"], vec![]));
        assert_eq!(ids("d"), (vec!["s3"], vec![]));
        assert_eq!(ids("unknown"), (vec![], vec![]));
    }
}
