//! The default grouping: layers that come out the same in every image that
//! holds their paths, so that a client pulling its tenth image downloads
//! little that it has not already got, with fewer layers than one per path.
//!
//! A layer is only reused if another image makes exactly the same one, so
//! paths share a layer only when they are likely to travel together:
//!
//! 1. **Base.** The closure of the packages every image gets (`cacert`,
//!    `iana-etc`) is in every image: one layer, big paths apart.
//! 2. **Units.** A dominator tree over the rest, under a root that points at
//!    the requested packages and at every *anchor*: a path that is big
//!    (≥ 2 MiB) or popular (≥ 15 referrers). An anchor and the small,
//!    unpopular paths only it leads to form a unit; such paths come with
//!    their anchor in whatever image they appear. A very big anchor
//!    (≥ 32 MiB) stays alone and what it leads to forms units below it.
//! 3. **Families.** Small units (< 768 KiB), most popular first, each take
//!    the small units they depend on through small units alone: a library
//!    and its less popular helpers.
//! 4. **Apps.** Families that are still small (< 640 KiB) and not very
//!    popular (< 180 referrers) join the other such families of the
//!    requested package they belong to (the most popular one that needs
//!    them): an application's odds and ends.
//! 5. **Budget.** Over budget, the small groups that only one requested
//!    package needs are merged, that package's at a time (the one with the
//!    most such groups first), with a size limit that doubles until the
//!    plan fits; last, the smallest layers merge.
//!
//! Big paths stay alone, so a changed path never drags big unchanged bytes
//! into a new layer. The thresholds were chosen on the Debian closures in
//! `../shared/data` and checked on request mixes they were not tuned to;
//! `scripts/bench-layers.sh` measures them.

use std::collections::{BTreeMap, BTreeSet};

use super::{Inputs, Layer, RuntimeGraph, layers_of, package_id, size_of};

const MIB: u64 = 1024 * 1024;
/// Base paths at least this big get a layer of their own.
const BASE_ALONE: u64 = 4 * MIB;
/// Paths at least this big head a unit.
const ANCHOR_SIZE: u64 = 2 * MIB;
/// Paths with at least this many referrers head a unit.
const ANCHOR_POPULARITY: u64 = 15;
/// Anchors at least this big form a unit alone: what they lead to may
/// differ from image to image, and must not make them differ too.
const ANCHOR_ALONE: u64 = 32 * MIB;
/// Units smaller than this form families.
const FAMILY_SIZE: u64 = 768 * 1024;
/// Families smaller than this, and less popular than `APP_POPULARITY`,
/// join their application's group.
const APP_SIZE: u64 = 640 * 1024;
const APP_POPULARITY: u64 = 180;
/// The first size limit of the groups merged to fit the budget.
const REGION_SIZE: u64 = MIB;

pub fn plan(graph: &RuntimeGraph, inputs: Inputs<'_>) -> Vec<Layer> {
    let closure = Closure::new(graph, inputs);
    let base = closure.base_groups();
    let mut groups = closure.groups();
    let budget_left = inputs.budget.saturating_sub(base.len()).max(1);
    closure.merge_regions(&mut groups, budget_left);
    merge_smallest(graph, &mut groups, budget_left);
    groups.sort_by_key(|g| (std::cmp::Reverse(size_of(graph, g)), g.clone()));
    // Only a budget smaller than the base's layers merges base layers.
    let mut all: Vec<Vec<usize>> = base.into_iter().chain(groups).collect();
    merge_smallest(graph, &mut all, inputs.budget);
    layers_of(graph, all)
}

/// An image's closure, split into the base and the rest, with what the
/// grouping steps need to know about each path.
struct Closure<'a> {
    graph: &'a RuntimeGraph,
    refs: Vec<Vec<usize>>,
    popularity: Vec<u64>,
    in_base: Vec<bool>,
    /// Requested packages outside the base.
    tops: Vec<usize>,
    /// For each path, the tops (positions in `tops`) whose closure holds it.
    needed_by: Vec<BTreeSet<usize>>,
}

