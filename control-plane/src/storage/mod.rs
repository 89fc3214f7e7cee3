//! The store behind the API server: one trait, SQLite and etcd implementations.
