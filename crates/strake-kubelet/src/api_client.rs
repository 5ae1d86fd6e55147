//! The kubelet's one API client, with the client-side rate limits upstream's kubelet puts on
//! its own clients: `kubeAPIQPS`/`kubeAPIBurst` on API calls, `eventRecordQPS`/`eventBurst` on
//! Events, and none on Lease renewals, which must never wait behind anything (upstream gives the
//! heartbeat a client with throttling disabled). Upstream builds three clientsets that share one
//! transport; here one client classifies each request and charges the matching token bucket.
//!
//! Hand-written: a token bucket is a few lines, and the crates that offer one (`governor`) do not
//! reproduce client-go's defaults for a zero QPS or burst, which the operator's configuration
//! depends on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

/// What a request is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Lease renewals: never throttled.
    Lease,
    /// Event writes: `eventRecordQPS`/`eventBurst`.
    Event,
    /// Everything else: `kubeAPIQPS`/`kubeAPIBurst`.
    Api,
}

/// Classifies a request by its path.
pub fn class(path: &str) -> Class {
    let resource_after = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.split('/').nth(1))
            .unwrap_or_default()
            .to_string()
    };
    if path.starts_with("/apis/coordination.k8s.io/")
        && resource_after("/apis/coordination.k8s.io/v1/namespaces/") == "leases"
    {
        Class::Lease
    } else if resource_after("/api/v1/namespaces/") == "events"
        || resource_after("/apis/events.k8s.io/v1/namespaces/") == "events"
    {
        Class::Event
    } else {
        Class::Api
    }
}

/// A request rate: unlimited, or `qps` sustained with bursts of `burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    Unlimited,
    Limited { qps: f64, burst: u32 },
}

impl Rate {
    /// `kubeAPIQPS`/`kubeAPIBurst` as client-go reads them: a zero QPS means client-go's
    /// default of 5 and a zero burst its default of 10.
    pub fn api(qps: u32, burst: u32) -> Rate {
        Rate::Limited {
            qps: if qps == 0 { 5.0 } else { f64::from(qps) },
            burst: if burst == 0 { 10 } else { burst },
        }
    }

    /// `eventRecordQPS`/`eventBurst`: a zero QPS means no limit.
    pub fn events(qps: u32, burst: u32) -> Rate {
        match qps {
            0 => Rate::Unlimited,
            _ => Rate::api(qps, burst),
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `qps` per second; a request that finds none
/// waits for the next one (the reservation is taken at once, so waiters keep their order).
#[derive(Debug)]
pub struct Bucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: Rate, now: Instant) -> Option<Bucket> {
        match rate {
            Rate::Unlimited => None,
            Rate::Limited { qps, burst } => Some(Bucket {
                qps,
                burst: f64::from(burst),
                tokens: f64::from(burst),
                last: now,
            }),
        }
    }

    /// Takes one token; returns how long the request must wait before it may go.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.qps)
        }
    }
}

/// The limits of the kubelet's client.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub api: Rate,
    pub events: Rate,
}

#[derive(Debug)]
struct Buckets {
    api: Option<Bucket>,
    events: Option<Bucket>,
}

impl Buckets {
    fn delay(&mut self, class: Class) -> Duration {
        let bucket = match class {
            Class::Lease => None,
            Class::Event => self.events.as_mut(),
            Class::Api => self.api.as_mut(),
        };
        bucket.map_or(Duration::ZERO, |b| b.reserve(Instant::now()))
    }
}

/// A tower layer that delays each request until its class's bucket has a token.
/// `B` is the request body type of the stack it wraps.
#[derive(Debug)]
pub struct RateLimitLayer<B> {
    buckets: Arc<Mutex<Buckets>>,
    body: std::marker::PhantomData<fn(B)>,
}

impl<B> RateLimitLayer<B> {
    pub fn new(limits: Limits) -> Self {
        let now = Instant::now();
        RateLimitLayer {
            buckets: Arc::new(Mutex::new(Buckets {
                api: Bucket::new(limits.api, now),
                events: Bucket::new(limits.events, now),
            })),
            body: std::marker::PhantomData,
        }
    }
}

/// Requests buffered ahead of the inner service (each waits for its token first).
const BUFFER: usize = 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> Layer<S> for RateLimitLayer<B>
where
    S: Service<http::Request<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    B: Send + 'static,
{
    type Service = RateLimited<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner: tower::buffer::Buffer::new(inner, BUFFER),
            buckets: self.buckets.clone(),
        }
    }
}

