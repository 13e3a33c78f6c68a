//! Running the external programs the registry needs: Nix (`nix`,
//! `nix-instantiate`, `nix-store`) and git. This is the only module that
//! starts a process. Every run has stdin closed and stdout and stderr piped;
//! it ends by the deadline its caller gives, and the program is killed when
//! the deadline passes or the run is dropped. Every start is counted in the
//! invocation metric (`nixery_nix_invocations_total{command}`). The
//! program's stderr is logged line by line as it comes, without secrets,
//! and its last lines are kept for the error when it fails.
//!
//! A program gets a clean environment: of the registry's own variables only
//! those Nix and git need (see `inherited`) and what its invocation sets.
//! The registry's settings, which carry secrets (the signing key's path,
//! bucket keys, credentials, URLs with tokens), never reach Nix, git or
//! what they run: the package set's `builtins.getEnv` and a builder reading
//! `/proc/<nix>/environ` find none of them.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::metrics::Metrics;

/// How many lines of a program's stderr an error keeps.
pub const STDERR_TAIL: usize = 20;

/// The registry's variables its programs get, by name: where programs and
/// their files are, locale and time zone, certificates, proxies, and the
/// Debian package set's cache folder (`pkgs-debian/` reads it).
const INHERITED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "TMPDIR",
    "TZ",
    "LANG",
    "LANGUAGE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "SSH_AUTH_SOCK",
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "NIXERY_DEBIAN_CACHE",
];

/// The registry's variables its programs get, by prefix: Nix's own
/// (`NIX_CONFIG`, `NIX_PATH`, `NIX_REMOTE`, …), git's, the locale's and the
/// XDG folders (Nix's caches).
const INHERITED_PREFIXES: &[&str] = &["NIX_", "GIT_", "LC_", "XDG_"];

/// Variables with an inherited prefix that are the registry's settings,
/// not Nix's: never passed on (a popularity URL may carry a token).
const OWN_SETTINGS: &[&str] = &["NIX_TIMEOUT", "NIX_POPULARITY_URL"];

/// Whether the registry's variable `key` is passed on to the programs it
/// runs. Everything not named here is left out: `NIXERY_*` (but
/// `NIXERY_DEBIAN_CACHE`), `S3_*`, `AWS_*`, `GCS_*`,
/// `GOOGLE_APPLICATION_CREDENTIALS` and whatever else the registry was
/// started with.
fn inherited(key: &OsStr) -> bool {
    let Some(key) = key.to_str() else {
        return false;
    };
    if OWN_SETTINGS.contains(&key) {
        return false;
    }
    INHERITED.contains(&key) || INHERITED_PREFIXES.iter().any(|prefix| key.starts_with(prefix))
}

/// The part of `environment` (the registry's) that its programs get.
fn inherited_env(
    environment: impl IntoIterator<Item = (OsString, OsString)>,
) -> impl Iterator<Item = (OsString, OsString)> {
    environment.into_iter().filter(|(key, _)| inherited(key))
}

/// A program the registry runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    Nix,
    NixInstantiate,
    NixStore,
    Git,
}

