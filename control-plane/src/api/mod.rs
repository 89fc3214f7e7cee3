//! The Kubernetes REST API: discovery, resources, watch, validation and defaulting.
