#!/usr/bin/env bash
# The full test suite on a fresh Debian 12 machine: installs what the tests need (tests/setup.sh:
# build tools, mosquitto-clients, nats-server, confluent-kafka, the tansu Kafka broker;
# cross/build.sh: zig, qemu-user), builds every binary (and the agent for aarch64 and armv7),
# runs every test. The brokers are started by the tests themselves, on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh test

# The end-to-end tests start the real binaries: build them first, in the same profile.
cargo build --workspace --bins --locked
# The ARM agents and packages, as shipped (`gateway` profile), that tests/tests/arm.rs runs
# under qemu and inspects.
bash cross/build.sh
# Each fuzz target (fuzz/tests/targets.rs) runs for 30 s of generated and mutated inputs.
FUZZ_SECONDS="${FUZZ_SECONDS:-30}" cargo test --workspace --locked
