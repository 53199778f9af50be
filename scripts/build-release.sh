#!/bin/sh
# Builds what is shipped, from this checkout:
# - target/release: hostnic-ipamd and its tools (cargo's release profile);
# - target/<host triple>/release: the CNI plugins hostnic-ipam and hostnic, statically linked
#   (glibc's static-pie). A plugin is exec'd once per attachment; without the dynamic loader its
#   start-up costs what /bin/true's does (BENCHMARKS.md, "Plugin exec path").
# The daemon stays dynamically linked: it resolves etcd's and the API server's names through
# the system's resolver (NSS), which a static glibc cannot load reliably.
# Extra arguments go to both cargo builds (e.g. --locked).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bins "$@"
host=$(rustc -vV | sed -n 's/^host: //p')
# With an explicit --target, RUSTFLAGS reach only that target's crates, not the build scripts
# and proc-macros, which cannot be linked statically.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --target "$host" -p hostnic-cni --bins "$@"
echo "daemon and tools: target/release; plugins (static): target/$host/release"
