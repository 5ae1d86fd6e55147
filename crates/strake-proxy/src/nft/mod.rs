//! The nftables data plane: the desired ruleset ([`ruleset`]) made of typed objects
//! ([`objects`]), the transactions that get it into the kernel ([`transaction`]) and the
//! [`Nft`] seam, the only code that touches the kernel's rules: [`netlink::NftNetlink`] (the
//! default) or [`NftCommand`] (the `nft` program).
//!
//! Transactions are typed commands whichever backend carries them: the netlink backend
//! encodes them as nf_tables messages the way nft linearises the same statements, and
//! `nft -f` reads them rendered in its text syntax, so both leave identical tables. Text is
//! only ever written (for `nft -f`, logs and tests), never parsed.
//!
//! Why not the `nftables` crate's JSON (`nft -j -f`): measured with `examples/syntax_bench.rs`
//! at 10k Services x 10 endpoints (nft 1.0.6), the text full sync is generated in 0.07 s
//! (45 MB) and loaded in 6.7 s; the JSON document for the same per-Service objects (fewer fixed
//! ones) takes 0.48 s to build (91 MB) and 10.8 s to load. JSON also cannot express what the
//! ruleset needs: the crate has no `verdict` set type and nft 1.0.6's JSON parser refuses a
//! numgen-keyed named map ("unqualified type integer").
//!
//! Why netlink by default: the `nft` program costs ~0.35-0.5 s per run at that size whatever
//! the change, because it dumps the table's chains and sets before applying a script, and
//! spends most of the 6.7 s of a full load in its own parser and evaluator. The netlink
//! backend sends one batch per sync and lists nothing (figures in [`netlink`]).

#[cfg(test)]
mod golden;
pub mod netlink;
pub mod objects;
pub mod ruleset;
pub mod transaction;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use crate::model::IpFamily;
use crate::nft::transaction::Transaction;

/// The name of both tables the proxy owns (`ip strake-proxy` and `ip6 strake-proxy`).
pub const TABLE: &str = "strake-proxy";

/// The nftables family keyword of an IP family's table.
pub fn family_keyword(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// An nft invocation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` (or `nsenter` wrapping it) could not run, or ran and failed.
    #[error(transparent)]
    Command(#[from] strake_types::command::CommandError),
    /// The transaction holds a command the netlink backend cannot encode; nothing was sent.
    #[error("encode the transaction as netlink messages")]
    Encode {
        /// The offending command.
        #[source]
        source: netlink::encode::EncodeError,
    },
    /// The netlink socket could not be opened, written or read.
    #[error("netlink: {op}")]
    Netlink {
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the transaction; it applied none of it.
    #[error("the kernel refused the transaction: {}", netlink::describe(refusals))]
    Rejected {
        /// Each refused command, in batch order.
        refusals: Vec<netlink::Refusal>,
    },
}

/// The backend `--nft-backend` names, programming the caller's network namespace.
pub fn backend(kind: crate::config::NftBackend) -> std::sync::Arc<dyn Nft> {
    match kind {
        crate::config::NftBackend::Netlink => std::sync::Arc::new(netlink::NftNetlink::new()),
        crate::config::NftBackend::Nft => std::sync::Arc::new(NftCommand::new()),
    }
}

/// The seam to nftables: everything the proxy does to the kernel's rules goes through here.
pub trait Nft: Send + Sync {
    /// Applies `tx` as one atomic transaction. Returns the size of what was sent (the
    /// netlink batch, or the script).
    fn apply(&self, tx: &Transaction<'_>) -> Result<usize, NftError>;

    /// Lists one table in text syntax. For tests and diagnostics only: syncs never list.
    fn list_table(&self, family: IpFamily, name: &str) -> Result<String, NftError>;

    /// Whether a partial sync may add rules that look up a `typeof` data map created by an
    /// earlier transaction. `nft` 1.0.6 cannot: it rebuilds the map's value type from the
    /// kernel and then refuses its `th dport` ("conflicting protocols specified"), so through
    /// it such a sync (a new shared dispatch chain, i.e. a new endpoint count) is a full one.
    fn rules_on_existing_data_maps(&self) -> bool {
        true
    }
}

/// The real [`Nft`]: runs the `nft` binary, optionally inside a network namespace.
#[derive(Debug, Clone)]
pub struct NftCommand {
    program: PathBuf,
    netns: Option<PathBuf>,
}

impl Default for NftCommand {
    fn default() -> Self {
        Self::new()
    }
}

impl NftCommand {
    /// Runs `nft` from the standard system paths in the caller's network namespace.
    pub fn new() -> Self {
        NftCommand {
            program: PathBuf::from("nft"),
            netns: None,
        }
    }

    /// Runs `nft` inside the network namespace pinned at `path`, through
    /// `nsenter --net=PATH` (which enters no other namespace).
    pub fn in_netns(path: impl Into<PathBuf>) -> Self {
        NftCommand {
            program: PathBuf::from("nft"),
            netns: Some(path.into()),
        }
    }

    /// Uses `program` instead of `nft` from `PATH`.
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                let mut net = OsString::from("--net=");
                net.push(ns);
                cmd.arg(net).arg("--").arg(&self.program);
                cmd
            }
            None => Command::new(&self.program),
        };
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C");
        cmd
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
        let ran = strake_types::command::run(&mut self.command(args), stdin.map(str::as_bytes))?
            .success()?;
        Ok(String::from_utf8_lossy(&ran.stdout).into_owned())
    }
}

impl Nft for NftCommand {
    fn apply(&self, tx: &Transaction<'_>) -> Result<usize, NftError> {
        let script = tx.to_string();
        self.run(&["-f", "/dev/stdin"], Some(&script))?;
        Ok(script.len())
    }

    fn rules_on_existing_data_maps(&self) -> bool {
        false
    }

    fn list_table(&self, family: IpFamily, name: &str) -> Result<String, NftError> {
        self.run(&["list", "table", family_keyword(family), name], None)
    }
}

/// A fake [`Nft`] that records transactions as scripts; can be told to fail.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct RecordingNft {
    pub scripts: std::sync::Mutex<Vec<String>>,
    pub fail_next: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl RecordingNft {
    pub fn scripts(&self) -> Vec<String> {
        self.scripts.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
impl Nft for RecordingNft {
    fn apply(&self, tx: &Transaction<'_>) -> Result<usize, NftError> {
        let script = tx.to_string();
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(strake_types::command::CommandError::spawn(
                "nft",
                std::io::Error::other("told to fail"),
            )
            .into());
        }
        let bytes = script.len();
        if let Ok(mut s) = self.scripts.lock() {
            s.push(script);
        }
        Ok(bytes)
    }

    fn list_table(&self, _family: IpFamily, _name: &str) -> Result<String, NftError> {
        Ok(String::new())
    }
}
