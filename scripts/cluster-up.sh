#!/usr/bin/env bash
# Brings up a one-node ferrolet cluster on this host and runs the sample app:
#   control plane (embedded SQLite store, scheduler, controllers), ferrolet-shim, ferrolet
#   (agent + service proxy) with our CNI plugins, the pause and busybox images built locally,
#   then deploy/sample-app.yaml answering through its ClusterIP and its NodePort.
#
# Usage: sudo scripts/cluster-up.sh
#
# Everything lives under $FERROLET_HOME (default /var/lib/ferrolet-quickstart): binaries,
# state, logs, pid files. Running it again converges: processes that run the current binaries
# are kept, missing ones are started, the sample app is re-applied. scripts/cluster-down.sh
# removes it all.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

home=${FERROLET_HOME:-/var/lib/ferrolet-quickstart}
listen=${FERROLET_API_LISTEN:-127.0.0.1:6443}
cluster_cidr=10.244.0.0/16
pod_cidr=10.244.0.0/24
service_cidr=10.96.0.0/12
node=$(hostname | tr '[:upper:]' '[:lower:]')
profile=${FERROLET_PROFILE:-release}

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'cluster-up: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (namespaces, cgroups, mounts, iptables): run with sudo"

say "installing the system packages ferrolet needs"
scripts/install-deps.sh

say "building ferrolet ($profile)"
target=${CARGO_TARGET_DIR:-$repo/target}
cargo_profile=(--release)
[[ $profile == debug ]] && cargo_profile=()
cargo build "${cargo_profile[@]}" --locked --bins \
  -p ferrolet -p ferrolet-shim -p ferrolet-control-plane -p ferrolet-cni -p ferrolet-oci-image
# The pause program must be static: it runs alone in the infra container's empty root.
cargo rustc --release --locked -p ferrolet-pause --bin ferrolet-pause \
  --target-dir "$repo/target/static" -- -C target-feature=+crt-static
bin_src=$target/$profile

mkdir -p "$home"/{bin,cni/bin,cni/net.d,logs,run,images}
install_bin() { # src dst: atomic replace, so a running process keeps its old inode
  install -m 0755 "$1" "$2.new" && mv -f "$2.new" "$2"
}
if ! cmp -s "$bin_src/ferrolet" "$home/bin/ferrolet" 2>/dev/null ||
  ! cmp -s "$bin_src/ferrolet-shim" "$home/bin/ferrolet-shim" 2>/dev/null ||
  ! cmp -s "$bin_src/ferrolet-control-plane" "$home/bin/ferrolet-control-plane" 2>/dev/null; then
  say "installing binaries into $home/bin"
fi
for b in ferrolet ferrolet-shim ferrolet-control-plane ferrolet-image; do
  cmp -s "$bin_src/$b" "$home/bin/$b" 2>/dev/null || install_bin "$bin_src/$b" "$home/bin/$b"
done
pause_src=$repo/target/static/release/ferrolet-pause
cmp -s "$pause_src" "$home/bin/ferrolet-pause" 2>/dev/null || install_bin "$pause_src" "$home/bin/ferrolet-pause"
for p in bridge host-local loopback portmap; do
  cmp -s "$bin_src/$p" "$home/cni/bin/$p" 2>/dev/null || install_bin "$bin_src/$p" "$home/cni/bin/$p"
done

