#!/usr/bin/env bash
# Installs immich-gpu-exporter into /opt/immich-gpu-exporter (Debian/Ubuntu, as root) and starts it
# in the foreground on 127.0.0.1:10283. Extra arguments are passed to the exporter.
# Verified on fresh minbase Debian 12 and Ubuntu 24.04; running it again upgrades in place.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# pystemd has no wheels on PyPI: pip compiles it, so it needs a C compiler with the libc headers
# (gcc only recommends libc6-dev, and recommends are off), Python.h, libsystemd's headers and
# pkg-config (its setup.py asks pkg-config for the libsystemd version). ca-certificates: pip
# from Debian's python3-venv trusts only the system CA bundle when it fetches from PyPI.
need=()
for p in python3 python3-venv python3-dev gcc libc6-dev pkg-config libsystemd-dev ca-certificates; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (apt)" >&2
  apt-get update -qq && apt-get install -y -q --no-install-recommends "${need[@]}"
fi
PREFIX=${PREFIX:-/opt/immich-gpu-exporter}
# The unit runs it as its own unprivileged user: a root umask of 027/077 must not leave the venv unreadable.
umask 022
[ -x "$PREFIX/bin/pip" ] || python3 -m venv "$PREFIX"
# Build from a throwaway copy: setuptools writes build/ and *.egg-info next to the sources, which
# fails in a read-only clone, and a stale build/lib would put modules deleted by a `git pull`
# back into the next install.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -c --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' . | tar -x -C "$src"
echo "installing into $PREFIX (pip; pystemd compiles from source the first time)" >&2
"$PREFIX/bin/pip" install -q --disable-pip-version-check "$src"
rm -rf "$src"
trap - EXIT
# The path deploy/systemd/immich-gpu-exporter.service runs (ExecStart=).
ln -sf "$PREFIX/bin/immich-gpu-exporter" /usr/local/bin/immich-gpu-exporter
echo "installed $("$PREFIX/bin/immich-gpu-exporter" --version); starting it (Ctrl-C stops it)" >&2
exec "$PREFIX/bin/immich-gpu-exporter" "$@"
