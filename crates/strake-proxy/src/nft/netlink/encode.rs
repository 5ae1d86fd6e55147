//! Encodes a typed [`Transaction`] as one nf_tables netlink batch.
//!
//! Each statement is linearised the way `nft` does it (learned from
//! `nft --debug=netlink,mnl`), so that `nft list` shows the same ruleset whichever backend
//! wrote it. Element keys and values carry their types, so no set declaration needs to be
//! remembered across syncs to encode them.

use std::net::IpAddr;

use super::wire::{
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_REQUEST, Writer, attr, msg,
};
use crate::model::{IpFamily, Protocol};
use crate::nft::TABLE;
use crate::nft::objects::{
    Addr, AddrValue, BaseChain, ChainType, Expr, Key, KeyPart, MarkOp, Reject, Rule, SetData,
    SetDecl, SetKey, Stmt, Value, Verdict,
};
use crate::nft::transaction::{Command, Transaction};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Keep the element list of one message well under the 64 KiB limit of a nested attribute.
const ELEMENTS_NEST_MAX: usize = 48 * 1024;

/// A command of the transaction that cannot be encoded; nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}: {command}")]
pub struct EncodeError {
    /// 1-based position of the command (its line in the rendered script).
    pub line: usize,
    /// The command, rendered.
    pub command: String,
    /// What is wrong with it.
    pub reason: String,
}

/// An encoded batch.
#[derive(Debug)]
pub struct Batch {
    /// The messages, `BATCH_BEGIN` to `BATCH_END`.
    pub bytes: Vec<u8>,
    /// Sequence number of `BATCH_BEGIN`.
    pub first_seq: u32,
    /// Sequence number of the last command message (the only one asking for an ACK), if any.
    pub last_seq: Option<u32>,
    /// The (0-based) command of each message, in order: a command may take several.
    pub commands: Vec<usize>,
}

impl Batch {
    /// The command (0-based) that produced message `seq`, if it was a command's.
    pub fn command_of(&self, seq: u32) -> Option<usize> {
        let index = seq.checked_sub(self.first_seq)?.checked_sub(1)?;
        self.commands.get(index as usize).copied()
    }
}

/// Encodes `tx` as one batch, starting at sequence number `first_seq`.
pub fn encode(tx: &Transaction<'_>, first_seq: u32) -> Result<Batch, EncodeError> {
    let mut enc = Encoder {
        w: Writer::new(),
        seq: first_seq,
        commands: Vec::new(),
        next_set_id: 1,
        last_start: None,
    };
    let start = enc.w.begin(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    enc.w.end(start);
    for (index, command) in tx.commands.iter().enumerate() {
        enc.command(index, command)
            .and_then(|()| {
                if enc.w.overflowed() {
                    Err("a netlink attribute would exceed 65535 bytes".to_string())
                } else {
                    Ok(())
                }
            })
            .map_err(|reason| EncodeError {
                line: index + 1,
                command: command.to_string(),
                reason,
            })?;
    }
    // Only the last command asks for an ACK: the kernel handles the batch synchronously inside
    // `sendmsg`, so that ACK (or the errors) are queued on the socket when it returns.
    let last_seq = enc.last_start.map(|start| {
        let flags_at = start + 6;
        let mut flags = [0u8; 2];
        flags.copy_from_slice(&enc.w.bytes()[flags_at..flags_at + 2]);
        let flags = u16::from_ne_bytes(flags) | NLM_F_ACK;
        enc.w.set_u16_at(flags_at, flags);
        enc.seq
    });
    enc.seq += 1;
    let end = enc.w.begin(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        enc.seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    enc.w.end(end);
    Ok(Batch {
        bytes: enc.w.into_bytes(),
        first_seq,
        last_seq,
        commands: enc.commands,
    })
}

type Res<T> = Result<T, String>;

fn af(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => AF_INET,
        IpFamily::V6 => AF_INET6,
    }
}

/// A component of a set's key or data, as the kernel sizes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Ipv4,
    Ipv6,
    Proto,
    Service,
    /// A host-order 32-bit integer (`numgen`).
    Integer,
}

impl Part {
    fn type_id(self) -> u32 {
        match self {
            Part::Integer => 4,
            Part::Ipv4 => 7,
            Part::Ipv6 => 8,
            Part::Proto => 12,
            Part::Service => 13,
        }
    }

    fn len(self) -> usize {
        match self {
            Part::Ipv4 | Part::Integer => 4,
            Part::Ipv6 => 16,
            Part::Proto => 1,
            Part::Service => 2,
        }
    }

    fn of_type(part: KeyPart) -> Part {
        match part {
            KeyPart::Ipv4 => Part::Ipv4,
            KeyPart::Ipv6 => Part::Ipv6,
            KeyPart::Proto => Part::Proto,
            KeyPart::Service => Part::Service,
        }
    }

    fn of_expr(expr: Expr, family: IpFamily) -> Part {
        match expr {
            Expr::Addr(_) if family == IpFamily::V4 => Part::Ipv4,
            Expr::Addr(_) => Part::Ipv6,
            Expr::L4proto => Part::Proto,
            Expr::Dport => Part::Service,
            Expr::Numgen(_) => Part::Integer,
        }
    }
}

/// Length of a key or value of these components (each padded to 4 bytes when several).
fn concat_len(parts: &[Part]) -> usize {
    if parts.len() == 1 {
        parts[0].len()
    } else {
        parts.iter().map(|p| (p.len() + 3) & !3).sum()
    }
}

