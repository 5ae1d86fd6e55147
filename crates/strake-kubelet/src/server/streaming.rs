//! `/exec`, `/attach` and `/portForward`: the CRI runtime hands out a URL on its streaming
//! server (CRI Exec/Attach/PortForward) and the request is reverse-proxied there, upgrade and
//! all; after the `101 Switching Protocols` the bytes are copied both ways untouched, so any
//! streaming protocol (SPDY/3.1, WebSocket channel protocols) passes through. The copy holds a
//! fixed buffer per direction: a side that stops reading stops the other side's reads (TCP
//! back-pressure), nothing queues in between.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{Body, full};

/// The most of a non-upgrade answer of the streaming server that is relayed.
const MAX_ANSWER: usize = 64 * 1024;

/// What `/exec` asks for (`command` repeated, `input`/`output`/`error`/`tty` flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamOptions {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl StreamOptions {
    /// Parses upstream's streaming query parameters.
    pub fn from_query(query: &str) -> Self {
        let mut o = StreamOptions::default();
        let on = |v: &str| matches!(v, "1" | "true" | "True" | "TRUE" | "t" | "T");
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "command" => o.command.push(v.into_owned()),
                "input" => o.stdin = on(&v),
                "output" => o.stdout = on(&v),
                "error" => o.stderr = on(&v),
                "tty" => o.tty = on(&v),
                _ => {}
            }
        }
        o
    }
}

/// The runtime's URL could not be proxied to.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("streaming URL {0:?} is not an absolute http URL")]
    Url(String),
    #[error("connect to streaming server {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("streaming server {addr}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
}

/// Forwards `req` to `url` (the CRI streaming URL) and returns the backend's answer; for an
/// upgrade, splices the two upgraded connections once both sides have switched.
pub async fn proxy(mut req: Request<Incoming>, url: &str) -> Result<Response<Body>, ProxyError> {
    let uri: Uri = url.parse().map_err(|_| ProxyError::Url(url.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(ProxyError::Url(url.to_string()));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| ProxyError::Url(url.to_string()))?
        .clone();
    let addr = if authority.port().is_some() {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|source| ProxyError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProxyError::Http {
            addr: addr.clone(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "streaming backend connection ended");
        }
    });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut out = Request::builder()
        .method(req.method().clone())
        .uri(path)
        .body(Empty::<Bytes>::new())
        .map_err(|_| ProxyError::Url(url.to_string()))?;
    for (name, value) in req.headers() {
        // The caller's credentials are for the kubelet, not for the runtime.
        if name == http::header::AUTHORIZATION || name == http::header::HOST {
            continue;
        }
        out.headers_mut().append(name.clone(), value.clone());
    }
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        out.headers_mut().insert(http::header::HOST, host);
    }
    let mut resp = sender
        .send_request(out)
        .await
        .map_err(|source| ProxyError::Http {
            addr: addr.clone(),
            source,
        })?;
    let status = resp.status();
    let mut answer = Response::builder().status(status);
    for (name, value) in resp.headers() {
        answer = answer.header(name, value);
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok((client, backend)) => {
                    let mut client = TokioIo::new(client);
                    let mut backend = TokioIo::new(backend);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                        tracing::debug!(error = %e, "stream ended");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "stream upgrade failed"),
            }
        });
        return Ok(answer
            .body(full(Bytes::new()))
            .unwrap_or_else(|_| Response::new(full(Bytes::new()))));
    }
    // A refusal is a short text: read at most MAX_ANSWER of it, never an unbounded body.
    let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(answer
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Bytes::new()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_query_parses_upstreams_parameters() {
        let o = StreamOptions::from_query(
            "command=sh&command=-c&command=echo+a%26b&output=1&error=1&tty=0",
        );
        assert_eq!(o.command, ["sh", "-c", "echo a&b"]);
        assert!(o.stdout && o.stderr && !o.stdin && !o.tty);
        let o = StreamOptions::from_query("input=1&tty=1");
        assert!(o.stdin && o.tty && o.command.is_empty());
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_head(s: &mut tokio::net::TcpStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    #[tokio::test]
    async fn an_upgrade_is_passed_through_to_the_streaming_url_and_bytes_flow_both_ways() {
        // The "runtime's streaming server": answers 101 and then upper-cases what it gets.
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.unwrap();
            let head = read_head(&mut s).await;
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n",
            )
            .await
            .unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf.to_ascii_uppercase()).await.unwrap();
            head
        });
        // The kubelet side: every request goes to the streaming URL.
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let url = format!("http://{backend_addr}/exec/tok123?x=1");
        tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req| {
                let url = url.clone();
                async move { Ok::<_, std::convert::Infallible>(proxy(req, &url).await.unwrap()) }
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .with_upgrades()
                .await
                .unwrap();
        });
        let mut c = tokio::net::TcpStream::connect(front_addr).await.unwrap();
        c.write_all(
            b"POST /exec/ns/pod/c?command=sh HTTP/1.1\r\nHost: kubelet\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nAuthorization: Bearer secret\r\n\r\n",
        )
        .await
        .unwrap();
        let answer = read_head(&mut c).await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("upgrade: spdy/3.1"),
            "{answer}"
        );
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HELLO");
        let head = seen.await.unwrap();
        assert!(
            head.starts_with("POST /exec/tok123?x=1 HTTP/1.1\r\n"),
            "{head}"
        );
        let lower = head.to_ascii_lowercase();
        assert!(
            lower.contains("x-stream-protocol-version: v4.channel.k8s.io"),
            "{head}"
        );
        assert!(lower.contains(&format!("host: {backend_addr}")), "{head}");
        assert!(
            !lower.contains("authorization"),
            "credentials leaked: {head}"
        );
    }

    #[tokio::test]
    async fn a_refused_upgrade_returns_the_backends_answer() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.unwrap();
            read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 7\r\n\r\nno such")
                .await
                .unwrap();
        });
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let url = format!("http://{addr}/exec/bad");
        tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req| {
                let url = url.clone();
                async move { Ok::<_, std::convert::Infallible>(proxy(req, &url).await.unwrap()) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .with_upgrades()
                .await;
        });
        let mut c = tokio::net::TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"GET /exec/a/b/c HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        assert!(out.ends_with("no such"), "{out}");
    }
}
