use anyhow::Context as _;
use clap::Parser;
use ferrolet::config::{AgentConfig, Flags};
use tracing_subscriber::EnvFilter;

/// ferrolet: the node agent. Runs the pods bound to this node through a CRI runtime.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = AgentConfig::from_flags(&cli.flags).context("configuration")?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down; containers keep running");
            let _ = tx.send(true);
        });
        ferrolet::kubelet::run(config, rx)
            .await
            .context("running the kubelet")
    })
}
