//! `podCertificate` projected volume sources: a private key made on the node, a
//! PodCertificateRequest for it, and the certificate chain the signer issues, refreshed from
//! the request's `beginRefreshAt` on.
//!
//! Each source of each pod (pod UID, volume, source index) walks upstream's states: no request
//! yet → waiting for the first issuance → fresh → (after `beginRefreshAt`) waiting for a refresh
//! while the current credentials stay served → fresh again; a Denied or Failed request is
//! final for that source. The volume is prepared again every few seconds by the pod worker, and
//! each call moves the state machine on: [`PodCertificates::credentials`] creates requests and
//! reads them back (one GET by name; upstream watches them through an informer). Until the
//! first issuance the volume fails with the reason, so the pod waits in ContainerCreating with
//! a FailedMount event, as upstream's.
//!
//! The key type is what the projection asks for (RSA 3072/4096, ECDSA P-256/384/521, Ed25519),
//! generated with rcgen over aws-lc-rs and written as PKCS#8 PEM; the request carries a stub
//! PKCS#10 CSR the key signed, as upstream's kubelet sends. The decisions are the pure
//! [`advance`] and [`State::credentials`], unit-tested with an injected clock.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, PodCertificateProjection, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};

/// A request that has not appeared for this long after we created it is taken as deleted and
/// made again (upstream: 10 minutes, plus jitter).
pub const ASSUME_DELETED_AFTER: Duration = Duration::from_secs(10 * 60);
/// Refreshes and abandonment are spread over this much, so that many pods do not ask at once.
pub const JITTER: Duration = Duration::from_secs(5 * 60);
/// Upstream's default of the projection's `maxExpirationSeconds` (the API server defaults it).
pub const DEFAULT_MAX_EXPIRATION_SECONDS: i32 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum PodCertError {
    #[error("unknown key type {0:?}")]
    KeyType(String),
    #[error("generating a {key_type} key")]
    Generate {
        key_type: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("key generation did not finish")]
    Task(#[source] tokio::task::JoinError),
    #[error("PodCertificateRequest {0} is not issued yet")]
    Pending(String),
    #[error("PodCertificateRequest {name} was denied, reason={reason:?}, message={message:?}")]
    Denied {
        name: String,
        reason: String,
        message: String,
    },
    #[error("PodCertificateRequest {name} failed, reason={reason:?}, message={message:?}")]
    Failed {
        name: String,
        reason: String,
        message: String,
    },
    #[error("PodCertificateRequest {0} appears to have been deleted; a new one will be made")]
    Deleted(String),
    #[error("{what}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// A private key (PKCS#8 PEM) and the stub CSR it signed (DER).
pub fn generate(key_type: &str) -> Result<(Vec<u8>, Vec<u8>), PodCertError> {
    let err = |source| PodCertError::Generate {
        key_type: key_type.to_string(),
        source,
    };
    let key = match key_type {
        "RSA3072" => {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072)
        }
        "RSA4096" => {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096)
        }
        "ECDSAP256" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        "ECDSAP384" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        "ECDSAP521" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512),
        "ED25519" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519),
        other => return Err(PodCertError::KeyType(other.to_string())),
    }
    .map_err(err)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(err)?;
    Ok((key.serialize_pem().into_bytes(), csr.der().to_vec()))
}

/// Only the chain's PEM blocks, each re-tagged `CERTIFICATE`: whatever the signer put between
/// or in the blocks' headers does not reach the pod.
pub fn clean_chain(chain: &str) -> Vec<u8> {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::parse_many(chain)
        .unwrap_or_default()
        .into_iter()
        .map(|p| pem::encode_config(&pem::Pem::new("CERTIFICATE", p.into_contents()), config))
        .collect::<String>()
        .into_bytes()
}

/// Issued credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub key: Vec<u8>,
    pub chain: Vec<u8>,
    pub begin_refresh_at: SystemTime,
    pub not_after: SystemTime,
}

/// A request we made and wait on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asked {
    pub name: String,
    /// The key it is for.
    pub key: Vec<u8>,
    /// When a request still not found is taken as deleted.
    pub abandon_at: SystemTime,
}

