//! The image store: content-addressed blobs, unpacked layer snapshots and one JSON record per
//! image, all under one directory (`<state>/images`):
//!
//! ```text
//! blobs/sha256/<hex>          manifests, indexes, configs and compressed layers
//! snapshots/<chainID hex>/fs  one layer's diff, unpacked, for use as an overlayfs lower dir
//! records/<image ID hex>.json what CRI lists: tags, repo digests, layers, size, user
//! ```
//!
//! Every write goes to a `.tmp-*` sibling first and is renamed into place once complete and
//! verified, so a crash leaves either nothing or a whole object; [`Store::open`] sweeps the
//! leftovers. A record is written only after everything it names exists.
//!
//! What a pull has written or found but no record names yet is protected from removal by a
//! [`Lease`] (containerd's design: content under a lease is not garbage), as is an image a
//! container is being created from; so a removal never waits for a pull, nor a pull for a
//! removal, and no lock is held across network I/O.
//!
//! The whole store is root's alone (mode 0700): layers hold the images' setuid files.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::reference::Digest;

/// Prefix of every file or directory that is not yet published.
pub const TMP_PREFIX: &str = ".tmp-";

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("image store: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Content does not hash to the digest that names it.
    #[error("blob {expected}: content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// Content is longer or shorter than its descriptor says.
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    /// Only sha256 content is stored.
    #[error("blob {digest}: unsupported digest algorithm")]
    UnsupportedDigest { digest: String },
    /// An image record cannot be read or written.
    #[error("image record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The image is used by a container.
    #[error("image {id} is in use by a container")]
    InUse { id: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One layer of an image, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the blob as the registry serves it (compressed).
    pub digest: String,
    /// Media type from the manifest.
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Chain ID of the layer stack up to and including this layer; names its snapshot.
    pub chain_id: String,
}

/// An image as CRI sees it. The record's file name is its ID (the config digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Image ID: the digest of its config blob.
    pub id: String,
    /// `docker.io/library/busybox:latest`-style tags pointing at this image.
    pub repo_tags: Vec<String>,
    /// `docker.io/library/busybox@sha256:...`-style digests (of what each reference resolved to).
    pub repo_digests: Vec<String>,
    /// Bytes of config plus compressed layers, as containerd reports.
    pub size: u64,
    /// Digest of the platform manifest the image came from.
    pub manifest_digest: String,
    /// Layers, lowest first.
    pub layers: Vec<LayerRecord>,
    /// Every blob this image keeps alive (index, manifest, config, layers).
    pub blobs: Vec<String>,
    /// Whether the image is exempt from the kubelet's image garbage collection.
    pub pinned: bool,
    /// The config's `User` when it is a name (CRI `username`).
    pub username: String,
    /// The config's `User` when it is numeric (CRI `uid`).
    pub uid: Option<i64>,
}

impl ImageRecord {
    /// Chain IDs of the image's layers, lowest first.
    pub fn chain_ids(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.layers.iter().map(|l| l.chain_id.as_str())
    }
}

/// Filesystem usage of the image store, for CRI ImageFsInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Bytes allocated on disk under the image directory.
    pub used_bytes: u64,
    /// Inodes (files, directories, links) under the image directory.
    pub inodes_used: u64,
}

/// The on-disk image store. Cheap lookups are answered from memory; all writes go to disk first.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    records: RwLock<HashMap<String, ImageRecord>>,
    /// Lease counts by key (`blob:<hex>`, `snap:<hex>`, `image:<id>`). Lock order: `records`,
    /// then `leases`.
    leases: Mutex<HashMap<String, usize>>,
}

/// Keeps blobs, snapshots or an image from being removed while held (see the module doc).
/// Keys are added as the holder comes to rely on them; all are released on drop.
#[derive(Debug)]
pub struct Lease {
    store: Arc<Store>,
    keys: Mutex<Vec<String>>,
}

