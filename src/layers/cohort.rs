//! The size-cohort grouping of nixpkgs' auto-layer (`auto-layer.py`, which
//! dockerTools' `streamLayeredImage` uses), for comparison: the largest
//! store paths, one at a time, become "primaries"; every path is labelled
//! with the primaries that need it and that no other of its primaries
//! already implies; paths with the same label share a layer. Primaries are
//! added while the number of labels fits the budget.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::{Layer, RuntimeGraph, layers_of, size_of};

type Label = BTreeSet<usize>;

pub fn plan(graph: &RuntimeGraph, budget: usize) -> Vec<Layer> {
    let refs = graph.reference_indices();
    let users = graph.user_indices();
    let mut by_size: Vec<usize> = (0..graph.paths.len()).collect();
    by_size.sort_by_key(|&i| (graph.paths[i].nar_size, i));

    let mut labels: Vec<Label> = vec![Label::new(); graph.paths.len()];
    while let Some(primary) = by_size.pop() {
        let deps = RuntimeGraph::reach(primary, &refs, |_| true);
        let dependents = RuntimeGraph::reach(primary, &users, |_| true);
        let mut next = labels.clone();
        next[primary] = Label::from([primary]);
        for d in (0..deps.len()).filter(|&d| deps[d] && d != primary) {
            let mut label: Label = next[d].iter().copied().filter(|&l| !dependents[l]).collect();
            if !label.iter().any(|&l| deps[l] && l != primary) {
                label.insert(primary);
            }
            next[d] = label;
        }
        if next.iter().collect::<HashSet<_>>().len() > budget {
            break;
        }
        labels = next;
    }

    let mut groups: BTreeMap<&Label, Vec<usize>> = BTreeMap::new();
    for (i, label) in labels.iter().enumerate() {
        groups.entry(label).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
    groups.sort_by_key(|members| std::cmp::Reverse(size_of(graph, members)));
    layers_of(graph, groups)
}

#[cfg(test)]
mod tests {
    use super::super::graph::tests::named_graph;
    use super::*;

    fn graph(nodes: &[(&str, u64, &[&str])]) -> RuntimeGraph {
        named_graph(&[nodes[0].0], nodes)
    }

    fn names(layers: &[Layer]) -> Vec<Vec<&str>> {
        super::super::graph::tests::names(layers.iter().map(|l| &l.paths))
    }

    #[test]
    fn large_paths_lead_and_shared_small_ones_follow_their_primaries() {
        // app needs big and small; big needs small too: small is implied by big.
        let g = graph(&[
            ("app", 10, &["big", "small", "tiny"]),
            ("big", 1000, &["small"]),
            ("small", 5, &[]),
            ("tiny", 1, &[]),
        ]);
        assert_eq!(
            names(&plan(&g, 10)),
            vec![vec!["big"], vec!["app"], vec!["small"], vec!["tiny"]]
        );
        assert_eq!(names(&plan(&g, 2)), vec![vec!["big", "small"], vec!["app", "tiny"]]);
        assert_eq!(plan(&g, 1).len(), 1);
    }
}
