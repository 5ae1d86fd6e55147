//! Authentication and authorization of the HTTPS API, as upstream's kubelet does them:
//! client certificates (CN = user, O = groups) verified against `clientCAFile`, bearer tokens
//! through TokenReview, anonymous requests if enabled; then AlwaysAllow or a
//! SubjectAccessReview for `nodes/<subresource>` of this node, with cached decisions.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use tokio::time::Instant;

use crate::config::{Authentication, Authorization, AuthorizationMode};

/// Who made a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    /// `system:anonymous` in `system:unauthenticated`.
    pub fn anonymous() -> Self {
        User {
            name: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
            ..Default::default()
        }
    }

    /// Adds `system:authenticated`, as upstream does for every authenticated user.
    fn authenticated(mut self) -> Self {
        if !self.groups.iter().any(|g| g == "system:authenticated") {
            self.groups.push("system:authenticated".into());
        }
        self
    }
}

/// The identity in a verified client certificate: CN is the user, each O a group.
pub fn user_from_certificate(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(
        User {
            name,
            groups,
            ..Default::default()
        }
        .authenticated(),
    )
}

/// The authorization attributes of a request: upstream's verb from the HTTP method and the
/// `nodes` subresources to check in order (any allowed one admits the request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: &'static str,
    pub subresources: Vec<&'static str>,
}

fn is_subpath(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// Maps a request to its attributes: `/stats/*` -> stats, `/metrics/*` -> metrics, `/logs/*`
/// -> log, `/pods` -> pods and `/healthz` -> healthz (each also admitted by proxy, the
/// fine-grained authorization of newer kubelets), everything else -> proxy.
pub fn attributes(method: &http::Method, path: &str) -> Attributes {
    let verb = match *method {
        http::Method::POST => "create",
        http::Method::GET => "get",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "",
    };
    let subresources = if is_subpath(path, "/stats") {
        vec!["stats"]
    } else if is_subpath(path, "/metrics") {
        vec!["metrics"]
    } else if is_subpath(path, "/logs") {
        vec!["log"]
    } else if is_subpath(path, "/pods") {
        vec!["pods", "proxy"]
    } else if is_subpath(path, "/healthz") {
        vec!["healthz", "proxy"]
    } else if is_subpath(path, "/configz") {
        vec!["configz", "proxy"]
    } else {
        vec!["proxy"]
    };
    Attributes { verb, subresources }
}

/// A map whose entries expire (tokio's clock, so tests can advance it).
#[derive(Debug)]
pub struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash, V: Clone> Default for TtlCache<K, V> {
    fn default() -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// The live value for `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(expires, _)| Instant::now() < *expires)
            .map(|(_, v)| v.clone())
    }

    /// Stores `value` for `ttl`; expired entries are dropped on the way.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (expires, _)| now < *expires);
        entries.insert(key, (now + ttl, value));
    }
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No acceptable credentials: 401.
    #[error("unauthorized")]
    Unauthenticated,
    /// Webhook authorization without an API server (standalone mode).
    #[error("webhook authorization needs an API server")]
    NoApiServer,
    /// The API server could not be asked.
    #[error("{review} failed")]
    Review {
        review: &'static str,
        #[source]
        source: kube::Error,
    },
}

/// The API's authenticator and authorizer.
pub struct Auth {
    authn: Authentication,
    authz: Authorization,
    node_name: String,
    client: Option<kube::Client>,
    tokens: TtlCache<String, Option<User>>,
    decisions: TtlCache<String, bool>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("authn", &self.authn)
            .field("authz", &self.authz)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Webhooks use `client`; without one, tokens are never accepted and Webhook authorization
    /// denies with an error.
    pub fn new(
        authn: Authentication,
        authz: Authorization,
        node_name: String,
        client: Option<kube::Client>,
    ) -> Self {
        Auth {
            authn,
            authz,
            node_name,
            client,
            tokens: TtlCache::default(),
            decisions: TtlCache::default(),
        }
    }

