//! The `ferrolet-image` command line, run as a user would.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_ferrolet-image");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run ferrolet-image")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn rootfs(tmp: &TempDir) -> String {
    let root = tmp.path().join("rootfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::write(root.join("bin/hello"), b"hello").unwrap();
    root.to_string_lossy().into_owned()
}

#[test]
fn builds_and_inspects_an_image() {
    let tmp = TempDir::new().unwrap();
    let rootfs = rootfs(&tmp);
    let output = tmp.path().join("hello.tar");
    let out = run(&[
        "build",
        "--rootfs",
        &rootfs,
        "--tag",
        "ferrolet.local/hello:2",
        "--format",
        "docker-archive",
        "--output",
        output.to_str().unwrap(),
        "--entrypoint",
        r#"["/bin/hello", "world"]"#,
        "--env",
        "GREETING=hi",
        "--workdir",
        "/bin",
        "--user",
        "1000",
        "--label",
        "org.example=yes",
        "--expose",
        "8080",
        "--chown",
        "0:0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["name"], "ferrolet.local/hello:2");
    assert_eq!(summary["format"], "docker-archive");

    let out = run(&["inspect", output.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let images: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let image = &images[0];
    assert_eq!(
        image["names"],
        serde_json::json!(["ferrolet.local/hello:2"])
    );
    assert_eq!(image["configDigest"], summary["configDigest"]);
    assert_eq!(image["layers"][0]["diffId"], summary["layers"][0]["diffId"]);
    let config = &image["config"]["config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/bin/hello", "world"])
    );
    assert_eq!(config["Env"], serde_json::json!(["GREETING=hi"]));
    assert_eq!(config["WorkingDir"], "/bin");
    assert_eq!(config["User"], "1000");
    assert_eq!(config["Labels"]["org.example"], "yes");
    assert_eq!(config["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
}

#[test]
fn bad_arguments_fail_clearly_and_write_nothing() {
    let tmp = TempDir::new().unwrap();
    let rootfs = rootfs(&tmp);
    let out_dir = tmp.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let output = out_dir.join("image.tar");
    let output = output.to_str().unwrap();
    let missing_rootfs = tmp.path().join("nope");
    let missing_rootfs = missing_rootfs.to_str().unwrap();
    let in_missing_dir = tmp.path().join("no/dir/image.tar");
    let in_missing_dir = in_missing_dir.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "--rootfs",
                &rootfs,
                "--tag",
                "x.io/a:1",
                "--output",
                output,
                "--entrypoint",
                "/bin/sh",
            ],
            "entrypoint: \"/bin/sh\" is not a JSON array of strings",
        ),
        (
            &[
                "--rootfs", &rootfs, "--tag", "x.io/a:1", "--output", output, "--cmd", "[1]",
            ],
            "cmd: \"[1]\" is not a JSON array of strings",
        ),
        (
            &["--rootfs", &rootfs, "--tag", "Bad/Name", "--output", output],
            "repository name must be lowercase",
        ),
        (
            &[
                "--rootfs",
                missing_rootfs,
                "--tag",
                "x.io/a:1",
                "--output",
                output,
            ],
            "does not exist",
        ),
        (
            &[
                "--rootfs",
                &rootfs,
                "--tag",
                "x.io/a:1",
                "--output",
                in_missing_dir,
            ],
            "output directory",
        ),
        (
            &[
                "--rootfs", &rootfs, "--tag", "x.io/a:1", "--output", output, "--format", "zip",
            ],
            "unknown image format \"zip\"",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["build"];
        full.extend_from_slice(args);
        let out = run(&full);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(
            entries(&out_dir).is_empty(),
            "{args:?} left {:?}",
            entries(&out_dir)
        );
    }
    assert!(!tmp.path().join("no").exists());
}
