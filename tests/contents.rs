//! What is inside an image and how it runs, checked by pulling with skopeo,
//! unpacking with umoci and running in a chroot as the image's user: the
//! account files, a non-root user with a home directory, `/tmp`, the
//! environment, the entrypoint of a one-package image, labels, and
//! meta-packages from a TOML file.

mod common;

use common::{Registry, Unpacked};

#[test]
fn a_one_package_image_runs_its_main_program_and_says_where_it_came_from() {
    let registry = Registry::start();
    let hello = Unpacked::pull(&registry, "hello", "latest");
    assert_eq!(hello.run_default(), "Hello, world!\n");
    let entrypoint = hello.config["config"]["Entrypoint"][0].as_str().unwrap();
    assert!(entrypoint.starts_with("/nix/store/") && entrypoint.ends_with("-hello-2.12.1/bin/hello"));

    let env = hello.config["config"]["Env"].as_array().unwrap();
    for variable in [
        "PATH=",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt",
        "LANG=C.UTF-8",
        "HOME=/root",
    ] {
        assert!(
            env.iter().any(|e| e.as_str().unwrap().starts_with(variable)),
            "{variable}"
        );
    }
    assert!(hello.rootfs.join("etc/ssl/certs/ca-bundle.crt").exists());
    let labels = &hello.config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.source"], "path");
    assert_eq!(labels["org.opencontainers.image.revision"].as_str().unwrap().len(), 64);

    let passwd = std::fs::read_to_string(hello.rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.starts_with("root:x:0:0:") && passwd.contains("\nnobody:x:65534:"),
        "{passwd}"
    );
    assert!(hello.rootfs.join("etc/group").exists() && hello.rootfs.join("etc/nsswitch.conf").exists());
    assert!(!hello.rootfs.join("bin/sh").exists(), "no /bin/sh without a shell");
    assert!(
        !hello.rootfs.join("usr/bin/env").exists(),
        "no /usr/bin/env without one"
    );

    let several = Unpacked::pull(&registry, "shell/hello", "latest");
    assert!(
        several.config["config"].get("Entrypoint").is_none(),
        "several packages: no entrypoint"
    );
    assert_eq!(several.config["config"]["Cmd"], serde_json::json!(["bash"]));
    assert_eq!(several.run(&["id", "-un"]), "root\n");
    assert_eq!(several.run(&["ls", "-ld", "/tmp"])[..10].to_owned(), "drwxrwxrwt");
    let sh = std::fs::read_link(several.rootfs.join("bin/sh")).unwrap();
    assert!(
        several.rootfs.join(sh.strip_prefix("/").unwrap()).exists(),
        "/bin/sh points at a file"
    );
}

#[test]
fn nonroot_runs_as_a_user_with_a_home() {
    let registry = Registry::start();
    let image = Unpacked::pull(&registry, "nonroot/shell", "latest");
    assert_eq!(image.config["config"]["User"], "1000:1000");
    assert_eq!(
        image.run(&["id"]),
        "uid=1000(nixery) gid=1000(nixery) groups=1000(nixery)\n"
    );
    assert_eq!(image.run(&["pwd"]), "/home/nixery\n");
    assert_eq!(image.run(&["sh", "-c", "touch ~/made && ls ~"]), "made\n");
    assert!(image.run(&["env"]).lines().any(|l| l == "HOME=/home/nixery"));
    assert!(
        image
            .run(&["sh", "-c", "touch /root/x 2>&1 || echo refused"])
            .ends_with("refused\n")
    );
}

#[test]
fn the_entrypoint_can_be_turned_off() {
    let registry = Registry::start_with(&[("NIXERY_ENTRYPOINT", "false")]);
    let hello = Unpacked::pull(&registry, "hello", "latest");
    assert!(hello.config["config"].get("Entrypoint").is_none());
}

#[test]
fn meta_packages_come_from_a_toml_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meta.toml");
    std::fs::write(
        &file,
        "[tools]\npackages = [\"bashInteractive\", \"coreutils\", \"hello\"]\n\n\
         [app]\nuser = { name = \"app\", uid = 4242, gid = 4243, home = \"/srv/app\" }\n",
    )
    .unwrap();
    let registry = Registry::start_with(&[("NIXERY_META_PACKAGES", file.to_str().unwrap())]);
    let image = Unpacked::pull(&registry, "app/tools", "latest");
    assert_eq!(image.run(&["id", "-u"]), "4242\n");
    assert_eq!(image.run(&["pwd"]), "/srv/app\n");
    assert_eq!(image.run(&["hello"]), "Hello, world!\n");

    // `shell` is not one of this registry's meta-packages: a package name.
    let shell = registry.get("/v2/shell/hello/manifests/latest");
    assert_eq!(shell.status, 404);
    assert!(String::from_utf8_lossy(&shell.body).contains("shell"));
}
