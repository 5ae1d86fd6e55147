//! Logging setup shared by the daemons: text for people, JSON for machines.
//!
//! Every daemon flattens [`LogArgs`] into its clap arguments and calls [`LogArgs::init`] once,
//! before it does anything else.

use tracing_subscriber::EnvFilter;

/// Output format of the log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the structured fields as keys.
    Json,
}

/// The logging flags common to all Strake daemons.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log filter: a level (`info`, `debug`, ...) or a `tracing` directive list such as
    /// `info,strake_runtime=debug`. `RUST_LOG`, when set, wins.
    #[arg(long = "log-level", default_value = "info")]
    pub level: String,
    /// `text` for people, `json` for log collectors.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The filter given by `--log-level` or `RUST_LOG` does not parse.
    #[error("invalid log filter {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was installed already.
    #[error("logging was initialised twice")]
    AlreadySet(#[source] tracing_subscriber::util::TryInitError),
}

impl LogArgs {
    /// The filter in force: `RUST_LOG` if set, else `--log-level`.
    pub fn filter(&self) -> Result<EnvFilter, LogError> {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| self.level.clone());
        EnvFilter::try_new(&filter).map_err(|source| LogError::Filter { filter, source })
    }

    /// Installs the global `tracing` subscriber, writing to stderr (journald picks it up under
    /// systemd).
    pub fn init(&self) -> Result<(), LogError> {
        use tracing_subscriber::util::SubscriberInitExt;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(self.filter()?)
            .with_writer(std::io::stderr);
        match self.format {
            LogFormat::Text => builder.finish().try_init(),
            LogFormat::Json => builder.json().flatten_event(true).finish().try_init(),
        }
        .map_err(LogError::AlreadySet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn flags_parse_with_upstream_like_defaults() {
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.log.level, "info");
        assert_eq!(cli.log.format, LogFormat::Text);
        let cli = Cli::parse_from(["x", "--log-level=debug", "--log-format=json"]);
        assert_eq!(cli.log.level, "debug");
        assert_eq!(cli.log.format, LogFormat::Json);
    }

    #[test]
    fn bad_filter_is_a_clear_error() {
        let args = LogArgs {
            level: "info,=[".into(),
            format: LogFormat::Text,
        };
        // RUST_LOG would override the flag; this test only runs the flag path when unset.
        if std::env::var_os("RUST_LOG").is_none() {
            let err = args.filter().expect_err("filter must be rejected");
            assert!(err.to_string().contains("invalid log filter"), "{err}");
        }
    }
}
