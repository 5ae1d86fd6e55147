//! The child process of `tests/image_pull.rs`'s `a_pull_killed_with_sigkill_*`: opens an image
//! store and pulls one image, which the test kills (SIGKILL) mid-write. A binary of its own,
//! not a `#[test]`, so that it does not count as a test.
//!
//! Usage: `strake-runtime-test-pull STORE INSECURE_REGISTRY REFERENCE`.

use std::process::ExitCode;

use strake_runtime::image::{ImageService, PullAuth, PullConfig, error_chain};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, insecure, reference] = args.as_slice() else {
        eprintln!("usage: STORE INSECURE_REGISTRY REFERENCE (got {args:?})");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let config = PullConfig {
            insecure_registries: vec![insecure.clone()],
            ..Default::default()
        };
        let svc = ImageService::open(store, config, |_: &str| false).await?;
        svc.pull(reference, &PullAuth::default()).await
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pull {reference}: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
