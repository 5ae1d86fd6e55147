//! Pod volumes that need no plugin: emptyDir, hostPath, configMap, secret, downwardAPI and
//! projected (service-account token via TokenRequest, configMap, secret, downwardAPI,
//! clusterTrustBundle through [`crate::trust_bundles`], podCertificate through
//! [`crate::pod_certificates`]).
//!
//! Each volume lives under `<root>/pods/<uid>/volumes/<kind>/<name>`. Files of API-backed volumes
//! are published atomically as upstream's atomic writer does: a fresh `..<timestamp>` directory,
//! the `..data` symlink swapped onto it by rename, and one symlink per top-level key through
//! `..data`, so a reader never sees half an update. Refreshing rewrites only what changed.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};
use strake_types::cri;

/// A volume could not be prepared (the pod waits, with this as the reason's message).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume:?}: {reason}")]
    Invalid { volume: String, reason: String },
    #[error("volume {volume:?}: {what} {name:?} not found")]
    Missing {
        volume: String,
        what: &'static str,
        name: String,
    },
    #[error("volume {volume:?}: API request failed")]
    Api {
        volume: String,
        #[source]
        source: kube::Error,
    },
    /// Upstream's words: the details (host paths) go to the log, not to the pod's status.
    #[error("failed to prepare subPath for volumeMount {volume:?} of container {container:?}")]
    SubPath {
        volume: String,
        container: String,
        #[source]
        source: Box<crate::subpath::SubPathError>,
    },
    #[error("volume {volume:?}: {op} {path}")]
    Io {
        volume: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Files = BTreeMap<String, (Vec<u8>, u32)>;

/// Checks a relative path from the API (key path, subPath): no absolute paths, no `..`.
pub fn safe_relative(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Publishes `files` under `dir` atomically (see the module docs). Returns whether anything
/// changed. With the pod's `fsGroup`, as upstream's volume ownership does for these read-only
/// volumes: every file and directory belongs to that group, files are group-readable
/// (`mode | 0440`) and directories set-group-ID and group-searchable.
pub fn write_atomic_dir(dir: &Path, files: &Files, fs_group: Option<u32>) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    let file_mode = |mode: u32| {
        if fs_group.is_some() {
            mode | 0o440
        } else {
            mode
        }
    };
    let unchanged = files.iter().all(|(k, (bytes, mode))| {
        let p = data.join(k);
        std::fs::read(&p).is_ok_and(|b| &b == bytes)
            && std::fs::metadata(&p).is_ok_and(|m| {
                m.permissions().mode() & 0o7777 == file_mode(*mode)
                    && fs_group.is_none_or(|g| m.gid() == g)
            })
    });
    let current_tops: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| !n.starts_with(".."))
        .collect();
    let wanted_tops: std::collections::BTreeSet<String> = files
        .keys()
        .filter_map(|k| k.split('/').next().map(String::from))
        .collect();
    if unchanged
        && data.exists()
        && current_tops.iter().all(|t| wanted_tops.contains(t))
        && wanted_tops.iter().all(|t| current_tops.contains(t))
    {
        return Ok(false);
    }
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let version = format!("..{stamp}");
    let vdir = dir.join(&version);
    std::fs::create_dir_all(&vdir)?;
    std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o755))?;
    for (k, (bytes, mode)) in files {
        let p = vdir.join(k);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, bytes)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(file_mode(*mode)))?;
        if let Some(g) = fs_group {
            std::os::unix::fs::lchown(&p, None, Some(g))?;
        }
    }
    if let Some(g) = fs_group {
        // The directories: the volume's, this version's and those the keys' paths made.
        let mut dirs = vec![dir.to_path_buf(), vdir.clone()];
        dirs.extend(
            files
                .keys()
                .flat_map(|k| Path::new(k).ancestors().skip(1).map(Path::to_path_buf))
                .filter(|a| !a.as_os_str().is_empty())
                .map(|a| vdir.join(a)),
        );
        for d in dirs {
            std::os::unix::fs::lchown(&d, None, Some(g))?;
            let mode = std::fs::metadata(&d)?.permissions().mode() & 0o7777;
            std::fs::set_permissions(
                &d,
                std::fs::Permissions::from_mode(mode | 0o2000 | 0o110 | 0o440),
            )?;
        }
    }
    let old = std::fs::read_link(&data).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version, &tmp)?;
    std::fs::rename(&tmp, &data)?;
    for top in &wanted_tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    for top in current_tops.iter().filter(|t| !wanted_tops.contains(*t)) {
        let _ = std::fs::remove_file(dir.join(top));
    }
    if let Some(old) = old.filter(|o| o != Path::new(&version)) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

