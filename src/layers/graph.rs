//! The runtime graph of an image's closure: every store path with its NAR
//! size and references, and which paths were asked for. Reads what `nix
//! path-info --json` prints (Nix 2.8's array and the newer object form) and
//! the `exportReferencesGraph` files used as fixtures.

use std::collections::{BTreeMap, HashMap, HashSet};

use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;

/// One store path of the closure.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PathInfo {
    pub path: String,
    #[serde(rename = "narSize")]
    pub nar_size: u64,
    /// Other store paths this one refers to; a self-reference may appear.
    #[serde(default)]
    pub references: Vec<String>,
    /// The hash of its NAR as Nix prints it (`sha256:<nix base32>`), when known.
    #[serde(rename = "narHash", default)]
    pub nar_hash: Option<String>,
    /// The derivation that built it, when known.
    #[serde(default)]
    pub deriver: Option<String>,
}

/// A closure: its store paths, sorted by path, and the requested roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeGraph {
    pub roots: Vec<String>,
    pub paths: Vec<PathInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("runtime graph is not valid JSON of a known shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("store path {referrer} refers to {missing}, which is not in the graph")]
    Dangling { referrer: String, missing: String },
    #[error("root {0} is not in the graph")]
    MissingRoot(String),
}

/// The shapes a graph arrives in.
#[derive(Deserialize)]
#[serde(untagged)]
enum GraphJson {
    /// `nix path-info --json` of Nix 2.8, or a bare `exportReferencesGraph`.
    List(Vec<PathInfo>),
    /// Nixery's runtime graph: `{"exportReferencesGraph": {"graph": [roots]}, "graph": [...]}`.
    Export {
        graph: Vec<PathInfo>,
        #[serde(rename = "exportReferencesGraph")]
        export: Option<Roots>,
    },
    /// A structured-attrs `exportReferencesGraph.closure`.
    Closure { closure: Vec<PathInfo> },
    /// `nix path-info --json` of Nix 2.19 and later: path → info (null if invalid).
    Map(BTreeMap<String, Option<ObjectInfo>>),
}

#[derive(Deserialize)]
struct Roots {
    graph: Vec<String>,
}

#[derive(Deserialize)]
struct ObjectInfo {
    #[serde(rename = "narSize")]
    nar_size: u64,
    #[serde(default)]
    references: Vec<String>,
    #[serde(rename = "narHash", default)]
    nar_hash: Option<String>,
    #[serde(default)]
    deriver: Option<String>,
}

impl RuntimeGraph {
    /// Builds a graph from path infos and its roots, checking that every
    /// reference and root is in it. Self-references are dropped.
    pub fn new(roots: Vec<String>, mut paths: Vec<PathInfo>) -> Result<Self, GraphError> {
        paths.sort_by(|a, b| a.path.cmp(&b.path));
        paths.dedup_by(|a, b| a.path == b.path);
        let known: HashSet<&str> = paths.iter().map(|p| p.path.as_str()).collect();
        for info in &paths {
            if let Some(missing) = info.references.iter().find(|r| !known.contains(r.as_str())) {
                return Err(GraphError::Dangling {
                    referrer: info.path.clone(),
                    missing: missing.clone(),
                });
            }
        }
        if let Some(root) = roots.iter().find(|r| !known.contains(r.as_str())) {
            return Err(GraphError::MissingRoot(root.clone()));
        }
        for info in &mut paths {
            let own = info.path.clone();
            info.references.retain(|r| *r != own);
            info.references.sort();
            info.references.dedup();
        }
        Ok(RuntimeGraph { roots, paths })
    }

    /// Parses `nix path-info --json --recursive` output for the given roots.
    pub fn from_path_info(roots: Vec<String>, json: &[u8]) -> Result<Self, GraphError> {
        Self::new(roots, parse(json)?.0)
    }

    /// Parses a graph file; where it does not name its roots, the paths that
    /// nothing else refers to are the roots.
    pub fn from_graph_file(json: &[u8]) -> Result<Self, GraphError> {
        let (paths, roots) = parse(json)?;
        let roots = roots.unwrap_or_else(|| unreferenced(&paths));
        Self::new(roots, paths)
    }

    /// For each path (in the order of `paths`), the positions of the paths
    /// it refers to.
    pub fn reference_indices(&self) -> Vec<Vec<usize>> {
        let index = self.index();
        self.paths
            .iter()
            .map(|p| p.references.iter().map(|r| index[r.as_str()]).collect())
            .collect()
    }

    /// The positions of the roots in `paths`.
    pub fn root_indices(&self) -> Vec<usize> {
        let index = self.index();
        self.roots.iter().map(|r| index[r.as_str()]).collect()
    }

