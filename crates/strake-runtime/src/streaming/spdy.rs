//! SPDY/3.1 as Kubernetes' streaming protocols use it: the frame codec (control and data
//! frames, zlib-compressed header blocks with SPDY/3's preset dictionary) and a server session
//! that multiplexes the streams a client opens over one upgraded HTTP connection.
//!
//! Hand-written: no maintained Rust crate speaks SPDY (the protocol was retired from browsers
//! in 2016; kube-rs only speaks WebSocket), while kubectl, crictl, the API server and critest
//! still reach the streaming server over SPDY/3.1. Like Go's `spdystream`, which those clients
//! use, the session does no SPDY flow control (spdystream ignores WINDOW_UPDATE, so sending one
//! would not slow it down): back-pressure is TCP's. Each stream queues at most
//! [`STREAM_BUFFER`] chunks of what the client sent; when the reader of a stream falls behind,
//! the session stops reading the connection (as spdystream's bounded frame queues do), the
//! kernel's receive window fills and the client's writes block. A connection holds at most
//! [`MAX_STREAMS`] open streams; more are refused with RST_STREAM.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// FLAG_FIN: the sender's last frame on a stream.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL (SYN_STREAM): the recipient may not send on the stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// RST_STREAM status: the stream was refused.
pub const RST_REFUSED_STREAM: u32 = 3;
/// RST_STREAM status: the stream was cancelled.
pub const RST_CANCEL: u32 = 5;
/// The largest frame payload (24-bit length).
const MAX_PAYLOAD: usize = 0x00ff_ffff;
/// Header blocks larger than this (decompressed) are refused.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// DATA frames this session writes carry at most this much; what it reads is handed on in
/// chunks of at most this much.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;
/// Chunks of inbound data queued per stream before the session stops reading the connection.
pub const STREAM_BUFFER: usize = 16;
/// Streams a client may hold open on one connection; more are refused.
pub const MAX_STREAMS: usize = 512;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// Header names (lower-case on the wire) and values (several values joined by NUL).
pub type Headers = Vec<(String, String)>;

/// The value of header `name` (case-insensitive), its first value when there are several.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.split('\0').next().unwrap_or(""))
}

/// One SPDY/3.1 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// `(flags, id, value)` entries.
    Settings {
        flags: u8,
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame type this codec does not know (skipped, as the protocol asks).
    Unknown {
        kind: u16,
        flags: u8,
    },
}