fn downward_value(
    pod: &Pod,
    f: &DownwardAPIVolumeFile,
    volume: &str,
) -> Result<Vec<u8>, VolumeError> {
    let invalid = |reason: String| VolumeError::Invalid {
        volume: volume.into(),
        reason,
    };
    if let Some(field) = &f.field_ref {
        return crate::pod_spec::metadata_field(pod, &field.field_path)
            .map(String::into_bytes)
            .ok_or_else(|| invalid(format!("unsupported fieldRef {}", field.field_path)));
    }
    let Some(sel) = &f.resource_field_ref else {
        return Err(invalid(format!(
            "{}: neither fieldRef nor resourceFieldRef",
            f.path
        )));
    };
    // A volume names the container whose resources it shows (the API requires it).
    let name = sel.container_name.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let container = spec
        .into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .find(|c| c.name == name)
        .ok_or_else(|| invalid(format!("{}: no container {name:?}", f.path)))?;
    let node = crate::resources::NodeAllocatable::of_this_machine();
    crate::resources::field_value(sel, container, &node)
        .map(String::into_bytes)
        .map_err(|reason| invalid(format!("{}: {reason}", f.path)))
}

/// Selects `items` (or all keys) of a key/value source into files with their modes.
fn select(
    volume: &str,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    prefix: &str,
    files: &mut Files,
) -> Result<(), VolumeError> {
    let invalid = |reason: String| VolumeError::Invalid {
        volume: volume.into(),
        reason,
    };
    match items {
        Some(items) if !items.is_empty() => {
            for it in items {
                let bytes = data
                    .get(&it.key)
                    .ok_or_else(|| invalid(format!("key {:?} not found", it.key)))?;
                if !safe_relative(&it.path) {
                    return Err(invalid(format!("invalid path {:?}", it.path)));
                }
                let mode = it.mode.map_or(default_mode, |m| m as u32);
                files.insert(format!("{prefix}{}", it.path), (bytes.clone(), mode));
            }
        }
        _ => {
            for (k, v) in data {
                files.insert(format!("{prefix}{k}"), (v, default_mode));
            }
        }
    }
    Ok(())
}

/// Issued tokens per (pod UID, volume/audience): the token, when issued, when it expires.
type TokenCache = HashMap<(String, String), (Vec<u8>, SystemTime, SystemTime)>;

/// Prepares and refreshes the volumes of pods.
#[derive(Clone)]
pub struct Volumes {
    root: PathBuf,
    client: Option<kube::Client>,
    tokens: std::sync::Arc<std::sync::Mutex<TokenCache>>,
    certificates: Option<std::sync::Arc<crate::pod_certificates::PodCertificates>>,
}

impl Volumes {
    /// Volumes under `<root_dir>/pods`.
    pub fn new(root_dir: &Path, client: Option<kube::Client>) -> Self {
        Volumes {
            root: root_dir.join("pods"),
            client,
            tokens: Default::default(),
            certificates: None,
        }
    }

    /// Serves `podCertificate` sources as node `node_name` (needs the API client).
    pub fn with_pod_certificates(mut self, node_name: &str) -> Self {
        self.certificates = self.client.clone().map(|c| {
            std::sync::Arc::new(crate::pod_certificates::PodCertificates::new(
                c,
                node_name.to_string(),
            ))
        });
        self
    }

    /// The API client; static pods without an API server cannot use API-backed volumes.
    fn api(&self, volume: &str) -> Result<kube::Client, VolumeError> {
        self.client.clone().ok_or_else(|| VolumeError::Invalid {
            volume: volume.into(),
            reason: "needs the API server, and this kubelet runs standalone".into(),
        })
    }

    fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.root.join(pod.metadata.uid.clone().unwrap_or_default())
    }

    /// Makes (or refreshes) every volume of `pod`; returns each volume's host path.
    pub async fn prepare(&self, pod: &Pod) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let mut out = BTreeMap::new();
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            if v.image.is_some() {
                // Mounted by the runtime from its image store ([`image_mounts`]).
                continue;
            }
            let path = self.prepare_one(pod, &ns, v).await?;
            out.insert(v.name.clone(), path);
        }
        Ok(out)
    }

    async fn prepare_one(&self, pod: &Pod, ns: &str, v: &Volume) -> Result<PathBuf, VolumeError> {
        let name = v.name.as_str();
        let io = |op: &'static str, path: &Path| {
            let (volume, path) = (name.to_string(), path.to_path_buf());
            move |source| VolumeError::Io {
                volume,
                op,
                path,
                source,
            }
        };
        let invalid = |reason: &str| VolumeError::Invalid {
            volume: name.into(),
            reason: reason.into(),
        };
        let dir = |kind: &str| self.pod_dir(pod).join("volumes").join(kind).join(name);
        if let Some(e) = &v.empty_dir {
            let d = dir("kubernetes.io~empty-dir");
            if !d.exists() {
                std::fs::create_dir_all(&d).map_err(io("create", &d))?;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))
                    .map_err(io("chmod", &d))?;
                if e.medium.as_deref() == Some("Memory") {
                    let size = e
                        .size_limit
                        .as_ref()
                        .map(|q| format!(",size={}", q.0.trim_end_matches('i')))
                        .unwrap_or_default();
                    mount_tmpfs(&d, &format!("mode=0777{size}"))
                        .map_err(io("mount tmpfs on", &d))?;
                }
            }
            return Ok(d);
        }
        if let Some(h) = &v.host_path {
            let p = PathBuf::from(&h.path);
            let t = h.type_.as_deref().unwrap_or("");
            let meta = std::fs::metadata(&p);
            let ok = match t {
                "" => true,
                // As upstream (MkdirAll 0755, umask applies). No chmod by path afterwards: a
                // container writing into the parent could swap the new directory for a link.
                "DirectoryOrCreate" => {
                    if meta.is_err() {
                        std::fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o755)
                            .create(&p)
                            .map_err(io("create", &p))?;
                    }
                    std::fs::metadata(&p).is_ok_and(|m| m.is_dir())
                }
                "Directory" => meta.is_ok_and(|m| m.is_dir()),
                // O_CREAT|O_EXCL: never through a (dangling) link in the last component, never
                // truncating anything.
                "FileOrCreate" => {
                    if meta.is_err() {
                        match std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o644)
                            .open(&p)
                        {
                            Ok(_) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                            Err(e) => return Err(io("create", &p)(e)),
                        }
                    }
                    std::fs::metadata(&p).is_ok_and(|m| m.is_file())
                }
                "File" => meta.is_ok_and(|m| m.is_file()),
                "Socket" => {
                    meta.is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                }
                "CharDevice" => meta
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type())),
                "BlockDevice" => meta
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())),
                other => return Err(invalid(&format!("unknown hostPath type {other:?}"))),
            };
            if !ok {
                return Err(invalid(&format!("hostPath {} is not of type {t}", h.path)));
            }
            return Ok(p);
        }
        let mut files = Files::new();
        let kind = if let Some(c) = &v.config_map {
            let default_mode = c.default_mode.map_or(0o644, |m| m as u32);
            if let Some(data) = self
                .config_map(ns, &c.name, c.optional.unwrap_or(false), name)
                .await?
            {
                select(name, data, c.items.as_ref(), default_mode, "", &mut files)?;
            }
            "kubernetes.io~configmap"
        } else if let Some(s) = &v.secret {
            let default_mode = s.default_mode.map_or(0o644, |m| m as u32);
            let sname = s.secret_name.clone().unwrap_or_default();
            if let Some(data) = self
                .secret(ns, &sname, s.optional.unwrap_or(false), name)
                .await?
            {
                select(name, data, s.items.as_ref(), default_mode, "", &mut files)?;
            }
            "kubernetes.io~secret"
        } else if let Some(d) = &v.downward_api {
            let default_mode = d.default_mode.map_or(0o644, |m| m as u32);
            for f in d.items.iter().flatten() {
                if !safe_relative(&f.path) {
                    return Err(invalid(&format!("invalid path {:?}", f.path)));
                }
                files.insert(
                    f.path.clone(),
                    (
                        downward_value(pod, f, name)?,
                        f.mode.map_or(default_mode, |m| m as u32),
                    ),
                );
            }
            "kubernetes.io~downward-api"
        } else if let Some(p) = &v.projected {
            let default_mode = p.default_mode.map_or(0o644, |m| m as u32);
            for (index, src) in p.sources.iter().flatten().enumerate() {
                if let Some(c) = &src.config_map {
                    if let Some(data) = self
                        .config_map(ns, &c.name, c.optional.unwrap_or(false), name)
                        .await?
                    {
                        select(name, data, c.items.as_ref(), default_mode, "", &mut files)?;
                    }
                } else if let Some(s) = &src.secret {
                    if let Some(data) = self
                        .secret(ns, &s.name, s.optional.unwrap_or(false), name)
                        .await?
                    {
                        select(name, data, s.items.as_ref(), default_mode, "", &mut files)?;
                    }
                } else if let Some(d) = &src.downward_api {
                    for f in d.items.iter().flatten() {
                        if !safe_relative(&f.path) {
                            return Err(invalid(&format!("invalid path {:?}", f.path)));
                        }
                        files.insert(
                            f.path.clone(),
                            (
                                downward_value(pod, f, name)?,
                                f.mode.map_or(default_mode, |m| m as u32),
                            ),
                        );
                    }
                } else if let Some(t) = &src.service_account_token {
                    if !safe_relative(&t.path) {
                        return Err(invalid(&format!("invalid path {:?}", t.path)));
                    }
                    let token = self
                        .token(
                            pod,
                            ns,
                            name,
                            t.audience.clone(),
                            t.expiration_seconds.unwrap_or(3600),
                        )
                        .await?;
                    // Upstream writes tokens 0600 when the pod sets no fsGroup; 0644 by default.
                    files.insert(t.path.clone(), (token, default_mode));
                } else if let Some(b) = &src.cluster_trust_bundle {
                    if !safe_relative(&b.path) {
                        return Err(invalid(&format!("invalid path {:?}", b.path)));
                    }
                    let anchors = crate::trust_bundles::anchors(self.api(name)?, b)
                        .await
                        .map_err(|e| invalid(&error_chain(&e)))?;
                    files.insert(b.path.clone(), (anchors, default_mode));
                } else if let Some(c) = &src.pod_certificate {
                    let paths = [
                        &c.credential_bundle_path,
                        &c.key_path,
                        &c.certificate_chain_path,
                    ];
                    if let Some(bad) = paths.iter().copied().flatten().find(|p| !safe_relative(p)) {
                        return Err(invalid(&format!("invalid path {bad:?}")));
                    }
                    let certificates = self.certificates.as_ref().ok_or_else(|| {
                        invalid(
                            "podCertificate needs the API server, and this kubelet runs standalone",
                        )
                    })?;
                    let (key, chain) = certificates
                        .credentials(pod, name, index, c)
                        .await
                        .map_err(|e| invalid(&error_chain(&e)))?;
                    if let Some(p) = &c.credential_bundle_path {
                        files.insert(p.clone(), ([key.as_slice(), &chain].concat(), default_mode));
                    }
                    if let Some(p) = &c.key_path {
                        files.insert(p.clone(), (key, default_mode));
                    }
                    if let Some(p) = &c.certificate_chain_path {
                        files.insert(p.clone(), (chain, default_mode));
                    }
                }
            }
            "kubernetes.io~projected"
        } else {
            return Err(invalid(
                "volume type not supported by strake-kubelet (emptyDir, hostPath, configMap, secret, downwardAPI and projected are)",
            ));
        };
        let d = dir(kind);
        let fs_group = pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|c| c.fs_group)
            .and_then(|g| u32::try_from(g).ok());
        write_atomic_dir(&d, &files, fs_group).map_err(io("write", &d))?;
        Ok(d)
    }

    async fn config_map(
        &self,
        ns: &str,
        cm: &str,
        optional: bool,
        volume: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
        let api: Api<ConfigMap> = Api::namespaced(self.api(volume)?, ns);
        match api.get_opt(cm).await.map_err(|source| VolumeError::Api {
            volume: volume.into(),
            source,
        })? {
            Some(c) => {
                let mut data: BTreeMap<String, Vec<u8>> = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                data.extend(
                    c.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                Ok(Some(data))
            }
            None if optional => Ok(None),
            None => Err(VolumeError::Missing {
                volume: volume.into(),
                what: "configmap",
                name: cm.into(),
            }),
        }
    }

    async fn secret(
        &self,
        ns: &str,
        s: &str,
        optional: bool,
        volume: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
        let api: Api<Secret> = Api::namespaced(self.api(volume)?, ns);
        match api.get_opt(s).await.map_err(|source| VolumeError::Api {
            volume: volume.into(),
            source,
        })? {
            Some(sec) => {
                let mut data: BTreeMap<String, Vec<u8>> = sec
                    .string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                data.extend(
                    sec.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                Ok(Some(data))
            }
            None if optional => Ok(None),
            None => Err(VolumeError::Missing {
                volume: volume.into(),
                what: "secret",
                name: s.into(),
            }),
        }
    }

    /// A bound service-account token, requested again once 80% of its lifetime has passed.
    async fn token(
        &self,
        pod: &Pod,
        ns: &str,
        volume: &str,
        audience: Option<String>,
        expiration: i64,
    ) -> Result<Vec<u8>, VolumeError> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let key = (
            uid.clone(),
            format!("{volume}/{}", audience.clone().unwrap_or_default()),
        );
        let now = SystemTime::now();
        if let Some((t, issued, exp)) = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            let life = exp.duration_since(*issued).unwrap_or_default();
            if now < *issued + life.mul_f64(0.8) {
                return Ok(t.clone());
            }
        }
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.api(volume)?, ns);
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: audience.map(|a| vec![a]),
                expiration_seconds: Some(expiration.max(600)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: Some(uid),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let resp = api
            .create_token_request(&sa, &PostParams::default(), &req)
            .await
            .map_err(|source| VolumeError::Api {
                volume: volume.into(),
                source,
            })?;
        let status = resp.status.ok_or_else(|| VolumeError::Invalid {
            volume: volume.into(),
            reason: "TokenRequest returned no token".into(),
        })?;
        let exp = status
            .expiration_timestamp
            .map_or(now + Duration::from_secs(600), |t| {
                SystemTime::UNIX_EPOCH + Duration::from_secs(t.0.as_second().max(0) as u64)
            });
        let token = status.token.unwrap_or_default().into_bytes();
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (token.clone(), now, exp));
        Ok(token)
    }

    /// The CRI mounts of container `c`, given each volume's host path and the container's
    /// environment (for `subPathExpr`). A `subPath` is opened inside its volume without following
    /// links out of it and bind-mounted by descriptor onto
    /// `<root>/pods/<uid>/volume-subpaths/<volume>/<container>/<index>`, which is what the
    /// runtime mounts (see [`crate::subpath`]).
    pub fn container_mounts(
        &self,
        pod: &Pod,
        c: &Container,
        volumes: &BTreeMap<String, PathBuf>,
        env: &[(String, String)],
    ) -> Result<Vec<cri::Mount>, VolumeError> {
        let spec = pod.spec.clone().unwrap_or_default();
        let mut out = Vec::new();
        for (index, m) in c.volume_mounts.iter().flatten().enumerate() {
            if image_volume(&spec, &m.name).is_some() {
                continue;
            }
            let host = volumes.get(&m.name).ok_or_else(|| VolumeError::Invalid {
                volume: m.name.clone(),
                reason: format!("mounted by container {} but not defined in the pod", c.name),
            })?;
            let mut host = host.clone();
            if let Some(sub) = sub_path(m, env)? {
                let target = self
                    .pod_dir(pod)
                    .join("volume-subpaths")
                    .join(&m.name)
                    .join(&c.name)
                    .join(index.to_string());
                let bound = crate::subpath::open_in_volume(&host, Path::new(&sub), true)
                    .and_then(|fd| crate::subpath::bind(&fd, &target));
                if let Err(source) = bound {
                    tracing::warn!(
                        pod = pod.metadata.name.as_deref().unwrap_or(""),
                        container = %c.name,
                        volume = %m.name,
                        error = %error_chain(&source),
                        "subPath refused",
                    );
                    return Err(VolumeError::SubPath {
                        volume: m.name.clone(),
                        container: c.name.clone(),
                        source: Box::new(source),
                    });
                }
                host = target;
            }
            // API-backed volumes are read-only inside containers, as upstream mounts them.
            let api_backed = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .is_some_and(|v| {
                    v.config_map.is_some()
                        || v.secret.is_some()
                        || v.downward_api.is_some()
                        || v.projected.is_some()
                });
            let propagation = match m.mount_propagation.as_deref() {
                Some("HostToContainer") => cri::MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => cri::MountPropagation::PropagationBidirectional,
                _ => cri::MountPropagation::PropagationPrivate,
            };
            out.push(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                readonly: m.read_only.unwrap_or(false) || api_backed,
                propagation: propagation as i32,
                ..Default::default()
            });
        }
        Ok(out)
    }

    /// Unmounts and removes everything of the pod with this UID: its subPath binds, tmpfs
    /// emptyDirs, then the directory. Nothing is removed while something below it is still
    /// mounted (a bind of a hostPath subPath would otherwise be emptied on the host).
    pub fn cleanup(&self, uid: &str) {
        // The mount table names real paths: a root dir reached through a symlink would match
        // none of them, and the removal below would then walk into the binds.
        let dir = self.root.join(uid);
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let mut mounts: Vec<PathBuf> = crate::subpath::mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&dir))
            .collect();
        // Deepest first, so a bind inside a tmpfs goes before the tmpfs.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in &mounts {
            if let Err(e) = crate::subpath::unmount_all(m) {
                tracing::warn!(pod_uid = uid, error = %error_chain(&e), "unmount failed");
            }
        }
        if crate::subpath::has_mounts_below(&dir) {
            tracing::warn!(
                pod_uid = uid,
                dir = %dir.display(),
                "pod directory still has mounts; left in place"
            );
        } else if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pod_uid = uid, error = %e, "remove pod directory failed");
        }
        if let Some(c) = &self.certificates {
            c.forget(uid);
        }
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(u, _), _| u != uid);
    }
}

