//! Upstream's conformance suite against a test-bed [`Cluster`]: `e2e.test` run through the
//! `ginkgo` CLI inside the cluster namespace (`make conformance`,
//! `make conformance-node-network`).
//!
//! A run has two phases, as upstream's conformance runs do: the parallel one (every selected
//! spec but `[Serial]` ones, `--procs` processes) and then the `[Serial]` specs one at a time.
//! Each phase writes a junit and a JSON report into the reports folder; ginkgo's own output
//! (verbose, one spec per block) goes to `ginkgo-<phase>.log` there, while a spec counter is
//! printed as specs finish. The summary comes from the JSON reports: `It` specs of the
//! selection, by final state.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::cluster::{Cluster, conformance_bin};

/// The ginkgo process of the phase running now (0: none), and whether the run was asked to
/// stop: [`stop`] ends the run so that its cluster is torn down rather than left behind.
static GINKGO: AtomicU32 = AtomicU32::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Stops the run: the running ginkgo and its spec processes (a process group of their own)
/// get SIGINT, as from a terminal's Ctrl-C, on which they interrupt their specs and clean up;
/// no further phase starts. For a signal handler of the runner.
pub fn stop() {
    STOPPING.store(true, Ordering::SeqCst);
    let pid = GINKGO.load(Ordering::SeqCst);
    if pid != 0 {
        // SAFETY: kill(2) on the process group of the ginkgo this run started.
        unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGINT) };
    }
}
use crate::{Error, Result, paths};

/// Which specs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecSet {
    /// Every `[Conformance]` spec.
    All,
    /// `[sig-node]` and `[sig-network]` `[Conformance]` specs.
    NodeNetwork,
}

impl std::str::FromStr for SpecSet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(SpecSet::All),
            "node-network" => Ok(SpecSet::NodeNetwork),
            other => Err(Error::Invalid(format!(
                "unknown spec set {other:?} (all or node-network)"
            ))),
        }
    }
}

/// One ginkgo invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Phase {
    /// `parallel` or `serial` (names the reports).
    pub name: &'static str,
    /// ginkgo `--label-filter`: e2e's specs carry their tags as labels (`Conformance`,
    /// `Serial`, `sig-node`, ...).
    pub label_filter: String,
    /// ginkgo `--focus` (a regular expression on spec texts), when narrowed further.
    pub focus: Option<String>,
    /// ginkgo `--procs`.
    pub procs: u32,
}

/// The phases of a run of `set`; `focus`, when given, narrows both.
pub fn phases(set: SpecSet, procs: u32, focus: Option<&str>) -> Vec<Phase> {
    let sig = match set {
        SpecSet::All => "",
        SpecSet::NodeNetwork => " && (sig-node || sig-network)",
    };
    vec![
        Phase {
            name: "parallel",
            label_filter: format!("Conformance && !Serial{sig}"),
            focus: focus.map(str::to_string),
            procs: procs.max(1),
        },
        Phase {
            name: "serial",
            label_filter: format!("Conformance && Serial{sig}"),
            focus: focus.map(str::to_string),
            procs: 1,
        },
    ]
}

/// Outcome counts of `It` specs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Specs selected to run.
    pub total: usize,
    /// Passed.
    pub passed: usize,
    /// Failed, panicked, timed out, aborted or interrupted.
    pub failed: usize,
    /// Selected but skipped at run time (and selected specs that never reported).
    pub skipped: usize,
    /// Each failed spec: full text and the first line of its failure message.
    pub failures: Vec<(String, String)>,
}

impl Summary {
    /// Adds another phase's counts.
    pub fn add(&mut self, other: Summary) {
        self.total += other.total;
        self.passed += other.passed;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.failures.extend(other.failures);
    }

    /// The summary line.
    pub fn line(&self) -> String {
        format!(
            "conformance: {} passed, {} failed, {} skipped of {}",
            self.passed, self.failed, self.skipped, self.total
        )
    }
}