/// Where one projection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// The first request is out.
    Waiting(Asked),
    Fresh(Issued),
    /// A refresh request is out; the current credentials are still served.
    Refreshing {
        current: Issued,
        asked: Asked,
    },
    Denied {
        name: String,
        reason: String,
        message: String,
    },
    Failed {
        name: String,
        reason: String,
        message: String,
    },
}

/// What reading a request back found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    NotFound,
    Pending,
    Issued(Issued),
    Denied { reason: String, message: String },
    Failed { reason: String, message: String },
}

impl Lookup {
    /// The outcome of a request as its conditions tell it (the first terminal one counts).
    pub fn of(pcr: &PodCertificateRequest, key: &[u8], jitter: Duration) -> Lookup {
        let status = pcr.status.clone().unwrap_or_default();
        for c in status.conditions.iter().flatten() {
            match c.type_.as_str() {
                "Denied" => {
                    return Lookup::Denied {
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                    };
                }
                "Failed" => {
                    return Lookup::Failed {
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                    };
                }
                "Issued" => {
                    let at = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
                        t.map_or(SystemTime::UNIX_EPOCH, |t| SystemTime::from(t.0))
                    };
                    return Lookup::Issued(Issued {
                        key: key.to_vec(),
                        chain: clean_chain(status.certificate_chain.as_deref().unwrap_or("")),
                        begin_refresh_at: at(status.begin_refresh_at.as_ref()) + jitter,
                        not_after: at(status.not_after.as_ref()),
                    });
                }
                _ => {}
            }
        }
        Lookup::Pending
    }
}

/// What to do next for one projection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Make a request (the first, or a refresh when the state has credentials).
    Ask,
    /// Read the named request back.
    Look(String),
    /// Nothing to ask: serve what the state has.
    Serve,
}

/// What the state needs next at `now`.
pub fn step(state: Option<&State>, now: SystemTime) -> Step {
    match state {
        None => Step::Ask,
        Some(State::Waiting(a)) | Some(State::Refreshing { asked: a, .. }) => {
            Step::Look(a.name.clone())
        }
        Some(State::Fresh(i)) if now >= i.begin_refresh_at => Step::Ask,
        Some(_) => Step::Serve,
    }
}

/// The state after a request was made for it.
pub fn asked(state: Option<State>, asked: Asked) -> State {
    match state {
        Some(State::Fresh(current)) => State::Refreshing { current, asked },
        _ => State::Waiting(asked),
    }
}

/// The state after reading its request back at `now`; `None` means start over (the first
/// request vanished).
pub fn advance(state: State, lookup: Lookup, now: SystemTime) -> Option<State> {
    let (current, asked) = match state {
        State::Waiting(a) => (None, a),
        State::Refreshing { current, asked } => (Some(current), asked),
        other => return Some(other),
    };
    let name = asked.name.clone();
    Some(match lookup {
        Lookup::Issued(issued) => State::Fresh(issued),
        Lookup::Denied { reason, message } => State::Denied {
            name,
            reason,
            message,
        },
        Lookup::Failed { reason, message } => State::Failed {
            name,
            reason,
            message,
        },
        Lookup::NotFound if now >= asked.abandon_at => match current {
            // The refresh request vanished: keep serving, ask again on the next call.
            Some(current) => State::Fresh(current),
            None => return None,
        },
        Lookup::NotFound | Lookup::Pending => match current {
            Some(current) => State::Refreshing { current, asked },
            None => State::Waiting(asked),
        },
    })
}

impl State {
    /// The key and chain to write, or why there are none.
    pub fn credentials(&self) -> Result<(Vec<u8>, Vec<u8>), PodCertError> {
        match self {
            State::Fresh(i) | State::Refreshing { current: i, .. } => {
                Ok((i.key.clone(), i.chain.clone()))
            }
            State::Waiting(a) => Err(PodCertError::Pending(a.name.clone())),
            State::Denied {
                name,
                reason,
                message,
            } => Err(PodCertError::Denied {
                name: name.clone(),
                reason: reason.clone(),
                message: message.clone(),
            }),
            State::Failed {
                name,
                reason,
                message,
            } => Err(PodCertError::Failed {
                name: name.clone(),
                reason: reason.clone(),
                message: message.clone(),
            }),
        }
    }
}

