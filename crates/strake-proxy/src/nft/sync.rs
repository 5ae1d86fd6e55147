//! Getting the desired [`Ruleset`] into the kernel: one atomic transaction per sync, written
//! as an nft script and carried by an [`Nft`] backend (one netlink batch, or one `nft -f`).
//!
//! The [`Syncer`] remembers what it last applied successfully. A partial sync sends only the
//! difference between that and the desired state; a full sync (the first one, the one after a
//! failure, a periodic one, or one whose difference cannot be expressed, such as a changed set
//! declaration) replaces both tables in one transaction (`add table`, `delete table`, then the
//! whole content), so no packet ever sees a half-written table. The kernel's ruleset is never
//! listed to compute a sync.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::IpFamily;
use crate::nft::objects::{Key, Syntax as _, Value};
use crate::nft::ruleset::{Chain, Ruleset, Set, Table, TableView, table_ref};
use crate::nft::{Nft, NftError, TABLE, family_keyword};

/// Map and set elements per `add element` / `delete element` command; keeps lines (and nft's
/// parser buffers) bounded for huge maps while staying in the same transaction.
pub const ELEMENT_CHUNK: usize = 1000;

/// A sync that did not reach the kernel.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The kernel (or `nft`) refused the transaction, or it could not be sent; the kernel keeps
    /// its previous ruleset and the next sync is a full one.
    #[error("apply {} ruleset ({bytes} bytes)", if *.full { "full" } else { "partial" })]
    ApplyRuleset {
        /// Whether this was a full sync.
        full: bool,
        /// Size of the script.
        bytes: usize,
        /// Why it failed.
        #[source]
        source: NftError,
    },
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Whether both tables were rewritten.
    pub full: bool,
    /// Size of the script sent (0 when nothing changed and nothing was sent).
    pub bytes: usize,
    /// Commands in the script.
    pub commands: usize,
}

/// Keeps the last applied ruleset and turns desired states into nft transactions.
#[derive(Debug, Default)]
pub struct Syncer {
    applied: Option<Ruleset>,
}

impl Syncer {
    /// A syncer that has applied nothing yet (its first sync is full).
    pub fn new() -> Self {
        Syncer { applied: None }
    }

    /// The ruleset last applied successfully, if the kernel is known to hold it.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Forgets the applied state, so that the next sync is full (e.g. on a period).
    pub fn force_full(&mut self) {
        self.applied = None;
    }

    /// The script that would bring the kernel from the last applied state to `desired`, and
    /// whether it is a full rewrite. An empty script means nothing to do.
    pub fn plan(&self, desired: &Ruleset) -> (String, bool) {
        match &self.applied {
            Some(applied) => match partial_script(applied, desired) {
                Some(script) => (script, false),
                None => (full_script(desired), true),
            },
            None => (full_script(desired), true),
        }
    }

    /// Applies `desired` through `nft` (either backend) as one transaction. On failure the applied state is
    /// forgotten, so the next sync is full.
    pub fn sync(&mut self, nft: &dyn Nft, desired: Ruleset) -> Result<SyncReport, SyncError> {
        let (mut script, mut full) = self.plan(&desired);
        if !full && !nft.rules_on_existing_data_maps() && adds_rules_using_data_maps(&script) {
            script = full_script(&desired);
            full = true;
        }
        let result = apply(nft, &script, full);
        self.applied = result.is_ok().then_some(desired);
        result
    }
}

/// Sends `script` (nothing when it is empty) as one transaction.
pub fn apply(nft: &dyn Nft, script: &str, full: bool) -> Result<SyncReport, SyncError> {
    if script.is_empty() {
        return Ok(SyncReport {
            full,
            bytes: 0,
            commands: 0,
        });
    }
    match nft.apply(script) {
        Ok(()) => Ok(SyncReport {
            full,
            bytes: script.len(),
            commands: script.lines().count(),
        }),
        Err(source) => Err(SyncError::ApplyRuleset {
            full,
            bytes: script.len(),
            source,
        }),
    }
}

/// Whether `script` adds a rule that looks a value up in a data map (`... map @name`).
pub(crate) fn adds_rules_using_data_maps(script: &str) -> bool {
    script
        .lines()
        .any(|line| line.starts_with("add rule ") && line.contains(" map @"))
}

/// A script that replaces both tables with `desired`.
pub fn full_script(desired: &Ruleset) -> String {
    full_script_of(&desired.views())
}

