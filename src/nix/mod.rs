//! Running Nix: evaluating package names against the package set, realising
//! them, and reading the runtime graph of their closure. This is the only
//! module that starts Nix. Nix's log is streamed line by line to the
//! registry's log while it runs; `NIX_TIMEOUT` bounds the whole of it (and,
//! through `--timeout`, each builder). Failures name the packages that
//! failed and the first line of Nix's error.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::layers::{GraphError, RuntimeGraph};
use crate::metrics::Metrics;
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
    /// `log`: the last lines Nix wrote.
    #[error("Nix could not evaluate {}: {error}", names(.packages))]
    Eval {
        packages: Vec<String>,
        error: String,
        log: Vec<String>,
    },
    #[error("Nix could not build {}: {error}", names(.packages))]
    Build {
        packages: Vec<String>,
        error: String,
        log: Vec<String>,
    },
    #[error("Nix took longer than NIX_TIMEOUT ({} s) to evaluate and build the packages", .after.as_secs())]
    Timeout { after: Duration },
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

/// `a, b`, or `the package set` when no package is to blame.
fn names(packages: &[String]) -> String {
    match packages {
        [] => "the package set".to_owned(),
        _ => packages.join(", "),
    }
}

/// What Nix produced for one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Realised {
    /// The store path of each requested package, in request order.
    pub outputs: Vec<String>,
    /// Each package's `meta.mainProgram`, when it has one.
    pub main_programs: Vec<Option<String>>,
    /// Their closure.
    pub graph: RuntimeGraph,
    /// How long Nix took.
    pub took: Duration,
}

/// One package as the lookup expression found it.
struct Found {
    drv: String,
    output: String,
    out: String,
    main_program: Option<String>,
}

/// Runs Nix within a deadline.
#[derive(Clone, Debug)]
pub struct Nix {
    timeout: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct Lookup {
    name: String,
    status: String,
    drv: Option<String>,
    out: Option<String>,
    output: Option<String>,
    #[serde(rename = "mainProgram")]
    main_program: Option<String>,
}

impl Nix {
    /// `timeout` bounds all Nix does for one image and each builder.
    pub fn new(timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Nix { timeout, metrics }
    }

    /// Evaluates and realises `packages` for `system` from `source` and
    /// reads the closure's runtime graph, within the timeout (Nix is killed
    /// when it runs out).
    pub async fn realise(&self, source: &NixSource, system: &str, packages: &[String]) -> Result<Realised, NixError> {
        tokio::time::timeout(self.timeout, self.realise_unbounded(source, system, packages))
            .await
            .map_err(|_| NixError::Timeout { after: self.timeout })?
    }

    async fn realise_unbounded(
        &self,
        source: &NixSource,
        system: &str,
        packages: &[String],
    ) -> Result<Realised, NixError> {
        let started = Instant::now();
        let found = self.evaluate(source, system, packages, true).await?;
        let evaluated = Instant::now();
        let outputs: Vec<String> = found.iter().map(|f| f.out.clone()).collect();
        let (graph, built) = match self.present_closure(&outputs).await {
            Some(graph) => (graph, false),
            None => {
                self.build(packages, &found).await?;
                (self.runtime_graph(&outputs).await?, true)
            }
        };
        tracing::info!(
            eval_ms = (evaluated - started).as_millis() as u64,
            built,
            realise_ms = evaluated.elapsed().as_millis() as u64,
            "nix finished"
        );
        Ok(Realised {
            outputs,
            main_programs: found.into_iter().map(|f| f.main_program).collect(),
            graph,
            took: started.elapsed(),
        })
    }

