#!/usr/bin/env bash
# Builds edge-agent for ARM gateways, smoke-tests each binary under qemu-user, and packages it
# (.deb and tarball). Idempotent: installs only what is missing. On a fresh Debian 12 machine:
#
#   bash cross/build.sh                  # aarch64 and armv7
#   ARCHS=aarch64 bash cross/build.sh    # one of them
#   PROFILE=release bash cross/build.sh  # faster build, bigger binary
#
# Output in target/cross/: <arch>/edge-agent, edge-agent_<version>_<arm64|armhf>.deb,
# edge-agent-<version>-<arch>.tar.gz.
#
# How: cargo-zigbuild with zig as the C compiler and linker (both from PyPI), so the bundled C
# (SQLite, zstd, aws-lc) cross-compiles without a Debian cross toolchain. Static musl when
# rustup can install the target's standard library; otherwise glibc, linked against glibc
# 2.17 so it runs on any gateway distribution of the last ten years.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=${ARCHS:-"aarch64 armv7"}
PROFILE=${PROFILE:-gateway}
OUT=target/cross

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
need_debs=()
for pkg in qemu-user-static dpkg-dev file; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_debs+=("$pkg")
done
if [ ${#need_debs[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_debs[@]}"
fi
command -v cargo-zigbuild >/dev/null 2>&1 && python3 -c 'import ziglang' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check cargo-zigbuild==0.24.1 ziglang==0.17.1

# The first target whose standard library rustup can install; prints it.
pick_target() {
  for t in "$@"; do
    if rustup target list --installed | grep -qx "$t" || rustup target add "$t" >/dev/null 2>&1; then
      echo "$t"
      return 0
    fi
  done
  return 1
}

version=$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="edge-agent"))')
mkdir -p "$OUT"
for arch in $ARCHS; do
  case "$arch" in
    aarch64) candidates=(aarch64-unknown-linux-musl aarch64-unknown-linux-gnu); qemu=qemu-aarch64-static; deb=arm64 ;;
    armv7)   candidates=(armv7-unknown-linux-musleabihf armv7-unknown-linux-gnueabihf); qemu=qemu-arm-static; deb=armhf ;;
    *) echo "unknown arch $arch (aarch64 or armv7)" >&2; exit 2 ;;
  esac
  target=$(pick_target "${candidates[@]}") || {
    echo "error: rustup could not install the standard library for any of: ${candidates[*]}" >&2
    echo "       (rustup needs https://static.rust-lang.org; see cross/README.md for other routes)" >&2
    exit 1
  }
  zig_target=$target
  sysroot=""
  case "$target" in
    *-gnu*)
      zig_target="$target.2.17"
      # qemu-user needs the target's dynamic loader and libc to run a glibc build here.
      case "$arch" in aarch64) libc_deb=libc6-arm64-cross; sysroot=/usr/aarch64-linux-gnu ;;
                      armv7) libc_deb=libc6-armhf-cross; sysroot=/usr/arm-linux-gnueabihf ;; esac
      dpkg-query -W -f='${Status}' "$libc_deb" 2>/dev/null | grep -q "install ok installed" || {
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$libc_deb"
      } ;;
  esac
  echo "== $arch: $zig_target, profile $PROFILE"
  start=$(date +%s)
  cargo zigbuild --locked -p edge-agent --profile "$PROFILE" --target "$zig_target"
  mkdir -p "$OUT/$arch"
  cp "target/$target/$PROFILE/edge-agent" "$OUT/$arch/edge-agent"
  echo "$target" > "$OUT/$arch/target"
  echo "   built in $(( $(date +%s) - start )) s: $(stat -c %s "$OUT/$arch/edge-agent") bytes; $(file -b "$OUT/$arch/edge-agent" | cut -d, -f1-2)"

  # A launcher for this machine (no binfmt_misc here): qemu-user, plus the target's libc for
  # a glibc build (-E keeps qemu from mixing in another glibc; see cross/README.md).
  if [ -n "$sysroot" ]; then
    qemu_args="-L $sysroot -E LD_LIBRARY_PATH=$sysroot/lib"
  else
    qemu_args=""
  fi
  printf '#!/bin/sh\nexec %s %s "$(dirname "$0")/edge-agent" "$@"\n' "$qemu" "$qemu_args" > "$OUT/$arch/run"
  chmod +x "$OUT/$arch/run"

  # Smoke: the ARM binary runs under qemu and accepts the packaged config.
  smoke=$(mktemp -d)
  echo placeholder > "$smoke/token"
  : > "$smoke/users"
  sed -e "s|/etc/edge-agent/|$smoke/|" -e "s|/var/lib/edge-agent/|$smoke/|" cross/agent.yaml > "$smoke/agent.yaml"
  "$OUT/$arch/run" --version
  "$OUT/$arch/run" check-config "$smoke/agent.yaml"
  rm -rf "$smoke"

  bash cross/package.sh "$arch" "$deb" "$version" "$OUT/$arch/edge-agent" "$OUT"
done