/// nft's type id of a concatenation: 6 bits per component.
fn concat_type(parts: &[Part]) -> u32 {
    parts.iter().fold(0u32, |acc, p| (acc << 6) | p.type_id())
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

struct Encoder {
    w: Writer,
    seq: u32,
    commands: Vec<usize>,
    next_set_id: u32,
    last_start: Option<usize>,
}

impl Encoder {
    fn message(&mut self, command: usize, cmd: u16, flags: u16, family: IpFamily) -> usize {
        self.seq += 1;
        self.commands.push(command);
        let start = self.w.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | cmd,
            NLM_F_REQUEST | flags,
            self.seq,
            af(family),
            0,
        );
        self.last_start = Some(start);
        start
    }

    fn command(&mut self, index: usize, command: &Command<'_>) -> Res<()> {
        match command {
            Command::AddTable(family) => {
                let m = self.message(index, msg::NEWTABLE, NLM_F_CREATE, *family);
                self.w.str(attr::TABLE_NAME, TABLE);
                self.w.u32(attr::TABLE_FLAGS, 0);
                self.w.end(m);
            }
            Command::DeleteTable(family) => {
                let m = self.message(index, msg::DELTABLE, 0, *family);
                self.w.str(attr::TABLE_NAME, TABLE);
                self.w.end(m);
            }
            Command::AddChain { family, name, base } => {
                let m = self.message(index, msg::NEWCHAIN, NLM_F_CREATE, *family);
                self.w.str(attr::CHAIN_TABLE, TABLE);
                self.w.str(attr::CHAIN_NAME, name);
                if let Some(base) = base {
                    self.base_chain(base);
                }
                self.w.end(m);
            }
            Command::FlushChain { family, name } => {
                let m = self.message(index, msg::DELRULE, 0, *family);
                self.w.str(attr::RULE_TABLE, TABLE);
                self.w.str(attr::RULE_CHAIN, name);
                self.w.end(m);
            }
            Command::DeleteChain { family, name } => {
                let m = self.message(index, msg::DELCHAIN, 0, *family);
                self.w.str(attr::CHAIN_TABLE, TABLE);
                self.w.str(attr::CHAIN_NAME, name);
                self.w.end(m);
            }
            Command::AddSet { family, name, decl } => self.set(index, *family, name, decl)?,
            Command::DeleteSet { family, name, .. } => {
                let m = self.message(index, msg::DELSET, 0, *family);
                self.w.str(attr::SET_TABLE, TABLE);
                self.w.str(attr::SET_NAME, name);
                self.w.end(m);
            }
            Command::AddElements {
                family,
                set,
                elements,
            } => {
                let encoded = elements.iter().map(|(k, v)| (*k, Some(*v))).try_fold(
                    Vec::new(),
                    |mut out, (k, v)| {
                        push_element(&mut out, *family, k, v)?;
                        Ok::<_, String>(out)
                    },
                )?;
                self.elements(index, *family, set, true, &encoded);
            }
            Command::DeleteElements { family, set, keys } => {
                let encoded = keys.iter().try_fold(Vec::new(), |mut out, k| {
                    push_element(&mut out, *family, k, None)?;
                    Ok::<_, String>(out)
                })?;
                self.elements(index, *family, set, false, &encoded);
            }
            Command::AddRule {
                family,
                chain,
                rule,
            } => {
                let m = self.message(index, msg::NEWRULE, NLM_F_CREATE | NLM_F_APPEND, *family);
                self.w.str(attr::RULE_TABLE, TABLE);
                self.w.str(attr::RULE_CHAIN, chain);
                let list = self.w.open(attr::RULE_EXPRESSIONS);
                Exprs {
                    w: &mut self.w,
                    family: *family,
                }
                .rule(rule)?;
                self.w.close(list);
                self.w.end(m);
            }
        }
        Ok(())
    }

    fn base_chain(&mut self, base: &BaseChain) {
        self.w.str(
            attr::CHAIN_TYPE,
            match base.kind {
                ChainType::Filter => "filter",
                ChainType::Nat => "nat",
            },
        );
        self.w.u32(attr::CHAIN_POLICY, 1); // NF_ACCEPT
        let n = self.w.open(attr::CHAIN_HOOK);
        self.w.u32(attr::HOOK_HOOKNUM, base.hook.number());
        self.w
            .u32(attr::HOOK_PRIORITY, base.priority.value() as u32);
        self.w.close(n);
    }

    fn set(&mut self, index: usize, family: IpFamily, name: &str, decl: &SetDecl) -> Res<()> {
        let key: Vec<Part> = match &decl.key {
            SetKey::Type(parts) => parts.iter().map(|p| Part::of_type(*p)).collect(),
            SetKey::Typeof(exprs) => exprs.iter().map(|e| Part::of_expr(*e, family)).collect(),
        };
        let data: Vec<Part> = match &decl.data {
            SetData::Typeof(exprs) => exprs.iter().map(|e| Part::of_expr(*e, family)).collect(),
            SetData::None | SetData::Verdict => Vec::new(),
        };
        if key.is_empty() {
            return Err("set without a key type".into());
        }
        let udata = set_udata(decl, family)?;
        let mut flags = 0u32;
        if decl.flags.interval {
            flags |= 0x4; // NFT_SET_INTERVAL
        }
        if decl.is_map() {
            flags |= 0x8; // NFT_SET_MAP
        }
        if decl.flags.timeout || decl.timeout_secs.is_some() {
            flags |= 0x10; // NFT_SET_TIMEOUT
        }
        if decl.flags.dynamic {
            flags |= 0x20; // NFT_SET_EVAL
        }
        let m = self.message(index, msg::NEWSET, NLM_F_CREATE, family);
        self.w.str(attr::SET_TABLE, TABLE);
        self.w.str(attr::SET_NAME, name);
        self.w.u32(attr::SET_FLAGS, flags);
        self.w.u32(attr::SET_KEY_TYPE, concat_type(&key));
        self.w.u32(attr::SET_KEY_LEN, concat_len(&key) as u32);
        if decl.data == SetData::Verdict {
            self.w.u32(attr::SET_DATA_TYPE, 0xffff_ff00);
            self.w.u32(attr::SET_DATA_LEN, 0);
        } else if !data.is_empty() {
            self.w.u32(attr::SET_DATA_TYPE, concat_type(&data));
            self.w.u32(attr::SET_DATA_LEN, concat_len(&data) as u32);
        }
        if let Some(secs) = decl.timeout_secs {
            self.w.u64(attr::SET_TIMEOUT, u64::from(secs) * 1000);
        }
        self.w.u32(attr::SET_ID, self.next_set_id);
        self.next_set_id += 1;
        self.w.attr(attr::SET_USERDATA, udata);
        self.w.end(m);
        Ok(())
    }

    fn elements(
        &mut self,
        index: usize,
        family: IpFamily,
        set: &str,
        add: bool,
        encoded: &[Element],
    ) {
        let mut iter = encoded.iter().peekable();
        while iter.peek().is_some() {
            let m = if add {
                self.message(index, msg::NEWSETELEM, NLM_F_CREATE, family)
            } else {
                self.message(index, msg::DELSETELEM, 0, family)
            };
            self.w.str(attr::SET_ELEM_LIST_TABLE, TABLE);
            self.w.str(attr::SET_ELEM_LIST_SET, set);
            let list = self.w.open(attr::SET_ELEM_LIST_ELEMENTS);
            while let Some(e) = iter.next_if(|_| self.w.since(list) < ELEMENTS_NEST_MAX) {
                let n = self.w.open(attr::LIST_ELEM);
                if e.interval_end {
                    self.w.u32(attr::SET_ELEM_FLAGS, 1); // NFT_SET_ELEM_INTERVAL_END
                }
                self.w.data_value(attr::SET_ELEM_KEY, &e.key);
                match &e.data {
                    Some(ElementData::Verdict(v)) => self.w.data_verdict(attr::SET_ELEM_DATA, v),
                    Some(ElementData::Value(v)) => self.w.data_value(attr::SET_ELEM_DATA, v),
                    None => {}
                }
                if e.open_interval && add {
                    self.w
                        .attr(attr::SET_ELEM_USERDATA, &UDATA_ELEM_INTERVAL_OPEN);
                }
                self.w.close(n);
            }
            self.w.close(list);
            self.w.end(m);
        }
    }
}

/// A map element's value, encoded.
enum ElementData<'a> {
    Verdict(&'a Verdict),
    Value(Vec<u8>),
}

struct Element<'a> {
    key: Vec<u8>,
    data: Option<ElementData<'a>>,
    /// The end of an interval (the first address after a prefix).
    interval_end: bool,
    /// A prefix that reaches the end of the address space: no end element.
    open_interval: bool,
}

/// Appends the encoded element(s) of `key` (and `value`, when adding): one element, or for
/// a prefix the start of its interval and, unless it reaches the end of the address space,
/// its end.
fn push_element<'a>(
    out: &mut Vec<Element<'a>>,
    family: IpFamily,
    key: &Key,
    value: Option<&'a Value>,
) -> Res<()> {
    let data = match value {
        None | Some(Value::None) => None,
        Some(Value::Verdict(v)) => Some(ElementData::Verdict(v)),
        Some(Value::AddrPort(ip, port)) => {
            check_family(*ip, family)?;
            let mut v = addr_bytes(*ip);
            v.resize((v.len() + 3) & !3, 0);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&[0, 0]);
            Some(ElementData::Value(v))
        }
    };
    if let Key::Prefix(net) = key {
        check_family(net.addr(), family)?;
        let (start, end) = prefix_range(*net);
        match end {
            Some(end) => {
                out.push(Element {
                    key: start,
                    data,
                    interval_end: false,
                    open_interval: false,
                });
                out.push(Element {
                    key: end,
                    data: None,
                    interval_end: true,
                    open_interval: false,
                });
            }
            None => out.push(Element {
                key: start,
                data,
                interval_end: false,
                open_interval: true,
            }),
        }
        return Ok(());
    }
    out.push(Element {
        key: key_bytes(key, family)?,
        data,
        interval_end: false,
        open_interval: false,
    });
    Ok(())
}

fn check_family(ip: IpAddr, family: IpFamily) -> Res<()> {
    if family.contains(ip) {
        Ok(())
    } else {
        Err(format!("{ip} is not of the table's family"))
    }
}

/// A key's bytes: one component as it is, several each padded to 4 bytes.
fn key_bytes(key: &Key, family: IpFamily) -> Res<Vec<u8>> {
    let mut out = Vec::with_capacity(28);
    let mut part = |bytes: &[u8]| {
        out.extend_from_slice(bytes);
        out.resize((out.len() + 3) & !3, 0);
    };
    match key {
        Key::Addr(ip) => {
            check_family(*ip, family)?;
            return Ok(addr_bytes(*ip));
        }
        Key::Slot(slot) => return Ok(slot.get().to_ne_bytes().to_vec()),
        Key::Prefix(_) => return Err("a prefix outside an interval".into()),
        Key::AddrTwice(ip) => {
            check_family(*ip, family)?;
            part(&addr_bytes(*ip));
            part(&addr_bytes(*ip));
        }
        Key::ProtoPort(p, port) => {
            part(&[proto_number(*p)]);
            part(&port.to_be_bytes());
        }
        Key::AddrProtoPort(ip, p, port) => {
            check_family(*ip, family)?;
            part(&addr_bytes(*ip));
            part(&[proto_number(*p)]);
            part(&port.to_be_bytes());
        }
        Key::ProtoPortSlot(p, port, slot) => {
            part(&[proto_number(*p)]);
            part(&port.to_be_bytes());
            part(&slot.get().to_ne_bytes());
        }
        Key::AddrProtoPortSlot(ip, p, port, slot) => {
            check_family(*ip, family)?;
            part(&addr_bytes(*ip));
            part(&[proto_number(*p)]);
            part(&port.to_be_bytes());
            part(&slot.get().to_ne_bytes());
        }
    }
    Ok(out)
}

