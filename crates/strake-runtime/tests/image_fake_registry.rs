//! Pulls from a small in-test registry (plain HTTP/1.1 over loopback) that serves a real
//! manifest, config and layer, and can misbehave on purpose: hang, reset the connection or send
//! wrong bytes mid-layer (each must give a retryable error, no record and no blob, whole or
//! partial), or demand a bearer token from its token endpoint; and serves as a mirror of
//! another registry. No root needed.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use strake_runtime::image::{Digest, Endpoint, ErrorCode, ImageService, PullAuth, PullConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GOOD: u8 = 0;
const HANG: u8 = 1;
const RESET: u8 = 2;
const CORRUPT: u8 = 3;

const TOKEN: &str = "good-token";
/// `base64("strake:secret")`, what the token endpoint accepts as basic credentials.
const BASIC: &str = "c3RyYWtlOnNlY3JldA==";

struct Image {
    manifest: Vec<u8>,
    config: Vec<u8>,
    layer: Vec<u8>,
}

fn image() -> Image {
    // Incompressible-ish content, so the layer is big enough to cut in half.
    let mut data = Vec::with_capacity(256 * 1024);
    let mut x: u32 = 1;
    while data.len() < 256 * 1024 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, "data.bin", &data[..]).expect("tar");
    let tar = b.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let layer = gz.finish().expect("gzip");
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"User":"1000"}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        Digest::sha256_of(&tar)
    )
    .into_bytes();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
        Digest::sha256_of(&config),
        config.len(),
        Digest::sha256_of(&layer),
        layer.len()
    )
    .into_bytes();
    Image {
        manifest,
        config,
        layer,
    }
}

async fn serve(listener: TcpListener, image: Arc<Image>, mode: Arc<AtomicU8>, bearer: bool) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(connection(conn, image.clone(), mode.clone(), bearer));
    }
}

