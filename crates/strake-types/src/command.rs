//! Running a helper program (`nft`, `conntrack`, ...) to completion: its stdin fed from another
//! thread so that a chatty program cannot deadlock us on a full pipe, its output captured up to
//! a bound, and a failure reported as [`CommandError`] with the program's own words.
//!
//! The OCI runtime is not run through here: its `create` and `exec` hand their stdio to a
//! container that outlives them (see strake-runtime's `runc` module).

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};

/// The most of a program's stdout or stderr that is kept; the rest is read and dropped.
pub const MAX_OUTPUT_BYTES: u64 = 16 << 20;

/// A program that could not run, or ran and failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program ran and exited unsuccessfully.
    #[error("{program} {} failed ({status}): {stderr}", args.join(" "))]
    Failed {
        /// The program (e.g. `nft`, or `nsenter` wrapping it).
        program: String,
        /// Its arguments.
        args: Vec<String>,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// The program could not be started, fed or read.
    #[error("cannot run {program}")]
    Spawn {
        /// The program that was to run.
        program: String,
        /// Why it did not.
        #[source]
        source: std::io::Error,
    },
}

impl CommandError {
    /// A failure to start `program` (also for fakes in tests).
    pub fn spawn(program: impl Into<String>, source: std::io::Error) -> Self {
        CommandError::Spawn {
            program: program.into(),
            source,
        }
    }
}

/// What a finished program left.
#[derive(Debug)]
pub struct Ran {
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// How it exited.
    pub status: ExitStatus,
    /// Its stdout (at most [`MAX_OUTPUT_BYTES`]).
    pub stdout: Vec<u8>,
    /// Its stderr (at most [`MAX_OUTPUT_BYTES`]), lossily decoded and trimmed.
    pub stderr: String,
}

impl Ran {
    /// The run, if the program exited 0; else [`CommandError::Failed`].
    pub fn success(self) -> Result<Ran, CommandError> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(self.failed())
        }
    }

    /// This run as a failure (for callers with their own idea of success).
    pub fn failed(self) -> CommandError {
        CommandError::Failed {
            program: self.program,
            args: self.args,
            status: self.status,
            stderr: self.stderr,
        }
    }
}

/// Runs `cmd` to the end with `stdin` as its input (else `/dev/null`), capturing its output.
/// A non-zero exit is not an error here: see [`Ran::success`].
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Ran, CommandError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let spawn_err = |source| CommandError::spawn(program.clone(), source);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let (written, stdout, stderr) = std::thread::scope(|scope| {
        let writer = child.stdin.take().map(|mut pipe| {
            let input = stdin.unwrap_or_default();
            scope.spawn(move || pipe.write_all(input))
        });
        let stderr = scope.spawn(move || bounded(err.as_mut()));
        let stdout = bounded(out.as_mut());
        let written = match writer {
            Some(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("stdin writer panicked"))),
            None => Ok(()),
        };
        let stderr = stderr
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("stderr reader panicked")));
        (written, stdout, stderr)
    });
    let status = child.wait().map_err(spawn_err)?;
    let (stdout, stderr) = (stdout.map_err(spawn_err)?, stderr.map_err(spawn_err)?);
    let ran = Ran {
        program: program.clone(),
        args,
        status,
        stdout,
        stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
    };
    // A program that failed explains itself better than the broken pipe it left us.
    if ran.status.success() {
        written.map_err(spawn_err)?;
    }
    Ok(ran)
}

/// Reads `pipe` to its end, keeping at most [`MAX_OUTPUT_BYTES`].
fn bounded(pipe: Option<&mut impl Read>) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    if let Some(pipe) = pipe {
        pipe.take(MAX_OUTPUT_BYTES).read_to_end(&mut kept)?;
        std::io::copy(pipe, &mut std::io::sink())?;
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn output_stdin_and_failures_come_back() {
        let ran = run(&mut sh("cat; echo err >&2"), Some(b"in")).unwrap();
        assert!(ran.status.success());
        assert_eq!(ran.stdout, b"in");
        assert_eq!(ran.stderr, "err");

        let e = run(&mut sh("echo 'no such table' >&2; exit 3"), None)
            .unwrap()
            .success()
            .unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("/bin/sh -c "), "{text}");
        assert!(text.contains("no such table"), "{text}");
        assert!(matches!(e, CommandError::Failed { status, .. } if status.code() == Some(3)));

        let e = run(&mut Command::new("/nonexistent/program"), None).unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }), "{e:?}");
    }

    #[test]
    fn big_input_and_output_cannot_deadlock_and_output_is_bounded() {
        // 4 MiB in while the program writes 4 MiB to stderr and 20 MiB to stdout.
        let input = vec![b'x'; 4 << 20];
        let ran = run(
            &mut sh("head -c 4194304 /dev/zero >&2; head -c 20971520 /dev/zero; cat >/dev/null"),
            Some(&input),
        )
        .unwrap()
        .success()
        .unwrap();
        assert_eq!(ran.stdout.len() as u64, MAX_OUTPUT_BYTES);
        assert_eq!(ran.stderr.len(), 4 << 20);
    }
}
