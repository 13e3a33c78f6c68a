//! The README's commands on a machine that lacks things: `scripts/setup.sh
//! test` installs the C++ compiler the fuzz targets need when it is
//! missing, and `scripts/fuzz.sh` tells a build that fails (as it did
//! without that compiler) from a crash.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn executable(path: &Path, script: &str) {
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[test]
fn setup_installs_a_cxx_compiler_when_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let asked = dir.path().join("apt-get");
    // A machine with every package setup.sh checks for but g++, and an
    // apt-get that writes down what it is asked.
    executable(
        &bin.join("dpkg-query"),
        "#!/bin/sh\n[ \"$3\" = g++ ] && exit 1\nprintf 'install ok installed'\n",
    );
    executable(
        &bin.join("apt-get"),
        &format!("#!/bin/sh\necho \"$*\" >> {}\n", asked.display()),
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let setup = Command::new(Path::new(ROOT).join("scripts/setup.sh"))
        .arg("test")
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(setup.status.success(), "{}", String::from_utf8_lossy(&setup.stderr));
    let asked = std::fs::read_to_string(&asked).unwrap();
    let install = asked
        .lines()
        .find(|l| l.starts_with("install"))
        .unwrap_or_else(|| panic!("{asked}"));
    assert!(install.split(' ').any(|word| word == "g++"), "{install}");
    assert!(!install.contains("podman"), "nothing else was missing: {install}");
}

#[test]
fn fuzz_reports_a_build_that_fails_as_such() {
    // A build that fails at its first crate (an option rustc does not
    // know), in a target folder of its own so that no cache is touched.
    let target = tempfile::tempdir().unwrap();
    let fuzz = Command::new(Path::new(ROOT).join("scripts/fuzz.sh"))
        .arg("1")
        .env("CARGO_TARGET_DIR", target.path())
        .env("RUSTFLAGS", "-Z nixery-no-such-option")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&fuzz.stderr);
    let stdout = String::from_utf8_lossy(&fuzz.stdout);
    assert!(!fuzz.status.success());
    assert!(stderr.contains("building the fuzz targets failed"), "{stderr}");
    assert!(!stderr.contains("found a crash"), "{stderr}");
    assert!(
        stdout.contains("nixery-no-such-option"),
        "the build's error is shown: {stdout}"
    );
}

/// No module of the library imports a module that imports it, directly or
/// through others: `scripts/module-graph.sh` prints the graph and fails on
/// a cycle.
#[test]
fn the_module_graph_has_no_cycles() {
    let graph = Command::new(Path::new(ROOT).join("scripts/module-graph.sh"))
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&graph.stdout);
    assert!(
        graph.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&graph.stderr)
    );
    assert!(printed.lines().any(|l| l.starts_with("server -> ")), "{printed}");
    assert!(printed.ends_with("cycles: none\n"), "{printed}");
}
