//! Compiles a sync script (nft text) into one nf_tables netlink batch: what the backend did
//! before it encoded typed transactions ([`super::encode`]); kept to prove both give the same
//! bytes.
//!
//! The input is the nft text that [`crate::nft::sync`] writes from [`crate::nft::ruleset`]:
//! table, chain, set/map, element and rule commands in a small, fixed vocabulary. Each
//! statement is translated the way `nft` itself linearises it (learned from
//! `nft --debug=netlink,mnl`), so that `nft list` shows the same ruleset whichever backend
//! wrote it. Anything outside that vocabulary is refused with the offending line, never
//! guessed at.

use std::collections::HashMap;
use std::net::IpAddr;

use super::wire::{
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_REQUEST, Verdict, Writer, attr, msg,
};
use crate::nft::TABLE;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Keep the element list of one message well under the 64 KiB limit of a nested attribute.
const ELEMENTS_NEST_MAX: usize = 48 * 1024;

/// A line of the script that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}: {command}")]
pub struct EncodeError {
    /// 1-based line number.
    pub line: usize,
    /// The line.
    pub command: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One component of a set key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPart {
    /// `ipv4_addr`.
    Ipv4,
    /// `ipv6_addr`.
    Ipv6,
    /// `inet_proto`.
    Proto,
    /// `inet_service` (a port).
    Service,
    /// A host-order 32-bit integer (`typeof numgen ...`).
    Integer,
}

impl KeyPart {
    fn type_id(self) -> u32 {
        match self {
            KeyPart::Integer => 4,
            KeyPart::Ipv4 => 7,
            KeyPart::Ipv6 => 8,
            KeyPart::Proto => 12,
            KeyPart::Service => 13,
        }
    }

    fn len(self) -> usize {
        match self {
            KeyPart::Ipv4 | KeyPart::Integer => 4,
            KeyPart::Ipv6 => 16,
            KeyPart::Proto => 1,
            KeyPart::Service => 2,
        }
    }

    fn parse(word: &str) -> Option<KeyPart> {
        Some(match word {
            "ipv4_addr" => KeyPart::Ipv4,
            "ipv6_addr" => KeyPart::Ipv6,
            "inet_proto" => KeyPart::Proto,
            "inet_service" => KeyPart::Service,
            _ => return None,
        })
    }

    fn value(self, word: &str) -> Option<Vec<u8>> {
        Some(match self {
            KeyPart::Ipv4 => word.parse::<std::net::Ipv4Addr>().ok()?.octets().to_vec(),
            KeyPart::Ipv6 => word.parse::<std::net::Ipv6Addr>().ok()?.octets().to_vec(),
            KeyPart::Proto => vec![proto_number(word)?],
            KeyPart::Service => word.parse::<u16>().ok()?.to_be_bytes().to_vec(),
            KeyPart::Integer => word.parse::<u32>().ok()?.to_ne_bytes().to_vec(),
        })
    }
}

/// What the encoder must know about a set to encode its elements: its key and whether it is
/// a verdict map or an interval set. Learned from `add set`/`add map` and kept across syncs
/// by the backend, since partial syncs add elements to sets declared long before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetLayout {
    /// Key components (more than one: a concatenation, each padded to 4 bytes).
    pub key: Vec<KeyPart>,
    /// A verdict map.
    pub map: bool,
    /// A data map's value components (empty for sets and verdict maps).
    pub data: Vec<KeyPart>,
    /// Elements are prefixes (`flags interval`).
    pub interval: bool,
}

impl SetLayout {
    fn key_len(&self) -> usize {
        concat_len(&self.key)
    }
}

/// Length of a key or value of these components (each padded to 4 bytes when several).
fn concat_len(parts: &[KeyPart]) -> usize {
    if parts.len() == 1 {
        parts[0].len()
    } else {
        parts.iter().map(|p| (p.len() + 3) & !3).sum()
    }
}

/// nft's type id of a concatenation: 6 bits per component.
fn concat_type(parts: &[KeyPart]) -> u32 {
    parts.iter().fold(0u32, |acc, p| (acc << 6) | p.type_id())
}

/// The components of a `typeof` expression list, e.g. `ip daddr . th dport`.
fn typeof_parts(text: &str, family: u8) -> Res<Vec<KeyPart>> {
    text.split(" . ")
        .map(|part| {
            let words: Vec<&str> = part.split_whitespace().collect();
            Ok(match (words.as_slice(), family) {
                (["ip", "daddr" | "saddr"], AF_INET) => KeyPart::Ipv4,
                (["ip6", "daddr" | "saddr"], AF_INET6) => KeyPart::Ipv6,
                (["meta", "l4proto"], _) => KeyPart::Proto,
                (["th", "dport"], _) => KeyPart::Service,
                (["numgen", "random", "mod", _], _) => KeyPart::Integer,
                _ => return Err(format!("unsupported typeof expression {part:?}")),
            })
        })
        .collect()
}

/// Set layouts by (family, set name).
pub type Layouts = HashMap<(u8, String), SetLayout>;

/// An encoded batch.
#[derive(Debug)]
pub struct Batch {
    /// The messages, `BATCH_BEGIN` to `BATCH_END`.
    pub bytes: Vec<u8>,
    /// Sequence number of `BATCH_BEGIN`; message `seq` came from `lines[seq - first_seq - 1]`.
    pub first_seq: u32,
    /// Sequence number of the last command message (the only one asking for an ACK), if any.
    pub last_seq: Option<u32>,
    /// 0-based script line of each command message, in order.
    pub lines: Vec<usize>,
}

impl Batch {
    /// The script line (0-based) that produced message `seq`, if it was a command.
    pub fn line_of(&self, seq: u32) -> Option<usize> {
        let index = seq.checked_sub(self.first_seq)?.checked_sub(1)?;
        self.lines.get(index as usize).copied()
    }
}

/// Compiles `script` into one batch, starting at sequence number `first_seq`. `layouts` is
/// updated with the sets the script declares or deletes (the caller keeps the updated copy
/// only if the kernel accepts the batch).
pub fn compile(script: &str, first_seq: u32, layouts: &mut Layouts) -> Result<Batch, EncodeError> {
    let mut enc = Encoder {
        w: Writer::new(),
        seq: first_seq,
        lines: Vec::new(),
        layouts,
        next_set_id: 1,
        last_start: None,
    };
    enc.w.begin(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    let start = 0;
    enc.w.end(start);
    for (index, line) in script.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        enc.command(index, line)
            .and_then(|()| {
                if enc.w.overflowed() {
                    Err("a netlink attribute would exceed 65535 bytes".to_string())
                } else {
                    Ok(())
                }
            })
            .map_err(|reason| EncodeError {
                line: index + 1,
                command: line.to_string(),
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
        lines: enc.lines,
    })
}

struct Encoder<'a> {
    w: Writer,
    seq: u32,
    lines: Vec<usize>,
    layouts: &'a mut Layouts,
    next_set_id: u32,
    last_start: Option<usize>,
}

type Res<T> = Result<T, String>;

