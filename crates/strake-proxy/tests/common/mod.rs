//! What the data-plane and netlink tests share.

use strake_proxy::nft::Nft;
use strake_proxy::nft::ruleset::Ruleset;
use strake_proxy::nft::transaction::{SyncError, SyncReport, apply_sync, partial_transaction};

/// What the proxy keeps between syncs, for whole rulesets (the daemon's `Programmer` keeps it
/// per Service port): the ruleset the kernel holds, forgotten after a failure, so the next
/// sync is full.
#[derive(Debug, Default)]
pub struct Applied(pub Option<Ruleset>);

impl Applied {
    /// Brings the kernel from the held ruleset to `desired`: their difference, or all of it.
    pub fn sync(&mut self, nft: &dyn Nft, desired: Ruleset) -> Result<SyncReport, SyncError> {
        let partial = self
            .0
            .as_ref()
            .and_then(|applied| partial_transaction(applied, &desired));
        let report = apply_sync(nft, partial, || desired.views());
        self.0 = report.is_ok().then_some(desired);
        report
    }
}
