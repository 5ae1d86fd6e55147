//! Bad input stops strake-kubelet at start, before it touches the node: the process exits
//! with an error that names the field and the value, and leaves its root directory unmade.

use std::process::Command;

fn start(dir: &std::path::Path, yaml: &str, flags: &[&str]) -> (bool, String) {
    let config = dir.join("config.yaml");
    std::fs::write(&config, yaml).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_strake-kubelet"))
        .arg(format!("--config={}", config.display()))
        .arg(format!("--root-dir={}", dir.join("root").display()))
        .arg("--container-runtime-endpoint=unix:///nonexistent/strake-test.sock")
        .args(flags)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run strake-kubelet");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unparsable_quantities_and_thresholds_stop_the_kubelet_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[&str], &[&str]); 6] = [
        (
            "kubeReserved: {memory: lots}\n",
            &[],
            &["kubeReserved[memory]", "lots"],
        ),
        (
            "",
            &["--system-reserved=cpu=abc"],
            &["systemReserved[cpu]", "abc"],
        ),
        (
            "evictionHard: {memory.available: \"200%\"}\n",
            &[],
            &["evictionHard[memory.available]", "200%"],
        ),
        (
            "evictionSoft: {nodefs.available: 10%}\n",
            &[],
            &["evictionSoft", "nodefs.available", "grace period"],
        ),
        (
            "containerLogMaxSize: big\n",
            &[],
            &["containerLogMaxSize", "big"],
        ),
        (
            "enforceNodeAllocatable: [pods, kube-reserved]\n",
            &[],
            &["kubeReservedCgroup"],
        ),
    ];
    for (yaml, flags, named) in cases {
        let (ok, stderr) = start(dir.path(), yaml, flags);
        assert!(!ok, "{yaml}{flags:?}: started");
        for n in named {
            assert!(stderr.contains(n), "{yaml}{flags:?}: {n} not in {stderr}");
        }
        assert!(!dir.path().join("root").exists(), "{yaml}: root dir made");
    }
}
