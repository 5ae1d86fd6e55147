//! nf_tables netlink wire format: message headers, attributes and the protocol's numbers
//! (from the kernel's `linux/netfilter/nf_tables.h`, `nfnetlink.h` and `netlink.h`).

/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_CREATE`.
pub const NLM_F_CREATE: u16 = 0x400;
/// `NLM_F_APPEND`.
pub const NLM_F_APPEND: u16 = 0x800;
/// `NLA_F_NESTED`.
const NLA_F_NESTED: u16 = 0x8000;
/// `NLMSG_ERROR`.
pub const NLMSG_ERROR: u16 = 0x2;
/// `NLM_F_ACK_TLVS`: an error message carries extended-ack attributes.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's human-readable reason.
pub const NLMSGERR_ATTR_MSG: u16 = 1;

/// `NFNL_MSG_BATCH_BEGIN` / `END`.
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
/// See [`NFNL_MSG_BATCH_BEGIN`].
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
/// `NFNL_SUBSYS_NFTABLES`.
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// `NFT_MSG_*` commands.
pub mod msg {
    pub const NEWTABLE: u16 = 0;
    pub const DELTABLE: u16 = 2;
    pub const NEWCHAIN: u16 = 3;
    pub const DELCHAIN: u16 = 5;
    pub const NEWRULE: u16 = 6;
    pub const DELRULE: u16 = 8;
    pub const NEWSET: u16 = 9;
    pub const DELSET: u16 = 11;
    pub const NEWSETELEM: u16 = 12;
    pub const DELSETELEM: u16 = 14;
}

/// Attribute numbers, per object.
pub mod attr {
    pub const TABLE_NAME: u16 = 1;
    pub const TABLE_FLAGS: u16 = 2;

    pub const CHAIN_TABLE: u16 = 1;
    pub const CHAIN_NAME: u16 = 3;
    pub const CHAIN_HOOK: u16 = 4;
    pub const CHAIN_POLICY: u16 = 5;
    pub const CHAIN_TYPE: u16 = 7;
    pub const HOOK_HOOKNUM: u16 = 1;
    pub const HOOK_PRIORITY: u16 = 2;

    pub const RULE_TABLE: u16 = 1;
    pub const RULE_CHAIN: u16 = 2;
    pub const RULE_EXPRESSIONS: u16 = 4;
    pub const LIST_ELEM: u16 = 1;
    pub const EXPR_NAME: u16 = 1;
    pub const EXPR_DATA: u16 = 2;

    pub const SET_TABLE: u16 = 1;
    pub const SET_NAME: u16 = 2;
    pub const SET_FLAGS: u16 = 3;
    pub const SET_KEY_TYPE: u16 = 4;
    pub const SET_KEY_LEN: u16 = 5;
    pub const SET_DATA_TYPE: u16 = 6;
    pub const SET_DATA_LEN: u16 = 7;
    pub const SET_ID: u16 = 10;
    pub const SET_TIMEOUT: u16 = 11;
    pub const SET_USERDATA: u16 = 13;

    pub const SET_ELEM_LIST_TABLE: u16 = 1;
    pub const SET_ELEM_LIST_SET: u16 = 2;
    pub const SET_ELEM_LIST_ELEMENTS: u16 = 3;
    pub const SET_ELEM_KEY: u16 = 1;
    pub const SET_ELEM_DATA: u16 = 2;
    pub const SET_ELEM_FLAGS: u16 = 3;
    pub const SET_ELEM_USERDATA: u16 = 6;

    pub const DATA_VALUE: u16 = 1;
    pub const DATA_VERDICT: u16 = 2;
    pub const VERDICT_CODE: u16 = 1;
    pub const VERDICT_CHAIN: u16 = 2;
}

/// Builds netlink messages into one growing buffer (a batch).
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
    /// An attribute grew past the 65535 bytes its length field holds: the batch is unusable.
    too_long: bool,
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

impl Writer {
    /// An empty buffer.
    pub fn new() -> Self {
        Writer {
            buf: Vec::new(),
            too_long: false,
        }
    }

    /// The bytes written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Whether an attribute outgrew its 16-bit length (its bytes are then not to be sent).
    pub fn overflowed(&self) -> bool {
        self.too_long
    }

    /// `len` as an attribute length, remembering when it does not fit.
    fn attr_len(&mut self, len: usize) -> u16 {
        u16::try_from(len).unwrap_or_else(|_| {
            self.too_long = true;
            u16::MAX
        })
    }

    /// Consumes the writer.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Current length of the buffer.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Starts a message: `nlmsghdr` plus `nfgenmsg`. Returns its start, for [`Writer::end`].
    pub fn begin(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in by `end`
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    /// Ends the message started at `start`.
    pub fn end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Overwrites a native-endian `u16` at `at` (message flags, after the fact).
    pub fn set_u16_at(&mut self, at: usize, v: u16) {
        self.buf[at..at + 2].copy_from_slice(&v.to_ne_bytes());
    }

    /// Drops everything from `start` on (an unfinished message).
    pub fn truncate(&mut self, start: usize) {
        self.buf.truncate(start);
    }

    /// One attribute with a raw payload.
    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        let field = self.attr_len(len);
        self.buf.extend_from_slice(&field.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len() + pad4(len) - len, 0);
    }

    /// A big-endian `u32` attribute (nf_tables' integers are network order).
    pub fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// A big-endian `u64` attribute.
    pub fn u64(&mut self, ty: u16, v: u64) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, ty: u16, s: &str) {
        let len = 4 + s.len() + 1;
        let field = self.attr_len(len);
        self.buf.extend_from_slice(&field.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.buf.resize(self.buf.len() + pad4(len) - len, 0);
    }

    /// Opens a nested attribute; close it with [`Writer::close`].
    pub fn open(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    /// Closes the nested attribute opened at `start`.
    pub fn close(&mut self, start: usize) {
        let len = self.attr_len(self.buf.len() - start);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Bytes written since `start` (to keep nested attributes under their 64 KiB limit).
    pub fn since(&self, start: usize) -> usize {
        self.buf.len() - start
    }

    /// `NFTA_DATA_VALUE` inside a nested `ty`.
    pub fn data_value(&mut self, ty: u16, value: &[u8]) {
        let n = self.open(ty);
        self.attr(attr::DATA_VALUE, value);
        self.close(n);
    }

    /// `NFTA_DATA_VERDICT` inside a nested `ty`.
    pub fn data_verdict(&mut self, ty: u16, verdict: &Verdict) {
        let n = self.open(ty);
        let v = self.open(attr::DATA_VERDICT);
        self.u32(attr::VERDICT_CODE, verdict_code(verdict) as u32);
        if let Some(chain) = verdict.chain() {
            self.str(attr::VERDICT_CHAIN, chain);
        }
        self.close(v);
        self.close(n);
    }
}

pub use crate::nft::objects::Verdict;

/// The kernel's code of a verdict (`NF_DROP`, `NFT_JUMP`, ...).
fn verdict_code(v: &Verdict) -> i32 {
    match v {
        Verdict::Drop => 0,
        Verdict::Accept => 1,
        Verdict::Jump(_) => -3,
        Verdict::Goto(_) => -4,
        Verdict::Return => -5,
    }
}