/// Counts a ginkgo JSON report (`--json-report`): an array of suite reports.
pub fn summarize(json: &str) -> Result<Summary> {
    let suites: Vec<serde_json::Value> = serde_json::from_str(json)
        .map_err(|e| Error::Invalid(format!("not a ginkgo JSON report: {e}")))?;
    let mut s = Summary::default();
    for suite in &suites {
        s.total += suite["PreRunStats"]["SpecsThatWillRun"]
            .as_u64()
            .unwrap_or(0) as usize;
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            if spec["LeafNodeType"] != "It" {
                // A suite-level node (SynchronizedBeforeSuite, ...) that failed fails the run.
                if is_failure(spec["State"].as_str().unwrap_or("")) {
                    s.failures.push((
                        format!("[{}]", spec["LeafNodeType"].as_str().unwrap_or("?")),
                        failure_message(spec),
                    ));
                }
                continue;
            }
            match spec["State"].as_str().unwrap_or("") {
                "passed" => s.passed += 1,
                st if is_failure(st) => {
                    s.failed += 1;
                    s.failures.push((spec_text(spec), failure_message(spec)));
                }
                _ => {}
            }
        }
    }
    s.skipped = s.total.saturating_sub(s.passed + s.failed);
    Ok(s)
}

fn is_failure(state: &str) -> bool {
    matches!(
        state,
        "failed" | "panicked" | "timedout" | "aborted" | "interrupted"
    )
}

fn spec_text(spec: &serde_json::Value) -> String {
    let mut parts: Vec<&str> = spec["ContainerHierarchyTexts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    parts.push(spec["LeafNodeText"].as_str().unwrap_or(""));
    parts.join(" ")
}

fn failure_message(spec: &serde_json::Value) -> String {
    spec["Failure"]["Message"]
        .as_str()
        .unwrap_or("")
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .chars()
        .take(300)
        .collect()
}

/// What a line of ginkgo's verbose output says about progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// `Will run N of M specs`.
    WillRun(usize),
    /// A spec finished in this state (`passed`, `failed`, `skipped`, ...).
    Done(&'static str),
}

/// Reads one line of `ginkgo -v --force-newlines --no-color` output.
pub fn parse_progress(line: &str) -> Option<Progress> {
    let line = line.trim_start_matches(['S', '-']).trim();
    if let Some(rest) = line.strip_prefix("Will run ") {
        return rest
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .map(Progress::WillRun);
    }
    let rest = line.strip_prefix("•")?.trim_start();
    let state = if !rest.starts_with('[') {
        return None;
    } else if rest.starts_with("[FAILED]") {
        "failed"
    } else if rest.starts_with("[PANICKED]") {
        "panicked"
    } else if rest.starts_with("[TIMEDOUT]") {
        "timedout"
    } else if rest.starts_with("[INTERRUPTED]") {
        "interrupted"
    } else if rest.starts_with("[ABORTED]") {
        "aborted"
    } else if rest.contains("seconds]") {
        "passed"
    } else {
        return None;
    };
    Some(Progress::Done(state))
}

/// Where a run writes.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Which specs.
    pub set: SpecSet,
    /// Parallel processes of the parallel phase.
    pub procs: u32,
    /// Narrows the selection further (a regular expression on spec texts).
    pub focus: Option<String>,
    /// The reports folder.
    pub report_dir: PathBuf,
}

