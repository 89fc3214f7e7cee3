//! The `host-local` CNI plugin executable.

use std::process::ExitCode;

fn main() -> ExitCode {
    ferrolet_cni::invoke::init_tracing();
    ferrolet_cni::invoke::run_main(&ferrolet_cni::plugins::host_local::HostLocal)
}
