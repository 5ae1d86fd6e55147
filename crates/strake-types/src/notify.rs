//! Readiness for the service manager: systemd's `Type=notify` protocol (`sd_notify(3)`).
//!
//! A daemon started by systemd with `Type=notify` finds a datagram socket's address in
//! `NOTIFY_SOCKET` and sends `READY=1` there once it serves; until then units ordered
//! `After=` it wait. [`take_from_env`] runs first thing in `main`: it takes the variable out of
//! the environment, so that nothing the daemon starts inherits it (runc treats
//! `NOTIFY_SOCKET` as a request to hand the socket to the container, and a pod's processes
//! must never reach the host's service manager). [`ready`] then sends to the address kept.
//!
//! Hand-written rather than the `sd-notify` crate: that crate reads the variable when it
//! sends, which is after the daemon has started other processes. The protocol is one datagram.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;

static SOCKET: OnceLock<Option<OsString>> = OnceLock::new();

/// Takes `NOTIFY_SOCKET` out of the environment and keeps it for [`ready`].
///
/// # Safety
///
/// Changes the process environment: call it before any other thread exists (first thing in
/// `main`, before the async runtime starts).
pub unsafe fn take_from_env() {
    let value = std::env::var_os("NOTIFY_SOCKET");
    if value.is_some() {
        // SAFETY: the caller guarantees the process is still single-threaded.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    }
    let _ = SOCKET.set(value);
}

/// Tells the service manager the daemon is ready, if one asked ([`take_from_env`] found
/// `NOTIFY_SOCKET`); otherwise does nothing.
pub fn ready() {
    let Some(Some(path)) = SOCKET.get() else {
        return;
    };
    match send(path, b"READY=1\n") {
        Ok(()) => tracing::debug!("told the service manager we are ready"),
        Err(e) => tracing::warn!(error = %e, socket = ?path, "cannot notify the service manager"),
    }
}

/// Sends `message` to the notification socket `path` (`@name`: Linux's abstract namespace).
pub fn send(path: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(message, &addr)?;
    } else {
        socket.send_to(message, path)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("strake-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), b"READY=1\n").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        assert!(send(dir.path().join("absent").as_os_str(), b"x").is_err());
    }
}
