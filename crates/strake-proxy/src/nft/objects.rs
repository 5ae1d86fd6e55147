//! The nftables objects the proxy writes, as typed values: chains (with the hook, priority
//! and policy of base chains), rules as lists of statements, set and map declarations, and
//! their elements.
//!
//! [`crate::nft::ruleset`] builds them, the netlink backend encodes them as they are
//! ([`crate::nft::netlink::encode`]), and their rendering in nft's syntax (the [`Syntax`]
//! trait, `Display` for what needs no table) is written only for the `nft -f` backend,
//! `--cleanup`, logs and tests. The vocabulary is what the ruleset uses and no more, so that
//! whatever can be built can be encoded.
//!
//! A table holds one family, so rules and declarations name fields without it (`saddr`, not
//! `ip saddr`); the family is given when they are rendered or encoded. Element keys and values
//! carry their addresses, and so their family.

use std::fmt::{self, Display as _};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{IpFamily, Protocol};

/// A chain's or set's name.
pub type Name = Box<str>;

/// Something written in nft syntax within a table of one family.
pub trait Syntax {
    /// Writes `self` as nft text for a table of `family`.
    fn write(&self, family: IpFamily, f: &mut fmt::Formatter<'_>) -> fmt::Result;

    /// `self` as nft text for a table of `family`.
    fn text(&self, family: IpFamily) -> Text<'_, Self> {
        Text(family, self)
    }
}

/// [`Syntax`] as `Display`: see [`Syntax::text`].
pub struct Text<'a, T: ?Sized>(IpFamily, &'a T);

impl<T: Syntax + ?Sized> fmt::Display for Text<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.1.write(self.0, f)
    }
}

/// `ip` or `ip6`: a family's payload protocol keyword.
fn ipx(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// A verdict, ending a rule or as a verdict map's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// `accept`.
    Accept,
    /// `drop`.
    Drop,
    /// `return`.
    Return,
    /// `jump CHAIN`.
    Jump(Name),
    /// `goto CHAIN`.
    Goto(Name),
}

impl Verdict {
    /// `jump chain`.
    pub fn jump(chain: &str) -> Verdict {
        Verdict::Jump(chain.into())
    }

    /// `goto chain`.
    pub fn goto(chain: &str) -> Verdict {
        Verdict::Goto(chain.into())
    }

    /// The chain a jump or goto continues in.
    pub fn chain(&self) -> Option<&str> {
        match self {
            Verdict::Jump(c) | Verdict::Goto(c) => Some(c),
            _ => None,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

/// An address of the network header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Addr {
    /// `saddr`.
    Source,
    /// `daddr`.
    Destination,
}

impl Addr {
    fn keyword(self) -> &'static str {
        match self {
            Addr::Source => "saddr",
            Addr::Destination => "daddr",
        }
    }
}

/// A value a rule loads, alone or as one component of a concatenated key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `ip saddr`, `ip6 daddr`, ...
    Addr(Addr),
    /// `meta l4proto`.
    L4proto,
    /// `th dport`: the transport header's destination port.
    Dport,
    /// `numgen random mod N`.
    Numgen(u32),
}

impl Expr {
    /// `ip daddr . meta l4proto . th dport`: what the service maps are keyed by.
    pub const FRONTEND: [Expr; 3] = [Expr::Addr(Addr::Destination), Expr::L4proto, Expr::Dport];
}

impl Syntax for Expr {
    fn write(&self, family: IpFamily, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Addr(a) => write!(f, "{} {}", ipx(family), a.keyword()),
            Expr::L4proto => f.write_str("meta l4proto"),
            Expr::Dport => f.write_str("th dport"),
            Expr::Numgen(n) => write!(f, "numgen random mod {n}"),
        }
    }
}

impl Syntax for [Expr] {
    /// A concatenation: `e . e . e`.
    fn write(&self, family: IpFamily, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            e.write(family, f)?;
        }
        Ok(())
    }
}

/// An address or a prefix a header address is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrValue {
    /// One address (`10.96.0.1`).
    Addr(IpAddr),
    /// A prefix (`10.244.0.0/16`).
    Net(IpNet),
}

impl fmt::Display for AddrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrValue::Addr(a) => a.fmt(f),
            AddrValue::Net(n) => n.fmt(f),
        }
    }
}