fn mount_tmpfs(dst: &Path, options: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let d = std::ffi::CString::new(dst.as_os_str().as_bytes())?;
    let o = std::ffi::CString::new(options)?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            d.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            o.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The image source of volume `name` of the pod, when it is an image volume.
pub fn image_volume<'a>(
    spec: &'a k8s_openapi::api::core::v1::PodSpec,
    name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::ImageVolumeSource> {
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)?
        .image
        .as_ref()
}

/// The CRI mounts of container `c`'s image volumes, given the image each volume's reference
/// was pulled as (`pulled`, by volume name): the runtime mounts the image read-only, or its
/// `subPath` (`subPathExpr` expanded from `env`), as upstream's kubelet asks it.
pub fn image_mounts(
    pod: &Pod,
    c: &Container,
    pulled: &BTreeMap<String, String>,
    env: &[(String, String)],
) -> Result<Vec<cri::Mount>, VolumeError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(source) = image_volume(&spec, &m.name) else {
            continue;
        };
        let Some(image) = pulled.get(&m.name) else {
            return Err(VolumeError::Invalid {
                volume: m.name.clone(),
                reason: "its image is not pulled".into(),
            });
        };
        out.push(cri::Mount {
            container_path: m.mount_path.clone(),
            readonly: true,
            image: Some(cri::ImageSpec {
                image: image.clone(),
                user_specified_image: source.reference.clone().unwrap_or_default(),
                ..Default::default()
            }),
            image_sub_path: sub_path(m, env)?.unwrap_or_default(),
            ..Default::default()
        });
    }
    Ok(out)
}

