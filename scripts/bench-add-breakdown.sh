#!/bin/bash
# Where an exec'd ADD's time goes: a shell loop of N execs each of /bin/true, the plugin's
# VERSION and the plugin's ADD, against a release daemon and a single-member etcd on tmpfs, and
# the daemon's own histograms over the ADDs (its request time, its etcd transaction time).
# Means, not percentiles. Run as root after scripts/build-release.sh; loopback ports 23791,
# 23792 and 9791 must be free. Everything it starts is stopped and removed at the end.
set -eu
for tool in etcd curl target/dist/hostnic-ipamd target/dist/hostnic-ipam; do
    command -v "$tool" > /dev/null || [ -x "$(dirname "$0")/../$tool" ] ||
        { echo "bench-add-breakdown: $tool not found (scripts/install-deps.sh, scripts/build-release.sh)" >&2; exit 1; }
done
N=${N:-300}
cd "$(dirname "$0")/.."
dir=$(mktemp -d /dev/shm/hostnic-add-breakdown.XXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT
etcd --name bd --data-dir "$dir/etcd" \
    --listen-client-urls http://127.0.0.1:23791 --advertise-client-urls http://127.0.0.1:23791 \
    --listen-peer-urls http://127.0.0.1:23792 --initial-advertise-peer-urls http://127.0.0.1:23792 \
    --initial-cluster bd=http://127.0.0.1:23792 > "$dir/etcd.log" 2>&1 &
pids+=($!)
target/dist/hostnic-ipamd serve --etcd-endpoints http://127.0.0.1:23791 --node-name bd \
    --socket "$dir/ipamd.sock" --metrics-addr 127.0.0.1:9791 > "$dir/daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -S "$dir/ipamd.sock" ] && break; sleep 0.1; done
plugin=target/dist/hostnic-ipam
conf='{"cniVersion":"1.0.0","name":"bd","ipam":{"type":"hostnic-ipam","subnet":"10.200.0.0/16","socket":"'$dir'/ipamd.sock"}}'
add() { echo "$conf" | env -i CNI_COMMAND=ADD CNI_CONTAINERID="$1" CNI_NETNS=/proc/1/ns/net CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni "$plugin" > /dev/null; }
version() { echo "$conf" | env -i CNI_COMMAND=VERSION "$plugin" > /dev/null; }
floor() { echo "$conf" | env -i /bin/true > /dev/null; }
mean_us() { # command, then arguments; prints the mean wall time of N runs in µs
    local start end
    start=$(date +%s%N)
    for i in $(seq "$N"); do "$@" "c$i"; done
    end=$(date +%s%N)
    echo $(((end - start) / N / 1000))
}
add warm
echo "/bin/true: $(mean_us floor) µs"
echo "VERSION:   $(mean_us version) µs"
metric() { curl -s 127.0.0.1:9791/metrics | awk -v m="$1" 'index($0, m) == 1 { print $2; exit }'; }
req='hostnic_ipamd_request_duration_seconds_sum{verb="allocate"'
txn='hostnic_ipamd_etcd_transaction_duration_seconds_sum{result="committed"'
txns='hostnic_ipamd_etcd_transaction_duration_seconds_count{result="committed"'
r0=$(metric "$req"); t0=$(metric "$txn"); n0=$(metric "$txns")
echo "ADD:       $(mean_us add) µs"
r1=$(metric "$req"); t1=$(metric "$txn"); n1=$(metric "$txns")
awk -v r0="$r0" -v r1="$r1" -v t0="$t0" -v t1="$t1" -v n0="$n0" -v n1="$n1" -v n="$N" 'BEGIN {
    printf "daemon, per ADD request: %d µs; per etcd transaction: %d µs (%d for %d ADDs)\n",
        (r1 - r0) / n * 1e6, (t1 - t0) / (n1 - n0) * 1e6, n1 - n0, n }'
