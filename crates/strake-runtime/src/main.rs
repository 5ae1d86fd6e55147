//! `strake-runtime`: parses flags, sets up logging and hands over to the library.

use clap::Parser;
use strake_runtime::{App, config::Config, config::Flags};

#[derive(Parser)]
#[command(name = "strake-runtime", version, about)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    #[command(flatten)]
    log: strake_types::logging::LogArgs,
}

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main, before the async runtime or any other thread exists.
    unsafe { strake_types::notify::take_from_env() };
    let cli = Cli::parse();
    cli.log.init()?;
    let config = Config::load(&cli.flags)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let app = App::build(config).await?;
        app.run(async {
            strake_types::shutdown::signal().await;
            tracing::info!("shutting down; sandboxes and containers keep running");
        })
        .await?;
        anyhow::Ok(())
    })
}