    /// Whether client certificates are requested at all.
    pub fn client_ca_file(&self) -> Option<&std::path::Path> {
        self.authn.client_ca_file.as_deref()
    }

    /// Identifies the caller: a verified certificate, else a bearer token, else anonymous.
    /// A bad token is an error even when anonymous requests are allowed, as upstream.
    pub async fn authenticate(
        &self,
        cert_user: Option<&User>,
        authorization_header: Option<&str>,
    ) -> Result<User, AuthError> {
        if let Some(u) = cert_user {
            return Ok(u.clone());
        }
        let token = authorization_header
            .and_then(|h| {
                let (scheme, rest) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty());
        match token {
            Some(token) if self.authn.webhook => self.review_token(token).await,
            // A token nobody can check is no credential: it falls through as upstream does
            // when no token authenticator is configured.
            _ if self.authn.anonymous => Ok(User::anonymous()),
            _ => Err(AuthError::Unauthenticated),
        }
    }

    async fn review_token(&self, token: &str) -> Result<User, AuthError> {
        if let Some(cached) = self.tokens.get(&token.to_string()) {
            return cached.ok_or(AuthError::Unauthenticated);
        }
        let Some(client) = &self.client else {
            return Err(AuthError::Unauthenticated);
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| AuthError::Review {
                review: "TokenReview",
                source,
            })?;
        let status = answer.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(u)) => Some(
                User {
                    name: u.username.unwrap_or_default(),
                    uid: u.uid.unwrap_or_default(),
                    groups: u.groups.unwrap_or_default(),
                    extra: u.extra.unwrap_or_default(),
                }
                .authenticated(),
            ),
            _ => None,
        };
        self.tokens.insert(
            token.to_string(),
            user.clone(),
            self.authn.webhook_cache_ttl,
        );
        user.ok_or(AuthError::Unauthenticated)
    }

    /// Whether `user` may make a request with `attrs` (first allowed subresource wins).
    pub async fn authorize(&self, user: &User, attrs: &Attributes) -> Result<bool, AuthError> {
        if self.authz.mode == AuthorizationMode::AlwaysAllow {
            return Ok(true);
        }
        for sub in &attrs.subresources {
            if self.review_access(user, attrs.verb, sub).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn review_access(
        &self,
        user: &User,
        verb: &str,
        subresource: &str,
    ) -> Result<bool, AuthError> {
        let spec = SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: (!user.uid.is_empty()).then(|| user.uid.clone()),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_string()),
                version: Some("v1".into()),
                resource: Some("nodes".into()),
                subresource: Some(subresource.to_string()),
                name: Some(self.node_name.clone()),
                ..Default::default()
            }),
            non_resource_attributes: None,
        };
        let key = serde_json::to_string(&spec).unwrap_or_default();
        if let Some(allowed) = self.decisions.get(&key) {
            return Ok(allowed);
        }
        let Some(client) = &self.client else {
            return Err(AuthError::NoApiServer);
        };
        let api: Api<SubjectAccessReview> = Api::all(client.clone());
        let answer = api
            .create(
                &PostParams::default(),
                &SubjectAccessReview {
                    spec,
                    ..Default::default()
                },
            )
            .await
            .map_err(|source| AuthError::Review {
                review: "SubjectAccessReview",
                source,
            })?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        let ttl = if allowed {
            self.authz.cache_authorized_ttl
        } else {
            self.authz.cache_unauthorized_ttl
        };
        self.decisions.insert(key, allowed, ttl);
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_follow_upstreams_mapping() {
        let a = |m: http::Method, p: &str| attributes(&m, p);
        assert_eq!(
            a(http::Method::GET, "/stats/summary"),
            Attributes {
                verb: "get",
                subresources: vec!["stats"]
            }
        );
        assert_eq!(
            a(http::Method::GET, "/metrics/resource").subresources,
            ["metrics"]
        );
        assert_eq!(a(http::Method::GET, "/metrics").subresources, ["metrics"]);
        assert_eq!(a(http::Method::GET, "/logs/syslog").subresources, ["log"]);
        assert_eq!(
            a(http::Method::GET, "/pods").subresources,
            ["pods", "proxy"]
        );
        assert_eq!(
            a(http::Method::GET, "/healthz").subresources,
            ["healthz", "proxy"]
        );
        // Container logs and streaming are proxy, as upstream.
        assert_eq!(
            a(http::Method::GET, "/containerLogs/ns/p/c").subresources,
            ["proxy"]
        );
        let exec = a(http::Method::POST, "/exec/ns/p/c");
        assert_eq!((exec.verb, exec.subresources), ("create", vec!["proxy"]));
        assert_eq!(a(http::Method::PUT, "/x").verb, "update");
        assert_eq!(a(http::Method::PATCH, "/x").verb, "patch");
        assert_eq!(a(http::Method::DELETE, "/x").verb, "delete");
        // Prefixes match whole segments only.
        assert_eq!(a(http::Method::GET, "/statsx").subresources, ["proxy"]);
        assert_eq!(a(http::Method::GET, "/podsx").subresources, ["proxy"]);
    }

    #[test]
    fn certificate_subject_gives_user_and_groups() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        let cert = params.self_signed(&key).unwrap();
        let u = user_from_certificate(cert.der()).unwrap();
        assert_eq!(u.name, "kube-apiserver-kubelet-client");
        assert_eq!(u.groups, ["system:masters", "system:authenticated"]);
        assert!(user_from_certificate(b"not a certificate").is_none());
    }

    fn auth(anonymous: bool, webhook: bool) -> Auth {
        Auth::new(
            Authentication {
                client_ca_file: None,
                webhook,
                webhook_cache_ttl: Duration::from_secs(120),
                anonymous,
            },
            Authorization {
                mode: AuthorizationMode::AlwaysAllow,
                cache_authorized_ttl: Duration::from_secs(300),
                cache_unauthorized_ttl: Duration::from_secs(30),
            },
            "n".into(),
            None,
        )
    }

    #[tokio::test]
    async fn credentials_anonymous_and_refusals() {
        let cert_user = User {
            name: "alice".into(),
            ..Default::default()
        };
        let strict = auth(false, true);
        assert_eq!(
            strict.authenticate(Some(&cert_user), None).await.unwrap(),
            cert_user
        );
        assert!(matches!(
            strict.authenticate(None, None).await,
            Err(AuthError::Unauthenticated)
        ));
        // A token that cannot be reviewed (no API server) is refused, not anonymous.
        let open = auth(true, true);
        assert!(matches!(
            open.authenticate(None, Some("Bearer abc")).await,
            Err(AuthError::Unauthenticated)
        ));
        assert_eq!(
            open.authenticate(None, None).await.unwrap(),
            User::anonymous()
        );
        // Without the token webhook a token is no credential at all.
        let no_webhook = auth(true, false);
        assert_eq!(
            no_webhook
                .authenticate(None, Some("Bearer abc"))
                .await
                .unwrap(),
            User::anonymous()
        );
        assert!(
            open.authorize(&User::anonymous(), &attributes(&http::Method::GET, "/pods"))
                .await
                .unwrap()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cached_decisions_expire_after_their_ttl() {
        let cache: TtlCache<&str, bool> = TtlCache::default();
        cache.insert("allowed", true, Duration::from_secs(300));
        cache.insert("denied", false, Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(cache.get(&"allowed"), Some(true));
        assert_eq!(cache.get(&"denied"), Some(false));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.get(&"denied"), None);
        assert_eq!(cache.get(&"allowed"), Some(true));
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(cache.get(&"allowed"), None);
    }
}
