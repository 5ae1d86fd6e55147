//! The per-container monitor (`strake-monitor`): like conmon, not a Go shim.
//!
//! strake-runtime starts one monitor per container, in its own session so that it outlives
//! daemon restarts. The monitor
//! 1. becomes a child subreaper, so the container's init (whose parent, `runc create`, exits)
//!    is reparented to it and its exit status is ours to collect;
//! 2. runs `<oci-runtime> create` (through [`crate::runc`], the only code that spawns it) with
//!    the container's stdout and stderr on pipes it owns;
//! 3. reports the outcome, one JSON [`Ready`] line, on the descriptor it was given (`--ready-fd`);
//! 4. copies both pipes into the CRI log file (`<time> <stream> <P|F> <line>`), reopening it
//!    on SIGUSR1 (ReopenContainerLog);
//! 5. serves an attach socket ([`attach`]): output goes to attached clients too, their input
//!    to the container's stdin (a pipe it holds with `--stdin`) or terminal (`--tty`: the
//!    master `runc create --console-socket` hands over), their sizes to the terminal;
//! 6. records the container's exit durably in `--exit-file` ([`ExitRecord`], written atomically)
//!    the moment it is reaped, then drains the pipes and exits.
//!
//! Everything is single-threaded, blocking and libc-only, so a monitor costs little memory.

pub mod attach;
pub mod log;

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use serde::{Deserialize, Serialize};

use self::log::{LineSplitter, Stream};
use crate::runc::{CreateOptions, ProcessIo, Runc, RuncCli, RuncConfig, RuncError};

/// What the monitor reports once `create` is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Ready {
    /// The container exists (created, not started); `pid` is its init process.
    Created { pid: u32 },
    /// `create` failed; `error` is the OCI runtime's own message.
    Failed { error: String },
}

/// How and when the container's init exited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit status, or 128 + signal number when killed by a signal (as containerd reports it).
    pub exit_code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// Nanoseconds since the epoch.
    pub finished_at_ns: i64,
}

/// The monitor's arguments (parsed by hand: the binary stays free of clap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    pub id: String,
    pub bundle: PathBuf,
    pub runtime: PathBuf,
    /// The runtime's global options (repeatable `--runtime-option`, in order).
    pub runtime_options: Vec<String>,
    pub runtime_root: PathBuf,
    pub systemd_cgroup: bool,
    pub log_path: PathBuf,
    pub exit_file: PathBuf,
    pub pid_file: PathBuf,
    pub ready_fd: RawFd,
    /// Keep the container's stdin open on a pipe (CRI `stdin`).
    pub stdin: bool,
    /// Close the container's stdin when the first attached client's input ends.
    pub stdin_once: bool,
    /// The container has a terminal (CRI `tty`).
    pub tty: bool,
    /// Where to serve the attach socket.
    pub attach_socket: Option<PathBuf>,
    /// The container's stdio pipes are also FIFOs in the bundle ([`STDIO_FIFOS`]), for runtimes
    /// that take the stdio at `start` ([`open_stdio_fifos`]).
    pub stdio_fifos: bool,
}

/// The FIFOs of a container's stdin, stdout and stderr in its bundle (`--stdio-fifos`).
pub const STDIO_FIFOS: [&str; 3] = ["stdin.fifo", "stdout.fifo", "stderr.fifo"];

/// A pipe whose ends are opened through a new FIFO at `path` (mode 0600), so that another
/// process can open an end later; the FIFO is gone with the bundle.
fn fifo_pipe(path: &std::path::Path) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: mkfifo with a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The read end first and non-blocking (no writer yet), then the write end, which finds it.
    let read = open_fifo(path, libc::O_RDONLY)?;
    let write = open_fifo(path, libc::O_WRONLY)?;
    Ok((read, write))
}

/// Opens an end of a FIFO without waiting for the other end (a write end fails with ENXIO if
/// nobody reads), then makes it blocking, as a pipe's ends are.
fn open_fifo(path: &std::path::Path, mode: libc::c_int) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(mode == libc::O_RDONLY)
        .write(mode == libc::O_WRONLY)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let fd = OwnedFd::from(f);
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(fd)
}

/// The container's stdio through the FIFOs its monitor made (`--stdio-fifos`): stdout and
/// stderr write into the monitor's log, stdin (when the container has one) reads what attached
/// clients send. Fails if the monitor is gone.
pub fn open_stdio_fifos(bundle: &std::path::Path, stdin: bool) -> std::io::Result<ProcessIo> {
    let [stdin_fifo, stdout_fifo, stderr_fifo] = STDIO_FIFOS.map(|n| bundle.join(n));
    Ok(ProcessIo {
        stdin: if stdin {
            Some(open_fifo(&stdin_fifo, libc::O_RDONLY)?)
        } else {
            None
        },
        stdout: Some(open_fifo(&stdout_fifo, libc::O_WRONLY)?),
        stderr: Some(open_fifo(&stderr_fifo, libc::O_WRONLY)?),
    })
}

