//! Getting the desired [`Ruleset`] into the kernel: one atomic transaction per sync, a list
//! of typed [`Command`]s carried by an [`Nft`] backend (one netlink batch, or one `nft -f`
//! script rendered from it).
//!
//! A partial sync ([`partial_transaction`]) sends only the difference between what was last
//! applied successfully and the desired state; a full sync ([`full_transaction`]: the first
//! one, the one after a failure, a periodic one, or one whose difference cannot be expressed,
//! such as a changed set declaration) replaces both tables in one transaction (`add table`,
//! `delete table`, then the whole content), so no packet ever sees a half-written table.
//! [`apply_sync`] picks between them; the kernel's ruleset is never listed to compute a sync.

use std::collections::BTreeMap;
use std::fmt;

use crate::model::IpFamily;
use crate::nft::objects::{BaseChain, Key, Rule, SetDecl, Syntax as _, Value};
use crate::nft::ruleset::{Chain, Ruleset, Set, Table, TableView};
use crate::nft::{Nft, NftError, TABLE, family_keyword};

/// Map and set elements per `add element` / `delete element` command; keeps lines (and nft's
/// parser buffers) bounded for huge maps while staying in the same transaction.
pub const ELEMENT_CHUNK: usize = 1000;

/// A sync that did not reach the kernel.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The kernel (or `nft`) refused the transaction, or it could not be sent; the kernel keeps
    /// its previous ruleset and the next sync is a full one.
    #[error("apply {} ruleset ({commands} commands)", if *.full { "full" } else { "partial" })]
    ApplyRuleset {
        /// Whether this was a full sync.
        full: bool,
        /// Commands in the transaction.
        commands: usize,
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
    /// Size of what was sent: the netlink batch or the script (0 when nothing changed and
    /// nothing was sent).
    pub bytes: usize,
    /// Commands in the transaction.
    pub commands: usize,
}

/// One command of a transaction, on one of the proxy's own tables (no other can be named).
/// Rendered, each is one line of an nft script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `add table`: creates the table if it does not exist.
    AddTable(IpFamily),
    /// `delete table`, with everything in it.
    DeleteTable(IpFamily),
    /// `add chain`, with its hook for a base chain.
    AddChain {
        /// The table.
        family: IpFamily,
        /// The chain.
        name: &'a str,
        /// Its hook, for a base chain.
        base: Option<&'a BaseChain>,
    },
    /// `flush chain`: deletes its rules.
    FlushChain {
        /// The table.
        family: IpFamily,
        /// The chain.
        name: &'a str,
    },
    /// `delete chain`.
    DeleteChain {
        /// The table.
        family: IpFamily,
        /// The chain.
        name: &'a str,
    },
    /// `add set` / `add map`, empty.
    AddSet {
        /// The table.
        family: IpFamily,
        /// The set.
        name: &'a str,
        /// Its declaration.
        decl: &'a SetDecl,
    },
    /// `delete set` / `delete map`.
    DeleteSet {
        /// The table.
        family: IpFamily,
        /// The set.
        name: &'a str,
        /// Its declaration (`set` or `map`).
        decl: &'a SetDecl,
    },
    /// `add element`: at most [`ELEMENT_CHUNK`] elements.
    AddElements {
        /// The table.
        family: IpFamily,
        /// The set.
        set: &'a str,
        /// Keys and values.
        elements: Vec<(&'a Key, &'a Value)>,
    },
    /// `delete element`: at most [`ELEMENT_CHUNK`] elements.
    DeleteElements {
        /// The table.
        family: IpFamily,
        /// The set.
        set: &'a str,
        /// Keys.
        keys: Vec<&'a Key>,
    },
    /// `add rule`: appends a rule to a chain.
    AddRule {
        /// The table.
        family: IpFamily,
        /// The chain.
        chain: &'a str,
        /// The rule.
        rule: &'a Rule,
    },
}

/// `ip strake-proxy` / `ip6 strake-proxy`.
struct TableRef(IpFamily);

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {TABLE}", family_keyword(self.0))
    }
}

