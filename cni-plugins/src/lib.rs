//! CNI 1.1 plugins `bridge`, `host-local`, `loopback` and `portmap`, drop-in replacements
//! for the reference plugins' configurations.
//!
//! Each binary is a thin `main` around [`invoke::run_main`] and one of [`plugins`].
//! Namespace switches happen only on dedicated threads ([`netns`]).

pub mod arena;
pub mod invoke;
pub mod ipam;
pub mod iptables;
pub mod netlink;
pub mod netns;
pub mod plugins;
pub mod spec;
pub mod sysctl;
