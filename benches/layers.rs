//! Layering benchmark: replays an ordered sequence of image requests
//! against each strategy and prints what clients download.
//!
//! ```text
//! cargo bench --bench layers -- --graphs DIR --order FILE [--popularity FILE]
//!     [--base PREFIXES] [--budget 94] [--clients 20] [--seed 1] [--updates 5]
//! ```
//!
//! `DIR` holds one runtime graph per image (`shell+git+htop.json` for
//! `shell/git/htop`). Per strategy it prints: bytes one client with a
//! persistent layer cache downloads; the same for N clients (request i goes
//! to client i mod N, each with its own cache); bytes stored; layers per
//! image (mean, max) and budget violations; bytes downloaded again after one
//! path deep in an image is updated (it and everything that depends on it
//! get new hashes), summed over `--updates` updates of each image. Ratios divide by one layer per store path without a
//! budget, the limit. The last line is machine-readable.
//!
//! Under `cargo test` (no `--bench` argument) it runs once over the public
//! sequence in `../shared/data`, so the tests keep it working.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nixery::layers::{self, Inputs, Popularity, RuntimeGraph, Strategy};
use sha2::{Digest, Sha256};

const MIB: f64 = 1024.0 * 1024.0;

struct Args {
    graphs: PathBuf,
    order: PathBuf,
    popularity: Option<PathBuf>,
    base: Vec<String>,
    budget: usize,
    clients: usize,
    seed: u64,
    updates: u64,
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let popularity = match &args.popularity {
        Some(path) => Popularity::from_json(&std::fs::read(path)?)?,
        None => Popularity::default(),
    };
    let sequence = read_sequence(&args.order)?;
    let mut images: BTreeMap<String, RuntimeGraph> = BTreeMap::new();
    for name in &sequence {
        if !images.contains_key(name) {
            images.insert(name.clone(), read_graph(&args.graphs, name)?);
        }
    }

    let mut rows = Vec::new();
    for method in [
        Method::PerPath,
        Method::Plan(Strategy::Stable),
        Method::Plan(Strategy::Nixery),
        Method::Plan(Strategy::SizeCohort),
    ] {
        rows.push((method, measure(method, &images, &sequence, &popularity, &args)));
    }
    print_report(&rows, &args, &sequence, &images);
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    /// One layer per store path, no budget: the limit.
    PerPath,
    Plan(Strategy),
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::PerPath => "per-path",
            Method::Plan(strategy) => strategy.name(),
        }
    }

    fn layers(self, graph: &RuntimeGraph, popularity: &Popularity, args: &Args) -> Vec<Vec<String>> {
        match self {
            Method::PerPath => graph.paths.iter().map(|p| vec![p.path.clone()]).collect(),
            Method::Plan(strategy) => {
                let base = graph.roots_named(&args.base);
                let inputs = Inputs {
                    popularity,
                    budget: args.budget,
                    base: &base,
                };
                layers::plan(strategy, graph, inputs)
                    .into_iter()
                    .map(|l| l.paths)
                    .collect()
            }
        }
    }
}

#[derive(Default)]
struct Metrics {
    pull_one: u64,
    pull_many: u64,
    stored: u64,
    layers_mean: f64,
    layers_max: usize,
    violations: usize,
    repull: u64,
}

