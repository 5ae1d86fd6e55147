//! `strake-pause`: the process that holds a pod sandbox's namespaces.
//!
//! strake-runtime starts it in fresh network, IPC and UTS namespaces (the namespaces are made
//! between fork and exec, in the child), pins them with bind mounts, and lets the pod's
//! containers join them. It does nothing but wait: it exits 0 on SIGTERM or SIGINT and reaps any
//! child it inherits. Kept to the standard library and libc so each pod costs little memory.
//!
//! With `--pid-namespace` (a pod with `shareProcessNamespace`), it was also started with a new
//! PID namespace for its children: it forks the namespace's init, the pod's PID 1, which waits
//! and reaps as above (the orphans of every container of the pod come to it), prints that
//! child's PID on standard output for the runtime to pin the namespace, and lives as long as
//! it does. The child dies with it (parent-death signal), and with the namespace's init every
//! process of the pod.

extern "C" fn exit_now(_signal: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

extern "C" fn reap(_signal: libc::c_int) {
    // SAFETY: waitpid is async-signal-safe; errno is saved and restored around it.
    unsafe {
        let errno = *libc::__errno_location();
        while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
        *libc::__errno_location() = errno;
    }
}

fn handle(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid argument.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
}

fn wait_for_ever() -> ! {
    handle(libc::SIGTERM, exit_now);
    handle(libc::SIGINT, exit_now);
    handle(libc::SIGCHLD, reap);
    loop {
        // SAFETY: pause has no preconditions; it returns after each handled signal.
        unsafe { libc::pause() };
    }
}

/// Forks the init of the PID namespace this process made for its children, tells its PID,
/// and exits when it does.
fn hold_pid_namespace() -> ! {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    // SAFETY: this process is single-threaded here; the child only calls async-signal-safe
    // functions before it waits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        eprintln!("strake-pause: fork: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    if child == 0 {
        // SAFETY: prctl and getppid have no memory effects.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have died before the death signal was asked for. In the new
            // namespace the parent is not visible: getppid is 0 while it lives.
            if libc::getppid() != 0 && libc::getppid() != me {
                libc::_exit(0);
            }
            // Standard output is the parent's to tell the PID on, and to close.
            libc::close(1);
        }
        wait_for_ever();
    }
    println!("{child}");
    // SAFETY: closing our own standard output tells the runtime the PID is all there is.
    unsafe { libc::close(1) };
    handle(libc::SIGTERM, exit_now);
    handle(libc::SIGINT, exit_now);
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child
            || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            std::process::exit(0);
        }
    }
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("--version") => {
            println!("strake-pause {}", env!("CARGO_PKG_VERSION"));
        }
        Some("--pid-namespace") => hold_pid_namespace(),
        _ => wait_for_ever(),
    }
}
