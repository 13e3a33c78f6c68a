//! Grouping an image's closure into layers: the runtime graph, popularity
//! data, and three strategies that each partition the closure exactly and
//! keep within the layer budget:
//!
//! - `stable` (the default, `stable.rs`): layers that come out the same in
//!   every image that holds their paths, so clients download each byte once;
//! - `nixery` (`nixery.rs`): the original Nixery's dominator/popularity grouping;
//! - `size-cohort` (`cohort.rs`): nixpkgs' auto-layer idea, for comparison.
//!
//! `nixery layers` prints what a strategy makes of a graph file; the
//! registry runs the same code for every image.

mod cohort;
mod graph;
mod nixery;
mod popularity;
mod stable;

use std::fmt;
use std::str::FromStr;

pub use graph::{GraphError, PathInfo, RuntimeGraph};
pub use popularity::{Popularity, PopularityError, package_id};

/// Layers for store paths; one more holds the root filesystem. Docker's
/// limit is about 125, and images built `FROM` ours need room.
pub const DEFAULT_BUDGET: usize = 94;

/// A group of store paths packed into one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Sorted store paths.
    pub paths: Vec<String>,
}

/// How to group a closure into layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    #[default]
    Stable,
    Nixery,
    SizeCohort,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::Stable, Strategy::Nixery, Strategy::SizeCohort];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Stable => "stable",
            Strategy::Nixery => "nixery",
            Strategy::SizeCohort => "size-cohort",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|strategy| strategy.name() == s)
            .ok_or_else(|| format!("unknown layering strategy {s:?}: use stable, nixery or size-cohort"))
    }
}

/// What a plan is made from besides the graph.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub popularity: &'a Popularity,
    /// The most layers the plan may have (at least 1).
    pub budget: usize,
    /// Roots that every image of this registry has (the always-added
    /// packages); `stable` keeps their closure together.
    pub base: &'a [String],
}

/// Groups `graph` into at most `inputs.budget` layers, in manifest order.
pub fn plan(strategy: Strategy, graph: &RuntimeGraph, inputs: Inputs<'_>) -> Vec<Layer> {
    assert!(inputs.budget >= 1, "a layer budget is at least 1");
    match strategy {
        Strategy::Stable => stable::plan(graph, inputs),
        Strategy::Nixery => nixery::plan(graph, inputs.popularity, inputs.budget),
        Strategy::SizeCohort => cohort::plan(graph, inputs.budget),
    }
}

/// Bytes of the store paths at these positions.
fn size_of(graph: &RuntimeGraph, members: &[usize]) -> u64 {
    members.iter().map(|&m| graph.paths[m].nar_size).sum()
}