impl Lease {
    fn add(&self, key: String) {
        *self.store.leases().entry(key.clone()).or_insert(0) += 1;
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key);
    }

    /// Protects the blob `digest` (take it before checking whether the blob exists).
    pub fn blob(&self, digest: &Digest) {
        self.add(format!("blob:{}", digest.hex()));
    }

    /// Protects the snapshot of `chain_id` (take it before checking whether it exists).
    pub fn snapshot(&self, chain_id: &Digest) {
        self.add(format!("snap:{}", chain_id.hex()));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()));
        let mut leases = self.store.leases();
        for key in keys {
            if let Some(n) = leases.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    leases.remove(&key);
                }
            }
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temporary name in a directory (pid + counter; the sweep at open removes strays).
pub fn tmp_name(what: &str) -> String {
    format!(
        "{TMP_PREFIX}{what}-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn sha256_hex_of(digest: &Digest) -> Result<&str, StoreError> {
    if digest.algorithm() == "sha256" {
        Ok(digest.hex())
    } else {
        Err(StoreError::UnsupportedDigest {
            digest: digest.to_string(),
        })
    }
}

fn parse_digest(s: &str) -> Result<Digest, StoreError> {
    Digest::parse(s).ok_or_else(|| StoreError::UnsupportedDigest {
        digest: s.to_string(),
    })
}

impl Store {
    /// Opens (creating if needed) the store at `root`: removes unpublished temporaries left by
    /// a crash and loads every image record.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        let store = Store {
            root,
            records: RwLock::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
        };
        // Root's alone, and corrected on every start (state of older versions was 0755).
        let blobs = store.root.join("blobs");
        for dir in [&store.root, &blobs] {
            crate::state::create_dir_mode(dir, crate::state::MODE_PRIVATE)
                .map_err(io_err("create", dir))?;
        }
        for dir in [store.blob_dir(), store.snapshot_root(), store.record_dir()] {
            crate::state::create_dir_mode(&dir, crate::state::MODE_PRIVATE)
                .map_err(io_err("create", &dir))?;
            store.sweep_tmp(&dir)?;
        }
        let mut records = HashMap::new();
        let dir = store.record_dir();
        for entry in std::fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let path = entry.map_err(io_err("read", &dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read(&path).map_err(io_err("read", &path))?;
            match serde_json::from_slice::<ImageRecord>(&text) {
                Ok(record) => {
                    records.insert(record.id.clone(), record);
                }
                // Records are written atomically, so this is damage from outside; keep the file
                // for a person to look at but do not serve the image.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable image record")
                }
            }
        }
        tracing::info!(root = %store.root.display(), images = records.len(), "image store loaded");
        *store.records.write().unwrap_or_else(|e| e.into_inner()) = records;
        Ok(store)
    }

    fn sweep_tmp(&self, dir: &Path) -> Result<(), StoreError> {
        for entry in std::fs::read_dir(dir).map_err(io_err("read", dir))? {
            let entry = entry.map_err(io_err("read", dir))?;
            if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing unpublished image data");
            let res = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            res.map_err(io_err("remove", &path))?;
        }
        Ok(())
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Every update is one counter change: a panic cannot leave the map half-updated.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty lease, to be filled as a pull goes.
    pub fn lease(self: &Arc<Self>) -> Lease {
        Lease {
            store: self.clone(),
            keys: Mutex::new(Vec::new()),
        }
    }

    /// Resolves `spec` as [`Self::resolve`] does and, in the same critical section, leases the
    /// image, so that a removal cannot slip between the lookup and the caller's registration
    /// of its use (a container being created). Removal refuses a leased image.
    pub fn reserve(self: &Arc<Self>, spec: &str) -> Option<(ImageRecord, Lease)> {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        let record = resolve_in(&records, spec)?;
        let lease = self.lease();
        lease.add(format!("image:{}", record.id));
        drop(records);
        Some((record, lease))
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn record_dir(&self) -> PathBuf {
        self.root.join("records")
    }

    /// Directory holding every snapshot (and unpublished `.tmp-*` unpack dirs).
    pub fn snapshot_root(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Where the blob `digest` lives once published.
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf, StoreError> {
        Ok(self.blob_dir().join(sha256_hex_of(digest)?))
    }

    /// Whether the blob is published with the given size (content is checked by [`Self::verify_blob`]).
    pub fn has_blob(&self, digest: &Digest, size: u64) -> bool {
        self.blob_path(digest)
            .ok()
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.len() == size)
    }

    /// The directory of the snapshot for `chain_id`; its `fs` subdirectory is the lower dir.
    pub fn snapshot_dir(&self, chain_id: &Digest) -> Result<PathBuf, StoreError> {
        Ok(self.snapshot_root().join(sha256_hex_of(chain_id)?))
    }

    /// Whether the snapshot for `chain_id` is published.
    pub fn has_snapshot(&self, chain_id: &Digest) -> bool {
        self.snapshot_dir(chain_id)
            .is_ok_and(|d| d.join("fs").is_dir())
    }

    /// Starts writing a blob; bytes are hashed and counted as they come.
    pub fn blob_writer(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<BlobWriter, StoreError> {
        let final_path = self.blob_path(digest)?;
        let tmp_path = self.blob_dir().join(tmp_name(digest.hex()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io_err("create", &tmp_path))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp_path,
            final_path,
            expected: digest.clone(),
            expected_size: size,
            hasher: sha2::Sha256::new(),
            written: 0,
        })
    }

    /// Writes a small blob in one go (manifests, configs).
    pub fn write_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut w = self.blob_writer(digest, Some(bytes.len() as u64))?;
        w.write(bytes)?;
        w.commit()
    }

    /// Reads a published blob, verifying its digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest)?;
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        let actual = Digest::sha256_of(&bytes);
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(bytes)
    }

    /// Re-hashes a published blob (before use, on demand).
    pub fn verify_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest)?;
        let mut file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(io_err("read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest.as_str() {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(())
    }

    /// Deletes a published blob found damaged (a later pull fetches it again).
    pub fn discard_blob(&self, digest: &Digest) {
        if let Ok(path) = self.blob_path(digest) {
            tracing::warn!(digest = %digest, "discarding damaged blob");
            let _ = std::fs::remove_file(path);
        }
    }

    /// Publishes `record`: written atomically, then visible. Tags it claims are taken from any
    /// other image (a tag names one image; the old one keeps its digests).
    pub fn publish(&self, record: ImageRecord) -> Result<(), StoreError> {
        let mut records = self.records.write().unwrap_or_else(|e| e.into_inner());
        let mut record = record;
        if let Some(old) = records.get(&record.id) {
            merge(&mut record.repo_tags, &old.repo_tags);
            merge(&mut record.repo_digests, &old.repo_digests);
            record.pinned |= old.pinned;
        }
        let mut changed = Vec::new();
        for (id, other) in records.iter() {
            if *id == record.id || !other.repo_tags.iter().any(|t| record.repo_tags.contains(t)) {
                continue;
            }
            let mut other = other.clone();
            other.repo_tags.retain(|t| !record.repo_tags.contains(t));
            changed.push(other);
        }
        self.write_record(&record)?;
        for other in changed {
            self.write_record(&other)?;
            records.insert(other.id.clone(), other);
        }
        records.insert(record.id.clone(), record);
        Ok(())
    }

    fn record_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        let digest = parse_digest(id)?;
        Ok(self
            .record_dir()
            .join(format!("{}.json", sha256_hex_of(&digest)?)))
    }

    fn write_record(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.id)?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Record {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes)
    }

    /// The image with ID `id` (`sha256:<hex>`).
    pub fn get(&self, id: &str) -> Option<ImageRecord> {
        self.records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every image.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut all: Vec<_> = self
            .records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The image a CRI `ImageSpec.image` names: an image ID (`sha256:<hex>` or bare hex), a
    /// unique ID prefix, a repo tag or a repo digest (references are normalised first).
    pub fn resolve(&self, spec: &str) -> Option<ImageRecord> {
        resolve_in(
            &self.records.read().unwrap_or_else(|e| e.into_inner()),
            spec,
        )
    }

    /// Removes the image `id` unless `in_use` says a container uses it, then deletes blobs and
    /// snapshots no remaining image needs. Returns whether the image existed.
    ///
    /// Content that pulls in flight rely on is leased and kept; an image reserved for a
    /// container being created counts as in use.
    pub fn remove(&self, id: &str, in_use: &dyn Fn(&str) -> bool) -> Result<bool, StoreError> {
        let mut records = self.records.write().unwrap_or_else(|e| e.into_inner());
        if !records.contains_key(id) {
            return Ok(false);
        }
        if in_use(id) || self.leases().contains_key(&format!("image:{id}")) {
            return Err(StoreError::InUse { id: id.to_string() });
        }
        let path = self.record_path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        sync_dir(&self.record_dir())?;
        records.remove(id);
        self.collect_garbage(&records)?;
        Ok(true)
    }

    /// Deletes every published blob and snapshot that no record names.
    fn collect_garbage(&self, records: &HashMap<String, ImageRecord>) -> Result<(), StoreError> {
        let keep_blobs: HashSet<String> = records
            .values()
            .flat_map(|r| r.blobs.iter())
            .filter_map(|d| d.strip_prefix("sha256:").map(str::to_string))
            .collect();
        let keep_snaps: HashSet<String> = records
            .values()
            .flat_map(|r| r.chain_ids())
            .filter_map(|d| d.strip_prefix("sha256:").map(str::to_string))
            .collect();
        for (dir, keep, kind) in [
            (self.blob_dir(), &keep_blobs, "blob"),
            (self.snapshot_root(), &keep_snaps, "snap"),
        ] {
            for entry in std::fs::read_dir(&dir).map_err(io_err("read", &dir))? {
                let entry = entry.map_err(io_err("read", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) || keep.contains(&name) {
                    continue;
                }
                let path = entry.path();
                // Out of sight first, under the lease lock (a rename is quick): a pull leases
                // before it looks, so it either sees the content gone or keeps it.
                let doomed = dir.join(tmp_name(&name));
                {
                    let leases = self.leases();
                    if leases.contains_key(&format!("{kind}:{name}")) {
                        continue;
                    }
                    std::fs::rename(&path, &doomed).map_err(io_err("rename", &path))?;
                }
                tracing::debug!(path = %path.display(), "removing unreferenced image data");
                let res = if kind == "snap" {
                    std::fs::remove_dir_all(&doomed)
                } else {
                    std::fs::remove_file(&doomed)
                };
                res.map_err(io_err("remove", &doomed))?;
            }
        }
        Ok(())
    }

    /// Bytes and inodes used under the store's root.
    pub fn fs_usage(&self) -> Result<FsUsage, StoreError> {
        let mut usage = FsUsage {
            used_bytes: 0,
            inodes_used: 0,
        };
        let mut stack = vec![self.root.clone()];
        let mut seen = HashSet::new();
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                // Removed meanwhile (a concurrent remove or unpack cleanup).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read", &dir)(e)),
            };
            for entry in entries {
                let Ok(entry) = entry else { continue };
                let Ok(meta) = entry.metadata() else { continue };
                // Hard links count once.
                if !seen.insert((meta.dev(), meta.ino())) {
                    continue;
                }
                usage.inodes_used += 1;
                usage.used_bytes += meta.blocks() * 512;
                if meta.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        Ok(usage)
    }
}

/// [`Store::resolve`] over the records.
fn resolve_in(records: &HashMap<String, ImageRecord>, spec: &str) -> Option<ImageRecord> {
    if let Some(r) = records.get(spec) {
        return Some(r.clone());
    }
    let hex_part = spec.strip_prefix("sha256:").unwrap_or(spec);
    if !hex_part.is_empty() && hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        let want = format!("sha256:{}", hex_part.to_ascii_lowercase());
        let mut found = records.values().filter(|r| r.id.starts_with(&want));
        if let (Some(one), None) = (found.next(), found.next()) {
            return Some(one.clone());
        }
        if spec.starts_with("sha256:") {
            return None;
        }
    }
    let reference = super::reference::Reference::parse(spec).ok()?;
    let by_digest = reference.digest().map(|d| reference.repo_digest(d));
    let by_tag = reference.repo_tag();
    records
        .values()
        .find(|r| match &by_digest {
            Some(d) => r.repo_digests.contains(d),
            None => by_tag.as_ref().is_some_and(|t| r.repo_tags.contains(t)),
        })
        .cloned()
}

