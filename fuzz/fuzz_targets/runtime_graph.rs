//! The runtime-graph parser on any bytes, and the layering of any graph it
//! accepts: never panics, and every store path lands in exactly one layer.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use nixery::layers::{self, Popularity, RuntimeGraph, Strategy};

fuzz_target!(|bytes: &[u8]| {
    let Ok(graph) = RuntimeGraph::from_graph_file(bytes) else { return };
    let popularity = Popularity::default();
    for strategy in [Strategy::Stable, Strategy::Nixery] {
        let inputs = layers::Inputs {
            popularity: &popularity,
            budget: 8,
            base: &[],
        };
        let plan = layers::plan(strategy, &graph, inputs);
        let placed: Vec<&String> = plan.iter().flat_map(|l| &l.paths).collect();
        let unique: HashSet<&&String> = placed.iter().collect();
        assert_eq!(placed.len(), unique.len(), "a path in two layers");
        assert_eq!(unique.len(), graph.paths.len(), "a path in no layer");
    }
});
