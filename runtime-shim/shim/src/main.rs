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
    /// Internal: the per-container monitor started by the shim.
    #[command(hide = true)]
    Monitor {
        /// The container's state directory.
        dir: PathBuf,
        /// Descriptor of the pipe to report the start result on.
        #[arg(long, default_value_t = 3)]
        report_fd: i32,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Monitor { dir, report_fd } => {
            std::process::exit(ferrolet_shim::monitor::main(&dir, report_fd));
        }
        Command::Start { root, id, hold } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
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
