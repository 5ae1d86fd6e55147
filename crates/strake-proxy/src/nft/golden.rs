//! Golden scripts: what the ruleset builder and the sync code write for the rulesets of
//! [`crate::testutil::corpus`], full and partial, kept in `testdata/golden.nft`. Any change to
//! the text the proxy writes shows up here as a diff to review.
//!
//! The file was written by the text builder that came before the typed objects of
//! [`crate::nft::objects`]; the scripts rendered from those are the same bytes, but for the
//! order of the elements within one `add element`/`delete element` command: typed keys sort
//! as values (`10.96.0.2` before `10.96.0.10`), text keys sorted as text. Neither nft nor the
//! kernel reads anything into that order, so the comparison sorts the elements of each such
//! command (the corpus has fewer than [`crate::nft::sync::ELEMENT_CHUNK`] per set, one
//! command each).
//!
//! `STRAKE_UPDATE_GOLDEN=1 cargo test -p strake-proxy --lib golden` rewrites the file.

#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;

use crate::nft::ruleset::{Rules, Ruleset};
use crate::nft::sync::{full_script, full_script_of, partial_script};
use crate::testutil::{Case, corpus};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/nft/testdata/golden.nft");

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