impl Program {
    /// The name it is started by (looked up in `PATH`) and counted under.
    pub fn name(self) -> &'static str {
        match self {
            Program::Nix => "nix",
            Program::NixInstantiate => "nix-instantiate",
            Program::NixStore => "nix-store",
            Program::Git => "git",
        }
    }
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One run of a program: its arguments, environment and deadline.
#[derive(Clone, Debug)]
pub struct Invocation {
    program: Program,
    stage: &'static str,
    timeout: Duration,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl Invocation {
    /// `program`, for `stage` (what the log lines say it is doing), killed
    /// unless it has finished within `timeout`.
    pub fn new(program: Program, stage: &'static str, timeout: Duration) -> Self {
        Invocation {
            program,
            stage,
            timeout,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn args<I>(mut self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets `key` in the program's environment, over what it inherits (a
    /// `PATH` set here is also where the program is looked up).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }
}

/// How a run ended badly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program could not be started, or its output could not be read.
    #[error("could not run {program}: {source}")]
    Spawn { program: Program, source: std::io::Error },
    /// It exited unsuccessfully (`code` is `None` when a signal ended it);
    /// `stderr`: its last lines, without secrets.
    #[error("{program} failed ({}): {}", exit(*.code), .stderr.last().map_or("", String::as_str))]
    Failed {
        program: Program,
        code: Option<i32>,
        stderr: Vec<String>,
    },
    /// It had not finished by its deadline and was killed.
    #[error("{program} gave no answer in {} s", .after.as_secs())]
    TimedOut { program: Program, after: Duration },
}

fn exit(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("status {code}"),
        None => "killed by a signal".to_owned(),
    }
}

/// Starts programs and counts them in the metrics.
#[derive(Clone, Debug)]
pub struct Programs {
    metrics: Arc<Metrics>,
}

impl Default for Programs {
    /// A runner that counts in metrics of its own, which nothing serves.
    fn default() -> Self {
        Programs::new(Arc::new(Metrics::default()))
    }
}

impl Programs {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Programs { metrics }
    }

    /// Runs `invocation` to completion within its deadline, logging its
    /// stderr as it comes; returns its stdout.
    pub async fn run(&self, invocation: Invocation) -> Result<Vec<u8>, RunError> {
        let Invocation {
            program,
            stage,
            timeout,
            args,
            env,
        } = invocation;
        let mut command = Command::new(program.name());
        command
            .args(args)
            .env_clear()
            .envs(inherited_env(std::env::vars_os()))
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        self.metrics.nix_invocation(program.name());
        let mut child = command.spawn().map_err(|source| RunError::Spawn { program, source })?;
        let mut stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");

        let work = async {
            let mut out = Vec::new();
            let (read, tail, status) = tokio::join!(
                stdout.read_to_end(&mut out),
                log_lines(program, stage, stderr),
                child.wait()
            );
            read.map_err(|source| RunError::Spawn { program, source })?;
            let status = status.map_err(|source| RunError::Spawn { program, source })?;
            if status.success() {
                Ok(out)
            } else {
                Err(RunError::Failed {
                    program,
                    code: status.code(),
                    stderr: tail,
                })
            }
        };
        // On the deadline `work` is dropped, then `child`, which kills it.
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| RunError::TimedOut {
                program,
                after: timeout,
            })?
    }
}

