//! The kubelet's health endpoint: `GET /healthz` on `127.0.0.1:<healthzPort>` (10248) answers
//! `ok`, as upstream's does. It runs on its own task so a busy sync loop cannot starve it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use strake_types::http::Limits;
use tokio::net::TcpListener;

/// Binds the health endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn answer<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/healthz" | "/healthz/ping" => (StatusCode::OK, "ok"),
        _ => (StatusCode::NOT_FOUND, "404 page not found\n"),
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serves `/healthz` (and `/healthz/ping`) forever.
pub async fn serve(listener: TcpListener) {
    serve_with_limits(listener, Limits::default()).await
}

/// [`serve`] within `limits` (connection cap, header deadline, accept back-off).
pub async fn serve_with_limits(listener: TcpListener, limits: Limits) {
    let svc = hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(answer(&req)) });
    strake_types::http::serve(listener, limits, "kubelet healthz", svc).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        // A refused connection may already be reset: what it answers (nothing) tells.
        let _ = s.write_all(request.as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn healthz_answers_ok_and_unknown_paths_404() {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l));
        let ok = get(addr, "/healthz").await;
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("\r\n\r\nok"),
            "{ok}"
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }

    /// A client trickling its headers is hung up on; connections beyond the cap are closed.
    #[tokio::test]
    async fn slow_clients_are_cut_off_and_connections_capped() {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_with_limits(
            l,
            Limits {
                max_connections: 2,
                header_read_timeout: std::time::Duration::from_secs(1),
            },
        ));
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let hung_up = loop {
            tokio::select! {
                r = slow.read(&mut buf) => break r.map(|n| n == 0).unwrap_or(true),
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                    if slow.write_all(b"a").await.is_err() {
                        break true;
                    }
                }
            }
        };
        assert!(hung_up, "answered a request whose headers never ended");
        drop(slow);
        // The cap, on a server with a long header deadline (so the held ones stay).
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_with_limits(
            l,
            Limits {
                max_connections: 2,
                header_read_timeout: std::time::Duration::from_secs(600),
            },
        ));
        let mut idle = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            idle.push(s);
        }
        assert_eq!(get(addr, "/healthz").await, "", "served beyond the cap");
        drop(idle);
        let mut ok = String::new();
        for _ in 0..100 {
            ok = get(addr, "/healthz").await;
            if !ok.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok:?}");
    }
}
