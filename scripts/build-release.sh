#!/bin/sh
# Builds what is shipped, from this checkout, into target/dist:
# - hostnic-ipamd, the daemon and its operator commands (cargo's release profile);
# - the CNI plugins hostnic-ipam and hostnic, statically linked (glibc's static-pie). A plugin
#   is exec'd once per attachment; without the dynamic loader its start-up costs what
#   /bin/true's does (BENCHMARKS.md, "Plugin exec path").
# The daemon stays dynamically linked: it resolves etcd's and the API server's names through
# the system's resolver (NSS), which a static glibc cannot load reliably.
# Extra arguments go to both cargo builds (e.g. --locked).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bin hostnic-ipamd "$@"
host=$(rustc -vV | sed -n 's/^host: //p')
# With an explicit --target, RUSTFLAGS reach only that target's crates, not the build scripts
# and proc-macros, which cannot be linked statically.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --target "$host" --bin hostnic-ipam --bin hostnic "$@"
mkdir -p target/dist
cp target/release/hostnic-ipamd target/dist/
cp "target/$host/release/hostnic-ipam" "target/$host/release/hostnic" target/dist/
echo "shipped binaries: target/dist"
