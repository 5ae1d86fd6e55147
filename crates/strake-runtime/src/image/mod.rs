//! The image subsystem behind the CRI ImageService: references ([`reference`]), the on-disk
//! content store ([`store`]), layer unpacking into overlayfs lower dirs ([`unpack`]) and pulls
//! from registries ([`pull`]) or their mirrors ([`mirror`]). [`ImageService`] is the entry
//! point; the gRPC layer maps [`ImageError::code`] onto status codes.

pub mod cri;
pub mod metadata;
pub mod mirror;
pub mod pull;
pub mod reference;
pub mod store;
pub mod unpack;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared, WeakShared};

pub use mirror::{Endpoint, EndpointError, Mirrors};
pub use pull::{PullAuth, PullConfig, PullError};
pub use reference::{Digest, Reference, ReferenceError};
pub use store::{FsUsage, ImageRecord, Lease, StoreError};
pub use unpack::{UnpackError, UnpackOptions};

/// The gRPC status an [`ImageError`] should become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed (bad reference, bad auth field).
    InvalidArgument,
    /// The image (or its platform) does not exist at the registry.
    NotFound,
    /// The registry refused the credentials.
    PermissionDenied,
    /// The request cannot be honoured in the current state (image in use, bad image content).
    FailedPrecondition,
    /// Transient: network, registry, timeout. Retrying may succeed.
    Unavailable,
    /// A local failure (disk, task).
    Internal,
}

/// What the image service reports.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image reference does not parse.
    #[error("invalid image reference")]
    InvalidReference {
        #[source]
        source: ReferenceError,
    },
    /// A pull failed (shared by every caller that waited on it).
    #[error("pull image {reference}")]
    Pull {
        reference: String,
        #[source]
        source: Arc<PullError>,
    },
    /// RemoveImage on an image a container uses.
    #[error("image {image} is in use by a container")]
    InUse { image: String },
    /// The store failed.
    #[error("image store")]
    Store {
        #[source]
        source: StoreError,
    },
    /// A blocking task died.
    #[error("image store task failed")]
    Task {
        #[source]
        source: tokio::task::JoinError,
    },
}

impl ImageError {
    /// The gRPC status code this error maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            ImageError::InvalidReference { .. } => ErrorCode::InvalidArgument,
            ImageError::InUse { .. } => ErrorCode::FailedPrecondition,
            ImageError::Store { .. } | ImageError::Task { .. } => ErrorCode::Internal,
            ImageError::Pull { source, .. } => match &**source {
                PullError::BadAuth => ErrorCode::InvalidArgument,
                PullError::NotFound { .. } | PullError::NoPlatform { .. } => ErrorCode::NotFound,
                PullError::Unauthorized { .. } => ErrorCode::PermissionDenied,
                e if e.is_retryable() => ErrorCode::Unavailable,
                e if e.is_bad_image() => ErrorCode::FailedPrecondition,
                _ => ErrorCode::Internal,
            },
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ImageError::Pull { source, .. } if source.is_retryable())
    }
}

/// Tells whether a container uses an image (consulted by [`ImageService::remove`]).
///
/// It is called with the store's record lock held: it must answer from its own state and not
/// call back into the image service.
pub trait ImageUsage: Send + Sync {
    /// Whether any container uses the image with this ID.
    fn in_use(&self, image_id: &str) -> bool;
}

impl<F: Fn(&str) -> bool + Send + Sync> ImageUsage for F {
    fn in_use(&self, image_id: &str) -> bool {
        self(image_id)
    }
}

/// CRI ImageFsInfo for the image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFsInfo {
    /// The directory the numbers are about.
    pub mountpoint: PathBuf,
    /// Bytes used.
    pub used_bytes: u64,
    /// Inodes used.
    pub inodes_used: u64,
    /// When measured, in nanoseconds since the epoch.
    pub timestamp_nanos: i64,
}

type PullResult = Result<String, Arc<PullError>>;
type PullFuture = BoxFuture<'static, PullResult>;
type SharedPull = Shared<PullFuture>;
/// In-flight pulls by normalised reference and credentials: a generation number and the
/// shared future.
type InFlight = HashMap<String, (u64, WeakShared<PullFuture>)>;

/// The in-flight key of a pull: the reference and a digest of the credentials (so that the
/// map never holds them in the clear).
fn flight_key(reference: &str, auth: &PullAuth) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [
        &auth.username,
        &auth.password,
        &auth.auth,
        &auth.registry_token,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("{reference} {}", hex::encode(h.finalize()))
}