impl Args {
    /// Parses `--name value` pairs (and the `--systemd-cgroup` switch).
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, String> {
        let mut it = args.into_iter();
        let mut get = std::collections::HashMap::new();
        let mut systemd_cgroup = false;
        let (mut stdin, mut stdin_once, mut tty) = (false, false, false);
        let mut stdio_fifos = false;
        let mut runtime_options = Vec::new();
        while let Some(a) = it.next() {
            let a = a.to_string_lossy().into_owned();
            if a == "--runtime-option" {
                let value = it.next().ok_or("--runtime-option needs a value")?;
                runtime_options.push(value.to_string_lossy().into_owned());
                continue;
            }
            let switch = match a.as_str() {
                "--systemd-cgroup" => &mut systemd_cgroup,
                "--stdin" => &mut stdin,
                "--stdin-once" => &mut stdin_once,
                "--tty" => &mut tty,
                "--stdio-fifos" => &mut stdio_fifos,
                _ => {
                    let key = a
                        .strip_prefix("--")
                        .ok_or_else(|| format!("unexpected argument {a:?}"))?
                        .to_string();
                    let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
                    get.insert(key, value);
                    continue;
                }
            };
            *switch = true;
        }
        let attach_socket = get.remove("attach-socket").map(PathBuf::from);
        let mut take = |k: &str| get.remove(k).ok_or_else(|| format!("--{k} is required"));
        let args = Args {
            id: take("id")?.to_string_lossy().into_owned(),
            bundle: take("bundle")?.into(),
            runtime: take("runtime")?.into(),
            runtime_options,
            runtime_root: take("runtime-root")?.into(),
            systemd_cgroup,
            log_path: take("log-path")?.into(),
            exit_file: take("exit-file")?.into(),
            pid_file: take("pid-file")?.into(),
            ready_fd: take("ready-fd")?
                .to_string_lossy()
                .parse()
                .map_err(|e| format!("--ready-fd: {e}"))?,
            stdin,
            stdin_once,
            tty,
            attach_socket,
            stdio_fifos,
        };
        if let Some(k) = get.keys().next() {
            return Err(format!("unknown flag --{k}"));
        }
        Ok(args)
    }

    /// The arguments as the runtime passes them.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        let mut push = |k: &str, val: &std::ffi::OsStr| {
            v.push(format!("--{k}").into());
            v.push(val.to_owned());
        };
        push("id", self.id.as_ref());
        push("bundle", self.bundle.as_os_str());
        push("runtime", self.runtime.as_os_str());
        for option in &self.runtime_options {
            push("runtime-option", option.as_ref());
        }
        push("runtime-root", self.runtime_root.as_os_str());
        push("log-path", self.log_path.as_os_str());
        push("exit-file", self.exit_file.as_os_str());
        push("pid-file", self.pid_file.as_os_str());
        push("ready-fd", self.ready_fd.to_string().as_ref());
        if let Some(p) = &self.attach_socket {
            v.push("--attach-socket".into());
            v.push(p.into());
        }
        for (on, flag) in [
            (self.systemd_cgroup, "--systemd-cgroup"),
            (self.stdin, "--stdin"),
            (self.stdin_once, "--stdin-once"),
            (self.tty, "--tty"),
            (self.stdio_fifos, "--stdio-fifos"),
        ] {
            if on {
                v.push(flag.into());
            }
        }
        v
    }
}

static REOPEN: AtomicBool = AtomicBool::new(false);
/// Set once the waiter of a container in a runtime's sandbox recorded its exit.
static SANDBOXED_EXITED: AtomicBool = AtomicBool::new(false);

