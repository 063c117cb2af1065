#!/usr/bin/env bash
# Packages one built agent binary: a .deb and a tarball with the binary, the packaged config,
# the systemd unit and the install notes. Called by cross/build.sh.
#   bash cross/package.sh <arch> <debian-arch> <version> <binary> <out-dir>
set -euo pipefail
cd "$(dirname "$0")/.."
arch=$1 deb_arch=$2 version=$3 binary=$4 out=$5

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -m 0755 "$binary" "$root/usr/bin/edge-agent"
install -D -m 0640 cross/agent.yaml "$root/etc/edge-agent/agent.yaml"
install -D -m 0644 cross/edge-agent.service "$root/lib/systemd/system/edge-agent.service"
install -D -m 0644 cross/INSTALL.md "$root/usr/share/doc/edge-agent/INSTALL.md"
install -D -m 0644 config/agent.yaml "$root/usr/share/doc/edge-agent/agent.example.yaml"

# Tarball: the same tree, without the Debian control files. Extracted over / (INSTALL.md), every
# directory entry must be what a system has there: root-owned 0755 (mktemp -d makes the tree's
# top 0700, which would make / unusable). Its config is 0644: the service user must read it,
# and a tarball cannot know that user's group (the token, the secret, is a file of its own,
# which INSTALL.md has the operator create 0640 with the group). The .deb keeps 0640 and sets
# the group in postinst.
chmod 0755 "$root"
find "$root" -type d -exec chmod 0755 {} +
chmod 0644 "$root/etc/edge-agent/agent.yaml"
tar --owner=0 --group=0 --numeric-owner -czf "$out/edge-agent-$version-$arch.tar.gz" -C "$root" .
chmod 0640 "$root/etc/edge-agent/agent.yaml"

mkdir -p "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: edge-agent
Version: $version
Architecture: $deb_arch
Maintainer: Edge gateway team <edge-gateway@example.com>
Section: net
Priority: optional
Depends: adduser, ca-certificates
Installed-Size: $(du -sk "$root/usr" | cut -f1)
Description: Edge-to-cloud IoT gateway agent
 Embedded MQTT broker, durable SQLite buffer that survives outages and power
 cuts, prioritised and compressed delivery to the cloud ingest.
CONTROL
echo /etc/edge-agent/agent.yaml > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  getent passwd edge-agent >/dev/null || adduser --system --group --home /var/lib/edge-agent --no-create-home edge-agent
  # dpkg does not bring back a conffile the operator deleted.
  if [ -e /etc/edge-agent/agent.yaml ]; then
    chgrp edge-agent /etc/edge-agent/agent.yaml
  fi
  if [ ! -e /etc/edge-agent/users ]; then
    # No MQTT users yet: add sensors with `edge-agent hash-password` (INSTALL.md).
    : > /etc/edge-agent/users
    chgrp edge-agent /etc/edge-agent/users
    chmod 0640 /etc/edge-agent/users
  fi
  if [ ! -e /etc/edge-agent/token ]; then
    # A placeholder: the agent runs and keeps data; the ingest answers 401 until it is replaced.
    printf 'placeholder-token-replace-me\n' > /etc/edge-agent/token
    chgrp edge-agent /etc/edge-agent/token
    chmod 0640 /etc/edge-agent/token
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable edge-agent.service >/dev/null
    systemctl restart edge-agent.service
  fi
fi
POSTINST
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl stop edge-agent.service || true
  systemctl disable edge-agent.service >/dev/null || true
fi
PRERM
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rm -rf /var/lib/edge-agent /etc/edge-agent
  getent passwd edge-agent >/dev/null && deluser --system edge-agent >/dev/null || true
fi
[ -d /run/systemd/system ] && systemctl daemon-reload || true
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
dpkg-deb --root-owner-group --build "$root" "$out/edge-agent_${version}_${deb_arch}.deb" >/dev/null
echo "   packaged $out/edge-agent_${version}_${deb_arch}.deb and $out/edge-agent-$version-$arch.tar.gz"
