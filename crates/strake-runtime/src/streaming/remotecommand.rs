//! Exec and attach over SPDY: upstream's remotecommand protocols `v4.channel.k8s.io`,
//! `v3.channel.k8s.io` (adds the `resize` stream) and `v2.channel.k8s.io`.
//!
//! The client opens one stream per channel, named by its `streamType` header: `error`,
//! `stdin`, `stdout`, `stderr`, `resize`. When the process ends the server closes the output
//! streams and reports the outcome on `error`: v4 writes a Status JSON (`Success`, or
//! `Failure` with reason `NonZeroExitCode` and an `ExitCode` cause carrying the code, which
//! kubectl and crictl turn into their own exit code); v2/v3 write only a failure's message.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strake_types::cri;
use tokio::sync::mpsc;

use super::STREAM_CREATION_TIMEOUT;
use super::spdy::{Session, Stream, StreamWriter};
use crate::container::Containers;
use crate::runc::ProcessIo;

/// The sub-protocols served, preferred first (upstream's list minus the v1 `channel.k8s.io`,
/// which no client of the last several years offers alone).
pub const PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
];

/// How long output may keep flowing after the process exited (background children holding
/// its pipes would otherwise keep the session open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Which channels the request asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// The streams of one exec or attach.
#[derive(Debug, Default)]
pub struct Channels {
    pub error: Option<StreamWriter>,
    pub stdin: Option<Stream>,
    pub stdout: Option<StreamWriter>,
    pub stderr: Option<StreamWriter>,
    pub resize: Option<Stream>,
}

/// How many streams the client must open: error, one per requested channel, and resize for a
/// tty from v3 on.
pub fn expected_streams(opts: &Options, protocol: &str) -> usize {
    1 + usize::from(opts.stdin)
        + usize::from(opts.stdout)
        + usize::from(opts.stderr && !opts.tty)
        + usize::from(opts.tty && protocol != "v2.channel.k8s.io")
}

/// Waits for the client's streams (at most [`STREAM_CREATION_TIMEOUT`]).
pub async fn accept_streams(
    streams: &mut mpsc::Receiver<Stream>,
    expected: usize,
) -> Option<Channels> {
    let mut ch = Channels::default();
    let mut received = 0;
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while received < expected {
        let s = tokio::select! {
            s = streams.recv() => s?,
            _ = &mut deadline => {
                tracing::debug!("timed out waiting for client to create streams");
                return None;
            }
        };
        match s.header("streamType").unwrap_or("") {
            "error" => ch.error = Some(s.writer()),
            "stdin" => ch.stdin = Some(s),
            "stdout" => ch.stdout = Some(s.writer()),
            "stderr" => ch.stderr = Some(s.writer()),
            "resize" => ch.resize = Some(s),
            other => {
                tracing::debug!(stream_type = other, "unexpected stream type");
                continue;
            }
        }
        received += 1;
    }
    Some(ch)
}

