//! The Kubernetes REST API: discovery, resources, watch, validation and defaulting.

pub mod admission;
pub mod allocator;
pub mod decode;
pub mod discovery;
pub mod error;
pub mod handler;
pub mod logs;
pub mod object;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod request;
pub mod selectors;
pub mod table;
pub mod tokens;
pub mod validation;
pub mod watchcache;

pub use error::{ApiError, FieldError};
pub use handler::{Api, Reply, ResourceRequest};