/// How a packet is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// `reject`: ICMP(v6) port unreachable.
    PortUnreachable,
    /// `reject with tcp reset`.
    TcpReset,
    /// `reject with icmp type host-unreachable` (IPv6: `icmpv6 type addr-unreachable`).
    HostUnreachable,
}

/// How `meta mark set meta mark OP VALUE` combines the mark with the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MarkOp {
    /// `|`: sets the bits.
    Or,
    /// `^`: flips the bits.
    Xor,
}

/// One statement of a rule: a match (the rule goes on only if it holds) or an action.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stmt {
    /// `ip saddr|daddr [!=] ADDR|PREFIX`.
    AddrCmp {
        /// Which address.
        addr: Addr,
        /// `!=` rather than `==`.
        neq: bool,
        /// The address or prefix.
        value: AddrValue,
    },
    /// `KEY [!=] @set`: the key (one value or a concatenation) is (not) in the set.
    Lookup {
        /// The key.
        key: Box<[Expr]>,
        /// `!=`: not in the set.
        neq: bool,
        /// The set.
        set: Name,
    },
    /// `meta l4proto PROTO`.
    L4proto(Protocol),
    /// `PROTO dport PORT` (which implies `meta l4proto PROTO`).
    Dport(Protocol, u16),
    /// `ct state new`.
    CtStateNew,
    /// `fib saddr|daddr type local`: the address is one of the node's.
    FibLocal(Addr),
    /// `numgen random mod MODULUS VALUE`.
    Numgen {
        /// The modulus.
        modulus: u32,
        /// The value that matches.
        value: u32,
    },
    /// `meta mark & MASK ==|!= VALUE`.
    Mark {
        /// The bits compared.
        mask: u32,
        /// `!=` rather than `==`.
        neq: bool,
        /// Their value.
        value: u32,
    },
    /// `meta mark set meta mark OP VALUE`.
    SetMark(MarkOp, u32),
    /// `update @set { ip saddr }`: adds the address to a dynamic set, or refreshes it.
    Update {
        /// The set.
        set: Name,
        /// The address added.
        key: Addr,
    },
    /// `dnat to ADDR:PORT`.
    DnatTo(IpAddr, u16),
    /// `dnat ip to KEY map @map`: to the address and port the key maps to.
    DnatMap {
        /// The key.
        key: Box<[Expr]>,
        /// A data map whose values are `address . port`.
        map: Name,
    },
    /// `KEY vmap @map`: the verdict the key maps to.
    Vmap {
        /// The key.
        key: Box<[Expr]>,
        /// A verdict map.
        map: Name,
    },
    /// `masquerade [fully-random]`.
    Masquerade {
        /// `fully-random` source ports.
        fully_random: bool,
    },
    /// `reject ...`.
    Reject(Reject),
    /// A verdict.
    Verdict(Verdict),
}

impl Syntax for Stmt {
    fn write(&self, family: IpFamily, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = ipx(family);
        let ne = |neq: bool| if neq { "!= " } else { "" };
        match self {
            Stmt::AddrCmp { addr, neq, value } => {
                write!(f, "{ip} {} {}{value}", addr.keyword(), ne(*neq))
            }
            Stmt::Lookup { key, neq, set } => {
                write!(f, "{} {}@{set}", key.text(family), ne(*neq))
            }
            Stmt::L4proto(p) => write!(f, "meta l4proto {}", p.nft_name()),
            Stmt::Dport(p, port) => write!(f, "{} dport {port}", p.nft_name()),
            Stmt::CtStateNew => f.write_str("ct state new"),
            Stmt::FibLocal(a) => write!(f, "fib {} type local", a.keyword()),
            Stmt::Numgen { modulus, value } => write!(f, "numgen random mod {modulus} {value}"),
            Stmt::Mark { mask, neq, value } => {
                let op = if *neq { "!=" } else { "==" };
                write!(f, "meta mark & {mask:#x} {op} {value}")
            }
            Stmt::SetMark(op, value) => {
                let op = match op {
                    MarkOp::Or => "|",
                    MarkOp::Xor => "^",
                };
                write!(f, "meta mark set meta mark {op} {value:#x}")
            }
            Stmt::Update { set, key } => write!(f, "update @{set} {{ {ip} {} }}", key.keyword()),
            Stmt::DnatTo(IpAddr::V4(a), port) => write!(f, "dnat to {a}:{port}"),
            Stmt::DnatTo(IpAddr::V6(a), port) => write!(f, "dnat to [{a}]:{port}"),
            Stmt::DnatMap { key, map } => write!(f, "dnat {ip} to {} map @{map}", key.text(family)),
            Stmt::Vmap { key, map } => write!(f, "{} vmap @{map}", key.text(family)),
            Stmt::Masquerade { fully_random } => f.write_str(if *fully_random {
                "masquerade fully-random"
            } else {
                "masquerade"
            }),
            Stmt::Reject(Reject::PortUnreachable) => f.write_str("reject"),
            Stmt::Reject(Reject::TcpReset) => f.write_str("reject with tcp reset"),
            Stmt::Reject(Reject::HostUnreachable) => f.write_str(match family {
                IpFamily::V4 => "reject with icmp type host-unreachable",
                IpFamily::V6 => "reject with icmpv6 type addr-unreachable",
            }),
            Stmt::Verdict(v) => v.fmt(f),
        }
    }
}

