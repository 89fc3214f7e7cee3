#!/usr/bin/env bash
# Tears down what scripts/cluster-up.sh brought up: the pods (through the agent, so CNI DEL and
# sandbox removal run), then the agent, the shim and the control plane, then their state.
# Usage: sudo scripts/cluster-down.sh [--keep-state]
set -euo pipefail
cd "$(dirname "$0")/.."

home=${FERROLET_HOME:-/var/lib/ferrolet-quickstart}
keep_state=false
[[ ${1:-} == --keep-state ]] && keep_state=true
[[ $(id -u) -eq 0 ]] || { echo "cluster-down: needs root" >&2; exit 1; }
[[ -d $home ]] || { echo "nothing to tear down: $home does not exist"; exit 0; }

kubeconfig=$home/control-plane/admin.kubeconfig
alive() { [[ -f $home/run/$1.pid ]] && kill -0 "$(<"$home/run/$1.pid")" 2>/dev/null; }

if alive control-plane && alive agent && [[ -s $kubeconfig ]]; then
  echo "==> deleting every pod so the agent tears them down"
  kubectl --kubeconfig "$kubeconfig" delete deployments,replicasets,services,pods --all \
    --all-namespaces --wait=true --timeout=120s >/dev/null 2>&1 || true
  kubectl --kubeconfig "$kubeconfig" delete pods --all -A --wait=true --timeout=60s \
    >/dev/null 2>&1 || true
fi

for name in agent shim control-plane; do
  pidfile=$home/run/$name.pid
  [[ -f $pidfile ]] || continue
  pid=$(<"$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    echo "==> stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done

if ! $keep_state; then
  # Containers outlive the shim by design; with the cluster gone, stop whatever is left in the
  # shim's cgroup parent and remove the parent's empty directories.
  for ctl in /sys/fs/cgroup/pids /sys/fs/cgroup/memory /sys/fs/cgroup; do
    [[ -d $ctl/ferrolet ]] || continue
    find "$ctl/ferrolet" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  sleep 0.5
  for ctl in /sys/fs/cgroup/*/ferrolet /sys/fs/cgroup/ferrolet; do
    [[ -d $ctl ]] && find "$ctl" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  # Anything a pod left mounted under our state (a crash mid-teardown) goes first.
  # (grep finds nothing after a clean teardown: that is not a failure under pipefail.)
  { grep -o " $home/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  ip link del ferro0 2>/dev/null || true
  # The service proxy leaves its chains in place when it stops (as kube-proxy does, so a
  # restart keeps Services working); with the cluster gone, remove the jumps and the chains.
  for table in nat filter; do
    iptables -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j FERRO-' | sed 's/^-A /-D /' |
      while read -r rule; do eval "iptables -t $table $rule" || true; done
    chains=$(iptables -t "$table" -S 2>/dev/null | awk '/^-N FERRO-/ {print $2}')
    for c in $chains; do iptables -t "$table" -F "$c" || true; done
    for c in $chains; do iptables -t "$table" -X "$c" || true; done
  done
  rm -rf "$home"
  echo "==> removed $home"
fi
