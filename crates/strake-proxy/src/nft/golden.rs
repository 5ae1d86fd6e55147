//! Golden scripts: what the ruleset builder and the sync code write for the rulesets of
//! [`crate::testutil::corpus`], full and partial, kept in `testdata/golden.nft`. Any change to
//! the text the proxy writes shows up here as a diff to review.
//!
//! The file was written by the text builder that came before the typed objects of
//! [`crate::nft::objects`]; the scripts rendered from those are the same bytes, but for the
//! order of the elements within one `add element`/`delete element` command: typed keys sort
//! as values (`10.96.0.2` before `10.96.0.10`), text keys sorted as text. Neither nft nor the
//! kernel reads anything into that order, so the comparison sorts the elements of each such
//! command (the corpus has fewer than [`crate::nft::transaction::ELEMENT_CHUNK`] per set, one
//! command each).
//!
//! `STRAKE_UPDATE_GOLDEN=1 cargo test -p strake-proxy --lib golden` rewrites the file.

#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;

use crate::nft::ruleset::{Rules, Ruleset};
use crate::nft::transaction::{
    Transaction, full_script, full_script_of, full_transaction_of, partial_script,
    partial_transaction,
};
use crate::testutil::{Case, corpus};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/nft/testdata/golden.nft");
const GOLDEN_BATCHES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/src/nft/testdata/golden-batches.txt"
);

/// The ports of `new` replace those of `old` in `rules`, one by one, as the daemon does.
fn update(rules: &mut Rules, old: &Case, new: &Case) {
    let (old, new) = (old.model(), new.model());
    for (id, port) in &old.services {
        if !new.services.contains_key(id) {
            rules.update(Some(port), None);
        }
    }
    for (id, port) in &new.services {
        let before = old.services.get(id);
        if before != Some(port) {
            rules.update(before, Some(port));
        }
    }
}

/// Every transaction of the corpus, named: the full ones, then the partial ones between states.
fn transactions(mut each: impl FnMut(String, &Transaction<'_>)) {
    let cases = corpus();
    for case in &cases {
        let rules = case.rules();
        each(
            format!("full: {}", case.name),
            &full_transaction_of(&rules.views()),
        );
    }
    for (a, b) in [(0, 1), (1, 2), (2, 1), (1, 0), (0, 2)] {
        let (old, new) = (&cases[a], &cases[b]);
        let applied = Ruleset::build(&old.model(), &old.config);
        let desired = Ruleset::build(&new.model(), &new.config);
        let tx = partial_transaction(&applied, &desired).unwrap();
        each(format!("diff: {} -> {}", old.name, new.name), &tx);
    }
}

/// FNV-1a, 64 bits: a digest that needs no crate.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The netlink batch of every transaction of the corpus: its size and digest.
fn batches() -> String {
    let mut out = String::new();
    transactions(|name, tx| {
        let batch = crate::nft::netlink::encode::encode(tx, 1).unwrap();
        let _ = writeln!(
            out,
            "{name}: {} bytes, {} messages, fnv1a {:016x}",
            batch.bytes.len(),
            batch.commands.len(),
            fnv1a(&batch.bytes)
        );
    });
    out
}

/// The batches the netlink backend sends for the corpus are the golden ones, byte for byte
/// (as digests; the file was written when the typed encoder was proven to give the bytes of
/// the text encoder before it). Integers in native byte order: a little-endian host's.
#[test]
#[cfg(target_endian = "little")]
fn batches_are_the_golden_ones() {
    let now = batches();
    if std::env::var_os("STRAKE_UPDATE_GOLDEN").is_some() {
        std::fs::write(GOLDEN_BATCHES, &now).unwrap();
        return;
    }
    assert_eq!(now, std::fs::read_to_string(GOLDEN_BATCHES).unwrap());
}

/// Every script of the corpus, in one text.
pub(crate) fn scripts() -> String {
    let cases = corpus();
    let mut out = String::new();
    for case in &cases {
        let rules = case.rules();
        let script = full_script_of(&rules.views());
        assert_eq!(script, full_script(&rules.materialize()), "{}", case.name);
        let _ = write!(out, "### full: {}\n{script}", case.name);
    }
    // Partial syncs between the states of one configuration, both ways.
    for (a, b) in [(0, 1), (1, 2), (2, 1), (1, 0), (0, 2)] {
        let (old, new) = (&cases[a], &cases[b]);
        let applied = Ruleset::build(&old.model(), &old.config);
        let desired = Ruleset::build(&new.model(), &new.config);
        let diff = partial_script(&applied, &desired).unwrap();
        let _ = write!(out, "### diff: {} -> {}\n{diff}", old.name, new.name);
        let mut rules = old.rules();
        rules.discard_delta();
        update(&mut rules, old, new);
        let (before, after) = rules.take_delta();
        let delta = partial_script(&before, &after).unwrap();
        let _ = write!(out, "### delta: {} -> {}\n{delta}", old.name, new.name);
    }
    out
}

/// `text` with the elements of each element command sorted.
fn elements_sorted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let is_elements = line.starts_with("add element ") || line.starts_with("delete element ");
        match line.split_once(" { ") {
            Some((head, items)) if is_elements => {
                let items = items.strip_suffix(" }").unwrap();
                let mut items: Vec<&str> = items.split(", ").collect();
                items.sort_unstable();
                let _ = writeln!(out, "{head} {{ {} }}", items.join(", "));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn scripts_are_the_golden_ones() {
    let now = scripts();
    if std::env::var_os("STRAKE_UPDATE_GOLDEN").is_some() {
        std::fs::write(GOLDEN, &now).unwrap();
        return;
    }
    let golden = elements_sorted(&std::fs::read_to_string(GOLDEN).unwrap());
    let now = elements_sorted(&now);
    if now != golden {
        let (n, g): (Vec<&str>, Vec<&str>) = (now.lines().collect(), golden.lines().collect());
        let first = n
            .iter()
            .zip(&g)
            .position(|(a, b)| a != b)
            .unwrap_or(n.len().min(g.len()));
        panic!(
            "scripts differ from {GOLDEN} at line {}:\nnow:    {:?}\ngolden: {:?}",
            first + 1,
            n.get(first),
            g.get(first)
        );
    }
}
