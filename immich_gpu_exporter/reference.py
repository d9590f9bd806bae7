"""Generates docs/metrics.md and docs/configuration.md from METRICS and OPTIONS.

Run `python -m immich_gpu_exporter.reference` after changing either; a test fails while the
docs are out of date.
"""

from __future__ import annotations

import pathlib

from .config import NOT_A_FLAG, OPTIONS
from .metrics import METRICS

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def metrics_markdown() -> str:
    lines = [
        "# Metric reference",
        "",
        "Generated from `immich_gpu_exporter/metrics.py` by `python -m immich_gpu_exporter.reference`; "
        "a test keeps it in sync. Every value is collected in the background by its source's own loop "
        "and served from a cache, so it is as old as "
        "`immich_gpu_exporter_source_last_success_timestamp_seconds{source=...}`. "
        "Label values that do not apply are empty strings.",
        "",
    ]
    by_source: dict[str, list] = {}
    for d in METRICS.values():
        by_source.setdefault(d.source, []).append(d)
    for source, defs in by_source.items():
        lines += [f"## Source `{source}`", "", "| metric | type | labels | meaning |", "|---|---|---|---|"]
        for d in defs:
            labels = ", ".join(f"`{x}`" for x in d.labels) or "–"
            lines.append(f"| `{d.name}` | {d.type} | {labels} | {_cell(d.help)} |")
        lines.append("")
    return "\n".join(lines)


def configuration_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `immich_gpu_exporter/config.py` by `python -m immich_gpu_exporter.reference`. "
        "Each option can be given as a flag, an environment variable or a key of the TOML file named by "
        "`--config` (or `IMMICH_GPU_EXPORTER_CONFIG`); flags win over the environment, the environment "
        "over the file, the file over the defaults. An invalid value stops the exporter with one line on "
        "stderr naming the option, and exit code 2. Lists take repeated flags or comma-separated values.",
        "",
        "| flag | environment | TOML | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        flag = "–" if o.key in NOT_A_FLAG else (f"`--{o.key}` / `--no-{o.key}`" if o.boolean else f"`{o.flag}`")
        default = ", ".join(o.default) if isinstance(o.default, tuple) else o.default
        default = "–" if default is None else f"`{default}`"
        lines.append(f"| {flag} | `{o.env}` | `[{o.section}] {o.name}` | {default} | {_cell(o.help)} |")
    lines += [
        "",
        "Example file:",
        "",
        "```toml",
        "[web]",
        'listen-address = "127.0.0.1:10283"',
        "",
        "[systemd]",
        'unit = ["immich-server.service", "immich-machine-learning.service"]',
        "",
        "[immich]",
        'url = "http://localhost:2283"',
        'api-key-file = "/run/credentials/immich-gpu-exporter.service/immich-api-key"',
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "metrics.md").write_text(metrics_markdown())
    (DOCS / "configuration.md").write_text(configuration_markdown())


if __name__ == "__main__":
    main()