    /// Whether Nix can reach its store (`nix store ping`), within 10 s.
    pub async fn ready(&self) -> Result<(), NixError> {
        let mut cmd = Command::new("nix");
        cmd.args(["--extra-experimental-features", "nix-command", "store", "ping"]);
        let ping = self.run("store ping", "nix", cmd);
        match tokio::time::timeout(Duration::from_secs(10), ping).await {
            Ok(result) => result.map(drop).map_err(|e| {
                e.into_nix(|detail, _| NixError::Output {
                    stage: "store ping",
                    detail,
                })
            }),
            Err(_) => Err(NixError::Timeout {
                after: Duration::from_secs(10),
            }),
        }
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

    /// Looks the packages up. With `catch`, a package whose evaluation
    /// throws is looked up again alone, without catching, for Nix's message.
    async fn evaluate(
        &self,
        source: &NixSource,
        system: &str,
        packages: &[String],
        catch: bool,
    ) -> Result<Vec<Found>, NixError> {
        let requests: Vec<serde_json::Value> = packages
            .iter()
            .map(|name| serde_json::json!({ "name": name, "path": attribute_path(name) }))
            .collect();
        let mut cmd = Command::new("nix-instantiate");
        if source.kind == "flake" {
            cmd.args(["--extra-experimental-features", "nix-command flakes"]);
        }
        cmd.args(["--read-write-mode", "--eval", "--strict", "--json", "--expr", EVAL_NIX])
            .args(["--arg", "catch", if catch { "true" } else { "false" }])
            .args(["--argstr", "srcType", source.kind])
            .args(["--argstr", "srcArgs", &source.args])
            .args(["--argstr", "system", system])
            .args(["--argstr", "packages", &serde_json::Value::from(requests).to_string()]);
        let stdout = self.run("evaluation", "nix-instantiate", cmd).await.map_err(|e| {
            e.into_nix(|error, log| NixError::Eval {
                packages: if catch { vec![] } else { packages.to_vec() },
                error,
                log,
            })
        })?;
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
        let (missing, not_packages, failing) = (named("missing"), named("notPackage"), named("evalError"));
        if !missing.is_empty() {
            return Err(NixError::NotFound(missing));
        }
        if !not_packages.is_empty() {
            return Err(NixError::NotAPackage(not_packages));
        }
        if let Some(first) = failing.first() {
            let alone = Box::pin(self.evaluate(source, system, std::slice::from_ref(first), false)).await;
            let error = match alone {
                Err(NixError::Eval { error, log, .. }) => (error, log),
                _ => (
                    "its evaluation failed (the registry's log has Nix's output)".to_owned(),
                    vec![],
                ),
            };
            return Err(NixError::Eval {
                packages: failing,
                error: error.0,
                log: error.1,
            });
        }
        lookups
            .into_iter()
            .map(|l| match (l.drv, l.output, l.out) {
                (Some(drv), Some(output), Some(out)) if l.status == "ok" => Ok(Found {
                    drv,
                    output,
                    out,
                    main_program: l.main_program,
                }),
                _ => Err(NixError::Output {
                    stage: "evaluation",
                    detail: format!("bad record for {}", l.name),
                }),
            })
            .collect()
    }

    /// Builds what `found` needs, going on past failures, so that the
    /// packages left without their output are the ones to blame.
    async fn build(&self, packages: &[String], found: &[Found]) -> Result<(), NixError> {
        let targets = found.iter().map(|f| format!("{}!{}", f.drv, f.output));
        let mut cmd = Command::new("nix-store");
        cmd.args([
            "--realise",
            "--keep-going",
            "--timeout",
            &self.timeout.as_secs().max(1).to_string(),
        ])
        .args(targets);
        match self.run("build", "nix-store", cmd).await {
            Ok(_) => Ok(()),
            Err(RunError::Failed {
                code: Some(EXIT_TIMED_OUT),
                ..
            }) => Err(NixError::Timeout { after: self.timeout }),
            Err(e) => {
                let failed: Vec<String> = packages
                    .iter()
                    .zip(found)
                    .filter(|(_, f)| std::path::Path::new(&f.out).symlink_metadata().is_err())
                    .map(|(name, _)| name.clone())
                    .collect();
                Err(e.into_nix(|error, log| NixError::Build {
                    packages: failed,
                    error,
                    log,
                }))
            }
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
            e.into_nix(|detail, _| NixError::Output {
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
        self.metrics.nix_invocation(program);
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
        work.await
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
}

impl RunError {
    /// A failure becomes `failed(message)`; other cases keep their kind.
    /// A failure becomes `failed(summary, last lines)`; other cases keep their kind.
    fn into_nix(self, failed: impl FnOnce(String, Vec<String>) -> NixError) -> NixError {
        match self {
            RunError::Spawn { program, source } => NixError::Spawn { program, source },
            RunError::Failed { code, stderr } => failed(summarise(code, &stderr), stderr),
        }
    }
}

/// The first line that says `error:`, or else the last line Nix wrote.
fn summarise(code: Option<i32>, stderr: &[String]) -> String {
    let mut lines = stderr.iter().map(|l| l.trim()).filter(|l| !l.is_empty());
    let line = lines
        .clone()
        .find(|l| l.starts_with("error:"))
        .or_else(|| lines.next_back());
    match (line, code) {
        (_, None) => "Nix was killed by a signal".to_owned(),
        (Some(line), _) => line.trim_end_matches([';', ':']).to_owned(),
        (None, Some(code)) => format!("exited with status {code}"),
    }
}

/// Logs each line of `stderr`, without secrets, and returns the last few.
async fn log_lines(stage: &'static str, stderr: tokio::process::ChildStderr) -> Vec<String> {
    let mut lines = BufReader::new(stderr).lines();
    let mut tail = std::collections::VecDeque::with_capacity(STDERR_TAIL);
    while let Ok(Some(line)) = lines.next_line().await {
        let line = crate::redact::scrub(&line).into_owned();
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
            "error: builder for '/nix/store/x.drv' failed with exit code 3;",
            "       last 10 log lines:",
            "       > oops",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            summarise(Some(100), &lines),
            "error: builder for '/nix/store/x.drv' failed with exit code 3"
        );
        let plain: Vec<String> = ["warning: x", "something broke"].map(String::from).to_vec();
        assert_eq!(summarise(Some(1), &plain), "something broke");
        assert_eq!(summarise(Some(1), &[]), "exited with status 1");
        assert_eq!(summarise(None, &lines), "Nix was killed by a signal");
    }
}
