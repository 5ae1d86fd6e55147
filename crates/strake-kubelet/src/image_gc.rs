//! Image garbage collection, as upstream's image manager does it: every period (upstream's
//! `ImageGCPeriod`, 5 minutes), when the image filesystem's usage reaches
//! `imageGCHighThresholdPercent`, unused images are removed, least recently used first, until
//! enough is freed to bring usage down to `imageGCLowThresholdPercent`; an image unused for longer
//! than `imageMaximumGCAge` (0: never) goes whatever the usage. Never removed: an image any
//! container uses (running or not), a pinned image, or one first seen less than
//! `imageMinimumGCAge` ago (so an image just pulled for a container about to be created stays).
//!
//! The decisions are pure ([`Records::detect`], [`plan`]); [`run`] feeds them from the CRI.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use strake_types::cri;
use tokio::time::Instant;

/// The image GC settings (KubeletConfiguration, upstream's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// `imageGCHighThresholdPercent` (85): usage that starts a collection; 100 disables it.
    pub high_percent: u8,
    /// `imageGCLowThresholdPercent` (80): usage a collection brings the filesystem down to.
    pub low_percent: u8,
    /// `imageMinimumGCAge` (2m).
    pub min_age: Duration,
    /// `imageMaximumGCAge` (0 = off).
    pub max_age: Duration,
    /// How often images are checked (upstream's fixed 5 minutes; `--image-gc-period`).
    pub period: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            high_percent: 85,
            low_percent: 80,
            min_age: Duration::from_secs(120),
            max_age: Duration::ZERO,
            period: Duration::from_secs(300),
        }
    }
}

/// An image as the runtime lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub id: String,
    pub size: u64,
    pub pinned: bool,
}

#[derive(Clone, Copy, Debug)]
struct Record {
    first_detected: Instant,
    last_used: Instant,
}

/// When each image was first seen and last seen in use (in memory, as upstream: after a
/// restart every image counts as just detected, so none is collected before `min_age`).
#[derive(Debug, Default)]
pub struct Records {
    by_id: HashMap<String, Record>,
}

impl Records {
    /// Records what the runtime has at `now`; forgets images that are gone.
    pub fn detect(&mut self, images: &[Image], in_use: &HashSet<String>, now: Instant) {
        let present: HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
        self.by_id.retain(|id, _| present.contains(id.as_str()));
        for i in images {
            let r = self.by_id.entry(i.id.clone()).or_insert(Record {
                first_detected: now,
                last_used: now,
            });
            if in_use.contains(&i.id) {
                r.last_used = now;
            }
        }
    }
}

/// The image filesystem's size and free space, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FsUsage {
    pub capacity: u64,
    pub available: u64,
}

/// Bytes to free so that usage drops to the low threshold, if usage has reached the high one.
pub fn bytes_to_free(fs: FsUsage, policy: &Policy) -> u64 {
    if fs.capacity == 0 || policy.high_percent >= 100 {
        return 0;
    }
    let used_percent = 100 - (u128::from(fs.available) * 100 / u128::from(fs.capacity)) as u64;
    if used_percent < u64::from(policy.high_percent) {
        return 0;
    }
    let target_available =
        u128::from(fs.capacity) * u128::from(100 - policy.low_percent.min(100)) / 100;
    (target_available.saturating_sub(u128::from(fs.available))) as u64
}

/// The images to remove, in order: those past `max_age`, then, while `to_free` bytes are not
/// yet freed, the least recently used of the others. Only unused, unpinned images first seen
/// at least `min_age` ago, and not used at `now`, are candidates.
pub fn plan(
    records: &Records,
    images: &[Image],
    in_use: &HashSet<String>,
    to_free: u64,
    policy: &Policy,
    now: Instant,
) -> Vec<String> {
    let mut candidates: Vec<(&Image, Record)> = images
        .iter()
        .filter(|i| !i.pinned && !in_use.contains(&i.id))
        .filter_map(|i| Some((i, *records.by_id.get(&i.id)?)))
        .filter(|(_, r)| now.saturating_duration_since(r.first_detected) >= policy.min_age)
        .filter(|(_, r)| r.last_used < now)
        .collect();
    candidates.sort_by_key(|(i, r)| (r.last_used, r.first_detected, i.id.clone()));
    let mut out = Vec::new();
    let mut freed = 0u64;
    for (i, r) in candidates {
        let too_old = !policy.max_age.is_zero()
            && now.saturating_duration_since(r.last_used) > policy.max_age;
        if too_old || freed < to_free {
            freed = freed.saturating_add(i.size);
            out.push(i.id.clone());
        }
    }
    out
}

