//! `strake-proxy`: parses flags, sets up logging and hands over to the library.

use clap::Parser;
use strake_proxy::App;
use strake_proxy::config::{DaemonConfig, Flags};

#[derive(Parser)]
#[command(name = "strake-proxy", version, about)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    #[command(flatten)]
    log: strake_types::logging::LogArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init()?;
    let config = DaemonConfig::load(&cli.flags)?;
    if config.cleanup {
        strake_proxy::cleanup(strake_proxy::nft::backend(config.nft_backend).as_ref())?;
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let app = App::build(config).await?;
        app.run(async {
            strake_types::shutdown::signal().await;
        })
        .await?;
        anyhow::Ok(())
    })
}
