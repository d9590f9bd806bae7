#!/usr/bin/env bash
# Installs everything the test suite needs (Debian/Ubuntu, as root) and runs the whole suite.
# Skips are failures here (IMMICH_GPU_EXPORTER_TEST_NO_SKIP=1): every test must really run. The one
# exception (tests/conftest.py): on a plain clone without ../shared, and only when CI is not "true",
# the tests that read ../shared skip with a one-line reason; under CI=true their absence fails.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc libc6-dev pkg-config libsystemd-dev ca-certificates  # pystemd builds from
                                                                    # source (see install.sh); gcc also builds the fake libnvidia-ml
  systemd dbus systemd-journal-remote                              # real systemd/journald/dbus fixtures, journal files
  util-linux mount                                                  # unshare, nsenter, mount for the nested systemd
  prometheus prometheus-alertmanager                                # promtool, a real Prometheus and Alertmanager
  nix-bin                                                           # nix-instantiate for the NixOS modules
)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/pip ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# Stop here to provision a machine (or check the install step) without running the suite.
[ "${IMMICH_GPU_EXPORTER_TEST_INSTALL_ONLY:-0}" = 1 ] && { echo "test dependencies installed; suite not run" >&2; exit 0; }

export IMMICH_GPU_EXPORTER_TEST_NO_SKIP=1
exec .venv/bin/python -m pytest -q -rfEs "$@"
