//! `strake-proxy`: parses flags, sets up logging and hands over to the library.

use clap::Parser;

#[derive(Parser)]
#[command(name = "strake-proxy", version, about)]
struct Cli {
    #[command(flatten)]
    log: strake_types::logging::LogArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init()?;
    strake_proxy::run()?;
    Ok(())
}