fn measure(
    method: Method,
    images: &BTreeMap<String, RuntimeGraph>,
    sequence: &[String],
    popularity: &Popularity,
    args: &Args,
) -> Metrics {
    let sizes = |graph: &RuntimeGraph| -> HashMap<String, u64> {
        graph.paths.iter().map(|p| (p.path.clone(), p.nar_size)).collect()
    };
    let mut plans: BTreeMap<&str, Vec<(Vec<String>, u64)>> = BTreeMap::new();
    let mut repull = 0;
    for (name, graph) in images {
        let size = sizes(graph);
        let plan: Vec<(Vec<String>, u64)> = method
            .layers(graph, popularity, args)
            .into_iter()
            .map(|paths| {
                let bytes = paths.iter().map(|p| size[p]).sum();
                (paths, bytes)
            })
            .collect();
        for updated in (0..args.updates).filter_map(|k| updated(graph, name, args.seed, k)) {
            let old: HashSet<&Vec<String>> = plan.iter().map(|(paths, _)| paths).collect();
            let new_size = sizes(&updated);
            repull += method
                .layers(&updated, popularity, args)
                .iter()
                .filter(|paths| !old.contains(paths))
                .map(|paths| paths.iter().map(|p| new_size[p]).sum::<u64>())
                .sum::<u64>();
        }
        plans.insert(name, plan);
    }

    let pull = |clients: usize| -> u64 {
        let mut caches: Vec<HashSet<&Vec<String>>> = vec![HashSet::new(); clients];
        let mut bytes = 0;
        for (i, name) in sequence.iter().enumerate() {
            for (paths, size) in &plans[name.as_str()] {
                if caches[i % clients].insert(paths) {
                    bytes += size;
                }
            }
        }
        bytes
    };
    let distinct: HashMap<&Vec<String>, u64> = plans.values().flatten().map(|(p, s)| (p, *s)).collect();
    let counts: Vec<usize> = plans.values().map(Vec::len).collect();
    Metrics {
        pull_one: pull(1),
        pull_many: pull(args.clients),
        stored: distinct.values().sum(),
        layers_mean: counts.iter().sum::<usize>() as f64 / counts.len() as f64,
        layers_max: counts.iter().copied().max().unwrap_or(0),
        violations: if method == Method::PerPath {
            0
        } else {
            counts.iter().filter(|&&c| c > args.budget).count()
        },
        repull,
    }
}

/// The image after an update of one path that is neither requested nor a
/// leaf, chosen by hashing the seed and the image name: it and every path
/// depending on it get new hashes, as a Nix rebuild gives them.
fn updated(graph: &RuntimeGraph, name: &str, seed: u64, k: u64) -> Option<RuntimeGraph> {
    let refs = graph.reference_indices();
    let roots: HashSet<usize> = graph.root_indices().into_iter().collect();
    let candidates: Vec<usize> = (0..graph.paths.len())
        .filter(|i| !roots.contains(i) && !refs[*i].is_empty())
        .collect();
    let pick = Sha256::digest(format!("{seed}:{k}:{name}"));
    let chosen =
        *candidates.get(u64::from_le_bytes(pick[..8].try_into().unwrap()) as usize % candidates.len().max(1))?;
    let reached = RuntimeGraph::reach(chosen, &graph.user_indices(), |_| true);
    let changed: HashSet<&str> = graph
        .paths
        .iter()
        .zip(reached)
        .filter(|(_, r)| *r)
        .map(|(p, _)| p.path.as_str())
        .collect();
    let rename = |path: &str| -> String {
        if !changed.contains(path) {
            return path.to_owned();
        }
        let (hash, rest) = path
            .trim_start_matches("/nix/store/")
            .split_once('-')
            .unwrap_or((path, ""));
        let new_hash = &hex::encode(Sha256::digest(format!("update:{seed}:{k}:{hash}")))[..32];
        format!("/nix/store/{new_hash}-{rest}")
    };
    let paths = graph
        .paths
        .iter()
        .map(|p| layers::PathInfo {
            path: rename(&p.path),
            nar_size: p.nar_size,
            references: p.references.iter().map(|r| rename(r)).collect(),
            ..Default::default()
        })
        .collect();
    RuntimeGraph::new(graph.roots.iter().map(|r| rename(r)).collect(), paths).ok()
}

