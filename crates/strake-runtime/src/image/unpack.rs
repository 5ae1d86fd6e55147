//! Unpacking one layer into its own snapshot directory, for use as an overlayfs lower dir.
//!
//! Each layer's diff is unpacked alone into `<snapshots>/<chainID>/fs`: OCI whiteouts become
//! overlay whiteouts (`.wh.name` -> a 0/0 character device, `.wh..wh..opq` ->
//! `trusted.overlay.opaque=y` on the directory), so stacking the snapshots as lower dirs gives the
//! image's root filesystem.
//!
//! Layers are untrusted. Every path is resolved component by component from an open directory
//! descriptor of the snapshot root, refusing `..`, absolute paths and any component that is a
//! symlink (`O_NOFOLLOW` at every step), so nothing is ever written outside the snapshot, even
//! through symlinks the layer itself planted. Absolute entry names are refused rather than
//! stripped: the OCI layer spec defines entries relative to the root, and GNU tar's own stripping
//! exists for archives made by hand, not for images; a layer carrying them is malformed or hostile.
//! Hard link targets are resolved the same way. Device nodes are refused unless allowed. The
//! uncompressed size is capped and its digest must equal the config's diffID. All of this
//! happens in a `.tmp-*` directory that is renamed into place only when the layer is complete.
//!
//! A layer is also a resource attack: a [`Budget`] shared by every layer of one image caps
//! the uncompressed bytes and the entries, each entry's path depth is capped, the memory the tar
//! reader spends on extension headers (GNU long names, PAX records) between two entries is
//! capped, and so is the list of directory times kept for the end. The budget's cancel flag is
//! checked on every read, so a pull that is dropped (its client went away, the daemon stops)
//! ends its unpack promptly and the partial snapshot is removed.

use std::cell::Cell;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use sha2::Digest as _;

use super::reference::Digest;
use super::store::{TMP_PREFIX, sync_dir, tmp_name};

/// Xattr overlayfs reads to hide a lower directory's contents.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Default of [`UnpackOptions::max_size`]: 16 GiB uncompressed per image.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 16 << 30;
/// Default of [`UnpackOptions::max_entries`]: one million entries per image.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// Default of [`UnpackOptions::max_depth`]: path components of one entry.
pub const DEFAULT_MAX_PATH_DEPTH: usize = 128;
/// Most bytes the tar reader may consume between two entries (extension headers: GNU long
/// names, PAX records, which it reads into memory whole). Real ones are a few KiB.
const MAX_HEADER_BYTES: u64 = 8 << 20;
/// Most bytes of directory paths kept to restore directory times at the end; past it, later
/// directories keep the time of the unpack (cosmetic) rather than the memory growing.
const MAX_DIR_TIMES_BYTES: usize = 16 << 20;

/// Limits and permissions for unpacking.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Allow character and block device nodes (privileged images only).
    pub allow_devices: bool,
    /// Most uncompressed bytes all layers of one image may hold together (tar streams), and
    /// one layer's file contents (sparse files expand beyond their stream).
    pub max_size: u64,
    /// Most tar entries all layers of one image may hold together.
    pub max_entries: u64,
    /// Most path components one entry (or hard link target) may have.
    pub max_depth: usize,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            allow_devices: false,
            max_size: DEFAULT_MAX_UNPACKED_BYTES,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_depth: DEFAULT_MAX_PATH_DEPTH,
        }
    }
}

/// What the layers of one image may still use, shared by their concurrent unpacks, and
/// whether the pull was cancelled.
#[derive(Debug)]
pub struct Budget {
    opts: UnpackOptions,
    bytes: AtomicU64,
    entries: AtomicU64,
    cancelled: AtomicBool,
    /// The image service's shutdown flag: set, every unpack stops.
    shutdown: Option<Arc<AtomicBool>>,
}

impl Budget {
    /// A fresh budget for one image.
    pub fn new(opts: &UnpackOptions) -> Self {
        Budget {
            opts: *opts,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            shutdown: None,
        }
    }

    /// A budget that also stops when `shutdown` is set.
    pub fn with_shutdown(opts: &UnpackOptions, shutdown: Arc<AtomicBool>) -> Self {
        Budget {
            shutdown: Some(shutdown),
            ..Budget::new(opts)
        }
    }