/// [`full_script`] of tables borrowed from where they are kept (the daemon's claims: no
/// copy of the ruleset is made to write it).
pub fn full_script_of(tables: &[TableView<'_>]) -> String {
    let mut out = String::with_capacity(estimate(tables));
    for table in tables {
        let t = table_ref(table.family);
        // `add` first so that `delete` cannot fail on a missing table.
        let _ = writeln!(out, "add table {t}");
        let _ = writeln!(out, "delete table {t}");
        let _ = writeln!(out, "add table {t}");
        for (name, set, _) in &table.sets {
            add_set(&mut out, table.family, &t, name, set);
        }
        for (name, chain) in &table.chains {
            add_chain(&mut out, &t, name, chain);
        }
        // Rules before elements: a rule that looks up a set makes the kernel walk the set's
        // elements, which are none yet.
        for (name, chain) in &table.chains {
            add_rules(&mut out, table.family, &t, name, chain);
        }
        for (name, _, elements) in &table.sets {
            add_elements(&mut out, &t, name, elements.iter().copied());
        }
    }
    out
}

/// A script that removes the proxy's own tables (and nothing else), whether or not they exist.
pub fn cleanup_script() -> String {
    let mut out = String::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let t = format!("{} {TABLE}", family_keyword(family));
        let _ = writeln!(out, "add table {t}");
        let _ = writeln!(out, "delete table {t}");
    }
    out
}

/// Removes the proxy's own tables (`--cleanup`) in one transaction.
pub fn cleanup(nft: &dyn Nft) -> Result<(), NftError> {
    nft.apply(&cleanup_script())
}