/// A prefix as an interval: (first address, first address after it, if any).
fn prefix_range(net: ipnet::IpNet) -> (Vec<u8>, Option<Vec<u8>>) {
    let start = addr_bytes(net.network());
    let bits = start.len() as u32 * 8;
    let host_bits = bits - u32::from(net.prefix_len());
    if host_bits == bits {
        return (start, None);
    }
    // start + 2^host_bits, big-endian, or None on overflow.
    let carry_at = bits - host_bits - 1; // bit index (from the top) to add 1 at
    let mut end = start.clone();
    let mut byte = (carry_at / 8) as usize;
    let mut add: u16 = 1 << (7 - carry_at % 8);
    loop {
        let sum = u16::from(end[byte]) + add;
        end[byte] = sum as u8;
        add = sum >> 8;
        if add == 0 {
            return (start, Some(end));
        }
        if byte == 0 {
            return (start, None);
        }
        byte -= 1;
    }
}

/// nft's user data of a set declaration: how to print its key (byte order, `typeof`
/// expressions). Without it `nft list` would print these sets differently from the ones nft
/// created. Learned from `nft --debug=mnl`.
fn set_udata(decl: &SetDecl, family: IpFamily) -> Res<&'static [u8]> {
    use Expr::{Dport, L4proto, Numgen};
    let daddr = Expr::Addr(Addr::Destination);
    let v4 = family == IpFamily::V4;
    Ok(match (&decl.key, &decl.data) {
        (SetKey::Typeof(key), SetData::Verdict) if **key == [Numgen(1)] => {
            &UDATA_TYPEOF_NUMGEN_VERDICT
        }
        (SetKey::Typeof(key), SetData::Typeof(data)) if **data == [daddr, Dport] => {
            match (&**key, v4) {
                ([a, L4proto, Dport, Numgen(1)], true) if *a == daddr => &UDATA_TYPEOF_ENDPOINTS_V4,
                ([a, L4proto, Dport, Numgen(1)], false) if *a == daddr => {
                    &UDATA_TYPEOF_ENDPOINTS_V6
                }
                ([L4proto, Dport, Numgen(1)], true) => &UDATA_TYPEOF_NODEPORT_ENDPOINTS_V4,
                ([L4proto, Dport, Numgen(1)], false) => &UDATA_TYPEOF_NODEPORT_ENDPOINTS_V6,
                _ => return Err(format!("unsupported typeof {key:?}")),
            }
        }
        (SetKey::Typeof(key), _) => return Err(format!("unsupported typeof {key:?}")),
        (SetKey::Type(_), SetData::Typeof(_)) => {
            return Err("a `type` key with `typeof` data".into());
        }
        (SetKey::Type(_), SetData::Verdict) => &UDATA_TYPE_VERDICT_MAP,
        (SetKey::Type(parts), SetData::None) if parts.len() > 1 => &UDATA_CONCAT_SET,
        (SetKey::Type(_), SetData::None) => &UDATA_BIG_ENDIAN_KEY,
    })
}

/// Set user data nft writes for `type ipvX_addr` sets: key byte order big endian.
const UDATA_BIG_ENDIAN_KEY: [u8; 6] = [0, 4, 2, 0, 0, 0];
/// ... for `type A . B . C : verdict` maps.
const UDATA_TYPE_VERDICT_MAP: [u8; 28] = [
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 0x0d, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0,
];
/// ... for `typeof numgen random mod N : verdict` maps.
const UDATA_TYPEOF_NUMGEN_VERDICT: [u8; 56] = [
    0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 0x1a, 0, 4, 0x17, 0, 0, 0, 1, 0x12, 0, 4, 1, 0, 0, 0, 1,
    4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 8, 0, 4, 1, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0,
];
/// ... for `type A . B` sets.
const UDATA_CONCAT_SET: [u8; 16] = [0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0];
/// ... for the `typeof` maps of the ruleset: endpoint maps keyed by a frontend and a slot.
const UDATA_TYPEOF_ENDPOINTS_V4: [u8; 170] = [
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 96, 0, 4, 13, 0, 0, 0, 1, 88, 0, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 14, 0, 4, 9, 0, 0, 0, 1, 6, 0, 4, 16, 0, 0, 0,
    2, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 3, 26, 0, 4, 23, 0, 0, 0,
    1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44,
    0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];
const UDATA_TYPEOF_ENDPOINTS_V6: [u8; 170] = [
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 96, 0, 4, 13, 0, 0, 0, 1, 88, 0, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 14, 0, 4, 9, 0, 0, 0, 1, 6, 0, 4, 16, 0, 0, 0,
    2, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 3, 26, 0, 4, 23, 0, 0, 0,
    1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44,
    0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];
const UDATA_TYPEOF_NODEPORT_ENDPOINTS_V4: [u8; 148] = [
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 74, 0, 4, 13, 0, 0, 0, 1, 66, 0, 14, 0, 4, 9, 0, 0, 0,
    1, 6, 0, 4, 16, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0,
    2, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52,
    0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0,
    1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];
const UDATA_TYPEOF_NODEPORT_ENDPOINTS_V6: [u8; 148] = [
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 74, 0, 4, 13, 0, 0, 0, 1, 66, 0, 14, 0, 4, 9, 0, 0, 0,
    1, 6, 0, 4, 16, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0,
    2, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52,
    0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0,
    1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];

/// Element user data nft writes for an interval open to the end of the address space.
const UDATA_ELEM_INTERVAL_OPEN: [u8; 6] = [1, 4, 1, 0, 0, 0];

// Registers: 0 is the verdict, 1-4 the 16-byte ones, 8-23 the 4-byte ones.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;

/// The register nft puts a concatenation component at `offset` bytes into: the 16-byte
/// register when aligned to one, else the 4-byte one.
fn concat_reg(offset: usize) -> u32 {
    if offset.is_multiple_of(16) {
        REG_1 + (offset / 16) as u32
    } else {
        8 + (offset / 4) as u32
    }
}

const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const META_MARK: u32 = 3;
const META_L4PROTO: u32 = 16;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;

/// Writes a rule's expressions.
struct Exprs<'a> {
    w: &'a mut Writer,
    family: IpFamily,
}

