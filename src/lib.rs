//! nixery: a container registry that builds images on demand from Nix
//! packages named in the image path. See the README's "Design" section for
//! how a request flows through these modules.

pub mod archive;
pub mod digest;
pub mod image;
pub mod layers;
