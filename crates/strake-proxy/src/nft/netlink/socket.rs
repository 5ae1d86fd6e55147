//! A `NETLINK_NETFILTER` socket: send one batch, collect what the kernel answered.
//!
//! The kernel handles an nfnetlink batch synchronously inside `sendmsg`, so when `send`
//! returns, every error (and the one ACK asked for) is already queued on the socket and is
//! read without blocking.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::wire::{NLM_F_ACK_TLVS, NLMSG_ERROR, NLMSGERR_ATTR_MSG};

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
/// Room for error messages: a failed full sync reports each refused command.
const RCVBUF: usize = 8 << 20;

/// One answer from the kernel: an ACK (`errno == 0`) or an error for message `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Sequence number of the message answered.
    pub seq: u32,
    /// 0 or a positive errno.
    pub errno: i32,
    /// The kernel's extended-ACK message, if any.
    pub message: Option<String>,
}

/// An open netfilter netlink socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    sndbuf: usize,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed along.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn open_here() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before being owned.
    let raw = check(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl Socket {
    /// Opens a socket in the caller's network namespace, or in the one pinned at `netns`.
    ///
    /// For another namespace, a short-lived thread enters it (`setns` changes only the calling
    /// thread's namespace), opens the socket and ends; the socket stays in that namespace.
    pub fn open(netns: Option<&Path>) -> io::Result<Socket> {
        let fd = match netns {
            None => open_here()?,
            Some(path) => {
                let ns = std::fs::File::open(path)?;
                std::thread::scope(|scope| {
                    scope
                        .spawn(|| {
                            // SAFETY: setns on this thread only; the thread ends right after.
                            check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
                            open_here()
                        })
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
                })?
            }
        };
        // SAFETY: a zeroed sockaddr_nl is valid; pid 0 lets the kernel pick the port id.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl of the given size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        // Errors without a copy of the refused message, but with the kernel's reason.
        setsockopt(&fd, SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        setsockopt(&fd, SOL_NETLINK, NETLINK_EXT_ACK, 1)?;
        // Root may exceed rmem_max (as nft does); unprivileged callers keep the default.
        if setsockopt(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            RCVBUF as libc::c_int,
        )
        .is_err()
        {
            let _ = setsockopt(
                &fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                RCVBUF as libc::c_int,
            );
        }
        Ok(Socket { fd, sndbuf: 0 })
    }

    /// Sends `batch` in one `sendmsg`: one skb, so the kernel sees one transaction. The send
    /// buffer is raised to fit it (`SO_SNDBUFFORCE`, as nft does for large batches).
    pub fn send(&mut self, batch: &[u8]) -> io::Result<()> {
        let need = batch.len() + (64 << 10);
        if need > self.sndbuf {
            let value = libc::c_int::try_from(need)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "batch over 2 GiB"))?;
            setsockopt(&self.fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, value)
                .or_else(|_| setsockopt(&self.fd, libc::SOL_SOCKET, libc::SO_SNDBUF, value))?;
            self.sndbuf = need;
        }
        // SAFETY: a zeroed sockaddr_nl addresses the kernel (pid 0).
        let mut dest: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        dest.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `batch` and `dest` are valid for the given lengths.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    batch.as_ptr().cast(),
                    batch.len(),
                    0,
                    (&dest as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if sent < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if sent as usize != batch.len() {
                return Err(io::Error::other(format!(
                    "short netlink send: {sent} of {} bytes",
                    batch.len()
                )));
            }
            return Ok(());
        }
    }

    /// Reads every answer queued on the socket, without blocking.
    pub fn drain(&self) -> io::Result<Vec<Answer>> {
        let mut answers = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => return Ok(answers),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(err),
                }
            }
            parse_answers(&buf[..n as usize], &mut answers);
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

/// Parses the `NLMSG_ERROR` messages in one datagram (others are ignored).
pub fn parse_answers(mut b: &[u8], out: &mut Vec<Answer>) {
    while b.len() >= 16 {
        let Some(len) = u32_at(b, 0).map(|l| l as usize) else {
            return;
        };
        if len < 16 || len > b.len() {
            return;
        }
        let msg = &b[..len];
        let ty = u16_at(msg, 4).unwrap_or(0);
        let flags = u16_at(msg, 6).unwrap_or(0);
        let seq = u32_at(msg, 8).unwrap_or(0);
        if ty == NLMSG_ERROR
            && let Some(error) = u32_at(msg, 16)
        {
            let errno = -(error as i32);
            // The refused message's header follows (only the header: NETLINK_CAP_ACK),
            // then the extended-ACK attributes.
            let mut message = None;
            if flags & NLM_F_ACK_TLVS != 0 {
                let mut attrs = msg.get(36..).unwrap_or_default();
                while attrs.len() >= 4 {
                    let alen = u16_at(attrs, 0).unwrap_or(0) as usize;
                    let aty = u16_at(attrs, 2).unwrap_or(0) & 0x3fff;
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    if aty == NLMSGERR_ATTR_MSG {
                        let text = &attrs[4..alen];
                        let text = text.split(|c| *c == 0).next().unwrap_or_default();
                        message = Some(String::from_utf8_lossy(text).into_owned());
                    }
                    attrs = attrs.get((alen + 3) & !3..).unwrap_or_default();
                }
            }
            out.push(Answer {
                seq,
                errno,
                message,
            });
        }
        b = b.get((len + 3) & !3..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `NLMSG_ERROR` as the kernel sends it with CAP_ACK and EXT_ACK: header, error,
    /// the refused message's header, then `NLMSGERR_ATTR_MSG`.
    fn error_message(seq: u32, error: i32, text: Option<&str>) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        let flags = if text.is_some() { NLM_F_ACK_TLVS } else { 0 };
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&error.to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        if let Some(text) = text {
            let len = 4 + text.len() + 1;
            m.extend_from_slice(&(len as u16).to_ne_bytes());
            m.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            m.extend_from_slice(text.as_bytes());
            m.push(0);
            m.resize((m.len() + 3) & !3, 0);
        }
        let len = m.len() as u32;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn errors_and_acks_are_read_with_their_sequence_numbers() {
        let mut datagram = error_message(12, -2, Some("chain not found"));
        datagram.extend(error_message(13, 0, None));
        let mut answers = Vec::new();
        parse_answers(&datagram, &mut answers);
        assert_eq!(
            answers,
            [
                Answer {
                    seq: 12,
                    errno: 2,
                    message: Some("chain not found".into())
                },
                Answer {
                    seq: 13,
                    errno: 0,
                    message: None
                },
            ]
        );
        // A truncated datagram yields what was complete.
        let mut answers = Vec::new();
        parse_answers(&datagram[..datagram.len() - 4], &mut answers);
        assert_eq!(answers.len(), 1);
    }
}