/// A malformed frame or header block.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("frame payload of {0} bytes is too large")]
    TooLarge(usize),
    #[error("header block compression")]
    Compress(#[source] flate2::CompressError),
    #[error("header block decompression")]
    Decompress(#[source] flate2::DecompressError),
    #[error("connection i/o")]
    Io(#[source] std::io::Error),
}

/// SPDY/3's zlib dictionary (draft-mbelshe-httpbis-spdy-00, 2.6.10.1): length-prefixed
/// header names and common values, then common strings. Built from its parts instead of
/// 1423 literal bytes; the unit tests check its length and Adler-32 (the dictionary ID
/// `0xe3c6a7c2` a peer's zlib stream names).
pub fn dictionary() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,",
        "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    );
    let mut d = Vec::with_capacity(1423);
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
}

/// Encodes and decodes frames for one connection. Header compression is stateful: one zlib
/// stream per direction for the connection's lifetime.
pub struct Codec {
    dict: Vec<u8>,
    compress: Compress,
    compress_started: bool,
    decompress: Decompress,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").finish_non_exhaustive()
    }
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Codec {
    pub fn new() -> Self {
        Codec {
            dict: dictionary(),
            compress: Compress::new(Compression::default(), true),
            compress_started: false,
            decompress: Decompress::new(true),
        }
    }

    fn compress_headers(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        if !self.compress_started {
            self.compress
                .set_dictionary(&self.dict)
                .map_err(SpdyError::Compress)?;
            self.compress_started = true;
        }
        let mut raw = Vec::new();
        raw.put_u32(headers.len() as u32);
        for (k, v) in headers {
            let k = k.to_ascii_lowercase();
            raw.put_u32(k.len() as u32);
            raw.put_slice(k.as_bytes());
            raw.put_u32(v.len() as u32);
            raw.put_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let start = self.compress.total_in();
        loop {
            let consumed = (self.compress.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            self.compress
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .map_err(SpdyError::Compress)?;
            let consumed = (self.compress.total_in() - start) as usize;
            // The sync flush is complete once all input is in and zlib left room unused.
            if consumed == raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    fn decompress_headers(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let mut out = Vec::with_capacity(block.len() * 4 + 256);
        let start = self.decompress.total_in();
        loop {
            let consumed = (self.decompress.total_in() - start) as usize;
            if out.capacity() - out.len() < 256 {
                out.reserve(1024);
            }
            let before = (self.decompress.total_in(), out.len());
            match self.decompress.decompress_vec(
                &block[consumed..],
                &mut out,
                FlushDecompress::Sync,
            ) {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.decompress
                        .set_dictionary(&self.dict)
                        .map_err(SpdyError::Decompress)?;
                }
                Err(e) => return Err(SpdyError::Decompress(e)),
            }
            if out.len() > MAX_HEADER_BLOCK {
                return Err(SpdyError::TooLarge(out.len()));
            }
            let consumed = (self.decompress.total_in() - start) as usize;
            let progressed = before != (self.decompress.total_in(), out.len());
            if consumed == block.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed && out.len() < out.capacity() {
                break;
            }
        }
        parse_header_block(&out)
    }

    /// Appends `frame`'s encoding to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), SpdyError> {
        let control = |out: &mut Vec<u8>, kind: u16, flags: u8, payload: &[u8]| {
            out.put_u16(0x8000 | VERSION);
            out.put_u16(kind);
            out.put_u32((u32::from(flags) << 24) | payload.len() as u32);
            out.put_slice(payload);
        };
        let mut p = Vec::new();
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(associated_to & 0x7fff_ffff);
                p.put_u8((priority & 0x7) << 5);
                p.put_u8(0);
                p.extend(self.compress_headers(headers)?);
                control(out, SYN_STREAM, *flags, &p);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                p.put_u32(stream_id & 0x7fff_ffff);
                p.extend(self.compress_headers(headers)?);
                control(out, SYN_REPLY, *flags, &p);
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                p.put_u32(stream_id & 0x7fff_ffff);
                p.extend(self.compress_headers(headers)?);
                control(out, HEADERS, *flags, &p);
            }
            Frame::RstStream { stream_id, status } => {
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(*status);
                control(out, RST_STREAM, 0, &p);
            }
            Frame::Settings { flags, entries } => {
                p.put_u32(entries.len() as u32);
                for (f, id, value) in entries {
                    p.put_u32((u32::from(*f) << 24) | (id & 0x00ff_ffff));
                    p.put_u32(*value);
                }
                control(out, SETTINGS, *flags, &p);
            }
            Frame::Ping { id } => {
                p.put_u32(*id);
                control(out, PING, 0, &p);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                p.put_u32(last_good_stream_id & 0x7fff_ffff);
                p.put_u32(*status);
                control(out, GOAWAY, 0, &p);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(delta & 0x7fff_ffff);
                control(out, WINDOW_UPDATE, 0, &p);
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_PAYLOAD {
                    return Err(SpdyError::TooLarge(data.len()));
                }
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32((u32::from(*flags) << 24) | data.len() as u32);
                out.put_slice(data);
            }
            Frame::Unknown { .. } => {}
        }
        Ok(())
    }

    /// Takes one complete frame off the front of `buf`, or `None` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = (u32::from_be_bytes([0, buf[5], buf[6], buf[7]])) as usize;
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let head = buf.split_to(8);
        let mut p = buf.split_to(len).freeze();
        let flags = head[4];
        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: p,
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let need = |p: &Bytes, n: usize, what: &'static str| {
            if p.len() < n {
                Err(SpdyError::Malformed(what))
            } else {
                Ok(())
            }
        };
        let frame = match kind {
            SYN_STREAM => {
                need(&p, 10, "SYN_STREAM")?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let associated_to = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers: self.decompress_headers(&p)?,
                }
            }
            SYN_REPLY => {
                need(&p, 4, "SYN_REPLY")?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                Frame::SynReply {
                    stream_id,
                    flags,
                    headers: self.decompress_headers(&p)?,
                }
            }
            HEADERS => {
                need(&p, 4, "HEADERS")?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                Frame::Headers {
                    stream_id,
                    flags,
                    headers: self.decompress_headers(&p)?,
                }
            }
            RST_STREAM => {
                need(&p, 8, "RST_STREAM")?;
                Frame::RstStream {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            SETTINGS => {
                need(&p, 4, "SETTINGS")?;
                let n = p.get_u32() as usize;
                need(&p, n.saturating_mul(8), "SETTINGS")?;
                let entries = (0..n)
                    .map(|_| {
                        let idf = p.get_u32();
                        ((idf >> 24) as u8, idf & 0x00ff_ffff, p.get_u32())
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            PING => {
                need(&p, 4, "PING")?;
                Frame::Ping { id: p.get_u32() }
            }
            GOAWAY => {
                need(&p, 4, "GOAWAY")?;
                let last_good_stream_id = p.get_u32() & 0x7fff_ffff;
                // SPDY/2 peers omit the status.
                let status = if p.len() >= 4 { p.get_u32() } else { 0 };
                Frame::GoAway {
                    last_good_stream_id,
                    status,
                }
            }
            WINDOW_UPDATE => {
                need(&p, 8, "WINDOW_UPDATE")?;
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    delta: p.get_u32() & 0x7fff_ffff,
                }
            }
            kind => Frame::Unknown { kind, flags },
        };
        Ok(Some(frame))
    }
}

fn parse_header_block(mut b: &[u8]) -> Result<Headers, SpdyError> {
    let bad = || SpdyError::Malformed("header block");
    let take_u32 = |b: &mut &[u8]| -> Result<usize, SpdyError> {
        if b.len() < 4 {
            return Err(bad());
        }
        let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        *b = &b[4..];
        Ok(v)
    };
    let n = take_u32(&mut b)?;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let field = |b: &mut &[u8]| -> Result<String, SpdyError> {
            let len = take_u32(b)?;
            if b.len() < len {
                return Err(bad());
            }
            let s = String::from_utf8_lossy(&b[..len]).into_owned();
            *b = &b[len..];
            Ok(s)
        };
        let k = field(&mut b)?;
        // SPDY/3 header names are lower case; upstream's framer refuses others
        // (UnlowercasedHeaderName), and so do we, rather than read `Port` as `port`.
        if k.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(SpdyError::Malformed(
                "header block (upper-case header name)",
            ));
        }
        let v = field(&mut b)?;
        headers.push((k, v));
    }
    Ok(headers)
}

