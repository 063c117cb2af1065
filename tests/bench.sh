#!/usr/bin/env bash
# Benchmarks of the real release binaries on this machine; prints a Markdown table.
# Usage: bash tests/bench.sh        (BENCH_SCALE=N multiplies the record counts;
#                                   BENCH_ONLY=pipeline, kafka or network runs one group)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh test   # build tools and the tansu broker
cargo build --release --workspace --bins
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m)"
./target/release/bench