    /// The roots whose name (the store path without `/nix/store/<hash>-`)
    /// starts with one of `prefixes`.
    pub fn roots_named(&self, prefixes: &[String]) -> Vec<String> {
        self.roots
            .iter()
            .filter(|root| {
                let name = super::package_id(root);
                prefixes.iter().any(|p| !p.is_empty() && name.starts_with(p.as_str()))
            })
            .cloned()
            .collect()
    }

    /// For each path, the positions of the paths that refer to it.
    pub fn user_indices(&self) -> Vec<Vec<usize>> {
        let mut users = vec![Vec::new(); self.paths.len()];
        for (i, references) in self.reference_indices().into_iter().enumerate() {
            for r in references {
                users[r].push(i);
            }
        }
        users
    }

    /// Which paths `start` reaches through `edges` (itself included),
    /// stepping only onto paths `allowed` admits.
    pub fn reach(start: usize, edges: &[Vec<usize>], allowed: impl Fn(usize) -> bool) -> Vec<bool> {
        let mut seen = vec![false; edges.len()];
        seen[start] = true;
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            for &next in &edges[i] {
                if !seen[next] && allowed(next) {
                    seen[next] = true;
                    stack.push(next);
                }
            }
        }
        seen
    }

    /// The dominator tree of the included paths under a synthetic root that
    /// refers to every `entry` path: for each included path, its highest
    /// ancestor below the root and below any path `alone` admits (the path
    /// itself when nothing else dominates it); `None` for paths not included.
    pub fn dominator_heads(
        &self,
        included: &[bool],
        entry: &[bool],
        alone: impl Fn(usize) -> bool,
    ) -> Vec<Option<usize>> {
        let mut g: DiGraph<(), ()> = DiGraph::with_capacity(self.paths.len() + 1, 0);
        let root = g.add_node(());
        let nodes: Vec<NodeIndex> = self.paths.iter().map(|_| g.add_node(())).collect();
        for (i, references) in self.reference_indices().into_iter().enumerate() {
            if !included[i] {
                continue;
            }
            if entry[i] {
                g.add_edge(root, nodes[i], ());
            }
            for r in references.into_iter().filter(|&r| included[r]) {
                g.add_edge(nodes[i], nodes[r], ());
            }
        }
        let doms = dominators::simple_fast(&g, root);
        (0..self.paths.len())
            .map(|i| {
                included[i].then(|| {
                    let mut head = nodes[i];
                    while let Some(parent) = doms
                        .immediate_dominator(head)
                        .filter(|&d| d != root && !alone(d.index() - 1))
                    {
                        head = parent;
                    }
                    head.index() - 1
                })
            })
            .collect()
    }

    fn index(&self) -> HashMap<&str, usize> {
        self.paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p.path.as_str(), i))
            .collect()
    }

    /// The closure size of each path (its NAR size plus that of everything it
    /// refers to, transitively), in the order of `paths`.
    pub fn closure_sizes(&self) -> Vec<u64> {
        let refs = self.reference_indices();
        let mut seen = vec![usize::MAX; self.paths.len()];
        (0..self.paths.len())
            .map(|start| {
                let mut total = 0;
                let mut stack = vec![start];
                seen[start] = start;
                while let Some(i) = stack.pop() {
                    total += self.paths[i].nar_size;
                    for &r in &refs[i] {
                        if seen[r] != start {
                            seen[r] = start;
                            stack.push(r);
                        }
                    }
                }
                total
            })
            .collect()
    }
}

fn parse(json: &[u8]) -> Result<(Vec<PathInfo>, Option<Vec<String>>), GraphError> {
    Ok(match serde_json::from_slice(json)? {
        GraphJson::List(paths) | GraphJson::Closure { closure: paths } => (paths, None),
        GraphJson::Export { graph, export } => (graph, export.map(|r| r.graph)),
        GraphJson::Map(map) => (
            map.into_iter()
                .filter_map(|(path, info)| {
                    info.map(|i| PathInfo {
                        path,
                        nar_size: i.nar_size,
                        references: i.references,
                        nar_hash: i.nar_hash,
                        deriver: i.deriver,
                    })
                })
                .collect(),
            None,
        ),
    })
}

