//! The images tests run: our static pause program and a busybox image, built with
//! `ferrolet-oci-image` and cached under `<workspace>/target/test-images`.
//!
//! Builds are keyed by content (the binaries that go in, the harness's image recipe and the
//! builder's version), and serialised with file locks, so parallel tests and test processes
//! build each image once and then share it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, bail, ensure};
use ferrolet_oci_image::{
    ImageFormat, ImageReference, ImageSettings, ImageSpec, Ownership, StagedImage, sha256_of,
};

/// Name of the pause image; the tag is the workspace version.
pub const PAUSE_IMAGE: &str = concat!("ferrolet.local/pause:", env!("CARGO_PKG_VERSION"));
/// Name of the busybox image.
pub const BUSYBOX_IMAGE: &str = "ferrolet.local/busybox:latest";
/// A second busybox image, for rolling updates: the same files, `GREETING=v2` in its config.
pub const BUSYBOX_V2_IMAGE: &str = "ferrolet.local/busybox:v2";
/// Where Debian's `busybox-static` puts the binary.
pub const BUSYBOX_BINARY: &str = "/bin/busybox";

/// The busybox applets the image links into `/bin`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "[", "awk", "cat", "chmod", "cp", "cut", "date", "dd", "df", "du", "echo", "env", "false",
    "find", "grep", "head", "hostname", "httpd", "id", "ip", "kill", "ln", "ls", "mkdir", "mount",
    "mv", "nc", "nslookup", "ping", "printf", "ps", "pwd", "readlink", "rm", "rmdir", "sed", "seq",
    "sh", "sleep", "sort", "stat", "tail", "tee", "test", "timeout", "top", "touch", "tr", "true",
    "umount", "uname", "wc", "wget", "whoami", "xargs",
];

/// Bump when the recipe of the images below changes in a way the cache key does not see.
const RECIPE_VERSION: u32 = 1;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";

/// An image built for tests, in both archive formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestImage {
    /// The image's name, e.g. `ferrolet.local/busybox:latest`.
    pub name: String,
    /// OCI image layout as a tar; `ctr images import` gives the image `manifest_digest`.
    pub oci_archive: PathBuf,
    /// `docker save` format; importers build their own manifest, with our config and layers.
    pub docker_archive: PathBuf,
    /// Digest of the OCI manifest.
    pub manifest_digest: String,
    pub config_digest: String,
    /// Digests of the compressed layer blobs, base first.
    pub layer_digests: Vec<String>,
}

/// The static `ferrolet-pause` binary, built with
/// `cargo rustc -p ferrolet-pause --release --target-dir <workspace>/target/static -- -C target-feature=+crt-static`
/// (cargo decides whether it is stale). A file lock keeps parallel callers from racing.
pub fn pause_binary() -> anyhow::Result<PathBuf> {
    // Within one process cargo need only be asked once.
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(path) = built.as_ref() {
        return Ok(path.clone());
    }
    let root = crate::workspace_root();
    let target = root.join("target/static");
    fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    let _lock = lock(&root.join("target/static.lock"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "rustc",
            "-p",
            "ferrolet-pause",
            "--release",
            "--bin",
            "ferrolet-pause",
        ])
        .arg("--target-dir")
        .arg(&target)
        .args(["--", "-C", "target-feature=+crt-static"])
        // The image should hold a small binary: no symbols or debug info.
        .args(["-C", "strip=symbols", "-C", "debuginfo=0"])
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .with_context(|| format!("running {}", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "building the static pause binary failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let binary = target.join("release/ferrolet-pause");
    ensure!(
        !has_interpreter(&binary)?,
        "{} is dynamically linked; the pause image needs a static binary",
        binary.display()
    );
    *built = Some(binary.clone());
    Ok(binary)
}

/// True if the ELF file at `path` names a program interpreter (a dynamic loader), i.e. is not
/// a static executable. Static-pie binaries have no `PT_INTERP`.
pub fn has_interpreter(path: &Path) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = || anyhow::anyhow!("{} is not a 64-bit little-endian ELF file", path.display());
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(bad());
    }
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?))
    };
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(bad)?)?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(bad)?);
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize).ok_or_else(bad)? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The pause image (only the static pause at `/pause`, entrypoint `["/pause"]`), from the
/// cache; its archives are read-only to callers.
pub fn cached_pause_image() -> anyhow::Result<TestImage> {
    let pause = pause_binary()?;
    let binary = fs::read(&pause).with_context(|| format!("reading {}", pause.display()))?;
    let key = cache_key(&[b"pause", &binary]);
    cached_image(PAUSE_IMAGE, &key, |scratch| {
        let rootfs = scratch.join("rootfs");
        fs::create_dir(&rootfs)?;
        write_executable(&rootfs.join("pause"), &binary)?;
        Ok(ImageSpec {
            reference: ImageReference::parse(PAUSE_IMAGE)?,
            layers: vec![rootfs],
            settings: ImageSettings {
                entrypoint: Some(vec!["/pause".to_owned()]),
                stop_signal: Some("SIGTERM".to_owned()),
                env: Vec::new(),
                ..ImageSettings::default()
            },
            ownership: Ownership::Fixed { uid: 0, gid: 0 },
        })
    })
}

