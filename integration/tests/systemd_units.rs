//! The systemd units of `manifests/systemd/` as systemd reads them: `systemd-analyze verify`
//! (the unit files parse, every directive is known, and `ExecStart` names an executable; the
//! units are verified against this workspace's binaries, since `/usr/local/bin` holds none
//! here), and the promises their comments make are in the files.
//!
//! What cannot run here: this machine's PID 1 is not systemd (`/proc/1/comm`), so no unit is
//! started by systemd; the readiness protocol `Type=notify` relies on is tested against the
//! daemon itself (`crates/strake-runtime/tests/notify.rs`).

use std::process::Command;

use strake_integration::paths;

fn unit(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `systemd-analyze verify` of `text` saved as `name`; (success, what it printed).
fn verify(name: &str, text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(name);
    std::fs::write(&file, text).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn units_pass_systemd_analyze_verify_with_the_workspace_binaries() {
    for (name, program) in [
        ("strake-runtime.service", "strake-runtime"),
        ("strake-kubelet.service", "strake-kubelet"),
    ] {
        let text = unit(name);
        let installed = format!("/usr/local/bin/{program}");
        assert!(text.contains(&format!("ExecStart={installed}")), "{name}");
        let bin = paths::workspace_bin(program).expect("workspace binary");
        let here = text.replace(&installed, &bin.display().to_string());
        let (ok, said) = verify(name, &here);
        assert!(ok, "{name}: {said}");
        // The check is real: a missing executable fails it.
        let (ok, said) = verify(name, &text.replace(&installed, "/nonexistent/strake"));
        assert!(
            !ok && said.contains("/nonexistent/strake"),
            "{name}: {said}"
        );
    }
}

#[test]
fn units_wait_for_readiness_and_keep_pods_across_restarts() {
    for name in ["strake-runtime.service", "strake-kubelet.service"] {
        let text = unit(name);
        let has = |line: &str| text.lines().any(|l| l.trim() == line);
        assert!(has("Type=notify"), "{name}: readiness by sd_notify");
        assert!(has("KillMode=process"), "{name}: pods outlive the daemon");
        assert!(has("Restart=always"), "{name}");
    }
    let kubelet = unit("strake-kubelet.service");
    assert!(
        kubelet
            .lines()
            .any(|l| l.starts_with("After=") && l.contains("strake-runtime.service")),
        "the kubelet starts once the runtime is ready"
    );
    assert!(unit("strake-runtime.service").contains("Delegate=yes"));
}