fn unreferenced(paths: &[PathInfo]) -> Vec<String> {
    let referenced: HashSet<&str> = paths
        .iter()
        .flat_map(|p| p.references.iter().filter(move |r| **r != p.path))
        .map(String::as_str)
        .collect();
    let mut roots: Vec<String> = paths
        .iter()
        .map(|p| p.path.clone())
        .filter(|p| !referenced.contains(p.as_str()))
        .collect();
    roots.sort();
    roots
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The store path the small test graphs give `name`.
    pub(crate) fn store_path(name: &str) -> String {
        format!("/nix/store/{name:0<32}-{name}")
    }

    /// A graph of `(name, NAR size, references)` nodes, rooted at `roots`.
    pub(crate) fn named_graph(roots: &[&str], nodes: &[(&str, u64, &[&str])]) -> RuntimeGraph {
        let paths = nodes
            .iter()
            .map(|(name, size, refs)| PathInfo {
                path: store_path(name),
                nar_size: *size,
                references: refs.iter().map(|r| store_path(r)).collect(),
                ..Default::default()
            })
            .collect();
        RuntimeGraph::new(roots.iter().map(|r| store_path(r)).collect(), paths).unwrap()
    }

    /// The names in each group of store paths made by `store_path`.
    pub(crate) fn names<'a>(groups: impl IntoIterator<Item = &'a Vec<String>>) -> Vec<Vec<&'a str>> {
        groups
            .into_iter()
            .map(|paths| paths.iter().map(|p| p.rsplit_once('-').unwrap().1).collect())
            .collect()
    }

    /// `../shared/data`, where the project's closure fixtures live.
    pub(crate) fn shared_data(file: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()))
    }

    #[test]
    fn reads_nix_28_path_info() {
        let json = br#"[{"path":"/nix/store/a-hello","narHash":"sha256-x","narSize":576,
            "references":["/nix/store/b-busybox"],"deriver":"/nix/store/x.drv","registrationTime":1,"ultimate":true},
            {"path":"/nix/store/b-busybox","narSize":100,"references":["/nix/store/b-busybox"]}]"#;
        let g = RuntimeGraph::from_path_info(vec!["/nix/store/a-hello".into()], json).unwrap();
        assert_eq!(g.paths.len(), 2);
        assert!(g.paths[1].references.is_empty(), "self-reference dropped");
        assert_eq!(g.closure_sizes(), vec![676, 100]);
    }

    #[test]
    fn reads_newer_path_info_objects() {
        let json = br#"{"/nix/store/b-lib":{"narSize":5,"references":[]},
            "/nix/store/a-app":{"narSize":7,"references":["/nix/store/b-lib"]}}"#;
        let g = RuntimeGraph::from_path_info(vec!["/nix/store/a-app".into()], json).unwrap();
        assert_eq!(g.paths[0].path, "/nix/store/a-app");
        assert_eq!(g.closure_sizes(), vec![12, 5]);
    }

    #[test]
    fn rejects_dangling_references_and_roots() {
        let json = br#"[{"path":"/nix/store/a","narSize":1,"references":["/nix/store/zz"]}]"#;
        assert!(matches!(
            RuntimeGraph::from_graph_file(json),
            Err(GraphError::Dangling { .. })
        ));
        let json = br#"[{"path":"/nix/store/a","narSize":1,"references":[]}]"#;
        assert!(matches!(
            RuntimeGraph::from_path_info(vec!["/nix/store/b".into()], json),
            Err(GraphError::MissingRoot(_))
        ));
        assert!(matches!(
            RuntimeGraph::from_graph_file(b"{\"x\":1}"),
            Err(GraphError::Json(_))
        ));
    }

    /// The real closure fixtures carry Nix's own closureSize: ours must agree.
    #[test]
    fn closure_sizes_match_nix_on_real_closures() {
        for file in [
            "nix2container-hello-bash-closure-graph.json",
            "snarf-hello-closure.json",
            "debian-bookworm/graphs/git.json",
        ] {
            let json = shared_data(file);
            let g = RuntimeGraph::from_graph_file(&json).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
            let list = value
                .get("graph")
                .or(value.get("closure"))
                .unwrap_or(&value)
                .as_array()
                .unwrap()
                .clone();
            let mut expected: Vec<(String, u64)> = list
                .iter()
                .map(|n| {
                    (
                        n["path"].as_str().unwrap().to_owned(),
                        n["closureSize"].as_u64().unwrap(),
                    )
                })
                .collect();
            expected.sort();
            let ours: Vec<(String, u64)> = g.paths.iter().map(|p| p.path.clone()).zip(g.closure_sizes()).collect();
            assert_eq!(ours, expected, "{file}");
        }
    }

    #[test]
    fn roots_of_a_bare_list_are_the_unreferenced_paths() {
        let g = RuntimeGraph::from_graph_file(&shared_data("nix2container-hello-bash-closure-graph.json")).unwrap();
        assert_eq!(
            g.roots,
            vec![
                "/nix/store/2g13canlyc7b44mbr5fh62pdyvv6xrjl-hello-2.10",
                "/nix/store/pbfraw351mksnkp2ni9c4rkc9cpp89iv-bash-5.1-p12"
            ]
        );
        let g = RuntimeGraph::from_graph_file(&shared_data("debian-bookworm/graphs/git.json")).unwrap();
        assert_eq!(g.roots.len(), 3);
    }
}