/// The image service: pull, list, status, remove, fs info.
#[derive(Clone)]
pub struct ImageService {
    inner: Arc<Inner>,
}

struct Inner {
    puller: pull::Puller,
    usage: Box<dyn ImageUsage>,
    /// One pull per normalised reference; later callers await the same future. Weak, so a
    /// pull whose every caller went away is dropped (cancelled) rather than kept half-done.
    in_flight: Mutex<InFlight>,
    next_pull: AtomicU64,
    /// Set by [`ImageService::shutdown`]: unpacks stop at their next read.
    shutdown: Arc<AtomicBool>,
    /// Wakes the pulls in flight at shutdown, so they end without waiting on the network.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for ImageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageService")
            .field("root", &self.inner.puller.store.root())
            .finish_non_exhaustive()
    }
}

impl ImageService {
    /// Opens the store under `root` (normally `<state>/images`), recovering from any crash.
    pub async fn open(
        root: impl Into<PathBuf>,
        config: PullConfig,
        usage: impl ImageUsage + 'static,
    ) -> Result<ImageService, ImageError> {
        // oci-client's reqwest is built without a default crypto provider: the workspace uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root = root.into();
        let shutdown = Arc::new(AtomicBool::new(false));
        let store = tokio::task::spawn_blocking(move || store::Store::open(root))
            .await
            .map_err(|source| ImageError::Task { source })?
            .map_err(|source| ImageError::Store { source })?;
        Ok(ImageService {
            inner: Arc::new(Inner {
                puller: pull::Puller {
                    store: Arc::new(store),
                    config,
                    downloads: Arc::new(AtomicU64::new(0)),
                    shutdown: shutdown.clone(),
                },
                usage: Box::new(usage),
                in_flight: Mutex::new(HashMap::new()),
                next_pull: AtomicU64::new(0),
                shutdown,
                stopping: tokio::sync::watch::Sender::new(false),
            }),
        })
    }

    /// PullImage: returns the image ID (`sha256:<config digest>`), as containerd does.
    pub async fn pull(&self, image: &str, auth: &PullAuth) -> Result<String, ImageError> {
        let reference =
            Reference::parse(image).map_err(|source| ImageError::InvalidReference { source })?;
        let name = reference.to_string();
        // Only a caller with the same credentials may join a pull in flight: a pull that
        // succeeds with one pod's credentials proves nothing about another pod's (or none).
        let key = flight_key(&name, auth);
        let shared = {
            let mut map = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match map.get(&key).and_then(|(_, weak)| weak.upgrade()) {
                Some(running) => {
                    tracing::debug!(image = %name, "joining pull in flight");
                    running
                }
                None => {
                    let id = self.inner.next_pull.fetch_add(1, Ordering::Relaxed);
                    let fut = self.pull_once(reference, auth.clone(), key.clone(), id);
                    let shared: SharedPull = fut.boxed().shared();
                    if let Some(weak) = shared.downgrade() {
                        map.insert(key.clone(), (id, weak));
                    }
                    shared
                }
            }
        };
        shared.await.map_err(|source| ImageError::Pull {
            reference: name,
            source,
        })
    }