fn estimate(tables: &[TableView<'_>]) -> usize {
    tables
        .iter()
        .map(|t| {
            t.chains.len() * 160
                + t.sets
                    .iter()
                    .map(|(_, _, elements)| elements.len() * 80)
                    .sum::<usize>()
        })
        .sum()
}

/// The difference between two states as one script, or `None` when only a full sync can
/// express it (a base chain or a set declaration changed).
pub fn partial_script(applied: &Ruleset, desired: &Ruleset) -> Option<String> {
    let mut out = String::new();
    for (old, new) in applied.tables().into_iter().zip(desired.tables()) {
        table_diff(&mut out, old, new)?;
    }
    Some(out)
}

/// One key of two sorted maps, walked together.
enum Side<'a, K, V> {
    /// Only in the old map.
    Old(&'a K, &'a V),
    /// Only in the new map.
    New(&'a K, &'a V),
    /// In both: (old, new).
    Both(&'a K, &'a V, &'a V),
}

/// Walks two maps in key order at once: one string comparison per step, where a lookup per
/// key would cost a tree descent (noticeable at 100k+ chains whose names share long prefixes).
fn merge<'a, K: Ord, V>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = Side<'a, K, V>> {
    let mut old = old.iter().peekable();
    let mut new = new.iter().peekable();
    std::iter::from_fn(move || match (old.peek(), new.peek()) {
        (None, None) => None,
        (Some(_), None) => old.next().map(|(k, v)| Side::Old(k, v)),
        (None, Some(_)) => new.next().map(|(k, v)| Side::New(k, v)),
        (Some((ko, _)), Some((kn, _))) => match ko.cmp(kn) {
            std::cmp::Ordering::Less => old.next().map(|(k, v)| Side::Old(k, v)),
            std::cmp::Ordering::Greater => new.next().map(|(k, v)| Side::New(k, v)),
            std::cmp::Ordering::Equal => match (old.next(), new.next()) {
                (Some((k, o)), Some((_, n))) => Some(Side::Both(k, o, n)),
                _ => None,
            },
        },
    })
}

fn table_diff(out: &mut String, old: &Table, new: &Table) -> Option<()> {
    let t = table_ref(new.family);
    let mut added_sets = Vec::new();
    let mut removed_sets = Vec::new();
    let mut common_sets = Vec::new();
    for side in merge(&old.sets, &new.sets) {
        match side {
            Side::New(name, set) => added_sets.push((name, set)),
            Side::Old(name, set) => removed_sets.push((name, set)),
            Side::Both(name, prev, set) => {
                // Declarations that changed in place cannot be patched (and happen only on
                // config change).
                if prev.decl != set.decl {
                    return None;
                }
                common_sets.push((name, prev, set));
            }
        }
    }
    let mut added_chains: Vec<(&String, &Chain)> = Vec::new();
    let mut changed_chains: Vec<(&String, &Chain)> = Vec::new();
    let mut removed_chains: Vec<&String> = Vec::new();
    for side in merge(&old.chains, &new.chains) {
        match side {
            Side::New(name, chain) => added_chains.push((name, chain)),
            Side::Old(name, _) => removed_chains.push(name),
            Side::Both(name, prev, chain) => {
                if prev.base != chain.base {
                    return None;
                }
                if prev.rules != chain.rules {
                    changed_chains.push((name, chain));
                }
            }
        }
    }

    // 1. New sets and chains, empty, so everything below can refer to them.
    for (name, set) in &added_sets {
        add_set(out, new.family, &t, name, set);
    }
    for (name, chain) in &added_chains {
        add_chain(out, &t, name, chain);
    }
    // 2. Empty changed and doomed chains: drops their references to other objects.
    for (name, _) in &changed_chains {
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    for name in &removed_chains {
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    // 3. Elements: removed and changed ones out, new and changed ones in (sets in name order,
    //    as before: new sets have only fresh elements).
    let empty = BTreeMap::new();
    let mut with_elements: Vec<(&String, &BTreeMap<Key, Value>, &Set)> = common_sets
        .iter()
        .map(|(name, prev, set)| (*name, &prev.elements, *set))
        .chain(added_sets.iter().map(|(name, set)| (*name, &empty, *set)))
        .collect();
    with_elements.sort_by(|a, b| a.0.cmp(b.0));
    for (name, old_elements, set) in with_elements {
        if old_elements == &set.elements {
            continue;
        }
        let mut gone = Vec::new();
        let mut fresh = Vec::new();
        for side in merge(old_elements, &set.elements) {
            match side {
                Side::Old(k, _) => gone.push(k),
                Side::New(k, v) => fresh.push((k, v)),
                Side::Both(k, o, n) if o != n => {
                    gone.push(k);
                    fresh.push((k, n));
                }
                Side::Both(..) => {}
            }
        }
        delete_elements(out, &t, name, gone.into_iter());
        add_elements(out, &t, name, fresh.into_iter());
    }
    // 4. Rules of new and changed chains.
    for (name, chain) in added_chains.iter().chain(&changed_chains) {
        add_rules(out, new.family, &t, name, chain);
    }
    // 5. Removed sets and maps: the rules that used them were flushed above; removing the
    //    maps drops their references to chains...
    for (name, set) in &removed_sets {
        let _ = writeln!(out, "delete {} {t} {name}", set.decl.keyword());
    }
    // 6. ...so that nothing refers to removed chains any more.
    for name in &removed_chains {
        let _ = writeln!(out, "delete chain {t} {name}");
    }
    Some(())
}

fn add_set(out: &mut String, family: IpFamily, t: &str, name: &str, set: &Set) {
    let _ = writeln!(
        out,
        "add {} {t} {name} {{ {} }}",
        set.decl.keyword(),
        set.decl.text(family)
    );
}

fn add_chain(out: &mut String, t: &str, name: &str, chain: &Chain) {
    match &chain.base {
        Some(base) => {
            let _ = writeln!(out, "add chain {t} {name} {{ {base} }}");
        }
        None => {
            let _ = writeln!(out, "add chain {t} {name}");
        }
    }
}

fn add_rules(out: &mut String, family: IpFamily, t: &str, name: &str, chain: &Chain) {
    for rule in &chain.rules {
        let _ = writeln!(out, "add rule {t} {name} {}", rule.text(family));
    }
}

fn add_elements<'a>(
    out: &mut String,
    t: &str,
    name: &str,
    elements: impl Iterator<Item = (&'a Key, &'a Value)>,
) {
    write_elements(out, "add", t, name, elements, true);
}

fn delete_elements<'a>(out: &mut String, t: &str, name: &str, keys: impl Iterator<Item = &'a Key>) {
    write_elements(
        out,
        "delete",
        t,
        name,
        keys.map(|k| (k, &Value::None)),
        false,
    );
}

fn write_elements<'a>(
    out: &mut String,
    verb: &str,
    t: &str,
    name: &str,
    elements: impl Iterator<Item = (&'a Key, &'a Value)>,
    with_values: bool,
) {
    let mut in_line = 0;
    for (key, value) in elements {
        if in_line == 0 {
            let _ = write!(out, "{verb} element {t} {name} {{ ");
        } else {
            out.push_str(", ");
        }
        let _ = write!(out, "{key}");
        if with_values && *value != Value::None {
            let _ = write!(out, " : {value}");
        }
        in_line += 1;
        if in_line == ELEMENT_CHUNK {
            out.push_str(" }\n");
            in_line = 0;
        }
    }
    if in_line > 0 {
        out.push_str(" }\n");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nft::RecordingNft;
    use crate::testutil::{config, model_of, simple};

    fn ruleset(b_endpoints: &[&str]) -> Ruleset {
        let (a, sa) = simple("default", "a", "10.96.0.1", &["10.244.1.1", "10.244.1.3"]);
        let (b, sb) = simple("default", "b", "10.96.0.2", b_endpoints);
        Ruleset::build(&model_of(&[a, b], &[sa, sb]), &config())
    }

    #[test]
    fn first_sync_is_full_then_only_differences_are_sent() {
        let nft = RecordingNft::default();
        let mut syncer = Syncer::new();
        let report = syncer.sync(&nft, ruleset(&["10.244.2.1"])).unwrap();
        assert!(report.full);
        let scripts = nft.scripts();
        assert!(scripts[0].starts_with(
            "add table ip strake-proxy\ndelete table ip strake-proxy\nadd table ip strake-proxy\n"
        ));
        assert!(scripts[0].contains("delete table ip6 strake-proxy\n"));

        // Nothing changed: nothing sent.
        let report = syncer.sync(&nft, ruleset(&["10.244.2.1"])).unwrap();
        assert_eq!((report.full, report.bytes), (false, 0));
        assert_eq!(nft.scripts().len(), 1);

        // One endpoint replaced in b: map elements only.
        let report = syncer.sync(&nft, ruleset(&["10.244.2.2"])).unwrap();
        assert!(!report.full);
        let script = nft.scripts()[1].clone();
        let expected = "\
delete element ip strake-proxy endpoints { 10.96.0.2 . tcp . 80 . 0 }
add element ip strake-proxy endpoints { 10.96.0.2 . tcp . 80 . 0 : 10.244.2.2 . 8080 }
";
        assert_eq!(script, expected);
    }

    #[test]
    fn losing_all_endpoints_moves_the_service_to_reject() {
        let nft = RecordingNft::default();
        let mut syncer = Syncer::new();
        syncer.sync(&nft, ruleset(&["10.244.2.1"])).unwrap();
        syncer.sync(&nft, ruleset(&[])).unwrap();
        let script = nft.scripts()[1].clone();
        let pos = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in\n{script}"))
        };
        // The map element pointing at the (no longer used) shared chain goes before the
        // chain does.
        assert!(
            pos("delete element ip strake-proxy service-ips { 10.96.0.2 . tcp . 80 }")
                < pos("delete chain ip strake-proxy cluster-1")
        );
        pos(
            "add element ip strake-proxy no-endpoint-services { 10.96.0.2 . tcp . 80 : goto reject-chain }",
        );
        assert!(!script.contains("10.96.0.1 "));
    }

    #[test]
    fn a_failed_apply_makes_the_next_sync_full() {
        let nft = RecordingNft::default();
        let mut syncer = Syncer::new();
        syncer.sync(&nft, ruleset(&["10.244.2.1"])).unwrap();
        nft.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = syncer.sync(&nft, ruleset(&["10.244.2.2"])).unwrap_err();
        assert!(matches!(err, SyncError::ApplyRuleset { full: false, .. }));
        assert!(syncer.applied().is_none());
        let report = syncer.sync(&nft, ruleset(&["10.244.2.2"])).unwrap();
        assert!(report.full);
    }

    #[test]
    fn changed_set_declaration_forces_full_sync() {
        let mut a = ruleset(&["10.244.2.1"]);
        let b = a.clone();
        if let Some(set) = a.v4.sets.get_mut("cluster-ips") {
            set.decl.flags.interval = true;
        }
        assert!(partial_script(&b, &a).is_none());
    }

    #[test]
    fn cleanup_removes_only_our_tables() {
        assert_eq!(
            cleanup_script(),
            "add table ip strake-proxy\ndelete table ip strake-proxy\n\
             add table ip6 strake-proxy\ndelete table ip6 strake-proxy\n"
        );
    }

    #[test]
    fn huge_element_lists_are_chunked() {
        let mut out = String::new();
        let drop = Value::Verdict(crate::nft::objects::Verdict::Drop);
        let elements: BTreeMap<Key, Value> = (0..2500)
            .map(|i| {
                (
                    Key::ProtoPort(crate::model::Protocol::Tcp, 10000 + i),
                    drop.clone(),
                )
            })
            .collect();
        add_elements(
            &mut out,
            "ip strake-proxy",
            "service-nodeports",
            elements.iter(),
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].matches(" : drop").count(), ELEMENT_CHUNK);
        assert_eq!(lines[2].matches(" : drop").count(), 500);
    }
}
