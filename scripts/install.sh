#!/usr/bin/env bash
# Installs immich-gpu-exporter into /opt/immich-gpu-exporter (Debian/Ubuntu, as root) and starts it
# in the foreground on 127.0.0.1:10283. Extra arguments are passed to the exporter.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=()
for p in python3 python3-venv python3-dev gcc pkg-config libsystemd-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -q --no-install-recommends "${need[@]}"; fi
PREFIX=${PREFIX:-/opt/immich-gpu-exporter}
[ -x "$PREFIX/bin/python" ] || python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q --disable-pip-version-check .
ln -sf "$PREFIX/bin/immich-gpu-exporter" /usr/local/bin/immich-gpu-exporter
echo "installed $("$PREFIX/bin/immich-gpu-exporter" --version); starting it (Ctrl-C stops it)" >&2
exec "$PREFIX/bin/immich-gpu-exporter" "$@"
