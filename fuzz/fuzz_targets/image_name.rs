//! The image-name parser on any name and tag: never panics, and what it
//! accepts is canonical (sorted packages without duplicates, a valid name).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixery::image::ImageRequest;
use nixery::meta::MetaPackages;
use nixery::reference;

fuzz_target!(|input: &str| {
    let (name, tag) = input.split_once(':').unwrap_or((input, "latest"));
    if let Ok(request) = ImageRequest::parse(name, tag, &MetaPackages::default()) {
        assert!(reference::validate_name(name).is_ok());
        assert!(request.packages.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
        assert!(request.packages.iter().any(|p| p == "cacert"));
    }
});
