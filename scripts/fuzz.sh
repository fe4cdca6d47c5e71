#!/usr/bin/env bash
# Fuzzes the sans-IO protocol core with cargo-fuzz (libFuzzer) for a bounded
# time per target:  scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# The committed seeds are in fuzz/corpus/<target>; what the fuzzer finds goes
# to a temporary corpus, crashes to fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-${FUZZ_SECONDS:-60}}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes unstable compiler flags; this toolchain is stable.
export RUSTC_BOOTSTRAP=1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
for target in result_reassembler message_parser; do
    mkdir -p "$work/$target"
    echo "== $target for ${seconds}s"
    cargo fuzz run --release "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>&1 | tee "$work/$target.log" \
        | grep -E "^#[0-9]+ +(DONE|INITED)|stat::number_of_executed_units|ERROR|panicked" || true
    if ! grep -q "Done [0-9]* runs" "$work/$target.log"; then
        echo "FAILED: $target did not finish cleanly (see fuzz/artifacts/$target)" >&2
        tail -30 "$work/$target.log" >&2
        status=1
    fi
done
exit "$status"