impl Exprs<'_> {
    fn rule(&mut self, rule: &Rule) -> Res<()> {
        for stmt in rule.stmts() {
            self.stmt(stmt)?;
        }
        Ok(())
    }

    fn stmt(&mut self, stmt: &Stmt) -> Res<()> {
        let v6 = self.family == IpFamily::V6;
        match stmt {
            Stmt::AddrCmp { addr, neq, value } => self.addr_cmp(*addr, *neq, value)?,
            Stmt::Lookup { key, neq, set } => {
                self.concat(key);
                self.lookup(REG_1, set, None, *neq);
            }
            Stmt::L4proto(p) => self.l4proto_match(*p),
            Stmt::Dport(p, port) => {
                self.l4proto_match(*p);
                self.load(Expr::Dport, REG_1);
                self.cmp(REG_1, CMP_EQ, &port.to_be_bytes());
            }
            Stmt::CtStateNew => {
                self.expr("ct", |w| {
                    w.u32(1, REG_1); // NFTA_CT_DREG
                    w.u32(2, 0); // NFTA_CT_KEY: NFT_CT_STATE
                });
                self.bitwise(REG_1, &8u32.to_ne_bytes(), &0u32.to_ne_bytes());
                self.cmp(REG_1, CMP_NEQ, &0u32.to_ne_bytes());
            }
            Stmt::FibLocal(addr) => {
                let flags = match addr {
                    Addr::Source => 1u32,
                    Addr::Destination => 2u32,
                };
                self.expr("fib", |w| {
                    w.u32(1, REG_1); // NFTA_FIB_DREG
                    w.u32(2, 3); // NFTA_FIB_RESULT: NFT_FIB_RESULT_ADDRTYPE
                    w.u32(3, flags); // NFTA_FIB_FLAGS
                });
                self.cmp(REG_1, CMP_EQ, &2u32.to_ne_bytes()); // RTN_LOCAL
            }
            Stmt::Numgen { modulus, value } => {
                self.load(Expr::Numgen(*modulus), REG_1);
                self.cmp(REG_1, CMP_EQ, &value.to_ne_bytes());
            }
            Stmt::Mark { mask, neq, value } => {
                self.meta_load(META_MARK, REG_1);
                self.bitwise(REG_1, &mask.to_ne_bytes(), &0u32.to_ne_bytes());
                let op = if *neq { CMP_NEQ } else { CMP_EQ };
                self.cmp(REG_1, op, &value.to_ne_bytes());
            }
            Stmt::SetMark(op, value) => {
                let (mask, xor) = match op {
                    MarkOp::Or => (!value, *value),
                    MarkOp::Xor => (u32::MAX, *value),
                };
                self.meta_load(META_MARK, REG_1);
                self.bitwise(REG_1, &mask.to_ne_bytes(), &xor.to_ne_bytes());
                self.expr("meta", |w| {
                    w.u32(2, META_MARK); // NFTA_META_KEY
                    w.u32(3, REG_1); // NFTA_META_SREG
                });
            }
            Stmt::Update { set, key } => {
                self.load(Expr::Addr(*key), REG_1);
                self.expr("dynset", |w| {
                    w.u32(4, REG_1); // NFTA_DYNSET_SREG_KEY
                    w.u32(3, 1); // NFTA_DYNSET_OP: NFT_DYNSET_OP_UPDATE
                    w.str(1, set); // NFTA_DYNSET_SET_NAME
                });
            }
            Stmt::DnatTo(ip, port) => {
                check_family(*ip, self.family)?;
                self.immediate(REG_1, &addr_bytes(*ip));
                self.immediate(REG_2, &port.to_be_bytes());
                let family = u32::from(af(self.family));
                self.expr("nat", |w| {
                    w.u32(1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
                    w.u32(2, family); // NFTA_NAT_FAMILY
                    w.u32(3, REG_1); // NFTA_NAT_REG_ADDR_MIN
                    w.u32(5, REG_2); // NFTA_NAT_REG_PROTO_MIN
                    w.u32(7, 0x2); // NFTA_NAT_FLAGS: NF_NAT_RANGE_PROTO_SPECIFIED
                });
            }
            Stmt::DnatMap { key, map } => {
                // The key in consecutive registers; the looked-up value's address and port
                // feed the nat expression.
                self.concat(key);
                self.lookup(REG_1, map, Some(REG_1), false);
                let family = u32::from(af(self.family));
                let proto_reg = concat_reg(if v6 { 16 } else { 4 });
                self.expr("nat", |w| {
                    w.u32(1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
                    w.u32(2, family); // NFTA_NAT_FAMILY
                    w.u32(3, REG_1); // NFTA_NAT_REG_ADDR_MIN
                    w.u32(5, proto_reg); // NFTA_NAT_REG_PROTO_MIN
                });
            }
            Stmt::Vmap { key, map } => {
                self.concat(key);
                self.lookup(REG_1, map, Some(REG_VERDICT), false);
            }
            Stmt::Masquerade { fully_random } => {
                let flags = if *fully_random { 0x10u32 } else { 0 }; // NF_NAT_RANGE_PROTO_RANDOM_FULLY
                self.expr("masq", |w| {
                    if flags != 0 {
                        w.u32(1, flags); // NFTA_MASQ_FLAGS
                    }
                });
            }
            Stmt::Reject(reject) => {
                let (kind, code): (u32, u8) = match (reject, v6) {
                    (Reject::TcpReset, _) => (1, 0),
                    (Reject::HostUnreachable, false) => (0, 1), // host-unreachable
                    (Reject::HostUnreachable, true) => (0, 3),  // addr-unreachable
                    (Reject::PortUnreachable, false) => (0, 3),
                    (Reject::PortUnreachable, true) => (0, 4),
                };
                self.expr("reject", |w| {
                    w.u32(1, kind); // NFTA_REJECT_TYPE
                    w.attr(2, &[code]); // NFTA_REJECT_ICMP_CODE
                });
            }
            Stmt::Verdict(v) => {
                self.expr("immediate", |w| {
                    w.u32(1, REG_VERDICT); // NFTA_IMMEDIATE_DREG
                    w.data_verdict(2, v); // NFTA_IMMEDIATE_DATA
                });
            }
        }
        Ok(())
    }

    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Writer)) {
        let elem = self.w.open(attr::LIST_ELEM);
        self.w.str(attr::EXPR_NAME, name);
        let data = self.w.open(attr::EXPR_DATA);
        body(self.w);
        self.w.close(data);
        self.w.close(elem);
    }

    fn payload(&mut self, dreg: u32, base: u32, offset: u32, len: u32) {
        self.expr("payload", |w| {
            w.u32(1, dreg); // NFTA_PAYLOAD_DREG
            w.u32(2, base); // NFTA_PAYLOAD_BASE
            w.u32(3, offset); // NFTA_PAYLOAD_OFFSET
            w.u32(4, len); // NFTA_PAYLOAD_LEN
        });
    }

    /// Where an address lies in the network header: (offset, length).
    fn addr_field(&self, addr: Addr) -> (u32, u32) {
        match (self.family, addr) {
            (IpFamily::V4, Addr::Source) => (12, 4),
            (IpFamily::V4, Addr::Destination) => (16, 4),
            (IpFamily::V6, Addr::Source) => (8, 16),
            (IpFamily::V6, Addr::Destination) => (24, 16),
        }
    }

    /// Loads `expr` into `dreg`.
    fn load(&mut self, expr: Expr, dreg: u32) {
        match expr {
            Expr::Addr(addr) => {
                let (offset, len) = self.addr_field(addr);
                self.payload(dreg, PAYLOAD_NETWORK, offset, len);
            }
            Expr::L4proto => self.meta_load(META_L4PROTO, dreg),
            Expr::Dport => self.payload(dreg, PAYLOAD_TRANSPORT, 2, 2),
            Expr::Numgen(modulus) => self.expr("numgen", |w| {
                w.u32(1, dreg); // NFTA_NG_DREG
                w.u32(2, modulus); // NFTA_NG_MODULUS
                w.u32(3, 1); // NFTA_NG_TYPE: NFT_NG_RANDOM
            }),
        }
    }

    /// Loads a key, one value or a concatenation, into registers from [`REG_1`] on.
    fn concat(&mut self, key: &[Expr]) {
        let mut offset = 0;
        for e in key {
            self.load(*e, concat_reg(offset));
            offset += (Part::of_expr(*e, self.family).len() + 3) & !3;
        }
    }

    fn meta_load(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |w| {
            w.u32(2, key); // NFTA_META_KEY
            w.u32(1, dreg); // NFTA_META_DREG
        });
    }

    fn cmp(&mut self, sreg: u32, op: u32, data: &[u8]) {
        self.expr("cmp", |w| {
            w.u32(1, sreg); // NFTA_CMP_SREG
            w.u32(2, op); // NFTA_CMP_OP
            w.data_value(3, data); // NFTA_CMP_DATA
        });
    }

    fn bitwise(&mut self, reg: u32, mask: &[u8], xor: &[u8]) {
        let len = mask.len() as u32;
        self.expr("bitwise", |w| {
            w.u32(1, reg); // NFTA_BITWISE_SREG
            w.u32(2, reg); // NFTA_BITWISE_DREG
            w.u32(3, len); // NFTA_BITWISE_LEN
            w.data_value(4, mask); // NFTA_BITWISE_MASK
            w.data_value(5, xor); // NFTA_BITWISE_XOR
        });
    }

    fn lookup(&mut self, sreg: u32, set: &str, dreg: Option<u32>, invert: bool) {
        self.expr("lookup", |w| {
            w.u32(2, sreg); // NFTA_LOOKUP_SREG
            if let Some(d) = dreg {
                w.u32(3, d); // NFTA_LOOKUP_DREG
            }
            w.str(1, set); // NFTA_LOOKUP_SET
            if invert {
                w.u32(5, 1); // NFTA_LOOKUP_FLAGS: NFT_LOOKUP_F_INV
            }
        });
    }

    fn immediate(&mut self, dreg: u32, data: &[u8]) {
        self.expr("immediate", |w| {
            w.u32(1, dreg);
            w.data_value(2, data);
        });
    }

    fn l4proto_match(&mut self, p: Protocol) {
        self.meta_load(META_L4PROTO, REG_1);
        self.cmp(REG_1, CMP_EQ, &[proto_number(p)]);
    }

    /// `ip saddr|daddr [!=] ADDR|PREFIX`.
    fn addr_cmp(&mut self, addr: Addr, neq: bool, value: &AddrValue) -> Res<()> {
        let (offset, len) = self.addr_field(addr);
        let net = match value {
            AddrValue::Addr(ip) => ipnet::IpNet::from(*ip),
            AddrValue::Net(net) => *net,
        };
        check_family(net.addr(), self.family)?;
        let octets = addr_bytes(net.network());
        let op = if neq { CMP_NEQ } else { CMP_EQ };
        let prefix = u32::from(net.prefix_len());
        if prefix.is_multiple_of(8) && prefix > 0 {
            // Byte-aligned prefixes compare only their leading bytes.
            let n = (prefix / 8) as usize;
            self.payload(REG_1, PAYLOAD_NETWORK, offset, n as u32);
            self.cmp(REG_1, op, &octets[..n]);
        } else {
            let mask = prefix_mask(prefix, len as usize);
            self.payload(REG_1, PAYLOAD_NETWORK, offset, len);
            self.bitwise(REG_1, &mask, &vec![0; len as usize]);
            self.cmp(REG_1, op, &octets);
        }
        Ok(())
    }
}

