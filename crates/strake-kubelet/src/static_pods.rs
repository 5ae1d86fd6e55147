//! Static pods: pods defined by manifest files in `--pod-manifest-path` (`staticPodPath`), run
//! without any API server, and mirrored to it when there is one.
//!
//! As upstream does: a static pod is named `<name>-<node>`, its UID is a hash of its manifest
//! and the node, and it carries the `kubernetes.io/config.{source,hash}` annotations. Its mirror
//! in the API carries `kubernetes.io/config.mirror` and is owned by the Node; the kubelet never
//! runs a mirror pod itself. The directory is re-read every `fileCheckFrequency`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, PostParams};
use tokio::sync::mpsc;

pub const CONFIG_SOURCE: &str = "kubernetes.io/config.source";
pub const CONFIG_HASH: &str = "kubernetes.io/config.hash";
pub const CONFIG_MIRROR: &str = "kubernetes.io/config.mirror";

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a String> {
    pod.metadata.annotations.as_ref()?.get(key)
}

/// Whether the pod came from a manifest file.
pub fn is_static(pod: &Pod) -> bool {
    annotation(pod, CONFIG_SOURCE).is_some_and(|s| s == "file")
}

/// Whether the pod is the API's mirror of a static pod.
pub fn is_mirror(pod: &Pod) -> bool {
    annotation(pod, CONFIG_MIRROR).is_some()
}

/// FNV-1a, 64 bits: a stable content hash for UIDs (no cryptographic need here).
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Parses one manifest and applies the static-pod defaults for `node`.
pub fn from_manifest(text: &str, node: &str) -> Result<Pod, String> {
    let mut pod: Pod = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("metadata.name is required")?;
    let hash = format!("{:016x}", fnv64(&[text.as_bytes(), node.as_bytes()]));
    pod.metadata.name = Some(format!("{name}-{node}"));
    pod.metadata.namespace = Some(
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
    );
    pod.metadata.uid = Some(hash.clone());
    let ann = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(CONFIG_SOURCE.into(), "file".into());
    ann.insert(CONFIG_HASH.into(), hash);
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node.to_string());
    }
    Ok(pod)
}

/// The static pods of `dir` (hidden files and unreadable manifests are skipped with a warning).
pub fn load_dir(dir: &Path, node: &str) -> Vec<Pod> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            match from_manifest(&text, node) {
                Ok(pod) => Some(pod),
                Err(e) => {
                    tracing::warn!(manifest = %p.display(), error = %e, "skipping static pod manifest");
                    None
                }
            }
        })
        .collect()
}

/// Makes sure the mirror pod of static `pod` exists in the API (replacing a stale one).
pub async fn ensure_mirror(
    client: &kube::Client,
    pod: &Pod,
    node: &str,
) -> Result<(), kube::Error> {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let name = pod.metadata.name.clone().unwrap_or_default();
    let hash = annotation(pod, CONFIG_HASH).cloned().unwrap_or_default();
    let node_uid = Api::<Node>::all(client.clone())
        .get(node)
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    let hash_value = hash.clone();
    let mut mirror = pod.clone();
    mirror.metadata.uid = None;
    mirror.metadata.resource_version = None;
    mirror.status = None;
    mirror
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(CONFIG_MIRROR.into(), hash_value);
    // The NodeRestriction admission plugin wants mirror pods owned by their node.
    mirror.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.to_string(),
        uid: node_uid,
        controller: Some(true),
        ..Default::default()
    }]);
    // Create first: the Node authorizer lets a node read only pods already bound to it, so a
    // GET of a mirror that does not exist yet is forbidden rather than not found.
    match api.create(&PostParams::default(), &mirror).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&name).await?;
            if annotation(&existing, CONFIG_MIRROR) == Some(&hash) {
                return Ok(());
            }
            // A mirror of an older manifest: replace it.
            api.delete(
                &name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await?;
            api.create(&PostParams::default(), &mirror)
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// A change in the manifest directory.
#[derive(Clone, Debug)]
pub enum ManifestChange {
    /// A pod whose manifest is new (or changed: a changed manifest is a new UID).
    Added(Box<Pod>),
    /// The pod with this UID lost its manifest.
    Removed(String),
    /// The directory was read once through: every pod of it has been reported.
    Read,
}

/// Re-reads the manifest directory every `every` and reports what changed, until the
/// receiver is gone.
pub async fn run(
    dir: std::path::PathBuf,
    node: String,
    every: std::time::Duration,
    out: mpsc::Sender<ManifestChange>,
) {
    let mut known: HashMap<String, ()> = HashMap::new();
    let mut first = true;
    loop {
        let pods = load_dir(&dir, &node);
        let uids: Vec<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let removed: Vec<String> = known
            .keys()
            .filter(|uid| !uids.contains(uid))
            .cloned()
            .collect();
        for uid in removed {
            tracing::info!(%uid, "static pod manifest removed");
            known.remove(&uid);
            if out.send(ManifestChange::Removed(uid)).await.is_err() {
                return;
            }
        }
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if known.insert(uid, ()).is_none()
                && out
                    .send(ManifestChange::Added(Box::new(pod)))
                    .await
                    .is_err()
            {
                return;
            }
        }
        if std::mem::take(&mut first) && out.send(ManifestChange::Read).await.is_err() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: c\n    image: busybox\n";

    #[test]
    fn manifests_get_node_suffix_stable_uid_and_annotations() {
        let p = from_manifest(MANIFEST, "n1").unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("web-n1"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(p.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
        assert!(is_static(&p) && !is_mirror(&p));
        let again = from_manifest(MANIFEST, "n1").unwrap();
        assert_eq!(p.metadata.uid, again.metadata.uid, "stable");
        let other = from_manifest(&MANIFEST.replace("busybox", "busybox:2"), "n1").unwrap();
        assert_ne!(
            p.metadata.uid, other.metadata.uid,
            "a changed manifest is a new pod"
        );
        assert_ne!(
            p.metadata.uid,
            from_manifest(MANIFEST, "n2").unwrap().metadata.uid
        );
        assert!(from_manifest("metadata: {}\n", "n1").is_err());
    }

    #[tokio::test]
    async fn manifest_changes_are_reported_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("web.yaml"), MANIFEST).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(run(
            d.path().to_path_buf(),
            "n1".into(),
            std::time::Duration::from_millis(10),
            tx,
        ));
        let Some(ManifestChange::Added(first)) = rx.recv().await else {
            panic!("no pod added")
        };
        assert!(matches!(rx.recv().await, Some(ManifestChange::Read)));
        std::fs::write(
            d.path().join("web.yaml"),
            MANIFEST.replace("busybox", "busybox:2"),
        )
        .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match rx.recv().await.unwrap() {
                ManifestChange::Removed(uid) => seen.push(format!("removed {uid}")),
                ManifestChange::Added(p) => seen.push(format!("added {}", p.metadata.uid.unwrap())),
                ManifestChange::Read => panic!("the first pass was reported once already"),
            }
        }
        assert_eq!(seen[0], format!("removed {}", first.metadata.uid.unwrap()));
        assert!(seen[1].starts_with("added "));
        task.abort();
    }

    #[test]
    fn load_dir_skips_hidden_and_bad_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("web.yaml"), MANIFEST).unwrap();
        std::fs::write(d.path().join(".hidden.yaml"), MANIFEST).unwrap();
        std::fs::write(d.path().join("bad.yaml"), "{{{").unwrap();
        std::fs::write(d.path().join("notes.txt"), MANIFEST).unwrap();
        let pods = load_dir(d.path(), "n1");
        assert_eq!(pods.len(), 1);
    }
}