impl fmt::Display for Command<'_> {
    /// One line of an nft script, without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::AddTable(family) => write!(f, "add table {}", TableRef(*family)),
            Command::DeleteTable(family) => write!(f, "delete table {}", TableRef(*family)),
            Command::AddChain { family, name, base } => {
                write!(f, "add chain {} {name}", TableRef(*family))?;
                match base {
                    Some(base) => write!(f, " {{ {base} }}"),
                    None => Ok(()),
                }
            }
            Command::FlushChain { family, name } => {
                write!(f, "flush chain {} {name}", TableRef(*family))
            }
            Command::DeleteChain { family, name } => {
                write!(f, "delete chain {} {name}", TableRef(*family))
            }
            Command::AddSet { family, name, decl } => write!(
                f,
                "add {} {} {name} {{ {} }}",
                decl.keyword(),
                TableRef(*family),
                decl.text(*family)
            ),
            Command::DeleteSet { family, name, decl } => {
                write!(f, "delete {} {} {name}", decl.keyword(), TableRef(*family))
            }
            Command::AddElements {
                family,
                set,
                elements,
            } => {
                write!(f, "add element {} {set} {{ ", TableRef(*family))?;
                for (i, (key, value)) in elements.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{key}")?;
                    if **value != Value::None {
                        write!(f, " : {value}")?;
                    }
                }
                f.write_str(" }")
            }
            Command::DeleteElements { family, set, keys } => {
                write!(f, "delete element {} {set} {{ ", TableRef(*family))?;
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{key}")?;
                }
                f.write_str(" }")
            }
            Command::AddRule {
                family,
                chain,
                rule,
            } => write!(
                f,
                "add rule {} {chain} {}",
                TableRef(*family),
                rule.text(*family)
            ),
        }
    }
}

impl Command<'_> {
    /// Whether this adds a rule that looks a value up in a data map (`... map @name`).
    pub fn adds_rule_using_data_map(&self) -> bool {
        matches!(self, Command::AddRule { rule, .. } if rule.uses_data_map())
    }
}

/// Commands applied as one atomic transaction, in order. Rendered, an nft script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction<'a> {
    /// The commands.
    pub commands: Vec<Command<'a>>,
}

impl fmt::Display for Transaction<'_> {
    /// The nft script: one line per command.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.commands {
            writeln!(f, "{c}")?;
        }
        Ok(())
    }
}

impl<'a> Transaction<'a> {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Whether a command adds a rule that looks a value up in a data map.
    pub fn adds_rules_using_data_maps(&self) -> bool {
        self.commands.iter().any(Command::adds_rule_using_data_map)
    }

    fn push(&mut self, c: Command<'a>) {
        self.commands.push(c);
    }

    fn add_set(&mut self, family: IpFamily, name: &'a str, set: &'a Set) {
        self.push(Command::AddSet {
            family,
            name,
            decl: &set.decl,
        });
    }

    fn add_chain(&mut self, family: IpFamily, name: &'a str, chain: &'a Chain) {
        self.push(Command::AddChain {
            family,
            name,
            base: chain.base.as_ref(),
        });
    }

    fn add_rules(&mut self, family: IpFamily, name: &'a str, chain: &'a Chain) {
        for rule in &chain.rules {
            self.push(Command::AddRule {
                family,
                chain: name,
                rule,
            });
        }
    }

    /// `add element` commands of at most [`ELEMENT_CHUNK`] elements.
    fn add_elements(
        &mut self,
        family: IpFamily,
        set: &'a str,
        elements: impl IntoIterator<Item = (&'a Key, &'a Value)>,
    ) {
        let mut elements = elements.into_iter().peekable();
        while elements.peek().is_some() {
            let chunk: Vec<_> = elements.by_ref().take(ELEMENT_CHUNK).collect();
            self.push(Command::AddElements {
                family,
                set,
                elements: chunk,
            });
        }
    }

    /// `delete element` commands of at most [`ELEMENT_CHUNK`] elements.
    fn delete_elements(
        &mut self,
        family: IpFamily,
        set: &'a str,
        keys: impl IntoIterator<Item = &'a Key>,
    ) {
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() {
            let chunk: Vec<_> = keys.by_ref().take(ELEMENT_CHUNK).collect();
            self.push(Command::DeleteElements {
                family,
                set,
                keys: chunk,
            });
        }
    }
}

