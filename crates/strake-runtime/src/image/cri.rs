//! Conversions between the image subsystem's types and the CRI `runtime.v1` messages.

use strake_types::cri;

use super::{ImageFsInfo, ImageRecord, PullAuth};

impl From<&cri::AuthConfig> for PullAuth {
    /// `server_address` is the kubelet's business (it picks credentials per registry);
    /// `identity_token` (a Docker refresh token) is not supported by the registry client.
    fn from(a: &cri::AuthConfig) -> Self {
        PullAuth {
            username: a.username.clone(),
            password: a.password.clone(),
            auth: a.auth.clone(),
            registry_token: a.registry_token.clone(),
        }
    }
}

/// The CRI `Image` for a record, as ListImages and ImageStatus return it.
pub fn to_cri_image(r: &ImageRecord) -> cri::Image {
    cri::Image {
        id: r.id.clone(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        uid: r.uid.map(|value| cri::Int64Value { value }),
        username: r.username.clone(),
        spec: Some(cri::ImageSpec {
            image: r.id.clone(),
            ..Default::default()
        }),
        pinned: r.pinned,
    }
}

/// The CRI `FilesystemUsage` of the image store, for ImageFsInfo.
pub fn to_cri_usage(info: &ImageFsInfo) -> cri::FilesystemUsage {
    cri::FilesystemUsage {
        timestamp: info.timestamp_nanos,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: info.mountpoint.display().to_string(),
        }),
        used_bytes: Some(cri::UInt64Value {
            value: info.used_bytes,
        }),
        inodes_used: Some(cri::UInt64Value {
            value: info.inodes_used,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_auth_convert() {
        let record = ImageRecord {
            id: "sha256:ab".into(),
            repo_tags: vec!["docker.io/library/busybox:latest".into()],
            repo_digests: vec!["docker.io/library/busybox@sha256:cd".into()],
            size: 42,
            manifest_digest: "sha256:cd".into(),
            layers: vec![],
            blobs: vec![],
            pinned: true,
            username: String::new(),
            uid: Some(0),
        };
        let image = to_cri_image(&record);
        assert_eq!(image.id, "sha256:ab");
        assert_eq!(image.uid, Some(cri::Int64Value { value: 0 }));
        assert_eq!(image.spec.map(|s| s.image), Some("sha256:ab".to_string()));
        assert!(image.pinned);
        let auth = PullAuth::from(&cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        });
        assert_eq!(auth, PullAuth::basic("u", "p"));
    }
}