/// A rule: statements in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule(pub Vec<Stmt>);

impl Rule {
    /// A rule of these statements.
    pub fn new(stmts: impl Into<Vec<Stmt>>) -> Rule {
        Rule(stmts.into())
    }

    /// The statements.
    pub fn stmts(&self) -> &[Stmt] {
        &self.0
    }

    /// Whether the rule looks a value up in a data map (`... map @name`).
    pub fn uses_data_map(&self) -> bool {
        self.0.iter().any(|s| matches!(s, Stmt::DnatMap { .. }))
    }
}

impl From<Verdict> for Rule {
    fn from(v: Verdict) -> Rule {
        Rule(vec![Stmt::Verdict(v)])
    }
}

impl Syntax for Rule {
    fn write(&self, family: IpFamily, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            s.write(family, f)?;
        }
        Ok(())
    }
}

/// A base chain's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainType {
    /// `filter`.
    Filter,
    /// `nat`.
    Nat,
}

/// A netfilter hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `prerouting`.
    Prerouting,
    /// `input`.
    Input,
    /// `forward`.
    Forward,
    /// `output`.
    Output,
    /// `postrouting`.
    Postrouting,
}

impl Hook {
    /// The kernel's hook number (`NF_INET_*`).
    pub fn number(self) -> u32 {
        match self {
            Hook::Prerouting => 0,
            Hook::Input => 1,
            Hook::Forward => 2,
            Hook::Output => 3,
            Hook::Postrouting => 4,
        }
    }
}

/// A named base-chain priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NamedPriority {
    /// `dstnat` (-100).
    Dstnat,
    /// `srcnat` (100).
    Srcnat,
}

/// A base chain's priority: a number, or a name plus an offset (`dstnat - 10`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// A number.
    Number(i32),
    /// A name and an offset to it.
    Named(NamedPriority, i32),
}

impl Priority {
    /// The number the kernel gets.
    pub fn value(self) -> i32 {
        match self {
            Priority::Number(n) => n,
            Priority::Named(NamedPriority::Dstnat, d) => -100 + d,
            Priority::Named(NamedPriority::Srcnat, d) => 100 + d,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Priority::Number(n) => write!(f, "{n}"),
            Priority::Named(name, offset) => {
                f.write_str(match name {
                    NamedPriority::Dstnat => "dstnat",
                    NamedPriority::Srcnat => "srcnat",
                })?;
                match offset {
                    0 => Ok(()),
                    d if *d < 0 => write!(f, " - {}", d.unsigned_abs()),
                    d => write!(f, " + {d}"),
                }
            }
        }
    }
}

/// What a base chain declares: where it hooks in, and its policy (always `accept` here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    /// `filter` or `nat`.
    pub kind: ChainType,
    /// The hook.
    pub hook: Hook,
    /// The priority.
    pub priority: Priority,
}

impl fmt::Display for BaseChain {
    /// `type nat hook prerouting priority dstnat ; policy accept ;`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        };
        let hook = match self.hook {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        };
        write!(
            f,
            "type {kind} hook {hook} priority {} ; policy accept ;",
            self.priority
        )
    }
}

/// A chain: its base-chain declaration, if any, and its rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Hook and priority, for a base chain.
    pub base: Option<BaseChain>,
    /// The rules, in order.
    pub rules: Vec<Rule>,
}