/// Identifies one `podCertificate` source of one pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub pod_uid: String,
    pub volume: String,
    pub index: usize,
}

/// A random duration below [`JITTER`].
fn jitter() -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_nanos(r % JITTER.as_nanos() as u64)
}

/// The projections of this node's pods.
pub struct PodCertificates {
    client: kube::Client,
    node_name: String,
    states: Mutex<HashMap<SourceKey, State>>,
}

impl std::fmt::Debug for PodCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCertificates")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl PodCertificates {
    pub fn new(client: kube::Client, node_name: String) -> Self {
        PodCertificates {
            client,
            node_name,
            states: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SourceKey, State>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key and chain of source `index` of `volume` of `pod`, moving its state on.
    pub async fn credentials(
        &self,
        pod: &Pod,
        volume: &str,
        index: usize,
        source: &PodCertificateProjection,
    ) -> Result<(Vec<u8>, Vec<u8>), PodCertError> {
        let key = SourceKey {
            pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
            volume: volume.to_string(),
            index,
        };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let now = SystemTime::now();
        let state = self.lock().get(&key).cloned();
        match step(state.as_ref(), now) {
            Step::Serve => {}
            Step::Ask => {
                let asked_for = self.ask(pod, &ns, source).await?;
                let next = asked(state, asked_for);
                self.lock().insert(key.clone(), next);
            }
            Step::Look(name) => {
                let api: Api<PodCertificateRequest> = Api::namespaced(self.client.clone(), &ns);
                let pcr = api
                    .get_opt(&name)
                    .await
                    .map_err(|source| PodCertError::Api {
                        what: format!("get PodCertificateRequest {ns}/{name}"),
                        source,
                    })?;
                let Some(state) = state else {
                    return Err(PodCertError::Pending(name));
                };
                let pending_key = match &state {
                    State::Waiting(a) | State::Refreshing { asked: a, .. } => a.key.clone(),
                    _ => Vec::new(),
                };
                let lookup =
                    pcr.map_or(Lookup::NotFound, |p| Lookup::of(&p, &pending_key, jitter()));
                match advance(state, lookup, now) {
                    Some(next) => {
                        self.lock().insert(key.clone(), next);
                    }
                    None => {
                        self.lock().remove(&key);
                        return Err(PodCertError::Deleted(format!("{ns}/{name}")));
                    }
                }
            }
        }
        let state = self.lock().get(&key).cloned();
        match state {
            Some(s) => s.credentials(),
            None => Err(PodCertError::Pending(String::new())),
        }
    }

    /// Makes a key and a request for it, owned by the pod.
    async fn ask(
        &self,
        pod: &Pod,
        ns: &str,
        source: &PodCertificateProjection,
    ) -> Result<Asked, PodCertError> {
        let api_err = |what: String| move |source| PodCertError::Api { what, source };
        let sa_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let sa = Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .get(&sa_name)
            .await
            .map_err(api_err(format!("get ServiceAccount {ns}/{sa_name}")))?;
        let node = Api::<Node>::all(self.client.clone())
            .get(&self.node_name)
            .await
            .map_err(api_err(format!("get Node {}", self.node_name)))?;
        let key_type = source.key_type.clone();
        let (key, csr) = tokio::task::spawn_blocking(move || generate(&key_type))
            .await
            .map_err(PodCertError::Task)??;
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
        let request = PodCertificateRequest {
            metadata: ObjectMeta {
                generate_name: Some("req-".into()),
                namespace: Some(ns.to_string()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: pod_name.clone(),
                    uid: pod_uid.clone(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            spec: PodCertificateRequestSpec {
                signer_name: source.signer_name.clone(),
                pod_name,
                pod_uid,
                service_account_name: sa_name,
                service_account_uid: sa.metadata.uid.unwrap_or_default(),
                node_name: self.node_name.clone(),
                node_uid: node.metadata.uid.unwrap_or_default(),
                max_expiration_seconds: Some(
                    source
                        .max_expiration_seconds
                        .unwrap_or(DEFAULT_MAX_EXPIRATION_SECONDS),
                ),
                stub_pkc_s10_request: k8s_openapi::ByteString(csr),
                unverified_user_annotations: source.user_annotations.clone(),
            },
            status: None,
        };
        let made = Api::<PodCertificateRequest>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &request)
            .await
            .map_err(api_err(format!(
                "create PodCertificateRequest for signer {}",
                source.signer_name
            )))?;
        Ok(Asked {
            name: made.metadata.name.unwrap_or_default(),
            key,
            abandon_at: SystemTime::now() + ASSUME_DELETED_AFTER + jitter(),
        })
    }

    /// Forgets the projections of a pod that is gone.
    pub fn forget(&self, pod_uid: &str) {
        self.lock().retain(|k, _| k.pod_uid != pod_uid);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn issued(key: &str, refresh: u64) -> Issued {
        Issued {
            key: key.as_bytes().to_vec(),
            chain: b"chain".to_vec(),
            begin_refresh_at: t(refresh),
            not_after: t(refresh + 3600),
        }
    }

    fn asked_for(name: &str, key: &str, abandon: u64) -> Asked {
        Asked {
            name: name.into(),
            key: key.as_bytes().to_vec(),
            abandon_at: t(abandon),
        }
    }

    #[test]
    fn first_issuance_then_refresh_keeps_serving_the_current_credentials() {
        // Nothing yet: ask.
        assert_eq!(step(None, t(0)), Step::Ask);
        let s = asked(None, asked_for("req-1", "k1", 600));
        assert_eq!(step(Some(&s), t(1)), Step::Look("req-1".into()));
        assert!(matches!(s.credentials(), Err(PodCertError::Pending(n)) if n == "req-1"));
        // Pending, then not yet visible (informer lag upstream, a race here): keep waiting.
        let s = advance(s, Lookup::Pending, t(2)).unwrap();
        let s = advance(s, Lookup::NotFound, t(3)).unwrap();
        assert_eq!(s, State::Waiting(asked_for("req-1", "k1", 600)));
        // Issued: fresh, served.
        let s = advance(s, Lookup::Issued(issued("k1", 1000)), t(4)).unwrap();
        assert_eq!(
            s.credentials().unwrap(),
            (b"k1".to_vec(), b"chain".to_vec())
        );
        assert_eq!(step(Some(&s), t(999)), Step::Serve);
        // From beginRefreshAt on: a refresh request, the old credentials still served.
        assert_eq!(step(Some(&s), t(1000)), Step::Ask);
        let s = asked(Some(s), asked_for("req-2", "k2", 1600));
        assert_eq!(s.credentials().unwrap().0, b"k1".to_vec());
        assert_eq!(step(Some(&s), t(1001)), Step::Look("req-2".into()));
        let s = advance(s, Lookup::Pending, t(1002)).unwrap();
        assert_eq!(s.credentials().unwrap().0, b"k1".to_vec());
        // The refresh is issued: the new key and chain.
        let s = advance(s, Lookup::Issued(issued("k2", 5000)), t(1003)).unwrap();
        assert_eq!(s, State::Fresh(issued("k2", 5000)));
    }

    #[test]
    fn a_vanished_request_is_made_again_after_the_abandon_time() {
        let s = State::Waiting(asked_for("req-1", "k1", 600));
        assert!(advance(s.clone(), Lookup::NotFound, t(599)).is_some());
        assert_eq!(advance(s, Lookup::NotFound, t(600)), None);
        // A vanished refresh request: back to fresh, which asks again.
        let s = State::Refreshing {
            current: issued("k1", 100),
            asked: asked_for("req-2", "k2", 700),
        };
        let s = advance(s, Lookup::NotFound, t(700)).unwrap();
        assert_eq!(s, State::Fresh(issued("k1", 100)));
        assert_eq!(step(Some(&s), t(700)), Step::Ask);
    }

    #[test]
    fn denied_and_failed_are_final() {
        let s = State::Waiting(asked_for("req-1", "k1", 600));
        let denied = advance(
            s.clone(),
            Lookup::Denied {
                reason: "Nope".into(),
                message: "not you".into(),
            },
            t(1),
        )
        .unwrap();
        assert_eq!(step(Some(&denied), t(10_000)), Step::Serve);
        let e = denied.credentials().unwrap_err().to_string();
        assert!(
            e.contains("req-1") && e.contains("Nope") && e.contains("not you"),
            "{e}"
        );
        assert_eq!(advance(denied.clone(), Lookup::Pending, t(2)), Some(denied));
        let failed = advance(
            s,
            Lookup::Failed {
                reason: "Broken".into(),
                message: "signer down".into(),
            },
            t(1),
        )
        .unwrap();
        assert!(
            failed
                .credentials()
                .unwrap_err()
                .to_string()
                .contains("failed")
        );
        // A refresh that is denied ends the projection too, as upstream's.
        let s = State::Refreshing {
            current: issued("k1", 100),
            asked: asked_for("req-2", "k2", 700),
        };
        let s = advance(
            s,
            Lookup::Denied {
                reason: "R".into(),
                message: "M".into(),
            },
            t(200),
        )
        .unwrap();
        assert!(s.credentials().is_err());
    }

    #[test]
    fn conditions_and_times_of_a_request_are_read() {
        let pcr: PodCertificateRequest = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "req-1", "namespace": "default" },
            "spec": {
                "signerName": "example.com/s", "podName": "p", "podUID": "u",
                "serviceAccountName": "default", "serviceAccountUID": "s",
                "nodeName": "n", "nodeUID": "nu", "stubPKCS10Request": ""
            },
            "status": {
                "conditions": [{ "type": "Issued", "status": "True", "reason": "Ok", "message": "",
                                 "lastTransitionTime": "2026-01-01T00:00:00Z" }],
                "certificateChain": "junk\n-----BEGIN LEAF-----\nAQI=\n-----END LEAF-----\n",
                "notBefore": "2026-01-01T00:00:00Z",
                "beginRefreshAt": "2026-01-01T00:30:00Z",
                "notAfter": "2026-01-01T01:00:00Z"
            }
        }))
        .unwrap();
        let Lookup::Issued(i) = Lookup::of(&pcr, b"key", Duration::from_secs(7)) else {
            panic!("not issued")
        };
        assert_eq!(i.key, b"key");
        assert_eq!(
            String::from_utf8(i.chain).unwrap(),
            "-----BEGIN CERTIFICATE-----\nAQI=\n-----END CERTIFICATE-----\n"
        );
        let epoch = |s: &str| SystemTime::from(s.parse::<jiff::Timestamp>().unwrap());
        assert_eq!(
            i.begin_refresh_at,
            epoch("2026-01-01T00:30:00Z") + Duration::from_secs(7)
        );
        assert_eq!(i.not_after, epoch("2026-01-01T01:00:00Z"));
        let mut pending = pcr.clone();
        pending.status = None;
        assert_eq!(Lookup::of(&pending, b"k", Duration::ZERO), Lookup::Pending);
    }

    #[test]
    fn every_upstream_key_type_generates_a_key_and_a_csr() {
        use x509_parser::prelude::FromDer;
        for (key_type, alg) in [
            ("ECDSAP256", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("ECDSAP384", &rcgen::PKCS_ECDSA_P384_SHA384),
            ("ECDSAP521", &rcgen::PKCS_ECDSA_P521_SHA512),
            ("ED25519", &rcgen::PKCS_ED25519),
            ("RSA3072", &rcgen::PKCS_RSA_SHA256),
        ] {
            let (key, csr) = generate(key_type).unwrap();
            let key = String::from_utf8(key).unwrap();
            assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key_type}");
            let parsed = rcgen::KeyPair::from_pem_and_sign_algo(&key, alg).unwrap();
            // The CSR carries the key's public half.
            let (_, csr) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&csr)
                    .unwrap();
            assert_eq!(
                &*csr
                    .certification_request_info
                    .subject_pki
                    .subject_public_key
                    .data,
                rcgen::PublicKeyData::der_bytes(&parsed),
                "{key_type}"
            );
        }
        assert!(matches!(generate("DSA1024"), Err(PodCertError::KeyType(_))));
    }
}
