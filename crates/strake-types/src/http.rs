//! Serving HTTP/1.1 to parties the daemon does not trust: one accept loop for every server of
//! the daemons (the kubelet's API and health endpoint, the runtime's streaming server, the
//! proxy's health and metrics servers), so each gets the same limits:
//!
//! - a cap on connections served at once: a connection beyond it is closed at once (as a
//!   refused connection), so a flood of idle sockets cannot exhaust descriptors or memory;
//! - a deadline for a request's headers (hyper's `header_read_timeout`, which needs a timer):
//!   a client trickling its headers byte by byte, or sitting idle on a kept-alive connection,
//!   is disconnected when it passes;
//! - a back-off after a failed accept (EMFILE, ENFILE, ENOBUFS), 5 ms doubling up to 1 s as
//!   Go's `net/http` does, instead of spinning on an error that repeats at once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How long a client has to send a request's headers (hyper's default once a timer is set).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections one server serves at once unless told otherwise.
pub const MAX_CONNECTIONS: usize = 1024;

/// The limits of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// How long a client has to send a request's headers (also for the next request on a
    /// kept-alive connection).
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

impl Limits {
    /// An HTTP/1.1 connection builder enforcing the header deadline.
    pub fn http1(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        b
    }
}

/// The accept back-off: 5 ms after the first failure, doubling, at most 1 s; reset by a
/// successful accept.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    delay: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    /// The delay before accepting again after a failure.
    pub fn failed(&mut self) -> Duration {
        let next = match self.delay {
            None => Self::FIRST,
            Some(d) => (d * 2).min(Self::MAX),
        };
        self.delay = Some(next);
        next
    }

    /// An accept succeeded.
    pub fn reset(&mut self) {
        self.delay = None;
    }
}

/// Accepts connections on `listener` forever, calling `serve` on its own task for each one
/// within `limits.max_connections`; closes those beyond it at once. `name` names the server in
/// logs.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = Backoff::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => {
                backoff.reset();
                c
            }
            Err(e) => {
                let delay = backoff.failed();
                tracing::warn!(server = name, error = %e, retry_in_ms = delay.as_millis() as u64, "accept failed");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                server = name,
                %peer,
                max_connections = limits.max_connections,
                "connection limit reached; closing a new connection"
            );
            drop(tcp);
            continue;
        };
        let fut = serve(tcp, peer);
        tokio::spawn(async move {
            fut.await;
            drop(slot);
        });
    }
}

/// [`accept_loop`] serving each connection as HTTP/1.1 with `service` (upgrades allowed).
pub async fn serve<S, B>(listener: TcpListener, limits: Limits, name: &'static str, service: S)
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    accept_loop(listener, limits, name, move |tcp, peer| {
        let service = service.clone();
        async move {
            let conn = limits
                .http1()
                // Clients like `nc` half-close after sending the request; answer them anyway.
                .half_close(true)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(server = name, %peer, error = %e, "connection ended with an error");
            }
        }
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let seen: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(seen, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.failed(), Duration::from_millis(5));
    }

    async fn ok_server(limits: Limits) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"ok"),
            )))
        });
        tokio::spawn(serve(l, limits, "test", svc));
        addr
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // A refused connection may already be reset: what it answers (nothing) tells.
        let _ = s
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    /// A client sending its headers one byte at a time never finishes them; the server hangs
    /// up once the header deadline passes instead of waiting forever.
    #[tokio::test]
    async fn a_client_trickling_headers_is_disconnected() {
        let addr = ok_server(Limits {
            max_connections: 8,
            header_read_timeout: Duration::from_secs(1),
        })
        .await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").await.unwrap();
        let mut buf = [0u8; 256];
        let closed = loop {
            // Waits for whatever comes first: the server's hang-up, or time to send a byte.
            tokio::select! {
                r = s.read(&mut buf) => break r.map(|n| n == 0).unwrap_or(true),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if s.write_all(b"a").await.is_err() {
                        break true;
                    }
                }
            }
        };
        assert!(
            closed,
            "the server answered a request whose headers never ended"
        );
        // The server still serves well-behaved clients.
        assert!(get(addr).await.ends_with("ok"));
    }

    /// Connections beyond the cap are closed unanswered; once one ends, new ones are served.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_refused() {
        let addr = ok_server(Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(600),
        })
        .await;
        // Two idle connections hold both slots (a request on each proves they are served).
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
            held.push(s);
        }
        // The third is closed without an answer.
        assert_eq!(get(addr).await, "");
        // One slot frees up: served again.
        drop(held.pop());
        let mut served = String::new();
        for _ in 0..100 {
            served = get(addr).await;
            if !served.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served.ends_with("ok"), "{served:?}");
    }
}