/// Runs the phases against `cluster`; narrates progress to `out`; returns the summary of
/// all phases.
pub fn run(cluster: &Cluster, opts: &RunOptions, out: &mut dyn Write) -> Result<Summary> {
    let e2e = conformance_bin("e2e.test")?;
    let ginkgo = conformance_bin("ginkgo")?;
    let kubectl = paths::kubernetes_bin("kubectl")?;
    std::fs::create_dir_all(&opts.report_dir).map_err(crate::io_err("create", &opts.report_dir))?;
    // Absolute: ginkgo runs in the folder and resolves --output-dir against it.
    let report_dir = std::path::absolute(&opts.report_dir)
        .map_err(crate::io_err("resolve", &opts.report_dir))?;
    let opts = &RunOptions {
        report_dir,
        ..opts.clone()
    };
    let mut total = Summary::default();
    for phase in phases(opts.set, opts.procs, opts.focus.as_deref()) {
        if STOPPING.load(Ordering::SeqCst) {
            let _ = writeln!(out, "conformance: stopped; phase {} not run", phase.name);
            break;
        }
        let log_path = opts.report_dir.join(format!("ginkgo-{}.log", phase.name));
        let json = opts.report_dir.join(format!("report-{}.json", phase.name));
        let _ = writeln!(
            out,
            "conformance: phase {} (procs {}), labels {:?}, focus {:?}, log {}",
            phase.name,
            phase.procs,
            phase.label_filter,
            phase.focus,
            log_path.display()
        );
        let mut cmd = cluster.cp.net().ns().command(&ginkgo);
        cmd.args([
            format!("--procs={}", phase.procs),
            "--timeout=24h".into(),
            "--no-color".into(),
            "-v".into(),
            "--force-newlines".into(),
            format!("--output-dir={}", opts.report_dir.display()),
            format!("--junit-report=junit-{}.xml", phase.name),
            format!("--json-report=report-{}.json", phase.name),
            format!("--label-filter={}", phase.label_filter),
        ]);
        if let Some(f) = &phase.focus {
            cmd.arg(format!("--focus={f}"));
        }
        cmd.arg(&e2e).arg("--").args([
            format!("--kubeconfig={}", cluster.cp.cluster_kubeconfig().display()),
            "--provider=skeleton".into(),
            format!("--kubectl-path={}", kubectl.display()),
            "--dump-logs-on-failure=false".into(),
            format!(
                "--e2e-output-dir={}",
                opts.report_dir.join("e2e-output").display()
            ),
        ]);
        // A process group of its own: `stop` interrupts ginkgo and its spec processes alone.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.current_dir(&opts.report_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // e2e's image list honours this; the cluster serves upstream names as they are.
            .env_remove("KUBE_TEST_REPO_LIST");
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            program: ginkgo.display().to_string(),
            source,
        })?;
        GINKGO.store(child.id(), Ordering::SeqCst);
        if STOPPING.load(Ordering::SeqCst) {
            stop();
        }
        let mut log =
            std::fs::File::create(&log_path).map_err(crate::io_err("create", &log_path))?;
        let (mut will_run, mut done, mut passed, mut failed) = (0usize, 0usize, 0usize, 0usize);
        let mut pending_failure = false;
        if let Some(stdout) = child.stdout.take() {
            for_each_line(BufReader::new(stdout), |raw, line| {
                let _ = log.write_all(raw);
                if pending_failure && line.trim_start().starts_with('[') {
                    let _ = writeln!(out, "conformance:     FAILED {}", line.trim());
                    pending_failure = false;
                }
                match parse_progress(line) {
                    Some(Progress::WillRun(n)) => {
                        will_run = n;
                        let _ = writeln!(out, "conformance: phase {}: {n} specs", phase.name);
                    }
                    Some(Progress::Done(state)) => {
                        done += 1;
                        if state == "passed" {
                            passed += 1;
                        } else {
                            failed += 1;
                            pending_failure = true;
                        }
                        let _ = writeln!(
                            out,
                            "conformance: [{done}/{will_run}] {passed} passed, {failed} failed ({state})"
                        );
                    }
                    None => {}
                }
            });
        }
        let status = child.wait().map_err(|source| Error::Spawn {
            program: ginkgo.display().to_string(),
            source,
        });
        GINKGO.store(0, Ordering::SeqCst);
        let status = status?;
        let text = std::fs::read_to_string(&json).map_err(crate::io_err("read", &json))?;
        let s = summarize(&text)?;
        let _ = writeln!(
            out,
            "conformance: phase {} done (ginkgo {status}): {}",
            phase.name,
            s.line()
        );
        total.add(s);
    }
    write_failures(&opts.report_dir, &total)?;
    Ok(total)
}

/// Calls `f` with each line of `r`, raw (with its newline) and as text (lossy, without it),
/// until the end or a read error. A spec's output may hold any bytes (an API server's protobuf
/// body in an error message): stopping at the first line that is not UTF-8 would close the
/// pipe and kill ginkgo with SIGPIPE, losing its report.
fn for_each_line(mut r: impl BufRead, mut f: impl FnMut(&[u8], &str)) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        f(&buf, text.trim_end_matches(['\n', '\r']));
    }
}

