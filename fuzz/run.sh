#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Runs every fuzz target for a bounded time (default 30 s each) on its checked-in corpus.
# Usage: fuzz/run.sh [seconds] [target...]   (needs cargo-fuzz and a nightly toolchain)
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== $t (${secs}s)"
    # New inputs go to a scratch corpus so the checked-in one only grows on purpose
    # (`cargo fuzz cmin` then copy); crashes land in artifacts/<target>/.
    scratch="$(mktemp -d)"
    if ! cargo +nightly fuzz run "$t" "$scratch" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -timeout=10; then
        status=1
    fi
    rm -rf "$scratch"
done
exit "$status"