/// How an exec or attach ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    ExitCode(i32),
    Error(String),
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Status {
    #[serde(skip_serializing_if = "String::is_empty", default)]
    status: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    message: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    reason: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    details: Option<Details>,
    #[serde(skip_serializing_if = "is_zero", default)]
    code: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Details {
    causes: Vec<Cause>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Cause {
    reason: String,
    message: String,
}

/// What the error stream carries for `outcome` under `protocol` (`None`: nothing).
pub fn status_bytes(protocol: &str, outcome: &Outcome) -> Option<Vec<u8>> {
    let status = match outcome {
        Outcome::Success => Status {
            status: "Success".into(),
            message: String::new(),
            reason: String::new(),
            details: None,
            code: 0,
        },
        Outcome::ExitCode(code) => Status {
            status: "Failure".into(),
            message: format!("command terminated with non-zero exit code: exit status {code}"),
            reason: "NonZeroExitCode".into(),
            details: Some(Details {
                causes: vec![Cause {
                    reason: "ExitCode".into(),
                    message: code.to_string(),
                }],
            }),
            code: 0,
        },
        Outcome::Error(msg) => Status {
            status: "Failure".into(),
            message: format!("Internal error occurred: {msg}"),
            reason: "InternalError".into(),
            details: None,
            code: 500,
        },
    };
    if protocol == "v4.channel.k8s.io" || protocol == "v5.channel.k8s.io" {
        serde_json::to_vec(&status).ok()
    } else if *outcome == Outcome::Success {
        None
    } else {
        Some(status.message.into_bytes())
    }
}

/// A terminal size as the resize stream carries it (JSON objects one after another).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Splits the resize stream's bytes into sizes; keeps an incomplete trailing object in `buf`.
pub fn parse_sizes(buf: &mut Vec<u8>) -> Vec<TerminalSize> {
    let mut sizes = Vec::new();
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<TerminalSize>();
    let mut keep_from = None;
    loop {
        match it.next() {
            Some(Ok(s)) => sizes.push(s),
            Some(Err(e)) if e.is_eof() => {
                keep_from = Some(it.byte_offset());
                break;
            }
            Some(Err(_)) => break,
            None => break,
        }
    }
    match keep_from {
        Some(off) => {
            buf.drain(..off);
        }
        None => buf.clear(),
    }
    sizes
}

/// Finishes a session: output streams closed, the outcome on the error stream, connection
/// closed.
async fn finish(protocol: &str, ch: &Channels, session: &Session, outcome: Outcome) {
    for w in [&ch.stdout, &ch.stderr].into_iter().flatten() {
        let _ = w.close().await;
    }
    if let Some(err) = &ch.error {
        if let Some(bytes) = status_bytes(protocol, &outcome) {
            let _ = err.write(&bytes).await;
        }
        let _ = err.close().await;
    }
    session.close().await;
}

fn dup(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    fd.try_clone()
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pseudo-terminal pair (master, slave), both close-on-exec.
fn openpty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; the name, termios and winsize pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&m, &s] {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((m, s))
}

/// Sets a terminal's size (on a pty master: the kernel signals the terminal's foreground
/// process group with SIGWINCH).
pub fn set_size(fd: &OwnedFd, size: TerminalSize) {
    let ws = libc::winsize {
        ws_row: size.height,
        ws_col: size.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Copies `from` to the stream until EOF (a pty master's EIO once every slave is closed);
/// signals `done` at the end.
fn pump_out(from: OwnedFd, to: Option<StreamWriter>, done: std::sync::mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut f = File::from(from);
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(w) = &to
                        && w.blocking_write(&buf[..n]).is_err()
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}

/// Copies the stdin stream into `to`; closes `to` at the stream's end when `close_at_eof`.
fn pump_in(mut from: Stream, to: OwnedFd, close_at_eof: bool) {
    std::thread::spawn(move || {
        let mut f = File::from(to);
        while let Some(chunk) = from.blocking_read() {
            if f.write_all(&chunk).is_err() {
                return;
            }
        }
        if !close_at_eof {
            // A terminal cannot be half-closed: the process sees end-of-file as ^D.
            let _ = f.write_all(&[0x04]);
        }
    });
}

/// Applies the resize stream's sizes to `tty` until the stream ends.
fn pump_resize(mut from: Stream, tty: OwnedFd) {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(chunk) = from.read().await {
            buf.extend_from_slice(&chunk);
            for size in parse_sizes(&mut buf) {
                set_size(&tty, size);
            }
        }
    });
}

/// Serves one exec: waits for the streams, runs the command through the container's OCI
/// runtime with pipes or a terminal, relays, and reports the exit.
pub async fn serve_exec(
    containers: Arc<Containers>,
    req: cri::ExecRequest,
    protocol: &str,
    session: Session,
    mut streams: mpsc::Receiver<Stream>,
) {
    let opts = Options {
        stdin: req.stdin,
        stdout: req.stdout,
        stderr: req.stderr,
        tty: req.tty,
    };
    let Some(ch) = accept_streams(&mut streams, expected_streams(&opts, protocol)).await else {
        session.close().await;
        return;
    };
    // Streams opened later are refused by dropping the receiver.
    drop(streams);
    run_exec(containers, req, protocol, ch, session).await;
}

/// Runs an exec on streams already set up (SPDY or WebSocket) and reports its end as
/// `protocol` does.
pub async fn run_exec(
    containers: Arc<Containers>,
    req: cri::ExecRequest,
    protocol: &str,
    mut ch: Channels,
    session: Session,
) {
    let opts = Options {
        stdin: req.stdin,
        stdout: req.stdout,
        stderr: req.stderr,
        tty: req.tty,
    };
    let outcome = match exec(containers, req, &opts, &mut ch).await {
        Ok(0) => Outcome::Success,
        Ok(code) => Outcome::ExitCode(code),
        Err(msg) => Outcome::Error(msg),
    };
    finish(protocol, &ch, &session, outcome).await;
}

async fn exec(
    containers: Arc<Containers>,
    req: cri::ExecRequest,
    opts: &Options,
    ch: &mut Channels,
) -> Result<i32, String> {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut outputs = 0;
    let io = if opts.tty {
        let (master, slave) = openpty().map_err(|e| format!("allocate a terminal: {e}"))?;
        let err = |e: std::io::Error| format!("allocate a terminal: {e}");
        pump_out(
            dup(&master).map_err(err)?,
            ch.stdout.clone(),
            done_tx.clone(),
        );
        outputs += 1;
        if let Some(stdin) = ch.stdin.take() {
            pump_in(stdin, dup(&master).map_err(err)?, false);
        }
        if let Some(resize) = ch.resize.take() {
            pump_resize(resize, dup(&master).map_err(err)?);
        }
        // The OCI runtime gets the slave as stdio: it allocates the container's own terminal
        // and relays between the two, resizing it when its controlling terminal (this slave)
        // is resized.
        ProcessIo {
            stdin: Some(dup(&slave).map_err(err)?),
            stdout: Some(dup(&slave).map_err(err)?),
            stderr: Some(slave),
        }
    } else {
        let err = |e: std::io::Error| format!("create pipes: {e}");
        let mut io = ProcessIo::default();
        if let Some(stdin) = ch.stdin.take() {
            let (r, w) = pipe().map_err(err)?;
            pump_in(stdin, w, true);
            io.stdin = Some(r);
        }
        if let Some(w) = &ch.stdout {
            let (r, wr) = pipe().map_err(err)?;
            pump_out(r, Some(w.clone()), done_tx.clone());
            outputs += 1;
            io.stdout = Some(wr);
        }
        if let Some(w) = &ch.stderr {
            let (r, wr) = pipe().map_err(err)?;
            pump_out(r, Some(w.clone()), done_tx.clone());
            outputs += 1;
            io.stderr = Some(wr);
        }
        io
    };
    drop(done_tx);
    let id = req.container_id.clone();
    let tty = opts.tty;
    let code =
        tokio::task::spawn_blocking(move || containers.exec_streaming(&id, req.cmd, tty, io))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| crate::image::error_chain(&e))?;
    // Let the output drain, without waiting for background children holding the pipes.
    let _ = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + OUTPUT_GRACE;
        for _ in 0..outputs {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
    })
    .await;
    Ok(code)
}

/// Serves one attach: relays between the streams and the container's stdio, which its monitor
/// holds (see [`crate::monitor`]'s attach socket), until the container exits or the client
/// leaves.
pub async fn serve_attach(
    containers: Arc<Containers>,
    req: cri::AttachRequest,
    protocol: &str,
    session: Session,
    mut streams: mpsc::Receiver<Stream>,
) {
    let opts = Options {
        stdin: req.stdin,
        stdout: req.stdout,
        stderr: req.stderr,
        tty: req.tty,
    };
    let Some(ch) = accept_streams(&mut streams, expected_streams(&opts, protocol)).await else {
        session.close().await;
        return;
    };
    drop(streams);
    run_attach(containers, req, protocol, ch, session).await;
}

/// Runs an attach on streams already set up (SPDY or WebSocket).
pub async fn run_attach(
    containers: Arc<Containers>,
    req: cri::AttachRequest,
    protocol: &str,
    mut ch: Channels,
    session: Session,
) {
    let outcome = match attach(containers, &req.container_id, &mut ch).await {
        Ok(()) => Outcome::Success,
        Err(msg) => Outcome::Error(msg),
    };
    finish(protocol, &ch, &session, outcome).await;
}

async fn attach(containers: Arc<Containers>, id: &str, ch: &mut Channels) -> Result<(), String> {
    use crate::monitor::attach::{Message, connect};
    let path = containers
        .attach_socket(id)
        .map_err(|e| crate::image::error_chain(&e))?;
    let sock = tokio::task::spawn_blocking(move || connect(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect to the container's monitor: {e}"))?;
    let sock = Arc::new(sock);
    if let Some(mut stdin) = ch.stdin.take() {
        let s = sock.clone();
        std::thread::spawn(move || {
            while let Some(chunk) = stdin.blocking_read() {
                for part in chunk.chunks(crate::monitor::attach::MAX_MESSAGE - 1) {
                    if s.send(&Message::Stdin(part.to_vec())).is_err() {
                        return;
                    }
                }
            }
            let _ = s.send(&Message::StdinEof);
        });
    }
    if let Some(mut resize) = ch.resize.take() {
        let s = sock.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(chunk) = resize.read().await {
                buf.extend_from_slice(&chunk);
                for size in parse_sizes(&mut buf) {
                    let s = s.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        s.send(&Message::Resize(size.width, size.height))
                    })
                    .await;
                }
            }
        });
    }
    let (stdout, stderr) = (ch.stdout.clone(), ch.stderr.clone());
    let s = sock.clone();
    tokio::task::spawn_blocking(move || {
        loop {
            match s.recv() {
                Ok(Some(Message::Stdout(data))) => {
                    if let Some(w) = &stdout
                        && w.blocking_write(&data).is_err()
                    {
                        return;
                    }
                }
                Ok(Some(Message::Stderr(data))) => {
                    if let Some(w) = &stderr
                        && w.blocking_write(&data).is_err()
                    {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn v4_reports_exit_codes_as_upstreams_status() {
        let ok = status_bytes("v4.channel.k8s.io", &Outcome::Success).unwrap();
        assert_eq!(ok, br#"{"status":"Success"}"#);
        let failed = status_bytes("v4.channel.k8s.io", &Outcome::ExitCode(3)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&failed).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        let internal = status_bytes("v4.channel.k8s.io", &Outcome::Error("boom".into())).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&internal).unwrap();
        assert_eq!(v["reason"], "InternalError");
        assert_eq!(v["code"], 500);
    }

    #[test]
    fn v2_and_v3_report_only_failures_as_text() {
        assert_eq!(status_bytes("v3.channel.k8s.io", &Outcome::Success), None);
        let text = status_bytes("v2.channel.k8s.io", &Outcome::ExitCode(2)).unwrap();
        assert!(
            String::from_utf8(text)
                .unwrap()
                .contains("non-zero exit code")
        );
    }

    #[test]
    fn expected_streams_follow_the_options_and_protocol() {
        let o = |stdin, stdout, stderr, tty| Options {
            stdin,
            stdout,
            stderr,
            tty,
        };
        assert_eq!(
            expected_streams(&o(false, true, true, false), "v4.channel.k8s.io"),
            3
        );
        assert_eq!(
            expected_streams(&o(true, true, false, true), "v4.channel.k8s.io"),
            4
        );
        assert_eq!(
            expected_streams(&o(true, true, false, true), "v2.channel.k8s.io"),
            3
        );
    }

    #[test]
    fn resize_messages_are_split_even_across_chunks() {
        let mut buf = br#"{"Width":80,"Height":24}
{"Width":100,"#
            .to_vec();
        assert_eq!(
            parse_sizes(&mut buf),
            vec![TerminalSize {
                width: 80,
                height: 24
            }]
        );
        buf.extend_from_slice(br#""Height":50}"#);
        assert_eq!(
            parse_sizes(&mut buf),
            vec![TerminalSize {
                width: 100,
                height: 50
            }]
        );
        assert!(buf.is_empty());
    }

    /// The channel multiplexing end to end over a real session: streams by type, output
    /// closed, the status last on the error stream.
    #[tokio::test]
    async fn streams_are_matched_by_type_and_the_status_ends_the_session() {
        use super::super::spdy::{Codec, FLAG_FIN, Frame};
        use bytes::BytesMut;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let (session, mut streams) = Session::serve(server_io);
        let (mut cr, mut cw) = tokio::io::split(client_io);
        let mut client = Codec::new();
        let mut wire = Vec::new();
        for (id, t) in [(1, "error"), (3, "stdout"), (5, "bogus"), (7, "stderr")] {
            client
                .encode(
                    &Frame::SynStream {
                        stream_id: id,
                        associated_to: 0,
                        priority: 0,
                        flags: 0,
                        headers: vec![("streamtype".into(), t.into())],
                    },
                    &mut wire,
                )
                .unwrap();
        }
        cw.write_all(&wire).await.unwrap();
        let opts = Options {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let ch = accept_streams(&mut streams, expected_streams(&opts, "v4.channel.k8s.io"))
            .await
            .unwrap();
        assert!(ch.stdin.is_none() && ch.resize.is_none());
        ch.stdout.as_ref().unwrap().write(b"out").await.unwrap();
        ch.stderr.as_ref().unwrap().write(b"err").await.unwrap();
        finish("v4.channel.k8s.io", &ch, &session, Outcome::ExitCode(3)).await;
        let mut buf = BytesMut::new();
        let mut data: std::collections::BTreeMap<u32, (Vec<u8>, bool)> = Default::default();
        loop {
            while let Some(f) = client.decode(&mut buf).unwrap() {
                if let Frame::Data {
                    stream_id,
                    flags,
                    data: d,
                } = f
                {
                    let e = data.entry(stream_id).or_default();
                    e.0.extend_from_slice(&d);
                    e.1 |= flags & FLAG_FIN != 0;
                }
            }
            if cr.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
        assert_eq!(data[&3], (b"out".to_vec(), true));
        assert_eq!(data[&7], (b"err".to_vec(), true));
        assert!(data[&1].1);
        let status: serde_json::Value = serde_json::from_slice(&data[&1].0).unwrap();
        assert_eq!(status["details"]["causes"][0]["message"], "3");
        assert!(!data.contains_key(&5));
    }
}
