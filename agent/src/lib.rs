//! ferrolet, the node agent: the kubelet and the service proxy. The binary only parses
//! arguments and calls in here.

pub mod config;
pub mod proxy;
