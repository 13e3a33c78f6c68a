//! The CPU architectures images are built for, and their names in Nix
//! (`x86_64-linux`) and in OCI documents (`amd64`).

/// The CPU architecture an image is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The Nix system double packages are evaluated for.
    pub fn nix_system(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux",
            Arch::Arm64 => "aarch64-linux",
        }
    }

    /// The architecture name in OCI image configs and platforms.
    pub fn oci_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = String;

    /// Reads an OCI architecture name (`amd64`, `arm64`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "amd64" => Ok(Arch::Amd64),
            "arm64" => Ok(Arch::Arm64),
            other => Err(format!("unknown architecture {other:?}: use amd64 or arm64")),
        }
    }
}