fn merge(into: &mut Vec<String>, from: &[String]) {
    for s in from {
        if !into.contains(s) {
            into.push(s.clone());
        }
    }
}

/// Writes `bytes` to `path` via a temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(tmp_name("record"));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
        sync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Makes a directory's entries (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// A blob being written: hashed and counted as it goes, published by [`BlobWriter::commit`]
/// only if digest and size match; dropped unfinished, it deletes its temp file.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<std::fs::File>,
    tmp_path: PathBuf,
    final_path: PathBuf,
    expected: Digest,
    expected_size: Option<u64>,
    hasher: sha2::Sha256,
    written: u64,
}

impl BlobWriter {
    /// Appends bytes; refuses to go past the expected size.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.written += bytes.len() as u64;
        if let Some(size) = self.expected_size
            && self.written > size
        {
            return Err(StoreError::SizeMismatch {
                digest: self.expected.to_string(),
                expected: size,
                actual: self.written,
            });
        }
        self.hasher.update(bytes);
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.write_all(bytes)
            .map_err(io_err("write", &self.tmp_path))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks size and digest, fsyncs and renames the blob into place.
    pub fn commit(mut self) -> Result<(), StoreError> {
        if let Some(size) = self.expected_size
            && self.written != size
        {
            return Err(StoreError::SizeMismatch {
                digest: self.expected.to_string(),
                expected: size,
                actual: self.written,
            });
        }
        let actual = format!(
            "sha256:{}",
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        );
        if actual != self.expected.as_str() {
            return Err(StoreError::DigestMismatch {
                expected: self.expected.to_string(),
                actual,
            });
        }
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(io_err("fsync", &self.tmp_path))?;
        }
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(io_err("rename", &self.final_path))?;
        if let Some(dir) = self.final_path.parent() {
            sync_dir(dir)?;
        }
        // Published: nothing left for Drop to clean.
        self.tmp_path = PathBuf::new();
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.tmp_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &Digest, tags: &[&str], blobs: &[&Digest]) -> ImageRecord {
        ImageRecord {
            id: id.to_string(),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: vec![format!("docker.io/library/x@{id}")],
            size: 1,
            manifest_digest: id.to_string(),
            layers: vec![],
            blobs: blobs.iter().map(|d| d.to_string()).collect(),
            pinned: false,
            username: String::new(),
            uid: Some(0),
        }
    }

    #[test]
    fn blob_writer_verifies_digest_and_size_and_publishes_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let good = Digest::sha256_of(b"hello");
        store.write_blob(&good, b"hello").expect("write");
        assert!(store.has_blob(&good, 5));
        assert_eq!(store.read_blob(&good).expect("read"), b"hello");
        store.verify_blob(&good).expect("verify");

        let other = Digest::sha256_of(b"other");
        let err = store.write_blob(&other, b"hellx").expect_err("bad digest");
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        let mut w = store.blob_writer(&other, Some(3)).expect("writer");
        assert!(matches!(
            w.write(b"other"),
            Err(StoreError::SizeMismatch { .. })
        ));
        drop(w);
        // No blob and no temp file remain from the failures.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(good.hex())]);

        // Corruption after publishing is caught on demand.
        std::fs::write(store.blob_path(&good).expect("path"), b"HELLO").expect("corrupt");
        assert!(store.verify_blob(&good).is_err());
        assert!(store.read_blob(&good).is_err());
    }

    #[test]
    fn open_sweeps_temporaries_and_reloads_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = Digest::sha256_of(b"config");
        {
            let store = Store::open(dir.path()).expect("open");
            store.write_blob(&id, b"config").expect("blob");
            store
                .publish(record(&id, &["docker.io/library/x:1"], &[&id]))
                .expect("publish");
            let w = store
                .blob_writer(&Digest::sha256_of(b"x"), None)
                .expect("w");
            std::mem::forget(w); // as a crash would leave it
            std::fs::create_dir(dir.path().join("snapshots/.tmp-half")).expect("mkdir");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.resolve("x:1").map(|r| r.id), Some(id.to_string()));
        for sub in ["blobs/sha256", "snapshots", "records"] {
            for e in std::fs::read_dir(dir.path().join(sub)).expect("read") {
                let name = e.expect("entry").file_name();
                assert!(!name.to_string_lossy().starts_with(TMP_PREFIX), "{name:?}");
            }
        }
    }

    #[test]
    fn resolve_by_id_prefix_tag_and_digest_and_tags_move() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        store
            .publish(record(
                &a,
                &["docker.io/library/x:1", "docker.io/library/x:latest"],
                &[],
            ))
            .expect("a");
        assert_eq!(store.resolve(a.as_str()).map(|r| r.id), Some(a.to_string()));
        assert_eq!(store.resolve(a.hex()).map(|r| r.id), Some(a.to_string()));
        assert_eq!(
            store.resolve(&a.hex()[..12]).map(|r| r.id),
            Some(a.to_string())
        );
        assert_eq!(store.resolve("x").map(|r| r.id), Some(a.to_string()));
        assert_eq!(
            store.resolve(&format!("x@{a}")).map(|r| r.id),
            Some(a.to_string())
        );
        assert!(store.resolve("y").is_none());
        assert!(store.resolve("sha256:0000").is_none());

        // x:1 now names b; a keeps x:latest.
        store
            .publish(record(&b, &["docker.io/library/x:1"], &[]))
            .expect("b");
        assert_eq!(store.resolve("x:1").map(|r| r.id), Some(b.to_string()));
        assert_eq!(
            store.get(a.as_str()).map(|r| r.repo_tags),
            Some(vec!["docker.io/library/x:latest".to_string()])
        );
        // Re-publishing an image merges tags.
        store
            .publish(record(&b, &["docker.io/library/x:2"], &[]))
            .expect("b again");
        let tags = store
            .get(b.as_str())
            .map(|r| r.repo_tags)
            .unwrap_or_default();
        assert_eq!(tags.len(), 2, "{tags:?}");
        // And survives a reopen.
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.resolve("x:2").map(|r| r.id), Some(b.to_string()));
    }

    #[test]
    fn a_reserved_image_cannot_be_removed_until_the_reservation_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        let id = Digest::sha256_of(b"img");
        store.write_blob(&id, b"img").expect("blob");
        store
            .publish(record(&id, &["docker.io/library/x:1"], &[&id]))
            .expect("publish");
        // CreateContainer's lookup and its use are one step for RemoveImage.
        let (found, reservation) = store.reserve("x:1").expect("reserve");
        assert_eq!(found.id, id.to_string());
        let err = store.remove(id.as_str(), &|_| false).expect_err("removed");
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        assert!(store.has_blob(&id, 3));
        drop(reservation);
        assert!(store.remove(id.as_str(), &|_| false).expect("remove"));
        assert!(store.reserve("x:1").is_none());
    }

    #[test]
    fn leased_content_survives_removal_of_other_images_and_goes_once_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        let old = Digest::sha256_of(b"old");
        store.write_blob(&old, b"old").expect("blob");
        store
            .publish(record(&old, &["docker.io/library/old:1"], &[&old]))
            .expect("publish");
        // A pull in flight has written (or found) a blob and a snapshot no record names yet.
        let pulled = Digest::sha256_of(b"pulled");
        let chain = Digest::sha256_of(b"chain");
        let lease = store.lease();
        lease.blob(&pulled);
        lease.snapshot(&chain);
        store.write_blob(&pulled, b"pulled").expect("blob");
        let snap = store.snapshot_dir(&chain).expect("dir").join("fs");
        std::fs::create_dir_all(&snap).expect("snapshot");
        let stray = Digest::sha256_of(b"stray");
        store.write_blob(&stray, b"stray").expect("blob");

        assert!(store.remove(old.as_str(), &|_| false).expect("remove"));
        assert!(store.has_blob(&pulled, 6), "leased blob collected");
        assert!(store.has_snapshot(&chain), "leased snapshot collected");
        assert!(!store.has_blob(&stray, 5), "unleased stray kept");
        assert!(!store.has_blob(&old, 3));

        // Released and unreferenced: the next collection takes it.
        drop(lease);
        let other = Digest::sha256_of(b"other");
        store
            .publish(record(&other, &["docker.io/library/other:1"], &[]))
            .expect("publish");
        assert!(store.remove(other.as_str(), &|_| false).expect("remove"));
        assert!(!store.has_blob(&pulled, 6));
        assert!(!store.has_snapshot(&chain));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
            .expect("read")
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn the_store_is_root_only_and_old_modes_are_fixed_on_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("images");
        for sub in ["blobs/sha256", "snapshots", "records"] {
            std::fs::create_dir_all(root.join(sub)).expect("old layout");
            std::fs::set_permissions(root.join(sub), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let _store = Store::open(&root).expect("open");
        for sub in ["", "blobs", "blobs/sha256", "snapshots", "records"] {
            let mode = std::fs::metadata(root.join(sub))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o700, "{sub:?}");
        }
    }

    #[test]
    fn remove_is_refused_in_use_and_collects_unreferenced_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let shared = Digest::sha256_of(b"shared");
        let only_a = Digest::sha256_of(b"only-a");
        let b = Digest::sha256_of(b"b");
        store.write_blob(&shared, b"shared").expect("blob");
        store.write_blob(&only_a, b"only-a").expect("blob");
        store.write_blob(&b, b"b").expect("blob");
        store
            .publish(record(
                &only_a,
                &["docker.io/library/a:1"],
                &[&shared, &only_a],
            ))
            .expect("a");
        store
            .publish(record(&b, &["docker.io/library/b:1"], &[&shared, &b]))
            .expect("b");
        let err = store
            .remove(only_a.as_str(), &|_| true)
            .expect_err("in use");
        assert!(matches!(err, StoreError::InUse { .. }));
        assert!(store.get(only_a.as_str()).is_some());
        assert!(store.remove(only_a.as_str(), &|_| false).expect("remove"));
        assert!(!store.remove(only_a.as_str(), &|_| false).expect("again"));
        assert!(store.get(only_a.as_str()).is_none());
        assert!(!store.has_blob(&only_a, 6));
        assert!(store.has_blob(&shared, 6));
        assert!(store.has_blob(&b, 1));
        let usage = store.fs_usage().expect("usage");
        assert!(usage.inodes_used >= 5 && usage.used_bytes > 0, "{usage:?}");
    }
}
