//! `ferrolet-shim`: parses arguments, sets up logging and calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrolet-shim",
    about = "A CRI runtime with its own OCI container runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves CRI (RuntimeService and ImageService) on a unix socket.
    Serve {
        /// The unix socket to listen on.
        #[arg(long, default_value = "/run/ferrolet-shim/ferrolet-shim.sock")]
        socket: PathBuf,
        /// Persistent directory: images and the containers' writable layers.
        #[arg(long, default_value = "/var/lib/ferrolet-shim")]
        root: PathBuf,
        /// Volatile state (records, mount points, network namespaces); put it on tmpfs,
        /// as `/run/ferrolet-shim` is on systemd hosts. Default: the same as `--root`.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Parent cgroup of pods that do not name one.
        #[arg(long, default_value = "ferrolet")]
        cgroup_parent: String,
        /// Name of the sandbox (pause) image.
        #[arg(long, default_value = ferrolet_shim::image::pause::PAUSE_IMAGE)]
        pause_image: String,
        /// Static pause binary to build the pause image from when it is missing
        /// (default: `ferrolet-pause` beside this executable, if present).
        #[arg(long)]
        pause_binary: Option<PathBuf>,
        /// Address of the streaming server that Exec URLs point to (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        stream_address: std::net::SocketAddr,
    },
    /// Image store commands.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Internal: runs a command inside a running container (ExecSync).
    #[command(hide = true)]
    Exec {
        /// Pid of the container's init process.
        #[arg(long)]
        pid: u32,
        /// Make the terminal on stdin the command's controlling terminal.
        #[arg(long)]
        tty: bool,
        /// The container's state directory.
        dir: PathBuf,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Internal: the per-container monitor started by the shim.
    #[command(hide = true)]
    Monitor {
        /// The container's state directory.
        dir: PathBuf,
        /// Descriptor of the pipe to report the start result on.
        #[arg(long, default_value_t = 3)]
        report_fd: i32,
    },
    /// Internal: forks monitors on request from the shim (see `monitor::zygote`).
    #[command(hide = true)]
    Zygote {
        /// Descriptor of the shim's socket.
        #[arg(long)]
        fd: i32,
    },
    /// Starts a created container of a runtime root and stays in the foreground until it
    /// exits (a debugging aid, and the restart tests' stand-in for a serving shim).
    Start {
        #[arg(long)]
        root: PathBuf,
        id: String,
        /// Keep running after the start until killed.
        #[arg(long)]
        hold: bool,
    },
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// Imports OCI-layout or docker-archive tarballs (or an OCI layout directory).
    Import {
        #[arg(long, default_value = "/var/lib/ferrolet-shim")]
        root: PathBuf,
        files: Vec<PathBuf>,
    },
    /// Lists the images in the store.
    List {
        #[arg(long, default_value = "/var/lib/ferrolet-shim")]
        root: PathBuf,
    },
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Exec {
            pid,
            tty,
            dir,
            args,
        } => {
            std::process::exit(ferrolet_shim::exec::main(pid, &dir, &args, tty));
        }
        Command::Serve {
            socket,
            root,
            state,
            cgroup_parent,
            pause_image,
            pause_binary,
            stream_address,
        } => {
            init_tracing();
            let exe = std::env::current_exe().context("find own executable")?;
            let pause_binary = pause_binary.or_else(|| {
                let beside = exe.with_file_name("ferrolet-pause");
                beside.exists().then_some(beside)
            });
            let lean = exe.with_file_name("ferrolet-monitor");
            let monitor_exe = if lean.exists() { lean } else { exe.clone() };
            let shim = ferrolet_shim::cri::Shim::open(ferrolet_shim::cri::ShimConfig {
                state: state.unwrap_or_else(|| root.clone()),
                root,
                exe,
                monitor_exe,
                cgroups: ferrolet_shim::cgroups::CgroupDriver::detect(),
                cgroup_parent,
                pause_image,
                pause_binary,
                stream_address,
            })?;
            let rt = tokio::runtime::Runtime::new().context("start tokio")?;
            rt.block_on(async move {
                let shutdown = async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                    }
                };
                ferrolet_shim::cri::service::serve(shim, &socket, shutdown).await
            })?;
            Ok(())
        }
        Command::Images { command } => {
            init_tracing();
            match command {
                ImagesCommand::Import { root, files } => {
                    let store = ferrolet_shim::image::ImageStore::open(root.join("images"))?;
                    for f in files {
                        for rec in store
                            .import(&f)
                            .with_context(|| format!("import {}", f.display()))?
                        {
                            println!("{} {}", rec.id, rec.repo_tags.join(","));
                        }
                    }
                }
                ImagesCommand::List { root } => {
                    let store = ferrolet_shim::image::ImageStore::open(root.join("images"))?;
                    for rec in store.list() {
                        println!("{} {} {}", rec.id, rec.size, rec.repo_tags.join(","));
                    }
                }
            }
            Ok(())
        }
        Command::Monitor { dir, report_fd } => {
            std::process::exit(ferrolet_shim::monitor::main(&dir, report_fd));
        }
        Command::Zygote { fd } => {
            std::process::exit(ferrolet_shim::monitor::zygote::main(fd));
        }
        Command::Start { root, id, hold } => {
            init_tracing();
            let exe = std::env::current_exe().context("find own executable")?;
            let rt = ferrolet_shim::container::Runtime::new(
                &root,
                exe,
                ferrolet_shim::cgroups::CgroupDriver::detect(),
            )?;
            let pid = rt.start(&id)?;
            println!("{pid}");
            if hold {
                loop {
                    std::thread::park();
                }
            }
            Ok(())
        }
    }
}
