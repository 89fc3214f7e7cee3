//! ferrolet, the node agent: the kubelet and the service proxy. The binary only parses
//! arguments and calls in here.

pub mod api;
pub mod cni;
pub mod config;
pub mod cri;
pub mod kubelet;
pub mod node;
pub mod pods;
pub mod probes;
pub mod proxy;
pub mod server;
pub mod volumes;