/// Sends one sync: `partial`, the difference since the last successful sync, when there is
/// one and the backend can take it (see [`Nft::rules_on_existing_data_maps`]), else the whole
/// ruleset, whose tables `full` gives. `full` is called only for a full sync: borrowing every
/// table costs in proportion to the ruleset, which a partial sync must not. An empty
/// transaction sends nothing. The caller remembers whether it succeeded: after a failure only
/// a full sync is trusted.
pub fn apply_sync<'a>(
    nft: &dyn Nft,
    partial: Option<Transaction<'_>>,
    full: impl FnOnce() -> [TableView<'a>; 2],
) -> Result<SyncReport, SyncError> {
    let partial =
        partial.filter(|tx| nft.rules_on_existing_data_maps() || !tx.adds_rules_using_data_maps());
    match partial {
        Some(tx) => apply(nft, &tx, false),
        None => {
            let tables = full();
            apply(nft, &full_transaction_of(&tables), true)
        }
    }
}

/// Sends `tx` (nothing when it is empty) as one transaction.
pub fn apply(nft: &dyn Nft, tx: &Transaction<'_>, full: bool) -> Result<SyncReport, SyncError> {
    if tx.is_empty() {
        return Ok(SyncReport {
            full,
            bytes: 0,
            commands: 0,
        });
    }
    match nft.apply(tx) {
        Ok(bytes) => Ok(SyncReport {
            full,
            bytes,
            commands: tx.commands.len(),
        }),
        Err(source) => Err(SyncError::ApplyRuleset {
            full,
            commands: tx.commands.len(),
            source,
        }),
    }
}

/// A transaction that replaces both tables with `desired`.
pub fn full_transaction(desired: &Ruleset) -> Transaction<'_> {
    let mut tx = Transaction::default();
    for table in desired.tables() {
        let sets = table
            .sets
            .iter()
            .map(|(name, set)| (name.as_str(), set, set.elements.iter()));
        let chains = table.chains.iter().map(|(name, c)| (name.as_str(), c));
        full_table(&mut tx, table.family, chains, sets);
    }
    tx
}

/// [`full_transaction`] of tables borrowed from where they are kept (the daemon's claims: no
/// copy of the ruleset is made to write it).
pub fn full_transaction_of<'a>(tables: &'a [TableView<'a>]) -> Transaction<'a> {
    let mut tx = Transaction::default();
    for table in tables {
        let sets = table
            .sets
            .iter()
            .map(|(name, set, elements)| (*name, *set, elements.iter().copied()));
        full_table(&mut tx, table.family, table.chains.iter().copied(), sets);
    }
    tx
}

fn full_table<'a, E>(
    tx: &mut Transaction<'a>,
    family: IpFamily,
    chains: impl Iterator<Item = (&'a str, &'a Chain)> + Clone,
    sets: impl Iterator<Item = (&'a str, &'a Set, E)> + Clone,
) where
    E: Iterator<Item = (&'a Key, &'a Value)>,
{
    // `add` first so that `delete` cannot fail on a missing table.
    tx.push(Command::AddTable(family));
    tx.push(Command::DeleteTable(family));
    tx.push(Command::AddTable(family));
    for (name, set, _) in sets.clone() {
        tx.add_set(family, name, set);
    }
    for (name, chain) in chains.clone() {
        tx.add_chain(family, name, chain);
    }
    // Rules before elements: a rule that looks up a set makes the kernel walk the set's
    // elements, which are none yet.
    for (name, chain) in chains {
        tx.add_rules(family, name, chain);
    }
    for (name, _, elements) in sets {
        tx.add_elements(family, name, elements);
    }
}

/// A script that replaces both tables with `desired`: [`full_transaction`], rendered.
pub fn full_script(desired: &Ruleset) -> String {
    full_transaction(desired).to_string()
}

/// [`full_transaction_of`], rendered.
pub fn full_script_of(tables: &[TableView<'_>]) -> String {
    full_transaction_of(tables).to_string()
}

/// A transaction that removes the proxy's own tables (and nothing else), whether or not they
/// exist.
pub fn cleanup_transaction() -> Transaction<'static> {
    let mut tx = Transaction::default();
    for family in [IpFamily::V4, IpFamily::V6] {
        tx.push(Command::AddTable(family));
        tx.push(Command::DeleteTable(family));
    }
    tx
}

/// [`cleanup_transaction`], rendered.
pub fn cleanup_script() -> String {
    cleanup_transaction().to_string()
}

/// Removes the proxy's own tables (`--cleanup`) in one transaction.
pub fn cleanup(nft: &dyn Nft) -> Result<(), NftError> {
    nft.apply(&cleanup_transaction()).map(drop)
}