/// The sub-path of a volume mount: `subPath` as written, or `subPathExpr` expanded from the
/// container's environment as upstream's `ExpandContainerVolumeMounts` does (`$(VAR)` from the
/// container's variables, `$$` escapes; a reference to a variable that is unset or empty is an
/// error). Either must stay relative and below the volume. `None`: the whole volume.
pub fn sub_path(
    m: &k8s_openapi::api::core::v1::VolumeMount,
    env: &[(String, String)],
) -> Result<Option<String>, VolumeError> {
    let invalid = |reason: String| VolumeError::Invalid {
        volume: m.name.clone(),
        reason,
    };
    let plain = m.sub_path.as_deref().filter(|s| !s.is_empty());
    let expr = m.sub_path_expr.as_deref().filter(|s| !s.is_empty());
    let sub = match (plain, expr) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "subPath and subPathExpr are mutually exclusive".into(),
            ));
        }
        (Some(s), None) => s.to_string(),
        (None, Some(e)) => {
            let vars: HashMap<&str, &str> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut missing = std::collections::BTreeSet::new();
            let expanded = crate::pod_spec::expand_with(e, |name| {
                match vars.get(name).filter(|v| !v.is_empty()) {
                    Some(v) => Some((*v).to_string()),
                    None => {
                        missing.insert(name.to_string());
                        Some(String::new())
                    }
                }
            });
            if !missing.is_empty() {
                let names: Vec<String> = missing.into_iter().collect();
                return Err(invalid(format!(
                    "subPathExpr {e:?}: missing value for {}",
                    names.join(", ")
                )));
            }
            // Expanded to nothing: the whole volume, as upstream.
            if expanded.is_empty() {
                return Ok(None);
            }
            expanded
        }
    };
    if !safe_relative(&sub) {
        return Err(invalid(format!(
            "invalid subPath {sub:?}: must be a relative path without '..'"
        )));
    }
    Ok(Some(sub))
}

