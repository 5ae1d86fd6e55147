//! Port-forward over SPDY (`portforward.k8s.io`): for each forwarded connection the client
//! opens a pair of streams, `error` and `data`, sharing a `requestID` header and naming the
//! pod `port`. The server connects to `localhost:<port>` inside the pod's network namespace
//! and copies bytes both ways between the data stream and the connection; a failure is
//! written as text on the error stream.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use strake_types::cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::STREAM_CREATION_TIMEOUT;
use super::spdy::{Session, Stream};
use crate::sandbox::Sandboxes;

/// The sub-protocol served.
pub const PROTOCOLS: &[&str] = &["portforward.k8s.io"];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pairs waiting for their second stream, at most, per connection; a stream that would open
/// another is refused.
pub const MAX_PENDING_PAIRS: usize = 64;

/// One forwarded connection's streams as they arrive, and when its first one came.
struct Pair {
    since: Instant,
    data: Option<Stream>,
    error: Option<Stream>,
}

/// The streams of the forwarded connections still missing a stream, by request ID: bounded in
/// number ([`MAX_PENDING_PAIRS`]) and in time (upstream's stream creation timeout).
pub(crate) struct Pending {
    pairs: HashMap<String, Pair>,
    timeout: Duration,
}

/// What adding a stream did.
pub(crate) enum Added {
    /// Both streams are there.
    Complete(Stream, Stream),
    /// Waiting for the other one.
    Waiting,
    /// Refused (a duplicate, or too many pairs waiting): the stream is handed back.
    Refused(Stream),
}

impl Pending {
    pub(crate) fn new(timeout: Duration) -> Self {
        Pending {
            pairs: HashMap::new(),
            timeout,
        }
    }

    /// How many pairs wait.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Files `s` under `id`; `is_data` tells its type.
    pub(crate) fn add(&mut self, id: String, is_data: bool, s: Stream, now: Instant) -> Added {
        if !self.pairs.contains_key(&id) && self.pairs.len() >= MAX_PENDING_PAIRS {
            return Added::Refused(s);
        }
        let pair = self.pairs.entry(id.clone()).or_insert_with(|| Pair {
            since: now,
            data: None,
            error: None,
        });
        let slot = if is_data {
            &mut pair.data
        } else {
            &mut pair.error
        };
        if slot.is_some() {
            return Added::Refused(s);
        }
        *slot = Some(s);
        if pair.data.is_some()
            && pair.error.is_some()
            && let Some(Pair {
                data: Some(data),
                error: Some(error),
                ..
            }) = self.pairs.remove(&id)
        {
            return Added::Complete(data, error);
        }
        Added::Waiting
    }

    /// When the oldest waiting pair times out.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pairs.values().map(|p| p.since + self.timeout).min()
    }

    /// Removes the pairs that waited `timeout` or longer; returns their streams.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Stream> {
        let timeout = self.timeout;
        let expired: Vec<String> = self
            .pairs
            .iter()
            .filter(|(_, p)| now >= p.since + timeout)
            .map(|(id, _)| id.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|id| self.pairs.remove(&id))
            .flat_map(|p| [p.data, p.error])
            .flatten()
            .collect()
    }
}

/// The request ID of a stream: its header, or (for clients too old to send one) derived from
/// the stream ID as upstream does.
fn request_id(s: &Stream) -> String {
    match s.header("requestID") {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => match s.header("streamType") {
            Some("data") => s.id.saturating_sub(2).to_string(),
            _ => s.id.to_string(),
        },
    }
}

/// Checks a stream's headers as upstream does; returns its port.
pub fn check_headers(port: Option<&str>, stream_type: Option<&str>) -> Result<u16, String> {
    let port = port
        .filter(|p| !p.is_empty())
        .ok_or_else(|| "\"port\" header is required".to_string())?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("unable to parse {port:?} as a port: {e}"))?;
    if port < 1 {
        return Err(format!("port {port} must be > 0"));
    }
    match stream_type {
        Some("data") | Some("error") => Ok(port),
        Some(t) if !t.is_empty() => Err(format!("invalid stream type {t:?}")),
        _ => Err("\"streamType\" header is required".into()),
    }
}

/// Serves one port-forward connection until the client closes it.
pub async fn serve(
    sandboxes: Arc<Sandboxes>,
    req: cri::PortForwardRequest,
    session: Session,
    mut streams: mpsc::Receiver<Stream>,
) {
    let netns = match sandboxes.get(&req.pod_sandbox_id) {
        Ok(sb) => sb.record.netns.clone(),
        Err(e) => {
            tracing::debug!(error = %e, "port-forward to a sandbox that went away");
            session.close().await;
            return;
        }
    };
    let mut pending = Pending::new(STREAM_CREATION_TIMEOUT);
    loop {
        let deadline = pending.next_deadline();
        let s = tokio::select! {
            s = streams.recv() => match s {
                Some(s) => s,
                None => break,
            },
            _ = sleep_until(deadline) => {
                for s in pending.expire(Instant::now()) {
                    tracing::debug!(request_id = %request_id(&s), "port-forward: timed out waiting for the stream pair");
                    if s.header("streamType") == Some("error") {
                        let _ = s.writer().write(b"timed out waiting for streams").await;
                        let _ = s.writer().close().await;
                    } else {
                        let _ = s.writer().reset().await;
                    }
                }
                continue;
            }
        };
        if let Err(msg) = check_headers(s.header("port"), s.header("streamType")) {
            tracing::debug!(error = %msg, "port-forward stream refused");
            let _ = s.writer().reset().await;
            continue;
        }
        let id = request_id(&s);
        let is_data = s.header("streamType") == Some("data");
        match pending.add(id, is_data, s, Instant::now()) {
            Added::Complete(data, error) => {
                tokio::spawn(forward(netns.clone(), data, error));
            }
            Added::Waiting => {}
            Added::Refused(s) => {
                let _ = s.writer().reset().await;
            }
        }
    }
    session.close().await;
}