/// What the session's writer task is asked to do.
#[derive(Debug)]
pub(crate) enum Out {
    Frame(Frame),
    /// Flush what is queued, then close the connection.
    Close,
}

/// The sending half of one stream (cloneable).
#[derive(Clone, Debug)]
pub struct StreamWriter {
    id: u32,
    tx: mpsc::Sender<Out>,
}

/// The session is gone (connection closed or failed).
#[derive(Debug, thiserror::Error)]
#[error("the SPDY connection is closed")]
pub struct Closed;

impl StreamWriter {
    /// A writer whose frames go to `tx` (another transport's writer task).
    pub(crate) fn new(id: u32, tx: mpsc::Sender<Out>) -> Self {
        StreamWriter { id, tx }
    }

    /// The stream's ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `data` (in chunks of at most [`MAX_DATA_CHUNK`]).
    pub async fn write(&self, data: &[u8]) -> Result<(), Closed> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            self.tx
                .send(Out::Frame(Frame::Data {
                    stream_id: self.id,
                    flags: 0,
                    data: Bytes::copy_from_slice(chunk),
                }))
                .await
                .map_err(|_| Closed)?;
        }
        Ok(())
    }

    /// [`Self::write`] from a thread outside the async runtime.
    pub fn blocking_write(&self, data: &[u8]) -> Result<(), Closed> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            self.tx
                .blocking_send(Out::Frame(Frame::Data {
                    stream_id: self.id,
                    flags: 0,
                    data: Bytes::copy_from_slice(chunk),
                }))
                .map_err(|_| Closed)?;
        }
        Ok(())
    }

    /// Half-closes the stream: an empty DATA frame with FLAG_FIN.
    pub async fn close(&self) -> Result<(), Closed> {
        self.tx
            .send(Out::Frame(Frame::Data {
                stream_id: self.id,
                flags: FLAG_FIN,
                data: Bytes::new(),
            }))
            .await
            .map_err(|_| Closed)
    }

    /// Aborts the stream (RST_STREAM CANCEL).
    pub async fn reset(&self) -> Result<(), Closed> {
        self.tx
            .send(Out::Frame(Frame::RstStream {
                stream_id: self.id,
                status: RST_CANCEL,
            }))
            .await
            .map_err(|_| Closed)
    }
}