fn family_of(word: &str) -> Res<u8> {
    match word {
        "ip" => Ok(AF_INET),
        "ip6" => Ok(AF_INET6),
        other => Err(format!("family {other:?} is not ip or ip6")),
    }
}

fn own_table(name: &str) -> Res<()> {
    if name == TABLE {
        Ok(())
    } else {
        Err(format!("table {name:?} is not the proxy's own ({TABLE})"))
    }
}

/// Splits `s` at the first space: (first word, rest).
fn word(s: &str) -> Res<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return Err("unexpected end of command".into());
    }
    Ok(match s.find(' ') {
        Some(i) => (&s[..i], s[i + 1..].trim_start()),
        None => (s, ""),
    })
}

/// The inside of `{ ... }`.
fn braced(s: &str) -> Res<&str> {
    let s = s.trim();
    s.strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .map(str::trim)
        .ok_or_else(|| format!("expected {{ ... }}, found {s:?}"))
}

impl Encoder<'_> {
    fn message(&mut self, line: usize, cmd: u16, flags: u16, family: u8) -> usize {
        self.seq += 1;
        self.lines.push(line);
        let start = self.w.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | cmd,
            NLM_F_REQUEST | flags,
            self.seq,
            family,
            0,
        );
        self.last_start = Some(start);
        start
    }

    fn command(&mut self, line: usize, text: &str) -> Res<()> {
        let (verb, rest) = word(text)?;
        let (object, rest) = word(rest)?;
        let (family, rest) = word(rest)?;
        let family = family_of(family)?;
        let (table, rest) = word(rest)?;
        own_table(table)?;
        match (verb, object) {
            ("add", "table") | ("delete", "table") => {
                if !rest.is_empty() {
                    return Err("unexpected words after the table name".into());
                }
                let add = verb == "add";
                let m = if add {
                    self.message(line, msg::NEWTABLE, NLM_F_CREATE, family)
                } else {
                    self.message(line, msg::DELTABLE, 0, family)
                };
                self.w.str(attr::TABLE_NAME, TABLE);
                if add {
                    self.w.u32(attr::TABLE_FLAGS, 0);
                } else {
                    // Everything in the table goes with it.
                    self.layouts.retain(|(f, _), _| *f != family);
                }
                self.w.end(m);
            }
            ("add", "chain") => {
                let (name, rest) = word(rest)?;
                let m = self.message(line, msg::NEWCHAIN, NLM_F_CREATE, family);
                self.w.str(attr::CHAIN_TABLE, TABLE);
                self.w.str(attr::CHAIN_NAME, name);
                if !rest.is_empty() {
                    self.base_chain(braced(rest)?)?;
                }
                self.w.end(m);
            }
            ("flush", "chain") | ("delete", "chain") => {
                let (name, rest) = word(rest)?;
                if !rest.is_empty() {
                    return Err("unexpected words after the chain name".into());
                }
                let m = if verb == "flush" {
                    let m = self.message(line, msg::DELRULE, 0, family);
                    self.w.str(attr::RULE_TABLE, TABLE);
                    self.w.str(attr::RULE_CHAIN, name);
                    m
                } else {
                    let m = self.message(line, msg::DELCHAIN, 0, family);
                    self.w.str(attr::CHAIN_TABLE, TABLE);
                    self.w.str(attr::CHAIN_NAME, name);
                    m
                };
                self.w.end(m);
            }
            ("add", "set") | ("add", "map") => {
                let (name, rest) = word(rest)?;
                self.set(line, family, name, object == "map", braced(rest)?)?;
            }
            ("delete", "set") | ("delete", "map") => {
                let (name, rest) = word(rest)?;
                if !rest.is_empty() {
                    return Err("unexpected words after the set name".into());
                }
                let m = self.message(line, msg::DELSET, 0, family);
                self.w.str(attr::SET_TABLE, TABLE);
                self.w.str(attr::SET_NAME, name);
                self.w.end(m);
                self.layouts.remove(&(family, name.to_string()));
            }
            ("add", "element") | ("delete", "element") => {
                let (name, rest) = word(rest)?;
                self.elements(line, family, name, verb == "add", braced(rest)?)?;
            }
            ("add", "rule") => {
                let (chain, rest) = word(rest)?;
                let m = self.message(line, msg::NEWRULE, NLM_F_CREATE | NLM_F_APPEND, family);
                self.w.str(attr::RULE_TABLE, TABLE);
                self.w.str(attr::RULE_CHAIN, chain);
                let list = self.w.open(attr::RULE_EXPRESSIONS);
                let tokens: Vec<&str> = rest.split_whitespace().collect();
                RuleParser {
                    w: &mut self.w,
                    family,
                    tokens: &tokens,
                    pos: 0,
                }
                .rule()?;
                self.w.close(list);
                self.w.end(m);
            }
            _ => return Err(format!("unsupported command {verb} {object}")),
        }
        Ok(())
    }

    /// `type nat hook prerouting priority dstnat ; policy accept ;`
    fn base_chain(&mut self, spec: &str) -> Res<()> {
        let mut kind = None;
        let mut hook = None;
        let mut priority = None;
        let mut policy = None;
        for clause in spec.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            let words: Vec<&str> = clause.split_whitespace().collect();
            match words.as_slice() {
                [
                    "type",
                    t @ ("nat" | "filter"),
                    "hook",
                    h,
                    "priority",
                    prio @ ..,
                ] => {
                    kind = Some(*t);
                    hook = Some(match *h {
                        "prerouting" => 0u32,
                        "input" => 1,
                        "forward" => 2,
                        "output" => 3,
                        "postrouting" => 4,
                        other => return Err(format!("unknown hook {other:?}")),
                    });
                    priority = Some(parse_priority(prio)?);
                }
                ["policy", "accept"] => policy = Some(1u32),
                ["policy", "drop"] => policy = Some(0u32),
                _ => return Err(format!("unsupported chain clause {clause:?}")),
            }
        }
        let (Some(kind), Some(hook), Some(priority)) = (kind, hook, priority) else {
            return Err("base chain without type, hook and priority".into());
        };
        self.w.str(attr::CHAIN_TYPE, kind);
        if let Some(policy) = policy {
            self.w.u32(attr::CHAIN_POLICY, policy);
        }
        let n = self.w.open(attr::CHAIN_HOOK);
        self.w.u32(attr::HOOK_HOOKNUM, hook);
        self.w.u32(attr::HOOK_PRIORITY, priority as u32);
        self.w.close(n);
        Ok(())
    }

    /// `add set|map`: `type K [. K ...] [: verdict] ; [flags F,F ;] [timeout Ns ;]`, or one of
    /// the `typeof` declarations in [`TYPEOF_UDATA`] (verdict or data maps).
    fn set(&mut self, line: usize, family: u8, name: &str, map: bool, spec: &str) -> Res<()> {
        let mut key = Vec::new();
        let mut data = Vec::new();
        let mut typeof_udata: Option<&'static [u8]> = None;
        let mut verdict = false;
        let mut flags = 0u32;
        let mut timeout_ms = None;
        for clause in spec.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            let (head, rest) = word(clause)?;
            match head {
                "type" | "typeof" => {
                    let (keys, value) = match rest.split_once(':') {
                        Some((k, d)) => (k.trim(), Some(d.trim())),
                        None => (rest.trim(), None),
                    };
                    match value {
                        None => {}
                        Some("verdict") => verdict = true,
                        Some(other) if head == "typeof" => {
                            data = typeof_parts(other, family)?;
                        }
                        Some(other) => return Err(format!("unsupported map data {other:?}")),
                    }
                    if head == "typeof" {
                        let normalized = clause.split_whitespace().collect::<Vec<_>>().join(" ");
                        typeof_udata = Some(
                            TYPEOF_UDATA
                                .iter()
                                .find(|(spec, _)| *spec == normalized)
                                .map(|(_, udata)| *udata)
                                .ok_or_else(|| format!("unsupported typeof {keys:?}"))?,
                        );
                        key = typeof_parts(keys, family)?;
                    } else {
                        for part in keys.split(" . ") {
                            key.push(
                                KeyPart::parse(part.trim())
                                    .ok_or_else(|| format!("unsupported key type {part:?}"))?,
                            );
                        }
                    }
                }
                "flags" => {
                    for flag in rest.split(',').map(str::trim) {
                        flags |= match flag {
                            "interval" => 0x4,
                            "timeout" => 0x10,
                            "dynamic" => 0x20,
                            other => return Err(format!("unsupported set flag {other:?}")),
                        };
                    }
                }
                "timeout" => {
                    let secs = rest
                        .strip_suffix('s')
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| format!("unsupported timeout {rest:?}"))?;
                    flags |= 0x10;
                    timeout_ms = Some(secs * 1000);
                }
                other => return Err(format!("unsupported set clause {other:?}")),
            }
        }
        if key.is_empty() {
            return Err("set without a key type".into());
        }
        if map != (verdict || !data.is_empty()) {
            return Err("a map needs a verdict or data type, a set neither".into());
        }
        if map {
            flags |= 0x8;
        }
        let layout = SetLayout {
            key,
            map: verdict,
            data,
            interval: flags & 0x4 != 0,
        };
        let m = self.message(line, msg::NEWSET, NLM_F_CREATE, family);
        self.w.str(attr::SET_TABLE, TABLE);
        self.w.str(attr::SET_NAME, name);
        self.w.u32(attr::SET_FLAGS, flags);
        self.w.u32(attr::SET_KEY_TYPE, concat_type(&layout.key));
        self.w.u32(attr::SET_KEY_LEN, layout.key_len() as u32);
        if layout.map {
            self.w.u32(attr::SET_DATA_TYPE, 0xffff_ff00);
            self.w.u32(attr::SET_DATA_LEN, 0);
        } else if !layout.data.is_empty() {
            self.w.u32(attr::SET_DATA_TYPE, concat_type(&layout.data));
            self.w
                .u32(attr::SET_DATA_LEN, concat_len(&layout.data) as u32);
        }
        if let Some(ms) = timeout_ms {
            self.w.u64(attr::SET_TIMEOUT, ms);
        }
        self.w.u32(attr::SET_ID, self.next_set_id);
        self.next_set_id += 1;
        // nft's user data: how to print the key (byte order, `typeof` expression). Without
        // it `nft list` would print these sets differently from the ones nft created.
        let udata: &[u8] = if let Some(udata) = typeof_udata {
            udata
        } else if map {
            &UDATA_TYPE_VERDICT_MAP
        } else if layout.key.len() > 1 {
            &UDATA_CONCAT_SET
        } else {
            &UDATA_BIG_ENDIAN_KEY
        };
        self.w.attr(attr::SET_USERDATA, udata);
        self.w.end(m);
        self.layouts.insert((family, name.to_string()), layout);
        Ok(())
    }

    fn elements(&mut self, line: usize, family: u8, set: &str, add: bool, body: &str) -> Res<()> {
        let layout = self
            .layouts
            .get(&(family, set.to_string()))
            .cloned()
            .ok_or_else(|| format!("set {set:?} was not declared through this backend"))?;
        let mut encoded: Vec<Element> = Vec::new();
        for item in body.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once(" : ") {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            let is_map = layout.map || !layout.data.is_empty();
            let data = match (is_map, value, add) {
                (true, Some(v), true) if layout.map => {
                    Some(ElementData::Verdict(parse_verdict(v)?))
                }
                (true, Some(v), true) => Some(ElementData::Value(encode_concat(&layout.data, v)?)),
                (true, None, true) => return Err(format!("map element {key:?} without a value")),
                (false, Some(_), _) => return Err(format!("set element {item:?} has a value")),
                _ => None,
            };
            if layout.interval {
                let [part] = layout.key.as_slice() else {
                    return Err("interval concatenations are not supported".into());
                };
                let (start, end) = prefix_range(*part, key)?;
                match end {
                    Some(end) => {
                        encoded.push(Element::new(start, data.clone(), 0, false));
                        encoded.push(Element::new(end, None, 1, false));
                    }
                    // Up to the end of the address space: no end element.
                    None => encoded.push(Element::new(start, data.clone(), 0, true)),
                }
            } else {
                encoded.push(Element::new(encode_key(&layout, key)?, data, 0, false));
            }
        }
        let mut iter = encoded.iter().peekable();
        while iter.peek().is_some() {
            let m = if add {
                self.message(line, msg::NEWSETELEM, NLM_F_CREATE, family)
            } else {
                self.message(line, msg::DELSETELEM, 0, family)
            };
            self.w.str(attr::SET_ELEM_LIST_TABLE, TABLE);
            self.w.str(attr::SET_ELEM_LIST_SET, set);
            let list = self.w.open(attr::SET_ELEM_LIST_ELEMENTS);
            while let Some(e) = iter.next_if(|_| self.w.since(list) < ELEMENTS_NEST_MAX) {
                let n = self.w.open(attr::LIST_ELEM);
                if e.flags != 0 {
                    self.w.u32(attr::SET_ELEM_FLAGS, e.flags);
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
        Ok(())
    }
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

/// The `typeof` declarations the encoder knows, with the user data nft writes for each (so that
/// `nft list` prints them as declared). Learned from `nft --debug=mnl`.
const TYPEOF_UDATA: [(&str, &[u8]); 5] = [
    (
        "typeof numgen random mod 1 : verdict",
        &UDATA_TYPEOF_NUMGEN_VERDICT,
    ),
    (
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport",
        &UDATA_TYPEOF_ENDPOINTS_V4,
    ),
    (
        "typeof ip6 daddr . meta l4proto . th dport . numgen random mod 1 : ip6 daddr . th dport",
        &UDATA_TYPEOF_ENDPOINTS_V6,
    ),
    (
        "typeof meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport",
        &UDATA_TYPEOF_NODEPORT_ENDPOINTS_V4,
    ),
    (
        "typeof meta l4proto . th dport . numgen random mod 1 : ip6 daddr . th dport",
        &UDATA_TYPEOF_NODEPORT_ENDPOINTS_V6,
    ),
];

/// Element user data nft writes for an interval open to the end of the address space.
const UDATA_ELEM_INTERVAL_OPEN: [u8; 6] = [1, 4, 1, 0, 0, 0];

/// A map element's value.
#[derive(Debug, Clone)]
enum ElementData {
    /// A verdict map's verdict.
    Verdict(Verdict),
    /// A data map's value, encoded.
    Value(Vec<u8>),
}

struct Element {
    key: Vec<u8>,
    data: Option<ElementData>,
    flags: u32,
    open_interval: bool,
}

impl Element {
    fn new(key: Vec<u8>, data: Option<ElementData>, flags: u32, open_interval: bool) -> Self {
        Element {
            key,
            data,
            flags,
            open_interval,
        }
    }
}

fn encode_key(layout: &SetLayout, key: &str) -> Res<Vec<u8>> {
    encode_concat(&layout.key, key)
}

/// A key or value of the components `layout`, e.g. `10.0.0.1 . tcp . 80`: each component
/// padded to 4 bytes when there are several.
fn encode_concat(layout: &[KeyPart], key: &str) -> Res<Vec<u8>> {
    let parts: Vec<&str> = key.split(" . ").map(str::trim).collect();
    if parts.len() != layout.len() {
        return Err(format!("{key:?} does not match the set's type"));
    }
    let concat = parts.len() > 1;
    let mut out = Vec::with_capacity(concat_len(layout));
    for (part, word) in layout.iter().zip(parts) {
        let value = part
            .value(word)
            .ok_or_else(|| format!("{word:?} is not a valid {part:?}"))?;
        out.extend_from_slice(&value);
        if concat {
            out.resize((out.len() + 3) & !3, 0);
        }
    }
    Ok(out)
}

/// `addr` or `addr/len` as an interval: (first address, first address after it, if any).
fn prefix_range(part: KeyPart, text: &str) -> Res<(Vec<u8>, Option<Vec<u8>>)> {
    let net: ipnet::IpNet = match text.parse::<ipnet::IpNet>() {
        Ok(net) => net,
        Err(_) => text
            .parse::<IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| format!("{text:?} is not an address or prefix"))?,
    };
    let (start, bits): (Vec<u8>, u32) = match (part, net.network()) {
        (KeyPart::Ipv4, IpAddr::V4(a)) => (a.octets().to_vec(), 32),
        (KeyPart::Ipv6, IpAddr::V6(a)) => (a.octets().to_vec(), 128),
        _ => return Err(format!("{text:?} does not match the set's type")),
    };
    let host_bits = bits - u32::from(net.prefix_len());
    // start + 2^host_bits, big-endian, or None on overflow.
    let mut end = start.clone();
    let mut carry_at = bits - host_bits; // bit index (from the top) to add 1 at
    if carry_at == 0 {
        return Ok((start, None));
    }
    carry_at -= 1;
    let mut byte = (carry_at / 8) as usize;
    let mut add: u16 = 1 << (7 - carry_at % 8);
    loop {
        let sum = u16::from(end[byte]) + add;
        end[byte] = sum as u8;
        add = sum >> 8;
        if add == 0 {
            return Ok((start, Some(end)));
        }
        if byte == 0 {
            return Ok((start, None));
        }
        byte -= 1;
    }
}

fn parse_priority(words: &[&str]) -> Res<i32> {
    let named = |w: &str| -> Res<i32> {
        Ok(match w {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => -100,
            "filter" => 0,
            "security" => 50,
            "srcnat" => 100,
            other => other
                .parse::<i32>()
                .map_err(|_| format!("unknown priority {other:?}"))?,
        })
    };
    match words {
        [p] => named(p),
        [p, "+", n] => Ok(named(p)? + named(n)?),
        [p, "-", n] => Ok(named(p)? - named(n)?),
        _ => Err(format!("unsupported priority {:?}", words.join(" "))),
    }
}

fn parse_verdict(text: &str) -> Res<Verdict> {
    let words: Vec<&str> = text.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["accept"] => Verdict::Accept,
        ["drop"] => Verdict::Drop,
        ["return"] => Verdict::Return,
        ["jump", c] => Verdict::Jump((*c).into()),
        ["goto", c] => Verdict::Goto((*c).into()),
        _ => return Err(format!("unsupported verdict {text:?}")),
    })
}

