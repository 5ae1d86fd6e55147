//! What a registry says about an image, read as untrusted input: manifests and indexes, the
//! image config, and the layer list they agree on. Pure functions of bytes (no I/O), so that
//! the fuzzer (`fuzz/fuzz_targets/image_metadata.rs`) reaches exactly what a pull runs.

use serde::Deserialize;

use super::reference::Digest;
use super::store::LayerRecord;
use super::unpack::chain_ids;

/// Media types of manifests and indexes we accept, most specific first.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What a pull asks a registry for.
pub const ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
/// Manifests and configs are small; anything bigger is not one.
pub const MAX_METADATA_BYTES: usize = 4 << 20;

/// A content descriptor (a manifest's config and layers, an index's manifests).
#[derive(Debug, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The platform of an index entry.
#[derive(Debug, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image manifest or an index (`manifests` set), OCI or Docker schema 2.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

/// The parts of an image config a pull reads.
#[derive(Debug, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    pub rootfs: RootFs,
}

/// The config's process defaults a pull records.
#[derive(Debug, Deserialize)]
pub struct ContainerConfig {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// The layers' uncompressed digests.
#[derive(Debug, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Parses a manifest or index and checks its schema version and media type.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    if bytes.len() > MAX_METADATA_BYTES {
        return Err(format!("manifest of {} bytes", bytes.len()));
    }
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if m.schema_version != 2 {
        return Err(format!("schema version {}", m.schema_version));
    }
    match m.media_type.as_deref() {
        None | Some(OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST) => Ok(m),
        Some(other) => Err(format!("media type {other}")),
    }
}

/// Picks `linux/<arch>` from an index, preferring an exact variant, then one without a variant.
pub fn select_platform<'a>(
    entries: &'a [Descriptor],
    arch: &str,
    variant: Option<&str>,
) -> Option<&'a Descriptor> {
    let matching = || {
        entries.iter().filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
    };
    let variant_of = |d: &Descriptor| d.platform.as_ref().and_then(|p| p.variant.clone());
    matching()
        .find(|d| variant.is_some() && variant_of(d).as_deref() == variant)
        .or_else(|| matching().find(|d| variant_of(d).is_none()))
        .or_else(|| matching().next())
}

/// The config descriptor of an image manifest: present, a valid digest, a plausible size.
pub fn config_of(manifest: &Manifest) -> Result<(&Descriptor, Digest), String> {
    let desc = manifest.config.as_ref().ok_or("no config")?;
    let digest =
        Digest::parse(&desc.digest).ok_or_else(|| format!("config digest {:?}", desc.digest))?;
    if desc.size > MAX_METADATA_BYTES as u64 {
        return Err(format!("config of {} bytes", desc.size));
    }
    Ok((desc, digest))
}

/// Parses an image config.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("config: {e}"))
}

/// The image's layers as the manifest lists them, each with the diffID the config gives it
/// and its chain ID; the two lists must agree in length and every digest must be valid.
pub fn layer_records(
    manifest: &Manifest,
    config: &ImageConfig,
) -> Result<Vec<(Digest, LayerRecord)>, String> {
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(format!(
            "{} layers but {} diffIDs",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        ));
    }
    let diff_ids = config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d).ok_or_else(|| format!("diffID {d:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let chains = chain_ids(&diff_ids);
    manifest
        .layers
        .iter()
        .zip(&diff_ids)
        .zip(&chains)
        .map(|((desc, diff_id), chain_id)| {
            let digest = Digest::parse(&desc.digest)
                .ok_or_else(|| format!("layer digest {:?}", desc.digest))?;
            let record = LayerRecord {
                digest: digest.to_string(),
                media_type: desc.media_type.clone(),
                size: desc.size,
                diff_id: diff_id.to_string(),
                chain_id: chain_id.to_string(),
            };
            Ok((digest, record))
        })
        .collect()
}

/// Splits a config `User` (`uid[:gid]` or `name[:group]`) into CRI's `uid` / `username`.
pub fn user_of(user: &str) -> (Option<i64>, String) {
    let name = user.split(':').next().unwrap_or("");
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str, variant: Option<&str>, digest: &str) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: digest.into(),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
        }
    }

    #[test]
    fn platform_selection_prefers_exact_variant_then_none() {
        let entries = vec![
            desc("arm64", None, "a"),
            desc("arm64", Some("v8"), "b"),
            desc("amd64", None, "c"),
            Descriptor {
                platform: Some(Platform {
                    architecture: "amd64".into(),
                    os: "windows".into(),
                    variant: None,
                }),
                ..desc("amd64", None, "w")
            },
        ];
        let pick = |a, v| select_platform(&entries, a, v).map(|d| d.digest.as_str());
        assert_eq!(pick("arm64", Some("v8")), Some("b"));
        assert_eq!(pick("arm64", Some("v9")), Some("a"));
        assert_eq!(pick("amd64", None), Some("c"));
        assert_eq!(pick("s390x", None), None);
    }

    #[test]
    fn config_user_to_cri_uid_and_username() {
        assert_eq!(user_of(""), (None, String::new()));
        assert_eq!(user_of("1000"), (Some(1000), String::new()));
        assert_eq!(user_of("65534:65534"), (Some(65534), String::new()));
        assert_eq!(user_of("nobody:nogroup"), (None, "nobody".to_string()));
    }

    #[test]
    fn manifests_of_other_schemas_and_layer_lists_that_disagree_are_refused() {
        assert!(parse_manifest(br#"{"schemaVersion":1}"#).is_err());
        assert!(
            parse_manifest(br#"{"schemaVersion":2,"mediaType":"text/html"}"#)
                .unwrap_err()
                .contains("media type")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let m = parse_manifest(
            format!(
                r#"{{"schemaVersion":2,"config":{{"digest":"{d}","size":2}},"layers":[{{"digest":"{d}","size":1}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(config_of(&m).is_ok());
        let none = parse_config(br#"{"rootfs":{"diff_ids":[]}}"#).unwrap();
        assert!(
            layer_records(&m, &none)
                .unwrap_err()
                .contains("1 layers but 0")
        );
        let bad = parse_config(br#"{"rootfs":{"diff_ids":["md5:x"]}}"#).unwrap();
        assert!(layer_records(&m, &bad).unwrap_err().contains("diffID"));
        let good =
            parse_config(format!(r#"{{"rootfs":{{"diff_ids":["{d}"]}}}}"#).as_bytes()).unwrap();
        let layers = layer_records(&m, &good).unwrap();
        assert_eq!(layers[0].1.chain_id, d);
    }
}
