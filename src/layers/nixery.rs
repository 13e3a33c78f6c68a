//! The original Nixery's grouping (its `layers.go`), kept faithful: a
//! dominator tree over the runtime graph where big or popular paths hang off
//! the root, one layer per child of the root, and the lowest-rated layers
//! merged until the budget holds. Unlike the original, every sort here is
//! total, so the plan depends only on the graph and the popularity data.

use std::collections::BTreeMap;

use super::{Layer, Popularity, RuntimeGraph};

/// A closure above this size (bytes) gets a layer of its own.
const BIG_CLOSURE: u64 = 100 * 1_000_000;
/// A path referred to by at least this many packages gets a layer of its own.
const POPULAR: u64 = 100;

/// A layer and its merge rating: popularity of the layer's head × the
/// summed closure sizes of its paths, how likely the layer is to be shared
/// and how much that saves.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rated {
    paths: Vec<String>,
    rating: u128,
}

/// Groups `graph` into at most `budget` layers, most valuable first.
pub fn plan(graph: &RuntimeGraph, popularity: &Popularity, budget: usize) -> Vec<Layer> {
    rated(graph, popularity, budget)
        .into_iter()
        .map(|r| Layer { paths: r.paths })
        .collect()
}

fn rated(graph: &RuntimeGraph, popularity: &Popularity, budget: usize) -> Vec<Rated> {
    assert!(budget >= 1, "a layer budget is at least 1");
    let sizes = graph.closure_sizes();
    let heads = layer_heads(graph, popularity, &sizes);

    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (member, head) in heads.into_iter().enumerate() {
        groups.entry(head).or_default().push(member);
    }
    let mut layers: Vec<Rated> = groups
        .into_iter()
        .map(|(head, members)| {
            let head_popularity = popularity.of(&graph.paths[head].path) as u128;
            let size: u128 = members.iter().map(|&m| sizes[m] as u128).sum();
            let paths = members.into_iter().map(|m| graph.paths[m].path.clone()).collect();
            Rated {
                paths,
                rating: head_popularity * size,
            }
        })
        .collect();

    layers.sort_by(|a, b| (a.rating, &a.paths).cmp(&(b.rating, &b.paths)));
    if layers.len() > budget {
        let rest = layers.split_off(layers.len() - budget + 1);
        let merged = merge(layers);
        layers = std::iter::once(merged).chain(rest).collect();
    }
    layers.sort_by(|a, b| (b.rating, &a.paths).cmp(&(a.rating, &b.paths)));
    layers
}

/// For each path, the path heading its layer: its ancestor in the dominator
/// tree that the synthetic root immediately dominates.
fn layer_heads(graph: &RuntimeGraph, popularity: &Popularity, sizes: &[u64]) -> Vec<usize> {
    let mut entry = vec![false; graph.paths.len()];
    for r in graph.root_indices() {
        entry[r] = true;
    }
    for (i, info) in graph.paths.iter().enumerate() {
        if sizes[i] > BIG_CLOSURE || popularity.of(&info.path) >= POPULAR {
            entry[i] = true;
        }
    }
    let all = vec![true; graph.paths.len()];
    graph
        .dominator_heads(&all, &entry, |_| false)
        .into_iter()
        .map(|head| head.expect("every path is included"))
        .collect()
}

fn merge(layers: Vec<Rated>) -> Rated {
    let rating = layers.iter().map(|l| l.rating).sum();
    let mut paths: Vec<String> = layers.into_iter().flat_map(|l| l.paths).collect();
    paths.sort();
    Rated { paths, rating }
}

#[cfg(test)]
mod tests {
    use super::super::DEFAULT_BUDGET;
    use super::super::graph::tests::{named_graph, shared_data};
    use super::*;

    fn graph(roots: &[&str], nodes: &[(&str, u64, &[&str])]) -> RuntimeGraph {
        named_graph(roots, nodes)
    }

    fn names(layers: &[Rated]) -> Vec<Vec<&str>> {
        super::super::graph::tests::names(layers.iter().map(|l| &l.paths))
    }

    #[test]
    fn a_chain_is_one_layer() {
        let g = graph(
            &["app"],
            &[("app", 10, &["lib"]), ("lib", 10, &["libc"]), ("libc", 10, &[])],
        );
        let layers = rated(&g, &Popularity::default(), 10);
        assert_eq!(names(&layers), vec![vec!["app", "lib", "libc"]]);
        assert_eq!(layers[0].rating, 30 + 20 + 10);
    }

    #[test]
    fn shared_dependencies_get_their_own_layer() {
        let g = graph(&["a", "b"], &[("a", 10, &["c"]), ("b", 20, &["c"]), ("c", 100, &[])]);
        let layers = rated(&g, &Popularity::default(), 10);
        assert_eq!(names(&layers), vec![vec!["b"], vec!["a"], vec!["c"]]);
        assert_eq!(layers.iter().map(|l| l.rating).collect::<Vec<_>>(), vec![120, 110, 100]);
    }

