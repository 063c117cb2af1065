#!/usr/bin/env bash
# Benchmarks of the real release binaries on this machine; prints a Markdown table.
# Usage: bash tests/bench.sh        (BENCH_SCALE=N multiplies the record counts;
#                                   BENCH_ONLY=pipeline, kafka, network, wire, memory, drain, frontdoor, boot,
#                                   transforms, peers, flash or log runs one group; BENCH_BASELINE=<git ref> builds
#                                   that version's agent and ingest and runs them beside this one in the memory,
#                                   drain, frontdoor, boot, flash and log tables; BENCH_HEAP_PROFILE=<dir> runs the memory
#                                   table's agents under heaptrack; the memory table also runs the agent as
#                                   packaged: the gateway build, with the systemd unit's environment)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh test   # build tools and the tansu broker
# The examples: the drain table's limit (agent/examples/buffer_drain.rs).
cargo build --release --workspace --bins --examples
case "${BENCH_ONLY:-memory}" in
  memory)
    # What the packages ship (fat LTO, one codegen unit, panic=abort): the memory table runs it too.
    cargo build --profile gateway -p edge-agent
    export BENCH_PACKAGED_AGENT="$PWD/target/gateway/edge-agent" ;;
esac
if [ -n "${BENCH_BASELINE:-}" ]; then
  # The baseline's agent and ingest, built from its own tree with its own target dir. The tree
  # is unpacked outside this one: cargo reads .cargo/config.toml from every directory above
  # the build, and this tree's (SQLite's build flags) must not reach an older version.
  src="${TMPDIR:-/tmp}/edge-bench-baseline-src"
  rm -rf "$src" && mkdir -p "$src"
  git archive "$BENCH_BASELINE" | tar -x -C "$src"
  (cd "$src" && CARGO_TARGET_DIR="$OLDPWD/target/bench-baseline/target" cargo build --release -p edge-agent -p cloud-ingest --bins)
  export BENCH_BASELINE_DIR="$PWD/target/bench-baseline/target/release"
fi
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m)"
./target/release/bench
