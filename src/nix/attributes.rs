//! How a package name of an image becomes the attribute paths looked up in
//! the package set, in the order they are tried: the whole name as one
//! attribute (Debian's `python3.11`), the same with [`PLUS`] read as `+`
//! (Debian's `g++`, which the reference grammar cannot name), then the name
//! split on `.` (nixpkgs' `python3packages.numpy`) with `_` before a leading
//! digit (`7zip` → `_7zip`). The paths are data for the lookup expression
//! (`eval.nix`), never Nix syntax.

/// How an image name spells `+`: the reference grammar has no `+`, and
/// Debian names have no `_`, so `g_plus_plus` can only mean `g++`.
pub const PLUS: &str = "_plus";

/// The image name of an attribute whose name has `+` (`g++` → `g_plus_plus`).
pub fn spelled(attribute: &str) -> String {
    attribute.replace('+', PLUS)
}

/// The attribute paths `package` may name, first to try first, each once.
pub fn candidates(package: &str) -> Vec<Vec<String>> {
    let whole = vec![package.to_owned()];
    let plus = vec![package.replace(PLUS, "+")];
    let mut paths: Vec<Vec<String>> = Vec::with_capacity(3);
    for path in [whole, plus, split(package)] {
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    paths
}

/// The name split on `.`, with `_` before a leading digit (Docker names may
/// not start with `_`, nixpkgs' may not start with a digit).
fn split(package: &str) -> Vec<String> {
    let mut path: Vec<String> = package.split('.').map(str::to_owned).collect();
    if path[0].starts_with(|c: char| c.is_ascii_digit()) {
        path[0].insert(0, '_');
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::validate_name;

    #[test]
    fn a_plain_name_is_one_attribute() {
        assert_eq!(candidates("hello"), [["hello"]]);
        assert_eq!(candidates("emacs-nox"), [["emacs-nox"]]);
    }

    #[test]
    fn the_whole_name_comes_before_its_split() {
        assert_eq!(candidates("python3.11"), [vec!["python3.11"], vec!["python3", "11"]]);
        assert_eq!(
            candidates("python3packages.numpy"),
            [vec!["python3packages.numpy"], vec!["python3packages", "numpy"]]
        );
        assert_eq!(candidates("xorg.3dfx"), [vec!["xorg.3dfx"], vec!["xorg", "3dfx"]]);
    }

    #[test]
    fn a_leading_digit_is_tried_as_is_then_after_an_underscore() {
        assert_eq!(candidates("7zip"), [["7zip"], ["_7zip"]]);
        assert_eq!(candidates("0ad.data"), [vec!["0ad.data"], vec!["_0ad", "data"]]);
    }

    #[test]
    fn plus_is_read_after_the_name_as_given() {
        assert_eq!(candidates("g_plus_plus"), [["g_plus_plus"], ["g++"]]);
        assert_eq!(
            candidates("libstdc_plus_plus-12-dev"),
            [["libstdc_plus_plus-12-dev"], ["libstdc++-12-dev"]]
        );
        assert_eq!(
            candidates("libsigc_plus_plus-2.0-0v5"),
            [
                vec!["libsigc_plus_plus-2.0-0v5"],
                vec!["libsigc++-2.0-0v5"],
                vec!["libsigc_plus_plus-2", "0-0v5"]
            ]
        );
        assert_eq!(candidates("aplus-fsf"), [["aplus-fsf"]], "plus without _ is a word");
    }

    #[test]
    fn debian_names_with_plus_are_spelled_in_the_grammar_and_back() {
        for name in [
            "g++",
            "libstdc++6",
            "libstdc++-12-dev",
            "dvd+rw-tools",
            "c++-annotations",
            "afl++",
        ] {
            let image = spelled(name);
            assert_eq!(validate_name(&image), Ok(()), "{image}");
            assert!(candidates(&image).contains(&vec![name.to_owned()]), "{image}");
        }
        assert_eq!(spelled("g++"), "g_plus_plus");
        assert_eq!(spelled("git"), "git");
    }
}