    #[test]
    fn popular_and_big_paths_hang_off_the_root() {
        let g = graph(
            &["app"],
            &[
                ("app", 1, &["glibc", "huge", "priv"]),
                ("glibc", 10, &[]),
                ("huge", 200_000_000, &[]),
                ("priv", 5, &[]),
            ],
        );
        let pop = Popularity::from_json(br#"{"glibc": 100}"#).unwrap();
        let layers = rated(&g, &pop, 10);
        // app's own layer holds the whole closure size of app: it rates highest.
        assert_eq!(names(&layers), vec![vec!["app", "priv"], vec!["huge"], vec!["glibc"]]);
        assert_eq!(
            layers.iter().map(|l| l.rating).collect::<Vec<_>>(),
            vec![200_000_021, 200_000_000, 1000]
        );
    }

    #[test]
    fn the_lowest_rated_layers_merge_to_fit_the_budget() {
        let g = graph(
            &["a", "b", "c", "d", "e"],
            &[
                ("a", 1, &[]),
                ("b", 2, &[]),
                ("c", 3, &[]),
                ("d", 4, &[]),
                ("e", 5, &[]),
            ],
        );
        let pop = Popularity::default();
        assert_eq!(
            names(&rated(&g, &pop, 5)),
            vec![vec!["e"], vec!["d"], vec!["c"], vec!["b"], vec!["a"]]
        );
        assert_eq!(
            names(&rated(&g, &pop, 3)),
            vec![vec!["a", "b", "c"], vec!["e"], vec!["d"]]
        );
        assert_eq!(names(&rated(&g, &pop, 1)), vec![vec!["a", "b", "c", "d", "e"]]);
    }

    #[test]
    fn ties_are_broken_by_contents_not_input_order() {
        let nodes: [(&str, u64, &[&str]); 3] = [("x", 7, &[]), ("y", 7, &[]), ("z", 7, &[])];
        let mut reversed = nodes;
        reversed.reverse();
        let pop = Popularity::default();
        let a = rated(&graph(&["x", "y", "z"], &nodes), &pop, 2);
        let b = rated(&graph(&["z", "y", "x"], &reversed), &pop, 2);
        assert_eq!(a, b);
        assert_eq!(names(&a), vec![vec!["x", "y"], vec!["z"]]);
    }

    /// Every path of a real closure lands in exactly one layer, within budget.
    #[test]
    fn real_closures_are_partitioned() {
        let pop = Popularity::from_json(&shared_data("debian-bookworm/popularity-direct.json")).unwrap();
        for (file, budget) in [
            ("nix2container-hello-bash-closure-graph.json", 94),
            ("snarf-hello-closure.json", 94),
            ("debian-bookworm/graphs/shell+git+htop.json", 94),
            ("debian-bookworm/graphs/emacs-nox.json", 94),
            ("debian-bookworm/graphs/emacs-nox.json", 10),
        ] {
            let g = RuntimeGraph::from_graph_file(&shared_data(file)).unwrap();
            let layers = rated(&g, &pop, budget);
            assert!(layers.len() <= budget, "{file}");
            let mut all: Vec<&String> = layers.iter().flat_map(|l| &l.paths).collect();
            all.sort();
            let expected: Vec<&String> = g.paths.iter().map(|p| &p.path).collect();
            assert_eq!(all, expected, "{file}: each path exactly once");
            assert!(
                layers.windows(2).all(|w| w[0].rating >= w[1].rating),
                "{file}: most valuable first"
            );
            assert_eq!(layers, rated(&g, &pop, budget), "{file}: deterministic");
        }
    }

    /// In a Debian image, libc6 is popular: it heads a layer that the
    /// packages using it are not part of.
    #[test]
    fn popular_library_of_a_real_closure_heads_its_layer() {
        let pop = Popularity::from_json(&shared_data("debian-bookworm/popularity-direct.json")).unwrap();
        let g = RuntimeGraph::from_graph_file(&shared_data("debian-bookworm/graphs/git.json")).unwrap();
        let layers = rated(&g, &pop, DEFAULT_BUDGET);
        let libc = layers
            .iter()
            .find(|l| l.paths.iter().any(|p| p.ends_with("-libc6-2.36-9+deb12u14")))
            .unwrap();
        assert!(libc.paths.iter().all(|p| !p.contains("-git-")), "{:?}", libc.paths);
        assert_eq!(libc.rating % 21820, 0, "rated by libc6's popularity");
        assert!(layers.len() > 10, "git's closure is spread over many layers");
    }
}