    /// Stops every unpack using this budget at its next read.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Whether the unpacks must stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
            || self
                .shutdown
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    fn take_bytes(&self, n: u64) -> bool {
        self.bytes.fetch_add(n, Ordering::Relaxed).saturating_add(n) <= self.opts.max_size
    }

    fn take_entry(&self) -> Result<(), UnpackError> {
        if self.entries.fetch_add(1, Ordering::Relaxed) >= self.opts.max_entries {
            return Err(UnpackError::EntryLimit {
                limit: self.opts.max_entries,
            });
        }
        Ok(())
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (flate2).
    Gzip,
    /// zstd (ruzstd, pure Rust: no C toolchain in the build, and decoding is all we need).
    Zstd,
}

/// Why a layer was refused or could not be unpacked. Nothing of it is left on disk.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// A filesystem operation failed.
    #[error("unpack: {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The layer's media type is not a tar layer.
    #[error("unsupported layer media type {media_type:?}")]
    UnsupportedMediaType { media_type: String },
    /// The media type and the blob's first bytes disagree.
    #[error("layer media type {media_type:?} but the blob looks like {found}")]
    CompressionMismatch {
        media_type: String,
        found: &'static str,
    },
    /// The blob is not a valid compressed stream or tar archive.
    #[error("layer is not a valid archive")]
    Archive {
        #[source]
        source: std::io::Error,
    },
    /// An entry's name is absolute.
    #[error("layer entry {path:?} has an absolute path")]
    AbsolutePath { path: String },
    /// An entry's name contains `..`.
    #[error("layer entry {path:?} contains '..'")]
    ParentComponent { path: String },
    /// An entry's path runs through a symlink (which could point anywhere).
    #[error("layer entry {path:?} goes through a symlink")]
    ThroughSymlink { path: String },
    /// An entry's parent exists but is not a directory.
    #[error("layer entry {path:?}: a parent is not a directory")]
    NotADirectory { path: String },
    /// A non-directory entry would replace a non-empty directory.
    #[error("layer entry {path:?} conflicts with a directory")]
    EntryConflict { path: String },
    /// A hard link's target is outside the layer.
    #[error("layer entry {path:?} is a hard link to {target:?}, outside the layer")]
    HardlinkEscape { path: String, target: String },
    /// A device node in a layer that may not have any.
    #[error("layer entry {path:?} is a device node")]
    DeviceNode { path: String },
    /// A whiteout that names something other than a sibling.
    #[error("layer entry {path:?} is a whiteout for a path outside the layer")]
    WhiteoutOutside { path: String },
    /// The image is bigger, uncompressed, than allowed.
    #[error("image exceeds the unpacked size limit of {limit} bytes")]
    SizeLimit { limit: u64 },
    /// The image has more entries than allowed.
    #[error("image exceeds the limit of {limit} entries")]
    EntryLimit { limit: u64 },
    /// An entry's path (or hard link target) is deeper than allowed.
    #[error("layer entry {path:?} is deeper than {limit} path components")]
    PathDepth { path: String, limit: usize },
    /// Extension headers (long names, PAX records) bigger than any real one.
    #[error("layer has extension headers over {limit} bytes before an entry")]
    HeaderLimit { limit: u64 },
    /// The pull was cancelled (its client went away, or the daemon is stopping).
    #[error("unpack cancelled")]
    Cancelled,
    /// The uncompressed layer does not hash to the config's diffID.
    #[error("layer diffID is {actual}, the image config says {expected}")]
    DiffIdMismatch { expected: String, actual: String },
}

impl UnpackError {
    /// Whether the layer itself is at fault (as opposed to the local filesystem).
    pub fn is_bad_layer(&self) -> bool {
        !matches!(self, UnpackError::Io { .. } | UnpackError::Cancelled)
    }
}

fn io_err(op: &'static str, path: impl Into<String>) -> impl FnOnce(std::io::Error) -> UnpackError {
    let path = path.into();
    move |source| UnpackError::Io { op, path, source }
}

fn errno_err<'a>(op: &'static str, path: &'a str) -> impl FnOnce(Errno) -> UnpackError + 'a {
    move |e| UnpackError::Io {
        op,
        path: path.to_string(),
        source: e.into(),
    }
}

