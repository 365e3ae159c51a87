#!/usr/bin/env bash
# Line coverage of the workspace (benches and test code excluded), measured with
# cargo-tarpaulin's LLVM engine on the stable toolchain (no llvm-tools needed: tarpaulin reads
# the profiles itself). Every test of tests/run.sh runs, the end-to-end ones included: the
# `precall` binary they start is built instrumented and writes its profile when it exits.
# Prints line coverage per crate and in total, and the uncovered lines of the worst files.
# Slower than tests/run.sh (an instrumented build of its own, in target/coverage); not a gate.
set -euo pipefail
cd "$(dirname "$0")/.."

source tests/install.sh
if ! cargo tarpaulin --version >/dev/null 2>&1; then
    echo "tests/coverage.sh: installing cargo-tarpaulin"
    cargo install cargo-tarpaulin --locked --version '^0.37'
fi

out=target/coverage/report
mkdir -p "$out"
set +e
cargo tarpaulin --engine llvm --workspace --exclude precall-benches --all-targets \
    --target-dir target/coverage --output-dir "$out" --out Json --skip-clean \
    --no-fail-fast --timeout 600 \
    --exclude-files 'tests/*' '*/tests/*' 'benches/*' '*/benches/*' 2>&1 |
    grep -E '^(test result|.*FAILED|.*panicked|error)' || true
status=${PIPESTATUS[0]}
set -e
python3 tests/coverage_report.py "$out/tarpaulin-report.json"
exit "$status"
