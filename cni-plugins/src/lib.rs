//! Shared CNI plugin library.
