//! Using Nix: evaluating package names against the package set (looked up
//! by the attribute paths [`attributes`] makes of them), realising
//! them, and reading the runtime graph of their closure. This module says
//! what to ask Nix (the arguments of `nix-instantiate`, `nix-store` and
//! `nix`, and the lookup expression) and what its answers and failures
//! mean; it asks [`crate::programs`] to run them, which counts each run,
//! streams Nix's log line by line to the registry's log and kills Nix at
//! the deadline. `NIX_TIMEOUT` bounds the whole of an image's evaluation
//! and build (and, through `--timeout`, each builder). Failures name the
//! packages that failed and the first line of Nix's error.

pub mod attributes;

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::layers::{GraphError, RuntimeGraph};
use crate::programs::{Invocation, Program, Programs, RunError};
use crate::source::NixSource;

/// The lookup expression (see its header), called with
/// [`lookup_requests`] as its `packages`.
pub const EVAL_NIX: &str = include_str!("eval.nix");
/// How long `nix store ping` may take.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Each package as the package set describes it, in request order.
    pub packages: Vec<Package>,
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
    licenses: Vec<String>,
    homepage: Option<String>,
}

/// A requested package as the package set describes it (for SBOMs and
/// provenance).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Package {
    /// The name it was asked for by (`hello`, `python3Packages.numpy`).
    pub attribute: String,
    pub out: String,
    pub drv: String,
    /// The SPDX identifiers of its `meta.license`.
    pub licenses: Vec<String>,
    pub homepage: Option<String>,
}

/// Runs Nix within a deadline.
#[derive(Clone, Debug)]
pub struct Nix {
    timeout: Duration,
    programs: Programs,
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
    #[serde(default)]
    licenses: Vec<String>,
    homepage: Option<String>,
}

impl Nix {
    /// `timeout` bounds all Nix does for one image and each builder;
    /// `programs` runs Nix.
    pub fn new(timeout: Duration, programs: Programs) -> Self {
        Nix { timeout, programs }
    }

    /// A run of `program` for `stage`, within the image's timeout (which
    /// [`realise`](Self::realise) also applies to all of its stages at once).
    fn invocation(&self, program: Program, stage: &'static str) -> Invocation {
        Invocation::new(program, stage, self.timeout)
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
        let described = (packages.iter().zip(&found)).map(|(attribute, f)| Package {
            attribute: attribute.clone(),
            out: f.out.clone(),
            drv: f.drv.clone(),
            licenses: f.licenses.clone(),
            homepage: f.homepage.clone(),
        });
        Ok(Realised {
            outputs,
            packages: described.collect(),
            main_programs: found.into_iter().map(|f| f.main_program).collect(),
            graph,
            took: started.elapsed(),
        })
    }

