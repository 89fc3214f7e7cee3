//! ferrolet-control-plane: the Kubernetes-style API server over a store, the scheduler and the
//! controllers. The binary only parses arguments and calls in here.

pub mod api;
pub mod certs;
pub mod controllers;
pub mod scheduler;
pub mod server;
pub mod storage;
