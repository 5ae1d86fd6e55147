//! PullImage: resolve a reference at its registry, fetch manifest, config and layers into the
//! store (digests verified as they stream), unpack each layer into its snapshot, and publish
//! the image record last.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use futures::{FutureExt, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;

use super::metadata::{
    ACCEPT, MAX_METADATA_BYTES, config_of, layer_records, parse_config, parse_manifest,
    select_platform, user_of,
};
use super::mirror::{Endpoint, Mirrors, endpoints_for};
use super::reference::{Digest, Reference};
use super::store::{ImageRecord, LayerRecord, Lease, Store, StoreError};
use super::unpack::{Budget, UnpackError, UnpackOptions, unpack_layer};

/// Default of [`PullConfig::request_timeout`] (`image_pull_progress_timeout`).
pub const DEFAULT_PULL_PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`PullConfig::pull_timeout`] (`image_pull_timeout`): 1 GiB at 5 Mbit/s fits.
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How pulls behave.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// Registries (`host` or `host:port`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Mirrors by registry host, tried in order before the registry itself.
    pub mirrors: Mirrors,
    /// Layers downloaded and unpacked at once, per pull.
    pub max_concurrent_layers: usize,
    /// Longest wait for one request's response, or for the next chunk of a blob (progress).
    pub request_timeout: Duration,
    /// Longest a whole pull may take, however steadily bytes arrive: a registry trickling a
    /// byte a minute never trips [`Self::request_timeout`].
    pub pull_timeout: Duration,
    /// Longest wait to connect to a registry.
    pub connect_timeout: Duration,
    /// Limits for unpacking layers.
    pub unpack: UnpackOptions,
    /// References whose images are pinned (exempt from the kubelet's image GC), e.g. the
    /// sandbox image.
    pub pinned_images: Vec<String>,
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            insecure_registries: Vec::new(),
            mirrors: Mirrors::new(),
            max_concurrent_layers: 3,
            request_timeout: DEFAULT_PULL_PROGRESS_TIMEOUT,
            pull_timeout: DEFAULT_PULL_TIMEOUT,
            connect_timeout: Duration::from_secs(10),
            unpack: UnpackOptions::default(),
            pinned_images: Vec::new(),
        }
    }
}

/// Credentials for one pull, as the CRI `AuthConfig` carries them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PullAuth {
    /// User name for basic auth.
    pub username: String,
    /// Password for basic auth.
    pub password: String,
    /// `base64(username:password)`, used when username and password are empty.
    pub auth: String,
    /// A bearer token for the registry.
    pub registry_token: String,
}

impl std::fmt::Debug for PullAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullAuth")
            .field("username", &self.username)
            .field(
                "password",
                &(!self.password.is_empty()).then_some("<redacted>"),
            )
            .field("auth", &(!self.auth.is_empty()).then_some("<redacted>"))
            .field(
                "registry_token",
                &(!self.registry_token.is_empty()).then_some("<redacted>"),
            )
            .finish()
    }
}

impl PullAuth {
    /// Basic auth with a user name and password.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        PullAuth {
            username: username.into(),
            password: password.into(),
            ..Default::default()
        }
    }

    fn to_registry_auth(&self) -> Result<RegistryAuth, PullError> {
        if !self.username.is_empty() || !self.password.is_empty() {
            return Ok(RegistryAuth::Basic(
                self.username.clone(),
                self.password.clone(),
            ));
        }
        if !self.auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or(PullError::BadAuth)?;
            let (user, pass) = decoded.split_once(':').ok_or(PullError::BadAuth)?;
            return Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()));
        }
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        Ok(RegistryAuth::Anonymous)
    }
}