/// Picks the decompressor from the media type and checks the blob's magic bytes agree.
pub fn detect(media_type: &str, magic: &[u8]) -> Result<Compression, UnpackError> {
    let by_type = match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
        _ => {
            return Err(UnpackError::UnsupportedMediaType {
                media_type: media_type.to_string(),
            });
        }
    };
    let by_magic = if magic.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    };
    if by_type != by_magic {
        return Err(UnpackError::CompressionMismatch {
            media_type: media_type.to_string(),
            found: match by_magic {
                Compression::None => "an uncompressed tar",
                Compression::Gzip => "gzip",
                Compression::Zstd => "zstd",
            },
        });
    }
    Ok(by_type)
}

/// What [`unpack_layer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpacked {
    /// The snapshot was created.
    Created,
    /// The snapshot already existed (or another unpack published it first).
    AlreadyPresent,
}

/// Unpacks the layer blob at `blob` into `<snapshot_root>/<chain_id hex>/fs`.
pub fn unpack_layer(
    blob: &Path,
    media_type: &str,
    diff_id: &Digest,
    snapshot_root: &Path,
    chain_id: &Digest,
    budget: &Budget,
) -> Result<Unpacked, UnpackError> {
    let final_dir = snapshot_root.join(chain_id.hex());
    if final_dir.join("fs").is_dir() {
        return Ok(Unpacked::AlreadyPresent);
    }
    let tmp_dir = snapshot_root.join(tmp_name(chain_id.hex()));
    let fs_dir = tmp_dir.join("fs");
    let result = (|| {
        // The snapshot's own directory is root's; `fs` is the layer's root directory as a
        // container sees it (overlay shows the upper or top lower dir's mode at `/`).
        crate::state::create_dir_mode(&tmp_dir, 0o700)
            .map_err(io_err("create", tmp_dir.display().to_string()))?;
        crate::state::create_dir_mode(&fs_dir, 0o755)
            .map_err(io_err("create", fs_dir.display().to_string()))?;
        let file = std::fs::File::open(blob).map_err(io_err("open", blob.display().to_string()))?;
        unpack_stream(BufReader::new(file), media_type, diff_id, &fs_dir, budget)?;
        let root =
            std::fs::File::open(&fs_dir).map_err(io_err("open", fs_dir.display().to_string()))?;
        rustix::fs::syncfs(&root).map_err(errno_err("syncfs", "snapshot"))?;
        match std::fs::rename(&tmp_dir, &final_dir) {
            Ok(()) => {
                sync_dir(snapshot_root).map_err(|e| UnpackError::Io {
                    op: "fsync",
                    path: snapshot_root.display().to_string(),
                    source: std::io::Error::other(e),
                })?;
                Ok(Unpacked::Created)
            }
            // A concurrent pull of another image with this layer chain got there first.
            Err(_) if final_dir.join("fs").is_dir() => Ok(Unpacked::AlreadyPresent),
            Err(e) => Err(io_err("rename", final_dir.display().to_string())(e)),
        }
    })();
    if !matches!(result, Ok(Unpacked::Created)) {
        let _ = std::fs::remove_dir_all(&tmp_dir);
    }
    debug_assert!(
        tmp_dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(TMP_PREFIX))
    );
    result
}

