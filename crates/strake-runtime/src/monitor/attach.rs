//! The monitor's attach socket (like conmon's): a `SOCK_SEQPACKET` unix socket in the
//! container's state directory. Each packet is one [`Message`]: the monitor sends the
//! container's output to every attached client (as it writes it to the log); a client sends
//! stdin data, the end of its stdin, and terminal sizes.
//!
//! Paths under a test's temporary directory easily pass the 108 bytes a socket address may
//! hold, so both ends reach the socket through `/proc/self/fd/<directory fd>/<name>`.
//!
//! Also here: receiving the terminal master that `runc create --console-socket` sends.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The largest packet either side sends.
pub const MAX_MESSAGE: usize = 32 * 1024 + 1;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STDIN_EOF: u8 = 3;
const RESIZE: u8 = 4;

/// One packet on the attach socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Container output (monitor -> client).
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Input for the container (client -> monitor).
    Stdin(Vec<u8>),
    /// The client's stdin ended (the container's is closed when it was created `stdin_once`).
    StdinEof,
    /// A new terminal size: width, height.
    Resize(u16, u16),
}

impl Message {
    /// The packet's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body): (u8, &[u8]) = match self {
            Message::Stdout(d) => (STDOUT, d),
            Message::Stderr(d) => (STDERR, d),
            Message::Stdin(d) => (STDIN, d),
            Message::StdinEof => (STDIN_EOF, &[]),
            Message::Resize(w, h) => {
                let mut v = vec![RESIZE];
                v.extend_from_slice(&w.to_be_bytes());
                v.extend_from_slice(&h.to_be_bytes());
                return v;
            }
        };
        let mut v = Vec::with_capacity(body.len() + 1);
        v.push(kind);
        v.extend_from_slice(body);
        v
    }

    /// Parses a packet (`None`: not a message).
    pub fn decode(p: &[u8]) -> Option<Message> {
        let (&kind, body) = p.split_first()?;
        Some(match kind {
            STDOUT => Message::Stdout(body.to_vec()),
            STDERR => Message::Stderr(body.to_vec()),
            STDIN => Message::Stdin(body.to_vec()),
            STDIN_EOF => Message::StdinEof,
            RESIZE if body.len() == 4 => Message::Resize(
                u16::from_be_bytes([body[0], body[1]]),
                u16::from_be_bytes([body[2], body[3]]),
            ),
            _ => return None,
        })
    }
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn socket(kind: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a descriptor we just created.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `addr` for `path`, reached through a directory descriptor when the path is long. The
/// returned descriptor (if any) must stay open while the address is used.
fn address(path: &Path) -> std::io::Result<(libc::sockaddr_un, Option<OwnedFd>)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let mut dir_fd = None;
    let mut bytes = path.as_os_str().as_bytes().to_vec();
    if bytes.len() >= addr.sun_path.len() {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let name = path.file_name().unwrap_or_default();
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: open(2) of a NUL-terminated path.
        let fd = cvt(unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })?;
        // SAFETY: a descriptor we just opened.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        bytes = format!("/proc/self/fd/{}/", fd.as_raw_fd()).into_bytes();
        bytes.extend_from_slice(name.as_bytes());
        dir_fd = Some(fd);
    }
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(&bytes) {
        *d = *s as libc::c_char;
    }
    Ok((addr, dir_fd))
}

fn bind_listen(path: &Path, kind: libc::c_int) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = socket(kind)?;
    let (addr, _dir) = address(path)?;
    // SAFETY: bind(2) with a valid sockaddr_un and its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on our socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    Ok(fd)
}

/// The monitor's listening attach socket.
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let fd = bind_listen(path, libc::SOCK_SEQPACKET)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(fd)
}

/// A listening stream socket for `runc --console-socket`.
pub fn listen_console(path: &Path) -> std::io::Result<OwnedFd> {
    bind_listen(path, libc::SOCK_STREAM)
}

/// Accepts one connection (blocking unless the listener is non-blocking).
pub fn accept(listener: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: accept4(2) without an address.
    let fd = cvt(unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: a descriptor we just accepted.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Receives the descriptor `runc` sends over a console socket connection.
pub fn recv_fd(conn: &OwnedFd) -> std::io::Result<OwnedFd> {
    let mut data = [0u8; 4096];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // Room for one descriptor's control message (CMSG_SPACE of an int is at most 24 bytes).
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg(2) into the buffers described by `msg`.
    let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                return Ok(OwnedFd::from_raw_fd(fd));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "no descriptor on the console socket",
    ))
}

/// Sends one packet; `Ok(false)` when it would block (non-blocking sockets only).
pub fn send_packet(fd: RawFd, packet: &[u8], flags: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: send(2) from a valid buffer.
    let n = unsafe {
        libc::send(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}

/// Receives one packet; `Ok(None)` at end of connection.
pub fn recv_packet(fd: RawFd) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        // SAFETY: recv(2) into a buffer of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n as usize);
        return Ok(Some(buf));
    }
}

/// A client's connection to a monitor's attach socket (blocking).
#[derive(Debug)]
pub struct AttachConn {
    fd: OwnedFd,
}

impl AttachConn {
    /// Sends a message to the monitor.
    pub fn send(&self, m: &Message) -> std::io::Result<()> {
        send_packet(self.fd.as_raw_fd(), &m.encode(), 0).map(|_| ())
    }

    /// The next message from the monitor; `None` once the container is gone.
    pub fn recv(&self) -> std::io::Result<Option<Message>> {
        loop {
            match recv_packet(self.fd.as_raw_fd())? {
                None => return Ok(None),
                Some(p) => {
                    if let Some(m) = Message::decode(&p) {
                        return Ok(Some(m));
                    }
                }
            }
        }
    }
}

/// Connects to the attach socket at `path`.
pub fn connect(path: &Path) -> std::io::Result<AttachConn> {
    let fd = socket(libc::SOCK_SEQPACKET)?;
    let (addr, _dir) = address(path)?;
    // SAFETY: connect(2) with a valid sockaddr_un and its size.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    })?;
    Ok(AttachConn { fd })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Stdout(b"out".to_vec()),
            Message::Stderr(vec![]),
            Message::Stdin(b"in".to_vec()),
            Message::StdinEof,
            Message::Resize(80, 24),
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        assert_eq!(Message::decode(&[]), None);
        assert_eq!(Message::decode(&[9, 1]), None);
    }

    /// Through a path longer than a socket address can hold.
    #[test]
    fn a_client_and_listener_talk_over_a_long_path() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("x".repeat(60)).join("y".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("attach");
        let listener = listen(&path).unwrap();
        let client = connect(&path).unwrap();
        let server = accept(listener.as_raw_fd()).unwrap();
        client.send(&Message::Resize(100, 40)).unwrap();
        let p = recv_packet(server.as_raw_fd()).unwrap().unwrap();
        assert_eq!(Message::decode(&p), Some(Message::Resize(100, 40)));
        send_packet(
            server.as_raw_fd(),
            &Message::Stdout(b"hi".to_vec()).encode(),
            0,
        )
        .unwrap();
        assert_eq!(
            client.recv().unwrap(),
            Some(Message::Stdout(b"hi".to_vec()))
        );
        drop(server);
        assert_eq!(client.recv().unwrap(), None);
    }
}