/// Why a pull failed. [`PullError::is_retryable`] says whether trying again may help.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The CRI `AuthConfig.auth` field is not base64 of `user:password`.
    #[error("auth is not base64 of user:password")]
    BadAuth,
    /// The registry refused the credentials (or their absence).
    #[error("registry refused access to {reference}")]
    Unauthorized {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    /// The registry has no such manifest.
    #[error("{reference} not found at its registry")]
    NotFound {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    /// The index has no manifest for this platform.
    #[error("{reference} has no image for {platform}")]
    NoPlatform { reference: String, platform: String },
    /// The manifest is of a kind we cannot use (schema 1, an artifact, malformed JSON).
    #[error("{reference}: unsupported or malformed manifest: {detail}")]
    BadManifest { reference: String, detail: String },
    /// The registry could not be reached or failed mid-transfer.
    #[error("fetch {what} of {reference}")]
    Registry {
        reference: String,
        what: String,
        #[source]
        source: OciDistributionError,
    },
    /// A transfer broke off mid-stream.
    #[error("fetch {what} of {reference}: transfer failed")]
    Transfer {
        reference: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The registry did not answer in time.
    #[error("fetch {what} of {reference}: no response within {secs}s")]
    Timeout {
        reference: String,
        what: String,
        secs: u64,
    },
    /// The whole pull took longer than its deadline.
    #[error("pull of {reference} did not finish within {secs}s")]
    Deadline { reference: String, secs: u64 },
    /// The daemon is stopping.
    #[error("pull of {reference} cancelled: the runtime is stopping")]
    Cancelled { reference: String },
    /// A blob could not be stored (including digest or size mismatches).
    #[error("store blob {digest} of {reference}")]
    Store {
        reference: String,
        digest: String,
        #[source]
        source: StoreError,
    },
    /// A layer could not be unpacked (or was refused).
    #[error("unpack layer {digest} of {reference}")]
    Unpack {
        reference: String,
        digest: String,
        #[source]
        source: UnpackError,
    },
    /// A blocking task died.
    #[error("pull of {reference}: worker task failed")]
    Task {
        reference: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl PullError {
    /// Whether the failure may go away by itself (network, registry, timeouts, truncated or
    /// corrupted transfers), as opposed to a bad reference, bad credentials or a bad image.
    pub fn is_retryable(&self) -> bool {
        match self {
            PullError::Registry { source, .. } => match source {
                OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => true,
                OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
                _ => false,
            },
            PullError::Transfer { .. }
            | PullError::Timeout { .. }
            | PullError::Deadline { .. }
            | PullError::Cancelled { .. } => true,
            PullError::Store { source, .. } => matches!(
                source,
                StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. }
            ),
            _ => false,
        }
    }

    /// Whether the image (or reference) is at fault rather than the network or this node.
    pub fn is_bad_image(&self) -> bool {
        match self {
            PullError::BadManifest { .. } => true,
            PullError::Unpack { source, .. } => source.is_bad_layer(),
            _ => false,
        }
    }
}

/// The OCI name of this machine's architecture (and variant, where it matters).
pub fn host_platform() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" => ("ppc64le", None),
        "riscv64" => ("riscv64", None),
        "s390x" => ("s390x", None),
        other => (other, None),
    }
}

/// What one pull needs.
pub(crate) struct Puller {
    pub store: Arc<Store>,
    pub config: PullConfig,
    /// Blobs fetched from registries (a metric, and how tests see that pulls were shared).
    pub downloads: Arc<AtomicU64>,
    /// The image service's shutdown flag (stops unpacks).
    pub shutdown: Arc<AtomicBool>,
}

/// Cancels the unpacks of a pull when the pull's future is dropped: a blocking unpack thread
/// cannot be aborted, but it checks the budget on every read.
struct CancelOnDrop(Arc<Budget>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Puller {
    fn client(&self) -> oci_client::Client {
        let mut plain_http = self.config.insecure_registries.clone();
        plain_http.extend(
            self.config
                .mirrors
                .values()
                .flatten()
                .filter(|e| e.plain_http())
                .map(|e| e.host().to_string()),
        );
        oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http),
            read_timeout: Some(self.config.request_timeout),
            connect_timeout: Some(self.config.connect_timeout),
            // We select the platform ourselves (with variants) from the raw index.
            platform_resolver: None,
            ..Default::default()
        })
    }

    async fn timed<T, E>(
        &self,
        reference: &Reference,
        what: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<Result<T, E>, PullError> {
        tokio::time::timeout(self.config.request_timeout, fut)
            .await
            .map_err(|_| PullError::Timeout {
                reference: reference.to_string(),
                what: what.to_string(),
                secs: self.config.request_timeout.as_secs(),
            })
    }

    /// Fetches a manifest or index by tag or digest, verified against the digest if pinned.
    async fn manifest(
        &self,
        client: &oci_client::Client,
        auth: &RegistryAuth,
        endpoint: &Endpoint,
        reference: &Reference,
    ) -> Result<(Vec<u8>, Digest), PullError> {
        let oref = oci_reference(endpoint, reference);
        let what = "manifest";
        let res = self
            .timed(
                reference,
                what,
                client.pull_manifest_raw(&oref, auth, ACCEPT),
            )
            .await?;
        let (bytes, _) = res.map_err(|source| classify(reference, what, source))?;
        if bytes.len() > MAX_METADATA_BYTES {
            return Err(PullError::BadManifest {
                reference: reference.to_string(),
                detail: format!("{} bytes", bytes.len()),
            });
        }
        let digest = Digest::sha256_of(&bytes);
        if let Some(want) = reference.digest()
            && *want != digest
        {
            return Err(PullError::Store {
                reference: reference.to_string(),
                digest: want.to_string(),
                source: StoreError::DigestMismatch {
                    expected: want.to_string(),
                    actual: digest.to_string(),
                },
            });
        }
        Ok((bytes.to_vec(), digest))
    }

    /// Fetches the manifest (or index) `reference` names from the first endpoint that has it:
    /// the registry's mirrors in order, then the registry itself. If every endpoint fails, the
    /// registry's own error is returned (the mirrors' are logged).
    async fn resolve(
        &self,
        client: &oci_client::Client,
        auth: &RegistryAuth,
        reference: &Reference,
    ) -> Result<(Endpoint, (Vec<u8>, Digest)), PullError> {
        let mut endpoints = endpoints_for(&self.config.mirrors, reference.domain());
        let last = endpoints
            .pop()
            .unwrap_or_else(|| Endpoint::registry(reference.domain()));
        for endpoint in endpoints {
            let auth = auth_for(&endpoint, reference, auth);
            match self.manifest(client, &auth, &endpoint, reference).await {
                Ok(found) => return Ok((endpoint, found)),
                Err(e) => tracing::info!(
                    image = %reference,
                    %endpoint,
                    error = %super::error_chain(&e),
                    "mirror cannot serve the image, trying the next endpoint"
                ),
            }
        }
        let auth = auth_for(&last, reference, auth);
        let found = self.manifest(client, &auth, &last, reference).await?;
        Ok((last, found))
    }

    /// Streams one blob into the store unless it is there already; returns whether it fetched.
    #[allow(clippy::too_many_arguments)]
    async fn blob(
        &self,
        client: &oci_client::Client,
        endpoint: &Endpoint,
        reference: &Reference,
        digest: &Digest,
        media_type: &str,
        size: u64,
        lease: &Lease,
    ) -> Result<bool, PullError> {
        lease.blob(digest);
        if self.store.has_blob(digest, size) {
            return Ok(false);
        }
        let store_err = |source| PullError::Store {
            reference: reference.to_string(),
            digest: digest.to_string(),
            source,
        };
        let what = format!("blob {digest}");
        let desc = oci_client::manifest::OciDescriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size: i64::try_from(size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let oref = oci_reference(endpoint, reference);
        let mut stream = self
            .timed(reference, &what, client.pull_blob_stream(&oref, &desc))
            .await?
            .map_err(|source| classify(reference, &what, source))?;
        self.downloads.fetch_add(1, Ordering::Relaxed);
        let writer = self
            .store
            .blob_writer(digest, Some(size))
            .map_err(store_err)?;
        // Disk writes happen on a blocking thread fed by a channel. If this future is dropped,
        // the channel closes without `Done` and the writer's drop deletes the temp file.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(16);
        let write_task = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            while let Some(chunk) = rx.blocking_recv() {
                match chunk {
                    Chunk::Data(bytes) => writer.write(&bytes)?,
                    Chunk::Done => return writer.commit().map(|()| true),
                }
            }
            Ok(false)
        });
        let send = |chunk| {
            let tx = tx.clone();
            async move { tx.send(chunk).await.is_ok() }
        };
        let mut received = 0u64;
        loop {
            let next = tokio::time::timeout(self.config.request_timeout, stream.next()).await;
            let chunk = match next {
                Err(_) => {
                    return Err(PullError::Timeout {
                        reference: reference.to_string(),
                        what,
                        secs: self.config.request_timeout.as_secs(),
                    });
                }
                Ok(None) => Chunk::Done,
                // The client library checks digests at the end of the body and reports a
                // mismatch against the registry's digest header, not the digest asked for.
                // Every byte arrived: the store's own check decides, and names both digests.
                Ok(Some(Err(source))) if received == size => {
                    tracing::debug!(image = %reference, %what, error = %source, "error after the whole body");
                    Chunk::Done
                }
                Ok(Some(Err(source))) => {
                    return Err(PullError::Transfer {
                        reference: reference.to_string(),
                        what,
                        source,
                    });
                }
                Ok(Some(Ok(bytes))) => {
                    received += bytes.len() as u64;
                    Chunk::Data(bytes)
                }
            };
            let done = matches!(chunk, Chunk::Done);
            // A closed channel means the writer failed; its result says why.
            if !send(chunk).await || done {
                break;
            }
        }
        drop(tx);
        match write_task.await {
            Ok(Ok(true)) => Ok(true),
            Ok(Ok(false)) => Err(PullError::Transfer {
                reference: reference.to_string(),
                what,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            }),
            Ok(Err(e)) => Err(store_err(e)),
            Err(source) => Err(PullError::Task {
                reference: reference.to_string(),
                source,
            }),
        }
    }

    /// Pulls `reference` and publishes its record; returns the image ID.
    pub async fn pull(&self, reference: &Reference, auth: &PullAuth) -> Result<String, PullError> {
        let started = tokio::time::Instant::now();
        let rauth = auth.to_registry_auth()?;
        // Everything this pull finds or writes stays until its record is published.
        let lease = self.store.lease();
        let budget = Arc::new(Budget::with_shutdown(
            &self.config.unpack,
            self.shutdown.clone(),
        ));
        let _cancel = CancelOnDrop(budget.clone());
        let client = self.client();
        let bad = |detail: String| PullError::BadManifest {
            reference: reference.to_string(),
            detail,
        };
        // Resolve the tag (or digest) at the first endpoint that knows it; everything else
        // comes from that endpoint.
        let (endpoint, (top_bytes, top_digest)) = self.resolve(&client, &rauth, reference).await?;
        let endpoint = &endpoint;
        let rauth = auth_for(endpoint, reference, &rauth);
        // Follow an index to our platform.
        let top = parse_manifest(&top_bytes).map_err(&bad)?;
        let mut blobs = vec![top_digest.clone()];
        let pinned = reference.with_digest(top_digest.clone());
        let (manifest, manifest_digest) = if let Some(entries) = &top.manifests {
            let (arch, variant) = host_platform();
            let entry =
                select_platform(entries, arch, variant).ok_or_else(|| PullError::NoPlatform {
                    reference: reference.to_string(),
                    platform: format!("linux/{arch}"),
                })?;
            let digest = Digest::parse(&entry.digest)
                .ok_or_else(|| bad(format!("index entry digest {:?}", entry.digest)))?;
            let (bytes, digest) = self
                .manifest(&client, &rauth, endpoint, &reference.with_digest(digest))
                .await?;
            let m = parse_manifest(&bytes).map_err(&bad)?;
            if m.manifests.is_some() {
                return Err(bad("index entry is itself an index".into()));
            }
            self.store_small(reference, &digest, &bytes, &lease).await?;
            blobs.push(digest.clone());
            (m, digest)
        } else {
            (top, top_digest.clone())
        };
        self.store_small(reference, &top_digest, &top_bytes, &lease)
            .await?;

        // The config names the image (its digest is the image ID) and the layers' diffIDs.
        let (config_desc, config_digest) = config_of(&manifest).map_err(&bad)?;
        self.blob(
            &client,
            endpoint,
            &pinned,
            &config_digest,
            &config_desc.media_type,
            config_desc.size,
            &lease,
        )
        .await?;
        let store = self.store.clone();
        let cd = config_digest.clone();
        let config_bytes = tokio::task::spawn_blocking(move || store.read_blob(&cd))
            .await
            .map_err(|source| PullError::Task {
                reference: reference.to_string(),
                source,
            })?
            .map_err(|source| PullError::Store {
                reference: reference.to_string(),
                digest: config_digest.to_string(),
                source,
            })?;
        let config = parse_config(&config_bytes).map_err(&bad)?;
        blobs.push(config_digest.clone());
        let mut layers = Vec::new();
        for (digest, record) in layer_records(&manifest, &config).map_err(&bad)? {
            blobs.push(digest);
            layers.push(record);
        }

        // Layers: fetch and unpack concurrently; each layer's snapshot holds only its own diff,
        // so no layer waits for its parent.
        let fetches: Vec<_> = layers
            .iter()
            .map(|l| {
                self.layer(&client, endpoint, &pinned, l, &lease, &budget)
                    .boxed()
            })
            .collect();
        futures::stream::iter(fetches)
            .buffer_unordered(self.config.max_concurrent_layers.max(1))
            .try_collect::<Vec<()>>()
            .await?;

        let user = config
            .config
            .as_ref()
            .and_then(|c| c.user.clone())
            .unwrap_or_default();
        let (uid, username) = user_of(&user);
        let size = config_desc.size + layers.iter().map(|l| l.size).sum::<u64>();
        let record = ImageRecord {
            id: config_digest.to_string(),
            // With both tag and digest the digest decides what is pulled, so the tag (which the
            // registry may point elsewhere) is not claimed.
            repo_tags: match reference.digest() {
                Some(_) => Vec::new(),
                None => reference.repo_tag().into_iter().collect(),
            },
            repo_digests: vec![reference.repo_digest(&top_digest)],
            size,
            manifest_digest: manifest_digest.to_string(),
            layers,
            blobs: blobs.iter().map(ToString::to_string).collect(),
            pinned: self
                .config
                .pinned_images
                .iter()
                .any(|p| Reference::parse(p).is_ok_and(|p| p == *reference)),
            username,
            uid,
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.publish(record))
            .await
            .map_err(|source| PullError::Task {
                reference: reference.to_string(),
                source,
            })?
            .map_err(|source| PullError::Store {
                reference: reference.to_string(),
                digest: config_digest.to_string(),
                source,
            })?;
        tracing::info!(
            image = %reference,
            id = %config_digest,
            endpoint = %endpoint,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image pulled"
        );
        Ok(config_digest.to_string())
    }

    async fn store_small(
        &self,
        reference: &Reference,
        digest: &Digest,
        bytes: &[u8],
        lease: &Lease,
    ) -> Result<(), PullError> {
        lease.blob(digest);
        if self.store.has_blob(digest, bytes.len() as u64) {
            return Ok(());
        }
        let store = self.store.clone();
        let (d, b) = (digest.clone(), bytes.to_vec());
        tokio::task::spawn_blocking(move || store.write_blob(&d, &b))
            .await
            .map_err(|source| PullError::Task {
                reference: reference.to_string(),
                source,
            })?
            .map_err(|source| PullError::Store {
                reference: reference.to_string(),
                digest: digest.to_string(),
                source,
            })
    }

    /// Makes sure one layer's blob and snapshot exist.
    async fn layer(
        &self,
        client: &oci_client::Client,
        endpoint: &Endpoint,
        reference: &Reference,
        layer: &LayerRecord,
        lease: &Lease,
        budget: &Arc<Budget>,
    ) -> Result<(), PullError> {
        let parse = |s: &str| {
            Digest::parse(s).ok_or_else(|| PullError::BadManifest {
                reference: reference.to_string(),
                detail: format!("digest {s:?}"),
            })
        };
        let digest = parse(&layer.digest)?;
        let chain_id = parse(&layer.chain_id)?;
        let diff_id = parse(&layer.diff_id)?;
        let fetched = self
            .blob(
                client,
                endpoint,
                reference,
                &digest,
                &layer.media_type,
                layer.size,
                lease,
            )
            .await?;
        lease.snapshot(&chain_id);
        if self.store.has_snapshot(&chain_id) {
            return Ok(());
        }
        let store = self.store.clone();
        let budget = budget.clone();
        let media_type = layer.media_type.clone();
        let d = digest.clone();
        let res = tokio::task::spawn_blocking(move || {
            // A blob that was already here is checked before use; a fresh one was checked
            // as it was written.
            if !fetched && let Err(e) = store.verify_blob(&d) {
                // Drop the damaged copy so that a retry fetches it again.
                store.discard_blob(&d);
                return Err(Err(e));
            }
            let blob = store.blob_path(&d).map_err(Err)?;
            let res = unpack_layer(
                &blob,
                &media_type,
                &diff_id,
                &store.snapshot_root(),
                &chain_id,
                &budget,
            );
            if let Err(e @ UnpackError::Cancelled) = &res {
                // Nobody may be left to report it: the pull's callers went away.
                tracing::info!(layer = %d, error = %e, "layer unpack stopped, partial snapshot removed");
            }
            res.map_err(Ok)
        })
        .await
        .map_err(|source| PullError::Task {
            reference: reference.to_string(),
            source,
        })?;
        match res {
            Ok(_) => Ok(()),
            Err(Ok(source)) => Err(PullError::Unpack {
                reference: reference.to_string(),
                digest: digest.to_string(),
                source,
            }),
            Err(Err(source)) => Err(PullError::Store {
                reference: reference.to_string(),
                digest: digest.to_string(),
                source,
            }),
        }
    }
}