impl<'a> Closure<'a> {
    fn new(graph: &'a RuntimeGraph, inputs: Inputs<'_>) -> Self {
        let refs = graph.reference_indices();
        let roots = graph.root_indices();
        let mut in_base = vec![false; graph.paths.len()];
        for &root in roots.iter().filter(|&&r| inputs.base.contains(&graph.paths[r].path)) {
            let reached = RuntimeGraph::reach(root, &refs, |_| true);
            in_base.iter_mut().zip(reached).for_each(|(b, r)| *b |= r);
        }
        let tops: Vec<usize> = roots.into_iter().filter(|&r| !in_base[r]).collect();
        let mut needed_by = vec![BTreeSet::new(); graph.paths.len()];
        for (t, &top) in tops.iter().enumerate() {
            let reached = RuntimeGraph::reach(top, &refs, |i| !in_base[i]);
            for (i, _) in reached.iter().enumerate().filter(|(_, r)| **r) {
                needed_by[i].insert(t);
            }
        }
        Closure {
            graph,
            popularity: graph.paths.iter().map(|p| inputs.popularity.of(&p.path)).collect(),
            refs,
            in_base,
            tops,
            needed_by,
        }
    }

    fn size(&self, i: usize) -> u64 {
        self.graph.paths[i].nar_size
    }

    /// Step 1: big base paths alone, the others together.
    fn base_groups(&self) -> Vec<Vec<usize>> {
        let base = (0..self.graph.paths.len()).filter(|&i| self.in_base[i]);
        let (alone, together): (Vec<usize>, Vec<usize>) = base.partition(|&i| self.size(i) >= BASE_ALONE);
        let mut groups: Vec<Vec<usize>> = alone.into_iter().map(|i| vec![i]).collect();
        if !together.is_empty() {
            groups.push(together);
        }
        groups
    }

    /// Steps 2 to 4: the groups of everything outside the base.
    fn groups(&self) -> Vec<Vec<usize>> {
        let units = self.units();
        let unit_size: BTreeMap<usize, u64> = units
            .iter()
            .map(|(&head, members)| (head, size_of(self.graph, members)))
            .collect();
        let mut groups = Vec::new();
        let mut apps: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (head, unit_heads) in self.families(&units, &unit_size) {
            let members: Vec<usize> = unit_heads.iter().flat_map(|h| units[h].iter().copied()).collect();
            let small = size_of(self.graph, &members) < APP_SIZE && self.popularity[head] < APP_POPULARITY;
            match self.application(head).filter(|_| small) {
                Some(top) => apps.entry(top).or_default().extend(members),
                None => groups.push(members),
            }
        }
        for (head, members) in units {
            if unit_size[&head] >= FAMILY_SIZE {
                groups.push(members);
            }
        }
        groups.extend(apps.into_values());
        groups
    }

    /// Step 2: unit head → the paths of its unit, for paths outside the base.
    fn units(&self) -> BTreeMap<usize, Vec<usize>> {
        let n = self.graph.paths.len();
        let rest: Vec<bool> = self.in_base.iter().map(|b| !b).collect();
        let mut referred = vec![false; n];
        for (i, references) in self.refs.iter().enumerate().filter(|(i, _)| rest[*i]) {
            for &r in references {
                referred[r] |= i != r;
            }
        }
        let entry: Vec<bool> = (0..n)
            .map(|i| {
                rest[i]
                    && (self.tops.contains(&i)
                        || !referred[i]
                        || self.size(i) >= ANCHOR_SIZE
                        || self.popularity[i] >= ANCHOR_POPULARITY)
            })
            .collect();
        let mut units: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        let big = |i: usize| self.size(i) >= ANCHOR_ALONE;
        for (i, head) in self.graph.dominator_heads(&rest, &entry, big).into_iter().enumerate() {
            if let Some(head) = head {
                units.entry(head).or_default().push(i);
            }
        }
        units
    }

