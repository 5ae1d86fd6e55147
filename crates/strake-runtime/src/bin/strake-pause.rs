//! `strake-pause`: the process that holds a pod sandbox's namespaces.
//!
//! strake-runtime starts it in fresh network, IPC and UTS namespaces (the namespaces are made
//! between fork and exec, in the child), pins them with bind mounts, and lets the pod's
//! containers join them. It does nothing but wait: it exits 0 on SIGTERM or SIGINT and reaps any
//! child it inherits. Kept to the standard library and libc so each pod costs little memory.

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

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("strake-pause {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    handle(libc::SIGTERM, exit_now);
    handle(libc::SIGINT, exit_now);
    handle(libc::SIGCHLD, reap);
    loop {
        // SAFETY: pause has no preconditions; it returns after each handled signal.
        unsafe { libc::pause() };
    }
}
