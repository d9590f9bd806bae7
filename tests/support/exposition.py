"""Parse exposition text into {(name, frozenset(labels)): value} for assertions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text_or_parsed, name: str, **labels: str) -> float | None:
    parsed = parse(text_or_parsed) if isinstance(text_or_parsed, str) else text_or_parsed
    want = set(labels.items())
    hits = [v for (n, lab), v in parsed.items() if n == name and want <= set(lab)]
    if not hits:
        return None
    if len(hits) > 1:
        raise AssertionError(f"{name}{labels} matches {len(hits)} series")
    return hits[0]


def series(text_or_parsed, name: str) -> dict[frozenset, float]:
    parsed = parse(text_or_parsed) if isinstance(text_or_parsed, str) else text_or_parsed
    return {lab: v for (n, lab), v in parsed.items() if n == name}