/// The difference between two states as one transaction, or `None` when only a full sync can
/// express it (a base chain or a set declaration changed).
pub fn partial_transaction<'a>(
    applied: &'a Ruleset,
    desired: &'a Ruleset,
) -> Option<Transaction<'a>> {
    let mut tx = Transaction::default();
    for (old, new) in applied.tables().into_iter().zip(desired.tables()) {
        table_diff(&mut tx, old, new)?;
    }
    Some(tx)
}

/// [`partial_transaction`], rendered.
pub fn partial_script(applied: &Ruleset, desired: &Ruleset) -> Option<String> {
    partial_transaction(applied, desired).map(|tx| tx.to_string())
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

fn table_diff<'a>(tx: &mut Transaction<'a>, old: &'a Table, new: &'a Table) -> Option<()> {
    let family = new.family;
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
        tx.add_set(family, name, set);
    }
    for (name, chain) in &added_chains {
        tx.add_chain(family, name, chain);
    }
    // 2. Empty changed and doomed chains: drops their references to other objects.
    for (name, _) in &changed_chains {
        tx.push(Command::FlushChain { family, name });
    }
    for name in &removed_chains {
        tx.push(Command::FlushChain { family, name });
    }
    // 3. Elements: removed and changed ones out, new and changed ones in (sets in name order,
    //    as before: new sets have only fresh elements).
    static EMPTY: BTreeMap<Key, Value> = BTreeMap::new();
    let mut with_elements: Vec<(&String, &BTreeMap<Key, Value>, &Set)> = common_sets
        .iter()
        .map(|(name, prev, set)| (*name, &prev.elements, *set))
        .chain(added_sets.iter().map(|(name, set)| (*name, &EMPTY, *set)))
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
        tx.delete_elements(family, name, gone);
        tx.add_elements(family, name, fresh);
    }
    // 4. Rules of new and changed chains.
    for (name, chain) in added_chains.iter().chain(&changed_chains) {
        tx.add_rules(family, name, chain);
    }
    // 5. Removed sets and maps: the rules that used them were flushed above; removing the
    //    maps drops their references to chains...
    for (name, set) in &removed_sets {
        tx.push(Command::DeleteSet {
            family,
            name,
            decl: &set.decl,
        });
    }
    // 6. ...so that nothing refers to removed chains any more.
    for name in &removed_chains {
        tx.push(Command::DeleteChain { family, name });
    }
    Some(())
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
        let (first, same, changed) = (
            ruleset(&["10.244.2.1"]),
            ruleset(&["10.244.2.1"]),
            ruleset(&["10.244.2.2"]),
        );
        let report = apply_sync(&nft, None, || first.views()).unwrap();
        assert!(report.full);
        let scripts = nft.scripts();
        assert!(scripts[0].starts_with(
            "add table ip strake-proxy\ndelete table ip strake-proxy\nadd table ip strake-proxy\n"
        ));
        assert!(scripts[0].contains("delete table ip6 strake-proxy\n"));

        // Nothing changed: nothing sent.
        let partial = partial_transaction(&first, &same);
        let report = apply_sync(&nft, partial, || same.views()).unwrap();
        assert_eq!((report.full, report.bytes), (false, 0));
        assert_eq!(nft.scripts().len(), 1);

        // One endpoint replaced in b: map elements only.
        // A partial sync never borrows the whole ruleset (that costs in proportion to it).
        let partial = partial_transaction(&same, &changed);
        let report = apply_sync(&nft, partial, || -> [TableView<'_>; 2] {
            panic!("a partial sync asked for every table")
        })
        .unwrap();
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
        let (before, after) = (ruleset(&["10.244.2.1"]), ruleset(&[]));
        apply_sync(&nft, None, || before.views()).unwrap();
        let partial = partial_transaction(&before, &after);
        assert!(partial.is_some());
        apply_sync(&nft, partial, || after.views()).unwrap();
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
        let mut tx = Transaction::default();
        let drop = Value::verdict(crate::nft::objects::Verdict::Drop);
        let elements: BTreeMap<Key, Value> = (0..2500)
            .map(|i| {
                (
                    Key::ProtoPort(crate::model::Protocol::Tcp, 10000 + i),
                    drop.clone(),
                )
            })
            .collect();
        tx.add_elements(IpFamily::V4, "service-nodeports", elements.iter());
        let out = tx.to_string();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].matches(" : drop").count(), ELEMENT_CHUNK);
        assert_eq!(lines[2].matches(" : drop").count(), 500);
    }
}
