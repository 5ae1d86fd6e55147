//! `strake-runtime`: parses flags, sets up logging and hands over to the library.

use clap::Parser;

#[derive(Parser)]
#[command(name = "strake-runtime", version, about)]
struct Cli {
    #[command(flatten)]
    log: strake_types::logging::LogArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init()?;
    strake_runtime::run()?;
    Ok(())
}