/// Sleeps until `deadline`; never returns without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn forward(netns: Option<PathBuf>, mut data: Stream, error: Stream) {
    let port = data
        .header("port")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(0);
    let (out, err_out) = (data.writer(), error.writer());
    let connected = tokio::task::spawn_blocking(move || connect_in(netns.as_deref(), port)).await;
    let tcp = match connected {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let msg = format!("error forwarding port {port} to pod: {e}");
            let _ = err_out.write(msg.as_bytes()).await;
            let _ = err_out.close().await;
            let _ = out.reset().await;
            return;
        }
        Err(e) => {
            let _ = err_out.write(e.to_string().as_bytes()).await;
            let _ = err_out.close().await;
            return;
        }
    };
    let tcp = match tcp
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(tcp))
    {
        Ok(t) => t,
        Err(e) => {
            let _ = err_out.write(e.to_string().as_bytes()).await;
            let _ = err_out.close().await;
            return;
        }
    };
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let inbound = tokio::spawn(async move {
        while let Some(chunk) = data.read().await {
            if tcp_w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = tcp_w.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match tcp_r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    inbound.abort();
    let _ = out.close().await;
    let _ = err_out.close().await;
}

/// Connects to `localhost:port` in the network namespace pinned at `netns` (the daemon's own
/// without one: host-network pods). The namespace is entered by a thread of its own that ends
/// right after connecting: setns(CLONE_NEWNET) changes only the calling thread, and the socket
/// keeps the namespace it was created in.
fn connect_in(netns: Option<&Path>, port: u16) -> std::io::Result<TcpStream> {
    let netns = netns.map(Path::to_path_buf);
    std::thread::spawn(move || {
        if let Some(path) = netns {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on a namespace file we opened; only this short-lived thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
            Ok(s) => Ok(s),
            Err(e4) => {
                let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
                TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| e4)
            }
        }
    })
    .join()
    .map_err(|_| std::io::Error::other("connect thread panicked"))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stream_headers_are_checked_like_upstream() {
        assert_eq!(check_headers(Some("80"), Some("data")), Ok(80));
        assert_eq!(check_headers(Some("8080"), Some("error")), Ok(8080));
        assert!(check_headers(None, Some("data")).is_err());
        assert!(check_headers(Some("0"), Some("data")).is_err());
        assert!(check_headers(Some("70000"), Some("data")).is_err());
        assert!(check_headers(Some("80"), Some("stdin")).is_err());
        assert!(check_headers(Some("80"), None).is_err());
    }

    fn stream(id: u32, kind: &str, request: &str) -> Stream {
        let (out, _) = mpsc::channel(1);
        let (_, incoming) = mpsc::channel(1);
        Stream::new(
            id,
            vec![
                ("streamtype".into(), kind.into()),
                ("port".into(), "80".into()),
                ("requestid".into(), request.into()),
            ],
            incoming,
            super::super::spdy::StreamWriter::new(id, out),
        )
    }

    /// Streams pair up by request ID; half pairs are bounded in number and expire after the
    /// stream creation timeout instead of piling up.
    #[tokio::test(start_paused = true)]
    async fn half_pairs_are_bounded_and_expire() {
        let mut p = Pending::new(STREAM_CREATION_TIMEOUT);
        let now = Instant::now();
        assert!(matches!(
            p.add("0".into(), true, stream(1, "data", "0"), now),
            Added::Waiting
        ));
        // A second data stream for the same request is refused.
        assert!(matches!(
            p.add("0".into(), true, stream(3, "data", "0"), now),
            Added::Refused(_)
        ));
        assert!(matches!(
            p.add("0".into(), false, stream(5, "error", "0"), now),
            Added::Complete(d, e) if d.id == 1 && e.id == 5
        ));
        assert_eq!(p.len(), 0);
        // A client opening only halves fills the table, then is refused.
        for i in 0..MAX_PENDING_PAIRS {
            let id = (i + 1).to_string();
            assert!(matches!(
                p.add(id.clone(), false, stream(7, "error", &id), now),
                Added::Waiting
            ));
        }
        assert!(matches!(
            p.add("x".into(), false, stream(9, "error", "x"), now),
            Added::Refused(_)
        ));
        assert_eq!(p.len(), MAX_PENDING_PAIRS);
        assert_eq!(p.next_deadline(), Some(now + STREAM_CREATION_TIMEOUT));
        tokio::time::advance(STREAM_CREATION_TIMEOUT - Duration::from_secs(1)).await;
        assert!(p.expire(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(p.expire(Instant::now()).len(), MAX_PENDING_PAIRS);
        assert_eq!(p.len(), 0);
        assert_eq!(p.next_deadline(), None);
    }

    /// Without a namespace the connection is made in the caller's: a listener on loopback
    /// here receives what the forward sends.
    #[test]
    fn connect_in_reaches_localhost() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = connect_in(None, port).unwrap();
        assert_eq!(s.peer_addr().unwrap().port(), port);
        drop(l);
    }
}