fn write_failures(dir: &Path, s: &Summary) -> Result<()> {
    let path = dir.join("failures.txt");
    let mut text = String::new();
    for (spec, msg) in &s.failures {
        text.push_str(&format!("{spec}\n    {msg}\n"));
    }
    text.push_str(&s.line());
    text.push('\n');
    std::fs::write(&path, text).map_err(crate::io_err("write", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_that_are_not_utf8_are_passed_on_and_reading_goes_on() {
        let input: &[u8] = b"first\nresponse: k8s\x00\x0a\x0c\xff\xfe v1Status}\nlast\n";
        let mut raw = Vec::new();
        let mut lines = Vec::new();
        for_each_line(input, |r, l| {
            raw.extend_from_slice(r);
            lines.push(l.to_string());
        });
        assert_eq!(raw, input, "the log gets every byte");
        assert_eq!(lines.first().map(String::as_str), Some("first"));
        assert_eq!(lines.last().map(String::as_str), Some("last"));
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn node_network_phases_select_by_label_and_put_serial_last() {
        let p = phases(SpecSet::NodeNetwork, 4, None);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0].label_filter,
            "Conformance && !Serial && (sig-node || sig-network)"
        );
        assert_eq!(p[0].procs, 4);
        assert_eq!(p[0].focus, None);
        assert_eq!(p[1].name, "serial");
        assert_eq!(
            p[1].label_filter,
            "Conformance && Serial && (sig-node || sig-network)"
        );
        assert_eq!(p[1].procs, 1);
    }

    #[test]
    fn all_phases_have_no_sig_filter_and_keep_the_focus() {
        let p = phases(SpecSet::All, 0, Some("host IP"));
        assert_eq!(p[0].label_filter, "Conformance && !Serial");
        assert_eq!(p[0].procs, 1, "at least one process");
        assert_eq!(p[1].label_filter, "Conformance && Serial");
        assert_eq!(p[1].focus.as_deref(), Some("host IP"));
    }

    #[test]
    fn summary_counts_it_specs_by_state() {
        let json = r#"[{
            "PreRunStats": {"TotalSpecs": 7000, "SpecsThatWillRun": 4},
            "SpecReports": [
                {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"},
                {"LeafNodeType": "It", "State": "passed", "ContainerHierarchyTexts": ["[sig-node] Pods"], "LeafNodeText": "a"},
                {"LeafNodeType": "It", "State": "failed", "ContainerHierarchyTexts": ["[sig-network] DNS"], "LeafNodeText": "b [Conformance]",
                 "Failure": {"Message": "\ntimed out waiting\nmore"}},
                {"LeafNodeType": "It", "State": "skipped", "LeafNodeText": "c"},
                {"LeafNodeType": "It", "State": "timedout", "LeafNodeText": "d"}
            ]}]"#;
        let s = summarize(json).unwrap();
        assert_eq!((s.total, s.passed, s.failed, s.skipped), (4, 1, 2, 1));
        assert_eq!(
            s.failures[0],
            (
                "[sig-network] DNS b [Conformance]".to_string(),
                "timed out waiting".to_string()
            )
        );
        assert_eq!(s.line(), "conformance: 1 passed, 2 failed, 1 skipped of 4");
    }

    #[test]
    fn summary_reports_a_failed_suite_node() {
        let json = r#"[{"PreRunStats": {"SpecsThatWillRun": 2}, "SpecReports": [
            {"LeafNodeType": "SynchronizedBeforeSuite", "State": "failed", "Failure": {"Message": "no nodes"}}]}]"#;
        let s = summarize(json).unwrap();
        assert_eq!((s.total, s.passed, s.failed, s.skipped), (2, 0, 0, 2));
        assert_eq!(s.failures[0].1, "no nodes");
        assert!(summarize("{}").is_err());
    }

    #[test]
    fn progress_lines_are_recognised() {
        assert_eq!(
            parse_progress("Will run 151 of 7123 specs"),
            Some(Progress::WillRun(151))
        );
        assert_eq!(
            parse_progress("• [3.512 seconds]"),
            Some(Progress::Done("passed"))
        );
        assert_eq!(
            parse_progress("• [FAILED] [61.000 seconds]"),
            Some(Progress::Done("failed"))
        );
        assert_eq!(
            parse_progress("SSS------------------------------• [TIMEDOUT] [1.0 seconds]"),
            Some(Progress::Done("timedout"))
        );
        assert_eq!(parse_progress("S"), None);
        assert_eq!(parse_progress("S [SKIPPED] [0.1 seconds]"), None);
        assert_eq!(parse_progress("  STEP: creating a pod"), None);
    }
}
