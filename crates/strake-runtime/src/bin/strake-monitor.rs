//! `strake-monitor`: watches one container for strake-runtime (see `strake_runtime::monitor`).

fn main() {
    let args = match strake_runtime::monitor::Args::parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("strake-monitor: {e}");
            std::process::exit(2);
        }
    };
    std::process::exit(strake_runtime::monitor::run(args));
}