/// A data type of set keys declared with `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPart {
    /// `ipv4_addr`.
    Ipv4,
    /// `ipv6_addr`.
    Ipv6,
    /// `inet_proto`.
    Proto,
    /// `inet_service` (a port).
    Service,
}

impl KeyPart {
    /// The address type of a family.
    pub fn addr(family: IpFamily) -> KeyPart {
        match family {
            IpFamily::V4 => KeyPart::Ipv4,
            IpFamily::V6 => KeyPart::Ipv6,
        }
    }
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyPart::Ipv4 => "ipv4_addr",
            KeyPart::Ipv6 => "ipv6_addr",
            KeyPart::Proto => "inet_proto",
            KeyPart::Service => "inet_service",
        })
    }
}

/// The key of a set or map.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SetKey {
    /// `type T . T`: keys of these data types.
    Type(Box<[KeyPart]>),
    /// `typeof E . E`: keys of these expressions' types (and printed as they are).
    Typeof(Box<[Expr]>),
}

/// What a map's keys map to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SetData {
    /// Nothing: a set.
    None,
    /// `: verdict`: a verdict map.
    Verdict,
    /// `: E . E`, after a `typeof` key: a data map of these expressions' types.
    Typeof(Box<[Expr]>),
}

/// The flags of a set declaration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SetFlags {
    /// `interval`: elements are prefixes.
    pub interval: bool,
    /// `dynamic`: rules add elements (`update`).
    pub dynamic: bool,
    /// `timeout`: elements expire.
    pub timeout: bool,
}

/// A set's or map's declaration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetDecl {
    /// The key.
    pub key: SetKey,
    /// What a map's keys map to.
    pub data: SetData,
    /// Flags.
    pub flags: SetFlags,
    /// `timeout Ns`: how long elements live.
    pub timeout_secs: Option<u32>,
}

impl SetDecl {
    /// `type T . T ;` (a set) or `type T . T : verdict ;` (a verdict map).
    pub fn of_type(key: impl Into<Box<[KeyPart]>>, verdict: bool) -> SetDecl {
        SetDecl {
            key: SetKey::Type(key.into()),
            data: if verdict {
                SetData::Verdict
            } else {
                SetData::None
            },
            flags: SetFlags::default(),
            timeout_secs: None,
        }
    }

    /// `typeof E . E : DATA ;`.
    pub fn of_typeof(key: impl Into<Box<[Expr]>>, data: SetData) -> SetDecl {
        SetDecl {
            key: SetKey::Typeof(key.into()),
            data,
            flags: SetFlags::default(),
            timeout_secs: None,
        }
    }

    /// Whether this is a map (`map`) rather than a set (`set`).
    pub fn is_map(&self) -> bool {
        self.data != SetData::None
    }

    /// `map` or `set`.
    pub fn keyword(&self) -> &'static str {
        if self.is_map() { "map" } else { "set" }
    }
}

impl Syntax for SetDecl {
    /// `type ipv4_addr . inet_proto . inet_service : verdict ; flags interval ; timeout 30s ;`
    fn write(&self, family: IpFamily, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            SetKey::Type(parts) => {
                f.write_str("type ")?;
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" . ")?;
                    }
                    p.fmt(f)?;
                }
            }
            SetKey::Typeof(exprs) => write!(f, "typeof {}", exprs.text(family))?,
        }
        match &self.data {
            SetData::None => {}
            SetData::Verdict => f.write_str(" : verdict")?,
            SetData::Typeof(exprs) => write!(f, " : {}", exprs.text(family))?,
        }
        f.write_str(" ;")?;
        let flags = [
            (self.flags.interval, "interval"),
            (self.flags.dynamic, "dynamic"),
            (self.flags.timeout, "timeout"),
        ];
        if flags.iter().any(|(on, _)| *on) {
            f.write_str(" flags ")?;
            let mut first = true;
            for (_, name) in flags.iter().filter(|(on, _)| *on) {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                f.write_str(name)?;
            }
            f.write_str(" ;")?;
        }
        if let Some(t) = self.timeout_secs {
            write!(f, " timeout {t}s ;")?;
        }
        Ok(())
    }
}

/// A `numgen random mod N` value, as a key component. Two-byte aligned, so that the keys
/// holding one stay 26 bytes rather than 28 (an endpoint map has an element per endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C, packed(2))]
pub struct Slot(pub u32);

impl Slot {
    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}