/// Unpacks a (possibly compressed) layer stream into the existing, empty directory `dest`.
pub fn unpack_stream(
    mut blob: impl BufRead,
    media_type: &str,
    diff_id: &Digest,
    dest: &Path,
    budget: &Budget,
) -> Result<(), UnpackError> {
    let magic = blob
        .fill_buf()
        .map_err(|source| UnpackError::Archive { source })?
        .to_vec();
    let compression = detect(media_type, &magic)?;
    let decompressed: Box<dyn Read> = match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
        Compression::Zstd => Box::new(ZstdFrames::new(blob)),
    };
    let meter = Rc::new(Meter::default());
    let counted = Counting {
        inner: decompressed,
        hasher: sha2::Sha256::new(),
        budget,
        meter: meter.clone(),
    };
    // An error that a stop of the meter caused is reported as that stop.
    let fail = |e: UnpackError| meter.stop_error(budget).unwrap_or(e);
    let mut archive = tar::Archive::new(counted);
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_err("open", "snapshot root"))?;
    let mut unpacker = Unpacker {
        root,
        opts: budget.opts,
        written: 0,
        dir_times: Vec::new(),
        dir_times_bytes: 0,
        meter: meter.clone(),
    };
    let entries = archive
        .entries()
        .map_err(|source| fail(UnpackError::Archive { source }))?;
    for entry in entries {
        let entry = entry.map_err(|source| fail(UnpackError::Archive { source }))?;
        meter.header_bytes.set(0);
        if budget.is_cancelled() {
            return Err(UnpackError::Cancelled);
        }
        budget.take_entry()?;
        unpacker.entry(entry).map_err(|e| match e {
            UnpackError::Io { .. } | UnpackError::Archive { .. } => fail(e),
            e => e,
        })?;
    }
    // The diffID covers the whole tar stream, including the end-of-archive padding.
    let mut rest = archive.into_inner();
    meter.in_data.set(true);
    std::io::copy(&mut rest, &mut std::io::sink())
        .map_err(|source| fail(UnpackError::Archive { source }))?;
    let actual = format!("sha256:{}", hex::encode(rest.hasher.finalize()));
    if actual != diff_id.as_str() {
        return Err(UnpackError::DiffIdMismatch {
            expected: diff_id.to_string(),
            actual,
        });
    }
    unpacker.apply_dir_times()
}

/// Why the metered stream stopped reading, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Stop {
    #[default]
    No,
    Size,
    Headers,
    Cancelled,
}

/// What the unpacker and the metered stream share (one thread: cells suffice).
#[derive(Debug, Default)]
struct Meter {
    stop: Cell<Stop>,
    /// Set while the unpacker reads an entry's contents: those bytes go to disk, not memory.
    in_data: Cell<bool>,
    /// Bytes the tar reader consumed since the last entry was handed out.
    header_bytes: Cell<u64>,
}

impl Meter {
    fn stop_error(&self, budget: &Budget) -> Option<UnpackError> {
        match self.stop.get() {
            Stop::No => None,
            Stop::Size => Some(UnpackError::SizeLimit {
                limit: budget.opts.max_size,
            }),
            Stop::Headers => Some(UnpackError::HeaderLimit {
                limit: MAX_HEADER_BYTES,
            }),
            Stop::Cancelled => Some(UnpackError::Cancelled),
        }
    }
}

/// Hashes and counts the uncompressed stream against the image's budget, failing once it is
/// spent, once extension headers grow past [`MAX_HEADER_BYTES`], or once the pull is cancelled.
struct Counting<'a, R> {
    inner: R,
    hasher: sha2::Sha256,
    budget: &'a Budget,
    meter: Rc<Meter>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let stop = |meter: &Meter, why: Stop, msg: &str| {
            meter.stop.set(why);
            Err(std::io::Error::other(msg.to_string()))
        };
        if self.budget.is_cancelled() {
            return stop(&self.meter, Stop::Cancelled, "unpack cancelled");
        }
        let n = self.inner.read(buf)?;
        if !self.budget.take_bytes(n as u64) {
            return stop(&self.meter, Stop::Size, "image size limit exceeded");
        }
        if !self.meter.in_data.get() {
            let h = self.meter.header_bytes.get() + n as u64;
            self.meter.header_bytes.set(h);
            if h > MAX_HEADER_BYTES {
                return stop(&self.meter, Stop::Headers, "extension headers too large");
            }
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A zstd stream of any number of frames (skippable frames skipped), as `zstd -d` reads it.
struct ZstdFrames<R> {
    source: R,
    decoder: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Self {
        ZstdFrames {
            source,
            decoder: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if self.source.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.decoder.reset(&mut self.source) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        let skipped = std::io::copy(
                            &mut (&mut self.source).take(u64::from(length)),
                            &mut std::io::sink(),
                        )?;
                        if skipped != u64::from(length) {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        continue;
                    }
                    Err(e) => return Err(std::io::Error::other(e)),
                }
            }
            while self.decoder.can_collect() < buf.len() && !self.decoder.is_finished() {
                let want = buf.len() - self.decoder.can_collect();
                self.decoder
                    .decode_blocks(
                        &mut self.source,
                        ruzstd::decoding::BlockDecodingStrategy::UptoBytes(want),
                    )
                    .map_err(std::io::Error::other)?;
            }
            let n = self.decoder.read(buf)?;
            if n == 0 && self.decoder.is_finished() {
                self.in_frame = false;
                continue;
            }
            return Ok(n);
        }
    }
}

