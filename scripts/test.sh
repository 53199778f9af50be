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

step "cargo test --workspace $*"
cargo test --workspace "$@"
