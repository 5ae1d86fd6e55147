#!/usr/bin/env bash
# `make fuzz`: every cargo-fuzz target for FUZZ_SECONDS each (default 60), from the corpus in
# fuzz/corpus/<target>, with a memory cap per run. New inputs that add coverage are kept in the
# corpus (commit them); a crash, a leak, a timeout or an out-of-memory stops the run, leaves the
# input in fuzz/artifacts/<target>/ and fails the target. FUZZ_TARGETS narrows the list.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH"

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
# Nightly and cargo-fuzz are what this needs beyond the stable toolchain.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
cargo +nightly fuzz build -O
failed=()
for t in $targets; do
    mkdir -p "corpus/$t"
    echo "== $t: ${FUZZ_SECONDS}s"
    # -rss_limit_mb: a single input may not make the code under test hold more than this.
    # -timeout: no input may take longer (a hang is a finding, like a crash).
    if ! cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=20 \
        -max_len=262144 -print_final_stats=1; then
        failed+=("$t")
    fi
done
if ((${#failed[@]})); then
    echo "fuzz: findings in ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: ${targets//$'\n'/ }: no crashes in ${FUZZ_SECONDS}s each"
