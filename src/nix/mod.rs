//! Running Nix: evaluating package names against the package set, realising
//! them, and reading the runtime graph of their closure. This is the only
//! module that starts Nix. Nix's log is streamed line by line to the
//! registry's log while it runs; every call has a deadline.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::layers::{GraphError, RuntimeGraph};
use crate::source::NixSource;

/// The lookup expression (see its header).
const EVAL_NIX: &str = include_str!("eval.nix");
/// How many lines of Nix's stderr an error keeps.
const STDERR_TAIL: usize = 20;
/// Exit status of nix-store when a build timed out (`--timeout`).
const EXIT_TIMED_OUT: i32 = 101;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("could not find Nix packages: {}", .0.join(", "))]
    NotFound(Vec<String>),
    #[error("not packages but attribute sets: {}", .0.join(", "))]
    NotAPackage(Vec<String>),
    #[error("Nix evaluation failed: {0}")]
    Eval(String),
    #[error("Nix build failed: {0}")]
    Build(String),
    #[error("Nix {stage} timed out after {} s", .after.as_secs())]
    Timeout { stage: &'static str, after: Duration },
    #[error("could not run {program}: {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("unexpected output from Nix {stage}: {detail}")]
    Output { stage: &'static str, detail: String },
    #[error("runtime graph from Nix is inconsistent: {0}")]
    Graph(#[from] GraphError),
}

/// What Nix produced for one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Realised {
    /// The store path of each requested package, in request order.
    pub outputs: Vec<String>,
    /// Their closure.
    pub graph: RuntimeGraph,
}

/// Runs Nix with a deadline for each call.
#[derive(Clone, Debug)]
pub struct Nix {
    timeout: Duration,
}

#[derive(Deserialize)]
struct Lookup {
    name: String,
    status: String,
    drv: Option<String>,
    out: Option<String>,
    output: Option<String>,
}

impl Nix {
    /// `timeout` bounds each Nix call and, through `--timeout`, each builder.
    pub fn new(timeout: Duration) -> Self {
        Nix { timeout }
    }

    /// Evaluates and realises `packages` for `system` from `source` and
    /// reads the closure's runtime graph.
    pub async fn realise(&self, source: &NixSource, system: &str, packages: &[String]) -> Result<Realised, NixError> {
        let started = Instant::now();
        let found = self.evaluate(source, system, packages).await?;
        let evaluated = Instant::now();
        let targets: Vec<String> = found.iter().map(|(drv, output, _)| format!("{drv}!{output}")).collect();
        let outputs: Vec<String> = found.into_iter().map(|(_, _, out)| out).collect();
        let (graph, built) = match self.present_closure(&outputs).await {
            Some(graph) => (graph, false),
            None => {
                self.build(&targets).await?;
                (self.runtime_graph(&outputs).await?, true)
            }
        };
        tracing::info!(
            eval_ms = (evaluated - started).as_millis() as u64,
            built,
            realise_ms = evaluated.elapsed().as_millis() as u64,
            "nix finished"
        );
        Ok(Realised { outputs, graph })
    }

    /// The closure's graph without a build, when every output is already in
    /// the store: one query instead of a `nix-store --realise` with nothing
    /// to do. `None` when an output is missing or the query fails (a path on
    /// disk that Nix does not hold valid); building then settles it.
    async fn present_closure(&self, outputs: &[String]) -> Option<RuntimeGraph> {
        let on_disk = outputs
            .iter()
            .all(|o| std::path::Path::new(o).symlink_metadata().is_ok());
        if !on_disk {
            return None;
        }
        self.runtime_graph(outputs).await.ok()
    }

    /// Looks the packages up; returns (drv, output name, out path) of each.
    async fn evaluate(
        &self,
        source: &NixSource,
        system: &str,
        packages: &[String],
    ) -> Result<Vec<(String, String, String)>, NixError> {
        let requests: Vec<serde_json::Value> = packages
            .iter()
            .map(|name| serde_json::json!({ "name": name, "path": attribute_path(name) }))
            .collect();
        let mut cmd = Command::new("nix-instantiate");
        cmd.args(["--read-write-mode", "--eval", "--strict", "--json", "--expr", EVAL_NIX])
            .args(["--argstr", "srcType", source.kind])
            .args(["--argstr", "srcArgs", &source.args])
            .args(["--argstr", "system", system])
            .args(["--argstr", "packages", &serde_json::Value::from(requests).to_string()]);
        let stdout = self
            .run("evaluation", "nix-instantiate", cmd)
            .await
            .map_err(|e| e.into_nix(NixError::Eval))?;
        let lookups: Vec<Lookup> = serde_json::from_slice(&stdout).map_err(|e| NixError::Output {
            stage: "evaluation",
            detail: e.to_string(),
        })?;

        let named = |status: &str| -> Vec<String> {
            lookups
                .iter()
                .filter(|l| l.status == status)
                .map(|l| l.name.clone())
                .collect()
        };
        let (missing, not_packages) = (named("missing"), named("notPackage"));
        if !missing.is_empty() {
            return Err(NixError::NotFound(missing));
        }
        if !not_packages.is_empty() {
            return Err(NixError::NotAPackage(not_packages));
        }
        lookups
            .into_iter()
            .map(|l| match (l.drv, l.output, l.out) {
                (Some(drv), Some(output), Some(out)) if l.status == "ok" => Ok((drv, output, out)),
                _ => Err(NixError::Output {
                    stage: "evaluation",
                    detail: format!("bad record for {}", l.name),
                }),
            })
            .collect()
    }

    async fn build(&self, targets: &[String]) -> Result<(), NixError> {
        let mut cmd = Command::new("nix-store");
        cmd.args(["--realise", "--timeout", &self.timeout.as_secs().max(1).to_string()])
            .args(targets);
        match self.run("build", "nix-store", cmd).await {
            Ok(_) => Ok(()),
            Err(RunError::Failed {
                code: Some(EXIT_TIMED_OUT),
                ..
            }) => Err(NixError::Timeout {
                stage: "build",
                after: self.timeout,
            }),
            Err(e) => Err(e.into_nix(NixError::Build)),
        }
    }

    async fn runtime_graph(&self, outputs: &[String]) -> Result<RuntimeGraph, NixError> {
        let mut cmd = Command::new("nix");
        cmd.args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "--recursive",
        ])
        .args(outputs);
        let stdout = self.run("closure query", "nix", cmd).await.map_err(|e| {
            e.into_nix(|detail| NixError::Output {
                stage: "closure query",
                detail,
            })
        })?;
        Ok(RuntimeGraph::from_path_info(outputs.to_vec(), &stdout)?)
    }

    /// Runs a Nix command to completion within the deadline, logging its
    /// stderr as it comes; returns its stdout.
    async fn run(&self, stage: &'static str, program: &'static str, mut cmd: Command) -> Result<Vec<u8>, RunError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| RunError::Spawn { program, source })?;
        let mut stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");

        let work = async {
            let mut out = Vec::new();
            let (read, tail, status) =
                tokio::join!(stdout.read_to_end(&mut out), log_lines(stage, stderr), child.wait());
            read.map_err(|source| RunError::Spawn { program, source })?;
            let status = status.map_err(|source| RunError::Spawn { program, source })?;
            if status.success() {
                Ok(out)
            } else {
                Err(RunError::Failed {
                    code: status.code(),
                    stderr: tail,
                })
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| RunError::TimedOut {
                stage,
                after: self.timeout,
            })?
    }
}

