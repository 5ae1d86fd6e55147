//! Authentication and authorization of the HTTPS API, as upstream's kubelet does them:
//! client certificates (CN = user, O = groups) verified against `clientCAFile`, bearer tokens
//! through TokenReview, anonymous requests if enabled; then AlwaysAllow or a
//! SubjectAccessReview for `nodes/<subresource>` of this node, with cached decisions.
//!
//! Reviews are what an unauthenticated client can make the kubelet spend, so they are bounded
//! three ways: answers are cached in bounded caches ([`ReviewCache`], `quick_cache`: a
//! concurrent size-bounded cache, entries expiring by their own TTL on tokio's clock);
//! concurrent requests for the same token or decision wait for one review and share its
//! answer; and reviews not answered from the cache are rate limited ([`RateLimiter`], one for
//! TokenReview and one for SubjectAccessReview), a request that would wait too long for its
//! turn being answered 429.

use std::collections::BTreeMap;
use std::future::Future;
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

/// The streaming endpoints: whatever the method (a WebSocket upgrade is a GET), they run
/// commands or open connections in a pod, so they need `create`, never merely `get`.
const STREAMING: &[&str] = &["/exec", "/attach", "/portForward", "/run"];

/// Maps a request to its attributes: `/stats/*` -> stats, `/metrics/*` -> metrics, `/logs/*`
/// -> log, `/pods` -> pods and `/healthz` -> healthz (each also admitted by proxy, the
/// fine-grained authorization of newer kubelets), everything else -> proxy. The verb follows
/// the method, except for the streaming endpoints, which are always `create`.
pub fn attributes(method: &http::Method, path: &str) -> Attributes {
    let verb = match *method {
        _ if STREAMING.iter().any(|p| is_subpath(path, p)) => "create",
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

/// Entries of the TokenReview cache at most (each keyed by the token's SHA-256).
pub const TOKEN_CACHE_SIZE: usize = 4096;
/// Entries of the SubjectAccessReview cache at most (upstream's webhook authorizer keeps 8192).
pub const DECISION_CACHE_SIZE: usize = 8192;
/// Reviews per second of each kind, and the burst, that the kubelet sends (upstream's
/// kubeAPIQPS and kubeAPIBurst, which its reviews share with its other API calls).
pub const REVIEWS_PER_SECOND: u32 = 50;
pub const REVIEW_BURST: u32 = 100;
/// How long a request waits for its review's turn before it is answered 429.
pub const REVIEW_MAX_WAIT: Duration = Duration::from_secs(1);

/// A bounded cache of review answers, each expiring after its own TTL (tokio's clock, so
/// tests can advance it). Concurrent lookups of a key that is not cached run one review and
/// share its answer.
pub struct ReviewCache<K, V> {
    entries: quick_cache::sync::Cache<K, (Instant, V)>,
}

impl<K: Eq + Hash + Clone, V: Clone> std::fmt::Debug for ReviewCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewCache")
            .field("len", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> ReviewCache<K, V> {
    /// A cache of at most `capacity` entries; the least recently useful are evicted.
    pub fn new(capacity: usize) -> Self {
        ReviewCache {
            entries: quick_cache::sync::Cache::new(capacity.max(1)),
        }
    }

    /// The live value for `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        self.entries
            .get(key)
            .filter(|(expires, _)| Instant::now() < *expires)
            .map(|(_, v)| v)
    }

    /// Stores `value` for `ttl`.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        self.entries.insert(key, (Instant::now() + ttl, value));
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The most entries held.
    pub fn capacity(&self) -> u64 {
        self.entries.capacity()
    }

    /// The live value for `key`, else the answer of `review` (value and TTL), cached. While a
    /// review of `key` runs, other callers for `key` wait for it instead of starting their own;
    /// if it fails (or its caller goes away) the next waiter reviews.
    pub async fn get_or_review<E, F, Fut>(&self, key: K, review: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Duration), E>>,
    {
        let mut review = Some(review);
        loop {
            match self.entries.get_value_or_guard_async(&key).await {
                Ok((expires, v)) if Instant::now() < expires => return Ok(v),
                Ok(_) => {
                    self.entries.remove(&key);
                }
                Err(guard) => {
                    let Some(review) = review.take() else {
                        // Unreachable: a guard is handed out once per call at most.
                        continue;
                    };
                    let (v, ttl) = review().await?;
                    let _ = guard.insert((Instant::now() + ttl, v.clone()));
                    return Ok(v);
                }
            }
        }
    }
}

/// A rate limiter for reviews (GCRA, the token bucket's equivalent): `rate` per second on
/// average, `burst` at once; a caller whose turn is further away than `max_wait` is refused
/// instead of queued, so a flood cannot pile up waiters. Hand-written (a dozen lines) rather
/// than `governor`, whose clock tests cannot pause.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    burst: u32,
    max_wait: Duration,
    /// The theoretical arrival time of the next request.
    tat: Mutex<Option<Instant>>,
}

/// The rate limit left no turn within the longest wait.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("too many reviews waiting")]
pub struct Throttled;

impl RateLimiter {
    /// `rate` per second (at least 1), bursts of `burst`, waits of at most `max_wait`.
    pub fn new(rate: u32, burst: u32, max_wait: Duration) -> Self {
        RateLimiter {
            interval: Duration::from_secs(1) / rate.max(1),
            burst: burst.max(1),
            max_wait,
            tat: Mutex::new(None),
        }
    }

    /// Takes a turn: how long to wait for it, or [`Throttled`].
    pub fn reserve(&self) -> Result<Duration, Throttled> {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let start = tat.map_or(now, |t| t.max(now));
        let next = start + self.interval;
        let wait = (next - now).saturating_sub(self.interval * self.burst);
        if wait > self.max_wait {
            return Err(Throttled);
        }
        *tat = Some(next);
        Ok(wait)
    }

    /// Waits for a turn (on tokio's timer, never blocking a worker).
    pub async fn acquire(&self) -> Result<(), Throttled> {
        let wait = self.reserve()?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No acceptable credentials: 401.
    #[error("unauthorized")]
    Unauthenticated,
    /// Too many reviews to make at once: 429.
    #[error("too many requests awaiting review")]
    Throttled,
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
    /// TokenReview answers by the token's SHA-256 (the token itself is not kept).
    tokens: ReviewCache<[u8; 32], Option<User>>,
    decisions: ReviewCache<String, bool>,
    token_reviews: RateLimiter,
    access_reviews: RateLimiter,
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
            tokens: ReviewCache::new(TOKEN_CACHE_SIZE),
            decisions: ReviewCache::new(DECISION_CACHE_SIZE),
            token_reviews: RateLimiter::new(REVIEWS_PER_SECOND, REVIEW_BURST, REVIEW_MAX_WAIT),
            access_reviews: RateLimiter::new(REVIEWS_PER_SECOND, REVIEW_BURST, REVIEW_MAX_WAIT),
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
        use sha2::Digest;
        let Some(client) = &self.client else {
            return Err(AuthError::Unauthenticated);
        };
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let ttl = self.authn.webhook_cache_ttl;
        let user = self
            .tokens
            .get_or_review(key, || async {
                self.token_reviews
                    .acquire()
                    .await
                    .map_err(|Throttled| AuthError::Throttled)?;
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: token.to_string(),
                        audiences: None,
                    },
                    ..Default::default()
                };
                let api: Api<TokenReview> = Api::all(client.clone());
                let answer =
                    api.create(&PostParams::default(), &review)
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
                Ok((user, ttl))
            })
            .await?;
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
        let Some(client) = &self.client else {
            return Err(AuthError::NoApiServer);
        };
        let authz = &self.authz;
        self.decisions
            .get_or_review(key, || async {
                self.access_reviews
                    .acquire()
                    .await
                    .map_err(|Throttled| AuthError::Throttled)?;
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
                    authz.cache_authorized_ttl
                } else {
                    authz.cache_unauthorized_ttl
                };
                Ok((allowed, ttl))
            })
            .await
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
        let cache: ReviewCache<&str, bool> = ReviewCache::new(16);
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
        // An expired answer is reviewed again.
        let again = cache
            .get_or_review("allowed", || async {
                Ok::<_, ()>((false, Duration::from_secs(1)))
            })
            .await;
        assert_eq!(again, Ok(false));
    }

    /// A flood of distinct bad tokens: the cache never holds more than its bound.
    #[tokio::test]
    async fn the_token_cache_stays_bounded_under_distinct_tokens() {
        use sha2::Digest;
        let cache: ReviewCache<[u8; 32], Option<User>> = ReviewCache::new(TOKEN_CACHE_SIZE);
        for i in 0..(10 * TOKEN_CACHE_SIZE) {
            let key: [u8; 32] = sha2::Sha256::digest(format!("bad-token-{i}")).into();
            let answer = cache
                .get_or_review(key, || async {
                    Ok::<_, ()>((None, Duration::from_secs(120)))
                })
                .await;
            assert_eq!(answer, Ok(None));
            assert!(cache.len() as u64 <= cache.capacity());
        }
        assert!(
            cache.capacity() <= TOKEN_CACHE_SIZE as u64 + 64,
            "{}",
            cache.capacity()
        );
        assert!(!cache.is_empty());
    }

    /// Concurrent requests with the same unknown token make one review and share its answer;
    /// a failed review is not cached, and the next caller reviews.
    #[tokio::test]
    async fn concurrent_lookups_of_one_token_make_one_review() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cache: std::sync::Arc<ReviewCache<&str, bool>> =
            std::sync::Arc::new(ReviewCache::new(16));
        let reviews = std::sync::Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, reviews, mut gate) = (cache.clone(), reviews.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_review("token", || async move {
                        reviews.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        Ok::<_, ()>((true, Duration::from_secs(60)))
                    })
                    .await
            }));
        }
        // Every task is waiting (on the gate or on the first review) before it opens.
        while reviews.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        release.send_replace(true);
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(true));
        }
        assert_eq!(reviews.load(Ordering::SeqCst), 1);
        let failed = cache
            .get_or_review("other", || async { Err::<(bool, Duration), _>("api down") })
            .await;
        assert_eq!(failed, Err("api down"));
        assert_eq!(cache.get(&"other"), None);
    }

    /// The limiter lets a burst through at once, then one review per interval, and refuses
    /// callers whose turn is more than the longest wait away.
    #[tokio::test(start_paused = true)]
    async fn reviews_are_rate_limited() {
        let l = RateLimiter::new(10, 5, Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(l.reserve(), Ok(Duration::ZERO));
        }
        // Then 100 ms apart, up to a second ahead.
        let waits: Vec<Duration> = (0..10).map(|_| l.reserve().unwrap()).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(waits[9], Duration::from_secs(1));
        assert_eq!(l.reserve(), Err(Throttled));
        // In a flood over ten seconds, at most burst + rate * (10 s + longest wait) pass.
        let mut passed = 15;
        for _ in 0..100 {
            for _ in 0..100 {
                if l.reserve().is_ok() {
                    passed += 1;
                }
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert!(passed <= 5 + 10 * 11, "{passed}");
        assert!(passed >= 100, "{passed}");
        // Idle time refills the burst.
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..5 {
            assert_eq!(l.reserve(), Ok(Duration::ZERO));
        }
    }

    /// exec, attach, port-forward and run need `create` whatever the method: a WebSocket
    /// upgrade is a GET, and `get` on nodes/proxy must not let anyone run commands.
    #[test]
    fn streaming_endpoints_need_create_even_for_get() {
        for path in [
            "/exec/ns/p/c",
            "/exec/ns/p/uid/c",
            "/attach/ns/p/c",
            "/portForward/ns/p",
            "/run/ns/p/c",
        ] {
            for m in [http::Method::GET, http::Method::POST, http::Method::HEAD] {
                let a = attributes(&m, path);
                assert_eq!(
                    (a.verb, a.subresources),
                    ("create", vec!["proxy"]),
                    "{m} {path}"
                );
            }
        }
        assert_eq!(attributes(&http::Method::GET, "/executor").verb, "get");
        assert_eq!(
            attributes(&http::Method::GET, "/containerLogs/ns/p/c").verb,
            "get"
        );
    }
}
