//! `clusterTrustBundle` projected volume sources: the trust anchors of one ClusterTrustBundle
//! by name, or of every bundle of a signer that a label selector picks, merged.
//!
//! As upstream: a missing bundle (or a signer and selector that pick none) fails the volume
//! unless the source is `optional`, when the file is written empty; a selector that is absent
//! picks nothing and an empty one picks everything; the anchors of all picked bundles are
//! de-duplicated and written as `CERTIFICATE` PEM blocks. Upstream shuffles their order once
//! per kubelet start; here they are sorted (by DER bytes), which is as stable and does not
//! change across restarts.

use std::collections::BTreeSet;

use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::ClusterTrustBundleProjection;
use kube::api::{Api, ListParams};

/// What went wrong fetching a projection's anchors; the volume's error wraps it.
#[derive(Debug, thiserror::Error)]
pub enum TrustBundleError {
    #[error("ClusterTrustBundle {0:?} not found")]
    NotFound(String),
    #[error("signer {signer:?} and the label selector picked no ClusterTrustBundle")]
    NoneSelected { signer: String },
    #[error("a clusterTrustBundle source needs name or signerName")]
    NoName,
    #[error("invalid label selector: {0}")]
    Selector(String),
    #[error("ClusterTrustBundle request failed")]
    Api(#[source] kube::Error),
    #[error("ClusterTrustBundle {name:?} holds invalid PEM")]
    Pem {
        name: String,
        #[source]
        source: pem::PemError,
    },
}

/// The de-duplicated anchors of `bundles` (`(name, trustBundle)`), sorted, as PEM.
pub fn normalize<'a>(
    bundles: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<u8>, TrustBundleError> {
    let mut anchors = BTreeSet::new();
    for (name, text) in bundles {
        let blocks = pem::parse_many(text).map_err(|source| TrustBundleError::Pem {
            name: name.to_string(),
            source,
        })?;
        anchors.extend(blocks.into_iter().map(pem::Pem::into_contents));
    }
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    Ok(anchors
        .into_iter()
        .map(|der| pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config))
        .collect::<String>()
        .into_bytes())
}

/// The file content of one `clusterTrustBundle` source.
pub async fn anchors(
    client: kube::Client,
    source: &ClusterTrustBundleProjection,
) -> Result<Vec<u8>, TrustBundleError> {
    let optional = source.optional.unwrap_or(false);
    let api: Api<ClusterTrustBundle> = Api::all(client);
    if let Some(name) = &source.name {
        return match api.get_opt(name).await.map_err(TrustBundleError::Api)? {
            Some(b) => normalize([(name.as_str(), b.spec.trust_bundle.as_str())]),
            None if optional => Ok(Vec::new()),
            None => Err(TrustBundleError::NotFound(name.clone())),
        };
    }
    let signer = source
        .signer_name
        .as_ref()
        .ok_or(TrustBundleError::NoName)?;
    let picked: Vec<ClusterTrustBundle> = match &source.label_selector {
        // No selector picks nothing.
        None => Vec::new(),
        Some(selector) => {
            let selector = kube::core::Selector::try_from(selector.clone())
                .map_err(|e| TrustBundleError::Selector(e.to_string()))?;
            api.list(&ListParams::default().labels_from(&selector))
                .await
                .map_err(TrustBundleError::Api)?
                .items
                .into_iter()
                .filter(|b| b.spec.signer_name.as_deref() == Some(signer.as_str()))
                .collect()
        }
    };
    if picked.is_empty() {
        return if optional {
            Ok(Vec::new())
        } else {
            Err(TrustBundleError::NoneSelected {
                signer: signer.clone(),
            })
        };
    }
    normalize(picked.iter().map(|b| {
        (
            b.metadata.name.as_deref().unwrap_or_default(),
            b.spec.trust_bundle.as_str(),
        )
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn block(tag: &str, der: &[u8]) -> String {
        pem::encode_config(
            &pem::Pem::new(tag, der.to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    #[test]
    fn anchors_are_merged_deduplicated_sorted_and_retagged() {
        let a = block("CERTIFICATE", b"\x30\x02aa");
        let b = block("CERTIFICATE", b"\x30\x01b");
        let b_other_tag = block("TRUSTED CERTIFICATE", b"\x30\x01b");
        let first = format!("{a}{b}");
        let second = format!("{b_other_tag}{a}");
        let out = normalize([("one", first.as_str()), ("two", second.as_str())]).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out, format!("{b}{a}"));
        // The same anchors in another order give the same file.
        let again = normalize([("two", second.as_str()), ("one", first.as_str())]).unwrap();
        assert_eq!(String::from_utf8(again).unwrap(), out);
        assert!(normalize([]).unwrap().is_empty());
    }

    #[test]
    fn invalid_pem_names_the_bundle() {
        let broken = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        let e = normalize([("bad", broken)]).unwrap_err();
        assert!(e.to_string().contains("\"bad\""), "{e}");
    }
}