fn proto_number(word: &str) -> Option<u8> {
    Some(match word {
        "icmp" => 1,
        "tcp" => 6,
        "udp" => 17,
        "icmpv6" => 58,
        "sctp" => 132,
        _ => word.parse().ok()?,
    })
}

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

/// A value loaded into a register, for matches and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// `ip|ip6 saddr|daddr`: payload offset and length.
    Addr { offset: u32, len: u32 },
    /// `meta l4proto`.
    L4proto,
    /// `th dport` / `tcp dport`: the transport header's destination port.
    Dport,
}

impl Field {
    fn key_part(self) -> KeyPart {
        match self {
            Field::Addr { len: 4, .. } => KeyPart::Ipv4,
            Field::Addr { .. } => KeyPart::Ipv6,
            Field::L4proto => KeyPart::Proto,
            Field::Dport => KeyPart::Service,
        }
    }
}

struct RuleParser<'a, 'b> {
    w: &'a mut Writer,
    family: u8,
    tokens: &'b [&'b str],
    pos: usize,
}

impl<'b> RuleParser<'_, 'b> {
    fn peek(&self) -> Option<&'b str> {
        self.tokens.get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<&'b str> {
        self.tokens.get(self.pos + n).copied()
    }

    fn next(&mut self) -> Res<&'b str> {
        let t = self
            .tokens
            .get(self.pos)
            .copied()
            .ok_or_else(|| "unexpected end of rule".to_string())?;
        self.pos += 1;
        Ok(t)
    }

    fn expect(&mut self, word: &str) -> Res<()> {
        match self.next()? {
            t if t == word => Ok(()),
            t => Err(format!("expected {word:?}, found {t:?}")),
        }
    }

    fn ipx(&self) -> &'static str {
        if self.family == AF_INET { "ip" } else { "ip6" }
    }

    fn rule(&mut self) -> Res<()> {
        while let Some(token) = self.peek() {
            match token {
                "ip" | "ip6" if token == self.ipx() => self.addr_statement()?,
                "meta" => self.meta_statement()?,
                "tcp" | "udp" | "sctp" => {
                    let proto = self.next()?.to_string();
                    self.expect("dport")?;
                    let port = self.port()?;
                    self.l4proto_match(&proto)?;
                    self.load(Field::Dport, REG_1);
                    self.cmp(REG_1, CMP_EQ, &port);
                }
                "ct" => {
                    self.pos += 1;
                    self.expect("state")?;
                    self.expect("new")?;
                    self.expr("ct", |w| {
                        w.u32(1, REG_1); // NFTA_CT_DREG
                        w.u32(2, 0); // NFTA_CT_KEY: NFT_CT_STATE
                    });
                    self.bitwise(REG_1, &8u32.to_ne_bytes(), &0u32.to_ne_bytes());
                    self.cmp(REG_1, CMP_NEQ, &0u32.to_ne_bytes());
                }
                "fib" => {
                    self.pos += 1;
                    let flags = match self.next()? {
                        "saddr" => 1u32,
                        "daddr" => 2u32,
                        other => return Err(format!("unsupported fib input {other:?}")),
                    };
                    self.expect("type")?;
                    self.expect("local")?;
                    self.expr("fib", |w| {
                        w.u32(1, REG_1); // NFTA_FIB_DREG
                        w.u32(2, 3); // NFTA_FIB_RESULT: NFT_FIB_RESULT_ADDRTYPE
                        w.u32(3, flags); // NFTA_FIB_FLAGS
                    });
                    self.cmp(REG_1, CMP_EQ, &2u32.to_ne_bytes()); // RTN_LOCAL
                }
                "numgen" => self.numgen()?,
                "th" => {
                    return Err("th outside a concatenation".into());
                }
                "update" => self.update()?,
                "dnat" => self.dnat()?,
                "masquerade" => {
                    self.pos += 1;
                    let mut flags = 0u32;
                    if self.peek() == Some("fully-random") {
                        self.pos += 1;
                        flags |= 0x10; // NF_NAT_RANGE_PROTO_RANDOM_FULLY
                    }
                    self.expr("masq", |w| {
                        if flags != 0 {
                            w.u32(1, flags); // NFTA_MASQ_FLAGS
                        }
                    });
                }
                "reject" => self.reject()?,
                "counter" => {
                    self.pos += 1;
                    self.expr("counter", |w| {
                        w.u64(1, 0); // NFTA_COUNTER_BYTES
                        w.u64(2, 0); // NFTA_COUNTER_PACKETS
                    });
                }
                "accept" | "drop" | "return" => {
                    let v = parse_verdict(self.next()?)?;
                    self.verdict(&v);
                }
                "jump" | "goto" => {
                    let kind = self.next()?;
                    let chain = self.next()?;
                    let v = parse_verdict(&format!("{kind} {chain}"))?;
                    self.verdict(&v);
                }
                other => return Err(format!("unsupported statement at {other:?}")),
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

    fn load(&mut self, field: Field, dreg: u32) {
        match field {
            Field::Addr { offset, len } => self.payload(dreg, PAYLOAD_NETWORK, offset, len),
            Field::L4proto => self.meta_load(META_L4PROTO, dreg),
            Field::Dport => self.payload(dreg, PAYLOAD_TRANSPORT, 2, 2),
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

    fn verdict(&mut self, v: &Verdict) {
        self.expr("immediate", |w| {
            w.u32(1, REG_VERDICT); // NFTA_IMMEDIATE_DREG
            w.data_verdict(2, v); // NFTA_IMMEDIATE_DATA
        });
    }

    fn immediate(&mut self, dreg: u32, data: &[u8]) {
        self.expr("immediate", |w| {
            w.u32(1, dreg);
            w.data_value(2, data);
        });
    }

    fn set_name(&mut self) -> Res<String> {
        let t = self.next()?;
        t.strip_prefix('@')
            .map(str::to_string)
            .ok_or_else(|| format!("expected @set, found {t:?}"))
    }

    fn port(&mut self) -> Res<Vec<u8>> {
        let t = self.next()?;
        t.parse::<u16>()
            .map(|p| p.to_be_bytes().to_vec())
            .map_err(|_| format!("{t:?} is not a port"))
    }

    fn l4proto_match(&mut self, proto: &str) -> Res<()> {
        let number = proto_number(proto).ok_or_else(|| format!("unknown protocol {proto:?}"))?;
        self.meta_load(META_L4PROTO, REG_1);
        self.cmp(REG_1, CMP_EQ, &[number]);
        Ok(())
    }

    /// A field at the cursor: `ip saddr`, `meta l4proto`, `th dport`.
    fn field(&mut self) -> Res<Field> {
        let a = self.next()?;
        let b = self.next()?;
        let v6 = self.family == AF_INET6;
        Ok(match (a, b) {
            ("ip", "saddr") if !v6 => Field::Addr { offset: 12, len: 4 },
            ("ip", "daddr") if !v6 => Field::Addr { offset: 16, len: 4 },
            ("ip6", "saddr") if v6 => Field::Addr { offset: 8, len: 16 },
            ("ip6", "daddr") if v6 => Field::Addr {
                offset: 24,
                len: 16,
            },
            ("meta", "l4proto") => Field::L4proto,
            ("th", "dport") => Field::Dport,
            _ => return Err(format!("unsupported field {a} {b}")),
        })
    }

    /// `F . F . F vmap @map` or `F . F @set`, the first field already read.
    fn concat_vmap(&mut self, first: Field) -> Res<()> {
        let mut fields = vec![first];
        while self.peek() == Some(".") {
            self.pos += 1;
            fields.push(self.field()?);
        }
        let verdict = self.peek() == Some("vmap");
        if verdict {
            self.pos += 1;
        }
        let map = self.set_name()?;
        let mut offset = 0;
        for f in &fields {
            self.load(*f, concat_reg(offset));
            offset += (f.key_part().len() + 3) & !3;
        }
        self.lookup(REG_1, &map, verdict.then_some(REG_VERDICT), false);
        Ok(())
    }

    /// `ip saddr|daddr [!=] (ADDR | PREFIX | @set)` or the start of a concatenation.
    fn addr_statement(&mut self) -> Res<()> {
        let field = self.field()?;
        if self.peek() == Some(".") {
            return self.concat_vmap(field);
        }
        let Field::Addr { offset, len } = field else {
            return Err("expected an address field".into());
        };
        let op = if self.peek() == Some("!=") {
            self.pos += 1;
            CMP_NEQ
        } else {
            CMP_EQ
        };
        let value = self.next()?;
        if let Some(set) = value.strip_prefix('@') {
            self.load(field, REG_1);
            self.lookup(REG_1, set, None, op == CMP_NEQ);
            return Ok(());
        }
        let net: ipnet::IpNet = match value.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) => value
                .parse::<IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| format!("{value:?} is not an address"))?,
        };
        let octets = match net.network() {
            IpAddr::V4(a) if len == 4 => a.octets().to_vec(),
            IpAddr::V6(a) if len == 16 => a.octets().to_vec(),
            _ => return Err(format!("{value:?} is not of the table's family")),
        };
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

    /// `meta l4proto ...` and `meta mark ...`.
    fn meta_statement(&mut self) -> Res<()> {
        match self.peek_at(1) {
            Some("l4proto") => {
                let field = self.field()?;
                if self.peek() == Some(".") {
                    return self.concat_vmap(field);
                }
                let proto = self.next()?.to_string();
                self.l4proto_match(&proto)
            }
            Some("mark") => {
                self.pos += 2;
                match self.next()? {
                    // meta mark set meta mark (|/^) VALUE
                    "set" => {
                        self.expect("meta")?;
                        self.expect("mark")?;
                        let op = self.next()?.to_string();
                        let value = parse_u32(self.next()?)?;
                        let (mask, xor) = match op.as_str() {
                            "|" => (!value, value),
                            "^" => (u32::MAX, value),
                            other => return Err(format!("unsupported mark operator {other:?}")),
                        };
                        self.meta_load(META_MARK, REG_1);
                        self.bitwise(REG_1, &mask.to_ne_bytes(), &xor.to_ne_bytes());
                        self.expr("meta", |w| {
                            w.u32(2, META_MARK); // NFTA_META_KEY
                            w.u32(3, REG_1); // NFTA_META_SREG
                        });
                        Ok(())
                    }
                    // meta mark & MASK (==|!=) VALUE
                    "&" => {
                        let mask = parse_u32(self.next()?)?;
                        let op = match self.next()? {
                            "==" => CMP_EQ,
                            "!=" => CMP_NEQ,
                            other => return Err(format!("unsupported comparison {other:?}")),
                        };
                        let value = parse_u32(self.next()?)?;
                        self.meta_load(META_MARK, REG_1);
                        self.bitwise(REG_1, &mask.to_ne_bytes(), &0u32.to_ne_bytes());
                        self.cmp(REG_1, op, &value.to_ne_bytes());
                        Ok(())
                    }
                    other => Err(format!("unsupported meta mark statement at {other:?}")),
                }
            }
            other => Err(format!("unsupported meta key {other:?}")),
        }
    }

    /// `numgen random mod N (VALUE verdict | vmap @map)`.
    fn numgen(&mut self) -> Res<()> {
        self.pos += 1;
        self.expect("random")?;
        self.expect("mod")?;
        let modulus = parse_u32(self.next()?)?;
        self.expr("numgen", |w| {
            w.u32(1, REG_1); // NFTA_NG_DREG
            w.u32(2, modulus); // NFTA_NG_MODULUS
            w.u32(3, 1); // NFTA_NG_TYPE: NFT_NG_RANDOM
        });
        if self.peek() == Some("vmap") {
            self.pos += 1;
            let map = self.set_name()?;
            self.lookup(REG_1, &map, Some(REG_VERDICT), false);
        } else {
            let value = parse_u32(self.next()?)?;
            self.cmp(REG_1, CMP_EQ, &value.to_ne_bytes());
        }
        Ok(())
    }

    /// `update @set { ip saddr }`.
    fn update(&mut self) -> Res<()> {
        self.pos += 1;
        let set = self.set_name()?;
        self.expect("{")?;
        let field = self.field()?;
        self.expect("}")?;
        if !matches!(field, Field::Addr { .. }) {
            return Err("update keys other than an address are not supported".into());
        }
        self.load(field, REG_1);
        self.expr("dynset", |w| {
            w.u32(4, REG_1); // NFTA_DYNSET_SREG_KEY
            w.u32(3, 1); // NFTA_DYNSET_OP: NFT_DYNSET_OP_UPDATE
            w.str(1, &set); // NFTA_DYNSET_SET_NAME
        });
        Ok(())
    }

    /// `dnat to ADDR:PORT` / `dnat to [ADDR]:PORT`, or
    /// `dnat ip|ip6 to F . F . numgen random mod N map @map` (the map's value: `ADDR . PORT`).
    fn dnat(&mut self) -> Res<()> {
        self.pos += 1;
        if self.peek() == Some(self.ipx()) {
            self.pos += 1;
            self.expect("to")?;
            return self.dnat_map();
        }
        self.expect("to")?;
        let target = self.next()?;
        let addr: std::net::SocketAddr = target
            .parse()
            .map_err(|_| format!("{target:?} is not ADDR:PORT"))?;
        let octets = match addr.ip() {
            IpAddr::V4(a) if self.family == AF_INET => a.octets().to_vec(),
            IpAddr::V6(a) if self.family == AF_INET6 => a.octets().to_vec(),
            _ => return Err(format!("{target:?} is not of the table's family")),
        };
        self.immediate(REG_1, &octets);
        self.immediate(REG_2, &addr.port().to_be_bytes());
        let family = u32::from(self.family);
        self.expr("nat", |w| {
            w.u32(1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
            w.u32(2, family); // NFTA_NAT_FAMILY
            w.u32(3, REG_1); // NFTA_NAT_REG_ADDR_MIN
            w.u32(5, REG_2); // NFTA_NAT_REG_PROTO_MIN
            w.u32(7, 0x2); // NFTA_NAT_FLAGS: NF_NAT_RANGE_PROTO_SPECIFIED
        });
        Ok(())
    }

    /// The key of `dnat ip|ip6 to KEY map @map`: fields and at most one `numgen random mod N`,
    /// loaded into consecutive registers as a concatenation; the looked-up value's address
    /// and port feed the nat expression.
    fn dnat_map(&mut self) -> Res<()> {
        let mut offset = 0;
        loop {
            if self.peek() == Some("numgen") {
                self.pos += 1;
                self.expect("random")?;
                self.expect("mod")?;
                let modulus = parse_u32(self.next()?)?;
                let dreg = concat_reg(offset);
                self.expr("numgen", |w| {
                    w.u32(1, dreg); // NFTA_NG_DREG
                    w.u32(2, modulus); // NFTA_NG_MODULUS
                    w.u32(3, 1); // NFTA_NG_TYPE: NFT_NG_RANDOM
                });
                offset += 4;
            } else {
                let field = self.field()?;
                self.load(field, concat_reg(offset));
                offset += (field.key_part().len() + 3) & !3;
            }
            match self.next()? {
                "." => continue,
                "map" => break,
                other => return Err(format!("expected . or map, found {other:?}")),
            }
        }
        let map = self.set_name()?;
        self.lookup(REG_1, &map, Some(REG_1), false);
        let family = u32::from(self.family);
        let addr_len = if self.family == AF_INET { 4 } else { 16 };
        let proto_reg = concat_reg(addr_len);
        self.expr("nat", |w| {
            w.u32(1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
            w.u32(2, family); // NFTA_NAT_FAMILY
            w.u32(3, REG_1); // NFTA_NAT_REG_ADDR_MIN
            w.u32(5, proto_reg); // NFTA_NAT_REG_PROTO_MIN
        });
        Ok(())
    }

    /// `reject`, `reject with tcp reset`, `reject with icmp[v6] type T`.
    fn reject(&mut self) -> Res<()> {
        self.pos += 1;
        let v6 = self.family == AF_INET6;
        let (kind, code): (u32, u8) = if self.peek() == Some("with") {
            self.pos += 1;
            match (self.next()?, self.next()?) {
                ("tcp", "reset") => (1, 0),
                ("icmp", "type") if !v6 => (0, icmp_code(self.next()?)?),
                ("icmpv6", "type") if v6 => (0, icmpv6_code(self.next()?)?),
                (a, b) => return Err(format!("unsupported reject with {a} {b}")),
            }
        } else if v6 {
            (0, 4) // port-unreachable
        } else {
            (0, 3) // port-unreachable
        };
        self.expr("reject", |w| {
            w.u32(1, kind); // NFTA_REJECT_TYPE
            w.attr(2, &[code]); // NFTA_REJECT_ICMP_CODE
        });
        Ok(())
    }
}

fn icmp_code(name: &str) -> Res<u8> {
    Ok(match name {
        "net-unreachable" => 0,
        "host-unreachable" => 1,
        "prot-unreachable" => 2,
        "port-unreachable" => 3,
        "net-prohibited" => 9,
        "host-prohibited" => 10,
        "admin-prohibited" => 13,
        other => return Err(format!("unsupported icmp type {other:?}")),
    })
}

fn icmpv6_code(name: &str) -> Res<u8> {
    Ok(match name {
        "no-route" => 0,
        "admin-prohibited" => 1,
        "addr-unreachable" => 3,
        "port-unreachable" => 4,
        other => return Err(format!("unsupported icmpv6 type {other:?}")),
    })
}

fn parse_u32(text: &str) -> Res<u32> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a number"))
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
        // Through the compiler: a clear error naming the line, no batch.
        let name = "c".repeat(70_000);
        let script = format!("add table ip strake-proxy\nadd chain ip strake-proxy {name}\n");
        let e = compile(&script, 1, &mut Layouts::new()).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("65535"), "{e}");
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

    fn rule(family: &str, rule: &str) -> Vec<String> {
        let script = format!("add rule {family} strake-proxy c {rule}\n");
        let batch = compile(&script, 100, &mut Layouts::new()).unwrap();
        let msgs = messages(&batch.bytes);
        assert_eq!(msgs.len(), 3);
        render(msgs[1])
    }

    /// What `nft --debug=netlink` (nft 1.0.6) printed for the same rules.
    #[test]
    fn rules_are_linearised_as_nft_does() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "ip",
                "ip daddr . meta l4proto . th dport vmap @service-ips",
                &[
                    "[ payload load 4b @ network header + 16 => reg 1 ]",
                    "[ meta load l4proto => reg 9 ]",
                    "[ payload load 2b @ transport header + 2 => reg 10 ]",
                    "[ lookup reg 1 set service-ips dreg 0 ]",
                ],
            ),
            (
                "ip",
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
                "ip",
                "ct state new jump services",
                &[
                    "[ ct load state => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x00000008 ) ^ 0x00000000 ]",
                    "[ cmp neq reg 1 0x00000000 ]",
                    "[ immediate reg 0 jump -> services ]",
                ],
            ),
            (
                "ip",
                "meta mark set meta mark | 0x4000",
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0xffffbfff ) ^ 0x00004000 ]",
                    "[ meta set mark with reg 1 ]",
                ],
            ),
            (
                "ip",
                "meta mark & 0x4000 == 0 return",
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000 ]",
                    "[ cmp eq reg 1 0x00000000 ]",
                    "[ immediate reg 0 return ]",
                ],
            ),
            (
                "ip",
                "meta mark set meta mark ^ 0x4000",
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0xffffffff ) ^ 0x00004000 ]",
                    "[ meta set mark with reg 1 ]",
                ],
            ),
            ("ip", "masquerade fully-random", &["[ masq flags 0x10 ]"]),
            (
                "ip",
                "meta l4proto tcp reject with tcp reset",
                &[
                    "[ meta load l4proto => reg 1 ]",
                    "[ cmp eq reg 1 0x00000006 ]",
                    "[ reject type 1 code 0 ]",
                ],
            ),
            (
                "ip",
                "reject with icmp type host-unreachable",
                &["[ reject type 0 code 1 ]"],
            ),
            (
                "ip",
                "ip daddr @cluster-ips reject",
                &[
                    "[ payload load 4b @ network header + 16 => reg 1 ]",
                    "[ lookup reg 1 set cluster-ips ]",
                    "[ reject type 0 code 3 ]",
                ],
            ),
            (
                "ip",
                "ip saddr 10.244.1.1 jump mark-for-masquerade",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ cmp eq reg 1 0x0101f40a ]",
                    "[ immediate reg 0 jump -> mark-for-masquerade ]",
                ],
            ),
            (
                "ip",
                "update @aff { ip saddr }",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ dynset update reg_key 1 set aff ]",
                ],
            ),
            (
                "ip",
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
                "ip",
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
                "ip",
                "fib saddr type local jump mark-for-masquerade",
                &[
                    "[ fib saddr type => reg 1 ]",
                    "[ cmp eq reg 1 0x00000002 ]",
                    "[ immediate reg 0 jump -> mark-for-masquerade ]",
                ],
            ),
            (
                "ip",
                "numgen random mod 2 0 goto ep",
                &[
                    "[ numgen reg 1 = random mod 2 ]",
                    "[ cmp eq reg 1 0x00000000 ]",
                    "[ immediate reg 0 goto -> ep ]",
                ],
            ),
            (
                "ip",
                "numgen random mod 17 vmap @eps",
                &[
                    "[ numgen reg 1 = random mod 17 ]",
                    "[ lookup reg 1 set eps dreg 0 ]",
                ],
            ),
            (
                "ip",
                "ip saddr != @fw drop",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ lookup reg 1 set fw 0x1 ]",
                    "[ immediate reg 0 drop ]",
                ],
            ),
            (
                "ip",
                "ip saddr 10.240.0.0/12 jump c",
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x0000f0ff ) ^ 0x00000000 ]",
                    "[ cmp eq reg 1 0x0000f00a ]",
                    "[ immediate reg 0 jump -> c ]",
                ],
            ),
            (
                "ip6",
                "ip6 daddr . meta l4proto . th dport vmap @service-ips",
                &[
                    "[ payload load 16b @ network header + 24 => reg 1 ]",
                    "[ meta load l4proto => reg 2 ]",
                    "[ payload load 2b @ transport header + 2 => reg 13 ]",
                    "[ lookup reg 1 set service-ips dreg 0 ]",
                ],
            ),
            (
                "ip6",
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
                "ip6",
                "ip6 saddr fd00:244::/60 jump c",
                &[
                    "[ payload load 16b @ network header + 8 => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0xffffffff 0xf0ffffff 0x00000000 0x00000000 ) ^ 0x00000000 0x00000000 0x00000000 0x00000000 ]",
                    "[ cmp eq reg 1 0x440200fd 0x00000000 0x00000000 0x00000000 ]",
                    "[ immediate reg 0 jump -> c ]",
                ],
            ),
            (
                "ip6",
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
                "ip6",
                "reject with icmpv6 type addr-unreachable",
                &["[ reject type 0 code 3 ]"],
            ),
            ("ip6", "reject", &["[ reject type 0 code 4 ]"]),
        ];
        for (family, text, expected) in cases {
            assert_eq!(rule(family, text), *expected, "{family} {text}");
        }
    }

    #[test]
    fn batch_is_framed_and_only_the_last_command_asks_for_an_ack() {
        let script = "add table ip strake-proxy\ndelete table ip strake-proxy\n";
        let batch = compile(script, 7, &mut Layouts::new()).unwrap();
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
            (batch.line_of(8), batch.line_of(9), batch.line_of(7)),
            (Some(0), Some(1), None)
        );
        // The table message: "strake-proxy\0" padded, then flags 0.
        assert_eq!(
            &msgs[1][20..],
            b"\x11\x00\x01\x00strake-proxy\x00\x00\x00\x00\x08\x00\x02\x00\x00\x00\x00\x00"
        );
    }

    fn elements_of(script: &str) -> Vec<(Vec<u8>, Option<String>, u32)> {
        let batch = compile(script, 1, &mut Layouts::new()).unwrap();
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

    #[test]
    fn map_and_interval_elements_are_encoded_as_nft_does() {
        // nft: "element 0100600a 00000006 00005000  : goto -> ep", "element 00000006 00008075".
        let els = elements_of(
            "add map ip strake-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
             add map ip strake-proxy service-nodeports { type inet_proto . inet_service : verdict ; }\n\
             add element ip strake-proxy service-ips { 10.96.0.1 . tcp . 80 : goto ep, 10.96.0.2 . udp . 53 : drop }\n\
             add element ip strake-proxy service-nodeports { tcp . 30080 : goto reject-chain }\n",
        );
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
        let els = elements_of(
            "add set ip strake-proxy fw { type ipv4_addr ; flags interval ; }\n\
             add element ip strake-proxy fw { 10.1.2.3/32, 203.0.113.0/24, 255.255.255.0/24, 0.0.0.0/0 }\n",
        );
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
        // typeof numgen keys are host-order integers.
        let els = elements_of(
            "add map ip6 strake-proxy eps { typeof numgen random mod 1 : verdict ; }\n\
             add element ip6 strake-proxy eps { 1 : goto x }\n",
        );
        assert_eq!(
            els,
            [(1u32.to_ne_bytes().to_vec(), Some("goto -> x".into()), 0)]
        );
    }

    #[test]
    fn large_element_lists_are_split_into_messages_of_one_batch() {
        let mut script = String::from(
            "add map ip strake-proxy m { type ipv4_addr . inet_proto . inet_service : verdict ; }\nadd element ip strake-proxy m { ",
        );
        let items: Vec<String> = (0..5000)
            .map(|i| {
                format!(
                    "10.96.{}.{} . tcp . 80 : goto svc-default/some-long-service-name/tcp/http",
                    i / 250,
                    i % 250
                )
            })
            .collect();
        script.push_str(&items.join(", "));
        script.push_str(" }\n");
        let batch = compile(&script, 1, &mut Layouts::new()).unwrap();
        let msgs = messages(&batch.bytes);
        let element_msgs = msgs.len() - 3;
        assert!(element_msgs > 1, "{element_msgs}");
        assert!(msgs.iter().all(|m| m.len() < 64 * 1024));
        assert_eq!(elements_of(&script).len(), 5000);
        // Every message of the line maps back to it.
        assert!(batch.lines[1..].iter().all(|l| *l == 1));
    }

    #[test]
    fn set_declarations_carry_nft_key_types_and_flags() {
        let batch = compile(
            "add set ip6 strake-proxy aff { type ipv6_addr ; flags dynamic,timeout ; timeout 10800s ; }\n",
            1,
            &mut Layouts::new(),
        )
        .unwrap();
        let msgs = messages(&batch.bytes);
        let a = attrs(&msgs[1][20..]);
        assert_eq!(be(&a, attr::SET_FLAGS), 0x30);
        assert_eq!(be(&a, attr::SET_KEY_TYPE), 8);
        assert_eq!(be(&a, attr::SET_KEY_LEN), 16);
        assert_eq!(
            get(&a, attr::SET_TIMEOUT),
            Some(&10_800_000u64.to_be_bytes()[..])
        );
        let batch = compile(
            "add map ip strake-proxy m { type ipv4_addr . inet_proto . inet_service : verdict ; }\n",
            1,
            &mut Layouts::new(),
        )
        .unwrap();
        let a = attrs(&messages(&batch.bytes)[1][20..]);
        // (7 << 12) | (12 << 6) | 13, as nft shows 0x0000730d.
        assert_eq!(be(&a, attr::SET_KEY_TYPE), 0x730d);
        assert_eq!(be(&a, attr::SET_KEY_LEN), 12);
        assert_eq!(be(&a, attr::SET_FLAGS), 0x8);
        assert_eq!(be(&a, attr::SET_DATA_TYPE), 0xffff_ff00);
    }

    #[test]
    fn base_chains_get_hook_priority_and_policy() {
        let batch = compile(
            "add chain ip strake-proxy filter-prerouting { type filter hook prerouting priority dstnat - 10 ; policy accept ; }\n",
            1,
            &mut Layouts::new(),
        )
        .unwrap();
        let a = attrs(&messages(&batch.bytes)[1][20..]);
        assert_eq!(string(get(&a, attr::CHAIN_TYPE).unwrap()), "filter");
        assert_eq!(be(&a, attr::CHAIN_POLICY), 1);
        let hook = attrs(get(&a, attr::CHAIN_HOOK).unwrap());
        assert_eq!(be(&hook, attr::HOOK_HOOKNUM), 0);
        assert_eq!(be(&hook, attr::HOOK_PRIORITY) as i32, -110);
    }

    #[test]
    fn refuses_what_it_cannot_encode_and_other_tables() {
        let err = |s: &str| compile(s, 1, &mut Layouts::new()).unwrap_err();
        assert_eq!(err("add table ip filter\n").line, 1);
        assert_eq!(err("flush ruleset\n").line, 1);
        assert!(
            err("add table inet strake-proxy\n")
                .reason
                .contains("family")
        );
        let e = err("add table ip strake-proxy\nadd rule ip strake-proxy c ip saddr 1.2.3.4 log\n");
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("log"), "{e}");
        // Elements of a set this backend never declared (it cannot know their key layout).
        assert!(
            err("add element ip strake-proxy nope { 1.2.3.4 }\n")
                .reason
                .contains("declared")
        );
        assert!(
            err("add rule ip strake-proxy c ip6 saddr ::1 drop\n")
                .reason
                .contains("ip6")
        );
    }

    #[test]
    fn every_rule_the_ruleset_builds_is_encodable() {
        use crate::nft::ruleset::Ruleset;
        use crate::nft::sync::full_script;
        use crate::testutil::{config, ep, model_of, service, slice, with_status};
        use serde_json::json;
        let lb = with_status(
            service(
                "default",
                "lb",
                json!({ "type": "LoadBalancer", "clusterIPs": ["10.96.0.8", "fd00:96::8"], "ipFamilies": ["IPv4", "IPv6"], "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP", "loadBalancerSourceRanges": ["203.0.113.0/24", "2001:db8::/32"], "externalIPs": ["192.0.2.8"], "ports": [{ "port": 80, "nodePort": 30081 }] }),
            ),
            json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.1" }, { "ip": "2001:db8::1" }] } }),
        );
        let many: Vec<serde_json::Value> = (1..=20)
            .map(|i| ep(&format!("10.244.1.{i}"), crate::testutil::NODE, true))
            .collect();
        let s4 = slice(
            "default",
            "lb",
            "lb-4",
            "IPv4",
            json!([{ "port": 80 }]),
            json!(many),
        );
        let s6 = slice(
            "default",
            "lb",
            "lb-6",
            "IPv6",
            json!([{ "port": 80 }]),
            json!([ep("fd00:244::1", "node-b", true)]),
        );
        let rs = Ruleset::build(&model_of(&[lb], &[s4, s6]), &config());
        let script = full_script(&rs);
        let batch = compile(&script, 1, &mut Layouts::new()).unwrap();
        assert!(batch.lines.len() > 50);
    }
}