/// A set or map element's key. Every element of one set has the same kind of key. Kept
/// small and without heap (26 bytes): the maps hold one per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `ADDR` (`type ipv4_addr`).
    Addr(IpAddr),
    /// `ADDR/LEN` (`type ipv4_addr ; flags interval`).
    Prefix(IpNet),
    /// `ADDR . ADDR` with the same address twice (`type ipv4_addr . ipv4_addr`): a packet
    /// from an address to itself, the only pair the ruleset looks up (hairpin traffic).
    AddrTwice(IpAddr),
    /// `PROTO . PORT`.
    ProtoPort(Protocol, u16),
    /// `ADDR . PROTO . PORT`.
    AddrProtoPort(IpAddr, Protocol, u16),
    /// `PROTO . PORT . SLOT` (`typeof meta l4proto . th dport . numgen ...`).
    ProtoPortSlot(Protocol, u16, Slot),
    /// `ADDR . PROTO . PORT . SLOT`.
    AddrProtoPortSlot(IpAddr, Protocol, u16, Slot),
    /// `SLOT` (`typeof numgen ...`).
    Slot(Slot),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Addr(a) => a.fmt(f),
            Key::Prefix(n) => n.fmt(f),
            Key::AddrTwice(a) => write!(f, "{a} . {a}"),
            Key::ProtoPort(p, port) => write!(f, "{} . {port}", p.nft_name()),
            Key::AddrProtoPort(a, p, port) => write!(f, "{a} . {} . {port}", p.nft_name()),
            Key::ProtoPortSlot(p, port, slot) => {
                write!(f, "{} . {port} . {slot}", p.nft_name())
            }
            Key::AddrProtoPortSlot(a, p, port, slot) => {
                write!(f, "{a} . {} . {port} . {slot}", p.nft_name())
            }
            Key::Slot(slot) => write!(f, "{slot}"),
        }
    }
}

/// A map element's value (none for a set's). 24 bytes: an endpoint map holds one per
/// endpoint, and verdicts (boxed) are the fewer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// A set element's: nothing.
    None,
    /// A verdict map's.
    Verdict(Box<Verdict>),
    /// `ADDR . PORT`: an endpoint map's.
    AddrPort(IpAddr, u16),
}

impl Value {
    /// A verdict map's value.
    pub fn verdict(v: Verdict) -> Value {
        Value::Verdict(Box::new(v))
    }
}

impl fmt::Display for Value {
    /// Empty for [`Value::None`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::None => Ok(()),
            Value::Verdict(v) => (**v).fmt(f),
            Value::AddrPort(a, port) => write!(f, "{a} . {port}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> AddrValue {
        AddrValue::Net(s.parse().unwrap())
    }

    fn rule(family: IpFamily, stmts: Vec<Stmt>) -> String {
        Rule(stmts).text(family).to_string()
    }

