//! host-local IP address management: configuration, the round-robin allocator and the
//! on-disk store shared with the reference plugin's layout.

pub mod allocator;
pub mod config;
pub mod store;

pub use allocator::{AllocError, Allocator};
pub use config::{IpamConfig, IpamConfigError, Range, RangeSet};
pub use store::{DiskStore, Store, StoreError};