/// A sanitised entry path: components, none of them empty, `.` or `..`, at most `max_depth`.
fn components(raw: &[u8], max_depth: usize) -> Result<Vec<&[u8]>, UnpackError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.starts_with(b"/") {
        return Err(UnpackError::AbsolutePath { path: shown() });
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(UnpackError::ParentComponent { path: shown() }),
            c => out.push(c),
        }
        if out.len() > max_depth {
            return Err(UnpackError::PathDepth {
                path: shown(),
                limit: max_depth,
            });
        }
    }
    Ok(out)
}

struct Unpacker {
    root: OwnedFd,
    opts: UnpackOptions,
    written: u64,
    /// Directories (path, mtime) whose times are set at the end, bounded by
    /// [`MAX_DIR_TIMES_BYTES`] of paths.
    dir_times: Vec<(Vec<u8>, u64)>,
    dir_times_bytes: usize,
    meter: Rc<Meter>,
}

fn name(c: &[u8]) -> &OsStr {
    OsStr::from_bytes(c)
}

fn mtime(secs: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(secs).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

impl Unpacker {
    /// Opens the directory holding `comps`' last component, creating missing parents when
    /// `create`, never following a symlink.
    fn parent(&self, comps: &[&[u8]], create: bool, shown: &str) -> Result<OwnedFd, UnpackError> {
        let mut dir = rustix::io::dup(&self.root).map_err(errno_err("dup", shown))?;
        for c in &comps[..comps.len().saturating_sub(1)] {
            dir = self.open_dir(&dir, c, create, shown)?;
        }
        Ok(dir)
    }

    fn open_dir(
        &self,
        parent: &OwnedFd,
        c: &[u8],
        create: bool,
        shown: &str,
    ) -> Result<OwnedFd, UnpackError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(parent, name(c), flags, Mode::empty()) {
            Ok(fd) => Ok(fd),
            Err(Errno::NOENT) if create => {
                let made = match rustix::fs::mkdirat(parent, name(c), Mode::from_raw_mode(0o755)) {
                    Ok(()) => true,
                    Err(Errno::EXIST) => false,
                    Err(e) => return Err(errno_err("mkdir", shown)(e)),
                };
                let fd = rustix::fs::openat(parent, name(c), flags, Mode::empty())
                    .map_err(errno_err("open", shown))?;
                // A parent the layer does not list gets 0755 whatever the daemon's umask
                // (0077 in its unit): containers running as any user must traverse it.
                if made {
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                        .map_err(errno_err("chmod", shown))?;
                }
                Ok(fd)
            }
            Err(e @ (Errno::NOTDIR | Errno::LOOP)) => {
                match rustix::fs::statat(parent, name(c), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                        Err(UnpackError::ThroughSymlink {
                            path: shown.to_string(),
                        })
                    }
                    Ok(_) => Err(UnpackError::NotADirectory {
                        path: shown.to_string(),
                    }),
                    Err(_) => Err(errno_err("open", shown)(e)),
                }
            }
            Err(e) => Err(errno_err("open", shown)(e)),
        }
    }

    /// Makes room for a new non-directory entry `n` in `dir`.
    fn clear(&self, dir: &OwnedFd, n: &[u8], shown: &str) -> Result<(), UnpackError> {
        match rustix::fs::statat(dir, name(n), AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(errno_err("stat", shown)(e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                rustix::fs::unlinkat(dir, name(n), AtFlags::REMOVEDIR).map_err(|_| {
                    UnpackError::EntryConflict {
                        path: shown.to_string(),
                    }
                })
            }
            Ok(_) => rustix::fs::unlinkat(dir, name(n), AtFlags::empty())
                .map_err(errno_err("unlink", shown)),
        }
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let comps = components(&raw, self.opts.max_depth)?;
        let kind = entry.header().entry_type();
        let Some((&last, _)) = comps.split_last() else {
            // The root itself ("./"): its metadata belongs to the image's root, not ours to set.
            return Ok(());
        };
        if let Some(target) = last.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&comps, last, target, &shown);
        }
        let xattrs = self.xattrs(&mut entry)?;
        let header = entry.header();
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        let mode = Mode::from_raw_mode(
            header
                .mode()
                .map_err(|source| UnpackError::Archive { source })?
                & 0o7777,
        );
        let uid = header
            .uid()
            .map_err(|source| UnpackError::Archive { source })?;
        let gid = header
            .gid()
            .map_err(|source| UnpackError::Archive { source })?;
        let secs = header.mtime().unwrap_or(0);
        let owner = (
            Some(rustix::fs::Uid::from_raw(
                u32::try_from(uid).unwrap_or(u32::MAX),
            )),
            Some(rustix::fs::Gid::from_raw(
                u32::try_from(gid).unwrap_or(u32::MAX),
            )),
        );
        let dir = self.parent(&comps, true, &shown)?;
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::statat(&dir, name(last), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        self.clear(&dir, last, &shown)?;
                        rustix::fs::mkdirat(&dir, name(last), mode)
                            .map_err(errno_err("mkdir", &shown))?;
                    }
                    Err(_) => rustix::fs::mkdirat(&dir, name(last), mode)
                        .map_err(errno_err("mkdir", &shown))?,
                }
                let fd = self.open_dir(&dir, last, false, &shown)?;
                rustix::fs::fchown(&fd, owner.0, owner.1).map_err(errno_err("chown", &shown))?;
                rustix::fs::fchmod(&fd, mode).map_err(errno_err("chmod", &shown))?;
                set_xattrs(&fd, &xattrs, &shown)?;
                self.remember_dir_time(&comps, secs);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.clear(&dir, last, &shown)?;
                let fd = rustix::fs::openat(
                    &dir,
                    name(last),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(errno_err("create", &shown))?;
                let mut file = std::fs::File::from(fd);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    self.meter.in_data.set(true);
                    let read = entry.read(&mut buf);
                    self.meter.in_data.set(false);
                    let n = read.map_err(|source| UnpackError::Archive { source })?;
                    if n == 0 {
                        break;
                    }
                    // Sparse entries can expand far beyond the stream; cap what lands on disk too.
                    self.written += n as u64;
                    if self.written > self.opts.max_size {
                        return Err(UnpackError::SizeLimit {
                            limit: self.opts.max_size,
                        });
                    }
                    file.write_all(&buf[..n])
                        .map_err(io_err("write", shown.clone()))?;
                }
                rustix::fs::fchown(&file, owner.0, owner.1).map_err(errno_err("chown", &shown))?;
                rustix::fs::fchmod(&file, mode).map_err(errno_err("chmod", &shown))?;
                set_xattrs(&file, &xattrs, &shown)?;
                rustix::fs::futimens(&file, &mtime(secs)).map_err(errno_err("utimes", &shown))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                // The target is stored, never followed here: an absolute or `..` target is
                // normal (resolved inside the container's root at run time).
                self.clear(&dir, last, &shown)?;
                rustix::fs::symlinkat(name(&target), &dir, name(last))
                    .map_err(errno_err("symlink", &shown))?;
                rustix::fs::chownat(
                    &dir,
                    name(last),
                    owner.0,
                    owner.1,
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno_err("chown", &shown))?;
                rustix::fs::utimensat(&dir, name(last), &mtime(secs), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(errno_err("utimes", &shown))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let escape = || UnpackError::HardlinkEscape {
                    path: shown.clone(),
                    target: String::from_utf8_lossy(&target).into_owned(),
                };
                let tcomps = components(&target, self.opts.max_depth).map_err(|e| match e {
                    UnpackError::PathDepth { .. } => e,
                    _ => escape(),
                })?;
                let Some((&tlast, _)) = tcomps.split_last() else {
                    return Err(escape());
                };
                let tdir = self.parent(&tcomps, false, &shown).map_err(|e| match e {
                    UnpackError::ThroughSymlink { .. } => escape(),
                    e => e,
                })?;
                self.clear(&dir, last, &shown)?;
                rustix::fs::linkat(&tdir, name(tlast), &dir, name(last), AtFlags::empty())
                    .map_err(errno_err("link", &shown))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if file_type != FileType::Fifo && !self.opts.allow_devices {
                    return Err(UnpackError::DeviceNode { path: shown });
                }
                self.clear(&dir, last, &shown)?;
                rustix::fs::mknodat(
                    &dir,
                    name(last),
                    file_type,
                    mode,
                    rustix::fs::makedev(major, minor),
                )
                .map_err(errno_err("mknod", &shown))?;
                rustix::fs::chownat(
                    &dir,
                    name(last),
                    owner.0,
                    owner.1,
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno_err("chown", &shown))?;
                rustix::fs::chmodat(&dir, name(last), mode, AtFlags::empty())
                    .map_err(errno_err("chmod", &shown))?;
            }
            other => {
                tracing::debug!(path = %shown, kind = ?other, "skipping layer entry of unsupported type");
            }
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        comps: &[&[u8]],
        last: &[u8],
        target: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        if last == OPAQUE_WHITEOUT.as_bytes() {
            let dir = self.parent(comps, true, shown)?;
            rustix::fs::fsetxattr(&dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(errno_err("setxattr", shown))?;
            return Ok(());
        }
        if target.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            // Other `.wh..wh.` names are aufs bookkeeping with no meaning for overlay.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(UnpackError::WhiteoutOutside {
                path: shown.to_string(),
            });
        }
        let dir = self.parent(comps, true, shown)?;
        self.clear(&dir, target, shown)?;
        rustix::fs::mknodat(
            &dir,
            name(target),
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(errno_err("mknod whiteout", shown))
    }

    /// The entry's extended attributes worth keeping: `user.*` and file capabilities. Others
    /// (`trusted.*` in particular, which would let a layer forge overlay metadata) are dropped.
    fn xattrs<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
        let mut out = Vec::new();
        let Some(exts) = entry
            .pax_extensions()
            .map_err(|source| UnpackError::Archive { source })?
        else {
            return Ok(out);
        };
        for ext in exts {
            let ext = ext.map_err(|source| UnpackError::Archive { source })?;
            let Ok(key) = ext.key() else { continue };
            let Some(attr) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if attr.starts_with("user.") || attr == "security.capability" {
                out.push((attr.to_string(), ext.value_bytes().to_vec()));
            } else {
                tracing::debug!(xattr = attr, "dropping layer xattr");
            }
        }
        Ok(out)
    }

    fn remember_dir_time(&mut self, comps: &[&[u8]], secs: u64) {
        let path = comps.join(&b'/');
        if self.dir_times_bytes + path.len() > MAX_DIR_TIMES_BYTES {
            if self.dir_times_bytes <= MAX_DIR_TIMES_BYTES {
                tracing::info!(
                    limit = MAX_DIR_TIMES_BYTES,
                    "layer has too many directories to restore all their times"
                );
                // Logged once: past the limit from now on.
                self.dir_times_bytes = MAX_DIR_TIMES_BYTES + 1;
            }
            return;
        }
        self.dir_times_bytes += path.len();
        self.dir_times.push((path, secs));
    }

    /// Directory mtimes are set last, since creating their children changes them.
    fn apply_dir_times(&mut self) -> Result<(), UnpackError> {
        for (path, secs) in std::mem::take(&mut self.dir_times).into_iter().rev() {
            let refs: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
            let Some(last) = refs.last() else { continue };
            let shown = String::from_utf8_lossy(&path).into_owned();
            let Ok(dir) = self.parent(&refs, false, &shown) else {
                continue; // replaced by a later entry
            };
            let _ =
                rustix::fs::utimensat(&dir, name(last), &mtime(secs), AtFlags::SYMLINK_NOFOLLOW);
        }
        Ok(())
    }
}

fn set_xattrs(fd: impl AsFd, xattrs: &[(String, Vec<u8>)], shown: &str) -> Result<(), UnpackError> {
    for (k, v) in xattrs {
        match rustix::fs::fsetxattr(&fd, k.as_str(), v, XattrFlags::empty()) {
            Ok(()) => {}
            // A filesystem without user xattrs loses them, as containerd's unpacker does.
            Err(Errno::NOTSUP) => tracing::debug!(path = shown, xattr = %k, "xattr not supported"),
            Err(e) => return Err(errno_err("setxattr", shown)(e)),
        }
    }
    Ok(())
}

/// The chain IDs of a stack of diffIDs (OCI image spec: `ChainID(L0|...|Ln) =
/// sha256(ChainID(L0|...|Ln-1) + " " + DiffID(Ln))`).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::sha256_of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Where a snapshot's root filesystem is, given its directory.
pub fn snapshot_fs(dir: &Path) -> PathBuf {
    dir.join("fs")
}

#[cfg(test)]
mod tests;
