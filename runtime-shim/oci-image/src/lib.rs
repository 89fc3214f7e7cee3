//! OCI image layouts.