    fn pull_once(
        &self,
        reference: Reference,
        auth: PullAuth,
        key: String,
        id: u64,
    ) -> impl Future<Output = PullResult> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let deadline = inner.puller.config.pull_timeout;
            let mut stopping = inner.stopping.subscribe();
            // Dropping the pull (deadline, shutdown, every caller gone) cancels its unpacks.
            let result = tokio::select! {
                r = tokio::time::timeout(deadline, inner.puller.pull(&reference, &auth)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(PullError::Deadline {
                        reference: reference.to_string(),
                        secs: deadline.as_secs(),
                    }),
                },
                _ = stopping.wait_for(|s| *s) => Err(PullError::Cancelled {
                    reference: reference.to_string(),
                }),
            }
            .map_err(Arc::new);
            let mut map = inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if map.get(&key).is_some_and(|(n, _)| *n == id) {
                map.remove(&key);
            }
            if let Err(e) = &result {
                tracing::warn!(image = %reference, error = %error_chain(&**e), "image pull failed");
            }
            result
        }
    }

    /// ListImages: every image in the store.
    pub fn list(&self) -> Vec<ImageRecord> {
        self.inner.puller.store.list()
    }

    /// ImageStatus: the image `image` names (ID, ID prefix, tag or digest), or `None` (CRI
    /// answers an empty response for a missing image, not an error).
    pub fn status(&self, image: &str) -> Option<ImageRecord> {
        self.inner.puller.store.resolve(image)
    }

    /// The image `image` names, reserved against removal until the returned lease is dropped:
    /// a container being created holds it until the container is registered (and from then
    /// on [`ImageUsage`] answers for it), so RemoveImage cannot pull the layers from under it.
    pub fn reserve(&self, image: &str) -> Option<(ImageRecord, Lease)> {
        self.inner.puller.store.reserve(image)
    }

    /// Stops every pull in flight (they fail as cancelled, their partial content is removed)
    /// and every later one, so that the daemon's shutdown does not wait on a registry or on a
    /// long unpack.
    pub fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.stopping.send_replace(true);
    }

    /// RemoveImage: removes the image and all its tags; a missing image is not an error.
    /// Refused while a container uses it.
    pub async fn remove(&self, image: &str) -> Result<(), ImageError> {
        let Some(record) = self.inner.puller.store.resolve(image) else {
            return Ok(());
        };
        let inner = self.inner.clone();
        let id = record.id.clone();
        tokio::task::spawn_blocking(move || {
            inner.puller.store.remove(&id, &|id| inner.usage.in_use(id))
        })
        .await
        .map_err(|source| ImageError::Task { source })?
        .map_err(|source| match source {
            StoreError::InUse { .. } => ImageError::InUse {
                image: image.to_string(),
            },
            source => ImageError::Store { source },
        })?;
        tracing::info!(image, id = %record.id, "image removed");
        Ok(())
    }

    /// ImageFsInfo: usage of the image store's directory.
    pub async fn fs_info(&self) -> Result<ImageFsInfo, ImageError> {
        let inner = self.inner.clone();
        let usage = tokio::task::spawn_blocking(move || inner.puller.store.fs_usage())
            .await
            .map_err(|source| ImageError::Task { source })?
            .map_err(|source| ImageError::Store { source })?;
        let timestamp_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(ImageFsInfo {
            mountpoint: self.inner.puller.store.root().to_path_buf(),
            used_bytes: usage.used_bytes,
            inodes_used: usage.inodes_used,
            timestamp_nanos,
        })
    }

    /// The overlayfs lower dirs of an image, top layer first (the order `lowerdir=` wants).
    pub fn lower_dirs(&self, image_id: &str) -> Option<Vec<PathBuf>> {
        let record = self.inner.puller.store.get(image_id)?;
        let store = &self.inner.puller.store;
        record
            .chain_ids()
            .rev()
            .map(|c| {
                let digest = Digest::parse(c)?;
                store
                    .snapshot_dir(&digest)
                    .ok()
                    .map(|d| unpack::snapshot_fs(&d))
            })
            .collect()
    }

    /// The raw config blob of an image (verified), for building container specs.
    pub async fn config(&self, image_id: &str) -> Result<Vec<u8>, ImageError> {
        let digest = Digest::parse(image_id).ok_or_else(|| ImageError::Store {
            source: StoreError::UnsupportedDigest {
                digest: image_id.to_string(),
            },
        })?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.puller.store.read_blob(&digest))
            .await
            .map_err(|source| ImageError::Task { source })?
            .map_err(|source| ImageError::Store { source })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        self.inner.puller.store.root()
    }

    /// How many blobs were fetched from registries since start.
    pub fn blobs_downloaded(&self) -> u64 {
        self.inner.puller.downloads.load(Ordering::Relaxed)
    }
}

/// An error and its causes on one line, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes() {
        let e = ImageError::InvalidReference {
            source: ReferenceError::Empty,
        };
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        let pull = |p| ImageError::Pull {
            reference: "r".into(),
            source: Arc::new(p),
        };
        assert_eq!(
            pull(PullError::NoPlatform {
                reference: "r".into(),
                platform: "linux/amd64".into()
            })
            .code(),
            ErrorCode::NotFound
        );
        let t = pull(PullError::Timeout {
            reference: "r".into(),
            what: "blob".into(),
            secs: 1,
        });
        assert_eq!(t.code(), ErrorCode::Unavailable);
        assert!(t.is_retryable());
        let u = pull(PullError::Unpack {
            reference: "r".into(),
            digest: "d".into(),
            source: UnpackError::DeviceNode { path: "p".into() },
        });
        assert_eq!(u.code(), ErrorCode::FailedPrecondition);
        assert!(!u.is_retryable());
        assert_eq!(
            ImageError::InUse { image: "x".into() }.code(),
            ErrorCode::FailedPrecondition
        );
    }
}