async fn connection(mut conn: TcpStream, image: Arc<Image>, mode: Arc<AtomicU8>, bearer: bool) {
    let Ok(me) = conn.local_addr() else { return };
    let mut buf = Vec::new();
    loop {
        // Read one request head.
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 4);
                break head;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        let authorization = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("authorization")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        if bearer && path.starts_with("/token") {
            let (status, body) = if authorization == format!("Basic {BASIC}") {
                (
                    "200 OK",
                    format!(r#"{{"token":"{TOKEN}","access_token":"{TOKEN}"}}"#),
                )
            } else {
                (
                    "401 Unauthorized",
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}"#.to_string(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if conn.write_all(head.as_bytes()).await.is_err()
                || conn.write_all(body.as_bytes()).await.is_err()
            {
                return;
            }
            continue;
        }
        if bearer && authorization != format!("Bearer {TOKEN}") {
            let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#;
            let head = format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nWWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"fake\",scope=\"repository:test/img:pull\"\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if conn.write_all(head.as_bytes()).await.is_err()
                || conn.write_all(body.as_bytes()).await.is_err()
            {
                return;
            }
            continue;
        }
        let layer_path = format!("/v2/test/img/blobs/{}", Digest::sha256_of(&image.layer));
        let config_path = format!("/v2/test/img/blobs/{}", Digest::sha256_of(&image.config));
        let (status, ctype, body): (&str, &str, Vec<u8>) = if path == "/v2/" {
            ("200 OK", "application/json", b"{}".to_vec())
        } else if path == "/v2/test/img/manifests/1" {
            (
                "200 OK",
                "application/vnd.oci.image.manifest.v1+json",
                image.manifest.clone(),
            )
        } else if path == config_path {
            ("200 OK", "application/octet-stream", image.config.clone())
        } else if path == layer_path {
            let mode = mode.load(Ordering::SeqCst);
            let mut body = image.layer.clone();
            if mode == CORRUPT {
                let mid = body.len() / 2;
                body[mid] ^= 0xff;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if conn.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            match mode {
                HANG | RESET => {
                    let _ = conn.write_all(&body[..body.len() / 2]).await;
                    let _ = conn.flush().await;
                    if mode == HANG {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    // Dropping with unread input makes the kernel send a reset.
                    return;
                }
                _ => {
                    if conn.write_all(&body).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        } else {
            (
                "404 Not Found",
                "application/json",
                br#"{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}"#.to_vec(),
            )
        };
        let digest_header = if status.starts_with("200") && path != "/v2/" {
            format!("Docker-Content-Digest: {}\r\n", Digest::sha256_of(&body))
        } else {
            String::new()
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{digest_header}Content-Length: {}\r\n\r\n",
            body.len()
        );
        if conn.write_all(head.as_bytes()).await.is_err() || conn.write_all(&body).await.is_err() {
            return;
        }
    }
}

fn blob_names(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_faults_mid_layer_are_retryable_and_leave_no_blob() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let image = Arc::new(image());
    let layer_hex = Digest::sha256_of(&image.layer).hex().to_string();
    let mode = Arc::new(AtomicU8::new(GOOD));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve(listener, image.clone(), mode.clone(), false));

    let dir = tempfile::tempdir().expect("tempdir");
    let config = PullConfig {
        insecure_registries: vec![addr.to_string()],
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let svc = ImageService::open(dir.path(), config, |_: &str| false)
        .await
        .expect("open");
    let reference = format!("{addr}/test/img:1");

    for (fault, name) in [(HANG, "hang"), (RESET, "reset"), (CORRUPT, "corrupt")] {
        mode.store(fault, Ordering::SeqCst);
        let started = Instant::now();
        let err = svc
            .pull(&reference, &PullAuth::default())
            .await
            .expect_err(name);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: took {:?}",
            started.elapsed()
        );
        eprintln!("{name}: {}", strake_runtime::image::error_chain(&err));
        assert!(err.is_retryable(), "{name}: not retryable: {err:?}");
        assert_eq!(err.code(), ErrorCode::Unavailable, "{name}: {err:?}");
        assert!(svc.list().is_empty(), "{name}: record published");
        // The writer thread drops its temp file as soon as it sees the stream end.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let names = blob_names(dir.path());
            let bad = names
                .iter()
                .any(|n| n.starts_with(".tmp-") || *n == layer_hex);
            if !bad {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: left {names:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The registry recovers; the same service pulls the image whole.
    mode.store(GOOD, Ordering::SeqCst);
    let id = svc
        .pull(&reference, &PullAuth::default())
        .await
        .expect("pull after faults");
    assert_eq!(id, Digest::sha256_of(&image.config).to_string());
    let record = svc.status(&reference).expect("status");
    assert_eq!(record.uid, Some(1000));
    assert!(blob_names(dir.path()).contains(&layer_hex));
    let lowers = svc.lower_dirs(&id).expect("lowers");
    assert_eq!(
        std::fs::metadata(lowers[0].join("data.bin"))
            .expect("data.bin")
            .len(),
        256 * 1024
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_with_basic_credentials_at_the_token_endpoint() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let image = Arc::new(image());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve(
        listener,
        image.clone(),
        Arc::new(AtomicU8::new(GOOD)),
        true,
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = PullConfig {
        insecure_registries: vec![addr.to_string()],
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let svc = ImageService::open(dir.path(), config, |_: &str| false)
        .await
        .expect("open");
    let reference = format!("{addr}/test/img:1");
    let err = svc
        .pull(&reference, &PullAuth::default())
        .await
        .expect_err("anonymous pull got a token");
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err:?}");
    let err = svc
        .pull(&reference, &PullAuth::basic("strake", "wrong"))
        .await
        .expect_err("wrong password got a token");
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err:?}");
    // The CRI `auth` form of the right credentials.
    let auth = PullAuth {
        auth: BASIC.to_string(),
        ..Default::default()
    };
    let id = svc
        .pull(&reference, &auth)
        .await
        .expect("pull with a token");
    assert_eq!(id, Digest::sha256_of(&image.config).to_string());
    server.abort();
}

/// A loopback port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_serves_another_registrys_image_under_the_original_name() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let image = Arc::new(image());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mirror = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve(
        listener,
        image.clone(),
        Arc::new(AtomicU8::new(GOOD)),
        false,
    ));
    // The registry itself and the first mirror refuse connections: the pull must go on to
    // the second mirror, and never needs the registry.
    let upstream = format!("127.0.0.1:{}", closed_port().await);
    let dead_mirror = format!("http://127.0.0.1:{}", closed_port().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = PullConfig {
        mirrors: [(
            upstream.clone(),
            vec![
                Endpoint::parse(&dead_mirror).expect("endpoint"),
                Endpoint::parse(&format!("http://{mirror}")).expect("endpoint"),
            ],
        )]
        .into(),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let svc = ImageService::open(dir.path(), config, |_: &str| false)
        .await
        .expect("open");
    let reference = format!("{upstream}/test/img:1");
    let id = svc
        .pull(&reference, &PullAuth::default())
        .await
        .unwrap_or_else(|e| panic!("pull: {}", strake_runtime::image::error_chain(&e)));
    assert_eq!(id, Digest::sha256_of(&image.config).to_string());
    // Named as asked (containerd does the same), never after the mirror.
    let record = svc.status(&reference).expect("status by the original name");
    assert_eq!(record.repo_tags, std::slice::from_ref(&reference));
    assert_eq!(
        record.repo_digests,
        [format!(
            "{upstream}/test/img@{}",
            Digest::sha256_of(&image.manifest)
        )]
    );
    assert!(svc.status(&format!("{mirror}/test/img:1")).is_none());
    assert_eq!(svc.list().len(), 1);

    // What no mirror has fails with the registry's own error (here: unreachable).
    let err = svc
        .pull(&format!("{upstream}/test/missing:1"), &PullAuth::default())
        .await
        .expect_err("pulled an image no endpoint has");
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err:?}");
    server.abort();

    // Credentials are the named registry's: a mirror that demands them (they would get a
    // token here) is asked anonymously, refuses, and the pull goes on to the registry.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let guarded = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve(
        listener,
        image.clone(),
        Arc::new(AtomicU8::new(GOOD)),
        true,
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = PullConfig {
        mirrors: [(
            upstream.clone(),
            vec![Endpoint::parse(&format!("http://{guarded}")).expect("endpoint")],
        )]
        .into(),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let svc = ImageService::open(dir.path(), config, |_: &str| false)
        .await
        .expect("open");
    let auth = PullAuth {
        auth: BASIC.to_string(),
        ..Default::default()
    };
    let err = svc
        .pull(&reference, &auth)
        .await
        .expect_err("the registry's credentials reached the mirror");
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err:?}");
    server.abort();
}