/// Waits, on a thread, for the exit of a container that lives in a runtime's sandbox (its
/// process is not our child: gVisor runs it inside the pod's sandbox), through the runtime's
/// `wait`, which answers only once the container has started; records the exit and wakes the
/// monitor's loop. A container the runtime no longer knows (its sandbox gone) is recorded as
/// exited with 255, the status containerd gives an unknown exit.
fn wait_in_sandbox(runtime: RuncCli, id: String, exit_file: PathBuf) {
    std::thread::spawn(move || {
        let exit_code = loop {
            match runtime.wait(&id) {
                Ok(code) => break code,
                Err(RuncError::CommandFailed { stderr, .. }) if stderr.contains("not started") => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) => {
                    eprintln!("strake-monitor: wait for {id}: {e}");
                    break 255;
                }
            }
        };
        write_exit(&exit_file, exit_code, None);
        SANDBOXED_EXITED.store(true, Ordering::SeqCst);
        let fd = WAKE_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: write(2) of one byte to our own wake-up pipe.
            unsafe { libc::write(fd, [0u8].as_ptr().cast(), 1) };
        }
    });
}
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    if signal == libc::SIGUSR1 {
        REOPEN.store(true, Ordering::SeqCst);
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe only means a wake-up is pending.
        unsafe { libc::write(fd, [0u8].as_ptr().cast(), 1) };
    }
}

fn handle(signal: libc::c_int) {
    // SAFETY: a zeroed sigaction with a valid handler is a valid argument.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
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

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    File::options().create(true).append(true).open(path)
}

/// Runs the monitor to the end of the container. Returns the process exit code of the monitor.
pub fn run(args: Args) -> i32 {
    // SAFETY: the runtime handed us this descriptor for our sole use.
    let mut ready = unsafe { File::from_raw_fd(args.ready_fd) };
    match monitor(&args, &mut ready) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(
                ready,
                "{}",
                serde_json::json!({"status": "failed", "error": e})
            );
            1
        }
    }
}

