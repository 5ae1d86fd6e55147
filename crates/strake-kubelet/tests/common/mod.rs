//! Shared by the kubelet's integration tests. The node itself (a runtime and strake-kubelet in a
//! node namespace) is `strake_integration::kubelet::KubeletNode`.

#![allow(dead_code)]

use std::time::Duration;

#[allow(unused_imports)] // each test file uses a different part
pub use strake_integration::kubelet::{KubeletNode, RuntimeKind};

/// Polls `f` every 250 ms until it yields a value; panics after `secs`.
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out after {secs} s waiting for {what}");
}