fn prefix_mask(prefix: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let bits = prefix.saturating_sub(8 * i as u32).min(8);
            if bits == 0 { 0 } else { 0xffu8 << (8 - bits) }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nft::objects::{AddrValue, Slot, Syntax as _};
    use crate::nft::ruleset::Ruleset;

    /// Attributes of a netlink attribute stream: (type without flags, payload).
    fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
            let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
            out.push((ty, &b[4..len]));
            b = &b[((len + 3) & !3).min(b.len())..];
        }
        out
    }

    fn get<'a>(a: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
        a.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
    }

    fn be(a: &[(u16, &[u8])], ty: u16) -> u32 {
        u32::from_be_bytes(get(a, ty).unwrap().try_into().unwrap())
    }

    fn string(v: &[u8]) -> String {
        String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap()).into_owned()
    }

    /// Data as libnftnl prints it: native-endian 32-bit words.
    fn words(v: &[u8]) -> String {
        v.chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                format!("0x{:08x}", u32::from_ne_bytes(w))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn data(nested: &[u8]) -> String {
        let a = attrs(nested);
        if let Some(v) = get(&a, attr::DATA_VALUE) {
            return words(v);
        }
        let v = attrs(get(&a, attr::DATA_VERDICT).unwrap());
        let code = be(&v, attr::VERDICT_CODE) as i32;
        let chain = get(&v, attr::VERDICT_CHAIN).map(string);
        match (code, chain) {
            (0, _) => "drop".into(),
            (1, _) => "accept".into(),
            (-5, _) => "return".into(),
            (-3, Some(c)) => format!("jump -> {c}"),
            (-4, Some(c)) => format!("goto -> {c}"),
            other => panic!("verdict {other:?}"),
        }
    }

    /// One rule message rendered like `nft --debug=netlink` prints it (libnftnl's format).
    fn render(message: &[u8]) -> Vec<String> {
        let top = attrs(&message[20..]);
        let exprs = attrs(get(&top, attr::RULE_EXPRESSIONS).unwrap());
        exprs
            .iter()
            .map(|(_, e)| {
                let e = attrs(e);
                let name = string(get(&e, attr::EXPR_NAME).unwrap());
                let d = attrs(get(&e, attr::EXPR_DATA).unwrap());
                let text = match name.as_str() {
                    "payload" => format!(
                        "payload load {}b @ {} header + {} => reg {}",
                        be(&d, 4),
                        ["link", "network", "transport"][be(&d, 2) as usize],
                        be(&d, 3),
                        be(&d, 1)
                    ),
                    "meta" => {
                        let key = match be(&d, 2) {
                            3 => "mark",
                            16 => "l4proto",
                            k => panic!("meta key {k}"),
                        };
                        match get(&d, 1) {
                            Some(_) => format!("meta load {key} => reg {}", be(&d, 1)),
                            None => format!("meta set {key} with reg {}", be(&d, 3)),
                        }
                    }
                    "cmp" => format!(
                        "cmp {} reg {} {}",
                        ["eq", "neq"][be(&d, 2) as usize],
                        be(&d, 1),
                        data(get(&d, 3).unwrap())
                    ),
                    "bitwise" => format!(
                        "bitwise reg {} = ( reg {} & {} ) ^ {}",
                        be(&d, 2),
                        be(&d, 1),
                        data(get(&d, 4).unwrap()),
                        data(get(&d, 5).unwrap())
                    ),
                    "immediate" => {
                        format!("immediate reg {} {}", be(&d, 1), data(get(&d, 2).unwrap()))
                    }
                    "lookup" => {
                        let mut s = format!(
                            "lookup reg {} set {}",
                            be(&d, 2),
                            string(get(&d, 1).unwrap())
                        );
                        if get(&d, 3).is_some() {
                            s.push_str(&format!(" dreg {}", be(&d, 3)));
                        }
                        if get(&d, 5).is_some() {
                            s.push_str(&format!(" 0x{:x}", be(&d, 5)));
                        }
                        s
                    }
                    "ct" => format!("ct load state => reg {}", be(&d, 1)),
                    "fib" => format!(
                        "fib {} type => reg {}",
                        if be(&d, 3) == 1 { "saddr" } else { "daddr" },
                        be(&d, 1)
                    ),
                    "numgen" => format!(
                        "numgen reg {} = {} mod {}",
                        be(&d, 1),
                        if be(&d, 3) == 1 { "random" } else { "inc" },
                        be(&d, 2)
                    ),
                    "dynset" => format!(
                        "dynset update reg_key {} set {}",
                        be(&d, 4),
                        string(get(&d, 1).unwrap())
                    ),
                    "nat" => format!(
                        "nat dnat {} addr_min reg {} proto_min reg {} flags 0x{:x}",
                        if be(&d, 2) == 2 { "ip" } else { "ip6" },
                        be(&d, 3),
                        be(&d, 5),
                        be(&d, 7)
                    ),
                    "masq" => format!("masq flags 0x{:x}", be(&d, 1)),
                    "reject" => {
                        format!("reject type {} code {}", be(&d, 1), get(&d, 2).unwrap()[0])
                    }
                    other => panic!("expression {other}"),
                };
                format!("[ {text} ]")
            })
            .collect()
    }

    /// The messages of a batch, BEGIN and END included.
    fn messages(bytes: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut b = bytes;
        while !b.is_empty() {
            let len = u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize;
            out.push(&b[..len]);
            b = &b[len..];
        }
        out
    }

    fn tx<'a>(commands: Vec<Command<'a>>) -> Transaction<'a> {
        Transaction { commands }
    }

    /// One rule's expressions as `nft --debug=netlink` prints them.
    fn linearised(family: IpFamily, rule: &Rule) -> Vec<String> {
        let batch = encode(
            &tx(vec![Command::AddRule {
                family,
                chain: "c",
                rule,
            }]),
            100,
        )
        .unwrap();
        let msgs = messages(&batch.bytes);
        assert_eq!(msgs.len(), 3);
        render(msgs[1])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn addr(addr: Addr, neq: bool, value: &str) -> Stmt {
        let value = match value.parse::<ipnet::IpNet>() {
            Ok(net) => AddrValue::Net(net),
            Err(_) => AddrValue::Addr(ip(value)),
        };
        Stmt::AddrCmp { addr, neq, value }
    }

    fn lookup(key: &[Expr], neq: bool, set: &str) -> Stmt {
        Stmt::Lookup {
            key: key.into(),
            neq,
            set: set.into(),
        }
    }

    fn vmap(key: &[Expr], map: &str) -> Stmt {
        Stmt::Vmap {
            key: key.into(),
            map: map.into(),
        }
    }

    fn verdict(v: Verdict) -> Stmt {
        Stmt::Verdict(v)
    }

    /// What `nft --debug=netlink` (nft 1.0.6) printed for the same rules, given as text.
    #[test]
    fn rules_are_linearised_as_nft_does() {
        use Addr::{Destination as Daddr, Source as Saddr};
        use IpFamily::{V4, V6};
        let daddr = Expr::Addr(Daddr);
        let cases: Vec<(IpFamily, Vec<Stmt>, &str, &[&str])> = vec![
            (
                V4,
                vec![vmap(&Expr::FRONTEND, "service-ips")],
                "ip daddr . meta l4proto . th dport vmap @service-ips",
                &[
                    "[ payload load 4b @ network header + 16 => reg 1 ]",
                    "[ meta load l4proto => reg 9 ]",
                    "[ payload load 2b @ transport header + 2 => reg 10 ]",
                    "[ lookup reg 1 set service-ips dreg 0 ]",
                ],
            ),
            (
                V4,
                vec![
                    Stmt::FibLocal(Daddr),
                    addr(Daddr, true, "127.0.0.0/8"),
                    vmap(&[Expr::L4proto, Expr::Dport], "service-nodeports"),
                ],
                "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
                &[
                    "[ fib daddr type => reg 1 ]",
                    "[ cmp eq reg 1 0x00000002 ]",
                    "[ payload load 1b @ network header + 16 => reg 1 ]",
                    "[ cmp neq reg 1 0x0000007f ]",
                    "[ meta load l4proto => reg 1 ]",
                    "[ payload load 2b @ transport header + 2 => reg 9 ]",
                    "[ lookup reg 1 set service-nodeports dreg 0 ]",
                ],
            ),
            (
                V4,
                vec![Stmt::CtStateNew, verdict(Verdict::jump("services"))],
                "ct state new jump services",
                &[
                    "[ ct load state => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x00000008 ) ^ 0x00000000 ]",
                    "[ cmp neq reg 1 0x00000000 ]",
                    "[ immediate reg 0 jump -> services ]",
                ],
            ),
            (
                V4,
                vec![Stmt::SetMark(MarkOp::Or, 0x4000)],
                "meta mark set meta mark | 0x4000",
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0xffffbfff ) ^ 0x00004000 ]",
                    "[ meta set mark with reg 1 ]",
                ],
            ),
            (
                V4,
                vec![
                    Stmt::Mark {
                        mask: 0x4000,
                        neq: false,
                        value: 0,
                    },
                    verdict(Verdict::Return),
                ],
                "meta mark & 0x4000 == 0 return",
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000 ]",
                    "[ cmp eq reg 1 0x00000000 ]",
                    "[ immediate reg 0 return ]",
                ],
            ),
            (
                V4,
                vec![Stmt::SetMark(MarkOp::Xor, 0x4000)],
                "meta mark set meta mark ^ 0x4000",
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0xffffffff ) ^ 0x00004000 ]",
                    "[ meta set mark with reg 1 ]",
                ],
            ),
            (
                V4,
                vec![Stmt::Masquerade { fully_random: true }],
                "masquerade fully-random",
                &["[ masq flags 0x10 ]"],
            ),
            (
                V4,
                vec![
                    lookup(&[Expr::Addr(Saddr), daddr], false, "hairpin"),
                    Stmt::Masquerade { fully_random: true },
                ],
                "ip saddr . ip daddr @hairpin masquerade fully-random",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ payload load 4b @ network header + 16 => reg 9 ]",
                    "[ lookup reg 1 set hairpin ]",
                    "[ masq flags 0x10 ]",
                ],
            ),
            (
                V4,
                vec![Stmt::L4proto(Protocol::Tcp), Stmt::Reject(Reject::TcpReset)],
                "meta l4proto tcp reject with tcp reset",
                &[
                    "[ meta load l4proto => reg 1 ]",
                    "[ cmp eq reg 1 0x00000006 ]",
                    "[ reject type 1 code 0 ]",
                ],
            ),
            (
                V4,
                vec![Stmt::Reject(Reject::HostUnreachable)],
                "reject with icmp type host-unreachable",
                &["[ reject type 0 code 1 ]"],
            ),
            (
                V4,
                vec![
                    lookup(&[daddr], false, "cluster-ips"),
                    Stmt::Reject(Reject::PortUnreachable),
                ],
                "ip daddr @cluster-ips reject",
                &[
                    "[ payload load 4b @ network header + 16 => reg 1 ]",
                    "[ lookup reg 1 set cluster-ips ]",
                    "[ reject type 0 code 3 ]",
                ],
            ),
            (
                V4,
                vec![
                    addr(Saddr, false, "10.244.1.1"),
                    verdict(Verdict::jump("mark-for-masquerade")),
                ],
                "ip saddr 10.244.1.1 jump mark-for-masquerade",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ cmp eq reg 1 0x0101f40a ]",
                    "[ immediate reg 0 jump -> mark-for-masquerade ]",
                ],
            ),
            (
                V4,
                vec![Stmt::Update {
                    set: "aff".into(),
                    key: Saddr,
                }],
                "update @aff { ip saddr }",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ dynset update reg_key 1 set aff ]",
                ],
            ),
            (
                V4,
                vec![
                    Stmt::L4proto(Protocol::Tcp),
                    Stmt::DnatTo(ip("10.244.1.1"), 8080),
                ],
                "meta l4proto tcp dnat to 10.244.1.1:8080",
                &[
                    "[ meta load l4proto => reg 1 ]",
                    "[ cmp eq reg 1 0x00000006 ]",
                    "[ immediate reg 1 0x0101f40a ]",
                    "[ immediate reg 2 0x0000901f ]",
                    "[ nat dnat ip addr_min reg 1 proto_min reg 2 flags 0x2 ]",
                ],
            ),
            (
                V4,
                vec![
                    addr(Daddr, false, "10.96.0.10"),
                    Stmt::Dport(Protocol::Tcp, 80),
                    addr(Saddr, true, "10.244.0.0/16"),
                    verdict(Verdict::jump("mark-for-masquerade")),
                ],
                "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                &[
                    "[ payload load 4b @ network header + 16 => reg 1 ]",
                    "[ cmp eq reg 1 0x0a00600a ]",
                    "[ meta load l4proto => reg 1 ]",
                    "[ cmp eq reg 1 0x00000006 ]",
                    "[ payload load 2b @ transport header + 2 => reg 1 ]",
                    "[ cmp eq reg 1 0x00005000 ]",
                    "[ payload load 2b @ network header + 12 => reg 1 ]",
                    "[ cmp neq reg 1 0x0000f40a ]",
                    "[ immediate reg 0 jump -> mark-for-masquerade ]",
                ],
            ),
            (
                V4,
                vec![
                    Stmt::FibLocal(Saddr),
                    verdict(Verdict::jump("mark-for-masquerade")),
                ],
                "fib saddr type local jump mark-for-masquerade",
                &[
                    "[ fib saddr type => reg 1 ]",
                    "[ cmp eq reg 1 0x00000002 ]",
                    "[ immediate reg 0 jump -> mark-for-masquerade ]",
                ],
            ),
            (
                V4,
                vec![
                    Stmt::Numgen {
                        modulus: 2,
                        value: 0,
                    },
                    verdict(Verdict::goto("ep")),
                ],
                "numgen random mod 2 0 goto ep",
                &[
                    "[ numgen reg 1 = random mod 2 ]",
                    "[ cmp eq reg 1 0x00000000 ]",
                    "[ immediate reg 0 goto -> ep ]",
                ],
            ),
            (
                V4,
                vec![vmap(&[Expr::Numgen(17)], "eps")],
                "numgen random mod 17 vmap @eps",
                &[
                    "[ numgen reg 1 = random mod 17 ]",
                    "[ lookup reg 1 set eps dreg 0 ]",
                ],
            ),
            (
                V4,
                vec![
                    lookup(&[Expr::Addr(Saddr)], true, "fw"),
                    verdict(Verdict::Drop),
                ],
                "ip saddr != @fw drop",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ lookup reg 1 set fw 0x1 ]",
                    "[ immediate reg 0 drop ]",
                ],
            ),
            (
                V4,
                vec![
                    addr(Saddr, false, "10.240.0.0/12"),
                    verdict(Verdict::jump("c")),
                ],
                "ip saddr 10.240.0.0/12 jump c",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x0000f0ff ) ^ 0x00000000 ]",
                    "[ cmp eq reg 1 0x0000f00a ]",
                    "[ immediate reg 0 jump -> c ]",
                ],
            ),
            (
                V6,
                vec![vmap(&Expr::FRONTEND, "service-ips")],
                "ip6 daddr . meta l4proto . th dport vmap @service-ips",
                &[
                    "[ payload load 16b @ network header + 24 => reg 1 ]",
                    "[ meta load l4proto => reg 2 ]",
                    "[ payload load 2b @ transport header + 2 => reg 13 ]",
                    "[ lookup reg 1 set service-ips dreg 0 ]",
                ],
            ),
            (
                V6,
                vec![
                    addr(Daddr, false, "fd00:96::9"),
                    Stmt::Dport(Protocol::Tcp, 80),
                    addr(Saddr, true, "fd00:244::/64"),
                    verdict(Verdict::jump("c")),
                ],
                "ip6 daddr fd00:96::9 tcp dport 80 ip6 saddr != fd00:244::/64 jump c",
                &[
                    "[ payload load 16b @ network header + 24 => reg 1 ]",
                    "[ cmp eq reg 1 0x960000fd 0x00000000 0x00000000 0x09000000 ]",
                    "[ meta load l4proto => reg 1 ]",
                    "[ cmp eq reg 1 0x00000006 ]",
                    "[ payload load 2b @ transport header + 2 => reg 1 ]",
                    "[ cmp eq reg 1 0x00005000 ]",
                    "[ payload load 8b @ network header + 8 => reg 1 ]",
                    "[ cmp neq reg 1 0x440200fd 0x00000000 ]",
                    "[ immediate reg 0 jump -> c ]",
                ],
            ),
            (
                V6,
                vec![
                    addr(Saddr, false, "fd00:244::/60"),
                    verdict(Verdict::jump("c")),
                ],
                "ip6 saddr fd00:244::/60 jump c",
                &[
                    "[ payload load 16b @ network header + 8 => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0xffffffff 0xf0ffffff 0x00000000 0x00000000 ) ^ 0x00000000 0x00000000 0x00000000 0x00000000 ]",
                    "[ cmp eq reg 1 0x440200fd 0x00000000 0x00000000 0x00000000 ]",
                    "[ immediate reg 0 jump -> c ]",
                ],
            ),
            (
                V6,
                vec![
                    Stmt::L4proto(Protocol::Udp),
                    Stmt::DnatTo(ip("fd00:244::1"), 80),
                ],
                "meta l4proto udp dnat to [fd00:244::1]:80",
                &[
                    "[ meta load l4proto => reg 1 ]",
                    "[ cmp eq reg 1 0x00000011 ]",
                    "[ immediate reg 1 0x440200fd 0x00000000 0x00000000 0x01000000 ]",
                    "[ immediate reg 2 0x00005000 ]",
                    "[ nat dnat ip6 addr_min reg 1 proto_min reg 2 flags 0x2 ]",
                ],
            ),
            (
                V6,
                vec![Stmt::Reject(Reject::HostUnreachable)],
                "reject with icmpv6 type addr-unreachable",
                &["[ reject type 0 code 3 ]"],
            ),
            (
                V6,
                vec![Stmt::Reject(Reject::PortUnreachable)],
                "reject",
                &["[ reject type 0 code 4 ]"],
            ),
        ];
        for (family, stmts, text, expected) in cases {
            let rule = Rule(stmts);
            assert_eq!(rule.text(family).to_string(), text);
            assert_eq!(linearised(family, &rule), expected, "{family:?} {text}");
        }
    }

    #[test]
    fn batch_is_framed_and_only_the_last_command_asks_for_an_ack() {
        let t = tx(vec![
            Command::AddTable(IpFamily::V4),
            Command::DeleteTable(IpFamily::V4),
        ]);
        assert_eq!(
            t.to_string(),
            "add table ip strake-proxy\ndelete table ip strake-proxy\n"
        );
        let batch = encode(&t, 7).unwrap();
        let msgs = messages(&batch.bytes);
        assert_eq!(msgs.len(), 4);
        let header = |m: &[u8]| {
            (
                u16::from_ne_bytes(m[4..6].try_into().unwrap()),
                u16::from_ne_bytes(m[6..8].try_into().unwrap()),
                u32::from_ne_bytes(m[8..12].try_into().unwrap()),
                m[16],
                u16::from_be_bytes(m[18..20].try_into().unwrap()),
            )
        };
        // BATCH_BEGIN for the nftables subsystem, AF_UNSPEC.
        assert_eq!(header(msgs[0]), (0x10, NLM_F_REQUEST, 7, 0, 10));
        assert_eq!(
            header(msgs[1]),
            (0x0a00, NLM_F_REQUEST | NLM_F_CREATE, 8, 2, 0)
        );
        assert_eq!(
            header(msgs[2]),
            (0x0a02, NLM_F_REQUEST | NLM_F_ACK, 9, 2, 0)
        );
        assert_eq!(header(msgs[3]), (0x11, NLM_F_REQUEST, 10, 0, 10));
        assert_eq!(batch.last_seq, Some(9));
        assert_eq!(
            (
                batch.command_of(8),
                batch.command_of(9),
                batch.command_of(7)
            ),
            (Some(0), Some(1), None)
        );
        // The table message: "strake-proxy\0" padded, then flags 0.
        assert_eq!(
            &msgs[1][20..],
            b"\x11\x00\x01\x00strake-proxy\x00\x00\x00\x00\x08\x00\x02\x00\x00\x00\x00\x00"
        );
    }

    fn elements_of(t: &Transaction<'_>) -> Vec<(Vec<u8>, Option<String>, u32)> {
        let batch = encode(t, 1).unwrap();
        let mut out = Vec::new();
        for m in messages(&batch.bytes) {
            if u16::from_ne_bytes(m[4..6].try_into().unwrap()) != 0x0a00 | msg::NEWSETELEM {
                continue;
            }
            let top = attrs(&m[20..]);
            for (_, e) in attrs(get(&top, attr::SET_ELEM_LIST_ELEMENTS).unwrap()) {
                let e = attrs(e);
                let key = attrs(get(&e, attr::SET_ELEM_KEY).unwrap());
                let key = get(&key, attr::DATA_VALUE).unwrap().to_vec();
                let value = get(&e, attr::SET_ELEM_DATA).map(data);
                let flags =
                    get(&e, attr::SET_ELEM_FLAGS).map_or(0, |_| be(&e, attr::SET_ELEM_FLAGS));
                out.push((key, value, flags));
            }
        }
        out
    }

    fn add<'a>(family: IpFamily, set: &'a str, elements: &'a [(Key, Value)]) -> Command<'a> {
        Command::AddElements {
            family,
            set,
            elements: elements.iter().map(|(k, v)| (k, v)).collect(),
        }
    }

    #[test]
    fn map_and_interval_elements_are_encoded_as_nft_does() {
        // nft: "element 0100600a 00000006 00005000  : goto -> ep", "element 00000006 00008075".
        let ips = [
            (
                Key::AddrProtoPort(ip("10.96.0.1"), Protocol::Tcp, 80),
                Value::verdict(Verdict::goto("ep")),
            ),
            (
                Key::AddrProtoPort(ip("10.96.0.2"), Protocol::Udp, 53),
                Value::verdict(Verdict::Drop),
            ),
        ];
        let ports = [(
            Key::ProtoPort(Protocol::Tcp, 30080),
            Value::verdict(Verdict::goto("reject-chain")),
        )];
        let els = elements_of(&tx(vec![
            add(IpFamily::V4, "service-ips", &ips),
            add(IpFamily::V4, "service-nodeports", &ports),
        ]));
        assert_eq!(
            els,
            [
                (
                    vec![10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0],
                    Some("goto -> ep".into()),
                    0
                ),
                (
                    vec![10, 96, 0, 2, 17, 0, 0, 0, 0, 53, 0, 0],
                    Some("drop".into()),
                    0
                ),
                (
                    vec![6, 0, 0, 0, 0x75, 0x80, 0, 0],
                    Some("goto -> reject-chain".into()),
                    0
                ),
            ]
        );
        // Prefixes: a start and an end (flag 1) element; a prefix reaching the end of the
        // address space has no end. (nft: "element 0302010a : 0", "element 0402010a : 1 [end]")
        let prefixes: Vec<(Key, Value)> = [
            "10.1.2.3/32",
            "203.0.113.0/24",
            "255.255.255.0/24",
            "0.0.0.0/0",
        ]
        .iter()
        .map(|p| (Key::Prefix(p.parse().unwrap()), Value::None))
        .collect();
        let els = elements_of(&tx(vec![add(IpFamily::V4, "fw", &prefixes)]));
        assert_eq!(
            els,
            [
                (vec![10, 1, 2, 3], None, 0),
                (vec![10, 1, 2, 4], None, 1),
                (vec![203, 0, 113, 0], None, 0),
                (vec![203, 0, 114, 0], None, 1),
                (vec![255, 255, 255, 0], None, 0),
                (vec![0, 0, 0, 0], None, 0),
            ]
        );
        // typeof numgen keys are host-order integers; endpoint values address . port.
        let slots = [(Key::Slot(Slot(1)), Value::verdict(Verdict::goto("x")))];
        let endpoints = [(
            Key::AddrProtoPortSlot(ip("fd00::1"), Protocol::Tcp, 80, Slot(2)),
            Value::AddrPort(ip("fd00::2"), 8080),
        )];
        let els = elements_of(&tx(vec![
            add(IpFamily::V6, "eps", &slots),
            add(IpFamily::V6, "endpoints", &endpoints),
        ]));
        let mut endpoint_key = ip("fd00::1").to_string().len().to_ne_bytes().to_vec();
        endpoint_key.clear();
        endpoint_key.extend_from_slice(&addr_bytes(ip("fd00::1")));
        endpoint_key.extend_from_slice(&[6, 0, 0, 0, 0, 80, 0, 0]);
        endpoint_key.extend_from_slice(&2u32.to_ne_bytes());
        assert_eq!(
            els,
            [
                (1u32.to_ne_bytes().to_vec(), Some("goto -> x".into()), 0),
                (
                    endpoint_key,
                    Some("0x000000fd 0x00000000 0x00000000 0x02000000 0x0000901f".into()),
                    0
                ),
            ]
        );
    }

    #[test]
    fn large_element_lists_are_split_into_messages_of_one_command() {
        let elements: Vec<(Key, Value)> = (0..5000u32)
            .map(|i| {
                (
                    Key::AddrProtoPort(
                        std::net::Ipv4Addr::from(0x0a60_0000 + i).into(),
                        Protocol::Tcp,
                        80,
                    ),
                    Value::verdict(Verdict::goto("svc-default/some-long-service-name/tcp/http")),
                )
            })
            .collect();
        let batch = encode(&tx(vec![add(IpFamily::V4, "m", &elements)]), 1).unwrap();
        let msgs = messages(&batch.bytes);
        assert!(msgs.len() - 2 > 1, "{}", msgs.len());
        assert!(msgs.iter().all(|m| m.len() < 64 * 1024));
        assert!(batch.commands.iter().all(|c| *c == 0));
        assert_eq!(
            elements_of(&tx(vec![add(IpFamily::V4, "m", &elements)])).len(),
            5000
        );
    }

    #[test]
    fn set_declarations_carry_nft_key_types_and_flags() {
        let mut aff = SetDecl::of_type([KeyPart::Ipv6], false);
        aff.flags.dynamic = true;
        aff.flags.timeout = true;
        aff.timeout_secs = Some(10_800);
        let decl = |family, decl| {
            let batch = encode(
                &tx(vec![Command::AddSet {
                    family,
                    name: "s",
                    decl,
                }]),
                1,
            )
            .unwrap();
            let msgs = messages(&batch.bytes);
            attrs(&msgs[1][20..])
                .into_iter()
                .map(|(t, v)| (t, v.to_vec()))
                .collect::<Vec<_>>()
        };
        let a = decl(IpFamily::V6, &aff);
        let a: Vec<(u16, &[u8])> = a.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        assert_eq!(be(&a, attr::SET_FLAGS), 0x30);
        assert_eq!(be(&a, attr::SET_KEY_TYPE), 8);
        assert_eq!(be(&a, attr::SET_KEY_LEN), 16);
        assert_eq!(
            get(&a, attr::SET_TIMEOUT),
            Some(&10_800_000u64.to_be_bytes()[..])
        );
        let map = SetDecl::of_type([KeyPart::Ipv4, KeyPart::Proto, KeyPart::Service], true);
        let a = decl(IpFamily::V4, &map);
        let a: Vec<(u16, &[u8])> = a.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        // (7 << 12) | (12 << 6) | 13, as nft shows 0x0000730d.
        assert_eq!(be(&a, attr::SET_KEY_TYPE), 0x730d);
        assert_eq!(be(&a, attr::SET_KEY_LEN), 12);
        assert_eq!(be(&a, attr::SET_FLAGS), 0x8);
        assert_eq!(be(&a, attr::SET_DATA_TYPE), 0xffff_ff00);
        // A `typeof` the encoder has no nft user data for is refused, not guessed at.
        let odd = SetDecl::of_typeof([Expr::Numgen(2)], SetData::Verdict);
        let e = encode(
            &tx(vec![Command::AddSet {
                family: IpFamily::V4,
                name: "odd",
                decl: &odd,
            }]),
            1,
        )
        .unwrap_err();
        assert!(e.reason.contains("typeof"), "{e}");
        assert_eq!(
            e.command,
            "add map ip strake-proxy odd { typeof numgen random mod 2 : verdict ; }"
        );
    }

    #[test]
    fn base_chains_get_hook_priority_and_policy() {
        let rs = Ruleset::build(&Default::default(), &crate::testutil::config());
        let chain = &rs.v4.chains["filter-prerouting"];
        let t = tx(vec![Command::AddChain {
            family: IpFamily::V4,
            name: "filter-prerouting",
            base: chain.base.as_ref(),
        }]);
        assert_eq!(
            t.to_string(),
            "add chain ip strake-proxy filter-prerouting { type filter hook prerouting priority dstnat - 10 ; policy accept ; }\n"
        );
        let batch = encode(&t, 1).unwrap();
        let a = attrs(&messages(&batch.bytes)[1][20..]);
        assert_eq!(string(get(&a, attr::CHAIN_TYPE).unwrap()), "filter");
        assert_eq!(be(&a, attr::CHAIN_POLICY), 1);
        let hook = attrs(get(&a, attr::CHAIN_HOOK).unwrap());
        assert_eq!(be(&hook, attr::HOOK_HOOKNUM), 0);
        assert_eq!(be(&hook, attr::HOOK_PRIORITY) as i32, -110);
    }

    #[test]
    fn an_attribute_past_64_kib_is_refused_not_wrapped() {
        let mut w = Writer::new();
        w.attr(1, &[0u8; 100]);
        w.str(2, "short");
        assert!(!w.overflowed());
        w.attr(3, &vec![0u8; 70_000]);
        assert!(
            w.overflowed(),
            "a 70,000-byte attribute fits no 16-bit length"
        );
        let mut nested = Writer::new();
        let n = nested.open(4);
        for _ in 0..20 {
            nested.attr(5, &[0u8; 4000]);
        }
        nested.close(n);
        assert!(nested.overflowed(), "a nest of 80,000 bytes");
        // Through the encoder: a clear error naming the command, no batch.
        let name = "c".repeat(70_000);
        let t = tx(vec![
            Command::AddTable(IpFamily::V4),
            Command::AddChain {
                family: IpFamily::V4,
                name: &name,
                base: None,
            },
        ]);
        let e = encode(&t, 1).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("65535"), "{e}");
    }

    #[test]
    fn values_of_the_other_family_are_refused() {
        let rule = Rule::new([Stmt::DnatTo(ip("fd00::1"), 80)]);
        let e = encode(
            &tx(vec![Command::AddRule {
                family: IpFamily::V4,
                chain: "c",
                rule: &rule,
            }]),
            1,
        )
        .unwrap_err();
        assert!(e.reason.contains("family"), "{e}");
        let keys = [(Key::Addr(ip("10.0.0.1")), Value::None)];
        let e = encode(&tx(vec![add(IpFamily::V6, "s", &keys)]), 1).unwrap_err();
        assert!(e.reason.contains("family"), "{e}");
    }
}
