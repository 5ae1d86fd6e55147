//! `strake-bench`: measurements of Strake side by side with its upstream peer, in one run on
//! one machine. `make bench` runs it with release builds; results go to stdout as a Markdown
//! table (and `docs/PERFORMANCE.md` quotes them). Nothing here asserts a speed: it measures.
//!
//! One subcommand per daemon, each in its own module:
//! - `runtime`: strake-runtime versus containerd ([`runtime`]).
//! - `kubelet`: strake-kubelet versus the upstream kubelet ([`kubelet`]).
//! - `proxy`: strake-proxy versus kube-proxy in nftables mode ([`proxy`]).

mod kubelet;
mod proxy;
mod runtime;

use anyhow::bail;

const USAGE: &str = "usage: strake-bench <runtime|proxy|kubelet> [OPTIONS]\n  runtime [--pods N]\n  proxy [--services 1000,10000,30000] [--endpoints 2,10] [--timeout SECS] [--probes N] [--proxies kube-proxy,strake-proxy]\n  kubelet [--pods 30,100] [--steady-secs 60] [--concurrency 10] [--logs DIR] [--only kubelet|strake-kubelet]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    match command.as_str() {
        "runtime" => runtime::run(rest),
        "proxy" => proxy::run(rest),
        "kubelet" => kubelet::run(rest),
        other => bail!("unknown benchmark {other:?}\n{USAGE}"),
    }
}
