//! The netlink [`Nft`] backend: each sync becomes one nf_tables netlink batch
//! (`NFNL_MSG_BATCH_BEGIN` ... `END`), sent in one `sendmsg`, so the kernel applies it as one
//! transaction or not at all. No `nft` process runs and nothing is listed or dumped.
//!
//! [`encode`] turns the typed transaction [`crate::nft::transaction`] plans into messages,
//! [`socket`] sends them and collects the kernel's answers, and [`wire`] holds the
//! protocol's numbers. Hand-written rather than a crate: no Rust crate we found encodes
//! `fib`, `numgen`, `dynset` and concatenated verdict-map keys, and `nftnl` needs the C
//! library; the encoding itself is plain TLV.
//!
//! - Atomicity: a full sync (both tables replaced) is one batch however large; the send
//!   buffer is raised to fit it (`SO_SNDBUFFORCE`, as nft does). Only element lists are split,
//!   into several messages of the same batch, to stay under the 64 KiB limit of a nested
//!   attribute.
//! - Answers: only the last command asks for an ACK; the kernel reports every refused message
//!   (with its extended-ACK reason) and a refused commit against `BATCH_BEGIN`. Each refusal is
//!   mapped back to its command, rendered as the line of the equivalent script
//!   ([`NftError::Rejected`]); the kernel then keeps the previous ruleset, and the next sync
//!   is full.
//! - Element keys and values are typed: they are encoded as they are, with no memory of the
//!   sets' declarations between syncs.
//! - Ownership: a command names no table but the family's own (`ip strake-proxy`,
//!   `ip6 strake-proxy`): no other can be written.
//!
//! Measured with `examples/netlink_bench.rs`. What bounds a one-change sync at 10k Services is
//! no longer nft but the kernel: a transaction that adds any rule, or a verdict-map element
//! that jumps to a chain, makes the commit re-validate the whole table from its base chains
//! (~0.2 s of CPU at 10k Services x 10 endpoints, O(chains + rules)); transactions of plain
//! elements or deletions cost milliseconds.

pub mod encode;
pub mod socket;
pub mod wire;

use std::path::PathBuf;
use std::sync::Mutex;

use crate::model::IpFamily;
use crate::nft::netlink::socket::Socket;
use crate::nft::transaction::Transaction;
use crate::nft::{Nft, NftCommand, NftError};

/// One refused command of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The command, as a line of the equivalent script (`commit` when the kernel refused the
    /// whole transaction at commit).
    pub command: String,
    /// The errno the kernel answered.
    pub errno: i32,
    /// The kernel's extended-ACK message, if it gave one.
    pub message: Option<String>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reason = std::io::Error::from_raw_os_error(self.errno);
        write!(f, "{}: {reason}", self.command)?;
        if let Some(m) = &self.message {
            write!(f, " ({m})")?;
        }
        Ok(())
    }
}

/// The refusals as one line, for error messages.
pub fn describe(refusals: &[Refusal]) -> String {
    let shown: Vec<String> = refusals.iter().take(5).map(|r| r.to_string()).collect();
    let mut text = shown.join("; ");
    if refusals.len() > 5 {
        text.push_str(&format!("; and {} more", refusals.len() - 5));
    }
    text
}

#[derive(Debug, Default)]
struct State {
    socket: Option<Socket>,
    seq: u32,
}

/// The [`Nft`] that talks nf_tables netlink, optionally inside a network namespace.
#[derive(Debug)]
pub struct NftNetlink {
    netns: Option<PathBuf>,
    state: Mutex<State>,
    lister: NftCommand,
}

impl Default for NftNetlink {
    fn default() -> Self {
        Self::new()
    }
}

impl NftNetlink {
    /// Programs the caller's network namespace.
    pub fn new() -> Self {
        NftNetlink {
            netns: None,
            state: Mutex::new(State::default()),
            lister: NftCommand::new(),
        }
    }

    /// Programs the network namespace pinned at `path`.
    pub fn in_netns(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        NftNetlink {
            lister: NftCommand::in_netns(path.clone()),
            netns: Some(path),
            state: Mutex::new(State::default()),
        }
    }

    /// Uses `program` instead of `nft` for [`Nft::list_table`] (diagnostics only).
    pub fn with_list_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.lister = self.lister.with_program(program);
        self
    }
}

impl Nft for NftNetlink {
    fn apply(&self, tx: &Transaction<'_>) -> Result<usize, NftError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first_seq = state.seq.wrapping_add(1);
        let batch = encode::encode(tx, first_seq).map_err(|source| NftError::Encode { source })?;
        state.seq = first_seq.wrapping_add(batch.commands.len() as u32 + 1);
        if batch.commands.is_empty() {
            return Ok(0);
        }
        if state.socket.is_none() {
            let socket =
                Socket::open(self.netns.as_deref()).map_err(|source| NftError::Netlink {
                    op: "open socket",
                    source,
                })?;
            state.socket = Some(socket);
        }
        let result = send(&mut state, &batch, tx);
        if let Err(NftError::Netlink { .. }) = &result {
            // A broken socket is replaced on the next apply.
            state.socket = None;
        }
        result.map(|()| batch.bytes.len())
    }

    fn list_table(&self, family: IpFamily, name: &str) -> Result<String, NftError> {
        self.lister.list_table(family, name)
    }
}

fn send(state: &mut State, batch: &encode::Batch, tx: &Transaction<'_>) -> Result<(), NftError> {
    let Some(socket) = state.socket.as_mut() else {
        return Err(NftError::Netlink {
            op: "open socket",
            source: std::io::Error::other("no socket"),
        });
    };
    let netlink = |op| move |source| NftError::Netlink { op, source };
    // Anything left from an earlier, interrupted exchange is not about this batch.
    socket.drain().map_err(netlink("drain socket"))?;
    socket.send(&batch.bytes).map_err(netlink("send batch"))?;
    let answers = socket.drain().map_err(netlink("read answers"))?;
    let mut refusals = Vec::new();
    let mut acked = false;
    for answer in &answers {
        if answer.errno == 0 {
            acked |= Some(answer.seq) == batch.last_seq;
            continue;
        }
        let command = match batch.command_of(answer.seq) {
            Some(i) => match tx.commands.get(i) {
                Some(command) => format!("line {}: {command}", i + 1),
                None => format!("line {}", i + 1),
            },
            None => "commit".to_string(),
        };
        refusals.push(Refusal {
            command,
            errno: answer.errno,
            message: answer.message.clone(),
        });
    }
    if !refusals.is_empty() {
        return Err(NftError::Rejected { refusals });
    }
    if !acked {
        return Err(NftError::Netlink {
            op: "read answers",
            source: std::io::Error::other(format!(
                "no acknowledgement for the batch among {} answers",
                answers.len()
            )),
        });
    }
    Ok(())
}