/// An error and its causes, for the log.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str, u32)]) -> Files {
        entries
            .iter()
            .map(|(k, v, m)| (k.to_string(), (v.as_bytes().to_vec(), *m)))
            .collect()
    }

    #[test]
    fn with_an_fs_group_the_files_are_the_groups_to_read() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let f = files(&[("data-1", "value-1", 0o400), ("sub/b", "2", 0o600)]);
        assert!(write_atomic_dir(d.path(), &f, Some(4321)).unwrap());
        for (path, mode) in [("data-1", 0o440), ("sub/b", 0o640)] {
            let m = std::fs::metadata(d.path().join(path)).unwrap();
            assert_eq!(m.gid(), 4321, "{path}");
            assert_eq!(m.permissions().mode() & 0o7777, mode, "{path}");
        }
        for dir in [d.path().to_path_buf(), d.path().join("..data/sub")] {
            let m = std::fs::metadata(&dir).unwrap();
            assert_eq!(m.gid(), 4321, "{}", dir.display());
            assert_eq!(m.permissions().mode() & 0o2550, 0o2550, "{}", dir.display());
        }
        // Written again unchanged: nothing to do; with another group: rewritten.
        assert!(!write_atomic_dir(d.path(), &f, Some(4321)).unwrap());
        assert!(write_atomic_dir(d.path(), &f, Some(4322)).unwrap());
        assert_eq!(
            std::fs::metadata(d.path().join("data-1")).unwrap().gid(),
            4322
        );
    }

    #[test]
    fn atomic_writer_publishes_through_data_symlink_and_updates_in_place() {
        let d = tempfile::tempdir().unwrap();
        assert!(
            write_atomic_dir(
                d.path(),
                &files(&[("a", "1", 0o644), ("sub/b", "2", 0o600)]),
                None
            )
            .unwrap()
        );
        assert_eq!(std::fs::read_to_string(d.path().join("a")).unwrap(), "1");
        assert_eq!(
            std::fs::read_to_string(d.path().join("sub/b")).unwrap(),
            "2"
        );
        let mode = std::fs::metadata(d.path().join("sub/b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_link(d.path().join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert!(
            !write_atomic_dir(
                d.path(),
                &files(&[("a", "1", 0o644), ("sub/b", "2", 0o600)]),
                None
            )
            .unwrap(),
            "unchanged"
        );
        assert!(write_atomic_dir(d.path(), &files(&[("a", "changed", 0o644)]), None).unwrap());
        assert_eq!(
            std::fs::read_to_string(d.path().join("a")).unwrap(),
            "changed"
        );
        assert!(!d.path().join("sub").exists(), "removed key's link is gone");
        let versions = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("..") && n != "..data"
            })
            .count();
        assert_eq!(versions, 1, "old versions are removed");
    }

    #[test]
    fn relative_paths_are_checked() {
        assert!(safe_relative("a/b"));
        assert!(!safe_relative("../a"));
        assert!(!safe_relative("/etc"));
        assert!(!safe_relative("a/../../b"));
        assert!(!safe_relative(""));
    }

    #[test]
    fn downward_api_map_format() {
        let m = BTreeMap::from([
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "x\"y".to_string()),
        ]);
        assert_eq!(crate::pod_spec::format_map(&m), "a=\"x\\\"y\"\nb=\"2\"");
    }

    #[test]
    fn downward_api_files_show_a_named_containers_resources() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ns" },
            "spec": { "containers": [{
                "name": "app",
                "resources": {
                    "requests": { "cpu": "250m", "memory": "32Mi" },
                    "limits": { "cpu": "1250m", "memory": "64Mi" }
                }
            }] }
        }))
        .unwrap();
        let item = |resource: &str, container: &str, divisor: Option<&str>| {
            serde_json::from_value::<DownwardAPIVolumeFile>(serde_json::json!({
                "path": "f",
                "resourceFieldRef": {
                    "containerName": container, "resource": resource, "divisor": divisor
                }
            }))
            .unwrap()
        };
        let value = |f: &DownwardAPIVolumeFile| {
            downward_value(&pod, f, "podinfo").map(|b| String::from_utf8(b).unwrap())
        };
        // Rounded up to whole units of the divisor (1 by default), as upstream's.
        assert_eq!(value(&item("limits.cpu", "app", None)).unwrap(), "2");
        assert_eq!(
            value(&item("limits.cpu", "app", Some("1m"))).unwrap(),
            "1250"
        );
        assert_eq!(
            value(&item("requests.cpu", "app", Some("1m"))).unwrap(),
            "250"
        );
        assert_eq!(
            value(&item("limits.memory", "app", Some("1Mi"))).unwrap(),
            "64"
        );
        assert_eq!(
            value(&item("requests.memory", "app", None)).unwrap(),
            (32 << 20).to_string()
        );
        // A container that does not exist is an error that names it, not an empty file.
        let err = value(&item("limits.cpu", "nope", None)).unwrap_err();
        assert!(err.to_string().contains("nope") || format!("{err:?}").contains("nope"));
        // Metadata still comes through fieldRef.
        let name: DownwardAPIVolumeFile = serde_json::from_value(serde_json::json!({
            "path": "name", "fieldRef": { "fieldPath": "metadata.name" }
        }))
        .unwrap();
        assert_eq!(value(&name).unwrap(), "p");
    }

    #[test]
    fn items_select_keys_with_modes_and_refuse_missing_keys() {
        let data = BTreeMap::from([
            ("k".to_string(), b"v".to_vec()),
            ("other".to_string(), b"o".to_vec()),
        ]);
        let mut f = Files::new();
        let items = vec![KeyToPath {
            key: "k".into(),
            path: "dir/file".into(),
            mode: Some(0o400),
            user: None,
        }];
        select("v", data.clone(), Some(&items), 0o644, "", &mut f).unwrap();
        assert_eq!(f.get("dir/file"), Some(&(b"v".to_vec(), 0o400)));
        assert_eq!(f.len(), 1);
        let bad = vec![KeyToPath {
            key: "nope".into(),
            path: "x".into(),
            mode: None,
            user: None,
        }];
        assert!(select("v", data, Some(&bad), 0o644, "", &mut Files::new()).is_err());
    }
    fn mount(
        name: &str,
        sub: Option<&str>,
        expr: Option<&str>,
    ) -> k8s_openapi::api::core::v1::VolumeMount {
        k8s_openapi::api::core::v1::VolumeMount {
            name: name.into(),
            mount_path: "/m".into(),
            sub_path: sub.map(String::from),
            sub_path_expr: expr.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn sub_path_expr_expands_the_container_environment() {
        let env = vec![
            ("POD_NAME".to_string(), "web-0".to_string()),
            ("EMPTY".to_string(), String::new()),
            ("UP".to_string(), "..".to_string()),
            ("ABS".to_string(), "/etc".to_string()),
        ];
        let sub = |sub: Option<&str>, expr: Option<&str>| sub_path(&mount("v", sub, expr), &env);
        assert_eq!(sub(None, None).unwrap(), None);
        assert_eq!(sub(Some("a/b"), None).unwrap().as_deref(), Some("a/b"));
        assert_eq!(
            sub(None, Some("logs/$(POD_NAME)")).unwrap().as_deref(),
            Some("logs/web-0")
        );
        assert_eq!(
            sub(None, Some("$$(POD_NAME)")).unwrap().as_deref(),
            Some("$(POD_NAME)"),
            "$$ escapes"
        );
        for (expr, what) in [
            ("$(NOPE)", "unset"),
            ("x/$(EMPTY)", "empty"),
            ("$(UP)/x", "expands to .."),
            ("$(ABS)", "expands to an absolute path"),
        ] {
            assert!(
                matches!(sub(None, Some(expr)), Err(VolumeError::Invalid { .. })),
                "{what}"
            );
        }
        let missing = sub(None, Some("$(B)/$(A)")).unwrap_err().to_string();
        assert!(missing.contains("missing value for A, B"), "{missing}");
        assert!(sub(Some("a"), Some("b")).is_err(), "both is invalid");
        assert!(sub(Some("../x"), None).is_err());
    }

    fn pod_with(
        uid: &str,
        volumes: serde_json::Value,
        mounts: serde_json::Value,
    ) -> (Pod, Container) {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "default", "uid": uid },
            "spec": {
                "containers": [{ "name": "main", "image": "x", "volumeMounts": mounts }],
                "volumes": volumes
            }
        }))
        .unwrap();
        let c = pod.spec.as_ref().unwrap().containers[0].clone();
        (pod, c)
    }

    #[test]
    fn host_path_file_or_create_does_not_follow_a_dangling_link() {
        let top = tempfile::tempdir().unwrap();
        let outside = top.path().join("outside");
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let vols = Volumes::new(&top.path().join("root"), None);
        let (pod, _) = pod_with(
            "u1",
            serde_json::json!([{ "name": "h", "hostPath": { "path": link, "type": "FileOrCreate" } }]),
            serde_json::json!([]),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r = rt.block_on(vols.prepare(&pod));
        assert!(r.is_err(), "a dangling link is not a file: {r:?}");
        assert!(!outside.exists(), "nothing created through the link");
        // A plain missing path is created as a file, 0644.
        let plain = top.path().join("plain");
        let (pod, _) = pod_with(
            "u2",
            serde_json::json!([{ "name": "h", "hostPath": { "path": plain, "type": "FileOrCreate" } }]),
            serde_json::json!([]),
        );
        rt.block_on(vols.prepare(&pod)).unwrap();
        assert!(plain.is_file());
    }

    /// Removes a pod's directory (and its mounts) when a test ends.
    struct PodCleanup<'a>(&'a Volumes, &'a str);
    impl Drop for PodCleanup<'_> {
        fn drop(&mut self) {
            self.0.cleanup(self.1);
        }
    }

    #[test]
    fn cleanup_unmounts_binds_under_a_root_dir_reached_through_a_symlink() {
        assert!(rustix::process::geteuid().is_root(), "needs root to mount");
        let top = tempfile::tempdir().unwrap();
        let host = top.path().join("host");
        std::fs::create_dir_all(host.join("keep")).unwrap();
        std::fs::write(host.join("keep/file"), "host").unwrap();
        std::fs::create_dir(top.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", top.path().join("link")).unwrap();
        let vols = Volumes::new(&top.path().join("link"), None);
        let uid = "pod-uid-2";
        let _cleanup = PodCleanup(&vols, uid);
        let (pod, c) = pod_with(
            uid,
            serde_json::json!([{ "name": "h", "hostPath": { "path": host } }]),
            serde_json::json!([{ "name": "h", "mountPath": "/a", "subPath": "keep" }]),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let paths = rt.block_on(vols.prepare(&pod)).unwrap();
        vols.container_mounts(&pod, &c, &paths, &[]).unwrap();
        assert!(crate::subpath::has_mounts_below(&top.path().join("real")));
        vols.cleanup(uid);
        assert!(!crate::subpath::has_mounts_below(&top.path().join("real")));
        assert!(!top.path().join("real/pods").join(uid).exists());
        assert_eq!(
            std::fs::read_to_string(host.join("keep/file")).unwrap(),
            "host",
            "the hostPath content behind the bind is untouched"
        );
    }

    #[test]
    fn sub_path_through_a_planted_link_is_refused_and_a_good_one_is_bound() {
        assert!(rustix::process::geteuid().is_root(), "needs root to mount");
        let top = tempfile::tempdir().unwrap();
        let host = top.path().join("host");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("marker"), "host").unwrap();
        let vols = Volumes::new(&top.path().join("root"), None);
        let uid = "pod-uid-1";
        let _cleanup = PodCleanup(&vols, uid);
        let (pod, c) = pod_with(
            uid,
            serde_json::json!([{ "name": "scratch", "emptyDir": {} }]),
            serde_json::json!([
                { "name": "scratch", "mountPath": "/a", "subPath": "x" },
                { "name": "scratch", "mountPath": "/b", "subPath": "data/$(POD_NAME)" },
                { "name": "scratch", "mountPath": "/c", "subPathExpr": "data/$(POD_NAME)" }
            ]),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let paths = rt.block_on(vols.prepare(&pod)).unwrap();
        let volume = paths["scratch"].clone();
        // What a container of the pod could have written into the emptyDir.
        std::os::unix::fs::symlink(&host, volume.join("x")).unwrap();
        let env = vec![("POD_NAME".to_string(), "p".to_string())];
        let err = vols.container_mounts(&pod, &c, &paths, &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to prepare subPath for volumeMount \"scratch\" of container \"main\""
        );
        assert!(
            matches!(&err, VolumeError::SubPath { source, .. }
                if matches!(**source, crate::subpath::SubPathError::Escapes { .. })),
            "{err:?}"
        );
        // The link replaced by a directory inside the volume: all three mounts are binds.
        std::fs::remove_file(volume.join("x")).unwrap();
        std::fs::create_dir(volume.join("x")).unwrap();
        std::fs::write(volume.join("x/f"), "in").unwrap();
        let mounts = vols.container_mounts(&pod, &c, &paths, &env).unwrap();
        let subpaths = top
            .path()
            .join("root/pods")
            .join(uid)
            .join("volume-subpaths/scratch/main");
        let hosts: Vec<&str> = mounts.iter().map(|m| m.host_path.as_str()).collect();
        assert_eq!(
            hosts,
            ["0", "1", "2"]
                .iter()
                .map(|i| subpaths.join(i).display().to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(std::fs::read_to_string(subpaths.join("0/f")).unwrap(), "in");
        assert!(
            volume.join("data/$(POD_NAME)").is_dir(),
            "subPath is not expanded"
        );
        assert!(volume.join("data/p").is_dir(), "subPathExpr is, and made");
        // Again (a restarted container): the binds are re-used, not stacked.
        vols.container_mounts(&pod, &c, &paths, &env).unwrap();
        let stacked = crate::subpath::mount_points()
            .iter()
            .filter(|m| **m == subpaths.join("0"))
            .count();
        assert_eq!(stacked, 1);
        // Teardown unmounts the binds and removes the pod directory; the host is untouched.
        vols.cleanup(uid);
        assert!(!crate::subpath::has_mounts_below(&top.path().join("root")));
        assert!(!top.path().join("root/pods").join(uid).exists());
        assert_eq!(
            std::fs::read_to_string(host.join("marker")).unwrap(),
            "host"
        );
        assert_eq!(std::fs::read_dir(&host).unwrap().count(), 1);
    }
}