/// A stream the client opened: its headers, what it sends, and a writer back.
#[derive(Debug)]
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    incoming: mpsc::Receiver<Bytes>,
    writer: StreamWriter,
}

impl Stream {
    /// A stream fed by another transport.
    pub(crate) fn new(
        id: u32,
        headers: Headers,
        incoming: mpsc::Receiver<Bytes>,
        writer: StreamWriter,
    ) -> Self {
        Stream {
            id,
            headers,
            incoming,
            writer,
        }
    }

    /// The next chunk the client sent; `None` once it half-closed (or reset) the stream.
    pub async fn read(&mut self) -> Option<Bytes> {
        self.incoming.recv().await
    }

    /// [`Self::read`] from a thread outside the async runtime.
    pub fn blocking_read(&mut self) -> Option<Bytes> {
        self.incoming.blocking_recv()
    }

    /// How many chunks of inbound data can wait for [`Self::read`] (the bound of the queue).
    pub fn buffer_capacity(&self) -> usize {
        self.incoming.max_capacity()
    }

    /// The sending half.
    pub fn writer(&self) -> StreamWriter {
        self.writer.clone()
    }

    /// The value of a header of the SYN_STREAM.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// A server-side SPDY session: streams come from the client; replies, data and pings go back.
#[derive(Clone, Debug)]
pub struct Session {
    tx: mpsc::Sender<Out>,
}

impl Session {
    /// A session whose frames go to `tx` (another transport's writer task).
    pub(crate) fn new(tx: mpsc::Sender<Out>) -> Self {
        Session { tx }
    }

    /// Starts serving `io` (an upgraded connection) as the server end. New streams arrive on
    /// the receiver (each already answered with SYN_REPLY); it ends when the client goes away.
    pub fn serve<IO>(io: IO) -> (Session, mpsc::Receiver<Stream>)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::serve_with_idle_timeout(io, None)
    }

    /// [`Self::serve`], closing the connection once no frame went either way for `idle`
    /// (upstream's stream idle timeout).
    pub fn serve_with_idle_timeout<IO>(
        io: IO,
        idle: Option<std::time::Duration>,
    ) -> (Session, mpsc::Receiver<Stream>)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (tx, rx) = mpsc::channel::<Out>(64);
        let (streams_tx, streams_rx) = mpsc::channel(16);
        let codec = std::sync::Arc::new(std::sync::Mutex::new(Codec::new()));
        let activity = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_frames(write, rx, codec.clone(), activity.clone()));
        tokio::spawn(read_frames(
            read,
            tx.clone(),
            streams_tx,
            codec,
            activity.clone(),
        ));
        if let Some(idle) = idle.filter(|d| !d.is_zero()) {
            tokio::spawn(close_when_idle(tx.clone(), activity, idle));
        }
        (Session { tx }, streams_rx)
    }

    /// Flushes what was written on every stream, then closes the connection.
    pub async fn close(&self) {
        let _ = self.tx.send(Out::Close).await;
    }
}