/// Logs each line of `stderr`, without secrets, and returns the last few.
/// Bytes that are not UTF-8 are replaced, so that reading goes on to the end.
async fn log_lines(program: Program, stage: &'static str, stderr: impl AsyncRead + Unpin) -> Vec<String> {
    let mut reader = BufReader::new(stderr);
    let mut tail = VecDeque::with_capacity(STDERR_TAIL);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let raw = buffer.strip_suffix(b"\n").unwrap_or(&buffer);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = crate::redact::scrub(&String::from_utf8_lossy(raw)).into_owned();
        match program {
            Program::Git => tracing::info!(target: "git", stage, "{line}"),
            _ => tracing::info!(target: "nix", stage, "{line}"),
        }
        if tail.len() == STDERR_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    tail.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `PATH` whose `git` is `/bin/sh` (a link, so nothing is written
    /// that a process forked meanwhile could hold open), then the usual one.
    fn git_is_sh() -> (tempfile::TempDir, OsString) {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/bin/sh", dir.path().join("git")).unwrap();
        let mut path = dir.path().as_os_str().to_owned();
        if let Some(rest) = std::env::var_os("PATH") {
            path.push(":");
            path.push(rest);
        }
        (dir, path)
    }

    /// `git -c script`, with `git` being the shell.
    fn shell(path: &OsStr, script: &str, timeout: Duration) -> Invocation {
        Invocation::new(Program::Git, "test", timeout)
            .env("PATH", path)
            .args(["-c", script])
    }

    fn invocations(metrics: &Metrics, command: &str) -> String {
        let line = format!("nixery_nix_invocations_total{{command=\"{command}\"}} ");
        let text = metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
            .unwrap_or_else(|| panic!("{line} in:\n{text}"))
    }

    #[tokio::test]
    async fn a_failure_keeps_its_code_and_last_stderr_lines_and_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let programs = Programs::new(Arc::clone(&metrics));
        let (_dir, path) = git_is_sh();

        let failing = shell(&path, "echo err >&2; exit 3", Duration::from_secs(30));
        match programs.run(failing).await {
            Err(RunError::Failed { program, code, stderr }) => {
                assert_eq!((program, code, stderr), (Program::Git, Some(3), vec!["err".to_owned()]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(invocations(&metrics, "git"), "1");

        let chatty = "i=0; while [ $i -lt 30 ]; do echo line $i >&2; i=$((i+1)); done; echo out; exit 1";
        let Err(RunError::Failed { stderr, .. }) = programs.run(shell(&path, chatty, Duration::from_secs(30))).await
        else {
            panic!("exit 1 is a failure");
        };
        let expected: Vec<String> = (10..30).map(|i| format!("line {i}")).collect();
        assert_eq!(stderr, expected, "the last {STDERR_TAIL} lines");

        let ok = shell(
            &path,
            r#"printf 'not utf-8: \377\n' >&2; echo "$1 $GIT_OK""#,
            Duration::from_secs(30),
        )
        .args(["sh", "argument"])
        .env("GIT_OK", "ok");
        assert_eq!(programs.run(ok).await.unwrap(), b"argument ok\n");
        assert_eq!(invocations(&metrics, "git"), "3");
    }

    fn pairs(names: &[&str]) -> Vec<(OsString, OsString)> {
        names
            .iter()
            .map(|n| (OsString::from(n), OsString::from(format!("value of {n}"))))
            .collect()
    }

    #[test]
    fn programs_get_what_nix_and_git_need_and_none_of_the_registry_secrets() {
        let needed = [
            "PATH",
            "HOME",
            "TMPDIR",
            "LANG",
            "LC_ALL",
            "NIX_CONFIG",
            "NIX_PATH",
            "NIX_REMOTE",
            "NIX_SSL_CERT_FILE",
            "SSL_CERT_FILE",
            "XDG_CACHE_HOME",
            "GIT_SSH_COMMAND",
            "https_proxy",
            "NIXERY_DEBIAN_CACHE",
        ];
        let secret = [
            "NIXERY_SIGNING_KEY",
            "NIXERY_TOKENS",
            "NIXERY_HTPASSWD",
            "NIXERY_PKGS_REPO",
            "NIXERY_CHANNEL_URL",
            "NIXERY_FLAKE",
            "NIX_POPULARITY_URL",
            "NIX_TIMEOUT",
            "S3_ACCESS_KEY",
            "S3_SECRET_KEY",
            "S3_ENDPOINT",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "GCS_BUCKET",
            "STORAGE_PATH",
            "RUST_LOG",
            "ANYTHING_ELSE",
        ];
        let passed: Vec<_> = inherited_env(pairs(&[&needed[..], &secret[..]].concat())).collect();
        assert_eq!(passed, pairs(&needed));
    }

    #[tokio::test]
    async fn a_program_starts_with_only_the_inherited_environment_and_its_own() {
        let programs = Programs::default();
        let (_dir, path) = git_is_sh();
        let dump = shell(&path, "cat /proc/$$/environ", Duration::from_secs(30)).env("GIT_OWN", "set");
        let stdout = programs.run(dump).await.unwrap();
        let mut got: Vec<String> = (stdout.split(|b| *b == 0).filter(|entry| !entry.is_empty()))
            .map(|entry| String::from_utf8_lossy(entry).into_owned())
            .collect();
        got.sort();
        let mut expected: Vec<String> = inherited_env(std::env::vars_os())
            .filter(|(key, _)| key != "PATH")
            .map(|(key, value)| format!("{}={}", key.to_string_lossy(), value.to_string_lossy()))
            .chain([format!("PATH={}", path.to_string_lossy()), "GIT_OWN=set".to_owned()])
            .collect();
        expected.sort();
        assert_eq!(got, expected);
        assert!(
            std::env::vars_os().any(|(key, _)| !inherited(&key)),
            "the test runs with variables that are not passed on (cargo's)"
        );
    }

    #[tokio::test]
    async fn a_program_past_its_deadline_is_killed() {
        let metrics = Arc::new(Metrics::default());
        let programs = Programs::new(Arc::clone(&metrics));
        let (_dir, path) = git_is_sh();
        let marker = tempfile::tempdir().unwrap();
        let late = marker.path().join("late");
        let script = format!("sleep 2; touch '{}'", late.display());
        let started = std::time::Instant::now();
        let error = programs
            .run(shell(&path, &script, Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(
            matches!(error, RunError::TimedOut { program: Program::Git, after } if after == Duration::from_millis(200)),
            "{error:?}"
        );
        assert_eq!(error.to_string(), "git gave no answer in 0 s");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!late.exists(), "the program was killed at its deadline");
        assert_eq!(invocations(&metrics, "git"), "1");
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_counted_and_named() {
        let metrics = Arc::new(Metrics::default());
        let programs = Programs::new(Arc::clone(&metrics));
        let empty = tempfile::tempdir().unwrap();
        let run = Invocation::new(Program::NixStore, "test", Duration::from_secs(5)).env("PATH", empty.path());
        let error = programs.run(run).await.unwrap_err();
        assert!(
            matches!(
                error,
                RunError::Spawn {
                    program: Program::NixStore,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(error.to_string().starts_with("could not run nix-store: "), "{error}");
        assert_eq!(invocations(&metrics, "nix-store"), "1");
    }
}