    /// Step 3: family head → the heads of the small units in the family.
    fn families(
        &self,
        units: &BTreeMap<usize, Vec<usize>>,
        unit_size: &BTreeMap<usize, u64>,
    ) -> BTreeMap<usize, Vec<usize>> {
        let mut unit_of = vec![usize::MAX; self.graph.paths.len()];
        for (&head, members) in units {
            members.iter().for_each(|&m| unit_of[m] = head);
        }
        let is_small = |head: usize| unit_size.get(&head).is_some_and(|&s| s < FAMILY_SIZE);
        let mut order: Vec<usize> = units.keys().copied().filter(|&h| is_small(h)).collect();
        order.sort_by_key(|&h| {
            (
                std::cmp::Reverse(self.popularity[h]),
                std::cmp::Reverse(unit_size[&h]),
                package_id(&self.graph.paths[h].path),
                h,
            )
        });
        let mut family_of: BTreeMap<usize, usize> = BTreeMap::new();
        for head in order {
            if family_of.contains_key(&head) {
                continue;
            }
            let reached = RuntimeGraph::reach(head, &self.refs, |i| {
                !self.in_base[i] && unit_of[i] != usize::MAX && is_small(unit_of[i])
            });
            for (i, _) in reached.iter().enumerate().filter(|(_, r)| **r) {
                family_of.entry(unit_of[i]).or_insert(head);
            }
        }
        let mut families: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (unit, family) in family_of {
            families.entry(family).or_default().push(unit);
        }
        families
    }

    /// Step 4: the most popular requested package that needs `path`.
    fn application(&self, path: usize) -> Option<usize> {
        self.needed_by[path]
            .iter()
            .map(|&t| self.tops[t])
            .max_by_key(|&t| (self.popularity[t], package_id(&self.graph.paths[t].path)))
    }

    /// Step 5: merges what only one requested package needs until the
    /// groups fit `budget` or nothing more can be merged that way.
    fn merge_regions(&self, groups: &mut Vec<Vec<usize>>, budget: usize) {
        let total: u64 = groups.iter().map(|g| size_of(self.graph, g)).sum();
        let mut limit = REGION_SIZE;
        while groups.len() > budget && limit <= total.saturating_mul(2) {
            let mut done = BTreeSet::new();
            while groups.len() > budget {
                let mut exclusive: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                for (g, members) in groups.iter().enumerate() {
                    let needed: BTreeSet<usize> = members
                        .iter()
                        .flat_map(|&m| self.needed_by[m].iter().copied())
                        .collect();
                    if needed.len() == 1 && size_of(self.graph, members) < limit {
                        exclusive
                            .entry(self.tops[*needed.first().unwrap()])
                            .or_default()
                            .push(g);
                    }
                }
                let chosen = exclusive
                    .iter()
                    .filter(|(top, gs)| gs.len() > 1 && !done.contains(*top))
                    .max_by_key(|(top, gs)| (gs.len(), package_id(&self.graph.paths[**top].path), **top));
                let Some((&top, merged)) = chosen else { break };
                done.insert(top);
                let merged: BTreeSet<usize> = merged.iter().copied().collect();
                let mut joined = Vec::new();
                let mut kept = Vec::new();
                for (g, members) in groups.drain(..).enumerate() {
                    if merged.contains(&g) {
                        joined.extend(members);
                    } else {
                        kept.push(members);
                    }
                }
                kept.push(joined);
                *groups = kept;
            }
            limit = limit.saturating_mul(2);
        }
    }
}

/// The last resort over budget: the two smallest groups merge, repeatedly.
fn merge_smallest(graph: &RuntimeGraph, groups: &mut Vec<Vec<usize>>, budget: usize) {
    groups.iter_mut().for_each(|g| g.sort());
    while groups.len() > budget {
        groups.sort_by_key(|g| (size_of(graph, g), g.clone()));
        let smallest = groups.remove(0);
        groups[0].extend(smallest);
        groups[0].sort();
    }
}

#[cfg(test)]
mod tests {
    use super::super::Popularity;
    use super::super::graph::tests::{named_graph, store_path};
    use super::*;

    const K: u64 = 1024;

    fn graph(roots: &[&str], nodes: &[(&str, u64, &[&str])]) -> RuntimeGraph {
        named_graph(roots, nodes)
    }

    fn names(layers: &[Layer]) -> Vec<Vec<&str>> {
        let mut names = super::super::graph::tests::names(layers.iter().map(|l| &l.paths));
        names.sort();
        names
    }

    fn plan_of(g: &RuntimeGraph, pop: &Popularity, budget: usize, base: &[&str]) -> Vec<Layer> {
        let base: Vec<String> = base.iter().map(|n| store_path(n)).collect();
        plan(
            g,
            Inputs {
                popularity: pop,
                budget,
                base: &base,
            },
        )
    }

