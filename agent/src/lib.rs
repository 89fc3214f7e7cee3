//! Library of the component; the binary only parses arguments and calls in.
