"""Rendering: golden exposition files compared byte for byte, promtool lint, metric contracts."""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import shutil
import subprocess
import sys
from types import MappingProxyType

import pytest

from immich_gpu_exporter import metrics, reference
from immich_gpu_exporter.core import SourceState, Snapshot, sample

GOLDEN = pathlib.Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def snapshot_fixture() -> Snapshot:
    """A deterministic snapshot: one healthy source of each kind and one down."""
    inf = float("inf")
    nvml = SourceState(
        "nvml", True, 1795700000.0, 0.0125, errors=MappingProxyType({"gpu_lost": 1}),
        samples=(
            sample("immich_gpu_info", 1, gpu="0", uuid="GPU-1111", name="NVIDIA GeForce RTX 3060", driver_version="550.54.15"),
            sample("immich_gpu_utilization_ratio", 0.37, gpu="0", uuid="GPU-1111"),
            sample("immich_gpu_memory_used_bytes", 3221225472, gpu="0", uuid="GPU-1111"),
            sample("immich_gpu_memory_total_bytes", 12884901888, gpu="0", uuid="GPU-1111"),
            sample("immich_gpu_process_memory_used_bytes", 524288000, gpu="0", uuid="GPU-1111", component="ml",
                   unit="immich-machine-learning.service", container=""),
            sample("immich_gpu_process_memory_used_bytes", 16777216, gpu="0", uuid="GPU-1111", component="other",
                   unit="", container=""),
            sample("immich_gpu_processes", 1, gpu="0", uuid="GPU-1111", component="ml",
                   unit="immich-machine-learning.service", container=""),
            sample("immich_process_memlock_limit_bytes", inf, component="ml", unit="immich-machine-learning.service",
                   container=""),
            sample("immich_process_cpu_seconds_total", 12.5, component="ml", unit="immich-machine-learning.service",
                   container=""),
        ),
    )
    journal = SourceState(
        "journal", True, 1795700001.5, 0.001,
        samples=(
            sample("immich_ml_execution_provider", 1, provider="CPUExecutionProvider"),
            sample("immich_ml_execution_provider", 0, provider="CUDAExecutionProvider"),
            sample("immich_ml_preferred_execution_provider", 1, provider="CUDAExecutionProvider"),
            sample("immich_ml_cpu_fallback", 1),
            sample("immich_ml_provider_errors_total", 2, provider="CUDAExecutionProvider", kind="create_failed"),
            sample("immich_ml_model_loaded", 1, model_type="visual", model_name="ViT-B-32__openai"),
        ),
    )
    systemd = SourceState("systemd", False, None, 0.002, "cannot open the system bus", "no_bus",
                          MappingProxyType({"no_bus": 3}), cycles=3)
    return Snapshot(7, MappingProxyType({"nvml": nvml, "journal": journal, "systemd": systemd}),
                    MappingProxyType({"version": "0.0.0-test", "python_version": "3.11.7",
                                                      "mode": "live", "role": "all"}))


def _golden(name: str, data: bytes) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_bytes(data)
    assert path.exists(), f"missing {path}; regenerate with UPDATE_GOLDEN=1"
    assert data == path.read_bytes(), f"{name} differs from the golden file (see tests/golden/README.md)"


def test_text_exposition_matches_golden_byte_for_byte():
    _golden("snapshot.prom", metrics.render(snapshot_fixture()).text)


def test_openmetrics_exposition_matches_golden_byte_for_byte():
    _golden("snapshot.openmetrics", metrics.render(snapshot_fixture()).openmetrics)


def test_gzip_variant_is_the_same_text():
    r = metrics.render(snapshot_fixture())
    assert gzip.decompress(r.text_gzip) == r.text


def test_infinity_and_down_sources_are_rendered():
    text = metrics.render(snapshot_fixture()).text.decode()
    assert 'immich_process_memlock_limit_bytes{component="ml",container="",unit="immich-machine-learning.service"} +Inf' in text
    assert 'immich_gpu_exporter_source_up{source="systemd"} 0.0' in text
    assert 'immich_gpu_exporter_source_errors_total{reason="no_bus",source="systemd"} 3.0' in text
    # a source that never succeeded has no last-success series rather than a fake 0
    assert 'last_success_timestamp_seconds{source="systemd"}' not in text


def test_duplicate_series_from_two_places_are_emitted_once():
    snap = snapshot_fixture()
    st = snap.sources["journal"]
    dup = SourceState(st.name, True, st.last_success, st.duration, samples=st.samples + (sample("immich_ml_cpu_fallback", 0),))
    snap2 = Snapshot(8, MappingProxyType({**snap.sources, "journal": dup}), snap.build)
    text = metrics.render(snap2).text.decode()
    assert len(re.findall(r"^immich_ml_cpu_fallback ", text, re.M)) == 1