/// The image IDs containers use: by ID (`imageRef`) or by the name they were created with.
pub fn images_in_use(containers: &[cri::Container], images: &[cri::Image]) -> HashSet<String> {
    let mut used = HashSet::new();
    for c in containers {
        let name = c.image.as_ref().map(|s| s.image.as_str()).unwrap_or("");
        for i in images {
            let matches = i.id == c.image_ref
                || i.id == name
                || i.repo_tags.iter().any(|t| t == name)
                || i.repo_digests
                    .iter()
                    .any(|d| d == name || *d == c.image_ref);
            if matches {
                used.insert(i.id.clone());
            }
        }
    }
    used
}

/// Free space of the filesystem holding `path`.
fn fs_usage(path: &str) -> Option<FsUsage> {
    let st = rustix::fs::statvfs(path).ok()?;
    let size = st.f_frsize.max(1);
    Some(FsUsage {
        capacity: st.f_blocks.saturating_mul(size),
        available: st.f_bavail.saturating_mul(size),
    })
}

/// Collects images every `policy.period` until the process ends.
pub async fn run(runtime: crate::runtime::Runtime, policy: Policy) {
    let mut records = Records::default();
    let mut tick = tokio::time::interval(policy.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = collect(&runtime, &policy, &mut records).await {
            tracing::warn!(error = %e, "image garbage collection failed");
        }
    }
}

/// The runtime's images, and which of them containers use.
async fn listing(
    runtime: &crate::runtime::Runtime,
) -> Result<(Vec<Image>, HashSet<String>), crate::runtime::RuntimeError> {
    let mut images_client = runtime.image_client();
    let listed = runtime
        .call(
            "ListImages",
            images_client.list_images(cri::ListImagesRequest { filter: None }),
        )
        .await?
        .images;
    let mut rt = runtime.runtime_client();
    let containers = runtime
        .call(
            "ListContainers",
            rt.list_containers(cri::ListContainersRequest { filter: None }),
        )
        .await?
        .containers;
    let in_use = images_in_use(&containers, &listed);
    let images = listed
        .iter()
        .map(|i| Image {
            id: i.id.clone(),
            size: i.size,
            pinned: i.pinned,
        })
        .collect();
    Ok((images, in_use))
}

async fn remove(runtime: &crate::runtime::Runtime, ids: Vec<String>) -> usize {
    let mut images_client = runtime.image_client();
    let mut removed = 0;
    for id in ids {
        let request = cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: id.clone(),
                ..Default::default()
            }),
        };
        match runtime
            .call("RemoveImage", images_client.remove_image(request))
            .await
        {
            Ok(_) => {
                removed += 1;
                tracing::info!(image = %id, "removed unused image");
            }
            Err(e) => tracing::warn!(image = %id, error = %e, "remove unused image"),
        }
    }
    removed
}

/// Removes every image no container uses and nobody pinned (the eviction manager's
/// node-level reclaim under disk pressure, upstream's `DeleteUnusedImages`); returns how
/// many went.
pub async fn remove_all_unused(
    runtime: &crate::runtime::Runtime,
) -> Result<usize, crate::runtime::RuntimeError> {
    let (images, in_use) = listing(runtime).await?;
    let ids = images
        .into_iter()
        .filter(|i| !i.pinned && !in_use.contains(&i.id))
        .map(|i| i.id)
        .collect();
    Ok(remove(runtime, ids).await)
}

