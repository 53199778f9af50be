#!/usr/bin/env bash
# The demo, on a fresh Debian machine, as root: one node, three "pods" (network namespaces)
# attached by the reference macvlan plugin, which delegates to hostnic-ipam; hostnic-ipamd commits
# every address to etcd. Shows each pod's address, the etcd records, pings between the pods,
# then deletes the pods and shows the records are gone.
#
# Everything it creates (etcd and the daemon, by PID; the namespaces; the veth parent; its temp
# dir) is removed on any exit, including failure and Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# `ip` lives in /usr/sbin, which a non-login shell may not have on PATH.
export PATH="$PATH:/usr/sbin:/sbin"
export ETCDCTL_API=3

PODS=3
SUBNET=10.99.0.0/24
PREFIX=/hostnic-demo
NODE=demo-node

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'demo: %s\n' "$*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root: the demo creates network namespaces and links"

# --- cleanup -----------------------------------------------------------------------------------
WORK=""
ETCD_PID=""
DAEMON_PID=""
NETNS=()
LINKS=()

stop_pid() { # SIGTERM, up to 5 s, then SIGKILL
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  [ -n "$DAEMON_PID" ] && stop_pid "$DAEMON_PID"
  [ -n "$ETCD_PID" ] && stop_pid "$ETCD_PID"
  local ns link
  for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null; done
  for link in "${LINKS[@]}"; do ip link del "$link" 2>/dev/null; done
  [ -n "$WORK" ] && rm -rf "$WORK"
  if [ "$status" -eq 0 ]; then
    printf '\n==> cleaned up: processes, namespaces, links and %s removed\n' "${WORK:-temp dir}"
  else
    printf '\ndemo: failed (exit %s); everything it created was removed\n' "$status" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- dependencies and build --------------------------------------------------------------------
step "dependencies"
scripts/install-deps.sh

# The binaries as shipped: target/dist of this checkout.
unset CARGO_TARGET_DIR
step "scripts/build-release.sh"
scripts/build-release.sh
BIN=$PWD/target/dist
for b in hostnic-ipamd hostnic-ipam; do
  [ -x "$BIN/$b" ] || die "$BIN/$b was not built"
done

WORK=$(mktemp -d /tmp/hostnic-demo.XXXXXX)

# --- etcd --------------------------------------------------------------------------------------
port_free() { [ -z "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
pick_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 30000))
    if port_free "$p" && [ "$p" != "${1:-}" ]; then
      echo "$p"
      return
    fi
  done
}
CLIENT_PORT=$(pick_port)
PEER_PORT=$(pick_port "$CLIENT_PORT")
ENDPOINT=http://127.0.0.1:$CLIENT_PORT

step "etcd on $ENDPOINT (data in $WORK/etcd)"
etcd --name demo --data-dir "$WORK/etcd" --logger=zap --log-outputs=stderr \
  --listen-client-urls "$ENDPOINT" --advertise-client-urls "$ENDPOINT" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "demo=http://127.0.0.1:$PEER_PORT" --initial-cluster-state new \
  >"$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 150); do
  etcdctl --endpoints "$ENDPOINT" --dial-timeout=1s endpoint health >/dev/null 2>&1 && break
  kill -0 "$ETCD_PID" 2>/dev/null || { tail -20 "$WORK/etcd.log" >&2; die "etcd exited"; }
  sleep 0.1
done
etcdctl --endpoints "$ENDPOINT" endpoint health || { tail -20 "$WORK/etcd.log" >&2; die "etcd not healthy"; }

# --- the daemon --------------------------------------------------------------------------------
SOCKET=$WORK/ipamd.sock
step "hostnic-ipamd (node $NODE, socket $SOCKET, etcd prefix $PREFIX)"
"$BIN/hostnic-ipamd" --etcd-endpoints "$ENDPOINT" --node-name "$NODE" \
  --socket "$SOCKET" --etcd-prefix "$PREFIX" >"$WORK/ipamd.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do
  [ -S "$SOCKET" ] && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { tail -20 "$WORK/ipamd.log" >&2; die "hostnic-ipamd exited"; }
  sleep 0.1
done
[ -S "$SOCKET" ] || { tail -20 "$WORK/ipamd.log" >&2; die "hostnic-ipamd did not create $SOCKET"; }
echo "hostnic-ipamd running, pid $DAEMON_PID"