@pytest.mark.parametrize("name", ["snapshot.prom"])
def test_promtool_check_metrics_is_clean(name):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus"
    r = subprocess.run([promtool, "check", "metrics"], input=(GOLDEN / name).read_bytes(), capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def one_of(d: metrics.MetricDef) -> list:
    """One series of a metric: a sample, or a histogram's buckets, count and sum."""
    labels = {k: "x" for k in d.labels}
    if d.type != "histogram":
        return [sample(d.name, 1, **labels)]
    return [sample(d.name + "_bucket", 1, le="0.5", **labels), sample(d.name + "_bucket", 2, le="+Inf", **labels),
            sample(d.name + "_count", 2, **labels), sample(d.name + "_sum", 0.75, **labels)]


def test_every_defined_metric_passes_promtool_naming_rules():
    """Render one sample of every metric in METRICS and lint the whole lot."""
    samples = tuple(s for d in metrics.METRICS.values() if not d.name.startswith("immich_gpu_exporter_")
                    for s in one_of(d))
    snap = Snapshot(1, MappingProxyType({"all": SourceState("all", True, 1.0, 0.1, samples=samples)}),
                    MappingProxyType({"version": "t", "python_version": "3", "mode": "live", "role": "all"}))
    text = metrics.render(snap).text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    for d in metrics.METRICS.values():
        assert "percent" not in d.name and "_ms" not in d.name
        assert d.help.endswith("."), d.name


def test_check_sample_rejects_undefined_names_and_wrong_labels():
    metrics.check_sample(sample("immich_ml_cpu_fallback", 1))
    with pytest.raises(metrics.UnknownMetric):
        metrics.check_sample(sample("immich_nope", 1))
    with pytest.raises(metrics.UnknownMetric):
        metrics.check_sample(sample("immich_ml_cpu_fallback", 1, provider="x"))


def test_metric_reference_is_in_sync():
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    assert doc == reference.metrics_markdown(), "run: python -m immich_gpu_exporter.reference"


def test_hand_written_text_renderer_matches_client_python_even_for_odd_label_values():
    from prometheus_client.exposition import generate_latest

    snap = snapshot_fixture()
    odd = SourceState("journal", True, 1.0, 0.1, samples=(
        sample("immich_ml_model_loaded", 1, model_type='vis"ual', model_name="C:\\models\\x\nnew line"),
        sample("immich_ml_model_loads_total", float("nan"), model_type="ünï", model_name=""),
        sample("immich_ml_cpu_fallback", -0.0),
    ))
    snap = Snapshot(9, MappingProxyType({**snap.sources, "journal": odd}), snap.build)
    ours = metrics.render(snap).text
    theirs = generate_latest(metrics._registry(metrics.families(snap)))
    assert ours == theirs
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    assert metrics.render(snap, True).openmetrics == generate_openmetrics(metrics._registry(metrics.families(snap)))


@pytest.mark.parametrize("v", [0.0, -0.0, 1.0, 0.5, 1e-9, 123456.0, 1234567.0, 12345678.0, 1786000000.0,
                               1786000000.123456, 12345678901.0, 1e22, 1.5e16, 9.99e300, -12345678.0, -1e22,
                               float("inf"), float("-inf"), float("nan"), 100000000.0, 7, 2 ** 53])
def test_value_formatting_is_client_pythons(v):
    from prometheus_client.utils import floatToGoString

    assert metrics.go_float(v) == floatToGoString(v)


def test_neither_format_imports_client_python():
    """client_python costs ~3 MiB of resident memory; both formats are rendered by our code."""
    code = ("import sys; from immich_gpu_exporter import daemon, metrics; from tests.test_exposition import "
            "snapshot_fixture; r = metrics.render(snapshot_fixture(), True); assert r.openmetrics and r.text; "
            "print('prometheus_client' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1])
    assert r.stdout.strip() == "False", r.stderr


def test_histograms_render_as_client_python_writes_them():
    """Buckets by ascending le (labels sorted by name, le among them), then _count and _sum, per label set, in both
    formats; built from the latency accumulator's own output so the real producer is what is checked."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    from immich_gpu_exporter import latency

    h = latency.Histogram((0.1, 2.5, 10.0, 1000.0), (0.0, 1.0, 3.0, 4.0), 5.0, 4321.5)
    samples = (latency.histogram_samples("immich_ml_call_duration_seconds", h, call="encode_text",
                                         provider="CUDAExecutionProvider")
               + latency.histogram_samples("immich_ml_call_duration_seconds", h, call="encode_image", provider="")
               + latency.histogram_samples("immich_smart_search_query_duration_seconds", h, provider="a\"b"))
    for s in samples:
        metrics.check_sample(s)
    snap = Snapshot(3, MappingProxyType({"immich": SourceState("immich", True, 1.0, 0.1, samples=samples[::-1])}),
                    MappingProxyType({"version": "t", "python_version": "3", "mode": "live", "role": "all"}))
    text = metrics.render(snap, True)
    assert text.text == generate_latest(metrics._registry(metrics.families(snap)))
    assert text.openmetrics == generate_openmetrics(metrics._registry(metrics.families(snap)))
    lines = text.text.decode().splitlines()
    first = lines.index('immich_ml_call_duration_seconds_bucket{call="encode_image",le="0.0001",provider=""} 0.0')
    assert lines[first + 4] == 'immich_ml_call_duration_seconds_bucket{call="encode_image",le="+Inf",provider=""} 5.0'
    assert lines[first + 5] == 'immich_ml_call_duration_seconds_count{call="encode_image",provider=""} 5.0'
    assert lines[first + 6] == 'immich_ml_call_duration_seconds_sum{call="encode_image",provider=""} 4.3215'
    r = subprocess.run(["promtool", "check", "metrics"], input=text.text, capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
