"""Read values out of Triton's Prometheus text (/metrics): benchmarks diff them around a run."""

from __future__ import annotations

import re
import urllib.request

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+([-+0-9.eEinfa]+)$')


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(name, sorted label pairs): value} for every sample line."""
    samples = {}
    for line in text.splitlines():
        match = LINE.match(line.strip())
        if not match:
            continue
        name, labels, value = match.groups()
        pairs = tuple(sorted(re.findall(r'([a-zA-Z_]+)="([^"]*)"', labels or "")))
        samples[(name, pairs)] = float(value)
    return samples


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    return parse(urllib.request.urlopen(url, timeout=10).read().decode())


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def mean_between(before: dict, after: dict, name: str, **labels) -> float | None:
    """Mean of a histogram's observations made between two scrapes (None when there were none)."""
    count = value(after, f"{name}_count", **labels) - value(before, f"{name}_count", **labels)
    total = value(after, f"{name}_sum", **labels) - value(before, f"{name}_sum", **labels)
    return total / count if count > 0 else None