    /// Whether Nix can reach its store (`nix store ping`), within 10 s.
    pub async fn ready(&self) -> Result<(), NixError> {
        let ping = Invocation::new(Program::Nix, "store ping", READY_TIMEOUT).args([
            "--extra-experimental-features",
            "nix-command",
            "store",
            "ping",
        ]);
        self.programs.run(ping).await.map(drop).map_err(|e| {
            into_nix(e, |detail, _| NixError::Output {
                stage: "store ping",
                detail,
            })
        })
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
        let mut eval = self.invocation(Program::NixInstantiate, "evaluation");
        if source.kind == "flake" {
            eval = eval.args(["--extra-experimental-features", "nix-command flakes"]);
        }
        let eval = eval
            .args(["--read-write-mode", "--eval", "--strict", "--json", "--expr", EVAL_NIX])
            .args(["--arg", "catch", if catch { "true" } else { "false" }])
            .args(["--argstr", "srcType", source.kind])
            .args(["--argstr", "srcArgs", &source.args])
            .args(["--argstr", "system", system])
            .args(["--argstr", "packages", &lookup_requests(packages)]);
        let stdout = self.run_retrying_busy(eval).await.map_err(|e| {
            into_nix(e, |error, log| NixError::Eval {
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
                    licenses: l.licenses,
                    homepage: l.homepage,
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
        let build = self
            .invocation(Program::NixStore, "build")
            .args([
                "--realise",
                "--keep-going",
                "--timeout",
                &self.timeout.as_secs().max(1).to_string(),
            ])
            .args(targets);
        match self.programs.run(build).await {
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
                Err(into_nix(e, |error, log| NixError::Build {
                    packages: failed,
                    error,
                    log,
                }))
            }
        }
    }

    async fn runtime_graph(&self, outputs: &[String]) -> Result<RuntimeGraph, NixError> {
        let query = self
            .invocation(Program::Nix, "closure query")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
                "--recursive",
            ])
            .args(outputs);
        let stdout = self.programs.run(query).await.map_err(|e| {
            into_nix(e, |detail, _| NixError::Output {
                stage: "closure query",
                detail,
            })
        })?;
        Ok(RuntimeGraph::from_path_info(outputs.to_vec(), &stdout)?)
    }
}

/// A failed run becomes `failed(summary, last lines)`; a run that could not
/// start or ran out of time keeps its kind.
/// Times an evaluation is tried when Nix says its database is busy.
const BUSY_TRIES: usize = 3;

impl Nix {
    /// Runs `invocation`, again (after a short pause) when Nix gave up on
    /// its SQLite database being locked by another Nix process: a passing
    /// condition under concurrent builds, not a failure of the packages.
    async fn run_retrying_busy(&self, invocation: Invocation) -> Result<Vec<u8>, RunError> {
        let mut tries = 1;
        loop {
            match self.programs.run(invocation.clone()).await {
                Err(RunError::Failed { stderr, .. }) if tries < BUSY_TRIES && database_busy(&stderr) => {
                    tracing::warn!("Nix found its database busy: evaluating again");
                    tokio::time::sleep(std::time::Duration::from_millis(200 * tries as u64)).await;
                    tries += 1;
                }
                result => return result,
            }
        }
    }
}

/// Whether Nix failed because its SQLite database was busy.
fn database_busy(stderr: &[String]) -> bool {
    stderr
        .iter()
        .any(|line| line.contains("error:") && line.contains("SQLite database") && line.contains("is busy"))
}

fn into_nix(error: RunError, failed: impl FnOnce(String, Vec<String>) -> NixError) -> NixError {
    match error {
        RunError::Spawn { program, source } => NixError::Spawn {
            program: program.name(),
            source,
        },
        RunError::Failed { code, stderr, .. } => failed(summarise(code, &stderr), stderr),
        RunError::TimedOut { after, .. } => NixError::Timeout { after },
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

/// The `packages` argument of [`EVAL_NIX`]: each package's name with the
/// attribute paths it may mean, as JSON.
pub fn lookup_requests(packages: &[String]) -> String {
    let requests: Vec<serde_json::Value> = packages
        .iter()
        .map(|name| serde_json::json!({ "name": name, "paths": attributes::candidates(name) }))
        .collect();
    serde_json::Value::from(requests).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_database_is_told_from_other_failures() {
        let busy = ["error: SQLite database '/nix/var/nix/db/db.sqlite' is busy".to_owned()];
        assert!(database_busy(&busy));
        let other = ["error: attribute 'nope' missing".to_owned()];
        assert!(!database_busy(&other));
        let warning = ["warning: SQLite database '/nix/var/nix/db/db.sqlite' is busy".to_owned()];
        assert!(!database_busy(&warning), "Nix retries by itself while it only warns");
    }

    #[test]
    fn each_package_is_sent_with_its_candidate_paths() {
        let requests = lookup_requests(&["g_plus_plus".to_owned(), "python3.11".to_owned()]);
        assert_eq!(
            requests,
            r#"[{"name":"g_plus_plus","paths":[["g_plus_plus"],["g++"]]},{"name":"python3.11","paths":[["python3.11"],["python3","11"]]}]"#
        );
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
