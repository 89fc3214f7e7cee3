//! `ferrolet-shim`: a CRI runtime with its own OCI container runtime.
//!
//! The crate is organised by concern: `container` turns an OCI runtime spec into a running
//! process (through `namespaces`, `mounts` and `cgroups`), `monitor` is the small process
//! that parents each container, keeps its logs (`logs`) and records its exit, `exec` runs
//! extra processes in a container, `image` stores, imports and pulls images, `cri`
//! serves all of it as CRI `runtime.v1` on a unix socket, and `streaming` serves the
//! WebSocket sessions behind CRI Exec.

pub mod cgroups;
pub mod container;
pub mod cri;
pub mod exec;
pub mod image;
pub mod logs;
pub mod monitor;
pub mod mounts;
pub mod namespaces;
pub mod streaming;
