#!/usr/bin/env python3
"""Checks one `immich-gpu-exporter --once --gpu.pid-labels` exposition (stdin) for a GPU load's PID.

    gpu_smoke_check.py --pid PID --unit UNIT --container NAME --component COMPONENT < exposition

Prints one PASS/FAIL/WARN line per check; exits 1 if any check failed. Used by gpu-smoke.sh; the
test suite runs it against the fake NVML library too.
"""

from __future__ import annotations

import argparse
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", required=True)
    ap.add_argument("--unit", default="")
    ap.add_argument("--container", default="")
    ap.add_argument("--component", default="other")
    ap.add_argument("--need-utilization", action="store_true", help="fail (not warn) when SM utilisation is 0")
    a = ap.parse_args()
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(sys.stdin.read()):
        for s in fam.samples:
            series.setdefault(s.name, []).append((s.labels, s.value))
    failed = False

    def check(ok: bool, what: str, warn: bool = False) -> None:
        nonlocal failed
        word = "PASS" if ok else ("WARN" if warn else "FAIL")
        failed |= word == "FAIL"
        print(f"{word} {what}")

    def get(name: str, **want: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for lab, v in series.get(name, []) if all(lab.get(k) == v2 for k, v2 in want.items())]

    up = get("immich_gpu_exporter_source_up", source="nvml")
    check(bool(up) and up[0][1] == 1, "nvml source is up")
    gpus = get("immich_gpu_info")
    check(bool(gpus), f"GPUs seen: {', '.join(l['name'] + ' driver ' + l['driver_version'] for l, _ in gpus) or 'none'}")
    mine = get("immich_gpu_pid_memory_used_bytes", pid=a.pid) or get("immich_gpu_pid_sm_utilization_ratio", pid=a.pid)
    check(bool(mine), f"load PID {a.pid} is listed by NVML")
    if not mine:
        return 1
    lab = mine[0][0]
    got = (lab["component"], lab["unit"], lab["container"])
    check(got == (a.component, a.unit, a.container),
          f"PID {a.pid} attributed to component={got[0]!r} unit={got[1]!r} container={got[2]!r} "
          f"(expected {a.component!r}, {a.unit!r}, {a.container!r})")
    mem = get("immich_gpu_pid_memory_used_bytes", pid=a.pid)
    if mem:
        check(mem[0][1] > 0, f"PID {a.pid} holds {mem[0][1] / 2**20:.0f} MiB of GPU memory")
    else:
        check(False, f"PID {a.pid} GPU memory is N/A (MIG or no permission?)", warn=True)
    sm = get("immich_gpu_pid_sm_utilization_ratio", pid=a.pid)
    check(bool(sm) and sm[0][1] > 0, f"PID {a.pid} SM utilisation {sm[0][1] if sm else 'absent'}",
          warn=not a.need_utilization)
    group = get("immich_gpu_process_memory_used_bytes", component=a.component, unit=a.unit, container=a.container)
    check(bool(group) and (not mem or group[0][1] >= mem[0][1]),
          f"group {a.component}/{a.unit or a.container or '-'} memory {group[0][1] / 2**20 if group else 0:.0f} MiB "
          f"includes the PID")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
