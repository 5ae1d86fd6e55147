//! A tiny UDP server and client for `tests/dataplane.rs`, run inside a test namespace through
//! `nsenter` (busybox has no UDP client that keeps its source port). A binary of its own, not
//! a `#[test]`, so that it does not count as a test.
//!
//! - `serve NAME PORT`: answers every datagram with NAME, until killed;
//! - `send SRC DST`: one datagram from the fixed address SRC (so that every send is the same
//!   conntrack flow); prints `udp-reply:` and the reply, or `udp-reply:error ...`.

use std::process::ExitCode;
use std::time::Duration;

fn serve(name: &str, port: &str) -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind(format!("0.0.0.0:{port}"))?;
    let mut buf = [0u8; 512];
    loop {
        let (_, from) = sock.recv_from(&mut buf)?;
        let _ = sock.send_to(name.as_bytes(), from);
    }
}

fn send(src: &str, dst: &str) -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind(src)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    // Connected and with IP_RECVERR, so that an ICMP error (host-unreachable is not a "hard"
    // one for UDP) comes back as the receive's error.
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with a valid int option value.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    sock.connect(dst)?;
    sock.send(b"ping")?;
    let mut buf = [0u8; 512];
    match sock.recv(&mut buf) {
        Ok(n) => println!("udp-reply:{}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => println!("udp-reply:error {e}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", name, port] => serve(name, port),
        ["send", src, dst] => send(src, dst),
        _ => {
            eprintln!("usage: serve NAME PORT | send SRC DST (got {args:?})");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp helper: {e}");
            ExitCode::FAILURE
        }
    }
}
