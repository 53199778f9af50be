#!/usr/bin/env bash
# The project's one test command: installs what is missing, checks formatting and lints, runs
# every crate's tests. Extra arguments go to `cargo test` (e.g. `scripts/test.sh -- --nocapture`).
#
# Plain `cargo test`, not nextest: the tests of one binary share one etcd cluster per process
# (hostnic-testkit's shared_single/shared_cluster3), which nextest's process-per-test defeats.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "scripts/install-deps.sh"
scripts/install-deps.sh

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# `ip` and friends live in the sbin directories, which a minimal PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

step "cargo test --workspace --lib --bins --tests $*"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"

# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result: /{p+=$4; f+=$6; s+=$8} END {printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, s}' "$log"
