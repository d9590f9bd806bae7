#!/usr/bin/env bash
# GPU smoke test for a machine with a real NVIDIA GPU (run as root for the cgroup part).
#
# Starts a GPU load (PyTorch, else CuPy) inside a cgroup named like the NixOS ML unit, runs
#   immich-gpu-exporter --once --no-collector.systemd --no-collector.journal --no-collector.immich
# and checks that the load's PID, GPU memory and SM utilisation appear attributed to that unit.
# Prints PASS/FAIL/WARN lines; exit status 0 only if nothing FAILed.
#
#   PYTHON=/path/to/python (with torch or cupy, and this package importable)  scripts/gpu-smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SECONDS_OF_LOAD=${SMOKE_SECONDS:-20}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

command -v nvidia-smi >/dev/null && nvidia-smi -L | sed 's/^/INFO /'
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then LOADER=torch
elif "$PY" -c 'import cupy; cupy.cuda.runtime.getDeviceCount()' 2>/dev/null; then LOADER=cupy
else echo "FAIL neither PyTorch with CUDA nor CuPy is importable by $PY"; exit 1; fi
echo "INFO load generator: $LOADER"

tmp=$(mktemp -d)
load_pid=""
cg=""
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null && wait "$load_pid" 2>/dev/null
  if [ -n "$cg" ]; then rmdir "$cg/system.slice/immich-machine-learning.service" "$cg/system.slice" "$cg" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

cat >"$tmp/load.py" <<PYEOF
import os, sys, time
end = time.time() + $SECONDS_OF_LOAD
if "$LOADER" == "torch":
    import torch
    a = torch.randn(4096, 4096, device="cuda"); b = torch.randn(4096, 4096, device="cuda")
    step = lambda: (a @ b).sum().item()
else:
    import cupy
    a = cupy.random.rand(4096, 4096, dtype=cupy.float32); b = cupy.random.rand(4096, 4096, dtype=cupy.float32)
    step = lambda: float((a @ b).sum())
step()
print("READY", flush=True)
while time.time() < end:
    step()
PYEOF

# Our own cgroup tree (like the tests), if cgroup2 is writable: the expected unit is then known.
mnt=$(awk '$9 == "cgroup2" && $4 == "/" {print $5; exit}' /proc/self/mountinfo)
expect_unit="" ; expect_component="other"
"$PY" "$tmp/load.py" >"$tmp/load.out" 2>"$tmp/load.err" &
load_pid=$!
if [ -n "$mnt" ] && [ -w "$mnt" ]; then
  cg="$mnt/immich-gpu-smoke-$$"
  if mkdir -p "$cg/system.slice/immich-machine-learning.service" &&
     echo "$load_pid" >"$cg/system.slice/immich-machine-learning.service/cgroup.procs"; then
    expect_unit=immich-machine-learning.service; expect_component=ml
  else
    echo "WARN could not move the load into a cgroup; checking attribution as found"
  fi
fi
for _ in $(seq 1 120); do grep -q READY "$tmp/load.out" 2>/dev/null && break; kill -0 "$load_pid" 2>/dev/null || break; sleep 0.5; done
if ! grep -q READY "$tmp/load.out"; then echo "FAIL the GPU load did not start:"; sed 's/^/  /' "$tmp/load.err"; exit 1; fi
echo "INFO load PID $load_pid in cgroup: $(tr '\n' ' ' </proc/$load_pid/cgroup)"
sleep 3  # let the driver record utilisation samples
if [ -z "$expect_unit" ]; then
  read -r expect_unit expect_container < <("$PY" - "$load_pid" <<'PYEOF'
import sys
from immich_gpu_exporter import attribution as a
p = a.locate(open(f"/proc/{sys.argv[1]}/cgroup").read())
print(p.unit or "-", p.container_id[:12] or "-")
PYEOF
  )
  [ "$expect_unit" = "-" ] && expect_unit=""
  [ "$expect_container" = "-" ] && expect_container=""
fi

"$PY" -m immich_gpu_exporter --once --no-collector.systemd --no-collector.journal --no-collector.immich \
  --gpu.pid-labels --nvml.interval=5 >"$tmp/exposition.txt" 2>"$tmp/exporter.err"
rc=$?
[ $rc -eq 0 ] || { echo "FAIL exporter exited $rc"; cat "$tmp/exporter.err"; exit 1; }
grep -E '^immich_gpu_(info|pid_|process_memory_used|processes)' "$tmp/exposition.txt" | sed 's/^/INFO /'
"$PY" scripts/gpu_smoke_check.py --pid "$load_pid" --unit "$expect_unit" --container "${expect_container:-}" \
  --component "$expect_component" --need-utilization <"$tmp/exposition.txt"
