#!/usr/bin/env bash
# The full test suite on a fresh Debian 12 machine: installs what the tests need (Debian's
# mosquitto-clients, an MQTT client we did not write), builds every binary, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

install_debs() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}
command -v mosquitto_pub >/dev/null 2>&1 || install_debs mosquitto-clients

# The end-to-end tests start the real binaries: build them first, in the same profile.
cargo build --workspace --bins --locked
cargo test --workspace --locked
