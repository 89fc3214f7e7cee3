//! `ferrolet-bench`: runs every benchmark of the project, each against its peer in the same
//! run, and merges their figures into one report: `bench/out/report.md` (the table README.md
//! shows) and `bench/out/report.json`.
//!
//! Each benchmark is a sibling program (`target/release/<name>`) that writes
//! `bench/out/<name>.json` and `bench/out/<name>.figures.json`; `--aggregate-only` skips the
//! runs and merges the figures files already there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferrolet_bench::{Figure, markdown};

/// Every benchmark, in the order the report shows them.
const BENCHMARKS: &[(&str, &str)] = &[
    ("store", "store: SQLite vs etcd"),
    ("api", "API server: SQLite vs etcd"),
    ("scheduler", "scheduler"),
    ("runtime", "runtime shim vs containerd"),
    ("cni", "CNI vs reference plugins"),
    ("agent", "agent pod startup and footprint"),
    ("proxy", "proxy vs iptables-restore"),
];

#[derive(Parser, Debug)]
#[command(about = "Run every ferrolet benchmark and write one report")]
struct Args {
    /// Run only these benchmarks (comma-separated names: store, api, scheduler, runtime, cni,
    /// agent, proxy).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Don't run anything; merge the figures files already in the output directory.
    #[arg(long)]
    aggregate_only: bool,
    /// Directory of the reports.
    #[arg(long, default_value = "bench/out")]
    out_dir: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for name in &args.only {
        if !BENCHMARKS.iter().any(|(n, _)| n == name) {
            bail!("unknown benchmark {name:?}; known: {:?}", names());
        }
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let here = std::env::current_exe()
        .context("locating this program")?
        .parent()
        .map(Path::to_path_buf)
        .context("this program has no directory")?;
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|n| n == name);

    let mut failed = Vec::new();
    if !args.aggregate_only {
        for (name, _) in BENCHMARKS.iter().filter(|(n, _)| wanted(n)) {
            let program = here.join(name);
            if !program.exists() {
                eprintln!("skipping {name}: {} is not built", program.display());
                continue;
            }
            let out = args.out_dir.join(format!("{name}.json"));
            eprintln!("running {name} ...");
            let log = args.out_dir.join(format!("{name}.txt"));
            let output = Command::new(&program)
                .arg("--out")
                .arg(&out)
                .output()
                .with_context(|| format!("running {}", program.display()))?;
            std::fs::write(&log, [&output.stdout[..], &output.stderr[..]].concat())
                .with_context(|| format!("writing {}", log.display()))?;
            if output.status.success() {
                eprintln!("  done: {}", log.display());
            } else {
                eprintln!("  FAILED ({}): see {}", output.status, log.display());
                failed.push(*name);
            }
        }
    }

    let mut sections = Vec::new();
    for (name, title) in BENCHMARKS.iter().filter(|(n, _)| wanted(n)) {
        let path = ferrolet_bench::figures_path(&args.out_dir.join(format!("{name}.json")));
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("no figures from {name} ({} missing)", path.display());
            continue;
        };
        let figures: Vec<Figure> = serde_json::from_str(&text)
            .with_context(|| format!("reading the figures in {}", path.display()))?;
        sections.push(((*title).to_owned(), figures));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut md = markdown(&sections);
    md.push_str(&format!(
        "\n{cpus} CPUs; load average at the end of the run: {}\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let md_path = args.out_dir.join("report.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json_path = args.out_dir.join("report.json");
    let json: serde_json::Map<String, serde_json::Value> = sections
        .iter()
        .map(|(title, figures)| Ok((title.clone(), serde_json::to_value(figures)?)))
        .collect::<Result<_>>()?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    print!("{md}");
    eprintln!("wrote {} and {}", md_path.display(), json_path.display());
    if !failed.is_empty() {
        bail!("benchmarks failed: {failed:?}");
    }
    Ok(())
}

fn names() -> Vec<&'static str> {
    BENCHMARKS.iter().map(|(n, _)| *n).collect()
}