# --- CNI_PATH, the macvlan parent, the network config ------------------------------------------
CNI_BIN=$WORK/cni-bin
mkdir "$CNI_BIN"
for p in /usr/lib/cni/*; do ln -s "$p" "$CNI_BIN/"; done
ln -sf "$BIN/hostnic-ipam" "$CNI_BIN/hostnic-ipam"

# No dummy links on this kernel: a veth pair, both ends up, is the macvlan parent.
PARENT=hnd$$a
PEER=hnd$$b
ip link add "$PARENT" type veth peer name "$PEER"
LINKS+=("$PARENT")
ip link set "$PARENT" up
ip link set "$PEER" up

CONF=$WORK/10-hostnic-demo.conf
cat >"$CONF" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "hostnic-demo",
  "type": "macvlan",
  "master": "$PARENT",
  "mode": "bridge",
  "ipam": {
    "type": "hostnic-ipam",
    "socket": "$SOCKET",
    "subnet": "$SUBNET",
    "routes": [{ "dst": "10.250.0.0/16" }]
  }
}
EOF
step "network config $CONF (macvlan on $PARENT, delegating to hostnic-ipam)"
cat "$CONF"

# cni COMMAND POD [EXTRA_CNI_ARGS]: execs the real macvlan plugin as a runtime would.
cni() {
  CNI_COMMAND=$1 CNI_CONTAINERID=$2 CNI_NETNS=/var/run/netns/$2 CNI_IFNAME=eth0 \
    CNI_PATH=$CNI_BIN CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=$2${3:+;$3}" \
    /usr/lib/cni/macvlan <"$CONF"
}

# The last pod asks for an exact address, as `CNI_ARGS IP=` (or Multus runtimeConfig.ips) does.
FIXED_IP=${SUBNET%.0/24}.50

pod_addr() { ip -n "$1" -4 -o addr show dev eth0 scope global | awk '{print $4}'; }

# --- ADD ---------------------------------------------------------------------------------------
POD_NAMES=()
for i in $(seq 0 $((PODS - 1))); do
  POD_NAMES+=("hostnic-demo-$$-pod$i")
done
for pod in "${POD_NAMES[@]}"; do
  ip netns add "$pod"
  NETNS+=("$pod")
  ip -n "$pod" link set lo up
  if [ "$pod" = "${POD_NAMES[-1]}" ]; then
    step "ADD $pod asking for IP=$FIXED_IP"
    cni ADD "$pod" "IP=$FIXED_IP"
  else
    step "ADD $pod"
    cni ADD "$pod"
  fi
  echo
done

THIEF=hostnic-demo-$$-thief
ip netns add "$THIEF"
NETNS+=("$THIEF")
step "ADD $THIEF asking for the same IP=$FIXED_IP: refused, nothing allocated"
if cni ADD "$THIEF" "IP=$FIXED_IP"; then die "$THIEF got an address another pod holds"; fi
echo
cni DEL "$THIEF" >/dev/null

step "pod addresses"
ADDRS=()
for pod in "${POD_NAMES[@]}"; do
  addr=$(pod_addr "$pod")
  [ -n "$addr" ] || die "$pod has no address on eth0"
  printf '%-28s %s\n' "$pod" "$addr"
  ADDRS+=("${addr%/*}")
done
[ "$(printf '%s\n' "${ADDRS[@]}" | sort -u | wc -l)" -eq "$PODS" ] || die "pods share an address"

step "etcd records (etcdctl get --prefix $PREFIX/)"
etcdctl --endpoints "$ENDPOINT" get --prefix "$PREFIX/"

step "hostnic-ipamd list / usage / audit"
OPERATOR=(--etcd-endpoints "$ENDPOINT" --etcd-prefix "$PREFIX" --node-name "$NODE")
RUST_LOG=warn "$BIN/hostnic-ipamd" list "${OPERATOR[@]}"
echo
RUST_LOG=warn "$BIN/hostnic-ipamd" usage "${OPERATOR[@]}"
echo
RUST_LOG=warn "$BIN/hostnic-ipamd" audit "${OPERATOR[@]}"

step "ping between pods"
for i in "${!POD_NAMES[@]}"; do
  for j in "${!ADDRS[@]}"; do
    [ "$i" -eq "$j" ] && continue
    if ip netns exec "${POD_NAMES[$i]}" ping -c1 -W1 -q "${ADDRS[$j]}" >/dev/null; then
      printf '%s -> %s: ok\n' "${POD_NAMES[$i]}" "${ADDRS[$j]}"
    else
      die "${POD_NAMES[$i]} cannot reach ${ADDRS[$j]}"
    fi
  done
done

# --- DEL ---------------------------------------------------------------------------------------
for pod in "${POD_NAMES[@]}"; do
  step "DEL $pod"
  cni DEL "$pod"
  echo "ok"
done

step "allocation records after DEL (etcdctl get --prefix $PREFIX/ --keys-only)"
etcdctl --endpoints "$ENDPOINT" get --prefix "$PREFIX/" --keys-only
left=$(etcdctl --endpoints "$ENDPOINT" get --prefix "$PREFIX/" --keys-only | grep -E '/(ips|handles)/' || true)
[ -z "$left" ] || die "allocation records left after DEL: $left"
echo "no ips/ or handles/ records left (pool and block records stay)"
