//! The `loopback` CNI plugin executable.

use std::process::ExitCode;

#[global_allocator]
static ALLOC: ferrolet_cni::arena::Arena = ferrolet_cni::arena::Arena;

fn main() -> ExitCode {
    ferrolet_cni::invoke::init_tracing();
    ferrolet_cni::invoke::run_main(&ferrolet_cni::plugins::loopback::Loopback)
}
