//! The popularity parser on any bytes: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixery::layers::Popularity;

fuzz_target!(|bytes: &[u8]| {
    let _ = Popularity::from_json(bytes);
});
