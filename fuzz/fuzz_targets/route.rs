//! The `/v2/` route parser on any path: never panics, and a route it finds
//! puts name, kind and reference back together into the same path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixery::server::Route;

fuzz_target!(|path: &str| {
    if let Some(route) = Route::parse(path) {
        assert_eq!(format!("{}/{}/{}", route.name, route.kind, route.reference), path);
        assert!(!route.name.is_empty() || path.starts_with('/'));
    }
});
