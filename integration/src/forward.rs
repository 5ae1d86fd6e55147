//! A TCP forwarder from root-namespace loopback into another network namespace.
//!
//! The root namespace must only ever talk to loopback, yet the control plane and registry live in
//! the cluster namespace. The test process opens a listener on `127.0.0.1:0` in the root
//! namespace and hands it, as file descriptor 3, to `strake-testbed forward` started inside the
//! cluster namespace with `nsenter --net`. A socket keeps the namespace it was created in, so the
//! forwarder accepts root-namespace connections and connects to its target inside the cluster
//! namespace, without ever calling `setns` itself.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use crate::netns::NetNs;
use crate::process::Daemon;
use crate::{Error, Result};

/// The descriptor number the forwarder receives its listener on.
pub const LISTEN_FD: RawFd = 3;

/// A running forwarder; dropping it stops the forwarder process.
#[derive(Debug)]
pub struct Forward {
    local: SocketAddr,
    _daemon: Daemon,
}

impl Forward {
    /// Forwards a fresh `127.0.0.1:<port>` in the root namespace to `target` inside `ns`.
    pub fn start(ns: &NetNs, target: SocketAddr, log: &Path) -> Result<Self> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(crate::io_err("bind", "127.0.0.1:0"))?;
        let local = listener
            .local_addr()
            .map_err(crate::io_err("bind", "127.0.0.1:0"))?;
        let exe = crate::paths::testbed_exe()?;
        let mut cmd = ns.command(exe);
        cmd.args(["forward", "--connect", &target.to_string()]);
        let fd = listener.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe; they only place our listener at
        // LISTEN_FD without close-on-exec in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself is a no-op that would keep close-on-exec: clear it instead.
                let rc = if fd == LISTEN_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, LISTEN_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let daemon = Daemon::spawn(&format!("forward {local} -> {target}"), cmd, log)?;
        // The child holds its own copy; ours closes when `listener` drops here.
        drop(listener);
        Ok(Forward {
            local,
            _daemon: daemon,
        })
    }

    /// The root-namespace loopback address that reaches the target.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// The forwarder's main loop: accepts on the inherited listener and splices each connection to
/// `target`. Runs until killed.
pub fn serve(target: SocketAddr) -> Result<()> {
    // SAFETY: `Forward::start` placed a listening TCP socket at LISTEN_FD for us; nothing else
    // in this process owns that descriptor.
    let std_listener = unsafe { TcpListener::from_raw_fd(LISTEN_FD) };
    std_listener
        .set_nonblocking(true)
        .map_err(crate::io_err("set non-blocking", "listener"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(crate::io_err("start", "tokio runtime"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .map_err(crate::io_err("register", "listener"))?;
        loop {
            let (mut inbound, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            tokio::spawn(async move {
                match tokio::net::TcpStream::connect(target).await {
                    Ok(mut outbound) => {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    Err(e) => tracing::warn!(%peer, %target, error = %e, "connect failed"),
                }
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), Error>(())
    })
}
