//! CRI runtime.v1.