/// Sends Close once `activity` stood still for `idle`; ends with the connection.
async fn close_when_idle(
    tx: mpsc::Sender<Out>,
    activity: Arc<AtomicU64>,
    idle: std::time::Duration,
) {
    let mut seen = activity.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(idle) => {}
            _ = tx.closed() => return,
        }
        let now = activity.load(Ordering::Relaxed);
        if now == seen {
            tracing::debug!(
                idle_secs = idle.as_secs(),
                "closing idle streaming connection"
            );
            let _ = tx.send(Out::Close).await;
            return;
        }
        seen = now;
    }
}

async fn write_frames<W: AsyncWrite + Send>(
    write: W,
    mut rx: mpsc::Receiver<Out>,
    codec: std::sync::Arc<std::sync::Mutex<Codec>>,
    activity: Arc<AtomicU64>,
) {
    let mut write = std::pin::pin!(write);
    let mut buf = Vec::new();
    let mut closing = false;
    while let Some(out) = rx.recv().await {
        buf.clear();
        let mut next = Some(out);
        // Frames already queued go out in one write.
        while let Some(out) = next.take() {
            match out {
                Out::Frame(frame) => {
                    let mut c = codec.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = c.encode(&frame, &mut buf) {
                        tracing::debug!(error = %e, "spdy: encode frame");
                    }
                }
                Out::Close => {
                    closing = true;
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        if write.write_all(&buf).await.is_err() {
            return;
        }
        activity.fetch_add(1, Ordering::Relaxed);
        if closing {
            break;
        }
    }
    let _ = write.flush().await;
    let _ = write.shutdown().await;
}

/// Queues `data` for a stream in chunks of at most [`MAX_DATA_CHUNK`], waiting while its
/// queue is full (and so not reading the connection meanwhile); false once its reader is gone.
async fn deliver(to: &mpsc::Sender<Bytes>, mut data: Bytes) -> bool {
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(MAX_DATA_CHUNK));
        if to.send(chunk).await.is_err() {
            return false;
        }
    }
    true
}

async fn read_frames<R: AsyncRead + Send>(
    read: R,
    tx: mpsc::Sender<Out>,
    streams_tx: mpsc::Sender<Stream>,
    codec: std::sync::Arc<std::sync::Mutex<Codec>>,
    activity: Arc<AtomicU64>,
) {
    let mut read = std::pin::pin!(read);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    loop {
        let frame = {
            let mut c = codec.lock().unwrap_or_else(|e| e.into_inner());
            c.decode(&mut buf)
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => match read.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            Err(e) => {
                tracing::debug!(error = %e, "spdy: bad frame, closing");
                break;
            }
        };
        activity.fetch_add(1, Ordering::Relaxed);
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => {
                if open.len() >= MAX_STREAMS {
                    // Streams whose reader is gone no longer count.
                    open.retain(|_, s| !s.is_closed());
                }
                if open.len() >= MAX_STREAMS || open.contains_key(&stream_id) {
                    tracing::debug!(stream_id, "spdy: stream refused (too many open, or reused)");
                    let refuse = Frame::RstStream {
                        stream_id,
                        status: RST_REFUSED_STREAM,
                    };
                    if tx.send(Out::Frame(refuse)).await.is_err() {
                        break;
                    }
                    continue;
                }
                let (in_tx, in_rx) = mpsc::channel(STREAM_BUFFER);
                if flags & FLAG_FIN == 0 {
                    open.insert(stream_id, in_tx);
                }
                // Replied before the stream is handed over, so the reply precedes its data.
                let reply = Frame::SynReply {
                    stream_id,
                    flags: 0,
                    headers: Vec::new(),
                };
                if tx.send(Out::Frame(reply)).await.is_err() {
                    break;
                }
                let stream = Stream {
                    id: stream_id,
                    headers,
                    incoming: in_rx,
                    writer: StreamWriter {
                        id: stream_id,
                        tx: tx.clone(),
                    },
                };
                if streams_tx.send(stream).await.is_err() {
                    let _ = tx
                        .send(Out::Frame(Frame::RstStream {
                            stream_id,
                            status: RST_REFUSED_STREAM,
                        }))
                        .await;
                }
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if let Some(s) = open.get(&stream_id)
                    && !deliver(s, data).await
                {
                    // The stream's reader is gone: what else comes for it is dropped.
                    open.remove(&stream_id);
                }
                if flags & FLAG_FIN != 0 {
                    open.remove(&stream_id);
                }
            }
            Frame::RstStream { stream_id, .. } => {
                open.remove(&stream_id);
            }
            Frame::Ping { id } => {
                if tx.send(Out::Frame(Frame::Ping { id })).await.is_err() {
                    break;
                }
            }
            Frame::GoAway { .. } => break,
            Frame::Headers {
                stream_id, flags, ..
            } => {
                if flags & FLAG_FIN != 0 {
                    open.remove(&stream_id);
                }
            }
            Frame::SynReply { .. }
            | Frame::Settings { .. }
            | Frame::WindowUpdate { .. }
            | Frame::Unknown { .. } => {}
        }
    }
    // Every stream reads EOF; the stream receiver ends.
    drop(open);
    drop(streams_tx);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_dictionary_is_spdy3s() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        // Adler-32, the dictionary ID in every SPDY/3 header stream's zlib header.
        let (mut a, mut b) = (1u32, 0u32);
        for x in &d {
            a = (a + u32::from(*x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    /// Found by `fuzz/fuzz_targets/spdy_frames.rs` (`fuzz/artifacts/spdy_frames/crash-e4e7b1...`):
    /// a header name with an upper-case letter was read as given, and re-encoded in lower
    /// case. Upstream's framer refuses such a block; so do we.
    #[test]
    fn upper_case_header_names_are_refused() {
        let mut c = Codec::new();
        let mut buf = BytesMut::from(
            &hex(concat!(
                "800300010000004600000001000000000000789c63606060666060e02a2e294a4dcc2da9",
                "2c4805f258538b8af28b800c9682fca21220cd64610024398b520b4b5d8b441253801c46",
                "b3b30500000080030001000000468e0200000001000000000000789c63000000004b1241",
                "74416060800300"
            ))[..],
        );
        let err = c.decode(&mut buf).unwrap_err();
        assert!(err.to_string().contains("upper-case header name"), "{err}");
    }

    /// Two SYN_STREAM frames as Go's spdystream framer (what kubectl, crictl and the API
    /// server use) writes them: the second continues the first's zlib stream.
    #[test]
    fn decodes_frames_written_by_go_spdystream() {
        let mut c = Codec::new();
        let mut buf = BytesMut::from(
            &hex(concat!(
                "80030001000000300000000100000000000078f9e3c6a7c202e50e703a2b294a4dcc851625",
                "aca9a0808614cb45a024cc646100000000ffff",
                "800300010100001d0000000300000000000062606060c450c8565c92925f5a02000000ffff"
            ))[..],
        );
        let first = c.decode(&mut buf).unwrap().unwrap();
        let Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } = first
        else {
            panic!("{first:?}")
        };
        assert_eq!((stream_id, flags), (1, 0));
        assert_eq!(header(&headers, "streamType"), Some("error"));
        assert_eq!(header(&headers, "port"), Some("80"));
        let second = c.decode(&mut buf).unwrap().unwrap();
        let Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } = second
        else {
            panic!("{second:?}")
        };
        assert_eq!((stream_id, flags), (3, FLAG_FIN));
        assert_eq!(headers, vec![("streamtype".into(), "stdout".into())]);
        assert!(buf.is_empty());
        assert!(c.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn frames_round_trip_and_header_streams_stay_in_step() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 3,
                flags: FLAG_UNIDIRECTIONAL,
                headers: vec![("streamtype".into(), "error".into())],
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: vec![
                    ("streamtype".into(), "data".into()),
                    ("port".into(), "8080".into()),
                    ("requestid".into(), "0".into()),
                ],
            },
            Frame::Headers {
                stream_id: 3,
                flags: FLAG_FIN,
                headers: vec![("x".into(), "a\0b".into())],
            },
            Frame::RstStream {
                stream_id: 3,
                status: RST_CANCEL,
            },
            Frame::Settings {
                flags: 1,
                entries: vec![(0, 4, 100), (1, 7, 65536)],
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good_stream_id: 5,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 4096,
            },
            Frame::Data {
                stream_id: 5,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 5,
                flags: 0,
                data: Bytes::new(),
            },
        ];
        let (mut enc, mut dec) = (Codec::new(), Codec::new());
        let mut wire = Vec::new();
        for f in &frames {
            enc.encode(f, &mut wire).unwrap();
        }
        // Delivered a few bytes at a time: frames come out only once complete.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(5) {
            buf.extend_from_slice(chunk);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn unknown_control_frames_are_skipped_and_bad_versions_refused() {
        let mut c = Codec::new();
        let mut buf = BytesMut::from(&[0x80, 0x03, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x02, 1, 2][..]);
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Frame::Unknown { kind: 11, flags: 0 })
        );
        let mut buf =
            BytesMut::from(&[0x80, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1][..]);
        assert!(matches!(c.decode(&mut buf), Err(SpdyError::Version(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let idle = std::time::Duration::from_secs(60);
        let (_session, _streams) = Session::serve_with_idle_timeout(server_io, Some(idle));
        let (mut cr, mut cw) = tokio::io::split(client_io);
        let mut client = Codec::new();
        // Pings every 40s keep it open past the timeout...
        for id in [1, 3, 5] {
            tokio::time::sleep(std::time::Duration::from_secs(40)).await;
            let mut wire = Vec::new();
            client.encode(&Frame::Ping { id }, &mut wire).unwrap();
            cw.write_all(&wire).await.unwrap();
        }
        let mut buf = BytesMut::new();
        let mut pongs = 0;
        // ...then silence closes it: the client reads the pongs, then end of file.
        loop {
            while let Some(f) = client.decode(&mut buf).unwrap() {
                assert!(matches!(f, Frame::Ping { .. }));
                pongs += 1;
            }
            if cr.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
        assert_eq!(pongs, 3);
    }

    /// What a client sends on a stream nobody reads waits in a bounded queue, then in the
    /// connection (TCP back-pressure): the queue never holds more than its bound, and once the
    /// reader catches up every byte arrives, in order.
    #[tokio::test]
    async fn inbound_data_is_bounded_and_delivered_in_order() {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let (_session, mut streams) = Session::serve(server_io);
        let (_cr, mut cw) = tokio::io::split(client_io);
        let mut client = Codec::new();
        let mut wire = Vec::new();
        client
            .encode(
                &Frame::SynStream {
                    stream_id: 1,
                    associated_to: 0,
                    priority: 0,
                    flags: 0,
                    headers: vec![("streamtype".into(), "stdin".into())],
                },
                &mut wire,
            )
            .unwrap();
        cw.write_all(&wire).await.unwrap();
        let mut s = streams.recv().await.unwrap();
        assert_eq!(s.buffer_capacity(), STREAM_BUFFER);
        // 8 MiB in 1 MiB frames: far more than the queue and the pipe hold together.
        const FRAMES: usize = 8;
        let writer = tokio::spawn(async move {
            for i in 0..FRAMES {
                let mut wire = Vec::new();
                let data = Bytes::from(vec![i as u8; 1024 * 1024]);
                client
                    .encode(
                        &Frame::Data {
                            stream_id: 1,
                            flags: if i + 1 == FRAMES { FLAG_FIN } else { 0 },
                            data,
                        },
                        &mut wire,
                    )
                    .unwrap();
                cw.write_all(&wire).await.unwrap();
            }
            cw
        });
        let mut got = Vec::new();
        while let Some(chunk) = s.read().await {
            assert!(chunk.len() <= MAX_DATA_CHUNK);
            assert!(s.incoming.len() <= STREAM_BUFFER);
            got.extend_from_slice(&chunk);
        }
        let _cw = writer.await.unwrap();
        assert_eq!(got.len(), FRAMES * 1024 * 1024);
        for (i, part) in got.chunks(1024 * 1024).enumerate() {
            assert!(part.iter().all(|b| *b == i as u8), "frame {i} out of order");
        }
    }

    /// A client may hold [`MAX_STREAMS`] streams open on one connection; more are refused.
    #[tokio::test]
    async fn streams_beyond_the_cap_are_refused() {
        let (server_io, client_io) = tokio::io::duplex(1024 * 1024);
        let (_session, mut streams) = Session::serve(server_io);
        let (mut cr, mut cw) = tokio::io::split(client_io);
        let kept = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Some(s) = streams.recv().await {
                kept.push(s);
            }
            kept
        });
        let mut client = Codec::new();
        let mut wire = Vec::new();
        for i in 0..=MAX_STREAMS as u32 {
            client
                .encode(
                    &Frame::SynStream {
                        stream_id: 2 * i + 1,
                        associated_to: 0,
                        priority: 0,
                        flags: 0,
                        headers: vec![("streamtype".into(), "data".into())],
                    },
                    &mut wire,
                )
                .unwrap();
        }
        cw.write_all(&wire).await.unwrap();
        let mut buf = BytesMut::new();
        let refused = loop {
            if let Some(f) = client.decode(&mut buf).unwrap() {
                if let Frame::RstStream { stream_id, status } = f {
                    break (stream_id, status);
                }
                continue;
            }
            assert!(cr.read_buf(&mut buf).await.unwrap() > 0, "no refusal");
        };
        assert_eq!(refused, (2 * MAX_STREAMS as u32 + 1, RST_REFUSED_STREAM));
        drop(cw);
        drop(cr);
        assert_eq!(kept.await.unwrap().len(), MAX_STREAMS);
    }

    /// A client opens streams, sends data and a FIN; the session replies, delivers and ends.
    #[tokio::test]
    async fn a_session_replies_delivers_and_echoes_pings() {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let (session, mut streams) = Session::serve(server_io);
        let (mut cr, mut cw) = tokio::io::split(client_io);
        let mut client = Codec::new();
        let mut wire = Vec::new();
        for f in [
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "stdin".into())],
            },
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"input"),
            },
            Frame::Ping { id: 1 },
        ] {
            client.encode(&f, &mut wire).unwrap();
        }
        cw.write_all(&wire).await.unwrap();
        let mut s = streams.recv().await.unwrap();
        assert_eq!(s.header("streamType"), Some("stdin"));
        assert_eq!(s.read().await.unwrap(), Bytes::from_static(b"input"));
        assert_eq!(s.read().await, None);
        s.writer().write(b"output").await.unwrap();
        s.writer().close().await.unwrap();
        session.close().await;
        let mut got = Vec::new();
        let mut buf = BytesMut::new();
        loop {
            while let Some(f) = client.decode(&mut buf).unwrap() {
                got.push(f);
            }
            if cr.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
        assert_eq!(
            got,
            vec![
                Frame::SynReply {
                    stream_id: 1,
                    flags: 0,
                    headers: vec![]
                },
                Frame::Ping { id: 1 },
                Frame::Data {
                    stream_id: 1,
                    flags: 0,
                    data: Bytes::from_static(b"output")
                },
                Frame::Data {
                    stream_id: 1,
                    flags: FLAG_FIN,
                    data: Bytes::new()
                },
            ]
        );
    }
}