/// How a Nix process ended badly.
enum RunError {
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    Failed {
        code: Option<i32>,
        stderr: Vec<String>,
    },
    TimedOut {
        stage: &'static str,
        after: Duration,
    },
}

impl RunError {
    /// A failure becomes `failed(message)`; other cases keep their kind.
    fn into_nix(self, failed: impl FnOnce(String) -> NixError) -> NixError {
        match self {
            RunError::Spawn { program, source } => NixError::Spawn { program, source },
            RunError::TimedOut { stage, after } => NixError::Timeout { stage, after },
            RunError::Failed { code, stderr } => failed(summarise(code, &stderr)),
        }
    }
}

/// The lines from the first `error:` on, or the last lines if none says so.
fn summarise(code: Option<i32>, stderr: &[String]) -> String {
    let from = stderr
        .iter()
        .position(|l| l.trim_start().starts_with("error:"))
        .unwrap_or(0);
    let text = stderr[from..]
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match (text.is_empty(), code) {
        (false, _) => text,
        (true, Some(code)) => format!("exited with status {code}"),
        (true, None) => "killed by a signal".to_owned(),
    }
}

/// Logs each line of `stderr` and returns the last few.
async fn log_lines(stage: &'static str, stderr: tokio::process::ChildStderr) -> Vec<String> {
    let mut lines = BufReader::new(stderr).lines();
    let mut tail = std::collections::VecDeque::with_capacity(STDERR_TAIL);
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "nix", stage, "{line}");
        if tail.len() == STDERR_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    tail.into()
}

/// The attribute path of a package name: split on `.`, with `_` before a
/// leading digit (Docker names may not start with `_`, nixpkgs' may not
/// start with a digit).
pub fn attribute_path(package: &str) -> Vec<String> {
    let mut path: Vec<String> = package.split('.').map(str::to_owned).collect();
    if path[0].starts_with(|c: char| c.is_ascii_digit()) {
        path[0].insert(0, '_');
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_paths() {
        assert_eq!(attribute_path("hello"), ["hello"]);
        assert_eq!(attribute_path("python3packages.numpy"), ["python3packages", "numpy"]);
        assert_eq!(attribute_path("1password"), ["_1password"]);
        assert_eq!(attribute_path("xorg.3dfx"), ["xorg", "3dfx"]);
    }

    #[test]
    fn summaries_start_at_the_error() {
        let lines: Vec<String> = [
            "building '/nix/store/x.drv'...",
            "error: builder for 'x' failed",
            "  with exit code 3",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            summarise(Some(100), &lines),
            "error: builder for 'x' failed with exit code 3"
        );
        assert_eq!(summarise(Some(1), &[]), "exited with status 1");
        assert_eq!(summarise(None, &[]), "killed by a signal");
    }
}