fn monitor(args: &Args, ready: &mut File) -> Result<(), String> {
    // The OCI runtime and the container must not inherit the report channel.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(ready.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only changes this process's attributes.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "become subreaper: {}",
            std::io::Error::last_os_error()
        ));
    }
    let (wake_r, wake_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: fcntl on descriptors we own.
    unsafe {
        libc::fcntl(wake_r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
        libc::fcntl(wake_w.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
    }
    WAKE_FD.store(wake_w.as_raw_fd(), Ordering::SeqCst);
    handle(libc::SIGCHLD);
    handle(libc::SIGUSR1);

    // Output: two pipes, or the terminal's master (which runc sends while `create` runs).
    let mut io = ProcessIo::default();
    let mut held_writers: Vec<OwnedFd> = Vec::new();
    let mut outputs: Vec<(File, LineSplitter, bool, attach::Message)> = Vec::new();
    let mut stdin_w: Option<File> = None;
    let mut console = None;
    if args.tty {
        let path = std::env::temp_dir().join(format!(
            "strake-console-{}-{}.sock",
            std::process::id(),
            now_ns()
        ));
        let listener = attach::listen_console(&path).map_err(|e| format!("console socket: {e}"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let got = attach::accept(listener.as_raw_fd()).and_then(|c| attach::recv_fd(&c));
            let _ = tx.send(got);
        });
        console = Some((path, rx));
    } else {
        let [in_fifo, out_fifo, err_fifo] = STDIO_FIFOS.map(|n| args.bundle.join(n));
        let make = |fifo: &std::path::Path| {
            if args.stdio_fifos {
                fifo_pipe(fifo).map_err(|e| format!("fifo {}: {e}", fifo.display()))
            } else {
                pipe().map_err(|e| format!("pipe: {e}"))
            }
        };
        let (out_r, out_w) = make(&out_fifo)?;
        let (err_r, err_w) = make(&err_fifo)?;
        if args.stdio_fifos {
            // The container's writers come with `start`, long after `create` closed its
            // copies: until the container exits, our own keep the output from ending.
            for fifo in [&out_fifo, &err_fifo] {
                held_writers.push(
                    open_fifo(fifo, libc::O_WRONLY)
                        .map_err(|e| format!("fifo {}: {e}", fifo.display()))?,
                );
            }
        }
        io.stdout = Some(out_w);
        io.stderr = Some(err_w);
        outputs.push((
            File::from(out_r),
            LineSplitter::new(Stream::Stdout),
            true,
            attach::Message::Stdout(Vec::new()),
        ));
        outputs.push((
            File::from(err_r),
            LineSplitter::new(Stream::Stderr),
            true,
            attach::Message::Stderr(Vec::new()),
        ));
        if args.stdin {
            let (in_r, in_w) = make(&in_fifo)?;
            io.stdin = Some(in_r);
            stdin_w = Some(File::from(in_w));
        }
    }
    // Only the runc seam spawns the OCI runtime; its `create` waits for the runtime alone, the
    // container's init keeping the pipes' write ends.
    let runtime = RuncCli::new(RuncConfig {
        binary: args.runtime.clone(),
        root: Some(args.runtime_root.clone()),
        systemd_cgroup: args.systemd_cgroup,
        temp_dir: args.bundle.clone(),
        env: Vec::new(),
        global_args: args.runtime_options.clone(),
    });
    let created = runtime.create(
        &args.id,
        &args.bundle,
        CreateOptions {
            pid_file: Some(args.pid_file.clone()),
            console_socket: console.as_ref().map(|(p, _)| p.clone()),
            no_pivot: false,
            io,
        },
    );
    let mut master: Option<File> = None;
    if let Some((path, rx)) = console {
        let _ = std::fs::remove_file(&path);
        if created.is_ok() {
            let fd = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .map_err(|_| "no terminal from the OCI runtime".to_string())?
                .map_err(|e| format!("receive the terminal: {e}"))?;
            let f = File::from(fd);
            let dup = f.try_clone().map_err(|e| format!("dup terminal: {e}"))?;
            outputs.push((
                f,
                LineSplitter::new(Stream::Stdout),
                true,
                attach::Message::Stdout(Vec::new()),
            ));
            master = Some(dup);
        }
    }
    if let Err(e) = created {
        let msg = match e {
            RuncError::CommandFailed { stderr, .. } if !stderr.is_empty() => stderr,
            e => crate::image::error_chain(&e),
        };
        let _ = writeln!(
            ready,
            "{}",
            serde_json::to_string(&Ready::Failed { error: msg }).unwrap_or_default()
        );
        return Ok(());
    }
    let pid: i32 = std::fs::read_to_string(&args.pid_file)
        .map_err(|e| format!("read {}: {e}", args.pid_file.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("parse {}: {e}", args.pid_file.display()))?;
    let listener = match &args.attach_socket {
        Some(p) => {
            Some(attach::listen(p).map_err(|e| format!("attach socket {}: {e}", p.display()))?)
        }
        None => None,
    };
    let line =
        serde_json::to_string(&Ready::Created { pid: pid as u32 }).map_err(|e| e.to_string())?;
    writeln!(ready, "{line}").map_err(|e| format!("report ready: {e}"))?;
    // In a runtime's sandbox the PID is the sandbox's, not the container's, and no child of
    // ours: the runtime tells the exit.
    if args.stdio_fifos {
        wait_in_sandbox(runtime.clone(), args.id.clone(), args.exit_file.clone());
    }

    let mut log =
        open_log(&args.log_path).map_err(|e| format!("open {}: {e}", args.log_path.display()))?;
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut stdin_done = false;
    let mut exited = false;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if REOPEN.swap(false, Ordering::SeqCst) {
            match open_log(&args.log_path) {
                Ok(f) => log = f,
                Err(e) => eprintln!("strake-monitor: reopen {}: {e}", args.log_path.display()),
            }
        }
        if !exited {
            exited = if args.stdio_fifos {
                // Reap the runtime's `wait` processes; the waiter records the exit.
                // SAFETY: waitpid with WNOHANG on any child.
                while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
                SANDBOXED_EXITED.load(Ordering::SeqCst)
            } else {
                reap(pid, &args.exit_file)
            };
            if exited {
                // Output ends once the container's own writers are gone too.
                held_writers.clear();
            }
        } else {
            // Other descendants reparented to us are reaped too, but recorded nowhere.
            // SAFETY: waitpid with WNOHANG on any child.
            while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        }
        if exited && outputs.iter().all(|s| !s.2) {
            if let Some(p) = &args.attach_socket {
                let _ = std::fs::remove_file(p);
            }
            return Ok(());
        }
        let mut fds: Vec<libc::pollfd> = outputs
            .iter()
            .filter(|s| s.2)
            .map(|s| s.0.as_raw_fd())
            .chain(listener.iter().map(|l| l.as_raw_fd()))
            .chain(clients.iter().map(|c| c.as_raw_fd()))
            .chain([wake_r.as_raw_fd()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
            continue;
        }
        let revents = |fd: RawFd| fds.iter().find(|p| p.fd == fd).map_or(0, |p| p.revents);
        let mut drain = [0u8; 64];
        // SAFETY: reading into a local buffer from our own non-blocking pipe.
        while unsafe { libc::read(wake_r.as_raw_fd(), drain.as_mut_ptr().cast(), drain.len()) } > 0
        {
        }
        if let Some(l) = &listener
            && revents(l.as_raw_fd()) != 0
            && let Ok(c) = attach::accept(l.as_raw_fd())
        {
            clients.push(c);
        }
        let mut gone = Vec::new();
        for c in &clients {
            let r = revents(c.as_raw_fd());
            if r == 0 {
                continue;
            }
            match attach::recv_packet(c.as_raw_fd()) {
                Ok(Some(p)) => match attach::Message::decode(&p) {
                    Some(attach::Message::Stdin(data)) if !stdin_done => {
                        let target = if args.tty {
                            master.as_mut()
                        } else {
                            stdin_w.as_mut()
                        };
                        if let Some(t) = target {
                            let _ = t.write_all(&data);
                        }
                    }
                    Some(attach::Message::StdinEof) if args.stdin_once && !stdin_done => {
                        stdin_done = true;
                        if args.tty {
                            if let Some(m) = master.as_mut() {
                                let _ = m.write_all(&[0x04]);
                            }
                        } else {
                            stdin_w = None;
                        }
                    }
                    Some(attach::Message::Resize(w, h)) => {
                        if let Some(m) = &master {
                            let ws = libc::winsize {
                                ws_row: h,
                                ws_col: w,
                                ws_xpixel: 0,
                                ws_ypixel: 0,
                            };
                            // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
                            unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                        }
                    }
                    _ => {}
                },
                Ok(None) | Err(_) => gone.push(c.as_raw_fd()),
            }
        }
        clients.retain(|c| !gone.contains(&c.as_raw_fd()));
        for (file, splitter, open, kind) in outputs.iter_mut().filter(|s| s.2) {
            if revents(file.as_raw_fd()) == 0 {
                continue;
            }
            match file.read(&mut buf) {
                Ok(0) => {
                    *open = false;
                    let _ = splitter.finish(now_ns(), &mut log);
                }
                Ok(n) => {
                    if let Err(e) = splitter.feed(&buf[..n], now_ns(), &mut log) {
                        eprintln!("strake-monitor: write log: {e}");
                    }
                    if !clients.is_empty() {
                        let msg = match kind {
                            attach::Message::Stderr(_) => {
                                attach::Message::Stderr(buf[..n].to_vec())
                            }
                            _ => attach::Message::Stdout(buf[..n].to_vec()),
                        };
                        let packet = msg.encode();
                        // A client too slow to take the packet misses it (the log has it);
                        // one whose connection failed is dropped.
                        clients.retain(|c| {
                            attach::send_packet(c.as_raw_fd(), &packet, libc::MSG_DONTWAIT).is_ok()
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // A terminal's master reads EIO once the container closed its side.
                    *open = false;
                    let _ = splitter.finish(now_ns(), &mut log);
                }
            }
        }
    }
}

/// Reaps children; when `pid` is among them, writes its exit record. Returns whether it exited.
/// Writes the exit record the runtime reads.
fn write_exit(exit_file: &Path, exit_code: i32, signal: Option<i32>) {
    let record = ExitRecord {
        exit_code,
        signal,
        finished_at_ns: now_ns() as i64,
    };
    match serde_json::to_vec(&record) {
        Ok(bytes) => {
            if let Err(e) = crate::state::write_atomic(exit_file, &bytes) {
                eprintln!("strake-monitor: write {}: {e}", exit_file.display());
            }
        }
        Err(e) => eprintln!("strake-monitor: encode exit record: {e}"),
    }
}

fn reap(pid: i32, exit_file: &Path) -> bool {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r <= 0 {
            return false;
        }
        if r != pid {
            continue;
        }
        let (exit_code, signal) = if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            (128 + sig, Some(sig))
        } else {
            (libc::WEXITSTATUS(status), None)
        };
        write_exit(exit_file, exit_code, signal);
        return true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let a = Args {
            id: "c1".into(),
            bundle: "/b".into(),
            runtime: "/usr/sbin/runc".into(),
            runtime_options: vec!["--platform=ptrace".into(), "--debug".into()],
            runtime_root: "/run/r".into(),
            systemd_cgroup: true,
            log_path: "/l".into(),
            exit_file: "/e".into(),
            pid_file: "/p".into(),
            ready_fd: 3,
            stdin: true,
            stdin_once: false,
            tty: true,
            attach_socket: Some("/a".into()),
            stdio_fifos: true,
        };
        assert_eq!(Args::parse(a.to_args()).unwrap(), a);
        assert!(Args::parse(vec!["--id".into()]).is_err());
        let mut extra = a.to_args();
        extra.extend(["--bogus".into(), "x".into()]);
        assert!(Args::parse(extra).unwrap_err().contains("--bogus"));
    }

    #[test]
    fn ready_lines_are_tagged_json() {
        let line = serde_json::to_string(&Ready::Created { pid: 42 }).unwrap();
        assert_eq!(line, r#"{"status":"created","pid":42}"#);
        let back: Ready = serde_json::from_str(r#"{"status":"failed","error":"boom"}"#).unwrap();
        assert_eq!(
            back,
            Ready::Failed {
                error: "boom".into()
            }
        );
    }
}