async fn collect(
    runtime: &crate::runtime::Runtime,
    policy: &Policy,
    records: &mut Records,
) -> Result<(), crate::runtime::RuntimeError> {
    let (images, in_use) = listing(runtime).await?;
    let now = Instant::now();
    records.detect(&images, &in_use, now);
    let mut images_client = runtime.image_client();
    let fs = runtime
        .call(
            "ImageFsInfo",
            images_client.image_fs_info(cri::ImageFsInfoRequest {}),
        )
        .await?
        .image_filesystems
        .into_iter()
        .find_map(|f| f.fs_id.map(|id| id.mountpoint))
        .and_then(|mountpoint| fs_usage(&mountpoint));
    let to_free = fs.map_or(0, |fs| bytes_to_free(fs, policy));
    let ids = plan(records, &images, &in_use, to_free, policy, now);
    if to_free > 0 {
        tracing::info!(
            to_free,
            images = ids.len(),
            "image filesystem over its high threshold"
        );
    }
    remove(runtime, ids).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, size: u64) -> Image {
        Image {
            id: id.into(),
            size,
            pinned: false,
        }
    }

    #[test]
    fn usage_past_the_high_threshold_frees_down_to_the_low_one() {
        let p = Policy::default();
        // 90% used of 1000: free until 20% (200) is available again.
        let fs = FsUsage {
            capacity: 1000,
            available: 100,
        };
        assert_eq!(bytes_to_free(fs, &p), 100);
        let fs = FsUsage {
            capacity: 1000,
            available: 150,
        };
        assert_eq!(bytes_to_free(fs, &p), 50, "exactly the high threshold");
        let fs = FsUsage {
            capacity: 1000,
            available: 160,
        };
        assert_eq!(bytes_to_free(fs, &p), 0, "84% used stays");
        let fs = FsUsage {
            capacity: 1000,
            available: 500,
        };
        assert_eq!(bytes_to_free(fs, &p), 0);
        let off = Policy {
            high_percent: 100,
            ..p
        };
        let fs = FsUsage {
            capacity: 1000,
            available: 0,
        };
        assert_eq!(bytes_to_free(fs, &off), 0, "100% disables collection");
        assert_eq!(
            bytes_to_free(
                FsUsage {
                    capacity: 0,
                    available: 0
                },
                &p
            ),
            0
        );
    }

    #[test]
    fn least_recently_used_unused_old_enough_images_go_first_and_only_as_many_as_needed() {
        let p = Policy {
            min_age: Duration::from_secs(60),
            ..Policy::default()
        };
        let t0 = Instant::now();
        let images = vec![
            img("a", 100),
            img("b", 100),
            img("used", 100),
            Image {
                pinned: true,
                ..img("pause", 100)
            },
            img("young", 100),
        ];
        let mut r = Records::default();
        let used: HashSet<String> = ["used".to_string()].into();
        // a, b, used and pause are seen at t0; b is in use at t0 + 100 s, then no longer.
        r.detect(&images[..4], &used, t0);
        let b_used: HashSet<String> = ["b".to_string(), "used".to_string()].into();
        r.detect(&images[..4], &b_used, t0 + Duration::from_secs(100));
        r.detect(&images, &used, t0 + Duration::from_secs(150));
        let now = t0 + Duration::from_secs(200);
        // Enough for one image: the least recently used (a), never used/pinned/young.
        assert_eq!(plan(&r, &images, &used, 50, &p, now), vec!["a"]);
        assert_eq!(plan(&r, &images, &used, 150, &p, now), vec!["a", "b"]);
        assert_eq!(plan(&r, &images, &used, 10_000, &p, now), vec!["a", "b"]);
        assert!(plan(&r, &images, &used, 0, &p, now).is_empty());
        // Past imageMaximumGCAge an unused image goes without pressure.
        let aged = Policy {
            max_age: Duration::from_secs(150),
            ..p
        };
        assert_eq!(plan(&r, &images, &used, 0, &aged, now), vec!["a"]);
        // A vanished image is forgotten.
        r.detect(&images[1..], &used, now);
        assert!(!plan(&r, &images, &used, 10_000, &p, now).contains(&"a".to_string()));
    }

    #[test]
    fn images_are_in_use_by_id_tag_or_digest_of_any_container() {
        let image = |id: &str, tag: &str, digest: &str| cri::Image {
            id: id.into(),
            repo_tags: vec![tag.into()],
            repo_digests: vec![digest.into()],
            ..Default::default()
        };
        let images = vec![
            image("sha256:1", "r/a:1", "r/a@sha256:d1"),
            image("sha256:2", "r/b:1", "r/b@sha256:d2"),
            image("sha256:3", "r/c:1", "r/c@sha256:d3"),
            image("sha256:4", "r/d:1", "r/d@sha256:d4"),
        ];
        let ctr = |image: &str, image_ref: &str| cri::Container {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            image_ref: image_ref.into(),
            ..Default::default()
        };
        let used = images_in_use(
            &[
                ctr("whatever", "sha256:1"),
                ctr("r/b:1", ""),
                ctr("r/c@sha256:d3", ""),
            ],
            &images,
        );
        let mut used: Vec<String> = used.into_iter().collect();
        used.sort();
        assert_eq!(used, ["sha256:1", "sha256:2", "sha256:3"]);
    }
}
