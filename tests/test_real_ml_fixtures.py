"""The captured real-ML fixtures (tests/fixtures/real-ml/) are usable: every unit.export becomes a real journal file
with systemd-journal-remote and reads back entry for entry with journalctl, every docker.jsonl line is a Docker
json-file record, and every manifest carries the keys the verdict tests rely on, with a first-evidence pointer
that really points at the entry it names. No verdicts here: those live with the journal source's tests."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import pytest

from tests.support.journal import write_journal

REAL_ML = pathlib.Path(__file__).resolve().parent / "fixtures" / "real-ml"
FIXTURES = sorted(p.parent for p in REAL_ML.glob("*/manifest.json"))
ML_UNIT = "immich-machine-learning.service"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RFC3339_NS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")

journal_tools = pytest.mark.skipif(not os.access("/lib/systemd/systemd-journal-remote", os.X_OK),
                                   reason="systemd-journal-remote is not installed")


def parse_export(data: bytes) -> list[dict[str, bytes]]:
    """Journal export format, read independently of the tooling that wrote the manifests."""
    entries: list[dict[str, bytes]] = []
    cur: dict[str, bytes] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if not line:
            if cur:
                entries.append(cur)
                cur = {}
            i = nl + 1
        elif b"=" in line:
            k, v = line.split(b"=", 1)
            cur[k.decode()] = v
            i = nl + 1
        else:
            n = int.from_bytes(data[nl + 1:nl + 9], "little")
            cur[line.decode()] = data[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
    if cur:
        entries.append(cur)
    return entries


def test_there_are_real_captures():
    assert FIXTURES, f"no manifest.json under {REAL_ML}"
    assert any((f / "unit.export").exists() for f in FIXTURES)


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda p: p.name)
def test_manifest_has_the_required_keys(fx):
    m = json.loads((fx / "manifest.json").read_text())
    assert m["variant"] == fx.name
    assert m["synthetic"] is False
    assert re.fullmatch(r"v\d+\.\d+\.\d+", m["immich"]["version"]) and re.fullmatch(r"[0-9a-f]{40}",
                                                                                   m["immich"]["commit"])
    assert "gunicorn" in m["versions"] and any(k.startswith("onnxruntime") for k in m["versions"])
    assert m["launch"]["mode"] and m["launch"]["exec"]
    assert (fx / m["capture"]["file"]).exists()
    assert m["lifecycle"]["events"][0]["event"] == "start" and m["lifecycle"]["events"][-1]["event"] == "finished"
    truth = m["truth"]
    for key in ("workers", "sessions", "fallback", "crash", "first_evidence", "first_of_each_evidence_kind"):
        assert key in truth
    assert truth["workers"], "a capture without a worker"
    outcomes = {s["outcome"] for s in truth["sessions"]}
    assert outcomes <= {"preferred", "fell_back", "exception", "unfinished"} | {
        o for o in outcomes if o.startswith("worker_died_SIG")}
    # a capture with a fallback or a crash names where its first evidence is; a clean one names none
    assert (truth["first_evidence"] is not None) == (truth["fallback"] or truth["crash"])


@journal_tools
@pytest.mark.parametrize("fx", [f for f in FIXTURES if (f / "unit.export").exists()], ids=lambda p: p.name)
def test_unit_export_becomes_a_real_journal_file(fx, tmp_path):
    export = (fx / "unit.export").read_bytes()
    want = parse_export(export)
    jfile = tmp_path / "real-ml.journal"
    write_journal(jfile, export)
    r = subprocess.run(["journalctl", f"--file={jfile}", "-o", "export", "--no-pager"], capture_output=True,
                       timeout=60, check=True)
    got = parse_export(r.stdout)
    assert len(got) == len(want)
    for g, w in zip(got, want):  # every entry keeps its time, PID, unit and exact message bytes
        for field in ("__REALTIME_TIMESTAMP", "_PID", "_SYSTEMD_UNIT", "UNIT", "MESSAGE", "PRIORITY"):
            assert g.get(field) == w.get(field), field
    unit_entries = [e for e in got if e.get("_SYSTEMD_UNIT", b"").decode() == ML_UNIT]
    assert unit_entries, "no entry of the ML unit"


@pytest.mark.parametrize("fx", [f for f in FIXTURES if (f / "unit.export").exists()], ids=lambda p: p.name)
def test_first_evidence_points_at_the_entry_it_quotes(fx):
    m = json.loads((fx / "manifest.json").read_text())
    entries = parse_export((fx / "unit.export").read_bytes())
    for kind, ev in m["truth"]["first_of_each_evidence_kind"].items():
        e = entries[ev["index"]]
        assert e["__CURSOR"].decode() == ev["cursor"], kind
        assert int(e["__REALTIME_TIMESTAMP"]) == ev["realtime_us"], kind
        assert int(e["_PID"]) == ev["pid"], kind
        assert ANSI.sub("", e["MESSAGE"].decode("utf-8", "replace")) == ev["message"], kind
        # nothing of the same kind comes earlier: it is the first
        earlier = [x for x in entries[:ev["index"]] if x.get("_SYSTEMD_UNIT", b"").decode() == ML_UNIT]
        assert all(ANSI.sub("", x.get("MESSAGE", b"").decode("utf-8", "replace")) != ev["message"]
                   for x in earlier), kind


@pytest.mark.parametrize("fx", [f for f in FIXTURES if (f / "docker.jsonl").exists()], ids=lambda p: p.name)
def test_docker_capture_is_json_file_records(fx):
    lines = (fx / "docker.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        rec = json.loads(line)
        assert set(rec) == {"log", "stream", "time"}
        assert rec["stream"] in ("stdout", "stderr")
        assert rec["log"].endswith("\n")
        assert RFC3339_NS.match(rec["time"]), rec["time"]
        text = ANSI.sub("", rec["log"])
        # the two pipes were not swapped: ORT's native log is C++ stderr, Rich's records and print() are stdout
        if re.search(r"\[[EW]:onnxruntime:", text):
            assert rec["stream"] == "stderr", text
        if re.match(r"\[\d\d/\d\d/\d\d \d\d:\d\d:\d\d\]", text) or "EP Error" in text:
            assert rec["stream"] == "stdout", text
