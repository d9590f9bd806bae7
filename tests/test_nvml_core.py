"""The pure parts of the NVML source: process merging, the utilisation hold, sample building."""

from __future__ import annotations


import pynvml
import pytest

from immich_gpu_exporter import metrics
from immich_gpu_exporter.attribution import Identity
from immich_gpu_exporter.sources.nvml import (
    NA_ULL, GpuReading, NvmlReading, UtilSample, UtilTracker, Util, component_gpu_memory,
    error_reason, gpu_samples, is_535_layout, merge_processes)
from immich_gpu_exporter.sources.processes import ProcView

ML = Identity("ml", "immich-machine-learning.service", "")
SRV = Identity("server", "", "immich_server")
OTHER = Identity("other", "", "")


def test_merge_processes_takes_one_value_per_pid_and_maps_na_to_none():
    got = merge_processes([(1, 500), (2, NA_ULL), (3, None)], [(1, 400), (2, 300), (4, None)])
    assert got == {1: 500, 2: 300, 3: None, 4: None}


@pytest.mark.parametrize("cls,reason", [
    (pynvml.NVMLError_GpuIsLost, "gpu_is_lost"), (pynvml.NVMLError_LibRmVersionMismatch, "lib_rm_version_mismatch"),
    (pynvml.NVMLError_DriverNotLoaded, "driver_not_loaded"), (pynvml.NVMLError_Uninitialized, "uninitialized"),
])
def test_error_reason_is_a_bounded_snake_case_label(cls, reason):
    assert error_reason(cls()) == reason
    assert error_reason(pynvml.NVMLError(12345)) == "nvml_error"


def test_535_layout_is_detected_by_exported_symbols():
    class Lib:
        pass
    old, new, r535 = Lib(), Lib(), Lib()
    new.nvmlDeviceGetConfComputeMemSizeInfo = new.nvmlDeviceGetRunningProcessDetailList = object()
    r535.nvmlDeviceGetConfComputeMemSizeInfo = object()
    assert (is_535_layout(old), is_535_layout(new), is_535_layout(r535)) == (False, False, True)


def s(pid, ts, sm, mem=0, enc=0, dec=0):
    return UtilSample(pid, ts, sm, mem, enc, dec)


def test_util_tracker_newest_sample_wins_and_no_samples_hold_the_last_value():
    t = UtilTracker(hold=15)
    got = t.update("G", [s(1, 200, 60), s(1, 100, 40), s(2, 150, 5, 1, 3, 2)], [1, 2, 3], now=0)
    assert got == {1: Util(0.6, 0, 0, 0), 2: Util(0.05, 0.01, 0.03, 0.02), 3: Util(0, 0, 0, 0)}
    assert t.update("G", [], [1, 2], now=10)[1] == Util(0.6, 0, 0, 0)  # NotFound: kept
    assert t.update("G", [], [1, 2], now=16)[1] == Util(0, 0, 0, 0)  # held too long: idle


def test_util_tracker_ignores_samples_of_processes_not_on_the_gpu_and_forgets_gone_ones():
    t = UtilTracker(hold=15)
    t.update("G", [s(1, 100, 50), s(9, 100, 99)], [1], now=0)
    t.forget_except([])
    # PID 1 comes back (reused): no resurrected value.
    assert t.update("G", [], [1], now=1) == {1: Util(0, 0, 0, 0)}


def reading(*gpus):
    return NvmlReading("550.54.15", tuple(gpus), ())


def gpu(procs, util_supported=True, index=0):
    return GpuReading(index, f"GPU-{index}", "Fake", 0.5, 100, 1000, procs, (), util_supported)


def by(samples, name):
    """(component, unit, container[, pid]) -> value."""
    out = {}
    for x in samples:
        if x.name == name:
            lab = dict(x.labels)
            out[(lab["component"], lab["unit"], lab["container"]) + ((lab["pid"],) if "pid" in lab else ())] = x.value
    return out


def test_gpu_samples_sum_per_group_and_respect_the_metric_table():
    views = {1: ProcView(1, "python", ML), 2: ProcView(2, "python", ML), 3: ProcView(3, "node", SRV),
             4: ProcView(4, "Xorg", OTHER)}
    utils = {"GPU-0": {1: Util(0.3, 0.1, 0, 0), 2: Util(0.2, 0.1, 0, 0), 3: Util(0, 0, 0.4, 0.2)}}
    out = gpu_samples(reading(gpu({1: 100, 2: 50, 3: 10, 4: None})), utils, views, pid_labels=True)
    for x in out:
        metrics.check_sample(x)
    mem = by(out, "immich_gpu_process_memory_used_bytes")
    assert mem == {("ml", "immich-machine-learning.service", ""): 150, ("server", "", "immich_server"): 10}
    assert by(out, "immich_gpu_processes")[("ml", "immich-machine-learning.service", "")] == 2
    assert by(out, "immich_gpu_process_sm_utilization_ratio")[("ml", "immich-machine-learning.service", "")] == \
        pytest.approx(0.5)
    assert by(out, "immich_gpu_process_encoder_utilization_ratio")[("server", "", "immich_server")] == 0.4
    # other's memory is N/A: no series rather than a false 0, but the process is counted.
    assert ("other", "", "") not in mem and by(out, "immich_gpu_processes")[("other", "", "")] == 1
    pids = by(out, "immich_gpu_pid_memory_used_bytes")
    assert pids[("ml", "immich-machine-learning.service", "", "1")] == 100 and len(pids) == 3


def test_gpu_samples_without_pid_labels_or_utilisation_support():
    out = gpu_samples(reading(gpu({1: 100}, util_supported=False)), {}, {1: ProcView(1, "p", ML)}, False)
    names = {x.name for x in out}
    assert "immich_gpu_pid_memory_used_bytes" not in names
    assert "immich_gpu_process_sm_utilization_ratio" not in names
    assert "immich_gpu_process_memory_used_bytes" in names


def test_component_gpu_memory_fact_has_every_component():
    views = {1: ProcView(1, "p", ML), 2: ProcView(2, "x", OTHER)}
    assert component_gpu_memory(reading(gpu({1: 100, 2: None})), views, ["ml", "server"]) == {"ml": 100, "server": 0}
