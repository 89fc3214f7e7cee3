//! `ferrolet-image`: build OCI images from directory trees, and inspect image files.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ferrolet_oci_image::{
    ImageFormat, ImageReference, ImageSettings, ImageSpec, Ownership, ReadOptions, oci,
};

#[derive(Parser)]
#[command(name = "ferrolet-image", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image from one or more directory trees (one layer each, base first).
    Build(Box<BuildArgs>),
    /// Read an image (OCI layout, OCI archive or docker-archive), verify every digest and
    /// print what it holds as JSON.
    Inspect {
        /// The image directory or archive.
        path: PathBuf,
    },
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Directory tree of a layer; repeat for more layers, base layer first.
    #[arg(long, required = true)]
    rootfs: Vec<PathBuf>,
    /// Image name, e.g. ferrolet.local/busybox:latest (tag defaults to latest).
    #[arg(long, value_parser = ImageReference::parse)]
    tag: ImageReference,
    /// Where to write the image.
    #[arg(long)]
    output: PathBuf,
    /// oci-layout (a new directory), oci-archive or docker-archive (tar files).
    #[arg(long, default_value = "oci-archive")]
    format: ImageFormat,
    /// Entrypoint as a JSON array of strings, e.g. '["/bin/sh", "-c"]'.
    #[arg(long, value_parser = |s: &str| ferrolet_oci_image::parse_command("entrypoint", s).map(JsonCommand))]
    entrypoint: Option<JsonCommand>,
    /// Default arguments as a JSON array of strings.
    #[arg(long, value_parser = |s: &str| ferrolet_oci_image::parse_command("cmd", s).map(JsonCommand))]
    cmd: Option<JsonCommand>,
    /// Environment variable KEY=VALUE; repeatable. Replaces the default PATH when given.
    #[arg(long, value_parser = ferrolet_oci_image::parse_env)]
    env: Vec<String>,
    /// Working directory (absolute).
    #[arg(long, value_parser = ferrolet_oci_image::parse_working_dir)]
    workdir: Option<String>,
    /// User to run as: USER, UID, USER:GROUP or UID:GID.
    #[arg(long, value_parser = ferrolet_oci_image::parse_user)]
    user: Option<String>,
    /// Label KEY=VALUE; repeatable.
    #[arg(long, value_parser = |s: &str| ferrolet_oci_image::parse_key_value("label", s))]
    label: Vec<(String, String)>,
    /// Exposed port PORT[/tcp|udp|sctp]; repeatable.
    #[arg(long, value_parser = ferrolet_oci_image::parse_port)]
    expose: Vec<String>,
    /// Signal that stops the container, e.g. SIGTERM.
    #[arg(long, value_parser = ferrolet_oci_image::parse_stop_signal)]
    stop_signal: Option<String>,
    /// Target OS (Go name).
    #[arg(long, default_value = "linux", value_parser = ferrolet_oci_image::parse_os)]
    os: oci::Os,
    /// Target architecture (Go name); defaults to this machine's.
    #[arg(long, value_parser = ferrolet_oci_image::parse_arch)]
    arch: Option<oci::Arch>,
    /// Own every file as UID:GID instead of the owners on disk.
    #[arg(long, value_parser = ferrolet_oci_image::parse_owner)]
    chown: Option<(u32, u32)>,
}

/// A command given as one JSON array argument; a newtype so clap takes it as a single value.
#[derive(Clone)]
struct JsonCommand(Vec<String>);

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Build(args) => build(*args),
        Command::Inspect { path } => inspect(&path),
    }
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let defaults = ImageSettings::default();
    let spec = ImageSpec {
        reference: args.tag,
        layers: args.rootfs,
        settings: ImageSettings {
            entrypoint: args.entrypoint.map(|c| c.0),
            cmd: args.cmd.map(|c| c.0),
            env: if args.env.is_empty() {
                defaults.env
            } else {
                args.env
            },
            working_dir: args.workdir,
            user: args.user,
            labels: args.label.into_iter().collect(),
            stop_signal: args.stop_signal,
            exposed_ports: args.expose,
            os: args.os,
            arch: args.arch.unwrap_or(defaults.arch),
        },
        ownership: args
            .chown
            .map_or(Ownership::Preserve, |(uid, gid)| Ownership::Fixed {
                uid,
                gid,
            }),
    };
    let built = ferrolet_oci_image::build_image(&spec, args.format, &args.output)
        .with_context(|| format!("building {}", spec.reference))?;
    let summary = serde_json::json!({
        "name": built.reference.to_string(),
        "format": built.format.as_str(),
        "output": built.output,
        "manifestDigest": built.manifest_digest,
        "configDigest": built.config_digest,
        "layers": built.layers.iter().map(|l| serde_json::json!({
            "digest": l.digest, "size": l.size, "diffId": l.diff_id,
        })).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn inspect(path: &std::path::Path) -> anyhow::Result<()> {
    let images = ferrolet_oci_image::read_images(path, &ReadOptions::default())
        .with_context(|| format!("reading {}", path.display()))?;
    let summary: Vec<_> = images
        .iter()
        .map(|image| {
            serde_json::json!({
                "format": image.format.as_str(),
                "names": image.names,
                "refName": image.ref_name,
                "manifestDigest": image.manifest_digest,
                "configDigest": image.config_digest,
                "config": image.config,
                "layers": image.layers.iter().map(|l| serde_json::json!({
                    "mediaType": l.media_type, "digest": l.digest, "size": l.size, "diffId": l.diff_id,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