fn print_report(rows: &[(Method, Metrics)], args: &Args, sequence: &[String], images: &BTreeMap<String, RuntimeGraph>) {
    let limit = &rows[0].1;
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    println!(
        "## Layering: {} requests, {} images, from {} (budget {}, base {:?})",
        sequence.len(),
        images.len(),
        args.order.display(),
        args.budget,
        args.base
    );
    println!();
    println!(
        "| strategy | 1 client MiB | / limit | {n} clients MiB | / limit | stored MiB | layers mean | max | over budget | re-download after update MiB | / limit |",
        n = args.clients
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (method, m) in rows {
        println!(
            "| {} | {:.1} | {:.4} | {:.1} | {:.4} | {:.1} | {:.1} | {} | {} | {:.1} | {:.4} |",
            method.name(),
            m.pull_one as f64 / MIB,
            ratio(m.pull_one, limit.pull_one),
            m.pull_many as f64 / MIB,
            ratio(m.pull_many, limit.pull_many),
            m.stored as f64 / MIB,
            m.layers_mean,
            m.layers_max,
            m.violations,
            m.repull as f64 / MIB,
            ratio(m.repull, limit.repull),
        );
    }
    println!();
    let summary: Vec<String> = rows
        .iter()
        .skip(1)
        .map(|(method, m)| {
            let key = method.name().replace('-', "_");
            format!(
                "{key}_ratio={:.4} {key}_ratio_{}clients={:.4} {key}_layers={:.1} {key}_repull_ratio={:.4}",
                ratio(m.pull_one, limit.pull_one),
                args.clients,
                ratio(m.pull_many, limit.pull_many),
                m.layers_mean,
                ratio(m.repull, limit.repull)
            )
        })
        .collect();
    println!("{}", summary.join(" "));
}

/// What `cargo test` runs: the public sequence, one update per image.
fn smoke_test_args() -> Args {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/debian-bookworm");
    Args {
        graphs: data.join("graphs"),
        order: data.join("sequence-public.txt"),
        popularity: Some(data.join("popularity-direct.json")),
        base: vec!["ca-certificates".into(), "netbase".into()],
        budget: layers::DEFAULT_BUDGET,
        clients: 20,
        seed: 1,
        updates: 1,
    }
}

fn read_sequence(order: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(order).with_context(|| format!("cannot read {}", order.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.trim_end_matches(".json").replace('/', "+"))
        .collect())
}

fn read_graph(dir: &Path, name: &str) -> anyhow::Result<RuntimeGraph> {
    let file = dir.join(format!("{name}.json"));
    let json = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    RuntimeGraph::from_graph_file(&json).with_context(|| format!("{} is not a runtime graph", file.display()))
}

fn parse_args() -> anyhow::Result<Args> {
    let given: Vec<String> = std::env::args().skip(1).collect();
    if !given.iter().any(|a| a == "--bench") {
        return Ok(smoke_test_args());
    }
    let mut args = Args {
        graphs: PathBuf::new(),
        order: PathBuf::new(),
        popularity: None,
        base: vec!["nss-cacert".into(), "iana-etc".into()],
        budget: layers::DEFAULT_BUDGET,
        clients: 20,
        seed: 1,
        updates: 5,
    };
    let mut given = given.into_iter().filter(|a| a != "--bench");
    while let Some(flag) = given.next() {
        let mut value = || given.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--graphs" => args.graphs = value()?.into(),
            "--order" => args.order = value()?.into(),
            "--popularity" => args.popularity = Some(value()?.into()),
            "--base" => args.base = value()?.split(',').map(str::to_owned).collect(),
            "--budget" => args.budget = value()?.parse()?,
            "--clients" => args.clients = value()?.parse()?,
            "--seed" => args.seed = value()?.parse()?,
            "--updates" => args.updates = value()?.parse()?,
            other => bail!("unknown argument {other}; see the top of benches/layers.rs"),
        }
    }
    if args.graphs.as_os_str().is_empty() || args.order.as_os_str().is_empty() {
        bail!("--graphs DIR and --order FILE are required");
    }
    if args.budget == 0 || args.clients == 0 {
        bail!("--budget and --clients are at least 1");
    }
    Ok(args)
}