    /// Each statement renders as the ruleset's text did before it was typed.
    #[test]
    fn rules_render_in_nft_syntax() {
        use IpFamily::{V4, V6};
        let jump = |c: &str| Stmt::Verdict(Verdict::jump(c));
        let goto = |c: &str| Stmt::Verdict(Verdict::goto(c));
        let cases: Vec<(IpFamily, Vec<Stmt>, &str)> = vec![
            (
                V4,
                vec![Stmt::Vmap {
                    key: Expr::FRONTEND.into(),
                    map: "service-ips".into(),
                }],
                "ip daddr . meta l4proto . th dport vmap @service-ips",
            ),
            (
                V6,
                vec![
                    Stmt::FibLocal(Addr::Destination),
                    Stmt::AddrCmp {
                        addr: Addr::Destination,
                        neq: true,
                        value: AddrValue::Addr(ip("::1")),
                    },
                    Stmt::Lookup {
                        key: [Expr::Addr(Addr::Destination)].into(),
                        neq: false,
                        set: "nodeport-ips".into(),
                    },
                    Stmt::Vmap {
                        key: [Expr::L4proto, Expr::Dport].into(),
                        map: "service-nodeports".into(),
                    },
                ],
                "fib daddr type local ip6 daddr != ::1 ip6 daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            ),
            (
                V4,
                vec![Stmt::CtStateNew, jump("services")],
                "ct state new jump services",
            ),
            (
                V4,
                vec![Stmt::SetMark(MarkOp::Or, 0x4000)],
                "meta mark set meta mark | 0x4000",
            ),
            (
                V4,
                vec![Stmt::SetMark(MarkOp::Xor, 0x4000)],
                "meta mark set meta mark ^ 0x4000",
            ),
            (
                V4,
                vec![
                    Stmt::Mark {
                        mask: 0x4000,
                        neq: false,
                        value: 0,
                    },
                    Stmt::Verdict(Verdict::Return),
                ],
                "meta mark & 0x4000 == 0 return",
            ),
            (
                V6,
                vec![
                    Stmt::Lookup {
                        key: [Expr::Addr(Addr::Source), Expr::Addr(Addr::Destination)].into(),
                        neq: false,
                        set: "hairpin".into(),
                    },
                    Stmt::Masquerade { fully_random: true },
                ],
                "ip6 saddr . ip6 daddr @hairpin masquerade fully-random",
            ),
            (
                V4,
                vec![Stmt::L4proto(Protocol::Tcp), Stmt::Reject(Reject::TcpReset)],
                "meta l4proto tcp reject with tcp reset",
            ),
            (
                V4,
                vec![Stmt::Reject(Reject::HostUnreachable)],
                "reject with icmp type host-unreachable",
            ),
            (
                V6,
                vec![Stmt::Reject(Reject::HostUnreachable)],
                "reject with icmpv6 type addr-unreachable",
            ),
            (
                V4,
                vec![
                    Stmt::Lookup {
                        key: [Expr::Addr(Addr::Destination)].into(),
                        neq: false,
                        set: "cluster-ips".into(),
                    },
                    Stmt::Reject(Reject::PortUnreachable),
                ],
                "ip daddr @cluster-ips reject",
            ),
            (
                V4,
                vec![Stmt::Update {
                    set: "aff-x".into(),
                    key: Addr::Source,
                }],
                "update @aff-x { ip saddr }",
            ),
            (
                V4,
                vec![
                    Stmt::L4proto(Protocol::Sctp),
                    Stmt::DnatTo(ip("10.244.1.1"), 8080),
                ],
                "meta l4proto sctp dnat to 10.244.1.1:8080",
            ),
            (
                V6,
                vec![
                    Stmt::L4proto(Protocol::Udp),
                    Stmt::DnatTo(ip("fd00:244::1"), 80),
                ],
                "meta l4proto udp dnat to [fd00:244::1]:80",
            ),
            (
                V4,
                vec![
                    Stmt::AddrCmp {
                        addr: Addr::Destination,
                        neq: false,
                        value: AddrValue::Addr(ip("10.96.0.10")),
                    },
                    Stmt::Dport(Protocol::Tcp, 80),
                    Stmt::AddrCmp {
                        addr: Addr::Source,
                        neq: true,
                        value: net("10.244.0.0/16"),
                    },
                    jump("mark-for-masquerade"),
                ],
                "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
            ),
            (
                V4,
                vec![Stmt::FibLocal(Addr::Source), goto("svc-x")],
                "fib saddr type local goto svc-x",
            ),
            (
                V4,
                vec![
                    Stmt::Numgen {
                        modulus: 2,
                        value: 0,
                    },
                    goto("ep"),
                ],
                "numgen random mod 2 0 goto ep",
            ),
            (
                V4,
                vec![Stmt::Vmap {
                    key: [Expr::Numgen(17)].into(),
                    map: "eps-x".into(),
                }],
                "numgen random mod 17 vmap @eps-x",
            ),
            (
                V4,
                vec![
                    Stmt::Lookup {
                        key: [Expr::Addr(Addr::Source)].into(),
                        neq: true,
                        set: "fw".into(),
                    },
                    Stmt::Verdict(Verdict::Drop),
                ],
                "ip saddr != @fw drop",
            ),
            (
                V6,
                vec![Stmt::DnatMap {
                    key: [
                        Expr::Addr(Addr::Destination),
                        Expr::L4proto,
                        Expr::Dport,
                        Expr::Numgen(3),
                    ]
                    .into(),
                    map: "endpoints".into(),
                }],
                "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints",
            ),
            (
                V4,
                vec![Stmt::Masquerade {
                    fully_random: false,
                }],
                "masquerade",
            ),
            (V4, vec![Stmt::Verdict(Verdict::Accept)], "accept"),
        ];
        for (family, stmts, text) in cases {
            assert_eq!(rule(family, stmts), text);
        }
    }

    #[test]
    fn declarations_render_in_nft_syntax() {
        let addr_key = [KeyPart::Ipv4, KeyPart::Proto, KeyPart::Service];
        assert_eq!(
            SetDecl::of_type(addr_key, true)
                .text(IpFamily::V4)
                .to_string(),
            "type ipv4_addr . inet_proto . inet_service : verdict ;"
        );
        let mut aff = SetDecl::of_type([KeyPart::Ipv6], false);
        aff.flags.dynamic = true;
        aff.flags.timeout = true;
        aff.timeout_secs = Some(30);
        assert_eq!(
            aff.text(IpFamily::V6).to_string(),
            "type ipv6_addr ; flags dynamic,timeout ; timeout 30s ;"
        );
        let mut ranges = SetDecl::of_type([KeyPart::Ipv4], false);
        ranges.flags.interval = true;
        assert_eq!(
            ranges.text(IpFamily::V4).to_string(),
            "type ipv4_addr ; flags interval ;"
        );
        let endpoints = SetDecl::of_typeof(
            [
                Expr::Addr(Addr::Destination),
                Expr::L4proto,
                Expr::Dport,
                Expr::Numgen(1),
            ],
            SetData::Typeof([Expr::Addr(Addr::Destination), Expr::Dport].into()),
        );
        assert!(endpoints.is_map());
        assert_eq!(
            endpoints.text(IpFamily::V6).to_string(),
            "typeof ip6 daddr . meta l4proto . th dport . numgen random mod 1 : ip6 daddr . th dport ;"
        );
        assert_eq!(
            SetDecl::of_typeof([Expr::Numgen(1)], SetData::Verdict)
                .text(IpFamily::V4)
                .to_string(),
            "typeof numgen random mod 1 : verdict ;"
        );
    }

    #[test]
    fn elements_render_in_nft_syntax() {
        let keys = [
            (Key::Addr(ip("10.96.0.1")), "10.96.0.1"),
            (Key::Prefix("10.0.0.7/32".parse().unwrap()), "10.0.0.7/32"),
            (Key::AddrTwice(ip("fd00::1")), "fd00::1 . fd00::1"),
            (Key::ProtoPort(Protocol::Udp, 30080), "udp . 30080"),
            (
                Key::AddrProtoPort(ip("10.96.0.2"), Protocol::Tcp, 80),
                "10.96.0.2 . tcp . 80",
            ),
            (
                Key::ProtoPortSlot(Protocol::Sctp, 30080, Slot(3)),
                "sctp . 30080 . 3",
            ),
            (
                Key::AddrProtoPortSlot(ip("fd00:96::9"), Protocol::Tcp, 80, Slot(0)),
                "fd00:96::9 . tcp . 80 . 0",
            ),
            (Key::Slot(Slot(16)), "16"),
        ];
        for (key, text) in keys {
            assert_eq!(key.to_string(), text);
        }
        assert_eq!(Value::None.to_string(), "");
        assert_eq!(
            Value::verdict(Verdict::goto("cluster-2")).to_string(),
            "goto cluster-2"
        );
        assert_eq!(
            Value::AddrPort(ip("10.244.2.2"), 8080).to_string(),
            "10.244.2.2 . 8080"
        );
        assert!(std::mem::size_of::<Value>() <= 24);
        assert!(
            std::mem::size_of::<Key>() <= 26,
            "{}",
            std::mem::size_of::<Key>()
        );
    }

    #[test]
    fn base_chains_render_hook_priority_and_policy() {
        let chain = |kind, hook, priority| {
            BaseChain {
                kind,
                hook,
                priority,
            }
            .to_string()
        };
        assert_eq!(
            chain(
                ChainType::Filter,
                Hook::Prerouting,
                Priority::Named(NamedPriority::Dstnat, -10)
            ),
            "type filter hook prerouting priority dstnat - 10 ; policy accept ;"
        );
        assert_eq!(
            chain(
                ChainType::Nat,
                Hook::Postrouting,
                Priority::Named(NamedPriority::Srcnat, 0)
            ),
            "type nat hook postrouting priority srcnat ; policy accept ;"
        );
        assert_eq!(
            chain(ChainType::Filter, Hook::Output, Priority::Number(-110)),
            "type filter hook output priority -110 ; policy accept ;"
        );
        assert_eq!(Priority::Named(NamedPriority::Dstnat, -10).value(), -110);
    }
}
