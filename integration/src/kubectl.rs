//! `kubectl` as a user runs it against a test-bed control plane, for what a test checks
//! through it rather than through the API (port-forward).

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::{Error, Result, paths};

/// Stops (by PID) and reaps the `kubectl port-forward` it guards.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kubectl port-forward pod/<pod> :<port>` on loopback with the admin `kubeconfig`, then one
/// HTTP/1.0 GET of `path` through it: the whole response (status line, headers, body).
pub fn port_forward_get(kubeconfig: &Path, pod: &str, port: u16, path: &str) -> Result<String> {
    let io = |what: &'static str| {
        move |e: std::io::Error| Error::Invalid(format!("port-forward: {what}: {e}"))
    };
    let kubectl = paths::kubernetes_bin("kubectl")?;
    let mut child = Child(
        std::process::Command::new(kubectl)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["port-forward", "--address=127.0.0.1"])
            .arg(format!("pod/{pod}"))
            .arg(format!(":{port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(io("spawn kubectl"))?,
    );
    // "Forwarding from 127.0.0.1:<local> -> <port>"
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| Error::Invalid("port-forward: no stdout".into()))?;
    let mut stdout = std::io::BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line).map_err(io("read its output"))?;
    // Keep reading: kubectl writes a line per connection and dies of a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let local = line
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| Error::Invalid(format!("unexpected port-forward output: {line:?}")))?
        .to_string();
    let mut conn = std::net::TcpStream::connect(&local).map_err(io("connect"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io("set a timeout"))?;
    write!(conn, "GET {path} HTTP/1.0\r\n\r\n").map_err(io("send the request"))?;
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .map_err(io("read the response"))?;
    Ok(response)
}
