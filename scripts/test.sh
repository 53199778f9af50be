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

# The end-to-end tests exec the daemon and plugin binaries of other packages, which `cargo test`
# does not build beside them with their dep-info; they refuse a binary older than its sources.
step "cargo build --workspace --bins"
cargo build --workspace --bins

step "cargo test --workspace --lib --bins --tests $*"
log=$(mktemp)
# hostnic-testkit appends one line per skip here (`test|part <TAB> exe <TAB> test <TAB> reason`):
# a skipped test returns early and libtest counts it as passed, so the script counts skips itself.
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
export HOSTNIC_TEST_SKIP_LOG="$skips"
status=0
cargo test --workspace --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?

# Every skip with its reason, then one closing line for the whole workspace (cargo prints one
# per test binary). "skipped" counts tests that reported a skip (once per test, however many
# lines it printed); libtest counted them as passed, so they are taken out of "passed".
# Ignored tests (#[ignore]: helpers run by other tests) are neither, and are listed apart.
awk -F'\t' -v testlog="$log" '
  $1 == "test" { key = $2 "\t" $3; if (!(key in whole)) { whole[key] = 1; nwhole++ } reasons[++n] = "  skipped: " $4 " (" $3 ")" }
  $1 == "part" { nparts++; reasons[++n] = "  skipped part: " $4 " (" $3 ")" }
  END {
    while ((getline line < testlog) > 0) {
      if (line ~ /^test result: /) { split(line, w, " "); p += w[4]; f += w[6]; i += w[8] }
    }
    if (n) { printf "\nskips:\n"; for (k = 1; k <= n; k++) print reasons[k] }
    printf "\n%d ignored (#[ignore]), %d skipped parts of tests that ran\n", i, nparts
    passed = p - nwhole; if (passed < 0) passed = 0
    printf "tests: %d passed, %d failed, %d skipped\n", passed, f, nwhole
  }' "$skips"
exit "$status"
