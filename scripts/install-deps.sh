#!/usr/bin/env bash
# Installs every Debian package that building and testing ferrolet needs. Idempotent: when all
# are present it does nothing, so running it before every test run costs nothing.
set -euo pipefail

packages=(
  # build
  build-essential pkg-config protobuf-compiler libprotobuf-dev
  # the real peers the tests and benchmarks use
  containerd runc etcd-server etcd-client
  iptables nftables conntrack iproute2 util-linux procps
  containernetworking-plugins busybox-static skopeo docker-registry
  sqlite3 jq curl socat python3-kubernetes systemd
)

wanted=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    wanted+=("$p")
  fi
done

if ((${#wanted[@]})); then
  echo "installing: ${wanted[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${wanted[@]}"
fi

# Debian starts these services on install; the tests run their own private instances.
for svc in containerd etcd docker-registry; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

command -v kubectl >/dev/null || echo "warning: kubectl is not installed; the kubectl tests will fail" >&2