/// The busybox image from Debian's `busybox-static` (cmd `["sh"]`), from the cache.
pub fn cached_busybox_image() -> anyhow::Result<TestImage> {
    let binary = fs::read(BUSYBOX_BINARY).with_context(|| {
        format!("reading {BUSYBOX_BINARY} (is the Debian package busybox-static installed?)")
    })?;
    let key = cache_key(&[
        b"busybox",
        &binary,
        BUSYBOX_APPLETS.join(" ").as_bytes(),
        PASSWD.as_bytes(),
        GROUP.as_bytes(),
    ]);
    cached_image(BUSYBOX_IMAGE, &key, |scratch| {
        let rootfs = busybox_rootfs(scratch)?;
        Ok(ImageSpec {
            reference: ImageReference::parse(BUSYBOX_IMAGE)?,
            layers: vec![rootfs],
            settings: ImageSettings {
                cmd: Some(vec!["sh".to_owned()]),
                ..ImageSettings::default()
            },
            ownership: Ownership::Fixed { uid: 0, gid: 0 },
        })
    })
}

/// [`BUSYBOX_V2_IMAGE`]: the busybox image with `GREETING=v2` added to its environment, so
/// it is a different image (another config, another id) that tells its pods apart.
pub fn cached_busybox_v2_image() -> anyhow::Result<TestImage> {
    let binary = fs::read(BUSYBOX_BINARY).with_context(|| {
        format!("reading {BUSYBOX_BINARY} (is the Debian package busybox-static installed?)")
    })?;
    let key = cache_key(&[
        b"busybox-v2",
        &binary,
        BUSYBOX_APPLETS.join(" ").as_bytes(),
        PASSWD.as_bytes(),
        GROUP.as_bytes(),
    ]);
    cached_image(BUSYBOX_V2_IMAGE, &key, |scratch| {
        let rootfs = busybox_rootfs(scratch)?;
        Ok(ImageSpec {
            reference: ImageReference::parse(BUSYBOX_V2_IMAGE)?,
            layers: vec![rootfs],
            settings: ImageSettings {
                cmd: Some(vec!["sh".to_owned()]),
                env: vec![
                    ferrolet_oci_image::DEFAULT_PATH.to_owned(),
                    "GREETING=v2".to_owned(),
                ],
                ..ImageSettings::default()
            },
            ownership: Ownership::Fixed { uid: 0, gid: 0 },
        })
    })
}

/// The v2 busybox image with its two archives hard-linked (or copied) into `dir`.
pub fn busybox_v2_image(dir: &Path) -> anyhow::Result<TestImage> {
    place_in(&cached_busybox_v2_image()?, dir, "busybox-v2")
}

/// The pause image with its two archives hard-linked (or copied) into `dir`.
pub fn pause_image(dir: &Path) -> anyhow::Result<TestImage> {
    place_in(&cached_pause_image()?, dir, "pause")
}

/// The busybox image with its two archives hard-linked (or copied) into `dir`.
pub fn busybox_image(dir: &Path) -> anyhow::Result<TestImage> {
    place_in(&cached_busybox_image()?, dir, "busybox")
}

/// Writes the busybox root filesystem into `<dir>/busybox-rootfs` and returns its path, for
/// tests that build variants of the image (another user, extra files).
pub fn busybox_rootfs(dir: &Path) -> anyhow::Result<PathBuf> {
    let list = Command::new(BUSYBOX_BINARY)
        .arg("--list")
        .output()
        .with_context(|| format!("running {BUSYBOX_BINARY} --list"))?;
    let available = String::from_utf8_lossy(&list.stdout);
    let missing: Vec<_> = BUSYBOX_APPLETS
        .iter()
        .filter(|a| !available.lines().any(|l| l == **a))
        .collect();
    ensure!(
        missing.is_empty(),
        "{BUSYBOX_BINARY} lacks applets {missing:?}"
    );

    let rootfs = dir.join("busybox-rootfs");
    for sub in ["bin", "etc", "root", "tmp", "var/www"] {
        fs::create_dir_all(rootfs.join(sub))?;
    }
    set_mode(&rootfs.join("tmp"), 0o1777)?;
    set_mode(&rootfs.join("root"), 0o700)?;
    let binary = fs::read(BUSYBOX_BINARY)?;
    write_executable(&rootfs.join("bin/busybox"), &binary)?;
    for applet in BUSYBOX_APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    fs::write(rootfs.join("etc/passwd"), PASSWD)?;
    fs::write(rootfs.join("etc/group"), GROUP)?;
    Ok(rootfs)
}

