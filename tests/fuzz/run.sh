#!/usr/bin/env bash
# Coverage-guided fuzzing of precall's parsers with libFuzzer (cargo-fuzz), bounded in time.
#
#   bash tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Defaults: 60 s for each target of tests/fuzz/fuzz_targets/. Each run starts from the target's
# seeds (tests/fuzz/seeds/<target>/; the RFC 4475 torture set too for sip_datagram) and the
# corpus earlier runs grew (tests/fuzz/corpus/<target>/, not committed). A crash stops the run
# with the input in tests/fuzz/artifacts/<target>/: fix the bug, then copy the input to
# tests/fuzz/regressions/<target>/ so the README's test command replays it for good.
#
# cargo-fuzz passes -Z flags to rustc; the stable toolchain accepts them with RUSTC_BOOTSTRAP=1.
# No sanitizer (the parsers are safe Rust: libFuzzer catches panics, and debug assertions are
# on, so an arithmetic overflow is a crash too).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "tests/fuzz/run.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version '^0.13'
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build --fuzz-dir . -s none -a
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    dirs=("corpus/$t" "seeds/$t")
    [ "$t" = sip_datagram ] && dirs+=(../../engine/sip/tests/torture)
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    echo "== $t: ${secs} s"
    mkdir -p artifacts
    log="artifacts/$t.log"
    set +e
    cargo fuzz run --fuzz-dir . -s none -a "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -max_len=8192 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    grep -E '^(Done [0-9]+ runs|stat::(number_of_executed_units|peak_rss_mb)|INFO: seed corpus:|SUMMARY|.*panicked at|==[0-9]+== ERROR)' "$log" || true
    if [ "$status" -ne 0 ]; then
        echo "tests/fuzz/run.sh: $t failed (exit $status): see tests/fuzz/$log; the input is in tests/fuzz/artifacts/$t/"
        exit "$status"
    fi
done