/// Layers from groups of path positions: each group's paths sorted.
fn layers_of(graph: &RuntimeGraph, groups: Vec<Vec<usize>>) -> Vec<Layer> {
    groups
        .into_iter()
        .map(|members| {
            let mut paths: Vec<String> = members.into_iter().map(|m| graph.paths[m].path.clone()).collect();
            paths.sort();
            Layer { paths }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::graph::tests::shared_data;
    use super::*;

    /// Every strategy partitions real closures exactly, within budget, and
    /// gives the same plan twice.
    #[test]
    fn every_strategy_partitions_real_closures_within_budget() {
        let pop = Popularity::from_json(&shared_data("debian-bookworm/popularity-direct.json")).unwrap();
        let base = |g: &RuntimeGraph| -> Vec<String> {
            g.roots
                .iter()
                .filter(|r| r.contains("-ca-certificates-") || r.contains("-netbase-"))
                .cloned()
                .collect()
        };
        for (file, budget) in [
            ("nix2container-hello-bash-closure-graph.json", 94),
            ("snarf-hello-closure.json", 94),
            ("debian-bookworm/graphs/shell+git+htop.json", 94),
            ("debian-bookworm/graphs/python3+python3-numpy+python3-scipy.json", 94),
            ("debian-bookworm/graphs/python3+python3-numpy+python3-scipy.json", 20),
            ("debian-bookworm/graphs/emacs-nox.json", 3),
            ("debian-bookworm/graphs/emacs-nox.json", 1),
        ] {
            let g = RuntimeGraph::from_graph_file(&shared_data(file)).unwrap();
            let base = base(&g);
            let inputs = Inputs {
                popularity: &pop,
                budget,
                base: &base,
            };
            for strategy in Strategy::ALL {
                let layers = plan(strategy, &g, inputs);
                assert!(layers.len() <= budget, "{strategy} {file}: {} layers", layers.len());
                assert!(layers.iter().all(|l| !l.paths.is_empty()), "{strategy} {file}");
                let mut all: Vec<&String> = layers.iter().flat_map(|l| &l.paths).collect();
                all.sort();
                let expected: Vec<&String> = g.paths.iter().map(|p| &p.path).collect();
                assert_eq!(all, expected, "{strategy} {file}: each path exactly once");
                assert_eq!(layers, plan(strategy, &g, inputs), "{strategy} {file}: deterministic");
            }
        }
    }

    /// On the public Debian sequence (one client with a persistent cache),
    /// `stable` downloads less than both other strategies, with no more
    /// layers per image than the original.
    #[test]
    fn stable_beats_the_others_on_the_public_sequence() {
        let pop = Popularity::from_json(&shared_data("debian-bookworm/popularity-direct.json")).unwrap();
        let order = String::from_utf8(shared_data("debian-bookworm/sequence-public.txt")).unwrap();
        let requests: Vec<String> = order
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.trim().replace('/', "+"))
            .collect();
        type Sized = Vec<(Vec<String>, u64)>;
        let mut plans: std::collections::HashMap<(Strategy, &str), Sized> = Default::default();
        for name in &requests {
            let g =
                RuntimeGraph::from_graph_file(&shared_data(&format!("debian-bookworm/graphs/{name}.json"))).unwrap();
            let base: Vec<String> = g
                .roots
                .iter()
                .filter(|r| r.contains("-ca-certificates-") || r.contains("-netbase-"))
                .cloned()
                .collect();
            let size: std::collections::HashMap<&str, u64> =
                g.paths.iter().map(|p| (p.path.as_str(), p.nar_size)).collect();
            for strategy in Strategy::ALL {
                let inputs = Inputs {
                    popularity: &pop,
                    budget: DEFAULT_BUDGET,
                    base: &base,
                };
                plans.entry((strategy, name)).or_insert_with(|| {
                    plan(strategy, &g, inputs)
                        .into_iter()
                        .map(|l| {
                            let bytes = l.paths.iter().map(|p| size[p.as_str()]).sum();
                            (l.paths, bytes)
                        })
                        .collect()
                });
            }
        }
        let pulled = |strategy: Strategy| -> u64 {
            let mut cache = std::collections::HashSet::new();
            let layers = requests.iter().flat_map(|name| &plans[&(strategy, name.as_str())]);
            layers
                .filter(|(paths, _)| cache.insert(paths.clone()))
                .map(|(_, bytes)| bytes)
                .sum()
        };
        let mean_layers = |strategy: Strategy| -> f64 {
            let counts: Vec<usize> = requests.iter().map(|n| plans[&(strategy, n.as_str())].len()).collect();
            counts.iter().sum::<usize>() as f64 / counts.len() as f64
        };
        let stable = pulled(Strategy::Stable);
        assert!(stable < pulled(Strategy::Nixery), "stable {stable} vs nixery");
        assert!(stable < pulled(Strategy::SizeCohort), "stable {stable} vs size-cohort");
        assert!(mean_layers(Strategy::Stable) <= mean_layers(Strategy::Nixery));
    }

    #[test]
    fn strategies_are_named() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.name().parse::<Strategy>(), Ok(strategy));
        }
        assert!("auto".parse::<Strategy>().unwrap_err().contains("stable"));
    }
}
