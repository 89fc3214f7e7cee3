//! `ferrolet-monitor`: the per-container monitor as a binary of its own.
//!
//! The shim can re-exec itself as the monitor (`ferrolet-shim monitor`), but every running
//! container keeps one monitor, and a process of the whole shim binary carries the
//! relocated data and start-up allocations of everything the shim links (gRPC, TLS, the
//! registry client). This entry point links only the monitor and the container set-up it
//! runs, so each monitor costs a fraction of the memory. It takes the same arguments as
//! `ferrolet-shim monitor` and parses them by hand: clap would add more to every monitor
//! than this whole function does.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1);
    if std::env::args_os().nth(1).is_some_and(|a| a == "zygote") {
        args.next();
        let fd = match (args.next(), args.next()) {
            (Some(flag), Some(v)) if flag == "--fd" => v.to_str().and_then(|v| v.parse().ok()),
            _ => None,
        };
        let Some(fd) = fd else {
            usage("zygote needs --fd N");
        };
        std::process::exit(ferrolet_shim::monitor::zygote::main(fd));
    }
    let mut dir: Option<PathBuf> = None;
    let mut report_fd = 3;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("monitor") if dir.is_none() => {}
            Some("--report-fd") => match args.next().and_then(|v| v.to_str()?.parse().ok()) {
                Some(fd) => report_fd = fd,
                None => usage("--report-fd needs a descriptor number"),
            },
            _ if dir.is_none() => dir = Some(PathBuf::from(arg)),
            _ => usage(&format!("unexpected argument {arg:?}")),
        }
    }
    let Some(dir) = dir else {
        usage("the container's state directory is missing");
    };
    std::process::exit(ferrolet_shim::monitor::main(&dir, report_fd));
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "ferrolet-monitor: {problem}\nusage: ferrolet-monitor [monitor] DIR [--report-fd N]\n       ferrolet-monitor zygote --fd N"
    );
    std::process::exit(2);
}