fn write_executable(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes)?;
    set_mode(path, 0o755)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn cache_key(parts: &[&[u8]]) -> String {
    let mut all = Vec::new();
    let header = format!(
        "recipe {RECIPE_VERSION} builder {}\n",
        env!("CARGO_PKG_VERSION")
    );
    all.extend_from_slice(header.as_bytes());
    for part in parts {
        all.extend_from_slice(&(part.len() as u64).to_le_bytes());
        all.extend_from_slice(part);
    }
    let digest = sha256_of(&all);
    digest.digest()[..16].to_owned()
}

fn cache_root() -> PathBuf {
    crate::workspace_root().join("target/test-images")
}

/// Takes an exclusive lock on `path` (created if needed) until the returned file is dropped.
fn lock(path: &Path) -> anyhow::Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// Returns the cached image `<name>` with `key`, building it with `spec_in` (given a scratch
/// dir to stage a root filesystem in) when it is not cached yet.
fn cached_image(
    name: &str,
    key: &str,
    spec_in: impl FnOnce(&Path) -> anyhow::Result<ImageSpec>,
) -> anyhow::Result<TestImage> {
    let root = cache_root();
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let short = name.rsplit('/').next().unwrap_or(name).replace(':', "-");
    let dir = root.join(format!("{short}-{key}"));
    let _lock = lock(&root.join(format!("{short}.lock")))?;
    if let Some(image) = read_cached(&dir, name)? {
        return Ok(image);
    }

    let scratch = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&root)
        .context("creating a scratch dir")?;
    let spec = spec_in(scratch.path())?;
    let staged = StagedImage::build(&spec, scratch.path())
        .with_context(|| format!("building image {name}"))?;
    let out = scratch.path().join("out");
    fs::create_dir(&out)?;
    staged.write(ImageFormat::OciArchive, &out.join("oci.tar"))?;
    staged.write(ImageFormat::DockerArchive, &out.join("docker.tar"))?;
    let meta = serde_json::json!({
        "name": name,
        "manifestDigest": staged.manifest_digest().to_string(),
        "configDigest": staged.config_digest().to_string(),
        "layerDigests": staged.layers().iter().map(|l| l.digest.to_string()).collect::<Vec<_>>(),
    });
    fs::write(out.join("image.json"), serde_json::to_vec_pretty(&meta)?)?;
    drop(staged);
    if dir.exists() {
        // An unreadable earlier attempt; replace it.
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(&out, &dir).with_context(|| format!("moving the image to {}", dir.display()))?;
    read_cached(&dir, name)?
        .with_context(|| format!("{} vanished after it was built", dir.display()))
}

fn read_cached(dir: &Path, name: &str) -> anyhow::Result<Option<TestImage>> {
    let Ok(bytes) = fs::read(dir.join("image.json")) else {
        return Ok(None);
    };
    let meta: serde_json::Value = serde_json::from_slice(&bytes)?;
    let text = |key: &str| meta[key].as_str().map(str::to_owned);
    let image = TestImage {
        name: name.to_owned(),
        oci_archive: dir.join("oci.tar"),
        docker_archive: dir.join("docker.tar"),
        manifest_digest: text("manifestDigest").unwrap_or_default(),
        config_digest: text("configDigest").unwrap_or_default(),
        layer_digests: meta["layerDigests"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let complete = text("name").as_deref() == Some(name)
        && !image.manifest_digest.is_empty()
        && !image.layer_digests.is_empty()
        && image.oci_archive.is_file()
        && image.docker_archive.is_file();
    Ok(complete.then_some(image))
}

/// Puts links to the cached archives into `dir` as `<stem>-oci.tar` and `<stem>-docker.tar`.
fn place_in(image: &TestImage, dir: &Path, stem: &str) -> anyhow::Result<TestImage> {
    let mut placed = image.clone();
    placed.oci_archive = dir.join(format!("{stem}-oci.tar"));
    placed.docker_archive = dir.join(format!("{stem}-docker.tar"));
    for (from, to) in [
        (&image.oci_archive, &placed.oci_archive),
        (&image.docker_archive, &placed.docker_archive),
    ] {
        let _ = fs::remove_file(to);
        if fs::hard_link(from, to).is_err() {
            fs::copy(from, to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(placed)
}
