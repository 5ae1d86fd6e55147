//! `strake-bench`: measurements of Strake side by side with its upstream peer, in one run on
//! one machine. `make bench` runs it with release builds; results go to stdout as a Markdown
//! table (and `docs/PERFORMANCE.md` quotes them). Nothing here asserts a speed: it measures.
//!
//! One subcommand per daemon, each in its own module:
//! - `runtime`: strake-runtime versus containerd ([`runtime`]).

mod runtime;

use anyhow::bail;

const USAGE: &str = "usage: strake-bench <runtime> [OPTIONS]\n  runtime [--pods N]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    match command.as_str() {
        "runtime" => runtime::run(rest),
        other => bail!("unknown benchmark {other:?}\n{USAGE}"),
    }
}
