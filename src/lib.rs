//! nixery: a container registry that builds images on demand from Nix
//! packages named in the image path. See the README's "Design" section for
//! how a request flows through these modules.

pub mod activity;
pub mod app;
pub mod arch;
pub mod archive;
pub mod auth;
pub mod builder;
pub mod cache;
pub mod client;
pub mod config;
pub mod digest;
pub mod export;
pub mod fresh;
pub mod gc;
pub mod image;
pub mod layers;
pub mod learning;
pub mod leases;
pub mod listen;
pub mod meta;
pub mod metrics;
pub mod negotiate;
pub mod nix;
pub mod oci;
pub mod programs;
pub mod pulls;
pub mod redact;
pub mod reference;
pub mod sbom;
pub mod server;
pub mod signing;
pub mod source;
pub mod storage;
pub mod web;