/// See [`RateLimitLayer`].
pub struct RateLimited<S: Service<http::Request<B>>, B> {
    inner: tower::buffer::Buffer<http::Request<B>, S::Future>,
    buckets: Arc<Mutex<Buckets>>,
}

impl<S, B> Service<http::Request<B>> for RateLimited<S, B>
where
    S: Service<http::Request<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<S::Response, BoxError>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Readiness is awaited per request, after its token.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let delay = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .delay(class(req.uri().path()));
        let inner = self.inner.clone();
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            inner.oneshot(req).await
        })
    }
}

/// The client for `kubeconfig`, rate-limited by `limits`.
pub async fn client(
    kubeconfig: &std::path::Path,
    limits: Limits,
) -> Result<kube::Client, Box<dyn std::error::Error + Send + Sync>> {
    let config = strake_types::kube_client::config(Some(kubeconfig)).await?;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&RateLimitLayer::<kube::client::Body>::new(limits))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classed_as_upstream_splits_its_clients() {
        let lease = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-a";
        assert_eq!(class(lease), Class::Lease);
        assert_eq!(class("/api/v1/namespaces/default/events"), Class::Event);
        assert_eq!(
            class("/apis/events.k8s.io/v1/namespaces/default/events/e1"),
            Class::Event
        );
        // A pod or a namespace named like the resource is still an API call.
        assert_eq!(class("/api/v1/namespaces/events/pods/leases"), Class::Api);
        assert_eq!(class("/api/v1/nodes/node-a/status"), Class::Api);
        assert_eq!(class("/apis/coordination.k8s.io/v1/leases"), Class::Api);
    }

    #[test]
    fn zero_rates_mean_client_gos_defaults() {
        assert_eq!(
            Rate::api(0, 0),
            Rate::Limited {
                qps: 5.0,
                burst: 10
            }
        );
        assert_eq!(
            Rate::api(50, 100),
            Rate::Limited {
                qps: 50.0,
                burst: 100
            }
        );
        assert_eq!(Rate::events(0, 100), Rate::Unlimited);
        assert_eq!(
            Rate::events(50, 0),
            Rate::Limited {
                qps: 50.0,
                burst: 10
            }
        );
    }

    #[test]
    fn a_bucket_allows_its_burst_then_paces_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            Rate::Limited {
                qps: 10.0,
                burst: 3,
            },
            t0,
        )
        .unwrap();
        for _ in 0..3 {
            assert_eq!(b.reserve(t0), Duration::ZERO);
        }
        // Waiters queue: the 4th goes after 100 ms, the 5th after 200 ms.
        assert_eq!(b.reserve(t0), Duration::from_millis(100));
        assert_eq!(b.reserve(t0), Duration::from_millis(200));
        // After a quiet second the bucket is full again, never fuller than the burst.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            assert_eq!(b.reserve(later), Duration::ZERO);
        }
        assert!(b.reserve(later) > Duration::ZERO);
        assert!(Bucket::new(Rate::Unlimited, t0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_delays_api_calls_but_never_lease_renewals() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let inner = tower::service_fn(move |req: http::Request<()>| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push((req.uri().path().to_string(), Instant::now()));
                Ok::<_, std::convert::Infallible>(())
            }
        });
        let limits = Limits {
            api: Rate::Limited { qps: 2.0, burst: 1 },
            events: Rate::Unlimited,
        };
        let svc = RateLimitLayer::new(limits).layer(inner);
        let t0 = Instant::now();
        let req = |path: &str| http::Request::get(path).body(()).unwrap();
        let lease = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n";
        let mut pending = Vec::new();
        let mut s = svc;
        for path in ["/api/v1/pods", "/api/v1/pods", "/api/v1/pods", lease] {
            pending.push(tokio::spawn(s.call(req(path))));
        }
        for p in pending {
            p.await.unwrap().unwrap();
        }
        let calls = calls.lock().unwrap().clone();
        let at = |path: &str| -> Vec<Duration> {
            calls
                .iter()
                .filter(|(p, _)| p == path)
                .map(|(_, t)| *t - t0)
                .collect()
        };
        let mut api = at("/api/v1/pods");
        api.sort();
        assert_eq!(
            api,
            vec![
                Duration::ZERO,
                Duration::from_millis(500),
                Duration::from_millis(1000)
            ]
        );
        assert_eq!(at(lease), vec![Duration::ZERO], "the lease never waits");
    }
}