    /// Two apps share a popular library; each keeps its private helper.
    fn two_apps() -> RuntimeGraph {
        graph(
            &["app1", "app2", "cacert"],
            &[
                ("app1", 3 * MIB, &["helper1", "libz", "libc"]),
                ("helper1", 10 * K, &[]),
                ("app2", 3 * MIB, &["helper2", "libz", "libc"]),
                ("helper2", 10 * K, &[]),
                ("libz", 100 * K, &["libc"]),
                ("libc", 8 * MIB, &[]),
                ("cacert", 200 * K, &["certdata"]),
                ("certdata", 10 * K, &[]),
            ],
        )
    }

    #[test]
    fn base_units_and_popular_libraries() {
        let pop = Popularity::from_json(br#"{"libz": 500, "libc": 20000}"#).unwrap();
        let layers = plan_of(&two_apps(), &pop, 94, &["cacert"]);
        assert_eq!(
            names(&layers),
            vec![
                vec!["app1", "helper1"],
                vec!["app2", "helper2"],
                vec!["cacert", "certdata"],
                vec!["libc"],
                vec!["libz"],
            ]
        );
    }

    #[test]
    fn layers_do_not_depend_on_the_other_packages_of_the_image() {
        let pop = Popularity::from_json(br#"{"libz": 500, "libc": 20000}"#).unwrap();
        let both = plan_of(&two_apps(), &pop, 94, &["cacert"]);
        let alone = graph(
            &["app1", "cacert"],
            &[
                ("app1", 3 * MIB, &["helper1", "libz", "libc"]),
                ("helper1", 10 * K, &[]),
                ("libz", 100 * K, &["libc"]),
                ("libc", 8 * MIB, &[]),
                ("cacert", 200 * K, &["certdata"]),
                ("certdata", 10 * K, &[]),
            ],
        );
        let alone = plan_of(&alone, &pop, 94, &["cacert"]);
        assert!(alone.iter().all(|l| both.contains(l)), "every layer of app1 is reused");
    }

    #[test]
    fn small_unpopular_families_join_their_application() {
        let g = graph(
            &["app"],
            &[
                ("app", 3 * MIB, &["liba", "libb"]),
                ("liba", 100 * K, &["data"]),
                ("libb", 100 * K, &["data"]),
                ("data", 100 * K, &[]),
            ],
        );
        let pop = Popularity::from_json(br#"{"liba": 20, "libb": 30, "data": 40}"#).unwrap();
        assert_eq!(
            names(&plan_of(&g, &pop, 94, &[])),
            vec![vec!["app"], vec!["data", "liba", "libb"]]
        );
        let very = Popularity::from_json(br#"{"liba": 20, "libb": 300, "data": 40}"#).unwrap();
        assert_eq!(
            names(&plan_of(&g, &very, 94, &[])),
            vec![vec!["app"], vec!["data", "libb"], vec!["liba"]],
            "libb, very popular, keeps its family apart; data is its helper"
        );
    }

    #[test]
    fn over_budget_an_applications_own_groups_merge_first() {
        let mut nodes: Vec<(String, u64, Vec<String>)> = vec![("big".into(), 3 * MIB, vec![])];
        let mut app_refs = vec!["big".to_owned()];
        for i in 0..6 {
            let name = format!("lib{i}");
            app_refs.push(name.clone());
            nodes.push((name, 100 * K, vec![]));
        }
        nodes.push(("app".into(), 3 * MIB, app_refs));
        let nodes: Vec<(&str, u64, Vec<&str>)> = nodes
            .iter()
            .map(|(n, s, r)| (n.as_str(), *s, r.iter().map(String::as_str).collect()))
            .collect();
        let nodes: Vec<(&str, u64, &[&str])> = nodes.iter().map(|(n, s, r)| (*n, *s, r.as_slice())).collect();
        let g = graph(&["app"], &nodes);
        let pop =
            Popularity::from_json(br#"{"lib0":200,"lib1":200,"lib2":200,"lib3":200,"lib4":200,"lib5":200,"big":50}"#)
                .unwrap();
        assert_eq!(plan_of(&g, &pop, 94, &[]).len(), 8, "popular libraries stay apart");
        let fitted = plan_of(&g, &pop, 3, &[]);
        assert_eq!(
            names(&fitted),
            vec![
                vec!["app"],
                vec!["big"],
                vec!["lib0", "lib1", "lib2", "lib3", "lib4", "lib5"]
            ]
        );
    }
}