cat >"$home/cni/net.d/10-ferrolet.conflist.new" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "ferrolet",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "ferro0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$home/cni/ipam",
        "ranges": [[{ "subnet": "$pod_cidr" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
    { "type": "loopback" }
  ]
}
EOF
mv -f "$home/cni/net.d/10-ferrolet.conflist.new" "$home/cni/net.d/10-ferrolet.conflist"

# start NAME CMD...: keeps a process that runs the installed binary, (re)starts otherwise.
start() {
  local name=$1 pidfile=$home/run/$1.pid pid exe
  shift
  if [[ -f $pidfile ]]; then
    pid=$(<"$pidfile")
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    if [[ $exe == "$1" ]]; then
      echo "    $name is running (pid $pid)"
      return
    fi
    if [[ -n $exe ]]; then
      echo "    $name runs an older binary: restarting it"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  fi
  setsid "$@" >>"$home/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "    $name started (pid $!, log $home/logs/$name.log)"
}

# wait_for WHAT SECONDS CMD...: polls CMD until it succeeds, or fails with WHAT.
wait_for() {
  local what=$1 secs=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what (logs: $home/logs)"
    sleep 0.5
  done
}

say "starting the control plane on https://$listen"
start control-plane "$home/bin/ferrolet-control-plane" \
  --data-dir "$home/control-plane" --listen "$listen" \
  --cluster-cidr "$cluster_cidr" --service-cluster-ip-range "$service_cidr"
kubeconfig=$home/control-plane/admin.kubeconfig
wait_for "the admin kubeconfig" 60 test -s "$kubeconfig"
k() { kubectl --kubeconfig "$kubeconfig" "$@"; }
wait_for "the API server" 60 k get --raw /readyz

say "starting ferrolet-shim"
start shim "$home/bin/ferrolet-shim" serve --socket "$home/run/shim.sock" --root "$home/shim" \
  --cgroup-parent ferrolet --pause-binary "$home/bin/ferrolet-pause"
wait_for "the shim's socket" 30 test -S "$home/run/shim.sock"

say "building the busybox image and importing it into the shim"
if [[ ! -s $home/images/busybox.tar || /bin/busybox -nt $home/images/busybox.tar ]]; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  mkdir -p "$rootfs"/{bin,etc,root,tmp,var/www}
  chmod 1777 "$rootfs/tmp"
  cp /bin/busybox "$rootfs/bin/busybox"
  for a in $(/bin/busybox --list); do
    [[ $a == busybox ]] || ln -sf busybox "$rootfs/bin/$a"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' >"$rootfs/etc/group"
  "$home/bin/ferrolet-image" build --rootfs "$rootfs" --tag ferrolet.local/busybox:latest \
    --cmd '["sh"]' --chown 0:0 --format oci-archive --output "$home/images/busybox.tar.new"
  mv -f "$home/images/busybox.tar.new" "$home/images/busybox.tar"
fi
"$home/bin/ferrolet-shim" images import --root "$home/shim" "$home/images/busybox.tar"

say "starting ferrolet on node $node"
start agent "$home/bin/ferrolet" \
  --kubeconfig "$kubeconfig" --node-name "$node" \
  --container-runtime-endpoint "unix://$home/run/shim.sock" --root-dir "$home/agent" \
  --cni-bin-dir "$home/cni/bin" --cni-conf-dir "$home/cni/net.d" \
  --cluster-cidr "$cluster_cidr" --service-cluster-ip-range "$service_cidr"
wait_for "node $node to be Ready" 120 \
  k wait --for=condition=Ready "node/$node" --timeout=5s

say "deploying the sample app (deploy/sample-app.yaml)"
k apply -f deploy/sample-app.yaml
k rollout status deployment/hello --timeout=180s

cluster_ip=$(k get service hello -o jsonpath='{.spec.clusterIP}')
node_port=$(k get service hello -o jsonpath='{.spec.ports[0].nodePort}')
wait_for "the sample app on its ClusterIP $cluster_ip" 60 curl -fsS --max-time 2 "http://$cluster_ip/"
wait_for "the sample app on NodePort $node_port" 60 curl -fsS --max-time 2 "http://127.0.0.1:$node_port/"
say "the sample app answers"
echo "    ClusterIP  http://$cluster_ip/        -> $(curl -fsS --max-time 2 "http://$cluster_ip/")"
echo "    NodePort   http://127.0.0.1:$node_port/  -> $(curl -fsS --max-time 2 "http://127.0.0.1:$node_port/")"
k get pods -o wide
cat <<EOF

The cluster is up. Use it with:
    export KUBECONFIG=$kubeconfig
    kubectl get nodes,pods,services
Logs: $home/logs    Tear down: sudo scripts/cluster-down.sh
EOF
