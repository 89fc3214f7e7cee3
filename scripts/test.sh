#!/usr/bin/env bash
# Runs every test of the workspace, as CI does. Needs root: the tests create network
# namespaces, cgroups under their own parent, mounts, and start containerd and etcd privately.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "the tests need root (namespaces, cgroups, mounts): run with sudo" >&2
  exit 1
fi

scripts/install-deps.sh
cargo nextest run --workspace --profile ci "$@"