enum Chunk {
    Data(bytes::Bytes),
    Done,
}

/// The credentials a pull of `reference` presents to `endpoint`. The CRI request's credentials
/// are for the registry the reference names (the kubelet picks them by that host), so a mirror
/// gets none, as with containerd: they must not leak to another host.
fn auth_for(endpoint: &Endpoint, reference: &Reference, auth: &RegistryAuth) -> RegistryAuth {
    if endpoint.host() == reference.domain() {
        auth.clone()
    } else {
        RegistryAuth::Anonymous
    }
}

/// `r` as fetched from `endpoint`: the endpoint's host, `r`'s repository path, tag and digest.
fn oci_reference(endpoint: &Endpoint, r: &Reference) -> oci_client::Reference {
    match (r.digest(), r.tag()) {
        (Some(d), _) => oci_client::Reference::with_digest(
            endpoint.host().to_string(),
            r.path().to_string(),
            d.to_string(),
        ),
        (None, tag) => oci_client::Reference::with_tag(
            endpoint.host().to_string(),
            r.path().to_string(),
            tag.unwrap_or(super::reference::DEFAULT_TAG).to_string(),
        ),
    }
}

fn classify(reference: &Reference, what: &str, source: OciDistributionError) -> PullError {
    let reference = reference.to_string();
    match &source {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            PullError::Unauthorized { reference, source }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => {
            PullError::NotFound { reference, source }
        }
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => PullError::Unauthorized { reference, source },
        OciDistributionError::ServerError { code: 404, .. } => {
            PullError::NotFound { reference, source }
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                use oci_client::errors::OciErrorCode::*;
                matches!(e.code, Unauthorized | Denied)
            }) =>
        {
            PullError::Unauthorized { reference, source }
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                use oci_client::errors::OciErrorCode::*;
                matches!(
                    e.code,
                    ManifestUnknown | NameUnknown | BlobUnknown | NotFound
                )
            }) =>
        {
            PullError::NotFound { reference, source }
        }
        _ => PullError::Registry {
            reference,
            what: what.to_string(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_config_forms() {
        assert!(matches!(
            PullAuth::default().to_registry_auth(),
            Ok(RegistryAuth::Anonymous)
        ));
        let basic = PullAuth::basic("u", "p").to_registry_auth();
        assert!(matches!(basic, Ok(RegistryAuth::Basic(u, p)) if u == "u" && p == "p"));
        let auth = PullAuth {
            auth: base64::engine::general_purpose::STANDARD.encode("strake:pa:ss"),
            ..Default::default()
        };
        assert!(
            matches!(auth.to_registry_auth(), Ok(RegistryAuth::Basic(u, p)) if u == "strake" && p == "pa:ss")
        );
        let bad = PullAuth {
            auth: "!!".into(),
            ..Default::default()
        };
        assert!(matches!(bad.to_registry_auth(), Err(PullError::BadAuth)));
        let token = PullAuth {
            registry_token: "t".into(),
            ..Default::default()
        };
        assert!(matches!(token.to_registry_auth(), Ok(RegistryAuth::Bearer(t)) if t == "t"));
        assert!(!format!("{:?}", PullAuth::basic("u", "secret")).contains("secret"));
    }

    #[test]
    fn credentials_go_to_the_named_registry_only() {
        let reference = Reference::parse("registry.k8s.io/pause:3.9").unwrap();
        let basic = RegistryAuth::Basic("u".into(), "p".into());
        let own = Endpoint::registry("registry.k8s.io");
        let mirror = Endpoint::parse("http://10.0.0.1:5000").unwrap();
        assert!(auth_for(&own, &reference, &basic) == basic);
        assert!(auth_for(&mirror, &reference, &basic) == RegistryAuth::Anonymous);
    }
}
